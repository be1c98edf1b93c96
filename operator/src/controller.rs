//! The I/O shell around the pure modules: watches, reconciles one ProxyConfig at a time, writes.
//!
//! One reconciliation of a ProxyConfig:
//! 1. match every live config against every node ([`selection`]);
//! 2. apply the agent DaemonSet if it changed (when the operator manages it);
//! 3. plan the rollout ([`rollout`]) and write the newest settings to the ProxyNodes it picks,
//!    creating the ProxyNode of a new node (owned by its Node, so it goes when the Node goes);
//! 4. delete this config's ProxyNodes on nodes that no config selects any more;
//! 5. aggregate the status ([`status`]) and write it only if it changed;
//! 6. requeue, as a safety net for missed events and to refresh lastSync and ruleCount.
//!
//! Batching: reconciliation runs per ProxyConfig, never per node. Agents' status writes reach the
//! controller through a filter that drops changes the rollout cannot care about (lastSync and
//! syncDuration move on every periodic sync), and the controller's debounce coalesces the rest, so
//! a wave of N nodes reporting costs one reconciliation and at most one status write, not N.
//! All reads come from watch caches; the only reads from the API server are of the DaemonSet.

use std::{
    collections::{BTreeMap, HashMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use fleetproxy_api::{ProxyConfig, ProxyConfigStatus, ProxyNode, condition_types};
use futures::{Stream, StreamExt, future};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Node, ObjectReference},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, PartialObjectMeta, Patch, PatchParams, Preconditions},
    runtime::{
        Controller, WatchStreamExt,
        controller::{Action, Config as ControllerConfig},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tracing::{debug, info, warn};

use crate::{
    daemonset::{self, AGENT_NAME, AgentSettings, NAME_LABEL},
    metrics::Metrics,
    rollout::{self, NodeView, RolloutPlan, Verdict},
    selection,
    status::{self, reasons},
};

/// Server-side apply field manager of every object the operator writes.
pub const FIELD_MANAGER: &str = "fleetproxy-operator";
/// Marks the ProxyNodes the operator created: the only ones it ever deletes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// How often a wait for the watch caches re-checks them.
const CACHE_POLL: Duration = Duration::from_millis(200);
/// How often the operator looks for ProxyNodes that deleted configs left behind.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// How long to wait, after a rollout round, before looking again without any event.
const REQUEUE_PROGRESSING: Duration = Duration::from_secs(30);
/// How often to refresh a settled config's status (lastSync and ruleCount do not trigger).
const REQUEUE_SETTLED: Duration = Duration::from_secs(300);
const REQUEUE_AFTER_ERROR: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("a watch cache stopped before it was filled")]
    CacheNotReady,
}

/// How the controller runs, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The DaemonSet to keep in line with the flags, or None when something else runs the agents.
    pub agent: Option<AgentSettings>,
    /// How long the controller waits for a burst of events about one config to end.
    pub debounce: Duration,
    /// Names this replica in Events.
    pub instance: String,
}

/// What every reconciliation shares.
struct Context {
    client: Client,
    configs: Store<ProxyConfig>,
    nodes: Store<PartialObjectMeta<Node>>,
    proxy_nodes: Store<ProxyNode>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    agent: Option<AgentSettings>,
}

fn fingerprint(parts: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    parts.hash(&mut hasher);
    hasher.finish()
}

/// What about a ProxyNode can change the plan or the conditions. Not lastSync, syncDuration or the
/// exact rule count: those change on every periodic sync and are refreshed by the periodic requeue.
fn proxy_node_fingerprint(node: &ProxyNode) -> u64 {
    let status = node.status.as_ref();
    let ready = node.ready_condition().map(|c| (&c.status, &c.reason, c.observed_generation));
    fingerprint((
        node.metadata.generation,
        &node.spec.config_name,
        status.and_then(|s| s.applied_generation),
        status.and_then(|s| s.active_mode),
        status.is_some_and(|s| s.rule_count.is_some()),
        ready,
    ))
}

/// Turns a reflected watch into a stream of objects that changed in a way `fingerprint` sees, plus
/// every deletion.
fn meaningful_changes<K, S>(
    events: S,
    fingerprint: impl Fn(&K) -> u64 + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut seen: HashMap<(Option<String>, String), u64> = HashMap::new();
    events.filter_map(move |event| {
        let key = |obj: &K| (obj.meta().namespace.clone(), obj.name_any());
        let changed = match event {
            Err(error) => Some(Err(error)),
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                let print = fingerprint(&obj);
                (seen.insert(key(&obj), print) != Some(print)).then_some(Ok(obj))
            }
            Ok(watcher::Event::Delete(obj)) => {
                seen.remove(&key(&obj));
                Some(Ok(obj))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        };
        future::ready(changed)
    })
}

/// Every ProxyConfig in the cache, as reconcile requests.
fn all_configs(configs: &Store<ProxyConfig>) -> Vec<ObjectRef<ProxyConfig>> {
    configs.state().iter().map(|c| ObjectRef::from_obj(c.as_ref())).collect()
}

/// Runs the controller until a termination signal, then lets running reconciliations finish.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) {
    let config_api: Api<ProxyConfig> = Api::all(client.clone());
    let watch = watcher::Config::default();

    let (nodes, node_writer) = reflector::store();
    let node_changes = meaningful_changes(
        watcher(Api::<PartialObjectMeta<Node>>::all(client.clone()), watch.clone())
            .default_backoff()
            .reflect(node_writer),
        |node: &PartialObjectMeta<Node>| fingerprint(&node.metadata.labels),
    );
    let (proxy_nodes, proxy_node_writer) = reflector::store();
    let proxy_node_changes = meaningful_changes(
        watcher(Api::<ProxyNode>::all(client.clone()), watch.clone())
            .default_backoff()
            .modify(|pn| pn.managed_fields_mut().clear())
            .reflect(proxy_node_writer),
        proxy_node_fingerprint,
    );
    // A config's selector or deletion changes which nodes the others govern.
    let config_changes =
        meaningful_changes(watcher(config_api.clone(), watch.clone()).default_backoff(), |c| {
            fingerprint((c.metadata.generation, c.metadata.deletion_timestamp.is_some()))
        });

    let controller = Controller::new(config_api, watch.clone())
        .with_config(ControllerConfig::default().debounce(settings.debounce));
    let configs = controller.store();

    let node_mapper = {
        let (configs, proxy_nodes) = (configs.clone(), proxy_nodes.clone());
        move |node: PartialObjectMeta<Node>| {
            let labels = node.metadata.labels.clone().unwrap_or_default();
            let name = node.name_any();
            // The configs selecting it now, and the one it had before, which may have to let go.
            let previous = proxy_nodes.get(&ObjectRef::new(&name)).map(|pn| pn.spec.config_name.clone());
            configs
                .state()
                .iter()
                .filter(|c| {
                    selection::selects(&c.spec.node_selector, &labels)
                        || previous.as_deref() == Some(&c.name_any())
                })
                .map(|c| ObjectRef::from_obj(c.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let proxy_node_mapper = |pn: ProxyNode| Some(ObjectRef::<ProxyConfig>::new(&pn.spec.config_name));
    let config_mapper = {
        let configs = configs.clone();
        move |_: ProxyConfig| all_configs(&configs)
    };

    let mut controller = controller
        .watches_stream(node_changes, node_mapper)
        .watches_stream(proxy_node_changes, proxy_node_mapper)
        .watches_stream(config_changes, config_mapper);
    if let Some(agent) = &settings.agent {
        // A DaemonSet deleted or edited by hand is put back.
        let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &agent.namespace);
        let daemonset_changes = meaningful_changes(
            watcher(daemonsets, watcher::Config::default().labels(&format!("{NAME_LABEL}={AGENT_NAME}")))
                .default_backoff(),
            |ds: &DaemonSet| {
                let owners: Vec<&str> = ds.owner_references().iter().map(|o| o.uid.as_str()).collect();
                fingerprint((ds.metadata.generation, &ds.metadata.annotations, owners))
            },
        );
        let configs = configs.clone();
        controller = controller.watches_stream(daemonset_changes, move |_| all_configs(&configs));
    }

    let reporter =
        Reporter { controller: FIELD_MANAGER.to_owned(), instance: Some(settings.instance.clone()) };
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        configs,
        nodes,
        proxy_nodes,
        metrics,
        agent: settings.agent,
    });
    let sweeper = tokio::spawn(sweep_forever(context.clone()));
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((config, _)) => debug!(config = %config.name, "reconciled"),
                Err(error) => warn!(%error, "reconciliation failed"),
            }
        })
        .await;
    sweeper.abort();
}

fn error_policy(config: Arc<ProxyConfig>, error: &Error, _: Arc<Context>) -> Action {
    warn!(config = %config.name_any(), %error, "reconciling; will retry");
    Action::requeue(REQUEUE_AFTER_ERROR)
}

async fn reconcile(config: Arc<ProxyConfig>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    context.caches_ready().await?;
    // A config being deleted (someone else's finalizer holds it) governs nothing any more; what it
    // leaves behind is swept (see `sweep_orphans`).
    let result = if config.metadata.deletion_timestamp.is_some() {
        Ok(Action::await_change())
    } else {
        apply(&config, &context).await
    };
    context.metrics.reconciled(if result.is_ok() { "ok" } else { "error" }, started.elapsed());
    result
}

/// The owner reference of a ProxyNode: its Node, so the garbage collector removes it with the Node.
/// blockOwnerDeletion is false: deleting a Node must never wait for our object.
fn node_owner(node: &ObjectMeta) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Node".to_owned(),
        name: node.name.clone()?,
        uid: node.uid.clone()?,
        block_owner_deletion: Some(false),
        controller: Some(false),
    })
}

/// A non-controlling owner reference to a config, for the shared DaemonSet.
fn config_owner(config: &ProxyConfig) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: ProxyConfig::api_version(&()).into_owned(),
        kind: ProxyConfig::kind(&()).into_owned(),
        name: config.metadata.name.clone()?,
        uid: config.metadata.uid.clone()?,
        block_owner_deletion: Some(false),
        controller: Some(false),
    })
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

impl Context {
    async fn publish(&self, config: &ProxyConfig, event: Event) {
        match self.recorder.publish(&event, &config.object_ref(&())).await {
            Ok(()) => self.metrics.api_write("Event"),
            Err(error) => {
                warn!(config = %config.name_any(), reason = %event.reason, %error, "publishing an Event")
            }
        }
    }

    async fn ensure_daemonset(&self, agent: &AgentSettings) -> Result<(), Error> {
        let mut live_configs: Vec<Arc<ProxyConfig>> =
            self.configs.state().into_iter().filter(|c| selection::is_live(c)).collect();
        live_configs.sort_by_key(|c| c.name_any());
        let owners = live_configs.iter().filter_map(|c| config_owner(c)).collect();
        let desired = daemonset::agent_daemonset(agent, owners);
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &agent.namespace);
        let live = api.get_opt(AGENT_NAME).await?;
        if live.as_ref().is_some_and(|live| daemonset::is_current(live, &desired)) {
            return Ok(());
        }
        api.patch(AGENT_NAME, &apply_params(), &Patch::Apply(&desired)).await?;
        self.metrics.api_write("DaemonSet");
        info!(namespace = %agent.namespace, image = %agent.image, "applied the agent DaemonSet");
        Ok(())
    }

    /// Writes the config's newest settings into the node's ProxyNode, creating it if need be.
    async fn assign(&self, config: &ProxyConfig, node: &ObjectMeta) -> Result<Option<ProxyNode>, Error> {
        let (Some(name), Some(owner)) = (node.name.as_deref(), node_owner(node)) else { return Ok(None) };
        let mut proxy_node = ProxyNode::new(name, rollout::desired_spec(config));
        proxy_node.metadata.owner_references = Some(vec![owner]);
        proxy_node.metadata.labels = Some([(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned())].into());
        let api: Api<ProxyNode> = Api::all(self.client.clone());
        let written = api.patch(name, &apply_params(), &Patch::Apply(&proxy_node)).await?;
        self.metrics.api_write("ProxyNode");
        Ok(Some(written))
    }

    /// Waits until every watch cache holds its first complete list. A store's readiness wakes only
    /// the task that polled it last (kube-runtime's DelayedInit keeps one waker), and the sweeper and
    /// the reconciler wait at the same time: so wait in short rounds, each of which re-checks.
    async fn caches_ready(&self) -> Result<(), Error> {
        async fn ready<K>(store: &Store<K>) -> Result<(), Error>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            loop {
                if let Ok(ready) = tokio::time::timeout(CACHE_POLL, store.wait_until_ready()).await {
                    return ready.map_err(|_| Error::CacheNotReady);
                }
            }
        }
        ready(&self.configs).await?;
        ready(&self.nodes).await?;
        ready(&self.proxy_nodes).await
    }

    /// Deletes a ProxyNode unless it changed since it was read.
    async fn delete_proxy_node(&self, proxy_node: &ProxyNode) -> Result<(), Error> {
        let api: Api<ProxyNode> = Api::all(self.client.clone());
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: proxy_node.resource_version(),
                uid: proxy_node.uid(),
            }),
            ..Default::default()
        };
        match api.delete(&proxy_node.name_any(), &params).await {
            Ok(_) => {
                self.metrics.api_write("ProxyNode");
                Ok(())
            }
            // Gone already, or changed under us: the next round looks again.
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

fn now() -> Time {
    // Whole seconds, as the API server stores them, so a written status compares equal when read back.
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

async fn apply(config: &ProxyConfig, context: &Context) -> Result<Action, Error> {
    let name = config.name_any();
    let configs = context.configs.state();
    let nodes = context.nodes.state();
    let selection = selection::select(configs.iter().map(AsRef::as_ref), nodes.iter().map(|n| &n.metadata));
    if let Some(agent) = &context.agent {
        context.ensure_daemonset(agent).await?;
    }

    let node_meta: HashMap<&str, &ObjectMeta> =
        nodes.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, &n.metadata))).collect();
    let mut current: BTreeMap<&str, Option<Arc<ProxyNode>>> = selection
        .nodes_of(&name)
        .map(|node| (node, context.proxy_nodes.get(&ObjectRef::new(node))))
        .collect();

    let plan = rollout::plan(config, &views(&current));
    for node in plan.assignments() {
        let Some(meta) = node_meta.get(node) else { continue };
        if let Some(written) = context.assign(config, meta).await? {
            current.insert(node, Some(Arc::new(written)));
        }
    }
    announce_assignments(config, context, &plan).await;
    sweep_orphans(context).await?;

    // The status describes the fleet after this round's writes.
    let views = views(&current);
    let after = rollout::plan(config, &views);
    let status = status::aggregate(config, &views, &after, &selection.conflicts_of(&name), now());
    announce_transitions(config, context, &status).await;
    if status::needs_write(config, &status) {
        write_status(config, context, &status).await?;
    }
    info!(
        config = %name,
        nodes = status.summary.nodes,
        updated = status.summary.updated,
        ready = status.summary.ready,
        failed = status.summary.failed,
        assigned = plan.initial.len() + plan.updates.len(),
        verdict = ?after.verdict,
        "reconciled"
    );
    Ok(match after.verdict {
        Verdict::Complete => Action::requeue(REQUEUE_SETTLED),
        _ => Action::requeue(REQUEUE_PROGRESSING),
    })
}

fn views<'a>(current: &'a BTreeMap<&'a str, Option<Arc<ProxyNode>>>) -> Vec<NodeView<'a>> {
    current.iter().map(|(name, pn)| NodeView { name, proxy_node: pn.as_deref() }).collect()
}

async fn announce_assignments(config: &ProxyConfig, context: &Context, plan: &RolloutPlan) {
    let settings = &config.spec.settings;
    let generation = config.metadata.generation.unwrap_or_default();
    if !plan.initial.is_empty() {
        info!(config = %config.name_any(), nodes = ?plan.initial, mode = %settings.mode, "new nodes get the newest settings");
        let event = Event {
            type_: EventType::Normal,
            reason: "NodesAdded".into(),
            note: Some(format!(
                "{} new node(s) get mode {} (generation {generation}): {}",
                plan.initial.len(),
                settings.mode,
                plan.initial.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
            )),
            action: "AssignSettings".into(),
            secondary: None,
        };
        context.publish(config, event).await;
    }
    for node in &plan.updates {
        info!(config = %config.name_any(), %node, mode = %settings.mode, generation, "node gets the newest settings");
        let event = Event {
            type_: EventType::Normal,
            reason: "NodeAssigned".into(),
            note: Some(format!("node {node} gets mode {} (generation {generation})", settings.mode)),
            action: "AssignSettings".into(),
            secondary: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                ..Default::default()
            }),
        };
        context.publish(config, event).await;
    }
}

/// Events for the rollout's milestones, on the change of the condition that shows them.
async fn announce_transitions(config: &ProxyConfig, context: &Context, new: &ProxyConfigStatus) {
    let reason_of = |status: Option<&ProxyConfigStatus>, type_: &str| {
        status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let old = config.status.as_ref();
    let milestones = [
        (condition_types::PROGRESSING, reasons::ROLLOUT_HALTED, EventType::Warning, "RolloutHalted"),
        (condition_types::PROGRESSING, reasons::ROLLOUT_COMPLETE, EventType::Normal, "RolloutComplete"),
        (condition_types::CONFLICT, reasons::OVERLAPPING_SELECTORS, EventType::Warning, "SelectorConflict"),
    ];
    for (type_, reason, type_of_event, event_reason) in milestones {
        let Some((new_reason, message)) = reason_of(Some(new), type_) else { continue };
        let was = reason_of(old, type_).map(|(r, _)| r);
        if new_reason == reason && was.as_deref() != Some(reason) {
            let event = Event {
                type_: type_of_event,
                reason: event_reason.into(),
                note: Some(message),
                action: "Rollout".into(),
                secondary: None,
            };
            context.publish(config, event).await;
        }
    }
}

async fn write_status(
    config: &ProxyConfig,
    context: &Context,
    status: &ProxyConfigStatus,
) -> Result<(), Error> {
    let api: Api<ProxyConfig> = Api::all(context.client.clone());
    // Server-side apply, so that entries and byMode keys that disappeared are removed too.
    let patch = serde_json::json!({
        "apiVersion": ProxyConfig::api_version(&()),
        "kind": ProxyConfig::kind(&()),
        "status": status,
    });
    api.patch_status(&config.name_any(), &apply_params(), &Patch::Apply(&patch)).await?;
    context.metrics.api_write("ProxyConfigStatus");
    Ok(())
}

/// Deletes the ProxyNodes (of ours) of nodes that no live config selects any more: their config was deleted,
/// or its selector no longer matches. Nodes another config now selects keep their ProxyNode, for that
/// config's rollout to take over (their agents carry traffic), and so do nodes in a conflict.
///
/// ProxyConfigs carry no finalizer: `helm uninstall` deletes the operator's RBAC and Deployment
/// together with the config, so a finalizer could be left with nobody to remove it, and the config
/// would hang in Terminating. What a deleted config leaves behind is found here instead; the agent
/// DaemonSet goes with its last owning config through the garbage collector, and a ProxyNode goes with
/// its Node. An agent whose ProxyNode is gone keeps its last mode and rules: removing the operator's
/// objects must not black-hole Service traffic (an agent never flushes on exit either).
async fn sweep_orphans(context: &Context) -> Result<(), Error> {
    let configs = context.configs.state();
    let nodes = context.nodes.state();
    let selection = selection::select(configs.iter().map(AsRef::as_ref), nodes.iter().map(|n| &n.metadata));
    for proxy_node in context.proxy_nodes.state() {
        let node = proxy_node.name_any();
        let ours = proxy_node.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(FIELD_MANAGER);
        if ours && !selection.is_claimed(&node) {
            info!(config = %proxy_node.spec.config_name, %node, "no config selects the node; deleting its ProxyNode");
            context.delete_proxy_node(&proxy_node).await?;
        }
    }
    Ok(())
}

/// Runs [`sweep_orphans`] every [`SWEEP_INTERVAL`] from the watch caches: no API call unless there is
/// something to delete, and it works when the last config is gone (no reconcile runs then).
async fn sweep_forever(context: Arc<Context>) {
    if context.caches_ready().await.is_err() {
        warn!("a watch cache stopped before it was filled; not sweeping ProxyNodes");
        return;
    }
    info!(interval = ?SWEEP_INTERVAL, "sweeping ProxyNodes of nodes that no config selects");
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        ticks.tick().await;
        if let Err(error) = sweep_orphans(&context).await {
            warn!(%error, "sweeping ProxyNodes of deleted configs; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetproxy_api::{ProxyNodeSpec, ProxyNodeStatus};
    use futures::stream;

    use super::*;

    fn proxy_node(name: &str, last_sync: i64, applied: Option<i64>) -> ProxyNode {
        let mut pn = ProxyNode::new(name, ProxyNodeSpec::default());
        pn.status = Some(ProxyNodeStatus {
            applied_generation: applied,
            last_sync: Some(Time(Timestamp::from_second(last_sync).expect("time"))),
            ..Default::default()
        });
        pn
    }

    #[tokio::test]
    async fn only_meaningful_changes_and_deletions_trigger() {
        let events = stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(proxy_node("a", 1, None))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(proxy_node("a", 2, None))),
            Ok(watcher::Event::Apply(proxy_node("a", 3, Some(1)))),
            Ok(watcher::Event::Delete(proxy_node("a", 3, Some(1)))),
        ]);
        let passed: Vec<Option<Time>> = meaningful_changes(events, proxy_node_fingerprint)
            .map(|pn| pn.ok().and_then(|pn| pn.status.and_then(|s| s.last_sync)))
            .collect()
            .await;
        let at = |s| Some(Time(Timestamp::from_second(s).expect("time")));
        assert_eq!(passed, [at(1), at(3), at(3)], "the lastSync-only change is dropped");
    }

    #[test]
    fn proxy_nodes_are_owned_by_their_node_without_blocking_its_deletion() {
        let meta = ObjectMeta { name: Some("n1".into()), uid: Some("u1".into()), ..Default::default() };
        let owner = node_owner(&meta).expect("owner");
        assert_eq!(
            (owner.kind.as_str(), owner.api_version.as_str(), owner.name.as_str()),
            ("Node", "v1", "n1")
        );
        assert_eq!(owner.block_owner_deletion, Some(false));
        assert!(node_owner(&ObjectMeta { name: Some("n1".into()), ..Default::default() }).is_none());
    }
}
