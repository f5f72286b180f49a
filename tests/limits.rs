//! The kernel's and the process's limits, reached on purpose: the kernel's
//! memslot limit (`KVM_CAP_NR_MEMSLOTS`), `RLIMIT_NOFILE` low enough that
//! the fd duplicate fails, `RLIMIT_AS` low enough that a ring mapping or a
//! bitmap cannot be had. Each refusal is a clean negative errno with a
//! message, leaves the state unchanged, and the next call works.
//! One test function: the limits are process-wide.

mod common;

use std::os::fd::AsRawFd;
use std::ptr;

use common::*;
use kvm_dirty_shim::capi::*;
use kvm_dirty_shim::*;
use kvm_ioctls::{Cap, Kvm};

fn limit(res: libc::__rlimit_resource_t) -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    assert_eq!(unsafe { libc::getrlimit(res, &mut r) }, 0);
    r
}

fn set_limit(res: libc::__rlimit_resource_t, cur: u64, max: u64) {
    let r = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(res, &r) }, 0);
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn vm_size() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

fn slot_count(vm: &TestVm) -> usize {
    // Every dirty-logged slot the shim knows answers kds_memslot_sync with 0
    // or more (the code slot 0 is not dirty-logged).
    let mut bm = [0u64; 1];
    (0..40000u32)
        .filter(|&s| {
            c!(kds_memslot_sync(vm.vm(), s, bm.as_mut_ptr(), 64, 0)) != -i64::from(libc::ENOENT)
        })
        .count()
}

#[test]
fn limits_are_refused_cleanly_and_the_next_call_works() {
    // -- RLIMIT_AS (first: later parts leave freed heap that malloc would
    // reuse without asking for address space): a ring mapping and a huge
    // slot's bitmap
    let vm = TestVm::new(Some(65536)); // 1 MiB rings
    // MAP_NORESERVE: address space only. 4 TiB: a 128 MiB bitmap, more than
    // the 64 MiB a malloc thread arena reserves up front.
    let huge = Mem::new(4 << 40);
    let fd = vm.kvm_vm.create_vcpu(0).unwrap();
    let saved = limit(libc::RLIMIT_AS);
    set_limit(libc::RLIMIT_AS, vm_size() + (512 << 10), saved.rlim_max);
    let r_vcpu = c!(kds_vcpu_add(vm.vm(), fd.as_raw_fd(), 0));
    let msg_vcpu = last_error();
    let big = KdsMemslot {
        slot: 5,
        flags: KDS_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 1 << 40,
        memory_size: huge.len as u64,
        userspace_addr: huge.addr(),
    };
    let r_slot = c!(kds_memslot_update(vm.vm(), &big, size_of::<KdsMemslot>()));
    let msg_slot = last_error();
    set_limit(libc::RLIMIT_AS, saved.rlim_cur, saved.rlim_max);
    assert_eq!(r_vcpu, -libc::ENOMEM, "{msg_vcpu}");
    assert!(msg_vcpu.contains("mmap"), "{msg_vcpu}");
    assert_eq!(r_slot, -libc::ENOMEM, "{msg_slot}");
    assert!(msg_slot.contains("out of memory"), "{msg_slot}");
    // State unchanged: vCPU 0 unknown, slot 5 unknown; then both work.
    let mut st = VcpuStats::default();
    assert_eq!(
        c!(kds_vcpu_stats_get(
            vm.vm(),
            0,
            &mut st,
            size_of::<VcpuStats>()
        )),
        -libc::ENOENT
    );
    let mut bm = [0u64; 1];
    assert_eq!(
        c!(kds_memslot_sync(vm.vm(), 5, bm.as_mut_ptr(), 64, 0)),
        -i64::from(libc::ENOENT)
    );
    assert_eq!(
        c!(kds_vcpu_add(vm.vm(), fd.as_raw_fd(), 0)),
        0,
        "{}",
        last_error()
    );
    // The next call works (256 GiB of it: the kernel's own per-slot
    // arrays for 4 TiB are not this test's business).
    let smaller = KdsMemslot {
        memory_size: 256 << 30,
        ..big
    };
    assert_eq!(
        c!(kds_memslot_update(
            vm.vm(),
            &smaller,
            size_of::<KdsMemslot>()
        )),
        0,
        "{}",
        last_error()
    );
    eprintln!("RLIMIT_AS: kds_vcpu_add (ring mmap) and a 4 TiB slot -ENOMEM, then fine");
    drop(vm);

    // -- RLIMIT_NOFILE: the shim's duplicate of the VM fd fails
    let kvm_vm = Kvm::new().unwrap().create_vm().unwrap();
    let saved = limit(libc::RLIMIT_NOFILE);
    let fds = open_fds();
    set_limit(libc::RLIMIT_NOFILE, fds + 4, saved.rlim_max);
    // Take every fd number left under the limit.
    let mut filler = Vec::new();
    loop {
        // SAFETY: duplicates an open fd; closed below.
        let d = unsafe { libc::dup(kvm_vm.as_raw_fd()) };
        if d < 0 {
            break;
        }
        filler.push(d);
    }
    let mut h = ptr::null_mut();
    let r = c!(kds_vm_adopt(kvm_vm.as_raw_fd(), &mut h));
    let msg = last_error();
    let r2 = c!(kds_vm_create(0, &mut h));
    let msg2 = last_error();
    for d in filler {
        // SAFETY: our duplicates.
        unsafe { libc::close(d) };
    }
    set_limit(libc::RLIMIT_NOFILE, saved.rlim_cur, saved.rlim_max);
    assert_eq!(r, -libc::EMFILE, "{msg}");
    assert!(msg.contains("F_DUPFD"), "{msg}");
    assert_eq!(r2, -libc::EMFILE, "{msg2}");
    assert!(h.is_null(), "no handle on failure");
    assert_eq!(open_fds(), fds, "no fd leaked");
    assert_eq!(
        c!(kds_vm_adopt(kvm_vm.as_raw_fd(), &mut h)),
        0,
        "next call works"
    );
    c!(kds_vm_free(h));
    eprintln!("RLIMIT_NOFILE at its end: kds_vm_adopt and kds_vm_create -EMFILE, then fine");

    // -- the kernel's memslot limit
    let vm = TestVm::new(Some(4096));
    let nr = vm.kvm_vm.check_extension_int(Cap::NrMemslots) as u32;
    assert!(nr > 1, "KVM_CAP_NR_MEMSLOTS {nr}");
    let page = Mem::new(PAGE as usize);
    let set = |slot: u32, size: u64| {
        let m = KdsMemslot {
            slot,
            flags: KDS_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0x1_0000_0000 + u64::from(slot) * PAGE,
            memory_size: size,
            userspace_addr: page.addr(),
        };
        c!(kds_memslot_update(vm.vm(), &m, size_of::<KdsMemslot>()))
    };
    // Slot 0 is the test VM's code slot: fill 1 .. nr - 1.
    for s in 1..nr {
        assert_eq!(set(s, PAGE), 0, "slot {s} of {nr}: {}", last_error());
    }
    assert_eq!(slot_count(&vm), nr as usize - 1);
    let r = set(nr, PAGE);
    assert_eq!(r, -libc::EINVAL, "slot {nr}: {}", last_error());
    assert!(
        last_error().contains("KVM_SET_USER_MEMORY_REGION"),
        "{}",
        last_error()
    );
    assert_eq!(slot_count(&vm), nr as usize - 1, "state unchanged");
    assert_eq!(set(nr - 1, 0), 0, "delete works: {}", last_error());
    assert_eq!(set(nr - 1, PAGE), 0, "and the slot comes back");
    eprintln!("memslots: {nr} (KVM_CAP_NR_MEMSLOTS) created, slot {nr} refused: -EINVAL");
    drop(vm);
}
