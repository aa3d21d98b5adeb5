//! The first payload of a new connection, handed from the kernel programs to the agent
//! through the `HELLO_EVENTS` ring buffer when it may name the server: a TLS handshake
//! record opening a TCP connection (the ClientHello and its SNI), or a QUIC Initial
//! opening a UDP flow. The header is that of DNS events.

use crate::{
    dns::DnsEventHeader,
    parse::{Frame, IPPROTO_TCP, IPPROTO_UDP, PacketInfo},
};

/// Bytes of a first payload copied at most: a whole Ethernet-sized segment or datagram.
pub const HELLO_CAPTURE_MAX: usize = 1500;

/// Ring buffer size in bytes (a power of two): about 670 events between two drains.
pub const HELLO_RING_BYTES: u32 = 1 << 20;

/// One ring buffer record. In the header, `msg_len` is the payload's length in this
/// packet and `captured_len` the bytes copied after it; `flags` may carry
/// [`crate::dns::flags::COPY_FAILED`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HelloEvent {
    pub header: DnsEventHeader,
    pub data: [u8; HELLO_CAPTURE_MAX],
}

/// TLS record type of a handshake, the major version every TLS record carries, and the
/// handshake type of a ClientHello (the record's sixth byte): a server's records are not.
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_MAJOR: u8 = 0x03;
const CLIENT_HELLO: u8 = 0x01;

/// QUIC versions whose Initial packets the agent can open: 1 (RFC 9000) and 2 (RFC 9369).
const QUIC_V1: u32 = 0x0000_0001;
const QUIC_V2: u32 = 0x6b33_43cf;

/// The least UDP payload that can carry a client's QUIC Initial: clients pad every such
/// datagram to 1200 bytes, and servers drop shorter ones (RFC 9000, section 14.1). The
/// programs look no further into a shorter first datagram.
pub const QUIC_MIN_INITIAL: u64 = 1200;

/// Whether a connection's first payload, at `offset` in the frame, is one the agent wants:
/// on TCP a TLS handshake record that starts a ClientHello, on UDP a QUIC long-header
/// Initial packet (whose type bits differ between versions 1 and 2).
#[inline(always)]
pub fn is_hello<F: Frame + ?Sized>(f: &F, info: &PacketInfo, offset: u32) -> bool {
    match info.proto {
        IPPROTO_TCP => {
            matches!(
                f.load::<6>(offset as usize),
                Some([TLS_HANDSHAKE, TLS_MAJOR, _, _, _, CLIENT_HELLO])
            )
        }
        IPPROTO_UDP => {
            let Some(head) = f.load::<5>(offset as usize) else {
                return false;
            };
            let version = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            // Long header and fixed bit set; then the packet type (bits 0x30).
            let kind = head[0] & 0xf0;
            (kind == 0xc0 && version == QUIC_V1) || (kind == 0xd0 && version == QUIC_V2)
        }
        _ => false,
    }
}
