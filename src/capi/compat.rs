//! The ABI 1 names, kept for callers built against ABI 1: each calls its
//! ABI 2 successor, passing the ABI 1 size of the struct it takes, so it
//! reads and writes exactly the ABI 1 layout. New code uses the ABI 2
//! names (doc/abi.md, "ABI history").

use std::ffi::c_int;

use super::*;
use crate::types::{Stats, VcpuStats};

/// ABI 1 name of kds_manual_protect_set().
#[deprecated(note = "use kds_manual_protect_set")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_set_manual_protect(vm: *mut KdsVm, enable: bool) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_manual_protect_set(vm, enable) }
}

/// ABI 1: kds_memslot_update() with size KDS_MEMSLOT_SIZE_VER1.
#[deprecated(note = "use kds_memslot_update")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_memslot_set(vm: *mut KdsVm, m: *const KdsMemslot) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_memslot_update(vm, m, KDS_MEMSLOT_SIZE_VER1) }
}

/// ABI 1 name of kds_vcpu_reap().
#[deprecated(note = "use kds_vcpu_reap")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_reap_vcpu(vm: *mut KdsVm, vcpu_index: u32) -> i64 {
    // SAFETY: the same arguments, under the same contract.
    let r = unsafe { kds_vcpu_reap(vm, vcpu_index) };
    abi1_unknown_vcpu(r)
}

/// ABI 1 name of kds_memslot_sync().
#[deprecated(note = "use kds_memslot_sync")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_sync_slot(
    vm: *mut KdsVm,
    slot: u32,
    bitmap: *mut u64,
    nbits: u64,
    flags: u32,
) -> i64 {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_memslot_sync(vm, slot, bitmap, nbits, flags) }
}

/// ABI 1 name of kds_kick_set().
#[deprecated(note = "use kds_kick_set")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_set_kick(
    vm: *mut KdsVm,
    kick_all: Option<extern "C" fn(opaque: *mut libc::c_void)>,
    opaque: *mut libc::c_void,
) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_kick_set(vm, kick_all, opaque) }
}

/// ABI 1: kds_reaper_enable() with size KDS_REAPER_CONFIG_SIZE_VER1.
#[deprecated(note = "use kds_reaper_enable")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_reaper_start(vm: *mut KdsVm, cfg: *const KdsReaperConfig) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_reaper_enable(vm, cfg, KDS_REAPER_CONFIG_SIZE_VER1) }
}

/// ABI 1 name of kds_reaper_disable().
#[deprecated(note = "use kds_reaper_disable")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_reaper_stop(vm: *mut KdsVm) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_reaper_disable(vm) }
}

/// ABI 1: writes the first KDS_STATS_SIZE_VER1 bytes of KdsStats (its 9
/// ABI 1 counters) and nothing past them.
///
/// @return 0, or as kds_stats_get().
#[deprecated(note = "use kds_stats_get, which takes the caller's sizeof(KdsStats)")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_stats(vm: *const KdsVm, out: *mut Stats) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_stats_get(vm, out, KDS_STATS_SIZE_VER1).min(0) }
}

/// ABI 1: writes the KDS_VCPU_STATS_SIZE_VER1 bytes of ABI 1's
/// KdsVcpuStats.
///
/// @return 0, or as kds_vcpu_stats_get().
#[deprecated(note = "use kds_vcpu_stats_get, which takes the caller's sizeof(KdsVcpuStats)")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_vcpu_stats(
    vm: *const KdsVm,
    vcpu_index: u32,
    out: *mut VcpuStats,
) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    let r = unsafe { kds_vcpu_stats_get(vm, vcpu_index, out, KDS_VCPU_STATS_SIZE_VER1).min(0) };
    abi1_unknown_vcpu(r.into()) as c_int
}

/// ABI 1 name of kds_logger_set().
#[deprecated(note = "use kds_logger_set")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_set_logger(
    log: Option<extern "C" fn(level: c_int, msg: *const libc::c_char, opaque: *mut libc::c_void)>,
    opaque: *mut libc::c_void,
    max_level: c_int,
) -> c_int {
    // SAFETY: the same arguments, under the same contract.
    unsafe { kds_logger_set(log, opaque, max_level) }
}

/// ABI 1 said `-EINVAL` for an unknown vCPU index where ABI 2 says
/// `-ENOENT`: an ABI 1 name returns what ABI 1 promised.
fn abi1_unknown_vcpu(r: i64) -> i64 {
    if r != -i64::from(libc::ENOENT) {
        return r;
    }
    let msg = last_error_string().replace("(-ENOENT)", "(-EINVAL)");
    set_last_error(&msg);
    -i64::from(libc::EINVAL)
}
