//! Choosing the service dataplane (`--proxy-mode`), and cleaning up the ones not chosen.
//!
//! Why it is shaped as it is:
//! - `auto` prefers eBPF, then nftables, then iptables, and says why: the choice is a pure
//!   function of what was requested and what the node can do ([`choose`]), logged and exported
//!   as `twill_services_dataplane_info{mode,reason}`.
//! - eBPF is "available" when twill's programs load and attach (the agent tries for real and
//!   falls back on the error); `TWILL_TEST_DISABLE_EBPF=1` makes it unavailable, so the
//!   fallback can be tested on a machine that has eBPF.
//! - **Switching modes cleans up the previous mode's state** ([`cleanup_except`]): the
//!   `inet twill` table, every `TWILL-` iptables chain (both backends) and the pinned eBPF
//!   links and maps (unpinning a link detaches its program). Each is a no-op where there is
//!   nothing, so it runs on every start; a node never has two service dataplanes at once.
//! - [`AnyLb`] lets the service loop drive whichever was chosen through one type.

pub mod conntrack;
pub mod ebpf;
#[cfg(test)]
mod golden;
pub mod iptables;
pub mod nft;
pub mod sockopt;

use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use self::iptables::{IptBackend, IptLb};
use self::nft::NftLb;
use super::lb::{BackendState, LbDataplane, LbError, LbPlan, LbService, StaleBackend};
use crate::services::dataplane::ebpf::EbpfLb;

/// Deletes the UDP conntrack entries of `stale` backends with `purge` (not called when there
/// are none) and logs how many went; a failure is logged, not returned: the entries left
/// behind time out, and the plan itself was applied.
pub(crate) fn purge_stale_udp<E: std::fmt::Display>(
    stale: &[StaleBackend],
    purge: impl FnOnce(&[StaleBackend]) -> Result<Option<usize>, E>,
) {
    if stale.is_empty() {
        return;
    }
    match purge(stale) {
        Ok(Some(n)) if n > 0 => {
            debug!(
                deleted = n,
                "deleted UDP conntrack entries of removed backends"
            );
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "delete UDP conntrack entries of removed backends"),
    }
}

/// The metadata the netfilter dataplanes keep in a frontend's comment, from which a read-back
/// rebuilds the service: `<id> <kind> <flags> <affinity timeout> <name>`, where the flags are
/// `e` (external traffic local), `i` (internal traffic local) and `t` (serving only terminating
/// endpoints), `-` for none, and an unset timeout is `-`. Each dataplane clips it to what its
/// comments hold.
pub(crate) fn record_meta(svc: &LbService) -> String {
    let mut flags = String::new();
    if svc.external_local {
        flags.push('e');
    }
    if svc.internal_local {
        flags.push('i');
    }
    if svc
        .backends
        .first()
        .is_some_and(|b| b.state == BackendState::ServingTerminating)
    {
        flags.push('t');
    }
    if flags.is_empty() {
        flags.push('-');
    }
    let aff = svc
        .affinity_timeout_secs
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    format!(
        "{} {} {flags} {aff} {}",
        svc.id,
        svc.frontend.kind.as_str(),
        svc.name
    )
}

/// The environment variable that makes eBPF unavailable (tests of `auto`'s fallback).
pub const DISABLE_EBPF_ENV: &str = "TWILL_TEST_DISABLE_EBPF";

/// The service proxy mode asked for (`--proxy-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// No service dataplane.
    None,
    /// Socket-level load balancing on cgroup hooks and tc programs with conntrack.
    Ebpf,
    /// The `inet twill` nftables table.
    Nftables,
    /// kube-proxy's iptables chains.
    Iptables,
    /// eBPF where twill's programs load and attach, else nftables, else iptables.
    Auto,
}

impl ProxyMode {
    /// Its name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::None => "none",
            ProxyMode::Ebpf => "ebpf",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A concrete proxy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Socket LB + tc.
    Ebpf,
    /// The `inet twill` table.
    Nftables,
    /// kube-proxy's chains.
    Iptables,
}

impl Mode {
    /// Its name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
        }
    }
}

/// What the node can do, as probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `Err(why)` when eBPF cannot be used.
    pub ebpf: Result<(), String>,
    /// `Err(why)` when nf_tables cannot be used.
    pub nftables: Result<(), String>,
}

impl Default for Probe {
    /// Nothing probed yet: everything assumed available.
    fn default() -> Self {
        Probe {
            ebpf: Ok(()),
            nftables: Ok(()),
        }
    }
}

/// Picks the mode for `requested` and says why; `None` for [`ProxyMode::None`].
pub fn choose(requested: ProxyMode, probe: &Probe) -> Option<(Mode, String)> {
    match requested {
        ProxyMode::None => None,
        ProxyMode::Ebpf => Some((Mode::Ebpf, "requested".into())),
        ProxyMode::Nftables => Some((Mode::Nftables, "requested".into())),
        ProxyMode::Iptables => Some((Mode::Iptables, "requested".into())),
        ProxyMode::Auto => Some(match (&probe.ebpf, &probe.nftables) {
            (Ok(()), _) => (Mode::Ebpf, "auto: eBPF programs load and attach".into()),
            (Err(e), Ok(())) => (Mode::Nftables, format!("auto: eBPF unavailable ({e})")),
            (Err(e), Err(n)) => (
                Mode::Iptables,
                format!("auto: eBPF unavailable ({e}); nftables unavailable ({n})"),
            ),
        }),
    }
}

/// Whether the test hook disables eBPF.
pub fn ebpf_disabled() -> bool {
    std::env::var(DISABLE_EBPF_ENV).is_ok_and(|v| v == "1")
}

/// Removes the eBPF service dataplane's pins under `pin_dir` (links first: unpinning detaches).
fn remove_ebpf_pins(pin_dir: &Path) -> usize {
    let mut removed = 0;
    let links = pin_dir.join("links");
    for dir in [links.as_path(), pin_dir] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() || p.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                match std::fs::remove_file(&p) {
                    Ok(()) => removed += 1,
                    Err(err) => warn!(path = %p.display(), error = %err, "unpin"),
                }
            }
        }
    }
    let _ = std::fs::remove_dir(&links);
    let _ = std::fs::remove_dir(pin_dir);
    removed
}

/// Removes every service dataplane but `keep`'s: the nftables table, `TWILL-` chains of both
/// iptables backends, eBPF pins under `pin_dir`. Errors are logged, not returned: a leftover
/// of another mode must not keep the chosen one from starting.
pub fn cleanup_except(keep: Mode, pin_dir: &Path) {
    if keep != Mode::Nftables {
        match NftLb::uninstall() {
            Ok(true) => info!("removed the nftables service table of an earlier proxy mode"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "remove the nftables service table"),
        }
    }
    if keep != Mode::Iptables {
        for b in [IptBackend::Legacy, IptBackend::Nft] {
            match IptLb::uninstall(b) {
                Ok(0) => {}
                Ok(n) => info!(
                    backend = b.as_str(),
                    chains = n,
                    "removed iptables service chains of an earlier proxy mode"
                ),
                Err(e) => {
                    warn!(backend = b.as_str(), error = %e, "remove iptables service chains");
                }
            }
        }
    }
    if keep != Mode::Ebpf {
        let n = remove_ebpf_pins(pin_dir);
        if n > 0 {
            info!(pins = n, dir = %pin_dir.display(), "removed eBPF service pins of an earlier proxy mode");
        }
    }
}

/// Makes bridged pod traffic pass the IP hooks (br_netfilter), which the netfilter
/// dataplanes need for a pod reaching a service whose backend sits on the same bridge.
pub fn ensure_bridge_nf() {
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = Path::new("/proc/sys/net/bridge").join(f);
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => match std::fs::write(&path, "1") {
                Ok(()) => info!(sysctl = %path.display(), "enabled"),
                Err(e) => warn!(sysctl = %path.display(), error = %e, "enable"),
            },
            Err(_) => warn!(
                sysctl = %path.display(),
                "br_netfilter is not available: pods reaching a service backed by a pod on the same bridge may fail"
            ),
        }
    }
}

/// The chosen dataplane.
pub enum AnyLb {
    /// eBPF, shared with the agent's helpers.
    Ebpf(Arc<Mutex<EbpfLb>>),
    /// nftables.
    Nft(NftLb),
    /// iptables.
    Ipt(IptLb),
}

impl LbDataplane for AnyLb {
    fn mode(&self) -> &'static str {
        match self {
            AnyLb::Ebpf(d) => d.mode(),
            AnyLb::Nft(d) => d.mode(),
            AnyLb::Ipt(d) => d.mode(),
        }
    }

    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError> {
        match self {
            AnyLb::Ebpf(d) => d.apply(plan),
            AnyLb::Nft(d) => d.apply(plan),
            AnyLb::Ipt(d) => d.apply(plan),
        }
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        match self {
            AnyLb::Ebpf(d) => d.observed(),
            AnyLb::Nft(d) => d.observed(),
            AnyLb::Ipt(d) => d.observed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_ebpf_then_nftables_then_iptables() {
        let all = Probe {
            ebpf: Ok(()),
            nftables: Ok(()),
        };
        assert_eq!(choose(ProxyMode::Auto, &all).unwrap().0, Mode::Ebpf);
        let no_ebpf = Probe {
            ebpf: Err("disabled".into()),
            nftables: Ok(()),
        };
        let (m, why) = choose(ProxyMode::Auto, &no_ebpf).unwrap();
        assert_eq!(m, Mode::Nftables);
        assert!(why.contains("disabled"), "{why}");
        let none = Probe {
            ebpf: Err("no BTF".into()),
            nftables: Err("EPROTONOSUPPORT".into()),
        };
        assert_eq!(choose(ProxyMode::Auto, &none).unwrap().0, Mode::Iptables);
        assert_eq!(
            choose(ProxyMode::Iptables, &all).unwrap(),
            (Mode::Iptables, "requested".into())
        );
        assert_eq!(choose(ProxyMode::None, &all), None);
    }
}
