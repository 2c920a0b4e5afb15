//! One socat listener process and its process group: start, confirm it listens, stop.
//!
//! socat runs in a process group of its own (its pid is the group id). The processes it forks
//! for each connection, which `exec` nsenter and then the inner socat, stay in that group, so
//! one `killpg` ends the listener and every connection of the port.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rkport_core::{PortError, Transport};

use crate::Plan;

/// How long socat may take to bind, and its group to die after SIGKILL.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

/// How much of socat's stderr is kept for error messages.
const STDERR_KEEP: usize = 4096;

/// A running socat listener.
#[derive(Debug)]
pub(crate) struct Listener {
    child: Child,
}

impl Listener {
    /// Spawns `socat argv` and returns once it listens on the plan's parent port.
    ///
    /// # Errors
    /// Spawn failure, or socat exiting first (its stderr in the message), or not listening
    /// within [`START_TIMEOUT`]; nothing is left running.
    pub(crate) fn start(socat: &Path, argv: &[String], plan: &Plan) -> Result<Self, PortError> {
        let mut child = Command::new(socat)
            .args(argv)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| PortError::io(format!("failed to run {}", socat.display()), e))?;
        let (stderr, reader) = drain_stderr(child.stderr.take(), child.id());
        let listener = Listener { child };

        let what = format!("{}:{}/{}", plan.parent, plan.parent_port, plan.transport);
        match listener.wait_listening(plan) {
            Ok(()) => Ok(listener),
            Err(None) => {
                listener.stop();
                Err(PortError::Backend(format!(
                    "socat did not listen on {what} in time"
                )))
            }
            Err(Some(status)) => {
                listener.stop();
                // The group is gone, so the reader has seen EOF and kept all socat said.
                if let Some(reader) = reader {
                    let _ = reader.join();
                }
                let text = stderr
                    .lock()
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default();
                Err(PortError::Backend(format!(
                    "socat failed to listen on {what} ({status}): {text}"
                )))
            }
        }
    }

    /// Waits until socat owns a socket bound to the port: `Err(Some(status))` if it exited,
    /// `Err(None)` on timeout.
    fn wait_listening(&self, plan: &Plan) -> Result<(), Option<String>> {
        let pid = self.child.id();
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = exit_status(pid) {
                return Err(Some(status));
            }
            if bound(pid, plan.transport, plan.parent_port) {
                return Ok(());
            }
            thread::sleep(POLL);
        }
        Err(None)
    }

    /// Kills socat's whole process group, reaps socat and waits until no live member is left,
    /// so the port can be bound again when this returns.
    pub(crate) fn stop(mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        if let Err(errno) = killpg(pgid, Signal::SIGKILL) {
            tracing::debug!(%pgid, %errno, "killpg socat");
        }
        let _ = self.child.wait();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while group_alive(pgid.as_raw()) {
            if Instant::now() >= deadline {
                tracing::debug!(%pgid, "socat's process group outlived the stop timeout");
                return;
            }
            thread::sleep(POLL);
        }
    }
}

/// Logs socat's stderr at debug level and keeps its tail for error messages. The thread ends
/// when the last process of the group closes stderr.
fn drain_stderr(
    stderr: Option<ChildStderr>,
    pid: u32,
) -> (Arc<Mutex<String>>, Option<thread::JoinHandle<()>>) {
    let kept = Arc::new(Mutex::new(String::new()));
    let Some(stderr) = stderr else {
        return (kept, None);
    };
    let sink = Arc::clone(&kept);
    let reader = thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            tracing::debug!(pid, "socat: {line}");
            let mut kept = sink.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() + line.len() < STDERR_KEEP {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
    });
    (kept, Some(reader))
}

/// socat's exit status if it has exited (it is reaped only by `stop`, so it is a zombie here).
fn exit_status(pid: u32) -> Option<String> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("exit status {code}")),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
        Ok(_) => None,
        Err(errno) => Some(format!("wait: {errno}")),
    }
}

/// Whether process `pid` holds a socket bound to `port` (listening, for TCP), from
/// `/proc/PID/fd` and `/proc/PID/net/{tcp,udp}`.
fn bound(pid: u32, transport: Transport, port: u16) -> bool {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return false;
    }
    let table = match transport {
        Transport::Udp => "udp",
        _ => "tcp",
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return false;
    };
    text.lines().skip(1).any(|row| {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let port_ok = cols
            .get(1)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            == Some(port);
        let listening = transport == Transport::Udp || cols.get(3) == Some(&"0A");
        let mine = cols.get(9).is_some_and(|i| inodes.contains(*i));
        port_ok && listening && mine
    })
}

/// The inode numbers of the sockets process `pid` has open.
fn socket_inodes(pid: u32) -> HashSet<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect()
}

/// Whether any process of group `pgid` is still alive (zombies do not count: their sockets
/// are closed already, and their new parent reaps them).
fn group_alive(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => return false,
        Err(_) => return true,
        Ok(()) => {}
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .any(|stat| live_member(&stat, pgid))
}

/// Parses `/proc/PID/stat`: state is the first field after the `)` closing the command name,
/// the process group the third.
fn live_member(stat: &str, pgid: i32) -> bool {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("Z");
    fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && state != "Z" && state != "X"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_finds_group_and_skips_zombies() {
        let live = "123 (socat x) S 1 4242 4242 0 -1 4194560 113 0 0 0";
        assert!(live_member(live, 4242));
        assert!(!live_member(live, 4243));
        assert!(!live_member("124 (socat) Z 1 4242 4242 0", 4242));
    }

    #[test]
    fn own_listening_socket_is_found() -> std::io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        assert!(bound(std::process::id(), Transport::Tcp, port));
        drop(l);
        assert!(!bound(std::process::id(), Transport::Tcp, port));
        Ok(())
    }
}
