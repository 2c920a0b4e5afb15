//! Process bookkeeping of the benchmark: the process tree under a started process, the CPU
//! time and resident memory of its forwarding part, and stopping a tree by pid.

use std::collections::HashMap;
use std::fs;
use std::process::Child;
use std::time::{Duration, Instant};

/// Process names of the workload; they and their descendants are not part of the forwarder.
const WORKLOAD: [&str; 2] = ["netbench", "iperf3"];

/// What `/proc/PID/stat` tells about one process.
#[derive(Debug, Clone)]
struct Stat {
    comm: String,
    ppid: i32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    starttime: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    // Fields after the comm, numbered from 3 (state) as in proc(5).
    let rest: Vec<&str> = text[close + 2..].split(' ').collect();
    let field = |n: usize| rest.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    let ticks = (14..=17).map(field).sum::<Option<u64>>()?;
    Some(Stat {
        comm,
        ppid: rest.get(1)?.parse().ok()?,
        ticks,
        starttime: field(22)?,
    })
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// `root` and every descendant, with their stat; `skip_workload` leaves out the workload
/// processes and everything below them.
fn tree(root: i32, skip_workload: bool) -> Vec<(i32, Stat)> {
    let stats: HashMap<i32, Stat> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, stat(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Some(st) = stats.get(&pid) else { continue };
        if skip_workload && WORKLOAD.iter().any(|w| st.comm.starts_with(w)) {
            continue;
        }
        todo.extend(stats.iter().filter(|(_, s)| s.ppid == pid).map(|(p, _)| *p));
        out.push((pid, st.clone()));
    }
    out
}

/// CPU seconds used so far by the forwarding processes under `root` (children they reaped
/// included).
pub fn forwarder_cpu(root: i32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    tree(root, true)
        .iter()
        .map(|(_, s)| s.ticks as f64 / hz)
        .sum()
}

/// Sets the CPU affinity of every thread of `root` and its descendants to `cpus` (a
/// taskset list such as `0` or `0-1`).
pub fn pin_tree(root: i32, cpus: &str) {
    for (pid, _) in tree(root, false) {
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Resident memory, in KiB, summed over the forwarding processes under `root`.
pub fn forwarder_rss_kib(root: i32) -> f64 {
    tree(root, true)
        .iter()
        .filter_map(|(pid, _)| vm_rss(*pid))
        .sum()
}

/// The forwarding processes under `root` with their resident memory, for the report.
pub fn forwarder_breakdown(root: i32) -> Vec<String> {
    let mut out: Vec<(String, f64)> = tree(root, true)
        .into_iter()
        .map(|(pid, s)| (s.comm, vm_rss(pid).unwrap_or(0.0) / 1024.0))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.into_iter()
        .map(|(name, mib)| format!("{name} {mib:.1} MiB"))
        .collect()
}

/// Proportional set size, in KiB, summed over the forwarding processes under `root`: pages
/// shared between them (the same executable and libc in a parent and its child) count once.
pub fn forwarder_pss_kib(root: i32) -> f64 {
    let pss = |pid: i32| {
        let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        let line = text.lines().find(|l| l.starts_with("Pss:"))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    tree(root, true)
        .iter()
        .filter_map(|(pid, _)| pss(*pid))
        .sum()
}

fn vm_rss(pid: i32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Stops `child` and everything it started: SIGTERM to the child, a grace period, then
/// SIGKILL to every process of the tree recorded before (each checked by its start time, so
/// a reused pid is never hit).
pub fn stop_tree(child: &mut Child) {
    let root = child.id() as i32;
    let members: Vec<(i32, u64)> = tree(root, false)
        .into_iter()
        .map(|(p, s)| (p, s.starttime))
        .collect();
    if matches!(child.try_wait(), Ok(None)) {
        signal(root, libc::SIGTERM);
        wait_exit(child, Duration::from_secs(10));
    }
    for (pid, start) in &members {
        if stat(*pid).is_some_and(|s| s.starttime == *start) {
            signal(*pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    wait_gone(&members);
}

/// Waits (bounded) until the killed processes have really gone.
fn wait_gone(members: &[(i32, u64)]) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let alive = members.iter().any(|(pid, start)| {
            stat(*pid).is_some_and(|s| s.starttime == *start && !is_zombie(*pid))
        });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: i32) -> bool {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    text.rfind(')')
        .is_some_and(|i| text[i + 1..].trim_start().starts_with(['Z', 'X']))
}

fn wait_exit(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid of a process this benchmark started; no memory is involved.
    unsafe { libc::kill(pid, sig) };
}
