//! `cargo xtask fuzz [SECONDS]`: run every libFuzzer target of `fuzz/` for a while.
//!
//! Installs `cargo-fuzz` from crates.io when it is missing. `cargo fuzz` passes `-Z` flags to
//! rustc (sanitizers, coverage instrumentation), so it runs with `RUSTC_BOOTSTRAP=1` and works
//! on a stable toolchain. The targets run one after another.
//!
//! The checked-in seeds (`fuzz/corpus/<target>`) are only read: libFuzzer writes the inputs it
//! finds to the first corpus directory it is given, here `fuzz/target/corpus/<target>`, which is
//! ignored by git and kept between runs. A crash leaves its input in `fuzz/artifacts/<target>`
//! and fails the job.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{cargo, run as sh, workspace_root};

/// The fuzz targets, in the order they run, with the longest input libFuzzer builds for each:
/// enough for nesting past serde_json's recursion limit, and for the gate, request heads past
/// its 16 KiB limit.
const TARGETS: &[(&str, usize)] = &[
    ("spec_parse", 4096),
    ("api_decode", 4096),
    ("api_gate", 20_000),
];
/// How long each target runs when no duration is given.
const DEFAULT_SECONDS: u64 = 60;
/// libFuzzer's per-input limits: a slower or bigger input counts as a failure.
const INPUT_TIMEOUT_SECONDS: u64 = 10;
const RSS_LIMIT_MB: u64 = 2048;

pub fn run(args: &[String]) -> Result<()> {
    let seconds = match args {
        [] => DEFAULT_SECONDS,
        [s] => s
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("invalid duration {s:?}: want a number of seconds"))?,
        _ => bail!("usage: cargo xtask fuzz [SECONDS]"),
    };
    run_for(seconds)
}

/// Runs each target for `seconds`, failing on the first crash, timeout or memory blow-up.
pub fn run_for(seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    for &(target, max_len) in TARGETS {
        run_target(target, max_len, seconds)?;
    }
    eprintln!(
        "fuzz: no crash in {} targets, {seconds} s each",
        TARGETS.len()
    );
    Ok(())
}

fn run_target(target: &str, max_len: usize, seconds: u64) -> Result<()> {
    let root = workspace_root();
    let seeds = root.join("fuzz/corpus").join(target);
    let scratch = root.join("fuzz/target/corpus").join(target);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;

    // Debug assertions (overflow checks too) stay on in the optimised build.
    sh(cargo_fuzz()
        .args(["run", "--debug-assertions", target])
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-max_len={max_len}"))
        .arg("-print_final_stats=1"))
    .with_context(|| {
        format!("fuzz target {target} failed; the input is in fuzz/artifacts/{target}")
    })
}

/// `cargo fuzz`, run from the workspace root, allowed to pass `-Z` flags on stable.
fn cargo_fuzz() -> Command {
    let mut cmd = cargo();
    cmd.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    cmd
}

/// Installs cargo-fuzz with `cargo install --locked` unless `cargo fuzz` already works.
fn ensure_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_works() {
        return Ok(());
    }
    sh(cargo().args(["install", "cargo-fuzz", "--locked"]))
        .context("cannot install cargo-fuzz from crates.io")?;
    if !cargo_fuzz_works() {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz` does not run; is {} in PATH?",
            bin_dir()
        );
    }
    Ok(())
}

fn cargo_fuzz_works() -> bool {
    cargo_fuzz()
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where `cargo install` puts binaries, for the error message.
fn bin_dir() -> String {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    home.map_or_else(
        || "~/.cargo/bin".into(),
        |h| h.join("bin").display().to_string(),
    )
}
