//! Bitmap mode (no dirty ring) on the real kernel: `KVM_GET_DIRTY_LOG`,
//! with and without `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`; loss must be 0.

mod common;

use common::*;
use kvm_dirty_shim::capi::*;

fn bitmap_rounds(manual: bool) {
    let vm = TestVm::new_with(None, |h| {
        assert_eq!(c!(kds_manual_protect_set(h, manual)), 0, "{}", last_error());
    });
    assert_eq!(c!(kds_vm_mode(vm.vm())), KdsMode::KDS_MODE_BITMAP as i32);
    let pages = 4096;
    let (mut c, mut v) = vm.guest(pages, 2000, 21);
    for it in 1..=20 {
        vm.set_iteration(0, it);
        let r = v.run_round(vm.h);
        assert_eq!(r.ring_full_exits, 0);
        let (changed, reported, lost) = c.check(vm.h, 0);
        assert_eq!(lost, 0, "round {it}: {lost} of {changed} lost");
        // Every page written this round changed (it now holds the new
        // iteration number), and the kernel logged exactly those: no more
        // (a page never re-protected would be reported again and again).
        assert_eq!(reported, changed, "round {it}");
    }
    assert!(c.changed > 20_000);
    let s = vm.stats();
    assert_eq!(s.bitmap_syncs, 20);
    assert!(s.pages_from_bitmap >= c.changed);
    assert_eq!(s.entries_reaped, 0);
    assert_eq!(c!(kds_reap(vm.vm())), 0, "reap is a no-op in bitmap mode");
}

#[test]
fn bitmap_mode_with_manual_protect() {
    bitmap_rounds(true);
}

#[test]
fn bitmap_mode_without_manual_protect() {
    bitmap_rounds(false);
}

#[test]
fn manual_protect_choice_comes_before_memslots() {
    let vm = TestVm::new(None);
    assert_eq!(c!(kds_manual_protect_set(vm.vm(), false)), -libc::EBUSY);
    assert!(last_error().contains("before the first memslot"));
}

#[test]
fn final_sync_in_ring_mode_without_backup_bitmap_is_plain() {
    // KDS_SYNC_FINAL in KDS_MODE_RING (no backup bitmap here) must not call
    // KVM_GET_DIRTY_LOG (the kernel answers -ENXIO on a ring-only VM).
    let vm = TestVm::new(Some(4096));
    let pages = 256;
    let (mut c, mut v) = vm.guest(pages, 100, 1);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    let (changed, _, lost) = c.check(vm.h, KDS_SYNC_FINAL);
    assert!(changed > 50);
    assert_eq!(lost, 0);
    assert_eq!(vm.stats().bitmap_syncs, 0);
}
