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
    conntable::{ConnTable, Endpoint, flow_key, key_endpoints},
    poller::{FlowSnapshot, PollError, Poller, Taken},
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
    key_endpoints(key).0
}

/// A map entry bound to a translated connection.
#[derive(Debug)]
struct Binding {
    /// The connection's pre-NAT key.
    key: FlowKey,
    /// The entry's key directions are the pre-NAT key's, swapped.
    swap: bool,
    /// The connection has other entries too: reads sum them (see [`Nat::end_read`]).
    shared: bool,
    /// The read that last handed the entry on as its connection, alone.
    observed: u64,
    /// The entry as last read, under the pre-NAT key.
    last: FlowSnapshot,
}

impl Binding {
    fn part(&self, snap: &FlowSnapshot) -> FlowSnapshot {
        let [ab, ba] = snap.dir;
        FlowSnapshot {
            key: self.key,
            dir: if self.swap { [ba, ab] } else { [ab, ba] },
            ifindex: snap.ifindex,
        }
    }
}

/// A translated connection: its translation and its map entries.
#[derive(Debug)]
struct Translated {
    translation: Arc<Translation>,
    entries: Vec<FlowKey>,
    /// The read that last left it for [`Nat::end_read`].
    touched: u64,
}

/// The sum of a connection's entries as last read: each packet is counted in exactly one.
fn merged(translated: &Translated, bound: &HashMap<FlowKey, Binding>) -> FlowSnapshot {
    let mut out = FlowSnapshot {
        key: translated.translation.key,
        ..FlowSnapshot::default()
    };
    let parts: Vec<&FlowSnapshot> = translated
        .entries
        .iter()
        .filter_map(|k| bound.get(k).map(|b| &b.last))
        .collect();
    let earliest = parts
        .iter()
        .filter(|s| s.dir.iter().any(|d| d.pkts > 0))
        .min_by_key(|s| first_ns(s));
    out.ifindex = earliest.map_or(0, |s| s.ifindex);
    for part in parts {
        for (into, from) in out.dir.iter_mut().zip(&part.dir) {
            add(into, from);
        }
    }
    out
}

fn first_ns(snap: &FlowSnapshot) -> u64 {
    snap.dir
        .iter()
        .map(|d| d.first_ns)
        .filter(|&t| t != 0)
        .min()
        .unwrap_or(u64::MAX)
}

fn add(into: &mut DirStats, from: &DirStats) {
    if from.pkts == 0 {
        return;
    }
    // A part read before the programs timed its first packet has no first time (0).
    into.first_ns = match (into.first_ns, from.first_ns) {
        (0, t) | (t, 0) => t,
        (a, b) => a.min(b),
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
    bound: HashMap<FlowKey, Binding>,
    /// Translated connections by their pre-NAT key.
    conns: HashMap<FlowKey, Translated>,
    /// Reads so far, the current one included.
    reads: u64,
    /// Pre-NAT keys of the connections of several entries the current read touched.
    touched: Vec<FlowKey>,
    /// Connections handed on in the current read before another of their entries came:
    /// their whole counts, for [`ConnTable::recount`].
    recount: Vec<FlowSnapshot>,
    /// Map entries bound to a translated connection in the current read under their
    /// translated key: the table may hold them as connections of their own, from a read
    /// before the translation was known.
    rebound: Vec<(FlowKey, Arc<Translation>)>,
    /// Keys of the translations learned since [`Self::take_learned`]: a map entry read
    /// before its translation was known is read again to be bound, changed or not.
    fresh: Vec<FlowKey>,
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
                    nat.translations()
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
            reads: 1,
            touched: Vec::new(),
            recount: Vec::new(),
            rebound: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// Takes every translation the kernel reported since the last call: call it right
    /// before a map read, so that every entry of that read whose first packet was
    /// translated is known as such.
    pub fn refresh(&mut self) {
        let Some(events) = &mut self.events else {
            return;
        };
        let (learned, fresh) = (&mut self.learned, &mut self.fresh);
        match events.drain(|event| match event {
            ctnetlink::Event::New(entry) => {
                fresh.extend(learn(learned, &entry).into_iter().flatten())
            }
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
        let (learned, fresh) = (&mut self.learned, &mut self.fresh);
        if let Err(err) =
            ctnetlink::dump(|entry| fresh.extend(learn(learned, &entry).into_iter().flatten()))
        {
            warn!("reading the conntrack table: {err}");
        }
    }

    /// Translations known now.
    pub fn translations(&self) -> usize {
        self.learned.len() / 2
    }

    /// Learns one entry directly (tests and benchmarks of this stage feed it without a
    /// kernel).
    pub fn learn(&mut self, entry: &Entry) {
        learn(&mut self.learned, entry);
    }

    /// The keys of the translations learned since the last call.
    pub fn take_learned(&mut self) -> Vec<FlowKey> {
        std::mem::take(&mut self.fresh)
    }

    /// One map entry of a read: handed to `observe` as it is, or as the translated
    /// connection it belongs to. A connection of one entry (one side of the gateway
    /// watched) is handed on at once; one of several, summed by [`Self::end_read`].
    pub fn route(&mut self, snap: FlowSnapshot, observe: &mut dyn FnMut(FlowSnapshot)) {
        if let Some(binding) = self.bound.get_mut(&snap.key) {
            let part = binding.part(&snap);
            binding.last = part;
            if !binding.shared {
                binding.observed = self.reads;
                return observe(part);
            }
            let key = binding.key;
            let translated = self
                .conns
                .get_mut(&key)
                .expect("a bound entry's connection is known until it is finished");
            if translated.touched != self.reads {
                translated.touched = self.reads;
                self.touched.push(key);
            }
            return;
        }
        match self.learned.get(&snap.key) {
            Some((_, t)) => {
                self.bind(snap.key, t.clone());
                self.route(snap, observe);
            }
            None => observe(snap),
        }
    }

    /// Binds the map entry under `kernel_key` to the translated connection `t`.
    fn bind(&mut self, kernel_key: FlowKey, t: Arc<Translation>) {
        let translated = self.conns.entry(t.key).or_insert_with(|| Translated {
            translation: t.clone(),
            entries: Vec::new(),
            touched: 0,
        });
        for other in &translated.entries {
            if let Some(binding) = self.bound.get_mut(other) {
                binding.shared = true;
            }
        }
        translated.entries.push(kernel_key);
        let binding = Binding {
            key: t.key,
            swap: t.orient(&kernel_key, [false, true])[0],
            shared: translated.entries.len() > 1,
            observed: 0,
            last: FlowSnapshot {
                key: t.key,
                ..FlowSnapshot::default()
            },
        };
        self.bound.insert(kernel_key, binding);
        if kernel_key != t.key {
            self.rebound.push((kernel_key, t));
        }
    }

    /// After a read: every connection of several entries it touched, its entries summed.
    pub fn end_read(&mut self, observe: &mut dyn FnMut(FlowSnapshot)) {
        for key in self.touched.drain(..) {
            let Some(translated) = self.conns.get(&key) else {
                continue;
            };
            let whole = merged(translated, &self.bound);
            let handed_on = translated
                .entries
                .iter()
                .any(|k| self.bound.get(k).is_some_and(|b| b.observed == self.reads));
            if handed_on {
                self.recount.push(whole);
            } else {
                observe(whole);
            }
        }
        self.reads += 1;
    }

    /// What the table needs to know after a read it was handed through [`Self::route`]:
    /// the connections it held under a key the read bound to a translated connection go
    /// into that connection ([`ConnTable::absorb`]), and those handed on before another of
    /// their entries came take their whole counts ([`ConnTable::recount`]).
    pub fn settle_read(&mut self, table: &mut ConnTable) {
        for (raw, t) in self.rebound.drain(..) {
            table.absorb(&raw, &t.key, |seen| t.orient(&raw, seen));
        }
        for snap in self.recount.drain(..) {
            table.recount(snap);
        }
    }

    /// Removes a finished connection's entries from the map: its final counts, as
    /// [`Poller::take`] gives them, summed over its entries for a translated one. What is
    /// known of its translation stays until [`Self::finished`]. A connection of one entry
    /// that moved is put back; one of several is taken whole, its entries' sum being
    /// right only as long as none of them starts again from nothing.
    pub fn take(&mut self, poller: &Poller, key: &FlowKey) -> Result<Taken, PollError> {
        let Some(translated) = self.conns.get(key) else {
            return poller.take(key, true);
        };
        let put_back = translated.entries.len() == 1;
        for kernel_key in &translated.entries {
            match (
                poller.take(kernel_key, put_back)?,
                self.bound.get_mut(kernel_key),
            ) {
                (Taken::Moved, _) => return Ok(Taken::Moved),
                (Taken::Final(last), Some(binding)) => binding.last = binding.part(&last),
                _ => {}
            }
        }
        Ok(Taken::Final(merged(translated, &self.bound)))
    }

    /// Forgets a connection whose record is written.
    pub fn finished(&mut self, key: &FlowKey) {
        if let Some(translated) = self.conns.remove(key) {
            for kernel_key in &translated.entries {
                self.bound.remove(kernel_key);
            }
        }
    }

    /// A packet's endpoints before translation, for one seen under a translated key (a DNS
    /// message of a LAN client, seen on the WAN side): those of the connection it belongs
    /// to. Others stay as they are.
    pub fn untranslate(&self, proto: u8, src: Endpoint, dst: Endpoint) -> (Endpoint, Endpoint) {
        let translation = flow_key(proto, src, dst).and_then(|key| {
            let bound = || {
                let translated = self.conns.get(&self.bound.get(&key)?.key)?;
                Some(&translated.translation)
            };
            self.learned
                .get(&key)
                .map(|(_, t)| t)
                .or_else(bound)
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
        self.conns.get(key).map(|t| &*t.translation)
    }
}

type Learned = HashMap<FlowKey, (u32, Arc<Translation>)>;

/// Returns the translation's two keys.
fn learn(learned: &mut Learned, entry: &Entry) -> Option<[FlowKey; 2]> {
    let t = Arc::new(Translation::of(entry)?);
    let keys = [t.outside, t.key];
    learned.insert(t.outside, (entry.id, t.clone()));
    learned.insert(t.key, (entry.id, t));
    Some(keys)
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
        let (mut nat, mut table) = (Nat::without_conntrack(), table());
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
        poll(&mut nat, &mut table, &[wan, lan]);
        assert_eq!(table.len(), 1);
        let want = snap(
            ep(LAN, 40000),
            ep(SERVER, 443),
            (dir(5, 100), dir(3, 150)),
            3,
        );
        assert_eq!(table.get(&want.key).map(|c| c.snap()), Some(want));
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

    /// One poll's read of `snaps` through the stage into `table`.
    fn poll(nat: &mut Nat, table: &mut ConnTable, snaps: &[FlowSnapshot]) {
        let read: Result<(), ()> = table.observe_map(|observe| {
            for s in snaps {
                nat.route(*s, observe);
            }
            nat.end_read(observe);
            Ok(())
        });
        read.expect("an in-memory read");
        nat.settle_read(table);
    }

    fn table() -> ConnTable {
        ConnTable::new(
            std::time::Duration::from_secs(60),
            crate::conntable::Uids::new([1, 2]),
        )
    }

    /// New packets of a connection since the poll before, as (from the LAN host, to it).
    fn lan_deltas(table: &ConnTable) -> (u64, u64) {
        let t = Translation::of(&masquerade()).unwrap();
        let conn = table.get(&t.key).expect("the LAN host's connection");
        let lan = if key_a(&t.key) == t.orig { 0 } else { 1 };
        (conn.delta(lan).pkts, conn.delta(1 - lan).pkts)
    }

    #[test]
    fn a_connection_read_before_its_translation_is_absorbed() {
        let (mut nat, mut table) = (Nat::without_conntrack(), table());
        let wan = |n| {
            snap(
                ep(PUBLIC, 61000),
                ep(SERVER, 443),
                (dir(n, 1), dir(3, 2)),
                7,
            )
        };
        poll(&mut nat, &mut table, &[wan(4)]);
        assert!(
            table.get(&wan(4).key).is_some(),
            "the gateway's, as far as known"
        );
        nat.learn(&masquerade());
        poll(&mut nat, &mut table, &[wan(6)]);
        assert!(table.get(&wan(4).key).is_none(), "gone into the LAN host's");
        assert_eq!(table.len(), 1);
        assert_eq!(lan_deltas(&table), (2, 0), "only what is new");
        poll(&mut nat, &mut table, &[wan(7)]);
        assert_eq!(lan_deltas(&table), (1, 0));
    }

    #[test]
    fn a_second_entry_later_in_the_read_adds_to_what_was_handed_on() {
        let (mut nat, mut table) = (Nat::without_conntrack(), table());
        nat.learn(&masquerade());
        let lan = |n| snap(ep(LAN, 40000), ep(SERVER, 443), (dir(n, 1), dir(0, 0)), 3);
        let wan = |n| {
            snap(
                ep(PUBLIC, 61000),
                ep(SERVER, 443),
                (dir(0, 0), dir(n, 2)),
                7,
            )
        };
        poll(&mut nat, &mut table, &[lan(5)]);
        assert_eq!(lan_deltas(&table), (5, 0));
        // The WAN side's entry comes after the LAN side's, which was handed on at once.
        poll(&mut nat, &mut table, &[lan(6), wan(3)]);
        assert_eq!(lan_deltas(&table), (1, 3));
        poll(&mut nat, &mut table, &[wan(4), lan(8)]);
        assert_eq!(lan_deltas(&table), (2, 1));
        assert_eq!(table.len(), 1);
    }
}
