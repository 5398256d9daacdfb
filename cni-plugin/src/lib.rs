//! twill's CNI plugin (`twill-cni`): puts pods on the node's subnet that `twilld` publishes in the
//! subnet file, flannel-style (a `cni0` bridge holding the gateway) or routed (/32 per pod).
//!
//! Shape of the crate:
//! - [`run`] is the whole program minus process I/O: environment map and stdin in, stdout text and
//!   exit status out. It validates first — command, environment ([`env`](mod@env)), the whole network
//!   config ([`config::load_conf`]), the command's minimum spec version — and only then
//!   dispatches, so a bad invocation never touches the kernel or the IPAM state.
//! - [`commands`] holds ADD/DEL/CHECK/GC/STATUS, written against the [`dataplane::Dataplane`]
//!   trait; [`netlink`] is its rtnetlink implementation, the only code that talks to the kernel.
//! - [`ipam`] is the built-in, host-local compatible allocator; [`delegate`] runs an external
//!   IPAM plugin instead when `ipam.type` names one.
//! - [`result`] and [`version`] render the result in the version the runtime asked for;
//!   [`error`](mod@error) is the spec's error object and twill's codes.
//!
//! Start-up is kept lean for ADD latency: no thread pool (a current-thread tokio runtime, created
//! only for commands that touch netlink), no config files besides the subnet file, logging set up
//! only as far as the config asks.

#![deny(missing_docs)]

pub mod commands;
pub mod config;
pub mod dataplane;
pub mod delegate;
pub mod env;
pub mod error;
pub mod ipam;
mod log;
pub mod names;
pub mod netlink;
pub mod result;
pub mod version;

use std::collections::HashMap;
use std::time::Instant;

use tracing::{error, info};

use crate::commands::Invocation;
use crate::env::{CniEnv, Command};
use crate::error::{CniError, code};
use crate::version::Version;

/// What the process prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// JSON (a result, a version reply or an error), or empty.
    pub stdout: String,
    /// 0 on success, 1 on error.
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Outcome {
            stdout,
            exit_code: 0,
        }
    }

    fn err(e: &CniError, version: Option<Version>) -> Self {
        let v = version.map_or_else(|| version::CURRENT.to_string(), |v| v.to_string());
        Outcome {
            stdout: e.to_json(&v),
            exit_code: 1,
        }
    }
}

/// The VERSION reply.
pub fn version_reply() -> String {
    serde_json::json!({
        "cniVersion": version::CURRENT,
        "supportedVersions": version::SUPPORTED,
    })
    .to_string()
}

/// Runs one invocation: `vars` is the process environment, `stdin` the network config.
pub fn run(vars: impl IntoIterator<Item = (String, String)>, stdin: &[u8]) -> Outcome {
    let vars: HashMap<String, String> = vars.into_iter().collect();
    let asked = config::peek_version(stdin);
    let command = match CniEnv::command(&vars) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twill-cni: {e}");
            return Outcome::err(&e, asked);
        }
    };
    if command == Command::Version {
        return Outcome::ok(version_reply());
    }
    let env = match CniEnv::from_map(vars) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("twill-cni: {}: {e}", command.as_str());
            return Outcome::err(&e, asked);
        }
    };
    let conf = match config::load_conf(stdin).and_then(|c| min_version(command, c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twill-cni: {}: {e}", command.as_str());
            return Outcome::err(&e, asked);
        }
    };
    log::init(conf.log_file.as_deref());
    let span = tracing::info_span!(
        "cni",
        cmd = command.as_str(),
        id = env.container_id.as_str(),
        ifname = env.ifname.as_str(),
        net = conf.name.as_str()
    );
    let _enter = span.enter();
    let started = Instant::now();
    let inv = Invocation {
        env: &env,
        conf: &conf,
        stdin,
    };
    let result = dispatch(command, inv);
    let took = started.elapsed();
    match result {
        Ok(stdout) => {
            info!(?took, "ok");
            Outcome::ok(stdout)
        }
        Err(e) => {
            error!(
                ?took,
                code = e.code,
                details = (!e.details.is_empty()).then_some(e.details.as_str()),
                "{}",
                e.msg
            );
            Outcome::err(&e, Some(conf.version))
        }
    }
}

/// CHECK came with 0.4.0, GC and STATUS with 1.1.0; older configs cannot ask for them.
fn min_version(command: Command, conf: config::NetConf) -> Result<config::NetConf, CniError> {
    let need = match command {
        Command::Check => Version::V0_4_0,
        Command::Gc | Command::Status => Version::V1_1_0,
        _ => return Ok(conf),
    };
    if conf.version < need {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{} needs cniVersion {need} or later, the config has {}",
                command.as_str(),
                conf.version
            ),
        ));
    }
    Ok(conf)
}

fn dispatch(command: Command, inv: Invocation<'_>) -> Result<String, CniError> {
    if command == Command::Status {
        commands::status(inv)?;
        return Ok(String::new());
    }
    let mut dp = netlink::Netlink::new()?;
    match command {
        Command::Add => {
            let r = commands::add(&mut dp, inv)?;
            Ok(r.to_version(inv.conf.version).to_string())
        }
        Command::Del => commands::del(&mut dp, inv).map(|()| String::new()),
        Command::Check => commands::check(&mut dp, inv).map(|()| String::new()),
        Command::Gc => commands::gc(&mut dp, inv).map(|()| String::new()),
        Command::Version | Command::Status => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::tests::vars;

    #[test]
    fn version_needs_no_config() {
        let out = run(vars(&[("CNI_COMMAND", "VERSION")]), b"");
        assert_eq!(out.exit_code, 0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn errors_are_json_tagged_with_the_asked_version() {
        let out = run(
            vars(&[("CNI_COMMAND", "ADD")]),
            br#"{"cniVersion":"0.4.0","name":"n","type":"twill-cni"}"#,
        );
        assert_eq!(out.exit_code, 1);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    }

    #[test]
    fn commands_are_gated_by_version() {
        let base = [
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent"),
        ];
        for (cmd, ver) in [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "0.4.0")] {
            let mut v = vars(&base);
            v.insert("CNI_COMMAND".into(), cmd.into());
            let stdin = format!(r#"{{"cniVersion":"{ver}","name":"n","type":"twill-cni"}}"#);
            let out = run(v, stdin.as_bytes());
            let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(j["code"], 1, "{cmd} {ver}: {}", out.stdout);
        }
    }

    #[test]
    fn status_without_subnet_file_is_50() {
        let out = run(
            vars(&[("CNI_COMMAND", "STATUS")]),
            br#"{"cniVersion":"1.1.0","name":"n","type":"twill-cni","subnetFile":"/nonexistent/subnet.env"}"#,
        );
        let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(j["code"], 50);
        assert_eq!(out.exit_code, 1);
    }
}
