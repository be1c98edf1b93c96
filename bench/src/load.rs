//! Writing the load straight into the API server: Services without selectors (the server allocates
//! their ClusterIPs) and the EndpointSlices we own, and single-endpoint changes to them.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

pub const NAMESPACE: &str = "fleetproxy-bench";
pub const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const MANAGED_BY: &str = "fleetproxy-bench";
/// Endpoints per EndpointSlice, as the EndpointSlice controller does by default.
const SLICE_SIZE: usize = 100;
/// How many creates are in flight at once.
const CONCURRENCY: usize = 64;
pub const PORT: i32 = 80;
pub const TARGET_PORT: i32 = 8080;

/// Endpoint addresses of the load: 10.128.0.0/9, one per (service, endpoint).
const LOAD_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// Addresses of the changes: 10.64.0.0/10, a fresh one per change.
const CHANGE_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
static NEXT_CHANGE: AtomicU32 = AtomicU32::new(1);

/// A benchmark point: `services` Services of `endpoints` endpoints each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub services: usize,
    pub endpoints: usize,
}

impl std::str::FromStr for Point {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?}: expected SERVICESxENDPOINTS"))?;
        let parse = |v: &str| v.trim().replace('_', "").parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
        let point = Point { services: parse(a)?, endpoints: parse(b)? };
        if point.services == 0 || point.endpoints == 0 || point.services * point.endpoints > 4_000_000 {
            return Err(format!("{s:?}: out of range"));
        }
        Ok(point)
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.services, self.endpoints)
    }
}

#[derive(Clone, Debug)]
pub struct SliceModel {
    pub name: String,
    pub ips: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct ServiceModel {
    pub name: String,
    pub cluster_ip: u32,
    pub slices: Vec<SliceModel>,
}

/// What is in the API server now.
#[derive(Default)]
pub struct Model {
    pub endpoints: usize,
    pub services: Vec<ServiceModel>,
}

impl Model {
    /// Every address a complete ruleset must contain: the ClusterIPs and every endpoint.
    pub fn expected(&self) -> HashSet<u32> {
        let mut set = HashSet::new();
        for service in &self.services {
            set.insert(service.cluster_ip);
            for slice in &service.slices {
                set.extend(slice.ips.iter().copied());
            }
        }
        set
    }
}

pub fn ip_string(ip: u32) -> String {
    Ipv4Addr::from(ip).to_string()
}

fn slice_json(service: &str, slice: &SliceModel, trigger: &str) -> serde_json::Value {
    let endpoints: Vec<_> = slice
        .ips
        .iter()
        .map(|ip| {
            json!({"addresses": [ip_string(*ip)], "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice.name,
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
            "annotations": {TRIGGER: trigger},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The Namespace and the Node the proxies run as.
pub async fn prepare(client: &Client, node: &str, node_ip: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(NAMESPACE).await?.is_none() {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
        namespaces.create(&PostParams::default(), &ns).await.context("creating the namespace")?;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(node).await?.is_none() {
        let object: Node = serde_json::from_value(json!({
            "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
        }))?;
        nodes.create(&PostParams::default(), &object).await.context("creating the Node")?;
    }
    // kube-proxy waits up to 30s for its Node to have an address before it starts.
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": node_ip}, {"type": "Hostname", "address": node}]}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("patching the Node status")?;
    Ok(())
}

/// Deletes every Service and EndpointSlice of the benchmark namespace and waits until they are gone.
pub async fn wipe(client: &Client) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let all = ListParams::default();
    // Services have no collection delete; delete them one by one, concurrently.
    let names: Vec<String> =
        services.list_metadata(&all).await?.items.into_iter().filter_map(|s| s.metadata.name).collect();
    stream::iter(names)
        .map(|name| {
            let services = services.clone();
            async move {
                match services.delete(&name, &DeleteParams::default()).await {
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(e) => Err(e),
                    Ok(_) => Ok(()),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("deleting Services")?;
    slices.delete_collection(&DeleteParams::default(), &all).await.context("deleting EndpointSlices")?;
    for _ in 0..600 {
        let left = services.list_metadata(&all.clone().limit(1)).await?.items.len()
            + slices.list_metadata(&all.clone().limit(1)).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bail!("the benchmark namespace still holds objects after 60s")
}

/// The load already in the API server (from an earlier run), if it is one this benchmark wrote
/// and every Service has the same number of endpoints; otherwise it is wiped. Changes made from
/// then on use addresses none of its slices holds.
pub async fn adopt(client: &Client) -> Result<Model> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let all = ListParams::default();
    let mut by_service: std::collections::HashMap<String, Vec<SliceModel>> = Default::default();
    for slice in slices.list(&all).await.context("listing EndpointSlices")?.items {
        let labels = slice.metadata.labels.unwrap_or_default();
        let (Some(service), Some(name)) = (labels.get("kubernetes.io/service-name"), slice.metadata.name)
        else {
            continue;
        };
        let ips = slice
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse::<Ipv4Addr>().ok().map(u32::from))
            .collect();
        by_service.entry(service.clone()).or_default().push(SliceModel { name, ips });
    }
    let mut model = Model::default();
    let listed = services.list(&all).await.context("listing Services")?.items;
    for service in &listed {
        let name = service.metadata.name.clone().unwrap_or_default();
        let cluster_ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let mut slices = by_service.remove(&name).unwrap_or_default();
        slices.sort_by_key(|s| s.name.split('-').next_back().and_then(|k| k.parse::<usize>().ok()));
        model.services.push(ServiceModel { name, cluster_ip: cluster_ip.map_or(0, u32::from), slices });
    }
    model.services.sort_by_key(|s| s.name.strip_prefix("svc-").and_then(|i| i.parse::<usize>().ok()));
    let endpoints = |s: &ServiceModel| s.slices.iter().map(|slice| slice.ips.len()).sum::<usize>();
    model.endpoints = model.services.first().map_or(0, endpoints);
    let usable = by_service.is_empty()
        && model.services.iter().enumerate().all(|(i, s)| {
            s.name == format!("svc-{i}") && s.cluster_ip != 0 && endpoints(s) == model.endpoints
        });
    if !usable {
        wipe(client).await?;
        return Ok(Model::default());
    }
    let last_change = model.expected().into_iter().filter(|ip| is_change_ip(*ip)).max();
    if let Some(ip) = last_change {
        NEXT_CHANGE.fetch_max(ip - CHANGE_BASE + 1, Ordering::Relaxed);
    }
    if !model.services.is_empty() {
        eprintln!(
            "bench: reusing the {} services of {} endpoints in the API server",
            model.services.len(),
            model.endpoints
        );
    }
    Ok(model)
}

/// Brings the API server to `point`: adds or removes Services when only their number changes,
/// starts over when the number of endpoints per Service changes.
pub async fn reconcile(client: &Client, model: &mut Model, point: Point) -> Result<()> {
    if model.endpoints != point.endpoints && !model.services.is_empty() {
        eprintln!("bench: removing {} services (new shape {point})", model.services.len());
        wipe(client).await?;
        model.services.clear();
    }
    model.endpoints = point.endpoints;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    if model.services.len() > point.services {
        let extra: Vec<ServiceModel> = model.services.drain(point.services..).collect();
        eprintln!("bench: deleting {} services", extra.len());
        stream::iter(extra)
            .map(|service| {
                let (services, slices) = (services.clone(), slices.clone());
                async move {
                    services.delete(&service.name, &DeleteParams::default()).await?;
                    for slice in &service.slices {
                        slices.delete(&slice.name, &DeleteParams::default()).await?;
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        return Ok(());
    }
    let start = model.services.len();
    let count = point.services - start;
    if count == 0 {
        return Ok(());
    }
    eprintln!("bench: creating {count} services with {} endpoints each", point.endpoints);
    let began = std::time::Instant::now();
    let trigger = Timestamp::now().to_string();
    let created: Vec<ServiceModel> = stream::iter(start..point.services)
        .map(|index| {
            let (services, slices, trigger) = (services.clone(), slices.clone(), trigger.clone());
            async move {
                let name = format!("svc-{index}");
                let object: Service = serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}]},
                }))?;
                let created = services.create(&PostParams::default(), &object).await.with_context(|| format!("creating {name}"))?;
                let cluster_ip: Ipv4Addr = created
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .context("no ClusterIP allocated")?
                    .parse()
                    .context("ClusterIP")?;
                let first = LOAD_BASE + (index * point.endpoints) as u32 + 1;
                let all: Vec<u32> = (0..point.endpoints as u32).map(|j| first + j).collect();
                let mut model = ServiceModel { name: name.clone(), cluster_ip: cluster_ip.into(), slices: Vec::new() };
                for (k, chunk) in all.chunks(SLICE_SIZE).enumerate() {
                    let slice = SliceModel { name: format!("{name}-{k}"), ips: chunk.to_vec() };
                    let object: EndpointSlice = serde_json::from_value(slice_json(&name, &slice, &trigger))?;
                    slices
                        .create(&PostParams::default(), &object)
                        .await
                        .with_context(|| format!("creating {}", slice.name))?;
                    model.slices.push(slice);
                }
                anyhow::Ok(model)
            }
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;
    model.services.extend(created);
    eprintln!("bench: created {count} services in {:.1}s", began.elapsed().as_secs_f64());
    Ok(())
}

/// Whether `ip` is one of the changes' addresses.
pub fn is_change_ip(ip: u32) -> bool {
    ip >> 22 == CHANGE_BASE >> 22
}

/// A fresh endpoint address for a change.
pub fn next_change_ip() -> u32 {
    CHANGE_BASE + NEXT_CHANGE.fetch_add(1, Ordering::Relaxed)
}

/// Replaces endpoint `endpoint` of slice `slice` of service `service` with `new_ip`, stamping the
/// slice with a new trigger time (now).
pub async fn change_endpoint(
    slices: &Api<EndpointSlice>,
    service: &mut ServiceModel,
    slice: usize,
    endpoint: usize,
    new_ip: u32,
) -> Result<()> {
    let model = &mut service.slices[slice];
    let slot = endpoint % model.ips.len();
    model.ips[slot] = new_ip;
    let mut body = slice_json(&service.name, model, &Timestamp::now().to_string());
    // A merge patch of the fields that change; the endpoint list is replaced as a whole.
    if let Some(object) = body.as_object_mut() {
        object.retain(|key, _| key == "metadata" || key == "endpoints");
    }
    slices.patch(&model.name, &PatchParams::default(), &Patch::Merge(&body)).await?;
    Ok(())
}
