//! `cargo xtask`: the jobs around the build — machine set-up, the full test run CI uses, the
//! demo cluster, a standing rig (`rig`) and the benchmarks (`bench`, in the library so the smoke
//! test can call it).
//!
//! Why it is shaped as it is:
//! - xtask is plain Rust run through a cargo alias (`.cargo/config.toml`), so a newcomer needs
//!   nothing but cargo; the model is aya's and rust-analyzer's xtask.
//! - It must build on a machine that has nothing yet: `setup` installs protoc, nightly and
//!   bpf-linker, which the agent's build needs, so xtask never depends on `twill-agent` (it would
//!   have to be built before the tools it needs exist). It uses the rig library (`twill-tests`),
//!   which builds with stable Rust alone.
//! - Output is a line per step; errors carry the failing step and command.

mod demo;
mod rig_cmd;
mod setup;
mod test;

use xtask::{bench, util};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// twill's developer commands.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what this machine lacks: apt packages, nightly rust-src, bpf-linker, bpffs mount.
    Setup,
    /// Setup, then fmt check, clippy, build, and every test (the privileged ones need root).
    Test {
        /// Skip the fmt and clippy steps (quicker local iteration; CI never skips them).
        #[arg(long)]
        no_lint: bool,
        /// Passed to `cargo test --workspace` (e.g. a test name filter, or `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bring up the rig (3 nodes, etcd, twilld with the eBPF proxy, pods via twill-cni, a sample
    /// Service), show leases, pods, ping, iperf3 and requests to the Service, tear down.
    Demo {
        /// Keep the cluster up after the figures until Ctrl-C.
        #[arg(long)]
        hold: bool,
        /// Use a debug build of twilld (quicker to build, slower to run).
        #[arg(long)]
        debug: bool,
    },
    /// Remove rigs left behind by killed runs (namespaces, processes, pins, temp dirs).
    Sweep,
    /// A netns cluster that stays up between commands: `rig up`, `status`, `exec`, `down`.
    Rig {
        #[command(subcommand)]
        cmd: rig_cmd::RigCmd,
    },
    /// Measure twill against the kernel baseline and write a report (bench-report/<time>/).
    Bench(bench::cli::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { no_lint, .. } => {
            let argv: Vec<String> = std::env::args().collect();
            test::test(no_lint, &cargo_test_args(&argv))
        }
        Cmd::Demo { hold, debug } => demo::demo(hold, debug),
        Cmd::Sweep => twill_tests::sweep_stale().map(|ids| {
            util::say(&format!("swept {} stale rig(s) {ids:?}", ids.len()));
        }),
        Cmd::Rig { cmd } => rig_cmd::rig(cmd),
        Cmd::Bench(args) => bench::cli::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if twill_tests::interrupted() => {
            eprintln!("xtask: interrupted ({e:#})");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What follows `test` on the command line, our own `--no-lint` aside, verbatim: clap drops a
/// leading `--`, which `cargo test` needs to tell its own options from the test binaries'
/// (`cargo xtask test -- --nocapture`).
fn cargo_test_args(argv: &[String]) -> Vec<String> {
    let start = argv
        .iter()
        .position(|a| a == "test")
        .map_or(argv.len(), |i| i + 1);
    let mut rest = argv[start..].to_vec();
    let end_of_ours = rest.iter().position(|a| a == "--").unwrap_or(rest.len());
    if let Some(i) = rest[..end_of_ours].iter().position(|a| a == "--no-lint") {
        rest.remove(i);
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        assert!(matches!(
            Cli::try_parse_from(argv).unwrap().cmd,
            Cmd::Test { .. }
        ));
        let argv: Vec<String> = argv.iter().map(|s| (*s).to_string()).collect();
        cargo_test_args(&argv)
    }

    #[test]
    fn test_passes_its_arguments_to_cargo_test() {
        assert_eq!(
            test_args(&["xtask", "test", "sweep", "--", "--nocapture"]),
            ["sweep", "--", "--nocapture"]
        );
        assert_eq!(
            test_args(&["xtask", "test", "--no-lint", "--test", "rig_lifecycle"]),
            ["--test", "rig_lifecycle"]
        );
        assert_eq!(
            test_args(&["xtask", "test", "--", "--nocapture"]),
            ["--", "--nocapture"]
        );
        assert!(test_args(&["xtask", "test"]).is_empty());
    }
}
