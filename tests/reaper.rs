//! The adaptive reaper thread (`kds_reaper_start`/`kds_reaper_disable`) on the
//! real kernel: it reaps while the guest runs, nothing is lost, and every
//! misuse is refused with its errno.

mod common;

use common::*;
use kvm_dirty_shim::*;

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
        kds_reaper_enable(vm.vm(), &cfg, size_of::<KdsReaperConfig>()),
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
    assert_eq!(kds_reaper_disable(vm.vm()), 0);
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
fn reaper_misuse_is_refused() {
    let vm = TestVm::new(Some(RING));
    assert_eq!(
        kds_reaper_disable(vm.vm()),
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
            kds_reaper_enable(vm.vm(), &cfg, size_of::<KdsReaperConfig>()),
            -libc::EINVAL
        );
        assert!(last_error().contains("out of range"), "{}", last_error());
    }
    assert_eq!(
        kds_reaper_enable(vm.vm(), std::ptr::null(), size_of::<KdsReaperConfig>()),
        0
    );
    assert_eq!(
        kds_reaper_enable(vm.vm(), std::ptr::null(), size_of::<KdsReaperConfig>()),
        -libc::EBUSY
    );
    assert_eq!(kds_reaper_disable(vm.vm()), 0);
    assert_eq!(
        kds_reaper_enable(vm.vm(), std::ptr::null(), size_of::<KdsReaperConfig>()),
        0,
        "restart"
    );
    assert_eq!(
        kds_reaper_enable(
            std::ptr::null_mut(),
            std::ptr::null(),
            size_of::<KdsReaperConfig>()
        ),
        -libc::EINVAL
    );
    assert_eq!(kds_reaper_disable(std::ptr::null_mut()), -libc::EINVAL);
    // Dropping the TestVm frees the VM with the reaper running: kds_vm_free
    // stops it.

    let bitmap = TestVm::new(None);
    assert_eq!(
        kds_reaper_enable(bitmap.vm(), std::ptr::null(), size_of::<KdsReaperConfig>()),
        -libc::ENOTSUP
    );
    assert!(last_error().contains("bitmap mode"), "{}", last_error());
}
