//! The `cargo xtask bench` command line: options, building the twilld to measure, Ctrl-C.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};

use super::kit::{BenchOptions, Which};
use crate::cluster::Backend;
use crate::cluster::ProxyMode;
use crate::util::{arg_name, build_binaries, target_dir};

/// `--backend`, `--mode`: one value or `all` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice<T> {
    /// This one.
    One(T),
    /// Every one of [`OneOrAll::ALL`].
    All,
}

/// A command-line value that `all` can stand in for.
pub trait OneOrAll: ValueEnum + Copy + Send + Sync + 'static {
    /// What the option accepts besides `all`, and what `all` stands for, in report order.
    const ALL: &'static [Self];
    /// The help line of `all`.
    const ALL_HELP: &'static str;
}

impl OneOrAll for Backend {
    const ALL: &'static [Self] = &Backend::ALL;
    const ALL_HELP: &'static str = "vxlan, host-gw and udp";
}

impl OneOrAll for ProxyMode {
    const ALL: &'static [Self] = &ProxyMode::SERVICE_MODES;
    const ALL_HELP: &'static str =
        "ebpf, nftables and iptables (what twilld does not accept is reported unavailable)";
}

impl<T: OneOrAll> Choice<T> {
    /// The option's parser: the names of [`OneOrAll::ALL`] (with their help) and `all`.
    fn parser() -> impl TypedValueParser<Value = Self> {
        let names = T::ALL
            .iter()
            .filter_map(ValueEnum::to_possible_value)
            .chain([PossibleValue::new("all").help(T::ALL_HELP)]);
        PossibleValuesParser::new(names).map(|name| {
            T::ALL
                .iter()
                .find(|value| arg_name(*value) == name)
                .map_or(Choice::All, |value| Choice::One(*value))
        })
    }

    /// The values chosen, in report order.
    fn values(self) -> Vec<T> {
        match self {
            Choice::One(value) => vec![value],
            Choice::All => T::ALL.to_vec(),
        }
    }
}

/// As spelled on the command line.
impl<T: OneOrAll> std::fmt::Display for Choice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::One(value) => f.write_str(&arg_name(value)),
            Choice::All => f.write_str("all"),
        }
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which benchmark; `all` runs every one that exists.
    #[arg(value_enum, default_value_t = Which::All)]
    pub which: Which,
    /// Overlay backend(s) to measure (udp next to kernel VXLAN, the others next to the kernel's
    /// own).
    #[arg(long, value_parser = Choice::<Backend>::parser(), default_value = "all")]
    pub backend: Choice<Backend>,
    /// Service proxy mode(s) the services benchmark measures.
    #[arg(long, value_parser = Choice::<ProxyMode>::parser(), default_value = "all")]
    pub mode: Choice<ProxyMode>,
    /// Short runs and few samples (a smoke run; figures are rougher).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every measurement (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub reps: u16,
    /// Report directory (default: bench-report/<UTC timestamp>/ in the workspace).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Measure a debug build of twilld (quicker to build; not for figures you quote).
    #[arg(long)]
    pub debug: bool,
    /// Do not build twilld; use the one in target/ (or TWILL_BIN_DIR).
    #[arg(long)]
    pub no_build: bool,
}

impl BenchArgs {
    /// The command line that reproduces this run.
    pub fn command(&self) -> String {
        let mut cmd = format!("cargo xtask bench {}", self.which.as_str());
        if self.which.uses_backend() {
            let _ = write!(cmd, " --backend {}", self.backend);
        }
        if self.which.uses_mode() {
            let _ = write!(cmd, " --mode {}", self.mode);
        }
        if self.quick {
            cmd.push_str(" --quick");
        }
        if self.reps != 3 {
            let _ = write!(cmd, " --reps {}", self.reps);
        }
        if self.debug {
            cmd.push_str(" --debug");
        }
        cmd
    }

    /// The run these options ask for, measuring the twilld in `bin_dir` (`None`: where the rig
    /// finds it).
    pub fn options(&self, bin_dir: Option<PathBuf>) -> BenchOptions {
        BenchOptions {
            which: self.which,
            backends: self.backend.values(),
            modes: self.mode.values(),
            quick: self.quick,
            reps: usize::from(self.reps),
            out_dir: self.out.clone(),
            bin_dir,
            command: self.command(),
        }
    }
}

/// Runs `cargo xtask bench`.
pub fn main(args: &BenchArgs) -> Result<()> {
    install_interrupt_handler()?;
    let profile = if args.debug { "debug" } else { "release" };
    let bin_dir = match std::env::var_os("TWILL_BIN_DIR") {
        Some(dir) if args.no_build => PathBuf::from(dir),
        _ => target_dir()?.join(profile),
    };
    if !args.no_build {
        build_binaries(!args.debug)?;
    }
    super::run(&args.options(Some(bin_dir))).map(|_| ())
}

/// SIGINT/SIGTERM raise the rig's interrupt flag: waits and commands stop early and the rigs'
/// guards tear everything down; a second signal exits at once (`cargo xtask sweep` or the next
/// rig cleans up).
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if twill_tests::interrupted() {
            eprintln!(
                "\nxtask: second interrupt, exiting without teardown (cargo xtask sweep cleans up)"
            );
            std::process::exit(130);
        }
        eprintln!("\nxtask: interrupted, tearing down");
        twill_tests::interrupt();
    })
    .context("install the Ctrl-C handler")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `cargo xtask bench`'s command line.
    #[derive(Parser)]
    struct BenchCommand {
        #[command(flatten)]
        args: BenchArgs,
    }

    #[test]
    fn all_stands_for_every_backend_and_service_mode() {
        assert_eq!(Choice::<Backend>::All.values(), Backend::ALL);
        assert_eq!(Choice::<ProxyMode>::All.values(), ProxyMode::SERVICE_MODES);
        assert_eq!(
            Choice::One(Backend::Udp).values(),
            [Backend::Udp],
            "one backend"
        );
        let names: Vec<String> = Choice::<ProxyMode>::parser()
            .possible_values()
            .expect("a list")
            .map(|value| value.get_name().to_string())
            .collect();
        assert_eq!(names, ["ebpf", "nftables", "iptables", "all"], "--mode");
    }

    #[test]
    fn command_reproduces_the_options_the_benchmark_reads() {
        // (the options given, the reproduce line: only what the benchmark reads, reps when
        // not the default)
        let cases = [
            (
                "all --backend host-gw --mode iptables --quick",
                "cargo xtask bench all --backend host-gw --mode iptables --quick",
            ),
            (
                "overlay --backend all --mode iptables --quick --reps 5 --debug",
                "cargo xtask bench overlay --backend all --quick --reps 5 --debug",
            ),
            (
                "services --backend all --mode ebpf --reps 3",
                "cargo xtask bench services --mode ebpf",
            ),
            ("cni --backend vxlan --mode ebpf", "cargo xtask bench cni"),
            (
                "control-plane --backend host-gw --mode ebpf --quick",
                "cargo xtask bench control-plane --backend host-gw --quick",
            ),
        ];
        for (given, reproduced) in cases {
            let words = std::iter::once("bench").chain(given.split_whitespace());
            let args = BenchCommand::try_parse_from(words)
                .unwrap_or_else(|e| panic!("bench {given}: {e}"))
                .args;
            assert_eq!(args.command(), reproduced, "bench {given}");
        }
    }
}
