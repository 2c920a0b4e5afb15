//! Project automation: `cargo xtask <job>`.
//!
//! - `demo`: builds the binaries and runs the main job: a command in a rootless namespace whose
//!   port, published with the builtin driver, a client on the host reaches.
//! - `ci`: everything CI runs. As root on a fresh machine it first installs the Debian packages
//!   the tests need and creates an unprivileged test user with subordinate id ranges; then it
//!   checks formatting and lints, runs every test as the invoking user and, when root, runs the
//!   test executables again as the unprivileged user, then runs each fuzz target for 30 s.
//! - `bench [--quick]`: the port-forwarding benchmark against upstream RootlessKit, pasta and
//!   the kernel; writes docs/benchmark.md and docs/bench.svg (see `bench.rs`).
//! - `docs [DIR]`: man pages and shell completions of both binaries from their clap
//!   definitions, into DIR (default `target/docs`).
//! - `fuzz [SECONDS]`: runs each fuzz target of `fuzz/` for SECONDS (60 by default), installing
//!   cargo-fuzz first if it is missing; fails if a target crashes.

mod bench;
mod ci;
mod demo;
mod docs;
mod fuzz;
mod util;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("ci") => ci::run(&args[1..]),
        Some("demo") => demo::run(),
        Some("docs") => docs::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some(other) => bail!("unknown job {other:?}; jobs: bench, ci, demo, docs, fuzz"),
        None => bail!("usage: cargo xtask <bench [--quick]|ci|demo|docs [DIR]|fuzz [SECONDS]>"),
    }
}
