//! Steering flows to workers: the inner-flow hash, the bucket table and its rebalancing.

use super::Flow;

/// Buckets of the steering table (an RSS indirection table): a flow's hash picks a bucket, the
/// table a worker.
pub const STEER_BUCKETS: usize = 32;
/// The steering table: worker index per bucket.
pub type SteerTable = [u8; STEER_BUCKETS];
/// A rebalance moves buckets only when the busiest worker's load drops to this fraction or less.
pub(super) const REBALANCE_GAIN: f64 = 0.9;
/// ... and only when that worker moved at least this many bytes in the period (idle nodes are
/// left alone).
pub(super) const REBALANCE_MIN_BYTES: u64 = 1 << 20;

/// The steering hash of a flow: addresses and ports folded to 16 bits (symmetric: a flow and its
/// replies hash alike), then mixed by a multiplication (Fibonacci hashing), 16 bits. The socket
/// group's classic BPF program computes the same ([`super::socket::UdpSocket::steer`]).
pub fn steer_hash(flow: Flow) -> u32 {
    let (src, dst, ports) = flow;
    let a = src ^ dst ^ ports;
    let a = (a ^ (a >> 16)) & 0xffff;
    a.wrapping_mul(0x9e37_79b1) >> 16
}

/// The bucket of a flow.
pub fn bucket(flow: Flow) -> usize {
    steer_hash(flow) as usize % STEER_BUCKETS
}

/// The table a node starts with: buckets dealt round-robin over `workers`.
pub fn default_table(workers: usize) -> SteerTable {
    let n = workers.clamp(1, usize::from(u8::MAX));
    std::array::from_fn(|b| u8::try_from(b % n).expect("fewer than 256 workers"))
}

/// Rebalances the steering table from the bytes each bucket moved in the last period: moves
/// buckets from the busiest worker to the idlest while that lowers the busier of the two to at
/// most [`REBALANCE_GAIN`] of what the busiest carried. `None` when nothing is worth moving.
///
/// A bucket is moved whole, so one heavy flow is never split, and a move never just swaps which
/// worker is the busiest (that would gain nothing and move the flow back and forth). A moved
/// flow can see its packets reordered once, at the switch; that is the price of spreading, paid
/// only when it gains at least 10 %, as a NIC pays it when its RSS table is rewritten.
pub fn rebalance(
    load: &[u64; STEER_BUCKETS],
    table: &SteerTable,
    workers: usize,
) -> Option<SteerTable> {
    if workers < 2 {
        return None;
    }
    let mut t = *table;
    let mut changed = false;
    for _ in 0..STEER_BUCKETS {
        let mut per = vec![0u64; workers];
        for (b, w) in t.iter().enumerate() {
            if let Some(p) = per.get_mut(usize::from(*w)) {
                *p += load[b];
            }
        }
        let (busy, &max) = per
            .iter()
            .enumerate()
            .max_by_key(|(_, l)| **l)
            .expect("workers");
        let (idle, &min) = per
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| **l)
            .expect("workers");
        if max < REBALANCE_MIN_BYTES {
            break;
        }
        // The bucket of the busiest worker whose move leaves the pair most even.
        let best = (0..STEER_BUCKETS)
            .filter(|&b| usize::from(t[b]) == busy && load[b] > 0)
            .min_by_key(|&b| (max - load[b]).abs_diff(min + load[b]));
        let Some(b) = best else { break };
        let after = (max - load[b]).max(min + load[b]);
        #[expect(clippy::cast_precision_loss, reason = "a ratio of byte counts")]
        let gain = after as f64 / max as f64;
        if gain > REBALANCE_GAIN {
            break;
        }
        t[b] = u8::try_from(idle).expect("fewer than 256 workers");
        changed = true;
    }
    changed.then_some(t)
}
