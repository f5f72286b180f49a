//! Counters: the VM's and one vCPU's.

use std::ffi::c_int;

use super::{KdsVm, write_sized};
use crate::error::Error;
use crate::types::{Stats, VcpuStats};

/// Copies the VM's counters since its creation into *out.
///
/// @param out   the caller's KdsStats
/// @param size  sizeof(KdsStats) as the caller knows it: the library
///              writes that many bytes, its counters first, zeroes past
///              them (a caller built against a newer header reads 0 for
///              counters this library lacks)
/// @return the number of bytes that carry this library's counters
///         (sizeof(KdsStats) of the library, >= 0); -EINVAL for NULL or
///         a size above 4096.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_stats_get(vm: *const KdsVm, out: *mut Stats, size: usize) -> c_int {
    ffi_boundary!("kds_stats_get", {
        let v = try_ref_from_ptr!(vm);
        // SAFETY: `out` is NULL or `size` writable bytes (the export's contract).
        unsafe { write_sized(out, size, &v.tracker.stats()) }
    })
}

/// Copies one vCPU's counters into *out (what dirty-rate and dirty-limit
/// features read).
///
/// @param size  sizeof(KdsVcpuStats) as the caller knows it (as for
///              kds_stats_get())
/// @return the number of bytes that carry this library's counters;
///         -ENOENT for an unknown index; -EINVAL for NULL or a size above
///         4096.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vcpu_stats_get(
    vm: *const KdsVm,
    vcpu_index: u32,
    out: *mut VcpuStats,
    size: usize,
) -> c_int {
    ffi_boundary!("kds_vcpu_stats_get", {
        let v = try_ref_from_ptr!(vm);
        if out.is_null() {
            return Err(Error::inval("out is NULL"));
        }
        let s = v.tracker.vcpu_stats(vcpu_index)?;
        // SAFETY: as above.
        unsafe { write_sized(out, size, &s) }
    })
}
