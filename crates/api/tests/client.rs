//! The client against our server: the `PortDriver` contract over HTTP.

mod common;

use std::error::Error;
use std::io::{Read, Write};
use std::sync::Arc;

use rkport_api::{Client, ClientError};
use rkport_core::{PortDriver, PortSpec, Proto};

use common::{start, start_table, TABLE_DRIVER};

type TestResult = Result<(), Box<dyn Error>>;

#[test]
fn add_list_remove_round_trip() -> TestResult {
    let fx = start_table()?;
    let client = Client::new(&fx.path);

    assert!(client.list_ports()?.is_empty());
    let spec: PortSpec = "127.0.0.1:18080:80/tcp".parse()?;
    let first = client.add_port(&spec)?;
    assert_eq!((first.id, first.spec), (1, spec));
    let udp = client.add_port(&"[::1]:18081:[::1]:81/udp6".parse()?)?;
    assert_eq!(udp.id, 2);

    assert_eq!(client.list_ports()?, vec![first.clone(), udp.clone()]);
    client.remove_port(1)?;
    assert_eq!(client.list_ports()?, vec![udp]);
    Ok(())
}

#[test]
fn server_messages_come_back_verbatim() -> TestResult {
    let fx = start_table()?;
    let client = Client::new(&fx.path);
    let spec = PortSpec::new(Proto::Tcp, 18080, 80);
    client.add_port(&spec)?;

    let conflict = client.add_port(&spec).unwrap_err();
    assert_eq!(conflict.to_string(), "conflict with ID 1");
    let unknown = client.remove_port(999).unwrap_err();
    assert_eq!(unknown.to_string(), "unknown id: 999");
    Ok(())
}

#[test]
fn info_and_driver_info() -> TestResult {
    let fx = start_table()?;
    let client = Client::new(&fx.path);
    let info = client.info()?;
    assert_eq!(info.api_version, "1.1.1");
    assert_eq!(info.child_pid, 4242);
    assert_eq!(PortDriver::info(&client)?.driver, TABLE_DRIVER);

    let none = start(None)?;
    let client = Client::new(&none.path);
    assert!(client.info()?.port_driver.is_none());
    let err = PortDriver::info(&client).unwrap_err();
    assert_eq!(err.to_string(), "no PortDriver is available");
    let err = client.list_ports().unwrap_err();
    assert_eq!(err.to_string(), "no PortDriver is available");
    Ok(())
}

#[test]
fn connection_failures_name_the_socket() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("api.sock");
    let err = Client::new(&path).info().unwrap_err();
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");

    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path)?);
    let text = Client::new(&path).list_ports().unwrap_err().to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains("refused"),
        "{text}"
    );
    Ok(())
}

#[test]
fn non_api_errors_show_status_and_body() -> TestResult {
    // A server that answers everything like Go's http.NotFound.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte)? == 1 {
            head.push(byte[0]);
        }
        conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 19\r\nConnection: close\r\n\r\n404 page not found\n",
        )
    });

    let err = Client::new(&path).info().unwrap_err();
    server.join().expect("server thread")?;
    assert_eq!(
        err.to_string(),
        r#"unexpected HTTP status 404 Not Found, body="404 page not found\n""#
    );
    Ok(())
}

#[test]
fn concurrent_clients_get_distinct_ids() -> TestResult {
    let fx = start_table()?;
    let client = Arc::new(Client::new(&fx.path));
    let threads: Vec<_> = (0..8u16)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || client.add_port(&PortSpec::new(Proto::Tcp, 18100 + i, 80)))
        })
        .collect();
    let mut ids = Vec::new();
    for thread in threads {
        ids.push(thread.join().expect("client thread")?.id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    assert_eq!(client.list_ports()?.len(), 8);
    Ok(())
}
