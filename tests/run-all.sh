#!/bin/sh
# Every test of kvm-dirty-shim, as CI runs it (README: "Run every test").
# Needs /dev/kvm (read-write) and a Rust toolchain; nothing else.
set -eu
cd "$(dirname "$0")/.."

echo "== format and lints"
cargo fmt --check
cargo clippy --all-targets -- -D warnings

echo "== cargo test (real /dev/kvm; the checked-in header must match the code)"
# KDS_HEADER_CHECK=1: build.rs leaves include/ alone, so tests/header.rs
# fails on a stale header instead of the build silently refreshing it.
KDS_HEADER_CHECK=1 timeout 1200 cargo test --release

echo "== demo (1 s per mode; exits non-zero on any lost page)"
timeout 300 cargo run --release --example demo 1 > target/demo.out
tail -n 3 target/demo.out

echo "== C tests (meson): plain, then AddressSanitizer + UndefinedBehaviorSanitizer"
build=target/meson
rm -rf "$build"
meson setup "$build/plain" c-tests >/dev/null
meson test -C "$build/plain" --print-errorlogs
meson setup "$build/asan" c-tests -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
meson test -C "$build/asan" --print-errorlogs
grep -E "^(ring|bitmap|reaper)" "$build/plain/meson-logs/testlog.txt" || true

echo "== the native libraries the snippet, c-tests and kvm_dirty_shim.pc link match rustc's"
want=$(cargo rustc --quiet --release --lib --crate-type staticlib -- --print native-static-libs 2>&1 |
       sed -n 's/.*native-static-libs: //p' | head -n 1)
for f in meson-snippet/meson.build c-tests/meson.build install.sh; do
    for lib in $want; do
        grep -q -- "$lib" "$f" || { echo "$f lacks $lib (rustc wants: $want)" >&2; exit 1; }
    done
done
echo "native-static-libs: $want"

echo "== meson snippet, consumed as a QEMU tree would"
c-tests/snippet-consumer/run.sh

echo "== pkg-config install, and the example C VMM built only with pkg-config"
prefix=$(pwd)/target/prefix
rm -rf "$prefix"
./install.sh "$prefix"
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" sh -c \
    'cc -std=gnu11 -Wall -Wextra -Werror -o target/c-vmm examples/c-vmm/vmm.c \
        $(pkg-config --cflags --libs kvm_dirty_shim) -lpthread'
timeout 120 target/c-vmm guest/guest.bin 1 | tail -n 1
echo "== arm64: the ITS path and the ring on an emulated arm64 KVM host (6.12 and 6.1)"
tests/arm64/run

echo "== QEMU 10.0.2 patched to use the shim: QEMU's own migration tests, beside stock QEMU"
meson-snippet/qemu/build-and-test

echo "== all tests passed"
