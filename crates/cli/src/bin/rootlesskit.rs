//! `rootlesskit`: runs a command in new user, mount and network namespaces and publishes its
//! ports (see `rkport_cli::kit`).
//!
//! The same binary is re-executed as the namespace side ("child"); that case is recognised
//! first, before any thread exists.

fn main() -> std::process::ExitCode {
    // One malloc arena for every thread: the threads are many but allocate little, and each
    // extra arena would keep its own resident pages for the life of the process.
    #[cfg(target_env = "gnu")]
    // SAFETY: called before any thread exists; mallopt only sets an allocator parameter.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
    rkport_cli::kit::main()
}
