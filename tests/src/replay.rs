//! Replayed captures: an independent model of the records the agent should write for a
//! sequence of frames ([`Aggregator`]), a comparison of those with the agent's conn log
//! ([`compare`]), and a two-namespace lab to replay a pcap file in ([`ReplayLab`]).
//!
//! The aggregator parses frames itself and shares no code with the agent: it models the
//! counting rules the agent documents (Zeek's conventions), so a disagreement points at
//! one of the two.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::ConnRecord,
    lab::{self, Counters, counters, ip, set_sysctls},
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const GRE: u8 = 47;

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// An address and a port (for ICMP the type, or the counterpart type / code).
pub type Endpoint = (IpAddr, u16);

/// What one connection's record must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The label of the connection's first frame, to name it in messages.
    pub label: String,
    /// As the conn log spells it: `tcp`, `udp`, `icmp`, `gre`, else the number.
    pub proto: String,
    pub orig: Endpoint,
    pub resp: Endpoint,
    pub orig_pkts: u64,
    pub orig_ip_bytes: u64,
    pub orig_bytes: u64,
    pub resp_pkts: u64,
    pub resp_ip_bytes: u64,
    pub resp_bytes: u64,
    pub conn_state: &'static str,
    pub missed_start: bool,
    pub local_orig: bool,
    pub local_resp: bool,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' ({} {} -> {})",
            self.label,
            self.proto,
            show(self.orig),
            show(self.resp)
        )
    }
}

fn show((addr, port): Endpoint) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The conn log's name of an IP protocol.
pub fn proto_name(proto: u8) -> String {
    match proto {
        TCP => "tcp".into(),
        UDP => "udp".into(),
        ICMP | ICMPV6 => "icmp".into(),
        GRE => "gre".into(),
        other => other.to_string(),
    }
}

/// What one frame says about its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub proto: u8,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// IPv4 total length, or IPv6 payload length + 40: excludes Ethernet padding.
    pub ip_len: u64,
    /// IP header with options / extension headers, plus the L4 header.
    pub hdr_len: u64,
    /// TCP flags; 0 for other protocols.
    pub flags: u8,
}

/// Parses an Ethernet frame as the agent's rules describe; `None` for what is not
/// counted: non-IP, three or more VLAN tags, or any header cut short (VLAN tag, IP header
/// with its options, each IPv6 extension header, the TCP header with its options, the
/// UDP or ICMP header).
pub fn parse(frame: &[u8]) -> Option<Packet> {
    let be16 = |at: usize| -> Option<u16> {
        let b = frame.get(at..at + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    };
    let mut ethertype = be16(12)?;
    let mut off = 14;
    for _ in 0..2 {
        if !matches!(ethertype, 0x8100 | 0x88a8) {
            break;
        }
        ethertype = be16(off + 2)?;
        off += 4;
    }
    let (src, dst, proto, ip_len, l4_off, later_fragment) = match ethertype {
        0x0800 => {
            let h = frame.get(off..off + 20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if h[0] >> 4 != 4 || ihl < 20 || total < ihl || frame.len() < off + ihl {
                return None;
            }
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                h[9],
                total,
                off + ihl,
                frag_offset != 0,
            )
        }
        0x86dd => {
            let h = frame.get(off..off + 40)?;
            let octets = |at: usize| -> [u8; 16] { h[at..at + 16].try_into().expect("16 bytes") };
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let mut next = h[6];
            let mut at = off + 40;
            let mut later_fragment = false;
            for _ in 0..8 {
                let len = match next {
                    0 | 43 | 60 => (usize::from(*frame.get(at + 1)?) + 1) * 8,
                    44 => {
                        let word = be16(at + 2)?;
                        later_fragment |= word >> 3 != 0;
                        8
                    }
                    51 => (usize::from(*frame.get(at + 1)?) + 2) * 4,
                    _ => break,
                };
                frame.get(at..at + len)?;
                next = frame[at];
                at += len;
            }
            if matches!(next, 0 | 43 | 44 | 51 | 60) {
                return None;
            }
            (
                IpAddr::from(Ipv6Addr::from(octets(8))),
                IpAddr::from(Ipv6Addr::from(octets(24))),
                next,
                payload + 40,
                at,
                later_fragment,
            )
        }
        _ => return None,
    };

    // A header that claims more than the frame holds (a lie, or a capture cut at its
    // snaplen) counts what the frame holds.
    let ip_len = ip_len.min(frame.len() - off);
    let (mut sport, mut dport, mut l4_len, mut flags) = (0, 0, 0, 0);
    if !later_fragment {
        match proto {
            TCP => {
                let t = frame.get(l4_off..l4_off + 20)?;
                l4_len = usize::from(t[12] >> 4) * 4;
                if l4_len < 20 {
                    return None;
                }
                frame.get(l4_off..l4_off + l4_len)?;
                sport = u16::from_be_bytes([t[0], t[1]]);
                dport = u16::from_be_bytes([t[2], t[3]]);
                flags = t[13];
            }
            UDP => {
                let u = frame.get(l4_off..l4_off + 8)?;
                sport = u16::from_be_bytes([u[0], u[1]]);
                dport = u16::from_be_bytes([u[2], u[3]]);
                l4_len = 8;
            }
            ICMP | ICMPV6 => {
                let i = frame.get(l4_off..l4_off + 8)?;
                (sport, dport) = icmp_ports(proto, i[0], i[1]);
                l4_len = 8;
            }
            _ => {}
        }
    }
    Some(Packet {
        proto,
        src: (src, sport),
        dst: (dst, dport),
        ip_len: ip_len as u64,
        hdr_len: (l4_off - off + l4_len) as u64,
        flags,
    })
}

/// Zeek's ICMP "ports": the type, and the type of the other half of a request/reply pair
/// (so both halves share one connection), else the code.
pub fn icmp_ports(proto: u8, ty: u8, code: u8) -> (u16, u16) {
    const V4_PAIRS: [(u8, u8); 5] = [(8, 0), (13, 14), (15, 16), (17, 18), (10, 9)];
    const V6_PAIRS: [(u8, u8); 5] = [(128, 129), (130, 131), (133, 134), (135, 136), (139, 140)];
    let pairs = if proto == ICMP { &V4_PAIRS } else { &V6_PAIRS };
    let counterpart = pairs.iter().find_map(|&(a, b)| match ty {
        t if t == a => Some(b),
        t if t == b => Some(a),
        _ => None,
    });
    (ty.into(), counterpart.unwrap_or(code).into())
}

/// An IP network in CIDR notation.
#[derive(Clone, Copy, Debug)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u32,
}

impl Cidr {
    pub fn parse(text: &str) -> Cidr {
        let (addr, prefix) = text
            .split_once('/')
            .unwrap_or_else(|| panic!("{text}: not ADDR/PREFIX"));
        let addr: IpAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("{text}: bad address: {e}"));
        let prefix: u32 = prefix
            .parse()
            .unwrap_or_else(|e| panic!("{text}: bad prefix: {e}"));
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        assert!(prefix <= bits, "{text}: prefix longer than the address");
        Cidr { addr, prefix }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let (net, addr, bits) = match (self.addr, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n).into(), u32::from(a).into(), 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        let host_bits = bits - self.prefix;
        host_bits == 128 || (net >> host_bits) == (addr >> host_bits)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Side {
    pkts: u64,
    ip_bytes: u64,
    bytes: u64,
    flags: u8,
    /// Sent a SYN without ACK.
    syn: bool,
    /// Sent a packet with both SYN and ACK.
    syn_ack: bool,
}

#[derive(Clone, Debug)]
struct Conn {
    label: String,
    proto: u8,
    /// The sender of the first packet, and its peer.
    first: Endpoint,
    second: Endpoint,
    /// What `first` sent, what `second` sent.
    sides: [Side; 2],
}

impl Conn {
    /// Whether the first sender is the originator.
    fn first_is_orig(&self) -> bool {
        let [a, b] = &self.sides;
        if self.proto == TCP {
            match (a.syn, b.syn) {
                (true, false) => return true,
                (false, true) => return false,
                _ => {}
            }
            match (a.syn_ack, b.syn_ack) {
                (true, false) => return false,
                (false, true) => return true,
                _ => {}
            }
        }
        true
    }

    fn conn_state(&self, o: &Side, r: &Side) -> &'static str {
        if self.proto != TCP {
            return if r.pkts > 0 { "SF" } else { "S0" };
        }
        let has = |s: &Side, flag: u8| s.flags & flag != 0;
        match (o.syn, r.syn_ack) {
            (true, false) if has(r, RST) => "REJ",
            (true, false) if has(o, RST) => "RSTOS0",
            (true, false) if has(o, FIN) => "SH",
            (true, false) => "S0",
            (false, true) if has(r, RST) => "RSTRH",
            (false, true) if has(r, FIN) => "SHR",
            (false, _) => "OTH",
            // A RST after FINs both ways leaves Zeek's state closed.
            (true, true) if has(o, FIN) && has(r, FIN) => "SF",
            (true, true) if has(o, RST) => "RSTO",
            (true, true) if has(r, RST) => "RSTR",
            (true, true) if has(o, FIN) => "S2",
            (true, true) if has(r, FIN) => "S3",
            (true, true) => "S1",
        }
    }
}

/// Frames in, expected conn-log records out. Frames must be added in capture order.
#[derive(Debug)]
pub struct Aggregator {
    local: Vec<Cidr>,
    conns: Vec<Conn>,
    /// (proto, smaller endpoint, larger endpoint) -> index in `conns`.
    index: HashMap<(u8, Endpoint, Endpoint), usize>,
    uncounted: Vec<String>,
}

impl Aggregator {
    /// `local_nets` as the agent's `--local-net` takes them.
    pub fn new(local_nets: &[&str]) -> Self {
        Self {
            local: local_nets.iter().map(|n| Cidr::parse(n)).collect(),
            conns: Vec::new(),
            index: HashMap::new(),
            uncounted: Vec::new(),
        }
    }

    /// Counts one frame; `label` names its connection in messages. Returns whether the
    /// frame counts at all.
    pub fn add(&mut self, label: &str, frame: &[u8]) -> bool {
        let Some(p) = parse(frame) else {
            self.uncounted.push(label.to_string());
            return false;
        };
        let key = (p.proto, p.src.min(p.dst), p.src.max(p.dst));
        let i = *self.index.entry(key).or_insert_with(|| {
            self.conns.push(Conn {
                label: label.to_string(),
                proto: p.proto,
                first: p.src,
                second: p.dst,
                sides: [Side::default(); 2],
            });
            self.conns.len() - 1
        });
        let conn = &mut self.conns[i];
        // A packet from an endpoint to itself counts as the first sender's.
        let side = &mut conn.sides[usize::from(p.src != conn.first)];
        side.pkts += 1;
        side.ip_bytes += p.ip_len;
        side.bytes += p.ip_len.saturating_sub(p.hdr_len);
        side.flags |= p.flags;
        side.syn |= p.flags & (SYN | ACK) == SYN;
        side.syn_ack |= p.flags & (SYN | ACK) == SYN | ACK;
        true
    }

    /// Labels of the frames that count in no connection, in order.
    pub fn uncounted(&self) -> &[String] {
        &self.uncounted
    }

    /// One record per connection, in the order of their first frames.
    pub fn expected(&self) -> Vec<Expected> {
        let local = |addr: IpAddr| self.local.iter().any(|n| n.contains(addr));
        self.conns
            .iter()
            .map(|c| {
                let (orig, resp, o, r) = if c.first_is_orig() {
                    (c.first, c.second, &c.sides[0], &c.sides[1])
                } else {
                    (c.second, c.first, &c.sides[1], &c.sides[0])
                };
                Expected {
                    label: c.label.clone(),
                    proto: proto_name(c.proto),
                    orig,
                    resp,
                    orig_pkts: o.pkts,
                    orig_ip_bytes: o.ip_bytes,
                    orig_bytes: o.bytes,
                    resp_pkts: r.pkts,
                    resp_ip_bytes: r.ip_bytes,
                    resp_bytes: r.bytes,
                    conn_state: c.conn_state(o, r),
                    missed_start: c.proto == TCP && !o.syn && !r.syn,
                    local_orig: local(orig.0),
                    local_resp: local(resp.0),
                }
            })
            .collect()
    }

    /// The expectation of the connection whose first frame had this label.
    pub fn get(&self, label: &str) -> Expected {
        self.expected()
            .into_iter()
            .find(|e| e.label == label)
            .unwrap_or_else(|| panic!("no connection starts with a frame labelled '{label}'"))
    }
}

/// Every difference between the expected records and the agent's, one line each: a
/// connection missing, unexpected or logged more than once, the other orientation, or a
/// field that differs. `iface` is what every record's `iface` must say.
pub fn compare(expected: &[Expected], actual: &[ConnRecord], iface: &str) -> Vec<String> {
    type Key = (String, Endpoint, Endpoint);
    let key = |proto: &str, a: Endpoint, b: Endpoint| -> Key { (proto.into(), a.min(b), a.max(b)) };
    let mut by_key: BTreeMap<Key, Vec<&ConnRecord>> = BTreeMap::new();
    for r in actual {
        by_key
            .entry(key(r.proto(), r.orig(), r.resp()))
            .or_default()
            .push(r);
    }

    let mut problems = Vec::new();
    for e in expected {
        let Some(records) = by_key.remove(&key(&e.proto, e.orig, e.resp)) else {
            problems.push(format!("{e}: no record (expected {e:?})"));
            continue;
        };
        if records.len() > 1 {
            let lines: Vec<String> = records.iter().map(|r| format!("\n    {r}")).collect();
            problems.push(format!(
                "{e}: {} records, expected one:{}",
                records.len(),
                lines.concat()
            ));
            continue;
        }
        let r = records[0];
        let mut differs = |field: &str, want: String, got: String| {
            if want != got {
                problems.push(format!("{e}: {field}: expected {want}, actual {got}"));
            }
        };
        differs(
            "orientation (orig -> resp)",
            format!("{} -> {}", show(e.orig), show(e.resp)),
            format!("{} -> {}", show(r.orig()), show(r.resp())),
        );
        let (o, rs) = if r.orig() == e.orig {
            ("orig", "resp")
        } else {
            // Compare the sides as the agent oriented them against the same endpoints.
            ("resp", "orig")
        };
        let numbers = [
            ("orig_pkts", e.orig_pkts, format!("{o}_pkts")),
            ("resp_pkts", e.resp_pkts, format!("{rs}_pkts")),
            ("orig_ip_bytes", e.orig_ip_bytes, format!("{o}_ip_bytes")),
            ("resp_ip_bytes", e.resp_ip_bytes, format!("{rs}_ip_bytes")),
            ("orig_bytes", e.orig_bytes, format!("{o}_bytes")),
            ("resp_bytes", e.resp_bytes, format!("{rs}_bytes")),
        ];
        for (field, want, actual_field) in numbers {
            let got = r.u64(&actual_field);
            let field = if actual_field == field {
                field.to_string()
            } else {
                format!("{field} (the agent's {actual_field})")
            };
            differs(&field, want.to_string(), got.to_string());
        }
        differs(
            "conn_state",
            e.conn_state.into(),
            r.str("conn_state").into(),
        );
        differs(
            "missed_start",
            e.missed_start.to_string(),
            r.bool("missed_start").to_string(),
        );
        differs(
            "local_orig",
            e.local_orig.to_string(),
            r.bool("local_orig").to_string(),
        );
        differs(
            "local_resp",
            e.local_resp.to_string(),
            r.bool("local_resp").to_string(),
        );
        differs("iface", iface.into(), r.str("iface").into());
    }
    for records in by_key.into_values() {
        for r in records {
            problems.push(format!(
                "unexpected record (no crafted frame belongs to it): {r}"
            ));
        }
    }
    problems
}

/// Panics with every difference [`compare`] finds, and the agent's records.
pub fn assert_records(context: &str, expected: &[Expected], actual: &[ConnRecord], iface: &str) {
    let problems = compare(expected, actual, iface);
    if !problems.is_empty() {
        let records: Vec<String> = actual.iter().map(|r| format!("\n  {r}")).collect();
        panic!(
            "{context}: {} difference(s) between the agent's conn log and the aggregator \
             ({} connections expected, {} records):\n- {}\nagent records:{}",
            problems.len(),
            expected.len(),
            actual.len(),
            problems.join("\n- "),
            records.concat()
        );
    }
}

const SRC_MAC: &str = "02:00:00:00:aa:01";
const MON_MAC: &str = "02:00:00:00:aa:02";
const QUIET_FOR: Duration = Duration::from_secs(1);
const QUIET_LIMIT: Duration = Duration::from_secs(15);
const REPLAY_LIMIT: Duration = Duration::from_secs(60);
const DELIVERY_LIMIT: Duration = Duration::from_secs(10);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
/// Concurrent first-time `ip netns add` calls race on mounting /run/netns.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Two namespaces joined by a veth pair, without addresses or IPv6:
///
/// ```text
/// src [src_if] --veth-- [mon_if] mon
/// ```
///
/// Frames replayed out of `src_if` arrive at `mon_if` as ingress, where the agent watches.
/// Dropping the lab kills what it started (by PID) and deletes both namespaces, also on
/// panic.
pub struct ReplayLab {
    pub src_ns: String,
    pub mon_ns: String,
    pub src_if: String,
    pub mon_if: String,
    children: Mutex<Vec<Child>>,
    dir: PathBuf,
}

impl ReplayLab {
    /// Builds the lab and returns once both interfaces are quiet.
    pub fn new() -> ReplayLab {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("rpl{}-{n}", std::process::id());
        let lab = ReplayLab {
            src_ns: format!("{prefix}-src"),
            mon_ns: format!("{prefix}-mon"),
            src_if: "rpl-src".into(),
            mon_if: "rpl-mon".into(),
            children: Mutex::new(Vec::new()),
            dir: std::env::temp_dir().join(format!("monitor-{prefix}")),
        };
        let _ = std::fs::remove_dir_all(&lab.dir);
        std::fs::create_dir_all(&lab.dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", lab.dir.display()));
        // From here on Drop removes whatever part was built.
        lab.build();
        lab.wait_quiet();
        lab
    }

    fn build(&self) {
        // No IPv6 on devices created from here on: no link-local address, DAD, router
        // solicitation or MLD report. Without IPv4 addresses there is no ARP or IGMP.
        let no_ipv6 = [
            ("net/ipv6/conf/all/disable_ipv6", "1"),
            ("net/ipv6/conf/default/disable_ipv6", "1"),
        ];
        for ns in [&self.src_ns, &self.mon_ns] {
            {
                let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
                ip(&["netns", "add", ns]);
            }
            set_sysctls(ns, &no_ipv6);
        }
        ip(&[
            "-n",
            &self.src_ns,
            "link",
            "add",
            &self.src_if,
            "address",
            SRC_MAC,
            "type",
            "veth",
            "peer",
            "name",
            &self.mon_if,
            "address",
            MON_MAC,
            "netns",
            &self.mon_ns,
        ]);
        for (ns, dev) in self.interfaces() {
            let key = format!("net/ipv6/conf/{dev}/disable_ipv6");
            set_sysctls(ns, &[(&key, "1")]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// (namespace, interface) of both ends.
    pub fn interfaces(&self) -> [(&str, &str); 2] {
        [(&self.src_ns, &self.src_if), (&self.mon_ns, &self.mon_if)]
    }

    /// The monitored interface's counters.
    pub fn mon_counters(&self) -> Counters {
        counters(&self.mon_ns, &self.mon_if)
    }

    /// Waits until neither interface's counters change for a second; panics after 15 s.
    pub fn wait_quiet(&self) {
        let start = Instant::now();
        let snapshot = || self.interfaces().map(|(ns, dev)| counters(ns, dev));
        let mut last = snapshot();
        let mut since = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = snapshot();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= QUIET_FOR {
                return;
            }
            assert!(
                start.elapsed() < QUIET_LIMIT,
                "replay lab {} never went quiet within {QUIET_LIMIT:?}: last {last:?}",
                self.mon_ns
            );
        }
    }

    /// Replays `pcap` out of `src_if` with `tcpreplay` at its recorded pace, then waits
    /// until `mon_if` has received exactly `frames` frames more than `before` (and sent
    /// none) and the lab is quiet again.
    pub fn replay(&self, pcap: &Path, frames: u64, before: Counters) {
        let log = self.dir.join("tcpreplay.log");
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file handle");
        let intf = format!("--intf1={}", self.src_if);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.src_ns, "tcpreplay", &intf, "--quiet"])
            .arg(pcap)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} (is tcpreplay installed?): {e}"));
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        let status = self.wait_child(pid, REPLAY_LIMIT);
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{cmd:?} exited with {status}:\n{output}");

        let start = Instant::now();
        loop {
            let delta = self.mon_counters().since(before);
            if delta.rx_packets >= frames {
                break;
            }
            assert!(
                start.elapsed() < DELIVERY_LIMIT,
                "{}/{} received {} of the {frames} replayed frames within {DELIVERY_LIMIT:?} \
                 ({delta:?}); tcpreplay said:\n{output}",
                self.mon_ns,
                self.mon_if,
                delta.rx_packets
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.wait_quiet();
        let delta = self.mon_counters().since(before);
        assert_eq!(
            (delta.rx_packets, delta.tx_packets),
            (frames, 0),
            "{}/{}: (rx, tx) packets during the replay: something besides the {frames} \
             replayed frames crossed the link ({delta:?})",
            self.mon_ns,
            self.mon_if
        );
    }

    /// Waits for a child this lab started; kills it (by PID) and panics after `limit`.
    fn wait_child(&self, pid: u32, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            {
                let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
                let at = children
                    .iter()
                    .position(|c| c.id() == pid)
                    .expect("a child of this lab");
                if children[at].try_wait().expect("wait for child").is_some() {
                    // Returns the status try_wait collected.
                    return children.remove(at).wait().expect("wait for child");
                }
                if start.elapsed() > limit {
                    let mut child = children.remove(at);
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("child {pid} did not finish within {limit:?} (killed)");
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Default for ReplayLab {
    fn default() -> Self {
        ReplayLab::new()
    }
}

impl Drop for ReplayLab {
    fn drop(&mut self) {
        lab::kill_children(&self.children);
        lab::delete_namespaces(&[&self.src_ns, &self.mon_ns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod self_tests {
    use super::*;
    use crate::packet::{Frame, ipproto, tcp_flags};

    const L: [u8; 4] = [198, 18, 0, 1];
    const R: [u8; 4] = [203, 0, 113, 1];

    fn agg(frames: &[(&str, Vec<u8>)]) -> Aggregator {
        let mut a = Aggregator::new(&["198.18.0.0/15", "2001:db8:1::/48"]);
        for (label, f) in frames {
            a.add(label, f);
        }
        a
    }

    #[test]
    fn cidr() {
        let n = Cidr::parse("198.18.0.0/15");
        assert!(n.contains("198.19.255.255".parse().unwrap()));
        assert!(!n.contains("198.20.0.0".parse().unwrap()));
        assert!(!n.contains("::".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("::/0").contains("::1".parse().unwrap()));
        assert!(Cidr::parse("2001:db8:1::/48").contains("2001:db8:1:ffff::1".parse().unwrap()));
    }

    #[test]
    fn padded_ack_counts_the_ip_length() {
        let f = Frame::eth()
            .ipv4(L, R)
            .tcp(1, 2, tcp_flags::ACK)
            .pad_to_min()
            .build();
        assert_eq!(f.len(), 60);
        let p = parse(&f).unwrap();
        assert_eq!((p.ip_len, p.hdr_len, p.flags), (40, 40, tcp_flags::ACK));
    }

    #[test]
    fn syn_decides_orientation_over_first_sender() {
        let a = agg(&[
            (
                "c",
                Frame::eth()
                    .ipv4(R, L)
                    .tcp(80, 5000, tcp_flags::ACK)
                    .payload_len(10)
                    .build(),
            ),
            (
                "c",
                Frame::eth()
                    .ipv4(L, R)
                    .tcp(5000, 80, tcp_flags::SYN)
                    .build(),
            ),
        ]);
        let e = a.get("c");
        assert_eq!(e.orig, (IpAddr::from(L), 5000));
        assert_eq!((e.orig_pkts, e.resp_pkts, e.resp_bytes), (1, 1, 10));
        assert_eq!((e.conn_state, e.missed_start), ("S0", false));
        assert!(e.local_orig && !e.local_resp);
    }

    #[test]
    fn echo_request_and_reply_are_one_connection() {
        let a = agg(&[
            (
                "e",
                Frame::eth().ipv4(R, L).icmp(8, 0).payload_len(4).build(),
            ),
            (
                "r",
                Frame::eth().ipv4(L, R).icmp(0, 0).payload_len(4).build(),
            ),
            (
                "u",
                Frame::eth().ipv4(L, R).icmp(3, 13).payload_len(28).build(),
            ),
        ]);
        let e = a.expected();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].orig, e[0].resp),
            ((IpAddr::from(R), 8), (IpAddr::from(L), 0))
        );
        assert_eq!(
            (e[0].orig_ip_bytes, e[0].resp_bytes, e[0].conn_state),
            (32, 4, "SF")
        );
        assert_eq!(
            (e[1].orig, e[1].resp),
            ((IpAddr::from(L), 3), (IpAddr::from(R), 13))
        );
    }

    #[test]
    fn truncated_and_odd_frames() {
        let f = Frame::eth()
            .ipv4(L, R)
            .tcp(1, 2, tcp_flags::SYN)
            .tcp_options(8);
        let l = f.layout();
        assert!(parse(&f.clone().truncate(l.l3_off + 19).build()).is_none());
        assert!(parse(&f.clone().truncate(l.l4_off + 19).build()).is_none());
        assert!(parse(&f.clone().truncate(l.l4_off + 27).build()).is_none());
        assert!(parse(&f.clone().truncate(l.l4_off + 28).build()).is_some());
        let three_tags = Frame::eth()
            .vlan(0x88a8, 1)
            .vlan(0x8100, 2)
            .vlan(0x8100, 3)
            .ipv4(L, R)
            .udp(1, 2);
        assert!(parse(&three_tags.build()).is_none());
        let frag = Frame::eth()
            .ipv6(
                [0x2001, 0xdb8, 1, 0, 0, 0, 0, 1],
                [0x2001, 0xdb8, 2, 0, 0, 0, 0, 1],
            )
            .ipv6_ext(ipproto::HOPOPTS, 16)
            .ipv6_fragment(10, false)
            .udp(53, 53)
            .payload_len(100);
        let p = parse(&frag.build()).unwrap();
        assert_eq!(
            (p.src.1, p.dst.1, p.ip_len, p.hdr_len),
            (0, 0, 40 + 24 + 100, 64)
        );
        let gre = Frame::eth().ipv4(L, R).proto(ipproto::GRE).payload_len(30);
        let p = parse(&gre.build()).unwrap();
        assert_eq!((p.proto, p.ip_len, p.hdr_len), (ipproto::GRE, 50, 20));
    }
}
