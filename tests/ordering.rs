//! Every ordering refusal and bad input of doc/abi.md, through the C ABI, on
//! the real kernel: the errno and a message that says what to do.

mod common;

use std::os::fd::AsRawFd;
use std::ptr;

use common::*;
use kvm_dirty_shim::capi::*;
use kvm_dirty_shim::*;
use kvm_ioctls::Kvm;

const EINVAL: i32 = -libc::EINVAL;
const EBUSY: i32 = -libc::EBUSY;
const ENOENT: i32 = -libc::ENOENT;
const ENOTSUP: i32 = -libc::ENOTSUP;

/// Asserts `ret == want` and that the message mentions every word of `says`.
#[track_caller]
fn refused(ret: i64, want: i32, says: &[&str]) {
    let msg = last_error();
    assert_eq!(ret, i64::from(want), "message: {msg}");
    assert!(!msg.is_empty());
    for s in says {
        assert!(msg.contains(s), "{msg:?} does not mention {s:?}");
    }
}

fn new_handle_of(kvm_vm: &kvm_ioctls::VmFd) -> Handle {
    let mut h = ptr::null_mut();
    assert_eq!(
        c!(kds_vm_adopt(kvm_vm.as_raw_fd(), &mut h)),
        0,
        "{}",
        last_error()
    );
    Handle(h)
}

fn new_vm() -> (kvm_ioctls::VmFd, Handle) {
    let kvm_vm = Kvm::new().unwrap().create_vm().unwrap();
    let mut h = ptr::null_mut();
    assert_eq!(
        c!(kds_vm_adopt(kvm_vm.as_raw_fd(), &mut h)),
        0,
        "{}",
        last_error()
    );
    (kvm_vm, Handle(h))
}

fn slot(mem: &Mem, slot: u32, gpa: u64, flags: u32) -> KdsMemslot {
    KdsMemslot {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: mem.len as u64,
        userspace_addr: mem.addr(),
    }
}

#[test]
fn abi_version() {
    assert_eq!(kds_abi_version(), KDS_ABI_VERSION);
}

#[test]
fn ring_after_memslot_or_vcpu_or_twice_is_ebusy() {
    let mem = Mem::new(1 << 16);
    let (_k, h) = new_vm();
    assert_eq!(
        c!(kds_memslot_update(
            h.0,
            &slot(&mem, 1, 0, KDS_MEM_LOG_DIRTY_PAGES),
            size_of::<KdsMemslot>()
        )),
        0
    );
    refused(
        c!(kds_dirty_ring_enable(h.0, 4096)).into(),
        EBUSY,
        &["kds_memslot_update", "before the first memslot"],
    );
    assert_eq!(c!(kds_vm_mode(h.0)), KdsMode::KDS_MODE_BITMAP as i32);
    c!(kds_vm_free(h.0));

    let (k, h) = new_vm();
    let vcpu = k.create_vcpu(0).unwrap();
    assert_eq!(c!(kds_vcpu_add(h.0, vcpu.as_raw_fd(), 0)), 0);
    refused(
        c!(kds_dirty_ring_enable(h.0, 4096)).into(),
        EBUSY,
        &["kds_vcpu_add"],
    );
    c!(kds_vm_free(h.0));

    let (_k, h) = new_vm();
    assert_eq!(c!(kds_dirty_ring_enable(h.0, 4096)), 0, "{}", last_error());
    refused(
        c!(kds_dirty_ring_enable(h.0, 4096)).into(),
        EBUSY,
        &["already enabled"],
    );
    c!(kds_vm_free(h.0));
}

#[test]
fn ring_sizes_outside_the_kernel_limits_are_einval() {
    let (_k, h) = new_vm();
    for bad in [0u32, 1000, 4095, 16, 1 << 20, u32::MAX] {
        refused(
            c!(kds_dirty_ring_enable(h.0, bad)).into(),
            EINVAL,
            &["power of two", "entries"],
        );
    }
    assert_eq!(c!(kds_vm_mode(h.0)), KdsMode::KDS_MODE_BITMAP as i32);
    assert_eq!(c!(kds_dirty_ring_enable(h.0, 65536)), 0, "{}", last_error());
    c!(kds_vm_free(h.0));
}

#[test]
fn its_without_backup_bitmap_kernel_is_enotsup() {
    // x86 reports KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 0.
    let (k, h) = new_vm();
    assert_eq!(
        k.check_extension_raw(225),
        0,
        "this test expects an x86 kernel"
    );
    assert_eq!(c!(kds_dirty_ring_enable(h.0, 4096)), 0);
    refused(
        c!(kds_board_init(h.0, KDS_BOARD_VGIC_ITS)).into(),
        ENOTSUP,
        &["KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP"],
    );
    assert_eq!(c!(kds_vm_mode(h.0)), KdsMode::KDS_MODE_RING as i32);
    // Still open: the board may say "no ITS" instead.
    assert_eq!(c!(kds_board_init(h.0, 0)), 0);
    c!(kds_vm_free(h.0));
}

#[test]
fn its_chosen_before_the_ring_makes_the_ring_check_the_backup_bitmap() {
    let (_k, h) = new_vm();
    assert_eq!(
        c!(kds_board_init(h.0, KDS_BOARD_VGIC_ITS)),
        0,
        "{}",
        last_error()
    );
    refused(
        c!(kds_dirty_ring_enable(h.0, 4096)).into(),
        ENOTSUP,
        &["KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", "bitmap mode"],
    );
    assert_eq!(c!(kds_vm_mode(h.0)), KdsMode::KDS_MODE_BITMAP as i32);
    c!(kds_vm_free(h.0));
}

#[test]
fn memslot_before_board_hook_seals_the_board() {
    let mem = Mem::new(1 << 16);
    for ring in [true, false] {
        let (_k, h) = new_vm();
        if ring {
            assert_eq!(c!(kds_dirty_ring_enable(h.0, 4096)), 0);
        }
        assert_eq!(
            c!(kds_memslot_update(
                h.0,
                &slot(&mem, 1, 0, KDS_MEM_LOG_DIRTY_PAGES),
                size_of::<KdsMemslot>()
            )),
            0
        );
        refused(
            c!(kds_board_init(h.0, KDS_BOARD_VGIC_ITS)).into(),
            EBUSY,
            &["kds_board_init", "before the first memslot"],
        );
        // The seal means "no ITS": saying so is fine.
        assert_eq!(c!(kds_board_init(h.0, 0)), 0, "{}", last_error());
        c!(kds_vm_free(h.0));
    }
}

#[test]
fn board_hook_twice() {
    let (_k, h) = new_vm();
    assert_eq!(c!(kds_board_init(h.0, 0)), 0);
    assert_eq!(c!(kds_board_init(h.0, 0)), 0);
    refused(
        c!(kds_board_init(h.0, KDS_BOARD_VGIC_ITS)).into(),
        EBUSY,
        &["already"],
    );
    refused(
        c!(kds_board_init(h.0, 1 << 9)).into(),
        EINVAL,
        &["unknown board flags"],
    );
    c!(kds_vm_free(h.0));
}

#[test]
fn null_handles_and_pointers_are_einval() {
    let n = ptr::null_mut();
    let mut bm = [0u64; 4];
    let m = KdsMemslot::default();
    let mut st = Stats::default();
    let mut vst = VcpuStats::default();
    let calls: Vec<(&str, i64)> = vec![
        ("kds_vm_fd", c!(kds_vm_fd(n)).into()),
        ("kds_vm_mode", c!(kds_vm_mode(n)).into()),
        (
            "kds_dirty_ring_enable",
            c!(kds_dirty_ring_enable(n, 4096)).into(),
        ),
        ("kds_board_init", c!(kds_board_init(n, 0)).into()),
        (
            "kds_manual_protect_set",
            c!(kds_manual_protect_set(n, true)).into(),
        ),
        (
            "kds_memslot_update",
            c!(kds_memslot_update(n, &m, size_of::<KdsMemslot>())).into(),
        ),
        ("kds_vcpu_add", c!(kds_vcpu_add(n, 3, 0)).into()),
        ("kds_vcpu_remove", c!(kds_vcpu_remove(n, 0)).into()),
        ("kds_reap", c!(kds_reap(n))),
        ("kds_vcpu_reap", c!(kds_vcpu_reap(n, 0))),
        (
            "kds_memslot_sync",
            c!(kds_memslot_sync(n, 0, bm.as_mut_ptr(), 256, 0)),
        ),
        ("kds_kick_set", c!(kds_kick_set(n, None, n.cast())).into()),
        ("kds_flush", c!(kds_flush(n))),
        (
            "kds_stats_get",
            c!(kds_stats_get(n, &mut st, size_of::<Stats>())).into(),
        ),
        (
            "kds_vcpu_stats_get",
            c!(kds_vcpu_stats_get(n, 0, &mut vst, size_of::<VcpuStats>())).into(),
        ),
        (
            "kds_vm_create",
            c!(kds_vm_create(0, ptr::null_mut())).into(),
        ),
        ("kds_vm_adopt", c!(kds_vm_adopt(3, ptr::null_mut())).into()),
    ];
    for (name, r) in calls {
        assert_eq!(r, i64::from(EINVAL), "{name}");
    }
    c!(kds_vm_free(n)); // a no-op

    let (_k, h) = new_vm();
    refused(
        c!(kds_memslot_update(
            h.0,
            ptr::null(),
            size_of::<KdsMemslot>()
        ))
        .into(),
        EINVAL,
        &["NULL"],
    );
    refused(
        c!(kds_stats_get(h.0, ptr::null_mut(), size_of::<Stats>())).into(),
        EINVAL,
        &["NULL"],
    );
    refused(
        c!(kds_vcpu_stats_get(
            h.0,
            0,
            ptr::null_mut(),
            size_of::<VcpuStats>()
        ))
        .into(),
        EINVAL,
        &["NULL"],
    );
    refused(
        c!(kds_memslot_sync(h.0, 0, ptr::null_mut(), 64, 0)),
        EINVAL,
        &["NULL"],
    );
    c!(kds_vm_free(h.0));
}

#[test]
fn bad_memslots() {
    let mem = Mem::new(1 << 16);
    let (_k, h) = new_vm();
    let good = slot(&mem, 1, 0x10_0000, KDS_MEM_LOG_DIRTY_PAGES);
    let cases = [
        KdsMemslot {
            guest_phys_addr: 0x10_0001,
            ..good
        },
        KdsMemslot {
            memory_size: 4097,
            ..good
        },
        KdsMemslot {
            userspace_addr: good.userspace_addr + 8,
            ..good
        },
        KdsMemslot {
            flags: 1 << 5,
            ..good
        },
    ];
    for c in cases {
        refused(
            c!(kds_memslot_update(h.0, &c, size_of::<KdsMemslot>())).into(),
            EINVAL,
            &["kds_memslot_update"],
        );
    }
    refused(
        c!(kds_memslot_update(
            h.0,
            &KdsMemslot {
                slot: 9,
                ..Default::default()
            },
            size_of::<KdsMemslot>(),
        ))
        .into(),
        ENOENT,
        &["unknown slot"],
    );
    assert_eq!(
        c!(kds_memslot_update(h.0, &good, size_of::<KdsMemslot>())),
        0,
        "{}",
        last_error()
    );
    // The kernel's own refusal (overlapping slot) is reported with its errno.
    let overlap = KdsMemslot { slot: 2, ..good };
    let r = c!(kds_memslot_update(h.0, &overlap, size_of::<KdsMemslot>()));
    assert_eq!(r, -libc::EEXIST, "{}", last_error());
    assert!(last_error().contains("KVM_SET_USER_MEMORY_REGION"));
    assert!(last_error().contains("EEXIST"));
    c!(kds_vm_free(h.0));
}

#[test]
fn bad_syncs() {
    let mem = Mem::new(1 << 16); // 16 pages
    let (_k, h) = new_vm();
    assert_eq!(
        c!(kds_memslot_update(
            h.0,
            &slot(&mem, 1, 0, KDS_MEM_LOG_DIRTY_PAGES),
            size_of::<KdsMemslot>()
        )),
        0
    );
    let mut bm = [0u64; 1];
    refused(
        c!(kds_memslot_sync(h.0, 1, bm.as_mut_ptr(), 15, 0)),
        EINVAL,
        &["too small", "16 pages"],
    );
    refused(
        c!(kds_memslot_sync(h.0, 7, bm.as_mut_ptr(), 64, 0)),
        ENOENT,
        &["unknown slot"],
    );
    refused(
        c!(kds_memslot_sync(h.0, 1, bm.as_mut_ptr(), 64, 1 << 4)),
        EINVAL,
        &["unknown flags"],
    );
    assert_eq!(
        c!(kds_memslot_sync(h.0, 1, bm.as_mut_ptr(), 16, 0)),
        0,
        "{}",
        last_error()
    );
    c!(kds_vm_free(h.0));
}

#[test]
fn bad_vcpus() {
    let (k, h) = new_vm();
    assert_eq!(c!(kds_dirty_ring_enable(h.0, 4096)), 0);
    refused(c!(kds_vcpu_add(h.0, -1, 0)).into(), EINVAL, &["fd"]);
    // Not a vCPU fd: refused before anything is mapped.
    refused(
        c!(kds_vcpu_add(h.0, k.as_raw_fd(), 0)).into(),
        EINVAL,
        &["anon_inode:kvm-vm", "not a KVM vCPU fd"],
    );
    // An empty regular file would map, and raise SIGBUS at the first read.
    let path = std::env::temp_dir().join(format!("kds-empty-{}", std::process::id()));
    let empty = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    refused(
        c!(kds_vcpu_add(h.0, empty.as_raw_fd(), 0)).into(),
        EINVAL,
        &["not a KVM vCPU fd"],
    );
    // A vCPU of a VM without a ring: its "ring" maps, but cannot be read.
    let other = Kvm::new().unwrap().create_vm().unwrap();
    let stranger = other.create_vcpu(0).unwrap();
    refused(
        c!(kds_vcpu_add(h.0, stranger.as_raw_fd(), 0)).into(),
        -libc::EFAULT,
        &["mmap of the vCPU dirty ring", "cannot be read"],
    );
    // A vCPU of a VM with a larger ring.
    let big = Kvm::new().unwrap().create_vm().unwrap();
    let hb = new_handle_of(&big);
    assert_eq!(c!(kds_dirty_ring_enable(hb.0, 8192)), 0);
    let big_vcpu = big.create_vcpu(0).unwrap();
    refused(
        c!(kds_vcpu_add(h.0, big_vcpu.as_raw_fd(), 0)).into(),
        EINVAL,
        &["larger than"],
    );
    c!(kds_vm_free(hb.0));
    let vcpu = k.create_vcpu(0).unwrap();
    assert_eq!(
        c!(kds_vcpu_add(h.0, vcpu.as_raw_fd(), 0)),
        0,
        "{}",
        last_error()
    );
    refused(
        c!(kds_vcpu_add(h.0, vcpu.as_raw_fd(), 0)).into(),
        -libc::EEXIST,
        &["already registered"],
    );
    // The same vCPU under another index.
    refused(
        c!(kds_vcpu_add(h.0, vcpu.as_raw_fd(), 1)).into(),
        -libc::EEXIST,
        &["KVM vCPU 0, registered already as index 0"],
    );
    refused(
        c!(kds_vcpu_reap(h.0, 5)),
        ENOENT,
        &["unknown vCPU index 5", "kds_vcpu_add"],
    );
    refused(
        c!(kds_vcpu_remove(h.0, 5)).into(),
        ENOENT,
        &["unknown vCPU"],
    );
    let mut s = VcpuStats::default();
    refused(
        c!(kds_vcpu_stats_get(h.0, 5, &mut s, size_of::<VcpuStats>())).into(),
        ENOENT,
        &["unknown vCPU"],
    );
    assert_eq!(c!(kds_vcpu_reap(h.0, 0)), 0);
    c!(kds_vm_free(h.0));
}

#[test]
fn adopt_keeps_the_callers_fd() {
    let mut h = ptr::null_mut();
    refused(c!(kds_vm_adopt(-1, &mut h)).into(), EINVAL, &["bad VM fd"]);
    let null = std::fs::File::open("/dev/null").unwrap();
    refused(
        c!(kds_vm_adopt(null.as_raw_fd(), &mut h)).into(),
        EINVAL,
        &["not a KVM VM fd"],
    );
    refused(
        c!(kds_vm_adopt(999_999, &mut h)).into(),
        -libc::EBADF,
        &["EBADF"],
    );
    // /dev/kvm itself and a vCPU fd are KVM fds, but not VMs.
    let kvm = Kvm::new().unwrap();
    refused(
        c!(kds_vm_adopt(kvm.as_raw_fd(), &mut h)).into(),
        EINVAL,
        &["kds_vm_adopt", "/dev/kvm", "not a KVM VM fd"],
    );
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    refused(
        c!(kds_vm_adopt(vcpu.as_raw_fd(), &mut h)).into(),
        EINVAL,
        &["kvm-vcpu", "not a KVM VM fd"],
    );
    // A VM this process tracks already: -EBUSY, also through another fd.
    let (k2, h2) = new_vm();
    refused(
        c!(kds_vm_adopt(k2.as_raw_fd(), &mut h)).into(),
        EBUSY,
        &["tracks already"],
    );
    let fd2 = c!(kds_vm_fd(h2.0));
    refused(
        c!(kds_vm_adopt(fd2, &mut h)).into(),
        EBUSY,
        &["tracks already"],
    );
    c!(kds_vm_free(h2.0));
    let mut h3 = ptr::null_mut();
    assert_eq!(
        c!(kds_vm_adopt(k2.as_raw_fd(), &mut h3)),
        0,
        "{}",
        last_error()
    );
    c!(kds_vm_free(h3));

    let (k, h) = new_vm();
    let shim_fd = c!(kds_vm_fd(h.0));
    assert!(shim_fd >= 0 && shim_fd != k.as_raw_fd());
    c!(kds_vm_free(h.0));
    // The caller's fd still works after kds_vm_free.
    let vcpu = k.create_vcpu(0);
    assert!(vcpu.is_ok(), "the VM fd must stay usable");
}
