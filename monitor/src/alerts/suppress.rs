//! Suppression: an alert with the same rule and key within the quiet time is not sent
//! again, only counted. Each alert carries its quiet time and whether a repeat restarts
//! it (as its rule set them); one that carries none is quiet for `--suppress` from the
//! alert that was sent.

use std::{collections::HashMap, time::Duration};

use serde::Deserialize;

use super::{Alert, Note, Quiet};

/// Quiet times kept at most. Each is an alert that went out, kept for its quiet time: a
/// flood of alerts of distinct keys would grow them for that long. When full, the older
/// half goes: those keys may alert again sooner, never less.
pub const MAX_KEYS: usize = 262_144;

pub struct Suppressor {
    /// `--suppress`: the quiet time of alerts that carry none.
    default: Quiet,
    /// The quiet time of each (rule, key) running.
    timers: HashMap<(Note, String), Timer>,
    /// Quiet times dropped to stay within [`MAX_KEYS`].
    shed: u64,
    /// Changes to what `save` writes, counted.
    changes: u64,
}

/// One quiet time running.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Timer {
    /// Kernel-clock time it runs from.
    since: u64,
    /// That of the latest alert of its rule and key.
    quiet: Quiet,
}

impl Timer {
    fn running(&self, quiet: Quiet, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.since) < quiet.time.as_nanos() as u64
    }
}

/// A quiet time as `--state-dir` keeps it.
#[derive(Deserialize)]
#[serde(untagged)]
enum SavedTimer {
    /// Rule, key, since, quiet time in nanoseconds, whether repeats restart it.
    Carried(Note, String, u64, u64, bool),
    /// Written before alerts carried their quiet time: until the next alert of its rule
    /// and key says otherwise, `--suppress` (RestrictedOutbound's shorter one is then
    /// kept longer than needed, which its alerts' own quiet time makes harmless).
    Before(Note, String, u64),
}

impl SavedTimer {
    fn since(&self) -> (Note, &str, u64) {
        match self {
            SavedTimer::Carried(note, key, since, ..) | SavedTimer::Before(note, key, since) => {
                (*note, key, *since)
            }
        }
    }
}

impl Suppressor {
    /// `quiet`: `--suppress`.
    pub fn new(quiet: Duration) -> Self {
        Self {
            default: Quiet {
                time: quiet,
                repeats_restart: false,
            },
            timers: HashMap::new(),
            shed: 0,
            changes: 0,
        }
    }

    /// Whether `alert` goes out at kernel time `now_ns`: the quiet time the alert carries
    /// is what counts.
    pub fn admit(&mut self, alert: &Alert, now_ns: u64) -> bool {
        let quiet = alert.quiet.unwrap_or(self.default);
        let slot = (alert.note, alert.key.clone());
        if let Some(timer) = self.timers.get_mut(&slot)
            && timer.running(quiet, now_ns)
        {
            let before = *timer;
            timer.quiet = quiet;
            if quiet.repeats_restart {
                timer.since = now_ns;
            }
            if *timer != before {
                self.changes += 1;
            }
            return false;
        }
        if self.timers.len() >= MAX_KEYS && !self.timers.contains_key(&slot) {
            self.make_room();
        }
        self.timers.insert(
            slot,
            Timer {
                since: now_ns,
                quiet,
            },
        );
        self.changes += 1;
        true
    }

    fn make_room(&mut self) {
        let Some(cut) = crate::shed::cut(self.timers.values().map(|t| t.since)) else {
            return;
        };
        let before = self.timers.len();
        self.timers.retain(|_, timer| timer.since > cut);
        self.shed += (before - self.timers.len()) as u64;
    }

    /// Quiet times dropped so far to stay within [`MAX_KEYS`].
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// How many times what `save` writes has changed, counting up from any start.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The quiet times running, sorted, for `--state-dir`.
    pub fn save(&self) -> serde_json::Value {
        let mut timers: Vec<(&Note, &String, u64, u64, bool)> = self
            .timers
            .iter()
            .map(|((note, key), timer)| {
                let quiet = timer.quiet;
                let time = quiet.time.as_nanos() as u64;
                (note, key, timer.since, time, quiet.repeats_restart)
            })
            .collect();
        timers.sort_unstable();
        serde_json::to_value(timers).expect("plain data")
    }

    /// Takes back what `save` (of this version or the one before) gave in an earlier run
    /// of this boot.
    pub fn restore(&mut self, saved: serde_json::Value) {
        if saved.is_null() {
            return;
        }
        match serde_json::from_value::<Vec<SavedTimer>>(saved) {
            Ok(timers) => {
                self.timers = timers
                    .into_iter()
                    .map(|timer| match timer {
                        SavedTimer::Carried(note, key, since, time, repeats_restart) => {
                            let quiet = Quiet {
                                time: Duration::from_nanos(time),
                                repeats_restart,
                            };
                            ((note, key), Timer { since, quiet })
                        }
                        SavedTimer::Before(note, key, since) => {
                            let quiet = self.default;
                            ((note, key), Timer { since, quiet })
                        }
                    })
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
        let timers = Vec::<SavedTimer>::deserialize(saved)
            .map_err(|err| format!("suppression timers: {err}"))?;
        match timers.iter().map(SavedTimer::since).find(|t| t.2 > now_ns) {
            Some((note, key, _)) => Err(format!(
                "suppression timers: {note:?} {key:?} starts in the future"
            )),
            None => Ok(()),
        }
    }

    /// Forgets keys whose quiet time is over.
    pub fn prune(&mut self, now_ns: u64) {
        let before = self.timers.len();
        self.timers
            .retain(|_, timer| timer.running(timer.quiet, now_ns));
        if self.timers.len() != before {
            self.changes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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
            quiet: None,
            conn_log: None,
        }
    }

    fn restricted(key: &str) -> Alert {
        Alert {
            quiet: Some(Quiet {
                time: Duration::from_secs(60),
                repeats_restart: true,
            }),
            ..alert(Note::RestrictedOutbound, key)
        }
    }

    #[test]
    fn same_rule_and_key_is_quiet_for_the_suppress_time() {
        let mut s = Suppressor::new(Duration::from_secs(3600));
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
        let mut s = Suppressor::new(Duration::from_secs(3600));
        let a = restricted("src>dst:443/6");
        assert!(s.admit(&a, 0));
        assert!(!s.admit(&a, 50 * SEC));
        assert!(!s.admit(&a, 100 * SEC), "restarted at 50 s");
        assert!(s.admit(&a, 161 * SEC), "quiet for 61 s");
        s.prune(222 * SEC);
        assert!(s.timers.is_empty());
    }

    #[test]
    fn a_flood_of_keys_sheds_the_oldest_quiet_times_and_loses_no_alert() {
        let mut s = Suppressor::new(Duration::from_secs(3600));
        let first = alert(Note::RestrictedOutbound, "first");
        assert!(s.admit(&first, 0));
        for n in 1..=MAX_KEYS as u64 {
            let flood = alert(Note::RestrictedOutbound, &format!("flood {n}"));
            assert!(s.admit(&flood, n), "every new key alerts");
        }
        assert!(s.timers.len() <= MAX_KEYS);
        assert!(s.shed() >= MAX_KEYS as u64 / 2, "shed {}", s.shed());
        assert!(
            s.admit(&first, MAX_KEYS as u64 + 1),
            "a shed quiet time alerts again"
        );
    }

    #[test]
    fn the_alerts_own_quiet_time_is_what_counts() {
        let mut s = Suppressor::new(Duration::from_secs(3600));
        let brief = Alert {
            quiet: Some(Quiet {
                time: Duration::from_secs(10),
                repeats_restart: false,
            }),
            ..alert(Note::LargeUpload, "k")
        };
        assert!(s.admit(&brief, 0));
        assert!(!s.admit(&brief, 9 * SEC));
        assert!(s.admit(&brief, 10 * SEC), "its own 10 s, not --suppress");
        let plain = alert(Note::RestrictedOutbound, "k");
        assert!(s.admit(&plain, 0));
        assert!(!s.admit(&plain, 3599 * SEC), "none carried: --suppress");
        s.prune(20 * SEC);
        assert_eq!(s.timers.len(), 1, "each timer pruned by its own quiet time");
    }

    #[test]
    fn saved_quiet_times_come_back_with_their_own_length() {
        let mut s = Suppressor::new(Duration::from_secs(3600));
        assert!(s.admit(&restricted("r"), 0));
        assert!(s.admit(&alert(Note::LargeUpload, "k"), 0));
        let saved = s.save();
        assert_eq!(Suppressor::check_saved(&saved, 0), Ok(()));
        let mut back = Suppressor::new(Duration::from_secs(3600));
        back.restore(saved);
        back.prune(60 * SEC);
        assert_eq!(
            back.save(),
            json!([["LargeUpload", "k", 0, 3600 * SEC, false]])
        );
    }

    #[test]
    fn a_restricted_quiet_time_saved_before_alerts_carried_theirs_holds() {
        let saved = json!([["RestrictedOutbound", "r", 0], ["LargeUpload", "k", 0]]);
        assert_eq!(Suppressor::check_saved(&saved, 0), Ok(()));
        let mut s = Suppressor::new(Duration::from_secs(3600));
        s.restore(saved);
        assert!(!s.admit(&restricted("r"), 50 * SEC));
        assert!(!s.admit(&restricted("r"), 100 * SEC), "restarted at 50 s");
        assert!(s.admit(&restricted("r"), 161 * SEC));
        assert!(!s.admit(&alert(Note::LargeUpload, "k"), 3599 * SEC));
        assert!(s.admit(&alert(Note::LargeUpload, "k"), 3600 * SEC));
    }

    #[test]
    fn changes_count_only_what_save_would_write_differently() {
        let mut s = Suppressor::new(Duration::from_secs(3600));
        let a = alert(Note::LargeUpload, "k");
        assert!(s.admit(&a, 0));
        let sent = s.changes();
        assert!(!s.admit(&a, SEC));
        s.prune(2 * SEC);
        assert_eq!(
            s.changes(),
            sent,
            "a repeat that restarts nothing, nothing pruned"
        );
        let restarting = Alert {
            note: Note::LargeUpload,
            ..restricted("k")
        };
        assert!(!s.admit(&restarting, 3 * SEC));
        assert_ne!(s.changes(), sent, "its own quiet time, restarted");
        let restarted = s.changes();
        s.prune(3600 * SEC);
        assert_ne!(s.changes(), restarted, "pruned");
    }
}
