//! Version and errors: kds_abi_version, kds_last_error.

use super::{KDS_ABI_VERSION, last_error_ptr};

/// The ABI version of the library linked in.
///
/// @return KDS_ABI_VERSION of the library (never fails). A caller built
///         against this header needs kds_abi_version() >= KDS_ABI_VERSION.
#[unsafe(no_mangle)]
pub extern "C" fn kds_abi_version() -> u32 {
    KDS_ABI_VERSION
}

/// A message describing the last failure on the calling thread: the
/// function, what happened (the ioctl and errno where one failed) and what
/// to do.
///
/// @return a NUL-terminated string, never NULL ("" before any failure);
///         valid until the next kds_ call on this thread that fails.
#[unsafe(no_mangle)]
pub extern "C" fn kds_last_error() -> *const libc::c_char {
    last_error_ptr()
}
