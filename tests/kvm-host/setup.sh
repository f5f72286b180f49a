#!/bin/sh
# Installs what tests/kvm-host/run needs for one architecture (arm64, the
# default, or riscv64), from Debian's packages only, and fetches its kernels
# into the cache. Idempotent: a second run downloads nothing that is already
# there.
#   arm64:   the emulator and cross compilers; Debian's 6.12 and 6.1, and
#            unstable's 7.2 (vmlinuz-<version>)
#   riscv64: the emulator and cross compilers, rustup's riscv64 target;
#            unstable's 7.2 and Debian 13's 6.12 (no ring), each with its
#            kvm.ko (riscv64-vmlinuz-<version>, .kvm.ko)
set -eu
arch=${1:-arm64}
cache=${KDS_ARM64_CACHE:-$HOME/.cache/kvm-dirty-shim-arm64}
mkdir -p "$cache"

need=""
command -v cpio >/dev/null 2>&1 || need="$need cpio"
case $arch in
arm64)
    command -v qemu-system-aarch64 >/dev/null 2>&1 || need="$need qemu-system-arm"
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need="$need gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    [ -x /usr/bin/cargo ] && /usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu >/dev/null 2>&1 &&
        [ -d "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu)" ] ||
        need="$need rustc-web cargo-web libstd-rust-web-dev:arm64"
    ;;
riscv64)
    command -v qemu-system-riscv64 >/dev/null 2>&1 || need="$need qemu-system-misc"
    command -v riscv64-linux-gnu-gcc >/dev/null 2>&1 || need="$need gcc-riscv64-linux-gnu libc6-dev-riscv64-cross"
    command -v xz >/dev/null 2>&1 || need="$need xz-utils"
    # Debian 12 has no riscv64 port, so no libstd-rust for it: rustup's.
    rustup target list --installed --toolchain stable | grep -qx riscv64gc-unknown-linux-gnu ||
        rustup target add --toolchain stable riscv64gc-unknown-linux-gnu
    ;;
*)
    echo "usage: $0 [arm64|riscv64]" >&2
    exit 2
    ;;
esac
if [ -n "$need" ]; then
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    "$(dirname "$0")/../debian-backports.sh"
    apt-get update -qq
    # QEMU 10.0.2 (qemu-system-arm, qemu-system-misc) comes from bookworm-backports.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports $need >/dev/null
fi

# Debian 12's kernels: the newest 6.12 (has the ring and cap 225) and 6.1
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

# Newer kernels through an APT configuration of our own (the system's
# sources are left alone): unstable's 7.2 for arm64 and riscv64, and
# Debian 13's 6.12 for riscv64 (Debian 12 has no riscv64 port). 7.2's image
# is in linux-binary-* (linux-image-* only depends on it), at
# usr/lib/modules/<version>/vmlinuz, its modules in linux-modules-*; 6.12's
# linux-image-* holds both, the image in boot/. riscv64 builds KVM as a
# module: its kvm.ko is kept beside the image.
. "$(dirname "$0")/../private-apt.sh"
signed="signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
fetch_debian_kernel() { # $1: package name pattern, $2: architecture, $3: cache name
    [ -s "$cache/$3" ] && return 0
    private_apt "$cache/sid-apt" arm64,riscv64 \
        "deb [arch=arm64,riscv64 $signed] http://deb.debian.org/debian sid main" \
        "deb [arch=riscv64 $signed] http://deb.debian.org/debian trixie main"
    pkg=$(apt-cache search --names-only "$1" | awk '{print $1}' |
        grep -v -e '-rt-' -e 'cloud' -e 'dbg' -e 'unsigned' | sort -V | tail -n 1)
    [ -n "$pkg" ] || { echo "no package matches $1 for $2" >&2; exit 1; }
    tmp=$(mktemp -d)
    mkdir "$tmp/x"
    (cd "$tmp" && apt-get download -qq "$pkg:$2" 2>/dev/null) ||
        { echo "could not download $pkg:$2" >&2; exit 1; }
    case $pkg in
    linux-binary-*)
        mods=$(echo "$pkg" | sed 's/^linux-binary-/linux-modules-/')
        if [ "$2" = riscv64 ]; then
            (cd "$tmp" && apt-get download -qq "$mods:$2" 2>/dev/null) ||
                { echo "could not download $mods:$2" >&2; exit 1; }
        fi
        ;;
    esac
    for d in "$tmp"/*.deb; do
        dpkg-deb --fsys-tarfile "$d" | tar -x -C "$tmp/x" --wildcards \
            '*/vmlinu[xz]*' '*/kvm/kvm.ko*' 2>/dev/null || true
    done
    cp "$(find "$tmp/x" -name 'vmlinu[xz]*' -type f | head -n 1)" "$cache/$3"
    if [ "$2" = riscv64 ]; then
        xz -dc "$(find "$tmp/x" -name kvm.ko.xz | head -n 1)" > "$cache/$3.kvm.ko"
    fi
    echo "$pkg" > "$cache/$3.pkg"
    rm -rf "$tmp"
}

case $arch in
arm64)
    fetch_kernel '^linux-image-6\.12\..*-arm64$' vmlinuz-6.12
    fetch_kernel '^linux-image-6\.1\.0-[0-9]*-arm64$' vmlinuz-6.1
    fetch_debian_kernel '^linux-binary-7\.2\..*-arm64$' arm64 vmlinuz-7.2
    echo "arm64 setup: kernels $(cat "$cache/vmlinuz-7.2.pkg"), $(cat "$cache/vmlinuz-6.12.pkg") and $(cat "$cache/vmlinuz-6.1.pkg") in $cache"
    ;;
riscv64)
    fetch_debian_kernel '^linux-binary-7\.2\..*-riscv64$' riscv64 riscv64-vmlinuz-7.2
    fetch_debian_kernel '^linux-image-6\.12\..*-riscv64$' riscv64 riscv64-vmlinuz-6.12
    echo "riscv64 setup: kernels $(cat "$cache/riscv64-vmlinuz-7.2.pkg") and $(cat "$cache/riscv64-vmlinuz-6.12.pkg"), with their kvm.ko, in $cache"
    ;;
esac
