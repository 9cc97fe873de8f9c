//! What a round did, as the CSV/JSONL records and the final report carry it.

use serde::{Deserialize, Serialize};

/// One finished (or aborted) round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Rule name.
    pub rule: String,
    /// Clients invited.
    pub clients: usize,
    /// Round number, 1-based.
    pub round: u64,
    /// `finished` or `aborted`.
    pub status: String,
    /// Why the round aborted.
    pub abort_reason: Option<String>,
    /// `none`, `secagg` or `dp`.
    pub privacy: String,
    /// `accuracy` or `exact_match`.
    pub metric_name: String,
    /// Held-out metric of the global model after the round (per-client models for `share-a`).
    pub metric: f64,
    /// Held-out loss.
    pub loss: f64,
    /// Held-out examples scored.
    pub eval_examples: usize,
    /// Mean final training loss of the clients that trained.
    pub train_loss: f64,
    /// Cumulative epsilon spent after this round (`dp` only).
    pub epsilon: Option<f64>,
    /// This round's epsilon (`dp` only).
    pub round_epsilon: Option<f64>,
    /// Bytes each client sent, on average over those that took part (the protocol's messages for
    /// `secagg`/`dp`; the raw f32 values and weight for `none`).
    pub upload_bytes_per_client: u64,
    /// Raw f32 size of what the rule sends (values x 4 bytes).
    pub raw_upload_bytes: u64,
    /// Values in the rule's upload.
    pub upload_values: usize,
    /// Clients whose input reached the sum.
    pub survivors: usize,
    /// Clients that dropped out.
    pub dropped: usize,
    /// Upload values the quantizer clipped (a sign that `value_clip` is too small).
    pub clipped_values: usize,
    /// Worst-case quantization error of the revealed mean (0 for plain sums).
    pub quantization_bound: f64,
    /// Local training wall time, summed over clients, seconds.
    pub train_seconds: f64,
    /// Secure aggregation wall time (protocol work of every client and the server), seconds.
    pub aggregate_seconds: f64,
    /// Evaluation wall time, seconds.
    pub eval_seconds: f64,
    /// SHA-256 of the global state after the round (hex).
    pub global_sha256: String,
}

impl RoundRecord {
    /// The CSV header (the order of [`RoundRecord::csv_row`]).
    pub const CSV_HEADER: &'static str = "rule,clients,round,status,privacy,metric_name,metric,loss,eval_examples,train_loss,epsilon,round_epsilon,upload_bytes_per_client,raw_upload_bytes,upload_values,survivors,dropped,clipped_values,quantization_bound,train_seconds,aggregate_seconds,eval_seconds,global_sha256";

    /// One CSV row (no field contains a comma).
    pub fn csv_row(&self) -> String {
        let opt = |x: Option<f64>| x.map(|v| format!("{v}")).unwrap_or_default();
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{}",
            self.rule,
            self.clients,
            self.round,
            self.status,
            self.privacy,
            self.metric_name,
            self.metric,
            self.loss,
            self.eval_examples,
            self.train_loss,
            opt(self.epsilon),
            opt(self.round_epsilon),
            self.upload_bytes_per_client,
            self.raw_upload_bytes,
            self.upload_values,
            self.survivors,
            self.dropped,
            self.clipped_values,
            self.quantization_bound,
            self.train_seconds,
            self.aggregate_seconds,
            self.eval_seconds,
            self.global_sha256
        )
    }
}
