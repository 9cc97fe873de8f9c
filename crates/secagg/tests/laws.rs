//! Algebraic laws of the masking scheme, as property tests.
#![allow(clippy::unwrap_used)]

use fedlora_secagg::graph::NeighbourGraph;
use fedlora_secagg::kdf::{self, SessionId};
use fedlora_secagg::prg::{apply_masks, MaskKey, Sign};
use proptest::prelude::*;
use x25519_dalek::{PublicKey, StaticSecret};

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// Pairwise masks cancel: when every client adds its signed pairwise masks towards all its
    /// neighbours (derived by X25519 + HKDF from each side's own secret), the sum over clients is
    /// exactly zero in Z_2^32, for sparse and complete graphs.
    #[test]
    fn pairwise_masks_cancel(n in 2u32..20, half_degree in 1u32..5, secrets in proptest::collection::vec(any::<[u8; 32]>(), 20), session in any::<[u8; 32]>()) {
        let session = SessionId(session);
        let members: Vec<u32> = (0..n).collect();
        let graph = NeighbourGraph::new(&kdf::graph_seed(&session), &members, half_degree * 2);
        let sks: Vec<StaticSecret> = secrets[..n as usize].iter().map(|s| StaticSecret::from(*s)).collect();
        let pks: Vec<PublicKey> = sks.iter().map(PublicKey::from).collect();
        let len = 777;
        let mut total = vec![0u32; len];
        for me in 0..n {
            let masks: Vec<MaskKey> = graph
                .neighbours(me)
                .into_iter()
                .map(|peer| {
                    let shared = sks[me as usize].diffie_hellman(&pks[peer as usize]);
                    let seed = kdf::pairwise_mask_seed(shared.as_bytes(), &session, me, peer);
                    MaskKey::new(&seed, &session, Sign::pairwise(me, peer))
                })
                .collect();
            apply_masks(&mut total, &masks);
        }
        prop_assert!(total.iter().all(|&w| w == 0));
    }

    /// Masks are additive: applying a set of masks and then their negations in any order restores
    /// the accumulator (the server's removal of survivors' self masks relies on this).
    #[test]
    fn mask_removal_restores_the_input(seeds in proptest::collection::vec(any::<[u8; 32]>(), 1..6), start in proptest::collection::vec(any::<u32>(), 1..300)) {
        let session = SessionId([5; 32]);
        let keys: Vec<MaskKey> = seeds.iter().map(|s| MaskKey::new(&fedlora_secagg::secret::Seed::from_bytes(*s), &session, Sign::Plus)).collect();
        let mut acc = start.clone();
        apply_masks(&mut acc, &keys);
        let negated: Vec<MaskKey> = keys.iter().rev().map(MaskKey::negated).collect();
        apply_masks(&mut acc, &negated);
        prop_assert_eq!(acc, start);
    }
}
