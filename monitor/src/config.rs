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
    rules::{RulesConfig, allowlist::Allowed, windows},
    top,
};

/// Flags that parse one by one but cannot be used together, or name what is not there.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "invalid value '{0}' for '--restricted-net <CIDR>': not inside any --local-net \
         (restricted hosts are local hosts; add --local-net for it)"
    )]
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
    for net in &args.rules.restricted_nets {
        if !args.local_nets.iter().any(|local| local.contains(net)) {
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

pub fn rules(args: &RuleArgs) -> RulesConfig {
    RulesConfig {
        upload_threshold: args.upload_threshold.0,
        upload_min_packets: args.upload_min_packets,
        ratio_ports: args.ratio_ports.clone(),
        ratio: args.ratio,
        ratio_min_bytes: args.ratio_min_bytes.0,
        long_durations: args.long_durations.0.clone(),
        long_ignore: args.long_ignore.clone(),
        restricted_nets: args.restricted_nets.clone(),
        allowed: Allowed {
            dst: args.allow_dst.clone(),
            services: args.allow_service.clone(),
            pairs: args.allow_pair.clone(),
        },
        restricted_suppress: args.restricted_suppress,
        restricted_doh: args.restricted_doh,
        windows: windows::Config {
            window: args.window,
            threshold: args.window_threshold.0,
            leak_period: args.leak_period,
            leak_threshold: args.leak_threshold.0,
            group: args.leak_group,
        },
        exclude_dst: args.exclude_dst.clone(),
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
