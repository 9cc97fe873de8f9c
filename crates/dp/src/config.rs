//! The `[privacy]` section of the server and client configuration (protocol-spec §7.7).

use crate::accountant::{
    default_orders, noise_multiplier_for_epsilon, Accountant, AccountantError,
};
use crate::calibrate::PrivacyMode;
use serde::{Deserialize, Serialize};

/// Errors of the configuration module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A mode other than `none` needs exactly one of `noise_multiplier` and `target_epsilon`.
    #[error("privacy mode = \"{}\" needs exactly one of noise_multiplier and target_epsilon (with rounds)", mode_name(*.0))]
    NoiseSpec(PrivacyMode),
    /// `target_epsilon` needs `rounds` to know how many rounds the noise must cover.
    #[error("target_epsilon needs rounds")]
    MissingRounds,
    /// A mode other than `none` needs a positive, finite `clip_norm`.
    #[error("{}", clip_norm_message(*.0))]
    ClipNorm(Option<f64>),
    /// A probability-like field was out of range.
    #[error("{name} must be in {range}, got {value}")]
    OutOfRange {
        /// Field name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range.
        range: &'static str,
    },
    /// The accountant rejected a parameter.
    #[error(transparent)]
    Accountant(#[from] AccountantError),
}

/// The mode as written in the configuration.
fn mode_name(mode: PrivacyMode) -> &'static str {
    match mode {
        PrivacyMode::None => "none",
        PrivacyMode::Distributed => "distributed",
        PrivacyMode::Local => "local",
        PrivacyMode::Central => "central",
    }
}

fn clip_norm_message(clip: Option<f64>) -> String {
    match clip {
        None => "clip_norm is missing: set it to the L2 norm each client clips its update to (e.g. clip_norm = 1.0); noise is calibrated to it".into(),
        Some(c) => format!("clip_norm must be a finite number > 0, got {c}"),
    }
}

fn default_delta() -> f64 {
    1e-5
}

fn default_sample_rate() -> f64 {
    1.0
}

fn default_max_wrap() -> f64 {
    1e-9
}

/// The privacy section, shared by the server config (which runs the accountant and enforces the
/// budget) and the client config (which clips and adds its noise share).
///
/// Implements the configuration of protocol-spec §7.7.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// `none`, `distributed`, `local` or `central` (comparison only).
    pub mode: PrivacyMode,
    /// Noise multiplier z (aggregate noise std / L2 sensitivity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Alternatively, the epsilon to reach after `rounds` rounds; z is derived from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// Planned number of rounds (needed with `target_epsilon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u64>,
    /// delta of the (epsilon, delta) guarantee.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Per-client L2 clipping norm over the tensors that are sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Probability that a client takes part in a round (1 = no subsampling).
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// Cumulative epsilon budget: a round that would exceed it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_epsilon: Option<f64>,
    /// Largest acceptable probability that some coordinate of the noised sum wraps the ring.
    #[serde(default = "default_max_wrap")]
    pub max_wrap_probability: f64,
}

/// A validated privacy configuration with the noise multiplier resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ResolvedPrivacy {
    /// The mode.
    pub mode: PrivacyMode,
    /// The noise multiplier (0 for `none`).
    pub noise_multiplier: f64,
    /// The clipping norm (`None` only for mode `none` without one).
    pub clip_norm: Option<f64>,
    /// delta.
    pub delta: f64,
    /// Sample rate.
    pub sample_rate: f64,
    /// Budget, if any.
    pub budget_epsilon: Option<f64>,
    /// Wrap-probability limit.
    pub max_wrap_probability: f64,
}

impl PrivacyConfig {
    /// Validates every field (no NaN, infinities, negatives, or out-of-range values) and resolves
    /// the noise multiplier, inverting the accountant for `target_epsilon`.
    ///
    /// Implements protocol-spec §7.7.
    pub fn resolve(&self) -> Result<ResolvedPrivacy, ConfigError> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(ConfigError::OutOfRange {
                name: "delta",
                value: self.delta,
                range: "(0, 1)",
            });
        }
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(ConfigError::OutOfRange {
                name: "sample_rate",
                value: self.sample_rate,
                range: "[0, 1]",
            });
        }
        if !(0.0..=1.0).contains(&self.max_wrap_probability) {
            return Err(ConfigError::OutOfRange {
                name: "max_wrap_probability",
                value: self.max_wrap_probability,
                range: "[0, 1]",
            });
        }
        if let Some(b) = self.budget_epsilon {
            if !b.is_finite() || b <= 0.0 {
                return Err(AccountantError::InvalidEpsilon(b).into());
            }
        }
        let clip_ok = self.clip_norm.is_some_and(|c| c.is_finite() && c > 0.0);
        if self.clip_norm.is_some() && !clip_ok {
            return Err(ConfigError::ClipNorm(self.clip_norm));
        }
        let noise_multiplier = match self.mode {
            PrivacyMode::None => 0.0,
            mode => {
                if !clip_ok {
                    return Err(ConfigError::ClipNorm(self.clip_norm));
                }
                match (self.noise_multiplier, self.target_epsilon) {
                    (Some(z), None) => {
                        if !z.is_finite() || z <= 0.0 {
                            return Err(AccountantError::InvalidNoiseMultiplier(z).into());
                        }
                        z
                    }
                    (None, Some(eps)) => {
                        let rounds = self.rounds.ok_or(ConfigError::MissingRounds)?;
                        noise_multiplier_for_epsilon(
                            eps,
                            self.sample_rate,
                            rounds,
                            self.delta,
                            &default_orders(),
                        )?
                    }
                    _ => return Err(ConfigError::NoiseSpec(mode)),
                }
            }
        };
        Ok(ResolvedPrivacy {
            mode: self.mode,
            noise_multiplier,
            clip_norm: self.clip_norm,
            delta: self.delta,
            sample_rate: self.sample_rate,
            budget_epsilon: self.budget_epsilon,
            max_wrap_probability: self.max_wrap_probability,
        })
    }
}

impl ResolvedPrivacy {
    /// A fresh accountant with this configuration's delta and budget.
    pub fn accountant(&self) -> Result<Accountant, ConfigError> {
        Ok(Accountant::new(self.delta, self.budget_epsilon)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_and_resolves() {
        let c: PrivacyConfig = toml::from_str(
            "mode = \"distributed\"\nnoise_multiplier = 1.1\nclip_norm = 0.5\ndelta = 1e-6\nbudget_epsilon = 8.0\n",
        )
        .unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.mode, PrivacyMode::Distributed);
        assert_eq!(r.noise_multiplier, 1.1);
        assert_eq!(r.sample_rate, 1.0);
        assert_eq!(r.budget_epsilon, Some(8.0));
        assert_eq!(r.accountant().unwrap().delta(), 1e-6);
    }

    #[test]
    fn target_epsilon_resolves_to_noise() {
        let c: PrivacyConfig = serde_json::from_str(
            r#"{"mode":"local","target_epsilon":3.0,"rounds":50,"sample_rate":0.1,"clip_norm":1.0}"#,
        )
        .unwrap();
        let r = c.resolve().unwrap();
        let e = crate::accountant::epsilon_sampled_gaussian(
            r.noise_multiplier,
            0.1,
            50,
            1e-5,
            &default_orders(),
        )
        .unwrap();
        assert!(e.epsilon <= 3.0 && e.epsilon > 2.99);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<PrivacyConfig>(r#"{"mode":"none","noise":1}"#).is_err());
        assert!(serde_json::from_str::<PrivacyConfig>(r#"{"mode":"server"}"#).is_err());
        let base = PrivacyConfig {
            mode: PrivacyMode::Distributed,
            noise_multiplier: Some(1.0),
            target_epsilon: None,
            rounds: None,
            delta: 1e-5,
            clip_norm: Some(1.0),
            sample_rate: 1.0,
            budget_epsilon: None,
            max_wrap_probability: 1e-9,
        };
        assert!(base.resolve().is_ok());
        let cases: Vec<(PrivacyConfig, &str)> = vec![
            (
                PrivacyConfig {
                    delta: 0.0,
                    ..base.clone()
                },
                "delta",
            ),
            (
                PrivacyConfig {
                    delta: f64::NAN,
                    ..base.clone()
                },
                "delta nan",
            ),
            (
                PrivacyConfig {
                    sample_rate: 1.5,
                    ..base.clone()
                },
                "rate",
            ),
            (
                PrivacyConfig {
                    clip_norm: None,
                    ..base.clone()
                },
                "clip",
            ),
            (
                PrivacyConfig {
                    clip_norm: Some(-1.0),
                    ..base.clone()
                },
                "clip neg",
            ),
            (
                PrivacyConfig {
                    noise_multiplier: Some(f64::INFINITY),
                    ..base.clone()
                },
                "z inf",
            ),
            (
                PrivacyConfig {
                    target_epsilon: Some(1.0),
                    ..base.clone()
                },
                "both",
            ),
            (
                PrivacyConfig {
                    noise_multiplier: None,
                    ..base.clone()
                },
                "neither",
            ),
            (
                PrivacyConfig {
                    noise_multiplier: None,
                    target_epsilon: Some(1.0),
                    ..base.clone()
                },
                "no rounds",
            ),
            (
                PrivacyConfig {
                    budget_epsilon: Some(0.0),
                    ..base.clone()
                },
                "budget",
            ),
            (
                PrivacyConfig {
                    max_wrap_probability: 2.0,
                    ..base.clone()
                },
                "wrap",
            ),
        ];
        for (c, what) in cases {
            assert!(c.resolve().is_err(), "{what}");
        }
        let none: PrivacyConfig = serde_json::from_str(r#"{"mode":"none"}"#).unwrap();
        assert_eq!(none.resolve().unwrap().noise_multiplier, 0.0);
    }
}
