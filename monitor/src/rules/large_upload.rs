//! LargeUpload: one connection carries more than the threshold from a local host to a
//! non-local one. Alerted at the first poll after the crossing, while the connection is
//! still open; once per connection.

use std::collections::{BTreeSet, HashSet};

use super::{ConnCtx, Now, Rule, Saved, decode, human_bytes, save_as, saved};
use crate::{
    alerts::{Alert, Note},
    conntable::{LocalSide, Uid},
};

pub struct LargeUpload {
    threshold: u64,
    min_pkts: u64,
    /// Open connections already alerted.
    alerted: HashSet<Uid>,
    /// Changes to what `save` writes, counted.
    changes: u64,
}

impl LargeUpload {
    pub fn new(threshold: u64, min_pkts: u64) -> Self {
        Self {
            threshold,
            min_pkts,
            alerted: HashSet::new(),
            changes: 0,
        }
    }

    fn check(&mut self, conn: &ConnCtx, now: Now, finished: bool, out: &mut Vec<Alert>) {
        let Some(side) = conn.local_side() else {
            return;
        };
        let sent = conn.sent(side);
        if sent.bytes <= self.threshold
            || sent.pkts < self.min_pkts
            || self.alerted.contains(&conn.uid())
        {
            return;
        }
        self.alerted.insert(conn.uid());
        self.changes += 1;
        let open = !finished && !conn.conn.closed();
        let (local, remote) = conn.ends(side);
        let role = if side == LocalSide::Orig {
            "which it opened"
        } else {
            "which the remote host opened"
        };
        let state = if open { "still open" } else { "now closed" };
        let msg = format!(
            "{} sent {} to {} {} in one connection {role}, over the {} threshold ({state}, since {:.0} s)",
            local.addr,
            human_bytes(sent.bytes),
            remote.addr,
            conn.service(),
            human_bytes(self.threshold),
            conn.age(now.mono_ns).as_secs_f64(),
        );
        out.push(
            conn.alert(now, Note::LargeUpload, msg, local.addr, remote.addr)
                .with("threshold", self.threshold)
                .with("bytes", sent.bytes)
                .with("pkts", sent.pkts)
                .with("local_side", side.as_str())
                .with("open", open),
        );
    }
}

impl Rule for LargeUpload {
    fn on_update(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        self.check(conn, now, false, out);
    }

    /// A connection may cross and finish between two polls: check its final totals too.
    fn on_finish(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        self.check(conn, now, true, out);
        if self.alerted.remove(&conn.uid()) {
            self.changes += 1;
        }
    }

    fn save(&self, state: &mut Saved) {
        save_as(
            state,
            "LargeUpload",
            self.alerted.iter().collect::<BTreeSet<_>>(),
        );
    }

    fn changes(&self) -> u64 {
        self.changes
    }

    fn restore(&mut self, state: &Saved, conns_resumed: bool) {
        if conns_resumed && let Some(alerted) = saved(state, "LargeUpload") {
            self.alerted = alerted;
        }
    }

    fn check_saved(&self, state: &Saved, _now: Now) -> Result<(), String> {
        decode::<BTreeSet<Uid>>(state, "LargeUpload").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testkit::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn fires_once_while_open_one_byte_over() {
        let mut rule = LargeUpload::new(100 * MB, 10);
        let mut spec = ConnSpec {
            orig_bytes: 100 * MB,
            last: 5.0,
            ..ConnSpec::default()
        };
        assert!(
            update(&mut rule, &spec.conn(), at(5.0)).is_empty(),
            "exactly at the threshold"
        );
        spec.orig_bytes += 1;
        let alerts = update(&mut rule, &spec.conn(), at(6.0));
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(a.note, Note::LargeUpload);
        assert_eq!(a.src.to_string(), "198.18.1.2");
        assert_eq!(a.dst.unwrap().to_string(), "203.0.113.2");
        assert_eq!(a.figures["bytes"], 100 * MB + 1);
        assert_eq!(a.figures["local_side"], "orig");
        assert_eq!(a.figures["open"], true);
        assert!(a.msg.contains("still open"), "{}", a.msg);
        spec.orig_bytes += 50 * MB;
        assert!(
            update(&mut rule, &spec.conn(), at(7.0)).is_empty(),
            "once per connection"
        );
        assert!(finish(&mut rule, &spec.conn(), at(8.0)).is_empty());
    }

    #[test]
    fn a_restart_with_the_connection_resumed_does_not_repeat() {
        let spec = ConnSpec {
            orig_bytes: 2 * MB,
            ..ConnSpec::default()
        };
        let mut before = LargeUpload::new(MB, 1);
        assert_eq!(update(&mut before, &spec.conn(), at(1.0)).len(), 1);
        let mut saved = Saved::new();
        before.save(&mut saved);

        let mut resumed = LargeUpload::new(MB, 1);
        resumed.restore(&saved, true);
        assert!(update(&mut resumed, &spec.conn(), at(2.0)).is_empty());

        // The map was not kept: the connections it held are gone, and so is the state.
        let mut fresh = LargeUpload::new(MB, 1);
        fresh.restore(&saved, false);
        assert_eq!(update(&mut fresh, &spec.conn(), at(2.0)).len(), 1);
    }

    #[test]
    fn counts_the_local_side_whoever_opened() {
        let mut rule = LargeUpload::new(MB, 1);
        // A remote host opened the connection and the local server sends it data.
        let spec = ConnSpec {
            orig: ("203.0.113.9", 50000),
            resp: ("198.18.1.2", 22),
            resp_bytes: 2 * MB,
            ..ConnSpec::default()
        };
        let alerts = update(&mut rule, &spec.conn(), at(1.0));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].src.to_string(), "198.18.1.2");
        assert_eq!(alerts[0].figures["local_side"], "resp");
    }

    #[test]
    fn needs_min_packets_and_a_boundary() {
        // The test connections carry 1000 bytes per packet: 200 KB is 200 packets.
        let mut rule = LargeUpload::new(100_000, 1000);
        let few = ConnSpec {
            orig_bytes: 200_000,
            ..ConnSpec::default()
        };
        assert!(
            update(&mut rule, &few.conn(), at(1.0)).is_empty(),
            "too few packets"
        );
        let internal = ConnSpec {
            resp: ("198.18.9.9", 443),
            orig_bytes: 20 * MB,
            ..ConnSpec::default()
        };
        let mut rule = LargeUpload::new(MB, 1);
        assert!(
            update(&mut rule, &internal.conn(), at(1.0)).is_empty(),
            "local to local"
        );
    }

    #[test]
    fn crossing_between_polls_is_caught_at_finish() {
        let mut rule = LargeUpload::new(MB, 1);
        let mut spec = ConnSpec {
            orig_bytes: MB / 2,
            ..ConnSpec::default()
        };
        assert!(update(&mut rule, &spec.conn(), at(1.0)).is_empty());
        spec.orig_bytes = 3 * MB;
        let alerts = finish(&mut rule, &spec.conn(), at(2.0));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].figures["open"], false);
    }
}
