//! LongConnection: each time an active connection's age (now - first packet, so idle
//! connections age too) crosses the next of the durations, alert; after the last,
//! every last duration. The pipeline writes a `--conn-long-log` record for each.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use ipnet::IpNet;

use super::{ConnCtx, Lists, Now, Rule, Saved, allowlist::NetSet, decode, save_as, saved};
use crate::{
    alerts::{Alert, ConnLog, Note},
    conntable::Uid,
};

pub struct LongConnection {
    durations: Vec<Duration>,
    ignore: NetSet,
    /// Crossings reported so far per open connection.
    crossed: HashMap<Uid, usize>,
    /// Changes to what `save` writes, counted.
    changes: u64,
}

impl LongConnection {
    pub fn new(durations: Vec<Duration>, ignore: &[IpNet]) -> Self {
        assert!(
            !durations.is_empty(),
            "the flag parser refuses an empty list"
        );
        Self {
            durations,
            ignore: ignore.iter().copied().collect(),
            crossed: HashMap::new(),
            changes: 0,
        }
    }

    /// The `n`th threshold (from 0): the listed durations, then multiples of the last.
    fn threshold(&self, n: usize) -> Duration {
        let last = *self.durations.last().expect("non-empty");
        match self.durations.get(n) {
            Some(d) => *d,
            None => last * (n - self.durations.len() + 2) as u32,
        }
    }

    /// Closed by FIN or RST, it only waits out the close delay: not active any more.
    fn passes_over(&self, conn: &ConnCtx) -> bool {
        conn.conn.closed()
            || self.ignore.contains(conn.orig.addr)
            || self.ignore.contains(conn.resp.addr)
    }
}

impl Rule for LongConnection {
    fn set_lists(&mut self, lists: &Lists) {
        self.ignore = lists.long_ignore.iter().copied().collect();
    }

    /// Its age crosses the next threshold whether packets come or not.
    fn next_due(&self, conn: &ConnCtx) -> Option<u64> {
        if self.passes_over(conn) {
            return None;
        }
        let done = self.crossed.get(&conn.uid()).copied().unwrap_or(0);
        let threshold = self.threshold(done).as_nanos() as u64;
        Some(conn.conn.first_ns().saturating_add(threshold))
    }

    fn on_update(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        if self.passes_over(conn) {
            return;
        }
        let age = conn.age(now.mono_ns);
        let done = self.crossed.get(&conn.uid()).copied().unwrap_or(0);
        let mut next = done;
        while age >= self.threshold(next) {
            next += 1;
        }
        if next == done {
            return;
        }
        // Several crossings at once (the agent started late): one alert, the largest.
        self.crossed.insert(conn.uid(), next);
        self.changes += 1;
        let threshold = self.threshold(next - 1);
        let msg = format!(
            "connection from {} to {} {} has been open {} (over {})",
            conn.orig.addr,
            conn.resp.addr,
            conn.service(),
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            humantime::format_duration(threshold),
        );
        let mut alert = conn
            .alert(
                now,
                Note::LongConnection,
                msg,
                conn.orig.addr,
                conn.resp.addr,
            )
            .with("threshold", threshold.as_secs_f64())
            .with("age", age.as_secs_f64())
            .logged_to(ConnLog::Long);
        // The age, not the span of packets: an idle connection is still open.
        if let Some(fields) = &mut alert.conn {
            fields.duration = age.as_secs_f64();
        }
        alert.key = format!("{}:{}", conn.uid(), threshold.as_secs());
        out.push(alert);
    }

    fn on_finish(&mut self, conn: &ConnCtx, _now: Now, _out: &mut Vec<Alert>) {
        if self.crossed.remove(&conn.uid()).is_some() {
            self.changes += 1;
        }
    }

    fn save(&self, state: &mut Saved) {
        save_as(
            state,
            "LongConnection",
            self.crossed.iter().collect::<BTreeMap<_, _>>(),
        );
    }

    fn changes(&self) -> u64 {
        self.changes
    }

    fn restore(&mut self, state: &Saved, conns_resumed: bool) {
        if conns_resumed && let Some(crossed) = saved(state, "LongConnection") {
            self.crossed = crossed;
        }
    }

    /// No connection is older than the kernel clock (its first packet came after boot):
    /// a crossing beyond that would silence the rule.
    fn check_saved(&self, state: &Saved, now: Now) -> Result<(), String> {
        let crossed = decode::<BTreeMap<Uid, usize>>(state, "LongConnection")?;
        let uptime = Duration::from_nanos(now.mono_ns);
        match crossed
            .into_iter()
            .flatten()
            .find(|&(_, n)| n > 0 && self.threshold(n - 1) > uptime)
        {
            Some((uid, n)) => Err(format!(
                "LongConnection: connection {uid} crossed {}, longer than this boot",
                humantime::format_duration(self.threshold(n - 1))
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testkit::*;

    fn default_rule() -> LongConnection {
        let list = crate::cli::parse_durations("10m,30m,1h,12h,24h,3d").unwrap();
        LongConnection::new(list, &[])
    }

    #[test]
    fn crosses_each_duration_then_repeats_the_last() {
        let mut rule = default_rule();
        // Idle after its first second: age still grows.
        let spec = ConnSpec {
            start: 0.0,
            last: 1.0,
            ..ConnSpec::default()
        };
        let conn = spec.conn();
        let mut seen = Vec::new();
        // Poll every 10 s for 10 days of simulated time.
        let mut t = 0.0;
        while t <= 10.0 * 86400.0 {
            for a in update(&mut rule, &conn, at(t)) {
                seen.push((t, a.figures["threshold"].as_f64().unwrap()));
            }
            t += 10.0;
        }
        let hours = |h: f64| h * 3600.0;
        let expected: Vec<(f64, f64)> = [0.1667, 0.5, 1.0, 12.0, 24.0, 72.0, 144.0, 216.0]
            .iter()
            .map(|&h| {
                let secs = (hours(h) / 60.0).round() * 60.0;
                (secs, secs)
            })
            .collect();
        assert_eq!(seen, expected);
    }

    /// Polls that pass over an unchanged connection until the time the rule names miss
    /// no crossing: each is due exactly when its alert comes, and not before.
    #[test]
    fn an_unchanged_connection_is_due_at_each_crossing() {
        let mut rule = default_rule();
        let conn = ConnSpec {
            start: 5.0,
            last: 6.0,
            ..ConnSpec::default()
        }
        .conn();
        let (clock, local) = (clock(), local());
        let due = |rule: &LongConnection| {
            rule.next_due(&ConnCtx::new(local.view(&conn), no_names(), &clock))
                .expect("an open connection ages")
        };
        let mut crossings = Vec::new();
        for _ in 0..8 {
            let at_ns = due(&rule);
            let just_before = Now {
                mono_ns: at_ns - 1,
                epoch: 0.0,
            };
            assert!(update(&mut rule, &conn, just_before).is_empty());
            let alerts = update(&mut rule, &conn, at(at_ns as f64 / 1e9));
            assert_eq!(alerts.len(), 1, "at {at_ns}");
            assert_eq!(alerts[0].conn_log, Some(ConnLog::Long));
            crossings.push(alerts[0].figures["threshold"].as_f64().unwrap());
        }
        let hours = [1.0 / 6.0, 0.5, 1.0, 12.0, 24.0, 72.0, 144.0, 216.0];
        let want: Vec<f64> = hours.iter().map(|h| (h * 3600.0_f64).round()).collect();
        assert_eq!(crossings, want);
        let mut closed = ConnSpec::default().conn();
        closed.edit(|snap| snap.dir[0].tcp_flags |= monitor_common::flow::tcp_flags::RST);
        let ctx = ConnCtx::new(local.view(&closed), no_names(), &clock);
        assert_eq!(
            rule.next_due(&ctx),
            None,
            "a closed connection no longer ages"
        );
    }

    #[test]
    fn exactly_at_a_duration_and_late_start() {
        let mut rule = default_rule();
        let conn = ConnSpec::default().conn();
        assert!(update(&mut rule, &conn, at(599.999)).is_empty());
        let at_ten = update(&mut rule, &conn, at(600.0));
        assert_eq!(at_ten.len(), 1);
        assert_eq!(at_ten[0].figures["threshold"], 600.0);
        assert_eq!(at_ten[0].conn.as_ref().unwrap().duration, 600.0);
        // Seen first at 2 h: one alert for 1 h, not three.
        let mut rule = default_rule();
        let late = update(&mut rule, &conn, at(7200.0));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].figures["threshold"], 3600.0);
    }

    #[test]
    fn closed_connections_are_not_long() {
        let mut rule = default_rule();
        let mut conn = ConnSpec::default().conn();
        conn.edit(|s| {
            s.dir[0].tcp_flags |= monitor_common::flow::tcp_flags::FIN;
            s.dir[1].tcp_flags |= monitor_common::flow::tcp_flags::FIN;
        });
        assert!(update(&mut rule, &conn, at(3600.0)).is_empty());
    }

    #[test]
    fn ignored_nets_and_finished_connections() {
        let mut rule = LongConnection::new(
            vec![Duration::from_secs(60)],
            &["203.0.113.0/24".parse().unwrap()],
        );
        let conn = ConnSpec::default().conn();
        assert!(
            update(&mut rule, &conn, at(120.0)).is_empty(),
            "remote in an ignored net"
        );
        let mut rule = LongConnection::new(vec![Duration::from_secs(60)], &[]);
        assert_eq!(update(&mut rule, &conn, at(61.0)).len(), 1);
        finish(&mut rule, &conn, at(62.0));
        assert!(rule.crossed.is_empty());
    }
}
