//! Server names that clients send in clear at the start of encrypted connections.

pub mod quic;
