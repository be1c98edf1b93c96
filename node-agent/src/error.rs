//! The agent's one error type: what can stop the agent process. Sync failures are not in it: the
//! sync loop reports and retries them.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot load the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("cannot find a Kubernetes configuration (in-cluster or $KUBECONFIG): {0}")]
    InferConfig(#[from] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Settings(#[from] fleetproxy_api::SettingsError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the {0} signal handler: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}
