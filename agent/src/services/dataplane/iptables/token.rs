//! Telling "nothing changed" cheaply: a digest of a legacy x_tables table without its
//! counters, read with `getsockopt` (what `iptables-legacy-save` reads, without formatting it).

use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

use crate::services::dataplane::sockopt;

/// `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO` (`IPT_BASE_CTL`).
pub(crate) const SO_GET_INFO: libc::c_int = 64;

/// `IPT_SO_GET_ENTRIES` / `IP6T_SO_GET_ENTRIES`.
pub(crate) const SO_GET_ENTRIES: libc::c_int = 65;

/// `sizeof(struct ipt_getinfo)`: name[32], valid_hooks, hook_entry[5], underflow[5],
/// num_entries, size.
pub(crate) const GETINFO_LEN: usize = 84;

/// `sizeof(struct ipt_get_entries)`: name[32], size, then the 8-aligned entries.
pub(crate) const GET_ENTRIES_HDR: usize = 40;

/// Byte offsets in `struct ipt_entry` / `struct ip6t_entry`: (`next_offset`, `comefrom`, end of
/// `counters`). `comefrom` and the counters are what the kernel changes without a replace.
pub(crate) fn entry_layout(v6: bool) -> (usize, usize, usize) {
    if v6 { (142, 144, 168) } else { (90, 92, 112) }
}

/// Hashes an x_tables blob (the entries of `IPT_SO_GET_ENTRIES`) without what traffic and the
/// kernel change in place (`comefrom`, packet and byte counters). Pure.
pub fn blob_digest(blob: &[u8], v6: bool, h: &mut impl std::hash::Hasher) {
    let (next_at, comefrom_at, counters_end) = entry_layout(v6);
    let mut off = 0;
    while off < blob.len() {
        let e = &blob[off..];
        let next = e
            .get(next_at..next_at + 2)
            .map_or(0, |b| usize::from(u16::from_ne_bytes([b[0], b[1]])));
        if next < counters_end || next > e.len() {
            // Not an entry as we know it: hash the rest as it is.
            h.write(e);
            return;
        }
        h.write(&e[..comefrom_at]);
        h.write(&e[counters_end..next]);
        off += next;
    }
}

/// A digest of a legacy x_tables table of the calling thread's namespace (rules, not
/// counters), read with `getsockopt` on a raw socket (what `iptables-legacy-save` reads,
/// without formatting it), fed to `h`. A table that does not exist hashes as absent.
pub(crate) fn legacy_table_digest(
    v6: bool,
    table: &str,
    h: &mut impl std::hash::Hasher,
) -> std::io::Result<()> {
    let (domain, level) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_IPV6)
    } else {
        (libc::AF_INET, libc::IPPROTO_IP)
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let get =
        |opt: libc::c_int, buf: &mut [u8]| sockopt::get(fd.as_fd(), level, opt, buf).map(drop);
    h.write(table.as_bytes());
    for _ in 0..5 {
        let mut info = [0u8; GETINFO_LEN];
        info[..table.len()].copy_from_slice(table.as_bytes());
        match get(SO_GET_INFO, &mut info) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                h.write(b"absent");
                return Ok(());
            }
            r => r?,
        }
        let size = u32::from_ne_bytes([info[80], info[81], info[82], info[83]]);
        let mut buf = vec![0u8; GET_ENTRIES_HDR + size as usize];
        buf[..table.len()].copy_from_slice(table.as_bytes());
        buf[32..36].copy_from_slice(&size.to_ne_bytes());
        match get(SO_GET_ENTRIES, &mut buf) {
            // The table changed size between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            r => r?,
        }
        // Hook entry points and underflows locate the built-in chains.
        h.write(&info[32..GETINFO_LEN]);
        blob_digest(&buf[GET_ENTRIES_HDR..], v6, h);
        return Ok(());
    }
    Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
}
