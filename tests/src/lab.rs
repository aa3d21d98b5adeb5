//! A gateway lab built from network namespaces:
//!
//! ```text
//! lan host [lan0] --veth-- [gw-lan] gw [gw-wan] --veth-- [wan0] wan host
//! ```
//!
//! Each `Lab` owns three namespaces named uniquely per test and run, and deletes them when
//! dropped, also on panic. The lab is kept quiet (static neighbours, no DAD, no router
//! solicitations, no link-local addresses) so interface counters count only a test's own
//! traffic, and TCP in it retransmits only what was lost (nothing is).
//!
//! Both ends of the WAN link have TSO, GSO, UDP segmentation and GSO lists off: the stack
//! segments before their tx counters, which therefore count wire packets.

use std::{
    fs::File,
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

pub const LAN_HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const GW_LAN_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const GW_WAN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const WAN_HOST_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const LAN_HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const GW_LAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const GW_WAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const WAN_HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);

/// The local networks as the agent's `--local-net` takes them.
pub const LOCAL_NET_V4: &str = "198.18.0.0/15";
pub const LOCAL_NET_V6: &str = "2001:db8:1::/48";

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HEADER: u64 = 14;

const LAN_HOST_MAC: &str = "02:00:00:00:01:02";
const GW_LAN_MAC: &str = "02:00:00:00:01:01";
const GW_WAN_MAC: &str = "02:00:00:00:02:01";
const WAN_HOST_MAC: &str = "02:00:00:00:02:02";

/// Limit for one helper command (`ip`, `ethtool`).
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// How long [`run_within`] waits for the output of a command it had to kill.
const KILLED_OUTPUT_LIMIT: Duration = Duration::from_secs(2);
const QUIET_FOR: Duration = Duration::from_secs(1);
const QUIET_LIMIT: Duration = Duration::from_secs(15);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
/// Concurrent first-time `ip netns add` calls race on mounting /run/netns.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// One interface's counters (`stats64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl Counters {
    /// `self - earlier`; panics if a counter went backwards.
    pub fn since(self, earlier: Counters) -> Counters {
        let sub = |now: u64, then: u64, what: &str| {
            now.checked_sub(then)
                .unwrap_or_else(|| panic!("{what} went backwards: {then} -> {now}"))
        };
        Counters {
            rx_packets: sub(self.rx_packets, earlier.rx_packets, "rx_packets"),
            rx_bytes: sub(self.rx_bytes, earlier.rx_bytes, "rx_bytes"),
            tx_packets: sub(self.tx_packets, earlier.tx_packets, "tx_packets"),
            tx_bytes: sub(self.tx_bytes, earlier.tx_bytes, "tx_bytes"),
        }
    }

    /// IP bytes transmitted: the tx byte counter less `l2_bytes` per packet (see
    /// [`Lab::tx_l2_bytes`]).
    pub fn tx_ip_bytes(self, l2_bytes: u64) -> u64 {
        self.tx_bytes
            .checked_sub(l2_bytes * self.tx_packets)
            .unwrap_or_else(|| panic!("{self:?}: tx_bytes < {l2_bytes} B per tx packet"))
    }
}

/// Counters of both ends of the WAN link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WanCounters {
    /// gw's WAN-facing veth: its tx is the upload (lan -> wan) direction.
    pub gw_wan: Counters,
    /// The wan host's veth: its tx is the download (wan -> lan) direction.
    pub wan_host: Counters,
}

impl WanCounters {
    pub fn since(self, earlier: WanCounters) -> WanCounters {
        WanCounters {
            gw_wan: self.gw_wan.since(earlier.gw_wan),
            wan_host: self.wan_host.since(earlier.wan_host),
        }
    }
}

/// Counters of both ends of the LAN link: the LAN host's own traffic, before any
/// translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LanCounters {
    /// The lan host's veth: its tx is what the host sent.
    pub lan_host: Counters,
    /// gw's LAN-facing veth: its tx is what the host received.
    pub gw_lan: Counters,
}

impl LanCounters {
    pub fn since(self, earlier: LanCounters) -> LanCounters {
        LanCounters {
            lan_host: self.lan_host.since(earlier.lan_host),
            gw_lan: self.gw_lan.since(earlier.gw_lan),
        }
    }
}

pub struct Lab {
    /// Namespace names.
    pub lan: String,
    pub gw: String,
    pub wan: String,
    /// The lan host's veth (in `lan`).
    pub lan_if: String,
    /// gw's LAN-facing veth (in `gw`).
    pub gw_lan_if: String,
    /// gw's WAN-facing veth (in `gw`).
    pub gw_wan_if: String,
    /// The wan host's veth (in `wan`).
    pub wan_if: String,
    children: Mutex<Vec<Child>>,
}

impl Lab {
    /// Builds the lab and returns once its interfaces are quiet.
    pub fn new() -> Lab {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("eml{}-{n}", std::process::id());
        let lab = Lab {
            lan: format!("{prefix}-lan"),
            gw: format!("{prefix}-gw"),
            wan: format!("{prefix}-wan"),
            lan_if: "lan0".into(),
            gw_lan_if: "gw-lan".into(),
            gw_wan_if: "gw-wan".into(),
            wan_if: "wan0".into(),
            children: Mutex::new(Vec::new()),
        };
        // From here on Drop removes whatever part was built.
        lab.build();
        lab.wait_quiet();
        lab
    }

    fn build(&self) {
        for ns in [&self.lan, &self.gw, &self.wan] {
            add_namespace(ns);
        }
        set_sysctls(
            &self.gw,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
                ("net/ipv6/conf/default/forwarding", "1"),
            ],
        );

        // Both ends are created inside their namespaces, so names cannot clash between labs.
        add_veth(
            (&self.gw, &self.gw_lan_if, GW_LAN_MAC),
            (&self.lan, &self.lan_if, LAN_HOST_MAC),
        );
        add_veth(
            (&self.gw, &self.gw_wan_if, GW_WAN_MAC),
            (&self.wan, &self.wan_if, WAN_HOST_MAC),
        );

        segmentation_off(&self.gw, &self.gw_wan_if);
        segmentation_off(&self.wan, &self.wan_if);

        // (ns, dev, own v4, own v6, peer v4, peer v6, peer MAC)
        let links: [(&str, &str, &str, &str, &str, &str, &str); 4] = [
            (
                &self.lan,
                &self.lan_if,
                "198.18.1.2/24",
                "2001:db8:1::2/64",
                "198.18.1.1",
                "2001:db8:1::1",
                GW_LAN_MAC,
            ),
            (
                &self.gw,
                &self.gw_lan_if,
                "198.18.1.1/24",
                "2001:db8:1::1/64",
                "198.18.1.2",
                "2001:db8:1::2",
                LAN_HOST_MAC,
            ),
            (
                &self.gw,
                &self.gw_wan_if,
                "203.0.113.1/24",
                "2001:db8:2::1/64",
                "203.0.113.2",
                "2001:db8:2::2",
                WAN_HOST_MAC,
            ),
            (
                &self.wan,
                &self.wan_if,
                "203.0.113.2/24",
                "2001:db8:2::2/64",
                "203.0.113.1",
                "2001:db8:2::1",
                GW_WAN_MAC,
            ),
        ];
        for (ns, dev, v4, v6, peer4, peer6, peer_mac) in links {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"]);
            for peer in [peer4, peer6] {
                permanent_neighbour(ns, dev, peer, peer_mac);
            }
        }
        for (ns, dev) in self.interfaces() {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for ns in [&self.lan, &self.gw, &self.wan] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n",
            &self.lan,
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "198.18.1.1",
        ]);
        ip(&[
            "-n",
            &self.lan,
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            "2001:db8:1::1",
        ]);
        ip(&[
            "-n",
            &self.wan,
            "route",
            "add",
            LOCAL_NET_V4,
            "via",
            "203.0.113.1",
        ]);
        ip(&[
            "-n",
            &self.wan,
            "-6",
            "route",
            "add",
            LOCAL_NET_V6,
            "via",
            "2001:db8:2::1",
        ]);
    }

    /// The lab as most IPv4 gateways are: gw's default routes leave through its WAN veth,
    /// gw masquerades what leaves there (nftables `inet`, so IPv6 too), and the wan host has
    /// no route back to the LAN: only translated packets come back. Segmentation is off on
    /// the LAN link as well, so the counters of its two ends count the LAN host's wire
    /// packets, the ground truth behind NAT.
    pub fn masquerading() -> Lab {
        let lab = Lab::routed_to_wan();
        nft(&lab.gw, &["add", "table", "inet", "nat"]);
        nft(
            &lab.gw,
            &["add chain inet nat prerouting { type nat hook prerouting priority dstnat; }"],
        );
        nft(
            &lab.gw,
            &["add chain inet nat postrouting { type nat hook postrouting priority srcnat; }"],
        );
        let wan = lab.gw_wan_if.clone();
        nft(
            &lab.gw,
            &[
                "add",
                "rule",
                "inet",
                "nat",
                "postrouting",
                "oifname",
                &wan,
                "masquerade",
            ],
        );
        lab.wait_quiet();
        lab
    }

    /// Like [`masquerading`](Self::masquerading), translating IPv4 with an iptables rule
    /// (`iptables-nft`, Debian's default) that sources what leaves the WAN veth from gw's
    /// WAN address (`SNAT --to-source`).
    pub fn snat_with_iptables() -> Lab {
        let lab = Lab::routed_to_wan();
        require_tool("iptables", "iptables");
        let wan = lab.gw_wan_if.clone();
        let to = GW_WAN_V4.to_string();
        ns_exec(
            &lab.gw,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                &wan,
                "-j",
                "SNAT",
                "--to-source",
                &to,
            ],
        );
        lab.wait_quiet();
        lab
    }

    /// The lab with gw's default routes through the wan host, which has no route back to
    /// the LAN, and segmentation off on the LAN link.
    fn routed_to_wan() -> Lab {
        let lab = Lab::new();
        segmentation_off(&lab.lan, &lab.lan_if);
        segmentation_off(&lab.gw, &lab.gw_lan_if);
        ip(&["-n", &lab.wan, "route", "del", LOCAL_NET_V4]);
        ip(&["-n", &lab.wan, "-6", "route", "del", LOCAL_NET_V6]);
        ip(&[
            "-n",
            &lab.gw,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.2",
        ]);
        ip(&[
            "-n",
            &lab.gw,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:2::2",
        ]);
        lab
    }

    /// A port forward on a [`masquerading`](Self::masquerading) gw: TCP port `public` of its
    /// WAN address goes to the lan host's port `private` (nftables `dnat`).
    pub fn forward_port(&self, public: u16, private: u16) {
        let rule = format!(
            "add rule inet nat prerouting iifname {} ip daddr {GW_WAN_V4} tcp dport {public} \
             dnat ip to {LAN_HOST_V4}:{private}",
            self.gw_wan_if
        );
        nft(&self.gw, &[&rule]);
    }

    pub fn lan_counters(&self) -> LanCounters {
        LanCounters {
            lan_host: counters(&self.lan, &self.lan_if),
            gw_lan: counters(&self.gw, &self.gw_lan_if),
        }
    }

    /// Every lab veth as (namespace, interface).
    pub fn interfaces(&self) -> [(&str, &str); 4] {
        [
            (&self.lan, &self.lan_if),
            (&self.gw, &self.gw_lan_if),
            (&self.gw, &self.gw_wan_if),
            (&self.wan, &self.wan_if),
        ]
    }

    pub fn wan_counters(&self) -> WanCounters {
        WanCounters {
            gw_wan: counters(&self.gw, &self.gw_wan_if),
            wan_host: counters(&self.wan, &self.wan_if),
        }
    }

    /// How many bytes beyond the IP packet `dev`'s tx byte counter counts per frame,
    /// measured by sending one non-IP frame of known size. A veth counts the Ethernet header
    /// (14) unless its peer receives through NAPI (XDP attached, or GRO on): then the kernel
    /// counts the frame after stripping the header (0). Call it with the lab quiet.
    pub fn tx_l2_bytes(&self, ns: &str, dev: &str) -> u64 {
        const PAYLOAD: usize = 50;
        let (own, peer) = self.macs(dev);
        let mut frame = Vec::with_capacity(ETH_HEADER as usize + PAYLOAD);
        frame.extend(peer);
        frame.extend(own);
        // IEEE 802 "local experimental" EtherType: nobody parses it.
        frame.extend([0x88, 0xb5]);
        frame.resize(ETH_HEADER as usize + PAYLOAD, 0);

        let before = counters(ns, dev);
        send_raw_frame(ns, dev, peer, frame);
        let start = Instant::now();
        let delta = loop {
            // The count may land asynchronously (the peer's NAPI poll).
            let delta = counters(ns, dev).since(before);
            if delta.tx_packets > 0 {
                break delta;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{ns}/{dev}: probe frame never counted in tx"
            );
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            delta.tx_packets, 1,
            "{ns}/{dev}: other traffic during the probe: {delta:?}"
        );
        let l2 = delta.tx_bytes.checked_sub(PAYLOAD as u64);
        assert!(
            l2 == Some(ETH_HEADER) || l2 == Some(0),
            "{ns}/{dev}: a {} B frame ({PAYLOAD} B after the Ethernet header) added {} tx bytes",
            ETH_HEADER as usize + PAYLOAD,
            delta.tx_bytes
        );
        l2.unwrap_or_default()
    }

    /// (own MAC, peer MAC) of a lab veth.
    pub fn macs(&self, dev: &str) -> ([u8; 6], [u8; 6]) {
        let (own, peer) = if dev == self.lan_if {
            (LAN_HOST_MAC, GW_LAN_MAC)
        } else if dev == self.gw_lan_if {
            (GW_LAN_MAC, LAN_HOST_MAC)
        } else if dev == self.gw_wan_if {
            (GW_WAN_MAC, WAN_HOST_MAC)
        } else if dev == self.wan_if {
            (WAN_HOST_MAC, GW_WAN_MAC)
        } else {
            panic!("{dev} is not a lab interface")
        };
        (parse_mac(own), parse_mac(peer))
    }

    /// Waits until no lab interface's counters change for a second; panics after 15 s.
    pub fn wait_quiet(&self) {
        wait_quiet(&self.interfaces());
    }

    /// Starts `args` in `ns` in the background; the lab kills it (by PID) when dropped.
    pub fn spawn_in(&self, ns: &str, args: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {ns}: {e}"));
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        pid
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        kill_children(&self.children);
        delete_namespaces(&[&self.lan, &self.gw, &self.wan]);
    }
}

/// A second LAN on a lab's gw: host `lan2` (198.18.2.2, veth `lan2-0`) -- gw (`gw-lan2`,
/// 198.18.2.1). The first lan host reaches it through gw; what leaves for the wan host
/// is translated as the first LAN's is (the masquerade rule matches the WAN veth).
/// Segmentation is off on the link, whose counters count the host's wire packets.
/// Its namespace is deleted when it is dropped: drop it before the lab.
pub struct SecondLan {
    pub ns: String,
    pub host_if: String,
    pub gw_if: String,
}

pub const LAN2_HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

impl SecondLan {
    pub fn attach(lab: &Lab) -> SecondLan {
        let lan2 = SecondLan {
            ns: lab.gw.replace("-gw", "-lan2"),
            host_if: "lan2-0".into(),
            gw_if: "gw-lan2".into(),
        };
        add_namespace(&lan2.ns);
        const GW_MAC: &str = "02:00:00:00:03:01";
        const HOST_MAC: &str = "02:00:00:00:03:02";
        add_veth(
            (&lab.gw, &lan2.gw_if, GW_MAC),
            (&lan2.ns, &lan2.host_if, HOST_MAC),
        );
        segmentation_off(&lab.gw, &lan2.gw_if);
        segmentation_off(&lan2.ns, &lan2.host_if);
        let ends = [
            (
                &lab.gw,
                &lan2.gw_if,
                "198.18.2.1/24",
                "198.18.2.2",
                HOST_MAC,
            ),
            (
                &lan2.ns,
                &lan2.host_if,
                "198.18.2.2/24",
                "198.18.2.1",
                GW_MAC,
            ),
        ];
        for (ns, dev, own, peer, peer_mac) in ends {
            ip(&["-n", ns, "addr", "add", own, "dev", dev]);
            permanent_neighbour(ns, dev, peer, peer_mac);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &lan2.ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &lan2.ns,
            "route",
            "add",
            "default",
            "via",
            "198.18.2.1",
        ]);
        ip(&[
            "-n",
            &lab.lan,
            "route",
            "add",
            "198.18.2.0/24",
            "via",
            "198.18.1.1",
        ]);
        wait_quiet(&[(&lan2.ns, &lan2.host_if), (&lab.gw, &lan2.gw_if)]);
        lan2
    }

    /// Counters of both ends of its link: the host's tx is what it sent, gw's what it
    /// received.
    pub fn counters(&self, lab: &Lab) -> LanCounters {
        LanCounters {
            lan_host: counters(&self.ns, &self.host_if),
            gw_lan: counters(&lab.gw, &self.gw_if),
        }
    }
}

impl Drop for SecondLan {
    fn drop(&mut self) {
        delete_namespaces(&[&self.ns]);
    }
}

/// Waits until the counters of `interfaces` (namespace, device) stay unchanged for a
/// second; panics after 15 s.
pub fn wait_quiet(interfaces: &[(&str, &str)]) {
    let start = Instant::now();
    let snapshot = || {
        interfaces
            .iter()
            .map(|(ns, dev)| counters(ns, dev))
            .collect::<Vec<_>>()
    };
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
        if start.elapsed() > QUIET_LIMIT {
            panic!(
                "lab never went quiet within {QUIET_LIMIT:?}: counters of {interfaces:?} \
                     still changing, last {last:?}"
            );
        }
    }
}

/// Fails the test unless `tool` is on the PATH, naming the Debian `package` that
/// `cargo xtask setup` installs (`ip netns exec` would only fail later, less clearly).
pub fn require_tool(tool: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()),
        "{tool} is not installed: run `cargo xtask setup` (Debian package {package})"
    );
}

/// A veth pair: `(ns, name, MAC)` of each end, both created in their namespaces.
fn add_veth((ns, name, mac): (&str, &str, &str), (peer_ns, peer, peer_mac): (&str, &str, &str)) {
    ip(&[
        "-n", ns, "link", "add", name, "address", mac, "type", "veth", "peer", "name", peer,
        "address", peer_mac, "netns", peer_ns,
    ]);
}

/// A permanent neighbour entry: no ARP or neighbour discovery in the counts.
fn permanent_neighbour(ns: &str, dev: &str, peer: &str, peer_mac: &str) {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        peer,
        "lladdr",
        peer_mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
}

/// `nft ARGS...` in `ns` (nftables, installed by `cargo xtask setup`).
pub fn nft(ns: &str, args: &[&str]) {
    require_tool("nft", "nftables");
    let mut cmd = vec!["nft"];
    cmd.extend_from_slice(args);
    ns_exec(ns, &cmd);
}

/// Creates namespace `ns`, quiet (see `quiet_sysctls`).
pub fn add_namespace(ns: &str) {
    {
        let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "add", ns]);
    }
    quiet_sysctls(ns);
}

/// Kills (SIGKILL, each by its own PID) and reaps the children still running.
pub fn kill_children(children: &Mutex<Vec<Child>>) {
    let children = std::mem::take(&mut *children.lock().unwrap_or_else(|e| e.into_inner()));
    for mut child in children {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Deletes the namespaces that still exist. Called from drops: a failure is reported on
/// stderr, not raised.
pub fn delete_namespaces(names: &[&str]) {
    for ns in names {
        if Path::new("/run/netns").join(ns).exists() {
            let out = run_bounded(Command::new("ip").args(["netns", "del", ns]), COMMAND_LIMIT);
            if !out.status.success() {
                eprintln!(
                    "lab: ip netns del {ns} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Before any interface exists: no DAD, no router solicitations or advertisements, no
/// link-local addresses (whose MLD joins would add packets), quick MLD reports at bring-up,
/// no TCP tail loss probes.
fn quiet_sysctls(ns: &str) {
    let mut settings = Vec::new();
    for conf in ["all", "default"] {
        for (key, value) in [
            ("accept_dad", "0"),
            ("dad_transmits", "0"),
            ("router_solicitations", "0"),
            ("accept_ra", "0"),
            ("addr_gen_mode", "1"),
            ("ndisc_notify", "0"),
            ("mldv1_unsolicited_report_interval", "100"),
            ("mldv2_unsolicited_report_interval", "100"),
        ] {
            settings.push((format!("net/ipv6/conf/{conf}/{key}"), value));
        }
        settings.push((format!("net/ipv4/conf/{conf}/arp_notify"), "0"));
    }
    // On a loaded machine these microsecond-RTT links delay ACKs past the tail loss probe
    // timeout, and veths reorder packets that different CPUs transmit: the resulting
    // spurious retransmissions would put more payload on the wire than the generator wrote.
    // No TLP, no RACK, and a high duplicate-ACK threshold keep TCP from retransmitting
    // anything that was not lost (the lab loses nothing).
    for (key, value) in [
        ("net/ipv4/tcp_early_retrans", "0"),
        ("net/ipv4/tcp_recovery", "0"),
        ("net/ipv4/tcp_reordering", "300"),
    ] {
        settings.push((key.to_string(), value));
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    set_sysctls(ns, &settings);
}

/// Writes /proc/sys entries from a thread inside `ns` (/proc/sys/net follows the
/// writer's network namespace), and reads each back.
pub fn set_sysctls(ns: &str, settings: &[(&str, &str)]) {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ns_name = ns.to_string();
    run_in_ns(ns, move || {
        for (key, value) in settings {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, &value)
                .unwrap_or_else(|e| panic!("in {ns_name}: write {value} to {path}: {e}"));
            let back = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("in {ns_name}: read {path}: {e}"));
            assert_eq!(
                back.trim(),
                value,
                "in {ns_name}: {path} did not take {value}"
            );
        }
    });
}

/// Turns TSO, GSO, UDP segmentation and GSO lists off where the device lets us, so the
/// stack segments before the device counts tx packets.
pub fn segmentation_off(ns: &str, dev: &str) {
    const FEATURES: [&str; 4] = [
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "tx-udp-segmentation",
        "tx-gso-list",
    ];
    let listing = ns_exec(ns, &["ethtool", "-k", dev]);
    let state = |feature: &str| {
        listing.lines().find_map(|line| {
            line.trim()
                .strip_prefix(feature)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|rest| rest.trim().to_string())
        })
    };
    let mut args = vec!["ethtool", "-K", dev];
    for feature in FEATURES {
        match state(feature) {
            Some(s) if s.contains("[fixed]") => {
                assert!(s.starts_with("off"), "{ns}/{dev}: {feature} is fixed {s}")
            }
            Some(_) => args.extend([feature, "off"]),
            None => {}
        }
    }
    if args.len() > 3 {
        ns_exec(ns, &args);
    }
    let listing = ns_exec(ns, &["ethtool", "-k", dev]);
    for feature in FEATURES {
        let line = listing
            .lines()
            .find(|l| l.trim().starts_with(&format!("{feature}:")));
        if let Some(line) = line {
            assert!(
                line.contains(": off"),
                "{ns}/{dev}: {feature} still on after ethtool -K: {line}"
            );
        }
    }
}

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("MAC constant");
    }
    mac
}

/// Sends one raw Ethernet frame out of `dev` in `ns` through an AF_PACKET socket.
pub fn send_raw_frame(ns: &str, dev: &str, dst: [u8; 6], frame: Vec<u8>) {
    let dev = dev.to_string();
    let ns_name = ns.to_string();
    run_in_ns(ns, move || {
        // Protocol 0: the socket sends only, it receives nothing.
        let (fd, ifindex) = packet_socket(&ns_name, &dev, libc::SOCK_RAW, 0);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
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
            "in {ns_name}: send probe frame on {dev}: {}",
            io::Error::last_os_error()
        );
    });
}

/// An AF_PACKET socket of `kind` (`SOCK_RAW`, `SOCK_DGRAM`) for `protocol` (network byte
/// order), in the calling thread's namespace (`ns_name`, for messages), and the index of
/// interface `dev` there.
pub fn packet_socket(ns_name: &str, dev: &str, kind: i32, protocol: u16) -> (OwnedFd, i32) {
    let name = std::ffi::CString::new(dev).expect("interface name");
    // SAFETY: `name` is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "in {ns_name}: no interface {dev}");
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            kind | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    assert!(
        fd >= 0,
        "in {ns_name}: AF_PACKET socket: {}",
        io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    (fd, ifindex as i32)
}

/// Reads an interface's counters with `ip -s -j link show`.
pub fn counters(ns: &str, dev: &str) -> Counters {
    let text = ip(&["-n", ns, "-s", "-j", "link", "show", "dev", dev]);
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ip -j output for {ns}/{dev} is not JSON ({e}): {text}"));
    let stats = &json[0]["stats64"];
    let get = |dir: &str, what: &str| {
        stats[dir][what]
            .as_u64()
            .unwrap_or_else(|| panic!("no stats64.{dir}.{what} for {ns}/{dev} in {text}"))
    };
    Counters {
        rx_packets: get("rx", "packets"),
        rx_bytes: get("rx", "bytes"),
        tx_packets: get("tx", "packets"),
        tx_bytes: get("tx", "bytes"),
    }
}

/// Runs `ip ARGS`; panics with its stderr unless it succeeds. Returns stdout.
pub fn ip(args: &[&str]) -> String {
    checked(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
}

/// Runs `ARGS` inside `ns` (`ip netns exec`); panics with its stderr unless it succeeds.
pub fn ns_exec(ns: &str, args: &[&str]) -> String {
    checked(
        Command::new("ip").args(["netns", "exec", ns]).args(args),
        &format!("in {ns}: {}", args.join(" ")),
    )
}

/// `/proc/net/snmp` of a namespace: its kernel's protocol counters.
pub struct Snmp {
    ns: String,
    text: String,
}

impl Snmp {
    pub fn read(ns: &str) -> Snmp {
        Snmp {
            ns: ns.to_owned(),
            text: ns_exec(ns, &["cat", "/proc/net/snmp"]),
        }
    }

    /// Counter `name` of `group` (`Ip`, `Tcp`, ...); panics when there is none.
    pub fn get(&self, group: &str, name: &str) -> u64 {
        let prefix = format!("{group}: ");
        let mut lines = self.text.lines().filter(|l| l.starts_with(&prefix));
        lines
            .next()
            .zip(lines.next())
            .and_then(|(names, values)| {
                names
                    .split_whitespace()
                    .zip(values.split_whitespace())
                    .find(|(n, _)| *n == name)
            })
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "in {}: no {group}: {name} in /proc/net/snmp:\n{}",
                    self.ns, self.text
                )
            })
    }
}

/// Runs `ARGS` inside `ns`, killed after `limit`; the caller judges the exit status.
pub fn ns_output(ns: &str, args: &[&str], limit: Duration) -> Output {
    run_bounded(
        Command::new("ip").args(["netns", "exec", ns]).args(args),
        limit,
    )
}

fn checked(cmd: &mut Command, what: &str) -> String {
    let out = run_bounded(cmd, COMMAND_LIMIT);
    if !out.status.success() {
        panic!(
            "{what}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command to completion with its output captured; kills it (by PID) and panics
/// if it takes longer than `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    run_within(cmd, limit).unwrap_or_else(|_| panic!("{cmd:?} did not finish within {limit:?}"))
}

/// Like [`run_bounded`], but a command still running after `limit` is killed (by PID),
/// reaped, and returned as `Err` with what it printed, for the caller to explain.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Result<Output, Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let (status, finished) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, true),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let status = child.wait().unwrap_or_else(|e| panic!("reap {cmd:?}: {e}"));
                break (status, false);
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    // A killed command's children may still hold its pipes open: take what has come.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        if finished {
            rx.recv().unwrap_or_default()
        } else {
            rx.recv_timeout(KILLED_OUTPUT_LIMIT).unwrap_or_default()
        }
    };
    let out = Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    };
    if finished { Ok(out) } else { Err(out) }
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates
/// belong to `ns` (and keep belonging to it when used from other threads). A panic in
/// `f` is re-raised here.
pub fn run_in_ns<T, F>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match spawn_in_ns(ns, f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Like [`run_in_ns`] but returns the thread's handle at once.
pub fn spawn_in_ns<T, F>(ns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    thread::Builder::new()
        .name(format!("ns {ns}"))
        .spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: plain syscall on a valid fd; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                panic!(
                    "setns({path}, CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                );
            }
            drop(file);
            f()
        })
        .expect("spawn namespace thread")
}

/// The lan host's and the wan host's address of one family.
pub fn hosts(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (LAN_HOST_V6.into(), WAN_HOST_V6.into())
    } else {
        (LAN_HOST_V4.into(), WAN_HOST_V4.into())
    }
}

#[cfg(test)]
mod self_tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn run_within_kills_a_command_past_its_limit_and_keeps_its_output() {
        let start = Instant::now();
        let out = run_within(
            Command::new("sh").args(["-c", "echo started >&2; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .expect_err("sleep 30 outlives the limit");
        assert!(start.elapsed() < Duration::from_secs(5), "killed promptly");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "started\n");
        assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn run_within_returns_a_finished_command() {
        let out = run_within(Command::new("sh").args(["-c", "echo done"]), COMMAND_LIMIT)
            .expect("echo finishes");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    }
}
