//! The agent's kernel cost in place: its programs as it attaches them at its defaults (TC
//! ingress and egress through TCX) on the gateway's WAN-facing veth in the lab with every
//! wire packet through the hooks ([`e2e::wire_lab`]), timed by the kernel's run-time
//! statistics (`run_time_ns` / `run_cnt` of its programs, by ID) over real traffic: a hot
//! TCP flow (one iperf3 stream), new UDP flows (one datagram each) and new TLS
//! connections (connect, one ClientHello, close: the first payload the programs copy).
//! The same runs with an empty program (`TC_ACT_OK`) attached the same way in the same
//! place give what the hook and the statistics cost by themselves: the agent's net cost
//! is the difference.
//!
//! With `--agent-b`, a second build of the agent runs the same workloads in each round
//! after the first: the two builds' difference per round, against noise of the size of
//! the effects a change to the programs makes, is how a change is judged.
//!
//! Then the same runs with the counting floor ([`refprog::flow_count`]) attached the same
//! way: per packet, a lookup of its addresses and ports in a shared hash map of the
//! agent's value size and capacity, an insert when absent, three atomic adds and the
//! clock. That is the least any exact per-connection counter with a timestamp does, for
//! a known connection's packet and a new one's alike: its net cost, taken as the agent's
//! is, is the floor under the agent's on the same packets in the same run.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use aya::sys::Stats;
use monitor::kernel::bpf::RawMap;
use tests::{
    agent::Agent,
    bpf,
    lab::{self, Lab, run_in_ns},
    tls, traffic,
};

use crate::{
    Plan,
    e2e::{self, FloorOnWan},
    median, new_flows,
    refprog::{self, Kind},
};

#[derive(Clone, Copy)]
pub enum Workload {
    HotTcp,
    NewUdp,
    NewTls,
}

pub const WORKLOADS: [Workload; 3] = [Workload::HotTcp, Workload::NewUdp, Workload::NewTls];

/// Port of the wan host that takes the TLS connections.
const TLS_PORT: u16 = 8443;

impl Workload {
    pub fn label(self) -> &'static str {
        match self {
            Workload::HotTcp => "hot TCP flow (one iperf3 stream, both directions)",
            Workload::NewUdp => "new UDP flows (one datagram each)",
            Workload::NewTls => "new TLS connections (connect, one ClientHello, close)",
        }
    }
}

/// TLS connections per run of [`Workload::NewTls`].
pub fn tls_connections(plan: &Plan) -> usize {
    if plan.quick { 1_000 } else { 5_000 }
}

/// Length of each workload, seconds: the statistics are exact, a few seconds hold
/// hundreds of thousands of packets.
pub fn secs(plan: &Plan) -> u32 {
    if plan.quick { 2 } else { 5 }
}

pub struct Row {
    pub workload: Workload,
    /// Runs of the agent's programs per test (packets through its hooks), median.
    pub runs: f64,
    /// The agent's ns per run, median.
    pub raw_ns: f64,
    /// The empty program's ns per run, median.
    pub empty_ns: f64,
    /// `raw_ns - empty_ns` per round, then the median.
    pub net_ns: f64,
    /// The counting floor's ns per run, median.
    pub floor_ns: f64,
    /// `floor_ns - empty_ns` per round, then the median.
    pub floor_net_ns: f64,
}

/// One round of an A/B run (`--agent-b`): net ns per packet of each build and of the
/// counting floor.
pub struct AbRound {
    pub agent: f64,
    pub agent_b: f64,
    pub floor: f64,
}

/// What each round hooks, in turn.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Agent,
    /// The agent build given with `--agent-b`, when given.
    AgentB,
    Empty,
    /// [`refprog::flow_count`]: the floor of exact per-connection counting.
    Floor,
}

const SETUPS: [Setup; 4] = [Setup::Agent, Setup::AgentB, Setup::Empty, Setup::Floor];

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Agent => "the agent",
            Setup::AgentB => "agent B",
            Setup::Empty => "an empty program",
            Setup::Floor => "the counting floor",
        }
    }
}

/// What runs on the hooks: the agent, or a reference program through two links.
enum Hooked {
    Agent(Agent),
    Empty { _links: [OwnedFd; 2] },
    Floor(FloorOnWan),
}

/// One workload's programs' runs and run time.
#[derive(Clone, Copy, Default)]
struct Cost {
    runs: u64,
    time: Duration,
}

impl Cost {
    fn ns(self) -> f64 {
        self.time.as_nanos() as f64 / self.runs as f64
    }
}

/// The rows of the table, and per workload the A/B rounds (none without `--agent-b`).
pub fn measure(plan: &Plan) -> (Vec<Row>, Vec<Vec<AbRound>>) {
    // Costs every BPF program two clock reads per run while it is held: the empty
    // program pays them too.
    let _stats = aya::sys::enable_stats(Stats::RunTime).expect("enable bpf run-time stats");
    let lab = e2e::wire_lab();
    let empty = refprog::bare(Kind::Tc).expect("load the empty TC program");
    // Per round: a cost per setup per workload.
    let mut rounds: Vec<[[Cost; SETUPS.len()]; WORKLOADS.len()]> = Vec::new();
    for round in 0..plan.wire_rounds {
        let mut costs = [[Cost::default(); SETUPS.len()]; WORKLOADS.len()];
        for setup in SETUPS {
            if setup == Setup::AgentB && plan.agent_b.is_none() {
                continue;
            }
            eprintln!(
                "bench: kernel cost in place, {}, round {}",
                setup.label(),
                round + 1
            );
            let (hooked, ids) = hook(setup, &lab, &empty, plan.agent_b.as_deref());
            let mut counted = 0;
            for (w, &workload) in WORKLOADS.iter().enumerate() {
                costs[w][setup as usize] = run(plan, &lab, workload, &ids);
                if let Hooked::Floor(floor) = &hooked {
                    counted = check_counted(plan, workload, &floor.map, counted);
                }
            }
            if let Hooked::Agent(agent) = hooked {
                agent.stop();
            }
        }
        rounds.push(costs);
    }
    let net_of = |costs: &[[Cost; SETUPS.len()]; WORKLOADS.len()], w: usize, s: Setup| {
        costs[w][s as usize].ns() - costs[w][Setup::Empty as usize].ns()
    };
    let ab = match plan.agent_b {
        Some(_) => (0..WORKLOADS.len())
            .map(|w| {
                rounds
                    .iter()
                    .map(|costs| AbRound {
                        agent: net_of(costs, w, Setup::Agent),
                        agent_b: net_of(costs, w, Setup::AgentB),
                        floor: net_of(costs, w, Setup::Floor),
                    })
                    .collect()
            })
            .collect(),
        None => Vec::new(),
    };
    let rows = WORKLOADS
        .iter()
        .enumerate()
        .map(|(w, &workload)| {
            let ns = |s: Setup| median(rounds.iter().map(|r| r[w][s as usize].ns()));
            let net = |s: Setup| median(rounds.iter().map(|r| net_of(r, w, s)));
            Row {
                workload,
                runs: median(
                    rounds
                        .iter()
                        .map(|r| r[w][Setup::Agent as usize].runs as f64),
                ),
                raw_ns: ns(Setup::Agent),
                empty_ns: ns(Setup::Empty),
                net_ns: net(Setup::Agent),
                floor_ns: ns(Setup::Floor),
                floor_net_ns: net(Setup::Floor),
            }
        })
        .collect();
    (rows, ab)
}

/// Puts `setup` on the gateway's WAN veth; returns it with the IDs of its programs.
fn hook(setup: Setup, lab: &Lab, empty: &OwnedFd, agent_b: Option<&Path>) -> (Hooked, Vec<u32>) {
    match setup {
        Setup::Agent | Setup::AgentB => {
            let binary = match setup {
                Setup::AgentB => agent_b
                    .expect("agent B is hooked only when given")
                    .to_owned(),
                _ => Agent::binary(),
            };
            let agent = Agent::start_build(
                &binary,
                &lab.gw,
                &lab.gw_wan_if,
                &["--local-net", lab::LOCAL_NET_V4],
            );
            let ids = bpf::prog_ids_of(agent.pid());
            (Hooked::Agent(agent), ids)
        }
        Setup::Empty => (
            Hooked::Empty {
                _links: e2e::attach_on_wan(lab, empty),
            },
            vec![bpf::prog_id(empty.as_fd())],
        ),
        Setup::Floor => {
            let floor = FloorOnWan::attach(lab);
            let ids = vec![floor.prog_id];
            (Hooked::Floor(floor), ids)
        }
    }
}

/// Checks that the counting floor counted `workload`: its map must have gained an entry
/// for each direction of the hot flow, each TLS connection and 99 % of the new UDP flows
/// at least (a datagram may be dropped on the way, as one was in a run of the suite), or
/// the floor measured is of a program that skipped its work. `before`: the entries it
/// held; returns those it holds.
fn check_counted(plan: &Plan, workload: Workload, map: &RawMap, before: usize) -> usize {
    let entries = refprog::read_batched(map).expect("read the counting floor's map");
    let least = match workload {
        Workload::HotTcp => 2,
        Workload::NewUdp => udp_flows(plan) as usize * 99 / 100,
        Workload::NewTls => tls_connections(plan),
    };
    assert!(
        entries >= before + least,
        "{}: the counting floor's map gained {} entries, fewer than {least}",
        workload.label(),
        entries.saturating_sub(before),
    );
    entries
}

/// Flows per run of [`Workload::NewUdp`].
fn udp_flows(plan: &Plan) -> u64 {
    new_flows::RATE * u64::from(secs(plan))
}

/// Runs `workload` and returns what programs `ids` ran meanwhile; checks that they ran
/// for every packet the WAN veth carried.
fn run(plan: &Plan, lab: &Lab, workload: Workload, ids: &[u32]) -> Cost {
    let (runs_before, time_before) = bpf::run_stats(ids);
    let wan_before = lab::counters(&lab.gw, &lab.gw_wan_if);
    match workload {
        Workload::HotTcp => {
            e2e::iperf3(lab, secs(plan), &[]);
        }
        Workload::NewUdp => {
            traffic::udp_new_flows(
                &lab.lan,
                lab::WAN_HOST_V4.into(),
                udp_flows(plan),
                new_flows::RATE,
                new_flows::PAYLOAD,
            );
        }
        Workload::NewTls => {
            let n = tls_connections(plan);
            let server = SocketAddr::new(lab::WAN_HOST_V4.into(), TLS_PORT);
            let listener = run_in_ns(&lab.wan, move || {
                TcpListener::bind(server).expect("listen for the TLS connections")
            });
            let taken = std::thread::spawn(move || {
                tls::accept_and_close(listener, n, Duration::from_secs(120))
            });
            let hello = tls::client_hello("bench.exfil.test");
            run_in_ns(&lab.lan, move || tls::send_hellos(server, &hello, n));
            assert_eq!(taken.join().expect("the acceptor"), n);
        }
    }
    lab.wait_quiet();
    let (runs, time) = bpf::run_stats(ids);
    let wan = lab::counters(&lab.gw, &lab.gw_wan_if).since(wan_before);
    let cost = Cost {
        runs: runs - runs_before,
        time: time - time_before,
    };
    assert!(
        cost.runs >= wan.tx_packets + wan.rx_packets,
        "{}: {} runs for the {} packets the WAN veth carried",
        workload.label(),
        cost.runs,
        wan.tx_packets + wan.rx_packets
    );
    cost
}
