//! The CNI error reply and twill's error codes.
//!
//! Every failure leaves the plugin as one [`CniError`]: the spec's error object, printed as JSON on
//! stdout with a non-zero exit status, so the runtime can show `msg` to the user and act on `code`
//! (11 means "retry", 50 means "node network not ready"). Module errors (config, IPAM, netlink,
//! delegation) convert into it through `From`, which is where each one picks its code; `details`
//! carries the whole source chain, errno included, for the log.

use std::fmt;

use serde::Serialize;

/// Well-known codes from the CNI spec (0-99) and twill's own (100+).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported (unknown) field in the network configuration; the message names key and value.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container (its network namespace) does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variable; the message names it.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (IPAM state directory, log file).
    pub const IO_FAILURE: u32 = 5;
    /// The configuration on stdin could not be decoded.
    pub const DECODE: u32 = 6;
    /// Invalid network configuration; the message names the field and its value.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition: try again later (lock timeout, subnet file not written yet).
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD (the node's subnet facts are missing or unreadable).
    pub const NOT_AVAILABLE: u32 = 50;
    /// A netlink operation failed (the message names the operation and the link).
    pub const NETLINK: u32 = 100;
    /// `CNI_IFNAME` is already taken inside the container's network namespace.
    pub const IFNAME_TAKEN: u32 = 101;
    /// No free address is left in the range.
    pub const ADDRESS_EXHAUSTED: u32 = 102;
    /// The subnet file exists but cannot be parsed.
    pub const BAD_SUBNET_FILE: u32 = 103;
    /// The delegated IPAM plugin could not be run or returned garbage.
    pub const DELEGATE: u32 = 104;
    /// CHECK found the container's network not as ADD left it.
    pub const CHECK_FAILED: u32 = 105;
}

/// The spec's error object; also the error type of every command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    /// One of [`code`].
    pub code: u32,
    /// Short, human readable.
    pub msg: String,
    /// The full cause chain (errno included) for logs.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with a code and a message and no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An error whose message is `err`'s top line and whose details are the rest of its source
    /// chain: the causes the message does not already say. (The module errors print their
    /// source in their own message, `"read {path}: {source}"`; a runtime shows `msg; details`,
    /// so repeating them there would say the errno twice.)
    pub fn from_error(code: u32, err: &(dyn std::error::Error + 'static)) -> Self {
        let msg = err.to_string();
        let mut details = String::new();
        let mut cur = err.source();
        while let Some(e) = cur {
            let text = e.to_string();
            if !msg.contains(&text) && !details.contains(&text) {
                if !details.is_empty() {
                    details.push_str(": ");
                }
                details.push_str(&text);
            }
            cur = e.source();
        }
        Self { code, msg, details }
    }

    /// Adds context in front of the message (`"{ctx}: {msg}"`).
    #[must_use]
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The JSON object the runtime reads on stdout, tagged with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", self.code))
    }
}

/// `value` quoted for an error message; a long one (a 10,000-byte container ID) is cut to its
/// start and its length.
pub fn quoted(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.chars().count() <= SHOWN + 16 {
        return format!("{value:?}");
    }
    let start: String = value.chars().take(SHOWN).collect();
    format!("{start:?}… ({} bytes)", value.len())
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_keys() {
        let e = CniError {
            code: 7,
            msg: "invalid mode \"x\"".into(),
            details: "expected bridge or routed".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "invalid mode \"x\"");
        assert_eq!(v["details"], "expected bridge or routed");
    }

    #[test]
    fn empty_details_are_omitted() {
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(11, "busy").to_json("1.1.0")).unwrap();
        assert!(v.get("details").is_none());
        assert_eq!(v.as_object().unwrap().len(), 3);
    }

    #[test]
    fn from_error_says_each_cause_once() {
        // thiserror's usual shape: the source in the message and as `source()`.
        #[derive(Debug, thiserror::Error)]
        #[error("read /x/subnet.env: {0}")]
        struct Read(#[source] std::io::Error);
        let e = CniError::from_error(5, &Read(std::io::Error::from_raw_os_error(libc::ENOENT)));
        // What a runtime shows (libcni prints `msg; details`) and what the log gets.
        for shown in [format!("{}; {}", e.msg, e.details), e.to_string()] {
            assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
        }
    }

    #[test]
    fn from_error_keeps_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("create link eth0")]
        struct Outer(#[source] std::io::Error);
        let io = std::io::Error::from_raw_os_error(libc::EEXIST);
        let e = CniError::from_error(101, &Outer(io));
        assert_eq!(e.msg, "create link eth0");
        assert!(e.details.contains("os error 17"), "{}", e.details);
    }
}
