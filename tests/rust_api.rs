//! The Rust API on the real kernel, with no C ABI (no feature needed; the
//! vm-memory parts with `--features vm-memory`): adopting only VM fds and
//! only once, typed errors, the vCPU handle, the iterator.

use std::os::fd::AsFd;

use kvm_dirty_shim::{
    BoardFlags, DirtyTracker, ErrorKind, ExitAction, Memslot, MemslotFlags, Mode, SlotId,
    SyncStage, dirty_pages,
};
use kvm_ioctls::Kvm;

#[test]
fn adopt_takes_only_a_vm_and_only_once() {
    let kvm = Kvm::new().unwrap();
    let dev = std::fs::File::open("/dev/kvm").unwrap();
    let e = DirtyTracker::adopt_fd(dev.as_fd()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("/dev/kvm"), "{e}");
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    // SAFETY: `vcpu` owns its fd and outlives the borrow.
    let vcpu_fd =
        unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&vcpu)) };
    let e = DirtyTracker::adopt_fd(vcpu_fd).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(
        DirtyTracker::adopt_fd(null.as_fd()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    let vm = kvm.create_vm().unwrap();
    let t = DirtyTracker::adopt(&vm).unwrap();
    let e = DirtyTracker::adopt(&vm).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert_eq!(e.errno(), libc::EBUSY);
    // Through the tracker's own duplicate too.
    assert_eq!(
        DirtyTracker::adopt_fd(t.vm_fd()).unwrap_err().kind(),
        ErrorKind::InUse
    );
    drop(t);
    DirtyTracker::adopt(&vm).expect("adoptable again once the tracker is gone");
}

#[test]
fn the_ring_after_a_vcpu_exists_names_the_vcpu() {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let t = DirtyTracker::adopt(&vm).unwrap();
    // Created with kvm-ioctls, not added to the tracker: only the kernel
    // knows it.
    let _vcpu = vm.create_vcpu(0).unwrap();
    match t.enable_dirty_ring(4096) {
        Err(e) if e.kind() == ErrorKind::Unsupported => {} // no ring here
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Ordering, "{e}");
            assert!(e.message().contains("vCPU exists"), "{e}");
            assert!(!e.message().contains("ring size"), "{e}");
        }
        Ok(()) => panic!("the kernel enabled a ring after KVM_CREATE_VCPU"),
    }
}

#[test]
fn errors_are_typed_and_convert_to_io_errors() {
    let t = DirtyTracker::create(0).unwrap();
    let e = t.enable_dirty_ring(1000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let io: std::io::Error = e.into();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
    let mut bm = [0u64; 1];
    let e = t
        .sync_memslot(SlotId::new(9), &mut bm, SyncStage::Live)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // Messages name Rust operations, not C functions.
    assert!(!e.message().contains("kds_"), "{e}");
    let e = t.vcpu_stats(3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(
        e.message().contains("add_vcpu") && !e.message().contains("kds_"),
        "{e}"
    );
}

#[test]
fn a_vcpu_handle_unregisters_on_drop_and_leaves_other_exits_alone() {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let t = DirtyTracker::adopt(&vm).unwrap();
    let ring = t.enable_dirty_ring(4096).is_ok();
    t.board_init(BoardFlags::empty()).unwrap();
    assert_eq!(t.mode(), if ring { Mode::Ring } else { Mode::Bitmap });
    let (fd, v) = t.create_vcpu(0).unwrap();
    assert_eq!(
        t.create_vcpu(0).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    // SAFETY: `fd` is a vCPU of the tracker's VM.
    let e = unsafe { t.add_vcpu(&fd, 1) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "one vCPU, twice: {e}");
    assert_eq!(
        v.handle_exit(kvm_bindings::KVM_EXIT_HLT).unwrap(),
        ExitAction::NotDirtyRingFull
    );
    // A ring-full exit with nothing in the ring: reaped, re-enter.
    if ring {
        assert!(matches!(
            v.handle_exit(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)
                .unwrap(),
            ExitAction::Reenter { .. }
        ));
    }
    assert_eq!(v.stats().unwrap(), t.vcpu_stats(0).unwrap());
    drop(v);
    assert_eq!(t.vcpu_stats(0).unwrap_err().kind(), ErrorKind::NotFound);
    // SAFETY: `fd` is a vCPU of the tracker's VM.
    let v = unsafe { t.add_vcpu(&fd, 0) }.expect("the index is free again");
    v.remove().unwrap();
    assert_eq!(t.vcpu_stats(0).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn slot_ids_flags_and_the_page_iterator() {
    let s = SlotId::in_address_space(1, 7);
    assert_eq!((s.address_space(), s.id(), s.raw()), (1, 7, 0x1_0007));
    assert_eq!(SlotId::from_raw(s.raw()), s);
    assert_eq!(s.to_string(), "1:7");
    let f = MemslotFlags::LOG_DIRTY_PAGES | MemslotFlags::READONLY;
    assert!(f.contains(MemslotFlags::READONLY));
    assert_eq!(MemslotFlags::from_bits(1 << 5), None);
    let m = Memslot::delete(s);
    assert_eq!(m.memory_size, 0);
    let bm = [1u64 << 63, 0, 0b101];
    assert_eq!(dirty_pages(&bm).collect::<Vec<_>>(), [63, 128, 130]);
    assert_eq!(dirty_pages(&[]).count(), 0);
}

#[cfg(feature = "vm-memory")]
#[test]
fn a_vm_memory_region_lives_while_its_slot_maps_it() {
    use std::sync::Arc;
    use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

    let t = DirtyTracker::create(0).unwrap();
    t.board_init(BoardFlags::empty()).unwrap();
    let r = Arc::new(
        GuestRegionMmap::new(MmapRegion::<()>::new(1 << 20).unwrap(), GuestAddress(0)).unwrap(),
    );
    let slot = SlotId::new(2);
    t.update_memslot_region(slot, Arc::clone(&r), MemslotFlags::LOG_DIRTY_PAGES)
        .unwrap();
    assert_eq!(Arc::strong_count(&r), 2, "the tracker keeps the region");
    // A flags change keeps it; a delete lets go.
    t.update_memslot_region(slot, Arc::clone(&r), MemslotFlags::empty())
        .unwrap();
    assert_eq!(Arc::strong_count(&r), 2);
    // A delete that names the old address still deletes.
    let m = Memslot::new(slot, 0, r.as_ptr() as u64, 0);
    // SAFETY: a deletion maps no memory.
    unsafe { t.update_memslot(&m) }.unwrap();
    assert_eq!(
        Arc::strong_count(&r),
        1,
        "deleted: the region is ours again"
    );
    // Kept past the tracker's life otherwise: the kernel still maps it.
    t.update_memslot_region(slot, Arc::clone(&r), MemslotFlags::empty())
        .unwrap();
    drop(t);
    assert_eq!(
        Arc::strong_count(&r),
        2,
        "never released while the slot exists"
    );
}

#[test]
fn the_tracker_is_shared_and_a_vcpu_handle_moves_to_its_thread() {
    fn shared<T: Send + Sync>() {}
    fn sent<T: Send>() {}
    shared::<DirtyTracker>();
    sent::<kvm_dirty_shim::VcpuTracker>();
    shared::<kvm_dirty_shim::Error>();
}

#[test]
fn add_vcpu_refuses_every_fd_it_can_tell_is_not_its_vcpu() {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let t = DirtyTracker::adopt(&vm).unwrap();
    if t.enable_dirty_ring(4096).is_err() {
        return; // no ring here: nothing is mapped
    }
    t.board_init(BoardFlags::empty()).unwrap();
    // An empty regular file maps fine and raised SIGBUS at the first read.
    let path = std::env::temp_dir().join(format!("kds-rust-empty-{}", std::process::id()));
    let empty = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // SAFETY: the contract is broken on purpose: the call must refuse it.
    let e = unsafe { t.add_vcpu_fd(empty.as_fd(), 0) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // A vCPU of a VM without a ring: its ring offset maps, unreadable.
    let other = kvm.create_vm().unwrap();
    let stranger = other.create_vcpu(0).unwrap();
    // SAFETY: as above.
    let e = unsafe { t.add_vcpu(&stranger, 0) }.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
    // Nothing was registered: the index is free.
    let (_fd, v) = t.create_vcpu(0).unwrap();
    v.remove().unwrap();
}
