//! Which process sent it: the gateway runs processes of its own (curl uploads in cgroups
//! of their own, short-lived ones, this test's own sockets), and the agent on its WAN
//! link names each connection's local process, user and cgroup, and no process for
//! traffic it only forwards. The ground truth is what the processes say of themselves:
//! their PIDs as spawned and the local ports curl reports.

use std::{
    fs,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::ConnRecord,
    cgroup::TestCgroup,
    http::{agent_sample, eventually},
    lab::{self, Lab, run_in_ns},
    rules_lab::{
        HttpServer, RulesAgent, Scratch, accept, connect, listen, listing, of, read_to_eof, send,
    },
};

const WAN: IpAddr = IpAddr::V4(lab::WAN_HOST_V4);
const GW_WAN: IpAddr = IpAddr::V4(lab::GW_WAN_V4);
const LIMIT: Duration = Duration::from_secs(30);
const CURL_LIMIT: &str = "20";

/// The gateway's own WAN addresses count as local: its uploads are outbound.
const GW_IS_LOCAL: [&str; 4] = [
    "--local-net",
    "203.0.113.1/32",
    "--local-net",
    "2001:db8:2::1/128",
];

/// A file of `bytes` bytes to upload.
fn payload(dir: &Scratch, bytes: usize) -> String {
    let path = dir.path(&format!("payload-{bytes}"));
    fs::write(&path, vec![b'x'; bytes]).expect("write payload");
    path.to_str().expect("UTF-8 temp path").to_owned()
}

/// curl under another name: its processes' `comm`.
fn curl_named(dir: &Scratch, name: &str) -> PathBuf {
    let path = dir.path(name);
    fs::copy("/usr/bin/curl", &path).expect("copy curl");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// One upload by `curl` in namespace `ns` (in `cgroup` if given, from `local_port` if
/// given), started. The process joins the cgroup before it becomes curl (`sh` writes its
/// own PID, then everything after is exec'd in the same process).
fn upload(
    ns: &str,
    curl: &Path,
    cgroup: Option<&TestCgroup>,
    local_port: Option<u16>,
    (file, server): (&str, SocketAddr),
) -> std::process::Child {
    let port_args = local_port.map(|port| ["--local-port".to_owned(), port.to_string()]);
    let procs = cgroup.map_or_else(|| "/dev/null".into(), |c| c.procs());
    let url = match server {
        SocketAddr::V4(_) => format!("http://{server}/"),
        SocketAddr::V6(v6) => format!("http://[{}]:{}/", v6.ip(), v6.port()),
    };
    Command::new("sh")
        .args(["-c", r#"echo $$ > "$0" && exec "$@""#])
        .arg(procs)
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(curl)
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-H",
            "Expect:",
            "--max-time",
            CURL_LIMIT,
        ])
        .args(port_args.iter().flatten())
        .args(["-w", "%{local_port}", "--data-binary"])
        .arg(format!("@{file}"))
        .arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn curl")
}

/// Waits for an upload; its PID and local port.
fn finished(child: std::process::Child) -> (u32, u16) {
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let port = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("curl's local port {:?}: {e}", out.stdout));
    (pid, port)
}

fn owner(record: &ConnRecord) -> Option<(u64, &str, u64)> {
    record.has("local_pid").then(|| {
        (
            record.u64("local_pid"),
            record.str("local_comm"),
            record.u64("local_uid"),
        )
    })
}

/// This test process's name: its main thread's, whichever thread opens a socket.
fn own_comm() -> String {
    fs::read_to_string(format!("/proc/{}/comm", std::process::id()))
        .expect("read own comm")
        .trim()
        .to_owned()
}

#[test]
fn two_uploaders_in_two_cgroups_are_each_named() {
    let lab = Lab::new();
    let dir = Scratch::new("owners");
    let tag = format!("eml{}-owners", std::process::id());
    let groups = [
        TestCgroup::new(&format!("{tag}-a")),
        TestCgroup::new(&format!("{tag}-b")),
    ];
    let names = ["uploader-a", "uploader-b"];
    let file = payload(&dir, 4 << 20);
    // A server each: alerts of one source to one service would be suppressed as repeats.
    let servers = [(); 2].map(|_| HttpServer::start(&lab.wan, SocketAddr::new(WAN, 0), 1));
    let mut flags = GW_IS_LOCAL.to_vec();
    flags.extend(["--upload-threshold", "1MB", "--upload-min-packets", "10"]);
    let agent = RulesAgent::start_seeing_host(&lab, &flags);

    let children: Vec<_> = groups
        .iter()
        .zip(names)
        .zip(&servers)
        .map(|((group, name), server)| {
            upload(
                &lab.gw,
                &curl_named(&dir, name),
                Some(group),
                None,
                (&file, server.addr),
            )
        })
        .collect();
    let uploads: Vec<(u32, u16)> = children.into_iter().map(finished).collect();
    let alerts = agent.wait_for("a LargeUpload for each uploader", LIMIT, |agent| {
        let alerts = agent.alerts();
        let large = of(&alerts, "LargeUpload");
        uploads
            .iter()
            .all(|(_, port)| {
                large
                    .iter()
                    .any(|a| a.0.u64("id.orig_p") == u64::from(*port))
            })
            .then_some(alerts)
    });
    for (((pid, port), group), name) in uploads.iter().zip(&groups).zip(names) {
        let alert = of(&alerts, "LargeUpload")
            .into_iter()
            .find(|a| a.0.u64("id.orig_p") == u64::from(*port))
            .expect("found above");
        assert_eq!(
            owner(&alert.0),
            Some((u64::from(*pid), name, 0)),
            "{name}'s alert names another owner:\n{}",
            listing(&alerts)
        );
        assert_eq!(alert.0.str("local_cgroup"), group.path, "{name}'s cgroup");
    }
    drop(agent);
    for server in servers {
        server.join();
    }
}

#[test]
fn short_lived_uploads_carry_their_owner() {
    const UPLOADS: usize = 200;
    const FIRST_PORT: u16 = 41_000;
    let lab = Lab::new();
    let dir = Scratch::new("owners");
    let file = payload(&dir, 1 << 20);
    let server = HttpServer::start(&lab.wan, SocketAddr::new(WAN, 0), UPLOADS);
    let agent = RulesAgent::start_seeing_host(&lab, &GW_IS_LOCAL);
    let curl = Path::new("/usr/bin/curl");
    // Four at a time: each process connects, sends 1 MB and exits. Each from a port of
    // its own: a port the kernel hands out again would make two connections one.
    let mut uploads = Vec::new();
    for batch in 0..UPLOADS / 4 {
        let started: Vec<_> = (0..4)
            .map(|i| {
                let port = FIRST_PORT + (batch * 4 + i) as u16;
                upload(&lab.gw, curl, None, Some(port), (&file, server.addr))
            })
            .collect();
        uploads.extend(started.into_iter().map(finished));
    }
    server.join();
    let records = agent.wait_for("a conn-log record of every upload", LIMIT, |agent| {
        let conns = agent.conns();
        let found: Vec<ConnRecord> = uploads
            .iter()
            .filter_map(|(_, port)| {
                conns
                    .iter()
                    .find(|r| r.ip("id.orig_h") == GW_WAN && r.u64("id.orig_p") == u64::from(*port))
                    .cloned()
            })
            .collect();
        (found.len() == UPLOADS).then_some(found)
    });
    let mut named = 0;
    for ((pid, port), record) in uploads.iter().zip(&records) {
        match owner(record) {
            Some(found) => {
                assert_eq!(
                    found,
                    (u64::from(*pid), "curl", 0),
                    "upload from port {port}"
                );
                named += 1;
            }
            None => eprintln!("upload from port {port} (PID {pid}) carries no owner"),
        }
    }
    assert!(
        named * 100 >= UPLOADS * 99,
        "{named} of {UPLOADS} short-lived uploads carry their owner"
    );
}

#[test]
fn forwarded_traffic_carries_no_owner() {
    let lab = Lab::masquerading();
    let dir = Scratch::new("owners");
    let file = payload(&dir, 256 << 10);
    let server = HttpServer::start(&lab.wan, SocketAddr::new(WAN, 0), 2);
    let agent = RulesAgent::start_seeing_host(&lab, &GW_IS_LOCAL);
    let curl = Path::new("/usr/bin/curl");
    let to = (file.as_str(), server.addr);
    let (gw_pid, gw_port) = finished(upload(&lab.gw, curl, None, None, to));
    // The LAN host's upload, through gw and its masquerade.
    let (_, lan_port) = finished(upload(&lab.lan, curl, None, None, to));
    server.join();
    let (local, forwarded) = agent.wait_for("both uploads' records", LIMIT, |agent| {
        let conns = agent.conns();
        let find = |host: IpAddr, port: u64| {
            conns
                .iter()
                .find(|r| r.ip("id.orig_h") == host && r.u64("id.orig_p") == port)
                .cloned()
        };
        find(GW_WAN, u64::from(gw_port))
            .zip(find(IpAddr::V4(lab::LAN_HOST_V4), u64::from(lan_port)))
    });
    assert_eq!(owner(&local), Some((u64::from(gw_pid), "curl", 0)));
    assert!(
        forwarded.has("nat.orig_h"),
        "the LAN upload was translated: {forwarded:?}"
    );
    for field in ["local_pid", "local_comm", "local_uid", "local_cgroup"] {
        assert!(
            !forwarded.has(field),
            "forwarded traffic has {field}: {forwarded:?}"
        );
    }
}

/// A TCP connection from `client_ns` to a listener on `server` in `server_ns` that
/// carries 10 kB and closes: its client and server ends.
fn exchange(client_ns: &str, server_ns: &str, server: IpAddr) -> (SocketAddr, SocketAddr) {
    let listener = listen(server_ns, SocketAddr::new(server, 0));
    let server = listener.local_addr().expect("listener address");
    let mut client = connect(client_ns, server);
    let mut accepted = accept(&listener);
    send(&mut client, 10_000);
    let client_end = client.local_addr().expect("client address");
    drop(client);
    read_to_eof(&mut accepted);
    (client_end, server)
}

/// Accepted and connected TCP, unconnected and connected UDP, IPv4 and IPv6: sockets this
/// test opens in gw, from threads whose names are not the process's.
#[test]
fn accepted_and_datagram_sockets_name_their_process() {
    let lab = Lab::new();
    let agent = RulesAgent::start_seeing_host(&lab, &GW_IS_LOCAL);
    let wan6 = IpAddr::V6(lab::WAN_HOST_V6);
    let gw6 = IpAddr::V6(lab::GW_WAN_V6);

    // The WAN host connects to a listener in gw, owned by the process that bound it (here
    // the one that accepts); gw connects out over IPv6.
    let inbound = exchange(&lab.wan, &lab.gw, GW_WAN);
    let outbound = exchange(&lab.gw, &lab.wan, wan6);

    // Datagrams: from a socket bound to no address, and from a connected IPv6 one.
    let sink = run_in_ns(&lab.wan, || UdpSocket::bind((WAN, 0))).expect("bind UDP sink");
    let sink6 = run_in_ns(&lab.wan, move || UdpSocket::bind((wan6, 0))).expect("bind UDP sink");
    let (to, to6) = (sink.local_addr().unwrap(), sink6.local_addr().unwrap());
    let (unbound_port, connected6) = run_in_ns(&lab.gw, move || {
        let unbound = UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        unbound.send_to(b"unconnected", to).expect("send_to");
        let connected = UdpSocket::bind((gw6, 0)).expect("bind v6");
        connected.connect(to6).expect("connect v6");
        connected.send(b"connected").expect("send");
        (
            unbound.local_addr().unwrap().port(),
            connected.local_addr().unwrap(),
        )
    });

    let me = (u64::from(std::process::id()), own_comm());
    let expected = [
        ("tcp", inbound.0, inbound.1, "accepted IPv4 TCP"),
        ("tcp", outbound.0, outbound.1, "connected IPv6 TCP"),
        (
            "udp",
            SocketAddr::new(GW_WAN, unbound_port),
            to,
            "unconnected IPv4 UDP",
        ),
        ("udp", connected6, to6, "connected IPv6 UDP"),
    ];
    let stderr = agent.stderr();
    // Stopped at once: the records of connections still open are written at shutdown.
    let stopped = agent.stop();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(proto, client, server, what)| {
            let record = stopped.conns.iter().find(|r| {
                r.is_between(
                    proto,
                    (client.ip(), client.port()),
                    (server.ip(), server.port()),
                )
            });
            let Some(record) = record else {
                return Some(format!("{what}: no record"));
            };
            let named = owner(record).map(|(pid, comm, uid)| (pid, comm.to_owned(), uid));
            let cgroup = record
                .has("local_cgroup")
                .then(|| record.str("local_cgroup"));
            (named != Some((me.0, me.1.clone(), 0)) || !cgroup.is_some_and(|c| c.starts_with('/')))
                .then(|| format!("{what}: owner {named:?}, cgroup {cgroup:?}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "expected PID {} ({}), uid 0, a cgroup:\n{}\nagent stderr:\n{stderr}",
        me.0,
        me.1,
        wrong.join("\n")
    );
}

/// New datagram flows from gw while the agent is stopped (SIGSTOP), more than the ring
/// holds: after SIGCONT each flow carries its owner or is counted lost, and some were
/// lost.
#[test]
fn owners_the_full_ring_cannot_take_are_counted_lost() {
    const FLOWS: usize = 6_000;
    const FIRST_PORT: u16 = 20_000;
    let lab = Lab::new();
    let agent = RulesAgent::start_seeing_host(&lab, &GW_IS_LOCAL);
    let sink = SocketAddr::new(WAN, 9);
    agent.signal(libc::SIGSTOP);
    // A socket each, a flow each: from a port of its own (one the kernel handed out
    // again would make two flows one).
    run_in_ns(&lab.gw, move || {
        for port in FIRST_PORT..FIRST_PORT + FLOWS as u16 {
            let socket = UdpSocket::bind((GW_WAN, port)).expect("bind");
            socket.send_to(b"owned?", sink).expect("send_to");
        }
    });
    agent.signal(libc::SIGCONT);
    let lost = eventually("the lost owners counted", LIMIT, || {
        agent_sample(&lab.gw, "egress_monitor_owner_events_lost_total").filter(|&n| n > 0.0)
    });
    let stopped = agent.stop();
    let flows: Vec<&ConnRecord> = (stopped.conns.iter())
        .filter(|r| r.str("proto") == "udp" && r.resp() == (WAN, 9))
        .collect();
    assert_eq!(flows.len(), FLOWS, "a record per flow");
    let me = u64::from(std::process::id());
    let named = flows
        .iter()
        .filter(|r| owner(r).is_some_and(|(pid, _, _)| pid == me))
        .count();
    eprintln!("stopped agent: {named} flows named, {lost} lost of {FLOWS}");
    assert_eq!(
        named as f64 + lost,
        FLOWS as f64,
        "{named} named, {lost} lost"
    );
}

/// A datagram socket that neither binds nor connects (the kernel binds it at its first
/// send) is named by the process that created it.
#[test]
fn a_datagram_socket_that_never_binds_is_named_by_its_creator() {
    let lab = Lab::new();
    let agent = RulesAgent::start_seeing_host(&lab, &GW_IS_LOCAL);
    let sink = SocketAddr::new(WAN, 9);
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.sendto(b'unbound', ('{}', {}))\n\
         print(s.getsockname()[1])",
        sink.ip(),
        sink.port()
    );
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.gw))
        .args(["--", "python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let (pid, port) = finished(child);
    let stopped = agent.stop();
    let record = (stopped.conns.iter())
        .find(|r| r.is_between("udp", (GW_WAN, port), (WAN, 9)))
        .unwrap_or_else(|| panic!("no record of the datagram from port {port}"));
    assert_eq!(owner(record), Some((u64::from(pid), "python3", 0)));
}
