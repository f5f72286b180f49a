//! The reap engine: harvest, `KVM_RESET_DIRTY_RINGS`, publish after the
//! reset; ring-full reaps, wedges and overruns; the reaper thread's entry
//! points.

use super::*;

impl Vm {
    /// Harvests one ring straight into the shim's per-slot bitmaps (reap
    /// lock held; `reap_locked` must follow). Bounds-checks every entry: an
    /// unknown slot or an offset past its end is counted, never written.
    pub(super) fn harvest_one(
        &self,
        st: &mut ReapState,
        slots: &IdMap<Slot>,
        ring: &Ring,
        ring_full: bool,
    ) -> Harvest {
        let mut invalid = 0u64;
        // Consecutive entries mostly name the same slot: one lookup per run.
        let mut cache: Option<(u32, &AtomicBitmap)> = None;
        let h = ring.harvest(ring_full, |slot, offset| {
            let bm = match cache {
                Some((s, b)) if s == slot => Some(b),
                _ => {
                    let b = slots.get(&slot).and_then(|s| s.dirty.as_deref());
                    cache = b.map(|b| (slot, b));
                    b
                }
            };
            if !bm.is_some_and(|b| b.set_locked(offset)) {
                invalid += 1;
            }
        });
        st.marked += h.entries + h.skipped + h.repaired;
        st.harvested += h.entries;
        if invalid > 0 {
            self.stats.add(stat!(invalid_entries), invalid);
            log::warn!(
                "{invalid} ring entries named an unknown slot or an offset past its end: skipped"
            );
        }
        if h.skipped > 0 {
            let n = self.stats.add(stat!(ring_recoveries), 1);
            if n.is_power_of_two() {
                log::warn!(
                    "dirty ring: skipped a hole of {} entries the kernel left after overrunning \
                     the ring; the ring works again (recovery {n} on this VM; logged at powers \
                     of two, see the stats)",
                    h.skipped
                );
            }
        }
        if h.full {
            st.overflow = true;
            st.rearm = true;
            let n = self.stats.add(stat!(ring_overflows), 1);
            // A vCPU that keeps overrunning its ring does so at every reap:
            // the log says so at powers of two, kds_stats_get every time.
            if n.is_power_of_two() {
                log::error!(
                    "dirty ring found completely full ({} entries): the kernel may have dropped \
                     entries; reporting every dirty-logged page dirty. Reap more often \
                     (overflow {n} on this VM; logged at powers of two, see the stats).",
                    ring.entries()
                );
            }
        }
        h
    }

    /// Second half of every reap (reap lock held): `KVM_RESET_DIRTY_RINGS`.
    ///
    /// Why the harvested bits may be drained only after the reset returns:
    /// until then the harvested pages are still writable in the guest
    /// without a new ring entry. If `sync_slot` handed them to the VMM,
    /// which copies the page, a guest write landing after the copy but
    /// before the reset would never be logged, and the destination would
    /// keep the stale copy: a silently corrupt migration. After the reset,
    /// any later write faults and makes a new entry. The bits are set under
    /// the reap lock, which is held until here, and `sync_slot` drains only
    /// under it after a successful reset (`marked` back to 0), so that holds even
    /// when a reset fails: the next reap or sync retries it first.
    pub(super) fn reap_locked(&self, st: &mut ReapState, harvested: u64) -> Result<u64> {
        self.stats.add(stat!(entries_reaped), harvested);
        self.reset(st, &self.vcpus.read(), None)?;
        if st.overflow {
            // Re-protect first, then report everything: a write before the
            // re-arm is in the report, one after it makes a ring entry.
            if st.rearm && self.rearm_logging()? {
                st.rearm = false;
            }
            // Until logging is re-armed, every reap reports every page.
            st.overflow = st.rearm;
            for s in self.slots.read().values() {
                if let Some(b) = &s.dirty {
                    b.set_all();
                }
            }
        }
        Ok(harvested)
    }

    /// `KVM_RESET_DIRTY_RINGS` for what is marked (reap lock held), then
    /// reads from each ring how far it got (`Ring::after_reset`; the one
    /// VM-wide count it returns is only counted). `extra`: a ring harvested
    /// but no longer in the vCPU map.
    ///
    /// A marked entry the reset did not reach names a page that is still
    /// writable without a new entry: its bit is set again here, after
    /// every reset until one reaches it, so every sync reports the page
    /// (the guest may have written it after the previous report). An entry
    /// an overrun wrote over is a page lost from the ring: every page is
    /// reported and logging re-armed (`reap_locked`).
    pub(super) fn reset(
        &self,
        st: &mut ReapState,
        vcpus: &IdMap<Vcpu>,
        extra: Option<&Ring>,
    ) -> Result<()> {
        if st.marked == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let r = self.kvm.reset_dirty_rings();
        self.stats
            .add(stat!(reset_ns), t.elapsed().as_nanos() as u64);
        self.stats.add(stat!(ring_resets), 1);
        let r = r?;
        let reset = r.entries;
        self.stats.add(stat!(entries_reset), reset);
        if r.signal_held {
            self.stats.add(stat!(reset_signals_held), 1);
        }
        if r.switched_out {
            // Perhaps stopped partway (kvm::Reset::switched_out): pages
            // may be write-enabled without ring entries. Re-protect all
            // and report all (reap_locked), as after an overflow.
            st.overflow = true;
            st.rearm = true;
            let n = self.stats.add(stat!(resets_switched_out), 1);
            if n.is_power_of_two() {
                log::warn!(
                    "KVM_RESET_DIRTY_RINGS: the thread was stopped or slept during the reset \
                     (SIGSTOP, a debugger, the cgroup freezer, or the kernel's memslot lock, \
                     held by a memslot ioctl made outside the shim); \
                     the kernel may have left pages write-enabled without ring entries: \
                     re-arming dirty logging and reporting every page (reset {n} on this VM; \
                     logged at powers of two, see the stats)"
                );
            }
        }
        let slots = self.slots.read();
        let (mut reached, mut unreached) = (0u64, 0u64);
        let rings = || {
            vcpus
                .values()
                .filter_map(|v| v.ring.as_ref())
                .chain(extra)
                .filter(|r| r.lag() > 0)
        };
        // How far the reset got on each ring, read once (`Ring::reach`);
        // where the flags do not add up to the count, from the count
        // (`split_reset`). The buffer is kept: no allocation per reap.
        let mut reach = std::mem::take(&mut st.reach);
        reach.clear();
        reach.extend(rings().map(|r| (r.reach(), r.lag())));
        let shown: u64 = reach.iter().map(|(r, _)| u64::from(r.at_least)).sum();
        if shown != reset {
            self.settle_by_count(reset, &mut reach);
        }
        for (ring, &(r, _)) in rings().zip(&reach) {
            let s = ring.after_reset(r.at_least, |slot, offset| {
                if let Some(b) = slots.get(&slot).and_then(|s| s.dirty.as_deref()) {
                    b.set_locked(offset);
                }
            });
            reached += u64::from(s.reached);
            unreached += u64::from(s.unreached);
            if s.overwritten {
                st.overflow = true;
                st.rearm = true;
            }
        }
        drop(slots);
        st.reach = reach;
        st.marked = unreached;
        if unreached > 0 {
            self.stats.add(stat!(reset_shortfall), unreached);
            let n = self.log_counts.short_resets.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "KVM_RESET_DIRTY_RINGS left {unreached} marked ring entries unreached (a \
                     vCPU overran its ring before the reset, or something else touched it): \
                     their pages are reported at every sync until a reset reaches them (short \
                     reset {n} on this VM; logged at powers of two, see the stats)"
                );
            }
        }
        if reached != reset {
            log::debug!(
                "KVM_RESET_DIRTY_RINGS counted {reset} entries; the rings show {reached} handed back"
            );
        }
        log::debug!(
            "reaped {} ring entries; KVM_RESET_DIRTY_RINGS reset {reset} in {} us",
            std::mem::take(&mut st.harvested),
            t.elapsed().as_micros()
        );
        Ok(())
    }

    /// Where the rings' flags do not add up to `KVM_RESET_DIRTY_RINGS`'s
    /// count: takes from the count how far the reset got on the rings
    /// whose flags cannot tell (`split_reset`), into `reach`; logs what it
    /// settled, and where it could not.
    fn settle_by_count(&self, count: u64, reach: &mut [(Reach, u32)]) {
        let split = split_reset(count, reach);
        let mut told = 0;
        for ((r, _), s) in reach.iter_mut().zip(&split) {
            if let Some(n) = *s
                && n != r.at_least
            {
                r.at_least = n;
                told += 1;
            }
        }
        if told > 0 {
            let n = self
                .log_counts
                .told_by_count
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                log::info!(
                    "KVM_RESET_DIRTY_RINGS: its count ({count}) told how far it got on {told} \
                     ring(s) a vCPU refilled or overran around the reset, where the flags could \
                     not (reset {n} on this VM told so; logged at powers of two): {reach:?}"
                );
            }
        }
        if split.iter().any(Option::is_none) {
            log::warn!(
                "KVM_RESET_DIRTY_RINGS: neither the rings' flags nor the count ({count}) tell how \
                 far the reset got on a ring a vCPU overran or refilled meanwhile; taking what \
                 the flags show: {reach:?}"
            );
        }
    }

    /// Re-arms dirty logging on every logged slot (reap lock held): turns
    /// `KVM_MEM_LOG_DIRTY_PAGES` off and on again, so the kernel
    /// write-protects every page anew and the next write to any page makes
    /// a ring entry, including the pages whose entries an overrun lost.
    /// Needs the lifecycle lock (no `memslot_set` in flight): `false` when
    /// another thread holds it, and the caller retries at its next reap.
    pub(super) fn rearm_logging(&self) -> Result<bool> {
        let Some(_life) = self.life.try_lock() else {
            return Ok(false);
        };
        let slots: Vec<Region> = self
            .slots
            .read()
            .values()
            .filter(|s| s.dirty.is_some())
            .map(|s| s.region)
            .collect();
        for m in &slots {
            let off = Region {
                flags: m.flags & !MEM_LOG_DIRTY_PAGES,
                ..*m
            };
            self.kernel_set(&off, "re-arm logging: log off,")?;
            self.kernel_set(m, "re-arm logging: log on,")?;
        }
        let n = self.log_counts.rearms.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!(
                "dirty logging re-armed on {} slots after ring entries may have been lost (a \
                 kernel ring overrun, or a reset the thread was stopped in; re-arm {n} on this \
                 VM; logged at powers of two)",
                slots.len()
            );
        }
        Ok(true)
    }

    /// Harvests every vCPU ring, resets once, publishes. Entries harvested.
    pub fn reap(&self) -> Result<u64> {
        if !self.mode().has_ring() {
            return Ok(0);
        }
        self.reap_all(&mut self.reap.lock())
    }

    /// `reap` with the reap lock held.
    pub(super) fn reap_all(&self, st: &mut ReapState) -> Result<u64> {
        let t = Instant::now();
        let mut n = 0;
        let slots = self.slots.read();
        let vcpus = self.vcpus.read();
        for v in vcpus.values() {
            if let Some(r) = &v.ring {
                n += self.harvest_one(st, &slots, r, false).entries;
            }
        }
        drop(vcpus);
        drop(slots);
        self.stats
            .add(stat!(harvest_ns), t.elapsed().as_nanos() as u64);
        self.reap_locked(st, n)
    }

    /// Harvests one vCPU's ring (for `KVM_EXIT_DIRTY_RING_FULL`).
    ///
    /// A wedge (this call and the previous one found nothing, and no thread
    /// harvested this ring in between) marks every logged page dirty and is
    /// undone where the kernel's overrun explains it (`Ring::unwedge`, at
    /// most `MAX_UNWEDGES` times in a row); otherwise `EOVERFLOW`.
    pub fn reap_vcpu(&self, index: u32) -> Result<u64> {
        let v = self.vcpu(index)?;
        let Some(ring) = &v.ring else {
            return Ok(0);
        };
        let mut st = self.reap.lock();
        let t = Instant::now();
        let h = self.harvest_one(&mut st, &self.slots.read(), ring, true);
        self.stats
            .add(stat!(harvest_ns), t.elapsed().as_nanos() as u64);
        let wedge = ring.after_ring_full(&h);
        if h.entries > 0 {
            bump(&v.ring_full_reaps, 1);
            self.stats.add(stat!(ring_full_reaps), 1);
        }
        let (mut undone, mut give_up) = (0, false);
        if let Wedge::Yes { give_up: g } = wedge {
            st.overflow = true;
            st.rearm = true;
            self.stats.add(stat!(ring_wedges), 1);
            // Undone where the ring shows how (`Ring::unwedge`); otherwise
            // the reset this call owes may free the ring, so the vCPU gets
            // to try again, at most `MAX_UNWEDGES` times in a row.
            undone = ring.unwedge();
            if undone > 0 {
                st.marked += u64::from(undone);
                self.stats.add(stat!(ring_recoveries), 1);
            }
            give_up = g;
        }
        let n = self.reap_locked(&mut st, h.entries)?;
        if give_up {
            let msg = format!(
                "vCPU {index}'s dirty ring stays wedged: it exited with \
                 KVM_EXIT_DIRTY_RING_FULL {MAX_UNWEDGES} times in a row with nothing to harvest \
                 or hand back (the kernel overran the ring and dropped entries). Every \
                 dirty-logged page was reported dirty; this VM's ring can no longer be trusted: \
                 fail the migration and fall back to a full resend"
            );
            log::error!("{msg}");
            return Err(Error::new(libc::EOVERFLOW, msg));
        }
        if wedge != Wedge::No && undone > 0 {
            log::warn!(
                "vCPU {index}'s dirty ring was wedged by a kernel overrun: handed {undone} \
                 never-published entries back to the kernel; every dirty-logged page was \
                 reported dirty"
            );
        }
        Ok(n)
    }

    /// May the adaptive reaper run on this VM? `ENOTSUP` without a dirty
    /// ring. (The tracker owns the thread: `DirtyTracker::enable_reaper`.)
    pub(crate) fn check_reaper(&self) -> Result<()> {
        if self.mode().has_ring() {
            return Ok(());
        }
        Err(Error::new(
            libc::ENOTSUP,
            "this VM has no dirty ring (bitmap mode): there is nothing for the reaper to \
             reap; enable the ring (enable_dirty_ring) first",
        ))
    }

    /// The running reaper's wake flags (`None`: no reaper runs); woken at
    /// once when a slot logs already.
    pub(crate) fn set_reaper_wake(&self, w: Option<Arc<Wake>>) {
        if let Some(w) = &w
            && self.logs_dirty()
        {
            w.wake();
        }
        *self.reaper_wake.lock() = w;
    }

    /// Each vCPU ring's level into `levels` (cleared first): a snapshot
    /// for the reaper's decisions, with no syscall and no reap lock.
    pub(crate) fn ring_levels(&self, levels: &mut Vec<Level>) {
        levels.clear();
        for (&index, v) in self.vcpus.read().iter() {
            if let Some(r) = &v.ring {
                let at = Instant::now();
                let (pushed, fill) = r.level();
                levels.push(Level {
                    index,
                    pushed,
                    fill,
                    size: r.entries(),
                    at,
                });
            }
        }
    }

    /// Whether some memslot logs dirty pages: without one, no vCPU pushes
    /// to its ring and the reaper thread has nothing to check.
    pub(crate) fn logs_dirty(&self) -> bool {
        self.slots.read().values().any(|s| s.dirty.is_some())
    }

    /// Tells the reaper thread, if one runs, that dirty logging started on
    /// a memslot (`memslot_set`).
    pub(crate) fn wake_reaper(&self) {
        if let Some(w) = self.reaper_wake.lock().as_ref() {
            w.wake();
        }
    }

    /// `reap`, counted as the reaper thread's.
    pub(crate) fn reap_by_reaper(&self) -> Result<u64> {
        self.stats.add(stat!(reaper_reaps), 1);
        self.reap()
    }
}
