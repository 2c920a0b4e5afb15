//! The shared port-driver conformance suite against the socat driver, with real socat and
//! nsenter forwarding into the suite's namespace.

use rkport_core::conformance::Namespace;
use rkport_core::PortDriver;
use rkport_socat::SocatDriver;

rkport_core::conformance_suite! {
    namespace_side: None,
    driver: |ns: &mut Namespace| -> Box<dyn PortDriver> {
        Box::new(SocatDriver::new(ns.pid()).expect("socat and nsenter in PATH"))
    },
}
