//! Clients that stall mid-request must not block the server for others, whatever answer their
//! request calls for: tiny_http reads an unread body to discard it when a request is answered,
//! so answering one on the dispatcher or the executor would wait for the stalled client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::start_table;
use rkport_api::server::MAX_IN_FLIGHT;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Guard against a hang; never an assertion on time.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn stall(path: &std::path::Path, head: &str) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(HANG_GUARD))?;
    s.write_all(head.as_bytes())?;
    Ok(s)
}

/// One request with the hang guard on the answer; its status line.
fn status_line(path: &std::path::Path, request: &str) -> std::io::Result<String> {
    let mut s = stall(path, request)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn a_stalled_oversized_body_does_not_block_the_executor() -> TestResult {
    let fx = start_table()?;
    // Over the body limit (answered 413 from the head alone), never sent.
    let mut stalled = stall(
        &fx.path,
        "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
    )?;
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head)?;
    assert_eq!(&head, b"HTTP/1.1 413");

    let get = "GET /v1/ports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(status_line(&fx.path, get)?, "HTTP/1.1 200 OK");
    Ok(())
}

#[test]
fn refusals_past_the_reader_limit_do_not_block_the_dispatcher() -> TestResult {
    let fx = start_table()?;
    let head = "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{";
    let _stalled: Vec<UnixStream> = (0..MAX_IN_FLIGHT + 10)
        .map(|_| stall(&fx.path, head))
        .collect::<Result<_, _>>()?;
    let body = r#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}"#;
    let post = format!(
        "POST /v1/ports HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(status_line(&fx.path, &post)?, "HTTP/1.1 201 Created");
    Ok(())
}
