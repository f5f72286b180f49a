//! The kernel contract the shim relies on, specified against the real
//! kernel with raw ioctls (kvm-ioctls and the ring mapping; no shim):
//! - the soft-full exit: a vCPU exits with `KVM_EXIT_DIRTY_RING_FULL` once
//!   its ring holds `size - KVM_DIRTY_RING_RSVD_ENTRIES` entries
//!   (`kvm_dirty_ring_soft_full()`), never earlier, and the entries it
//!   pushed are contiguous from index 0 with `KVM_DIRTY_GFN_F_DIRTY` set
//!   (`kvm_dirty_ring_push()`); a kernel that overruns fills the whole ring
//!   first;
//! - reset semantics: `KVM_RESET_DIRTY_RINGS` walks each ring from its
//!   reset index while entries carry `KVM_DIRTY_GFN_F_RESET`
//!   (`kvm_dirty_ring_reset()`), clears their flags to 0, stops at the first
//!   entry without it, and returns the number of entries reset;
//! - what a vCPU that is run again without a reset does: either the exit is
//!   sticky (no new entry), or the kernel overruns the ring (this project's
//!   x86 host does; README "When the kernel overruns a ring"). Either way
//!   the ring never holds more than `size` entries, so a ring found with
//!   every entry dirty is how an overrun shows.
//!
//! A test that does not apply (no ring on this kernel) prints why and
//! returns.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use kvm_bindings::{KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, kvm_enable_cap};
use kvm_dirty_shim::capi::KDS_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const RING: u32 = 4096;
const PAGES: u64 = 16384;
const F_DIRTY: u32 = 1;
const F_RESET: u32 = 2;

struct Setup {
    vm: VmFd,
    vcpu: VcpuFd,
    ring: Mem,
    _code: Mem,
    _mem: Mem,
}

/// A VM with a `RING`-entry dirty ring, the code slot, a dirty-logged test
/// slot, and vCPU 0 set to store 8000 times a round to its pages. None
/// (with the reason printed) where the kernel has no ring.
fn setup() -> Option<Setup> {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let cap = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find(|&c| vm.check_extension_raw(u64::from(c)) > 0);
    let Some(cap) = cap else {
        eprintln!("skipped: this kernel has no dirty ring");
        return None;
    };
    let mut ec = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    ec.args[0] = u64::from(RING) * 16;
    vm.enable_cap(&ec).expect("KVM_ENABLE_CAP(dirty ring)");
    let code = Mem::new((CODE_PAGES * PAGE) as usize);
    // SAFETY: in bounds of the fresh mapping.
    unsafe { std::ptr::copy_nonoverlapping(GUEST.as_ptr(), code.ptr, GUEST.len()) };
    let region = |slot, flags, gpa, m: &Mem| kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: m.len as u64,
        userspace_addr: m.addr(),
    };
    raw_memslot(&vm, region(0, 0, 0, &code));
    let mem = Mem::new((PAGES * PAGE) as usize);
    raw_memslot(&vm, region(1, KDS_MEM_LOG_DIRTY_PAGES, TEST_GPA, &mem));
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mailbox = PAGE;
    setup_regs(&vcpu, mailbox, PAGE * CODE_PAGES);
    code.write_u32(mailbox, 1);
    code.write_u32(mailbox + 4, 8000);
    code.write_u32(mailbox + 8, 5);
    code.write_u32(mailbox + 12, (PAGES - 1) as u32);
    code.write_u32(mailbox + 16, TEST_GPA as u32);
    code.write_u32(mailbox + 20, 12);
    let ring = map_ring(&vcpu, RING);
    Some(Setup {
        vm,
        vcpu,
        ring,
        _code: code,
        _mem: mem,
    })
}

fn flags(ring: &Mem, i: u32) -> &AtomicU32 {
    let e = (i & (RING - 1)) as usize * 16;
    // SAFETY: in bounds of the ring mapping, 4-byte aligned; the kernel
    // writes it concurrently only through atomic accesses of its own
    // (smp_store_release in kvm_dirty_gfn_set_dirtied).
    unsafe { AtomicU32::from_ptr(ring.ptr.add(e).cast()) }
}

/// Entries from index 0 whose flags say DIRTY, up to the first that does not.
fn dirty_run(ring: &Mem) -> u32 {
    (0..RING)
        .take_while(|&i| flags(ring, i).load(Ordering::Acquire) & F_DIRTY != 0)
        .count() as u32
}

/// Runs the vCPU until its first exit, which must be ring-full: the round
/// (8000 stores on 16384 pages) dirties more pages than the ring holds.
fn run_to_ring_full(s: &mut Setup) {
    match s.vcpu.run().expect("KVM_RUN") {
        VcpuExit::Unsupported(r) if r == EXIT_DIRTY_RING_FULL => {}
        VcpuExit::IoOut(0x10, _) => panic!("the round ended before the ring filled"),
        other => panic!("unexpected exit {other:?}"),
    }
}

fn reset_rings(vm: &VmFd) -> i32 {
    // SAFETY: KVM_RESET_DIRTY_RINGS (_IO(KVMIO, 0xc7)) takes no argument.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(vm), 0xAEC7) };
    assert!(
        r >= 0,
        "KVM_RESET_DIRTY_RINGS: {}",
        std::io::Error::last_os_error()
    );
    r
}

#[test]
fn the_soft_full_exit_comes_before_the_ring_is_full() {
    let Some(mut s) = setup() else { return };
    run_to_ring_full(&mut s);
    let n = dirty_run(&s.ring);
    eprintln!("first ring-full exit with {n} of {RING} entries dirty");
    // The soft limit is size minus KVM_DIRTY_RING_RSVD_ENTRIES (64, plus the
    // CPU's own dirty-log buffer on x86: 512 PML entries at most). The
    // kernel checks it on guest entry, so a vCPU may push past it before it
    // exits (measured here: 4058 and 4088 of 4096 with a 4032 soft limit);
    // A correct kernel exits before the ring is full. This project's x86
    // host sometimes does not (measured: 4096 of 4096 at the first exit in
    // 1 of 4 runs): the overrun the shim detects as a ring found full and
    // answers by reporting every page (README "When the kernel overruns a
    // ring"). Both are allowed here; an early exit is not.
    assert!(n >= RING - 64 - 512, "exited early: {n} of {RING}");
    if n < RING {
        // Nothing is published past the run: the entry after it is clean.
        assert_eq!(flags(&s.ring, n).load(Ordering::Acquire) & F_DIRTY, 0);
    } else {
        eprintln!("the kernel overran the ring before its first ring-full exit");
    }
}

#[test]
fn reset_walks_reset_flags_clears_them_and_returns_the_count() {
    let Some(mut s) = setup() else { return };
    run_to_ring_full(&mut s);
    let n = dirty_run(&s.ring);
    if n == RING {
        // An overrun (see above) may have pushed more than the ring holds:
        // the walk's end is then the kernel's, not this test's.
        eprintln!("skipped: the kernel overran the ring before its first exit");
        return;
    }
    let half = n / 2;
    // Nothing harvested yet: a reset finds no RESET flag and resets 0.
    assert_eq!(reset_rings(&s.vm), 0);
    for i in 0..half {
        flags(&s.ring, i).store(F_RESET, Ordering::Release);
    }
    assert_eq!(reset_rings(&s.vm), half as i32, "the first half");
    for i in 0..half {
        assert_eq!(
            flags(&s.ring, i).load(Ordering::Acquire),
            0,
            "entry {i} not cleared"
        );
    }
    assert_eq!(
        flags(&s.ring, half).load(Ordering::Acquire) & F_DIRTY,
        F_DIRTY,
        "the walk went past the first entry without RESET"
    );
    for i in half..n {
        flags(&s.ring, i).store(F_RESET, Ordering::Release);
    }
    assert_eq!(reset_rings(&s.vm), (n - half) as i32, "the rest");
    assert_eq!(dirty_run(&s.ring), 0);
}

#[test]
fn running_on_without_a_reset_is_sticky_or_overruns_but_never_exceeds_the_ring() {
    let Some(mut s) = setup() else { return };
    run_to_ring_full(&mut s);
    let first = dirty_run(&s.ring);
    let mut last = first;
    let mut exits = 1;
    for _ in 0..50 {
        match s.vcpu.run().expect("KVM_RUN") {
            VcpuExit::Unsupported(r) if r == EXIT_DIRTY_RING_FULL => exits += 1,
            VcpuExit::IoOut(0x10, _) => break,
            other => panic!("unexpected exit {other:?}"),
        }
        let now = (0..RING)
            .filter(|&i| flags(&s.ring, i).load(Ordering::Acquire) & F_DIRTY != 0)
            .count() as u32;
        assert!(now >= last, "entries disappeared without a reset");
        last = now;
    }
    let kind = if last == first {
        "sticky: no entry pushed after the soft-full exit"
    } else if last == RING {
        "overrun: the kernel filled the whole ring (entries may have been dropped)"
    } else {
        "overrun: the kernel pushed past the soft limit"
    };
    eprintln!(
        "{exits} ring-full exits without a reset: {first} -> {last} of {RING} entries; {kind}"
    );
    assert!(last <= RING);
}
