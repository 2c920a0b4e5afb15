//! The `none` port driver: a network without port forwarding.
//!
//! `--port-driver=none` is RootlessKit's default. Upstream has no driver object at all in that
//! case, so its API answers every port request with `no PortDriver is available`. [`NoneDriver`]
//! reproduces that answer behind the [`PortDriver`] trait, which makes it the smallest complete
//! driver: the reference for the contract and a test double for code that only needs "a
//! driver".
//!
//! It forwards nothing, starts no process and opens no socket.
//!
//! ```
//! use rkport_core::{PortDriver, PortError, PortSpec};
//! use rkport_none::NoneDriver;
//!
//! let driver = NoneDriver;
//! assert_eq!(driver.info().unwrap().driver, rkport_none::NAME);
//! let spec: PortSpec = "127.0.0.1:8080:80/tcp".parse().unwrap();
//! assert!(matches!(driver.add_port(&spec), Err(PortError::NoDriver)));
//! ```

use rkport_core::{DriverInfo, PortDriver, PortError, PortId, PortSpec, PortStatus};

/// The driver name, as given to `--port-driver` and reported by `info`.
pub const NAME: &str = "none";

/// A port driver that publishes nothing.
///
/// Every port operation fails with [`PortError::NoDriver`]; [`info`](PortDriver::info) reports
/// the driver `none` with no protos. Stateless, so trivially thread-safe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoneDriver;

impl PortDriver for NoneDriver {
    fn info(&self) -> Result<DriverInfo, PortError> {
        Ok(DriverInfo {
            driver: NAME.to_owned(),
            protos: Vec::new(),
            disallow_loopback_child_ip: false,
        })
    }

    fn add_port(&self, _spec: &PortSpec) -> Result<PortStatus, PortError> {
        Err(PortError::NoDriver)
    }

    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        Err(PortError::NoDriver)
    }

    fn remove_port(&self, _id: PortId) -> Result<(), PortError> {
        Err(PortError::NoDriver)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rkport_core::Proto;

    use super::*;

    #[test]
    fn info_names_the_driver_and_no_protos() -> Result<(), PortError> {
        let info = NoneDriver.info()?;
        assert_eq!(info.driver, "none");
        assert!(info.protos.is_empty());
        assert!(!info.disallow_loopback_child_ip);
        Ok(())
    }

    #[test]
    fn every_port_operation_has_no_driver() {
        let spec = PortSpec::new(Proto::Tcp, 8080, 80);
        let err = NoneDriver.add_port(&spec).unwrap_err();
        assert_eq!(err.to_string(), "no PortDriver is available");
        assert!(matches!(NoneDriver.list_ports(), Err(PortError::NoDriver)));
        assert!(matches!(
            NoneDriver.remove_port(1),
            Err(PortError::NoDriver)
        ));
        assert!(matches!(
            NoneDriver.remove_port(-1),
            Err(PortError::NoDriver)
        ));
    }

    #[test]
    fn works_as_a_shared_trait_object() -> Result<(), PortError> {
        let driver: Arc<dyn PortDriver> = Arc::new(NoneDriver);
        let shared = Arc::clone(&driver);
        let name = std::thread::spawn(move || shared.info().map(|i| i.driver))
            .join()
            .expect("info thread panicked")?;
        assert_eq!(name, NAME);
        assert!(matches!(driver.list_ports(), Err(PortError::NoDriver)));
        Ok(())
    }
}
