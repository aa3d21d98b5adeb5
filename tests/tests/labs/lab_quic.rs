//! QUIC's server name in a gateway lab: aioquic's client on the lan host uploads to
//! aioquic's server on the wan host; its first datagram, captured on gw's WAN veth (where
//! the agent watches), gives `monitor::sni::quic` the ClientHello, whose server_name must
//! be the one the client sent, in QUIC version 1 and version 2.

use std::net::SocketAddr;

use monitor::sni::quic::client_hello;
use tests::{
    lab::{self, Lab},
    quic::{self, Capture, QuicServer},
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
