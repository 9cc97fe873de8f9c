//! The ranges of settings that appear both in configuration files and as command-line flags
//! (`[train] rank` and `fedlora train --rank`, timeouts, thread counts, ...), checked by one set of
//! functions so that a value is refused the same way, with the same words, wherever it is given:
//! `<name> must be in <range>, got <value>`.

/// Largest LoRA rank accepted anywhere (a rank is also refused above its layer's width, once the
/// model is known).
pub const RANK_MAX: u64 = 4096;
/// Largest batch (examples per step).
pub const BATCH_MAX: u64 = 4096;
/// Largest thread count.
pub const THREADS_MAX: u64 = 1024;
/// Largest token limit per example.
pub const MAX_LEN_MAX: u64 = 32_768;
/// Largest peak learning rate: AdamW steps above 1 diverge on every model here.
pub const LR_MAX: f64 = 1.0;
/// Largest number of local epochs per round.
pub const EPOCHS_MAX: f64 = 1000.0;
/// Longest deadline in milliseconds (7 days).
pub const TIMEOUT_MS_MAX: u64 = 7 * 24 * 3_600_000;
/// Most rounds of one run.
pub const ROUNDS_MAX: u64 = 1_000_000;

/// An integer in `min..=max`.
pub fn int(name: &str, value: u64, min: u64, max: u64) -> Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!("{name} must be in {min}..={max}, got {value}"))
    }
}

/// A finite number in `(0, max]`.
pub fn positive(name: &str, value: f64, max: f64) -> Result<(), String> {
    if value.is_finite() && value > 0.0 && value <= max {
        Ok(())
    } else {
        Err(format!(
            "{name} must be in (0, {}], got {}",
            show(max),
            show(value)
        ))
    }
}

/// A number as a person reads it: `0.002`, `1e30`, `NaN`.
pub fn show(v: f64) -> String {
    if v.is_finite() && v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// A probability in `[0, 1)`.
pub fn fraction(name: &str, value: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{name} must be in [0, 1), got {}", show(value)))
    }
}

/// A deadline in milliseconds: `1..=TIMEOUT_MS_MAX`.
pub fn timeout_ms(name: &str, value: u64) -> Result<(), String> {
    int(name, value, 1, TIMEOUT_MS_MAX)
}

/// A thread count: `1..=THREADS_MAX`.
pub fn threads(name: &str, value: usize) -> Result<(), String> {
    int(name, value as u64, 1, THREADS_MAX)
}

/// A LoRA rank: `1..=RANK_MAX`.
pub fn rank(name: &str, value: usize) -> Result<(), String> {
    int(name, value as u64, 1, RANK_MAX)
}

/// A batch size: `1..=BATCH_MAX`.
pub fn batch(name: &str, value: usize) -> Result<(), String> {
    int(name, value as u64, 1, BATCH_MAX)
}

/// A peak learning rate: `(0, LR_MAX]`.
pub fn lr(name: &str, value: f64) -> Result<(), String> {
    positive(name, value, LR_MAX)
}

/// Local epochs per round: `(0, EPOCHS_MAX]`.
pub fn epochs(name: &str, value: f64) -> Result<(), String> {
    positive(name, value, EPOCHS_MAX)
}

/// A token limit per example: `1..=MAX_LEN_MAX`.
pub fn max_len(name: &str, value: usize) -> Result<(), String> {
    int(name, value as u64, 1, MAX_LEN_MAX)
}

/// A run's number of rounds: `1..=ROUNDS_MAX`.
pub fn rounds(name: &str, value: u64) -> Result<(), String> {
    int(name, value, 1, ROUNDS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wording_for_every_refusal() {
        assert_eq!(
            rank("--rank", 0).expect_err("zero"),
            "--rank must be in 1..=4096, got 0"
        );
        assert_eq!(
            rank("train.rank", 5000).expect_err("big"),
            "train.rank must be in 1..=4096, got 5000"
        );
        assert!(rank("r", 8).is_ok());
        assert_eq!(
            lr("--lr", 1e30).expect_err("lr"),
            "--lr must be in (0, 1], got 1e30"
        );
        assert!(lr("--lr", f64::NAN).is_err());
        assert!(lr("--lr", 0.0).is_err());
        assert!(lr("--lr", 1e-3).is_ok());
        assert!(fraction("--dropout", 1.0).is_err());
        assert!(fraction("--dropout", 0.0).is_ok());
        assert!(timeout_ms("rounds.stage_timeout_ms", 0).is_err());
        assert!(threads("--threads", 0).is_err());
        assert!(threads("--threads", 2).is_ok());
    }
}
