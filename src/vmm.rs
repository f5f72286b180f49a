//! vm-memory integration (feature `vm-memory`): memslots from vm-memory's
//! regions, which the tracker keeps alive while their slot maps them, and
//! syncs merged into a vm-memory [`Bitmap`].

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use crate::error::Result;
use crate::tracker::DirtyTracker;
use crate::types::{Memslot, MemslotFlags, SlotId, SyncReport, SyncStage};

impl DirtyTracker {
    /// Creates or changes memslot `slot` to map `region` (at its guest
    /// address) with `flags`: the safe form of
    /// [`update_memslot`](Self::update_memslot). The tracker keeps `region`
    /// (its `Arc`) until [`delete_memslot`](Self::delete_memslot) removed
    /// the slot from the kernel or an update pointed it at other memory;
    /// past the tracker's own life if the slot is still there (the kernel
    /// VM outlives the tracker while the VMM holds its fds): the guest never
    /// reaches freed memory. See "Soundness" on [`DirtyTracker`].
    ///
    /// Errors: [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists)
    /// when the region's guest range overlaps another slot's.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kvm_dirty_shim::{BoardFlags, DirtyTracker, MemslotFlags, SlotId};
    /// use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};
    ///
    /// let tracker = DirtyTracker::create(0).unwrap();
    /// tracker.board_init(BoardFlags::empty()).unwrap();
    /// let mem = MmapRegion::<()>::new(1 << 20).unwrap();
    /// let region = Arc::new(GuestRegionMmap::new(mem, GuestAddress(0)).unwrap());
    /// tracker
    ///     .update_memslot_region(SlotId::new(0), Arc::clone(&region), MemslotFlags::LOG_DIRTY_PAGES)
    ///     .unwrap();
    /// ```
    pub fn update_memslot_region<B: Bitmap + Send + Sync + 'static>(
        &self,
        slot: SlotId,
        region: Arc<GuestRegionMmap<B>>,
        flags: MemslotFlags,
    ) -> Result<()> {
        let m = Memslot::new(
            slot,
            region.start_addr().0,
            region.as_ptr() as u64,
            region.len(),
        )
        .with_flags(flags);
        let _g = crate::reentry::enter("update_memslot_region")?;
        // SAFETY: `region` is a live mapping of `len` bytes at `as_ptr`;
        // the VM keeps this Arc (so the mapping) until the slot is deleted
        // or remapped, and for ever if the VM goes while the kernel still
        // has the slot (`Vm::keep_memory`, `Vm`'s `Drop`).
        unsafe { self.vm_core().update_memslot(&m.region(), Some(region)) }
    }

    /// Syncs `slot` (as [`sync_memslot_each`](Self::sync_memslot_each))
    /// into `bitmap`, a vm-memory [`Bitmap`] of the slot's memory (offset 0
    /// is the slot's first byte), such as the one a VMM keeps its own
    /// device writes in: each dirty page is marked there, with no buffer
    /// of the slot's size in ring modes. For a region's own bitmap pass
    /// `&region.bitmap()` (`GuestMemoryRegion::bitmap`, a slice of it) or
    /// `MmapRegion::bitmap(&region)`.
    pub fn sync_memslot_into<B: Bitmap>(
        &self,
        slot: SlotId,
        stage: SyncStage,
        bitmap: &B,
    ) -> Result<SyncReport> {
        let ps = self.page_size() as usize;
        self.sync_memslot_each(slot, stage, |page| {
            bitmap.mark_dirty(page as usize * ps, ps)
        })
    }
}
