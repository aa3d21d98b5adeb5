//! A flood of connections at the default flow map: polls keep their interval, and nothing
//! the kernel counted is lost. A test binary of its own, not a module of `labs`: test
//! binaries run one after another, so no other test's traffic shares the CPUs while polls
//! are timed.

use std::time::Duration;

use tests::{
    agent::Agent,
    flood, http,
    lab::{self, Lab},
    rules_lab::Scratch,
};

/// Ten times the default flow map in distinct single-packet UDP flows, sent as fast as
/// tcpreplay can (each of its 10 loops moves every address: `--unique-ip`), at an agent with
/// the default map size and poll interval: every poll ends within that interval while the
/// map fills, sheds what it cannot hold and finishes what went quiet; and every flood
/// packet is in a conn-log record or counted as refused by a full map.
#[test]
fn a_flood_of_ten_times_the_flow_map_keeps_each_poll_within_the_interval() {
    const MAP: u32 = 262_144;
    const LOOPS: u64 = 10;
    lab::require_tool("tcpreplay", "tcpreplay");
    let lab = Lab::new();
    let scratch = Scratch::new("flow-flood");
    let pcap = scratch.path("flood.pcap");
    let (frames, _) = flood::write(&pcap, MAP);
    let agent = Agent::start(&lab.gw, &lab.gw_wan_if, &["--local-net", lab::LOCAL_NET_V4]);
    let metric = |name: &str| {
        http::eventually(name, Duration::from_secs(10), || {
            http::agent_sample(&lab.gw, name)
        }) as u64
    };
    let loops = format!("--loop={LOOPS}");
    let sent = flood::replay(&lab, &pcap, &[&loops, "--unique-ip"], frames * LOOPS);
    let polls_at_end = metric(POLLS);
    // Two polls after the flood's last packet, and nothing left to take: every poll the
    // flood caused has ended.
    http::eventually(
        "polls catch up with the flood",
        Duration::from_secs(120),
        || {
            let polls = http::agent_sample(&lab.gw, POLLS)?;
            let waiting = http::agent_sample(&lab.gw, "egress_monitor_connections_finishing")?;
            (polls >= (polls_at_end + 2) as f64 && waiting == 0.0).then_some(())
        },
    );
    let polls = metric(POLLS);
    let within = metric("egress_monitor_poll_duration_seconds_bucket{le=\"1\"}");
    let within_half = metric("egress_monitor_poll_duration_seconds_bucket{le=\"0.5\"}");
    let polling = http::agent_sample(&lab.gw, "egress_monitor_poll_duration_seconds_sum");
    let refused = metric("egress_monitor_flow_map_full_total");
    let stderr = agent.stderr();
    let mut recorded = 0u64;
    agent.stop_reading(|line| {
        let record: FloodRecord = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("conn log line is not a record ({e}): {line}"));
        if record.proto == "udp" && record.resp_p == flood::DPORT {
            recorded += 1;
        }
    });
    eprintln!(
        "{sent} flood packets: {recorded} recorded, {refused} refused by a full map; \
         {within} of {polls} polls within 1 s ({within_half} within 0.5 s), {polling:?} s \
         polling in all"
    );
    assert!(refused > 0, "the flood never filled the map\n{stderr}");
    assert_eq!(
        recorded + refused,
        sent,
        "flood packets recorded ({recorded}) and refused ({refused}) do not add up to those \
         sent\n{stderr}"
    );
    assert_eq!(
        within,
        polls,
        "{} of {polls} polls took over the 1 s interval\n{stderr}",
        polls - within
    );
}

const POLLS: &str = "egress_monitor_poll_duration_seconds_count";

/// What the flood test reads of a conn-log record.
#[derive(serde::Deserialize)]
struct FloodRecord {
    proto: String,
    #[serde(rename = "id.resp_p")]
    resp_p: u16,
}
