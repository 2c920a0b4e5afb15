//! Other users: `api.sock` answers only its owner (and root).
//!
//! The modes (state dir 0700, `api.sock` 0600) are checked by tests/launcher.rs
//! (`state_dir_is_private_and_environment_is_set`). Here another uid first meets those modes,
//! then, with the modes loosened on purpose, the peer-credential check behind them.
//!
//! The other uid: as root, `nobody` via setpriv; as an ordinary user, uid 1 of a second
//! rootlesskit's user namespace (one of the user's subordinate uids on the host), via setpriv
//! inside it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use rkport_e2e::{api_request, bin, describe, Kit};

/// Connects to `argv[1]`, sends `GET /v1/info`, prints what comes back or the error.
const CLIENT: &str = "import socket, sys\n\
s = socket.socket(socket.AF_UNIX)\n\
try:\n    s.connect(sys.argv[1])\n\
except OSError as e:\n    print('connect failed:', e.strerror); sys.exit(0)\n\
try:\n    s.sendall(b'GET /v1/info HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
except OSError:\n    pass\n\
out = b''\n\
while True:\n    d = s.recv(4096)\n    if not d: break\n    out += d\n\
print(out.decode())\n";

const SETPRIV_TO_1: [&str; 4] = ["setpriv", "--reuid=1", "--regid=1", "--clear-groups"];
const SETPRIV_TO_NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// Runs the client against `socket` as a uid other than ours; its output.
fn as_another_user(socket: &Path, scratch: &Path) -> String {
    let mut cmd;
    if nix::unistd::geteuid().is_root() {
        cmd = Command::new(SETPRIV_TO_NOBODY[0]);
        cmd.args(&SETPRIV_TO_NOBODY[1..]);
    } else {
        cmd = Command::new(bin("rootlesskit"));
        cmd.arg(format!("--state-dir={}", scratch.display()))
            .arg("--net=host")
            .args(SETPRIV_TO_1);
    }
    let output = cmd
        .args(["/usr/bin/python3", "-c", CLIENT])
        .arg(socket)
        .output()
        .expect("run the client");
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn api_socket_answers_only_its_owner() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("s");
    let scratch = tmp.path().join("other");
    let mut kit = Kit::spawn(
        &dir,
        ["--net=none", "--port-driver=builtin", "sleep", "1000"],
    );
    kit.wait_ready();
    let socket = kit.api_socket();
    let chmod = |path: &Path, mode| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    };

    // The modes keep others out.
    chmod(tmp.path(), 0o711);
    let answer = as_another_user(&socket, &scratch);
    assert!(
        answer.contains("connect failed: Permission denied"),
        "{answer}"
    );

    // With the modes loosened the gate still does.
    chmod(&dir, 0o711);
    chmod(&socket, 0o666);
    let answer = as_another_user(&socket, &scratch);
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden"), "{answer}");
    assert!(answer.contains("is not the owner"), "{answer}");
    assert!(!answer.contains("apiVersion"), "{answer}");

    let (status, body) = api_request(&socket, "GET", "/v1/info", None).expect("owner's GET");
    assert_eq!(status, 200, "{body}");
}
