//! `monitor top --once` against a running agent in the gateway lab: while the lan host
//! uploads at a steady pace, the frame shows that connection with its bytes and rate.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    lab::{self, Lab},
};

const SERVER_PORT: u16 = 5002;
/// The upload's pace and its bounds: ~40 MB over ~4 s unless stopped sooner.
const CHUNK: usize = 100_000;
const CHUNK_EVERY: Duration = Duration::from_millis(10);
const UPLOAD_MAX: u64 = 40_000_000;
const UPLOAD_FOR: Duration = Duration::from_secs(4);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `top --once` may take, and how long to wait for a frame with the upload.
const TOP_LIMIT: Duration = Duration::from_secs(20);
const FRAME_LIMIT: Duration = Duration::from_secs(3);

/// A paced TCP upload from the lan host to the wan host.
struct SlowUpload {
    client: SocketAddr,
    server: SocketAddr,
    stop: Arc<AtomicBool>,
    sender: JoinHandle<u64>,
    receiver: JoinHandle<u64>,
}

impl SlowUpload {
    fn start(lab: &Lab) -> SlowUpload {
        let server = SocketAddr::new(lab::WAN_HOST_V4.into(), SERVER_PORT);
        let listener = lab::run_in_ns(&lab.wan, move || TcpListener::bind(server))
            .unwrap_or_else(|e| panic!("bind {server} in the wan namespace: {e}"));
        let receiver = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept the upload");
            stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let mut buf = vec![0u8; 64 * 1024];
            let mut received = 0u64;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return received,
                    Ok(n) => received += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("upload server: read after {received} bytes: {e}"),
                }
            }
        });
        let mut stream = lab::run_in_ns(&lab.lan, move || {
            TcpStream::connect_timeout(&server, IO_TIMEOUT)
        })
        .unwrap_or_else(|e| panic!("connect to {server} from the lan host: {e}"));
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let client = stream.local_addr().expect("client address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sender = thread::spawn(move || {
            let chunk = vec![0x5a; CHUNK];
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < UPLOAD_MAX
                && start.elapsed() < UPLOAD_FOR
                && !stopped.load(Ordering::Relaxed)
            {
                stream
                    .write_all(&chunk)
                    .unwrap_or_else(|e| panic!("upload client: write after {sent} bytes: {e}"));
                sent += CHUNK as u64;
                thread::sleep(CHUNK_EVERY);
            }
            stream
                .shutdown(Shutdown::Write)
                .expect("half-close the upload");
            sent
        });
        SlowUpload {
            client,
            server,
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending; returns the bytes sent once the server has read them all.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let join = |handle: JoinHandle<u64>| match handle.join() {
            Ok(n) => n,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let sent = join(self.sender);
        let received = join(self.receiver);
        assert_eq!(
            received, sent,
            "the upload server read what the client sent"
        );
        sent
    }
}

fn top_once(ns: &str, extra: &[&str]) -> Output {
    let binary = Agent::binary();
    let binary = binary.to_str().expect("UTF-8 binary path");
    let mut args = vec![binary, "top", "--once"];
    args.extend_from_slice(extra);
    lab::ns_output(ns, &args, TOP_LIMIT)
}

/// The upload's cells in a frame: (out, rate out), e.g. ("12.3 MB", "5.1 MB/s").
fn upload_cells(frame: &str, client: SocketAddr, server: SocketAddr) -> Option<(String, String)> {
    let (client, server) = (client.to_string(), server.to_string());
    frame.lines().find_map(|line| {
        let cells: Vec<&str> = line.split_whitespace().collect();
        // LOCAL → REMOTE PROTO OUT(2) IN(2) RATE-OUT(2) RATE-IN(2) AGE
        (cells.len() == 13 && cells[..4] == [client.as_str(), "→", server.as_str(), "tcp"])
            .then(|| (cells[4..6].join(" "), cells[8..10].join(" ")))
    })
}

#[test]
fn top_once_shows_a_running_upload() {
    let lab = Lab::new();
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &["--local-net", lab::LOCAL_NET_V4, "--poll-interval", "200ms"],
    );
    let upload = SlowUpload::start(&lab);
    let start = Instant::now();
    let (frame, out, rate) = loop {
        let output = top_once(&lab.gw, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "monitor top --once: {}\nstdout: {stdout}\nstderr: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            agent.stderr()
        );
        if let Some((out, rate)) = upload_cells(&stdout, upload.client, upload.server)
            && out != "0 B"
            && rate != "0 B/s"
        {
            break (stdout, out, rate);
        }
        assert!(
            start.elapsed() < FRAME_LIMIT,
            "no frame within {FRAME_LIMIT:?} showed the upload {} → {} with bytes and a rate; last:\n{stdout}",
            upload.client,
            upload.server
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        frame.starts_with("monitor top: agent 127.0.0.1:9877 at "),
        "header:\n{frame}"
    );
    assert!(
        !frame.contains('\x1b'),
        "--once draws no terminal control:\n{frame}"
    );
    assert!(
        out.ends_with(" KB") || out.ends_with(" MB"),
        "out {out}:\n{frame}"
    );
    assert!(
        rate.ends_with(" KB/s") || rate.ends_with(" MB/s"),
        "rate {rate}:\n{frame}"
    );
    let sent = upload.finish();
    assert!(sent > 0, "the upload sent nothing");
    agent.stop();
}

#[test]
fn top_once_without_an_agent_exits_1() {
    let lab = Lab::new();
    let output = top_once(&lab.gw, &["--metrics-addr", "127.0.0.1:1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(
            "cannot reach the agent at 127.0.0.1:1 (is `monitor run` running? --metrics-addr)"
        ),
        "stderr: {stderr}"
    );
    assert!(output.stdout.is_empty(), "no frame on failure");
}
