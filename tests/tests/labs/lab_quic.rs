//! QUIC's server name in a gateway lab: aioquic's client on the lan host uploads to
//! aioquic's server on the wan host; its first datagram, captured on gw's WAN veth (where
//! the agent watches), gives `monitor::sni::quic` the ClientHello, whose server_name must
//! be the one the client sent, in QUIC version 1 and version 2; and the agent watching
//! that veth names the connections in its records and alerts, and its name allowlists
//! match them.

use std::net::SocketAddr;

use monitor::sni::quic::client_hello;
use tests::{
    lab::{self, Lab},
    quic::{self, Capture, QuicServer},
    rules_lab::{RulesAgent, listing, of},
};

const PORT: u16 = 4433;
const SNI: &str = "quic.exfil.test";
const BYTES: u64 = 200_000;

fn first_datagram_names_the_server(v6: bool, version: u8) {
    quic::require_aioquic();
    let lab = Lab::new();
    let (_, wan_host) = lab::hosts(v6);
    let server_addr = SocketAddr::new(wan_host, PORT);
    let _server = QuicServer::start(&lab.wan, server_addr);
    let capture = Capture::start(&lab.gw, &lab.gw_wan_if, PORT);
    assert_eq!(
        quic::upload(&lab.lan, server_addr, version, SNI, BYTES),
        BYTES
    );
    let datagrams = capture.finish();
    let sizes: Vec<usize> = datagrams.iter().map(Vec::len).collect();
    eprintln!(
        "QUIC client datagrams ({}): first {:?}, largest {:?}",
        sizes.len(),
        sizes.first(),
        sizes.iter().max()
    );
    let first = datagrams
        .first()
        .expect("the capture saw the client's datagrams");
    // The long header's Version field: RFC 9000 and RFC 9369 section 3.1.
    let wire_version: u32 = if version == 2 { 0x6b33_43cf } else { 1 };
    assert_eq!(
        first.get(1..5),
        Some(&wire_version.to_be_bytes()[..]),
        "a QUIC version {version} long header"
    );
    let hello = client_hello(first).unwrap_or_else(|e| panic!("first datagram: {e}"));
    assert_eq!(hello[0], 0x01, "a ClientHello");
    let declared = 4 + u32::from_be_bytes([0, hello[1], hello[2], hello[3]]) as usize;
    eprintln!("ClientHello: {} bytes of {declared}", hello.len());
    assert_eq!(
        hello.len(),
        declared,
        "the first datagram carries the whole ClientHello"
    );
    assert_eq!(quic::server_name(&hello).as_deref(), Some(SNI));
}

#[test]
fn quic_first_datagram_names_the_server_v4() {
    first_datagram_names_the_server(false, 1);
}

#[test]
fn quic_first_datagram_names_the_server_v6() {
    first_datagram_names_the_server(true, 1);
}

#[test]
fn quic_v2_first_datagram_names_the_server() {
    first_datagram_names_the_server(false, 2);
}

#[test]
fn quic_names_reach_records_alerts_and_allowlists() {
    quic::require_aioquic();
    let lab = Lab::new();
    let (_, wan_host) = lab::hosts(false);
    let allowed = SocketAddr::new(wan_host, PORT);
    let other = SocketAddr::new(wan_host, PORT + 1);
    let _servers = [allowed, other].map(|addr| QuicServer::start(&lab.wan, addr));
    let restricted = format!("{}/32", lab::LAN_HOST_V4);
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            &restricted,
            "--allow-dst",
            "*.exfil.test",
        ],
    );
    assert_eq!(quic::upload(&lab.lan, allowed, 1, SNI, BYTES), BYTES);
    assert_eq!(
        quic::upload(&lab.lan, other, 2, "quic.elsewhere.test", BYTES),
        BYTES
    );
    let stopped = agent.stop();
    for (server, name) in [(allowed, SNI), (other, "quic.elsewhere.test")] {
        let record = (stopped.conns.iter())
            .find(|r| r.str("proto") == "udp" && r.u64("id.resp_p") == u64::from(server.port()))
            .unwrap_or_else(|| panic!("a record of the connection to {server}"));
        assert_eq!(record.str("server_name"), name, "{record}");
        assert_eq!(record.str("remote_fqdn"), name, "{record}");
    }
    let restricted = of(&stopped.alerts, "RestrictedOutbound");
    let named: Vec<&str> = (restricted.iter()).map(|a| a.str("server_name")).collect();
    assert_eq!(
        named,
        ["quic.elsewhere.test"],
        "*.exfil.test allows {SNI}, not the other:\n{}",
        listing(&stopped.alerts)
    );
}
