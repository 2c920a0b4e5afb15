//! The parent: runs in the host namespaces, owns the state directory, slirp4netns, the port
//! driver's host half and `api.sock`, and drives the child through start-up.
//!
//! Unlike RootlessKit, where the command may start before `-p` ports are published (a race,
//! drivers.md §1.2), the command starts only after every port is published, `child_pid` is
//! written and `api.sock` listens. Teardown (API, driver, slirp4netns, child, state dir) runs
//! in [`Drop`], so every error path leaves nothing behind.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::{Gid, Pid, Uid};
use rkport_api::server::{ApiServer, ApiState};
use rkport_api::{Info, NetworkDriverInfo, API_VERSION};
use rkport_core::PortDriver;

use crate::child::{CONTROL_FD, HELPER_FD};
use crate::config::{Cidr, LaunchConfig, NetworkMode, PortDriverKind};
use crate::idmap::IdMapPlan;
use crate::msg::{Channel, ChildMsg, ChildSetup, NetConfig, ParentMsg};
use crate::signals::Forwarder;
use crate::slirp::{self, Slirp4netns, Slirp4netnsArgs};
use crate::statedir::{StateDir, API_SOCK, SLIRP4NETNS_SOCK};
use crate::sys::{configure_child, dup_high, exit_code, raw};
use crate::watch;
use crate::CHILD_ENV;

/// A rootlesskit ready to run the command: namespaces and network are set up, every `-p`
/// port is published, `child_pid` is written and `api.sock` listens. [`Running::wait`] starts
/// the command.
///
/// Dropping it without [`Running::wait`] kills the child (and with it the command) and tears
/// everything down.
#[derive(Debug)]
pub struct Running {
    session: Session,
}

/// What the host half owns; torn down in [`Drop`] in reverse order of start-up.
#[derive(Debug)]
struct Session {
    forwarder: Forwarder,
    api: Option<ApiServer>,
    driver: Option<ActiveDriver>,
    slirp: Option<Slirp4netns>,
    child: Option<Child>,
    api_socket: PathBuf,
    /// The control channel, until the command is started.
    channel: Option<Channel>,
    /// Whether slirp4netns itself runs with `--disable-host-loopback`.
    slirp_disables_host_loopback: bool,
    warnings: Vec<String>,
    state: StateDir,
}

/// The port driver in use, kept by its concrete type for its `shutdown`.
#[derive(Debug)]
enum ActiveDriver {
    Builtin(Arc<rkport_builtin::BuiltinDriver>),
    Slirp4netns(Arc<rkport_slirp4netns::Slirp4netnsDriver>),
    Socat(Arc<rkport_socat::SocatDriver>),
}

impl ActiveDriver {
    fn as_dyn(&self) -> Arc<dyn PortDriver> {
        match self {
            ActiveDriver::Builtin(d) => Arc::clone(d) as Arc<dyn PortDriver>,
            ActiveDriver::Slirp4netns(d) => Arc::clone(d) as Arc<dyn PortDriver>,
            ActiveDriver::Socat(d) => Arc::clone(d) as Arc<dyn PortDriver>,
        }
    }

    fn shutdown(&self) {
        match self {
            ActiveDriver::Builtin(d) => d.shutdown(),
            ActiveDriver::Slirp4netns(_) => {}
            ActiveDriver::Socat(d) => d.shutdown(),
        }
    }
}

/// Checks `config` and sets everything up, short of starting the command.
///
/// Call from the thread that will also call [`Running::wait`], typically the main thread: the
/// helpers' parent-death signal is tied to the spawning thread.
///
/// # Errors
/// Invalid configuration, missing subordinate ids or programs, a state directory that cannot
/// be used, a namespace, network or publish failure, or a command that cannot be executed.
/// Everything started so far is torn down first.
pub fn start(config: LaunchConfig) -> anyhow::Result<Running> {
    config.validate()?;
    let idmap = IdMapPlan::for_current_user()?;
    let slirp_binary = match config.net {
        NetworkMode::Slirp4netns => Some(slirp::locate(&config.slirp4netns_binary)?),
        _ => None,
    };
    let forwarder = Forwarder::install().context("failed to set up signal forwarding")?;
    let state = StateDir::create(config.state_dir.as_deref(), &socket_names(&config))?;
    let api_socket = state.file(API_SOCK);
    let mut session = Session {
        forwarder,
        api: None,
        driver: None,
        slirp: None,
        child: None,
        api_socket,
        channel: None,
        slirp_disables_host_loopback: false,
        warnings: Vec::new(),
        state,
    };
    session.start(&config, &idmap, slirp_binary.as_deref())?;
    Ok(Running { session })
}

/// Runs `config` to completion: [`start`], then [`Running::wait`].
///
/// # Errors
/// As [`start`].
pub fn run(config: LaunchConfig) -> anyhow::Result<i32> {
    start(config)?.wait()
}

fn socket_names(config: &LaunchConfig) -> Vec<&'static str> {
    let mut names = vec![API_SOCK];
    if config.port_driver == PortDriverKind::Slirp4netns {
        names.push(SLIRP4NETNS_SOCK);
    }
    names
}

impl Running {
    /// The `api.sock` path.
    pub fn api_socket(&self) -> &Path {
        &self.session.api_socket
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.session.state.path()
    }

    /// The host pid of the child process (the `child_pid` file).
    pub fn child_pid(&self) -> i32 {
        self.session.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Things the user should be told (the library does not log them above debug level).
    pub fn warnings(&self) -> &[String] {
        &self.session.warnings
    }

    /// The host pid of slirp4netns, with `--net=slirp4netns`.
    pub fn slirp4netns_pid(&self) -> Option<u32> {
        self.session.slirp.as_ref().map(Slirp4netns::pid)
    }

    /// Starts the command, waits for it and tears everything down.
    ///
    /// Returns the command's exit code, or 128+N when it was killed by signal N (RootlessKit
    /// returns 255 then; 128+N tells which signal it was, as shells do).
    ///
    /// # Errors
    /// The command cannot be executed (e.g. not found), waiting fails, or slirp4netns exited
    /// while the command ran.
    ///
    /// With `--net=slirp4netns`, slirp4netns exiting first stops the command (SIGTERM, then
    /// SIGKILL after 10 s) and is an error naming its exit status.
    pub fn wait(mut self) -> anyhow::Result<i32> {
        let command = self.session.start_command()?;
        tracing::debug!(pid = command, "command started");
        self.session.watch_slirp4netns()?;
        let child = self.session.child.take().context("no child process")?;
        let code = wait_reaped(child, &self.session.forwarder)?;
        Ok(code)
    }
}

/// Waits for `child`, stops forwarding signals to it before reaping (its pid could be reused
/// right after), then reaps it.
fn wait_reaped(mut child: Child, forwarder: &Forwarder) -> anyhow::Result<i32> {
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::Error::EINTR) => continue,
            Err(err) => return Err(err).context("failed to wait for the child"),
            Ok(_) => break,
        }
    }
    forwarder.clear_target();
    let status = child.wait().context("failed to reap the child")?;
    tracing::debug!(%status, "child exited");
    Ok(exit_code(status))
}

impl Session {
    fn start(
        &mut self,
        config: &LaunchConfig,
        idmap: &IdMapPlan,
        slirp_binary: Option<&Path>,
    ) -> anyhow::Result<()> {
        let helper = match config.port_driver {
            PortDriverKind::Builtin => Some(
                rkport_builtin::channel().context("failed to create the builtin driver channel")?,
            ),
            _ => None,
        };
        let (helper_parent, helper_child) = helper.unzip();
        let mut channel = self.spawn_child(helper_child)?;
        let pid = Pid::from_raw(self.child_pid());

        self.send(
            &mut channel,
            &ParentMsg::Init(child_setup(config, self.state.path())),
        )?;
        self.expect(&mut channel, |m| matches!(m, ChildMsg::Unshared))?;
        idmap.apply(pid)?;
        self.send(&mut channel, &ParentMsg::MapsWritten)?;
        self.expect(&mut channel, |m| matches!(m, ChildMsg::NamespacesReady))?;

        let network = self.start_network(config, slirp_binary, pid)?;
        self.send(&mut channel, &ParentMsg::Network(network.clone()))?;
        self.expect(&mut channel, |m| matches!(m, ChildMsg::Ready))?;

        self.start_driver(config, helper_parent)?;
        self.publish(config)?;
        self.state
            .write_child_pid(pid.as_raw())
            .context("failed to write child_pid")?;
        self.start_api(config, network.as_ref())?;
        self.channel = Some(channel);
        Ok(())
    }

    /// Tells the child to run the command and returns the command's pid.
    fn start_command(&mut self) -> anyhow::Result<i32> {
        let mut channel = self.channel.take().context("command already started")?;
        self.send(&mut channel, &ParentMsg::Start)?;
        match self.recv(&mut channel)? {
            ChildMsg::Started(pid) => Ok(pid),
            other => bail!("unexpected control message {other:?}"),
        }
    }

    fn child_pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Returns once the child has exited (not reaped), or fails once slirp4netns has exited
    /// first and the command has been asked to stop. Returns at once without slirp4netns or
    /// pidfds; the caller then waits for the child.
    ///
    /// While the command stops, the API keeps serving (it is shut down in [`Drop`]) and
    /// `GET /v1/info` reports the failure as `networkDriver.error`.
    fn watch_slirp4netns(&mut self) -> anyhow::Result<()> {
        let (Some(slirp), Some(child)) = (&mut self.slirp, &self.child) else {
            return Ok(());
        };
        let child = child.id();
        if watch::first_exit(child, slirp.pid()) == watch::First::Child {
            return Ok(());
        }
        let status = slirp
            .reap()
            .map_or_else(|e| format!("status unknown: {e}"), |s| s.to_string());
        let failure = format!("slirp4netns exited unexpectedly ({status})");
        tracing::warn!(
            "{failure}; stopping the command (SIGTERM, SIGKILL after {}s)",
            watch::GRACE.as_secs()
        );
        if let Some(api) = &self.api {
            api.report_network_error(&format!(
                "{failure}: the namespace has lost its network, rootlesskit is stopping"
            ));
        }
        // The child forwards SIGTERM to the command; Drop kills whatever is left.
        let _ = kill(Pid::from_raw(child as i32), Signal::SIGTERM);
        if !watch::exited_within_grace(child) {
            tracing::warn!(
                "the command is still running {}s after SIGTERM, killing it",
                watch::GRACE.as_secs()
            );
        }
        bail!("{failure}: the namespace has lost its network, so the command was stopped")
    }

    /// Re-executes this binary as the child, with the control socket at fd 3 and the builtin
    /// helper channel at fd 4.
    fn spawn_child(&mut self, helper: Option<OwnedFd>) -> anyhow::Result<Channel> {
        let (ours, theirs) = UnixStream::pair().context("failed to create the control socket")?;
        let theirs = dup_high(theirs)?;
        let helper = helper.map(dup_high).transpose()?;
        let mut fds = vec![(raw(&theirs), CONTROL_FD)];
        if let Some(fd) = &helper {
            fds.push((raw(fd), HELPER_FD));
        }

        let mut command = Command::new("/proc/self/exe");
        command
            .arg0(
                std::env::args_os()
                    .next()
                    .unwrap_or_else(|| "rootlesskit".into()),
            )
            .args(std::env::args_os().skip(1))
            .env(CHILD_ENV, "1")
            .env("ROOTLESSKIT_STATE_DIR", self.state.path())
            .env("ROOTLESSKIT_PARENT_EUID", Uid::effective().to_string())
            .env("ROOTLESSKIT_PARENT_EGID", Gid::effective().to_string());
        configure_child(&mut command, fds);
        let child = command
            .spawn()
            .context("failed to start the child process")?;
        tracing::debug!(pid = child.id(), "child started");
        self.forwarder.set_target(Pid::from_raw(child.id() as i32));
        self.child = Some(child);
        Ok(Channel::new(ours))
    }

    fn send(&mut self, channel: &mut Channel, msg: &ParentMsg) -> anyhow::Result<()> {
        channel.send(msg).map_err(|_| self.child_gone())
    }

    fn recv(&mut self, channel: &mut Channel) -> anyhow::Result<ChildMsg> {
        match channel.recv::<ChildMsg>() {
            Ok(ChildMsg::Failed(message)) => Err(anyhow!(message)),
            Ok(msg) => Ok(msg),
            Err(_) => Err(self.child_gone()),
        }
    }

    fn expect(&mut self, channel: &mut Channel, want: fn(&ChildMsg) -> bool) -> anyhow::Result<()> {
        let msg = self.recv(channel)?;
        if !want(&msg) {
            bail!("unexpected control message {msg:?}");
        }
        Ok(())
    }

    /// The error for a child that closed the control channel without saying why.
    fn child_gone(&mut self) -> anyhow::Error {
        let Some(mut child) = self.child.take() else {
            return anyhow!("child process is gone");
        };
        match child.wait() {
            Ok(status) => anyhow!("child process exited during start-up: {status}"),
            Err(err) => anyhow!("child process failed during start-up: {err}"),
        }
    }

    fn start_network(
        &mut self,
        config: &LaunchConfig,
        slirp_binary: Option<&Path>,
        pid: Pid,
    ) -> anyhow::Result<Option<NetConfig>> {
        let Some(binary) = slirp_binary else {
            return Ok(None);
        };
        let cidr = config.cidr.unwrap_or_default();
        self.slirp_disables_host_loopback = self.host_loopback_flag(config, pid, cidr);
        let args = Slirp4netnsArgs {
            mtu: config.effective_mtu(),
            disable_host_loopback: self.slirp_disables_host_loopback,
            cidr: config.cidr,
            api_socket: (config.port_driver == PortDriverKind::Slirp4netns)
                .then(|| self.state.file(SLIRP4NETNS_SOCK)),
            ifname: config.ifname().to_owned(),
        };
        self.slirp = Some(Slirp4netns::start(binary, &args, pid)?);
        Ok(Some(NetConfig {
            ifname: config.ifname().to_owned(),
            ip: cidr.child_ip(),
            prefix: cidr.prefix,
            gateway: cidr.gateway(),
            dns: cidr.dns(),
            mtu: config.effective_mtu(),
        }))
    }

    /// Whether to pass `--disable-host-loopback` to slirp4netns.
    ///
    /// With the slirp4netns port driver the flag makes libslirp drop UDP replies to loopback
    /// clients (case C16, podman#4586), so the restriction is enforced by firewall rules in the
    /// namespace instead (see `rkport_slirp4netns::guard`); the flag is the fallback when
    /// neither nft nor iptables can apply them.
    fn host_loopback_flag(&mut self, config: &LaunchConfig, pid: Pid, cidr: Cidr) -> bool {
        if !config.disable_host_loopback || config.port_driver != PortDriverKind::Slirp4netns {
            return config.disable_host_loopback;
        }
        match rkport_slirp4netns::apply_host_loopback_guard(pid.as_raw(), cidr.gateway()) {
            Ok(firewall) => {
                tracing::debug!(?firewall, "host loopback blocked by firewall rules");
                false
            }
            Err(err) => {
                self.warnings.push(format!(
                    "{err}; passing --disable-host-loopback to slirp4netns instead"
                ));
                true
            }
        }
    }

    fn start_driver(
        &mut self,
        config: &LaunchConfig,
        helper: Option<OwnedFd>,
    ) -> anyhow::Result<()> {
        let child_ip = config.cidr.unwrap_or_default().child_ip();
        self.driver = match config.port_driver {
            PortDriverKind::None => None,
            PortDriverKind::Builtin => {
                let fd = helper.context("builtin driver channel missing")?;
                let driver = rkport_builtin::BuiltinDriver::new(fd)
                    .context("failed to start the builtin port driver")?;
                Some(ActiveDriver::Builtin(Arc::new(driver)))
            }
            PortDriverKind::Slirp4netns => {
                let socket = self.state.file(SLIRP4NETNS_SOCK);
                let driver = rkport_slirp4netns::Slirp4netnsDriver::new(socket, child_ip)
                    .with_host_loopback_disabled(self.slirp_disables_host_loopback);
                self.warnings
                    .extend(driver.udp_reply_warning().map(str::to_owned));
                Some(ActiveDriver::Slirp4netns(Arc::new(driver)))
            }
            PortDriverKind::Socat => {
                let driver = rkport_socat::SocatDriver::new(self.child_pid())
                    .context("failed to start the socat port driver")?;
                Some(ActiveDriver::Socat(Arc::new(driver)))
            }
        };
        Ok(())
    }

    /// Publishes every `-p`, in order; the first failure aborts start-up.
    fn publish(&self, config: &LaunchConfig) -> anyhow::Result<()> {
        let Some(driver) = &self.driver else {
            return Ok(());
        };
        let driver = driver.as_dyn();
        for spec in &config.publish {
            let status = driver
                .add_port(spec)
                .with_context(|| format!("failed to expose port {spec}"))?;
            tracing::debug!(id = status.id, %spec, "published port");
        }
        Ok(())
    }

    fn start_api(
        &mut self,
        config: &LaunchConfig,
        network: Option<&NetConfig>,
    ) -> anyhow::Result<()> {
        let driver = self.driver.as_ref().map(ActiveDriver::as_dyn);
        let port_driver = match &driver {
            Some(d) => Some(d.info().context("failed to describe the port driver")?),
            None => None,
        };
        let info = Info {
            api_version: API_VERSION.to_owned(),
            version: config.version.clone(),
            state_dir: self.state.path().display().to_string(),
            child_pid: self.child_pid(),
            network_driver: network_info(config.net, network),
            port_driver,
        };
        let api = ApiServer::start(&self.api_socket, ApiState { driver, info })
            .with_context(|| format!("failed to listen on {}", self.api_socket.display()))?;
        self.api = Some(api);
        fs::set_permissions(&self.api_socket, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("failed to restrict {}", self.api_socket.display()))
    }
}

fn child_setup(config: &LaunchConfig, state_dir: &Path) -> ChildSetup {
    ChildSetup {
        unshare_net: config.net != NetworkMode::Host,
        state_dir: state_dir.to_owned(),
        propagation: config.propagation,
        copy_up: config.copy_up.clone(),
        tap: (config.net == NetworkMode::Slirp4netns).then(|| config.ifname().to_owned()),
        builtin_helper: config.port_driver == PortDriverKind::Builtin,
        command: config.command.clone(),
    }
}

fn network_info(net: NetworkMode, config: Option<&NetConfig>) -> Option<NetworkDriverInfo> {
    if net == NetworkMode::Host {
        return None;
    }
    let ip = |ip: Ipv4Addr| IpAddr::from(ip);
    Some(NetworkDriverInfo {
        driver: net.as_str().to_owned(),
        dns: config.map(|c| vec![ip(c.dns)]).unwrap_or_default(),
        child_ip: config.map(|c| ip(c.ip)),
        dynamic_child_ip: false,
        error: None,
    })
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            api.shutdown();
        }
        if let Some(driver) = self.driver.take() {
            driver.shutdown();
        }
        self.slirp = None;
        if let Some(mut child) = self.child.take() {
            // Still running: start-up failed or the caller gave up. The command dies with it
            // (parent-death signal).
            self.forwarder.clear_target();
            let _ = child.kill();
            let _ = child.wait();
        }
        // `state` is dropped after this, removing the directory.
    }
}
