//! `twilld`: the twill node agent.
//!
//! Without a subcommand it runs the agent, with flannel's flags at the top level exactly as
//! before (`twilld --etcd-endpoints X --iface eth0 ...`). The subcommands `apply`, `delete` and
//! `get` manage the standalone service source in etcd; they take the same `--etcd-*` flags
//! after the subcommand (`twilld apply -f web.yaml --etcd-endpoints X`). Agent flags and a
//! subcommand do not mix (`args_conflicts_with_subcommands`), so neither can be misread.

use std::io::IsTerminal as _;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use twill_agent::agent::{Options, run};
use twill_agent::services::cli::{self, ServiceCmd};

/// The command line: the agent's options, or a service subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "twilld",
    version,
    about = "twill node agent: subnet leases, the overlay and the service dataplane",
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    agent: Options,
    #[command(subcommand)]
    cmd: Option<ServiceCmd>,
}

fn main() -> anyhow::Result<()> {
    twill_agent::memory::tune();
    let Cli { agent: opts, cmd } = Cli::parse();
    let default_level = if cmd.is_some() { "warn" } else { "info" };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a person at a terminal: a log file or a pipe gets plain text (and
    // NO_COLOR turns them off anywhere).
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if opts.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        // A user-facing tool: one line naming what failed, no backtrace, exit status 1.
        Some(cmd) => {
            if let Err(e) = rt.block_on(cli::run(cmd)) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        None => rt.block_on(run(opts)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_invocations_parse_unchanged() {
        let c = Cli::try_parse_from([
            "twilld",
            "--etcd-endpoints",
            "http://198.18.0.1:2379",
            "--iface",
            "eth0",
            "--ip-masq",
            "--etcd-prefix=/x",
        ])
        .unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.agent.etcd.etcd_endpoints, vec!["http://198.18.0.1:2379"]);
        assert_eq!(c.agent.iface, vec!["eth0"]);
        assert!(c.agent.ip_masq);
        assert!(Cli::try_parse_from(["twilld"]).unwrap().cmd.is_none());
    }

    #[test]
    fn subcommands_take_the_etcd_flags() {
        let c = Cli::try_parse_from([
            "twilld",
            "apply",
            "-f",
            "a.yaml",
            "-f",
            "-",
            "--etcd-endpoints",
            "http://198.18.0.1:2379",
            "--etcd-prefix",
            "/p",
        ])
        .unwrap();
        let Some(ServiceCmd::Apply {
            files,
            etcd,
            max_txn_ops,
            retry,
        }) = c.cmd
        else {
            panic!("not apply")
        };
        assert_eq!(files, vec![std::path::PathBuf::from("a.yaml"), "-".into()]);
        assert_eq!(etcd.etcd_endpoints, vec!["http://198.18.0.1:2379"]);
        assert_eq!(etcd.etcd_prefix, "/p");
        assert_eq!((max_txn_ops, retry.etcd_deadline), (128, 15));
        let c = Cli::try_parse_from(["twilld", "get", "services"]).unwrap();
        assert!(matches!(c.cmd, Some(ServiceCmd::Get { .. })));
        assert!(Cli::try_parse_from(["twilld", "delete"]).is_err());
        assert!(Cli::try_parse_from(["twilld", "get", "pods"]).is_err());
        // Agent flags before a subcommand are refused rather than silently ignored.
        assert!(Cli::try_parse_from(["twilld", "--iface", "eth0", "get", "services"]).is_err());
    }
}
