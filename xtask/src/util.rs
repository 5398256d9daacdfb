//! Small helpers: progress lines, running commands as steps, locating the workspace and target
//! directories.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use twill_tests::suite::strip_ansi;

/// Prints a progress line.
pub fn say(msg: &str) {
    println!("xtask: {msg}");
}

/// `value` as it is spelled on the command line.
pub fn arg_name(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// The workspace root (xtask lives one level below it). `cargo run` and `cargo test` tell the
/// process where its manifest is; that wins over the directory xtask was compiled in, which
/// belongs to another checkout when checkouts share a `CARGO_TARGET_DIR` and cargo reused the
/// binary.
pub fn workspace_root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// `cargo` (the one running us, if known), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// The cargo target directory (`target/` or `CARGO_TARGET_DIR`): xtask runs from
/// `<target>/<profile>/xtask`.
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate xtask's executable")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("xtask's executable is not in <target>/<profile>/")
}

/// The command line, for messages (the program by its file name: `cargo`, not the toolchain path).
pub fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    let mut parts = vec![name.to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// `cargo build` of what a rig and the benchmarks run: twilld, twill-cni and the pods'
/// responder (`twill-probe`), in the release profile or the debug one.
pub fn build_binaries(release: bool) -> Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "-p",
        "twill-agent",
        "--bin",
        "twilld",
        "-p",
        "twill-cni",
        "--bin",
        "twill-cni",
        "-p",
        "twill-probe",
        "--bin",
        "twill-probe",
    ]);
    if release {
        build.arg("--release");
    }
    step(&mut build)
}

/// Runs `cmd` with the terminal's stdio after printing it; an error naming it if it fails.
pub fn step(cmd: &mut Command) -> Result<()> {
    let line = show(cmd);
    say(&format!("$ {line}"));
    let status = cmd.status().with_context(|| format!("run {line}"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `program args` quietly; its trimmed stdout if it succeeds, `None` otherwise (including
/// when the program does not exist).
pub fn probe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether we are root.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The last `n` lines of a twilld log worth reading in an error: ANSI colours removed, and
/// without the lines of a backtrace (with `RUST_BACKTRACE` set, an agent that fails to start
/// ends its log with dozens of frames that would push the error itself out of the tail).
pub fn log_tail(text: &str, n: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut in_backtrace = false;
    for line in text.lines() {
        let plain = strip_ansi(line);
        let t = plain.trim_start();
        if t.starts_with("Stack backtrace:") {
            in_backtrace = true;
            continue;
        }
        if t.starts_with("====") {
            in_backtrace = false;
        }
        let frame = t
            .split_once(": ")
            .is_some_and(|(num, _)| !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()))
            || t.starts_with("at ");
        if in_backtrace && (frame || t.is_empty()) {
            continue;
        }
        in_backtrace = false;
        lines.push(plain);
    }
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last line of a twilld log saying its service loop cannot program (a failed list of the
/// store, a failed apply, the loop stopped), without colours; `None` when there is none. A
/// benchmark waiting for services to be programmed stops at such a line instead of waiting out
/// its timeout: twilld retries forever, so the wait could never end well.
pub fn service_failure(log: &str) -> Option<String> {
    const SIGNS: [&str; 3] = [
        "listing services failed",
        "service dataplane sync failed",
        "service loop stopped",
    ];
    log.lines()
        .rev()
        .find(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(strip_ansi)
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_tails_skip_backtraces_and_colours() {
        let log = "==== twill-rig: starting twilld\n\
                   \u{1b}[2m2026\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m pin link /x/tc_flannel.1_in\n\
                   Error: start the service proxy\n\nCaused by:\n    pin link: EPERM\n\n\
                   Stack backtrace:\n   0: anyhow::error\n             at /src/x.rs:1:1\n\
                   \n  32: _start\n";
        let t = super::log_tail(log, 4);
        assert_eq!(
            t,
            "Error: start the service proxy\n\nCaused by:\n    pin link: EPERM"
        );
        assert!(super::log_tail(log, 10).contains("2026 ERROR pin link"));
    }

    #[test]
    fn spots_a_service_loop_that_cannot_program() {
        let log = "x INFO service dataplane read back frontends=0\n\
                   \u{1b}[33m WARN\u{1b}[0m listing services failed; keeping the dataplane as it \
                   is error=etcd get /p/services/: decoded message length too large\n";
        let why = super::service_failure(log).unwrap();
        assert!(why.starts_with(" WARN listing services failed"), "{why}");
        assert!(why.contains("too large"));
        assert_eq!(super::service_failure("x INFO all good\n"), None);
    }
}
