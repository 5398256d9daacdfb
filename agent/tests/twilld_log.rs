//! twilld's log output when it goes to a file or a pipe (as under the rig, a service manager or
//! `twilld 2>twilld.log`): plain text, no ANSI colour codes for the tools and people reading it.
//!
//! twilld runs in a network namespace of its own (`unshare --net`, gone with the process) where
//! no etcd answers: it logs its retries and does nothing else until it is killed.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kills the child it holds when dropped, pass or fail.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn log_without_a_terminal_has_no_colour_codes() {
    if !common::require_root("log_without_a_terminal_has_no_colour_codes") {
        return;
    }
    let mut child = Command::new("unshare")
        .args([
            "--net",
            "--",
            env!("CARGO_BIN_EXE_twilld"),
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--subnet-file",
            "/nonexistent/twill-log-test/subnet.env",
        ])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare twilld");
    let stderr = child.stderr.take().unwrap();
    let _child = Killed(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Until twilld has said it retries the etcd connection (INFO and WARN lines by then).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(line)) => {
                let done = line.contains("retrying");
                lines.push(line);
                if done {
                    break;
                }
            }
            Ok(Err(e)) => panic!("read twilld's stderr: {e}"),
            Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {
                panic!(
                    "twilld logged no retry (within 30 s, or it exited):\n{}",
                    lines.join("\n")
                )
            }
        }
    }
    let log = lines.join("\n");
    assert!(log.contains("WARN"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log that is not a terminal:\n{log:?}"
    );
}
