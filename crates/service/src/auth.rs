//! Ed25519 signatures on the ephemeral SecAgg+ keys ([`fedlora_secagg::KeyAuthenticator`]): each
//! client signs its advertised keys with its enrolled identity, and verifies every peer's signature
//! against that peer's enrolled identity key, so the server cannot substitute keys undetected.

use std::collections::HashMap;
use std::sync::Arc;

use fedlora_secagg::{ClientId, KeyAuthenticator};

use crate::identity::{IdentityKey, PublicIdentity, ADVERTISE_CONTEXT};

/// Signs with this party's identity (clients only) and verifies with the round's roster.
#[derive(Debug, Clone)]
pub struct Ed25519Authenticator {
    own: Option<Arc<IdentityKey>>,
    peers: HashMap<ClientId, PublicIdentity>,
}

impl Ed25519Authenticator {
    /// A client's authenticator: its own key and the identity keys of the round's clients by id.
    pub fn client(own: Arc<IdentityKey>, peers: HashMap<ClientId, PublicIdentity>) -> Self {
        Self {
            own: Some(own),
            peers,
        }
    }

    /// The server's verifier (it signs nothing).
    pub fn verifier(peers: HashMap<ClientId, PublicIdentity>) -> Self {
        Self { own: None, peers }
    }
}

impl KeyAuthenticator for Ed25519Authenticator {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.own
            .as_ref()
            .map(|k| k.sign(ADVERTISE_CONTEXT, message).to_vec())
            .unwrap_or_default()
    }

    fn verify(&self, peer: ClientId, message: &[u8], signature: &[u8]) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|pk| pk.verify(ADVERTISE_CONTEXT, message, signature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_to_the_enrolled_key_of_that_id() {
        let a = Arc::new(IdentityKey::generate());
        let b = Arc::new(IdentityKey::generate());
        let roster: HashMap<_, _> = [(0, a.public()), (1, b.public())].into();
        let auth_a = Ed25519Authenticator::client(a.clone(), roster.clone());
        let server = Ed25519Authenticator::verifier(roster);
        let sig = auth_a.sign(b"keys");
        assert!(server.verify(0, b"keys", &sig));
        assert!(
            !server.verify(1, b"keys", &sig),
            "a's signature must not pass as b's"
        );
        assert!(!server.verify(2, b"keys", &sig), "unknown id");
        assert!(!server.verify(0, b"other keys", &sig));
        assert!(server.sign(b"x").is_empty());
    }
}
