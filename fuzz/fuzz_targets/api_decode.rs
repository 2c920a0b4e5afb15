//! Fuzzes the `POST /v1/ports` body decoder (`rkport_api::decode_port_spec`).
//!
//! Any body may be refused, but none may panic; libFuzzer's `-timeout` and `-rss_limit_mb`
//! catch unbounded time or memory. An accepted spec must be valid, and its own JSON must decode
//! back to it, through the API decoder and through serde.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rkport_core::PortSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = rkport_api::decode_port_spec(data) else {
        return;
    };
    let body = String::from_utf8_lossy(data);

    if let Err(e) = spec.validate() {
        panic!("{body:?} decoded to {spec:?}, which fails validation: {e}");
    }

    let json = serde_json::to_vec(&spec).expect("a spec always serialises");
    let shown = String::from_utf8_lossy(&json);
    assert_eq!(
        rkport_api::decode_port_spec(&json),
        Ok(spec),
        "{body:?} re-encoded as {shown}"
    );
    match serde_json::from_slice::<PortSpec>(&json) {
        Ok(back) => assert_eq!(back, spec, "{body:?} re-encoded as {shown}"),
        Err(e) => panic!("{body:?} re-encoded as {shown} does not decode: {e}"),
    }
});
