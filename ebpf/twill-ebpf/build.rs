//! Makes cargo rebuild the eBPF programs when `bpf-linker` changes.
//!
//! Linking for `bpfel-unknown-none` runs the `bpf-linker` binary, a dependency cargo cannot see
//! (artifact dependencies would express it, but rust-lang/cargo#12385 makes them impractical). As
//! in aya-template, we print `rerun-if-changed` for the linker's path so that reinstalling it
//! (e.g. after a nightly update, which breaks the old one) invalidates the build. On the host
//! (`cargo build --workspace`) nothing is linked with bpf-linker, so nothing is required.

fn main() {
    let bpf = std::env::var_os("CARGO_CFG_TARGET_ARCH").is_some_and(|arch| arch == "bpf");
    if !bpf {
        return;
    }
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found in PATH ({err}); install it with \
             `cargo +nightly install bpf-linker`"
        ),
    }
}
