//! Builds twill's eBPF programs (`ebpf/twill-ebpf`) and leaves the object in `OUT_DIR`, where
//! `twill_agent::shared::bpf` embeds it with `aya::include_bytes_aligned!`.
//!
//! Why it is shaped as it is (model: aya-template's `build.rs`):
//! - `aya_build::build_ebpf` runs `rustup run nightly cargo build --target bpfel-unknown-none
//!   -Z build-std=core --release` on the eBPF crate, in its own target dir under `OUT_DIR`, so a
//!   plain `cargo build -p twill-agent` on stable produces everything. It needs the nightly
//!   toolchain with `rust-src`, and `bpf-linker` built against nightly's LLVM.
//! - The eBPF package is located with `cargo metadata` rather than a hard-coded relative path.
//! - `rustup` (which aya-build uses to pick nightly) and `bpf-linker` (which rustc runs to link
//!   for BPF) are looked up in `PATH`. Cargo started through the rustup proxy already puts
//!   `$CARGO_HOME/bin` in `PATH`; when a tool is still missing (a toolchain's cargo run directly,
//!   a shell that never sourced `~/.cargo/env`) we append `$CARGO_HOME/bin` (default
//!   `~/.cargo/bin`, where rustup and `cargo install` put them) to the `PATH` the nested cargo
//!   inherits.
//! - `AYA_BUILD_SKIP=1` (honoured by aya-build) skips the eBPF build, e.g. for a lint job without
//!   nightly; we then embed an empty object, which `twill_agent::shared::bpf` reports as
//!   `EbpfError::NotBuilt` at load time instead of failing the host build.
//! - aya-build only watches the eBPF crate's directory; the shared `twill-common` crate and
//!   `Cargo.lock` (the aya-ebpf version) are watched too, since both end up in the object.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};

/// The eBPF package and the name of its binary (the object file aya-build leaves in `OUT_DIR`).
const EBPF_PACKAGE: &str = "twill-ebpf";
const EBPF_BIN: &str = "twill-ebpf-progs";
const COMMON_PACKAGE: &str = "twill-common";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata {
        packages,
        workspace_root,
        ..
    } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package_dir = |name: &str| -> anyhow::Result<PathBuf> {
        let package = packages
            .iter()
            .find(|package| package.name.as_str() == name)
            .ok_or_else(|| anyhow!("package {name} not found in the workspace"))?;
        package
            .manifest_path
            .parent()
            .map(|dir| dir.as_std_path().to_owned())
            .ok_or_else(|| anyhow!("manifest path {} has no parent", package.manifest_path))
    };
    let ebpf_dir = package_dir(EBPF_PACKAGE)?;
    let common_dir = package_dir(COMMON_PACKAGE)?;
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // A changed lock file may change aya-ebpf, which is compiled into the object.
    println!("cargo:rerun-if-changed={workspace_root}/Cargo.lock");

    ensure_tools_in_path();

    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "build eBPF programs (needs nightly + rust-src + bpf-linker; AYA_BUILD_SKIP=1 skips)",
    )?;

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_BIN);
    if !object.exists() {
        // Only reachable with AYA_BUILD_SKIP: a real build that produced no object fails above.
        println!("cargo:warning=eBPF build skipped; embedding an empty {EBPF_BIN}");
        fs::write(&object, []).with_context(|| format!("write {}", object.display()))?;
    }
    Ok(())
}

/// Appends `$CARGO_HOME/bin` to `PATH` when `rustup` or `bpf-linker` is missing from `PATH` but
/// is there. (Cargo run through the rustup proxy already has it in `PATH`; a toolchain's cargo run
/// directly, e.g. from a CI image, may not.)
fn ensure_tools_in_path() {
    const TOOLS: [&str; 2] = ["rustup", "bpf-linker"];
    let path = env::var_os("PATH").unwrap_or_default();
    let in_path = |tool: &str| env::split_paths(&path).any(|dir| is_file(&dir.join(tool)));
    if TOOLS.iter().all(|tool| in_path(tool)) {
        return;
    }
    let Some(cargo_bin) = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|cargo_home| cargo_home.join("bin"))
    else {
        return;
    };
    let missing: Vec<&str> = TOOLS
        .into_iter()
        .filter(|tool| !in_path(tool) && !is_file(&cargo_bin.join(tool)))
        .collect();
    if !missing.is_empty() {
        println!(
            "cargo:warning={} not found in PATH nor in {}",
            missing.join(", "),
            cargo_bin.display()
        );
    }
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    dirs.push(cargo_bin);
    if let Ok(new_path) = env::join_paths(dirs) {
        set_path(new_path);
    }
}

fn set_path(path: OsString) {
    // SAFETY: build scripts are single-threaded at this point (aya-build spawns its threads
    // later), so nothing reads the environment concurrently.
    unsafe { env::set_var("PATH", path) };
}

fn is_file(path: &Path) -> bool {
    path.metadata().is_ok_and(|meta| meta.is_file())
}
