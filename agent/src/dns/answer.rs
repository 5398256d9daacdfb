//! One query in, one reply (or "forward it") out: the DNS wire format around [`Zone::lookup`],
//! without sockets, so every case is a unit test.
//!
//! Why this shape:
//! - hickory-proto parses the query and writes the reply (compression, EDNS, every record
//!   type's layout): the parts of DNS that are easy to get subtly wrong are a maintained
//!   library's. Sockets, forwarding and the zone stay twill's, small and in view.
//! - Answers are authoritative with the zone's TTL; NXDOMAIN and NODATA carry no SOA, so no
//!   resolver caches a negative answer (a Service applied a moment later must resolve).
//! - Several addresses of a name come in an order that turns with every query, so clients that
//!   take the first one spread over a headless Service's endpoints (Swarm's DNS round robin).
//! - A reply larger than the client can take (512 bytes, or its EDNS size) is sent truncated,
//!   with the question only: the client retries over TCP.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::dns::zone::{Lookup, Qtype, Rr, Zone};

/// The largest UDP reply sent when the client says nothing (RFC 1035).
pub const PLAIN_UDP_SIZE: usize = 512;
/// The largest UDP reply sent to an EDNS client (the DNS flag day 2020 size).
pub const EDNS_UDP_SIZE: u16 = 1232;

/// What became of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Answered from the zone (records, or none of the type asked).
    Answered,
    /// The name does not exist in the cluster domain.
    NxDomain,
    /// Not in the cluster domain: the upstream answered.
    Forwarded,
    /// Malformed, unsupported, or the upstream did not answer.
    Failed,
}

impl Outcome {
    /// Every outcome, in the metrics' order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Answered,
        Outcome::NxDomain,
        Outcome::Forwarded,
        Outcome::Failed,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::NxDomain => "nxdomain",
            Outcome::Forwarded => "forwarded",
            Outcome::Failed => "failed",
        }
    }
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Send(Vec<u8>, Outcome),
    /// Forward the query as it came (its id is the client's).
    Forward,
    /// Send nothing (not even a header could be read, or it is not a query).
    Drop,
}

/// The reply to `query` from `zone`: `max_udp` is `None` over TCP; `turn` rotates the order of
/// several addresses.
pub fn answer(zone: &Zone, query: &[u8], ttl: u32, max_udp: Option<usize>, turn: usize) -> Reply {
    let Ok(req) = Message::from_vec(query) else {
        return header_error(query);
    };
    if req.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_SIZE);
        resp.set_edns(edns);
    }
    let code = if req.metadata.op_code != OpCode::Query {
        Some(ResponseCode::NotImp)
    } else if req.queries.len() != 1 {
        Some(ResponseCode::FormErr)
    } else {
        None
    };
    if let Some(code) = code {
        resp.metadata.response_code = code;
        return encode(&resp, &req, max_udp, Outcome::Failed);
    }
    let q = &req.queries[0];
    resp.add_query(q.clone());
    if q.query_class() != DNSClass::IN {
        return Reply::Forward;
    }
    let name = q.name().to_ascii();
    let qtype = match q.query_type() {
        RecordType::A => Qtype::A,
        RecordType::AAAA => Qtype::Aaaa,
        RecordType::SRV => Qtype::Srv,
        RecordType::CNAME => Qtype::Cname,
        RecordType::ANY => Qtype::Any,
        _ => Qtype::Other,
    };
    resp.metadata.authoritative = true;
    resp.metadata.recursion_available = true;
    let outcome = match zone.lookup(&name, qtype) {
        Lookup::Outside => return Reply::Forward,
        Lookup::NxDomain => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            Outcome::NxDomain
        }
        Lookup::NoData => Outcome::Answered,
        Lookup::Answer(records) => {
            let n = records.len();
            let first = if n > 1 { turn % n } else { 0 };
            for rr in records[first..].iter().chain(&records[..first]) {
                if let Some(data) = rdata(rr) {
                    resp.add_answer(Record::from_rdata(q.name().clone(), ttl, data));
                }
            }
            Outcome::Answered
        }
    };
    encode(&resp, &req, max_udp, outcome)
}

/// A FORMERR reply for a query whose header could be read, else nothing.
fn header_error(query: &[u8]) -> Reply {
    // id (2 bytes), flags (2 bytes): a query has QR clear.
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return Reply::Drop;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let op = OpCode::from_u8((query[2] >> 3) & 0x0f);
    let resp = Message::error_msg(id, op, ResponseCode::FormErr);
    match resp.to_vec() {
        Ok(b) => Reply::Send(b, Outcome::Failed),
        Err(_) => Reply::Drop,
    }
}

fn encode(resp: &Message, req: &Message, max_udp: Option<usize>, outcome: Outcome) -> Reply {
    let Ok(bytes) = resp.to_vec() else {
        return Reply::Drop;
    };
    let limit = max_udp.map(|m| match &req.edns {
        Some(e) => m.min(usize::from(e.max_payload().max(512))),
        None => m.min(PLAIN_UDP_SIZE),
    });
    match limit {
        Some(limit) if bytes.len() > limit => {
            let mut t = Message::response(resp.metadata.id, resp.metadata.op_code);
            t.metadata = resp.metadata;
            t.metadata.truncation = true;
            t.add_queries(resp.queries.iter().cloned());
            if let Some(e) = &resp.edns {
                t.set_edns(e.clone());
            }
            match t.to_vec() {
                Ok(b) => Reply::Send(b, outcome),
                Err(_) => Reply::Drop,
            }
        }
        _ => Reply::Send(bytes, outcome),
    }
}

fn rdata(rr: &Rr) -> Option<RData> {
    Some(match rr {
        Rr::A(ip) => RData::A(A(*ip)),
        Rr::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        Rr::Srv { port, target } => RData::SRV(SRV::new(
            0,
            100,
            *port,
            Name::from_ascii(format!("{target}.")).ok()?,
        )),
        Rr::Cname(target) => RData::CNAME(CNAME(Name::from_ascii(format!("{target}.")).ok()?)),
    })
}

/// A SERVFAIL reply to `query` (a forwarded query no upstream answered), if it can be read.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::error_msg(
        req.metadata.id,
        req.metadata.op_code,
        ResponseCode::ServFail,
    );
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_queries(req.queries.iter().cloned());
    resp.to_vec().ok()
}

/// A query for `name` of type `qtype` with id `id` and recursion desired (for tests and tools).
pub fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let name = Name::from_ascii(name).expect("a valid name");
    m.add_query(Query::query(name, qtype));
    m.to_vec().expect("a query encodes")
}

/// The addresses of a reply's answers (for tests and tools).
pub fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(IpAddr::V4(*ip)),
            RData::AAAA(AAAA(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
