use std::fmt::Write as _;

use hickory_proto::rr::RecordType;

use super::*;
use crate::dns::feed::Objects;
use crate::dns::zone::DEFAULT_DOMAIN;
use crate::services::model::parse_manifest;

/// The zone tests' Services: `web` (ClusterIP 10.96.0.10, port `http` 80), headless `db` with
/// two ready endpoints and a not-ready one.
fn zone() -> Zone {
    crate::dns::zone::tests::zone(crate::dns::zone::tests::MANIFEST)
}

fn ask(zone: &Zone, name: &str, qtype: RecordType, turn: usize) -> (Message, Outcome) {
    match answer(zone, &query(7, name, qtype), 5, Some(512), turn) {
        Reply::Send(bytes, outcome) => (Message::from_vec(&bytes).unwrap(), outcome),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn a_service_name_is_answered_with_ttl_and_flags() {
    let (m, outcome) = ask(&zone(), "web.default.svc.cluster.local.", RecordType::A, 0);
    assert_eq!(outcome, Outcome::Answered);
    assert_eq!(m.metadata.id, 7);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_desired);
    assert_eq!(addresses(&m), ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.answers[0].ttl, 5);
    // The question comes back, and the answer's owner is the name as asked.
    assert_eq!(m.queries.len(), 1);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "web.default.svc.cluster.local."
    );
}

#[test]
fn the_case_of_the_question_is_kept() {
    let (m, _) = ask(&zone(), "WEB.default.svc.Cluster.Local.", RecordType::A, 0);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "WEB.default.svc.Cluster.Local."
    );
}

#[test]
fn srv_of_a_named_port() {
    let (m, outcome) = ask(
        &zone(),
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
        0,
    );
    assert_eq!(outcome, Outcome::Answered);
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(srv.port, 80);
    assert_eq!(srv.target.to_ascii(), "web.default.svc.cluster.local.");
}

#[test]
fn unknown_names_are_nxdomain_without_soa() {
    let (m, outcome) = ask(&zone(), "nope.default.svc.cluster.local.", RecordType::A, 0);
    assert_eq!(outcome, Outcome::NxDomain);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty() && m.authorities.is_empty());
    // NODATA: the name exists, nothing of that type.
    let (m, outcome) = ask(&zone(), "web.default.svc.cluster.local.", RecordType::MX, 0);
    assert_eq!(outcome, Outcome::Answered);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[test]
fn other_names_are_forwarded() {
    for name in ["example.org.", "cluster.local.example.org."] {
        assert_eq!(
            answer(&zone(), &query(1, name, RecordType::A), 5, Some(512), 0),
            Reply::Forward,
            "{name}"
        );
    }
}

#[test]
fn headless_addresses_turn_with_every_query() {
    let z = zone();
    let firsts: Vec<IpAddr> = (0..3)
        .map(|turn| addresses(&ask(&z, "db.default.svc.cluster.local.", RecordType::A, turn).0)[0])
        .collect();
    // Two ready endpoints: the first answer turns from one to the other and back.
    assert_eq!(
        firsts,
        ["10.244.1.5", "10.244.2.7", "10.244.1.5"].map(|s| s.parse::<IpAddr>().unwrap())
    );
    let all = addresses(&ask(&z, "db.default.svc.cluster.local.", RecordType::A, 1).0);
    assert_eq!(all.len(), 2, "{all:?}");
}

#[test]
fn malformed_and_unsupported_queries() {
    let z = zone();
    // Too short for a header: nothing to answer.
    assert_eq!(answer(&z, &[1, 2, 3], 5, Some(512), 0), Reply::Drop);
    // A header and garbage: FORMERR with the id.
    let mut bad = query(9, "web.default.svc.cluster.local.", RecordType::A);
    bad.truncate(14);
    let Reply::Send(bytes, Outcome::Failed) = answer(&z, &bad, 5, Some(512), 0) else {
        panic!("no FORMERR")
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (9, ResponseCode::FormErr)
    );
    // A response is never answered (no reflection loops).
    let mut resp = query(9, "web.default.svc.cluster.local.", RecordType::A);
    resp[2] |= 0x80;
    assert_eq!(answer(&z, &resp, 5, Some(512), 0), Reply::Drop);
    // Not a query: NOTIMP.
    let mut m =
        Message::from_vec(&query(3, "web.default.svc.cluster.local.", RecordType::A)).unwrap();
    m.metadata.op_code = OpCode::Status;
    let Reply::Send(bytes, Outcome::Failed) = answer(&z, &m.to_vec().unwrap(), 5, Some(512), 0)
    else {
        panic!("no NOTIMP")
    };
    assert_eq!(
        Message::from_vec(&bytes).unwrap().metadata.response_code,
        ResponseCode::NotImp
    );
}

#[test]
fn a_reply_too_large_for_udp_is_truncated() {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec: {clusterIP: None, ports: [{port: 1}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: big-1, labels: {kubernetes.io/service-name: big}}\n\
         addressType: IPv4\nendpoints:\n",
    );
    for i in 0..60 {
        let _ = writeln!(text, "- addresses: [10.244.3.{i}]");
    }
    let mut o = Objects::default();
    o.reset(parse_manifest(&text).unwrap());
    let z = o.zone(DEFAULT_DOMAIN);
    let q = query(4, "big.default.svc.cluster.local.", RecordType::A);
    let Reply::Send(udp, Outcome::Answered) = answer(&z, &q, 5, Some(512), 0) else {
        panic!()
    };
    assert!(udp.len() <= 512, "{}", udp.len());
    let m = Message::from_vec(&udp).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty());
    // Over TCP: everything.
    let Reply::Send(tcp, _) = answer(&z, &q, 5, None, 0) else {
        panic!()
    };
    let m = Message::from_vec(&tcp).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 60);
}

#[test]
fn servfail_keeps_id_and_question() {
    let q = query(11, "example.org.", RecordType::A);
    let m = Message::from_vec(&servfail(&q).unwrap()).unwrap();
    assert_eq!(m.metadata.id, 11);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries.len(), 1);
}
