//! Where the messages go: the collector URL and one sender thread per collector, fed by a
//! bounded queue so that a collector that is down or slow never delays polling.
//!
//! - **UDP**: one datagram per message. The encoder puts the templates in the first
//!   message and refreshes them every `--ipfix-template-refresh`; the sequence numbers are
//!   the encoder's, so records dropped from a full queue show as a gap.
//! - **TCP** (RFC 7011 section 10.4): the thread connects, so `IpfixExporter::new` never
//!   waits for a collector; a collector that is down at start or goes away is retried with
//!   exponential backoff. Every new connection starts with the templates (and there is no
//!   refresh timer: the stream is reliable). Each connection is a new stream, so its
//!   sequence numbers start at 0 and count the data records sent on it. A message that
//!   could not be written is sent again on the next connection, and a collector that
//!   closed its end is noticed before the next write, so a restarted collector gets what
//!   was still queued. What the kernel had already accepted for a collector that then
//!   crashed is lost, as with any TCP exporter.

use std::{
    fmt,
    io::{self, ErrorKind, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    str::FromStr,
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{self, Receiver},
    },
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};

use super::{Counters, encode::Message};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A collector that takes longer than this to accept one message is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Where messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collector {
    Udp(SocketAddr),
    Tcp(SocketAddr),
}

impl Collector {
    /// UDP refreshes the templates on a timer; TCP sends them on every new connection.
    pub fn refreshes_templates(&self) -> bool {
        matches!(self, Self::Udp(_))
    }
}

/// `--ipfix-collector` as given: `udp://HOST:PORT` or `tcp://HOST:PORT`, the host not
/// yet resolved (parsing a flag has no side effects; [`CollectorUrl::resolve`] looks the
/// host up, once, at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectorUrl {
    tcp: bool,
    host_port: String,
}

impl FromStr for CollectorUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "expected udp://HOST:PORT or tcp://HOST:PORT";
        let (scheme, host_port) = url.split_once("://").ok_or(ACCEPTED)?;
        let tcp = match scheme {
            "udp" => false,
            "tcp" => true,
            _ => return Err(format!("unknown scheme {scheme:?} ({ACCEPTED})")),
        };
        match host_port.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Self {
                tcp,
                host_port: host_port.to_owned(),
            }),
            _ => Err(ACCEPTED.into()),
        }
    }
}

impl CollectorUrl {
    /// The collector at the host's first address.
    pub fn resolve(&self) -> Result<Collector, String> {
        let addr = self
            .host_port
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("the host has no address")?;
        Ok(if self.tcp {
            Collector::Tcp(addr)
        } else {
            Collector::Udp(addr)
        })
    }
}

impl fmt::Display for CollectorUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tcp { "tcp" } else { "udp" };
        write!(f, "{scheme}://{}", self.host_port)
    }
}

impl fmt::Display for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Udp(addr) => write!(f, "udp://{addr}"),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

/// Starts the thread that sends what `queue` yields to `collector` until the queue's
/// sender is gone. `templates` is a message of the templates alone (TCP sends it first on
/// every connection). `done` is dropped when the thread ends.
pub(super) fn spawn(
    collector: &Collector,
    queue: Receiver<Message>,
    templates: Message,
    counters: Arc<Counters>,
    done: mpsc::Sender<()>,
) -> io::Result<JoinHandle<()>> {
    let name = collector.to_string();
    let builder = thread::Builder::new().name("ipfix".into());
    match *collector {
        Collector::Udp(addr) => {
            let bind: SocketAddr = if addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(bind)?;
            socket.connect(addr)?;
            builder.spawn(move || {
                let _done = done;
                udp_loop(&socket, &queue, &counters, &name);
            })
        }
        Collector::Tcp(addr) => builder.spawn(move || {
            let _done = done;
            let mut link = TcpLink {
                addr,
                name,
                templates,
                stream: None,
                sequence: 0,
                backoff: BACKOFF_MIN,
                failing: false,
            };
            link.run(&queue, &counters);
        }),
    }
}

fn count_sent(counters: &Counters, message: &Message) {
    counters.messages.fetch_add(1, Ordering::Relaxed);
    counters
        .records
        .fetch_add(u64::from(message.records), Ordering::Relaxed);
}

fn udp_loop(socket: &UdpSocket, queue: &Receiver<Message>, counters: &Counters, to: &str) {
    let mut failing = false;
    while let Ok(message) = queue.recv() {
        match socket.send(&message.bytes) {
            Ok(_) => {
                count_sent(counters, &message);
                failing = false;
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                if !failing && e.kind() != ErrorKind::WouldBlock {
                    warn!("IPFIX to {to}: {e}");
                }
                failing = true;
            }
        }
    }
}

/// One TCP collector: the connection, if any, and its stream's sequence number.
struct TcpLink {
    addr: SocketAddr,
    name: String,
    templates: Message,
    stream: Option<TcpStream>,
    /// Data records sent on the current connection (mod 2^32).
    sequence: u32,
    backoff: Duration,
    /// A failure was logged; the next success is logged too.
    failing: bool,
}

impl TcpLink {
    fn run(&mut self, queue: &Receiver<Message>, counters: &Counters) {
        let mut retry = None;
        loop {
            let message = match retry.take() {
                Some(message) => message,
                None => match queue.recv() {
                    Ok(message) => message,
                    Err(_) => return,
                },
            };
            match self.send(&message, counters) {
                Ok(()) => count_sent(counters, &message),
                Err(e) => {
                    if !self.failing {
                        warn!("IPFIX to {}: {e}; retrying with backoff", self.name);
                        self.failing = true;
                    }
                    if counters.closing.load(Ordering::Relaxed) {
                        // Shutting down with the collector away: what is left is lost.
                        let lost = 1 + queue.try_iter().count() as u64;
                        counters.errors.fetch_add(lost, Ordering::Relaxed);
                        return;
                    }
                    retry = Some(message);
                    thread::sleep(self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Writes `message` on the current connection, or on a new one after the templates.
    fn send(&mut self, message: &Message, counters: &Counters) -> io::Result<()> {
        if self.stream.as_ref().is_some_and(|s| !peer_open(s)) {
            self.stream = None;
        }
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = self.connect()?;
                count_sent(counters, &self.templates);
                self.stream.insert(stream)
            }
        };
        let mut bytes = message.bytes.clone();
        bytes[8..12].copy_from_slice(&self.sequence.to_be_bytes());
        if let Err(e) = stream.write_all(&bytes) {
            self.stream = None;
            return Err(e);
        }
        self.sequence = self.sequence.wrapping_add(message.records);
        Ok(())
    }

    fn connect(&mut self) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let now_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        let mut templates = self.templates.bytes.clone();
        templates[4..8].copy_from_slice(&now_secs.to_be_bytes());
        templates[8..12].copy_from_slice(&0u32.to_be_bytes());
        stream.write_all(&templates)?;
        self.sequence = 0;
        self.backoff = BACKOFF_MIN;
        if self.failing {
            info!("IPFIX to {}: connected", self.name);
            self.failing = false;
        }
        Ok(stream)
    }
}

/// False once the collector closed (a read returns 0) or reset (an error) its end. A
/// write into such a connection can still succeed locally and be lost; checking before
/// each write sends the message on a new connection instead.
fn peer_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let open = match stream.peek(&mut byte) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_ok() && open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls() {
        let resolved = |url: &str| url.parse::<CollectorUrl>().unwrap().resolve();
        assert_eq!(
            resolved("udp://127.0.0.1:4739"),
            Ok(Collector::Udp("127.0.0.1:4739".parse().unwrap()))
        );
        assert_eq!(
            resolved("tcp://[2001:db8::1]:4739"),
            Ok(Collector::Tcp("[2001:db8::1]:4739".parse().unwrap()))
        );
        assert_eq!(
            resolved("tcp://127.0.0.1:4739").unwrap().to_string(),
            "tcp://127.0.0.1:4739"
        );
        for bad in [
            "127.0.0.1:4739",
            "http://127.0.0.1:4739",
            "tcp://127.0.0.1",
            "udp://:9",
        ] {
            assert!(bad.parse::<CollectorUrl>().is_err(), "{bad}");
        }
    }
}
