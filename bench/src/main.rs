//! fleetproxy-bench: fleetproxy-agent against upstream kube-proxy, one at a time, each in a fresh
//! network namespace, against the same real API server (issue 7). Not part of the test suite; see
//! docs/benchmarks.md for what it measures and how.

mod cold;
mod load;
mod netlink;
mod proxy;
mod report;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{
    cold::{Cold, Judge, NetlinkView, Step},
    load::{Model, NAMESPACE, Point},
    netlink::{ColdStart, Source, Tracker, lock},
    proxy::{Mode, Running, Setup, Variant},
    report::{Latency, RunResult},
};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks fleetproxy-agent against upstream kube-proxy (see docs/benchmarks.md)")]
struct Args {
    /// Points to measure, SERVICESxENDPOINTS, in this order.
    #[arg(long, value_delimiter = ',', default_value = "100x10,1000x10,5000x10,10000x10,1x10000")]
    points: Vec<Point>,
    /// Runs of every proxy at every point and mode (medians are reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, value_delimiter = ',', default_value = "iptables,nftables")]
    modes: Vec<Mode>,
    /// `equal`: kube-proxy gets the same sync periods as fleetproxy; `defaults`: kube-proxy at its
    /// defaults (30s / 1s); `none`: fleetproxy alone (to re-measure it after a change). fleetproxy
    /// always runs with --sync-period / --min-sync-period.
    #[arg(long, value_delimiter = ',', default_value = "equal,defaults")]
    profiles: Vec<String>,
    /// syncPeriod of fleetproxy (and of kube-proxy in the `equal` profile).
    #[arg(long, default_value = "30s")]
    sync_period: String,
    /// minSyncPeriod of fleetproxy (and of kube-proxy in the `equal` profile).
    #[arg(long, default_value = "100ms")]
    min_sync_period: String,
    /// Single-endpoint changes per point, mode and proxy, spread evenly over the repeats.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Time between two endpoint changes.
    #[arg(long, default_value_t = 250)]
    change_interval_ms: u64,
    /// Pause after each kernel dump, as a multiple of how long the dump took (0: back to back). A
    /// dump competes with the proxy for the kernel's ruleset and for CPU.
    #[arg(long, default_value_t = 1.0)]
    poll_gap: f64,
    /// How the latency phase sees a change reach the kernel: `netlink` (the kernel's nftables
    /// events in the node namespace, timestamped as they arrive; dumps after an overrun) or `poll`
    /// (kernel dumps, as the cold start).
    #[arg(long, default_value = "netlink")]
    detect: Detect,
    /// Give up on a cold start after this long: the run is recorded as timed out (no latency
    /// phase) and the benchmark goes on.
    #[arg(long, default_value_t = 900)]
    cold_timeout_s: u64,
    /// Results: runs.csv, latencies.csv, summary.csv, table.md, bench.png, logs/.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Use this API server instead of starting one (controlplane.sh start --state-dir).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// State directory of the benchmark's own control plane.
    #[arg(long, default_value = "/tmp/fleetproxy-bench-controlplane")]
    state_dir: PathBuf,
    /// fleetproxy-agent binary. Default: next to this binary (build with --release).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// kube-proxy binary. Default: built by controlplane.sh from the pinned Go modules.
    #[arg(long)]
    kube_proxy: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Detect {
    Netlink,
    Poll,
}

impl Detect {
    pub fn name(self) -> &'static str {
        match self {
            Detect::Netlink => "netlink",
            Detect::Poll => "poll",
        }
    }
}

/// With `--detect netlink`, how long after the last change's write the changes not announced yet
/// are left to kernel dumps.
pub const NETLINK_GRACE: Duration = Duration::from_secs(60);
/// How long after the last change's write (plus [`NETLINK_GRACE`] with netlink) dumps go on looking
/// for the changes not seen yet, before they count as lost.
const DUMP_GIVE_UP: Duration = Duration::from_secs(120);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/controlplane/controlplane.sh")
}

/// Runs controlplane.sh with `args`; its last line of output.
fn controlplane(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(script())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running controlplane.sh")?;
    if !out.status.success() {
        bail!("controlplane.sh {args:?} failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_owned()).context("no output")
}

fn api_address(kubeconfig: &Kubeconfig) -> Result<SocketAddr> {
    let server = kubeconfig
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("kubeconfig has no server")?;
    let host = server.trim_start_matches("https://").trim_end_matches('/');
    host.parse().with_context(|| format!("server {server:?} is not https://IP:PORT on this machine"))
}

fn profile_variants(profiles: &[String]) -> Result<Vec<Variant>> {
    let mut variants = vec![Variant::Fleetproxy];
    for p in profiles {
        match p.as_str() {
            "equal" => variants.push(Variant::KubeProxyEqual),
            "defaults" => variants.push(Variant::KubeProxyDefaults),
            "none" => {}
            _ => bail!("unknown profile {p:?} (equal, defaults, none)"),
        }
    }
    Ok(variants)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    fleetproxy_tests::netns::require_root();
    fleetproxy_tests::netns::sweep_stale();
    let variants = profile_variants(&args.profiles)?;
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let out = std::fs::canonicalize(&args.out)?;
    let logs = std::fs::canonicalize(&logs)?;

    let agent = match &args.agent {
        Some(a) => a.clone(),
        None => std::env::current_exe()?.with_file_name("fleetproxy-agent"),
    };
    if !agent.is_file() {
        bail!("{} not found; build it: cargo build --release -p fleetproxy-agent", agent.display());
    }
    let kube_proxy = match &args.kube_proxy {
        Some(k) => k.clone(),
        None => PathBuf::from(controlplane(&["build", "kube-proxy"])?).join("kube-proxy"),
    };
    let kubeconfig_path = match &args.kubeconfig {
        Some(k) => k.clone(),
        None => PathBuf::from(controlplane(&["start", &args.state_dir.to_string_lossy()])?),
    };
    let kubeconfig = Kubeconfig::read_from(&kubeconfig_path)?;
    let api = api_address(&kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let setup = Setup {
        agent,
        kube_proxy,
        kubeconfig: kubeconfig_path,
        api,
        sync_period: args.sync_period.clone(),
        min_sync_period: args.min_sync_period.clone(),
        logs: logs.clone(),
    };
    eprintln!(
        "bench: agent {}, kube-proxy {}, API server {api}, results in {}",
        setup.agent.display(),
        setup.kube_proxy.display(),
        out.display()
    );

    load::prepare(&client, proxy::NODE_NAME, proxy::NODE_IP).await?;
    let mut model = load::adopt(&client).await?;
    let mut results = report::Results::create(&out, args.cold_timeout_s)?;
    let per_run = args.changes.div_ceil(args.repeats.max(1));
    let mut seed = 0usize;
    for &point in &args.points {
        load::reconcile(&client, &mut model, point).await?;
        for &mode in &args.modes {
            for repeat in 0..args.repeats {
                // Interleaved, so that a machine that slows down over time hurts every proxy alike.
                for &variant in &variants {
                    seed += 1;
                    let tag = format!("{point}-{}-{}-{repeat}", mode.name(), variant.name());
                    eprintln!("bench: {tag}");
                    let (run, lat) = run_one(
                        &client, &setup, &mut model, point, mode, variant, repeat, per_run, &args, seed, &tag,
                    )
                    .await
                    .with_context(|| format!("{tag}; logs in {}", logs.display()))?;
                    eprintln!("bench:   {}", run.describe(&lat));
                    results.add(run, lat)?;
                }
            }
        }
    }
    let table = results.finish(&args.points, &args.modes, &variants)?;
    println!("{table}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    client: &Client,
    setup: &Setup,
    model: &mut Model,
    point: Point,
    mode: Mode,
    variant: Variant,
    repeat: usize,
    changes: usize,
    args: &Args,
    seed: usize,
    tag: &str,
) -> Result<(RunResult, Vec<Latency>)> {
    let expected = model.expected();
    let netns = proxy::node_netns("node")?;
    // Subscribed before the proxy exists: its first commit is announced to us.
    let cold = Arc::new(Mutex::new(ColdStart::new(&expected)));
    let listener = netlink::Listener::for_cold_start(netns.name(), Arc::clone(&cold))?;
    let mut running = Running::start(netns, setup, mode, variant, tag)?;
    lock(&cold).set_pid(running.pid());
    let outcome = cold_start(&mut running, &expected, &cold, args)?;
    drop(listener);
    let (netlink_end, cold_overruns, netlink_missing) = {
        let l = lock(&cold);
        (l.complete_at, l.overruns, l.missing())
    };
    let since_start = |t: Instant| t.saturating_duration_since(running.started).as_secs_f64();
    let mut run = RunResult {
        point,
        mode,
        variant,
        repeat,
        cold_s: None,
        cold_fallback: None,
        cold_netlink_s: netlink_end.map(since_start),
        cold_poll_s: None,
        poll_s: None,
        cold_overruns,
        floor_s: None,
        cpu_cold_s: None,
        cpu_total_s: f64::NAN,
        rss_mib: f64::NAN,
        lines: None,
        bytes: None,
        syncs: f64::NAN,
        sync_mean_ms: f64::NAN,
        detect: args.detect,
        changes: 0,
        by_dump: 0,
        overruns: 0,
        lost: 0,
    };
    let (c, cpu_cold) = match outcome {
        ColdOutcome::Done(c, cpu) => (c, cpu),
        ColdOutcome::TimedOut { present } => {
            eprintln!(
                "bench:   cold start timed out after {}s: {present} of {} addresses in the last kernel dump, {} not \
                 announced by netlink; no latency phase",
                args.cold_timeout_s,
                expected.len(),
                netlink_missing
            );
            let (syncs, sync_seconds) = running.sync_metrics().unwrap_or((f64::NAN, f64::NAN));
            run.syncs = syncs;
            run.sync_mean_ms = sync_seconds / syncs * 1000.0;
            run.cpu_total_s = running.cpu_seconds();
            run.rss_mib = running.peak_rss() as f64 / (1024.0 * 1024.0);
            eprintln!("bench:   memory: {}", running.peak_rss_breakdown());
            running.stop()?;
            return Ok((run, Vec::new()));
        }
    };
    eprintln!(
        "bench:   cold start by {}: netlink {}, dumps: last incomplete started at {}, first complete ended at \
         {:.2}s; {} overruns",
        c.fallback.map_or("netlink".into(), |why| format!("kernel dump ({})", why.name())),
        c.netlink.map_or("never complete".into(), |t| format!("{:.3}s", since_start(t))),
        c.before.map_or("-".into(), |t| format!("{:.3}s", since_start(t))),
        since_start(c.poll),
        run.cold_overruns
    );
    run.cold_s = Some(since_start(c.at));
    run.cold_fallback = c.fallback;
    run.cold_poll_s = Some(since_start(c.poll));
    run.poll_s = Some(c.poll_took.as_secs_f64());
    run.cpu_cold_s = Some(cpu_cold);
    let dump = running.full_dump()?;
    run.lines = Some(proxy::ruleset_entries(&dump));
    run.bytes = Some(dump.iter().map(String::len).sum());

    let phase = latency_phase(client, &mut running, model, changes, args, seed).await?;
    let (syncs, sync_seconds) = running.sync_metrics().unwrap_or((f64::NAN, f64::NAN));
    run.syncs = syncs;
    run.sync_mean_ms = sync_seconds / syncs * 1000.0;
    run.cpu_total_s = running.cpu_seconds();
    run.rss_mib = running.peak_rss() as f64 / (1024.0 * 1024.0);
    eprintln!("bench:   memory: {}", running.peak_rss_breakdown());
    running.stop()?;
    run.floor_s = Some(proxy::kernel_floor(mode, &dump, &setup.logs, tag, &expected)?);
    run.changes = phase.done.len() + phase.lost;
    run.by_dump = phase.done.iter().filter(|(_, source)| *source == Source::Dump).count();
    run.overruns = phase.overruns;
    run.lost = phase.lost;
    let lat = phase
        .done
        .into_iter()
        .map(|(ms, source)| Latency { point, mode, variant, repeat, ms, source })
        .collect();
    Ok((run, lat))
}

/// How a cold start ended.
enum ColdOutcome {
    /// With the CPU seconds of the proxy's tree at its end.
    Done(Cold, f64),
    /// Not within `--cold-timeout-s`; `present`: addresses in the last dump.
    TimedOut { present: usize },
}

/// Waits until every address of `expected` is in the kernel: netlink says when the last one was
/// announced, kernel dumps polled all along confirm it or, where netlink cannot tell, give the time
/// themselves (see [`cold`]). A proxy that exits, or a dump that fails, is an error; a proxy that
/// is not done by `--cold-timeout-s` is a result.
fn cold_start(
    running: &mut Running,
    expected: &std::collections::HashSet<u32>,
    listener: &Mutex<ColdStart>,
    args: &Args,
) -> Result<ColdOutcome> {
    let mut judge = Judge::new(running.started, running.started + Duration::from_secs(args.cold_timeout_s));
    let (mut present, mut cpu_at_poll) = (0, f64::NAN);
    loop {
        running.check_alive()?;
        let view = {
            let l = lock(listener);
            NetlinkView {
                complete_at: l.complete_at,
                usable: l.usable(),
                overrun: l.overruns > 0,
                caught_up: l.caught_up,
            }
        };
        match judge.step(&view, Instant::now()) {
            Step::Wait(d) => std::thread::sleep(d),
            Step::Dump => {
                let t = Instant::now();
                let dump = running.poll_dump()?;
                let end = Instant::now();
                present = proxy::count_present(&dump, expected);
                let complete = present == expected.len();
                if complete && judge.first_complete().is_none() {
                    cpu_at_poll = running.cpu_seconds();
                }
                let netlink_end = lock(listener).complete_at;
                judge.dumped(t, end, complete, netlink_end, gap(end - t, args.poll_gap));
            }
            Step::Done(c) => {
                let cpu = match c.fallback {
                    None => lock(listener).cpu_at_complete.unwrap_or(cpu_at_poll),
                    Some(_) => cpu_at_poll,
                };
                return Ok(ColdOutcome::Done(c, cpu));
            }
            Step::TimedOut => return Ok(ColdOutcome::TimedOut { present }),
        }
    }
}

/// What the latency phase saw: each change's latency (ms) and how it was seen, the listener's
/// overruns, and the changes never seen.
struct Phase {
    done: Vec<(f64, Source)>,
    overruns: usize,
    lost: usize,
}

/// Sends `count` single-endpoint changes, one every `--change-interval-ms`, each to another
/// EndpointSlice, and waits until each new address is in the kernel. Latency: from just before the
/// API write (the trigger time written into the slice) to the arrival of the first nftables event
/// that carries the address (`--detect netlink`), or to the end of the first kernel dump that holds
/// it (`--detect poll`, and for the changes events cannot vouch for: see [`netlink`]).
async fn latency_phase(
    client: &Client,
    running: &mut Running,
    model: &mut Model,
    count: usize,
    args: &Args,
    seed: usize,
) -> Result<Phase> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let tracker: Arc<Mutex<Tracker>> = Arc::default();
    let by_dump = args.detect == Detect::Poll;
    // Subscribed before the first change is registered: every change's commit is announced to us.
    let _listener = match args.detect {
        Detect::Netlink => Some(netlink::Listener::for_changes(
            running.netns.name(),
            Arc::clone(&tracker),
            load::is_change_ip,
        )?),
        Detect::Poll => None,
    };
    let mut services = std::mem::take(&mut model.services);
    let interval = Duration::from_millis(args.change_interval_ms);
    let sender = {
        let tracker = Arc::clone(&tracker);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut result = Ok(());
            for c in 0..count {
                let n = seed * 7919 + c;
                let service = (n * 104_729) % services.len();
                let svc = &mut services[service];
                let slice = n % svc.slices.len();
                let ip = load::next_change_ip();
                lock(&tracker).register(ip, by_dump);
                if let Err(e) = load::change_endpoint(&slices, svc, slice, n, ip).await {
                    result = Err(e);
                    break;
                }
                tokio::time::sleep_until(start + interval * (c as u32 + 1)).await;
            }
            (services, result)
        })
    };
    let grace = if by_dump { Duration::ZERO } else { NETLINK_GRACE };
    let mut sent_all_at: Option<Instant> = None;
    loop {
        running.check_alive()?;
        let now = Instant::now();
        let done = sender.is_finished();
        if done && sent_all_at.is_none() {
            sent_all_at = Some(now);
        }
        let since_sent = sent_all_at.map_or(Duration::ZERO, |t| now - t);
        let wants_dump = {
            let mut t = lock(&tracker);
            if let Some(why) = &t.failed {
                bail!("netlink listener: {why}");
            }
            if done && t.pending() == 0 {
                break;
            }
            if since_sent > grace + DUMP_GIVE_UP {
                eprintln!("bench:   {} changes never reached the kernel", t.pending());
                break;
            }
            if since_sent > grace && t.awaiting_events() > 0 {
                eprintln!(
                    "bench:   {} changes not announced within {grace:?}; looking in dumps",
                    t.awaiting_events()
                );
                t.all_to_dump();
            }
            // `--detect poll` dumps all along, whether or not a change is pending.
            by_dump || t.wants_dump()
        };
        if !wants_dump {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let dump = running.poll_dump()?;
        let end = Instant::now();
        {
            let mut t = lock(&tracker);
            proxy::scan_ips(&dump, |ip| t.dumped(ip, end));
        }
        tokio::time::sleep(gap(end - now, args.poll_gap)).await;
    }
    let (services, result) = sender.await?;
    model.services = services;
    result?;
    let mut t = lock(&tracker);
    let done = std::mem::take(&mut t.done);
    if t.overruns > 0 {
        eprintln!(
            "bench:   {} netlink overruns; {} changes resolved by dump",
            t.overruns,
            done.iter().filter(|d| d.1 == Source::Dump).count()
        );
    }
    Ok(Phase { lost: count - done.len(), done, overruns: t.overruns })
}

/// The pause after a kernel dump that took `took`.
fn gap(took: Duration, ratio: f64) -> Duration {
    Duration::from_millis(5).max(took.mul_f64(ratio.max(0.0)))
}
