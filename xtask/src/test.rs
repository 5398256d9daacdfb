//! `cargo xtask test`: what CI runs (`.ci/run`), and what a developer runs before pushing.
//!
//! Set-up first (the agent's build needs protoc, nightly and bpf-linker), then the cheap checks
//! before the expensive ones: format, clippy with warnings denied, a build of every binary (the
//! end-to-end tests start the real `twilld` from `target/<profile>/`), then every test. As root
//! the privileged tests run; under CI (`CI=true`) a non-root run is refused, since those tests
//! would otherwise be skipped. Every test binary runs (`--no-fail-fast`), so one failing suite
//! does not hide the results of the later ones; at the end, cargo's per-binary `test result:`
//! lines are repeated with a total, then every failed test, by binary, and the run fails.

use std::io::{BufRead, BufReader};

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

/// The arguments of `cargo test`: the whole workspace, every test binary whatever fails first
/// (`--no-fail-fast`: one failing suite must not hide whether the later ones pass), then the
/// caller's.
fn cargo_test_args(args: &[String]) -> Vec<String> {
    let mut all: Vec<String> = vec!["test".into(), "--workspace".into()];
    let ours = args.iter().position(|a| a == "--").unwrap_or(args.len());
    if !args[..ours].iter().any(|a| a == "--no-fail-fast") {
        all.push("--no-fail-fast".into());
    }
    all.extend(args.iter().cloned());
    all
}

fn cargo_test(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(cargo_test_args(args));
    let line = show(&cmd);
    say(&format!("$ {line}"));
    // cargo's progress ("Running <binary>", "to rerun pass ...") goes to stderr, the tests'
    // output to stdout: one pipe for both keeps them in order, so a failure is told apart by
    // the binary it ran in.
    let (reader, writer) = std::io::pipe().context("make a pipe for cargo test's output")?;
    let mut child = cmd
        .stdout(writer.try_clone().context("clone the pipe's write end")?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("run {line}"))?;
    // The command holds copies of the write end: dropped, the pipe ends with cargo.
    drop(cmd);
    let mut report = Report::default();
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if reader
            .read_until(b'\n', &mut raw)
            .context("read cargo test output")?
            == 0
        {
            break;
        }
        // Test output need not be UTF-8: shown and parsed lossily, never a reason to stop.
        let l = String::from_utf8_lossy(&raw);
        let l = l.trim_end_matches(['\n', '\r']);
        println!("{l}");
        report.feed(l);
    }
    let status = child.wait().context("wait for cargo test")?;
    say("test summary:");
    for s in &report.summaries {
        println!("  {s}");
    }
    let totals = &report.totals;
    let skipped = if totals.ignored > 0 {
        format!(", {} skipped", totals.ignored)
    } else {
        String::new()
    };
    println!(
        "total: {} passed, {} failed{skipped}",
        totals.passed, totals.failed
    );
    if !report.failed.is_empty() {
        say("failed, by test binary:");
        for l in report.failure_lines() {
            println!("{l}");
        }
        let tests: usize = report.failed.iter().map(|b| b.tests.len().max(1)).sum();
        bail!(
            "{tests} failed test(s) in {} test binar{} (every binary ran: --no-fail-fast)",
            report.failed.len(),
            if report.failed.len() == 1 { "y" } else { "ies" }
        );
    }
    if !status.success() {
        bail!("`{line}` failed ({status}) before any test failed (a build error? see above)");
    }
    if totals.passed + totals.failed == 0 {
        bail!("no test ran (does the filter match any test name?)");
    }
    Ok(())
}

/// A test binary that failed: the names of its failed tests, or why it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FailedBinary {
    /// The binary as cargo announced it: `overlay (tests/overlay.rs)`, `twill_agent (unittests
    /// src/lib.rs)`, `doc-tests of twill_agent`.
    binary: String,
    /// cargo's arguments to rerun it (`-p twill-tests --test overlay`), once cargo said them.
    rerun: Option<String>,
    /// The failed tests, as libtest lists them under its last `failures:` heading.
    tests: Vec<String>,
    /// Set when the binary ended without a test result (crashed, killed): cargo's reason.
    crashed: Option<String>,
}

/// Reads `cargo test` output (stdout and stderr in one stream) line by line and keeps what the
/// end of a run reports: the `test result:` lines, their totals, and every failed test by binary.
///
/// What it relies on: cargo announces each binary (`     Running <what> (<path>-<hash>)`,
/// `   Doc-tests <crate>`) before its output; libtest ends a failing binary's output with a
/// `failures:` heading, one failed test per line indented by four spaces, then `test result:
/// FAILED.`; cargo then says `error: test failed, to rerun pass `<args>`` (`doctest failed` for
/// doc-tests), followed, when the binary died, by `process didn't exit successfully: ...
/// (<why>)`.
#[derive(Debug, Default)]
struct Report {
    totals: Totals,
    summaries: Vec<String>,
    failed: Vec<FailedBinary>,
    /// The binary running now.
    current: Option<String>,
    /// Whether the current binary printed its `test result:`.
    result_seen: bool,
    /// Names under the latest `failures:` heading of the current binary.
    listing: Option<Vec<String>>,
}

impl Report {
    fn feed(&mut self, line: &str) {
        let trimmed = line.trim_start();
        if let Some(binary) = announced_binary(line) {
            self.current = Some(binary);
            self.result_seen = false;
            self.listing = None;
        } else if line == "failures:" {
            self.listing = Some(Vec::new());
        } else if line.starts_with("---- ") {
            self.listing = None;
        } else if let Some(name) = line
            .strip_prefix("    ")
            .filter(|n| !n.is_empty() && !n.starts_with(char::is_whitespace))
        {
            if let Some(list) = &mut self.listing {
                list.push(name.to_string());
            }
        } else if line.starts_with("test result: ") {
            self.totals.add(line);
            self.summaries.push(line.to_string());
            self.result_seen = true;
            let listed = self.listing.take().unwrap_or_default();
            if line.starts_with("test result: FAILED") {
                self.current_failed().tests.extend(listed);
            }
        } else if let Some((_, rest)) = trimmed
            .strip_prefix("error: ")
            .and_then(|r| r.split_once("failed, to rerun pass `"))
        {
            let rerun = rest.trim_end_matches('`').to_string();
            let result_seen = self.result_seen;
            let entry = self.current_failed();
            entry.rerun = Some(rerun);
            if !result_seen {
                entry.crashed = Some("ended without a test result".into());
            }
        } else if let Some(rest) = trimmed.strip_prefix("process didn't exit successfully: ")
            && let Some(entry) = self.failed.last_mut()
            && entry.crashed.is_some()
            && let Some(i) = rest.rfind(" (")
        {
            entry.crashed = Some(format!(
                "ended without a test result: {}",
                rest[i + 2..].trim_end_matches(')')
            ));
        }
    }

    /// The entry of the binary running now, made on its first failure.
    fn current_failed(&mut self) -> &mut FailedBinary {
        let binary = self
            .current
            .clone()
            .unwrap_or_else(|| "an unannounced test binary".to_string());
        if self.failed.last().is_none_or(|b| b.binary != binary) {
            self.failed.push(FailedBinary {
                binary,
                rerun: None,
                tests: Vec::new(),
                crashed: None,
            });
        }
        self.failed.last_mut().expect("just pushed")
    }

    /// The failures as printed at the end: each binary (with how to rerun it), then its tests.
    fn failure_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in &self.failed {
            match &b.rerun {
                Some(r) => out.push(format!("  {} (rerun: cargo test {r})", b.binary)),
                None => out.push(format!("  {}", b.binary)),
            }
            if let Some(why) = &b.crashed {
                out.push(format!("    [{why}]"));
            }
            for t in &b.tests {
                out.push(format!("    {t}"));
            }
            if b.tests.is_empty() && b.crashed.is_none() {
                out.push("    [failed; no test named]".into());
            }
        }
        out
    }
}

/// The test binary a line of cargo's announces, if it is one: `     Running tests/overlay.rs
/// (target/debug/deps/overlay-0123456789abcdef)` is `overlay (tests/overlay.rs)`, `   Doc-tests
/// twill_agent` is `doc-tests of twill_agent`. Test output that merely starts with `Running` is
/// not taken for one: cargo's line names a path ending in a 16-digit hash.
fn announced_binary(line: &str) -> Option<String> {
    let trimmed = line.trim_start();
    if trimmed.len() == line.len() {
        return None;
    }
    if let Some(krate) = trimmed.strip_prefix("Doc-tests ") {
        return Some(format!("doc-tests of {}", krate.trim()));
    }
    let rest = trimmed.strip_prefix("Running ")?;
    let (what, path) = rest.strip_suffix(')')?.rsplit_once(" (")?;
    let file = path.rsplit('/').next()?;
    let (stem, hash) = file.rsplit_once('-')?;
    if hash.len() != 16 || !hash.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("{stem} ({what})"))
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

    /// `cargo test --workspace --no-fail-fast` output as it comes through the one pipe: three
    /// binaries fail (one with two tests, one crashes, one doc-test), two pass, and test output
    /// that looks like cargo's or libtest's lines is in between.
    const RUN: &str = "   Compiling twill-agent v0.1.0 (/work/twill/agent)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 1m 02s
     Running unittests src/lib.rs (/var/cache/twill/debug/deps/twill_agent-0a1b2c3d4e5f6a7b)

running 4 tests
test store::a ... ok
test store::b ... FAILED
test metrics::c ... ok
test metrics::d ... FAILED

failures:

---- store::b stdout ----
Running the check (for real)
failures:
    not a test name
thread 'store::b' panicked at agent/src/store.rs:10:5:
assertion failed

---- metrics::d stdout ----
thread 'metrics::d' panicked at agent/src/metrics.rs:20:5:
    indented panic text

failures:
    metrics::d
    store::b

test result: FAILED. 2 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.41s

error: test failed, to rerun pass `-p twill-agent --lib`
     Running tests/overlay.rs (/var/cache/twill/debug/deps/overlay-00112233445566ff)

running 2 tests
test vxlan_full_mesh ... ok
test restart_loses_nothing ... ok

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 30.2s

     Running tests/udp.rs (/var/cache/twill/debug/deps/udp-ffeeddccbbaa9988)

running 3 tests
test udp_a ... ok
error: test failed, to rerun pass `-p twill-tests --test udp`

Caused by:
  process didn't exit successfully: `/var/cache/twill/debug/deps/udp-ffeeddccbbaa9988` (signal: 11, SIGSEGV: invalid memory reference)
     Running tests/services_source.rs (/var/cache/twill/debug/deps/services_source-0123456789abcdef)

running 1 test
test get_services ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.1s

   Doc-tests twill_agent

running 1 test
test agent/src/lib.rs - example (line 3) ... FAILED

failures:

---- agent/src/lib.rs - example (line 3) stdout ----
error[E0425]: cannot find value `x` in this scope

failures:
    agent/src/lib.rs - example (line 3)

test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.2s

error: doctest failed, to rerun pass `-p twill-agent --doc`
error: 3 targets failed:
    `-p twill-agent --lib`
    `-p twill-tests --test udp`
    `-p twill-agent --doc`
";

    fn report(text: &str) -> Report {
        let mut r = Report::default();
        for l in text.lines() {
            r.feed(l);
        }
        r
    }

    #[test]
    fn every_failed_test_is_listed_by_binary() {
        let r = report(RUN);
        assert_eq!(
            r.failed,
            [
                FailedBinary {
                    binary: "twill_agent (unittests src/lib.rs)".into(),
                    rerun: Some("-p twill-agent --lib".into()),
                    tests: vec!["metrics::d".into(), "store::b".into()],
                    crashed: None,
                },
                FailedBinary {
                    binary: "udp (tests/udp.rs)".into(),
                    rerun: Some("-p twill-tests --test udp".into()),
                    tests: vec![],
                    crashed: Some(
                        "ended without a test result: signal: 11, SIGSEGV: invalid memory reference"
                            .into()
                    ),
                },
                FailedBinary {
                    binary: "doc-tests of twill_agent".into(),
                    rerun: Some("-p twill-agent --doc".into()),
                    tests: vec!["agent/src/lib.rs - example (line 3)".into()],
                    crashed: None,
                },
            ]
        );
        assert_eq!(
            r.totals,
            Totals {
                passed: 5,
                failed: 3,
                ignored: 1
            }
        );
        assert_eq!(r.summaries.len(), 4);
        assert_eq!(
            r.failure_lines(),
            [
                "  twill_agent (unittests src/lib.rs) (rerun: cargo test -p twill-agent --lib)",
                "    metrics::d",
                "    store::b",
                "  udp (tests/udp.rs) (rerun: cargo test -p twill-tests --test udp)",
                "    [ended without a test result: signal: 11, SIGSEGV: invalid memory reference]",
                "  doc-tests of twill_agent (rerun: cargo test -p twill-agent --doc)",
                "    agent/src/lib.rs - example (line 3)",
            ]
        );
    }

    #[test]
    fn a_passing_run_lists_nothing() {
        let passing: String = RUN
            .split("     Running tests/overlay.rs")
            .nth(1)
            .unwrap()
            .split("     Running tests/udp.rs")
            .next()
            .unwrap()
            .to_string();
        let r = report(&format!("     Running tests/overlay.rs{passing}"));
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(r.totals.passed, 2);
    }

    #[test]
    fn only_cargos_announcements_name_binaries() {
        assert_eq!(
            announced_binary(
                "     Running tests/daemon.rs (/var/cache/twill/daemon/debug/deps/daemon-29f87beb884bb68d)"
            )
            .as_deref(),
            Some("daemon (tests/daemon.rs)")
        );
        assert_eq!(
            announced_binary("   Doc-tests twill_facts").as_deref(),
            Some("doc-tests of twill_facts")
        );
        for noise in [
            "Running tests/daemon.rs (target/debug/deps/daemon-29f87beb884bb68d)",
            "     Running the check (for real)",
            "     Running x (target/debug/deps/daemon-29f87beb)",
        ] {
            assert_eq!(announced_binary(noise), None, "{noise}");
        }
    }

    #[test]
    fn every_test_binary_runs() {
        let args =
            |a: &[&str]| cargo_test_args(&a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>());
        assert_eq!(args(&[]), ["test", "--workspace", "--no-fail-fast"]);
        assert_eq!(
            args(&["--test", "udp", "--", "--nocapture"]),
            [
                "test",
                "--workspace",
                "--no-fail-fast",
                "--test",
                "udp",
                "--",
                "--nocapture"
            ]
        );
        assert_eq!(
            args(&["--no-fail-fast"]),
            ["test", "--workspace", "--no-fail-fast"]
        );
    }
}
