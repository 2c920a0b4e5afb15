//! The deprecated `socat` port driver: one `socat` listener per published port.
//!
//! RootlessKit shipped this driver from v0.2.0 to v0.13.2. For each port, a `socat` listens on
//! the host; each connection (or UDP peer) forks it, and the fork becomes
//! `nsenter -U -n --preserve-credentials -t <childPID> socat ...`, which enters the namespace's
//! user and network namespaces and connects to the target there. Servers inside therefore see
//! every client as the address socat connects from (127.0.0.1 for a loopback target).
//!
//! Differences from upstream: [`SocatDriver::add_port`] returns only once socat listens, and
//! reports a bind failure with socat's own message instead of retrying in the background;
//! unsupported protos and IPv6 addresses are refused up front; removing a port kills its
//! listener *and* every per-connection process, and waits, so the port is free again; TCP
//! half-close is propagated both ways (`-t`, `shut-down`).
//!
//! What it does not do: IPv6 (socat listens with `TCP4-LISTEN`/`UDP4-LISTEN`), SCTP, source
//! addresses. It needs `socat` and `nsenter` in PATH. [`DEPRECATION`] is the warning the CLI
//! shows; this crate logs at debug level only.
//!
//! ```no_run
//! use rkport_core::PortDriver;
//! use rkport_socat::SocatDriver;
//!
//! let driver = SocatDriver::new(12345)?; // the namespace's child PID
//! let port = driver.add_port(&"127.0.0.1:8080:80/tcp".parse()?)?;
//! driver.remove_port(port.id)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod process;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rkport_core::{
    DriverInfo, Family, PortDriver, PortError, PortId, PortSpec, PortStatus, PortTable, Proto,
    Transport,
};

use crate::process::Listener;

/// The driver name, as given to `--port-driver` and reported by `info`.
pub const NAME: &str = "socat";

/// The warning the CLI logs once when this driver is selected.
pub const DEPRECATION: &str = "the \"socat\" port driver is deprecated: it runs one socat per \
    port and two more processes per connection, forwards IPv4 only, shows every client as the \
    namespace's loopback address and is much slower than the builtin driver; use \
    --port-driver=builtin";

/// How long socat may wait, after one direction of a TCP connection reached EOF, for the other
/// one (socat's `-t`). socat's default of 0.5 s would cut off a server that answers a
/// half-closed request slowly; a day keeps half-open connections working like the builtin
/// driver's while still ending abandoned ones.
const HALF_CLOSE_TIMEOUT_SECS: u32 = 86_400;

/// socat's transfer buffer (`-b`, default 8192): large enough for any UDP datagram, which
/// socat would otherwise truncate, and for fewer system calls on TCP.
const BUFFER_SIZE: u32 = 65_536;

/// How long a UDP flow may stay idle before its per-peer processes exit (socat's `-T`);
/// the builtin driver's session timeout.
const UDP_IDLE_TIMEOUT_SECS: u32 = 90;

/// Publishes ports with one `socat` per port.
///
/// Thread-safe; each operation holds the driver's lock while it starts or stops socat (bounded
/// by a few seconds). Dropping the driver stops every socat it started.
#[derive(Debug)]
pub struct SocatDriver {
    child_pid: i32,
    socat: PathBuf,
    nsenter: PathBuf,
    ports: Mutex<PortTable<Listener>>,
}

/// How one port is forwarded, resolved from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) transport: Transport,
    pub(crate) parent: Ipv4Addr,
    pub(crate) parent_port: u16,
    pub(crate) child: Ipv4Addr,
    pub(crate) child_port: u16,
}

impl SocatDriver {
    /// A driver forwarding into the namespaces of `child_pid`.
    ///
    /// Checks that `socat` and `nsenter` are in PATH and remembers their paths.
    ///
    /// # Errors
    /// [`PortError::Backend`] naming the missing binary, or a child PID that is not set.
    pub fn new(child_pid: i32) -> Result<Self, PortError> {
        if child_pid <= 0 {
            return Err(PortError::Backend(format!(
                "port driver socat: child PID not set (got {child_pid})"
            )));
        }
        Ok(SocatDriver {
            child_pid,
            socat: require("socat")?,
            nsenter: require("nsenter")?,
            ports: Mutex::new(PortTable::default()),
        })
    }

    /// Stops every socat this driver started, with their per-connection processes, and waits
    /// for them. Idempotent; `Drop` calls it.
    pub fn shutdown(&self) {
        for (status, listener) in self.ports().drain() {
            listener.stop();
            tracing::debug!(id = status.id, "socat stopped");
        }
    }

    fn ports(&self) -> MutexGuard<'_, PortTable<Listener>> {
        // Every update is a single insert or remove, so a poisoned table is still consistent.
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socat argv for `plan`.
    fn argv(&self, plan: &Plan) -> Vec<String> {
        let (listen, connect, timeout) = match plan.transport {
            Transport::Udp => ("UDP4-LISTEN", "UDP4", format!("-T{UDP_IDLE_TIMEOUT_SECS}")),
            _ => (
                "TCP4-LISTEN",
                "TCP4",
                format!("-t{HALF_CLOSE_TIMEOUT_SECS}"),
            ),
        };
        // The inner socat talks to the client through fd 0 (socat's nofork EXEC hands it the
        // accepted socket); `shut-down` makes it shutdown(2) that socket at EOF from the server
        // instead of closing one of its two descriptors, so the client sees the half-close.
        let inner = format!(
            "{nsenter} -U -n --preserve-credentials -t {pid} {socat} -b{BUFFER_SIZE} {timeout} STDIN,shut-down \
             {connect}:{ip}:{port}",
            nsenter = path_arg(&self.nsenter),
            pid = self.child_pid,
            socat = path_arg(&self.socat),
            ip = plan.child,
            port = plan.child_port,
        );
        vec![
            format!("-b{BUFFER_SIZE}"),
            timeout,
            format!(
                "{listen}:{},bind={},reuseaddr,fork",
                plan.parent_port, plan.parent
            ),
            format!("EXEC:\"{inner}\",nofork"),
        ]
    }
}

impl Drop for SocatDriver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl PortDriver for SocatDriver {
    fn info(&self) -> Result<DriverInfo, PortError> {
        Ok(DriverInfo {
            driver: NAME.to_owned(),
            protos: vec![Proto::Tcp, Proto::Tcp4, Proto::Udp, Proto::Udp4],
            disallow_loopback_child_ip: false,
        })
    }

    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        let mut table = self.ports();
        table.check(spec)?;
        let plan = plan(spec)?;
        check_privileged(plan.parent_port)?;

        let argv = self.argv(&plan);
        let listener = Listener::start(&self.socat, &argv, &plan)?;
        let status = table.insert(*spec, listener);
        tracing::debug!(id = status.id, %spec, ?argv, "socat listening");
        Ok(status)
    }

    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        Ok(self.ports().list())
    }

    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        let (status, listener) = self.ports().remove(id)?;
        listener.stop();
        tracing::debug!(id = status.id, "socat stopped");
        Ok(())
    }
}

/// Resolves `spec` to what socat can do, or says why it cannot.
fn plan(spec: &PortSpec) -> Result<Plan, PortError> {
    if spec.proto.family() == Some(Family::V6) {
        return Err(unsupported(format!("IPv6 (proto {})", spec.proto)));
    }
    let transport = spec.proto.transport();
    if transport == Transport::Sctp {
        return Err(PortError::UnsupportedProto {
            proto: spec.proto,
            driver: NAME.into(),
        });
    }
    Ok(Plan {
        transport,
        parent: ipv4(spec.parent_ip, Ipv4Addr::UNSPECIFIED, "parent IP")?,
        parent_port: spec.parent_port,
        child: ipv4(spec.child_ip, Ipv4Addr::LOCALHOST, "child IP")?,
        child_port: spec.child_port,
    })
}

/// The IPv4 address of a spec field (`::ffff:a.b.c.d` counts), `default` when empty.
fn ipv4(ip: Option<IpAddr>, default: Ipv4Addr, field: &str) -> Result<Ipv4Addr, PortError> {
    match ip {
        None => Ok(default),
        Some(IpAddr::V4(ip)) => Ok(ip),
        Some(IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .ok_or_else(|| unsupported(format!("IPv6 ({field} {v6}; socat forwards IPv4 only)"))),
    }
}

fn unsupported(what: String) -> PortError {
    PortError::Unsupported {
        driver: NAME.into(),
        what,
    }
}

/// Where `name` is in PATH, or an error naming it.
fn require(name: &str) -> Result<PathBuf, PortError> {
    find_in_path(name).ok_or_else(|| {
        PortError::Backend(format!(
            "port driver socat needs `{name}`, which is not in PATH ({})",
            std::env::var("PATH").unwrap_or_default()
        ))
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A path as a word of socat's EXEC command line, which splits on spaces and knows no quoting
/// inside the command: a path it cannot hold is replaced by its bare name, found in PATH.
fn path_arg(path: &Path) -> String {
    let text = path.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+".contains(c);
    if text.chars().all(plain) {
        return text.into_owned();
    }
    path.file_name()
        .map_or(text.clone(), |n| n.to_string_lossy())
        .into_owned()
}

/// Refuses a host port an unprivileged socat cannot bind, with the fix in the message.
fn check_privileged(port: u16) -> Result<(), PortError> {
    let euid = nix::unistd::geteuid().as_raw();
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    match start {
        Some(start) if euid != 0 && u32::from(port) < start => Err(PortError::PrivilegedPort {
            port,
            start,
            detail: format!("socat, running as uid {euid}, cannot bind port {port}"),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver() -> SocatDriver {
        SocatDriver {
            child_pid: 4242,
            socat: "/usr/bin/socat".into(),
            nsenter: "/usr/bin/nsenter".into(),
            ports: Mutex::default(),
        }
    }

    fn plan_of(spec: &str) -> Result<Plan, PortError> {
        plan(&spec.parse()?)
    }

    #[test]
    fn tcp_argv_propagates_half_close() -> Result<(), PortError> {
        let argv = driver().argv(&plan_of("127.0.0.1:8080:80/tcp")?);
        assert_eq!(
            argv,
            [
                "-b65536",
                "-t86400",
                "TCP4-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork",
                "EXEC:\"/usr/bin/nsenter -U -n --preserve-credentials -t 4242 /usr/bin/socat \
                 -b65536 -t86400 STDIN,shut-down TCP4:127.0.0.1:80\",nofork",
            ]
        );
        Ok(())
    }

    #[test]
    fn udp_argv_expires_idle_peers() -> Result<(), PortError> {
        let argv = driver().argv(&plan_of(":5353:10.0.2.100:53/udp4")?);
        assert_eq!(argv[1], "-T90");
        assert_eq!(argv[2], "UDP4-LISTEN:5353,bind=0.0.0.0,reuseaddr,fork");
        assert!(
            argv[3].ends_with("UDP4:10.0.2.100:53\",nofork"),
            "{}",
            argv[3]
        );
        Ok(())
    }

    #[test]
    fn unsupported_specs_are_refused_with_the_reason() {
        let table = [
            (
                "[::]:8080:80/tcp6",
                "port driver socat does not support IPv6 (proto tcp6)",
            ),
            (
                "[::1]:8080:80/tcp",
                "port driver socat does not support IPv6 (parent IP ::1; socat forwards IPv4 only)",
            ),
            (
                "127.0.0.1:8080:[::1]:80/udp",
                "port driver socat does not support IPv6 (child IP ::1; socat forwards IPv4 only)",
            ),
            (
                "127.0.0.1:8080:80/sctp",
                "protocol sctp is not supported by port driver socat",
            ),
        ];
        for (spec, want) in table {
            assert_eq!(plan_of(spec).unwrap_err().to_string(), want, "{spec}");
        }
    }

    #[test]
    fn mapped_ipv6_is_ipv4_and_defaults_apply() -> Result<(), PortError> {
        let plan = plan_of("[::ffff:127.0.0.2]:8080:80/tcp")?;
        assert_eq!(
            (plan.parent, plan.child),
            (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::LOCALHOST)
        );
        Ok(())
    }

    #[test]
    fn info_lists_ipv4_protos() -> Result<(), PortError> {
        let info = driver().info()?;
        assert_eq!(info.driver, "socat");
        assert_eq!(
            info.protos,
            [Proto::Tcp, Proto::Tcp4, Proto::Udp, Proto::Udp4]
        );
        assert!(!info.disallow_loopback_child_ip);
        Ok(())
    }

    #[test]
    fn unknown_id_and_unset_pid() {
        assert!(matches!(
            driver().remove_port(3),
            Err(PortError::UnknownId(3))
        ));
        let err = SocatDriver::new(0).unwrap_err().to_string();
        assert_eq!(err, "port driver socat: child PID not set (got 0)");
    }

    #[test]
    fn odd_paths_fall_back_to_the_bare_name() {
        assert_eq!(path_arg(Path::new("/usr/bin/socat")), "/usr/bin/socat");
        assert_eq!(path_arg(Path::new("/opt/my tools/socat")), "socat");
    }
}
