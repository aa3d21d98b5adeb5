//! TLS ClientHellos without a TLS library: a minimal record naming a server, and a server
//! that takes connections and closes them, for the SNI labs and the in-place benchmark.

use std::{
    io::{ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// A ClientHello record naming `name`, with nothing else in it.
pub fn client_hello(name: &str) -> Vec<u8> {
    let len = |n: usize| (n as u16).to_be_bytes();
    let mut sni = vec![0, 0];
    sni.extend(len(name.len() + 5));
    sni.extend(len(name.len() + 3));
    sni.push(0);
    sni.extend(len(name.len()));
    sni.extend(name.as_bytes());
    let mut body = vec![3, 3];
    body.extend([7; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend(len(sni.len()));
    body.extend(sni);
    let mut message = vec![1, 0];
    message.extend(len(body.len()));
    message.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(len(message.len()));
    record.extend(message);
    record
}

/// Accepts and closes `n` connections, within `limit`; returns how many it took.
pub fn accept_and_close(listener: TcpListener, n: usize, limit: Duration) -> usize {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let start = Instant::now();
    let mut accepted = 0;
    while accepted < n && start.elapsed() < limit {
        match listener.accept() {
            Ok(_) => accepted += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("accept: {e}"),
        }
    }
    accepted
}

/// From the calling thread's namespace: `n` connections to `server`, one after another,
/// each sending `hello` and closing.
pub fn send_hellos(server: SocketAddr, hello: &[u8], n: usize) {
    for _ in 0..n {
        let mut stream =
            TcpStream::connect_timeout(&server, Duration::from_secs(10)).expect("connect");
        stream.write_all(hello).expect("send a ClientHello");
    }
}
