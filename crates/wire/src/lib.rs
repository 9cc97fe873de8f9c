//! fedlora's protocol messages and their byte encoding.
//!
//! This crate holds only data: the messages the SecAgg+ client and server exchange (protocol-spec §4)
//! and the codec that turns them into bytes and back (protocol-spec §4.3). It performs no
//! cryptography and no I/O. Decoding never panics on bytes from a peer: every failure is a
//! [`DecodeError`], and every length is checked against a hard limit before anything is allocated.

pub mod codec;
pub mod messages;

pub use codec::{
    add_packed_words, decode_client, decode_server, encode_client, encode_server,
    masked_input_shape, packed_word_bytes, view_masked_input, DecodeError, EncodeError,
    PackedWords, MASKED_INPUT_HEADER_BYTES, MASKED_INPUT_PREFIX_BYTES,
    MAX_STRUCTURED_MESSAGE_BYTES, MAX_VECTOR_WORDS,
};
pub use messages::*;

/// Version of the protocol this crate encodes; it feeds every domain-separation label
/// (protocol-spec §3.1) and is carried in [`RoundSetup::version`].
pub const PROTOCOL_VERSION: u16 = 0;
