//! Results: per-run and per-change CSVs written as the benchmark goes, then medians, the
//! fleetproxy/kube-proxy table and a PNG plot.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::{
    Detect,
    cold::Fallback,
    load::Point,
    netlink::Source,
    proxy::{Mode, Variant},
};

#[derive(Clone, Debug)]
pub struct RunResult {
    pub point: Point,
    pub mode: Mode,
    pub variant: Variant,
    pub repeat: usize,
    /// Proxy start to the cold start's end: the arrival of the netlink event after which every
    /// address of the load had been announced, confirmed by a dump; or, if `cold_fallback`, the
    /// end of the first kernel dump holding them all. None: not within `--cold-timeout-s`.
    pub cold_s: Option<f64>,
    /// Why the cold start is the polled figure, not netlink's.
    pub cold_fallback: Option<Fallback>,
    /// Netlink's end, taken or not.
    pub cold_netlink_s: Option<f64>,
    /// Proxy start to the end of the first kernel dump holding the whole load.
    pub cold_poll_s: Option<f64>,
    /// How long that dump took (the resolution of `cold_poll_s`).
    pub poll_s: Option<f64>,
    /// Netlink overruns before the cold start's end.
    pub cold_overruns: usize,
    /// iptables-restore / nft -f of the same ruleset into a fresh namespace.
    pub floor_s: Option<f64>,
    /// CPU of the process tree at the cold start's end.
    pub cpu_cold_s: Option<f64>,
    pub cpu_total_s: f64,
    pub rss_mib: f64,
    pub lines: Option<usize>,
    /// Bytes of the dump (`iptables-save` / `nft list table`), both families.
    pub bytes: Option<usize>,
    /// Syncs the proxy reported during the whole run, and their mean duration (its own metric).
    pub syncs: f64,
    pub sync_mean_ms: f64,
    /// How the latency phase saw the changes (`--detect`).
    pub detect: Detect,
    pub changes: usize,
    /// Changes whose latency ends with a kernel dump: every one with `--detect poll`; with
    /// netlink, those pending at an overrun or still pending after the grace period.
    pub by_dump: usize,
    /// Netlink overruns (ENOBUFS) during the latency phase.
    pub overruns: usize,
    pub lost: usize,
}

impl RunResult {
    /// How the cold start was taken: `netlink`, `dump` (see `cold_fallback`) or `timeout`.
    pub fn cold_by(&self) -> &'static str {
        match (self.cold_s, self.cold_fallback) {
            (None, _) => "timeout",
            (Some(_), Some(_)) => "dump",
            (Some(_), None) => "netlink",
        }
    }

    pub fn describe(&self, lat: &[Latency]) -> String {
        let mut ms: Vec<f64> = lat.iter().map(|l| l.ms).collect();
        let cold = match self.cold_s {
            None => "cold start timed out".to_owned(),
            Some(c) => format!(
                "cold {c:.2}s by {}{} (netlink {}s, first complete dump {}s, which took {}s)",
                self.cold_by(),
                self.cold_fallback.map_or(String::new(), |f| format!(": {}", f.name())),
                or_dash(num(self.cold_netlink_s, 2)),
                or_dash(num(self.cold_poll_s, 2)),
                or_dash(num(self.poll_s, 2)),
            ),
        };
        format!(
            "{cold}, floor {}s, cpu {}s/{:.2}s, rss {:.0} MiB, {} entries, {} syncs of {} ms, latency p50 {} ms p99 {} ms ({} changes by {}: {} resolved by dump, {} overruns, {} lost)",
            or_dash(num(self.floor_s, 2)),
            or_dash(num(self.cpu_cold_s, 2)),
            self.cpu_total_s,
            self.rss_mib,
            self.lines.map_or("-".into(), |l| l.to_string()),
            or_dash(num(self.syncs, 0)),
            or_dash(num(self.sync_mean_ms, 0)),
            or_dash(num(percentile(&mut ms, 50.0), 0)),
            or_dash(num(percentile(&mut ms, 99.0), 0)),
            self.changes,
            self.detect.name(),
            self.by_dump,
            self.overruns,
            self.lost
        )
    }
}

#[derive(Clone, Debug)]
pub struct Latency {
    pub point: Point,
    pub mode: Mode,
    pub variant: Variant,
    pub repeat: usize,
    pub ms: f64,
    pub source: Source,
}

type Key = (String, Mode, Variant);

/// Medians over the repeats, percentiles over the pooled changes.
#[derive(Clone, Debug, Default)]
struct Summary {
    runs: usize,
    /// Medians with a timed-out run as +infinity (slower than any finished one).
    cold_s: f64,
    cold_poll_s: f64,
    poll_s: f64,
    cold_timeouts: usize,
    /// Runs whose cold start is the polled figure.
    cold_by_dump: usize,
    cold_overruns: usize,
    floor_s: f64,
    cpu_cold_s: f64,
    cpu_total_s: f64,
    rss_mib: f64,
    lines: f64,
    sync_mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    changes: usize,
    by_dump: usize,
    overruns: usize,
    lost: usize,
}

pub struct Results {
    dir: PathBuf,
    /// `--cold-timeout-s`, to show what a timed-out cold start means.
    cold_timeout_s: u64,
    runs_csv: File,
    lat_csv: File,
    runs: Vec<RunResult>,
    latencies: Vec<Latency>,
}

pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// The median of the values present (NaN for none).
fn median_of(values: impl Iterator<Item = Option<f64>>) -> f64 {
    median(&mut values.flatten().filter(|v| !v.is_nan()).collect::<Vec<_>>())
}

/// `v` with `digits` decimals; empty for a missing or non-finite value (CSV).
fn num(v: impl Into<Option<f64>>, digits: usize) -> String {
    match v.into() {
        // `+ 0.0`: no "-0" for a negative zero.
        Some(v) if v.is_finite() => format!("{:.digits$}", v + 0.0),
        _ => String::new(),
    }
}

/// `-` for an empty field (log lines).
fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

/// Nearest-rank percentile; NaN for no data.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

impl Results {
    pub fn create(dir: &Path, cold_timeout_s: u64) -> Result<Self> {
        let mut runs_csv = File::create(dir.join("runs.csv"))?;
        writeln!(
            runs_csv,
            "point,mode,proxy,repeat,cold_s,cold_by,cold_fallback,cold_netlink_s,cold_poll_s,poll_s,cold_overruns,floor_s,cpu_cold_s,cpu_total_s,peak_rss_mib,ruleset_entries,ruleset_bytes,syncs,sync_mean_ms,detect,changes,by_dump,overruns,lost"
        )?;
        let mut lat_csv = File::create(dir.join("latencies.csv"))?;
        writeln!(lat_csv, "point,mode,proxy,repeat,latency_ms,detected_by")?;
        Ok(Self {
            dir: dir.to_owned(),
            cold_timeout_s,
            runs_csv,
            lat_csv,
            runs: Vec::new(),
            latencies: Vec::new(),
        })
    }

    pub fn add(&mut self, run: RunResult, lat: Vec<Latency>) -> Result<()> {
        writeln!(
            self.runs_csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.1},{},{},{},{},{},{},{},{},{}",
            run.point,
            run.mode.name(),
            run.variant.name(),
            run.repeat,
            num(run.cold_s, 4),
            run.cold_by(),
            run.cold_fallback.map_or("", Fallback::name),
            num(run.cold_netlink_s, 4),
            num(run.cold_poll_s, 4),
            num(run.poll_s, 4),
            run.cold_overruns,
            num(run.floor_s, 4),
            num(run.cpu_cold_s, 3),
            run.cpu_total_s,
            run.rss_mib,
            run.lines.map_or(String::new(), |l| l.to_string()),
            run.bytes.map_or(String::new(), |b| b.to_string()),
            num(run.syncs, 0),
            num(run.sync_mean_ms, 1),
            run.detect.name(),
            run.changes,
            run.by_dump,
            run.overruns,
            run.lost
        )?;
        for l in &lat {
            writeln!(
                self.lat_csv,
                "{},{},{},{},{:.1},{}",
                l.point,
                l.mode.name(),
                l.variant.name(),
                l.repeat,
                l.ms,
                l.source.name()
            )?;
        }
        self.runs_csv.flush()?;
        self.lat_csv.flush()?;
        self.runs.push(run);
        self.latencies.extend(lat);
        Ok(())
    }

    fn summaries(&self) -> BTreeMap<Key, Summary> {
        let mut grouped: BTreeMap<Key, (Vec<&RunResult>, Vec<f64>)> = BTreeMap::new();
        for r in &self.runs {
            grouped.entry((r.point.to_string(), r.mode, r.variant)).or_default().0.push(r);
        }
        for l in &self.latencies {
            grouped.entry((l.point.to_string(), l.mode, l.variant)).or_default().1.push(l.ms);
        }
        grouped
            .into_iter()
            .map(|(key, (runs, mut lat))| {
                let m = |f: fn(&RunResult) -> Option<f64>| median_of(runs.iter().map(|r| f(r)));
                let summary = Summary {
                    runs: runs.len(),
                    cold_s: m(|r| Some(r.cold_s.unwrap_or(f64::INFINITY))),
                    cold_poll_s: m(|r| Some(r.cold_poll_s.unwrap_or(f64::INFINITY))),
                    poll_s: m(|r| r.poll_s),
                    cold_timeouts: runs.iter().filter(|r| r.cold_s.is_none()).count(),
                    cold_by_dump: runs
                        .iter()
                        .filter(|r| r.cold_s.is_some() && r.cold_fallback.is_some())
                        .count(),
                    cold_overruns: runs.iter().map(|r| r.cold_overruns).sum(),
                    floor_s: m(|r| r.floor_s),
                    cpu_cold_s: m(|r| r.cpu_cold_s),
                    cpu_total_s: m(|r| Some(r.cpu_total_s)),
                    rss_mib: m(|r| Some(r.rss_mib)),
                    lines: m(|r| r.lines.map(|l| l as f64)),
                    sync_mean_ms: m(|r| Some(r.sync_mean_ms)),
                    p50_ms: percentile(&mut lat, 50.0),
                    p99_ms: percentile(&mut lat, 99.0),
                    changes: runs.iter().map(|r| r.changes).sum(),
                    by_dump: runs.iter().map(|r| r.by_dump).sum(),
                    overruns: runs.iter().map(|r| r.overruns).sum(),
                    lost: runs.iter().map(|r| r.lost).sum(),
                };
                (key, summary)
            })
            .collect()
    }

    /// Writes summary.csv, table.md and bench.png; returns the table.
    pub fn finish(&self, points: &[Point], modes: &[Mode], variants: &[Variant]) -> Result<String> {
        let summaries = self.summaries();
        let mut csv = String::from(
            "point,mode,proxy,runs,cold_s,cold_poll_s,poll_s,cold_timeouts,cold_by_dump,cold_overruns,floor_s,cold_over_floor,cpu_cold_s,cpu_total_s,peak_rss_mib,ruleset_entries,sync_mean_ms,p50_ms,p99_ms,changes,by_dump,overruns,lost\n",
        );
        for ((point, mode, variant), s) in &summaries {
            let _ = writeln!(
                csv,
                "{point},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                mode.name(),
                variant.name(),
                s.runs,
                num(s.cold_s, 4),
                num(s.cold_poll_s, 4),
                num(s.poll_s, 4),
                s.cold_timeouts,
                s.cold_by_dump,
                s.cold_overruns,
                num(s.floor_s, 4),
                num(s.cold_s / s.floor_s, 3),
                num(s.cpu_cold_s, 3),
                num(s.cpu_total_s, 3),
                num(s.rss_mib, 1),
                num(s.lines, 0),
                num(s.sync_mean_ms, 1),
                num(s.p50_ms, 1),
                num(s.p99_ms, 1),
                s.changes,
                s.by_dump,
                s.overruns,
                s.lost
            );
        }
        std::fs::write(self.dir.join("summary.csv"), csv)?;
        let mut table = table(&summaries, points, modes, variants, self.cold_timeout_s);
        let _ = write!(table, "{}", self.cold_notes());
        let netlink = self.runs.iter().filter(|r| r.detect == Detect::Netlink);
        let (by_dump, overruns) = netlink.fold((0, 0), |(d, o), r| (d + r.by_dump, o + r.overruns));
        if by_dump > 0 || overruns > 0 {
            let _ = writeln!(
                table,
                "\n{by_dump} endpoint changes were resolved by a kernel dump, not by their netlink event \
                 ({overruns} overruns; see runs.csv)."
            );
        }
        std::fs::write(self.dir.join("table.md"), &table)?;
        let png = self.dir.join("bench.png");
        if let Err(e) = plot(&summaries, points, modes, variants, &png) {
            eprintln!("bench: no plot: {e:#}");
        }
        Ok(table)
    }
}

impl Results {
    /// Lines under the table on how the cold starts were taken, if not all by netlink.
    fn cold_notes(&self) -> String {
        let mut notes = String::new();
        let mut fallbacks: BTreeMap<&str, usize> = BTreeMap::new();
        for r in self.runs.iter().filter(|r| r.cold_s.is_some()) {
            if let Some(f) = r.cold_fallback {
                *fallbacks.entry(f.name()).or_default() += 1;
            }
        }
        let by_dump: usize = fallbacks.values().sum();
        if by_dump > 0 {
            let why: Vec<String> = fallbacks.iter().map(|(f, n)| format!("{n} {f}")).collect();
            let _ = writeln!(
                notes,
                "\n{by_dump} of {} cold starts are the polled figure (end of the first kernel dump holding every \
                 address), not the netlink event's: {} (`cold_fallback` in runs.csv).",
                self.runs.len(),
                why.join(", ")
            );
        }
        let timeouts = self.runs.iter().filter(|r| r.cold_s.is_none()).count();
        if timeouts > 0 {
            let _ = writeln!(
                notes,
                "\n{timeouts} of {} runs did not finish their cold start within {} s (no latency phase; \
                 `cold_by` = timeout in runs.csv); medians count them as slower than any finished run.",
                self.runs.len(),
                self.cold_timeout_s
            );
        }
        notes
    }
}

/// A cold start in the table: seconds, or a timeout.
fn cold_secs(v: f64, timeout_s: u64) -> String {
    if v.is_infinite() { format!("> {timeout_s} s (timed out)") } else { format!("{v:.2}") }
}

fn cold_cell(fp: f64, kp: f64, timeout_s: u64) -> String {
    if fp.is_nan() || kp.is_nan() {
        return "-".into();
    }
    let ratio = if fp.is_finite() && kp.is_finite() { format!(" ({:.2}×)", fp / kp) } else { String::new() };
    format!("{} / {}{ratio}", cold_secs(fp, timeout_s), cold_secs(kp, timeout_s))
}

/// `a / b` with 2 decimals, or `-`.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() { format!("{r:.2}") } else { "-".into() }
}

fn cell(fp: f64, kp: f64, digits: usize) -> String {
    if fp.is_nan() || kp.is_nan() {
        return "-".into();
    }
    format!("{fp:.digits$} / {kp:.digits$} ({:.2}×)", fp / kp)
}

fn table(
    summaries: &BTreeMap<Key, Summary>,
    points: &[Point],
    modes: &[Mode],
    variants: &[Variant],
    cold_timeout_s: u64,
) -> String {
    let mut t = String::from(
        "Medians; each cell is fleetproxy / kube-proxy (ratio). Cold start (to the netlink event of its last address) \
         and its floor in seconds, latency in ms \
         (pooled over the repeats), CPU in seconds to the first complete sync, peak RSS of the process tree in MiB.\n\n\
         | point | mode | kube-proxy config | cold start s | kernel floor s | fleetproxy cold/floor | latency p50 ms | latency p99 ms | CPU s (cold) | peak RSS MiB | ruleset entries | mean sync ms (own metric) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for point in points {
        for &mode in modes {
            let Some(fp) = summaries.get(&(point.to_string(), mode, Variant::Fleetproxy)) else { continue };
            for &kpv in variants.iter().filter(|v| **v != Variant::Fleetproxy) {
                let Some(kp) = summaries.get(&(point.to_string(), mode, kpv)) else { continue };
                let config = if kpv == Variant::KubeProxyDefaults { "defaults" } else { "equal" };
                let _ = writeln!(
                    t,
                    "| {point} | {} | {config} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    mode.name(),
                    cold_cell(fp.cold_s, kp.cold_s, cold_timeout_s),
                    cell(fp.floor_s, kp.floor_s, 3),
                    ratio(fp.cold_s, fp.floor_s),
                    cell(fp.p50_ms, kp.p50_ms, 0),
                    cell(fp.p99_ms, kp.p99_ms, 0),
                    cell(fp.cpu_cold_s, kp.cpu_cold_s, 2),
                    cell(fp.rss_mib, kp.rss_mib, 0),
                    cell(fp.lines, kp.lines, 0),
                    cell(fp.sync_mean_ms, kp.sync_mean_ms, 0),
                );
            }
        }
    }
    let lost: usize = summaries.values().map(|s| s.lost).sum();
    if lost > 0 {
        let _ = writeln!(t, "\n{lost} endpoint changes never reached the kernel (see summary.csv).");
    }
    t
}

/// One plotted figure of a summary.
type Metric = fn(&Summary) -> f64;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn plot(
    summaries: &BTreeMap<Key, Summary>,
    points: &[Point],
    modes: &[Mode],
    variants: &[Variant],
    path: &Path,
) -> Result<()> {
    let font = FONTS
        .iter()
        .find_map(|f| std::fs::read(f).ok())
        .context("no TrueType font found (install fonts-dejavu-core)")?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("cannot load the font"))?;
    let root = BitMapBackend::new(path, (1600, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled("fleetproxy vs kube-proxy (medians; log scale)", ("sans-serif", 28))?;
    let panels = root.split_evenly((2, 2));
    let metrics: [(&str, Metric); 4] = [
        ("cold start to first complete sync (s)", |s| s.cold_s),
        ("endpoint change -> kernel, p99 (ms)", |s| s.p99_ms),
        ("peak RSS of the process tree (MiB)", |s| s.rss_mib),
        ("CPU to first complete sync (s)", |s| s.cpu_cold_s),
    ];
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let labels: Vec<String> = points.iter().map(ToString::to_string).collect();
    for (panel, (title, metric)) in panels.iter().zip(metrics) {
        let values: Vec<f64> = summaries.values().map(metric).filter(|v| v.is_finite() && *v > 0.0).collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min).min(1e9) * 0.7;
        let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 2.0) * 1.4;
        let (lo, hi) = if lo.is_finite() && lo > 0.0 { (lo, hi) } else { (0.01, 1.0) };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.3f64..(points.len() as f64 - 0.7), (lo..hi).log_scale())?;
        let labels = labels.clone();
        chart
            .configure_mesh()
            .x_labels(points.len().max(2))
            .x_label_formatter(&move |x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| if *y >= 10.0 { format!("{y:.0}") } else { format!("{y:.2}") })
            .y_labels(8)
            .draw()?;
        let mut color = 0;
        for &mode in modes {
            for &variant in variants {
                let series: Vec<(f64, f64)> = points
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        let v = metric(summaries.get(&(p.to_string(), mode, variant))?);
                        (v.is_finite() && v > 0.0).then_some((i as f64, v))
                    })
                    .collect();
                let style = palette[color % palette.len()];
                color += 1;
                let label = format!("{} {}", variant.name(), mode.name());
                chart
                    .draw_series(LineSeries::new(series.clone(), style.stroke_width(2)))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style.stroke_width(2)));
                chart.draw_series(series.iter().map(|&(x, y)| Circle::new((x, y), 4, style.filled())))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(variant: Variant, repeat: usize, cold_s: Option<f64>, fallback: Option<Fallback>) -> RunResult {
        RunResult {
            point: Point { services: 10, endpoints: 10 },
            mode: Mode::Iptables,
            variant,
            repeat,
            cold_s,
            cold_fallback: fallback,
            cold_netlink_s: cold_s,
            cold_poll_s: cold_s.map(|c| c + 0.5),
            poll_s: cold_s.map(|_| 0.1),
            cold_overruns: 0,
            floor_s: cold_s.map(|_| 1.0),
            cpu_cold_s: cold_s.map(|_| 0.5),
            cpu_total_s: 2.0,
            rss_mib: 30.0,
            lines: cold_s.map(|_| 100),
            bytes: cold_s.map(|_| 1000),
            syncs: 3.0,
            sync_mean_ms: 10.0,
            detect: Detect::Netlink,
            changes: 0,
            by_dump: 0,
            overruns: 0,
            lost: 0,
        }
    }

    fn results(runs: Vec<RunResult>) -> (tempdir::Dir, Results) {
        let dir = tempdir::Dir::new();
        let mut r = Results::create(&dir.0, 900).expect("results");
        for run in runs {
            r.add(run, Vec::new()).expect("add");
        }
        (dir, r)
    }

    /// A directory under the system's temporary one, removed on drop.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("fleetproxy-bench-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).expect("temp dir");
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn timeouts_count_as_slowest_in_the_median() {
        let fp = Variant::Fleetproxy;
        let (_dir, r) = results(vec![
            run(fp, 0, Some(3.0), None),
            run(fp, 1, None, None),
            run(fp, 2, Some(1.0), Some(Fallback::Late)),
        ]);
        let s = &r.summaries()[&("10x10".to_owned(), Mode::Iptables, fp)];
        // 1, 3, timeout: the median is 3; floor and CPU over the finished runs only.
        assert_eq!((s.cold_s, s.cold_timeouts, s.cold_by_dump), (3.0, 1, 1));
        assert_eq!((s.floor_s, s.cpu_total_s), (1.0, 2.0));
        let (_dir, r) =
            results(vec![run(fp, 0, None, None), run(fp, 1, None, None), run(fp, 2, Some(1.0), None)]);
        let s = &r.summaries()[&("10x10".to_owned(), Mode::Iptables, fp)];
        assert!(s.cold_s.is_infinite());
    }

    #[test]
    fn a_timed_out_cell_says_so() {
        assert_eq!(cold_cell(f64::INFINITY, 2.0, 900), "> 900 s (timed out) / 2.00");
        assert_eq!(cold_cell(1.0, 2.0, 900), "1.00 / 2.00 (0.50×)");
        assert_eq!(cold_cell(f64::NAN, 2.0, 900), "-");
        assert_eq!(ratio(f64::INFINITY, f64::NAN), "-");
    }

    #[test]
    fn csvs_leave_missing_values_empty() {
        let (dir, r) = results(vec![
            run(Variant::Fleetproxy, 0, None, None),
            run(Variant::KubeProxyEqual, 0, Some(2.0), Some(Fallback::Disagreed)),
        ]);
        let table = r.finish(
            &["10x10".parse().expect("point")],
            &[Mode::Iptables],
            &[Variant::Fleetproxy, Variant::KubeProxyEqual],
        );
        let table = table.expect("table");
        assert!(table.contains("| > 900 s (timed out) / 2.00 |"), "{table}");
        assert!(table.contains("1 of 2 runs did not finish their cold start within 900 s"), "{table}");
        assert!(table.contains("1 of 2 cold starts are the polled figure"), "{table}");
        let runs = std::fs::read_to_string(dir.0.join("runs.csv")).expect("runs.csv");
        let lines: Vec<&str> = runs.lines().collect();
        assert!(lines[0].starts_with(
            "point,mode,proxy,repeat,cold_s,cold_by,cold_fallback,cold_netlink_s,cold_poll_s,poll_s,"
        ));
        assert!(
            lines[1].starts_with("10x10,iptables,fleetproxy,0,,timeout,,,,,0,,,2.000,30.0,,,3,10.0,"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("10x10,iptables,kube-proxy,0,2.0000,dump,disagreed,2.0000,2.5000,0.1000,0,"),
            "{}",
            lines[2]
        );
        let summary = std::fs::read_to_string(dir.0.join("summary.csv")).expect("summary.csv");
        assert!(summary.contains("10x10,iptables,fleetproxy,1,,,,1,0,0,,"), "{summary}");
    }
}
