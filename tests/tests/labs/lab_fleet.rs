//! The fleet path on real engines: two gateways, each with its own agent, export IPFIX to
//! one pmacct `nfacctd` that writes into PostgreSQL, configured by `deploy/fleet/`. A local
//! host uploads through both gateways; the shipped query `deploy/fleet/host_upload.sql`
//! reports its total upload across the fleet exactly (the WAN links' tx counters, and the
//! agents' conn logs), and `deploy/fleet/dataleak.sql` sums the same bytes.

use std::{net::IpAddr, path::PathBuf, thread, time::Duration};

use tests::{
    agent::Agent,
    fleet::{self, Fleet},
    lab,
    pmacct::{Nfacctd, Output},
    postgres::{self, Postgres},
    traffic,
};

const IPFIX_PORT: u16 = 4739;
/// Bytes a veth's tx counter counts per frame beyond the IP packet: no XDP and no GRO
/// anywhere in the fleet lab, so the Ethernet header.
const ETH_HEADER: u64 = 14;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/fleet")
        .join(file)
}

fn agent(ns: &str, collector: IpAddr, domain: &str) -> Agent {
    let url = format!("udp://{collector}:{IPFIX_PORT}");
    Agent::start(
        ns,
        fleet::GW_WAN_IF,
        &[
            "--ingress-hook",
            "tc",
            "--local-net",
            fleet::LOCAL_NET,
            "--poll-interval",
            "200ms",
            "--ipfix-collector",
            &url,
            "--ipfix-domain-id",
            domain,
        ],
    )
}

/// The README shows `dataleak.sql`'s query: the same text, comments aside.
#[test]
fn readme_shows_the_shipped_dataleak_query() {
    let sql = std::fs::read_to_string(deploy("dataleak.sql")).expect("dataleak.sql");
    let query: Vec<&str> = sql.lines().filter(|l| !l.starts_with("--")).collect();
    let readme = std::fs::read_to_string(deploy("../../README.md")).expect("README.md");
    assert!(
        readme.contains(&query.join("\n")),
        "README.md's fleet DataLeak query differs from deploy/fleet/dataleak.sql"
    );
}

#[test]
fn one_query_sums_a_hosts_upload_across_two_gateways() {
    let fleet = Fleet::new();
    let pg = Postgres::start("fleet");
    pg.psql_file(&deploy("schema.sql"), &[]);
    let mut nfacctd = Nfacctd::start(
        &fleet.collector,
        "0.0.0.0".parse().unwrap(),
        IPFIX_PORT,
        Output::Config {
            config: deploy("nfacctd.conf"),
            set: vec![
                ("sql_host[fleet]", pg.socket_dir().display().to_string()),
                ("sql_port[fleet]", postgres::PORT.to_string()),
            ],
        },
    );
    let agent_a = agent(&fleet.gw_a, fleet::COLLECTOR_A.into(), "1");
    let agent_b = agent(&fleet.gw_b, fleet::COLLECTOR_B.into(), "2");

    lab::wait_quiet(&fleet.wan_links());
    let before = fleet.uploads();
    let up_a = traffic::tcp_upload(
        &fleet.host,
        &fleet.wan_a,
        (fleet::WAN_A, 6001).into(),
        3_000_000,
    );
    let up_b = traffic::tcp_upload(
        &fleet.host,
        &fleet.wan_b,
        (fleet::WAN_B, 6002).into(),
        2_000_000,
    );
    assert_eq!(
        (up_a.server_received, up_b.server_received),
        (3_000_000, 2_000_000)
    );
    let udp_a = traffic::udp_exchange(
        &fleet.host,
        &fleet.wan_a,
        (fleet::WAN_A, 6003).into(),
        20,
        1000,
    );
    let udp_b = traffic::udp_exchange(
        &fleet.host,
        &fleet.wan_b,
        (fleet::WAN_B, 6004).into(),
        30,
        500,
    );
    assert_eq!((udp_a.responses, udp_b.responses), (20, 30));
    let ping = traffic::ping(&fleet.host, fleet::WAN_B.into(), 5, 200);
    assert_eq!(ping.received, 5);
    lab::wait_quiet(&fleet.wan_links());
    let after = fleet.uploads();
    let per_gateway: Vec<(u64, u64)> = after
        .iter()
        .zip(before)
        .map(|(now, then)| {
            let d = now.since(then);
            (d.tx_packets, d.tx_ip_bytes(ETH_HEADER))
        })
        .collect();
    let truth = per_gateway
        .iter()
        .fold((0, 0), |(p, b), g| (p + g.0, b + g.1));
    // The UDP and ICMP part is known from the generators alone: a floor for each gateway.
    assert!(per_gateway[0].1 > 3_000_000 + 20 * 1028, "{per_gateway:?}");
    assert!(
        per_gateway[1].1 > 2_000_000 + 30 * 528 + 5 * 228,
        "{per_gateway:?}"
    );

    let mut logged = (0, 0);
    for record in agent_a.stop().into_iter().chain(agent_b.stop()) {
        if record.orig().0 == IpAddr::from(fleet::HOST) {
            logged.0 += record.u64("orig_pkts");
            logged.1 += record.u64("orig_ip_bytes");
        }
    }
    assert_eq!(
        logged, truth,
        "the agents' conn logs against the WAN links' counters"
    );
    // nfacctd reads its socket on its own time: let it drain before stopping it.
    thread::sleep(Duration::from_millis(500));
    nfacctd.stop();

    let rows = pg.psql_file(
        &deploy("host_upload.sql"),
        &[("local_net", fleet::LOCAL_NET)],
    );
    let host = fleet::HOST.to_string();
    let row: Vec<&str> = rows
        .lines()
        .find(|l| l.starts_with(&format!("{host}|")))
        .unwrap_or_else(|| panic!("no row for {host}: {rows:?}\nnfacctd: {}", nfacctd.log()))
        .split('|')
        .collect();
    let got: (u64, u64) = (row[2].parse().unwrap(), row[1].parse().unwrap());
    assert_eq!(
        got, truth,
        "host_upload.sql's (packets, bytes) for {host} against the WAN links' counters"
    );
    assert_eq!(row[3], "2", "through both gateways: {row:?}");

    let leaks = pg.psql_file(
        &deploy("dataleak.sql"),
        &[
            ("local_net", fleet::LOCAL_NET),
            ("window_threshold", "0"),
            ("leak_threshold", "0"),
            ("leak_period", "'1 hour'"),
        ],
    );
    let leak: Vec<&str> = leaks
        .lines()
        .find(|l| l.starts_with(&format!("{host}|")))
        .unwrap_or_else(|| panic!("no DataLeak row for {host}: {leaks:?}"))
        .split('|')
        .collect();
    assert_eq!(
        leak[1],
        truth.1.to_string(),
        "dataleak.sql with zero thresholds: {leak:?}"
    );
    eprintln!("fleet upload of {host}: {truth:?} (packets, IP bytes) per gateway {per_gateway:?}");
}
