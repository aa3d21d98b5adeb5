//! Command-line flags, their value parsers and defaults.
//!
//! A bad value exits with status 2 and one line naming the flag, the value and what is
//! accepted (see [`parse`]).

pub mod values;

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, error::ErrorKind};
use ipnet::IpNet;
use monitor_common::DEFAULT_FLOW_MAP_SIZE;
pub use values::{Durations, Size, parse_cidr, parse_duration, parse_durations, parse_factor};

use crate::{
    alerts::sinks::{alertmanager, syslog},
    endpoint::Url,
    export::COLLECTOR_SCHEMES,
    kernel::{IngressHook, XdpMode},
    lists::Item,
    rules::{
        targets::{AddrSpec, AllowPair, AllowService, Service},
        windows::LeakGroup,
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "monitor",
    version,
    about = "eBPF egress monitor: counts every connection leaving the network, as on the wire."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process: its size does not matter"
)]
pub enum Command {
    /// Attach the kernel programs and watch connections until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Show the running agent's busiest connections, refreshed in the terminal until
    /// Ctrl-C.
    Top(TopArgs),
    /// Remove what `monitor run --pin-path DIR` left pinned: its programs stop counting.
    Detach(DetachArgs),
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The directory given to `monitor run --pin-path`.
    #[arg(long, value_name = "DIR", value_parser = parse_pin_path)]
    pub pin_path: PathBuf,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent's --metrics-addr: its /top endpoint is served there.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9877")]
    pub metrics_addr: std::net::SocketAddr,

    /// Refresh period.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,

    /// Connections shown (the agent keeps the busiest 100).
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u16).range(1..=crate::top::MAX_ROWS as i64))]
    pub count: u16,

    /// Print one frame as plain text (no screen control) and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface to watch (repeatable). Default: the interface of the default route.
    #[arg(long = "iface", value_name = "IFACE", help_heading = "Capture")]
    pub ifaces: Vec<String>,

    /// How ingress traffic is hooked. TC sees GRO aggregates and counts their segments;
    /// native XDP on a veth forces the peer's TSO off (see BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = IngressHook::Tc, help_heading = "Capture")]
    pub ingress_hook: IngressHook,

    /// XDP attach mode, with --ingress-hook xdp.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto, help_heading = "Capture")]
    pub xdp_mode: XdpMode,

    /// Kernel connection map capacity; connections beyond it are counted in
    /// flow_map_full, never silently dropped.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FLOW_MAP_SIZE,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Capture")]
    pub flow_map_size: u32,

    /// What is "local" (repeatable; replaces the default list).
    #[arg(long = "local-net", value_name = "CIDR", value_parser = parse_cidr,
          default_values_t = default_local_nets(), help_heading = "Connections")]
    pub local_nets: Vec<IpNet>,

    /// Map polling period.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s",
          help_heading = "Connections")]
    pub poll_interval: Duration,

    /// A connection with no packets for this long is finished.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "5m",
          help_heading = "Connections")]
    pub idle_timeout: Duration,

    /// Finished connections as JSON lines with Zeek conn.log field names (`-`: stdout).
    /// Default: not written.
    #[arg(long, value_name = "PATH", help_heading = "Outputs")]
    pub conn_log: Option<PathBuf>,

    /// Long connections while still active (LongConnection), same fields. Default: not
    /// written.
    #[arg(long, value_name = "PATH", help_heading = "Outputs")]
    pub conn_long_log: Option<PathBuf>,

    /// Alerts as JSON lines, one per alert, flushed at once (`-`: stdout).
    #[arg(
        long,
        value_name = "PATH|-",
        default_value = "-",
        help_heading = "Outputs"
    )]
    pub alert_log: PathBuf,

    /// Also send alerts to syslog (RFC 5424): udp://HOST:PORT or unix:PATH.
    #[arg(long, value_name = "URL", value_parser = Url::parser(syslog::SCHEMES),
          help_heading = "Outputs")]
    pub syslog: Option<Url>,

    /// Also post alerts to Alertmanager's v2 API (http://HOST:PORT).
    #[arg(long, value_name = "URL", value_parser = Url::parser(alertmanager::SCHEMES),
          help_heading = "Outputs")]
    pub alertmanager_url: Option<Url>,

    /// Prometheus /metrics.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:9877",
        help_heading = "Outputs"
    )]
    pub metrics_addr: std::net::SocketAddr,

    /// Export the N local hosts that sent the most to non-local ones in the last
    /// --window as egress_monitor_top_talker_bytes{host} (at most N series; 0: off).
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Outputs")]
    pub top_talkers: usize,

    /// An alert with the same rule and key is not repeated within this time (suppressed
    /// alerts are counted).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1h",
          help_heading = "Outputs")]
    pub suppress: Duration,

    /// Pin the programs, their links and maps under this directory on a BPF filesystem
    /// (e.g. /sys/fs/bpf/monitor). Counting goes on while no agent runs; the next `monitor
    /// run --pin-path DIR` takes over the open connections, and SIGINT/SIGTERM leave them
    /// to it instead of finishing them. `monitor detach --pin-path DIR` removes all.
    /// Default: none (exit detaches everything).
    #[arg(long, value_name = "DIR", value_parser = parse_pin_path, help_heading = "Restarts")]
    pub pin_path: Option<PathBuf>,

    /// Keep rule state here (alerted connections, window sums, suppression timers),
    /// rewritten after every poll that changes it, so that a restart neither repeats nor
    /// forgets. Default: none.
    #[arg(long, value_name = "DIR", help_heading = "Restarts")]
    pub state_dir: Option<PathBuf>,

    #[command(flatten)]
    pub rules: RuleArgs,

    #[command(flatten)]
    pub ipfix: IpfixArgs,

    #[command(flatten)]
    pub dns: DnsArgs,
}

/// DNS: passive DNS, dns.log, DnsTunnel.
#[derive(Debug, Args)]
pub struct DnsArgs {
    /// DNS transactions as JSON lines with Zeek dns.log field names (`-`: stdout).
    /// Default: not written.
    #[arg(long, value_name = "PATH", help_heading = "DNS")]
    pub dns_log: Option<PathBuf>,

    /// Entries of the passive DNS map (client, address) -> name; the least recently
    /// used go first.
    #[arg(long, value_name = "N", default_value = "100000", help_heading = "DNS")]
    pub dns_cache_size: std::num::NonZeroUsize,

    /// Keep an answer at least this long, whatever its TTL (connections often start
    /// after a short TTL ran out).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1h",
          help_heading = "DNS")]
    pub dns_min_ttl: Duration,

    /// The site's own resolvers (repeatable): only their answers teach names (allowlists,
    /// exclusions, remote_fqdn), and they are never "non-DNS on port 53". Recommended;
    /// default: none (any answered query teaches).
    #[arg(long = "dns-resolver", value_name = "CIDR", value_parser = parse_cidr,
          help_heading = "DNS")]
    pub dns_resolvers: Vec<IpNet>,

    /// DnsTunnel: information (compressed distinct query names) one client sends to one
    /// registered domain within --dns-tunnel-period.
    #[arg(long, value_name = "SIZE", default_value = "4KB", help_heading = "DNS")]
    pub dns_tunnel_threshold: Size,

    /// DnsTunnel: the period over which information is summed.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "24h",
          help_heading = "DNS")]
    pub dns_tunnel_period: Duration,

    /// DnsTunnel: NXDOMAIN answers to one client for one registered domain within
    /// --window.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "DNS")]
    pub dns_nxdomain_threshold: u64,

    /// A DNS-over-HTTPS server's name (repeatable), beside the built-in list: connections
    /// whose TLS or QUIC hello names it, or a name under it, are marked encrypted_dns.
    #[arg(long = "doh-server", value_name = "NAME", value_parser = parse_host_name,
          help_heading = "DNS")]
    pub doh_servers: Vec<String>,
}

/// `--doh-server`: a host name, as allowlists take them.
fn parse_host_name(text: &str) -> Result<String, String> {
    match text.parse::<AddrSpec>() {
        Ok(AddrSpec::Host(name)) => Ok(name),
        _ => Err("expected a host name such as doh.example.net".into()),
    }
}

/// `--pin-path`: an absolute path (whether it is on a BPF filesystem is checked with the
/// other flags, in `crate::config`).
fn parse_pin_path(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err("an absolute path is needed, e.g. /sys/fs/bpf/monitor".into())
    }
}

/// Flow export (IPFIX).
#[derive(Debug, Args)]
pub struct IpfixArgs {
    /// Export connections as IPFIX (RFC 7011) to udp://HOST:PORT or tcp://HOST:PORT
    /// (repeatable). Default: none.
    #[arg(
        long = "ipfix-collector",
        value_name = "URL",
        value_parser = Url::parser(COLLECTOR_SCHEMES),
        help_heading = "IPFIX export"
    )]
    pub collectors: Vec<Url>,

    /// An open connection is exported at least this often (its deltas since the last
    /// export).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s",
          help_heading = "IPFIX export")]
    pub flow_active_timeout: Duration,

    /// Templates are sent again this often over UDP (TCP sends them at the start of
    /// every connection).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s",
          help_heading = "IPFIX export")]
    pub ipfix_template_refresh: Duration,

    /// Observation domain ID.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        help_heading = "IPFIX export"
    )]
    pub ipfix_domain_id: u32,

    /// One RFC 5103 biflow record per connection instead of one per direction.
    #[arg(long, help_heading = "IPFIX export")]
    pub ipfix_biflow: bool,
}

/// Detection rules (docs/rules.md).
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// LargeUpload: payload sent by a local host to a non-local one in one connection,
    /// alerted while the connection is open.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "100MB",
        help_heading = "LargeUpload"
    )]
    pub upload_threshold: Size,

    /// LargeUpload: packets the local host must have sent as well.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        help_heading = "LargeUpload"
    )]
    pub upload_min_packets: u64,

    /// UploadRatio: services that normally download (repeatable; replaces the default).
    #[arg(long = "ratio-port", value_name = "PORT/PROTO", default_values_t = [Service { port: 80, proto: 6 }],
          help_heading = "UploadRatio")]
    pub ratio_ports: Vec<Service>,

    /// UploadRatio: alert when a local client sent more than FACTOR times the payload it
    /// received, when the connection finishes.
    #[arg(long, value_name = "FACTOR", value_parser = parse_factor, default_value = "1.0",
          help_heading = "UploadRatio")]
    pub ratio: f64,

    /// UploadRatio: and at least this much (0: the classic rule, any upload larger than
    /// the download).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1MB",
        help_heading = "UploadRatio"
    )]
    pub ratio_min_bytes: Size,

    /// LongConnection: alert as an active connection's age crosses each of these; after
    /// the last, every last duration.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "10m,30m,1h,12h,24h,3d",
        help_heading = "LongConnection"
    )]
    pub long_durations: Durations,

    /// LongConnection: connections with an endpoint here are not reported (repeatable),
    /// e.g. a VPN range. `@FILE`: one a line (`#` comments), read again on SIGHUP.
    #[arg(
        long = "long-ignore",
        value_name = "CIDR|@FILE",
        help_heading = "LongConnection"
    )]
    pub long_ignore: Vec<Item<IpNet>>,

    /// RestrictedOutbound: hosts here must not open connections outside the local nets
    /// (repeatable; `@FILE` as for --long-ignore). Default: none, the rule is silent.
    #[arg(
        long = "restricted-net",
        value_name = "CIDR|@FILE",
        help_heading = "RestrictedOutbound"
    )]
    pub restricted_nets: Vec<Item<IpNet>>,

    /// RestrictedOutbound: destinations allowed to anyone (repeatable; `@FILE` as for
    /// --long-ignore). Host names stand for all their A/AAAA records, re-resolved every
    /// minute, and for any address the client itself resolved the name to (passive DNS);
    /// `*.domain` matches what the client resolved from any name under the domain.
    #[arg(
        long = "allow-dst",
        value_name = "CIDR|HOST|@FILE",
        help_heading = "RestrictedOutbound"
    )]
    pub allow_dst: Vec<Item<AddrSpec>>,

    /// RestrictedOutbound: a service allowed to anyone (repeatable; `@FILE` as for
    /// --long-ignore).
    #[arg(
        long = "allow-service",
        value_name = "CIDR,PORT/PROTO|@FILE",
        help_heading = "RestrictedOutbound"
    )]
    pub allow_service: Vec<Item<AllowService>>,

    /// RestrictedOutbound: a source allowed to reach a destination (repeatable; `@FILE`
    /// as for --long-ignore); names and `*.domain` as for --allow-dst.
    #[arg(
        long = "allow-pair",
        value_name = "SRC,DST|@FILE",
        help_heading = "RestrictedOutbound"
    )]
    pub allow_pair: Vec<Item<AllowPair>>,

    /// RestrictedOutbound: quiet time per (source, destination, port) before the same
    /// connection alerts again; a repeat inside it restarts it.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s",
          help_heading = "RestrictedOutbound")]
    pub restricted_suppress: Duration,

    /// RestrictedOutbound: a restricted host's encrypted DNS (port 853, or a DoH server by
    /// its TLS or QUIC name) alerts even to an allowed destination.
    #[arg(long, help_heading = "RestrictedOutbound")]
    pub restricted_doh: bool,

    /// WindowExceeded: windows (aligned to the epoch) over which bytes a local host sends
    /// to non-local ones are summed per group.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "5m",
          help_heading = "WindowExceeded and DataLeak")]
    pub window: Duration,

    /// WindowExceeded: IP bytes per group in one window.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "5MB",
        help_heading = "WindowExceeded and DataLeak"
    )]
    pub window_threshold: Size,

    /// DataLeak: period over which exceeded windows are summed per group.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "24h",
          help_heading = "WindowExceeded and DataLeak")]
    pub leak_period: Duration,

    /// DataLeak: bytes of exceeded windows per group within one period.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "100MB",
        help_heading = "WindowExceeded and DataLeak"
    )]
    pub leak_threshold: Size,

    /// How WindowExceeded and DataLeak group bytes: per (source, destination), per
    /// source, or per destination.
    #[arg(long, value_enum, default_value_t = LeakGroup::Pair,
          help_heading = "WindowExceeded and DataLeak")]
    pub leak_group: LeakGroup,

    /// Destinations left out of window and leak accounting (repeatable; `@FILE` as for
    /// --long-ignore); names and `*.domain` as for --allow-dst.
    #[arg(
        long = "exclude-dst",
        value_name = "CIDR|HOST|@FILE",
        help_heading = "WindowExceeded and DataLeak"
    )]
    pub exclude_dst: Vec<Item<AddrSpec>>,

    /// IntelMatch: threat-intel destinations (repeatable; `@FILE` as for --long-ignore):
    /// a local host connecting to one raises IntelMatch, naming the list and line; names
    /// and `*.domain` as for --allow-dst. Default: none.
    #[arg(
        long = "intel-dst",
        value_name = "ADDR|CIDR|NAME|@FILE",
        help_heading = "IntelMatch"
    )]
    pub intel_dst: Vec<Item<AddrSpec>>,
}

/// RFC 1918, RFC 6598 (carrier-grade NAT) and RFC 4193 (unique local IPv6).
pub fn default_local_nets() -> Vec<IpNet> {
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ]
    .iter()
    .map(|s| s.parse().expect("valid built-in network"))
    .collect()
}

/// Parses the command line. Help and version print and exit 0; any other error prints
/// clap's first line (it names the flag, the value and what is accepted) and exits 2.
pub fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            err.exit()
        }
        Err(err) => usage_error(&one_line(&err.render().to_string())),
    }
}

/// clap's first line names the flag and the value; for enumerated flags the accepted
/// values follow on a line of their own, which joins it here.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let mut line = lines.next().unwrap_or("error").to_owned();
    if let Some(values) = lines
        .map(str::trim)
        .find(|l| l.starts_with("[possible values"))
    {
        line.push(' ');
        line.push_str(values);
    }
    line
}

/// One line on stderr, exit status 2: the contract for bad input.
pub fn usage_error(line: &str) -> ! {
    eprintln!("{line}");
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use clap::{ArgAction, CommandFactory};

    use super::*;

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["monitor", "run"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("`monitor run` parsed as another command");
        };
        assert_eq!(run.poll_interval, Duration::from_secs(1));
        assert_eq!(run.local_nets, default_local_nets());
        assert_eq!(run.ingress_hook, IngressHook::Tc);
        assert!(run.ifaces.is_empty());
    }

    #[test]
    fn top_defaults_and_count_range() {
        let cli = Cli::try_parse_from(["monitor", "top"]).unwrap();
        let Command::Top(top) = cli.command else {
            panic!("`monitor top` parsed as another command");
        };
        assert_eq!(top.metrics_addr.to_string(), "127.0.0.1:9877");
        assert_eq!(top.interval, Duration::from_secs(1));
        assert_eq!(top.count, 20);
        assert!(!top.once);
        for bad in ["0", "101"] {
            let err = Cli::try_parse_from(["monitor", "top", "--count", bad]).unwrap_err();
            assert!(err.render().to_string().contains("--count"), "{err}");
        }
    }

    #[test]
    fn enum_errors_list_accepted_values_on_the_same_line() {
        let err = Cli::try_parse_from(["monitor", "run", "--xdp-mode", "fast"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(
            line.contains("'fast'") && line.contains("--xdp-mode"),
            "{line}"
        );
        assert!(line.contains("auto, native, skb"), "{line}");
    }

    #[test]
    fn bad_value_names_flag_and_value() {
        let err = Cli::try_parse_from(["monitor", "run", "--poll-interval", "fast"]).unwrap_err();
        let first = err.render().to_string();
        let first = first.lines().next().unwrap();
        assert!(first.contains("--poll-interval"), "{first}");
        assert!(first.contains("fast"), "{first}");
        assert!(first.contains("expected a duration"), "{first}");
    }

    /// The part of `doc` under the heading line `heading`, up to the next `## ` heading.
    fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
        let start = doc
            .find(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("docs/flags.md: no heading {heading:?}"));
        let body = &doc[start + heading.len() + 2..];
        body.find("\n## ").map_or(body, |end| &body[..end])
    }

    /// Whether `line` is the table row of `--long`: its first cell names that flag, not a
    /// longer one that starts with it.
    fn is_row_of(line: &str, long: &str) -> bool {
        let Some(cell) = line
            .strip_prefix("| ")
            .and_then(|row| row.split(" |").next())
        else {
            return false;
        };
        let flag = format!("`--{long}");
        cell.match_indices(&flag).any(|(at, _)| {
            !cell[at + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
        })
    }

    /// docs/flags.md has a section per subcommand (`## `monitor NAME``) with a table row for
    /// each of its flags that shows the default as `--help` prints it (`[default: ...]`),
    /// and names no flag that does not exist.
    #[test]
    fn docs_flags_list_every_flag_with_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/flags.md");
        let doc = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{path}: {err}"));
        let mut cli = Cli::command();
        cli.build();
        let top = std::iter::once(("## `monitor`".to_owned(), &cli));
        let subcommands = cli
            .get_subcommands()
            .filter(|cmd| cmd.get_name() != "help")
            .map(|cmd| (format!("## `monitor {}`", cmd.get_name()), cmd));
        let mut known = Vec::new();
        for (heading, cmd) in top.chain(subcommands) {
            let section = section(&doc, &heading);
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                known.push(long);
                // clap's own --help and --version: documented once, under `monitor`.
                let generated = matches!(arg.get_action(), ArgAction::Help | ArgAction::Version);
                if generated && heading != "## `monitor`" {
                    continue;
                }
                let line = section
                    .lines()
                    .find(|line| is_row_of(line, long))
                    .unwrap_or_else(|| panic!("docs/flags.md, {heading}: --{long} missing"));
                let defaults = arg.get_default_values();
                if arg.get_action().takes_values()
                    && !arg.is_hide_default_value_set()
                    && !defaults.is_empty()
                {
                    let shown: Vec<_> = defaults.iter().map(|d| d.to_string_lossy()).collect();
                    let default = format!("[default: {}]", shown.join(" "));
                    assert!(
                        line.contains(&default),
                        "docs/flags.md, {heading}: the line of --{long} must show {default}:\n{line}"
                    );
                }
            }
        }
        for (at, _) in doc.match_indices("`--") {
            let name: String = doc[at + 3..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            assert!(
                known.contains(&name.as_str()),
                "docs/flags.md names --{name}, which no subcommand has"
            );
        }
    }
}
