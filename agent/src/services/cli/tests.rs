//! Tests of the service commands, on the in-memory store.

use std::fmt::Write as _;

use super::*;
use crate::services::desired::Snapshot;
use crate::services::desired::desired;
use crate::services::source::SourceError;
use crate::services::source::mem::MemServiceStore;

const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.10]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5]}
- {addresses: [10.244.2.5], conditions: {ready: false}}
ports: [{name: http, port: 8080}]
";

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("twill-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

async fn apply_lines(store: &MemServiceStore, objs: &[Object]) -> Vec<String> {
    apply(store, objs, MAX_TXN_OPS, soon()).await.unwrap().lines
}

async fn delete_lines(store: &MemServiceStore, objs: &[Object]) -> Vec<String> {
    delete(store, objs, MAX_TXN_OPS, soon())
        .await
        .unwrap()
        .lines
}

#[tokio::test]
async fn apply_is_all_or_nothing_and_reports() {
    let dir = tmpdir("apply");
    let good = write(&dir, "good.yaml", WEB);
    let bad = write(
        &dir,
        "bad.yaml",
        &WEB.replace("web, namespace: shop}", "api}")
            .replace("port: 80,", "port: 70000,")
            .replace("web-1", "api-1"),
    );
    let store = MemServiceStore::new();
    let e = load_manifests(&[good.clone(), bad.clone()]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: document 1 (Service default/api): spec.ports[0].port: 70000 is not a valid port (1-65535)",
            bad.display()
        )
    );
    assert!(store.objects().is_empty());
    let objs = load_manifests(std::slice::from_ref(&good)).unwrap();
    assert_eq!(
        apply_lines(&store, &objs).await,
        vec![
            "Service shop/web created",
            "EndpointSlice shop/web-1 created"
        ]
    );
    assert_eq!(
        apply_lines(&store, &objs).await,
        vec![
            "Service shop/web unchanged",
            "EndpointSlice shop/web-1 unchanged"
        ]
    );
    let objs2 = load_manifests(&[write(
        &dir,
        "v2.yaml",
        &WEB.replace("10.244.1.5", "10.244.1.6"),
    )])
    .unwrap();
    assert_eq!(
        apply_lines(&store, &objs2).await,
        vec![
            "Service shop/web unchanged",
            "EndpointSlice shop/web-1 configured"
        ]
    );
    // Same file twice: refused.
    let e = load_manifests(&[good.clone(), good.clone()]).unwrap_err();
    assert!(
        e.to_string()
            .contains("Service shop/web is also defined in"),
        "{e}"
    );
    // A second service taking web's node port: refused whole, nothing written.
    let clash = WEB
        .replace("name: web, namespace: shop", "name: other, namespace: shop")
        .replace("10.96.0.10", "10.96.0.99")
        .replace("externalIPs: [192.0.2.10]", "externalIPs: []")
        .replace("web-1", "other-1")
        .replace("service-name: web", "service-name: other");
    let objs3 = load_manifests(&[write(&dir, "clash.yaml", &clash)]).unwrap();
    let e = apply(&store, &objs3, MAX_TXN_OPS, soon())
        .await
        .unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "refusing the whole apply; nothing was written: \
         Service shop/other:dns: frontend 0.0.0.0:30053/UDP is also claimed by shop/web:dns; \
         Service shop/other:http: frontend 0.0.0.0:30080/TCP is also claimed by shop/web:http"
    );
    assert_eq!(store.objects().len(), 2);
    // Delete.
    assert_eq!(
        delete_lines(&store, &objs).await,
        vec![
            "Service shop/web deleted",
            "EndpointSlice shop/web-1 deleted"
        ]
    );
    assert_eq!(
        delete_lines(&store, &objs).await[0],
        "Service shop/web not found"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `n` Services (`svc-0` … ), each with its cluster IP.
fn many(n: usize) -> Vec<Object> {
    let mut text = String::new();
    for i in 0..n {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{port: 80}}]\n",
            i / 200,
            i % 200 + 1
        );
    }
    parse_manifest(&text).unwrap()
}

/// A file bigger than one transaction applies, in transactions of at most the limit, and
/// says how many; delete takes the same file.
#[tokio::test]
async fn apply_and_delete_write_in_transactions_of_at_most_the_limit() {
    let store = MemServiceStore::new();
    let objs = many(300);
    let r = apply(&store, &objs, 128, soon()).await.unwrap();
    assert_eq!((r.written, r.transactions), (300, 3));
    assert_eq!(
        r.summary("write", 128),
        "300 written in 3 transactions of at most 128 operations"
    );
    assert_eq!(r.lines.len(), 300);
    assert_eq!(store.objects().len(), 300);
    // Chunks follow the input order and are never larger than the limit.
    let r = apply(&store, &objs, 128, soon()).await.unwrap();
    assert_eq!((r.written, r.transactions), (0, 0));
    assert_eq!(r.summary("write", 128), "nothing to write");
    let r = apply(&store, &objs[..5], 2, soon()).await.unwrap();
    assert_eq!(r.transactions, 0, "unchanged objects are not written");
    let r = delete(&store, &objs, 128, soon()).await.unwrap();
    assert_eq!((r.written, r.transactions), (300, 3));
    assert_eq!(
        r.summary("delete", 128),
        "300 deleted in 3 transactions of at most 128 operations"
    );
    assert!(store.objects().is_empty());
    let r = apply(&store, &objs[..1], 128, soon()).await.unwrap();
    assert_eq!(r.summary("write", 128), "1 written in 1 transaction");
}

/// etcd failing half way: the objects written and not written are named (a transaction
/// whose answer was lost is read back), and the command fails.
#[tokio::test]
async fn apply_reports_which_objects_were_written_when_etcd_fails_half_way() {
    let objs = many(300);
    let name = |i: usize| format!("Service default/svc-{i}");
    let short = || Deadline::after(Duration::from_millis(700));
    // The second transaction fails (and so every later attempt of it).
    let store = MemServiceStore::new();
    store.fail_writes(1, false);
    let e = apply(&store, &objs, 128, short()).await.unwrap_err();
    let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
    assert_eq!(p.written, (0..128).map(name).collect::<Vec<_>>());
    assert_eq!(p.not_written, (128..300).map(name).collect::<Vec<_>>());
    assert!(p.unknown.is_empty());
    assert_eq!(store.objects().len(), 128);
    let text = format!("{e:#}");
    assert!(text.starts_with("apply stopped after 128 of 300 objects: write transaction 2 of 3: etcd did not answer within --etcd-deadline 700ms"), "{text}");
    assert!(text.contains("\n  done: Service default/svc-0, "), "{text}");
    assert!(
        text.contains("\n  not done: Service default/svc-128, "),
        "{text}"
    );
    // The second transaction is committed but its answer lost: read back, it counts as
    // written.
    let store = MemServiceStore::new();
    store.fail_writes(1, true);
    let e = apply(&store, &objs, 128, short()).await.unwrap_err();
    let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
    assert_eq!(p.written.len(), 256);
    assert_eq!(p.not_written, (256..300).map(name).collect::<Vec<_>>());
    // Running it again completes it (writes are idempotent).
    let store2 = store.clone();
    store2.fail_writes(usize::MAX, false);
    let r = apply(&store, &objs, 128, soon()).await.unwrap();
    assert_eq!(r.written, 44);
    assert_eq!(store.objects().len(), 300);
    // Deleting, the same: the first transaction done, the second failing, read back.
    store.fail_writes(1, false);
    let e = delete(&store, &objs, 128, short()).await.unwrap_err();
    let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
    assert_eq!(p.written, (0..128).map(name).collect::<Vec<_>>());
    assert_eq!(p.not_written, (128..300).map(name).collect::<Vec<_>>());
    assert!(
        format!("{e:#}")
            .starts_with("delete stopped after 128 of 300 objects: delete transaction 2 of 3: "),
        "{e:#}"
    );
    assert_eq!(store.objects().len(), 172);
    store.fail_writes(1, true);
    let e = delete(&store, &objs, 128, short()).await.unwrap_err();
    let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
    assert_eq!(
        p.written,
        (0..256).map(name).collect::<Vec<_>>(),
        "the lost answer's deletes happened"
    );
    assert_eq!(p.not_written, (256..300).map(name).collect::<Vec<_>>());
}

/// Unreachable etcd is retried until the deadline, then the error says so; an answer that
/// retrying cannot change fails at once.
#[tokio::test]
async fn etcd_is_retried_within_the_deadline_only_when_retrying_can_help() {
    let store = MemServiceStore::new();
    store.set_down(true);
    let start = std::time::Instant::now();
    let e = apply(
        &store,
        &many(1),
        128,
        Deadline::after(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    assert!(
        format!("{e:#}")
            .starts_with("list stored services: etcd did not answer within --etcd-deadline 1s ("),
        "{e:#}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // etcd comes back within the deadline: the command succeeds.
    let back = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        back.set_down(false);
    });
    let r = apply(&store, &many(1), 128, soon()).await.unwrap();
    assert_eq!(r.written, 1);
    // A refusal is not retried.
    let mut attempts = 0;
    let e = with_retry(soon(), "write", || {
        attempts += 1;
        async {
            Err::<(), _>(SourceError::TooMany {
                count: 200,
                max: 128,
            })
        }
    })
    .await
    .unwrap_err();
    assert_eq!(attempts, 1);
    assert_eq!(
        format!("{e:#}"),
        "write: 200 operations in one transaction; etcd takes at most 128 (its --max-txn-ops)"
    );
}

/// A Service on an etcd endpoint's address is refused at apply time, naming it.
#[test]
fn services_on_etcd_addresses_are_refused() {
    let reserved = BTreeMap::from([("198.18.0.1".parse().unwrap(), Reserved::Etcd)]);
    let evil = parse_manifest("apiVersion: v1\nkind: Service\nmetadata: {name: evil}\nspec:\n  clusterIP: 10.96.0.66\n  externalIPs: [198.18.0.1]\n  ports: [{name: etcd, port: 2379}]\n").unwrap();
    let e = check_reserved(&evil, &reserved).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service default/evil:etcd ExternalIP 198.18.0.1:2379/TCP: 198.18.0.1 is an etcd endpoint's address (--etcd-endpoints): every node refuses it"
    );
    check_reserved(&parse_manifest(WEB).unwrap(), &reserved).unwrap();
    // An external IP is worth a note: nodes program it only where allowed.
    assert_eq!(
        external_ip_notes(&parse_manifest(WEB).unwrap()),
        vec![
            "note: Service shop/web has externalIPs (192.0.2.10): a node programs them only inside its --allowed-external-ips (none unless given)"
        ]
    );
}

#[test]
fn table() {
    let objs = parse_manifest(WEB).unwrap();
    let node = NodeIdentity::default();
    let d = desired(&Snapshot::from_objects(objs.clone()), &node);
    let t = services_table(&objs, &d, None);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0],
        "NAMESPACE/NAME   TYPE       CLUSTER-IP   EXTERNAL-IP   PORT(S)                     ENDPOINTS   FRONTENDS   PROGRAMMED   CONNS"
    );
    assert_eq!(
        lines[1],
        "shop/web         NodePort   10.96.0.10   192.0.2.10    80:30080/TCP,53:30053/UDP   1/2         6           -            -"
    );
    assert!(lines[2].contains("no service dataplane found"), "{t}");

    // A dataplane holding two frontends: one as desired, one with a stale backend, plus a
    // frontend nobody wants any more.
    let mut frontends = BTreeMap::new();
    let pick = |f: &str| {
        d.services
            .iter()
            .find(|s| s.frontend.key().to_string() == f)
            .unwrap()
            .clone()
    };
    let mut good = pick("10.96.0.10:80/TCP");
    good.id = 77;
    let mut off = pick("0.0.0.0:30080/TCP");
    off.backends[0].ip = "10.244.9.9".parse().unwrap();
    let mut gone = pick("10.96.0.10:80/TCP");
    gone.frontend.ip = "10.96.0.99".parse().unwrap();
    gone.name = "shop/old:http".into();
    for (svc, conns) in [(good, 5), (off, 2), (gone, 1)] {
        frontends.insert(
            svc.frontend.key(),
            ProgrammedFrontend {
                service: svc,
                conns: Some(conns),
                packets: Some(conns * 10),
            },
        );
    }
    let dp = DataplaneReading {
        mode: "ebpf",
        location: "pinned maps in /x".into(),
        frontends,
    };
    let t = services_table(&objs, &d, Some(&dp));
    let row = t.lines().nth(1).unwrap();
    assert!(row.ends_with("6           1/6          7"), "{t}");
    assert!(
        t.contains("dataplane: ebpf (pinned maps in /x): 1/6 frontends in sync, 1 not desired"),
        "{t}"
    );
    let w = frontends_table(&d, Some(&dp));
    assert!(!w.contains("refused"), "{w}");
    assert!(w.contains("in sync"), "{w}");
    assert!(w.contains("differs: 10.244.9.9:"), "{w}");
    assert!(w.contains("missing"), "{w}");
    assert!(
        w.contains("10.96.0.99:80/TCP") && w.contains("stale: 10.244.1.5:8080"),
        "{w}"
    );
    // A node that programs no external IP: those frontends are listed as refused, not
    // counted as wanted.
    let strict = NodeIdentity {
        allowed_external_ips: Some(Vec::new()),
        ..NodeIdentity::default()
    };
    let d = desired(&Snapshot::from_objects(objs.clone()), &strict);
    let t = services_table(&objs, &d, None);
    assert!(t.lines().nth(1).unwrap().contains(" 1/2         4 "), "{t}");
    let w = frontends_table(&d, None);
    let refused: Vec<&str> = w.lines().filter(|l| l.contains("<refused>")).collect();
    assert_eq!(refused.len(), 2, "{w}");
    assert!(
        refused.iter().all(|l| l.starts_with("192.0.2.10:")
            && l.contains("ExternalIP")
            && l.contains("refused: external IP not allowed")),
        "{w}"
    );
}
