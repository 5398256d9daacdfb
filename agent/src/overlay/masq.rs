//! `--ip-masq`: masquerade pod traffic that leaves the cluster network, and nothing else.
//!
//! The rules are flannel's four, in an nftables table twill owns (`inet twill-masq`), replaced as a
//! whole in one atomic transaction (`table` + `delete table` + the new table in one `nft -f`
//! batch), so there is never a moment without rules and nothing outside the table is touched.
//!
//! 1. pod → pod inside the cluster network: untouched;
//! 2. pod → outside (not multicast): masquerade;
//! 3. outside → this node's pods: untouched;
//! 4. host → remote pods: masquerade, so replies come back through the overlay.

use std::fmt::Write as _;
use std::process::Stdio;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::io::AsyncWriteExt;

/// The nftables table twill owns for masquerading.
pub const TABLE: &str = "twill-masq";

/// Errors applying the rules.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    /// `nft` could not be run.
    #[error("run nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the batch.
    #[error("nft -f rejected the {TABLE} table: {0}")]
    Rejected(String),
}

/// What to masquerade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqSpec {
    /// The cluster IPv4 network and this node's IPv4 subnet.
    pub v4: Option<(Ipv4Net, Ipv4Net)>,
    /// The cluster IPv6 network and this node's IPv6 subnet.
    pub v6: Option<(Ipv6Net, Ipv6Net)>,
}

/// Renders the whole transaction: create-if-absent, delete, recreate — atomic in nft.
pub fn render(spec: &MasqSpec) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{}}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    let _ = writeln!(out, "  chain postrouting {{");
    let _ = writeln!(
        out,
        "    type nat hook postrouting priority srcnat; policy accept;"
    );
    if let Some((net, sn)) = spec.v4 {
        let _ = writeln!(out, "    ip saddr {net} ip daddr {net} return");
        let _ = writeln!(
            out,
            "    ip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random"
        );
        let _ = writeln!(out, "    ip saddr != {net} ip daddr {sn} return");
        let _ = writeln!(
            out,
            "    ip saddr != {net} ip daddr {net} masquerade fully-random"
        );
    }
    if let Some((net, sn)) = spec.v6 {
        let _ = writeln!(out, "    ip6 saddr {net} ip6 daddr {net} return");
        let _ = writeln!(
            out,
            "    ip6 saddr {net} ip6 daddr != ff00::/8 masquerade fully-random"
        );
        let _ = writeln!(out, "    ip6 saddr != {net} ip6 daddr {sn} return");
        let _ = writeln!(
            out,
            "    ip6 saddr != {net} ip6 daddr {net} masquerade fully-random"
        );
    }
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

/// Removes the table (when `--ip-masq` is turned off).
pub fn render_delete() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

/// Runs one `nft -f -` batch.
pub async fn nft_batch(batch: &str) -> Result<(), MasqError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(batch.as_bytes())
        .await
        .map_err(MasqError::Spawn)?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(MasqError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MasqError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Whether twill's table is present (a resync re-applies it when someone deleted it).
pub async fn present() -> bool {
    tokio::process::Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_rules_in_own_table() {
        let text = render(&MasqSpec {
            v4: Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.3.0/24".parse().unwrap(),
            )),
            v6: None,
        });
        assert!(text.starts_with("table inet twill-masq {}\ndelete table inet twill-masq\n"));
        assert!(text.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"));
        assert!(text.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return"));
        assert_eq!(text.matches("masquerade").count(), 2);
        assert!(!text.contains("ip6"));
    }
}
