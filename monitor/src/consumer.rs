//! What a poll hands its connections to. The rules, the metrics, the top view, IPFIX
//! export and the conn log each read a connection through one small trait, so a poll is
//! one pass: every consumer sees the same view of it.

use std::net::IpAddr;

use crate::{
    alerts::{Alert, Note},
    clock::{Clock, Now},
    conntable::{Conn, ConnTable, EndReason, LocalNets, View},
    logs::conn::{ConnRecord, OwnerFields},
    nat::{Nat, Translation},
    owners::Owned,
    resolve::Names,
    sni::{self, Hello, Hellos},
};

pub trait Consumer: Send {
    /// An open connection observed with something new, or whose wake-up time came.
    fn update(&mut self, _conn: &ConnCtx, _now: Now) {}

    /// A connection that finished, with its last counts, and why.
    fn finish(&mut self, _conn: &ConnCtx, _now: Now, _reason: EndReason) {}

    /// The earliest kernel time at which [`Self::update`] acts on `conn` with nothing new
    /// in it; `None` when only new packets can make it act. Polls pass over connections
    /// that carry nothing new until then.
    fn next_due(&self, _conn: &ConnCtx) -> Option<u64> {
        None
    }

    /// After the poll's connections: the open ones as they stand.
    fn end_poll(&mut self, _open: &ConnTable, _local: &LocalNets, _now: Now) {}
}

/// What a poll knows besides its connections, from which each one's [`ConnCtx`] is made.
#[derive(Clone, Copy)]
pub struct PollCtx<'a> {
    pub local: &'a LocalNets,
    /// The name tables as the poll took them, after recording its DNS answers.
    pub names: Names<'a>,
    pub clock: &'a Clock,
    pub nat: &'a Nat,
    /// What the connections' first payloads told (TLS or QUIC hellos).
    pub hellos: &'a Hellos,
    /// Which processes own the watched host's ends.
    pub owners: &'a Owned,
}

impl<'a> PollCtx<'a> {
    pub fn conn<'c>(&self, conn: &'c Conn) -> ConnCtx<'c>
    where
        'a: 'c,
    {
        ConnCtx::new(self.local.view(conn), self.names, self.clock)
            .translated(self.nat)
            .with_hellos(self.hellos)
            .with_owners(self.owners)
    }
}

/// A connection as a poll's consumers see it: the table's view of it, the name tables of
/// the poll, and what its record is built from when one is needed.
pub struct ConnCtx<'a> {
    view: View<'a>,
    names: Names<'a>,
    clock: &'a Clock,
    nat: Option<&'a Nat>,
    hellos: Option<&'a Hellos>,
    owners: Option<&'a Owned>,
}

impl<'a> std::ops::Deref for ConnCtx<'a> {
    type Target = View<'a>;

    fn deref(&self) -> &View<'a> {
        &self.view
    }
}

impl<'a> ConnCtx<'a> {
    pub fn new(view: View<'a>, names: Names<'a>, clock: &'a Clock) -> Self {
        Self {
            view,
            names,
            clock,
            nat: None,
            hellos: None,
            owners: None,
        }
    }

    /// The same connection, whose translation (if any) `nat` knows: looked up only when
    /// a record is built.
    pub fn translated(self, nat: &'a Nat) -> Self {
        Self {
            nat: Some(nat),
            ..self
        }
    }

    /// The same connection, whose hello (if any) `hellos` knows.
    pub fn with_hellos(self, hellos: &'a Hellos) -> Self {
        Self {
            hellos: Some(hellos),
            ..self
        }
    }

    /// The same connection, whose owner (if any) `owners` knows.
    pub fn with_owners(self, owners: &'a Owned) -> Self {
        Self {
            owners: Some(owners),
            ..self
        }
    }

    pub fn view(&self) -> &View<'a> {
        &self.view
    }

    /// What the connection's first payload told, if it was a TLS or QUIC hello.
    pub fn hello(&self) -> Option<&'a Hello> {
        self.hellos.and_then(|h| h.get(&self.conn.key))
    }

    /// The host names' addresses as this poll knows them, and the name the connection's
    /// hello gave its server.
    pub fn names(&self) -> Names<'a> {
        match self.hello().and_then(|h| h.server_name.as_deref()) {
            Some(name) => self.names.with_server_name(self.resp.addr, name),
            None => self.names,
        }
    }

    /// Whether the connection carries encrypted DNS (DoT, DoQ, DoH).
    pub fn encrypted_dns(&self) -> bool {
        sni::encrypted_dns(self.proto(), self.resp, self.hello())
    }

    /// How the gateway translated the connection, if it did.
    pub fn translation(&self) -> Option<&'a Translation> {
        self.nat.and_then(|nat| nat.of(&self.conn.key))
    }

    /// The connection's record at `now`: translated, and its remote end named, as the
    /// poll knows them.
    pub fn record(&self, now: Now) -> ConnRecord {
        let mut record = ConnRecord::new(&self.view, self.clock);
        record.fields.nat = self.translation().map(|t| t.fields(self.orig));
        let (local, remote) = self.ends(self.shown_local());
        record.fields.remote_fqdn = self.names().fqdn(local.addr, remote.addr, now.mono_ns);
        let hello = self.hello();
        record.fields.server_name = hello.and_then(|h| h.server_name.clone());
        record.fields.ech = hello.is_some_and(|h| h.ech);
        record.fields.encrypted_dns = self.encrypted_dns();
        record.fields.owner = (self.owners)
            .and_then(|o| o.get(&self.conn.key))
            .map(OwnerFields::from);
        record
    }

    /// An alert about this connection from `src` to `dst`.
    pub fn alert(&self, now: Now, note: Note, msg: String, src: IpAddr, dst: IpAddr) -> Alert {
        let key = format!("{src}>{dst}:{}/{}", self.resp.port, self.proto());
        Alert::for_conn(now.epoch, note, msg, src, dst, self.record(now), key)
    }
}
