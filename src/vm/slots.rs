//! The memslot table: `KVM_SET_USER_MEMORY_REGION` through the shim, with
//! the shim's per-slot bitmaps kept in step.

use super::*;

impl Vm {
    pub(super) fn kernel_set(&self, m: &Region, what: &str) -> Result<()> {
        // SAFETY: the C caller promises (ABI) that the host range of the
        // slot stays mapped while the slot exists; a deletion passes size 0.
        unsafe { self.kvm.update_memslot(m) }.map_err(|e| {
            let err = Error::sys(
                &format!("KVM_SET_USER_MEMORY_REGION ({what} slot {:#x})", m.slot),
                e,
                "check the slot id, the address ranges (no overlap) and the slot limit",
            );
            // The kernel's EEXIST: the guest-physical range overlaps
            // another slot's.
            if e == libc::EEXIST {
                err.into_kind(ErrorKind::AlreadyExists)
            } else {
                err
            }
        })
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create, move, resize, change flags or
    /// delete (size 0) a memslot, keeping the shim's bitmaps in step.
    /// On success the VM keeps `keeper` (the memory's owner) while the slot
    /// maps it; with `None` it lets go of what it kept for the slot unless
    /// the slot still maps that memory (a move or a flags change). Both in
    /// the same hold of the lifecycle lock as the kernel's update: two
    /// updates of one slot on two threads cannot leave the VM keeping the
    /// memory of the one the kernel no longer maps.
    ///
    /// # Safety
    /// `m.userspace_addr .. + m.memory_size` must be memory of this process
    /// that stays mapped while the slot exists: kept alive by `keeper`, or
    /// by the caller.
    pub unsafe fn update_memslot(&self, m: &Region, keeper: Option<Keeper>) -> Result<()> {
        // What the VM lets go of is dropped (a vm-memory region unmapped)
        // here, once the lifecycle lock is released.
        let mut released = None;
        let r = self.update_memslot_locked(m, keeper, &mut released);
        drop(released);
        r
    }

    fn update_memslot_locked(
        &self,
        m: &Region,
        keeper: Option<Keeper>,
        released: &mut Option<Keeper>,
    ) -> Result<()> {
        let known = MEM_LOG_DIRTY_PAGES | MEM_READONLY;
        if m.flags & !known != 0 {
            return Err(Error::inval(format!(
                "unknown flags {:#x} (known: LOG_DIRTY_PAGES, \
                 READONLY)",
                m.flags & !known
            )));
        }
        let ps = self.page_size;
        if !(m.memory_size.is_multiple_of(ps)
            && m.guest_phys_addr.is_multiple_of(ps)
            && m.userspace_addr.is_multiple_of(ps))
        {
            return Err(Error::inval(format!(
                "slot {:#x}: guest_phys_addr {:#x}, userspace_addr {:#x} and \
                 memory_size {:#x} must be multiples of the page size {ps}",
                m.slot, m.guest_phys_addr, m.userspace_addr, m.memory_size
            )));
        }
        let mut life = self.life.lock();
        let old = self.slot(m.slot);
        if m.memory_size == 0 {
            let Some(old) = old else {
                return Err(Error::new(
                    libc::ENOENT,
                    format!("delete of unknown slot {:#x}", m.slot),
                ));
            };
            // Under the reap lock, as every update (see below).
            let mut st = self.reap.lock();
            self.kernel_set(m, "delete")?;
            if old.dirty.is_some() && self.mode().has_ring() {
                // The vCPUs may have pushed entries for this slot up to
                // the delete (the caller's last sync came before it). The
                // kernel pushes none after KVM_SET_USER_MEMORY_REGION has
                // returned (it waits for SRCU readers, vCPUs included), and
                // the id names no other slot until this returns (the
                // lifecycle lock): harvest them into this slot's bits now.
                if let Err(e) = self.reap_all(&mut st) {
                    log::warn!("slot {:#x} deleted; reaping its last entries: {e}", m.slot);
                }
            }
            self.slots.write().remove(&m.slot);
            drop(st);
            // Address 0: no memory is mapped there.
            *released = self.keep_memory(m.slot, 0, None);
            if let Some(d) = old.dirty.as_ref().filter(|d| d.count() > 0) {
                self.retire(&old.region, old.npages, d.clone());
            }
            log::debug!("slot {:#x} deleted ({} pages)", m.slot, old.npages);
            return Ok(());
        }
        if old.is_none() && !life.has_memslot() {
            self.maybe_enable_manual_protect();
            let mode = self.mode();
            log::info!(
                "first memslot: the mode is now fixed at {} (Mode::{mode:?})",
                mode.c_name()
            );
        }
        // The kernel moves a slot or changes its LOG flag in place; any
        // other change (size, host address, READONLY) is delete + create.
        let recreate = old.as_ref().is_some_and(|o| {
            o.region.memory_size != m.memory_size
                || o.region.userspace_addr != m.userspace_addr
                || (o.region.flags ^ m.flags) & MEM_READONLY != 0
        });
        // Allocate before touching the kernel: out of memory (RLIMIT_AS, say)
        // must leave the VM as it was, not abort the VMM.
        let npages = m.memory_size / ps;
        let keep_bits = !recreate && old.as_ref().is_some_and(|o| o.dirty.is_some());
        let fresh = if m.flags & MEM_LOG_DIRTY_PAGES != 0 && !keep_bits {
            Some(Arc::new(AtomicBitmap::try_new(npages).ok_or_else(
                || {
                    Error::new(
                        libc::ENOMEM,
                        format!(
                            "slot {:#x}: cannot allocate the shim's dirty bitmap \
                         of {npages} pages ({} bytes): out of memory; nothing was changed",
                            m.slot,
                            npages.div_ceil(64) * 8
                        ),
                    )
                },
            )?))
        } else {
            None
        };
        // Ring modes: the pages syncs report, for `clear_memslot`. Empty at
        // every change of the slot (what earlier syncs reported is not used
        // by a later clear); without the memory, clears leave nothing out.
        let reported = if m.flags & MEM_LOG_DIRTY_PAGES != 0 && self.mode().has_ring() {
            AtomicBitmap::try_new(npages).map(Arc::new)
        } else {
            None
        };
        self.slots.write().try_reserve(1).map_err(|_| {
            Error::new(
                libc::ENOMEM,
                "out of memory for the slot table; nothing was changed",
            )
        })?;
        // The reap lock from here on, across the kernel's update, for two
        // reasons:
        // - the kernel holds its memslot lock (`slots_lock`) for the whole
        //   update, for milliseconds on a large slot whose logging changes,
        //   and KVM_RESET_DIRTY_RINGS takes it too. A reset issued now on
        //   another thread would sleep until the update is done, which the
        //   shim cannot tell from a stop that cut the reset short
        //   (`kvm::Reset::switched_out`): it would re-arm logging on every
        //   slot and report every page. Measured: 38 of 1,403 resets beside
        //   20 logging toggles of a 16 GiB slot (tests/reaper.rs); in QEMU,
        //   which turns logging on slot by slot at the start of every
        //   migration, the first sync of a 64 GiB guest took 60 and 97 ms
        //   instead of 8. Waiting here, for the reap lock, is the same wait
        //   without the doubt;
        // - no reap on another thread can find the first entries the kernel
        //   pushes for a slot that starts logging before its bitmap is in
        //   the table below, nor publish into the old bitmap of a slot
        //   between the copy of its bits and its replacement.
        let mut reap_lock = self.reap.lock();
        if let Some(o) = old.as_ref().filter(|_| recreate) {
            let del = Region {
                memory_size: 0,
                ..o.region
            };
            self.kernel_set(&del, "delete for resize of")?;
        }
        if let Err(e) = self.kernel_set(m, if old.is_some() { "update" } else { "create" }) {
            if recreate {
                // The old slot is gone from the kernel: forget it too.
                self.slots.write().remove(&m.slot);
            }
            return Err(e);
        }
        let stops_logging =
            m.flags & MEM_LOG_DIRTY_PAGES == 0 && old.as_ref().is_some_and(|o| o.dirty.is_some());
        if stops_logging && self.mode().has_ring() {
            // Entries pushed before logging went off would otherwise be
            // skipped later as naming a slot that does not log (and
            // counted in invalid_entries): harvest them while it still
            // does. Its bits go with the bitmap; the caller stopped
            // tracking.
            if let Err(e) = self.reap_all(&mut reap_lock) {
                log::warn!(
                    "slot {:#x}: logging off; reaping its last entries: {e}",
                    m.slot
                );
            }
        }
        let old_dirty = old.as_ref().and_then(|o| o.dirty.clone());
        let dirty = if m.flags & MEM_LOG_DIRTY_PAGES == 0 {
            None
        } else {
            match (old_dirty, fresh) {
                // Same pages (a move or an unrelated flag change): keep the bits.
                (Some(b), _) if keep_bits => Some(b),
                // Resized: carry the bits of the pages that remain.
                (Some(b), Some(n)) => {
                    n.or_from(&b);
                    Some(n)
                }
                (_, n) => n,
            }
        };
        if let (Some(d), None) = (&dirty, &old) {
            self.adopt_retired(m, d);
        }
        let started_logging = dirty.is_some() && old.as_ref().is_none_or(|o| o.dirty.is_none());
        self.slots.write().insert(
            m.slot,
            Arc::new(Slot {
                region: *m,
                npages,
                dirty,
                reported,
            }),
        );
        *released = self.keep_memory(m.slot, m.userspace_addr, keeper);
        life.record_memslot();
        drop(reap_lock);
        drop(life);
        if started_logging && self.mode().has_ring() {
            // The vCPUs writing this slot push ring entries from now on,
            // at full speed at once: the reaper must not sleep through it.
            self.wake_reaper();
        }
        log::debug!(
            "slot {:#x}: gpa {:#x}, {} pages, flags {:#x}",
            m.slot,
            m.guest_phys_addr,
            npages,
            m.flags
        );
        Ok(())
    }

    /// Keeps the dirty bits of a deleted slot (lifecycle lock held): pages
    /// written before the delete but not yet synced by the caller. They
    /// would be lost if the slot's memory is mapped again (a PCI BAR
    /// disabled and enabled, or moved: QEMU deletes and creates the slot);
    /// `adopt_retired` hands them to the new slot. Merged with an earlier
    /// retirement of the same memory; at most `MAX_RETIRED` kept.
    fn retire(&self, region: &Region, npages: u64, dirty: Arc<AtomicBitmap>) {
        const MAX_RETIRED: usize = 64;
        let mut r = self.retired.lock();
        if let Some(e) = r
            .iter_mut()
            .find(|e| e.userspace_addr == region.userspace_addr && e.npages == npages)
        {
            // No lock needed: a retired bitmap is no live slot's, so no
            // harvest writes it, and or_from ORs atomically.
            e.dirty.or_from(&dirty);
            return;
        }
        if r.len() == MAX_RETIRED {
            let gone = r.remove(0);
            log::warn!(
                "forgetting the dirty pages of a deleted slot (host address {:#x}, {} pages): \
                 more than {MAX_RETIRED} deleted slots' memory was never mapped again",
                gone.userspace_addr,
                gone.npages
            );
        }
        r.push(Retired {
            userspace_addr: region.userspace_addr,
            npages,
            dirty,
        });
    }

    /// Gives a new dirty-logged slot (reap lock held) the retired bits of
    /// the memory it maps; a retired entry its range covers whole is done.
    fn adopt_retired(&self, m: &Region, dirty: &AtomicBitmap) {
        let ps = self.page_size;
        let (lo, hi) = (m.userspace_addr, m.userspace_addr + m.memory_size);
        let mut adopted = 0;
        self.retired.lock().retain(|e| {
            let (elo, ehi) = (e.userspace_addr, e.userspace_addr + e.npages * ps);
            let (a, b) = (lo.max(elo), hi.min(ehi));
            if a >= b {
                return true;
            }
            adopted += dirty.or_range_from((a - lo) / ps, &e.dirty, (a - elo) / ps, (b - a) / ps);
            !(lo <= elo && ehi <= hi)
        });
        if adopted > 0 {
            log::debug!(
                "slot {:#x}: {adopted} pages dirtied before an earlier slot on this memory was \
                 deleted are reported at its next sync",
                m.slot
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    /// Anonymous memory for a slot, unmapped on drop.
    struct Mapping(u64, usize);

    impl Mapping {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping; nothing else is
            // at the address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            Mapping(p as u64, len)
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: this mapping's own range; the VM that mapped it into
            // a slot is dropped first (declared after it in the test).
            unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
        }
    }

    /// Two threads move one slot between two mappings at once, each
    /// handing the VM a keeper for its own: whichever update the kernel
    /// saw last, the VM must keep that one's memory (else a safe
    /// `update_memslot_region` caller could free memory the guest maps).
    /// With the keeper recorded just after the lock was released (0.3),
    /// this failed within 1,857 and 3,975 rounds (under a second).
    #[test]
    #[cfg_attr(miri, ignore = "KVM ioctls")]
    fn racing_updates_of_a_slot_keep_the_memory_it_maps() {
        const LEN: usize = 1 << 16;
        let maps = [Mapping::new(LEN), Mapping::new(LEN)];
        let vm = Vm::create(0).unwrap();
        vm.board_init(0).unwrap();
        for round in 0..20_000 {
            let start = Barrier::new(maps.len());
            std::thread::scope(|s| {
                for map in &maps {
                    let (vm, start) = (&vm, &start);
                    s.spawn(move || {
                        let m = Region {
                            slot: 0,
                            flags: MEM_LOG_DIRTY_PAGES,
                            guest_phys_addr: 0,
                            memory_size: LEN as u64,
                            userspace_addr: map.0,
                        };
                        start.wait();
                        // SAFETY: both mappings outlive the VM (above).
                        unsafe { vm.update_memslot(&m, Some(Arc::new(map.0))) }.unwrap();
                    });
                }
            });
            let mapped = vm.slot(0).unwrap().region.userspace_addr;
            let kept = vm.kept.lock().get(&0).map(|(a, _)| *a);
            assert_eq!(kept, Some(mapped), "round {round}: kept != mapped");
        }
        // Deleting the slot lets go of its memory.
        let del = Region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a deletion maps nothing.
        unsafe { vm.update_memslot(&del, None) }.unwrap();
        assert!(
            vm.kept.lock().is_empty(),
            "the deleted slot's memory is still kept"
        );
    }
}
