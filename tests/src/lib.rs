//! The end-to-end test harness: one real control plane (etcd, kube-apiserver, kube-controller-manager)
//! per test run, with the fleetproxy CRDs installed.
//!
//! [`control_plane`] finds the control plane, in this order:
//! 1. `FLEETPROXY_KUBECONFIG`: an API server someone else runs; it is used as it is.
//! 2. Otherwise `tests/controlplane/controlplane.sh start`, which reuses the control plane running in
//!    its state directory (`FLEETPROXY_STATE`, default `/tmp/fleetproxy-controlplane`) or starts one,
//!    building the binaries on first use (about 10 minutes). The script holds a lock on the state
//!    directory, so test binaries running in parallel share one control plane.
//!
//! The control plane is left running when the tests end, so the next run starts in about a second.
//! Stop it with `tests/controlplane/controlplane.sh stop` (CI does so after the tests).
//!
//! Every test names what it creates with [`unique_name`] and deletes it again, so tests neither
//! collide with each other nor depend on what an earlier run left behind.

pub mod fleet;
pub mod netns;

use std::{
    hash::{BuildHasher, Hasher, RandomState},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use tokio::sync::OnceCell;

/// The field manager of everything the harness applies.
pub const FIELD_MANAGER: &str = "fleetproxy-tests";

/// A running control plane with the fleetproxy CRDs installed.
#[derive(Debug)]
pub struct ControlPlane {
    kubeconfig: PathBuf,
    config: Config,
}

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();

/// The control plane of this test process, started or found on first use; see the crate docs.
pub async fn control_plane() -> anyhow::Result<&'static ControlPlane> {
    CONTROL_PLANE.get_or_try_init(ControlPlane::connect).await
}

/// A client of the control plane; shorthand for `control_plane().await?.client()`.
pub async fn client() -> anyhow::Result<Client> {
    control_plane().await?.client()
}

impl ControlPlane {
    async fn connect() -> anyhow::Result<Self> {
        let kubeconfig = match std::env::var_os("FLEETPROXY_KUBECONFIG") {
            Some(path) => PathBuf::from(path),
            None => start_script().await?,
        };
        let file = Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?;
        let control_plane = Self { kubeconfig, config };
        control_plane.install_crds().await?;
        Ok(control_plane)
    }

    /// A new client. Each test gets its own: a client is bound to the tokio runtime it was made in,
    /// and every `#[tokio::test]` has a runtime of its own.
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::try_from(self.config.clone())?)
    }

    /// The admin kubeconfig, for kubectl and other tools.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `kubectl --kubeconfig <ours>`, ready for more arguments.
    pub fn kubectl(&self) -> std::process::Command {
        let mut command = std::process::Command::new("kubectl");
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// Applies every CRD of the API (server-side apply) and waits until the server serves them.
    async fn install_crds(&self) -> anyhow::Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client()?);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for crd in fleetproxy_api::all_crds() {
            let name = crd.name_any();
            crds.patch(&name, &params, &Patch::Apply(&crd))
                .await
                .with_context(|| format!("applying CRD {name}"))?;
        }
        for crd in fleetproxy_api::all_crds() {
            let name = crd.name_any();
            let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .with_context(|| format!("CRD {name} not Established after 30s"))??;
        }
        Ok(())
    }
}

/// Runs `controlplane.sh start`, whose last line of output is the kubeconfig path.
async fn start_script() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/controlplane.sh");
    // Progress (and the first build's ten minutes) shows on stderr as it happens.
    let output = tokio::process::Command::new(&script)
        .arg("start")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {}", script.display()))?
        .wait_with_output()
        .await?;
    if !output.status.success() {
        bail!("{} start failed ({}); see the logs it names above", script.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout.lines().rev().find(|line| !line.trim().is_empty()).map(str::trim);
    match path {
        Some(path) => Ok(PathBuf::from(path)),
        None => bail!("{} start printed no kubeconfig path", script.display()),
    }
}

/// A fresh DNS-1123 name (at most 63 characters) starting with `prefix`: `prefix-<8 random chars>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    let mut bits = hasher.finish();
    let mut suffix = String::with_capacity(8);
    for _ in 0..8 {
        suffix.push(char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[(bits % 36) as usize]));
        bits /= 36;
    }
    let prefix: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(54)
        .collect();
    let prefix = prefix.trim_matches('-');
    if prefix.is_empty() { format!("t-{suffix}") } else { format!("{prefix}-{suffix}") }
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    #[test]
    fn unique_names_are_fresh_and_dns_safe() {
        let a = unique_name("Round_Trip.Test");
        let b = unique_name("Round_Trip.Test");
        assert_ne!(a, b);
        assert!(a.starts_with("round-trip-test-"), "{a}");
        for name in [a, unique_name(""), unique_name(&"x".repeat(100))] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        }
    }
}
