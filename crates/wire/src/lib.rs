//! Protocol messages (protocol-spec §4).
