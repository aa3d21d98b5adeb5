//! Active resolution of the host names in allowlists and exclusions: every address they
//! have (A and AAAA, through the system resolver), refreshed periodically. A failed lookup
//! keeps the last good answer and is logged.

use std::{
    net::{IpAddr, ToSocketAddrs},
    thread,
    time::Duration,
};

use log::{info, warn};

use crate::rules::Names;

/// How often names are looked up again.
pub const REFRESH: Duration = Duration::from_secs(60);

fn lookup(host: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut addrs: Vec<IpAddr> = (host, 0).to_socket_addrs()?.map(|sa| sa.ip()).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

fn refresh(hosts: &[String], names: &Names) {
    for host in hosts {
        match lookup(host) {
            Ok(addrs) if !addrs.is_empty() => names.set(host, addrs),
            Ok(_) => warn!("{host} resolved to no address; keeping its last answer"),
            Err(err) => warn!("resolving {host} failed: {err}; keeping its last answer"),
        }
    }
}

/// Resolves every name once now, then again every [`REFRESH`] in a background thread.
pub fn start(hosts: Vec<String>, names: Names) {
    if hosts.is_empty() {
        return;
    }
    refresh(&hosts, &names);
    info!("resolving {} host names every {REFRESH:?}", hosts.len());
    let spawned = thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            loop {
                thread::sleep(REFRESH);
                refresh(&hosts, &names);
            }
        });
    if let Err(err) = spawned {
        warn!("cannot start the resolver thread ({err}): names keep their first answers");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_resolves_and_failures_keep_the_last_answer() {
        let names = Names::default();
        refresh(&["localhost".to_owned()], &names);
        assert!(names.has("localhost", "127.0.0.1".parse().unwrap()));
        names.set("no-such-host.invalid", vec!["192.0.2.1".parse().unwrap()]);
        refresh(&["no-such-host.invalid".to_owned()], &names);
        assert!(names.has("no-such-host.invalid", "192.0.2.1".parse().unwrap()));
    }
}
