//! Client-to-client encryption of share pairs (protocol-spec §3.6).
//!
//! The plaintext is `sender ‖ receiver ‖ self-mask-seed share ‖ mask-key share` (4 + 4 + 40 + 40
//! bytes). It is sealed with AES-128-GCM under the pairwise share key; the nonce is
//! `sender ‖ receiver ‖ 0u32` (little-endian), unique because each ordered pair seals exactly one
//! message per session; the associated data is `label("share") ‖ session ‖ sender ‖ receiver`.
//! Any failure to open is reported as one opaque error.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Nonce};
use fedlora_wire::{ClientId, SHARE_BYTES};
use zeroize::Zeroizing;

use crate::kdf::{label, SessionId};
use crate::shamir::{ShamirError, Share};

/// Plaintext length of one share pair.
pub const PLAINTEXT_BYTES: usize = 8 + 2 * SHARE_BYTES;
/// Ciphertext length: plaintext plus the 16-byte GCM tag.
pub const CIPHERTEXT_BYTES: usize = PLAINTEXT_BYTES + 16;

/// The two shares one client gives a neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePair {
    /// Share of the self-mask seed `b`.
    pub self_mask: Share,
    /// Share of the mask secret key `s_sk`.
    pub mask_key: Share,
}

/// Why a share box could not be opened. Deliberately opaque (protocol-spec §6.2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Decryption or authentication failed, or the plaintext's addressing does not match.
    #[error("share ciphertext failed to authenticate")]
    Unauthentic,
    /// The plaintext authenticated but a share is not a field element.
    #[error(transparent)]
    Share(#[from] ShamirError),
}

fn nonce(sender: ClientId, receiver: ClientId) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&sender.to_le_bytes());
    n[4..8].copy_from_slice(&receiver.to_le_bytes());
    n
}

fn aad(session: &SessionId, sender: ClientId, receiver: ClientId) -> Vec<u8> {
    let mut a = label("share");
    a.extend_from_slice(&session.0);
    a.extend_from_slice(&sender.to_le_bytes());
    a.extend_from_slice(&receiver.to_le_bytes());
    a
}

/// Implements share sealing (protocol-spec §3.6).
pub fn seal(
    key: &[u8; 16],
    session: &SessionId,
    sender: ClientId,
    receiver: ClientId,
    pair: &SharePair,
) -> Vec<u8> {
    let mut pt = Zeroizing::new([0u8; PLAINTEXT_BYTES]);
    pt[..4].copy_from_slice(&sender.to_le_bytes());
    pt[4..8].copy_from_slice(&receiver.to_le_bytes());
    pt[8..8 + SHARE_BYTES].copy_from_slice(pair.self_mask.to_bytes().as_ref());
    pt[8 + SHARE_BYTES..].copy_from_slice(pair.mask_key.to_bytes().as_ref());
    let cipher = Aes128Gcm::new(key.into());
    let n = nonce(sender, receiver);
    // AES-GCM encryption of 88 bytes cannot fail (the only error is a message over 64 GiB).
    #[allow(clippy::expect_used)]
    cipher
        .encrypt(
            Nonce::from_slice(&n),
            Payload {
                msg: pt.as_ref(),
                aad: &aad(session, sender, receiver),
            },
        )
        .expect("AES-GCM encryption of a short message cannot fail")
}

/// Implements share opening (protocol-spec §3.6); the receiver's view. The shares' holder is the
/// receiver.
pub fn open(
    key: &[u8; 16],
    session: &SessionId,
    sender: ClientId,
    receiver: ClientId,
    ciphertext: &[u8],
) -> Result<SharePair, OpenError> {
    if ciphertext.len() != CIPHERTEXT_BYTES {
        return Err(OpenError::Unauthentic);
    }
    let cipher = Aes128Gcm::new(key.into());
    let n = nonce(sender, receiver);
    let pt = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&n),
                Payload {
                    msg: ciphertext,
                    aad: &aad(session, sender, receiver),
                },
            )
            .map_err(|_| OpenError::Unauthentic)?,
    );
    if pt.len() != PLAINTEXT_BYTES
        || pt[..4] != sender.to_le_bytes()
        || pt[4..8] != receiver.to_le_bytes()
    {
        return Err(OpenError::Unauthentic);
    }
    let mut a = Zeroizing::new([0u8; SHARE_BYTES]);
    let mut b = Zeroizing::new([0u8; SHARE_BYTES]);
    a.copy_from_slice(&pt[8..8 + SHARE_BYTES]);
    b.copy_from_slice(&pt[8 + SHARE_BYTES..]);
    Ok(SharePair {
        self_mask: Share::from_bytes(receiver, &a)?,
        mask_key: Share::from_bytes(receiver, &b)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(holder: ClientId) -> SharePair {
        SharePair {
            self_mask: Share {
                holder,
                values: [1, 2, 3, 4, 5],
            },
            mask_key: Share {
                holder,
                values: [6, 7, 8, 9, 10],
            },
        }
    }

    #[test]
    fn seal_then_open() {
        let s = SessionId([3; 32]);
        let ct = seal(&[1; 16], &s, 4, 9, &pair(9));
        assert_eq!(ct.len(), CIPHERTEXT_BYTES);
        assert_eq!(open(&[1; 16], &s, 4, 9, &ct).unwrap(), pair(9));
    }

    #[test]
    fn any_binding_change_fails_opaquely() {
        let s = SessionId([3; 32]);
        let ct = seal(&[1; 16], &s, 4, 9, &pair(9));
        assert_eq!(open(&[2; 16], &s, 4, 9, &ct), Err(OpenError::Unauthentic));
        assert_eq!(
            open(&[1; 16], &SessionId([4; 32]), 4, 9, &ct),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(open(&[1; 16], &s, 5, 9, &ct), Err(OpenError::Unauthentic));
        assert_eq!(open(&[1; 16], &s, 4, 8, &ct), Err(OpenError::Unauthentic));
        let mut flipped = ct.clone();
        flipped[10] ^= 1;
        assert_eq!(
            open(&[1; 16], &s, 4, 9, &flipped),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(
            open(&[1; 16], &s, 4, 9, &ct[..50]),
            Err(OpenError::Unauthentic)
        );
    }
}
