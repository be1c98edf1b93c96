//! Reading our objects back from `nft -j -t` (JSON) listings of chains, sets and maps: which exist,
//! for a full sync to delete what it no longer wants. (Tables and the rule count come over netlink:
//! [`super::count`].)

use serde_json::Value;

use super::render::{KernelObjects, Table};

/// The objects of the `nftables` array of `nft -j` output, in order.
fn objects(json: &str) -> Result<Vec<Value>, String> {
    let mut value: Value = serde_json::from_str(json).map_err(|e| format!("invalid JSON from nft: {e}"))?;
    match value.get_mut("nftables").map(Value::take) {
        Some(Value::Array(items)) => Ok(items),
        _ => Err("nft JSON output has no \"nftables\" array".to_owned()),
    }
}

/// The names of our chains, sets and maps in all our tables of both families, from `nft -j` listings of chains,
/// sets and maps (of every table: only ours are kept).
pub fn kernel_objects(listings: &[String]) -> Result<KernelObjects, String> {
    let mut kernel = KernelObjects::default();
    for listing in listings {
        for object in objects(listing)? {
            let (kind, value) = match object.as_object().and_then(|o| o.iter().next()) {
                Some((kind, value)) => (kind.as_str(), value),
                None => continue,
            };
            let family = value.get("family").and_then(Value::as_str).unwrap_or_default();
            let name = value.get("table").and_then(Value::as_str).unwrap_or_default();
            let Some(table) = Table::parse(family, name) else { continue };
            let table = kernel.table_mut(table);
            let Some(name) = value.get("name").and_then(Value::as_str).map(str::to_owned) else { continue };
            match kind {
                "chain" => table.chains.insert(name),
                "set" => table.sets.insert(name),
                "map" => table.maps.insert(name),
                _ => false,
            };
        }
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IpFamily;

    const LISTING: &str = r#"{"nftables": [
      {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "fleetproxy", "handle": 1}},
      {"set": {"family": "ip", "name": "affinity-X", "table": "fleetproxy", "type": "ipv4_addr",
               "flags": ["timeout"], "timeout": 300, "elem": [{"elem": {"val": "9.9.9.9", "timeout": 100}}]}},
      {"set": {"family": "ip", "name": "excluded-cidrs", "table": "fleetproxy", "type": "ipv4_addr",
               "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 24}}]}},
      {"map": {"family": "ip", "name": "service-ips", "table": "fleetproxy", "map": "verdict",
               "elem": [[{"concat": ["10.96.0.1", "tcp", 80]}, {"goto": {"target": "service-A"}}]]}},
      {"map": {"family": "ip", "name": "firewall-ips", "table": "fleetproxy", "map": "verdict"}},
      {"chain": {"family": "ip", "table": "fleetproxy", "name": "services", "handle": 3}},
      {"rule": {"family": "ip", "table": "fleetproxy", "chain": "services", "handle": 4, "expr": []}},
      {"rule": {"family": "ip", "table": "fleetproxy", "chain": "services", "handle": 5, "expr": []}}
    ]}"#;

    #[test]
    fn lists_our_object_names_per_family() {
        let chains = r#"{"nftables": [{"metainfo": {}},
            {"chain": {"family": "ip", "table": "fleetproxy", "name": "services"}},
            {"chain": {"family": "ip6", "table": "fleetproxy", "name": "services6"}},
            {"chain": {"family": "ip", "table": "fleetproxy-services-3", "name": "service-B"}},
            {"chain": {"family": "ip", "table": "fleetproxy-services-12", "name": "old"}},
            {"chain": {"family": "ip", "table": "fleetproxy-services-03", "name": "not-ours"}},
            {"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING"}}]}"#;
        let k = kernel_objects(&[LISTING.to_owned(), chains.to_owned()]).expect("parses");
        let v4 = k.get(Table::main(IpFamily::V4));
        assert_eq!(v4.chains.iter().collect::<Vec<_>>(), ["services"]);
        assert_eq!(k.get(Table::main(IpFamily::V6)).chains.iter().collect::<Vec<_>>(), ["services6"]);
        assert_eq!(k.get(Table::shard(IpFamily::V4, 3)).chains.iter().collect::<Vec<_>>(), ["service-B"]);
        assert!(k.get(Table::shard(IpFamily::V4, 12)).chains.contains("old"));
        assert!(v4.sets.contains("affinity-X") && v4.sets.contains("excluded-cidrs"));
        assert!(v4.maps.contains("service-ips") && v4.maps.contains("firewall-ips"));
        assert_eq!(k.tables.len(), 4, "{k:?}");
    }
}
