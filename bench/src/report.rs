//! The results schema (results.json) and its renderings (results.md, results.svg).
//!
//! Schema `ferry-bench/1` is documented in bench/README.md. Fields are only ever
//! added; a change of meaning gets a new schema string.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Schema identifier written into every results.json. Do not modify; add a new one.
pub const SCHEMA: &str = "ferry-bench/1";

/// Latency percentiles of one ferry stage, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageLatency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Time spent in the stage summed over threads, seconds (when ferry reports it).
    #[serde(default)]
    pub busy_s: Option<f64>,
    /// Operations recorded (when ferry reports it).
    #[serde(default)]
    pub count: Option<u64>,
}

/// One measured run of one tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Wall-clock seconds (sender start to data in place).
    pub wall_s: f64,
    /// User CPU seconds of every process of the tool (sender and receiver trees).
    pub cpu_user_s: f64,
    /// System CPU seconds, likewise.
    pub cpu_sys_s: f64,
    /// Networked tools: CPU seconds (user + system) of the sender's process tree (the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_sender_s: Option<f64>,
    /// Networked tools: CPU seconds of the receiver's process tree (the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_receiver_s: Option<f64>,
    /// Largest resident set of any one process of the tool, bytes.
    pub peak_rss_bytes: u64,
    /// TCP payload bytes through the counting proxy, both directions (null for local tools).
    pub wire_bytes: Option<u64>,
    /// Bytes the machine read from block devices while the run was timed (/proc/vmstat
    /// pgpgin, whole machine): 0 when every read hit the warmed page cache.
    #[serde(default)]
    pub dev_read_bytes: Option<u64>,
    /// Every commands exited successfully.
    pub ok: bool,
    /// The result was compared with the source, byte for byte, and matched.
    pub identical: bool,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// ferry only: the summary's status (ok, warning, failed).
    pub ferry_status: Option<String>,
    /// ferry only: the summary's totals object, as ferry printed it.
    pub ferry_totals: Option<serde_json::Value>,
    /// ferry only: stage latencies (source stages from the summary, target stages from `serve --json`).
    pub stages: Option<BTreeMap<String, StageLatency>>,
    /// WAN scenarios: the emulated link's packets per second (both directions) during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_pps: Option<f64>,
    /// WAN scenarios: packets the link's full queue dropped during the run (both directions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_drops: Option<u64>,
    /// iperf3 only: the payload bits per second it received (the link's capacity as TCP sees it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_bps: Option<f64>,
}

/// All runs of one tool in one scenario, with their summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    /// Scenario id, e.g. `cbt-1/synth`.
    pub scenario: String,
    /// Tool id, e.g. `ferry`, `rsync`, `zstd-nc`.
    pub tool: String,
    /// The measured command (sender side; the receiver is in `receiver`).
    pub command: String,
    /// The receiver's command, for networked tools.
    pub receiver: Option<String>,
    /// Logical disk bytes the job covers (sum of source disk sizes).
    pub logical_bytes: u64,
    /// Every run, in the order they ran.
    pub runs: Vec<Run>,
    /// Median wall seconds (for an even count, the lower middle run).
    pub median_wall_s: f64,
    /// Fastest run.
    pub min_wall_s: f64,
    /// Slowest run.
    pub max_wall_s: f64,
    /// logical_bytes / median_wall_s, in MiB/s.
    pub throughput_mib_s: f64,
    /// CPU seconds (user + sys) of the median run.
    pub cpu_s: f64,
    /// Largest peak RSS over all runs, bytes.
    pub peak_rss_bytes: u64,
    /// Wire bytes of the median run.
    pub wire_bytes: Option<u64>,
    /// Every run ran and was byte-identical.
    pub identical: bool,
    /// ferry only: stage latencies of the median run.
    pub stages: Option<BTreeMap<String, StageLatency>>,
}

/// Something that was not measured, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skip {
    /// Scenario id, or null when the tool was skipped everywhere.
    pub scenario: Option<String>,
    /// Tool id, or null when a whole scenario was skipped.
    pub tool: Option<String>,
    /// Why.
    pub reason: String,
}

/// A test image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image id (`synth`, `ext4`, ...).
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// How it was made.
    pub description: String,
}

/// A scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioInfo {
    /// Scenario id.
    pub id: String,
    /// What it does.
    pub description: String,
    /// Bytes that differ between the target's previous state and the source (incrementals and seeding).
    pub changed_bytes: Option<u64>,
}

/// The machine the run happened on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Host name.
    pub hostname: String,
    /// Online CPUs.
    pub cpus: u64,
    /// CPU model string.
    pub cpu_model: String,
    /// Memory, bytes.
    pub mem_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
}

/// The whole results.json document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Always `ferry-bench/1`.
    pub schema: String,
    /// `quick` or `full`.
    pub profile: String,
    /// Start time, UTC, RFC 3339.
    pub started_utc: String,
    /// Seconds the whole benchmark took.
    pub duration_s: f64,
    /// The command line.
    pub command: String,
    /// Machine description.
    pub machine: Machine,
    /// Page cache state: `warm` or `dropped before every run`.
    pub cache: String,
    /// The ferry binary used.
    pub ferry: String,
    /// Images used.
    pub images: Vec<ImageInfo>,
    /// Scenarios run.
    pub scenarios: Vec<ScenarioInfo>,
    /// One entry per (scenario, tool).
    pub results: Vec<ToolResult>,
    /// What was skipped and why.
    pub skipped: Vec<Skip>,
    /// Every run of every tool ran and was byte-identical.
    pub ok: bool,
    /// Peak RSS every measured process tree starts from (this harness's own
    /// size, which Linux carries across execve): RSS figures below it mean nothing.
    #[serde(default)]
    pub rss_floor_bytes: u64,
    /// The WAN scenarios' link figures and goals (issue 18).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wan: Vec<WanReport>,
}

/// A WAN scenario seen from the link: each tool's time, wire bytes and utilisation, and the
/// goals of issue 18 with met / missed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanReport {
    /// Scenario id.
    pub scenario: String,
    /// The link's rate, bits per second.
    pub rate_bps: u64,
    /// Round-trip time, milliseconds (2 x the one-way delay).
    pub rtt_ms: f64,
    /// One row per tool (median runs).
    pub rows: Vec<WanRow>,
    /// Capacity measured on the same link by `iperf3 -P 8` (payload bits per second).
    pub capacity_bps: Option<f64>,
    /// Incrementals: the ideal time.
    pub ideal: Option<WanIdeal>,
    /// The issue's goals for this scenario.
    pub goals: Vec<WanGoal>,
}

/// One tool on the link (its median run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanRow {
    /// Tool id.
    pub tool: String,
    /// Median wall seconds.
    pub wall_s: f64,
    /// Wire bytes (TCP payload, both directions) of the median run.
    pub wire_bytes: Option<u64>,
    /// Wire bits / link rate / wall time.
    pub utilisation: Option<f64>,
    /// The link's packets per second in the median run.
    pub line_pps: Option<f64>,
    /// Packets the link dropped in the median run.
    pub line_drops: Option<u64>,
    /// ferry: TCP streams used (`"streams"` of its summary).
    pub streams: Option<u64>,
    /// ferry: zstd levels used, `level:MiB in->MiB out` (`"levels"` of its summary).
    pub levels: Option<String>,
}

/// The ideal of an incremental over the link: the changed bytes compressed, at the link rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanIdeal {
    /// zstd level (the one ferry sent most bytes at; 0: uncompressed).
    pub level: i32,
    /// Changed bytes.
    pub changed_bytes: u64,
    /// Their size compressed by `zstd -LEVEL`.
    pub compressed_bytes: u64,
    /// compressed_bytes * 8 / rate.
    pub seconds: f64,
}

/// One goal and what the run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanGoal {
    /// The goal, as the issue states it.
    pub goal: String,
    /// The figure measured.
    pub measured: String,
    /// Met (true), missed (false), or not judged (null: a tool did not run).
    pub met: Option<bool>,
}

/// Summarises runs (median by wall time).
pub fn summarize(
    scenario: &str,
    tool: &str,
    command: String,
    receiver: Option<String>,
    logical: u64,
    runs: Vec<Run>,
) -> ToolResult {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|a, b| runs[*a].wall_s.total_cmp(&runs[*b].wall_s));
    let med = order.get(order.len().saturating_sub(1) / 2).map(|i| &runs[*i]);
    let median_wall_s = med.map_or(0.0, |r| r.wall_s);
    ToolResult {
        scenario: scenario.into(),
        tool: tool.into(),
        command,
        receiver,
        logical_bytes: logical,
        median_wall_s,
        min_wall_s: order.first().map_or(0.0, |i| runs[*i].wall_s),
        max_wall_s: order.last().map_or(0.0, |i| runs[*i].wall_s),
        throughput_mib_s: if median_wall_s > 0.0 { round3(logical as f64 / MIB / median_wall_s) } else { 0.0 },
        cpu_s: med.map_or(0.0, |r| round3(r.cpu_user_s + r.cpu_sys_s)),
        peak_rss_bytes: runs.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0),
        wire_bytes: med.and_then(|r| r.wire_bytes),
        identical: !runs.is_empty() && runs.iter().all(|r| r.ok && r.identical),
        stages: med.and_then(|r| r.stages.clone()),
        runs,
    }
}

const MIB: f64 = 1048576.0;

/// The link's view of a WAN scenario: per tool time, wire bytes, utilisation, ferry's
/// streams and levels; capacity, ideal and the goals with met / missed.
fn wan_section(s: &mut String, w: &WanReport) {
    let _ = writeln!(
        s,
        "## {} on the link: {} Mbit/s, {:.0} ms RTT\n\n| tool | time s | wire MiB | wire Mbit/s | link utilisation | link pkt/s | drops | ferry streams | ferry levels (level:MiB in->out) |\n|---|---|---|---|---|---|---|---|---|",
        w.scenario,
        w.rate_bps / 1_000_000,
        w.rtt_ms
    );
    for row in &w.rows {
        let opt = |x: Option<String>| x.unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {} | {} | {} | {} | {} | {} |",
            row.tool,
            row.wall_s,
            opt(row.wire_bytes.map(mib)),
            opt(row
                .wire_bytes
                .filter(|_| row.wall_s > 0.0)
                .map(|b| format!("{:.1}", b as f64 * 8.0 / row.wall_s / 1e6))),
            opt(row.utilisation.map(|u| format!("{:.0}%", u * 100.0))),
            opt(row.line_pps.map(|p| format!("{p:.0}"))),
            opt(row.line_drops.map(|d| d.to_string())),
            opt(row.streams.map(|n| n.to_string())),
            opt(row.levels.clone()),
        );
    }
    if let Some(c) = w.capacity_bps {
        let _ = writeln!(s, "\nLink capacity measured by `iperf3 -P 8` on the same link: {:.1} Mbit/s.", c / 1e6);
    }
    if let Some(i) = &w.ideal {
        let _ = writeln!(
            s,
            "\nIdeal: {} MiB changed, {} MiB at zstd level {}, {:.2} s at the link rate.",
            mib(i.changed_bytes),
            mib(i.compressed_bytes),
            i.level,
            i.seconds
        );
    }
    if !w.goals.is_empty() {
        let _ = writeln!(s, "\nGoals (issue 18, same run):\n");
        for g in &w.goals {
            let verdict = match g.met {
                Some(true) => "**met**",
                Some(false) => "**missed**",
                None => "not judged",
            };
            let _ = writeln!(s, "- {}: {} — {verdict}", g.goal, g.measured);
        }
    }
    let _ = writeln!(s);
}

/// Rounds to 3 decimals (figures stay readable and survive a JSON round trip exactly).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Rounds to microseconds.
pub fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / MIB)
}

/// The markdown report: one table of medians per scenario with ferry/peer ratios.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ferry bench results ({} profile)\n", r.profile);
    let _ = writeln!(
        s,
        "- started {} UTC, took {:.0} s; page cache: {}\n- machine: {} ({} CPUs, {}, {:.1} GiB RAM, kernel {})\n- ferry: `{}`\n- command: `{}`\n- overall: {}\n",
        r.started_utc,
        r.duration_s,
        r.cache,
        r.machine.hostname,
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.mem_bytes as f64 / MIB / 1024.0,
        r.machine.kernel,
        r.ferry,
        r.command,
        if r.ok { "every run ran and was byte-identical" } else { "FAILED: some run failed or was not byte-identical" }
    );
    let _ = writeln!(s, "Images:\n");
    for i in &r.images {
        let _ = writeln!(s, "- `{}`: {} MiB, {}", i.name, mib(i.bytes), i.description);
    }
    let _ = writeln!(
        s,
        "\nTimes are medians over the runs (min–max in brackets); MiB/s is logical disk bytes per second; \
         ferry/peer is ferry's median time divided by the peer's (below 1: ferry is faster). \
         CPU is user+sys of every process of the tool; RSS is the largest single process \
         (every figure starts from a floor of {} MiB: the harness's own size, which Linux carries across execve).\n",
        mib(r.rss_floor_bytes)
    );
    for sc in &r.scenarios {
        let rows: Vec<&ToolResult> = r.results.iter().filter(|t| t.scenario == sc.id).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(s, "## {}\n\n{}", sc.id, sc.description);
        if let Some(c) = sc.changed_bytes {
            let _ = writeln!(s, " Changed bytes: {} MiB.", mib(c));
        }
        let _ = writeln!(
            s,
            "\n| tool | median s (min–max) | MiB/s | ferry/peer | CPU s | peak RSS MiB | wire MiB | identical |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        let ferry = rows.iter().find(|t| t.tool == "ferry").map(|t| t.median_wall_s);
        for t in &rows {
            let ratio = match ferry {
                Some(f) if t.tool != "ferry" && t.median_wall_s > 0.0 && f > 0.0 => {
                    let x = f / t.median_wall_s;
                    if x <= 1.0 {
                        format!("{x:.2} (ferry {:.1}x faster)", 1.0 / x)
                    } else {
                        format!("{x:.2} (ferry {x:.1}x slower)")
                    }
                }
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {:.3} ({:.3}–{:.3}) | {:.0} | {} | {:.2} | {} | {} | {} |",
                t.tool,
                t.median_wall_s,
                t.min_wall_s,
                t.max_wall_s,
                t.throughput_mib_s,
                ratio,
                t.cpu_s,
                mib(t.peak_rss_bytes),
                t.wire_bytes.map_or("local".into(), mib),
                if t.identical { "yes" } else { "**NO**" }
            );
        }
        if sc.id.starts_with("tls/") {
            tls_pairs(&mut s, &rows);
        }
        let _ = writeln!(s);
    }
    for w in &r.wan {
        wan_section(&mut s, w);
    }
    let staged: Vec<&ToolResult> = r.results.iter().filter(|t| t.stages.is_some()).collect();
    if !staged.is_empty() {
        let _ = writeln!(s, "## ferry stage latencies (median run, µs)\n\n| scenario | stage | p50 | p99 | p99.9 |\n|---|---|---|---|---|");
        for t in staged {
            for (name, l) in t.stages.iter().flatten() {
                let _ =
                    writeln!(s, "| {} | {} | {:.0} | {:.0} | {:.0} |", t.scenario, name, l.p50_us, l.p99_us, l.p999_us);
            }
        }
        let _ = writeln!(s);
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "## Skipped\n");
        for k in &r.skipped {
            let what = match (&k.scenario, &k.tool) {
                (Some(sc), Some(t)) => format!("{t} in {sc}"),
                (None, Some(t)) => t.clone(),
                (Some(sc), None) => format!("scenario {sc}"),
                (None, None) => "?".into(),
            };
            let _ = writeln!(s, "- {what}: {}", k.reason);
        }
    }
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const COLORS: &[&str] =
    &["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

/// A grouped bar chart of throughput (log scale) per scenario and tool, as SVG.
pub fn svg(r: &Results) -> String {
    let mut tools: Vec<&str> = Vec::new();
    for t in &r.results {
        if !tools.contains(&t.tool.as_str()) {
            tools.push(&t.tool);
        }
    }
    if let Some(i) = tools.iter().position(|t| *t == "ferry") {
        let f = tools.remove(i);
        tools.insert(0, f);
    }
    let scenarios: Vec<&str> =
        r.scenarios.iter().map(|s| s.id.as_str()).filter(|id| r.results.iter().any(|t| t.scenario == *id)).collect();
    let bar = 12.0;
    let gap = 18.0;
    let left = 70.0;
    let top = 40.0;
    let plot_h = 320.0;
    let legend_w = 130.0;
    let group_w = |sc: &str| r.results.iter().filter(|t| t.scenario == sc).count().max(1) as f64 * bar + gap;
    let plot_w: f64 = scenarios.iter().map(|s| group_w(s)).sum::<f64>().max(200.0);
    let width = left + plot_w + legend_w + 20.0;
    let height = top + plot_h + 130.0;
    let max = r.results.iter().map(|t| t.throughput_mib_s).fold(1.0, f64::max);
    let decades = (max.log10().ceil() as i32).max(1);
    let y = |v: f64| -> f64 {
        let v = v.max(1.0);
        top + plot_h - plot_h * (v.log10() / decades as f64).clamp(0.0, 1.0)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14" font-weight="bold">ferry bench ({}): throughput per scenario and tool, logical MiB/s (log scale, higher is better)</text>"#,
        xml_escape(&r.profile)
    );
    for d in 0..=decades {
        let v = 10f64.powi(d);
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            yy + 4.0,
            v
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="black"/><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">MiB/s (log)</text>"#,
        top + plot_h / 2.0
    );
    let mut x = left + gap / 2.0;
    for sc in &scenarios {
        let start = x;
        for (ti, tool) in tools.iter().enumerate() {
            let Some(t) = r.results.iter().find(|t| t.scenario == *sc && t.tool == *tool) else { continue };
            let yy = y(t.throughput_mib_s);
            let color = COLORS[ti % COLORS.len()];
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: {:.0} MiB/s, {:.3} s{}</title></rect>"#,
                bar - 1.0,
                top + plot_h - yy,
                xml_escape(sc),
                xml_escape(tool),
                t.throughput_mib_s,
                t.median_wall_s,
                if t.identical { "" } else { " (NOT identical)" }
            );
            x += bar;
        }
        let cx = (start + x) / 2.0;
        let _ = writeln!(
            s,
            r#"<text transform="translate({cx:.1},{:.1}) rotate(-40)" text-anchor="end">{}</text>"#,
            top + plot_h + 12.0,
            xml_escape(sc)
        );
        x += gap;
    }
    let lx = left + plot_w + 20.0;
    for (ti, tool) in tools.iter().enumerate() {
        let ly = top + 10.0 + ti as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 10.0,
            COLORS[ti % COLORS.len()],
            lx + 18.0,
            ly,
            xml_escape(tool)
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// Formats a Unix time (seconds) as RFC 3339 UTC.
pub fn rfc3339(unix: u64) -> String {
    ferry_planner::time::format_rfc3339(unix as i64 * 1_000_000_000)
}

/// The `tls` scenario (issue 16): its runs alternate, so each TLS run is
/// compared with the plaintext run next to it (steadier than medians of each
/// on a loaded machine), and CPU seconds per GiB of disk are given per side.
fn tls_pairs(s: &mut String, rows: &[&ToolResult]) {
    let (Some(tls), Some(plain)) =
        (rows.iter().find(|t| t.tool == "ferry"), rows.iter().find(|t| t.tool == "ferry-plaintext"))
    else {
        return;
    };
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    let pairs: Vec<(&Run, &Run)> = tls.runs.iter().zip(&plain.runs).filter(|(a, b)| a.ok && b.ok).collect();
    let ratio: Vec<f64> = pairs.iter().map(|(a, b)| b.wall_s / a.wall_s).collect();
    let _ = writeln!(
        s,
        "\nAlternating pairs, throughput TLS/plaintext: {} (median {:.2}x).",
        list(&ratio),
        median(ratio.clone())
    );
    let gib = tls.logical_bytes as f64 / (1u64 << 30) as f64;
    for (side, f) in
        [("source", (|r: &Run| r.cpu_sender_s) as fn(&Run) -> Option<f64>), ("target", |r: &Run| r.cpu_receiver_s)]
    {
        let per =
            |t: &ToolResult| -> Vec<f64> { t.runs.iter().filter(|r| r.ok).filter_map(f).map(|c| c / gib).collect() };
        let (a, b) = (per(tls), per(plain));
        if a.is_empty() || b.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "CPU s per GiB of disk, {side}: TLS {} (median {:.2}), plaintext {} (median {:.2}).",
            list(&a),
            median(a.clone()),
            list(&b),
            median(b.clone())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(wall: f64, wire: Option<u64>) -> Run {
        Run {
            wall_s: wall,
            cpu_user_s: 0.5,
            cpu_sys_s: 0.25,
            cpu_sender_s: None,
            cpu_receiver_s: None,
            peak_rss_bytes: 10 << 20,
            wire_bytes: wire,
            dev_read_bytes: None,
            ok: true,
            identical: true,
            error: None,
            ferry_status: wire.map(|_| "ok".into()),
            ferry_totals: wire.map(|w| serde_json::json!({"bytes_sent": w})),
            stages: wire.map(|_| {
                BTreeMap::from([(
                    "read".to_string(),
                    StageLatency { p50_us: 10.0, p99_us: 80.0, p999_us: 200.0, busy_s: Some(1.5), count: None },
                )])
            }),
            line_pps: None,
            line_drops: None,
            link_bps: None,
        }
    }

    pub(crate) fn sample() -> Results {
        let results = vec![
            summarize(
                "full/synth",
                "ferry",
                "ferry replicate ...".into(),
                Some("ferry serve".into()),
                1 << 30,
                vec![run(1.0, Some(5)), run(3.0, Some(6)), run(2.0, Some(7))],
            ),
            summarize("full/synth", "zstd-nc", "zstd | nc".into(), None, 1 << 30, vec![run(4.0, None)]),
            summarize("cbt-1/synth", "ferry", "x".into(), None, 1 << 30, vec![run(0.1, Some(1))]),
            summarize("cbt-1/synth", "rsync <&>", "y".into(), None, 1 << 30, vec![run(9.0, Some(1))]),
        ];
        Results {
            schema: SCHEMA.into(),
            profile: "quick".into(),
            started_utc: rfc3339(0),
            duration_s: 1.0,
            command: "ferry-bench --quick".into(),
            machine: Machine {
                hostname: "h".into(),
                cpus: 2,
                cpu_model: "c".into(),
                mem_bytes: 1 << 30,
                kernel: "k".into(),
            },
            cache: "warm".into(),
            ferry: "/x/ferry".into(),
            images: vec![ImageInfo { name: "synth".into(), bytes: 1 << 30, description: "d".into() }],
            scenarios: vec![
                ScenarioInfo { id: "full/synth".into(), description: "full".into(), changed_bytes: None },
                ScenarioInfo { id: "cbt-1/synth".into(), description: "cbt".into(), changed_bytes: Some(1 << 20) },
            ],
            results,
            skipped: vec![Skip { scenario: None, tool: Some("bdsync".into()), reason: "not packaged".into() }],
            ok: true,
            rss_floor_bytes: 9 << 20,
            wan: vec![],
        }
    }

    #[test]
    fn summary_takes_median_min_max() {
        let r = &sample().results[0];
        assert_eq!((r.median_wall_s, r.min_wall_s, r.max_wall_s), (2.0, 1.0, 3.0));
        assert_eq!(r.wire_bytes, Some(7));
        assert!((r.throughput_mib_s - 512.0).abs() < 1e-9);
        assert!(r.identical);
    }

    #[test]
    fn json_schema_round_trips() {
        let r = sample();
        let text = serde_json::to_string_pretty(&r).unwrap();
        let back: Results = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in ["schema", "profile", "machine", "cache", "results", "skipped", "ok"] {
            assert!(v.get(key).is_some(), "{key}");
        }
        let t = &v["results"][0];
        for key in [
            "scenario",
            "tool",
            "runs",
            "median_wall_s",
            "min_wall_s",
            "max_wall_s",
            "throughput_mib_s",
            "cpu_s",
            "peak_rss_bytes",
            "wire_bytes",
            "identical",
            "stages",
        ] {
            assert!(t.get(key).is_some(), "{key}");
        }
        assert_eq!(t["stages"]["read"]["p999_us"], 200.0);
    }

    #[test]
    fn markdown_has_ratios() {
        let md = markdown(&sample());
        assert!(md.contains("| zstd-nc | 4.000 (4.000–4.000)"), "{md}");
        assert!(md.contains("0.50 (ferry 2.0x faster)"), "{md}");
        assert!(md.contains("bdsync: not packaged"));
    }

    /// A small XML well-formedness check: balanced tags, quoted attributes, no raw `<` or `&` in text.
    fn well_formed(xml: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = xml;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            if let Some(a) = text.find('&') {
                let ent = &text[a..];
                if !["&amp;", "&lt;", "&gt;", "&quot;"].iter().any(|e| ent.starts_with(e)) {
                    return Err(format!("raw & in {text:?}"));
                }
            }
            let end = rest[i..].find('>').ok_or("unterminated tag")? + i;
            let tag = &rest[i + 1..end];
            if tag.contains('<') {
                return Err(format!("< inside tag {tag:?}"));
            }
            if tag.matches('"').count() % 2 != 0 {
                return Err(format!("unbalanced quotes in {tag:?}"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return Err(format!("mismatched </{name}>"));
                }
            } else if !tag.starts_with('?') && !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
            rest = &rest[end + 1..];
        }
        if stack.is_empty() {
            Ok(())
        } else {
            Err(format!("unclosed {stack:?}"))
        }
    }

    #[test]
    fn svg_is_well_formed() {
        let svg = svg(&sample());
        well_formed(&svg).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("rsync &lt;&amp;&gt;"));
        assert!(well_formed("<a><b></a>").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
