//! `cargo xtask bench [--quick] [--rounds N] [--only NAME,...] [--no-write] [--no-load]`: host
//! to namespace traffic through a published port, for our drivers, upstream RootlessKit 1.1,
//! pasta and two kernel-only limits; then (not with `--quick` or `--no-load`) the full-size load
//! test through the builtin driver (10,000 held and 1,000,000 short connections).
//!
//! Each setup runs the workload `netbench serve` (benches/netbench.rs: iperf3 server, a
//! reply-and-close port and an echo port) behind its forwarder; the clients run on the host.
//! Every round runs every setup once, in an order rotated per round, and measures TCP and UDP
//! throughput (iperf3), short connections per second, round trips over one connection, and
//! the CPU time and resident memory of the forwarding processes. The report (markdown on
//! stdout and in docs/benchmark.md, a bar chart in docs/bench.svg) gives medians, ranges and
//! per-round ratios to upstream's builtin driver.
//!
//! As root, rootless setups run as the unprivileged user `rkport-test` (created with
//! subordinate ids when missing) and the kernel limit uses two network namespaces joined by a
//! veth pair; every process started is stopped by pid and every namespace and temporary
//! directory removed, on failure too. The benchmark is not part of `cargo test`.

mod procs;
mod report;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util::{cargo, describe, have, is_root, output, run as sh};

/// The unprivileged user the rootless setups run as when the benchmark runs as root.
const BENCH_USER: &str = "rkport-test";
/// The setup every ratio is taken against.
pub const REFERENCE: &str = "upstream-builtin";
/// Addresses of the veth limit; they exist only inside the two namespaces made for it.
const VETH_CLIENT_IP: &str = "10.200.0.1";
const VETH_SERVER_IP: &str = "10.200.0.2";

/// How one setup forwards host traffic into the namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Loopback,
    Veth,
    Kit { ours: bool, driver: &'static str },
    Pasta,
}

/// One column of the comparison.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub name: &'static str,
    pub what: &'static str,
    pub kind: Kind,
}

pub const SETUPS: [Setup; 8] = [
    Setup {
        name: "loopback",
        what: "limit: iperf3/netbench server on the host's loopback, no namespace",
        kind: Kind::Loopback,
    },
    Setup {
        name: "veth",
        what: "kernel limit: server in a network namespace reached over a veth pair (root only)",
        kind: Kind::Veth,
    },
    Setup {
        name: "ours-builtin",
        what: "our rootlesskit --net=slirp4netns --port-driver=builtin",
        kind: Kind::Kit {
            ours: true,
            driver: "builtin",
        },
    },
    Setup {
        name: "ours-slirp4netns",
        what: "our rootlesskit --net=slirp4netns --port-driver=slirp4netns",
        kind: Kind::Kit {
            ours: true,
            driver: "slirp4netns",
        },
    },
    Setup {
        name: "ours-socat",
        what: "our rootlesskit --net=slirp4netns --port-driver=socat",
        kind: Kind::Kit {
            ours: true,
            driver: "socat",
        },
    },
    Setup {
        name: "upstream-builtin",
        what: "RootlessKit 1.1.0 --net=slirp4netns --port-driver=builtin",
        kind: Kind::Kit {
            ours: false,
            driver: "builtin",
        },
    },
    Setup {
        name: "upstream-slirp4netns",
        what: "RootlessKit 1.1.0 --net=slirp4netns --port-driver=slirp4netns",
        kind: Kind::Kit {
            ours: false,
            driver: "slirp4netns",
        },
    },
    Setup {
        name: "pasta",
        what: "pasta --config-net -t/-u (passt's own port forwarding)",
        kind: Kind::Pasta,
    },
];

/// Run lengths; `--quick` shortens everything for a smoke test.
#[derive(Debug, Clone, Copy)]
pub struct Lengths {
    pub iperf_secs: u32,
    pub conn_secs: f64,
    pub conn_threads: usize,
    pub rtt_count: usize,
    pub idle_many: usize,
}

#[derive(Debug)]
struct Options {
    quick: bool,
    rounds: usize,
    only: Option<Vec<String>>,
    write: bool,
    /// Whether the full-size load test runs after the rounds.
    load: bool,
}

/// Measurements of one round: (setup, metric) -> value.
pub type Round = BTreeMap<(String, String), f64>;

/// Everything the report needs.
#[derive(Debug)]
pub struct Outcome {
    pub setups: Vec<Setup>,
    pub rounds: Vec<Round>,
    pub lengths: Lengths,
    pub command: String,
    pub notes: Vec<String>,
    pub forwarders: BTreeMap<String, Vec<String>>,
    /// The full-size load test's summary line, when it ran.
    pub load: Option<String>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    install_interrupt_handler();
    let tools = Tools::build()?;
    let work = WorkDir::new()?;
    let env = Env::prepare(&tools, &work)?;

    let setups = select(&opts, &env)?;
    let lengths = lengths(opts.quick);
    let mut outcome = Outcome {
        setups: setups.clone(),
        rounds: Vec::new(),
        lengths,
        command: format!("cargo xtask bench {}", args.join(" "))
            .trim_end()
            .to_owned(),
        notes: env.notes.clone(),
        forwarders: BTreeMap::new(),
        load: None,
    };
    for round in 0..opts.rounds {
        let mut order = setups.clone();
        order.rotate_left(round % setups.len());
        let results = run_round(&env, &order, lengths, round, &mut outcome)?;
        outcome.rounds.push(results);
    }

    if opts.load {
        outcome.load = Some(full_load()?);
    }

    let text = report::markdown(&outcome);
    println!("{text}");
    if opts.write {
        let docs = crate::util::workspace_root().join("docs");
        fs::write(docs.join("benchmark.md"), &text)?;
        fs::write(docs.join("bench.svg"), report::svg(&outcome))?;
        eprintln!("wrote docs/benchmark.md and docs/bench.svg");
    }
    Ok(())
}

/// The load test of `tests/robustness/load.rs` at full size (10,000 connections held through
/// one builtin port, then 1,000,000 short ones, every byte checked), release build; its summary
/// line. Fails the benchmark when the test fails.
fn full_load() -> Result<String> {
    let release = crate::util::workspace_root().join("target/release");
    let mut cmd = cargo();
    cmd.args(["test", "--release", "--test", "robustness"])
        .args([
            "--",
            "--exact",
            "robustness::load::builtin_holds_thousands_and_forwards_every_byte",
        ])
        .arg("--nocapture")
        .env("RKPORT_FULL_LOAD", "1")
        .env("RKPORT_BIN_DIR", &release);
    eprintln!("== full-size load test\n+ {}", crate::util::describe(&cmd));
    let out = cmd.output().context("cannot start the load test")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("the full-size load test failed ({}):\n{text}", out.status);
    }
    text.lines()
        .find_map(|l| l.strip_prefix("load: "))
        .map(str::to_owned)
        .context("the load test printed no summary line")
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        quick: false,
        rounds: 3,
        only: None,
        write: true,
        load: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--no-write" => opts.write = false,
            "--no-load" => opts.load = false,
            "--rounds" => opts.rounds = it.next().context("--rounds needs a number")?.parse()?,
            "--only" => {
                let list = it.next().context("--only needs setup names")?;
                opts.only = Some(list.split(',').map(str::to_owned).collect());
            }
            other => bail!("unknown bench option {other:?}; options: --quick, --rounds N, --only A,B, --no-write, --no-load"),
        }
    }
    if opts.quick && !args.iter().any(|a| a == "--rounds") {
        opts.rounds = 1;
    }
    if opts.quick {
        opts.load = false;
    }
    if opts.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(opts)
}

fn lengths(quick: bool) -> Lengths {
    match quick {
        true => Lengths {
            iperf_secs: 1,
            conn_secs: 1.0,
            conn_threads: 4,
            rtt_count: 2000,
            idle_many: 100,
        },
        false => Lengths {
            iperf_secs: 5,
            conn_secs: 5.0,
            conn_threads: 4,
            rtt_count: 20000,
            idle_many: 100,
        },
    }
}

fn select(opts: &Options, env: &Env) -> Result<Vec<Setup>> {
    if let Some(only) = &opts.only {
        if let Some(bad) = only
            .iter()
            .find(|n| !SETUPS.iter().any(|s| s.name == n.as_str()))
        {
            let names: Vec<_> = SETUPS.iter().map(|s| s.name).collect();
            bail!("unknown setup {bad:?}; setups: {}", names.join(", "));
        }
    }
    let wanted = |s: &Setup| {
        opts.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == s.name))
    };
    Ok(SETUPS
        .iter()
        .filter(|s| wanted(s) && env.can_run(s))
        .copied()
        .collect())
}

/// Ctrl-C sets a flag checked between steps, so that the cleanup guards still run.
fn install_interrupt_handler() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---- tools and environment ----

/// Release builds of our binaries and of the traffic tool.
#[derive(Debug)]
struct Tools {
    rootlesskit: PathBuf,
    rootlessctl: PathBuf,
    netbench: PathBuf,
}

impl Tools {
    fn build() -> Result<Tools> {
        for prog in ["iperf3", "slirp4netns"] {
            if !have(prog) {
                bail!("{prog} is needed (Debian package {prog})");
            }
        }
        sh(cargo().args(["build", "--quiet", "--release", "-p", "rkport-cli"]))?;
        let json = output(
            cargo()
                .args(["bench", "--no-run", "--quiet", "-p", "rkport-e2e"])
                .args(["--bench", "netbench", "--message-format=json"]),
        )?;
        let netbench = json
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| Some(PathBuf::from(v.get("executable")?.as_str()?)))
            .context("cargo did not report the netbench executable")?;
        let release = crate::util::workspace_root().join("target/release");
        Ok(Tools {
            rootlesskit: release.join("rootlesskit"),
            rootlessctl: release.join("rootlessctl"),
            netbench,
        })
    }
}

/// The temporary directory of one run: `bin/` readable by everyone, `run/` owned by the user
/// the rootless setups run as. Removed on drop.
#[derive(Debug)]
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("rkport-bench-{}", std::process::id()));
        fs::create_dir_all(dir.join("bin"))?;
        fs::create_dir_all(dir.join("run"))?;
        for d in [dir.clone(), dir.join("bin")] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        }
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Who runs what, and with which binaries.
#[derive(Debug)]
struct Env {
    bin: PathBuf,
    run: PathBuf,
    /// uid and gid the rootless setups run as (None: as ourselves).
    user: Option<(u32, u32)>,
    upstream: bool,
    pasta: bool,
    notes: Vec<String>,
}

impl Env {
    fn prepare(tools: &Tools, work: &WorkDir) -> Result<Env> {
        let bin = work.0.join("bin");
        for (src, name) in [
            (&tools.rootlesskit, "rootlesskit"),
            (&tools.rootlessctl, "rootlessctl"),
            (&tools.netbench, "netbench"),
        ] {
            fs::copy(src, bin.join(name)).with_context(|| format!("copying {}", src.display()))?;
            fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755))?;
        }
        let run = work.0.join("run");
        let user = match is_root() {
            true => Some(bench_user()?),
            false => None,
        };
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&run, Some(uid), Some(gid))?;
        }
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700))?;

        let upstream = Path::new("/usr/bin/rootlesskit").exists();
        let pasta = have("pasta");
        let mut notes = Vec::new();
        if !upstream {
            notes.push("upstream RootlessKit (/usr/bin/rootlesskit) is missing: no ratios".into());
        }
        if !pasta {
            notes.push("pasta is not installed: its row is missing".into());
        }
        if user.is_none() {
            notes.push("not run as root: the veth limit needs root and is missing".into());
        }
        Ok(Env {
            bin,
            run,
            user,
            upstream,
            pasta,
            notes,
        })
    }

    fn can_run(&self, setup: &Setup) -> bool {
        match setup.kind {
            Kind::Veth => self.user.is_some() && have("ip"),
            Kind::Kit { ours: false, .. } => self.upstream,
            Kind::Pasta => self.pasta,
            _ => true,
        }
    }

    /// A command run as the benchmark user, in a clean environment.
    fn as_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", &self.run)
            .env("XDG_RUNTIME_DIR", &self.run)
            .current_dir(&self.run);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

/// The uid and gid of the benchmark user, created with subordinate ids when missing.
fn bench_user() -> Result<(u32, u32)> {
    if !Command::new("id")
        .arg(BENCH_USER)
        .output()?
        .status
        .success()
    {
        sh(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", BENCH_USER]))?;
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let mut text = fs::read_to_string(file).unwrap_or_default();
        if !text
            .lines()
            .any(|l| l.starts_with(&format!("{BENCH_USER}:")))
        {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("{BENCH_USER}:300000:65536\n"));
            fs::write(file, text).with_context(|| format!("writing {file}"))?;
        }
    }
    if Path::new("/dev/net/tun").exists() {
        fs::set_permissions("/dev/net/tun", fs::Permissions::from_mode(0o666))?;
    }
    let uid = output(Command::new("id").args(["-u", BENCH_USER]))?
        .trim()
        .parse()?;
    let gid = output(Command::new("id").args(["-g", BENCH_USER]))?
        .trim()
        .parse()?;
    Ok((uid, gid))
}

// ---- one setup ----

/// Host ports of one setup (the same numbers inside the namespace).
#[derive(Debug, Clone, Copy)]
struct Ports {
    iperf: u16,
    close: u16,
    echo: u16,
}

impl Ports {
    fn free() -> Result<Ports> {
        let mut held = Vec::new();
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let tcp = TcpListener::bind("127.0.0.1:0")?;
            let port = tcp.local_addr()?.port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) {
                ports.push(port);
                held.push((tcp, udp));
            }
        }
        Ok(Ports {
            iperf: ports[0],
            close: ports[1],
            echo: ports[2],
        })
    }
}

/// A started setup; dropping it stops every process it started and removes its namespaces.
#[derive(Debug)]
struct Running {
    child: Option<Child>,
    /// Whether the started process is the forwarder (false for the kernel-only limits).
    forwarder: bool,
    ports: Ports,
    /// The namespace the clients run in (veth limit only).
    client_ns: Option<String>,
    netns: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            procs::stop_tree(child);
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

impl Running {
    fn pid(&self) -> Option<i32> {
        let child = self.child.as_ref()?;
        self.forwarder.then_some(child.id() as i32)
    }

    fn host(&self) -> &'static str {
        match self.client_ns {
            Some(_) => VETH_SERVER_IP,
            None => "127.0.0.1",
        }
    }

    fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.host())
    }

    /// A client command, inside the client namespace for the veth limit.
    fn client(&self, program: &Path) -> Command {
        match &self.client_ns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }
}

fn start(env: &Env, setup: &Setup, round: usize) -> Result<Running> {
    let ports = Ports::free()?;
    let serve = |cmd: &mut Command| {
        cmd.arg(env.bin.join("netbench")).arg("serve");
        cmd.args([ports.iperf, ports.close, ports.echo].map(|p| p.to_string()));
    };
    let mut running = Running {
        child: None,
        forwarder: true,
        ports,
        client_ns: None,
        netns: Vec::new(),
    };
    let mut cmd = match setup.kind {
        Kind::Loopback => {
            running.forwarder = false;
            let mut cmd = env.as_user(env.bin.join("netbench"));
            cmd.arg("serve")
                .args([ports.iperf, ports.close, ports.echo].map(|p| p.to_string()));
            cmd
        }
        Kind::Veth => {
            running.forwarder = false;
            let (client, server) = make_veth(&mut running)?;
            running.client_ns = Some(client);
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &server]);
            serve(&mut cmd);
            cmd
        }
        Kind::Kit { ours, driver } => {
            let program = match ours {
                true => env.bin.join("rootlesskit"),
                false => PathBuf::from("/usr/bin/rootlesskit"),
            };
            let mut cmd = env.as_user(program);
            cmd.arg("--net=slirp4netns")
                .arg(format!("--port-driver={driver}"));
            cmd.arg(format!(
                "--state-dir={}",
                env.run.join(format!("{}-{round}", setup.name)).display()
            ));
            for (port, proto) in [
                (ports.iperf, "tcp"),
                (ports.iperf, "udp"),
                (ports.close, "tcp"),
                (ports.echo, "tcp"),
            ] {
                cmd.arg(format!("--publish=127.0.0.1:{port}:{port}/{proto}"));
            }
            serve(&mut cmd);
            cmd
        }
        Kind::Pasta => {
            let mut cmd = env.as_user("pasta");
            cmd.args(["--config-net", "--foreground", "--quiet"]);
            cmd.arg("-t")
                .arg(format!("{},{},{}", ports.iperf, ports.close, ports.echo));
            cmd.arg("-u").arg(ports.iperf.to_string()).arg("--");
            serve(&mut cmd);
            cmd
        }
    };
    let log = fs::File::create(env.run.join(format!("{}-{round}.log", setup.name)))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("+ {}", describe(&cmd));
    running.child = Some(
        cmd.spawn()
            .with_context(|| format!("starting {}", setup.name))?,
    );
    wait_ready(&running, env, setup, round)?;
    Ok(running)
}

/// Two namespaces joined by a veth pair; only the addresses inside them are used.
fn make_veth(running: &mut Running) -> Result<(String, String)> {
    let pid = std::process::id();
    let (client, server) = (format!("rkbench-c-{pid}"), format!("rkbench-s-{pid}"));
    for ns in [&client, &server] {
        sh(Command::new("ip").args(["netns", "add", ns]))?;
        running.netns.push(ns.clone());
    }
    let ip = |ns: &str, args: &[&str]| sh(Command::new("ip").args(["-n", ns]).args(args));
    ip(
        &client,
        &[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &server,
        ],
    )?;
    for (ns, dev, addr) in [
        (&client, "veth0", VETH_CLIENT_IP),
        (&server, "veth1", VETH_SERVER_IP),
    ] {
        ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip(ns, &["link", "set", dev, "up"])?;
        ip(ns, &["link", "set", "lo", "up"])?;
    }
    Ok((client, server))
}

/// Waits until a round trip through the echo port works (the workload listens only once
/// iperf3 does).
fn wait_ready(running: &Running, env: &Env, setup: &Setup, round: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        check_interrupt()?;
        let probe = running
            .client(&env.bin.join("netbench"))
            .args(["rtt", &running.addr(running.ports.echo), "1"])
            .stderr(Stdio::null())
            .output()?;
        if probe.status.success() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            let log = fs::read_to_string(env.run.join(format!("{}-{round}.log", setup.name)));
            bail!(
                "{} never answered through its port; log:\n{}",
                setup.name,
                log.unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- measurements ----

fn run_round(
    env: &Env,
    order: &[Setup],
    len: Lengths,
    round: usize,
    outcome: &mut Outcome,
) -> Result<Round> {
    let mut results = Round::new();
    for setup in order {
        check_interrupt()?;
        eprintln!("== round {} of setup {}", round + 1, setup.name);
        let running = match start(env, setup, round) {
            Ok(running) => running,
            Err(e) => {
                eprintln!("  {e:#}");
                outcome.notes.push(format!(
                    "round {}: {} did not start: {e:#}",
                    round + 1,
                    setup.name
                ));
                continue;
            }
        };
        let mut put = |metric: &str, value: f64| {
            results.insert((setup.name.to_owned(), metric.to_owned()), value);
        };
        let mut breakdown = Vec::new();
        measure(env, &running, len, &mut put, &mut breakdown)?;
        if !breakdown.is_empty() {
            outcome.forwarders.insert(setup.name.to_owned(), breakdown);
        }
        drop(running);
    }
    Ok(results)
}

/// Runs every measurement; one that fails is reported and leaves a gap in the table.
fn measure(
    env: &Env,
    running: &Running,
    len: Lengths,
    put: &mut dyn FnMut(&str, f64),
    breakdown: &mut Vec<String>,
) -> Result<()> {
    tcp(running, len, put);
    check_interrupt()?;
    udp(running, len, put);
    check_interrupt()?;
    if let Err(e) = connections(env, running, len, put) {
        eprintln!("  short connections: {e:#}");
    }
    check_interrupt()?;
    if let Err(e) = round_trips(env, running, len, put) {
        eprintln!("  round trips: {e:#}");
    }
    check_interrupt()?;
    if let Some(pid) = running.pid() {
        if let Err(e) = idle_memory(env, running, pid, len, put, breakdown) {
            eprintln!("  idle connections: {e:#}");
        }
    }
    check_interrupt()
}

/// TCP throughput with 1 and 4 streams, and the forwarder's CPU time per GB of the first.
fn tcp(running: &Running, len: Lengths, put: &mut dyn FnMut(&str, f64)) {
    let cpu0 = running.pid().map(procs::forwarder_cpu);
    let one = iperf(running, len, &[]);
    let cpu1 = running.pid().map(procs::forwarder_cpu);
    if let Some(end) = one
        .as_ref()
        .ok()
        .and_then(|v| v.pointer("/end/sum_received").cloned())
    {
        put("tcp1_gbps", num(&end, "bits_per_second") / 1e9);
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            put("cpu_s_per_gb", (b - a) / (num(&end, "bytes") / 1e9));
        }
    }
    let four = iperf(running, len, &["-P", "4"]);
    if let Some(end) = four
        .as_ref()
        .ok()
        .and_then(|v| v.pointer("/end/sum_received").cloned())
    {
        put("tcp4_gbps", num(&end, "bits_per_second") / 1e9);
    }
}

/// UDP received throughput and loss with iperf3's default datagram size and with 1400 bytes.
fn udp(running: &Running, len: Lengths, put: &mut dyn FnMut(&str, f64)) {
    for (suffix, extra) in [
        ("", &["-u", "-b", "0"][..]),
        ("_1400", &["-u", "-b", "0", "-l", "1400"][..]),
    ] {
        let Ok(v) = iperf(running, len, extra) else {
            continue;
        };
        let Some(end) = v.pointer("/end/sum_received") else {
            continue;
        };
        put(
            &format!("udp{suffix}_gbps"),
            num(end, "bits_per_second") / 1e9,
        );
        put(&format!("udp{suffix}_loss_pct"), num(end, "lost_percent"));
        if let Some(blk) = v
            .pointer("/start/test_start/blksize")
            .and_then(Value::as_f64)
        {
            put(&format!("udp{suffix}_bytes"), blk);
        }
    }
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// One iperf3 client run (JSON), tried twice; failures are reported and leave a gap.
fn iperf(running: &Running, len: Lengths, extra: &[&str]) -> Result<Value> {
    let mut last = None;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        match iperf_once(running, len, extra) {
            Ok(v) => return Ok(v),
            Err(e) => {
                eprintln!("  iperf3 {}: {e:#}", extra.join(" "));
                last = Some(e);
            }
        }
    }
    Err(last.expect("two tries"))
}

fn iperf_once(running: &Running, len: Lengths, extra: &[&str]) -> Result<Value> {
    let mut cmd = running.client(Path::new("iperf3"));
    cmd.args([
        "-c",
        running.host(),
        "-p",
        &running.ports.iperf.to_string(),
        "-J",
    ])
    .args([
        "-t",
        &len.iperf_secs.to_string(),
        "--connect-timeout",
        "5000",
    ])
    .args(extra);
    let text = run_bounded(
        &mut cmd,
        Duration::from_secs(u64::from(len.iperf_secs) + 30),
    )?;
    let v: Value = serde_json::from_str(&text).context("iperf3 printed no JSON")?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    Ok(v)
}

/// Runs `cmd` and returns its stdout; kills it (by pid) when it outlives `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<String> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} took longer than {limit:?}", describe(cmd));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(reader.join().unwrap_or_default())
}

/// Short connections per second and the forwarder's CPU time per connection.
fn connections(
    env: &Env,
    running: &Running,
    len: Lengths,
    put: &mut dyn FnMut(&str, f64),
) -> Result<()> {
    let cpu0 = running.pid().map(procs::forwarder_cpu);
    let mut cmd = running.client(&env.bin.join("netbench"));
    cmd.args(["connrate", &running.addr(running.ports.close)])
        .args([len.conn_secs.to_string(), len.conn_threads.to_string()]);
    let text = run_bounded(&mut cmd, Duration::from_secs_f64(len.conn_secs + 60.0))?;
    let cpu1 = running.pid().map(procs::forwarder_cpu);

    let v: Value = serde_json::from_str(&text).context("connrate printed no JSON")?;
    let (conns, secs) = (num(&v, "conns"), num(&v, "secs"));
    if num(&v, "errors") > 0.0 {
        eprintln!("  connrate: {} failed connections", v["errors"]);
    }
    put("conn_per_s", conns / secs);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        if conns > 0.0 {
            put("cpu_us_per_conn", (b - a) / conns * 1e6);
        }
    }
    Ok(())
}

/// Round trips of small messages over one connection.
fn round_trips(
    env: &Env,
    running: &Running,
    len: Lengths,
    put: &mut dyn FnMut(&str, f64),
) -> Result<()> {
    // One CPU for the client, the forwarder and the server: the figure is then the path's own
    // cost, not the wake-up latency of an idle (virtual) CPU, which varies from run to run.
    let root = running.child.as_ref().context("not started")?.id() as i32;
    procs::pin_tree(root, "0");
    let mut cmd = running.client(Path::new("taskset"));
    cmd.args(["-c", "0"]).arg(env.bin.join("netbench")).args([
        "rtt",
        &running.addr(running.ports.echo),
        &len.rtt_count.to_string(),
    ]);
    let text = run_bounded(&mut cmd, Duration::from_secs(120));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    procs::pin_tree(root, &format!("0-{}", cpus - 1));
    let v: Value = serde_json::from_str(&text?).context("rtt printed no JSON")?;
    put("rtt_p50_us", num(&v, "p50_us"));
    put("rtt_p99_us", num(&v, "p99_us"));
    Ok(())
}

/// Resident memory of the forwarding processes with 1 and with many idle connections.
fn idle_memory(
    env: &Env,
    running: &Running,
    pid: i32,
    len: Lengths,
    put: &mut dyn FnMut(&str, f64),
    breakdown: &mut Vec<String>,
) -> Result<()> {
    let mut pss = 0.0;
    let one = with_idle(env, running, 1, || {
        *breakdown = procs::forwarder_breakdown(pid);
        pss = procs::forwarder_pss_kib(pid);
        procs::forwarder_rss_kib(pid)
    })?;
    put("pss1_mib", pss / 1024.0);
    let many = with_idle(env, running, len.idle_many, || {
        procs::forwarder_rss_kib(pid)
    })?;
    put("rss1_mib", one / 1024.0);
    put("rss100_mib", many / 1024.0);
    put(
        "rss_kib_per_conn",
        (many - one) / (len.idle_many - 1) as f64,
    );
    Ok(())
}

/// Holds `count` idle connections through the forwarder while `sample` runs.
fn with_idle(
    env: &Env,
    running: &Running,
    count: usize,
    sample: impl FnOnce() -> f64,
) -> Result<f64> {
    let mut child = running
        .client(&env.bin.join("netbench"))
        .args([
            "idle",
            &running.addr(running.ports.echo),
            &count.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("no stdout")?;
    BufReader::new(stdout).read_line(&mut line)?;
    let value = match line.trim() {
        "ready" => {
            std::thread::sleep(Duration::from_millis(500));
            Ok(sample())
        }
        _ => Err(anyhow::anyhow!("idle connections through the port failed")),
    };
    drop(child.stdin.take());
    let _ = run_bounded_wait(&mut child, Duration::from_secs(10));
    value
}

fn run_bounded_wait(child: &mut Child, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    Ok(())
}
