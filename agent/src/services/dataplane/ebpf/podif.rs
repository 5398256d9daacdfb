//! Which interfaces face pods: they get the pod-side tc programs (`twl_lb_pod_in` at ingress,
//! `twl_lb_egress` at egress), found from the kernel's links and kept current by netlink link
//! events.
//!
//! Why it is shaped as it is:
//! - **The proxy must work with whatever plugs pods in**, not only with flannel's `cni0`. A
//!   pod's packet to a ClusterIP is translated at the first hook it crosses; pods whose sockets
//!   are outside the socket-LB cgroup, and every pod's connected UDP, have no other. What they
//!   cross is a bridge (twill-cni's and the reference plugin's bridge mode, podman, any bridge
//!   name) or the host end of their own veth (twill-cni's routed mode, `ptp`, Calico). So the
//!   programs go where pods are, found by shape ([`pod_facing`], `auto`):
//!   - a veth whose peer lives in another network namespace and that is no bridge port: a
//!     routed pod's host end;
//!   - a bridge with such a veth among its ports: a pod bridge (its ports themselves get
//!     nothing: the bridge sees every packet a pod routes through the node);
//!   - never the uplink or an overlay device (they have the outside-facing programs), never
//!     loopback.
//!
//!   `--pod-interfaces` names them instead (names or globs, `*` and `?`), or adds to `auto`.
//! - **Why attach to pods' interfaces rather than translate replies at the uplink only** (what
//!   Cilium's NodePort does): replies of NodePort flows could be caught at the uplink's egress,
//!   but a pod's own packets to a ClusterIP (outside the socket-LB cgroup, connected UDP) and a
//!   same-node backend's replies to a pod never cross the uplink. Reverse NAT needs a hook on
//!   the pod side in any case, and once every pod-facing interface has one, SNAT decisions no
//!   longer depend on which interface that is: a backend behind another pod-facing interface
//!   replies through a hook of ours, and the tc program SNATs only true hairpins, found by the
//!   FIB (see its notes). The cost is a conntrack lookup per packet a pod sends through the
//!   node, which the `cni0` hook already paid.
//! - **Events, not polls.** A new pod's veth appears (`RTM_NEWLINK`) before its CNI plugin has
//!   configured it, and the programs are attached at that event, milliseconds later, long
//!   before the pod's first connection. The watcher re-reads every link on each burst of events
//!   rather than applying them one by one: a link message is a snapshot, and one queued before
//!   a dump would otherwise undo what the dump showed. A periodic re-read heals events lost to
//!   a socket overrun. Address events refresh the node's addresses (a NodePort answers on a
//!   bridge's gateway address the moment it is assigned).
//! - Parsing and classification are pure ([`LinkFacts`], [`pod_facing`]) and unit-tested; the
//!   netlink edge ([`LinkWatch`]) only dumps and waits.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::{Handle, MulticastGroup};

/// The `--pod-interfaces` value meaning "find them by shape".
pub const AUTO: &str = "auto";
/// Longest interface name (`IFNAMSIZ` - 1).
const IFNAME_MAX: usize = 15;

/// Errors of the pod-interface discovery.
#[derive(Debug, thiserror::Error)]
pub enum PodIfaceError {
    /// A `--pod-interfaces` entry is not an interface name or glob.
    #[error("--pod-interfaces {value:?}: {reason}")]
    BadPattern {
        /// The entry.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The netlink socket for link events could not be opened.
    #[error("open a netlink socket for link and address events")]
    Connect(#[source] io::Error),
    /// Dumping the links failed.
    #[error("netlink dump links")]
    Dump(#[source] rtnetlink::Error),
    /// The event stream ended (its connection task stopped).
    #[error("netlink link events: the stream ended")]
    Closed,
}

/// Which interfaces face pods (`--pod-interfaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIfacePolicy {
    /// Find them by shape (see the module notes).
    pub auto: bool,
    /// Names or globs (`*`, `?`) of interfaces that face pods in any case.
    pub patterns: Vec<String>,
}

impl Default for PodIfacePolicy {
    fn default() -> Self {
        Self {
            auto: true,
            patterns: Vec::new(),
        }
    }
}

impl PodIfacePolicy {
    /// From the flag's entries: `auto` and names or globs; an error names the first bad entry.
    pub fn parse(values: &[String]) -> Result<Self, PodIfaceError> {
        let mut policy = Self {
            auto: false,
            patterns: Vec::new(),
        };
        for value in values {
            let v = value.trim();
            if v == AUTO {
                policy.auto = true;
                continue;
            }
            let bad = |reason| PodIfaceError::BadPattern {
                value: value.clone(),
                reason,
            };
            if v.is_empty() {
                return Err(bad("empty: expected auto, an interface name or a glob"));
            }
            if v.len() > IFNAME_MAX {
                return Err(bad("longer than an interface name (15 bytes)"));
            }
            if v.chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
            {
                return Err(bad(
                    "an interface name has no '/', ':', white space or control characters",
                ));
            }
            policy.patterns.push(v.to_string());
        }
        if !policy.auto && policy.patterns.is_empty() {
            return Err(PodIfaceError::BadPattern {
                value: values.join(","),
                reason: "no entry: expected auto, interface names or globs",
            });
        }
        Ok(policy)
    }

    /// Whether `name` matches one of the patterns.
    fn names(&self, name: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

/// Shell-style match of `name` against `pattern` (`*`: any run, `?`: one byte).
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it is trying to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// What the kind of a link is, as far as pod discovery cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A veth end.
    Veth,
    /// A Linux bridge.
    Bridge,
    /// The loopback device.
    Loopback,
    /// Anything else.
    Other,
}

/// One link, as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: LinkKind,
    /// The bridge (or other master) it is a port of.
    pub master: Option<u32>,
    /// Its peer (a veth's other end) lives in another network namespace (`IFLA_LINK_NETNSID`).
    pub peer_elsewhere: bool,
}

impl LinkFacts {
    /// From a `RTM_NEWLINK` message (a dump entry or an event).
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut facts = Self {
            index: msg.header.index,
            name: String::new(),
            kind: if msg.header.flags.contains(LinkFlags::Loopback) {
                LinkKind::Loopback
            } else {
                LinkKind::Other
            },
            master: None,
            peer_elsewhere: false,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => facts.name.clone_from(name),
                LinkAttribute::Controller(index) if *index != 0 => facts.master = Some(*index),
                LinkAttribute::LinkNetNsId(_) => facts.peer_elsewhere = true,
                LinkAttribute::LinkInfo(infos) if facts.kind == LinkKind::Other => {
                    for info in infos {
                        match info {
                            NlLinkInfo::Kind(InfoKind::Veth) => facts.kind = LinkKind::Veth,
                            NlLinkInfo::Kind(InfoKind::Bridge) => facts.kind = LinkKind::Bridge,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        facts
    }

    /// A veth whose other end is in another network namespace.
    fn is_foreign_veth(&self) -> bool {
        self.kind == LinkKind::Veth && self.peer_elsewhere
    }
}

/// The pod-facing interfaces among `links` (name → ifindex): by shape when `policy.auto`, and
/// every link `policy` names; never one of `external` (the uplink and overlay devices) nor
/// loopback. See the module notes.
pub fn pod_facing(
    links: &[LinkFacts],
    external: &BTreeSet<String>,
    policy: &PodIfacePolicy,
) -> BTreeMap<String, u32> {
    let pod_bridges: BTreeSet<u32> = links
        .iter()
        .filter(|l| l.is_foreign_veth())
        .filter_map(|l| l.master)
        .collect();
    links
        .iter()
        .filter(|l| l.kind != LinkKind::Loopback && !external.contains(&l.name))
        .filter(|l| {
            let by_shape = match l.kind {
                LinkKind::Veth => l.is_foreign_veth() && l.master.is_none(),
                LinkKind::Bridge => pod_bridges.contains(&l.index),
                _ => false,
            };
            (policy.auto && by_shape) || policy.names(&l.name)
        })
        .map(|l| (l.name.clone(), l.index))
        .collect()
}

/// What a burst of netlink events was about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// A link appeared, changed or went.
    pub links: bool,
    /// An address was added or removed.
    pub addresses: bool,
}

/// The netlink edge: link and address events of the calling thread's network namespace, and
/// link dumps.
pub struct LinkWatch {
    handle: Handle,
    events: futures::channel::mpsc::UnboundedReceiver<(
        netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl LinkWatch {
    /// Subscribes to link and IPv4/IPv6 address events (before any dump, so nothing that
    /// happens after the first dump is missed). Spawns the connection on the current tokio
    /// runtime.
    pub fn subscribe() -> Result<Self, PodIfaceError> {
        let (conn, handle, events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .map_err(PodIfaceError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle, events })
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkFacts>, PodIfaceError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|msg| LinkFacts::from_message(&msg))
            .try_collect()
            .await
            .map_err(PodIfaceError::Dump)
    }

    /// Waits for the next event, then takes every event already queued behind it; what they
    /// were about.
    pub async fn changed(&mut self) -> Result<Changes, PodIfaceError> {
        let first = self.events.next().await.ok_or(PodIfaceError::Closed)?;
        let mut changes = Changes::default();
        let mut note = |payload: &NetlinkPayload<RouteNetlinkMessage>| match payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
            ) => changes.links = true,
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
            ) => changes.addresses = true,
            _ => {}
        };
        note(&first.0.payload);
        while let Ok((msg, _)) = self.events.try_recv() {
            note(&msg.payload);
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: LinkKind) -> LinkFacts {
        LinkFacts {
            index,
            name: name.into(),
            kind,
            master: None,
            peer_elsewhere: false,
        }
    }

    fn pod_veth(index: u32, name: &str, master: Option<u32>) -> LinkFacts {
        LinkFacts {
            master,
            peer_elsewhere: true,
            ..link(index, name, LinkKind::Veth)
        }
    }

    fn external() -> BTreeSet<String> {
        ["eth0", "flannel.1"].map(String::from).into()
    }

    fn names(found: &BTreeMap<String, u32>) -> Vec<&str> {
        found.keys().map(String::as_str).collect()
    }

    #[test]
    fn finds_pod_bridges_and_routed_veths_by_shape() {
        let links = vec![
            link(1, "lo", LinkKind::Loopback),
            // The uplink is a veth to another namespace too (a node in a container, the rig).
            pod_veth(2, "eth0", None),
            link(3, "flannel.1", LinkKind::Other),
            // A pod bridge of any name, with a pod's veth as a port; the port gets nothing.
            link(4, "podbr0", LinkKind::Bridge),
            pod_veth(5, "veth1a2b", Some(4)),
            // A bridge without pods (yet), and one whose only port is a same-namespace veth.
            link(6, "cni0", LinkKind::Bridge),
            link(7, "br-lab", LinkKind::Bridge),
            LinkFacts {
                master: Some(7),
                ..link(8, "lab0", LinkKind::Veth)
            },
            link(9, "lab1", LinkKind::Veth),
            // Routed pods: twill-cni routed, ptp, Calico.
            pod_veth(10, "tw809b7fc74faa", None),
            pod_veth(11, "cali12ab", None),
            link(12, "enp1s0", LinkKind::Other),
        ];
        let found = pod_facing(&links, &external(), &PodIfacePolicy::default());
        assert_eq!(names(&found), ["cali12ab", "podbr0", "tw809b7fc74faa"]);
        assert_eq!(found["podbr0"], 4);
    }

    #[test]
    fn named_interfaces_add_to_or_replace_the_shapes() {
        let links = vec![
            link(2, "eth0", LinkKind::Other),
            link(4, "cni0", LinkKind::Bridge),
            link(5, "weave", LinkKind::Other),
            pod_veth(10, "cali1", None),
            pod_veth(11, "cali2", None),
            pod_veth(12, "veth9", None),
        ];
        let parse = |v: &[&str]| {
            PodIfacePolicy::parse(&v.iter().map(|s| (*s).to_string()).collect::<Vec<_>>()).unwrap()
        };
        let only = parse(&["cni0", "cali*"]);
        assert_eq!(
            names(&pod_facing(&links, &external(), &only)),
            ["cali1", "cali2", "cni0"]
        );
        let both = parse(&["auto", "weave"]);
        assert_eq!(
            names(&pod_facing(&links, &external(), &both)),
            ["cali1", "cali2", "veth9", "weave"]
        );
        // The uplink is never a pod interface, even when a glob matches it.
        let all = parse(&["*"]);
        assert!(!pod_facing(&links, &external(), &all).contains_key("eth0"));
    }

    #[test]
    fn bad_entries_are_refused_with_the_value() {
        let parse = |v: &[&str]| {
            PodIfacePolicy::parse(&v.iter().map(|s| (*s).to_string()).collect::<Vec<_>>())
        };
        for (value, why) in [
            ("", "empty"),
            ("a-very-long-interface-name", "longer"),
            ("eth0/1", "'/'"),
            ("br 0", "white space"),
        ] {
            let err = parse(&["auto", value]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{value:?}")) && err.contains(why),
                "{value:?}: {err}"
            );
        }
        assert_eq!(parse(&["auto"]).unwrap(), PodIfacePolicy::default());
    }

    #[test]
    fn globs_match_like_a_shell() {
        for (p, n, want) in [
            ("cali*", "cali12ab", true),
            ("cali*", "cal", false),
            ("*", "", true),
            ("veth?", "veth1", true),
            ("veth?", "veth12", false),
            ("*br*", "podbr0", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("cni0", "cni0", true),
            ("cni0", "cni01", false),
        ] {
            assert_eq!(glob(p.as_bytes(), n.as_bytes()), want, "{p} vs {n}");
        }
    }

    #[test]
    fn link_messages_give_kind_master_and_peer() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.attributes = vec![
            LinkAttribute::IfName("veth0".into()),
            LinkAttribute::Controller(3),
            LinkAttribute::LinkNetNsId(1),
            LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::Veth)]),
        ];
        assert_eq!(
            LinkFacts::from_message(&msg),
            LinkFacts {
                index: 7,
                name: "veth0".into(),
                kind: LinkKind::Veth,
                master: Some(3),
                peer_elsewhere: true,
            }
        );
        let mut lo = LinkMessage::default();
        lo.header.flags = LinkFlags::Loopback | LinkFlags::Up;
        lo.attributes = vec![LinkAttribute::IfName("lo".into())];
        assert_eq!(LinkFacts::from_message(&lo).kind, LinkKind::Loopback);
    }
}
