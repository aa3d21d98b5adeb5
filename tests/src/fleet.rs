//! A fleet lab: one local host uploading through two gateways, each with its own WAN
//! host, and a collector namespace that both gateways reach on a management link:
//!
//! ```text
//!            [ha] host [hb]
//!             |          |
//!   wan-a -- gw-a        gw-b -- wan-b
//!               \        /
//!                collector
//! ```
//!
//! The host has one address, 198.18.1.2, used on both of its links: routes send
//! 203.0.113.0/24 through gw-a and 198.51.100.0/24 through gw-b. The management links
//! (192.0.2.0/25 and 192.0.2.128/25) carry the export, not the WAN links, so a gateway's
//! WAN tx counters count the host's upload through it alone. Quiet as [`crate::lab`]:
//! static neighbours, no IPv6 chatter, segmentation off on the WAN links.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::lab::{self, Counters};

pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const LOCAL_NET: &str = "198.18.0.0/15";
pub const WAN_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const WAN_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The collector's address on each gateway's management link.
pub const COLLECTOR_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 126);
pub const COLLECTOR_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The WAN-facing device of each gateway (the one its agent watches).
pub const GW_WAN_IF: &str = "wan";

/// One end of a link: (namespace, device, address/prefix).
type End<'a> = (&'a str, &'a str, &'a str);

static NEXT_FLEET: AtomicU32 = AtomicU32::new(0);

/// Namespaces of one fleet lab, deleted on drop.
pub struct Fleet {
    pub host: String,
    pub gw_a: String,
    pub gw_b: String,
    pub wan_a: String,
    pub wan_b: String,
    pub collector: String,
}

impl Fleet {
    pub fn new() -> Fleet {
        let n = NEXT_FLEET.fetch_add(1, Ordering::Relaxed);
        let name = |role: &str| format!("emf{}-{n}-{role}", std::process::id());
        let fleet = Fleet {
            host: name("host"),
            gw_a: name("gwa"),
            gw_b: name("gwb"),
            wan_a: name("wana"),
            wan_b: name("wanb"),
            collector: name("col"),
        };
        fleet.build();
        lab::wait_quiet(&fleet.wan_links());
        fleet
    }

    fn build(&self) {
        for ns in self.namespaces() {
            lab::add_namespace(ns);
            // The host answers on hb for the address of ha; gw-b routes it back that way.
            lab::set_sysctls(
                ns,
                &[
                    ("net/ipv4/conf/all/rp_filter", "0"),
                    ("net/ipv4/conf/default/rp_filter", "0"),
                ],
            );
            lab::ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for gw in [&self.gw_a, &self.gw_b] {
            lab::set_sysctls(gw, &[("net/ipv4/ip_forward", "1")]);
        }
        let links: [(End, End); 6] = [
            (
                (&self.host, "ha", "198.18.1.2/24"),
                (&self.gw_a, "lan", "198.18.1.1/24"),
            ),
            (
                (&self.host, "hb", "198.18.2.2/24"),
                (&self.gw_b, "lan", "198.18.2.1/24"),
            ),
            (
                (&self.gw_a, GW_WAN_IF, "203.0.113.1/24"),
                (&self.wan_a, "wan0", "203.0.113.2/24"),
            ),
            (
                (&self.gw_b, GW_WAN_IF, "198.51.100.1/24"),
                (&self.wan_b, "wan0", "198.51.100.2/24"),
            ),
            (
                (&self.gw_a, "mgmt", "192.0.2.1/25"),
                (&self.collector, "ca", "192.0.2.126/25"),
            ),
            (
                (&self.gw_b, "mgmt", "192.0.2.129/25"),
                (&self.collector, "cb", "192.0.2.254/25"),
            ),
        ];
        for (i, (a, b)) in links.into_iter().enumerate() {
            link(i as u8, a, b);
        }
        for (ns, dev) in [
            (&self.gw_a, GW_WAN_IF),
            (&self.wan_a, "wan0"),
            (&self.gw_b, GW_WAN_IF),
            (&self.wan_b, "wan0"),
        ] {
            lab::segmentation_off(ns, dev);
        }
        let route = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns, "route", "add"];
            all.extend(args);
            lab::ip(&all);
        };
        route(
            &self.host,
            &["203.0.113.0/24", "via", "198.18.1.1", "dev", "ha"],
        );
        route(
            &self.host,
            &[
                "198.51.100.0/24",
                "via",
                "198.18.2.1",
                "dev",
                "hb",
                "src",
                "198.18.1.2",
            ],
        );
        route(
            &self.gw_b,
            &["198.18.1.0/24", "via", "198.18.2.2", "dev", "lan"],
        );
        route(&self.wan_a, &[LOCAL_NET, "via", "203.0.113.1"]);
        route(&self.wan_b, &[LOCAL_NET, "via", "198.51.100.1"]);
    }

    fn namespaces(&self) -> [&str; 6] {
        [
            &self.host,
            &self.gw_a,
            &self.gw_b,
            &self.wan_a,
            &self.wan_b,
            &self.collector,
        ]
    }

    /// Both ends of both WAN links.
    pub fn wan_links(&self) -> [(&str, &str); 4] {
        [
            (&self.gw_a, GW_WAN_IF),
            (&self.wan_a, "wan0"),
            (&self.gw_b, GW_WAN_IF),
            (&self.wan_b, "wan0"),
        ]
    }

    /// The tx counters of gw-a's and gw-b's WAN devices: each gateway's upload.
    pub fn uploads(&self) -> [Counters; 2] {
        [
            lab::counters(&self.gw_a, GW_WAN_IF),
            lab::counters(&self.gw_b, GW_WAN_IF),
        ]
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        lab::delete_namespaces(&self.namespaces());
    }
}

/// A veth pair between two namespaces, addressed, with permanent neighbour entries both
/// ways (no ARP on the wire), and up.
fn link(i: u8, (ns_a, dev_a, addr_a): End, (ns_b, dev_b, addr_b): End) {
    let mac = |end: u8| format!("02:00:00:00:{i:02x}:{end:02x}");
    let (mac_a, mac_b) = (mac(0xa), mac(0xb));
    lab::ip(&[
        "-n", ns_a, "link", "add", dev_a, "address", &mac_a, "type", "veth", "peer", "name", dev_b,
        "address", &mac_b, "netns", ns_b,
    ]);
    let host = |cidr: &str| cidr.split('/').next().expect("address").to_owned();
    for (ns, dev, addr, peer, peer_mac) in [
        (ns_a, dev_a, addr_a, host(addr_b), &mac_b),
        (ns_b, dev_b, addr_b, host(addr_a), &mac_a),
    ] {
        lab::ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        lab::ip(&[
            "-n",
            ns,
            "neigh",
            "replace",
            &peer,
            "lladdr",
            peer_mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
        lab::ip(&["-n", ns, "link", "set", dev, "up"]);
    }
}
