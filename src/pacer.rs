//! The adaptive reaper's pacing: from the rings' fill levels at each
//! check, whether to reap now and how long to pause before the next check.
//! No thread and no VM here (`reaper` runs it), so tests drive it with
//! made-up levels and times.
//!
//! The rate it paces by is the fastest fill rate (entries the kernel pushed
//! per second into one ring) of any sample it trusts: one that counted at
//! least an eighth of the high-water mark in one ring. A smaller sample
//! says little about the rate: measured on the Linux guest as a migration
//! started, 3 entries in 80 us read as 35,000 entries a second, where the
//! vCPUs pushed 140,000 to 210,000; the pause that rate planned (39 ms in
//! the run that overflowed) let a ring fill from empty 26 ms later. Until
//! a sample is trusted, the pause doubles from the shortest.
//!
//! A wake (a memslot started dirty logging) starts that over: the rate
//! seen before may be that of fewer logged slots, and the interval up to
//! the first check after the wake mostly precedes the logging, so that
//! check only takes each ring's count to measure from.
//!
//! The peak only grows, so one sample read too high paces every later
//! pause of the migration at the shortest. Three kinds of sample could
//! read too high until 0.3 (the 8-vCPU cell of doc/heavy.md, where a
//! running vCPU really pushes 555,000 to 690,000 entries a second):
//! - a count read while another thread harvested the ring, short by what
//!   that harvest took, against which the next count read long. A torn
//!   read now gives no count (`Ring::level`, a sequence count), and a
//!   count below the last kept one (a hole the kernel left, entries handed
//!   back) is not kept either;
//! - a count stamped late: the thread was switched out between reading the
//!   rings and reading the clock (its checks came up to 88 ms late there),
//!   and the next sample measured a whole interval's entries over the part
//!   of it after the stamp. A ring's growth is now measured from when its
//!   earlier read began to the end of the check: the longest the interval
//!   can have been, so the rate errs low;
//! - a full ring, overrun (measured after an overflow: 4,096 entries in
//!   1.5 ms, then 3,986 in 0.4 ms after its harvest, 9.7 million a
//!   second, and every later pause at the shortest). A full ring now gives
//!   no rate, and the count after it is measured afresh.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::types::ReaperConfig;

/// The reaper's knobs, defaults applied and checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    high_water_pct: u32,
    min: Duration,
    max: Duration,
}

impl Config {
    /// `cfg`, checked; `EINVAL` when out of range.
    pub(crate) fn new(c: &ReaperConfig) -> Result<Config> {
        let (pct, min, max) = (c.high_water_pct(), c.min_interval(), c.max_interval());
        if !(1..=90).contains(&pct) || min.is_zero() || min > max || max > Duration::from_secs(10) {
            return Err(Error::inval(format!(
                "reaper config: high water {pct}% (1..=90), min interval {min:?} and \
                 max interval {max:?} (0 < min <= max <= 10 s) are out of range"
            )));
        }
        Ok(Config {
            high_water_pct: pct,
            min,
            max,
        })
    }

    /// Reap when a ring holds this percentage of its entries.
    pub(crate) fn high_water_pct(&self) -> u32 {
        self.high_water_pct
    }

    /// The shortest pause between two checks.
    pub(crate) fn min(&self) -> Duration {
        self.min
    }

    /// The longest pause between two checks.
    pub(crate) fn max(&self) -> Duration {
        self.max
    }
}

/// One ring's level at a check (`Vm::ring_levels` reads it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level {
    /// The vCPU.
    pub(crate) index: u32,
    /// Entries the kernel pushed into the ring so far; `None` when the
    /// read was torn by a harvest on another thread (`Ring::level`).
    pub(crate) pushed: Option<u64>,
    /// Entries waiting to be harvested.
    pub(crate) fill: u32,
    /// The ring's size.
    pub(crate) size: u32,
    /// When the read of this ring began (the count is from then or later).
    pub(crate) at: Instant,
}

/// The pacing state of one reaper thread.
pub(crate) struct Pacer {
    cfg: Config,
    /// The pause before the next check.
    pause: Duration,
    /// Per vCPU: entries the kernel had pushed at the last sample kept,
    /// and when its read began.
    pushed: HashMap<u32, (u64, Instant)>,
    /// The fastest fill rate of any trusted sample, entries a second.
    peak: f64,
    /// No sample trusted since the start or the last wake: pace by
    /// doubling from the shortest pause, not by `peak`.
    learning: bool,
    /// The largest ring and the fullest at the last check.
    entries: u32,
    fullest: u32,
}

impl Pacer {
    /// Nothing to pace by yet: the longest pause, until a check sees a
    /// rate or the VM wakes the thread.
    pub(crate) fn new(cfg: Config) -> Pacer {
        Pacer {
            cfg,
            pause: cfg.max(),
            pushed: HashMap::new(),
            peak: 0.0,
            learning: true,
            entries: 0,
            fullest: 0,
        }
    }

    /// The pause before the next check.
    pub(crate) fn pause(&self) -> Duration {
        self.pause
    }

    /// Dirty logging started on a memslot: check now, then from the
    /// shortest pause until a sample is trusted again.
    pub(crate) fn wake(&mut self) {
        self.pause = self.cfg.min();
        self.learning = true;
        self.pushed.clear();
    }

    /// A check that found `levels`, ending at `now` (after every ring was
    /// read): whether some ring holds the high-water mark (reap now). A
    /// ring's rate is its count's growth from when the earlier read began
    /// to `now` (see the module's comment).
    pub(crate) fn check(&mut self, now: Instant, levels: &[Level]) -> bool {
        let pct = u64::from(self.cfg.high_water_pct());
        let (mut over, mut rate, mut trusted) = (false, 0f64, false);
        self.entries = 0;
        self.fullest = 0;
        for l in levels {
            self.entries = self.entries.max(l.size);
            self.fullest = self.fullest.max(l.fill);
            over |= u64::from(l.fill) * 100 >= u64::from(l.size) * pct;
            let Some(pushed) = l.pushed else {
                // Torn by a harvest: measure the next from the last kept.
                continue;
            };
            if l.fill >= l.size {
                // A full ring: the kernel may be writing over entries, and
                // the harvest after it counts what it finds (measured: 4,096
                // entries in 1.5 ms, then 3,986 in 0.4 ms). No rate from
                // it; measure afresh from the next count.
                self.pushed.remove(&l.index);
                continue;
            }
            let prev = self.pushed.get(&l.index).copied();
            let Some((before, then)) = prev else {
                self.pushed.insert(l.index, (pushed, l.at));
                continue;
            };
            if pushed < before {
                // Short of what the kernel pushed: a hole it left after
                // overrunning the ring, or entries handed back, are not
                // counted until harvested past. Measure from the last kept.
                continue;
            }
            self.pushed.insert(l.index, (pushed, l.at));
            let n = pushed - before;
            let dt = now.duration_since(then).as_secs_f64().max(1e-6);
            // An eighth of the mark: 128 entries of a 4096-entry ring at 25 %.
            if n * 800 >= u64::from(l.size) * pct {
                trusted = true;
                rate = rate.max(n as f64 / dt);
            }
        }
        if trusted {
            self.peak = self.peak.max(rate);
            self.learning = false;
        }
        over
    }

    /// Plans the next pause after a check (`reaped`: it emptied every
    /// ring). The next check comes when the fullest ring would reach the
    /// mark at the peak rate, but a ring gains at least half the mark
    /// between two checks: after a reap a ring at the peak rate is checked
    /// once, at the mark; one below it at most reaches one and a half
    /// marks by the check that reaps it, with no run of ever shorter
    /// pauses as it nears the mark.
    pub(crate) fn plan(&mut self, reaped: bool) -> Duration {
        let fullest = if reaped { 0 } else { self.fullest };
        let mark = f64::from(self.entries) * f64::from(self.cfg.high_water_pct()) / 100.0;
        let target = (mark - f64::from(fullest)).max(mark / 2.0);
        self.pause = if !self.learning && self.peak > 0.0 {
            Duration::from_secs_f64(target / self.peak).clamp(self.cfg.min(), self.cfg.max())
        } else {
            (self.pause * 2).min(self.cfg.max())
        };
        self.pause
    }

    /// After a failed reap: the longest pause.
    pub(crate) fn back_off(&mut self) -> Duration {
        self.pause = self.cfg.max();
        self.pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ReaperConfig;

    const RING: u32 = 4096;

    fn pacer() -> Pacer {
        // QEMU's: a quarter full, 200 us to 50 ms.
        let cfg = Config::new(&ReaperConfig::default()).unwrap();
        Pacer::new(cfg)
    }

    /// One ring, read at `at` (a check that took no time).
    fn level(at: Instant, pushed: u64, fill: u32) -> [Level; 1] {
        [Level {
            index: 0,
            pushed: Some(pushed),
            fill,
            size: RING,
            at,
        }]
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// The run that overflowed at the start of a migration: neither the
    /// interval before the wake nor a few entries in the first tens of
    /// microseconds after it may set the pace; the first trusted sample
    /// does.
    #[test]
    fn only_a_trusted_sample_after_a_wake_sets_the_pace() {
        let t0 = Instant::now();
        let mut p = pacer();
        // Idle before the migration.
        let mut t = t0 + Duration::from_millis(50);
        assert!(!p.check(t, &level(t, 1000, 0)));
        assert_eq!(p.plan(false), Duration::from_millis(50));
        // Logging starts and wakes the thread 5 ms into its pause; 200
        // entries came in the last moments. Read over the 5 ms that would
        // be 40,000 a second, trusted: the wake check only takes the count.
        p.wake();
        t += us(5000);
        assert!(!p.check(t, &level(t, 1200, 200)));
        assert_eq!(p.plan(false), us(400));
        // 3 entries in 80 us (35,000 a second, which paced a 39 ms pause
        // before): not trusted; the pause keeps doubling.
        t += us(80);
        assert!(!p.check(t, &level(t, 1203, 203)));
        assert_eq!(p.plan(false), us(800));
        // 200,000 a second for 800 us: 160 entries, trusted.
        t += us(800);
        assert!(!p.check(t, &level(t, 1363, 363)));
        let pause = p.plan(false);
        // (1024 - 363) entries at 200,000 a second: 3.3 ms.
        let want = 661.0 / 200_000.0;
        assert!((pause.as_secs_f64() - want).abs() < 1e-6, "{pause:?}");
        // The ring fills at that rate: it holds the mark, no more, at the
        // next check, which reaps.
        t += pause;
        let fill = 363 + (pause.as_secs_f64() * 200_000.0).round() as u64;
        assert_eq!(fill, 1024);
        assert!(p.check(t, &level(t, 1000 + fill, fill as u32)));
    }

    /// A slow vCPU paces by its rate once a sample is big enough; an idle
    /// one costs one check per longest pause.
    #[test]
    fn slow_and_idle_rings() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wake();
        let mut t = t0;
        let mut pushed = 0;
        assert!(!p.check(t, &level(t, pushed, 0)));
        let mut pauses = vec![];
        // 10,000 entries a second.
        for _ in 0..8 {
            let pause = p.plan(false);
            pauses.push(pause);
            t += pause;
            pushed += pause.as_micros() as u64 / 100;
            let fill = (pushed % 1024) as u32;
            if p.check(t, &level(t, pushed, fill)) {
                unreachable!("the fill stays below the mark here");
            }
        }
        // Doubling until 128 entries came in one interval (12.8 ms), then
        // paced by the rate: at most the longest pause.
        assert_eq!(&pauses[..4], &[us(400), us(800), us(1600), us(3200)]);
        assert!(pauses[7] <= Duration::from_millis(50));
        assert!(!p.learning);
        // Idle: nothing pushed, the rate seen stays the peak.
        let mut q = pacer();
        for _ in 0..10 {
            t += q.pause();
            assert!(!q.check(t, &level(t, 0, 0)));
            q.plan(false);
        }
        assert_eq!(q.pause(), Duration::from_millis(50));
    }

    /// A vCPU that starts pushing after the reaper started has no count
    /// to measure from at its first check: no rate from it, no panic.
    #[test]
    fn a_new_ring_is_measured_from_its_first_check() {
        let t0 = Instant::now();
        let mut p = pacer();
        assert!(!p.check(t0 + us(100), &level(t0 + us(100), 100_000, 100)));
        p.plan(false);
        assert!(p.learning);
        // A ring over the mark is reaped whatever the rate.
        assert!(p.check(t0 + us(200), &level(t0 + us(200), 101_100, 1100)));
        // 1,000 entries in 100 us: the mark in 102 us, so the shortest pause.
        assert_eq!(p.plan(true), us(200));
    }

    /// A count read while another thread harvested the ring comes as
    /// none (`Ring::level`), and one below the last kept (a hole the kernel
    /// left, entries handed back) is not kept: neither may make the next
    /// sample's growth look like entries pushed in a short interval.
    #[test]
    fn a_count_read_during_a_harvest_does_not_inflate_the_rate() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wake();
        assert!(!p.check(t0, &level(t0, 10_000, 0)));
        // 200,000 a second for 2 ms: trusted.
        let t = t0 + us(2000);
        assert!(!p.check(t, &level(t, 10_400, 400)));
        assert_eq!(p.peak, 200_000.0);
        // 100 us on, torn by a harvest on another thread.
        let torn = [Level {
            pushed: None,
            ..level(t, 0, 0)[0]
        }];
        assert!(!p.check(t + us(100), &torn));
        // 200 us on, a hole at the fetch index: the count reads short.
        assert!(!p.check(t + us(200), &level(t + us(200), 10_000, 0)));
        // 200 us after that, the harvest is counted: 80 entries in 400 us.
        assert!(!p.check(t + us(400), &level(t + us(400), 10_480, 40)));
        assert_eq!(p.peak, 200_000.0, "not 440 entries in 200 us");
        // And a real sample after it still counts from the kept one.
        assert!(!p.check(t + us(2000), &level(t + us(2000), 10_800, 360)));
        assert_eq!(p.peak, 200_000.0);
        assert!(p.check(t + us(6000), &level(t + us(6000), 12_000, 1560)));
        assert_eq!(p.peak, 300_000.0);
    }

    /// The reaper thread switched out between reading a ring and reading
    /// the clock (its checks came up to 88 ms late in the 8-vCPU cell): the
    /// count is from when the read began, so the interval runs from then.
    #[test]
    fn a_check_switched_out_after_its_read_does_not_inflate_the_rate() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wake();
        assert!(!p.check(t0, &level(t0, 0, 0)));
        // Read at 2 ms (400 entries: 200,000 a second), then switched out
        // for 10 ms before the check read the clock.
        let read = t0 + us(2000);
        assert!(!p.check(read + us(10_000), &level(read, 400, 400)));
        // Over the longest the interval can have been (12 ms): low, not high.
        assert!((p.peak - 400.0 / 0.012).abs() < 1.0, "{}", p.peak);
        // The next check, on time at 14 ms: 2,400 entries since the read at
        // 2 ms (200,000 a second), not since the late clock at 12 ms.
        let t = t0 + us(14_000);
        assert!(p.check(t, &level(t, 2_800, 2_800)));
        assert!(
            (p.peak - 200_000.0).abs() < 1.0,
            "not 2,400 entries in 2 ms: {}",
            p.peak
        );
    }

    /// A ring found full (overrun on this kernel) gives no rate, nor does
    /// the count after the harvest of it: measured, 4,096 entries in 1.5
    /// ms and then 3,986 in 0.4 ms (9.7 million a second).
    #[test]
    fn a_full_ring_gives_no_rate() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wake();
        assert!(!p.check(t0, &level(t0, 5_757_205, 0)));
        let t = t0 + us(1_500);
        assert!(p.check(t, &level(t, 5_761_301, 4096)));
        assert_eq!(p.peak, 0.0);
        let t = t + us(400);
        assert!(!p.check(t, &level(t, 5_765_287, 43)));
        assert_eq!(p.peak, 0.0);
        // From there on, rates count again (and this ring is over the mark).
        let t = t + us(2_000);
        assert!(p.check(t, &level(t, 5_766_487, 1243)));
        assert!((p.peak - 600_000.0).abs() < 1.0, "{}", p.peak);
    }

    /// A failed reap backs off to the longest pause.
    #[test]
    fn back_off_is_the_longest_pause() {
        let mut p = pacer();
        p.wake();
        assert_eq!(p.back_off(), Duration::from_millis(50));
    }
}
