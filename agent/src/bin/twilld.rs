//! `twilld`: the twill node agent.
//!
//! Without a subcommand it runs the agent, with flannel's flags at the top level exactly as
//! before (`twilld --etcd-endpoints X --iface eth0 ...`). The subcommands `apply`, `delete` and
//! `get` manage the standalone service source in etcd; they take the same `--etcd-*` flags
//! after the subcommand (`twilld apply -f web.yaml --etcd-endpoints X`). Agent flags and a
//! subcommand do not mix (`args_conflicts_with_subcommands`), so neither can be misread.
//!
//! Logs go to stderr, coloured only when stderr is a terminal (and `NO_COLOR` is unset): a log
//! file or a container runtime's log holds plain text. An agent that cannot start logs why as
//! its last line (in the chosen log format) and exits with status 1.

use std::io::IsTerminal as _;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use twill_agent::daemon::{Options, run};
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
    twill_agent::shared::memory::tune();
    let Cli { agent: opts, cmd } = Cli::parse();
    let default_level = if cmd.is_some() { "warn" } else { "info" };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr);
    if opts.log_format == twill_agent::daemon::options::LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(cmd) = cmd {
        // A user-facing tool: one line naming what failed, no backtrace, exit status 1.
        if let Err(e) = rt.block_on(cli::run(cmd)) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    } else if let Err(e) = rt.block_on(run(opts)) {
        // The agent: its reason as its last log line, in the log's format.
        tracing::error!("twilld stopped: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Whether log lines carry ANSI colours: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
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
    fn a_repeated_etcd_endpoints_flag_replaces_the_list() {
        // As flannel's flags (and every other flag of twilld): the last one counts, rather than
        // a silent merge of two lists.
        for args in [
            &[
                "twilld",
                "--etcd-endpoints",
                "http://a:1,http://b:2",
                "--etcd-endpoints",
                "https://c:3",
            ][..],
            &[
                "twilld",
                "get",
                "services",
                "--etcd-endpoints=http://a:1",
                "--etcd-endpoints=https://c:3",
            ],
        ] {
            let c = Cli::try_parse_from(args).unwrap();
            let etcd = match c.cmd {
                Some(ServiceCmd::Get { etcd, .. }) => etcd,
                _ => c.agent.etcd,
            };
            assert_eq!(etcd.etcd_endpoints, vec!["https://c:3"], "{args:?}");
        }
        let c =
            Cli::try_parse_from(["twilld", "--etcd-endpoints", "http://a:1,http://b:2"]).unwrap();
        assert_eq!(
            c.agent.etcd.etcd_endpoints,
            vec!["http://a:1", "http://b:2"]
        );
    }

    #[test]
    fn logs_are_coloured_on_a_terminal_only() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn metrics_addr_takes_a_bare_port_on_loopback() {
        let addr = |a: &str| {
            Cli::try_parse_from(["twilld", "--metrics-addr", a])
                .map(|c| c.agent.metrics_addr)
                .map_err(|e| e.to_string())
        };
        assert_eq!(addr("9615"), Ok(Some("127.0.0.1:9615".parse().unwrap())));
        assert_eq!(
            addr("0.0.0.0:9615"),
            Ok(Some("0.0.0.0:9615".parse().unwrap()))
        );
        assert_eq!(addr("[::1]:9615"), Ok(Some("[::1]:9615".parse().unwrap())));
        assert_eq!(
            Cli::try_parse_from(["twilld"]).unwrap().agent.metrics_addr,
            None
        );
        for bad in [":9615", "localhost:9615", "0", "127.0.0.1:0", "70000"] {
            let e = addr(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
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
        let Some(ServiceCmd::Apply { write }) = c.cmd else {
            panic!("not apply")
        };
        let cli::WriteArgs {
            files,
            etcd,
            max_txn_ops,
            retry,
        } = write;
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
