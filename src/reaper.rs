//! The adaptive reaper (`kds_reaper_enable`): a thread inside the library
//! that reaps by ring fill level instead of on a fixed period.
//!
//! Each check measures every vCPU ring's fill without a syscall
//! (`Ring::fill`: a binary search over the entries' flags, about a dozen
//! acquire loads). When some ring holds at least the high-water mark it
//! reaps (`Vm::reap`: every ring, one `KVM_RESET_DIRTY_RINGS`). The pause
//! before the next check ([`Pacer`](crate::pacer)) follows the fastest
//! fill rate seen on this VM (entries the kernel pushed per second into
//! one ring, from the ring's harvested total plus its fill): the next check
//! comes when the fullest ring would reach the high-water mark at that
//! rate, but never before a ring could gain half the mark. After a reap a
//! ring at the peak rate is checked once, at the mark; a slower one holds
//! at most one and a half marks when it is reaped. A busy vCPU is reaped
//! long before `KVM_EXIT_DIRTY_RING_FULL`, a VM that logs but dirties
//! nothing costs one check per `max_interval_us`, and one that logs no
//! memslot costs nothing: the thread sleeps until a slot starts logging.
//! The floor is why a ring filling below the peak rate is not checked ever
//! more often as it nears the mark.
//!
//! When a memslot starts dirty logging (what turns a vCPU from pushing
//! nothing to pushing at full speed) the VM wakes the thread, which checks
//! at once and then every `min_interval_us`, doubling, until a sample big
//! enough to trust (an eighth of the mark in one ring) gives it a rate to
//! pace itself by; without that wake a VMM had to keep `max_interval_us`
//! short all the time (QEMU's 5 ms cost about 600 wakeups per migration,
//! doc/migration.md). A smaller sample is not trusted: a few entries just
//! after the wake would plan a pause in which a ring fills.
//!
//! The peak, not the last interval's rate: a vCPU that sleeps and then
//! dirties at full speed (dirty-limit's throttle does exactly that)
//! averages a low rate over a long pause and would fill its ring before the
//! next check (measured: 57 overflows in 180 s of a throttled QEMU
//! migration with the last rate, see tests/qemu-migration.py).
//! The thread never spins: a failed reap logs and waits the longest pause.
//!
//! Ownership flows one way: the tracker owns the [`Reaper`] (the thread's
//! handle) and the VM; the thread holds the VM only weakly (upgraded for
//! one check at a time) and shares with the VM nothing but [`Wake`], its
//! stop and wake flags.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::pacer::{Config, Pacer};
use crate::vm::{Vm, Wake, Woken};

/// What the caller runs first on the new thread (`enable_reaper_with`):
/// its seccomp filter, say.
pub(crate) type OnStart = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// A running reaper thread; `stop` joins it.
pub(crate) struct Reaper {
    wake: Arc<Wake>,
    thread: JoinHandle<()>,
}

impl Reaper {
    /// Starts the thread on `vm`, which it holds weakly: it ends by itself
    /// when the VM is gone. `on_start` runs on the thread first; its
    /// failure ends the thread and is returned here.
    pub(crate) fn start(vm: &Arc<Vm>, cfg: Config, on_start: Option<OnStart>) -> Result<Reaper> {
        let wake = Arc::new(Wake::default());
        let (w, vm) = (Arc::clone(&wake), Arc::downgrade(vm));
        // A handshake only for a hook: without one nothing crosses from the
        // new thread to this one (a channel would be freed by whichever
        // thread lets go of it last).
        let (hook, started) = match on_start {
            Some(f) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                (Some((f, tx)), Some(rx))
            }
            None => (None, None),
        };
        let thread = std::thread::Builder::new()
            .name("kds-reaper".into())
            .spawn(move || {
                // The thread runs no caller code but `on_start` and the
                // logger; neither may call back into a tracker.
                let _in_call = crate::reentry::enter("the reaper thread");
                if let Some((f, tx)) = hook {
                    let r = f();
                    let ok = r.is_ok();
                    // The receiver waits for this; it is gone only if the
                    // spawning call panicked.
                    let _ = tx.send(r);
                    if !ok {
                        return;
                    }
                }
                run(&vm, cfg, &w);
            })
            .map_err(|e| {
                Error::new(
                    e.raw_os_error().unwrap_or(libc::EAGAIN),
                    format!("could not start the reaper thread: {e}"),
                )
            })?;
        match started.map(|rx| rx.recv()) {
            None | Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                // The thread has ended (or is about to).
                let _ = thread.join();
                return Err(Error::sys(
                    "the reaper thread's on_start",
                    e.raw_os_error().unwrap_or(libc::EIO),
                    &format!("{e}; the reaper is not running"),
                ));
            }
            Some(Err(_)) => {
                let _ = thread.join();
                return Err(Error::new(
                    libc::EIO,
                    "the reaper thread's on_start panicked; the reaper is not running",
                ));
            }
        }
        log::info!(
            "adaptive reaper started: high water {}%, checks every {:?} to {:?}",
            cfg.high_water_pct(),
            cfg.min(),
            cfg.max()
        );
        Ok(Reaper { wake, thread })
    }

    /// The flags the VM wakes the thread with.
    pub(crate) fn wake(&self) -> &Arc<Wake> {
        &self.wake
    }

    /// Asks the thread to stop and waits for it (at most one reap).
    pub(crate) fn stop(self) {
        self.wake.stop();
        if self.thread.join().is_err() {
            log::error!("the reaper thread panicked");
        }
        log::info!("adaptive reaper stopped");
    }
}

/// The thread's loop.
fn run(vm: &Weak<Vm>, cfg: Config, w: &Wake) {
    let mut pacer = Pacer::new(cfg);
    let mut levels = Vec::new();
    loop {
        // While no memslot logs dirty pages no vCPU pushes to a ring: sleep
        // until the VM wakes the thread (a slot starts logging), stops it,
        // or is gone (its drop stops it).
        let logging = match vm.upgrade() {
            Some(vm) => vm.logs_dirty(),
            None => return,
        };
        match w.wait(logging.then(|| pacer.pause())) {
            Woken::Stop => return,
            Woken::Wake => pacer.wake(),
            Woken::Pause => {}
        }
        // The VM for this check only; gone when the tracker was dropped.
        let Some(vm) = vm.upgrade() else {
            return;
        };
        vm.ring_levels(&mut levels);
        let over = pacer.check(Instant::now(), &levels);
        if over && let Err(e) = vm.reap_by_reaper() {
            log::warn!("adaptive reaper: {e}; retrying in {:?}", pacer.back_off());
            continue;
        }
        // A reap empties every ring.
        pacer.plan(over);
    }
}
