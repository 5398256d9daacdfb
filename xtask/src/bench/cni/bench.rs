//! The benchmark: a rig node, every plugin measured in the same run.

use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use twill_facts::SubnetFacts;
use twill_tests::ns::in_netns;
use twill_tests::{Rig, RigOptions};

use super::measure::measure;
use super::node::{Node, SUBNET_FILES, Watchdog, configs};
use super::params::{Params, Plugin, REFERENCE_DIR};
use super::report::section;
use crate::bench::kit::{Benchmark, Context};
use crate::bench::report::Section;

/// The CNI benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Cni;

impl Benchmark for Cni {
    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        for plugin in ["bridge", "host-local"] {
            let path = Path::new(REFERENCE_DIR).join(plugin);
            ensure!(
                path.is_file(),
                "{} missing: apt-get install containernetworking-plugins",
                path.display()
            );
        }
        let p = Params::new(ctx.opts.quick, ctx.opts.reps);
        let progress = ctx.progress;
        progress.plan(2 + p.reps * (1 + Plugin::CONCURRENT.len()));

        let what = format!("node and {} pods", p.pods.max(p.concurrency));
        progress.working(&what);
        let rig = Rig::with_options(RigOptions {
            nodes: 1,
            bin_dir: ctx.opts.bin_dir.clone(),
            etcd: false,
            ..RigOptions::default()
        })?;
        let twill = rig.twilld_path()?.with_file_name("twill-cni");
        ensure!(
            twill.is_file(),
            "twill-cni not found at {}: build it next to twilld \
             (cargo build --release -p twill-cni, or without --release for a debug bench)",
            twill.display()
        );
        let dir = rig.temp_dir().join("cni-bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for (name, text) in SUBNET_FILES {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        }
        // The pods' own eth0 sits on a bridge and subnet of no plugin's.
        let pod_facts = SubnetFacts::parse(
            "FLANNEL_NETWORK=10.96.0.0/16\nFLANNEL_SUBNET=10.96.0.1/24\nFLANNEL_MTU=1500\n",
        )?;
        let mut pods = Vec::new();
        for _ in 0..p.pods.max(p.concurrency) {
            let pod = rig.add_pod(1, &pod_facts)?;
            pods.push(twill_tests::ns::netns_path(&pod.ns).display().to_string());
        }
        let twill_dir = twill.parent().context("twill-cni has no directory")?;
        let node = Node {
            cni_path: format!("{REFERENCE_DIR}:{}", twill_dir.display()),
            twill: twill.clone(),
            reference: Path::new(REFERENCE_DIR).join("bridge"),
            configs: configs(&dir),
            pods,
            watchdog: Watchdog::default(),
        };
        let node_ns = rig.node_ns(1);
        progress.done(&what, &format!("up ({})", rig.id()));

        let results = in_netns(&node_ns, || {
            std::thread::scope(|s| {
                s.spawn(|| node.watchdog.patrol());
                let r = measure(&node, &node_ns, p, progress);
                node.watchdog.stop();
                r
            })
        })?;
        drop(rig);
        Ok(section(&results, p, &twill))
    }
}
