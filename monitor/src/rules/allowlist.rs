//! Address matching for allowlists, exclusions and intel lists: networks by longest
//! prefix in a trie, host names through the addresses they last resolved to, or through
//! what the client itself resolved (passive DNS), which `*.suffix` patterns match only.
//! Resolved names are found by the address, in a table of the listed hosts' addresses
//! built again for each generation of the resolver's answers; the client's names by hash,
//! the name and each of its parent domains. So a list of 100,000 entries costs a
//! connection what one of 10 does.

use std::{cell::RefCell, collections::hash_map::Entry, net::IpAddr};

use foldhash::{HashMap, HashMapExt as _};
use ipnet::IpNet;
use prefix_trie::joint::map::JointPrefixMap;

use crate::{
    resolve::Names,
    rules::{
        Lists,
        targets::{AddrSpec, AllowPair, AllowService, Service},
    },
};

/// Networks, each with a value; an address finds the most specific that holds it.
#[derive(Clone, Debug)]
pub struct NetSet<V = ()>(JointPrefixMap<IpNet, V>);

impl<V> Default for NetSet<V> {
    fn default() -> Self {
        Self(JointPrefixMap::new())
    }
}

impl<V> NetSet<V> {
    /// The first value given for a network is kept.
    pub fn insert(&mut self, net: IpNet, value: V) {
        if self.0.get(&net).is_none() {
            self.0.insert(net, value);
        }
    }

    /// The most specific network holding `addr`, and its value.
    pub fn find(&self, addr: IpAddr) -> Option<(IpNet, &V)> {
        self.0.get_lpm(&IpNet::from(addr))
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.find(addr).is_some()
    }
}

impl FromIterator<IpNet> for NetSet {
    fn from_iter<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        let mut set = Self::default();
        for net in nets {
            set.insert(net, ());
        }
        set
    }
}

/// `name`'s parent domains, nearest first: `a.b.c` gives `b.c`, then `c`.
fn parents(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.').map(|(at, _)| &name[at + 1..])
}

/// Networks, host names and `*.suffix` patterns, each with a value (where it was listed,
/// for intel lists).
#[derive(Clone, Debug)]
pub struct AddrMatcher<V = ()> {
    nets: NetSet<V>,
    /// Each host name's value, as its place in `values`.
    hosts: HashMap<String, usize>,
    values: Vec<V>,
    suffixes: HashMap<String, V>,
    /// The hosts by the addresses they resolved to, for the answers last matched by.
    resolved: RefCell<ByAddr>,
}

/// The listed host each address stands for in one generation of the resolver's answers:
/// the first listed of the names it resolved from, in the order the answers give them.
/// One lookup of the address finds it, where going by name takes a lookup of the
/// address and one of each of its names, strings whose hashing and comparing miss the
/// caches more as lists grow.
#[derive(Clone, Debug, Default)]
struct ByAddr {
    generation: u64,
    hosts: HashMap<IpAddr, usize>,
}

impl ByAddr {
    fn new(hosts: &HashMap<String, usize>, names: Names) -> Self {
        let mut by_addr = HashMap::new();
        for addr in hosts.keys().flat_map(|host| names.addrs_of(host)) {
            if by_addr.contains_key(addr) {
                continue;
            }
            let first = names.resolved_to(*addr).iter().find_map(|n| hosts.get(n));
            by_addr.extend(first.map(|&host| (*addr, host)));
        }
        Self {
            generation: names.generation(),
            hosts: by_addr,
        }
    }
}

impl<V> Default for AddrMatcher<V> {
    fn default() -> Self {
        Self {
            nets: NetSet::default(),
            hosts: HashMap::new(),
            values: Vec::new(),
            suffixes: HashMap::new(),
            resolved: RefCell::default(),
        }
    }
}

impl AddrMatcher {
    pub fn new(specs: Vec<AddrSpec>) -> Self {
        specs.into_iter().map(|spec| (spec, ())).collect()
    }

    /// Whether `addr`, as reached by `client`, matches any spec by `names`.
    pub fn matches(&self, names: Names, client: IpAddr, addr: IpAddr) -> bool {
        self.find(names, client, addr).is_some()
    }
}

impl<V> AddrMatcher<V> {
    /// The value of a spec `addr`, as reached by `client`, matches by `names`: the most
    /// specific network first, then a name the address resolved to, then a name the
    /// client gave it (exact, then its nearest listed parent domain).
    pub fn find(&self, names: Names, client: IpAddr, addr: IpAddr) -> Option<&V> {
        if let Some((_, value)) = self.nets.find(addr) {
            return Some(value);
        }
        if let Some(host) = self.resolved_host(names, addr) {
            return Some(&self.values[host]);
        }
        names.client_resolved(client, addr).find_map(|name| {
            (self.hosts.get(name).map(|&host| &self.values[host]))
                .or_else(|| parents(name).find_map(|parent| self.suffixes.get(parent)))
        })
    }

    /// The listed host `addr` resolved from, by `names`' answers.
    fn resolved_host(&self, names: Names, addr: IpAddr) -> Option<usize> {
        if self.hosts.is_empty() {
            return None;
        }
        let mut resolved = self.resolved.borrow_mut();
        if resolved.generation != names.generation() {
            *resolved = ByAddr::new(&self.hosts, names);
        }
        resolved.hosts.get(&addr).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.0.is_empty() && self.hosts.is_empty() && self.suffixes.is_empty()
    }
}

impl<V> FromIterator<(AddrSpec, V)> for AddrMatcher<V> {
    /// The first value given for a spec is kept.
    fn from_iter<I: IntoIterator<Item = (AddrSpec, V)>>(specs: I) -> Self {
        let mut matcher = Self::default();
        for (spec, value) in specs {
            match spec {
                AddrSpec::Net(net) => matcher.nets.insert(net, value),
                AddrSpec::Host(host) => {
                    if let Entry::Vacant(vacant) = matcher.hosts.entry(host) {
                        vacant.insert(matcher.values.len());
                        matcher.values.push(value);
                    }
                }
                AddrSpec::Suffix(suffix) => {
                    matcher.suffixes.entry(suffix).or_insert(value);
                }
            }
        }
        matcher
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

/// RestrictedOutbound's allowlists. Services are found by the connection's service, pairs
/// by their source: what a connection costs grows with the distinct pair sources only.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    dst: AddrMatcher,
    services: HashMap<Service, NetSet>,
    pairs: Vec<(AddrMatcher, AddrMatcher)>,
}

impl Allowlist {
    pub fn new(allowed: &Allowed) -> Self {
        let mut services: HashMap<Service, NetSet> = HashMap::new();
        for s in &allowed.services {
            services.entry(s.service).or_default().insert(s.dst, ());
        }
        let mut by_src: HashMap<&AddrSpec, Vec<AddrSpec>> = HashMap::new();
        for pair in &allowed.pairs {
            by_src.entry(&pair.src).or_default().push(pair.dst.clone());
        }
        let pairs = by_src
            .into_iter()
            .map(|(src, dsts)| (AddrMatcher::new(vec![src.clone()]), AddrMatcher::new(dsts)))
            .collect();
        Self {
            dst: AddrMatcher::new(allowed.dst.clone()),
            services,
            pairs,
        }
    }

    /// Whether a connection from `src` to `dst` on `service` is allowed, by `names`.
    pub fn covers(&self, names: Names, src: IpAddr, dst: IpAddr, service: Service) -> bool {
        self.dst.matches(names, src, dst)
            || self
                .services
                .get(&service)
                .is_some_and(|nets| nets.contains(dst))
            || self
                .pairs
                .iter()
                .any(|(from, to)| from.matches(names, src, src) && to.matches(names, src, dst))
    }
}

/// Every host name the lists mention, for the resolver.
pub fn host_names(lists: &Lists) -> Vec<String> {
    let allowed = &lists.allowed;
    let pairs = allowed.pairs.iter().flat_map(|p| [&p.src, &p.dst]);
    let intel = lists.intel.iter().map(|(spec, _)| spec);
    let mut hosts: Vec<String> = allowed
        .dst
        .iter()
        .chain(pairs)
        .chain(&lists.exclude_dst)
        .chain(intel)
        .filter_map(|spec| match spec {
            AddrSpec::Host(host) => Some(host.clone()),
            AddrSpec::Net(_) | AddrSpec::Suffix(_) => None,
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dns::cache::PassiveDns,
        resolve::{Answers, HostAddrs},
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Networks go by longest prefix; names by hash on the name and its parents, whatever
    /// the list's size.
    #[test]
    fn nets_by_longest_prefix_and_names_by_their_parents() {
        let specs = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "2001:db8::/32",
            "db.example.test",
            "*.cdn.test",
        ];
        let matcher: AddrMatcher<usize> = specs
            .iter()
            .enumerate()
            .map(|(line, s)| (s.parse().unwrap(), line + 1))
            .collect();
        let active = Answers::from(HostAddrs::from([(
            "db.example.test".to_owned(),
            vec![ip("192.0.2.5")],
        )]));
        let mut passive = PassiveDns::new(
            std::num::NonZeroUsize::new(10).unwrap(),
            std::time::Duration::from_secs(3600),
        );
        let client = ip("198.18.0.2");
        for (name, addr) in [
            ("a.b.cdn.test", [203, 0, 113, 1]),
            ("cdn.test", [203, 0, 113, 2]),
        ] {
            let wire = crate::dns::parse::tests::message(
                1,
                true,
                0,
                name.as_bytes(),
                1,
                &[(name.as_bytes(), 60, 1, addr.to_vec())],
            );
            let msg = crate::dns::parse::parse_message(&wire).unwrap();
            passive.learn(client, &msg, 0);
        }
        let names = Names::new(&active, Some(&passive));
        let found = |addr: &str| matcher.find(names, client, ip(addr)).copied();
        assert_eq!(found("10.2.3.4"), Some(1));
        assert_eq!(found("10.1.3.4"), Some(2), "the most specific network");
        assert_eq!(found("2001:db8::1"), Some(3));
        assert_eq!(found("192.0.2.5"), Some(4), "resolved actively");
        assert_eq!(found("203.0.113.1"), Some(5), "under *.cdn.test");
        assert_eq!(
            found("203.0.113.2"),
            None,
            "*.cdn.test is not cdn.test itself"
        );
        assert_eq!(found("11.0.0.1"), None);
        let other = ip("198.18.0.3");
        assert_eq!(
            matcher.find(names, other, ip("203.0.113.1")),
            None,
            "not its own answer"
        );
    }

    /// A small generator, so that every run draws the same cases.
    struct Draw(u64);

    impl Draw {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.below(from.len())]
        }

        /// One of few addresses, so that networks overlap and names share addresses.
        fn addr(&mut self) -> IpAddr {
            if self.below(2) == 0 {
                let [a, b, c, d] = [[10, 11], [0, 1], [0, 1], [0, 1]].map(|x| self.pick(&x));
                IpAddr::from([a, b, c, self.pick(&[d, 2, 255])])
            } else {
                let net = self.pick(&[0, 1]);
                let host = self.pick(&[0, 1, 2, 0xffff]);
                IpAddr::from([0x2001, 0xdb8, net, 0, 0, 0, 0, host])
            }
        }

        fn spec(&mut self) -> AddrSpec {
            const NAMES: [&str; 4] = ["h0.t", "h1.t", "h2.s0.t", "s0.t"];
            match self.below(3) {
                0 => {
                    let addr = self.addr();
                    let len = match addr {
                        IpAddr::V4(_) => self.pick(&[0, 1, 8, 15, 16, 23, 24, 31, 32]),
                        IpAddr::V6(_) => self.pick(&[0, 1, 32, 47, 48, 64, 127, 128]),
                    };
                    AddrSpec::Net(IpNet::new(addr, len).unwrap().trunc())
                }
                1 => AddrSpec::Host(self.pick(&NAMES).to_owned()),
                _ => AddrSpec::Suffix(self.pick(&["t", "s0.t", "h0.t"]).to_owned()),
            }
        }

        /// Answers for the listed names and one more, each with up to three addresses.
        fn answers(&mut self) -> Answers {
            let mut by_name = HostAddrs::new();
            for name in ["h0.t", "h1.t", "h2.s0.t", "s0.t", "unlisted.t"] {
                if self.below(4) != 0 {
                    let addrs = (0..self.below(4)).map(|_| self.addr()).collect();
                    by_name.insert(name.to_owned(), addrs);
                }
            }
            Answers::from(by_name)
        }
    }

    /// What a matcher must find, by scanning every entry: the most specific network
    /// (the first given of equal ones), then the first listed of the names the address
    /// resolved to, then a name the client gave it, exact or by its nearest listed parent.
    fn scan(
        specs: &[(AddrSpec, usize)],
        names: Names,
        client: IpAddr,
        addr: IpAddr,
    ) -> Option<usize> {
        let first = |want: &AddrSpec| specs.iter().find(|(spec, _)| spec == want).map(|(_, v)| *v);
        let host = |name: &str| first(&AddrSpec::Host(name.to_owned()));
        let suffix = |name: &str| first(&AddrSpec::Suffix(name.to_owned()));
        let nets = specs.iter().filter_map(|(spec, value)| match spec {
            AddrSpec::Net(net) if net.contains(&addr) => Some((net.prefix_len(), *value)),
            _ => None,
        });
        let longest = nets.max_by_key(|&(len, value)| (len, std::cmp::Reverse(value)));
        longest
            .map(|(_, value)| value)
            .or_else(|| names.resolved_to(addr).iter().find_map(|name| host(name)))
            .or_else(|| {
                names
                    .client_resolved(client, addr)
                    .find_map(|name| host(name).or_else(|| parents(name).find_map(suffix)))
            })
    }

    /// Over random lists, answers and addresses, v4 and v6, /0 to /32 and /128 with
    /// overlapping networks, names sharing addresses: the matcher finds what a scan of
    /// every entry does, also as the answers it matches by change and change back.
    #[test]
    fn finds_what_a_scan_of_every_entry_finds() {
        let mut draw = Draw(0x2545_f491_4f6c_dd1d);
        let client = ip("198.18.0.2");
        for _ in 0..300 {
            let specs: Vec<(AddrSpec, usize)> = (0..draw.below(12))
                .map(|value| (draw.spec(), value))
                .collect();
            let matcher: AddrMatcher<usize> = specs.iter().cloned().collect();
            let answers = [draw.answers(), draw.answers()];
            for round in [0, 1, 0] {
                for _ in 0..20 {
                    let addr = draw.addr();
                    let hello = draw.pick(&["h0.t", "x.h0.t", "s0.t", "a.s0.t", "h2.s0.t", "u"]);
                    let names = Names::new(&answers[round], None).with_server_name(addr, hello);
                    assert_eq!(
                        matcher.find(names, client, addr).copied(),
                        scan(&specs, names, client, addr),
                        "{addr} asked for {hello} against {specs:?} by {:?}",
                        answers[round],
                    );
                }
            }
        }
    }

    #[test]
    fn first_entry_of_a_spec_is_kept() {
        let matcher: AddrMatcher<usize> = [("192.0.2.0/24", 1), ("192.0.2.0/24", 2)]
            .into_iter()
            .map(|(s, line)| (s.parse().unwrap(), line))
            .collect();
        let none = Answers::default();
        let names = Names::new(&none, None);
        let at = ip("192.0.2.1");
        assert_eq!(matcher.find(names, at, at), Some(&1));
    }
}
