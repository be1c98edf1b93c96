//! The `fleetproxy.io/v1alpha1` API.
//!
//! [`ProxyConfig`] is the user's intent for a set of nodes; [`ProxyNode`] is what the operator asks of
//! one node and what that node's agent reports back. Both share [`ProxySettings`], which is validated
//! twice: by the API server (OpenAPI schema and CEL rules generated from these types) and again by the
//! agent ([`ProxySettings::validate`]) before it touches the kernel.

mod crd;
mod duration;
mod net;
mod proxyconfig;
mod proxynode;
mod settings;

pub use crd::{all_crds, crd_yaml};
pub use duration::{DurationError, GoDuration};
pub use net::{Cidr, CidrError, NodePortAddress};
pub use proxyconfig::{
    NodeEntry, ProxyConfig, ProxyConfigSpec, ProxyConfigStatus, RolloutSpec, Summary, condition_types,
};
pub use proxynode::{
    Capabilities, ProxyNode, ProxyNodeSpec, ProxyNodeStatus, SyncState, node_condition_types,
};
pub use settings::{IpvsScheduler, IpvsSettings, ProxyMode, ProxySettings, SettingsError};

/// The API group of every fleetproxy resource.
pub const GROUP: &str = "fleetproxy.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
