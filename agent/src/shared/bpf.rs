//! User-space side of twill's eBPF programs: the embedded object and what loads it.
//!
//! Why it is shaped as it is:
//! - The object (`ebpf/twill-ebpf`, binary `twill-ebpf-progs`) is built by `agent/build.rs` with
//!   aya-build and embedded with `aya::include_bytes_aligned!`, so `twilld` is one file with no
//!   object to install or version separately, and CI exercises the whole toolchain path (nightly,
//!   `build-std`, bpf-linker, verifier) on every build.
//! - Each feature loads its own copy of the object ([`PacketCounter::attach`] per interface):
//!   maps are then per attachment, and dropping the owner detaches and frees everything. Nothing
//!   is pinned, so a crashed agent leaves no attachment behind (TCX links die with their last
//!   file descriptor) and there is never a stale attachment of ours to replace.
//! - Interfaces are named, and resolved in the network namespace of the calling thread: `twilld`
//!   runs under `nsenter --net=...`, and tests attach from a thread that did `setns`.
//! - One error type, [`EbpfError`], names the operation and the object (program, map, interface)
//!   and keeps aya's error, which keeps the errno and the verifier log. aya's errors are boxed:
//!   some are over 100 bytes (verifier log, netlink details) and would bloat every `Result`.
//! - Every load goes through [`loader`]. aya's loader parses the kernel's BTF
//!   (`/sys/kernel/btf/vmlinux`: ~5 MiB read, ~13 MiB parsed) for CO-RE relocations, and
//!   `Ebpf::load` parses it twice over; twill's programs carry no CO-RE relocation, so the parsed
//!   copy is dropped before the object is loaded instead of living through the load (about
//!   30 MiB less at the agent's start-up peak).

use std::sync::OnceLock;

use aya::{EbpfLoader, maps::MapError, programs::ProgramError};

/// Name of the embedded eBPF object (the binary target of `ebpf/twill-ebpf`), used in errors.
pub const OBJECT_NAME: &str = "twill-ebpf-progs";

/// The eBPF object embedded at build time (an ELF file for `bpfel`), 8-byte aligned as aya needs.
///
/// Empty when the agent was built with `AYA_BUILD_SKIP=1`; loaders then fail with
/// [`EbpfError::NotBuilt`].
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twill-ebpf-progs"))
}

/// Whether the embedded object has CO-RE relocations, which need the kernel's BTF (parsed once;
/// an object that does not parse says yes, and its load reports the error).
fn needs_kernel_btf() -> bool {
    static NEEDS: OnceLock<bool> = OnceLock::new();
    *NEEDS
        .get_or_init(|| aya_obj::Object::parse(object()).map_or(true, |o| o.has_btf_relocations()))
}

/// A loader for the embedded object: aya's, without the kernel BTF it parsed when the object
/// does not need it (see the module notes).
pub(crate) fn loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    if !needs_kernel_btf() {
        loader.btf(None);
    }
    loader
}

/// Errors from loading, attaching and reading twill's eBPF programs and maps.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The agent was built with `AYA_BUILD_SKIP=1`, so the embedded object is empty.
    #[error("eBPF object {object} was not built into this agent (AYA_BUILD_SKIP was set)")]
    NotBuilt {
        /// The object, [`OBJECT_NAME`].
        object: &'static str,
    },
    /// Parsing the object, creating its maps or relocating its programs failed.
    #[error("load eBPF object {object}")]
    Load {
        /// The object, [`OBJECT_NAME`].
        object: &'static str,
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The object has no program or map of that name: the agent and the object disagree (a build
    /// bug; names are shared through `twill-common`).
    #[error("eBPF object {object} has no {kind} {name}")]
    Missing {
        /// The object, [`OBJECT_NAME`].
        object: &'static str,
        /// `"program"` or `"map"`.
        kind: &'static str,
        /// The program or map name.
        name: &'static str,
    },
    /// A program could not be used as the expected type or loaded (verified) into the kernel.
    #[error("{operation} program {program}")]
    Program {
        /// What was done: `"convert"` (to the expected program type) or `"load"`.
        operation: &'static str,
        /// The program name.
        program: &'static str,
        /// aya's error; for `"load"` it carries the errno and the verifier log.
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching a program to an interface failed (no such interface in the calling thread's
    /// network namespace, or the kernel refused the TCX link).
    #[error("attach program {program} to {ifname} at tc {direction}")]
    Attach {
        /// The program name.
        program: &'static str,
        /// The interface name.
        ifname: String,
        /// `"ingress"` or `"egress"`.
        direction: &'static str,
        /// aya's error, with the errno.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map could not be opened as the expected type.
    #[error("open map {map}")]
    OpenMap {
        /// The map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// Reading a map slot failed.
    #[error("read map {map} slot {slot} (attached to {ifname})")]
    ReadMap {
        /// The map name.
        map: &'static str,
        /// The slot (array index) read.
        slot: u32,
        /// The interface the map's programs are attached to.
        ifname: String,
        /// aya's error, with the errno.
        #[source]
        source: Box<MapError>,
    },
}

/// The program `program` of the loaded twill object as the type `T` the caller attaches it as;
/// [`EbpfError::Missing`] or a `"convert"` [`EbpfError::Program`] when the object disagrees.
pub fn program_mut<'a, T>(
    ebpf: &'a mut aya::Ebpf,
    program: &'static str,
) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(EbpfError::Missing {
            object: OBJECT_NAME,
            kind: "program",
            name: program,
        })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            operation: "convert",
            program,
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `EM_BPF` in the ELF header's `e_machine` field.
    const EM_BPF: u16 = 247;

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    }

    /// Checks, without root, that the build embedded a little-endian BPF ELF object with the
    /// program and map names user space looks up.
    #[test]
    fn embedded_object_is_bpf_elf_with_our_names() {
        let object = object();
        if object.is_empty() {
            assert!(
                std::env::var_os("AYA_BUILD_SKIP").is_some(),
                "embedded eBPF object is empty but AYA_BUILD_SKIP is not set"
            );
            return;
        }
        assert_eq!(&object[..4], b"\x7fELF", "not an ELF file");
        assert_eq!(object[4], 2, "not ELF64");
        assert_eq!(object[5], 1, "not little-endian");
        assert_eq!(u16::from_le_bytes([object[18], object[19]]), EM_BPF);
        assert_eq!(
            object.as_ptr().align_offset(8),
            0,
            "object not 8-byte aligned"
        );
        for name in [
            twill_common::counter::PROG_INGRESS,
            twill_common::counter::PROG_EGRESS,
            twill_common::counter::MAP,
        ] {
            assert!(contains(object, name), "{name} not found in the object");
        }
    }

    #[test]
    fn the_embedded_object_needs_no_kernel_btf() {
        // If a program starts using CO-RE, `loader` keeps the kernel BTF again: this test then
        // fails as a reminder that the start-up memory note in the module header is stale.
        if object().is_empty() {
            return;
        }
        assert!(!needs_kernel_btf());
    }

    #[test]
    fn errors_name_operation_and_object() {
        let err = EbpfError::Missing {
            object: OBJECT_NAME,
            kind: "map",
            name: "X",
        };
        assert_eq!(err.to_string(), "eBPF object twill-ebpf-progs has no map X");
        let err = EbpfError::Attach {
            program: "p",
            ifname: "eth0".into(),
            direction: "ingress",
            source: Box::new(ProgramError::NotLoaded),
        };
        assert_eq!(err.to_string(), "attach program p to eth0 at tc ingress");
        assert!(std::error::Error::source(&err).is_some());
    }
}
