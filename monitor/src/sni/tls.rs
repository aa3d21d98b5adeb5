//! The ClientHello: its `server_name` and whether it offers Encrypted Client Hello, from
//! a TLS record opening a TCP connection or from the bare handshake message that QUIC's
//! CRYPTO frames carry. Parsed with `tls-parser`; a hello cut short (split across
//! segments, or longer than the copy) still yields its name when the extensions before
//! the cut include it.

use tls_parser::{
    SNIType, TlsExtension, TlsExtensionType, TlsRecordType, parse_tls_client_hello_extension,
    parse_tls_handshake_client_hello, parse_tls_record_header,
};

/// What a ClientHello told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The first host name of the `server_name` extension, lowercased; `None` when the
    /// hello has none (a connection to an address) or it is not a host name.
    pub server_name: Option<String>,
    /// The hello offers Encrypted Client Hello: `server_name` is the outer, public name.
    pub ech: bool,
}

/// `encrypted_client_hello` (RFC 9849), which tls-parser knows by number only.
const ECH: TlsExtensionType = TlsExtensionType(0xfe0d);
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

/// A TLS record starting with a ClientHello: `None` when it is not one, or when it was
/// cut before the `server_name` extension and the extensions parsed so far.
pub fn from_record(payload: &[u8]) -> Option<ClientHello> {
    let (rest, header) = parse_tls_record_header(payload).ok()?;
    if header.record_type != TlsRecordType::Handshake {
        return None;
    }
    from_handshake(&rest[..rest.len().min(usize::from(header.len))])
}

/// A handshake message (type, 24-bit length, body) that is a ClientHello, possibly cut.
pub fn from_handshake(message: &[u8]) -> Option<ClientHello> {
    let (&kind, rest) = message.split_first()?;
    if kind != HANDSHAKE_CLIENT_HELLO || rest.len() < 3 {
        return None;
    }
    let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
    let body = &rest[3..];
    let cut = body.len() < len;
    let (after, hello) = parse_tls_handshake_client_hello(&body[..body.len().min(len)]).ok()?;
    // tls-parser gives the extensions only when their block is whole: a cut one is read
    // extension by extension, up to the cut.
    let (extensions, whole) = match hello.ext {
        Some(ext) => (ext, !cut),
        None => (after.get(2..).unwrap_or_default(), !cut && after.is_empty()),
    };
    let mut found = ClientHello::default();
    let mut named = false;
    let mut input = extensions;
    while !input.is_empty() {
        let Ok((next, extension)) = parse_tls_client_hello_extension(input) else {
            break;
        };
        match extension {
            TlsExtension::SNI(names) => {
                named = true;
                found.server_name = names
                    .iter()
                    .find(|(kind, _)| *kind == SNIType::HostName)
                    .and_then(|(_, name)| host_name(name));
            }
            TlsExtension::Unknown(kind, _) if kind == ECH => found.ech = true,
            _ => {}
        }
        input = next;
    }
    (named || (whole && input.is_empty())).then_some(found)
}

/// A host name as sent, lowercased: letters, digits, `-`, `_` and dots only.
fn host_name(bytes: &[u8]) -> Option<String> {
    let ok = !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| String::from_utf8_lossy(bytes).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend((data.len() as u16).to_be_bytes());
        out.extend(data);
        out
    }

    fn sni(name: &str) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend(entry);
        extension(0, &list)
    }

    /// A ClientHello handshake message with these extensions.
    fn handshake(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7; 32]);
        body.push(0);
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        let block: Vec<u8> = extensions.concat();
        body.extend((block.len() as u16).to_be_bytes());
        body.extend(block);
        let mut out = vec![HANDSHAKE_CLIENT_HELLO];
        out.extend(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend(body);
        out
    }

    fn record(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0x16, 3, 1];
        out.extend((message.len() as u16).to_be_bytes());
        out.extend(message);
        out
    }

    fn named(name: &str) -> Option<ClientHello> {
        Some(ClientHello {
            server_name: Some(name.to_owned()),
            ech: false,
        })
    }

    #[test]
    fn the_server_name_of_a_record_or_a_bare_message() {
        let msg = handshake(&[
            extension(0x0a0a, &[]),
            sni("Exfil.TEST"),
            extension(16, b"\0\x03\x02h2"),
        ]);
        assert_eq!(from_record(&record(&msg)), named("exfil.test"));
        assert_eq!(from_handshake(&msg), named("exfil.test"));
    }

    #[test]
    fn ech_marks_the_outer_name() {
        let msg = handshake(&[sni("public.example"), extension(0xfe0d, &[0, 1, 2])]);
        let hello = from_handshake(&msg).unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("public.example"));
        assert!(hello.ech);
    }

    #[test]
    fn a_whole_hello_without_a_name_is_parsed_a_cut_one_is_not() {
        let msg = handshake(&[extension(16, b"\0\x03\x02h2"), extension(21, &[0; 300])]);
        assert_eq!(from_handshake(&msg), Some(ClientHello::default()));
        assert_eq!(from_handshake(&msg[..msg.len() - 100]), None);
    }

    #[test]
    fn a_hello_cut_after_its_name_still_gives_it() {
        let msg = handshake(&[sni("exfil.test"), extension(21, &[0; 1400])]);
        let first_segment = &record(&msg)[..600];
        assert_eq!(from_record(first_segment), named("exfil.test"));
        // Cut before the extensions: nothing to tell.
        assert_eq!(from_record(&record(&msg)[..40]), None);
    }

    #[test]
    fn other_payloads_and_odd_names_are_not_names() {
        assert_eq!(from_record(b"GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(from_record(&[0x17, 3, 3, 0, 2, 1, 2]), None);
        let msg = handshake(&[sni("bad name\n")]);
        assert_eq!(from_handshake(&msg), Some(ClientHello::default()));
    }
}
