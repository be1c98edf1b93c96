//! The fleetproxy.io API as a real kube-apiserver serves it: the CRDs install, defaults are applied
//! by the server, invalid input is refused by the server with a message that says what to fix, the
//! printer columns, and the status subresource.

use anyhow::{Context, bail, ensure};
use fleetproxy_api::{IpvsScheduler, ProxyConfig, ProxyConfigStatus, ProxyMode, ProxyNode, Summary};
use fleetproxy_tests::{control_plane, unique_name};
use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

fn dynamic_api<K: kube::Resource<DynamicType = ()>>(client: Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<K>(&()))
}

/// Creates an object of K's kind from raw JSON, bypassing the Rust types and their own validation.
async fn create_raw<K: kube::Resource<DynamicType = ()>>(
    client: Client,
    name: &str,
    spec: Value,
) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name},
        "spec": spec,
    }))
    .map_err(kube::Error::SerdeError)?;
    dynamic_api::<K>(client).create(&PostParams::default(), &object).await
}

async fn delete(api: &Api<DynamicObject>, name: &str) -> anyhow::Result<()> {
    api.delete(name, &DeleteParams::default()).await.with_context(|| format!("deleting {name}"))?;
    Ok(())
}

#[tokio::test]
async fn crds_install_and_are_established() -> anyhow::Result<()> {
    let client = control_plane().await?.client()?;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for (name, short) in [("proxyconfigs.fleetproxy.io", "pxc"), ("proxynodes.fleetproxy.io", "pxn")] {
        let crd = crds.get(name).await.with_context(|| format!("CRD {name}"))?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            ensure!(
                conditions.iter().any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: condition {wanted} is not True: {conditions:?}"
            );
        }
        ensure!(crd.spec.scope == "Cluster", "{name} is not cluster-scoped");
        ensure!(
            crd.spec.names.short_names.unwrap_or_default() == [short],
            "{name}: short name is not {short}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn empty_spec_gets_the_servers_defaults() -> anyhow::Result<()> {
    let client = control_plane().await?.client()?;
    let api = dynamic_api::<ProxyConfig>(client.clone());
    let name = unique_name("defaults");
    let created = create_raw::<ProxyConfig>(client.clone(), &name, json!({})).await?;
    let result = async {
        // The server's object, read as raw JSON, so that serde defaults cannot stand in for the server's.
        let spec = &created.data["spec"];
        let expected = json!({
            "mode": "iptables",
            "ipvs": {"scheduler": "rr"},
            "excludedCIDRs": [],
            "syncPeriod": "30s",
            "minSyncPeriod": "1s",
            "clusterCIDRs": [],
            "masqueradeAll": false,
            "masqueradeBit": 14,
            "nodePortAddresses": [],
            "nodeSelector": {},
            "rollout": {"maxUnavailable": 1, "paused": false},
        });
        ensure!(*spec == expected, "server defaults differ:\n got {spec:#}\nwant {expected:#}");
        let typed: ProxyConfig = Api::all(client).get(&name).await?;
        ensure!(typed.spec == Default::default(), "typed spec differs from Default: {:?}", typed.spec);
        Ok(())
    }
    .await;
    delete(&api, &name).await?;
    result
}

#[tokio::test]
async fn full_spec_round_trips_with_defaults_filled_in() -> anyhow::Result<()> {
    let client = control_plane().await?.client()?;
    let api = dynamic_api::<ProxyConfig>(client.clone());
    let name = unique_name("full");
    let spec = json!({
        "mode": "ipvs",
        "ipvs": {},
        "excludedCIDRs": ["10.0.0.0/24", "fd00:1::/64"],
        "syncPeriod": "1m30s",
        "clusterCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"],
        "masqueradeAll": true,
        "nodePortAddresses": ["192.168.0.0/16", "fd00:ff::/64"],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "rollout": {"maxUnavailable": "25%", "paused": true},
    });
    create_raw::<ProxyConfig>(client.clone(), &name, spec.clone()).await?;
    let result = async {
        let got = api.get(&name).await?.data["spec"].clone();
        let mut expected = spec;
        expected["ipvs"] = json!({"scheduler": "rr"});
        expected["minSyncPeriod"] = json!("1s");
        expected["masqueradeBit"] = json!(14);
        ensure!(got == expected, "spec changed on the way:\n got {got:#}\nwant {expected:#}");

        let typed: ProxyConfig = Api::all(client).get(&name).await?;
        let settings = &typed.spec.settings;
        ensure!(settings.mode == ProxyMode::Ipvs);
        ensure!(settings.ipvs.scheduler == IpvsScheduler::Rr);
        ensure!(settings.sync_period.as_duration().as_secs() == 90);
        ensure!(settings.min_sync_period.as_duration().as_secs() == 1);
        ensure!(settings.excluded_cidrs.len() == 2 && settings.cluster_cidrs.len() == 2);
        ensure!(typed.spec.rollout.max_unavailable == IntOrString::String("25%".into()));
        ensure!(typed.spec.rollout.paused);
        settings.validate()?;
        Ok(())
    }
    .await;
    delete(&api, &name).await?;
    result
}

/// One invalid spec: where it goes wrong, and what the refusal must say.
struct Invalid {
    case: &'static str,
    spec: Value,
    /// The field the message must name.
    field: &'static str,
    /// What the message must say.
    message: &'static str,
}

fn invalid(case: &'static str, spec: Value, field: &'static str, message: &'static str) -> Invalid {
    Invalid { case, spec, field, message }
}

fn invalid_proxyconfig_specs() -> Vec<Invalid> {
    const NOT_CIDR: &str = "must be a CIDR: an address and prefix length such as 10.0.0.0/24 or fd00::/64";
    const NOT_DURATION: &str = "must be a positive duration with a unit, such as 500ms, 30s, 1m or 1h30m";
    const MAX_UNAVAILABLE: &str =
        "maxUnavailable must be a count of at least 1 or a percentage from 1% to 100%";
    let too_many: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
    vec![
        invalid(
            "IPv4 prefix too long",
            json!({"excludedCIDRs": ["10.0.0.0/33"]}),
            "spec.excludedCIDRs[0]",
            NOT_CIDR,
        ),
        invalid(
            "IPv4 octet > 255",
            json!({"excludedCIDRs": ["10.0.0.256/24"]}),
            "spec.excludedCIDRs[0]",
            NOT_CIDR,
        ),
        invalid(
            "no prefix length",
            json!({"excludedCIDRs": ["10.0.0.0"]}),
            "spec.excludedCIDRs[0]",
            NOT_CIDR,
        ),
        invalid(
            "IPv6 prefix too long",
            json!({"excludedCIDRs": ["fd00::/129"]}),
            "spec.excludedCIDRs[0]",
            NOT_CIDR,
        ),
        invalid("IPv6 zone", json!({"clusterCIDRs": ["fe80::/10%eth0"]}), "spec.clusterCIDRs[0]", NOT_CIDR),
        invalid(
            "junk CIDR",
            json!({"excludedCIDRs": ["10.0.0.0/8", "junk"]}),
            "spec.excludedCIDRs[1]",
            NOT_CIDR,
        ),
        invalid(
            "IPv4 host bits",
            json!({"excludedCIDRs": ["10.0.0.1/24"]}),
            "spec.excludedCIDRs[0]",
            "has host bits set or is not in canonical form: write 10.0.0.0/24",
        ),
        invalid(
            "IPv6 host bits",
            json!({"clusterCIDRs": ["2001:db8::1/32"]}),
            "spec.clusterCIDRs[0]",
            "has host bits set or is not in canonical form: write 2001:db8::/32",
        ),
        invalid(
            "nodePort IPv4 host bits",
            json!({"nodePortAddresses": ["192.168.1.1/16"]}),
            "spec.nodePortAddresses[0]",
            "write 192.168.0.0/16",
        ),
        invalid(
            "unknown mode",
            json!({"mode": "userspace"}),
            "spec.mode",
            r#"Unsupported value: "userspace": supported values: "iptables", "ipvs", "nftables""#,
        ),
        invalid(
            "unknown scheduler",
            json!({"mode": "ipvs", "ipvs": {"scheduler": "fifo"}}),
            "spec.ipvs.scheduler",
            r#"Unsupported value: "fifo": supported values: "rr", "wrr""#,
        ),
        invalid(
            "maxUnavailable 0",
            json!({"rollout": {"maxUnavailable": 0}}),
            "spec.rollout.maxUnavailable",
            MAX_UNAVAILABLE,
        ),
        invalid(
            "maxUnavailable -1",
            json!({"rollout": {"maxUnavailable": -1}}),
            "spec.rollout.maxUnavailable",
            MAX_UNAVAILABLE,
        ),
        invalid(
            "maxUnavailable 0%",
            json!({"rollout": {"maxUnavailable": "0%"}}),
            "spec.rollout.maxUnavailable",
            MAX_UNAVAILABLE,
        ),
        invalid(
            "maxUnavailable 101%",
            json!({"rollout": {"maxUnavailable": "101%"}}),
            "spec.rollout.maxUnavailable",
            MAX_UNAVAILABLE,
        ),
        invalid(
            "maxUnavailable abc",
            json!({"rollout": {"maxUnavailable": "abc"}}),
            "spec.rollout.maxUnavailable",
            MAX_UNAVAILABLE,
        ),
        invalid("negative syncPeriod", json!({"syncPeriod": "-5s"}), "spec.syncPeriod", NOT_DURATION),
        invalid(
            "minSyncPeriod without unit",
            json!({"minSyncPeriod": "30"}),
            "spec.minSyncPeriod",
            NOT_DURATION,
        ),
        invalid("syncPeriod 0s", json!({"syncPeriod": "0s"}), "spec", "syncPeriod must be longer than 0s"),
        invalid(
            "minSyncPeriod > syncPeriod",
            json!({"syncPeriod": "10s", "minSyncPeriod": "1m"}),
            "spec",
            "minSyncPeriod must not be longer than syncPeriod",
        ),
        invalid(
            "masqueradeBit 32",
            json!({"masqueradeBit": 32}),
            "spec.masqueradeBit",
            "should be less than or equal to 31",
        ),
        invalid(
            "masqueradeBit -1",
            json!({"masqueradeBit": -1}),
            "spec.masqueradeBit",
            "should be greater than or equal to 0",
        ),
        invalid(
            "two IPv4 clusterCIDRs",
            json!({"clusterCIDRs": ["10.0.0.0/8", "172.16.0.0/12"]}),
            "spec.clusterCIDRs",
            "clusterCIDRs takes at most one IPv4 and one IPv6 CIDR",
        ),
        invalid(
            "primary with a CIDR",
            json!({"nodePortAddresses": ["primary", "10.0.0.0/8"]}),
            "spec.nodePortAddresses",
            "'primary' must be the only entry of nodePortAddresses",
        ),
        invalid(
            "bogus nodePortAddress",
            json!({"nodePortAddresses": ["bogus"]}),
            "spec.nodePortAddresses[0]",
            "must be 'primary' or a CIDR such as 192.168.0.0/16 or fd00::/64",
        ),
        invalid(
            "65 excludedCIDRs",
            json!({"excludedCIDRs": too_many}),
            "spec.excludedCIDRs",
            "must have at most 64 items",
        ),
    ]
}

/// Creates the object and checks that the server refuses it as the case says; Ok(problem) otherwise.
async fn expect_refusal<K: kube::Resource<DynamicType = ()>>(
    client: Client,
    case: &Invalid,
) -> anyhow::Result<Option<String>> {
    let name = unique_name("invalid");
    let problem = match create_raw::<K>(client.clone(), &name, case.spec.clone()).await {
        Ok(_) => {
            delete(&dynamic_api::<K>(client), &name).await?;
            "was accepted".to_owned()
        }
        Err(kube::Error::Api(status)) if status.code == 422 => {
            let message = &status.message;
            // A CEL rule that failed to evaluate tells the user nothing; each rule must guard its inputs.
            let cel_error = ["type conversion error", "no such overload", "evaluating rule"]
                .into_iter()
                .find(|error| message.contains(error));
            if let Some(error) = cel_error {
                format!("message {message:?} has a CEL evaluation error ({error:?})")
            } else if message.contains(case.message) && message.contains(case.field) {
                return Ok(None);
            } else {
                format!("message {message:?} lacks {:?} or field {:?}", case.message, case.field)
            }
        }
        Err(other) => format!("failed otherwise than with 422: {other}"),
    };
    Ok(Some(format!("{} {}: {problem}", K::kind(&()), case.case)))
}

#[tokio::test]
async fn invalid_specs_are_refused_with_a_message_that_says_what_to_fix() -> anyhow::Result<()> {
    let client = control_plane().await?.client()?;
    let cases = invalid_proxyconfig_specs();
    assert!(cases.len() >= 22);
    let mut problems = Vec::new();
    for case in &cases {
        problems.extend(expect_refusal::<ProxyConfig>(client.clone(), case).await?);
    }
    // ProxyNode shares the settings and their rules.
    let node_cases = [
        invalid(
            "unknown mode",
            json!({"mode": "bogus"}),
            "spec.mode",
            r#"Unsupported value: "bogus": supported values: "iptables", "ipvs", "nftables""#,
        ),
        invalid(
            "IPv4 host bits",
            json!({"excludedCIDRs": ["10.1.2.3/8"]}),
            "spec.excludedCIDRs[0]",
            "write 10.0.0.0/8",
        ),
    ];
    for case in &node_cases {
        problems.extend(expect_refusal::<ProxyNode>(client.clone(), case).await?);
    }
    if !problems.is_empty() {
        bail!(
            "{} of {} invalid specs not refused as expected:\n{}",
            problems.len(),
            cases.len() + node_cases.len(),
            problems.join("\n")
        );
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_get_proxyconfig_shows_the_columns() -> anyhow::Result<()> {
    let control_plane = control_plane().await?;
    let client = control_plane.client()?;
    let api = dynamic_api::<ProxyConfig>(client.clone());
    let name = unique_name("columns");
    create_raw::<ProxyConfig>(client.clone(), &name, json!({"mode": "nftables"})).await?;
    let result = async {
        let typed: Api<ProxyConfig> = Api::all(client);
        let status = json!({"status": {"summary": {"nodes": 3, "updated": 2, "ready": 1}}});
        typed.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;

        let mut kubectl = tokio::process::Command::from(control_plane.kubectl());
        let output = kubectl.args(["get", "proxyconfig", &name]).output().await.context("running kubectl")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&output.stderr));
        let lines: Vec<Vec<&str>> = stdout.lines().map(|line| line.split_whitespace().collect()).collect();
        ensure!(lines.len() == 2, "expected a header and one row:\n{stdout}");
        ensure!(lines[0] == ["NAME", "MODE", "UPDATED", "READY", "AGE"], "header:\n{stdout}");
        ensure!(lines[1][..4] == [name.as_str(), "nftables", "2", "1"], "row:\n{stdout}");

        // The short name and the category work too.
        for resource in ["pxc", "fleetproxy"] {
            let mut kubectl = tokio::process::Command::from(control_plane.kubectl());
            let output = kubectl.args(["get", resource, "-o", "name"]).output().await?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            ensure!(
                stdout.contains(&format!("proxyconfig.fleetproxy.io/{name}")),
                "kubectl get {resource}:\n{stdout}"
            );
        }
        Ok(())
    }
    .await;
    delete(&api, &name).await?;
    result
}

#[tokio::test]
async fn status_changes_only_through_the_status_subresource() -> anyhow::Result<()> {
    let client = control_plane().await?.client()?;
    let api: Api<ProxyConfig> = Api::all(client.clone());
    let name = unique_name("status");
    let mut config = ProxyConfig::new(&name, Default::default());
    config.status =
        Some(ProxyConfigStatus { summary: Summary { nodes: 5, ..Default::default() }, ..Default::default() });
    let created = api.create(&PostParams::default(), &config).await?;
    let result = async {
        ensure!(created.status.is_none(), "status set on create: {:?}", created.status);

        // A status in an update of the main resource is dropped; the spec change goes through.
        let mut update = created.clone();
        update.spec.settings.mode = ProxyMode::Nftables;
        update.status = Some(ProxyConfigStatus { observed_generation: Some(7), ..Default::default() });
        let updated = api.replace(&name, &PostParams::default(), &update).await?;
        ensure!(updated.spec.settings.mode == ProxyMode::Nftables);
        ensure!(updated.status.is_none(), "status set through the main resource: {:?}", updated.status);
        let generation = updated.metadata.generation;

        // Through the subresource the status is written, and a spec change rides along for nothing.
        let patch = json!({
            "spec": {"mode": "ipvs"},
            "status": {"observedGeneration": 2, "summary": {"nodes": 4, "updated": 3, "ready": 2}},
        });
        let patched = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let status = patched.status.context("no status after patch_status")?;
        ensure!(status.observed_generation == Some(2));
        ensure!(status.summary.nodes == 4 && status.summary.updated == 3 && status.summary.ready == 2);
        ensure!(
            patched.spec.settings.mode == ProxyMode::Nftables,
            "spec changed through the status subresource"
        );
        ensure!(patched.metadata.generation == generation, "generation moved on a status write");
        ensure!(api.get(&name).await?.status == Some(status));
        Ok(())
    }
    .await;
    api.delete(&name, &DeleteParams::default()).await?;
    result
}

#[tokio::test]
async fn proxynode_round_trips_and_shares_the_defaults() -> anyhow::Result<()> {
    let client = control_plane().await?.client()?;
    let api = dynamic_api::<ProxyNode>(client.clone());
    let name = unique_name("node");
    let created =
        create_raw::<ProxyNode>(client.clone(), &name, json!({"mode": "nftables", "configName": "default"}))
            .await?;
    let result = async {
        let spec = &created.data["spec"];
        ensure!(
            spec["mode"] == "nftables" && spec["syncPeriod"] == "30s" && spec["masqueradeBit"] == 14,
            "{spec:#}"
        );
        let typed: ProxyNode = Api::all(client).get(&name).await?;
        ensure!(typed.spec.config_name == "default" && typed.name_any() == name);
        Ok(())
    }
    .await;
    delete(&api, &name).await?;
    result
}
