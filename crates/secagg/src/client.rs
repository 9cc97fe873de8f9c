//! The client's state machine (protocol-spec §4.1).
//!
//! A [`Client`] is created with its input and a source of randomness, then fed every message the
//! server sends with [`Client::handle_message`]. After each call the caller drains
//! [`Client::poll_transmit`] (messages to send to the server) and [`Client::poll_event`] (progress
//! and the end of the round). The client never reads a clock or a socket.
//!
//! Its one safety rule (protocol-spec §6.3): it answers at most one unmask request, and only one
//! whose survivor and dropped lists are disjoint, so the server can never hold both the self-mask
//! share and the mask-key share of any client from this client.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use fedlora_wire::{
    AbortReason, AdvertiseKeys, ClientId, ClientMessage, EncryptedShare, KeyBroadcast, MaskedInput,
    RevealedShare, RoundSetup, ShareBroadcast, ShareKeys, Stage, UnmaskRequest, UnmaskResponse,
    PROTOCOL_VERSION,
};

use crate::graph::NeighbourGraph;
use crate::kdf::{self, SessionId};
use crate::params::{self, ParamError};
use crate::prg::{apply_masks, MaskKey, Sign};
use crate::quant::{QuantError, Quantizer};
use crate::secret::Seed;
use crate::shamir::{self, ShamirError};
use crate::share_box::{self, OpenError, SharePair};
use crate::{manifest_len, KeyAuthenticator, RingNoise};

/// A client's private input: its flattened tensors (in manifest order) and its weight.
/// Zeroized on drop: this is the raw adapter no one else may see.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ClientInput {
    /// Flattened tensor values, concatenated in manifest order.
    pub values: Vec<f32>,
    /// The client's weight (e.g. its number of training examples), `1..=weight_bound`.
    pub weight: u32,
}

impl std::fmt::Debug for ClientInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientInput")
            .field("values", &format_args!("<{} redacted>", self.values.len()))
            .field("weight", &self.weight)
            .finish()
    }
}

/// What went wrong on the client. All but [`ClientError::UnexpectedMessage`] end the client's round.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A message arrived that does not fit the current stage; it is ignored.
    #[error("unexpected {got} message while {state}")]
    UnexpectedMessage {
        /// What arrived.
        got: &'static str,
        /// Where the client is.
        state: &'static str,
    },
    /// The server speaks another protocol version.
    #[error("server uses protocol version {0}, this client speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The setup names another client id than the one this client was created with.
    #[error("setup addressed to client {got}, this is client {expected}")]
    WrongRecipient {
        /// This client's id.
        expected: ClientId,
        /// The id in the setup.
        got: ClientId,
    },
    /// The manifest's total length differs from the input's.
    #[error("manifest describes {manifest} values but the input has {input}")]
    ManifestMismatch {
        /// Elements the manifest describes.
        manifest: u64,
        /// Elements in the input.
        input: usize,
    },
    /// The round parameters are unsafe or inconsistent.
    #[error("refusing round parameters: {0}")]
    Params(#[from] ParamError),
    /// The input could not be quantized.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The noise hook failed.
    #[error("noise hook failed: {0}")]
    Noise(String),
    /// The key broadcast is malformed: unsorted, duplicated, unknown ids, or missing or altering
    /// this client's own keys.
    #[error("invalid key broadcast: {0}")]
    InvalidKeys(String),
    /// A peer's key signature does not verify.
    #[error("signature of client {0}'s keys does not verify")]
    BadSignature(ClientId),
    /// A share broadcast is malformed (wrong addressee, non-neighbour, duplicate).
    #[error("invalid share broadcast: {0}")]
    InvalidShares(String),
    /// A share from a neighbour failed to decrypt or authenticate.
    #[error("shares from client {0} failed to open")]
    ShareDecryption(ClientId),
    /// Key agreement produced a non-contributory (all-zero) secret: a low-order public key.
    #[error("key agreement with client {0} is not contributory")]
    WeakKey(ClientId),
    /// The unmask request would reveal too much, or is inconsistent with what this client saw.
    #[error("refusing unmask request: {0}")]
    UnsafeUnmaskRequest(String),
    /// Too few neighbours remain for the threshold.
    #[error("only {have} neighbours (with this client) remain, threshold is {threshold}")]
    BelowThreshold {
        /// Live neighbourhood size.
        have: usize,
        /// The threshold.
        threshold: u32,
    },
    /// Sharing failed (threshold zero; cannot happen with validated parameters).
    #[error(transparent)]
    Shamir(#[from] ShamirError),
    /// The client's round is over (finished, aborted or failed); nothing more is accepted.
    #[error("the round is over for this client")]
    Finished,
    /// A client created with [`Client::deferred`] reached the masked-input step without
    /// [`Client::provide_input`] having been called.
    #[error("the masked input is due but no input was provided")]
    InputMissing,
    /// [`Client::provide_input`] was called twice, before the setup, or after the masked input.
    #[error("input cannot be provided while {0}")]
    InputNotExpected(&'static str),
}

/// What a client reports to its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The client sent its message for this stage.
    Sent(Stage),
    /// The client answered the unmask request: its part of the round is done.
    Done,
    /// The server aborted the round.
    Aborted(AbortReason),
    /// The client refused to continue (the error was returned from `handle_message`).
    Failed(String),
}

struct Keys {
    cipher_sk: StaticSecret,
    mask_sk: StaticSecret,
}

struct AwaitKeys {
    setup: RoundSetup,
    /// The quantized (and noised) input; `None` until a deferred client is given its input.
    words: Option<Zeroizing<Vec<u32>>>,
    keys: Keys,
    advertised: AdvertiseKeys,
}

struct AwaitShares {
    setup: RoundSetup,
    /// As in [`AwaitKeys`].
    words: Option<Zeroizing<Vec<u32>>>,
    keys: Keys,
    session: SessionId,
    neighbour_keys: BTreeMap<ClientId, AdvertiseKeys>,
    self_seed: Seed,
    own_pair: SharePair,
}

struct AwaitUnmask {
    setup: RoundSetup,
    neighbours: BTreeSet<ClientId>,
    /// Shares held for each neighbour that shared with us (the live set U2 as this client saw it).
    held: BTreeMap<ClientId, SharePair>,
    own_pair: SharePair,
}

enum State {
    /// `None` for a client created with [`Client::deferred`].
    AwaitSetup(Option<ClientInput>),
    AwaitKeys(Box<AwaitKeys>),
    AwaitShares(Box<AwaitShares>),
    AwaitUnmask(Box<AwaitUnmask>),
    Over,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitSetup(_) => "awaiting setup",
            State::AwaitKeys(_) => "awaiting keys",
            State::AwaitShares(_) => "awaiting shares",
            State::AwaitUnmask(_) => "awaiting unmask request",
            State::Over => "finished",
        }
    }
}

/// One client's side of one round (protocol-spec §4.1).
pub struct Client {
    id: ClientId,
    state: State,
    rng: ChaCha20Rng,
    authenticator: Option<Box<dyn KeyAuthenticator>>,
    noise: Option<Box<dyn RingNoise>>,
    /// Trailing input values that the noise hook never sees (public weight words of an aggregation
    /// rule, e.g. rank-partition indicators), on top of the protocol's own weight word.
    noise_free_tail: usize,
    outbox: VecDeque<ClientMessage>,
    events: VecDeque<ClientEvent>,
    /// The client answered the unmask request; the server may still abort the round afterwards
    /// (e.g. a failed reconstruction), and the caller should hear of it.
    answered: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

fn fresh_secret<R: RngCore + ?Sized>(rng: &mut R) -> StaticSecret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(bytes.as_mut());
    StaticSecret::from(*bytes)
}

impl Client {
    /// Creates the client `id` with its private input. `rng` seeds the client's own ChaCha20 generator
    /// (for keys, seeds, shares and stochastic rounding); pass the operating system's generator in
    /// production and a seeded one in tests.
    pub fn new<R: CryptoRng + ?Sized>(id: ClientId, input: ClientInput, rng: &mut R) -> Self {
        Self::with_state(id, State::AwaitSetup(Some(input)), rng)
    }

    /// Creates the client `id` without its input, which [`Client::provide_input`] supplies later,
    /// at any time before the share broadcast arrives. The early stages (setup, keys, shares) do
    /// not depend on the input, so a driver can run them first and produce each input only when
    /// its masked vector is due: an in-process federation then holds one contribution at a time.
    pub fn deferred<R: CryptoRng + ?Sized>(id: ClientId, rng: &mut R) -> Self {
        Self::with_state(id, State::AwaitSetup(None), rng)
    }

    fn with_state<R: CryptoRng + ?Sized>(id: ClientId, state: State, rng: &mut R) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Client {
            id,
            state,
            rng: ChaCha20Rng::from_seed(*seed),
            authenticator: None,
            noise: None,
            noise_free_tail: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            answered: false,
        }
    }

    /// Signs this client's keys and verifies its peers' (protocol-spec §8.3).
    pub fn with_authenticator(mut self, auth: Box<dyn KeyAuthenticator>) -> Self {
        self.authenticator = Some(auth);
        self
    }

    /// Adds noise to the quantized input before masking (protocol-spec §7).
    pub fn with_noise(mut self, noise: Box<dyn RingNoise>) -> Self {
        self.noise = Some(noise);
        self
    }

    /// Keeps the last `n` input values out of the noise hook: they carry public weights (an
    /// aggregation rule's per-partition weight words), not private values.
    pub fn with_noise_free_tail(mut self, n: usize) -> Self {
        self.noise_free_tail = n;
        self
    }

    /// Whether this client still waits for [`Client::provide_input`] (a deferred client that has
    /// not been given its input and whose masked input is not yet sent).
    pub fn needs_input(&self) -> bool {
        match &self.state {
            State::AwaitSetup(input) => input.is_none(),
            State::AwaitKeys(s) => s.words.is_none(),
            State::AwaitShares(s) => s.words.is_none(),
            State::AwaitUnmask(_) | State::Over => false,
        }
    }

    /// Whether the input is due now: a deferred client without input whose next message is the
    /// share broadcast, on which it sends its masked input.
    pub fn input_due(&self) -> bool {
        matches!(&self.state, State::AwaitShares(s) if s.words.is_none())
    }

    /// Supplies the input of a [`Client::deferred`] client after the setup and before the share
    /// broadcast: it is checked against the manifest, quantized and noised as at setup
    /// (protocol-spec §4.1.1, §5.3, §7.3). On an error the client stops, as for any other.
    pub fn provide_input(&mut self, input: ClientInput) -> Result<(), ClientError> {
        let slot = match &mut self.state {
            State::AwaitKeys(s) if s.words.is_none() => Some((&s.setup, &mut s.words)),
            State::AwaitShares(s) if s.words.is_none() => Some((&s.setup, &mut s.words)),
            _ => None,
        };
        let Some((setup, words)) = slot else {
            return Err(ClientError::InputNotExpected(self.state.name()));
        };
        let setup = setup.clone();
        match prepare_words(
            &setup,
            input,
            self.noise.as_deref_mut(),
            self.noise_free_tail,
            &mut self.rng,
        ) {
            Ok(w) => {
                *words = Some(w);
                Ok(())
            }
            Err(err) => {
                self.state = State::Over;
                self.events.push_back(ClientEvent::Failed(err.to_string()));
                Err(err)
            }
        }
    }

    /// This client's id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Whether the client's round is over.
    pub fn is_over(&self) -> bool {
        matches!(self.state, State::Over)
    }

    /// The next message to send to the server.
    pub fn poll_transmit(&mut self) -> Option<ClientMessage> {
        self.outbox.pop_front()
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Feeds one message from the server. On any error except
    /// [`ClientError::UnexpectedMessage`] the client stops and sends nothing more.
    pub fn handle_message(&mut self, msg: fedlora_wire::ServerMessage) -> Result<(), ClientError> {
        use fedlora_wire::ServerMessage as M;
        if let M::Abort(reason) = msg {
            if matches!(self.state, State::Over) && !std::mem::take(&mut self.answered) {
                return Err(ClientError::Finished);
            }
            self.state = State::Over;
            self.events.push_back(ClientEvent::Aborted(reason));
            return Ok(());
        }
        let state = std::mem::replace(&mut self.state, State::Over);
        let result = match (state, msg) {
            (State::AwaitSetup(input), M::Setup(setup)) => self.on_setup(input, setup),
            (State::AwaitKeys(s), M::KeyBroadcast(kb)) => self.on_keys(*s, kb),
            (State::AwaitShares(s), M::ShareBroadcast(sb)) => self.on_shares(*s, sb),
            (State::AwaitUnmask(s), M::UnmaskRequest(req)) => self.on_unmask(*s, req),
            (State::Over, _) => Err(ClientError::Finished),
            (state, other) => {
                let err = ClientError::UnexpectedMessage {
                    got: server_message_name(&other),
                    state: state.name(),
                };
                self.state = state;
                return Err(err);
            }
        };
        match result {
            Ok(next) => {
                self.state = next;
                Ok(())
            }
            Err(err) => {
                if !matches!(err, ClientError::Finished) {
                    self.events.push_back(ClientEvent::Failed(err.to_string()));
                }
                Err(err)
            }
        }
    }

    /// Implements the setup step (protocol-spec §4.1.1): validate, quantize, add noise, advertise keys.
    fn on_setup(
        &mut self,
        input: Option<ClientInput>,
        setup: RoundSetup,
    ) -> Result<State, ClientError> {
        if setup.version != PROTOCOL_VERSION {
            return Err(ClientError::Version(setup.version));
        }
        if setup.client_id != self.id {
            return Err(ClientError::WrongRecipient {
                expected: self.id,
                got: setup.client_id,
            });
        }
        params::validate(&setup.params, setup.num_clients)?;
        let words = match input {
            Some(input) => Some(prepare_words(
                &setup,
                input,
                self.noise.as_deref_mut(),
                self.noise_free_tail,
                &mut self.rng,
            )?),
            None => None,
        };
        let keys = Keys {
            cipher_sk: fresh_secret(&mut self.rng),
            mask_sk: fresh_secret(&mut self.rng),
        };
        let cipher_pk = PublicKey::from(&keys.cipher_sk).to_bytes();
        let mask_pk = PublicKey::from(&keys.mask_sk).to_bytes();
        let signature = match &self.authenticator {
            Some(auth) => auth.sign(&kdf::advertise_signing_bytes(
                setup.round,
                &setup.nonce,
                self.id,
                &cipher_pk,
                &mask_pk,
            )),
            None => Vec::new(),
        };
        let advertised = AdvertiseKeys {
            cipher_pk,
            mask_pk,
            signature,
        };
        self.outbox
            .push_back(ClientMessage::AdvertiseKeys(advertised.clone()));
        self.events
            .push_back(ClientEvent::Sent(Stage::AdvertiseKeys));
        Ok(State::AwaitKeys(Box::new(AwaitKeys {
            setup,
            words,
            keys,
            advertised,
        })))
    }

    /// Implements the share-keys step (protocol-spec §4.1.2): check the broadcast, derive the session
    /// and graph, share `b` and `s_sk` with the neighbours.
    fn on_keys(&mut self, s: AwaitKeys, kb: KeyBroadcast) -> Result<State, ClientError> {
        let setup = &s.setup;
        let mut prev: Option<ClientId> = None;
        for entry in &kb.keys {
            if prev.is_some_and(|p| p >= entry.client) {
                return Err(ClientError::InvalidKeys(
                    "entries not strictly sorted by client id".into(),
                ));
            }
            prev = Some(entry.client);
            if entry.client >= setup.num_clients {
                return Err(ClientError::InvalidKeys(format!(
                    "client id {} outside the round",
                    entry.client
                )));
            }
        }
        let members: Vec<ClientId> = kb.keys.iter().map(|k| k.client).collect();
        match kb.keys.iter().find(|k| k.client == self.id) {
            Some(mine) if mine.keys == s.advertised => {}
            Some(_) => {
                return Err(ClientError::InvalidKeys(
                    "this client's own keys were altered".into(),
                ))
            }
            None => {
                return Err(ClientError::InvalidKeys(
                    "this client's own keys are missing".into(),
                ))
            }
        }
        if let Some(auth) = &self.authenticator {
            for entry in &kb.keys {
                let msg = kdf::advertise_signing_bytes(
                    setup.round,
                    &setup.nonce,
                    entry.client,
                    &entry.keys.cipher_pk,
                    &entry.keys.mask_pk,
                );
                if !auth.verify(entry.client, &msg, &entry.keys.signature) {
                    return Err(ClientError::BadSignature(entry.client));
                }
            }
        }
        let threshold = setup.params.threshold;
        if (members.len() as u64) < u64::from(threshold) {
            return Err(ClientError::BelowThreshold {
                have: members.len(),
                threshold,
            });
        }
        let session = kdf::session_id(
            setup.round,
            &setup.nonce,
            setup.num_clients,
            &setup.params,
            &setup.manifest,
            &kb.keys,
        );
        let graph = NeighbourGraph::new(&kdf::graph_seed(&session), &members, setup.params.degree);
        let neighbours = graph.neighbours(self.id);
        if neighbours.len() + 1 < threshold as usize {
            return Err(ClientError::BelowThreshold {
                have: neighbours.len() + 1,
                threshold,
            });
        }
        let neighbour_keys: BTreeMap<ClientId, AdvertiseKeys> = kb
            .keys
            .into_iter()
            .filter(|k| neighbours.binary_search(&k.client).is_ok())
            .map(|k| (k.client, k.keys))
            .collect();

        let self_seed = Seed::random(&mut self.rng);
        let mask_sk_bytes = Seed::from_bytes(s.keys.mask_sk.to_bytes());
        let mut holders = neighbours.clone();
        holders.push(self.id);
        let t = threshold as usize;
        let b_shares = shamir::split(&self_seed, t, &holders, &mut self.rng)?;
        let s_shares = shamir::split(&mask_sk_bytes, t, &holders, &mut self.rng)?;
        let mut shares = Vec::with_capacity(neighbours.len());
        let mut own_pair = None;
        for (b, sk) in b_shares.into_iter().zip(s_shares) {
            let pair = SharePair {
                self_mask: b,
                mask_key: sk,
            };
            let holder = pair.self_mask.holder;
            if holder == self.id {
                own_pair = Some(pair);
                continue;
            }
            let peer = neighbour_keys.get(&holder).ok_or_else(|| {
                ClientError::InvalidKeys(format!("neighbour {holder} has no keys"))
            })?;
            let key = share_key(
                &s.keys.cipher_sk,
                &peer.cipher_pk,
                &session,
                self.id,
                holder,
            )?;
            shares.push(EncryptedShare {
                sender: self.id,
                receiver: holder,
                ciphertext: share_box::seal(&key, &session, self.id, holder, &pair),
            });
        }
        let own_pair = own_pair.ok_or_else(|| ClientError::InvalidKeys("no own share".into()))?;
        let self_mask_commitment = kdf::self_mask_commitment(&self_seed, &session, self.id);
        self.outbox.push_back(ClientMessage::ShareKeys(ShareKeys {
            shares,
            self_mask_commitment,
        }));
        self.events.push_back(ClientEvent::Sent(Stage::ShareKeys));
        Ok(State::AwaitShares(Box::new(AwaitShares {
            setup: s.setup,
            words: s.words,
            keys: s.keys,
            session,
            neighbour_keys,
            self_seed,
            own_pair,
        })))
    }

    /// Implements the masked-input step (protocol-spec §4.1.3): open the neighbours' shares, then
    /// send `x + PRG(b) + Σ ± PRG(s_ij)` over the neighbours that shared.
    fn on_shares(&mut self, s: AwaitShares, sb: ShareBroadcast) -> Result<State, ClientError> {
        let mut held = BTreeMap::new();
        for share in &sb.shares {
            if share.receiver != self.id {
                return Err(ClientError::InvalidShares(format!(
                    "share addressed to {}",
                    share.receiver
                )));
            }
            let Some(peer) = s.neighbour_keys.get(&share.sender) else {
                return Err(ClientError::InvalidShares(format!(
                    "share from non-neighbour {}",
                    share.sender
                )));
            };
            if held.contains_key(&share.sender) {
                return Err(ClientError::InvalidShares(format!(
                    "two shares from {}",
                    share.sender
                )));
            }
            let key = share_key(
                &s.keys.cipher_sk,
                &peer.cipher_pk,
                &s.session,
                self.id,
                share.sender,
            )?;
            let pair = share_box::open(&key, &s.session, share.sender, self.id, &share.ciphertext)
                .map_err(|e| match e {
                    OpenError::Unauthentic | OpenError::Share(_) => {
                        ClientError::ShareDecryption(share.sender)
                    }
                })?;
            held.insert(share.sender, pair);
        }
        let threshold = s.setup.params.threshold;
        if held.len() + 1 < threshold as usize {
            return Err(ClientError::BelowThreshold {
                have: held.len() + 1,
                threshold,
            });
        }
        let mut masks = Vec::with_capacity(held.len() + 1);
        masks.push(MaskKey::new(&s.self_seed, &s.session, Sign::Plus));
        for &peer in held.keys() {
            let pk = &s.neighbour_keys[&peer].mask_pk;
            let seed = pairwise_seed(&s.keys.mask_sk, pk, &s.session, self.id, peer)?;
            masks.push(MaskKey::new(
                &seed,
                &s.session,
                Sign::pairwise(self.id, peer),
            ));
        }
        let mut words = s.words.ok_or(ClientError::InputMissing)?;
        apply_masks(&mut words, &masks);
        let ring_mask = crate::quant::ring_mask(s.setup.params.ring_bits);
        let masked: Vec<u32> = words.iter().map(|w| w & ring_mask).collect();
        drop(words);
        self.outbox
            .push_back(ClientMessage::MaskedInput(MaskedInput {
                ring_bits: s.setup.params.ring_bits,
                words: masked,
            }));
        self.events.push_back(ClientEvent::Sent(Stage::MaskedInput));
        Ok(State::AwaitUnmask(Box::new(AwaitUnmask {
            neighbours: s.neighbour_keys.keys().copied().collect(),
            setup: s.setup,
            held,
            own_pair: s.own_pair,
        })))
    }

    /// Implements the unmask step (protocol-spec §4.1.4 and the safety rule of §6.3).
    fn on_unmask(&mut self, s: AwaitUnmask, req: UnmaskRequest) -> Result<State, ClientError> {
        let unsafe_req = |m: String| Err(ClientError::UnsafeUnmaskRequest(m));
        for list in [&req.survivors, &req.dropped] {
            if list.windows(2).any(|w| w[0] >= w[1]) {
                return unsafe_req("lists must be strictly sorted".into());
            }
        }
        let survivors: BTreeSet<ClientId> = req.survivors.iter().copied().collect();
        let dropped: BTreeSet<ClientId> = req.dropped.iter().copied().collect();
        if let Some(both) = survivors.intersection(&dropped).next() {
            return unsafe_req(format!(
                "client {both} is listed as both survivor and dropped"
            ));
        }
        if !survivors.contains(&self.id) {
            return unsafe_req("this client is not listed as a survivor".into());
        }
        for &id in survivors.iter().chain(&dropped) {
            if id != self.id && s.neighbours.contains(&id) && !s.held.contains_key(&id) {
                return unsafe_req(format!("neighbour {id} never shared keys with this client"));
            }
        }
        let mut live = 1usize;
        let mut self_mask_shares = vec![RevealedShare {
            owner: self.id,
            share: *s.own_pair.self_mask.to_bytes(),
        }];
        let mut mask_key_shares = Vec::new();
        for (&owner, pair) in &s.held {
            if survivors.contains(&owner) {
                live += 1;
                self_mask_shares.push(RevealedShare {
                    owner,
                    share: *pair.self_mask.to_bytes(),
                });
            } else if dropped.contains(&owner) {
                mask_key_shares.push(RevealedShare {
                    owner,
                    share: *pair.mask_key.to_bytes(),
                });
            } else {
                return unsafe_req(format!("neighbour {owner} is neither survivor nor dropped"));
            }
        }
        let threshold = s.setup.params.threshold;
        if live < threshold as usize {
            return Err(ClientError::BelowThreshold {
                have: live,
                threshold,
            });
        }
        self.outbox
            .push_back(ClientMessage::UnmaskResponse(UnmaskResponse {
                self_mask_shares,
                mask_key_shares,
            }));
        self.events.push_back(ClientEvent::Sent(Stage::Unmask));
        self.events.push_back(ClientEvent::Done);
        self.answered = true;
        Ok(State::Over)
    }
}

/// Checks the input against the setup's manifest, quantizes it (protocol-spec §5.3) and adds this
/// client's noise share inside the ring (§7.3). The protocol's weight word and the last
/// `noise_free_tail` values are left without noise.
fn prepare_words(
    setup: &RoundSetup,
    input: ClientInput,
    noise: Option<&mut (dyn RingNoise + 'static)>,
    noise_free_tail: usize,
    rng: &mut ChaCha20Rng,
) -> Result<Zeroizing<Vec<u32>>, ClientError> {
    let manifest = manifest_len(&setup.manifest);
    if manifest != input.values.len() as u64 {
        return Err(ClientError::ManifestMismatch {
            manifest,
            input: input.values.len(),
        });
    }
    let quantizer = Quantizer::new(&setup.params);
    let (mut words, _stats) = quantizer.quantize(&input.values, input.weight, rng)?;
    drop(input);
    if let Some(noise) = noise {
        let values = (words.len() - 1).saturating_sub(noise_free_tail);
        noise
            .add_noise(&mut words[..values], setup, rng)
            .map_err(ClientError::Noise)?;
        let mask = quantizer.ring_mask();
        words[..values].iter_mut().for_each(|w| *w &= mask);
    }
    Ok(words)
}

fn server_message_name(m: &fedlora_wire::ServerMessage) -> &'static str {
    use fedlora_wire::ServerMessage as M;
    match m {
        M::Setup(_) => "setup",
        M::KeyBroadcast(_) => "key broadcast",
        M::ShareBroadcast(_) => "share broadcast",
        M::UnmaskRequest(_) => "unmask request",
        M::Abort(_) => "abort",
    }
}

/// X25519 followed by the share-key KDF; refuses non-contributory agreements.
fn share_key(
    sk: &StaticSecret,
    peer_pk: &[u8; 32],
    session: &SessionId,
    me: ClientId,
    peer: ClientId,
) -> Result<Zeroizing<[u8; 16]>, ClientError> {
    let shared = sk.diffie_hellman(&PublicKey::from(*peer_pk));
    if !shared.was_contributory() {
        return Err(ClientError::WeakKey(peer));
    }
    Ok(kdf::share_key(shared.as_bytes(), session, me, peer))
}

/// X25519 followed by the pairwise-seed KDF; refuses non-contributory agreements.
pub(crate) fn pairwise_seed(
    sk: &StaticSecret,
    peer_pk: &[u8; 32],
    session: &SessionId,
    me: ClientId,
    peer: ClientId,
) -> Result<Seed, ClientError> {
    let shared = sk.diffie_hellman(&PublicKey::from(*peer_pk));
    if !shared.was_contributory() {
        return Err(ClientError::WeakKey(peer));
    }
    Ok(kdf::pairwise_mask_seed(
        shared.as_bytes(),
        session,
        me,
        peer,
    ))
}
