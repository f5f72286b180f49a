//! `KVM_RESET_DIRTY_RINGS` interrupted by signals (Linux 6.17 and later
//! stop the reset when a signal is pending): a thread sends the reaping
//! thread signals in a tight loop while 2 vCPUs dirty memory, and every
//! page each vCPU changed must have been reported, round after round.
//!
//! Why it matters: the kernel's reset walks a ring in batches of up to 64
//! pages, marks each entry reset as it goes, and re-protects a batch only
//! when the next entry does not fit in it. When it stops for a signal it
//! returns the count so far (not -EINTR) and leaves the batch it was
//! building write-enabled, its entries already marked reset: a later
//! write to those pages makes no ring entry. Userspace cannot see which
//! pages those were, so the shim keeps signals from interrupting the
//! reset (they are blocked around the ioctl and delivered after it), and
//! where a stop it cannot block may have come between (SIGSTOP, the
//! cgroup freezer), it re-arms logging and reports every page.
//!
//! `KDS_INTERRUPT_SECS` sets the duration (default 10).
//! (Its own test binary: it installs a process-wide signal handler.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kvm_dirty_shim::capi::*;

const RING: u32 = 4096;
const PAGES: u64 = 4096;
/// Rounds each vCPU runs at least, whatever the clock says.
const MIN_ROUNDS: u32 = 20;

extern "C" fn on_signal(_: libc::c_int) {}

#[test]
fn signals_at_the_reaping_thread_lose_nothing() {
    let secs: u64 = std::env::var("KDS_INTERRUPT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    // A handler that does nothing, without SA_RESTART: the signal only
    // interrupts what the thread is doing, as a VMM's kick signal does.
    // SAFETY: a zeroed sigaction with a handler that touches nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let vm = TestVm::new(Some(RING));
    let mut vcpus = Vec::new();
    for id in 0..2u32 {
        vcpus.push(vm.guest_on(id, PAGES, 3000, 11 + id));
    }
    let stop = AtomicBool::new(false);
    let reaper_tid = AtomicI32::new(0);
    let (signals, reaps, verified, rounds) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let deadline = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|sc| {
        let (vm, stop) = (&vm, &stop);
        for (mut c, mut v) in vcpus {
            let (verified, rounds) = (&verified, &rounds);
            sc.spawn(move || {
                let _stop = StopOnDrop(stop);
                let mut it = 0;
                while it < MIN_ROUNDS || Instant::now() < deadline {
                    it += 1;
                    vm.set_iteration(v.index, it);
                    assert!(!v.run_round(vm.h).wedged, "vCPU {} wedged", v.index);
                    let (changed, _, lost) = c.check(vm.h, 0);
                    assert_eq!(
                        lost, 0,
                        "vCPU {} round {it}: {lost} of {changed} changed pages not reported",
                        v.index
                    );
                    verified.fetch_add(changed, Ordering::Relaxed);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let (reaper_tid, reaps, signals) = (&reaper_tid, &reaps, &signals);
        sc.spawn(move || {
            // SAFETY: gettid has no preconditions.
            reaper_tid.store(unsafe { libc::gettid() }, Ordering::Release);
            while !stop.load(Ordering::Relaxed) {
                let r = c!(kds_reap(vm.vm()));
                assert!(r >= 0, "kds_reap: {r}: {}", last_error());
                reaps.fetch_add(1, Ordering::Relaxed);
            }
        });
        sc.spawn(move || {
            let tid = loop {
                match reaper_tid.load(Ordering::Acquire) {
                    0 => std::thread::yield_now(),
                    t => break t,
                }
            };
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: a signal with a handler, to a thread of this
                // process that lives until `stop` (it is joined after).
                let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) };
                assert_eq!(r, 0, "tgkill: {}", std::io::Error::last_os_error());
                signals.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    let s = vm.stats();
    let (v, r) = (
        verified.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed),
    );
    assert!(r >= 2 * u64::from(MIN_ROUNDS), "only {r} rounds");
    assert!(v > 500 * r, "only {v} pages verified in {r} rounds");
    assert!(s.ring_resets > 0 && s.entries_reset > 0, "{s:?}");
    // Measured on Linux 6.18 without the shim's signal mask: about 5
    // million signals in 10 s gave about 220,000 entries that resets left
    // unreached (reset_shortfall), none lost here: this host's KVM
    // emulates the test guest's CPL0 stores and logs every one of them
    // whatever the page's protection (doc/testing.md).
    eprintln!(
        "interrupted resets: {} signals at the reaping thread during {} reaps; resets with a \
         signal held: {} of {}; resets left short: {} entries; switched out: {}; {v} changed \
         pages verified in {r} rounds, 0 lost",
        signals.load(Ordering::Relaxed),
        reaps.load(Ordering::Relaxed),
        s.reset_signals_held,
        s.ring_resets,
        s.reset_shortfall,
        s.resets_switched_out,
    );
    if s.reset_signals_held == 0 {
        eprintln!("no signal arrived during a reset: the case was not exercised this run");
    }
}
