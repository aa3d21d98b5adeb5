//! The Grafana dashboard (`deploy/grafana/egress-monitor.json`) proved the way it is used:
//! Debian's Prometheus scrapes the agent in the lab while traffic, DNS, alerts (one sent,
//! one suppressed), IPFIX export and two alert sinks happen, then every panel's PromQL,
//! read out of the JSON with its template variables filled in (`job` and `instance` with
//! the lab's values, which those variables' `label_values` must offer), goes through
//! Prometheus's query API. Each must return data: a non-empty result vector, at least one
//! series. A rate of a counter that did not move is a series with value 0, which is data:
//! it shows the agent exports the metric under the labels the panel selects.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use tests::{
    dashboard::{self, Query},
    dns_lab::{TYPE_A, resolve, start_dnsmasq},
    http::eventually,
    lab::{self, Lab, run_in_ns},
    prometheus::{self, Prometheus},
    rules_lab::RulesAgent,
    traffic,
};

/// Grafana's `$__rate_interval` is at least four scrape intervals (1 s here).
const RATE_INTERVAL: &str = "5s";
const INTERVAL: &str = "1s";
/// Top talkers are summed over windows this long; only complete ones are published.
const WINDOW: &str = "2s";
const UPLOAD: u64 = 2_000_000;
const IPFIX_COLLECTOR: &str = "127.0.0.1:4739";
const SYSLOG: &str = "127.0.0.1:5514";
const EVENT_LIMIT: Duration = Duration::from_secs(60);
/// How long every panel has to return data once the events above are in Prometheus: a
/// few scrapes, for series to have two samples within `RATE_INTERVAL`.
const PANEL_LIMIT: Duration = Duration::from_secs(15);

/// A UDP socket bound in `ns` that nothing reads: a collector or syslog server that is
/// there, so sends succeed.
fn udp_sink(ns: &str, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().expect("address");
    run_in_ns(ns, move || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

#[test]
fn every_panel_returns_data() {
    let lab = Lab::new();
    let _collector = udp_sink(&lab.gw, IPFIX_COLLECTOR);
    let _syslog = udp_sink(&lab.gw, SYSLOG);
    let (ipfix_arg, syslog_arg) = (
        format!("udp://{IPFIX_COLLECTOR}"),
        format!("udp://{SYSLOG}"),
    );
    let flags = [
        ("--upload-threshold", "1MB"),
        ("--upload-min-packets", "100"),
        ("--top-talkers", "5"),
        ("--window", WINDOW),
        ("--ipfix-collector", &ipfix_arg),
        ("--syslog", &syslog_arg),
    ];
    let flags: Vec<&str> = flags.iter().flat_map(|&(f, v)| [f, v]).collect();
    let agent = RulesAgent::start(&lab, &flags);
    let prometheus = Prometheus::start(&lab);

    // Outbound bytes in every window, so that each published top-talkers set has the lan
    // host (a window without outbound bytes publishes none). Killed with the lab.
    lab.spawn_in(
        &lab.lan,
        &["ping", "-q", "-i", "0.2", &lab::WAN_HOST_V4.to_string()],
    );
    let resolver = start_dnsmasq(&lab, &["--address=/example.test/203.0.113.10"]);
    let answer = resolve(&lab.lan, resolver, "files.example.test", TYPE_A, false);
    assert_eq!(answer.rcode, 0, "{answer:?}");
    // The same kind of upload between the same hosts twice: LargeUpload alerts for the
    // first and suppresses the second.
    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), 5001);
    for _ in 0..2 {
        let sent = traffic::tcp_upload(&lab.lan, &lab.wan, server, UPLOAD);
        assert_eq!(sent.server_received, UPLOAD, "the generator's own count");
    }

    for (what, expr) in [
        (
            "an alert",
            r#"egress_monitor_alerts_total{note="LargeUpload"}"#,
        ),
        (
            "a suppressed alert",
            r#"egress_monitor_alerts_suppressed_total{note="LargeUpload"}"#,
        ),
        (
            "a DNS query",
            r#"egress_monitor_dns_messages_total{type="query"}"#,
        ),
        ("an IPFIX message", "egress_monitor_ipfix_messages_total"),
    ] {
        eventually(&format!("Prometheus has {what}"), EVENT_LIMIT, || {
            prometheus.value(expr).filter(|&n| n >= 1.0)
        });
    }
    let host = lab::LAN_HOST_V4.to_string();
    eventually(
        "Prometheus has the lan host as a top talker",
        EVENT_LIMIT,
        || {
            let series = prometheus.query("egress_monitor_top_talker_bytes")?;
            series
                .iter()
                .any(|s| s["metric"]["host"] == host.as_str())
                .then_some(())
        },
    );

    let vars = [
        ("job", prometheus::JOB),
        ("instance", prometheus::INSTANCE),
        ("__rate_interval", RATE_INTERVAL),
        ("__interval", INTERVAL),
    ];
    let dashboard = dashboard::load();
    // The values the test fills in are those Grafana offers for the lab's agent.
    for var in dashboard::variables(&dashboard) {
        let value = vars
            .iter()
            .find(|(name, _)| *name == var.name)
            .unwrap_or_else(|| panic!("variable {} has no value in the test", var.name))
            .1;
        let selector = dashboard::fill(&var.selector, &vars);
        eventually(
            &format!("variable {} offers {value}", var.name),
            PANEL_LIMIT,
            || {
                let series = prometheus.query(&selector)?;
                series
                    .iter()
                    .any(|s| s["metric"][&var.label] == value)
                    .then_some(())
            },
        );
    }
    let queries = dashboard::queries(&dashboard);
    assert!(!queries.is_empty(), "{} has no queries", dashboard::PATH);
    let mut empty: Vec<Query> = queries
        .into_iter()
        .map(|q| Query {
            expr: dashboard::fill(&q.expr, &vars),
            ..q
        })
        .collect();
    let start = Instant::now();
    loop {
        empty.retain(|q| prometheus.query(&q.expr).is_none_or(|r| r.is_empty()));
        if empty.is_empty() || start.elapsed() > PANEL_LIMIT {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    let listing: Vec<String> = empty
        .iter()
        .map(|q| format!("{}: {}", q.panel, q.expr))
        .collect();
    assert!(
        empty.is_empty(),
        "panels whose queries returned no data within {PANEL_LIMIT:?}:\n{}",
        listing.join("\n")
    );
    agent.stop();
}
