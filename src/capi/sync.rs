//! Syncing: a memslot's dirty pages into the caller's bitmap.

use super::{KDS_SYNC_FINAL, KdsVm};
use crate::bitmap::words_for;
use crate::error::Error;
use crate::types::{SlotId, SyncStage};

/// ORs into bitmap every page of the slot dirtied since the previous sync
/// of that slot, and forgets them. Ring modes reap first (and wait for a
/// reap in flight on another thread, so that nothing written before the
/// call is missed); bitmap mode uses KVM_GET_DIRTY_LOG (and
/// KVM_CLEAR_DIRTY_LOG with manual protect). In KDS_MODE_RING_WITH_BITMAP,
/// KDS_SYNC_FINAL also drains the kernel's backup bitmap: pass it at the
/// last stage of migration, with the vCPUs stopped.
///
/// Bit i % 64 of word i / 64 is page i of the slot.
///
/// @param slot    the memslot, as in KdsMemslot.slot
/// @param bitmap  nbits bits, rounded up to whole uint64_t words
/// @param nbits   at least one bit per page of the slot
/// @param flags   0 or KDS_SYNC_FINAL
/// @return the number of pages reported (bits set to 1, whether or not
///         they were 1 already); -ENOENT for an unknown slot or one
///         without KDS_MEM_LOG_DIRTY_PAGES; -EINVAL for NULL, too small a
///         bitmap or unknown flags; the errno of the ioctl that failed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_memslot_sync(
    vm: *mut KdsVm,
    slot: u32,
    bitmap: *mut u64,
    nbits: u64,
    flags: u32,
) -> i64 {
    ffi_boundary!("kds_memslot_sync", {
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
        if flags & !KDS_SYNC_FINAL != 0 {
            return Err(Error::inval(format!(
                "unknown flags {:#x} (known: KDS_SYNC_FINAL)",
                flags & !KDS_SYNC_FINAL
            )));
        }
        let r = v
            .tracker
            .sync_memslot_bits(slot, out, nbits, flags & KDS_SYNC_FINAL != 0)?;
        Ok(r.pages)
    })
}

/// Called by kds_memslot_sync_runs() for each run of consecutive bitmap
/// words that hold dirty pages: bit j % 64 of bits[j / 64] is the slot's
/// page first_page + j, for j below nwords * 64. first_page is a multiple
/// of 64; bits is valid only during the call.
pub type KdsDirtyRunFn = Option<
    extern "C" fn(opaque: *mut libc::c_void, first_page: u64, bits: *const u64, nwords: u64),
>;

/// As kds_memslot_sync(), but hands the dirty pages to run, a run of
/// consecutive bitmap words at a time (in ascending order, at most
/// KDS_SYNC_RUN_WORDS_MAX words a run, never an empty one), instead of
/// ORing them into a bitmap of the slot's size. In ring modes it visits
/// only the words that hold dirty pages: the sync costs what was dirtied,
/// not the slot's size (a caller with kds_memslot_sync() clears, fills and
/// scans a bitmap of the whole slot each time). Bits past the slot's last
/// page are 0.
///
/// run is called on this thread, before kds_memslot_sync_runs() returns,
/// every call but the last with the VM's reap lock held: a kds_ function
/// it calls (on any VM) fails with -EDEADLK instead of waiting for itself.
///
/// @param slot    the memslot, as in KdsMemslot.slot
/// @param flags   0 or KDS_SYNC_FINAL
/// @param run     the callback
/// @param opaque  passed to run
/// @return as kds_memslot_sync(): the number of pages reported;
///         -ENOENT for an unknown slot or one without
///         KDS_MEM_LOG_DIRTY_PAGES; -EINVAL for NULL or unknown flags; the
///         errno of the ioctl that failed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_memslot_sync_runs(
    vm: *mut KdsVm,
    slot: u32,
    flags: u32,
    run: KdsDirtyRunFn,
    opaque: *mut libc::c_void,
) -> i64 {
    ffi_boundary!("kds_memslot_sync_runs", {
        let v = try_ref_from_ptr!(vm);
        let Some(run) = run else {
            return Err(Error::inval("run is NULL"));
        };
        if flags & !KDS_SYNC_FINAL != 0 {
            return Err(Error::inval(format!(
                "unknown flags {:#x} (known: KDS_SYNC_FINAL)",
                flags & !KDS_SYNC_FINAL
            )));
        }
        let stage = if flags & KDS_SYNC_FINAL != 0 {
            SyncStage::Final
        } else {
            SyncStage::Live
        };
        let r = v
            .tracker
            .sync_memslot_runs(SlotId::from_raw(slot), stage, |first, words| {
                run(opaque, first, words.as_ptr(), words.len() as u64)
            })?;
        Ok(r.pages)
    })
}

/// Tells the library that the caller is about to read (send) the pages
/// first_page .. first_page + npages of the slot that its syncs reported:
/// those written again since their report are left out of the next sync,
/// which would report them for a write the read already carries. What
/// KVM_CLEAR_DIRTY_LOG does for a bitmap with manual protect (QEMU clears
/// each chunk of a RAMBlock right before sending its first page). Only
/// pages a sync reported since the last clear of their range are left
/// out; a write after this call is reported as always. Call it only right
/// before reading the pages: a page left out here but never read is lost.
///
/// Ring modes reap every ring first. Nothing is left out in bitmap mode
/// (each sync clears what it reports), after a ring overrun until the next
/// sync, or for a slot changed since its last sync.
///
/// @param slot        the memslot, as in KdsMemslot.slot
/// @param first_page  the first page, an index in the slot
/// @param npages      pages from first_page, all within the slot
/// @return the number of pages left out; -ENOENT for an unknown slot or
///         one without KDS_MEM_LOG_DIRTY_PAGES; -EINVAL for NULL or a range
///         past the slot's end; the errno of the ioctl that failed (the
///         reset).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kds_memslot_clear(
    vm: *mut KdsVm,
    slot: u32,
    first_page: u64,
    npages: u64,
) -> i64 {
    ffi_boundary!("kds_memslot_clear", {
        let v = try_ref_from_ptr!(vm);
        let Some(end) = first_page.checked_add(npages) else {
            return Err(Error::inval("first_page + npages overflows"));
        };
        let n = v
            .tracker
            .clear_memslot(SlotId::from_raw(slot), first_page..end)?;
        Ok(n)
    })
}
