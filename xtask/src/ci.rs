//! `cargo xtask ci`: set up the machine (as root), lint, test as root and as an ordinary user,
//! then run each fuzz target briefly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, have, is_root, output, run as sh};

/// The unprivileged user the tests run as a second time.
pub const TEST_USER: &str = "rkport-test";
/// Where that user's copy of the binaries and test executables goes.
const USER_DIR: &str = "/tmp/rkport-ci-user";
/// How long CI runs each fuzz target.
const FUZZ_SECONDS: u64 = 30;
/// Debian packages the tests use.
const PACKAGES: &[&str] = &[
    "slirp4netns",
    "socat",
    "uidmap",
    "iperf3",
    "iproute2",
    "python3",
    "curl",
    "netcat-openbsd",
    "util-linux",
    "procps",
    "passt",
    "nftables",
    "iptables",
    "rootlesskit",
];

pub fn run(args: &[String]) -> Result<()> {
    let root = is_root();
    if root {
        install_packages()?;
        create_test_user()?;
    } else {
        eprintln!("not root: skipping package installation and the unprivileged-user run");
    }
    if !args.iter().any(|a| a == "--no-lint") {
        sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The end-to-end tests start the built `rootlesskit` and `rootlessctl`; `cargo test` alone
    // builds only their unit-test harnesses.
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    sh(cargo().args(["test", "--workspace"]))?;
    // Tests marked ignored because they need upstream's `rootlessctl`, which CI installs.
    sh(cargo().args([
        "test",
        "-p",
        "rkport-api",
        "-p",
        "rkport-cli",
        "--",
        "--ignored",
    ]))?;
    crate::docs::run(&[])?;
    if root {
        test_as_user()?;
    }
    crate::fuzz::run_for(FUZZ_SECONDS)?;
    eprintln!("ci: all jobs passed");
    Ok(())
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    sh(Command::new("apt-get").arg("update").arg("-qq"))?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

/// Creates the test user with subordinate uid and gid ranges, and opens /dev/net/tun to it.
fn create_test_user() -> Result<()> {
    if !Command::new("id").arg(TEST_USER).output()?.status.success() {
        sh(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", TEST_USER]))?;
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        if !text
            .lines()
            .any(|l| l.starts_with(&format!("{TEST_USER}:")))
        {
            let mut text = text;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("{TEST_USER}:300000:65536\n"));
            fs::write(file, text).with_context(|| format!("writing {file}"))?;
        }
    }
    let tun = Path::new("/dev/net/tun");
    if tun.exists() {
        fs::set_permissions(tun, fs::Permissions::from_mode(0o666))?;
    }
    Ok(())
}

/// Copies the binaries and test executables where the test user can read them and runs every
/// test executable as that user, with a runtime dir of its own.
fn test_as_user() -> Result<()> {
    let executables = test_executables()?;
    let dir = PathBuf::from(USER_DIR);
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let (bin, tests, runtime) = (dir.join("bin"), dir.join("tests"), dir.join("run"));
    for d in [&dir, &bin, &tests, &runtime] {
        fs::create_dir_all(d)?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    sh(Command::new("chown")
        .arg(format!("{TEST_USER}:"))
        .arg(&runtime))?;
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700))?;

    let target = target_dir()?.join("debug");
    for name in ["rootlesskit", "rootlessctl"] {
        copy_executable(&target.join(name), &bin.join(name))?;
    }
    let mut failed = Vec::new();
    for (name, exe) in &executables {
        let copy = tests.join(name);
        copy_executable(exe, &copy)?;
        eprintln!("+ [{TEST_USER}] {name}");
        let status = Command::new("runuser")
            .args(["-u", TEST_USER, "--", "env", "-i"])
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!("HOME={}", runtime.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", runtime.display()))
            .arg(format!("RKPORT_BIN_DIR={}", bin.display()))
            .arg("RUST_BACKTRACE=1")
            .arg(&copy)
            .current_dir(&dir)
            .status()?;
        if !status.success() {
            failed.push(name.clone());
        }
    }
    if !failed.is_empty() {
        bail!("tests failed as {TEST_USER}: {}", failed.join(", "));
    }
    Ok(())
}

fn copy_executable(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn target_dir() -> Result<PathBuf> {
    let meta = output(cargo().args(["metadata", "--format-version=1", "--no-deps"]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta)?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// The test executables of the workspace, named `<target>-<hash>` as cargo names them.
fn test_executables() -> Result<Vec<(String, PathBuf)>> {
    let out = output(cargo().args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        if let Some(exe) = msg["executable"].as_str() {
            let exe = PathBuf::from(exe);
            let name = exe.file_name().unwrap().to_string_lossy().into_owned();
            found.push((name, exe));
        }
    }
    if found.is_empty() {
        bail!("cargo test --no-run produced no test executables");
    }
    if !have("runuser") {
        bail!("runuser (util-linux) is needed to run the tests as {TEST_USER}");
    }
    Ok(found)
}
