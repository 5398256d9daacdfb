//! The DNS server's settings, parsed and checked: where it listens (`--dns-listen`), its domain
//! (`--dns-domain`) and where it forwards other names (`--dns-upstream`, else the host's
//! `/etc/resolv.conf`).
//!
//! Why this shape: every value is checked before anything is bound, with an error naming it;
//! an upstream that is one of the server's own addresses would make every forwarded query
//! travel in a circle until it timed out, so a given one is refused and one read from
//! resolv.conf is dropped with a warning (a node whose resolv.conf names the node-local
//! server, as pods' do, is the usual case).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The port DNS listens on and upstreams answer on when none is given.
pub const DNS_PORT: u16 = 53;

/// The TTL of every answer: short, so that a removal reaches clients within seconds.
pub const DEFAULT_TTL: u32 = 5;

/// How long one upstream has to answer a forwarded query before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The host's resolver configuration, where upstreams come from by default.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The DNS server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Addresses to serve on (UDP and TCP).
    pub listen: Vec<SocketAddr>,
    /// The cluster domain (lower case, no trailing dot).
    pub domain: String,
    /// Resolvers other names are forwarded to, in order.
    pub upstreams: Vec<SocketAddr>,
    /// TTL of the answers, in seconds.
    pub ttl: u32,
    /// How long each upstream has to answer.
    pub upstream_timeout: Duration,
}

/// A DNS setting is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsConfigError {
    /// `--dns-listen` or `--dns-upstream` is not an address.
    #[error("{flag} {value:?}: not an IP address or IP:PORT ({reason})")]
    Address {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `--dns-domain` is not a domain name.
    #[error("--dns-domain {value:?}: {reason}")]
    Domain {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An upstream given is one of the server's own addresses.
    #[error(
        "--dns-upstream {upstream}: the server itself listens there (--dns-listen {listen}); forwarding to it would loop"
    )]
    Loop {
        /// The upstream.
        upstream: SocketAddr,
        /// The listen address it equals.
        listen: SocketAddr,
    },
}

/// `ADDR` or `ADDR:PORT` (`[V6]:PORT` for IPv6); port 53 when absent, 0 refused.
fn parse_addr(flag: &'static str, text: &str) -> Result<SocketAddr, DnsConfigError> {
    let bad = |reason: &str| DnsConfigError::Address {
        flag,
        value: text.to_string(),
        reason: reason.to_string(),
    };
    let addr = if let Ok(ip) = text.parse::<IpAddr>() {
        SocketAddr::new(ip, DNS_PORT)
    } else {
        text.parse::<SocketAddr>()
            .map_err(|e| bad(&e.to_string()))?
    };
    if addr.port() == 0 {
        return Err(bad("port 0"));
    }
    Ok(addr)
}

/// `--dns-listen`: `ADDR[:PORT]`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, DnsConfigError> {
    parse_addr("--dns-listen", text)
}

/// `--dns-upstream`: `ADDR[:PORT]`.
pub fn parse_upstream(text: &str) -> Result<SocketAddr, DnsConfigError> {
    let addr = parse_addr("--dns-upstream", text)?;
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(DnsConfigError::Address {
            flag: "--dns-upstream",
            value: text.to_string(),
            reason: "not a unicast address".into(),
        });
    }
    Ok(addr)
}

/// `--dns-domain`: a domain name of letters, digits and `-` (a trailing dot allowed); returned
/// in lower case without the dot.
pub fn parse_domain(text: &str) -> Result<String, DnsConfigError> {
    let bad = |reason| DnsConfigError::Domain {
        value: text.to_string(),
        reason,
    };
    let d = text.strip_suffix('.').unwrap_or(text);
    if d.is_empty() {
        return Err(bad("empty"));
    }
    if d.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for label in d.split('.') {
        if label.is_empty() {
            return Err(bad("an empty label"));
        }
        if label.len() > 63 {
            return Err(bad("a label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad(
                "labels are letters, digits and '-' (not first or last)",
            ));
        }
    }
    Ok(d.to_ascii_lowercase())
}

/// The `nameserver` addresses of a resolv.conf text, in order (port 53).
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A zone index (`fe80::1%eth0`) is not kept: link-local upstreams are not supported.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, DNS_PORT))
        })
        .collect()
}

/// Whether a query sent to `upstream` would reach the server listening on `listen`.
fn loops(upstream: SocketAddr, listen: &[SocketAddr]) -> Option<SocketAddr> {
    listen.iter().copied().find(|l| {
        l.port() == upstream.port()
            && (l.ip() == upstream.ip() || (l.ip().is_unspecified() && upstream.ip().is_loopback()))
    })
}

/// The upstreams: `given` (refused if one is the server itself) or else `resolv_conf`'s
/// nameservers without the server's own addresses; the second value lists what was dropped.
pub fn upstreams(
    given: &[SocketAddr],
    resolv_conf: impl FnOnce() -> Vec<SocketAddr>,
    listen: &[SocketAddr],
) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>), DnsConfigError> {
    if !given.is_empty() {
        for u in given {
            if let Some(l) = loops(*u, listen) {
                return Err(DnsConfigError::Loop {
                    upstream: *u,
                    listen: l,
                });
            }
        }
        return Ok((given.to_vec(), Vec::new()));
    }
    let (keep, dropped) = resolv_conf()
        .into_iter()
        .partition(|u| loops(*u, listen).is_none());
    Ok((keep, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listen_and_upstream_addresses() {
        assert_eq!(parse_listen("10.244.1.1").unwrap(), sa("10.244.1.1:53"));
        assert_eq!(
            parse_listen("10.244.1.1:5353").unwrap(),
            sa("10.244.1.1:5353")
        );
        assert_eq!(parse_listen("fd00::1").unwrap(), sa("[fd00::1]:53"));
        assert_eq!(
            parse_listen("[fd00::1]:5353").unwrap(),
            sa("[fd00::1]:5353")
        );
        for bad in ["", "10.244.1", "web:53", "10.244.1.1:0", "10.244.1.1:70000"] {
            let e = parse_listen(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("--dns-listen") && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
        assert_eq!(parse_upstream("192.0.2.53").unwrap(), sa("192.0.2.53:53"));
        for bad in ["0.0.0.0", "224.0.0.1:53", "::"] {
            let e = parse_upstream(bad).unwrap_err().to_string();
            assert!(e.contains("not a unicast address"), "{bad}: {e}");
        }
    }

    #[test]
    fn domains() {
        assert_eq!(parse_domain("cluster.local").unwrap(), "cluster.local");
        assert_eq!(parse_domain("Corp.Example.").unwrap(), "corp.example");
        assert_eq!(parse_domain("local").unwrap(), "local");
        for (bad, why) in [
            ("", "empty"),
            (".", "empty"),
            ("a..b", "empty label"),
            ("-a.b", "letters, digits"),
            ("a_b.c", "letters, digits"),
            ("a b", "letters, digits"),
        ] {
            let e = parse_domain(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("--dns-domain") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let long = format!("{}.local", "a".repeat(64));
        assert!(parse_domain(&long).unwrap_err().to_string().contains("63"));
    }

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch example.org\nnameserver 192.0.2.1\nnameserver  2001:db8::53\n\
                    nameserver fe80::1%eth0\noptions ndots:5\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            [sa("192.0.2.1:53"), sa("[2001:db8::53]:53")]
        );
    }

    #[test]
    fn the_server_never_forwards_to_itself() {
        let listen = [sa("10.244.1.1:53"), sa("0.0.0.0:5353")];
        // Given: refused, naming both.
        let e = upstreams(&[sa("10.244.1.1:53")], Vec::new, &listen)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--dns-upstream 10.244.1.1:53") && e.contains("--dns-listen 10.244.1.1:53"),
            "{e}"
        );
        assert!(upstreams(&[sa("127.0.0.1:5353")], Vec::new, &listen).is_err());
        // Same address, other port: fine.
        assert_eq!(
            upstreams(&[sa("10.244.1.1:5353")], Vec::new, &listen)
                .unwrap()
                .0,
            [sa("10.244.1.1:5353")]
        );
        // From resolv.conf: dropped, the rest kept in order.
        let (keep, dropped) = upstreams(
            &[],
            || vec![sa("10.244.1.1:53"), sa("192.0.2.1:53"), sa("192.0.2.2:53")],
            &listen,
        )
        .unwrap();
        assert_eq!(keep, [sa("192.0.2.1:53"), sa("192.0.2.2:53")]);
        assert_eq!(dropped, [sa("10.244.1.1:53")]);
        // Given ones win over resolv.conf, which is not even read.
        let (keep, _) = upstreams(&[sa("192.0.2.9:53")], || unreachable!(), &listen).unwrap();
        assert_eq!(keep, [sa("192.0.2.9:53")]);
    }
}
