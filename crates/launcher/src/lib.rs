//! The rootlesskit launcher: namespaces, id maps, network, state directory, port driver, API
//! and the user's command.
//!
//! `rootlesskit [FLAGS] COMMAND` runs COMMAND as root of a new user namespace, with a new mount
//! namespace and (unless `--net=host`) a new network namespace that is either empty but for
//! `lo` (`--net=none`) or connected to the host by slirp4netns (`--net=slirp4netns`). Ports
//! of the namespace are published on the host by a port driver (`rkport-builtin`,
//! `rkport-slirp4netns`, `rkport-socat`), controlled through the REST API on
//! `<state-dir>/api.sock` (`rkport-api`).
//!
//! # Processes
//!
//! ```text
//! rootlesskit (parent)      host namespaces: state dir, api.sock, port driver host half
//!  ├── slirp4netns          host netns, attached to the child's tap (--net=slirp4netns)
//!  └── rootlesskit (child)  the same binary re-executed: new user+mount(+net) namespaces,
//!       │                   builtin driver helper thread
//!       └── COMMAND
//! ```
//!
//! The binary's `main` must call [`is_child`] first and hand over to [`child_main`] when it
//! returns true, before it starts any thread: the child creates its user namespace with
//! `unshare`, which requires a single-threaded process. See [`parent`] and [`child`] for the
//! start-up sequence; the command starts only once every `-p` port is published and
//! `api.sock` listens.
//!
//! This crate does not parse command lines (the `rkport-cli` crate does) and implements only
//! the `host`, `none` and `slirp4netns` networks.

pub mod child;
pub mod config;
pub mod idmap;
pub mod mounts;
mod msg;
pub mod net;
pub mod parent;
mod signals;
pub mod slirp;
pub mod statedir;
pub mod sys;
mod watch;

pub use config::{Cidr, ConfigError, LaunchConfig, NetworkMode, PortDriverKind, Propagation};
pub use parent::{run, start, Running};

/// The warning to print when the deprecated `socat` port driver is chosen.
pub const SOCAT_DEPRECATION: &str = rkport_socat::DEPRECATION;

/// The environment variable that marks the re-executed child; removed before the command runs.
pub const CHILD_ENV: &str = "_RKPORT_CHILD";

/// This implementation's version, reported by `GET /v1/info` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether this process is the re-executed child (and must call [`child_main`]).
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the child side and exits with the command's exit code. Call only when [`is_child`]
/// is true, before any other thread is started.
pub fn child_main() -> ! {
    child::main()
}
