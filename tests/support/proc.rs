//! A `fedlora` child process for the end-to-end tests: killed when dropped, stderr collected.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_fedlora");
/// How long any one wait may take (training tests raise it with `E2E_LIMIT_S`).
pub fn limit() -> Duration {
    Duration::from_secs(
        std::env::var("E2E_LIMIT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}

/// A child process killed when dropped, with its stderr collected line by line.
pub struct Proc {
    pub child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let log = std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into());
        Proc::spawn_logging(args, Some(&log))
    }

    /// Like `spawn`, with `RUST_LOG` as given (`None`: unset, the binary's own quiet default).
    pub fn spawn_logging(args: &[&str], rust_log: Option<&str>) -> Proc {
        let mut cmd = Command::new(BIN);
        match rust_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fedlora");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().expect("lock").push(line);
            }
        });
        Proc { child, stderr }
    }

    /// Waits until a stderr line contains all of `needles`; returns that line.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .stderr
                .lock()
                .expect("lock")
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < limit(),
                "timed out waiting for {needles:?}; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().expect("lock").join("\n")
    }

    /// Waits for exit (bounded); returns the exit code and the last stdout line parsed as JSON.
    pub fn finish(mut self) -> (i32, Value) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                start.elapsed() < limit(),
                "process did not exit; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read stdout");
        let last = out.lines().last().unwrap_or("null").to_string();
        let json = serde_json::from_str(&last)
            .unwrap_or_else(|e| panic!("bad JSON {last:?}: {e}\n{}", self.log()));
        (status.code().unwrap_or(-1), json)
    }

    /// Waits for exit (bounded); returns the exit code and all of stdout.
    pub fn finish_text(mut self) -> (i32, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                start.elapsed() < limit(),
                "process did not exit; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read stdout");
        (status.code().unwrap_or(-1), out)
    }

    /// Sends a signal (`TERM`, `INT`) to the process.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {name} failed");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}
