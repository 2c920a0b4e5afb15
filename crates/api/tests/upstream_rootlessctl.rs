//! Wire compatibility: upstream's `rootlessctl` (RootlessKit 1.1.0) against our server.

mod common;

use std::error::Error;
use std::path::Path;
use std::process::{Command, Output};

use common::start_table;

type TestResult = Result<(), Box<dyn Error>>;

const UPSTREAM: &str = "/usr/bin/rootlessctl";

fn ctl(socket: &Path, args: &[&str]) -> Result<Output, Box<dyn Error>> {
    let mut command = Command::new(UPSTREAM);
    command
        .arg(format!("--socket={}", socket.display()))
        .args(args);
    Ok(command.output()?)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "needs upstream rootlessctl 1.1.0 at /usr/bin/rootlessctl; run with --ignored"]
fn upstream_rootlessctl_talks_to_our_server() -> TestResult {
    let fx = start_table()?;

    let empty = ctl(&fx.path, &["list-ports"])?;
    assert!(empty.status.success(), "{}", stderr(&empty));
    assert_eq!(
        stdout(&empty),
        "ID    PROTO    PARENTIP    PARENTPORT    CHILDIP    CHILDPORT    \n"
    );
    let empty_json = ctl(&fx.path, &["list-ports", "--json"])?;
    assert_eq!(stdout(&empty_json), "");

    let added = ctl(
        &fx.path,
        &[
            "add-ports",
            "127.0.0.1:18082:10.0.2.100:82/udp",
            "[::1]:18083:[::1]:83/tcp6",
        ],
    )?;
    assert!(added.status.success(), "{}", stderr(&added));
    assert_eq!(stdout(&added), "1\n2\n");

    let conflict = ctl(&fx.path, &["add-ports", "127.0.0.1:18082:82/udp"])?;
    assert_eq!(conflict.status.code(), Some(1));
    assert_eq!(stderr(&conflict), "error: conflict with ID 1\n");

    let listed = ctl(&fx.path, &["list-ports"])?;
    assert_eq!(
        stdout(&listed),
        "ID    PROTO    PARENTIP     PARENTPORT    CHILDIP       CHILDPORT    \n\
         1     udp      127.0.0.1    18082         10.0.2.100    82           \n\
         2     tcp6     ::1          18083         ::1           83           \n"
    );
    let json = ctl(&fx.path, &["list-ports", "--json"])?;
    assert_eq!(
        stdout(&json),
        "{\"id\":1,\"spec\":{\"proto\":\"udp\",\"parentIP\":\"127.0.0.1\",\"parentPort\":18082,\"childPort\":82,\"childIP\":\"10.0.2.100\"}}\n\
         {\"id\":2,\"spec\":{\"proto\":\"tcp6\",\"parentIP\":\"::1\",\"parentPort\":18083,\"childPort\":83,\"childIP\":\"::1\"}}\n"
    );

    let removed = ctl(&fx.path, &["remove-ports", "1", "999", "2"])?;
    assert_eq!(removed.status.code(), Some(1));
    assert_eq!(stdout(&removed), "1\n");
    assert_eq!(stderr(&removed), "error: unknown id: 999\n");
    let kept = ctl(&fx.path, &["list-ports", "--json"])?;
    assert_eq!(
        stdout(&kept),
        "{\"id\":2,\"spec\":{\"proto\":\"tcp6\",\"parentIP\":\"::1\",\"parentPort\":18083,\"childPort\":83,\"childIP\":\"::1\"}}\n"
    );

    let info = ctl(&fx.path, &["info", "--json"])?;
    assert!(info.status.success(), "{}", stderr(&info));
    let want = format!(
        "{{\n    \"apiVersion\": \"1.1.1\",\n    \"version\": \"0.1.0\",\n    \"stateDir\": \"{}\",\n    \
         \"childPID\": 4242,\n    \"networkDriver\": {{\n        \"driver\": \"slirp4netns\",\n        \
         \"dns\": [\n            \"10.0.2.3\"\n        ],\n        \"childIP\": \"10.0.2.100\"\n    }},\n    \
         \"portDriver\": {{\n        \"driver\": \"table\",\n        \"protos\": [\n            \"tcp\",\n            \
         \"tcp4\",\n            \"tcp6\",\n            \"udp\",\n            \"udp4\",\n            \"udp6\"\n        \
         ]\n    }}\n}}\n",
        fx.dir.path().display()
    );
    assert_eq!(stdout(&info), want);

    let text = ctl(&fx.path, &["info"])?;
    assert_eq!(
        stdout(&text),
        format!(
            "- REST API version: 1.1.1\n- Implementation version: 0.1.0\n- State Directory: {}\n\
             - Child PID: 4242\n- Network Driver: slirp4netns\n  - DNS: [10.0.2.3]\n  - IP: 10.0.2.100\n\
             - Port Driver: table\n  - Supported protocols: [tcp tcp4 tcp6 udp udp4 udp6]\n",
            fx.dir.path().display()
        )
    );
    Ok(())
}

#[test]
#[ignore = "needs upstream rootlessctl 1.1.0 at /usr/bin/rootlessctl; run with --ignored"]
fn upstream_rootlessctl_without_port_driver() -> TestResult {
    let fx = common::start(None)?;
    let out = ctl(&fx.path, &["list-ports"])?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: no PortDriver is available\n");
    Ok(())
}
