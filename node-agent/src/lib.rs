//! fleetproxy-agent: the per-node proxy. Watches Services and EndpointSlices, turns them into a
//! model ([`model`]), decides once per sync what every service port does on this node ([`policy`]),
//! and programs the kernel through one of the data planes ([`dataplane`]).
//!
//! The process itself is [`agent::run`]: watches ([`tracker`], [`node`]), settings ([`settings`]),
//! the sync loop's timing ([`sync`]), backend dispatch ([`backend`]), ProxyNode status
//! ([`proxynode`]) and kube-proxy's HTTP endpoints ([`serve`], [`health`], [`metrics`]).

pub mod agent;
pub mod backend;
pub mod cli;
pub mod dataplane;
pub mod error;
pub mod exec;
pub mod health;
pub mod iptables;
pub mod ipvs;
pub mod metrics;
pub mod model;
pub mod nftables;
pub mod node;
pub mod policy;
pub mod proxynode;
pub mod serve;
pub mod settings;
pub mod sync;
pub mod tracker;
