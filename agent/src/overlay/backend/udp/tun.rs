//! The TUN edge: opening (or re-attaching to) `flannel0`, its offloads, and the two syscalls
//! the data path makes on it.
//!
//! The device is created with `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`:
//! - no packet-information prefix (flannel's framing has none: IP packet only);
//! - a virtio-net header on every packet, which is what lets the kernel hand over (and take)
//!   64 KiB GSO super-packets with partial checksums (`TUNSETOFFLOAD`, Linux ≥ 2.6.27 for TSO,
//!   ≥ 6.2 for USO);
//! - one queue (file descriptor) per worker; the kernel spreads flows over the queues by hash and
//!   sends a flow's replies to the queue its packets came in on, so no two workers ever share a
//!   queue (multi-queue TUN: Linux ≥ 3.8).
//!
//! It is made **persistent** (`TUNSETPERSIST`): a TUN device normally vanishes with the last
//! file descriptor, taking its address and the cluster route with it; pod-to-pod traffic would
//! then follow the default route out of the node, unencapsulated (and masqueraded with
//! `--ip-masq`), until the agent came back. Persistent, the device, its address and the route
//! stay through a crash or a restart; the kernel drops what it routes into the queue-less device
//! (counted as the device's `tx_dropped`) for the few hundred milliseconds until the new agent
//! re-attaches with the same flags — the same window a kernel VXLAN node has with no agent, and
//! nothing leaks. The cost: the device outlives twilld; deleting it is `ip link del flannel0`
//! (and a namespace's deletion removes it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::UdpError;

/// Flags of `flannel0`'s queues.
const TUN_FLAGS: libc::c_int =
    libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

/// The offloads the kernel accepted for the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`TUN_F_CSUM`).
    pub csum: bool,
    /// TCP segmentation, IPv4 (`TUN_F_TSO4`, with `TUN_F_TSO_ECN`).
    pub tso: bool,
    /// UDP segmentation (`TUN_F_USO4 | TUN_F_USO6`, Linux ≥ 6.2).
    pub uso: bool,
}

/// One queue of the TUN device: a non-blocking file descriptor.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
}

fn ifreq(name: &str, flags: libc::c_int) -> Result<libc::ifreq, UdpError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(UdpError::Config(format!(
            "TUN device name {name:?} must have 1 to 15 bytes"
        )));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).expect("TUN flags fit a short");
    Ok(ifr)
}

fn syscall_err(call: &'static str, object: &str) -> UdpError {
    UdpError::Syscall {
        call,
        object: object.to_string(),
        source: io::Error::last_os_error(),
    }
}

impl TunQueue {
    /// Opens `/dev/net/tun` and attaches a new queue of device `name`, creating the device if it
    /// does not exist. Fails with `EINVAL`/`EBUSY` when a device of that name exists with other
    /// flags (another kind of device, or a TUN without multi-queue).
    pub fn open(name: &str) -> Result<TunQueue, UdpError> {
        let ifr = ifreq(name, TUN_FLAGS)?;
        // SAFETY: a NUL-terminated path literal; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(syscall_err("open", "/dev/net/tun"));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads an ifreq; `ifr` lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw const ifr) } < 0 {
            return Err(syscall_err("ioctl TUNSETIFF", name));
        }
        let q = TunQueue { fd };
        // The default, said explicitly: the 10-byte virtio_net_hdr the core expects.
        let size: libc::c_int = 10;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(q.raw(), libc::TUNSETVNETHDRSZ, &raw const size) } < 0 {
            return Err(syscall_err("ioctl TUNSETVNETHDRSZ", name));
        }
        Ok(q)
    }

    /// Makes the device outlive this process (see the module notes).
    pub fn set_persist(&self, name: &str) -> Result<(), UdpError> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe { libc::ioctl(self.raw(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(syscall_err("ioctl TUNSETPERSIST", name));
        }
        Ok(())
    }

    /// Enables the richest set of offloads the kernel accepts: checksum + TSO + USO, else
    /// checksum + TSO, else none (plain packets, still with a virtio-net header).
    pub fn set_offloads(&self) -> Offloads {
        let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN;
        let uso = tso | libc::TUN_F_USO4 | libc::TUN_F_USO6;
        for (flags, got) in [
            (
                uso,
                Offloads {
                    csum: true,
                    tso: true,
                    uso: true,
                },
            ),
            (
                tso,
                Offloads {
                    csum: true,
                    tso: true,
                    uso: false,
                },
            ),
            (0, Offloads::default()),
        ] {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            if unsafe { libc::ioctl(self.raw(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) }
                == 0
            {
                return got;
            }
            tracing::debug!(flags, error = %io::Error::last_os_error(), "TUNSETOFFLOAD refused");
        }
        Offloads::default()
    }

    /// The descriptor (for poll).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet (virtio-net header first); `WouldBlock` when the queue is empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one packet gathered from `head` and the slices of `body` (virtio-net header first),
    /// with `scratch` as the `iovec` array (reused: no allocation per packet).
    pub fn writev(
        &self,
        head: &[u8],
        body: &[&[u8]],
        scratch: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        scratch.clear();
        scratch.extend(
            std::iter::once(head)
                .chain(body.iter().copied())
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr().cast_mut().cast(),
                    iov_len: b.len(),
                }),
        );
        let cnt = libc::c_int::try_from(scratch.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the iovecs point into `head` and `body`, borrowed across the call; writev only
        // reads through them.
        let n = unsafe { libc::writev(self.raw(), scratch.as_ptr(), cnt) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}
