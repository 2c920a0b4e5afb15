//! One conformance suite that every port driver passes, ours or a downstream one.
//!
//! The suite starts the driver's namespace side in a fresh user + network namespace (a
//! re-executed copy of the test binary, see [`Namespace`]), lets the driver crate build its
//! parent half, and then checks, for every proto the driver's `info` advertises among `tcp`,
//! `tcp4`, `tcp6`, `udp`, `udp4` and `udp6`:
//!
//! - two ports served at once, with echo servers inside on every address;
//! - for TCP, half-close reaching the server inside and its half-close coming back;
//! - listing and removing, and that a removed port's host address can be bound again;
//! - a conflicting spec refused with `conflict with ID n` and nothing added;
//!
//! and, once per driver, a 64 MiB TCP transfer checksummed end to end.
//!
//! A driver crate declares the suite in an integration test file, at the top level:
//!
//! ```ignore
//! rkport_core::conformance_suite! {
//!     // What runs inside the namespace on the driver channel, or `None`.
//!     namespace_side: Some(my_driver::helper::serve),
//!     // Builds the parent half; `ns` gives the namespace's pid and the channel.
//!     driver: |ns: &mut rkport_core::conformance::Namespace| {
//!         Box::new(my_driver::Driver::new(ns.take_driver_channel()).unwrap())
//!     },
//! }
//! ```
//!
//! The macro defines two tests: `conformance`, the suite, and
//! `rkport_conformance_namespace`, an ignored entry point that the suite re-executes inside the
//! namespace.

mod checks;
mod namespace;

pub use namespace::{namespace_main, Namespace, NamespaceSide, ENV};

use crate::driver::PortDriver;

/// Name of the entry test the suite re-executes; [`conformance_suite!`](crate::conformance_suite)
/// defines it.
pub const ENTRY: &str = "rkport_conformance_namespace";

/// Runs the suite. Called by [`conformance_suite!`](crate::conformance_suite).
///
/// # Panics
/// On the first failed check, with a message saying what was expected and what happened.
pub fn run(
    side: Option<NamespaceSide>,
    driver: impl FnOnce(&mut Namespace) -> Box<dyn PortDriver>,
) {
    let mut ns = Namespace::spawn(ENTRY, side.is_some())
        .unwrap_or_else(|e| panic!("cannot start the namespace side: {e}"));
    let driver = driver(&mut ns);
    checks::all(driver.as_ref(), &mut ns);
    drop(driver);

    let status = ns.finish().expect("waiting for the namespace side");
    assert!(status.success(), "namespace side exited with {status}");
}

/// Declares the conformance suite for a driver; see the [module docs](self).
#[macro_export]
macro_rules! conformance_suite {
    (namespace_side: $side:expr, driver: $driver:expr $(,)?) => {
        #[test]
        #[ignore = "namespace side of the conformance suite, started by the `conformance` test"]
        fn rkport_conformance_namespace() {
            $crate::conformance::namespace_main($side)
        }

        #[test]
        fn conformance() {
            $crate::conformance::run($side, $driver)
        }
    };
}
