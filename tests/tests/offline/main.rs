//! Tests that load nothing into the kernel and build no network namespace: the agent's
//! command line, the packet parser on the host, the IPFIX encoder and the syslog sink
//! against real decoders and collectors on loopback, the deployment files, the Debian
//! package (installed in a throwaway root: a private mount namespace, so root), and the
//! repository itself. One binary, so that the `monitor` library is linked once for them.

mod cli;
mod deb;
mod deploy;
mod ipfix;
mod ipfix_decode;
mod parse;
mod repo;
mod syslog;
