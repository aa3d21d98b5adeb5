//! How ingress gets hooked where native XDP is unavailable (a namespace's loopback has
//! no native XDP): `auto` falls back to TC ingress, never to generic XDP; `skb` is taken
//! with a warning; `native` fails and says what to try.

use std::time::Duration;

use tests::{
    agent::Agent,
    lab::{self, Lab},
};

#[test]
fn xdp_modes_without_native_xdp() {
    let lab = Lab::new();

    let auto = Agent::start(
        &lab.gw,
        "lo",
        &["--ingress-hook", "xdp", "--xdp-mode", "auto"],
    );
    let stderr = auto.stderr();
    assert!(
        stderr.contains("native XDP unavailable") && stderr.contains("counting ingress with TC"),
        "auto says it falls back: {stderr}"
    );
    assert!(
        stderr.contains("monitor: watching lo (link: loopback, ingress: tc, egress: tc)"),
        "auto ends on TC ingress: {stderr}"
    );
    auto.stop();

    let skb = Agent::start(
        &lab.gw,
        "lo",
        &["--ingress-hook", "xdp", "--xdp-mode", "skb"],
    );
    let stderr = skb.stderr();
    assert!(
        stderr.contains("counts can be inexact"),
        "skb warns: {stderr}"
    );
    assert!(
        stderr.contains("(link: loopback, ingress: xdp skb"),
        "skb is what was asked: {stderr}"
    );
    skb.stop();

    let out = lab::ns_output(
        &lab.gw,
        &[
            &Agent::binary().display().to_string(),
            "run",
            "--iface",
            "lo",
            "--ingress-hook",
            "xdp",
            "--xdp-mode",
            "native",
            "--metrics-addr",
            "127.0.0.1:9878",
        ],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "native fails: {stderr}");
    assert!(
        stderr.contains("attaching native XDP to lo failed")
            && stderr.contains("try --xdp-mode skb or --ingress-hook tc"),
        "and says what to try: {stderr}"
    );
}
