//! The `monitor` binary: parses the command line, checks what clap cannot (interfaces,
//! link types, flags that contradict each other) and runs the subcommand.

use std::process::ExitCode;

use std::path::Path;

use anyhow::Context as _;
use monitor::{
    cli::{self, Command},
    config, iface,
    kernel::{self, pins},
    run, top,
};

fn main() -> ExitCode {
    // aya's feature probes warn about every failed probe; without privileges that buries
    // the one line that says what to do.
    let filter = "info,aya::kernel_features=error";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter)).init();
    let cli = cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            let collectors = config::check_run(&args)
                .and_then(|()| config::collectors(&args.ipfix))
                .unwrap_or_else(|err| cli::usage_error(&format!("error: {err}")));
            let lists = config::list_sources(&args.rules, &args.local_nets)
                .load()
                .unwrap_or_else(|err| cli::usage_error(&format!("error: {err}")));
            let ifaces = watched_interfaces(&args.ifaces);
            check_links(&ifaces, &args);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run::run(args, ifaces, collectors, lists)))
        }
        Command::Top(args) => top::run(&config::top(&args)),
        Command::Detach(args) => {
            if let Err(err) = config::check_pin_path(&args.pin_path) {
                cli::usage_error(&format!("error: {err}"));
            }
            detach(&args.pin_path)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("monitor: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `monitor detach`: the pinned links go, and with them the programs and their maps.
fn detach(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        eprintln!("monitor: nothing pinned under {}", dir.display());
        return Ok(());
    }
    let removed = pins::remove(dir).with_context(|| format!("removing {}", dir.display()))?;
    eprintln!(
        "monitor: removed {} links and {} maps pinned under {}",
        removed.links,
        removed.maps,
        dir.display()
    );
    Ok(())
}

/// An interface whose link type the programs cannot parse, or one without a link-layer
/// header asked to be hooked with XDP explicitly, is bad input (exit 2). `--xdp-mode auto`
/// counts such an interface's ingress with TC.
fn check_links(ifaces: &[String], args: &cli::RunArgs) {
    for name in ifaces {
        let link = match iface::link_type(name) {
            Ok(link) => link,
            Err(err) => cli::usage_error(&format!("error: {name}: reading its link type: {err}")),
        };
        match link.framing() {
            None => cli::usage_error(&format!(
                "error: {name}: link/{link} cannot be parsed: the programs read Ethernet \
                 frames, or IP packets on devices without a link-layer header"
            )),
            Some(iface::Framing::Ip)
                if args.ingress_hook == kernel::IngressHook::Xdp
                    && args.xdp_mode != kernel::XdpMode::Auto =>
            {
                cli::usage_error(&format!(
                    "error: {name}: link/{link} has no Ethernet header for XDP: use --ingress-hook tc, \
                     or --xdp-mode auto to count its ingress with TC"
                ))
            }
            Some(_) => {}
        }
    }
}

/// The interfaces to watch; a missing one, or one given twice (by any of its names), is
/// bad input (exit 2).
fn watched_interfaces(asked: &[String]) -> Vec<String> {
    if asked.is_empty() {
        return match iface::default_route() {
            Some(iface) => vec![iface],
            None => cli::usage_error(
                "error: no default route to watch: name the interface with --iface <IFACE>",
            ),
        };
    }
    let mut seen = Vec::with_capacity(asked.len());
    for name in asked {
        let Some(index) = iface::index(name) else {
            cli::usage_error(&format!(
                "error: invalid value '{name}' for '--iface <IFACE>': no such interface (see `ip link`)"
            ))
        };
        if seen.contains(&index) {
            cli::usage_error(&format!(
                "error: invalid value '{name}' for '--iface <IFACE>': interface given more than once \
                 (each is watched once)"
            ));
        }
        seen.push(index);
    }
    asked.to_vec()
}
