//! The benchmark report: markdown tables (medians, min–max, ratios to upstream's builtin
//! driver), the targets with met / not met, and a hand-written SVG bar chart of the ratios.

use std::fmt::Write as _;
use std::process::Command;

use super::{Outcome, Round, Setup, REFERENCE};

/// One measured or derived figure.
struct Metric {
    key: &'static str,
    label: &'static str,
    /// Whether a ratio to the reference means something for this figure.
    ratio: bool,
}

const fn m(key: &'static str, label: &'static str) -> Metric {
    Metric {
        key,
        label,
        ratio: true,
    }
}

/// A figure shown without a ratio (losses, sizes).
const fn plain(key: &'static str, label: &'static str) -> Metric {
    Metric {
        key,
        label,
        ratio: false,
    }
}

const THROUGHPUT: [Metric; 6] = [
    m("tcp1_gbps", "TCP 1 stream, Gbit/s"),
    m("tcp4_gbps", "TCP 4 streams, Gbit/s"),
    m("udp_gbps", "UDP default datagrams, received Gbit/s"),
    plain("udp_loss_pct", "UDP default, loss %"),
    m("udp_1400_gbps", "UDP 1400 B, received Gbit/s"),
    plain("udp_1400_loss_pct", "UDP 1400 B, loss %"),
];

const CONNECTIONS: [Metric; 6] = [
    m("conn_per_s", "short connections /s"),
    m("cpu_us_per_conn", "forwarder CPU µs / connection"),
    m("rtt_p50_us", "RTT p50, µs"),
    m("rtt_p99_us", "RTT p99, µs"),
    m("added_p50_us", "added RTT p50, µs"),
    m("added_p99_us", "added RTT p99, µs"),
];

const RESOURCES: [Metric; 6] = [
    m("cpu_s_per_gb", "forwarder CPU s / GB (TCP 1 stream)"),
    m("rss1_mib", "RSS, 1 connection, MiB"),
    m("rss100_mib", "RSS, 100 connections, MiB"),
    m("pss1_mib", "PSS, 1 connection, MiB"),
    m("rss_kib_per_conn", "RSS per extra connection, KiB"),
    plain("udp_bytes", "UDP default datagram, bytes"),
];

/// A goal for ours-builtin, as a ratio to upstream's builtin driver.
struct Target {
    key: &'static str,
    label: &'static str,
    ratio: f64,
    at_least: bool,
}

const fn t(key: &'static str, label: &'static str, ratio: f64, at_least: bool) -> Target {
    Target {
        key,
        label,
        ratio,
        at_least,
    }
}

const TARGETS: [Target; 9] = [
    t("tcp1_gbps", "TCP 1 stream", 1.1, true),
    t("cpu_s_per_gb", "forwarder CPU per GB", 0.5, false),
    t("conn_per_s", "short connections /s", 2.0, true),
    t("cpu_us_per_conn", "CPU per connection", 0.3, false),
    t("added_p50_us", "added RTT (p50)", 0.5, false),
    t("udp_gbps", "UDP received, default datagrams", 2.0, true),
    t("udp_1400_gbps", "UDP received, 1400 B", 1.5, true),
    t(
        "rss1_mib",
        "RSS of the stack, 1 connection",
        1.0 / 3.0,
        false,
    ),
    t(
        "rss100_mib",
        "RSS of the stack, 100 connections",
        1.0 / 3.0,
        false,
    ),
];

/// The setup whose targets are checked.
const OURS: &str = "ours-builtin";

// ---- statistics ----

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(match v.len() % 2 {
        1 => v[mid],
        _ => (v[mid - 1] + v[mid]) / 2.0,
    })
}

fn values(rounds: &[Round], setup: &str, key: &str) -> Vec<f64> {
    rounds.iter().filter_map(|r| get(r, setup, key)).collect()
}

fn get(round: &Round, setup: &str, key: &str) -> Option<f64> {
    round
        .get(&(setup.to_owned(), key.to_owned()))
        .copied()
        .filter(|v| v.is_finite())
}

/// Per-round ratios of `setup` to the reference setup.
fn ratios(rounds: &[Round], setup: &str, key: &str) -> Vec<f64> {
    let ratio = |r: &Round| {
        let (v, base) = (get(r, setup, key)?, get(r, REFERENCE, key)?);
        (base > 0.0 && v >= 0.0).then_some(v / base)
    };
    rounds.iter().filter_map(ratio).collect()
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    Some((min, v.iter().copied().reduce(f64::max)?))
}

/// Adds the round trip over plain loopback's, per round and setup.
pub fn derive(rounds: &mut [Round], setups: &[Setup]) {
    for round in rounds.iter_mut() {
        for (key, base) in [
            ("added_p50_us", "rtt_p50_us"),
            ("added_p99_us", "rtt_p99_us"),
        ] {
            let Some(loopback) = get(round, "loopback", base) else {
                continue;
            };
            for s in setups.iter().filter(|s| s.name != "loopback") {
                if let Some(v) = get(round, s.name, base) {
                    round.insert((s.name.to_owned(), key.to_owned()), v - loopback);
                }
            }
        }
    }
}

// ---- markdown ----

fn fmt(v: f64) -> String {
    match v.abs() {
        a if a >= 1000.0 => format!("{v:.0}"),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

fn cell(rounds: &[Round], setup: &str, m: &Metric) -> String {
    let key = m.key;
    let v = values(rounds, setup, key);
    let Some(med) = median(v.clone()) else {
        return "–".into();
    };
    let mut s = fmt(med);
    if let Some((lo, hi)) = min_max(&v).filter(|_| v.len() > 1) {
        let _ = write!(s, " [{}–{}]", fmt(lo), fmt(hi));
    }
    if let Some(r) = median(ratios(rounds, setup, key)).filter(|_| m.ratio && setup != REFERENCE) {
        let _ = write!(s, " ×{}", fmt(r));
    }
    s
}

fn table(out: &mut String, title: &str, metrics: &[Metric], o: &Outcome, rounds: &[Round]) {
    let _ = writeln!(out, "\n### {title}\n");
    let _ = write!(out, "| setup |");
    for m in metrics {
        let _ = write!(out, " {} |", m.label);
    }
    let _ = write!(out, "\n|---|");
    out.push_str(&"---|".repeat(metrics.len()));
    out.push('\n');
    for s in &o.setups {
        let _ = write!(out, "| {} |", s.name);
        for m in metrics {
            let _ = write!(out, " {} |", cell(rounds, s.name, m));
        }
        out.push('\n');
    }
}

fn targets(out: &mut String, rounds: &[Round]) {
    let _ = writeln!(out, "\n## Targets: {OURS} against {REFERENCE}\n");
    let _ = writeln!(
        out,
        "| figure | target | ratio: median of rounds [min–max] | result |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for t in &TARGETS {
        let r = ratios(rounds, OURS, t.key);
        let want = format!("{} {}×", if t.at_least { "≥" } else { "≤" }, fmt(t.ratio));
        let (got, verdict) = match median(r.clone()) {
            None => ("–".to_owned(), "not measured"),
            Some(med) => {
                let range = min_max(&r).filter(|_| r.len() > 1);
                let range = range
                    .map(|(a, b)| format!(" [{}–{}]", fmt(a), fmt(b)))
                    .unwrap_or_default();
                let met = if t.at_least {
                    med >= t.ratio
                } else {
                    med <= t.ratio
                };
                (
                    format!("{}×{range}", fmt(med)),
                    if met { "**met**" } else { "not met" },
                )
            }
        };
        let _ = writeln!(out, "| {} | {want} | {got} | {verdict} |", t.label);
    }
}

fn machine() -> String {
    let sh = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{} CPUs (nproc), {cpu}, kernel {}; load average at the end of the run {}",
        sh(&["nproc"]),
        sh(&["uname", "-r"]),
        load.join(" ")
    )
}

fn versions() -> String {
    let first = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_default()
    };
    format!(
        "{}; {}; slirp4netns {}",
        first(&["iperf3", "--version"]),
        first(&["/usr/bin/rootlesskit", "--version"]),
        first(&["slirp4netns", "--version"]).trim_start_matches("slirp4netns version ")
    )
}

pub fn markdown(o: &Outcome) -> String {
    let mut rounds = o.rounds.clone();
    derive(&mut rounds, &o.setups);
    let mut out = String::from("# Benchmark: host to namespace through a published port\n\n");
    intro(&mut out, o);
    targets(&mut out, &rounds);
    let _ = writeln!(out, "\n## Results\n");
    out.push_str(
        "Each cell: median over rounds [min–max] ×median of the per-round ratios to \
         upstream-builtin (for CPU, RTT and memory lower is better). `–`: not measured or \
         not applicable (the kernel limits have no forwarding process).\n",
    );
    table(&mut out, "Throughput", &THROUGHPUT, o, &rounds);
    table(
        &mut out,
        "Connections and latency",
        &CONNECTIONS,
        o,
        &rounds,
    );
    table(&mut out, "Resources", &RESOURCES, o, &rounds);
    if let Some(load) = &o.load {
        let _ = writeln!(out, "\n## Load through the builtin driver\n");
        let _ = writeln!(
            out,
            "`tests/robustness/load.rs` at full size (`RKPORT_FULL_LOAD=1`, release build): \
             10,000 connections held through one published port, then 1,000,000 short ones, \
             every byte checked by the server's running hash; descriptors and RSS before, while \
             holding and after:\n\n> {load}"
        );
    }
    setups_and_method(&mut out, o);
    out
}

fn intro(out: &mut String, o: &Outcome) {
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output();
    let date = date
        .map(|d| String::from_utf8_lossy(&d.stdout).trim().to_owned())
        .unwrap_or_default();
    let l = &o.lengths;
    let _ = writeln!(out, "- Date: {date}");
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(
        out,
        "- Command: `{}` ({} round(s), setup order rotated per round)",
        o.command,
        o.rounds.len()
    );
    let _ = writeln!(out, "- Tools: {}", versions());
    let _ = writeln!(
        out,
        "- Traffic: iperf3 client on the host, `iperf3 -s` inside (`-t {}`; `-P 4`; UDP `-u -b 0` \
         with the default datagram size and with `-l 1400`). Short connections, round trips and \
         idle connections: `benches/netbench.rs` (Rust, release build): {} s of connect / send 8 \
         bytes / read the reply and the end of stream / close from {} threads; {} ping-pongs of 16 \
         bytes over one TCP_NODELAY connection; 1 and {} idle echo connections.",
        l.iperf_secs, l.conn_secs, l.conn_threads, l.rtt_count, l.idle_many
    );
    for note in &o.notes {
        let _ = writeln!(out, "- Note: {note}");
    }
}

fn setups_and_method(out: &mut String, o: &Outcome) {
    let _ = writeln!(out, "\n## Setups\n");
    let _ = writeln!(
        out,
        "| setup | what | forwarding processes counted (RSS, 1 connection, last round) |"
    );
    let _ = writeln!(out, "|---|---|---|");
    for s in &o.setups {
        let procs = o
            .forwarders
            .get(s.name)
            .map(|p| p.join(", "))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(out, "| {} | {} | {procs} |", s.name, s.what);
    }
    out.push_str(METHOD);
}

const METHOD: &str = "
## Method

- Every setup publishes 127.0.0.1:P on the host to port P inside its namespace (one TCP and
  one UDP port for iperf3, a reply-and-close port and an echo port); all RootlessKit rows use
  `--net=slirp4netns` (upstream 1.1 has no `--net=none`), so for the builtin driver slirp4netns
  runs idle and the traffic goes host → forwarder → the namespace's loopback. As root, the
  rootless rows run as the unprivileged user `rkport-test`.
- CPU: utime + stime (+ reaped children) from `/proc/PID/stat` of the forwarding processes
  (the process started and its descendants, without the workload `netbench`/`iperf3`),
  before and after the TCP single-stream run (per GB received) and the short-connection run
  (per connection).
- Memory: VmRSS summed over the same processes, after all the traffic above, while 1 and
  then 100 idle echo connections are open; per extra connection = (RSS₁₀₀ − RSS₁) / 99.
  The sum counts pages shared by the processes (the same executable and libc mapped in a
  parent and its re-executed child) once per process; PSS (`/proc/PID/smaps_rollup`, with 1
  connection) counts them once in all, for reference. The targets use the RSS sum.
- RTT: the client, the forwarding processes and the server are pinned to CPU 0 for the
  ping-pong (`taskset`), so the figure is the path's own cost: unpinned, the wake-up latency
  of an idle virtual CPU (tens of µs on this machine, varying from run to run) dominates.
  Added RTT: the setup's round trip minus plain loopback's in the same round.
- The client, the server and the forwarder share the machine's CPUs, so throughput figures
  are bounded by the whole path, not by the forwarder alone.
- Regenerate with `cargo xtask bench` (as root for the veth limit and the unprivileged-user
  runs); `--quick` makes a one-round smoke test, `--only A,B` limits the setups, `--no-write`
  leaves the docs alone.
";

// ---- SVG ----

/// (metric, label, target ratio or 0, whether the target is a lower bound)
const CHART: [(&str, &str, f64, bool); 10] = [
    ("tcp1_gbps", "TCP 1 stream", 1.1, true),
    ("tcp4_gbps", "TCP 4 streams", 0.0, true),
    ("udp_gbps", "UDP default, received", 2.0, true),
    ("udp_1400_gbps", "UDP 1400 B, received", 1.5, true),
    ("conn_per_s", "short connections /s", 2.0, true),
    ("cpu_s_per_gb", "CPU per GB ↓", 0.5, false),
    ("cpu_us_per_conn", "CPU per connection ↓", 0.3, false),
    ("added_p50_us", "added RTT p50 ↓", 0.5, false),
    ("rss1_mib", "RSS, 1 connection ↓", 1.0 / 3.0, false),
    ("rss100_mib", "RSS, 100 connections ↓", 1.0 / 3.0, false),
];

const SERIES: [(&str, &str); 2] = [(OURS, "#2b6cb0"), ("pasta", "#a0aec0")];
const X0: f64 = 230.0;
const WIDTH: f64 = 500.0;
/// log2 of the smallest and largest ratio drawn.
const LOG_MIN: f64 = -4.0;
const LOG_MAX: f64 = 4.0;

fn x_of(ratio: f64) -> f64 {
    let l = ratio.log2().clamp(LOG_MIN, LOG_MAX);
    X0 + (l - LOG_MIN) / (LOG_MAX - LOG_MIN) * WIDTH
}

pub fn svg(o: &Outcome) -> String {
    let mut rounds = o.rounds.clone();
    derive(&mut rounds, &o.setups);
    let row = 40.0;
    let height = 70.0 + row * CHART.len() as f64 + 56.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"780\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">Ratio to RootlessKit 1.1 builtin \
         (median of rounds, log scale; ↓ = lower is better)</text>\n"
    );
    axis(&mut s, 50.0, 50.0 + row * CHART.len() as f64);
    for (i, (key, label, target, at_least)) in CHART.iter().enumerate() {
        let y = 50.0 + row * i as f64;
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{label}</text>", y + 20.0);
        for (j, (setup, colour)) in SERIES.iter().enumerate() {
            let Some(r) = median(ratios(&rounds, setup, key)) else {
                continue;
            };
            let fill = bar_colour(setup, r, *target, *at_least, colour);
            bar(&mut s, y + 6.0 + 14.0 * j as f64, r, fill);
        }
        if *target > 0.0 {
            let x = x_of(*target);
            let _ = writeln!(s, "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"black\" stroke-width=\"2\"/>", y + 3.0, y + 21.0);
        }
    }
    legend(&mut s, height - 36.0);
    s.push_str("</svg>\n");
    s
}

fn bar_colour(
    setup: &str,
    r: f64,
    target: f64,
    at_least: bool,
    default: &'static str,
) -> &'static str {
    if setup != OURS || target == 0.0 {
        return default;
    }
    match if at_least { r >= target } else { r <= target } {
        true => "#2f855a",
        false => "#c53030",
    }
}

fn bar(s: &mut String, y: f64, r: f64, fill: &str) {
    let (a, b) = (x_of(1.0), x_of(r));
    let (x, w) = (a.min(b), (a - b).abs().max(1.0));
    let _ = writeln!(
        s,
        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"12\" fill=\"{fill}\"/>"
    );
    let tx = if r >= 1.0 { b + 4.0 } else { b - 4.0 };
    let anchor = if r >= 1.0 { "start" } else { "end" };
    let _ = writeln!(
        s,
        "<text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-size=\"10\">{}×</text>",
        y + 10.0,
        fmt(r)
    );
}

fn axis(s: &mut String, top: f64, bottom: f64) {
    for l in (LOG_MIN as i32..=LOG_MAX as i32).step_by(1) {
        let x = x_of(2f64.powi(l));
        let colour = if l == 0 { "black" } else { "#e2e8f0" };
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"{colour}\"/>"
        );
        {
            let label = if l >= 0 {
                format!("{}", 1u32 << l)
            } else {
                format!("1/{}", 1u32 << -l)
            };
            let _ = writeln!(s, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{label}×</text>", bottom + 14.0);
        }
    }
}

fn legend(s: &mut String, y: f64) {
    let items = [
        ("#2f855a", "ours-builtin, target met"),
        ("#c53030", "ours-builtin, target not met"),
        ("#2b6cb0", "ours-builtin (no target)"),
        ("#a0aec0", "pasta"),
    ];
    for (i, (colour, text)) in items.iter().enumerate() {
        let x = 10.0 + 190.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>",
            y - 10.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{y}\">{text}</text>", x + 16.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"{}\" font-size=\"10\">black tick: target</text>",
        y + 18.0
    );
}
