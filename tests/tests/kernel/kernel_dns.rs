//! The DNS copy of the kernel programs on crafted frames through `BPF_PROG_TEST_RUN`:
//! every program hands port-53 messages (UDP and TCP, both directions, IPv4 and IPv6) to
//! the `DNS_EVENTS` ring buffer with the right header and bytes, leaves every other packet
//! alone, never changes a packet, keeps counting flows exactly, and counts what a full
//! ring buffer refuses.

use std::net::Ipv6Addr;

use monitor_common::{
    dns::{
        DIRECTION_EGRESS, DIRECTION_INGRESS, DNS_CAPTURE_MAX, DNS_RING_BYTES, DnsEvent,
        DnsEventHeader, flags,
    },
    stats,
};
use tests::bpf::loopback_ifindex;
use tests::kernel_harness::{Hook, Kernel};
use tests::packet::{Frame, UDP_HLEN, ipproto, tcp_flags};

const CLIENT4: [u8; 4] = [198, 18, 0, 10];
const RESOLVER4: [u8; 4] = [192, 0, 2, 53];
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 10);
const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 53);

/// The direction a hook's events are marked with.
fn direction(hook: Hook) -> u8 {
    match hook {
        Hook::Xdp | Hook::TcIngress => DIRECTION_INGRESS,
        Hook::TcEgress => DIRECTION_EGRESS,
    }
}

/// A query for `name` (type A), as a resolver library writes it.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// Bytes that are no one's DNS, with every value of a byte in them.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 256) as u8).collect()
}

/// Packets counted in the flow map, both directions, all flows.
fn flow_packets(k: &Kernel) -> u64 {
    k.counts().values().flatten().map(|d| d.pkts).sum()
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

#[test]
fn udp_queries_and_responses_both_families_every_hook() {
    let msg = query(0x1234, "files.example.test");
    let response = pattern(300);
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        let frames = [
            (
                Frame::eth()
                    .ipv4(CLIENT4, RESOLVER4)
                    .udp(40000, 53)
                    .payload(&msg),
                (v4(CLIENT4), v4(RESOLVER4), 40000, 53, 4),
                &msg,
            ),
            (
                Frame::eth()
                    .ipv4(RESOLVER4, CLIENT4)
                    .udp(53, 40000)
                    .payload(&response),
                (v4(RESOLVER4), v4(CLIENT4), 53, 40000, 4),
                &response,
            ),
            (
                Frame::eth()
                    .ipv6(CLIENT6, RESOLVER6)
                    .udp(40001, 53)
                    .payload(&msg),
                (CLIENT6.octets(), RESOLVER6.octets(), 40001, 53, 6),
                &msg,
            ),
            (
                Frame::eth()
                    .ipv6(RESOLVER6, CLIENT6)
                    .udp(53, 40001)
                    .payload(&response),
                (RESOLVER6.octets(), CLIENT6.octets(), 53, 40001, 6),
                &response,
            ),
        ];
        for (frame, _, _) in &frames {
            k.run(hook, &frame.build());
        }
        let events = k.dns_events();
        assert_eq!(
            events.len(),
            frames.len(),
            "{hook:?}: one event per message"
        );
        for ((header, data), (_, (src, dst, sport, dport, family), bytes)) in
            events.iter().zip(&frames)
        {
            let want = DnsEventHeader {
                ts_ns: header.ts_ns,
                src: *src,
                dst: *dst,
                sport: *sport,
                dport: *dport,
                ifindex: loopback_ifindex(),
                family: *family,
                proto: ipproto::UDP,
                direction: direction(hook),
                flags: 0,
                msg_len: bytes.len() as u16,
                captured_len: bytes.len() as u16,
            };
            assert_eq!(*header, want, "{hook:?}: header");
            assert_ne!(header.ts_ns, 0, "{hook:?}: timestamp");
            assert_eq!(data, *bytes, "{hook:?}: message bytes");
        }
        assert_eq!(flow_packets(&k), 4, "{hook:?}: DNS packets still counted");
        assert_eq!(
            k.stats()[stats::DNS_EVENTS_LOST as usize],
            0,
            "{hook:?}: nothing lost"
        );
    }
}

#[test]
fn tcp_messages_skip_the_length_prefix() {
    let msg = query(7, "files.example.test");
    let mut with_prefix = (msg.len() as u16).to_be_bytes().to_vec();
    with_prefix.extend_from_slice(&msg);
    // The prefix announces more than the segment carries: the message spans segments.
    let mut partial = 600u16.to_be_bytes().to_vec();
    partial.extend_from_slice(&msg);
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        let psh = tcp_flags::PSH | tcp_flags::ACK;
        k.run(
            hook,
            &Frame::eth()
                .ipv4(CLIENT4, RESOLVER4)
                .tcp(40000, 53, psh)
                .payload(&with_prefix)
                .build(),
        );
        k.run(
            hook,
            &Frame::eth()
                .ipv6(RESOLVER6, CLIENT6)
                .tcp(53, 40000, psh)
                .payload(&partial)
                .build(),
        );
        // Handshake and bare ACKs carry no message.
        for flags in [
            tcp_flags::SYN,
            tcp_flags::ACK,
            tcp_flags::FIN | tcp_flags::ACK,
        ] {
            k.run(
                hook,
                &Frame::eth()
                    .ipv4(CLIENT4, RESOLVER4)
                    .tcp(40000, 53, flags)
                    .build(),
            );
        }
        let events = k.dns_events();
        assert_eq!(events.len(), 2, "{hook:?}: {events:?}");
        let (h, data) = &events[0];
        assert_eq!(
            (h.proto, h.flags, h.msg_len, h.captured_len),
            (ipproto::TCP, 0, msg.len() as u16, msg.len() as u16),
            "{hook:?}"
        );
        assert_eq!(*data, msg, "{hook:?}: bytes after the prefix");
        let (h, data) = &events[1];
        assert_eq!(
            (h.family, h.sport, h.flags, h.msg_len, h.captured_len),
            (6, 53, flags::TCP_PARTIAL, 600, msg.len() as u16),
            "{hook:?}"
        );
        assert_eq!(*data, msg, "{hook:?}");
        assert_eq!(flow_packets(&k), 5, "{hook:?}");
    }
}

#[test]
fn long_messages_are_cut_and_fragments_flagged() {
    let long = pattern(2000);
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        k.run(
            hook,
            &Frame::eth()
                .ipv4(RESOLVER4, CLIENT4)
                .udp(53, 40000)
                .payload(&long)
                .build(),
        );
        // The first fragment of a 3000-byte response: its UDP length counts all of it.
        let first = Frame::eth()
            .ipv4(RESOLVER4, CLIENT4)
            .ipv4_fragment(0, true)
            .udp(53, 40000)
            .payload(&long[..1000]);
        let mut bytes = first.build();
        let udp_len = first.layout().l4_off + 4;
        bytes[udp_len..udp_len + 2].copy_from_slice(&(3000 + UDP_HLEN as u16).to_be_bytes());
        k.run(hook, &bytes);
        // A later fragment has no UDP header: nothing to see.
        k.run(
            hook,
            &Frame::eth()
                .ipv4(RESOLVER4, CLIENT4)
                .ipv4_fragment(128, false)
                .udp(53, 40000)
                .payload(&long[..500])
                .build(),
        );
        let events = k.dns_events();
        assert_eq!(events.len(), 2, "{hook:?}");
        let (h, data) = &events[0];
        assert_eq!(
            (h.flags, h.msg_len, h.captured_len),
            (0, 2000, DNS_CAPTURE_MAX as u16),
            "{hook:?}"
        );
        assert_eq!(data[..], long[..DNS_CAPTURE_MAX], "{hook:?}");
        let (h, data) = &events[1];
        assert_eq!(
            (h.flags, h.msg_len, h.captured_len),
            (flags::FRAGMENT, 3000, 1000),
            "{hook:?}"
        );
        assert_eq!(data[..], long[..1000], "{hook:?}");
    }
}

#[test]
fn other_ports_and_protocols_produce_no_event() {
    let msg = query(1, "example.test");
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        let frames = [
            Frame::eth()
                .ipv4(CLIENT4, RESOLVER4)
                .udp(40000, 5353)
                .payload(&msg),
            Frame::eth()
                .ipv4(CLIENT4, RESOLVER4)
                .udp(54, 52)
                .payload(&msg),
            Frame::eth()
                .ipv4(CLIENT4, RESOLVER4)
                .tcp(40000, 853, tcp_flags::PSH | tcp_flags::ACK)
                .payload(&msg),
            Frame::eth()
                .ipv6(CLIENT6, RESOLVER6)
                .udp(40000, 443)
                .payload(&msg),
            // ICMP type 53 sits in a port slot; it is not DNS.
            Frame::eth()
                .ipv4(CLIENT4, RESOLVER4)
                .icmp(53, 0)
                .payload(&msg),
            Frame::eth()
                .ipv4(CLIENT4, RESOLVER4)
                .proto(ipproto::GRE)
                .payload(&msg),
            // Empty UDP datagram to port 53.
            Frame::eth().ipv4(CLIENT4, RESOLVER4).udp(40000, 53),
        ];
        for f in &frames {
            k.run(hook, &f.build());
        }
        assert_eq!(k.dns_events(), vec![], "{hook:?}");
        assert_eq!(flow_packets(&k), frames.len() as u64, "{hook:?}");
        assert_eq!(k.stats()[stats::DNS_EVENTS_LOST as usize], 0, "{hook:?}");
    }
}

#[test]
fn a_full_ring_buffer_counts_every_lost_message() {
    let fits = DNS_RING_BYTES as usize / size_of::<DnsEvent>();
    let sent = 2 * fits as u32;
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        let frame = Frame::eth()
            .ipv4(RESOLVER4, CLIENT4)
            .udp(53, 40000)
            .payload(&pattern(200))
            .build();
        k.run_repeat(hook, &frame, sent);
        let got = k.dns_events().len() as u64;
        let lost = k.stats()[stats::DNS_EVENTS_LOST as usize];
        assert!(
            got > 0 && lost > 0,
            "{hook:?}: {got} events, {lost} lost of {sent}"
        );
        assert_eq!(got + lost, sent as u64, "{hook:?}: none silently lost");
        assert_eq!(
            flow_packets(&k),
            sent as u64,
            "{hook:?}: every packet counted"
        );
        // Room again once the agent has read: the next message gets through.
        k.run(hook, &frame);
        assert_eq!(k.dns_events().len(), 1, "{hook:?}");
        assert_eq!(k.stats()[stats::DNS_EVENTS_LOST as usize], lost, "{hook:?}");
    }
}
