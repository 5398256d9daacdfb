//! Logging: warnings and errors on stderr (runtimes show it when a plugin fails), everything
//! from debug up in the optional `logFile`, one line per event with the container ID, plus one
//! line per kernel-facing step with its duration.
//!
//! Set up after the config is decoded (the log file is named there); failures before that go
//! to stderr only. Opening the log file must never fail an ADD: a problem with it is reported on
//! stderr and the command goes on.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Installs the global subscriber (once per process; later calls are no-ops).
pub fn init(log_file: Option<&Path>) {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_filter(LevelFilter::WARN);
    let file = log_file.and_then(
        |p| match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(Mutex::new(f))
                    .with_ansi(false)
                    .with_target(false)
                    // One line per kernel-facing step with its duration (`time.busy`).
                    .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
                    .with_filter(LevelFilter::DEBUG),
            ),
            Err(e) => {
                eprintln!("twill-cni: open logFile {}: {e}", p.display());
                None
            }
        },
    );
    let subscriber = tracing_subscriber::registry().with(stderr).with(file);
    let _ = tracing::subscriber::set_global_default(subscriber);
}
