//! Round driving shared by the test-vector generator (`examples/gen_test_vectors.rs`, which
//! includes this file by path) and the tests that check its vectors (`tests/vectors.rs`): both
//! must replay the very same round.

use fedlora_secagg::wire::{ServerMessage, Stage, UnmaskRequest};
use fedlora_secagg::{Client, ClientInput, RoundConfig, Server, ServerEvent};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Runs a round of `config` with `inputs` (client `i` seeded with `100 + i`) until the server emits
/// its unmask request; client `drop_at_share`, if any, goes silent from the share stage on.
/// Returns the clients and the request.
pub fn drive_to_unmask(
    config: RoundConfig,
    inputs: Vec<ClientInput>,
    drop_at_share: Option<u32>,
) -> (Vec<Client>, UnmaskRequest) {
    let n = config.num_clients;
    let mut server = Server::new(config).expect("round config");
    let mut clients: Vec<Client> = inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            Client::new(
                i as u32,
                input,
                &mut ChaCha20Rng::seed_from_u64(100 + i as u64),
            )
        })
        .collect();
    let mut alive = vec![true; n as usize];
    loop {
        while let Some((to, msg)) = server.poll_transmit() {
            if let ServerMessage::UnmaskRequest(r) = msg {
                return (clients, r);
            }
            if alive[to as usize] {
                clients[to as usize]
                    .handle_message(msg)
                    .expect("client accepts");
            }
        }
        while let Some(ev) = server.poll_event() {
            assert!(!matches!(ev, ServerEvent::Aborted(_)), "{ev:?}");
        }
        let stage = server.stage();
        for i in 0..n {
            while let Some(m) = clients[i as usize].poll_transmit() {
                if drop_at_share == Some(i) && m.stage() >= Stage::ShareKeys {
                    alive[i as usize] = false;
                    continue;
                }
                server.handle_message(i, m).expect("server accepts");
            }
        }
        if server.stage() == stage {
            server.close_stage();
        }
    }
}
