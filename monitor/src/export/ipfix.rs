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
//! - **Messages** stay within [`MAX_MESSAGE`] bytes; the sequence number is the count of
//!   data records encoded before the message in this observation domain (a message
//!   dropped on a full queue shows as a gap, as RFC 7011 intends); templates go out first,
//!   then every `template_refresh`.
//! - **Never blocks**: [`IpfixExporter::flush`] encodes and hands the messages to a sender
//!   thread through a bounded queue; a full queue drops the message and counts it.

use std::{
    collections::HashMap,
    fmt,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::warn;
use monitor_common::{
    flow::FlowKey,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, icmp_ports},
};

use crate::{
    clock::Clock,
    conntable::{Conn, LocalNets},
};

pub const VERSION: u16 = 10;
/// No message is longer (a safe payload on any path with a 1,500-byte MTU).
pub const MAX_MESSAGE: usize = 1400;
/// Private enterprise number of RFC 5103's reverse information elements.
pub const REVERSE_PEN: u32 = 29305;
pub const TEMPLATE_SET_ID: u16 = 2;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
pub const TEMPLATE_BIFLOW_V4: u16 = 258;
pub const TEMPLATE_BIFLOW_V6: u16 = 259;
/// Messages waiting for the sender thread before new ones are dropped.
pub const DEFAULT_QUEUE: usize = 1024;

const HEADER_LEN: usize = 16;
const SET_HEADER_LEN: usize = 4;
/// How long [`IpfixExporter::shutdown`] waits at most for the queue to drain.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// IANA information element ids.
pub mod ie {
    pub const OCTET_DELTA_COUNT: u16 = 1;
    pub const PACKET_DELTA_COUNT: u16 = 2;
    pub const PROTOCOL_IDENTIFIER: u16 = 4;
    pub const TCP_CONTROL_BITS: u16 = 6;
    pub const SOURCE_TRANSPORT_PORT: u16 = 7;
    pub const SOURCE_IPV4_ADDRESS: u16 = 8;
    pub const INGRESS_INTERFACE: u16 = 10;
    pub const DESTINATION_TRANSPORT_PORT: u16 = 11;
    pub const DESTINATION_IPV4_ADDRESS: u16 = 12;
    pub const EGRESS_INTERFACE: u16 = 14;
    pub const SOURCE_IPV6_ADDRESS: u16 = 27;
    pub const DESTINATION_IPV6_ADDRESS: u16 = 28;
    pub const ICMP_TYPE_CODE_IPV4: u16 = 32;
    pub const FLOW_DIRECTION: u16 = 61;
    pub const FLOW_END_REASON: u16 = 136;
    pub const ICMP_TYPE_CODE_IPV6: u16 = 139;
    pub const FLOW_START_MILLISECONDS: u16 = 152;
    pub const FLOW_END_MILLISECONDS: u16 = 153;
}

/// flowEndReason (IANA registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndReason {
    Idle = 1,
    ActiveTimeout = 2,
    EndOfFlow = 3,
    ForcedEnd = 4,
    LackOfResources = 5,
}

/// One field specifier of a template: element id, length, enterprise (0 for IANA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub id: u16,
    pub len: u16,
    pub pen: u32,
}

const fn iana(id: u16, len: u16) -> Field {
    Field { id, len, pen: 0 }
}

const fn reverse(id: u16, len: u16) -> Field {
    Field {
        id,
        len,
        pen: REVERSE_PEN,
    }
}

/// The fields of a template, in wire order; a record is encoded by walking them.
pub fn template_fields(v6: bool, biflow: bool) -> Vec<Field> {
    use ie::*;
    let mut fields = if v6 {
        vec![
            iana(SOURCE_IPV6_ADDRESS, 16),
            iana(DESTINATION_IPV6_ADDRESS, 16),
        ]
    } else {
        vec![
            iana(SOURCE_IPV4_ADDRESS, 4),
            iana(DESTINATION_IPV4_ADDRESS, 4),
        ]
    };
    let icmp = if v6 {
        ICMP_TYPE_CODE_IPV6
    } else {
        ICMP_TYPE_CODE_IPV4
    };
    fields.extend([
        iana(SOURCE_TRANSPORT_PORT, 2),
        iana(DESTINATION_TRANSPORT_PORT, 2),
        iana(PROTOCOL_IDENTIFIER, 1),
        iana(TCP_CONTROL_BITS, 1),
        iana(icmp, 2),
        iana(INGRESS_INTERFACE, 4),
        iana(EGRESS_INTERFACE, 4),
        iana(FLOW_DIRECTION, 1),
        iana(FLOW_END_REASON, 1),
        iana(OCTET_DELTA_COUNT, 8),
        iana(PACKET_DELTA_COUNT, 8),
        iana(FLOW_START_MILLISECONDS, 8),
        iana(FLOW_END_MILLISECONDS, 8),
    ]);
    if biflow {
        fields.extend([
            reverse(OCTET_DELTA_COUNT, 8),
            reverse(PACKET_DELTA_COUNT, 8),
            reverse(TCP_CONTROL_BITS, 1),
        ]);
    }
    fields
}

fn template_id(v6: bool, biflow: bool) -> u16 {
    match (v6, biflow) {
        (false, false) => TEMPLATE_V4,
        (true, false) => TEMPLATE_V6,
        (false, true) => TEMPLATE_BIFLOW_V4,
        (true, true) => TEMPLATE_BIFLOW_V6,
    }
}

fn record_len(v6: bool, biflow: bool) -> usize {
    template_fields(v6, biflow)
        .iter()
        .map(|f| usize::from(f.len))
        .sum()
}

/// The reverse direction of a biflow record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverse {
    pub octets: u64,
    pub packets: u64,
    pub tcp_flags: u8,
}

/// One data record before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Both of the same family.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub icmp_type_code: u16,
    pub ingress_if: u32,
    pub egress_if: u32,
    /// 0 ingress, 1 egress.
    pub direction: u8,
    pub end_reason: EndReason,
    pub octets: u64,
    pub packets: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Set for biflow records (RFC 5103).
    pub reverse: Option<Reverse>,
}

impl Record {
    fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    fn template_id(&self) -> u16 {
        template_id(self.v6(), self.reverse.is_some())
    }

    fn encoded_len(&self) -> usize {
        record_len(self.v6(), self.reverse.is_some())
    }

    fn write(&self, out: &mut Vec<u8>) {
        for field in template_fields(self.v6(), self.reverse.is_some()) {
            self.write_field(field, out);
        }
    }

    fn write_field(&self, field: Field, out: &mut Vec<u8>) {
        use ie::*;
        let rev = self.reverse.unwrap_or_default();
        let addr = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let bytes = match (field.pen, field.id) {
            (REVERSE_PEN, OCTET_DELTA_COUNT) => rev.octets.to_be_bytes().to_vec(),
            (REVERSE_PEN, PACKET_DELTA_COUNT) => rev.packets.to_be_bytes().to_vec(),
            (REVERSE_PEN, TCP_CONTROL_BITS) => vec![rev.tcp_flags],
            (_, SOURCE_IPV4_ADDRESS | SOURCE_IPV6_ADDRESS) => addr(self.src),
            (_, DESTINATION_IPV4_ADDRESS | DESTINATION_IPV6_ADDRESS) => addr(self.dst),
            (_, SOURCE_TRANSPORT_PORT) => self.src_port.to_be_bytes().to_vec(),
            (_, DESTINATION_TRANSPORT_PORT) => self.dst_port.to_be_bytes().to_vec(),
            (_, PROTOCOL_IDENTIFIER) => vec![self.proto],
            (_, TCP_CONTROL_BITS) => vec![self.tcp_flags],
            (_, ICMP_TYPE_CODE_IPV4 | ICMP_TYPE_CODE_IPV6) => {
                self.icmp_type_code.to_be_bytes().to_vec()
            }
            (_, INGRESS_INTERFACE) => self.ingress_if.to_be_bytes().to_vec(),
            (_, EGRESS_INTERFACE) => self.egress_if.to_be_bytes().to_vec(),
            (_, FLOW_DIRECTION) => vec![self.direction],
            (_, FLOW_END_REASON) => vec![self.end_reason as u8],
            (_, OCTET_DELTA_COUNT) => self.octets.to_be_bytes().to_vec(),
            (_, PACKET_DELTA_COUNT) => self.packets.to_be_bytes().to_vec(),
            (_, FLOW_START_MILLISECONDS) => self.start_ms.to_be_bytes().to_vec(),
            (_, FLOW_END_MILLISECONDS) => self.end_ms.to_be_bytes().to_vec(),
            _ => unreachable!("field {field:?} is in no template"),
        };
        debug_assert_eq!(bytes.len(), usize::from(field.len), "{field:?}");
        out.extend_from_slice(&bytes);
    }
}

/// One encoded IPFIX message and the number of data records in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub records: u32,
}

/// Records to messages, with the sequence number and template timing of one observation
/// domain. No I/O.
#[derive(Debug)]
pub struct Encoder {
    domain_id: u32,
    biflow: bool,
    template_refresh: Duration,
    /// Data records encoded so far (mod 2^32).
    sequence: u32,
    /// Export time (epoch ms) the templates were last sent at.
    templates_at: Option<u64>,
}

impl Encoder {
    pub fn new(domain_id: u32, biflow: bool, template_refresh: Duration) -> Self {
        Self {
            domain_id,
            biflow,
            template_refresh,
            sequence: 0,
            templates_at: None,
        }
    }

    /// Makes the next message start with the templates (after a reconnect).
    pub fn resend_templates(&mut self) {
        self.templates_at = None;
    }

    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    fn templates_due(&self, now_ms: u64) -> bool {
        self.templates_at.is_none_or(|at| {
            Duration::from_millis(now_ms.saturating_sub(at)) >= self.template_refresh
        })
    }

    /// The template set for the current mode: IPv4 and IPv6.
    pub fn template_set(&self) -> Vec<u8> {
        let mut set = Vec::new();
        set.extend_from_slice(&TEMPLATE_SET_ID.to_be_bytes());
        set.extend_from_slice(&[0, 0]);
        for v6 in [false, true] {
            let fields = template_fields(v6, self.biflow);
            set.extend_from_slice(&template_id(v6, self.biflow).to_be_bytes());
            set.extend_from_slice(&(fields.len() as u16).to_be_bytes());
            for f in fields {
                if f.pen == 0 {
                    set.extend_from_slice(&f.id.to_be_bytes());
                    set.extend_from_slice(&f.len.to_be_bytes());
                } else {
                    set.extend_from_slice(&(f.id | 0x8000).to_be_bytes());
                    set.extend_from_slice(&f.len.to_be_bytes());
                    set.extend_from_slice(&f.pen.to_be_bytes());
                }
            }
        }
        let len = set.len() as u16;
        set[2..4].copy_from_slice(&len.to_be_bytes());
        set
    }

    /// Encodes `records` (grouped by template) into messages of at most [`MAX_MESSAGE`]
    /// bytes exported at `now_ms` (epoch ms). The first message starts with the templates
    /// when they are due; with no records, that is a message of templates alone.
    pub fn encode(&mut self, records: &[Record], now_ms: u64) -> Vec<Message> {
        let mut order: Vec<&Record> = records.iter().collect();
        order.sort_by_key(|r| r.template_id());
        let mut messages = Vec::new();
        let mut next = 0;
        loop {
            let mut buf = vec![0; HEADER_LEN];
            if self.templates_due(now_ms) {
                buf.extend(self.template_set());
                self.templates_at = Some(now_ms);
            }
            let mut count = 0u32;
            // (template id, offset of the set header)
            let mut set: Option<(u16, usize)> = None;
            while let Some(record) = order.get(next) {
                let id = record.template_id();
                let open = set.is_some_and(|(open, _)| open == id);
                let need = record.encoded_len() + if open { 0 } else { SET_HEADER_LEN };
                if buf.len() + need > MAX_MESSAGE && buf.len() > HEADER_LEN {
                    break;
                }
                if !open {
                    close_set(&mut buf, set);
                    set = Some((id, buf.len()));
                    buf.extend_from_slice(&id.to_be_bytes());
                    buf.extend_from_slice(&[0, 0]);
                }
                record.write(&mut buf);
                count += 1;
                next += 1;
            }
            close_set(&mut buf, set);
            if buf.len() > HEADER_LEN {
                let len = buf.len() as u16;
                buf[0..2].copy_from_slice(&VERSION.to_be_bytes());
                buf[2..4].copy_from_slice(&len.to_be_bytes());
                buf[4..8].copy_from_slice(&((now_ms / 1000) as u32).to_be_bytes());
                buf[8..12].copy_from_slice(&self.sequence.to_be_bytes());
                buf[12..16].copy_from_slice(&self.domain_id.to_be_bytes());
                self.sequence = self.sequence.wrapping_add(count);
                messages.push(Message {
                    bytes: buf,
                    records: count,
                });
            }
            if next >= order.len() {
                return messages;
            }
        }
    }
}

fn close_set(buf: &mut [u8], set: Option<(u16, usize)>) {
    if let Some((_, start)) = set {
        let len = (buf.len() - start) as u16;
        buf[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// Where messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collector {
    Udp(SocketAddr),
}

impl FromStr for Collector {
    type Err = String;

    /// `udp://HOST:PORT` (the host is resolved once, here).
    fn from_str(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?}: expected udp://HOST:PORT"))?;
        let resolve = || {
            rest.to_socket_addrs()
                .map_err(|e| format!("{url:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{url:?}: no address"))
        };
        match scheme {
            "udp" => Ok(Self::Udp(resolve()?)),
            "tcp" => Err(format!("{url:?}: TCP transport is not supported yet")),
            _ => Err(format!("{url:?}: unknown scheme {scheme:?} (udp)")),
        }
    }
}

impl fmt::Display for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Udp(addr) => write!(f, "udp://{addr}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct IpfixConfig {
    pub collector: Collector,
    pub domain_id: u32,
    /// An open connection is exported at least this often.
    pub active_timeout: Duration,
    pub template_refresh: Duration,
    pub biflow: bool,
    /// Decides flowDirection.
    pub local: LocalNets,
    /// Kernel timestamps to epoch time.
    pub clock: Clock,
    /// Messages waiting to be sent before new ones are dropped (at least 1).
    pub queue: usize,
}

impl IpfixConfig {
    /// SPEC defaults: active timeout and template refresh 60 s, domain 1, unidirectional.
    pub fn new(collector: Collector, local: LocalNets, clock: Clock) -> Self {
        Self {
            collector,
            domain_id: 1,
            active_timeout: Duration::from_secs(60),
            template_refresh: Duration::from_secs(60),
            biflow: false,
            local,
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
    /// Messages dropped on a full queue plus failed sends (`ipfix_export_errors_total`).
    pub errors: u64,
    /// Of `errors`, the drops.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    messages: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
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
    queue: Option<SyncSender<Message>>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the sender thread ends: a bounded join.
    done: Mutex<Receiver<()>>,
}

impl IpfixExporter {
    /// Opens the socket, starts the sender thread and queues the templates.
    pub fn new(config: IpfixConfig) -> std::io::Result<Self> {
        let Collector::Udp(addr) = config.collector;
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(addr)?;
        let (tx, rx) = mpsc::sync_channel::<Message>(config.queue.max(1));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let collector = config.collector.to_string();
        let thread = thread::Builder::new().name("ipfix".into()).spawn(move || {
            let _done = done_tx;
            send_loop(&socket, &rx, &thread_counters, &collector);
        })?;
        let mut exporter = Self {
            encoder: Encoder::new(config.domain_id, config.biflow, config.template_refresh),
            config,
            exported: HashMap::new(),
            pending: Vec::new(),
            queue: Some(tx),
            counters,
            thread: Some(thread),
            done: Mutex::new(done_rx),
        };
        exporter.flush();
        Ok(exporter)
    }

    /// For an open connection at kernel time `now_ns`: queues its deltas (reason "active
    /// timeout") when the active timeout has passed since its previous export or its first
    /// packet.
    pub fn update(&mut self, conn: &Conn, now_ns: u64) {
        let first = conn.first_ns();
        let at = self
            .exported
            .entry(conn.snap.key)
            .or_insert_with(|| Exported {
                at_ns: first,
                ..Exported::default()
            })
            .at_ns;
        let timeout = self.config.active_timeout.as_nanos() as u64;
        if now_ns.saturating_sub(at) >= timeout {
            self.export(conn, EndReason::ActiveTimeout, now_ns, false);
        }
    }

    /// For a finished connection: queues what is left with `reason` and forgets it.
    pub fn finish(&mut self, conn: &Conn, reason: EndReason, now_ns: u64) {
        self.export(conn, reason, now_ns, true);
        self.exported.remove(&conn.snap.key);
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
        let c = &self.counters;
        ExportStats {
            records: c.records.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Flushes, then waits (at most a couple of seconds) for the queue to be sent.
    pub fn shutdown(mut self) -> ExportStats {
        self.flush();
        self.queue = None;
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(mpsc::RecvTimeoutError::Disconnected) = done.recv_timeout(SHUTDOWN_WAIT)
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
        drop(done);
        self.stats()
    }

    fn enqueue(&mut self, message: Message) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let c = &self.counters;
                if c.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(
                        "IPFIX to {}: queue full, dropping messages",
                        self.config.collector
                    );
                }
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn epoch_ms(&self, mono_ns: u64) -> u64 {
        (self.config.clock.epoch_secs(mono_ns) * 1000.0).round() as u64
    }

    fn export(&mut self, conn: &Conn, reason: EndReason, now_ns: u64, last: bool) {
        let prev = self
            .exported
            .get(&conn.snap.key)
            .copied()
            .unwrap_or_default();
        let snap = &conn.snap;
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
        let orig = conn.orig_dir();
        let (a, b) = conn.key_endpoints();
        let ends = [(a, b), (b, a)];
        let tcp = snap.key.proto == IPPROTO_TCP;
        let flags = |d: usize| if tcp { snap.dir[d].tcp_flags } else { 0 };
        let local = &self.config.local;
        let egress = |d: usize| {
            let (src, dst) = ends[d];
            local.contains(src.addr) || (!local.contains(dst.addr) && d == orig)
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

impl Drop for IpfixExporter {
    /// Stops the sender thread after what is queued, without waiting for it.
    fn drop(&mut self) {
        self.queue = None;
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

fn send_loop(socket: &UdpSocket, queue: &Receiver<Message>, counters: &Counters, to: &str) {
    let mut failing = false;
    while let Ok(message) = queue.recv() {
        match socket.send(&message.bytes) {
            Ok(_) => {
                counters.messages.fetch_add(1, Ordering::Relaxed);
                counters
                    .records
                    .fetch_add(u64::from(message.records), Ordering::Relaxed);
                failing = false;
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                if !failing && e.kind() != ErrorKind::WouldBlock {
                    warn!("IPFIX to {to}: {e}");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::{
        flow::{DirStats, FlowKey, tcp_flags},
        parse::IPPROTO_UDP,
    };

    use crate::poller::FlowSnapshot;

    const SECOND: u64 = 1_000_000_000;
    /// Monotonic zero is 2026-11-24T00:00:00Z.
    const EPOCH_AT_ZERO_MS: u64 = 1_795_478_400_000;

    fn clock() -> Clock {
        Clock::with_offset_ns(EPOCH_AT_ZERO_MS as i128 * 1_000_000)
    }

    fn v4_record() -> Record {
        Record {
            src: "198.18.0.2".parse().unwrap(),
            dst: "203.0.113.9".parse().unwrap(),
            src_port: 40000,
            dst_port: 443,
            proto: IPPROTO_TCP,
            tcp_flags: 0x1b,
            icmp_type_code: 0,
            ingress_if: 0,
            egress_if: 3,
            direction: 1,
            end_reason: EndReason::EndOfFlow,
            octets: 1500,
            packets: 10,
            start_ms: 0x0102_0304_0506,
            end_ms: 0x0102_0304_0607,
            reverse: None,
        }
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
        let bytes = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => {
                let mut out = [0; 16];
                out[..4].copy_from_slice(&v4.octets());
                out
            }
            IpAddr::V6(v6) => v6.octets(),
        };
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
        let mut config = IpfixConfig::new(
            collector,
            LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()]),
            clock(),
        );
        config.active_timeout = Duration::from_secs(10);
        config.biflow = biflow;
        (IpfixExporter::new(config).unwrap(), sink)
    }

    fn take(exporter: &mut IpfixExporter) -> Vec<Record> {
        std::mem::take(&mut exporter.pending)
    }

    #[test]
    fn header_template_and_record_bytes() {
        let mut encoder = Encoder::new(7, false, Duration::from_secs(60));
        let now_ms = 1_700_000_000_123;
        let messages = encoder.encode(&[v4_record()], now_ms);
        assert_eq!(messages.len(), 1);
        let bytes = &messages[0].bytes;
        // header 16 + template set (4 + 2 * (4 + 15 * 4)) + data set (4 + 58)
        assert_eq!(bytes.len(), 16 + 132 + 62);
        #[rustfmt::skip]
        let header = [
            0x00, 0x0a, 0x00, 0xd2,             // version 10, length 210
            0x65, 0x53, 0xf1, 0x00,             // export time 1,700,000,000 s
            0x00, 0x00, 0x00, 0x00,             // sequence 0
            0x00, 0x00, 0x00, 0x07,             // domain 7
        ];
        assert_eq!(&bytes[..16], &header);
        #[rustfmt::skip]
        let template_v4 = [
            0x00, 0x02, 0x00, 0x84,             // template set, length 132
            0x01, 0x00, 0x00, 0x0f,             // template 256, 15 fields
            0x00, 0x08, 0x00, 0x04,             // sourceIPv4Address
            0x00, 0x0c, 0x00, 0x04,             // destinationIPv4Address
            0x00, 0x07, 0x00, 0x02,             // sourceTransportPort
            0x00, 0x0b, 0x00, 0x02,             // destinationTransportPort
            0x00, 0x04, 0x00, 0x01,             // protocolIdentifier
            0x00, 0x06, 0x00, 0x01,             // tcpControlBits, reduced to 1 octet
            0x00, 0x20, 0x00, 0x02,             // icmpTypeCodeIPv4
            0x00, 0x0a, 0x00, 0x04,             // ingressInterface
            0x00, 0x0e, 0x00, 0x04,             // egressInterface
            0x00, 0x3d, 0x00, 0x01,             // flowDirection
            0x00, 0x88, 0x00, 0x01,             // flowEndReason
            0x00, 0x01, 0x00, 0x08,             // octetDeltaCount
            0x00, 0x02, 0x00, 0x08,             // packetDeltaCount
            0x00, 0x98, 0x00, 0x08,             // flowStartMilliseconds
            0x00, 0x99, 0x00, 0x08,             // flowEndMilliseconds
        ];
        assert_eq!(&bytes[16..16 + 68], &template_v4);
        // the IPv6 template: 257, 15 fields, addresses 27/28 of 16 octets, icmp 139
        assert_eq!(&bytes[84..96], &[1, 1, 0, 15, 0, 27, 0, 16, 0, 28, 0, 16]);
        assert_eq!(&bytes[112..116], &[0, 139, 0, 2]);
        #[rustfmt::skip]
        let data = [
            0x01, 0x00, 0x00, 0x3e,             // set 256, length 62
            198, 18, 0, 2,                      // source
            203, 0, 113, 9,                     // destination
            0x9c, 0x40, 0x01, 0xbb,             // ports 40000 -> 443
            0x06, 0x1b,                         // TCP, flags FIN SYN PSH ACK
            0x00, 0x00,                         // icmpTypeCode
            0x00, 0x00, 0x00, 0x00,             // ingressInterface
            0x00, 0x00, 0x00, 0x03,             // egressInterface
            0x01, 0x03,                         // egress, end of flow
            0, 0, 0, 0, 0, 0, 0x05, 0xdc,       // 1500 octets
            0, 0, 0, 0, 0, 0, 0x00, 0x0a,       // 10 packets
            0, 0, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, // start
            0, 0, 0x01, 0x02, 0x03, 0x04, 0x06, 0x07, // end
        ];
        assert_eq!(&bytes[148..], &data);
        assert_eq!(messages[0].records, 1);
    }

    #[test]
    fn biflow_template_uses_reverse_elements() {
        let encoder = Encoder::new(1, true, Duration::from_secs(60));
        let set = encoder.template_set();
        // v4: 4 + 15 * 4 + 3 * 8; two templates
        assert_eq!(set.len(), 4 + 2 * (4 + 60 + 24));
        assert_eq!(&set[4..8], &[1, 2, 0, 18]);
        #[rustfmt::skip]
        let reverse = [
            0x80, 0x01, 0x00, 0x08, 0x00, 0x00, 0x72, 0x79, // reverseOctetDeltaCount
            0x80, 0x02, 0x00, 0x08, 0x00, 0x00, 0x72, 0x79, // reversePacketDeltaCount
            0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x72, 0x79, // reverseTcpControlBits
        ];
        assert_eq!(&set[68..92], &reverse);
        let mut record = v4_record();
        record.reverse = Some(Reverse {
            octets: 0x0203,
            packets: 4,
            tcp_flags: 0x12,
        });
        let mut out = Vec::new();
        record.write(&mut out);
        assert_eq!(out.len(), 58 + 17);
        assert_eq!(
            &out[58..],
            &[0, 0, 0, 0, 0, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 4, 0x12]
        );
    }

    #[test]
    fn splits_under_1400_bytes_with_sequence_numbers() {
        let mut encoder = Encoder::new(1, false, Duration::from_secs(60));
        let mut v6 = v4_record();
        v6.src = "2001:db8::1".parse().unwrap();
        v6.dst = "2001:db8::2".parse().unwrap();
        let records: Vec<Record> = (0..60)
            .map(|i| if i % 3 == 0 { v6.clone() } else { v4_record() })
            .collect();
        let messages = encoder.encode(&records, 1_000);
        assert!(messages.len() > 1, "60 records must not fit one message");
        let mut seq = 0u32;
        let mut total = 0;
        for (i, m) in messages.iter().enumerate() {
            assert!(
                m.bytes.len() <= MAX_MESSAGE,
                "message {i}: {}",
                m.bytes.len()
            );
            let len = u16::from_be_bytes([m.bytes[2], m.bytes[3]]) as usize;
            assert_eq!(len, m.bytes.len(), "message {i} length field");
            let got = u32::from_be_bytes(m.bytes[8..12].try_into().unwrap());
            assert_eq!(got, seq, "message {i} sequence number");
            // The sets fill the message exactly, each with a valid length.
            let mut off = HEADER_LEN;
            let mut in_sets = 0;
            while off < m.bytes.len() {
                let id = u16::from_be_bytes([m.bytes[off], m.bytes[off + 1]]);
                let set_len = u16::from_be_bytes([m.bytes[off + 2], m.bytes[off + 3]]) as usize;
                assert!(
                    set_len >= 4 && off + set_len <= m.bytes.len(),
                    "message {i}"
                );
                let rec = match id {
                    TEMPLATE_V4 => 58,
                    TEMPLATE_V6 => 82,
                    TEMPLATE_SET_ID => {
                        off += set_len;
                        continue;
                    }
                    other => panic!("unexpected set {other}"),
                };
                assert_eq!((set_len - 4) % rec, 0, "set {id} of message {i}");
                in_sets += (set_len - 4) / rec;
                off += set_len;
            }
            assert_eq!(in_sets as u32, m.records, "message {i} record count");
            // Full: the next record would not have fitted.
            if i + 1 < messages.len() {
                assert!(m.bytes.len() + 82 + 4 > MAX_MESSAGE, "message {i} not full");
            }
            seq += m.records;
            total += m.records;
        }
        assert_eq!(total, 60);
        assert_eq!(encoder.sequence(), 60);
        // The next message continues the count.
        let next = encoder.encode(&[v4_record()], 2_000);
        assert_eq!(&next[0].bytes[8..12], &60u32.to_be_bytes());
    }

    #[test]
    fn templates_first_then_on_refresh() {
        let mut encoder = Encoder::new(1, false, Duration::from_secs(60));
        let has_templates =
            |m: &Message| u16::from_be_bytes([m.bytes[16], m.bytes[17]]) == TEMPLATE_SET_ID;
        let start = encoder.encode(&[], 1_000_000);
        assert_eq!(start.len(), 1, "templates alone at start");
        assert!(has_templates(&start[0]));
        assert_eq!(start[0].records, 0);
        assert!(encoder.encode(&[], 1_030_000).is_empty(), "nothing due");
        let m = encoder.encode(&[v4_record()], 1_059_999);
        assert!(!has_templates(&m[0]), "refresh not due before 60 s");
        let m = encoder.encode(&[v4_record()], 1_060_000);
        assert!(has_templates(&m[0]), "refresh due after 60 s");
        assert_eq!(m[0].records, 1);
        let m = encoder.encode(&[], 1_120_000);
        assert_eq!(m.len(), 1, "refresh with no data");
        encoder.resend_templates();
        assert!(has_templates(&encoder.encode(&[v4_record()], 1_120_001)[0]));
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
        c.snap.dir[1].syn_only = 1;
        // Before the active timeout: nothing.
        exporter.update(&c, 105 * SECOND);
        assert!(take(&mut exporter).is_empty());
        let steps = [
            (111, [(5, 3000, 101, 111), (7, 500, 100, 110)]),
            (115, [(9, 5000, 101, 114), (9, 600, 100, 114)]),
            (122, [(9, 5000, 101, 114), (12, 900, 100, 121)]),
            (133, [(9, 5000, 101, 114), (12, 900, 100, 121)]),
        ];
        let mut all = Vec::new();
        for (now, [ab, ba]) in steps {
            c.snap.dir[0] = dir(ab.0, ab.1, ab.2, ab.3, SYN | ACK);
            c.snap.dir[1] = DirStats {
                syn_only: 1,
                ..dir(ba.0, ba.1, ba.2, ba.3, SYN | ACK)
            };
            exporter.update(&c, now * SECOND);
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
        c.snap.dir[0] = dir(11, 5100, 101, 140, SYN | ACK | FIN);
        c.snap.dir[1] = dir(14, 1000, 100, 140, SYN | ACK | FIN);
        exporter.finish(&c, EndReason::EndOfFlow, 146 * SECOND);
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
        exporter.update(&c, 200 * SECOND);
        take(&mut exporter);
        exporter.finish(&c, EndReason::Idle, 300 * SECOND);
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
            exporter.finish(&ping, reason, 10 * SECOND);
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
        exporter.finish(&udp, EndReason::Idle, 2 * SECOND);
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

    #[test]
    fn full_queue_drops_and_counts() {
        let (mut exporter, _sink) = exporter(false);
        // A queue of one message that nobody reads.
        let (tx, _rx) = mpsc::sync_channel(1);
        exporter.queue = Some(tx);
        let c = conn(
            IPPROTO_UDP,
            "198.18.0.2",
            1,
            "203.0.113.9",
            2,
            [dir(1, 80, 1, 1, 0), dir(0, 0, 0, 0, 0)],
        );
        for _ in 0..5 {
            exporter.finish(&c, EndReason::Idle, 2 * SECOND);
            exporter.flush();
        }
        let stats = exporter.stats();
        assert_eq!((stats.dropped, stats.errors), (4, 4), "{stats:?}");
        // The sequence numbers still count the dropped records: the collector sees a gap.
        assert_eq!(exporter.encoder.sequence(), 5);
    }

    #[test]
    fn collector_urls() {
        assert_eq!(
            "udp://127.0.0.1:4739".parse::<Collector>(),
            Ok(Collector::Udp("127.0.0.1:4739".parse().unwrap()))
        );
        assert!("tcp://127.0.0.1:4739".parse::<Collector>().is_err());
        assert!("127.0.0.1:4739".parse::<Collector>().is_err());
        assert!("http://127.0.0.1:4739".parse::<Collector>().is_err());
    }
}
