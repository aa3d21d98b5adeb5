//! Connections assembled from snapshots: orientation, local/remote, Zeek state, and when
//! a connection is finished.

mod conn;
mod uid;
mod view;

use std::{cmp::Reverse, collections::BinaryHeap, time::Duration};

use foldhash::{HashMap, HashMapExt as _};
use monitor_common::flow::FlowKey;

pub use conn::{Conn, Endpoint, Totals, flow_key, key_endpoints};
pub use uid::{Uid, Uids};
pub use view::{LocalNets, LocalSide, View};

use crate::{dense::DenseMap, poller::FlowSnapshot};

/// After FIN both ways or a RST, a connection is finished once quiet this long (Zeek's
/// `tcp_close_delay`): the last ACK or a repeated RST then joins its record instead of
/// opening a new one.
pub const CLOSE_DELAY: Duration = Duration::from_secs(5);

/// Under map pressure, connections quiet for at least this long may be finished before
/// their idle timeout (see [`ConnTable::pressure_relief`]).
pub const PRESSURE_MIN_IDLE: Duration = Duration::from_secs(2);

/// Why a connection's record was written: the numbers are IPFIX's flowEndReason (IANA
/// registry), which export sends as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndReason {
    Idle = 1,
    /// Not an end: an open connection's periodic export.
    ActiveTimeout = 2,
    EndOfFlow = 3,
    ForcedEnd = 4,
    LackOfResources = 5,
}

/// Whether a map entry has a first and a last packet time: the programs insert an entry,
/// then count, then set its first time; a read in between gets one that is not a
/// connection yet (a uid from a first time of 0, idle since boot) and waits for a later
/// read. A connection already in the table takes every later read of its entry: the
/// directions it has timed keep their times.
fn timed(snap: &FlowSnapshot) -> bool {
    snap.dir.iter().any(|d| d.first_ns != 0 && d.last_ns != 0)
}

/// Whole seconds of kernel time `ns`, rounded down.
fn secs(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Open connections by key.
#[derive(Debug)]
pub struct ConnTable {
    conns: DenseMap<Conn>,
    idle_timeout: Duration,
    uids: Uids,
    /// Connections ever added.
    added: u64,
    /// Totals an earlier agent had already accounted for connections it left in the
    /// pinned map, by uid: they become those connections' `prev` when first seen.
    resumed: HashMap<Uid, [Totals; 2]>,
    /// Positions in `conns` of the connections the last read handed over, in its order.
    /// The kernel's hash map hands its entries over in the same order every time (bucket
    /// by bucket), so the next read's entries are found by stepping along this with one
    /// comparison each, instead of a hash lookup: at a million connections the lookups'
    /// cache misses were a quarter of the agent's poll.
    read_order: Vec<u32>,
    /// The connections whose `prev` the last read left behind their totals: their
    /// deltas are what that read found new, and the next read settles them first.
    unsettled: Unsettled,
    /// When to look again at connections that carry nothing new, soonest first: every
    /// connection has one no later than the first poll at which it is finished, or a rule
    /// or an exporter acts on it unchanged (see [`Self::due`]). 8 bytes each, one per
    /// connection: whole seconds of kernel time, rounded down (a connection looked at
    /// early is scheduled again), and a position in the table. A connection that moves
    /// (into the place of one removed) is due at once at its new position; whatever
    /// connection holds a position when it is due is looked at.
    wakeups: BinaryHeap<Reverse<(u32, u32)>>,
    /// Whether `wakeups` is to be made afresh: a read of the whole map schedules nothing.
    wakeups_stale: bool,
    /// Whether a connection left the table since the last read of what changed began: the
    /// positions it noted may have moved.
    moved_since_read: bool,
    /// Changes to what [`Self::accounted`] gives, counted: connections added, removed or
    /// with new totals.
    changes: u64,
    /// From the first [`Self::accounted_marked`]: the connections so changed since the
    /// last, with their keys.
    touched: Option<HashMap<Uid, FlowKey>>,
}

#[derive(Debug)]
enum Unsettled {
    /// After a read of the whole map: any connection.
    All,
    /// After a read of what changed: the connections it observed.
    Keys(Vec<Observed>),
}

/// A connection a read of what changed observed.
#[derive(Clone, Copy, Debug)]
struct Observed {
    key: FlowKey,
    /// Its position then.
    position: u32,
    /// Whether the read made it new, closed or older (an earlier first packet): the
    /// wake-up it had may be too late.
    reschedule: bool,
}

/// How many positions of the last read's order an entry is looked for at, before a hash
/// lookup: entries removed since that read are skipped this way.
const READ_ORDER_LOOKAHEAD: usize = 4;

impl ConnTable {
    pub fn new(idle_timeout: Duration, uids: Uids) -> Self {
        Self {
            conns: DenseMap::default(),
            idle_timeout,
            uids,
            added: 0,
            resumed: HashMap::new(),
            read_order: Vec::new(),
            unsettled: Unsettled::Keys(Vec::new()),
            wakeups: BinaryHeap::new(),
            wakeups_stale: true,
            moved_since_read: false,
            changes: 0,
            touched: None,
        }
    }

    /// Connections ever added to the table.
    pub fn added(&self) -> u64 {
        self.added
    }

    /// The totals to start from for connections an earlier agent already accounted for.
    pub fn resume(&mut self, accounted: impl IntoIterator<Item = (Uid, [Totals; 2])>) {
        self.resumed = accounted.into_iter().collect();
    }

    /// How many times what [`Self::accounted`] gives has changed, counting up from any
    /// start.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// A connection added, removed or with new totals.
    fn changed(&mut self, uid: Uid, key: FlowKey) {
        self.changes += 1;
        if let Some(touched) = &mut self.touched {
            touched.insert(uid, key);
        }
    }

    /// What [`Self::accounted`] gives now is what [`Self::accounted_changes`] counts
    /// from.
    pub fn accounted_marked(&mut self) {
        self.touched.get_or_insert_default().clear();
    }

    /// How many connections [`Self::accounted_changes`] would name.
    pub fn accounted_changes_len(&self) -> usize {
        self.touched.as_ref().map_or(0, HashMap::len)
    }

    /// Since [`Self::accounted_marked`]: the connections with new totals (or new), with
    /// their totals as [`Self::accounted`] gives them, and those gone; by uid.
    pub fn accounted_changes(&self) -> (Vec<(Uid, [Totals; 2])>, Vec<Uid>) {
        let (mut open, mut gone) = (Vec::new(), Vec::new());
        for (uid, key) in self.touched.iter().flatten() {
            match self.conns.get(key).filter(|conn| conn.uid == *uid) {
                Some(conn) => open.push((*uid, conn.totals())),
                None => gone.push(*uid),
            }
        }
        open.sort_unstable_by_key(|(uid, _)| *uid);
        gone.sort_unstable();
        (open, gone)
    }

    /// Each connection's totals as of the latest observation, for `--state-dir`.
    pub fn accounted(&self) -> Vec<(Uid, [Totals; 2])> {
        let mut all: Vec<(Uid, [Totals; 2])> =
            self.conns.iter().map(|c| (c.uid, c.totals())).collect();
        all.sort_unstable_by_key(|(uid, _)| *uid);
        all
    }

    /// One poll's reading of the whole map: `read` hands every entry to the callback it is
    /// given. Every connection is observed once: one it did not hand over carried nothing
    /// new.
    pub fn observe_map<E>(
        &mut self,
        read: impl FnOnce(&mut dyn FnMut(FlowSnapshot)) -> Result<(), E>,
    ) -> Result<(), E> {
        let last = std::mem::take(&mut self.read_order);
        let mut order = Vec::with_capacity(last.len());
        let mut cursor = 0;
        let read = read(&mut |snap| {
            let ahead = last.get(cursor..).unwrap_or_default();
            let hint = ahead
                .iter()
                .take(READ_ORDER_LOOKAHEAD)
                .position(|&p| self.conns.at(p as usize).is_some_and(|c| c.key == snap.key));
            let position = match hint {
                Some(skipped) => {
                    cursor += skipped + 1;
                    let position = last[cursor - 1] as usize;
                    self.update_at(position, snap);
                    Some(position)
                }
                None => self.observe_at(self.conns.position(&snap.key), snap),
            };
            order.extend(position.map(|p| p as u32));
        });
        // Those not handed over (their entries gone: rare, every open connection keeps
        // its entry until finished) carried nothing new. Positions did not move during
        // the read: it only updates and appends.
        let mut observed = vec![0u64; self.conns.len().div_ceil(64)];
        for &p in &order {
            observed[p as usize / 64] |= 1 << (p % 64);
        }
        for (i, word) in observed.iter().enumerate().filter(|(_, w)| **w != u64::MAX) {
            for bit in (0..64).filter(|bit| word & (1 << bit) == 0) {
                if let Some(conn) = self.conns.at_mut(i * 64 + bit) {
                    conn.settle();
                }
            }
        }
        self.read_order = order;
        self.unsettled = Unsettled::All;
        self.wakeups_stale = true;
        self.resumed.clear();
        read
    }

    /// One poll's reading of the map entries that changed since the read before: `read`
    /// hands each to the callback. Every other connection carried nothing new: it keeps
    /// its totals, and its delta becomes zero, as [`Self::observe_map`] leaves a
    /// connection it was not handed. The work is in proportion to the entries handed
    /// over and those the read before observed.
    pub fn observe_changed<E>(
        &mut self,
        read: impl FnOnce(&mut dyn FnMut(FlowSnapshot)) -> Result<(), E>,
    ) -> Result<(), E> {
        match std::mem::replace(&mut self.unsettled, Unsettled::All) {
            Unsettled::All => {
                for conn in self.conns.iter_mut() {
                    conn.settle();
                }
            }
            Unsettled::Keys(observed) if self.moved_since_read => {
                for seen in &observed {
                    self.settle(&seen.key);
                }
            }
            Unsettled::Keys(observed) => {
                for seen in &observed {
                    if let Some(conn) = self.conns.at_mut(seen.position as usize) {
                        conn.settle();
                    }
                }
            }
        }
        let mut observed = Vec::new();
        self.moved_since_read = false;
        let read = read(&mut |snap| {
            let position = self.conns.position(&snap.key);
            let before = position
                .and_then(|p| self.conns.at(p))
                .map(|c| (c.first_ns(), c.closed()));
            let Some(position) = self.observe_at(position, snap) else {
                return;
            };
            let conn = self.conns.at(position).expect("just observed");
            observed.push(Observed {
                key: snap.key,
                position: position as u32,
                reschedule: before.is_none_or(|(first, closed)| {
                    conn.first_ns() < first || (conn.closed() && !closed)
                }),
            });
        });
        self.unsettled = Unsettled::Keys(observed);
        self.resumed.clear();
        read
    }

    /// After a read of what changed: the connections to judge now, each once, by
    /// position (valid until the next removal), with whether each is to be scheduled
    /// again ([`Self::wake_at`]) unless finished: those the read observed, then those
    /// whose wake-up time is `now_ns` or earlier. The first such read after one of the
    /// whole map first schedules every connection, as for [`Self::wake_at`] with the time
    /// `acts_at` gives. Empty after a read of the whole map.
    pub fn judging(
        &mut self,
        now_ns: u64,
        acts_at: impl FnMut(&Conn) -> u64,
    ) -> Vec<(usize, bool)> {
        let due = self.due(now_ns, acts_at);
        let Unsettled::Keys(observed) = &self.unsettled else {
            return Vec::new();
        };
        let observed = observed.iter().filter_map(|seen| {
            let position = if self.moved_since_read {
                self.conns.position(&seen.key)?
            } else {
                seen.position as usize
            };
            Some((position, seen.reschedule))
        });
        let len = self.conns.len();
        let mut judged = vec![0u64; len.div_ceil(64)];
        observed
            .chain(due.into_iter().map(|position| (position, true)))
            .filter(|&(position, _)| {
                let (word, bit) = (position / 64, 1 << (position % 64));
                let first = position < len && judged[word] & bit == 0;
                if first {
                    judged[word] |= bit;
                }
                first
            })
            .collect()
    }

    /// The positions of the connections whose wake-up time is `now_ns` or earlier.
    fn due(&mut self, now_ns: u64, mut acts_at: impl FnMut(&Conn) -> u64) -> Vec<usize> {
        if self.wakeups_stale {
            let idle = self.idle_timeout;
            self.wakeups = (self.conns.iter().enumerate())
                .map(|(p, c)| Reverse((secs(c.finish_at(idle).min(acts_at(c))), p as u32)))
                .collect();
            self.wakeups_stale = false;
        }
        let mut due = Vec::new();
        while let Some(Reverse((at, position))) = self.wakeups.peek().copied()
            && at <= secs(now_ns)
        {
            self.wakeups.pop();
            due.push(position as usize);
        }
        due
    }

    /// Looks at the connection at `position` again, new packets or not, when it is
    /// finished or at kernel time `acts_at` if that is sooner.
    pub fn wake_at(&mut self, position: usize, acts_at: u64) {
        if let Some(conn) = self.conns.at(position) {
            let at = conn.finish_at(self.idle_timeout).min(acts_at);
            self.wakeups.push(Reverse((secs(at), position as u32)));
        }
    }

    /// The connection at a position [`Self::judging`] gave.
    pub fn at(&self, position: usize) -> Option<&Conn> {
        self.conns.at(position)
    }

    /// A connection the table holds under a key that turned out to be part of another
    /// (a translated connection whose map entry was read before its translation was
    /// known) goes without a record: what it accounted counts as already seen in `into`,
    /// ordered for it by `orient`.
    pub fn absorb(
        &mut self,
        gone: &FlowKey,
        into: &FlowKey,
        orient: impl FnOnce([Totals; 2]) -> [Totals; 2],
    ) {
        let Some(old) = self.remove(gone) else {
            return;
        };
        if let Some(position) = self.conns.position(into) {
            let conn = self
                .conns
                .at_mut(position)
                .expect("a position in the table");
            for (prev, seen) in conn.prev.iter_mut().zip(orient(old.totals())) {
                prev.pkts += seen.pkts;
                prev.ip_bytes += seen.ip_bytes;
                prev.bytes += seen.bytes;
            }
            if let Unsettled::Keys(observed) = &mut self.unsettled {
                observed.push(Observed {
                    key: *into,
                    position: position as u32,
                    reschedule: false,
                });
            }
        }
    }

    /// New counts for a connection observed earlier in the same read (a later entry of
    /// the read turned out to be part of it): what it had before the read stays its `prev`.
    pub fn recount(&mut self, snap: FlowSnapshot) {
        if let Some(conn) = self.conns.get_mut(&snap.key) {
            let before = conn.totals();
            conn.set_snap(snap);
            if conn.totals() != before {
                let uid = conn.uid;
                self.changed(uid, snap.key);
            }
        }
    }

    /// A connection whose map entry is gone carried nothing since it was last observed.
    pub fn settle(&mut self, key: &FlowKey) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.settle();
        }
    }

    pub fn uids(&self) -> Uids {
        self.uids
    }

    /// Records the latest totals of a connection; those it had become its `prev`.
    pub fn observe(&mut self, snap: FlowSnapshot) {
        self.observe_at(self.conns.position(&snap.key), snap);
    }

    /// [`Self::observe`] of a connection at `position`, if known; returns its position,
    /// `None` for an entry that is not a connection yet (see [`timed`]).
    fn observe_at(&mut self, position: Option<usize>, snap: FlowSnapshot) -> Option<usize> {
        if let Some(position) = position {
            self.update_at(position, snap);
            return Some(position);
        }
        if !timed(&snap) {
            return None;
        }
        let mut conn = Conn::new(snap, Uid::default());
        conn.uid = self.uids.uid(&snap.key, conn.first_ns());
        if let Some(accounted) = self.resumed.remove(&conn.uid) {
            conn.prev = accounted;
        }
        self.added += 1;
        self.changed(conn.uid, conn.key);
        Some(self.conns.push_new(conn))
    }

    fn update_at(&mut self, position: usize, snap: FlowSnapshot) {
        let conn = self
            .conns
            .at_mut(position)
            .expect("a position in the table");
        conn.settle();
        conn.set_snap(snap);
        if conn.totals() != conn.prev {
            let uid = conn.uid;
            self.changed(uid, snap.key);
        }
    }

    /// Whether `conn` is finished at kernel time `now_ns` (asked while the rules see
    /// each connection: one pass over the table per poll).
    pub fn is_finished(&self, conn: &Conn, now_ns: u64) -> bool {
        conn.finished(now_ns, self.idle_timeout)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.conns.iter()
    }

    /// When the kernel map holds more than 90% of `capacity` entries, the connections to
    /// finish early, longest idle first, to bring it down to 80%: only those quiet for
    /// [`PRESSURE_MIN_IDLE`], so active transfers keep their entries (the kernel never
    /// displaces an entry; a full map refuses new ones and counts them). Their records are
    /// written as usual: nothing counted is lost.
    pub fn pressure_relief(&self, now_ns: u64, capacity: u32) -> Vec<FlowKey> {
        let (len, capacity) = (self.conns.len() as u64, u64::from(capacity));
        if len * 10 <= capacity * 9 {
            return Vec::new();
        }
        let excess = (len - capacity * 8 / 10) as usize;
        let min_idle = PRESSURE_MIN_IDLE.as_nanos() as u64;
        let mut idle: Vec<(u64, FlowKey)> = self
            .conns
            .iter()
            .map(|c| (c.last_ns(), c.key))
            .filter(|(last, _)| now_ns.saturating_sub(*last) >= min_idle)
            .collect();
        if idle.len() > excess {
            idle.select_nth_unstable(excess);
            idle.truncate(excess);
        }
        idle.sort_unstable();
        idle.into_iter().map(|(_, key)| key).collect()
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<Conn> {
        let position = self.conns.position(key)?;
        Some(self.remove_at(position))
    }

    /// Takes a finished connection out with its final counts: `last`, or, when its entry
    /// was gone, those it had (it carried nothing since).
    pub fn take(&mut self, key: &FlowKey, last: Option<FlowSnapshot>) -> Option<Conn> {
        let position = self.conns.position(key)?;
        match last {
            Some(snap) => self.update_at(position, snap),
            None => self
                .conns
                .at_mut(position)
                .expect("a position in the table")
                .settle(),
        }
        Some(self.remove_at(position))
    }

    fn remove_at(&mut self, position: usize) -> Conn {
        self.moved_since_read = true;
        let conn = self.conns.remove_at(position);
        self.changed(conn.uid, conn.key);
        self.moved_to(position);
        conn
    }

    /// After a removal from `position`: the connection that took its place is due at
    /// once, its wake-ups being at its old position.
    fn moved_to(&mut self, position: usize) {
        if position < self.conns.len() {
            self.wakeups.push(Reverse((0, position as u32)));
        }
    }

    /// Every open connection, leaving the table empty (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = Conn> + '_ {
        self.moved_since_read = true;
        self.changes += u64::from(!self.conns.is_empty());
        if let Some(touched) = &mut self.touched {
            touched.extend(self.conns.iter().map(|conn| (conn.uid, conn.key)));
        }
        self.conns.drain()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use std::net::IpAddr;

    use ipnet::IpNet;
    use monitor_common::{
        flow::{DIR_A_TO_B, DIR_B_TO_A, DirStats, tcp_flags},
        parse::{IPPROTO_TCP, IPPROTO_UDP},
    };
    use tcp_flags::{ACK, FIN, RST, SYN};

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn key(proto: u8) -> FlowKey {
        let mut k = FlowKey {
            proto,
            family: 4,
            port_a: 443,
            port_b: 50_000,
            ..FlowKey::default()
        };
        k.addr_a[..4].copy_from_slice(&[203, 0, 113, 2]);
        k.addr_b[..4].copy_from_slice(&[198, 18, 1, 2]);
        k
    }

    fn dir(pkts: u64, first: u64, last: u64, flags: u8, syn_only: bool) -> DirStats {
        DirStats {
            pkts,
            ip_bytes: pkts * 52,
            first_ns: first,
            last_ns: last,
            tcp_flags: flags,
            syn_only: syn_only as u8,
            ..DirStats::default()
        }
    }

    /// A connection from the client (endpoint b, 198.18.1.2:50000) to the server (a).
    fn conn(proto: u8, client: DirStats, server: DirStats) -> Conn {
        Conn::new(
            FlowSnapshot {
                key: key(proto),
                dir: [server, client],
                ifindex: 1,
            },
            "Ctest".parse().unwrap(),
        )
    }

    #[test]
    fn syn_sender_is_orig_even_when_its_first_packet_is_later() {
        // The server's packet carries an earlier timestamp (clock skew across CPUs), but
        // the client sent the SYN.
        let c = conn(
            IPPROTO_TCP,
            dir(3, 10 * SEC, 12 * SEC, SYN | ACK, true),
            dir(2, 9 * SEC, 12 * SEC, SYN | ACK, false),
        );
        let (orig, resp) = c.endpoints(c.orig_dir());
        assert_eq!(orig.addr.to_string(), "198.18.1.2");
        assert_eq!(orig.port, 50_000);
        assert_eq!(resp.port, 443);
        assert_eq!(c.orig().pkts, 3);
        assert!(!c.missed_start());
    }

    #[test]
    fn first_sender_is_orig_without_syn() {
        let c = conn(
            IPPROTO_UDP,
            dir(1, 5 * SEC, 5 * SEC, 0, false),
            dir(1, 4 * SEC, 4 * SEC, 0, false),
        );
        assert_eq!(c.endpoints(c.orig_dir()).0.port, 443);
        let only_server = conn(IPPROTO_UDP, DirStats::default(), dir(1, SEC, SEC, 0, false));
        assert_eq!(only_server.orig_dir(), DIR_A_TO_B);
        assert_eq!(only_server.conn_state(), "S0");
    }

    /// The programs insert an entry, add its counts, then time it: a read may come in
    /// between. Such an entry is not a connection yet (no uid from a first time of 0, not
    /// idle since boot); one of a known connection whose other direction is being
    /// counted keeps its first time and its orientation.
    #[test]
    fn half_written_entries_are_not_connections_yet() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let snap = |client: DirStats, server: DirStats| FlowSnapshot {
            key: key(IPPROTO_UDP),
            dir: [server, client],
            ifindex: 1,
        };
        let none = DirStats::default();
        for half in [
            snap(none, none),
            snap(dir(1, 0, 0, 0, false), none),
            snap(dir(1, 10 * SEC, 0, 0, false), none),
        ] {
            table.observe(half);
            assert!(table.is_empty(), "{half:?}");
        }
        let timed = snap(dir(1, 10 * SEC, 10 * SEC, 0, false), none);
        table.observe(timed);
        let conn = table.get(&timed.key).expect("a connection once timed");
        assert_eq!(conn.uid, Uids::new([1, 2]).uid(&timed.key, 10 * SEC));
        assert!(!table.is_finished(conn, 11 * SEC));

        table.observe(snap(
            dir(2, 10 * SEC, 12 * SEC, 0, false),
            dir(1, 0, 0, 0, false),
        ));
        let conn = table.get(&timed.key).unwrap();
        assert_eq!(
            conn.first_ns(),
            10 * SEC,
            "the answer's untimed packet is later"
        );
        assert_eq!(
            conn.endpoints(conn.orig_dir()).0.port,
            50_000,
            "the client stays orig"
        );
        assert!(!table.is_finished(conn, 13 * SEC));
    }

    #[test]
    fn zeek_states() {
        let t = |c: DirStats, s: DirStats| conn(IPPROTO_TCP, c, s).conn_state();
        let d = |flags, syn_only| dir(1, SEC, SEC, flags, syn_only);
        let none = DirStats::default();
        assert_eq!(t(d(SYN, true), none), "S0");
        assert_eq!(t(d(SYN | ACK, true), d(SYN | ACK, false)), "S1");
        assert_eq!(t(d(SYN | ACK | FIN, true), d(SYN | ACK | FIN, false)), "SF");
        assert_eq!(t(d(SYN, true), d(RST | ACK, false)), "REJ");
        assert_eq!(t(d(SYN | ACK | RST, true), d(SYN | ACK, false)), "RSTO");
        assert_eq!(t(d(SYN | ACK, true), d(SYN | ACK | RST, false)), "RSTR");
        assert_eq!(
            t(d(SYN | ACK | FIN, true), d(SYN | ACK | RST, false)),
            "RSTR"
        );
        assert_eq!(
            t(d(SYN | ACK | RST, true), d(SYN | ACK | FIN, false)),
            "RSTO"
        );
        // Zeek leaves a closed side's state alone on a RST once its peer closed too.
        assert_eq!(
            t(d(SYN | ACK | FIN, true), d(SYN | ACK | FIN | RST, false)),
            "SF"
        );
        assert_eq!(
            t(d(SYN | ACK | FIN | RST, true), d(SYN | ACK | FIN, false)),
            "SF"
        );
        assert_eq!(t(d(SYN | ACK | FIN, true), d(SYN | ACK, false)), "S2");
        assert_eq!(t(d(SYN | ACK, true), d(SYN | ACK | FIN, false)), "S3");
        assert_eq!(t(d(SYN | RST, true), none), "RSTOS0");
        assert_eq!(t(d(SYN | FIN, true), none), "SH");
        assert_eq!(t(d(ACK, false), d(ACK, false)), "OTH");
        assert_eq!(t(d(ACK, false), d(SYN | ACK | RST, false)), "RSTRH");
        assert_eq!(t(d(ACK, false), d(SYN | ACK | FIN, false)), "SHR");
        assert_eq!(
            conn(IPPROTO_UDP, d(0, false), d(0, false)).conn_state(),
            "SF"
        );
    }

    #[test]
    fn syn_ack_sender_is_resp_when_the_syn_was_missed() {
        // The server's SYN-ACK is the first packet seen.
        let c = conn(
            IPPROTO_TCP,
            dir(2, 2 * SEC, 3 * SEC, ACK, false),
            dir(2, SEC, 3 * SEC, SYN | ACK, false),
        );
        assert_eq!(c.endpoints(c.orig_dir()).0.port, 50_000);
        assert!(c.missed_start());
    }

    #[test]
    fn midstream_tcp_is_marked() {
        let c = conn(
            IPPROTO_TCP,
            dir(4, SEC, SEC, ACK, false),
            dir(4, SEC, SEC, ACK, false),
        );
        assert!(c.missed_start());
        assert_eq!(c.conn_state(), "OTH");
    }

    #[test]
    fn finishes_on_idle_and_after_close_delay() {
        let idle = Duration::from_secs(60);
        let open = conn(
            IPPROTO_TCP,
            dir(3, SEC, 10 * SEC, SYN | ACK, true),
            dir(3, SEC, 10 * SEC, SYN | ACK, false),
        );
        assert!(!open.finished(69 * SEC, idle));
        assert!(open.finished(70 * SEC, idle));

        let closed = conn(
            IPPROTO_TCP,
            dir(3, SEC, 10 * SEC, SYN | ACK | FIN, true),
            dir(3, SEC, 10 * SEC, SYN | ACK | FIN, false),
        );
        assert!(!closed.finished(14 * SEC, idle));
        assert!(closed.finished(15 * SEC, idle));

        let half_closed = conn(
            IPPROTO_TCP,
            dir(3, SEC, 10 * SEC, SYN | ACK | FIN, true),
            dir(3, SEC, 10 * SEC, SYN | ACK, false),
        );
        assert!(!half_closed.finished(30 * SEC, idle));

        let reset = conn(
            IPPROTO_TCP,
            dir(1, SEC, 2 * SEC, SYN, true),
            dir(1, SEC, 2 * SEC, RST | ACK, false),
        );
        assert!(reset.finished(7 * SEC, idle));
    }

    #[test]
    fn table_reports_finished_keys() {
        let mut table = ConnTable::new(Duration::from_secs(30), Uids::new([1, 2]));
        let c = conn(IPPROTO_UDP, dir(1, SEC, SEC, 0, false), DirStats::default()).snap();
        table.observe(c);
        let uid = table.conns.get(&c.key).unwrap().uid;
        let text = uid.to_string();
        assert!(text.starts_with('C') && text.len() == 18, "{text}");
        assert_eq!(text.parse::<Uid>(), Ok(uid), "shown and read back");
        table.observe(c);
        assert_eq!(
            table.conns.get(&c.key).unwrap().uid,
            uid,
            "a connection keeps its uid"
        );
        let finished = |t: &ConnTable, now| t.iter().any(|conn| t.is_finished(conn, now));
        assert!(!finished(&table, 30 * SEC));
        assert!(finished(&table, 31 * SEC));
        assert_eq!(table.remove(&c.key).map(|c| c.snap()), Some(c));
        assert!(table.is_empty());
    }

    /// One poll whose map read finds `snaps`.
    fn observe_map(table: &mut ConnTable, snaps: &[FlowSnapshot]) {
        let read: Result<(), ()> = table.observe_map(|observe| {
            snaps.iter().for_each(|snap| observe(*snap));
            Ok(())
        });
        read.unwrap();
    }

    /// Reads in a stable order with connections coming, going and being finished in
    /// between (the read order's hints go stale): every read connection ends up with its
    /// latest snapshot and the delta since the read before, every other one with none.
    /// UDP connection `n` (its remote port), `pkts` packets from b to a.
    fn snap(n: u16, pkts: u64) -> FlowSnapshot {
        FlowSnapshot {
            key: FlowKey {
                port_b: n,
                ..key(IPPROTO_UDP)
            },
            dir: [DirStats::default(), dir(pkts, SEC, SEC, 0, false)],
            ifindex: 1,
        }
    }

    #[test]
    fn reads_in_a_stable_order_with_churn_observe_every_connection() {
        let mut table = ConnTable::new(Duration::from_secs(30), Uids::new([1, 2]));
        // The kernel's order: by a hash of the key, the same in every read.
        let rank = |n: u16| u32::from(n).wrapping_mul(2_654_435_761);
        let mut live: Vec<u16> = (0..500).collect();
        let mut last_seen: HashMap<u16, u64> = HashMap::new();
        for round in 1..40u64 {
            live.retain(|&n| (u64::from(n) + round) % 7 != 0);
            live.extend((0..20).map(|i| 500 + (round * 20 + i) as u16));
            live.sort_by_key(|&n| rank(n));
            // Finished by the agent between reads: gone from the table, not from the map.
            for &n in live.iter().filter(|&&n| (u64::from(n) * round) % 11 == 0) {
                table.remove(&snap(n, 0).key);
                last_seen.remove(&n);
            }
            let pkts = |n: u16| round * 3 + u64::from(n.is_multiple_of(3));
            let snaps: Vec<FlowSnapshot> = live.iter().map(|&n| snap(n, pkts(n))).collect();
            observe_map(&mut table, &snaps);
            for &n in &live {
                let conn = table.get(&snap(n, 0).key).expect("every read connection");
                assert_eq!(conn.dir(1).pkts, pkts(n));
                let before = last_seen.insert(n, pkts(n)).unwrap_or(0);
                assert_eq!(conn.delta(1).pkts, pkts(n) - before, "round {round}, {n}");
            }
            for conn in table.iter() {
                if !live.contains(&conn.key.port_b) {
                    assert_eq!(conn.delta(1).pkts, 0);
                }
            }
        }
    }

    /// A read of what changed leaves the table as a read of the whole map would: the same
    /// totals and deltas for every connection, with connections coming, going (finished:
    /// taken from the map too) and some reads whole.
    #[test]
    fn reading_what_changed_is_reading_the_whole_map() {
        let idle = Duration::from_secs(30);
        let (mut whole, mut changed) = (
            ConnTable::new(idle, Uids::new([1, 2])),
            ConnTable::new(idle, Uids::new([1, 2])),
        );
        let mut map: HashMap<u16, u64> = (0..300).map(|n| (n, 1)).collect();
        for round in 1..40u64 {
            let mut moved = Vec::new();
            for (&n, pkts) in map.iter_mut() {
                if (u64::from(n) * round).is_multiple_of(7) {
                    *pkts += 1;
                    moved.push(n);
                }
            }
            for i in 0..5 {
                let n = 300 + (round * 5 + i) as u16;
                map.insert(n, 1);
                moved.push(n);
            }
            let all: Vec<FlowSnapshot> = map.iter().map(|(&n, &p)| snap(n, p)).collect();
            observe_map(&mut whole, &all);
            // The first read is whole, as are some later ones.
            if round % 10 == 1 {
                observe_map(&mut changed, &all);
            } else {
                let moved: Vec<FlowSnapshot> = moved.iter().map(|&n| snap(n, map[&n])).collect();
                let read: Result<(), ()> = changed.observe_changed(|observe| {
                    moved.iter().for_each(|s| observe(*s));
                    Ok(())
                });
                read.unwrap();
            }
            assert_same(&whole, &changed);
            // Every other round removes none: the next read settles by the positions
            // this one noted.
            let finished: Vec<u16> = map
                .keys()
                .copied()
                .filter(|n| round % 2 == 0 && (u64::from(*n) + round).is_multiple_of(13))
                .collect();
            for n in finished {
                map.remove(&n);
                whole.remove(&snap(n, 0).key);
                changed.remove(&snap(n, 0).key);
            }
        }
    }

    /// Polls that look, after a read of what changed, only at the connections it observed
    /// and those due, find every finished connection: idle ones, and closed ones after
    /// the close delay, whichever read saw them close.
    #[test]
    fn every_finished_connection_is_due() {
        let idle = Duration::from_secs(30);
        let mut table = ConnTable::new(idle, Uids::new([1, 2]));
        let snap = |n: u16, pkts: u64, at: u64, flags: u8| FlowSnapshot {
            key: FlowKey {
                port_b: n,
                ..key(IPPROTO_TCP)
            },
            dir: [
                dir(pkts, SEC, at, flags, false),
                dir(pkts, SEC, at, flags | SYN, true),
            ],
            ifindex: 1,
        };
        let mut map: HashMap<u16, FlowSnapshot> = HashMap::new();
        observe_map(&mut table, &[]);
        for second in 1..200u64 {
            let now = second * SEC;
            let mut moved = Vec::new();
            for n in 0..8u16 {
                let n = (second as u16 * 7 + n * 13) % 400;
                let pkts = map.get(&n).map_or(1, |s| s.dir[0].pkts + 1);
                let flags = if (u64::from(n) + second).is_multiple_of(5) {
                    FIN | ACK
                } else {
                    ACK
                };
                let flags = flags | map.get(&n).map_or(0, |s| s.dir[0].tcp_flags);
                let s = snap(n, pkts, now, flags);
                map.insert(n, s);
                moved.push(s);
            }
            let read: Result<(), ()> = table.observe_changed(|observe| {
                moved.iter().for_each(|s| observe(*s));
                Ok(())
            });
            read.unwrap();
            let judging = table.judging(now, |_| u64::MAX);
            let looked: HashSet<FlowKey> = judging
                .iter()
                .map(|&(position, _)| table.at(position).expect("a position").key)
                .collect();
            assert_eq!(looked.len(), judging.len(), "each connection judged once");
            let finished: Vec<FlowKey> = table
                .iter()
                .filter(|c| table.is_finished(c, now))
                .map(|c| c.key)
                .collect();
            for key in &finished {
                assert!(
                    looked.contains(key),
                    "second {second}: {key:?} finished unseen"
                );
            }
            for (position, reschedule) in judging {
                if reschedule && !finished.contains(&table.at(position).expect("a position").key) {
                    table.wake_at(position, u64::MAX);
                }
            }
            for key in finished {
                table.remove(&key);
                map.remove(&key.port_b);
            }
        }
        assert!(table.added() > 400, "connections came and went");
    }

    /// Both tables hold the same connections with the same totals and deltas.
    fn assert_same(whole: &ConnTable, changed: &ConnTable) {
        assert_eq!(whole.len(), changed.len());
        for conn in whole.iter() {
            let other = changed.get(&conn.key).expect("the same connections");
            assert_eq!(other.snap(), conn.snap(), "{:?}", conn.key);
            assert_eq!(
                [other.delta(0), other.delta(1)],
                [conn.delta(0), conn.delta(1)],
                "{:?}",
                conn.key
            );
        }
    }

    #[test]
    fn deltas_run_from_the_observation_before() {
        let mut table = ConnTable::new(Duration::from_secs(30), Uids::new([1, 2]));
        let mut c = conn(IPPROTO_UDP, dir(2, SEC, SEC, 0, false), DirStats::default()).snap();
        observe_map(&mut table, &[c]);
        let delta = |t: &ConnTable| t.conns.get(&c.key).unwrap().delta(1).pkts;
        assert_eq!(delta(&table), 2, "all of it, the first time");
        c.dir[1].pkts = 5;
        observe_map(&mut table, &[c]);
        assert_eq!(delta(&table), 3);
        // A poll whose snapshot lacks it: nothing new.
        observe_map(&mut table, &[]);
        assert_eq!(delta(&table), 0);
        // Its final read in the same poll as an update: only what came after the update.
        c.dir[1].pkts = 6;
        observe_map(&mut table, &[c]);
        c.dir[1].pkts = 7;
        table.observe(c);
        assert_eq!(delta(&table), 1);
        // Its entry gone: nothing more.
        table.settle(&c.key);
        assert_eq!(delta(&table), 0);
        assert_eq!(table.added(), 1);
    }

    #[test]
    fn an_absorbed_connection_counts_as_already_seen() {
        let mut table = ConnTable::new(Duration::from_secs(30), Uids::new([1, 2]));
        let raw = conn(IPPROTO_UDP, dir(2, SEC, SEC, 0, false), DirStats::default()).snap();
        observe_map(&mut table, &[raw]);
        // The same map entry under the key it belongs to, in the other key order.
        let mut whole = raw;
        whole.key.port_b += 1;
        whole.dir = [raw.dir[1], raw.dir[0]];
        whole.dir[0].pkts = 5;
        observe_map(&mut table, &[whole]);
        table.absorb(&raw.key, &whole.key, |[ab, ba]| [ba, ab]);
        assert!(table.get(&raw.key).is_none(), "no record of its own");
        let c = table.get(&whole.key).expect("the connection it belongs to");
        assert_eq!(
            (c.delta(0).pkts, c.delta(1).pkts),
            (3, 0),
            "only what is new"
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn only_new_totals_added_or_removed_connections_count_as_changes() {
        let c = conn(IPPROTO_UDP, dir(9, SEC, SEC, 0, false), DirStats::default()).snap();
        let mut table = ConnTable::new(Duration::from_secs(30), Uids::new([1, 2]));
        table.observe(c);
        let added = table.changes();
        observe_map(&mut table, &[c]);
        table.observe(c);
        assert_eq!(table.changes(), added, "the same totals again");
        let more = conn(
            IPPROTO_UDP,
            dir(10, SEC, 2 * SEC, 0, false),
            DirStats::default(),
        );
        table.observe(more.snap());
        let grown = table.changes();
        assert_ne!(grown, added, "new totals");
        table.take(&c.key, None);
        assert_ne!(table.changes(), grown, "taken out");
    }

    #[test]
    fn a_resumed_connection_starts_from_what_was_accounted() {
        let seed = [1, 2];
        let c = conn(IPPROTO_UDP, dir(9, SEC, SEC, 0, false), DirStats::default()).snap();
        let mut before = ConnTable::new(Duration::from_secs(30), Uids::new(seed));
        before.observe(c);
        let mut accounted = before.accounted();
        accounted[0].1[1].pkts = 4;
        let mut after = ConnTable::new(Duration::from_secs(30), Uids::new(seed));
        after.resume(accounted);
        observe_map(&mut after, &[c]);
        assert_eq!(after.conns.get(&c.key).unwrap().delta(1).pkts, 5);
    }

    #[test]
    fn uids_follow_seed_key_and_start() {
        let c = conn(IPPROTO_UDP, dir(1, SEC, SEC, 0, false), DirStats::default()).snap();
        let uid = |seed, first_ns| Uids::new(seed).uid(&c.key, first_ns);
        assert_eq!(
            uid([1, 2], SEC),
            uid([1, 2], SEC),
            "a restart names it again"
        );
        assert_ne!(
            uid([1, 2], SEC),
            uid([1, 3], SEC),
            "another seed, another name"
        );
        assert_ne!(
            uid([1, 2], SEC),
            uid([1, 2], 2 * SEC),
            "the same key reused later is another connection"
        );
        let mut other = c.key;
        other.port_a += 1;
        assert_ne!(uid([1, 2], SEC), Uids::new([1, 2]).uid(&other, SEC));
    }

    #[test]
    fn pressure_relief_finishes_the_longest_idle_first() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        // 10 connections: number i sent at i + 1 seconds.
        let keys: Vec<FlowKey> = (0..10u16)
            .map(|i| {
                let at = u64::from(i + 1) * SEC;
                let mut c = conn(IPPROTO_UDP, dir(1, at, at, 0, false), DirStats::default()).snap();
                c.key.port_b = 50_000 + i;
                table.observe(c);
                c.key
            })
            .collect();
        assert!(
            table.pressure_relief(20 * SEC, 12).is_empty(),
            "10 of 12 is under 90%"
        );
        // 10 of 10: down to 8, the two longest idle.
        assert_eq!(table.pressure_relief(20 * SEC, 10), keys[..2].to_vec());
        // At 9.5 s only connections 0..=6 have been quiet for 2 s: the busy ones stay.
        assert_eq!(table.pressure_relief(9_500_000_000, 5), keys[..6].to_vec());
        assert_eq!(
            table.pressure_relief(SEC, 5),
            Vec::<FlowKey>::new(),
            "nothing idle"
        );
    }

    #[test]
    fn local_nets() {
        let nets = LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()]);
        assert!(nets.contains("198.19.255.1".parse().unwrap()));
        assert!(!nets.contains("203.0.113.2".parse().unwrap()));
    }

    #[test]
    fn views_follow_the_originator_whichever_key_direction_it_sends() {
        let nets = LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()]);
        // key(): a is the remote host (203.0.113.2), b the local client, which sent the SYN.
        let c = conn(
            IPPROTO_TCP,
            dir(3, SEC, 3 * SEC, SYN, true),
            dir(2, 2 * SEC, 3 * SEC, SYN | ACK, false),
        );
        let sides = nets.view(&c);
        assert_eq!(sides.orig_dir, DIR_B_TO_A);
        assert!(sides.local_orig && !sides.local_resp);
        assert_eq!(sides.orig.addr, "198.18.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(sides.local_from_to(DIR_B_TO_A), (true, false));
        assert_eq!(sides.local_from_to(DIR_A_TO_B), (false, true));
    }

    #[test]
    fn local_nets_agree_with_ipnet() {
        let nets: Vec<IpNet> = [
            "10.1.2.3/8",
            "192.0.2.128/25",
            "0.0.0.0/0",
            "2001:db8::1/32",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let addrs: Vec<IpAddr> = [
            "10.255.0.1",
            "11.0.0.1",
            "192.0.2.127",
            "192.0.2.128",
            "192.0.2.255",
            "2001:db8:ffff::1",
            "2001:db9::1",
            "::ffff:10.0.0.1",
            "::",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for k in 0..=nets.len() {
            for some in [&nets[..k], &nets[k..]] {
                let local = LocalNets::new(some.to_vec());
                for &addr in &addrs {
                    let expected = some.iter().any(|n| n.contains(&addr));
                    assert_eq!(local.contains(addr), expected, "{addr} in {some:?}");
                }
            }
        }
    }
}
