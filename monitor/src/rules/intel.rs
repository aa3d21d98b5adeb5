//! IntelMatch: a local host opened a connection to a destination on a threat-intel list
//! (`--intel-dst`: addresses, networks, names). Alerted at the first poll that sees the
//! match, once per connection, naming the list and line that listed it.

use std::collections::HashSet;

use super::{
    AddrMatcher, ConnCtx, Lists, Now, Rule,
    targets::{AddrSpec, Origin},
};
use crate::{
    alerts::{Alert, Note},
    conntable::Uid,
};

pub struct IntelMatch {
    listed: AddrMatcher<Origin>,
    /// Open connections already alerted: only matches are kept, not every connection.
    alerted: HashSet<Uid>,
}

impl IntelMatch {
    pub fn new(intel: &[(AddrSpec, Origin)]) -> Self {
        Self {
            listed: intel.iter().cloned().collect(),
            alerted: HashSet::new(),
        }
    }
}

impl Rule for IntelMatch {
    fn set_lists(&mut self, lists: &Lists) {
        self.listed = lists.intel.iter().cloned().collect();
    }

    fn on_update(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        let (src, dst) = (conn.orig.addr, conn.resp.addr);
        if self.listed.is_empty() || !conn.local_orig || self.alerted.contains(&conn.uid()) {
            return;
        }
        let Some(origin) = self.listed.find(conn.names(), src, dst) else {
            return;
        };
        self.alerted.insert(conn.uid());
        let msg = format!(
            "{src} opened a connection to {dst} {}, which {} lists at line {}",
            conn.service(),
            origin.list,
            origin.line,
        );
        out.push(
            conn.alert(now, Note::IntelMatch, msg, src, dst)
                .with("list", &*origin.list)
                .with("line", origin.line),
        );
    }

    fn on_finish(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        // A connection that opened and finished between two polls is judged now.
        self.on_update(conn, now, out);
        self.alerted.remove(&conn.uid());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testkit::*;

    fn origin(list: &str, line: usize) -> Origin {
        Origin {
            list: list.into(),
            line,
        }
    }

    fn rule(entries: &[(&str, Origin)]) -> IntelMatch {
        let intel: Vec<_> = entries
            .iter()
            .map(|(spec, origin)| (spec.parse().unwrap(), origin.clone()))
            .collect();
        IntelMatch::new(&intel)
    }

    #[test]
    fn once_per_connection_from_a_local_host_naming_list_and_line() {
        let mut r = rule(&[
            ("203.0.113.0/24", origin("/etc/intel.txt", 3)),
            ("192.0.2.9", origin("--intel-dst", 1)),
        ]);
        let conn = ConnSpec::default().conn();
        let alerts = update(&mut r, &conn, at(1.0));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].note, Note::IntelMatch);
        assert_eq!(alerts[0].figures["list"], "/etc/intel.txt");
        assert_eq!(alerts[0].figures["line"], 3);
        assert!(
            update(&mut r, &conn, at(2.0)).is_empty(),
            "once per connection"
        );
        assert!(finish(&mut r, &conn, at(3.0)).is_empty());
        assert!(r.alerted.is_empty());
        let inbound = ConnSpec {
            orig: ("203.0.113.2", 40000),
            resp: ("198.18.1.2", 22),
            ..ConnSpec::default()
        };
        assert!(
            update(&mut r, &inbound.conn(), at(4.0)).is_empty(),
            "not from a local host"
        );
        let unlisted = ConnSpec {
            resp: ("198.51.100.1", 443),
            ..ConnSpec::default()
        };
        assert!(update(&mut r, &unlisted.conn(), at(4.0)).is_empty());
    }

    /// A reload changes what matches from the next update on; an alerted connection stays
    /// alerted.
    #[test]
    fn a_reload_matches_from_then_on() {
        let mut r = rule(&[]);
        let conn = ConnSpec::default().conn();
        assert!(update(&mut r, &conn, at(1.0)).is_empty());
        let lists = Lists {
            intel: vec![("203.0.113.2".parse().unwrap(), origin("intel.txt", 7))],
            ..Lists::default()
        };
        r.set_lists(&lists);
        let alerts = update(&mut r, &conn, at(2.0));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].figures["line"], 7);
        r.set_lists(&lists);
        assert!(update(&mut r, &conn, at(3.0)).is_empty());
    }
}
