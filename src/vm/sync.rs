//! Syncing into the caller's bitmaps (rings, `KVM_GET_DIRTY_LOG`, the
//! backup bitmap at the final stage) and the counters.

use super::*;

impl Vm {
    /// ORs into `out` (`nbits` valid bits) every page of `slot` dirtied
    /// since its previous sync.
    pub fn sync_memslot(
        &self,
        slot: u32,
        out: &mut [u64],
        nbits: u64,
        final_stage: bool,
    ) -> Result<SyncReport> {
        let nbits = nbits.min(out.len() as u64 * 64);
        self.sync_words(slot, Some(nbits), final_stage, |i, v| out[i] |= v)
    }

    /// Hands every page of `slot` dirtied since its previous sync to `f`
    /// (its index in the slot), in ascending order, with no buffer of the
    /// slot's size in ring modes.
    pub fn sync_memslot_each(
        &self,
        slot: u32,
        final_stage: bool,
        mut f: impl FnMut(u64),
    ) -> Result<SyncReport> {
        self.sync_words(slot, None, final_stage, |i, mut v| {
            while v != 0 {
                f(i as u64 * 64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        })
    }

    /// Hands the slot's dirty pages to `f` as runs of consecutive bitmap
    /// words holding bits: `f(first_page, words)`, `first_page` a
    /// multiple of 64, bit `j % 64` of `words[j / 64]` the page
    /// `first_page + j`. Ascending, at most `RUN_WORDS` words a run; in
    /// ring modes it costs what was dirtied, not the slot's size.
    pub fn sync_memslot_runs(
        &self,
        slot: u32,
        final_stage: bool,
        mut f: impl FnMut(u64, &[u64]),
    ) -> Result<SyncReport> {
        let mut run = Run {
            words: [0; RUN_WORDS],
            first: 0,
            len: 0,
        };
        let r = self.sync_words(slot, None, final_stage, |i, v| run.push(i, v, &mut f))?;
        run.flush(&mut f);
        Ok(r)
    }

    /// The sync: each non-zero word of the slot's dirty pages (its index,
    /// its bits) to `f`. `nbits`: the caller's bitmap size, checked.
    fn sync_words(
        &self,
        slot: u32,
        nbits: Option<u64>,
        final_stage: bool,
        mut f: impl FnMut(usize, u64),
    ) -> Result<SyncReport> {
        let s = self.logged_slot(slot, nbits)?;
        let mode = self.mode();
        if !mode.has_ring() {
            let bm = self.kernel_bitmap(&s)?;
            let mut pages = 0;
            for (i, &w) in bm.iter().enumerate() {
                let v = w & word_mask(s.npages, i);
                if v != 0 {
                    f(i, v);
                    pages += u64::from(v.count_ones());
                }
            }
            log::debug!("sync slot {slot:#x}: {pages} pages reported (KVM_GET_DIRTY_LOG)");
            return Ok(SyncReport {
                pages,
                whole_slot: false,
            });
        }
        // The backup bitmap (ring-with-bitmap, final stage) is the kernel's
        // own: read it before taking the reap lock.
        let backup = if mode == Mode::RingWithBitmap && final_stage {
            let bm = self.kernel_bitmap(&s)?;
            self.log_backup_pages(&s, &bm);
            Some(bm)
        } else {
            None
        };
        // Reap and drain under one hold of the reap lock: every entry
        // harvested before this call (by any thread) is published before we
        // drain, and the bitmaps have a single writer at a time.
        let mut st = self.reap.lock();
        self.reap_all(&mut st)?;
        // Look the slot up again: the reap published into the current one.
        let s = self.logged_slot(slot, nbits)?;
        let dirty = s.dirty.as_ref().expect("logged slot has a bitmap");
        let whole_slot = dirty.take_whole();
        let reported = s.reported.as_deref();
        let pages = dirty.drain_words(backup.as_deref(), |i, v| {
            if let Some(r) = reported {
                r.or_word_locked(i, v);
            }
            f(i, v)
        });
        log::debug!(
            "sync slot {slot:#x}: {pages} pages reported (final: {final_stage}, whole slot: \
             {whole_slot})"
        );
        Ok(SyncReport { pages, whole_slot })
    }

    /// Forgets the pages in `first .. first + n` of `slot` that a sync
    /// reported since the last clear of their range: the caller is about
    /// to read them (send them), so a write the shim harvested since that
    /// sync is in what it reads, and reporting the page again at the next
    /// sync would send it twice. What `KVM_CLEAR_DIRTY_LOG` does for
    /// QEMU's bitmap mode, where it clears a chunk before sending it.
    /// Returns how many pages were forgotten.
    ///
    /// A bit is in the shim's bitmap only once the reset that re-protected
    /// its page has returned (`reap_locked`), and this runs under the reap
    /// lock: each bit forgotten is of a write before that reset, and a
    /// write after it makes a new entry, which the next sync reports. The
    /// rings are reaped first only so that writes still in them are
    /// forgotten too. Nothing is forgotten while a reset is owed or the
    /// slot is to be reported whole (a ring overrun). Bitmap mode: nothing
    /// to do (each sync clears what it reports, `kernel_bitmap`).
    pub fn clear_memslot(&self, slot: u32, first: u64, n: u64) -> Result<u64> {
        let s = self.logged_slot(slot, None)?;
        if first.checked_add(n).is_none_or(|end| end > s.npages) {
            return Err(Error::inval(format!(
                "pages {first} + {n} are past the end of slot {slot:#x} ({} pages)",
                s.npages
            )));
        }
        if !self.mode().has_ring() || n == 0 {
            return Ok(0);
        }
        let mut st = self.reap.lock();
        self.reap_all(&mut st)?;
        // Look the slot up again: the reap published into the current one.
        let s = self.logged_slot(slot, None)?;
        let (Some(dirty), Some(reported)) = (&s.dirty, &s.reported) else {
            return Ok(0);
        };
        if st.marked != 0 || st.overflow || dirty.is_whole() {
            return Ok(0);
        }
        let n = dirty.clear_taken(reported, first, n);
        self.stats.add(stat!(pages_cleared), n);
        Ok(n)
    }

    /// Names (at debug level) the guest-physical pages that the backup
    /// bitmap held at the final sync: writes made with no vCPU running,
    /// such as the vGIC ITS saving its tables.
    pub(super) fn log_backup_pages(&self, s: &Slot, bm: &[u64]) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let n = count_masked(bm, s.npages);
        if n == 0 {
            return;
        }
        let gpas: Vec<String> = (0..s.npages)
            .filter(|&p| bm[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .take(16)
            .map(|p| format!("{:#x}", s.region.guest_phys_addr + p * self.page_size))
            .collect();
        log::debug!(
            "final sync slot {:#x}: the backup bitmap held {n} pages: {}{}",
            s.region.slot,
            gpas.join(" "),
            if n > 16 { " ..." } else { "" }
        );
    }

    pub(super) fn logged_slot(&self, slot: u32, nbits: Option<u64>) -> Result<Arc<Slot>> {
        let s = self.slot(slot).ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!("unknown slot {slot:#x} (no such memslot)"),
            )
        })?;
        if s.dirty.is_none() {
            return Err(Error::new(
                libc::ENOENT,
                format!(
                    "slot {slot:#x} does not log dirty pages: turn dirty logging on \
                     (LOG_DIRTY_PAGES) with update_memslot first"
                ),
            ));
        }
        if let Some(nbits) = nbits
            && nbits < s.npages
        {
            return Err(Error::inval(format!(
                "bitmap too small for slot {slot:#x}: it has {} pages, the \
                 bitmap {nbits} bits",
                s.npages,
            )));
        }
        Ok(s)
    }

    /// `KVM_GET_DIRTY_LOG` (then `KVM_CLEAR_DIRTY_LOG` of exactly what it
    /// reported, under manual protect) for one slot.
    pub(super) fn kernel_bitmap(&self, s: &Slot) -> Result<Vec<u64>> {
        let slot = s.region.slot;
        let mut bm = self
            .kvm
            .get_dirty_log(slot, s.region.memory_size)
            .map_err(|e| {
                Error::sys(
                    &format!("KVM_GET_DIRTY_LOG (slot {slot:#x})"),
                    e,
                    "is dirty logging on for this slot?",
                )
            })?;
        self.stats.add(stat!(bitmap_syncs), 1);
        if self.manual_protect() && bm.iter().any(|&w| w != 0) {
            self.kvm.clear_dirty_log(slot, s.npages, &mut bm)?;
        }
        self.stats
            .add(stat!(pages_from_bitmap), count_masked(&bm, s.npages));
        Ok(bm)
    }

    /// Counters since creation.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// Counters of one vCPU.
    pub fn vcpu_stats(&self, index: u32) -> Result<VcpuStats> {
        let v = self.vcpu(index)?;
        Ok(VcpuStats {
            entries_reaped: v.ring.as_ref().map_or(0, |r| r.harvested()),
            ring_full_reaps: v.ring_full_reaps.load(Ordering::Relaxed),
        })
    }
}

/// Words a run handed to `sync_memslot_runs`' callback holds at most: a
/// 4 KiB buffer on the stack.
const RUN_WORDS: usize = crate::types::SYNC_RUN_WORDS_MAX;

/// The run being gathered for `sync_memslot_runs`.
struct Run {
    words: [u64; RUN_WORDS],
    first: usize,
    len: usize,
}

impl Run {
    /// Appends word `i`, handing the run to `f` first when `i` does not
    /// follow it or it is full.
    fn push(&mut self, i: usize, v: u64, f: &mut impl FnMut(u64, &[u64])) {
        if self.len > 0 && (i != self.first + self.len || self.len == RUN_WORDS) {
            self.flush(f);
        }
        if self.len == 0 {
            self.first = i;
        }
        self.words[self.len] = v;
        self.len += 1;
    }

    fn flush(&mut self, f: &mut impl FnMut(u64, &[u64])) {
        if self.len > 0 {
            f(self.first as u64 * 64, &self.words[..self.len]);
            self.len = 0;
        }
    }
}
