//! Helpers shared by the unit tests of the overlay loop and the shared modules: a scratch
//! directory that is removed when the test ends, pass or fail, and a check on rendered metrics.

use std::path::{Path, PathBuf};

/// A scratch directory `twill-<name>-<pid>` under the system temp dir, empty when made and
/// removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// Makes the directory (a leftover of an earlier run is removed first).
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("twill-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `file` in the directory and returns the file's path.
    pub(crate) fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts that the rendered metrics `text` has each of `samples` as a whole line, naming the
/// first one missing.
#[track_caller]
pub(crate) fn assert_samples(text: &str, samples: &[&str]) {
    for sample in samples {
        assert!(
            text.lines().any(|line| line == *sample),
            "no sample {sample:?} in:\n{text}"
        );
    }
}
