//! What naming the socket owner costs the watched host's own processes: the same socket
//! calls timed in the lab gateway without an agent and with one (whose cgroup programs
//! then run at every `socket()`, `connect()` and `bind()` of every process). The
//! calls go over loopback, which the agent does not watch: only the owner-keeping
//! programs are in their path, not the counting ones. The TCP connects go to a port
//! nothing listens on, refused at once: a listener's accept queue would time them.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    time::Instant,
};

use tests::{
    agent::Agent,
    lab::{Lab, run_in_ns, spawn_in_ns},
};

use crate::{Plan, median};

pub struct Row {
    /// Nanoseconds per TCP `connect()` to a closed loopback port (refused at once), without
    /// and with the agent.
    pub connect_ns: [f64; 2],
    /// Per new datagram socket: its `bind()` and its first datagram.
    pub first_send_ns: [f64; 2],
    /// Per datagram sent by an unconnected socket that sent before.
    pub send_ns: [f64; 2],
}

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

pub fn measure(plan: &Plan) -> Row {
    let lab = Lab::new();
    let calls = if plan.quick { 2_000 } else { 20_000 };
    let mut runs: [[Vec<f64>; 2]; 3] = Default::default();
    for _ in 0..plan.runs {
        for (with_agent, slot) in [(false, 0), (true, 1)] {
            // Seeing the host's mounts: the cgroup tree, where its programs attach.
            let agent = with_agent.then(|| Agent::start_seeing_host(&lab.gw, &lab.gw_wan_if, &[]));
            let [connect, first_send, send] = time_calls(&lab.gw, calls);
            runs[0][slot].push(connect);
            runs[1][slot].push(first_send);
            runs[2][slot].push(send);
            drop(agent);
        }
    }
    let medians = |figures: [Vec<f64>; 2]| figures.map(median);
    let [connect, first_send, send] = runs;
    Row {
        connect_ns: medians(connect),
        first_send_ns: medians(first_send),
        send_ns: medians(send),
    }
}

/// Nanoseconds per call of each kind, `calls` of each, in namespace `ns`.
fn time_calls(ns: &str, calls: u32) -> [f64; 3] {
    // A port just freed: nothing listens there.
    let closed = run_in_ns(ns, || TcpListener::bind((LOOPBACK, 0)))
        .expect("bind")
        .local_addr()
        .expect("address");
    let sink = run_in_ns(ns, || UdpSocket::bind((LOOPBACK, 0))).expect("bind sink");
    let to = sink.local_addr().expect("sink address");
    let timed = spawn_in_ns(ns, move || {
        let per_call = |started: Instant| started.elapsed().as_nanos() as f64 / f64::from(calls);
        let started = Instant::now();
        for _ in 0..calls {
            let refused = TcpStream::connect(closed).expect_err("nothing listens");
            assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
        }
        let connect = per_call(started);
        let started = Instant::now();
        for _ in 0..calls {
            let socket = UdpSocket::bind((LOOPBACK, 0)).expect("bind");
            socket.send_to(b"x", to).expect("send_to");
        }
        let first_send = per_call(started);
        let socket = UdpSocket::bind((LOOPBACK, 0)).expect("bind");
        let started = Instant::now();
        for _ in 0..calls {
            socket.send_to(b"x", to).expect("send_to");
        }
        [connect, first_send, per_call(started)]
    });
    let figures = timed
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    drop(sink);
    figures
}
