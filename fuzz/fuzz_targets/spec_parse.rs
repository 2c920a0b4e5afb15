//! Fuzzes the port-spec parser (`PortSpec::from_str`).
//!
//! Any input may be refused, but none may panic. An accepted spec must be valid, print back to
//! a string that parses to the same spec, and survive a JSON round trip unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rkport_core::PortSpec;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(spec) = text.parse::<PortSpec>() else {
        return;
    };

    if let Err(e) = spec.validate() {
        panic!("{text:?} parsed to {spec:?}, which fails validation: {e}");
    }

    let printed = spec.to_string();
    assert_eq!(
        printed.parse::<PortSpec>(),
        Ok(spec),
        "{text:?} printed as {printed:?}"
    );

    let json = serde_json::to_string(&spec).expect("a spec always serialises");
    match serde_json::from_str::<PortSpec>(&json) {
        Ok(back) => assert_eq!(back, spec, "{text:?} as JSON {json}"),
        Err(e) => panic!("{text:?} as JSON {json} does not decode: {e}"),
    }
});
