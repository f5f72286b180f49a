#!/bin/sh
# Installs kvm-dirty-shim for C VMMs: the static library, the header and
# kvm_dirty_shim.pc (pkg-config).   ./install.sh [PREFIX]   (default /usr/local)
# Then: cc vmm.c $(pkg-config --cflags --libs kvm_dirty_shim)
set -eu
prefix=${1:-/usr/local}
cd "$(dirname "$0")"
# The C library: the `capi` feature, built as a staticlib (a Rust user's
# build of the crate makes neither).
cargo rustc --quiet --locked --release --lib --features capi --crate-type staticlib
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
install -D -m 644 target/release/libkvm_dirty_shim.a "$prefix/lib/libkvm_dirty_shim.a"
install -D -m 644 include/kvm_dirty_shim.h "$prefix/include/kvm_dirty_shim.h"
mkdir -p "$prefix/lib/pkgconfig"
cat > "$prefix/lib/pkgconfig/kvm_dirty_shim.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: kvm_dirty_shim
Description: KVM dirty-page tracking (dirty ring, backup bitmap) for VMMs
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lkvm_dirty_shim -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
PC
echo "installed kvm-dirty-shim $version to $prefix (pkg-config: kvm_dirty_shim)"
