//! Reading our tables back from `nft -j` (JSON) output: what to count for the status rule count,
//! and which objects exist for a full sync to delete.

use serde_json::Value;

use super::render::{TABLE, TableObjects};

/// The objects of the `nftables` array of `nft -j` output, in order.
fn objects(json: &str) -> Result<Vec<Value>, String> {
    let mut value: Value = serde_json::from_str(json).map_err(|e| format!("invalid JSON from nft: {e}"))?;
    match value.get_mut("nftables").map(Value::take) {
        Some(Value::Array(items)) => Ok(items),
        _ => Err("nft JSON output has no \"nftables\" array".to_owned()),
    }
}

/// The families (`ip`, `ip6`) in which our table exists, from `nft -j list tables`.
pub fn our_tables(json: &str) -> Result<Vec<String>, String> {
    Ok(objects(json)?
        .iter()
        .filter_map(|o| o.get("table"))
        .filter(|t| t.get("name").and_then(Value::as_str) == Some(TABLE))
        .filter_map(|t| t.get("family").and_then(Value::as_str).map(str::to_owned))
        .collect())
}

/// Whether a set holds dynamic state (clients pinned by affinity) rather than rules.
fn is_dynamic(set: &Value) -> bool {
    set.get("flags")
        .and_then(Value::as_array)
        .is_some_and(|flags| flags.iter().any(|f| matches!(f.as_str(), Some("dynamic" | "timeout"))))
}

/// What one table holds that counts as rules: every rule, every element of a verdict map and of a
/// static set. Elements of affinity sets are clients, not rules, and are left out.
pub fn count_rules(json: &str) -> Result<u64, String> {
    let mut count = 0u64;
    for object in objects(json)? {
        if object.get("rule").is_some() {
            count += 1;
        } else if let Some(set) = object.get("map").or_else(|| object.get("set")) {
            if !is_dynamic(set) {
                count += set.get("elem").and_then(Value::as_array).map_or(0, |e| e.len() as u64);
            }
        }
    }
    Ok(count)
}

/// The names of the chains, sets and maps of one table (from `nft -j -t list table ...`).
pub fn table_objects(json: &str) -> Result<TableObjects, String> {
    let mut table = TableObjects::default();
    let name = |v: &Value| v.get("name").and_then(Value::as_str).map(str::to_owned);
    for object in objects(json)? {
        if let Some(n) = object.get("chain").and_then(name) {
            table.chains.insert(n);
        } else if let Some(n) = object.get("set").and_then(name) {
            table.sets.insert(n);
        } else if let Some(n) = object.get("map").and_then(name) {
            table.maps.insert(n);
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn counts_rules_and_static_elements_only() {
        assert_eq!(count_rules(LISTING).expect("parses"), 4);
    }

    #[test]
    fn lists_object_names() {
        let t = table_objects(LISTING).expect("parses");
        assert!(t.chains.contains("services"));
        assert!(t.sets.contains("affinity-X") && t.sets.contains("excluded-cidrs"));
        assert!(t.maps.contains("service-ips") && t.maps.contains("firewall-ips"));
    }

    #[test]
    fn finds_our_tables_only() {
        let json = r#"{"nftables": [{"metainfo": {}},
            {"table": {"family": "ip", "name": "fleetproxy"}},
            {"table": {"family": "inet", "name": "filter"}},
            {"table": {"family": "ip6", "name": "fleetproxy"}}]}"#;
        assert_eq!(our_tables(json).expect("parses"), vec!["ip", "ip6"]);
        assert!(count_rules("not json").is_err());
    }
}
