//! The two halves of a round, written once and used by both drivers (the in-process simulator and
//! the networked service): the client's step and the server's step.

use fedlora_aggregate::{
    AggregationRule, ClientProfile, GlobalState, NamedTensors, RuleKind, Upload,
};

use crate::trainer::{LocalTrainer, TrainedAdapter};
use crate::FederationError;

/// What a client's step produced.
#[derive(Debug)]
pub struct Contribution {
    /// The values to be summed (already clipped for differential privacy when asked).
    pub upload: Upload,
    /// What the client keeps for its next round (`share-a`).
    pub keep: Option<NamedTensors>,
    /// The local training's figures.
    pub trained: TrainedStats,
    /// Values outside the quantizer's `[-value_clip, value_clip]` (they will be clipped).
    pub clipped_values: usize,
}

/// Training figures of one client step.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainedStats {
    /// Final training loss.
    pub final_loss: f64,
    /// Seconds.
    pub seconds: f64,
    /// Positions processed.
    pub tokens: usize,
}

/// How a client prepares its upload for the secure sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadPolicy {
    /// L2 clipping of the update (distributed DP, protocol-spec §7.1); `None` for no clipping.
    pub l2_clip: Option<f64>,
    /// The round's per-value quantization range, to count what it will clip.
    pub value_clip: f32,
}

/// Implements the client's step: start from the global state (and what it kept), train locally,
/// encode the update with the rule, clip it for DP.
pub fn client_step(
    rule: RuleKind,
    global: &GlobalState,
    trainer: &mut dyn LocalTrainer,
    client: usize,
    profile: &ClientProfile,
    local: Option<&NamedTensors>,
    policy: UploadPolicy,
) -> Result<Contribution, FederationError> {
    let r: &dyn AggregationRule = rule.rule();
    let start = r.start(global, profile, local)?;
    let TrainedAdapter {
        tensors,
        final_loss,
        seconds,
        tokens,
    } = trainer
        .train(client, global.round, &start)
        .map_err(|e| FederationError::Training { client, source: e })?;
    let mut upload = r.encode(global, &start, &tensors, profile)?;
    if let Some(c) = policy.l2_clip {
        fedlora_dp::clip_l2(upload.private_values_mut(), c)
            .map_err(|e| FederationError::Privacy(e.to_string()))?;
    }
    let clipped_values = upload
        .values
        .iter()
        .filter(|v| v.abs() > policy.value_clip)
        .count();
    Ok(Contribution {
        upload,
        keep: r.keep_local(&tensors),
        trained: TrainedStats {
            final_loss,
            seconds,
            tokens,
        },
        clipped_values,
    })
}

/// Implements the server's step: the next global state from the revealed weighted mean.
pub fn server_step(
    rule: RuleKind,
    global: &GlobalState,
    mean: &[f32],
) -> Result<GlobalState, FederationError> {
    if global.rule != rule {
        return Err(FederationError::Config(format!(
            "the global state was made by rule {}, this round runs {rule}",
            global.rule
        )));
    }
    Ok(rule.rule().decode(global, mean)?)
}
