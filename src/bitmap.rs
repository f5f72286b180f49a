//! Per-slot dirty bitmaps held by the shim: atomic words, one bit per page,
//! in the layout of `KVM_GET_DIRTY_LOG` (bit `i % 64` of word `i / 64`).
//!
//! Writers: the reap path publishes (`set_locked`, `set_all`) and
//! a sync drains (`drain_into`), both with the VM's reap lock
//! held, so no two writers ever race. That is what lets the hot path use a
//! plain load and store instead of a locked read-modify-write (measured:
//! the `lock or` was most of the per-entry cost). The words stay atomic so
//! that lock-free readers (`get`, `count`, a resize copying the bits) are
//! data-race free.
//!
//! Each bitmap keeps a summary beside its words, one bit per word (bit
//! `w % 64` of summary word `w / 64`: word `w` may hold bits), set by every
//! writer with the word and cleared by the drain. A drain visits only the
//! words the summary names, so a sync costs what was dirtied, not the
//! slot's size: 32 KiB of summary for a 64 GiB slot, against 2 MiB of words.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A fixed-size bitmap of `npages` bits that many threads set and drain.
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    /// Bit `w % 64` of `summary[w / 64]`: `words[w]` may be non-zero.
    summary: Box<[AtomicU64]>,
    npages: u64,
    /// `set_all` ran since the last drain: the next drain reports the
    /// whole slot whatever the guest wrote (written under the writers' lock).
    whole: AtomicBool,
}

/// Words needed for `nbits` bits.
pub fn words_for(nbits: u64) -> usize {
    nbits.div_ceil(64) as usize
}

/// Summary words for an `npages`-bit bitmap: one bit per word.
fn summary_words(npages: u64) -> usize {
    words_for(words_for(npages) as u64)
}

/// The mask of the valid bits of word `w` of an `nbits`-bit bitmap.
pub fn word_mask(nbits: u64, w: usize) -> u64 {
    let first = w as u64 * 64;
    if nbits >= first + 64 {
        u64::MAX
    } else if nbits <= first {
        0
    } else {
        (1u64 << (nbits - first)) - 1
    }
}

impl AtomicBitmap {
    /// An all-clear bitmap of `npages` bits.
    pub fn new(npages: u64) -> Self {
        let words = (0..words_for(npages)).map(|_| AtomicU64::new(0)).collect();
        let summary = (0..summary_words(npages))
            .map(|_| AtomicU64::new(0))
            .collect();
        AtomicBitmap {
            words,
            summary,
            npages,
            whole: AtomicBool::new(false),
        }
    }

    /// As `new`, but `None` instead of aborting when the memory cannot be
    /// had (a VMM under `RLIMIT_AS`, a huge slot).
    pub fn try_new(npages: u64) -> Option<Self> {
        let zeroed = |n: usize| -> Option<Box<[AtomicU64]>> {
            let mut v: Vec<AtomicU64> = Vec::new();
            v.try_reserve_exact(n).ok()?;
            v.extend((0..n).map(|_| AtomicU64::new(0)));
            Some(v.into_boxed_slice())
        };
        Some(AtomicBitmap {
            words: zeroed(words_for(npages))?,
            summary: zeroed(summary_words(npages))?,
            npages,
            whole: AtomicBool::new(false),
        })
    }

    /// Sets bit `page` with a plain load and store: the caller must hold
    /// the lock that serialises every writer of this bitmap (the reap
    /// lock). False (and nothing written) when `page` is out of range.
    #[inline]
    pub fn set_locked(&self, page: u64) -> bool {
        if page >= self.npages {
            return false;
        }
        let i = (page / 64) as usize;
        let w = &self.words[i];
        let bit = 1 << (page % 64);
        // Unconditional: a test-before-store mispredicts on random pages.
        w.store(w.load(Ordering::Relaxed) | bit, Ordering::Relaxed);
        self.mark_word(i);
        true
    }

    /// Notes in the summary that word `i` may hold bits (writers' lock held).
    #[inline]
    fn mark_word(&self, i: usize) {
        let s = &self.summary[i / 64];
        s.store(s.load(Ordering::Relaxed) | 1 << (i % 64), Ordering::Relaxed);
    }

    /// Is bit `page` set?
    pub fn get(&self, page: u64) -> bool {
        page < self.npages
            && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        self.whole.store(true, Ordering::Relaxed);
        for (i, w) in self.words.iter().enumerate() {
            w.fetch_or(word_mask(self.npages, i), Ordering::Relaxed);
        }
        let nwords = self.words.len() as u64;
        for (i, s) in self.summary.iter().enumerate() {
            s.fetch_or(word_mask(nwords, i), Ordering::Relaxed);
        }
    }

    /// Sets bit `dst + i` for every set bit `src + i` of `other`, `i` in
    /// `0 .. n` (bits out of either range are skipped). Returns how many
    /// were set. The caller holds the writers' lock of this bitmap.
    pub fn or_range_from(&self, dst: u64, other: &AtomicBitmap, src: u64, n: u64) -> u64 {
        let mut set = 0;
        for i in 0..n {
            if other.get(src + i) && self.set_locked(dst + i) {
                set += 1;
            }
        }
        set
    }

    /// Copies bits `0 .. min(len, other.len)` of `other` into this bitmap.
    pub fn or_from(&self, other: &AtomicBitmap) {
        let n = self.npages.min(other.npages);
        for (i, (d, s)) in self.words.iter().zip(other.words.iter()).enumerate() {
            let v = s.load(Ordering::Relaxed) & word_mask(n, i);
            if v != 0 {
                d.fetch_or(v, Ordering::Relaxed);
                self.summary[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
            }
        }
    }

    /// Moves every set bit into `out` (OR) and clears it here (the caller
    /// holds the writers' lock, see the module comment), merging in
    /// `extra` (a kernel bitmap, masked to this bitmap's length) on the way.
    /// Returns the number of distinct pages reported. `out` must hold at
    /// least `words_for(len)` words.
    pub fn drain_into(&self, out: &mut [u64], extra: Option<&[u64]>) -> u64 {
        self.drain_words(extra, |i, v| out[i] |= v)
    }

    /// As `drain_into`, handing each non-zero word (its index, its bits)
    /// to `f` instead, in ascending order: no buffer of the slot's size.
    /// Without `extra`, only the words the summary names are visited.
    pub fn drain_words(&self, extra: Option<&[u64]>, mut f: impl FnMut(usize, u64)) -> u64 {
        let mut count = 0u64;
        let mut take = |i: usize, extra_bits: u64| {
            let w = &self.words[i];
            let mut v = w.load(Ordering::Relaxed);
            if v != 0 {
                w.store(0, Ordering::Relaxed);
            }
            v = (v | extra_bits) & word_mask(self.npages, i);
            if v != 0 {
                f(i, v);
                count += u64::from(v.count_ones());
            }
        };
        if let Some(extra) = extra {
            // A kernel bitmap of the whole slot: every word is a candidate.
            for s in self.summary.iter() {
                s.store(0, Ordering::Relaxed);
            }
            for i in 0..self.words.len() {
                take(i, extra.get(i).copied().unwrap_or(0));
            }
        } else {
            for (si, s) in self.summary.iter().enumerate() {
                let mut m = s.load(Ordering::Relaxed);
                if m == 0 {
                    continue;
                }
                s.store(0, Ordering::Relaxed);
                while m != 0 {
                    take(si * 64 + m.trailing_zeros() as usize, 0);
                    m &= m - 1;
                }
            }
        }
        count
    }

    /// ORs `bits` into word `i` (the writers' lock held; bits past the
    /// last page are dropped).
    pub fn or_word_locked(&self, i: usize, bits: u64) {
        let bits = bits & word_mask(self.npages, i);
        if bits != 0 {
            let w = &self.words[i];
            w.store(w.load(Ordering::Relaxed) | bits, Ordering::Relaxed);
            self.mark_word(i);
        }
    }

    /// Clears, for each page in `first .. first + n` whose bit is set in
    /// `taken`, that bit in `taken` and in this bitmap (the writers' lock
    /// of both held). Returns how many of those bits were set here.
    pub fn clear_taken(&self, taken: &AtomicBitmap, first: u64, n: u64) -> u64 {
        let end = first.saturating_add(n).min(self.npages).min(taken.npages);
        if first >= end {
            return 0;
        }
        let mut cleared = 0;
        for i in (first / 64) as usize..=((end - 1) / 64) as usize {
            let base = i as u64 * 64;
            let lo = first.saturating_sub(base);
            let hi = (end - base).min(64);
            let range = (u64::MAX >> (64 - (hi - lo))) << lo;
            let t = &taken.words[i];
            let m = t.load(Ordering::Relaxed) & range;
            if m == 0 {
                continue;
            }
            t.store(t.load(Ordering::Relaxed) & !m, Ordering::Relaxed);
            let w = &self.words[i];
            let v = w.load(Ordering::Relaxed);
            w.store(v & !m, Ordering::Relaxed);
            cleared += u64::from((v & m).count_ones());
        }
        cleared
    }

    /// Did `set_all` run since the last `take_whole`?
    pub fn is_whole(&self) -> bool {
        self.whole.load(Ordering::Relaxed)
    }

    /// Did `set_all` run since the previous call? (The caller drains
    /// under the writers' lock right after.)
    pub fn take_whole(&self) -> bool {
        self.whole.swap(false, Ordering::Relaxed)
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Number of bits set among the first `npages` bits of `src`.
pub fn count_masked(src: &[u64], npages: u64) -> u64 {
    src.iter()
        .enumerate()
        .map(|(i, w)| u64::from((w & word_mask(npages, i)).count_ones()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_all_is_reported_once_as_the_whole_slot() {
        let b = AtomicBitmap::new(100);
        assert!(!b.take_whole());
        b.set_all();
        assert!(b.take_whole(), "the next drain reports the whole slot");
        let mut out = [0u64; 2];
        assert_eq!(b.drain_into(&mut out, None), 100);
        assert!(!b.take_whole(), "only once");
        assert!(b.set_locked(3));
        assert!(!b.take_whole(), "one page is not the whole slot");
    }

    #[test]
    fn clear_taken_clears_only_taken_pages_in_the_range() {
        let (b, taken) = (AtomicBitmap::new(200), AtomicBitmap::new(200));
        for p in [2, 60, 63, 64, 65, 130, 199] {
            b.set_locked(p);
        }
        // Taken: 60 and 64 in the range with their bit set here, 61 in
        // the range without, 65 and 130 past it, 1 before it.
        for p in [1, 60, 61, 64, 65, 130] {
            taken.set_locked(p);
        }
        assert_eq!(b.clear_taken(&taken, 60, 5), 2, "pages 60 and 64");
        let left: Vec<u64> = (0..200).filter(|&p| b.get(p)).collect();
        assert_eq!(left, [2, 63, 65, 130, 199]);
        let taken_left: Vec<u64> = (0..200).filter(|&p| taken.get(p)).collect();
        assert_eq!(
            taken_left,
            [1, 65, 130],
            "taken bits in the range are used up"
        );
        assert_eq!(b.clear_taken(&taken, 60, 5), 0, "nothing twice");
        // A range past the end is cut at it; an empty one clears nothing.
        assert_eq!(
            b.clear_taken(&taken, 100, u64::MAX),
            1,
            "130; 65 is before it"
        );
        assert_eq!(b.clear_taken(&taken, 0, 0), 0);
        assert_eq!(b.clear_taken(&taken, 500, 10), 0);
        let left: Vec<u64> = (0..200).filter(|&p| b.get(p)).collect();
        assert_eq!(left, [2, 63, 65, 199]);
    }

    #[test]
    fn set_get_and_bounds() {
        let b = AtomicBitmap::new(130);
        assert!(b.set_locked(0));
        assert!(b.set_locked(129));
        assert!(!b.set_locked(130), "out of range must be refused");
        assert!(b.get(0) && b.get(129) && !b.get(1));
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn drain_moves_and_clears() {
        let b = AtomicBitmap::new(100);
        for p in [1, 63, 64, 99] {
            b.set_locked(p);
        }
        let mut out = vec![0u64; 2];
        out[0] = 1 << 5;
        assert_eq!(b.drain_into(&mut out, None), 4);
        assert_eq!(out[0], (1 << 1) | (1 << 63) | (1 << 5));
        assert_eq!(out[1], 1 | (1 << 35));
        assert_eq!(b.count(), 0);
        assert_eq!(b.drain_into(&mut out, None), 0);
    }

    #[test]
    fn drain_merges_extra_once_and_masks() {
        let b = AtomicBitmap::new(70);
        b.set_locked(3);
        let extra = [1u64 << 3 | 1 << 4, u64::MAX];
        let mut out = vec![0u64; 2];
        // page 3 in both counts once; word 1 only has 6 valid bits.
        assert_eq!(b.drain_into(&mut out, Some(&extra)), 2 + 6);
        assert_eq!(out[1], 0x3f);
    }

    #[test]
    fn drain_finds_every_word_the_summary_names_in_order() {
        // 300 words: five summary words, the last one partial.
        let b = AtomicBitmap::new(300 * 64 - 5);
        let pages = [0, 63, 64, 4095, 4096, 4160, 12_345, 300 * 64 - 6];
        for p in pages {
            assert!(b.set_locked(p));
        }
        let mut seen = Vec::new();
        let n = b.drain_words(None, |i, mut v| {
            while v != 0 {
                seen.push(i as u64 * 64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        });
        assert_eq!(n, pages.len() as u64);
        assert_eq!(seen, pages);
        assert_eq!(b.count(), 0);
        assert_eq!(b.drain_words(None, |_, _| panic!("drained twice")), 0);
        // A bit set again after the drain is found again.
        b.set_locked(4096);
        assert_eq!(b.drain_words(None, |i, v| assert_eq!((i, v), (64, 1))), 1);
    }

    #[test]
    fn drain_after_set_all_or_from_and_extra_sees_every_bit() {
        let big = 200 * 64 + 7;
        let b = AtomicBitmap::new(big);
        b.set_all();
        assert_eq!(b.drain_words(None, |_, _| {}), big);
        let src = AtomicBitmap::new(big);
        src.set_locked(9000);
        b.or_from(&src);
        assert_eq!(b.drain_words(None, |i, _| assert_eq!(i, 9000 / 64)), 1);
        // extra: a kernel bitmap, with and without bits of our own.
        b.set_locked(5);
        let mut extra = vec![0u64; words_for(big)];
        extra[150] = 1;
        let mut words = Vec::new();
        assert_eq!(b.drain_words(Some(&extra), |i, _| words.push(i)), 2);
        assert_eq!(words, [0, 150]);
        assert_eq!(b.drain_words(None, |_, _| panic!("summary left set")), 0);
    }

    #[test]
    fn set_all_respects_length() {
        let b = AtomicBitmap::new(65);
        b.set_all();
        assert_eq!(b.count(), 65);
        let c = AtomicBitmap::new(200);
        c.or_from(&b);
        assert_eq!(c.count(), 65);
    }
}
