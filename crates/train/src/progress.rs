//! Progress on standard error when it is not a terminal (systemd, a container, a pipe): indicatif
//! hides its bar there, so a 45-minute training job would print nothing until the end. This draw
//! target turns the bar into a plain line at most every 30 seconds (`fedlora train: [==>  ] 40/100
//! 00:01:23 eta 00:02:00`), which logs keep.

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressDrawTarget, TermLike};

/// How often a line is printed.
pub const LINE_EVERY: Duration = Duration::from_secs(30);

/// The draw target for a bar on stderr: the terminal when there is one, else [`LineTerm`].
pub fn stderr_target() -> ProgressDrawTarget {
    if io::IsTerminal::is_terminal(&io::stderr()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::term_like_with_hz(Box::new(LineTerm::default()), 1)
    }
}

/// A "terminal" that prints the bar's current line to stderr at most every [`LINE_EVERY`].
#[derive(Debug, Default)]
pub struct LineTerm {
    state: Mutex<LineState>,
}

#[derive(Debug, Default)]
struct LineState {
    line: String,
    last: Option<Instant>,
}

impl TermLike for LineTerm {
    fn width(&self) -> u16 {
        100
    }

    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write_str(s)
    }

    fn write_str(&self, s: &str) -> io::Result<()> {
        if let Ok(mut st) = self.state.lock() {
            st.line.push_str(s);
        }
        Ok(())
    }

    fn clear_line(&self) -> io::Result<()> {
        if let Ok(mut st) = self.state.lock() {
            st.line.clear();
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let Ok(mut st) = self.state.lock() else {
            return Ok(());
        };
        let due = st.last.is_none_or(|t| t.elapsed() >= LINE_EVERY);
        let line = std::mem::take(&mut st.line);
        let line = line.trim();
        if due && !line.is_empty() {
            st.last = Some(Instant::now());
            let mut err = io::stderr().lock();
            writeln!(err, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_rate_limited() {
        let t = LineTerm::default();
        t.write_str("step 1/10").expect("write");
        t.flush().expect("flush");
        let first = t.state.lock().expect("lock").last;
        assert!(first.is_some(), "the first line prints at once");
        t.write_str("step 2/10").expect("write");
        t.flush().expect("flush");
        assert_eq!(t.state.lock().expect("lock").last, first, "the next waits");
    }
}
