//! A gateway whose default route is a tun device (tests/src/lab_tun.rs): the agent,
//! started with its defaults, watches the tun, parses its packets from the IP header and
//! counts them exactly; a link type it cannot parse is refused at start.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    lab::{self, run_in_ns},
    lab_tun::{GW_PUBLIC, LAN_HOST, TUN, TunLab, WAN_HOST},
    rules_lab::{Scratch, read_json_lines},
    traffic,
};

const UPLOAD: u64 = 12_000_000;
const ALERT_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn tun_default_route_counts_exactly_and_alerts() {
    upload_through_the_tunnel(false);
}

/// A VPN client gateway: the LAN is masqueraded behind the tunnel's address.
#[test]
fn tun_default_route_with_masquerade_names_the_lan_host() {
    upload_through_the_tunnel(true);
}

/// A 12 MB upload from the lan host out through gw's tun, the agent on its defaults:
/// one LargeUpload naming the LAN host, one record with the tun's counts.
fn upload_through_the_tunnel(masquerade: bool) {
    let lab = TunLab::new();
    if masquerade {
        lab.masquerade();
    }
    let scratch = Scratch::new("tun");
    let alert_log = scratch.path("alerts.jsonl");
    let agent = Agent::start_default(
        &lab.gw,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "200ms",
            "--upload-threshold",
            "8MB",
            "--alert-log",
            alert_log.to_str().expect("UTF-8 path"),
        ],
    );
    let stderr = agent.stderr();
    assert!(
        stderr.contains(&format!(
            "monitor: watching {TUN} (link: none, ingress: tc, egress: tc)"
        )),
        "the agent watches the default route's tun, parsed from the IP header: {stderr}"
    );

    lab.wait_quiet();
    let before = lab.gw_tun();
    let server = SocketAddr::new(IpAddr::V4(WAN_HOST), 5001);
    let transfer = traffic::tcp_upload(&lab.lan, &lab.wan, server, UPLOAD);
    assert_eq!(transfer.server_received, UPLOAD, "{transfer:?}");
    lab.wait_quiet();
    let wire = lab.gw_tun().since(before);

    let start = Instant::now();
    let alerts = loop {
        let alerts: Vec<_> = read_json_lines(&alert_log)
            .into_iter()
            .filter(|a| a["note"] == "LargeUpload")
            .collect();
        if !alerts.is_empty() || start.elapsed() > ALERT_LIMIT {
            break alerts;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let records = agent.stop();
    assert_eq!(
        alerts.len(),
        1,
        "one LargeUpload for the 12 MB upload: {alerts:?}"
    );
    let alert = &alerts[0];
    assert_eq!(
        (alert["src"].as_str(), alert["dst"].as_str()),
        (
            Some(LAN_HOST.to_string().as_str()),
            Some(WAN_HOST.to_string().as_str())
        ),
        "LargeUpload names the LAN host: {alert}"
    );

    let client = (transfer.client.ip(), transfer.client.port());
    let found: Vec<_> = records
        .iter()
        .filter(|r| r.is_between("tcp", client, (server.ip(), server.port())))
        .collect();
    assert_eq!(found.len(), 1, "one record of the upload: {records:?}");
    let r = found[0];
    // tun counts IP packets: its tx is what went into the tunnel, its rx what came out.
    assert_eq!(
        (
            r.u64("orig_pkts"),
            r.u64("orig_ip_bytes"),
            r.u64("resp_pkts"),
            r.u64("resp_ip_bytes"),
        ),
        (
            wire.tx_packets,
            wire.tx_bytes,
            wire.rx_packets,
            wire.rx_bytes
        ),
        "record against gw's {TUN} counters {wire:?}: {r}"
    );
    assert_eq!(r.ip("id.orig_h"), IpAddr::V4(LAN_HOST), "{r}");
    assert_eq!(r.str("iface"), TUN, "{r}");
    // Payload: at least what the generator wrote (retransmissions count again).
    assert!(r.u64("orig_bytes") >= UPLOAD, "{r}");
    assert_ne!(IpAddr::V4(GW_PUBLIC), r.ip("id.orig_h"));
    if masquerade {
        assert_eq!(r.ip("nat.orig_h"), IpAddr::V4(GW_PUBLIC), "{r}");
    } else {
        assert!(!r.has("nat.orig_h"), "nothing translated: {r}");
    }
}

/// `TUNSETLINK`: gives a tun device (down) another link type.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETLINK: libc::c_ulong = 0x4004_54cd;
const ARPHRD_INFINIBAND: libc::c_ulong = 32;

/// A tun device made to claim a link type the programs cannot parse (no module on this
/// kernel makes one), and a tun asked to be hooked with XDP explicitly: both exit 2 with
/// one line naming the interface and the type.
#[test]
fn unparseable_link_type_and_explicit_xdp_on_tun_are_refused() {
    let lab = TunLab::new();
    // The device lives while this descriptor is open.
    let _odd = run_in_ns(&lab.gw, || {
        let tun = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (to, from) in req.ifr_name.iter_mut().zip(b"odd0") {
            *to = *from as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: valid fd and ifreq.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        // SAFETY: valid fd; the argument is the link type itself.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETLINK, ARPHRD_INFINIBAND) };
        assert_eq!(rc, 0, "TUNSETLINK: {}", std::io::Error::last_os_error());
        tun
    });
    let binary = Agent::binary();
    let binary = binary.to_str().expect("UTF-8 path");
    for (args, says) in [
        (vec!["--iface", "odd0"], "odd0: link/[32] cannot be parsed"),
        (
            vec![
                "--iface",
                TUN,
                "--ingress-hook",
                "xdp",
                "--xdp-mode",
                "native",
            ],
            "tun0: link/none has no Ethernet header for XDP",
        ),
    ] {
        let mut cmd = vec![binary, "run"];
        cmd.extend(&args);
        let out = lab::ns_output(&lab.gw, &cmd, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    // --xdp-mode auto counts a tun's ingress with TC.
    let agent = Agent::start(&lab.gw, TUN, &["--ingress-hook", "xdp"]);
    let stderr = agent.stderr();
    assert!(
        stderr.contains(&format!(
            "monitor: watching {TUN} (link: none, ingress: tc, egress: tc)"
        )) && stderr.contains("counting ingress with TC"),
        "{stderr}"
    );
    agent.stop();
}
