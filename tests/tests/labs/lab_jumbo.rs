//! Jumbo frames injected through an AF_PACKET socket, as tcpreplay does, into a watched
//! interface with MTU 9000. AF_PACKET builds a frame of more than a page from pages,
//! with only the Ethernet header in the skb's linear part: TC ingress must read the IP
//! and L4 headers beyond it, and count every frame exactly.
//!
//! ```text
//! inj [inj0] --veth, MTU 9000-- [host0] host (the agent, TC ingress)
//! ```
//!
//! The frames go to addresses the host does not have, and it does not forward: they are
//! dropped after the agent counted them, and nothing answers.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use tests::{
    agent::{Agent, ConnRecord},
    lab::{self, add_namespace, counters, delete_namespaces, ip, run_in_ns},
    packet::{
        Frame,
        tcp_flags::{ACK, PSH},
    },
};

const MTU: &str = "9000";
const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const DST4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 99);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces and the veth between them; deleted on drop.
struct Pair {
    inj: String,
    host: String,
}

impl Pair {
    fn new() -> Pair {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pair = Pair {
            inj: format!("emj{}-{n}-inj", std::process::id()),
            host: format!("emj{}-{n}-host", std::process::id()),
        };
        add_namespace(&pair.inj);
        add_namespace(&pair.host);
        ip(&[
            "-n", &pair.inj, "link", "add", "inj0", "mtu", MTU, "type", "veth", "peer", "name",
            "host0", "mtu", MTU, "netns", &pair.host,
        ]);
        ip(&[
            "-n",
            &pair.host,
            "addr",
            "add",
            "198.18.1.1/24",
            "dev",
            "host0",
        ]);
        for (ns, dev) in [
            (&pair.inj, "inj0"),
            (&pair.host, "host0"),
            (&pair.host, "lo"),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        lab::wait_quiet(&pair.interfaces());
        pair
    }

    fn interfaces(&self) -> [(&str, &str); 2] {
        [(&self.inj, "inj0"), (&self.host, "host0")]
    }

    fn host_mac(&self) -> [u8; 6] {
        let text = ip(&["-n", &self.host, "-j", "link", "show", "dev", "host0"]);
        let json: serde_json::Value = serde_json::from_str(&text).expect("ip -j is JSON");
        let text = json[0]["address"].as_str().expect("a MAC address");
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16).expect("hex");
        }
        mac
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        delete_namespaces(&[&self.inj, &self.host]);
    }
}

/// Sends each frame once out of `dev` in `ns` through one AF_PACKET socket.
fn inject(ns: &str, dev: &'static str, frames: Vec<Vec<u8>>) {
    run_in_ns(ns, move || {
        let name = std::ffi::CString::new(dev).expect("interface name");
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {dev}");
        // Protocol 0: the socket only sends.
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        for frame in frames {
            // SAFETY: buffer and address are valid for the lengths given.
            let sent = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(
                sent,
                frame.len() as isize,
                "send a {}-byte frame on {dev}: {}",
                frame.len(),
                io::Error::last_os_error()
            );
        }
    });
}

/// One flow of the injection: `n` copies of `frame`.
struct Flow {
    proto: &'static str,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    frame: Frame,
    n: u64,
}

#[test]
fn jumbo_frames_injected_through_af_packet_count_exactly() {
    let pair = Pair::new();
    let host_mac = pair.host_mac();
    let eth = || Frame::eth().macs([0x02, 0, 0, 0, 0x99, 1], host_mac);
    let flows = [
        Flow {
            proto: "udp",
            src: (SRC4.into(), 40000),
            dst: (DST4.into(), 9000),
            frame: eth().ipv4(SRC4, DST4).udp(40000, 9000).payload_len(8000),
            n: 40,
        },
        Flow {
            proto: "tcp",
            src: (SRC4.into(), 40001),
            dst: (DST4.into(), 443),
            frame: eth()
                .ipv4(SRC4, DST4)
                .tcp(40001, 443, PSH | ACK)
                .tcp_options(12)
                .payload_len(8500),
            n: 20,
        },
        Flow {
            proto: "udp",
            src: (SRC6.into(), 40002),
            dst: (DST6.into(), 9000),
            frame: eth().ipv6(SRC6, DST6).udp(40002, 9000).payload_len(8900),
            n: 20,
        },
    ];
    let frames: Vec<Vec<u8>> = flows
        .iter()
        .flat_map(|f| std::iter::repeat_n(f.frame.build(), f.n as usize))
        .collect();
    let frame_bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    assert!(frames.iter().all(|f| f.len() > 8000 && f.len() <= 9014));

    let agent = Agent::start(&pair.host, "host0", &["--poll-interval", "200ms"]);
    lab::wait_quiet(&pair.interfaces());
    let before = counters(&pair.host, "host0");
    inject(&pair.inj, "inj0", frames.clone());
    lab::wait_quiet(&pair.interfaces());
    let rx = counters(&pair.host, "host0").since(before);
    let records = agent.stop();

    assert_eq!(
        (rx.rx_packets, rx.rx_bytes),
        (frames.len() as u64, frame_bytes),
        "host0 received exactly the injected frames"
    );
    let all = || {
        records
            .iter()
            .map(ConnRecord::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    for flow in &flows {
        let found: Vec<_> = records
            .iter()
            .filter(|r| r.is_between(flow.proto, flow.src, flow.dst))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {} record {:?} -> {:?}:\n{}",
            flow.proto,
            flow.src,
            flow.dst,
            all()
        );
        let r = found[0];
        let layout = flow.frame.layout();
        assert_eq!(
            (
                r.u64("orig_pkts"),
                r.u64("orig_ip_bytes"),
                r.u64("orig_bytes"),
                r.u64("resp_pkts"),
            ),
            (
                flow.n,
                flow.n * layout.ip_len as u64,
                flow.n * layout.payload_len as u64,
                0
            ),
            "{r}"
        );
    }
    assert_eq!(
        records.len(),
        flows.len(),
        "only the injected flows:\n{}",
        all()
    );
}
