//! The rig's etcd: started in the underlay namespace, stopped, and driven with `etcdctl`.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{
    ETCD_ENDPOINT, ETCD_PREFIX, ETCD_READY, Rig, STOP_GRACE, UNDERLAY_V4, append_log, child_pid,
    tail,
};
use crate::ns::{self, nsenter};

impl Rig {
    /// Starts etcd in the underlay namespace (data dir `<temp>/etcd`, so a restart brings back the
    /// same member and data) and waits until it reports healthy.
    pub fn start_etcd(&self) -> Result<()> {
        let mut inner = self.lock();
        if let Some(child) = inner.etcd.as_mut()
            && child.try_wait()?.is_none()
        {
            bail!("etcd is already running");
        }
        let data_dir = self.temp_dir().join("etcd");
        let log_path = self.temp_dir().join("etcd.log");
        let id = self.id().to_string();
        let log = append_log(&log_path, "starting etcd")?;
        let peer = "http://198.18.0.1:2380";
        let args: Vec<String> = vec![
            "etcd".into(),
            "--name".into(),
            id.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-client-urls".into(),
            ETCD_ENDPOINT.into(),
            "--advertise-client-urls".into(),
            ETCD_ENDPOINT.into(),
            "--listen-peer-urls".into(),
            peer.into(),
            "--initial-advertise-peer-urls".into(),
            peer.into(),
            "--initial-cluster".into(),
            format!("{id}={peer}"),
            "--initial-cluster-token".into(),
            id,
            "--initial-cluster-state".into(),
            "new".into(),
            "--logger".into(),
            "zap".into(),
            "--log-outputs".into(),
            "stderr".into(),
        ];
        let mut cmd = nsenter(&self.underlay_ns(), &args);
        if self.detachable {
            cmd.process_group(0);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn etcd (is etcd-server installed? run cargo xtask setup)")?;
        self.guard.record_process(&child, "etcd")?;
        inner.etcd = Some(child);

        let addr = SocketAddr::from((UNDERLAY_V4, 2379));
        let deadline = Instant::now() + ETCD_READY;
        loop {
            if let Ok(resp) = ns::http_get(&self.underlay_ns(), addr, "/health")
                && resp.body.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            if let Some(status) = inner
                .etcd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "etcd exited ({status}) before becoming healthy:\n{}",
                    tail(&log_path, 20)
                );
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after {ETCD_READY:?}:\n{}",
                    tail(&log_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) and waits for it to exit.
    pub fn stop_etcd(&self) -> Result<()> {
        let mut inner = self.lock();
        let mut child = inner
            .etcd
            .take()
            .ok_or_else(|| anyhow!("etcd is not running"))?;
        let _ = kill(Pid::from_raw(child_pid(&child)), Signal::SIGTERM);
        let status = ns::wait_uninterruptible(&mut child, STOP_GRACE).context("stop etcd");
        self.guard.forget_process(child.id())?;
        status.map(|_| ())
    }

    /// Runs `etcdctl` (API v3, against the rig's etcd) inside the underlay namespace; its stdout,
    /// or an error with its stderr.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let endpoints = format!("--endpoints={ETCD_ENDPOINT}");
        let mut full = vec!["etcdctl", &endpoints, "--dial-timeout=2s"];
        full.extend_from_slice(args);
        let mut cmd = nsenter(&self.underlay_ns(), &full);
        cmd.env("ETCDCTL_API", "3");
        let what = format!(
            "{} in netns {}",
            ns::display_args(&full),
            self.underlay_ns()
        );
        let out = ns::output_bounded(cmd, None, Duration::from_secs(30), true, &what)?;
        ns::check_output(&out, &what)
    }

    /// Writes the network config twilld reads (`<prefix>/config`, default prefix).
    pub fn put_network_config(&self, json: &str) -> Result<()> {
        let key = format!("{ETCD_PREFIX}/config");
        self.etcdctl(&["put", &key, json])
            .map(|_| ())
            .with_context(|| format!("put {key}"))
    }
}
