//! How every subcommand reports: a human summary on stderr/stdout, and with `--json` one JSON object
//! as the last line of stdout. Failures exit non-zero; with `--json` they still print one object.

use std::process::ExitCode;

/// Prints a report: pretty text for people, or one line of JSON.
pub fn emit<T: serde::Serialize>(
    json: bool,
    human: impl FnOnce() -> String,
    value: &T,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{}", human());
    }
    Ok(())
}

/// An error that already printed its own JSON object (e.g. `{"aborted": ...}`) and only needs a
/// non-zero exit status.
#[derive(Debug)]
pub struct Reported(pub String);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reported {}

/// Turns a subcommand's result into the process exit status.
pub fn finish(result: anyhow::Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err.downcast_ref::<Reported>().is_some() {
                eprintln!("error: {err}");
            } else {
                eprintln!("error: {err:#}");
                if json {
                    println!("{}", serde_json::json!({ "error": format!("{err:#}") }));
                }
            }
            ExitCode::FAILURE
        }
    }
}
