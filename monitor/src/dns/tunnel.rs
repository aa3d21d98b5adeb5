//! DnsTunnel: DNS used as a channel. Pure: messages and the time go in, alerts come out.
//!
//! - Information: per (client, registered domain), the compressed size of the distinct
//!   query names (the part left of the registered domain) within a period, after Paxson
//!   et al., "Practical Comprehensive Bounds on Surreptitious Communication Over DNS"
//!   (USENIX Security 2013).
//! - NXDOMAIN: answers of that kind to one client for one registered domain in a window.
//! - Non-DNS: payload that is not DNS sent by a local host to port 53 of a host that is
//!   not a listed resolver (raw tunnels such as iodine without `-r`).
//!
//! Memory is bounded: at most `max_keys` (client, domain) and (client, server) states
//! each, least recently active dropped first; per state the names are deflated in chunks
//! of [`CHUNK`] bytes (only the pending chunk is kept raw), and distinctness is checked
//! against the last [`SEEN_MAX`] names' hashes.

use std::{
    collections::HashSet,
    hash::{DefaultHasher, Hash, Hasher},
    io::Write,
    net::IpAddr,
    num::NonZeroUsize,
    time::Duration,
};

use flate2::{Compression, write::DeflateEncoder};
use ipnet::IpNet;
use lru::LruCache;

use super::parse::{Message, Meta, display_name};
use crate::{
    alerts::{Alert, Note},
    clock::Now,
    conntable::LocalNets,
};

/// Raw bytes of names deflated together.
pub const CHUNK: usize = 2048;
/// Name hashes remembered per state for distinctness; then the memory starts over.
pub const SEEN_MAX: usize = 1024;
/// States of each kind kept by default.
pub const MAX_KEYS: usize = 4096;

#[derive(Clone, Debug)]
pub struct TunnelConfig {
    pub threshold: u64,
    pub period: Duration,
    pub nxdomain_threshold: u64,
    pub window: Duration,
    pub resolvers: Vec<IpNet>,
    pub local: LocalNets,
    pub max_keys: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Information,
    Nxdomain,
    NonDns,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Information => "information",
            Reason::Nxdomain => "nxdomain",
            Reason::NonDns => "non_dns",
        }
    }
}

#[derive(Default)]
struct DomainState {
    period_start_ns: u64,
    queries: u64,
    unique: u64,
    /// Deflated size of the sealed chunks.
    sealed: u64,
    chunk: Vec<u8>,
    seen: HashSet<u64>,
    info_crossed: bool,
    nx_window: u64,
    nx_count: u64,
    nx_crossed_window: Option<u64>,
    /// Changed since the last poll.
    active: bool,
}

impl DomainState {
    fn info_bytes(&self) -> u64 {
        self.sealed + deflated_len(&self.chunk)
    }
}

struct RawState {
    messages: u64,
    bytes: u64,
    active: bool,
}

pub struct TunnelDetector {
    config: TunnelConfig,
    domains: LruCache<(IpAddr, Vec<u8>), DomainState>,
    raw: LruCache<(IpAddr, IpAddr), RawState>,
}

fn deflated_len(bytes: &[u8]) -> u64 {
    if bytes.is_empty() {
        return 0;
    }
    let mut enc = DeflateEncoder::new(Vec::new(), Compression::best());
    enc.write_all(bytes).expect("writing to a Vec");
    enc.finish().expect("writing to a Vec").len() as u64
}

impl TunnelDetector {
    pub fn new(config: TunnelConfig) -> Self {
        let cap = NonZeroUsize::new(config.max_keys.max(1)).expect("non-zero");
        Self {
            config,
            domains: LruCache::new(cap),
            raw: LruCache::new(cap),
        }
    }

    /// A DNS message seen at `meta.ts_ns`.
    pub fn message(&mut self, meta: &Meta, msg: &Message) {
        let Some(domain) = psl::domain(&msg.qname) else {
            return;
        };
        let domain = domain.as_bytes().to_vec();
        let ((client, _), _) = meta.client_server(msg.response);
        let now = meta.ts_ns;
        let period = self.config.period.as_nanos() as u64;
        let window = (self.config.window.as_nanos() as u64).max(1);
        let state = self
            .domains
            .get_or_insert_mut((client, domain.clone()), || DomainState {
                period_start_ns: now,
                ..DomainState::default()
            });
        if now.saturating_sub(state.period_start_ns) >= period {
            *state = DomainState {
                period_start_ns: now,
                ..DomainState::default()
            };
        }
        if msg.response {
            if msg.rcode == 3 {
                let w = now / window;
                if w != state.nx_window {
                    state.nx_window = w;
                    state.nx_count = 0;
                }
                state.nx_count += 1;
                state.active = true;
            }
            return;
        }
        state.queries += 1;
        state.active = true;
        // Only the part left of the registered domain carries information.
        let sub_len = msg.qname.len().saturating_sub(domain.len() + 1);
        if sub_len == 0 {
            return;
        }
        let sub = &msg.qname[..sub_len];
        let mut h = DefaultHasher::new();
        sub.hash(&mut h);
        if state.seen.len() >= SEEN_MAX {
            state.seen.clear();
        }
        if !state.seen.insert(h.finish()) {
            return;
        }
        state.unique += 1;
        state.chunk.extend_from_slice(sub);
        state.chunk.push(b'\n');
        if state.chunk.len() >= CHUNK {
            state.sealed += deflated_len(&state.chunk);
            state.chunk.clear();
        }
    }

    /// Bytes on port 53 that are not DNS.
    pub fn not_dns(&mut self, meta: &Meta, len: usize) {
        let (client, server) = (meta.src, meta.dst);
        if meta.dport != 53
            || !self.config.local.contains(client)
            || self.config.local.contains(server)
            || self.config.resolvers.iter().any(|n| n.contains(&server))
        {
            return;
        }
        let state = self.raw.get_or_insert_mut((client, server), || RawState {
            messages: 0,
            bytes: 0,
            active: false,
        });
        state.messages += 1;
        state.bytes += len as u64;
        state.active = true;
    }

    /// At each poll: an alert for every state over a threshold that moved since the last
    /// poll (the suppressor keeps repeats quiet for `--suppress`).
    pub fn poll(&mut self, now: Now, alerts: &mut Vec<Alert>) {
        let c = &self.config;
        for ((client, domain), s) in self.domains.iter_mut() {
            if !std::mem::take(&mut s.active) {
                continue;
            }
            let domain = display_name(domain);
            let raw_upper = s.sealed + s.chunk.len() as u64;
            if s.info_crossed || raw_upper >= c.threshold {
                let info = s.info_bytes();
                if info >= c.threshold {
                    s.info_crossed = true;
                    let msg = format!(
                        "{client} sent about {info} bytes of information in {} distinct query names under {domain} (threshold {} per {})",
                        s.unique,
                        c.threshold,
                        humantime::format_duration(c.period),
                    );
                    alerts.push(
                        alert(now, *client, &domain, Reason::Information, s, info, msg)
                            .with("threshold", c.threshold)
                            .with("period", c.period.as_secs_f64()),
                    );
                }
            }
            let window = s.nx_window;
            if s.nx_count >= c.nxdomain_threshold && s.nx_crossed_window != Some(window) {
                s.nx_crossed_window = Some(window);
                let msg = format!(
                    "{client} got {} NXDOMAIN answers for names under {domain} within {} (threshold {})",
                    s.nx_count,
                    humantime::format_duration(c.window),
                    c.nxdomain_threshold
                );
                let info = s.info_bytes();
                alerts.push(
                    alert(now, *client, &domain, Reason::Nxdomain, s, info, msg)
                        .with("nxdomain", s.nx_count)
                        .with("threshold", c.nxdomain_threshold)
                        .with("window", c.window.as_secs_f64()),
                );
            }
        }
        for ((client, server), s) in self.raw.iter_mut() {
            if !std::mem::take(&mut s.active) {
                continue;
            }
            let server_text = server.to_string();
            alerts.push(
                Alert {
                    ts: now.epoch,
                    note: Note::DnsTunnel,
                    msg: format!(
                        "{client} sent {} messages ({} bytes) that are not DNS to port 53 of {server}, which is not a listed resolver",
                        s.messages, s.bytes
                    ),
                    src: *client,
                    dst: Some(*server),
                    first_seen: None,
                    conn: None,
                    figures: Default::default(),
                    key: format!("{client} {server} non_dns"),
                    quiet: None,
                    conn_log: None,
                }
                .with("domain", server_text)
                .with("reason", Reason::NonDns.as_str())
                .with("client", client.to_string())
                .with("info_bytes", s.bytes)
                .with("queries", s.messages)
                .with("unique_names", 0),
            );
        }
    }
}

fn alert(
    now: Now,
    client: IpAddr,
    domain: &str,
    reason: Reason,
    s: &DomainState,
    info: u64,
    msg: String,
) -> Alert {
    Alert {
        ts: now.epoch,
        note: Note::DnsTunnel,
        msg,
        src: client,
        dst: None,
        first_seen: None,
        conn: None,
        figures: Default::default(),
        key: format!("{client} {domain} {}", reason.as_str()),
        quiet: None,
        conn_log: None,
    }
    .with("domain", domain)
    .with("reason", reason.as_str())
    .with("client", client.to_string())
    .with("info_bytes", info)
    .with("queries", s.queries)
    .with("unique_names", s.unique)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::Clock,
        dns::parse::{parse_message, tests::message},
    };

    const SEC: u64 = 1_000_000_000;

    fn config() -> TunnelConfig {
        TunnelConfig {
            threshold: 4000,
            period: Duration::from_secs(86_400),
            nxdomain_threshold: 100,
            window: Duration::from_secs(300),
            resolvers: vec!["198.18.0.53/32".parse().unwrap()],
            local: LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()]),
            max_keys: MAX_KEYS,
        }
    }

    fn now(ns: u64) -> Now {
        Now::new(ns, &Clock::with_offset_ns(1_700_000_000 * SEC as i128))
    }

    fn query(client: &str, ts_ns: u64, name: &[u8]) -> (Meta, Message) {
        let meta = Meta {
            ts_ns,
            src: client.parse().unwrap(),
            dst: "192.0.2.53".parse().unwrap(),
            sport: 40000,
            dport: 53,
            proto: 17,
        };
        (
            meta,
            parse_message(&message(1, false, 0, name, 10, &[])).unwrap(),
        )
    }

    fn nxdomain(client: &str, ts_ns: u64, name: &[u8]) -> (Meta, Message) {
        let meta = Meta {
            ts_ns,
            src: "192.0.2.53".parse().unwrap(),
            dst: client.parse().unwrap(),
            sport: 53,
            dport: 40000,
            proto: 17,
        };
        (
            meta,
            parse_message(&message(1, true, 3, name, 1, &[])).unwrap(),
        )
    }

    /// Random-looking labels, as a tunnel encodes data: not compressible.
    fn tunnel_name(i: u64) -> Vec<u8> {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut label = Vec::new();
        for _ in 0..60 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            label.push(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize]);
        }
        [label.as_slice(), b".t.tunnel.test"].concat()
    }

    #[test]
    fn a_tunnel_alerts_at_the_first_poll_after_crossing() {
        let mut d = TunnelDetector::new(config());
        let mut alerts = Vec::new();
        let mut first = None;
        for i in 0..200u64 {
            let (m, q) = query("198.18.0.10", i * SEC, &tunnel_name(i));
            d.message(&m, &q);
            d.poll(now(i * SEC), &mut alerts);
            if !alerts.is_empty() && first.is_none() {
                first = Some(i);
            }
        }
        let i = first.expect("a tunnel of 200 x 60 random bytes alerts");
        // 60 random characters of 36 carry about 310 bits: 13 names cross 4000 bytes
        // only with compression slack; far fewer than 200.
        assert!((40..=120).contains(&i), "alerted after {i} names");
        let a = &alerts[0];
        assert_eq!(a.note, Note::DnsTunnel);
        assert_eq!(a.figures["domain"], "tunnel.test");
        assert_eq!(a.figures["reason"], "information");
        assert_eq!(a.figures["client"], "198.18.0.10");
        assert!(a.figures["info_bytes"].as_u64().unwrap() >= 4000);
        assert_eq!(a.figures["queries"], i + 1);
        assert_eq!(a.figures["unique_names"], i + 1);
        assert_eq!(a.src.to_string(), "198.18.0.10");
        // Still going: raised again at every poll with news, for the suppressor to quiet.
        assert!(alerts.len() > 1);
        assert!(alerts.iter().all(|a| a.key == alerts[0].key));
    }

    #[test]
    fn ordinary_browsing_stays_silent() {
        let mut d = TunnelDetector::new(config());
        let mut alerts = Vec::new();
        let hosts = [
            "www", "api", "cdn", "img", "static", "mail", "login", "news",
        ];
        let mut t = 0;
        for round in 0..20 {
            for domain in 0..40 {
                for (h, host) in hosts.iter().enumerate() {
                    let name = format!("{host}{}.site{domain}.example", (round + h) % 5);
                    let (m, q) = query("198.18.0.10", t, name.as_bytes());
                    d.message(&m, &q);
                    t += SEC / 10;
                }
            }
            d.poll(now(t), &mut alerts);
        }
        assert!(alerts.is_empty(), "{alerts:?}");
    }

    #[test]
    fn repeats_of_one_name_carry_no_information() {
        let mut d = TunnelDetector::new(config());
        let mut alerts = Vec::new();
        for i in 0..10_000 {
            let (m, q) = query("198.18.0.10", i, &tunnel_name(1));
            d.message(&m, &q);
        }
        d.poll(now(10_000), &mut alerts);
        assert!(alerts.is_empty());
    }

    #[test]
    fn the_period_starts_over() {
        let mut c = config();
        c.period = Duration::from_secs(60);
        let mut d = TunnelDetector::new(c);
        let mut alerts = Vec::new();
        // 30 names a minute: never 4000 bytes within one period.
        for i in 0..600u64 {
            let (m, q) = query("198.18.0.10", i * 2 * SEC, &tunnel_name(i));
            d.message(&m, &q);
            d.poll(now(i * 2 * SEC), &mut alerts);
        }
        assert!(alerts.is_empty(), "{}", alerts[0].msg);
    }

    #[test]
    fn nxdomain_bursts_alert_once_per_window() {
        let mut d = TunnelDetector::new(config());
        let mut alerts = Vec::new();
        for i in 0..250u64 {
            let name = format!("nope{i}.example.test");
            let (m, r) = nxdomain("198.18.0.10", 1000 * SEC + i * SEC / 10, name.as_bytes());
            d.message(&m, &r);
            d.poll(now(1000 * SEC + i * SEC / 10), &mut alerts);
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].figures["reason"], "nxdomain");
        assert_eq!(alerts[0].figures["domain"], "example.test");
        assert_eq!(alerts[0].figures["nxdomain"], 100);
    }

    #[test]
    fn non_dns_to_port_53_of_a_stranger_alerts_but_not_to_resolvers() {
        let mut d = TunnelDetector::new(config());
        let mut alerts = Vec::new();
        let meta = |dst: &str| Meta {
            ts_ns: SEC,
            src: "198.18.0.10".parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40000,
            dport: 53,
            proto: 17,
        };
        d.not_dns(&meta("198.18.0.53"), 100);
        d.not_dns(&meta("198.19.0.1"), 100);
        d.poll(now(SEC), &mut alerts);
        assert!(alerts.is_empty());
        d.not_dns(&meta("203.0.113.53"), 100);
        d.not_dns(&meta("203.0.113.53"), 120);
        d.poll(now(2 * SEC), &mut alerts);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].figures["reason"], "non_dns");
        assert_eq!(alerts[0].figures["queries"], 2);
        assert_eq!(alerts[0].figures["info_bytes"], 220);
        assert_eq!(alerts[0].dst, Some("203.0.113.53".parse().unwrap()));
    }

    #[test]
    fn memory_stays_bounded_for_many_clients_and_domains() {
        let mut c = config();
        c.max_keys = 1000;
        let mut d = TunnelDetector::new(c);
        let mut alerts = Vec::new();
        for i in 0..50_000u64 {
            let client = format!("198.18.{}.{}", (i / 250) % 250, i % 250);
            let name = format!("{}.d{}.example", i, i % 997);
            let (m, q) = query(&client, i, name.as_bytes());
            d.message(&m, &q);
            let raw = Meta {
                dst: format!("203.0.113.{}", i % 200).parse().unwrap(),
                ..m
            };
            d.not_dns(&raw, 100);
            if i % 1000 == 0 {
                d.poll(now(i), &mut alerts);
            }
        }
        assert_eq!(d.domains.len(), 1000);
        assert_eq!(d.raw.len(), 1000);
        for s in d.domains.iter().map(|(_, s)| s) {
            assert!(s.chunk.len() < CHUNK + 256 && s.seen.len() <= SEEN_MAX);
        }
        assert!(alerts.iter().all(|a| a.figures["reason"] == "non_dns"));
    }
}
