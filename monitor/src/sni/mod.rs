//! Server names from the first payload of connections: the kernel copies a TLS record
//! that opens a TCP connection, and a QUIC Initial that opens a UDP flow, to the
//! `HELLO_EVENTS` ring; the ClientHello's `server_name` and its ECH offer are kept per
//! connection for its records, alerts and name allowlists. Connections that carry
//! encrypted DNS (port 853, or a DoH server's name) are marked.
//!
//! events (ring buffer, drained as DNS's) -> tls (ClientHello) -> [`Hellos`] by flow key

pub mod quic;
pub mod tls;

use monitor_common::{
    dns::flags,
    flow::FlowKey,
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    conntable::{self, Endpoint},
    dns::parse,
    joined::{ByConn, Joined},
    nat::Nat,
};
use tls::ClientHello;

/// DNS over TLS and over QUIC (RFC 7858, RFC 9250).
pub const ENCRYPTED_DNS_PORT: u16 = 853;

/// Public DNS-over-HTTPS services, by the names their clients connect to; a name under one
/// matches too (`mozilla.cloudflare-dns.com`). `--doh-server` adds to them.
pub const DOH_SERVERS: [&str; 8] = [
    "cloudflare-dns.com",
    "dns.google",
    "dns.quad9.net",
    "doh.opendns.com",
    "dns.nextdns.io",
    "dns.adguard-dns.com",
    "doh.cleanbrowsing.org",
    "doh.mullvad.net",
];

/// What a connection's first payload told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub server_name: Option<String>,
    pub ech: bool,
    /// `server_name` is a DoH server's.
    pub doh: bool,
}

/// ClientHellos by outcome since the agent started: `client_hellos_total{result}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelloCounts {
    pub parsed: u64,
    /// Cut before the name (split across segments), not a ClientHello after all, or a
    /// QUIC Initial the agent cannot open.
    pub unparsed: u64,
}

/// The hellos of the connections in the table, by their (pre-NAT) flow key.
pub type Hellos = ByConn<Hello>;

pub struct Sni {
    doh: Vec<String>,
    hellos: Joined<Hello>,
    counts: HelloCounts,
}

impl Sni {
    /// `doh_servers`: `--doh-server`, beside [`DOH_SERVERS`].
    pub fn new(doh_servers: &[String]) -> Self {
        let doh = DOH_SERVERS
            .iter()
            .map(|s| s.to_string())
            .chain(doh_servers.iter().map(|s| s.to_ascii_lowercase()))
            .collect();
        Self {
            doh,
            hellos: Joined::default(),
            counts: HelloCounts::default(),
        }
    }

    /// One ring buffer record, taken between its pre-NAT endpoints.
    pub fn record(&mut self, bytes: &[u8], nat: &Nat) {
        let Some((meta, bits, data)) = parse::split(bytes) else {
            self.counts.unparsed += 1;
            return;
        };
        let hello = match meta.proto {
            _ if bits & flags::COPY_FAILED != 0 => None,
            IPPROTO_TCP => tls::from_record(data),
            IPPROTO_UDP => quic_client_hello(data),
            _ => None,
        };
        let Some(hello) = hello else {
            self.counts.unparsed += 1;
            return;
        };
        self.counts.parsed += 1;
        let end = |addr, port| Endpoint { addr, port };
        let (src, dst) = nat.untranslate(
            meta.proto,
            end(meta.src, meta.sport),
            end(meta.dst, meta.dport),
        );
        let Some(key) = conntable::flow_key(meta.proto, src, dst) else {
            return;
        };
        let doh = hello
            .server_name
            .as_deref()
            .is_some_and(|name| self.is_doh(name));
        self.hellos.push(
            key,
            Hello {
                server_name: hello.server_name,
                ech: hello.ech,
                doh,
            },
        );
    }

    /// After a poll's read of the map (see [`Joined::settle`]).
    pub fn settle(&mut self, known: impl Fn(&FlowKey) -> bool) {
        self.hellos.settle(known);
    }

    /// A finished connection's hello goes with it.
    pub fn forget(&mut self, key: &FlowKey) {
        self.hellos.forget(key);
    }

    /// Whether `name` is a DNS-over-HTTPS server's, or under one.
    fn is_doh(&self, name: &str) -> bool {
        self.doh.iter().any(|domain| is_or_under(name, domain))
    }

    pub fn hellos(&self) -> &Hellos {
        self.hellos.joined()
    }

    pub fn counts(&self) -> HelloCounts {
        self.counts
    }
}

/// The ClientHello a QUIC Initial carries, taken out of its protection.
fn quic_client_hello(initial: &[u8]) -> Option<ClientHello> {
    quic::client_hello(initial)
        .ok()
        .and_then(|message| tls::from_handshake(&message))
}

/// `name` is `domain` or a name under it.
fn is_or_under(name: &str, domain: &str) -> bool {
    name.strip_suffix(domain)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// Whether a connection to `resp` carries encrypted DNS: DNS over TLS or
/// QUIC by its port, or DoH by the name its hello gave.
pub fn encrypted_dns(proto: u8, resp: Endpoint, hello: Option<&Hello>) -> bool {
    (resp.port == ENCRYPTED_DNS_PORT && matches!(proto, IPPROTO_TCP | IPPROTO_UDP))
        || hello.is_some_and(|h| h.doh)
}

#[cfg(test)]
mod tests {
    use monitor_common::{hello::is_hello, parse::PacketInfo};

    use super::*;

    fn packet(proto: u8) -> PacketInfo {
        PacketInfo {
            proto,
            ..PacketInfo::default()
        }
    }

    /// The kernel's test of a first payload.
    #[test]
    fn tls_records_and_quic_initials_are_hellos() {
        let tcp = packet(IPPROTO_TCP);
        assert!(is_hello(&[0x16, 0x03, 0x01, 0, 72, 0x01][..], &tcp, 0));
        assert!(is_hello(&[0, 0x16, 0x03, 0x03, 0, 72, 0x01][..], &tcp, 1));
        assert!(!is_hello(&b"GET / HTTP/1.1"[..], &tcp, 0));
        assert!(!is_hello(&[0x16, 0x03, 0x01, 0, 72][..], &tcp, 0));
        // A ServerHello.
        assert!(!is_hello(&[0x16, 0x03, 0x03, 0, 72, 0x02][..], &tcp, 0));
        let udp = packet(IPPROTO_UDP);
        assert!(is_hello(&[0xc3, 0, 0, 0, 1, 8][..], &udp, 0));
        assert!(is_hello(&[0xd3, 0x6b, 0x33, 0x43, 0xcf][..], &udp, 0));
        // A v1 Handshake packet, a v2 one typed as a v1 Initial, a short header, v3.
        assert!(!is_hello(&[0xe3, 0, 0, 0, 1][..], &udp, 0));
        assert!(!is_hello(&[0xc3, 0x6b, 0x33, 0x43, 0xcf][..], &udp, 0));
        assert!(!is_hello(&[0x43, 0, 0, 0, 1][..], &udp, 0));
        assert!(!is_hello(&[0xc3, 0, 0, 0, 3][..], &udp, 0));
    }

    #[test]
    fn doh_names_and_port_853() {
        let sni = Sni::new(&["DoH.Example.NET".to_owned()]);
        let doh = |name: &str| sni.is_doh(name);
        assert!(doh("dns.google"));
        assert!(doh("mozilla.cloudflare-dns.com"));
        assert!(doh("doh.example.net"));
        assert!(!doh("notdns.google"));
        assert!(!doh("example.net"));
        let to = |port| Endpoint {
            addr: "192.0.2.1".parse().unwrap(),
            port,
        };
        assert!(encrypted_dns(IPPROTO_TCP, to(853), None));
        assert!(encrypted_dns(IPPROTO_UDP, to(853), None));
        assert!(!encrypted_dns(IPPROTO_TCP, to(443), None));
        let hello = Hello {
            doh: true,
            ..Hello::default()
        };
        assert!(encrypted_dns(IPPROTO_TCP, to(443), Some(&hello)));
    }
}
