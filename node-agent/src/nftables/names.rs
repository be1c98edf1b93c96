//! Names of the per-service objects: deterministic, valid nft identifiers, within the kernel's limits.
//!
//! Like kube-proxy's, a name carries a short hash of what it stands for (so that sanitizing or
//! truncating the readable part can never make two objects share a name) followed by the readable
//! part: `service-5OJB2KTY-ns/svc/tcp/http`, `endpoint-Q3W2VJ6K-ns/svc/tcp/http__10.1.0.5/8080`.

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use crate::{model::ServicePortName, policy::ServicePlan};

/// The kernel allows 255 bytes for chain and set names; staying well below leaves room for changes.
const MAX_NAME: usize = 200;

/// 64-bit FNV-1a: small, stable across releases and platforms (unlike `std`'s hasher).
fn fnv1a(data: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The first 40 bits of the hash of `data`, in RFC 4648 base32 (8 characters, `A-Z2-7`).
pub fn short_hash(data: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = fnv1a(data);
    (0..8).map(|i| char::from(ALPHABET[((hash >> (59 - 5 * i)) & 31) as usize])).collect()
}

/// Keeps the characters nft accepts in an unquoted identifier (`[A-Za-z0-9/_.-]`): `:` (IPv6)
/// becomes `.`, anything else `_`.
fn sanitize(readable: &str) -> String {
    readable
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '/' | '_' | '.' | '-' => c,
            ':' => '.',
            _ => '_',
        })
        .collect()
}

/// `prefix-HASH-readable`, truncated to the length limit.
fn name(prefix: &str, identity: &str, readable: &str) -> String {
    let mut out = format!("{prefix}-{}-{}", short_hash(identity), sanitize(readable));
    if out.len() > MAX_NAME {
        // Only ASCII is left after sanitizing, so any byte index is a character boundary.
        out.truncate(MAX_NAME);
    }
    out
}

/// `ns/name/proto/port-name` (or `p<number>` when the port has no name).
fn readable_port(plan: &ServicePlan) -> String {
    let ServicePortName { namespace, name, port, protocol } = &plan.name;
    let port = if port.is_empty() { format!("p{}", plan.port) } else { port.clone() };
    format!("{namespace}/{name}/{}/{port}", protocol.as_str())
}

fn identity(name: &ServicePortName) -> String {
    format!("{name}/{}", name.protocol.as_str())
}

fn endpoint_suffix(ip: IpAddr, port: u16) -> String {
    format!("__{ip}/{port}")
}

/// Which of `shards` service tables holds a service port's objects: stable across restarts and
/// releases, so that a restarted agent finds every object where it left it.
pub fn shard(name: &ServicePortName, shards: u8) -> u8 {
    u8::try_from(fnv1a(&identity(name)) % u64::from(shards.max(1))).unwrap_or(0)
}

/// The chain cluster-IP traffic of a service port goes to.
pub fn service_chain(plan: &ServicePlan) -> String {
    name("service", &identity(&plan.name), &readable_port(plan))
}

/// The chain node-port, external-IP and load-balancer traffic of a service port goes to.
pub fn external_chain(plan: &ServicePlan) -> String {
    name("external", &identity(&plan.name), &readable_port(plan))
}

/// The chain that applies loadBalancerSourceRanges.
pub fn firewall_chain(plan: &ServicePlan) -> String {
    name("firewall", &identity(&plan.name), &readable_port(plan))
}

/// The chain that DNATs to one endpoint of a service port.
pub fn endpoint_chain(plan: &ServicePlan, ip: IpAddr, port: u16) -> String {
    let suffix = endpoint_suffix(ip, port);
    name(
        "endpoint",
        &format!("{}{suffix}", identity(&plan.name)),
        &format!("{}{suffix}", readable_port(plan)),
    )
}

/// The set of clients pinned to one endpoint (sessionAffinity ClientIP). The timeout is part of the
/// identity: a changed timeout makes a new set rather than a conflicting redefinition.
pub fn affinity_set(plan: &ServicePlan, ip: IpAddr, port: u16, timeout: Duration) -> String {
    let suffix = endpoint_suffix(ip, port);
    let mut identity = format!("{}{suffix}", identity(&plan.name));
    let _ = write!(identity, "/{}", timeout.as_secs());
    name("affinity", &identity, &format!("{}{suffix}", readable_port(plan)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_short() {
        assert_eq!(short_hash("ns/svc:http/tcp"), short_hash("ns/svc:http/tcp"));
        assert_ne!(short_hash("ns/svc:http/tcp"), short_hash("ns/svc:http/udp"));
        assert_eq!(short_hash("x").len(), 8);
        assert!(short_hash("x").chars().all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)));
    }

    #[test]
    fn sanitizes_ipv6_and_truncates() {
        let long = "a".repeat(300);
        let n = name("endpoint", "id", &format!("{long}__fd00::1/80"));
        assert_eq!(n.len(), MAX_NAME);
        assert_eq!(sanitize("ns/svc/tcp/http__fd00::1/80"), "ns/svc/tcp/http__fd00..1/80");
        assert_eq!(sanitize("a b"), "a_b");
    }
}
