//! Address matching for allowlists and exclusions: networks, and host names through the
//! addresses they last resolved to, or through what the client itself resolved (passive
//! DNS), which `*.suffix` patterns match only.

use std::net::IpAddr;

use crate::{
    resolve::Names,
    rules::{
        RulesConfig,
        targets::{AddrSpec, AllowPair, AllowService, Service},
    },
};

/// `name` is `suffix` or a name under it.
fn is_under(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .is_some_and(|head| head.ends_with('.'))
}

/// Whether `addr`, as reached by `client`, matches `spec`.
fn spec_matches(spec: &AddrSpec, names: Names, client: IpAddr, addr: IpAddr) -> bool {
    match spec {
        AddrSpec::Net(net) => net.contains(&addr),
        AddrSpec::Host(host) => {
            names.has(host, addr) || names.client_resolved(client, addr, |n| n == host)
        }
        AddrSpec::Suffix(suffix) => names.client_resolved(client, addr, |n| is_under(n, suffix)),
    }
}

/// Any of a list of networks and host names.
#[derive(Clone, Debug)]
pub struct AddrMatcher {
    specs: Vec<AddrSpec>,
}

impl AddrMatcher {
    pub fn new(specs: Vec<AddrSpec>) -> Self {
        Self { specs }
    }

    /// Whether `addr`, as reached by `client`, matches any spec by `names`.
    pub fn matches(&self, names: Names, client: IpAddr, addr: IpAddr) -> bool {
        self.specs
            .iter()
            .any(|s| spec_matches(s, names, client, addr))
    }
}

/// What RestrictedOutbound allows, as given: `--allow-dst`, `--allow-service`,
/// `--allow-pair`.
#[derive(Clone, Debug, Default)]
pub struct Allowed {
    pub dst: Vec<AddrSpec>,
    pub services: Vec<AllowService>,
    pub pairs: Vec<AllowPair>,
}

/// RestrictedOutbound's allowlists.
#[derive(Clone, Debug)]
pub struct Allowlist {
    dst: AddrMatcher,
    services: Vec<AllowService>,
    pairs: Vec<AllowPair>,
}

impl Allowlist {
    pub fn new(allowed: &Allowed) -> Self {
        Self {
            dst: AddrMatcher::new(allowed.dst.clone()),
            services: allowed.services.clone(),
            pairs: allowed.pairs.clone(),
        }
    }

    /// Whether a connection from `src` to `dst` on `service` is allowed, by `names`.
    pub fn covers(&self, names: Names, src: IpAddr, dst: IpAddr, service: Service) -> bool {
        self.dst.matches(names, src, dst)
            || self
                .services
                .iter()
                .any(|s| s.service == service && s.dst.contains(&dst))
            || self.pairs.iter().any(|p| {
                spec_matches(&p.src, names, src, src) && spec_matches(&p.dst, names, src, dst)
            })
    }
}

/// Every host name the rules' flags mention, for the resolver.
pub fn host_names(config: &RulesConfig) -> Vec<String> {
    let allowed = &config.allowed;
    let pairs = allowed.pairs.iter().flat_map(|p| [&p.src, &p.dst]);
    let mut hosts: Vec<String> = allowed
        .dst
        .iter()
        .chain(pairs)
        .chain(&config.exclude_dst)
        .filter_map(|spec| match spec {
            AddrSpec::Host(host) => Some(host.clone()),
            AddrSpec::Net(_) | AddrSpec::Suffix(_) => None,
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}
