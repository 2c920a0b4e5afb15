//! Requests whose framing the server will not take: bodies over the limit, heads over the limit,
//! bad `Content-Length`s. Each gets a 4xx with a `{"message":...}` body at once, on a fresh
//! connection as on a kept-alive one, nothing of them is kept, and the server keeps serving.
//!
//! The tests count the process's descriptors and threads, so they run one at a time.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::{parse, raw, start_table, Raw};
use rkport_api::server::{MAX_BODY, MAX_HEAD};
use rkport_api::ErrorBody;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Guard against a hang; never an assertion on time.
const HANG_GUARD: Duration = Duration::from_secs(10);

const SPEC: &[u8] = br#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":18080,"childPort":80}"#;

/// A head declaring 2 GiB, of which nothing is ever sent.
const TWO_GIB: &str = "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 2147483648\r\n\r\n";

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(HANG_GUARD))?;
    Ok(stream)
}

/// Sends `bytes` (without closing the sending half) and reads until the server closes.
fn exchange(path: &Path, bytes: &[u8]) -> std::io::Result<Raw> {
    let mut stream = connect(path)?;
    stream.write_all(bytes)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    parse(&answer)
}

/// Reads one answer (head and `Content-Length` body) from a connection that stays open.
fn read_one(stream: &mut UnixStream) -> std::io::Result<Raw> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(answer) = parse(&got) {
            let length: usize = answer
                .header("Content-Length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if answer.body.len() >= length {
                return Ok(answer);
            }
        }
        match stream.read(&mut buf)? {
            0 => return parse(&got),
            n => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Checks a 4xx from the gate or the server: status, JSON body naming `want`, and close.
fn assert_refused(answer: &Raw, status: u16, want: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    let body: ErrorBody = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {:?}", answer.text()));
    assert!(
        body.message.contains(want),
        "{:?} lacks {want:?}",
        body.message
    );
    assert!(answer.text().ends_with("}\n"), "{:?}", answer.text());
}

fn count(dir: &str) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(dir)?.count())
}

#[test]
fn a_two_gib_body_gets_413_and_nothing_is_kept() -> TestResult {
    let _serial = one_at_a_time();
    let fx = start_table()?;
    // Warm up whatever the server starts on first use.
    assert_eq!(raw(&fx.path, "GET", "/v1/info", b"")?.status, 200);
    assert_refused(&exchange(&fx.path, TWO_GIB.as_bytes())?, 413, "too large");
    let (fds, threads) = (count("/proc/self/fd")?, count("/proc/self/task")?);

    for round in 0..200 {
        let answer = exchange(&fx.path, TWO_GIB.as_bytes())?;
        assert_refused(&answer, 413, &format!("limit {MAX_BODY} bytes"));
        if round % 50 == 0 {
            assert_eq!(raw(&fx.path, "GET", "/v1/ports", b"")?.status, 200);
        }
    }
    assert_eq!(raw(&fx.path, "POST", "/v1/ports", SPEC)?.status, 201);

    // Threads that close connections may still be ending: wait (bounded) for the counts.
    // A leak per request would leave hundreds of descriptors or threads behind.
    let settled =
        |fds_now: usize, threads_now: usize| fds_now <= fds + 10 && threads_now <= threads + 10;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut fds_now, mut threads_now) = (count("/proc/self/fd")?, count("/proc/self/task")?);
    while !settled(fds_now, threads_now) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        (fds_now, threads_now) = (count("/proc/self/fd")?, count("/proc/self/task")?);
    }
    assert!(
        settled(fds_now, threads_now),
        "descriptors {fds} -> {fds_now}, threads {threads} -> {threads_now}"
    );
    Ok(())
}

#[test]
fn an_oversized_request_on_a_kept_alive_connection_gets_413() -> TestResult {
    let _serial = one_at_a_time();
    let fx = start_table()?;

    // One request answered, then an oversized one on the same connection.
    let mut stream = connect(&fx.path)?;
    stream.write_all(b"GET /v1/ports HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let first = read_one(&mut stream)?;
    assert_eq!((first.status, first.text().as_str()), (200, "null"));
    stream.write_all(TWO_GIB.as_bytes())?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    assert_refused(&parse(&rest)?, 413, "too large");

    // Sent together: tiny_http's answer first, then the gate's, then end of file.
    let pipelined = format!(
        "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}{TWO_GIB}",
        SPEC.len(),
        String::from_utf8_lossy(SPEC)
    );
    let mut stream = connect(&fx.path)?;
    stream.write_all(pipelined.as_bytes())?;
    let mut answers = Vec::new();
    stream.read_to_end(&mut answers)?;
    let text = String::from_utf8_lossy(&answers).into_owned();
    let second = text
        .find("HTTP/1.1 413")
        .ok_or(format!("no 413 in {text:?}"))?;
    assert!(text.starts_with("HTTP/1.1 201 Created\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert_refused(&parse(&text.as_bytes()[second..])?, 413, "too large");

    // The port of the first request was added; the server still serves.
    let list = raw(&fx.path, "GET", "/v1/ports", b"")?;
    assert!(list.text().contains("18080"), "{}", list.text());
    Ok(())
}

#[test]
fn bad_content_lengths_get_400() -> TestResult {
    let _serial = one_at_a_time();
    let fx = start_table()?;
    for lengths in [
        "Content-Length: abc\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: \r\n",
        "Content-Length: 2\r\nContent-Length: 3\r\n",
        "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let head = format!("POST /v1/ports HTTP/1.1\r\nHost: x\r\n{lengths}\r\n{{}}");
        let answer = exchange(&fx.path, head.as_bytes())?;
        assert_refused(&answer, 400, "malformed request");
    }
    assert_eq!(raw(&fx.path, "POST", "/v1/ports", SPEC)?.status, 201);
    Ok(())
}

#[test]
fn a_head_over_the_limit_gets_431() -> TestResult {
    let _serial = one_at_a_time();
    let fx = start_table()?;
    let head = format!(
        "GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(MAX_HEAD)
    );
    assert_refused(&exchange(&fx.path, head.as_bytes())?, 431, "head too large");

    // Just within the limit is served.
    let frame = "GET /v1/info HTTP/1.1\r\nConnection: close\r\nX-Pad: \r\n\r\n";
    let pad = "a".repeat(MAX_HEAD - frame.len());
    let head = format!("GET /v1/info HTTP/1.1\r\nConnection: close\r\nX-Pad: {pad}\r\n\r\n");
    assert_eq!(head.len(), MAX_HEAD);
    assert_eq!(exchange(&fx.path, head.as_bytes())?.status, 200);
    Ok(())
}

#[test]
fn chunked_bodies_are_decoded_and_held_to_the_limit() -> TestResult {
    let _serial = one_at_a_time();
    let fx = start_table()?;

    // Split anywhere, with an extension and a trailer, then another request on the connection.
    let (a, b) = SPEC.split_at(20);
    let mut request = format!(
        "POST /v1/ports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};note=1\r\n",
        a.len()
    )
    .into_bytes();
    request.extend_from_slice(a);
    request.extend_from_slice(format!("\r\n{:X}\r\n", b.len()).as_bytes());
    request.extend_from_slice(b);
    request.extend_from_slice(b"\r\n0\r\nX-Trailer: 1\r\n\r\n");
    request.extend_from_slice(b"GET /v1/ports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut stream = connect(&fx.path)?;
    stream.write_all(&request)?;
    let mut answers = Vec::new();
    stream.read_to_end(&mut answers)?;
    let text = String::from_utf8(answers)?;
    assert!(text.starts_with("HTTP/1.1 201 "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(
        text.ends_with(r#""parentPort":18080,"childPort":80}}]"#),
        "{text}"
    );

    // Over the limit in small chunks: refused once the sum passes it, whatever is still sent.
    let mut big =
        b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..=MAX_BODY / 4096 {
        big.extend_from_slice(b"1000\r\n");
        big.extend_from_slice(&[b' '; 4096]);
        big.extend_from_slice(b"\r\n");
    }
    let mut stream = connect(&fx.path)?;
    // The gate may close before all of it is written.
    let _ = stream.write_all(&big);
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    assert_refused(&parse(&answer)?, 413, "too large");

    for (what, body) in [
        ("bad size", "zz\r\n{}\r\n0\r\n\r\n"),
        ("no CRLF after data", "2\r\n{}}\r\n0\r\n\r\n"),
    ] {
        let request = format!(
            "POST /v1/ports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let answer = exchange(&fx.path, request.as_bytes())?;
        assert_eq!(answer.status, 400, "{what}: {}", answer.text());
    }
    let gzip = "POST /v1/ports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n";
    assert_refused(&exchange(&fx.path, gzip.as_bytes())?, 501, "gzip");
    assert_eq!(raw(&fx.path, "GET", "/v1/info", b"")?.status, 200);
    Ok(())
}
