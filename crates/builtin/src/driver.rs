//! [`BuiltinDriver`]: the parent side, implementing [`PortDriver`].
//!
//! Binds listeners synchronously on the API caller's thread (so bind errors reach it), keeps
//! the port table, and hands TCP listeners to every worker and UDP sockets to the control loop;
//! removal waits for the control loop and every worker to close what belonged to the port.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rkport_core::spec::ListenAddr;
use rkport_core::{
    DriverInfo, PortDriver, PortError, PortId, PortSpec, PortStatus, PortTable, Transport,
};
use socket2::{Domain, Socket, Type};

use crate::control::{self, ControlCmd, ControlTx};
use crate::wire::{Kind, Request};
use crate::worker::{self, WorkerHandle};
use crate::{protos, sys, NAME};

/// UDP sessions end after this long without traffic, as upstream's.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(90);

/// The builtin port driver's parent side.
///
/// Owns one control thread (the first helper channel, UDP) and one data-path worker per CPU
/// (at least two), each with a helper channel and a descriptor table of its own.
/// All methods take `&self` and may be called from any thread.
#[derive(Debug)]
pub struct BuiltinDriver {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    table: PortTable<()>,
    /// `None` once shut down.
    control: Option<ControlTx>,
    workers: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl BuiltinDriver {
    /// Starts the forwarder on `channel`, the parent end of [`channel()`](crate::channel); the
    /// other end must be served by [`helper::serve`](crate::helper::serve) inside the namespace.
    ///
    /// Raises the soft `RLIMIT_NOFILE` of the process to its hard limit.
    ///
    /// # Errors
    /// Creating the event loops or their threads failed.
    pub fn new(channel: OwnedFd) -> io::Result<Self> {
        sys::raise_nofile_limit();
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut state = State {
            table: PortTable::default(),
            control: None,
            workers: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n.clamp(2, 64) {
            // On error `state` drops here, stopping the workers already started.
            let (ours, helpers) = crate::channel()?;
            open_channel(&channel, helpers);
            state.workers.push(worker::spawn(i, ours)?);
        }
        crate::watchdog::watch(state.workers.iter().map(WorkerHandle::progress).collect());
        let (tx, thread) = control::spawn(channel, DEFAULT_UDP_TIMEOUT)?;
        state.control = Some(tx);
        state.threads.push(thread);
        Ok(BuiltinDriver {
            state: Mutex::new(state),
        })
    }

    /// Sets how long a UDP session may stay idle (no datagram either way) before it closes.
    pub fn with_udp_timeout(self, timeout: Duration) -> Self {
        if let Some(control) = &self.lock().control {
            control.send(ControlCmd::SetUdpTimeout(timeout));
        }
        self
    }

    /// Closes every listener, connection and session, ends the threads and closes the helper
    /// channel (the helper's [`serve`](crate::helper::serve) then returns). Idempotent; later
    /// `add_port` calls fail.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.shutdown();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the table consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn shutdown(&mut self) {
        if let Some(control) = self.control.take() {
            control.send(ControlCmd::Stop);
        }
        for mut worker in self.workers.drain(..) {
            worker.stop();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.table.drain();
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl PortDriver for BuiltinDriver {
    fn info(&self) -> Result<DriverInfo, PortError> {
        Ok(DriverInfo {
            driver: NAME.to_owned(),
            protos: protos(),
            disallow_loopback_child_ip: false,
        })
    }

    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        if spec.proto.transport() == Transport::Sctp {
            return Err(PortError::UnsupportedProto {
                proto: spec.proto,
                driver: NAME.to_owned(),
            });
        }
        let mut state = self.lock();
        let control = state.control.clone().ok_or_else(stopped)?;
        state.table.check(spec)?;

        let id = state.table.next_id();
        let listen = spec.listen_addr()?;
        let target = target_addr(spec);
        let cmd = match spec.proto.transport() {
            Transport::Udp => ControlCmd::AddUdp {
                id,
                socket: mio::net::UdpSocket::from_std(bind(spec, listen)?.into()),
                target,
            },
            _ => {
                let listener = bind(spec, listen)?;
                // Each worker gets a copy; this one closes when the call returns.
                for worker in &state.workers {
                    if !worker.add_tcp(id, listener.as_fd(), target) {
                        tracing::debug!(id, "a worker has stopped, it will not serve the port");
                    }
                }
                tracing::debug!(id, %spec, listen = %listen.addr, %target, "port added");
                return Ok(state.table.insert(*spec, ()));
            }
        };
        if !control.send(cmd) {
            return Err(stopped());
        }
        tracing::debug!(id, %spec, listen = %listen.addr, %target, "port added");
        Ok(state.table.insert(*spec, ()))
    }

    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        Ok(self.lock().table.list())
    }

    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        let mut state = self.lock();
        state.table.remove(id)?;
        let Some(control) = state.control.clone() else {
            return Ok(());
        };

        // The control loop first: once it has answered, no worker gets a new connection of
        // this port, and each worker's queue holds any it got before its own Remove.
        let (done, wait) = sync_channel(1);
        if control.send(ControlCmd::Remove { id, done }) {
            let _ = wait.recv();
        }
        for worker in &state.workers {
            worker.remove(id);
        }
        tracing::debug!(id, "port removed");
        Ok(())
    }
}

/// Hands `helper_end` of a further channel to the helper through `channel`; if that fails,
/// the worker on the other end sees its channel closed and resets its clients.
fn open_channel(channel: &OwnedFd, helper_end: OwnedFd) {
    let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let req = Request {
        id: 0,
        kind: Kind::Channel,
        target: unspecified,
    };
    let sent = sys::send_with_fd(channel.as_fd(), &req.encode(), Some(helper_end.as_fd()));
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot open a further helper channel");
    }
}

fn stopped() -> PortError {
    PortError::Backend(format!("port driver {NAME} has been shut down"))
}

/// Where the helper connects inside: the child IP if given; else the parent IP when it is a
/// loopback address (so `127.0.0.2:8080:80/tcp` reaches a server bound to 127.0.0.2 inside,
/// as rootlesskit v2.3.2+ does, nerdctl#3539); else 127.0.0.1.
pub(crate) fn target_addr(spec: &PortSpec) -> SocketAddr {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let ip = spec
        .child_ip
        .map(canonical)
        .or_else(|| spec.parent_ip.map(canonical).filter(IpAddr::is_loopback))
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, spec.child_port)
}

/// Creates the host socket of `spec`, bound (and listening, for TCP), non-blocking.
fn bind(spec: &PortSpec, listen: ListenAddr) -> Result<Socket, PortError> {
    let tcp = spec.proto.transport() == Transport::Tcp;
    let ty = if tcp { Type::STREAM } else { Type::DGRAM };
    let context = || format!("failed to listen on {}/{}", listen.addr, spec.proto);
    let io_err = |e| PortError::io(context(), e);

    let sock =
        Socket::new(Domain::for_address(listen.addr), ty.nonblocking(), None).map_err(io_err)?;
    if listen.addr.is_ipv6() {
        sock.set_only_v6(listen.v6only).map_err(io_err)?;
    }
    if tcp {
        // Lets a port be re-added while connections of its previous listener linger in
        // TIME_WAIT (rootlesskit#262).
        sock.set_reuse_address(true).map_err(io_err)?;
        // Accepted sockets inherit TCP_NODELAY from the listener, saving a call per
        // connection; without it small writes wait for an ack.
        if let Err(e) = sock.set_tcp_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on the listener");
        }
    } else {
        crate::sys::grow_socket_buffers(&sock);
    }
    if let Err(e) = sock.bind(&listen.addr.into()) {
        return Err(bind_error(listen.addr.port(), context(), e));
    }
    if tcp {
        sock.listen(libc::SOMAXCONN).map_err(io_err)?;
    }
    Ok(sock)
}

/// Explains `EACCES` on a port below `net.ipv4.ip_unprivileged_port_start`.
fn bind_error(port: u16, context: String, e: io::Error) -> PortError {
    let start = unprivileged_port_start();
    if e.kind() == io::ErrorKind::PermissionDenied && u32::from(port) < start {
        return PortError::PrivilegedPort {
            port,
            start,
            detail: format!("{context}: {e}"),
        };
    }
    PortError::io(context, e)
}

/// `net.ipv4.ip_unprivileged_port_start`, 1024 (the kernel default) if unreadable.
fn unprivileged_port_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(spec: &str) -> String {
        target_addr(&spec.parse().unwrap()).to_string()
    }

    #[test]
    fn target_follows_child_ip_then_loopback_parent_ip() {
        assert_eq!(target(":8080:80/tcp"), "127.0.0.1:80");
        assert_eq!(target("0.0.0.0:8080:80/tcp"), "127.0.0.1:80");
        assert_eq!(target("[::]:8080:80/tcp6"), "127.0.0.1:80");
        assert_eq!(target("127.0.0.2:8080:80/tcp"), "127.0.0.2:80");
        assert_eq!(target("[::1]:8080:80/tcp"), "[::1]:80");
        assert_eq!(target("[::ffff:127.0.0.3]:8080:80/tcp"), "127.0.0.3:80");
        assert_eq!(target("192.0.2.1:8080:80/tcp"), "127.0.0.1:80");
        assert_eq!(target("127.0.0.2:8080:127.0.0.1:80/tcp"), "127.0.0.1:80");
        assert_eq!(target("0.0.0.0:8080:[::1]:80/tcp4"), "[::1]:80");
        assert_eq!(target("[::]:8080:10.0.2.100:80/udp6"), "10.0.2.100:80");
    }
}
