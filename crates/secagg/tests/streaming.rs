//! A masked input streamed in pieces (protocol-spec §4.3.2, streaming) counts exactly as the whole
//! message would, and an upload that does not complete never counts.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use fedlora_secagg::wire::*;
use fedlora_secagg::{derive, Aggregate, Client, ParamRequest, Server, ServerError, ServerEvent};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const N: u32 = 6;
const LEN: u32 = 257;

/// Each client's encoded masked input, by client id.
type Uploads = Vec<(u32, Vec<u8>)>;

/// A round driven by hand up to the masked-input stage; returns the server and each client's
/// encoded masked input. Deterministic: two calls give the same round.
fn round_at_upload() -> (Server, Vec<Client>, Uploads) {
    let mut req = ParamRequest::new(N);
    req.weight_bound = 10;
    let params = derive(&req).unwrap().params;
    let mut server = Server::new(config(N, LEN, params)).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut clients: Vec<Client> = inputs(N, LEN, 10, 7)
        .into_iter()
        .enumerate()
        .map(|(i, inp)| Client::new(i as u32, inp, &mut rng))
        .collect();
    let mut replies = Vec::new();
    for stage in 0..3 {
        replies.clear();
        while let Some((to, msg)) = server.poll_transmit() {
            let c = &mut clients[to as usize];
            c.handle_message(msg).unwrap();
            while let Some(m) = c.poll_transmit() {
                replies.push((to, m));
            }
        }
        if stage < 2 {
            for (from, m) in replies.drain(..) {
                server.handle_message(from, m).unwrap();
            }
        }
    }
    let uploads = replies
        .into_iter()
        .map(|(from, m)| (from, encode_client(&m).unwrap()))
        .collect();
    (server, clients, uploads)
}

/// Runs the unmask stage and returns the aggregate.
fn finish(mut server: Server, mut clients: Vec<Client>) -> Box<Aggregate> {
    let mut replies = Vec::new();
    while let Some((to, msg)) = server.poll_transmit() {
        let c = &mut clients[to as usize];
        c.handle_message(msg).unwrap();
        while let Some(m) = c.poll_transmit() {
            replies.push((to, m));
        }
    }
    for (from, m) in replies {
        server.handle_message(from, m).unwrap();
    }
    while let Some(ev) = server.poll_event() {
        if let ServerEvent::Finished(a) = ev {
            return a;
        }
    }
    panic!("round did not finish");
}

fn stream(server: &mut Server, from: u32, bytes: &[u8], cuts: &[usize]) {
    let (ring_bits, count) =
        masked_input_shape(&bytes[..MASKED_INPUT_PREFIX_BYTES], bytes.len() as u64)
            .unwrap()
            .unwrap();
    server.begin_masked_input(from, ring_bits, count).unwrap();
    let words = &bytes[MASKED_INPUT_PREFIX_BYTES..];
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (words.len() + 1)).collect();
    cuts.sort_unstable();
    let mut at = 0;
    for c in cuts.into_iter().chain([words.len()]) {
        server
            .masked_input_piece(from, Bytes::copy_from_slice(&words[at..c]))
            .unwrap();
        at = c;
    }
    server.end_masked_input(from).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Law: streamed in any pieces, the round's aggregate is the one whole messages give.
    #[test]
    fn streamed_uploads_give_the_whole_message_aggregate(
        cuts in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..8), N as usize),
    ) {
        let (mut whole, clients_w, uploads) = round_at_upload();
        for (from, bytes) in &uploads {
            whole.handle_bytes(*from, bytes).unwrap();
        }
        let expected = finish(whole, clients_w);

        let (mut streamed, clients_s, uploads) = round_at_upload();
        for ((from, bytes), cuts) in uploads.iter().zip(&cuts) {
            stream(&mut streamed, *from, bytes, cuts);
        }
        let got = finish(streamed, clients_s);
        prop_assert_eq!(got.sum, expected.sum);
        prop_assert_eq!(got.survivors, expected.survivors);
    }
}

/// An upload still arriving when the stage closes is taken back out: the aggregate is the one of a
/// round where that client never uploaded.
#[test]
fn an_unfinished_upload_never_counts() {
    let (mut reference, clients_r, uploads) = round_at_upload();
    for (from, bytes) in &uploads[1..] {
        reference.handle_bytes(*from, bytes).unwrap();
    }
    reference.close_stage();
    let expected = finish(reference, clients_r);

    let (mut server, clients, uploads) = round_at_upload();
    let (from0, bytes0) = &uploads[0];
    let (ring_bits, count) = masked_input_shape(bytes0, bytes0.len() as u64)
        .unwrap()
        .unwrap();
    server.begin_masked_input(*from0, ring_bits, count).unwrap();
    let words = &bytes0[MASKED_INPUT_PREFIX_BYTES..];
    server
        .masked_input_piece(
            *from0,
            Bytes::copy_from_slice(&words[..words.len() / 2 + 1]),
        )
        .unwrap();
    for (from, bytes) in &uploads[1..] {
        server.handle_bytes(*from, bytes).unwrap();
    }
    assert_eq!(server.uploads_in_progress(), vec![*from0]);
    server.close_stage();
    assert!(server.uploads_in_progress().is_empty());
    let got = finish(server, clients);
    assert_eq!(got.survivors, expected.survivors);
    assert!(!got.survivors.contains(from0));
    assert_eq!(got.sum, expected.sum);
    assert_eq!(got.mean, expected.mean);
}

/// Every misuse of the streaming entry points is refused with a typed error, and none of them
/// leaves bytes in the sum.
#[test]
fn streaming_misuse_is_refused() {
    let (mut server, clients, uploads) = round_at_upload();
    let (from, bytes) = uploads[0].clone();
    let words = &bytes[MASKED_INPUT_PREFIX_BYTES..];
    let (ring_bits, count) = masked_input_shape(&bytes, bytes.len() as u64)
        .unwrap()
        .unwrap();
    // A piece or an end without a begin.
    assert!(matches!(
        server.masked_input_piece(from, Bytes::from_static(&[1, 2, 3])),
        Err(ServerError::Malformed { .. })
    ));
    assert!(matches!(
        server.end_masked_input(from),
        Err(ServerError::Malformed { .. })
    ));
    // A wrong shape, an unknown client.
    assert!(matches!(
        server.begin_masked_input(from, ring_bits, count - 1),
        Err(ServerError::Malformed { .. })
    ));
    assert!(matches!(
        server.begin_masked_input(N + 3, ring_bits, count),
        Err(ServerError::UnknownClient(_))
    ));
    // Begun twice, or whole after begun: duplicates.
    server.begin_masked_input(from, ring_bits, count).unwrap();
    assert!(matches!(
        server.begin_masked_input(from, ring_bits, count),
        Err(ServerError::Duplicate { .. })
    ));
    assert!(matches!(
        server.handle_bytes(from, &bytes),
        Err(ServerError::Duplicate { .. })
    ));
    // An overrun ends the upload and takes it back; so does an early end.
    let mut too_long = words.to_vec();
    too_long.push(0);
    assert!(matches!(
        server.masked_input_piece(from, Bytes::from(too_long)),
        Err(ServerError::Malformed { .. })
    ));
    assert!(server.uploads_in_progress().is_empty());
    server.begin_masked_input(from, ring_bits, count).unwrap();
    server
        .masked_input_piece(from, Bytes::copy_from_slice(&words[..5]))
        .unwrap();
    assert!(matches!(
        server.end_masked_input(from),
        Err(ServerError::Malformed { .. })
    ));
    // A lost connection: cancelled, and nothing in progress any more.
    server.begin_masked_input(from, ring_bits, count).unwrap();
    server
        .masked_input_piece(from, Bytes::copy_from_slice(&words[..7]))
        .unwrap();
    assert!(server.cancel_masked_input(from));
    assert!(!server.cancel_masked_input(from));
    // After all that, the real upload (streamed) and the others give the exact round.
    stream(&mut server, from, &bytes, &[100, 3]);
    for (f, b) in &uploads[1..] {
        server.handle_bytes(*f, b).unwrap();
    }
    let got = finish(server, clients);

    let (mut reference, clients_r, uploads_r) = round_at_upload();
    for (f, b) in &uploads_r {
        reference.handle_bytes(*f, b).unwrap();
    }
    let expected = finish(reference, clients_r);
    assert_eq!(got.sum, expected.sum);
    // Once the stage has moved on, streaming is refused as a wrong stage.
    let (mut late, _, uploads_l) = round_at_upload();
    for (f, b) in &uploads_l {
        late.handle_bytes(*f, b).unwrap();
    }
    assert!(matches!(
        late.begin_masked_input(from, ring_bits, count),
        Err(ServerError::WrongStage { .. })
    ));
    assert!(matches!(
        late.masked_input_piece(from, Bytes::from_static(&[0])),
        Err(ServerError::WrongStage { .. })
    ));
}
