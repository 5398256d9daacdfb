//! Small helpers: progress lines, running commands as steps, locating the workspace and target
//! directories.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Prints a progress line.
pub fn say(msg: &str) {
    println!("xtask: {msg}");
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
