//! Message types of one SecAgg+ round (protocol-spec §4.1 and §4.2).
//!
//! Stages, in order: the server sends [`RoundSetup`]; clients answer [`AdvertiseKeys`]; the server
//! relays all keys in a [`KeyBroadcast`]; clients send encrypted Shamir shares in [`ShareKeys`]; the
//! server forwards each client the shares addressed to it in a [`ShareBroadcast`]; clients send
//! their [`MaskedInput`]; the server sends an [`UnmaskRequest`]; clients answer with an
//! [`UnmaskResponse`]. An [`AbortReason`] can end the round at any stage.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A client's index in one round, `0..num_clients` (protocol-spec §2.2).
pub type ClientId = u32;

/// Length in bytes of one Shamir share of a 32-byte secret (protocol-spec §3.5): five field
/// elements of GF(2^61 - 1), each a little-endian `u64`.
pub const SHARE_BYTES: usize = 40;

/// The protocol stages, in order (protocol-spec §2.3). The numeric value is the one encoded on the
/// wire and fed into labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// Clients advertise two X25519 public keys.
    AdvertiseKeys,
    /// Clients send encrypted Shamir shares of their self-mask seed and mask secret key.
    ShareKeys,
    /// Clients send their masked, quantized input.
    MaskedInput,
    /// Surviving clients reveal the shares the server needs to remove the masks.
    Unmask,
}

impl Stage {
    /// All stages in protocol order.
    pub const ALL: [Stage; 4] = [
        Stage::AdvertiseKeys,
        Stage::ShareKeys,
        Stage::MaskedInput,
        Stage::Unmask,
    ];

    /// The stage's name as used on the command line and in JSON reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::AdvertiseKeys => "advertise",
            Stage::ShareKeys => "share",
            Stage::MaskedInput => "upload",
            Stage::Unmask => "unmask",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One named tensor of the input: an adapter's `lora_A` or `lora_B` matrix, say. The input vector
/// is the concatenation of all tensors, row-major, in manifest order (protocol-spec §2.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name, e.g. `base_model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    /// Dimensions; the product is the number of elements.
    pub shape: Vec<u32>,
}

/// Numeric parameters of a round, fixed by the server before it starts (protocol-spec §5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundParams {
    /// Number of neighbours of each client in the masking graph, not counting itself (even, or
    /// `num_clients - 1` for the complete graph of classic SecAgg).
    pub degree: u32,
    /// Shamir threshold: shares needed to reconstruct a secret (protocol-spec §5.2).
    pub threshold: u32,
    /// The ring is Z_{2^ring_bits}; one of 8, 16, 24, 32 (protocol-spec §5.3).
    pub ring_bits: u8,
    /// Fixed-point precision: a value of magnitude `clip` maps to 2^(quant_bits - 1) ring units.
    pub quant_bits: u8,
    /// Values are clipped into `[-clip, clip]` before quantization.
    pub clip: f32,
    /// Largest weight a client may carry (example count, say); bounds the weight sum.
    pub weight_bound: u32,
}

/// The server's first message of a round to one client (protocol-spec §4.2.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSetup {
    /// Protocol version; a client refuses any other.
    pub version: u16,
    /// Round number, unique per server.
    pub round: u64,
    /// Fresh random value per round so that session ids never repeat.
    pub nonce: [u8; 32],
    /// The recipient's id in this round.
    pub client_id: ClientId,
    /// Number of clients invited to the round; ids are `0..num_clients`.
    pub num_clients: u32,
    /// Numeric parameters.
    pub params: RoundParams,
    /// Layout of the input vector.
    pub manifest: Vec<TensorSpec>,
}

/// A client's two public keys for one round (protocol-spec §4.1.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// X25519 public key for encrypting shares client-to-client.
    pub cipher_pk: [u8; 32],
    /// X25519 public key for the pairwise mask agreement.
    pub mask_pk: [u8; 32],
    /// Signature over the keys by the client's long-term identity (protocol-spec §8); empty when
    /// the deployment runs without identities.
    pub signature: Vec<u8>,
}

/// One client's advertised keys as the server relays them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeys {
    /// Whose keys these are.
    pub client: ClientId,
    /// The keys and signature exactly as the client sent them.
    pub keys: AdvertiseKeys,
}

/// All keys the server received in the advertise stage, sorted by client id (protocol-spec §4.2.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBroadcast {
    /// One entry per client that advertised keys.
    pub keys: Vec<PublicKeys>,
}

/// An AES-GCM-encrypted pair of Shamir shares from `sender` to `receiver` (protocol-spec §3.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The client whose secrets are shared.
    pub sender: ClientId,
    /// The neighbour who will hold the shares.
    pub receiver: ClientId,
    /// AES-128-GCM ciphertext with its 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// A client's encrypted shares, one per neighbour (protocol-spec §4.1.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    /// One entry per neighbour that advertised keys.
    pub shares: Vec<EncryptedShare>,
    /// Hash commitment to the self-mask seed (protocol-spec §3.7), so the server can tell a
    /// correctly reconstructed seed from one built with a wrong share.
    pub self_mask_commitment: [u8; 32],
}

/// The encrypted shares addressed to one client (protocol-spec §4.2.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareBroadcast {
    /// One entry per neighbour whose shares reached the server.
    pub shares: Vec<EncryptedShare>,
}

/// A client's masked, quantized input: ring elements in `Z_{2^ring_bits}` (protocol-spec §4.1.3).
/// On the wire each word takes exactly `ring_bits / 8` little-endian bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedInput {
    /// Ring width of the words; must match the round's parameters.
    pub ring_bits: u8,
    /// `len + 1` words: the weighted values, then the weight.
    pub words: Vec<u32>,
}

/// Which secrets the server asks a client to reveal (protocol-spec §4.2.4). Both lists are sorted
/// and disjoint; a client refuses any request where they overlap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Clients whose masked input arrived: reveal shares of their self-mask seeds.
    pub survivors: Vec<ClientId>,
    /// Clients that shared keys but sent no masked input: reveal shares of their mask keys.
    pub dropped: Vec<ClientId>,
}

/// One revealed Shamir share (protocol-spec §4.1.4).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct RevealedShare {
    /// The client whose secret this is a share of.
    pub owner: ClientId,
    /// The share's value; its evaluation point is the sender's id plus one.
    #[serde(with = "share_bytes")]
    pub share: [u8; SHARE_BYTES],
}

impl std::fmt::Debug for RevealedShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevealedShare")
            .field("owner", &self.owner)
            .field("share", &"<redacted>")
            .finish()
    }
}

/// A client's answer to an [`UnmaskRequest`] (protocol-spec §4.1.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// Shares of surviving neighbours' self-mask seeds.
    pub self_mask_shares: Vec<RevealedShare>,
    /// Shares of dropped neighbours' mask secret keys.
    pub mask_key_shares: Vec<RevealedShare>,
}

/// Why a round ended without an aggregate (protocol-spec §6). Sent to every client still connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// Fewer clients than the threshold took part in a stage.
    TooFewSurvivors {
        /// The stage that closed with too few messages.
        stage: Stage,
        /// Clients whose message for the stage arrived.
        survivors: u32,
        /// The threshold.
        threshold: u32,
    },
    /// A client's secret is held by fewer live neighbours than the threshold, so it could not be
    /// reconstructed.
    NeighbourhoodBelowThreshold {
        /// The stage after which the shortfall was found.
        stage: Stage,
        /// Whose secret is at risk.
        client: ClientId,
        /// Live neighbours holding a share.
        holders: u32,
        /// The threshold.
        threshold: u32,
    },
    /// Reconstructed shares of a client's secret were inconsistent: the mask key did not match the
    /// advertised public key, or the self-mask seed did not match its commitment (a wrong share was
    /// revealed).
    ReconstructionFailed {
        /// Whose secret failed to reconstruct.
        client: ClientId,
    },
    /// The operator or the runtime ended the round (shutdown, restart, deadline of the whole round).
    Cancelled {
        /// Free text for the audit log.
        detail: String,
    },
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortReason::TooFewSurvivors {
                stage,
                survivors,
                threshold,
            } => write!(
                f,
                "too few survivors after stage {stage}: {survivors} < threshold {threshold}"
            ),
            AbortReason::NeighbourhoodBelowThreshold {
                stage,
                client,
                holders,
                threshold,
            } => write!(
                f,
                "after stage {stage}, client {client}'s secrets are held by {holders} live neighbours < threshold {threshold}"
            ),
            AbortReason::ReconstructionFailed { client } => {
                write!(f, "shares of client {client}'s secret are inconsistent")
            }
            AbortReason::Cancelled { detail } => write!(f, "round cancelled: {detail}"),
        }
    }
}

/// Messages from the server to one client.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerMessage {
    /// Round parameters and the recipient's id.
    Setup(RoundSetup),
    /// Everyone's public keys.
    KeyBroadcast(KeyBroadcast),
    /// The shares addressed to the recipient.
    ShareBroadcast(ShareBroadcast),
    /// Which secrets to reveal.
    UnmaskRequest(UnmaskRequest),
    /// The round is over without an aggregate.
    Abort(AbortReason),
}

impl ServerMessage {
    /// The stage this message opens or belongs to; `None` for [`ServerMessage::Abort`] and
    /// [`ServerMessage::Setup`].
    pub fn stage(&self) -> Option<Stage> {
        match self {
            ServerMessage::Setup(_) | ServerMessage::Abort(_) => None,
            ServerMessage::KeyBroadcast(_) => Some(Stage::ShareKeys),
            ServerMessage::ShareBroadcast(_) => Some(Stage::MaskedInput),
            ServerMessage::UnmaskRequest(_) => Some(Stage::Unmask),
        }
    }
}

/// Messages from a client to the server.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    /// Stage 1.
    AdvertiseKeys(AdvertiseKeys),
    /// Stage 2.
    ShareKeys(ShareKeys),
    /// Stage 3.
    MaskedInput(MaskedInput),
    /// Stage 4.
    UnmaskResponse(UnmaskResponse),
}

impl ClientMessage {
    /// The stage this message answers.
    pub fn stage(&self) -> Stage {
        match self {
            ClientMessage::AdvertiseKeys(_) => Stage::AdvertiseKeys,
            ClientMessage::ShareKeys(_) => Stage::ShareKeys,
            ClientMessage::MaskedInput(_) => Stage::MaskedInput,
            ClientMessage::UnmaskResponse(_) => Stage::Unmask,
        }
    }
}

/// serde for `[u8; 40]` as a fixed 40-byte tuple (serde's derives stop at 32-element arrays).
mod share_bytes {
    use super::SHARE_BYTES;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; SHARE_BYTES], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(SHARE_BYTES)?;
        for b in bytes {
            t.serialize_element(b)?;
        }
        t.end()
    }

    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = [u8; SHARE_BYTES];

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{SHARE_BYTES} bytes")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = [0u8; SHARE_BYTES];
            for (i, slot) in out.iter_mut().enumerate() {
                *slot = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(i, &self))?;
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; SHARE_BYTES], D::Error> {
        d.deserialize_tuple(SHARE_BYTES, V)
    }
}
