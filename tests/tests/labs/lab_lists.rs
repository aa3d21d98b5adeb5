//! Rule lists in files (`@FILE`) reloaded on SIGHUP in a gateway lab: an allow file that
//! gains the destination of an alert silences the next connection while the window sums
//! stay, a bad line keeps the old list, and an intel file raises IntelMatch naming its line,
//! also for an entry a reload added.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use tests::{
    http,
    lab::{self, Lab},
    rules_lab::{RulesAgent, Scratch, WAN_HOST2_V4, add_wan_address, listing, of},
    traffic,
};

const LAN: IpAddr = IpAddr::V4(lab::LAN_HOST_V4);
const WAN: IpAddr = IpAddr::V4(lab::WAN_HOST_V4);
const WAN2: IpAddr = IpAddr::V4(WAN_HOST2_V4);

/// Generous bounds for a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(30);

/// Sends SIGHUP to the agent and waits until its metrics count the reload as `result`,
/// the `count`th so: the lists are in use from then on.
fn reload(lab: &Lab, agent: &RulesAgent, result: &str, count: f64) {
    agent.signal(libc::SIGHUP);
    let sample = format!("egress_monitor_config_reloads_total{{result=\"{result}\"}}");
    agent.wait_for(&format!("{sample} {count}"), LIMIT, |_| {
        (http::agent_sample(&lab.gw, &sample) == Some(count)).then_some(())
    });
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The case: a restricted host alerts; its destination goes into the allow file
/// and SIGHUP is sent; the next connection is silent, and the window sums from before the
/// reload are still there (the second upload crosses the threshold only with the first's
/// bytes). A bad line then keeps the allow file's old list.
#[test]
fn a_reloaded_allow_file_silences_the_next_connection_and_keeps_window_sums() {
    let lab = Lab::new();
    let scratch = Scratch::new("lists-allow");
    let allow = scratch.path("allow.txt");
    write(&allow, "# destinations restricted hosts may reach\n");
    let allow_arg = format!("@{}", allow.display());
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.2/32",
            "--allow-dst",
            &allow_arg,
            // One window for the whole test (it ends at midnight UTC).
            "--window",
            "1d",
            "--window-threshold",
            "150KB",
        ],
    );
    let first = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5001), 100_000);
    agent.wait_alerts("RestrictedOutbound", 1, LIMIT, |a| {
        a.is_conn("tcp", first.client, first.server)
    });
    assert!(
        of(&agent.alerts(), "WindowExceeded").is_empty(),
        "100 KB alone crossed the 150 KB window threshold:\n{}",
        listing(&agent.alerts())
    );

    write(
        &allow,
        "# destinations restricted hosts may reach\n203.0.113.2\n",
    );
    reload(&lab, &agent, "ok", 1.0);
    // Another port: not a repeat that --restricted-suppress would keep quiet anyway.
    let second = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5002), 100_000);
    let crossed = agent.wait_alerts("WindowExceeded", 1, LIMIT, |a| a.ip("dst") == WAN);

    write(&allow, "203.0.113.2\nbad_name!\n");
    reload(&lab, &agent, "error", 1.0);
    let third = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5003), 1000);
    agent.wait_finished("tcp", third.client, third.server, Duration::from_secs(40));
    let stderr = agent.stderr();
    let stopped = agent.stop();

    let restricted = of(&stopped.alerts, "RestrictedOutbound");
    assert_eq!(
        restricted.len(),
        1,
        "one alert, for the first connection; none after the destination was allowed, \
         none after a bad line kept the old list:\n{}",
        listing(&stopped.alerts)
    );
    assert!(restricted[0].is_conn("tcp", first.client, first.server));
    for conn in [&second, &third] {
        assert!(
            !stopped
                .alerts
                .iter()
                .any(|a| a.is_conn("tcp", conn.client, conn.server)),
            "an alert about an allowed connection {} -> {}:\n{}",
            conn.client,
            conn.server,
            listing(&stopped.alerts)
        );
    }
    // The second upload alone (some 105 KB of IP bytes) is under the threshold: the sum
    // that crossed it holds the first one's, from before the reload.
    assert_eq!(crossed[0].ip("src"), LAN);
    assert!(crossed[0].u64("bytes") > 150_000, "{}", crossed[0]);
    let named = format!("{}:2: 'bad_name!'", allow.display());
    let warned: Vec<&str> = stderr.lines().filter(|l| l.contains(&named)).collect();
    assert_eq!(
        warned.len(),
        1,
        "one line naming the file and line:\n{stderr}"
    );
    assert!(warned[0].contains("--allow-dst"), "{}", warned[0]);
}

/// `--intel-dst` from a file and the command line: a local host's connection to a listed
/// destination raises IntelMatch naming the file and line; one to an unlisted destination
/// does not, until a reload adds it.
#[test]
fn intel_match_names_list_and_line_and_a_reload_adds_an_entry() {
    let lab = Lab::new();
    add_wan_address(&lab, WAN_HOST2_V4);
    let scratch = Scratch::new("lists-intel");
    let intel = scratch.path("intel.txt");
    write(&intel, "# feed\n203.0.113.2  # C2\n");
    let intel_arg = format!("@{}", intel.display());
    let agent = RulesAgent::start(
        &lab,
        &["--intel-dst", "192.0.2.99", "--intel-dst", &intel_arg],
    );
    let listed = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5001), 1000);
    let unlisted = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN2, 5001), 1000);
    agent.wait_alerts("IntelMatch", 1, LIMIT, |a| {
        a.is_conn("tcp", listed.client, listed.server)
    });
    agent.wait_finished(
        "tcp",
        unlisted.client,
        unlisted.server,
        Duration::from_secs(40),
    );

    write(&intel, "# feed\n203.0.113.2  # C2\n203.0.113.3\n");
    reload(&lab, &agent, "ok", 1.0);
    let added = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN2, 5002), 1000);
    agent.wait_alerts("IntelMatch", 1, LIMIT, |a| {
        a.is_conn("tcp", added.client, added.server)
    });
    let stopped = agent.stop();

    let matches = of(&stopped.alerts, "IntelMatch");
    assert_eq!(
        matches.len(),
        2,
        "one alert each for the listed destination and the one the reload added, none \
         for the connection before it was listed:\n{}",
        listing(&stopped.alerts)
    );
    let file = intel.display().to_string();
    for (alert, dst, line) in [(matches[0], WAN, 2), (matches[1], WAN2, 3)] {
        assert_eq!(alert.ip("src"), LAN, "{alert}");
        assert_eq!(alert.ip("dst"), dst, "{alert}");
        assert_eq!(alert.str("list"), file, "{alert}");
        assert_eq!(alert.u64("line"), line, "{alert}");
        assert_eq!(alert.ip("id.orig_h"), LAN, "{alert}");
        assert!(alert.has("uid"), "{alert}");
    }
    assert!(
        !stopped
            .alerts
            .iter()
            .any(|a| a.is_conn("tcp", unlisted.client, unlisted.server)),
        "an alert about the connection made before its destination was listed:\n{}",
        listing(&stopped.alerts)
    );
}
