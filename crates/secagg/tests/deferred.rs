//! Deferred inputs: a client created without its input and given it only when its masked vector
//! is due produces the same aggregate as one created with it, and the driver holds one batch of
//! inputs at a time.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use fedlora_secagg::harness::{Harness, Outcome};
use fedlora_secagg::{derive, Client, ClientError, ClientInput, ParamRequest, Stage};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn deferred_clients(n: u32, seed: u64) -> Vec<Client> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|i| Client::deferred(i, &mut rng)).collect()
}

fn params(n: u32) -> fedlora_secagg::RoundParams {
    let mut req = ParamRequest::new(n);
    req.weight_bound = 10;
    derive(&req).unwrap().params
}

#[test]
fn deferred_inputs_give_the_plaintext_mean_with_dropouts() {
    let (n, len) = (9u32, 200u32);
    let all = inputs(n, len, 10, 5);
    let mut drop_at = vec![None; n as usize];
    drop_at[3] = Some(Stage::ShareKeys);
    drop_at[6] = Some(Stage::Unmask);
    let mut h =
        Harness::with_clients(config(n, len, params(n)), deferred_clients(n, 9), drop_at).unwrap();
    let mut asked = Vec::new();
    let mut source = |id: u32| {
        asked.push(id);
        // Client 7 fails to produce its input (e.g. its training failed): it drops out.
        (id != 7).then(|| all[id as usize].clone())
    };
    let outcome = h.run_with_inputs(None, Some(&mut source));
    let Outcome::Finished(agg) = outcome else {
        panic!("aborted: {outcome:?}")
    };
    assert!(h.client_errors.is_empty(), "{:?}", h.client_errors);
    // Only clients alive at the masked-input stage were asked, each once, in id order.
    assert_eq!(asked, vec![0, 1, 2, 4, 5, 6, 7, 8]);
    // Client 6 dropped after its masked input was in: it still counts.
    let survivors: BTreeSet<u32> = agg.survivors.iter().copied().collect();
    assert_eq!(survivors, [0, 1, 2, 4, 5, 6, 8].into_iter().collect());
    let reference = weighted_mean(&all, &agg.survivors);
    for (m, r) in agg.mean.iter().zip(&reference) {
        assert!((f64::from(*m) - r).abs() <= agg.error_bound + 1e-6);
    }
}

#[test]
fn a_deferred_client_without_input_refuses_to_mask() {
    let (n, len) = (4u32, 10u32);
    let mut h =
        Harness::with_clients(config(n, len, params(n)), deferred_clients(n, 1), vec![]).unwrap();
    // No input source at all: every client reaches the share broadcast without input and stops.
    let outcome = h.run(None);
    assert!(matches!(outcome, Outcome::Aborted(_)), "{outcome:?}");
    let refused: BTreeSet<u32> = h
        .client_errors
        .iter()
        .filter(|(_, e)| e.contains("no input was provided"))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(refused, (0..n).collect());
}

#[test]
fn input_is_refused_before_setup_and_twice() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut c = Client::deferred(0, &mut rng);
    assert!(c.needs_input());
    let input = ClientInput {
        values: vec![0.5; 4],
        weight: 1,
    };
    assert!(matches!(
        c.provide_input(input.clone()),
        Err(ClientError::InputNotExpected(_))
    ));
    let mut eager = Client::new(1, input.clone(), &mut rng);
    assert!(!eager.needs_input());
    assert!(matches!(
        eager.provide_input(input),
        Err(ClientError::InputNotExpected(_))
    ));
}
