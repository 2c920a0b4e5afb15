//! Network configuration inside the child's network namespace, done with `ip` (iproute2) as
//! RootlessKit does: `lo` up, the tap device for slirp4netns, its address, MTU and default
//! route, and the `resolv.conf`/`hosts` files that point at slirp4netns's DNS.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::msg::NetConfig;
use crate::sys::find_program;

/// Why a network step failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("ip (iproute2) not found in $PATH, /usr/sbin or /sbin")]
    IpMissing,
    #[error("`ip {args}` failed: {detail}")]
    Ip { args: String, detail: String },
}

/// Runs `ip` with `args` and fails with its stderr.
fn ip(args: &[&str]) -> Result<(), NetError> {
    let program = find_program(Path::new("ip")).ok_or(NetError::IpMissing)?;
    let failed = |detail: String| NetError::Ip {
        args: args.join(" "),
        detail,
    };
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| failed(err.to_string()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(failed(format!("{}: {stderr}", output.status)))
}

/// Brings the loopback interface up.
pub(crate) fn loopback_up() -> Result<(), NetError> {
    ip(&["link", "set", "lo", "up"])
}

/// Creates the tap device slirp4netns will attach to.
pub(crate) fn create_tap(name: &str) -> Result<(), NetError> {
    ip(&["tuntap", "add", "name", name, "mode", "tap"])
}

/// Brings the tap up with its MTU, address and default route (drivers.md §1.1).
pub(crate) fn configure_tap(config: &NetConfig) -> Result<(), NetError> {
    let dev = config.ifname.as_str();
    let mtu = config.mtu.to_string();
    let addr = format!("{}/{}", config.ip, config.prefix);
    let gateway = config.gateway.to_string();
    ip(&["link", "set", dev, "up"])?;
    ip(&["link", "set", "dev", dev, "mtu", &mtu])?;
    ip(&["addr", "add", &addr, "dev", dev])?;
    ip(&["route", "add", "default", "via", &gateway, "dev", dev])
}

/// The generated `resolv.conf`: slirp4netns's DNS forwarder.
pub(crate) fn resolv_conf(config: &NetConfig) -> String {
    format!("nameserver {}\n", config.dns)
}

/// The generated `hosts`: loopback names and the host name on the namespace's address.
pub(crate) fn hosts(config: &NetConfig) -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty());
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(name) = hostname {
        text.push_str(&format!("{}\t{name}\n", config.ip));
    }
    text
}

/// The `(state-dir file, system file)` pairs written for a slirp4netns network.
pub(crate) fn generated_files(state_dir: &Path) -> [(PathBuf, &'static str); 2] {
    [
        (state_dir.join("resolv.conf"), "/etc/resolv.conf"),
        (state_dir.join("hosts"), "/etc/hosts"),
    ]
}
