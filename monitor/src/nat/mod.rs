//! Address translation on the gateway: the stage between the poller and the connection
//! table that hands the table each connection under its pre-NAT endpoints.
//!
//! A masqueraded connection is counted by the kernel programs under the gateway's public
//! address where the WAN side is watched, and under the LAN host's address where the LAN
//! side is (a gateway watched on both holds two map entries, each packet counted once in
//! one of them). The kernel's connection tracking knows both tuples: its new-entry events
//! are read before every map read (an entry is confirmed before its first packet leaves
//! the gateway), and each map entry whose key is a translated connection's is handed on
//! as that connection, its counts summed over the entries it has.

mod ctnetlink;

use std::{net::IpAddr, sync::Arc};

use foldhash::{HashMap, HashMapExt as _};
use log::{info, warn};
use monitor_common::flow::{DirStats, FlowKey};
use serde::Serialize;

pub use ctnetlink::{Entry, Tuple};

use crate::{
    conntable::Endpoint,
    poller::{FlowSnapshot, PollError, Poller},
};

/// One translated connection: its endpoints as they are, and as translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The key of the connection as its endpoints know it (the table's key).
    pub key: FlowKey,
    /// The initiator and the responder before translation.
    pub orig: Endpoint,
    pub resp: Endpoint,
    /// The same two as translated: the source after SNAT/masquerade, the destination
    /// before DNAT.
    pub nat_orig: Endpoint,
    pub nat_resp: Endpoint,
    /// The key of the translated connection.
    outside: FlowKey,
}

impl Translation {
    /// `None` when the entry translates nothing.
    pub fn of(entry: &Entry) -> Option<Translation> {
        let orig = Endpoint {
            addr: entry.orig.src,
            port: entry.orig.sport,
        };
        let resp = Endpoint {
            addr: entry.reply.src,
            port: entry.reply.sport,
        };
        let nat_orig = Endpoint {
            addr: entry.reply.dst,
            port: entry.reply.dport,
        };
        let nat_resp = Endpoint {
            addr: entry.orig.dst,
            port: entry.orig.dport,
        };
        if (orig, resp) == (nat_orig, nat_resp) {
            return None;
        }
        Some(Translation {
            key: flow_key(entry.proto, orig, resp)?,
            outside: flow_key(entry.proto, nat_orig, nat_resp)?,
            orig,
            resp,
            nat_orig,
            nat_resp,
        })
    }

    /// `end` (one of this connection's two endpoints) as translated.
    pub fn translated(&self, end: Endpoint) -> Endpoint {
        if end == self.orig {
            self.nat_orig
        } else {
            self.nat_resp
        }
    }

    /// The translated endpoints in the order of a record's (originator, responder).
    pub fn fields(&self, orig: Endpoint) -> NatFields {
        let (o, r) = if orig == self.orig {
            (self.nat_orig, self.nat_resp)
        } else {
            (self.nat_resp, self.nat_orig)
        };
        NatFields {
            orig_h: o.addr,
            orig_p: o.port,
            resp_h: r.addr,
            resp_p: r.port,
        }
    }

    /// A map entry's snapshot (under either key) as one of this connection's parts:
    /// under the pre-NAT key, its directions ordered as that key orders them.
    fn part(&self, snap: &FlowSnapshot) -> FlowSnapshot {
        FlowSnapshot {
            key: self.key,
            dir: self.orient(&snap.key, snap.dir),
            ifindex: snap.ifindex,
        }
    }

    /// Per-direction figures of the map entry under `kernel_key` (either of this
    /// connection's keys), ordered as the pre-NAT key orders its directions.
    pub fn orient<T>(&self, kernel_key: &FlowKey, [ab, ba]: [T; 2]) -> [T; 2] {
        let orig_side = if *kernel_key == self.outside {
            self.nat_orig
        } else {
            self.orig
        };
        // [sent by the initiator, sent by the responder]
        let sent = if key_a(kernel_key) == orig_side {
            [ab, ba]
        } else {
            [ba, ab]
        };
        let [o, r] = sent;
        if key_a(&self.key) == self.orig {
            [o, r]
        } else {
            [r, o]
        }
    }
}

/// `nat.*` of a connection record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatFields {
    #[serde(rename = "nat.orig_h")]
    pub orig_h: IpAddr,
    #[serde(rename = "nat.orig_p")]
    pub orig_p: u16,
    #[serde(rename = "nat.resp_h")]
    pub resp_h: IpAddr,
    #[serde(rename = "nat.resp_p")]
    pub resp_p: u16,
}

fn key_a(key: &FlowKey) -> Endpoint {
    let addr = if key.family == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&key.addr_a[..4]).expect("4 bytes"))
    } else {
        IpAddr::from(key.addr_a)
    };
    Endpoint {
        addr,
        port: key.port_a,
    }
}

/// The flow map's key of a connection between two endpoints of one family.
fn flow_key(proto: u8, x: Endpoint, y: Endpoint) -> Option<FlowKey> {
    let bytes = |addr: IpAddr| -> [u8; 16] {
        match addr {
            IpAddr::V4(a) => {
                let mut b = [0; 16];
                b[..4].copy_from_slice(&a.octets());
                b
            }
            IpAddr::V6(a) => a.octets(),
        }
    };
    let family = match (x.addr, y.addr) {
        (IpAddr::V4(_), IpAddr::V4(_)) => 4,
        (IpAddr::V6(_), IpAddr::V6(_)) => 6,
        _ => return None,
    };
    let ((a, pa), (b, pb)) = {
        let (ex, ey) = ((bytes(x.addr), x.port), (bytes(y.addr), y.port));
        if ex <= ey { (ex, ey) } else { (ey, ex) }
    };
    Some(FlowKey {
        addr_a: a,
        addr_b: b,
        port_a: pa,
        port_b: pb,
        proto,
        family,
        _pad: [0; 2],
    })
}

/// A translated connection's map entries, each as last read.
#[derive(Debug)]
struct Parts {
    translation: Arc<Translation>,
    parts: Vec<(FlowKey, FlowSnapshot)>,
}

impl Parts {
    /// The sum of the parts: each packet is counted in exactly one of them.
    fn merged(&self) -> FlowSnapshot {
        let mut out = FlowSnapshot {
            key: self.translation.key,
            ..FlowSnapshot::default()
        };
        let earliest = self
            .parts
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.dir.iter().any(|d| d.pkts > 0))
            .min_by_key(|s| first_ns(s));
        out.ifindex = earliest.map_or(0, |s| s.ifindex);
        for (_, part) in &self.parts {
            for (into, from) in out.dir.iter_mut().zip(&part.dir) {
                add(into, from);
            }
        }
        out
    }

    fn set(&mut self, kernel_key: FlowKey, snap: FlowSnapshot) {
        match self.parts.iter_mut().find(|(k, _)| *k == kernel_key) {
            Some((_, part)) => *part = snap,
            None => self.parts.push((kernel_key, snap)),
        }
    }
}

fn first_ns(snap: &FlowSnapshot) -> u64 {
    snap.dir
        .iter()
        .filter(|d| d.pkts > 0)
        .map(|d| d.first_ns)
        .min()
        .unwrap_or(u64::MAX)
}

fn add(into: &mut DirStats, from: &DirStats) {
    if from.pkts == 0 {
        return;
    }
    into.first_ns = if into.pkts == 0 {
        from.first_ns
    } else {
        into.first_ns.min(from.first_ns)
    };
    into.last_ns = into.last_ns.max(from.last_ns);
    into.pkts += from.pkts;
    into.ip_bytes += from.ip_bytes;
    into.bytes += from.bytes;
    into.tcp_flags |= from.tcp_flags;
    into.syn_only |= from.syn_only;
}

/// The translations the gateway makes, and the connections they concern.
pub struct Nat {
    events: Option<ctnetlink::Events>,
    /// Translations by either key, as conntrack reports them now, with the id of the
    /// conntrack entry that made each.
    learned: HashMap<FlowKey, (u32, Arc<Translation>)>,
    /// Map entries already handed on as a translated connection, by their key: kept
    /// until that connection is finished, whatever becomes of its conntrack entry.
    bound: HashMap<FlowKey, Arc<Translation>>,
    /// Translated connections by their pre-NAT key.
    conns: HashMap<FlowKey, Parts>,
    /// Pre-NAT keys of the connections the current read touched.
    touched: Vec<FlowKey>,
    /// Map entries bound to a translated connection in the current read under their
    /// translated key: the table may hold them as connections of their own, from a read
    /// before the translation was known.
    rebound: Vec<(FlowKey, Arc<Translation>)>,
}

impl Nat {
    /// Follows the kernel's connection tracking from now on. Without it (no conntrack in
    /// this kernel, no CAP_NET_ADMIN) connections are taken as the map has them.
    pub fn follow() -> Nat {
        let mut nat = Nat::without_conntrack();
        match ctnetlink::Events::subscribe() {
            Ok(events) => {
                nat.events = Some(events);
                nat.reload();
                info!(
                    "following address translation (conntrack): {} translated connections now",
                    nat.learned.len() / 2
                );
            }
            Err(err) => warn!(
                "address translation not followed: conntrack events unavailable ({err}); \
                 translated connections are named as the watched interfaces see them"
            ),
        }
        nat
    }

    pub fn without_conntrack() -> Nat {
        Nat {
            events: None,
            learned: HashMap::new(),
            bound: HashMap::new(),
            conns: HashMap::new(),
            touched: Vec::new(),
            rebound: Vec::new(),
        }
    }

    /// Takes every translation the kernel reported since the last call: call it right
    /// before a map read, so that every entry of that read whose first packet was
    /// translated is known as such.
    pub fn refresh(&mut self) {
        let Some(events) = &mut self.events else {
            return;
        };
        let learned = &mut self.learned;
        match events.drain(|event| match event {
            ctnetlink::Event::New(entry) => learn(learned, &entry),
            ctnetlink::Event::Destroy(entry) => forget(learned, &entry),
        }) {
            Ok(Ok(())) => {}
            Ok(Err(ctnetlink::Overrun)) => {
                warn!("conntrack events were lost (receive buffer full): reading the table again");
                self.reload();
            }
            Err(err) => warn!("reading conntrack events: {err}"),
        }
    }

    fn reload(&mut self) {
        self.learned.clear();
        let learned = &mut self.learned;
        if let Err(err) = ctnetlink::dump(|entry| learn(learned, &entry)) {
            warn!("reading the conntrack table: {err}");
        }
    }

    /// Learns one entry directly (tests of this stage feed it without a kernel).
    pub fn learn(&mut self, entry: &Entry) {
        learn(&mut self.learned, entry);
    }

    /// One map entry of a read: handed to `observe` as it is, unless it belongs to a
    /// translated connection, which [`Self::end_read`] hands on whole.
    pub fn route(&mut self, snap: FlowSnapshot, observe: &mut dyn FnMut(FlowSnapshot)) {
        let translation = match self.bound.get(&snap.key) {
            Some(t) => t.clone(),
            None => match self.learned.get(&snap.key) {
                Some((_, t)) => {
                    self.bound.insert(snap.key, t.clone());
                    if snap.key != t.key {
                        self.rebound.push((snap.key, t.clone()));
                    }
                    t.clone()
                }
                None => return observe(snap),
            },
        };
        let part = translation.part(&snap);
        let key = translation.key;
        self.conns
            .entry(key)
            .or_insert_with(|| Parts {
                translation,
                parts: Vec::new(),
            })
            .set(snap.key, part);
        self.touched.push(key);
    }

    /// After a read: every translated connection it touched, its parts summed.
    pub fn end_read(&mut self, observe: &mut dyn FnMut(FlowSnapshot)) {
        self.touched.sort_unstable();
        self.touched.dedup();
        for key in self.touched.drain(..) {
            if let Some(parts) = self.conns.get(&key) {
                observe(parts.merged());
            }
        }
    }

    /// The map entries the last read bound to a translated connection under their
    /// translated key, each with its translation.
    pub fn take_rebound(&mut self) -> Vec<(FlowKey, Arc<Translation>)> {
        std::mem::take(&mut self.rebound)
    }

    /// Removes a finished connection's entries from the map: its final counts, as
    /// [`Poller::take`] gives them, summed over its entries for a translated one. What is
    /// known of its translation stays until [`Self::finished`].
    pub fn take(
        &mut self,
        poller: &Poller,
        key: &FlowKey,
    ) -> Result<Option<FlowSnapshot>, PollError> {
        let Some(parts) = self.conns.get_mut(key) else {
            return poller.take(key);
        };
        let kernel_keys: Vec<FlowKey> = parts.parts.iter().map(|(k, _)| *k).collect();
        for kernel_key in kernel_keys {
            if let Some(last) = poller.take(&kernel_key)? {
                let part = parts.translation.part(&last);
                parts.set(kernel_key, part);
            }
        }
        Ok(Some(parts.merged()))
    }

    /// Forgets a connection whose record is written.
    pub fn finished(&mut self, key: &FlowKey) {
        if let Some(parts) = self.conns.remove(key) {
            for (kernel_key, _) in &parts.parts {
                self.bound.remove(kernel_key);
            }
        }
    }

    /// A packet's endpoints before translation, for one seen under a translated key (a DNS
    /// message of a LAN client, seen on the WAN side): those of the connection it belongs
    /// to. Others stay as they are.
    pub fn untranslate(&self, proto: u8, src: Endpoint, dst: Endpoint) -> (Endpoint, Endpoint) {
        let translation = flow_key(proto, src, dst).and_then(|key| {
            self.learned
                .get(&key)
                .map(|(_, t)| t)
                .or_else(|| self.bound.get(&key))
                .filter(|t| t.outside == key)
        });
        match translation {
            Some(t) if src == t.nat_orig => (t.orig, t.resp),
            Some(t) => (t.resp, t.orig),
            None => (src, dst),
        }
    }

    /// The translation of the connection with this (pre-NAT) key, if it was translated.
    pub fn of(&self, key: &FlowKey) -> Option<&Translation> {
        self.conns.get(key).map(|p| &*p.translation)
    }
}

type Learned = HashMap<FlowKey, (u32, Arc<Translation>)>;

fn learn(learned: &mut Learned, entry: &Entry) {
    if let Some(t) = Translation::of(entry) {
        let t = Arc::new(t);
        learned.insert(t.outside, (entry.id, t.clone()));
        learned.insert(t.key, (entry.id, t));
    }
}

/// Forgets what the entry taught, unless a later entry with the same tuples (a new id)
/// taught it again: the kernel may report an entry's end after its successor's start.
fn forget(learned: &mut Learned, entry: &Entry) {
    if let Some(t) = Translation::of(entry) {
        for key in [t.outside, t.key] {
            if learned.get(&key).is_some_and(|(id, _)| *id == entry.id) {
                learned.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use monitor_common::parse::IPPROTO_TCP;

    use super::*;

    const LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

    fn ep(addr: Ipv4Addr, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            port,
        }
    }

    fn tuple(src: Endpoint, dst: Endpoint) -> Tuple {
        Tuple {
            src: src.addr,
            dst: dst.addr,
            sport: src.port,
            dport: dst.port,
        }
    }

    /// LAN:40000 -> SERVER:443, masqueraded to PUBLIC:61000.
    fn masquerade() -> Entry {
        Entry {
            id: 1,
            proto: IPPROTO_TCP,
            orig: tuple(ep(LAN, 40000), ep(SERVER, 443)),
            reply: tuple(ep(SERVER, 443), ep(PUBLIC, 61000)),
        }
    }

    fn dir(pkts: u64, first_ns: u64) -> DirStats {
        DirStats {
            pkts,
            ip_bytes: pkts * 100,
            bytes: pkts * 60,
            first_ns,
            last_ns: first_ns + 10,
            ..DirStats::default()
        }
    }

    /// A map entry between `from` and `to`, `sent` packets each way as (from, to).
    fn snap(
        from: Endpoint,
        to: Endpoint,
        sent: (DirStats, DirStats),
        ifindex: u32,
    ) -> FlowSnapshot {
        let key = flow_key(IPPROTO_TCP, from, to).expect("one family");
        let dir = if key_a(&key) == from {
            [sent.0, sent.1]
        } else {
            [sent.1, sent.0]
        };
        FlowSnapshot { key, dir, ifindex }
    }

    fn read(nat: &mut Nat, snaps: &[FlowSnapshot]) -> Vec<FlowSnapshot> {
        let mut out = Vec::new();
        let mut observe = |s| out.push(s);
        for s in snaps {
            nat.route(*s, &mut observe);
        }
        nat.end_read(&mut observe);
        out
    }

    #[test]
    fn an_untranslated_entry_is_no_translation() {
        let entry = Entry {
            id: 1,
            proto: IPPROTO_TCP,
            orig: tuple(ep(PUBLIC, 5000), ep(SERVER, 22)),
            reply: tuple(ep(SERVER, 22), ep(PUBLIC, 5000)),
        };
        assert_eq!(Translation::of(&entry), None);
    }

    #[test]
    fn the_wan_entry_is_handed_on_under_the_lan_host() {
        let mut nat = Nat::without_conntrack();
        nat.learn(&masquerade());
        let wan = snap(
            ep(PUBLIC, 61000),
            ep(SERVER, 443),
            (dir(5, 100), dir(3, 150)),
            7,
        );
        let out = read(&mut nat, &[wan]);
        assert_eq!(out.len(), 1);
        let want = snap(
            ep(LAN, 40000),
            ep(SERVER, 443),
            (dir(5, 100), dir(3, 150)),
            7,
        );
        assert_eq!(out[0], want);
        let fields = nat
            .of(&want.key)
            .expect("translated")
            .fields(ep(LAN, 40000));
        assert_eq!((fields.orig_h, fields.orig_p), (PUBLIC.into(), 61000));
        assert_eq!((fields.resp_h, fields.resp_p), (SERVER.into(), 443));
    }

    #[test]
    fn lan_and_wan_entries_are_summed_into_one_connection() {
        let mut nat = Nat::without_conntrack();
        nat.learn(&masquerade());
        // Watched on both sides: the upload counted where it entered (LAN), the replies
        // where they entered (WAN).
        let lan = snap(ep(LAN, 40000), ep(SERVER, 443), (dir(5, 100), dir(0, 0)), 3);
        let wan = snap(
            ep(PUBLIC, 61000),
            ep(SERVER, 443),
            (dir(0, 0), dir(3, 150)),
            7,
        );
        let out = read(&mut nat, &[wan, lan]);
        assert_eq!(out.len(), 1);
        let want = snap(
            ep(LAN, 40000),
            ep(SERVER, 443),
            (dir(5, 100), dir(3, 150)),
            3,
        );
        assert_eq!(out[0], want);
    }

    #[test]
    fn a_connection_stays_bound_after_its_conntrack_entry_is_gone() {
        let mut nat = Nat::without_conntrack();
        nat.learn(&masquerade());
        let wan = |n| {
            snap(
                ep(PUBLIC, 61000),
                ep(SERVER, 443),
                (dir(n, 100), dir(1, 150)),
                7,
            )
        };
        read(&mut nat, &[wan(5)]);
        forget(&mut nat.learned, &masquerade());
        let out = read(&mut nat, &[wan(9)]);
        assert_eq!(out[0].key, Translation::of(&masquerade()).unwrap().key);
        assert_eq!(out[0].dir.iter().map(|d| d.pkts).sum::<u64>(), 10);
    }

    #[test]
    fn a_port_forward_names_the_lan_server() {
        // CLIENT:50000 -> PUBLIC:8080, forwarded to LAN:80.
        let client = Ipv4Addr::new(198, 51, 100, 7);
        let entry = Entry {
            id: 1,
            proto: IPPROTO_TCP,
            orig: tuple(ep(client, 50000), ep(PUBLIC, 8080)),
            reply: tuple(ep(LAN, 80), ep(client, 50000)),
        };
        let t = Translation::of(&entry).expect("translated");
        assert_eq!((t.orig, t.resp), (ep(client, 50000), ep(LAN, 80)));
        assert_eq!(
            (t.nat_orig, t.nat_resp),
            (ep(client, 50000), ep(PUBLIC, 8080))
        );
        let mut nat = Nat::without_conntrack();
        nat.learn(&entry);
        let wan = snap(
            ep(client, 50000),
            ep(PUBLIC, 8080),
            (dir(2, 10), dir(9, 20)),
            7,
        );
        let out = read(&mut nat, &[wan]);
        let want = snap(ep(client, 50000), ep(LAN, 80), (dir(2, 10), dir(9, 20)), 7);
        assert_eq!(out, vec![want]);
    }

    #[test]
    fn a_dns_message_seen_translated_is_the_lan_clients() {
        let udp = monitor_common::parse::IPPROTO_UDP;
        let mut nat = Nat::without_conntrack();
        nat.learn(&Entry {
            id: 1,
            proto: udp,
            orig: tuple(ep(LAN, 40000), ep(SERVER, 53)),
            reply: tuple(ep(SERVER, 53), ep(PUBLIC, 61000)),
        });
        let (lan, public, server) = (ep(LAN, 40000), ep(PUBLIC, 61000), ep(SERVER, 53));
        assert_eq!(nat.untranslate(udp, public, server), (lan, server));
        assert_eq!(nat.untranslate(udp, server, public), (server, lan));
        // Seen on the LAN side: already as it was.
        assert_eq!(nat.untranslate(udp, lan, server), (lan, server));
        let other = ep(PUBLIC, 5000);
        assert_eq!(nat.untranslate(udp, other, server), (other, server));
    }

    #[test]
    fn an_old_entrys_end_reported_late_does_not_forget_its_successor() {
        let mut nat = Nat::without_conntrack();
        let old = masquerade();
        let new = Entry { id: 2, ..old };
        nat.learn(&old);
        nat.learn(&new);
        forget(&mut nat.learned, &old);
        let wan = snap(
            ep(PUBLIC, 61000),
            ep(SERVER, 443),
            (dir(1, 1), dir(1, 2)),
            7,
        );
        let out = read(&mut nat, &[wan]);
        assert_eq!(out[0].key, Translation::of(&new).unwrap().key);
        forget(&mut nat.learned, &new);
        assert!(nat.learned.is_empty());
    }

    #[test]
    fn an_entry_bound_under_its_translated_key_is_reported_as_rebound() {
        let mut nat = Nat::without_conntrack();
        nat.learn(&masquerade());
        let t = Translation::of(&masquerade()).unwrap();
        let wan = snap(
            ep(PUBLIC, 61000),
            ep(SERVER, 443),
            (dir(4, 1), dir(3, 2)),
            7,
        );
        read(&mut nat, &[wan]);
        let rebound = nat.take_rebound();
        assert_eq!(rebound.len(), 1);
        assert_eq!(rebound[0].0, wan.key);
        // Bound once: the next read rebinds nothing.
        read(&mut nat, &[wan]);
        assert!(nat.take_rebound().is_empty());
        // What the entry's key directions carried, in the pre-NAT key's order.
        let want = snap(ep(LAN, 40000), ep(SERVER, 443), (dir(4, 1), dir(3, 2)), 7);
        assert_eq!(t.orient(&wan.key, wan.dir), want.dir);
    }
}
