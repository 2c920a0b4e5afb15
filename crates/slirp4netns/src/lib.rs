//! The `slirp4netns` port driver: ports published by slirp4netns itself.
//!
//! With `--net=slirp4netns --port-driver=slirp4netns`, the process that listens on the host is
//! slirp4netns: [`Slirp4netnsDriver`] asks it, through its API socket ([`api`]), to add and
//! remove host forwards (libslirp's `hostfwd`). Packets then enter the namespace through the tap
//! device, addressed to the namespace's tap address, so servers inside see the real address of
//! non-loopback clients and the gateway (10.0.2.2) for loopback ones. There is no child half.
//!
//! What slirp4netns cannot do is refused here, up front and with the reason, before it is asked:
//! IPv6 (slirp4netns's `add_hostfwd` is IPv4 only), SCTP, a loopback child IP (unreachable
//! through the tap) and, for unprivileged users, host ports below
//! `net.ipv4.ip_unprivileged_port_start` (slirp4netns would only say `slirp_add_hostfwd failed`).
//!
//! # What the launcher provides
//!
//! - slirp4netns started as `slirp4netns --mtu 65520 -r FD --api-socket <state>/.s4nn.sock
//!   [--cidr B/N] PID tap0` (the API socket is bound when the ready fd fires), with the tap
//!   device created and configured inside the namespace (10.0.2.100/24, default route via
//!   10.0.2.2 for the default CIDR);
//! - the socket path and the tap address for [`Slirp4netnsDriver::new`];
//! - for `--disable-host-loopback`: the [`guard`] module explains why passing that flag to
//!   slirp4netns loses UDP replies to loopback clients, and how to enforce it in the
//!   namespace instead. When the launcher does pass the flag it must say so with
//!   [`Slirp4netnsDriver::with_host_loopback_disabled`].
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use rkport_core::PortDriver;
//! use rkport_slirp4netns::Slirp4netnsDriver;
//!
//! let driver = Slirp4netnsDriver::new("/run/user/1000/rk/.s4nn.sock", Ipv4Addr::new(10, 0, 2, 100));
//! let port = driver.add_port(&"127.0.0.1:8080:80/tcp".parse()?)?;
//! driver.remove_port(port.id)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod guard;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use rkport_core::{
    DriverInfo, Family, PortDriver, PortError, PortId, PortSpec, PortStatus, PortTable, Proto,
    Transport,
};

use crate::api::{ApiError, FwdProto, HostFwd};
pub use crate::guard::{apply_host_loopback_guard, host_loopback_guard_commands};

/// The driver name, as given to `--port-driver` and reported by `info`.
pub const NAME: &str = "slirp4netns";

/// What the driver says when slirp4netns runs with `--disable-host-loopback`.
pub const UDP_LOOPBACK_WARNING: &str = "slirp4netns runs with --disable-host-loopback: UDP \
    replies to clients on a host loopback address will not arrive (libslirp drops datagrams \
    to the gateway address, which loopback clients appear as); apply the in-namespace host \
    loopback guard instead of the flag, or use the builtin port driver";

/// Publishes ports through a running slirp4netns's API socket.
///
/// Thread-safe; each operation holds the driver's lock for its whole duration, slirp4netns
/// request included, so concurrent adds cannot both pass the conflict check.
#[derive(Debug)]
pub struct Slirp4netnsDriver {
    api: api::Client,
    child_ip: Ipv4Addr,
    host_loopback_disabled: bool,
    ports: Mutex<PortTable<()>>,
}

impl Slirp4netnsDriver {
    /// `api_socket`: slirp4netns's `--api-socket`; `child_ip`: the namespace's tap address
    /// (10.0.2.100 for the default CIDR), used when a spec has no child IP.
    ///
    /// Does not contact slirp4netns.
    pub fn new(api_socket: impl Into<PathBuf>, child_ip: Ipv4Addr) -> Self {
        Slirp4netnsDriver {
            api: api::Client::new(api_socket),
            child_ip,
            host_loopback_disabled: false,
            ports: Mutex::new(PortTable::default()),
        }
    }

    /// Tells the driver that slirp4netns runs with `--disable-host-loopback`, so UDP replies
    /// to loopback clients are lost; see [`udp_reply_warning`](Self::udp_reply_warning).
    pub fn with_host_loopback_disabled(mut self, disabled: bool) -> Self {
        self.host_loopback_disabled = disabled;
        self
    }

    /// The API client this driver uses.
    pub fn api(&self) -> &api::Client {
        &self.api
    }

    /// The warning to show users (at start-up and when a UDP port is added) when UDP forwarding
    /// is impaired, `None` when it works.
    pub fn udp_reply_warning(&self) -> Option<&'static str> {
        self.host_loopback_disabled.then_some(UDP_LOOPBACK_WARNING)
    }

    fn ports(&self) -> MutexGuard<'_, PortTable<()>> {
        // A panic while holding the lock leaves the table consistent (every update is one
        // insert or remove), so a poisoned lock is still usable.
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps `spec` to the host forward slirp4netns should add, or says why it cannot.
    fn host_fwd(&self, spec: &PortSpec) -> Result<HostFwd, PortError> {
        let proto = fwd_proto(spec.proto)?;
        let host_addr = match spec.parent_ip.map(canonical) {
            None => Ipv4Addr::UNSPECIFIED,
            Some(IpAddr::V4(ip)) => ip,
            Some(IpAddr::V6(ip)) => return Err(ipv6(format!("parent IP {ip}"), spec)),
        };
        let guest_addr = match spec.child_ip.map(canonical) {
            None => self.child_ip,
            Some(IpAddr::V4(ip)) if ip.is_unspecified() => self.child_ip,
            Some(IpAddr::V4(ip)) if ip.is_loopback() => return Err(self.loopback_child(ip)),
            Some(IpAddr::V4(ip)) => ip,
            Some(IpAddr::V6(ip)) => return Err(ipv6(format!("child IP {ip}"), spec)),
        };
        Ok(HostFwd {
            proto,
            host_addr,
            host_port: spec.parent_port,
            guest_addr,
            guest_port: spec.child_port,
        })
    }

    fn loopback_child(&self, ip: Ipv4Addr) -> PortError {
        PortError::Unsupported {
            driver: NAME.into(),
            what: format!(
                "loopback child IP {ip}: slirp4netns delivers through the tap device, so a \
                 loopback address inside the namespace cannot be reached; use the tap address \
                 {} or leave the child IP empty",
                self.child_ip
            ),
        }
    }

    /// Asks slirp4netns for the forward and records it under slirp4netns's id.
    fn publish(
        &self,
        table: &mut PortTable<()>,
        spec: &PortSpec,
        fwd: &HostFwd,
    ) -> Result<PortStatus, PortError> {
        let id = self.api.add_hostfwd(fwd).map_err(|e| add_error(e, fwd))?;
        if table.get(id).is_some() {
            // slirp4netns never reuses ids; a repeat means another client shares the socket.
            let _ = self.api.remove_hostfwd(id);
            return Err(PortError::Backend(format!(
                "slirp4netns: add_hostfwd returned id {id}, which is already in use"
            )));
        }
        tracing::debug!(id, %spec, ?fwd, "slirp4netns host forward added");
        if fwd.proto == FwdProto::Udp && self.host_loopback_disabled {
            tracing::debug!(id, "{UDP_LOOPBACK_WARNING}");
        }
        Ok(table.insert_with_id(id, *spec, ()))
    }
}

impl PortDriver for Slirp4netnsDriver {
    fn info(&self) -> Result<DriverInfo, PortError> {
        Ok(DriverInfo {
            driver: NAME.to_owned(),
            protos: vec![Proto::Tcp, Proto::Tcp4, Proto::Udp, Proto::Udp4],
            disallow_loopback_child_ip: true,
        })
    }

    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        let mut table = self.ports();
        table.check(spec)?;
        let fwd = self.host_fwd(spec)?;
        check_privileged(fwd.host_port, fwd.proto, fwd.host_addr)?;
        self.publish(&mut table, spec, &fwd)
    }

    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        Ok(self.ports().list())
    }

    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        let mut table = self.ports();
        if table.get(id).is_none() {
            return Err(PortError::UnknownId(id));
        }
        match self.api.remove_hostfwd(id) {
            Ok(()) => {}
            // slirp4netns has no such forward (it was restarted, or another client removed
            // it): nothing is listening, so forgetting it is the right outcome.
            Err(ApiError::Refused { desc, .. }) if desc.ends_with("bad arguments.id") => {
                tracing::debug!(id, desc, "slirp4netns did not know the forward");
            }
            Err(e) => return Err(backend(e)),
        }
        table.remove(id)?;
        tracing::debug!(id, "slirp4netns host forward removed");
        Ok(())
    }
}

/// `tcp`/`tcp4` → `tcp`, `udp`/`udp4` → `udp`: slirp4netns knows no family suffix.
fn fwd_proto(proto: Proto) -> Result<FwdProto, PortError> {
    if proto.family() == Some(Family::V6) {
        let what = format!(
            "IPv6 (proto {proto}: slirp4netns forwards IPv4 only; use {}4)",
            proto.transport()
        );
        return Err(PortError::Unsupported {
            driver: NAME.into(),
            what,
        });
    }
    match proto.transport() {
        Transport::Tcp => Ok(FwdProto::Tcp),
        Transport::Udp => Ok(FwdProto::Udp),
        Transport::Sctp => Err(PortError::UnsupportedProto {
            proto,
            driver: NAME.into(),
        }),
    }
}

fn ipv6(what: String, spec: &PortSpec) -> PortError {
    let hint = if spec.parent_ip.is_some_and(|ip| ip.is_unspecified()) {
        "use 0.0.0.0 or leave the parent IP empty"
    } else {
        "use an IPv4 address"
    };
    PortError::Unsupported {
        driver: NAME.into(),
        what: format!("IPv6 ({what}: slirp4netns forwards IPv4 only; {hint})"),
    }
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Turns a refused `add_hostfwd` into a message that says what probably went wrong.
fn add_error(err: ApiError, fwd: &HostFwd) -> PortError {
    match err {
        ApiError::Refused { desc, .. } if desc.ends_with("slirp_add_hostfwd failed") => {
            let proto = match fwd.proto {
                FwdProto::Tcp => "tcp",
                FwdProto::Udp => "udp",
            };
            PortError::Backend(format!(
                "slirp4netns: add_hostfwd: slirp_add_hostfwd failed (could not listen on \
                 {}:{}/{proto}: is it already in use?)",
                fwd.host_addr, fwd.host_port
            ))
        }
        other => backend(other),
    }
}

fn backend(err: ApiError) -> PortError {
    PortError::Backend(err.to_string())
}

/// Refuses a host port an unprivileged slirp4netns cannot bind, with the fix in the message.
///
/// slirp4netns's API does not pass bind errors back (slirp4netns issue 251), so the check is
/// done here, the way the kernel does it: ports below `net.ipv4.ip_unprivileged_port_start`
/// need `CAP_NET_BIND_SERVICE`, which a non-root slirp4netns lacks.
fn check_privileged(port: u16, proto: FwdProto, addr: Ipv4Addr) -> Result<(), PortError> {
    let euid = nix::unistd::geteuid().as_raw();
    let Some(start) = unprivileged_port_start() else {
        return Ok(());
    };
    privileged_error(port, start, euid, proto, addr).map_or(Ok(()), Err)
}

fn privileged_error(
    port: u16,
    start: u32,
    euid: u32,
    proto: FwdProto,
    addr: Ipv4Addr,
) -> Option<PortError> {
    if euid == 0 || u32::from(port) >= start {
        return None;
    }
    let proto = if proto == FwdProto::Tcp { "tcp" } else { "udp" };
    Some(PortError::PrivilegedPort {
        port,
        start,
        detail: format!(
            "slirp4netns, running as uid {euid}, cannot listen on {addr}:{port}/{proto}"
        ),
    })
}

fn unprivileged_port_start() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

    fn driver() -> Slirp4netnsDriver {
        Slirp4netnsDriver::new("/nonexistent/.s4nn.sock", TAP)
    }

    fn refusal(spec: &str) -> String {
        let spec: PortSpec = spec.parse().expect("valid spec");
        driver().add_port(&spec).expect_err("refused").to_string()
    }

    #[test]
    fn info_matches_upstream() -> Result<(), PortError> {
        let info = driver().info()?;
        assert_eq!(
            serde_json::to_string(&info).expect("serialises"),
            r#"{"driver":"slirp4netns","protos":["tcp","tcp4","udp","udp4"],"disallowLoopbackChildIP":true}"#
        );
        Ok(())
    }

    #[test]
    fn refusals_name_the_reason_without_calling_slirp4netns() {
        // The socket does not exist, so reaching slirp4netns would be a connect error instead.
        let table = [
            ("[::]:18007:80/tcp6", "port driver slirp4netns does not support IPv6 (proto tcp6: slirp4netns forwards IPv4 only; use tcp4)"),
            ("[::1]:18007:80/tcp", "port driver slirp4netns does not support IPv6 (parent IP ::1: slirp4netns forwards IPv4 only; use an IPv4 address)"),
            ("[::]:18007:80/udp", "port driver slirp4netns does not support IPv6 (parent IP ::: slirp4netns forwards IPv4 only; use 0.0.0.0 or leave the parent IP empty)"),
            ("127.0.0.1:18007:[fd00::100]:80/tcp", "port driver slirp4netns does not support IPv6 (child IP fd00::100: slirp4netns forwards IPv4 only; use an IPv4 address)"),
            ("127.0.0.1:18007:80/sctp", "protocol sctp is not supported by port driver slirp4netns"),
            ("127.0.0.1:18008:127.0.0.1:80/tcp", "port driver slirp4netns does not support loopback child IP 127.0.0.1: slirp4netns delivers through the tap device, so a loopback address inside the namespace cannot be reached; use the tap address 10.0.2.100 or leave the child IP empty"),
        ];
        for (spec, want) in table {
            assert_eq!(refusal(spec), want, "{spec}");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() -> Result<(), PortError> {
        let spec: PortSpec = "[::ffff:127.0.0.1]:8080:[::ffff:10.0.2.100]:80/tcp".parse()?;
        let fwd = driver().host_fwd(&spec)?;
        assert_eq!(fwd.host_addr, Ipv4Addr::LOCALHOST);
        assert_eq!(fwd.guest_addr, TAP);
        Ok(())
    }

    #[test]
    fn family_suffix_is_stripped_and_defaults_filled() -> Result<(), PortError> {
        let fwd = driver().host_fwd(&":8080:80/udp4".parse()?)?;
        assert_eq!(
            fwd,
            HostFwd {
                proto: FwdProto::Udp,
                host_addr: Ipv4Addr::UNSPECIFIED,
                host_port: 8080,
                guest_addr: TAP,
                guest_port: 80,
            }
        );
        Ok(())
    }

    #[test]
    fn privileged_port_message_is_actionable() {
        let err = privileged_error(80, 1024, 1000, FwdProto::Tcp, Ipv4Addr::LOCALHOST);
        assert_eq!(
            err.expect("refused").to_string(),
            "cannot expose privileged port 80, you can add \
             'net.ipv4.ip_unprivileged_port_start=80' to /etc/sysctl.conf (currently 1024), or \
             set CAP_NET_BIND_SERVICE on the rootlesskit binary, or choose a larger port number \
             (>= 1024): slirp4netns, running as uid 1000, cannot listen on 127.0.0.1:80/tcp"
        );
        assert!(privileged_error(1024, 1024, 1000, FwdProto::Udp, Ipv4Addr::LOCALHOST).is_none());
        assert!(privileged_error(80, 1024, 0, FwdProto::Tcp, Ipv4Addr::LOCALHOST).is_none());
        assert!(privileged_error(80, 0, 1000, FwdProto::Tcp, Ipv4Addr::LOCALHOST).is_none());
    }

    #[test]
    fn unknown_id_does_not_reach_slirp4netns() {
        assert!(matches!(
            driver().remove_port(7),
            Err(PortError::UnknownId(7))
        ));
    }

    #[test]
    fn udp_warning_only_with_host_loopback_disabled() {
        assert!(driver().udp_reply_warning().is_none());
        let warned = driver().with_host_loopback_disabled(true);
        assert!(warned
            .udp_reply_warning()
            .is_some_and(|w| w.contains("UDP replies")));
    }
}
