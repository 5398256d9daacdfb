//! Running an external IPAM plugin (`ipam.type`), the way libcni's `invoke` does.
//!
//! The plugin is looked up in `CNI_PATH`, run with twill's own environment (only `CNI_COMMAND`
//! changed, so `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_ARGS`... reach it unchanged) and twill's own
//! stdin, so it sees the full network config including `runtimeConfig`, `args` and `prevResult`.
//! An error object it prints is passed through to the runtime with its own code.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, code};

/// Errors running a delegated plugin.
#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    /// No executable of that name in `CNI_PATH`.
    #[error("find IPAM plugin {plugin:?} in CNI_PATH {path:?}: not found")]
    NotFound {
        /// Plugin name.
        plugin: String,
        /// The searched directories, `:`-joined.
        path: String,
    },
    /// Spawning or talking to it failed.
    #[error("run IPAM plugin {plugin} {command}: {source}")]
    Exec {
        /// Plugin path.
        plugin: PathBuf,
        /// CNI command.
        command: &'static str,
        /// The error, errno kept.
        #[source]
        source: std::io::Error,
    },
    /// It failed without a CNI error object.
    #[error("IPAM plugin {plugin} {command} failed ({status}): {stderr}")]
    Failed {
        /// Plugin path.
        plugin: PathBuf,
        /// CNI command.
        command: &'static str,
        /// Exit status.
        status: String,
        /// What it wrote on stderr and stdout.
        stderr: String,
    },
    /// It printed its own CNI error; passed through as is.
    #[error("IPAM plugin {command}: {error}")]
    Plugin {
        /// CNI command.
        command: &'static str,
        /// Its error.
        error: CniError,
    },
    /// It succeeded but its output is not JSON.
    #[error("IPAM plugin {plugin} {command}: undecodable output: {source}")]
    BadOutput {
        /// Plugin path.
        plugin: PathBuf,
        /// CNI command.
        command: &'static str,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
}

impl From<DelegateError> for CniError {
    fn from(e: DelegateError) -> Self {
        match e {
            DelegateError::Plugin { command, error } => {
                error.context(format!("IPAM plugin {command}"))
            }
            other => CniError::from_error(code::DELEGATE, &other),
        }
    }
}

/// Finds `plugin` in the `CNI_PATH` directories.
pub fn find(plugin: &str, path: &[PathBuf]) -> Result<PathBuf, DelegateError> {
    path.iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| DelegateError::NotFound {
            plugin: plugin.to_string(),
            path: path
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })
}

/// Runs `plugin` with `command`; returns its stdout parsed as JSON (`None` when empty).
pub fn exec<S: std::hash::BuildHasher>(
    plugin: &Path,
    command: &'static str,
    env: &HashMap<String, String, S>,
    stdin: &[u8],
) -> Result<Option<Value>, DelegateError> {
    let exec_err = |source| DelegateError::Exec {
        plugin: plugin.to_path_buf(),
        command,
        source,
    };
    let mut child = Command::new(plugin)
        .envs(env.iter().filter(|(k, _)| k.starts_with("CNI_")))
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(exec_err)?;
    if let Some(mut w) = child.stdin.take() {
        w.write_all(stdin).map_err(exec_err)?;
    }
    let out = child.wait_with_output().map_err(exec_err)?;
    if !out.status.success() {
        #[derive(Deserialize)]
        struct Wire {
            code: u32,
            msg: String,
            #[serde(default)]
            details: String,
        }
        if let Ok(w) = serde_json::from_slice::<Wire>(&out.stdout) {
            return Err(DelegateError::Plugin {
                command,
                error: CniError {
                    code: w.code,
                    msg: w.msg,
                    details: w.details,
                },
            });
        }
        return Err(DelegateError::Failed {
            plugin: plugin.to_path_buf(),
            command,
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|source| DelegateError::BadOutput {
            plugin: plugin.to_path_buf(),
            command,
            source,
        })
}

/// Whether the plugin answers `version` (asks it with VERSION). GC and STATUS are only passed on
/// to IPAM plugins that support 1.1.0: older ones (the reference host-local 1.1.1) fail them.
pub fn supports<S: std::hash::BuildHasher>(
    plugin: &Path,
    env: &HashMap<String, String, S>,
    version: &str,
) -> bool {
    let stdin = format!("{{\"cniVersion\":\"{version}\"}}");
    matches!(
        exec(plugin, "VERSION", env, stdin.as_bytes()),
        Ok(Some(v)) if v["supportedVersions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == version))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_plugin_and_path() {
        let e = find(
            "nope",
            &[PathBuf::from("/nonexistent/a"), PathBuf::from("/b")],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("nope") && msg.contains("/nonexistent/a:/b"),
            "{msg}"
        );
        assert_eq!(CniError::from(e).code, code::DELEGATE);
    }

    /// An executable shell script `name` in a fresh directory (removed when the first value is
    /// dropped) that reads its stdin and then runs `body`.
    fn plugin(name: &str, body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\ncat >/dev/null\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        (dir, p)
    }

    #[test]
    fn passes_a_plugin_error_through() {
        let (_dir, p) = plugin(
            "fail",
            "echo '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"busy\"}'\nexit 1",
        );
        let e = exec(&p, "ADD", &HashMap::new(), b"{}").unwrap_err();
        let c = CniError::from(e);
        assert_eq!(c.code, 11);
        assert!(c.msg.contains("busy"));
    }

    #[test]
    fn reads_json_output_and_env() {
        let (_dir, p) = plugin(
            "ok",
            "echo \"{\\\"cmd\\\":\\\"$CNI_COMMAND\\\",\\\"id\\\":\\\"$CNI_CONTAINERID\\\"}\"",
        );
        let env: HashMap<String, String> =
            [("CNI_CONTAINERID".to_string(), "abc".to_string())].into();
        let v = exec(&p, "DEL", &env, b"{}").unwrap().unwrap();
        assert_eq!(v["cmd"], "DEL");
        assert_eq!(v["id"], "abc");
    }
}
