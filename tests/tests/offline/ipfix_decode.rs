//! The encoder's output decoded by an independent IPFIX parser (the `netflow_parser`
//! crate): templates, reduced-size encoding, RFC 5103 biflow records, messages split under
//! 1,400 bytes, and sequence numbers that count data records.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use monitor::conntable::EndReason;
use monitor::export::ipfix::{
    Encoder, MAX_MESSAGE, Message, NAT_TEMPLATE_OFFSET, PostNat, REVERSE_PEN, Record, Reverse,
    TEMPLATE_BIFLOW_V4, TEMPLATE_BIFLOW_V6, TEMPLATE_V4, TEMPLATE_V6, ie, template_fields,
};
use netflow_parser::{
    FieldValue, NetflowPacket, NetflowParser,
    variable_versions::ipfix::{FlowSetBody, Header, Template},
};

const NOW_MS: u64 = 1_795_478_400_000;

/// A data record's values by (enterprise number, element id); 0 is IANA.
type Fields = HashMap<(u32, u16), FieldValue>;

/// One decoded message: its header, the templates it carried, and its data records as
/// (template id, {(enterprise, element id): value}).
struct Decoded {
    header: Header,
    templates: Vec<Template>,
    records: Vec<(u16, Fields)>,
}

/// Decodes `message` with `parser`, which keeps the templates of earlier messages;
/// `known` maps template ids to their fields as decoded so far.
fn decode(
    parser: &mut NetflowParser,
    known: &mut HashMap<u16, Template>,
    message: &Message,
) -> Decoded {
    let result = parser.parse_bytes(&message.bytes);
    assert!(result.error.is_none(), "parse error: {:?}", result.error);
    assert_eq!(result.packets.len(), 1, "one IPFIX message");
    let Some(NetflowPacket::IPFix(ipfix)) = result.packets.into_iter().next() else {
        panic!("not decoded as IPFIX");
    };
    let mut decoded = Decoded {
        header: ipfix.header,
        templates: Vec::new(),
        records: Vec::new(),
    };
    for set in ipfix.flowsets {
        match set.body {
            FlowSetBody::Template(t) => decoded.templates.push(t),
            FlowSetBody::Templates(ts) => decoded.templates.extend(ts),
            FlowSetBody::Data(data) => {
                let id = set.header.header_id;
                let template = decoded
                    .templates
                    .iter()
                    .find(|t| t.template_id == id)
                    .or_else(|| known.get(&id))
                    .unwrap_or_else(|| panic!("data set {id} before its template"))
                    .clone();
                for record in data.fields {
                    assert_eq!(record.len(), template.fields.len(), "set {id}");
                    let values = template
                        .fields
                        .iter()
                        .zip(record)
                        .map(|(f, (_, value))| {
                            (
                                (f.enterprise_number.unwrap_or(0), f.field_type_number),
                                value,
                            )
                        })
                        .collect();
                    decoded.records.push((id, values));
                }
            }
            other => panic!("unexpected set {other:?}"),
        }
    }
    for t in &decoded.templates {
        known.insert(t.template_id, t.clone());
    }
    decoded
}

fn num(value: &FieldValue) -> u64 {
    match value {
        FieldValue::TcpControlBits(bits, width) => {
            assert_eq!(*width, 1, "tcpControlBits in its reduced size");
            u64::from(u16::from(*bits))
        }
        FieldValue::FlowEndReason(reason) => u64::from(u8::from(*reason)),
        other => other
            .as_u64()
            .or_else(|| other.as_u8().map(u64::from))
            .unwrap_or_else(|| panic!("not a number: {other:?}")),
    }
}

fn addr(value: &FieldValue) -> IpAddr {
    match value {
        FieldValue::Ip4Addr(a) => IpAddr::V4(*a),
        FieldValue::Ip6Addr(a) => IpAddr::V6(*a),
        other => panic!("not an address: {other:?}"),
    }
}

/// The record the decoded fields describe.
fn to_record(fields: &Fields) -> Record {
    let get = |pen: u32, id: u16| {
        fields
            .get(&(pen, id))
            .unwrap_or_else(|| panic!("element {pen}/{id} missing"))
    };
    let iana = |id| num(get(0, id));
    let v6 = fields.contains_key(&(0, ie::SOURCE_IPV6_ADDRESS));
    let (src, dst, icmp) = if v6 {
        (
            ie::SOURCE_IPV6_ADDRESS,
            ie::DESTINATION_IPV6_ADDRESS,
            ie::ICMP_TYPE_CODE_IPV6,
        )
    } else {
        (
            ie::SOURCE_IPV4_ADDRESS,
            ie::DESTINATION_IPV4_ADDRESS,
            ie::ICMP_TYPE_CODE_IPV4,
        )
    };
    let end_reason = match iana(ie::FLOW_END_REASON) {
        1 => EndReason::Idle,
        2 => EndReason::ActiveTimeout,
        3 => EndReason::EndOfFlow,
        4 => EndReason::ForcedEnd,
        5 => EndReason::LackOfResources,
        other => panic!("flowEndReason {other}"),
    };
    let reverse = fields
        .contains_key(&(REVERSE_PEN, ie::OCTET_DELTA_COUNT))
        .then(|| Reverse {
            octets: num(get(REVERSE_PEN, ie::OCTET_DELTA_COUNT)),
            packets: num(get(REVERSE_PEN, ie::PACKET_DELTA_COUNT)),
            tcp_flags: num(get(REVERSE_PEN, ie::TCP_CONTROL_BITS)) as u8,
        });
    Record {
        src: addr(get(0, src)),
        dst: addr(get(0, dst)),
        src_port: iana(ie::SOURCE_TRANSPORT_PORT) as u16,
        dst_port: iana(ie::DESTINATION_TRANSPORT_PORT) as u16,
        proto: iana(ie::PROTOCOL_IDENTIFIER) as u8,
        tcp_flags: iana(ie::TCP_CONTROL_BITS) as u8,
        icmp_type_code: iana(icmp) as u16,
        ingress_if: iana(ie::INGRESS_INTERFACE) as u32,
        egress_if: iana(ie::EGRESS_INTERFACE) as u32,
        direction: iana(ie::FLOW_DIRECTION) as u8,
        end_reason,
        octets: iana(ie::OCTET_DELTA_COUNT),
        packets: iana(ie::PACKET_DELTA_COUNT),
        start_ms: iana(ie::FLOW_START_MILLISECONDS),
        end_ms: iana(ie::FLOW_END_MILLISECONDS),
        reverse,
        nat: post_nat(fields, v6),
    }
}

/// The postNAT/postNAPT elements, where the record has them.
fn post_nat(fields: &Fields, v6: bool) -> Option<PostNat> {
    let (src, dst) = if v6 {
        (
            ie::POST_NAT_SOURCE_IPV6_ADDRESS,
            ie::POST_NAT_DESTINATION_IPV6_ADDRESS,
        )
    } else {
        (
            ie::POST_NAT_SOURCE_IPV4_ADDRESS,
            ie::POST_NAT_DESTINATION_IPV4_ADDRESS,
        )
    };
    let get = |id| fields.get(&(0, id));
    Some(PostNat {
        src: addr(get(src)?),
        dst: addr(get(dst)?),
        src_port: num(get(ie::POST_NAPT_SOURCE_TRANSPORT_PORT)?) as u16,
        dst_port: num(get(ie::POST_NAPT_DESTINATION_TRANSPORT_PORT)?) as u16,
    })
}

/// A mix of TCP, UDP, ICMP and ICMPv6, IPv4 and IPv6, every end reason, counts that need
/// all 8 octets, and every TCP flag.
fn records(n: usize) -> Vec<Record> {
    let reasons = [
        EndReason::Idle,
        EndReason::ActiveTimeout,
        EndReason::EndOfFlow,
        EndReason::ForcedEnd,
        EndReason::LackOfResources,
    ];
    (0..n)
        .map(|i| {
            let v6 = i % 3 == 2;
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                (
                    format!("2001:db8:1::{:x}", i + 1).parse().unwrap(),
                    "2001:db8:2::80".parse().unwrap(),
                )
            } else {
                (
                    format!("198.18.{}.{}", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                    "203.0.113.9".parse().unwrap(),
                )
            };
            let proto = match (i / 3) % 3 {
                0 => 6,
                1 => 17,
                _ if v6 => 58,
                _ => 1,
            };
            let icmp = proto == 1 || proto == 58;
            Record {
                src,
                dst,
                src_port: if icmp { 0 } else { 40_000 + i as u16 },
                dst_port: if icmp { 0x0800 } else { 443 },
                proto,
                tcp_flags: if proto == 6 { (i as u8) | 0x02 } else { 0 },
                icmp_type_code: if icmp { 0x0800 } else { 0 },
                ingress_if: if i % 2 == 0 { 0 } else { 7 },
                egress_if: if i % 2 == 0 { 7 } else { 0 },
                direction: u8::from(i % 2 == 0),
                end_reason: reasons[i % reasons.len()],
                octets: 5_000_000_000 + i as u64,
                packets: 3_000_000 + i as u64,
                start_ms: NOW_MS - 60_000 + i as u64,
                end_ms: NOW_MS - 1_000 + i as u64,
                reverse: None,
                // Every fourth record is of a translated connection.
                nat: (i % 4 == 0).then(|| PostNat {
                    src: if v6 {
                        "2001:db8:2::1".parse().unwrap()
                    } else {
                        "203.0.113.1".parse().unwrap()
                    },
                    dst,
                    src_port: 20_000 + i as u16,
                    dst_port: if icmp { 0x0800 } else { 443 },
                }),
            }
        })
        .collect()
}

fn sorted(mut records: Vec<Record>) -> Vec<Record> {
    records.sort_by_key(|r| (r.src, r.dst, r.src_port, r.proto, r.octets));
    records
}

#[test]
fn templates_decode_with_their_reduced_sizes() {
    for biflow in [false, true] {
        let mut encoder = Encoder::new(9, biflow, Some(Duration::from_secs(60)));
        let messages = encoder.encode(&[], NOW_MS);
        assert_eq!(messages.len(), 1, "templates alone at start");
        let mut parser = NetflowParser::default();
        let decoded = decode(&mut parser, &mut HashMap::new(), &messages[0]);
        assert_eq!(decoded.header.version, 10);
        assert_eq!(decoded.header.observation_domain_id, 9);
        assert_eq!(decoded.header.export_time, (NOW_MS / 1000) as u32);
        assert_eq!(decoded.header.sequence_number, 0);
        assert!(decoded.records.is_empty());
        let [v4, v6] = if biflow {
            [TEMPLATE_BIFLOW_V4, TEMPLATE_BIFLOW_V6]
        } else {
            [TEMPLATE_V4, TEMPLATE_V6]
        };
        let ids = [v4, v6, v4 + NAT_TEMPLATE_OFFSET, v6 + NAT_TEMPLATE_OFFSET];
        assert_eq!(
            decoded
                .templates
                .iter()
                .map(|t| t.template_id)
                .collect::<Vec<_>>(),
            ids
        );
        let kinds = [(false, false), (false, true), (true, false), (true, true)];
        for (template, (nat, v6)) in decoded.templates.iter().zip(kinds) {
            let got: Vec<(u16, u16, u32)> = template
                .fields
                .iter()
                .map(|f| {
                    (
                        f.field_type_number,
                        f.field_length,
                        f.enterprise_number.unwrap_or(0),
                    )
                })
                .collect();
            let want: Vec<(u16, u16, u32)> = template_fields(v6, biflow, nat)
                .iter()
                .map(|f| (f.id, f.len, f.pen))
                .collect();
            assert_eq!(got, want, "template {}", template.template_id);
            // Reduced-size encoding (RFC 7011 section 6.2): tcpControlBits in one octet,
            // the form pmacct reads; the counters in eight.
            let len = |pen: u32, id: u16| got.iter().find(|f| (f.2, f.0) == (pen, id)).map(|f| f.1);
            assert_eq!(len(0, ie::TCP_CONTROL_BITS), Some(1));
            assert_eq!(len(0, ie::OCTET_DELTA_COUNT), Some(8));
            if biflow {
                assert_eq!(len(REVERSE_PEN, ie::TCP_CONTROL_BITS), Some(1));
                assert_eq!(len(REVERSE_PEN, ie::OCTET_DELTA_COUNT), Some(8));
                assert_eq!(len(REVERSE_PEN, ie::PACKET_DELTA_COUNT), Some(8));
            }
        }
    }
}

#[test]
fn records_decode_to_what_was_encoded() {
    let mut encoder = Encoder::new(1, false, Some(Duration::from_secs(60)));
    let sent = records(15);
    let messages = encoder.encode(&sent, NOW_MS);
    assert_eq!(
        messages.len(),
        1,
        "15 records fit one message with the templates"
    );
    let mut parser = NetflowParser::default();
    let decoded = decode(&mut parser, &mut HashMap::new(), &messages[0]);
    assert_eq!(decoded.templates.len(), 4);
    let got: Vec<Record> = decoded.records.iter().map(|(_, r)| to_record(r)).collect();
    assert_eq!(sorted(got), sorted(sent));
    // The reduced-size tcpControlBits decode as flags, not as a two-octet number.
    let (_, first) = &decoded.records[0];
    let Some(FieldValue::TcpControlBits(bits, 1)) = first.get(&(0, ie::TCP_CONTROL_BITS)) else {
        panic!("tcpControlBits not decoded as one-octet flags");
    };
    assert!(
        bits.syn && !bits.ns,
        "every TCP record here has SYN: {bits:?}"
    );
}

#[test]
fn biflow_records_decode_with_reverse_elements() {
    let mut encoder = Encoder::new(1, true, Some(Duration::from_secs(60)));
    let sent: Vec<Record> = records(9)
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.reverse = Some(Reverse {
                octets: 7_000_000_000 + i as u64,
                packets: 9_000 + i as u64,
                tcp_flags: if r.proto == 6 { 0x12 } else { 0 },
            });
            r
        })
        .collect();
    let messages = encoder.encode(&sent, NOW_MS);
    let mut parser = NetflowParser::default();
    let mut known = HashMap::new();
    let mut got = Vec::new();
    for m in &messages {
        let decoded = decode(&mut parser, &mut known, m);
        for (id, fields) in &decoded.records {
            let biflow = [TEMPLATE_BIFLOW_V4, TEMPLATE_BIFLOW_V6];
            assert!(
                biflow.contains(id) || biflow.map(|t| t + NAT_TEMPLATE_OFFSET).contains(id),
                "template {id}"
            );
            // netflow_parser names enterprise 29305 as RFC 5103's reverse elements.
            assert!(
                fields.keys().filter(|(pen, _)| *pen == REVERSE_PEN).count() == 3,
                "three reverse elements"
            );
            got.push(to_record(fields));
        }
    }
    let template = &known[&TEMPLATE_BIFLOW_V4];
    let reverse: Vec<String> = template
        .fields
        .iter()
        .filter(|f| f.enterprise_number == Some(REVERSE_PEN))
        .map(|f| format!("{:?}", f.field_type))
        .collect();
    assert_eq!(
        reverse,
        [
            "ReverseInformationElement(ReverseOctetDeltaCount)",
            "ReverseInformationElement(ReversePacketDeltaCount)",
            "ReverseInformationElement(ReverseTcpControlBits)",
        ]
    );
    assert_eq!(sorted(got), sorted(sent));
}

#[test]
fn split_messages_decode_with_sequence_numbers() {
    let mut encoder = Encoder::new(3, false, Some(Duration::from_secs(60)));
    let sent = records(200);
    let mut messages = encoder.encode(&sent, NOW_MS);
    assert!(messages.len() >= 10, "200 records need many messages");
    // A later flush continues the count; a refresh of the templates alone does not move it.
    messages.extend(encoder.encode(&sent[..5], NOW_MS + 1_000));
    messages.extend(encoder.encode(&[], NOW_MS + 61_000));
    let mut parser = NetflowParser::default();
    let mut known = HashMap::new();
    let mut expected_seq = 0u32;
    let mut got = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        assert!(
            m.bytes.len() <= MAX_MESSAGE,
            "message {i}: {} bytes",
            m.bytes.len()
        );
        let decoded = decode(&mut parser, &mut known, m);
        assert_eq!(decoded.header.length as usize, m.bytes.len(), "message {i}");
        assert_eq!(decoded.header.observation_domain_id, 3);
        assert_eq!(
            decoded.header.sequence_number, expected_seq,
            "message {i}: data records before it in this domain"
        );
        assert_eq!(decoded.records.len() as u32, m.records, "message {i}");
        expected_seq += decoded.records.len() as u32;
        got.extend(decoded.records.iter().map(|(_, r)| to_record(r)));
    }
    assert!(
        !messages.last().unwrap().bytes.is_empty() && messages.last().unwrap().records == 0,
        "the refresh is a message of templates alone"
    );
    assert_eq!(expected_seq, 205);
    let mut want = sent.clone();
    want.extend_from_slice(&sent[..5]);
    assert_eq!(sorted(got), sorted(want));
}
