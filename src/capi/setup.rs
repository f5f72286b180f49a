//! Setup, before any memslot: the dirty ring, the board-init ordering
//! hook, manual dirty-log protect.

use std::ffi::c_int;

use super::{KDS_BOARD_VGIC_ITS, KdsVm};
use crate::error::Error;
use crate::types::BoardFlags;

/// Enables the per-vCPU dirty ring: KVM_CAP_DIRTY_LOG_RING_ACQ_REL where
/// the kernel offers it, else KVM_CAP_DIRTY_LOG_RING. Call it at
/// accelerator init, before any vCPU and any memslot.
///
/// If kds_board_init(vm, KDS_BOARD_VGIC_ITS) came first, this also enables
/// the backup bitmap (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP). On arm64 it
/// always does, ITS or not: arm64 logs a memslot's writes page by page
/// only when the memslot has a dirty bitmap, and loses them in
/// huge-page-backed memory otherwise. The mode is then
/// KDS_MODE_RING_WITH_BITMAP.
///
/// @param entries  ring size in entries, a power of two within the
///                 kernel's limits
/// @return 0; -ENOTSUP where the kernel has no ring, lacks the backup
///         bitmap that this call needs, or is riscv64 before Linux 7.2
///         (whose ring misses writes to huge pages) (the ring stays off:
///         stay in bitmap mode); -EINVAL for NULL or a size outside the kernel's limits
///         (the message gives them); -EBUSY after a memslot or a vCPU
///         exists, or when the ring is already on; the errno of
///         KVM_ENABLE_CAP otherwise.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_dirty_ring_enable(vm: *mut KdsVm, entries: u32) -> c_int {
    ffi_boundary!("kds_dirty_ring_enable", {
        try_ref_from_ptr!(vm).tracker.enable_dirty_ring(entries)
    })
}

/// The board-init ordering hook: call it as soon as the board has chosen
/// its interrupt controller, before the first memslot.
///
/// With KDS_BOARD_VGIC_ITS and a ring enabled, enables
/// KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (mode KDS_MODE_RING_WITH_BITMAP).
/// Without a ring or without the flag, or when the backup bitmap is
/// already on (always so with a ring on arm64), it records the choice.
///
/// @param board_flags  KDS_BOARD_* flags
/// @return 0, also for the same flags twice; -ENOTSUP when the kernel
///         lacks the backup bitmap (the mode stays KDS_MODE_RING: do not
///         use the ring with an ITS); -EBUSY with the ITS flag after a
///         memslot exists (refused without asking the kernel, which may
///         crash later), or with flags different from an earlier call;
///         -EINVAL for NULL or unknown flags.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_board_init(vm: *mut KdsVm, board_flags: u32) -> c_int {
    ffi_boundary!("kds_board_init", {
        let v = try_ref_from_ptr!(vm);
        let flags = BoardFlags::from_bits(board_flags).ok_or_else(|| {
            Error::inval(format!(
                "unknown board flags {:#x} (known: KDS_BOARD_VGIC_ITS)",
                board_flags & !KDS_BOARD_VGIC_ITS
            ))
        })?;
        v.tracker.board_init(flags)
    })
}

/// Chooses whether bitmap tracking (KDS_MODE_BITMAP, and the backup bitmap
/// of KDS_MODE_RING_WITH_BITMAP) uses KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
/// on by default where the kernel offers it. With it, KVM_GET_DIRTY_LOG
/// no longer write-protects the whole slot, and kds_memslot_sync() clears
/// (KVM_CLEAR_DIRTY_LOG) exactly the pages it reported before it returns.
/// Nothing changes in what is reported: as always, copy a reported page
/// only after kds_memslot_sync() returned.
///
/// @param enable  true to use it, false not to
/// @return 0; -EBUSY after the first memslot; -ENOTSUP to enable it where
///         the kernel lacks it; -EINVAL for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_manual_protect_set(vm: *mut KdsVm, enable: bool) -> c_int {
    ffi_boundary!("kds_manual_protect_set", {
        try_ref_from_ptr!(vm).tracker.set_manual_protect(enable)
    })
}
