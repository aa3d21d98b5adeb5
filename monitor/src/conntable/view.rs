//! The one view of a connection every consumer of a poll reads (rules, records, metrics,
//! the top view, export): its ends, which of them is local, what each sent and what is
//! new. The table decides it once per connection and poll, from the endpoints it keys the
//! connection by: the pre-NAT ones of a translated connection.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use super::{Conn, Endpoint, Totals, Uid};

/// Which side of a connection sends from the local network to a non-local one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalSide {
    Orig,
    Resp,
}

impl LocalSide {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalSide::Orig => "orig",
            LocalSide::Resp => "resp",
        }
    }
}

/// A connection with its ends decided: built by [`LocalNets::view`].
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub conn: &'a Conn,
    pub orig: Endpoint,
    pub resp: Endpoint,
    /// The originator's key direction.
    pub orig_dir: usize,
    pub local_orig: bool,
    pub local_resp: bool,
}

impl View<'_> {
    /// The side that is local when exactly one is: bytes it sends leave the network.
    pub fn local_side(&self) -> Option<LocalSide> {
        match (self.local_orig, self.local_resp) {
            (true, false) => Some(LocalSide::Orig),
            (false, true) => Some(LocalSide::Resp),
            _ => None,
        }
    }

    /// The side the logs and the top view call local: the responder when only it is,
    /// else the originator.
    pub fn shown_local(&self) -> LocalSide {
        self.local_side().unwrap_or(LocalSide::Orig)
    }

    /// (`side`'s endpoint, its peer's).
    pub fn ends(&self, side: LocalSide) -> (Endpoint, Endpoint) {
        match side {
            LocalSide::Orig => (self.orig, self.resp),
            LocalSide::Resp => (self.resp, self.orig),
        }
    }

    /// The key direction `side` sends in.
    pub fn dir_of(&self, side: LocalSide) -> usize {
        match side {
            LocalSide::Orig => self.orig_dir,
            LocalSide::Resp => 1 - self.orig_dir,
        }
    }

    /// Whether the sender of key direction `dir` is local, and whether its receiver is.
    pub fn local_from_to(&self, dir: usize) -> (bool, bool) {
        if dir == self.orig_dir {
            (self.local_orig, self.local_resp)
        } else {
            (self.local_resp, self.local_orig)
        }
    }

    /// What `side` has sent in all.
    pub fn sent(&self, side: LocalSide) -> Totals {
        self.conn.totals()[self.dir_of(side)]
    }

    /// What `side` sent since the connection's observation before the latest.
    pub fn sent_since_last(&self, side: LocalSide) -> Totals {
        self.conn.delta(self.dir_of(side))
    }

    /// Time since the first packet at kernel time `now_ns`: idle connections age too.
    pub fn age(&self, now_ns: u64) -> Duration {
        Duration::from_nanos(now_ns.saturating_sub(self.conn.first_ns()))
    }

    pub fn uid(&self) -> Uid {
        self.conn.uid
    }

    pub fn proto(&self) -> u8 {
        self.conn.key.proto
    }
}

/// The networks that count as local, as (network, mask) integers: asked several times
/// per connection and poll, so a masked compare rather than `IpNet::contains`.
#[derive(Clone, Debug)]
pub struct LocalNets {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl LocalNets {
    pub fn new(nets: Vec<IpNet>) -> Self {
        let mut local = Self {
            v4: Vec::new(),
            v6: Vec::new(),
        };
        for net in nets {
            match net {
                IpNet::V4(n) => local
                    .v4
                    .push((n.network().to_bits(), n.netmask().to_bits())),
                IpNet::V6(n) => local
                    .v6
                    .push((n.network().to_bits(), n.netmask().to_bits())),
            }
        }
        local
    }

    /// The connection's ends and which of them are local.
    pub fn view<'a>(&self, conn: &'a Conn) -> View<'a> {
        let orig_dir = conn.orig_dir();
        let (orig, resp) = conn.endpoints(orig_dir);
        View {
            conn,
            orig,
            resp,
            orig_dir,
            local_orig: self.contains(orig.addr),
            local_resp: self.contains(resp.addr),
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => {
                let a = a.to_bits();
                self.v4.iter().any(|&(net, mask)| a & mask == net)
            }
            IpAddr::V6(a) => {
                let a = a.to_bits();
                self.v6.iter().any(|&(net, mask)| a & mask == net)
            }
        }
    }
}
