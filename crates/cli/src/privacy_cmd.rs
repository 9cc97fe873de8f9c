//! `fedlora privacy`: the privacy accountant on the command line (protocol-spec §7.5).
//!
//! Given a noise multiplier, prints epsilon after R rounds of the (subsampled) Gaussian mechanism
//! at the given delta; given `--target-epsilon`, prints the smallest noise multiplier that stays
//! within it. With `--json`: `{"epsilon": .., "order": ..}` or `{"noise_multiplier": ..}` (plus the
//! inputs for context).

use anyhow::Context;
use clap::{ArgGroup, Args};
use fedlora_dp::{default_orders, epsilon_sampled_gaussian, noise_multiplier_for_epsilon};
use serde::Serialize;

use crate::output;

/// Arguments of `fedlora privacy`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("noise").required(true).args(["noise_multiplier", "target_epsilon"])))]
pub struct PrivacyArgs {
    /// Noise multiplier z: noise standard deviation over the L2 clipping norm.
    #[arg(long)]
    noise_multiplier: Option<f64>,
    /// Instead of a noise multiplier: the epsilon to reach after `--rounds`; prints the noise
    /// multiplier needed.
    #[arg(long)]
    target_epsilon: Option<f64>,
    /// Number of rounds composed.
    #[arg(long)]
    rounds: u64,
    /// Probability that a client takes part in a round (1 = no subsampling).
    #[arg(long, default_value_t = 1.0)]
    sample_rate: f64,
    /// delta of the (epsilon, delta) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
}

#[derive(Debug, Serialize)]
struct EpsilonReport {
    epsilon: f64,
    order: f64,
    noise_multiplier: f64,
    rounds: u64,
    sample_rate: f64,
    delta: f64,
}

#[derive(Debug, Serialize)]
struct NoiseReport {
    noise_multiplier: f64,
    target_epsilon: f64,
    epsilon: f64,
    order: f64,
    rounds: u64,
    sample_rate: f64,
    delta: f64,
}

/// Runs `fedlora privacy`.
pub fn run(args: PrivacyArgs, json: bool) -> anyhow::Result<()> {
    let (human, value) = report(args)?;
    output::emit(json, || human, &value)
}

/// Computes the report: the human line and the JSON object.
fn report(args: PrivacyArgs) -> anyhow::Result<(String, serde_json::Value)> {
    let orders = default_orders();
    let PrivacyArgs {
        noise_multiplier,
        target_epsilon,
        rounds,
        sample_rate,
        delta,
    } = args;
    match (noise_multiplier, target_epsilon) {
        (Some(z), None) => {
            let e = epsilon_sampled_gaussian(z, sample_rate, rounds, delta, &orders)
                .context("privacy accounting")?;
            let human = format!(
                "epsilon = {:.6} at delta = {delta:e} after {rounds} rounds \
                 (noise multiplier {z}, sample rate {sample_rate}; RDP order {})",
                e.epsilon, e.order
            );
            let r = EpsilonReport {
                epsilon: e.epsilon,
                order: e.order,
                noise_multiplier: z,
                rounds,
                sample_rate,
                delta,
            };
            Ok((human, serde_json::to_value(r)?))
        }
        (None, Some(target)) => {
            let z = noise_multiplier_for_epsilon(target, sample_rate, rounds, delta, &orders)
                .context("privacy accounting")?;
            let e = epsilon_sampled_gaussian(z, sample_rate, rounds, delta, &orders)
                .context("privacy accounting")?;
            let human = format!(
                "noise multiplier = {z:.6} reaches epsilon = {:.6} <= {target} at delta = {delta:e} \
                 after {rounds} rounds (sample rate {sample_rate}; RDP order {})",
                e.epsilon, e.order
            );
            let r = NoiseReport {
                noise_multiplier: z,
                target_epsilon: target,
                epsilon: e.epsilon,
                order: e.order,
                rounds,
                sample_rate,
                delta,
            };
            Ok((human, serde_json::to_value(r)?))
        }
        _ => anyhow::bail!("give exactly one of --noise-multiplier and --target-epsilon"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: PrivacyArgs,
    }

    fn run_args(line: &[&str]) -> anyhow::Result<serde_json::Value> {
        let t = T::try_parse_from(std::iter::once("privacy").chain(line.iter().copied()))?;
        Ok(report(t.args)?.1)
    }

    #[test]
    fn epsilon_for_noise_multiplier() {
        let v = run_args(&[
            "--noise-multiplier",
            "1.1",
            "--rounds",
            "100",
            "--sample-rate",
            "0.01",
            "--delta",
            "1e-5",
        ])
        .unwrap();
        // Same value as Google's dp_accounting RdpAccountant with our orders
        // (protocol-spec/test-vectors/dp_accountant.json).
        assert!(
            (v["epsilon"].as_f64().unwrap() - 0.981_001_864_095_559).abs() < 1e-9,
            "{v}"
        );
        assert_eq!(v["order"].as_f64(), Some(11.0));
    }

    #[test]
    fn defaults_and_inverse() {
        // Sample rate defaults to 1 (no subsampling), delta to 1e-5.
        let v = run_args(&["--noise-multiplier", "1.0", "--rounds", "1"]).unwrap();
        assert!(
            (v["epsilon"].as_f64().unwrap() - 4.752_728_336_819_822).abs() < 1e-9,
            "{v}"
        );
        let v = run_args(&[
            "--target-epsilon",
            "2.0",
            "--rounds",
            "50",
            "--sample-rate",
            "0.1",
        ])
        .unwrap();
        let z = v["noise_multiplier"].as_f64().unwrap();
        let e = epsilon_sampled_gaussian(z, 0.1, 50, 1e-5, &default_orders())
            .unwrap()
            .epsilon;
        assert!(e <= 2.0 && e > 1.999, "{z} -> {e}");
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(run_args(&["--rounds", "10"]).is_err());
        assert!(run_args(&[
            "--noise-multiplier",
            "1",
            "--target-epsilon",
            "1",
            "--rounds",
            "10"
        ])
        .is_err());
        assert!(run_args(&["--noise-multiplier=-1", "--rounds", "10"]).is_err());
        assert!(run_args(&["--noise-multiplier", "NaN", "--rounds", "10"]).is_err());
        assert!(run_args(&["--noise-multiplier", "1", "--rounds", "10", "--delta", "0"]).is_err());
        assert!(run_args(&["--noise-multiplier", "1", "--rounds", "0"]).is_err());
    }
}
