//! Errors: a negative errno for the C ABI plus a message for `kds_last_error()`.

use std::cell::RefCell;
use std::ffi::CString;
use std::fmt;

/// A failure: the errno the C ABI returns (positive here, negated at the
/// boundary) and a message that says what happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    msg: String,
}

/// Result type of the safe Rust layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error with `errno` (positive, e.g. `libc::EINVAL`) and a message.
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        Error {
            errno,
            msg: msg.into(),
        }
    }

    /// A bad argument (`EINVAL`).
    pub fn inval(msg: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, msg)
    }

    /// A call made in the wrong order (`EBUSY`).
    pub fn busy(msg: impl Into<String>) -> Self {
        Self::new(libc::EBUSY, msg)
    }

    /// An ioctl (or other syscall) that failed: names it and its errno.
    pub fn sys(what: &str, err: &kvm_ioctls::Error, hint: &str) -> Self {
        Self::from_errno(what, err.errno(), hint)
    }

    /// Like [`Error::sys`], from a raw errno value.
    pub fn from_errno(what: &str, errno: i32, hint: &str) -> Self {
        let text = std::io::Error::from_raw_os_error(errno);
        let mut msg = format!("{what} failed: {} ({text})", errno_name(errno));
        if !hint.is_empty() {
            msg.push_str(": ");
            msg.push_str(hint);
        }
        Self::new(errno, msg)
    }

    /// The positive errno.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (-{})", self.msg, errno_name(self.errno))
    }
}

impl std::error::Error for Error {}

/// The symbolic name of the errnos this library reports.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENOENT => "ENOENT",
        libc::ENOMEM => "ENOMEM",
        libc::EEXIST => "EEXIST",
        libc::EFAULT => "EFAULT",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EMFILE => "EMFILE",
        libc::ENOSPC => "ENOSPC",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTRECOVERABLE => "ENOTRECOVERABLE",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as the calling thread's last error.
pub fn set_last_error(msg: &str) {
    // An interior NUL cannot be shown by C anyway: cut the message there.
    let bytes = msg.split('\0').next().unwrap_or("").as_bytes().to_vec();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The calling thread's last error. The pointer stays valid until the next
/// call that sets or clears it on this thread.
pub fn last_error_ptr() -> *const libc::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The calling thread's last error as an owned string (the unit tests').
#[cfg(test)]
pub fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
}
