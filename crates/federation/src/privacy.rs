//! Privacy of a federated run: plain sums (the reference), secure aggregation, or secure
//! aggregation with distributed differential privacy; and the secure round's parameters.

use fedlora_dp::{PrivacyConfig, PrivacyMode};
use fedlora_secagg::{derive, ParamRequest, RoundParams};

use crate::FederationError;

/// How clients' uploads are summed.
#[derive(Debug, Clone, PartialEq)]
pub enum Privacy {
    /// Plain sums in f64: the reference, no protection.
    None,
    /// SecAgg+ (real crypto, quantization, dropouts); no noise.
    SecAgg,
    /// SecAgg+ with distributed discrete Gaussian noise (protocol-spec §7); `mode` must be
    /// `distributed`, `clip_norm` set, and `rounds` the run's rounds.
    Dp(PrivacyConfig),
}

impl Privacy {
    /// `none`, `secagg` or `dp`.
    pub fn name(&self) -> &'static str {
        match self {
            Privacy::None => "none",
            Privacy::SecAgg => "secagg",
            Privacy::Dp(_) => "dp",
        }
    }

    /// Distributed DP for `rounds` rounds at `(epsilon, delta)` with L2 clip `clip_norm`: every
    /// client takes part in every round (sample rate 1).
    pub fn distributed(
        epsilon: f64,
        delta: f64,
        clip_norm: f64,
        rounds: u64,
    ) -> Result<Self, FederationError> {
        let cfg = PrivacyConfig {
            mode: PrivacyMode::Distributed,
            noise_multiplier: None,
            target_epsilon: Some(epsilon),
            rounds: Some(rounds),
            delta,
            clip_norm: Some(clip_norm),
            sample_rate: 1.0,
            budget_epsilon: None,
            max_wrap_probability: 1e-9,
        };
        cfg.resolve()
            .map_err(|e| FederationError::Privacy(e.to_string()))?;
        Ok(Privacy::Dp(cfg))
    }

    /// Whether uploads go through secure aggregation.
    pub fn is_secure(&self) -> bool {
        !matches!(self, Privacy::None)
    }
}

/// The SecAgg+ parameters of a round of `clients` clients: the derived degree and threshold
/// (protocol-spec §5), the per-value range `value_clip`, and the largest client weight.
pub fn round_params(
    clients: u32,
    expected_dropout: f64,
    value_clip: f32,
    weight_bound: u32,
) -> Result<RoundParams, FederationError> {
    let mut req = ParamRequest::new(clients);
    req.expected_dropout = expected_dropout.max(req.expected_dropout);
    req.clip = value_clip;
    req.weight_bound = weight_bound.max(1);
    Ok(derive(&req)?.params)
}
