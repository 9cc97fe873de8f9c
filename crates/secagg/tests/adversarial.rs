//! What a curious server sees, and every way a bad message is refused.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fedlora_secagg::wire::*;
use fedlora_secagg::{
    derive, Client, ClientError, ClientEvent, ClientInput, KeyAuthenticator, ParamRequest,
    RoundParams, Server, ServerError,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn params(n: u32) -> RoundParams {
    let mut req = ParamRequest::new(n);
    req.weight_bound = 10;
    derive(&req).unwrap().params
}

/// Hand-driven round: one server, `n` clients, messages passed without the harness so tests can
/// tamper with them.
struct Manual {
    server: Server,
    clients: Vec<Client>,
}

impl Manual {
    fn new(n: u32, len: u32) -> Self {
        let server = Server::new(config(n, len, params(n))).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let clients = inputs(n, len, 10, 3)
            .into_iter()
            .enumerate()
            .map(|(i, inp)| Client::new(i as u32, inp, &mut rng))
            .collect();
        Manual { server, clients }
    }

    /// Delivers all pending server messages; returns what each client sent back.
    fn deliver_to_clients(&mut self) -> Vec<(u32, ClientMessage)> {
        let mut out = Vec::new();
        while let Some((to, msg)) = self.server.poll_transmit() {
            let c = &mut self.clients[to as usize];
            c.handle_message(msg).unwrap();
            while let Some(m) = c.poll_transmit() {
                out.push((to, m));
            }
        }
        out
    }

    fn deliver_to_server(&mut self, msgs: Vec<(u32, ClientMessage)>) {
        for (from, m) in msgs {
            self.server.handle_message(from, m).unwrap();
        }
    }

    /// Pending server messages without delivering them.
    fn intercept(&mut self) -> Vec<(u32, ServerMessage)> {
        std::iter::from_fn(|| self.server.poll_transmit()).collect()
    }
}

/// The masked vector the server receives from one client is uniform whatever the input: a
/// chi-square test on the low byte of 8,192 words, for an all-zero input and an all-maximum input.
#[test]
fn server_view_of_one_honest_client_is_uniform() {
    for value in [0.0f32, 1.0] {
        let n = 3;
        let len = 8192;
        let mut server = Server::new(config(n, len, params(n))).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut clients: Vec<Client> = (0..n)
            .map(|i| {
                Client::new(
                    i,
                    ClientInput {
                        values: vec![value; len as usize],
                        weight: 1,
                    },
                    &mut rng,
                )
            })
            .collect();
        let mut masked = None;
        for _ in 0..3 {
            let pending: Vec<_> = std::iter::from_fn(|| server.poll_transmit()).collect();
            let mut replies = Vec::new();
            for (to, m) in pending {
                clients[to as usize].handle_message(m).unwrap();
                while let Some(r) = clients[to as usize].poll_transmit() {
                    replies.push((to, r));
                }
            }
            for (from, r) in replies {
                if let (0, ClientMessage::MaskedInput(mi)) = (from, &r) {
                    masked = Some(mi.words.clone());
                }
                server.handle_message(from, r).unwrap();
            }
        }
        let words = masked.expect("client 0 uploaded");
        let mut counts = [0u32; 256];
        for w in &words[..len as usize] {
            counts[(w & 0xff) as usize] += 1;
        }
        let expected = f64::from(len) / 256.0;
        let chi: f64 = counts
            .iter()
            .map(|&o| (f64::from(o) - expected).powi(2) / expected)
            .sum();
        // 255 degrees of freedom: p = 0.001 at 330.5.
        assert!(chi < 330.5, "input {value}: chi-square {chi}");
        // And the unmasked value would have been constant: the mask is what we measured.
        assert!(
            words
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 8000
        );
    }
}

/// In random dropout schedules, no client's two secrets are ever both revealed to the server.
#[test]
fn server_never_receives_both_shares_of_a_client() {
    for seed in 0..6u64 {
        let n = 10;
        let mut m = Manual::new(n, 16);
        let dropped_before_upload = [seed as u32 % n, (seed as u32 * 3 + 1) % n];
        for round_trip in 0..4 {
            let mut replies = m.deliver_to_clients();
            if round_trip == 2 {
                replies.retain(|(from, _)| !dropped_before_upload.contains(from));
            }
            let mut seen_self = std::collections::BTreeSet::new();
            let mut seen_key = std::collections::BTreeSet::new();
            for (_, r) in &replies {
                if let ClientMessage::UnmaskResponse(u) = r {
                    seen_self.extend(u.self_mask_shares.iter().map(|s| s.owner));
                    seen_key.extend(u.mask_key_shares.iter().map(|s| s.owner));
                }
            }
            assert!(
                seen_self.is_disjoint(&seen_key),
                "seed {seed}: both kinds revealed"
            );
            m.deliver_to_server(replies);
            if round_trip == 2 {
                m.server.close_stage();
            }
        }
        let mut finished = false;
        while let Some(e) = m.server.poll_event() {
            finished |= matches!(e, fedlora_secagg::ServerEvent::Finished(_));
        }
        assert!(finished, "seed {seed}");
    }
}

#[test]
fn server_rejects_bad_client_messages_and_goes_on() {
    let mut m = Manual::new(4, 10);
    let adverts = m.deliver_to_clients();
    // Unknown sender, wrong stage.
    assert_eq!(
        m.server.handle_message(9, adverts[0].1.clone()),
        Err(ServerError::UnknownClient(9))
    );
    let masked = ClientMessage::MaskedInput(MaskedInput {
        ring_bits: 24,
        words: vec![0; 11],
    });
    assert!(matches!(
        m.server.handle_message(0, masked.clone()),
        Err(ServerError::WrongStage { .. })
    ));
    // Duplicate.
    let (from, first) = adverts[0].clone();
    m.server.handle_message(from, first.clone()).unwrap();
    assert!(matches!(
        m.server.handle_message(from, first),
        Err(ServerError::Duplicate { .. })
    ));
    m.deliver_to_server(adverts[1..].to_vec());
    // Share keys: misaddressed and truncated shares are malformed.
    let shares = m.deliver_to_clients();
    let (from, ClientMessage::ShareKeys(mut sk)) = shares[0].clone() else {
        panic!()
    };
    sk.shares[0].receiver = from;
    assert!(matches!(
        m.server.handle_message(from, ClientMessage::ShareKeys(sk)),
        Err(ServerError::Malformed { .. })
    ));
    let (from, ClientMessage::ShareKeys(mut sk)) = shares[0].clone() else {
        panic!()
    };
    sk.shares[0].ciphertext.pop();
    assert!(matches!(
        m.server.handle_message(from, ClientMessage::ShareKeys(sk)),
        Err(ServerError::Malformed { .. })
    ));
    m.deliver_to_server(shares);
    // Masked input: wrong length, wrong ring, word outside the ring.
    let uploads = m.deliver_to_clients();
    let bad_len = ClientMessage::MaskedInput(MaskedInput {
        ring_bits: 24,
        words: vec![0; 5],
    });
    assert!(matches!(
        m.server.handle_message(0, bad_len),
        Err(ServerError::Malformed { .. })
    ));
    let bad_ring = ClientMessage::MaskedInput(MaskedInput {
        ring_bits: 16,
        words: vec![0; 11],
    });
    assert!(matches!(
        m.server.handle_message(0, bad_ring),
        Err(ServerError::Malformed { .. })
    ));
    let outside = ClientMessage::MaskedInput(MaskedInput {
        ring_bits: 24,
        words: vec![1 << 24; 11],
    });
    assert!(matches!(
        m.server.handle_message(0, outside),
        Err(ServerError::Malformed { .. })
    ));
    // Client 3 never uploads: it is not expected in the unmask stage.
    let (kept, late): (Vec<_>, Vec<_>) = uploads.into_iter().partition(|(f, _)| *f != 3);
    m.deliver_to_server(kept);
    m.server.close_stage();
    assert!(matches!(
        m.server.handle_message(3, late[0].1.clone()),
        Err(ServerError::WrongStage { .. })
    ));
    // Unmask: a share of a client the responder was not asked about is refused.
    let answers = m.deliver_to_clients();
    let (from, ClientMessage::UnmaskResponse(mut u)) = answers[0].clone() else {
        panic!()
    };
    let stolen = u.self_mask_shares[0].clone();
    u.mask_key_shares.push(RevealedShare {
        owner: from,
        share: stolen.share,
    });
    assert!(matches!(
        m.server
            .handle_message(from, ClientMessage::UnmaskResponse(u)),
        Err(ServerError::Malformed { .. })
    ));
    m.deliver_to_server(answers);
    assert!(m.server.poll_event().is_some());
    assert_eq!(
        m.server.handle_message(0, masked),
        Err(ServerError::RoundOver)
    );
}

fn client_after_setup(n: u32) -> (Manual, Vec<(u32, ClientMessage)>) {
    let mut m = Manual::new(n, 10);
    let adverts = m.deliver_to_clients();
    (m, adverts)
}

#[test]
fn client_refuses_bad_setups() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let input = || ClientInput {
        values: vec![0.5; 10],
        weight: 1,
    };
    let setup = RoundSetup {
        version: PROTOCOL_VERSION,
        round: 1,
        nonce: [0; 32],
        client_id: 0,
        num_clients: 4,
        params: params(4),
        manifest: manifest(10),
    };
    let mut bad = setup.clone();
    bad.version = 9;
    assert!(matches!(
        Client::new(0, input(), &mut rng).handle_message(ServerMessage::Setup(bad)),
        Err(ClientError::Version(9))
    ));
    let mut bad = setup.clone();
    bad.client_id = 2;
    assert!(matches!(
        Client::new(0, input(), &mut rng).handle_message(ServerMessage::Setup(bad)),
        Err(ClientError::WrongRecipient { .. })
    ));
    let mut bad = setup.clone();
    bad.manifest = manifest(11);
    assert!(matches!(
        Client::new(0, input(), &mut rng).handle_message(ServerMessage::Setup(bad)),
        Err(ClientError::ManifestMismatch { .. })
    ));
    let mut bad = setup.clone();
    bad.params.threshold = 1;
    assert!(matches!(
        Client::new(0, input(), &mut rng).handle_message(ServerMessage::Setup(bad)),
        Err(ClientError::Params(_))
    ));
    let mut c = Client::new(
        0,
        ClientInput {
            values: vec![f32::NAN; 10],
            weight: 1,
        },
        &mut rng,
    );
    assert!(matches!(
        c.handle_message(ServerMessage::Setup(setup.clone())),
        Err(ClientError::Quant(_))
    ));
    // After a fatal error, nothing more is accepted.
    assert!(matches!(
        c.handle_message(ServerMessage::Setup(setup.clone())),
        Err(ClientError::Finished)
    ));
    // Out-of-stage messages are ignored without ending the round.
    let mut c = Client::new(0, input(), &mut rng);
    let req = ServerMessage::UnmaskRequest(UnmaskRequest {
        survivors: vec![0],
        dropped: vec![],
    });
    assert!(matches!(
        c.handle_message(req),
        Err(ClientError::UnexpectedMessage { .. })
    ));
    c.handle_message(ServerMessage::Setup(setup)).unwrap();
    assert!(matches!(
        c.poll_transmit(),
        Some(ClientMessage::AdvertiseKeys(_))
    ));
}

#[test]
fn client_refuses_tampered_key_broadcasts() {
    type Tamper = (&'static str, fn(&mut KeyBroadcast));
    let tamper: [Tamper; 4] = [
        ("own keys altered", |kb| kb.keys[0].keys.mask_pk[0] ^= 1),
        ("own keys missing", |kb| {
            kb.keys.remove(0);
        }),
        ("unsorted", |kb| kb.keys.swap(1, 2)),
        ("unknown id", |kb| kb.keys[3].client = 99),
    ];
    for (what, f) in tamper {
        let (mut m, adverts) = client_after_setup(4);
        m.deliver_to_server(adverts);
        let mut pending = m.intercept();
        let (to, ServerMessage::KeyBroadcast(kb)) = &mut pending[0] else {
            panic!()
        };
        f(kb);
        let err = m.clients[*to as usize]
            .handle_message(pending[0].1.clone())
            .unwrap_err();
        assert!(matches!(err, ClientError::InvalidKeys(_)), "{what}: {err}");
        assert!(matches!(
            m.clients[0].poll_event(),
            Some(ClientEvent::Sent(_))
        ));
    }
}

#[test]
fn client_refuses_forged_or_misrouted_shares() {
    let (mut m, adverts) = client_after_setup(4);
    m.deliver_to_server(adverts);
    let shares = m.deliver_to_clients();
    m.deliver_to_server(shares);
    let pending = m.intercept();
    let (to, ServerMessage::ShareBroadcast(sb)) = pending[0].clone() else {
        panic!()
    };
    let mut forged = sb.clone();
    forged.shares[0].ciphertext[3] ^= 0x80;
    let mut c = std::mem::replace(
        &mut m.clients[to as usize],
        Client::new(
            99,
            ClientInput {
                values: vec![],
                weight: 1,
            },
            &mut ChaCha20Rng::seed_from_u64(0),
        ),
    );
    let err = c
        .handle_message(ServerMessage::ShareBroadcast(forged))
        .unwrap_err();
    assert!(matches!(err, ClientError::ShareDecryption(_)), "{err}");

    for f in [
        (|sb: &mut ShareBroadcast| sb.shares[0].receiver += 1) as fn(&mut ShareBroadcast),
        |sb| {
            let d = sb.shares[0].clone();
            sb.shares.push(d);
        },
    ] {
        let (mut m, adverts) = client_after_setup(4);
        m.deliver_to_server(adverts);
        let shares = m.deliver_to_clients();
        m.deliver_to_server(shares);
        let pending = m.intercept();
        let (to, ServerMessage::ShareBroadcast(mut sb)) = pending[0].clone() else {
            panic!()
        };
        f(&mut sb);
        let err = m.clients[to as usize]
            .handle_message(ServerMessage::ShareBroadcast(sb))
            .unwrap_err();
        assert!(matches!(err, ClientError::InvalidShares(_)), "{err}");
    }
}

#[test]
fn client_refuses_unsafe_unmask_requests() {
    let cases: [fn(&mut UnmaskRequest); 4] = [
        // The same client listed both ways would reveal both of its secrets.
        |r| r.dropped.push(r.survivors[1]),
        |r| r.survivors.retain(|&s| s != 0),
        |r| r.survivors.reverse(),
        // A neighbour omitted from both lists.
        |r| {
            r.survivors.pop();
        },
    ];
    for (i, f) in cases.into_iter().enumerate() {
        let (mut m, adverts) = client_after_setup(4);
        m.deliver_to_server(adverts);
        for _ in 0..2 {
            let r = m.deliver_to_clients();
            m.deliver_to_server(r);
        }
        let pending = m.intercept();
        let (_, ServerMessage::UnmaskRequest(mut req)) = pending[0].clone() else {
            panic!()
        };
        f(&mut req);
        let err = m.clients[0]
            .handle_message(ServerMessage::UnmaskRequest(req))
            .unwrap_err();
        assert!(
            matches!(err, ClientError::UnsafeUnmaskRequest(_)),
            "case {i}: {err}"
        );
        assert!(
            m.clients[0].poll_transmit().is_none(),
            "case {i}: nothing may be revealed"
        );
    }
    // A second request after answering one is refused.
    let (mut m, adverts) = client_after_setup(4);
    m.deliver_to_server(adverts);
    for _ in 0..2 {
        let r = m.deliver_to_clients();
        m.deliver_to_server(r);
    }
    let pending = m.intercept();
    let (_, req) = pending[0].clone();
    m.clients[0].handle_message(req.clone()).unwrap();
    assert!(matches!(
        m.clients[0].handle_message(req),
        Err(ClientError::Finished)
    ));
}

/// An authenticator where "signature" is the message's first byte XOR the signer id.
struct ToySignatures(u32);

impl KeyAuthenticator for ToySignatures {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        vec![message.iter().fold(0u8, |a, b| a ^ b) ^ self.0 as u8]
    }
    fn verify(&self, peer: u32, message: &[u8], signature: &[u8]) -> bool {
        signature == [message.iter().fold(0u8, |a, b| a ^ b) ^ peer as u8]
    }
}

#[test]
fn substituted_keys_fail_signature_checks() {
    let n = 3;
    let mut server = Server::new(config(n, 10, params(n))).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut clients: Vec<Client> = inputs(n, 10, 10, 1)
        .into_iter()
        .enumerate()
        .map(|(i, inp)| {
            Client::new(i as u32, inp, &mut rng)
                .with_authenticator(Box::new(ToySignatures(i as u32)))
        })
        .collect();
    let setups: Vec<_> = std::iter::from_fn(|| server.poll_transmit()).collect();
    for (to, m) in setups {
        clients[to as usize].handle_message(m).unwrap();
        let reply = clients[to as usize].poll_transmit().unwrap();
        server.handle_message(to, reply).unwrap();
    }
    let mut pending: Vec<_> = std::iter::from_fn(|| server.poll_transmit()).collect();
    // The server swaps in its own key for client 2.
    let (to, ServerMessage::KeyBroadcast(kb)) = &mut pending[0] else {
        panic!()
    };
    kb.keys[2].keys.cipher_pk = [9; 32];
    let err = clients[*to as usize]
        .handle_message(pending[0].1.clone())
        .unwrap_err();
    assert!(matches!(err, ClientError::BadSignature(2)), "{err}");
    // Untampered broadcasts verify.
    clients[1].handle_message(pending[1].1.clone()).unwrap();
}

/// A wrong share of a self-mask seed would silently change the reconstructed seed; the seed's
/// commitment turns that into a typed abort instead of a wrong aggregate.
#[test]
fn a_wrong_self_mask_share_aborts_the_round() {
    let mut m = Manual::new(4, 10);
    for _ in 0..3 {
        let r = m.deliver_to_clients();
        m.deliver_to_server(r);
    }
    let mut answers = m.deliver_to_clients();
    let (_, ClientMessage::UnmaskResponse(u)) = &mut answers[0] else {
        panic!()
    };
    let victim = u
        .self_mask_shares
        .iter_mut()
        .find(|s| s.owner == 1)
        .unwrap();
    victim.share[0] = victim.share[0].wrapping_add(1);
    m.deliver_to_server(answers);
    let events: Vec<_> = std::iter::from_fn(|| m.server.poll_event()).collect();
    assert!(
        events.contains(&fedlora_secagg::ServerEvent::Aborted(
            AbortReason::ReconstructionFailed { client: 1 }
        )),
        "{events:?}"
    );
}

/// The byte-level entry point rejects what the decoder rejects, and checks packed vectors' shape.
#[test]
fn server_rejects_undecodable_and_misshapen_bytes() {
    let mut m = Manual::new(4, 10);
    assert!(matches!(
        m.server.handle_bytes(0, &[]),
        Err(ServerError::Undecodable { .. })
    ));
    assert!(matches!(
        m.server.handle_bytes(0, &[0x77, 1]),
        Err(ServerError::Undecodable { .. })
    ));
    for _ in 0..2 {
        let r = m.deliver_to_clients();
        m.deliver_to_server(r);
    }
    let uploads = m.deliver_to_clients();
    let (from, msg) = uploads[0].clone();
    let mut bytes = encode_client(&msg).unwrap();
    // Truncated payload, then a consistent header with too few words.
    assert!(matches!(
        m.server.handle_bytes(from, &bytes[..bytes.len() - 1]),
        Err(ServerError::Undecodable { .. })
    ));
    let short = encode_client(&ClientMessage::MaskedInput(MaskedInput {
        ring_bits: 24,
        words: vec![0; 3],
    }))
    .unwrap();
    assert!(matches!(
        m.server.handle_bytes(from, &short),
        Err(ServerError::Malformed { .. })
    ));
    // The real one is accepted once, then is a duplicate.
    m.server.handle_bytes(from, &bytes).unwrap();
    assert!(matches!(
        m.server.handle_bytes(from, &bytes),
        Err(ServerError::Duplicate { .. })
    ));
    bytes[1] = 16;
    assert!(m.server.handle_bytes(from, &bytes).is_err());
}

/// A round can still abort after a client answered its unmask request; the client reports it once.
#[test]
fn abort_after_answering_is_reported_once() {
    let mut m = Manual::new(4, 10);
    for _ in 0..3 {
        let r = m.deliver_to_clients();
        m.deliver_to_server(r);
    }
    let pending = m.intercept();
    let (_, req) = pending[0].clone();
    m.clients[0].handle_message(req).unwrap();
    while m.clients[0].poll_event().is_some() {}
    let abort = ServerMessage::Abort(AbortReason::ReconstructionFailed { client: 2 });
    m.clients[0].handle_message(abort.clone()).unwrap();
    assert_eq!(
        m.clients[0].poll_event(),
        Some(ClientEvent::Aborted(AbortReason::ReconstructionFailed {
            client: 2
        }))
    );
    assert!(matches!(
        m.clients[0].handle_message(abort),
        Err(ClientError::Finished)
    ));
}
