//! Whether the kernel programs understand what they see: over the last minute, the
//! packets they could not parse against those they counted. An interface whose framing
//! they misread (a link type reported wrongly, PPPoE watched on the Ethernet below it,
//! an encapsulation they do not know) shows as most packets unparsed.

use std::collections::VecDeque;

use monitor_common::stats;

/// How far back the judgement looks.
pub const WINDOW_NS: u64 = 60_000_000_000;
/// Fewer unparsed packets than this in a window are background noise (ARP, LLDP, STP on
/// an idle link), never a failure.
pub const MIN_UNPARSED: u64 = 60;

/// What changed at an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Most packets of the last minute were not parsed.
    Failing {
        unparsed: u64,
        counted: u64,
    },
    Recovered,
}

/// Cumulative totals at each poll, kept for one window.
#[derive(Debug, Default)]
pub struct ParseWatch {
    samples: VecDeque<Sample>,
    failing: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    mono_ns: u64,
    counted: u64,
    unparsed: u64,
}

impl ParseWatch {
    /// Whether the last update judged the programs to be failing.
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// Takes the totals so far (`counted`: packets the programs counted; `unparsed`:
    /// packets they could not parse) and judges the last full window. Returns a change
    /// of verdict, if any.
    pub fn update(&mut self, mono_ns: u64, counted: u64, unparsed: u64) -> Option<Change> {
        self.samples.push_back(Sample {
            mono_ns,
            counted,
            unparsed,
        });
        // Keep the newest sample at least a window old: the base of the judgement.
        while self
            .samples
            .get(1)
            .is_some_and(|s| mono_ns.saturating_sub(s.mono_ns) >= WINDOW_NS)
        {
            self.samples.pop_front();
        }
        let base = self.samples.front()?;
        if mono_ns.saturating_sub(base.mono_ns) < WINDOW_NS {
            return None;
        }
        let unparsed = unparsed.saturating_sub(base.unparsed);
        let counted = counted.saturating_sub(base.counted);
        let failing = unparsed >= MIN_UNPARSED && unparsed > counted;
        if failing == self.failing {
            return None;
        }
        self.failing = failing;
        Some(if failing {
            Change::Failing { unparsed, counted }
        } else {
            Change::Recovered
        })
    }
}

/// Packets the programs could not parse, from the `STATS` slots: every reason but the
/// malformed packets that were counted anyway.
pub fn unparsed_total(counters: &[u64; stats::SLOTS as usize]) -> u64 {
    stats::UNPARSED_REASONS
        .iter()
        .filter(|(slot, _)| *slot != stats::IP_LEN_EXCEEDS_FRAME)
        .map(|(slot, _)| counters[*slot as usize])
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Feeds one poll per second of `per_sec` (counted, unparsed) for `secs` seconds.
    fn feed(
        watch: &mut ParseWatch,
        clock: &mut u64,
        totals: &mut (u64, u64),
        secs: u64,
        per_sec: (u64, u64),
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for _ in 0..secs {
            *clock += S;
            totals.0 += per_sec.0;
            totals.1 += per_sec.1;
            changes.extend(watch.update(*clock, totals.0, totals.1));
        }
        changes
    }

    #[test]
    fn most_packets_unparsed_for_a_minute_is_failing_until_it_stops() {
        let mut watch = ParseWatch::default();
        let (mut clock, mut totals) = (0, (0, 0));
        // Healthy: counted traffic with some noise.
        assert!(feed(&mut watch, &mut clock, &mut totals, 120, (100, 5)).is_empty());
        // A tun read as Ethernet: nothing counted, everything not_ip. The window still
        // holds healthy seconds for a while.
        let changes = feed(&mut watch, &mut clock, &mut totals, 29, (0, 50));
        assert!(changes.is_empty(), "{changes:?}");
        let changes = feed(&mut watch, &mut clock, &mut totals, 31, (0, 50));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(matches!(changes[0], Change::Failing { .. }));
        assert!(watch.failing());
        // Once is enough: no repeat while it lasts.
        assert!(feed(&mut watch, &mut clock, &mut totals, 300, (0, 50)).is_empty());
        let changes = feed(&mut watch, &mut clock, &mut totals, 61, (100, 0));
        assert_eq!(changes, vec![Change::Recovered]);
        assert!(!watch.failing());
    }

    #[test]
    fn a_full_minute_is_needed_and_idle_noise_is_not_failing() {
        let mut watch = ParseWatch::default();
        let (mut clock, mut totals) = (0, (0, 0));
        // All unparsed, but less than a minute seen.
        assert!(feed(&mut watch, &mut clock, &mut totals, 59, (0, 10)).is_empty());
        // An idle link: a few ARP frames a minute and nothing else.
        let mut watch = ParseWatch::default();
        let (mut clock, mut totals) = (0, (0, 0));
        assert!(feed(&mut watch, &mut clock, &mut totals, 600, (0, 0)).is_empty());
        for _ in 0..10 {
            clock += 10 * S;
            totals.1 += 5;
            assert_eq!(watch.update(clock, totals.0, totals.1), None);
        }
    }

    #[test]
    fn counted_malformed_packets_are_not_unparsed() {
        let mut counters = [0u64; stats::SLOTS as usize];
        counters[stats::NOT_IP as usize] = 3;
        counters[stats::TRUNCATED_TCP as usize] = 4;
        counters[stats::IP_LEN_EXCEEDS_FRAME as usize] = 100;
        counters[stats::FLOW_MAP_FULL as usize] = 1000;
        assert_eq!(unparsed_total(&counters), 7);
    }
}
