//! `twill-cni`: the CNI plugin binary. All logic is in the `twill_cni` library; this reads the
//! environment and stdin, prints what `run` returns and exits with its status.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write as _};

fn main() {
    let vars: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut stdin = Vec::new();
    // Always drain stdin (a runtime writing the config must not get EPIPE), except from a
    // terminal: a person running `CNI_COMMAND=VERSION twill-cni` by hand must not hang.
    let input = std::io::stdin();
    if !input.is_terminal()
        && let Err(e) = input.lock().read_to_end(&mut stdin)
    {
        eprintln!("twill-cni: read stdin: {e}");
    }
    let out = twill_cni::run(vars, &stdin);
    if !out.stdout.is_empty() {
        let mut w = std::io::stdout().lock();
        let _ = w.write_all(out.stdout.as_bytes());
        let _ = w.write_all(b"\n");
        let _ = w.flush();
    }
    std::process::exit(out.exit_code);
}
