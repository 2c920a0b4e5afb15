//! `rootlesskit`: runs a command in new user, mount and network namespaces and publishes its
//! ports (see `rkport_cli::kit`).
//!
//! The same binary is re-executed as the namespace side ("child"); that case is recognised
//! first, before any thread exists.

fn main() -> std::process::ExitCode {
    rkport_cli::kit::main()
}
