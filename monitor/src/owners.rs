//! Which process owns the watched host's end of a connection. Programs attached to the
//! root cgroup keep each socket's owner when it is created, connects or binds, in that
//! process, so short-lived processes are named too; the egress programs hand it over
//! with the key of each connection the socket opens or answers (`OWNER_EVENTS`). Each
//! owner is matched to its connection, and leaves with it. Forwarded traffic has no
//! socket here, and so no owner.
//!
//! events (ring buffer, drained as DNS's) -> [`Owners::record`] -> [`Owners::settle`] ->
//! [`Owned`] by flow key

use std::collections::hash_map::Entry;

use foldhash::HashMap;
use monitor_common::{flow::FlowKey, owner::OwnerEvent};

use crate::{cgroups::Cgroups, conntable, nat::Nat};

/// A socket's owner when it was created, connected or bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// The process's (thread-group leader's) name.
    pub comm: String,
    pub uid: u32,
    /// The cgroup v2 path (`/system.slice/ssh.service`); absent when the cgroup was gone
    /// before the agent could name it.
    pub cgroup: Option<String>,
}

/// The owners of the connections in the table, by their (pre-NAT) flow key.
#[derive(Debug, Default)]
pub struct Owned(HashMap<FlowKey, Owner>);

impl Owned {
    pub fn get(&self, key: &FlowKey) -> Option<&Owner> {
        // Forwarded connections have none: an empty map costs no hash.
        if self.0.is_empty() {
            return None;
        }
        self.0.get(key)
    }
}

#[derive(Default)]
pub struct Owners {
    owned: Owned,
    /// Owners of this poll's events, not yet matched to a connection.
    fresh: Vec<(FlowKey, Owner)>,
    /// Owners whose connection the last poll's read did not find (its first packet came
    /// after the read): matched at this poll, else dropped.
    waiting: Vec<(FlowKey, Owner)>,
    cgroups: Cgroups,
    /// Settles since the last sweep (see [`SWEEP_EVERY`]).
    settles: u32,
}

/// Polls between two sweeps of the owners whose connection left the table without
/// finishing (absorbed into its translated self, whose key the owner did not know).
const SWEEP_EVERY: u32 = 256;

impl Owners {
    /// One `OWNER_EVENTS` record, its key as the wire had it.
    pub fn record(&mut self, bytes: &[u8], nat: &Nat) {
        let Some(event) = parse(bytes) else { return };
        let (src, dst) = conntable::key_endpoints(&event.key);
        let (src, dst) = nat.untranslate(event.key.proto, src, dst);
        let Some(key) = conntable::flow_key(event.key.proto, src, dst) else {
            return;
        };
        let raw = &event.owner;
        let owner = Owner {
            pid: raw.tgid,
            comm: comm(&raw.comm),
            uid: raw.uid,
            cgroup: self.cgroups.path(raw.cgroup, raw.tgid),
        };
        self.fresh.push((key, owner));
    }

    /// After a poll's read of the map: this poll's owners and those left waiting go to
    /// their connections where `known` finds them, unless those have one already (the
    /// first stays); this poll's others wait for the next.
    pub fn settle(&mut self, known: impl Fn(&FlowKey) -> bool) {
        let owned = &mut self.owned.0;
        let mut keep = |key, owner| {
            if let Entry::Vacant(slot) = owned.entry(key) {
                slot.insert(owner);
            }
        };
        for (key, owner) in std::mem::take(&mut self.waiting) {
            if known(&key) {
                keep(key, owner);
            }
        }
        for (key, owner) in self.fresh.drain(..) {
            if known(&key) {
                keep(key, owner);
            } else {
                self.waiting.push((key, owner));
            }
        }
        self.settles += 1;
        if self.settles >= SWEEP_EVERY {
            self.settles = 0;
            self.owned.0.retain(|key, _| known(key));
        }
    }

    /// A finished connection's owner goes with it.
    pub fn forget(&mut self, key: &FlowKey) {
        self.owned.0.remove(key);
    }

    pub fn owned(&self) -> &Owned {
        &self.owned
    }
}

fn parse(bytes: &[u8]) -> Option<OwnerEvent> {
    if bytes.len() < size_of::<OwnerEvent>() {
        return None;
    }
    // SAFETY: OwnerEvent is plain #[repr(C)] data for which every bit pattern is valid,
    // and the record holds at least that many bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<OwnerEvent>()) })
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use monitor_common::{owner, parse::IPPROTO_TCP};

    use super::*;
    use crate::conntable::Endpoint;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

    fn key() -> FlowKey {
        let end = |addr, port| Endpoint { addr, port };
        conntable::flow_key(IPPROTO_TCP, end(LOCAL, 40_000), end(REMOTE, 443)).unwrap()
    }

    fn event(pid: u32) -> Vec<u8> {
        let mut comm = [0; 16];
        comm[..4].copy_from_slice(b"curl");
        let event = OwnerEvent {
            key: key(),
            owner: owner::Owner {
                tgid: pid,
                uid: 1000,
                cgroup: 0,
                comm,
            },
        };
        // SAFETY: plain #[repr(C)] data, read as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&event as *const OwnerEvent).cast::<u8>(),
                size_of::<OwnerEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn an_owner_joins_its_connection_when_the_table_knows_it() {
        let (mut owners, nat) = (Owners::default(), Nat::without_conntrack());
        owners.record(&event(4242), &nat);
        // Its first packet came after this poll's read: it waits one poll.
        owners.settle(|_| false);
        assert_eq!(owners.owned().get(&key()), None);
        owners.settle(|k| *k == key());
        let owner = owners.owned().get(&key()).unwrap();
        assert_eq!(
            (owner.pid, owner.comm.as_str(), owner.uid),
            (4242, "curl", 1000)
        );
        owners.forget(&key());
        assert_eq!(owners.owned().get(&key()), None);
    }

    #[test]
    fn an_owner_no_connection_claims_is_dropped_after_a_poll() {
        let (mut owners, nat) = (Owners::default(), Nat::without_conntrack());
        owners.record(&event(4242), &nat);
        owners.settle(|_| false);
        owners.settle(|_| false);
        owners.settle(|k| *k == key());
        assert_eq!(owners.owned().get(&key()), None);
    }

    #[test]
    fn the_first_owner_stays() {
        let (mut owners, nat) = (Owners::default(), Nat::without_conntrack());
        owners.record(&event(4242), &nat);
        owners.settle(|k| *k == key());
        owners.record(&event(7), &nat);
        owners.settle(|k| *k == key());
        assert_eq!(owners.owned().get(&key()).unwrap().pid, 4242);
    }
}
