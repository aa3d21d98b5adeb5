//! Address matching for allowlists and exclusions: networks, and host names through the
//! addresses they last resolved to, or through what the client itself resolved (passive
//! DNS), which `*.suffix` patterns match only.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{
    dns::cache::PassiveDns,
    rules::{
        RulesConfig,
        targets::{AddrSpec, AllowPair, AllowService, Service},
    },
};

/// The addresses each configured host name resolved to last (filled by the resolver),
/// and the passive DNS map (filled from the client's own lookups); read by rules. A name
/// that never resolved matches nothing.
#[derive(Clone, Debug, Default)]
pub struct Names {
    active: Arc<RwLock<HashMap<String, Vec<IpAddr>>>>,
    passive: Option<Arc<RwLock<PassiveDns>>>,
}

impl Names {
    pub fn with_passive(passive: Arc<RwLock<PassiveDns>>) -> Self {
        Self {
            active: Arc::default(),
            passive: Some(passive),
        }
    }

    pub fn set(&self, host: &str, addrs: Vec<IpAddr>) {
        self.active
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_owned(), addrs);
    }

    pub fn has(&self, host: &str, addr: IpAddr) -> bool {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .is_some_and(|addrs| addrs.contains(&addr))
    }

    /// Whether `client` itself resolved a name that `matches` accepts to `addr`.
    fn client_resolved(
        &self,
        client: IpAddr,
        addr: IpAddr,
        matches: impl Fn(&str) -> bool,
    ) -> bool {
        self.passive.as_ref().is_some_and(|p| {
            p.read()
                .unwrap_or_else(|e| e.into_inner())
                .client_resolved(client, addr, matches)
        })
    }
}

/// `name` is `suffix` or a name under it.
fn is_under(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .is_some_and(|head| head.ends_with('.'))
}

/// Whether `addr`, as reached by `client`, matches `spec`.
fn spec_matches(spec: &AddrSpec, client: IpAddr, addr: IpAddr, names: &Names) -> bool {
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
    names: Names,
}

impl AddrMatcher {
    pub fn new(specs: Vec<AddrSpec>, names: Names) -> Self {
        Self { specs, names }
    }

    /// Whether `addr`, as reached by `client`, matches any spec.
    pub fn matches(&self, client: IpAddr, addr: IpAddr) -> bool {
        self.specs
            .iter()
            .any(|s| spec_matches(s, client, addr, &self.names))
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

/// RestrictedOutbound's allowlists, with the names they match by.
#[derive(Clone, Debug)]
pub struct Allowlist {
    dst: AddrMatcher,
    services: Vec<AllowService>,
    pairs: Vec<AllowPair>,
    names: Names,
}

impl Allowlist {
    pub fn new(allowed: &Allowed, names: Names) -> Self {
        Self {
            dst: AddrMatcher::new(allowed.dst.clone(), names.clone()),
            services: allowed.services.clone(),
            pairs: allowed.pairs.clone(),
            names,
        }
    }

    /// Whether a connection from `src` to `dst` on `service` is allowed.
    pub fn covers(&self, src: IpAddr, dst: IpAddr, service: Service) -> bool {
        self.dst.matches(src, dst)
            || self
                .services
                .iter()
                .any(|s| s.service == service && s.dst.contains(&dst))
            || self.pairs.iter().any(|p| {
                spec_matches(&p.src, src, src, &self.names)
                    && spec_matches(&p.dst, src, dst, &self.names)
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
