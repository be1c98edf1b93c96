//! The Helm chart (charts/fleetproxy) with the real `helm` and `kubectl` against the real control plane:
//! lint, templates accepted by the API server (server-side dry run), install, upgrade and uninstall,
//! values refused by values.schema.json, least-privilege RBAC, and the admission policy that lets an
//! agent write only its own node's ProxyNode.
//!
//! helm and kubectl come from PATH, else from ~/.cache/fleetproxy/tools (scripts/setup.sh puts them
//! there). Every test installs its own release into its own namespace, with its own ProxyConfig name
//! (ProxyConfigs are cluster-scoped), so the tests run in parallel. The CRDs are cluster-scoped and
//! shared: the harness installs them; the chart's crds/ directory is exercised where they already exist.

use std::{
    ffi::OsStr,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use fleetproxy_tests::{ControlPlane, control_plane, unique_name};
use serde_json::{Value, json};

/// A tool from PATH, else from the project's tool cache; a clear failure when neither has it.
fn tool(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let cache = std::env::var_os("FLEETPROXY_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/fleetproxy")
    });
    let candidate = cache.join("tools").join(name);
    assert!(
        candidate.is_file(),
        "{name} is neither on PATH nor at {}; run scripts/setup.sh (it installs helm and kubectl)",
        candidate.display()
    );
    candidate
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetproxy")
}

fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Runs the command (with `stdin` fed to it, if any) and returns its output, whatever its exit status.
fn run(mut command: Command, stdin: Option<&str>) -> anyhow::Result<Output> {
    let what = describe(&command);
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("starting {what}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("stdin")?;
        pipe.write_all(input.as_bytes()).with_context(|| format!("writing to {what}"))?;
    }
    child.wait_with_output().with_context(|| format!("running {what}"))
}

/// Runs the command and returns its stdout; fails with its stderr when it fails.
fn ok(command: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let what = describe(&command);
    let output = run(command, stdin)?;
    ensure!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs the command, which must fail; returns its stderr.
fn refused(command: Command) -> anyhow::Result<String> {
    let what = describe(&command);
    let output = run(command, None)?;
    ensure!(!output.status.success(), "{what} succeeded but should have been refused");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

fn helm(cp: Option<&ControlPlane>) -> Command {
    let mut command = Command::new(tool("helm"));
    if let Some(cp) = cp {
        command.arg("--kubeconfig").arg(cp.kubeconfig());
    }
    command
}

fn kubectl(cp: &ControlPlane) -> Command {
    let mut command = Command::new(tool("kubectl"));
    command.arg("--kubeconfig").arg(cp.kubeconfig());
    command
}

fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut command: Command, args: I) -> Command {
    command.args(args);
    command
}

/// `kubectl get -o json`, or None when the object does not exist.
fn get_json(
    cp: &ControlPlane,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
) -> anyhow::Result<Option<Value>> {
    let mut command = args(kubectl(cp), ["get", kind, name, "-o", "json", "--ignore-not-found"]);
    if let Some(ns) = namespace {
        command.args(["-n", ns]);
    }
    let out = ok(command, None)?;
    if out.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&out).with_context(|| format!("parsing {kind}/{name}"))?))
}

/// A release of the chart under test, in a namespace of its own, with a ProxyConfig of its own.
/// Dropping it uninstalls the release and deletes the namespace (best effort, without waiting).
struct Release {
    cp: &'static ControlPlane,
    name: String,
    namespace: String,
    proxy_config: String,
}

impl Release {
    /// Names and a namespace, nothing installed yet.
    fn new(cp: &'static ControlPlane, prefix: &str) -> anyhow::Result<Self> {
        let release = Self {
            cp,
            name: unique_name(prefix),
            namespace: unique_name(&format!("{prefix}-ns")),
            proxy_config: unique_name(&format!("{prefix}-pc")),
        };
        ok(args(kubectl(cp), ["create", "namespace", &release.namespace]), None)?;
        Ok(release)
    }

    fn agent(&self) -> String {
        format!("{}-agent", self.name)
    }

    fn operator(&self) -> String {
        format!("{}-operator", self.name)
    }

    /// `helm <verb> NAME CHART -n NS --set proxyConfig.name=...` plus `extra`.
    fn helm(&self, verb: &str, extra: &[&str]) -> Command {
        let mut command = helm(Some(self.cp));
        command.arg(verb).arg(&self.name).arg(chart_dir()).args(["-n", &self.namespace]);
        command.arg("--set").arg(format!("proxyConfig.name={}", self.proxy_config));
        command.args(extra);
        command
    }

    fn install(&self, extra: &[&str]) -> anyhow::Result<String> {
        ok(self.helm("install", extra), None)
    }

    fn uninstall(&self) -> anyhow::Result<String> {
        ok(args(helm(Some(self.cp)), ["uninstall", &self.name, "-n", &self.namespace]), None)
    }

    fn service_account(&self, name: &str) -> String {
        format!("system:serviceaccount:{}:{name}", self.namespace)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = run(
            args(helm(Some(self.cp)), ["uninstall", &self.name, "-n", &self.namespace, "--ignore-not-found"]),
            None,
        );
        let _ = run(
            args(
                kubectl(self.cp),
                ["delete", "namespace", &self.namespace, "--wait=false", "--ignore-not-found"],
            ),
            None,
        );
        let _ = run(
            args(
                kubectl(self.cp),
                ["delete", "proxyconfig", &self.proxy_config, "--wait=false", "--ignore-not-found"],
            ),
            None,
        );
    }
}

/// Polls `check` until it returns Ok(true), or fails after `timeout` with `what`.
fn eventually(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} (waited {timeout:?})");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn lint_is_clean_also_strict() -> anyhow::Result<()> {
    let chart = chart_dir();
    for strict in [false, true] {
        let mut command = args(helm(None), [OsStr::new("lint"), chart.as_os_str()]);
        if strict {
            command.arg("--strict");
        }
        let out = ok(command, None)?;
        ensure!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "helm lint (strict {strict}):\n{out}");
        ensure!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "helm lint (strict {strict}):\n{out}"
        );
    }
    Ok(())
}

/// `helm template` with `values`, applied with a server-side dry run; returns the objects the server
/// would have stored (with its defaults).
fn template_dry_run(release: &Release, extra: &[&str]) -> anyhow::Result<Vec<Value>> {
    let rendered = ok(release.helm("template", extra), None)?;
    let out = ok(
        args(kubectl(release.cp), ["apply", "--dry-run=server", "-o", "json", "-f", "-"]),
        Some(&rendered),
    )?;
    let applied: Value = serde_json::from_str(&out).context("parsing kubectl's output")?;
    let items = match applied.get("items") {
        Some(items) => items.as_array().cloned().unwrap_or_default(),
        None => vec![applied],
    };
    Ok(items)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} among {:?}", kinds(objects)))
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            format!("{}/{}", o["kind"].as_str().unwrap_or("?"), o["metadata"]["name"].as_str().unwrap_or("?"))
        })
        .collect()
}

#[tokio::test]
async fn template_with_default_values_passes_server_dry_run() -> anyhow::Result<()> {
    let cp = control_plane().await?;
    let release = Release::new(cp, "tpl-default")?;
    // --include-crds: the chart's CRDs, already installed by the harness, pass the dry run too.
    let objects = template_dry_run(&release, &["--include-crds"])?;
    let (agent, operator) = (release.agent(), release.operator());
    for (kind, name) in [
        ("CustomResourceDefinition", "proxyconfigs.fleetproxy.io"),
        ("CustomResourceDefinition", "proxynodes.fleetproxy.io"),
        ("Deployment", operator.as_str()),
        ("ServiceAccount", operator.as_str()),
        ("ServiceAccount", agent.as_str()),
        ("ClusterRole", operator.as_str()),
        ("ClusterRole", agent.as_str()),
        ("ClusterRoleBinding", operator.as_str()),
        ("ClusterRoleBinding", agent.as_str()),
        ("Role", operator.as_str()),
        ("RoleBinding", operator.as_str()),
        ("ValidatingAdmissionPolicy", &format!("{agent}-own-node")),
        ("ValidatingAdmissionPolicyBinding", &format!("{agent}-own-node")),
    ] {
        find(&objects, kind, name)?;
    }
    ensure!(!objects.iter().any(|o| o["kind"] == "ServiceMonitor"), "ServiceMonitor rendered by default");
    let config = find(&objects, "ProxyConfig", &release.proxy_config)?;
    let spec = &config["spec"];
    ensure!(spec["mode"] == "iptables" && spec["ipvs"]["scheduler"] == "rr", "{spec}");
    ensure!(spec["rollout"] == json!({"maxUnavailable": 1, "paused": false}), "{spec}");
    ensure!(spec["syncPeriod"] == "30s" && spec["excludedCIDRs"] == json!([]), "{spec}");

    let deployment = find(&objects, "Deployment", &operator)?;
    ensure!(deployment["spec"]["replicas"] == 2, "replicas: {}", deployment["spec"]["replicas"]);
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(pod["serviceAccountName"] == operator.as_str(), "{pod}");
    ensure!(pod["securityContext"]["runAsNonRoot"] == true, "{pod}");
    let container = &pod["containers"][0];
    let container_args: Vec<&str> =
        container["args"].as_array().context("args")?.iter().filter_map(Value::as_str).collect();
    for wanted in [
        format!("--namespace={}", release.namespace),
        format!("--agent-service-account={agent}"),
        "--leader-election=true".to_owned(),
        "--metrics-bind-address=0.0.0.0:8080".to_owned(),
    ] {
        ensure!(container_args.contains(&wanted.as_str()), "{wanted} not in {container_args:?}");
    }
    ensure!(container["securityContext"]["readOnlyRootFilesystem"] == true, "{container}");
    ensure!(container["securityContext"]["capabilities"]["drop"] == json!(["ALL"]), "{container}");
    ensure!(container["livenessProbe"]["httpGet"]["port"] == "metrics", "{container}");
    Ok(())
}

#[tokio::test]
async fn template_with_other_values_passes_server_dry_run() -> anyhow::Result<()> {
    let cp = control_plane().await?;
    let release = Release::new(cp, "tpl-other")?;
    let objects = template_dry_run(
        &release,
        &[
            "--set",
            "proxyConfig.mode=nftables,proxyConfig.ipvs.scheduler=wlc,proxyConfig.rollout.paused=true",
            "--set-json",
            r#"proxyConfig.excludedCIDRs=["10.0.0.0/24","fd00:1::/64"]"#,
            "--set-string",
            "proxyConfig.rollout.maxUnavailable=25%",
            "--set",
            "serviceMonitor.enabled=false,operator.replicas=3,agent.restrictToOwnNode=false",
            "--set",
            "image.repository=registry.example/fleetproxy,image.tag=v9",
        ],
    )?;
    let spec = &find(&objects, "ProxyConfig", &release.proxy_config)?["spec"];
    ensure!(spec["mode"] == "nftables" && spec["ipvs"]["scheduler"] == "wlc", "{spec}");
    ensure!(spec["excludedCIDRs"] == json!(["10.0.0.0/24", "fd00:1::/64"]), "{spec}");
    ensure!(spec["rollout"] == json!({"maxUnavailable": "25%", "paused": true}), "{spec}");
    let deployment = find(&objects, "Deployment", &release.operator())?;
    ensure!(deployment["spec"]["replicas"] == 3, "{}", deployment["spec"]);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    ensure!(container["image"] == "registry.example/fleetproxy:v9", "{container}");
    ensure!(
        container["args"]
            .as_array()
            .context("args")?
            .contains(&json!("--agent-image=registry.example/fleetproxy:v9")),
        "{container}"
    );
    ensure!(!objects.iter().any(|o| o["kind"] == "ValidatingAdmissionPolicy"), "{:?}", kinds(&objects));
    Ok(())
}

#[test]
fn service_monitor_needs_its_crd() -> anyhow::Result<()> {
    let chart = chart_dir();
    let template = |extra: &[&str]| {
        let mut command = args(helm(None), [OsStr::new("template"), OsStr::new("sm"), chart.as_os_str()]);
        command.args(["--set", "serviceMonitor.enabled=true"]).args(extra);
        command
    };
    let error = refused(template(&[]))?;
    ensure!(error.contains("needs the Prometheus Operator's ServiceMonitor CRD"), "{error}");
    let out = ok(template(&["--api-versions", "monitoring.coreos.com/v1"]), None)?;
    ensure!(out.contains("kind: ServiceMonitor") && out.contains("targetPort: metrics"), "{out}");
    Ok(())
}

#[tokio::test]
async fn install_upgrade_uninstall() -> anyhow::Result<()> {
    let cp = control_plane().await?;
    let release = Release::new(cp, "lifecycle")?;
    let (ns, agent, operator) = (release.namespace.as_str(), release.agent(), release.operator());
    // Without --skip-crds: helm leaves the CRDs the harness installed as they are.
    let out = release.install(&["--set-json", r#"proxyConfig.excludedCIDRs=["192.0.2.0/24"]"#])?;
    ensure!(out.contains("STATUS: deployed"), "{out}");
    ensure!(out.contains(&format!("kubectl get proxyconfig {}", release.proxy_config)), "NOTES:\n{out}");

    let policy = format!("{agent}-own-node");
    let installed: Vec<(&str, &str, Option<&str>)> = vec![
        ("deployment", &operator, Some(ns)),
        ("serviceaccount", &operator, Some(ns)),
        ("serviceaccount", &agent, Some(ns)),
        ("clusterrole", &operator, None),
        ("clusterrole", &agent, None),
        ("clusterrolebinding", &operator, None),
        ("clusterrolebinding", &agent, None),
        ("role", &operator, Some(ns)),
        ("rolebinding", &operator, Some(ns)),
        ("validatingadmissionpolicy", &policy, None),
        ("validatingadmissionpolicybinding", &policy, None),
        ("proxyconfig", &release.proxy_config, None),
    ];
    for (kind, name, namespace) in &installed {
        get_json(cp, kind, name, *namespace)?
            .with_context(|| format!("helm install created no {kind} {name}"))?;
    }
    let config = get_json(cp, "proxyconfig", &release.proxy_config, None)?.context("ProxyConfig")?;
    let spec = &config["spec"];
    ensure!(spec["mode"] == "iptables" && spec["excludedCIDRs"] == json!(["192.0.2.0/24"]), "{spec}");
    ensure!(spec["rollout"]["maxUnavailable"] == 1, "{spec}");

    let out = ok(release.helm("upgrade", &["--reuse-values", "--set", "proxyConfig.mode=nftables"]), None)?;
    ensure!(out.contains("STATUS: deployed"), "{out}");
    let config =
        get_json(cp, "proxyconfig", &release.proxy_config, None)?.context("ProxyConfig after upgrade")?;
    ensure!(config["spec"]["mode"] == "nftables", "after upgrade: {}", config["spec"]);
    ensure!(config["spec"]["excludedCIDRs"] == json!(["192.0.2.0/24"]), "values lost: {}", config["spec"]);

    release.uninstall()?;
    eventually(Duration::from_secs(60), "helm uninstall left objects behind", || {
        for (kind, name, namespace) in &installed {
            if get_json(cp, kind, name, *namespace)?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    for crd in ["proxyconfigs.fleetproxy.io", "proxynodes.fleetproxy.io"] {
        get_json(cp, "crd", crd, None)?.with_context(|| format!("helm uninstall removed CRD {crd}"))?;
    }
    Ok(())
}

#[test]
fn bad_values_are_refused_by_the_schema() -> anyhow::Result<()> {
    let chart = chart_dir();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--set", "proxyConfig.mode=bogus"],
            &["/proxyConfig/mode", "must be one of 'iptables', 'ipvs', 'nftables'"],
        ),
        (
            &["--set", "proxyConfig.ipvs.scheduler=bogus"],
            &["/proxyConfig/ipvs/scheduler", "must be one of 'rr'"],
        ),
        (
            &["--set", "proxyConfig.rollout.maxUnavailable=0"],
            &["/proxyConfig/rollout/maxUnavailable", "minimum: got 0, want 1"],
        ),
        (
            &["--set-string", "proxyConfig.rollout.maxUnavailable=0%"],
            &["/proxyConfig/rollout/maxUnavailable", "'0%' does not match"],
        ),
        (&["--set", "proxyConfig.rollout.maxUnavailable=-1"], &["/proxyConfig/rollout/maxUnavailable"]),
        (
            &["--set-json", r#"proxyConfig.excludedCIDRs=["nope"]"#],
            &["/proxyConfig/excludedCIDRs/0", "'nope' does not match"],
        ),
        (&["--set-json", r#"proxyConfig.excludedCIDRs=["10.0.0.0/33"]"#], &["/proxyConfig/excludedCIDRs/0"]),
        (
            &["--set-string", "proxyConfig.syncPeriod=-1s"],
            &["/proxyConfig/syncPeriod", "'-1s' does not match"],
        ),
        (&["--set-string", "proxyConfig.syncPeriod=0s"], &["/proxyConfig/syncPeriod"]),
        (&["--set-string", "proxyConfig.minSyncPeriod=1"], &["/proxyConfig/minSyncPeriod"]),
        (&["--set", "bogus=1"], &["additional properties 'bogus' not allowed"]),
        (&["--set", "proxyConfig.bogus=1"], &["/proxyConfig", "additional properties 'bogus' not allowed"]),
        (&["--set", "operator.replicas=0"], &["/operator/replicas"]),
        (
            &["--set", "operator.replicas=2,operator.leaderElection=false"],
            &["/operator/replicas", "maximum: got 2, want 1"],
        ),
        (&["--set", "operator.metricsBindAddress=localhost:8080"], &["/operator/metricsBindAddress"]),
        (&["--set", "image.pullPolicy=Sometimes"], &["/image/pullPolicy"]),
    ];
    let mut failures = Vec::new();
    for (extra, wanted) in cases {
        let mut command = args(helm(None), [OsStr::new("template"), OsStr::new("bad"), chart.as_os_str()]);
        command.args(*extra);
        let error = match refused(command) {
            Ok(error) => error,
            Err(e) => {
                failures.push(format!("{extra:?}: {e}"));
                continue;
            }
        };
        if !error.contains("values don't meet the specifications of the schema") {
            failures.push(format!("{extra:?}: not refused by the schema: {error}"));
        }
        for want in *wanted {
            if !error.contains(want) {
                failures.push(format!("{extra:?}: message lacks {want:?}: {error}"));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// `kubectl auth can-i VERB RESOURCE... --as USER`: whether the API server's authorizer says yes.
fn can_i(cp: &ControlPlane, user: &str, what: &[&str]) -> anyhow::Result<bool> {
    let output = run(args(kubectl(cp), ["auth", "can-i"].iter().chain(what).chain(&["--as", user])), None)?;
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match answer.as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => bail!(
            "kubectl auth can-i {what:?} --as {user}: {answer} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[tokio::test]
async fn rbac_is_least_privilege() -> anyhow::Result<()> {
    let cp = control_plane().await?;
    let release = Release::new(cp, "rbac")?;
    release.install(&["--skip-crds"])?;
    let ns = release.namespace.as_str();
    let agent = release.service_account(&release.agent());
    let operator = release.service_account(&release.operator());
    let mut wrong = Vec::new();
    let mut expect = |user: &str, what: &[&str], allowed: bool| -> anyhow::Result<()> {
        if can_i(cp, user, what)? != allowed {
            wrong.push(format!("{user} {} {what:?}", if allowed { "cannot" } else { "can" }));
        }
        Ok(())
    };
    for what in [
        &["list", "services", "-A"][..],
        &["watch", "services", "-A"],
        &["list", "endpointslices.discovery.k8s.io", "-A"],
        &["watch", "endpointslices.discovery.k8s.io", "-A"],
        &["list", "nodes"],
        &["get", "nodes"],
        &["get", "proxynodes.fleetproxy.io"],
        &["watch", "proxynodes.fleetproxy.io"],
        &["patch", "proxynodes.fleetproxy.io", "--subresource=status"],
    ] {
        expect(&agent, what, true)?;
    }
    for what in [
        &["update", "proxynodes.fleetproxy.io"][..],
        &["patch", "proxynodes.fleetproxy.io"],
        &["create", "proxynodes.fleetproxy.io"],
        &["delete", "proxynodes.fleetproxy.io"],
        &["create", "services", "-A"],
        &["update", "services", "-A"],
        &["patch", "nodes"],
        &["create", "endpointslices.discovery.k8s.io", "-A"],
        &["delete", "services", "-A"],
        &["delete", "endpointslices.discovery.k8s.io", "-A"],
        &["delete", "nodes"],
        &["delete", "pods", "-A"],
        &["delete", "proxyconfigs.fleetproxy.io"],
        &["update", "proxyconfigs.fleetproxy.io"],
        &["patch", "proxyconfigs.fleetproxy.io", "--subresource=status"],
        &["get", "secrets", "-A"],
        &["list", "secrets", "-A"],
        &["get", "secrets", "-n", ns],
        &["get", "configmaps", "-A"],
        &["create", "pods", "-A"],
    ] {
        expect(&agent, what, false)?;
    }
    for what in [
        &["patch", "proxyconfigs.fleetproxy.io", "--subresource=status"][..],
        &["create", "proxynodes.fleetproxy.io"],
        &["delete", "proxynodes.fleetproxy.io"],
        &["list", "nodes"],
        &["create", "daemonsets.apps", "-n", ns],
        &["update", "leases.coordination.k8s.io", "-n", ns],
        &["create", "events.events.k8s.io", "-n", "default"],
    ] {
        expect(&operator, what, true)?;
    }
    for what in [
        &["get", "secrets", "-A"][..],
        &["list", "secrets", "-A"],
        &["get", "secrets", "-n", ns],
        &["create", "daemonsets.apps", "-n", "kube-system"],
        &["update", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["delete", "nodes"],
        &["patch", "nodes"],
        &["delete", "proxyconfigs.fleetproxy.io"],
        &["update", "proxyconfigs.fleetproxy.io"],
        &["patch", "proxyconfigs.fleetproxy.io"],
        &["create", "pods", "-A"],
        &["delete", "services", "-A"],
    ] {
        expect(&operator, what, false)?;
    }
    ensure!(wrong.is_empty(), "RBAC is not least privilege:\n{}", wrong.join("\n"));
    Ok(())
}

/// A kubectl that authenticates with `token` only (no client certificate).
fn kubectl_with_token(cp: &ControlPlane, token: &str, ca: &Path) -> anyhow::Result<Command> {
    let server = ok(
        args(kubectl(cp), ["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]),
        None,
    )?;
    let mut command = Command::new(tool("kubectl"));
    command.env_remove("KUBECONFIG").arg("--kubeconfig=/dev/null");
    command.arg(format!("--server={}", server.trim())).arg("--certificate-authority").arg(ca);
    command.arg(format!("--token={token}"));
    Ok(command)
}

#[tokio::test]
async fn agent_writes_only_its_own_nodes_proxynode() -> anyhow::Result<()> {
    let cp = control_plane().await?;
    let release = Release::new(cp, "own-node")?;
    release.install(&["--skip-crds"])?;
    let (ns, agent) = (release.namespace.clone(), release.agent());
    let (node_a, node_b) = (unique_name("own-node-a"), unique_name("own-node-b"));

    // Nodes and their ProxyNodes, as the kubelet and the operator would create them.
    let mut objects = String::new();
    for node in [&node_a, &node_b] {
        objects.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n---\n\
             apiVersion: fleetproxy.io/v1alpha1\nkind: ProxyNode\nmetadata: {{name: {node}}}\nspec: {{mode: iptables}}\n---\n"
        ));
    }
    let cleanup = scopeguard(
        cp,
        vec![
            ("node", node_a.clone()),
            ("node", node_b.clone()),
            ("proxynode", node_a.clone()),
            ("proxynode", node_b.clone()),
        ],
    );
    ok(args(kubectl(cp), ["apply", "-f", "-"]), Some(&objects))?;

    // The CA of the API server, for the token-only kubectl.
    let ca_data = ok(
        args(
            kubectl(cp),
            [
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.certificate-authority-data}",
            ],
        ),
        None,
    )?;
    let ca = std::env::temp_dir().join(format!("{}-ca.crt", unique_name("own-node")));
    let decoded = ok(args(Command::new("base64"), ["-d"]), Some(ca_data.trim()))?;
    std::fs::write(&ca, decoded)?;

    // A token bound to node A, as a pod on node A has (its token names the pod and its node), and a
    // token bound to nothing.
    let token_a = ok(
        args(
            kubectl(cp),
            [
                "create",
                "token",
                &agent,
                "-n",
                &ns,
                "--bound-object-kind=Node",
                "--bound-object-name",
                &node_a,
            ],
        ),
        None,
    )?;
    let unbound = ok(args(kubectl(cp), ["create", "token", &agent, "-n", &ns]), None)?;
    let patch_status = |token: &str, node: &str| -> anyhow::Result<Output> {
        let mut command = kubectl_with_token(cp, token.trim(), &ca)?;
        command.args(["patch", "proxynode", node, "--subresource=status", "--type=merge", "-p"]);
        command.arg(json!({"status": {"activeMode": "iptables", "ruleCount": 7}}).to_string());
        run(command, None)
    };
    let stderr = |output: &Output| String::from_utf8_lossy(&output.stderr).into_owned();

    // The policy is enforced once the API server's policy informer has seen it: wait for the first
    // refusal, then expect every answer at once.
    let mut last = String::new();
    eventually(Duration::from_secs(30), "the agent's token for node A may patch node B's ProxyNode", || {
        let output = patch_status(&token_a, &node_b)?;
        last = stderr(&output);
        Ok(!output.status.success())
    })
    .with_context(|| last.clone())?;
    ensure!(
        last.contains(&format!("may write only ProxyNode {node_a}, not {node_b}"))
            && last.contains("ValidatingAdmissionPolicy"),
        "refusal without a clear message: {last}"
    );

    let output = patch_status(&unbound, &node_a)?;
    ensure!(!output.status.success(), "a token bound to no node patched ProxyNode {node_a}");
    ensure!(
        stderr(&output).contains("must authenticate with a service-account token bound to its node"),
        "{}",
        stderr(&output)
    );

    let output = patch_status(&token_a, &node_a)?;
    ensure!(
        output.status.success(),
        "the agent of node A cannot patch its own ProxyNode's status: {}",
        stderr(&output)
    );
    let written = get_json(cp, "proxynode", &node_a, None)?.context("ProxyNode A")?;
    ensure!(written["status"]["ruleCount"] == 7, "{}", written["status"]);

    // RBAC, before the policy: the spec is not the agent's, even on its own node.
    let mut command = kubectl_with_token(cp, token_a.trim(), &ca)?;
    command.args(["patch", "proxynode", &node_a, "--type=merge", "-p", r#"{"spec":{"mode":"nftables"}}"#]);
    let output = run(command, None)?;
    ensure!(
        !output.status.success() && stderr(&output).contains("forbidden"),
        "spec patch: {}",
        stderr(&output)
    );

    // Other users are not affected by the policy.
    let output = ok(
        args(
            kubectl(cp),
            [
                "patch",
                "proxynode",
                &node_b,
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"ruleCount":1}}"#,
            ],
        ),
        None,
    );
    output.context("the admin is refused by the agent's policy")?;
    let _ = std::fs::remove_file(&ca);
    drop(cleanup);
    Ok(())
}

/// Deletes the listed cluster-scoped objects when dropped.
struct Cleanup {
    cp: &'static ControlPlane,
    objects: Vec<(&'static str, String)>,
}

fn scopeguard(cp: &'static ControlPlane, objects: Vec<(&'static str, String)>) -> Cleanup {
    Cleanup { cp, objects }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (kind, name) in &self.objects {
            let _ = run(
                args(kubectl(self.cp), ["delete", kind, name, "--wait=false", "--ignore-not-found"]),
                None,
            );
        }
    }
}
