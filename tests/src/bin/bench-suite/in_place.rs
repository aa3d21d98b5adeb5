//! The agent's kernel cost in place: its programs as it attaches them at its defaults (TC
//! ingress and egress through TCX) on the gateway's WAN-facing veth in the lab with every
//! wire packet through the hooks ([`e2e::wire_lab`]), timed by the kernel's run-time
//! statistics (`run_time_ns` / `run_cnt` of its programs, by ID) over real traffic: a hot
//! TCP flow (one iperf3 stream), new UDP flows (one datagram each) and new TLS
//! connections (connect, one ClientHello, close: the first payload the programs copy).
//! The same runs with
//! an empty program (`TC_ACT_OK`) attached the same way in the same place give what the
//! hook and the statistics cost by themselves: the agent's net cost is the difference.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use aya::{programs::TcAttachType, sys::Stats};
use tests::{
    agent::Agent,
    bpf,
    lab::{self, Lab, run_in_ns},
    tls, traffic,
};

use crate::{
    Plan, e2e, median, new_flows,
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
}

/// What runs on the hooks: the agent, or the empty program through two links.
enum Hooked {
    Agent(Agent),
    Empty { _links: [OwnedFd; 2] },
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

pub fn measure(plan: &Plan) -> Vec<Row> {
    // Costs every BPF program two clock reads per run while it is held: the empty
    // program pays them too.
    let _stats = aya::sys::enable_stats(Stats::RunTime).expect("enable bpf run-time stats");
    let lab = e2e::wire_lab();
    let empty = refprog::bare(Kind::Tc).expect("load the empty TC program");
    let empty_id = bpf::prog_id(empty.as_fd());
    // Per round: [agent, empty] per workload.
    let mut rounds: Vec<[[Cost; 2]; WORKLOADS.len()]> = Vec::new();
    for round in 0..plan.wire_rounds {
        let mut costs = [[Cost::default(); 2]; WORKLOADS.len()];
        for (which, label) in [(0, "the agent"), (1, "an empty program")] {
            eprintln!("bench: kernel cost in place, {label}, round {}", round + 1);
            let (hooked, ids) = if which == 0 {
                let agent =
                    Agent::start(&lab.gw, &lab.gw_wan_if, &["--local-net", lab::LOCAL_NET_V4]);
                let ids = bpf::prog_ids_of(agent.pid());
                (Hooked::Agent(agent), ids)
            } else {
                (attach_empty(&lab, &empty), vec![empty_id])
            };
            for (w, &workload) in WORKLOADS.iter().enumerate() {
                costs[w][which] = run(plan, &lab, workload, &ids);
            }
            if let Hooked::Agent(agent) = hooked {
                agent.stop();
            }
        }
        rounds.push(costs);
    }
    WORKLOADS
        .iter()
        .enumerate()
        .map(|(w, &workload)| Row {
            workload,
            runs: median(rounds.iter().map(|r| r[w][0].runs as f64)),
            raw_ns: median(rounds.iter().map(|r| r[w][0].ns())),
            empty_ns: median(rounds.iter().map(|r| r[w][1].ns())),
            net_ns: median(rounds.iter().map(|r| r[w][0].ns() - r[w][1].ns())),
        })
        .collect()
}

/// The empty program on the gateway's WAN veth, ingress and egress, through TCX.
fn attach_empty(lab: &Lab, empty: &OwnedFd) -> Hooked {
    let prog = empty
        .try_clone()
        .expect("duplicate the program's descriptor");
    let dev = std::ffi::CString::new(lab.gw_wan_if.as_str()).expect("interface name");
    let links = run_in_ns(&lab.gw, move || {
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {dev:?}");
        [TcAttachType::Ingress, TcAttachType::Egress].map(|direction| {
            monitor::kernel::bpf::attach_tcx(prog.as_fd(), ifindex, direction)
                .unwrap_or_else(|e| panic!("attach the empty program ({direction:?}): {e}"))
        })
    });
    Hooked::Empty { _links: links }
}

/// Runs `workload` and returns what programs `ids` ran meanwhile; checks that they ran
/// for every packet the WAN veth carried.
fn run(plan: &Plan, lab: &Lab, workload: Workload, ids: &[u32]) -> Cost {
    let (runs_before, time_before) = bpf::run_stats(ids);
    let wan_before = lab::counters(&lab.gw, &lab.gw_wan_if);
    let secs = secs(plan);
    match workload {
        Workload::HotTcp => {
            e2e::iperf3(lab, secs, &[]);
        }
        Workload::NewUdp => {
            let rate = new_flows::RATE;
            traffic::udp_new_flows(
                &lab.lan,
                lab::WAN_HOST_V4.into(),
                rate * u64::from(secs),
                rate,
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
