//! Where an output sends: the one URL type of `--ipfix-collector`, `--syslog` and
//! `--alertmanager-url`, parsed by the `url` crate. Parsing has no side effects: a host
//! is looked up only when its user calls [`HostPort::resolve`].

use std::{
    fmt, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket},
    path::PathBuf,
};

use thiserror::Error;

/// A URL scheme an output may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Udp,
    Tcp,
    Unix,
    Http,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Unix => "unix",
            Self::Http => "http",
        }
    }

    /// The form errors show.
    fn form(self) -> &'static str {
        match self {
            Self::Udp => "udp://HOST:PORT",
            Self::Tcp => "tcp://HOST:PORT",
            Self::Unix => "unix:PATH",
            Self::Http => "http://HOST[:PORT][/PREFIX]",
        }
    }
}

/// A host, an IP address or a name not yet resolved, and a port (never 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// IPv6 addresses without their brackets.
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// The host's first address.
    pub fn resolve(&self) -> io::Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{self}: no address")))
    }
}

/// A UDP socket of `addr`'s family, on an ephemeral port, sending to `addr`.
pub fn udp_connected(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    Ok(socket)
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An output's destination as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// `udp://HOST:PORT`, HOST an IPv4 address, `[IPv6]` or a name; a trailing `/` is
    /// allowed.
    Udp(HostPort),
    /// `tcp://HOST:PORT`, as for UDP.
    Tcp(HostPort),
    /// `unix:PATH` or `unix://` followed by an absolute path; the path as written (not
    /// percent-decoded).
    Unix(PathBuf),
    /// `http://HOST[:PORT][/PREFIX]` as written, less trailing `/`s: the base of an API.
    Http(String),
}

/// Why a URL was refused, and the forms the flag takes.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{reason}; expected {expected}")]
pub struct UrlError {
    reason: String,
    expected: String,
}

impl Url {
    /// `text` if its scheme is one of `accepted` and it is well formed for it.
    pub fn parse(text: &str, accepted: &[Scheme]) -> Result<Self, UrlError> {
        let err = |reason: String| UrlError {
            reason,
            expected: accepted
                .iter()
                .map(|s| s.form())
                .collect::<Vec<_>>()
                .join(" or "),
        };
        // The url crate would drop these silently; the unix path and the HTTP base are
        // taken from `text` as written.
        if text.trim() != text || text.contains(char::is_control) {
            return Err(err("spaces around it or control characters".into()));
        }
        // The scheme first, so that a URL for another output is named as such.
        let (name, rest) = text
            .split_once(':')
            .ok_or_else(|| err("missing scheme".into()))?;
        let scheme = accepted
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| err(format!("unknown scheme {name:?}")))?;
        let url = url::Url::parse(text).map_err(|e| err(e.to_string()))?;
        let parsed = match scheme {
            Scheme::Udp => host_port(&url).map(Self::Udp),
            Scheme::Tcp => host_port(&url).map(Self::Tcp),
            Scheme::Unix => unix_path(rest).map(Self::Unix),
            Scheme::Http => http_base(&url, text).map(Self::Http),
        };
        parsed.map_err(|reason| err(reason.into()))
    }

    /// [`Url::parse`] as a flag's value parser.
    pub fn parser(
        accepted: &'static [Scheme],
    ) -> impl Fn(&str) -> Result<Self, UrlError> + Clone + Send + Sync + 'static {
        move |text| Self::parse(text, accepted)
    }
}

fn host_port(url: &url::Url) -> Result<HostPort, &'static str> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err("user info is not allowed");
    }
    let host = match url.host() {
        Some(url::Host::Domain("")) | None => return Err("missing host"),
        Some(url::Host::Domain(name)) => name.to_owned(),
        Some(url::Host::Ipv4(addr)) => addr.to_string(),
        Some(url::Host::Ipv6(addr)) => addr.to_string(),
    };
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("nothing may follow the port");
    }
    match url.port() {
        None => Err("missing :PORT"),
        Some(0) => Err("port 0"),
        Some(port) => Ok(HostPort { host, port }),
    }
}

/// `rest` is what follows `unix:`.
fn unix_path(rest: &str) -> Result<PathBuf, &'static str> {
    let path = match rest.strip_prefix("//") {
        Some(path) if path.starts_with('/') => path,
        Some(_) => return Err("unix:// must be followed by an absolute path"),
        None => rest,
    };
    if path.is_empty() {
        return Err("missing path");
    }
    Ok(PathBuf::from(path))
}

fn http_base(url: &url::Url, text: &str) -> Result<String, &'static str> {
    if url.host_str().is_none_or(str::is_empty) {
        return Err("missing host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment cannot prefix an API path");
    }
    Ok(text.trim_end_matches('/').to_owned())
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Udp(at) => write!(f, "udp://{at}"),
            Self::Tcp(at) => write!(f, "tcp://{at}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Http(base) => f.write_str(base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[Scheme] = &[Scheme::Udp, Scheme::Tcp, Scheme::Unix, Scheme::Http];

    fn parse(text: &str) -> Result<Url, UrlError> {
        Url::parse(text, ALL)
    }

    fn at(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn udp_and_tcp() {
        for (text, want) in [
            ("udp://127.0.0.1:514", Url::Udp(at("127.0.0.1", 514))),
            ("tcp://127.0.0.1:4739", Url::Tcp(at("127.0.0.1", 4739))),
            (
                "udp://logs.example.org:514/",
                Url::Udp(at("logs.example.org", 514)),
            ),
            ("tcp://collector:65535", Url::Tcp(at("collector", 65535))),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn ipv6_literals() {
        assert_eq!(parse("udp://[::1]:5514"), Ok(Url::Udp(at("::1", 5514))));
        assert_eq!(
            parse("tcp://[2001:db8::1]:4739"),
            Ok(Url::Tcp(at("2001:db8::1", 4739)))
        );
        assert_eq!(
            parse("tcp://[2001:db8::1]:4739").unwrap().to_string(),
            "tcp://[2001:db8::1]:4739"
        );
    }

    #[test]
    fn unix_paths() {
        assert_eq!(parse("unix:/dev/log"), Ok(Url::Unix("/dev/log".into())));
        assert_eq!(
            parse("unix:///run/syslog.sock"),
            Ok(Url::Unix("/run/syslog.sock".into()))
        );
        assert_eq!(
            parse("unix:relative/log"),
            Ok(Url::Unix("relative/log".into()))
        );
        assert_eq!(
            parse("unix:/run/my log?#%20"),
            Ok(Url::Unix("/run/my log?#%20".into())),
            "the path as written"
        );
        assert_eq!(parse("unix:/dev/log").unwrap().to_string(), "unix:/dev/log");
    }

    #[test]
    fn http_bases() {
        for (text, base) in [
            ("http://127.0.0.1:9093/", "http://127.0.0.1:9093"),
            ("http://am.example", "http://am.example"),
            ("http://[::1]:9093", "http://[::1]:9093"),
            (
                "http://am.example:9093/alertmanager//",
                "http://am.example:9093/alertmanager",
            ),
            ("http://AM.example:80/Prefix", "http://AM.example:80/Prefix"),
        ] {
            assert_eq!(parse(text), Ok(Url::Http(base.into())), "{text}");
            assert_eq!(parse(text).unwrap().to_string(), base);
        }
    }

    #[test]
    fn resolves_literals_without_lookups() {
        assert_eq!(
            at("127.0.0.1", 4739).resolve().unwrap(),
            "127.0.0.1:4739".parse().unwrap()
        );
        assert_eq!(
            at("2001:db8::1", 4739).resolve().unwrap(),
            "[2001:db8::1]:4739".parse().unwrap()
        );
    }

    #[test]
    fn udp_sockets_of_the_destinations_family() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = udp_connected(receiver.local_addr().unwrap()).unwrap();
        assert!(socket.local_addr().unwrap().is_ipv4());
        socket.send(b"x").unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(receiver.recv(&mut buf).unwrap(), 1);
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        if let Ok(socket) = udp_connected(v6) {
            assert!(socket.local_addr().unwrap().is_ipv6());
        }
    }

    #[test]
    fn only_the_accepted_schemes() {
        let syslog = [Scheme::Udp, Scheme::Unix];
        assert!(Url::parse("unix:/dev/log", &syslog).is_ok());
        let err = Url::parse("tcp://127.0.0.1:514", &syslog).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown scheme \"tcp\"; expected udp://HOST:PORT or unix:PATH"
        );
        let err = Url::parse("http://am:port", &[Scheme::Udp, Scheme::Tcp]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown scheme \"http\"; expected udp://HOST:PORT or tcp://HOST:PORT"
        );
    }

    #[test]
    fn refuses_bad_urls_saying_why() {
        for (text, reason) in [
            ("sctp://127.0.0.1:4739", "unknown scheme \"sctp\""),
            ("https://am.example:9093", "unknown scheme \"https\""),
            ("UDP://127.0.0.1:514", "unknown scheme \"UDP\""),
            ("/dev/log", "missing scheme"),
            ("127.0.0.1:4739", "unknown scheme \"127.0.0.1\""),
            (" udp://127.0.0.1:514", "spaces"),
            ("udp://127.0.0.1:514\n", "spaces"),
            ("udp://127.0.0.1", "missing :PORT"),
            ("udp://127.0.0.1:", "missing :PORT"),
            ("tcp://[::1]", "missing :PORT"),
            ("udp://127.0.0.1:0", "port 0"),
            ("udp://127.0.0.1:65536", "invalid port"),
            ("udp://127.0.0.1:port", "invalid port"),
            ("udp://:514", "host"),
            ("udp://", "host"),
            ("udp:127.0.0.1:514", "missing host"),
            ("udp://::1:514", "empty host"),
            ("udp://[::1:514", "invalid IPv6"),
            ("udp://[1.2.3.4]:514", "invalid IPv6"),
            ("udp://user@host:514", "user info"),
            ("tcp://127.0.0.1:4739/x", "nothing may follow"),
            ("udp://127.0.0.1:514?x", "nothing may follow"),
            ("unix:", "missing path"),
            ("unix://", "absolute path"),
            ("unix://dev/log", "absolute path"),
            ("http://", "host"),
            ("http://café.example", "international domain name"),
            ("http://am.example:port", "invalid port"),
            ("http://am.example/?x=1", "query or fragment"),
            ("http://am.example/#top", "query or fragment"),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(reason),
                "{text}: {reason:?} missing from {err:?}"
            );
        }
    }
}
