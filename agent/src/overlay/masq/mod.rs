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
//!
//! The text is rendered by a pure function ([`render`]) and handed to `nft` through one seam,
//! [`NftRunner`]: [`NftCli`] runs the tool, [`FakeNft`] records the batches (and can refuse
//! them), so what the node sends — on start, after a lost lease, when a resync finds the table
//! gone — is tested without root, and the rendered rulesets are golden files in `golden/`
//! (`<case>.json`: the network config and the node's subnets; `<case>.nft`: the exact batch;
//! `TWILL_BLESS=1` rewrites them).

use std::fmt::Write as _;
use std::process::Stdio;
use std::sync::Mutex;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::io::AsyncWriteExt;

use crate::overlay::config::NetworkConfig;
use crate::overlay::lease::LeaseSubnets;

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

impl MasqSpec {
    /// What to masquerade for a network config and the subnets this node holds: each enabled
    /// family with both a cluster network and a subnet of its own.
    pub fn new(cfg: &NetworkConfig, own: &LeaseSubnets) -> MasqSpec {
        MasqSpec {
            v4: cfg.network.zip(own.v4).filter(|_| cfg.enable_ipv4),
            v6: cfg.ipv6_network.zip(own.v6).filter(|_| cfg.enable_ipv6),
        }
    }
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
    // Per family: its nft address keyword and multicast range, the network and the subnet.
    let families = [
        spec.v4
            .map(|(net, sn)| ("ip", "224.0.0.0/4", IpNet::V4(net), IpNet::V4(sn))),
        spec.v6
            .map(|(net, sn)| ("ip6", "ff00::/8", IpNet::V6(net), IpNet::V6(sn))),
    ];
    for (ip, multicast, net, sn) in families.into_iter().flatten() {
        let _ = writeln!(out, "    {ip} saddr {net} {ip} daddr {net} return");
        let _ = writeln!(
            out,
            "    {ip} saddr {net} {ip} daddr != {multicast} masquerade fully-random"
        );
        let _ = writeln!(out, "    {ip} saddr != {net} {ip} daddr {sn} return");
        let _ = writeln!(
            out,
            "    {ip} saddr != {net} {ip} daddr {net} masquerade fully-random"
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

/// The seam between the rules and `nft`: one batch in, and whether twill's table is there.
#[expect(async_fn_in_trait, reason = "used with generics only, never as dyn")]
pub trait NftRunner {
    /// Runs one `nft -f -` batch: all of it or nothing.
    async fn batch(&self, text: &str) -> Result<(), MasqError>;
    /// Whether twill's table is present.
    async fn present(&self) -> bool;
}

/// The real runner: the `nft` tool.
#[derive(Debug, Clone, Copy, Default)]
pub struct NftCli;

impl NftRunner for NftCli {
    async fn batch(&self, text: &str) -> Result<(), MasqError> {
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(MasqError::Spawn)?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(text.as_bytes())
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

    async fn present(&self) -> bool {
        tokio::process::Command::new("nft")
            .args(["list", "table", "inet", TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }
}

/// A recording fake of `nft`: keeps every batch it was given; the table is "present" once a
/// batch was accepted, until a test removes it. With [`FakeNft::refusing`] every batch is
/// rejected, as `nft` rejects a bad one, and nothing is recorded as applied.
#[derive(Debug, Default)]
pub struct FakeNft {
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    batches: Vec<String>,
    present: bool,
    refuse: Option<String>,
}

impl FakeNft {
    /// A fake whose `nft` rejects every batch with `stderr`.
    pub fn refusing(stderr: &str) -> FakeNft {
        let f = FakeNft::default();
        f.state.lock().expect("lock").refuse = Some(stderr.to_string());
        f
    }

    /// The batches accepted so far, in order; clears the record.
    pub fn take_batches(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().expect("lock").batches)
    }

    /// Removes the table, as `nft delete table inet twill-masq` by hand would.
    pub fn delete_table(&self) {
        self.state.lock().expect("lock").present = false;
    }
}

impl NftRunner for FakeNft {
    async fn batch(&self, text: &str) -> Result<(), MasqError> {
        let mut s = self.state.lock().expect("lock");
        if let Some(e) = &s.refuse {
            return Err(MasqError::Rejected(e.clone()));
        }
        s.batches.push(text.to_string());
        s.present = text.contains(&format!("table inet {TABLE} {{\n"));
        Ok(())
    }

    async fn present(&self) -> bool {
        self.state.lock().expect("lock").present
    }
}

/// Installs (or replaces, atomically) the rules for `spec`.
pub async fn install<R: NftRunner>(nft: &R, spec: &MasqSpec) -> Result<(), MasqError> {
    nft.batch(&render(spec)).await
}

/// Reinstalls the rules when the table is gone (someone flushed the ruleset); whether it had to.
pub async fn heal<R: NftRunner>(nft: &R, spec: &MasqSpec) -> Result<bool, MasqError> {
    if nft.present().await {
        return Ok(false);
    }
    tracing::warn!("masquerade table missing; reinstalling");
    install(nft, spec).await.map(|()| true)
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

    /// The node's side of the seam: one batch on install, nothing while the table is there, the
    /// same batch again once someone deleted it.
    #[tokio::test]
    async fn install_and_heal_through_the_runner() {
        let nft = FakeNft::default();
        let spec = MasqSpec {
            v4: Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.3.0/24".parse().unwrap(),
            )),
            v6: None,
        };
        install(&nft, &spec).await.unwrap();
        let first = nft.take_batches();
        assert_eq!(first, [render(&spec)]);
        assert!(!heal(&nft, &spec).await.unwrap());
        assert!(nft.take_batches().is_empty());
        nft.delete_table();
        assert!(heal(&nft, &spec).await.unwrap());
        assert_eq!(nft.take_batches(), first);
        // The delete batch leaves no table behind.
        nft.batch(&render_delete()).await.unwrap();
        assert!(!nft.present().await);
    }

    #[tokio::test]
    async fn a_refused_batch_names_the_table_and_nft_s_reason() {
        let nft = FakeNft::refusing("Error: Could not process rule: No such file or directory");
        let spec = MasqSpec { v4: None, v6: None };
        let err = install(&nft, &spec).await.unwrap_err().to_string();
        assert!(
            err.contains("twill-masq") && err.contains("No such file or directory"),
            "{err}"
        );
        assert!(nft.take_batches().is_empty());
        assert!(!nft.present().await);
    }

    /// Golden files: for each `golden/<case>.json` (flannel's `net-conf.json` and the subnets
    /// the node holds), the exact batch the node hands to `nft` is `golden/<case>.nft`.
    /// `TWILL_BLESS=1` rewrites the `.nft` files.
    #[tokio::test]
    async fn golden_rulesets() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/overlay/masq/golden");
        let bless = std::env::var_os("TWILL_BLESS").is_some_and(|v| v == "1");
        let mut cases = 0;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        for input in entries {
            let case: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&input).unwrap()).unwrap();
            let cfg = NetworkConfig::parse(&case["net-conf.json"].to_string()).unwrap();
            let subnet = |k: &str| case["subnets"][k].as_str().map(str::to_string);
            let own = LeaseSubnets {
                v4: subnet("v4").map(|s| s.parse().unwrap()),
                v6: subnet("v6").map(|s| s.parse().unwrap()),
            };
            let nft = FakeNft::default();
            install(&nft, &MasqSpec::new(&cfg, &own)).await.unwrap();
            let got = nft.take_batches().concat();
            let want_path = input.with_extension("nft");
            if bless {
                std::fs::write(&want_path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&want_path).unwrap_or_else(|e| {
                panic!("{}: {e} (TWILL_BLESS=1 writes it)", want_path.display())
            });
            assert_eq!(
                got,
                want,
                "{} differs from the rendered batch (TWILL_BLESS=1 rewrites it)",
                want_path.display()
            );
            cases += 1;
        }
        assert!(cases >= 2, "no golden cases in {}", dir.display());
    }
}
