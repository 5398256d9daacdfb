//! `cargo xtask test`: what CI runs (`.ci/run`), and what a developer runs before pushing.
//!
//! Set-up first (the agent's build needs protoc, nightly and bpf-linker), then the cheap checks
//! before the expensive ones: format, clippy with warnings denied, a build of every binary (the
//! end-to-end tests start the real `twilld` from `target/<profile>/`), then every test. As root
//! the privileged tests run; under CI (`CI=true`) a non-root run is refused, since those tests
//! would otherwise be skipped. Cargo's per-binary `test result:` lines are repeated at the end,
//! with a total.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{Context, Result, bail};

use crate::util::{cargo, is_root, say, show, step};

/// Runs the whole check (without fmt and clippy if `no_lint`); `args` go to
/// `cargo test --workspace`.
pub fn test(no_lint: bool, args: &[String]) -> Result<()> {
    if !is_root() {
        if twill_tests::in_ci() {
            bail!(
                "CI=true but not root: the privileged tests need root, and a skip in CI is a failure"
            );
        }
        say("not root: the privileged tests will be skipped (run as root to include them)");
    }
    crate::setup::setup()?;
    if no_lint {
        say("skipping fmt and clippy (--no-lint)");
    } else {
        step(cargo().args(["fmt", "--all", "--check"]))?;
        step(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    step(cargo().args(["build", "--workspace", "--bins"]))?;
    cargo_test(args)
}

/// Counts from cargo's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn cargo_test(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(args);
    let line = show(&cmd);
    say(&format!("$ {line}"));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {line}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut summaries = Vec::new();
    let mut totals = Totals::default();
    for l in BufReader::new(stdout).lines() {
        let l = l.context("read cargo test output")?;
        println!("{l}");
        if l.starts_with("test result: ") {
            totals.add(&l);
            summaries.push(l);
        }
    }
    let status = child.wait().context("wait for cargo test")?;
    say("test summary:");
    for s in &summaries {
        println!("  {s}");
    }
    let skipped = if totals.ignored > 0 {
        format!(", {} skipped", totals.ignored)
    } else {
        String::new()
    };
    println!(
        "total: {} passed, {} failed{skipped}",
        totals.passed, totals.failed
    );
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    if totals.passed + totals.failed == 0 {
        bail!("no test ran (does the filter match any test name?)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.20s");
        t.add("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 5,
                failed: 1,
                ignored: 1
            }
        );
    }
}
