//! The change tracker: turns Service and EndpointSlice watch events into a [`ProxyModel`], one event
//! at a time, and remembers which service ports changed since the last sync.
//!
//! This is kube-proxy's `ServiceChangeTracker` and `EndpointsChangeTracker` (with its
//! `EndpointSliceCache`) folded into one pure structure: no API calls, no clocks, no kernel. The
//! agent feeds it events; the sync loop reads [`ChangeTracker::model`] and drains
//! [`ChangeTracker::take_changes`] to know what a partial sync has to rewrite.
//!
//! Invariant (checked by a property test): whatever sequence of events led to a set of objects, the
//! model is the one built from scratch from that set.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};

use crate::model::{Endpoint, IpFamily, Protocol, ProxyModel, ServicePort, ServicePortName};

/// Services (and their slices) carrying this label belong to another proxy, unless the value is the
/// name this agent was configured with.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on the slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Names the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// When the change that produced this EndpointSlice version happened (RFC 3339), set by the
/// EndpointSlice controller; the start of kube-proxy's network programming latency.
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The older spelling of trafficDistribution: PreferClose.
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// Read when `spec.loadBalancerSourceRanges` is empty, as kube-proxy does.
pub const ANNOTATION_LB_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The node label that names its zone.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// A Service's namespace and name. EndpointSlices point to their Service by it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the tracker needs to know about the agent it runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerConfig {
    /// This node's name: endpoints whose `nodeName` equals it are local.
    pub node_name: String,
    /// The `service.kubernetes.io/service-proxy-name` value this agent serves. `None` (kube-proxy's
    /// behaviour): every Service carrying the label belongs to another proxy.
    pub service_proxy_name: Option<String>,
    /// Trigger times older than this are not reported: they predate the agent, and counting them
    /// would report the age of the cluster as programming latency (kube-proxy does the same).
    pub started: Option<Timestamp>,
}

/// What changed since the last [`ChangeTracker::take_changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackedChanges {
    /// Service ports whose Service or endpoints were added, changed or removed.
    pub services: BTreeSet<ServicePortName>,
    /// Service events that changed the model (kubeproxy_sync_proxy_rules_service_changes_total).
    pub service_events: u64,
    /// EndpointSlice events that changed the model (kubeproxy_sync_proxy_rules_endpoint_changes_total).
    pub endpoint_events: u64,
    /// The earliest `last-change-trigger-time` per changed Service, for
    /// kubeproxy_network_programming_duration_seconds.
    pub trigger_times: BTreeMap<ServiceRef, Timestamp>,
    /// Something every service port depends on changed (this node's zone): the next sync is full.
    pub topology_changed: bool,
}

impl TrackedChanges {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.topology_changed
    }
}

/// A port of a Service, as an EndpointSlice names it (its Service is known from the slice).
type PortKey = (String, Protocol);

/// Endpoints one EndpointSlice contributes, per port of its Service: sorted by port, each port once,
/// endpoints in the slice's order.
///
/// Plain vectors, not maps: a slice has one port or a few, and at 10,000 Services the maps' nodes
/// (room for 11 entries each) made up most of the tracker's memory.
type SliceEndpoints = Vec<(PortKey, Vec<Endpoint>)>;

/// A tracked EndpointSlice: its name, and its endpoints unless they are the model's (`None`, see
/// [`ChangeTracker`]).
type TrackedSlice = (String, Option<SliceEndpoints>);

/// An EndpointSlice's namespace and name.
pub type SliceId = (String, String);

/// The Service and EndpointSlice change tracker. See the module documentation.
///
/// The ports a Service put into the model are found again in the model itself (its names sort
/// together, see [`port_range`]): no second copy of every Service is kept. Nor of the endpoints of a
/// Service's only EndpointSlice (the usual case): merging one slice gives its endpoints back, so its
/// copy is taken from the model again when a second slice joins it.
#[derive(Clone, Debug, Default)]
pub struct ChangeTracker {
    config: TrackerConfig,
    model: ProxyModel,
    /// Every tracked EndpointSlice, grouped by its Service, sorted by slice name; the endpoints of
    /// a Service's only slice are the model's (`None`), those of several slices are kept.
    slices: BTreeMap<ServiceRef, Vec<TrackedSlice>>,
    /// Which Service each tracked slice (namespace, slice name) belongs to.
    slice_owner: BTreeMap<SliceId, ServiceRef>,
    pending: TrackedChanges,
}

impl ChangeTracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self { config, ..Self::default() }
    }

    /// The model as of the last event.
    pub fn model(&self) -> &ProxyModel {
        &self.model
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// What changed so far since the last [`take_changes`](Self::take_changes), without taking it.
    pub fn pending(&self) -> &TrackedChanges {
        &self.pending
    }

    /// Whether anything changed since the last [`take_changes`](Self::take_changes).
    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Hands over what changed since the last call and starts a new batch.
    pub fn take_changes(&mut self) -> TrackedChanges {
        std::mem::take(&mut self.pending)
    }

    /// Sets this node's zone (its `topology.kubernetes.io/zone` label). Returns whether it changed;
    /// a change affects every service port's topology choice, so it is flagged for a full sync.
    pub fn set_node_zone(&mut self, zone: Option<String>) -> bool {
        let zone = zone.filter(|zone| !zone.is_empty());
        if self.model.node_zone == zone {
            return false;
        }
        self.model.node_zone = zone;
        self.pending.topology_changed = true;
        true
    }

    /// A Service was added or modified.
    pub fn apply_service(&mut self, service: &Service) {
        let Some(key) = object_ref(&service.metadata) else { return };
        let ports =
            if self.proxies_service(service) { service_ports(&key, service) } else { BTreeMap::new() };
        self.set_service_ports(&key, ports);
    }

    /// A Service was deleted.
    pub fn delete_service(&mut self, service: &Service) {
        let Some(key) = object_ref(&service.metadata) else { return };
        self.set_service_ports(&key, BTreeMap::new());
    }

    /// The watch was (re)started and listed exactly these Services: anything tracked but not listed
    /// was deleted while we were not watching.
    pub fn replace_services<'a>(&mut self, services: impl IntoIterator<Item = &'a Service>) {
        let mut listed = BTreeSet::new();
        for service in services {
            self.list_service(service, &mut listed);
        }
        self.end_service_list(&listed);
    }

    /// One Service of a (re)list, applied as it comes so that a list of thousands is never held in
    /// memory; `listed` collects the keys for [`Self::end_service_list`].
    pub fn list_service(&mut self, service: &Service, listed: &mut BTreeSet<ServiceRef>) {
        if let Some(key) = object_ref(&service.metadata) {
            listed.insert(key);
        }
        self.apply_service(service);
    }

    /// The (re)list is complete: Services tracked but not listed were deleted meanwhile.
    pub fn end_service_list(&mut self, listed: &BTreeSet<ServiceRef>) {
        let mut gone: Vec<ServiceRef> = Vec::new();
        for name in self.model.services.keys() {
            let tracked =
                gone.last().is_some_and(|key| key.namespace == name.namespace && key.name == name.name);
            if !tracked {
                gone.push(ServiceRef { namespace: name.namespace.clone(), name: name.name.clone() });
            }
        }
        gone.retain(|key| !listed.contains(key));
        for key in gone {
            self.set_service_ports(&key, BTreeMap::new());
        }
    }

    /// An EndpointSlice was added or modified.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) {
        let Some(slice_key) = object_ref(&slice.metadata) else { return };
        let owner = self.slice_service(slice);
        let slice_id = (slice_key.namespace, slice_key.name);
        // A slice that moved to another Service (or stopped being ours) leaves its old one first.
        if let Some(previous) = self.slice_owner.get(&slice_id).cloned()
            && Some(&previous) != owner.as_ref()
        {
            self.remove_slice(&slice_id, &previous);
        }
        let Some(owner) = owner else { return };
        let endpoints = slice_endpoints(slice, &self.config.node_name);
        let slices = self.slices.entry(owner.clone()).or_default();
        match slices.binary_search_by(|(name, _)| name.as_str().cmp(&slice_id.1)) {
            Ok(at) if slices[at].1.as_ref() == Some(&endpoints) => return,
            Ok(at) => slices[at].1 = Some(endpoints),
            Err(at) => {
                // A second slice: the first one's endpoints are needed apart from the model now.
                if let [(_, only @ None)] = slices.as_mut_slice() {
                    *only = Some(model_slice(&self.model, &owner));
                }
                slices.insert(at, (slice_id.1.clone(), Some(endpoints)));
            }
        }
        self.slice_owner.entry(slice_id).or_insert_with(|| owner.clone());
        let changed = self.rebuild_endpoints(&owner);
        self.forget_only_copy(&owner);
        if changed {
            self.pending.endpoint_events += 1;
            if let Some(time) =
                trigger_time(slice).filter(|time| self.config.started.is_none_or(|s| *time > s))
            {
                let earliest = self.pending.trigger_times.entry(owner).or_insert(time);
                *earliest = (*earliest).min(time);
            }
        }
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        let Some(slice_key) = object_ref(&slice.metadata) else { return };
        let slice_id = (slice_key.namespace, slice_key.name);
        if let Some(owner) = self.slice_owner.get(&slice_id).cloned() {
            self.remove_slice(&slice_id, &owner);
        }
    }

    /// The watch was (re)started and listed exactly these EndpointSlices.
    pub fn replace_slices<'a>(&mut self, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        let mut listed = BTreeSet::new();
        for slice in slices {
            self.list_slice(slice, &mut listed);
        }
        self.end_slice_list(&listed);
    }

    /// One EndpointSlice of a (re)list, applied as it comes; see [`Self::list_service`].
    pub fn list_slice(&mut self, slice: &EndpointSlice, listed: &mut BTreeSet<SliceId>) {
        if let Some(key) = object_ref(&slice.metadata) {
            listed.insert((key.namespace, key.name));
        }
        self.apply_slice(slice);
    }

    /// The (re)list is complete: EndpointSlices tracked but not listed were deleted meanwhile.
    pub fn end_slice_list(&mut self, listed: &BTreeSet<SliceId>) {
        let gone: Vec<(SliceId, ServiceRef)> = self
            .slice_owner
            .iter()
            .filter(|(id, _)| !listed.contains(*id))
            .map(|(id, owner)| (id.clone(), owner.clone()))
            .collect();
        for (id, owner) in gone {
            self.remove_slice(&id, &owner);
        }
    }

    fn remove_slice(&mut self, slice_id: &SliceId, owner: &ServiceRef) {
        self.slice_owner.remove(slice_id);
        let Some(slices) = self.slices.get_mut(owner) else { return };
        let Ok(at) = slices.binary_search_by(|(name, _)| name.as_str().cmp(&slice_id.1)) else { return };
        slices.remove(at);
        if slices.is_empty() {
            self.slices.remove(owner);
        }
        // kube-proxy drops the trigger time of a deleted slice too: a deletion has none of its own,
        // and the older time would overstate the latency.
        if self.rebuild_endpoints(owner) {
            self.pending.endpoint_events += 1;
        }
        self.forget_only_copy(owner);
    }

    /// A Service's only slice keeps no copy of its endpoints: the model holds them, merged from it.
    fn forget_only_copy(&mut self, owner: &ServiceRef) {
        if let Some([(_, only)]) = self.slices.get_mut(owner).map(Vec::as_mut_slice) {
            *only = None;
        }
    }

    /// Whether this agent proxies the Service at all (kube-proxy's `ShouldSkipService` plus its
    /// informer's label selector).
    fn proxies_service(&self, service: &Service) -> bool {
        if !self.owns_labels(service.metadata.labels.as_ref()) {
            return false;
        }
        let Some(spec) = &service.spec else { return false };
        if spec.type_.as_deref() == Some("ExternalName") {
            return false;
        }
        // Headless (clusterIP None) and IP-less Services have nothing to intercept.
        !cluster_ips(spec).is_empty()
    }

    /// The Service an EndpointSlice feeds, if this agent uses it.
    fn slice_service(&self, slice: &EndpointSlice) -> Option<ServiceRef> {
        let labels = slice.metadata.labels.as_ref();
        if !self.owns_labels(labels) || labels.is_some_and(|labels| labels.contains_key(LABEL_HEADLESS)) {
            return None;
        }
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return None;
        }
        let name = labels?.get(LABEL_SERVICE_NAME)?;
        let namespace = slice.metadata.namespace.as_ref()?;
        Some(ServiceRef { namespace: namespace.clone(), name: name.clone() })
    }

    fn owns_labels(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        match labels.and_then(|labels| labels.get(LABEL_SERVICE_PROXY_NAME)) {
            None => true,
            Some(name) => self.config.service_proxy_name.as_deref() == Some(name.as_str()),
        }
    }

    /// Replaces the ports a Service contributes; records the ports that changed.
    fn set_service_ports(&mut self, key: &ServiceRef, ports: BTreeMap<ServicePortName, ServicePort>) {
        let gone: Vec<ServicePortName> = self
            .model
            .services
            .range(port_range(key))
            .filter(|(name, _)| !ports.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        let mut changed = false;
        for name in gone {
            self.model.services.remove(&name);
            self.pending.services.insert(name);
            changed = true;
        }
        for (name, port) in ports {
            if self.model.services.get(&name) != Some(&port) {
                self.pending.services.insert(name.clone());
                self.model.services.insert(name, port);
                changed = true;
            }
        }
        if changed {
            self.pending.service_events += 1;
        }
    }

    /// Recomputes a Service's endpoints from all of its slices. Returns whether any port changed.
    fn rebuild_endpoints(&mut self, owner: &ServiceRef) -> bool {
        let merged = self.slices.get(owner).map(|slices| merge_slices(owner, slices)).unwrap_or_default();
        let previous: Vec<ServicePortName> =
            self.model.endpoints.range(port_range(owner)).map(|(name, _)| name.clone()).collect();
        let mut changed = false;
        for name in previous {
            if !merged.contains_key(&name) {
                self.model.endpoints.remove(&name);
                self.pending.services.insert(name);
                changed = true;
            }
        }
        for (name, endpoints) in merged {
            if self.model.endpoints.get(&name) != Some(&endpoints) {
                self.model.endpoints.insert(name.clone(), endpoints);
                self.pending.services.insert(name);
                changed = true;
            }
        }
        changed
    }
}

/// The range of [`ServicePortName`]s of one Service in a map ordered by name.
fn port_range(owner: &ServiceRef) -> std::ops::RangeInclusive<ServicePortName> {
    let bound = |port: &str, protocol| ServicePortName {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
        port: port.to_owned(),
        protocol,
    };
    // Port names are DNS labels; no valid one sorts after "\u{10FFFF}".
    bound("", Protocol::Tcp)..=bound("\u{10FFFF}", Protocol::Sctp)
}

/// Merges one Service's slices into its endpoints per port, sorted and without duplicates.
///
/// As in kube-proxy's EndpointSliceCache, the same address and port may sit in two slices for a
/// moment while the controller moves it; the local copy wins if the two disagree. Slices are taken
/// in name order so that the result does not depend on the order events arrived in.
fn merge_slices(owner: &ServiceRef, slices: &[TrackedSlice]) -> BTreeMap<ServicePortName, Vec<Endpoint>> {
    let mut merged: BTreeMap<&PortKey, BTreeMap<(IpAddr, u16), Endpoint>> = BTreeMap::new();
    for (_, slice) in slices {
        // Every slice's copy is there when merging (see `apply_slice`).
        debug_assert!(slice.is_some(), "merging a slice whose endpoints are the model's");
        for (port, endpoints) in slice.iter().flatten() {
            let by_address = merged.entry(port).or_default();
            for endpoint in endpoints {
                let key = (endpoint.ip, endpoint.port);
                if endpoint.is_local || !by_address.contains_key(&key) {
                    by_address.insert(key, endpoint.clone());
                }
            }
        }
    }
    merged
        .into_iter()
        .filter(|(_, endpoints)| !endpoints.is_empty())
        .map(|((port, protocol), endpoints)| {
            let name = ServicePortName {
                namespace: owner.namespace.clone(),
                name: owner.name.clone(),
                port: port.clone(),
                protocol: *protocol,
            };
            (name, endpoints.into_values().collect())
        })
        .collect()
}

/// A Service's endpoints in the model, as the one slice they were merged from would give them.
fn model_slice(model: &ProxyModel, owner: &ServiceRef) -> SliceEndpoints {
    model
        .endpoints
        .range(port_range(owner))
        .map(|(name, endpoints)| ((name.port.clone(), name.protocol), endpoints.clone()))
        .collect()
}

fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<ServiceRef> {
    Some(ServiceRef { namespace: meta.namespace.clone()?, name: meta.name.clone()? })
}

fn parse_protocol(protocol: Option<&str>) -> Option<Protocol> {
    // The API server defaults the protocol to TCP; an unset one is taken the same way.
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

fn parse_ips<'a>(texts: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = texts.into_iter().filter_map(|text| text.trim().parse().ok()).collect();
    ips.dedup();
    ips
}

/// `spec.clusterIPs` (or the older `spec.clusterIP`), without "None".
fn cluster_ips(spec: &ServiceSpec) -> Vec<IpAddr> {
    let texts: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    parse_ips(texts)
}

/// The ports of a Service this agent proxies, as the model holds them.
fn service_ports(key: &ServiceRef, service: &Service) -> BTreeMap<ServicePortName, ServicePort> {
    let Some(spec) = &service.spec else { return BTreeMap::new() };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let cluster_ips = cluster_ips(spec);
    let external_ips = parse_ips(spec.external_ips.iter().flatten());
    let load_balancer_ips = if type_ == "LoadBalancer" {
        let ingress =
            service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        // ipMode Proxy: the load balancer rewrites the destination, so the node must not intercept
        // the LB IP itself (KEP-1860).
        parse_ips(
            ingress
                .into_iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_ref()),
        )
    } else {
        Vec::new()
    };
    let load_balancer_source_ranges = source_ranges(service);
    let session_affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds)
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs)
    });
    // kube-proxy applies externalTrafficPolicy only to Services reachable from outside.
    let externally_accessible = has_node_ports || !external_ips.is_empty();
    let external_policy_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let annotations = service.metadata.annotations.as_ref();
    let annotation = |name: &str| annotations.and_then(|a| a.get(name)).map(String::as_str);
    let prefer_close = matches!(spec.traffic_distribution.as_deref(), Some("PreferClose" | "PreferSameZone"))
        || matches!(annotation(ANNOTATION_TOPOLOGY_MODE), Some("Auto" | "auto"))
        || matches!(annotation(ANNOTATION_TOPOLOGY_AWARE_HINTS), Some("Auto" | "auto"));

    let mut ports = BTreeMap::new();
    for port in spec.ports.iter().flatten() {
        let (Some(protocol), Some(number)) =
            (parse_protocol(port.protocol.as_deref()), parse_port(port.port))
        else {
            continue;
        };
        let name = ServicePortName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            port: port.name.clone().unwrap_or_default(),
            protocol,
        };
        let node_port = if has_node_ports { port.node_port.and_then(parse_port) } else { None };
        ports.insert(
            name,
            ServicePort {
                port: number,
                node_port,
                cluster_ips: cluster_ips.clone(),
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                load_balancer_source_ranges: load_balancer_source_ranges.clone(),
                session_affinity,
                external_policy_local,
                internal_policy_local,
                prefer_close,
            },
        );
    }
    ports
}

/// `spec.loadBalancerSourceRanges`, or the older annotation when the field is empty.
fn source_ranges(service: &Service) -> Vec<IpNet> {
    let from_spec =
        service.spec.as_ref().and_then(|spec| spec.load_balancer_source_ranges.clone()).unwrap_or_default();
    let texts: Vec<String> = if from_spec.is_empty() {
        let annotation =
            service.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_LB_SOURCE_RANGES));
        annotation.map(|text| text.split(',').map(str::to_owned).collect()).unwrap_or_default()
    } else {
        from_spec
    };
    let mut ranges: Vec<IpNet> =
        texts.iter().filter_map(|text| text.trim().parse::<IpNet>().ok()).map(|net| net.trunc()).collect();
    ranges.sort();
    ranges.dedup();
    ranges
}

/// The endpoints an EndpointSlice contributes, per port of its Service.
fn slice_endpoints(slice: &EndpointSlice, node_name: &str) -> SliceEndpoints {
    let family = if slice.address_type == "IPv6" { IpFamily::V6 } else { IpFamily::V4 };
    let mut out = SliceEndpoints::new();
    for port in slice.ports.iter().flatten() {
        let (Some(protocol), Some(number)) =
            (parse_protocol(port.protocol.as_deref()), port.port.and_then(parse_port))
        else {
            continue;
        };
        let key = (port.name.clone().unwrap_or_default(), protocol);
        let mut endpoints = Vec::with_capacity(slice.endpoints.as_ref().map_or(0, Vec::len));
        for endpoint in slice.endpoints.iter().flatten() {
            // kube-proxy uses the first address only; the others are the same Pod's and unused.
            let Some(ip) = endpoint.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if IpFamily::of(&ip) != family {
                continue;
            }
            let conditions = endpoint.conditions.as_ref();
            // Unset ready/serving mean true and unset terminating means false (the API's contract).
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let mut zone_hints: Vec<String> = endpoint
                .hints
                .as_ref()
                .and_then(|hints| hints.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|zone| zone.name.clone())
                .collect();
            zone_hints.sort();
            zone_hints.dedup();
            endpoints.push(Endpoint {
                ip,
                port: number,
                ready,
                serving,
                terminating,
                is_local: endpoint.node_name.as_deref() == Some(node_name) && !node_name.is_empty(),
                zone_hints,
            });
        }
        endpoints.shrink_to_fit();
        match out.binary_search_by(|(other, _)| other.cmp(&key)) {
            // The same port twice (the API refuses it): one list, as a map would make it.
            Ok(at) => out[at].1.extend(endpoints),
            Err(at) => out.insert(at, (key, endpoints)),
        }
    }
    out
}

fn trigger_time(slice: &EndpointSlice) -> Option<Timestamp> {
    slice.metadata.annotations.as_ref()?.get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)?.parse().ok()
}

/// This node's zone, from its labels.
pub fn node_zone(labels: Option<&BTreeMap<String, String>>) -> Option<String> {
    labels?.get(LABEL_TOPOLOGY_ZONE).filter(|zone| !zone.is_empty()).cloned()
}

#[cfg(test)]
mod tests;
