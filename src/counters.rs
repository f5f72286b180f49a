//! The VM's counters, defined once: [`Stats`] (the C struct) is the only
//! list of them, and [`Counters`] keeps one atomic per field of it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::Stats;

/// Fields in `Stats`: every one a `u64`, nothing else, no padding.
const N: usize = size_of::<Stats>() / 8;
const _: () = assert!(size_of::<Stats>() == N * 8 && align_of::<Stats>() == 8);

/// The index in [`Counters`] of a `Stats` field.
macro_rules! stat {
    ($field:ident) => {
        ::std::mem::offset_of!($crate::types::Stats, $field) / 8
    };
}
pub(crate) use stat;

/// One relaxed atomic per `Stats` field (counters only: no ordering is
/// derived from them).
pub(crate) struct Counters([AtomicU64; N]);

impl Default for Counters {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Counters {
    /// Adds `n` to counter `i` (from [`stat!`]); returns the new value.
    pub(crate) fn add(&self, i: usize, n: u64) -> u64 {
        self.0[i].fetch_add(n, Ordering::Relaxed).wrapping_add(n)
    }

    /// The counters as the C struct.
    pub(crate) fn snapshot(&self) -> Stats {
        let v: [u64; N] = std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed));
        // SAFETY: Stats is #[repr(C)] with N u64 fields and no padding
        // (size and alignment asserted above), so it has the layout of
        // [u64; N] and every bit pattern is a valid value.
        unsafe { std::mem::transmute::<[u64; N], Stats>(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_has_its_own_counter() {
        let c = Counters::default();
        assert_eq!(c.add(stat!(entries_reaped), 5), 5);
        assert_eq!(c.add(stat!(reset_shortfall), 2), 2);
        assert_eq!(c.add(stat!(entries_reaped), 1), 6);
        let s = c.snapshot();
        assert_eq!(s.entries_reaped, 6);
        assert_eq!(s.reset_shortfall, 2);
        assert_eq!(s.ring_resets, 0);
    }
}
