//! Playing the kubelet's part: runs the containers of a DaemonSet or a Deployment as processes of
//! this machine, each inside the network namespace its pod would have, and restarts or kills them on
//! demand.
//!
//! A container becomes `ip netns exec <netns> <binary> <args>` with the environment its spec
//! declares: `value`s and the downward-API fields `spec.nodeName`, `metadata.name` and
//! `metadata.namespace`, and `$(VAR)` references in values and args expanded as the kubelet does.
//! Its program is the container's `command[0]` (or the caller's entrypoint when the spec has none,
//! as an image's entrypoint would be), resolved to the cargo-built binary when it is one of ours.
//! Each process logs to a file of its own; [`Kubelet::dump_logs`] prints their tails.
//!
//! Every pod namespace gets an [`ApiBridge`], so that the kubeconfig of the control plane
//! (`https://127.0.0.1:PORT`) works unchanged inside it.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Container;
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::netns::Netns;

/// The binaries of this workspace, as `cargo build` left them.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

/// The binaries a fleet runs.
pub const AGENT: &str = "fleetproxy-agent";
pub const OPERATOR: &str = "fleetproxy-operator";

impl Binaries {
    /// Finds the directory holding the cargo-built `fleetproxy-agent` and `fleetproxy-operator`:
    /// `$CARGO_TARGET_DIR/debug`, or the nearest ancestor of this executable that holds them (a test
    /// runs from `target/debug/deps`, a binary from `target/debug`).
    pub fn locate() -> Result<Self> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
            let dir = PathBuf::from(dir);
            candidates.push(dir.join("debug"));
            candidates.push(dir.join("release"));
        }
        if let Ok(exe) = std::env::current_exe() {
            candidates.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
        }
        let found =
            candidates.into_iter().find(|dir| [AGENT, OPERATOR].iter().all(|b| dir.join(b).is_file()));
        match found {
            Some(dir) => Ok(Self { dir }),
            None => bail!(
                "cannot find the {AGENT} and {OPERATOR} binaries next to {:?} or in $CARGO_TARGET_DIR; \
                 build them first: cargo build -p fleetproxy-agent -p fleetproxy-operator",
                std::env::current_exe().unwrap_or_default()
            ),
        }
    }

    /// The path of `program`: ours from the target directory, anything else as it is (from PATH).
    pub fn resolve(&self, program: &str) -> PathBuf {
        let name = Path::new(program).file_name().and_then(|n| n.to_str()).unwrap_or(program);
        if [AGENT, OPERATOR].contains(&name) { self.dir.join(name) } else { PathBuf::from(program) }
    }
}

// --- the API bridge ------------------------------------------------------------------------------

const POLL_INTERVAL: Timespec = Timespec { tv_sec: 0, tv_nsec: 100_000_000 };

/// Relays TCP connections made to `addr` inside a network namespace to `addr` in the test's own
/// namespace: the listener is created by a thread that entered the namespace (a socket stays in the
/// namespace it was made in), the connections to the API server are made from the test's threads.
pub struct ApiBridge {
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl ApiBridge {
    pub fn start(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        let listener = netns
            .enter(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} inside {}", netns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let (stop_flag, registry) = (Arc::clone(&stop), Arc::clone(&open));
        let accept = std::thread::Builder::new()
            .name(format!("bridge-{}", netns.name()))
            .spawn(move || accept_loop(&listener, addr, &stop_flag, &registry))?;
        Ok(Self { stop, open, accept: Some(accept) })
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn accept_loop(
    listener: &TcpListener,
    upstream: SocketAddr,
    stop: &AtomicBool,
    open: &Arc<Mutex<HashMap<u64, TcpStream>>>,
) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        if poll(&mut fds, Some(&POLL_INTERVAL)).unwrap_or(0) == 0 {
            continue;
        }
        while let Ok((inside, _)) = listener.accept() {
            let Ok(outside) = TcpStream::connect(upstream) else { continue };
            let _ = inside.set_nonblocking(false);
            let (Ok(inside2), Ok(outside2)) = (inside.try_clone(), outside.try_clone()) else { continue };
            let id = NEXT.fetch_add(2, Ordering::Relaxed);
            {
                let mut open = lock(open);
                if let (Ok(a), Ok(b)) = (inside.try_clone(), outside.try_clone()) {
                    open.insert(id, a);
                    open.insert(id + 1, b);
                }
            }
            let registry = Arc::clone(open);
            let spawned = std::thread::Builder::new().name("bridge-conn".into()).spawn(move || {
                let up = std::thread::spawn(move || pipe(inside, outside));
                pipe(outside2, inside2);
                let _ = up.join();
                let mut open = lock(&registry);
                open.remove(&id);
                open.remove(&(id + 1));
            });
            if spawned.is_err() {
                lock(open).retain(|key, _| *key != id && *key != id + 1);
            }
        }
    }
}

/// Copies `from` to `to` until end of stream, then half-closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Drop for ApiBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for stream in lock(&self.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

// --- pods ----------------------------------------------------------------------------------------

/// Everything needed to start a pod's container again.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// The pod's name (`metadata.name`), also the key of the process and the name of its log.
    pub name: String,
    pub namespace: String,
    /// The node it runs on (`spec.nodeName`).
    pub node_name: String,
    pub netns: Netns,
    pub container: Container,
    /// The program when the container has no command (the image's entrypoint).
    pub entrypoint: String,
    /// Set after the container's own environment, as a runtime would (KUBECONFIG, PATH...).
    pub extra_env: Vec<(String, String)>,
}

/// A resolved command line, ready to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Expands `$(VAR)` references as the kubelet does: defined variables are replaced, undefined ones
/// stay as written, `$$` is a literal `$`.
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

impl PodSpec {
    /// The command line the kubelet would run for this container.
    pub fn resolve(&self, binaries: &Binaries) -> Result<Resolved> {
        let mut env = BTreeMap::new();
        for var in self.container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(value), _) => expand(value, &env),
                (None, Some(source)) => {
                    let field = source.field_ref.as_ref().map(|f| f.field_path.as_str());
                    match field {
                        Some("spec.nodeName") => self.node_name.clone(),
                        Some("metadata.name") => self.name.clone(),
                        Some("metadata.namespace") => self.namespace.clone(),
                        other => bail!(
                            "container {}: env {} from {other:?} is not supported",
                            self.container.name,
                            var.name
                        ),
                    }
                }
                (None, None) => String::new(),
            };
            env.insert(var.name.clone(), value);
        }
        for (key, value) in &self.extra_env {
            env.insert(key.clone(), value.clone());
        }
        let mut words: Vec<String> = self.container.command.clone().unwrap_or_default();
        if words.is_empty() {
            words.push(self.entrypoint.clone());
        }
        words.extend(self.container.args.iter().flatten().cloned());
        let mut words = words.iter().map(|w| expand(w, &env));
        let program = binaries.resolve(&words.next().unwrap_or_default());
        Ok(Resolved { program, args: words.collect(), env })
    }
}

struct Running {
    spec: PodSpec,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

/// Starts, restarts and kills pod processes; kills every one of them when dropped.
pub struct Kubelet {
    binaries: Binaries,
    dir: PathBuf,
    pods: Mutex<BTreeMap<String, Running>>,
}

impl Kubelet {
    /// A kubelet whose processes log into `dir`.
    pub fn new(binaries: Binaries, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { binaries, dir: dir.to_path_buf(), pods: Mutex::new(BTreeMap::new()) })
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// Starts the pod (replacing a running one of the same name).
    pub fn run(&self, spec: PodSpec) -> Result<()> {
        let name = spec.name.clone();
        let log = self.dir.join(format!("{name}.log"));
        let mut pods = lock(&self.pods);
        let starts = pods.remove(&name).map_or(0, |mut old| {
            stop_child(old.child.as_mut());
            old.starts
        });
        let child = self.spawn(&spec, &log)?;
        pods.insert(name, Running { spec, child: Some(child), log, starts: starts + 1 });
        Ok(())
    }

    fn spawn(&self, spec: &PodSpec, log: &Path) -> Result<Child> {
        let resolved = spec.resolve(&self.binaries)?;
        if resolved.program.is_absolute() && !resolved.program.is_file() {
            bail!(
                "{} is missing; build it first: cargo build -p fleetproxy-agent -p fleetproxy-operator",
                resolved.program.display()
            );
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        writeln!(file, "--- {} {} {}", spec.name, resolved.program.display(), resolved.args.join(" "))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", spec.netns.name()])
            .arg(&resolved.program)
            .args(&resolved.args)
            .envs(&resolved.env)
            .stdin(Stdio::null())
            // A process group of its own: a Ctrl-C at the terminal reaches the program that runs
            // the kubelet, which stops its pods in order, and not the pods directly.
            .process_group(0)
            .stdout(file.try_clone()?)
            .stderr(file);
        command
            .spawn()
            .with_context(|| format!("starting {} in {}", resolved.program.display(), spec.netns.name()))
    }

    /// Kills the pod's process (SIGTERM, SIGKILL after 5s); [`Kubelet::restart`] starts it again.
    pub fn kill(&self, name: &str) {
        if let Some(pod) = lock(&self.pods).get_mut(name) {
            stop_child(pod.child.as_mut());
            pod.child = None;
        }
    }

    /// Kills the pod's process and starts it again with the same spec.
    pub fn restart(&self, name: &str) -> Result<()> {
        let spec =
            lock(&self.pods).get(name).map(|p| p.spec.clone()).with_context(|| format!("no pod {name}"))?;
        self.run(spec)
    }

    /// Whether the pod's process is alive; a process that exited is reported with its status.
    pub fn check(&self, name: &str) -> Result<()> {
        let mut pods = lock(&self.pods);
        let pod = pods.get_mut(name).with_context(|| format!("no pod {name}"))?;
        match pod.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => bail!("pod {name} exited ({status}); log {}", pod.log.display()),
            Some(Err(e)) => bail!("pod {name}: {e}"),
            None => bail!("pod {name} is not running"),
        }
    }

    /// The names of the pods, in order.
    pub fn pods(&self) -> Vec<String> {
        lock(&self.pods).keys().cloned().collect()
    }

    /// The log file of a pod.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Prints the last `lines` lines of every pod's log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut logs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            eprintln!("===== {} (last {lines} lines) =====", log.display());
            for line in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{line}");
            }
        }
    }
}

fn stop_child(child: Option<&mut Child>) {
    let Some(child) = child else { return };
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id())
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let mut pods = lock(&self.pods);
        // TERM everything first, so that processes stop in parallel.
        for pod in pods.values_mut() {
            if let Some(child) = pod.child.as_mut()
                && let Ok(pid) = i32::try_from(child.id())
                && let Some(pid) = rustix::process::Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for pod in pods.values_mut() {
            stop_child(pod.child.as_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = BTreeMap::from([("NODE_NAME".to_owned(), "n1".to_owned())]);
        assert_eq!(expand("--node-name=$(NODE_NAME)", &env), "--node-name=n1");
        assert_eq!(expand("$(MISSING)-$$(NODE_NAME)-$x", &env), "$(MISSING)-$(NODE_NAME)-$x");
        assert_eq!(expand("plain", &env), "plain");
    }
}
