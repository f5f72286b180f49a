//! Benchmarks (figures printed, never asserted):
//! 1. harvest cost per ring entry (ring reads + publishing into the shim's
//!    bitmaps) on rings filled by the real guest, beside the kernel's
//!    `KVM_RESET_DIRTY_RINGS` cost per entry: 1k, 4k and 16k entries;
//! 2. `kds_sync_slot` on a 16 GiB slot (4M pages): the whole call with
//!    nothing dirty, and the move of the bits when the shim holds all 4M;
//! 3. reapers: 2 vCPUs dirtying as fast as they can for 10 s on 4k-entry
//!    rings with (a) no reaper thread, (b) a fixed 1 s reaper like QEMU's,
//!    (c) the adaptive reaper: ring-full exits, overflows, pages per second
//!    and loss (checked after every guest round).
//!
//!     cargo run --release --example bench [harvest|sync|reapers]...

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use kvm_dirty_shim::bitmap::AtomicBitmap;
use kvm_dirty_shim::*;

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn harvest(entries: u32) {
    let vm = TestVm::new(Some(entries));
    let pages = 65536u64;
    // Fill about half the ring per round: no ring-full exit, so every entry
    // is harvested by the timed kds_reap below.
    let (_c, mut v) = vm.guest(pages, entries / 2, 3);
    let rounds = (2_000_000 / entries).clamp(20, 400);
    let (mut harvest_ns, mut reset_ns, mut n, mut full) = (0u64, 0u64, 0u64, 0u64);
    for it in 1..=rounds {
        vm.set_iteration(0, it);
        full += v.run_round(vm.h).ring_full_exits;
        let before = vm.stats();
        let got = kds_reap(vm.vm());
        assert!(got >= 0);
        let after = vm.stats();
        harvest_ns += after.harvest_ns - before.harvest_ns;
        reset_ns += after.reset_ns - before.reset_ns;
        n += got as u64;
    }
    println!(
        "harvest {entries:>6}-entry ring, 1 vCPU: {n:>8} entries in {rounds} reaps: \
         shim {:>6.2} ns/entry, kernel KVM_RESET_DIRTY_RINGS {:>7.2} ns/entry (shim share {:.1}%){}",
        harvest_ns as f64 / n as f64,
        reset_ns as f64 / n as f64,
        100.0 * harvest_ns as f64 / (harvest_ns + reset_ns) as f64,
        if full > 0 {
            format!(" [{full} ring-full exits]")
        } else {
            String::new()
        }
    );
}

fn sync_16g() {
    let pages: u64 = 4 << 20; // 16 GiB of 4 KiB pages
    let vm = TestVm::new(Some(4096));
    let mem = Mem::new((pages * PAGE) as usize); // MAP_NORESERVE: never touched
    vm.set_slot(1, 0x1_0000_0000, &mem, KDS_MEM_LOG_DIRTY_PAGES);
    let mut out = vec![0u64; (pages / 64) as usize];
    let reps = 50;
    let t = Instant::now();
    for _ in 0..reps {
        assert_eq!(kds_sync_slot(vm.vm(), 1, out.as_mut_ptr(), pages, 0), 0);
    }
    println!(
        "kds_sync_slot 16 GiB slot (4M pages), ring mode, nothing dirty: {:.3} ms per call",
        t.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
    );
    let bm = AtomicBitmap::new(pages);
    let mut total = 0.0;
    for _ in 0..reps {
        bm.set_all();
        out.fill(0);
        let t = Instant::now();
        let n = bm.drain_into(&mut out, None);
        total += t.elapsed().as_secs_f64();
        assert_eq!(n, pages);
    }
    println!(
        "bits moved by kds_sync_slot's drain, 16 GiB slot, all 4M pages dirty: {:.3} ms per sync",
        total * 1e3 / f64::from(reps)
    );
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ReaperKind {
    None,
    Fixed1s,
    Adaptive,
}

/// 2 vCPU threads, each storing `STORES` times a round over its own 256 MiB
/// slot, for `secs` seconds; the no-loss check after every round.
fn reapers(kind: ReaperKind, secs: u64) {
    const PAGES: u64 = 65536;
    const STORES: u32 = 200_000;
    let vm = TestVm::new(Some(4096));
    let mut vcpus = Vec::new();
    for id in 0..2u32 {
        let c = Checker::new(1 + id, PAGES);
        let gpa = TEST_GPA + u64::from(id) * PAGES * PAGE;
        vm.set_slot(1 + id, gpa, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
        let v = vm.vcpu(id);
        vm.mailbox(id, gpa, PAGES, STORES, 1000 + id);
        vcpus.push((c, v));
    }
    if kind == ReaperKind::Adaptive {
        assert_eq!(kds_reaper_start(vm.vm(), std::ptr::null()), 0);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let t = Instant::now();
    let mut run = || {
        std::thread::scope(|sc| {
            let hs: Vec<_> = vcpus
                .iter_mut()
                .map(|(c, v)| {
                    let vm = &vm;
                    sc.spawn(move || {
                        let (mut full, mut lost, mut rounds, mut wedged) = (0, 0, 0u32, false);
                        while Instant::now() < deadline && !wedged {
                            rounds += 1;
                            vm.set_iteration(v.index, rounds);
                            let r = v.run_round(vm.h);
                            full += r.ring_full_exits;
                            wedged = r.wedged;
                            lost += c.check(vm.h, 0).2;
                        }
                        (full, lost, rounds, c.changed, wedged)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0, 0, 0, false), |a, b| {
                    (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3, a.4 | b.4)
                })
        })
    };
    let (full, lost, rounds, changed, wedged) = match kind {
        ReaperKind::Fixed1s => with_reaper(vm.h, Duration::from_secs(1), run).0,
        _ => run(),
    };
    let el = t.elapsed().as_secs_f64();
    assert_eq!(kds_reaper_stop(vm.vm()), 0);
    let s = vm.stats();
    println!(
        "reaper {:<9} 2 vCPUs, 4096-entry rings, {el:.1} s: {full:>6} ring-full exits, \
         {} overflows, {} wedges{}, {:>7.0} entries harvested/s, {:>7.0} changed pages \
         verified/s ({rounds} rounds), lost {lost}",
        match kind {
            ReaperKind::None => "none",
            ReaperKind::Fixed1s => "fixed 1s",
            ReaperKind::Adaptive => "adaptive",
        },
        s.ring_overflows,
        s.ring_wedges,
        if wedged { " (a ring gave up)" } else { "" },
        s.entries_reaped as f64 / el,
        changed as f64 / el,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    println!(
        "kvm-dirty-shim bench on Linux {} ({}), {} CPUs",
        kernel(),
        cpu(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("harvest") {
        for e in [1024, 4096, 16384] {
            harvest(e);
        }
    }
    if want("sync") {
        sync_16g();
    }
    if want("reapers") {
        for k in [ReaperKind::None, ReaperKind::Fixed1s, ReaperKind::Adaptive] {
            reapers(k, 10);
        }
    }
}
