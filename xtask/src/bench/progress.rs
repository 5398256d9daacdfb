//! The progress display: one status line, rewritten in place with `\r` on a terminal, and plain
//! lines (only finished steps) when stderr is a pipe or a CI log.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::time::Instant;

/// Counts steps against a total that benchmarks raise as they learn their plan.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    tty: bool,
    state: Mutex<(usize, usize)>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// A display on stderr.
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new((0, 0)),
        }
    }

    /// Adds `steps` to the total.
    pub fn plan(&self, steps: usize) {
        self.lock().1 += steps;
    }

    /// Takes `steps` off the total (planned work that will not happen, e.g. a skipped backend).
    pub fn unplan(&self, steps: usize) {
        let mut s = self.lock();
        s.1 = s.1.saturating_sub(steps).max(s.0);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn prefix(&self, done: usize, total: usize) -> String {
        let secs = self.start.elapsed().as_secs();
        format!("[{done:>3}/{total:<3} {:>2}:{:02}]", secs / 60, secs % 60)
    }

    /// Shows what is running now (a terminal only).
    pub fn working(&self, what: &str) {
        if !self.tty {
            return;
        }
        let (done, total) = *self.lock();
        let line = format!("{} {what} …", self.prefix(done + 1, total));
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
    }

    /// Finishes a step: `what` and its outcome on a line of their own.
    pub fn done(&self, what: &str, outcome: &str) {
        let (done, total) = {
            let mut s = self.lock();
            s.0 += 1;
            s.1 = s.1.max(s.0);
            *s
        };
        let line = format!("{} {what}: {outcome}", self.prefix(done, total));
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    /// A line that is not a step (a note, a skip).
    pub fn note(&self, msg: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[K{msg}");
        } else {
            let _ = writeln!(err, "{msg}");
        }
    }
}
