//! IPFIX (RFC 7011) export of connections, with RFC 5103 biflow records on request.
//!
//! - **Records carry deltas** since the previous export of the same connection, so the
//!   records of one connection sum exactly to its conn-log record. An open connection is
//!   exported by [`IpfixExporter::update`] once [`IpfixConfig::active_timeout`] has passed
//!   since its previous export (or its first packet), with flowEndReason 2 (active
//!   timeout); [`IpfixExporter::finish`] exports what is left with the reason given.
//! - **Unidirectional by default**: one record per direction that carried packets since the
//!   previous export, the originator's direction first. A final export with nothing left
//!   still sends one record (zero counts, originator's direction) so the collector learns
//!   the end reason. With [`IpfixConfig::biflow`], one RFC 5103 record per export: the
//!   forward direction is the originator's, the reverse counters use enterprise 29305.
//! - **Elements**: see [`template_fields`]. octetDeltaCount counts IP bytes (`*_ip_bytes`).
//!   tcpControlBits is one octet (reduced-size encoding, RFC 7011 section 6.2), the union of
//!   the flags that direction sent so far. For ICMP the type and code are in
//!   icmpTypeCodeIPv4/IPv6 *and*, as NetFlow v5 did, in destinationTransportPort
//!   (`type << 8 | code`, source port 0), since some collectors read only the ports.
//! - **flowDirection** (61): 1 (egress) for a record whose source is local; 0 (ingress)
//!   for one whose destination is local and source is not; when neither end is local, the
//!   originator's direction counts as egress. The monitored interface is egressInterface of
//!   egress records and ingressInterface of ingress records; the other one is 0.
//! - **Timestamps**: flowStartMilliseconds is the first packet of that direction, or for
//!   later exports the last packet of the previous one (the earliest time the new packets
//!   can have); flowEndMilliseconds is its last packet.
//! - **Messages** stay within [`MAX_MESSAGE`] bytes. Over UDP the sequence number is the
//!   count of data records encoded before the message in this observation domain (a
//!   message dropped on a full queue shows as a gap, as RFC 7011 intends) and the templates
//!   go out first, then every `template_refresh`; over TCP see [`transport`].
//! - **Never blocks**: [`IpfixExporter::flush`] encodes and hands the messages to a sender
//!   thread through a bounded queue; a full queue drops the message and counts it.

pub mod encode;
pub mod transport;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::warn;
use monitor_common::{
    flow::FlowKey,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, icmp_ports},
};

pub use encode::{
    Encoder, Field, MAX_MESSAGE, Message, NAT_TEMPLATE_OFFSET, PostNat, REVERSE_PEN, Record,
    Reverse, TEMPLATE_BIFLOW_V4, TEMPLATE_BIFLOW_V6, TEMPLATE_SET_ID, TEMPLATE_V4, TEMPLATE_V6,
    VERSION, ie, template_fields,
};
pub use transport::{COLLECTOR_SCHEMES, Collector};

use crate::{
    clock::{Clock, Now},
    conntable::{ConnTable, EndReason, LocalNets, View},
    consumer::{ConnCtx, Consumer},
    nat::Translation,
    worker::{Submitted, Worker},
};

/// Messages the sender thread holds (the one being sent included) before new ones are
/// dropped.
pub const DEFAULT_QUEUE: usize = 1024;
/// How long [`IpfixExporter::shutdown`] waits at most for the queue to drain (a send in
/// progress then gets a short grace).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct IpfixConfig {
    pub collector: Collector,
    pub domain_id: u32,
    /// An open connection is exported at least this often.
    pub active_timeout: Duration,
    pub template_refresh: Duration,
    pub biflow: bool,
    /// Kernel timestamps to epoch time.
    pub clock: Clock,
    /// Messages held for sending before new ones are dropped (at least 1).
    pub queue: usize,
}

impl IpfixConfig {
    /// The flags' defaults: active timeout and template refresh 60 s, domain 1, unidirectional.
    pub fn new(collector: Collector, clock: Clock) -> Self {
        Self {
            collector,
            domain_id: 1,
            active_timeout: Duration::from_secs(60),
            template_refresh: Duration::from_secs(60),
            biflow: false,
            clock,
            queue: DEFAULT_QUEUE,
        }
    }
}

/// What the exporter sent, as counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Data records in messages sent (`ipfix_records_total`).
    pub records: u64,
    /// Messages sent (`ipfix_messages_total`).
    pub messages: u64,
    /// Messages dropped on a full queue, failed sends, and messages left unsent at
    /// shutdown (`ipfix_export_errors_total`).
    pub errors: u64,
    /// Of `errors`, the drops.
    pub dropped: u64,
}

/// What the sender thread counts; drops from a full queue are the worker's.
#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    messages: AtomicU64,
    /// Failed sends and messages left unsent at shutdown.
    errors: AtomicU64,
}

impl Counters {
    fn stats(&self, dropped: u64) -> ExportStats {
        ExportStats {
            records: self.records.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed) + dropped,
            dropped,
        }
    }
}

/// What was exported of one connection, per key direction (`[a -> b, b -> a]`).
#[derive(Clone, Copy, Debug, Default)]
struct Exported {
    packets: [u64; 2],
    octets: [u64; 2],
    last_ns: [u64; 2],
    /// Kernel time of the last export (or the first packet): the active timeout runs
    /// from here.
    at_ns: u64,
}

/// Exports connections to one collector. See the module documentation.
pub struct IpfixExporter {
    config: IpfixConfig,
    encoder: Encoder,
    exported: HashMap<FlowKey, Exported>,
    pending: Vec<Record>,
    sender: Worker<Message>,
    counters: Arc<Counters>,
}

impl IpfixExporter {
    /// Opens the socket, starts the sender thread and queues the templates.
    pub fn new(config: IpfixConfig) -> std::io::Result<Self> {
        let encoder = Encoder::new(
            config.domain_id,
            config.biflow,
            config
                .collector
                .refreshes_templates()
                .then_some(config.template_refresh),
        );
        let counters = Arc::new(Counters::default());
        let templates = encoder.templates_message(0);
        let sender = transport::spawn(
            &config.collector,
            config.queue,
            templates,
            Arc::clone(&counters),
        )?;
        let mut exporter = Self {
            encoder,
            config,
            exported: HashMap::new(),
            pending: Vec::new(),
            sender,
            counters,
        };
        exporter.flush();
        Ok(exporter)
    }

    /// For an open connection at kernel time `now_ns`: queues its deltas (reason "active
    /// timeout") when the active timeout has passed since its previous export or its first
    /// packet.
    pub fn update(&mut self, view: &View, nat: Option<&Translation>, now_ns: u64) {
        let conn = view.conn;
        let first = conn.first_ns();
        let at = self
            .exported
            .entry(conn.key)
            .or_insert_with(|| Exported {
                at_ns: first,
                ..Exported::default()
            })
            .at_ns;
        let timeout = self.config.active_timeout.as_nanos() as u64;
        if now_ns.saturating_sub(at) >= timeout {
            self.export(view, nat, EndReason::ActiveTimeout, now_ns, false);
        }
    }

    /// The kernel time from which [`Self::update`] exports the connection, new packets or
    /// not: its active timeout.
    pub fn next_due(&self, view: &View) -> u64 {
        let conn = view.conn;
        let at = self
            .exported
            .get(&conn.key)
            .map_or(conn.first_ns(), |e| e.at_ns);
        at.saturating_add(self.config.active_timeout.as_nanos() as u64)
    }

    /// For a finished connection: queues what is left with `reason` and forgets it.
    pub fn finish(
        &mut self,
        view: &View,
        nat: Option<&Translation>,
        reason: EndReason,
        now_ns: u64,
    ) {
        self.export(view, nat, reason, now_ns, true);
        self.exported.remove(&view.conn.key);
    }

    /// Encodes the queued records (and the templates when due) and hands the messages to
    /// the sender thread; never blocks.
    pub fn flush(&mut self) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let records = std::mem::take(&mut self.pending);
        for message in self.encoder.encode(&records, now_ms) {
            self.enqueue(message);
        }
    }

    /// Connections with export state (open ones seen by `update`).
    pub fn tracked(&self) -> usize {
        self.exported.len()
    }

    pub fn stats(&self) -> ExportStats {
        self.counters.stats(self.sender.dropped())
    }

    /// Flushes, then waits (at most a couple of seconds) for the queue to be sent; what
    /// is left unsent counts as errors.
    pub fn shutdown(mut self) -> ExportStats {
        self.flush();
        let dropped = self.sender.dropped();
        let left = self.sender.shutdown(SHUTDOWN_WAIT).left;
        self.counters
            .errors
            .fetch_add(left as u64, Ordering::Relaxed);
        self.counters.stats(dropped)
    }

    fn enqueue(&self, message: Message) {
        if let Submitted::Dropped { .. } = self.sender.submit(message)
            && self.sender.dropped() == 1
        {
            warn!(
                "IPFIX to {}: queue full, dropping messages",
                self.config.collector
            );
        }
    }

    fn epoch_ms(&self, mono_ns: u64) -> u64 {
        (self.config.clock.epoch_secs(mono_ns) * 1000.0).round() as u64
    }

    fn export(
        &mut self,
        view: &View,
        nat: Option<&Translation>,
        reason: EndReason,
        now_ns: u64,
        last: bool,
    ) {
        let conn = view.conn;
        let prev = self.exported.get(&conn.key).copied().unwrap_or_default();
        let snap = conn.snap();
        let delta = |d: usize| {
            (
                snap.dir[d].pkts.saturating_sub(prev.packets[d]),
                snap.dir[d].ip_bytes.saturating_sub(prev.octets[d]),
            )
        };
        let deltas = [delta(0), delta(1)];
        let moved = |d: usize| deltas[d] != (0, 0);
        if !last && !moved(0) && !moved(1) {
            // Nothing new: the next export is due one timeout from now.
            if let Some(state) = self.exported.get_mut(&snap.key) {
                state.at_ns = now_ns;
            }
            return;
        }
        // (start, end) in epoch ms of the new packets of key direction d.
        let span = |d: usize| {
            let stats = &snap.dir[d];
            let start = if prev.packets[d] > 0 {
                stats.first_ns.max(prev.last_ns[d])
            } else {
                stats.first_ns
            };
            (start, stats.last_ns)
        };
        let orig = view.orig_dir;
        let (a, b) = conn.key_endpoints();
        let ends = [(a, b), (b, a)];
        let tcp = snap.key.proto == IPPROTO_TCP;
        let flags = |d: usize| if tcp { snap.dir[d].tcp_flags } else { 0 };
        let egress = |d: usize| {
            let (from_local, to_local) = view.local_from_to(d);
            from_local || (!to_local && d == orig)
        };
        let base = |d: usize, (start_ns, end_ns): (u64, u64)| {
            let (src, dst) = ends[d];
            let (src_port, dst_port, icmp_type_code) = ports(snap.key.proto, src.port, dst.port);
            let out = egress(d);
            Record {
                src: src.addr,
                dst: dst.addr,
                src_port,
                dst_port,
                proto: snap.key.proto,
                tcp_flags: flags(d),
                icmp_type_code,
                ingress_if: if out { 0 } else { snap.ifindex },
                egress_if: if out { snap.ifindex } else { 0 },
                direction: u8::from(out),
                end_reason: reason,
                octets: deltas[d].1,
                packets: deltas[d].0,
                start_ms: self.epoch_ms(start_ns),
                end_ms: self.epoch_ms(end_ns),
                reverse: None,
                nat: nat.map(|t| {
                    let (src, dst) = (t.translated(src), t.translated(dst));
                    let (src_port, dst_port, _) = ports(snap.key.proto, src.port, dst.port);
                    PostNat {
                        src: src.addr,
                        dst: dst.addr,
                        src_port,
                        dst_port,
                    }
                }),
            }
        };
        let quiet = (conn.last_ns(), conn.last_ns());
        let mut records = Vec::with_capacity(2);
        if self.config.biflow {
            let resp = 1 - orig;
            let spans: Vec<(u64, u64)> = [orig, resp]
                .into_iter()
                .filter(|&d| moved(d))
                .map(span)
                .collect();
            let start = spans.iter().map(|s| s.0).min().unwrap_or(quiet.0);
            let end = spans.iter().map(|s| s.1).max().unwrap_or(quiet.1);
            let mut record = base(orig, (start, end));
            record.reverse = Some(Reverse {
                octets: deltas[resp].1,
                packets: deltas[resp].0,
                tcp_flags: flags(resp),
            });
            records.push(record);
        } else {
            for d in [orig, 1 - orig] {
                if moved(d) {
                    records.push(base(d, span(d)));
                }
            }
            if records.is_empty() {
                records.push(base(orig, quiet));
            }
        }
        self.pending.extend(records);
        let state = self.exported.entry(snap.key).or_default();
        for d in 0..2 {
            state.packets[d] = snap.dir[d].pkts;
            state.octets[d] = snap.dir[d].ip_bytes;
            state.last_ns[d] = snap.dir[d].last_ns;
        }
        state.at_ns = now_ns;
    }
}

/// (source port, destination port, icmpTypeCode) of a record from a sender whose key port
/// is `src` to one whose key port is `dst`. ICMP keys hold the type and the counterpart
/// type or the code (see [`icmp_ports`]).
fn ports(proto: u8, src: u16, dst: u16) -> (u16, u16, u16) {
    if proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6 {
        return (src, dst, 0);
    }
    let icmp_type = src as u8;
    // A type with a counterpart keys the counterpart, not the code: the code is then 0.
    let paired = icmp_ports(proto, icmp_type, 0).1 == icmp_ports(proto, icmp_type, 1).1;
    let code = if paired { 0 } else { dst as u8 };
    let type_code = u16::from(icmp_type) << 8 | u16::from(code);
    (0, type_code, type_code)
}

/// Open connections are exported at their active timeout, finished ones once more;
/// what a poll queued is sent at its end.
impl Consumer for IpfixExporter {
    fn update(&mut self, conn: &ConnCtx, now: Now) {
        self.update(conn.view(), conn.translation(), now.mono_ns);
    }

    fn finish(&mut self, conn: &ConnCtx, now: Now, reason: EndReason) {
        self.finish(conn.view(), conn.translation(), reason, now.mono_ns);
    }

    fn next_due(&self, conn: &ConnCtx) -> Option<u64> {
        Some(self.next_due(conn.view()))
    }

    fn end_poll(&mut self, _open: &ConnTable, _local: &LocalNets, _now: Now) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, UdpSocket};

    use super::*;
    use monitor_common::{
        flow::{DirStats, FlowKey, tcp_flags},
        parse::IPPROTO_UDP,
    };

    use crate::{
        conntable::{Conn, LocalNets},
        poller::FlowSnapshot,
        worker::{Backoff, Deliver},
    };

    const SECOND: u64 = 1_000_000_000;
    /// Monotonic zero is 2026-11-24T00:00:00Z.
    const EPOCH_AT_ZERO_MS: u64 = 1_795_478_400_000;

    fn clock() -> Clock {
        Clock::with_offset_ns(EPOCH_AT_ZERO_MS as i128 * 1_000_000)
    }

    fn local() -> LocalNets {
        LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()])
    }

    fn dir(pkts: u64, ip_bytes: u64, first_s: u64, last_s: u64, flags: u8) -> DirStats {
        DirStats {
            pkts,
            ip_bytes,
            bytes: ip_bytes.saturating_sub(pkts * 40),
            first_ns: first_s * SECOND,
            last_ns: last_s * SECOND,
            tcp_flags: flags,
            ..DirStats::default()
        }
    }

    fn conn(proto: u8, a: &str, pa: u16, b: &str, pb: u16, dirs: [DirStats; 2]) -> Conn {
        let (a, b): (IpAddr, IpAddr) = (a.parse().unwrap(), b.parse().unwrap());
        let bytes = |ip: IpAddr| crate::addr::to_wire(ip).0;
        Conn::new(
            FlowSnapshot {
                key: FlowKey {
                    addr_a: bytes(a),
                    addr_b: bytes(b),
                    port_a: pa,
                    port_b: pb,
                    proto,
                    family: if a.is_ipv4() { 4 } else { 6 },
                    _pad: [0; 2],
                },
                dir: dirs,
                ifindex: 3,
            },
            "Ctest".parse().unwrap(),
        )
    }

    /// An exporter sending to a local UDP socket, returned to read the messages.
    fn exporter(biflow: bool) -> (IpfixExporter, UdpSocket) {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let collector = Collector::Udp(sink.local_addr().unwrap());
        let mut config = IpfixConfig::new(collector, clock());
        config.active_timeout = Duration::from_secs(10);
        config.biflow = biflow;
        (IpfixExporter::new(config).unwrap(), sink)
    }

    fn take(exporter: &mut IpfixExporter) -> Vec<Record> {
        std::mem::take(&mut exporter.pending)
    }

    #[test]
    fn deltas_sum_to_totals() {
        let (mut exporter, _sink) = exporter(false);
        let orig = "198.18.0.2";
        let resp = "203.0.113.9";
        use tcp_flags::{ACK, FIN, SYN};
        let mut c = conn(
            IPPROTO_TCP,
            resp,
            443,
            orig,
            40000,
            [dir(0, 0, 0, 0, 0), dir(1, 60, 100, 100, SYN)],
        );
        c.edit(|s| s.dir[1].syn_only = 1);
        // Before the active timeout: nothing.
        exporter.update(&local().view(&c), None, 105 * SECOND);
        assert!(take(&mut exporter).is_empty());
        let steps = [
            (111, [(5, 3000, 101, 111), (7, 500, 100, 110)]),
            (115, [(9, 5000, 101, 114), (9, 600, 100, 114)]),
            (122, [(9, 5000, 101, 114), (12, 900, 100, 121)]),
            (133, [(9, 5000, 101, 114), (12, 900, 100, 121)]),
        ];
        let mut all = Vec::new();
        for (now, [ab, ba]) in steps {
            c.edit(|s| {
                s.dir[0] = dir(ab.0, ab.1, ab.2, ab.3, SYN | ACK);
                s.dir[1] = DirStats {
                    syn_only: 1,
                    ..dir(ba.0, ba.1, ba.2, ba.3, SYN | ACK)
                };
            });
            exporter.update(&local().view(&c), None, now * SECOND);
            all.extend(take(&mut exporter));
        }
        // 111: both directions; 115: not due; 122: both again; 133: due, nothing new.
        assert_eq!(all.len(), 4, "{all:#?}");
        assert!(all.iter().all(|r| r.end_reason == EndReason::ActiveTimeout));
        assert_eq!(
            all[0].src,
            orig.parse::<IpAddr>().unwrap(),
            "originator first"
        );
        assert_eq!((all[0].direction, all[0].egress_if), (1, 3));
        assert_eq!((all[1].direction, all[1].ingress_if), (0, 3));
        assert_eq!(all[2].src, orig.parse::<IpAddr>().unwrap());
        assert_eq!(
            (all[2].start_ms, all[2].end_ms),
            (EPOCH_AT_ZERO_MS + 110_000, EPOCH_AT_ZERO_MS + 121_000),
            "a later export starts at the previous one's last packet"
        );
        c.edit(|s| {
            s.dir[0] = dir(11, 5100, 101, 140, SYN | ACK | FIN);
            s.dir[1] = dir(14, 1000, 100, 140, SYN | ACK | FIN);
        });
        exporter.finish(&local().view(&c), None, EndReason::EndOfFlow, 146 * SECOND);
        let last = take(&mut exporter);
        assert_eq!(last.len(), 2);
        assert!(last.iter().all(|r| r.end_reason == EndReason::EndOfFlow));
        assert_eq!(last[0].tcp_flags, SYN | ACK | FIN);
        all.extend(last);
        let sum = |src: &str| {
            all.iter()
                .filter(|r| r.src == src.parse::<IpAddr>().unwrap())
                .fold((0, 0), |(p, o), r| (p + r.packets, o + r.octets))
        };
        assert_eq!(sum(orig), (14, 1000));
        assert_eq!(sum(resp), (11, 5100));
        assert_eq!(exporter.tracked(), 0, "finish forgets the connection");

        // Finished with nothing left: one zero record carries the reason.
        exporter.update(&local().view(&c), None, 200 * SECOND);
        take(&mut exporter);
        exporter.finish(&local().view(&c), None, EndReason::Idle, 300 * SECOND);
        let last = take(&mut exporter);
        assert_eq!(last.len(), 1);
        assert_eq!((last[0].packets, last[0].octets), (0, 0));
        assert_eq!(last[0].end_reason, EndReason::Idle);
    }

    #[test]
    fn end_reasons_icmp_and_biflow() {
        let (mut exporter, _sink) = exporter(true);
        // Echo request from a local host and its reply.
        let ping = conn(
            IPPROTO_ICMP,
            "198.18.0.2",
            8,
            "203.0.113.9",
            0,
            [dir(3, 252, 1, 3, 0), dir(2, 168, 1, 2, 0)],
        );
        for reason in [
            EndReason::Idle,
            EndReason::EndOfFlow,
            EndReason::ForcedEnd,
            EndReason::LackOfResources,
        ] {
            exporter.finish(&local().view(&ping), None, reason, 10 * SECOND);
            let records = take(&mut exporter);
            assert_eq!(records.len(), 1, "one biflow record");
            let r = &records[0];
            assert_eq!(r.end_reason as u8, reason as u8);
            assert_eq!(
                (r.src_port, r.dst_port, r.icmp_type_code),
                (0, 0x0800, 0x0800)
            );
            assert_eq!((r.packets, r.octets), (3, 252));
            assert_eq!(
                r.reverse,
                Some(Reverse {
                    octets: 168,
                    packets: 2,
                    tcp_flags: 0
                })
            );
            assert_eq!(
                (r.start_ms, r.end_ms),
                (EPOCH_AT_ZERO_MS + 1000, EPOCH_AT_ZERO_MS + 3000)
            );
        }
        assert_eq!(
            [1, 2, 3, 4, 5],
            [
                EndReason::Idle,
                EndReason::ActiveTimeout,
                EndReason::EndOfFlow,
                EndReason::ForcedEnd,
                EndReason::LackOfResources
            ]
            .map(|r| r as u8)
        );
        // Destination unreachable (type 3, code 1) keys the code.
        assert_eq!(ports(IPPROTO_ICMP, 3, 1), (0, 0x0301, 0x0301));
        assert_eq!(ports(IPPROTO_ICMPV6, 129, 128), (0, 0x8100, 0x8100));
        assert_eq!(ports(IPPROTO_UDP, 5353, 53), (5353, 53, 0));
    }

    #[test]
    fn sends_over_udp_and_counts() {
        let (mut exporter, sink) = exporter(false);
        let udp = conn(
            IPPROTO_UDP,
            "198.18.0.2",
            5353,
            "2001:db8::1",
            53,
            [dir(1, 80, 1, 1, 0), dir(1, 120, 1, 1, 0)],
        );
        exporter.finish(&local().view(&udp), None, EndReason::Idle, 2 * SECOND);
        exporter.flush();
        let mut buf = [0; 2048];
        let n = sink.recv(&mut buf).expect("templates at start");
        assert_eq!(u16::from_be_bytes([buf[16], buf[17]]), TEMPLATE_SET_ID);
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]) as usize, n);
        let n = sink.recv(&mut buf).expect("data");
        assert_eq!(n, 16 + 4 + 2 * 58);
        let stats = exporter.shutdown();
        assert_eq!(
            stats,
            ExportStats {
                records: 2,
                messages: 2,
                errors: 0,
                dropped: 0
            }
        );
    }

    const AWAY_BACKOFF: Backoff = Backoff {
        min: Duration::from_secs(1),
        max: Duration::from_secs(1),
    };

    /// A collector that never takes a message.
    struct Away;

    impl Deliver for Away {
        type Item = Message;

        fn deliver(&mut self, _: &Message) -> std::io::Result<()> {
            Err(std::io::ErrorKind::ConnectionRefused.into())
        }
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let (mut exporter, _sink) = exporter(false);
        // Room for one message, which a collector that is away never takes.
        exporter.sender = Worker::spawn("ipfix-test".into(), 1, AWAY_BACKOFF, Away).unwrap();
        let c = conn(
            IPPROTO_UDP,
            "198.18.0.2",
            1,
            "203.0.113.9",
            2,
            [dir(1, 80, 1, 1, 0), dir(0, 0, 0, 0, 0)],
        );
        for _ in 0..5 {
            exporter.finish(&local().view(&c), None, EndReason::Idle, 2 * SECOND);
            exporter.flush();
        }
        let stats = exporter.stats();
        assert_eq!((stats.dropped, stats.errors), (4, 4), "{stats:?}");
        // The sequence numbers still count the dropped records: the collector sees a gap.
        assert_eq!(exporter.encoder.sequence(), 5);
    }
}
