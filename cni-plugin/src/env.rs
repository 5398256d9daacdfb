//! The CNI environment variables (`CNI_COMMAND`, `CNI_CONTAINERID`, ...).
//!
//! Read once, from a map rather than the process environment, so tests can feed any combination.
//! Which variables are required depends on the command (ADD needs a netns, GC needs none of the
//! per-container ones); a missing or malformed one is error 4 naming the variable.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{CniError, code, quoted};

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container.
    Add,
    /// Detach it (idempotent).
    Del,
    /// Verify the attachment.
    Check,
    /// Report supported versions.
    Version,
    /// Garbage-collect attachments not in the valid list (1.1.0).
    Gc,
    /// Report whether ADD can be served (1.1.0).
    Status,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }

    /// The command's name as the runtime spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// Whether the command acts on one container attachment.
    pub fn per_container(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// The validated CNI environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: String,
    /// `CNI_NETNS` (required for ADD and CHECK; may be empty for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (ADD, DEL, CHECK).
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`, where delegated plugins are looked up.
    pub path: Vec<PathBuf>,
    /// Every variable, passed on unchanged to a delegated plugin.
    pub raw: HashMap<String, String>,
}

/// The longest `CNI_CONTAINERID` twill takes (runtimes use 64 hex digits). The ID is part of the
/// host veth's alias, which the kernel limits to 255 bytes (see [`crate::names::MAX_ALIAS_LEN`]).
pub const MAX_CONTAINER_ID_LEN: usize = 128;

fn invalid(var: &str, why: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_ENV, format!("invalid {var}: {why}"))
}

/// Checks a Linux interface name as the kernel's `dev_valid_name` and libcni's
/// `ValidateInterfaceName` do, so a name the kernel would refuse or change is refused here, before
/// anything is created: 1..=15 bytes, not `.` or `..`, no `/`, `:`, NUL or whitespace — the
/// kernel's (`\t \n \v \f \r`, space, and byte 0xa0, which is also the second byte of UTF-8
/// characters such as `à`) and Unicode's (libcni). And no `%`: the kernel takes such a name as a
/// template (`eth%d` becomes `eth0`), so the pod end would not get the name asked for.
pub fn valid_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 15 {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("reserved name");
    }
    if name.bytes().any(|b| matches!(b, b'/' | b':' | b'%' | 0)) {
        return Err("contains '/', ':', '%' or NUL");
    }
    let kernel_space = |b: u8| matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0xa0);
    if name.bytes().any(kernel_space) || name.chars().any(char::is_whitespace) {
        return Err("contains whitespace (to the kernel also byte 0xa0, as in 'à')");
    }
    Ok(())
}

/// Checks a container ID as the spec and libcni's `ValidateContainerID` do — an ASCII letter or
/// digit, then letters, digits, `_`, `.` and `-` — and that it is at most
/// [`MAX_CONTAINER_ID_LEN`] bytes.
pub fn valid_container_id(id: &str) -> Result<(), String> {
    let mut bytes = id.bytes();
    match bytes.next() {
        None => return Err("empty".into()),
        Some(b) if !b.is_ascii_alphanumeric() => {
            return Err("must start with a letter or a digit".into());
        }
        Some(_) => {}
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err("only letters, digits, '-', '_' and '.' are allowed".into());
    }
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(format!("longer than {MAX_CONTAINER_ID_LEN} bytes"));
    }
    Ok(())
}

impl CniEnv {
    /// Reads the command alone; everything else waits for [`CniEnv::from_map`].
    pub fn command(vars: &HashMap<String, String>) -> Result<Command, CniError> {
        let raw = vars
            .get("CNI_COMMAND")
            .ok_or_else(|| invalid("CNI_COMMAND", "not set"))?;
        Command::parse(raw).ok_or_else(|| {
            invalid(
                "CNI_COMMAND",
                format!("{raw:?} is not ADD, DEL, CHECK, VERSION, GC or STATUS"),
            )
        })
    }

    /// Validates the variables `command` needs.
    pub fn from_map(vars: HashMap<String, String>) -> Result<Self, CniError> {
        let command = Self::command(&vars)?;
        let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let (mut container_id, mut ifname, mut netns) = (String::new(), String::new(), None);
        if command.per_container() {
            let id = get("CNI_CONTAINERID").ok_or_else(|| invalid("CNI_CONTAINERID", "not set"))?;
            valid_container_id(id)
                .map_err(|why| invalid("CNI_CONTAINERID", format!("{}: {why}", quoted(id))))?;
            container_id = id.to_string();
            let name = get("CNI_IFNAME").ok_or_else(|| invalid("CNI_IFNAME", "not set"))?;
            valid_ifname(name)
                .map_err(|why| invalid("CNI_IFNAME", format!("{}: {why}", quoted(name))))?;
            ifname = name.to_string();
            match get("CNI_NETNS") {
                Some(p) if !p.starts_with('/') => {
                    return Err(invalid(
                        "CNI_NETNS",
                        format!("{p:?} is not an absolute path"),
                    ));
                }
                Some(p) => netns = Some(PathBuf::from(p)),
                None if command == Command::Del => {}
                None => return Err(invalid("CNI_NETNS", "not set")),
            }
        }
        let mut args = Vec::new();
        if let Some(raw) = get("CNI_ARGS") {
            for pair in raw.split(';').filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| invalid("CNI_ARGS", format!("{pair:?} is not KEY=VALUE")))?;
                args.push((k.to_string(), v.to_string()));
            }
        }
        let path = get("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
            raw: vars,
        })
    }

    /// The value of `key` in `CNI_ARGS`.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An environment of `pairs`, as [`CniEnv::from_map`] and `run` take it.
    pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn add_needs_id_ifname_netns() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=a"),
        ];
        let env = CniEnv::from_map(vars(&base)).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.path.len(), 2);
        assert_eq!(env.arg("K8S_POD_NAME"), Some("a"));
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let v: Vec<_> = base
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = CniEnv::from_map(vars(&v)).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.msg.contains(missing), "{}", e.msg);
        }
    }

    #[test]
    fn del_tolerates_missing_netns() {
        let env = CniEnv::from_map(vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(env.netns, None);
    }

    #[test]
    fn rejects_bad_values() {
        let e = CniEnv::from_map(vars(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert!(e.msg.contains("CNI_COMMAND") && e.msg.contains("FROB"));
        // Each case: a valid environment of its command with one variable set to a bad value.
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
        ];
        for (base, (key, bad)) in [
            (&add[..], ("CNI_IFNAME", "this-name-is-too-long")),
            (&del[..], ("CNI_CONTAINERID", "a b")),
            (&del[..], ("CNI_ARGS", "novalue")),
            (&add[..], ("CNI_NETNS", "relative")),
        ] {
            let mut env = vars(base);
            env.insert(key.into(), bad.into());
            let e = CniEnv::from_map(env).unwrap_err();
            assert!(e.msg.contains(key), "{key}={bad}: {}", e.msg);
        }
    }

    #[test]
    fn gc_and_status_need_no_container() {
        for cmd in ["GC", "STATUS", "VERSION"] {
            CniEnv::from_map(vars(&[("CNI_COMMAND", cmd)])).unwrap();
        }
    }

    fn add_env(id: &str, ifname: &str) -> Result<CniEnv, CniError> {
        CniEnv::from_map(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", ifname),
        ]))
    }

    #[test]
    fn ifname_is_checked_as_the_kernel_and_libcni_check_it() {
        for good in ["eth0", "net1", "vé", "a.b-c_d", "0123456789abcde"] {
            add_env("c1", good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        // `%` makes the kernel treat the name as a template (`eth%d` becomes `eth0`); byte 0xa0
        // (in "à") and \v are spaces to the kernel; U+2003 is a space to libcni.
        for bad in [
            "eth%d",
            "a%b",
            "a\u{b}b",
            "và",
            "eth\u{2003}0",
            "a:b",
            "a/b",
            "a b",
            ".",
            "..",
            "0123456789abcdef",
        ] {
            let e = add_env("c1", bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}: {e}");
            assert!(
                e.msg.contains("CNI_IFNAME") && e.msg.contains(&format!("{bad:?}")),
                "{bad:?}: {}",
                e.msg
            );
        }
    }

    #[test]
    fn container_id_is_checked_as_libcni_checks_it() {
        let longest = "a".repeat(MAX_CONTAINER_ID_LEN);
        for good in ["abc", "0f3e", "A.b-c_d", longest.as_str()] {
            add_env(good, "eth0").unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for bad in ["-abc", ".abc", "_abc", "a b", "a/b", "a:b", "é"] {
            let e = add_env(bad, "eth0").unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}: {e}");
            assert!(
                e.msg.contains("CNI_CONTAINERID") && e.msg.contains(&format!("{bad:?}")),
                "{bad:?}: {}",
                e.msg
            );
        }
        // Too long for the host veth's alias: refused with its start and its length.
        for len in [MAX_CONTAINER_ID_LEN + 1, 10_000] {
            let e = add_env(&"b".repeat(len), "eth0").unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{e}");
            assert!(
                e.msg.contains("CNI_CONTAINERID")
                    && e.msg.contains("bbbbbbbb")
                    && e.msg.contains(&format!("{len} bytes")),
                "{}",
                e.msg
            );
            assert!(
                e.msg.len() < 300,
                "the message repeats the whole value: {}",
                e.msg
            );
        }
    }

    #[test]
    fn ifname_rules() {
        assert!(valid_ifname("eth0").is_ok());
        assert!(valid_ifname("a:b").is_err());
        assert!(valid_ifname("a/b").is_err());
        assert!(valid_ifname("..").is_err());
        assert!(valid_ifname("0123456789abcdef").is_err());
        assert!(valid_ifname("0123456789abcde").is_ok());
    }
}
