//! A client's contribution checked against the round's limits just before it is masked. The
//! quantizer clips every value into `[-clip, clip]` and refuses a weight above `weight_bound`;
//! neither may change a real adapter silently. Values beyond the clip are counted and reported
//! loudly (a trained LoRA factor reaches ~1.6, so `clip = 1.0` moves the aggregate); a weight above
//! the bound is capped at it, with a warning, instead of failing the round; a non-finite value is
//! an error (it would poison the sum).

use fedlora_secagg::ClientInput;
use tracing::warn;

/// What the check found.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RangeReport {
    /// Values beyond `±clip` (the quantizer clips them).
    pub clipped: u64,
    /// The largest |value|.
    pub largest: f32,
    /// The configured weight, when it was capped at the bound.
    pub capped_weight: Option<u32>,
}

/// Checks `input` against the round's `clip` and `weight_bound`: counts and reports clipped values,
/// caps the weight, refuses non-finite values. `round` and `what` name the round and the input in
/// the messages.
pub fn check(
    input: &mut ClientInput,
    clip: f32,
    weight_bound: u32,
    round: u64,
    what: &str,
) -> Result<RangeReport, String> {
    let mut report = RangeReport::default();
    for (i, v) in input.values.iter().enumerate() {
        if !v.is_finite() {
            return Err(format!(
                "{what}: value {i} is {v}; a contribution must be finite (lower the learning rate, or check the input file)"
            ));
        }
        let a = v.abs();
        report.largest = report.largest.max(a);
        if a > clip {
            report.clipped += 1;
        }
    }
    if report.clipped > 0 {
        warn!(
            round,
            clipped = report.clipped,
            of = input.values.len(),
            largest = report.largest,
            clip,
            "{what}: {} of {} values exceed the round's per-value clip ±{clip} (largest |value| {:.4}) and are clipped before masking, which changes the aggregate; ask the server's operator to raise protocol.clip (or federation.value_clip)",
            report.clipped,
            input.values.len(),
            report.largest
        );
    }
    if input.weight > weight_bound {
        warn!(
            round,
            weight = input.weight,
            weight_bound,
            "{what}: weight {} is above the round's weight_bound {weight_bound}: capped at {weight_bound} (ask the server's operator to raise protocol.weight_bound to weigh this client fully)",
            input.weight
        );
        report.capped_weight = Some(input.weight);
        input.weight = weight_bound;
    }
    if input.weight == 0 {
        input.weight = 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_values_are_counted_weights_capped_and_nan_refused() {
        let mut input = ClientInput {
            values: vec![0.5, -1.6, 1.2, 0.0],
            weight: 7,
        };
        let r = check(&mut input, 1.0, 5, 0, "test").expect("finite");
        assert_eq!(r.clipped, 2);
        assert!((r.largest - 1.6).abs() < 1e-6);
        assert_eq!(r.capped_weight, Some(7));
        assert_eq!(input.weight, 5);
        assert_eq!(
            input.values,
            vec![0.5, -1.6, 1.2, 0.0],
            "values are untouched"
        );
        let mut bad = ClientInput {
            values: vec![0.0, f32::NAN],
            weight: 1,
        };
        let e = check(&mut bad, 1.0, 1, 0, "test").expect_err("nan");
        assert!(e.contains("value 1 is NaN"), "{e}");
    }
}
