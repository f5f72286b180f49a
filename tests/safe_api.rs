//! What safe Rust can do with the tracker, written as a VMM would write it
//! with no `unsafe` at all: the tracker dropped while the VM runs on
//! (ring and bitmap), its region slots' memory never reached after the
//! tracker let go of it, a safe slot delete, callbacks that call back in,
//! a reaper whose thread runs the caller's start hook. Each runs the test
//! guest (`guest/guest.S`) on the real kernel.
//!
//! Needs the `vm-memory` feature (regions are the safe way to make a slot).

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use kvm_dirty_shim::{
    BoardFlags, DirtyTracker, ErrorKind, MemslotFlags, Mode, ReaperConfig, SlotId, SyncStage,
    VcpuTracker,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion};

#[path = "../guest/boot.rs"]
mod boot;

const PAGE: u64 = 4096;
const CODE_PAGES: u64 = 8;
/// The guest's test region: 256 pages at 1 MiB.
const DATA_GPA: u64 = 0x10_0000;
const DATA_PAGES: u64 = 256;
/// Stores per batch (each of which pushes a ring entry on this host,
/// which emulates guest kernel code): two batches fill a 4096-entry ring.
const STORES: u32 = 2000;
const RING: u32 = 4096;

type Region = GuestRegionMmap<()>;

fn region(gpa: u64, pages: u64) -> Arc<Region> {
    let m = MmapRegion::<()>::new((pages * PAGE) as usize).expect("mmap");
    Arc::new(GuestRegionMmap::new(m, GuestAddress(gpa)).expect("region"))
}

/// A VM with the guest loaded: its code slot (0) and its logged data slot
/// (1), both made from regions, and vCPU 0 created through the tracker.
struct Guest {
    vm: VmFd,
    tracker: DirtyTracker,
    code: Arc<Region>,
    data: Arc<Region>,
    fd: VcpuFd,
    vcpu: VcpuTracker,
}

fn guest(ring: bool) -> Guest {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let tracker = DirtyTracker::adopt(&vm).expect("adopt");
    if ring {
        tracker
            .enable_dirty_ring(RING)
            .expect("the ring (this host has one)");
    }
    tracker.board_init(BoardFlags::empty()).unwrap();
    let code = region(0, CODE_PAGES);
    let data = region(DATA_GPA, DATA_PAGES);
    code.write_slice(boot::GUEST, MemoryRegionAddress(0))
        .unwrap();
    let mailbox = PAGE;
    for (off, v) in [
        (0, 1u32),
        (4, STORES),
        (8, 7),
        (12, (DATA_PAGES - 1) as u32),
        (16, DATA_GPA as u32),
        (20, 12),
    ] {
        code.write_obj(v, MemoryRegionAddress(mailbox + off))
            .unwrap();
    }
    tracker
        .update_memslot_region(SlotId::new(0), Arc::clone(&code), MemslotFlags::empty())
        .unwrap();
    tracker
        .update_memslot_region(
            SlotId::new(1),
            Arc::clone(&data),
            MemslotFlags::LOG_DIRTY_PAGES,
        )
        .unwrap();
    let (fd, vcpu) = tracker.create_vcpu(0).expect("vCPU 0");
    boot::setup_regs(&fd, mailbox, PAGE * CODE_PAGES);
    let mode = tracker.mode();
    assert_eq!(mode.has_ring(), ring, "{mode:?}");
    Guest {
        vm,
        tracker,
        code,
        data,
        fd,
        vcpu,
    }
}

/// What `batches` batches of the guest met: batches completed, ring-full
/// exits, and writes to memory no slot maps (MMIO exits), at most `cap`
/// exits in all.
#[derive(Debug, Default, PartialEq)]
struct Run {
    batches: u32,
    ring_full: u32,
    mmio: u32,
}

fn run(fd: &mut VcpuFd, vcpu: Option<&VcpuTracker>, batches: u32) -> Run {
    let mut r = Run::default();
    for _ in 0..batches * 4 + 16 {
        if r.batches == batches {
            break;
        }
        match fd.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, _) => r.batches += 1,
            VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..) => r.mmio += 1,
            VcpuExit::Unsupported(reason) if reason == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                r.ring_full += 1;
                if let Some(v) = vcpu {
                    v.handle_exit(reason).expect("reap");
                }
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    r
}

/// The LCG state the guest keeps in its mailbox: it changes every batch.
fn lcg(code: &Region) -> u32 {
    code.read_obj(MemoryRegionAddress(PAGE + 8)).unwrap()
}

fn the_guest_runs_on_after_the_tracker_is_dropped(ring: bool) {
    let g = guest(ring);
    let (mut fd, vcpu) = (g.fd, g.vcpu);
    // Tracking works while the tracker lives.
    let first = run(&mut fd, Some(&vcpu), 2);
    assert_eq!(first.batches, 2, "{first:?}");
    let mut n = 0;
    g.tracker
        .sync_memslot_each(SlotId::new(1), SyncStage::Live, |_| n += 1)
        .unwrap();
    assert!(n > 0, "the guest's stores were reported");
    // The migration ends: the tracker goes, the vCPU's handle with it.
    drop(vcpu);
    drop(g.tracker);
    let before = lcg(&g.code);
    // 20 batches of 2,000 stores: ten times what fills the ring, had
    // logging stayed on with nobody left to reap.
    let after = run(&mut fd, None, 20);
    assert_eq!(
        after,
        Run {
            batches: 20,
            ..Run::default()
        },
        "the guest runs on, with no ring-full exit"
    );
    assert_ne!(lcg(&g.code), before, "the guest made progress");
    if !ring {
        // Logging is off: the kernel has no dirty bitmap for the slot.
        let e =
            g.vm.get_dirty_log(1, (DATA_PAGES * PAGE) as usize)
                .unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT, "{e}");
    }
    drop(g.vm);
}

#[test]
fn the_guest_runs_on_after_the_tracker_is_dropped_with_the_ring() {
    the_guest_runs_on_after_the_tracker_is_dropped(true);
}

#[test]
fn a_vm_is_adopted_again_unless_its_ring_is_enabled() {
    for ring in [true, false] {
        let g = guest(ring);
        let (mut fd, vcpu) = (g.fd, g.vcpu);
        assert_eq!(run(&mut fd, Some(&vcpu), 1).batches, 1);
        drop((vcpu, g.tracker));
        match DirtyTracker::adopt(&g.vm) {
            Ok(t) => {
                assert!(!ring, "a ring VM was adopted again");
                t.board_init(BoardFlags::empty()).unwrap();
                t.update_memslot_region(
                    SlotId::new(1),
                    Arc::clone(&g.data),
                    MemslotFlags::LOG_DIRTY_PAGES,
                )
                .unwrap();
                assert_eq!(run(&mut fd, None, 1).batches, 1);
                let mut n = 0;
                t.sync_memslot_each(SlotId::new(1), SyncStage::Live, |_| n += 1)
                    .unwrap();
                assert!(n > 0, "the new tracker tracks");
            }
            Err(e) => {
                assert!(ring, "{e}");
                assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
                assert!(e.message().contains("ring is enabled already"), "{e}");
            }
        }
    }
}

#[test]
fn the_guest_runs_on_after_the_tracker_is_dropped_in_bitmap_mode() {
    the_guest_runs_on_after_the_tracker_is_dropped(false);
}

#[test]
fn release_ends_tracking_and_a_vcpu_handle_still_reaps() {
    let g = guest(true);
    let (mut fd, vcpu) = (g.fd, g.vcpu);
    g.tracker.enable_reaper(&ReaperConfig::default()).unwrap();
    assert_eq!(run(&mut fd, Some(&vcpu), 2).batches, 2);
    g.tracker.release().expect("release");
    let after = run(&mut fd, Some(&vcpu), 20);
    assert_eq!((after.batches, after.ring_full), (20, 0), "{after:?}");
    drop(vcpu);
}

/// Large allocations the kernel could reach if a slot still mapped freed
/// memory: each filled with a pattern the guest never stores.
fn allocations() -> Vec<Vec<u8>> {
    (0..32)
        .map(|_| vec![0xa5u8; (DATA_PAGES * PAGE) as usize])
        .collect()
}

fn untouched(v: &[Vec<u8>]) -> usize {
    v.iter().flatten().filter(|&&b| b != 0xa5).count()
}

#[test]
fn memory_a_dropped_tracker_kept_is_never_reached_after_it_is_freed() {
    let g = guest(true);
    let (mut fd, vcpu, data) = (g.fd, g.vcpu, g.data);
    assert_eq!(run(&mut fd, Some(&vcpu), 1).batches, 1);
    let weak = Arc::downgrade(&data);
    // The VMM lets go of everything but the VM and vCPU fds: the kernel VM
    // lives on, and so does its slot 1.
    drop((vcpu, g.tracker, data));
    assert!(
        weak.upgrade().is_some(),
        "the region a slot still maps stays mapped"
    );
    let fresh = allocations();
    let r = run(&mut fd, None, 10);
    assert_eq!((r.batches, r.mmio), (10, 0), "{r:?}");
    assert_eq!(untouched(&fresh), 0, "the guest wrote into freed memory");
    drop(g.vm);
}

#[test]
fn a_deleted_slot_gives_its_region_back_and_the_guest_no_longer_reaches_it() {
    let g = guest(true);
    let (mut fd, vcpu, data) = (g.fd, g.vcpu, g.data);
    assert_eq!(run(&mut fd, Some(&vcpu), 1).batches, 1);
    assert_eq!(Arc::strong_count(&data), 2, "the tracker keeps the region");
    g.tracker.delete_memslot(SlotId::new(1)).unwrap();
    assert_eq!(Arc::strong_count(&data), 1, "deleted: the region is ours");
    let e = g.tracker.delete_memslot(SlotId::new(1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    drop(data);
    let fresh = allocations();
    // The guest's next store, to the deleted range, is an MMIO exit now.
    assert!(matches!(fd.run().unwrap(), VcpuExit::MmioWrite(..)));
    assert_eq!(untouched(&fresh), 0);
}

/// Runs `f` on a thread and waits for it at most 60 s: a deadlock ends
/// the test process with a message instead of hanging it (a panic would
/// unwind through drops that wait for the deadlocked locks).
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            eprintln!("a tracker call from inside a callback deadlocked (60 s)");
            std::process::abort();
        }
        Err(e) => panic!("the callback's thread panicked: {e}"),
    }
}

#[test]
fn a_callback_that_calls_back_in_gets_an_error_not_a_deadlock() {
    for ring in [true, false] {
        let g = guest(ring);
        let (mut fd, vcpu, tracker) = (g.fd, g.vcpu, Arc::new(g.tracker));
        assert_eq!(run(&mut fd, Some(&vcpu), 1).batches, 1);
        let t = Arc::clone(&tracker);
        let (pages, kinds) = bounded(move || {
            let (mut pages, mut kinds) = (0, Vec::new());
            let slot = SlotId::new(1);
            t.sync_memslot_each(slot, SyncStage::Live, |_| {
                pages += 1;
                if kinds.is_empty() {
                    kinds.push(t.reap().unwrap_err().kind());
                    let mut bm = [0u64; DATA_PAGES as usize / 64];
                    kinds.push(
                        t.sync_memslot(slot, &mut bm, SyncStage::Live)
                            .unwrap_err()
                            .kind(),
                    );
                    kinds.push(t.delete_memslot(slot).unwrap_err().kind());
                    kinds.push(t.disable_reaper().unwrap_err().kind());
                }
            })
            .unwrap();
            (pages, kinds)
        });
        assert!(pages > 0, "ring {ring}: the callback ran");
        assert_eq!(kinds, [ErrorKind::WouldDeadlock; 4], "ring {ring}");
        // The runs form, and a vCPU handle dropped inside a callback.
        assert_eq!(run(&mut fd, Some(&vcpu), 1).batches, 1);
        let t = Arc::clone(&tracker);
        let kinds = bounded(move || {
            let mut kinds = Vec::new();
            let mut vcpu = Some(vcpu);
            t.sync_memslot_runs(SlotId::new(1), SyncStage::Live, |_, _| {
                kinds.push(t.vcpu_stats(0).map(|_| ()).map_err(|e| e.kind()));
                // Stays registered (it cannot take the locks), logged.
                drop(vcpu.take());
            })
            .unwrap();
            kinds
        });
        assert_eq!(kinds.first(), Some(&Err(ErrorKind::WouldDeadlock)));
        // After the callbacks, every call works again.
        tracker.reap().unwrap();
        let mut bm = [0u64; DATA_PAGES as usize / 64];
        tracker
            .sync_memslot(SlotId::new(1), &mut bm, SyncStage::Final)
            .unwrap();
    }
}

#[test]
fn the_reaper_runs_the_start_hook_on_its_thread_and_a_failing_hook_stops_it() {
    let g = guest(true);
    let (tx, rx) = mpsc::channel();
    g.tracker
        .enable_reaper_with(&ReaperConfig::default(), move || {
            let name = std::thread::current().name().map(str::to_owned);
            tx.send(name).unwrap();
            Ok(())
        })
        .unwrap();
    assert_eq!(rx.recv().unwrap().as_deref(), Some("kds-reaper"));
    g.tracker.disable_reaper().unwrap();
    let e = g
        .tracker
        .enable_reaper_with(&ReaperConfig::default(), || {
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Kernel, "{e}");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // Not running: it can be started again.
    g.tracker.enable_reaper(&ReaperConfig::default()).unwrap();
    assert_eq!(g.tracker.mode(), Mode::Ring);
}

#[test]
fn a_region_slot_over_another_slot_is_already_exists() {
    let g = guest(false);
    let other = region(DATA_GPA, 1);
    let e = g
        .tracker
        .update_memslot_region(SlotId::new(5), other, MemslotFlags::empty())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    assert!(!e.to_string().contains("(-E"), "the message alone: {e}");
}

/// The voluntary context switches of thread `tid` of this process: one per
/// sleep it woke from.
fn switches(tid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("voluntary_ctxt_switches:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_reaper_sleeps_while_no_memslot_logs() {
    let g = guest(true);
    let logging = |on: bool| {
        let flags = if on {
            MemslotFlags::LOG_DIRTY_PAGES
        } else {
            MemslotFlags::empty()
        };
        g.tracker
            .update_memslot_region(SlotId::new(1), Arc::clone(&g.data), flags)
            .unwrap();
    };
    logging(false);
    // A check every millisecond at most while a slot logs.
    let cfg = ReaperConfig::default()
        .with_min_interval(Duration::from_micros(100))
        .with_max_interval(Duration::from_millis(1));
    let (tx, rx) = mpsc::channel();
    g.tracker
        .enable_reaper_with(&cfg, move || {
            // "<pid>/task/<tid>"
            let me = std::fs::read_link("/proc/thread-self")?;
            tx.send(me.file_name().unwrap().to_string_lossy().into_owned())
                .unwrap();
            Ok(())
        })
        .unwrap();
    let tid = rx.recv().unwrap();
    let wakes_in = |window: Duration| {
        let before = switches(&tid);
        std::thread::sleep(window);
        switches(&tid) - before
    };
    let window = Duration::from_millis(200);
    // A sleep that takes no wake-up at all: at most the start's own.
    let idle = wakes_in(window);
    assert!(
        idle <= 2,
        "{idle} wake-ups in {window:?} with no slot logging"
    );
    // Logging: a check at least every millisecond, so the count shows them.
    logging(true);
    let busy = wakes_in(window);
    assert!(
        busy >= 20,
        "{busy} wake-ups in {window:?} with a slot logging"
    );
    // Logging off: the check after it finds no slot logging and sleeps.
    logging(false);
    std::thread::sleep(Duration::from_millis(20));
    let after = wakes_in(window);
    assert!(
        after <= 2,
        "{after} wake-ups in {window:?} after logging stopped"
    );
    g.tracker.disable_reaper().unwrap();
}
