//! `cargo xtask setup`: install what a fresh Debian machine of this kind lacks, and nothing when
//! everything is there (a run on a ready machine takes well under a second and needs no network).
//!
//! Each step checks before it acts — `dpkg-query` for packages, `rustup component list` for
//! `rust-src`, `bpf-linker --version` for the linker, `statfs` for bpffs — and prints what it did
//! or skipped. bpf-linker is built against the nightly toolchain's own libLLVM (Debian's LLVM does
//! not match); its LLVM major version is read from the sysroot's `libLLVM-NN-*.so` file name, so
//! a nightly that moves to a new LLVM still gets a matching linker.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{is_root, probe, say, step};

/// Debian packages twill's build, tests and demo need.
pub const APT_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // protoc's well-known types (google/protobuf/*.proto): only a recommendation of
    // protobuf-compiler, which `--no-install-recommends` leaves out.
    "libprotobuf-dev",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "iperf3",
    "bpftool",
    "iputils-ping",
    "podman",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    // `bench dns`: the reference DNS server and the load generator.
    "dnsmasq-base",
    "dnsperf",
];

/// Runs every set-up step.
pub fn setup() -> Result<()> {
    apt_packages().context("setup: apt packages")?;
    nightly_rust_src().context("setup: nightly toolchain")?;
    bpf_linker().context("setup: bpf-linker")?;
    bpffs().context("setup: bpffs")?;
    Ok(())
}

/// The packages of `APT_PACKAGES` not installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(APT_PACKAGES)
        .output()
        .context("run dpkg-query (is this a Debian machine?)")?;
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter(|l| l.ends_with("install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn apt_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        say(&format!(
            "setup: apt packages present ({})",
            APT_PACKAGES.len()
        ));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages {}: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    say(&format!(
        "setup: installing apt packages: {}",
        missing.join(" ")
    ));
    step(Command::new("apt-get").args(["update", "-qq"]))?;
    step(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    if probe("rustup", &["run", "nightly", "rustc", "--version"]).is_none() {
        say("setup: installing the nightly toolchain (minimal profile)");
        step(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = probe(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("setup: nightly rust-src present");
        return Ok(());
    }
    step(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// `bpf-linker` on `PATH`, or in `$CARGO_HOME/bin` where `cargo install` puts it.
fn bpf_linker_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    std::env::split_paths(&path)
        .chain(cargo_home.map(|h| h.join("bin")))
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn bpf_linker() -> Result<()> {
    let existing = bpf_linker_path();
    if let Some(path) = &existing
        && let Some(version) = probe(&path.to_string_lossy(), &["--version"])
    {
        say(&format!("setup: bpf-linker present ({version})"));
        return Ok(());
    }
    let sysroot = probe("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
        .context("find the nightly sysroot")?;
    let lib_dir = Path::new(&sysroot).join("lib");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && Path::new(n).extension().is_some_and(|e| e == "so"))
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let (link_name, major) = llvm_lib(&lib)?;
    // A linker that exists but does not run was built against a nightly since replaced.
    let force = existing.is_some();
    say(&format!(
        "setup: building bpf-linker against nightly's LLVM {major}{} (about a minute)",
        if force {
            ", replacing a broken one"
        } else {
            ""
        }
    ));
    let rustflags = format!(
        "-L native={dir} -l dylib={link_name} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "install", "bpf-linker"])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags)
        // Nightly's own rustc, whatever rustc PATH (or an inherited RUSTC) would give.
        .env("RUSTC", Path::new(&sysroot).join("bin/rustc"))
        // Build in cargo install's own temporary directory, not the workspace's target.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN");
    if force {
        cmd.arg("--force");
    }
    step(&mut cmd)?;
    let path = bpf_linker_path().context("bpf-linker installed but not found on PATH")?;
    probe(&path.to_string_lossy(), &["--version"])
        .with_context(|| format!("{} --version fails after install", path.display()))?;
    Ok(())
}

/// From `libLLVM-22-rust-1.97.0-nightly.so`: the name to link (`LLVM-22-rust-1.97.0-nightly`)
/// and the LLVM major version (`22`).
fn llvm_lib(file: &str) -> Result<(String, u32)> {
    let stem = file
        .strip_suffix(".so")
        .and_then(|s| s.strip_prefix("lib"))
        .with_context(|| format!("unexpected LLVM library name {file:?}"))?;
    let major = stem
        .strip_prefix("LLVM-")
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .with_context(|| format!("no LLVM major version in {file:?}"))?;
    Ok((stem.to_string(), major))
}

fn bpffs() -> Result<()> {
    if !is_root() {
        let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
        if !mounted {
            say("setup: bpffs not mounted at /sys/fs/bpf, and mounting it needs root (skipped)");
        }
        return Ok(());
    }
    if twill_tests::rig::ensure_bpffs()? {
        say("setup: mounted bpffs at /sys/fs/bpf");
    } else {
        say("setup: bpffs mounted at /sys/fs/bpf");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_the_library_name() {
        let (name, major) = llvm_lib("libLLVM-22-rust-1.97.0-nightly.so").unwrap();
        assert_eq!(name, "LLVM-22-rust-1.97.0-nightly");
        assert_eq!(major, 22);
        assert_eq!(llvm_lib("libLLVM-19.so").unwrap().1, 19);
        assert!(llvm_lib("libfoo.so").is_err());
    }
}
