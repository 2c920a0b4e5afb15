//! Project automation: `cargo xtask <job>`.
//!
//! - `demo`: builds the binaries and runs the main job: a command in a rootless namespace whose
//!   port, published with the builtin driver, a client on the host reaches.
//! - `ci`: everything CI runs. As root on a fresh machine it first installs the Debian packages
//!   the tests need and creates an unprivileged test user with subordinate id ranges; then it
//!   checks formatting and lints, runs every test as the invoking user and, when root, runs the
//!   test executables again as the unprivileged user.

mod ci;
mod demo;
mod util;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci::run(&args[1..]),
        Some("demo") => demo::run(),
        Some(other) => bail!("unknown job {other:?}; jobs: ci, demo"),
        None => bail!("usage: cargo xtask <ci|demo>"),
    }
}
