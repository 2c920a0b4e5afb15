//! Bad input on a real rootlesskit's `api.sock`: malformed and oversized requests get a 4xx
//! (or, for nonsense that is not HTTP, a closed connection) and the server keeps serving;
//! clients that stall half-way cannot block it for others.
//!
//! The API crate tests the same on a bare server (crates/api/tests/raw_http.rs:
//! `oversized_bodies_are_refused_and_the_server_keeps_serving`,
//! `a_stalled_body_delays_only_its_own_request`); here it goes through the launcher, the gate
//! in front of tiny_http, and many clients at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rkport_e2e::{api_request, describe, free_port, rootlessctl, Kit};

use super::lab::HANG_GUARD;

fn idle_kit() -> (tempfile::TempDir, Kit) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut kit = Kit::spawn(
        &tmp.path().join("s"),
        ["--net=none", "--port-driver=builtin", "sleep", "1000"],
    );
    kit.wait_ready();
    (tmp, kit)
}

/// Sends `bytes` as they are, half-closes, and returns the status of the answer, if any.
fn send_raw(socket: &Path, bytes: &[u8]) -> Option<u16> {
    let mut s = UnixStream::connect(socket).expect("connect api.sock");
    s.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    // The server may answer and close before everything is written.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    if let Err(e) = s.read_to_end(&mut answer) {
        let hung = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        assert!(!hung, "no answer nor close within {HANG_GUARD:?}");
    }
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

fn post(body: &str) -> Vec<u8> {
    format!(
        "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The API still answers, through rootlessctl too.
fn still_serving(socket: &Path, after: &str) {
    let (status, body) = api_request(socket, "GET", "/v1/info", None).expect("GET /v1/info");
    assert_eq!(status, 200, "after {after}: {body}");
    let listed = rootlessctl(socket, &["list-ports"]);
    assert!(
        listed.status.success(),
        "after {after}: {}",
        describe(&listed)
    );
}

#[test]
fn malformed_and_oversized_requests_get_4xx_and_the_api_keeps_serving() {
    let (_tmp, kit) = idle_kit();
    let socket = kit.api_socket();
    let huge = format!(
        "{{\"proto\":\"tcp\",\"pad\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        ("a 70 KiB body", post(&huge), Some(413)),
        ("broken JSON", post("{\"proto\": tcp"), Some(400)),
        ("JSON of the wrong types", post("{\"proto\":5,\"parentPort\":\"x\"}"), Some(400)),
        ("JSON that is not an object", post("[1,2,3]"), Some(400)),
        ("an invalid spec", post("{\"proto\":\"tcp\",\"parentPort\":80,\"childPort\":70000}"), Some(400)),
        ("a spec with a bad proto", post("{\"proto\":\"bogus\",\"parentPort\":8080,\"childPort\":80}"), Some(400)),
        ("a non-numeric id", b"DELETE /v1/ports/abc HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Some(400)),
        ("an unknown id", b"DELETE /v1/ports/999 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Some(400)),
        ("an unknown path", b"GET /v2/../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Some(404)),
        ("a wrong method", b"PUT /v1/info HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Some(405)),
        ("a garbage request line", b"\x00\x01\x02 nonsense\r\n\r\n".to_vec(), Some(400)),
        // The client ended its half mid-body: tiny_http closes without an answer.
        (
            "a body shorter than announced",
            b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"proto\"".to_vec(),
            None,
        ),
        (
            "bad chunk sizes",
            b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
            Some(400),
        ),
    ];
    for (what, bytes, want) in cases {
        let got = send_raw(&socket, &bytes);
        assert_eq!(got, want, "{what}");
        still_serving(&socket, what);
    }

    // No answer is owed to these; the server must just survive them.
    let endless_header = [
        b"GET /v1/info HTTP/1.1\r\nX-Long: ".as_slice(),
        &[b'a'; 1 << 20],
    ]
    .concat();
    let terabyte =
        b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{}".to_vec();
    for (what, bytes) in [
        ("a 1 MiB header line", endless_header),
        ("a 1 TB body", terabyte),
    ] {
        let mut s = UnixStream::connect(&socket).expect("connect");
        let _ = s.write_all(&bytes);
        drop(s);
        still_serving(&socket, what);
    }
}

/// Opens a connection and sends `bytes`, then stalls (keeps it open, sends nothing more).
fn stall(socket: &Path, bytes: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.write_all(bytes).expect("send the first half");
    s
}

#[test]
fn stalled_clients_cannot_block_the_api_for_others() {
    let (_tmp, kit) = idle_kit();
    let socket = kit.api_socket();
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(stall(&socket, b"GET /v1/in"));
        stalled.push(stall(
            &socket,
            b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{\"proto\":",
        ));
        stalled.push(stall(&socket, b""));
        stalled.push(stall(
            &socket,
            b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        ));
    }

    // Others are served meanwhile, port changes included.
    still_serving(&socket, "400 stalled clients");
    let port = free_port();
    let spec = format!("127.0.0.1:{port}:80/tcp");
    let added = rootlessctl(&socket, &["add-ports", &spec]);
    assert!(added.status.success(), "{}", describe(&added));
    let removed = rootlessctl(&socket, &["remove-ports", "1"]);
    assert!(removed.status.success(), "{}", describe(&removed));

    drop(stalled);
    still_serving(&socket, "the stalled clients left");
}
