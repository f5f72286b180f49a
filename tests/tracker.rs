//! The Rust API (`DirtyTracker`) on the real kernel: the ordering rules are
//! the C ABI's, and dropping a tracker with its reaper running stops the
//! reaper thread; dropping its vCPU handles too gives back every ring
//! mapping and its VM fd.

mod common;

use common::*;
use kvm_dirty_shim::{
    BoardFlags, DirtyTracker, ErrorKind, Memslot, MemslotFlags, ReaperConfig, SlotId, SyncStage,
};
use kvm_ioctls::Kvm;

/// fds, mappings and threads are counted per process: the tests of this
/// file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Slot 0 at guest-physical 0 over `mem`, dirty-logged.
fn logged_slot0(mem: &Mem) -> Memslot {
    Memslot::new(SlotId::new(0), 0, mem.addr(), mem.len as u64)
        .with_flags(MemslotFlags::LOG_DIRTY_PAGES)
}

/// Threads named "kds-reaper" in this process.
fn reapers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "kds-reaper")
        .count()
}

#[test]
fn dropping_a_tracker_stops_its_reaper_and_frees_everything() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let mem = Mem::new(1 << 20);
    let fds0 = fds();
    let t = DirtyTracker::adopt(&vm).unwrap();
    t.enable_dirty_ring(4096).unwrap();
    t.board_init(BoardFlags::empty()).unwrap();
    // The kernel wants the ring enabled before any vCPU exists.
    let vcpus: Vec<_> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
    let maps0 = vcpu_maps();
    let m = logged_slot0(&mem);
    // SAFETY: `mem` outlives the tracker.
    unsafe { t.update_memslot(&m) }.unwrap();
    let handles: Vec<_> = vcpus
        .iter()
        .enumerate()
        // SAFETY: each is a vCPU of the tracker's VM.
        .map(|(i, v)| unsafe { t.add_vcpu(v, i as u32) }.unwrap())
        .collect();
    t.enable_reaper(&ReaperConfig::default()).unwrap();
    assert_eq!(
        fds(),
        fds0 + 1 + 2,
        "the tracker's duplicate of the VM fd, 2 vCPU fds"
    );
    assert_eq!(vcpu_maps(), maps0 + 2, "one ring per vCPU");
    // The new thread names itself once it runs: wait for that, bounded.
    let t0 = std::time::Instant::now();
    while reapers() == 0 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::yield_now();
    }
    assert_eq!(reapers(), 1, "the reaper thread");
    drop(t);
    assert_eq!(reapers(), 0, "reaper thread still running");
    // The vCPU handles hold the VM: its fd and rings go with the last.
    assert_eq!(fds(), fds0 + 1 + 2);
    drop(handles);
    assert_eq!(fds(), fds0 + 2, "VM fd not closed");
    assert_eq!(vcpu_maps(), maps0, "rings not unmapped");
}

#[test]
fn the_ordering_rules_are_the_c_abis() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let t = DirtyTracker::adopt(&vm).unwrap();
    let mem = Mem::new(1 << 16);
    let m = logged_slot0(&mem);
    // SAFETY: `mem` outlives the tracker.
    unsafe { t.update_memslot(&m) }.unwrap();
    let e = t.enable_dirty_ring(4096).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    assert_eq!(e.kind(), ErrorKind::Ordering, "{e}");
    assert!(e.message().contains("before the first memslot"), "{e}");
    // The core's messages do not carry C function names in front.
    assert!(!e.message().starts_with("kds_"), "{e}");
    let e = t.board_init(BoardFlags::VGIC_ITS).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Ordering, "{e}");
    let mut bits = vec![0u64; 1];
    let r = t
        .sync_memslot(SlotId::new(0), &mut bits, SyncStage::Live)
        .unwrap();
    assert_eq!((r.pages, r.whole_slot), (0, false));
    assert_eq!(
        t.sync_memslot(SlotId::new(9), &mut bits, SyncStage::Live)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn a_clear_checks_its_slot_and_range() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let kvm = Kvm::new().expect("/dev/kvm");
    for ring in [Some(4096), None] {
        let vm = kvm.create_vm().unwrap();
        let t = DirtyTracker::adopt(&vm).unwrap();
        if let Some(n) = ring {
            t.enable_dirty_ring(n).unwrap();
        }
        t.board_init(BoardFlags::empty()).unwrap();
        let mem = Mem::new(1 << 16);
        // SAFETY: `mem` outlives the tracker.
        unsafe { t.update_memslot(&logged_slot0(&mem)) }.unwrap();
        let s = SlotId::new(0);
        assert_eq!(
            t.clear_memslot(s, 0..16).unwrap(),
            0,
            "nothing reported yet"
        );
        let e = t.clear_memslot(s, 8..17).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        let e = t.clear_memslot(SlotId::new(5), 0..1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }
}
