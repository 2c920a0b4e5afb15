//! The host-loopback guard: `--disable-host-loopback` enforced inside the namespace.
//!
//! # Why
//!
//! slirp4netns's `--disable-host-loopback` sets libslirp's `disable_host_loopback`, which makes
//! libslirp refuse to send anything the guest addresses to the gateway (10.0.2.2 by default) or
//! to 255.255.255.255, because libslirp would otherwise translate that destination to the host's
//! 127.0.0.1 (`sotranslate_out4()` in libslirp's `socket.c`, which fails with `EPERM`). The check
//! looks at the destination address only, not at who opened the flow.
//!
//! Host-forwarded connections from loopback clients enter the guest *from* the gateway address:
//! libslirp rewrites a 127.0.0.1 source to 10.0.2.2 (`sotranslate_in()`). A TCP forward survives
//! this because its host side is one connected socket; a UDP forward does not, because every
//! reply datagram goes through `udp_input()` → `sosendto()` → `sotranslate_out()`, whose check
//! drops it. So with the flag, UDP requests from loopback clients arrive and their replies are
//! lost (slirp4netns 1.2.0 / libslirp 4.7.0; podman issue 4586, RootlessKit case C16). Clients
//! on a non-loopback host address are not rewritten and get their replies.
//!
//! # The fix
//!
//! Start slirp4netns *without* `--disable-host-loopback` and let the namespace's own netfilter
//! refuse what the flag was for: packets that open a **new** flow towards the gateway (or the
//! limited broadcast) from the namespace, locally generated (`output`) or routed for nested
//! namespaces (`forward`). Replies to flows that came in through a host forward belong to a
//! conntrack entry created by the inbound packet, so they are `established` and pass. DHCP
//! (`udp dport 67`) is left alone: libslirp answers it itself and never reaches the host.
//!
//! # What the launcher must do
//!
//! Before the user's command starts, and before slirp4netns forwards anything: apply the guard
//! in the child's network namespace, e.g. with [`apply_host_loopback_guard`] from the parent
//! (it runs `nsenter -t PID -U -n --preserve-credentials nft ...`, or `iptables` when there is
//! no `nft`), then start slirp4netns without `--disable-host-loopback`. If the guard cannot be
//! applied, fall back to `--disable-host-loopback` and build the driver with
//! [`Slirp4netnsDriver::with_host_loopback_disabled`](crate::Slirp4netnsDriver::with_host_loopback_disabled)
//! so that it can warn about UDP.
//!
//! # Limits
//!
//! The rules live in the namespace, so a process with `CAP_NET_ADMIN` there (the namespace's
//! root, which the user's command usually is) can delete them; slirp4netns's flag cannot be
//! undone from inside. The guard protects against unprivileged processes and nested containers,
//! not against the namespace's root. It covers IPv4 only: with `--enable-ipv6` libslirp also maps
//! the whole IPv6 prefix (fd00::/64) to `::1`, which this guard does not filter.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The nftables table (family `inet`) and iptables chain the guard creates.
pub const GUARD_NAME: &str = "rkport_host_loopback_guard";

/// The firewall front-end that applied the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    Nft,
    Iptables,
}

/// Why the guard could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot guard host loopback: neither nft nor iptables is in PATH")]
    NoFirewallTool,
    #[error("cannot guard host loopback: failed to run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot guard host loopback: {command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The `nft` commands that install the guard for `gateway` (slirp4netns's CIDR base + 2).
///
/// Each inner vector is one argv, to run inside the namespace with `CAP_NET_ADMIN` there. They
/// create table `inet rkport_host_loopback_guard`; running them twice fails (the table exists).
pub fn host_loopback_guard_commands(gateway: Ipv4Addr) -> Vec<Vec<String>> {
    let table = ["inet", GUARD_NAME];
    let mut cmds = vec![nft(&["add", "table"], &table, "")];
    for hook in ["output", "forward"] {
        let chain = format!("{hook} {{ type filter hook {hook} priority 0 ; policy accept ; }}");
        cmds.push(nft(&["add", "chain"], &table, &chain));
        cmds.push(nft(
            &["add", "rule"],
            &table,
            &format!("{hook} udp dport 67 accept"),
        ));
        let reject = format!(
            "{hook} ct state new ip daddr {{ {gateway}, 255.255.255.255 }} \
             meta l4proto {{ tcp, udp }} reject"
        );
        cmds.push(nft(&["add", "rule"], &table, &reject));
    }
    cmds
}

fn nft(verb: &[&str], table: &[&str], rest: &str) -> Vec<String> {
    let words = std::iter::once("nft")
        .chain(verb.iter().copied())
        .chain(table.iter().copied());
    let mut argv: Vec<String> = words.map(str::to_owned).collect();
    if !rest.is_empty() {
        argv.push(rest.to_owned());
    }
    argv
}

/// The same guard as [`host_loopback_guard_commands`] for hosts with `iptables` but no `nft`.
pub fn host_loopback_guard_iptables_commands(gateway: Ipv4Addr) -> Vec<Vec<String>> {
    let gw = format!("{gateway}/32");
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let rule = |dst: &str, proto: &str, extra: &[&str], reject: &[&str]| {
        let head = ["iptables", "-A", GUARD_NAME, "-d", dst, "-p", proto];
        let tail = ["-j", "REJECT"];
        let parts = [&head[..], extra, &new[..], &tail[..], reject];
        parts
            .concat()
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let not_dhcp = ["!", "--dport", "67"];
    let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        argv(&["iptables", "-N", GUARD_NAME]),
        rule(&gw, "tcp", &[], &["--reject-with", "tcp-reset"]),
        rule(&gw, "udp", &not_dhcp, &[]),
        rule("255.255.255.255/32", "udp", &not_dhcp, &[]),
        argv(&["iptables", "-A", "OUTPUT", "-j", GUARD_NAME]),
        argv(&["iptables", "-A", "FORWARD", "-j", GUARD_NAME]),
    ]
}

/// Applies the guard in the network namespace of `child_pid` from outside it, with
/// `nsenter -t PID -U -n --preserve-credentials`, using `nft` or else `iptables`.
///
/// Blocks until every command has run. Call it once, before the namespace runs untrusted code.
///
/// # Errors
/// [`GuardError::NoFirewallTool`] when neither tool is in PATH, otherwise the first command
/// that failed with its stderr. A failure part-way may leave some rules in place; the launcher
/// then starts slirp4netns with `--disable-host-loopback`, so they do no harm.
pub fn apply_host_loopback_guard(
    child_pid: i32,
    gateway: Ipv4Addr,
) -> Result<Firewall, GuardError> {
    let (firewall, cmds) = if find_in_path("nft").is_some() {
        (Firewall::Nft, host_loopback_guard_commands(gateway))
    } else if find_in_path("iptables").is_some() {
        (
            Firewall::Iptables,
            host_loopback_guard_iptables_commands(gateway),
        )
    } else {
        return Err(GuardError::NoFirewallTool);
    };
    let pid = child_pid.to_string();
    let nsenter = ["nsenter", "-t", &pid, "-U", "-n", "--preserve-credentials"];
    for cmd in cmds {
        run(nsenter
            .iter()
            .map(OsStr::new)
            .chain(cmd.iter().map(OsStr::new)))?;
    }
    tracing::debug!(child_pid, %gateway, ?firewall, "host loopback guard applied");
    Ok(firewall)
}

fn run<'a>(argv: impl Iterator<Item = &'a OsStr>) -> Result<(), GuardError> {
    let argv: Vec<&OsStr> = argv.collect();
    let command = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GuardError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(GuardError::Failed {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// The first executable file named `name` in `$PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_commands_reject_new_flows_to_the_gateway_in_both_hooks() {
        let cmds = host_loopback_guard_commands(Ipv4Addr::new(10, 0, 2, 2));
        let text: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert_eq!(text[0], "nft add table inet rkport_host_loopback_guard");
        for hook in ["output", "forward"] {
            let reject = format!(
                "nft add rule inet rkport_host_loopback_guard {hook} ct state new ip daddr \
                 {{ 10.0.2.2, 255.255.255.255 }} meta l4proto {{ tcp, udp }} reject"
            );
            assert!(text.contains(&reject), "{text:#?}");
        }
    }

    #[test]
    fn iptables_commands_hook_one_chain_into_output_and_forward() {
        let cmds = host_loopback_guard_iptables_commands(Ipv4Addr::new(10, 0, 3, 2));
        let text: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert!(text.contains(&"iptables -A OUTPUT -j rkport_host_loopback_guard".to_owned()));
        assert!(text.contains(&"iptables -A FORWARD -j rkport_host_loopback_guard".to_owned()));
        assert!(
            text.iter().any(|t| t.contains("-d 10.0.3.2/32 -p tcp")),
            "{text:#?}"
        );
    }
}
