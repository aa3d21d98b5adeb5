//! Many new flows through the gateway ([`e2e::wire_lab`]): the lan host opens
//! [`RATE`] new UDP flows per second (one datagram each, which the wan host drops) for a
//! bounded time, with no monitor, the agent, pmacctd and softflowd on the WAN-facing veth.
//! Measured per 100k flows: the whole machine's busy CPU time over the window (/proc/stat)
//! and the monitor's own processes' (utime + stime), and for the agent the run time of its
//! BPF programs (bpf_stats), which runs in the packet path and is charged to no process of
//! its own. Each monitor must have seen the flows (the agent's connection count,
//! pmacct's table, softflowd's flow counts against the generator's), or the run fails;
//! the agent's conn log is counted too.

use std::{thread, time::Duration};

use aya::sys::Stats;
use tests::{
    bpf,
    lab::{self, Lab},
    procfs, traffic,
};

use crate::{
    Plan,
    e2e::{self, Monitor, SETUPS, Setup, cpu_of},
    median,
};

/// New flows per second the generator opens.
pub const RATE: u64 = 20_000;
/// Payload of each flow's datagram, bytes.
pub const PAYLOAD: usize = 64;
/// After the generator ends the window stays open this long: the agent's next poll, and
/// the peers' queues draining, fall in it.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Below this share of the generator's flows seen, a monitor's figures mean nothing.
const MIN_SEEN: f64 = 0.9;
const PER: f64 = 100_000.0;

/// How long the generator runs, seconds: at [`RATE`], the full suite's 200,000 flows fit
/// the agent's default flow map (262,144 entries), whose entries live the idle timeout.
pub fn secs(plan: &Plan) -> u64 {
    if plan.quick { 2 } else { 10 }
}

pub struct Row {
    pub setup: Setup,
    /// Medians over the rounds.
    pub flows: f64,
    pub flows_per_sec: f64,
    /// The machine's busy CPU seconds per 100k flows.
    pub host_cpu: f64,
    /// The same less the no-monitor run's of the round, per round, then the median.
    pub host_extra: f64,
    /// The monitor's own processes' CPU seconds per 100k flows.
    pub own_cpu: f64,
    /// The agent's BPF programs' run time, seconds per 100k flows; `None` for the others.
    pub bpf: Option<f64>,
    /// Flows the monitor saw per flow sent; `None` without a monitor.
    pub seen: Option<f64>,
    /// The agent: its UDP conn-log records per flow sent, and the records its conn log
    /// had lost before it stopped (medians).
    pub conn_log: Option<(f64, f64)>,
}

/// One setup's figures in one round, per 100k flows.
struct Round {
    flows: f64,
    flows_per_sec: f64,
    host_cpu: f64,
    own_cpu: f64,
    bpf: f64,
    seen: Option<f64>,
    /// The agent's UDP conn-log records and its conn log's lost records before the stop.
    conn_log: Option<(u64, u64)>,
}

pub fn measure(plan: &Plan) -> Vec<Row> {
    // Costs every BPF program two clock reads per run while it is held.
    let _stats = aya::sys::enable_stats(Stats::RunTime).expect("enable bpf run-time stats");
    let lab = e2e::wire_lab();
    let rounds = e2e::interleaved(plan.wire_rounds, "new UDP flows", &SETUPS, |setup| {
        one_setup(plan, &lab, setup)
    });
    SETUPS
        .iter()
        .enumerate()
        .map(|(i, &setup)| {
            let med = |pick: fn(&Round) -> f64| median(rounds.iter().map(|r| pick(&r[i])));
            Row {
                setup,
                flows: med(|r| r.flows),
                flows_per_sec: med(|r| r.flows_per_sec),
                host_cpu: med(|r| r.host_cpu),
                host_extra: median(rounds.iter().map(|r| r[i].host_cpu - r[0].host_cpu)),
                own_cpu: med(|r| r.own_cpu),
                bpf: (setup == Setup::Agent).then(|| med(|r| r.bpf)),
                seen: (setup != Setup::None)
                    .then(|| median(rounds.iter().filter_map(|r| r[i].seen))),
                conn_log: (setup == Setup::Agent).then(|| {
                    let logged = |pick: fn(&Round, (u64, u64)) -> f64| {
                        median(
                            rounds
                                .iter()
                                .filter_map(|r| r[i].conn_log.map(|c| pick(&r[i], c))),
                        )
                    };
                    (
                        logged(|r, (records, _)| records as f64 / r.flows),
                        logged(|_, (_, lost)| lost as f64),
                    )
                }),
            }
        })
        .collect()
}

fn one_setup(plan: &Plan, lab: &Lab, setup: Setup) -> Round {
    let monitor = Monitor::start(setup, lab);
    let pids = monitor.pids();
    let prog_ids = monitor.prog_ids();
    let own_before = cpu_of(&pids);
    let bpf_before = bpf::run_stats(&prog_ids).1;
    let busy_before = procfs::busy_secs();
    let sent = traffic::udp_new_flows(
        &lab.lan,
        lab::WAN_HOST_V4.into(),
        RATE * secs(plan),
        RATE,
        PAYLOAD,
    );
    thread::sleep(SETTLE);
    let busy = procfs::busy_secs() - busy_before;
    let own = cpu_of(&pids) - own_before;
    let bpf = (bpf::run_stats(&prog_ids).1 - bpf_before).as_secs_f64();
    let flows = sent.flows as f64;
    let seen = monitor.stop_flows(lab);
    if let Some(seen) = seen {
        assert!(
            seen.flows as f64 >= MIN_SEEN * flows,
            "{} saw {} of the {} new UDP flows: a monitor that misses that many is not \
             doing the work it is compared on",
            setup.label(),
            seen.flows,
            sent.flows
        );
    }
    Round {
        flows,
        flows_per_sec: flows / sent.elapsed.as_secs_f64(),
        host_cpu: busy / flows * PER,
        own_cpu: own / flows * PER,
        bpf: bpf / flows * PER,
        seen: seen.map(|s| s.flows as f64 / flows),
        conn_log: seen.and_then(|s| s.conn_log),
    }
}
