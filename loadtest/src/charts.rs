//! SVG charts drawn from the JSON that `compare --json` writes: per system, deliveries/s and p99
//! latency against the offered rate (fan-out runs), and server memory per idle connection
//! (connect runs). Hand-written SVG: no plotting dependency, a file any browser or Markdown
//! viewer shows.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;

/// Arguments of `charts`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ChartsArgs {
    /// `compare fanout --json` outputs: one chart pair (deliveries/s, p99) per file.
    #[arg(long, value_delimiter = ',')]
    pub(crate) fanout: Vec<PathBuf>,
    /// `compare connect --json` outputs: one bar chart of KiB per idle connection per file.
    #[arg(long, value_delimiter = ',')]
    pub(crate) connect: Vec<PathBuf>,
    /// Directory the SVG files go to.
    #[arg(long, default_value = "docs/charts")]
    pub(crate) out: PathBuf,
}

const COLORS: [&str; 8] = [
    "#1b6ac9", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c", "#495057",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn read_runs(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    v.as_array()
        .cloned()
        .ok_or_else(|| format!("{}: not a `compare --json` output", path.display()))
}

/// A system's display name, from its JSON name.
fn label(system: &str) -> &str {
    match system {
        "ours" => "ours",
        "baseline" => "ours (baseline)",
        "reference" => "reference 0.1.0",
        "axum" => "axum + broadcast",
        "socketioxide" => "socketioxide + Redis adapter",
        "socket-io" => "Socket.IO (Node) + Redis adapter",
        "limit-single" => "limit (single)",
        "limit-batch" => "limit (batch)",
        other => other,
    }
}

/// (delivered deliveries/s, p99 ms, delivered fraction) of one step.
type Point = (f64, f64, f64);

/// Per system (in first-seen order): per offered deliveries/s, the medians over reps of
/// (delivered deliveries/s, p99 ms, delivered fraction).
type Series = Vec<(String, BTreeMap<u64, Point>)>;

fn fanout_series(runs: &[Value]) -> (Series, u64) {
    let mut order: Vec<String> = Vec::new();
    let mut raw: BTreeMap<String, BTreeMap<u64, Vec<Point>>> = BTreeMap::new();
    let mut subscribers = 0;
    for run in runs {
        let Some(system) = run["system"].as_str() else {
            continue;
        };
        let ok = &run["result"]["Ok"];
        let subs = ok["args"]["subscribers"].as_u64().unwrap_or(0);
        subscribers = subscribers.max(subs);
        let Some(steps) = ok["steps"].as_array() else {
            continue;
        };
        if !order.iter().any(|s| s == system) {
            order.push(system.to_string());
        }
        for st in steps {
            let offered = st["publishes_per_s"].as_f64().unwrap_or(0.0) * subs as f64;
            let got = st["deliveries_per_s"].as_f64().unwrap_or(0.0);
            let p99 = st["latency"]["p99_ms"].as_f64().unwrap_or(f64::NAN);
            let frac = st["delivered_fraction"].as_f64().unwrap_or(0.0);
            raw.entry(system.to_string())
                .or_default()
                .entry(offered.round() as u64)
                .or_default()
                .push((got, p99, frac));
        }
    }
    let series = order
        .into_iter()
        .map(|sys| {
            let points = raw
                .remove(&sys)
                .unwrap_or_default()
                .into_iter()
                .map(|(x, v)| {
                    let m = |f: fn(&Point) -> f64| median(v.iter().map(f).collect());
                    (x, (m(|p| p.0), m(|p| p.1), m(|p| p.2)))
                })
                .collect();
            (sys, points)
        })
        .collect();
    (series, subscribers)
}

/// Log-scale position of `v` in `[lo, hi]` over `len` pixels.
fn log_pos(v: f64, lo: f64, hi: f64, len: f64) -> f64 {
    (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()) * len
}

/// Powers of ten (and their 2× and 5×) between `lo` and `hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = p * m;
            if v >= lo * 0.9999 && v <= hi * 1.0001 {
                out.push(v);
            }
        }
        p *= 10.0;
    }
    out
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A log-log line chart: x = offered deliveries/s, y from `pick`.
fn line_chart(
    title: &str,
    y_label: &str,
    series: &Series,
    pick: fn(&Point) -> f64,
    bound: Option<f64>,
) -> String {
    let (w, h, left, right, top, bottom) = (800.0, 440.0, 80.0, 270.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.keys().map(|&x| x as f64))
        .filter(|x| *x > 0.0)
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.values().map(pick))
        .chain(bound)
        .filter(|y| y.is_finite() && *y > 0.0)
        .collect();
    let fold = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().cloned().fold(init, f);
    let x_lo = 10f64.powf(fold(&xs, f64::min, f64::MAX).log10().floor());
    let x_hi = 10f64.powf(fold(&xs, f64::max, 1.0).log10().ceil());
    let y_lo = 10f64.powf(fold(&ys, f64::min, f64::MAX).log10().floor());
    let y_hi = 10f64.powf(fold(&ys, f64::max, 1.0).log10().ceil());
    let px = |x: f64| left + log_pos(x, x_lo, x_hi, pw);
    let py = |y: f64| top + ph - log_pos(y, y_lo, y_hi, ph);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        esc(title)
    );
    for x in log_ticks(x_lo, x_hi) {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#e5e5e5"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            px(x),
            top,
            top + ph,
            top + ph + 16.0,
            human(x)
        );
    }
    for y in log_ticks(y_lo, y_hi) {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#e5e5e5"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            left,
            py(y),
            left + pw,
            left - 6.0,
            py(y) + 4.0,
            human(y)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">offered deliveries/s (publishes/s × subscribers)</text>"#,
        left + pw / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        esc(y_label)
    );
    if let Some(b) = bound {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#999" stroke-dasharray="6 4"/><text x="{2}" y="{3:.1}" text-anchor="end" fill="#666">bound {4} ms</text>"##,
            py(b),
            left + pw,
            left + pw - 4.0,
            py(b) - 4.0,
            trim(b)
        );
    }
    for (i, (sys, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = points
            .iter()
            .filter(|(x, v)| **x > 0 && pick(v).is_finite() && pick(v) > 0.0)
            .map(|(x, v)| format!("{:.1},{:.1}", px(*x as f64), py(pick(v))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for (x, v) in points {
            if *x == 0 || !pick(v).is_finite() || pick(v) <= 0.0 {
                continue;
            }
            // A hollow marker: less than 99.9% of the messages were delivered at this step.
            let fill = if v.2 >= 0.999 { color } else { "white" };
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{fill}" stroke="{color}" stroke-width="1.5"/>"#,
                px(*x as f64),
                py(pick(v))
            );
        }
        let ly = top + 14.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{color}" stroke-width="2"/><text x="{3}" y="{4}">{5}</text>"#,
            left + pw + 12.0,
            ly,
            left + pw + 32.0,
            left + pw + 38.0,
            ly + 4.0,
            esc(label(sys))
        );
    }
    let ly = top + 14.0 + series.len() as f64 * 20.0 + 10.0;
    let _ = writeln!(
        s,
        r##"<circle cx="{}" cy="{ly}" r="3.5" fill="white" stroke="#333"/><text x="{}" y="{}">&lt; 99.9% delivered</text>"##,
        left + pw + 22.0,
        left + pw + 38.0,
        ly + 4.0
    );
    s.push_str("</svg>\n");
    s
}

/// A horizontal bar chart of median KiB per idle connection per system.
fn bar_chart(title: &str, bars: &[(String, f64)]) -> String {
    let (w, left, right, top, row) = (760.0, 240.0, 90.0, 44.0, 30.0);
    let h = top + row * bars.len() as f64 + 30.0;
    let pw = w - left - right;
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for (i, (sys, kib)) in bars.iter().enumerate() {
        let y = top + i as f64 * row;
        let bw = (kib / max * pw).max(1.0);
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{left}" y="{}" width="{bw:.1}" height="{}" fill="{color}"/><text x="{}" y="{}">{:.1} KiB</text>"#,
            left - 8.0,
            y + row / 2.0 + 4.0,
            esc(label(sys)),
            y + 4.0,
            row - 8.0,
            left + bw + 6.0,
            y + row / 2.0 + 4.0,
            kib
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Writes the charts; returns the files written.
pub(crate) fn charts(args: &ChartsArgs) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut written = Vec::new();
    let mut write = |name: String, svg: String| -> Result<(), String> {
        let p = args.out.join(name);
        std::fs::write(&p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
        written.push(p);
        Ok(())
    };
    for path in &args.fanout {
        let (series, subs) = fanout_series(&read_runs(path)?);
        let bound = |r: &Value| r["result"]["Ok"]["args"]["p99_bound_ms"].as_f64();
        let runs = read_runs(path)?;
        let p99_bound = runs.iter().find_map(bound);
        write(
            format!("fanout-{subs}-deliveries.svg"),
            line_chart(
                &format!("Fan-out to {subs} subscribers: deliveries/s (median of reps)"),
                "delivered deliveries/s",
                &series,
                |v| v.0,
                None,
            ),
        )?;
        write(
            format!("fanout-{subs}-p99.svg"),
            line_chart(
                &format!("Fan-out to {subs} subscribers: p99 latency (median of reps)"),
                "p99 latency, ms",
                &series,
                |v| v.1,
                p99_bound,
            ),
        )?;
    }
    for path in &args.connect {
        let runs = read_runs(path)?;
        let mut order: Vec<String> = Vec::new();
        let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut conns = 0;
        for run in &runs {
            let (Some(sys), Some(kib)) = (
                run["system"].as_str(),
                run["result"]["Ok"]["server_kib_per_connection"].as_f64(),
            ) else {
                continue;
            };
            conns = run["result"]["Ok"]["opened"].as_u64().unwrap_or(conns);
            if !order.iter().any(|s| s == sys) {
                order.push(sys.to_string());
            }
            per.entry(sys.to_string()).or_default().push(kib);
        }
        let bars: Vec<(String, f64)> = order
            .into_iter()
            .map(|s| {
                let m = median(per.remove(&s).unwrap_or_default());
                (s, m)
            })
            .collect();
        write(
            format!("idle-memory-{conns}.svg"),
            bar_chart(
                &format!("Server RSS per idle connection, {conns} connections (median of reps)"),
                &bars,
            ),
        )?;
    }
    Ok(written)
}
