//! The `rootlesskit` command line: flags of RootlessKit 1.1.0, mapped onto
//! [`rkport_launcher::LaunchConfig`].
//!
//! RootlessKit parses flags with Go's `flag` package, so scripts use single-dash long flags
//! (`-port-driver=builtin`), `--flag=false` for booleans, and flags end at the first argument
//! that is not one. [`split_args`] rewrites that syntax into what clap expects and cuts the
//! command off before clap sees it. Every flag of 1.1.0's `--help` is accepted; those this
//! implementation does not support are refused by name when given a non-default value, never
//! ignored.

use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use rkport_core::PortSpec;
use rkport_launcher::{LaunchConfig, NetworkMode, PortDriverKind};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Prefix of every error line, as RootlessKit prints it.
const ERROR_PREFIX: &str = "[rootlesskit:parent] error:";

/// Printed when a non-host network runs without `--disable-host-loopback` (RootlessKit's
/// warning).
const HOST_LOOPBACK_WARNING: &str = "specifying --disable-host-loopback is highly recommended to \
    prohibit connecting to 127.0.0.1:* on the host namespace (requires slirp4netns or VPNKit)";

/// Default of `--lxc-user-nic-binary` in RootlessKit 1.1.0 as packaged (empty: `--help` shows
/// no default and `--net=lxc-user-nic` then fails to exec `""`).
const LXC_USER_NIC_BINARY: &str = "";

/// The values of RootlessKit's three-state flags (`--reaper`, `--slirp4netns-sandbox`, ...).
const TRI_STATE: &[&str] = &["auto", "true", "false"];

/// Flags that take no value (Go booleans: `--flag` or `--flag=false`, never `--flag false`).
const BOOL_FLAGS: &[&str] = &[
    "debug",
    "disable-host-loopback",
    "ipv6",
    "pidns",
    "cgroupns",
    "utsns",
    "ipcns",
    "help",
    "h",
    "version",
    "v",
];

/// Flags that take a value.
const VALUE_FLAGS: &[&str] = &[
    "copy-up",
    "copy-up-mode",
    "propagation",
    "net",
    "mtu",
    "cidr",
    "ifname",
    "lxc-user-nic-binary",
    "lxc-user-nic-bridge",
    "slirp4netns-binary",
    "slirp4netns-sandbox",
    "slirp4netns-seccomp",
    "vpnkit-binary",
    "port-driver",
    "publish",
    "p",
    "reaper",
    "evacuate-cgroup2",
    "state-dir",
    "subid-source",
];

/// `rootlesskit [FLAGS] COMMAND [ARGS...]`
#[derive(Debug, Parser)]
#[command(
    name = "rootlesskit",
    about = "Linux-native fakeroot using user namespaces, with RootlessKit-compatible port forwarding",
    override_usage = "rootlesskit [FLAGS] COMMAND [ARGS...]",
    long_about = "Runs COMMAND as root of a new user namespace, with a new mount namespace and, \
        unless --net=host, a new network namespace whose ports a port driver publishes on the \
        host. The REST API of RootlessKit listens on STATE_DIR/api.sock (see rootlessctl(1)).\n\n\
        Flags follow Go's syntax: -flag and --flag are the same, booleans take --flag=false, \
        and flags end at the first argument that is not one.",
    after_help = "Example: publish port 80 of a shell's network namespace on 127.0.0.1:8080\n  \
        rootlesskit --net=slirp4netns --disable-host-loopback --port-driver=builtin \\\n    \
        -p 127.0.0.1:8080:80/tcp sh",
    disable_version_flag = true,
    disable_help_flag = true
)]
pub struct Cli {
    /// Debug mode
    #[arg(long, help_heading = "Misc", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    debug: Option<bool>,
    /// Show help
    #[arg(short, long, help_heading = "Misc", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    help: Option<bool>,
    /// Print the version
    #[arg(short, long, help_heading = "Misc", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    version: Option<bool>,

    /// Mount a filesystem and copy-up the contents, e.g. "--copy-up=/etc" (typically required
    /// for non-host network)
    #[arg(long, help_heading = "Mount", value_name = "DIR")]
    copy_up: Vec<PathBuf>,
    /// copy-up mode [tmpfs+symlink]
    #[arg(long, help_heading = "Mount", default_value = "tmpfs+symlink")]
    copy_up_mode: String,
    /// mount propagation [rprivate, rslave]
    #[arg(long, help_heading = "Mount", default_value = "rprivate")]
    propagation: String,

    /// network driver [host, none, slirp4netns]
    #[arg(long, help_heading = "Network", default_value = "host")]
    net: String,
    /// MTU for non-host network (default: 65520 for slirp4netns)
    #[arg(long, help_heading = "Network", default_value_t = 0)]
    mtu: u32,
    /// CIDR for slirp4netns network (default: 10.0.2.0/24)
    #[arg(long, help_heading = "Network")]
    cidr: Option<String>,
    /// Network interface name (default: tap0 for slirp4netns)
    #[arg(long, help_heading = "Network")]
    ifname: Option<String>,
    /// prohibit connecting to 127.0.0.1:* on the host namespace
    #[arg(long, help_heading = "Network", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    disable_host_loopback: Option<bool>,
    /// enable IPv6 routing (not implemented)
    #[arg(long, help_heading = "Network", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    ipv6: Option<bool>,

    /// path of lxc-user-nic binary (not implemented)
    #[arg(
        long,
        help_heading = "Network [lxc-user-nic]",
        default_value = LXC_USER_NIC_BINARY,
        hide_default_value = true
    )]
    lxc_user_nic_binary: String,
    /// lxc-user-nic bridge name (not implemented)
    #[arg(
        long,
        help_heading = "Network [lxc-user-nic]",
        default_value = "lxcbr0"
    )]
    lxc_user_nic_bridge: String,
    /// path of slirp4netns binary
    #[arg(
        long,
        help_heading = "Network [slirp4netns]",
        default_value = "slirp4netns"
    )]
    slirp4netns_binary: PathBuf,
    /// enable slirp4netns sandbox [auto, false] (true is not implemented)
    #[arg(long, help_heading = "Network [slirp4netns]", default_value = "false")]
    slirp4netns_sandbox: String,
    /// enable slirp4netns seccomp [auto, false] (true is not implemented)
    #[arg(long, help_heading = "Network [slirp4netns]", default_value = "false")]
    slirp4netns_seccomp: String,
    /// path of VPNKit binary (not implemented)
    #[arg(long, help_heading = "Network [vpnkit]", default_value = "vpnkit")]
    vpnkit_binary: String,

    /// port driver [none, builtin, slirp4netns, socat (deprecated)]
    #[arg(long, help_heading = "Port", default_value = "none")]
    port_driver: String,
    /// publish ports, e.g. "127.0.0.1:8080:80/tcp"; repeatable
    #[arg(short, long, help_heading = "Port", value_name = "SPEC")]
    publish: Vec<String>,

    /// create a PID namespace (not implemented)
    #[arg(long, help_heading = "Process", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pidns: Option<bool>,
    /// create a cgroup namespace (not implemented)
    #[arg(long, help_heading = "Process", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    cgroupns: Option<bool>,
    /// create a UTS namespace (not implemented)
    #[arg(long, help_heading = "Process", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    utsns: Option<bool>,
    /// create an IPC namespace (not implemented)
    #[arg(long, help_heading = "Process", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    ipcns: Option<bool>,
    /// enable process reaper [auto, false] (true, which needs --pidns, is not implemented)
    #[arg(long, help_heading = "Process", default_value = "auto")]
    reaper: String,
    /// evacuate processes into the specified subgroup (not implemented)
    #[arg(long, help_heading = "Process", default_value = "")]
    evacuate_cgroup2: String,

    /// state directory (default: a new directory under $TMPDIR)
    #[arg(long, help_heading = "State")]
    state_dir: Option<PathBuf>,

    /// source of subids [auto, static]
    #[arg(long, help_heading = "SubID", default_value = "auto")]
    subid_source: String,
}

/// The clap definition of `rootlesskit`'s flags (for help, man pages and completions).
///
/// The command line itself goes through [`split_args`] first: clap alone does not know Go's
/// flag syntax.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Splits Go-style `rootlesskit` arguments into clap-ready flags and the command.
///
/// Flags end at the first argument that is not a flag (or after `--`); a known long flag
/// spelled with one dash becomes two; `-p` stays short.
///
/// # Errors
/// `flag provided but not defined: -NAME` for an unknown flag, as RootlessKit says it.
pub fn split_args(args: &[OsString]) -> anyhow::Result<(Vec<OsString>, Vec<OsString>)> {
    let mut flags = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            break;
        }
        if !text.starts_with('-') || text == "-" {
            return Ok((flags, std::iter::once(arg).chain(rest).cloned().collect()));
        }
        let body = text.trim_start_matches('-');
        let (name, value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };
        let dashes = if name.len() == 1 { "-" } else { "--" };
        if BOOL_FLAGS.contains(&name) {
            flags.push(normalized(dashes, name, value));
        } else if VALUE_FLAGS.contains(&name) {
            flags.push(normalized(dashes, name, value));
            if value.is_none() {
                let value = rest
                    .next()
                    .with_context(|| format!("flag needs an argument: -{name}"))?;
                flags.push(value.clone());
            }
        } else {
            bail!("flag provided but not defined: -{name}");
        }
    }
    Ok((flags, rest.cloned().collect()))
}

fn normalized(dashes: &str, name: &str, value: Option<&str>) -> OsString {
    match value {
        Some(value) => format!("{dashes}{name}={value}").into(),
        None => format!("{dashes}{name}").into(),
    }
}

/// Refuses a flag this implementation does not support when it has a non-default value.
fn refuse_unless(ok: bool, flag: &str, value: impl std::fmt::Display) -> anyhow::Result<()> {
    if !ok {
        bail!("--{flag}={value} is not supported by this implementation of rootlesskit");
    }
    Ok(())
}

/// Checks that `value` is one of upstream's `known` values for `flag`, then that it is one of
/// the `supported` ones.
fn check_choice(flag: &str, value: &str, known: &[&str], supported: &[&str]) -> anyhow::Result<()> {
    if !known.contains(&value) {
        bail!(
            "unknown value {value:?} for --{flag} (want one of {})",
            known.join(", ")
        );
    }
    refuse_unless(supported.contains(&value), flag, value)
}

impl Cli {
    fn check_unsupported(&self) -> anyhow::Result<()> {
        let yes = |flag: Option<bool>| flag.unwrap_or(false);
        refuse_unless(
            self.copy_up_mode == "tmpfs+symlink",
            "copy-up-mode",
            &self.copy_up_mode,
        )?;
        refuse_unless(!yes(self.ipv6), "ipv6", true)?;
        refuse_unless(!yes(self.pidns), "pidns", true)?;
        refuse_unless(!yes(self.cgroupns), "cgroupns", true)?;
        refuse_unless(!yes(self.utsns), "utsns", true)?;
        refuse_unless(!yes(self.ipcns), "ipcns", true)?;
        // Without --pidns there is nothing to reap: "false" is what "auto" does then.
        check_choice("reaper", &self.reaper, TRI_STATE, &["auto", "false"])?;
        refuse_unless(
            self.evacuate_cgroup2.is_empty(),
            "evacuate-cgroup2",
            &self.evacuate_cgroup2,
        )?;
        check_choice(
            "subid-source",
            &self.subid_source,
            &["auto", "dynamic", "static"],
            &["auto", "static"],
        )?;
        for (flag, value) in [
            ("slirp4netns-sandbox", &self.slirp4netns_sandbox),
            ("slirp4netns-seccomp", &self.slirp4netns_seccomp),
        ] {
            check_choice(flag, value, TRI_STATE, &["auto", "false"])?;
        }
        let lxc_binary = self.lxc_user_nic_binary == LXC_USER_NIC_BINARY;
        refuse_unless(lxc_binary, "lxc-user-nic-binary", &self.lxc_user_nic_binary)?;
        let lxc_bridge = self.lxc_user_nic_bridge == "lxcbr0";
        refuse_unless(lxc_bridge, "lxc-user-nic-bridge", &self.lxc_user_nic_bridge)?;
        refuse_unless(
            self.vpnkit_binary == "vpnkit",
            "vpnkit-binary",
            &self.vpnkit_binary,
        )
    }

    /// Builds the launch configuration, checking every flag.
    ///
    /// # Errors
    /// The first invalid or unsupported flag, or a `-p` spec that does not parse.
    pub fn into_config(self, command: Vec<OsString>) -> anyhow::Result<LaunchConfig> {
        self.check_unsupported()?;
        let publish = self
            .publish
            .iter()
            .map(|spec| spec.parse::<PortSpec>())
            .collect::<Result<Vec<_>, _>>()?;
        let config = LaunchConfig {
            command,
            state_dir: self.state_dir,
            net: self.net.parse()?,
            port_driver: self.port_driver.parse()?,
            publish,
            mtu: self.mtu,
            cidr: self.cidr.as_deref().map(str::parse).transpose()?,
            ifname: self.ifname,
            disable_host_loopback: self.disable_host_loopback.unwrap_or(false),
            slirp4netns_binary: self.slirp4netns_binary,
            copy_up: self.copy_up,
            propagation: self.propagation.parse()?,
            version: rkport_launcher::VERSION.to_owned(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Logs to stderr: `RUST_LOG` when set, else `info` (`debug` with `--debug`).
///
/// `RUST_LOG` is a list of `level` and `target=level` directives. The filter is
/// `Targets`, not `EnvFilter`: the latter links a regex engine that the parent and the child
/// would both keep mapped, for span and field filters nobody needs here.
///
/// tiny_http reports its listener being closed at shutdown as an error; that is expected
/// here, so its logs are off unless `RUST_LOG` names it.
fn init_tracing(debug: bool) {
    let default = if debug {
        "debug,tiny_http=off"
    } else {
        "info,tiny_http=off"
    };
    let parse = |spec: &str| spec.parse::<Targets>().ok();
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            let spec = match spec.contains("tiny_http") {
                true => spec,
                false => format!("{spec},tiny_http=off"),
            };
            parse(&spec)
        }
        _ => None,
    };
    let filter = filter.or_else(|| parse(default)).unwrap_or_default();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time();
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .try_init();
}

/// Whether `--debug` is among the flags (for the child, which does not parse them fully).
fn debug_requested(flags: &[OsString]) -> bool {
    flags
        .iter()
        .any(|flag| flag == OsStr::new("--debug") || flag == OsStr::new("--debug=true"))
}

/// The `rootlesskit` entry point.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if rkport_launcher::is_child() {
        let debug = split_args(&args).is_ok_and(|(flags, _)| debug_requested(&flags));
        init_tracing(debug);
        rkport_launcher::child_main();
    }
    match run(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(err) => {
            // One write(2) for the whole line (`eprintln!` makes one per piece), so that the
            // child's error, printed to the same stderr at the same time, cannot split it.
            let line = format!("{ERROR_PREFIX} {}\n", crate::error_text(&err));
            let _ = std::io::stderr().write_all(line.as_bytes());
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[OsString]) -> anyhow::Result<i32> {
    let (flags, program) = split_args(args)?;
    let cli = match Cli::try_parse_from(std::iter::once(OsString::from("rootlesskit")).chain(flags))
    {
        Ok(cli) => cli,
        Err(err) => bail!("{}", first_line(&err.to_string())),
    };
    if cli.help == Some(true) {
        command().print_help()?;
        return Ok(0);
    }
    if cli.version == Some(true) {
        println!("rootlesskit version {}", rkport_launcher::VERSION);
        return Ok(0);
    }
    init_tracing(cli.debug == Some(true));
    let config = cli.into_config(program)?;
    warn_about(&config);

    let running = rkport_launcher::start(config.clone())?;
    for warning in running.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        network_driver = %config.net,
        port_driver = %config.port_driver,
        api_socket = %running.api_socket().display(),
        "rootlesskit is running"
    );
    running.wait()
}

fn warn_about(config: &LaunchConfig) {
    if config.net == NetworkMode::Slirp4netns && !config.disable_host_loopback {
        tracing::warn!("{HOST_LOOPBACK_WARNING}");
    }
    if config.port_driver == PortDriverKind::Socat {
        tracing::warn!("{}", rkport_launcher::SOCAT_DEPRECATION);
    }
    if config.mtu != 0 && config.net != NetworkMode::Slirp4netns {
        tracing::warn!("--mtu has no effect with --net={}", config.net);
    }
}

/// Clap's message without its usage and help hints.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse(args: &[&str]) -> anyhow::Result<LaunchConfig> {
        let (flags, command) = split_args(&os(args))?;
        let cli = Cli::try_parse_from(std::iter::once(OsString::from("rootlesskit")).chain(flags))?;
        cli.into_config(command)
    }

    #[test]
    fn go_style_flags_and_command_split() {
        let (flags, command) = split_args(&os(&[
            "-port-driver=builtin",
            "--net",
            "slirp4netns",
            "-p",
            "127.0.0.1:8080:80/tcp",
            "-p=127.0.0.1:8081:81/tcp",
            "--debug=false",
            "sh",
            "-c",
            "--net=host",
        ]))
        .unwrap();
        assert_eq!(
            flags,
            os(&[
                "--port-driver=builtin",
                "--net",
                "slirp4netns",
                "-p",
                "127.0.0.1:8080:80/tcp",
                "-p=127.0.0.1:8081:81/tcp",
                "--debug=false"
            ])
        );
        assert_eq!(command, os(&["sh", "-c", "--net=host"]));
    }

    #[test]
    fn double_dash_ends_flags() {
        let (flags, command) = split_args(&os(&["--debug", "--", "-x"])).unwrap();
        assert_eq!(flags, os(&["--debug"]));
        assert_eq!(command, os(&["-x"]));
    }

    #[test]
    fn unknown_flag_is_named() {
        let err = split_args(&os(&["-bogus", "true"])).unwrap_err();
        assert_eq!(err.to_string(), "flag provided but not defined: -bogus");
    }

    #[test]
    fn config_from_flags() {
        let config = parse(&[
            "-net=slirp4netns",
            "-port-driver=builtin",
            "-p",
            "127.0.0.1:8080:80/tcp",
            "--disable-host-loopback",
            "-state-dir=/tmp/x",
            "true",
        ])
        .unwrap();
        assert_eq!(config.net, NetworkMode::Slirp4netns);
        assert_eq!(config.port_driver, PortDriverKind::Builtin);
        assert_eq!(config.publish.len(), 1);
        assert!(config.disable_host_loopback);
        assert_eq!(config.state_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(config.command, os(&["true"]));
    }

    #[test]
    fn boolean_false_is_a_value_not_a_command() {
        let config = parse(&["--disable-host-loopback=false", "true"]).unwrap();
        assert!(!config.disable_host_loopback);
        assert_eq!(config.command, os(&["true"]));
    }

    #[test]
    fn unsupported_flags_are_refused_by_name() {
        for (args, name) in [
            (&["--pidns", "true"][..], "--pidns=true"),
            (&["--reaper=true", "true"][..], "--reaper=true"),
            (
                &["--subid-source=dynamic", "true"][..],
                "--subid-source=dynamic",
            ),
            (
                &["--slirp4netns-sandbox=true", "true"][..],
                "--slirp4netns-sandbox=true",
            ),
            (&["--vpnkit-binary=/x", "true"][..], "--vpnkit-binary=/x"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.starts_with(name), "{err}");
        }
        let err = parse(&["--net=vpnkit", "true"]).unwrap_err().to_string();
        assert!(err.contains("vpnkit"), "{err}");
    }

    #[test]
    fn defaults_are_accepted() {
        let config = parse(&[
            "--pidns=false",
            "--reaper=auto",
            "--subid-source=static",
            "true",
        ]);
        assert!(config.is_ok());
    }

    #[test]
    fn publish_repeats_in_every_spelling() {
        let config = parse(&[
            "-net=slirp4netns",
            "-port-driver=builtin",
            "-p",
            "127.0.0.1:8080:80/tcp",
            "-p=127.0.0.1:8081:81/udp",
            "--publish",
            "127.0.0.1:8082:82/tcp",
            "-publish=127.0.0.1:8083:83/tcp",
            "true",
        ])
        .unwrap();
        let ports: Vec<u16> = config.publish.iter().map(|s| s.parent_port).collect();
        assert_eq!(ports, [8080, 8081, 8082, 8083]);
    }

    #[test]
    fn choices_are_checked_then_refused_by_name() {
        assert!(parse(&["--reaper=false", "true"]).is_ok());
        assert!(parse(&["--lxc-user-nic-binary=", "true"]).is_ok());
        assert!(parse(&["-slirp4netns-seccomp=auto", "true"]).is_ok());
        let err = parse(&["--reaper=maybe", "true"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown value \"maybe\" for --reaper (want one of auto, true, false)"
        );
        let err = parse(&["--slirp4netns-seccomp=true", "true"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--slirp4netns-seccomp=true is not supported by this implementation of rootlesskit"
        );
    }

    #[test]
    fn value_flag_needs_a_value() {
        let err = split_args(&os(&["--net"])).unwrap_err();
        assert_eq!(err.to_string(), "flag needs an argument: -net");
    }

    #[test]
    fn clap_definition_is_consistent() {
        command().debug_assert();
        for flag in BOOL_FLAGS.iter().chain(VALUE_FLAGS) {
            let known = command().get_arguments().any(|arg| {
                arg.get_long() == Some(flag)
                    || arg.get_short().map(String::from).as_deref() == Some(flag)
            });
            assert!(known, "{flag} is split but clap does not know it");
        }
    }

    #[test]
    fn bad_publish_spec_fails_before_start() {
        let err = parse(&["--net=none", "--port-driver=builtin", "-p", "bad", "true"]).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }
}
