//! Frees a worker held in a system call by an inner socket that has become blocking.
//!
//! The parent makes every socket the helper sends non-blocking before using it, but the
//! helper may keep a copy: the file status flags, `O_NONBLOCK` among them, belong to the open
//! file that both copies share, so a tampered helper can clear the flag at any time. splice(2)
//! and connect(2) on such a socket then wait (`SPLICE_F_NONBLOCK` covers only the pipe), and
//! with them the worker and every connection it holds; copies and UDP pass `MSG_DONTWAIT` and
//! are safe without this.
//!
//! Each worker counts its rounds and says when it is waiting in its poll. A worker seen at two
//! looks in a row outside its poll in the same round as at the look before (held for two to
//! three [`TICK`]s) gets `SIGURG`, sent to its thread alone. The handler does nothing and is
//! installed without `SA_RESTART`, so the waiting call fails with `EINTR` and the worker
//! closes that one connection. A busy worker that is merely slow gets a signal that
//! interrupts nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// How often the watchdog looks at the workers.
const TICK: Duration = Duration::from_millis(500);

/// The signal that interrupts a held worker; by default it is ignored, so a stray one does no
/// harm.
const SIGNAL: Signal = Signal::SIGURG;

/// What a worker shows of its progress.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    rounds: AtomicU64,
    polling: AtomicBool,
    /// The worker's thread while it may be signalled (cleared before it is joined).
    thread: Mutex<Option<libc::pthread_t>>,
}

impl Progress {
    /// The worker is about to wait for events.
    pub fn polling(&self) {
        self.polling.store(true, Ordering::Relaxed);
    }

    /// The worker has events to handle: a new round.
    pub fn working(&self) {
        self.polling.store(false, Ordering::Relaxed);
        self.rounds.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_thread(&self, thread: Option<libc::pthread_t>) {
        *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = thread;
    }

    /// Sends [`SIGNAL`] to the worker's thread, unless it has been cleared.
    fn interrupt(&self) {
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(thread) = *thread {
            tracing::debug!("a worker is held in a system call, interrupting it");
            // SAFETY: the thread has not been joined: `set_thread(None)` comes first, and it
            // waits for this lock.
            unsafe { libc::pthread_kill(thread, SIGNAL as libc::c_int) };
        }
    }
}

extern "C" fn interrupted(_: libc::c_int) {}

/// Installs the do-nothing handler of [`SIGNAL`] once per process; false when another handler
/// is there already (the process's own, left alone).
fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let ours = SigAction::new(
            SigHandler::Handler(interrupted),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, which is async-signal-safe.
        match unsafe { sigaction(SIGNAL, &ours) } {
            Ok(old) if matches!(old.handler(), SigHandler::SigDfl | SigHandler::SigIgn) => true,
            Ok(old) => {
                // SAFETY: puts back the handler that was there.
                let _ = unsafe { sigaction(SIGNAL, &old) };
                tracing::debug!("SIGURG has a handler of the process; workers are not watched");
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot install the SIGURG handler");
                false
            }
        }
    })
}

/// Watches the workers of `progress` from a thread of its own, which ends once all of them
/// have been dropped.
pub(crate) fn watch(progress: Vec<Weak<Progress>>) {
    if !install() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("rkport-watchdog".into())
        .spawn(move || {
            // (rounds at the last look, looks in a row without progress outside the poll)
            let mut seen: Vec<(u64, u32)> = vec![(0, 0); progress.len()];
            loop {
                std::thread::sleep(TICK);
                let mut alive = 0;
                for (weak, (last, held)) in progress.iter().zip(&mut seen) {
                    let Some(p) = weak.upgrade() else { continue };
                    alive += 1;
                    let rounds = p.rounds.load(Ordering::Relaxed);
                    if p.polling.load(Ordering::Relaxed) || rounds != *last {
                        (*last, *held) = (rounds, 0);
                        continue;
                    }
                    *held += 1;
                    if *held >= 2 {
                        p.interrupt();
                        *held = 0;
                    }
                }
                if alive == 0 {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "cannot start the worker watchdog");
    }
}
