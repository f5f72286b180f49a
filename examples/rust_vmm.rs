//! A small Rust VMM that tracks its guest's dirty pages with the Rust API
//! only ([`DirtyTracker`]; kvm-ioctls for the VM and its vCPUs): the way
//! cloud-hypervisor, Firecracker or crosvm would use the dirty ring.
//!
//! It boots the tiny x86 guest of `guest/guest.S` on 2 vCPUs. Each vCPU has
//! its own dirty-logged slot and stores to pseudo-random pages of it. The
//! VMM handles `KVM_EXIT_DIRTY_RING_FULL` on each vCPU's thread, and the
//! adaptive reaper runs beside them. After each round the VMM syncs every
//! slot, as a migration round would. It then checks the result against a
//! shadow copy of the memory: every page that changed must have been
//! reported. It prints one line per round and exits non-zero on any lost
//! page.
//!
//!     cargo run --release --example rust_vmm [rounds]

use std::os::fd::AsRawFd;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_dirty_shim::{DirtyTracker, KDS_MEM_LOG_DIRTY_PAGES, KdsMemslot, KdsReaperConfig};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

// The guest's bytes, guest memory and the guest's start registers (no shim).
#[path = "../guest/host.rs"]
mod host;
use host::{GUEST, Mem, setup_regs};

const PAGE: u64 = 4096;
const CODE_PAGES: u64 = 8;
const VCPUS: u32 = 2;
const PAGES: u64 = 8192; // 32 MiB per vCPU
const STORES: u32 = 6000;
const RING: u32 = 4096;

fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let tracker = DirtyTracker::adopt(&vm).expect("adopt the VM");
    match tracker.enable_dirty_ring(RING) {
        Ok(()) => {}
        Err(e) if e.errno() == libc::ENOTSUP => println!("no dirty ring here: bitmap mode"),
        Err(e) => panic!("{e}"),
    }
    tracker.board_init(0).expect("board hook");

    // Slot 0: code, mailboxes and stacks; slot 1 + i: vCPU i's region.
    let code = Mem::new((CODE_PAGES * PAGE) as usize);
    // SAFETY: in bounds of the fresh mapping.
    unsafe { std::ptr::copy_nonoverlapping(GUEST.as_ptr(), code.ptr, GUEST.len()) };
    let regions: Vec<Mem> = (0..VCPUS)
        .map(|_| Mem::new((PAGES * PAGE) as usize))
        .collect();
    let slot = |slot: u32, gpa: u64, mem: &Mem, flags: u32| KdsMemslot {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: mem.len as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the mappings outlive the tracker and the VM, which are
    // dropped at the end of main before them (declared after them).
    unsafe { tracker.set_memslot(&slot(0, 0, &code, 0)) }.expect("code slot");
    let region_gpa = |i: u32| 0x10_0000 + u64::from(i) * PAGES * PAGE;
    for (i, r) in regions.iter().enumerate() {
        let i = i as u32;
        // SAFETY: as above.
        unsafe { tracker.set_memslot(&slot(1 + i, region_gpa(i), r, KDS_MEM_LOG_DIRTY_PAGES)) }
            .expect("region slot");
    }
    let mailbox = |i: u32| PAGE * (1 + u64::from(i));
    let vcpus: Vec<VcpuFd> = (0..VCPUS)
        .map(|i| {
            let fd = vm.create_vcpu(u64::from(i)).expect("KVM_CREATE_VCPU");
            tracker.add_vcpu(&fd, i).expect("add vCPU");
            setup_regs(&fd, mailbox(i), PAGE * (CODE_PAGES - u64::from(i)));
            let mb = mailbox(i);
            code.write_u32(mb + 4, STORES);
            code.write_u32(mb + 8, 7 + i);
            code.write_u32(mb + 12, (PAGES - 1) as u32);
            code.write_u32(mb + 16, region_gpa(i) as u32);
            code.write_u32(mb + 20, 12);
            fd
        })
        .collect();
    if tracker.mode().has_ring() {
        tracker
            .start_reaper(&KdsReaperConfig::default())
            .expect("start the reaper");
    }
    println!(
        "{VCPUS} vCPUs, mode {:?}, {PAGES} pages per vCPU, {STORES} stores per round, vm fd {}",
        tracker.mode(),
        tracker.vm_fd().as_raw_fd()
    );

    let mut shadow: Vec<Vec<u32>> = vec![vec![0; PAGES as usize]; VCPUS as usize];
    let mut bitmap = vec![0u64; (PAGES / 64) as usize];
    let full_exits = AtomicU64::new(0);
    let start = Barrier::new(VCPUS as usize + 1);
    let done = Barrier::new(VCPUS as usize + 1);
    let mut total_lost = 0;
    std::thread::scope(|s| {
        for (i, fd) in vcpus.into_iter().enumerate() {
            let (tracker, start, done, full_exits) = (&tracker, &start, &done, &full_exits);
            let mut fd = fd;
            s.spawn(move || {
                for _ in 0..rounds {
                    start.wait();
                    // One round: until the guest's `out 0x10`, bounded.
                    for exits in 0.. {
                        assert!(exits < 1_000_000, "the round did not end");
                        match fd.run().expect("KVM_RUN") {
                            VcpuExit::IoOut(0x10, _) => break,
                            VcpuExit::Unsupported(r)
                                if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL =>
                            {
                                full_exits.fetch_add(1, Ordering::Relaxed);
                                tracker.reap_vcpu(i as u32).expect("reap on ring full");
                            }
                            other => panic!("unexpected exit {other:?}"),
                        }
                    }
                    done.wait();
                }
            });
        }
        for round in 1..=rounds {
            for i in 0..VCPUS {
                code.write_u32(mailbox(i), round);
            }
            start.wait();
            done.wait();
            let (mut changed, mut reported, mut lost) = (0, 0, 0);
            for (i, region) in regions.iter().enumerate() {
                bitmap.fill(0);
                reported += tracker
                    .sync_slot(1 + i as u32, &mut bitmap, false)
                    .expect("sync");
                for p in 0..PAGES {
                    let v = region.read_u32(p * PAGE);
                    if v != shadow[i][p as usize] {
                        changed += 1;
                        if bitmap[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                            lost += 1;
                        }
                        shadow[i][p as usize] = v;
                    }
                }
            }
            total_lost += lost;
            println!(
                "round {round:2}: {changed:5} pages changed, {reported:5} reported, {lost} lost, \
                 {} ring-full exits so far",
                full_exits.load(Ordering::Relaxed)
            );
        }
    });
    let st = tracker.stats();
    println!(
        "stats: {} entries reaped, {} by the reaper, {} resets, {} overflows",
        st.entries_reaped, st.reaper_reaps, st.ring_resets, st.ring_overflows
    );
    drop(tracker); // stops the reaper, unmaps the rings
    if total_lost > 0 {
        eprintln!("{total_lost} pages lost");
        std::process::exit(1);
    }
    println!("0 pages lost");
}
