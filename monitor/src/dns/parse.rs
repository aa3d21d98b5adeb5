//! Ring buffer records -> DNS messages. Anything that does not parse as DNS is kept as
//! "not DNS" with its endpoints: a raw tunnel on port 53 looks like that.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use monitor_common::dns::{DnsEventHeader, flags};
use simple_dns::{Name, Packet, rdata::RData};

use crate::addr;

/// The packet a message came in: endpoints as sent, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Kernel clock (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
}

impl Meta {
    /// The querier and the server, whichever way this packet went: the server is the
    /// side on port 53 (a query's destination, a response's source).
    pub fn client_server(&self, response: bool) -> ((IpAddr, u16), (IpAddr, u16)) {
        if response {
            ((self.dst, self.dport), (self.src, self.sport))
        } else {
            ((self.src, self.sport), (self.dst, self.dport))
        }
    }
}

/// What a ring buffer record held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Message(Message),
    /// One IP fragment of a larger message: it cannot be parsed one packet at a time.
    Fragment,
    /// Bytes on port 53 that are not a DNS message.
    NotDns,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
    /// The first question's name, labels joined with dots, bytes as sent (8-bit labels
    /// included), ASCII letters lowercased.
    pub qname: Vec<u8>,
    pub qtype: u16,
    pub answers: Vec<Answer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: Vec<u8>,
    pub ttl: u32,
    pub data: AnswerData,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerData {
    Addr(IpAddr),
    Cname(Vec<u8>),
    /// Another record type, by name.
    Other(String),
}

/// Smallest question (root name, type, class) and resource record (root name, type,
/// class, TTL, length).
const MIN_QUESTION: usize = 5;
const MIN_RECORD: usize = 11;

/// Splits one ring buffer record into its packet and what it carried.
pub fn decode(record: &[u8]) -> Option<(Meta, Payload)> {
    let (meta, bits, data) = split(record)?;
    let payload = if bits & (flags::FRAGMENT | flags::TCP_PARTIAL) != 0 {
        Payload::Fragment
    } else {
        parse_message(data).map_or(Payload::NotDns, Payload::Message)
    };
    Some((meta, payload))
}

/// A record of a ring whose events start with a [`DnsEventHeader`] (`DNS_EVENTS`,
/// `HELLO_EVENTS`): the packet, the header's flags and the bytes copied.
pub fn split(record: &[u8]) -> Option<(Meta, u8, &[u8])> {
    let header_len = size_of::<DnsEventHeader>();
    let header_bytes = record.get(..header_len)?;
    // SAFETY: DnsEventHeader is plain data without padding; read_unaligned copes with any
    // alignment of the record.
    let header: DnsEventHeader = unsafe { std::ptr::read_unaligned(header_bytes.as_ptr().cast()) };
    let addr = |a: [u8; 16]| addr::from_wire(header.family, &a);
    let meta = Meta {
        ts_ns: header.ts_ns,
        src: addr(header.src),
        dst: addr(header.dst),
        sport: header.sport,
        dport: header.dport,
        proto: header.proto,
    };
    let data = record.get(header_len..)?;
    let data = data.get(..header.captured_len as usize)?;
    Some((meta, header.flags, data))
}

/// Parses a whole DNS message; `None` when it is not one.
pub fn parse_message(data: &[u8]) -> Option<Message> {
    let header: [u8; 12] = data.get(..12)?.try_into().ok()?;
    let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]) as usize;
    // The counts must fit the message before the parser reserves room for them.
    let least = count(4) * MIN_QUESTION + (count(6) + count(8) + count(10)) * MIN_RECORD;
    if 12 + least > data.len() || count(4) == 0 {
        return None;
    }
    let packet = Packet::parse(data).ok()?;
    let question = packet.questions.first()?;
    let answers = packet
        .answers
        .iter()
        .map(|rr| Answer {
            name: name_bytes(&rr.name),
            ttl: rr.ttl,
            data: match &rr.rdata {
                RData::A(a) => AnswerData::Addr(IpAddr::V4(Ipv4Addr::from(a.address))),
                RData::AAAA(a) => AnswerData::Addr(IpAddr::V6(Ipv6Addr::from(a.address))),
                RData::CNAME(c) => AnswerData::Cname(name_bytes(&c.0)),
                other => AnswerData::Other(type_name(u16::from(other.type_code()))),
            },
        })
        .collect();
    Some(Message {
        id: u16::from_be_bytes([header[0], header[1]]),
        response: header[2] & 0x80 != 0,
        rcode: header[3] & 0x0f,
        qname: name_bytes(&question.qname),
        qtype: u16::from(question.qtype),
        answers,
    })
}

fn name_bytes(name: &Name<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.as_bytes() {
        if !out.is_empty() {
            out.push(b'.');
        }
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out
}

/// A name for people and logs: printable ASCII as it is, other bytes as `\DDD`
/// (the zone-file escape Zeek uses too).
pub fn display_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name {
        if b.is_ascii_graphic() && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\{b:03}"));
        }
    }
    out
}

/// Zeek's `qtype_name`: the mnemonic, else the number.
pub fn type_name(code: u16) -> String {
    let name = match code {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        10 => "NULL",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        39 => "DNAME",
        41 => "OPT",
        43 => "DS",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        255 => "*",
        257 => "CAA",
        n => return n.to_string(),
    };
    name.to_owned()
}

/// Zeek's `rcode_name`.
pub fn rcode_name(rcode: u8) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        n => return n.to_string(),
    };
    name.to_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A message: header, one question, then answers `(name, ttl, type, rdata)`.
    pub fn message(
        id: u16,
        response: bool,
        rcode: u8,
        qname: &[u8],
        qtype: u16,
        answers: &[(&[u8], u32, u16, Vec<u8>)],
    ) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.push(if response { 0x81 } else { 0x01 });
        m.push(if response { 0x80 | rcode } else { 0 });
        m.extend_from_slice(&[0, 1]);
        m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend(wire_name(qname));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        for (name, ttl, ty, rdata) in answers {
            m.extend(wire_name(name));
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    pub fn wire_name(name: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split(|&b| b == b'.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label);
        }
        out.push(0);
        out
    }

    #[test]
    fn response_with_cname_chain_and_addresses() {
        let bytes = message(
            9,
            true,
            0,
            b"Files.Example.test",
            1,
            &[
                (b"files.example.test", 60, 5, wire_name(b"cdn.example.test")),
                (b"cdn.example.test", 30, 1, vec![203, 0, 113, 10]),
            ],
        );
        let m = parse_message(&bytes).expect("parses");
        assert_eq!(m.id, 9);
        assert!(m.response);
        assert_eq!(m.qname, b"files.example.test");
        assert_eq!(m.qtype, 1);
        assert_eq!(
            m.answers,
            vec![
                Answer {
                    name: b"files.example.test".to_vec(),
                    ttl: 60,
                    data: AnswerData::Cname(b"cdn.example.test".to_vec()),
                },
                Answer {
                    name: b"cdn.example.test".to_vec(),
                    ttl: 30,
                    data: AnswerData::Addr("203.0.113.10".parse().unwrap()),
                },
            ]
        );
    }

    #[test]
    fn eight_bit_labels_parse_and_display_escaped() {
        let name: &[u8] = b"a\xff\x00b.t.example.test";
        let m = parse_message(&message(1, false, 0, name, 10, &[])).expect("8-bit labels");
        assert_eq!(m.qname, name);
        assert_eq!(display_name(&m.qname), "a\\255\\000b.t.example.test");
        assert_eq!(type_name(m.qtype), "NULL");
    }

    #[test]
    fn garbage_and_lying_counts_are_not_dns() {
        assert_eq!(parse_message(b""), None);
        assert_eq!(parse_message(&[0; 11]), None);
        assert_eq!(parse_message(&[0xab; 200]), None);
        // 65535 answers claimed in a short message: refused before any allocation.
        let mut m = message(1, true, 0, b"example.test", 1, &[]);
        m[6] = 0xff;
        m[7] = 0xff;
        assert_eq!(parse_message(&m), None);
        // Cut inside the question.
        let m = message(1, false, 0, b"example.test", 1, &[]);
        assert_eq!(parse_message(&m[..m.len() - 3]), None);
        // No question.
        let mut m = message(1, false, 0, b"example.test", 1, &[]);
        m[5] = 0;
        assert_eq!(parse_message(&m), None);
    }

    #[test]
    fn names() {
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(12), "12");
        assert_eq!(type_name(28), "AAAA");
        assert_eq!(type_name(4242), "4242");
    }
}
