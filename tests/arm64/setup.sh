#!/bin/sh
# Installs what tests/arm64/run needs, from Debian's packages only, and
# fetches the three arm64 kernels into the cache. Idempotent: a second run
# downloads nothing that is already there.
set -eu
cache=${KDS_ARM64_CACHE:-$HOME/.cache/kvm-dirty-shim-arm64}
mkdir -p "$cache"

need=""
command -v qemu-system-aarch64 >/dev/null 2>&1 || need="$need qemu-system-arm"
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need="$need gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
command -v cpio >/dev/null 2>&1 || need="$need cpio"
[ -x /usr/bin/cargo ] && /usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu >/dev/null 2>&1 &&
    [ -d "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu)" ] ||
    need="$need rustc-web cargo-web libstd-rust-web-dev:arm64"
if [ -n "$need" ]; then
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    "$(dirname "$0")/../debian-backports.sh"
    apt-get update -qq
    # qemu-system-arm 10.0.2 comes from bookworm-backports.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports $need >/dev/null
fi

# The kernels: the newest 6.12 (has the ring and cap 225) and Debian's 6.1
# (no ring on arm64). Names move: look them up, keep what was fetched.
fetch_kernel() { # $1: name pattern, $2: cache name
    [ -s "$cache/$2" ] && return 0
    pkg=$(apt-cache search --names-only "$1" | awk '{print $1}' | grep -v -e '-rt-' -e '16k' -e 'dbg' -e 'unsigned' -e 'cloud' | sort -V | tail -n 1)
    [ -n "$pkg" ] || { echo "no package matches $1" >&2; exit 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq "$pkg:arm64" && dpkg-deb -x ./*.deb x)
    cp "$tmp"/x/boot/vmlinuz-* "$cache/$2"
    echo "$pkg" > "$cache/$2.pkg"
    rm -rf "$tmp"
}
fetch_kernel '^linux-image-6\.12\..*-arm64$' vmlinuz-6.12
fetch_kernel '^linux-image-6\.1\.0-[0-9]*-arm64$' vmlinuz-6.1

# The newest: Debian unstable's 7.2, through an APT configuration of its
# own (sid's arm64 and riscv64 binary packages; the system's sources are
# left alone). Its image is in linux-binary-* (linux-image-* only depends
# on it), at usr/lib/modules/<version>/vmlinuz.
. "$(dirname "$0")/../private-apt.sh"
sid_apt() {
    apt="$cache/sid-apt"
    private_apt "$apt" arm64,riscv64 "deb [arch=arm64,riscv64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main"
}
fetch_sid_kernel() { # $1: name pattern, $2: architecture, $3: cache name
    [ -s "$cache/$3" ] && return 0
    sid_apt
    pkg=$(apt-cache search --names-only "$1" | awk '{print $1}' |
        grep -v -e '-rt-' -e 'cloud' | sort -V | tail -n 1)
    [ -n "$pkg" ] || { echo "no package matches $1 in sid" >&2; exit 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq "$pkg:$2" 2>/dev/null &&
        dpkg-deb -x ./*.deb x)
    cp "$tmp"/x/usr/lib/modules/*/vmlinuz "$cache/$3"
    echo "$pkg" > "$cache/$3.pkg"
    rm -rf "$tmp"
}
fetch_sid_kernel '^linux-binary-7\.2\..*-arm64$' arm64 vmlinuz-7.2
echo "arm64 setup: kernels $(cat "$cache/vmlinuz-7.2.pkg"), $(cat "$cache/vmlinuz-6.12.pkg") and $(cat "$cache/vmlinuz-6.1.pkg") in $cache"
