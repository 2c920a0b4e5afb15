//! The [`PortDriver`] trait.

use crate::error::PortError;
use crate::spec::PortSpec;
use crate::status::{DriverInfo, PortId, PortStatus};

/// A manager of published ports: the parent-side half of a port driver.
///
/// Implementations are shared between the API server's threads, so every method takes `&self`
/// and must be safe to call concurrently. Methods block until the operation is complete: when
/// `add_port` returns, the port accepts connections; when `remove_port` returns, its listener
/// and every connection through it are closed, so the address can be bound again at once.
pub trait PortDriver: Send + Sync {
    /// Describes the driver: its name and the protos it forwards.
    ///
    /// # Errors
    /// Only drivers that ask a remote party (the API client) can fail here.
    fn info(&self) -> Result<DriverInfo, PortError>;

    /// Publishes `spec` and returns it with its new id.
    ///
    /// # Errors
    /// [`PortError::Spec`] for an invalid or conflicting spec, [`PortError::UnsupportedProto`] or
    /// [`PortError::Unsupported`] for what the driver cannot forward, and the bind failure
    /// otherwise. A failed add consumes no id and leaves nothing behind.
    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError>;

    /// Lists the published ports, in ascending id order.
    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError>;

    /// Unpublishes port `id`, closing its listener and its connections.
    ///
    /// # Errors
    /// [`PortError::UnknownId`] when no port has that id.
    fn remove_port(&self, id: PortId) -> Result<(), PortError>;
}

impl<T: PortDriver + ?Sized> PortDriver for std::sync::Arc<T> {
    fn info(&self) -> Result<DriverInfo, PortError> {
        (**self).info()
    }
    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        (**self).add_port(spec)
    }
    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        (**self).list_ports()
    }
    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        (**self).remove_port(id)
    }
}

impl<T: PortDriver + ?Sized> PortDriver for Box<T> {
    fn info(&self) -> Result<DriverInfo, PortError> {
        (**self).info()
    }
    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        (**self).add_port(spec)
    }
    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        (**self).list_ports()
    }
    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        (**self).remove_port(id)
    }
}
