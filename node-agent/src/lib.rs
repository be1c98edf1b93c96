//! fleetproxy-agent: the per-node proxy. Watches Services and EndpointSlices, turns them into a
//! model ([`model`]), decides once per sync what every service port does on this node ([`policy`]),
//! and programs the kernel through one of the data planes ([`dataplane`]).

pub mod dataplane;
pub mod exec;
pub mod iptables;
pub mod model;
pub mod nftables;
pub mod policy;
pub mod tracker;
