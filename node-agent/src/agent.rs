//! The agent process: watches its inputs, keeps the model, runs the sync loop, switches modes and
//! reports to its ProxyNode.
//!
//! One task owns everything mutable (tracker, backends, scheduler) and reacts to one thing at a
//! time: a watch event, the sync timer, or the shutdown signal. Syncs therefore never overlap and
//! need no locks; events arriving during a sync wait in the watch streams.
//!
//! Safety rules kept here (each from DESIGN.md's invariants):
//! - nothing is synced before the first complete list of Services and EndpointSlices, so that a
//!   start-up never replaces working rules with a partial view;
//! - start-up does not flush: the first (full) sync replaces our rules in one transaction, and the
//!   other modes' objects are removed only after that sync succeeded;
//! - a mode switch applies the new mode fully first, then removes the old mode's objects, then reads
//!   the kernel back and reports; a mode the node cannot run is refused and the old one keeps working;
//! - the kernel read-back (the rule count in the status) runs beside the loop, after full syncs and
//!   every `syncPeriod`: listing a large ruleset takes seconds, and changes must not wait for it;
//! - SIGTERM ends the process without touching the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use fleetproxy_api::{ProxyMode, ProxyNode, ProxyNodeStatus, ProxySettings};
use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    backend::Backend,
    cli::Args,
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats},
    error::AgentError,
    exec::Runner,
    health::Health,
    metrics::{Metrics, mode_label},
    node::NodeInfo,
    policy::PlanCache,
    proxynode::{self, Readiness, Report, reasons},
    serve::{self, Endpoints, ModeCell, ServeState},
    settings::{self, AgentSettings},
    sync::{Scheduler, SyncKind},
    tracker::{ChangeTracker, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ServiceRef, SliceId, TrackerConfig},
};

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: Args) -> Result<(), AgentError> {
    let flag_settings = args.settings();
    // Bad flags leave nothing to fall back to: refuse them at start, as kube-proxy does.
    flag_settings.validate()?;
    let client = client(&args).await?;
    let started = Timestamp::now();
    let sync_period = flag_settings.sync_period.as_duration();

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(sync_period.saturating_mul(2), started));
    let mode = Arc::new(ModeCell::new(args.mode));
    let state = ServeState { metrics: metrics.clone(), health: health.clone(), mode: mode.clone() };
    let metrics_address = serve::spawn(args.metrics_bind_address, Endpoints::Metrics, state.clone()).await?;
    let healthz_address = serve::spawn(args.healthz_bind_address, Endpoints::Health, state).await?;
    let shutdown = shutdown_signal()?;

    let runner = args.netns.clone().map_or_else(Runner::host, Runner::in_netns);
    let capabilities = probe_all(&runner).await;
    info!(
        node = %args.node_name,
        mode = %args.mode,
        proxynode = args.proxynode,
        %metrics_address,
        %healthz_address,
        capabilities = ?capabilities,
        "fleetproxy agent starting"
    );

    let inputs = Inputs::watch(&client, &args);
    let (read_back_done, read_backs) = mpsc::unbounded_channel();
    let agent = Agent {
        node_name: args.node_name.clone(),
        runner,
        flag_settings,
        proxynode_enabled: args.proxynode,
        tracker: ChangeTracker::new(TrackerConfig {
            node_name: args.node_name.clone(),
            service_proxy_name: args.service_proxy_name.clone(),
            started: Some(started),
        }),
        scheduler: Scheduler::new(args.min_sync_period.as_duration(), sync_period),
        metrics,
        health,
        mode,
        proxynode_api: Api::all(client),
        services_listed: false,
        slices_listed: false,
        proxynode_listed: false,
        proxynode_unavailable: false,
        listed_services: None,
        listed_slices: None,
        proxynode_buffer: None,
        node: NodeInfo { eligible: true, ..NodeInfo::default() },
        proxynode: None,
        last_inputs: None,
        plans: PlanCache::default(),
        active: None,
        stale_modes: ProxyMode::ALL.into_iter().collect(),
        capabilities,
        rejected: None,
        applied_generation: None,
        rule_count: None,
        read_back: ReadBack { done: read_back_done, running: false, wanted: false, last: None },
        last_sync: None,
        full_sync_duration: None,
        readiness: None,
        written: None,
        trigger_times: BTreeMap::new(),
        counted_events: (0, 0),
    };
    agent.run(inputs, read_backs, shutdown).await
}

/// A kernel read-back's result: the mode it counted, and the count.
type Counted = (ProxyMode, Result<u64, DataPlaneError>);

/// The read-back that runs beside the sync loop.
struct ReadBack {
    done: mpsc::UnboundedSender<Counted>,
    running: bool,
    /// Another read-back is due as soon as the running one ends (a full sync happened meanwhile).
    wanted: bool,
    last: Option<Instant>,
}

async fn client(args: &Args) -> Result<Client, AgentError> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Client::try_from(config).map_err(AgentError::Client)
}

fn shutdown_signal() -> Result<impl Future<Output = &'static str>, AgentError> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Signal("SIGTERM", e))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| AgentError::Signal("SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

/// Which modes this node can run: the ProxyNode's `capabilities.modes`.
async fn probe_all(runner: &Runner) -> Vec<ProxyMode> {
    let mut modes = Vec::new();
    for mode in ProxyMode::ALL {
        match Backend::new(mode, runner.clone()).probe().await {
            Ok(()) => modes.push(mode),
            Err(err) => info!(%mode, %err, "mode not available on this node"),
        }
    }
    modes
}

/// The watch streams the agent reacts to.
struct Inputs {
    services: BoxStream<'static, Result<watcher::Event<Service>, watcher::Error>>,
    slices: BoxStream<'static, Result<watcher::Event<EndpointSlice>, watcher::Error>>,
    node: BoxStream<'static, Result<watcher::Event<Node>, watcher::Error>>,
    proxynode: BoxStream<'static, Result<watcher::Event<ProxyNode>, watcher::Error>>,
}

impl Inputs {
    fn watch(client: &Client, args: &Args) -> Self {
        // The API server filters what the tracker would skip anyway, as kube-proxy's informers do.
        // With a proxy name of our own, "not labelled or labelled ours" has no selector: filter here.
        let (service_labels, slice_labels) = match args.service_proxy_name {
            None => (
                format!("!{LABEL_SERVICE_PROXY_NAME}"),
                format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
            ),
            Some(_) => (String::new(), format!("!{LABEL_HEADLESS}")),
        };
        let by_name = format!("metadata.name={}", args.node_name);
        let config = |labels: &str| {
            let config = watcher::Config::default().page_size(WATCH_PAGE_SIZE);
            if labels.is_empty() { config } else { config.labels(labels) }
        };
        Self {
            services: in_own_task(
                watcher(Api::<Service>::all(client.clone()), config(&service_labels)).default_backoff(),
            ),
            slices: in_own_task(
                watcher(Api::<EndpointSlice>::all(client.clone()), config(&slice_labels)).default_backoff(),
            ),
            node: watcher(Api::<Node>::all(client.clone()), watcher::Config::default().fields(&by_name))
                .default_backoff()
                .boxed(),
            proxynode: if args.proxynode {
                watcher(Api::<ProxyNode>::all(client.clone()), watcher::Config::default().fields(&by_name))
                    .default_backoff()
                    .boxed()
            } else {
                futures::stream::pending().boxed()
            },
        }
    }
}

/// Events a watch may buffer ahead of the agent's loop. Small: a decoded object costs kilobytes
/// (at 10,000 × 10, 4,000 buffered and 2,000-object pages took the agent from 69 to 122 MiB; this
/// and 1,000-object pages, to 96). The next page is fetched once the loop is this close to the end
/// of the one before.
const WATCH_BUFFER: usize = 256;

/// Objects per page of a list. kube-runtime's default (500) makes 20 round trips per kind at
/// 10,000 Services, each waiting for the one before.
const WATCH_PAGE_SIZE: u32 = 1000;

/// Polls `stream` in a task of its own: the Service and EndpointSlice lists are then fetched and
/// decoded in parallel with each other and with the agent's loop, instead of one page at a time
/// on the loop's task (at 10,000 Services, the cold start's listing took 1.9 s that way).
fn in_own_task<T: Send + 'static>(stream: impl Stream<Item = T> + Send + 'static) -> BoxStream<'static, T> {
    let (sender, receiver) = futures::channel::mpsc::channel(WATCH_BUFFER);
    // Ends when the agent drops the receiver.
    tokio::spawn(stream.map(Ok).forward(sender));
    receiver.boxed()
}

/// The data plane whose rules are in the kernel, and the settings it was last synced with.
struct Active {
    backend: Backend,
    settings: AgentSettings,
}

/// Why a sync attempt did not put the wanted state into the kernel.
enum Failure {
    /// The wanted mode cannot run here; nothing was changed for it.
    Unsupported(String),
    Sync(DataPlaneError),
}

struct Agent {
    node_name: String,
    runner: Runner,
    flag_settings: ProxySettings,
    proxynode_enabled: bool,
    tracker: ChangeTracker,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mode: Arc<ModeCell>,
    proxynode_api: Api<ProxyNode>,

    // Inputs.
    services_listed: bool,
    slices_listed: bool,
    proxynode_listed: bool,
    /// The ProxyNode watch failed (no CRD, no permission): run on the flags until it works.
    proxynode_unavailable: bool,
    /// Keys of the Services and EndpointSlices of a (re)list in progress.
    listed_services: Option<BTreeSet<ServiceRef>>,
    listed_slices: Option<BTreeSet<SliceId>>,
    proxynode_buffer: Option<Option<ProxyNode>>,
    node: NodeInfo,
    proxynode: Option<ProxyNode>,
    /// The resolved settings and ProxyNode generation last seen, to notice changes.
    last_inputs: Option<(Result<AgentSettings, String>, Option<i64>)>,

    // The data plane.
    /// The plans of the last sync, replanned per changed service port.
    plans: PlanCache,
    active: Option<Active>,
    /// Modes whose objects may still be in the kernel from an earlier run; removed after the first
    /// successful sync of the active mode.
    stale_modes: BTreeSet<ProxyMode>,
    capabilities: Vec<ProxyMode>,
    /// A mode whose probe failed for the current settings, with why: not retried until they change.
    rejected: Option<(ProxyMode, String)>,

    // Reporting.
    applied_generation: Option<i64>,
    rule_count: Option<u64>,
    read_back: ReadBack,
    last_sync: Option<Timestamp>,
    full_sync_duration: Option<Duration>,
    readiness: Option<Readiness>,
    /// The status last written (or observed, after a restart), to write only news.
    written: Option<ProxyNodeStatus>,
    /// Trigger times of changes not yet in the kernel.
    trigger_times: BTreeMap<ServiceRef, Timestamp>,
    /// Service and endpoint events of the current tracker batch already counted in the metrics.
    counted_events: (u64, u64),
}

impl Agent {
    async fn run(
        mut self,
        mut inputs: Inputs,
        mut read_backs: mpsc::UnboundedReceiver<Counted>,
        shutdown: impl Future<Output = &'static str>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        self.health.queued(Timestamp::now());
        loop {
            let ready = self.inputs_ready();
            let next_sync = tokio::time::Instant::from_std(self.scheduler.next_sync());
            // Biased: every event already waiting is taken before a sync starts, so that a burst
            // of changes goes into one sync (unbiased, half the syncs would carry a single event
            // while the rest queue behind them).
            tokio::select! {
                biased;
                signal = &mut shutdown => {
                    // Leave the rules in place: they keep Services working until the next agent
                    // replaces them, as kube-proxy does.
                    info!(signal, "shutting down, leaving the kernel rules in place");
                    return Ok(());
                }
                event = inputs.services.next() => {
                    match event.ok_or(AgentError::WatchEnded("Service"))? {
                        Ok(event) => self.on_service(event),
                        Err(err) => warn!(%err, "Service watch failed; retrying"),
                    }
                }
                event = inputs.slices.next() => {
                    match event.ok_or(AgentError::WatchEnded("EndpointSlice"))? {
                        Ok(event) => self.on_slice(event),
                        Err(err) => warn!(%err, "EndpointSlice watch failed; retrying"),
                    }
                }
                event = inputs.node.next() => {
                    match event.ok_or(AgentError::WatchEnded("Node"))? {
                        Ok(event) => self.on_node(event),
                        Err(err) => warn!(%err, "Node watch failed; retrying"),
                    }
                }
                event = inputs.proxynode.next() => {
                    match event.ok_or(AgentError::WatchEnded("ProxyNode"))? {
                        Ok(event) => self.on_proxynode(event),
                        Err(err) => {
                            if !self.proxynode_unavailable && !self.proxynode_listed {
                                warn!(%err, "ProxyNode watch failed; running on the flags until it works");
                            } else {
                                debug!(%err, "ProxyNode watch failed; retrying");
                            }
                            self.proxynode_unavailable = true;
                        }
                    }
                }
                Some((mode, counted)) = read_backs.recv() => self.read_back_done(mode, counted).await,
                () = tokio::time::sleep_until(next_sync), if ready => self.sync().await,
            }
        }
    }

    /// No sync before complete lists of Services and EndpointSlices, and before we know whether a
    /// ProxyNode governs this node (unless its watch cannot work).
    fn inputs_ready(&self) -> bool {
        self.services_listed
            && self.slices_listed
            && (!self.proxynode_enabled || self.proxynode_listed || self.proxynode_unavailable)
    }

    fn on_service(&mut self, event: watcher::Event<Service>) {
        match event {
            watcher::Event::Init => self.listed_services = Some(BTreeSet::new()),
            watcher::Event::InitApply(service) => {
                self.tracker.list_service(&service, self.listed_services.get_or_insert_default());
            }
            watcher::Event::InitDone => {
                let listed = self.listed_services.take().unwrap_or_default();
                self.tracker.end_service_list(&listed);
                if !self.services_listed {
                    info!(services = listed.len(), "listed Services");
                }
                self.services_listed = true;
            }
            watcher::Event::Apply(service) => self.tracker.apply_service(&service),
            watcher::Event::Delete(service) => self.tracker.delete_service(&service),
        }
        self.after_model_event();
    }

    fn on_slice(&mut self, event: watcher::Event<EndpointSlice>) {
        match event {
            watcher::Event::Init => self.listed_slices = Some(BTreeSet::new()),
            watcher::Event::InitApply(slice) => {
                self.tracker.list_slice(&slice, self.listed_slices.get_or_insert_default());
            }
            watcher::Event::InitDone => {
                let listed = self.listed_slices.take().unwrap_or_default();
                self.tracker.end_slice_list(&listed);
                if !self.slices_listed {
                    info!(slices = listed.len(), "listed EndpointSlices");
                }
                self.slices_listed = true;
            }
            watcher::Event::Apply(slice) => self.tracker.apply_slice(&slice),
            watcher::Event::Delete(slice) => self.tracker.delete_slice(&slice),
        }
        self.after_model_event();
    }

    /// Counts what the last event changed and queues a sync for it.
    fn after_model_event(&mut self) {
        let pending = self.tracker.pending();
        let (services, endpoints) = (pending.service_events, pending.endpoint_events);
        let (counted_services, counted_endpoints) = self.counted_events;
        self.metrics.service_changes.inc_by(services.saturating_sub(counted_services));
        self.metrics.endpoint_changes.inc_by(endpoints.saturating_sub(counted_endpoints));
        self.counted_events = (services, endpoints);
        if !self.tracker.has_changes() {
            return;
        }
        if pending.topology_changed {
            self.scheduler.queue_full()
        } else {
            self.scheduler.queue()
        }
        let now = Timestamp::now();
        self.health.queued(now);
        self.metrics.last_queued_timestamp.set(seconds(now));
    }

    fn on_node(&mut self, event: watcher::Event<Node>) {
        let node = match event {
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => node,
            // A deleted Node keeps its last zone and addresses: the rules stay as they are.
            watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitDone => return,
        };
        let info = NodeInfo::from_node(&node);
        self.health.set_node_eligible(info.eligible);
        self.tracker.set_node_zone(info.zone.clone());
        self.node = info;
        self.after_model_event();
        self.after_settings_input();
    }

    fn on_proxynode(&mut self, event: watcher::Event<ProxyNode>) {
        match event {
            watcher::Event::Init => self.proxynode_buffer = Some(None),
            watcher::Event::InitApply(proxynode) => self.proxynode_buffer = Some(Some(proxynode)),
            watcher::Event::InitDone => {
                let listed = self.proxynode_buffer.take().flatten();
                if !self.proxynode_listed {
                    info!(found = listed.is_some(), "listed this node's ProxyNode");
                }
                self.proxynode_listed = true;
                self.proxynode_unavailable = false;
                self.set_proxynode(listed);
            }
            watcher::Event::Apply(proxynode) => self.set_proxynode(Some(proxynode)),
            watcher::Event::Delete(_) => self.set_proxynode(None),
        }
    }

    fn set_proxynode(&mut self, proxynode: Option<ProxyNode>) {
        let uid = |p: &Option<ProxyNode>| p.as_ref().and_then(|p| p.meta().uid.clone());
        if uid(&proxynode) != uid(&self.proxynode) {
            // A new object: what we wrote to the old one says nothing about it.
            self.written = proxynode.as_ref().and_then(|p| p.status.clone());
            self.applied_generation = None;
        }
        self.proxynode = proxynode;
        self.after_settings_input();
    }

    /// The settings that govern this node: its ProxyNode's spec, or the flags without one.
    fn governing(&self) -> &ProxySettings {
        self.proxynode.as_ref().map_or(&self.flag_settings, |p| &p.spec.settings)
    }

    fn desired(&self) -> Result<AgentSettings, String> {
        settings::resolve(self.governing(), &self.node.primary_ips).map_err(|err| err.to_string())
    }

    /// Queues a full sync when the settings (or the spec's generation) changed.
    fn after_settings_input(&mut self) {
        let inputs = (self.desired(), self.proxynode.as_ref().and_then(|p| p.meta().generation));
        if self.last_inputs.as_ref() == Some(&inputs) {
            return;
        }
        match &inputs.0 {
            Ok(desired) => {
                info!(mode = %desired.mode, generation = ?inputs.1, "settings changed");
                self.scheduler.set_periods(desired.min_sync_period, desired.sync_period);
                self.health.set_timeout(desired.sync_period.saturating_mul(2));
            }
            Err(err) => warn!(%err, generation = ?inputs.1, "invalid settings; keeping the current ones"),
        }
        self.last_inputs = Some(inputs);
        // New settings get a new chance, including a mode refused before.
        self.rejected = None;
        self.scheduler.queue_full();
        self.health.queued(Timestamp::now());
    }

    /// One sync attempt: switch modes if asked to, else sync the active mode; then report.
    async fn sync(&mut self) {
        let started = Instant::now();
        let kind = self.scheduler.start(started);
        let (target, settings_problem) = match self.desired() {
            Ok(desired) => (Some(desired), None),
            Err(problem) => {
                // Invalid settings change nothing: keep applying what is active (or, at start-up,
                // the flags, if they resolve).
                let fallback = self
                    .active
                    .as_ref()
                    .map(|a| a.settings.clone())
                    .or_else(|| settings::resolve(&self.flag_settings, &self.node.primary_ips).ok());
                (fallback, Some(problem))
            }
        };
        let changes = self.tracker.take_changes();
        self.counted_events = (0, 0);
        for (service, time) in changes.trigger_times {
            let earliest = self.trigger_times.entry(service).or_insert(time);
            *earliest = (*earliest).min(time);
        }
        let kind = if changes.topology_changed { SyncKind::Full } else { kind };
        let backend_changes = match kind {
            SyncKind::Full => {
                // Not kept through the sync: after the first list it names every service port.
                drop(changes.services);
                Changes::Full
            }
            SyncKind::Partial => Changes::Services(changes.services),
        };

        let Some(target) = target else {
            let problem = settings_problem.unwrap_or_default();
            self.fail(Readiness::not_ready(reasons::INVALID_SETTINGS, problem)).await;
            return;
        };

        // Why the node is not Ready even if the kernel sync below works: a refused or failed switch.
        let mut switch_problem: Option<Readiness> = None;
        let wants_switch = self.active.as_ref().is_none_or(|a| a.backend.mode() != target.mode);
        let result = if wants_switch {
            let refused = self.rejected.clone().filter(|(mode, _)| *mode == target.mode).map(|(_, why)| why);
            let attempt = match refused {
                Some(why) => Err(Failure::Unsupported(why)),
                None => self.switch(target.clone()).await.map(|_| ()),
            };
            match attempt {
                Ok(()) => Ok(()),
                Err(Failure::Unsupported(why)) => {
                    if self.rejected.is_none() {
                        warn!(mode = %target.mode, %why, "refusing a mode this node cannot run");
                    }
                    self.rejected = Some((target.mode, why.clone()));
                    switch_problem = Some(Readiness::not_ready(reasons::MODE_UNSUPPORTED, why));
                    self.keep_working(&target, backend_changes).await
                }
                // A failed first sync has no working mode to keep: retry it as it is.
                Err(Failure::Sync(err)) if self.active.is_none() => Err(Failure::Sync(err)),
                Err(Failure::Sync(err)) => {
                    let message = format!("cannot switch to {} mode: {err}", target.mode);
                    warn!(error = %message, "switch failed; the current mode keeps working");
                    self.metrics.sync_failures.get_or_create(&mode_label(target.mode)).inc();
                    switch_problem = Some(Readiness::not_ready(reasons::SYNC_FAILED, message));
                    self.keep_working(&target, Changes::Full).await
                }
            }
        } else {
            self.sync_active(&target, &backend_changes).await.map(|_| ())
        };

        match result {
            Err(failure) => {
                let mode = self.active.as_ref().map_or(target.mode, |a| a.backend.mode());
                let readiness = match failure {
                    Failure::Unsupported(why) => Readiness::not_ready(reasons::MODE_UNSUPPORTED, why),
                    Failure::Sync(err) => {
                        self.metrics.sync_failures.get_or_create(&mode_label(mode)).inc();
                        error!(%mode, error = %err, "sync failed; the next one is full");
                        Readiness::not_ready(reasons::SYNC_FAILED, err.to_string())
                    }
                };
                self.fail(readiness).await;
            }
            Ok(()) => {
                let readiness = self.succeeded(started, kind).await;
                if switch_problem.as_ref().is_some_and(|r| r.reason == reasons::SYNC_FAILED) {
                    // The wanted mode failed to apply: retry it with backoff.
                    self.scheduler.failed(Instant::now());
                }
                let readiness = match (switch_problem, settings_problem) {
                    _ if !readiness.ready => readiness,
                    (Some(problem), _) => problem,
                    (None, Some(problem)) => Readiness::not_ready(reasons::INVALID_SETTINGS, problem),
                    (None, None) => {
                        // The governing spec is what the kernel holds now.
                        self.applied_generation = self.proxynode.as_ref().map(|p| p.spec.config_generation);
                        readiness
                    }
                };
                self.readiness = Some(readiness);
                self.report().await;
            }
        }
    }

    /// The wanted mode is refused: keep the active mode (with its own settings) working. With no
    /// active mode yet (a start-up), fall back to the mode this node last reported, or the flags'.
    async fn keep_working(&mut self, target: &AgentSettings, changes: Changes) -> Result<(), Failure> {
        if let Some(active) = &self.active {
            let settings = active.settings.clone();
            return self.sync_active(&settings, &changes).await.map(|_| ());
        }
        let reported = self.proxynode.as_ref().and_then(|p| p.status.as_ref()).and_then(|s| s.active_mode);
        let fallback = reported.unwrap_or(self.flag_settings.mode);
        if fallback == target.mode {
            return Err(Failure::Unsupported(format!(
                "{} mode is not available and there is no other",
                target.mode
            )));
        }
        info!(mode = %fallback, refused = %target.mode, "starting in the last working mode");
        self.switch(AgentSettings { mode: fallback, ..target.clone() }).await.map(|_| ())
    }

    /// Brings up `target.mode` (fully), then removes the previous mode's objects.
    async fn switch(&mut self, target: AgentSettings) -> Result<SyncStats, Failure> {
        let mut next = Backend::new(target.mode, self.runner.clone());
        next.set_ipvs_scheduler(target.ipvs_scheduler);
        next.probe().await.map_err(|err| Failure::Unsupported(err.to_string()))?;
        let planning = Instant::now();
        let plans = self.plans.update(self.tracker.model(), &target.node, None);
        let planned = planning.elapsed();
        let stats = match next.sync(plans, &target.node, &Changes::Full).await {
            Ok(stats) => stats,
            Err(err) => {
                if self.active.is_some() {
                    // Do not leave half a new mode next to the working one.
                    if let Err(cleanup) = next.cleanup().await {
                        warn!(mode = %target.mode, error = %cleanup, "cannot remove a failed mode's objects");
                    }
                }
                return Err(Failure::Sync(err));
            }
        };
        let mode = target.mode;
        let previous = self.active.replace(Active { backend: next, settings: target });
        // The count read for the previous mode says nothing about this one.
        self.rule_count = None;
        self.mode.set(mode);
        self.metrics.set_active_mode(mode);
        self.stale_modes.remove(&mode);
        if let Some(mut previous) = previous {
            let old = previous.backend.mode();
            match previous.backend.cleanup().await {
                Ok(()) => {
                    info!(from = %old, to = %mode, "switched modes; the previous mode's objects are removed")
                }
                Err(err) => {
                    warn!(mode = %old, error = %err, "cannot remove the previous mode's objects yet; retrying after each sync");
                    self.stale_modes.insert(old);
                }
            }
            let labels = vec![("from".to_owned(), old.to_string()), ("to".to_owned(), mode.to_string())];
            self.metrics.mode_switches.get_or_create(&labels).inc();
        } else {
            info!(
                %mode,
                plan_ms = planned.as_millis(),
                render_ms = stats.render.as_millis(),
                apply_ms = stats.apply.as_millis(),
                "first sync applied"
            );
        }
        Ok(stats)
    }

    async fn sync_active(
        &mut self,
        settings: &AgentSettings,
        changes: &Changes,
    ) -> Result<SyncStats, Failure> {
        let Some(active) = self.active.as_mut() else {
            return Err(Failure::Unsupported("no mode is active".into()));
        };
        if active.settings.ipvs_scheduler != settings.ipvs_scheduler {
            // In place: recreating the backend would clean up and drop every virtual server.
            active.backend.set_ipvs_scheduler(settings.ipvs_scheduler);
            if let Err(err) = active.backend.probe().await {
                active.backend.set_ipvs_scheduler(active.settings.ipvs_scheduler);
                return Err(Failure::Unsupported(err.to_string()));
            }
        }
        let planning = Instant::now();
        let changed = match changes {
            Changes::Full => None,
            Changes::Services(changed) => Some(changed),
        };
        let plans = self.plans.update(self.tracker.model(), &settings.node, changed);
        let plan_ms = planning.elapsed().as_millis() as u64;
        let stats = active.backend.sync(plans, &settings.node, changes).await.map_err(Failure::Sync)?;
        active.settings = settings.clone();
        debug!(
            mode = %active.backend.mode(),
            full = stats.full,
            plans = plans.len(),
            plan_ms,
            render_ms = stats.render.as_millis() as u64,
            apply_ms = stats.apply.as_millis() as u64,
            payload = stats.payload_size,
            "synced"
        );
        Ok(stats)
    }

    /// Bookkeeping after a sync that reached the kernel; returns the readiness it shows.
    async fn succeeded(&mut self, started: Instant, kind: SyncKind) -> Readiness {
        let now = Timestamp::now();
        let elapsed = started.elapsed();
        self.scheduler.succeeded(Instant::now(), kind);
        self.health.updated(now);
        self.last_sync = Some(now);
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        match kind {
            SyncKind::Full => {
                self.metrics.full_sync_duration.observe(elapsed.as_secs_f64());
                self.full_sync_duration = Some(elapsed);
            }
            SyncKind::Partial => self.metrics.partial_sync_duration.observe(elapsed.as_secs_f64()),
        }
        self.metrics.last_sync_timestamp.set(seconds(now));
        for (_, time) in std::mem::take(&mut self.trigger_times) {
            let latency = now.duration_since(time).as_secs_f64();
            if latency >= 0.0 {
                self.metrics.network_programming_duration.observe(latency);
            }
        }
        self.clean_stale_modes().await;

        let Some(active) = &self.active else {
            return Readiness::not_ready(reasons::SYNC_FAILED, "no mode is active");
        };
        let mode = active.backend.mode();
        // The status reports what the kernel holds, not what we meant to write: read it back after
        // full syncs (so after every switch) and every syncPeriod.
        let period = active.settings.sync_period;
        if kind == SyncKind::Full || self.read_back.last.is_none_or(|at| at.elapsed() >= period) {
            self.start_read_back(mode);
        }
        if let Some(stale) = self.stale_modes.iter().next() {
            return Readiness::not_ready(
                reasons::CLEANUP_FAILED,
                format!("{mode} rules are in the kernel, but {stale} objects could not all be removed yet"),
            );
        }
        Readiness::ready(format!("{mode} rules are in the kernel"))
    }

    /// Counts what the kernel holds for `mode` in a task of its own, with a fresh backend (counting
    /// reads only the kernel); the result comes back through `read_back_done`.
    fn start_read_back(&mut self, mode: ProxyMode) {
        if self.read_back.running {
            self.read_back.wanted = true;
            return;
        }
        self.read_back.running = true;
        self.read_back.wanted = false;
        self.read_back.last = Some(Instant::now());
        let counter = Backend::new(mode, self.runner.clone());
        let done = self.read_back.done.clone();
        tokio::spawn(async move {
            // The receiver lives as long as the loop; after it, nobody needs the count.
            let _ = done.send((mode, counter.rule_count().await));
        });
    }

    async fn read_back_done(&mut self, mode: ProxyMode, counted: Result<u64, DataPlaneError>) {
        self.read_back.running = false;
        let active = self.active.as_ref().map(|a| a.backend.mode());
        if active == Some(mode) {
            match counted {
                Ok(count) => {
                    if count == 0 && self.rule_count.is_some_and(|before| before > 0) {
                        // Someone flushed our rules (a firewall reload): rewrite them all.
                        warn!(%mode, "our rules are gone from the kernel; the next sync is full");
                        self.scheduler.queue_full();
                    }
                    self.rule_count = Some(count);
                    self.metrics.set_kernel_rules(mode, count);
                }
                Err(err) => {
                    self.readiness =
                        Some(Readiness::not_ready(reasons::SYNC_FAILED, format!("rules applied but {err}")));
                }
            }
            self.report().await;
        }
        if self.read_back.wanted
            && let Some(mode) = active
        {
            self.start_read_back(mode);
        }
    }

    /// After a successful sync, removes what earlier runs or modes left behind.
    async fn clean_stale_modes(&mut self) {
        let active = self.active.as_ref().map(|a| a.backend.mode());
        let stale: Vec<ProxyMode> = self.stale_modes.iter().copied().filter(|m| Some(*m) != active).collect();
        for mode in stale {
            let mut backend = Backend::new(mode, self.runner.clone());
            if backend.probe().await.is_err() {
                // Without its tools nothing of this mode can be listed or removed (nor was it
                // likely created); do not retry forever.
                self.stale_modes.remove(&mode);
                continue;
            }
            match backend.cleanup().await {
                Ok(()) => {
                    debug!(%mode, "removed objects of an inactive mode");
                    self.stale_modes.remove(&mode);
                }
                Err(err) => warn!(%mode, error = %err, "cannot remove objects of an inactive mode"),
            }
        }
        if let Some(active) = active {
            self.stale_modes.remove(&active);
        }
    }

    async fn fail(&mut self, readiness: Readiness) {
        self.scheduler.failed(Instant::now());
        self.health.queued(Timestamp::now());
        self.readiness = Some(readiness);
        self.report().await;
    }

    /// Writes the ProxyNode status if there is one and the report is news.
    async fn report(&mut self) {
        let Some(proxynode) = &self.proxynode else { return };
        let Some(readiness) = self.readiness.clone() else { return };
        let report = Report {
            active_mode: self.active.as_ref().map(|a| a.backend.mode()),
            applied_generation: self.applied_generation,
            rule_count: self.rule_count,
            last_sync: self.last_sync,
            sync_duration: self.full_sync_duration,
            capabilities: self.capabilities.clone(),
            readiness,
            observed_generation: proxynode.meta().generation,
        };
        let now = Timestamp::now();
        let previous = self.written.as_ref();
        let status = proxynode::status(&report, previous, now);
        let refresh = self.scheduler_period();
        if !proxynode::worth_writing(&status, previous, refresh, now) {
            return;
        }
        self.metrics.count_api_write("proxynodes/status");
        match proxynode::write_status(&self.proxynode_api, &self.node_name, &status).await {
            Ok(()) => {
                debug!(ready = report.readiness.ready, reason = %report.readiness.reason, "wrote ProxyNode status");
                self.written = Some(status);
            }
            // Not fatal: the next sync tries again, since `written` is unchanged.
            Err(err) => warn!(%err, "cannot write the ProxyNode status"),
        }
    }

    fn scheduler_period(&self) -> Duration {
        self.active
            .as_ref()
            .map(|a| a.settings.sync_period)
            .unwrap_or_else(|| self.flag_settings.sync_period.as_duration())
    }
}

fn seconds(time: Timestamp) -> f64 {
    time.as_millisecond() as f64 / 1000.0
}
