//! Real QUIC in the labs: aioquic's server and client (`tests/scripts/quic_peer.py`, from
//! the venv `cargo xtask setup` makes), a capture of the UDP datagrams a client sends, and
//! the ground truth's reading of a ClientHello's server name (by hand, not the agent's).

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    lab::{ns_output, packet_socket, run_bounded, spawn_in_ns},
    rules_lab::Scratch,
};

/// The Python that has aioquic: `cargo xtask setup` makes the venv (xtask's `LAB_VENV`).
pub const PYTHON: &str = "/var/lib/egress-monitor-lab/venv/bin/python";
const START_LIMIT: Duration = Duration::from_secs(15);
const CLIENT_LIMIT: Duration = Duration::from_secs(30);
/// How long one wait for a packet lasts before the capture checks whether to stop.
const CAPTURE_POLL: Duration = Duration::from_millis(100);
const UDP: u8 = 17;

/// Fails naming the bootstrap when aioquic's venv is missing: a test never silently skips.
pub fn require_aioquic() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: run `cargo xtask setup` (it installs aioquic)"
    );
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/quic_peer.py")
}

/// aioquic's server in a namespace, with a self-signed certificate made for it; killed
/// (by PID) when dropped.
pub struct QuicServer {
    child: Child,
    scratch: Scratch,
}

impl QuicServer {
    /// Starts the server on `addr` in `ns` and returns once it listens.
    pub fn start(ns: &str, addr: SocketAddr) -> QuicServer {
        require_aioquic();
        let scratch = Scratch::new("quic");
        let (cert, key) = (scratch.path("cert.pem"), scratch.path("key.pem"));
        let out = run_bounded(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-days", "1", "-subj", "/CN=quic.lab.test", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert),
            START_LIMIT,
        );
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = scratch.path("server.log");
        let log_file = File::create(&log).unwrap_or_else(|e| panic!("create {log:?}: {e}"));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, PYTHON])
            .arg(script())
            .args(["server", "--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the QUIC server in {ns}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let server = QuicServer { child, scratch };
        match rx.recv_timeout(START_LIMIT) {
            Ok(line) if line.trim() == "listening" => server,
            _ => panic!(
                "the QUIC server in {ns} did not start listening within {START_LIMIT:?}:\n{}",
                std::fs::read_to_string(server.scratch.path("server.log")).unwrap_or_default()
            ),
        }
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs aioquic's client in `ns`: it connects to `server` in QUIC `version` (1 or 2) with
/// `sni` as its server_name, sends `bytes` bytes on one stream, and returns how many the
/// server says it received.
pub fn upload(ns: &str, server: SocketAddr, version: u8, sni: &str, bytes: u64) -> u64 {
    require_aioquic();
    let script = script();
    let (host, port, version, bytes) = (
        server.ip().to_string(),
        server.port().to_string(),
        version.to_string(),
        bytes.to_string(),
    );
    let out = ns_output(
        ns,
        &[
            PYTHON,
            script.to_str().expect("UTF-8 path"),
            "client",
            "--host",
            &host,
            "--port",
            &port,
            "--sni",
            sni,
            "--bytes",
            &bytes,
            "--quic-version",
            &version,
        ],
        CLIENT_LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "QUIC client in {ns}: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("QUIC client printed {stdout:?}: {e}"))
}

/// The payloads of the UDP datagrams to one port that cross an interface, in order, read
/// from an AF_PACKET socket until [`Capture::finish`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    /// Starts capturing on `dev` in `ns`; returns once the socket is open.
    pub fn start(ns: &str, dev: &str, dst_port: u16) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (ns_name, dev_name, stopped) = (ns.to_string(), dev.to_string(), Arc::clone(&stop));
        let thread = spawn_in_ns(ns, move || {
            let all = (libc::ETH_P_ALL as u16).to_be();
            let (fd, ifindex) = packet_socket(&ns_name, &dev_name, libc::SOCK_DGRAM, all);
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = ifindex;
            // SAFETY: the address is valid for the length given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "bind to {dev_name}: {}", io::Error::last_os_error());
            // std's UdpSocket is recv(2) and setsockopt(2) on a datagram socket's
            // descriptor, whatever its family: it serves this AF_PACKET one as well.
            let socket = UdpSocket::from(fd);
            socket
                .set_read_timeout(Some(CAPTURE_POLL))
                .expect("SO_RCVTIMEO");
            ready_tx.send(()).expect("the test waits for the capture");
            let mut payloads = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf)
                    && let Some(payload) = udp_payload_to(&buf[..n], dst_port)
                {
                    payloads.push(payload.to_vec());
                }
            }
            payloads
        });
        if ready_rx.recv_timeout(START_LIMIT).is_err() {
            match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => panic!("the capture on {ns}/{dev} never started"),
            }
        }
        Capture { stop, thread }
    }

    /// Stops capturing and returns the payloads seen.
    pub fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// The payload of an unfragmented IPv4 or IPv6 (no extension headers) UDP datagram to
/// `port`.
fn udp_payload_to(packet: &[u8], port: u16) -> Option<&[u8]> {
    let (protocol, udp) = match packet.first()? >> 4 {
        4 => {
            let fragment = u16_at(packet, 6)? & 0x3fff;
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            (
                *packet.get(9)?,
                packet.get(header_len..).filter(|_| fragment == 0)?,
            )
        }
        6 => (*packet.get(6)?, packet.get(40..)?),
        _ => return None,
    };
    if protocol != UDP || u16_at(udp, 2)? != port {
        return None;
    }
    udp.get(8..usize::from(u16_at(udp, 4)?))
}

/// The host_name in a TLS ClientHello handshake message's server_name extension (RFC 8446
/// section 4.1.2, RFC 6066 section 3).
pub fn server_name(client_hello: &[u8]) -> Option<String> {
    let mut at = 4 + 2 + 32; // handshake header, legacy_version, random
    at += 1 + usize::from(*client_hello.get(at)?); // legacy_session_id
    at += 2 + usize::from(u16_at(client_hello, at)?); // cipher_suites
    at += 1 + usize::from(*client_hello.get(at)?); // legacy_compression_methods
    let extensions_len = usize::from(u16_at(client_hello, at)?);
    let mut extensions = client_hello.get(at + 2..at + 2 + extensions_len)?;
    while extensions.len() >= 4 {
        let (kind, len) = (u16_at(extensions, 0)?, usize::from(u16_at(extensions, 2)?));
        let data = extensions.get(4..4 + len)?;
        // server_name: a list (2-byte length) of one entry: type 0 (host_name), name.
        if kind == 0 && data.get(2) == Some(&0) {
            let name_len = usize::from(u16_at(data, 3)?);
            return String::from_utf8(data.get(5..5 + name_len)?.to_vec()).ok();
        }
        extensions = &extensions[4 + len..];
    }
    None
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}
