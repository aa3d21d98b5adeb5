//! From flags to each component's own configuration, and the checks that need more than
//! one flag or a look at the system. The one module below `main` and `run` that knows the
//! command line's types: components take the configuration built here.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::{
    cli::{DnsArgs, IpfixArgs, RuleArgs, RunArgs, TopArgs},
    dns::DnsConfig,
    export::Collector,
    kernel::pins,
    lists::{Item, RESTRICTED_NOT_LOCAL, Sources},
    rules::{Lists, RulesConfig, windows},
    top,
};

/// Flags that parse one by one but cannot be used together, or name what is not there.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value '{0}' for '--restricted-net <CIDR>': {RESTRICTED_NOT_LOCAL}")]
    RestrictedNotLocal(IpNet),
    #[error(
        "invalid value '{path}' for '--pin-path <DIR>': {} is not on a BPF filesystem \
         (mount one: mount -t bpf bpf /sys/fs/bpf)",
        existing.display()
    )]
    PinPathOffBpfFs { path: String, existing: PathBuf },
    #[error("invalid value '{url}' for '--ipfix-collector <URL>': {why}")]
    CollectorUnresolved { url: String, why: String },
}

/// `monitor run`'s flags taken together.
pub fn check_run(args: &RunArgs) -> Result<(), ConfigError> {
    // Those in files are checked as the files are read (`crate::lists`).
    for item in &args.rules.restricted_nets {
        if let Item::Entry(net) = item
            && !args.local_nets.iter().any(|local| local.contains(net))
        {
            return Err(ConfigError::RestrictedNotLocal(*net));
        }
    }
    args.pin_path.as_deref().map_or(Ok(()), check_pin_path)
}

/// `--pin-path`: a directory on a BPF filesystem, or one to be made there.
pub fn check_pin_path(path: &Path) -> Result<(), ConfigError> {
    // The directory itself, or where it would be made.
    let existing = path.ancestors().find(|p| p.exists()).expect("/ exists");
    if pins::on_bpf_fs(existing) {
        Ok(())
    } else {
        Err(ConfigError::PinPathOffBpfFs {
            path: path.display().to_string(),
            existing: existing.to_path_buf(),
        })
    }
}

/// The IPFIX collectors, their hosts resolved.
pub fn collectors(args: &IpfixArgs) -> Result<Vec<Collector>, ConfigError> {
    args.collectors
        .iter()
        .map(|url| {
            Collector::resolve(url).map_err(|e| ConfigError::CollectorUnresolved {
                url: url.to_string(),
                why: e.to_string(),
            })
        })
        .collect()
}

/// The list flags, to read the lists from at start and on SIGHUP.
pub fn list_sources(args: &RuleArgs, local_nets: &[IpNet]) -> Sources {
    Sources {
        long_ignore: args.long_ignore.clone(),
        restricted_nets: args.restricted_nets.clone(),
        allow_dst: args.allow_dst.clone(),
        allow_service: args.allow_service.clone(),
        allow_pair: args.allow_pair.clone(),
        exclude_dst: args.exclude_dst.clone(),
        intel_dst: args.intel_dst.clone(),
        local_nets: local_nets.to_vec(),
    }
}

/// The rules' configuration, with `lists` as read from the list flags.
pub fn rules(args: &RuleArgs, lists: Lists) -> RulesConfig {
    RulesConfig {
        upload_threshold: args.upload_threshold.0,
        upload_min_packets: args.upload_min_packets,
        ratio_ports: args.ratio_ports.clone(),
        ratio: args.ratio,
        ratio_min_bytes: args.ratio_min_bytes.0,
        long_durations: args.long_durations.0.clone(),
        restricted_suppress: args.restricted_suppress,
        restricted_doh: args.restricted_doh,
        windows: windows::Config {
            window: args.window,
            threshold: args.window_threshold.0,
            leak_period: args.leak_period,
            leak_threshold: args.leak_threshold.0,
            group: args.leak_group,
        },
        lists,
    }
}

pub fn dns(args: &DnsArgs) -> DnsConfig {
    DnsConfig {
        cache_size: args.dns_cache_size,
        min_ttl: args.dns_min_ttl,
        resolvers: args.dns_resolvers.clone(),
        tunnel_threshold: args.dns_tunnel_threshold.0,
        tunnel_period: args.dns_tunnel_period,
        nxdomain_threshold: args.dns_nxdomain_threshold,
    }
}

pub fn top(args: &TopArgs) -> top::Options {
    top::Options {
        metrics_addr: args.metrics_addr,
        interval: args.interval,
        count: args.count,
        once: args.once,
    }
}
