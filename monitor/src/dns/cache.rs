//! Passive DNS: which name each client resolved to each address, learnt from the
//! responses it received. Bounded (least recently used entries go first), and every
//! answer is kept at least `--dns-min-ttl`.

use std::{collections::HashMap, net::IpAddr, num::NonZeroUsize, time::Duration};

use lru::LruCache;

use super::parse::{AnswerData, Message};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    expires_ns: u64,
}

#[derive(Debug)]
pub struct PassiveDns {
    /// (client, answer address) -> the name the client asked for.
    by_pair: LruCache<(IpAddr, IpAddr), Entry>,
    /// Answer address -> the last name anyone asked for that led to it.
    by_addr: LruCache<IpAddr, Entry>,
    min_ttl: Duration,
}

impl PassiveDns {
    pub fn new(capacity: NonZeroUsize, min_ttl: Duration) -> Self {
        Self {
            by_pair: LruCache::new(capacity),
            by_addr: LruCache::new(capacity),
            min_ttl,
        }
    }

    /// Learns from a response `client` received at `now_ns` (kernel clock). Every
    /// address in it maps to the question's name when a CNAME chain leads from the
    /// question to the address record, else to the record's own name.
    pub fn learn(&mut self, client: IpAddr, msg: &Message, now_ns: u64) {
        if !msg.response || msg.rcode != 0 {
            return;
        }
        let asked = super::parse::display_name(&msg.qname);
        let cnames: HashMap<&[u8], &[u8]> = msg
            .answers
            .iter()
            .filter_map(|a| match &a.data {
                AnswerData::Cname(target) => Some((a.name.as_slice(), target.as_slice())),
                _ => None,
            })
            .collect();
        // The names the question leads to, CNAME by CNAME (bounded: a loop stops).
        let mut chain = vec![msg.qname.as_slice()];
        while let Some(next) = cnames.get(chain[chain.len() - 1]) {
            if chain.contains(next) || chain.len() > msg.answers.len() {
                break;
            }
            chain.push(next);
        }
        for answer in &msg.answers {
            let AnswerData::Addr(addr) = answer.data else {
                continue;
            };
            let name = if chain.contains(&answer.name.as_slice()) {
                asked.clone()
            } else {
                super::parse::display_name(&answer.name)
            };
            let keep = Duration::from_secs(answer.ttl.into()).max(self.min_ttl);
            let entry = Entry {
                name,
                expires_ns: now_ns.saturating_add(keep.as_nanos() as u64),
            };
            self.by_pair.put((client, addr), entry.clone());
            self.by_addr.put(addr, entry);
        }
    }

    /// The name `local` resolved for `remote`, else the name anyone resolved for it. A
    /// peek: which entries the bound keeps follows the answers, not the lookups.
    pub fn name(&self, local: IpAddr, remote: IpAddr, now_ns: u64) -> Option<String> {
        if let Some(e) = self.by_pair.peek(&(local, remote))
            && e.expires_ns > now_ns
        {
            return Some(e.name.clone());
        }
        self.by_addr
            .peek(&remote)
            .filter(|e| e.expires_ns > now_ns)
            .map(|e| e.name.clone())
    }

    /// The name `client` itself last resolved to `addr`. Expired answers count until the
    /// next poll's prune drops them; every answer is kept at least `--dns-min-ttl`, which
    /// is what lets a CDN address stay allowed after a short TTL.
    pub fn client_resolved(&self, client: IpAddr, addr: IpAddr) -> Option<&str> {
        self.by_pair.peek(&(client, addr)).map(|e| e.name.as_str())
    }

    /// Entries of the (client, address) map: `dns_cache_entries`.
    pub fn entries(&self) -> usize {
        self.by_pair.len()
    }

    /// Drops expired entries; run once per poll.
    pub fn prune(&mut self, now_ns: u64) {
        let expired: Vec<(IpAddr, IpAddr)> = self
            .by_pair
            .iter()
            .filter(|(_, e)| e.expires_ns <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.by_pair.pop(&key);
        }
        let expired: Vec<IpAddr> = self
            .by_addr
            .iter()
            .filter(|(_, e)| e.expires_ns <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.by_addr.pop(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::parse::{
        parse_message,
        tests::{message, wire_name},
    };

    const SEC: u64 = 1_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn response(qname: &[u8], answers: &[(&[u8], u32, u16, Vec<u8>)]) -> Message {
        parse_message(&message(1, true, 0, qname, 1, answers)).unwrap()
    }

    #[test]
    fn cname_chains_lead_back_to_the_asked_name() {
        let mut p = PassiveDns::new(NonZeroUsize::new(10).unwrap(), Duration::from_secs(3600));
        let client = ip("198.18.0.10");
        let msg = response(
            b"files.example.test",
            &[
                (b"files.example.test", 60, 5, wire_name(b"edge.cdn.test")),
                (b"edge.cdn.test", 60, 5, wire_name(b"a1.cdn.test")),
                (b"a1.cdn.test", 20, 1, vec![203, 0, 113, 10]),
                (b"a1.cdn.test", 20, 28, ip6("2001:db8::10")),
            ],
        );
        p.learn(client, &msg, 0);
        assert_eq!(
            p.name(client, ip("203.0.113.10"), SEC).as_deref(),
            Some("files.example.test")
        );
        assert_eq!(
            p.name(client, ip("2001:db8::10"), SEC).as_deref(),
            Some("files.example.test")
        );
        // Another client: the address alone still names it.
        assert_eq!(
            p.name(ip("198.18.0.11"), ip("203.0.113.10"), SEC)
                .as_deref(),
            Some("files.example.test")
        );
        assert_eq!(p.name(client, ip("203.0.113.11"), SEC), None);
        assert_eq!(p.entries(), 2);
    }

    fn ip6(s: &str) -> Vec<u8> {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()
    }

    #[test]
    fn the_client_own_answer_wins_over_anyone_else() {
        let mut p = PassiveDns::new(NonZeroUsize::new(10).unwrap(), Duration::ZERO);
        let (a, b) = (ip("198.18.0.10"), ip("198.18.0.11"));
        let addr = vec![203, 0, 113, 10];
        p.learn(
            a,
            &response(
                b"one.example.test",
                &[(b"one.example.test", 60, 1, addr.clone())],
            ),
            0,
        );
        p.learn(
            b,
            &response(b"two.example.test", &[(b"two.example.test", 60, 1, addr)]),
            0,
        );
        assert_eq!(
            p.name(a, ip("203.0.113.10"), SEC).as_deref(),
            Some("one.example.test")
        );
        assert_eq!(
            p.name(b, ip("203.0.113.10"), SEC).as_deref(),
            Some("two.example.test")
        );
        assert_eq!(
            p.name(ip("198.18.0.12"), ip("203.0.113.10"), SEC)
                .as_deref(),
            Some("two.example.test")
        );
        assert_eq!(
            p.client_resolved(a, ip("203.0.113.10")),
            Some("one.example.test")
        );
        assert_eq!(
            p.client_resolved(ip("198.18.0.12"), ip("203.0.113.10")),
            None
        );
    }

    #[test]
    fn min_ttl_keeps_short_answers_and_expiry_drops_them() {
        let mut p = PassiveDns::new(NonZeroUsize::new(10).unwrap(), Duration::from_secs(3600));
        let client = ip("198.18.0.10");
        p.learn(
            client,
            &response(
                b"x.example.test",
                &[(b"x.example.test", 5, 1, vec![203, 0, 113, 1])],
            ),
            0,
        );
        assert!(p.name(client, ip("203.0.113.1"), 3599 * SEC).is_some());
        assert_eq!(p.name(client, ip("203.0.113.1"), 3600 * SEC), None);
        p.prune(3600 * SEC);
        assert_eq!(p.entries(), 0);
    }

    #[test]
    fn bounded_least_recently_used_first() {
        let mut p = PassiveDns::new(NonZeroUsize::new(3).unwrap(), Duration::from_secs(60));
        let client = ip("198.18.0.10");
        for i in 0..100u8 {
            let name = format!("h{i}.example.test");
            p.learn(
                client,
                &response(
                    name.as_bytes(),
                    &[(name.as_bytes(), 60, 1, vec![203, 0, 113, i])],
                ),
                0,
            );
        }
        assert_eq!(p.entries(), 3);
        assert_eq!(
            p.name(client, ip("203.0.113.99"), 0).as_deref(),
            Some("h99.example.test")
        );
        assert_eq!(p.name(client, ip("203.0.113.0"), 0), None);
    }

    #[test]
    fn errors_and_queries_teach_nothing() {
        let mut p = PassiveDns::new(NonZeroUsize::new(3).unwrap(), Duration::from_secs(60));
        let nx = parse_message(&message(
            1,
            true,
            3,
            b"x.example.test",
            1,
            &[(b"x.example.test", 60, 1, vec![203, 0, 113, 1])],
        ))
        .unwrap();
        p.learn(ip("198.18.0.10"), &nx, 0);
        let q = parse_message(&message(1, false, 0, b"x.example.test", 1, &[])).unwrap();
        p.learn(ip("198.18.0.10"), &q, 0);
        assert_eq!(p.entries(), 0);
    }
}
