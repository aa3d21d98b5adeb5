//! RestrictedOutbound: a host in a restricted net opened a connection to a non-local
//! destination that no allowlist covers; any protocol, ICMP included. Alerted at the first
//! poll that sees the connection, a TCP connection's once its originator sent data (the
//! TLS ClientHello that names the server) or it finished; its alerts are quiet for
//! `--restricted-suppress` per (source, destination, port), a repeat starting the quiet
//! time again. With `--restricted-doh`, encrypted DNS alerts whatever the allowlists say.

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use ipnet::IpNet;
use monitor_common::parse::IPPROTO_TCP;

use super::{
    ConnCtx, Lists, Now, Rule, Saved,
    allowlist::{Allowlist, NetSet},
    decode, human_bytes, save_as, saved,
};
use crate::{
    alerts::{Alert, Note, Quiet},
    conntable::Uid,
};

pub struct RestrictedOutbound {
    restricted: NetSet,
    allow: Allowlist,
    quiet: Quiet,
    /// `--restricted-doh`.
    doh: bool,
    /// Open connections from restricted hosts already judged.
    judged: HashSet<Uid>,
    /// Changes to what `save` writes, counted.
    changes: u64,
}

impl RestrictedOutbound {
    /// `quiet`: `--restricted-suppress`.
    pub fn new(restricted: &[IpNet], allow: Allowlist, quiet: Duration) -> Self {
        Self {
            restricted: restricted.iter().copied().collect(),
            allow,
            quiet: Quiet {
                time: quiet,
                repeats_restart: true,
            },
            doh: false,
            judged: HashSet::new(),
            changes: 0,
        }
    }

    /// `--restricted-doh`: encrypted DNS is never allowed.
    pub fn with_doh(self, doh: bool) -> Self {
        Self { doh, ..self }
    }

    /// Judges a connection once: `last` when it finished.
    fn judge(&mut self, conn: &ConnCtx, now: Now, last: bool, out: &mut Vec<Alert>) {
        let (src, dst) = (conn.orig.addr, conn.resp.addr);
        let Some((net, _)) = self.restricted.find(src) else {
            return;
        };
        // Its first data may name the server: a TLS hello reaches the agent with the
        // counts that carry it.
        if !last && conn.proto() == IPPROTO_TCP && conn.conn.orig().bytes == 0 {
            return;
        }
        if !self.judged.insert(conn.uid()) {
            return;
        }
        self.changes += 1;
        let doh = self.doh && conn.encrypted_dns();
        if conn.local_resp || (!doh && self.allow.covers(conn.names(), src, dst, conn.offered())) {
            return;
        }
        let sent = conn.conn.orig();
        let msg = if doh {
            format!(
                "{src} in restricted net {net} used encrypted DNS with {dst} {} (sent {} so far)",
                conn.service(),
                human_bytes(sent.bytes),
            )
        } else {
            format!(
                "{src} in restricted net {net} opened a connection to {dst} {} (sent {} so far), which no allowlist covers",
                conn.service(),
                human_bytes(sent.bytes),
            )
        };
        out.push(
            conn.alert(now, Note::RestrictedOutbound, msg, src, dst)
                .with("restricted_net", net.to_string())
                .with("bytes", sent.bytes)
                .quiet(self.quiet),
        );
    }
}

impl Rule for RestrictedOutbound {
    fn set_lists(&mut self, lists: &Lists) {
        self.restricted = lists.restricted_nets.iter().copied().collect();
        self.allow = Allowlist::new(&lists.allowed);
    }

    fn on_update(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        self.judge(conn, now, false, out);
    }

    fn on_finish(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        // A connection that opened and finished between two polls is judged now.
        self.judge(conn, now, true, out);
        if self.judged.remove(&conn.uid()) {
            self.changes += 1;
        }
    }

    fn save(&self, state: &mut Saved) {
        save_as(
            state,
            "RestrictedOutbound",
            self.judged.iter().collect::<BTreeSet<_>>(),
        );
    }

    fn changes(&self) -> u64 {
        self.changes
    }

    fn restore(&mut self, state: &Saved, conns_resumed: bool) {
        if conns_resumed && let Some(judged) = saved(state, "RestrictedOutbound") {
            self.judged = judged;
        }
    }

    fn check_saved(&self, state: &Saved, _now: Now) -> Result<(), String> {
        decode::<BTreeSet<Uid>>(state, "RestrictedOutbound").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::RuleArgs,
        dns::cache::PassiveDns,
        resolve::{Answers, HostAddrs, Names},
        rules::testkit::*,
    };
    use clap::Parser;

    fn rule(flags: &[&str]) -> RestrictedOutbound {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            rules: RuleArgs,
        }
        let mut argv = vec!["test", "--restricted-net", "198.18.5.0/24"];
        argv.extend(flags);
        let args = Flags::try_parse_from(argv).unwrap().rules;
        let lists = crate::config::list_sources(&args, &[]).load().unwrap();
        let config = crate::config::rules(&args, lists);
        RestrictedOutbound::new(
            &config.lists.restricted_nets,
            Allowlist::new(&config.lists.allowed),
            config.restricted_suppress,
        )
        .with_doh(config.restricted_doh)
    }

    /// A connection whose originator sent data: judged at once.
    fn from_restricted(resp: (&'static str, u16), proto: u8, uid: &'static str) -> ConnSpec {
        ConnSpec {
            orig: ("198.18.5.7", 40000),
            resp,
            proto,
            orig_bytes: 300,
            uid,
            ..ConnSpec::default()
        }
    }

    #[test]
    fn alerts_once_per_connection_for_any_protocol() {
        let mut r = rule(&[]);
        for (proto, port) in [(6, 443), (17, 53), (1, 0)] {
            let conn = from_restricted(("203.0.113.2", port), proto, "C1").conn();
            let alerts = update(&mut r, &conn, at(1.0));
            assert_eq!(alerts.len(), 1, "proto {proto}");
            assert_eq!(alerts[0].figures["restricted_net"], "198.18.5.0/24");
            let quiet = Quiet {
                time: Duration::from_secs(60),
                repeats_restart: true,
            };
            assert_eq!(alerts[0].quiet, Some(quiet), "--restricted-suppress");
            assert!(
                update(&mut r, &conn, at(2.0)).is_empty(),
                "once per connection"
            );
            finish(&mut r, &conn, at(3.0));
        }
    }

    /// ICMP is allowed by type, as `--allow-service CIDR,8/icmp` says: the type the
    /// originator sent (an echo request keys as type 8 to code/counterpart 0).
    #[test]
    fn icmp_is_allowed_by_the_type_the_originator_sent() {
        let mut r = rule(&["--allow-service", "203.0.113.0/24,8/icmp"]);
        let icmp = |kind, uid| ConnSpec {
            orig: ("198.18.5.7", kind),
            resp: ("203.0.113.2", 0),
            proto: 1,
            uid,
            ..ConnSpec::default()
        };
        let (ping, timestamp) = (icmp(8, "Cping"), icmp(13, "Ctimestamp"));
        assert!(update(&mut r, &ping.conn(), at(1.0)).is_empty());
        assert_eq!(update(&mut r, &timestamp.conn(), at(1.0)).len(), 1);
    }

    #[test]
    fn silent_for_local_unrestricted_and_allowed() {
        let hosts = resolved_hosts("backup.example.com", "192.0.2.7");
        let names = Names::new(&hosts, None);
        let mut r = rule(&[
            "--allow-dst",
            "198.51.100.0/24",
            "--allow-service",
            "203.0.113.0/24,123/udp",
            "--allow-pair",
            "198.18.5.7,backup.example.com",
        ]);
        let silent = [
            from_restricted(("198.18.1.1", 443), 6, "Clocal"),
            from_restricted(("198.51.100.9", 443), 6, "Cdst"),
            from_restricted(("203.0.113.2", 123), 17, "Csvc"),
            from_restricted(("192.0.2.7", 22), 6, "Cpair"),
            ConnSpec {
                uid: "Cunrestricted",
                ..ConnSpec::default()
            },
        ];
        for spec in &silent {
            assert!(
                update_named(&mut r, &spec.conn(), at(1.0), names).is_empty(),
                "{}",
                spec.uid
            );
        }
        // The same service over TCP is not the allowed UDP one; the pair is per source.
        let loud = [
            from_restricted(("203.0.113.2", 123), 6, "Ctcp123"),
            from_restricted(("192.0.2.8", 22), 6, "Cother"),
        ];
        for spec in &loud {
            assert_eq!(
                update_named(&mut r, &spec.conn(), at(1.0), names).len(),
                1,
                "{}",
                spec.uid
            );
        }
    }

    /// What the resolver found for `host`: `addr`.
    fn resolved_hosts(host: &str, addr: &str) -> Answers {
        HostAddrs::from([(host.to_owned(), vec![addr.parse().unwrap()])]).into()
    }

    /// A response teaching `client` that `name` is at `addr`.
    fn resolved(passive: &mut PassiveDns, client: &str, name: &str, addr: [u8; 4]) {
        let wire = crate::dns::parse::tests::message(
            1,
            true,
            0,
            name.as_bytes(),
            1,
            &[(name.as_bytes(), 60, 1, addr.to_vec())],
        );
        let msg = crate::dns::parse::parse_message(&wire).unwrap();
        passive.learn(client.parse().unwrap(), &msg, 0);
    }

    #[test]
    fn names_match_what_the_client_itself_resolved() {
        let mut passive = PassiveDns::new(
            std::num::NonZeroUsize::new(100).unwrap(),
            std::time::Duration::from_secs(3600),
        );
        // Active resolution knows one address of the CDN; the client got another.
        let hosts = resolved_hosts("files.cdn.test", "192.0.2.1");
        let mut r = rule(&[
            "--allow-dst",
            "*.example.test",
            "--allow-dst",
            "files.cdn.test",
            "--allow-pair",
            "198.18.5.7,*.pair.test",
        ]);
        for (client, name, addr) in [
            ("198.18.5.7", "www.example.test", [203, 0, 113, 10]),
            ("198.18.5.7", "files.cdn.test", [203, 0, 113, 11]),
            ("198.18.5.7", "api.pair.test", [203, 0, 113, 12]),
            ("198.18.5.7", "example.test.evil.test", [203, 0, 113, 13]),
            // Another host resolved this one: not the restricted client's own answer.
            ("198.18.5.8", "www.example.test", [203, 0, 113, 14]),
        ] {
            resolved(&mut passive, client, name, addr);
        }
        let names = Names::new(&hosts, Some(&passive));
        for (addr, uid) in [
            ("203.0.113.10", "Cwild"),
            ("203.0.113.11", "Cexact"),
            ("192.0.2.1", "Cactive"),
            ("203.0.113.12", "Cpair"),
        ] {
            let conn = from_restricted((addr, 443), 6, uid).conn();
            assert!(
                update_named(&mut r, &conn, at(1.0), names).is_empty(),
                "{uid}"
            );
        }
        for (addr, uid) in [
            ("203.0.113.13", "CnotUnder"),
            ("203.0.113.14", "CnotOwn"),
            ("203.0.113.99", "Cunresolved"),
        ] {
            let conn = from_restricted((addr, 443), 6, uid).conn();
            assert_eq!(
                update_named(&mut r, &conn, at(1.0), names).len(),
                1,
                "{uid}"
            );
        }
    }

    /// A rule holds no names: two built alike judge the same connection two ways when
    /// their polls' name tables differ.
    #[test]
    fn judged_by_the_names_its_poll_hands_over() {
        let flags = ["--allow-dst", "backup.example.com"];
        let conn = from_restricted(("192.0.2.7", 22), 6, "Cbackup").conn();
        let moved = resolved_hosts("backup.example.com", "192.0.2.8");
        let known = resolved_hosts("backup.example.com", "192.0.2.7");
        let alerts =
            |hosts| update_named(&mut rule(&flags), &conn, at(1.0), Names::new(hosts, None));
        assert_eq!(alerts(&moved).len(), 1);
        assert!(alerts(&known).is_empty());
    }

    /// The case: a destination added to the allowlist by a reload silences the
    /// next connection; one already judged is not judged again.
    #[test]
    fn a_reload_allows_from_the_next_connection() {
        let mut r = rule(&[]);
        let first = from_restricted(("203.0.113.2", 443), 6, "C1").conn();
        assert_eq!(update(&mut r, &first, at(1.0)).len(), 1);
        let lists = Lists {
            restricted_nets: vec!["198.18.5.0/24".parse().unwrap()],
            allowed: crate::rules::allowlist::Allowed {
                dst: vec!["203.0.113.2".parse().unwrap()],
                ..Default::default()
            },
            ..Lists::default()
        };
        r.set_lists(&lists);
        assert!(r.judged.contains(&first.uid), "what was judged stays");
        let next = from_restricted(("203.0.113.2", 443), 6, "C2").conn();
        assert!(update(&mut r, &next, at(2.0)).is_empty());
        let elsewhere = from_restricted(("198.51.100.1", 443), 6, "C3").conn();
        assert_eq!(update(&mut r, &elsewhere, at(2.0)).len(), 1);
    }

    #[test]
    fn judged_at_finish_when_never_seen_open() {
        let mut r = rule(&[]);
        let conn = from_restricted(("203.0.113.2", 443), 6, "Cshort").conn();
        assert_eq!(finish(&mut r, &conn, at(1.0)).len(), 1);
        assert!(r.judged.is_empty());
    }

    /// Its first data may be a ClientHello that names the server.
    #[test]
    fn a_tcp_connection_waits_for_its_first_data_or_its_end() {
        let mut r = rule(&[]);
        let silent = ConnSpec {
            orig_bytes: 0,
            ..from_restricted(("203.0.113.2", 443), 6, "Csyn")
        }
        .conn();
        assert!(update(&mut r, &silent, at(1.0)).is_empty());
        assert!(r.judged.is_empty());
        assert_eq!(finish(&mut r, &silent, at(2.0)).len(), 1);
        let udp = ConnSpec {
            orig_bytes: 0,
            ..from_restricted(("203.0.113.2", 4000), 17, "Cudp")
        }
        .conn();
        assert_eq!(update(&mut r, &udp, at(1.0)).len(), 1);
    }

    #[test]
    fn the_server_name_of_the_hello_matches_names() {
        let flags = ["--allow-dst", "*.exfil.test", "--allow-dst", "exact.test"];
        let conn = from_restricted(("203.0.113.2", 443), 6, "Csni").conn();
        let hosts = Answers::default();
        let server = "203.0.113.2".parse().unwrap();
        for (name, alerts) in [
            ("www.exfil.test", 0),
            ("exact.test", 0),
            ("exfil.test", 1),
            ("www.exfil.test.evil.test", 1),
        ] {
            let names = Names::new(&hosts, None).with_server_name(server, name);
            let got = update_named(&mut rule(&flags), &conn, at(1.0), names).len();
            assert_eq!(got, alerts, "{name}");
        }
        // Another server than the one the hello named.
        let other = from_restricted(("203.0.113.3", 443), 6, "Cother").conn();
        let names = Names::new(&hosts, None).with_server_name(server, "www.exfil.test");
        assert_eq!(
            update_named(&mut rule(&flags), &other, at(1.0), names).len(),
            1
        );
    }

    #[test]
    fn restricted_doh_alerts_on_encrypted_dns_even_when_allowed() {
        let dot = from_restricted(("203.0.113.2", 853), 6, "Cdot").conn();
        let allowed = ["--allow-dst", "203.0.113.2"];
        assert!(update(&mut rule(&allowed), &dot, at(1.0)).is_empty());
        let strict = ["--allow-dst", "203.0.113.2", "--restricted-doh"];
        let alerts = update(&mut rule(&strict), &dot, at(1.0));
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].msg.contains("encrypted DNS"), "{}", alerts[0].msg);
    }
}
