//! A recording fake of the maps ([`FakeLbMaps`]): ordered maps standing in for the BPF ones,
//! a log of every write in order, and an optional fault (the Nth write fails, with `EIO`, and
//! writes nothing) to test what a failed apply leaves behind. Used by the unit and golden
//! tests of this dataplane; needs no root and no kernel.

use std::collections::BTreeMap;
use std::io;

use aya::maps::MapError;
use aya::sys::SyscallError;
use twill_common::service::{BackendKey, BackendValue, MaglevTable, RevNatValue, SvcKey, SvcValue};

use super::{EbpfLbError, LbMaps, MapWrite};

/// Ordered maps recording what [`LbMaps::write`] did. See the module notes.
#[derive(Debug, Clone, Default)]
pub struct FakeLbMaps {
    /// `TWL_LB_SVC`.
    pub svc: BTreeMap<SvcKey, SvcValue>,
    /// `TWL_LB_BE`.
    pub backends: BTreeMap<BackendKey, BackendValue>,
    /// `TWL_LB_MAGLEV`.
    pub maglev: BTreeMap<u32, Box<MaglevTable>>,
    /// `TWL_LB_REVNAT`.
    pub revnat: BTreeMap<u32, RevNatValue>,
    /// `TWL_LB_CNT`: packets counted per service id since its last reset (tests add traffic
    /// as the kernel would; a reset removes the id).
    pub counts: BTreeMap<u32, u64>,
    /// Every write that succeeded, in order.
    pub log: Vec<MapWrite>,
    /// Writes attempted so far (failed ones included).
    attempts: usize,
    /// The 1-based attempt that fails, if any.
    fail_at: Option<usize>,
}

impl FakeLbMaps {
    /// Empty maps that never fail.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the `n`th write from now (1-based) fail with `EIO`; the ones after it succeed.
    pub fn fail_write(&mut self, n: usize) {
        self.fail_at = Some(self.attempts + n);
    }

    /// Takes the log of writes done so far.
    pub fn take_log(&mut self) -> Vec<MapWrite> {
        std::mem::take(&mut self.log)
    }
}

impl LbMaps for FakeLbMaps {
    fn write(&mut self, write: &MapWrite) -> Result<(), EbpfLbError> {
        self.attempts += 1;
        if self.fail_at == Some(self.attempts) {
            return Err(EbpfLbError::Map {
                operation: write.operation(),
                map: write.map(),
                key: write.key(),
                source: Box::new(MapError::SyscallError(SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: io::Error::from_raw_os_error(libc::EIO),
                })),
            });
        }
        match write {
            MapWrite::Backend { key, value } => {
                self.backends.insert(*key, *value);
            }
            MapWrite::Maglev { id, table } => {
                self.maglev.insert(*id, table.clone());
            }
            MapWrite::RevNat { id, value } => {
                self.revnat.insert(*id, *value);
            }
            MapWrite::Service { key, value } => {
                self.svc.insert(*key, *value);
            }
            MapWrite::ResetCounts { id } => {
                self.counts.remove(id);
            }
            MapWrite::DeleteBackend(key) => {
                self.backends.remove(key);
            }
            MapWrite::DeleteMaglev(id) => {
                self.maglev.remove(id);
            }
            MapWrite::DeleteRevNat(id) => {
                self.revnat.remove(id);
            }
            MapWrite::DeleteService(key) => {
                self.svc.remove(key);
            }
        }
        self.log.push(write.clone());
        Ok(())
    }

    fn services(&self) -> Result<Vec<(SvcKey, SvcValue)>, EbpfLbError> {
        Ok(self.svc.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn service(&self, key: &SvcKey) -> Result<Option<SvcValue>, EbpfLbError> {
        Ok(self.svc.get(key).copied())
    }

    fn revnat(&self, id: u32) -> Result<Option<RevNatValue>, EbpfLbError> {
        Ok(self.revnat.get(&id).copied())
    }

    fn backend(&self, key: &BackendKey) -> Result<Option<BackendValue>, EbpfLbError> {
        Ok(self.backends.get(key).copied())
    }

    fn backend_keys(&self) -> Result<Vec<BackendKey>, EbpfLbError> {
        Ok(self.backends.keys().copied().collect())
    }

    fn maglev_ids(&self) -> Result<Vec<u32>, EbpfLbError> {
        Ok(self.maglev.keys().copied().collect())
    }

    fn revnat_ids(&self) -> Result<Vec<u32>, EbpfLbError> {
        Ok(self.revnat.keys().copied().collect())
    }
}
