//! The connection record: Zeek conn.log field names, as JSON.

use std::net::IpAddr;

use serde::Serialize;

use crate::{clock::Clock, conntable::View, iface, nat::NatFields, owners::Owner, proto};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnRecord {
    /// First packet, epoch seconds.
    pub ts: f64,
    #[serde(flatten)]
    pub fields: ConnFields,
}

/// Everything of a connection record but its time: alerts embed these beside their own
/// `ts`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnFields {
    pub uid: String,
    #[serde(rename = "id.orig_h")]
    pub orig_h: IpAddr,
    #[serde(rename = "id.orig_p")]
    pub orig_p: u16,
    #[serde(rename = "id.resp_h")]
    pub resp_h: IpAddr,
    #[serde(rename = "id.resp_p")]
    pub resp_p: u16,
    pub proto: String,
    pub duration: f64,
    pub orig_bytes: u64,
    pub resp_bytes: u64,
    pub orig_pkts: u64,
    pub orig_ip_bytes: u64,
    pub resp_pkts: u64,
    pub resp_ip_bytes: u64,
    pub conn_state: &'static str,
    pub local_orig: bool,
    pub local_resp: bool,
    /// TCP first seen mid-stream (no SYN): counts cover only what was seen.
    pub missed_start: bool,
    pub iface: String,
    /// The name the local endpoint resolved for the remote one, else anyone's name for
    /// it (passive DNS); absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_fqdn: Option<String>,
    /// The name the originator's TLS ClientHello (or QUIC Initial) asked the server for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The hello offered Encrypted Client Hello: `server_name` is the outer, public name.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ech: bool,
    /// DNS over TLS or QUIC (port 853), or DoH (`server_name` of a DoH server).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted_dns: bool,
    /// The endpoints as the gateway translated them; absent when it translated nothing.
    #[serde(flatten)]
    pub nat: Option<NatFields>,
    /// The process that owns the watched host's socket; absent for forwarded traffic.
    #[serde(flatten)]
    pub owner: Option<OwnerFields>,
}

/// The owner of a connection's local socket when it was created, connected or bound (a listener, for what it accepts).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OwnerFields {
    pub local_pid: u32,
    /// The thread-group leader's name.
    pub local_comm: String,
    pub local_uid: u32,
    /// The cgroup v2 path; absent when the cgroup was gone before it could be named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_cgroup: Option<String>,
}

impl From<&Owner> for OwnerFields {
    fn from(owner: &Owner) -> Self {
        Self {
            local_pid: owner.pid,
            local_comm: owner.comm.clone(),
            local_uid: owner.uid,
            local_cgroup: owner.cgroup.clone(),
        }
    }
}

impl ConnRecord {
    pub fn new(view: &View, clock: &Clock) -> Self {
        let (conn, orig, resp) = (view.conn, view.orig, view.resp);
        let (o, r) = (conn.orig(), conn.resp());
        let (first, last) = (conn.first_ns(), conn.last_ns());
        let fields = ConnFields {
            uid: conn.uid.to_string(),
            orig_h: orig.addr,
            orig_p: orig.port,
            resp_h: resp.addr,
            resp_p: resp.port,
            proto: proto::name(conn.key.proto).into_owned(),
            duration: last.saturating_sub(first) as f64 / 1e9,
            orig_bytes: o.bytes,
            resp_bytes: r.bytes,
            orig_pkts: o.pkts,
            orig_ip_bytes: o.ip_bytes,
            resp_pkts: r.pkts,
            resp_ip_bytes: r.ip_bytes,
            conn_state: conn.conn_state(),
            local_orig: view.local_orig,
            local_resp: view.local_resp,
            missed_start: conn.missed_start(),
            iface: iface::name(conn.ifindex),
            remote_fqdn: None,
            server_name: None,
            ech: false,
            encrypted_dns: false,
            nat: None,
            owner: None,
        };
        Self {
            ts: clock.epoch_secs(first),
            fields,
        }
    }
}
