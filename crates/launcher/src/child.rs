//! The child: the re-executed binary that creates the namespaces and runs the command in them.
//!
//! It is started by the parent with the control socket at fd 3 and, for the builtin port
//! driver, the helper channel at fd 4. Steps, each acknowledged on the control channel
//! ([`crate::msg`]):
//!
//! 1. unshare user + mount (+ network) namespaces, while still single-threaded;
//! 2. once the parent wrote the id maps, become root of the namespace, set mount propagation,
//!    copy up directories, bring `lo` up and create the tap device;
//! 3. once slirp4netns is up, configure the tap and the resolver files, start the builtin
//!    driver's helper on a thread;
//! 4. once every port is published and the API listens, run the command, forward signals to
//!    it and exit with its status (128+N when it is killed by signal N).

use std::fs;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};

use anyhow::{bail, Context};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::{getppid, setgroups, setresgid, setresuid, Gid, Pid, Uid};

use crate::msg::{Channel, ChildMsg, ChildSetup, NetConfig, ParentMsg};
use crate::signals::Forwarder;
use crate::sys::{configure_child, exit_code, set_cloexec, set_pdeathsig};
use crate::{mounts, net, CHILD_ENV};

/// fd number of the control socket in the child.
pub(crate) const CONTROL_FD: i32 = 3;
/// fd number of the builtin driver's helper channel in the child.
pub(crate) const HELPER_FD: i32 = 4;

/// Runs the child side and exits the process with the command's exit code.
pub(crate) fn main() -> ! {
    // SAFETY: the parent put the control socket at fd 3 (sys::configure_child) and nothing in
    // this process has taken ownership of that number yet.
    let control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    let _ = set_cloexec(&control);
    let mut channel = Channel::new(control);
    let code = match run(&mut channel) {
        Ok(code) => code,
        Err(err) => {
            let message = format!("{err:#}");
            if channel.send(&ChildMsg::Failed(message.clone())).is_err() {
                // One write(2) for the whole line (`eprintln!` makes one per piece): the
                // parent may be printing its own error to the same stderr at this moment, and
                // its exit kills this process (parent-death signal) between two writes.
                let line = format!("[rootlesskit:child ] error: {message}\n");
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
            1
        }
    };
    std::process::exit(code)
}

fn run(channel: &mut Channel) -> anyhow::Result<i32> {
    let parent = getppid();
    let ParentMsg::Init(setup) = channel.recv().context("failed to read setup")? else {
        bail!("unexpected first control message");
    };
    let helper = take_helper_fd(&setup)?;

    unshare_namespaces(&setup)?;
    let forwarder = Forwarder::install().context("failed to set up signal forwarding")?;
    channel.send(&ChildMsg::Unshared)?;
    expect(channel, |msg| matches!(msg, ParentMsg::MapsWritten))?;
    become_root(parent)?;
    prepare_namespaces(&setup)?;
    channel.send(&ChildMsg::NamespacesReady)?;

    let ParentMsg::Network(network) = channel.recv()? else {
        bail!("unexpected control message, want network");
    };
    if let Some(config) = &network {
        configure_network(&setup, config)?;
    }
    if let Some(fd) = helper {
        start_helper(fd)?;
    }
    channel.send(&ChildMsg::Ready)?;

    expect(channel, |msg| matches!(msg, ParentMsg::Start))?;
    let command = spawn_command(&setup)?;
    let pid = Pid::from_raw(command.id() as i32);
    forwarder.set_target(pid);
    channel.send(&ChildMsg::Started(pid.as_raw()))?;
    wait_command(command, &forwarder)
}

fn expect(channel: &mut Channel, want: fn(&ParentMsg) -> bool) -> anyhow::Result<()> {
    let Ok(msg) = channel.recv() else {
        // The parent stopped before the command started (a failed `-p`, a signal); it reports
        // why, and a second error line from here would only blur that.
        std::process::exit(1);
    };
    if !want(&msg) {
        bail!("unexpected control message {msg:?}");
    }
    Ok(())
}

fn take_helper_fd(setup: &ChildSetup) -> anyhow::Result<Option<OwnedFd>> {
    if !setup.builtin_helper {
        return Ok(None);
    }
    // SAFETY: with the builtin driver the parent put the helper channel at fd 4, and nothing
    // else in this process owns that number.
    let fd = unsafe { OwnedFd::from_raw_fd(HELPER_FD) };
    set_cloexec(&fd).context("helper channel fd 4 is not open")?;
    Ok(Some(fd))
}

fn unshare_namespaces(setup: &ChildSetup) -> anyhow::Result<()> {
    let mut flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS;
    if setup.unshare_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // A new user namespace requires a single-threaded caller; no thread exists yet.
    unshare(flags).context("failed to create user, mount and network namespaces (unshare)")
}

/// Becomes uid/gid 0 of the namespace, keeping the full capability set that `unshare` gave.
fn become_root(parent: Pid) -> anyhow::Result<()> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).context("failed to become gid 0 in the namespace")?;
    // Supplementary groups outside the map would show as nogroup; setgroups may be denied.
    let _ = setgroups(&[]);
    setresuid(root_uid, root_uid, root_uid).context("failed to become uid 0 in the namespace")?;
    // Credential changes can clear the parent-death signal (prctl(2)): set it again.
    set_pdeathsig().context("failed to set the parent-death signal")?;
    if getppid() != parent {
        bail!("parent exited");
    }
    Ok(())
}

fn prepare_namespaces(setup: &ChildSetup) -> anyhow::Result<()> {
    mounts::set_propagation(setup.propagation)?;
    for (i, dir) in setup.copy_up.iter().enumerate() {
        let scratch = setup.state_dir.join(format!(".copyup-{i}"));
        mounts::copy_up(dir, &scratch)?;
    }
    if setup.unshare_net {
        net::loopback_up()?;
    }
    if let Some(tap) = &setup.tap {
        net::create_tap(tap)?;
    }
    Ok(())
}

fn configure_network(setup: &ChildSetup, config: &NetConfig) -> anyhow::Result<()> {
    net::configure_tap(config)?;
    let etc_copied_up = setup.copy_up.iter().any(|dir| dir.as_os_str() == "/etc");
    let contents = [net::resolv_conf(config), net::hosts(config)];
    for ((file, target), text) in net::generated_files(&setup.state_dir).iter().zip(contents) {
        fs::write(file, text).with_context(|| format!("failed to write {}", file.display()))?;
        mounts::install_file(file, target.as_ref(), etc_copied_up)?;
    }
    Ok(())
}

/// Serves the builtin port driver's helper from inside the namespaces, on its own thread.
fn start_helper(fd: OwnedFd) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("builtin-helper".into())
        .spawn(move || {
            if let Err(err) = rkport_builtin::helper::serve(fd) {
                tracing::debug!(%err, "builtin port driver helper stopped");
            }
        })
        .context("failed to start the builtin port driver helper")?;
    Ok(())
}

fn spawn_command(setup: &ChildSetup) -> anyhow::Result<Child> {
    let (program, args) = setup
        .command
        .split_first()
        .context("no command specified")?;
    let mut command = Command::new(program);
    command.args(args).env_remove(CHILD_ENV);
    configure_child(&mut command, Vec::new());
    command
        .spawn()
        .with_context(|| format!("failed to run command {program:?}"))
}

/// Waits for the command; stops forwarding before reaping so that a reused pid never gets a
/// signal meant for the command.
fn wait_command(mut command: Child, forwarder: &Forwarder) -> anyhow::Result<i32> {
    let pid = Pid::from_raw(command.id() as i32);
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::Error::EINTR) => continue,
            Err(err) => return Err(err).context("failed to wait for the command"),
            Ok(_) => break,
        }
    }
    forwarder.clear_target();
    let status = command.wait().context("failed to reap the command")?;
    tracing::debug!(%status, "command exited");
    Ok(exit_code(status))
}
