//! End to end in the namespace gateway lab: iperf3 from the lan host to the wan host
//! through the gateway, a TCP upload and a small-datagram UDP stream, with no monitor,
//! with the agent and with two libpcap-based peers (pmacctd, softflowd) watching the
//! gateway's WAN-facing veth. One lab serves the whole part; each round runs every setup
//! once, in turn, so the setups share the machine's conditions.
//!
//! A monitor's CPU time is its own processes' (utime + stime) plus the machine's softirq
//! time beyond the no-monitor run of the same round, scaled to the same traffic: BPF
//! programs and the copies of packets to AF_PACKET sockets run in the packet path, which
//! is accounted as softirq. The scaling matters because a setup that forwards more
//! packets in the same seconds spends more softirq time on forwarding alone.
//! Tick-sampled softirq time on a 2-CPU machine is too coarse for the agent's share, so
//! its programs' own run time (bpf_stats, exact) is reported beside it.
//!
//! The monitors, the iperf3 runs and the lab with every wire packet through the hooks
//! ([`wire_lab`]) serve the parts measured in that lab too.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    thread,
    time::Duration,
};

use aya::{programs::TcAttachType, sys::Stats};
use monitor::kernel::bpf::RawMap;
use monitor_common::DEFAULT_FLOW_MAP_SIZE;
use serde_json::Value;
use tests::{
    agent::Agent,
    bpf, http,
    lab::{self, Counters, Lab},
    peers::{Pmacctd, Softflowd},
    procfs,
    traffic::NEW_FLOW_PORTS,
};

use crate::{
    Plan,
    kernel::VALUE_SIZE,
    median,
    refprog::{self, Kind},
};

/// UDP payload of the small-packet stream, bytes.
pub const UDP_PAYLOAD: u32 = 64;
/// Offered load of the UDP stream (iperf3 `-b`, payload bits): about 98k datagrams/s.
pub const UDP_RATE: &str = "50M";
const IPERF_PORT: u16 = 5201;
/// Below this share of the UDP test's packets counted, a monitor's CPU figures mean
/// nothing: the run fails.
const MIN_SEEN: f64 = 0.9;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    None,
    Agent,
    /// [`refprog::flow_count`] on the agent's hooks: the floor of exact per-connection
    /// counting, not a monitor.
    Floor,
    Pmacctd,
    Softflowd,
}

pub const SETUPS: [Setup; 4] = [Setup::None, Setup::Agent, Setup::Pmacctd, Setup::Softflowd];

impl Setup {
    pub fn label(self) -> &'static str {
        match self {
            Setup::None => "no monitor",
            Setup::Agent => "this agent (TC ingress + TC egress)",
            Setup::Floor => "the counting floor (reference program, TC ingress + TC egress)",
            Setup::Pmacctd => "pmacctd, memory plugin (libpcap)",
            Setup::Softflowd => "softflowd (libpcap)",
        }
    }
}

/// CPU seconds over one test (medians over the rounds).
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    /// The monitor's own processes.
    pub process: f64,
    /// Machine softirq time beyond the same round's no-monitor run, scaled by the ratio
    /// of packets the gateway forwarded.
    pub softirq_extra: f64,
    /// `process + softirq_extra`, per round, then the median.
    pub monitoring: f64,
    /// Run time of the monitor's BPF programs (bpf_stats); zero for the peers.
    pub bpf: f64,
}

pub struct Row {
    pub setup: Setup,
    pub gbits: f64,
    /// Per round, this setup's TCP rate over the no-monitor run's, then the median: runs
    /// next to each other share the machine's state, which drifts between rounds.
    pub tcp_vs_none: f64,
    pub retransmits: f64,
    pub udp_pps: f64,
    pub udp_vs_none: f64,
    pub udp_loss_pct: f64,
    pub tcp_cpu: Cpu,
    pub udp_cpu: Cpu,
    /// UDP datagrams the monitor counted per packet the WAN veth counted (tx + rx) over
    /// the UDP test; `None` without a monitor.
    pub seen: Option<f64>,
}

/// One test's figures as measured in one round.
#[derive(Clone, Copy, Default)]
struct Test {
    /// TCP: Gbit/s received; UDP: datagrams delivered per second.
    rate: f64,
    /// TCP: retransmitted segments; UDP: % of datagrams lost.
    loss: f64,
    process_cpu: f64,
    softirq: f64,
    bpf: f64,
    /// The gateway's WAN veth counters over the test.
    wan: Counters,
}

#[derive(Default)]
struct Round {
    tcp: Test,
    udp: Test,
    seen: Option<f64>,
}

/// A transport protocol whose packets a monitor counted.
#[derive(Clone, Copy)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As the agent's conn log and pmacct name it.
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// The flows a monitor saw.
#[derive(Clone, Copy)]
pub struct FlowsSeen {
    /// The agent: connections its table learned (`connections_total`); pmacctd: UDP
    /// entries of its table; softflowd: the flows it tracked, active and expired.
    pub flows: u64,
    /// The agent: the UDP records in its conn log once it stopped, and the records its
    /// conn log had lost before the stop (`log_records_lost_total`).
    pub conn_log: Option<(u64, u64)>,
}

/// A running monitor of one setup, on the gateway's WAN-facing veth.
pub enum Monitor {
    None,
    Agent(Agent),
    Floor(FloorOnWan),
    Pmacctd(Pmacctd),
    Softflowd(Softflowd),
}

impl Monitor {
    pub fn start(setup: Setup, lab: &Lab) -> Monitor {
        match setup {
            Setup::None => Monitor::None,
            Setup::Agent => Monitor::Agent(Agent::start(
                &lab.gw,
                &lab.gw_wan_if,
                &["--local-net", lab::LOCAL_NET_V4],
            )),
            Setup::Floor => Monitor::Floor(FloorOnWan::attach(lab)),
            Setup::Pmacctd => Monitor::Pmacctd(Pmacctd::start(&lab.gw, &lab.gw_wan_if)),
            Setup::Softflowd => Monitor::Softflowd(Softflowd::start(&lab.gw, &lab.gw_wan_if)),
        }
    }

    /// The IDs of the monitor's BPF programs.
    pub fn prog_ids(&self) -> Vec<u32> {
        match self {
            Monitor::Agent(agent) => {
                let ids = bpf::prog_ids_of(agent.pid());
                assert!(!ids.is_empty(), "the agent holds no BPF program open");
                ids
            }
            _ => Vec::new(),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        match self {
            Monitor::None | Monitor::Floor(_) => Vec::new(),
            Monitor::Agent(agent) => vec![agent.pid()],
            Monitor::Pmacctd(p) => p.pids(),
            Monitor::Softflowd(s) => vec![s.pid()],
        }
    }

    /// Stops the monitor; returns the packets of `proto` it counted (`None` without one).
    pub fn stop(self, proto: Proto) -> Option<u64> {
        match self {
            Monitor::None => None,
            Monitor::Agent(agent) => Some(
                agent
                    .stop()
                    .iter()
                    .filter(|r| r.proto() == proto.name())
                    .map(|r| r.u64("orig_pkts") + r.u64("resp_pkts"))
                    .sum(),
            ),
            // It counts IPv4 frames of every protocol, which only TCP crosses in the
            // throughput runs.
            Monitor::Floor(floor) => {
                Some(refprog::packets_counted(&floor.map).expect("read the counting floor's map"))
            }
            Monitor::Pmacctd(p) => {
                let packets = p.packets(proto.name());
                p.stop();
                Some(packets)
            }
            Monitor::Softflowd(s) => {
                let packets = s.packets(proto.number());
                s.stop();
                Some(packets)
            }
        }
    }

    /// Stops the monitor; returns the flows it has seen (`None` without one).
    pub fn stop_flows(self, lab: &Lab) -> Option<FlowsSeen> {
        match self {
            Monitor::None => None,
            Monitor::Floor(floor) => Some(FlowsSeen {
                flows: refprog::read_batched(&floor.map).expect("read the counting floor's map")
                    as u64,
                conn_log: None,
            }),
            Monitor::Agent(agent) => {
                let metric = |name: &str| {
                    http::agent_sample(&lab.gw, name)
                        .unwrap_or_else(|| panic!("the agent's /metrics has no {name}"))
                        as u64
                };
                let flows = metric("egress_monitor_connections_total");
                let lost_before = metric("egress_monitor_log_records_lost_total{log=\"conn\"}");
                let records = agent.stop().iter().filter(|r| r.proto() == "udp").count();
                Some(FlowsSeen {
                    flows,
                    conn_log: Some((records as u64, lost_before)),
                })
            }
            Monitor::Pmacctd(p) => {
                let flows = p.flows("udp");
                p.stop();
                Some(FlowsSeen {
                    flows,
                    conn_log: None,
                })
            }
            Monitor::Softflowd(s) => {
                let flows = s.flows();
                s.stop();
                Some(FlowsSeen {
                    flows,
                    conn_log: None,
                })
            }
        }
    }
}

pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| procfs::cpu_secs(pid)).sum()
}

/// Length of each iperf3 test, seconds. Single 5 s TCP runs through the 2-vCPU gateway
/// varied by about 15 %: longer runs average more of the scheduler's noise.
pub fn test_secs(plan: &Plan) -> u32 {
    if plan.quick { 2 } else { 10 }
}

pub fn measure(plan: &Plan) -> Vec<Row> {
    // Costs every BPF program two clock reads per run while it is held.
    let _stats = aya::sys::enable_stats(Stats::RunTime).expect("enable bpf run-time stats");
    let lab = Lab::new();
    // Real gateways keep their offloads: undo the lab's WAN-link settings.
    for (ns, dev) in [(&lab.gw, &lab.gw_wan_if), (&lab.wan, &lab.wan_if)] {
        lab::ns_exec(ns, &["ethtool", "-K", dev, "tso", "on", "gso", "on"]);
    }
    serve_iperf3(&lab);

    let rounds = interleaved(plan.runs, "end to end", &SETUPS, |setup| {
        one_setup(plan, &lab, setup)
    });

    SETUPS
        .iter()
        .enumerate()
        .map(|(i, &setup)| {
            let tests = |pick: fn(&Round) -> Test| -> Vec<(Test, Test)> {
                rounds.iter().map(|r| (pick(&r[i]), pick(&r[0]))).collect()
            };
            let tcp = tests(|r| r.tcp);
            let udp = tests(|r| r.udp);
            let vs_none =
                |pairs: &[(Test, Test)]| median(pairs.iter().map(|(t, n)| t.rate / n.rate));
            Row {
                setup,
                gbits: median(tcp.iter().map(|(t, _)| t.rate)),
                tcp_vs_none: vs_none(&tcp),
                retransmits: median(tcp.iter().map(|(t, _)| t.loss)),
                udp_pps: median(udp.iter().map(|(t, _)| t.rate)),
                udp_vs_none: vs_none(&udp),
                udp_loss_pct: median(udp.iter().map(|(t, _)| t.loss)),
                tcp_cpu: cpu(&tcp),
                udp_cpu: cpu(&udp),
                seen: (setup != Setup::None)
                    .then(|| median(rounds.iter().filter_map(|r| r[i].seen))),
            }
        })
        .collect()
}

/// Medians of a setup's CPU over the rounds, each round set against its no-monitor run.
fn cpu(tests: &[(Test, Test)]) -> Cpu {
    let extra = |(t, none): &(Test, Test)| {
        t.softirq - none.softirq * t.wan.tx_packets as f64 / none.wan.tx_packets as f64
    };
    Cpu {
        process: median(tests.iter().map(|(t, _)| t.process_cpu)),
        softirq_extra: median(tests.iter().map(extra)),
        monitoring: median(tests.iter().map(|pair| pair.0.process_cpu + extra(pair))),
        bpf: median(tests.iter().map(|(t, _)| t.bpf)),
    }
}

fn one_setup(plan: &Plan, lab: &Lab, setup: Setup) -> Round {
    let monitor = Monitor::start(setup, lab);
    let tcp = one_test(lab, &monitor, false, test_secs(plan));
    let udp = one_test(lab, &monitor, true, test_secs(plan));
    let wan = udp.wan;
    let seen = monitor.stop(Proto::Udp).map(|packets| {
        let share = packets as f64 / (wan.tx_packets + wan.rx_packets) as f64;
        assert!(
            share >= MIN_SEEN,
            "{} counted {packets} UDP packets of the {} the WAN veth carried: a monitor that \
             misses that much is not doing the work it is compared on",
            setup.label(),
            wan.tx_packets + wan.rx_packets
        );
        share
    });
    Round { tcp, udp, seen }
}

/// The lab with every wire packet through the hooks: TSO, GSO, UDP segmentation and GSO
/// lists off on all four veths (a veth has GRO off unless asked), so each sender
/// segments before its veth and nothing crosses the gateway as an aggregate. The wan host
/// runs iperf3's server and drops UDP datagrams to [`NEW_FLOW_PORTS`] in its input
/// (nftables): new flows get no answer, not even an ICMP error.
/// `rounds` rounds, each running every setup in turn: one entry per round, one result per
/// setup in `setups` order.
pub fn interleaved<R>(
    rounds: u32,
    part: &str,
    setups: &[Setup],
    mut run: impl FnMut(Setup) -> R,
) -> Vec<Vec<R>> {
    (1..=rounds)
        .map(|round| {
            setups
                .iter()
                .map(|&setup| {
                    eprintln!("bench: {part}, {}, round {round}", setup.label());
                    run(setup)
                })
                .collect()
        })
        .collect()
}

/// The counting floor ([`refprog::flow_count`]) where the agent hooks: the gateway's WAN
/// veth, ingress and egress, through TCX; with a new map, as the agent's is.
pub struct FloorOnWan {
    _links: [OwnedFd; 2],
    pub map: RawMap,
    pub prog_id: u32,
}

impl FloorOnWan {
    pub fn attach(lab: &Lab) -> FloorOnWan {
        let (floor, map) = refprog::flow_count(Kind::Tc, VALUE_SIZE, DEFAULT_FLOW_MAP_SIZE)
            .expect("load the counting floor");
        FloorOnWan {
            _links: attach_on_wan(lab, &floor),
            map,
            prog_id: bpf::prog_id(floor.as_fd()),
        }
    }
}

/// A reference program on the gateway's WAN veth, ingress and egress, through TCX.
pub fn attach_on_wan(lab: &Lab, prog: &OwnedFd) -> [OwnedFd; 2] {
    let prog = prog
        .try_clone()
        .expect("duplicate the program's descriptor");
    let dev = std::ffi::CString::new(lab.gw_wan_if.as_str()).expect("interface name");
    lab::run_in_ns(&lab.gw, move || {
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {dev:?}");
        [TcAttachType::Ingress, TcAttachType::Egress].map(|direction| {
            monitor::kernel::bpf::attach_tcx(prog.as_fd(), ifindex, direction)
                .unwrap_or_else(|e| panic!("attach a reference program ({direction:?}): {e}"))
        })
    })
}

pub fn wire_lab() -> Lab {
    let lab = Lab::new();
    lab::segmentation_off(&lab.lan, &lab.lan_if);
    lab::segmentation_off(&lab.gw, &lab.gw_lan_if);
    lab::nft(&lab.wan, &["add table inet sink"]);
    lab::nft(
        &lab.wan,
        &["add chain inet sink input { type filter hook input priority 0; }"],
    );
    let drop = format!(
        "add rule inet sink input udp dport {}-{} drop",
        NEW_FLOW_PORTS.start,
        NEW_FLOW_PORTS.end - 1
    );
    lab::nft(&lab.wan, &[&drop]);
    serve_iperf3(&lab);
    lab.wait_quiet();
    lab
}

/// Starts iperf3's server on the wan host (the lab kills it when dropped).
pub fn serve_iperf3(lab: &Lab) {
    let port = IPERF_PORT.to_string();
    lab.spawn_in(
        &lab.wan,
        &[
            "iperf3",
            "-s",
            "-B",
            &lab::WAN_HOST_V4.to_string(),
            "-p",
            &port,
            "--logfile",
            "/dev/null",
        ],
    );
    thread::sleep(Duration::from_millis(500));
}

/// Runs iperf3's client on the lan host against the wan host's server for `secs`, with
/// `extra` arguments; returns its JSON report.
pub fn iperf3(lab: &Lab, secs: u32, extra: &[&str]) -> Value {
    let secs_arg = secs.to_string();
    let server = lab::WAN_HOST_V4.to_string();
    let port = IPERF_PORT.to_string();
    let mut args = vec!["iperf3", "-c", &server, "-p", &port, "-t", &secs_arg, "-J"];
    args.extend(extra);
    let out = lab::ns_output(&lab.lan, &args, Duration::from_secs(u64::from(secs) + 30));
    assert!(
        out.status.success(),
        "iperf3 {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("iperf3 -J output")
}

/// Gbit/s the server received in an iperf3 TCP report.
pub fn tcp_gbits(report: &Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no bits_per_second in iperf3's sum_received: {report}"))
        / 1e9
}

fn one_test(lab: &Lab, monitor: &Monitor, udp: bool, secs: u32) -> Test {
    let pids = monitor.pids();
    let prog_ids = monitor.prog_ids();
    let payload = UDP_PAYLOAD.to_string();
    let mut extra = Vec::new();
    if udp {
        extra.extend(["-u", "-l", &payload, "-b", UDP_RATE]);
    }
    let cpu_before = cpu_of(&pids);
    let bpf_before = bpf::run_stats(&prog_ids).1;
    let wan_before = lab::counters(&lab.gw, &lab.gw_wan_if);
    let softirq_before = procfs::softirq_secs();
    let report = iperf3(lab, secs, &extra);
    let softirq = procfs::softirq_secs() - softirq_before;
    let wan = lab::counters(&lab.gw, &lab.gw_wan_if).since(wan_before);
    let process_cpu = cpu_of(&pids) - cpu_before;
    let bpf = (bpf::run_stats(&prog_ids).1 - bpf_before).as_secs_f64();
    let received = &report["end"]["sum_received"];
    let number = |v: &Value, what: &str| {
        v[what]
            .as_f64()
            .unwrap_or_else(|| panic!("no {what} in iperf3's sum_received: {received}"))
    };
    let (rate, loss) = if udp {
        let delivered = number(received, "packets") - number(received, "lost_packets");
        (
            delivered / number(received, "seconds"),
            number(received, "lost_percent"),
        )
    } else {
        (
            tcp_gbits(&report),
            report["end"]["sum_sent"]["retransmits"]
                .as_f64()
                .unwrap_or(0.0),
        )
    };
    Test {
        rate,
        loss,
        process_cpu,
        softirq,
        bpf,
        wan,
    }
}
