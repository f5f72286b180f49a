//! Memslots: KVM_SET_USER_MEMORY_REGION through the shim.

use std::ffi::c_int;

use super::{KdsMemslot, KdsVm, read_sized};
use crate::types::Memslot;

/// Creates, moves, resizes, changes the flags of, or deletes (memory_size
/// 0) a memslot (KVM_SET_USER_MEMORY_REGION). A resize, a new host address
/// or a READONLY change is done as delete + create, as the kernel
/// requires. Turning KDS_MEM_LOG_DIRTY_PAGES on starts tracking the slot;
/// turning it off stops it and drops its pending pages. The first memslot
/// seals the board (see kds_board_init()). The host memory must stay
/// mapped while the slot exists.
///
/// @param m     the memslot
/// @param size  sizeof(KdsMemslot) as the caller knows it (at least
///              KDS_MEMSLOT_SIZE_VER1; bytes past this library's struct
///              must be 0)
/// @return 0; -EINVAL for NULL, a bad size, or addresses or a size that
///         are not multiples of the host page size; -E2BIG when m sets a
///         field this library does not know; -ENOENT to delete an unknown
///         slot; the errno of KVM_SET_USER_MEMORY_REGION otherwise.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_memslot_update(
    vm: *mut KdsVm,
    m: *const KdsMemslot,
    size: usize,
) -> c_int {
    ffi_boundary!("kds_memslot_update", {
        let v = try_ref_from_ptr!(vm);
        // SAFETY: `m` is NULL or `size` readable bytes (the export's contract).
        let m: Memslot = unsafe { read_sized(m, size) }?.to_memslot()?;
        // SAFETY: the caller promises the host range stays mapped while
        // the slot exists (ABI contract, documented above).
        unsafe { v.tracker.update_memslot(&m) }
    })
}
