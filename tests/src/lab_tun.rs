//! A gateway whose default route is a tun device, as with OpenVPN:
//!
//! ```text
//! lan host [lan0] --veth-- [gw-lan] gw [tun0] ~~ socat ~~ [tun0] wan host
//!                                      [gw-wan] --veth-- [wan0]   (the tunnel's UDP)
//! ```
//!
//! socat in gw and in the wan namespace each own a tun device (no link-layer header:
//! `link/none`) and carry its packets in UDP datagrams across the veth between them. The
//! gateway's public address (203.0.113.1) and the Internet host's (203.0.113.2) are on the
//! tunnel; the veth between them is the tunnel's underlay (192.0.2.0/24). The gateway's
//! default route is its tun device, so an agent started with its defaults watches it.
//!
//! tun counts in its counters what it hands socat (tx) and what socat writes into it (rx):
//! IP packets, without link-layer bytes and after software segmentation, so they are the
//! wire figures of the tunnel. The tun's queue is large enough for a TCP window, so nothing
//! the agent counted at TC egress is dropped before the counter.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::lab::{
    Counters, LOCAL_NET_V4, add_namespace, counters, delete_namespaces, ip, kill_children, nft,
    require_tool, set_sysctls, wait_quiet,
};

pub const LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The gateway's public address, on its tun device.
pub const GW_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The Internet host, at the far end of the tunnel.
pub const WAN_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The tun devices' name in gw and in the wan namespace.
pub const TUN: &str = "tun0";

const UNDERLAY_GW: &str = "192.0.2.1";
const UNDERLAY_WAN: &str = "192.0.2.2";
const TUNNEL_PORT: u16 = 4789;
/// Packets on the tunnel: the inner MTU leaves room for the outer IP and UDP headers and
/// tun's 4-byte packet information, so the underlay never fragments.
const TUN_MTU: &str = "1400";
/// tun's transmit ring (txqueuelen): larger than any TCP window here, so a burst waits for
/// socat instead of being dropped after TC egress counted it.
const TUN_QUEUE: &str = "20000";
const TUN_LIMIT: Duration = Duration::from_secs(15);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

pub struct TunLab {
    pub lan: String,
    pub gw: String,
    pub wan: String,
    pub lan_if: String,
    pub gw_lan_if: String,
    children: Mutex<Vec<Child>>,
}

impl TunLab {
    /// Builds the lab (socat included) and returns once its interfaces are quiet.
    pub fn new() -> TunLab {
        require_tool("socat", "socat");
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("emt{}-{n}", std::process::id());
        let lab = TunLab {
            lan: format!("{prefix}-lan"),
            gw: format!("{prefix}-gw"),
            wan: format!("{prefix}-wan"),
            lan_if: "lan0".into(),
            gw_lan_if: "gw-lan".into(),
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
        set_sysctls(&self.gw, &[("net/ipv4/ip_forward", "1")]);
        ip(&[
            "-n",
            &self.gw,
            "link",
            "add",
            &self.gw_lan_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.lan_if,
            "netns",
            &self.lan,
        ]);
        ip(&[
            "-n", &self.gw, "link", "add", "gw-wan", "type", "veth", "peer", "name", "wan0",
            "netns", &self.wan,
        ]);
        ip(&[
            "-n",
            &self.lan,
            "addr",
            "add",
            "198.18.1.2/24",
            "dev",
            &self.lan_if,
        ]);
        ip(&[
            "-n",
            &self.gw,
            "addr",
            "add",
            "198.18.1.1/24",
            "dev",
            &self.gw_lan_if,
        ]);
        ip(&[
            "-n",
            &self.gw,
            "addr",
            "add",
            "192.0.2.1/24",
            "dev",
            "gw-wan",
        ]);
        ip(&[
            "-n",
            &self.wan,
            "addr",
            "add",
            "192.0.2.2/24",
            "dev",
            "wan0",
        ]);
        for (ns, dev) in [
            (&self.lan, self.lan_if.as_str()),
            (&self.gw, self.gw_lan_if.as_str()),
            (&self.gw, "gw-wan"),
            (&self.wan, "wan0"),
            (&self.lan, "lo"),
            (&self.gw, "lo"),
            (&self.wan, "lo"),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&[
            "-n",
            &self.lan,
            "route",
            "add",
            "default",
            "via",
            "198.18.1.1",
        ]);

        self.tunnel_end(&self.gw, GW_PUBLIC, UNDERLAY_GW, UNDERLAY_WAN);
        self.tunnel_end(&self.wan, WAN_HOST, UNDERLAY_WAN, UNDERLAY_GW);
        ip(&["-n", &self.gw, "route", "add", "default", "dev", TUN]);
        ip(&["-n", &self.wan, "route", "add", LOCAL_NET_V4, "dev", TUN]);
        // Static neighbours on the Ethernet links: no ARP in the counts.
        for (ns, dev, peer, peer_dev) in [
            (
                &self.lan,
                self.lan_if.as_str(),
                "198.18.1.1",
                (&self.gw, self.gw_lan_if.as_str()),
            ),
            (
                &self.gw,
                self.gw_lan_if.as_str(),
                "198.18.1.2",
                (&self.lan, self.lan_if.as_str()),
            ),
            (&self.gw, "gw-wan", UNDERLAY_WAN, (&self.wan, "wan0")),
            (&self.wan, "wan0", UNDERLAY_GW, (&self.gw, "gw-wan")),
        ] {
            let mac = mac_of(peer_dev.0, peer_dev.1);
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                peer,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
    }

    /// socat in `ns`: a tun device with `addr` on it, its packets in UDP datagrams between
    /// `local` and `remote` (datagrams, not a connected socket: an ICMP error before the
    /// far end listens must not end it). Returns once the device is up.
    fn tunnel_end(&self, ns: &str, addr: Ipv4Addr, local: &str, remote: &str) {
        let udp = format!("UDP-DATAGRAM:{remote}:{TUNNEL_PORT},bind={local}:{TUNNEL_PORT}");
        let tun = format!("TUN:{addr}/24,tun-name={TUN},iff-up");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "socat", &udp, &tun])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn socat in {ns}: {e}"));
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.push(child);
        let socat = children.last_mut().expect("just pushed");
        let start = Instant::now();
        while !tun_is_up(ns) {
            if let Ok(Some(status)) = socat.try_wait() {
                panic!("socat in {ns} exited ({status}) before {TUN} was up");
            }
            assert!(
                start.elapsed() < TUN_LIMIT,
                "socat in {ns} did not bring {TUN} up within {TUN_LIMIT:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        drop(children);
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            TUN,
            "mtu",
            TUN_MTU,
            "txqueuelen",
            TUN_QUEUE,
        ]);
    }

    /// Every interface whose counters must settle before a measurement.
    /// Makes gw masquerade what leaves through the tunnel (nftables), as a VPN client
    /// gateway does, and takes the wan host's route back to the LAN away: only translated
    /// packets come back.
    pub fn masquerade(&self) {
        ip(&["-n", &self.wan, "route", "del", LOCAL_NET_V4, "dev", TUN]);
        nft(&self.gw, &["add", "table", "ip", "nat"]);
        nft(
            &self.gw,
            &["add chain ip nat postrouting { type nat hook postrouting priority srcnat; }"],
        );
        nft(
            &self.gw,
            &[
                "add",
                "rule",
                "ip",
                "nat",
                "postrouting",
                "oifname",
                TUN,
                "masquerade",
            ],
        );
        self.wait_quiet();
    }

    pub fn interfaces(&self) -> Vec<(&str, &str)> {
        vec![
            (&self.lan, &self.lan_if),
            (&self.gw, &self.gw_lan_if),
            (&self.gw, TUN),
            (&self.gw, "gw-wan"),
            (&self.wan, TUN),
        ]
    }

    /// Waits until no lab interface's counters change for a second.
    pub fn wait_quiet(&self) {
        wait_quiet(&self.interfaces());
    }

    /// gw's tun device: tx is the upload (into the tunnel), rx the download.
    pub fn gw_tun(&self) -> Counters {
        counters(&self.gw, TUN)
    }
}

impl Default for TunLab {
    fn default() -> Self {
        TunLab::new()
    }
}

impl Drop for TunLab {
    fn drop(&mut self) {
        kill_children(&self.children);
        delete_namespaces(&[&self.lan, &self.gw, &self.wan]);
    }
}

fn tun_is_up(ns: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", TUN])
        .output()
        .unwrap_or_else(|e| panic!("ip link show in {ns}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("\"UP\"")
}

fn mac_of(ns: &str, dev: &str) -> String {
    let text = ip(&["-n", ns, "-j", "link", "show", "dev", dev]);
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ip -j link of {ns}/{dev} is not JSON ({e}): {text}"));
    json[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {ns}/{dev} in {text}"))
        .to_string()
}
