//! Fuzzes the API gate's request reader (`rkport_api::read_requests`): the request heads and
//! body framing of every connection to `api.sock` go through it before the HTTP server sees
//! them.
//!
//! Any stream may be refused, but none may panic, and libFuzzer's `-timeout` and
//! `-rss_limit_mb` catch unbounded time or memory. A refusal is one of the gate's own statuses;
//! every request passed on has a complete head that the gate's own check accepts again, with a
//! `Content-Length` equal to the body passed with it (chunked bodies arrive decoded), within
//! the API's body limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rkport_api::GateRead;

fuzz_target!(|data: &[u8]| {
    let reads = rkport_api::read_requests(data);
    for (i, read) in reads.iter().enumerate() {
        match read {
            GateRead::Refused(status) => {
                assert!(
                    matches!(status, 400 | 413 | 431 | 501),
                    "request {i}: unexpected status {status}"
                );
                assert_eq!(i + 1, reads.len(), "nothing is read after a refusal");
            }
            GateRead::Forwarded { head, body } => {
                assert!(head.ends_with(b"\r\n\r\n"), "request {i}: incomplete head");
                assert!(body.len() <= 64 * 1024, "request {i}: body over the limit");
                assert_eq!(
                    rkport_api::head_body_length(head),
                    Some(body.len() as u64),
                    "request {i}: forwarded head {:?} does not frame its {}-byte body",
                    String::from_utf8_lossy(head),
                    body.len()
                );
            }
        }
    }
});
