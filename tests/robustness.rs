//! Robustness of the built binaries: load through the builtin driver, faults of the server
//! inside, of slirp4netns and of rootlesskit itself, bad input on `api.sock`, and other users.
//!
//! Like tests/launcher.rs these run real namespaces and processes as whoever runs them (root,
//! and in CI an ordinary user with subordinate ids). The program inside the namespace is this
//! test executable itself, re-run in a role ([`ns`]). docs/robustness.md lists what is tried
//! and the figures seen.

mod robustness {
    pub mod bad_input;
    pub mod faults;
    pub mod lab;
    pub mod load;
    pub mod ns;
    pub mod security;
}
