//! `cargo xtask bench ingress`: what each ingress hook costs a veth gateway.
//!
//! Native XDP on a veth forces its peer's TSO off, so the traffic it receives crosses as
//! wire-sized frames instead of 64 KB aggregates. This measures, for the agent watching
//! the gateway's WAN-facing veth with offloads at their defaults: iperf3 throughput
//! through the gateway, skbs the gateway forwarded per MB, and the kernel programs' own
//! run time (bpf_stats), against a run with no agent.

use std::time::{Duration, SystemTime};

use aya::{programs::loaded_programs, sys::Stats};
use serde_json::Value;
use tests::{
    agent::Agent,
    lab::{self, Lab},
};

const SECONDS: u32 = 8;
const PROGRAMS: [&str; 3] = ["xdp_ingress", "tc_ingress", "tc_egress"];

#[derive(Clone, Copy)]
enum Setup {
    NoAgent,
    XdpNative,
    TcIngress,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::NoAgent => "no agent",
            Setup::XdpNative => "XDP native ingress + TC egress",
            Setup::TcIngress => "TC ingress + TC egress",
        }
    }

    fn args(self) -> Option<&'static [&'static str]> {
        match self {
            Setup::NoAgent => None,
            Setup::XdpNative => Some(&["--ingress-hook", "xdp", "--xdp-mode", "native"]),
            Setup::TcIngress => Some(&["--ingress-hook", "tc"]),
        }
    }
}

struct Measured {
    gbits: f64,
    retransmits: u64,
    skbs_per_mb: f64,
    bpf_runs: u64,
    bpf_ns_per_run: f64,
    bpf_ns_per_mb: f64,
}

fn main() {
    // bpf_stats are on while this fd is open.
    let _stats = aya::sys::enable_stats(Stats::RunTime).expect("enable bpf run-time stats");
    println!(
        "| setup | direction | Gbit/s | retransmits | gateway skbs per MB | BPF runs | BPF ns per run | BPF µs per MB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for setup in [Setup::NoAgent, Setup::XdpNative, Setup::TcIngress] {
        for download in [false, true] {
            let r = measure(setup, download);
            println!(
                "| {} | {} | {:.2} | {} | {:.1} | {} | {:.0} | {:.1} |",
                setup.label(),
                if download { "download" } else { "upload" },
                r.gbits,
                r.retransmits,
                r.skbs_per_mb,
                r.bpf_runs,
                r.bpf_ns_per_run,
                r.bpf_ns_per_mb / 1000.0,
            );
        }
    }
}

fn measure(setup: Setup, download: bool) -> Measured {
    let lab = Lab::new();
    // Real gateways keep their offloads: undo the lab's WAN-link settings.
    for (ns, dev) in [(&lab.gw, &lab.gw_wan_if), (&lab.wan, &lab.wan_if)] {
        lab::ns_exec(ns, &["ethtool", "-K", dev, "tso", "on", "gso", "on"]);
    }
    let started = SystemTime::now();
    let agent = setup
        .args()
        .map(|args| Agent::start(&lab.gw, &lab.gw_wan_if, args));
    lab.spawn_in(
        &lab.wan,
        &[
            "iperf3",
            "-s",
            "-1",
            "-B",
            "203.0.113.2",
            "--logfile",
            "/dev/null",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = lab::counters(&lab.gw, &lab.gw_wan_if);
    let bpf_before = bpf_totals(started);
    let secs = SECONDS.to_string();
    let mut client = vec!["iperf3", "-c", "203.0.113.2", "-t", &secs, "-J"];
    if download {
        client.push("-R");
    }
    let out = lab::ns_output(&lab.lan, &client, Duration::from_secs(SECONDS as u64 + 20));
    assert!(out.status.success(), "iperf3 failed: {out:?}");
    let bpf_after = bpf_totals(started);
    let after = lab::counters(&lab.gw, &lab.gw_wan_if);
    if let Some(agent) = agent {
        agent.stop();
    }
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J output");
    let end = &report["end"];
    let bytes = end["sum_received"]["bytes"]
        .as_f64()
        .expect("bytes received");
    let delta = after.since(before);
    let skbs = if download {
        delta.rx_packets
    } else {
        delta.tx_packets
    };
    let mb = bytes / 1e6;
    let runs = bpf_after.0 - bpf_before.0;
    let ns = bpf_after.1 - bpf_before.1;
    Measured {
        gbits: end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        skbs_per_mb: skbs as f64 / mb,
        bpf_runs: runs,
        bpf_ns_per_run: if runs == 0 {
            0.0
        } else {
            ns as f64 / runs as f64
        },
        bpf_ns_per_mb: ns as f64 / mb,
    }
}

/// (runs, nanoseconds) of this agent's programs: those loaded since `since`.
fn bpf_totals(since: SystemTime) -> (u64, u64) {
    let mut total = (0, 0);
    for info in loaded_programs().flatten() {
        let ours = info
            .name_as_str()
            .is_some_and(|name| PROGRAMS.contains(&name));
        let recent = info.loaded_at().is_some_and(|at| at >= since);
        if ours && recent {
            total.0 += info.run_count();
            total.1 += info.run_time().as_nanos() as u64;
        }
    }
    total
}
