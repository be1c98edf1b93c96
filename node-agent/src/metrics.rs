//! The agent's Prometheus metrics, under kube-proxy's names where kube-proxy has one, so that
//! existing dashboards and alerts keep working after replacing kube-proxy.

use std::sync::atomic::AtomicU64;

use fleetproxy_api::ProxyMode;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(String, String)>;

/// Every metric the agent exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// kubeproxy_sync_proxy_rules_duration_seconds: every sync, rendering and kernel apply.
    pub sync_duration: Histogram,
    /// kubeproxy_sync_full_proxy_rules_duration_seconds.
    pub full_sync_duration: Histogram,
    /// kubeproxy_sync_partial_proxy_rules_duration_seconds.
    pub partial_sync_duration: Histogram,
    /// kubeproxy_network_programming_duration_seconds: from an EndpointSlice's trigger time to the
    /// sync that put its change into the kernel.
    pub network_programming_duration: Histogram,
    /// kubeproxy_sync_proxy_rules_last_timestamp_seconds: the last successful sync.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds: the last change queued for a sync.
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    /// kubeproxy_sync_proxy_rules_endpoint_changes_total.
    pub endpoint_changes: Counter,
    /// kubeproxy_sync_proxy_rules_service_changes_total.
    pub service_changes: Counter,
    /// fleetproxy_agent_rules{mode}: rules of ours read back from the kernel. kube-proxy has only an
    /// iptables-specific name (kubeproxy_sync_proxy_rules_iptables_total{table}) for this.
    pub kernel_rules: Family<Labels, Gauge>,
    /// fleetproxy_agent_sync_failures_total{mode}.
    pub sync_failures: Family<Labels, Counter>,
    /// fleetproxy_agent_mode_switches_total{from,to}.
    pub mode_switches: Family<Labels, Counter>,
    /// fleetproxy_agent_api_writes_total{resource}: every write this agent makes to the API server.
    pub api_writes: Family<Labels, Counter>,
    /// fleetproxy_agent_active_mode{mode}: 1 for the mode whose rules are in the kernel.
    pub active_mode: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// kube-proxy's buckets for sync durations: 1ms to about 16s.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's buckets for network programming latency: 0.25s to 5 minutes.
fn latency_buckets() -> Histogram {
    Histogram::new(
        linear_buckets(0.25, 0.25, 2)
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7)),
    )
}

pub fn mode_label(mode: ProxyMode) -> Labels {
    vec![("mode".to_owned(), mode.as_str().to_owned())]
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            sync_duration: sync_buckets(),
            full_sync_duration: sync_buckets(),
            partial_sync_duration: sync_buckets(),
            network_programming_duration: latency_buckets(),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            kernel_rules: Family::default(),
            sync_failures: Family::default(),
            mode_switches: Family::default(),
            api_writes: Family::default(),
            active_mode: Family::default(),
            registry: Registry::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            metrics.full_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            metrics.partial_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            metrics.network_programming_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            metrics.last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            metrics.last_queued_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            metrics.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            metrics.service_changes.clone(),
        );
        registry.register(
            "fleetproxy_agent_rules",
            "Rules of ours in the kernel, read back after the last sync",
            metrics.kernel_rules.clone(),
        );
        registry.register(
            "fleetproxy_agent_sync_failures",
            "Syncs that failed, by mode",
            metrics.sync_failures.clone(),
        );
        registry.register(
            "fleetproxy_agent_mode_switches",
            "Completed switches from one mode to another",
            metrics.mode_switches.clone(),
        );
        registry.register(
            "fleetproxy_agent_api_writes",
            "Writes this agent made to the API server, by resource",
            metrics.api_writes.clone(),
        );
        registry.register(
            "fleetproxy_agent_active_mode",
            "1 for the mode whose rules are in the kernel",
            metrics.active_mode.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Marks `mode` as the active one (and no other).
    pub fn set_active_mode(&self, mode: ProxyMode) {
        for other in ProxyMode::ALL {
            self.active_mode.get_or_create(&mode_label(other)).set(i64::from(other == mode));
        }
    }

    /// Records the rules read back for the active `mode`; every other mode reads 0, its objects having
    /// been removed from the kernel (a failed removal shows in the ProxyNode's Ready condition).
    pub fn set_kernel_rules(&self, mode: ProxyMode, count: u64) {
        for other in ProxyMode::ALL {
            let value = if other == mode { i64::try_from(count).unwrap_or(i64::MAX) } else { 0 };
            self.kernel_rules.get_or_create(&mode_label(other)).set(value);
        }
    }

    pub fn count_api_write(&self, resource: &str) {
        self.api_writes.get_or_create(&vec![("resource".to_owned(), resource.to_owned())]).inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_kube_proxys_names() {
        let metrics = Metrics::new();
        metrics.sync_duration.observe(0.01);
        metrics.endpoint_changes.inc();
        metrics.set_active_mode(ProxyMode::Nftables);
        metrics.count_api_write("proxynodes/status");
        let text = metrics.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "fleetproxy_agent_active_mode{mode=\"nftables\"} 1",
            "fleetproxy_agent_active_mode{mode=\"iptables\"} 0",
            "fleetproxy_agent_api_writes_total{resource=\"proxynodes/status\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
