//! Flag checks shared by every subcommand, with the wording and the ranges of the configuration
//! files (`fedlora_service::ranges`): `--rank 0` is refused by `train`, `federate` and `demo` alike,
//! and `train.rank = 0` in a client's `[train]` section with the same words. Each refusal is an
//! exit-code-2 error (nothing written).

use std::path::Path;

use fedlora_service::ranges as r;

use crate::exit;

fn check(res: Result<(), String>) -> anyhow::Result<()> {
    res.map_err(exit::refuse)
}

/// `--threads`, when given.
pub fn threads(v: Option<usize>) -> anyhow::Result<()> {
    match v {
        Some(n) => check(r::threads("--threads", n)),
        None => Ok(()),
    }
}

/// A LoRA rank.
pub fn rank(flag: &str, v: usize) -> anyhow::Result<()> {
    check(r::rank(flag, v))
}

/// A peak learning rate.
pub fn lr(flag: &str, v: f64) -> anyhow::Result<()> {
    check(r::lr(flag, v))
}

/// A batch size.
pub fn batch(flag: &str, v: usize) -> anyhow::Result<()> {
    check(r::batch(flag, v))
}

/// Local epochs.
pub fn epochs(flag: &str, v: f64) -> anyhow::Result<()> {
    check(r::epochs(flag, v))
}

/// A number of rounds.
pub fn rounds(flag: &str, v: u64) -> anyhow::Result<()> {
    check(r::rounds(flag, v))
}

/// `--max-len`, when given.
pub fn max_len(v: Option<usize>) -> anyhow::Result<()> {
    match v {
        Some(n) => check(r::max_len("--max-len", n)),
        None => Ok(()),
    }
}

/// A deadline in milliseconds.
pub fn timeout_ms(flag: &str, v: u64) -> anyhow::Result<()> {
    check(r::timeout_ms(flag, v))
}

/// An integer in `min..=max`.
pub fn int(flag: &str, v: u64, min: u64, max: u64) -> anyhow::Result<()> {
    check(r::int(flag, v, min, max))
}

/// A probability in `[0, 1)`.
pub fn fraction(flag: &str, v: f64) -> anyhow::Result<()> {
    check(r::fraction(flag, v))
}

/// A directory the command will write (created if missing): checked now, written later.
pub fn out_dir(flag: &str, path: &Path) -> anyhow::Result<()> {
    fedlora_service::paths::check_writable_dir(path)
        .map_err(|e| exit::refuse(format!("{flag} {e}")))
}

/// A file the command will write: checked now, written later.
pub fn out_file(flag: &str, path: &Path) -> anyhow::Result<()> {
    fedlora_service::paths::check_writable_file(path)
        .map_err(|e| exit::refuse(format!("{flag} {e}")))
}
