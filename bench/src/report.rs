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
    /// Proxy start to the end of the first kernel dump holding the whole load.
    pub cold_s: f64,
    /// How long that dump took (the resolution of `cold_s`).
    pub poll_s: f64,
    /// iptables-restore / nft -f of the same ruleset into a fresh namespace.
    pub floor_s: f64,
    pub cpu_cold_s: f64,
    pub cpu_total_s: f64,
    pub rss_mib: f64,
    pub lines: usize,
    /// Bytes of the dump (`iptables-save` / `nft list table`), both families.
    pub bytes: usize,
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
    pub fn describe(&self, lat: &[Latency]) -> String {
        let mut ms: Vec<f64> = lat.iter().map(|l| l.ms).collect();
        format!(
            "cold {:.2}s (poll {:.2}s), floor {:.2}s, cpu {:.2}s/{:.2}s, rss {:.0} MiB, {} entries, {} syncs of {:.0} ms, latency p50 {:.0} ms p99 {:.0} ms ({} changes by {}: {} resolved by dump, {} overruns, {} lost)",
            self.cold_s,
            self.poll_s,
            self.floor_s,
            self.cpu_cold_s,
            self.cpu_total_s,
            self.rss_mib,
            self.lines,
            self.syncs,
            self.sync_mean_ms,
            percentile(&mut ms, 50.0),
            percentile(&mut ms, 99.0),
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
    cold_s: f64,
    poll_s: f64,
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
    runs_csv: File,
    lat_csv: File,
    runs: Vec<RunResult>,
    latencies: Vec<Latency>,
}

pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
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
    pub fn create(dir: &Path) -> Result<Self> {
        let mut runs_csv = File::create(dir.join("runs.csv"))?;
        writeln!(
            runs_csv,
            "point,mode,proxy,repeat,cold_s,poll_s,floor_s,cpu_cold_s,cpu_total_s,peak_rss_mib,ruleset_entries,ruleset_bytes,syncs,sync_mean_ms,detect,changes,by_dump,overruns,lost"
        )?;
        let mut lat_csv = File::create(dir.join("latencies.csv"))?;
        writeln!(lat_csv, "point,mode,proxy,repeat,latency_ms,detected_by")?;
        Ok(Self { dir: dir.to_owned(), runs_csv, lat_csv, runs: Vec::new(), latencies: Vec::new() })
    }

    pub fn add(&mut self, run: RunResult, lat: Vec<Latency>) -> Result<()> {
        writeln!(
            self.runs_csv,
            "{},{},{},{},{:.4},{:.4},{:.4},{:.3},{:.3},{:.1},{},{},{},{:.1},{},{},{},{},{}",
            run.point,
            run.mode.name(),
            run.variant.name(),
            run.repeat,
            run.cold_s,
            run.poll_s,
            run.floor_s,
            run.cpu_cold_s,
            run.cpu_total_s,
            run.rss_mib,
            run.lines,
            run.bytes,
            run.syncs,
            run.sync_mean_ms,
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
                let m = |f: fn(&RunResult) -> f64| median(&mut runs.iter().map(|r| f(r)).collect::<Vec<_>>());
                let summary = Summary {
                    runs: runs.len(),
                    cold_s: m(|r| r.cold_s),
                    poll_s: m(|r| r.poll_s),
                    floor_s: m(|r| r.floor_s),
                    cpu_cold_s: m(|r| r.cpu_cold_s),
                    cpu_total_s: m(|r| r.cpu_total_s),
                    rss_mib: m(|r| r.rss_mib),
                    lines: m(|r| r.lines as f64),
                    sync_mean_ms: m(|r| r.sync_mean_ms),
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
            "point,mode,proxy,runs,cold_s,poll_s,floor_s,cold_over_floor,cpu_cold_s,cpu_total_s,peak_rss_mib,ruleset_entries,sync_mean_ms,p50_ms,p99_ms,changes,by_dump,overruns,lost\n",
        );
        for ((point, mode, variant), s) in &summaries {
            let _ = writeln!(
                csv,
                "{point},{},{},{},{:.4},{:.4},{:.4},{:.3},{:.3},{:.3},{:.1},{:.0},{:.1},{:.1},{:.1},{},{},{},{}",
                mode.name(),
                variant.name(),
                s.runs,
                s.cold_s,
                s.poll_s,
                s.floor_s,
                s.cold_s / s.floor_s,
                s.cpu_cold_s,
                s.cpu_total_s,
                s.rss_mib,
                s.lines,
                s.sync_mean_ms,
                s.p50_ms,
                s.p99_ms,
                s.changes,
                s.by_dump,
                s.overruns,
                s.lost
            );
        }
        std::fs::write(self.dir.join("summary.csv"), csv)?;
        let mut table = table(&summaries, points, modes, variants);
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
) -> String {
    let mut t = String::from(
        "Medians; each cell is fleetproxy / kube-proxy (ratio). Cold start and its floor in seconds, latency in ms \
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
                    "| {point} | {} | {config} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |",
                    mode.name(),
                    cell(fp.cold_s, kp.cold_s, 2),
                    cell(fp.floor_s, kp.floor_s, 3),
                    fp.cold_s / fp.floor_s,
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
