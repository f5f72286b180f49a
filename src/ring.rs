//! One vCPU's dirty ring: the `struct kvm_dirty_gfn` array the kernel shares
//! with us through the vCPU fd, and the harvest that walks it.
//!
//! The ring memory is written by the kernel concurrently with our reads, so
//! it is only ever touched through raw pointers and atomics: no `&` or
//! `&mut` to a `kvm_dirty_gfn` is ever formed.
//!
//! Protocol (Documentation/virt/kvm/api.rst, "dirty ring"):
//! - the kernel fills `slot`/`offset`, then sets `flags = DIRTY` (with
//!   release semantics under `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`);
//! - we read `flags` with acquire, so `slot`/`offset` are the ones the
//!   kernel wrote before publishing the entry;
//! - we store `flags = RESET` with release, so the kernel (which reads flags
//!   with acquire in `KVM_RESET_DIRTY_RINGS`) sees our reads as done before it
//!   recycles the entry;
//! - `KVM_RESET_DIRTY_RINGS` (done by the caller, once per reap) re-protects
//!   the pages and hands the entries back to the kernel.

use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

use kvm_bindings::kvm_dirty_gfn;

use crate::error::Result;
use crate::kvm::{DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET};

/// A ring's entries: base and index mask, borrowed from the `Ring`.
#[derive(Clone, Copy)]
struct RingMem<'a> {
    base: NonNull<kvm_dirty_gfn>,
    mask: u32,
    _ring: PhantomData<&'a Ring>,
}

impl<'a> RingMem<'a> {
    /// A raw pointer to entry `i` (masked).
    #[inline]
    fn entry(self, i: u32) -> *mut kvm_dirty_gfn {
        // SAFETY: the index is masked to the ring size (a power of two,
        // `mask + 1`) and the mapping holds that many entries.
        unsafe { self.base.as_ptr().add((i & self.mask) as usize) }
    }

    /// The flags word of entry `i`, as an atomic.
    #[inline]
    fn flags(self, i: u32) -> &'a AtomicU32 {
        // In bounds, 4-byte aligned (page-aligned ring, 16-byte entries, flags
        // at offset 0), mapped as long as the `Ring` lives ('a), only
        // accessed atomically.
        // SAFETY: so `from_ptr`'s requirements hold (see the line above).
        unsafe { AtomicU32::from_ptr(ptr::addr_of_mut!((*self.entry(i)).flags)) }
    }

    /// Entry `i`'s flags, as the kernel last published them. The one
    /// acquire of the ring's flags: it pairs with kvm_dirty_ring_push(),
    /// which writes the entry's slot and offset and then releases DIRTY
    /// (kvm_dirty_gfn_set_dirtied: smp_store_release). Once DIRTY is seen,
    /// the slot and offset of this lap are visible (with Relaxed, a CPU
    /// could read those of the entry's previous lap and report another
    /// page, losing this one), and so is every entry the kernel published
    /// before this one (it publishes in order). A flags word of 0 is an
    /// entry the reset reached (kvm_dirty_gfn_set_invalid, ordered before
    /// the ioctl's return).
    #[inline]
    fn load(self, i: u32) -> u32 {
        self.flags(i).load(Ordering::Acquire)
    }

    /// Has the kernel published entry `i` (DIRTY)? See `load`.
    #[inline]
    fn is_dirty(self, i: u32) -> bool {
        self.load(i) & DIRTY_GFN_F_DIRTY != 0
    }

    /// Marks entry `i` harvested (RESET), for the next
    /// `KVM_RESET_DIRTY_RINGS`. The one release of the ring's flags: it
    /// pairs with kvm_dirty_ring_reset(), which reads the flags with
    /// acquire (kvm_dirty_gfn_harvested) before it clears the entry and
    /// lets kvm_dirty_ring_push() reuse it. With Relaxed, the RESET could
    /// become visible before our reads of the entry's slot and offset
    /// complete, and the kernel's next push into the entry could change
    /// what we read.
    #[inline]
    fn mark_reset(self, i: u32) {
        self.flags(i).store(DIRTY_GFN_F_RESET, Ordering::Release);
    }
}

/// Bytes of one ring entry.
pub(crate) const ENTRY_SIZE: u64 = std::mem::size_of::<kvm_dirty_gfn>() as u64;

/// A mapped dirty ring. Unmapped on drop.
pub struct Ring {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Our fetch index: the next entry to look at (free running, masked on
    /// use). Only the thread holding the VM's reap lock touches it; it is an
    /// atomic so that `Ring` stays `Sync` without `UnsafeCell`.
    fetch: AtomicU32,
    /// The kernel's reset index, as this ring shows it after each
    /// `KVM_RESET_DIRTY_RINGS` (see `after_reset`): the entries from here
    /// to `fetch` are marked RESET but not handed back yet. Equal to
    /// `fetch` unless the kernel stopped short of what we marked (an
    /// overrun wrote over our marks). Under the reap lock, like `fetch`.
    kreset: AtomicU32,
    /// Entries harvested from this ring, ever (any thread).
    harvested: AtomicU64,
    /// A sequence count over what `level` reads (the fetch index, the
    /// flags from it, the harvested total): odd while the reap-lock holder
    /// changes them (`begin_change`), so that a reader without the lock
    /// can tell a torn snapshot.
    changes: AtomicU32,
    /// A harvest found the ring completely full: the kernel may have
    /// overrun it and left a hole at our fetch index (see `skip_hole`).
    suspect: AtomicBool,
    /// Wedge detection across ring-full reaps (see `after_ring_full`).
    wedge: WedgeWatch,
}

/// Wedges undone in a row before a ring-full reap gives up (`EOVERFLOW`).
pub(crate) const MAX_UNWEDGES: u32 = 1024;

/// What `after_ring_full` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wedge {
    /// The ring-full reap made progress (or is the first without any).
    No,
    /// The vCPU exited ring-full twice with nothing harvested or handed
    /// back between: the kernel overran the ring. `give_up` after
    /// `MAX_UNWEDGES` in a row.
    Yes { give_up: bool },
}

/// The state behind `Ring::after_ring_full`: the ring's harvested total
/// at the previous ring-full reap, whether that reap found nothing, and
/// the wedges seen in a row. Under the reap lock; atomics keep `Ring`
/// `Sync`.
#[derive(Default)]
struct WedgeWatch {
    last_total: AtomicU64,
    last_empty: AtomicBool,
    in_a_row: AtomicU32,
}

// SAFETY: the mapping is process-wide memory; every access goes through
// atomics or volatile reads on raw pointers, and the fetch index is only
// advanced under the VM's reap lock (see `Vm`).
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

/// What `Ring::after_reset` found: how far the kernel's reset got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Entries the reset handed back on this ring.
    pub reached: u32,
    /// Marked entries it did not reach (their pages are still writable
    /// without a new entry: reported again at every sync until reached).
    pub unreached: u32,
    /// Some unreached entry was overwritten by a push before the reset (an
    /// overrun): the page it named is gone, so every page must be reported.
    pub overwritten: bool,
}

/// How far a `KVM_RESET_DIRTY_RINGS` got on one ring, as its flags say
/// (`Ring::reach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// It handed back at least this many of the marked entries.
    pub at_least: u32,
    /// And no more: the flags tell. Otherwise anything up to all of them,
    /// and only the ioctl's count tells (`split_reset`).
    pub exact: bool,
}

/// Splits the VM-wide count `KVM_RESET_DIRTY_RINGS` returned over the rings
/// (`rings`: each ring's `Reach` and lag, the entries marked for it): how
/// many entries the reset handed back on each. The count is the sum of
/// what its walk reached on every ring (signals are blocked around the
/// call, so it covers every ring it walked). What the flags account for is
/// the sum of `at_least`; the rest was reached on the rings whose flags
/// cannot tell. With one such ring, it is that ring's; with several, the
/// one split where each reached all of its entries or only `at_least` (a
/// refill after the reset, or an overrun before it), if only one adds up.
/// `None` where it cannot tell (then `after_reset` takes `at_least`, as
/// before the count was used).
pub fn split_reset(count: u64, rings: &[(Reach, u32)]) -> Vec<Option<u32>> {
    let mut out: Vec<Option<u32>> = rings.iter().map(|(r, _)| Some(r.at_least)).collect();
    let known: u64 = rings.iter().map(|(r, _)| u64::from(r.at_least)).sum();
    let Some(rest) = count.checked_sub(known) else {
        for (o, (r, _)) in out.iter_mut().zip(rings) {
            if !r.exact {
                *o = None;
            }
        }
        return out;
    };
    if rest == 0 {
        return out;
    }
    // The rings whose flags say they cannot tell first; then every ring
    // with entries left: a kernel overrunning a ring by more than a lap
    // pushes anywhere in it, over 0s the walk left as well, and the ring
    // need not have been found full since.
    for loose in [false, true] {
        let open: Vec<usize> = (0..rings.len())
            .filter(|&i| (loose || !rings[i].0.exact) && rings[i].0.at_least < rings[i].1)
            .collect();
        if let Some(pick) = unique_split(rest, &open, rings) {
            if let &[i] = open.as_slice() {
                out[i] = Some(rings[i].0.at_least + rest as u32);
            } else {
                for (b, &i) in open.iter().enumerate() {
                    if pick & (1 << b) != 0 {
                        out[i] = Some(rings[i].1);
                    }
                }
            }
            return out;
        }
    }
    for (o, (r, lag)) in out.iter_mut().zip(rings) {
        if r.at_least < *lag {
            *o = None;
        }
    }
    out
}

/// `split_reset`'s search: which of the `open` rings (a bit each) reached
/// all their entries, the others only `at_least`, for `rest` more entries
/// in all; `None` unless exactly one choice adds up. A single open ring
/// takes any part of `rest` up to its entries left.
fn unique_split(rest: u64, open: &[usize], rings: &[(Reach, u32)]) -> Option<u32> {
    let more = |i: usize| u64::from(rings[i].1 - rings[i].0.at_least);
    match open {
        [] => None,
        &[i] => (rest <= more(i)).then_some(1),
        // 2^16 sums at most: enough for every vCPU of a reap of 16.
        many if many.len() <= 16 => {
            let mut found = None;
            for pick in 1u32..1 << many.len() {
                let sum: u64 = (0..many.len())
                    .filter(|b| pick & (1 << b) != 0)
                    .map(|b| more(many[b]))
                    .sum();
                if sum == rest {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(pick);
                }
            }
            found
        }
        _ => None,
    }
}

/// What one harvest of one ring found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Harvest {
    /// Entries harvested (flags DIRTY, now RESET).
    pub entries: u64,
    /// Every entry of the ring was in use (harvested or an overrun hole),
    /// or the kernel pushed onto entries not handed back yet (see
    /// `repair`): the kernel may have dropped entries.
    pub full: bool,
    /// Entries of an overrun hole handed back to the kernel (see `skip_hole`).
    pub skipped: u64,
    /// Entries marked RESET again behind our fetch index, where the kernel's
    /// last reset stopped short (see `repair`).
    pub repaired: u64,
}

impl Ring {
    /// Maps the ring of `entries` entries of the vCPU `vcpu_fd`, at
    /// `KVM_DIRTY_LOG_PAGE_OFFSET` pages into the fd
    /// ([`crate::kvm::DIRTY_LOG_PAGE_OFFSET`]).
    pub fn map(vcpu_fd: RawFd, entries: u32, page_size: u64) -> Result<Self> {
        let len = entries as usize * ENTRY_SIZE as usize;
        let offset = crate::kvm::DIRTY_LOG_PAGE_OFFSET * page_size;
        let p = crate::kvm::map_vcpu_ring(vcpu_fd, offset, len, page_size)?;
        Ok(Ring {
            base: p.cast::<kvm_dirty_gfn>(),
            entries,
            fetch: AtomicU32::new(0),
            kreset: AtomicU32::new(0),
            harvested: AtomicU64::new(0),
            changes: AtomicU32::new(0),
            suspect: AtomicBool::new(false),
            wedge: WedgeWatch::default(),
        })
    }

    /// Called by the reap for a ring-full exit, after its harvest `h`:
    /// is the ring wedged? Wedged means this reap and the previous one got
    /// nothing that would let the vCPU run (no entry harvested, skipped or
    /// handed back, and no other thread harvested this ring in between).
    /// A harvest that finds entries ends a run of wedges.
    pub(crate) fn after_ring_full(&self, h: &Harvest) -> Wedge {
        let w = &self.wedge;
        let total = self.harvested();
        let prev_total = w.last_total.swap(total, Ordering::Relaxed);
        let empty = h.entries == 0 && h.skipped == 0 && h.repaired == 0;
        let prev_empty = w.last_empty.swap(empty, Ordering::Relaxed);
        if h.entries > 0 {
            w.in_a_row.store(0, Ordering::Relaxed);
        }
        if empty && prev_empty && prev_total == total {
            let give_up = w.in_a_row.fetch_add(1, Ordering::Relaxed) >= MAX_UNWEDGES;
            Wedge::Yes { give_up }
        } else {
            Wedge::No
        }
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Entries harvested from this ring since it was mapped.
    pub fn harvested(&self) -> u64 {
        self.harvested.load(Ordering::Relaxed)
    }

    /// How many entries the kernel has published that nobody harvested
    /// yet, without a syscall: the kernel publishes in order, so the DIRTY
    /// entries from our fetch index on are contiguous and a binary search
    /// over their flags (about log2(entries) acquire loads) finds the end.
    /// A snapshot only (read without the reap lock): for the reaper's
    /// decisions, never for harvesting.
    pub fn fill(&self) -> u32 {
        let f = self.fetch.load(Ordering::Relaxed);
        // Only the flags are read here (`RingMem::load`), and a stale
        // answer only delays the reaper's decision by one check.
        let mem = self.mem();
        let dirty = |k: u32| mem.is_dirty(f.wrapping_add(k));
        if !dirty(0) {
            return 0;
        }
        // dirty(lo) holds; the answer is in (lo, hi].
        let (mut lo, mut hi) = (0, self.entries);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if dirty(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// The ring's level for a reader without the reap lock: (entries the
    /// kernel has pushed into it so far, entries waiting to be harvested),
    /// that is ([`harvested`](Self::harvested) plus [`fill`](Self::fill),
    /// the fill). The count is `None` when a harvest on another thread
    /// changed the fetch index, the flags or the total while they were
    /// read (a sequence count, `begin_change`): such a snapshot comes out
    /// short by what that harvest took, and the next one long by as much
    /// against it, a rate too high for the reaper's pacing.
    pub fn level(&self) -> (Option<u64>, u32) {
        // Acquire: the reads below come after it.
        let before = self.changes.load(Ordering::Acquire);
        let harvested = self.harvested.load(Ordering::Relaxed);
        let fill = self.fill();
        // Acquire fence, pairing with the Release fence in `begin_change`:
        // if any read above saw a change made after it, the count read
        // below is at least the odd value it stored.
        fence(Ordering::Acquire);
        let torn = before & 1 == 1 || self.changes.load(Ordering::Relaxed) != before;
        let pushed = (!torn).then(|| harvested + u64::from(fill));
        (pushed, fill)
    }

    /// Starts a change of what `level` reads (reap lock held): the count
    /// goes odd until `end_change`.
    fn begin_change(&self) -> u32 {
        let n = self.changes.load(Ordering::Relaxed);
        self.changes.store(n.wrapping_add(1), Ordering::Relaxed);
        // Release fence: the odd count is ordered before every change that
        // follows (the seqlock writer's side; `level` pairs with it).
        fence(Ordering::Release);
        n
    }

    /// Ends the change `begin_change` started (it returned `n`).
    fn end_change(&self, n: u32) {
        // Release: after the changes.
        self.changes.store(n.wrapping_add(2), Ordering::Release);
    }

    /// The entry array, as a copy the compiler keeps in registers (`Ring`
    /// has atomic fields, so it must reload them after every store).
    #[inline]
    fn mem(&self) -> RingMem<'_> {
        RingMem {
            base: self.base,
            mask: self.entries - 1,
            _ring: PhantomData,
        }
    }

    /// The flags word of entry `i`, as an atomic (for the tests, which
    /// play the kernel).
    #[cfg(test)]
    #[inline]
    fn flags(&self, i: u32) -> &AtomicU32 {
        self.mem().flags(i)
    }

    /// Harvests every published entry from our fetch index on, calling
    /// `sink(slot, offset)` for each, and marks them RESET. The caller must
    /// hold the VM's reap lock and must issue `KVM_RESET_DIRTY_RINGS`
    /// afterwards.
    ///
    /// `ring_full`: the caller saw this vCPU exit with
    /// `KVM_EXIT_DIRTY_RING_FULL`, so an invalid entry at our fetch index is
    /// suspect even if no overflow was seen (see `skip_hole`).
    #[inline]
    pub fn harvest(&self, ring_full: bool, mut sink: impl FnMut(u32, u64)) -> Harvest {
        let change = self.begin_change();
        let start = self.fetch.load(Ordering::Relaxed);
        let kreset = self.kreset.load(Ordering::Relaxed);
        let (mut repaired, mut overrun) = (0, false);
        if start != kreset {
            (repaired, overrun) = self.repair(kreset, start);
        }
        let mut fetch = start;
        let mut skipped = 0;
        // Read once, not per entry (only this thread, under the reap lock,
        // changes it).
        let mut suspect = self.suspect.load(Ordering::Relaxed);
        let mem = self.mem();
        let entries = self.entries;
        // At most one lap from the kernel's reset index: the kernel cannot
        // publish past a full ring (where it overruns one, a lap is all there
        // is to read), and a position marked twice in one lap would be
        // handed back once, for the wrong index.
        loop {
            let run = fetch;
            // The hot loop: nothing but the entries in it.
            while fetch.wrapping_sub(kreset) < entries {
                // Published, with its slot and offset (`RingMem::load`).
                if !mem.is_dirty(fetch) {
                    break;
                }
                let e = mem.entry(fetch);
                // The kernel wrote slot/offset before publishing DIRTY and
                // won't touch them until we mark RESET and call
                // KVM_RESET_DIRTY_RINGS.
                // SAFETY: in-bounds entry (see `entry`); volatile reads only.
                let (slot, offset) = unsafe {
                    (
                        ptr::read_volatile(ptr::addr_of!((*e).slot)),
                        ptr::read_volatile(ptr::addr_of!((*e).offset)),
                    )
                };
                sink(slot, offset);
                // After the reads above (`RingMem::mark_reset`).
                mem.mark_reset(fetch);
                fetch = fetch.wrapping_add(1);
            }
            if suspect && fetch != run {
                // New entries right at our fetch index: no hole after all.
                self.suspect.store(false, Ordering::Relaxed);
            }
            let used = fetch.wrapping_sub(kreset);
            if used == entries {
                break;
            }
            match self.skip_hole(fetch, entries - used, ring_full) {
                0 => break,
                d => {
                    fetch = fetch.wrapping_add(d);
                    skipped += u64::from(d);
                    suspect = false; // skip_hole cleared it
                }
            }
        }
        self.fetch.store(fetch, Ordering::Relaxed);
        let n = u64::from(fetch.wrapping_sub(start)) - skipped;
        self.harvested.fetch_add(n, Ordering::Relaxed);
        self.end_change(change);
        // Every position of the ring is in use from the kernel's reset index
        // (harvested, a hole the kernel had left, or owed): it was completely
        // full, so the kernel may have overrun it again.
        let full = overrun || fetch.wrapping_sub(kreset) == self.entries;
        if full {
            self.suspect.store(true, Ordering::Relaxed);
        }
        Harvest {
            entries: n,
            full,
            skipped,
            repaired,
        }
    }

    /// Entries from the kernel's reset index to our fetch index: marked
    /// RESET by us but not handed back yet.
    pub fn lag(&self) -> u32 {
        self.fetch
            .load(Ordering::Relaxed)
            .wrapping_sub(self.kreset.load(Ordering::Relaxed))
    }

    /// What the flags say, right after `KVM_RESET_DIRTY_RINGS` returned,
    /// about how far it got on this ring (see `after_reset`).
    ///
    /// The reset (`kvm_dirty_ring_reset`) walks the ring from its reset index
    /// for as long as the flags say RESET, clearing each entry it hands back
    /// with a release store of flags = 0 (`kvm_dirty_gfn_set_invalid`), and
    /// stops at the first entry that is not RESET. Only that walk ever writes
    /// 0 into an entry we marked, so when some entry of `kreset..fetch` is 0,
    /// the walk reached exactly the entries up to the last 0. (Before that 0
    /// there may be DIRTY entries: the vCPU pushed again onto entries the
    /// reset had just freed, a lap ahead; the harvest reaches them in
    /// order.) When none is 0 and the first is still RESET, it reached
    /// none. The acquire loads pair with those release stores: the ioctl
    /// has returned, so every store of its walk is visible.
    ///
    /// When none is 0 and the first is DIRTY, the flags cannot tell: an
    /// overrun onto our first mark before the reset (it reached none) and a
    /// vCPU that refilled every entry the reset freed before we looked (it
    /// reached them all; the thread that reset was switched out between the
    /// ioctl and this read) leave the same flags, and a vCPU overrunning
    /// the ring while the reset walked it leaves them for any count in
    /// between: `exact` is false, and the ioctl's count settles it
    /// (`split_reset`).
    pub fn reach(&self) -> Reach {
        let k = self.kreset.load(Ordering::Relaxed);
        let lag = self.lag();
        let mem = self.mem();
        // `RingMem::load`: 0 where the reset reached the entry, and an
        // entry the kernel reused since is seen with its new DIRTY, never
        // taken for one the reset did not reach.
        let flags = |j: u32| mem.load(k.wrapping_add(j));
        if let Some(j) = (0..lag).rev().find(|&j| flags(j) == 0) {
            // Exact unless the kernel is overrunning the ring: then its pushes
            // land anywhere in the lap and may cover entries the walk
            // reached after this one.
            let exact = !self.suspect.load(Ordering::Relaxed);
            return Reach {
                at_least: j + 1,
                exact,
            };
        }
        Reach {
            at_least: 0,
            exact: lag == 0 || flags(0) & DIRTY_GFN_F_RESET != 0,
        }
    }

    /// After `KVM_RESET_DIRTY_RINGS` returned: takes how far it got on this
    /// ring (`reached` of the marked entries: what `reach` read, or what the
    /// count says where the flags cannot tell, `split_reset`), and moves our
    /// copy of the kernel's reset index there. Calls
    /// `sink(slot, offset)` for each marked entry it did not reach.
    ///
    /// An unreached entry still flagged RESET names a page the kernel has
    /// not re-protected: the guest can write it again without a new entry,
    /// so the caller reports it at every sync until a reset reaches it.
    /// One flagged DIRTY was pushed over our mark before the reset (an
    /// overrun): the page our entry named is lost from the ring.
    ///
    /// `reached` matters: taken short of the kernel's, our reset index
    /// falls behind the kernel's, `repair` marks entries the kernel has
    /// already handed back, and a later hole is "skipped" onto entries it
    /// has not pushed yet; its reset index then passes its dirty index and
    /// the vCPU exits ring-full for ever (measured: 1,025 wedges in a row,
    /// then `EOVERFLOW`; the test
    /// `a_vcpu_refilling_what_the_reset_freed_before_we_look_keeps_the_indexes_in_step`).
    pub fn after_reset(&self, reached: u32, mut sink: impl FnMut(u32, u64)) -> Settled {
        let k = self.kreset.load(Ordering::Relaxed);
        let lag = self.lag();
        let reached = reached.min(lag);
        let mem = self.mem();
        let flags = |j: u32| mem.load(k.wrapping_add(j));
        let mut settled = Settled {
            reached,
            unreached: lag - reached,
            overwritten: false,
        };
        for j in reached..lag {
            if flags(j) & DIRTY_GFN_F_RESET != 0 {
                let e = mem.entry(k.wrapping_add(j));
                // The entry is ours (RESET, not handed back): a correct
                // kernel does not write it until its reset reaches it; one
                // that overruns the ring may, and then the value read is
                // another lap's page, which the overrun path covers by
                // reporting every page.
                // SAFETY: in-bounds entry (see `entry`); volatile reads of
                // plain integers: a concurrent write cannot make them UB.
                let (slot, offset) = unsafe {
                    (
                        ptr::read_volatile(ptr::addr_of!((*e).slot)),
                        ptr::read_volatile(ptr::addr_of!((*e).offset)),
                    )
                };
                sink(slot, offset);
            } else {
                settled.overwritten = true;
            }
        }
        self.kreset
            .store(k.wrapping_add(reached), Ordering::Relaxed);
        settled
    }

    /// Marks RESET again what the kernel's last reset did not reach.
    ///
    /// Measured on the 6.18 test kernel: `KVM_RESET_DIRTY_RINGS` hands back
    /// entries from its reset index for as long as they are flagged RESET,
    /// whatever its dirty index says. When a vCPU overruns a ring between
    /// our harvest and the reset, its pushes land on entries we had marked
    /// (flags DIRTY again) and the reset stops there, short of our fetch
    /// index. Those positions (`from..to`) must be handed back before
    /// anything newer, so every one is marked RESET and the next reset walks
    /// through to our fetch index. Never beyond it: a RESET flag past the
    /// kernel's dirty index would let its reset index overtake it, and the
    /// vCPU would exit ring-full for ever. A pushed entry found here means
    /// the kernel overran the ring and may have dropped entries: the caller
    /// reports the ring full (every page dirty) rather than this entry.
    /// Returns (positions marked, an overrun seen).
    #[cold]
    #[inline(never)]
    fn repair(&self, from: u32, to: u32) -> (u64, bool) {
        let (mut marked, mut overrun) = (0, false);
        let mut i = from;
        let mem = self.mem();
        while i != to {
            // An entry pushed meanwhile is seen as DIRTY (an overrun), never
            // as the half-written entry before it (`RingMem::load`).
            let f = mem.load(i);
            if f & DIRTY_GFN_F_RESET == 0 {
                overrun |= f & DIRTY_GFN_F_DIRTY != 0;
                // Nothing of the entry is read here (its page is reported
                // with every other), so only the mark itself is ordered.
                mem.mark_reset(i);
                marked += 1;
            }
            i = i.wrapping_add(1);
        }
        (marked, overrun)
    }

    /// After an overrun, re-synchronises with the kernel; returns how many
    /// entries it handed back (0: nothing to do).
    ///
    /// Measured on the 6.18 test kernel: a vCPU can push past a completely
    /// full ring, overwriting the oldest entries. We then harvest one full
    /// lap and the reset hands back exactly one lap, but the kernel still
    /// counts the `k` extra pushes as in use: `k` entries at our fetch index
    /// stay invalid (flags 0) forever, the kernel's reset stops at them, and
    /// its count only grows until the vCPU exits ring-full for ever. The
    /// kernel publishes entries in order (each DIRTY with release), so once
    /// this ring is suspect, an invalid entry at our fetch index followed by
    /// a DIRTY one is that hole: marking the hole RESET lets the next
    /// `KVM_RESET_DIRTY_RINGS` walk over it (re-protecting a few stale pages,
    /// which is harmless) and the ring works again. Only entries before the
    /// first DIRTY one are touched, never any beyond the kernel's index
    /// (resetting those would corrupt its count).
    ///
    /// The scan costs up to a lap of loads, so it runs only when a hole is
    /// likely: after an overflow, or on a ring-full exit (a vCPU that says
    /// its ring is full while the entry at our fetch index is invalid).
    /// Measured: holes also appear without a lap found full, when the kernel
    /// overruns between two harvests.
    #[cold]
    #[inline(never)]
    fn skip_hole(&self, fetch: u32, room: u32, ring_full: bool) -> u32 {
        if !ring_full && !self.suspect.load(Ordering::Relaxed) {
            return 0;
        }
        // The re-read below depends on `RingMem::load`'s acquire (see there).
        let mem = self.mem();
        let Some(d) = (1..room).find(|&d| mem.is_dirty(fetch.wrapping_add(d))) else {
            return 0;
        };
        // The harvest saw `fetch` invalid before this scan, so that view may
        // be stale: the kernel may have published `fetch` and then
        // `fetch + d` meanwhile. It publishes in order, each entry with
        // release, so after the acquire that saw `fetch + d` DIRTY every
        // entry it published before is visible: re-read them. One DIRTY
        // now is being published, not a hole (marking it RESET would lose
        // its page): leave it to the next harvest.
        if (0..d).any(|j| mem.is_dirty(fetch.wrapping_add(j))) {
            return 0;
        }
        for j in 0..d {
            mem.mark_reset(fetch.wrapping_add(j));
        }
        self.suspect.store(false, Ordering::Relaxed);
        d
    }
}

/// The most entries the kernel keeps in reserve below a full ring
/// (`KVM_DIRTY_RING_RSVD_ENTRIES` 64 plus Intel PML's 512): a vCPU whose
/// kernel count is at least `entries - MAX_RSVD_ENTRIES` is soft-full.
const MAX_RSVD_ENTRIES: u32 = 64 + 512;

impl Ring {
    /// Undoes a wedge: the kernel overran this ring so far that its count
    /// of unpublished entries alone keeps the vCPU soft-full, so it exits
    /// ring-full for ever with nothing to harvest and `skip_hole` has no
    /// published entry to find the hole's end by. That count is then at
    /// least the soft limit, `entries - reserve`, so handing back
    /// `entries - MAX_RSVD_ENTRIES` invalid entries (marked RESET, for the
    /// next `KVM_RESET_DIRTY_RINGS`) can never take the kernel's count
    /// below zero; what is left of the hole `skip_hole` handles once the
    /// vCPU publishes again. Only when the kernel's reset index is known to
    /// be our fetch index (no `lag`: otherwise our fetch index may be the
    /// kernel's dirty index, and handing back anything from there would let
    /// its reset index overtake it) and the next entries are all invalid
    /// (none the kernel published). Returns the entries handed back (0:
    /// nothing done).
    pub fn unwedge(&self) -> u32 {
        let m = self.entries.saturating_sub(MAX_RSVD_ENTRIES);
        let fetch = self.fetch.load(Ordering::Relaxed);
        let mem = self.mem();
        // A ring with any entry being published is not wedged.
        if m == 0
            || self.lag() != 0
            || (0..self.entries).any(|j| mem.is_dirty(fetch.wrapping_add(j)))
        {
            return 0;
        }
        let change = self.begin_change();
        for j in 0..m {
            mem.mark_reset(fetch.wrapping_add(j));
        }
        self.fetch.store(fetch.wrapping_add(m), Ordering::Relaxed);
        self.end_change(change);
        self.suspect.store(true, Ordering::Relaxed);
        m
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.entries as usize * ENTRY_SIZE as usize;
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers
        // to it once the last `Arc` of the ring is gone.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in anonymous memory; the test plays the kernel's side.
    fn ring(entries: u32) -> Ring {
        let len = entries as usize * ENTRY_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped by Ring's Drop.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Ring {
            base: NonNull::new(p as *mut kvm_dirty_gfn).unwrap(),
            entries,
            fetch: AtomicU32::new(0),
            kreset: AtomicU32::new(0),
            harvested: AtomicU64::new(0),
            changes: AtomicU32::new(0),
            suspect: AtomicBool::new(false),
            wedge: WedgeWatch::default(),
        }
    }

    /// The kernel's push: fields, then flags DIRTY with release.
    fn push(r: &Ring, i: u32, slot: u32, offset: u64) {
        let e = r.mem().entry(i);
        // SAFETY: in-bounds entry of the test's ring.
        unsafe {
            ptr::write_volatile(ptr::addr_of_mut!((*e).slot), slot);
            ptr::write_volatile(ptr::addr_of_mut!((*e).offset), offset);
        }
        r.flags(i).store(DIRTY_GFN_F_DIRTY, Ordering::Release);
    }

    fn flags(r: &Ring, i: u32) -> u32 {
        r.flags(i).load(Ordering::Acquire)
    }

    fn collect(r: &Ring, ring_full: bool) -> (Harvest, Vec<(u32, u64)>) {
        let mut got = Vec::new();
        let h = r.harvest(ring_full, |s, o| got.push((s, o)));
        (h, got)
    }

    #[test]
    fn harvests_in_order_and_marks_reset() {
        let r = ring(1024);
        for i in 0..10 {
            push(&r, i, 1, u64::from(i) * 3);
        }
        let (h, got) = collect(&r, false);
        assert_eq!(
            h,
            Harvest {
                entries: 10,
                full: false,
                skipped: 0,
                repaired: 0
            }
        );
        assert_eq!(got[9], (1, 27));
        assert!((0..10).all(|i| flags(&r, i) == DIRTY_GFN_F_RESET));
        assert_eq!(flags(&r, 10), 0);
        assert_eq!(collect(&r, false).0.entries, 0);
    }

    #[test]
    fn a_full_lap_is_reported_and_bounded() {
        let r = ring(1024);
        for i in 0..1024 {
            push(&r, i, 1, 0);
        }
        let (h, _) = collect(&r, false);
        assert!(h.full && h.entries == 1024);
    }

    #[test]
    fn a_hole_is_skipped_only_when_suspect_or_on_ring_full() {
        // Kernel state after an overrun: 3 entries it counts but never
        // published, then what it published next.
        let r = ring(1024);
        for i in 3..10 {
            push(&r, i, 1, u64::from(i));
        }
        assert_eq!(
            collect(&r, false).0.entries,
            0,
            "a plain reap does not scan"
        );
        let (h, got) = collect(&r, true);
        assert_eq!(
            h,
            Harvest {
                entries: 7,
                full: false,
                skipped: 3,
                repaired: 0
            }
        );
        assert_eq!(got.first(), Some(&(1, 3)));
        assert!(
            (0..10).all(|i| flags(&r, i) == DIRTY_GFN_F_RESET),
            "hole handed back"
        );
    }

    #[test]
    fn fill_counts_published_entries_from_the_fetch_index() {
        let r = ring(1024);
        assert_eq!(r.fill(), 0);
        for i in 0..700 {
            push(&r, i, 1, 0);
        }
        assert_eq!(r.fill(), 700);
        collect(&r, false);
        assert_eq!(r.fill(), 0);
        for i in 700..1724 {
            push(&r, i, 1, 0);
        }
        assert_eq!(r.fill(), 1024, "a full lap, across the wrap");
    }

    /// What the reaper's pacing relies on: a lock-free reader gets no
    /// count in the middle of a harvest (it would be short by what the
    /// harvest took so far), and the exact one before and after it.
    #[test]
    fn no_count_is_read_during_a_harvest() {
        let r = ring(1024);
        for i in 0..300 {
            push(&r, i, 1, 0);
        }
        assert_eq!(r.level(), (Some(300), 300));
        let mut seen = vec![];
        r.harvest(false, |_, _| seen.push(r.level()));
        assert_eq!(seen.len(), 300);
        assert!(seen.iter().all(|&(n, _)| n.is_none()), "{seen:?}");
        // The fill alone still reads, short (the reaper's reap decision).
        assert!(seen.iter().any(|&(_, f)| f < 300));
        assert_eq!(r.level(), (Some(300), 0));
        for i in 300..340 {
            push(&r, i, 1, 0);
        }
        assert_eq!(r.level(), (Some(340), 40));
    }

    #[test]
    fn harvest_races_a_kernel_thread_publishing() {
        // The other thread plays the kernel: it reuses an entry only once
        // the reset handed it back, writes slot and offset, then publishes
        // DIRTY with release. Every entry must arrive once, in order, with
        // the fields written before its flags (Miri checks the orderings:
        // run it with `cargo +nightly miri test --lib`).
        //
        // It pushes only below the reset index `after_reset` found (the
        // kernel's `used < size`), published once the shim has looked: a
        // vCPU that refills every entry a reset freed before the shim reads
        // the ring leaves flags that cannot tell how far the reset got (see
        // `after_reset`); the shim then reports every page and resumes
        // within a lap, which this test, checking exact delivery, leaves out
        // (Miri's scheduler made it hang here once).
        let r = ring(64);
        let total: u64 = if cfg!(miri) { 400 } else { 200_000 };
        let freed = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..total {
                    let i = i as u32;
                    while i.wrapping_sub(freed.load(Ordering::Acquire)) >= 64 || flags(&r, i) != 0 {
                        std::thread::yield_now();
                    }
                    push(&r, i, 7, u64::from(i));
                }
            });
            let mut next = 0u64;
            while next < total {
                r.harvest(false, |slot, offset| {
                    assert_eq!((slot, offset), (7, next));
                    next += 1;
                });
                // The reset: the kernel takes back everything marked.
                let mut k = r.kreset.load(Ordering::Relaxed);
                while flags(&r, k) & DIRTY_GFN_F_RESET != 0 {
                    r.flags(k).store(0, Ordering::Release);
                    k = k.wrapping_add(1);
                }
                r.after_reset(r.reach().at_least, |_, _| {});
                assert_eq!(r.kreset.load(Ordering::Relaxed), k);
                freed.store(k, Ordering::Release);
                std::thread::yield_now();
            }
        });
        assert_eq!(r.harvested(), total);
    }

    #[test]
    fn an_empty_ring_is_not_a_hole() {
        let r = ring(1024);
        assert_eq!(collect(&r, true).0, Harvest::default());
        assert!((0..1024).all(|i| flags(&r, i) == 0));
    }

    #[test]
    fn unwedge_hands_back_less_than_the_soft_limit_and_only_invalid_entries() {
        let r = ring(4096);
        assert_eq!(r.unwedge(), 4096 - MAX_RSVD_ENTRIES);
        assert!((0..4096 - MAX_RSVD_ENTRIES).all(|i| flags(&r, i) == DIRTY_GFN_F_RESET));
        assert!((4096 - MAX_RSVD_ENTRIES..4096).all(|i| flags(&r, i) == 0));
        // Anything the kernel published: not a wedge, nothing touched.
        let r = ring(4096);
        push(&r, 4000, 1, 1);
        assert_eq!(r.unwedge(), 0);
        assert_eq!(flags(&r, 0), 0);
        // Rings no bigger than the reserve: nothing can be proven.
        assert_eq!(ring(512).unwedge(), 0);
    }

    /// The kernel's side of a ring, as measured on the 6.18 test kernel:
    /// pushes land at `dirty & mask` whether or not the ring has room (an
    /// overrun overwrites), and a reset walks from `reset` over entries
    /// flagged RESET, whatever `dirty` says.
    struct Kernel {
        dirty: u32,
        reset: u32,
    }

    impl Kernel {
        fn push(&mut self, r: &Ring) {
            push(r, self.dirty, 1, u64::from(self.dirty));
            self.dirty = self.dirty.wrapping_add(1);
        }

        fn walk(&mut self, r: &Ring) -> u32 {
            let mut n = 0;
            while flags(r, self.reset) & DIRTY_GFN_F_RESET != 0 {
                r.flags(self.reset).store(0, Ordering::Release);
                self.reset = self.reset.wrapping_add(1);
                n += 1;
            }
            n
        }

        fn used(&self) -> u32 {
            self.dirty.wrapping_sub(self.reset)
        }
    }

    /// One reap as `Vm` does it for a single ring: harvest, (the vCPU may
    /// push meanwhile: `racing`), reset, (and again: `after`, the reaping
    /// thread switched out before it reads the ring), settle with the
    /// count. Checks that the shim's idea of the kernel's reset index is
    /// the kernel's, and that the reset index never overtakes the dirty
    /// index.
    fn reap(k: &mut Kernel, r: &Ring, ring_full: bool, racing: u32, after: u32) -> Harvest {
        let h = r.harvest(ring_full, |_, _| {});
        for _ in 0..racing {
            k.push(r);
        }
        let count = k.walk(r);
        for _ in 0..after {
            k.push(r);
        }
        let s = settle_with(r, count);
        assert_eq!(
            r.kreset.load(Ordering::Relaxed),
            k.reset,
            "{h:?} count {count} {s:?} racing {racing} after {after} kernel dirty {}",
            k.dirty
        );
        assert!(
            k.used() < 1 << 31,
            "reset index past the dirty index: {h:?}"
        );
        h
    }

    /// A vCPU that pushes only below the soft limit, reaped on ring-full
    /// exits as `reap_vcpu` does (unwedging when it finds nothing twice),
    /// for `steps` steps: the shim must follow the kernel's reset index and
    /// never carry it past the dirty index. Returns the pushes.
    fn well_behaved(k: &mut Kernel, r: &Ring, soft: u32, steps: u32) -> u32 {
        let (mut pushed, mut prev_empty) = (0, false);
        for step in 0..steps {
            if k.used() < soft {
                k.push(r);
                pushed += 1;
                continue;
            }
            let h = r.harvest(true, |_, _| {});
            let empty = h.entries == 0 && h.skipped == 0 && h.repaired == 0;
            if empty && prev_empty {
                r.unwedge();
            }
            prev_empty = empty;
            let count = k.walk(r);
            settle_with(r, count);
            assert!(
                k.used() < 1 << 31,
                "step {step}: reset index past the dirty index"
            );
            assert_eq!(r.kreset.load(Ordering::Relaxed), k.reset, "step {step}");
        }
        pushed
    }

    #[test]
    fn an_overrun_between_harvest_and_reset_is_handed_back_later() {
        // What QEMU's dirty-limit test hit: a full lap harvested, the vCPU
        // pushing over our marks before the reset, the reset stopping short.
        let r = ring(4096);
        let mut k = Kernel { dirty: 0, reset: 0 };
        for _ in 0..4096 + 64 {
            k.push(&r);
        }
        let h = reap(&mut k, &r, true, 57, 0);
        assert!(h.full);
        assert_eq!(
            k.reset, 64,
            "the reset stopped at the first overwritten mark"
        );
        assert_eq!(r.lag(), 4096 - 64);
        let h = reap(&mut k, &r, true, 0, 0);
        assert_eq!((h.repaired, r.lag()), (57, 0), "{h:?}");
        assert!(h.full, "pushes onto unreturned entries are an overrun");
        // The vCPU runs again and everything it pushes is harvested.
        for _ in 0..100 {
            k.push(&r);
        }
        let h = reap(&mut k, &r, true, 0, 0);
        assert_eq!(h.entries, 100, "{h:?}");
        assert_eq!(k.used(), 0);
    }

    #[test]
    fn overruns_never_wedge_the_ring_for_good() {
        // Random overruns, races and ring-full exits against the kernel
        // model; then a well-behaved vCPU must get its ring back.
        // Miri checks the raw accesses on a small ring, natively many
        // rounds on a real size.
        let (n, rounds, steps) = if cfg!(miri) {
            (64, 20, 400)
        } else {
            (1024, 20_000, 100_000)
        };
        let r = ring(n);
        let soft = n - 16;
        let mut k = Kernel { dirty: 0, reset: 0 };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % u64::from(n)) as u32
        };
        for _ in 0..rounds {
            for _ in 0..rnd(n * 3 / 2) {
                k.push(&r);
            }
            let racing = if rnd(4) == 0 { rnd(n / 3) } else { 0 };
            let after = if rnd(4) == 0 { rnd(n * 3 / 2) } else { 0 };
            reap(&mut k, &r, rnd(2) == 0, racing, after);
        }
        // Well behaved from here.
        let pushed = well_behaved(&mut k, &r, soft, steps);
        // (A ring no bigger than the reserve cannot be unwedged: Miri's
        // small one checks the invariants above only.)
        assert!(
            cfg!(miri) || pushed > steps / 2,
            "the vCPU got {pushed} pushes in"
        );
    }

    /// A ring-full storm: the thread that reset the rings is switched
    /// out between the ioctl and reading the rings, and the vCPU refills
    /// every entry the reset freed. The flags then look like an overrun
    /// onto our first mark (nothing reached); only the ioctl's count tells.
    /// Taken for the overrun, our indexes fall a lap's part behind the
    /// kernel's, a later hole is "skipped" onto entries the kernel has not
    /// pushed yet, its reset index passes its dirty index, and the vCPU
    /// exits ring-full for ever however many entries are handed back.
    #[test]
    fn a_vcpu_refilling_what_the_reset_freed_before_we_look_keeps_the_indexes_in_step() {
        let n = 64;
        let r = ring(n);
        let soft = n - 8;
        let mut k = Kernel { dirty: 0, reset: 0 };
        for _ in 0..40 {
            k.push(&r);
        }
        assert_eq!(r.harvest(false, |_, _| {}).entries, 40);
        let count = k.walk(&r);
        assert_eq!(count, 40);
        // The vCPU runs on: 24 entries after the 40, then the 40 freed.
        for _ in 0..n {
            k.push(&r);
        }
        let s = settle_with(&r, count);
        assert_eq!((s.reached, s.overwritten), (40, false), "{s:?}");
        assert_eq!(r.kreset.load(Ordering::Relaxed), k.reset);
        // The ring works on.
        assert!(well_behaved(&mut k, &r, soft, 2000) > 0);
    }

    #[test]
    fn the_count_settles_what_the_flags_cannot() {
        let exact = |n| Reach {
            at_least: n,
            exact: true,
        };
        let open = |n| Reach {
            at_least: n,
            exact: false,
        };
        // The flags account for everything: as they say.
        assert_eq!(
            split_reset(30, &[(exact(10), 10), (exact(20), 40)]),
            [Some(10), Some(20)]
        );
        // One ring they cannot tell about: the rest of the count.
        assert_eq!(
            split_reset(50, &[(exact(10), 10), (open(0), 40)]),
            [Some(10), Some(40)]
        );
        assert_eq!(
            split_reset(10, &[(exact(10), 10), (open(0), 40)]),
            [Some(10), Some(0)]
        );
        assert_eq!(split_reset(25, &[(open(5), 64)]), [Some(25)]);
        // A ring overrun by more than a lap: pushes covered entries the walk
        // reached after its last 0, and no harvest found it full since.
        assert_eq!(split_reset(899, &[(exact(833), 899)]), [Some(899)]);
        assert_eq!(
            split_reset(110, &[(exact(10), 10), (exact(40), 100)]),
            [Some(10), Some(100)]
        );
        // Several: the one split of all-or-least that adds up.
        assert_eq!(
            split_reset(70, &[(open(0), 30), (open(0), 40), (open(0), 50)]),
            [Some(30), Some(40), Some(0)]
        );
        // Two splits add up (30 + 40 = 70 = 20 + 50): cannot tell.
        assert_eq!(
            split_reset(
                70,
                &[(open(0), 30), (open(0), 40), (open(0), 20), (open(0), 50)]
            ),
            [None, None, None, None]
        );
        // More than every ring could reach, or less than the flags show:
        // the flags' figures stand for the rings they are sure of.
        assert_eq!(
            split_reset(99, &[(exact(10), 10), (open(0), 40)]),
            [Some(10), None]
        );
        assert_eq!(
            split_reset(5, &[(exact(10), 10), (open(0), 40)]),
            [Some(10), None]
        );
    }

    #[test]
    fn two_rings_one_refilled_before_we_look_one_overrun_before_the_reset() {
        // One reset over three rings: A reached in full and refilled at
        // once (its flags look like B's), B overrun onto its first mark
        // before the reset, C plain. The count (A's 40 + C's 10) tells.
        let (a, b, c) = (ring(64), ring(64), ring(64));
        let mut ka = Kernel { dirty: 0, reset: 0 };
        let mut kb = Kernel { dirty: 0, reset: 0 };
        let mut kc = Kernel { dirty: 0, reset: 0 };
        for _ in 0..40 {
            ka.push(&a);
        }
        for _ in 0..64 {
            kb.push(&b);
        }
        for _ in 0..10 {
            kc.push(&c);
        }
        a.harvest(false, |_, _| {});
        b.harvest(false, |_, _| {});
        c.harvest(false, |_, _| {});
        kb.push(&b);
        let count = ka.walk(&a) + kb.walk(&b) + kc.walk(&c);
        assert_eq!(count, 50);
        for _ in 0..64 {
            ka.push(&a);
        }
        let rings = [&a, &b, &c];
        let reach: Vec<(Reach, u32)> = rings.iter().map(|r| (r.reach(), r.lag())).collect();
        assert!(!reach[0].0.exact && !reach[1].0.exact && reach[2].0.exact);
        let split = split_reset(u64::from(count), &reach);
        assert_eq!(split, [Some(40), Some(0), Some(10)]);
        for (r, n) in rings.iter().zip(split) {
            r.after_reset(n.unwrap(), |_, _| {});
        }
        assert_eq!(a.kreset.load(Ordering::Relaxed), ka.reset);
        assert_eq!(b.kreset.load(Ordering::Relaxed), kb.reset);
        assert_eq!(c.kreset.load(Ordering::Relaxed), kc.reset);
    }

    /// `after_reset` for one ring as `Vm::reset` does it, with the count.
    fn settle_with(r: &Ring, count: u32) -> Settled {
        let reach = [(r.reach(), r.lag())];
        let n = split_reset(u64::from(count), &reach)[0].unwrap_or(reach[0].0.at_least);
        r.after_reset(n, |_, _| {})
    }

    /// `after_reset` with a sink that collects what it reports again.
    fn settle(r: &Ring) -> (Settled, Vec<u64>) {
        let mut again = Vec::new();
        let s = r.after_reset(r.reach().at_least, |_, offset| again.push(offset));
        (s, again)
    }

    #[test]
    fn each_ring_tells_how_far_the_reset_got_whatever_the_vm_wide_count() {
        // The issue-11 case: two rings harvested, a vCPU overruns one of
        // them before the reset. The ioctl's count (here 300) cannot say
        // which ring fell short; the rings can.
        let (a, b) = (ring(1024), ring(1024));
        let mut ka = Kernel { dirty: 0, reset: 0 };
        let mut kb = Kernel { dirty: 0, reset: 0 };
        for _ in 0..300 {
            ka.push(&a);
        }
        for _ in 0..1024 {
            kb.push(&b);
        }
        assert_eq!(a.harvest(false, |_, _| {}).entries, 300);
        assert!(b.harvest(false, |_, _| {}).full);
        kb.push(&b); // the overrun: onto B's first mark
        let count = ka.walk(&a) + kb.walk(&b);
        assert_eq!(count, 300);
        let (sa, again_a) = settle(&a);
        let (sb, again_b) = settle(&b);
        assert_eq!((sa.reached, sa.unreached, sa.overwritten), (300, 0, false));
        assert!(again_a.is_empty());
        assert_eq!((sb.reached, sb.unreached, sb.overwritten), (0, 1024, true));
        // Every mark the overrun left alone is reported again.
        assert_eq!(again_b, (1..1024).collect::<Vec<u64>>());
        assert_eq!(a.kreset.load(Ordering::Relaxed), ka.reset);
        assert_eq!(b.kreset.load(Ordering::Relaxed), kb.reset);
    }

    #[test]
    fn unreached_entries_are_reported_after_every_reset_until_one_reaches_them() {
        // A reset that stops part-way (a signal: the kernel returns what
        // it walked so far): the pages of the entries it did not reach are
        // still writable without a new entry.
        let r = ring(64);
        let mut k = Kernel { dirty: 0, reset: 0 };
        for _ in 0..10 {
            k.push(&r);
        }
        assert_eq!(r.harvest(false, |_, _| {}).entries, 10);
        for _ in 0..4 {
            r.flags(k.reset).store(0, Ordering::Release);
            k.reset += 1;
        }
        let (s, again) = settle(&r);
        assert_eq!((s.reached, s.unreached, s.overwritten), (4, 6, false));
        assert_eq!(again, (4..10).collect::<Vec<u64>>());
        // Nothing walked: reported again.
        let (s, again) = settle(&r);
        assert_eq!((s.reached, s.unreached), (0, 6));
        assert_eq!(again.len(), 6);
        // The next reset reaches them: nothing more to report.
        k.walk(&r);
        let (s, again) = settle(&r);
        assert_eq!((s.reached, s.unreached), (6, 0));
        assert!(again.is_empty());
        assert_eq!(r.kreset.load(Ordering::Relaxed), k.reset);
    }

    #[test]
    fn pushes_onto_entries_the_reset_just_freed_are_not_taken_for_unreached_ones() {
        // A full lap harvested and handed back; before we look, the vCPU
        // pushes again onto the first freed entries (a lap ahead).
        let r = ring(16);
        let mut k = Kernel { dirty: 0, reset: 0 };
        for _ in 0..16 {
            k.push(&r);
        }
        r.harvest(false, |_, _| {});
        k.walk(&r);
        for _ in 0..3 {
            k.push(&r);
        }
        let (s, again) = settle(&r);
        assert_eq!((s.reached, s.unreached, s.overwritten), (16, 0, false));
        assert!(again.is_empty());
        assert_eq!(r.kreset.load(Ordering::Relaxed), k.reset);
        let (_, got) = collect(&r, false);
        assert_eq!(got, vec![(1, 16), (1, 17), (1, 18)]);
    }
}
