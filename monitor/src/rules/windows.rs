//! WindowExceeded and DataLeak (NetFlow practice): IP bytes that local hosts send to
//! non-local ones are summed per group (pair, source or destination) over windows aligned
//! to the epoch. A group over the window threshold raises WindowExceeded, once per
//! window; the bytes of a group's exceeded windows within the leak period, summed, over
//! the leak threshold raise DataLeak, at most once per leak period.

use std::{collections::VecDeque, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{AddrMatcher, ConnCtx, Lists, Now, Rule, Saved, decode, human_bytes, save_as, saved};
use crate::{
    alerts::{Alert, Note},
    dense::{DenseMap, Keyed},
};

/// How WindowExceeded and DataLeak group bytes (`--leak-group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum LeakGroup {
    Pair,
    Src,
    Dst,
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub window: Duration,
    pub threshold: u64,
    pub leak_period: Duration,
    pub leak_threshold: u64,
    pub group: LeakGroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct GroupKey {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.src, self.dst) {
            (Some(s), Some(d)) => write!(f, "{s} to {d}"),
            (Some(s), None) => write!(f, "{s} to anywhere"),
            (None, Some(d)) => write!(f, "anyone to {d}"),
            (None, None) => f.write_str("everyone"),
        }
    }
}

/// A group's sum in the current window. Most groups never exceed a window: what only
/// exceeding ones need is boxed, so the others stay small (one per local-remote pair
/// under `--leak-group pair`).
#[derive(Debug)]
struct Group {
    key: GroupKey,
    exceeded: bool,
    /// Index of the current window (epoch seconds / window).
    window: u64,
    bytes: u64,
    history: Option<Box<History>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct History {
    /// Earlier exceeded windows: (index, bytes).
    past: VecDeque<(u64, u64)>,
    last_leak: Option<f64>,
}

impl Keyed for Group {
    type Key = GroupKey;

    fn key(&self) -> &GroupKey {
        &self.key
    }
}

impl Group {
    fn past(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.history.iter().flat_map(|h| h.past.iter())
    }

    fn last_leak(&self) -> Option<f64> {
        self.history.as_ref().and_then(|h| h.last_leak)
    }
}

/// A group as `--state-dir` keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct SavedGroup {
    window: u64,
    bytes: u64,
    exceeded: bool,
    past: VecDeque<(u64, u64)>,
    last_leak: Option<f64>,
}

/// Groups kept at most. Each group needs only a connection that sent something, so a host
/// that sends to many addresses would grow them for a whole window. When full, the half of
/// the groups that never exceeded a window with the least in this one goes: a leak is a
/// large sum, a flood many small ones.
pub const MAX_GROUPS: usize = 1 << 20;

pub struct Windows {
    cfg: Config,
    exclude: AddrMatcher,
    groups: DenseMap<Group>,
    /// [`MAX_GROUPS`]; tests make it small.
    max_groups: usize,
    /// Groups dropped to stay within `max_groups`.
    shed: u64,
    /// The window in which groups were last pruned: once per window is enough (a group
    /// kept longer changes no alert: sums and the leak period are checked on use), and
    /// it saves a pass over every group in every poll.
    pruned_in: Option<u64>,
    /// Changes to what `save` writes, counted.
    changes: u64,
}

impl Windows {
    pub fn new(cfg: Config, exclude: AddrMatcher) -> Self {
        Self {
            cfg,
            exclude,
            groups: DenseMap::default(),
            max_groups: MAX_GROUPS,
            shed: 0,
            pruned_in: None,
            changes: 0,
        }
    }

    fn window_secs(&self) -> f64 {
        self.cfg.window.as_secs_f64()
    }

    fn index(&self, epoch: f64) -> u64 {
        (epoch / self.window_secs()).floor() as u64
    }

    fn account(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        let Some(side) = conn.local_side() else {
            return;
        };
        let delta = conn.sent_since_last(side).ip_bytes;
        let (local, remote) = conn.ends(side);
        if delta == 0 || self.exclude.matches(conn.names(), local.addr, remote.addr) {
            return;
        }
        let key = match self.cfg.group {
            LeakGroup::Pair => GroupKey {
                src: Some(local.addr),
                dst: Some(remote.addr),
            },
            LeakGroup::Src => GroupKey {
                src: Some(local.addr),
                dst: None,
            },
            LeakGroup::Dst => GroupKey {
                src: None,
                dst: Some(remote.addr),
            },
        };
        let window = self.index(now.epoch);
        self.changes += 1;
        if self.groups.len() >= self.max_groups && self.groups.position(&key).is_none() {
            self.make_room();
        }
        let cfg = self.cfg;
        let window_secs = self.window_secs();
        let state = self.groups.get_or_insert_with(&key, || Group {
            key,
            exceeded: false,
            window,
            bytes: 0,
            history: None,
        });
        if state.window != window {
            if state.exceeded {
                let ended = (state.window, state.bytes);
                state.history.get_or_insert_default().past.push_back(ended);
            }
            state.window = window;
            state.bytes = 0;
            state.exceeded = false;
        }
        state.bytes += delta;
        let group = match cfg.group {
            LeakGroup::Pair => "pair",
            LeakGroup::Src => "src",
            LeakGroup::Dst => "dst",
        };
        let window_start = window as f64 * window_secs;
        if !state.exceeded && state.bytes > cfg.threshold {
            state.exceeded = true;
            let msg = format!(
                "{key} sent {} in the {} window from {}, over the {} threshold",
                human_bytes(state.bytes),
                humantime::format_duration(cfg.window),
                humantime::format_rfc3339_seconds(epoch_time(window_start)),
                human_bytes(cfg.threshold),
            );
            out.push(
                group_alert(now, Note::WindowExceeded, msg, key, local.addr, remote.addr)
                    .with("group", group)
                    .with("window", window_secs)
                    .with("window_start", window_start)
                    .with("threshold", cfg.threshold)
                    .with("bytes", state.bytes)
                    .keyed(format!("{key}@{window}")),
            );
        }
        if !state.exceeded {
            return;
        }
        let oldest = now.epoch - cfg.leak_period.as_secs_f64();
        let history = state.history.get_or_insert_default();
        while history
            .past
            .front()
            .is_some_and(|&(w, _)| (w as f64) * window_secs < oldest)
        {
            history.past.pop_front();
        }
        let total: u64 = state.bytes + history.past.iter().map(|&(_, b)| b).sum::<u64>();
        let quiet = history
            .last_leak
            .is_none_or(|t| now.epoch - t >= cfg.leak_period.as_secs_f64());
        if total > cfg.leak_threshold && quiet {
            history.last_leak = Some(now.epoch);
            let windows = history.past.len() + 1;
            let msg = format!(
                "{key} sent {} in {windows} windows over the {} threshold within {}: more than {}",
                human_bytes(total),
                human_bytes(cfg.threshold),
                humantime::format_duration(cfg.leak_period),
                human_bytes(cfg.leak_threshold),
            );
            out.push(
                group_alert(now, Note::DataLeak, msg, key, local.addr, remote.addr)
                    .with("group", group)
                    .with("period", cfg.leak_period.as_secs_f64())
                    .with("threshold", cfg.leak_threshold)
                    .with("bytes", total)
                    .with("windows", windows)
                    .keyed(key.to_string()),
            );
        }
    }
}

fn epoch_time(secs: f64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0))
}

/// An alert about a group: `src` and `dst` are the group's where it has them, else those
/// of the connection that crossed the threshold.
fn group_alert(
    now: Now,
    note: Note,
    msg: String,
    key: GroupKey,
    local: IpAddr,
    remote: IpAddr,
) -> Alert {
    Alert {
        ts: now.epoch,
        note,
        msg,
        src: key.src.unwrap_or(local),
        dst: Some(key.dst.unwrap_or(remote)),
        first_seen: None,
        conn: None,
        figures: Default::default(),
        key: String::new(),
        quiet: None,
        conn_log: None,
    }
}

impl Windows {
    fn make_room(&mut self) {
        let quiet = |g: &Group| !g.exceeded && g.history.is_none();
        let Some(cut) = crate::shed::cut(self.groups.iter().filter(|g| quiet(g)).map(|g| g.bytes))
        else {
            return;
        };
        let before = self.groups.len();
        self.groups.retain(|g| !quiet(g) || g.bytes > cut);
        self.shed += (before - self.groups.len()) as u64;
    }
}

impl Rule for Windows {
    fn set_lists(&mut self, lists: &Lists) {
        self.exclude = AddrMatcher::new(lists.exclude_dst.clone());
    }

    fn shed(&self) -> u64 {
        self.shed
    }

    fn on_update(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        self.account(conn, now, out);
    }

    fn on_finish(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        self.account(conn, now, out);
    }

    fn save(&self, state: &mut Saved) {
        let mut groups: Vec<(GroupKey, SavedGroup)> = self
            .groups
            .iter()
            .map(|g| {
                let saved = SavedGroup {
                    window: g.window,
                    bytes: g.bytes,
                    exceeded: g.exceeded,
                    past: g.past().copied().collect(),
                    last_leak: g.last_leak(),
                };
                (g.key, saved)
            })
            .collect();
        groups.sort_unstable_by_key(|(key, _)| *key);
        save_as(state, "Windows.groups", groups);
    }

    /// The sums only: what each connection already counted is the table's to keep.
    fn changes(&self) -> u64 {
        self.changes
    }

    fn restore(&mut self, state: &Saved, _conns_resumed: bool) {
        if let Some(groups) = saved::<Vec<(GroupKey, SavedGroup)>>(state, "Windows.groups") {
            self.groups = groups
                .into_iter()
                .map(|(key, g)| {
                    let history = History {
                        past: g.past,
                        last_leak: g.last_leak,
                    };
                    Group {
                        key,
                        exceeded: g.exceeded,
                        window: g.window,
                        bytes: g.bytes,
                        history: (history != History::default()).then(|| Box::new(history)),
                    }
                })
                .collect();
        }
    }

    /// Sums of windows to come, an exceeded window at or after the group's current one,
    /// or a DataLeak raised later than now would add bytes or silence alerts.
    fn check_saved(&self, state: &Saved, now: Now) -> Result<(), String> {
        let groups = decode::<Vec<(GroupKey, SavedGroup)>>(state, "Windows.groups")?;
        let current = self.index(now.epoch);
        for (key, g) in groups.iter().flatten() {
            let why = if g.window > current {
                "a window in the future"
            } else if !g.past.iter().all(|&(w, _)| w < g.window)
                || !g
                    .past
                    .iter()
                    .zip(g.past.iter().skip(1))
                    .all(|(a, b)| a.0 < b.0)
            {
                "exceeded windows out of order"
            } else if g.last_leak.is_some_and(|t| !(0.0..=now.epoch).contains(&t)) {
                "a DataLeak in the future"
            } else {
                continue;
            };
            return Err(format!("Windows: {key}: {why}"));
        }
        Ok(())
    }

    fn on_tick(&mut self, now: Now) {
        let current = self.index(now.epoch);
        if self.pruned_in == Some(current) {
            return;
        }
        self.pruned_in = Some(current);
        let oldest = now.epoch - self.cfg.leak_period.as_secs_f64();
        let window_secs = self.window_secs();
        let before = self.groups.len();
        self.groups.retain(|s| {
            let recent_leak = s.last_leak().is_some_and(|t| t >= oldest);
            let recent_past = s
                .past()
                .last()
                .is_some_and(|&(w, _)| w as f64 * window_secs >= oldest);
            s.window == current
                || recent_leak
                || recent_past
                || (s.exceeded && s.window as f64 * window_secs >= oldest)
        });
        if self.groups.len() != before {
            self.changes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testkit::*;

    const MB: u64 = 1_000_000;

    fn rule(group: LeakGroup) -> Windows {
        Windows::new(
            Config {
                window: Duration::from_secs(300),
                threshold: 5 * MB,
                leak_period: Duration::from_secs(86400),
                leak_threshold: 100 * MB,
                group,
            },
            AddrMatcher::new(vec!["192.0.2.0/24".parse().unwrap()]),
        )
    }

    thread_local! {
        /// What each test connection had sent at its previous observation, as the
        /// connection table would remember it.
        static OBSERVED: std::cell::RefCell<std::collections::HashMap<&'static str, u64>> = Default::default();
    }

    /// A connection whose local side has sent `ip_bytes` in all (payload chosen so), with
    /// its previous observation as the table keeps it.
    fn sent(uid: &'static str, resp: &'static str, ip_bytes: u64) -> crate::conntable::Conn {
        let mut conn = ConnSpec {
            resp: (resp, 443),
            uid,
            ..ConnSpec::default()
        }
        .conn();
        conn.edit(|s| {
            s.dir[0].ip_bytes = ip_bytes;
            s.dir[0].pkts = 1;
        });
        let before = OBSERVED.with(|seen| seen.borrow_mut().insert(uid, ip_bytes));
        conn.prev[0].ip_bytes = before.unwrap_or(0);
        conn
    }

    fn notes(alerts: &[Alert]) -> Vec<Note> {
        alerts.iter().map(|a| a.note).collect()
    }

    #[test]
    fn window_threshold_edges_and_deltas_across_polls() {
        let mut r = rule(LeakGroup::Pair);
        // 00:00:10 into an aligned window: 3 MB, then 5 MB in all (at, not over), then one
        // byte more.
        assert!(update(&mut r, &sent("C1", "203.0.113.2", 3 * MB), at(10.0)).is_empty());
        assert!(update(&mut r, &sent("C1", "203.0.113.2", 5 * MB), at(20.0)).is_empty());
        let a = update(&mut r, &sent("C1", "203.0.113.2", 5 * MB + 1), at(30.0));
        assert_eq!(notes(&a), [Note::WindowExceeded]);
        assert_eq!(a[0].figures["bytes"], 5 * MB + 1);
        assert_eq!(a[0].figures["window_start"], EPOCH_AT_ZERO);
        assert!(
            update(&mut r, &sent("C1", "203.0.113.2", 9 * MB), at(40.0)).is_empty(),
            "once per window"
        );
        // The next window starts from zero: 4 MB more is not enough.
        assert!(update(&mut r, &sent("C1", "203.0.113.2", 13 * MB), at(300.0)).is_empty());
    }

    #[test]
    fn a_flood_of_small_groups_sheds_them_and_keeps_the_leak() {
        let mut r = rule(LeakGroup::Pair);
        r.max_groups = 4;
        let a = update(&mut r, &sent("C1", "203.0.113.2", 6 * MB), at(10.0));
        assert_eq!(notes(&a), [Note::WindowExceeded]);
        for n in 0..20 {
            let uid: &'static str = Box::leak(format!("CF{n}").into_boxed_str());
            let resp: &'static str = Box::leak(format!("198.51.100.{n}").into_boxed_str());
            assert!(update(&mut r, &sent(uid, resp, 1000 + n), at(20.0)).is_empty());
        }
        assert!(r.groups.len() <= 5, "{} groups", r.groups.len());
        assert!(r.shed() >= 10, "shed {}", r.shed());
        let leak = r
            .groups
            .iter()
            .find(|g| g.exceeded)
            .expect("the leak's group stays");
        assert_eq!(leak.bytes, 6 * MB);
    }

    /// The table keeps each connection's baseline (see `OBSERVED`); the rule, the sums.
    #[test]
    fn a_restart_keeps_window_sums() {
        let mut before = rule(LeakGroup::Pair);
        assert!(update(&mut before, &sent("C1", "203.0.113.2", 4 * MB), at(10.0)).is_empty());
        let mut saved = Saved::new();
        before.save(&mut saved);

        // The same connection, resumed with its baseline: only its 1 MB since the last
        // poll counts, on top of the window's 4 MB, so one byte more crosses 5 MB.
        let mut after = rule(LeakGroup::Pair);
        after.restore(&saved, true);
        assert!(update(&mut after, &sent("C1", "203.0.113.2", 5 * MB), at(20.0)).is_empty());
        let a = update(&mut after, &sent("C1", "203.0.113.2", 5 * MB + 1), at(30.0));
        assert_eq!(notes(&a), [Note::WindowExceeded]);
        assert_eq!(a[0].figures["bytes"], 5 * MB + 1);

        // A new connection: the window's sum stays.
        let mut fresh = rule(LeakGroup::Pair);
        fresh.restore(&saved, false);
        let a = update(&mut fresh, &sent("C2", "203.0.113.2", MB + 1), at(20.0));
        assert_eq!(notes(&a), [Note::WindowExceeded]);
    }

    #[test]
    fn groups_sum_connections_and_exclusions_count_nothing() {
        let mut r = rule(LeakGroup::Src);
        assert!(update(&mut r, &sent("C1", "203.0.113.2", 3 * MB), at(1.0)).is_empty());
        assert!(update(&mut r, &sent("C2", "198.51.100.7", 2 * MB), at(2.0)).is_empty());
        assert!(
            update(&mut r, &sent("C3", "192.0.2.7", 50 * MB), at(3.0)).is_empty(),
            "excluded"
        );
        // A connection that finishes between polls still counts, at finish.
        let a = finish(&mut r, &sent("C4", "198.51.100.8", MB), at(4.0));
        assert_eq!(notes(&a), [Note::WindowExceeded]);
        assert_eq!(a[0].figures["group"], "src");
        assert!(a[0].msg.contains("198.18.1.2 to anywhere"), "{}", a[0].msg);
    }

    /// Groups that only sent below the threshold are dropped once their window is over,
    /// by the first tick of a later window; one that exceeded stays for the leak period,
    /// and is dropped at a window's first tick after that.
    #[test]
    fn groups_are_pruned_once_per_window() {
        let mut r = rule(LeakGroup::Pair);
        update(&mut r, &sent("CP1", "203.0.113.2", MB), at(10.0));
        update(&mut r, &sent("CP2", "203.0.113.3", MB), at(10.0));
        update(&mut r, &sent("CP3", "203.0.113.4", 6 * MB), at(10.0));
        r.on_tick(at(20.0));
        assert_eq!(r.groups.len(), 3, "their window is not over");
        r.on_tick(at(301.0));
        assert_eq!(r.groups.len(), 1, "only the one that exceeded");
        r.on_tick(at(86_400.0));
        assert_eq!(r.groups.len(), 1, "its leak period is not over");
        r.on_tick(at(86_500.0));
        assert_eq!(r.groups.len(), 1, "the same window: not pruned again");
        r.on_tick(at(86_701.0));
        assert!(r.groups.is_empty(), "its leak period is over");
    }

    #[test]
    fn data_leak_over_a_simulated_day_at_most_once_per_period() {
        let mut r = rule(LeakGroup::Pair);
        let mut total = 0;
        let mut leaks = Vec::new();
        let mut exceeded = 0;
        // 6 MB every 5-minute window for 2 days, polled each minute.
        for minute in 0..(2 * 24 * 60) {
            if minute % 5 == 0 {
                total += 6 * MB;
            }
            let now = at(minute as f64 * 60.0 + 1.0);
            for a in update(&mut r, &sent("C1", "203.0.113.2", total), now) {
                match a.note {
                    Note::WindowExceeded => exceeded += 1,
                    Note::DataLeak => leaks.push((minute, a.figures["bytes"].as_u64().unwrap())),
                    other => panic!("unexpected {other:?}"),
                }
            }
            r.on_tick(now);
        }
        assert_eq!(exceeded, 2 * 24 * 12, "every window exceeded");
        // 17 windows of 6 MB = 102 MB > 100 MB: the 17th window (minute 80), then once a
        // day later at the earliest.
        assert_eq!(leaks, vec![(80, 102 * MB), (80 + 24 * 60, 6 * MB * 288)]);
    }
}
