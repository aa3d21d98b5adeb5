//! The TLS ClientHello inside a QUIC client's first datagram: its Initial packet is
//! protected with keys anyone derives from the Destination Connection ID (RFC 9001
//! section 5.2; version 2, RFC 9369), so an observer can read it.

use aes::{
    Aes128,
    cipher::{BlockCipherEncrypt, KeyInit},
};
use aes_gcm::{AeadInOut, Aes128Gcm};
use hkdf::Hkdf;
use sha2::Sha256;

/// QUIC version 1 (RFC 9000).
const VERSION_1: u32 = 0x0000_0001;
/// QUIC version 2 (RFC 9369).
const VERSION_2: u32 = 0x6b33_43cf;
const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];
/// Longest connection ID that versions 1 and 2 allow.
const MAX_CID: usize = 20;
const TAG_LEN: usize = 16;
/// Header protection samples 16 bytes starting 4 bytes after the packet number's start.
const SAMPLE_OFFSET: usize = 4;
const SAMPLE_LEN: usize = 16;

/// Why a datagram gave no ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a QUIC Initial packet")]
    NotInitial,
    #[error("unknown QUIC version {0:#010x}")]
    UnknownVersion(u32),
    #[error("QUIC Initial packet truncated")]
    Truncated,
    #[error("QUIC connection ID longer than 20 bytes")]
    ConnectionIdTooLong,
    #[error("QUIC Initial packet failed to decrypt")]
    DecryptFailed,
    #[error("QUIC Initial packet holds a malformed frame")]
    MalformedFrame,
    #[error("QUIC Initial packet holds frame type {0:#x}, not allowed in Initial packets")]
    UnexpectedFrame(u64),
    #[error("QUIC Initial packet holds no CRYPTO data at offset 0")]
    NoCryptoAtStart,
}

/// The CRYPTO stream bytes from offset 0 that the Initial packets at the start of `payload`
/// (one UDP payload, a client's first datagram) carry contiguously: the start of the TLS
/// ClientHello, all of it when the packets carry all of it.
///
/// The first packet must be a version 1 or 2 Initial; Initial packets coalesced after it
/// add their CRYPTO data, and whatever follows the last of them (a 0-RTT packet, padding)
/// is left alone.
pub fn client_hello(payload: &[u8]) -> Result<Vec<u8>, Error> {
    let first = Initial::parse(payload)?;
    let keys = Keys::client(first.version, first.dcid);
    let mut crypto = Vec::new();
    let mut rest = first.open(&keys, &mut crypto)?;
    while let Ok(next) = Initial::parse(rest) {
        if next.version != first.version || next.dcid != first.dcid {
            break;
        }
        match next.open(&keys, &mut crypto) {
            Ok(after) => rest = after,
            Err(_) => break,
        }
    }
    contiguous(crypto)
}

/// One long-header Initial packet, its header parsed, its protection still on.
struct Initial<'a> {
    version: u32,
    dcid: &'a [u8],
    /// The packet: header, packet number and protected payload with its tag.
    packet: &'a [u8],
    /// Where the (protected) packet number starts in `packet`.
    pn_offset: usize,
    /// What follows the packet in the datagram.
    rest: &'a [u8],
}

impl<'a> Initial<'a> {
    fn parse(datagram: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader(datagram);
        let first = r.u8().ok_or(Error::NotInitial)?;
        if first & 0x80 == 0 {
            return Err(Error::NotInitial);
        }
        let version = u32::from_be_bytes(r.array().ok_or(Error::Truncated)?);
        let initial_type = match version {
            VERSION_1 => 0b00,
            VERSION_2 => 0b01,
            other => return Err(Error::UnknownVersion(other)),
        };
        if (first >> 4) & 0b11 != initial_type {
            return Err(Error::NotInitial);
        }
        let dcid = r.connection_id()?;
        r.connection_id()?;
        let token_len = r.varint().ok_or(Error::Truncated)?;
        r.bytes(token_len).ok_or(Error::Truncated)?;
        let length = r.varint().ok_or(Error::Truncated)?;
        let pn_offset = datagram.len() - r.0.len();
        let protected = r.bytes(length).ok_or(Error::Truncated)?;
        let end = datagram.len() - r.0.len();
        if protected.len() < SAMPLE_OFFSET + SAMPLE_LEN {
            return Err(Error::Truncated);
        }
        Ok(Initial {
            version,
            dcid,
            packet: &datagram[..end],
            pn_offset,
            rest: r.0,
        })
    }

    /// Removes header protection, decrypts, and appends the CRYPTO frames' data to
    /// `crypto` as (offset, bytes); returns what follows the packet in the datagram.
    fn open(&self, keys: &Keys, crypto: &mut Vec<(u64, Vec<u8>)>) -> Result<&'a [u8], Error> {
        let mut packet = self.packet.to_vec();
        let sample_at = self.pn_offset + SAMPLE_OFFSET;
        let mut mask = aes::Block::default();
        mask.copy_from_slice(&packet[sample_at..sample_at + SAMPLE_LEN]);
        keys.hp.encrypt_block(&mut mask);
        packet[0] ^= mask[0] & 0x0f;
        let pn_len = usize::from(packet[0] & 0b11) + 1;
        let mut nonce = keys.iv;
        let pn = &mut packet[self.pn_offset..self.pn_offset + pn_len];
        for (i, byte) in pn.iter_mut().enumerate() {
            *byte ^= mask[1 + i];
            nonce[nonce.len() - pn_len + i] ^= *byte;
        }
        // A client's first packets have small numbers: the truncated encoding is the
        // number itself (RFC 9000 appendix A.3, with no packet received yet).
        let (header, body) = packet.split_at_mut(self.pn_offset + pn_len);
        let ciphertext_len = body.len().checked_sub(TAG_LEN).ok_or(Error::Truncated)?;
        let (ciphertext, tag) = body.split_at_mut(ciphertext_len);
        keys.aead
            .decrypt_inout_detached(
                (&nonce).into(),
                header,
                ciphertext.into(),
                (&*tag).try_into().map_err(|_| Error::Truncated)?,
            )
            .map_err(|_| Error::DecryptFailed)?;
        crypto_frames(ciphertext, crypto)?;
        Ok(self.rest)
    }
}

/// The client's Initial packet protection keys.
struct Keys {
    aead: Aes128Gcm,
    iv: [u8; 12],
    hp: Aes128,
}

/// The bytes the keys are made of, apart so that tests can check them.
struct KeyMaterial {
    key: [u8; 16],
    iv: [u8; 12],
    hp: [u8; 16],
}

impl KeyMaterial {
    /// RFC 9001 section 5.2, with RFC 9369 section 3.3's salt and labels for version 2.
    fn client(version: u32, dcid: &[u8]) -> Self {
        let (salt, key_label, iv_label, hp_label): (_, &[u8], &[u8], &[u8]) =
            if version == VERSION_2 {
                (&SALT_V2, b"quicv2 key", b"quicv2 iv", b"quicv2 hp")
            } else {
                (&SALT_V1, b"quic key", b"quic iv", b"quic hp")
            };
        let initial = Hkdf::<Sha256>::new(Some(salt), dcid);
        let mut client_secret = [0; 32];
        expand_label(&initial, b"client in", &mut client_secret);
        let client = Hkdf::<Sha256>::from_prk(&client_secret)
            .expect("a SHA-256 output is a valid pseudorandom key");
        let mut material = KeyMaterial {
            key: [0; 16],
            iv: [0; 12],
            hp: [0; 16],
        };
        expand_label(&client, key_label, &mut material.key);
        expand_label(&client, iv_label, &mut material.iv);
        expand_label(&client, hp_label, &mut material.hp);
        material
    }
}

impl Keys {
    fn client(version: u32, dcid: &[u8]) -> Self {
        let material = KeyMaterial::client(version, dcid);
        Keys {
            aead: Aes128Gcm::new((&material.key).into()),
            iv: material.iv,
            hp: Aes128::new((&material.hp).into()),
        }
    }
}

/// TLS 1.3's HKDF-Expand-Label (RFC 8446 section 7.1) with an empty context.
fn expand_label(secret: &Hkdf<Sha256>, label: &[u8], out: &mut [u8]) {
    const PREFIX: &[u8] = b"tls13 ";
    let length = u16::try_from(out.len())
        .expect("short output")
        .to_be_bytes();
    let label_len = [u8::try_from(PREFIX.len() + label.len()).expect("short label")];
    secret
        .expand_multi_info(&[&length, &label_len, PREFIX, label, &[0]], out)
        .expect("output no longer than 255 hashes");
}

/// Walks the frames of a decrypted Initial packet, keeping CRYPTO frames' data.
fn crypto_frames(mut plaintext: &[u8], crypto: &mut Vec<(u64, Vec<u8>)>) -> Result<(), Error> {
    let malformed = || Error::MalformedFrame;
    while let Some((&frame_type, rest)) = plaintext.split_first() {
        let mut r = Reader(rest);
        match frame_type {
            // PADDING, PING
            0x00 | 0x01 => {}
            // ACK, ACK with ECN counts
            0x02 | 0x03 => {
                r.varint().ok_or_else(malformed)?;
                r.varint().ok_or_else(malformed)?;
                let ranges = r.varint().ok_or_else(malformed)?;
                r.varint().ok_or_else(malformed)?;
                for _ in 0..ranges {
                    r.varint().ok_or_else(malformed)?;
                    r.varint().ok_or_else(malformed)?;
                }
                if frame_type == 0x03 {
                    for _ in 0..3 {
                        r.varint().ok_or_else(malformed)?;
                    }
                }
            }
            // CRYPTO
            0x06 => {
                let offset = r.varint().ok_or_else(malformed)?;
                let len = r.varint().ok_or_else(malformed)?;
                let data = r.bytes(len).ok_or_else(malformed)?;
                crypto.push((offset, data.to_vec()));
            }
            // CONNECTION_CLOSE (transport)
            0x1c => {
                r.varint().ok_or_else(malformed)?;
                r.varint().ok_or_else(malformed)?;
                let reason = r.varint().ok_or_else(malformed)?;
                r.bytes(reason).ok_or_else(malformed)?;
            }
            other => return Err(Error::UnexpectedFrame(u64::from(other))),
        }
        plaintext = r.0;
    }
    Ok(())
}

/// The stream bytes from offset 0 up to the first gap. Clients may send CRYPTO frames
/// out of order and overlapping (Chrome scrambles them on purpose).
fn contiguous(mut frames: Vec<(u64, Vec<u8>)>) -> Result<Vec<u8>, Error> {
    frames.sort_by_key(|(offset, _)| *offset);
    let mut stream = Vec::new();
    for (offset, data) in frames {
        let end = stream.len() as u64;
        if offset > end {
            break;
        }
        let skip = usize::try_from(end - offset).expect("within the datagram");
        if let Some(new) = data.get(skip..) {
            stream.extend_from_slice(new);
        }
    }
    if stream.is_empty() {
        return Err(Error::NoCryptoAtStart);
    }
    Ok(stream)
}

/// A cursor over a packet's bytes; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N as u64)?.try_into().ok()
    }

    /// A variable-length integer (RFC 9000 section 16).
    fn varint(&mut self) -> Option<u64> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut value = u64::from(first & 0x3f);
        for &byte in self.bytes(len as u64 - 1)? {
            value = value << 8 | u64::from(byte);
        }
        Some(value)
    }

    fn connection_id(&mut self) -> Result<&'a [u8], Error> {
        let len = self.u8().ok_or(Error::Truncated)?;
        if usize::from(len) > MAX_CID {
            return Err(Error::ConnectionIdTooLong);
        }
        self.bytes(u64::from(len)).ok_or(Error::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9001 appendix A.2 (and RFC 9369 appendix A.2): the client's CRYPTO frame, a
    /// ClientHello for "example.com".
    const CRYPTO_FRAME: &str = "
        060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868
        04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578
        616d706c652e636f6dff01000100000a00080006001d00170018001000070005
        04616c706e000500050100000000003300260024001d00209370b2c9caa47fba
        baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400
        0d0010000e0403050306030203080408050806002d00020101001c0002400100
        3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000
        75300901100f088394c8f03e51570806048000ffff";

    /// RFC 9001 appendix A.2: the protected client Initial, 1200 bytes.
    const V1_PACKET: &str = "
        c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11
        d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399
        1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c
        8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212
        30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5
        457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208
        4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec
        4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3
        485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db
        059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c
        7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8
        9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556
        be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74
        68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a
        c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00
        f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632
        291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964
        25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd
        14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff
        ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198
        e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd
        c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73
        203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f
        cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e
        fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade
        a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047
        90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2
        162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4
        40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0
        6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e
        8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0
        be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400
        54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab
        760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9
        f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4
        056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064
        7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241
        e221af44860018ab0856972e194cd934";

    /// RFC 9369 appendix A.2: the same Initial in version 2.
    const V2_PACKET: &str = "
        d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485
        dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04
        9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d
        250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a
        12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500
        cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68
        18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33
        12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3
        d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd
        6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520
        bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045
        636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f
        ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12
        16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5
        4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4
        fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b
        8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7
        14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9
        9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91
        abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd
        80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db
        848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18
        d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15
        c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc
        7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61
        f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710
        10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b
        3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e
        06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce
        8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1
        34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1
        e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd
        5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3
        8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89
        d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53
        6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19
        9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b
        a18b2faa745b6fe189cf772a9f84cbfc";

    /// The Destination Connection ID of both appendices.
    const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

    fn unhex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// The ClientHello the CRYPTO frame carries (after type 0x06, offset 0, length 0x40f1).
    fn rfc_client_hello() -> Vec<u8> {
        unhex(CRYPTO_FRAME)[4..].to_vec()
    }

    /// A CRYPTO frame with two-byte variable-length integers.
    fn crypto_frame(offset: usize, data: &[u8]) -> Vec<u8> {
        let varint = |n: usize| (u16::try_from(n).unwrap() | 0x4000).to_be_bytes();
        let mut frame = vec![0x06];
        frame.extend(varint(offset));
        frame.extend(varint(data.len()));
        frame.extend(data);
        frame
    }

    /// Protects `frames` as a client Initial with a 4-byte packet number, the way RFC
    /// 9001 appendix A.2 does; PADDING brings the frames to `pad_to` bytes.
    fn seal(version: u32, dcid: &[u8], pn: u32, frames: &[u8], pad_to: usize) -> Vec<u8> {
        let mut plaintext = frames.to_vec();
        plaintext.resize(pad_to.max(frames.len()), 0);
        let initial_type = if version == VERSION_2 { 0b01 } else { 0b00 };
        let mut packet = vec![0xc3 | initial_type << 4];
        packet.extend(version.to_be_bytes());
        packet.push(u8::try_from(dcid.len()).unwrap());
        packet.extend(dcid);
        packet.extend([0, 0]);
        let length = u16::try_from(4 + plaintext.len() + TAG_LEN).unwrap() | 0x4000;
        packet.extend(length.to_be_bytes());
        let pn_offset = packet.len();
        packet.extend(pn.to_be_bytes());
        let material = KeyMaterial::client(version, dcid);
        let mut nonce = material.iv;
        for (n, p) in nonce[8..].iter_mut().zip(pn.to_be_bytes()) {
            *n ^= p;
        }
        let tag = Aes128Gcm::new((&material.key).into())
            .encrypt_inout_detached((&nonce).into(), &packet, plaintext.as_mut_slice().into())
            .unwrap();
        packet.extend(plaintext);
        packet.extend(tag);
        let mut mask = aes::Block::default();
        mask.copy_from_slice(&packet[pn_offset + 4..pn_offset + 20]);
        Aes128::new((&material.hp).into()).encrypt_block(&mut mask);
        packet[0] ^= mask[0] & 0x0f;
        for i in 0..4 {
            packet[pn_offset + i] ^= mask[1 + i];
        }
        packet
    }

    #[test]
    fn keys_match_the_rfcs() {
        // RFC 9001 and RFC 9369, appendix A.1 each: key, iv, hp.
        for (version, expected) in [
            (
                VERSION_1,
                "1f369613dd76d5467730efcbe3b1a22d fa044b2f42a3fd3b46fb255c 9f50449e04a0e810283a1e9933adedd2",
            ),
            (
                VERSION_2,
                "8b1a0bc121284290a29e0971b5cd045d 91f73e2351d8fa91660e909f 45b95e15235d6f45a6b19cbcb0294ba9",
            ),
        ] {
            let keys = KeyMaterial::client(version, &DCID);
            assert_eq!(
                [&keys.key[..], &keys.iv, &keys.hp].concat(),
                unhex(expected)
            );
        }
    }

    #[test]
    fn reads_the_client_hello_of_rfc_9001_a2() {
        let hello = client_hello(&unhex(V1_PACKET)).unwrap();
        assert_eq!(hello, rfc_client_hello());
        assert_eq!(&hello[..4], [0x01, 0x00, 0x00, 0xed]);
        // The server_name extension: type 0, list of one host_name "example.com".
        let mut sni = unhex("0000 0010 000e 00 000b");
        sni.extend(b"example.com");
        assert!(hello.windows(sni.len()).any(|w| w == sni));
    }

    #[test]
    fn reads_the_client_hello_of_rfc_9369_a2() {
        assert_eq!(client_hello(&unhex(V2_PACKET)).unwrap(), rfc_client_hello());
    }

    #[test]
    fn the_test_sealer_reproduces_both_rfc_packets() {
        let frames = unhex(CRYPTO_FRAME);
        assert_eq!(seal(VERSION_1, &DCID, 2, &frames, 1162), unhex(V1_PACKET));
        assert_eq!(seal(VERSION_2, &DCID, 2, &frames, 1162), unhex(V2_PACKET));
    }

    #[test]
    fn reassembles_scrambled_overlapping_crypto_frames() {
        let hello = rfc_client_hello();
        let mut frames = crypto_frame(40, &hello[40..]);
        frames.push(0x01);
        frames.extend(crypto_frame(0, &hello[..30]));
        frames.extend([0x00, 0x00]);
        frames.extend(crypto_frame(20, &hello[20..50]));
        let packet = seal(VERSION_1, &DCID, 0, &frames, 1100);
        assert_eq!(client_hello(&packet).unwrap(), hello);
    }

    #[test]
    fn stops_at_the_first_gap() {
        let hello = rfc_client_hello();
        let mut frames = crypto_frame(0, &hello[..30]);
        frames.extend(crypto_frame(40, &hello[40..]));
        let packet = seal(VERSION_1, &DCID, 0, &frames, 1100);
        assert_eq!(client_hello(&packet).unwrap(), &hello[..30]);
    }

    #[test]
    fn wants_crypto_data_at_offset_zero() {
        let hello = rfc_client_hello();
        let packet = seal(VERSION_1, &DCID, 0, &crypto_frame(10, &hello[10..]), 1100);
        assert_eq!(client_hello(&packet), Err(Error::NoCryptoAtStart));
        let packet = seal(VERSION_1, &DCID, 0, &[0x01], 1100);
        assert_eq!(client_hello(&packet), Err(Error::NoCryptoAtStart));
    }

    #[test]
    fn skips_ack_and_connection_close_frames() {
        let hello = rfc_client_hello();
        // ACK with ECN: largest 5, delay 0, one more range, first range 1, gap 0, length
        // 0, counts 1 2 3; then CONNECTION_CLOSE: code 0, frame type 0, reason "x".
        let mut frames = unhex("03 05 00 01 01 00 00 01 02 03  1c 00 00 01 78");
        frames.extend(crypto_frame(0, &hello));
        let packet = seal(VERSION_1, &DCID, 1, &frames, 1100);
        assert_eq!(client_hello(&packet).unwrap(), hello);
    }

    #[test]
    fn refuses_frames_an_initial_packet_cannot_hold() {
        let packet = seal(VERSION_1, &DCID, 0, &[0x08, 0x00, 0x41], 1100);
        assert_eq!(client_hello(&packet), Err(Error::UnexpectedFrame(0x08)));
        let packet = seal(VERSION_1, &DCID, 0, &[0x06, 0x00, 0x05, 0x01], 0);
        assert_eq!(client_hello(&packet), Err(Error::MalformedFrame));
    }

    #[test]
    fn adds_coalesced_initial_packets_and_ignores_what_follows() {
        let hello = rfc_client_hello();
        let mut datagram = seal(VERSION_2, &DCID, 0, &crypto_frame(0, &hello[..100]), 0);
        datagram.extend(seal(
            VERSION_2,
            &DCID,
            1,
            &crypto_frame(100, &hello[100..]),
            0,
        ));
        datagram.extend([0; 64]);
        assert_eq!(client_hello(&datagram).unwrap(), hello);
        let mut other_cid = DCID;
        other_cid[0] ^= 1;
        let mut datagram = seal(VERSION_2, &DCID, 0, &crypto_frame(0, &hello[..100]), 0);
        datagram.extend(seal(
            VERSION_2,
            &other_cid,
            1,
            &crypto_frame(100, &hello[100..]),
            0,
        ));
        assert_eq!(client_hello(&datagram).unwrap(), &hello[..100]);
    }

    #[test]
    fn refuses_other_packets() {
        let mut packet = unhex(V1_PACKET);
        assert_eq!(client_hello(&[]), Err(Error::NotInitial));
        assert_eq!(client_hello(&packet[..3]), Err(Error::Truncated));
        packet[0] = 0x40;
        assert_eq!(client_hello(&packet), Err(Error::NotInitial));
        // Handshake (type 0b10 in version 1).
        packet[0] = 0xe3;
        assert_eq!(client_hello(&packet), Err(Error::NotInitial));
        // Version 1's Initial type in a version 2 packet is its Retry.
        let mut packet = unhex(V2_PACKET);
        packet[0] = 0xc3;
        assert_eq!(client_hello(&packet), Err(Error::NotInitial));
        // Draft 29, and version negotiation.
        for version in [0xff00_001d_u32, 0] {
            let mut packet = unhex(V1_PACKET);
            packet[1..5].copy_from_slice(&version.to_be_bytes());
            assert_eq!(client_hello(&packet), Err(Error::UnknownVersion(version)));
        }
        let mut packet = unhex(V1_PACKET);
        packet[5] = 21;
        assert_eq!(client_hello(&packet), Err(Error::ConnectionIdTooLong));
    }

    #[test]
    fn arbitrary_decrypted_frames_never_panic() {
        // Frame types an Initial may hold, and varint prefixes of every length, are
        // likelier than the rest so that the walk gets past the first byte.
        const LIKELY: [u8; 10] = [0x00, 0x01, 0x02, 0x03, 0x06, 0x1c, 0x40, 0x80, 0xc0, 0xff];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            let len = usize::try_from(next() % 64).unwrap();
            let frames: Vec<u8> = (0..len)
                .map(|_| match next() % 3 {
                    0 => LIKELY[usize::try_from(next() % 10).unwrap()],
                    _ => next() as u8,
                })
                .collect();
            let _ = client_hello(&seal(VERSION_1, &DCID, 0, &frames, 0));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for packet in [unhex(V1_PACKET), unhex(V2_PACKET)] {
            for len in 0..packet.len() {
                assert!(client_hello(&packet[..len]).is_err(), "length {len}");
            }
        }
    }

    #[test]
    fn every_corrupted_byte_is_an_error() {
        let packet = unhex(V1_PACKET);
        for at in 0..packet.len() {
            let mut corrupted = packet.clone();
            corrupted[at] ^= 0x10;
            assert!(client_hello(&corrupted).is_err(), "byte {at}");
        }
        let mut bad_tag = packet.clone();
        *bad_tag.last_mut().unwrap() ^= 1;
        assert_eq!(client_hello(&bad_tag), Err(Error::DecryptFailed));
    }
}
