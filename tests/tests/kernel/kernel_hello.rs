//! The first-payload copy of the kernel programs (`HELLO_EVENTS`) on crafted frames through
//! `BPF_PROG_TEST_RUN`: a connection's ClientHello is handed over once, whether its entry
//! was made by its SYN or, the agent having taken the entry in between, by a later packet;
//! a server's handshake record never is, nor a datagram too short to be a QUIC Initial.
//! The agent puts back an entry it found finished when a new use of its port pair wrote to
//! it meanwhile.

use monitor::poller::{ChangeMaps, Poller, Taken};
use monitor_common::names;
use tests::kernel_harness::{Hook, Kernel};
use tests::packet::{
    Frame,
    tcp_flags::{ACK, FIN, PSH, RST, SYN},
};
use tests::tls::client_hello;

const CLIENT: [u8; 4] = [198, 18, 0, 10];
const SERVER: [u8; 4] = [192, 0, 2, 1];
const CLIENT_PORT: u16 = 40000;
const TLS_PORT: u16 = 443;

/// A TLS handshake record the server sends: a ServerHello (handshake type 2), cut short.
const SERVER_HELLO: [u8; 9] = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00];

fn from_client(flags: u8) -> Frame {
    Frame::eth()
        .ipv4(CLIENT, SERVER)
        .tcp(CLIENT_PORT, TLS_PORT, flags)
}

fn from_server(flags: u8) -> Frame {
    Frame::eth()
        .ipv4(SERVER, CLIENT)
        .tcp(TLS_PORT, CLIENT_PORT, flags)
}

/// A connection's opening up to its ClientHello: SYN, SYN-ACK, ACK, the hello.
fn opening(hello: &[u8]) -> [Frame; 4] {
    [
        from_client(SYN),
        from_server(SYN | ACK),
        from_client(ACK),
        from_client(PSH | ACK).payload(hello),
    ]
}

/// The agent's taking of every entry (a finished connection's, read and deleted).
fn take_all(k: &mut Kernel) {
    for key in k.counts().into_keys() {
        k.remove(&key);
    }
}

/// The payloads handed over.
fn hellos(k: &mut Kernel) -> Vec<Vec<u8>> {
    k.hello_events().into_iter().map(|(_, data)| data).collect()
}

#[test]
fn a_hello_is_handed_over_once_per_use_of_a_port_pair() {
    let hello = client_hello("once.exfil.test");
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        let [syn, syn_ack, ack, data] = opening(&hello);
        for frame in [&syn, &syn_ack, &ack, &data, &data] {
            k.run(hook, &frame.build());
        }
        k.run(hook, &from_server(PSH | ACK).payload(&SERVER_HELLO).build());
        k.run(hook, &from_server(RST).build());
        // The same port pair again, its entry still in the map.
        for frame in opening(&hello) {
            k.run(hook, &frame.build());
        }
        assert_eq!(
            hellos(&mut k),
            [hello.clone(), hello.clone()],
            "{hook:?}: one hello per use, none for the retransmission or the server's"
        );
    }
}

/// The agent takes a finished connection's entry while the next use of its port pair may
/// already have begun: the packets after that make a new entry, and the hello that follows
/// is still the connection's first payload.
#[test]
fn a_hello_is_handed_over_when_the_entry_was_taken_during_the_opening() {
    let hello = client_hello("taken.exfil.test");
    for hook in Hook::ALL {
        for taken_after in 1..=3 {
            let mut k = Kernel::load(&[hook]);
            for (n, frame) in opening(&hello).iter().enumerate() {
                if n == taken_after {
                    take_all(&mut k);
                }
                k.run(hook, &frame.build());
            }
            assert_eq!(
                hellos(&mut k),
                vec![hello.clone()],
                "{hook:?}: entry taken after {taken_after} packets of the opening"
            );
        }
    }
}

/// An entry made by a packet in mid-connection awaits a first payload both ways, not
/// knowing which end opened: the server's handshake records are not ClientHellos.
#[test]
fn a_server_handshake_record_is_not_a_hello() {
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        k.run(hook, &from_client(ACK).build());
        k.run(hook, &from_server(PSH | ACK).payload(&SERVER_HELLO).build());
        take_all(&mut k);
        k.run(hook, &from_server(PSH | ACK).payload(&SERVER_HELLO).build());
        k.run(hook, &from_client(FIN | ACK).build());
        assert_eq!(hellos(&mut k), Vec::<Vec<u8>>::new(), "{hook:?}");
    }
}

/// A QUIC version 1 Initial's first bytes (long header, type Initial, version 1), then
/// zeros to `len` bytes.
fn quic_initial(len: usize) -> Vec<u8> {
    let mut datagram = vec![0; len];
    datagram[..5].copy_from_slice(&[0xc3, 0, 0, 0, 1]);
    datagram
}

#[test]
fn a_first_datagram_shorter_than_any_quic_initial_is_not_a_hello() {
    for hook in Hook::ALL {
        let mut k = Kernel::load(&[hook]);
        for (port, len) in [(CLIENT_PORT, 1199), (CLIENT_PORT + 1, 1200)] {
            let first = Frame::eth()
                .ipv4(CLIENT, SERVER)
                .udp(port, TLS_PORT)
                .payload(&quic_initial(len));
            k.run(hook, &first.build());
        }
        let lengths: Vec<usize> = hellos(&mut k).iter().map(Vec::len).collect();
        assert_eq!(
            lengths,
            [1200],
            "{hook:?}: clients pad every Initial to 1200 bytes (RFC 9000, 14.1)"
        );
    }
}

/// The agent's poller over the programs' maps, following what they say changed.
fn poller(k: &mut Kernel) -> Poller {
    let mut map = |name| k.ebpf().take_map(name).expect(name);
    let (flows, stats) = (map(names::FLOW_MAP), map(names::STATS_MAP));
    let changes = ChangeMaps {
        epoch: map(names::EPOCH_MAP),
        changed: map(names::CHANGED_MAP),
        new_entries: map(names::NEW_ENTRIES_MAP),
        lost: map(names::CHANGES_LOST_MAP),
    };
    let mut poller = Poller::new(flows, stats);
    poller.follow_changes(changes).expect("follow the changes");
    poller
}

/// A poll's read: returns the packets of the one entry read.
fn read(poller: &mut Poller) -> u64 {
    poller.begin([], 1).expect("begin a read");
    let mut pkts = 0;
    poller
        .read(|snap| pkts += snap.dir.iter().map(|d| d.pkts).sum::<u64>())
        .expect("read the map");
    pkts
}

/// A connection ends (RST); the agent reads it, and while it judges the connection
/// finished, the client opens the same port pair again. Taking the entry then would split
/// the new opening between two entries and lose its hello: the entry goes back into the
/// map, and is taken whole once the next read has seen it.
#[test]
fn an_entry_written_after_the_read_is_put_back_when_taken() {
    let hook = Hook::TcEgress;
    let hello = client_hello("again.exfil.test");
    let mut k = Kernel::load(&[hook]);
    for frame in opening(&hello) {
        k.run(hook, &frame.build());
    }
    k.run(hook, &from_server(RST).build());
    let key = *k.counts().keys().next().expect("the connection's entry");
    let mut poller = poller(&mut k);
    assert_eq!(read(&mut poller), 5);

    let [syn, syn_ack, ack, data] = opening(&hello);
    k.run(hook, &syn.build());
    assert_eq!(
        poller.take(&key, true).expect("take"),
        Taken::Moved,
        "a SYN after the read"
    );
    for frame in [syn_ack, ack, data] {
        k.run(hook, &frame.build());
    }
    assert_eq!(hellos(&mut k), [hello.clone(), hello.clone()]);

    assert_eq!(read(&mut poller), 9, "one entry, every packet");
    let Taken::Final(last) = poller.take(&key, true).expect("take") else {
        panic!("not taken once read");
    };
    assert_eq!(last.dir.iter().map(|d| d.pkts).sum::<u64>(), 9);
    assert_eq!(poller.take(&key, true).expect("take"), Taken::Gone);
}
