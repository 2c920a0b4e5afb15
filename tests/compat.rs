//! Drop-in compatibility with upstream RootlessKit 1.1.0, checked against the real one.
//!
//! Every test here runs both implementations, ours from the build directory and upstream's
//! from `/usr/bin` (see `compat/support.rs` for how upstream runs when the tests run as
//! root), and compares what a user or a client sees:
//!
//! - `rootlessctl` both ways: each `rootlessctl` against each server, one scripted session per
//!   pair on a fresh server, compared step by step (exit codes, output up to row order);
//! - raw HTTP on `api.sock`: status codes, headers, JSON keys and error bodies;
//! - the `rootlesskit` command line: every flag upstream's `--help` lists;
//! - case C09 (bad specs), the start-up info line and log filtering, on ours alone.
//!
//! Upstream must be installed: without `/usr/bin/rootlesskit` these tests fail, they do not
//! skip. The differences they tolerate are the ones README.md's "Differences from upstream"
//! lists; each is printed when the tests run with `--nocapture`.

#[path = "compat/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use serde_json::Value;
use support::{
    ctl, free_ports, raw_request, require_upstream, run_kit, strings, Impl, Outcome, RawResponse,
    RuntimeDir, Server,
};

/// The network and port driver both servers of a comparison use.
const SLIRP_BUILTIN: [&str; 4] = [
    "--net=slirp4netns",
    "--disable-host-loopback",
    "--port-driver=builtin",
    "--debug=false",
];

/// How a step's stderr may differ between the two implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Errs {
    /// Success: stderr is empty everywhere.
    Empty,
    /// The same error text from every client against every server.
    Same,
    /// The server's message: both clients print the same text against one server, and the two
    /// servers word it differently.
    PerServer,
    /// Refused by the client, or by the server with the client's and server's wording
    /// differing: every stderr starts with `error: `.
    Differs,
}

/// One `rootlessctl` invocation of a session; `{N}` in an argument is the session's port N.
#[derive(Debug)]
struct Step {
    args: &'static [&'static str],
    code: i32,
    errs: Errs,
    /// Expected stdout (after normalisation), when it is worth pinning.
    stdout: Option<&'static str>,
}

const fn step(args: &'static [&'static str], code: i32, errs: Errs) -> Step {
    Step {
        args,
        code,
        errs,
        stdout: None,
    }
}

const fn prints(args: &'static [&'static str], stdout: &'static str) -> Step {
    Step {
        args,
        code: 0,
        errs: Errs::Empty,
        stdout: Some(stdout),
    }
}

/// The session each (server, client) pair runs on a fresh server.
const SESSION: &[Step] = &[
    step(&["info"], 0, Errs::Empty),
    step(&["info", "--json"], 0, Errs::Empty),
    prints(
        &["list-ports"],
        "ID    PROTO    PARENTIP    PARENTPORT    CHILDIP    CHILDPORT    \n",
    ),
    prints(&["list-ports", "--json"], ""),
    prints(&["add-ports", "127.0.0.1:{0}:80/tcp"], "1\n"),
    step(
        &[
            "add-ports",
            "--json",
            "127.0.0.1:{1}:81/udp",
            "127.0.0.1:{2}:10.0.2.100:82/tcp4",
            "127.0.0.1:{3}:83/udp4",
        ],
        0,
        Errs::Empty,
    ),
    step(&["list-ports"], 0, Errs::Empty),
    step(&["list-ports", "--json"], 0, Errs::Empty),
    step(&["add-ports", "127.0.0.1:{0}:90/tcp"], 1, Errs::Same),
    Step {
        args: &["add-ports", "127.0.0.1:{4}:84/tcp", "127.0.0.1:{0}:85/tcp"],
        code: 1,
        errs: Errs::Same,
        stdout: Some("5\n"),
    },
    step(&["add-ports", "bad"], 1, Errs::Differs),
    step(&["add-ports", "127.0.0.1:{5}:80/sctp"], 1, Errs::PerServer),
    step(&["add-ports", "127.0.0.1:0:80/tcp"], 1, Errs::Differs),
    step(&["add-ports", "127.0.0.1:70000:80/tcp"], 1, Errs::Differs),
    step(&["add-ports", "127.0.0.1:{5}:80:81/tcp"], 1, Errs::Differs),
    step(
        &["add-ports", "127.0.0.1:{5}:not-an-ip:80/tcp"],
        1,
        Errs::Differs,
    ),
    step(&["add-ports"], 1, Errs::Same),
    prints(&["remove-ports", "2", "3"], "2\n3\n"),
    step(&["remove-ports", "999"], 1, Errs::Same),
    Step {
        args: &["remove-ports", "1", "999", "4"],
        code: 1,
        errs: Errs::Same,
        stdout: Some("1\n"),
    },
    step(&["remove-ports", "abc"], 1, Errs::Differs),
    step(&["remove-ports"], 1, Errs::Same),
    step(&["list-ports"], 0, Errs::Empty),
    step(&["list-ports", "--json"], 0, Errs::Empty),
    prints(&["add-ports", "127.0.0.1:{1}:81/udp"], "6\n"),
    step(&["frobnicate"], 3, Errs::Same),
];

/// `template` with `{N}` replaced by `ports[N]`.
fn fill(template: &str, ports: &[u16]) -> String {
    let mut text = template.to_owned();
    for (n, port) in ports.iter().enumerate() {
        text = text.replace(&format!("{{{n}}}"), &port.to_string());
    }
    text
}

/// Output with what legitimately varies replaced by placeholders: the state dir, the child
/// pid, the implementation version, and the order of `list-ports` rows.
fn normalize(text: &str, server: &Server) -> String {
    let state = server.state_dir().display().to_string();
    let pid = server.child_pid();
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let line = line.replace(&state, "$STATE");
            if line.starts_with("- Child PID: ") || line.trim_start().starts_with("\"childPID\"") {
                return line.replace(&pid, "$PID");
            }
            if line.starts_with("- Implementation version: ") {
                return "- Implementation version: $VERSION".into();
            }
            if line.trim_start().starts_with("\"version\": ") {
                return "    \"version\": \"$VERSION\",".into();
            }
            line
        })
        .collect();
    sorted_rows(lines)
}

/// Sorts table rows (after the header) and JSON lines: upstream lists ports in Go map order.
fn sorted_rows(mut lines: Vec<String>) -> String {
    let first_row = match lines.first() {
        Some(header) if header.starts_with("ID ") => 1,
        Some(line) if line.starts_with("{\"id\":") => 0,
        _ => lines.len(),
    };
    lines[first_row..].sort();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Runs [`SESSION`] with client `client` against a fresh server `server`.
fn run_session(server: Impl, client: Impl, ports: &[u16]) -> Vec<Outcome> {
    let kit = Server::start(server, &SLIRP_BUILTIN);
    let socket = kit.api_socket();
    let outcomes = SESSION
        .iter()
        .map(|step| {
            let args: Vec<String> = step.args.iter().map(|a| fill(a, ports)).collect();
            let out = ctl(client, &socket, &args);
            Outcome {
                stdout: normalize(&out.stdout, &kit),
                ..out
            }
        })
        .collect();
    let (code, stderr) = kit.stop();
    assert_eq!(code, 0, "{} rootlesskit exit: {stderr}", server.name());
    outcomes
}

fn describe_all(runs: &[(Impl, Impl, &Outcome)]) -> String {
    runs.iter()
        .map(|(server, client, out)| {
            format!(
                "--- {} rootlessctl -> {} server: exit {}\nstdout:\n{}stderr:\n{}",
                client.name(),
                server.name(),
                out.code,
                out.stdout,
                out.stderr
            )
        })
        .collect()
}

/// Asserts step `step` agrees across `runs` (server, client, outcome).
fn check_step(step: &Step, runs: &[(Impl, Impl, &Outcome)]) {
    let ctx = || format!("step {:?}\n{}", step.args, describe_all(runs));
    let first = runs[0].2;
    for (_, _, out) in runs {
        assert_eq!(out.code, step.code, "exit code\n{}", ctx());
        assert_eq!(out.stdout, first.stdout, "stdout\n{}", ctx());
        match step.errs {
            Errs::Empty => assert_eq!(out.stderr, "", "stderr\n{}", ctx()),
            Errs::Same => assert_eq!(out.stderr, first.stderr, "stderr\n{}", ctx()),
            Errs::PerServer | Errs::Differs => {
                assert!(out.stderr.starts_with("error: "), "stderr\n{}", ctx());
            }
        }
    }
    if let Some(want) = step.stdout {
        assert_eq!(first.stdout, want, "pinned stdout\n{}", ctx());
    }
    if step.errs == Errs::PerServer {
        for server in Impl::BOTH {
            let texts: BTreeSet<&str> = runs
                .iter()
                .filter(|(s, _, _)| *s == server)
                .map(|(_, _, out)| out.stderr.as_str())
                .collect();
            assert_eq!(texts.len(), 1, "one message per server\n{}", ctx());
        }
    }
}

/// Prints the stderr lines that differ between implementations (README lists them).
fn report_differences(runs: &[(Impl, Impl, Vec<Outcome>)]) {
    for (i, step) in SESSION.iter().enumerate() {
        let texts: BTreeSet<String> = runs
            .iter()
            .map(|(s, c, outs)| {
                format!(
                    "  {} ctl -> {} server: {}",
                    c.name(),
                    s.name(),
                    outs[i].stderr.trim_end()
                )
            })
            .collect();
        let distinct: BTreeSet<&str> = runs.iter().map(|r| r.2[i].stderr.as_str()).collect();
        if distinct.len() > 1 {
            eprintln!("difference at {:?}:", step.args);
            texts.iter().for_each(|t| eprintln!("{t}"));
        }
    }
}

/// 1a and 1b: upstream `rootlessctl` drives our `api.sock`, ours drives upstream's, and each
/// prints what the other prints.
#[test]
fn rootlessctl_both_ways() {
    require_upstream();
    let ports = free_ports(6);
    let mut runs = Vec::new();
    for server in Impl::BOTH {
        for client in Impl::BOTH {
            runs.push((server, client, run_session(server, client, &ports)));
        }
    }
    report_differences(&runs);
    for (i, step) in SESSION.iter().enumerate() {
        let views: Vec<(Impl, Impl, &Outcome)> =
            runs.iter().map(|(s, c, outs)| (*s, *c, &outs[i])).collect();
        check_step(step, &views);
    }

    // Our server's own wording of the errors the clients pass through.
    let ours_sctp = &runs[0].2[11].stderr;
    assert_eq!(
        ours_sctp,
        "error: protocol sctp is not supported by port driver builtin\n"
    );
}

/// The client side without a server: argument errors and a missing socket.
#[test]
fn rootlessctl_without_a_server() {
    require_upstream();
    let missing = Path::new("/nonexistent/api.sock");
    let same: [&[&str]; 6] = [
        &["list-ports"],
        &["info", "--json"],
        &["add-ports"],
        &["remove-ports"],
        &["bogus-command"],
        &["add-ports", "127.0.0.1:8080:80/tcp"],
    ];
    for args in same {
        let args = strings(args);
        let ours = ctl(Impl::Ours, missing, &args);
        let theirs = ctl(Impl::Upstream, missing, &args);
        assert_eq!(ours, theirs, "{args:?}");
    }
    // Upstream also prints the command's help on stdout.
    let args = strings(&["list-ports", "--bogus"]);
    let ours = ctl(Impl::Ours, missing, &args);
    let theirs = ctl(Impl::Upstream, missing, &args);
    assert_eq!((ours.code, &ours.stderr), (theirs.code, &theirs.stderr));

    // Same exit code, different (clearer) words.
    let differ: [&[&str]; 2] = [&["add-ports", "127.0.0.1:8080:80"], &["remove-ports", "x"]];
    for args in differ {
        let args = strings(args);
        let ours = ctl(Impl::Ours, missing, &args);
        let theirs = ctl(Impl::Upstream, missing, &args);
        assert_eq!(ours.code, theirs.code, "{args:?}\n{ours:?}\n{theirs:?}");
        eprintln!(
            "{args:?}\n  ours: {}  upstream: {}",
            ours.stderr, theirs.stderr
        );
    }
}

/// The raw requests of the HTTP comparison; `{N}` is port N.
const REQUESTS: &[(&str, &str, &str)] = &[
    ("GET", "/v1/info", ""),
    ("GET", "/v1/ports", ""),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":{0},"childPort":80}"#,
    ),
    ("GET", "/v1/ports", ""),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":{0},"childPort":81}"#,
    ),
    (
        "POST",
        "/v1/ports",
        r#"{"Proto":"udp","PARENTIP":"127.0.0.1","parentport":{1},"childPort":81} trailing"#,
    ),
    ("POST", "/v1/ports", ""),
    ("POST", "/v1/ports", "{"),
    ("POST", "/v1/ports", "[]"),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":"x","childPort":80}"#,
    ),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"sctp","parentIP":"127.0.0.1","parentPort":{2},"childPort":80}"#,
    ),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":0,"childPort":80}"#,
    ),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":70000,"childPort":80}"#,
    ),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":{2},"childPort":80,"childIP":"x"}"#,
    ),
    (
        "POST",
        "/v1/ports",
        r#"{"proto":"TCP","parentIP":"127.0.0.1","parentPort":{2},"childPort":80}"#,
    ),
    ("DELETE", "/v1/ports/999", ""),
    ("DELETE", "/v1/ports/abc", ""),
    ("DELETE", "/v1/ports/1", ""),
    ("GET", "/v1/ports", ""),
    ("GET", "/v1/foo", ""),
    ("GET", "/v2/info", ""),
    ("GET", "/v1/ports/", ""),
    ("PUT", "/v1/ports", ""),
    ("DELETE", "/v1/ports", ""),
    ("GET", "/v1/ports/5", ""),
    ("POST", "/v1/info", ""),
];

/// Error messages that must be word for word upstream's (clients and scripts match them).
const SAME_MESSAGES: &[&str] = &["conflict with ID 1", "unknown id: 999"];

fn raw_session(which: Impl, ports: &[u16]) -> Vec<RawResponse> {
    let kit = Server::start(which, &SLIRP_BUILTIN);
    let socket = kit.api_socket();
    let responses = REQUESTS
        .iter()
        .map(|(method, path, body)| {
            let mut resp = raw_request(&socket, method, path, &fill(body, ports))
                .unwrap_or_else(|e| panic!("{} {method} {path}: {e}", which.name()));
            resp.body = normalize(&resp.body, &kit);
            resp
        })
        .collect();
    let (code, stderr) = kit.stop();
    assert_eq!(code, 0, "{} rootlesskit exit: {stderr}", which.name());
    responses
}

/// The shape of a JSON value: object keys (recursively) and array lengths, no scalars.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), shape(v))).collect(),
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        _ => Value::Null,
    }
}

/// A body's JSON with `version`, `childPID` and `stateDir` blanked and arrays of ports sorted.
fn comparable_json(body: &str) -> Option<Value> {
    let mut value: Value = serde_json::from_str(body.trim_end()).ok()?;
    if let Some(map) = value.as_object_mut() {
        for key in ["version", "childPID", "stateDir"] {
            if let Some(v) = map.get_mut(key) {
                *v = Value::Null;
            }
        }
    }
    if let Some(items) = value.as_array_mut() {
        items.sort_by_key(|item| item["id"].as_i64());
    }
    Some(value)
}

fn check_response(request: &(&str, &str, &str), ours: &RawResponse, theirs: &RawResponse) {
    let ctx = format!("{request:?}\n--- ours\n{ours:#?}\n--- upstream\n{theirs:#?}");
    assert_eq!(ours.status, theirs.status, "status\n{ctx}");
    match ours.status {
        200 | 201 if theirs.body.is_empty() => assert_eq!(ours.body, "", "body\n{ctx}"),
        200 | 201 => {
            assert_eq!(
                comparable_json(&ours.body),
                comparable_json(&theirs.body),
                "JSON body\n{ctx}"
            );
            assert_eq!(
                ours.header("content-type"),
                Some("application/json"),
                "{ctx}"
            );
        }
        400 => check_error_body(ours, theirs, &ctx),
        404 => assert_eq!(ours.body, theirs.body, "404 body\n{ctx}"),
        _ => assert_eq!(ours.body, theirs.body, "body\n{ctx}"),
    }
}

fn check_error_body(ours: &RawResponse, theirs: &RawResponse, ctx: &str) {
    let (a, b) = (
        comparable_json(&ours.body).expect("our error body is JSON"),
        comparable_json(&theirs.body).expect("upstream error body is JSON"),
    );
    assert_eq!(shape(&a), shape(&b), "error keys\n{ctx}");
    assert!(ours.body.ends_with("}\n"), "newline after JSON\n{ctx}");
    let theirs_msg = b["message"].as_str().unwrap_or_default();
    if SAME_MESSAGES.contains(&theirs_msg) {
        assert_eq!(a, b, "message\n{ctx}");
    } else if a != b {
        eprintln!("message differs: ours {} / upstream {}", a, b);
    }
}

/// 1c: the same raw HTTP requests to both servers get the same answers.
#[test]
fn raw_http_agrees() {
    require_upstream();
    let ports = free_ports(3);
    let ours = raw_session(Impl::Ours, &ports);
    let theirs = raw_session(Impl::Upstream, &ports);
    for ((request, ours), theirs) in REQUESTS.iter().zip(&ours).zip(&theirs) {
        check_response(request, ours, theirs);
    }
    // The pinned facts, in case both sides changed together.
    assert_eq!(ours[1].body, "null\n", "empty list is null");
    assert_eq!(ours[2].status, 201);
    for (i, status) in [(19, 404), (22, 405), (25, 405)] {
        assert_eq!(ours[i].status, status, "{:?}", REQUESTS[i]);
    }
    let headers: Vec<_> = (0..REQUESTS.len())
        .filter(|&i| ours[i].header("content-type") != theirs[i].header("content-type"))
        .map(|i| (REQUESTS[i].0, REQUESTS[i].1, ours[i].status))
        .collect();
    eprintln!("content-type differs for {headers:?}");
}

/// What a row of [`FLAG_ROWS`] expects of ours.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Exit code and (for 0) success as upstream.
    Same,
    /// Refused by name with exit 1 (upstream has a feature we do not).
    Refused(&'static str),
}

/// For each flag of upstream's `--help`, command lines using it; `{RUN}` is a runtime dir of
/// the user running rootlesskit, `{0}`/`{1}` free ports. Each line ends in the command `true`
/// unless it is `--help`/`--version`.
const FLAG_ROWS: &[(&str, &[&str], Want)] = &[
    ("debug", &["--debug", "true"], Want::Same),
    ("debug", &["-debug=false", "true"], Want::Same),
    ("help", &["--help"], Want::Same),
    ("h", &["-h"], Want::Same),
    ("version", &["--version"], Want::Same),
    ("v", &["-v"], Want::Same),
    ("copy-up", &["--copy-up=/etc", "true"], Want::Same),
    (
        "copy-up-mode",
        &["--copy-up-mode=tmpfs+symlink", "true"],
        Want::Same,
    ),
    ("propagation", &["--propagation=rslave", "true"], Want::Same),
    ("net", &["--net=host", "true"], Want::Same),
    ("net", &["-net=slirp4netns", "true"], Want::Same),
    ("net", &["--net=bogus", "true"], Want::Same),
    (
        "mtu",
        &["--net=slirp4netns", "--mtu=1500", "true"],
        Want::Same,
    ),
    ("mtu", &["--mtu=70000", "true"], Want::Same),
    (
        "cidr",
        &["--net=slirp4netns", "--cidr=10.0.3.0/24", "true"],
        Want::Same,
    ),
    ("cidr", &["--cidr=10.0.3.0/24", "true"], Want::Same),
    (
        "ifname",
        &["--net=slirp4netns", "--ifname=eth1", "true"],
        Want::Same,
    ),
    ("ifname", &["--ifname=eth1", "true"], Want::Same),
    (
        "disable-host-loopback",
        &["--net=slirp4netns", "--disable-host-loopback", "true"],
        Want::Same,
    ),
    (
        "disable-host-loopback",
        &["--disable-host-loopback=false", "true"],
        Want::Same,
    ),
    ("ipv6", &["--ipv6=false", "true"], Want::Same),
    ("ipv6", &["--ipv6", "true"], Want::Refused("--ipv6")),
    (
        "lxc-user-nic-binary",
        &["--lxc-user-nic-binary=", "true"],
        Want::Same,
    ),
    (
        "lxc-user-nic-binary",
        &["--lxc-user-nic-binary=/usr/bin/lxc-user-nic", "true"],
        Want::Refused("--lxc-user-nic-binary"),
    ),
    (
        "lxc-user-nic-bridge",
        &["--lxc-user-nic-bridge=lxcbr0", "true"],
        Want::Same,
    ),
    (
        "lxc-user-nic-bridge",
        &["--lxc-user-nic-bridge=br1", "true"],
        Want::Refused("--lxc-user-nic-bridge"),
    ),
    (
        "slirp4netns-binary",
        &[
            "--net=slirp4netns",
            "--slirp4netns-binary=/usr/bin/slirp4netns",
            "true",
        ],
        Want::Same,
    ),
    (
        "slirp4netns-binary",
        &[
            "--net=slirp4netns",
            "--slirp4netns-binary=/nonexistent",
            "true",
        ],
        Want::Same,
    ),
    (
        "slirp4netns-sandbox",
        &["--slirp4netns-sandbox=false", "true"],
        Want::Same,
    ),
    (
        "slirp4netns-sandbox",
        &["--net=slirp4netns", "--slirp4netns-sandbox=true", "true"],
        Want::Refused("--slirp4netns-sandbox"),
    ),
    (
        "slirp4netns-seccomp",
        &["--slirp4netns-seccomp=false", "true"],
        Want::Same,
    ),
    (
        "slirp4netns-seccomp",
        &["--net=slirp4netns", "--slirp4netns-seccomp=true", "true"],
        Want::Refused("--slirp4netns-seccomp"),
    ),
    (
        "vpnkit-binary",
        &["--vpnkit-binary=vpnkit", "true"],
        Want::Same,
    ),
    (
        "vpnkit-binary",
        &["--vpnkit-binary=/usr/bin/vpnkit", "true"],
        Want::Refused("--vpnkit-binary"),
    ),
    (
        "port-driver",
        &["--net=slirp4netns", "-port-driver=builtin", "true"],
        Want::Same,
    ),
    (
        "port-driver",
        &["--net=slirp4netns", "--port-driver=slirp4netns", "true"],
        Want::Same,
    ),
    (
        "port-driver",
        &["--port-driver=builtin", "true"],
        Want::Same,
    ),
    ("port-driver", &["--port-driver=bogus", "true"], Want::Same),
    (
        "publish",
        &[
            "--net=slirp4netns",
            "--port-driver=builtin",
            "--publish=127.0.0.1:{0}:80/tcp",
            "true",
        ],
        Want::Same,
    ),
    (
        "p",
        &[
            "--net=slirp4netns",
            "--port-driver=builtin",
            "-p",
            "127.0.0.1:{0}:80/tcp",
            "-p=127.0.0.1:{1}:81/udp",
            "true",
        ],
        Want::Same,
    ),
    (
        "p",
        &[
            "--net=slirp4netns",
            "--port-driver=builtin",
            "-p",
            "bad",
            "true",
        ],
        Want::Same,
    ),
    ("pidns", &["--pidns=false", "true"], Want::Same),
    ("pidns", &["--pidns", "true"], Want::Refused("--pidns")),
    ("cgroupns", &["--cgroupns=false", "true"], Want::Same),
    (
        "cgroupns",
        &["--cgroupns", "true"],
        Want::Refused("--cgroupns"),
    ),
    ("utsns", &["--utsns=false", "true"], Want::Same),
    ("utsns", &["-utsns", "true"], Want::Refused("--utsns")),
    ("ipcns", &["--ipcns=false", "true"], Want::Same),
    ("ipcns", &["--ipcns=true", "true"], Want::Refused("--ipcns")),
    ("reaper", &["--reaper=auto", "true"], Want::Same),
    ("reaper", &["--reaper=false", "true"], Want::Same),
    (
        "reaper",
        &["--reaper=true", "true"],
        Want::Refused("--reaper"),
    ),
    (
        "evacuate-cgroup2",
        &["--evacuate-cgroup2=", "true"],
        Want::Same,
    ),
    (
        "evacuate-cgroup2",
        &["--evacuate-cgroup2=rkport", "true"],
        Want::Refused("--evacuate-cgroup2"),
    ),
    ("state-dir", &["-state-dir={RUN}/sd", "true"], Want::Same),
    (
        "state-dir",
        &["--state-dir", "{RUN}/sd", "true"],
        Want::Same,
    ),
    ("subid-source", &["--subid-source=auto", "true"], Want::Same),
    (
        "subid-source",
        &["--subid-source=static", "true"],
        Want::Same,
    ),
    (
        "subid-source",
        &["--subid-source=dynamic", "true"],
        Want::Refused("--subid-source"),
    ),
    ("bogus", &["--bogus", "true"], Want::Same),
];

/// What upstream 1.1.0's error names when the command exits before the builtin driver's
/// namespace half has answered (a start-up race of upstream's, not a result), e.g.
/// `read unix @->/tmp/rootlesskit1/.bp.sock: read: connection reset by peer`.
const UPSTREAM_BUILTIN_RACE: &str = "/.bp";

/// Runs upstream's `rootlesskit`, again (at most 5 times) while it loses its start-up race.
fn run_upstream_kit(runtime: &Path, args: &[String]) -> Outcome {
    let mut out: Outcome = run_kit(Impl::Upstream, runtime, args).into();
    for _ in 0..4 {
        if !out.stderr.contains(UPSTREAM_BUILTIN_RACE) {
            break;
        }
        out = run_kit(Impl::Upstream, runtime, args).into();
    }
    out
}

/// The flag names of upstream's `--help` (`--copy-up value`, `--help, -h` ...).
fn upstream_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim)
        .filter(|line| line.starts_with('-'))
        .flat_map(|line| {
            let names = line.split("  ").next().unwrap_or_default();
            names
                .split(", ")
                .filter_map(|name| name.split_whitespace().next())
                .map(|name| name.trim_start_matches('-').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// 2: every flag of upstream's `--help` is accepted; those we implement behave as upstream's,
/// the others are refused by name.
#[test]
fn every_upstream_flag() {
    require_upstream();
    let help = run_kit(Impl::Upstream, Path::new("/"), &strings(&["--help"]));
    let flags = upstream_flags(&String::from_utf8_lossy(&help.stdout));
    assert!(
        flags.len() >= 30,
        "cannot read upstream's --help: {flags:?}"
    );
    for flag in &flags {
        assert!(
            FLAG_ROWS.iter().any(|(name, _, _)| name == flag),
            "upstream flag --{flag} has no row in FLAG_ROWS"
        );
    }

    let ports = free_ports(2);
    for (flag, args, want) in FLAG_ROWS {
        let runtime = [RuntimeDir::new(), RuntimeDir::new()];
        let line = |dir: &RuntimeDir| -> Vec<String> {
            let run = dir.path().display().to_string();
            args.iter()
                .map(|a| fill(a, &ports).replace("{RUN}", &run))
                .collect()
        };
        let ours: Outcome = run_kit(Impl::Ours, runtime[0].path(), &line(&runtime[0])).into();
        let theirs = run_upstream_kit(runtime[1].path(), &line(&runtime[1]));
        let ctx = format!("--{flag}: {args:?}\n--- ours\n{ours:#?}\n--- upstream\n{theirs:#?}");
        assert_eq!(
            ours.stderr.contains("flag provided but not defined"),
            *flag == "bogus",
            "accepted unless unknown\n{ctx}"
        );
        match want {
            Want::Same => assert_eq!(ours.code, theirs.code, "exit code\n{ctx}"),
            Want::Refused(name) => {
                assert_eq!(ours.code, 1, "{ctx}");
                assert!(
                    ours.stderr.contains(&format!("{name}="))
                        && ours.stderr.contains("not supported"),
                    "refused by name\n{ctx}"
                );
            }
        }
        if matches!(*flag, "help" | "h") {
            assert!(ours.stdout.contains("--port-driver"), "{ctx}");
        }
        if matches!(*flag, "version" | "v") {
            assert!(ours.stdout.starts_with("rootlesskit version "), "{ctx}");
        }
    }
}

/// Go's flag syntax (`-net=`, `-p` repeated, `-p=`, `--flag=false`) publishes the same ports
/// with both implementations.
#[test]
fn go_style_flags_publish_like_upstream() {
    require_upstream();
    let ports = free_ports(2);
    let p0 = format!("127.0.0.1:{}:80/tcp", ports[0]);
    let p1 = format!("-p=127.0.0.1:{}:81/udp", ports[1]);
    let args = [
        "-net=slirp4netns",
        "-disable-host-loopback=true",
        "-port-driver=builtin",
        "-p",
        &p0,
        &p1,
        "--debug=false",
    ];
    let mut listed = Vec::new();
    for which in Impl::BOTH {
        let kit = Server::start(which, &args);
        let out = ctl(Impl::Upstream, &kit.api_socket(), &strings(&["list-ports"]));
        assert_eq!(out.code, 0, "{out:?}");
        listed.push(normalize(&out.stdout, &kit));
        assert_eq!(kit.stop().0, 0);
    }
    assert_eq!(listed[0], listed[1]);
    assert_eq!(listed[0].lines().count(), 3, "{}", listed[0]);
}

/// Case C09: every malformed or unsupported spec is refused, nothing is added, and the message
/// names the field and shows numbers as numbers.
#[test]
fn c09_bad_specs_are_refused_precisely() {
    let ports = free_ports(1);
    let p = ports[0];
    let cases = [
        (
            format!("127.0.0.1:{p}:80/sctp"),
            "protocol sctp is not supported by port driver builtin",
        ),
        (
            format!("127.0.0.1:{p}:80/sctp4"),
            "protocol sctp4 is not supported by port driver builtin",
        ),
        (format!("127.0.0.1:{p}:80/foo"), "unknown proto: \"foo\""),
        ("127.0.0.1:0:80/tcp".into(), "invalid ParentPort: 0 "),
        (
            "127.0.0.1:70000:80/tcp".into(),
            "invalid ParentPort: 70000 ",
        ),
        (format!("127.0.0.1:{p}:0/tcp"), "invalid ChildPort: 0 "),
        (
            format!("999.0.0.1:{p}:80/tcp"),
            "invalid ParentIP: \"999.0.0.1\"",
        ),
        (
            format!("127.0.0.1:{p}:not-an-ip:80/tcp"),
            "invalid ChildIP: \"not-an-ip\"",
        ),
        (format!("127.0.0.1:{p}:80"), "/PROTO"),
    ];
    let kit = Server::start(Impl::Ours, &SLIRP_BUILTIN);
    let socket = kit.api_socket();
    for (spec, want) in &cases {
        let out = ctl(Impl::Ours, &socket, &strings(&["add-ports", spec]));
        assert_ne!(out.code, 0, "{spec}: {out:?}");
        assert!(
            out.stderr.contains(want),
            "{spec}: want {want:?} in {out:?}"
        );
        assert_eq!(out.stdout, "", "{spec}");
    }
    let listed = ctl(Impl::Ours, &socket, &strings(&["list-ports", "--json"]));
    assert_eq!(
        (listed.code, listed.stdout.as_str()),
        (0, ""),
        "nothing was added"
    );
    let info = ctl(Impl::Ours, &socket, &strings(&["info"]));
    assert!(!info.stdout.contains("sctp"), "{}", info.stdout);
    assert_eq!(kit.stop().0, 0);

    // The launcher refuses an sctp -p before the command runs, leaving nothing behind.
    let runtime = RuntimeDir::new();
    let marker = runtime.path().join("ran");
    let state = runtime.path().join("state");
    let out: Outcome = support::run_kit(
        Impl::Ours,
        runtime.path(),
        &strings(&[
            format!("--state-dir={}", state.display()),
            "--net=slirp4netns".into(),
            "--port-driver=builtin".into(),
            "-p".into(),
            format!("127.0.0.1:{p}:80/sctp"),
            "touch".into(),
            marker.display().to_string(),
        ]),
    )
    .into();
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("protocol sctp is not supported by port driver builtin"),
        "{out:?}"
    );
    assert!(!marker.exists(), "the command ran");
    assert!(!state.join("api.sock").exists(), "api.sock left behind");
}

/// How the failed connection inside the namespace shows in a log line.
const REFUSED: &str = "Connection refused";

/// Connects to a published port whose namespace side has no listener and waits until the
/// connection is closed, so that the failure has been handled (and logged) when this returns.
fn connect_to_dead_port(port: u16) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to published port");
    let _ = stream.write_all(b"hello");
    let mut buf = [0; 16];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

fn lines_with<'a>(text: &'a str, level: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|line| line.split_whitespace().next() == Some(level))
        .collect()
}

/// 3: exactly one info line at start naming the drivers and the socket; `--debug` and
/// `RUST_LOG` filtering; per-connection failures only at debug level.
#[test]
fn one_info_line_and_log_filtering() {
    let port = free_ports(1)[0];
    let publish = format!("127.0.0.1:{port}:9/tcp");
    let args = |extra: &'static str| -> Vec<String> {
        let mut args = strings(&SLIRP_BUILTIN[..3]);
        args.extend(["-p".to_owned(), publish.clone(), extra.to_owned()]);
        args
    };
    let start = |args: &[String], env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_with_env(Impl::Ours, &args, env)
    };

    // Default: one INFO line, nothing about the failed connection.
    let kit = start(&args("--debug=false"), &[]);
    let socket = kit.api_socket().display().to_string();
    connect_to_dead_port(port);
    let (code, stderr) = kit.stop();
    assert_eq!(code, 0, "{stderr}");
    let info = lines_with(&stderr, "INFO");
    assert_eq!(info.len(), 1, "{stderr}");
    for field in [
        "network_driver=slirp4netns",
        "port_driver=builtin",
        &format!("api_socket={socket}"),
    ] {
        assert!(info[0].contains(field), "{field} in {}", info[0]);
    }
    assert!(lines_with(&stderr, "DEBUG").is_empty(), "{stderr}");
    assert!(
        !stderr.contains(REFUSED),
        "connection failure logged above debug: {stderr}"
    );

    // --debug: the failed connection is logged at debug, still one INFO line.
    let kit = start(&args("--debug"), &[]);
    connect_to_dead_port(port);
    let (_, stderr) = kit.stop();
    assert_eq!(lines_with(&stderr, "INFO").len(), 1, "{stderr}");
    assert!(
        lines_with(&stderr, "DEBUG")
            .iter()
            .any(|l| l.contains(REFUSED) && l.contains("port=1")),
        "no debug line about the failed connection: {stderr}"
    );

    // RUST_LOG overrides: warn hides the info line.
    let kit = start(&args("--debug=false"), &[("RUST_LOG", "warn")]);
    let (_, stderr) = kit.stop();
    assert!(lines_with(&stderr, "INFO").is_empty(), "{stderr}");
}
