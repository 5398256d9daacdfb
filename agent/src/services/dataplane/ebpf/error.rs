//! Errors of the eBPF service dataplane ([`EbpfLbError`]) and their conversion to the seam's
//! [`LbError`]. Each names the operation and the object (map and key, program and cgroup or
//! interface, path) and keeps aya's error with its errno.

use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError, sys::SyscallError};

use super::entries::EntryError;
use crate::services::lb::LbError;
use crate::shared::bpf::EbpfError;

/// Errors of the eBPF service dataplane.
#[derive(Debug, thiserror::Error)]
pub enum EbpfLbError {
    /// Loading the object or a program failed (see [`EbpfError`]).
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    /// A file-system operation on the pin directory or the cgroup failed.
    #[error("{operation} {path}")]
    Io {
        /// What was done (`"create pin directory"`, `"open cgroup"`, ...).
        operation: &'static str,
        /// The path.
        path: PathBuf,
        /// The error, with its errno.
        #[source]
        source: io::Error,
    },
    /// Attaching a socket program to the cgroup failed.
    #[error("attach program {program} to cgroup {cgroup}")]
    AttachCgroup {
        /// The program.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// aya's error, with the errno.
        #[source]
        source: Box<ProgramError>,
    },
    /// Pinning or unpinning a link failed.
    #[error("{operation} link {path}")]
    Link {
        /// `"pin"`, `"open pinned"`, `"unpin"` or `"convert"`.
        operation: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("{operation} map {map} key {key}")]
    Map {
        /// `"update"`, `"delete"`, `"lookup"` or `"iterate"`.
        operation: &'static str,
        /// The map.
        map: &'static str,
        /// The key, for humans.
        key: String,
        /// aya's error, with the errno.
        #[source]
        source: Box<MapError>,
    },
    /// A service cannot be programmed.
    #[error("service {frontend}")]
    Entry {
        /// The frontend.
        frontend: String,
        /// Why.
        #[source]
        source: EntryError,
    },
    /// A system query failed (network-namespace cookie, interface addresses, CPU count).
    #[error("{0}")]
    System(&'static str, #[source] io::Error),
}

pub(super) fn map_err(
    operation: &'static str,
    map: &'static str,
    key: impl std::fmt::Debug,
) -> impl FnOnce(MapError) -> EbpfLbError {
    move |source| EbpfLbError::Map {
        operation,
        map,
        key: format!("{key:?}"),
        source: Box::new(source),
    }
}

/// Whether a map error means "no such key" (deleting an absent key is fine: apply is
/// idempotent).
pub(super) fn not_found(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

impl From<EbpfLbError> for LbError {
    fn from(err: EbpfLbError) -> Self {
        match err {
            EbpfLbError::Entry { frontend, source } => LbError::Capacity {
                what: frontend,
                reason: source.to_string(),
            },
            EbpfLbError::Map {
                operation,
                map,
                key,
                source,
            } => LbError::Op {
                op: operation,
                object: format!("map {map} key {key}"),
                source,
            },
            other => LbError::Unavailable(error_chain(&other)),
        }
    }
}

/// An error with its sources, `: `-separated (for logs).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_common::service::MAP_SVC;

    #[test]
    fn not_found_recognises_enoent() {
        assert!(not_found(&MapError::KeyNotFound));
        assert!(not_found(&MapError::SyscallError(SyscallError {
            call: "bpf_map_delete_elem",
            io_error: io::Error::from_raw_os_error(libc::ENOENT),
        })));
        assert!(!not_found(&MapError::SyscallError(SyscallError {
            call: "bpf_map_update_elem",
            io_error: io::Error::from_raw_os_error(libc::E2BIG),
        })));
    }

    #[test]
    fn errors_convert_for_the_seam() {
        let err = EbpfLbError::Map {
            operation: "update",
            map: MAP_SVC,
            key: "10.96.0.1:80/TCP".into(),
            source: Box::new(MapError::KeyNotFound),
        };
        assert_eq!(
            err.to_string(),
            "update map TWL_LB_SVC key 10.96.0.1:80/TCP"
        );
        let lb: LbError = err.into();
        assert_eq!(
            lb.to_string(),
            "update map TWL_LB_SVC key 10.96.0.1:80/TCP: key not found"
        );
        let lb: LbError = EbpfLbError::Entry {
            frontend: "ClusterIP 10.96.0.1:80/TCP".into(),
            source: EntryError::IdOutOfRange { id: 0, max: 5 },
        }
        .into();
        assert!(matches!(lb, LbError::Capacity { .. }), "{lb}");
    }
}
