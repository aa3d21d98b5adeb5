//! `monitor run`: attach, poll until a signal, then detach and flush.

use anyhow::Context as _;
use log::{info, warn};
use monitor_common::{names, stats};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::RunArgs,
    clock::{self, Clock},
    conntable::{Conn, ConnTable, LocalNets},
    kernel::Kernel,
    logs::{JsonLines, conn::ConnRecord},
    poller::Poller,
};

/// One way through: poller -> connection table -> logs.
struct Pipeline {
    poller: Poller,
    table: ConnTable,
    local: LocalNets,
    clock: Clock,
    conn_log: Option<JsonLines>,
    /// New connections the kernel could not count because the map was full, as last seen.
    map_full: u64,
}

impl Pipeline {
    /// Reads the map, then finishes what is done: each finished entry is taken out of the
    /// map with its final counts before its record is written.
    fn poll(&mut self) -> anyhow::Result<()> {
        let now = clock::monotonic_ns();
        self.check_map_full()?;
        for snap in self.poller.snapshot()? {
            self.table.observe(snap);
        }
        for key in self.table.finished(now) {
            if let Some(last) = self.poller.take(&key)? {
                self.table.observe(last);
            }
            if let Some(conn) = self.table.remove(&key) {
                self.finish(&conn)?;
            }
        }
        self.flush()
    }

    /// After the programs are detached: every connection still open gets its record.
    fn shutdown(&mut self) -> anyhow::Result<()> {
        for snap in self.poller.snapshot()? {
            self.table.observe(snap);
        }
        let open: Vec<Conn> = self.table.drain().collect();
        for conn in &open {
            self.finish(conn)?;
        }
        info!("wrote {} connections still open at shutdown", open.len());
        let counters = self.poller.counters()?;
        let unparsed: Vec<String> = stats::UNPARSED_REASONS
            .iter()
            .zip(counters)
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        if !unparsed.is_empty() {
            info!("packets not parsed: {}", unparsed.join(" "));
        }
        self.check_map_full()?;
        self.flush()
    }

    /// A full map loses counts visibly: say so each time more were refused.
    fn check_map_full(&mut self) -> anyhow::Result<()> {
        let full = self.poller.counters()?[stats::FLOW_MAP_FULL as usize];
        if full > self.map_full {
            warn!(
                "flow map full: {} packets of new connections not counted ({full} in all); \
                 raise --flow-map-size",
                full - self.map_full
            );
            self.map_full = full;
        }
        Ok(())
    }

    fn finish(&mut self, conn: &Conn) -> anyhow::Result<()> {
        if let Some(log) = &mut self.conn_log {
            let record = ConnRecord::new(conn, &self.local, &self.clock);
            log.write(&record)
                .with_context(|| format!("writing {}", log.path().display()))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(log) = &mut self.conn_log {
            log.flush()
                .with_context(|| format!("writing {}", log.path().display()))?;
        }
        Ok(())
    }
}

pub async fn run(args: RunArgs, ifaces: Vec<String>) -> anyhow::Result<()> {
    let mut kernel = Kernel::load(args.flow_map_size)?;
    let poller = Poller::new(
        kernel.take_map(names::FLOW_MAP)?,
        kernel.take_map(names::STATS_MAP)?,
    )?;
    let conn_log = args
        .conn_log
        .as_deref()
        .map(|path| JsonLines::open(path).with_context(|| format!("opening {}", path.display())))
        .transpose()?;
    let mut pipeline = Pipeline {
        poller,
        table: ConnTable::new(args.idle_timeout),
        local: LocalNets::new(args.local_nets.clone()),
        clock: Clock::new(),
        conn_log,
        map_full: 0,
    };

    let mut watching = Vec::new();
    for iface in &ifaces {
        let ingress = kernel.attach(iface, args.ingress_hook, args.xdp_mode)?;
        watching.push(format!("{iface} (ingress: {ingress}, egress: tc)"));
    }
    // Tests and scripts wait for this line: the programs are counting from here on.
    eprintln!("monitor: watching {}", watching.join(", "));

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut ticks = tokio::time::interval(args.poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if let Err(err) = pipeline.poll() {
                    warn!("poll failed: {err:#}");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Detach first: the last read then holds every packet that was counted.
    drop(kernel);
    info!("detached from {}", ifaces.join(", "));
    pipeline.shutdown()
}
