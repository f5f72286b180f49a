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
    /// A system call failed; the message names it and its errno
    /// ([`Error::raw_os_error`]; [`std::error::Error::source`] is that
    /// errno as an [`std::io::Error`]).
    Kernel,
    /// A call into the tracker from inside one of its own callbacks (a
    /// `sync_memslot_each` or `sync_memslot_runs` closure, a vm-memory
    /// `Bitmap` the sync marks): the callback runs with the tracker's
    /// locks held, so the call would wait for itself. Collect what the
    /// callback needs and call after the sync returns. `EDEADLK`.
    WouldDeadlock,
}

/// A failure: its [`ErrorKind`], the errno the C ABI returns (positive
/// here, negated at the boundary) and a message that says what happened
/// and what to do.
///
/// `Display` is the message alone. For a failed system call
/// ([`ErrorKind::Kernel`]) [`source`](std::error::Error::source) is the
/// system call's errno as an [`std::io::Error`], so that
/// `io::Error::from(e)` keeps both the message and the OS error:
///
/// ```
/// use std::error::Error as _;
/// use kvm_dirty_shim::{BoardFlags, DirtyTracker, ErrorKind, Memslot, SlotId};
/// let t = DirtyTracker::create(0).unwrap();
/// t.board_init(BoardFlags::empty()).unwrap();
/// let len = 1 << 20;
/// // SAFETY: a fresh anonymous mapping, never unmapped.
/// let host = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// } as u64;
/// let at = |slot| Memslot::new(SlotId::new(slot), 0, host, len as u64);
/// // SAFETY: the mapping lives as long as the process.
/// unsafe { t.update_memslot(&at(0)) }.unwrap();
/// // Slot 1 over slot 0's guest-physical range: the kernel says EEXIST.
/// // SAFETY: as above.
/// let e = unsafe { t.update_memslot(&at(1)) }.unwrap_err();
/// assert_eq!(e.kind(), ErrorKind::AlreadyExists);
/// assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
/// let io = std::io::Error::from(e);
/// assert_eq!(io.kind(), std::io::ErrorKind::AlreadyExists);
/// assert!(io.to_string().starts_with("KVM_SET_USER_MEMORY_REGION"), "{io}");
/// let os = io.source().and_then(|s| s.downcast_ref::<std::io::Error>()).unwrap();
/// assert_eq!(os.raw_os_error(), Some(libc::EEXIST));
/// ```
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    errno: i32,
    msg: String,
    /// For a failed system call, its errno.
    os: Option<std::sync::Arc<std::io::Error>>,
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, self.errno, &self.msg) == (other.kind, other.errno, &other.msg)
    }
}

impl Eq for Error {}

/// Result type of the safe Rust layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` with `errno` (positive) and a message.
    pub(crate) fn with_kind(kind: ErrorKind, errno: i32, msg: impl Into<String>) -> Self {
        Error {
            kind,
            errno,
            msg: msg.into(),
            os: None,
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
            libc::EDEADLK => ErrorKind::WouldDeadlock,
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
        let mut e = Self::with_kind(ErrorKind::Kernel, errno, msg);
        e.os = Some(std::sync::Arc::new(std::io::Error::from_raw_os_error(
            errno,
        )));
        e
    }

    /// The same error with another kind (the errno and the OS error stay).
    pub(crate) fn into_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
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

    /// The errno of the system call that failed, where one did (as
    /// [`std::io::Error::raw_os_error`]); `None` for a failure the
    /// library found itself (a bad argument, a wrong order).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.os.as_ref().and_then(|e| e.raw_os_error())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    /// For a failed system call, its errno as an [`std::io::Error`].
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.os
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for std::io::Error {
    /// An `io::Error` of the errno's kind carrying this error: its
    /// `Display` is the message, its `source()` the system call's
    /// `io::Error` (with `raw_os_error()`) where one failed.
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
        libc::EDEADLK => "EDEADLK",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}
