//! Logging: the library's log records to the VMM's logger.

use std::ffi::c_int;

use super::logger;
use crate::error::Error;

/// Routes the library's log records to log (level 1 error, 2 warning,
/// 3 info, 4 debug, 5 trace; records above max_level are dropped; msg is
/// valid only during the call). Process-wide. The callback may be called
/// from any thread that calls into the shim, and from the reaper thread.
///
/// @param log  the callback, or NULL to turn logging off
/// @return 0; -EBUSY when another logger of the Rust log crate is
///         installed in this process (the library's records go there).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_logger_set(
    log: Option<extern "C" fn(level: c_int, msg: *const libc::c_char, opaque: *mut libc::c_void)>,
    opaque: *mut libc::c_void,
    max_level: c_int,
) -> c_int {
    ffi_boundary!("kds_logger_set", {
        if logger::set(log, opaque as usize, max_level) {
            Ok(())
        } else {
            Err(Error::busy(
                "another logger of the Rust `log` crate is installed in this process; the \
                 library's records go there",
            ))
        }
    })
}
