//! Per-interface packet/byte counter: two TC programs (ingress, egress) on one interface.
//!
//! Why it is shaped as it is:
//! - It exists first to exercise the whole eBPF path (build, load, verify, attach, read) in CI;
//!   `twilld` attaches it to its VXLAN device `flannel.<VNI>` and exports
//!   `twill_vxlan_packets_total{direction="rx|tx"}` and the byte equivalent.
//! - Attachment is TCX (bpf links, Linux >= 6.6) placed first on the interface, so the counter sees
//!   every packet before any later program redirects or drops it; the programs never decide a
//!   verdict (they return `TCX_NEXT`). TCX links do not show in `tc filter show`; use
//!   `bpftool net show dev <ifname>`.
//! - The kernel keeps per-CPU totals; [`PacketCounter::read`] sums them (with [`sum_per_cpu`], the
//!   pure part). Totals start at zero on attach and only grow while attached, which is what a
//!   Prometheus counter expects; an agent restart is a counter reset.
//! - Reading goes through the [`CountSource`] trait so that the metrics code can be tested with a
//!   fake, without root.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use tracing::{debug, instrument, warn};
use twill_common::{PacketCount, counter};

use crate::shared::bpf::{EbpfError, OBJECT_NAME, object, program_mut};

/// Packet and byte totals of one interface since [`PacketCounter::attach`], summed over CPUs.
///
/// Bytes are `skb->len` as seen at TC, i.e. including the Ethernet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Packets received (TC ingress).
    pub rx_packets: u64,
    /// Bytes received (TC ingress).
    pub rx_bytes: u64,
    /// Packets sent (TC egress).
    pub tx_packets: u64,
    /// Bytes sent (TC egress).
    pub tx_bytes: u64,
}

impl Counts {
    /// Builds the totals from the summed rx (ingress) and tx (egress) slots.
    pub const fn from_slots(rx: PacketCount, tx: PacketCount) -> Self {
        Self {
            rx_packets: rx.packets,
            rx_bytes: rx.bytes,
            tx_packets: tx.packets,
            tx_bytes: tx.bytes,
        }
    }
}

/// Sums per-CPU copies of a counter, wrapping like the kernel side does.
pub(crate) fn sum_per_cpu(values: &[PacketCount]) -> PacketCount {
    values.iter().fold(PacketCount::default(), |sum, value| {
        sum.wrapping_add(*value)
    })
}

/// Something that reports an interface's packet counts: [`PacketCounter`], or a fake in tests.
pub trait CountSource {
    /// The interface counted.
    fn ifname(&self) -> &str;
    /// The current totals.
    fn counts(&self) -> Result<Counts, EbpfError>;
}

/// A packet/byte counter attached at TC ingress and egress of one interface.
///
/// Dropping it detaches both programs and frees the programs and the map. Needs Linux >= 6.6
/// (TCX) and `CAP_BPF` + `CAP_NET_ADMIN` (or root).
pub struct PacketCounter {
    ifname: String,
    /// Owns the programs and, through them, the links. Declared before `counts` so that Drop
    /// detaches the programs before the map goes (the kernel keeps the map alive either way).
    ebpf: Ebpf,
    counts: PerCpuArray<MapData, PacketCount>,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
}

impl std::fmt::Debug for PacketCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketCounter")
            .field("ifname", &self.ifname)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

/// The two programs, where each goes, and the direction's name in errors.
const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (counter::PROG_INGRESS, TcAttachType::Ingress, "ingress"),
    (counter::PROG_EGRESS, TcAttachType::Egress, "egress"),
];

impl PacketCounter {
    /// Loads a fresh copy of the embedded object and attaches its counters (TCX, first in line)
    /// at ingress and egress of `ifname`, an interface in the calling thread's network namespace.
    ///
    /// Either both programs are attached or, on error, none is.
    #[instrument(level = "debug", err)]
    pub fn attach(ifname: &str) -> Result<Self, EbpfError> {
        let bytes = object();
        if bytes.is_empty() {
            return Err(EbpfError::NotBuilt {
                object: OBJECT_NAME,
            });
        }
        let mut ebpf =
            crate::shared::bpf::loader()
                .load(bytes)
                .map_err(|source| EbpfError::Load {
                    object: OBJECT_NAME,
                    source: Box::new(source),
                })?;

        // On an early return, `ebpf` is dropped and detaches what was attached so far.
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for (program, attach_type, direction) in PROGRAMS {
            let prog: &mut SchedClassifier = program_mut(&mut ebpf, program)?;
            prog.load().map_err(|source| EbpfError::Program {
                operation: "load",
                program,
                source: Box::new(source),
            })?;
            let link = prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|source| EbpfError::Attach {
                    program,
                    ifname: ifname.to_owned(),
                    direction,
                    source: Box::new(source),
                })?;
            links.push((program, link));
        }

        let map = ebpf.take_map(counter::MAP).ok_or(EbpfError::Missing {
            object: OBJECT_NAME,
            kind: "map",
            name: counter::MAP,
        })?;
        let counts = PerCpuArray::try_from(map).map_err(|source| EbpfError::OpenMap {
            map: counter::MAP,
            source: Box::new(source),
        })?;
        debug!(ifname, "packet counter attached");
        Ok(Self {
            ifname: ifname.to_owned(),
            ebpf,
            counts,
            links,
        })
    }

    /// The interface the counter is attached to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Reads the totals since [`attach`](Self::attach), summed over CPUs.
    pub fn read(&self) -> Result<Counts, EbpfError> {
        let slot = |slot: u32| {
            self.counts
                .get(&slot, 0)
                .map(|per_cpu| sum_per_cpu(&per_cpu))
                .map_err(|source| EbpfError::ReadMap {
                    map: counter::MAP,
                    slot,
                    ifname: self.ifname.clone(),
                    source: Box::new(source),
                })
        };
        Ok(Counts::from_slots(
            slot(counter::SLOT_RX)?,
            slot(counter::SLOT_TX)?,
        ))
    }
}

impl CountSource for PacketCounter {
    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn counts(&self) -> Result<Counts, EbpfError> {
        self.read()
    }
}

impl Drop for PacketCounter {
    /// Detaches both programs explicitly so that a failure is logged; dropping `ebpf` afterwards
    /// would detach them anyway.
    fn drop(&mut self) {
        for (program, link) in self.links.drain(..) {
            let result = match self.ebpf.program_mut(program) {
                Some(prog) => match <&mut SchedClassifier>::try_from(prog) {
                    Ok(prog) => prog.detach(link),
                    Err(err) => Err(err),
                },
                None => continue,
            };
            match result {
                Ok(()) => debug!(ifname = %self.ifname, program, "packet counter detached"),
                Err(err) => warn!(
                    ifname = %self.ifname,
                    program,
                    error = &err as &dyn std::error::Error,
                    "detach packet counter"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn pc(packets: u64, bytes: u64) -> PacketCount {
        PacketCount { packets, bytes }
    }

    #[test]
    fn sums_per_cpu_values() {
        assert_eq!(sum_per_cpu(&[]), pc(0, 0));
        assert_eq!(sum_per_cpu(&[pc(1, 60)]), pc(1, 60));
        assert_eq!(sum_per_cpu(&[pc(1, 60), pc(0, 0), pc(4, 400)]), pc(5, 460));
    }

    #[test]
    fn sum_wraps_like_the_kernel() {
        assert_eq!(sum_per_cpu(&[pc(u64::MAX, 1), pc(2, u64::MAX)]), pc(1, 0));
    }

    #[test]
    fn counts_from_slots() {
        assert_eq!(
            Counts::from_slots(pc(1, 2), pc(3, 4)),
            Counts {
                rx_packets: 1,
                rx_bytes: 2,
                tx_packets: 3,
                tx_bytes: 4,
            }
        );
    }

    #[test]
    fn counter_is_send_and_sync() {
        // twilld shares it (in an `Arc`) with the metrics endpoint.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PacketCounter>();
    }
}
