//! A masked vector that reaches the server in pieces (protocol-spec §4.3.2, "Streaming"): its words
//! are added to the sum as the bytes arrive, so that the server neither holds a second copy of the
//! vector to decode nor re-reads it from memory after the last byte; a word split between two
//! pieces is carried over. Until the last byte has arrived the upload can be taken back out of the
//! sum exactly (wrapping subtraction of the same words), which is what keeps an unfinished upload
//! from ever counting: the server keeps the pieces until then, as it would keep the whole message.

use bytes::Bytes;

/// One upload in progress.
#[derive(Debug)]
pub(crate) struct PartialUpload {
    ring_bits: u8,
    width: usize,
    /// Bytes announced by the header: words × width.
    total: u64,
    /// Bytes fed so far.
    received: u64,
    /// Leading bytes of a word whose rest has not arrived yet.
    carry: [u8; 4],
    carry_len: usize,
    /// The pieces fed so far, kept to take the upload back out.
    pieces: Vec<Bytes>,
}

/// Why a piece was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UploadError {
    /// More bytes than the header announced.
    #[error("{got} bytes for a vector of {total}")]
    TooLong { got: u64, total: u64 },
    /// The upload ended early.
    #[error("ended after {got} of {total} bytes")]
    Incomplete { got: u64, total: u64 },
}

impl PartialUpload {
    /// An upload of `count` words of `width` bytes each (a width `packed_word_bytes` accepts).
    pub(crate) fn new(ring_bits: u8, width: usize, count: u32) -> Self {
        Self {
            ring_bits,
            width,
            total: u64::from(count) * width as u64,
            received: 0,
            carry: [0; 4],
            carry_len: 0,
            pieces: Vec::new(),
        }
    }

    /// Adds the words completed by `piece` into `acc` (the whole-vector sum; its length is the
    /// announced word count, checked by the caller).
    pub(crate) fn feed(&mut self, acc: &mut [u32], piece: Bytes) -> Result<(), UploadError> {
        let got = self.received + piece.len() as u64;
        if got > self.total {
            return Err(UploadError::TooLong {
                got,
                total: self.total,
            });
        }
        let mut data = &piece[..];
        if self.carry_len > 0 {
            let take = (self.width - self.carry_len).min(data.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&data[..take]);
            self.carry_len += take;
            data = &data[take..];
            if self.carry_len == self.width {
                let index = (self.received as usize + take) / self.width - 1;
                let word = u32::from_le_bytes(self.carry);
                acc[index] = acc[index].wrapping_add(word);
                self.carry = [0; 4];
                self.carry_len = 0;
            }
        }
        if self.carry_len > 0 {
            // The piece ended inside the carried word: nothing else to add.
            self.received = got;
            self.pieces.push(piece);
            return Ok(());
        }
        let consumed_before = (got - data.len() as u64) as usize;
        let whole = data.len() / self.width * self.width;
        if whole > 0 {
            let first = consumed_before / self.width;
            let words = whole / self.width;
            fedlora_wire::add_packed_words(
                &mut acc[first..first + words],
                self.ring_bits,
                &data[..whole],
            );
        }
        let rest = &data[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        self.received = got;
        self.pieces.push(piece);
        Ok(())
    }

    /// Whether every announced byte has arrived (then every word is in the sum).
    pub(crate) fn check_complete(&self) -> Result<(), UploadError> {
        if self.received == self.total {
            Ok(())
        } else {
            Err(UploadError::Incomplete {
                got: self.received,
                total: self.total,
            })
        }
    }

    /// Takes every word added so far back out of `acc`. A trailing partial word was never added.
    pub(crate) fn take_back(self, acc: &mut [u32]) {
        let mut word = [0u8; 4];
        let mut filled = 0;
        let mut index = 0;
        for &b in self.pieces.iter().flat_map(|p| p.iter()) {
            word[filled] = b;
            filled += 1;
            if filled == self.width {
                acc[index] = acc[index].wrapping_sub(u32::from_le_bytes(word));
                word = [0; 4];
                filled = 0;
                index += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packed(words: &[u32], width: usize) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.to_le_bytes()[..width].to_vec())
            .collect()
    }

    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([bytes.len()]) {
            out.push(Bytes::copy_from_slice(&bytes[at..c]));
            at = c;
        }
        out
    }

    proptest! {
        /// Law: however the bytes are cut, streaming adds exactly what the whole-message path adds.
        #[test]
        fn any_cutting_adds_the_same_words(
            width in prop::sample::select(vec![1usize, 2, 3, 4]),
            raw in prop::collection::vec(any::<u32>(), 1..200),
            start in prop::collection::vec(any::<u32>(), 200),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let ring_bits = (width * 8) as u8;
            let mask = if width == 4 { u32::MAX } else { (1u32 << ring_bits) - 1 };
            let words: Vec<u32> = raw.iter().map(|w| w & mask).collect();
            let bytes = packed(&words, width);
            let mut expected = start[..words.len()].to_vec();
            fedlora_wire::add_packed_words(&mut expected, ring_bits, &bytes);
            let mut acc = start[..words.len()].to_vec();
            let mut up = PartialUpload::new(ring_bits, width, words.len() as u32);
            for piece in split(&bytes, &cuts) {
                up.feed(&mut acc, piece).expect("within the announced length");
            }
            prop_assert!(up.check_complete().is_ok());
            prop_assert_eq!(acc, expected);
        }

        /// Law: an upload taken back at any point leaves the sum exactly as it was.
        #[test]
        fn taking_back_restores_the_sum(
            width in prop::sample::select(vec![1usize, 2, 3, 4]),
            raw in prop::collection::vec(any::<u32>(), 1..200),
            start in prop::collection::vec(any::<u32>(), 200),
            cuts in prop::collection::vec(any::<usize>(), 1..12),
            fed in any::<usize>(),
        ) {
            let ring_bits = (width * 8) as u8;
            let mask = if width == 4 { u32::MAX } else { (1u32 << ring_bits) - 1 };
            let words: Vec<u32> = raw.iter().map(|w| w & mask).collect();
            let bytes = packed(&words, width);
            let pieces = split(&bytes, &cuts);
            let fed = fed % (pieces.len() + 1);
            let before = start[..words.len()].to_vec();
            let mut acc = before.clone();
            let mut up = PartialUpload::new(ring_bits, width, words.len() as u32);
            for piece in pieces.into_iter().take(fed) {
                up.feed(&mut acc, piece).expect("within the announced length");
            }
            up.take_back(&mut acc);
            prop_assert_eq!(acc, before);
        }
    }

    #[test]
    fn too_many_bytes_are_refused_and_nothing_is_added() {
        let mut acc = vec![0u32; 2];
        let mut up = PartialUpload::new(24, 3, 2);
        assert_eq!(
            up.feed(&mut acc, Bytes::from_static(&[1; 7])),
            Err(UploadError::TooLong { got: 7, total: 6 })
        );
        assert_eq!(acc, vec![0, 0]);
        up.feed(&mut acc, Bytes::from_static(&[1; 4]))
            .expect("fits");
        assert_eq!(
            up.check_complete(),
            Err(UploadError::Incomplete { got: 4, total: 6 })
        );
    }
}
