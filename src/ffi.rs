//! The C ABI (`../shared/abi.md`, version 1), a thin skin over the Rust
//! API ([`DirtyTracker`]): each export checks its pointer arguments
//! ([`try_ref_from_ptr!`]), runs inside the panic boundary
//! ([`ffi_boundary!`]), makes one call into the Rust API, and maps the
//! result to C: `>= 0` or `-errno`, with `kds_last_error()` set to the
//! export's name and the core's message.
//!
//! A Rust panic never unwinds into C: it becomes `-ENOTRECOVERABLE` (or
//! the return type's fallback, see [`ToC`]) with a message.
//!
//! The exports take raw pointers from C and are safe `extern "C"` fns, as
//! in rustls-ffi: the pointer contract is the C ABI's (abi.md), NULL is
//! checked here, and each dereference says why it is sound.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind};

use parking_lot::Mutex;

use crate::bitmap::words_for;
use crate::error::{Error, Result, errno_name, last_error_ptr, set_last_error};
use crate::logger;
use crate::tracker::DirtyTracker;
use crate::types::{KDS_ABI_VERSION, KdsMemslot, KdsReaperConfig, KdsStats, KdsVcpuStats};

/// An opaque handle on one VM's dirty tracking.
pub struct KdsVm {
    tracker: DirtyTracker,
    kick: Mutex<Option<Kick>>,
}

/// The VMM's "kick every vCPU out of guest mode" callback (`kds_set_kick`).
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
        let _guard = crate::ffi::quiet_panics();
        crate::ffi::finish($name, catch_unwind(AssertUnwindSafe(|| $body)))
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
            None => return Err(Error::inval(concat!(stringify!($ptr), " is NULL"))),
        }
    };
}

/// The C value of a finished export.
pub(crate) fn finish<T: ToC>(name: &str, r: std::thread::Result<Result<T>>) -> T::C {
    match r {
        Ok(Ok(v)) => v.ok(),
        Ok(Err(e)) => {
            log::debug!("{name}: {e}");
            set_last_error(&format!(
                "{name}: {} (-{})",
                e.message(),
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
fn write_out<T>(out: *mut T, v: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::inval("out is NULL"));
    }
    // SAFETY: a non-NULL `out` points to a writable `T` (ABI contract).
    unsafe { out.write(v) };
    Ok(())
}

fn new_handle(out: *mut *mut KdsVm, make: impl FnOnce() -> Result<DirtyTracker>) -> Result<()> {
    if out.is_null() {
        return Err(Error::inval("out is NULL"));
    }
    let h = Box::into_raw(Box::new(KdsVm {
        tracker: make()?,
        kick: Mutex::new(None),
    }));
    write_out(out, h)
}

/// The `KDS_ABI_VERSION` of the library linked in.
#[unsafe(no_mangle)]
pub extern "C" fn kds_abi_version() -> u32 {
    KDS_ABI_VERSION
}

/// A message describing the last failure on the calling thread: what
/// happened (the ioctl and errno where one failed) and what to do. Never
/// NULL; valid until the next `kds_` call on this thread that fails.
#[unsafe(no_mangle)]
pub extern "C" fn kds_last_error() -> *const libc::c_char {
    last_error_ptr()
}

/// Opens `/dev/kvm` and creates a VM (`KVM_CREATE_VM` with
/// `machine_type`, 0 on x86). The shim owns the VM fd and closes it in
/// `kds_vm_free`. On success `*out` is the new handle.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vm_create(machine_type: u64, out: *mut *mut KdsVm) -> c_int {
    ffi_boundary!("kds_vm_create", {
        new_handle(out, || DirtyTracker::create(machine_type))
    })
}

/// Wraps a VM fd the VMM created (QEMU's flow). The shim works on a
/// duplicate (`F_DUPFD_CLOEXEC`): the caller keeps ownership of `vm_fd`,
/// which stays usable after `kds_vm_free`. The VMM must not enable dirty
/// ring or manual-protect capabilities on the fd itself: the shim does.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vm_adopt(vm_fd: c_int, out: *mut *mut KdsVm) -> c_int {
    ffi_boundary!("kds_vm_adopt", {
        if vm_fd < 0 {
            return Err(Error::inval(format!("bad VM fd {vm_fd}")));
        }
        // SAFETY: not -1; the fd is only duplicated (F_DUPFD_CLOEXEC)
        // during the call, and a closed one is reported as EBADF.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm_fd) };
        new_handle(out, || DirtyTracker::adopt(&fd))
    })
}

/// Stops the adaptive reaper if it runs, unmaps every ring and frees
/// everything (and closes the VM fd the shim holds). NULL is a no-op. No
/// other call on `vm` may be running or follow.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vm_free(vm: *mut KdsVm) {
    ffi_boundary!("kds_vm_free", {
        if !vm.is_null() {
            // SAFETY: a non-NULL handle came from Box::into_raw in
            // new_handle and is freed exactly once (the caller's contract).
            // Dropping the tracker stops its reaper and frees everything.
            drop(unsafe { Box::from_raw(vm) });
        }
        Ok(Void)
    })
}

/// The VM fd the shim uses (for an adopted VM: its duplicate of the
/// caller's fd, which refers to the same VM). `-EINVAL` for NULL.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vm_fd(vm: *const KdsVm) -> c_int {
    ffi_boundary!("kds_vm_fd", {
        let v = try_ref_from_ptr!(vm);
        Ok(std::os::fd::AsRawFd::as_raw_fd(&v.tracker.vm_fd()))
    })
}

/// The VM's `KdsMode` (`KDS_MODE_BITMAP`, `KDS_MODE_RING` or
/// `KDS_MODE_RING_WITH_BITMAP`); `-EINVAL` for NULL.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vm_mode(vm: *const KdsVm) -> c_int {
    ffi_boundary!("kds_vm_mode", {
        let v = try_ref_from_ptr!(vm);
        Ok(v.tracker.mode() as c_int)
    })
}

/// Enables the per-vCPU dirty ring with `entries` entries (a power of
/// two): `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` where offered, else
/// `KVM_CAP_DIRTY_LOG_RING`. Before any vCPU and any memslot (`-EBUSY`
/// otherwise, also when the ring is already on). `-ENOTSUP` where the
/// kernel has no ring (stay in bitmap mode); `-EINVAL` when the size is
/// outside what the kernel allows (the message gives the limits). If
/// `kds_board_init(vm, KDS_BOARD_VGIC_ITS)` came first, this also enables
/// the backup bitmap, and is `-ENOTSUP` (ring left off) where the kernel
/// lacks it. On arm64 it always enables the backup bitmap with the ring
/// (mode `KDS_MODE_RING_WITH_BITMAP`, ITS or not), and is `-ENOTSUP` where
/// the kernel lacks it: arm64 logs a memslot's writes page by page only
/// when the memslot has a dirty bitmap, and loses them in huge-page-backed
/// memory otherwise.
#[unsafe(no_mangle)]
pub extern "C" fn kds_dirty_ring_enable(vm: *mut KdsVm, entries: u32) -> c_int {
    ffi_boundary!("kds_dirty_ring_enable", {
        try_ref_from_ptr!(vm).tracker.enable_dirty_ring(entries)
    })
}

/// The board-init ordering hook: call it as soon as the board has chosen
/// its interrupt controller, before the first memslot. With
/// `KDS_BOARD_VGIC_ITS` and a ring enabled, enables
/// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (mode becomes
/// `KDS_MODE_RING_WITH_BITMAP`); `-ENOTSUP` when the kernel lacks it (the
/// mode stays `KDS_MODE_RING`; the VMM must not use the ring with an
/// ITS). With the ITS flag after a memslot exists: `-EBUSY`, without
/// asking the kernel. Without a ring or without the flag, or when the
/// backup bitmap is already on (always so with a ring on arm64): records
/// the choice, returns 0. The same flags twice: 0; different flags:
/// `-EBUSY`. Unknown flags: `-EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_board_init(vm: *mut KdsVm, board_flags: u32) -> c_int {
    ffi_boundary!("kds_board_init", {
        try_ref_from_ptr!(vm).tracker.board_init(board_flags)
    })
}

/// (Added to abi.md v1.) Chooses whether bitmap tracking
/// (`KDS_MODE_BITMAP`, and the backup bitmap of
/// `KDS_MODE_RING_WITH_BITMAP`) uses `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
/// Default: on where the kernel offers it. With it, `KVM_GET_DIRTY_LOG`
/// no longer write-protects the whole slot; `kds_sync_slot` then clears
/// (`KVM_CLEAR_DIRTY_LOG`) exactly the pages it reported, before it
/// returns. What changes for the caller: nothing in what is reported; as
/// always, copy a reported page only after `kds_sync_slot` returned (a
/// write that lands after that is logged again). Call before the first
/// memslot (`-EBUSY` after); `-ENOTSUP` to enable it where the kernel
/// lacks it.
#[unsafe(no_mangle)]
pub extern "C" fn kds_set_manual_protect(vm: *mut KdsVm, enable: bool) -> c_int {
    ffi_boundary!("kds_set_manual_protect", {
        try_ref_from_ptr!(vm).tracker.set_manual_protect(enable)
    })
}

/// `KVM_SET_USER_MEMORY_REGION`: create, move, resize, change flags of, or
/// delete (`memory_size` 0) a memslot. Addresses and size must be
/// multiples of the host page size (`-EINVAL`). A resize, a new host
/// address or a READONLY change is done as delete + create, as the kernel
/// requires. Turning `KDS_MEM_LOG_DIRTY_PAGES` on starts tracking the
/// slot; off stops it and drops its pending bits. Deleting an unknown
/// slot: `-ENOENT`. The first memslot seals the board (see
/// `kds_board_init`). The host memory must stay mapped while the slot
/// exists.
#[unsafe(no_mangle)]
pub extern "C" fn kds_memslot_set(vm: *mut KdsVm, m: *const KdsMemslot) -> c_int {
    ffi_boundary!("kds_memslot_set", {
        let v = try_ref_from_ptr!(vm);
        let m = try_ref_from_ptr!(m);
        // SAFETY: the caller promises the host range stays mapped while
        // the slot exists (ABI contract, documented above).
        unsafe { v.tracker.set_memslot(m) }
    })
}

/// Registers a vCPU fd under `vcpu_index` (the caller keeps ownership of
/// the fd and keeps it open until `kds_vcpu_remove` or `kds_vm_free`). In
/// ring modes maps its ring; add vCPUs after `kds_dirty_ring_enable`.
/// An index already registered: `-EEXIST`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vcpu_add(vm: *mut KdsVm, vcpu_fd: c_int, vcpu_index: u32) -> c_int {
    ffi_boundary!("kds_vcpu_add", {
        let v = try_ref_from_ptr!(vm);
        if vcpu_fd < 0 {
            return Err(Error::inval(format!("bad vCPU fd {vcpu_fd}")));
        }
        // SAFETY: the fd is only used to map the vCPU's ring during the
        // call (a bad one fails that mmap).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vcpu_fd) };
        v.tracker.add_vcpu(&fd, vcpu_index)
    })
}

/// Harvests what is left in the vCPU's ring (published as by `kds_reap`),
/// unmaps it and forgets the vCPU. Unknown index: `-EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vcpu_remove(vm: *mut KdsVm, vcpu_index: u32) -> c_int {
    ffi_boundary!("kds_vcpu_remove", {
        try_ref_from_ptr!(vm).tracker.remove_vcpu(vcpu_index)
    })
}

/// Harvests every vCPU ring into the shim's per-slot bitmaps, then calls
/// `KVM_RESET_DIRTY_RINGS` once if anything was harvested, then publishes
/// the pages (only after the reset re-protected them). Returns the number
/// of entries harvested (0 in bitmap mode). A ring found completely full
/// counts a `ring_overflows` and reports every dirty-logged page dirty.
#[unsafe(no_mangle)]
pub extern "C" fn kds_reap(vm: *mut KdsVm) -> i64 {
    ffi_boundary!("kds_reap", { try_ref_from_ptr!(vm).tracker.reap() })
}

/// The same as `kds_reap` for one vCPU: call it on
/// `KVM_EXIT_DIRTY_RING_FULL` before re-entering the guest. Safe while
/// another thread runs `kds_reap`. When the ring is wedged (this call and
/// the previous one found nothing and no thread harvested this ring in
/// between; a kernel that overran the ring does this), every dirty-logged
/// page is reported dirty and the shim hands the entries the kernel counts
/// but never published back to it, so the vCPU can run again (counted in
/// `ring_recoveries`); where that is not possible yet, it returns 0 and the
/// reset it owes may free the ring by the next exit. Only after 1024 wedges
/// in a row does it return `-EOVERFLOW`: the ring can no longer be trusted
/// (every page was reported dirty; fail the migration rather than re-enter
/// the guest expecting progress). Unknown index: `-EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_reap_vcpu(vm: *mut KdsVm, vcpu_index: u32) -> i64 {
    ffi_boundary!("kds_reap_vcpu", {
        try_ref_from_ptr!(vm).tracker.reap_vcpu(vcpu_index)
    })
}

/// ORs into `bitmap` (`nbits` bits, at least one per page of the slot,
/// else `-EINVAL`) every page of `slot` dirtied since the previous sync of
/// that slot, and forgets them. Ring modes reap first (and wait for a reap
/// in flight on another thread); bitmap mode uses `KVM_GET_DIRTY_LOG`;
/// `KDS_MODE_RING_WITH_BITMAP` with `KDS_SYNC_FINAL` also drains the
/// kernel's backup bitmap. Returns the number of pages reported (bits set
/// to 1, whether or not they were 1 already). Unknown slot or slot without
/// `KDS_MEM_LOG_DIRTY_PAGES`: `-ENOENT`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_sync_slot(
    vm: *mut KdsVm,
    slot: u32,
    bitmap: *mut u64,
    nbits: u64,
    flags: u32,
) -> i64 {
    ffi_boundary!("kds_sync_slot", {
        let v = try_ref_from_ptr!(vm);
        if bitmap.is_null() {
            return Err(Error::inval("bitmap is NULL"));
        }
        let words = words_for(nbits);
        if words > (isize::MAX as usize) / 8 {
            return Err(Error::inval("nbits is impossibly large"));
        }
        // SAFETY: a non-NULL `bitmap` holds `nbits` bits, rounded up to
        // whole uint64_t words (ABI contract); no other reference to it
        // exists during the call.
        let out = unsafe { std::slice::from_raw_parts_mut(bitmap, words) };
        v.tracker.sync_slot_bits(slot, out, nbits, flags)
    })
}

/// Sets how the shim forces every vCPU out of guest mode: `kick_all`
/// must return only once every vCPU has left guest mode at least once
/// (a synchronous kick, as QEMU's `run_on_cpu` on all vCPUs). It is called
/// by `kds_flush` on the calling thread with no shim lock held. NULL
/// clears it.
#[unsafe(no_mangle)]
pub extern "C" fn kds_set_kick(
    vm: *mut KdsVm,
    kick_all: Option<extern "C" fn(opaque: *mut libc::c_void)>,
    opaque: *mut libc::c_void,
) -> c_int {
    ffi_boundary!("kds_set_kick", {
        let v = try_ref_from_ptr!(vm);
        *v.kick.lock() = kick_all.map(|func| Kick {
            func,
            opaque: opaque as usize,
        });
        Ok(())
    })
}

/// Calls the kick callback (so hardware dirty buffers such as Intel PML
/// reach the rings), then `kds_reap`. Returns entries harvested.
/// `-EBUSY` without a kick callback (see `kds_set_kick`).
#[unsafe(no_mangle)]
pub extern "C" fn kds_flush(vm: *mut KdsVm) -> i64 {
    ffi_boundary!("kds_flush", {
        let v = try_ref_from_ptr!(vm);
        let Some(k) = *v.kick.lock() else {
            return Err(Error::busy(
                "no kick callback: call kds_set_kick first (hardware dirty buffers such as \
                 Intel PML reach the rings only when vCPUs leave guest mode)",
            ));
        };
        // Called with no shim lock held: the VMM's kick may block.
        v.tracker.flush(|| (k.func)(k.opaque as *mut libc::c_void))
    })
}

/// (Added to abi.md v1) Starts the adaptive reaper: a thread inside the
/// library that checks every vCPU ring's fill level (reading entry flags,
/// no syscall) and calls `kds_reap` as soon as one ring reaches
/// `high_water_pct`, pausing between checks according to the fastest
/// ring's fill rate (from `min_interval_us` to `max_interval_us`), so that
/// a busy vCPU rarely exits with `KVM_EXIT_DIRTY_RING_FULL`. `cfg` NULL or
/// fields 0: defaults (25 %, 200 us, 50000 us). Replaces a VMM's own
/// fixed-period reaper thread; `kds_reap_vcpu` on ring-full exits and
/// `kds_sync_slot` work beside it. Counted in `reaper_reaps`. `-ENOTSUP`
/// without a dirty ring, `-EBUSY` when it already runs, `-EINVAL` for
/// knobs out of range. Stop it with `kds_reaper_stop` (`kds_vm_free` also
/// does).
#[unsafe(no_mangle)]
pub extern "C" fn kds_reaper_start(vm: *mut KdsVm, cfg: *const KdsReaperConfig) -> c_int {
    ffi_boundary!("kds_reaper_start", {
        let v = try_ref_from_ptr!(vm);
        // SAFETY: a non-NULL `cfg` points to a readable KdsReaperConfig
        // (ABI contract); it is copied, not kept.
        let c = unsafe { cfg.as_ref() }.copied().unwrap_or_default();
        v.tracker.start_reaper(&c)
    })
}

/// (Added to abi.md v1) Stops the adaptive reaper and waits for the thread
/// (at most the reap it is doing). 0 also when none runs. `-EDEADLK` when
/// called from the reaper thread itself (from a logger callback).
#[unsafe(no_mangle)]
pub extern "C" fn kds_reaper_stop(vm: *mut KdsVm) -> c_int {
    ffi_boundary!("kds_reaper_stop", {
        try_ref_from_ptr!(vm).tracker.stop_reaper()
    })
}

/// Copies the VM's counters since creation into `*out`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_stats(vm: *const KdsVm, out: *mut KdsStats) -> c_int {
    ffi_boundary!("kds_stats", {
        let v = try_ref_from_ptr!(vm);
        write_out(out, v.tracker.stats())
    })
}

/// Copies one vCPU's counters into `*out` (what dirty-rate and dirty-limit
/// features read). Unknown index: `-EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn kds_vcpu_stats(
    vm: *const KdsVm,
    vcpu_index: u32,
    out: *mut KdsVcpuStats,
) -> c_int {
    ffi_boundary!("kds_vcpu_stats", {
        let v = try_ref_from_ptr!(vm);
        if out.is_null() {
            return Err(Error::inval("out is NULL"));
        }
        write_out(out, v.tracker.vcpu_stats(vcpu_index)?)
    })
}

/// Routes the library's log records to `log` (level 1 error, 2 warning,
/// 3 info, 4 debug, 5 trace; records above `max_level` are dropped; `msg`
/// is valid only during the call). Process-wide; NULL turns logging off.
/// The callback may be called from any thread that calls into the shim.
#[unsafe(no_mangle)]
pub extern "C" fn kds_set_logger(
    log: Option<extern "C" fn(level: c_int, msg: *const libc::c_char, opaque: *mut libc::c_void)>,
    opaque: *mut libc::c_void,
    max_level: c_int,
) -> c_int {
    ffi_boundary!("kds_set_logger", {
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
        let msg = crate::error::last_error();
        assert!(
            msg.contains("kds_test_boom") && msg.contains("deliberate panic 1"),
            "{msg}"
        );
    }

    #[test]
    fn last_error_is_per_thread_and_never_null() {
        set_last_error("here");
        let other = std::thread::spawn(|| {
            assert!(!kds_last_error().is_null());
            crate::error::last_error()
        })
        .join()
        .unwrap();
        assert_eq!(other, "");
        assert_eq!(crate::error::last_error(), "here");
    }
}
