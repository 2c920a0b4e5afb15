//! Who may talk to the server: only the socket's owner and root, checked with `SO_PEERCRED`
//! even when the file mode would let others connect; and what shutdown does to connections.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{raw, start_table};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Guard against a hang; never an assertion on time.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The unprivileged account the refused client runs as.
const NOBODY: u32 = 65534;

/// Sends `GET /v1/info` on `socket` as uid/gid `id` and returns everything read back.
///
/// A refused client may find the socket closed before it has sent its request (the gate
/// answers at once): the write's `EPIPE` is ignored and the answer read anyway.
fn get_info_as(id: u32, socket: &std::path::Path) -> std::io::Result<String> {
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  try:\n    s.sendall(b'GET /v1/info HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
                  except BrokenPipeError:\n    pass\n\
                  out = b''\n\
                  while True:\n    d = s.recv(4096)\n    if not d: break\n    out += d\n\
                  sys.stdout.write(out.decode())\n";
    let output = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(socket)
        .uid(id)
        .gid(id)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "client failed: {stderr}");
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn other_users_get_403_even_through_a_loosened_socket() -> TestResult {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching to another uid needs root (the e2e suite covers users)");
        return Ok(());
    }
    let fx = start_table()?;
    // Loosen what normally keeps others out, so that only the peer check is left.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    std::fs::set_permissions(&fx.path, std::fs::Permissions::from_mode(0o666))?;

    let answer = get_info_as(NOBODY, &fx.path)?;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("permission denied: uid 65534 is not the owner (uid 0)"));
    assert!(!answer.contains("apiVersion"), "{answer}");

    let answer = get_info_as(0, &fx.path)?;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let owner = raw(&fx.path, "GET", "/v1/info", b"")?;
    assert_eq!(owner.status, 200);
    Ok(())
}

#[test]
fn the_listener_behind_the_gate_has_no_name() -> TestResult {
    let fx = start_table()?;
    let names: Vec<_> = std::fs::read_dir(fx.dir.path())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, ["api.sock"]);
    assert_eq!(raw(&fx.path, "GET", "/v1/ports", b"")?.text(), "null");
    Ok(())
}

#[test]
fn shutdown_closes_kept_alive_connections() -> TestResult {
    let fx = start_table()?;
    let mut client = UnixStream::connect(&fx.path)?;
    client.set_read_timeout(Some(HANG_GUARD))?;
    client.write_all(b"GET /v1/ports HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut first = [0u8; 12];
    client.read_exact(&mut first)?;
    assert_eq!(&first, b"HTTP/1.1 200");

    fx.server.shutdown();
    let mut rest = Vec::new();
    // End of file (not a timeout) once the rest of the first answer is read.
    client.read_to_end(&mut rest)?;
    assert!(String::from_utf8_lossy(&rest).ends_with("null"));
    Ok(())
}
