//! One proxy in a fresh node namespace: starting it, reading the kernel it programs, and its
//! process tree's CPU time and memory from /proc.

use std::{
    collections::HashSet,
    fs::File,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetproxy_tests::{
    fleet::{self, ApiBridge},
    netns::{NETNS_PREFIX, Netns, run_checked},
};

use crate::netlink::{ColdStart, Listener};

pub const NODE_NAME: &str = "bench-node";
pub const NODE_IP: &str = "10.254.0.1";
const NODE_ADDR: &str = "10.254.0.1/24";
static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iptables" => Ok(Mode::Iptables),
            "nftables" => Ok(Mode::Nftables),
            _ => Err(format!("{s:?}: iptables or nftables")),
        }
    }
}

/// Which proxy, with which sync periods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// fleetproxy-agent with the benchmark's sync periods.
    Fleetproxy,
    /// kube-proxy with the same sync periods.
    KubeProxyEqual,
    /// kube-proxy with its own defaults (syncPeriod 30s, minSyncPeriod 1s).
    KubeProxyDefaults,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Fleetproxy => "fleetproxy",
            Variant::KubeProxyEqual => "kube-proxy",
            Variant::KubeProxyDefaults => "kube-proxy-defaults",
        }
    }
    /// What `nft list` shows of the proxy's nftables rules in a family: kube-proxy's one table,
    /// or all of fleetproxy's (its main table and service shards; nothing else in its namespace
    /// makes tables).
    fn nft_listing(self, family: &str) -> Vec<&str> {
        match self {
            Variant::Fleetproxy => vec!["list", "ruleset", family],
            _ => vec!["list", "table", family, "kube-proxy"],
        }
    }
}

/// Where everything a proxy needs lives.
pub struct Setup {
    pub agent: PathBuf,
    pub kube_proxy: PathBuf,
    pub kubeconfig: PathBuf,
    pub api: SocketAddr,
    pub sync_period: String,
    pub min_sync_period: String,
    pub logs: PathBuf,
}

/// A fresh namespace shaped like a node: `lo` up and an address on `eth0`.
pub fn node_netns(role: &str) -> Result<Netns> {
    let n = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
    // `fpt-<pid>-...`: the test harness' sweep removes it if this process dies.
    let netns = Netns::create(&format!("{NETNS_PREFIX}{}-b{n}-{role}", std::process::id()))?;
    // A veth pair with both ends inside (the dummy module may be missing).
    netns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"])?;
    netns.ip(&["addr", "add", NODE_ADDR, "dev", "eth0"])?;
    netns.ip(&["link", "set", "eth0-peer", "up"])?;
    netns.ip(&["link", "set", "eth0", "up"])?;
    Ok(netns)
}

pub struct Running {
    pub netns: Netns,
    _bridge: ApiBridge,
    child: Child,
    pub started: Instant,
    sampler: Sampler,
    mode: Mode,
    variant: Variant,
    stopped: bool,
}

impl Running {
    /// Starts the proxy in `netns` (from [`node_netns`]; whoever listens there must have
    /// subscribed before this call to see the proxy's first commit).
    pub fn start(netns: Netns, setup: &Setup, mode: Mode, variant: Variant, tag: &str) -> Result<Self> {
        let bridge = ApiBridge::start(&netns, setup.api)?;
        let log = setup.logs.join(format!("{tag}.log"));
        let (program, args) = match variant {
            Variant::Fleetproxy => (
                setup.agent.clone(),
                vec![
                    format!("--kubeconfig={}", setup.kubeconfig.display()),
                    format!("--node-name={NODE_NAME}"),
                    format!("--mode={}", mode.name()),
                    "--proxynode=false".into(),
                    format!("--sync-period={}", setup.sync_period),
                    format!("--min-sync-period={}", setup.min_sync_period),
                    "--metrics-bind-address=127.0.0.1:10249".into(),
                    "--healthz-bind-address=127.0.0.1:10256".into(),
                ],
            ),
            Variant::KubeProxyEqual | Variant::KubeProxyDefaults => {
                let periods = (variant == Variant::KubeProxyEqual)
                    .then_some((setup.sync_period.as_str(), setup.min_sync_period.as_str()));
                let config = setup.logs.join(format!("{tag}.kube-proxy.yaml"));
                std::fs::write(&config, kube_proxy_config(&setup.kubeconfig, mode, periods))?;
                (setup.kube_proxy.clone(), vec![format!("--config={}", config.display()), "--v=1".into()])
            }
        };
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", netns.name()])
            .arg(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let sampler = Sampler::start(child.id());
        Ok(Self { netns, _bridge: bridge, child, started, sampler, mode, variant, stopped: false })
    }

    /// The proxy's pid (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}); see its log", self.variant.name());
        }
        Ok(())
    }

    /// The proxy's IPv4 ruleset as the kernel holds it, for polling.
    pub fn poll_dump(&self) -> Result<String> {
        dump_family(&self.netns, self.mode, self.variant, false)
    }

    /// The proxy's whole ruleset (both families), as files to reload elsewhere.
    pub fn full_dump(&self) -> Result<Vec<String>> {
        Ok(vec![
            dump_family(&self.netns, self.mode, self.variant, false)?,
            dump_family(&self.netns, self.mode, self.variant, true)?,
        ])
    }

    /// Syncs so far and their total duration in seconds, from the proxy's own
    /// `kubeproxy_sync_proxy_rules_duration_seconds` histogram (both proxies export it).
    pub fn sync_metrics(&self) -> Option<(f64, f64)> {
        let addr = "127.0.0.1:10249".parse().ok()?;
        let text = fleet::http_get(&self.netns, addr, "/metrics").ok()?;
        let count = fleet::metric_sum(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count");
        let sum = fleet::metric_sum(&text, "kubeproxy_sync_proxy_rules_duration_seconds_sum");
        Some((count, sum))
    }

    /// CPU seconds of the proxy's process tree so far (see [`tree_cpu_seconds`]).
    pub fn cpu_seconds(&self) -> f64 {
        tree_cpu_seconds(self.child.id())
    }

    /// Peak RSS of the tree in bytes (sampled) or the main process' VmHWM, whichever is larger.
    pub fn peak_rss(&self) -> u64 {
        self.sampler.peak.load(Ordering::Relaxed).max(self.main_hwm())
    }

    /// Who held the sampled peak ("kube-proxy 300 MiB + iptables-restore 33 MiB"), and the main
    /// process' own VmHWM: where a proxy's memory goes.
    pub fn peak_rss_breakdown(&self) -> String {
        let at_peak = self.sampler.at_peak.lock().map(|s| s.clone()).unwrap_or_default();
        format!("sampled peak {at_peak}; main process VmHWM {} MiB", self.main_hwm() >> 20)
    }

    fn main_hwm(&self) -> u64 {
        status_kib(self.child.id(), "VmHWM:") * 1024
    }

    /// Stops the proxy and whatever it runs (an `iptables-restore` or `nft` in the middle of a
    /// sync: after a cold-start timeout, one may have minutes to go).
    pub fn stop(mut self) -> Result<()> {
        self.kill()
    }

    fn kill(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        self.sampler.stop();
        // The proxy leads its own process group (`process_group(0)`), which its children join.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        self.child.wait().context("waiting for the proxy")?;
        Ok(())
    }
}

impl Drop for Running {
    /// A run that fails leaves no proxy behind either.
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("bench: stopping the proxy: {e:#}");
        }
    }
}

fn kube_proxy_config(kubeconfig: &Path, mode: Mode, periods: Option<(&str, &str)>) -> String {
    let periods = match periods {
        Some((sync, min)) => format!("{{syncPeriod: {sync}, minSyncPeriod: {min}}}"),
        None => "{}".into(),
    };
    // conntrack: 0 leaves the (not namespaced) nf_conntrack_max and the timeouts alone.
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}, qps: 50, burst: 100}}
hostnameOverride: {NODE_NAME}
mode: {mode}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
oomScoreAdj: 0
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
iptables: {periods}
nftables: {periods}
",
        kubeconfig = kubeconfig.display(),
        mode = mode.name(),
    )
}

fn dump_family(netns: &Netns, mode: Mode, variant: Variant, v6: bool) -> Result<String> {
    match mode {
        Mode::Iptables => netns.run(if v6 { "ip6tables-save" } else { "iptables-save" }, &[]),
        Mode::Nftables => {
            let family = if v6 { "ip6" } else { "ip" };
            // A table that does not exist yet is an empty ruleset.
            Ok(netns.run("nft", &variant.nft_listing(family)).unwrap_or_default())
        }
    }
}

/// The kernel floor: how long the kernel takes to load `dump` into a fresh namespace, with the
/// tool the mode uses (`iptables-restore` / `nft -f`), `ip netns exec` overhead subtracted.
///
/// The cold start's listener (scanning for the load's `expected` addresses) listens there too, as
/// it does to the proxy: with a listener, the kernel builds an event for every object it commits,
/// in the committing thread, and the listener takes CPU. Both proxies' cold starts pay for that
/// (at 10,000 x 10 nftables, `nft -f` took 3.2 s alone and 3.5-4.7 s under `nft monitor`), so the
/// floor they are held against pays for it too.
pub fn kernel_floor(
    mode: Mode,
    dump: &[String],
    dir: &Path,
    tag: &str,
    expected: &HashSet<u32>,
) -> Result<f64> {
    let netns = node_netns("floor")?;
    let cold = Arc::new(Mutex::new(ColdStart::new(expected)));
    let _listener = Listener::for_cold_start(netns.name(), cold)?;
    let t = Instant::now();
    netns.run("true", &[])?;
    let overhead = t.elapsed();
    let mut total = Duration::ZERO;
    for (i, text) in dump.iter().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let path = dir.join(format!("{tag}.dump{i}"));
        std::fs::write(&path, without_nfacct(text))?;
        let path_str = path.to_string_lossy().into_owned();
        let (program, args): (&str, Vec<&str>) = match (mode, i) {
            (Mode::Iptables, 0) => ("iptables-restore", vec![&path_str]),
            (Mode::Iptables, _) => ("ip6tables-restore", vec![&path_str]),
            (Mode::Nftables, _) => ("nft", vec!["-f", &path_str]),
        };
        let t = Instant::now();
        run_checked(netns.command(program).args(&args))?;
        total += t.elapsed().saturating_sub(overhead);
        // The first repeat's rulesets stay next to the logs, for a look at what each proxy wrote.
        if !tag.ends_with("-0") {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(total.as_secs_f64())
}

/// kube-proxy's iptables rules count invalid packets in an nfacct object it creates through
/// netlink; a fresh namespace has no such object, so the floor loads those rules without the match.
fn without_nfacct(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.find("-m nfacct --nfacct-name") {
            Some(at) => {
                let rest = line[at + "-m nfacct --nfacct-name".len()..].trim_start();
                let after = rest.find(' ').map_or("", |sp| &rest[sp..]);
                out.push_str(&line[..at]);
                out.push_str(after.trim_start());
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The size of a ruleset: its lines, except that the elements of an nftables set or map count one
/// each (`nft list` prints several on a line), and blank lines, comments and lone braces not at all.
pub fn ruleset_entries(dump: &[String]) -> usize {
    let mut count = 0;
    for text in dump {
        let mut in_elements = false;
        for line in text.lines() {
            let mut l = line.trim();
            if !in_elements && let Some(at) = l.find("elements = {") {
                in_elements = true;
                l = &l[at + "elements = {".len()..];
            }
            if in_elements {
                let end = l.find('}');
                let items = end.map_or(l, |e| &l[..e]);
                count += items.split(',').filter(|i| !i.trim().is_empty()).count();
                if end.is_some() {
                    in_elements = false;
                }
                continue;
            }
            if !l.is_empty() && !l.starts_with('#') && l != "}" {
                count += 1;
            }
        }
    }
    count
}

/// Every IPv4 address in `text` (dotted quads not glued to other digits or dots).
pub fn scan_ips(text: &str, mut found: impl FnMut(u32)) {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && (b[i - 1].is_ascii_digit() || b[i - 1] == b'.')) {
            i += 1;
            continue;
        }
        let (mut j, mut value, mut octet, mut digits, mut dots) = (i, 0u32, 0u32, 0, 0);
        let mut ok = true;
        while j < b.len() {
            let c = b[j];
            if c.is_ascii_digit() {
                octet = octet * 10 + u32::from(c - b'0');
                digits += 1;
                if digits > 3 {
                    ok = false;
                }
            } else if c == b'.' && digits > 0 && dots < 3 {
                ok &= octet <= 255;
                value = value << 8 | octet;
                octet = 0;
                digits = 0;
                dots += 1;
            } else {
                break;
            }
            j += 1;
        }
        let glued = j < b.len() && b[j] == b'.';
        if ok && dots == 3 && digits > 0 && octet <= 255 && !glued {
            found(value << 8 | octet);
        }
        i = j.max(i + 1);
    }
}

/// How many of `expected` appear in `text`.
pub fn count_present(text: &str, expected: &HashSet<u32>) -> usize {
    let mut seen = HashSet::with_capacity(expected.len());
    scan_ips(text, |ip| {
        if expected.contains(&ip) {
            seen.insert(ip);
        }
    });
    seen.len()
}

// --- /proc ---------------------------------------------------------------------------------------

const CLOCK_TICKS: f64 = 100.0;

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds of `pid` and of every descendant, live or reaped: the sum over the process tree of
/// each process' own and reaped children's time. A child that has just committed a sync (and is
/// not reaped yet) counts as well.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    tree(pid).into_iter().map(cpu_seconds).sum()
}

/// utime + stime + cutime + cstime (fields 14..=17 of /proc/PID/stat), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Some(f) = stat_fields(pid) else { return 0.0 };
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let ticks: u64 = (14..=17).filter_map(|n| f.get(n - 3)?.parse::<u64>().ok()).sum();
    ticks as f64 / CLOCK_TICKS
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The command name of `pid` (`comm`, at most 15 bytes).
fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or_else(|_| pid.to_string(), |c| c.trim().to_owned())
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Samples the summed RSS of a process tree every 50 ms and keeps the peak, and who held it.
struct Sampler {
    peak: Arc<AtomicU64>,
    at_peak: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let at_peak = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, who, s) = (Arc::clone(&peak), Arc::clone(&at_peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let sizes: Vec<(u32, u64)> =
                    tree(pid).into_iter().map(|p| (p, status_kib(p, "VmRSS:") * 1024)).collect();
                let rss = sizes.iter().map(|(_, rss)| rss).sum();
                if p.fetch_max(rss, Ordering::Relaxed) < rss
                    && let Ok(mut who) = who.lock()
                {
                    *who = sizes
                        .iter()
                        .map(|(p, rss)| format!("{} {} MiB", process_name(*p), rss >> 20))
                        .collect::<Vec<_>>()
                        .join(" + ");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { peak, at_peak, stop, thread: Some(thread) }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_addresses_in_both_syntaxes() {
        let text = "-A KUBE-SEP-X -s 10.128.0.1/32 -j KUBE-MARK-MASQ\n-A KUBE-SEP-X -p tcp -m tcp -j DNAT --to-destination 10.128.0.2:8080\n\
                    elements = { 10.96.0.10 . tcp . 80 : goto svc } 1.2.3.4.5 10.0.0.256";
        let mut found = Vec::new();
        scan_ips(text, |ip| found.push(std::net::Ipv4Addr::from(ip).to_string()));
        assert_eq!(found, ["10.128.0.1", "10.128.0.2", "10.96.0.10"]);
    }

    #[test]
    fn counts_set_elements_one_each() {
        let nft = "table ip t {\n\tmap m {\n\t\ttype ipv4_addr : verdict\n\t\telements = { 10.0.0.1 : goto a, 10.0.0.2 : goto b,\n\t\t\t     10.0.0.3 : goto c }\n\t}\n}\n";
        // table, map, type + 3 elements
        assert_eq!(ruleset_entries(&[nft.to_owned()]), 6);
    }

    #[test]
    fn drops_nfacct_matches() {
        let rule = "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name  ct_state_invalid_dropped_pkts -j DROP";
        assert_eq!(without_nfacct(rule), "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    }
}
