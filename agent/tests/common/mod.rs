//! What the agent's privileged tests share, on twill-tests' layer (its namespace guard, its
//! servers, its root check): the three-namespace node the dataplanes are driven in, the
//! services they are given, and error chains. Each test binary uses part of it.
//!
//! The node: `n` (the node, where the dataplane runs), `b` (the backends, behind veth
//! `nb`/`bn`), `c` (a host outside the cluster, behind `nc`/`cn`), IPv4 and IPv6 on both
//! links, forwarding on in the node; a cgroup and a pin directory for the eBPF dataplane. The
//! guard names everything uniquely and removes it when the test ends, pass or fail; traffic
//! never leaves these namespaces.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use twill_agent::services::lb::{Backend, BackendState, Frontend, FrontendKind, LbService, Proto};
use twill_tests::{NameServer, NetnsGuard};

/// The node's address towards the backends.
pub const NODE_TO_BE: &str = "10.251.0.1";
/// The first backend.
pub const BE1: &str = "10.251.0.2";
/// The second backend (a second address of the backend namespace).
pub const BE2: &str = "10.251.0.3";
/// The node's address towards the outside host.
pub const NODE_TO_OUT: &str = "10.252.0.1";
/// The outside host.
pub const OUTSIDE: &str = "10.252.0.2";
/// The first backend's IPv6 address.
pub const BE1_V6: &str = "fd51::2";
/// The node's IPv6 address towards the outside host.
pub const NODE_TO_OUT_V6: &str = "fd52::1";
/// The ClusterIP the tests' services use first.
pub const VIP: &str = "10.96.0.10";
/// The IPv6 ClusterIP.
pub const VIP_V6: &str = "fd96::10";
/// The NodePort the tests' services use first.
pub const NODE_PORT: u16 = 30080;

/// The namespaces, cgroup and pin directory of one test, and the servers in them.
pub struct Env {
    /// The node namespace.
    pub node: String,
    /// The backends' namespace.
    pub backends: String,
    /// The outside host's namespace.
    pub outside: String,
    /// A cgroup for socket-level load balancing.
    pub cgroup: PathBuf,
    /// A pin directory for the eBPF dataplane.
    pub pin_dir: PathBuf,
    servers: Mutex<Vec<NameServer>>,
    /// Dropped last: the servers stop first.
    pub guard: NetnsGuard,
}

impl Env {
    /// The node, its backends and the outside host, connected and addressed.
    pub fn new() -> Env {
        let guard = NetnsGuard::new().expect("namespace guard");
        let mut names = guard.netns_all(&["n", "b", "c"]).expect("namespaces");
        let outside = names.pop().unwrap();
        let backends = names.pop().unwrap();
        let node = names.pop().unwrap();
        let env = Env {
            cgroup: guard.cgroup("lb").expect("test cgroup"),
            pin_dir: guard.pin_dir("lb").expect("test pin directory"),
            node,
            backends,
            outside,
            servers: Mutex::new(Vec::new()),
            guard,
        };
        let (n, b, c) = (&env.node, &env.backends, &env.outside);
        ip_batch(
            n,
            &format!(
                "link add nb type veth peer name bn netns {b}\n\
                 link add nc type veth peer name cn netns {c}\n\
                 link set nb up\nlink set nc up\n\
                 addr add {NODE_TO_BE}/24 dev nb\naddr add fd51::1/64 dev nb nodad\n\
                 addr add {NODE_TO_OUT}/24 dev nc\naddr add {NODE_TO_OUT_V6}/64 dev nc nodad\n"
            ),
        );
        ip_batch(
            b,
            &format!(
                "link set bn up\naddr add {BE1}/24 dev bn\n\
                 addr add {BE2}/24 dev bn\naddr add {BE1_V6}/64 dev bn nodad\n\
                 route add default via {NODE_TO_BE}\nroute add default via fd51::1\n"
            ),
        );
        ip_batch(
            c,
            &format!(
                "link set cn up\naddr add {OUTSIDE}/24 dev cn\n\
                 addr add fd52::2/64 dev cn nodad\n\
                 route add default via {NODE_TO_OUT}\nroute add default via {NODE_TO_OUT_V6}\n"
            ),
        );
        twill_tests::ns::sysctl(n, "net.ipv4.ip_forward", "1").expect("ip_forward");
        twill_tests::ns::sysctl(n, "net.ipv6.conf.all.forwarding", "1").expect("forwarding6");
        env
    }

    /// A TCP and a UDP server answering `<name> peer=<client>` on `ip`, in the backend
    /// namespace.
    pub fn serve(&self, name: &str, ip: &str, tcp_port: u16, udp_port: u16) {
        self.serve_in(&self.backends, name, ip, tcp_port, udp_port);
    }

    /// [`Env::serve`] in namespace `ns`.
    pub fn serve_in(&self, ns: &str, name: &str, ip: &str, tcp_port: u16, udp_port: u16) {
        let ip = ip.parse().expect("server address");
        let server = NameServer::start(
            ns,
            name,
            Some(SocketAddr::new(ip, tcp_port)),
            Some(SocketAddr::new(ip, udp_port)),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }

    /// Runs `f` on a thread inside the node namespace (the dataplane resolves interfaces,
    /// addresses and the netns cookie there, as in twilld).
    pub fn on_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        within(&self.node, f)
    }

    /// Pod namespaces `short`... made by the guard (for pods plugged into the node by hand).
    pub fn pods<const N: usize>(&self, shorts: [&str; N]) -> [String; N] {
        let names = self.guard.netns_all(&shorts).expect("pod namespaces");
        names.try_into().expect("one namespace per name")
    }
}

/// `ip -n NS -batch -` with `script`; panics with the failing line unless it succeeds.
pub fn ip_batch(ns: &str, script: &str) {
    twill_tests::ns::ip_batch(Some(ns), script).unwrap_or_else(|e| panic!("{e:#}"));
}

/// `args` in namespace `ns`; its stdout, or a panic with its stderr.
pub fn run_in(ns: &str, args: &[&str]) -> String {
    twill_tests::run(ns, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A ready backend `ip:port` on another node.
pub fn backend(ip: &str, port: u16) -> Backend {
    Backend {
        ip: ip.parse().unwrap(),
        port,
        node_local: false,
        state: BackendState::Ready,
    }
}

/// Service `id` (`test/svc<id>`): frontend `vip:port/proto` of `kind`, `backends`, no
/// affinity, traffic policies Cluster.
pub fn service(
    id: u32,
    kind: FrontendKind,
    vip: &str,
    port: u16,
    proto: Proto,
    backends: Vec<Backend>,
) -> LbService {
    LbService {
        id,
        name: format!("test/svc{id}"),
        frontend: Frontend {
            ip: vip.parse().unwrap(),
            port,
            proto,
            kind,
        },
        backends,
        affinity_timeout_secs: None,
        external_local: false,
        internal_local: false,
    }
}

/// An error with its sources, `: `-separated.
pub fn error_chain(err: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(err))
}

/// Runs `f` on a thread inside namespace `ns` and returns what it returned (a failure to enter
/// the namespace fails the test).
pub fn within<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    twill_tests::in_netns(ns, || Ok(f())).unwrap_or_else(|e| panic!("{e:#}"))
}
