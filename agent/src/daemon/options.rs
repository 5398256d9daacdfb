//! twilld's command line (flannel's flags and twill's own) and the typed settings it hands
//! down: each loop gets a small struct of its own ([`NodeSettings`], [`ProxyConfig`],
//! [`KubeApi`]) and nothing below the daemon reads the command line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::dns::{DnsConfig, DnsConfigError};
use crate::overlay::lease::LEASE_TTL_MINUTES;
use crate::overlay::node::NodeSettings;
use crate::overlay::node::identity::DEFAULT_NODE_ID_FILE;
use crate::services::dataplane::ProxyMode;
use crate::services::dataplane::iptables::IptBackendChoice;
use crate::services::proxy::{ProxyConfig, SourceConfig};
use crate::services::source::kube::KubeSource;
use crate::shared::etcd::EtcdArgs;
use crate::shared::kube::KubeApi;

/// Log output (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Text,
    /// JSON lines for log collectors.
    Json,
}

/// Where services come from (`--service-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceSource {
    /// Manifests kept in etcd (`twilld apply`).
    Etcd,
    /// The Kubernetes API.
    Kubernetes,
}

/// twilld's command line: flannel's flags, plus twill's own.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "twilld",
    version,
    about = "twill node agent: subnet leases and the overlay dataplane",
    args_override_self = true
)]
pub struct Options {
    /// etcd flags.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Interface to use (name or address); repeatable, first match wins. Default: the default
    /// route's interface.
    #[arg(long)]
    pub iface: Vec<String>,
    /// IPv4 address published to peers (default: the interface's address).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address published to peers (default: the interface's global address).
    #[arg(long)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where to write the node's network facts for the CNI plugin.
    #[arg(long, default_value = twill_facts::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network.
    #[arg(long)]
    pub ip_masq: bool,
    /// Renew the lease this many minutes before it expires (1 to 1439: the lease lasts 24 h).
    #[arg(
        long,
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=LEASE_TTL_MINUTES - 1)
    )]
    pub subnet_lease_renew_margin: u64,
    /// File holding this node's identity (created on first start), published with the lease
    /// (`TwillNodeID`) so that a restarted node can prove a lease is its own.
    #[arg(long, default_value = DEFAULT_NODE_ID_FILE)]
    pub node_id_file: PathBuf,
    /// Address of the /healthz listener (flannel's health check; it serves /healthz only).
    #[arg(long, default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the /healthz listener (0: off).
    #[arg(long, default_value_t = 0)]
    pub healthz_port: u16,
    /// Address for /metrics (and /healthz): IP:PORT, or a bare PORT meaning 127.0.0.1:PORT
    /// (default: off). /metrics is served here only.
    #[arg(long, value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Seconds between full resyncs that heal drift.
    #[arg(long, default_value_t = 30)]
    pub resync_interval: u64,
    /// Service proxy dataplane: `ebpf` (socket-level LB + tc), `nftables`, `iptables`, `auto`
    /// (eBPF if twill's programs load and attach, else nftables, else iptables) or `none`.
    #[arg(long, value_enum, default_value_t = ProxyMode::None)]
    pub proxy_mode: ProxyMode,
    /// iptables implementation for `--proxy-mode iptables`: `auto` (the one already holding
    /// rules, else what `iptables --version` names), `legacy` or `nft`.
    #[arg(long, value_enum, default_value_t = IptBackendChoice::Auto)]
    pub iptables_backend: IptBackendChoice,
    /// This node's name, matched against EndpointSlices' `nodeName` and, with
    /// `--kube-subnet-mgr`, the Node whose podCIDRs it uses (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// cgroup2 directory the socket-level load balancer attaches to (default: the cgroup2 root).
    #[arg(long)]
    pub lb_cgroup: Option<PathBuf>,
    /// Interfaces facing pods, which get the eBPF proxy's pod-side programs: `auto` (pod
    /// bridges of any name and routed pods' veths, found as they appear) and/or interface
    /// names or globs (`cni0`, `cali*`); comma-separated or repeated.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub pod_interfaces: Vec<String>,
    /// Directory for pinned eBPF objects.
    #[arg(long, default_value = "/sys/fs/bpf/twill")]
    pub bpf_pin_dir: PathBuf,
    /// Kubernetes API server URL; with `--kubeconfig`, replaces its server (default: the
    /// kubeconfig's, else the in-cluster service account's).
    #[arg(long)]
    pub kube_api_url: Option<String>,
    /// kubeconfig file for the Kubernetes API (flannel's `--kubeconfig-file`).
    #[arg(long, alias = "kubeconfig-file")]
    pub kubeconfig: Option<PathBuf>,
    /// Take this node's subnet from its Kubernetes Node (`spec.podCIDRs`) and publish the
    /// lease as flannel's node annotations, instead of leasing from etcd.
    #[arg(long)]
    pub kube_subnet_mgr: bool,
    /// Prefix of the node annotations in kube-subnet-mgr mode.
    #[arg(long, default_value = crate::overlay::source::annotations::DEFAULT_PREFIX)]
    pub kube_annotation_prefix: String,
    /// The network config file in kube-subnet-mgr mode (flannel's net-conf.json).
    #[arg(long, default_value = "/etc/kube-flannel/net-conf.json")]
    pub net_config_path: PathBuf,
    /// Where services come from: `etcd` or `kubernetes` (default: kubernetes when
    /// `--kube-subnet-mgr`, `--kube-api-url` or `--kubeconfig` is given).
    #[arg(long, value_enum)]
    pub service_source: Option<ServiceSource>,
    /// This proxy's name: Services labelled `service.kubernetes.io/service-proxy-name` with it
    /// are programmed, other labelled ones skipped (empty: skip every labelled one).
    #[arg(long, default_value = "")]
    pub service_proxy_name: String,
    /// kube-proxy's health server (`/healthz`, `/livez`) with the Kubernetes service source
    /// (empty: off).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Networks (CIDRs or addresses) a Service's `externalIPs` may be in to be programmed;
    /// repeatable or comma-separated. Default with the etcd service source: none (as
    /// Kubernetes' `AllowServiceExternalIPs` is now off by default); with the Kubernetes
    /// source: every one the API server admitted (restrict them there, or with this flag).
    #[arg(long, value_delimiter = ',', value_parser = crate::services::proxy::parse_allowed_network)]
    pub allowed_external_ips: Option<Vec<ipnet::IpNet>>,
    /// Serve DNS for Service names on ADDR[:PORT] (UDP and TCP; port 53 when absent);
    /// repeatable. Off when absent. Typically the node's pod-bridge gateway (the first address
    /// of its pod subnet, e.g. 10.244.1.1), so pods reach it without leaving the node; it may
    /// be given before the address exists.
    #[arg(long, value_parser = crate::dns::config::parse_listen)]
    pub dns_listen: Vec<SocketAddr>,
    /// The cluster domain: Services answer as `<svc>.<ns>.svc.<domain>`.
    #[arg(long, default_value = crate::dns::zone::DEFAULT_DOMAIN, value_parser = crate::dns::config::parse_domain)]
    pub dns_domain: String,
    /// Resolver (ADDR[:PORT]) that names outside the cluster domain are forwarded to, tried in
    /// order; repeatable. Default: the nameservers of /etc/resolv.conf, without the DNS
    /// server's own addresses.
    #[arg(long, value_parser = crate::dns::config::parse_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
}

/// `--metrics-addr`: `IP:PORT`, or a bare `PORT` on loopback (what a node-local scraper needs,
/// without publishing the node's state on every address).
pub(crate) fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    let addr = if let Ok(port) = text.parse::<u16>() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    } else {
        text.parse::<SocketAddr>().map_err(|_| {
            format!("{text:?} is not IP:PORT or a bare PORT (meaning 127.0.0.1:PORT)")
        })?
    };
    if addr.port() == 0 {
        return Err(format!(
            "{text:?} has port 0: give the port to serve /metrics on"
        ));
    }
    Ok(addr)
}

impl Options {
    /// The DNS server's settings (`None`: no `--dns-listen`, the server is off); upstreams
    /// read from `resolv_conf` when none is given. Refuses an upstream that is the server itself.
    pub fn dns_config(
        &self,
        resolv_conf: impl FnOnce() -> Vec<SocketAddr>,
    ) -> Result<Option<DnsConfig>, DnsConfigError> {
        if self.dns_listen.is_empty() {
            return Ok(None);
        }
        let (upstreams, dropped) =
            crate::dns::config::upstreams(&self.dns_upstream, resolv_conf, &self.dns_listen)?;
        if !dropped.is_empty() {
            tracing::warn!(dropped = ?dropped, "resolv.conf names the DNS server's own address: not forwarding there");
        }
        if upstreams.is_empty() {
            tracing::warn!(
                "no DNS upstream (--dns-upstream, resolv.conf): names outside the cluster domain get SERVFAIL"
            );
        }
        Ok(Some(DnsConfig {
            listen: self.dns_listen.clone(),
            domain: self.dns_domain.clone(),
            upstreams,
            ttl: crate::dns::config::DEFAULT_TTL,
            upstream_timeout: crate::dns::config::UPSTREAM_TIMEOUT,
        }))
    }

    /// Whether services come from the Kubernetes API: `--service-source`, else whenever a
    /// Kubernetes flag is given (`--kube-subnet-mgr`, `--kube-api-url`, `--kubeconfig`).
    pub fn services_from_kubernetes(&self) -> bool {
        match self.service_source {
            Some(s) => s == ServiceSource::Kubernetes,
            None => {
                self.kube_subnet_mgr || self.kube_api_url.is_some() || self.kubeconfig.is_some()
            }
        }
    }

    /// The API server the Kubernetes flags name.
    pub fn kube_api(&self) -> KubeApi {
        KubeApi {
            url: self.kube_api_url.clone(),
            kubeconfig: self.kubeconfig.clone(),
        }
    }

    /// The node's name: `--node-name`, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or_else(|_| "localhost".to_string(), |h| h.trim().to_string())
        })
    }

    /// Full resyncs this far apart (`--resync-interval`, at least a second).
    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_interval.max(1))
    }

    /// The external IPs this node programs: `--allowed-external-ips`, else none with the etcd
    /// source and every one with the Kubernetes source (the API server admitted them).
    pub fn allowed_external_ips(&self) -> Option<Vec<ipnet::IpNet>> {
        match &self.allowed_external_ips {
            Some(nets) => Some(nets.clone()),
            None if self.services_from_kubernetes() => None,
            None => Some(Vec::new()),
        }
    }

    /// The overlay loop's settings.
    pub fn node_settings(&self, node_id: Option<String>, config_location: String) -> NodeSettings {
        NodeSettings {
            iface: self.iface.clone(),
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
            subnet_file: self.subnet_file.clone(),
            ip_masq: self.ip_masq,
            renew_margin: Duration::from_secs(self.subnet_lease_renew_margin * 60),
            resync: self.resync(),
            node_id,
            config_location,
        }
    }

    /// The service proxy's settings.
    pub fn proxy_config(&self) -> ProxyConfig {
        let kube_services = self.services_from_kubernetes();
        let source = if kube_services {
            SourceConfig::Kubernetes(KubeSource {
                api: self.kube_api(),
                proxy_name: self.service_proxy_name.clone(),
                healthz_bind_address: self.healthz_bind_address.clone(),
            })
        } else {
            SourceConfig::Etcd {
                endpoints: self.etcd.etcd_endpoints.clone(),
                prefix: self.etcd.etcd_prefix.clone(),
                tls: self.etcd.tls(),
            }
        };
        // etcd is a dependency unless Kubernetes serves both leases and services.
        let uses_etcd = !(self.kube_subnet_mgr && kube_services);
        ProxyConfig {
            mode: self.proxy_mode,
            iptables_backend: self.iptables_backend,
            node_name: self.node_name(),
            lb_cgroup: self
                .lb_cgroup
                .clone()
                .unwrap_or_else(crate::services::proxy::default_cgroup),
            bpf_pin_dir: self.bpf_pin_dir.clone(),
            pod_interfaces: self.pod_interfaces.clone(),
            allowed_external_ips: self.allowed_external_ips(),
            resync: self.resync(),
            source,
            etcd_endpoints: if uses_etcd {
                self.etcd.etcd_endpoints.clone()
            } else {
                Vec::new()
            },
            kube_api: (self.kube_subnet_mgr || kube_services).then(|| self.kube_api()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("twilld").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn which_source_serves_services() {
        assert!(!opts(&[]).services_from_kubernetes());
        assert!(opts(&["--kube-subnet-mgr"]).services_from_kubernetes());
        assert!(opts(&["--kubeconfig-file", "/etc/k"]).services_from_kubernetes());
        assert!(opts(&["--kube-api-url", "http://a:8080"]).services_from_kubernetes());
        assert!(
            !opts(&["--kube-subnet-mgr", "--service-source", "etcd"]).services_from_kubernetes()
        );
        assert!(opts(&["--service-source", "kubernetes"]).services_from_kubernetes());
    }

    #[test]
    fn allowed_external_ips_flag_and_defaults() {
        let e = Options::try_parse_from(["twilld", "--allowed-external-ips", "10.0.0.1/8"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allowed-external-ips") && e.contains("10.0.0.0/8"),
            "{e}"
        );
        // Repeatable and comma-separated.
        let o = opts(&[
            "--allowed-external-ips",
            "198.18.200.0/24,192.0.2.7",
            "--allowed-external-ips=2001:db8::/64",
        ]);
        let got: Vec<String> = o
            .allowed_external_ips()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["198.18.200.0/24", "192.0.2.7/32", "2001:db8::/64"]);
        // Defaults: none with the etcd source, all (the API server's choice) with Kubernetes.
        assert_eq!(opts(&[]).allowed_external_ips(), Some(Vec::new()));
        assert_eq!(
            opts(&["--kube-api-url", "https://10.0.0.1:6443"]).allowed_external_ips(),
            None
        );
        assert_eq!(
            opts(&[
                "--kube-api-url",
                "https://10.0.0.1:6443",
                "--allowed-external-ips",
                "192.0.2.0/24"
            ])
            .allowed_external_ips()
            .map(|v| v.len()),
            Some(1)
        );
    }

    #[test]
    fn the_proxy_reserves_what_the_node_depends_on() {
        let etcd = opts(&["--etcd-endpoints", "http://198.18.0.1:2379"]).proxy_config();
        assert_eq!(etcd.etcd_endpoints, ["http://198.18.0.1:2379"]);
        assert!(etcd.kube_api.is_none());
        let kube = opts(&[
            "--kube-subnet-mgr",
            "--kube-api-url",
            "https://198.18.0.9:6443",
        ])
        .proxy_config();
        assert!(kube.etcd_endpoints.is_empty());
        assert_eq!(
            kube.kube_api.unwrap().url.as_deref(),
            Some("https://198.18.0.9:6443")
        );
    }

    #[test]
    fn renew_margin_must_be_shorter_than_the_lease() {
        for bad in ["1440", "5000", "0"] {
            let err = Options::try_parse_from(["twilld", "--subnet-lease-renew-margin", bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(bad) && err.contains("1..=1439"),
                "{bad}: {err}"
            );
        }
        let ok =
            Options::try_parse_from(["twilld", "--subnet-lease-renew-margin", "1439"]).unwrap();
        assert_eq!(ok.subnet_lease_renew_margin, 1439);
    }

    #[test]
    fn dns_flags() {
        // Off by default; resolv.conf is then not read.
        assert_eq!(opts(&[]).dns_config(|| unreachable!()).unwrap(), None);
        let c = opts(&[
            "--dns-listen",
            "10.244.1.1",
            "--dns-listen",
            "[fd00::1]:5353",
        ])
        .dns_config(|| {
            vec![
                "10.244.1.1:53".parse().unwrap(),
                "192.0.2.1:53".parse().unwrap(),
            ]
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            c.listen,
            [
                "10.244.1.1:53".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:5353".parse().unwrap()
            ]
        );
        assert_eq!(c.domain, "cluster.local");
        // resolv.conf's entry for the server itself is dropped.
        assert_eq!(c.upstreams, ["192.0.2.1:53".parse::<SocketAddr>().unwrap()]);
        let c = opts(&[
            "--dns-listen",
            "10.244.1.1",
            "--dns-domain",
            "Corp.Example.",
            "--dns-upstream",
            "192.0.2.53:5353",
        ])
        .dns_config(|| unreachable!())
        .unwrap()
        .unwrap();
        assert_eq!(c.domain, "corp.example");
        assert_eq!(
            c.upstreams,
            ["192.0.2.53:5353".parse::<SocketAddr>().unwrap()]
        );
        for (args, needle) in [
            (["--dns-listen", "10.244.1"], "--dns-listen \"10.244.1\""),
            (["--dns-domain", "a..b"], "--dns-domain \"a..b\""),
            (["--dns-upstream", "0.0.0.0"], "not a unicast address"),
        ] {
            let e = Options::try_parse_from(std::iter::once("twilld").chain(args))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let e = opts(&["--dns-listen", "10.244.1.1", "--dns-upstream", "10.244.1.1"])
            .dns_config(Vec::new)
            .unwrap_err()
            .to_string();
        assert!(e.contains("would loop"), "{e}");
    }

    #[test]
    fn modes_and_formats_are_typed() {
        let o = opts(&[
            "--proxy-mode",
            "nftables",
            "--log-format",
            "json",
            "--iptables-backend",
            "legacy",
        ]);
        assert_eq!(o.proxy_mode, ProxyMode::Nftables);
        assert_eq!(o.log_format, LogFormat::Json);
        assert_eq!(o.iptables_backend, IptBackendChoice::Legacy);
        let e = Options::try_parse_from(["twilld", "--proxy-mode", "ipvs"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ipvs") && e.contains("ebpf"), "{e}");
    }
}
