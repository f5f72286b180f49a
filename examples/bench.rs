//! Benchmarks (figures printed, never asserted):
//! 1. harvest cost per ring entry (ring reads + publishing into the shim's
//!    bitmaps) on rings filled by the real guest, beside the kernel's
//!    `KVM_RESET_DIRTY_RINGS` cost per entry: 1k, 4k and 16k entries;
//! 2. `kds_memslot_sync` on a 16 GiB slot (4M pages): the whole call with
//!    nothing dirty, and the move of the bits when the shim holds all 4M;
//! 3. reapers: 2 vCPUs dirtying as fast as they can for 10 s on 4k-entry
//!    rings with (a) no reaper thread, (b) a fixed 1 s reaper like QEMU's,
//!    (c) the adaptive reaper: ring-full exits, overflows, pages per second
//!    and loss (checked after every guest round).
//!
//! 4. `kds_memslot_sync` throughput in every mode (ring: bits the shim holds;
//!    bitmap: `KVM_GET_DIRTY_LOG`, with and without manual protect's
//!    `KVM_CLEAR_DIRTY_LOG`) on 1, 4 and 16 GiB slots with 0.1, 1 and 10 %
//!    of the pages dirtied by the guest;
//! 5. the cost of one migration round (reap + sync of the slot) as guest
//!    memory grows from 64 MiB to 16 GiB at a fixed 4096 guest stores per
//!    round (about 3600 distinct pages), ring against bitmap: printed, and written to
//!    doc/round-cost.csv (tools/plot draws doc/round-cost.png from it).
//!
//! The plain-C comparison of the harvest is c-tests/bench_harvest.c.
//! Guest memory is sparse anonymous memory (MAP_NORESERVE): only the pages
//! the guest dirties become resident. The 32-bit guest reaches the first
//! 2 GiB of a slot, so dirty pages lie there.
//!
//!     cargo run --release --features capi --example bench [harvest|sync|reapers|syncmodes|rounds]...

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use kvm_dirty_shim::capi::*;

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
        let got = c!(kds_reap(vm.vm()));
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
        assert_eq!(
            c!(kds_memslot_sync(vm.vm(), 1, out.as_mut_ptr(), pages, 0)),
            0
        );
    }
    println!(
        "kds_memslot_sync 16 GiB slot (4M pages), ring mode, nothing dirty: {:.3} ms per call",
        t.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
    );
    let mut total = 0.0;
    for _ in 0..reps {
        out.fill(0);
        let (n, took) = kvm_dirty_shim::bench::drain_full(pages, &mut out);
        total += took.as_secs_f64();
        assert_eq!(n, pages);
    }
    println!(
        "bits moved by kds_memslot_sync's drain, 16 GiB slot, all 4M pages dirty: {:.3} ms per sync",
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
        vcpus.push(vm.guest_on(id, PAGES, STORES, 1000 + id));
    }
    if kind == ReaperKind::Adaptive {
        assert_eq!(
            c!(kds_reaper_enable(
                vm.vm(),
                std::ptr::null(),
                size_of::<KdsReaperConfig>()
            )),
            0
        );
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
    assert_eq!(c!(kds_reaper_disable(vm.vm())), 0);
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

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ring,
    BitmapClear,
    Bitmap,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ring => "ring (shim's bits)",
            Mode::BitmapClear => "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG",
            Mode::Bitmap => "KVM_GET_DIRTY_LOG",
        }
    }
}

/// A VM in `mode` with one dirty-logged slot 1 of `bytes` at TEST_GPA and
/// vCPU 0 pointed at it.
fn big_vm(mode: Mode, bytes: u64) -> (TestVm, Mem, common::Vcpu) {
    let vm = match mode {
        Mode::Ring => TestVm::new(Some(65536)),
        m => TestVm::new_with(None, |h| {
            assert_eq!(c!(kds_manual_protect_set(h, m == Mode::BitmapClear)), 0)
        }),
    };
    let mem = Mem::new(bytes as usize);
    vm.set_slot(1, TEST_GPA, &mem, KDS_MEM_LOG_DIRTY_PAGES);
    let v = vm.vcpu(0);
    (vm, mem, v)
}

/// Has the guest store `k` times to pages of slot 1 drawn by its LCG from
/// a region of about 4k pages (at most the 2 GiB it reaches): most stores
/// hit distinct pages; the benchmarks print how many pages were reported.
fn dirty(vm: &TestVm, v: &mut common::Vcpu, k: u64, round: u32) {
    let region = (4 * k).next_power_of_two().clamp(2, 1 << 19);
    vm.mailbox(0, TEST_GPA, region, k as u32, 12345);
    vm.set_iteration(0, round);
    assert!(!v.run_round(vm.h).wedged);
}

/// One sync of slot 1 (ring mode: after a reap, so that only the drain
/// is timed): (pages reported, seconds).
fn timed_sync(vm: &TestVm, out: &mut [u64], pages: u64) -> (u64, f64) {
    if c!(kds_vm_mode(vm.vm())) != KdsMode::KDS_MODE_BITMAP as i32 {
        assert!(c!(kds_reap(vm.vm())) >= 0);
    }
    let t = Instant::now();
    let n = c!(kds_memslot_sync(vm.vm(), 1, out.as_mut_ptr(), pages, 0));
    let el = t.elapsed().as_secs_f64();
    assert!(n >= 0, "{}", last_error());
    (n as u64, el)
}

fn sync_modes() {
    for mode in [Mode::Ring, Mode::BitmapClear, Mode::Bitmap] {
        for gib in [1u64, 4, 16] {
            let pages = (gib << 30) / PAGE;
            let (vm, _mem, mut v) = big_vm(mode, gib << 30);
            let mut out = vec![0u64; pages.div_ceil(64) as usize];
            timed_sync(&vm, &mut out, pages); // first call: allocations, faults
            for pct in [0.1f64, 1.0, 10.0] {
                let k = (pages as f64 * pct / 100.0) as u64;
                let (mut n, mut el) = (0, 0.0);
                for r in 1..=3 {
                    dirty(&vm, &mut v, k, r);
                    out.fill(0);
                    let (a, b) = timed_sync(&vm, &mut out, pages);
                    n += a;
                    el += b;
                }
                println!(
                    "sync {:<40} {gib:>2} GiB slot, {pct:>4}% stores ({:>6} pages reported): \
                     {:>7.3} ms per kds_memslot_sync, {:>7.1} M dirty bits/s, {:>6.1} G bits \
                     scanned/s",
                    mode.name(),
                    n / 3,
                    el / 3.0 * 1e3,
                    n as f64 / el / 1e6,
                    pages as f64 * 3.0 / el / 1e9
                );
            }
        }
    }
}

/// Median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rounds() {
    const DIRTY: u64 = 4096;
    let sizes: Vec<u64> = (0..9).map(|i| (64u64 << 20) << i).collect();
    let mut rows = Vec::new();
    for &bytes in &sizes {
        let pages = bytes / PAGE;
        let (mut cost, mut pages_reported) = ([0.0; 2], [0u64; 2]);
        for (j, mode) in [Mode::Ring, Mode::BitmapClear].into_iter().enumerate() {
            let (vm, _mem, mut v) = big_vm(mode, bytes);
            let mut out = vec![0u64; pages.div_ceil(64) as usize];
            let (mut t, mut reported) = (Vec::new(), 0);
            for r in 1..=7 {
                dirty(&vm, &mut v, DIRTY, r);
                let t0 = Instant::now();
                if mode == Mode::Ring {
                    assert!(c!(kds_reap(vm.vm())) >= 0);
                }
                let n = c!(kds_memslot_sync(vm.vm(), 1, out.as_mut_ptr(), pages, 0));
                t.push(t0.elapsed().as_secs_f64() * 1e3);
                assert!(n > 0, "{n}: {}", last_error());
                reported += n as u64;
            }
            cost[j] = median(t);
            pages_reported[j] = reported / 7;
        }
        println!(
            "migration round, {DIRTY} stores, guest {:>5} MiB: ring (kds_reap + \
             kds_memslot_sync) {:>7.3} ms for {} pages, bitmap (kds_memslot_sync: \
             KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG) {:>7.3} ms for {} pages",
            bytes >> 20,
            cost[0],
            pages_reported[0],
            cost[1],
            pages_reported[1]
        );
        rows.push((bytes, cost[0], cost[1]));
    }
    let _ = std::fs::create_dir_all("doc");
    let mut csv = format!(
        "# kvm-dirty-shim bench rounds: Linux {}, {}; median of 7 rounds of {DIRTY} guest stores to random pages\n\
         guest_bytes,ring_ms,bitmap_ms\n",
        kernel(),
        cpu()
    );
    for (b, r, m) in &rows {
        csv += &format!("{b},{r:.4},{m:.4}\n");
    }
    std::fs::write("doc/round-cost.csv", csv).expect("doc/round-cost.csv");
    println!(
        "wrote doc/round-cost.csv; draw doc/round-cost.png with\n  cargo run --release \
         --manifest-path tools/plot/Cargo.toml -- round-cost doc/round-cost.csv doc/round-cost.png"
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
    if want("syncmodes") {
        sync_modes();
    }
    if want("rounds") {
        rounds();
    }
    if want("reapers") {
        for k in [ReaperKind::None, ReaperKind::Fixed1s, ReaperKind::Adaptive] {
            reapers(k, 10);
        }
    }
}
