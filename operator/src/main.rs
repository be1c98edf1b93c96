//! fleetproxy-operator: reconciles ProxyConfigs, rolls out the node agents and moves the fleet
//! between proxy modes node by node.

mod controller;
mod daemonset;
mod leader;
mod metrics;
mod rollout;
mod selection;
mod status;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use crate::{daemonset::AgentSettings, leader::LeaderElector, metrics::Metrics};

/// Reconciles ProxyConfigs: rolls out the fleetproxy node agents and switches the fleet's proxy
/// mode node by node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kubeconfig to use; in-cluster configuration (or $KUBECONFIG, ~/.kube/config) when absent.
    #[arg(long, env = "FLEETPROXY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Namespace of the agent DaemonSet and of the leader Lease.
    #[arg(long, env = "FLEETPROXY_NAMESPACE", default_value = "kube-system")]
    namespace: String,

    /// Container image of the node agent.
    #[arg(
        long,
        env = "FLEETPROXY_AGENT_IMAGE",
        default_value = "ghcr.io/fleetproxy/fleetproxy-agent:latest"
    )]
    agent_image: String,

    /// Image pull policy of the node agent (Always, IfNotPresent, Never); the cluster's default when
    /// absent.
    #[arg(long, env = "FLEETPROXY_AGENT_IMAGE_PULL_POLICY")]
    agent_image_pull_policy: Option<String>,

    /// Service account the agents run as.
    #[arg(long, env = "FLEETPROXY_AGENT_SERVICE_ACCOUNT", default_value = "fleetproxy-agent")]
    agent_service_account: String,

    /// Where agents serve /metrics and /proxyMode.
    #[arg(long, env = "FLEETPROXY_AGENT_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249")]
    agent_metrics_bind_address: SocketAddr,

    /// Where agents serve /healthz and /livez; the DaemonSet's readiness probe uses its port.
    #[arg(long, env = "FLEETPROXY_AGENT_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    agent_healthz_bind_address: SocketAddr,

    /// Create and update the agent DaemonSet. Turn off when something else starts the agents.
    #[arg(long, env = "FLEETPROXY_MANAGE_DAEMONSET", default_value_t = true, action = clap::ArgAction::Set)]
    manage_daemonset: bool,

    /// Where the operator serves /metrics and /healthz.
    #[arg(long, env = "FLEETPROXY_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:8080")]
    metrics_bind_address: SocketAddr,

    /// Act only while holding the leader Lease, so that replicas never act together.
    #[arg(long, env = "FLEETPROXY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// Name of the leader Lease.
    #[arg(long, env = "FLEETPROXY_LEASE_NAME", default_value = "fleetproxy-operator")]
    lease_name: String,

    /// How long a burst of events about one ProxyConfig may go quiet before it is reconciled, in
    /// milliseconds: node reports arriving together are handled in one round and one status write.
    #[arg(long, env = "FLEETPROXY_RECONCILE_DEBOUNCE_MS", default_value_t = 1000)]
    reconcile_debounce_ms: u64,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "FLEETPROXY_LOG_JSON")]
    log_json: bool,
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no in-cluster configuration and no kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
}

/// This replica's name in the Lease and in Events: the pod's name where the chart sets it, and the
/// process id besides, so that two replicas on one host never share an identity.
fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()))
        .unwrap_or_else(|_| "fleetproxy-operator".to_owned());
    format!("{host}_{}", std::process::id())
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let client = client(args.kubeconfig.as_ref()).await?;
    let metrics = Arc::new(Metrics::default());
    metrics::serve(args.metrics_bind_address, metrics.clone())
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_bind_address))?;
    info!(address = %args.metrics_bind_address, "serving /metrics and /healthz");

    let identity = identity();
    let mut elector = args.leader_election.then(|| {
        LeaderElector::new(
            client.clone(),
            &args.namespace,
            &args.lease_name,
            identity.clone(),
            metrics.clone(),
        )
    });
    if let Some(elector) = elector.as_mut() {
        tokio::select! {
            () = elector.acquire() => {}
            () = termination() => {
                info!("terminated before leading");
                return Ok(());
            }
        }
    }

    let settings = controller::Settings {
        agent: args.manage_daemonset.then(|| AgentSettings {
            namespace: args.namespace.clone(),
            image: args.agent_image.clone(),
            image_pull_policy: args.agent_image_pull_policy.clone(),
            service_account: args.agent_service_account.clone(),
            metrics_bind_address: args.agent_metrics_bind_address,
            health_bind_address: args.agent_healthz_bind_address,
        }),
        debounce: Duration::from_millis(args.reconcile_debounce_ms),
        instance: identity,
    };
    info!(
        manage_daemonset = args.manage_daemonset,
        leader_election = args.leader_election,
        "starting the controller"
    );
    let controller = controller::run(client, settings, metrics);
    match elector.as_mut() {
        None => controller.await,
        Some(elector) => {
            tokio::select! {
                () = controller => {}
                lost = elector.keep() => {
                    // Dropping the controller stops every reconciliation at its next await point;
                    // exiting lets the pod restart and stand for election again.
                    error!(reason = %lost, "lost the leader Lease; stepping down");
                    return Err(lost.into());
                }
            }
            elector.release().await;
        }
    }
    info!("stopped");
    Ok(())
}
