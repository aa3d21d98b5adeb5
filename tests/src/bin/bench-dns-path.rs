//! `cargo run --release -p tests --bin bench-dns-path [OBJECT...]`: what the DNS copy
//! costs the kernel programs per packet, through BPF_PROG_TEST_RUN (no interface, no
//! traffic).
//!
//! Runs frames through `tc_egress` and `xdp_ingress` of the embedded object and of each
//! object file given (say, a build without the DNS copy), in batches of 500 (fewer than
//! the ring buffer holds; it is drained between batches). The objects take turns round
//! by round, so a busy machine slows them alike. Prints the kernel's average run time per
//! frame, the median of the rounds.

use aya::{
    Ebpf,
    maps::RingBuf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use monitor_common::names;
use tests::packet::{Frame, tcp_flags};

const BATCH: u32 = 500;
const BATCHES: usize = 100;
const ROUNDS: usize = 7;
const PROGRAMS: [&str; 2] = [names::TC_EGRESS, names::XDP_INGRESS];

fn query() -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["files", "example", "test"] {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let (a, b) = ([198, 18, 0, 10], [192, 0, 2, 53]);
    vec![
        (
            "TCP 443, 1400 B payload",
            Frame::eth()
                .ipv4(a, b)
                .tcp(40000, 443, tcp_flags::ACK)
                .payload_len(1400)
                .build(),
        ),
        (
            "UDP 443, 100 B payload",
            Frame::eth()
                .ipv4(a, b)
                .udp(40000, 443)
                .payload_len(100)
                .build(),
        ),
        (
            "UDP 53 query, 36 B",
            Frame::eth()
                .ipv4(a, b)
                .udp(40000, 53)
                .payload(&query())
                .build(),
        ),
        (
            "UDP 53 response, 512 B",
            Frame::eth()
                .ipv4(b, a)
                .udp(53, 40000)
                .payload_len(512)
                .build(),
        ),
    ]
}

fn load(bytes: &[u8]) -> Ebpf {
    let mut ebpf = Ebpf::load(bytes).expect("load the kernel object (needs root)");
    for name in PROGRAMS {
        let program = ebpf.program_mut(name).expect("program");
        if name == names::XDP_INGRESS {
            <&mut Xdp>::try_from(program).expect("XDP").load()
        } else {
            <&mut SchedClassifier>::try_from(program)
                .expect("classifier")
                .load()
        }
        .unwrap_or_else(|e| panic!("load {name}: {e}"));
    }
    ebpf
}

/// Average kernel ns per run of `frame` through `name`, over one round of batches.
fn round(ebpf: &mut Ebpf, name: &str, frame: &[u8]) -> f64 {
    let mut total = 0.0;
    for _ in 0..BATCHES {
        let mut out = vec![0u8; frame.len()];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: BATCH,
            ..TestRunOptions::default()
        };
        let program = ebpf.program(name).expect("program");
        let result = if name == names::XDP_INGRESS {
            <&Xdp>::try_from(program).expect("XDP").test_run(opts)
        } else {
            <&SchedClassifier>::try_from(program)
                .expect("classifier")
                .test_run(opts)
        }
        .unwrap_or_else(|e| panic!("test_run {name}: {e:?}"));
        total += result.duration.as_nanos() as f64;
        if let Some(map) = ebpf.map_mut(names::DNS_EVENTS_MAP) {
            let mut ring = RingBuf::try_from(map).expect("DNS_EVENTS is a ring buffer");
            while ring.next().is_some() {}
        }
    }
    total / BATCHES as f64
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let mut objects = vec![("this build".to_owned(), load(monitor::kernel::object()))];
    for p in &paths {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("read {p}: {e}"));
        objects.push((p.clone(), load(&bytes)));
    }
    let frames = frames();
    // [object][program][frame] -> one figure per round
    let mut figures = vec![vec![vec![Vec::new(); frames.len()]; PROGRAMS.len()]; objects.len()];
    for _ in 0..ROUNDS {
        for (o, (_, ebpf)) in objects.iter_mut().enumerate() {
            for (p, name) in PROGRAMS.iter().enumerate() {
                for (f, (_, frame)) in frames.iter().enumerate() {
                    figures[o][p][f].push(round(ebpf, name, frame));
                }
            }
        }
    }
    let header: Vec<&str> = objects.iter().map(|(label, _)| label.as_str()).collect();
    println!("ns per run, median of {ROUNDS} rounds of {BATCHES} x {BATCH} runs");
    println!("| program | frame | {} |", header.join(" | "));
    println!("|---|---|{}", "---|".repeat(objects.len()));
    for (p, name) in PROGRAMS.iter().enumerate() {
        for (f, (label, _)) in frames.iter().enumerate() {
            let cells: Vec<String> = (0..objects.len())
                .map(|o| {
                    let mut v = figures[o][p][f].clone();
                    v.sort_by(f64::total_cmp);
                    format!("{:.0}", v[ROUNDS / 2])
                })
                .collect();
            println!("| {name} | {label} | {} |", cells.join(" | "));
        }
    }
}
