//! DNS: messages from the kernel's ring buffer are parsed, teach the passive DNS map
//! (names for conn records and alerts, and for name allowlists), go to `--dns-log`, and
//! feed the DnsTunnel detector.
//!
//! events (ring buffer) -> parse -> cache (passive DNS), log (dns.log), tunnel (alerts)

pub mod cache;
pub mod events;
pub mod log;
pub mod parse;
pub mod tunnel;

use std::net::IpAddr;

use ipnet::IpNet;
use monitor_common::flow::FlowKey;

use crate::{
    alerts::Alert,
    clock::Now,
    conntable::{self, Endpoint, LocalNets},
    logs::{JsonLines, LogStats},
    nat::Nat,
    proto,
};
use cache::PassiveDns;
use log::{DnsRecord, Transactions};
use parse::Payload;
use tunnel::{TunnelConfig, TunnelDetector};

/// Messages by kind since the agent started: `dns_messages_total{type}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCounts {
    pub query: u64,
    /// Responses to a query the agent saw.
    pub response: u64,
    /// Responses to no query the agent saw: forged, late, or for a query it missed.
    pub unsolicited: u64,
    /// Not parsable as DNS, or one IP fragment of a message.
    pub malformed: u64,
}

pub struct Dns {
    /// Passive DNS, which the rules also match names by (see [`Dns::passive`]).
    cache: PassiveDns,
    /// The queries waiting for their answers: only an answer to one of them teaches.
    queries: Transactions,
    log: Option<JsonLines>,
    /// `--dns-resolver`: when set, only their answers teach names.
    resolvers: Vec<IpNet>,
    /// Records completed since the last poll: written then, when their connection (and
    /// its uid) is in the table.
    ready: Vec<DnsRecord>,
    /// Records whose connection the table did not know yet: its packets came after that
    /// poll's map read. Written at the next poll, with the uid it finds then.
    unnamed: Vec<DnsRecord>,
    tunnel: TunnelDetector,
    counts: DnsCounts,
}

/// What passive DNS, dns.log and DnsTunnel are told.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Entries of the passive DNS map.
    pub cache_size: std::num::NonZeroUsize,
    /// An answer is kept at least this long, whatever its TTL.
    pub min_ttl: std::time::Duration,
    /// The site's resolvers: only their answers teach names (none: any answer does).
    pub resolvers: Vec<IpNet>,
    /// DnsTunnel: information per client and domain within `tunnel_period`.
    pub tunnel_threshold: u64,
    pub tunnel_period: std::time::Duration,
    /// DnsTunnel: NXDOMAIN answers per client and domain within the window.
    pub nxdomain_threshold: u64,
}

impl Dns {
    pub fn new(
        config: &DnsConfig,
        window: std::time::Duration,
        local: LocalNets,
        log: Option<JsonLines>,
    ) -> Self {
        Self {
            cache: PassiveDns::new(config.cache_size, config.min_ttl),
            queries: Transactions::default(),
            log,
            resolvers: config.resolvers.clone(),
            ready: Vec::new(),
            unnamed: Vec::new(),
            tunnel: TunnelDetector::new(TunnelConfig {
                threshold: config.tunnel_threshold,
                period: config.tunnel_period,
                nxdomain_threshold: config.nxdomain_threshold,
                window,
                resolvers: config.resolvers.clone(),
                local,
                max_keys: tunnel::MAX_KEYS,
            }),
            counts: DnsCounts::default(),
        }
    }

    /// One ring buffer record; `epoch` converts kernel time for the log. A message seen
    /// translated is taken as between its pre-NAT endpoints (the LAN client behind a
    /// gateway, not the gateway).
    pub fn record(&mut self, bytes: &[u8], epoch: impl Fn(u64) -> f64, nat: &Nat) {
        let Some((mut meta, payload)) = parse::decode(bytes) else {
            self.counts.malformed += 1;
            return;
        };
        let (src, dst) = nat.untranslate(
            meta.proto,
            Endpoint {
                addr: meta.src,
                port: meta.sport,
            },
            Endpoint {
                addr: meta.dst,
                port: meta.dport,
            },
        );
        (meta.src, meta.sport, meta.dst, meta.dport) = (src.addr, src.port, dst.addr, dst.port);
        match payload {
            Payload::Message(msg) if msg.response => {
                let ((client, _), (server, _)) = meta.client_server(true);
                let (rec, solicited) = self.queries.answer(meta, &msg, epoch);
                if solicited {
                    self.counts.response += 1;
                    if self.teaches(client, server) {
                        self.cache.learn(client, &msg, meta.ts_ns);
                    }
                    self.tunnel.message(&meta, &msg);
                } else {
                    self.counts.unsolicited += 1;
                }
                if self.log.is_some() {
                    self.ready.push(rec);
                }
            }
            Payload::Message(msg) => {
                self.counts.query += 1;
                self.tunnel.message(&meta, &msg);
                let pushed_out = self.queries.query(meta, &msg, epoch);
                if self.log.is_some() {
                    self.ready.extend(pushed_out);
                }
            }
            Payload::Fragment => self.counts.malformed += 1,
            Payload::NotDns => {
                self.counts.malformed += 1;
                self.tunnel.not_dns(&meta, bytes.len());
            }
        }
    }

    /// Whether an answer `server` gave `client` may teach names: with `--dns-resolver`,
    /// only one given by a listed resolver, or to one (its own upstream lookups).
    fn teaches(&self, client: IpAddr, server: IpAddr) -> bool {
        self.resolvers.is_empty()
            || self
                .resolvers
                .iter()
                .any(|n| n.contains(&server) || n.contains(&client))
    }

    /// At each poll: DnsTunnel alerts, expired cache entries, and the dns.log records
    /// completed meanwhile, with the uid of their connection where `uid` knows it. A log
    /// that cannot be written is counted, never in the way of the alerts.
    pub fn poll(
        &mut self,
        now: Now,
        epoch: impl Fn(u64) -> f64,
        uid: impl Fn(&FlowKey) -> Option<String>,
        alerts: &mut Vec<Alert>,
    ) {
        self.tunnel.poll(now, alerts);
        self.cache.prune(now.mono_ns);
        let expired = self.queries.expire(now.mono_ns, epoch);
        if let Some(out) = &mut self.log {
            for mut rec in self.unnamed.drain(..) {
                rec.uid = uid(&flow_key(&rec));
                out.write(&rec);
            }
            for mut rec in self.ready.drain(..).chain(expired) {
                rec.uid = uid(&flow_key(&rec));
                if rec.uid.is_some() {
                    out.write(&rec);
                } else {
                    self.unnamed.push(rec);
                }
            }
            out.flush_or_count();
        }
    }

    /// At shutdown: every query still waiting is written unanswered.
    pub fn shutdown(
        &mut self,
        epoch: impl Fn(u64) -> f64,
        uid: impl Fn(&FlowKey) -> Option<String>,
    ) {
        if let Some(out) = &mut self.log {
            let waiting = self.queries.drain(epoch);
            for mut rec in self
                .unnamed
                .drain(..)
                .chain(self.ready.drain(..))
                .chain(waiting)
            {
                rec.uid = uid(&flow_key(&rec));
                out.write(&rec);
            }
            out.close();
        }
    }

    /// `--dns-log`'s write errors and lost records.
    pub fn log_stats(&self) -> Option<LogStats> {
        self.log.as_ref().map(JsonLines::stats)
    }

    /// The name `local` resolved for `remote` (else anyone's name for it).
    pub fn fqdn(&self, local: IpAddr, remote: IpAddr, now_ns: u64) -> Option<String> {
        self.cache.name(local, remote, now_ns)
    }

    /// Passive DNS as the answers recorded so far left it, for the rules to match names
    /// by. They only peek: which entries the bound keeps follows new answers and the
    /// names that records and alerts carry (`fqdn`), not allowlist checks.
    pub fn passive(&self) -> &PassiveDns {
        &self.cache
    }

    pub fn counts(&self) -> DnsCounts {
        self.counts
    }

    pub fn cache_entries(&self) -> usize {
        self.cache.entries()
    }
}

/// The flow map key of the connection that carried a transaction.
fn flow_key(rec: &DnsRecord) -> FlowKey {
    let proto = proto::number(&rec.proto).unwrap_or(proto::UDP);
    let end = |addr, port| Endpoint { addr, port };
    conntable::flow_key(
        proto,
        end(rec.orig_h, rec.orig_p),
        end(rec.resp_h, rec.resp_p),
    )
    .expect("a transaction's endpoints are of one family")
}
