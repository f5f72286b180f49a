//! Errors: what kind of failure ([`ErrorKind`]), the errno the C ABI
//! returns for it, and a message that says what happened and what to do.

use std::fmt;

/// What kind of failure an [`Error`] is: what a caller branches on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A call in the wrong order (the dirty ring after a memslot, the
    /// vGIC ITS after a memslot, ...): fix the VMM's call order. `EBUSY`.
    Ordering,
    /// The kernel (or this architecture) lacks what was asked for; the
    /// message says what to use instead. `ENOTSUP`.
    Unsupported,
    /// A bad argument (an unaligned address, a ring size, unknown flags, a
    /// fd that is not a KVM VM). `EINVAL` (or `E2BIG`).
    InvalidArgument,
    /// No such memslot or vCPU. `ENOENT`.
    NotFound,
    /// The vCPU index is registered already. `EEXIST`.
    AlreadyExists,
    /// The VM is tracked already (adopted twice), or the reaper thread
    /// runs already. `EBUSY`.
    InUse,
    /// A vCPU's dirty ring stayed wedged: its pages cannot be trusted any
    /// more; fail the migration and resend everything. `EOVERFLOW`.
    RingWedged,
    /// Out of memory (or an address-space limit); nothing was changed.
    /// `ENOMEM`.
    OutOfMemory,
    /// A system call failed; the message names it and its errno.
    Kernel,
}

/// A failure: its [`ErrorKind`], the errno the C ABI returns (positive
/// here, negated at the boundary) and a message that says what happened
/// and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    errno: i32,
    msg: String,
}

/// Result type of the safe Rust layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` with `errno` (positive) and a message.
    pub(crate) fn with_kind(kind: ErrorKind, errno: i32, msg: impl Into<String>) -> Self {
        Error {
            kind,
            errno,
            msg: msg.into(),
        }
    }

    /// An error with `errno` (positive, e.g. `libc::ENOENT`) and a message;
    /// its kind follows from the errno.
    pub(crate) fn new(errno: i32, msg: impl Into<String>) -> Self {
        let kind = match errno {
            libc::EINVAL | libc::E2BIG => ErrorKind::InvalidArgument,
            libc::EBUSY => ErrorKind::Ordering,
            libc::ENOTSUP => ErrorKind::Unsupported,
            libc::ENOENT => ErrorKind::NotFound,
            libc::EEXIST => ErrorKind::AlreadyExists,
            libc::EOVERFLOW => ErrorKind::RingWedged,
            libc::ENOMEM => ErrorKind::OutOfMemory,
            _ => ErrorKind::Kernel,
        };
        Self::with_kind(kind, errno, msg)
    }

    /// A bad argument (`EINVAL`).
    pub(crate) fn inval(msg: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, msg)
    }

    /// A call made in the wrong order (`EBUSY`).
    pub(crate) fn busy(msg: impl Into<String>) -> Self {
        Self::new(libc::EBUSY, msg)
    }

    /// A system call (`what`, e.g. an ioctl's name) that failed with
    /// `errno`: names both, then the hint.
    pub(crate) fn sys(what: &str, errno: i32, hint: &str) -> Self {
        let text = std::io::Error::from_raw_os_error(errno);
        let mut msg = format!("{what} failed: {} ({text})", errno_name(errno));
        if !hint.is_empty() {
            msg.push_str(": ");
            msg.push_str(hint);
        }
        Self::with_kind(ErrorKind::Kernel, errno, msg)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The positive errno the C ABI returns (negated) for this failure;
    /// for [`ErrorKind::Kernel`], the system call's.
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

impl From<Error> for std::io::Error {
    /// An `io::Error` of the errno's kind, carrying this error.
    fn from(e: Error) -> Self {
        let kind = std::io::Error::from_raw_os_error(e.errno).kind();
        std::io::Error::new(kind, e)
    }
}

/// The symbolic name of the errnos this library reports.
pub(crate) fn errno_name(errno: i32) -> String {
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
