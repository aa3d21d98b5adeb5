//! `monitor run`: attach, poll until a signal, then detach and flush.

use std::{
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{info, warn};
use monitor_common::{flow::FlowKey, names, stats};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    alerts::{
        Alert, ConnLog,
        dispatch::Dispatcher,
        sinks::{AlertLog, Sink, alertmanager::AlertmanagerSink, syslog::SyslogSink},
        suppress::Suppressor,
    },
    cli::RunArgs,
    clock::{self, Clock, Now},
    config,
    conntable::{Conn, ConnTable, EndReason, LocalNets, Uids},
    consumer::{ConnCtx, Consumer, PollCtx},
    dns::{
        Dns,
        events::{Batch, DnsEvents, DnsQueue, Drained},
    },
    export::{Collector, IpfixConfig, IpfixExporter},
    finishing::Finishing,
    kernel::{Kernel, pins::PinDir},
    lists::{self, Reloads, Sources},
    logs::{self, JsonLines},
    metrics::{self, Metrics},
    nat::Nat,
    owners::Owners,
    parse_watch::{self, Change, ParseWatch},
    poller::{ChangeMaps, Coverage, FlowSnapshot, PollError, Poller, Taken},
    privileges,
    records::ConnRecords,
    resolve,
    resolve::{Answers, Names},
    rules::{self, Lists, Rule, RuleSet},
    sni::Sni,
    state::{Saved, StateDir},
    top,
};

/// Alerts a sink may fall behind by before new ones are dropped (and counted).
const SINK_QUEUE: usize = 10_000;
/// How long shutdown waits for sinks to take what is queued.
const SINK_DRAIN: Duration = Duration::from_secs(5);
/// The part of a poll interval a poll spends taking finished connections out of the map,
/// counted from its start.
const FINISH_SHARE: u32 = 2;
/// Finished connections a poll takes whatever its time: the map drains even when reads
/// take most of the interval.
const FINISH_AT_LEAST: usize = 1024;

/// One way through: poller -> connection table -> rules -> suppression -> sinks, with the
/// connection logs written as connections finish or age.
struct Pipeline {
    poller: Poller,
    table: ConnTable,
    local: LocalNets,
    clock: Clock,
    /// The configured host names' addresses, as the resolver publishes them.
    resolved: resolve::Resolved,
    /// What the rules match host names by in this poll: taken once per poll, after its
    /// DNS answers are recorded.
    hosts: Arc<Answers>,
    consumers: Consumers,
    suppressor: Suppressor,
    sinks: Vec<Dispatcher>,
    conn_long_log: Option<JsonLines>,
    /// New connections the kernel could not count because the map was full, as last seen.
    map_full: u64,
    /// The kernel map's capacity (--flow-map-size), for pressure relief.
    capacity: u32,
    finishing: Finishing,
    /// How long into a poll finished connections are taken (see [`FINISH_SHARE`]).
    finish_budget: Duration,
    /// `--state-dir`, rewritten after every poll that changed what the rules know.
    state: Option<StateDir>,
    /// Whether the state holds the open connections' totals: only a run with
    /// `--pin-path` finds those connections again.
    state_conns: bool,
    dns: Dns,
    nat: Nat,
    parse_watch: ParseWatch,
    /// The interfaces and how they are hooked, as the `watching` line says.
    watching: String,
    /// DNS messages drained from the kernel's ring meanwhile.
    dns_queue: DnsQueue,
    dns_batch: Batch,
    /// The list flags, read again on SIGHUP into `lists`, the lists the rules match now.
    sources: Sources,
    lists: Lists,
    reloads: Reloads,
    /// Server names from the connections' first payloads, drained as DNS messages are.
    sni: Sni,
    hellos: Drained,
    /// The owners of the watched host's sockets, drained as DNS messages are.
    owners: Owners,
    owner_events: Drained,
}

impl Pipeline {
    /// Reads the map, runs the rules on every open connection, then finishes what is done:
    /// each finished entry is taken out of the map with its final counts, judged by the
    /// rules once more, and written.
    fn poll(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        if self.reloads.requested() {
            self.reload_lists();
        }
        let now = Now::new(clock::monotonic_ns(), &self.clock);
        let counters = self.poller.counters()?;
        self.check_map_full(counters[stats::FLOW_MAP_FULL as usize]);
        let coverage = self.read_map()?;
        // A connection opened right after its lookup is judged by name: every answer the
        // kernel queued before the read is applied first.
        self.record_dns();
        self.record_hellos();
        self.record_owners();
        self.hosts = self.resolved.snapshot();
        for key in self.judge_open(coverage, now) {
            self.finishing.push(key, None);
        }
        self.relieve_pressure(now);
        self.take_finished(now, Some(started + self.finish_budget))?;
        for consumer in self.consumers.each() {
            consumer.end_poll(&self.table, &self.local, now);
        }
        let mut alerts = self.consumers.rules.take_raised();
        let (clock, table) = (self.clock, &self.table);
        self.dns.poll(
            now,
            |ns| clock.epoch_secs(ns),
            |key| table.get(key).map(|c| c.uid.to_string()),
            &mut alerts,
        );
        self.suppressor.prune(now.mono_ns);
        self.emit(alerts, now);
        self.flush();
        self.check_parsing(now.mono_ns, &counters);
        self.report(now, counters, started);
        self.save_state();
        Ok(())
    }

    /// When the map is nearly full, queues the longest idle connections to finish early;
    /// not while earlier finished ones wait, those being the longest idle already.
    fn relieve_pressure(&mut self, now: Now) {
        if !self.finishing.is_empty() {
            return;
        }
        let relief = self.table.pressure_relief(now.mono_ns, self.capacity);
        if !relief.is_empty() {
            warn!(
                "flow map over 90% full: finishing {} idle connections early (their records are written)",
                relief.len()
            );
        }
        for key in relief {
            self.finishing.push(key, Some(EndReason::LackOfResources));
        }
    }

    /// A poll's figures to the metrics: DNS, shed state, sinks, export, the table and the
    /// poll's own time.
    fn report(&mut self, now: Now, counters: [u64; stats::SLOTS as usize], started: Instant) {
        self.consumers
            .metrics
            .dns(self.dns.counts(), self.dns.cache_entries());
        match self.hellos.lost() {
            Ok(lost) => self.consumers.metrics.hellos(self.sni.counts(), lost),
            Err(err) => warn!("reading HELLO_LOST: {err}"),
        }
        match self.owner_events.lost() {
            Ok(lost) => self.consumers.metrics.owners_lost(lost),
            Err(err) => warn!("reading OWNER_LOST: {err}"),
        }
        self.consumers
            .metrics
            .shed(self.suppressor.shed(), self.consumers.rules.shed());
        for sink in &self.sinks {
            self.consumers
                .metrics
                .sink(sink.name(), sink.dropped(), sink.failures());
        }
        let (records, messages, errors) = self
            .consumers
            .exporters
            .iter()
            .map(|e| e.stats())
            .fold((0, 0, 0), |(r, m, e), s| {
                (r + s.records, m + s.messages, e + s.errors)
            });
        self.consumers.metrics.ipfix(records, messages, errors);
        self.consumers.metrics.polled(
            (self.table.len(), self.table.added()),
            counters,
            started.elapsed(),
            now.epoch,
        );
    }

    /// Takes the finished connections out of the map, judges them once more and writes
    /// them: until `until` if given (at least [`FINISH_AT_LEAST`]), the rest waiting for
    /// the next poll.
    fn take_finished(&mut self, now: Now, until: Option<Instant>) -> Result<(), PollError> {
        let mut taken = 0;
        while until.is_none_or(|until| taken < FINISH_AT_LEAST || Instant::now() < until)
            && let Some((key, ending)) = self.finishing.pop()
        {
            // Queued by an earlier poll and read since with new packets (a new use of its
            // addresses and ports): its next quiet finishes it.
            if ending.is_none()
                && (self.table.get(&key)).is_some_and(|c| !self.table.is_finished(c, now.mono_ns))
            {
                continue;
            }
            taken += 1;
            let last = match self.nat.take(&self.poller, &key) {
                Ok(Taken::Final(last)) => Some(last),
                Ok(Taken::Gone) => None,
                Ok(Taken::Moved) => continue,
                Err(err) => {
                    self.finishing.put_back(key, ending);
                    return Err(err);
                }
            };
            if let Some(conn) = self.table.take(&key, last) {
                // Closed by the endpoints, else idle, unless the map's pressure ended it.
                let reason = ending.unwrap_or(if conn.closed() {
                    EndReason::EndOfFlow
                } else {
                    EndReason::Idle
                });
                self.finish(&conn, now, reason);
            }
            self.nat.finished(&key);
        }
        self.consumers.metrics.finishing(self.finishing.len());
        Ok(())
    }

    /// SIGHUP: the lists are read again; the rules match by them from now on, keeping
    /// what they know, and their new host names are resolved at once. A list whose file
    /// cannot be read stays as it was.
    fn reload_lists(&mut self) {
        let errors = self.sources.reload(&mut self.lists);
        for err in &errors {
            warn!("SIGHUP: {err}; that list stays as it was");
        }
        self.consumers.rules.set_lists(&self.lists);
        self.resolved
            .set_hosts(rules::allowlist::host_names(&self.lists));
        self.consumers.metrics.config_reload(errors.is_empty());
        if errors.is_empty() {
            info!("SIGHUP: lists reloaded");
        }
    }

    /// Runs the rules, metrics and exporters on the open connections that may have
    /// something for them: after a read of the whole map every one; after a read of what
    /// changed those it observed, and those whose wake-up time came (a connection that
    /// carries nothing new is finished, or a rule or an exporter acts on it, only at a
    /// time it names). Returns the keys of the finished ones.
    fn judge_open(&mut self, coverage: Coverage, now: Now) -> Vec<FlowKey> {
        let (table, consumers) = (&mut self.table, &mut self.consumers);
        let poll = PollCtx {
            local: &self.local,
            names: Names::new(&self.hosts, Some(self.dns.passive())),
            clock: &self.clock,
            nat: &self.nat,
            hellos: self.sni.hellos(),
            owners: self.owners.owned(),
        };
        let mut finished = Vec::new();
        if coverage == Coverage::Whole {
            for conn in table.iter() {
                if table.is_finished(conn, now.mono_ns) {
                    finished.push(conn.key);
                }
                consumers.update(&poll.conn(conn), now);
            }
            return finished;
        }
        let judging = table.judging(now.mono_ns, |conn| consumers.acts_at(&poll.conn(conn)));
        let mut wakes = Vec::new();
        for (position, reschedule) in judging {
            let conn = table.at(position).expect("a position to judge");
            let ctx = poll.conn(conn);
            if table.is_finished(conn, now.mono_ns) {
                finished.push(conn.key);
            } else if reschedule {
                wakes.push((position, consumers.acts_at(&ctx)));
            }
            consumers.update(&ctx, now);
        }
        for (position, at) in wakes {
            table.wake_at(position, at);
        }
        finished
    }

    /// DNS messages, each between its pre-NAT endpoints: the translations of the
    /// connections they belong to are taken first.
    fn record_dns(&mut self) {
        self.dns_queue.take(&mut self.dns_batch);
        self.nat.refresh();
        let (dns, nat, clock) = (&mut self.dns, &self.nat, self.clock);
        self.dns_batch
            .drain(|record| dns.record(record, |ns| clock.epoch_secs(ns), nat));
    }

    /// The hellos the kernel queued before the map read, each given to its connection
    /// (after the DNS messages, which refreshed the translations).
    fn record_hellos(&mut self) {
        let (sni, nat, table) = (&mut self.sni, &self.nat, &self.table);
        self.hellos.each(|record| sni.record(record, nat));
        sni.settle(|key| table.get(key).is_some());
    }

    /// The owners the kernel named before the map read, each given to its connection.
    fn record_owners(&mut self) {
        let (owners, nat, table) = (&mut self.owners, &self.nat, &self.table);
        self.owner_events.each(|record| owners.record(record, nat));
        owners.settle(|key| table.get(key).is_some());
    }

    /// Polls every `every` on its own thread until `stop` says so (or its sender goes),
    /// then hands itself back. A poll that runs late delays the next by `every`.
    fn run(mut self, every: Duration, stop: &mpsc::Receiver<()>) -> Self {
        let mut due = Instant::now();
        loop {
            let wait = due.saturating_duration_since(Instant::now());
            if !matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
                return self;
            }
            let fired = Instant::now();
            if let Err(err) = self.poll() {
                warn!("poll failed: {err:#}");
            }
            due = due.max(fired) + every;
        }
    }

    /// One read of the map into the table, each entry under its pre-NAT key: of the whole
    /// map, or of the entries that changed and those a new translation concerns.
    fn read_map(&mut self) -> Result<Coverage, PollError> {
        self.nat.refresh();
        let coverage = self
            .poller
            .begin(self.nat.take_learned(), self.table.len())?;
        let (poller, nat) = (&mut self.poller, &mut self.nat);
        let mut entries = 0;
        let read = |observe: &mut dyn FnMut(FlowSnapshot)| {
            entries = poller.read(|snap| nat.route(snap, observe))?;
            nat.end_read(observe);
            Ok::<(), PollError>(())
        };
        match coverage {
            Coverage::Whole => self.table.observe_map(read),
            Coverage::Changed => self.table.observe_changed(read),
        }?;
        self.consumers
            .metrics
            .read(coverage, entries, self.poller.changes_lost());
        self.nat.settle_read(&mut self.table);
        Ok(coverage)
    }

    /// Writes the state if it changed since it was last written.
    fn save_state(&mut self) {
        let Some(dir) = &mut self.state else { return };
        let (rules, suppressor) = (&self.consumers.rules, &self.suppressor);
        let seed = self.table.uids().seed();
        let conns = self.state_conns.then_some(&mut self.table);
        let changes = rules.iter().map(|rule| rule.changes()).sum::<u64>()
            + suppressor.changes()
            + conns.as_ref().map_or(0, |table| table.changes());
        let build = || {
            let mut saved = Saved::new(seed);
            for rule in rules.iter() {
                rule.save(&mut saved.rules);
            }
            saved.suppressor = suppressor.save();
            saved
        };
        if let Err(err) = dir.save_changed(changes, conns, build) {
            warn!("saving rule state: {err}");
        }
    }

    /// Takes back an earlier run's rule state; per-connection state only when that run's
    /// connections are still in the (pinned) map.
    fn restore(&mut self, saved: Saved, conns_resumed: bool) {
        if conns_resumed {
            self.table.resume(saved.conns);
        }
        for rule in self.consumers.rules.iter_mut() {
            rule.restore(&saved.rules, conns_resumed);
        }
        self.suppressor.restore(saved.suppressor);
    }

    /// With `--pin-path`: the programs keep counting and the open connections are left,
    /// unfinished, to the next run; what the rules know is saved, the sinks drained.
    fn suspend(mut self, pins: &std::path::Path) -> anyhow::Result<()> {
        self.record_dns();
        self.record_hellos();
        self.record_owners();
        self.save_state();
        info!(
            "{} open connections left to the next run: the programs stay attached, pinned under {} \
             (`monitor detach --pin-path {}` removes them)",
            self.table.len(),
            pins.display(),
            pins.display()
        );
        self.close()
    }

    /// After the programs are detached: every connection still open is judged and gets
    /// its record, and the sinks get what they can take in a bounded time.
    fn shutdown(mut self) -> anyhow::Result<()> {
        let now = Now::new(clock::monotonic_ns(), &self.clock);
        self.read_map()?;
        self.record_dns();
        self.record_hellos();
        self.record_owners();
        // While the table still knows the uids of the connections that carried DNS.
        self.close_dns_log();
        // Those found finished before keep their reason.
        self.take_finished(now, None)?;
        let open: Vec<Conn> = self.table.drain().collect();
        for conn in &open {
            self.finish(conn, now, EndReason::ForcedEnd);
        }
        let alerts = self.consumers.rules.take_raised();
        self.emit(alerts, now);
        info!("wrote {} connections still open at shutdown", open.len());
        self.save_state();
        self.close()
    }

    /// The last words: counters, logs flushed, sinks drained in a bounded time.
    fn close(mut self) -> anyhow::Result<()> {
        for exporter in std::mem::take(&mut self.consumers.exporters) {
            let stats = exporter.shutdown();
            info!(
                "IPFIX: {} records in {} messages, {} errors",
                stats.records, stats.messages, stats.errors
            );
        }
        self.close_dns_log();
        let counters = self.poller.counters()?;
        self.check_map_full(counters[stats::FLOW_MAP_FULL as usize]);
        let unparsed: Vec<String> = stats::UNPARSED_REASONS
            .iter()
            .map(|&(slot, reason)| (reason, counters[slot as usize]))
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        if !unparsed.is_empty() {
            info!("packets not parsed: {}", unparsed.join(" "));
        }
        for log in self.logs() {
            log.close();
        }
        // All sinks drain at once: two that are down cost one wait, not two.
        std::thread::scope(|scope| {
            for sink in self.sinks {
                scope.spawn(move || {
                    let (name, dropped) = (sink.name(), sink.dropped());
                    let left = sink.shutdown(SINK_DRAIN);
                    if left > 0 || dropped > 0 {
                        warn!(
                            "{name}: {dropped} alerts dropped (queue full), {left} undelivered at shutdown"
                        );
                    }
                });
            }
        });
        Ok(())
    }

    fn finish(&mut self, conn: &Conn, now: Now, reason: EndReason) {
        let poll = PollCtx {
            local: &self.local,
            names: Names::new(&self.hosts, Some(self.dns.passive())),
            clock: &self.clock,
            nat: &self.nat,
            hellos: self.sni.hellos(),
            owners: self.owners.owned(),
        };
        let ctx = poll.conn(conn);
        for consumer in self.consumers.each() {
            consumer.finish(&ctx, now, reason);
        }
        self.sni.forget(&conn.key);
        self.owners.forget(&conn.key);
    }

    /// Alerts go out whatever the logs do: a log that cannot be written is counted.
    fn emit(&mut self, alerts: Vec<Alert>, now: Now) {
        for mut alert in alerts {
            self.name_remote(&mut alert, now);
            if let Some(log) = alert.conn_log.and_then(|log| self.conn_log(log))
                && let Some(record) = alert.conn_record()
            {
                log.write(&record);
            }
            if !self.suppressor.admit(&alert, now.mono_ns) {
                self.consumers.metrics.suppressed(alert.note);
                continue;
            }
            self.consumers.metrics.alert(alert.note);
            for sink in &self.sinks {
                sink.submit(alert.clone());
            }
        }
    }

    /// The connection log an alert names, if it is open.
    fn conn_log(&mut self, log: ConnLog) -> Option<&mut JsonLines> {
        match log {
            ConnLog::Long => self.conn_long_log.as_mut(),
        }
    }

    /// Writes the DNS transactions still waiting (unanswered queries included).
    fn close_dns_log(&mut self) {
        let (clock, table) = (self.clock, &self.table);
        self.dns.shutdown(
            |ns| clock.epoch_secs(ns),
            |key| table.get(key).map(|c| c.uid.to_string()),
        );
    }

    /// The connection logs that are open.
    fn logs(&mut self) -> impl Iterator<Item = &mut JsonLines> {
        let conn = self.consumers.conn_log.as_mut().map(|c| &mut c.log);
        conn.into_iter().chain(self.conn_long_log.as_mut())
    }

    /// Passive DNS's name for the remote endpoint of an alert about no one connection
    /// (a connection's record names its own), beside `dst`.
    fn name_remote(&self, alert: &mut Alert, now: Now) {
        if alert.conn.is_none()
            && let Some(dst) = alert.dst
            && let Some(name) = self.dns.fqdn(alert.src, dst, now.mono_ns)
        {
            alert.figures.insert("remote_fqdn".into(), name.into());
        }
    }

    fn flush(&mut self) {
        for log in self.logs() {
            log.flush_or_count();
        }
        let conn = self.consumers.conn_log.as_ref().map(|c| c.log.stats());
        let conn_long = self.conn_long_log.as_ref().map(JsonLines::stats);
        self.consumers.metrics.logs([
            ("conn", conn),
            ("conn_long", conn_long),
            ("dns", self.dns.log_stats()),
        ]);
    }

    /// An interface whose packets the programs cannot parse counts nothing: say so once
    /// when most of a minute's packets were not parsed, and when that ends.
    fn check_parsing(&mut self, mono_ns: u64, counters: &[u64; stats::SLOTS as usize]) {
        let counted = self.consumers.metrics.packets_counted();
        let unparsed = parse_watch::unparsed_total(counters);
        match self.parse_watch.update(mono_ns, counted, unparsed) {
            Some(Change::Failing { unparsed, counted }) => warn!(
                "most packets of the last minute could not be parsed ({unparsed} not parsed, \
                 {counted} counted; see packets_unparsed_total by reason): the programs may \
                 not understand the framing of {}",
                self.watching
            ),
            Some(Change::Recovered) => info!("packets are parsed again"),
            None => {}
        }
        self.consumers
            .metrics
            .parse_failing(self.parse_watch.failing());
    }

    /// A full map loses counts visibly: say so each time more were refused.
    fn check_map_full(&mut self, full: u64) {
        if full > self.map_full {
            warn!(
                "flow map full: {} packets of new connections not counted ({full} in all); \
                 raise --flow-map-size",
                full - self.map_full
            );
            self.map_full = full;
        }
    }
}

/// What a poll hands its connections to.
struct Consumers {
    rules: RuleSet,
    metrics: Metrics,
    top: top::Tracker,
    /// One per --ipfix-collector.
    exporters: Vec<IpfixExporter>,
    conn_log: Option<ConnRecords>,
}

impl Consumers {
    fn each(&mut self) -> impl Iterator<Item = &mut dyn Consumer> {
        let fixed: [&mut dyn Consumer; 3] = [&mut self.rules, &mut self.metrics, &mut self.top];
        let exporters = self.exporters.iter_mut().map(|e| e as &mut dyn Consumer);
        let conn_log = self.conn_log.iter_mut().map(|c| c as &mut dyn Consumer);
        fixed.into_iter().chain(exporters).chain(conn_log)
    }

    fn update(&mut self, conn: &ConnCtx, now: Now) {
        for consumer in self.each() {
            consumer.update(conn, now);
        }
    }

    /// The earliest kernel time at which one of them acts on `conn` with nothing new in
    /// it.
    fn acts_at(&mut self, conn: &ConnCtx) -> u64 {
        self.each()
            .filter_map(|consumer| consumer.next_due(conn))
            .min()
            .unwrap_or(u64::MAX)
    }
}

fn open_log(path: Option<&std::path::Path>) -> anyhow::Result<Option<JsonLines>> {
    path.map(|path| JsonLines::open(path).with_context(|| format!("opening {}", path.display())))
        .transpose()
}

/// What the operator's flags open before the kernel is touched: everything that can fail
/// on bad input fails here.
struct Outputs {
    sinks: Vec<Box<dyn Sink>>,
    conn_log: Option<JsonLines>,
    conn_long_log: Option<JsonLines>,
    dns_log: Option<JsonLines>,
    state: Option<StateDir>,
    saved: Option<Saved>,
    pins: Option<PinDir>,
}

impl Outputs {
    fn open(args: &RunArgs) -> anyhow::Result<Self> {
        let alert_log = AlertLog::open(&args.alert_log)
            .with_context(|| format!("opening {}", args.alert_log.display()))?;
        let (state, saved) = match &args.state_dir {
            Some(dir) => {
                let (state, saved) = StateDir::open(dir, args.flow_map_size)?;
                (Some(state), saved)
            }
            None => (None, None),
        };
        let pins = args
            .pin_path
            .as_deref()
            .map(|dir| PinDir::create(dir).context("--pin-path"))
            .transpose()?;
        if pins.is_some() && state.is_none() {
            warn!("--pin-path without --state-dir: counts survive a restart, rule state does not");
        }
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(alert_log)];
        if let Some(target) = &args.syslog {
            sinks.push(Box::new(SyslogSink::new(target.clone())));
        }
        if let Some(url) = &args.alertmanager_url {
            sinks.push(Box::new(AlertmanagerSink::new(url)));
        }
        Ok(Self {
            sinks,
            conn_log: open_log(args.conn_log.as_deref())?,
            conn_long_log: open_log(args.conn_long_log.as_deref())?,
            dns_log: open_log(args.dns.dns_log.as_deref())?,
            state,
            saved,
            pins,
        })
    }
}

/// The programs loaded and attached, and the maps the agent reads.
struct Attached {
    kernel: Kernel,
    poller: Poller,
    dns_events: DnsEvents,
    dns_queue: DnsQueue,
    hello_events: DnsEvents,
    hellos: Drained,
    owner_events: DnsEvents,
    owners: Drained,
    /// The interfaces and how each is hooked, for the `watching` line.
    watching: String,
    /// Whether pinned maps brought an earlier run's connections.
    resumed: bool,
}

impl Attached {
    fn attach(args: &RunArgs, ifaces: &[String], pins: Option<PinDir>) -> anyhow::Result<Self> {
        let mut kernel = Kernel::load(args.flow_map_size, pins)?;
        let resumed = kernel.resumed();
        if resumed {
            info!("resuming the connections counted while no agent ran");
        }
        let mut poller = Poller::new(
            kernel.take_map(names::FLOW_MAP)?,
            kernel.take_map(names::STATS_MAP)?,
        );
        let (dns_events, dns_queue) = DnsEvents::new(kernel.take_map(names::DNS_EVENTS_MAP)?)?;
        let (hello_events, hellos) = Drained::new(
            kernel.take_map(names::HELLO_EVENTS_MAP)?,
            kernel.take_map(names::HELLO_LOST_MAP)?,
        )?;
        let (owner_events, owners) = Drained::new(
            kernel.take_map(names::OWNER_EVENTS_MAP)?,
            kernel.take_map(names::OWNER_LOST_MAP)?,
        )?;
        if let Err(err) = kernel.attach_owners() {
            warn!("connections will not name their local process: {err}");
        }
        let mut watching = Vec::new();
        for iface in ifaces {
            let attached = kernel.attach(iface, args.ingress_hook, args.xdp_mode)?;
            watching.push(format!("{iface} ({attached})"));
        }
        if kernel.changes_complete() {
            poller.follow_changes(ChangeMaps {
                epoch: kernel.take_map(names::EPOCH_MAP)?,
                changed: kernel.take_map(names::CHANGED_MAP)?,
                new_entries: kernel.take_map(names::NEW_ENTRIES_MAP)?,
                lost: kernel.take_map(names::CHANGES_LOST_MAP)?,
            })?;
        } else {
            warn!(
                "programs of an earlier build stay attached through pinned links: every poll \
                 reads the whole flow map (`monitor detach --pin-path` and a restart attach \
                 this build's)"
            );
        }
        Ok(Self {
            kernel,
            poller,
            dns_events,
            dns_queue,
            hello_events,
            hellos,
            owner_events,
            owners,
            watching: watching.join(", "),
            resumed,
        })
    }
}

/// The signals the agent answers: SIGHUP reopens the logs and reloads the lists, SIGINT
/// and SIGTERM stop it.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }

    /// Returns at SIGINT or SIGTERM.
    async fn until_stop(&mut self) {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    logs::request_reopen();
                    lists::request_reload();
                    info!("SIGHUP: log files reopen before their next line; lists reload before the next poll");
                }
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
            }
        }
    }
}

/// Polls every `every` on a thread of its own (/metrics and the DNS drain stay on this
/// one) until a signal stops the agent; the poll in progress ends first. Hands the
/// pipeline back.
async fn poll_until_stopped(
    pipeline: Pipeline,
    every: Duration,
    rings: [(DnsEvents, &'static str); 3],
    mut signals: Signals,
) -> anyhow::Result<Pipeline> {
    let (stop, stopped) = mpsc::channel();
    let polling = std::thread::Builder::new()
        .name("poll".into())
        .spawn(move || pipeline.run(every, &stopped))
        .context("starting the poll thread")?;
    let drains = rings.map(|(events, what)| {
        tokio::spawn(async move {
            if let Err(err) = events.run().await {
                warn!("reading {what} failed: {err:#}");
            }
        })
    });
    signals.until_stop().await;
    for drain in drains {
        drain.abort();
    }
    drop(stop);
    polling
        .join()
        .map_err(|_| anyhow::anyhow!("the poll thread panicked"))
}

/// What a pipeline is made of, besides the flags.
struct Parts {
    outputs: Outputs,
    poller: Poller,
    dns_queue: DnsQueue,
    hellos: Drained,
    owner_events: Drained,
    watching: String,
    resumed: bool,
    metrics: Metrics,
    top: top::Tracker,
    nat: Nat,
}

impl Pipeline {
    fn new(
        args: &RunArgs,
        collectors: &[Collector],
        lists: Lists,
        parts: Parts,
    ) -> anyhow::Result<Self> {
        let clock = Clock::new();
        let local = LocalNets::new(args.local_nets.clone());
        let dns_config = config::dns(&args.dns);
        let (rules, resolved) = start_rules(&config::rules(&args.rules, lists.clone()));
        let Outputs {
            sinks,
            conn_log,
            conn_long_log,
            dns_log,
            state,
            saved,
            ..
        } = parts.outputs;
        let saved = vet_saved(state.as_ref(), saved, &clock, args.flow_map_size, &rules);
        let seed = saved
            .as_ref()
            .map_or_else(Uids::random_seed, |saved| saved.uid_seed);
        let mut pipeline = Pipeline {
            poller: parts.poller,
            table: ConnTable::new(args.idle_timeout, Uids::new(seed)),
            consumers: Consumers {
                rules: RuleSet::new(rules),
                metrics: parts.metrics,
                top: parts.top,
                exporters: exporters(args, collectors, clock)?,
                conn_log: conn_log.map(|log| ConnRecords { log }),
            },
            suppressor: Suppressor::new(args.suppress),
            sinks: (sinks.into_iter())
                .map(|sink| Dispatcher::spawn(sink, SINK_QUEUE))
                .collect(),
            conn_long_log,
            map_full: 0,
            capacity: args.flow_map_size,
            finishing: Finishing::default(),
            finish_budget: args.poll_interval / FINISH_SHARE,
            state,
            state_conns: args.pin_path.is_some(),
            dns: Dns::new(&dns_config, args.rules.window, local.clone(), dns_log),
            nat: parts.nat,
            parse_watch: ParseWatch::default(),
            watching: parts.watching,
            dns_queue: parts.dns_queue,
            dns_batch: Batch::default(),
            sni: Sni::new(&args.dns.doh_servers),
            hellos: parts.hellos,
            owners: Owners::default(),
            owner_events: parts.owner_events,
            local,
            clock,
            hosts: resolved.snapshot(),
            resolved,
            sources: config::list_sources(&args.rules, &args.local_nets),
            lists,
            reloads: Reloads::default(),
        };
        if let Some(saved) = saved {
            pipeline.restore(saved, parts.resumed);
        }
        Ok(pipeline)
    }
}

/// An earlier run's state, if this run's state directory had one it could have written.
fn vet_saved(
    dir: Option<&StateDir>,
    saved: Option<Saved>,
    clock: &Clock,
    capacity: u32,
    rules: &[Box<dyn Rule>],
) -> Option<Saved> {
    let now = Now::new(clock::monotonic_ns(), clock);
    dir.zip(saved)
        .and_then(|(dir, saved)| dir.vetted(saved, now, capacity, rules))
}

/// The rules the flags turn on; the host names they mention are resolved in the
/// background from now on, their answers published through the `Resolved` returned.
fn start_rules(config: &rules::RulesConfig) -> (Vec<Box<dyn Rule>>, resolve::Resolved) {
    let resolved = resolve::start(rules::allowlist::host_names(&config.lists));
    (rules::from_config(config), resolved)
}

/// One exporter per `--ipfix-collector`.
fn exporters(
    args: &RunArgs,
    collectors: &[Collector],
    clock: Clock,
) -> anyhow::Result<Vec<IpfixExporter>> {
    collectors
        .iter()
        .map(|collector| {
            let mut config = IpfixConfig::new(collector.clone(), clock);
            config.active_timeout = args.ipfix.flow_active_timeout;
            config.template_refresh = args.ipfix.ipfix_template_refresh;
            config.domain_id = args.ipfix.ipfix_domain_id;
            config.biflow = args.ipfix.ipfix_biflow;
            IpfixExporter::new(config).with_context(|| format!("--ipfix-collector {collector}"))
        })
        .collect()
}

pub async fn run(
    args: RunArgs,
    ifaces: Vec<String>,
    collectors: Vec<Collector>,
    lists: Lists,
) -> anyhow::Result<()> {
    let mut outputs = Outputs::open(&args)?;
    let metrics = Metrics::new(args.flow_map_size, args.top_talkers, args.rules.window)?;
    // Before the programs load: the first poll's rates run from here.
    let top = top::Tracker::new(clock::monotonic_ns());
    metrics::serve(args.metrics_addr, metrics.registry(), top.subscribe()).await?;
    // Before anything is loaded: a signal that comes while the programs attach waits for
    // the loop below, which detaches them cleanly, instead of killing the agent with
    // programs attached through netlink left behind.
    let signals = Signals::install()?;
    let Attached {
        kernel,
        poller,
        dns_events,
        dns_queue,
        hello_events,
        hellos,
        owner_events,
        owners,
        watching,
        resumed,
    } = Attached::attach(&args, &ifaces, outputs.pins.take())?;
    // Before capabilities drop: reading the conntrack table needs CAP_NET_ADMIN.
    let nat = Nat::follow();
    // No thread exists yet: the ones started below inherit the reduced capabilities.
    privileges::drop_after_attach().context("dropping capabilities after attaching")?;
    let parts = Parts {
        outputs,
        poller,
        dns_queue,
        hellos,
        owner_events: owners,
        watching,
        resumed,
        metrics,
        top,
        nat,
    };
    let pipeline = Pipeline::new(&args, &collectors, lists, parts)?;
    // Tests and scripts wait for this line: the programs are counting from here on.
    eprintln!("monitor: watching {}", pipeline.watching);

    let pipeline = poll_until_stopped(
        pipeline,
        args.poll_interval,
        [
            (dns_events, "DNS events"),
            (hello_events, "TLS and QUIC hellos"),
            (owner_events, "socket owners"),
        ],
        signals,
    )
    .await?;
    drop(kernel);
    if let Some(pins) = &args.pin_path {
        return pipeline.suspend(pins);
    }
    // Detached (dropped) first: the last read then holds every packet that was counted.
    info!("detached from {}", ifaces.join(", "));
    pipeline.shutdown()
}
