//! Records to IPFIX messages (RFC 7011) with RFC 5103 reverse elements; no I/O.

use std::{net::IpAddr, time::Duration};

use crate::conntable::EndReason;

pub const VERSION: u16 = 10;
/// No message is longer (a safe payload on any path with a 1,500-byte MTU).
pub const MAX_MESSAGE: usize = 1400;
/// Private enterprise number of RFC 5103's reverse information elements.
pub const REVERSE_PEN: u32 = 29305;
pub const TEMPLATE_SET_ID: u16 = 2;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
pub const TEMPLATE_BIFLOW_V4: u16 = 258;
pub const TEMPLATE_BIFLOW_V6: u16 = 259;
/// The templates of translated connections: the four above plus [`NAT_TEMPLATE_OFFSET`].
pub const NAT_TEMPLATE_OFFSET: u16 = 4;

const HEADER_LEN: usize = 16;
const SET_HEADER_LEN: usize = 4;

/// IANA information element ids.
pub mod ie {
    pub const OCTET_DELTA_COUNT: u16 = 1;
    pub const PACKET_DELTA_COUNT: u16 = 2;
    pub const PROTOCOL_IDENTIFIER: u16 = 4;
    pub const TCP_CONTROL_BITS: u16 = 6;
    pub const SOURCE_TRANSPORT_PORT: u16 = 7;
    pub const SOURCE_IPV4_ADDRESS: u16 = 8;
    pub const INGRESS_INTERFACE: u16 = 10;
    pub const DESTINATION_TRANSPORT_PORT: u16 = 11;
    pub const DESTINATION_IPV4_ADDRESS: u16 = 12;
    pub const EGRESS_INTERFACE: u16 = 14;
    pub const SOURCE_IPV6_ADDRESS: u16 = 27;
    pub const DESTINATION_IPV6_ADDRESS: u16 = 28;
    pub const ICMP_TYPE_CODE_IPV4: u16 = 32;
    pub const FLOW_DIRECTION: u16 = 61;
    pub const FLOW_END_REASON: u16 = 136;
    pub const ICMP_TYPE_CODE_IPV6: u16 = 139;
    pub const FLOW_START_MILLISECONDS: u16 = 152;
    pub const FLOW_END_MILLISECONDS: u16 = 153;
    pub const POST_NAT_SOURCE_IPV4_ADDRESS: u16 = 225;
    pub const POST_NAT_DESTINATION_IPV4_ADDRESS: u16 = 226;
    pub const POST_NAPT_SOURCE_TRANSPORT_PORT: u16 = 227;
    pub const POST_NAPT_DESTINATION_TRANSPORT_PORT: u16 = 228;
    pub const POST_NAT_SOURCE_IPV6_ADDRESS: u16 = 281;
    pub const POST_NAT_DESTINATION_IPV6_ADDRESS: u16 = 282;
}

/// One field specifier of a template: element id, length, enterprise (0 for IANA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub id: u16,
    pub len: u16,
    pub pen: u32,
}

const fn iana(id: u16, len: u16) -> Field {
    Field { id, len, pen: 0 }
}

const fn reverse(id: u16, len: u16) -> Field {
    Field {
        id,
        len,
        pen: REVERSE_PEN,
    }
}

/// The fields of a template, in wire order; a record is encoded by walking them. `nat`:
/// the template of translated connections, whose records also carry the endpoints as
/// translated.
pub fn template_fields(v6: bool, biflow: bool, nat: bool) -> Vec<Field> {
    use ie::*;
    let mut fields = if v6 {
        vec![
            iana(SOURCE_IPV6_ADDRESS, 16),
            iana(DESTINATION_IPV6_ADDRESS, 16),
        ]
    } else {
        vec![
            iana(SOURCE_IPV4_ADDRESS, 4),
            iana(DESTINATION_IPV4_ADDRESS, 4),
        ]
    };
    let icmp = if v6 {
        ICMP_TYPE_CODE_IPV6
    } else {
        ICMP_TYPE_CODE_IPV4
    };
    fields.extend([
        iana(SOURCE_TRANSPORT_PORT, 2),
        iana(DESTINATION_TRANSPORT_PORT, 2),
        iana(PROTOCOL_IDENTIFIER, 1),
        iana(TCP_CONTROL_BITS, 1),
        iana(icmp, 2),
        iana(INGRESS_INTERFACE, 4),
        iana(EGRESS_INTERFACE, 4),
        iana(FLOW_DIRECTION, 1),
        iana(FLOW_END_REASON, 1),
        iana(OCTET_DELTA_COUNT, 8),
        iana(PACKET_DELTA_COUNT, 8),
        iana(FLOW_START_MILLISECONDS, 8),
        iana(FLOW_END_MILLISECONDS, 8),
    ]);
    if biflow {
        fields.extend([
            reverse(OCTET_DELTA_COUNT, 8),
            reverse(PACKET_DELTA_COUNT, 8),
            reverse(TCP_CONTROL_BITS, 1),
        ]);
    }
    if nat {
        let addr_len = if v6 { 16 } else { 4 };
        let (src, dst) = if v6 {
            (
                POST_NAT_SOURCE_IPV6_ADDRESS,
                POST_NAT_DESTINATION_IPV6_ADDRESS,
            )
        } else {
            (
                POST_NAT_SOURCE_IPV4_ADDRESS,
                POST_NAT_DESTINATION_IPV4_ADDRESS,
            )
        };
        fields.extend([
            iana(src, addr_len),
            iana(dst, addr_len),
            iana(POST_NAPT_SOURCE_TRANSPORT_PORT, 2),
            iana(POST_NAPT_DESTINATION_TRANSPORT_PORT, 2),
        ]);
    }
    fields
}

fn template_id(v6: bool, biflow: bool, nat: bool) -> u16 {
    let id = match (v6, biflow) {
        (false, false) => TEMPLATE_V4,
        (true, false) => TEMPLATE_V6,
        (false, true) => TEMPLATE_BIFLOW_V4,
        (true, true) => TEMPLATE_BIFLOW_V6,
    };
    if nat { id + NAT_TEMPLATE_OFFSET } else { id }
}

fn record_len(v6: bool, biflow: bool, nat: bool) -> usize {
    template_fields(v6, biflow, nat)
        .iter()
        .map(|f| usize::from(f.len))
        .sum()
}

/// A translated connection's record direction as translated (postNAT/postNAPT elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostNat {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// The reverse direction of a biflow record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverse {
    pub octets: u64,
    pub packets: u64,
    pub tcp_flags: u8,
}

/// One data record before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Both of the same family.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub icmp_type_code: u16,
    pub ingress_if: u32,
    pub egress_if: u32,
    /// 0 ingress, 1 egress.
    pub direction: u8,
    pub end_reason: EndReason,
    pub octets: u64,
    pub packets: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Set for biflow records (RFC 5103).
    pub reverse: Option<Reverse>,
    /// Set for the records of a translated connection.
    pub nat: Option<PostNat>,
}

impl Record {
    fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    fn template_id(&self) -> u16 {
        template_id(self.v6(), self.reverse.is_some(), self.nat.is_some())
    }

    fn encoded_len(&self) -> usize {
        record_len(self.v6(), self.reverse.is_some(), self.nat.is_some())
    }

    fn write(&self, out: &mut Vec<u8>) {
        for field in template_fields(self.v6(), self.reverse.is_some(), self.nat.is_some()) {
            self.write_field(field, out);
        }
    }

    fn write_field(&self, field: Field, out: &mut Vec<u8>) {
        use ie::*;
        let rev = self.reverse.unwrap_or_default();
        let nat = self.nat.unwrap_or(PostNat {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
        });
        let addr = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let bytes = match (field.pen, field.id) {
            (REVERSE_PEN, OCTET_DELTA_COUNT) => rev.octets.to_be_bytes().to_vec(),
            (REVERSE_PEN, PACKET_DELTA_COUNT) => rev.packets.to_be_bytes().to_vec(),
            (REVERSE_PEN, TCP_CONTROL_BITS) => vec![rev.tcp_flags],
            (_, SOURCE_IPV4_ADDRESS | SOURCE_IPV6_ADDRESS) => addr(self.src),
            (_, DESTINATION_IPV4_ADDRESS | DESTINATION_IPV6_ADDRESS) => addr(self.dst),
            (_, SOURCE_TRANSPORT_PORT) => self.src_port.to_be_bytes().to_vec(),
            (_, DESTINATION_TRANSPORT_PORT) => self.dst_port.to_be_bytes().to_vec(),
            (_, PROTOCOL_IDENTIFIER) => vec![self.proto],
            (_, TCP_CONTROL_BITS) => vec![self.tcp_flags],
            (_, ICMP_TYPE_CODE_IPV4 | ICMP_TYPE_CODE_IPV6) => {
                self.icmp_type_code.to_be_bytes().to_vec()
            }
            (_, INGRESS_INTERFACE) => self.ingress_if.to_be_bytes().to_vec(),
            (_, EGRESS_INTERFACE) => self.egress_if.to_be_bytes().to_vec(),
            (_, FLOW_DIRECTION) => vec![self.direction],
            (_, FLOW_END_REASON) => vec![self.end_reason as u8],
            (_, OCTET_DELTA_COUNT) => self.octets.to_be_bytes().to_vec(),
            (_, PACKET_DELTA_COUNT) => self.packets.to_be_bytes().to_vec(),
            (_, FLOW_START_MILLISECONDS) => self.start_ms.to_be_bytes().to_vec(),
            (_, FLOW_END_MILLISECONDS) => self.end_ms.to_be_bytes().to_vec(),
            (_, POST_NAT_SOURCE_IPV4_ADDRESS | POST_NAT_SOURCE_IPV6_ADDRESS) => addr(nat.src),
            (_, POST_NAT_DESTINATION_IPV4_ADDRESS | POST_NAT_DESTINATION_IPV6_ADDRESS) => {
                addr(nat.dst)
            }
            (_, POST_NAPT_SOURCE_TRANSPORT_PORT) => nat.src_port.to_be_bytes().to_vec(),
            (_, POST_NAPT_DESTINATION_TRANSPORT_PORT) => nat.dst_port.to_be_bytes().to_vec(),
            _ => unreachable!("field {field:?} is in no template"),
        };
        debug_assert_eq!(bytes.len(), usize::from(field.len), "{field:?}");
        out.extend_from_slice(&bytes);
    }
}

/// One encoded IPFIX message and the number of data records in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub records: u32,
}

/// Records to messages, with the sequence number and template timing of one observation
/// domain. No I/O.
#[derive(Debug)]
pub struct Encoder {
    domain_id: u32,
    biflow: bool,
    /// None: the messages never carry templates; the transport sends
    /// [`Encoder::templates_message`] itself (TCP, on every new connection).
    template_refresh: Option<Duration>,
    /// Data records encoded so far (mod 2^32).
    sequence: u32,
    /// Export time (epoch ms) the templates were last sent at.
    templates_at: Option<u64>,
}

impl Encoder {
    pub fn new(domain_id: u32, biflow: bool, template_refresh: Option<Duration>) -> Self {
        Self {
            domain_id,
            biflow,
            template_refresh,
            sequence: 0,
            templates_at: None,
        }
    }

    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    fn templates_due(&self, now_ms: u64) -> bool {
        self.template_refresh.is_some_and(|refresh| {
            self.templates_at
                .is_none_or(|at| Duration::from_millis(now_ms.saturating_sub(at)) >= refresh)
        })
    }

    /// A message of the templates alone, exported at `now_ms`, with the current sequence
    /// number.
    pub fn templates_message(&self, now_ms: u64) -> Message {
        let mut bytes = vec![0; HEADER_LEN];
        bytes.extend(self.template_set());
        self.write_header(&mut bytes, now_ms);
        Message { bytes, records: 0 }
    }

    fn write_header(&self, buf: &mut [u8], now_ms: u64) {
        let len = buf.len() as u16;
        buf[0..2].copy_from_slice(&VERSION.to_be_bytes());
        buf[2..4].copy_from_slice(&len.to_be_bytes());
        buf[4..8].copy_from_slice(&((now_ms / 1000) as u32).to_be_bytes());
        buf[8..12].copy_from_slice(&self.sequence.to_be_bytes());
        buf[12..16].copy_from_slice(&self.domain_id.to_be_bytes());
    }

    /// The template set for the current mode: IPv4 and IPv6, then both for translated
    /// connections.
    pub fn template_set(&self) -> Vec<u8> {
        let mut set = Vec::new();
        set.extend_from_slice(&TEMPLATE_SET_ID.to_be_bytes());
        set.extend_from_slice(&[0, 0]);
        for (nat, v6) in [(false, false), (false, true), (true, false), (true, true)] {
            let fields = template_fields(v6, self.biflow, nat);
            set.extend_from_slice(&template_id(v6, self.biflow, nat).to_be_bytes());
            set.extend_from_slice(&(fields.len() as u16).to_be_bytes());
            for f in fields {
                if f.pen == 0 {
                    set.extend_from_slice(&f.id.to_be_bytes());
                    set.extend_from_slice(&f.len.to_be_bytes());
                } else {
                    set.extend_from_slice(&(f.id | 0x8000).to_be_bytes());
                    set.extend_from_slice(&f.len.to_be_bytes());
                    set.extend_from_slice(&f.pen.to_be_bytes());
                }
            }
        }
        let len = set.len() as u16;
        set[2..4].copy_from_slice(&len.to_be_bytes());
        set
    }

    /// Encodes `records` (grouped by template) into messages of at most [`MAX_MESSAGE`]
    /// bytes exported at `now_ms` (epoch ms). The first message starts with the templates
    /// when a refresh is due (or they were never sent); with no records, that is a message
    /// of templates alone.
    pub fn encode(&mut self, records: &[Record], now_ms: u64) -> Vec<Message> {
        let mut order: Vec<&Record> = records.iter().collect();
        order.sort_by_key(|r| r.template_id());
        let mut messages = Vec::new();
        let mut next = 0;
        loop {
            let mut buf = vec![0; HEADER_LEN];
            if self.templates_due(now_ms) {
                buf.extend(self.template_set());
                self.templates_at = Some(now_ms);
            }
            let mut count = 0u32;
            // (template id, offset of the set header)
            let mut set: Option<(u16, usize)> = None;
            while let Some(record) = order.get(next) {
                let id = record.template_id();
                let open = set.is_some_and(|(open, _)| open == id);
                let need = record.encoded_len() + if open { 0 } else { SET_HEADER_LEN };
                if buf.len() + need > MAX_MESSAGE && buf.len() > HEADER_LEN {
                    break;
                }
                if !open {
                    close_set(&mut buf, set);
                    set = Some((id, buf.len()));
                    buf.extend_from_slice(&id.to_be_bytes());
                    buf.extend_from_slice(&[0, 0]);
                }
                record.write(&mut buf);
                count += 1;
                next += 1;
            }
            close_set(&mut buf, set);
            if buf.len() > HEADER_LEN {
                self.write_header(&mut buf, now_ms);
                self.sequence = self.sequence.wrapping_add(count);
                messages.push(Message {
                    bytes: buf,
                    records: count,
                });
            }
            if next >= order.len() {
                return messages;
            }
        }
    }
}

fn close_set(buf: &mut [u8], set: Option<(u16, usize)>) {
    if let Some((_, start)) = set {
        let len = (buf.len() - start) as u16;
        buf[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {

    use monitor_common::parse::IPPROTO_TCP;

    use super::*;

    fn v4_record() -> Record {
        Record {
            src: "198.18.0.2".parse().unwrap(),
            dst: "203.0.113.9".parse().unwrap(),
            src_port: 40000,
            dst_port: 443,
            proto: IPPROTO_TCP,
            tcp_flags: 0x1b,
            icmp_type_code: 0,
            ingress_if: 0,
            egress_if: 3,
            direction: 1,
            end_reason: EndReason::EndOfFlow,
            octets: 1500,
            packets: 10,
            start_ms: 0x0102_0304_0506,
            end_ms: 0x0102_0304_0607,
            reverse: None,
            nat: None,
        }
    }

    #[test]
    fn header_template_and_record_bytes() {
        let mut encoder = Encoder::new(7, false, Some(Duration::from_secs(60)));
        let now_ms = 1_700_000_000_123;
        let messages = encoder.encode(&[v4_record()], now_ms);
        assert_eq!(messages.len(), 1);
        let bytes = &messages[0].bytes;
        // header 16 + template set (4 + 2 * (4 + 15 * 4) + 2 * (4 + 19 * 4)) + data set
        // (4 + 58)
        assert_eq!(bytes.len(), 16 + 292 + 62);
        #[rustfmt::skip]
        let header = [
            0x00, 0x0a, 0x01, 0x72,             // version 10, length 370
            0x65, 0x53, 0xf1, 0x00,             // export time 1,700,000,000 s
            0x00, 0x00, 0x00, 0x00,             // sequence 0
            0x00, 0x00, 0x00, 0x07,             // domain 7
        ];
        assert_eq!(&bytes[..16], &header);
        #[rustfmt::skip]
        let template_v4 = [
            0x00, 0x02, 0x01, 0x24,             // template set, length 292
            0x01, 0x00, 0x00, 0x0f,             // template 256, 15 fields
            0x00, 0x08, 0x00, 0x04,             // sourceIPv4Address
            0x00, 0x0c, 0x00, 0x04,             // destinationIPv4Address
            0x00, 0x07, 0x00, 0x02,             // sourceTransportPort
            0x00, 0x0b, 0x00, 0x02,             // destinationTransportPort
            0x00, 0x04, 0x00, 0x01,             // protocolIdentifier
            0x00, 0x06, 0x00, 0x01,             // tcpControlBits, reduced to 1 octet
            0x00, 0x20, 0x00, 0x02,             // icmpTypeCodeIPv4
            0x00, 0x0a, 0x00, 0x04,             // ingressInterface
            0x00, 0x0e, 0x00, 0x04,             // egressInterface
            0x00, 0x3d, 0x00, 0x01,             // flowDirection
            0x00, 0x88, 0x00, 0x01,             // flowEndReason
            0x00, 0x01, 0x00, 0x08,             // octetDeltaCount
            0x00, 0x02, 0x00, 0x08,             // packetDeltaCount
            0x00, 0x98, 0x00, 0x08,             // flowStartMilliseconds
            0x00, 0x99, 0x00, 0x08,             // flowEndMilliseconds
        ];
        assert_eq!(&bytes[16..16 + 68], &template_v4);
        // the IPv6 template: 257, 15 fields, addresses 27/28 of 16 octets, icmp 139
        assert_eq!(&bytes[84..96], &[1, 1, 0, 15, 0, 27, 0, 16, 0, 28, 0, 16]);
        assert_eq!(&bytes[112..116], &[0, 139, 0, 2]);
        // translated IPv4: 260, the same 15 fields, then the four post-translation ones
        assert_eq!(&bytes[148..152], &[1, 4, 0, 19]);
        #[rustfmt::skip]
        let post_nat = [
            0x00, 0xe1, 0x00, 0x04,             // postNATSourceIPv4Address
            0x00, 0xe2, 0x00, 0x04,             // postNATDestinationIPv4Address
            0x00, 0xe3, 0x00, 0x02,             // postNAPTSourceTransportPort
            0x00, 0xe4, 0x00, 0x02,             // postNAPTDestinationTransportPort
        ];
        assert_eq!(&bytes[212..228], &post_nat);
        // translated IPv6: 261, addresses 281/282 of 16 octets
        assert_eq!(&bytes[228..232], &[1, 5, 0, 19]);
        assert_eq!(&bytes[292..300], &[1, 25, 0, 16, 1, 26, 0, 16]);
        #[rustfmt::skip]
        let data = [
            0x01, 0x00, 0x00, 0x3e,             // set 256, length 62
            198, 18, 0, 2,                      // source
            203, 0, 113, 9,                     // destination
            0x9c, 0x40, 0x01, 0xbb,             // ports 40000 -> 443
            0x06, 0x1b,                         // TCP, flags FIN SYN PSH ACK
            0x00, 0x00,                         // icmpTypeCode
            0x00, 0x00, 0x00, 0x00,             // ingressInterface
            0x00, 0x00, 0x00, 0x03,             // egressInterface
            0x01, 0x03,                         // egress, end of flow
            0, 0, 0, 0, 0, 0, 0x05, 0xdc,       // 1500 octets
            0, 0, 0, 0, 0, 0, 0x00, 0x0a,       // 10 packets
            0, 0, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, // start
            0, 0, 0x01, 0x02, 0x03, 0x04, 0x06, 0x07, // end
        ];
        assert_eq!(&bytes[308..], &data);
        assert_eq!(messages[0].records, 1);
    }

    #[test]
    fn a_translated_record_carries_its_post_nat_endpoints() {
        let mut record = v4_record();
        record.nat = Some(PostNat {
            src: "203.0.113.1".parse().expect("address"),
            dst: record.dst,
            src_port: 61000,
            dst_port: 443,
        });
        assert_eq!(record.template_id(), TEMPLATE_V4 + NAT_TEMPLATE_OFFSET);
        let mut out = Vec::new();
        record.write(&mut out);
        assert_eq!(out.len(), 58 + 12);
        assert_eq!(
            &out[58..],
            &[203, 0, 113, 1, 203, 0, 113, 9, 0xee, 0x48, 0x01, 0xbb]
        );
    }

    #[test]
    fn biflow_template_uses_reverse_elements() {
        let encoder = Encoder::new(1, true, Some(Duration::from_secs(60)));
        let set = encoder.template_set();
        // v4: 4 + 15 * 4 + 3 * 8; two templates, and two of translated connections with
        // four fields more
        assert_eq!(set.len(), 4 + 2 * (4 + 60 + 24) + 2 * (4 + 60 + 24 + 16));
        assert_eq!(&set[4..8], &[1, 2, 0, 18]);
        #[rustfmt::skip]
        let reverse = [
            0x80, 0x01, 0x00, 0x08, 0x00, 0x00, 0x72, 0x79, // reverseOctetDeltaCount
            0x80, 0x02, 0x00, 0x08, 0x00, 0x00, 0x72, 0x79, // reversePacketDeltaCount
            0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x72, 0x79, // reverseTcpControlBits
        ];
        assert_eq!(&set[68..92], &reverse);
        let mut record = v4_record();
        record.reverse = Some(Reverse {
            octets: 0x0203,
            packets: 4,
            tcp_flags: 0x12,
        });
        let mut out = Vec::new();
        record.write(&mut out);
        assert_eq!(out.len(), 58 + 17);
        assert_eq!(
            &out[58..],
            &[0, 0, 0, 0, 0, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 4, 0x12]
        );
    }

    #[test]
    fn splits_under_1400_bytes_with_sequence_numbers() {
        let mut encoder = Encoder::new(1, false, Some(Duration::from_secs(60)));
        let mut v6 = v4_record();
        v6.src = "2001:db8::1".parse().unwrap();
        v6.dst = "2001:db8::2".parse().unwrap();
        let records: Vec<Record> = (0..60)
            .map(|i| if i % 3 == 0 { v6.clone() } else { v4_record() })
            .collect();
        let messages = encoder.encode(&records, 1_000);
        assert!(messages.len() > 1, "60 records must not fit one message");
        let mut seq = 0u32;
        let mut total = 0;
        for (i, m) in messages.iter().enumerate() {
            assert!(
                m.bytes.len() <= MAX_MESSAGE,
                "message {i}: {}",
                m.bytes.len()
            );
            let len = u16::from_be_bytes([m.bytes[2], m.bytes[3]]) as usize;
            assert_eq!(len, m.bytes.len(), "message {i} length field");
            let got = u32::from_be_bytes(m.bytes[8..12].try_into().unwrap());
            assert_eq!(got, seq, "message {i} sequence number");
            // The sets fill the message exactly, each with a valid length.
            let mut off = HEADER_LEN;
            let mut in_sets = 0;
            while off < m.bytes.len() {
                let id = u16::from_be_bytes([m.bytes[off], m.bytes[off + 1]]);
                let set_len = u16::from_be_bytes([m.bytes[off + 2], m.bytes[off + 3]]) as usize;
                assert!(
                    set_len >= 4 && off + set_len <= m.bytes.len(),
                    "message {i}"
                );
                let rec = match id {
                    TEMPLATE_V4 => 58,
                    TEMPLATE_V6 => 82,
                    TEMPLATE_SET_ID => {
                        off += set_len;
                        continue;
                    }
                    other => panic!("unexpected set {other}"),
                };
                assert_eq!((set_len - 4) % rec, 0, "set {id} of message {i}");
                in_sets += (set_len - 4) / rec;
                off += set_len;
            }
            assert_eq!(in_sets as u32, m.records, "message {i} record count");
            // Full: the next record would not have fitted.
            if i + 1 < messages.len() {
                assert!(m.bytes.len() + 82 + 4 > MAX_MESSAGE, "message {i} not full");
            }
            seq += m.records;
            total += m.records;
        }
        assert_eq!(total, 60);
        assert_eq!(encoder.sequence(), 60);
        // The next message continues the count.
        let next = encoder.encode(&[v4_record()], 2_000);
        assert_eq!(&next[0].bytes[8..12], &60u32.to_be_bytes());
    }

    #[test]
    fn templates_first_then_on_refresh() {
        let mut encoder = Encoder::new(1, false, Some(Duration::from_secs(60)));
        let has_templates =
            |m: &Message| u16::from_be_bytes([m.bytes[16], m.bytes[17]]) == TEMPLATE_SET_ID;
        let start = encoder.encode(&[], 1_000_000);
        assert_eq!(start.len(), 1, "templates alone at start");
        assert!(has_templates(&start[0]));
        assert_eq!(start[0].records, 0);
        assert!(encoder.encode(&[], 1_030_000).is_empty(), "nothing due");
        let m = encoder.encode(&[v4_record()], 1_059_999);
        assert!(!has_templates(&m[0]), "refresh not due before 60 s");
        let m = encoder.encode(&[v4_record()], 1_060_000);
        assert!(has_templates(&m[0]), "refresh due after 60 s");
        assert_eq!(m[0].records, 1);
        let m = encoder.encode(&[], 1_120_000);
        assert_eq!(m.len(), 1, "refresh with no data");
        let alone = encoder.templates_message(1_120_001);
        assert!(has_templates(&alone));
        assert_eq!(alone, m[0], "a refresh with no data is the templates alone");
        let mut tcp = Encoder::new(1, false, None);
        assert!(
            tcp.encode(&[], 1_000_000).is_empty(),
            "no templates without refresh"
        );
        let m = tcp.encode(&[v4_record()], 1_000_000);
        assert!(!has_templates(&m[0]), "the transport sends them");
    }
}
