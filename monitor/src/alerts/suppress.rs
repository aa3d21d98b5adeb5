//! Suppression: an alert with the same rule and key within the quiet time is not sent
//! again, only counted. RestrictedOutbound has its own quiet time, which a repeat
//! restarts (`--restricted-suppress`); for the other rules it runs from the alert that was
//! sent.

use std::{collections::HashMap, time::Duration};

use serde::Deserialize as _;

use super::{Alert, Note};

/// Quiet times kept at most. Each is an alert that went out, kept for its quiet time: a
/// flood of alerts of distinct keys would grow them for that long. When full, the older
/// half goes: those keys may alert again sooner, never less.
pub const MAX_KEYS: usize = 262_144;

pub struct Suppressor {
    quiet: Duration,
    restricted_quiet: Duration,
    /// Kernel-clock time the quiet time of each (rule, key) runs from.
    since: HashMap<(Note, String), u64>,
    /// Quiet times dropped to stay within [`MAX_KEYS`].
    shed: u64,
}

impl Suppressor {
    pub fn new(quiet: Duration, restricted_quiet: Duration) -> Self {
        Self {
            quiet,
            restricted_quiet,
            since: HashMap::new(),
            shed: 0,
        }
    }

    fn quiet_for(&self, note: Note) -> Duration {
        match note {
            Note::RestrictedOutbound => self.restricted_quiet,
            _ => self.quiet,
        }
    }

    /// Whether `alert` goes out at kernel time `now_ns`.
    pub fn admit(&mut self, alert: &Alert, now_ns: u64) -> bool {
        let quiet = self.quiet_for(alert.note).as_nanos() as u64;
        let slot = (alert.note, alert.key.clone());
        match self.since.get(&slot) {
            Some(&since) if now_ns.saturating_sub(since) < quiet => {
                if alert.note == Note::RestrictedOutbound {
                    self.since.insert(slot, now_ns);
                }
                false
            }
            _ => {
                if self.since.len() >= MAX_KEYS && !self.since.contains_key(&slot) {
                    self.make_room();
                }
                self.since.insert(slot, now_ns);
                true
            }
        }
    }

    fn make_room(&mut self) {
        let Some(cut) = crate::shed::cut(self.since.values().copied()) else {
            return;
        };
        let before = self.since.len();
        self.since.retain(|_, since| *since > cut);
        self.shed += (before - self.since.len()) as u64;
    }

    /// Quiet times dropped so far to stay within [`MAX_KEYS`].
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// The quiet times running, sorted, for `--state-dir`.
    pub fn save(&self) -> serde_json::Value {
        let mut since: Vec<(&Note, &String, u64)> = self
            .since
            .iter()
            .map(|((note, key), since)| (note, key, *since))
            .collect();
        since.sort_unstable();
        serde_json::to_value(since).expect("plain data")
    }

    /// Takes back what `save` gave in an earlier run of this boot.
    pub fn restore(&mut self, saved: serde_json::Value) {
        if saved.is_null() {
            return;
        }
        match serde_json::from_value::<Vec<(Note, String, u64)>>(saved) {
            Ok(since) => {
                self.since = since
                    .into_iter()
                    .map(|(note, key, since)| ((note, key), since))
                    .collect();
            }
            Err(err) => log::warn!("saved suppression state unreadable ({err}); not restored"),
        }
    }

    /// Why `saved` is not what [`Self::save`] could have written by kernel time `now_ns`,
    /// if it is not: a quiet time that starts later would silence its key for longer.
    pub fn check_saved(saved: &serde_json::Value, now_ns: u64) -> Result<(), String> {
        if saved.is_null() {
            return Ok(());
        }
        let since = Vec::<(Note, String, u64)>::deserialize(saved)
            .map_err(|err| format!("suppression timers: {err}"))?;
        match since.iter().find(|(_, _, since)| *since > now_ns) {
            Some((note, key, _)) => Err(format!(
                "suppression timers: {note:?} {key:?} starts in the future"
            )),
            None => Ok(()),
        }
    }

    /// Forgets keys whose quiet time is over.
    pub fn prune(&mut self, now_ns: u64) {
        let (quiet, restricted) = (self.quiet, self.restricted_quiet);
        self.since.retain(|(note, _), since| {
            let q = if *note == Note::RestrictedOutbound {
                restricted
            } else {
                quiet
            };
            now_ns.saturating_sub(*since) < q.as_nanos() as u64
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn alert(note: Note, key: &str) -> Alert {
        Alert {
            ts: 0.0,
            note,
            msg: String::new(),
            src: "198.18.1.2".parse().unwrap(),
            dst: None,
            first_seen: None,
            conn: None,
            figures: Default::default(),
            key: key.into(),
        }
    }

    #[test]
    fn same_rule_and_key_is_quiet_for_the_suppress_time() {
        let mut s = Suppressor::new(Duration::from_secs(3600), Duration::from_secs(60));
        let a = alert(Note::LargeUpload, "k");
        assert!(s.admit(&a, 0));
        assert!(!s.admit(&a, 3599 * SEC));
        assert!(
            s.admit(&a, 3600 * SEC),
            "the quiet time runs from the alert sent"
        );
        assert!(s.admit(&alert(Note::LargeUpload, "other"), 3601 * SEC));
        assert!(
            s.admit(&alert(Note::UploadRatio, "k"), 3601 * SEC),
            "another rule"
        );
    }

    #[test]
    fn restricted_repeats_restart_the_timer() {
        let mut s = Suppressor::new(Duration::from_secs(3600), Duration::from_secs(60));
        let a = alert(Note::RestrictedOutbound, "src>dst:443/6");
        assert!(s.admit(&a, 0));
        assert!(!s.admit(&a, 50 * SEC));
        assert!(!s.admit(&a, 100 * SEC), "restarted at 50 s");
        assert!(s.admit(&a, 161 * SEC), "quiet for 61 s");
        s.prune(222 * SEC);
        assert!(s.since.is_empty());
    }

    #[test]
    fn a_flood_of_keys_sheds_the_oldest_quiet_times_and_loses_no_alert() {
        let mut s = Suppressor::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let first = alert(Note::RestrictedOutbound, "first");
        assert!(s.admit(&first, 0));
        for n in 1..=MAX_KEYS as u64 {
            let flood = alert(Note::RestrictedOutbound, &format!("flood {n}"));
            assert!(s.admit(&flood, n), "every new key alerts");
        }
        assert!(s.since.len() <= MAX_KEYS);
        assert!(s.shed() >= MAX_KEYS as u64 / 2, "shed {}", s.shed());
        assert!(
            s.admit(&first, MAX_KEYS as u64 + 1),
            "a shed quiet time alerts again"
        );
    }
}
