//! The shared conformance suite, run against the builtin driver.

rkport_core::conformance_suite! {
    namespace_side: Some(rkport_builtin::helper::serve),
    driver: |ns: &mut rkport_core::conformance::Namespace| -> Box<dyn rkport_core::PortDriver> {
        let driver = rkport_builtin::BuiltinDriver::new(ns.take_driver_channel())
            .expect("builtin driver");
        Box::new(driver)
    },
}
