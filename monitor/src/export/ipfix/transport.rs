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
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};

use super::{Counters, encode::Message};
use crate::{
    endpoint::{Scheme, Url, udp_connected},
    worker::{Backoff, Deliver, Worker},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A collector that takes longer than this to accept one message is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts to reach a TCP collector that is away.
const BACKOFF: Backoff = Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_secs(10),
};

/// Where messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collector {
    Udp(SocketAddr),
    Tcp(SocketAddr),
}

/// The schemes of `--ipfix-collector`.
pub const COLLECTOR_SCHEMES: &[Scheme] = &[Scheme::Udp, Scheme::Tcp];

impl Collector {
    /// The collector `url` names, at its host's first address (looked up once, at start).
    pub fn resolve(url: &Url) -> io::Result<Self> {
        match url {
            Url::Udp(at) => at.resolve().map(Self::Udp),
            Url::Tcp(at) => at.resolve().map(Self::Tcp),
            Url::Unix(_) | Url::Http(_) => Err(io::Error::new(
                ErrorKind::Unsupported,
                "not a udp:// or tcp:// URL",
            )),
        }
    }

    /// UDP refreshes the templates on a timer; TCP sends them on every new connection.
    pub fn refreshes_templates(&self) -> bool {
        matches!(self, Self::Udp(_))
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

/// Starts the thread that sends what is submitted to `collector`, holding at most
/// `capacity` messages. `templates` is a message of the templates alone (TCP sends it first
/// on every connection).
pub(super) fn spawn(
    collector: &Collector,
    capacity: usize,
    templates: Message,
    counters: Arc<Counters>,
) -> io::Result<Worker<Message>> {
    let name = collector.to_string();
    let thread = "ipfix".to_owned();
    match *collector {
        Collector::Udp(addr) => {
            let link = UdpLink {
                socket: udp_connected(addr)?,
                name,
                counters,
                failing: false,
            };
            Worker::spawn(thread, capacity, BACKOFF, link)
        }
        Collector::Tcp(addr) => {
            let link = TcpLink {
                addr,
                name,
                templates,
                counters,
                stream: None,
                sequence: 0,
                failing: false,
            };
            Worker::spawn(thread, capacity, BACKOFF, link)
        }
    }
}

fn count_sent(counters: &Counters, message: &Message) {
    counters.messages.fetch_add(1, Ordering::Relaxed);
    counters
        .records
        .fetch_add(u64::from(message.records), Ordering::Relaxed);
}

/// One UDP collector: a datagram per message, never sent twice.
struct UdpLink {
    socket: UdpSocket,
    name: String,
    counters: Arc<Counters>,
    /// A failure was logged; the next ones are not until a send succeeds.
    failing: bool,
}

impl Deliver for UdpLink {
    type Item = Message;

    /// A datagram that could not be sent is counted as an error and not retried: the
    /// sequence numbers show the collector the gap.
    fn deliver(&mut self, message: &Message) -> io::Result<()> {
        match self.socket.send(&message.bytes) {
            Ok(_) => {
                count_sent(&self.counters, message);
                self.failing = false;
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                if !self.failing && e.kind() != ErrorKind::WouldBlock {
                    warn!("IPFIX to {}: {e}", self.name);
                }
                self.failing = true;
            }
        }
        Ok(())
    }
}

/// One TCP collector: the connection, if any, and its stream's sequence number.
struct TcpLink {
    addr: SocketAddr,
    name: String,
    templates: Message,
    counters: Arc<Counters>,
    stream: Option<TcpStream>,
    /// Data records sent on the current connection (mod 2^32).
    sequence: u32,
    /// A failure was logged; the next connection is logged too.
    failing: bool,
}

impl Deliver for TcpLink {
    type Item = Message;

    fn deliver(&mut self, message: &Message) -> io::Result<()> {
        match self.send(message) {
            Ok(()) => {
                count_sent(&self.counters, message);
                Ok(())
            }
            Err(e) => {
                if !self.failing {
                    warn!("IPFIX to {}: {e}; retrying with backoff", self.name);
                    self.failing = true;
                }
                Err(e)
            }
        }
    }
}

impl TcpLink {
    /// Writes `message` on the current connection, or on a new one after the templates.
    fn send(&mut self, message: &Message) -> io::Result<()> {
        if self.stream.as_ref().is_some_and(|s| !peer_open(s)) {
            self.stream = None;
        }
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = self.connect()?;
                count_sent(&self.counters, &self.templates);
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
    fn collectors_from_urls() {
        let resolved =
            |text: &str| Collector::resolve(&Url::parse(text, COLLECTOR_SCHEMES).unwrap());
        assert_eq!(
            resolved("udp://127.0.0.1:4739").unwrap(),
            Collector::Udp("127.0.0.1:4739".parse().unwrap())
        );
        assert_eq!(
            resolved("tcp://[2001:db8::1]:4739").unwrap(),
            Collector::Tcp("[2001:db8::1]:4739".parse().unwrap())
        );
        assert_eq!(
            resolved("tcp://127.0.0.1:4739").unwrap().to_string(),
            "tcp://127.0.0.1:4739"
        );
        for bad in [
            "127.0.0.1:4739",
            "http://127.0.0.1:4739",
            "unix:/run/collector.sock",
            "tcp://127.0.0.1",
            "udp://:9",
        ] {
            assert!(Url::parse(bad, COLLECTOR_SCHEMES).is_err(), "{bad}");
        }
    }
}
