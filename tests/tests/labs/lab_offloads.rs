//! The agent's records against wire truth with offloads left on: TSO/GSO super-packets
//! from the lan host, GRO aggregates on the gateway, UDP GSO and BIG TCP.
//!
//! Offloads, set after `Lab::new` (which turns segmentation off on both WAN veths):
//! - lan host's veth: TSO, GSO and UDP segmentation on (the veth defaults). Its
//!   super-packets cross the LAN veth whole, up to 64 KB, 185,000 B in the BIG TCP case.
//! - gw's LAN veth: GRO on.
//! - gw's WAN veth: TSO, GSO, UDP segmentation and GSO lists off; GRO on. The stack
//!   segments after TC egress, so its tx counters count wire packets: the upload truth.
//! - wan host's veth: segmentation stays off, so its tx counters count wire packets: the
//!   download truth. In the upload cases it sends only ACKs, single segments whatever its
//!   offloads. gw's WAN veth merges the download's wire segments again (GRO), so TC ingress
//!   there counts GRO aggregates, while native XDP sees the wire frames before GRO.
//!
//! Truth per direction: packets = tx_packets, IP bytes = tx_bytes - L2 x tx_packets, L2 being
//! the per-frame bytes that counter adds beyond IP, probed (`Lab::tx_l2_bytes`): 14, or 0
//! where the peer receives through NAPI (GRO or XDP on gw's WAN veth). Each case also proves,
//! independently of the agent, that aggregates crossed the gateway: the lan host's veth
//! counts skbs, gw's IPv4 `InReceives` counts skbs after GRO, and a packet socket on the lan
//! host's veth sees the BIG TCP skbs above 64 KB.
//!
//! Three configurations, one lab and one agent each, run every case in turn: XDP ingress
//! with TC egress on gw's WAN veth, TC both ways there, and TC on both gw veths.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    agent::{Agent, ConnRecord},
    lab::{self, Counters, ETH_HEADER, Lab, WanCounters, counters, run_in_ns},
    netlink, traffic,
};

const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 5353;
const MB: u64 = 1 << 20;

const UDP_SENDS: u64 = 64;
const UDP_SEND_BYTES: usize = 60_000;
const UDP_GSO_SIZE: usize = 1400;
/// Wire datagrams per send: 42 of 1400 B and one of 1200 B.
const UDP_SEGS_PER_SEND: u64 = UDP_SEND_BYTES.div_ceil(UDP_GSO_SIZE) as u64;

/// BIG TCP aggregate limit for IPv4 (`gso_ipv4_max_size`), above the 64 KB of plain GSO.
const BIG_TCP_SIZE: u32 = 185_000;
const IPV4_MAX_TOTAL_LEN: u64 = 65_535;

/// Wire packets per skb an aggregating direction must at least average.
const MIN_SEGS_PER_SKB: u64 = 4;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    /// Native XDP ingress + TC egress on gw's WAN veth.
    XdpWan,
    /// TC ingress + TC egress on gw's WAN veth.
    TcWan,
    /// TC on gw's LAN and WAN veths.
    TcBoth,
}

impl Config {
    fn start_agent(self, lab: &Lab) -> Agent {
        let mut args = vec![
            "--local-net",
            lab::LOCAL_NET_V4,
            "--local-net",
            lab::LOCAL_NET_V6,
            "--poll-interval",
            "200ms",
        ];
        match self {
            Config::XdpWan => args.extend(["--ingress-hook", "xdp", "--xdp-mode", "native"]),
            Config::TcWan => args.extend(["--ingress-hook", "tc"]),
            Config::TcBoth => {
                args.extend(["--ingress-hook", "tc", "--iface", lab.gw_lan_if.as_str()])
            }
        }
        Agent::start(&lab.gw, &lab.gw_wan_if, &args)
    }

    /// The interface a record names: where the connection's first packet was counted. Every
    /// connection here starts at the lan host, so with both veths watched that is gw's LAN
    /// veth (TC ingress).
    fn record_iface(self, lab: &Lab) -> &str {
        match self {
            Config::XdpWan | Config::TcWan => &lab.gw_wan_if,
            Config::TcBoth => &lab.gw_lan_if,
        }
    }
}

/// One direction on the wire, from the tx counters of a segmenting veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wire {
    pkts: u64,
    ip_bytes: u64,
}

/// Counter deltas over one case.
#[derive(Clone, Copy, Debug)]
struct Truth {
    /// Probed bytes per frame beyond IP of the two tx counters below.
    up_l2: u64,
    down_l2: u64,
    /// Both ends of the WAN link.
    wan: WanCounters,
    /// The lan host's veth: its tx counts the skbs the lan host sent, aggregates as one.
    lan_host: Counters,
    /// gw's IPv4 `InReceives`: IPv4 skbs the gateway's IP layer took in, after GRO.
    gw_ip_in: u64,
}

impl Truth {
    /// lan -> wan: gw's WAN veth tx.
    fn up(&self) -> Wire {
        Wire {
            pkts: self.wan.gw_wan.tx_packets,
            ip_bytes: self.wan.gw_wan.tx_ip_bytes(self.up_l2),
        }
    }

    /// wan -> lan: the wan host's veth tx.
    fn down(&self) -> Wire {
        Wire {
            pkts: self.wan.wan_host.tx_packets,
            ip_bytes: self.wan.wan_host.tx_ip_bytes(self.down_l2),
        }
    }

    /// IPv4 skbs that came into gw from the WAN side: everything its IP layer took in less
    /// what the lan host sent (which gw's LAN veth passes on without GRO: the lan host's
    /// veth has TSO on, so veth skips NAPI for its skbs).
    fn gw_skbs_from_wan(&self) -> u64 {
        self.gw_ip_in
            .checked_sub(self.lan_host.tx_packets)
            .unwrap_or_else(|| {
                panic!(
                    "gw InReceives {} < lan host tx skbs {}: {self:?}",
                    self.gw_ip_in, self.lan_host.tx_packets
                )
            })
    }
}

/// Runs `traffic` between two quiet points and returns the counter deltas.
fn measure<T>(lab: &Lab, traffic: impl FnOnce() -> T) -> (T, Truth) {
    lab.wait_quiet();
    let up_l2 = lab.tx_l2_bytes(&lab.gw, &lab.gw_wan_if);
    let down_l2 = lab.tx_l2_bytes(&lab.wan, &lab.wan_if);
    lab.wait_quiet();
    let wan_before = lab.wan_counters();
    let lan_before = counters(&lab.lan, &lab.lan_if);
    let ip_in_before = ip_in_receives(&lab.gw);
    let out = traffic();
    lab.wait_quiet();
    let wan = lab.wan_counters().since(wan_before);
    let truth = Truth {
        up_l2,
        down_l2,
        wan,
        lan_host: counters(&lab.lan, &lab.lan_if).since(lan_before),
        gw_ip_in: ip_in_receives(&lab.gw) - ip_in_before,
    };
    (out, truth)
}

/// `Ip: InReceives` of `ns` (/proc/net/snmp): IPv4 skbs into the IP layer.
fn ip_in_receives(ns: &str) -> u64 {
    let text = run_in_ns(ns, || {
        // /proc/net is the thread group leader's namespace; thread-self is this thread's.
        std::fs::read_to_string("/proc/thread-self/net/snmp")
    })
    .unwrap_or_else(|e| panic!("in {ns}: read /proc/thread-self/net/snmp: {e}"));
    let mut ip_lines = text.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip_lines.next(), ip_lines.next()) else {
        panic!("in {ns}: no Ip lines in /proc/net/snmp:\n{text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "InReceives")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("in {ns}: no Ip InReceives in /proc/net/snmp:\n{text}"))
}

/// `ethtool -K` then checks with `ethtool -k` that every feature took the wanted state.
fn set_features(ns: &str, dev: &str, wanted: &[(&str, bool)]) {
    let on_off = |on: bool| if on { "on" } else { "off" };
    let mut args = vec!["ethtool", "-K", dev];
    for &(feature, on) in wanted {
        args.extend([feature, on_off(on)]);
    }
    lab::ns_exec(ns, &args);
    let listing = lab::ns_exec(ns, &["ethtool", "-k", dev]);
    for &(feature, on) in wanted {
        let state = listing
            .lines()
            .find_map(|line| {
                line.trim()
                    .strip_prefix(feature)
                    .and_then(|rest| rest.strip_prefix(':'))
            })
            .map(str::trim)
            .unwrap_or_else(|| panic!("{ns}/{dev}: ethtool -k lists no {feature}:\n{listing}"));
        assert!(
            state.starts_with(on_off(on)),
            "{ns}/{dev}: {feature} is '{state}' after ethtool -K {feature} {}",
            on_off(on)
        );
    }
}

/// The offloads described at the top of this file.
fn set_offloads(lab: &Lab) {
    set_features(
        &lab.lan,
        &lab.lan_if,
        &[
            ("tcp-segmentation-offload", true),
            ("generic-segmentation-offload", true),
            ("tx-udp-segmentation", true),
        ],
    );
    set_features(
        &lab.gw,
        &lab.gw_lan_if,
        &[("generic-receive-offload", true)],
    );
    set_features(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            ("tcp-segmentation-offload", false),
            ("generic-segmentation-offload", false),
            ("tx-udp-segmentation", false),
            ("tx-gso-list", false),
            ("generic-receive-offload", true),
        ],
    );
    set_features(
        &lab.wan,
        &lab.wan_if,
        &[
            ("tcp-segmentation-offload", false),
            ("generic-segmentation-offload", false),
            ("tx-udp-segmentation", false),
            ("tx-gso-list", false),
        ],
    );
    lab.wait_quiet();
}

/// Raises the IPv4 GSO and GRO limits of the lan host's veth and gw's veths to
/// [`BIG_TCP_SIZE`] through rtnetlink, and reads them back. Panics with the kernel's reason
/// if it refuses: BIG TCP for IPv4 exists since Linux 6.3.
fn enable_big_tcp(lab: &Lab) {
    for (ns, dev) in [
        (&lab.lan, &lab.lan_if),
        (&lab.gw, &lab.gw_lan_if),
        (&lab.gw, &lab.gw_wan_if),
    ] {
        let name = dev.clone();
        let (set, read_back) = run_in_ns(ns, move || {
            let set = netlink::set_link_u32(
                &name,
                &[
                    (netlink::IFLA_GSO_IPV4_MAX_SIZE, BIG_TCP_SIZE),
                    (netlink::IFLA_GRO_IPV4_MAX_SIZE, BIG_TCP_SIZE),
                ],
            )
            .map_err(|e| e.to_string());
            let read = |kind| {
                netlink::link_u32(&name, kind).unwrap_or_else(|e| panic!("RTM_GETLINK {name}: {e}"))
            };
            let read_back = [
                read(netlink::IFLA_GSO_IPV4_MAX_SIZE),
                read(netlink::IFLA_GRO_IPV4_MAX_SIZE),
                read(netlink::IFLA_TSO_MAX_SIZE),
            ];
            (set, read_back)
        });
        let [gso, gro, tso_max] = read_back;
        if let Err(reason) = set {
            panic!(
                "{ns}/{dev}: the kernel refused gso_ipv4_max_size/gro_ipv4_max_size \
                 {BIG_TCP_SIZE} (RTM_NEWLINK attributes {}/{}): {reason}; tso_max_size is \
                 {tso_max:?}, current gso_ipv4_max_size {gso:?}, gro_ipv4_max_size {gro:?}",
                netlink::IFLA_GSO_IPV4_MAX_SIZE,
                netlink::IFLA_GRO_IPV4_MAX_SIZE
            );
        }
        assert_eq!(
            (gso, gro),
            (Some(BIG_TCP_SIZE), Some(BIG_TCP_SIZE)),
            "{ns}/{dev}: (gso_ipv4_max_size, gro_ipv4_max_size) read back after setting \
             {BIG_TCP_SIZE} (tso_max_size {tso_max:?})"
        );
    }
}

/// Counts the skbs a device transmits whose frame is longer than a threshold. A packet
/// socket sees each skb whole, before any segmentation, and a socket filter keeps only the
/// long ones, so the receive queue holds few.
struct LongFrameTap {
    sock: OwnedFd,
    what: String,
}

impl LongFrameTap {
    fn open(ns: &str, dev: &str, longer_than: u32) -> LongFrameTap {
        let what = format!("{ns}/{dev}");
        let dev = dev.to_string();
        let sock = run_in_ns(ns, move || {
            let fail = |step: &str| -> ! {
                panic!(
                    "packet socket on {dev}: {step}: {}",
                    io::Error::last_os_error()
                )
            };
            // Protocol 0 receives nothing until bound, after the filter is in place.
            // SAFETY: plain syscall.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                fail("socket");
            }
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            // Classic BPF: accept the whole frame if its length exceeds `longer_than`.
            const LD_W_LEN: u16 = 0x80; // BPF_LD | BPF_W | BPF_LEN
            const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
            const RET_K: u16 = 0x06; // BPF_RET | BPF_K
            let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
            let mut program = [
                insn(LD_W_LEN, 0, 0, 0),
                insn(JGT_K, 0, 1, longer_than),
                insn(RET_K, 0, 0, u32::MAX),
                insn(RET_K, 0, 0, 0),
            ];
            let fprog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_mut_ptr(),
            };
            if !set_option(&sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog) {
                fail("SO_ATTACH_FILTER");
            }
            if !set_option(
                &sock,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &(256i32 << 20),
            ) {
                fail("SO_RCVBUFFORCE");
            }
            let name = std::ffi::CString::new(dev.clone()).expect("interface name");
            // SAFETY: `name` is a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex != 0, "no interface {dev}");
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: `addr` is valid for the length given.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                fail("bind");
            }
            sock
        });
        LongFrameTap { sock, what }
    }

    /// (number, longest frame) of the long frames the device sent since the tap opened.
    fn drain(&self) -> (u64, u64) {
        let (mut count, mut longest) = (0u64, 0u64);
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // MSG_TRUNC: the frame's whole length, not the 64 bytes copied.
            // SAFETY: buffer and address are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                assert_eq!(
                    e.kind(),
                    io::ErrorKind::WouldBlock,
                    "tap on {}: recv: {e}",
                    self.what
                );
                return (count, longest);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                count += 1;
                longest = longest.max(n as u64);
            }
        }
    }
}

fn set_option<T>(sock: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> bool {
    // SAFETY: `value` is valid for size_of::<T>() bytes.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// What a UDP GSO upload sent and what its receiver got.
#[derive(Clone, Copy, Debug)]
struct UdpGso {
    client: SocketAddr,
    server: SocketAddr,
    bytes_sent: u64,
    datagrams_received: u64,
    bytes_received: u64,
    largest_datagram: usize,
}

/// The lan host sends [`UDP_SENDS`] buffers of [`UDP_SEND_BYTES`] on a socket with
/// UDP_SEGMENT [`UDP_GSO_SIZE`]: each send is one skb standing for several datagrams. Each
/// send waits until the receiver has all datagrams of the previous ones, so none is dropped
/// for want of receive buffer.
fn udp_gso_upload(lab: &Lab, server: SocketAddr) -> UdpGso {
    let receiver = run_in_ns(&lab.wan, move || UdpSocket::bind(server))
        .unwrap_or_else(|e| panic!("bind UDP receiver {server}: {e}"));
    let server = receiver.local_addr().expect("UDP receiver address");
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let expected = UDP_SENDS * UDP_SEGS_PER_SEND;
    let receiver_thread = thread::Builder::new()
        .name(format!("udp gso receiver {server}"))
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            let (mut datagrams, mut bytes, mut largest) = (0u64, 0u64, 0usize);
            let mut last = Instant::now();
            while datagrams < expected && last.elapsed() < Duration::from_secs(5) {
                match receiver.recv(&mut buf) {
                    Ok(n) => {
                        datagrams += 1;
                        bytes += n as u64;
                        largest = largest.max(n);
                        counted.store(datagrams, Ordering::Release);
                        last = Instant::now();
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("UDP receiver: recv after {datagrams} datagrams: {e}"),
                }
            }
            (datagrams, bytes, largest)
        })
        .expect("spawn UDP receiver thread");

    let sender = run_in_ns(&lab.lan, move || {
        let sock = UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0))?;
        sock.connect(server)?;
        let gso_size = UDP_GSO_SIZE as libc::c_int;
        // SAFETY: `gso_size` is valid for the length given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                SOL_UDP,
                UDP_SEGMENT,
                (&raw const gso_size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok::<_, io::Error>(sock)
    })
    .unwrap_or_else(|e| panic!("UDP GSO sender socket to {server}: {e}"));
    sender
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    let client = sender.local_addr().expect("UDP sender address");
    let payload: Vec<u8> = (0..UDP_SEND_BYTES).map(|i| (i % 251) as u8).collect();
    let mut bytes_sent = 0u64;
    for send in 1..=UDP_SENDS {
        let n = sender
            .send(&payload)
            .unwrap_or_else(|e| panic!("UDP GSO send {send}: {e}"));
        assert_eq!(n, UDP_SEND_BYTES, "UDP GSO send {send}: short send");
        bytes_sent += n as u64;
        let start = Instant::now();
        while received.load(Ordering::Acquire) < send * UDP_SEGS_PER_SEND {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "UDP GSO: after send {send} the receiver has {} of {} datagrams after 5 s",
                received.load(Ordering::Acquire),
                send * UDP_SEGS_PER_SEND
            );
            thread::sleep(Duration::from_micros(200));
        }
    }
    let (datagrams_received, bytes_received, largest_datagram) = match receiver_thread.join() {
        Ok(counts) => counts,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    UdpGso {
        client,
        server,
        bytes_sent,
        datagrams_received,
        bytes_received,
        largest_datagram,
    }
}

/// What the record of one connection must say.
struct Expect {
    case: String,
    proto: &'static str,
    orig: SocketAddr,
    resp: SocketAddr,
    truth: Truth,
    orig_bytes: u64,
    resp_bytes: u64,
    conn_state: &'static str,
    iface: String,
    /// The generator's own report, for failure messages.
    generator: String,
}

/// Compares the one record of `e`'s connection with the truth; `Err` describes every
/// difference.
fn check(records: &[ConnRecord], e: &Expect) -> Result<(), String> {
    let orig = (e.orig.ip(), e.orig.port());
    let resp = (e.resp.ip(), e.resp.port());
    let found: Vec<&ConnRecord> = records
        .iter()
        .filter(|r| r.is_between(e.proto, orig, resp))
        .collect();
    if found.len() != 1 {
        return Err(format!(
            "{}: expected exactly one {} record between {orig:?} and {resp:?}, found {}; \
             generator: {}; truth: {:?}\nrecords of this run:\n{}",
            e.case,
            e.proto,
            found.len(),
            e.generator,
            e.truth,
            records
                .iter()
                .map(|r| format!("  {r}"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    let r = found[0];
    let mut diffs = Vec::new();
    let mut field = |name: &str, expected: Value, why: &str| {
        let actual = r.0.get(name).cloned().unwrap_or(Value::Null);
        if actual != expected {
            diffs.push(format!(
                "  {name}: expected {expected} ({why}), got {actual}"
            ));
        }
    };
    let t = &e.truth;
    field("proto", json!(e.proto), "generator");
    field("orig_pkts", json!(t.up().pkts), "gw WAN veth tx_packets");
    field(
        "orig_ip_bytes",
        json!(t.up().ip_bytes),
        &format!("gw WAN veth tx_bytes - {} x tx_packets", t.up_l2),
    );
    field(
        "resp_pkts",
        json!(t.down().pkts),
        "wan host veth tx_packets",
    );
    field(
        "resp_ip_bytes",
        json!(t.down().ip_bytes),
        &format!("wan host veth tx_bytes - {} x tx_packets", t.down_l2),
    );
    field(
        "orig_bytes",
        json!(e.orig_bytes),
        "payload the originator sent",
    );
    field(
        "resp_bytes",
        json!(e.resp_bytes),
        "payload the responder sent",
    );
    field(
        "conn_state",
        json!(e.conn_state),
        "how the generator ended it",
    );
    field("local_orig", json!(true), "originator in --local-net");
    field("local_resp", json!(false), "responder outside --local-net");
    field("missed_start", json!(false), "the agent started first");
    field(
        "iface",
        json!(e.iface),
        "where the first packet was counted",
    );
    let endpoint = |host: &str, port: &str| {
        let h =
            r.0.get(host)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<IpAddr>().ok());
        let p = r.0.get(port).and_then(Value::as_u64);
        (h, p)
    };
    let got_orig = endpoint("id.orig_h", "id.orig_p");
    let got_resp = endpoint("id.resp_h", "id.resp_p");
    if got_orig != (Some(orig.0), Some(u64::from(orig.1)))
        || got_resp != (Some(resp.0), Some(u64::from(resp.1)))
    {
        diffs.push(format!(
            "  orientation: expected orig {orig:?} resp {resp:?}, got orig {got_orig:?} \
             resp {got_resp:?}"
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: record differs from ground truth:\n{}\nrecord: {r}\ngenerator: {}\ntruth: {t:?}",
            e.case,
            diffs.join("\n"),
            e.generator
        ))
    }
}

/// Panics unless the lan host's skbs stood for at least [`MIN_SEGS_PER_SKB`] wire packets
/// each on average: without aggregates the case would prove nothing.
fn assert_upload_aggregated(case: &str, truth: &Truth) {
    let skbs = truth.lan_host.tx_packets;
    assert!(
        skbs > 0 && skbs * MIN_SEGS_PER_SKB <= truth.up().pkts,
        "{case}: no aggregates to prove anything: the lan host's veth sent {skbs} skbs for {} \
         wire packets on the WAN link; {truth:?}",
        truth.up().pkts
    );
}

struct TcpCase {
    name: &'static str,
    v6: bool,
    upload: bool,
    bytes: u64,
    /// Run after [`enable_big_tcp`]: prove skbs above 64 KB.
    big_tcp: bool,
}

const TCP_UPLOAD: TcpCase = TcpCase {
    name: "tcp_upload",
    v6: false,
    upload: true,
    bytes: 20 * MB,
    big_tcp: false,
};
const TCP6_UPLOAD: TcpCase = TcpCase {
    name: "tcp6_upload",
    v6: true,
    upload: true,
    bytes: 10 * MB,
    big_tcp: false,
};
const TCP_DOWNLOAD: TcpCase = TcpCase {
    name: "tcp_download",
    v6: false,
    upload: false,
    bytes: 20 * MB,
    big_tcp: false,
};
const BIG_TCP_UPLOAD: TcpCase = TcpCase {
    name: "big_tcp_upload",
    v6: false,
    upload: true,
    bytes: 20 * MB,
    big_tcp: true,
};

fn tcp_case(lab: &Lab, config: Config, c: &TcpCase) -> Expect {
    let case = format!("[{config:?}] {}", c.name);
    let (upload, bytes) = (c.upload, c.bytes);
    let (_, wan) = lab::hosts(c.v6);
    let server = SocketAddr::new(wan, TCP_PORT);
    let big_tcp_tap = c.big_tcp.then(|| {
        LongFrameTap::open(
            &lab.lan,
            &lab.lan_if,
            (IPV4_MAX_TOTAL_LEN + ETH_HEADER) as u32,
        )
    });
    let (t, truth) = measure(lab, || {
        if upload {
            traffic::tcp_upload(&lab.lan, &lab.wan, server, bytes)
        } else {
            traffic::tcp_download(&lab.lan, &lab.wan, server, bytes)
        }
    });
    let (sent, received) = if upload {
        (t.client_sent, t.server_received)
    } else {
        (t.server_sent, t.client_received)
    };
    assert_eq!((sent, received), (bytes, bytes), "{case}: generator: {t:?}");
    if upload {
        assert_upload_aggregated(&case, &truth);
    } else {
        let skbs = truth.gw_skbs_from_wan();
        assert!(
            skbs > 0 && skbs * MIN_SEGS_PER_SKB <= truth.down().pkts,
            "{case}: no GRO aggregates to prove anything: gw's IP layer took in {skbs} skbs \
             from the WAN side for {} wire packets; {truth:?}",
            truth.down().pkts
        );
    }
    if let Some(tap) = big_tcp_tap {
        let (long, longest) = tap.drain();
        assert!(
            long > 0,
            "{case}: no BIG TCP aggregates: the lan host sent no frame longer than {} B \
             ({} skbs in all); gso_ipv4_max_size {BIG_TCP_SIZE}",
            IPV4_MAX_TOTAL_LEN + ETH_HEADER,
            truth.lan_host.tx_packets
        );
        eprintln!("{case}: {long} skbs above 64 KB, the longest a {longest} B frame");
    }
    eprintln!(
        "{case}: wire up {:?} down {:?}; lan host skbs {}, gw IPv4 skbs in {}",
        truth.up(),
        truth.down(),
        truth.lan_host.tx_packets,
        truth.gw_ip_in
    );
    Expect {
        case,
        proto: "tcp",
        orig: t.client,
        resp: t.server,
        truth,
        orig_bytes: t.client_sent,
        resp_bytes: t.server_sent,
        conn_state: "SF",
        iface: config.record_iface(lab).to_string(),
        generator: format!("{t:?}"),
    }
}

fn udp_gso_case(lab: &Lab, config: Config) -> Expect {
    let case = format!("[{config:?}] udp_gso_upload");
    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), UDP_PORT);
    let (u, truth) = measure(lab, || udp_gso_upload(lab, server));
    let datagrams = UDP_SENDS * UDP_SEGS_PER_SEND;
    let payload = UDP_SENDS * UDP_SEND_BYTES as u64;
    assert_eq!(
        (u.bytes_sent, u.datagrams_received, u.bytes_received),
        (payload, datagrams, payload),
        "{case}: generator: {u:?}"
    );
    assert!(
        u.largest_datagram <= UDP_GSO_SIZE,
        "{case}: UDP_SEGMENT ignored: {u:?}"
    );
    // The wire truth agrees with the generator: each datagram with its IPv4 and UDP header.
    assert_eq!(
        (truth.up(), truth.down()),
        (
            Wire {
                pkts: datagrams,
                ip_bytes: payload + datagrams * (20 + 8)
            },
            Wire {
                pkts: 0,
                ip_bytes: 0
            }
        ),
        "{case}: WAN link counters vs generator {u:?}; {truth:?}"
    );
    assert_upload_aggregated(&case, &truth);
    eprintln!(
        "{case}: wire up {:?}; lan host skbs {}",
        truth.up(),
        truth.lan_host.tx_packets
    );
    Expect {
        case,
        proto: "udp",
        orig: u.client,
        resp: u.server,
        truth,
        orig_bytes: u.bytes_sent,
        resp_bytes: 0,
        conn_state: "S0",
        iface: config.record_iface(lab).to_string(),
        generator: format!("{u:?}"),
    }
}

fn run(config: Config) {
    let lab = Lab::new();
    set_offloads(&lab);
    let agent = config.start_agent(&lab);
    let mut expects = vec![
        tcp_case(&lab, config, &TCP_UPLOAD),
        tcp_case(&lab, config, &TCP6_UPLOAD),
        tcp_case(&lab, config, &TCP_DOWNLOAD),
        udp_gso_case(&lab, config),
    ];
    // Last: the raised limits apply to every later connection.
    enable_big_tcp(&lab);
    expects.push(tcp_case(&lab, config, &BIG_TCP_UPLOAD));
    let records = agent.stop();
    let failures: Vec<String> = expects
        .iter()
        .filter_map(|e| check(&records, e).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n\n{}",
        failures.len(),
        expects.len(),
        failures.join("\n\n")
    );
}

#[test]
fn xdp_ingress_tc_egress() {
    run(Config::XdpWan);
}

#[test]
fn tc_ingress_tc_egress() {
    run(Config::TcWan);
}

#[test]
fn tc_on_both_gw_interfaces() {
    run(Config::TcBoth);
}
