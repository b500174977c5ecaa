//! The writing end of the pipeline: image bytes past the held head go to the
//! target, zero runs are zeroed rather than written or skipped, and no byte
//! may land in a saved partition or past the end of the target.

use crate::disk::device::Target;
use crate::{Error, Result};
use std::ops::Range;

/// Zero detection granularity: one page, the O_DIRECT alignment.
const BLOCK: usize = 4096;
/// Shorter zero runs are written as data: one write beats a write, a
/// zeroout and another write.
const MIN_ZERO_RUN: u64 = 64 * 1024;

/// Writes a stream of image bytes starting at a byte offset of the target.
pub struct DiskSink<'a> {
    target: &'a Target,
    protected: Vec<Range<u64>>,
    /// Bytes the target can take; `None` for a file that grows.
    capacity: Option<u64>,
    /// Next offset to write.
    position: u64,
    /// Zeros seen but not yet zeroed, merged across chunks so a long zero
    /// region costs one call.
    pending_zeros: Option<Range<u64>>,
    zeroed: u64,
}

impl<'a> DiskSink<'a> {
    /// A sink that writes from `start`, refusing `protected` ranges and
    /// anything past `capacity`.
    pub fn new(
        target: &'a Target,
        start: u64,
        protected: Vec<Range<u64>>,
        capacity: Option<u64>,
    ) -> Self {
        DiskSink {
            target,
            protected,
            capacity,
            position: start,
            pending_zeros: None,
            zeroed: 0,
        }
    }

    /// Bytes made zero by zeroing instead of writing.
    pub fn zeroed_bytes(&self) -> u64 {
        self.zeroed
    }

    /// Writes the next bytes of the image.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let range = self.position..self.position + data.len() as u64;
        self.check_allowed(&range)?;
        let mut offset = 0;
        for run in runs(data) {
            let at = self.position + offset as u64;
            let bytes = &data[offset..offset + run.len];
            if run.zero {
                self.add_zeros(at..at + run.len as u64)?;
            } else {
                self.flush_zeros()?;
                self.target.write_at(bytes, at)?;
            }
            offset += run.len;
        }
        self.position = range.end;
        Ok(())
    }

    /// Zeroes what is pending and makes everything durable.
    pub fn finish(&mut self) -> Result<u64> {
        self.flush_zeros()?;
        self.target.sync()?;
        Ok(self.position)
    }

    fn check_allowed(&self, range: &Range<u64>) -> Result<()> {
        check_write_allowed(range, &self.protected, self.capacity)
    }

    fn add_zeros(&mut self, range: Range<u64>) -> Result<()> {
        match &mut self.pending_zeros {
            Some(pending) if pending.end == range.start => pending.end = range.end,
            _ => {
                self.flush_zeros()?;
                self.pending_zeros = Some(range);
            }
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some(range) = self.pending_zeros.take() {
            self.target
                .zero_range(range.start, range.end - range.start)?;
            self.zeroed += range.end - range.start;
        }
        Ok(())
    }
}

/// Refuses a write of `range` that would touch a `protected` range or run
/// past `capacity`.
pub fn check_write_allowed(
    range: &Range<u64>,
    protected: &[Range<u64>],
    capacity: Option<u64>,
) -> Result<()> {
    if let Some(capacity) = capacity
        && range.end > capacity
    {
        return Err(Error::TargetTooSmall {
            needed: range.end,
            available: capacity,
        });
    }
    if let Some(saved) = protected
        .iter()
        .find(|p| p.start < range.end && range.start < p.end)
    {
        return Err(Error::SavedPartitionCollision(format!(
            "image bytes {}..{} would overwrite the saved partition at bytes {}..{}",
            range.start, range.end, saved.start, saved.end
        )));
    }
    Ok(())
}

/// A maximal stretch of a chunk that is all zeros or holds data.
#[derive(Debug, PartialEq)]
struct Run {
    len: usize,
    zero: bool,
}

/// Splits `data` into data and zero runs at block granularity; zero runs
/// shorter than [`MIN_ZERO_RUN`] are folded into the data around them. A
/// trailing partial block is data (zeroing it would need a buffered write
/// anyway).
fn runs(data: &[u8]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for block in data.chunks(BLOCK) {
        let zero = block.len() == BLOCK && is_zero(block);
        match runs.last_mut() {
            Some(last) if last.zero == zero => last.len += block.len(),
            _ => runs.push(Run {
                len: block.len(),
                zero,
            }),
        }
    }
    let mut merged: Vec<Run> = Vec::with_capacity(runs.len());
    for mut run in runs {
        if run.zero && (run.len as u64) < MIN_ZERO_RUN {
            run.zero = false;
        }
        match merged.last_mut() {
            Some(last) if last.zero == run.zero => last.len += run.len,
            _ => merged.push(run),
        }
    }
    merged
}

/// Whether a block is all zeros. Data nearly always shows in a block's
/// first bytes, so those are looked at first; the rest is folded in 16-byte
/// words without an early exit, so that the loop vectorises.
pub(crate) fn is_zero(block: &[u8]) -> bool {
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

    #[test]
    fn short_zero_runs_fold_into_data() {
        let mut data = vec![1u8; BLOCK * 4];
        data[BLOCK..BLOCK * 2].fill(0);
        assert_eq!(
            runs(&data),
            vec![Run {
                len: BLOCK * 4,
                zero: false
            }]
        );
    }

    #[test]
    fn long_zero_runs_stand_alone() {
        let zeros = MIN_ZERO_RUN as usize;
        let mut data = vec![0u8; BLOCK + zeros + BLOCK + 100];
        data[..BLOCK].fill(7);
        data[BLOCK + zeros..].fill(7);
        assert_eq!(
            runs(&data),
            vec![
                Run {
                    len: BLOCK,
                    zero: false
                },
                Run {
                    len: zeros,
                    zero: true
                },
                Run {
                    len: BLOCK + 100,
                    zero: false
                },
            ]
        );
    }

    #[test]
    fn a_trailing_partial_block_of_zeros_is_data() {
        let data = vec![0u8; MIN_ZERO_RUN as usize + 10];
        let found = runs(&data);
        assert_eq!(
            found.last(),
            Some(&Run {
                len: 10,
                zero: false
            })
        );
        assert!(found[0].zero);
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
