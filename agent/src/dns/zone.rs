//! The cluster zone: every name twill answers for, built from the Services and EndpointSlices the
//! model accepted, as plain data the server looks names up in.
//!
//! Why this shape:
//! - Names follow Kubernetes' DNS specification for Services, so that swapping twill's server
//!   for CoreDNS later changes nothing for clients:
//!   `<svc>.<ns>.svc.<domain>` has the A/AAAA records of the ClusterIPs; a headless Service's
//!   name has the addresses of its ready endpoints instead (Swarm's `dnsrr`), and each such
//!   endpoint gets a name of its own, `<dashed address>.<svc>.<ns>.svc.<domain>` (no model
//!   object carries endpoint host names); `_<port>._<proto>.<svc>.<ns>.svc.<domain>` has an SRV
//!   record per named port (one per endpoint for a headless Service); an ExternalName Service's
//!   name is a CNAME of its `externalName`.
//! - The zone is built whole from its inputs ([`ZoneBuilder`]) and then only read: the server
//!   swaps in a new one, and a query never waits for an update. Containers' names and aliases
//!   are another input of the same builder later, beside [`ZoneBuilder::service`].
//! - Lookups answer [`Lookup::Outside`] for names not under the domain (the server forwards
//!   them), [`Lookup::NxDomain`] for names under it that do not exist, [`Lookup::NoData`] for
//!   names that exist without records of the type asked (the names between a record and the
//!   domain included, as RFC 8020 wants of empty non-terminals).
//! - The zone holds no wire types: records are [`Rr`] values the server turns into messages, so
//!   the zone's tests read as the specification does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::services::model::{EndpointSlice, Protocol, Service, ServiceType};

/// The cluster domain when none is given (`--dns-domain`).
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// A record of the zone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rr {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// A service location: the port on the named target.
    Srv {
        /// The port.
        port: u16,
        /// The target's name (lower case, no trailing dot).
        target: String,
    },
    /// An alias (ExternalName).
    Cname(String),
}

/// The record types a query can ask for, as far as the zone tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qtype {
    /// A.
    A,
    /// AAAA.
    Aaaa,
    /// SRV.
    Srv,
    /// CNAME.
    Cname,
    /// ANY: every record of the name.
    Any,
    /// Any other type (never held by the zone).
    Other,
}

/// What the zone says about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Records of the name (for a CNAME name, its CNAME whatever the type asked).
    Answer(&'a [Rr]),
    /// The name exists but has no record of that type.
    NoData,
    /// The name is under the domain and does not exist.
    NxDomain,
    /// The name is not under the domain.
    Outside,
}

/// The names of the cluster domain and their records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// Lower case, no trailing dot.
    domain: String,
    /// Lower-case names without the trailing dot, each with its records sorted by type (A,
    /// AAAA, SRV, CNAME); names between a record and the domain are present with none.
    names: HashMap<String, Vec<Rr>>,
}

impl Zone {
    /// The cluster domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// How many names the zone holds (the domain and the names between included).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the zone holds no name at all (not even its domain: a zone never built).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Looks `name` up (any case; a trailing dot or none).
    pub fn lookup(&self, name: &str, qtype: Qtype) -> Lookup<'_> {
        let name = name.strip_suffix('.').unwrap_or(name);
        // Lower-casing allocates only when a letter needs it (names are usually lower case).
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if !in_domain(name, &self.domain) {
            return Lookup::Outside;
        }
        let Some(records) = self.names.get(name) else {
            return Lookup::NxDomain;
        };
        let range = match qtype {
            _ if matches!(records.first(), Some(Rr::Cname(_))) => records.as_slice(),
            Qtype::Any => records.as_slice(),
            Qtype::A => of_kind(records, |r| matches!(r, Rr::A(_))),
            Qtype::Aaaa => of_kind(records, |r| matches!(r, Rr::Aaaa(_))),
            Qtype::Srv => of_kind(records, |r| matches!(r, Rr::Srv { .. })),
            Qtype::Cname | Qtype::Other => &[],
        };
        if range.is_empty() {
            Lookup::NoData
        } else {
            Lookup::Answer(range)
        }
    }
}

/// The contiguous run of `records` (sorted by kind) that `is` picks.
fn of_kind(records: &[Rr], is: impl Fn(&Rr) -> bool) -> &[Rr] {
    let Some(start) = records.iter().position(&is) else {
        return &[];
    };
    let len = records[start..].iter().take_while(|r| is(r)).count();
    &records[start..start + len]
}

/// Whether lower-case `name` is `domain` or under it.
fn in_domain(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

/// Builds a [`Zone`] from its inputs.
#[derive(Debug)]
pub struct ZoneBuilder {
    domain: String,
    names: BTreeMap<String, BTreeSet<Rr>>,
}

impl ZoneBuilder {
    /// An empty zone for `domain` (already validated: see [`super::config::parse_domain`]).
    pub fn new(domain: &str) -> Self {
        let domain = domain
            .strip_suffix('.')
            .unwrap_or(domain)
            .to_ascii_lowercase();
        let mut names = BTreeMap::new();
        names.insert(domain.clone(), BTreeSet::new());
        ZoneBuilder { domain, names }
    }

    /// Adds the records of a Service (validated by the model) and of its EndpointSlices.
    pub fn service<'a>(
        &mut self,
        svc: &Service,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> &mut Self {
        let (ns, name) = svc.key();
        let fqdn = format!("{name}.{ns}.svc.{}", self.domain);
        if svc.type_() == ServiceType::ExternalName {
            if let Some(target) = svc.spec.external_name.as_deref() {
                let target = target.strip_suffix('.').unwrap_or(target);
                if is_dns_name(target) {
                    self.add(&fqdn, Rr::Cname(target.to_ascii_lowercase()));
                }
            }
            return self;
        }
        self.add_name(&fqdn);
        let named_ports = svc.spec.ports.iter().filter(|p| !p.name().is_empty());
        if svc.is_headless() {
            let slices: Vec<&EndpointSlice> = slices.into_iter().collect();
            // Every ready endpoint once, with its own name.
            let mut hosts: BTreeMap<IpAddr, String> = BTreeMap::new();
            for slice in &slices {
                for ep in slice.endpoints.iter().filter(|e| e.ready()) {
                    if let Some(ip) = ep.address() {
                        hosts
                            .entry(ip)
                            .or_insert_with(|| format!("{}.{fqdn}", dashed(ip)));
                    }
                }
            }
            for (ip, host) in &hosts {
                self.add(&fqdn, address(*ip));
                self.add(host, address(*ip));
            }
            for sp in named_ports {
                let srv = srv_name(sp.name(), sp.protocol.unwrap_or_default(), &fqdn);
                self.add_name(&srv);
                for slice in &slices {
                    // The endpoints' port of that name in this slice, else the Service's.
                    let port = slice
                        .ports
                        .iter()
                        .find(|p| {
                            p.name.as_deref() == Some(sp.name())
                                && p.protocol.unwrap_or_default() == sp.protocol.unwrap_or_default()
                        })
                        .and_then(|p| p.port)
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(sp.port());
                    for ep in slice.endpoints.iter().filter(|e| e.ready()) {
                        if let Some(host) = ep.address().and_then(|ip| hosts.get(&ip)) {
                            self.add(
                                &srv,
                                Rr::Srv {
                                    port,
                                    target: host.clone(),
                                },
                            );
                        }
                    }
                }
            }
        } else {
            for ip in svc.cluster_ips() {
                self.add(&fqdn, address(ip));
            }
            for sp in named_ports {
                let srv = srv_name(sp.name(), sp.protocol.unwrap_or_default(), &fqdn);
                self.add(
                    &srv,
                    Rr::Srv {
                        port: sp.port(),
                        target: fqdn.clone(),
                    },
                );
            }
        }
        self
    }

    /// Adds the Services of `services` with their slices (`slices` keyed by the Service's
    /// namespace and name, as [`EndpointSlice::service`] names it).
    pub fn services<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: &BTreeMap<(String, String), Vec<&'a EndpointSlice>>,
    ) -> &mut Self {
        for svc in services {
            let own = slices
                .get(&svc.key())
                .map(Vec::as_slice)
                .unwrap_or_default();
            self.service(svc, own.iter().copied());
        }
        self
    }

    /// The zone.
    pub fn build(self) -> Zone {
        Zone {
            domain: self.domain,
            names: self
                .names
                .into_iter()
                .map(|(name, records)| (name, records.into_iter().collect()))
                .collect(),
        }
    }

    fn add(&mut self, name: &str, rr: Rr) {
        self.add_name(name);
        if let Some(set) = self.names.get_mut(name) {
            set.insert(rr);
        }
    }

    /// Adds `name` (under the domain) and every name between it and the domain.
    fn add_name(&mut self, name: &str) {
        let mut at = name;
        while at.len() > self.domain.len() {
            if self.names.contains_key(at) {
                break;
            }
            self.names.insert(at.to_string(), BTreeSet::new());
            match at.split_once('.') {
                Some((_, rest)) => at = rest,
                None => break,
            }
        }
    }
}

fn address(ip: IpAddr) -> Rr {
    match ip {
        IpAddr::V4(v4) => Rr::A(v4),
        IpAddr::V6(v6) => Rr::Aaaa(v6),
    }
}

/// `_<port>._<proto>.<fqdn>`.
fn srv_name(port: &str, proto: Protocol, fqdn: &str) -> String {
    let proto = match proto {
        Protocol::TCP => "tcp",
        Protocol::UDP => "udp",
        Protocol::SCTP => "sctp",
    };
    format!("_{port}._{proto}.{fqdn}")
}

/// An address as a DNS label, as CoreDNS writes an endpoint without a host name: `10-244-1-5`,
/// `fd00-10-244--5`.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// Whether `s` is a host name: dot-separated labels of letters, digits and `-` (not at either
/// end), each 1–63 characters, 253 at most in all.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
pub(crate) mod tests;
