//! The shared port-driver conformance suite against the slirp4netns driver, with a real
//! slirp4netns serving a tap device in the suite's namespace.

use std::io;
use std::net::Ipv4Addr;

#[path = "support/slirp.rs"]
mod slirp;

use rkport_core::conformance::Namespace;
use rkport_core::PortDriver;
use rkport_slirp4netns::Slirp4netnsDriver;
use slirp::Slirp;

/// The namespace's tap address for slirp4netns's default CIDR.
const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

/// Creates and configures tap0 inside the namespace, as the launcher does for slirp4netns.
fn add_tap(ns: &mut Namespace) -> io::Result<()> {
    let tap = TAP_IP.to_string() + "/24";
    let steps: [&[&str]; 4] = [
        &["ip", "tuntap", "add", "name", "tap0", "mode", "tap"],
        &["ip", "link", "set", "tap0", "up"],
        &["ip", "addr", "add", &tap, "dev", "tap0"],
        &["ip", "route", "add", "default", "via", "10.0.2.2"],
    ];
    steps.iter().try_for_each(|argv| ns.run(argv))
}

fn slirp4netns_driver(ns: &mut Namespace) -> Box<dyn PortDriver> {
    add_tap(ns).expect("tap0 inside the namespace");
    let slirp = Slirp::start(ns.pid(), &[]).expect("slirp4netns started");
    let driver = Slirp4netnsDriver::new(&slirp.socket, TAP_IP);
    ns.keep(slirp);
    Box::new(driver)
}

rkport_core::conformance_suite! {
    namespace_side: None,
    driver: slirp4netns_driver,
}
