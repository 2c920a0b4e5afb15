//! [`PortTable`]: the bookkeeping every driver shares.

use std::collections::BTreeMap;

use crate::error::{PortError, SpecError};
use crate::spec::PortSpec;
use crate::status::{PortId, PortStatus};

/// Published ports with their driver-specific state `T`, and the id counter.
///
/// Ids start at 1 and are never reused; a failed add consumes none. Not synchronised: a driver
/// keeps its table behind its own lock, held across check and insert so that two concurrent
/// adds of the same address cannot both pass the conflict check.
#[derive(Debug)]
pub struct PortTable<T> {
    next_id: PortId,
    ports: BTreeMap<PortId, (PortStatus, T)>,
}

impl<T> Default for PortTable<T> {
    fn default() -> Self {
        PortTable {
            next_id: 1,
            ports: BTreeMap::new(),
        }
    }
}

impl<T> PortTable<T> {
    /// Validates `spec` against the published ports.
    ///
    /// # Errors
    /// As [`PortSpec::validate_against`].
    pub fn check(&self, spec: &PortSpec) -> Result<(), SpecError> {
        spec.validate_against(self.ports.values().map(|(status, _)| status))
    }

    /// The id the next [`insert`](Self::insert) will assign.
    pub fn next_id(&self) -> PortId {
        self.next_id
    }

    /// Records a published port under the next id.
    pub fn insert(&mut self, spec: PortSpec, state: T) -> PortStatus {
        let status = PortStatus {
            id: self.next_id,
            spec,
        };
        self.next_id += 1;
        self.ports.insert(status.id, (status.clone(), state));
        status
    }

    /// Records a port under an id chosen elsewhere (slirp4netns assigns its own).
    pub fn insert_with_id(&mut self, id: PortId, spec: PortSpec, state: T) -> PortStatus {
        let status = PortStatus { id, spec };
        self.next_id = self.next_id.max(id + 1);
        self.ports.insert(id, (status.clone(), state));
        status
    }

    /// Forgets port `id` and hands back its state for teardown.
    ///
    /// # Errors
    /// [`PortError::UnknownId`].
    pub fn remove(&mut self, id: PortId) -> Result<(PortStatus, T), PortError> {
        self.ports.remove(&id).ok_or(PortError::UnknownId(id))
    }

    /// The published ports in ascending id order.
    pub fn list(&self) -> Vec<PortStatus> {
        self.ports.values().map(|(s, _)| s.clone()).collect()
    }

    /// The state of port `id`.
    pub fn get(&self, id: PortId) -> Option<&T> {
        self.ports.get(&id).map(|(_, t)| t)
    }

    /// Removes every port, in id order, handing back their states.
    pub fn drain(&mut self) -> Vec<(PortStatus, T)> {
        std::mem::take(&mut self.ports).into_values().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }
}
