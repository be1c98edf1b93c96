//! The CRD YAML the chart installs must be exactly what the types generate.

use std::path::PathBuf;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetproxy/crds");
    for crd in fleetproxy_api::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let generated = fleetproxy_api::crd_yaml(&crd).expect("CRD serializes");
        let path = dir.join(format!("{name}.yaml"));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
        assert!(
            committed == generated,
            "{} is stale: run `cargo run -p fleetproxy-api --bin crdgen` and commit the result",
            path.display()
        );
    }
}
