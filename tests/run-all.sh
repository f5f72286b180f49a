#!/bin/sh
# The full tier: every test of kvm-dirty-shim, as CI runs it (README,
# "Test"; .ci/run installs what it needs first, then runs this).
#
# Needs, beyond the quick tier's (tests/quick.sh): the toolchain of
# Cargo.toml's rust-version; a nightly toolchain with Miri and cargo-fuzz;
# rustup's riscv64gc target; valgrind; pkg-config; root for apt (Debian's
# arm64 and riscv64 kernels and emulators, QEMU's build dependencies, its
# source package and the :arm64 libraries the arm64 QEMU cross build links); about 5 GB of disk (measured:
# ~/.cache/kds-qemu 2.1 GB, cargo's target/ 2.5 GB, the rest 0.4 GB).
#
# Time on this project's 2-core CI machine: about 50 minutes on a machine
# that has built nothing (measured 48.3 min from a fresh clone with empty
# caches, four QEMU builds included; doc/testing.md), about 30 with warm
# caches. Each step's time is printed at the end.
set -eu
cd "$(dirname "$0")/.."

# Each step's time, printed at the end (also when a step fails).
t_start=$(date +%s) t_last=$t_start step_name="quick tier (tests/quick.sh)" step_times=""
step() { # $1: the next step's name
    t_now=$(date +%s)
    step_times="$step_times$(printf '%6d s  %s' $((t_now - t_last)) "$step_name")
"
    t_last=$t_now step_name=$1
    echo "== $1"
}
step_report() {
    step "(end)" > /dev/null
    printf '== time per step\n%s%6d s  in all\n' "$step_times" $(($(date +%s) - t_start))
}
trap step_report EXIT

tests/quick.sh

step "MSRV: the crate, its tests and examples build with Cargo.toml's rust-version"
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
cargo "+$msrv" check --quiet --all-features --all-targets --target-dir target/msrv
echo "rustc $msrv: ok"

step "Miri: the bitmap, the ring against a thread playing the kernel, the ordering rules, the sized structs"
timeout 1800 cargo +nightly miri test --lib --features capi

step "demo (1 s per mode; exits non-zero on any lost page)"
timeout 300 cargo run --release --features capi --example demo 1 > target/demo.out
tail -n 3 target/demo.out

step "the example Rust VMM (kvm-ioctls, vm-memory and the Rust API only, no unsafe, every thread under a seccomp allow-list; 2 unpaced vCPUs; exits non-zero on any lost page)"
timeout 300 cargo run --release --features vm-memory --example rust_vmm 10 > target/rust_vmm.out
tail -n 3 target/rust_vmm.out

step "a Rust user's build: no cbindgen, no staticlib; the C library's: no cbindgen; the crate packages and builds as published"
if cargo tree -e build,normal --prefix none | grep -q "^cbindgen "; then
    echo "a Rust-only build compiles cbindgen" >&2; exit 1
fi
if cargo tree -e build,normal --features capi --prefix none | grep -q "^cbindgen "; then
    echo "the C library's build (feature capi) compiles cbindgen" >&2; exit 1
fi
cargo tree -e build --all-features --prefix none | grep -q "^cbindgen " ||
    { echo "the header feature lost cbindgen" >&2; exit 1; }
rm -rf target/rust-only && cargo build --quiet --release --lib --target-dir target/rust-only
if find target/rust-only -name 'libkvm_dirty_shim.a' | grep -q .; then
    echo "a Rust-only build produced the staticlib" >&2; exit 1
fi
cargo package --list --allow-dirty > target/package.list
cat target/package.list | tr '\n' ' '; echo
timeout 900 cargo publish --dry-run --allow-dirty 2>&1 | tail -n 3

step "C tests (meson) under AddressSanitizer + UndefinedBehaviorSanitizer (plain: quick tier)"
build=target/meson
rm -rf "$build/asan" "$build/tsan"
meson setup "$build/asan" c-tests -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
meson test -C "$build/asan" --print-errorlogs
grep -E "^(ring|bitmap|reaper)" "$build/plain/meson-logs/testlog.txt" || true
# ThreadSanitizer sees the C side only (the Rust library is not
# instrumented); setarch -R: gcc 12's TSan wants the classic address layout.
meson setup "$build/tsan" c-tests -Db_sanitize=thread -Db_lundef=false >/dev/null
TSAN_OPTIONS=halt_on_error=1 setarch "$(uname -m)" -R meson test -C "$build/tsan" --print-errorlogs tracking abi

step "the native libraries the snippet, c-tests and kvm_dirty_shim.pc link match rustc's"
want=$(cargo rustc --quiet --release --lib --features capi --crate-type staticlib -- --print native-static-libs 2>&1 |
       sed -n 's/.*native-static-libs: //p' | head -n 1)
for f in meson-snippet/meson.build c-tests/meson.build install.sh; do
    for lib in $want; do
        grep -q -- "$lib" "$f" || { echo "$f lacks $lib (rustc wants: $want)" >&2; exit 1; }
    done
done
echo "native-static-libs: $want"

step "meson snippet, consumed as a QEMU tree would"
c-tests/snippet-consumer/run.sh

step "pkg-config install, and the example C VMM built only with pkg-config"
prefix=$(pwd)/target/prefix
rm -rf "$prefix"
./install.sh "$prefix"
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" sh -c \
    'cc -std=gnu11 -Wall -Wextra -Werror -o target/c-vmm examples/c-vmm/vmm.c \
        $(pkg-config --cflags --libs kvm_dirty_shim) -lpthread'
timeout 120 target/c-vmm guest/guest.bin 1 | tail -n 1
step "valgrind memcheck on the C VMM: zero errors, nothing definitely lost"
if ! timeout 600 valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
        target/c-vmm guest/guest.bin 1 > target/valgrind.log 2>&1; then
    tail -n 40 target/valgrind.log
    exit 1
fi
# (valgrind notes KVM_RESET_DIRTY_RINGS, 0xaec7, as an ioctl it does not know.)
grep -v "^==" target/valgrind.log | tail -n 1

step "fuzz: 60 s of libFuzzer on the C ABI over real KVM (seeds: fuzz/corpus/calls)"
rm -rf target/fuzz-corpus && mkdir -p target/fuzz-corpus
if ! (cd fuzz && timeout 900 cargo +nightly fuzz run calls ../target/fuzz-corpus corpus/calls -- \
        -max_total_time=60 -print_final_stats=1) > target/fuzz.log 2>&1; then
    tail -n 60 target/fuzz.log
    exit 1
fi
grep -E "^stat::(number_of_executed_units|new_units_added)|^Done" target/fuzz.log

step "arm64: the ITS path, the ring, huge pages and the reset under signals on an emulated arm64 KVM host (7.2, 6.12 and 6.1)"
tests/kvm-host/run arm64

step "riscv64: the ring (ACQ_REL, no backup bitmap), huge pages and the reset under signals on an emulated riscv64 KVM host (7.2 and 6.12)"
tests/kvm-host/run riscv64

step "QEMU 10.2.2 for x86_64, patched to use the shim and stock: the builds"
KDS_QEMU_PHASE=build meson-snippet/qemu/build-and-test

# The arm64 cross builds (patched, hook-less, stock) run beside QEMU's x86
# qtests, which leave about a core idle, at the lowest priority; the
# RAM-compare migrations after them wait until the builds are done
# (measured: beside the builds, the guest's stores during a migration ran
# at half their rate, or less).
mkdir -p target
rm -f target/arm64-qemu-build.rc
(KDS_ARM64_QEMU_PHASE=build nice -n 19 tests/arm64-qemu/run > target/arm64-qemu-build.log 2>&1
 echo $? > target/arm64-qemu-build.rc.tmp; mv target/arm64-qemu-build.rc.tmp target/arm64-qemu-build.rc) &
arm64_build=$!

step "QEMU 10.2.2 patched to use the shim: QEMU's own migration tests, beside stock QEMU 10.2.2"
KDS_QEMU_PHASE=test KDS_QEMU_QUIET_FILE="$PWD/target/arm64-qemu-build.rc" meson-snippet/qemu/build-and-test

step "the arm64 QEMU cross builds (beside the x86 qtests)"
wait "$arm64_build" || true
grep -E "^== |^\(|builds:" target/arm64-qemu-build.log || true
[ "$(cat target/arm64-qemu-build.rc 2>/dev/null)" = 0 ] ||
    { tail -n 40 target/arm64-qemu-build.log; echo "FAIL: the arm64 QEMU builds" >&2; exit 1; }

step "the patched QEMU on arm64: live migration with an in-kernel ITS, in an emulated arm64 KVM host"
KDS_ARM64_QEMU_PHASE=run tests/arm64-qemu/run

trap - EXIT
step_report
echo "== all tests passed"
