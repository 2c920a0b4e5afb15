//! The server on the wire: status codes, exact bodies and headers, as upstream sends them.

mod common;

use std::error::Error;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use common::{raw, start, start_table};

type TestResult = Result<(), Box<dyn Error>>;

const SPEC: &[u8] = br#"{"proto":"tcp","parentIP":"127.0.0.1","parentPort":18080,"childPort":80}"#;

#[test]
fn socket_is_private_and_removed_on_shutdown() -> TestResult {
    let fx = start_table()?;
    let mode = std::fs::metadata(&fx.path)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    fx.server.shutdown();
    assert!(!fx.path.exists());
    fx.server.shutdown(); // idempotent
    Ok(())
}

#[test]
fn stale_socket_is_replaced_other_files_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&path)?); // stale: nobody listens
    let state = || rkport_api::ApiState {
        driver: None,
        info: common::info(dir.path()),
    };
    let server = rkport_api::ApiServer::start(&path, state())?;

    let live = rkport_api::ApiServer::start(&path, state()).unwrap_err();
    assert!(
        live.to_string().contains("another server is listening"),
        "{live}"
    );
    drop(server);

    std::fs::write(&path, "x")?;
    let err = rkport_api::ApiServer::start(&path, state()).unwrap_err();
    assert!(
        err.to_string().contains("exists and is not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path)?, b"x");
    Ok(())
}

#[test]
fn empty_list_is_null_and_lists_are_in_id_order() -> TestResult {
    let fx = start_table()?;
    let empty = raw(&fx.path, "GET", "/v1/ports", b"")?;
    assert_eq!((empty.status, empty.text().as_str()), (200, "null"));
    assert_eq!(empty.header("Content-Type"), Some("application/json"));

    for port in [18081, 18082, 18083] {
        let body = format!(r#"{{"proto":"udp","parentPort":{port},"childPort":80}}"#);
        assert_eq!(
            raw(&fx.path, "POST", "/v1/ports", body.as_bytes())?.status,
            201
        );
    }
    assert_eq!(raw(&fx.path, "DELETE", "/v1/ports/2", b"")?.status, 200);
    let list = raw(&fx.path, "GET", "/v1/ports", b"")?;
    assert_eq!(
        list.text(),
        r#"[{"id":1,"spec":{"proto":"udp","parentPort":18081,"childPort":80}},{"id":3,"spec":{"proto":"udp","parentPort":18083,"childPort":80}}]"#
    );
    Ok(())
}

#[test]
fn post_answers_201_with_the_status_and_400_on_conflict() -> TestResult {
    let fx = start_table()?;
    let created = raw(&fx.path, "POST", "/v1/ports", SPEC)?;
    assert_eq!(created.status, 201);
    assert_eq!(
        created.text(),
        r#"{"id":1,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":18080,"childPort":80}}"#
    );
    assert_eq!(created.header("Content-Type"), Some("application/json"));

    let conflict = raw(&fx.path, "POST", "/v1/ports", SPEC)?;
    assert_eq!(conflict.status, 400);
    assert_eq!(conflict.text(), "{\"message\":\"conflict with ID 1\"}\n");
    Ok(())
}

#[test]
fn post_decodes_like_go() -> TestResult {
    let fx = start_table()?;
    let body = br#"{"PROTO":"tcp","ParentPort":18090,"CHILDPORT":90,"unknown":1} {"trailing"#;
    let created = raw(&fx.path, "POST", "/v1/ports", body)?;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        created.text(),
        r#"{"id":1,"spec":{"proto":"tcp","parentPort":18090,"childPort":90}}"#
    );

    let cases: &[(&[u8], &str)] = &[
        (
            br#"{"proto":"tcp","parentPort":70000,"childPort":80}"#,
            "70000",
        ),
        (
            br#"{"proto":"tcp","parentPort":"80","childPort":80}"#,
            "parentPort",
        ),
        (
            br#"{"proto":"tcp","parentPort":80,"childPort":8.5}"#,
            "childPort",
        ),
        (
            br#"{"proto":"sctp","parentPort":80,"childPort":80}"#,
            "not supported",
        ),
        (b"", "empty request body"),
    ];
    for (body, want) in cases {
        let answer = raw(&fx.path, "POST", "/v1/ports", body)?;
        assert_eq!(answer.status, 400, "{}", answer.text());
        let message: rkport_api::ErrorBody = serde_json::from_slice(&answer.body)?;
        assert!(
            message.message.contains(want),
            "{:?} lacks {want:?}",
            message.message
        );
    }
    Ok(())
}

#[test]
fn delete_answers_empty_200_and_parses_ids_like_atoi() -> TestResult {
    let fx = start_table()?;
    raw(&fx.path, "POST", "/v1/ports", SPEC)?;

    let deleted = raw(&fx.path, "DELETE", "/v1/ports/+1", b"")?;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.header("Content-Length"), Some("0"));
    assert_eq!(deleted.header("Content-Type"), None);
    assert!(deleted.body.is_empty());

    let cases = [
        ("1", "{\"message\":\"unknown id: 1\"}\n"),
        ("-1", "{\"message\":\"unknown id: -1\"}\n"),
        (
            "abc",
            "{\"message\":\"bad id abc: invalid digit found in string\"}\n",
        ),
    ];
    for (id, want) in cases {
        let answer = raw(&fx.path, "DELETE", &format!("/v1/ports/{id}"), b"")?;
        assert_eq!((answer.status, answer.text().as_str()), (400, want));
    }
    Ok(())
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() -> TestResult {
    let fx = start_table()?;
    for path in ["/v1/foo", "/v2/info", "/v1/ports/", "/"] {
        let answer = raw(&fx.path, "GET", path, b"")?;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.text(), "404 page not found\n");
        assert_eq!(
            answer.header("Content-Type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(answer.header("X-Content-Type-Options"), Some("nosniff"));
    }
    for (method, path) in [
        ("PUT", "/v1/ports"),
        ("DELETE", "/v1/ports"),
        ("GET", "/v1/ports/5"),
        ("POST", "/v1/info"),
    ] {
        let answer = raw(&fx.path, method, path, b"")?;
        assert_eq!(answer.status, 405, "{method} {path}");
        assert_eq!(answer.header("Content-Length"), Some("0"));
        assert!(answer.body.is_empty());
    }
    Ok(())
}

#[test]
fn info_has_port_driver_from_the_driver() -> TestResult {
    let fx = start_table()?;
    let answer = raw(&fx.path, "GET", "/v1/info", b"")?;
    assert_eq!(answer.status, 200);
    let want = format!(
        r#"{{"apiVersion":"1.1.1","version":"0.1.0","stateDir":"{}","childPID":4242,"networkDriver":{{"driver":"slirp4netns","dns":["10.0.2.3"],"childIP":"10.0.2.100"}},"portDriver":{{"driver":"table","protos":["tcp","tcp4","tcp6","udp","udp4","udp6"]}}}}"#,
        fx.dir.path().display()
    );
    assert_eq!(answer.text(), want);
    Ok(())
}

#[test]
fn without_a_driver_port_calls_fail_and_info_has_no_port_driver() -> TestResult {
    let fx = start(None)?;
    let want = "{\"message\":\"no PortDriver is available\"}\n";
    for (method, path) in [
        ("GET", "/v1/ports"),
        ("POST", "/v1/ports"),
        ("DELETE", "/v1/ports/1"),
    ] {
        let answer = raw(&fx.path, method, path, SPEC)?;
        assert_eq!(
            (answer.status, answer.text().as_str()),
            (400, want),
            "{method}"
        );
    }
    let info = raw(&fx.path, "GET", "/v1/info", b"")?;
    assert!(!info.text().contains("portDriver"), "{}", info.text());
    Ok(())
}

#[test]
fn oversized_bodies_are_refused_and_the_server_keeps_serving() -> TestResult {
    let fx = start_table()?;
    let big = vec![b' '; 100_000];
    let answer = raw(&fx.path, "POST", "/v1/ports", &big)?;
    assert_eq!(answer.status, 413);
    assert!(answer.text().contains("too large"), "{}", answer.text());

    // A body announced as a terabyte and never sent: refused at once, nothing allocated.
    let mut liar = UnixStream::connect(&fx.path)?;
    liar.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    liar.write_all(
        b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{",
    )?;
    let mut answer = Vec::new();
    liar.read_to_end(&mut answer)?;
    assert_eq!(common::parse(&answer)?.status, 413);

    let chunked = b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
        Transfer-Encoding: chunked\r\n\r\n10000\r\n";
    let mut stream = UnixStream::connect(&fx.path)?;
    stream.write_all(chunked)?;
    stream.write_all(&vec![b' '; 0x10000])?;
    stream.write_all(b"\r\n10\r\n                \r\n0\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    assert_eq!(common::parse(&answer)?.status, 413);

    assert_eq!(raw(&fx.path, "POST", "/v1/ports", SPEC)?.status, 201);
    drop(liar);
    Ok(())
}

#[test]
fn keep_alive_connections_serve_several_requests() -> TestResult {
    let fx = start_table()?;
    let mut stream = UnixStream::connect(&fx.path)?;
    let post = format!(
        "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        SPEC.len()
    );
    stream.write_all(post.as_bytes())?;
    stream.write_all(SPEC)?;
    stream.write_all(b"GET /v1/ports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8(answer)?;
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.ends_with(r#"[{"id":1,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":18080,"childPort":80}}]"#), "{text}");
    Ok(())
}

#[test]
fn a_stalled_body_delays_only_its_own_request() -> TestResult {
    let fx = start_table()?;
    // Announce 2000 bytes (more than tiny_http buffers itself), send a few, then stall.
    let mut slow = UnixStream::connect(&fx.path)?;
    slow.write_all(
        b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{\"proto\"",
    )?;

    assert_eq!(raw(&fx.path, "POST", "/v1/ports", SPEC)?.status, 201);
    assert_eq!(raw(&fx.path, "GET", "/v1/info", b"")?.status, 200);

    // Finish the body: it is answered (with a conflict, the other request came first).
    let mut rest = r#":"tcp","parentIP":"127.0.0.1","parentPort":18080,"childPort":80}"#.to_owned();
    rest.push_str(&" ".repeat(2000 - b"{\"proto\"".len() - rest.len()));
    slow.write_all(rest.as_bytes())?;
    let mut head = [0u8; 12];
    slow.read_exact(&mut head)?;
    assert_eq!(&head, b"HTTP/1.1 400");
    Ok(())
}

#[test]
fn after_shutdown_clients_get_a_connection_error() -> TestResult {
    let fx = start_table()?;
    let client = rkport_api::Client::new(&fx.path);
    client.info()?;
    fx.server.shutdown();
    let err = rkport_api::Client::new(&fx.path).info().unwrap_err();
    assert!(
        err.to_string().contains("No such file or directory"),
        "{err}"
    );
    Ok(())
}
