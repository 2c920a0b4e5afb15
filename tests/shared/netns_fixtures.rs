//! Test fixtures: a user+net namespace, servers inside it, and clients on the host.
//!
//! Every process is started by a fixture whose `Drop` kills it by pid and reaps it, so a failing
//! test leaves nothing behind. Nothing here sleeps for a fixed time: each start-up waits for the
//! process to say it is ready.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// How long a client waits for an answer before the test fails (a hang guard, not a timing
/// assertion: every answer normally arrives in milliseconds).
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP server for the namespace: per connection, `peer=<client ip>\n`, then echo to EOF,
/// then close. With a third argument `rev`: `greeting\n`, shut down writing, then print what
/// the client sends afterwards as `late=<data>` on stdout.
pub const TCP_SERVER: &str = r#"
import socket, sys, threading
port, mode = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "echo")
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(64); print("ready", flush=True)
def echo(c, a):
    c.sendall(("peer=%s\n" % a[0]).encode())
    while (d := c.recv(65536)): c.sendall(d)
    c.close()
def rev(c, a):
    c.sendall(b"greeting\n"); c.shutdown(socket.SHUT_WR); buf = b""
    while (d := c.recv(65536)): buf += d
    print("late=%s" % buf.decode(), flush=True); c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=rev if mode == "rev" else echo, args=(c, a), daemon=True).start()
"#;

/// A UDP server for the namespace: answers `echo:` + payload to the sender.
pub const UDP_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535); s.sendto(b"echo:" + d, a)
"#;

/// A started process, killed (by pid) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Proc {
    /// The next line of the process's stdout ("" at EOF).
    pub fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        self.stdout
            .as_mut()
            .ok_or_else(|| io::Error::other("stdout not piped"))?
            .read_line(&mut line)?;
        Ok(line)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user+net namespace held open by `sleep`, with loopback up.
#[derive(Debug)]
pub struct Netns {
    holder: Proc,
}

impl Netns {
    pub fn new() -> io::Result<Netns> {
        let mut cmd = Command::new("unshare");
        cmd.args(["--user", "--map-root-user", "--net", "sh", "-c"])
            .arg("ip link set lo up && echo ready && exec sleep 100000");
        Ok(Netns {
            holder: spawn_ready(&mut cmd)?,
        })
    }

    pub fn pid(&self) -> i32 {
        self.holder.pid()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid().to_string(),
            "-U",
            "-n",
            "--preserve-credentials",
            program,
        ]);
        cmd
    }

    /// Runs a shell script inside the namespace and fails on a non-zero exit.
    pub fn sh(&self, script: &str) -> io::Result<String> {
        let out = self.command("sh").args(["-c", script]).output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(io::Error::other(format!("{script:?} failed: {err}")));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a Python server from `script` inside the namespace and waits until it listens.
    pub fn python(&self, script: &str, args: &[&str]) -> io::Result<Proc> {
        spawn_ready(self.command("python3").arg("-c").arg(script).args(args))
    }

    /// Creates and configures tap0 as RootlessKit's child does for slirp4netns.
    pub fn add_tap(&self) -> io::Result<()> {
        self.sh(
            "ip tuntap add name tap0 mode tap && ip link set tap0 up && \
             ip link set dev tap0 mtu 65520 && ip addr add 10.0.2.100/24 dev tap0 && \
             ip route add default via 10.0.2.2 dev tap0",
        )
        .map(drop)
    }
}

/// Spawns `cmd` and waits for it to print `ready`.
pub fn spawn_ready(cmd: &mut Command) -> io::Result<Proc> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().map(BufReader::new);
    let mut proc = Proc { child, stdout };
    let line = proc.read_line()?;
    if line.trim() != "ready" {
        return Err(io::Error::other(format!(
            "{cmd:?} did not get ready: {line:?}"
        )));
    }
    Ok(proc)
}

/// A port that was free on 127.0.0.1 for both TCP and UDP a moment ago.
pub fn free_port() -> u16 {
    free_port_but(&[])
}

/// A free port (TCP and UDP) other than those in `taken`: two separate picks can return the
/// same port.
pub fn free_port_but(taken: &[u16]) -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = tcp.local_addr().expect("local addr").port();
        if !taken.contains(&port) && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Connects to `addr`, reads the first line, sends `payload`, half-closes and reads to EOF.
/// Returns the first line and everything after it.
pub fn tcp_exchange(addr: SocketAddr, payload: &[u8]) -> io::Result<(String, Vec<u8>)> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;

    let mut writer = stream;
    writer.write_all(payload)?;
    writer.shutdown(Shutdown::Write)?;

    let mut rest = Vec::new();
    reader.read_to_end(&mut rest)?;
    Ok((first.trim_end().to_owned(), rest))
}

/// Sends `payload` to `addr` from a new socket and returns the reply.
pub fn udp_exchange(addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.send_to(payload, addr)?;
    let mut buf = vec![0; 65536];
    let (n, _) = sock.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// `n` bytes of a recognisable, non-repeating pattern.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}
