//! The rule that keeps a callback from deadlocking the tracker: no call
//! into any tracker from inside another tracker call on the same thread.
//!
//! A tracker call may run caller code while it holds the VM's locks: a
//! sync's closure or vm-memory `Bitmap`, the `log` backend, a C VMM's
//! `mark` or logger callback. Were that code to call into a tracker, it
//! would wait for a lock its own thread holds (or, across two VMs and two
//! threads, for each other's). So each public entry point marks its
//! thread for the length of the call ([`enter`]), and a nested entry gets
//! [`ErrorKind::WouldDeadlock`](crate::ErrorKind::WouldDeadlock) instead.
//! The reaper thread is marked for its whole life: it runs no caller code
//! but the logger's.

use std::cell::Cell;

use crate::error::{Error, Result};

thread_local!(static IN_CALL: Cell<bool> = const { Cell::new(false) });

/// The calling thread is inside a tracker call until this is dropped.
#[must_use]
pub(crate) struct CallGuard(());

impl Drop for CallGuard {
    fn drop(&mut self) {
        IN_CALL.with(|c| c.set(false));
    }
}

/// Marks the calling thread as inside a tracker call (`what`, for the
/// message), or fails when it is already inside one.
pub(crate) fn enter(what: &str) -> Result<CallGuard> {
    IN_CALL.with(|c| {
        if c.replace(true) {
            return Err(Error::new(
                libc::EDEADLK,
                format!(
                    "{what} called from inside another dirty-tracker call on this thread (a \
                     sync callback, a vm-memory Bitmap, a logger): it holds the tracker's locks \
                     and the call would wait for itself; make the call after the outer one \
                     returns"
                ),
            ));
        }
        Ok(CallGuard(()))
    })
}

/// Is the calling thread inside a tracker call?
#[cfg(test)]
fn inside() -> bool {
    IN_CALL.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn a_nested_entry_fails_and_the_mark_ends_with_the_guard() {
        let g = enter("outer").unwrap();
        let e = enter("inner").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::WouldDeadlock);
        assert!(e.message().starts_with("inner called"), "{e}");
        assert!(inside());
        drop(g);
        assert!(!inside());
        drop(enter("again").unwrap());
    }

    #[test]
    fn a_panic_inside_a_call_leaves_the_thread_unmarked() {
        let r = std::panic::catch_unwind(|| {
            let _g = enter("outer").unwrap();
            panic!("inside");
        });
        assert!(r.is_err());
        assert!(!inside());
    }
}
