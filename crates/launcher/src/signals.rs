//! Signal forwarding: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 received by this
//! process go to one target process (the parent forwards to the child, the child to the
//! command), as RootlessKit does.
//!
//! A handler (with `SA_RESTART`) writes the signal number to a pipe and a dedicated thread
//! forwards it. Handlers, unlike a blocked signal mask, are reset by `execve`, so programs
//! started by this process or by the port drivers see these signals normally. A signal that
//! arrives before the target is known is kept and delivered as soon as it is.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

/// The forwarded signals.
const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Write end of the pipe the handler writes to (-1 before installation).
static PIPE: AtomicI32 = AtomicI32::new(-1);

/// The one forwarder of the process.
static FORWARDER: OnceLock<Forwarder> = OnceLock::new();

#[derive(Debug, Default)]
struct State {
    target: Option<Pid>,
    pending: Vec<Signal>,
    /// The target is gone for good: a signal now ends this process.
    done: bool,
}

/// Forwards the signals to the process set with [`Forwarder::set_target`].
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    state: Arc<Mutex<State>>,
}

impl Forwarder {
    /// Installs the handlers and starts the forwarding thread (once per process; later calls
    /// return the same forwarder).
    pub fn install() -> std::io::Result<Forwarder> {
        if let Some(forwarder) = FORWARDER.get() {
            return Ok(forwarder.clone());
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let forwarder = Forwarder {
            state: Arc::default(),
        };
        let state = Arc::clone(&forwarder.state);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || forward_loop(read, &state))?;
        PIPE.store(keep_open(write), Ordering::SeqCst);
        install_handlers()?;
        Ok(FORWARDER.get_or_init(|| forwarder).clone())
    }

    /// Sends every later signal, and those received so far, to `pid`.
    pub fn set_target(&self, pid: Pid) {
        let mut state = lock(&self.state);
        state.target = Some(pid);
        for sig in std::mem::take(&mut state.pending) {
            deliver(pid, sig);
        }
    }

    /// Stops forwarding for good: the target is about to be reaped (its pid may be reused).
    ///
    /// A signal received after this exits the process with 128+N, so that a teardown that
    /// does not finish can still be interrupted.
    pub fn clear_target(&self) {
        let mut state = lock(&self.state);
        state.target = None;
        state.done = true;
    }
}

/// The write end lives as long as the process: the handler may run at any time.
fn keep_open(fd: OwnedFd) -> i32 {
    let raw = fd.as_raw_fd();
    std::mem::forget(fd);
    raw
}

fn install_handlers() -> std::io::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: `on_signal` is async-signal-safe: it only reads an atomic and calls write(2),
        // saving and restoring errno.
        unsafe { sigaction(sig, &action)? };
    }
    Ok(())
}

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; write(2) is async-signal-safe
    // and the buffer is a live local. A full pipe drops the byte (O_NONBLOCK), which only
    // loses a signal when 64 KiB of them are queued.
    unsafe {
        let errno = *libc::__errno_location();
        let byte = sig as u8;
        libc::write(PIPE.load(Ordering::Relaxed), (&byte as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn forward_loop(read: OwnedFd, state: &Mutex<State>) {
    let mut pipe = File::from(read);
    let mut buf = [0u8; 64];
    loop {
        let n = match wait_readable(&pipe).and_then(|()| pipe.read(&mut buf)) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(%err, "signal pipe failed, no longer forwarding signals");
                return;
            }
        };
        for sig in buf[..n]
            .iter()
            .filter_map(|&b| Signal::try_from(i32::from(b)).ok())
        {
            let mut state = lock(state);
            match state.target {
                Some(pid) => deliver(pid, sig),
                None if state.done => std::process::exit(128 + sig as i32),
                None => state.pending.push(sig),
            }
        }
    }
}

/// Blocks until the (non-blocking) pipe has data.
fn wait_readable(pipe: &File) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::NONE)?;
    Ok(())
}

fn deliver(pid: Pid, sig: Signal) {
    tracing::debug!(%pid, ?sig, "forwarding signal");
    if let Err(err) = kill(pid, sig) {
        tracing::debug!(%pid, ?sig, %err, "failed to forward signal");
    }
}
