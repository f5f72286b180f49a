#!/bin/sh
# Builds the Linux guest kernel that boots under QEMU on a nested kvm_pvm
# host (doc/migration.md, "the Linux guest"): Debian's linux 6.1.170 source
# (bookworm), tinyconfig plus kernel-config.sh, the three workarounds of
# kernel-pvm.patch. Installs nothing: the build tools are unpacked into the
# cache. Prints the vmlinux's path. About 10 minutes on 2 CPUs, once.
#
#     tools/linux-guest/build-kernel.sh      # -> $KDS_GUEST_CACHE/vmlinux
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${KDS_GUEST_CACHE:-$HOME/.cache/kds-linux-guest}
VER=6.1.170
DEBVER=6.1.170-3
mkdir -p "$CACHE"
cd "$CACHE"
key=$(cat "$HERE/kernel-pvm.patch" "$HERE/kernel-config.sh" | sha256sum | cut -c1-12)
if [ -f "vmlinux" ] && [ "$(cat vmlinux.key 2>/dev/null)" = "$key" ]; then
    echo "$CACHE/vmlinux"
    exit 0
fi
# An APT configuration of our own, with bookworm's deb-src: the system's
# sources stay as they are.
mkdir -p apt/lists/partial apt/archives/partial apt/sources.list.d
cat > apt/sources.list <<SRC
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm main
SRC
cat > apt/apt.conf <<CONF
Dir::State "$CACHE/apt";
Dir::State::Lists "$CACHE/apt/lists";
Dir::Cache "$CACHE/apt";
Dir::Etc::SourceList "$CACHE/apt/sources.list";
Dir::Etc::SourceParts "$CACHE/apt/sources.list.d";
CONF
export APT_CONFIG="$CACHE/apt/apt.conf"
if [ ! -f "linux_$VER.orig.tar.xz" ]; then
    apt-get update -qq
    apt-get source --download-only "linux=$DEBVER" >/dev/null 2>&1 ||
        apt-get source --download-only linux >/dev/null
fi
if [ ! -x tools/usr/bin/flex ]; then
    [ -f apt/lists/lock ] || apt-get update -qq
    mkdir -p debs tools
    (cd debs && apt-get download flex bison m4 libelf-dev libfl2 >/dev/null)
    for d in debs/*.deb; do dpkg-deb -x "$d" tools; done
    libelf=$(ls /usr/lib/x86_64-linux-gnu/libelf.so.1 2>/dev/null || true)
    [ -n "$libelf" ] && ln -sf "$libelf" tools/usr/lib/x86_64-linux-gnu/libelf.so
fi
T=$CACHE/tools
export PATH="$T/usr/bin:$PATH" M4="$T/usr/bin/m4" BISON_PKGDATADIR="$T/usr/share/bison"
rm -rf "linux-$VER"
tar xf "linux_$VER.orig.tar.xz"
cd "linux-$VER"
patch -p1 -s < "$HERE/kernel-pvm.patch"
make -s tinyconfig
. "$HERE/kernel-config.sh"
kds_kernel_config
make -s olddefconfig
make -s -j"$(nproc)" HOSTCFLAGS="-I$T/usr/include" \
    HOSTLDFLAGS="-L$T/usr/lib/x86_64-linux-gnu" vmlinux
cp vmlinux System.map "$CACHE/"
cd "$CACHE"
rm -rf "linux-$VER"
echo "$key" > vmlinux.key
echo "$CACHE/vmlinux"
