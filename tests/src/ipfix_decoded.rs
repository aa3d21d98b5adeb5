//! The agent's IPFIX messages decoded by netflow_parser, for the tests that receive the
//! export themselves rather than through a collector.

use std::{
    io::{ErrorKind, Read},
    net::IpAddr,
};

use netflow_parser::{
    FieldValue, IpfixField, NetflowPacket, NetflowParser, variable_versions::ipfix::FlowSetBody,
};

/// One message: its header's sequence number, how many templates it carried, its data
/// records.
#[derive(Debug)]
pub struct Decoded {
    pub sequence: u32,
    pub templates: usize,
    pub records: Vec<Exported>,
}

/// One data record (unidirectional).
#[derive(Debug)]
pub struct Exported {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub packets: u64,
    pub octets: u64,
    /// flowEndReason.
    pub reason: u8,
}

/// The next message of an IPFIX stream (TCP); None when the stream ends between messages.
pub fn read_message(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut header = [0u8; 16];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("reading a message header: {e}"),
    }
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    assert!(len >= 16, "message length {len}");
    let mut bytes = header.to_vec();
    bytes.resize(len, 0);
    stream
        .read_exact(&mut bytes[16..])
        .unwrap_or_else(|e| panic!("reading a message of {len} bytes: {e}"));
    Some(bytes)
}

/// Decodes one message with `parser`, which keeps the templates of earlier ones; a data
/// set whose template the parser has not seen fails the test.
pub fn decode(parser: &mut NetflowParser, bytes: &[u8]) -> Decoded {
    let result = parser.parse_bytes(bytes);
    assert!(result.error.is_none(), "decoding: {:?}", result.error);
    let mut packets = result.packets.into_iter();
    let (Some(NetflowPacket::IPFix(ipfix)), None) = (packets.next(), packets.next()) else {
        panic!("not one IPFIX message");
    };
    let mut decoded = Decoded {
        sequence: ipfix.header.sequence_number,
        templates: 0,
        records: Vec::new(),
    };
    for set in ipfix.flowsets {
        match set.body {
            FlowSetBody::Templates(t) => decoded.templates += t.len(),
            FlowSetBody::Template(_) => decoded.templates += 1,
            FlowSetBody::Data(data) => decoded
                .records
                .extend(data.fields.iter().map(|r| record(r))),
            other => panic!("a set decoded as {other:?}: its template was not sent first"),
        }
    }
    decoded
}

fn record(fields: &[(IpfixField, FieldValue)]) -> Exported {
    // netflow_parser names the elements; its Debug form is e.g. `IANA(OctetDeltaCount)`.
    let get = |names: &[&str]| {
        fields
            .iter()
            .find(|(f, _)| {
                let f = format!("{f:?}");
                names.iter().any(|n| f.ends_with(&format!("({n})")))
            })
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("none of {names:?} in {fields:?}"))
    };
    let addr = |v: &FieldValue| match v {
        FieldValue::Ip4Addr(a) => IpAddr::V4(*a),
        FieldValue::Ip6Addr(a) => IpAddr::V6(*a),
        other => panic!("address {other:?}"),
    };
    let num = |v: &FieldValue| {
        v.as_u64()
            .or_else(|| v.as_u8().map(u64::from))
            .unwrap_or_else(|| panic!("number {v:?}"))
    };
    let reason = match get(&["FlowEndReason"]) {
        FieldValue::FlowEndReason(r) => u8::from(*r),
        other => panic!("flowEndReason {other:?}"),
    };
    Exported {
        src: addr(get(&["SourceIpv4address", "SourceIpv6address"])),
        dst: addr(get(&["DestinationIpv4address", "DestinationIpv6address"])),
        src_port: num(get(&["SourceTransportPort"])) as u16,
        dst_port: num(get(&["DestinationTransportPort"])) as u16,
        proto: num(get(&["ProtocolIdentifier"])) as u8,
        packets: num(get(&["PacketDeltaCount"])),
        octets: num(get(&["OctetDeltaCount"])),
        reason,
    }
}
