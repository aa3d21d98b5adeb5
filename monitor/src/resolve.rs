//! Active resolution of the host names in allowlists and exclusions: every address they
//! have (A and AAAA, through the system resolver), refreshed periodically. A failed lookup
//! keeps the last good answer and is logged.

use std::{
    collections::HashMap,
    net::{IpAddr, ToSocketAddrs},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::Duration,
};

use log::{info, warn};

use crate::dns::cache::PassiveDns;

/// The addresses each configured host name resolved to last, as the resolver publishes
/// them.
pub type HostAddrs = HashMap<String, Vec<IpAddr>>;

/// The name tables host names are matched by, as one poll sees them: the resolver's
/// answers for the configured names, and passive DNS (the client's own lookups); for one
/// connection also the name its TLS or QUIC hello asked its server for. A name that never
/// resolved matches nothing.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    active: &'a HostAddrs,
    passive: Option<&'a PassiveDns>,
    /// A connection's server address and the `server_name` its client sent there.
    server_name: Option<(IpAddr, &'a str)>,
}

impl<'a> Names<'a> {
    pub fn new(active: &'a HostAddrs, passive: Option<&'a PassiveDns>) -> Self {
        Self {
            active,
            passive,
            server_name: None,
        }
    }

    /// The same tables, and `name` for `server`: what a connection's client asked for in
    /// its hello, matched as a name it resolved itself.
    pub fn with_server_name(self, server: IpAddr, name: &'a str) -> Self {
        Self {
            server_name: Some((server, name)),
            ..self
        }
    }

    pub fn has(&self, host: &str, addr: IpAddr) -> bool {
        self.active
            .get(host)
            .is_some_and(|addrs| addrs.contains(&addr))
    }

    /// Whether `client` itself resolved a name that `matches` accepts to `addr`, or
    /// named `addr` so in its hello.
    pub fn client_resolved(
        &self,
        client: IpAddr,
        addr: IpAddr,
        matches: impl Fn(&str) -> bool,
    ) -> bool {
        self.server_name
            .is_some_and(|(server, name)| server == addr && matches(name))
            || self
                .passive
                .is_some_and(|p| p.client_resolved(client, addr, matches))
    }

    /// The name `local` resolved for `remote`, else anyone's name for it, unexpired at
    /// kernel time `now_ns`; else the name the hello gave `remote`.
    pub fn fqdn(&self, local: IpAddr, remote: IpAddr, now_ns: u64) -> Option<String> {
        self.passive
            .and_then(|p| p.name(local, remote, now_ns))
            .or_else(|| {
                self.server_name
                    .filter(|(server, _)| *server == remote)
                    .map(|(_, name)| name.to_owned())
            })
    }
}

/// How often names are looked up again.
pub const REFRESH: Duration = Duration::from_secs(60);

/// The resolver's answers, published whole at each refresh: a snapshot stays as it was
/// taken, whatever the resolver publishes later.
#[derive(Clone, Debug, Default)]
pub struct Resolved(Arc<Mutex<Arc<HostAddrs>>>);

impl Resolved {
    /// The answers as last published.
    pub fn snapshot(&self) -> Arc<HostAddrs> {
        Arc::clone(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn publish(&self, answers: HostAddrs) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(answers);
    }
}

fn lookup(host: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut addrs: Vec<IpAddr> = (host, 0).to_socket_addrs()?.map(|sa| sa.ip()).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// `last` with every host looked up again.
fn refresh(hosts: &[String], last: &HostAddrs) -> HostAddrs {
    let mut answers = last.clone();
    for host in hosts {
        match lookup(host) {
            Ok(addrs) if !addrs.is_empty() => {
                answers.insert(host.clone(), addrs);
            }
            Ok(_) => warn!("{host} resolved to no address; keeping its last answer"),
            Err(err) => warn!("resolving {host} failed: {err}; keeping its last answer"),
        }
    }
    answers
}

/// Resolves every name once now, then again every [`REFRESH`] in a background thread,
/// which publishes its answers through what this returns.
pub fn start(hosts: Vec<String>) -> Resolved {
    let resolved = Resolved::default();
    if hosts.is_empty() {
        return resolved;
    }
    resolved.publish(refresh(&hosts, &HostAddrs::new()));
    info!("resolving {} host names every {REFRESH:?}", hosts.len());
    let published = resolved.clone();
    let spawned = thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            loop {
                thread::sleep(REFRESH);
                published.publish(refresh(&hosts, &published.snapshot()));
            }
        });
    if let Err(err) = spawned {
        warn!("cannot start the resolver thread ({err}): names keep their first answers");
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn localhost_resolves_and_failures_keep_the_last_answer() {
        let answers = refresh(&["localhost".to_owned()], &HostAddrs::new());
        assert!(answers["localhost"].contains(&ip("127.0.0.1")));
        let last = HostAddrs::from([("no-such-host.invalid".to_owned(), vec![ip("192.0.2.1")])]);
        let answers = refresh(&["no-such-host.invalid".to_owned()], &last);
        assert_eq!(answers, last);
    }

    /// A poll judges by the snapshot it took: answers published meanwhile wait for the
    /// next poll's.
    #[test]
    fn a_refresh_is_seen_from_the_next_snapshot_on() {
        use crate::rules::{
            RestrictedOutbound,
            allowlist::{Allowed, Allowlist},
            targets::AddrSpec,
            testkit::{ConnSpec, at, update_named},
        };
        let allowed = Allowed {
            dst: vec![AddrSpec::Host("backup.example.com".to_owned())],
            ..Allowed::default()
        };
        let mut rule = RestrictedOutbound::new(
            vec!["198.18.5.0/24".parse().unwrap()],
            Allowlist::new(&allowed),
            Duration::from_secs(60),
        );
        let conn = |uid| {
            ConnSpec {
                orig: ("198.18.5.7", 40000),
                resp: ("192.0.2.7", 22),
                orig_bytes: 100,
                uid,
                ..ConnSpec::default()
            }
            .conn()
        };
        let resolved = Resolved::default();
        let taken = resolved.snapshot();
        resolved.publish(HostAddrs::from([(
            "backup.example.com".to_owned(),
            vec![ip("192.0.2.7")],
        )]));
        let alerts = update_named(&mut rule, &conn("C1"), at(1.0), Names::new(&taken, None));
        assert_eq!(alerts.len(), 1, "published after the snapshot");
        let next = resolved.snapshot();
        let alerts = update_named(&mut rule, &conn("C2"), at(2.0), Names::new(&next, None));
        assert!(alerts.is_empty(), "the next snapshot has it");
    }
}
