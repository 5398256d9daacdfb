//! Batching sends (UDP GSO): consecutive packets to one peer packed into as few sends as the kernel allows.

use std::net::SocketAddrV4;

use super::{Flow, GSO_MAX_SEGMENTS, MAX_UDP_PAYLOAD};

/// One send: `count` consecutive packets (from [`Batcher::push`] index `first` on) to one peer;
/// every packet but the last is `seg` bytes. Two or more go as one UDP GSO message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    /// The peer.
    pub dst: SocketAddrV4,
    /// The flow of its packets.
    pub flow: Flow,
    /// Index of the first packet.
    pub first: usize,
    /// Packets.
    pub count: usize,
    /// Bytes of every packet but the last (the `UDP_SEGMENT` size).
    pub seg: usize,
    /// Bytes in all.
    pub bytes: usize,
}

impl Send {
    /// The `UDP_SEGMENT` size to give the kernel: `None` for a single datagram.
    pub fn gso(&self) -> Option<u16> {
        (self.count > 1).then(|| u16::try_from(self.seg).expect("datagrams below 64 KiB"))
    }
}

/// Packs a turn's packets, in order, into as few sends as UDP GSO allows.
///
/// A packet joins the send before it when it goes to the same peer, belongs to the same flow, is
/// no longer than that
/// send's segment size, the send's last packet was full-sized, and the send stays within
/// [`GSO_MAX_SEGMENTS`] packets and [`MAX_UDP_PAYLOAD`] bytes. So a train of full-sized TCP
/// segments continues across super-packets (a 64 KiB super-packet is 46 segments of 1472 bytes,
/// a send holds 44: cut per super-packet that is two sends, the second of two packets, where
/// packed it is one send per 44), and a burst of equal-sized ACKs to one peer is one send. Every
/// send is one skb through the underlay and one receive at the peer: what costs there is per
/// skb, not per byte. Flows are never mixed in a send: the peer's socket group steers a whole
/// train to one worker by its first packet, and a flow must stay on one worker to stay in order.
#[derive(Debug, Default)]
pub struct Batcher {
    sends: Vec<Send>,
    packets: usize,
}

impl Batcher {
    /// An empty batch.
    pub fn new() -> Batcher {
        Batcher::default()
    }

    /// Adds the next packet (`len` bytes of `flow`, for `dst`); its index.
    pub fn push(&mut self, dst: SocketAddrV4, flow: Flow, len: usize) -> usize {
        let i = self.packets;
        self.packets += 1;
        if let Some(s) = self.sends.last_mut()
            && s.dst == dst
            && s.flow == flow
            && len <= s.seg
            && s.bytes == s.count * s.seg
            && s.count < GSO_MAX_SEGMENTS
            && s.bytes + len <= MAX_UDP_PAYLOAD
        {
            s.count += 1;
            s.bytes += len;
            return i;
        }
        self.sends.push(Send {
            dst,
            flow,
            first: i,
            count: 1,
            seg: len,
            bytes: len,
        });
        i
    }

    /// The sends so far, in order.
    pub fn sends(&self) -> &[Send] {
        &self.sends
    }

    /// Packets pushed.
    pub fn packets(&self) -> usize {
        self.packets
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.sends.clear();
        self.packets = 0;
    }
}
