//! Command-line flags, their value parsers and defaults.
//!
//! A bad value exits with status 2 and one line naming the flag, the value and what is
//! accepted (see [`parse`]).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, error::ErrorKind};
use ipnet::IpNet;
use monitor_common::DEFAULT_FLOW_MAP_SIZE;

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
pub enum Command {
    /// Attach the kernel programs and watch connections until SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IngressHook {
    /// XDP (see --xdp-mode).
    Xdp,
    /// TC ingress (clsact/TCX).
    Tc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    /// Native XDP where the driver has it, else TC ingress (generic XDP cannot count
    /// aggregated packets exactly).
    Auto,
    /// Native (driver) XDP only; fail where the driver lacks it.
    Native,
    /// Generic XDP: works everywhere, but sees GRO/GSO aggregates as one packet.
    Skb,
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

    /// Finished connections as JSON lines with Zeek conn.log field names. Default: not
    /// written.
    #[arg(long, value_name = "PATH", help_heading = "Outputs")]
    pub conn_log: Option<PathBuf>,
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

/// DUR: humantime (`30s`, `5m`, `1h`, `3d`), more than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("expected a duration above zero such as 500ms, 30s, 5m, 1h or 3d".into()),
    }
}

/// CIDR: a network (`10.0.0.0/8`, `fc00::/7`) or a single address.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| "expected an IPv4 or IPv6 network such as 10.0.0.0/8 or fc00::/7".into())
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
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(3 * 86400)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("ten").is_err());
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["monitor", "run"]).unwrap();
        let Command::Run(run) = cli.command;
        assert_eq!(run.poll_interval, Duration::from_secs(1));
        assert_eq!(run.local_nets, default_local_nets());
        assert_eq!(run.ingress_hook, IngressHook::Tc);
        assert!(run.ifaces.is_empty());
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
}
