//! Progress on long jobs: a bar on a terminal; under systemd, a container or a pipe (stderr is not
//! a terminal), a plain line at most every 30 seconds and at the end, so logs show the job moving.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A progress display over `total` units.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    last_line: Instant,
    quiet: bool,
}

/// How often a line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(30);

impl Progress {
    /// A display; `quiet` shows nothing (e.g. `--json` runs that are piped).
    pub fn new(label: &str, total: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(label.to_string());
            b
        });
        Progress {
            bar,
            label: label.to_string(),
            total,
            done: 0,
            last_line: Instant::now(),
            quiet,
        }
    }

    /// Sets the position and a short message.
    pub fn set(&mut self, done: u64, msg: &str) {
        self.done = done;
        match &self.bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(msg.to_string());
            }
            None if !self.quiet
                && (self.last_line.elapsed() >= LINE_EVERY || done == self.total) =>
            {
                eprintln!("{}: {done}/{} {msg}", self.label, self.total);
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    /// Prints a line above the bar (or as a log line).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
