//! Prometheus metrics (docs/metrics.md), read from the same snapshots the pipeline sees,
//! and the `/metrics` endpoint. Labels never carry addresses or ports.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use axum::{Router, http::header, response::IntoResponse, routing::get};
use monitor_common::{
    flow::{DIR_A_TO_B, DIR_B_TO_A},
    stats,
};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::sync::watch;

use crate::{
    alerts::Note,
    clock::Now,
    conntable::{EndReason, View},
    consumer::{ConnCtx, Consumer},
    dns::DnsCounts,
    logs::LogStats,
    poller::Coverage,
    sni::HelloCounts,
    top,
};

const PREFIX: &str = "egress_monitor";
const DIRECTIONS: [&str; 4] = ["outbound", "inbound", "internal", "external"];
const DNS_TYPES: [&str; 4] = ["query", "response", "unsolicited", "malformed"];
const HELLO_RESULTS: [&str; 2] = ["parsed", "unparsed"];

pub struct Metrics {
    registry: Registry,
    /// bytes_total and packets_total per direction, in [`DIRECTIONS`] order: looked up
    /// once, not for every connection of every poll.
    by_direction: [(IntCounter, IntCounter); 4],
    connections_active: IntGauge,
    connections_total: IntCounter,
    alerts: IntCounterVec,
    suppressed: IntCounterVec,
    flow_map_entries: IntGauge,
    flow_map_full: IntCounter,
    dns_events_lost: IntCounter,
    spoofed: IntCounter,
    dns_messages: IntCounterVec,
    dns_cache_entries: IntGauge,
    last_dns: DnsCounts,
    client_hellos: IntCounterVec,
    last_hellos: HelloCounts,
    hello_events_lost: IntCounter,
    hello_lost_seen: u64,
    owner_events_lost: IntCounter,
    encrypted_dns: IntCounter,
    unparsed: IntCounterVec,
    parse_failing: IntGauge,
    poll_duration: Histogram,
    poll_entries_read: IntGauge,
    connections_finishing: IntGauge,
    poll_reads: IntCounterVec,
    changes_lost: IntCounter,
    /// The kernel's count of lost changes as last read.
    changes_lost_seen: u64,
    /// Connections the table had added at the last poll.
    added: u64,
    /// STATS slots as last read, to add only what is new to the counters.
    last_stats: [u64; stats::SLOTS as usize],
    top: TopTalkers,
    sink_dropped: IntCounterVec,
    sink_failures: IntCounterVec,
    log_errors: IntCounterVec,
    log_lost: IntCounterVec,
    shed: IntCounterVec,
    ipfix_records: IntCounter,
    ipfix_messages: IntCounter,
    ipfix_errors: IntCounter,
    config_reloads: IntCounterVec,
}

/// `--top-talkers N`: the N local hosts that sent the most IP bytes to non-local ones in
/// the last complete window, as a gauge with a `host` label: at most N series, replaced
/// each window.
struct TopTalkers {
    n: usize,
    window: f64,
    /// Index of the window being summed.
    current: Option<u64>,
    sums: HashMap<IpAddr, u64>,
    gauge: IntGaugeVec,
    /// Hosts' sums dropped to stay within [`MAX_TOP_HOSTS`].
    shed: u64,
}

/// Local hosts summed in one window at most: local nets of IPv6 hold more addresses than
/// memory. When full, the half that sent least goes (the top N are among the rest).
const MAX_TOP_HOSTS: usize = 262_144;

impl TopTalkers {
    fn add(&mut self, host: IpAddr, bytes: u64) {
        if self.n == 0 || bytes == 0 {
            return;
        }
        if self.sums.len() >= MAX_TOP_HOSTS
            && !self.sums.contains_key(&host)
            && let Some(cut) = crate::shed::cut(self.sums.values().copied())
        {
            let before = self.sums.len();
            self.sums.retain(|_, sum| *sum > cut);
            self.shed += (before - self.sums.len()) as u64;
        }
        *self.sums.entry(host).or_default() += bytes;
    }

    /// At a new window, publishes the last one's top N.
    fn roll(&mut self, epoch: f64) {
        if self.n == 0 {
            return;
        }
        let index = (epoch / self.window).floor() as u64;
        match self.current {
            Some(current) if current == index => return,
            Some(_) => {
                let mut ranked: Vec<(IpAddr, u64)> = self.sums.drain().collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                self.gauge.reset();
                for (host, bytes) in ranked.into_iter().take(self.n) {
                    self.gauge
                        .with_label_values(&[&host.to_string()])
                        .set(bytes as i64);
                }
            }
            // The first window is partial: it starts when the agent did.
            None => self.sums.clear(),
        }
        self.current = Some(index);
    }
}

/// Brings a counter up to a total another component keeps (totals only grow).
fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

impl Metrics {
    pub fn new(capacity: u32, top_talkers: usize, window: Duration) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let bytes = IntCounterVec::new(
            opts(
                "bytes_total",
                "IP bytes (headers included, as on the wire) seen, by direction relative to the local nets.",
            ),
            &["direction"],
        )?;
        let packets = IntCounterVec::new(
            opts(
                "packets_total",
                "Packets seen (aggregates counted as their wire segments), by direction relative to the local nets.",
            ),
            &["direction"],
        )?;
        let connections_active = IntGauge::with_opts(opts(
            "connections_active",
            "Connections open in the connection table.",
        ))?;
        let connections_total = IntCounter::with_opts(opts(
            "connections_total",
            "Connections seen since the agent started.",
        ))?;
        let alerts = IntCounterVec::new(opts("alerts_total", "Alerts sent, by rule."), &["note"])?;
        let suppressed = IntCounterVec::new(
            opts(
                "alerts_suppressed_total",
                "Alerts not sent because the same rule and key alerted within the suppress time, by rule.",
            ),
            &["note"],
        )?;
        let flow_map_entries = IntGauge::with_opts(opts(
            "flow_map_entries",
            "Connections open in the connection table at the last poll (the kernel map holds one entry for each).",
        ))?;
        let flow_map_capacity = IntGauge::with_opts(opts(
            "flow_map_capacity",
            "Capacity of the kernel connection map (--flow-map-size).",
        ))?;
        let flow_map_full = IntCounter::with_opts(opts(
            "flow_map_full_total",
            "Packets of new connections not counted because the connection map was full.",
        ))?;
        let spoofed = IntCounter::with_opts(opts(
            "packets_spoofed_total",
            "Packets not counted because they came in on an interface their source address is not routed through (a forged source).",
        ))?;
        let dns_events_lost = IntCounter::with_opts(opts(
            "dns_events_lost_total",
            "DNS messages the kernel could not hand over because the ring buffer was full.",
        ))?;
        let dns_messages = IntCounterVec::new(
            opts(
                "dns_messages_total",
                "DNS messages from the kernel, by type: query, response (to a query seen), unsolicited (a response to no query seen), malformed (not DNS, cut, or an IP fragment).",
            ),
            &["type"],
        )?;
        let dns_cache_entries = IntGauge::with_opts(opts(
            "dns_cache_entries",
            "Entries of the passive DNS map (client, address) -> name.",
        ))?;
        let client_hellos = IntCounterVec::new(
            opts(
                "client_hellos_total",
                "TLS ClientHellos and QUIC Initials that opened connections, by result: parsed \
                 (server_name read, or the hello has none), unparsed (cut before server_name, \
                 or a QUIC Initial the agent cannot open).",
            ),
            &["result"],
        )?;
        let hello_events_lost = IntCounter::with_opts(opts(
            "hello_events_lost_total",
            "First payloads of connections (TLS ClientHellos, QUIC Initials) the kernel could \
             not hand over because their ring buffer was full.",
        ))?;
        let owner_events_lost = IntCounter::with_opts(opts(
            "owner_events_lost_total",
            "Owners of the watched host's sockets (the process that connected, accepted or sent) \
             the kernel could not hand over because their ring buffer was full: those \
             connections carry no local_pid.",
        ))?;
        let encrypted_dns = IntCounter::with_opts(opts(
            "encrypted_dns_connections_total",
            "Finished connections that carried encrypted DNS: port 853 (DNS over TLS or QUIC), \
             or DNS over HTTPS by the server_name of their hello.",
        ))?;
        let unparsed = IntCounterVec::new(
            opts(
                "packets_unparsed_total",
                "Packets passed without counting because they could not be parsed, by reason; \
                 ip_len_exceeds_frame: malformed packets counted as the frame's length.",
            ),
            &["reason"],
        )?;
        let parse_failing = IntGauge::with_opts(opts(
            "parse_failing",
            "1 while most packets of the last minute could not be parsed (at least 60): the \
             programs may not understand a watched interface's framing.",
        ))?;
        let poll_duration = Histogram::with_opts(
            HistogramOpts::new(
                "poll_duration_seconds",
                "Time one poll takes: map read, rules, logs.",
            )
            .namespace(PREFIX)
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let poll_entries_read = IntGauge::with_opts(opts(
            "poll_entries_read",
            "Entries the last poll read from the kernel connection map: those that changed \
             since the poll before, or all of them on a whole read.",
        ))?;
        let connections_finishing = IntGauge::with_opts(opts(
            "connections_finishing",
            "Connections found finished and not yet taken out of the kernel map: a poll takes \
             them during the first half of its interval and leaves the rest to the next.",
        ))?;
        let poll_reads = IntCounterVec::new(
            opts(
                "poll_reads_total",
                "Polls by how they read the connection map: changed (only the entries that \
                 changed) or whole (every entry: the first poll, and after changes were lost).",
            ),
            &["coverage"],
        )?;
        let changes_lost = IntCounter::with_opts(opts(
            "flow_map_changes_lost_total",
            "Changed entries the kernel could not name to the agent because the ring of \
             changes was full: the next poll reads the whole map.",
        ))?;
        let top_talkers_gauge = IntGaugeVec::new(
            opts(
                "top_talker_bytes",
                "IP bytes the busiest local senders sent to non-local hosts in the last complete window (--top-talkers hosts at most).",
            ),
            &["host"],
        )?;
        let sink_dropped = IntCounterVec::new(
            opts(
                "alerts_dropped_total",
                "Alerts a sink's bounded queue could not take while the sink was slow or down, by sink.",
            ),
            &["sink"],
        )?;
        let sink_failures = IntCounterVec::new(
            opts(
                "alert_delivery_failures_total",
                "Failed attempts to deliver an alert to a sink (each is retried), by sink.",
            ),
            &["sink"],
        )?;
        let log_errors = IntCounterVec::new(
            opts(
                "log_write_errors_total",
                "Failed writes of a file log (conn, conn_long, dns); what was not written is retried at the next poll.",
            ),
            &["log"],
        )?;
        let log_lost = IntCounterVec::new(
            opts(
                "log_records_lost_total",
                "Records a file log dropped because too much was already waiting for a failing file.",
            ),
            &["log"],
        )?;
        let shed = IntCounterVec::new(
            opts(
                "state_shed_total",
                "Entries dropped from state that floods could grow without end, by state (suppression, window_groups, top_talkers): the smaller half of a full table.",
            ),
            &["state"],
        )?;
        let ipfix_records = IntCounter::with_opts(opts(
            "ipfix_records_total",
            "IPFIX data records sent, all collectors together.",
        ))?;
        let ipfix_messages = IntCounter::with_opts(opts(
            "ipfix_messages_total",
            "IPFIX messages sent, all collectors together.",
        ))?;
        let ipfix_errors = IntCounter::with_opts(opts(
            "ipfix_export_errors_total",
            "IPFIX messages not sent: UDP send errors, messages dropped from a full queue, and \
             messages a TCP collector could not take before shutdown.",
        ))?;
        let config_reloads = IntCounterVec::new(
            opts(
                "config_reloads_total",
                "List reloads on SIGHUP, by result: ok (every list file read), error (a file \
                 could not be read or had a bad line; its list stays as it was).",
            ),
            &["result"],
        )?;
        let build_info = IntGaugeVec::new(
            opts("build_info", "Version of the agent; always 1."),
            &["version"],
        )?;
        for collector in [
            Box::new(bytes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(packets.clone()),
            Box::new(connections_active.clone()),
            Box::new(connections_total.clone()),
            Box::new(alerts.clone()),
            Box::new(suppressed.clone()),
            Box::new(flow_map_entries.clone()),
            Box::new(flow_map_capacity.clone()),
            Box::new(flow_map_full.clone()),
            Box::new(dns_events_lost.clone()),
            Box::new(spoofed.clone()),
            Box::new(dns_messages.clone()),
            Box::new(dns_cache_entries.clone()),
            Box::new(client_hellos.clone()),
            Box::new(hello_events_lost.clone()),
            Box::new(owner_events_lost.clone()),
            Box::new(encrypted_dns.clone()),
            Box::new(unparsed.clone()),
            Box::new(parse_failing.clone()),
            Box::new(poll_duration.clone()),
            Box::new(poll_entries_read.clone()),
            Box::new(connections_finishing.clone()),
            Box::new(poll_reads.clone()),
            Box::new(changes_lost.clone()),
            Box::new(build_info.clone()),
            Box::new(top_talkers_gauge.clone()),
            Box::new(sink_dropped.clone()),
            Box::new(sink_failures.clone()),
            Box::new(log_errors.clone()),
            Box::new(log_lost.clone()),
            Box::new(shed.clone()),
            Box::new(ipfix_records.clone()),
            Box::new(ipfix_messages.clone()),
            Box::new(ipfix_errors.clone()),
            Box::new(config_reloads.clone()),
        ] {
            registry.register(collector)?;
        }
        // Every label value exists from the start, so rates work from the first scrape.
        let by_direction = DIRECTIONS.map(|direction| {
            (
                bytes.with_label_values(&[direction]),
                packets.with_label_values(&[direction]),
            )
        });
        for note in Note::ALL {
            alerts.with_label_values(&[note.as_str()]);
            suppressed.with_label_values(&[note.as_str()]);
        }
        for (_, reason) in stats::UNPARSED_REASONS {
            unparsed.with_label_values(&[reason]);
        }
        for kind in DNS_TYPES {
            dns_messages.with_label_values(&[kind]);
        }
        for result in HELLO_RESULTS {
            client_hellos.with_label_values(&[result]);
        }
        for coverage in ["changed", "whole"] {
            poll_reads.with_label_values(&[coverage]);
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        flow_map_capacity.set(i64::from(capacity));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(Self {
            registry,
            by_direction,
            connections_active,
            connections_total,
            alerts,
            suppressed,
            flow_map_entries,
            flow_map_full,
            dns_events_lost,
            spoofed,
            dns_messages,
            dns_cache_entries,
            last_dns: DnsCounts::default(),
            client_hellos,
            last_hellos: HelloCounts::default(),
            hello_events_lost,
            hello_lost_seen: 0,
            owner_events_lost,
            encrypted_dns,
            unparsed,
            parse_failing,
            poll_duration,
            poll_entries_read,
            connections_finishing,
            poll_reads,
            changes_lost,
            changes_lost_seen: 0,
            added: 0,
            last_stats: [0; stats::SLOTS as usize],
            top: TopTalkers {
                n: top_talkers,
                window: window.as_secs_f64(),
                current: None,
                sums: HashMap::new(),
                gauge: top_talkers_gauge,
                shed: 0,
            },
            sink_dropped,
            sink_failures,
            log_errors,
            log_lost,
            shed,
            ipfix_records,
            ipfix_messages,
            ipfix_errors,
            config_reloads,
        })
    }

    /// Wire packets counted so far, all directions.
    pub fn packets_counted(&self) -> u64 {
        self.by_direction
            .iter()
            .map(|(_, packets)| packets.get())
            .sum()
    }

    pub fn parse_failing(&self, failing: bool) {
        self.parse_failing.set(i64::from(failing));
    }

    /// Adds what a connection carried since its observation before the latest.
    pub fn observe(&mut self, view: &View) {
        let conn = view.conn;
        let (a, b) = conn.key_endpoints();
        for i in [DIR_A_TO_B, DIR_B_TO_A] {
            let new = conn.delta(i);
            let (from_local, to_local) = view.local_from_to(i);
            // Indexes into DIRECTIONS.
            let direction = match (from_local, to_local) {
                (true, false) => 0,
                (false, true) => 1,
                (true, true) => 2,
                (false, false) => 3,
            };
            let (bytes, packets) = &self.by_direction[direction];
            packets.inc_by(new.pkts);
            bytes.inc_by(new.ip_bytes);
            if direction == 0 {
                let sender = if i == DIR_A_TO_B { a.addr } else { b.addr };
                self.top.add(sender, new.ip_bytes);
            }
        }
    }

    pub fn alert(&self, note: Note) {
        self.alerts.with_label_values(&[note.as_str()]).inc();
    }

    pub fn suppressed(&self, note: Note) {
        self.suppressed.with_label_values(&[note.as_str()]).inc();
    }

    /// After a poll: the table's and map's sizes, the kernel's STATS and the poll's time.
    /// After a poll: `open` connections in the table, `added` ever added to it.
    pub fn polled(
        &mut self,
        (open, added): (usize, u64),
        counters: [u64; stats::SLOTS as usize],
        took: Duration,
        epoch: f64,
    ) {
        self.top.roll(epoch);
        self.connections_total
            .inc_by(added.saturating_sub(self.added));
        self.added = added;
        self.connections_active.set(open as i64);
        self.flow_map_entries.set(open as i64);
        for (slot, (&now, before)) in counters.iter().zip(&mut self.last_stats).enumerate() {
            let new = now.saturating_sub(*before);
            *before = now;
            if slot == stats::FLOW_MAP_FULL as usize {
                self.flow_map_full.inc_by(new);
            } else if slot == stats::DNS_EVENTS_LOST as usize {
                self.dns_events_lost.inc_by(new);
            } else if slot == stats::SPOOFED_SOURCE as usize {
                self.spoofed.inc_by(new);
            } else if let Some(reason) = stats::unparsed_reason(slot as u32) {
                self.unparsed.with_label_values(&[reason]).inc_by(new);
            }
        }
        self.poll_duration.observe(took.as_secs_f64());
    }

    /// A poll's read of the connection map: how it covered the map, how many entries it
    /// read, and the changes lost so far.
    pub fn read(&mut self, coverage: Coverage, entries: usize, changes_lost: u64) {
        let label = match coverage {
            Coverage::Whole => "whole",
            Coverage::Changed => "changed",
        };
        self.poll_reads.with_label_values(&[label]).inc();
        self.poll_entries_read.set(entries as i64);
        self.changes_lost
            .inc_by(changes_lost.saturating_sub(self.changes_lost_seen));
        self.changes_lost_seen = changes_lost;
    }

    /// Finished connections left for the next poll to take.
    pub fn finishing(&mut self, waiting: usize) {
        self.connections_finishing.set(waiting as i64);
    }

    /// The DNS module's totals (they only grow) and its cache size.
    pub fn dns(&mut self, counts: DnsCounts, cache_entries: usize) {
        let before = std::mem::replace(&mut self.last_dns, counts);
        for (kind, now, was) in [
            ("query", counts.query, before.query),
            ("response", counts.response, before.response),
            ("unsolicited", counts.unsolicited, before.unsolicited),
            ("malformed", counts.malformed, before.malformed),
        ] {
            self.dns_messages
                .with_label_values(&[kind])
                .inc_by(now.saturating_sub(was));
        }
        self.dns_cache_entries.set(cache_entries as i64);
    }

    /// The hellos' totals (they only grow), and the kernel's count of those lost.
    pub fn hellos(&mut self, counts: HelloCounts, lost: u64) {
        let before = std::mem::replace(&mut self.last_hellos, counts);
        for (result, now, was) in [
            (HELLO_RESULTS[0], counts.parsed, before.parsed),
            (HELLO_RESULTS[1], counts.unparsed, before.unparsed),
        ] {
            self.client_hellos
                .with_label_values(&[result])
                .inc_by(now.saturating_sub(was));
        }
        self.hello_events_lost
            .inc_by(lost.saturating_sub(self.hello_lost_seen));
        self.hello_lost_seen = lost;
    }

    /// The kernel's count of socket owners lost (it only grows).
    pub fn owners_lost(&self, lost: u64) {
        catch_up(&self.owner_events_lost, lost);
    }

    /// A sink's totals as its dispatcher counts them (they only grow).
    pub fn sink(&self, name: &str, dropped: u64, failures: u64) {
        for (counter, total) in [
            (&self.sink_dropped, dropped),
            (&self.sink_failures, failures),
        ] {
            catch_up(&counter.with_label_values(&[name]), total);
        }
    }

    /// Each file log's totals (they only grow); None for a log that is not written.
    pub fn logs<'a>(&self, logs: impl IntoIterator<Item = (&'a str, Option<LogStats>)>) {
        for (name, stats) in logs {
            let Some(stats) = stats else { continue };
            for (counter, total) in [
                (&self.log_errors, stats.errors),
                (&self.log_lost, stats.lost),
            ] {
                catch_up(&counter.with_label_values(&[name]), total);
            }
        }
    }

    /// A reload of the lists: whether every file read well.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// What the bounded tables shed so far: the suppressor's and the rules' totals.
    pub fn shed(&self, suppression: u64, window_groups: u64) {
        for (state, total) in [
            ("suppression", suppression),
            ("window_groups", window_groups),
            ("top_talkers", self.top.shed),
        ] {
            catch_up(&self.shed.with_label_values(&[state]), total);
        }
    }

    /// The exporters' totals (they only grow).
    pub fn ipfix(&self, records: u64, messages: u64, errors: u64) {
        for (counter, total) in [
            (&self.ipfix_records, records),
            (&self.ipfix_messages, messages),
            (&self.ipfix_errors, errors),
        ] {
            catch_up(counter, total);
        }
    }

    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encoding to a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Binds `addr` now (so a taken port fails at start-up) and serves `/metrics`, and `/top`
/// (the busiest connections as JSON, for `monitor top`), from a task on the current
/// runtime.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    top: watch::Receiver<top::View>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("--metrics-addr {addr}: cannot listen (choose another address)")
    })?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = render(&registry);
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        )
        .route(
            "/top",
            get(move || {
                let body = serde_json::to_string(&*top.borrow())
                    .expect("a view has only strings and finite numbers");
                async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
            }),
        );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            log::warn!("metrics endpoint stopped: {err}");
        }
    });
    Ok(())
}

/// The traffic counters take what each connection carried since its last observation,
/// open or finished.
impl Consumer for Metrics {
    fn update(&mut self, conn: &ConnCtx, _now: Now) {
        self.observe(conn.view());
    }

    fn finish(&mut self, conn: &ConnCtx, _now: Now, _reason: EndReason) {
        self.observe(conn.view());
        if conn.encrypted_dns() {
            self.encrypted_dns.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conntable::{ConnTable, Uids},
        rules::testkit::{ConnSpec, local},
    };

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    }

    #[test]
    fn directions_deltas_and_names() {
        let mut m = Metrics::new(1024, 0, Duration::from_secs(300)).unwrap();
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let mut observe = |m: &mut Metrics, spec: &ConnSpec| {
            let snap = spec.conn().snap();
            table.observe(snap);
            let conn = table.iter().find(|c| c.key == snap.key).unwrap();
            m.observe(&local().view(conn));
        };
        let mut spec = ConnSpec {
            orig_bytes: 10_000,
            resp_bytes: 2_000,
            ..ConnSpec::timed()
        };
        observe(&mut m, &spec);
        spec.orig_bytes = 30_000;
        observe(&mut m, &spec);
        let internal = ConnSpec {
            resp: ("198.18.9.9", 22),
            orig_bytes: 1_000,
            uid: "Cinternal",
            ..ConnSpec::timed()
        };
        observe(&mut m, &internal);
        let added = table.added();
        m.alert(Note::LargeUpload);
        m.suppressed(Note::RestrictedOutbound);
        let mut counters = [0; stats::SLOTS as usize];
        counters[stats::NOT_IP as usize] = 3;
        counters[stats::FLOW_MAP_FULL as usize] = 7;
        counters[stats::DNS_EVENTS_LOST as usize] = 4;
        m.polled((2, added), counters, Duration::from_millis(3), 0.0);
        let text = render(&m.registry());
        // The test connections carry 1000 bytes of payload + 52 of headers per packet.
        assert_eq!(
            value(&text, "egress_monitor_bytes_total{direction=\"outbound\"}"),
            30_000.0 + 30.0 * 52.0
        );
        assert_eq!(
            value(
                &text,
                "egress_monitor_packets_total{direction=\"outbound\"}"
            ),
            30.0
        );
        assert_eq!(
            value(&text, "egress_monitor_bytes_total{direction=\"inbound\"}"),
            2_000.0 + 2.0 * 52.0
        );
        // Both directions of a local-to-local connection (the reply: one empty packet).
        assert_eq!(
            value(&text, "egress_monitor_bytes_total{direction=\"internal\"}"),
            1_000.0 + 52.0 + 52.0
        );
        assert_eq!(
            value(&text, "egress_monitor_bytes_total{direction=\"external\"}"),
            0.0
        );
        assert_eq!(value(&text, "egress_monitor_connections_total"), 2.0);
        assert_eq!(value(&text, "egress_monitor_connections_active"), 2.0);
        assert_eq!(
            value(&text, "egress_monitor_alerts_total{note=\"LargeUpload\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "egress_monitor_alerts_total{note=\"DataLeak\"}"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "egress_monitor_alerts_suppressed_total{note=\"RestrictedOutbound\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "egress_monitor_packets_unparsed_total{reason=\"not_ip\"}"
            ),
            3.0
        );
        assert_eq!(value(&text, "egress_monitor_flow_map_full_total"), 7.0);
        assert_eq!(value(&text, "egress_monitor_dns_events_lost_total"), 4.0);
        assert_eq!(value(&text, "egress_monitor_flow_map_capacity"), 1024.0);
        assert_eq!(
            value(&text, "egress_monitor_poll_duration_seconds_count"),
            1.0
        );
        assert!(
            text.contains("egress_monitor_build_info{version="),
            "{text}"
        );
        assert!(!text.contains("198.18."), "no addresses in labels");
        // Counters only grow by what is new.
        m.polled((2, 0), counters, Duration::from_millis(3), 0.0);
        let text = render(&m.registry());
        assert_eq!(value(&text, "egress_monitor_flow_map_full_total"), 7.0);
        assert!(!text.contains("top_talker_bytes{"), "off by default");
        m.sink("syslog", 2, 5);
        m.sink("syslog", 3, 5);
        let text = render(&m.registry());
        assert_eq!(
            value(
                &text,
                "egress_monitor_alerts_dropped_total{sink=\"syslog\"}"
            ),
            3.0
        );
        assert_eq!(
            value(
                &text,
                "egress_monitor_alert_delivery_failures_total{sink=\"syslog\"}"
            ),
            5.0
        );
    }

    #[test]
    fn top_talkers_are_bounded_and_replaced_each_window() {
        let mut m = Metrics::new(1024, 2, Duration::from_secs(60)).unwrap();
        let counters = [0; stats::SLOTS as usize];
        let poll = |m: &mut Metrics, epoch: f64| m.polled((0, 0), counters, Duration::ZERO, epoch);
        poll(&mut m, 0.0);
        for (i, host) in ["198.18.1.2", "198.18.1.3", "198.18.1.4"]
            .into_iter()
            .enumerate()
        {
            let spec = ConnSpec {
                orig: (host, 40000),
                orig_bytes: (i as u64 + 1) * 10_000,
                uid: ["C1", "C2", "C3"][i],
                ..ConnSpec::default()
            };
            let conn = spec.conn();
            m.observe(&local().view(&conn));
        }
        poll(&mut m, 30.0);
        assert!(
            !render(&m.registry()).contains("top_talker_bytes{"),
            "window not over"
        );
        poll(&mut m, 61.0);
        let text = render(&m.registry());
        let top = |host: &str| {
            value(
                &text,
                &format!("egress_monitor_top_talker_bytes{{host=\"{host}\"}}"),
            )
        };
        assert_eq!(top("198.18.1.4"), 30_000.0 + 30.0 * 52.0);
        assert_eq!(top("198.18.1.3"), 20_000.0 + 20.0 * 52.0);
        assert!(!text.contains("198.18.1.2"), "at most N series:\n{text}");
        poll(&mut m, 121.0);
        assert!(
            !render(&m.registry()).contains("top_talker_bytes{"),
            "a quiet window replaces them"
        );
    }

    #[test]
    fn a_flood_of_hosts_sheds_the_smallest_sums_and_keeps_the_top() {
        let mut m = Metrics::new(1024, 1, Duration::from_secs(60)).unwrap();
        m.top.current = Some(0);
        m.top.add("198.18.1.2".parse().unwrap(), 1_000_000);
        for n in 0..=MAX_TOP_HOSTS as u128 {
            let host = std::net::Ipv6Addr::from(0x2001_0db8_0001_u128 << 80 | n);
            m.top.add(host.into(), 1);
        }
        assert!(m.top.sums.len() <= MAX_TOP_HOSTS);
        m.shed(0, 0);
        let text = render(&m.registry());
        assert!(
            value(
                &text,
                "egress_monitor_state_shed_total{state=\"top_talkers\"}"
            ) >= (MAX_TOP_HOSTS / 2) as f64
        );
        m.top.roll(61.0);
        let text = render(&m.registry());
        assert_eq!(
            value(
                &text,
                "egress_monitor_top_talker_bytes{host=\"198.18.1.2\"}"
            ),
            1_000_000.0
        );
    }

    /// docs/metrics.md has a row for every metric the agent registers, with its type and
    /// labels, and names no metric that does not exist.
    #[test]
    fn docs_metrics_list_every_metric() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
        let doc = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{path}: {err}"));
        // A labelled metric shows in a scrape only once it has a series: give each one.
        let mut m = Metrics::new(1024, 1, Duration::from_secs(60)).unwrap();
        let counters = [0; stats::SLOTS as usize];
        m.polled((0, 0), counters, Duration::ZERO, 0.0);
        let conn = ConnSpec::default().conn();
        m.observe(&local().view(&conn));
        m.polled((0, 0), counters, Duration::ZERO, 61.0);
        m.sink("syslog", 0, 0);
        m.logs([("conn", Some(LogStats::default()))]);
        m.shed(0, 0);
        let families = m.registry().gather();
        let gathered: Vec<&str> = families.iter().map(|f| f.name()).collect();

        // Every name declared above this module, so that a new labelled metric this test
        // does not give a series is not missed.
        let source = include_str!("metrics.rs");
        let source = &source[..source.find("#[cfg(test)]").expect("a test module")];
        for call in ["opts(", "HistogramOpts::new("] {
            for (at, _) in source.match_indices(call) {
                let Some(rest) = source[at + call.len()..].trim_start().strip_prefix('"') else {
                    continue;
                };
                let name = format!("{PREFIX}_{}", &rest[..rest.find('"').expect("a string")]);
                assert!(
                    gathered.contains(&name.as_str()),
                    "{name} has no series in this test: give it one above"
                );
            }
        }

        for family in &families {
            let name = family.name();
            let row = doc
                .lines()
                .find(|line| line.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("docs/metrics.md: no row for {name}"));
            let kind = format!("{:?}", family.get_field_type()).to_lowercase();
            assert!(
                row.contains(&format!("| {kind} |")),
                "docs/metrics.md: {name} is a {kind}:\n{row}"
            );
            for label in family.get_metric()[0].get_label() {
                let label = format!("`{}`", label.name());
                assert!(
                    row.contains(&label),
                    "docs/metrics.md: {name} has label {label}:\n{row}"
                );
            }
        }
        for (at, _) in doc.match_indices("`egress_monitor_") {
            let name: String = doc[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // The prefix alone, where the page says what every name starts with.
            assert!(
                name == format!("{PREFIX}_") || gathered.contains(&name.as_str()),
                "docs/metrics.md names {name}, which the agent does not register"
            );
        }
    }
}
