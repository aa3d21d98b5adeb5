//! Bounded traffic generators between lab namespaces. Each one reports what it itself
//! sent and received: the ground truth the agent's records are compared with.
//!
//! Sockets are created on a thread inside the right namespace ([`run_in_ns`]) and then
//! used from ordinary threads: a socket stays in the namespace it was created in.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::lab::{ns_output, run_in_ns};

/// Every blocking socket call gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an established [`TcpSession`] may wait for its transfer to be chosen.
pub const IDLE_LIMIT: Duration = Duration::from_secs(120);
const CHUNK: usize = 64 * 1024;

/// What one TCP connection carried, as its two ends counted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpTransfer {
    /// The client's local address, with its ephemeral port.
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub client_sent: u64,
    pub client_received: u64,
    pub server_sent: u64,
    pub server_received: u64,
    /// Each socket's TCP_INFO after its last read, before it closed.
    pub client_info: TcpInfo,
    pub server_info: TcpInfo,
}

/// A socket's own TCP counters (TCP_INFO).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// Payload bytes put on the wire, retransmissions included.
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub total_retrans: u32,
}

pub fn tcp_info(stream: &TcpStream) -> TcpInfo {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes; the kernel writes at most that many.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    TcpInfo {
        bytes_sent: info.tcpi_bytes_sent,
        bytes_retrans: info.tcpi_bytes_retrans,
        bytes_received: info.tcpi_bytes_received,
        segs_out: info.tcpi_segs_out,
        segs_in: info.tcpi_segs_in,
        total_retrans: info.tcpi_total_retrans,
    }
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Upload(u64),
    Download(u64),
}

#[derive(Debug)]
struct ServerCount {
    sent: u64,
    received: u64,
    info: TcpInfo,
}

/// An established TCP connection from a client in one namespace to a server in another,
/// idle until [`upload`](Self::upload) or [`download`](Self::download) is called. Dropping
/// it unused closes the connection.
pub struct TcpSession {
    stream: TcpStream,
    cpu: usize,
    role: mpsc::Sender<Role>,
    server_thread: JoinHandle<Option<ServerCount>>,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// Connects a client in `client_ns` to a server listening on `server` in `server_ns` and
/// returns once the connection is established (no data sent yet).
pub fn tcp_connect(client_ns: &str, server_ns: &str, server: SocketAddr) -> TcpSession {
    let listener = run_in_ns(server_ns, move || TcpListener::bind(server))
        .unwrap_or_else(|e| panic!("bind TCP server {server}: {e}"));
    let server = listener.local_addr().expect("listener address");
    let (role_tx, role_rx) = mpsc::channel();
    let cpu = next_cpu();
    let server_thread = thread::Builder::new()
        .name(format!("tcp server {server}"))
        .spawn(move || {
            pin_to_cpu(cpu);
            serve_tcp(listener, role_rx)
        })
        .expect("spawn TCP server thread");
    let stream = run_in_ns(client_ns, move || {
        TcpStream::connect_timeout(&server, CONNECT_TIMEOUT)
    })
    .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
    set_timeouts(&stream, IO_TIMEOUT);
    let client = stream.local_addr().expect("client address");
    TcpSession {
        stream,
        cpu,
        role: role_tx,
        server_thread,
        client,
        server,
    }
}

impl TcpSession {
    /// The client sends `bytes`, then both ends close (FIN each way).
    pub fn upload(self, bytes: u64) -> TcpTransfer {
        self.run(Role::Upload(bytes))
    }

    /// The server sends `bytes`, then both ends close (FIN each way).
    pub fn download(self, bytes: u64) -> TcpTransfer {
        self.run(Role::Download(bytes))
    }

    fn run(self, role: Role) -> TcpTransfer {
        let TcpSession {
            mut stream,
            cpu,
            role: role_tx,
            server_thread,
            client,
            server,
        } = self;
        role_tx
            .send(role)
            .expect("TCP server thread ended before the transfer");
        let client_thread = thread::Builder::new()
            .name(format!("tcp client {client}"))
            .spawn(move || {
                pin_to_cpu(cpu);
                let (sent, received) = match role {
                    Role::Upload(bytes) => send_then_drain(&mut stream, bytes, "client"),
                    Role::Download(_) => (0, read_to_eof(&mut stream, "client")),
                };
                (sent, received, tcp_info(&stream))
            })
            .expect("spawn TCP client thread");
        let (client_sent, client_received, client_info) = match client_thread.join() {
            Ok(counted) => counted,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let counted = match server_thread.join() {
            Ok(Some(counted)) => counted,
            Ok(None) => panic!("TCP server {server} never got its role"),
            Err(panic) => std::panic::resume_unwind(panic),
        };
        TcpTransfer {
            client,
            server,
            client_sent,
            client_received,
            server_sent: counted.sent,
            server_received: counted.received,
            client_info,
            server_info: counted.info,
        }
    }
}

fn serve_tcp(listener: TcpListener, role: mpsc::Receiver<Role>) -> Option<ServerCount> {
    let mut stream = accept_within(&listener, CONNECT_TIMEOUT);
    drop(listener);
    set_timeouts(&stream, IO_TIMEOUT);
    // The connection may sit idle for a while (the "missed start" case).
    let role = role.recv_timeout(IDLE_LIMIT).ok()?;
    let (sent, received) = match role {
        Role::Upload(_) => (0, read_to_eof(&mut stream, "server")),
        Role::Download(bytes) => send_then_drain(&mut stream, bytes, "server"),
    };
    Some(ServerCount {
        sent,
        received,
        info: tcp_info(&stream),
    })
}

/// Client uploads `bytes` to a server in `server_ns`; clean close both ways.
pub fn tcp_upload(client_ns: &str, server_ns: &str, server: SocketAddr, bytes: u64) -> TcpTransfer {
    tcp_connect(client_ns, server_ns, server).upload(bytes)
}

/// Server in `server_ns` sends `bytes` to the client; clean close both ways.
pub fn tcp_download(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddr,
    bytes: u64,
) -> TcpTransfer {
    tcp_connect(client_ns, server_ns, server).download(bytes)
}

/// CPUs this process may run on, handed out in turn.
fn next_cpu() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static ALLOWED: OnceLock<Vec<usize>> = OnceLock::new();
    let allowed = ALLOWED.get_or_init(|| {
        // SAFETY: cpu_set_t is plain data; the syscall fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is valid for the size given.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        assert_eq!(rc, 0, "sched_getaffinity: {}", io::Error::last_os_error());
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    });
    allowed[NEXT.fetch_add(1, Ordering::Relaxed) % allowed.len()]
}

/// Keeps the calling thread on one CPU. Both ends of a TCP connection run on the same
/// CPU so the whole path (veth delivery, forwarding, ACKs, timers) runs there: packets a
/// veth takes from different CPUs can be reordered, and TCP would retransmit them.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set)
    };
    assert_eq!(
        rc,
        0,
        "pin thread to CPU {cpu}: {}",
        io::Error::last_os_error()
    );
}

/// Accepts one connection within `limit`; panics otherwise.
pub fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                return stream;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < limit => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    }
}

fn set_timeouts(stream: &TcpStream, limit: Duration) {
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    stream
        .set_write_timeout(Some(limit))
        .expect("write timeout");
}

/// Writes `bytes`, half-closes, then reads until the peer closes. Returns (sent, read).
fn send_then_drain(stream: &mut TcpStream, bytes: u64, who: &str) -> (u64, u64) {
    let chunk = pattern(CHUNK);
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        stream
            .write_all(&chunk[..n])
            .unwrap_or_else(|e| panic!("{who}: write after {sent} of {bytes} bytes: {e}"));
        sent += n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("{who}: shutdown(Write): {e}"));
    (sent, read_to_eof(stream, who))
}

fn read_to_eof(stream: &mut TcpStream, who: &str) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{who}: read after {total} bytes: {e}"),
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A UDP request/response exchange as its two ends counted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpExchange {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Payload size of every datagram, both ways.
    pub size: usize,
    /// Datagrams the client sent / received.
    pub requests: u64,
    pub responses: u64,
    /// Datagrams the server received / sent.
    pub server_received: u64,
    pub server_sent: u64,
}

impl UdpExchange {
    pub fn request_bytes(&self) -> u64 {
        self.requests * self.size as u64
    }

    pub fn response_bytes(&self) -> u64 {
        self.responses * self.size as u64
    }
}

/// `count` lockstep exchanges: the client sends a `size`-byte datagram, the server answers
/// with one of the same size.
pub fn udp_exchange(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddr,
    count: u64,
    size: usize,
) -> UdpExchange {
    let server_sock = run_in_ns(server_ns, move || UdpSocket::bind(server))
        .unwrap_or_else(|e| panic!("bind UDP server {server}: {e}"));
    let server = server_sock.local_addr().expect("UDP server address");
    server_sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    server_sock
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    let server_thread = thread::Builder::new()
        .name(format!("udp server {server}"))
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            let (mut received, mut sent) = (0u64, 0u64);
            while received < count {
                let (n, peer) = server_sock
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("UDP server: recv after {received}: {e}"));
                assert_eq!(
                    n, size,
                    "UDP server: datagram of {n} bytes, expected {size}"
                );
                received += 1;
                let m = server_sock
                    .send_to(&buf[..n], peer)
                    .unwrap_or_else(|e| panic!("UDP server: send after {sent}: {e}"));
                assert_eq!(m, n, "UDP server: short send");
                sent += 1;
            }
            (received, sent)
        })
        .expect("spawn UDP server thread");

    let unspecified: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let client_sock = run_in_ns(client_ns, move || {
        let sock = UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
        sock.connect(server)?;
        Ok::<_, io::Error>(sock)
    })
    .unwrap_or_else(|e| panic!("UDP client socket to {server}: {e}"));
    client_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    client_sock
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    let client = client_sock.local_addr().expect("UDP client address");
    let request = pattern(size);
    let mut buf = vec![0u8; 65536];
    let (mut requests, mut responses) = (0u64, 0u64);
    for _ in 0..count {
        let n = client_sock
            .send(&request)
            .unwrap_or_else(|e| panic!("UDP client: send after {requests}: {e}"));
        assert_eq!(n, size, "UDP client: short send");
        requests += 1;
        let n = client_sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!("UDP client: no response {} within 5 s: {e}", responses + 1)
        });
        assert_eq!(
            n, size,
            "UDP client: response of {n} bytes, expected {size}"
        );
        responses += 1;
    }
    let (server_received, server_sent) = match server_thread.join() {
        Ok(counts) => counts,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    UdpExchange {
        client,
        server,
        size,
        requests,
        responses,
        server_received,
        server_sent,
    }
}

/// What `ping` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u64,
    pub received: u64,
    /// ICMP data bytes per echo (`-s`).
    pub size: usize,
}

/// `ping -c count -s size` from `ns` to `dst`, 50 ms apart, with a deadline.
pub fn ping(ns: &str, dst: IpAddr, count: u32, size: usize) -> PingResult {
    let family = if dst.is_ipv6() { "-6" } else { "-4" };
    let deadline = (count as u64 / 20 + 5).to_string();
    let (count_s, size_s, dst_s) = (count.to_string(), size.to_string(), dst.to_string());
    let args = [
        "ping", family, "-n", "-q", "-c", &count_s, "-s", &size_s, "-W", "1", "-i", "0.05", "-w",
        &deadline, &dst_s,
    ];
    let out = ns_output(ns, &args, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "in {ns}: {args:?}: no summary ({}); stdout: {stdout}; stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = summary
            .split([' ', ','])
            .filter(|w| !w.is_empty())
            .collect();
        let at = words
            .iter()
            .position(|w| *w == word)
            .unwrap_or_else(|| panic!("no '{word}' in ping summary: {summary}"));
        words[at - 1]
            .parse()
            .unwrap_or_else(|e| panic!("bad count before '{word}' in {summary}: {e}"))
    };
    PingResult {
        transmitted: number_before("packets"),
        received: number_before("received"),
        size,
    }
}

/// Destination ports of [`udp_new_flows`]: each of its sockets sends one datagram to each
/// of them in turn.
pub const NEW_FLOW_PORTS: std::ops::Range<u16> = 1024..61024;

/// What [`udp_new_flows`] sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewFlows {
    /// Datagrams sent, each the only packet of its flow.
    pub flows: u64,
    pub elapsed: Duration,
}

/// `flows` new UDP flows from `client_ns` to `server`, paced at `rate` per second: one
/// `size`-byte datagram each, to port after port of [`NEW_FLOW_PORTS`], from a new
/// socket (a new source port) every time the ports run out, so no two flows share a
/// 5-tuple. Nothing answers them: the receiving side is expected to drop them. On a busy
/// machine it falls behind the pace and sends the rest as fast as it can, never skips.
pub fn udp_new_flows(
    client_ns: &str,
    server: IpAddr,
    flows: u64,
    rate: u64,
    size: usize,
) -> NewFlows {
    assert!(rate > 0, "a rate of 0 flows per second");
    let ports = u64::from(NEW_FLOW_PORTS.end - NEW_FLOW_PORTS.start);
    let unspecified: IpAddr = match server {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sockets = run_in_ns(client_ns, move || {
        (0..flows.div_ceil(ports))
            .map(|_| UdpSocket::bind(SocketAddr::new(unspecified, 0)))
            .collect::<io::Result<Vec<UdpSocket>>>()
    })
    .unwrap_or_else(|e| panic!("UDP sockets in {client_ns}: {e}"));
    let payload = pattern(size);
    // The pace is kept per millisecond's batch: a sleep per datagram would cost more
    // than the datagram.
    let batch = (rate / 1000).max(1);
    let start = Instant::now();
    for n in 0..flows {
        if n % batch == 0 {
            let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        let port = NEW_FLOW_PORTS.start + (n % ports) as u16;
        let to = SocketAddr::new(server, port);
        let sent = sockets[(n / ports) as usize]
            .send_to(&payload, to)
            .unwrap_or_else(|e| panic!("UDP flow {n} to {to}: {e}"));
        assert_eq!(sent, size, "short send to {to}");
    }
    NewFlows {
        flows,
        elapsed: start.elapsed(),
    }
}
