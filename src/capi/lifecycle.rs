//! Lifecycle: create or adopt a VM, free it, read its fd and mode.

use std::ffi::c_int;

use super::{KdsMode, KdsVm, Void, new_handle};
use crate::error::Error;
use crate::tracker::DirtyTracker;

/// Opens /dev/kvm and creates a VM (KVM_CREATE_VM with machine_type). The
/// shim owns the VM fd and closes it in kds_vm_free().
///
/// @param machine_type  the KVM_CREATE_VM argument (0 on x86; the IPA
///                      size on arm64, 0 for the default)
/// @param out           receives the new handle
/// @return 0; -EINVAL (out NULL), or the errno of opening /dev/kvm or of
///         KVM_CREATE_VM.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vm_create(machine_type: u64, out: *mut *mut KdsVm) -> c_int {
    ffi_boundary!("kds_vm_create", {
        // SAFETY: `out` is NULL or writable (the export's contract).
        unsafe { new_handle(out, || DirtyTracker::create(machine_type)) }
    })
}

/// Wraps a VM fd the VMM created (QEMU's flow). The shim works on a
/// duplicate (F_DUPFD_CLOEXEC): the caller keeps ownership of vm_fd, which
/// stays usable after kds_vm_free(). The VMM must not enable dirty ring or
/// manual-protect capabilities on the fd itself: the shim does.
///
/// @param vm_fd  a KVM VM fd
/// @param out    receives the new handle
/// @return 0; -EINVAL (vm_fd negative or not a KVM VM fd, out NULL);
///         -EBUSY for a VM this process tracks already, or whose dirty
///         ring is enabled already (by an earlier KdsVm: a ring cannot be
///         taken over); the errno of duplicating vm_fd (-EBADF, -EMFILE).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vm_adopt(vm_fd: c_int, out: *mut *mut KdsVm) -> c_int {
    ffi_boundary!("kds_vm_adopt", {
        if vm_fd < 0 {
            return Err(Error::inval(format!("bad VM fd {vm_fd}")));
        }
        // SAFETY: not -1; the fd is only duplicated (F_DUPFD_CLOEXEC)
        // during the call, and a closed one is reported as EBADF.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm_fd) };
        // SAFETY: `out` is NULL or writable (the export's contract).
        unsafe { new_handle(out, || DirtyTracker::adopt_fd(fd)) }
    })
}

/// Ends tracking and hands the VM back running: stops the adaptive reaper
/// if it runs, turns dirty logging off on every memslot, harvests and
/// resets every ring (so no vCPU exits KVM_EXIT_DIRTY_RING_FULL again),
/// then unmaps every ring, frees everything and closes the VM fd the shim
/// holds. The memslots stay in the kernel. No other call on vm may be
/// running or follow.
///
/// @param vm  the handle, or NULL (nothing happens)
/// @return nothing; it cannot fail.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vm_free(vm: *mut KdsVm) {
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
/// caller's fd, which refers to the same VM).
///
/// @return the fd (>= 0); -EINVAL for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vm_fd(vm: *const KdsVm) -> c_int {
    ffi_boundary!("kds_vm_fd", {
        let v = try_ref_from_ptr!(vm);
        Ok(std::os::fd::AsRawFd::as_raw_fd(&v.tracker.vm_fd()))
    })
}

/// How the VM's dirty pages are tracked.
///
/// @return a KdsMode: KDS_MODE_BITMAP, KDS_MODE_RING or
///         KDS_MODE_RING_WITH_BITMAP; -EINVAL for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vm_mode(vm: *const KdsVm) -> c_int {
    ffi_boundary!("kds_vm_mode", {
        let v = try_ref_from_ptr!(vm);
        Ok(KdsMode::from(v.tracker.mode()) as c_int)
    })
}
