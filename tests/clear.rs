//! `kds_memslot_clear` on the real kernel, as QEMU's migration uses it: a
//! vCPU thread stores without pause while the test migrates its slot
//! (sync, then per chunk a clear and the send of what is pending) to a
//! copy, then stops the vCPU and sends what the last sync reports. The
//! copy must equal the source, page for page; the clears must have left
//! pages out of later syncs (else this test could not fail).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kvm_dirty_shim::capi::*;

const PAGES: u64 = 4096;
/// QEMU clears 1 GiB chunks; here 8 chunks a pass.
const CHUNK: u64 = 512;
/// Migration passes, each a sync and a send of what is pending.
const PASSES: u32 = 20;

/// One migration pass: sync, then per chunk, clear and send.
fn sync_into(vm: Handle, slot: u32, pending: &mut [u64]) {
    let mut bits = vec![0u64; pending.len()];
    let n = c!(kds_memslot_sync(vm.0, slot, bits.as_mut_ptr(), PAGES, 0));
    assert!(n >= 0, "kds_memslot_sync: {n}: {}", last_error());
    for (p, b) in pending.iter_mut().zip(bits) {
        *p |= b;
    }
}

/// Sends the pending pages of `first .. first + CHUNK` (the first word of
/// each page: the one the guest stores to) into `dst`.
fn send(src: &Mem, dst: &mut [u32], pending: &mut [u64], first: u64) -> u64 {
    let mut sent = 0;
    for p in first..first + CHUNK {
        let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
        if pending[w] & b != 0 {
            dst[p as usize] = src.read_u32(p * PAGE);
            pending[w] &= !b;
            sent += 1;
        }
    }
    sent
}

fn migrate(clear: bool) -> (u64, u64) {
    let vm = TestVm::new(Some(4096));
    let (c, mut v) = vm.guest(PAGES, 3000, 41);
    let slot = c.slot;
    let mut dst = vec![0u32; PAGES as usize];
    // The first pass sends every page.
    let mut pending = vec![u64::MAX; (PAGES / 64) as usize];
    let (mut sent, mut left_out) = (0, 0);
    let stop = AtomicBool::new(false);
    let rounds = AtomicU32::new(0);
    let ((), _) = with_reaper(vm.h, Duration::from_micros(300), || {
        std::thread::scope(|sc| {
            let (vmr, stop, rounds) = (&vm, &stop, &rounds);
            let vcpu = sc.spawn(move || {
                let _stop = StopOnDrop(stop);
                let mut it = 0;
                while !stop.load(Ordering::Relaxed) {
                    it += 1;
                    vmr.set_iteration(v.index, it);
                    v.run_round(vmr.h);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
            for pass in 0..PASSES {
                if pass > 0 {
                    sync_into(vm.h, slot, &mut pending);
                }
                // Let the vCPU end a round after the sync: about half the
                // pages it reported are stored to again before their send
                // (it goes on storing during the send too).
                let r0 = rounds.load(Ordering::Relaxed);
                let deadline = Instant::now() + Duration::from_secs(60);
                while rounds.load(Ordering::Relaxed) == r0 && !stop.load(Ordering::Relaxed) {
                    assert!(Instant::now() < deadline, "the vCPU ran no round in 60 s");
                    std::thread::yield_now();
                }
                for first in (0..PAGES).step_by(CHUNK as usize) {
                    if clear {
                        let n = c!(kds_memslot_clear(vm.vm(), slot, first, CHUNK));
                        assert!(n >= 0, "kds_memslot_clear: {n}: {}", last_error());
                        left_out += n as u64;
                    }
                    sent += send(&c.mem, &mut dst, &mut pending, first);
                }
            }
            stop.store(true, Ordering::Relaxed);
            vcpu.join().unwrap();
        });
    });
    assert!(rounds.load(Ordering::Relaxed) >= PASSES, "a round a pass");
    // The vCPU is stopped: the last sync and send.
    sync_into(vm.h, slot, &mut pending);
    for first in (0..PAGES).step_by(CHUNK as usize) {
        sent += send(&c.mem, &mut dst, &mut pending, first);
    }
    let differ = (0..PAGES)
        .filter(|&p| dst[p as usize] != c.mem.read_u32(p * PAGE))
        .count();
    assert_eq!(differ, 0, "{differ} pages differ (clear: {clear})");
    assert_eq!(vm.stats().pages_cleared, left_out);
    (sent, left_out)
}

#[test]
fn a_migration_with_clears_loses_nothing_and_sends_less() {
    let (sent, left_out) = migrate(true);
    assert!(
        left_out > 0,
        "no clear left a page out (sent {sent}): the check proves nothing"
    );
    let (sent_without, none) = migrate(false);
    assert_eq!(none, 0);
    eprintln!("pages sent: {sent} with clears ({left_out} left out), {sent_without} without");
}

#[test]
fn a_clear_checks_its_range() {
    let vm = TestVm::new(Some(4096));
    let (c, _v) = vm.guest(64, 1, 1);
    assert_eq!(c!(kds_memslot_clear(vm.vm(), c.slot, 0, 64)), 0);
    for (first, n) in [(0, 65), (64, 1), (u64::MAX, 2)] {
        let r = c!(kds_memslot_clear(vm.vm(), c.slot, first, n));
        assert_eq!(r, -i64::from(libc::EINVAL), "{first} + {n}");
    }
    let r = c!(kds_memslot_clear(vm.vm(), 99, 0, 1));
    assert_eq!(r, -i64::from(libc::ENOENT));
    let r = c!(kds_memslot_clear(std::ptr::null_mut(), c.slot, 0, 1));
    assert_eq!(r, -i64::from(libc::EINVAL));
}
