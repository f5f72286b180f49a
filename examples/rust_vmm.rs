//! A small Rust VMM written only against kvm-ioctls, vm-memory and this
//! crate's Rust API, the way cloud-hypervisor, Firecracker or crosvm would
//! use the dirty ring: it "migrates" its guest's RAM into a copy while
//! the guest writes it, then checks the copy page by page.
//!
//! It boots the tiny x86 guest of `guest/guest.S` on 2 vCPUs, each storing
//! without pause to pseudo-random pages of its own dirty-logged region
//! (vm-memory regions, registered with the safe `update_memslot_region`).
//! Each vCPU thread owns its `VcpuTracker` and hands every exit to
//! `handle_exit`, which reaps the ring on `KVM_EXIT_DIRTY_RING_FULL`; from
//! the second half of the rounds on, the adaptive reaper runs beside them
//! (so the first half is all ring-full exits). The migration thread syncs every
//! region each round while the vCPUs run, copying the pages reported into
//! the destination: region 0 through a bitmap and `dirty_pages`, region 1
//! merged into vm-memory's own `AtomicBitmap` of the region. Then it stops
//! the vCPUs, does the final sync, and compares: a page that differs was
//! lost. It prints one line per round and exits non-zero on any lost page.
//!
//! Every thread runs under a seccomp allow-list built with rust-vmm's
//! `seccompiler`, as Firecracker's and cloud-hypervisor's do: the calls
//! the library makes on it (`kvm_dirty_shim::seccomp`) plus the VMM's own,
//! and nothing else (a call outside the list kills the process with
//! `SIGSYS`). Each vCPU thread installs its filter first thing, the main
//! (migration) thread once setup is done, the reaper thread in its
//! `on_start` hook.
//!
//!     cargo run --release --features vm-memory --example rust_vmm [rounds]
//!
//! Like a VMM that takes soundness seriously, it has no `unsafe` at all.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kvm_dirty_shim::{
    BoardFlags, DirtyTracker, ErrorKind, ExitAction, MemslotFlags, ReaperConfig, SlotId, SyncStage,
    dirty_pages, seccomp,
};
use kvm_ioctls::{Kvm, VcpuExit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

// The guest's bytes and its start registers (kvm-ioctls only).
#[path = "../guest/boot.rs"]
mod boot;
use boot::{GUEST, setup_regs};

const PAGE: u64 = 4096;
const CODE_PAGES: u64 = 8;
const VCPUS: u32 = 2;
const PAGES: u64 = 8192; // 32 MiB per vCPU
const STORES: u32 = 2000; // per batch; the vCPU re-enters at once
const RING: u32 = 4096;

type Region = GuestRegionMmap<AtomicBitmap>;

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`, the vCPU threads' own ioctl.
const KVM_RUN: u64 = 0xae80;

/// A filter that allows `syscalls` and, for `ioctl`, only `ioctls`, and
/// kills the process with `SIGSYS` on anything else.
fn filter(syscalls: &[&[libc::c_long]], ioctls: &[u64]) -> BpfProgram {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls
        .iter()
        .flat_map(|list| list.iter())
        .map(|&s| (s, vec![]))
        .collect();
    let request = |r: u64| {
        let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r);
        SeccompRule::new(vec![c.expect("condition")]).expect("rule")
    };
    rules.insert(
        libc::SYS_ioctl,
        ioctls.iter().map(|&r| request(r)).collect(),
    );
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("a seccomp architecture");
    SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .and_then(TryInto::try_into)
        .expect("the filter")
}

/// The calls the VMM itself makes on a thread, beside the library's:
/// writing its report, sleeping between rounds, closing fds, and a
/// thread's (or the process's) exit.
const VMM_OWN: &[libc::c_long] = &[
    libc::SYS_write,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sigaltstack,
];

fn region(gpa: u64, pages: u64) -> Arc<Region> {
    let mapping = MmapRegion::<AtomicBitmap>::new((pages * PAGE) as usize).expect("mmap");
    Arc::new(GuestRegionMmap::new(mapping, GuestAddress(gpa)).expect("region"))
}

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
        Err(e) if e.kind() == ErrorKind::Unsupported => println!("no dirty ring: bitmap mode"),
        Err(e) => panic!("{e}"),
    }
    tracker.board_init(BoardFlags::empty()).expect("board hook");

    // Slot 0: code, mailboxes and stacks; slot 1 + i: vCPU i's region.
    let code = region(0, CODE_PAGES);
    let region_gpa = |i: u32| 0x10_0000 + u64::from(i) * PAGES * PAGE;
    let regions: Vec<Arc<Region>> = (0..VCPUS).map(|i| region(region_gpa(i), PAGES)).collect();
    let mut all = vec![Arc::clone(&code)];
    all.extend(regions.iter().cloned());
    let mem = GuestMemoryMmap::from_arc_regions(all).expect("guest memory");
    mem.write_slice(GUEST, GuestAddress(0))
        .expect("load the guest");
    // No `unsafe`: the tracker keeps each region mapped while its slot
    // exists.
    tracker
        .update_memslot_region(SlotId::new(0), Arc::clone(&code), MemslotFlags::empty())
        .expect("code slot");
    for (i, r) in regions.iter().enumerate() {
        let slot = SlotId::new(1 + i as u16);
        tracker
            .update_memslot_region(slot, Arc::clone(r), MemslotFlags::LOG_DIRTY_PAGES)
            .expect("region slot");
    }
    let mailbox = |i: u32| GuestAddress(PAGE * (1 + u64::from(i)));
    let put = |i: u32, off: u64, v: u32| {
        mem.write_obj(v, mailbox(i).unchecked_add(off))
            .expect("mailbox")
    };
    let mut vcpus = Vec::new();
    for i in 0..VCPUS {
        let (fd, dirty) = tracker.create_vcpu(i).expect("KVM_CREATE_VCPU");
        setup_regs(&fd, mailbox(i).0, PAGE * (CODE_PAGES - u64::from(i)));
        put(i, 0, 1); // the value stored: the round
        put(i, 4, STORES);
        put(i, 8, 7 + i); // LCG seed
        put(i, 12, (PAGES - 1) as u32);
        put(i, 16, region_gpa(i) as u32);
        put(i, 20, 12);
        vcpus.push((fd, dirty));
    }
    println!(
        "{VCPUS} vCPUs writing without pause, mode {:?}, {PAGES} pages per vCPU",
        tracker.mode()
    );

    // The destination: a copy of each region, filled only from syncs.
    let mut dest: Vec<Vec<u8>> = vec![vec![0; (PAGES * PAGE) as usize]; VCPUS as usize];
    let copy = |dest: &mut Vec<u8>, r: &Region, page: u64| {
        let at = (page * PAGE) as usize;
        let gpa = r.start_addr().unchecked_add(page * PAGE);
        mem.read_slice(&mut dest[at..at + PAGE as usize], gpa)
            .expect("read the page");
    };
    let stop = AtomicBool::new(false);
    let full_exits = AtomicU64::new(0);
    let mut bitmap = vec![0u64; (PAGES / 64) as usize];
    let mut lost = 0;
    // The filters, built before any is installed.
    let vcpu_filter = filter(
        &[seccomp::TRACKING, VMM_OWN],
        &[seccomp::TRACKING_IOCTLS, &[KVM_RUN]].concat(),
    );
    // The reaper thread inherits the main thread's filter (filters stack),
    // so the main thread's allows what the reaper makes too, and the
    // installing of the reaper's own filter in its `on_start`.
    let main_filter = filter(
        &[
            seccomp::TRACKING,
            seccomp::REAPER_START,
            seccomp::REAPER_THREAD,
            VMM_OWN,
            &[libc::SYS_seccomp, libc::SYS_prctl],
        ],
        seccomp::TRACKING_IOCTLS,
    );
    let reaper_filter = filter(
        &[seccomp::TRACKING, seccomp::REAPER_THREAD],
        seccomp::TRACKING_IOCTLS,
    );
    std::thread::scope(|s| {
        for (mut fd, dirty) in vcpus {
            let (stop, full_exits, vcpu_filter) = (&stop, &full_exits, &vcpu_filter);
            s.spawn(move || {
                seccompiler::apply_filter(vcpu_filter).expect("the vCPU thread's filter");
                // Until told to stop, checked at each batch's `out 0x10`;
                // a batch is STORES stores, so this ends promptly.
                loop {
                    match fd.run().expect("KVM_RUN") {
                        VcpuExit::IoOut(0x10, _) if stop.load(Ordering::Relaxed) => break,
                        VcpuExit::IoOut(0x10, _) => {}
                        VcpuExit::Unsupported(reason) => match dirty.handle_exit(reason) {
                            Ok(ExitAction::Reenter { .. }) => {
                                full_exits.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(ExitAction::FailMigration(e)) => {
                                eprintln!("vCPU {}: {e}", dirty.index());
                                std::process::exit(1);
                            }
                            Ok(other) => panic!("unexpected exit {reason}: {other:?}"),
                            Err(e) => panic!("vCPU {}: {e}", dirty.index()),
                        },
                        other => panic!("unexpected exit {other:?}"),
                    }
                }
                // Dropping `dirty` unregisters the vCPU.
            });
        }
        seccompiler::apply_filter(&main_filter).expect("the main thread's filter");
        let mut reaper_filter = Some(reaper_filter);
        for round in 1..=rounds {
            if round == rounds / 2 + 1 && tracker.mode().has_ring() {
                let cfg = ReaperConfig::default().with_max_interval(Duration::from_millis(20));
                let f = reaper_filter.take().expect("started once");
                tracker
                    .enable_reaper_with(&cfg, move || {
                        seccompiler::apply_filter(&f).map_err(std::io::Error::other)
                    })
                    .expect("start the reaper");
            }
            // The guest stores the round number from now on: a page copied
            // earlier and written again differs unless it is sent again.
            for i in 0..VCPUS {
                put(i, 0, round);
            }
            // How long the guest writes before this round's sync (the check
            // does not depend on it).
            std::thread::sleep(Duration::from_millis(50));
            let stage = SyncStage::Live;
            let (mut sent, mut whole) = (0, false);
            // Region 0: the shim's bitmap, walked with `dirty_pages`.
            bitmap.fill(0);
            let r = tracker
                .sync_memslot(SlotId::new(1), &mut bitmap, stage)
                .expect("sync");
            whole |= r.whole_slot;
            for p in dirty_pages(&bitmap) {
                copy(&mut dest[0], &regions[0], p);
                sent += 1;
            }
            // Region 1: merged into vm-memory's bitmap of the region (where
            // the VMM's own writes are marked too), then walked there.
            let vmm_bitmap = MmapRegion::bitmap(&regions[1]);
            let r = tracker
                .sync_memslot_into(SlotId::new(2), stage, vmm_bitmap)
                .expect("sync");
            whole |= r.whole_slot;
            for p in 0..PAGES {
                if vmm_bitmap.is_addr_set((p * PAGE) as usize) {
                    vmm_bitmap.reset_addr_range((p * PAGE) as usize, PAGE as usize);
                    copy(&mut dest[1], &regions[1], p);
                    sent += 1;
                }
            }
            println!(
                "round {round:2}: {sent:5} pages sent{}, {} ring-full exits so far",
                if whole {
                    " (a whole slot: overrun)"
                } else {
                    ""
                },
                full_exits.load(Ordering::Relaxed)
            );
        }
        // Stop the vCPUs (the scope joins their threads): the final sync
        // then sees every store.
        stop.store(true, Ordering::Relaxed);
    });
    // The vCPU threads are done: the final sync, then the check.
    for (i, r) in regions.iter().enumerate() {
        bitmap.fill(0);
        let slot = SlotId::new(1 + i as u16);
        tracker
            .sync_memslot(slot, &mut bitmap, SyncStage::Final)
            .expect("final sync");
        for p in dirty_pages(&bitmap) {
            copy(&mut dest[i], r, p);
        }
        MmapRegion::bitmap(r).reset();
        let mut page = vec![0u8; PAGE as usize];
        for p in 0..PAGES {
            mem.read_slice(&mut page, r.start_addr().unchecked_add(p * PAGE))
                .expect("read");
            let at = (p * PAGE) as usize;
            if page[..] != dest[i][at..at + PAGE as usize] {
                lost += 1;
            }
        }
    }
    let st = tracker.stats();
    println!(
        "stats: {} entries reaped, {} reaps by the reaper, {} resets, {} overflows, \
         {} ring-full exits",
        st.entries_reaped,
        st.reaper_reaps,
        st.ring_resets,
        st.ring_overflows,
        full_exits.load(Ordering::Relaxed)
    );
    drop(tracker); // stops the reaper; the VM goes with the last handle
    if lost > 0 {
        eprintln!("{lost} pages lost: the destination differs from the source");
        std::process::exit(1);
    }
    println!("0 pages lost: the destination equals the source, page for page");
}
