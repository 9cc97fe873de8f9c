//! How every subcommand reports: a human summary on stdout, and with `--json` one JSON object as
//! the last line of stdout. Failures exit non-zero with the codes of [`crate::exit`]; with `--json`
//! they still print one object (`{"error", "outcome", "exit_code"}`).

use std::process::ExitCode;

use crate::exit;

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

/// [`emit`] for a job with an outcome: the JSON report carries `outcome` and `exit_code`, and the
/// result ends the process with that code (`message` is the one-line summary on stderr).
pub fn emit_outcome<T: serde::Serialize>(
    json: bool,
    human: impl FnOnce() -> String,
    value: &T,
    code: u8,
    message: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let value = exit::stamp(serde_json::to_value(value)?, code);
    emit(json, human, &value)?;
    exit::reported(
        code,
        if code == exit::OK {
            String::new()
        } else {
            message()
        },
    )
}

/// Turns a subcommand's result into the process exit status.
pub fn finish(result: anyhow::Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit::code_of(&err);
            let text = exit::chain_text(&err);
            if err.downcast_ref::<exit::Reported>().is_some() {
                eprintln!("{text}");
            } else {
                eprintln!("error: {text}");
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "error": text,
                            "outcome": exit::outcome(code),
                            "exit_code": code,
                        })
                    );
                }
            }
            ExitCode::from(code)
        }
    }
}
