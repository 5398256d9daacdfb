//! The composition root of `twilld`: the command line becomes typed settings for each loop
//! ([`options`]), the health and metrics listeners are bound, the lease store is chosen, the
//! overlay comes up ([`crate::overlay::node`]), then the service proxy starts beside it
//! ([`crate::services::proxy`]) with what it needs to know of the overlay, and both run until
//! SIGTERM/SIGINT.
//!
//! Why it is shaped as it is:
//! - Bad input ends the agent at once, before anything is retried or changed: the etcd flags and
//!   TLS files are checked as a whole, then the health and metrics addresses are bound (a port
//!   taken or an address not on the node would otherwise leave a node without the endpoint that
//!   shows whether it is alive).
//! - The service proxy starts beside the overlay loop, not before it: opening the eBPF
//!   dataplane (loading, verifying and attaching its programs) takes a second, several on a busy
//!   node, and the subnet file already lets pods be created here. Had the loop waited, those pods
//!   could neither reach nor be reached from other nodes' pods until then (the peers' routes
//!   missing here, and a peer that started as slowly missing ours), while services through the
//!   node's own backends and NodePorts already answered. A proxy that fails to start still
//!   stops twilld.
//! - The two loops share nothing but the process: the service proxy needs the overlay's device
//!   names (to attach its tc programs) and the node's pod subnets, handed over once the overlay
//!   is up; it runs on its own task and the overlay loop never waits on it.
//! - Exiting leaves the dataplane in place (as flannel does), so a restart moves no packet
//!   differently.

pub mod options;

pub use options::Options;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::overlay::backend::udp;
use crate::overlay::config::{BackendType, NetworkConfig};
use crate::overlay::node::identity::node_identity;
use crate::overlay::node::{Node, NodeFacts};
use crate::overlay::source::kube::KubeSubnetStore;
use crate::overlay::source::{EtcdStore, LeaseStore};
use crate::services::dataplane::ProxyMode;
use crate::services::proxy::OverlayView;
use crate::services::source::etcd::EtcdServiceStore;
use crate::services::source::service_cache;
use crate::shared::backoff::{retry, until_ok};
use crate::shared::metrics::{Endpoints, Metrics};
use crate::shared::shutdown::Shutdown;

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    opts.etcd.check().await.context("refusing the etcd flags")?;
    let shutdown = Shutdown::install().context("install the SIGTERM/SIGINT handlers")?;
    let metrics = Arc::new(Metrics::default());
    let mut listeners = Vec::new();
    if opts.healthz_port != 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let l = crate::shared::http::bind(addr)
            .await
            .with_context(|| format!("bind /healthz on {addr} (--healthz-ip, --healthz-port)"))?;
        listeners.push((l, Endpoints::Health));
    }
    if let Some(addr) = opts.metrics_addr {
        let l = crate::shared::http::bind(addr)
            .await
            .with_context(|| format!("bind /metrics on {addr} (--metrics-addr)"))?;
        listeners.push((l, Endpoints::MetricsAndHealth));
    }
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|(l, endpoints)| {
            tokio::spawn(crate::shared::metrics::serve_on(
                l,
                endpoints,
                metrics.clone(),
            ))
        })
        .collect();
    let dns = start_dns(&opts, &metrics)?;
    let res = Box::pin(run_node(&opts, &metrics, &shutdown)).await;
    tracing::info!("shutting down; the dataplane stays in place");
    for s in servers.into_iter().chain(dns) {
        s.abort();
    }
    res
}

/// The DNS server (`--dns-listen`), its zone fed by a service source of its own (so it runs
/// whatever `--proxy-mode`); `None` when off. Bad flags and addresses that cannot be bound end
/// the agent at start; a store not reachable yet is retried in the background, while names
/// outside the cluster domain are already forwarded.
fn start_dns(
    opts: &Options,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let resolv_conf = || match std::fs::read_to_string(crate::dns::config::RESOLV_CONF) {
        Ok(text) => crate::dns::config::resolv_conf_nameservers(&text),
        Err(e) => {
            tracing::warn!(path = crate::dns::config::RESOLV_CONF, error = %e, "reading the DNS upstreams failed");
            Vec::new()
        }
    };
    let Some(config) = opts
        .dns_config(resolv_conf)
        .context("refusing the DNS flags")?
    else {
        return Ok(None);
    };
    let started = if opts.services_from_kubernetes() {
        let (api, node, proxy_name) = (
            opts.kube_api(),
            opts.node_name(),
            opts.service_proxy_name.clone(),
        );
        crate::dns::start(
            config,
            move |tx| async move {
                let client =
                    until_ok("dns: connecting to the Kubernetes API", || api.client()).await;
                crate::services::source::kube::run_source(client, node, proxy_name, None, tx).await;
            },
            metrics,
        )
    } else {
        let (endpoints, prefix, tls) = (
            opts.etcd.etcd_endpoints.clone(),
            opts.etcd.etcd_prefix.clone(),
            opts.etcd.tls(),
        );
        crate::dns::start(
            config,
            move |tx| async move {
                let store = until_ok("dns: connecting the service source to etcd", || {
                    EtcdServiceStore::connect(&endpoints, &prefix, &tls)
                })
                .await;
                service_cache(store, tx).await;
            },
            metrics,
        )
    };
    Ok(Some(
        started.context("start the DNS server (--dns-listen)")?,
    ))
}

/// The lease store, then [`run_overlay`] over it; returns on a signal.
async fn run_node(
    opts: &Options,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    if opts.kube_subnet_mgr {
        let api = opts.kube_api();
        let node = opts.node_name();
        let Some(s) = retry(
            "start the kube subnet manager",
            metrics,
            shutdown,
            || async {
                Ok(KubeSubnetStore::connect(
                    &api,
                    &node,
                    &opts.kube_annotation_prefix,
                    &opts.net_config_path,
                )
                .await?)
            },
        )
        .await
        else {
            return Ok(());
        };
        let config_location = s.config_location();
        Box::pin(run_overlay(s, config_location, opts, metrics, shutdown)).await
    } else {
        let tls = opts.etcd.tls();
        let Some(s) = retry("connect to etcd", metrics, shutdown, || async {
            Ok(EtcdStore::connect(&opts.etcd.etcd_endpoints, &opts.etcd.etcd_prefix, &tls).await?)
        })
        .await
        else {
            return Ok(());
        };
        let config_location = s.config_location();
        Box::pin(run_overlay(s, config_location, opts, metrics, shutdown)).await
    }
}

/// The overlay over `store` (its network config read from `config_location`), then the
/// service proxy; returns on a signal.
async fn run_overlay<S: LeaseStore + Clone>(
    store: S,
    config_location: String,
    opts: &Options,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let node_id = if opts.kube_subnet_mgr {
        None
    } else {
        Some(node_identity(&opts.node_id_file)?)
    };
    let settings = opts.node_settings(node_id, config_location.clone());
    let proxy_mode = opts.proxy_mode;
    // The eBPF proxy cannot run over the udp backend: refused before anything is created.
    let accept = move |cfg: &NetworkConfig| -> anyhow::Result<()> {
        if cfg.backend.kind == BackendType::Udp {
            udp::check_proxy_mode(proxy_mode == ProxyMode::Ebpf).with_context(|| {
                format!(
                    "refusing --proxy-mode {proxy_mode} with the network config at {config_location}"
                )
            })?;
        }
        Ok(())
    };
    let Some(node) = Box::pin(Node::start(
        store,
        settings,
        accept,
        metrics.clone(),
        shutdown.clone(),
    ))
    .await?
    else {
        return Ok(());
    };
    // The service proxy starts on a task of its own beside the overlay loop (see the module
    // notes); a proxy that fails to start still stops twilld.
    let mut proxy_start = tokio::spawn({
        let (config, view, metrics) = (
            opts.proxy_config(),
            overlay_view(&node.facts()),
            metrics.clone(),
        );
        async move { crate::services::proxy::start(&config, &view, &metrics).await }
    });
    let mut run = Box::pin(node.run());
    let services = tokio::select! {
        res = &mut run => {
            proxy_start.abort();
            return res;
        }
        started = &mut proxy_start => started
            .context("start the service proxy")?
            .context("start the service proxy")?,
    };
    let res = run.await;
    if let Some(s) = services {
        s.abort();
    }
    res
}

/// What the service proxy needs to know of the overlay.
fn overlay_view(facts: &NodeFacts) -> OverlayView {
    OverlayView {
        uplink: facts.uplink.name.clone(),
        devices: [&facts.devices.v4, &facts.devices.v6]
            .into_iter()
            .flatten()
            .map(|d| d.name.clone())
            .collect(),
        l3_devices: facts.backend == BackendType::Udp,
        node_addresses: facts.uplink.nets.iter().map(ipnet::IpNet::addr).collect(),
        pod_subnets: facts
            .subnets
            .v4
            .map(ipnet::IpNet::V4)
            .into_iter()
            .chain(facts.subnets.v6.map(ipnet::IpNet::V6))
            .collect(),
    }
}
