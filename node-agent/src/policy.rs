//! The traffic-policy layer: computed once per sync from the model and shared by every backend, so
//! that iptables, nftables and IPVS make the same choices.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::model::{Endpoint, IpFamily, Protocol, ProxyModel, ServicePort, ServicePortName};

/// An endpoint address a backend sends traffic to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (traffic to it needs no masquerade for Local policy).
    pub is_local: bool,
}

/// One service port in one address family, with every decision a backend needs already made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Addresses of this family only, excluded CIDRs already removed.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// Sources allowed to reach the load-balancer IPs (this family); empty: any source.
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub session_affinity: Option<Duration>,
    /// Endpoints for traffic to the cluster IPs (internalTrafficPolicy, topology, fallback to
    /// serving-terminating endpoints applied). Empty: reject.
    pub cluster_targets: Vec<Target>,
    /// Endpoints for traffic to node ports, external IPs and load-balancer IPs (externalTrafficPolicy
    /// applied). Empty: reject (or drop, for Local policy with endpoints elsewhere).
    pub external_targets: Vec<Target>,
    /// externalTrafficPolicy Local: external traffic keeps its source address (no masquerade) and
    /// only local endpoints serve it.
    pub external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_policy_local: bool,
}

impl ServicePlan {
    /// A plan for `name` in `family` on `port` that intercepts nothing yet: no addresses, no
    /// endpoints, no affinity, Cluster traffic policies. Fixtures and tools fill in what they need.
    pub fn new(name: ServicePortName, family: IpFamily, port: u16) -> Self {
        Self {
            protocol: name.protocol,
            name,
            family,
            port,
            node_port: None,
            cluster_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            session_affinity: None,
            cluster_targets: Vec::new(),
            external_targets: Vec::new(),
            external_policy_local: false,
            internal_policy_local: false,
        }
    }

    /// Every distinct target of either kind of traffic, sorted: one endpoint chain/element each.
    pub fn all_targets(&self) -> Vec<Target> {
        let mut all: Vec<Target> =
            self.cluster_targets.iter().chain(&self.external_targets).copied().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Whether this port is reachable from outside the node at all (node port, external or LB IPs).
    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }
}

/// Node-wide settings every backend renders with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// Destinations never intercepted.
    pub excluded_cidrs: Vec<IpNet>,
    /// Pod networks: traffic to a Service from outside them is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    /// Local addresses node ports are served on; empty: every local address.
    pub node_port_addresses: Vec<IpNet>,
}

/// Plans every service port of the model: one [`ServicePlan`] per service port and address family
/// it has a cluster IP of, sorted by name, IPv4 first.
///
/// Pure and cheap enough to run once per sync; every backend renders from its result, so that all
/// modes make the same choices.
pub fn plan(model: &ProxyModel, settings: &NodeSettings) -> Vec<ServicePlan> {
    let mut plans = Vec::new();
    plan_into(&mut plans, model, settings);
    plans
}

/// [`plan`] into `plans` (emptied first), without growing it by doubling: one plan per service port
/// is the common case, and at 10,000 services every spare slot is a few hundred bytes.
fn plan_into(plans: &mut Vec<ServicePlan>, model: &ProxyModel, settings: &NodeSettings) {
    plans.clear();
    plans.reserve_exact(model.services.len());
    plans.extend(model.services.keys().flat_map(|name| plan_service(model, name, settings)));
}

/// The last plans, kept between syncs so that a partial sync replans only its changed service
/// ports: replanning 10,000 services costs ~50 ms, more than the rest of a partial sync but the
/// kernel's own work.
#[derive(Clone, Debug, Default)]
pub struct PlanCache {
    plans: Vec<ServicePlan>,
    /// The settings the plans were made with; `None`: nothing planned yet.
    settings: Option<NodeSettings>,
}

impl PlanCache {
    /// The plans of `model` under `settings`: all replanned, or only `changed` when the cache holds
    /// plans of the same settings (the caller names every service port whose model changed, as it
    /// does for a partial sync). In [`plan`]'s order either way.
    pub fn update(
        &mut self,
        model: &ProxyModel,
        settings: &NodeSettings,
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> &[ServicePlan] {
        match changed {
            Some(changed) if self.settings.as_ref() == Some(settings) => {
                self.plans.retain(|p| !changed.contains(&p.name));
                self.plans.extend(changed.iter().flat_map(|name| plan_service(model, name, settings)));
                self.plans.sort_by(|a, b| (&a.name, a.family).cmp(&(&b.name, b.family)));
            }
            _ => {
                // In place: the old plans are not kept beside the new ones.
                plan_into(&mut self.plans, model, settings);
                self.settings = Some(settings.clone());
            }
        }
        &self.plans
    }
}

/// Plans one service port (none, one or two plans: one per address family), for partial syncs.
/// A service port missing from the model has no plan: its rules are to be removed.
pub fn plan_service(model: &ProxyModel, name: &ServicePortName, settings: &NodeSettings) -> Vec<ServicePlan> {
    let Some(port) = model.services.get(name) else { return Vec::new() };
    let endpoints = model.endpoints.get(name).map(Vec::as_slice).unwrap_or_default();
    // As kube-proxy's per-family proxiers do, a Service is served in the families of its cluster
    // IPs only; its other addresses of another family are ignored.
    let mut families: Vec<IpFamily> = port.cluster_ips.iter().map(IpFamily::of).collect();
    families.sort();
    families.dedup();
    families
        .into_iter()
        .filter_map(|family| plan_family(name, port, endpoints, model.node_zone.as_deref(), family, settings))
        .collect()
}

/// Endpoints of one family sorted into kube-proxy's categories (pkg/proxy/topology.go).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster traffic policy: ready endpoints, else serving-terminating ones, narrowed to this
    /// node's zone by topology hints when usable.
    pub cluster: Vec<Target>,
    /// For Local traffic policy: local ready endpoints, else local serving-terminating ones. Never
    /// narrowed by topology: a local endpoint is as close as it gets.
    pub local: Vec<Target>,
}

/// kube-proxy's `CategorizeEndpoints`, for endpoints of one family.
pub fn categorize(endpoints: &[Endpoint], zone: Option<&str>) -> Categorized {
    let hinted_zone = zone.filter(|zone| uses_zone_hints(endpoints, zone));
    let in_topology =
        |endpoint: &Endpoint| hinted_zone.is_none_or(|zone| endpoint.zone_hints.iter().any(|z| z == zone));
    let serving_terminating = |endpoint: &Endpoint| endpoint.serving && endpoint.terminating;

    let mut cluster = targets(endpoints, |e| e.ready && in_topology(e));
    // With no ready endpoint (in topology), terminating endpoints that still serve keep connections
    // working during a rolling update instead of refusing them (KEP-1669).
    if cluster.is_empty() {
        cluster = targets(endpoints, |e| serving_terminating(e) && in_topology(e));
    }
    let mut local = targets(endpoints, |e| e.is_local && e.ready);
    if local.is_empty() {
        local = targets(endpoints, |e| e.is_local && serving_terminating(e));
    }
    Categorized { cluster, local }
}

/// Topology hints are used only when every ready endpoint carries zone hints and at least one is
/// hinted for this node's zone; otherwise traffic would be sent nowhere or unevenly.
fn uses_zone_hints(endpoints: &[Endpoint], zone: &str) -> bool {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.iter().any(|z| z == zone))
}

fn targets(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<Target> {
    let mut targets: Vec<Target> = endpoints
        .iter()
        .filter(|e| keep(e))
        .map(|e| Target { ip: e.ip, port: e.port, is_local: e.is_local })
        .collect();
    targets.sort();
    targets.dedup();
    targets
}

fn plan_family(
    name: &ServicePortName,
    port: &ServicePort,
    endpoints: &[Endpoint],
    zone: Option<&str>,
    family: IpFamily,
    settings: &NodeSettings,
) -> Option<ServicePlan> {
    let excluded = |ip: &IpAddr| settings.excluded_cidrs.iter().any(|net| net.contains(ip));
    let addresses = |ips: &[IpAddr]| -> Vec<IpAddr> {
        ips.iter().filter(|ip| IpFamily::of(ip) == family && !excluded(ip)).copied().collect()
    };
    let family_endpoints: Vec<Endpoint> =
        endpoints.iter().filter(|e| IpFamily::of(&e.ip) == family).cloned().collect();
    let categorized = categorize(&family_endpoints, zone);

    let mut plan = ServicePlan {
        name: name.clone(),
        family,
        protocol: name.protocol,
        port: port.port,
        node_port: port.node_port,
        cluster_ips: addresses(&port.cluster_ips),
        external_ips: addresses(&port.external_ips),
        load_balancer_ips: addresses(&port.load_balancer_ips),
        load_balancer_source_ranges: port
            .load_balancer_source_ranges
            .iter()
            .filter(|net| IpFamily::of_net(net) == family)
            .copied()
            .collect(),
        session_affinity: port.session_affinity,
        cluster_targets: Vec::new(),
        external_targets: Vec::new(),
        external_policy_local: port.external_policy_local,
        internal_policy_local: port.internal_policy_local,
    };
    if plan.cluster_ips.is_empty() && !plan.has_external() {
        // Every address of this family is excluded and there is no node port: nothing to intercept.
        return None;
    }
    let pick = |local: bool| if local { categorized.local.clone() } else { categorized.cluster.clone() };
    plan.cluster_targets = pick(port.internal_policy_local);
    // External traffic has its own policy; a port with no external address needs no targets for it.
    if plan.has_external() {
        plan.external_targets = pick(port.external_policy_local);
    }
    Some(plan)
}

#[cfg(test)]
mod tests;
