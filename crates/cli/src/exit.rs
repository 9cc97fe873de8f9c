//! The exit status of every subcommand, and the `outcome` its JSON report carries (README, "Exit
//! codes"). Scripts and supervisors (`Restart=on-failure`) rely on these:
//!
//! | code | outcome | meaning |
//! |---|---|---|
//! | 0 | `ok` | the job did everything it was asked (every round finished) |
//! | 1 | `failed` | the job ran and failed (a connection refused, training diverged, a mismatch) |
//! | 2 | `refused` | refused before starting: invalid flags, configuration or paths; nothing was written |
//! | 3 | `rounds_aborted` | the job ran to its end, but some rounds aborted or were cut short |
//! | 130, 143 | `interrupted` | stopped by SIGINT or SIGTERM, after recording and reporting the stop |

use std::fmt;

/// Everything the job asked for was done.
pub const OK: u8 = 0;
/// The job ran and failed.
pub const FAILED: u8 = 1;
/// Refused before any side effect (flags, configuration, paths).
pub const REFUSED: u8 = 2;
/// The job ran to its end but not every round finished.
pub const ROUNDS_ABORTED: u8 = 3;

/// The `outcome` word for an exit code.
pub fn outcome(code: u8) -> &'static str {
    match code {
        OK => "ok",
        FAILED => "failed",
        REFUSED => "refused",
        ROUNDS_ABORTED => "rounds_aborted",
        _ => "interrupted",
    }
}

/// A refusal before any side effect: exit code 2. Wraps the reason; prints as it.
#[derive(Debug)]
pub struct Refused(pub anyhow::Error);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain_text(&self.0))
    }
}

impl std::error::Error for Refused {}

/// Marks `e` as a refusal (exit code 2).
pub fn refused(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Refused(e.into()))
}

/// A refusal with a message.
pub fn refuse(msg: impl Into<String>) -> anyhow::Error {
    refused(anyhow::anyhow!(msg.into()))
}

/// An outcome already reported (the JSON report printed, with its `outcome` and `exit_code`):
/// only the exit status and a one-line summary on stderr remain.
#[derive(Debug)]
pub struct Reported {
    /// The exit status.
    pub code: u8,
    /// The one-line summary.
    pub message: String,
}

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Reported {}

/// Ends a subcommand with `code` after its report was printed (`Ok(())` for code 0).
pub fn reported(code: u8, message: impl Into<String>) -> anyhow::Result<()> {
    if code == OK {
        return Ok(());
    }
    Err(anyhow::Error::new(Reported {
        code,
        message: message.into(),
    }))
}

/// The exit code an error stands for.
pub fn code_of(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(r) = cause.downcast_ref::<Reported>() {
            return r.code;
        }
        if cause.downcast_ref::<Refused>().is_some() {
            return REFUSED;
        }
    }
    FAILED
}

/// An error and its causes on one line, each cause once: wrapped errors that already quote their
/// source (`"privacy: {0}"` over the same error) are not repeated.
pub fn chain_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let c = cause.to_string();
        let c = c.trim();
        if c.is_empty() || text.contains(c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(c);
    }
    text
}

/// Adds `outcome` and `exit_code` to a JSON report (an object).
pub fn stamp(mut value: serde_json::Value, code: u8) -> serde_json::Value {
    if let Some(map) = value.as_object_mut() {
        map.insert("outcome".into(), outcome(code).into());
        map.insert("exit_code".into(), code.into());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    mod thiserror_like {
        // A stand-in for a thiserror enum whose message quotes its source.
        #[derive(Debug)]
        pub struct Outer(pub std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "privacy: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
    }

    #[test]
    fn each_cause_once_and_codes_by_kind() {
        let inner = std::io::Error::other("clip_norm is missing");
        let e = anyhow::Error::new(thiserror_like::Outer(inner)).context("server.toml");
        assert_eq!(chain_text(&e), "server.toml: privacy: clip_norm is missing");
        assert_eq!(code_of(&e), FAILED);
        let r = refused(e);
        assert_eq!(code_of(&r), REFUSED);
        assert_eq!(r.to_string(), "server.toml: privacy: clip_norm is missing");
        let rep = reported(ROUNDS_ABORTED, "1 of 2 rounds aborted").expect_err("code 3");
        assert_eq!(code_of(&rep), ROUNDS_ABORTED);
        assert!(reported(OK, "").is_ok());
        let v = stamp(serde_json::json!({"rounds": []}), 143);
        assert_eq!(v["outcome"], "interrupted");
        assert_eq!(v["exit_code"], 143);
    }
}
