//! Stress on the real kernel, bounded in time, fixed seeds: 2 vCPU threads
//! dirtying (each checked for loss after every round), a reaper thread, a
//! thread syncing every slot, a thread adding, resizing and deleting other
//! memslots, and a thread toggling dirty logging on another slot. Then
//! `kds_vm_free` must give back every fd and every ring mapping.
//!
//! `KDS_STRESS_SECS` sets the duration (default 20; the figure is
//! `KDS_STRESS_SECS=60 cargo test --release --test stress`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kvm_dirty_shim::capi::*;
use parking_lot::Mutex;

const RING: u32 = 4096;
const PAGES: u64 = 8192;
/// Rounds each vCPU runs at least: 6000 stores on 8192 pages change about
/// 4,200 pages a round.
const MIN_ROUNDS: u32 = 10;

/// `r` is 0 (or positive) or one of `allowed`.
#[track_caller]
fn ok_or(r: i64, allowed: &[i32], what: &str) {
    assert!(
        r >= 0 || allowed.iter().any(|&e| r == -i64::from(e)),
        "{what}: {r}: {}",
        last_error()
    );
}

#[test]
fn everything_at_once_loses_nothing_and_leaks_nothing() {
    let secs: u64 = std::env::var("KDS_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (fds0, maps0) = (fds(), vcpu_maps());
    let verified = AtomicU64::new(0);
    let rounds = AtomicU64::new(0);
    let churned = AtomicU64::new(0);
    let toggles = AtomicU64::new(0);
    let stats;
    {
        let vm = TestVm::new(Some(RING));
        let mut vcpus = Vec::new();
        let mut shared = Vec::new();
        for id in 0..2u32 {
            let (c, v) = vm.guest_on(id, PAGES, 6000, 77 + id);
            // What the sync thread reported for this slot, not yet checked.
            let s = Arc::new(Mutex::new(vec![0u64; (PAGES / 64) as usize]));
            shared.push(s.clone());
            vcpus.push((c, v, s));
        }
        let toggled = Mem::new(4 << 20);
        vm.set_slot(3, 0x2000_0000, &toggled, KDS_MEM_LOG_DIRTY_PAGES);
        let stop = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(secs);
        std::thread::scope(|sc| {
            let (vm, stop) = (&vm, &stop);
            for (mut c, mut v, s) in vcpus {
                let (verified, rounds) = (&verified, &rounds);
                sc.spawn(move || {
                    // However this thread ends (a failed check included),
                    // the others stop.
                    let _stop = StopOnDrop(stop);
                    // At least MIN_ROUNDS rounds however slow the machine
                    // (the amount verified never rests on the clock), and
                    // more until the deadline.
                    let mut it = 0;
                    while it < MIN_ROUNDS || Instant::now() < deadline {
                        it += 1;
                        vm.set_iteration(v.index, it);
                        assert!(!v.run_round(vm.h).wedged, "vCPU {} wedged", v.index);
                        let mut sh = s.lock();
                        let n = c!(kds_memslot_sync(vm.vm(), c.slot, sh.as_mut_ptr(), PAGES, 0));
                        ok_or(n, &[], "kds_memslot_sync (checker)");
                        c.bitmap.copy_from_slice(&sh);
                        sh.fill(0);
                        drop(sh);
                        let (changed, _, lost) = c.compare(n as u64);
                        assert_eq!(
                            lost, 0,
                            "vCPU {} round {it}: lost {lost} of {changed}",
                            v.index
                        );
                        verified.fetch_add(changed, Ordering::Relaxed);
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            // The reaper.
            sc.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    ok_or(c!(kds_reap(vm.vm())), &[], "kds_reap");
                    std::thread::sleep(Duration::from_micros(500));
                }
            });
            // Syncs every slot: the verified ones into the shared bitmaps,
            // the others into scratch (they come and go: ENOENT).
            sc.spawn(move || {
                let mut scratch = vec![0u64; 1024];
                while !stop.load(Ordering::Relaxed) {
                    for (i, s) in shared.iter().enumerate() {
                        let mut sh = s.lock();
                        let n = c!(kds_memslot_sync(
                            vm.vm(),
                            1 + i as u32,
                            sh.as_mut_ptr(),
                            PAGES,
                            0
                        ));
                        ok_or(n, &[], "kds_memslot_sync (sync thread)");
                    }
                    for slot in [3, 10, 11, 12, 13] {
                        let n = c!(kds_memslot_sync(
                            vm.vm(),
                            slot,
                            scratch.as_mut_ptr(),
                            65536,
                            0
                        ));
                        ok_or(n, &[libc::ENOENT], "kds_memslot_sync (other slots)");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            // Memslot churn on slots 10..13: create, resize, delete.
            let churned = &churned;
            sc.spawn(move || {
                let mut mems: Vec<Option<Mem>> = (0..4).map(|_| None).collect();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let i = (k % 4) as usize;
                    let slot = 10 + i as u32;
                    let gpa = 0x4000_0000 + i as u64 * (16 << 20);
                    let (m, old) = match mems[i].take() {
                        None => (Mem::new(1 << 20), None),
                        // Resize to 2 MiB: the old memory stays mapped
                        // until the slot no longer names it.
                        Some(old) if old.len == 1 << 20 => (Mem::new(2 << 20), Some(old)),
                        Some(old) => {
                            let del = KdsMemslot {
                                slot,
                                ..KdsMemslot::default()
                            };
                            ok_or(
                                c!(kds_memslot_update(vm.vm(), &del, size_of::<KdsMemslot>()))
                                    .into(),
                                &[],
                                "delete",
                            );
                            drop(old);
                            churned.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let s = KdsMemslot {
                        slot,
                        flags: if k.is_multiple_of(3) {
                            0
                        } else {
                            KDS_MEM_LOG_DIRTY_PAGES
                        },
                        guest_phys_addr: gpa,
                        memory_size: m.len as u64,
                        userspace_addr: m.addr(),
                    };
                    ok_or(
                        c!(kds_memslot_update(vm.vm(), &s, size_of::<KdsMemslot>())).into(),
                        &[],
                        "create/resize",
                    );
                    drop(old);
                    mems[i] = Some(m);
                    churned.fetch_add(1, Ordering::Relaxed);
                }
                for (i, m) in mems.iter().enumerate() {
                    if m.is_some() {
                        let del = KdsMemslot {
                            slot: 10 + i as u32,
                            ..KdsMemslot::default()
                        };
                        ok_or(
                            c!(kds_memslot_update(vm.vm(), &del, size_of::<KdsMemslot>())).into(),
                            &[],
                            "delete",
                        );
                    }
                }
            });
            // Dirty logging on and off on slot 3.
            let (toggles, toggled) = (&toggles, &toggled);
            sc.spawn(move || {
                let mut on = true;
                while !stop.load(Ordering::Relaxed) {
                    on = !on;
                    let s = KdsMemslot {
                        slot: 3,
                        flags: if on { KDS_MEM_LOG_DIRTY_PAGES } else { 0 },
                        guest_phys_addr: 0x2000_0000,
                        memory_size: toggled.len as u64,
                        userspace_addr: toggled.addr(),
                    };
                    ok_or(
                        c!(kds_memslot_update(vm.vm(), &s, size_of::<KdsMemslot>())).into(),
                        &[],
                        "toggle",
                    );
                    toggles.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        });
        stats = vm.stats();
    }
    assert_eq!(fds(), fds0, "fds leaked");
    assert_eq!(vcpu_maps(), maps0, "vCPU mappings leaked");
    let v = verified.load(Ordering::Relaxed);
    let r = rounds.load(Ordering::Relaxed);
    assert!(r >= 2 * u64::from(MIN_ROUNDS), "only {r} rounds");
    // Each round changes thousands of pages: a guest that stopped writing
    // (or a check that compares nothing) shows here.
    assert!(v > 1_000 * r, "only {v} pages verified in {r} rounds");
    eprintln!(
        "stress {secs} s: {v} changed pages verified in {} rounds, lost 0; {} memslot \
         changes, {} logging toggles; fds and vCPU mappings back to {fds0} / {maps0}; {stats:?}",
        rounds.load(Ordering::Relaxed),
        churned.load(Ordering::Relaxed),
        toggles.load(Ordering::Relaxed),
    );
}
