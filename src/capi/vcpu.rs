//! vCPUs: register a vCPU fd (and map its ring), forget it.

use std::ffi::c_int;

use super::KdsVm;
use crate::error::Error;

/// Registers a vCPU fd under vcpu_index; in ring modes maps its ring. Add
/// vCPUs after kds_dirty_ring_enable(). The caller keeps ownership of the
/// fd and keeps it open until kds_vcpu_remove() or kds_vm_free().
///
/// @return 0; -EEXIST for an index already registered; -EINVAL for NULL
///         or a negative fd; the errno of mapping the ring otherwise.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vcpu_add(vm: *mut KdsVm, vcpu_fd: c_int, vcpu_index: u32) -> c_int {
    ffi_boundary!("kds_vcpu_add", {
        let v = try_ref_from_ptr!(vm);
        if vcpu_fd < 0 {
            return Err(Error::inval(format!("bad vCPU fd {vcpu_fd}")));
        }
        // SAFETY: the fd is only used to map the vCPU's ring during the
        // call (a bad one fails that mmap).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vcpu_fd) };
        v.tracker.add_vcpu_index(fd, vcpu_index)
    })
}

/// Harvests what is left in the vCPU's ring (published as by kds_reap()),
/// unmaps it and forgets the vCPU.
///
/// @return 0; -ENOENT for an unknown index; -EINVAL for NULL; the errno of
///         KVM_RESET_DIRTY_RINGS otherwise.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vcpu_remove(vm: *mut KdsVm, vcpu_index: u32) -> c_int {
    ffi_boundary!("kds_vcpu_remove", {
        try_ref_from_ptr!(vm).tracker.remove_vcpu(vcpu_index)
    })
}
