//! Machine facts for the report, and the clock maths for its timestamps (UTC without a date
//! crate: the civil-from-days algorithm is ten lines, a dependency is not).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::report::Machine;
use crate::util::{probe, workspace_root};

/// What this machine is, as far as the figures care; `twilld` is the binary measured.
pub fn facts(twilld: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut load_avg = [0.0; 3];
    for (slot, field) in load_avg.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    let root = workspace_root();
    let root = root.to_string_lossy();
    let git = probe("git", &["-C", &root, "rev-parse", "--short", "HEAD"]).map_or_else(
        || "unknown".to_string(),
        |commit| {
            let dirty = probe("git", &["-C", &root, "status", "--porcelain"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}+dirty")
            } else {
                commit
            }
        },
    );
    Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        memory_mib: field(&meminfo, "MemTotal")
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024),
        load_avg,
        iperf3: first_line(probe("iperf3", &["--version"])),
        etcd: first_line(probe("etcd", &["--version"])),
        twilld: std::fs::metadata(twilld)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or_else(
                || twilld.display().to_string(),
                |d| format!("{} (built {})", twilld.display(), rfc3339(d.as_secs())),
            ),
        git,
    }
}

/// The value after `name:` on the first line that starts with `name`.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn first_line(text: Option<String>) -> String {
    text.and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `(year, month, day, hour, minute, second)` in UTC for `secs` after the epoch.
pub fn utc(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = i64::try_from(secs / 86_400).expect("days since epoch fit i64");
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("day of month");
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("month");
    let year = yoe + era * 400 + i64::from(month <= 2);
    let t = u32::try_from(rem).expect("seconds of a day");
    (year, month, day, t / 3600, t / 60 % 60, t % 60)
}

/// RFC 3339, e.g. `2026-11-23T18:10:32Z`.
pub fn rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// A directory-name timestamp, e.g. `20261123-181032`.
pub fn compact(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc(secs);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_798_050_632, "2026-12-23T18:30:32Z"),
        ] {
            assert_eq!(rfc3339(secs), want, "rfc3339({secs})");
        }
        assert_eq!(compact(1_798_050_632), "20261223-183032");
    }

    #[test]
    fn proc_fields() {
        assert_eq!(
            field("MemTotal:       24684000 kB\n", "MemTotal").as_deref(),
            Some("24684000 kB")
        );
    }
}
