//! Test fixtures: a bookkeeping-only port driver, a server on a temporary socket, raw HTTP.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rkport_api::{ApiServer, ApiState, Info, NetworkDriverInfo, API_VERSION};
use rkport_core::{DriverInfo, PortDriver, PortError, PortId, PortSpec, PortStatus, PortTable};
use rkport_core::{Proto, Transport};

/// Records ports in a [`PortTable`] without opening sockets; refuses sctp like builtin.
#[derive(Debug, Default)]
pub struct TableDriver {
    table: Mutex<PortTable<()>>,
}

pub const TABLE_DRIVER: &str = "table";

impl PortDriver for TableDriver {
    fn info(&self) -> Result<DriverInfo, PortError> {
        Ok(DriverInfo {
            driver: TABLE_DRIVER.into(),
            protos: vec![
                Proto::Tcp,
                Proto::Tcp4,
                Proto::Tcp6,
                Proto::Udp,
                Proto::Udp4,
                Proto::Udp6,
            ],
            disallow_loopback_child_ip: false,
        })
    }

    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        if spec.proto.transport() == Transport::Sctp {
            return Err(PortError::UnsupportedProto {
                proto: spec.proto,
                driver: TABLE_DRIVER.into(),
            });
        }
        let mut table = self.table.lock().unwrap();
        table.check(spec)?;
        Ok(table.insert(*spec, ()))
    }

    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        Ok(self.table.lock().unwrap().list())
    }

    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        self.table.lock().unwrap().remove(id).map(|_| ())
    }
}

/// A server on `<tempdir>/api.sock`; the directory goes with it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub server: ApiServer,
}

pub fn info(dir: &std::path::Path) -> Info {
    Info {
        api_version: API_VERSION.into(),
        version: "0.1.0".into(),
        state_dir: dir.display().to_string(),
        child_pid: 4242,
        network_driver: Some(NetworkDriverInfo {
            driver: "slirp4netns".into(),
            dns: vec!["10.0.2.3".parse().unwrap()],
            child_ip: Some("10.0.2.100".parse().unwrap()),
            dynamic_child_ip: false,
            error: None,
        }),
        port_driver: None,
    }
}

pub fn start(driver: Option<Arc<dyn PortDriver>>) -> io::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("api.sock");
    let state = ApiState {
        driver,
        info: info(dir.path()),
    };
    let server = ApiServer::start(&path, state)?;
    Ok(Fixture { dir, path, server })
}

pub fn start_table() -> io::Result<Fixture> {
    start(Some(Arc::new(TableDriver::default())))
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub fn raw(path: &std::path::Path, method: &str, target: &str, body: &[u8]) -> io::Result<Raw> {
    let mut stream = UnixStream::connect(path)?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: rootlesskit\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    parse(&answer)
}

pub fn parse(answer: &[u8]) -> io::Result<Raw> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = std::str::from_utf8(&answer[..end]).map_err(|_| bad("head not utf-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Raw {
        status,
        headers,
        body: answer[end + 4..].to_vec(),
    })
}
