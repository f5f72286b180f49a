//! The main job: boot the tiny x86 guest on /dev/kvm, let it dirty memory,
//! and track its dirty pages through the shim's C ABI for a few seconds in
//! ring mode, then in bitmap mode. Each line is one migration-style round:
//! pages the guest changed, pages the shim reported, loss (must be 0),
//! ring-full exits, and where reap time went.
//!
//!     cargo run --release --features capi --example demo [seconds-per-mode]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use kvm_dirty_shim::capi::*;

const PAGES: u64 = 16384; // 64 MiB test slot
const STORES: u32 = 6000; // stores per guest round
const RING: u32 = 4096;

fn run(mode: &str, ring: Option<u32>, secs: f64) -> u64 {
    let vm = TestVm::new(ring);
    let (mut c, mut v) = vm.guest(PAGES, STORES, 1);
    println!(
        "\n{mode} mode (kds_vm_mode = {}), {PAGES} pages, {STORES} stores per guest round{}",
        c!(kds_vm_mode(vm.vm())),
        ring.map(|r| format!(", {r}-entry ring"))
            .unwrap_or_default()
    );
    println!(
        "{:>5} {:>8} {:>9} {:>9} {:>5} {:>9} {:>10} {:>10} {:>9}",
        "round",
        "guest_rd",
        "changed",
        "reported",
        "lost",
        "ringfull",
        "harvest_us",
        "reset_us",
        "overflows"
    );
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut it, mut round, mut total_lost) = (0u32, 0u32, 0u64);
    let mut wedged = false;
    while Instant::now() < end && !wedged {
        round += 1;
        let before = vm.stats();
        let round_end = Instant::now() + Duration::from_millis(250);
        let (mut guest_rounds, mut full) = (0, 0);
        while Instant::now() < round_end {
            it += 1;
            vm.set_iteration(0, it);
            let r = v.run_round(vm.h);
            guest_rounds += 1;
            full += r.ring_full_exits;
            if r.wedged {
                wedged = true;
                break;
            }
            // Between guest rounds, reap as a VMM's reaper thread would.
            assert!(c!(kds_reap(vm.vm())) >= 0, "kds_reap: {}", last_error());
        }
        let (changed, reported, lost) = c.check(vm.h, 0);
        total_lost += lost;
        let s = vm.stats();
        println!(
            "{round:>5} {guest_rounds:>8} {changed:>9} {reported:>9} {lost:>5} {full:>9} {:>10} {:>10} {:>9}",
            (s.harvest_ns - before.harvest_ns) / 1000,
            (s.reset_ns - before.reset_ns) / 1000,
            s.ring_overflows - before.ring_overflows,
        );
    }
    if wedged {
        println!(
            "{mode}: the kernel overran the ring so far that it wedged; kds_vcpu_reap \
             reported it (-EOVERFLOW) and marked every page dirty: nothing lost, ring mode ends"
        );
    }
    let s = vm.stats();
    println!(
        "{mode}: {} pages changed, {} reported, {total_lost} lost; stats: {} entries reaped, \
         {} resets, {} ring-full reaps, {} overflows, {} KVM_GET_DIRTY_LOG",
        c.changed,
        c.reported,
        s.entries_reaped,
        s.ring_resets,
        s.ring_full_reaps,
        s.ring_overflows,
        s.bitmap_syncs
    );
    total_lost
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3.0);
    println!("kvm-dirty-shim demo: ABI version {}", kds_abi_version());
    let lost = run("ring", Some(RING), secs) + run("bitmap", None, secs);
    if lost != 0 {
        eprintln!("LOSS: {lost} pages");
        std::process::exit(1);
    }
    println!("\nzero pages lost");
}
