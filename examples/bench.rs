//! Benchmarks (figures printed, never asserted):
//! 1. harvest cost per ring entry (ring reads + publishing into the shim's
//!    bitmaps) on rings filled by the real guest, beside the kernel's
//!    `KVM_RESET_DIRTY_RINGS` cost per entry: 1k, 4k and 16k entries;
//! 2. `kds_sync_slot` on a 16 GiB slot (4M pages): the whole call with
//!    nothing dirty, and the move of the bits when the shim holds all 4M.
//!
//!     cargo run --release --example bench

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

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

fn main() {
    println!(
        "kvm-dirty-shim bench on Linux {} ({}), {} CPUs",
        kernel(),
        cpu(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for e in [1024, 4096, 16384] {
        harvest(e);
    }
    sync_16g();
}
