//! Which process owns the watched host's end of a connection. Programs attached to the
//! root cgroup keep each socket's owner when it is created, connects or binds, in that
//! process, so short-lived processes are named too; the egress programs hand it over
//! with the key of each connection the socket opens or answers (`OWNER_EVENTS`). Each
//! owner is matched to its connection, and leaves with it. Forwarded traffic has no
//! socket here, and so no owner.
//!
//! events (ring buffer, drained as DNS's) -> [`Owners::record`] -> [`Joined`] -> [`Owned`]
//! by flow key

use monitor_common::{flow::FlowKey, owner::OwnerEvent};

use crate::{
    cgroups::Cgroups,
    conntable,
    joined::{ByConn, Joined},
    nat::Nat,
};

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
pub type Owned = ByConn<Owner>;

#[derive(Default)]
pub struct Owners {
    owners: Joined<Owner>,
    cgroups: Cgroups,
}

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
        self.owners.push(key, owner);
    }

    /// After a poll's read of the map (see [`Joined::settle`]).
    pub fn settle(&mut self, known: impl Fn(&FlowKey) -> bool) {
        self.owners.settle(known);
    }

    /// A finished connection's owner goes with it.
    pub fn forget(&mut self, key: &FlowKey) {
        self.owners.forget(key);
    }

    pub fn owned(&self) -> &Owned {
        self.owners.joined()
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
    fn an_event_names_its_connection_by_the_pre_nat_key() {
        let (mut owners, nat) = (Owners::default(), Nat::without_conntrack());
        owners.record(&event(4242), &nat);
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
    fn a_short_record_is_ignored() {
        let (mut owners, nat) = (Owners::default(), Nat::without_conntrack());
        owners.record(&event(4242)[..10], &nat);
        owners.settle(|_| true);
        assert_eq!(owners.owned().get(&key()), None);
    }
}
