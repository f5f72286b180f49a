//! The adaptive reaper: a thread inside the library that reaps by fill
//! level.

use std::ffi::c_int;

use super::{KdsReaperConfig, KdsVm, read_sized};

/// Starts the adaptive reaper: a thread inside the library that checks
/// every vCPU ring's fill level (reading entry flags, no syscall) and
/// calls kds_reap() as soon as one ring reaches high_water_pct, pausing
/// between checks according to the fastest ring's fill rate (from
/// min_interval_us to max_interval_us), so that a busy vCPU rarely exits
/// with KVM_EXIT_DIRTY_RING_FULL. When kds_memslot_update() turns dirty
/// logging on for a slot (a migration starts), the thread checks at once
/// and then from min_interval_us on, doubling, until one ring gains an
/// eighth of the mark between two checks, a sample big enough to pace by:
/// vCPUs go from pushing nothing to pushing at full speed at that moment.
/// While no memslot logs dirty pages it sleeps, with no check at all.
/// It replaces a VMM's own fixed-period
/// reaper thread; kds_vcpu_reap() on ring-full exits and
/// kds_memslot_sync() work beside it. Counted in reaper_reaps. Stop it
/// with kds_reaper_disable() (kds_vm_free() also does).
///
/// @param cfg   the knobs, or NULL for the defaults (25 %, 200 us,
///              50000 us); a field left 0 takes its default
/// @param size  sizeof(KdsReaperConfig) as the caller knows it (at least
///              KDS_REAPER_CONFIG_SIZE_VER1); ignored when cfg is NULL
/// @return 0; -ENOTSUP without a dirty ring; -EBUSY when it already runs;
///         -EINVAL for NULL vm, a bad size or knobs out of range; -E2BIG
///         when cfg sets a field this library does not know.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_reaper_enable(
    vm: *mut KdsVm,
    cfg: *const KdsReaperConfig,
    size: usize,
) -> c_int {
    ffi_boundary!("kds_reaper_enable", {
        let v = try_ref_from_ptr!(vm);
        let c = if cfg.is_null() {
            KdsReaperConfig::default()
        } else {
            // SAFETY: `cfg` is `size` readable bytes (the export's contract).
            unsafe { read_sized(cfg, size) }?
        };
        v.tracker.enable_reaper(&c.to_config())
    })
}

/// Stops the adaptive reaper and waits for its thread (at most the reap
/// it is doing).
///
/// @return 0, also when none runs; -EDEADLK when called from the reaper
///         thread itself (from a logger callback); -EINVAL for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_reaper_disable(vm: *mut KdsVm) -> c_int {
    ffi_boundary!("kds_reaper_disable", {
        try_ref_from_ptr!(vm).tracker.disable_reaper()
    })
}
