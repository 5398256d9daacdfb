//! SIGTERM and SIGINT as one signal every wait of the agent selects on.

use tokio::sync::watch;

/// The end of the agent: set once SIGTERM or SIGINT arrives; every wait of the agent selects on
/// it, so no loop outlives a signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Installs the SIGTERM and SIGINT handlers (from then on the signals no longer kill the
    /// process: this value reports them).
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutting down");
            let _ = tx.send(true);
            // Keep the sender: a later wait still sees the signal.
            std::future::pending::<()>().await;
        });
        Ok(Shutdown(rx))
    }

    /// A signal fired by hand (tests): send `true` to shut down.
    pub fn manual() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Returns once the agent is to shut down.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the agent is to shut down.
    pub fn fired(&self) -> bool {
        *self.0.borrow()
    }
}
