//! Active resolution of the host names in allowlists and exclusions: every address they
//! have (A and AAAA, through the system resolver), refreshed periodically and whenever a
//! reload changes the names. A failed lookup keeps the last good answer and is logged.

use std::{
    collections::HashMap,
    net::{IpAddr, ToSocketAddrs},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use log::{info, warn};

use crate::dns::cache::PassiveDns;

/// The addresses each configured host name resolved to last, as the resolver publishes
/// them.
pub type HostAddrs = HashMap<String, Vec<IpAddr>>;

/// The resolver's answers both ways: by name, and the names each address is one of, so
/// that a connection is matched by its address's few names, not by every listed name.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    by_name: HostAddrs,
    by_addr: foldhash::HashMap<IpAddr, Vec<String>>,
    /// Which answers these are: every set built gets its own, copies share it; empty
    /// answers may share 0.
    generation: u64,
}

/// The last [`Answers::generation`] given.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

impl From<HostAddrs> for Answers {
    fn from(by_name: HostAddrs) -> Self {
        let mut by_addr = foldhash::HashMap::<IpAddr, Vec<String>>::default();
        for (name, addrs) in &by_name {
            for addr in addrs {
                by_addr.entry(*addr).or_default().push(name.clone());
            }
        }
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            by_name,
            by_addr,
            generation,
        }
    }
}

/// The name tables host names are matched by, as one poll sees them: the resolver's
/// answers for the configured names, and passive DNS (the client's own lookups); for one
/// connection also the name its TLS or QUIC hello asked its server for. A name that never
/// resolved matches nothing.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    active: &'a Answers,
    passive: Option<&'a PassiveDns>,
    /// A connection's server address and the `server_name` its client sent there.
    server_name: Option<(IpAddr, &'a str)>,
}

impl<'a> Names<'a> {
    pub fn new(active: &'a Answers, passive: Option<&'a PassiveDns>) -> Self {
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

    /// The configured names that last resolved to `addr`.
    pub fn resolved_to(&self, addr: IpAddr) -> &'a [String] {
        self.active.by_addr.get(&addr).map_or(&[], Vec::as_slice)
    }

    /// The addresses configured name `name` last resolved to.
    pub fn addrs_of(&self, name: &str) -> &'a [IpAddr] {
        self.active.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// Which resolver answers these names are: the same generation, the same answers.
    pub fn generation(&self) -> u64 {
        self.active.generation
    }

    /// The names `client` gave `addr` itself: the one its hello asked `addr` for, and
    /// the one it resolved to `addr`.
    pub fn client_resolved(&self, client: IpAddr, addr: IpAddr) -> impl Iterator<Item = &'a str> {
        let hello = (self.server_name)
            .filter(|(server, _)| *server == addr)
            .map(|(_, name)| name);
        hello
            .into_iter()
            .chain(self.passive.and_then(|p| p.client_resolved(client, addr)))
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
pub struct Resolved {
    answers: Arc<Mutex<Arc<Answers>>>,
    hosts: Arc<(Mutex<Wanted>, Condvar)>,
}

/// The names to resolve, and whether they changed since the resolver last looked.
#[derive(Debug, Default)]
struct Wanted {
    hosts: Vec<String>,
    changed: bool,
}

impl Resolved {
    /// The answers as last published.
    pub fn snapshot(&self) -> Arc<Answers> {
        Arc::clone(&self.answers.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn publish(&self, answers: HostAddrs) {
        *self.answers.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(answers.into());
    }

    /// Resolves `hosts` from now on instead, at once: a reload's new names match from the
    /// first answer, not a [`REFRESH`] later.
    pub fn set_hosts(&self, hosts: Vec<String>) {
        let (lock, changed) = &*self.hosts;
        let mut current = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if current.hosts != hosts {
            *current = Wanted {
                hosts,
                changed: true,
            };
            changed.notify_one();
        }
    }

    /// The names to resolve after at most [`REFRESH`], or as soon as they change.
    fn next_hosts(&self) -> Vec<String> {
        let (lock, changed) = &*self.hosts;
        let current = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut current, _) = changed
            .wait_timeout_while(current, REFRESH, |wanted| !wanted.changed)
            .unwrap_or_else(PoisonError::into_inner);
        current.changed = false;
        current.hosts.clone()
    }
}

fn lookup(host: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut addrs: Vec<IpAddr> = (host, 0).to_socket_addrs()?.map(|sa| sa.ip()).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// `last` with every host looked up again; names no longer configured are dropped.
fn refresh(hosts: &[String], last: &HostAddrs) -> HostAddrs {
    let mut answers = last.clone();
    answers.retain(|host, _| hosts.contains(host));
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

/// Resolves every name once now, then in a background thread every [`REFRESH`] and
/// whenever [`Resolved::set_hosts`] changes them, publishing its answers through what
/// this returns.
pub fn start(hosts: Vec<String>) -> Resolved {
    let resolved = Resolved::default();
    if !hosts.is_empty() {
        resolved.publish(refresh(&hosts, &HostAddrs::new()));
        info!("resolving {} host names every {REFRESH:?}", hosts.len());
    }
    resolved
        .hosts
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .hosts = hosts;
    let published = resolved.clone();
    let spawned = thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            loop {
                let hosts = published.next_hosts();
                let last = published.snapshot().by_name.clone();
                published.publish(refresh(&hosts, &last));
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
        assert!(
            refresh(&[], &last).is_empty(),
            "a name no longer listed is forgotten"
        );
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
            &["198.18.5.0/24".parse().unwrap()],
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
