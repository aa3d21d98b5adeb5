//! Support for the DNS labs (`tests/labs/lab_dns.rs`): dnsmasq as the "Internet" resolver on
//! the wan host, and a stub resolver that the tests drive from the lan host (its own
//! minimal encoder and decoder: the ground truth does not come from the agent's parser).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use crate::lab::{Lab, ip, run_in_ns};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Fails naming the bootstrap when a tool is missing: a test never silently skips.
pub fn require(tool: &str) {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(tool).exists());
    assert!(found, "{tool} is missing: run `cargo xtask setup`");
}

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;

/// A query for `name` of type `qtype`, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m
}

/// The response to `query` (one question) a server of the test's own would send: `rcode`,
/// and an A record with `addr` for the question's name when there is one (TTL 60).
pub fn response(query: &[u8], rcode: u8, addr: Option<std::net::Ipv4Addr>) -> Vec<u8> {
    let question_end = skip_name(query, 12) + 4;
    let mut m = query[..question_end].to_vec();
    m[2] |= 0x80;
    m[3] = 0x80 | rcode;
    if let Some(addr) = addr {
        m[7] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        m.extend_from_slice(&addr.octets());
    }
    m
}

/// The name a message's first question asks for, dotted.
pub fn decode_question(m: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut at = 12;
    while m[at] != 0 {
        let len = m[at] as usize;
        labels.push(String::from_utf8_lossy(&m[at + 1..at + 1 + len]).into_owned());
        at += 1 + len;
    }
    labels.join(".")
}

/// What a response said: its rcode and the A/AAAA addresses among its answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub rcode: u8,
    pub addrs: Vec<IpAddr>,
}

fn skip_name(m: &[u8], mut at: usize) -> usize {
    loop {
        let len = m[at] as usize;
        if len == 0 {
            return at + 1;
        }
        if len & 0xc0 == 0xc0 {
            return at + 2;
        }
        at += 1 + len;
    }
}

/// Decodes a response to a query with one question.
pub fn decode(m: &[u8]) -> Answer {
    assert!(m.len() >= 12, "short DNS response {m:02x?}");
    let count = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]) as usize;
    let mut at = skip_name(m, 12) + 4;
    let mut addrs = Vec::new();
    for _ in 0..count(6) {
        at = skip_name(m, at);
        let ty = count(at) as u16;
        let rdlen = count(at + 8);
        let rdata = &m[at + 10..at + 10 + rdlen];
        match (ty, rdlen) {
            (TYPE_A, 4) => addrs.push(IpAddr::from(<[u8; 4]>::try_from(rdata).expect("4"))),
            (TYPE_AAAA, 16) => addrs.push(IpAddr::from(<[u8; 16]>::try_from(rdata).expect("16"))),
            _ => {}
        }
        at += 10 + rdlen;
    }
    Answer {
        rcode: m[3] & 0x0f,
        addrs,
    }
}

/// Resolves `name` from namespace `ns` through `server`, over UDP or TCP; retries a lost
/// UDP datagram twice.
pub fn resolve(ns: &str, server: SocketAddr, name: &str, qtype: u16, tcp: bool) -> Answer {
    let q = query(0x4242, name, qtype);
    let name = name.to_owned();
    run_in_ns(ns, move || {
        if tcp {
            let mut s = TcpStream::connect_timeout(&server, IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP to resolver {server}: {e}"));
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            s.write_all(&framed).expect("send TCP query");
            let mut len = [0u8; 2];
            s.read_exact(&mut len).expect("TCP response length");
            let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut m).expect("TCP response");
            return decode(&m);
        }
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let sock = UdpSocket::bind(bind).expect("bind UDP");
        sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 4096];
        for _ in 0..3 {
            sock.send_to(&q, server).expect("send UDP query");
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                return decode(&buf[..n]);
            }
        }
        panic!("no answer from {server} for {name}")
    })
}

/// dnsmasq on the wan host's addresses (port 53, UDP and TCP) with static answers, no
/// upstream, no files of the host; killed with the lab.
pub fn start_dnsmasq(lab: &Lab, answers: &[&str]) -> SocketAddr {
    require("dnsmasq");
    let mut args = vec![
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--listen-address=203.0.113.2",
        "--listen-address=2001:db8:2::2",
        "--pid-file=",
        "--user=root",
        "--cache-size=0",
    ];
    args.extend_from_slice(answers);
    lab.spawn_in(&lab.wan, &args);
    let server: SocketAddr = "203.0.113.2:53".parse().expect("addr");
    let start = Instant::now();
    loop {
        let up = run_in_ns(&lab.lan, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            sock.send_to(&query(1, "up.invalid", TYPE_A), server)
                .expect("send");
            sock.recv_from(&mut [0u8; 512]).is_ok()
        });
        if up {
            return server;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dnsmasq did not answer within 10 s"
        );
    }
}

/// Gives the wan host `addr` as a further address and gw a permanent neighbour entry for
/// it (no ARP or neighbour discovery in the counts).
pub fn add_wan_address(lab: &Lab, addr: IpAddr) {
    let text = ip(&["-n", &lab.wan, "-j", "link", "show", "dev", &lab.wan_if]);
    let json: serde_json::Value = serde_json::from_str(&text).expect("ip -j link is JSON");
    let mac = json[0]["address"].as_str().expect("MAC").to_string();
    let (cidr, family) = match addr {
        IpAddr::V4(a) => (format!("{a}/32"), "-4"),
        IpAddr::V6(a) => (format!("{a}/128"), "-6"),
    };
    let mut args = vec![
        "-n",
        &lab.wan,
        family,
        "addr",
        "add",
        &cidr,
        "dev",
        &lab.wan_if,
    ];
    if addr.is_ipv6() {
        args.push("nodad");
    }
    ip(&args);
    ip(&[
        "-n",
        &lab.gw,
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        &mac,
        "dev",
        &lab.gw_wan_if,
        "nud",
        "permanent",
    ]);
}

/// The wan host's IPv6 resolver address.
pub fn resolver_v6() -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2)),
        53,
    )
}
