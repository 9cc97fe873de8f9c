//! Key derivation and the session id (protocol-spec §3.1–§3.3).
//!
//! Every label starts with `fedlora/v{PROTOCOL_VERSION}/` so that keys of different protocol versions
//! or purposes can never coincide, and every derivation is salted with the session id so that keys of
//! different rounds can never coincide.

use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use crate::secret::Seed;
use fedlora_wire::{ClientId, PublicKeys, RoundParams, TensorSpec, PROTOCOL_VERSION};

/// A session id: SHA-256 over the round's parameters and every advertised key (protocol-spec §3.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 32]);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Builds the label `fedlora/v0/<purpose>`.
pub fn label(purpose: &str) -> Vec<u8> {
    format!("fedlora/v{PROTOCOL_VERSION}/{purpose}").into_bytes()
}

fn hkdf_into(ikm: &[u8], salt: &[u8], info: &[&[u8]], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let info: Vec<u8> = info.concat();
    // Outputs here are at most 32 bytes, far below HKDF-SHA256's 8160-byte limit.
    #[allow(clippy::expect_used)]
    hk.expand(&info, out)
        .expect("HKDF output length is within limits");
}

/// Implements the session id derivation (protocol-spec §3.2).
///
/// `keys` must be sorted by client id; the server relays them that way and clients check it.
pub fn session_id(
    round: u64,
    nonce: &[u8; 32],
    num_clients: u32,
    params: &RoundParams,
    manifest: &[TensorSpec],
    keys: &[PublicKeys],
) -> SessionId {
    let mut h = Sha256::new();
    h.update(label("session"));
    h.update(PROTOCOL_VERSION.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update(nonce);
    h.update(num_clients.to_le_bytes());
    h.update(params.degree.to_le_bytes());
    h.update(params.threshold.to_le_bytes());
    h.update([params.ring_bits, params.quant_bits]);
    h.update(params.clip.to_le_bytes());
    h.update(params.weight_bound.to_le_bytes());
    h.update((manifest.len() as u64).to_le_bytes());
    for t in manifest {
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update((t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update(d.to_le_bytes());
        }
    }
    h.update((keys.len() as u64).to_le_bytes());
    for k in keys {
        h.update(k.client.to_le_bytes());
        h.update(k.keys.cipher_pk);
        h.update(k.keys.mask_pk);
    }
    SessionId(h.finalize().into())
}

/// Implements the pairwise mask seed derivation (protocol-spec §3.3): HKDF over the X25519 shared
/// secret of the mask keys, bound to the session and the unordered pair.
pub fn pairwise_mask_seed(
    shared: &[u8; 32],
    session: &SessionId,
    a: ClientId,
    b: ClientId,
) -> Seed {
    let (lo, hi) = (a.min(b), a.max(b));
    let mut out = [0u8; 32];
    hkdf_into(
        shared,
        &session.0,
        &[&label("pair-seed"), &lo.to_le_bytes(), &hi.to_le_bytes()],
        &mut out,
    );
    Seed::from_bytes(out)
}

/// Implements the share encryption key derivation (protocol-spec §3.6): HKDF over the X25519 shared
/// secret of the cipher keys, bound to the session and the unordered pair; 16 bytes for AES-128-GCM.
pub fn share_key(
    shared: &[u8; 32],
    session: &SessionId,
    a: ClientId,
    b: ClientId,
) -> zeroize::Zeroizing<[u8; 16]> {
    let (lo, hi) = (a.min(b), a.max(b));
    let mut out = zeroize::Zeroizing::new([0u8; 16]);
    hkdf_into(
        shared,
        &session.0,
        &[&label("share-key"), &lo.to_le_bytes(), &hi.to_le_bytes()],
        out.as_mut(),
    );
    out
}

/// Implements the PRG key derivation (protocol-spec §3.4): the AES-128 key that expands a mask seed
/// is HKDF of the full 32-byte seed, so all of the seed's entropy reaches the cipher.
pub fn prg_key(seed: &Seed, session: &SessionId) -> zeroize::Zeroizing<[u8; 16]> {
    let mut out = zeroize::Zeroizing::new([0u8; 16]);
    hkdf_into(
        seed.expose(),
        &session.0,
        &[&label("prg-key")],
        out.as_mut(),
    );
    out
}

/// Implements the neighbour-graph seed (protocol-spec §5.1): a public value every party derives
/// from the session id.
pub fn graph_seed(session: &SessionId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label("graph"));
    h.update(session.0);
    h.finalize().into()
}

/// Implements the self-mask commitment (protocol-spec §3.7):
/// `SHA-256(label("self-mask-commitment") ‖ session ‖ client ‖ seed)`.
pub fn self_mask_commitment(seed: &Seed, session: &SessionId, client: ClientId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label("self-mask-commitment"));
    h.update(session.0);
    h.update(client.to_le_bytes());
    h.update(seed.expose());
    h.finalize().into()
}

/// The bytes a client signs to bind its round keys to its long-term identity (protocol-spec §8.3).
pub fn advertise_signing_bytes(
    round: u64,
    nonce: &[u8; 32],
    client: ClientId,
    cipher_pk: &[u8; 32],
    mask_pk: &[u8; 32],
) -> Vec<u8> {
    let mut m = label("advertise");
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(&client.to_le_bytes());
    m.extend_from_slice(cipher_pk);
    m.extend_from_slice(mask_pk);
    m
}
