//! `getsockopt(2)` into a byte buffer, the one raw socket-option read the dataplanes (and their
//! tests) need: the buffer may carry input too (`SO_GET_INFO` reads the table name from it), and
//! the caller decodes the bytes (a `u64` cookie, a field of `tcp_info`).

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// Reads socket option `name` at `level` of `fd` into `buf` (which the kernel may also read);
/// returns how many bytes the kernel wrote.
///
/// # Errors
///
/// The OS error of `getsockopt`, or `InvalidInput` for a buffer larger than a `socklen_t`.
pub fn get(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket option buffer too large",
        )
    })?;
    // SAFETY: `buf` is valid for reads and writes of `len` bytes; the kernel writes at most that
    // many and stores the length it wrote in `len`. The fd is open (borrowed).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(len).expect("socklen_t fits usize"))
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsFd as _;

    #[test]
    fn reads_an_option_and_names_the_errno_of_a_bad_one() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ty = [0u8; 4];
        let n = super::get(sock.as_fd(), libc::SOL_SOCKET, libc::SO_TYPE, &mut ty).unwrap();
        assert_eq!(n, 4);
        assert_eq!(i32::from_ne_bytes(ty), libc::SOCK_DGRAM);
        let err = super::get(sock.as_fd(), libc::SOL_SOCKET, -1, &mut ty).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOPROTOOPT));
    }
}
