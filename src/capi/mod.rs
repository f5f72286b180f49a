//! The C ABI (`doc/abi.md`), a thin skin over the Rust API
//! ([`DirtyTracker`]): each export checks its pointer arguments
//! (`try_ref_from_ptr!`), runs inside the panic boundary
//! (`ffi_boundary!`), makes one call into the Rust API, and maps the
//! result to C: `>= 0` or `-errno`, with `kds_last_error()` set to the
//! export's name and the core's message.
//!
//! A Rust panic never unwinds into C: it becomes `-ENOTRECOVERABLE` (or
//! the return type's fallback, see [`ToC`]) with a message.
//!
//! The exports are `unsafe extern "C"` fns: they take raw pointers whose
//! contract (doc/abi.md) only the caller can keep, so a Rust caller must
//! say why it does, in an `unsafe` block. NULL is checked here, and each
//! dereference says why it is sound. The module is built only with the
//! `capi` feature (the C library: `cargo rustc --features capi
//! --crate-type staticlib`, as meson-snippet/cargo-build does).
//!
//! # Safety
//!
//! Every export's contract is the C ABI's (doc/abi.md, and each
//! function's comment in the header, which is where a C caller reads it):
//! a non-NULL `KdsVm *` is a live handle from `kds_vm_create` or
//! `kds_vm_adopt`, not yet passed to `kds_vm_free`; a pointer argument
//! points to the object (or, with a size or bit count, the bytes) it
//! names, for the duration of the call; a memslot's host range stays
//! mapped while the slot exists. (Hence `missing_safety_doc` is allowed
//! here: a `# Safety` section per function would repeat this in the C
//! header.)
//!
//! One file per API area, in the header's order (cbindgen emits the
//! functions in source order; build.rs puts a banner before each group):
//! `version`, `lifecycle`, `setup`, `memslot`, `vcpu`, `reap`, `sync`,
//! `reaper`, `stats`, `logging`, then `compat` (the ABI 1 names).
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{CString, c_int};

use parking_lot::Mutex;

use crate::error::{Error, Result, errno_name};
use crate::tracker::DirtyTracker;
use crate::types::{Stats, VcpuStats};

pub mod types;
pub use types::*;
mod logger;

/// An opaque handle on one VM's dirty tracking.
pub struct KdsVm {
    tracker: DirtyTracker,
    kick: Mutex<Option<Kick>>,
}

/// The VMM's "kick every vCPU out of guest mode" callback (`kds_kick_set`).
#[derive(Clone, Copy)]
struct Kick {
    func: extern "C" fn(*mut libc::c_void),
    opaque: usize,
}

/// How an export's Rust result becomes its C return value.
pub trait ToC {
    /// The C return type.
    type C;
    /// A success.
    fn ok(self) -> Self::C;
    /// A failure: `errno` is positive.
    fn err(errno: i32) -> Self::C;
    /// After a caught panic.
    fn panicked() -> Self::C;
}

/// Status returns: 0.
impl ToC for () {
    type C = c_int;
    fn ok(self) -> c_int {
        0
    }
    fn err(errno: i32) -> c_int {
        -errno
    }
    fn panicked() -> c_int {
        -libc::ENOTRECOVERABLE
    }
}

/// Small non-negative values (an fd, a mode).
impl ToC for c_int {
    type C = c_int;
    fn ok(self) -> c_int {
        self
    }
    fn err(errno: i32) -> c_int {
        -errno
    }
    fn panicked() -> c_int {
        -libc::ENOTRECOVERABLE
    }
}

/// Counts (entries, pages).
impl ToC for u64 {
    type C = i64;
    fn ok(self) -> i64 {
        self.min(i64::MAX as u64) as i64
    }
    fn err(errno: i32) -> i64 {
        -i64::from(errno)
    }
    fn panicked() -> i64 {
        -i64::from(libc::ENOTRECOVERABLE)
    }
}

/// The result of an export that returns nothing (`kds_vm_free`): a failure
/// is only reported in `kds_last_error()`.
pub struct Void;

impl ToC for Void {
    type C = ();
    fn ok(self) {}
    fn err(_: i32) {}
    fn panicked() {}
}

/// Runs `body` (a block evaluating to `Result<T>`, `T:` [`ToC`]) inside the
/// panic boundary of export `$name`, and returns its C value. An error's
/// message gets the export's name in front, in `kds_last_error()`.
macro_rules! ffi_boundary {
    ($name:literal, $body:block) => {{
        let _guard = crate::capi::quiet_panics();
        crate::capi::finish(
            $name,
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| $body)),
        )
    }};
}

/// `&T` from a pointer argument, or an `EINVAL` error naming it when NULL
/// (as rustls-ffi's `try_ref_from_ptr!`).
macro_rules! try_ref_from_ptr {
    ($ptr:ident) => {
        // SAFETY: a non-NULL pointer argument points to a valid, readable
        // `T` for the duration of the call (the ABI's contract with the
        // caller; a KdsVm handle is valid until kds_vm_free).
        match unsafe { $ptr.as_ref() } {
            Some(r) => r,
            None => {
                return Err(crate::error::Error::inval(concat!(
                    stringify!($ptr),
                    " is NULL"
                )));
            }
        }
    };
}

/// The core's messages name Rust operations and types; through the C ABI
/// they name the C functions and constants instead: (Rust, C).
const C_NAMES: &[(&str, &str)] = &[
    ("update_memslot", "kds_memslot_update"),
    ("add_vcpu", "kds_vcpu_add"),
    ("enable_dirty_ring", "kds_dirty_ring_enable"),
    ("board_init", "kds_board_init"),
    ("enable_reaper", "kds_reaper_enable"),
    ("disable_reaper", "kds_reaper_disable"),
    ("BoardFlags::VGIC_ITS", "KDS_BOARD_VGIC_ITS"),
    ("VGIC_ITS, 0x1", "KDS_BOARD_VGIC_ITS"),
    ("LOG_DIRTY_PAGES", "KDS_MEM_LOG_DIRTY_PAGES"),
    ("READONLY", "KDS_MEM_READONLY"),
];

/// `msg` with the Rust names of [`C_NAMES`] (whole words only) replaced
/// by their C names.
fn c_names(msg: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = msg.to_string();
    for (rust, c) in C_NAMES {
        let mut from = 0;
        while let Some(i) = out[from..].find(rust).map(|i| i + from) {
            let end = i + rust.len();
            if word(out[..i].chars().next_back()) || word(out[end..].chars().next()) {
                from = end;
                continue;
            }
            out.replace_range(i..end, c);
            from = i + c.len();
        }
    }
    out
}

/// The C value of a finished export.
pub(crate) fn finish<T: ToC>(name: &str, r: std::thread::Result<Result<T>>) -> T::C {
    match r {
        Ok(Ok(v)) => v.ok(),
        Ok(Err(e)) => {
            log::debug!("{name}: {e}");
            set_last_error(&format!(
                "{name}: {} (-{})",
                c_names(e.message()),
                errno_name(e.errno())
            ));
            T::err(e.errno())
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let msg = format!(
                "{name}: internal error (Rust panic: {what}); the VM's tracking state may be \
                 inconsistent: report this bug"
            );
            log::error!("{msg}");
            set_last_error(&msg);
            T::panicked()
        }
    }
}

/// Marks the calling thread as inside an export until dropped.
pub(crate) struct ExportGuard(bool);

impl Drop for ExportGuard {
    fn drop(&mut self) {
        IN_EXPORT.with(|c| c.set(self.0));
    }
}

thread_local!(static IN_EXPORT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// The default panic hook prints to stderr; a library must not. A panic
/// inside an export is logged through `log` by the boundary instead; a
/// panic anywhere else in the process still goes to the previous hook.
pub(crate) fn quiet_panics() -> ExportGuard {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_EXPORT.with(|c| c.get()) {
                prev(info);
            }
        }));
    });
    ExportGuard(IN_EXPORT.with(|c| c.replace(true)))
}

/// Writes `v` through an out-pointer argument, or fails with `EINVAL`.
///
/// # Safety
/// A non-NULL `out` points to a writable `T`.
unsafe fn write_out<T>(out: *mut T, v: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::inval("out is NULL"));
    }
    // SAFETY: a non-NULL `out` points to a writable `T` (our contract).
    unsafe { out.write(v) };
    Ok(())
}

/// The largest `size` a sized struct argument may have (as Linux caps
/// extensible syscall structs at a page).
const MAX_STRUCT_SIZE: usize = 4096;

/// A struct the C caller passes with its size (`KdsMemslot`, ...): plain
/// integers only, so that every byte pattern, all zeroes included, is a
/// valid value, and the first bytes of a newer layout are an older one.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs whose fields are all integers.
unsafe trait SizedStruct: Copy + Default {
    /// The struct's name, for messages.
    const NAME: &'static str;
    /// Its size in ABI 1, the smallest a caller may pass.
    const SIZE_VER1: usize;
}

// SAFETY: repr(C), u32 and u64 fields only.
unsafe impl SizedStruct for KdsMemslot {
    const NAME: &'static str = "KdsMemslot";
    const SIZE_VER1: usize = KDS_MEMSLOT_SIZE_VER1;
}
// SAFETY: repr(C), u32 fields only.
unsafe impl SizedStruct for KdsReaperConfig {
    const NAME: &'static str = "KdsReaperConfig";
    const SIZE_VER1: usize = KDS_REAPER_CONFIG_SIZE_VER1;
}
// SAFETY: repr(C), u64 fields only.
unsafe impl SizedStruct for Stats {
    const NAME: &'static str = "KdsStats";
    const SIZE_VER1: usize = KDS_STATS_SIZE_VER1;
}
// SAFETY: repr(C), u64 fields only.
unsafe impl SizedStruct for VcpuStats {
    const NAME: &'static str = "KdsVcpuStats";
    const SIZE_VER1: usize = KDS_VCPU_STATS_SIZE_VER1;
}

/// Reads a struct the caller passed with its `size` in bytes, by the rule
/// of Linux's extensible syscalls (`copy_struct_from_user`): smaller than
/// the ABI 1 layout is `EINVAL`; the fields a shorter (older) layout lacks
/// are 0; a longer (newer) layout is accepted when every byte past this
/// library's struct is 0, and is `E2BIG` otherwise (it asks for something
/// this library cannot do).
///
/// # Safety
/// A non-NULL `p` points to `size` readable bytes.
unsafe fn read_sized<T: SizedStruct>(p: *const T, size: usize) -> Result<T> {
    let ours = std::mem::size_of::<T>();
    if p.is_null() {
        return Err(Error::inval(format!("{} pointer is NULL", T::NAME)));
    }
    if size < T::SIZE_VER1 || size > MAX_STRUCT_SIZE {
        return Err(Error::inval(format!(
            "size {size} is not a {} size: pass sizeof({}) (at least {}, at most {MAX_STRUCT_SIZE})",
            T::NAME,
            T::NAME,
            T::SIZE_VER1
        )));
    }
    // SAFETY: the caller's struct is `size` readable bytes (our contract,
    // the ABI's: the size argument is the size of the object `p` points to).
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), size) };
    if let Some(i) = bytes.iter().skip(ours).position(|&b| b != 0) {
        return Err(Error::new(
            libc::E2BIG,
            format!(
                "{} byte {} is set, past the {ours} bytes this library knows (ABI {}): the \
                 caller uses a newer field; link a newer kvm-dirty-shim or leave it 0",
                T::NAME,
                ours + i,
                KDS_ABI_VERSION
            ),
        ));
    }
    let mut v = T::default();
    // SAFETY: copies min(size, ours) bytes from the caller's struct into
    // `v`, a distinct local; any bytes are a valid T (SizedStruct's contract).
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            (&mut v as *mut T).cast::<u8>(),
            size.min(ours),
        )
    };
    Ok(v)
}

/// Writes `v` into a caller's struct of `size` bytes: the first
/// min(size, sizeof(T)) bytes of `v`, then zeroes up to `size` (fields of
/// a newer layout that this library does not fill read 0). Returns
/// sizeof(T): how many bytes of the caller's struct carry this library's
/// values.
///
/// # Safety
/// A non-NULL `out` points to `size` writable bytes.
unsafe fn write_sized<T: SizedStruct>(out: *mut T, size: usize, v: &T) -> Result<c_int> {
    let ours = std::mem::size_of::<T>();
    if out.is_null() {
        return Err(Error::inval("out is NULL"));
    }
    if size > MAX_STRUCT_SIZE {
        return Err(Error::inval(format!(
            "size {size} is not a {} size: pass sizeof({})",
            T::NAME,
            T::NAME
        )));
    }
    let n = size.min(ours);
    // SAFETY: the caller's struct is `size` writable bytes (our contract);
    // `v` is a distinct local of `ours` bytes; n <= both.
    unsafe {
        std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.cast::<u8>(), n);
        std::ptr::write_bytes(out.cast::<u8>().add(n), 0, size - n);
    }
    Ok(ours as c_int)
}

/// Makes the tracker and writes its new handle through `out`.
///
/// # Safety
/// A non-NULL `out` points to a writable `KdsVm *`.
unsafe fn new_handle(
    out: *mut *mut KdsVm,
    make: impl FnOnce() -> Result<DirtyTracker>,
) -> Result<()> {
    if out.is_null() {
        return Err(Error::inval("out is NULL"));
    }
    let h = Box::into_raw(Box::new(KdsVm {
        tracker: make()?,
        kick: Mutex::new(None),
    }));
    // SAFETY: `out` is non-NULL and writable (our contract).
    unsafe { write_out(out, h) }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as the calling thread's last error.
pub(crate) fn set_last_error(msg: &str) {
    // An interior NUL cannot be shown by C anyway: cut the message there.
    let bytes = msg.split('\0').next().unwrap_or("").as_bytes().to_vec();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The calling thread's last error. The pointer stays valid until the next
/// call that sets or clears it on this thread.
pub(crate) fn last_error_ptr() -> *const libc::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The calling thread's last error as an owned string.
pub(crate) fn last_error_string() -> String {
    LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
}

// The exports, one file per API area, in the header's order. After the
// macros: macro_rules! are visible only below their definition.
mod version;
pub use version::*;
mod lifecycle;
pub use lifecycle::*;
mod setup;
pub use setup::*;
mod memslot;
pub use memslot::*;
mod vcpu;
pub use vcpu::*;
mod reap;
pub use reap::*;
mod sync;
pub use sync::*;
mod reaper;
pub use reaper::*;
mod stats;
pub use stats::*;
mod logging;
pub use logging::*;
mod compat;
pub use compat::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn boom(n: i32) -> i64 {
        ffi_boundary!("kds_test_boom", {
            if n > 0 {
                panic!("deliberate panic {n}");
            }
            Ok(7u64)
        })
    }

    #[test]
    fn a_panic_becomes_enotrecoverable_with_a_message() {
        assert_eq!(boom(0), 7);
        assert_eq!(boom(1), -i64::from(libc::ENOTRECOVERABLE));
        let msg = last_error_string();
        assert!(
            msg.contains("kds_test_boom") && msg.contains("deliberate panic 1"),
            "{msg}"
        );
    }

    #[test]
    fn sized_structs_read_and_write_only_what_both_sides_know() {
        // A newer caller's KdsMemslot: one more field, 0 or set.
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Newer {
            m: KdsMemslot,
            extra: u64,
        }
        let m = KdsMemslot {
            slot: 3,
            flags: 1,
            guest_phys_addr: 0x1000,
            memory_size: 0x2000,
            userspace_addr: 0x7000,
        };
        let mut n = Newer { m, extra: 0 };
        let p = (&n as *const Newer).cast::<KdsMemslot>();
        // SAFETY: each pointer here is to a live local of at least the
        // size passed.
        let got = unsafe { read_sized(p, size_of::<Newer>()) };
        assert_eq!(got.unwrap(), m);
        n.extra = 9;
        let p = (&n as *const Newer).cast::<KdsMemslot>();
        assert_eq!(
            // SAFETY: as above.
            unsafe { read_sized(p, size_of::<Newer>()) }
                .unwrap_err()
                .errno(),
            libc::E2BIG
        );
        // Shorter than ABI 1: refused.
        // SAFETY: as above.
        let short = unsafe { read_sized(&m as *const KdsMemslot, 24) }.unwrap_err();
        assert_eq!(short.errno(), libc::EINVAL);
        let c = KdsReaperConfig {
            high_water_pct: 50,
            min_interval_us: 7,
            max_interval_us: 9,
        };
        // SAFETY: as above.
        let got = unsafe { read_sized(&c as *const KdsReaperConfig, 12) };
        assert_eq!(got.unwrap(), c);

        // Output: exactly `size` bytes, zeroes past this library's struct.
        let s = Stats {
            entries_reaped: 1,
            reset_shortfall: 14,
            ..Default::default()
        };
        let mut buf = [u64::MAX; 20];
        let out = buf.as_mut_ptr().cast::<Stats>();
        assert_eq!(
            // SAFETY: `buf` has 160 bytes.
            unsafe { write_sized(out, 72, &s) }.unwrap(),
            size_of::<Stats>() as c_int
        );
        assert_eq!((buf[0], buf[8], buf[9]), (1, 0, u64::MAX));
        let out = buf.as_mut_ptr().cast::<Stats>();
        // SAFETY: as above.
        unsafe { write_sized(out, 8 * 16, &s) }.unwrap();
        assert_eq!((buf[13], buf[14], buf[15], buf[16]), (14, 0, 0, u64::MAX));
    }

    #[test]
    fn messages_name_the_c_functions() {
        assert_eq!(
            c_names("register it with add_vcpu first; (update_memslot), kds_vcpu_add_x"),
            "register it with kds_vcpu_add first; (kds_memslot_update), kds_vcpu_add_x"
        );
        assert_eq!(
            c_names("known: LOG_DIRTY_PAGES, READONLY; KVM_MEM_LOG_DIRTY_PAGES"),
            "known: KDS_MEM_LOG_DIRTY_PAGES, KDS_MEM_READONLY; KVM_MEM_LOG_DIRTY_PAGES"
        );
    }

    #[test]
    fn last_error_is_per_thread_and_never_null() {
        set_last_error("here");
        let other = std::thread::spawn(|| {
            assert!(!kds_last_error().is_null());
            last_error_string()
        })
        .join()
        .unwrap();
        assert_eq!(other, "");
        assert_eq!(last_error_string(), "here");
    }
}
