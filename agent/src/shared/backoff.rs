//! Retrying with exponential backoff, shared by every loop of the agent that waits on etcd or the
//! Kubernetes API.

use std::time::Duration;

use crate::shared::metrics::Metrics;
use crate::shared::shutdown::Shutdown;

/// Exponential backoff between 100 ms and 10 s.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    /// The next wait: 100 ms, then twice the last one, at most 10 s.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        d
    }
}

/// Retries `f` with backoff until it succeeds, logging each failure as `what`; for a task that
/// is aborted rather than told to stop.
pub async fn until_ok<T, E, F, Fut>(what: &str, mut f: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Retries `f` with backoff until it succeeds (`Some`) or `shutdown` fires (`None`).
pub async fn retry<T, F, Fut>(
    what: &str,
    metrics: &Metrics,
    shutdown: &Shutdown,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new();
    loop {
        let res = tokio::select! {
            () = shutdown.wait() => return None,
            res = f() => res,
        };
        match res {
            Ok(v) => return Some(v),
            Err(e) => {
                let msg = format!("{what}: {e:#}");
                tracing::warn!(error = %msg, "retrying");
                metrics.set_error(&msg);
            }
        }
        tokio::select! {
            () = shutdown.wait() => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
