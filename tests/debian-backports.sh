#!/bin/sh
# Adds Debian's bookworm-backports (deb and deb-src) to apt's sources once:
# QEMU 10.0.2 (qemu-system-arm, qemu-system-x86, its source package) comes
# from there. Idempotent.
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
