//! Algebraic laws of the aggregation rules, for random adapters, weights and client mixes: each
//! rule's decode of the exact weighted mean of its uploads equals its plaintext definition, the
//! exact rules' products are exact, and rank-partitioned weights are right for every rank mix.
#![allow(clippy::unwrap_used)]

use fedlora_aggregate::reference::weighted_mean;
use fedlora_aggregate::{
    AdapterLayout, ClientProfile, GlobalState, HeadInit, HeadSpec, LayerSpec, NamedTensors,
    RuleKind, Tensor,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn layout(partitions: &[usize]) -> AdapterLayout {
    AdapterLayout {
        model: "law".into(),
        rank: *partitions.last().unwrap(),
        alpha: 8.0,
        partitions: partitions.to_vec(),
        layers: vec![
            LayerSpec {
                module: "m.0.q".into(),
                out: 9,
                inp: 7,
            },
            LayerSpec {
                module: "m.0.v".into(),
                out: 8,
                inp: 7,
            },
        ],
        head: vec![
            HeadSpec {
                name: "m.classifier.weight".into(),
                shape: vec![2, 7],
                init: HeadInit::Normal,
            },
            HeadSpec {
                name: "m.classifier.bias".into(),
                shape: vec![2],
                init: HeadInit::Zeros,
            },
        ],
    }
}

fn noise(t: &Tensor, rng: &mut ChaCha8Rng, scale: f32) -> Tensor {
    Tensor::new(
        &t.shape,
        t.data
            .iter()
            .map(|x| x + rng.random_range(-scale..scale))
            .collect(),
    )
    .unwrap()
}

/// "Local training": every trainable tensor of the start moves by a random amount.
fn train(start: &fedlora_aggregate::ClientStart, rng: &mut ChaCha8Rng) -> NamedTensors {
    start
        .adapter
        .iter()
        .map(|(n, t)| {
            let trains = if n.ends_with(".lora_A.weight") {
                start.train.a
            } else if n.ends_with(".lora_B.weight") {
                start.train.b
            } else {
                start.train.head
            };
            let t = if trains {
                noise(t, rng, 0.5)
            } else {
                t.clone()
            };
            (n.to_string(), t)
        })
        .collect()
}

/// A global state after some rounds: random factors everywhere (B non-zero), the rule's shape.
fn random_global(rule: RuleKind, partitions: &[usize], rng: &mut ChaCha8Rng) -> GlobalState {
    let mut g = GlobalState::initial(layout(partitions), rule, rng.random()).unwrap();
    let names: Vec<String> = g.tensors.names().map(String::from).collect();
    for n in names {
        // exact always starts its rounds at B = 0.
        if rule == RuleKind::Exact && n.ends_with(".lora_B.weight") {
            continue;
        }
        let t = noise(g.tensors.get(&n).unwrap(), rng, 1.0);
        g.tensors.insert(n, t);
    }
    g.round = rng.random_range(0..4);
    g
}

struct Round {
    global: GlobalState,
    next: GlobalState,
    clients: Vec<(ClientProfile, NamedTensors)>,
}

fn run_round(rule: RuleKind, ranks: &[usize], seed: u64) -> Round {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut partitions: Vec<usize> = ranks.to_vec();
    partitions.sort_unstable();
    partitions.dedup();
    let global = random_global(rule, &partitions, &mut rng);
    let r = rule.rule();
    let mut uploads = Vec::new();
    let mut clients = Vec::new();
    for &rank in ranks {
        let profile = ClientProfile {
            rank,
            weight: rng.random_range(1..=50),
        };
        let start = r.start(&global, &profile, None).unwrap();
        let trained = train(&start, &mut rng);
        let up = r.encode(&global, &start, &trained, &profile).unwrap();
        assert_eq!(
            up.values.len(),
            fedlora_aggregate::manifest_values(&r.manifest(&global))
        );
        uploads.push(up);
        clients.push((profile, trained));
    }
    let mean = weighted_mean(&uploads).unwrap();
    let next = r.decode(&global, &mean).unwrap();
    next.validate().unwrap();
    assert_eq!(next.round, global.round + 1);
    Round {
        global,
        next,
        clients,
    }
}

/// `Σ p_i f(client_i)` over the given clients.
fn wmean(clients: &[(ClientProfile, NamedTensors)], f: impl Fn(&NamedTensors) -> Tensor) -> Tensor {
    let w: f64 = clients.iter().map(|(p, _)| f64::from(p.weight)).sum();
    let first = f(&clients[0].1);
    let mut acc = vec![0f64; first.len()];
    for (p, t) in clients {
        for (a, x) in acc.iter_mut().zip(&f(t).data) {
            *a += f64::from(p.weight) * f64::from(*x) / w;
        }
    }
    Tensor::new(&first.shape, acc.into_iter().map(|x| x as f32).collect()).unwrap()
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}");
    for (x, y) in a.data.iter().zip(&b.data) {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
            "{what}: {x} vs {y}"
        );
    }
}

fn get(t: &NamedTensors, n: &str) -> Tensor {
    t.get(n).unwrap().clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn fedavg_averages_each_factor_and_the_head(seed: u64, n in 1usize..6) {
        let r = run_round(RuleKind::FedAvg, &vec![4; n], seed);
        for name in r.global.tensors.names() {
            close(r.next.tensors.get(name).unwrap(), &wmean(&r.clients, |t| get(t, name)), name);
        }
    }

    #[test]
    fn frozen_a_is_the_exact_mean_of_the_products(seed: u64, n in 1usize..6) {
        let r = run_round(RuleKind::FrozenA, &vec![4; n], seed);
        let s = r.global.layout.scale();
        for l in &r.global.layout.layers {
            close(r.next.tensors.get(&l.a_name()).unwrap(), r.global.tensors.get(&l.a_name()).unwrap(), "A frozen");
            let product = r.next.tensors.get(&l.b_name()).unwrap()
                .matmul_scaled(r.next.tensors.get(&l.a_name()).unwrap(), s).unwrap();
            let want = wmean(&r.clients, |t| get(t, &l.b_name()).matmul_scaled(&get(t, &l.a_name()), s).unwrap());
            close(&product, &want, "mean of products");
        }
    }

    #[test]
    fn exact_merges_the_mean_product_and_restarts_the_adapter(seed: u64, n in 1usize..6) {
        let r = run_round(RuleKind::Exact, &vec![4; n], seed);
        let s = r.global.layout.scale();
        for l in &r.global.layout.layers {
            let mut want = wmean(&r.clients, |t| get(t, &l.b_name()).matmul_scaled(&get(t, &l.a_name()), s).unwrap());
            want.add_assign(r.global.tensors.get(&l.delta_name()).unwrap()).unwrap();
            close(r.next.tensors.get(&l.delta_name()).unwrap(), &want, "merged delta");
            prop_assert!(r.next.tensors.get(&l.b_name()).unwrap().data.iter().all(|&x| x == 0.0));
            prop_assert_ne!(r.next.tensors.get(&l.a_name()), r.global.tensors.get(&l.a_name()));
        }
        for h in &r.global.layout.head {
            close(r.next.tensors.get(&h.name).unwrap(), &wmean(&r.clients, |t| get(t, &h.name)), &h.name);
        }
    }

    #[test]
    fn share_a_averages_a_only_and_keeps_b_and_the_head_local(seed: u64, n in 1usize..6) {
        let r = run_round(RuleKind::ShareA, &vec![4; n], seed);
        for l in &r.global.layout.layers {
            close(r.next.tensors.get(&l.a_name()).unwrap(), &wmean(&r.clients, |t| get(t, &l.a_name())), "A");
            prop_assert_eq!(r.next.tensors.get(&l.b_name()), r.global.tensors.get(&l.b_name()));
        }
        let rule = RuleKind::ShareA.rule();
        let kept = rule.keep_local(&r.clients[0].1).unwrap();
        prop_assert!(kept.names().all(|n| !n.ends_with("lora_A.weight")));
        prop_assert_eq!(kept.len(), r.clients[0].1.len() - r.global.layout.layers.len());
        // The kept tensors are where the client starts next round.
        let start = rule.start(&r.next, &r.clients[0].0, Some(&kept)).unwrap();
        for (name, t) in kept.iter() {
            prop_assert_eq!(start.adapter.get(name), Some(t));
        }
    }

    #[test]
    fn alternate_trains_one_factor_per_round_exactly(seed: u64, n in 1usize..6) {
        let r = run_round(RuleKind::Alternate, &vec![4; n], seed);
        let b_round = r.global.round % 2 == 0;
        let s = r.global.layout.scale();
        for l in &r.global.layout.layers {
            let (trained, frozen) = if b_round { (l.b_name(), l.a_name()) } else { (l.a_name(), l.b_name()) };
            prop_assert_eq!(r.next.tensors.get(&frozen), r.global.tensors.get(&frozen));
            close(r.next.tensors.get(&trained).unwrap(), &wmean(&r.clients, |t| get(t, &trained)), "trained factor");
            let product = r.next.tensors.get(&l.b_name()).unwrap()
                .matmul_scaled(r.next.tensors.get(&l.a_name()).unwrap(), s).unwrap();
            let want = wmean(&r.clients, |t| get(t, &l.b_name()).matmul_scaled(&get(t, &l.a_name()), s).unwrap());
            close(&product, &want, "mean of products");
        }
    }

    #[test]
    fn zero_pad_is_the_plain_mean_of_padded_adapters(seed: u64, ranks in proptest::collection::vec(prop_oneof![Just(2usize), Just(4), Just(6)], 1..7)) {
        let r = run_round(RuleKind::ZeroPad, &ranks, seed);
        let rank = r.global.layout.rank;
        for l in &r.global.layout.layers {
            close(r.next.tensors.get(&l.a_name()).unwrap(),
                &wmean(&r.clients, |t| get(t, &l.a_name()).zero_padded(rank, l.inp).unwrap()), "A");
            close(r.next.tensors.get(&l.b_name()).unwrap(),
                &wmean(&r.clients, |t| get(t, &l.b_name()).zero_padded(l.out, rank).unwrap()), "B");
        }
    }

    #[test]
    fn rank_partitioned_weights_each_partition_by_its_holders(seed: u64, ranks in proptest::collection::vec(prop_oneof![Just(2usize), Just(4), Just(6)], 1..7)) {
        let r = run_round(RuleKind::RankPartitioned, &ranks, seed);
        let layout = &r.global.layout;
        for l in &layout.layers {
            let a_next = r.next.tensors.get(&l.a_name()).unwrap();
            let b_next = r.next.tensors.get(&l.b_name()).unwrap();
            for part in layout.partition_ranges() {
                let holders: Vec<(ClientProfile, NamedTensors)> = r.clients.iter()
                    .filter(|(p, _)| p.rank >= part.end).cloned().collect();
                for row in part.clone() {
                    let want_a: Tensor = if holders.is_empty() {
                        r.global.tensors.get(&l.a_name()).unwrap().top_rows(row + 1).unwrap()
                    } else {
                        wmean(&holders, |t| get(t, &l.a_name()).top_rows(row + 1).unwrap())
                    };
                    let got = &a_next.data[row * l.inp..(row + 1) * l.inp];
                    for (x, y) in got.iter().zip(&want_a.data[row * l.inp..]) {
                        prop_assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "A row {row}: {x} vs {y}");
                    }
                    for i in 0..l.out {
                        let want = if holders.is_empty() {
                            r.global.tensors.get(&l.b_name()).unwrap().data[i * layout.rank + row]
                        } else {
                            wmean(&holders, |t| {
                                let b = get(t, &l.b_name());
                                let c = b.shape[1];
                                Tensor::new(&[1], vec![b.data[i * c + row]]).unwrap()
                            }).data[0]
                        };
                        let x = b_next.data[i * layout.rank + row];
                        prop_assert!((x - want).abs() <= 1e-4 * (1.0 + want.abs()), "B[{i},{row}]: {x} vs {want}");
                    }
                }
            }
        }
        for h in &layout.head {
            close(r.next.tensors.get(&h.name).unwrap(), &wmean(&r.clients, |t| get(t, &h.name)), &h.name);
        }
    }
}

#[test]
fn a_frozen_factor_changed_by_training_is_refused() {
    let g = GlobalState::initial(layout(&[4]), RuleKind::FrozenA, 1).unwrap();
    let rule = RuleKind::FrozenA.rule();
    let p = ClientProfile { rank: 4, weight: 1 };
    let start = rule.start(&g, &p, None).unwrap();
    let mut trained = start.adapter.clone();
    let a = g.layout.layers[0].a_name();
    trained.get_mut(&a).unwrap().data[0] += 1.0;
    assert!(matches!(
        rule.encode(&g, &start, &trained, &p),
        Err(fedlora_aggregate::AggregateError::FrozenChanged(_))
    ));
    let mut nan = start.adapter.clone();
    nan.get_mut(&g.layout.layers[0].b_name()).unwrap().data[0] = f32::NAN;
    assert!(matches!(
        rule.encode(&g, &start, &nan, &p),
        Err(fedlora_aggregate::AggregateError::NonFinite(_))
    ));
    // A client whose rank is not the federation's is refused by every rule.
    for kind in RuleKind::ALL {
        let g = GlobalState::initial(layout(&[4]), kind, 1).unwrap();
        assert!(
            kind.rule()
                .start(&g, &ClientProfile { rank: 2, weight: 1 }, None)
                .is_err(),
            "{kind}"
        );
    }
}

/// Rank collapse (raFLoRA): clients of ranks 2, 4 and 6 each pull the factors they hold halfway
/// to a common target equal to the initial `A`. Under `zero-pad` the padded zeros of lower-rank
/// clients shrink the high partitions every round, so their norm decays geometrically; under
/// `rank-partitioned` each partition is averaged over its holders only and keeps its norm.
#[test]
fn zero_pad_collapses_high_ranks_and_rank_partitioned_does_not() {
    let ranks = [2usize, 4, 6];
    let partition_norm = |g: &GlobalState, part: std::ops::Range<usize>| -> f64 {
        g.layout
            .layers
            .iter()
            .map(|l| {
                let a = g.tensors.get(&l.a_name()).unwrap();
                part.clone()
                    .flat_map(|row| a.data[row * l.inp..(row + 1) * l.inp].iter())
                    .map(|&x| f64::from(x) * f64::from(x))
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let mut finals = Vec::new();
    for kind in [RuleKind::ZeroPad, RuleKind::RankPartitioned] {
        let rule = kind.rule();
        let mut g = GlobalState::initial(layout(&ranks), kind, 5).unwrap();
        let target = g.clone();
        let high = 4..6;
        let mut norms = vec![partition_norm(&g, high.clone())];
        for _round in 0..10 {
            let mut uploads = Vec::new();
            for &rank in &ranks {
                let p = ClientProfile { rank, weight: 10 };
                let start = rule.start(&g, &p, None).unwrap();
                let trained: NamedTensors = start
                    .adapter
                    .iter()
                    .map(|(n, t)| {
                        let goal = target.tensors.get(n).unwrap();
                        let goal = if n.ends_with(".lora_A.weight") {
                            goal.top_rows(rank).unwrap()
                        } else if n.ends_with(".lora_B.weight") {
                            goal.left_cols(rank).unwrap()
                        } else {
                            goal.clone()
                        };
                        let moved = t
                            .data
                            .iter()
                            .zip(&goal.data)
                            .map(|(x, y)| 0.5 * x + 0.5 * y)
                            .collect();
                        (n.to_string(), Tensor::new(&t.shape, moved).unwrap())
                    })
                    .collect();
                uploads.push(rule.encode(&g, &start, &trained, &p).unwrap());
            }
            g = rule.decode(&g, &weighted_mean(&uploads).unwrap()).unwrap();
            norms.push(partition_norm(&g, high.clone()));
        }
        let low = partition_norm(&g, 0..2) / partition_norm(&target, 0..2);
        assert!(
            (low - 1.0).abs() < 1e-4,
            "{kind}: the shared partition moves ({low})"
        );
        if kind == RuleKind::ZeroPad {
            assert!(
                norms.windows(2).all(|w| w[1] < w[0]),
                "{kind}: not decaying: {norms:?}"
            );
        }
        finals.push(norms[10] / norms[0]);
    }
    assert!(
        finals[0] < 0.35,
        "zero-pad keeps {:.3} of the high partition",
        finals[0]
    );
    assert!(
        (finals[1] - 1.0).abs() < 1e-3,
        "rank-partitioned keeps {:.3}",
        finals[1]
    );
}
