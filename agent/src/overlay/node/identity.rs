//! This node's identity, kept in a file across restarts and published with its lease (`TwillNodeID`).

use anyhow::{Context, bail};
use std::path::Path;

/// Where the node's identity is kept by default (it must survive a reboot, as the lease does).
pub const DEFAULT_NODE_ID_FILE: &str = "/var/lib/twill/node-id";

/// Reads this node's identity from `path`, creating it (32 random hex digits) on first start.
/// An unreadable file or one that does not hold an identity is an error naming the file.
pub fn node_identity(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            let ok = (8..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                let shown: String = id.chars().take(70).collect();
                bail!(
                    "node identity file {} holds {shown:?}, not an identity (8 to 64 letters, \
                     digits, '-' or '_'); remove it to have a new one made",
                    path.display()
                );
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("{:032x}", rand::random::<u128>());
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create directory {}", dir.display()))?;
            }
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::write(&tmp, format!("{id}\n"))
                .with_context(|| format!("write node identity file {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
            tracing::info!(file = %path.display(), node_id = %id, "new node identity");
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("read node identity file {}", path.display())),
    }
}
