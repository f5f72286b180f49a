//! The reaper thread's stop and wake flags: owned here, beside the VM that
//! wakes the thread when dirty logging starts; the thread (`reaper`) and
//! the tracker hold them too, and wait on them.

use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// What the VM and the tracker ask of the thread.
#[derive(Default)]
struct Signal {
    stop: bool,
    /// Dirty logging started on a memslot: check now, then soon.
    wake: bool,
}

/// The thread's stop and wake flags, shared with the VM (which wakes the
/// thread when dirty logging starts).
#[derive(Default)]
pub(crate) struct Wake {
    signal: Mutex<Signal>,
    cv: Condvar,
}

impl Wake {
    /// Dirty logging started somewhere: the thread checks the rings now
    /// and paces itself from the shortest pause again.
    pub(crate) fn wake(&self) {
        self.signal.lock().wake = true;
        self.cv.notify_all();
    }

    /// The thread ends at its next check, or now if it sleeps.
    pub(crate) fn stop(&self) {
        self.signal.lock().stop = true;
        self.cv.notify_all();
    }
}

/// What ended [`Wake::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The thread must end.
    Stop,
    /// Dirty logging started somewhere: check now.
    Wake,
    /// The pause ran out.
    Pause,
}

impl Wake {
    /// Waits for a stop or a wake, or `pause` when one is given (forever
    /// otherwise); a wake is consumed. Returns at once if one is pending.
    pub(crate) fn wait(&self, pause: Option<Duration>) -> Woken {
        let mut s = self.signal.lock();
        if !s.stop && !s.wake {
            match pause {
                Some(p) => {
                    self.cv.wait_for(&mut s, p);
                }
                None => self.cv.wait(&mut s),
            }
        }
        if s.stop {
            Woken::Stop
        } else if std::mem::take(&mut s.wake) {
            Woken::Wake
        } else {
            Woken::Pause
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_wake_or_stop_ends_the_wait_at_once() {
        let w = Wake::default();
        assert_eq!(w.wait(Some(Duration::from_millis(1))), Woken::Pause);
        w.wake();
        assert_eq!(w.wait(None), Woken::Wake);
        assert_eq!(
            w.wait(Some(Duration::ZERO)),
            Woken::Pause,
            "a wake is consumed"
        );
        w.wake();
        w.stop();
        assert_eq!(w.wait(None), Woken::Stop, "a stop wins over a wake");
        assert_eq!(w.wait(None), Woken::Stop, "and stays");
    }
}
