//! What the pipeline needs to know of a decoded chunk besides its SHA-256:
//! which of its 4 KiB blocks are all zeros (the sink zeroes those runs
//! instead of writing them) and its XXH3-128 (what the read-back checks it
//! against).
//!
//! The decoder thread takes the survey as it fills a chunk, a piece at a
//! time while the piece is still in its core's cache; done later on the
//! writer's thread, the same look cost a pass over memory that had left the
//! cache (on the test machine 0.2 s of a 1 GiB write's CPU time, of
//! which the decoder's look now costs a fraction).

use xxhash_rust::xxh3::Xxh3Default;

/// Zero detection granularity: one page, the O_DIRECT alignment.
pub const BLOCK: usize = 4096;

/// A chunk's zero blocks and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// One flag per [`BLOCK`] of the chunk; a short last block never
    /// counts as zeros (zeroing it would need a buffered write anyway).
    zero_blocks: Vec<bool>,
    len: usize,
    digest: u128,
}

impl Survey {
    /// The survey of `data`, taken in one go.
    pub fn of(data: &[u8]) -> Survey {
        let mut surveyor = Surveyor::default();
        surveyor.advance(data);
        surveyor.finish(data)
    }

    /// The chunk's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Per [`BLOCK`], whether it is all zeros.
    pub fn zero_blocks(&self) -> &[bool] {
        &self.zero_blocks
    }

    /// Whether every byte of the chunk is zero.
    pub fn all_zero(&self) -> bool {
        self.len.is_multiple_of(BLOCK) && self.zero_blocks.iter().all(|&zero| zero)
    }

    /// The XXH3-128 of the whole chunk.
    pub fn digest(&self) -> u128 {
        self.digest
    }
}

/// Takes a [`Survey`] of a buffer as it fills: [`advance`](Self::advance)
/// after each piece is added, [`finish`](Self::finish) once it is full.
#[derive(Default)]
pub struct Surveyor {
    hasher: Xxh3Default,
    hashed: usize,
    zero_blocks: Vec<bool>,
}

impl Surveyor {
    /// Looks at what `filled` (the buffer's bytes so far) holds beyond what
    /// was looked at before: hashes it, and flags the blocks it completes.
    pub fn advance(&mut self, filled: &[u8]) {
        self.hasher.update(&filled[self.hashed..]);
        self.hashed = filled.len();
        let complete = filled.len() / BLOCK;
        let from = self.zero_blocks.len();
        self.zero_blocks.extend(
            filled[from * BLOCK..complete * BLOCK]
                .chunks(BLOCK)
                .map(is_zero),
        );
    }

    /// The survey of `filled`, the whole chunk.
    pub fn finish(mut self, filled: &[u8]) -> Survey {
        self.advance(filled);
        if !filled.len().is_multiple_of(BLOCK) {
            self.zero_blocks.push(false);
        }
        Survey {
            zero_blocks: self.zero_blocks,
            len: filled.len(),
            digest: self.hasher.digest128(),
        }
    }
}

/// Whether a block is all zeros. Data nearly always shows in a block's
/// first bytes, so those are looked at first; the rest is folded in 16-byte
/// words without an early exit, so that the loop vectorises.
pub fn is_zero(block: &[u8]) -> bool {
    if block.iter().take(64).any(|&b| b != 0) {
        return false;
    }
    let (words, tail) = block.as_chunks::<16>();
    words
        .iter()
        .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w))
        == 0
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_128;

    #[test]
    fn a_survey_taken_piece_by_piece_is_the_survey_of_the_whole() {
        let mut data = vec![0u8; BLOCK * 9 + 100];
        fastrand::Rng::with_seed(3).fill(&mut data[BLOCK * 2..BLOCK * 3 + 7]);
        data[BLOCK * 6 + 4095] = 1;
        let whole = Survey::of(&data);
        assert_eq!(
            whole.zero_blocks(),
            &[
                true, true, false, false, true, true, false, true, true, false
            ]
        );
        assert_eq!(whole.digest(), xxh3_128(&data));
        assert_eq!(whole.len(), data.len());
        assert!(!whole.all_zero());
        for step in [1, 100, BLOCK - 1, BLOCK, BLOCK * 3 + 5, data.len()] {
            let mut surveyor = Surveyor::default();
            let mut filled = 0;
            while filled < data.len() {
                filled = (filled + step).min(data.len());
                surveyor.advance(&data[..filled]);
            }
            assert_eq!(surveyor.finish(&data), whole, "in pieces of {step}");
        }
    }

    #[test]
    fn only_whole_zero_blocks_make_a_chunk_all_zero() {
        assert!(Survey::of(&[0; BLOCK * 2]).all_zero());
        assert!(!Survey::of(&[0; BLOCK + 1]).all_zero());
        assert!(Survey::of(&[]).all_zero());
        assert!(Survey::of(&[]).is_empty());
    }

    #[test]
    fn zero_detection_sees_a_single_set_bit() {
        let mut block = vec![0u8; BLOCK];
        assert!(is_zero(&block));
        block[BLOCK - 1] = 0x80;
        assert!(!is_zero(&block));
        block[BLOCK - 1] = 0;
        block[17] = 1;
        assert!(!is_zero(&block));
    }
}
