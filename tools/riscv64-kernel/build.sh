#!/bin/sh
# Builds a riscv64 Linux kernel from Debian's orig source tarball for the
# emulated riscv64 host of tests/kvm-host, for a release Debian ships no
# riscv64 binary of: by default 7.1.8, the last release whose stage-2 fault
# handler decides logging by memslot->dirty_bitmap (doc/design.md,
# "riscv64"). A small configuration (tinyconfig, plus what the host test
# needs: SMP, the virt board's serial and SBI console, initramfs, devtmpfs,
# debugfs, hugetlbfs, THP, KVM built in). Installs the image where
# tests/kvm-host/run looks for it:
#
#     tools/riscv64-kernel/build.sh [VERSION]      # about 10 minutes on 2 CPUs
#     KDS_RISCV64_KERNELS=7.1.8 tests/kvm-host/run riscv64
#
# Needs riscv64-linux-gnu-gcc (tests/kvm-host/setup.sh riscv64), flex,
# bison and bc. Run by hand, not in CI.
set -eu
version=${1:-7.1.8}
work=${KDS_KERNEL_WORK:-$HOME/.cache/kds-riscv64-kernel}
cache=${KDS_ARM64_CACHE:-$HOME/.cache/kvm-dirty-shim-arm64}
mkdir -p "$work" "$cache"
cd "$work"
tarball=linux_$version.orig.tar.xz
[ -s "$tarball" ] || curl -sSf -o "$tarball" "http://deb.debian.org/debian/pool/main/l/linux/$tarball"
rm -rf "linux-$version"
tar -xJf "$tarball"
cd "linux-$version"
export ARCH=riscv CROSS_COMPILE=riscv64-linux-gnu-
make -s tinyconfig
for o in 64BIT SMP MMU NONPORTABLE ARCH_VIRT FPU RISCV_ISA_C TTY PRINTK \
    SERIAL_8250 SERIAL_8250_CONSOLE SERIAL_OF_PLATFORM SERIAL_EARLYCON HVC_RISCV_SBI \
    BLK_DEV_INITRD DEVTMPFS PROC_FS PROC_SYSCTL SYSCTL SYSFS DEBUG_FS \
    HUGETLBFS HUGETLB_PAGE TRANSPARENT_HUGEPAGE VIRTUALIZATION KVM BINFMT_ELF \
    FUTEX POSIX_TIMERS HIGH_RES_TIMERS RISCV_SBI RISCV_INTC SIFIVE_PLIC RISCV_TIMER \
    MULTIUSER EPOLL SIGNALFD TIMERFD EVENTFD SHMEM MEMBARRIER RSEQ ADVISE_SYSCALLS; do
    scripts/config --enable "$o"
done
scripts/config --set-val NR_CPUS 8
make -s olddefconfig
grep -q '^CONFIG_KVM=y' .config && grep -q '^CONFIG_HAVE_KVM_DIRTY_RING_ACQ_REL=y' .config ||
    { echo "no KVM with the dirty ring in this configuration" >&2; exit 1; }
make -s -j"$(nproc)" Image
cp arch/riscv/boot/Image "$cache/riscv64-vmlinuz-$version"
rm -f "$cache/riscv64-vmlinuz-$version.kvm.ko" # KVM is built in
echo "linux $version (Debian's orig source, built by tools/riscv64-kernel/build.sh)" \
    > "$cache/riscv64-vmlinuz-$version.pkg"
echo "$cache/riscv64-vmlinuz-$version"
