//! One connection as the table keeps it: its latest counts and those of the observation
//! before, which end opened it, and its Zeek state.

use std::{net::IpAddr, time::Duration};

use monitor_common::{
    flow::{DIR_A_TO_B, DIR_B_TO_A, DirStats, FlowKey, tcp_flags},
    parse::{IPPROTO_TCP, PacketInfo},
};
use serde::{Deserialize, Serialize};

use super::{CLOSE_DELAY, Uid};
use crate::{addr, dense::Keyed, poller::FlowSnapshot};

/// One side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

/// One direction's running totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub pkts: u64,
    pub ip_bytes: u64,
    pub bytes: u64,
}

impl Totals {
    fn since(self, earlier: Totals) -> Totals {
        Totals {
            pkts: self.pkts.saturating_sub(earlier.pkts),
            ip_bytes: self.ip_bytes.saturating_sub(earlier.ip_bytes),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

/// A connection as the table knows it: the latest totals of its map entry, and those of
/// the observation before, from which every consumer takes what is new.
///
/// The snapshot is kept without the kernel type's padding (192 bytes in all, against 208
/// with a whole `FlowSnapshot`): there is one of these per open connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conn {
    pub key: FlowKey,
    /// The latest snapshot's counts and times per key direction.
    counts: [Counts; 2],
    /// Totals per key direction as of the observation before the latest (zero before
    /// the first): the latest minus these is what arrived since.
    pub prev: [Totals; 2],
    /// Zeek-style unique id, the same in every log line and alert about this connection.
    pub uid: Uid,
    /// Interface of the packet that opened the map entry.
    pub ifindex: u32,
    /// The latest snapshot's `tcp_flags` and `syn_only` per key direction.
    flags: [[u8; 2]; 2],
}

const _: () = assert!(
    size_of::<Conn>() == 192,
    "one per open connection: keep it small"
);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    pkts: u64,
    ip_bytes: u64,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
}

impl Counts {
    fn totals(&self) -> Totals {
        Totals {
            pkts: self.pkts,
            ip_bytes: self.ip_bytes,
            bytes: self.bytes,
        }
    }
}

impl Keyed for Conn {
    type Key = FlowKey;

    fn key(&self) -> &FlowKey {
        &self.key
    }
}

impl Conn {
    /// A connection observed once, nothing before.
    pub fn new(snap: FlowSnapshot, uid: Uid) -> Self {
        let mut conn = Self {
            key: snap.key,
            counts: [Counts {
                pkts: 0,
                ip_bytes: 0,
                bytes: 0,
                first_ns: 0,
                last_ns: 0,
            }; 2],
            prev: [Totals::default(); 2],
            uid,
            ifindex: 0,
            flags: [[0; 2]; 2],
        };
        conn.set_snap(snap);
        conn
    }

    /// Nothing new since the last observation: the delta to the next one starts here.
    pub(super) fn settle(&mut self) {
        self.prev = self.totals();
    }

    /// Takes the counts of a later snapshot of the same connection.
    pub fn set_snap(&mut self, snap: FlowSnapshot) {
        debug_assert_eq!(snap.key, self.key, "a snapshot of another connection");
        for (d, s) in snap.dir.iter().enumerate() {
            self.counts[d] = Counts {
                pkts: s.pkts,
                ip_bytes: s.ip_bytes,
                bytes: s.bytes,
                first_ns: s.first_ns,
                last_ns: s.last_ns,
            };
            self.flags[d] = [s.tcp_flags, s.syn_only];
        }
        self.ifindex = snap.ifindex;
    }

    /// Changes the latest snapshot as `change` does (tests build connections this way).
    #[cfg(test)]
    pub fn edit(&mut self, change: impl FnOnce(&mut FlowSnapshot)) {
        let mut snap = self.snap();
        change(&mut snap);
        self.set_snap(snap);
    }

    /// The latest snapshot.
    pub fn snap(&self) -> FlowSnapshot {
        FlowSnapshot {
            key: self.key,
            dir: [self.dir(0), self.dir(1)],
            ifindex: self.ifindex,
        }
    }

    /// The latest snapshot's stats of key direction `dir`.
    pub fn dir(&self, dir: usize) -> DirStats {
        let c = &self.counts[dir];
        DirStats {
            pkts: c.pkts,
            ip_bytes: c.ip_bytes,
            bytes: c.bytes,
            first_ns: c.first_ns,
            last_ns: c.last_ns,
            tcp_flags: self.flags[dir][0],
            syn_only: self.flags[dir][1],
            ..DirStats::default()
        }
    }

    fn dirs(&self) -> [DirStats; 2] {
        [self.dir(0), self.dir(1)]
    }

    /// What key direction `dir` carried since the observation before the latest.
    pub fn delta(&self, dir: usize) -> Totals {
        self.counts[dir].totals().since(self.prev[dir])
    }

    pub(super) fn totals(&self) -> [Totals; 2] {
        self.counts.map(|c| c.totals())
    }

    /// Index of the originator's direction: the sender of a SYN without ACK, else the
    /// peer of a SYN-ACK sender, else the sender of the first packet.
    pub fn orig_dir(&self) -> usize {
        let [ab, ba] = &self.dirs();
        match (ab.syn_only != 0, ba.syn_only != 0) {
            (true, false) => return DIR_A_TO_B,
            (false, true) => return DIR_B_TO_A,
            _ => {}
        }
        let syn_ack = |d: &DirStats| {
            d.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK
        };
        if self.is_tcp() {
            match (syn_ack(ab), syn_ack(ba)) {
                (true, false) => return DIR_B_TO_A,
                (false, true) => return DIR_A_TO_B,
                _ => {}
            }
        }
        // A direction without a first time yet has its first packet being counted now.
        let earlier = |x: &DirStats, y: &DirStats| {
            x.first_ns != 0 && (y.first_ns == 0 || x.first_ns < y.first_ns)
        };
        match (ab.pkts > 0, ba.pkts > 0) {
            (true, true) if earlier(ba, ab) => DIR_B_TO_A,
            (false, true) => DIR_B_TO_A,
            _ => DIR_A_TO_B,
        }
    }

    pub fn orig(&self) -> DirStats {
        self.dir(self.orig_dir())
    }

    pub fn resp(&self) -> DirStats {
        self.dir(1 - self.orig_dir())
    }

    /// The key's endpoints (a, b): the senders of key directions 0 and 1.
    pub fn key_endpoints(&self) -> (Endpoint, Endpoint) {
        key_endpoints(&self.key)
    }

    /// (originator, responder), `orig_dir` being [`Self::orig_dir`] (which callers that
    /// need it too compute once).
    pub fn endpoints(&self, orig_dir: usize) -> (Endpoint, Endpoint) {
        let (a, b) = self.key_endpoints();
        if orig_dir == DIR_A_TO_B {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// The first packet's time: the earliest of the directions that have one (a direction
    /// read between its first count and its timestamp has none yet).
    pub fn first_ns(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.first_ns)
            .filter(|&t| t != 0)
            .min()
            .unwrap_or(0)
    }

    pub fn last_ns(&self) -> u64 {
        self.counts.iter().map(|c| c.last_ns).max().unwrap_or(0)
    }

    fn is_tcp(&self) -> bool {
        self.key.proto == IPPROTO_TCP
    }

    /// TCP whose opening SYN was never seen: it started before the agent looked.
    pub fn missed_start(&self) -> bool {
        self.is_tcp() && self.flags.iter().all(|[_, syn_only]| *syn_only == 0)
    }

    /// Zeek's `conn_state`, derived from the flags each side sent (their order is not
    /// known, so FIN and RST are weighed as Zeek's state machine would end up). A side
    /// sends no FIN after its own RST, so a RST beside FINs both ways came after its
    /// sender's FIN, and Zeek keeps such a connection `SF`: a RST after a FIN exchange
    /// (a late segment answered by a closed socket) is no abort.
    pub fn conn_state(&self) -> &'static str {
        let (o, r) = (&self.orig(), &self.resp());
        if !self.is_tcp() {
            return if r.pkts > 0 { "SF" } else { "S0" };
        }
        let has = |d: &DirStats, flag: u8| d.tcp_flags & flag != 0;
        let syn = o.syn_only != 0;
        let syn_ack = has(r, tcp_flags::SYN) && has(r, tcp_flags::ACK);
        match (syn, syn_ack) {
            (true, false) if has(r, tcp_flags::RST) => "REJ",
            (true, false) if has(o, tcp_flags::RST) => "RSTOS0",
            (true, false) if has(o, tcp_flags::FIN) => "SH",
            (true, false) => "S0",
            (false, true) if has(r, tcp_flags::RST) => "RSTRH",
            (false, true) if has(r, tcp_flags::FIN) => "SHR",
            (false, _) => "OTH",
            (true, true) if has(o, tcp_flags::FIN) && has(r, tcp_flags::FIN) => "SF",
            (true, true) if has(o, tcp_flags::RST) => "RSTO",
            (true, true) if has(r, tcp_flags::RST) => "RSTR",
            (true, true) if has(o, tcp_flags::FIN) => "S2",
            (true, true) if has(r, tcp_flags::FIN) => "S3",
            (true, true) => "S1",
        }
    }

    /// Closed by the endpoints: FIN both ways, or a RST.
    pub fn closed(&self) -> bool {
        let [[ab, _], [ba, _]] = self.flags;
        let either = (ab | ba) & tcp_flags::RST != 0;
        let both_fin = ab & ba & tcp_flags::FIN != 0;
        self.is_tcp() && (either || both_fin)
    }

    /// Finished at kernel time `now_ns`: closed and quiet for [`CLOSE_DELAY`], or idle.
    pub fn finished(&self, now_ns: u64, idle_timeout: Duration) -> bool {
        Duration::from_nanos(now_ns.saturating_sub(self.last_ns()))
            >= self.quiet_to_finish(idle_timeout)
    }

    /// The kernel time from which it is [`Self::finished`] if nothing new comes.
    pub fn finish_at(&self, idle_timeout: Duration) -> u64 {
        self.last_ns()
            .saturating_add(self.quiet_to_finish(idle_timeout).as_nanos() as u64)
    }

    /// How long it must carry nothing to be finished: the close delay once closed (never
    /// more than the idle timeout), else the idle timeout.
    fn quiet_to_finish(&self, idle_timeout: Duration) -> Duration {
        if self.closed() {
            CLOSE_DELAY.min(idle_timeout)
        } else {
            idle_timeout
        }
    }
}

/// A flow key's endpoints (a, b): the senders of key directions 0 and 1.
pub fn key_endpoints(k: &FlowKey) -> (Endpoint, Endpoint) {
    let a = Endpoint {
        addr: addr::from_wire(k.family, &k.addr_a),
        port: k.port_a,
    };
    let b = Endpoint {
        addr: addr::from_wire(k.family, &k.addr_b),
        port: k.port_b,
    };
    (a, b)
}

/// The flow map's key of a connection between two endpoints of one family, as the kernel
/// programs key it: the inverse of [`key_endpoints`].
pub fn flow_key(proto: u8, x: Endpoint, y: Endpoint) -> Option<FlowKey> {
    let (src, family) = addr::to_wire(x.addr);
    let (dst, other) = addr::to_wire(y.addr);
    if family != other {
        return None;
    }
    let packet = PacketInfo {
        family,
        proto,
        src,
        dst,
        sport: x.port,
        dport: y.port,
        ..PacketInfo::default()
    };
    Some(packet.flow_key().0)
}
