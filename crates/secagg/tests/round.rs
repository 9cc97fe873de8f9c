//! Whole rounds through the in-memory harness: exact aggregation, every dropout stage, aborts.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fedlora_secagg::harness::Outcome;
use fedlora_secagg::{derive, AbortReason, ParamRequest, RoundParams, Stage};
use proptest::prelude::*;

fn small_params(n: u32) -> RoundParams {
    let mut req = ParamRequest::new(n);
    req.weight_bound = 10;
    derive(&req).unwrap().params
}

/// A sparse graph for a few dozen clients (degree 6, threshold 4), to exercise SecAgg+ paths that
/// the derived parameters only reach at hundreds of clients.
fn sparse_params(n: u32) -> RoundParams {
    let mut p = small_params(n);
    p.degree = 6;
    p.threshold = 4;
    p
}

#[test]
fn all_clients_survive() {
    let n = 5;
    let (outcome, h) = run_and_check(
        config(n, 300, small_params(n)),
        inputs(n, 300, 10, 1),
        vec![],
        7,
    );
    let Outcome::Finished(agg) = outcome else {
        panic!("aborted: {outcome:?}")
    };
    assert_eq!(agg.survivors, vec![0, 1, 2, 3, 4]);
    assert!(agg.dropped.is_empty());
    // Every client finished its part.
    for i in 0..n as usize {
        assert!(h.client(i).unwrap().is_over());
    }
}

#[test]
fn dropout_at_every_stage_above_threshold() {
    let n = 8;
    for stage in Stage::ALL {
        let mut drop_at = vec![None; n as usize];
        drop_at[2] = Some(stage);
        drop_at[5] = Some(stage);
        let (outcome, _) = run_and_check(
            config(n, 100, small_params(n)),
            inputs(n, 100, 10, 2),
            drop_at,
            3,
        );
        let Outcome::Finished(agg) = outcome else {
            panic!("stage {stage}: {outcome:?}")
        };
        let expected: Vec<u32> = if stage == Stage::Unmask {
            (0..n).collect() // they uploaded: their inputs count, only their unmask answers are missing
        } else {
            (0..n).filter(|i| *i != 2 && *i != 5).collect()
        };
        assert_eq!(agg.survivors, expected, "stage {stage}");
        let dropped_masks: Vec<u32> = if matches!(stage, Stage::MaskedInput) {
            vec![2, 5]
        } else {
            vec![]
        };
        assert_eq!(agg.dropped, dropped_masks, "stage {stage}");
    }
}

#[test]
fn too_many_dropouts_abort_with_a_typed_reason() {
    let n = 8; // threshold 5
    let t = small_params(n).threshold;
    assert_eq!(t, 5);
    for stage in Stage::ALL {
        let drop_at: Vec<Option<Stage>> = (0..n).map(|i| (i < 4).then_some(stage)).collect();
        let (outcome, h) = run_and_check(
            config(n, 50, small_params(n)),
            inputs(n, 50, 10, 4),
            drop_at,
            5,
        );
        assert_eq!(
            outcome,
            Outcome::Aborted(AbortReason::TooFewSurvivors {
                stage,
                survivors: 4,
                threshold: 5
            }),
            "stage {stage}"
        );
        // Surviving clients learned of the abort.
        for i in 4..n as usize {
            assert!(h.client(i).unwrap().is_over());
        }
    }
}

#[test]
fn sparse_graph_rounds_are_exact() {
    let n = 40;
    let mut drop_at = vec![None; n as usize];
    for i in [3usize, 11, 17, 29] {
        drop_at[i] = Some(Stage::MaskedInput);
    }
    drop_at[20] = Some(Stage::ShareKeys);
    drop_at[33] = Some(Stage::Unmask);
    let (outcome, h) = run_and_check(
        config(n, 2000, sparse_params(n)),
        inputs(n, 2000, 10, 6),
        drop_at,
        9,
    );
    let Outcome::Finished(agg) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(agg.survivors.len(), 35);
    assert_eq!(agg.dropped, vec![3, 11, 17, 29]);
    // Upload per client: key advertisement, 6 encrypted share pairs, the vector, an unmask answer.
    let quantized = 2001 * 3;
    let up = h.bytes_up[0] as f64;
    assert!(
        up < quantized as f64 * 1.25 && up > quantized as f64,
        "upload {up}"
    );
}

#[test]
fn sparse_neighbourhood_below_threshold_aborts() {
    let n = 40;
    // Drop a whole run of clients: some neighbourhood will fall below t = 4 of 7.
    let drop_at: Vec<Option<Stage>> = (0..n)
        .map(|i| (i % 2 == 0).then_some(Stage::MaskedInput))
        .collect();
    let (outcome, _) = run_and_check(
        config(n, 64, sparse_params(n)),
        inputs(n, 64, 10, 8),
        drop_at,
        10,
    );
    match outcome {
        Outcome::Aborted(AbortReason::NeighbourhoodBelowThreshold {
            stage,
            holders,
            threshold,
            ..
        }) => {
            assert_eq!(stage, Stage::MaskedInput);
            assert!(holders < threshold);
        }
        other => panic!("expected a neighbourhood abort, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// For random sizes, dropout sets and stages: either the aggregate equals the plaintext mean of
    /// the survivors within the quantization bound, or the round aborts because a count really fell
    /// below the threshold.
    #[test]
    fn random_dropouts_aggregate_exactly_or_abort_for_a_reason(
        n in 3u32..24,
        sparse in any::<bool>(),
        drops in proptest::collection::vec((0u32..24, 0usize..4), 0..10),
        seed in any::<u64>(),
    ) {
        let params = if sparse && n > 8 { sparse_params(n) } else { small_params(n) };
        let mut drop_at = vec![None; n as usize];
        for (who, stage) in drops {
            if who < n { drop_at[who as usize] = Some(Stage::ALL[stage]); }
        }
        let (outcome, _) = run_and_check(config(n, 257, params.clone()), inputs(n, 257, 10, seed), drop_at.clone(), seed);
        match outcome {
            Outcome::Finished(agg) => {
                let expected: Vec<u32> = (0..n).filter(|&i| !matches!(drop_at[i as usize], Some(s) if s <= Stage::MaskedInput)).collect();
                prop_assert_eq!(agg.survivors, expected);
            }
            Outcome::Aborted(AbortReason::TooFewSurvivors { survivors, threshold, .. }) => prop_assert!(survivors < threshold),
            Outcome::Aborted(AbortReason::NeighbourhoodBelowThreshold { holders, threshold, .. }) => prop_assert!(holders < threshold),
            Outcome::Aborted(other) => prop_assert!(false, "unexpected abort {:?}", other),
        }
    }
}
