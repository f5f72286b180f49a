//! The end of tracking: the VM handed back running, and what keeps the
//! memory of region slots mapped after the tracker is gone.

use super::*;

impl Vm {
    /// Ends tracking (the tracker is going): turns dirty logging off on
    /// every slot, then harvests and resets every ring, so that the kernel
    /// pushes nothing more and no vCPU exits ring-full again. Every step
    /// is tried; the first failure is returned.
    pub fn end_tracking(&self) -> Result<()> {
        let logged: Vec<Region> = self
            .slots
            .read()
            .values()
            .filter(|s| s.dirty.is_some())
            .map(|s| Region {
                flags: s.region.flags & !MEM_LOG_DIRTY_PAGES,
                ..s.region
            })
            .collect();
        let mut first = None;
        for m in &logged {
            // SAFETY: the slot keeps the memory it maps now (same address
            // and size); only its flags change.
            if let Err(e) = unsafe { self.update_memslot(m, None) } {
                log::warn!(
                    "ending tracking: logging stays on for slot {:#x}: {e}",
                    m.slot
                );
                first.get_or_insert(e);
            }
        }
        // The kernel pushes no entry once logging is off on every slot;
        // this reap hands every entry pushed before back to it.
        if let Err(e) = self.reap() {
            log::warn!("ending tracking: the last reap failed: {e}");
            first.get_or_insert(e);
        }
        log::info!(
            "tracking ended: dirty logging off on {} slot(s), every ring reset",
            logged.len()
        );
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Vm {
    /// What still keeps a slot's memory mapped (a slot the kernel still
    /// has) is never released: the kernel VM outlives this one while any
    /// fd of it is open (the VMM's `VmFd`, its `VcpuFd`s), and the guest
    /// may run on. Deleting the slot first releases it. A reaper thread
    /// still running is told to end.
    fn drop(&mut self) {
        // A reaper thread asleep while nothing logs would wait for ever:
        // the tracker that owns it stops it first, except when dropped
        // inside one of its own calls.
        if let Some(w) = self.reaper_wake.get_mut().take() {
            w.stop();
        }
        let kept = std::mem::take(self.kept.get_mut());
        if !kept.is_empty() {
            log::info!(
                "{} memslot(s) still map memory the tracker kept: it stays mapped for the \
                 life of the process (delete_memslot before dropping the tracker releases it)",
                kept.len()
            );
        }
        for (_, (_, keeper)) in kept {
            std::mem::forget(keeper);
        }
    }
}
