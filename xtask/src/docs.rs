//! `cargo xtask docs [DIR]`: man pages and shell completions of `rootlesskit` and
//! `rootlessctl`, rendered from their clap definitions (`rkport_cli::kit::command`,
//! `rkport_cli::ctl::command`) with clap_mangen and clap_complete.
//!
//! Output goes to DIR (default `target/docs`):
//!
//! ```text
//! DIR/man/rootlesskit.1, rootlessctl.1, rootlessctl-<command>.1
//! DIR/completions/{bash,elvish,fish,powershell,zsh}/<completion files>
//! ```
//!
//! Every file written is checked to be non-empty, so CI can run this as a test.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap_complete::Shell;

/// Generates everything into `args[0]` or `target/docs`.
pub fn run(args: &[String]) -> Result<()> {
    let out = match args.first() {
        Some(dir) => PathBuf::from(dir),
        None => default_dir(),
    };
    let files = generate(&out)?;
    for file in &files {
        let len = fs::metadata(file)?.len();
        if len == 0 {
            bail!("{} is empty", file.display());
        }
    }
    eprintln!("docs: {} files in {}", files.len(), out.display());
    Ok(())
}

/// `$CARGO_TARGET_DIR/docs`, else `target/docs` of the workspace.
fn default_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("docs")
}

/// Writes the man pages and completions of both binaries; returns the files written.
fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let man = out.join("man");
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let mut files = Vec::new();
    for cmd in [rkport_cli::kit::command(), rkport_cli::ctl::command()] {
        let cmd = cmd.version(rkport_cli_version());
        files.extend(man_pages(&cmd, &man)?);
        files.extend(completions(&cmd, &out.join("completions"))?);
    }
    Ok(files)
}

fn rkport_cli_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `NAME.1` and one `NAME-SUBCOMMAND.1` per subcommand (clap_mangen's layout).
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    clap_mangen::generate_to(cmd.clone(), dir)
        .with_context(|| format!("man pages of {}", cmd.get_name()))?;
    let prefix = cmd.get_name();
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let ours = name == format!("{prefix}.1") || name.starts_with(&format!("{prefix}-"));
        if ours && name.ends_with(".1") {
            files.push(path);
        }
    }
    Ok(files)
}

/// One completion file per shell under `dir/<shell>/`.
fn completions(cmd: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for shell in [
        Shell::Bash,
        Shell::Elvish,
        Shell::Fish,
        Shell::PowerShell,
        Shell::Zsh,
    ] {
        let shell_dir = dir.join(shell.to_string());
        fs::create_dir_all(&shell_dir)?;
        let mut cmd = cmd.clone();
        let name = cmd.get_name().to_owned();
        let path = clap_complete::generate_to(shell, &mut cmd, name, &shell_dir)
            .with_context(|| format!("{shell} completion"))?;
        files.push(path);
    }
    Ok(files)
}
