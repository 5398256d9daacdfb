//! Reading twilld's `/metrics` the way a Prometheus user does: a scrape from inside the node's
//! namespace, and the value of one series of it.

use std::net::SocketAddr;

use crate::ns::http_get;

/// The `/metrics` text served at `addr`, fetched from inside namespace `ns`; empty while it
/// cannot be read (not up yet, or gone), so a test can wait for a series to appear.
pub fn scrape(ns: &str, addr: SocketAddr) -> String {
    http_get(ns, addr, "/metrics")
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
        .unwrap_or_default()
}

/// The value of the Prometheus sample `series` (name and labels exactly as exposed, e.g.
/// `twill_services_syncs_total{kind="full",result="ok"}`) in a `/metrics` text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prometheus_samples() {
        let text = "# HELP x y\n# TYPE x counter\n\
                    twill_services_syncs_total{kind=\"full\",result=\"ok\"} 3\n\
                    twill_services_frontends 10000\n\
                    twill_services_frontends_extra 1\n\
                    twill_services_sync_duration_seconds_sum 0.3125\n";
        assert_eq!(
            sample(
                text,
                r#"twill_services_syncs_total{kind="full",result="ok"}"#
            ),
            Some(3.0)
        );
        assert_eq!(sample(text, "twill_services_frontends"), Some(10000.0));
        assert_eq!(
            sample(text, "twill_services_sync_duration_seconds_sum"),
            Some(0.3125)
        );
        assert_eq!(sample(text, "twill_services_backends"), None);
    }
}
