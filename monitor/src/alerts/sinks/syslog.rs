//! `--syslog URL`: alerts as RFC 5424 messages over UDP (RFC 5426) or a local unix socket.
//!
//! Each alert is one message:
//!
//! ```text
//! <28>1 2024-05-01T12:00:00.250000Z gw1 egress-monitor 4242 LargeUpload - {"ts":...}
//! ```
//!
//! - PRI 28: facility `daemon` (3), severity `warning` (4). `daemon` because the agent is
//!   a system daemon and the `local0`..`local7` facilities belong to the site; route on
//!   APP-NAME `egress-monitor` and MSGID (the alert's note) instead.
//! - TIMESTAMP: the alert's `ts`, RFC 3339 in UTC with microseconds.
//! - HOSTNAME: `gethostname`, PROCID: the agent's pid, STRUCTURED-DATA: none (`-`).
//! - MSG: the alert's JSON object, the same as in the alert log, with non-ASCII characters
//!   written as `\u` escapes so the message is plain ASCII whatever the receiver's charset
//!   handling.
//!
//! Size: a message longer than [`UDP_MAX`] octets over UDP (RFC 5426's recommended
//! bound) or [`UNIX_MAX`] over a unix socket (rsyslog's default `maxMessageSize`) has its
//! MSG truncated on a character boundary; its JSON is then incomplete, and the alert log
//! still has the whole alert.
//!
//! `unix:PATH` is normally a datagram socket (`/dev/log`, rsyslog `imuxsock`); a stream
//! socket (rsyslog `imptcp` with `path`, syslog-ng `unix-stream`) is detected on connect
//! and gets RFC 6587 octet-counting framing (`LEN SP MESSAGE`).
//!
//! The socket is opened on first delivery and again after any error, so the receiver may
//! start or restart at any time: the failed alert is retried by the dispatcher.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    net::UdpSocket,
    os::unix::net::{UnixDatagram, UnixStream},
    time::Duration,
};

use super::Sink;
use crate::{
    alerts::Alert,
    endpoint::{Scheme, Url, udp_connected},
};

/// Facility `daemon` (3) × 8 + severity `warning` (4).
pub const PRI: u8 = 3 * 8 + 4;
pub const APP_NAME: &str = "egress-monitor";
/// Largest message sent over UDP, in octets (RFC 5426 section 3.2).
pub const UDP_MAX: usize = 2048;
/// Largest message sent over a unix socket, in octets (rsyslog's default `maxMessageSize`).
pub const UNIX_MAX: usize = 8096;
/// A full receiver makes a unix socket send block; give up after this and retry later.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The schemes of `--syslog`.
pub const SCHEMES: &[Scheme] = &[Scheme::Udp, Scheme::Unix];

fn max_len(target: &Url) -> usize {
    if matches!(target, Url::Unix(_)) {
        UNIX_MAX
    } else {
        UDP_MAX
    }
}

enum Conn {
    Udp(UdpSocket),
    UnixDgram(UnixDatagram),
    UnixStream(UnixStream),
}

impl Conn {
    fn open(target: &Url) -> io::Result<Self> {
        match target {
            Url::Udp(at) => Ok(Conn::Udp(udp_connected(at.resolve()?)?)),
            Url::Unix(path) => {
                let socket = UnixDatagram::unbound()?;
                match socket.connect(path) {
                    Ok(()) => {
                        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
                        Ok(Conn::UnixDgram(socket))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {
                        let stream = UnixStream::connect(path)?;
                        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
                        Ok(Conn::UnixStream(stream))
                    }
                    Err(e) => Err(e),
                }
            }
            Url::Tcp(_) | Url::Http(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("syslog to {target}"),
            )),
        }
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        let sent = match self {
            Conn::Udp(socket) => socket.send(message)?,
            Conn::UnixDgram(socket) => socket.send(message)?,
            Conn::UnixStream(stream) => {
                // A partial write would desynchronise the framing: the connection is
                // dropped on any error, so the next message starts on a fresh one.
                let mut framed = format!("{} ", message.len()).into_bytes();
                framed.extend_from_slice(message);
                stream.write_all(&framed)?;
                return Ok(());
            }
        };
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} octets", message.len()),
            ));
        }
        Ok(())
    }
}

/// The `--syslog` sink.
pub struct SyslogSink {
    target: Url,
    hostname: String,
    pid: u32,
    conn: Option<Conn>,
}

impl SyslogSink {
    /// The socket itself is opened on the first delivery (and again after errors), so a
    /// receiver that is not up yet is not an error here.
    pub fn new(target: Url) -> Self {
        Self {
            target,
            hostname: hostname(),
            pid: std::process::id(),
            conn: None,
        }
    }

    pub fn target(&self) -> &Url {
        &self.target
    }

    /// The RFC 5424 message for `alert`, at most `max_len` octets.
    pub fn format(&self, alert: &Alert, max_len: usize) -> String {
        format_message(alert, &self.hostname, self.pid, max_len)
    }
}

impl Sink for SyslogSink {
    fn name(&self) -> &'static str {
        "syslog"
    }

    fn deliver(&mut self, alert: &Alert) -> io::Result<()> {
        let message = self.format(alert, max_len(&self.target));
        if let Some(conn) = &mut self.conn {
            match conn.send(message.as_bytes()) {
                Ok(()) => return Ok(()),
                // The unix receiver restarted: the kept socket is stale, a new one works.
                Err(e) if matches!(self.target, Url::Unix(_)) && is_stale(&e) => {}
                Err(e) => {
                    self.conn = None;
                    return Err(e);
                }
            }
            self.conn = None;
        }
        let mut conn = Conn::open(&self.target)?;
        conn.send(message.as_bytes())?;
        self.conn = Some(conn);
        Ok(())
    }
}

fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::NotConnected
            | io::ErrorKind::BrokenPipe
    )
}

/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, MSG truncated so the whole is
/// at most `max_len` octets.
pub fn format_message(alert: &Alert, hostname: &str, pid: u32, max_len: usize) -> String {
    let mut out = format!(
        "<{PRI}>1 {} {hostname} {APP_NAME} {pid} {} - ",
        timestamp(alert.ts),
        alert.note.as_str()
    );
    let json = serde_json::to_string(alert).unwrap_or_else(|e| {
        // Alerts hold strings, numbers and addresses: this cannot fail in practice.
        format!("{{\"error\":\"alert not serialisable: {e}\"}}")
    });
    ascii_json(&json, &mut out);
    truncate(&mut out, max_len);
    out
}

/// Appends `json` with every non-ASCII character as a `\u` escape (UTF-16, so characters
/// beyond the BMP become surrogate pairs). Non-ASCII characters can only occur inside
/// JSON strings, where such escapes mean the same.
fn ascii_json(json: &str, out: &mut String) {
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
}

fn truncate(s: &mut String, max_len: usize) {
    if s.len() > max_len {
        let mut end = max_len;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// RFC 3339 in UTC with microseconds, or the NILVALUE for a time before 1970 or not a
/// number.
pub fn timestamp(ts: f64) -> String {
    if !ts.is_finite() || ts < 0.0 || ts >= 253_402_300_800.0 {
        return "-".to_owned();
    }
    let micros = (ts * 1e6).round() as i64;
    let (secs, frac) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The host name as RFC 5424 allows it (printable ASCII, at most 255), or `-`.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "-".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = buf[..end]
        .iter()
        .filter(|b| (33..=126).contains(*b))
        .take(255)
        .map(|&b| char::from(b))
        .collect();
    if name.is_empty() {
        "-".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use serde_json::{Map, Value};

    use super::*;
    use crate::alerts::Note;

    fn alert(msg: &str) -> Alert {
        Alert {
            ts: 1_714_564_800.25,
            note: Note::LargeUpload,
            msg: msg.to_owned(),
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            first_seen: None,
            conn: None,
            figures: Map::new(),
            key: String::new(),
            quiet: None,
            conn_log: None,
        }
        .with("bytes", 123_456_789u64)
    }

    #[test]
    fn formats_rfc5424() {
        let m = format_message(&alert("big upload"), "gw1", 4242, UDP_MAX);
        let prefix = "<28>1 2024-05-01T12:00:00.250000Z gw1 egress-monitor 4242 LargeUpload - ";
        assert!(m.starts_with(prefix), "{m}");
        let json: Value = serde_json::from_str(&m[prefix.len()..]).unwrap();
        assert_eq!(json, serde_json::to_value(alert("big upload")).unwrap());
        assert_eq!(json["note"], "LargeUpload");
        assert_eq!(json["bytes"], 123_456_789u64);
    }

    #[test]
    fn msgid_is_the_note() {
        for note in Note::ALL {
            let a = Alert { note, ..alert("x") };
            let m = format_message(&a, "h", 1, UDP_MAX);
            let fields: Vec<&str> = m.splitn(8, ' ').collect();
            assert_eq!(fields[5], note.as_str());
            assert!(note.as_str().len() <= 32, "MSGID is at most 32 characters");
        }
    }

    #[test]
    fn non_ascii_is_escaped_and_means_the_same() {
        let a = alert("café → 🦀");
        let m = format_message(&a, "h", 1, UDP_MAX);
        assert!(m.is_ascii(), "{m}");
        assert!(m.contains(r"caf\u00e9 \u2192 \ud83e\udd80"), "{m}");
        let json: Value = serde_json::from_str(m.split_once(" - ").unwrap().1).unwrap();
        assert_eq!(json["msg"], "café → 🦀");
    }

    #[test]
    fn long_messages_are_truncated_to_the_bound() {
        let a = alert(&"x".repeat(5000));
        let m = format_message(&a, "h", 1, UDP_MAX);
        assert_eq!(m.len(), UDP_MAX);
        assert!(m.starts_with("<28>1 "));
        let whole = format_message(&a, "h", 1, UNIX_MAX);
        assert!(whole.len() < UNIX_MAX && whole.ends_with('}'), "{whole}");
        let mut s = "ab€".to_owned();
        truncate(&mut s, 4);
        assert_eq!(s, "ab", "never splits a character");
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0.0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(timestamp(951_782_400.5), "2000-02-29T00:00:00.500000Z");
        assert_eq!(
            timestamp(1_709_251_199.999_999),
            "2024-02-29T23:59:59.999999Z"
        );
        assert_eq!(
            timestamp(1_735_689_599.999_999_9),
            "2025-01-01T00:00:00.000000Z"
        );
        assert_eq!(timestamp(4_102_444_800.0), "2100-01-01T00:00:00.000000Z");
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e12] {
            assert_eq!(timestamp(bad), "-");
        }
    }

    #[test]
    fn hostname_is_printable_ascii() {
        let h = hostname();
        assert!(!h.is_empty() && h.len() <= 255);
        assert!(h.bytes().all(|b| (33..=126).contains(&b)), "{h:?}");
    }
}
