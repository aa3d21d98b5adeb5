//! Throughput with every wire packet through the hooks ([`e2e::wire_lab`]): iperf3 TCP
//! uploads from the lan host to the wan host, one stream and [`STREAMS`] streams, with no
//! monitor, the agent, the counting floor ([`refprog::flow_count`](crate::refprog::flow_count)
//! on the agent's hooks), pmacctd and softflowd on the gateway's WAN-facing veth. Each
//! round runs every setup in turn; a setup's rate is set against the no-monitor run of its
//! own round, then the median of those ratios is taken.

use tests::lab::{self, Lab};

use crate::{
    Plan,
    e2e::{self, Monitor, Proto, Setup},
    median,
};

/// Parallel streams of the second test (iperf3 `-P`).
pub const STREAMS: u32 = 32;

/// The setups of each round, in turn.
pub const SETUPS: [Setup; 5] = [
    Setup::None,
    Setup::Agent,
    Setup::Floor,
    Setup::Pmacctd,
    Setup::Softflowd,
];

pub struct Row {
    pub setup: Setup,
    /// Per test (one stream, [`STREAMS`] streams): median Gbit/s.
    pub gbits: [f64; 2],
    /// Per test: the median over the rounds of this setup's rate over the no-monitor
    /// run's.
    pub vs_none: [f64; 2],
    /// TCP packets the monitor counted per packet the WAN veth counted (tx + rx) over
    /// both tests, median; `None` without a monitor.
    pub seen: Option<f64>,
}

/// One setup's figures in one round.
struct Round {
    gbits: [f64; 2],
    seen: Option<f64>,
}

pub fn measure(plan: &Plan) -> Vec<Row> {
    let lab = e2e::wire_lab();
    let rounds_run = e2e::interleaved(
        plan.wire_rounds,
        "throughput, offloads off",
        &SETUPS,
        |setup| one_setup(plan, &lab, setup),
    );
    SETUPS
        .iter()
        .enumerate()
        .map(|(i, &setup)| {
            let test = |t: usize| {
                (
                    median(rounds_run.iter().map(|r| r[i].gbits[t])),
                    median(rounds_run.iter().map(|r| r[i].gbits[t] / r[0].gbits[t])),
                )
            };
            let (one, many) = (test(0), test(1));
            Row {
                setup,
                gbits: [one.0, many.0],
                vs_none: [one.1, many.1],
                seen: (setup != Setup::None)
                    .then(|| median(rounds_run.iter().filter_map(|r| r[i].seen))),
            }
        })
        .collect()
}

fn one_setup(plan: &Plan, lab: &Lab, setup: Setup) -> Round {
    let monitor = Monitor::start(setup, lab);
    let secs = e2e::test_secs(plan);
    let streams = STREAMS.to_string();
    let before = lab::counters(&lab.gw, &lab.gw_wan_if);
    let one = e2e::tcp_gbits(&e2e::iperf3(lab, secs, &[]));
    let many = e2e::tcp_gbits(&e2e::iperf3(lab, secs, &["-P", &streams]));
    let wan = lab::counters(&lab.gw, &lab.gw_wan_if).since(before);
    let seen = monitor
        .stop(Proto::Tcp)
        .map(|packets| packets as f64 / (wan.tx_packets + wan.rx_packets) as f64);
    Round {
        gbits: [one, many],
        seen,
    }
}
