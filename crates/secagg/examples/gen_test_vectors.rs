//! Writes the JSON test vectors of `protocol-spec/test-vectors/` (protocol-spec README).
//!
//! Run with `cargo run -p fedlora-secagg --example gen_test_vectors`. Everything is deterministic:
//! running it twice writes the same bytes. `crates/secagg/tests/vectors.rs` checks the code against
//! the files and `protocol-spec/reference/check_vectors.py` re-derives them from the spec text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

#[path = "../tests/support/mod.rs"]
mod support;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Nonce};
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use fedlora_secagg::harness::{Harness, Outcome};
use fedlora_secagg::kdf::{self, SessionId};
use fedlora_secagg::prg::{MaskKey, Sign};
use fedlora_secagg::quant::Quantizer;
use fedlora_secagg::secret::Seed;
use fedlora_secagg::shamir::{self, Share, PRIME};
use fedlora_secagg::share_box::{self, SharePair};
use fedlora_secagg::wire::{
    self, AbortReason, AdvertiseKeys, ClientMessage, EncryptedShare, KeyBroadcast, MaskedInput,
    PublicKeys, RevealedShare, RoundParams, RoundSetup, ServerMessage, ShareBroadcast, ShareKeys,
    Stage, TensorSpec, UnmaskRequest, UnmaskResponse,
};
use fedlora_secagg::{derive, params, ClientInput, ParamRequest, RoundConfig};
use fedlora_secagg::{Client, ClientError};

const GENERATOR: &str =
    "cargo run -p fedlora-secagg --example gen_test_vectors (crates/secagg/examples/gen_test_vectors.rs)";

/// A CSPRNG wrapper that records every `next_u64` it hands out, so the vectors can list the draws.
struct Recording {
    inner: ChaCha20Rng,
    draws: Vec<u64>,
}

impl RngCore for Recording {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        let v = self.inner.next_u64();
        self.draws.push(v);
        v
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst)
    }
}

impl CryptoRng for Recording {}

fn h(b: &[u8]) -> String {
    hex::encode(b)
}

fn bytes_seq(start: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| start.wrapping_add(i as u8)).collect()
}

fn arr32(start: u8) -> [u8; 32] {
    bytes_seq(start, 32).try_into().unwrap()
}

fn f32_hex(x: f32) -> String {
    format!("{:08x}", x.to_bits())
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protocol-spec/test-vectors")
}

fn write(name: &str, description: &str, cases: Vec<Value>) {
    let v = json!({"generator": GENERATOR, "description": description, "cases": cases});
    let path = out_dir().join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
    println!(
        "wrote {} ({} cases)",
        path.display(),
        v["cases"].as_array().unwrap().len()
    );
}

fn params_json(p: &RoundParams) -> Value {
    json!({
        "degree": p.degree, "threshold": p.threshold, "ring_bits": p.ring_bits,
        "quant_bits": p.quant_bits, "clip": p.clip, "clip_f32_hex": f32_hex(p.clip),
        "weight_bound": p.weight_bound,
    })
}

/// The session-id preimage built from the text of protocol-spec §3.2 (checked against the code).
fn session_preimage(
    round: u64,
    nonce: &[u8; 32],
    n: u32,
    p: &RoundParams,
    manifest: &[TensorSpec],
    keys: &[PublicKeys],
) -> Vec<u8> {
    let mut m = b"fedlora/v0/session".to_vec();
    m.extend_from_slice(&0u16.to_le_bytes());
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(&n.to_le_bytes());
    m.extend_from_slice(&p.degree.to_le_bytes());
    m.extend_from_slice(&p.threshold.to_le_bytes());
    m.push(p.ring_bits);
    m.push(p.quant_bits);
    m.extend_from_slice(&p.clip.to_le_bytes());
    m.extend_from_slice(&p.weight_bound.to_le_bytes());
    m.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    for t in manifest {
        m.extend_from_slice(&(t.name.len() as u64).to_le_bytes());
        m.extend_from_slice(t.name.as_bytes());
        m.extend_from_slice(&(t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            m.extend_from_slice(&d.to_le_bytes());
        }
    }
    m.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        m.extend_from_slice(&k.client.to_le_bytes());
        m.extend_from_slice(&k.keys.cipher_pk);
        m.extend_from_slice(&k.keys.mask_pk);
    }
    m
}

fn kdf_session_fixture() -> (u64, [u8; 32], u32, RoundParams, Vec<TensorSpec>) {
    let params = RoundParams {
        degree: 2,
        threshold: 2,
        ring_bits: 24,
        quant_bits: 20,
        clip: 0.5,
        weight_bound: 7,
    };
    let manifest = vec![
        TensorSpec {
            name: "q_proj.lora_A".into(),
            shape: vec![2, 3],
        },
        TensorSpec {
            name: "q_proj.lora_B".into(),
            shape: vec![3, 2],
        },
    ];
    (9, arr32(0xa0), 4, params, manifest)
}

fn gen_kdf() {
    let mut cases = Vec::new();
    for purpose in [
        "session",
        "graph",
        "pair-seed",
        "prg-key",
        "share-key",
        "share",
        "advertise",
        "self-mask-commitment",
    ] {
        cases.push(
            json!({"type": "label", "purpose": purpose, "label_hex": h(&kdf::label(purpose))}),
        );
    }
    // X25519 key pairs of clients 0, 1, 3 (client 2 did not advertise).
    let ids = [0u32, 1, 3];
    let cipher_sk: Vec<[u8; 32]> = ids.iter().map(|&i| arr32(0x10 + i as u8 * 0x20)).collect();
    let mask_sk: Vec<[u8; 32]> = ids.iter().map(|&i| arr32(0x11 + i as u8 * 0x20)).collect();
    let pk = |sk: &[u8; 32]| PublicKey::from(&StaticSecret::from(*sk)).to_bytes();
    let keys: Vec<PublicKeys> = ids
        .iter()
        .enumerate()
        .map(|(k, &client)| PublicKeys {
            client,
            keys: AdvertiseKeys {
                cipher_pk: pk(&cipher_sk[k]),
                mask_pk: pk(&mask_sk[k]),
                signature: vec![0xee; 3],
            },
        })
        .collect();
    let (round, nonce, n, params, manifest) = kdf_session_fixture();
    let sid = kdf::session_id(round, &nonce, n, &params, &manifest, &keys);
    let pre = session_preimage(round, &nonce, n, &params, &manifest, &keys);
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&pre)),
        sid.0,
        "§3.2 text disagrees with kdf::session_id"
    );
    let graph_seed = kdf::graph_seed(&sid);
    cases.push(json!({
        "type": "session_id",
        "round": round, "nonce_hex": h(&nonce), "num_clients": n, "params": params_json(&params),
        "manifest": manifest.iter().map(|t| json!({"name": t.name, "shape": t.shape})).collect::<Vec<_>>(),
        "keys": ids.iter().enumerate().map(|(k, &client)| json!({
            "client": client,
            "cipher_sk_hex": h(&cipher_sk[k]), "mask_sk_hex": h(&mask_sk[k]),
            "cipher_pk_hex": h(&keys[k].keys.cipher_pk), "mask_pk_hex": h(&keys[k].keys.mask_pk),
            "signature_hex": h(&keys[k].keys.signature),
        })).collect::<Vec<_>>(),
        "preimage_hex": h(&pre),
        "session_id_hex": h(&sid.0),
        "graph_seed_hex": h(&graph_seed),
    }));
    // Pairwise seeds and share keys of every pair, from the X25519 agreements.
    for a in 0..ids.len() {
        for b in a + 1..ids.len() {
            let (i, j) = (ids[a], ids[b]);
            let zm = StaticSecret::from(mask_sk[a])
                .diffie_hellman(&PublicKey::from(keys[b].keys.mask_pk));
            let zc = StaticSecret::from(cipher_sk[a])
                .diffie_hellman(&PublicKey::from(keys[b].keys.cipher_pk));
            let zm2 = StaticSecret::from(mask_sk[b])
                .diffie_hellman(&PublicKey::from(keys[a].keys.mask_pk));
            assert_eq!(zm.as_bytes(), zm2.as_bytes());
            let seed = kdf::pairwise_mask_seed(zm.as_bytes(), &sid, j, i);
            assert_eq!(seed, kdf::pairwise_mask_seed(zm.as_bytes(), &sid, i, j));
            let key = kdf::share_key(zc.as_bytes(), &sid, i, j);
            cases.push(json!({
                "type": "pair", "session_id_hex": h(&sid.0), "a": i, "b": j,
                "mask_shared_hex": h(zm.as_bytes()), "cipher_shared_hex": h(zc.as_bytes()),
                "pair_seed_hex": h(seed.expose()), "share_key_hex": h(key.as_ref()),
                "prg_key_of_pair_seed_hex": h(kdf::prg_key(&seed, &sid).as_ref()),
            }));
        }
    }
    // Bare derivations from given inputs.
    let sid2 = SessionId(arr32(0x40));
    let shared = arr32(0x70);
    cases.push(json!({
        "type": "pair_seed", "shared_hex": h(&shared), "session_id_hex": h(&sid2.0), "a": 7, "b": 2,
        "pair_seed_hex": h(kdf::pairwise_mask_seed(&shared, &sid2, 7, 2).expose()),
    }));
    cases.push(json!({
        "type": "share_key", "shared_hex": h(&shared), "session_id_hex": h(&sid2.0), "a": 7, "b": 2,
        "share_key_hex": h(kdf::share_key(&shared, &sid2, 7, 2).as_ref()),
    }));
    let seed = Seed::from_bytes(arr32(0x90));
    cases.push(json!({
        "type": "prg_key", "seed_hex": h(seed.expose()), "session_id_hex": h(&sid2.0),
        "prg_key_hex": h(kdf::prg_key(&seed, &sid2).as_ref()),
    }));
    // Self-mask commitments (§3.7): one from given bytes, and the spec text's preimage checked.
    for (seed_b, sid_b, client) in [(0x90u8, 0x40u8, 7u32), (0x00, 0xff, 0)] {
        let seed = Seed::from_bytes(arr32(seed_b));
        let sid = SessionId(arr32(sid_b));
        let mut pre = kdf::label("self-mask-commitment");
        pre.extend_from_slice(&sid.0);
        pre.extend_from_slice(&client.to_le_bytes());
        pre.extend_from_slice(seed.expose());
        let commitment = kdf::self_mask_commitment(&seed, &sid, client);
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(&pre)),
            commitment,
            "§3.7 text disagrees with kdf::self_mask_commitment"
        );
        cases.push(json!({
            "type": "self_mask_commitment", "seed_hex": h(seed.expose()), "session_id_hex": h(&sid.0),
            "client": client, "preimage_hex": h(&pre), "commitment_hex": h(&commitment),
        }));
    }
    let cpk = arr32(1);
    let mpk = arr32(2);
    cases.push(json!({
        "type": "advertise_signing_bytes", "round": 9, "nonce_hex": h(&nonce), "client": 3,
        "cipher_pk_hex": h(&cpk), "mask_pk_hex": h(&mpk),
        "bytes_hex": h(&kdf::advertise_signing_bytes(9, &nonce, 3, &cpk, &mpk)),
    }));
    write(
        "kdf.json",
        "protocol-spec §3.1-§3.3, §3.6 key, §3.7 self-mask commitment, §5.1 graph seed, §8.3 signed bytes. 'label': label(purpose). \
         'session_id': SHA-256 of preimage_hex (layout of §3.2) for the given round, params, manifest and \
         keys (public keys are X25519(sk, 9) of the given secret keys; signatures are not hashed); \
         graph_seed = SHA-256(label(graph) || sid). 'pair': for two of those clients, the X25519 shared \
         secrets of their mask keys and cipher keys, the pairwise mask seed (§3.3), the share key \
         (§3.6) and the PRG key of the pairwise seed (§3.4). 'pair_seed'/'share_key'/'prg_key': the \
         HKDF derivations from given inputs. 'self_mask_commitment': SHA-256 of preimage_hex = \
         label(self-mask-commitment) || sid || LE32(client) || seed (§3.7).",
        cases,
    );
}

fn gen_prg() {
    let mut cases = Vec::new();
    for (seed_b, sid_b) in [(0x00u8, 0x01u8), (0x5a, 0xc3)] {
        let seed = Seed::from_bytes(arr32(seed_b));
        let sid = SessionId(arr32(sid_b));
        let key = kdf::prg_key(&seed, &sid);
        let mut ks = [0u8; 64];
        fedlora_secagg::prg::keystream_into(&key, 0, &mut ks);
        let mask = MaskKey::new(&seed, &sid, Sign::Plus);
        let first = fedlora_secagg::prg::expand(&mask, 16);
        let mut seeks = Vec::new();
        for (start, count) in [(5u64, 6usize), (1021, 8), (65534, 6)] {
            let mut part = vec![0u32; count];
            mask.apply(&mut part, start);
            let whole = fedlora_secagg::prg::expand(&mask, start as usize + count);
            assert_eq!(part, whole[start as usize..]);
            seeks.push(json!({"start_word": start, "words": part}));
        }
        // Applying with a sign to a non-zero accumulator.
        let acc_in: Vec<u32> = vec![0, 1, 0xffff_ffff, 12345];
        let mut plus = acc_in.clone();
        mask.apply(&mut plus, 2);
        let mut minus = acc_in.clone();
        mask.negated().apply(&mut minus, 2);
        cases.push(json!({
            "seed_hex": h(seed.expose()), "session_id_hex": h(&sid.0),
            "prg_key_hex": h(key.as_ref()), "keystream_first_64_hex": h(&ks),
            "first_words": first, "at_offset": seeks,
            "apply": {"acc_in": acc_in, "start_word": 2, "plus": plus, "minus": minus},
        }));
    }
    write(
        "prg.json",
        "protocol-spec §3.4. prg_key = HKDF(salt=sid, IKM=seed, info=label(prg-key), L=16); keystream = \
         AES-128-CTR, block m = AES(key, BE128(m)); word p = LE u32 of keystream bytes 4p..4p+4. \
         first_words: words 0..16; at_offset: words start_word.. (seeking); apply: acc_in[i] +/- word \
         (start_word + i) mod 2^32 for the Plus and Minus signs.",
        cases,
    );
}

fn share_json(s: &Share) -> Value {
    json!({"holder": s.holder, "values": s.values, "bytes_hex": h(s.to_bytes().as_ref())})
}

fn gen_shamir() {
    let mut cases = Vec::new();
    let specs: [(u8, usize, Vec<u32>, u8); 4] = [
        (0x01, 3, vec![0, 1, 2, 3, 4], 0x33),
        (0xf0, 1, vec![5, 9], 0x44),
        (0x7f, 4, vec![2, 3, 5, 7, 11, 13], 0x55),
        (0xff, 2, vec![0, 4294967294], 0x66),
    ];
    for (sb, t, holders, rb) in specs {
        let secret: [u8; 32] = if sb == 0xff { [0xff; 32] } else { arr32(sb) };
        let rng_seed = arr32(rb);
        let mut rng = Recording {
            inner: ChaCha20Rng::from_seed(rng_seed),
            draws: Vec::new(),
        };
        let shares = shamir::split(&Seed::from_bytes(secret), t, &holders, &mut rng).unwrap();
        let coefficients: Vec<Vec<u64>> = rng
            .draws
            .iter()
            .map(|r| r >> 3)
            .filter(|&r| r < PRIME)
            .collect::<Vec<_>>()
            .chunks(5)
            .map(<[u64]>::to_vec)
            .collect();
        assert_eq!(coefficients.len(), t - 1);
        // Combine from a few subsets of size >= t.
        let mut combines = Vec::new();
        let n = shares.len();
        let subsets: Vec<Vec<usize>> = vec![
            (0..t).collect(),
            (n - t..n).collect(),
            (0..n).rev().collect(),
        ];
        for sub in subsets {
            let picked: Vec<Share> = sub.iter().map(|&i| shares[i].clone()).collect();
            let back = shamir::combine(&picked, t).unwrap();
            assert_eq!(back.expose(), &secret);
            combines.push(json!({"holders": picked.iter().map(|s| s.holder).collect::<Vec<_>>(), "secret_hex": h(&secret)}));
        }
        cases.push(json!({
            "secret_hex": h(&secret), "threshold": t, "holders": holders,
            "chacha20_seed_hex": h(&rng_seed), "rng_u64": rng.draws, "coefficients": coefficients,
            "shares": shares.iter().map(share_json).collect::<Vec<_>>(),
            "combine": combines,
        }));
    }
    write(
        "shamir.json",
        "protocol-spec §3.5. p = 2^61-1. rng: rand_chacha ChaCha20Rng::from_seed(chacha20_seed_hex); \
         rng_u64 are its next_u64() outputs in order; coefficients[d-1][c] = a_{d,c} for d = 1..t-1, \
         chunk c = 0..4 (each draw r>>3, rejected if >= p). shares: holder, f_c(holder+1) for c = 0..4, \
         and the 40-byte encoding. combine: any listed subset (order irrelevant) reconstructs the secret.",
        cases,
    );
}

fn pair_for(holder: u32, a: [u64; 5], b: [u64; 5]) -> SharePair {
    SharePair {
        self_mask: Share { holder, values: a },
        mask_key: Share { holder, values: b },
    }
}

fn gen_share_box() -> Vec<Value> {
    let mut cases = Vec::new();
    let mut bad = Vec::new();
    // Case 1: bare key.
    let key = [0x42u8; 16];
    let sid = SessionId(arr32(0x20));
    let (sender, receiver) = (3u32, 8u32);
    let pair = pair_for(
        receiver,
        [1, 2, 3, 4, 5],
        [PRIME - 1, 0, 1 << 56, 77, 0xffff_ffff],
    );
    let ct = share_box::seal(&key, &sid, sender, receiver, &pair);
    // Build nonce/AAD/plaintext from the spec text and check the AEAD output matches.
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&sender.to_le_bytes());
    nonce[4..8].copy_from_slice(&receiver.to_le_bytes());
    let mut aad = b"fedlora/v0/share".to_vec();
    aad.extend_from_slice(&sid.0);
    aad.extend_from_slice(&sender.to_le_bytes());
    aad.extend_from_slice(&receiver.to_le_bytes());
    let mut pt = Vec::new();
    pt.extend_from_slice(&sender.to_le_bytes());
    pt.extend_from_slice(&receiver.to_le_bytes());
    pt.extend_from_slice(pair.self_mask.to_bytes().as_ref());
    pt.extend_from_slice(pair.mask_key.to_bytes().as_ref());
    let gcm = Aes128Gcm::new((&key).into());
    let ct2 = gcm
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &pt,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(ct, ct2, "§3.6 text disagrees with share_box::seal");
    cases.push(json!({
        "key_hex": h(&key), "session_id_hex": h(&sid.0), "sender": sender, "receiver": receiver,
        "self_mask_share": pair.self_mask.values, "mask_key_share": pair.mask_key.values,
        "nonce_hex": h(&nonce), "aad_hex": h(&aad), "plaintext_hex": h(&pt), "ciphertext_hex": h(&ct),
    }));
    // Case 2: key from X25519 cipher keys (full chain).
    let sk_s = arr32(0x31);
    let sk_r = arr32(0x57);
    let pk_r = PublicKey::from(&StaticSecret::from(sk_r)).to_bytes();
    let pk_s = PublicKey::from(&StaticSecret::from(sk_s)).to_bytes();
    let z = StaticSecret::from(sk_s).diffie_hellman(&PublicKey::from(pk_r));
    let sid2 = SessionId(arr32(0x99));
    let (s2, r2) = (12u32, 5u32);
    let key2 = kdf::share_key(z.as_bytes(), &sid2, s2, r2);
    let pair2 = pair_for(r2, [10, 20, 30, 40, 50], [60, 70, 80, 90, 100]);
    let ct2 = share_box::seal(&key2, &sid2, s2, r2, &pair2);
    assert_eq!(share_box::open(&key2, &sid2, s2, r2, &ct2).unwrap(), pair2);
    cases.push(json!({
        "sender_cipher_sk_hex": h(&sk_s), "receiver_cipher_sk_hex": h(&sk_r),
        "sender_cipher_pk_hex": h(&pk_s), "receiver_cipher_pk_hex": h(&pk_r),
        "shared_hex": h(z.as_bytes()),
        "key_hex": h(key2.as_ref()), "session_id_hex": h(&sid2.0), "sender": s2, "receiver": r2,
        "self_mask_share": pair2.self_mask.values, "mask_key_share": pair2.mask_key.values,
        "ciphertext_hex": h(&ct2),
    }));
    // Bad cases derived from case 1.
    let base = |name: &str, key: &[u8], sid: &[u8], s: u32, r: u32, ct: &[u8], err: &str| {
        json!({"name": name, "key_hex": h(key), "session_id_hex": h(sid), "sender": s, "receiver": r,
               "ciphertext_hex": h(ct), "error": err})
    };
    let mut flip = ct.clone();
    flip[0] ^= 1;
    bad.push(base(
        "flipped first ciphertext byte",
        &key,
        &sid.0,
        sender,
        receiver,
        &flip,
        "Unauthentic",
    ));
    let mut flip = ct.clone();
    flip[103] ^= 0x80;
    bad.push(base(
        "flipped last tag byte",
        &key,
        &sid.0,
        sender,
        receiver,
        &flip,
        "Unauthentic",
    ));
    let mut other_sid = sid.0;
    other_sid[31] ^= 1;
    bad.push(base(
        "other session id (AAD)",
        &key,
        &other_sid,
        sender,
        receiver,
        &ct,
        "Unauthentic",
    ));
    bad.push(base(
        "sender and receiver swapped",
        &key,
        &sid.0,
        receiver,
        sender,
        &ct,
        "Unauthentic",
    ));
    bad.push(base(
        "wrong receiver",
        &key,
        &sid.0,
        sender,
        receiver + 1,
        &ct,
        "Unauthentic",
    ));
    bad.push(base(
        "wrong sender",
        &key,
        &sid.0,
        sender + 1,
        receiver,
        &ct,
        "Unauthentic",
    ));
    bad.push(base(
        "wrong key",
        &[0x43; 16],
        &sid.0,
        sender,
        receiver,
        &ct,
        "Unauthentic",
    ));
    bad.push(base(
        "truncated to 103 bytes",
        &key,
        &sid.0,
        sender,
        receiver,
        &ct[..103],
        "Unauthentic",
    ));
    let mut longer = ct.clone();
    longer.push(0);
    bad.push(base(
        "extended to 105 bytes",
        &key,
        &sid.0,
        sender,
        receiver,
        &longer,
        "Unauthentic",
    ));
    bad.push(base(
        "empty",
        &key,
        &sid.0,
        sender,
        receiver,
        &[],
        "Unauthentic",
    ));
    // Authentic AEAD, but the plaintext names another sender.
    let mut pt_bad = pt.clone();
    pt_bad[..4].copy_from_slice(&(sender + 1).to_le_bytes());
    let ct_bad = gcm
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &pt_bad,
                aad: &aad,
            },
        )
        .unwrap();
    bad.push(base(
        "authentic but plaintext sender field differs",
        &key,
        &sid.0,
        sender,
        receiver,
        &ct_bad,
        "Unauthentic",
    ));
    // Authentic, addressed correctly, but a share value is p.
    let nonfield = pair_for(receiver, [1, 2, PRIME, 4, 5], [1, 2, 3, 4, 5]);
    let ct_nf = share_box::seal(&key, &sid, sender, receiver, &nonfield);
    let mut c = base(
        "authentic but a share value equals p",
        &key,
        &sid.0,
        sender,
        receiver,
        &ct_nf,
        "Share(NotAFieldElement)",
    );
    c["holder"] = json!(receiver);
    bad.push(c);
    write(
        "share_box.json",
        "protocol-spec §3.6. AES-128-GCM; nonce = LE32(sender)||LE32(receiver)||00000000; AAD = \
         label(share)||sid||LE32(sender)||LE32(receiver); plaintext = LE32(sender)||LE32(receiver)|| \
         share of b (5 x LE64) || share of s_sk (5 x LE64); ciphertext = 88 bytes || 16-byte tag. The \
         second case derives the key from X25519 cipher keys (key = HKDF(salt=sid, IKM=shared, \
         info=label(share-key)||LE32(min)||LE32(max), L=16)).",
        cases,
    );
    bad
}

fn gen_quantization() {
    let mut cases = Vec::new();
    let qcases: Vec<(RoundParams, Vec<f32>, u32, u8)> = vec![
        (
            RoundParams {
                degree: 4,
                threshold: 3,
                ring_bits: 16,
                quant_bits: 10,
                clip: 2.0,
                weight_bound: 1,
            },
            vec![0.0, 1.0, -1.0, 2.0, -2.0, 5.0, -5.0, 0.3, -0.3, 1e-7],
            1,
            0x01,
        ),
        (
            RoundParams {
                degree: 4,
                threshold: 3,
                ring_bits: 24,
                quant_bits: 19,
                clip: 1.0,
                weight_bound: 10,
            },
            vec![0.5, -0.25, 0.123_456_79, -0.987_654_3, 1.0, -1.0, 0.0, 0.75],
            7,
            0x02,
        ),
        (
            RoundParams {
                degree: 4,
                threshold: 3,
                ring_bits: 32,
                quant_bits: 21,
                clip: 0.1,
                weight_bound: 1000,
            },
            vec![0.01, -0.05, 0.1, -0.1, 0.099_999, 0.2, -3.5e-4],
            1000,
            0x03,
        ),
        (
            RoundParams {
                degree: 4,
                threshold: 3,
                ring_bits: 8,
                quant_bits: 5,
                clip: 1.0,
                weight_bound: 3,
            },
            vec![0.9, -0.9, 0.1, -0.1],
            2,
            0x04,
        ),
    ];
    for (p, values, weight, rb) in qcases {
        let q = Quantizer::new(&p);
        let seed = arr32(rb);
        let mut rng = Recording {
            inner: ChaCha20Rng::from_seed(seed),
            draws: Vec::new(),
        };
        let (words, stats) = q.quantize(&values, weight, &mut rng).unwrap();
        cases.push(json!({
            "type": "quantize", "params": params_json(&p),
            "values": values, "values_f32_hex": values.iter().map(|&v| f32_hex(v)).collect::<Vec<_>>(),
            "weight": weight, "chacha20_seed_hex": h(&seed), "rng_u64": rng.draws,
            "words": words.to_vec(), "clipped": stats.clipped,
        }));
    }
    // Dequantization: a ring sum (values, then the weight sum) to the weighted mean.
    let p = RoundParams {
        degree: 4,
        threshold: 3,
        ring_bits: 24,
        quant_bits: 19,
        clip: 1.0,
        weight_bound: 10,
    };
    let q = Quantizer::new(&p);
    let sum = vec![
        123_456u32,
        (1 << 24) - 98_765,
        0,
        1 << 23,
        (1 << 23) - 1,
        17,
    ];
    let (mean, wsum) = q.weighted_mean(&sum).unwrap();
    cases.push(json!({
        "type": "dequantize", "params": params_json(&p), "sum": sum, "survivors": 3,
        "weight_sum": wsum, "mean_f32_hex": mean.iter().map(|&m| f32_hex(m)).collect::<Vec<_>>(),
        "mean": mean, "error_bound": q.error_bound(3, wsum),
    }));
    write(
        "quantization.json",
        "protocol-spec §5.3. quantize: the words (L values then the weight) for the given params, values \
         (binary32; exact bits in values_f32_hex) and weight, with the rounding draws rng_u64 \
         (next_u64 of ChaCha20Rng::from_seed(chacha20_seed_hex), one per value). dequantize: the last \
         sum word is the weight sum; mean (binary32 bits in mean_f32_hex) and error_bound for the given \
         number of survivors.",
        cases,
    );
}

fn gen_params() {
    let mut cases = Vec::new();
    let mut reqs = Vec::new();
    for n in [4u32, 10, 100, 1024, 10_000] {
        reqs.push(ParamRequest::new(n));
    }
    let mut r = ParamRequest::new(1024);
    r.weight_bound = 1000;
    reqs.push(r);
    let mut r = ParamRequest::new(1000);
    r.expected_dropout = 0.3;
    r.corrupt_fraction = 0.1;
    reqs.push(r);
    let mut r = ParamRequest::new(30);
    r.expected_dropout = 0.3;
    reqs.push(r);
    // Precision capped below what the ring allows, leaving headroom for §7 noise.
    let mut r = ParamRequest::new(10);
    r.max_quant_bits = Some(17);
    reqs.push(r);
    let mut r = ParamRequest::new(1024);
    r.max_quant_bits = Some(16);
    reqs.push(r);
    // A cap above the ring's precision changes nothing.
    let mut r = ParamRequest::new(100);
    r.max_quant_bits = Some(31);
    reqs.push(r);
    for req in reqs {
        let d = derive(&req).unwrap();
        params::validate(&d.params, req.clients).unwrap();
        let f = |x: f64| {
            if x.is_finite() {
                json!(x)
            } else {
                json!("-inf")
            }
        };
        cases.push(json!({
            "request": {
                "clients": req.clients, "expected_dropout": req.expected_dropout,
                "corrupt_fraction": req.corrupt_fraction, "security_bits": req.security_bits,
                "failure_bits": req.failure_bits, "clip": req.clip, "weight_bound": req.weight_bound,
                "min_quant_bits": req.min_quant_bits, "max_quant_bits": req.max_quant_bits,
                "ring_bits": req.ring_bits,
            },
            "params": params_json(&d.params),
            "complete_graph": d.complete_graph,
            "log2_disconnect": f(d.log2_disconnect), "log2_reveal": f(d.log2_reveal),
            "log2_failure": f(d.log2_failure), "failure_goal_met": d.failure_goal_met,
        }));
    }
    write(
        "params.json",
        "protocol-spec §5.2-§5.4: derive(request) -> degree, threshold, ring_bits, quant_bits (capped at \
         max_quant_bits when not null) and the achieved log2 bounds (\"-inf\" where not applicable); integers must match exactly, the bounds \
         to 1e-9.",
        cases,
    );
}

fn codec_case(name: &str, direction: &str, kind: &str, message: Value, bytes: &[u8]) -> Value {
    json!({"name": name, "direction": direction, "kind": kind, "message": message, "bytes_hex": h(bytes)})
}

fn sample_setup() -> RoundSetup {
    RoundSetup {
        version: 0,
        round: 7,
        nonce: arr32(0xb0),
        client_id: 3,
        num_clients: 5,
        params: RoundParams {
            degree: 4,
            threshold: 3,
            ring_bits: 24,
            quant_bits: 20,
            clip: 1.0,
            weight_bound: 100,
        },
        manifest: vec![
            TensorSpec {
                name: "a".into(),
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "lora_B".into(),
                shape: vec![4],
            },
        ],
    }
}

fn gen_codec() -> Vec<Value> {
    let mut cases = Vec::new();
    let srv = |m: &ServerMessage| wire::encode_server(m).unwrap();
    let cli = |m: &ClientMessage| wire::encode_client(m).unwrap();
    let setup = sample_setup();
    let setup_bytes = srv(&ServerMessage::Setup(setup.clone()));
    cases.push(codec_case(
        "setup",
        "server",
        "Setup",
        serde_json::to_value(&setup).unwrap(),
        &setup_bytes,
    ));
    let adv = AdvertiseKeys {
        cipher_pk: arr32(1),
        mask_pk: arr32(0x41),
        signature: bytes_seq(0x80, 64),
    };
    let kb = KeyBroadcast {
        keys: vec![
            PublicKeys {
                client: 0,
                keys: adv.clone(),
            },
            PublicKeys {
                client: 2,
                keys: AdvertiseKeys {
                    cipher_pk: arr32(0x61),
                    mask_pk: arr32(0x81),
                    signature: vec![],
                },
            },
        ],
    };
    cases.push(codec_case(
        "key broadcast",
        "server",
        "KeyBroadcast",
        serde_json::to_value(&kb).unwrap(),
        &srv(&ServerMessage::KeyBroadcast(kb.clone())),
    ));
    let enc = EncryptedShare {
        sender: 2,
        receiver: 0,
        ciphertext: bytes_seq(0x10, 104),
    };
    let sb = ShareBroadcast {
        shares: vec![enc.clone()],
    };
    cases.push(codec_case(
        "share broadcast",
        "server",
        "ShareBroadcast",
        serde_json::to_value(&sb).unwrap(),
        &srv(&ServerMessage::ShareBroadcast(sb.clone())),
    ));
    let ur = UnmaskRequest {
        survivors: vec![0, 2, 3],
        dropped: vec![1],
    };
    cases.push(codec_case(
        "unmask request",
        "server",
        "UnmaskRequest",
        serde_json::to_value(&ur).unwrap(),
        &srv(&ServerMessage::UnmaskRequest(ur.clone())),
    ));
    let aborts = vec![
        AbortReason::TooFewSurvivors {
            stage: Stage::ShareKeys,
            survivors: 2,
            threshold: 3,
        },
        AbortReason::NeighbourhoodBelowThreshold {
            stage: Stage::Unmask,
            client: 4,
            holders: 1,
            threshold: 3,
        },
        AbortReason::ReconstructionFailed { client: 9 },
        AbortReason::Cancelled {
            detail: "shutdown".into(),
        },
    ];
    for a in aborts {
        let name = format!(
            "abort {}",
            serde_json::to_value(&a)
                .unwrap()
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
        );
        cases.push(codec_case(
            &name,
            "server",
            "Abort",
            serde_json::to_value(&a).unwrap(),
            &srv(&ServerMessage::Abort(a.clone())),
        ));
    }
    cases.push(codec_case(
        "advertise keys",
        "client",
        "AdvertiseKeys",
        serde_json::to_value(&adv).unwrap(),
        &cli(&ClientMessage::AdvertiseKeys(adv.clone())),
    ));
    let sk = ShareKeys {
        shares: vec![
            enc.clone(),
            EncryptedShare {
                sender: 2,
                receiver: 3,
                ciphertext: bytes_seq(0x90, 104),
            },
        ],
        self_mask_commitment: arr32(0xc1),
    };
    cases.push(codec_case(
        "share keys",
        "client",
        "ShareKeys",
        serde_json::to_value(&sk).unwrap(),
        &cli(&ClientMessage::ShareKeys(sk.clone())),
    ));
    for (bits, words) in [
        (8u8, vec![0u32, 1, 0x7f, 0xff]),
        (16, vec![0xbeef, 0, 0xffff]),
        (24, vec![0x00ab_cdef, 1, 0xff_ffff]),
        (32, vec![0xdead_beef, 0, 0xffff_ffff, 7]),
    ] {
        let m = MaskedInput {
            ring_bits: bits,
            words: words.clone(),
        };
        cases.push(codec_case(
            &format!("masked input {bits} bits"),
            "client",
            "MaskedInput",
            json!({"ring_bits": bits, "words": words}),
            &cli(&ClientMessage::MaskedInput(m)),
        ));
    }
    let resp = UnmaskResponse {
        self_mask_shares: vec![RevealedShare {
            owner: 0,
            share: bytes_seq(0x01, 40).try_into().unwrap(),
        }],
        mask_key_shares: vec![RevealedShare {
            owner: 1,
            share: bytes_seq(0x51, 40).try_into().unwrap(),
        }],
    };
    cases.push(codec_case(
        "unmask response",
        "client",
        "UnmaskResponse",
        serde_json::to_value(&resp).unwrap(),
        &cli(&ClientMessage::UnmaskResponse(resp.clone())),
    ));
    write(
        "codec.json",
        "protocol-spec §4.3. Each message (its fields, as serde_json renders the Rust type; byte arrays \
         as arrays of numbers, enums externally tagged) and its exact wire bytes (tag byte then body). \
         Encoding the message must give bytes_hex and decoding bytes_hex must give the message.",
        cases,
    );
    // Bad codec cases.
    let mut bad = Vec::new();
    let b = |name: &str, dir: &str, bytes: &[u8], err: Value| json!({"name": name, "direction": dir, "bytes_hex": h(bytes), "error": err});
    bad.push(b("empty message", "client", &[], json!({"Empty": null})));
    bad.push(b("empty message", "server", &[], json!({"Empty": null})));
    bad.push(b(
        "unknown tag 0x05",
        "server",
        &[0x05, 0, 0],
        json!({"UnknownTag": 5}),
    ));
    bad.push(b(
        "client-to-server tag given to decode_server",
        "server",
        &[0x13, 8, 0, 0, 0, 0],
        json!({"UnknownTag": 0x13}),
    ));
    bad.push(b(
        "server-to-client tag given to decode_client",
        "client",
        &setup_bytes,
        json!({"UnknownTag": 1}),
    ));
    bad.push(b(
        "unknown tag 0xff",
        "client",
        &[0xff],
        json!({"UnknownTag": 0xff}),
    ));
    bad.push(b(
        "setup truncated by one byte",
        "server",
        &setup_bytes[..setup_bytes.len() - 1],
        json!({"Malformed": null}),
    ));
    bad.push(b(
        "setup tag only",
        "server",
        &setup_bytes[..1],
        json!({"Malformed": null}),
    ));
    let mut trailing = setup_bytes.clone();
    trailing.push(0);
    bad.push(b(
        "setup with one trailing byte",
        "server",
        &trailing,
        json!({"Malformed": null}),
    ));
    let adv_bytes = cli(&ClientMessage::AdvertiseKeys(adv.clone()));
    bad.push(b(
        "advertise keys truncated inside the signature",
        "client",
        &adv_bytes[..adv_bytes.len() - 10],
        json!({"Malformed": null}),
    ));
    let mut adv_trailing = adv_bytes.clone();
    adv_trailing.extend_from_slice(&[1, 2]);
    bad.push(b(
        "advertise keys with trailing bytes",
        "client",
        &adv_trailing,
        json!({"Malformed": null}),
    ));
    let mut bad_variant = vec![0x0f];
    bad_variant.extend_from_slice(&4u32.to_le_bytes());
    bad.push(b(
        "abort with variant index 4",
        "server",
        &bad_variant,
        json!({"Malformed": null}),
    ));
    let mut bad_stage = vec![0x0f];
    bad_stage.extend_from_slice(&0u32.to_le_bytes());
    bad_stage.extend_from_slice(&4u32.to_le_bytes());
    bad_stage.extend_from_slice(&[2, 0, 0, 0, 3, 0, 0, 0]);
    bad.push(b(
        "abort with stage index 4",
        "server",
        &bad_stage,
        json!({"Malformed": null}),
    ));
    let mut bad_utf8 = vec![0x0f];
    bad_utf8.extend_from_slice(&3u32.to_le_bytes());
    bad_utf8.extend_from_slice(&2u64.to_le_bytes());
    bad_utf8.extend_from_slice(&[0xc3, 0x28]);
    bad.push(b(
        "cancelled detail is not UTF-8",
        "server",
        &bad_utf8,
        json!({"Malformed": null}),
    ));
    let sk_bytes = cli(&ClientMessage::ShareKeys(sk.clone()));
    bad.push(b(
        "share keys truncated inside the self-mask commitment",
        "client",
        &sk_bytes[..sk_bytes.len() - 1],
        json!({"Malformed": null}),
    ));
    let mut no_commitment = vec![0x12];
    no_commitment.extend_from_slice(&0u64.to_le_bytes());
    bad.push(b(
        "share keys without the self-mask commitment",
        "client",
        &no_commitment,
        json!({"Malformed": null}),
    ));
    let mut sk_trailing = sk_bytes.clone();
    sk_trailing.push(0);
    bad.push(b(
        "share keys with a trailing byte",
        "client",
        &sk_trailing,
        json!({"Malformed": null}),
    ));
    let mut huge = vec![0x12];
    huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bad.push(b(
        "share keys claiming 2^40 entries",
        "client",
        &huge,
        json!({"Malformed": null}),
    ));
    let mut ur_bytes = srv(&ServerMessage::UnmaskRequest(ur.clone()));
    ur_bytes.truncate(ur_bytes.len() - 2);
    bad.push(b(
        "unmask request truncated inside a u32",
        "server",
        &ur_bytes,
        json!({"Malformed": null}),
    ));
    bad.push(b(
        "masked input header too short",
        "client",
        &[0x13, 16, 1, 0, 0],
        json!({"Malformed": null}),
    ));
    bad.push(b(
        "masked input ring width 12",
        "client",
        &[0x13, 12, 0, 0, 0, 0],
        json!({"BadRingBits": 12}),
    ));
    bad.push(b(
        "masked input ring width 0",
        "client",
        &[0x13, 0, 1, 0, 0, 0, 0],
        json!({"BadRingBits": 0}),
    ));
    bad.push(b(
        "masked input ring width 64",
        "client",
        &[0x13, 64, 0, 0, 0, 0],
        json!({"BadRingBits": 64}),
    ));
    bad.push(b(
        "masked input count 2^28 + 1",
        "client",
        &[0x13, 8, 1, 0, 0, 0x10],
        json!({"VectorTooLong": (1u32 << 28) + 1}),
    ));
    bad.push(b(
        "masked input one byte short",
        "client",
        &[0x13, 16, 2, 0, 0, 0, 1, 2, 3],
        json!({"VectorLength": {"expected": 4, "got": 3}}),
    ));
    bad.push(b(
        "masked input one byte long",
        "client",
        &[0x13, 24, 1, 0, 0, 0, 1, 2, 3, 4],
        json!({"VectorLength": {"expected": 3, "got": 4}}),
    ));
    bad.push(b(
        "masked input count 0 with payload",
        "client",
        &[0x13, 32, 0, 0, 0, 0, 9],
        json!({"VectorLength": {"expected": 0, "got": 1}}),
    ));
    bad
}

/// Inputs of the small round used by `round.json` and `bad_unmask_request.json`.
fn small_round_config(nonce_start: u8) -> (RoundConfig, Vec<ClientInput>) {
    let mut req = ParamRequest::new(4);
    req.weight_bound = 5;
    let params = derive(&req).unwrap().params;
    let config = RoundConfig {
        round: 3,
        nonce: arr32(nonce_start),
        num_clients: 4,
        params,
        manifest: vec![
            TensorSpec {
                name: "lora_A".into(),
                shape: vec![2, 2],
            },
            TensorSpec {
                name: "lora_B".into(),
                shape: vec![2],
            },
        ],
    };
    let values: [[f32; 6]; 4] = [
        [0.5, -0.25, 0.125, 1.0, -1.0, 0.0],
        [0.1, 0.2, -0.3, 0.4, -0.5, 1.5],
        [-0.75, 0.75, 0.0, 0.3, -0.9, 0.05],
        [0.0, 0.0, 0.0, -0.125, 0.625, -2.0],
    ];
    let weights = [1u32, 5, 3, 2];
    let inputs = values
        .iter()
        .zip(weights)
        .map(|(v, w)| ClientInput {
            values: v.to_vec(),
            weight: w,
        })
        .collect();
    (config, inputs)
}

fn config_json(c: &RoundConfig) -> Value {
    json!({
        "round": c.round, "nonce_hex": h(&c.nonce), "num_clients": c.num_clients,
        "params": params_json(&c.params),
        "manifest": c.manifest.iter().map(|t| json!({"name": t.name, "shape": t.shape})).collect::<Vec<_>>(),
    })
}

fn inputs_json(inputs: &[ClientInput]) -> Value {
    json!(inputs
        .iter()
        .map(|i| json!({"values": i.values, "values_f32_hex": i.values.iter().map(|&v| f32_hex(v)).collect::<Vec<_>>(), "weight": i.weight}))
        .collect::<Vec<_>>())
}

fn gen_round() {
    let (config, inputs) = small_round_config(0xc0);
    let mut cases = Vec::new();
    for (name, drop_at, seed) in [
        (
            "client 2 drops at the upload stage",
            vec![None, None, Some(Stage::MaskedInput), None],
            2024u64,
        ),
        ("no dropout", vec![None; 4], 2025),
    ] {
        let mut hns = Harness::new(config.clone(), inputs.clone(), drop_at.clone(), seed).unwrap();
        let outcome = hns.run(None);
        assert!(hns.server_errors.is_empty() && hns.client_errors.is_empty());
        let Outcome::Finished(agg) = outcome else {
            panic!("round aborted: {outcome:?}")
        };
        let sid = hns.server().session_id().unwrap();
        cases.push(json!({
            "name": name, "config": config_json(&config), "inputs": inputs_json(&inputs),
            "drop_at": drop_at.iter().map(|s| s.map(|s| s.name())).collect::<Vec<_>>(),
            "harness_seed": seed,
            "session_id_hex": h(&sid.0),
            "survivors": agg.survivors, "dropped": agg.dropped, "sum": agg.sum,
            "weight_sum": agg.weight_sum, "mean": agg.mean,
            "mean_f32_hex": agg.mean.iter().map(|&m| f32_hex(m)).collect::<Vec<_>>(),
            "error_bound": agg.error_bound, "masks_removed": agg.masks_removed,
            "bytes_up": hns.bytes_up, "bytes_down": hns.bytes_down,
        }));
    }
    write(
        "round.json",
        "protocol-spec §4: one whole round through fedlora_secagg::harness::Harness::new(config, inputs, \
         drop_at, harness_seed).run(None) (client i's RNG is ChaCha20Rng::seed_from_u64 of the i-th \
         next_u64 of ChaCha20Rng::seed_from_u64(harness_seed); a client dropping at a stage sends \
         nothing for it or later). Outputs: the server's session id, survivors U3, dropped U2\\U3, the \
         unmasked ring sum of the value words, the weight sum, the mean (binary32 bits in \
         mean_f32_hex), error bound, masks removed, and the wire bytes each client sent and received. \
         The sum depends on the clients' stochastic rounding, hence on the RNG; the mean must be within \
         error_bound of the weighted mean of the clipped inputs of the survivors.",
        cases,
    );
}

/// Runs the small round of the unmask-request vectors until the server emits its request.
fn drive_to_unmask(drop_at_share: Option<u32>) -> (Vec<Client>, UnmaskRequest) {
    let (config, inputs) = small_round_config(0xd0);
    support::drive_to_unmask(config, inputs, drop_at_share)
}

fn variant_name(e: &impl std::fmt::Debug) -> String {
    format!("{e:?}")
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// (name, client withholding its ShareKeys, recipient, requests, expected error).
type UnmaskSpec = (
    &'static str,
    Option<u32>,
    u32,
    Vec<UnmaskRequest>,
    &'static str,
);

fn gen_bad_unmask() -> Vec<Value> {
    let (config, inputs) = small_round_config(0xd0);
    let req = |s: &[u32], d: &[u32]| UnmaskRequest {
        survivors: s.to_vec(),
        dropped: d.to_vec(),
    };
    let mut cases = Vec::new();
    // (name, scenario drop, client, requests, expected error)
    let specs: Vec<UnmaskSpec> = vec![
        (
            "client listed as both survivor and dropped",
            None,
            0,
            vec![req(&[0, 1, 2, 3], &[2])],
            "UnsafeUnmaskRequest",
        ),
        (
            "overlap on the client itself",
            None,
            1,
            vec![req(&[0, 1, 2, 3], &[1])],
            "UnsafeUnmaskRequest",
        ),
        (
            "survivors not sorted",
            None,
            0,
            vec![req(&[1, 0, 2, 3], &[])],
            "UnsafeUnmaskRequest",
        ),
        (
            "duplicate survivor",
            None,
            0,
            vec![req(&[0, 1, 1, 2, 3], &[])],
            "UnsafeUnmaskRequest",
        ),
        (
            "dropped not sorted",
            None,
            0,
            vec![req(&[0, 1], &[3, 2])],
            "UnsafeUnmaskRequest",
        ),
        (
            "recipient not listed as a survivor",
            None,
            0,
            vec![req(&[1, 2, 3], &[0])],
            "UnsafeUnmaskRequest",
        ),
        (
            "recipient missing from both lists",
            None,
            0,
            vec![req(&[1, 2, 3], &[])],
            "UnsafeUnmaskRequest",
        ),
        (
            "a neighbour that shared is in neither list",
            None,
            0,
            vec![req(&[0, 1, 2], &[])],
            "UnsafeUnmaskRequest",
        ),
        (
            "a neighbour that never shared is listed as dropped",
            Some(3),
            0,
            vec![req(&[0, 1, 2], &[3])],
            "UnsafeUnmaskRequest",
        ),
        (
            "a neighbour that never shared is listed as survivor",
            Some(3),
            1,
            vec![req(&[0, 1, 2, 3], &[])],
            "UnsafeUnmaskRequest",
        ),
        (
            "too few live holders (all neighbours dropped)",
            None,
            0,
            vec![req(&[0], &[1, 2, 3])],
            "BelowThreshold",
        ),
        (
            "too few live holders (one survivor neighbour)",
            None,
            2,
            vec![req(&[1, 2], &[0, 3])],
            "BelowThreshold",
        ),
        (
            "second request after a valid one",
            None,
            0,
            vec![req(&[0, 1, 2, 3], &[]), req(&[0, 1, 2], &[3])],
            "Finished",
        ),
        (
            "second identical request",
            None,
            3,
            vec![req(&[0, 1, 2, 3], &[]), req(&[0, 1, 2, 3], &[])],
            "Finished",
        ),
    ];
    for (name, drop, client, requests, expected) in specs {
        let (mut clients, real) = drive_to_unmask(drop);
        // The server's own request is valid: survivors are everyone that uploaded.
        let expected_real = if drop.is_some() {
            req(&[0, 1, 2], &[])
        } else {
            req(&[0, 1, 2, 3], &[])
        };
        assert_eq!(real, expected_real);
        let c = &mut clients[client as usize];
        let last = requests.len() - 1;
        let mut got: Option<ClientError> = None;
        for (k, r) in requests.iter().enumerate() {
            let res = c.handle_message(ServerMessage::UnmaskRequest(r.clone()));
            if k < last {
                res.unwrap();
            } else {
                got = res.err();
            }
        }
        let got = got.unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(variant_name(&got), expected, "{name}: {got:?}");
        let mut case = json!({
            "name": name,
            "scenario": if drop.is_some() { "client 3 drops at the share stage" } else { "no dropout" },
            "drop_at_share": drop, "client": client,
            "requests": requests.iter().map(|r| json!({"survivors": r.survivors, "dropped": r.dropped})).collect::<Vec<_>>(),
            "error": expected,
        });
        if let ClientError::BelowThreshold { have, threshold } = got {
            case["have"] = json!(have);
            case["threshold"] = json!(threshold);
        }
        cases.push(case);
    }
    let _ = inputs;
    let mut header = config_json(&config);
    header["inputs"] = inputs_json(&small_round_config(0xd0).1);
    cases.insert(
        0,
        json!({"setup": header, "client_rng": "client i: ChaCha20Rng::seed_from_u64(100 + i)"}),
    );
    cases
}

fn gen_bad_shamir() -> Vec<Value> {
    let mut bad = Vec::new();
    let mut nf = [0u8; 40];
    nf[16..24].copy_from_slice(&PRIME.to_le_bytes());
    bad.push(json!({"name": "chunk 2 equals p", "op": "parse", "holder": 4, "share_hex": h(&nf), "error": "NotAFieldElement", "holder_in_error": 4}));
    let max = [0xffu8; 40];
    bad.push(json!({"name": "all bytes 0xff", "op": "parse", "holder": 0, "share_hex": h(&max), "error": "NotAFieldElement", "holder_in_error": 0}));
    let mut last = [0u8; 40];
    last[32..40].copy_from_slice(&(1u64 << 61).to_le_bytes());
    bad.push(json!({"name": "chunk 4 equals 2^61", "op": "parse", "holder": 9, "share_hex": h(&last), "error": "NotAFieldElement", "holder_in_error": 9}));
    // Real shares for the combine cases.
    let mut rng = ChaCha20Rng::from_seed(arr32(0x77));
    let shares = shamir::split(&Seed::from_bytes(arr32(0x08)), 3, &[0, 1, 2, 3], &mut rng).unwrap();
    let sj = |s: &Share| json!({"holder": s.holder, "values": s.values});
    bad.push(
        json!({"name": "two shares, threshold 3", "op": "combine", "threshold": 3,
        "shares": [sj(&shares[0]), sj(&shares[1])], "error": "TooFewShares", "got": 2}),
    );
    bad.push(json!({"name": "no shares", "op": "combine", "threshold": 1, "shares": [], "error": "TooFewShares", "got": 0}));
    bad.push(json!({"name": "duplicate holder among three", "op": "combine", "threshold": 3,
        "shares": [sj(&shares[1]), sj(&shares[0]), sj(&shares[1])], "error": "DuplicateHolder", "holder_in_error": 1}));
    bad.push(json!({"name": "duplicate holder beyond the first t", "op": "combine", "threshold": 2,
        "shares": [sj(&shares[0]), sj(&shares[1]), sj(&shares[3]), sj(&shares[3])], "error": "DuplicateHolder", "holder_in_error": 3}));
    bad.push(json!({"name": "threshold 0", "op": "combine", "threshold": 0, "shares": [sj(&shares[0])], "error": "ZeroThreshold"}));
    bad.push(json!({"name": "threshold 0", "op": "split", "threshold": 0, "holders": [0, 1], "secret_hex": h(&[0u8; 32]), "error": "ZeroThreshold"}));
    bad.push(
        json!({"name": "chunk 4 reconstructs to 2^32", "op": "combine", "threshold": 1,
        "shares": [{"holder": 0, "values": [0, 0, 0, 0, 1u64 << 32]}], "error": "Inconsistent"}),
    );
    bad.push(
        json!({"name": "chunk 0 reconstructs to 2^56", "op": "combine", "threshold": 1,
        "shares": [{"holder": 5, "values": [1u64 << 56, 0, 0, 0, 0]}], "error": "Inconsistent"}),
    );
    // A tampered share among the t used: the range check catches this one.
    let mut tampered = shares[1].clone();
    tampered.values[4] = (tampered.values[4] + (1 << 40)) % PRIME;
    // (A shift by +1 instead moves the secret's chunk 4 by -3 and passes the range check: the check
    // is not an integrity check, protocol-spec §3.5.)
    let mut small = shares[1].clone();
    small.values[4] = (small.values[4] + 1) % PRIME;
    let passed = shamir::combine(&[shares[0].clone(), small, shares[2].clone()], 3);
    assert!(passed.is_ok_and(|s| s.expose() != &arr32(0x08)));
    let picked = vec![shares[0].clone(), tampered.clone(), shares[2].clone()];
    assert_eq!(
        shamir::combine(&picked, 3).unwrap_err(),
        shamir::ShamirError::Inconsistent
    );
    bad.push(
        json!({"name": "one share's chunk 4 shifted by 2^40", "op": "combine", "threshold": 3,
        "shares": picked.iter().map(sj).collect::<Vec<_>>(), "error": "Inconsistent"}),
    );
    bad
}

fn gen_bad_params() -> Vec<Value> {
    let mut bad = Vec::new();
    let base = derive(&ParamRequest::new(10)).unwrap().params; // degree 9, threshold 6, 24/19
    let v = |name: &str, p: RoundParams, n: u32, err: &str| {
        json!({"name": name, "function": "validate", "params": {
            "degree": p.degree, "threshold": p.threshold, "ring_bits": p.ring_bits, "quant_bits": p.quant_bits,
            "clip": p.clip.to_string(), "clip_f32_hex": f32_hex(p.clip), "weight_bound": p.weight_bound},
            "num_clients": n, "error": err})
    };
    let with = |f: &dyn Fn(&mut RoundParams)| {
        let mut p = base.clone();
        f(&mut p);
        p
    };
    bad.push(v(
        "minority threshold (5 of 10)",
        with(&|p| p.threshold = 5),
        10,
        "BadThreshold",
    ));
    bad.push(v(
        "threshold 0",
        with(&|p| p.threshold = 0),
        10,
        "BadThreshold",
    ));
    bad.push(v(
        "threshold above the neighbourhood",
        with(&|p| p.threshold = 11),
        10,
        "BadThreshold",
    ));
    bad.push(v(
        "minority of a sparse neighbourhood (2 of 5)",
        with(&|p| {
            p.degree = 4;
            p.threshold = 2
        }),
        10,
        "BadThreshold",
    ));
    bad.push(v(
        "degree 0, threshold 1 (each input unmasked from its owner's share)",
        with(&|p| {
            p.degree = 0;
            p.threshold = 1
        }),
        10,
        "BadDegree",
    ));
    bad.push(v(
        "odd sparse degree 3",
        with(&|p| {
            p.degree = 3;
            p.threshold = 3
        }),
        10,
        "BadDegree",
    ));
    bad.push(v(
        "degree 1 of 10",
        with(&|p| {
            p.degree = 1;
            p.threshold = 2
        }),
        10,
        "BadDegree",
    ));
    bad.push(v(
        "odd degree 7 with a threshold that is no majority",
        with(&|p| {
            p.degree = 7;
            p.threshold = 1
        }),
        10,
        "BadDegree",
    ));
    bad.push(v(
        "ring too narrow for 10 clients at 19 bits",
        with(&|p| p.ring_bits = 16),
        10,
        "BadRingBits",
    ));
    bad.push(v(
        "ring width 12",
        with(&|p| p.ring_bits = 12),
        10,
        "BadRingBits",
    ));
    bad.push(v(
        "ring width 64",
        with(&|p| p.ring_bits = 64),
        10,
        "BadRingBits",
    ));
    bad.push(v(
        "quant_bits 1",
        with(&|p| p.quant_bits = 1),
        10,
        "BadRingBits",
    ));
    bad.push(v(
        "weight sum does not fit",
        with(&|p| p.weight_bound = 1 << 20),
        10,
        "BadRingBits",
    ));
    bad.push(v("NaN clip", with(&|p| p.clip = f32::NAN), 10, "BadClip"));
    bad.push(v("zero clip", with(&|p| p.clip = 0.0), 10, "BadClip"));
    bad.push(v("negative clip", with(&|p| p.clip = -1.0), 10, "BadClip"));
    bad.push(v(
        "infinite clip",
        with(&|p| p.clip = f32::INFINITY),
        10,
        "BadClip",
    ));
    bad.push(v(
        "zero weight bound",
        with(&|p| p.weight_bound = 0),
        10,
        "ZeroWeightBound",
    ));
    bad.push(v("one client", base.clone(), 1, "TooFewClients"));
    let d = |name: &str, f: &dyn Fn(&mut ParamRequest), n: u32, err: &str| {
        let mut r = ParamRequest::new(n);
        f(&mut r);
        json!({"name": name, "function": "derive", "request": {
            "clients": r.clients, "expected_dropout": r.expected_dropout.to_string(),
            "corrupt_fraction": r.corrupt_fraction.to_string(), "security_bits": r.security_bits.to_string(),
            "failure_bits": r.failure_bits.to_string(), "clip": r.clip.to_string(), "weight_bound": r.weight_bound,
            "min_quant_bits": r.min_quant_bits, "max_quant_bits": r.max_quant_bits,
            "ring_bits": r.ring_bits}, "error": err})
    };
    bad.push(d(
        "NaN dropout rate",
        &|r| r.expected_dropout = f64::NAN,
        10,
        "BadRate",
    ));
    bad.push(d(
        "NaN corrupt fraction",
        &|r| r.corrupt_fraction = f64::NAN,
        10,
        "BadRate",
    ));
    bad.push(d(
        "dropout rate 1",
        &|r| r.expected_dropout = 1.0,
        10,
        "BadRate",
    ));
    bad.push(d(
        "negative corrupt fraction",
        &|r| r.corrupt_fraction = -0.1,
        10,
        "BadRate",
    ));
    bad.push(d(
        "rates sum to 1",
        &|r| {
            r.expected_dropout = 0.6;
            r.corrupt_fraction = 0.4
        },
        10,
        "BadRate",
    ));
    bad.push(d(
        "zero security bits",
        &|r| r.security_bits = 0.0,
        10,
        "BadExponent",
    ));
    bad.push(d(
        "NaN failure bits",
        &|r| r.failure_bits = f64::NAN,
        10,
        "BadExponent",
    ));
    bad.push(d(
        "infinite clip",
        &|r| r.clip = f32::INFINITY,
        10,
        "BadClip",
    ));
    bad.push(d(
        "zero weight bound",
        &|r| r.weight_bound = 0,
        10,
        "ZeroWeightBound",
    ));
    bad.push(d("one client", &|_| {}, 1, "TooFewClients"));
    bad.push(d(
        "2^20 clients at 16 bits need a 37-bit ring",
        &|_| {},
        1 << 20,
        "RingTooNarrow",
    ));
    bad.push(d(
        "weight bound 2^32-1",
        &|r| r.weight_bound = u32::MAX,
        1024,
        "RingTooNarrow",
    ));
    bad.push(d(
        "forced 16-bit ring for 10 clients",
        &|r| r.ring_bits = Some(16),
        10,
        "BadRingBits",
    ));
    bad.push(d(
        "forced 12-bit ring",
        &|r| r.ring_bits = Some(12),
        10,
        "BadRingBits",
    ));
    bad.push(d(
        "precision cap 8 below min_quant_bits 16",
        &|r| r.max_quant_bits = Some(8),
        10,
        "BadExponent",
    ));
    bad.push(d(
        "precision cap 1 with min_quant_bits 1",
        &|r| {
            r.min_quant_bits = 1;
            r.max_quant_bits = Some(1)
        },
        10,
        "BadExponent",
    ));
    bad.push(d(
        "ring too narrow is reported before a bad cap",
        &|r| {
            r.ring_bits = Some(16);
            r.max_quant_bits = Some(0)
        },
        10,
        "BadRingBits",
    ));
    bad
}

fn write_bad(name: &str, description: &str, cases: Vec<Value>) {
    write(name, description, cases);
}

fn gen_graph() {
    use fedlora_secagg::graph::NeighbourGraph;
    let mut cases = Vec::new();
    let specs: Vec<(u8, Vec<u32>, u32)> = vec![
        (0x01, (0..10).collect(), 4),
        (0x02, vec![0, 2, 3, 5, 8, 9, 11, 12, 15, 20, 21, 30], 6),
        (0x03, (0..10).collect(), 5),
        (0x04, vec![1, 2, 3, 4, 6], 4),
        (0x05, vec![0, 1, 2, 3, 4, 5, 6], 2),
    ];
    for (sb, members, degree) in specs {
        let sid = SessionId(arr32(sb));
        let seed = kdf::graph_seed(&sid);
        let g = NeighbourGraph::new(&seed, &members, degree);
        // Ring order from the text of protocol-spec §5.1.
        let mut keyed: Vec<([u8; 32], u32)> = members
            .iter()
            .map(|&id| {
                let mut hsh = Sha256::new();
                hsh.update(seed);
                hsh.update(id.to_le_bytes());
                (hsh.finalize().into(), id)
            })
            .collect();
        keyed.sort();
        let ring: Vec<u32> = keyed.iter().map(|(_, id)| *id).collect();
        let m = ring.len();
        let half = (degree / 2) as usize;
        let complete = degree as usize + 1 >= m || 2 * half + 1 >= m;
        assert_eq!(complete, g.is_complete());
        let mut neighbours = serde_json::Map::new();
        for (p, &id) in ring.iter().enumerate() {
            let mut want: Vec<u32> = if complete {
                ring.iter().copied().filter(|&x| x != id).collect()
            } else {
                (1..=half)
                    .flat_map(|d| [ring[(p + d) % m], ring[(p + m - d) % m]])
                    .collect()
            };
            want.sort_unstable();
            assert_eq!(
                want,
                g.neighbours(id),
                "§5.1 text disagrees with NeighbourGraph"
            );
            neighbours.insert(id.to_string(), json!(want));
        }
        cases.push(json!({
            "session_id_hex": h(&sid.0), "graph_seed_hex": h(&seed), "members": members,
            "degree": degree,
            "ring_keys_hex": keyed.iter().map(|(k, _)| h(k)).collect::<Vec<_>>(),
            "ring_order": ring, "complete": complete, "neighbours": neighbours,
        }));
    }
    write(
        "graph.json",
        "protocol-spec §5.1: graph_seed = SHA-256(label(graph) || sid); ring order = members sorted by \
         SHA-256(graph_seed || LE32(id)) (ring_keys_hex, in ring order); complete iff degree + 1 >= m \
         or 2*floor(degree/2) + 1 >= m; otherwise the floor(degree/2) nearest ring positions on each \
         side. neighbours: each member's neighbour list, sorted by id.",
        cases,
    );
}

fn main() {
    std::fs::create_dir_all(out_dir()).unwrap();
    gen_kdf();
    gen_prg();
    gen_graph();
    gen_shamir();
    let bad_box = gen_share_box();
    gen_quantization();
    gen_params();
    let bad_codec = gen_codec();
    gen_round();
    write_bad(
        "bad_codec.json",
        "protocol-spec §4.3, §6: bytes that decode_client (direction 'client': client-to-server \
         messages) or decode_server (direction 'server') must reject, with the DecodeError variant \
         named in 'error' (its fields where they are not free text; Malformed carries text).",
        bad_codec,
    );
    write_bad(
        "bad_share_box.json",
        "protocol-spec §3.6, §6.2: share_box::open(key, session, sender, receiver, ciphertext) must fail \
         with OpenError::Unauthentic, or OpenError::Share(NotAFieldElement(holder)) where named. The \
         genuine box is the first case of share_box.json.",
        bad_box,
    );
    write_bad(
        "bad_shamir.json",
        "protocol-spec §3.5: 'parse' = Share::from_bytes(holder, share), 'combine' = combine(shares, \
         threshold), 'split' = split(secret, threshold, holders); each must fail with the named \
         ShamirError (holder_in_error / got give the variant's fields).",
        gen_bad_shamir(),
    );
    write_bad(
        "bad_params.json",
        "protocol-spec §5.2, §5.5: 'validate' = params::validate(params, num_clients); 'derive' = \
         derive(request). Floating-point fields are strings parsed by Rust's str::parse (NaN, inf). Each \
         must fail with the named ParamError variant.",
        gen_bad_params(),
    );
    write_bad(
        "bad_unmask_request.json",
        "protocol-spec §4.1.4, §6.3: the first case describes the round (RoundConfig and inputs; \
         clients seeded as stated). Each later case runs that round (client 3 withholding its ShareKeys \
         when drop_at_share is 3) until the server emits its unmask request, then feeds the listed \
         requests to 'client' instead: all but the last must be accepted, the last must fail with the \
         named ClientError variant.",
        gen_bad_unmask(),
    );
}
