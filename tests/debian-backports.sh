#!/bin/sh
# Adds Debian's bookworm-backports (deb and deb-src) to apt's sources once:
# Debian's qemu-system-arm 10.0.2 (the TCG emulator that runs the arm64 KVM
# host) and qemu-system-data (x86 option ROMs) come from there. Idempotent.
set -eu
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
fi
