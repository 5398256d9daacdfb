//! The worker's edge: the TUN queue end and the socket, each behind a small trait, so that a
//! worker's turns (read, encapsulate, send; receive, decapsulate, write) run in a unit test
//! against fakes that queue packets in and record what comes out.
//!
//! The traits are generic (no `dyn`): the real data path compiles to the same direct calls as
//! before, and the fakes cost nothing outside tests.

use std::io;

use super::socket::{OutMsg, Received, Receiver, Sender, UdpSocket};
use super::tun::TunQueue;

/// A TUN queue end: packets (virtio-net header first) in and out.
pub trait Tun {
    /// Reads one packet into `buf`; `WouldBlock` when the queue is empty.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet gathered from `head` and `body`, with `scratch` as a reusable `iovec`
    /// array.
    fn writev(
        &self,
        head: &[u8],
        body: &[&[u8]],
        scratch: &mut Vec<libc::iovec>,
    ) -> io::Result<usize>;
}

impl Tun for TunQueue {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TunQueue::read(self, buf)
    }

    fn writev(
        &self,
        head: &[u8],
        body: &[&[u8]],
        scratch: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        TunQueue::writev(self, head, body, scratch)
    }
}

/// The sending half of the socket.
pub trait Transmit {
    /// Sends `msgs`, whose bytes are among `slices`; `done(i, result)` for each message, in
    /// order (see [`Sender::send`]).
    fn send<'a>(
        &mut self,
        msgs: &[OutMsg],
        slices: impl IntoIterator<Item = &'a [u8]>,
        done: impl FnMut(usize, io::Result<()>),
    );
}

/// The receiving half of the socket.
pub trait Receive {
    /// Receives what is queued without blocking: how many; 0 when nothing was waiting.
    fn recv(&mut self) -> io::Result<usize>;
    /// The `i`-th receive of the last call: its bytes and facts.
    fn get(&self, i: usize) -> (&[u8], Received);
}

/// [`Sender`] on a socket: `sendmmsg`.
pub struct SocketTx<'s> {
    /// The worker's socket.
    pub sock: &'s UdpSocket,
    /// Its reusable `sendmmsg` arrays.
    pub sender: Sender,
}

impl Transmit for SocketTx<'_> {
    fn send<'a>(
        &mut self,
        msgs: &[OutMsg],
        slices: impl IntoIterator<Item = &'a [u8]>,
        done: impl FnMut(usize, io::Result<()>),
    ) {
        self.sender.send(self.sock, msgs, slices, done);
    }
}

/// [`Receiver`] on a socket: `recvmmsg`.
pub struct SocketRx<'s> {
    /// The worker's socket.
    pub sock: &'s UdpSocket,
    /// Its reusable `recvmmsg` buffers.
    pub receiver: Receiver,
}

impl Receive for SocketRx<'_> {
    fn recv(&mut self) -> io::Result<usize> {
        self.receiver.recv(self.sock)
    }

    fn get(&self, i: usize) -> (&[u8], Received) {
        self.receiver.get(i)
    }
}

/// Fakes of both edges for the worker's unit tests.
#[cfg(test)]
pub mod fake {
    use std::collections::VecDeque;
    use std::io;
    use std::net::SocketAddrV4;

    use super::{OutMsg, Receive, Received, Transmit, Tun};

    /// A TUN queue in memory: packets queued for reading, packets written recorded whole.
    #[derive(Debug, Default)]
    pub struct FakeTun {
        /// Packets the next reads return, in order.
        pub input: std::cell::RefCell<VecDeque<Vec<u8>>>,
        /// Packets written, each gathered into one buffer.
        pub written: std::cell::RefCell<Vec<Vec<u8>>>,
    }

    impl Tun for FakeTun {
        fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(p) = self.input.borrow_mut().pop_front() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            buf[..p.len()].copy_from_slice(&p);
            Ok(p.len())
        }

        fn writev(
            &self,
            head: &[u8],
            body: &[&[u8]],
            _scratch: &mut Vec<libc::iovec>,
        ) -> io::Result<usize> {
            let p: Vec<u8> = std::iter::once(head)
                .chain(body.iter().copied())
                .flatten()
                .copied()
                .collect();
            let n = p.len();
            self.written.borrow_mut().push(p);
            Ok(n)
        }
    }

    /// One datagram (or GSO train) a [`FakeSocket`] was asked to send.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Sent {
        /// The peer.
        pub dst: SocketAddrV4,
        /// Its bytes, gathered.
        pub bytes: Vec<u8>,
        /// Segment size of a train.
        pub gso: Option<u16>,
    }

    /// A socket in memory: datagrams queued for receiving (`batch` per call), sends recorded.
    #[derive(Debug, Default)]
    pub struct FakeSocket {
        /// Datagrams the next receives return: sender and bytes.
        pub input: VecDeque<(SocketAddrV4, Vec<u8>)>,
        /// At most this many per receive (0: no limit).
        pub batch: usize,
        /// What the last receive returned.
        got: Vec<(SocketAddrV4, Vec<u8>)>,
        /// Everything sent.
        pub sent: Vec<Sent>,
    }

    impl Transmit for FakeSocket {
        fn send<'a>(
            &mut self,
            msgs: &[OutMsg],
            slices: impl IntoIterator<Item = &'a [u8]>,
            mut done: impl FnMut(usize, io::Result<()>),
        ) {
            let slices: Vec<&[u8]> = slices.into_iter().collect();
            for (i, m) in msgs.iter().enumerate() {
                self.sent.push(Sent {
                    dst: m.dst,
                    bytes: slices[m.iov.clone()].concat(),
                    gso: m.gso,
                });
                done(i, Ok(()));
            }
        }
    }

    impl Receive for FakeSocket {
        fn recv(&mut self) -> io::Result<usize> {
            let n = if self.batch == 0 {
                self.input.len()
            } else {
                self.batch.min(self.input.len())
            };
            self.got = self.input.drain(..n).collect();
            Ok(n)
        }

        fn get(&self, i: usize) -> (&[u8], Received) {
            let (src, bytes) = &self.got[i];
            let meta = Received {
                len: bytes.len(),
                src: Some(*src),
                gso: None,
                truncated: false,
            };
            (bytes, meta)
        }
    }
}
