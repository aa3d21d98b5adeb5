//! A flood of single-packet UDP flows that a gateway's hooks see and its stack drops:
//! written once as a pcap, sent by tcpreplay out of the WAN host's veth.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use crate::{
    lab::{self, Lab},
    packet::Frame,
    pcap,
};

/// UDP payload of a flood frame: IP 46 bytes, frame 60, so no Ethernet padding.
const PAYLOAD: usize = 18;
pub const SRC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
pub const DPORT: u16 = 9999;
/// Not gw's MAC: gw's stack drops the frames after its hooks saw them.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const WAN_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
const REPLAY_LIMIT: Duration = Duration::from_secs(120);

/// Writes `flows` UDP packets from [`SRC`], each its own flow: a local destination in
/// 198.19.0.0/16, and the source port counting the 65,536-address rounds. Returns
/// (frames, IP bytes of each frame).
pub fn write(path: &Path, flows: u32) -> (u64, u64) {
    let mut frames = Vec::with_capacity(flows as usize);
    let mut ip_len = None;
    for i in 0..flows {
        let dst = Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8);
        let sport = 1024 + u16::try_from(i >> 16).expect("under 2^32 flows");
        let frame = Frame::eth()
            .macs(WAN_HOST_MAC, DST_MAC)
            .ipv4(SRC, dst)
            .udp(sport, DPORT)
            .payload_len(PAYLOAD);
        let layout = frame.layout();
        assert_eq!(
            (layout.frame_len, layout.eth_padding),
            (layout.l2_len + layout.ip_len, 0),
            "a flood frame must be exactly Ethernet header + IP packet: {layout:?}"
        );
        assert_eq!(
            *ip_len.get_or_insert(layout.ip_len),
            layout.ip_len,
            "flood frames differ in size"
        );
        let ts = Duration::from_secs(1_700_000_000) + Duration::from_micros(u64::from(i));
        frames.push((ts, frame.build()));
    }
    pcap::write_file(path, &frames);
    (
        frames.len() as u64,
        ip_len.expect("at least one flood frame") as u64,
    )
}

/// `tcpreplay --topspeed EXTRA... PCAP` out of the wan host's veth; asserts it sent
/// `expected` packets and failed none, and returns that number.
pub fn replay(lab: &Lab, pcap: &Path, extra: &[&str], expected: u64) -> u64 {
    let intf = format!("--intf1={}", lab.wan_if);
    let file = pcap.to_str().expect("UTF-8 temp path");
    let mut args = vec!["tcpreplay", &intf, "--topspeed"];
    args.extend_from_slice(extra);
    args.push(file);
    let out = lab::ns_output(&lab.wan, &args, REPLAY_LIMIT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "in {}: {args:?} exited with {}:\n{text}",
        lab.wan,
        out.status
    );
    let figure = |label: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("no '{label} N' in tcpreplay's output:\n{text}"))
    };
    let (sent, failed) = (figure("Successful packets:"), figure("Failed packets:"));
    assert_eq!(
        (sent, failed),
        (expected, 0),
        "tcpreplay did not send every flood frame:\n{text}"
    );
    sent
}
