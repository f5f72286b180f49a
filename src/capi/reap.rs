//! Reaping: harvest the rings, reset them, publish the pages; the kick
//! that flushes hardware dirty buffers first.

use std::ffi::c_int;

use super::{KdsVm, Kick};
use crate::error::Error;

/// Harvests every vCPU ring into the shim's per-slot bitmaps, calls
/// KVM_RESET_DIRTY_RINGS once if anything was harvested, and only then
/// publishes the pages (the reset has re-protected them). A ring found
/// completely full (the kernel may have dropped entries) counts a
/// ring_overflows and reports every dirty-logged page dirty.
///
/// @return the number of entries harvested (0 in bitmap mode); -EINVAL
///         for NULL; the errno of KVM_RESET_DIRTY_RINGS.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_reap(vm: *mut KdsVm) -> i64 {
    ffi_boundary!("kds_reap", { try_ref_from_ptr!(vm).tracker.reap() })
}

/// kds_reap() for one vCPU: call it once on each KVM_EXIT_DIRTY_RING_FULL,
/// before re-entering the guest. Safe while another thread runs
/// kds_reap(). Not twice for one exit: when another thread emptied the
/// ring before the first call, two calls that find nothing look like the
/// wedge below, and handing entries back to a ring the kernel counts as
/// empty makes it exit ring-full for ever.
///
/// When the ring is wedged (this call and the previous one found nothing
/// and no thread harvested this ring in between: a kernel that overran the
/// ring does this), every dirty-logged page is reported dirty and the shim
/// hands the entries the kernel counts but never published back to it, so
/// the vCPU runs again (counted in ring_recoveries).
///
/// @return the number of entries harvested; 0 when the ring was wedged and
///         could not be freed yet (the reset the shim owes may free it by
///         the next exit); -EOVERFLOW after 1024 wedges in a row: the ring
///         can no longer be trusted (every page was reported dirty; fail
///         the migration rather than re-enter the guest expecting
///         progress); -ENOENT for an unknown index; -EINVAL for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vcpu_reap(vm: *mut KdsVm, vcpu_index: u32) -> i64 {
    ffi_boundary!("kds_vcpu_reap", {
        try_ref_from_ptr!(vm).tracker.reap_vcpu(vcpu_index)
    })
}

/// Sets how the shim forces every vCPU out of guest mode, for
/// kds_flush(). kick_all must return only once every vCPU has left guest
/// mode at least once (a synchronous kick, as QEMU's run_on_cpu on all
/// vCPUs). It is called on the thread calling kds_flush(), with no shim
/// lock held.
///
/// @param kick_all  the callback, or NULL to clear it
/// @param opaque    passed to kick_all
/// @return 0; -EINVAL for NULL vm.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_kick_set(
    vm: *mut KdsVm,
    kick_all: Option<extern "C" fn(opaque: *mut libc::c_void)>,
    opaque: *mut libc::c_void,
) -> c_int {
    ffi_boundary!("kds_kick_set", {
        let v = try_ref_from_ptr!(vm);
        *v.kick.lock() = kick_all.map(|func| Kick {
            func,
            opaque: opaque as usize,
        });
        Ok(())
    })
}

/// Calls the kick callback (so that hardware dirty buffers such as Intel
/// PML reach the rings), then kds_reap().
///
/// @return the number of entries harvested; -EBUSY without a kick callback
///         (see kds_kick_set()); -EINVAL for NULL; as kds_reap() otherwise.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_flush(vm: *mut KdsVm) -> i64 {
    ffi_boundary!("kds_flush", {
        let v = try_ref_from_ptr!(vm);
        let Some(k) = *v.kick.lock() else {
            return Err(Error::busy(
                "no kick callback: call kds_kick_set first (hardware dirty buffers such as \
                 Intel PML reach the rings only when vCPUs leave guest mode)",
            ));
        };
        // Called with no shim lock held: the VMM's kick may block.
        v.tracker.flush(|| (k.func)(k.opaque as *mut libc::c_void))
    })
}
