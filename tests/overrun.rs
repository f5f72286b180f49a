//! A marked entry overwritten before `KVM_RESET_DIRTY_RINGS` (what this
//! kernel's overruns do): the reset stops at it, and the page our entry
//! named is gone from the ring, so the kernel would never re-protect it.
//! The shim must see it in the ring after the reset, report every page,
//! re-arm dirty logging, and then track exactly again. The test plays the
//! overrun from the logger callback, which the shim calls between its
//! harvest and the reset (an entry naming an unknown slot makes it log).
//! (Its own test binary: the logger is process-wide.)

mod common;

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use common::*;
use kvm_dirty_shim::capi::*;

const RING: u32 = 4096;

/// The test's own mapping of the ring (0: the rogue does nothing).
static RING_PTR: AtomicUsize = AtomicUsize::new(0);
/// The entry the overrun writes over: the first one of the rogue's reap.
static AT: AtomicU32 = AtomicU32::new(0);
/// The shim logged a re-arm of dirty logging.
static REARMED: AtomicBool = AtomicBool::new(false);

fn flags(i: u32) -> &'static AtomicU32 {
    let base = RING_PTR.load(Ordering::Relaxed) as *mut u8;
    // SAFETY: the test's mapping of a RING-entry ring, alive for the test;
    // flags is the first u32 of each 16-byte entry.
    unsafe { AtomicU32::from_ptr(base.add(((i & (RING - 1)) * 16) as usize) as *mut u32) }
}

extern "C" fn rogue(_level: i32, msg: *const libc::c_char, _: *mut libc::c_void) {
    // SAFETY: a NUL-terminated string valid during the call.
    let m = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    if m.contains("re-armed") {
        REARMED.store(true, Ordering::Relaxed);
    }
    if m.contains("unknown slot") && RING_PTR.load(Ordering::Relaxed) != 0 {
        // The kernel's push over an entry the shim harvested and marked
        // RESET: flags DIRTY again (its slot and offset are left as they
        // were, so the later hand-back re-protects a real page).
        flags(AT.load(Ordering::Relaxed)).store(1, Ordering::Release);
        RING_PTR.store(0, Ordering::Relaxed);
    }
}

#[test]
fn an_entry_overwritten_before_the_reset_reports_every_page_and_rearms_logging() {
    assert_eq!(c!(kds_logger_set(Some(rogue), std::ptr::null_mut(), 2)), 0);
    let vm = TestVm::new(Some(RING));
    let (mut c, mut v) = vm.guest(64, 40, 5);
    let ring = map_ring(&v.fd, RING);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    assert_eq!(c.check(vm.h, 0).2, 0, "lost before the overrun");
    vm.set_iteration(0, 2);
    v.run_round(vm.h);
    // The round's entries start where the shim's harvest stands; the last
    // one is made to name a slot that does not exist, so that the harvest
    // logs (and the rogue runs) before the reset.
    let start = vcpu_stats(vm.h, 0).entries_reaped as u32;
    let pushed = (0..RING)
        .take_while(|&j| {
            let e = ((start.wrapping_add(j) & (RING - 1)) * 16) as usize;
            // SAFETY: in bounds of the test's ring mapping.
            unsafe { AtomicU32::from_ptr(ring.ptr.add(e) as *mut u32) }.load(Ordering::Acquire) & 1
                != 0
        })
        .count() as u32;
    assert!(pushed > 1, "the round pushed {pushed} entries");
    write_ring_entry(&ring, RING, start + pushed - 1, 99, 0);
    AT.store(start, Ordering::Relaxed);
    RING_PTR.store(ring.ptr as usize, Ordering::Relaxed);
    let before = vm.stats();
    let (changed, reported, lost) = c.check(vm.h, 0);
    let s = vm.stats();
    assert_eq!(RING_PTR.load(Ordering::Relaxed), 0, "the rogue ran");
    assert_eq!(lost, 0, "changed {changed}, reported {reported}");
    assert_eq!(reported, c.pages(), "every page reported after the overrun");
    assert!(REARMED.load(Ordering::Relaxed), "dirty logging re-armed");
    assert!(
        s.reset_shortfall > before.reset_shortfall,
        "the reset stopped at the overwritten entry: {s:?}"
    );
    // The shim hands the overwritten entry back at the next reap and
    // tracks exactly from then on: no loss, no more full reports.
    let mut normal = 0;
    for it in 3..10 {
        vm.set_iteration(0, it);
        assert!(!v.run_round(vm.h).wedged);
        let (changed, reported, lost) = c.check(vm.h, 0);
        assert_eq!(
            lost, 0,
            "round {it}: changed {changed}, reported {reported}"
        );
        if reported < c.pages() {
            normal += 1;
        }
    }
    let after = vm.stats();
    assert!(
        normal >= 5,
        "only {normal} of 7 rounds tracked exactly: {after:?}"
    );
    assert_eq!(after.invalid_entries, 1, "{after:?}");
    assert_eq!(
        after.entries_reset, after.entries_reaped,
        "the kernel caught up with every entry harvested: {after:?}"
    );
    eprintln!("{after:?}");
}
