//! The adaptive reaper thread (`kds_reaper_start`/`kds_reaper_disable`) on the
//! real kernel: it reaps while the guest runs, nothing is lost, and every
//! misuse is refused with its errno.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use kvm_dirty_shim::capi::*;

const RING: u32 = 4096;

#[test]
fn the_reaper_reaps_a_busy_guest_and_loses_nothing() {
    let vm = TestVm::new(Some(RING));
    // 6000 stores a round: more than a 4096-entry ring holds, so without
    // a reaper every round exits ring-full.
    let (mut c, mut v) = vm.guest(16384, 6000, 21);
    let cfg = KdsReaperConfig {
        high_water_pct: 25,
        min_interval_us: 100,
        max_interval_us: 20_000,
    };
    assert_eq!(
        c!(kds_reaper_enable(
            vm.vm(),
            &cfg,
            size_of::<KdsReaperConfig>()
        )),
        0,
        "{}",
        last_error()
    );
    let mut full = 0;
    for it in 1..=40 {
        vm.set_iteration(0, it);
        let r = v.run_round(vm.h);
        assert!(!r.wedged, "round {it}");
        full += r.ring_full_exits;
        let (changed, _, lost) = c.check(vm.h, 0);
        assert_eq!(lost, 0, "round {it}: lost {lost} of {changed}");
    }
    assert_eq!(c!(kds_reaper_disable(vm.vm())), 0);
    let s = vm.stats();
    assert!(s.reaper_reaps > 0, "the reaper never reaped: {s:?}");
    // The entries it harvested are part of the total, and the stop left
    // nothing running: a reap now is the test's alone.
    let before = vm.stats().reaper_reaps;
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(vm.stats().reaper_reaps, before, "reaper still running");
    assert!(c.changed > 100_000);
    eprintln!(
        "adaptive reaper: {} reaps, {full} ring-full exits in 40 rounds of 6000 stores, {s:?}",
        s.reaper_reaps
    );
}

#[test]
fn the_reaper_wakes_when_dirty_logging_starts() {
    // A reaper that has seen no rate sleeps its longest pause (10 s here);
    // turning dirty logging on must wake it, or a vCPU that starts pushing
    // at full speed fills its ring before the first check.
    let vm = TestVm::new(Some(RING));
    let (mut c, mut v) = vm.guest(16384, 2000, 7);
    vm.set_slot(1, TEST_GPA, &c.mem, 0); // logging off while the reaper starts
    let cfg = KdsReaperConfig {
        high_water_pct: 25,
        min_interval_us: 100,
        max_interval_us: 10_000_000,
    };
    let start = std::time::Instant::now();
    assert_eq!(
        c!(kds_reaper_enable(
            vm.vm(),
            &cfg,
            size_of::<KdsReaperConfig>()
        )),
        0,
        "{}",
        last_error()
    );
    vm.set_slot(1, TEST_GPA, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
    vm.set_iteration(0, 1);
    // 2000 stores, one ring entry each: over the 25 % high water mark of a
    // 4096-entry ring and below its soft-full limit, so no ring-full exit
    // whatever the reaper does (it may reap during the round).
    let r = v.run_round(vm.h);
    assert_eq!(r.ring_full_exits, 0);
    // Without the wake the first check comes 10 s after the start; with
    // it, checks follow at 0.1 ms, doubling: one falls before 9 s even on
    // a machine that took 3 s for the round.
    while vm.stats().reaper_reaps == 0 && start.elapsed() < std::time::Duration::from_secs(9) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let s = vm.stats();
    assert!(
        s.reaper_reaps > 0,
        "no reap {:?} after logging started: the reaper slept through it ({s:?})",
        start.elapsed()
    );
    assert_eq!(c!(kds_reaper_disable(vm.vm())), 0);
    let (changed, _, lost) = c.check(vm.h, 0);
    assert!(changed > 1000, "{changed}");
    assert_eq!(lost, 0);
}

#[test]
fn reaper_misuse_is_refused() {
    let vm = TestVm::new(Some(RING));
    assert_eq!(
        c!(kds_reaper_disable(vm.vm())),
        0,
        "stop without start is a no-op"
    );
    for (pct, min, max) in [(91, 0, 0), (0, 2000, 1000), (0, 0, 20_000_000)] {
        let cfg = KdsReaperConfig {
            high_water_pct: pct,
            min_interval_us: min,
            max_interval_us: max,
        };
        assert_eq!(
            c!(kds_reaper_enable(
                vm.vm(),
                &cfg,
                size_of::<KdsReaperConfig>()
            )),
            -libc::EINVAL
        );
        assert!(last_error().contains("out of range"), "{}", last_error());
    }
    assert_eq!(
        c!(kds_reaper_enable(
            vm.vm(),
            std::ptr::null(),
            size_of::<KdsReaperConfig>()
        )),
        0
    );
    assert_eq!(
        c!(kds_reaper_enable(
            vm.vm(),
            std::ptr::null(),
            size_of::<KdsReaperConfig>()
        )),
        -libc::EBUSY
    );
    assert_eq!(c!(kds_reaper_disable(vm.vm())), 0);
    assert_eq!(
        c!(kds_reaper_enable(
            vm.vm(),
            std::ptr::null(),
            size_of::<KdsReaperConfig>()
        )),
        0,
        "restart"
    );
    assert_eq!(
        c!(kds_reaper_enable(
            std::ptr::null_mut(),
            std::ptr::null(),
            size_of::<KdsReaperConfig>()
        )),
        -libc::EINVAL
    );
    assert_eq!(c!(kds_reaper_disable(std::ptr::null_mut())), -libc::EINVAL);
    // Dropping the TestVm frees the VM with the reaper running: kds_vm_free
    // stops it.

    let bitmap = TestVm::new(None);
    assert_eq!(
        c!(kds_reaper_enable(
            bitmap.vm(),
            std::ptr::null(),
            size_of::<KdsReaperConfig>()
        )),
        -libc::ENOTSUP
    );
    assert!(last_error().contains("bitmap mode"), "{}", last_error());
}

/// A reset issued while the VMM turns dirty logging on for another slot
/// (QEMU at the start of every migration, slot after slot) must not look
/// like a reset the thread was stopped in. The kernel serialises both on
/// its memslot lock: without the shim's own lock across the update, the
/// reaping thread slept in `KVM_RESET_DIRTY_RINGS` until the update was
/// done, the shim could not tell that from SIGSTOP, and it re-armed
/// logging on every slot and reported every page (measured: the first
/// sync of a 64 GiB QEMU migration took 60 and 97 ms instead of 8, in 2 of
/// 3 runs; doc/heavy.md, "Memory scale").
#[test]
fn a_reset_beside_a_memslot_update_is_not_taken_for_a_stop() {
    let vm = TestVm::new(Some(RING));
    let (mut c, mut v) = vm.guest(4096, 3000, 5);
    // 16 GiB, never touched (MAP_NORESERVE): the kernel walks the whole
    // slot each time logging goes on or off, for milliseconds.
    let big = Mem::new(16 << 30);
    let big_gpa = 1 << 32;
    vm.set_slot(7, big_gpa, &big, 0);
    let stop = AtomicBool::new(false);
    let (reaps, toggles) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|sc| {
        let (vm, stop, reaps) = (&vm, &stop, &reaps);
        sc.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = c!(kds_reap(vm.vm()));
                assert!(r >= 0, "kds_reap: {r}: {}", last_error());
                reaps.fetch_add(1, Ordering::Relaxed);
            }
        });
        let toggles = &toggles;
        let toggler = sc.spawn(move || {
            let _stop = StopOnDrop(stop);
            for _ in 0..20 {
                vm.set_slot(7, big_gpa, &big, KDS_MEM_LOG_DIRTY_PAGES);
                vm.set_slot(7, big_gpa, &big, 0);
                toggles.fetch_add(1, Ordering::Relaxed);
            }
        });
        // The vCPU dirties throughout, so that every reap has entries to
        // reset; nothing it changed may be lost.
        let _stop = StopOnDrop(stop);
        let mut it = 0;
        while it < 10 || !toggler.is_finished() {
            it += 1;
            vm.set_iteration(0, it);
            assert!(!v.run_round(vm.h).wedged, "round {it}: wedged");
            let (changed, _, lost) = c.check(vm.h, 0);
            assert_eq!(lost, 0, "round {it}: lost {lost} of {changed}");
        }
    });
    let s = vm.stats();
    let (reaps, toggles) = (
        reaps.load(Ordering::Relaxed),
        toggles.load(Ordering::Relaxed),
    );
    assert_eq!(toggles, 20);
    assert!(s.ring_resets > toggles, "too few resets to overlap: {s:?}");
    assert_eq!(
        s.resets_switched_out, 0,
        "{} of {} resets slept beside {toggles} logging toggles ({reaps} reaps): taken for a \
         stop, logging re-armed and every page reported",
        s.resets_switched_out, s.ring_resets
    );
}
