//! The kernel's `KVM_RESET_DIRTY_RINGS` count lower than what the shim
//! marked RESET (QEMU asserts on this): counted in `reset_shortfall`,
//! never an abort, and the ring keeps working. The test plays a rogue
//! second reaper: from the logger callback, which the shim calls while it
//! holds harvested entries not yet reset, it takes one entry back.
//! (Its own test binary: the logger is process-wide.)

mod common;

use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use common::*;
use kvm_dirty_shim::capi::*;

const RING: u32 = 4096;

/// The test's own mapping of the ring (0: the rogue sleeps).
static RING_PTR: AtomicUsize = AtomicUsize::new(0);
/// The first entry the shim harvests in the rogue's reap.
static AT: AtomicU32 = AtomicU32::new(0);

fn flags(i: u32) -> &'static AtomicU32 {
    let base = RING_PTR.load(Ordering::Relaxed) as *mut u8;
    // SAFETY: the test's mapping of a RING-entry ring, alive for the test;
    // flags is the first u32 of each 16-byte entry.
    unsafe { AtomicU32::from_ptr(base.add(((i & (RING - 1)) * 16) as usize) as *mut u32) }
}

extern "C" fn rogue(_level: i32, msg: *const libc::c_char, _: *mut libc::c_void) {
    // SAFETY: a NUL-terminated string valid during the call.
    let m = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    if m.contains("unknown slot") && RING_PTR.load(Ordering::Relaxed) != 0 {
        // That entry is harvested and marked RESET; clearing it stops the
        // kernel's reset right there.
        flags(AT.load(Ordering::Relaxed)).store(0, Ordering::Release);
    }
}

#[test]
fn a_reset_that_counts_less_is_counted_not_fatal() {
    assert_eq!(c!(kds_logger_set(Some(rogue), std::ptr::null_mut(), 2)), 0);
    let vm = TestVm::new(Some(RING));
    let (mut c, mut v) = vm.guest(64, 40, 5);
    let ring = map_ring(&v.fd, RING);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    let pushed = c.check(vm.h, 0).0; // drains, so nothing is lost below
    // The pages' slot goes behind the shim's back: deleted and created
    // again straight in the kernel, so that the shim does not know it
    // (a delete through the shim would harvest its entries). The harvest
    // finds the entries naming an unknown slot and says so before the
    // reset.
    let del = KdsMemslot {
        slot: 1,
        ..KdsMemslot::default()
    };
    assert_eq!(
        c!(kds_memslot_update(vm.vm(), &del, size_of::<KdsMemslot>())),
        0
    );
    raw_memslot(
        &vm.kvm_vm,
        kvm_bindings::kvm_userspace_memory_region {
            slot: 1,
            flags: KDS_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: TEST_GPA,
            memory_size: c.mem.len as u64,
            userspace_addr: c.mem.addr(),
        },
    );
    vm.set_iteration(0, 2);
    v.run_round(vm.h);
    AT.store(vcpu_stats(vm.h, 0).entries_reaped as u32, Ordering::Relaxed);
    RING_PTR.store(ring.ptr as usize, Ordering::Relaxed);
    let before = vm.stats();
    let n = c!(kds_reap(vm.vm()));
    assert!(n > 0, "{n}: {}", last_error());
    let s = vm.stats();
    assert_eq!(s.invalid_entries - before.invalid_entries, n as u64);
    assert!(
        s.reset_shortfall > 0 && s.reset_shortfall <= n as u64,
        "marked {n}, {s:?}"
    );
    // Give the entry back (RESET): the next reset walks over the backlog,
    // and the vCPU keeps running.
    flags(AT.load(Ordering::Relaxed)).store(2, Ordering::Release);
    RING_PTR.store(0, Ordering::Relaxed);
    // The shim learns the slot again (a flags-only update in the kernel).
    vm.set_slot(1, TEST_GPA, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
    for it in 3..6 {
        vm.set_iteration(0, it);
        assert!(!v.run_round(vm.h).wedged);
        assert!(c!(kds_reap(vm.vm())) >= 0, "{}", last_error());
    }
    let after = vm.stats();
    assert_eq!(after.reset_shortfall, s.reset_shortfall, "no new shortfall");
    assert_eq!(
        after.entries_reset, after.entries_reaped,
        "the kernel caught up with every entry marked: {after:?}"
    );
    eprintln!("pushed {pushed} + {n}; {after:?}");
}
