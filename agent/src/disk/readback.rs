//! Read-back verification: what the disk holds, hashed from the disk itself.

use crate::Result;
use crate::disk::aligned::AlignedBuf;
use crate::disk::device::Target;
use crate::progress::ProgressMeter;
use sha2::{Digest, Sha256};

/// Read-back buffer: large O_DIRECT reads.
const READ_CHUNK: usize = 4 << 20;

/// Hashes `head` (the image's held first bytes, not yet on the disk)
/// followed by the target's bytes `[head.len(), size)`, read with O_DIRECT
/// so the page cache cannot answer for the disk.
pub fn hash_written_image(
    target: &Target,
    head: &[u8],
    size: u64,
    meter: &mut ProgressMeter<'_>,
) -> Result<String> {
    if !target.uses_direct_io() {
        target.drop_caches()?;
    }
    let mut hasher = Sha256::new();
    hasher.update(head);
    let mut buffer = AlignedBuf::new(READ_CHUNK);
    let mut offset = head.len() as u64;
    while offset < size {
        let n = (size - offset).min(READ_CHUNK as u64) as usize;
        buffer.set_len(n);
        target.read_at(&mut buffer[..n], offset)?;
        hasher.update(&buffer[..n]);
        offset += n as u64;
        meter.update(offset);
    }
    meter.finish_phase(size);
    Ok(hex::encode(hasher.finalize()))
}

/// Reads `expected.len()` bytes at `offset` back; returns the disk offset of
/// the first byte that differs, `None` when all match.
pub fn first_difference(target: &Target, offset: u64, expected: &[u8]) -> Result<Option<u64>> {
    let mut buffer = AlignedBuf::new(expected.len());
    buffer.set_len(expected.len());
    target.read_at(&mut buffer[..], offset)?;
    Ok(buffer
        .iter()
        .zip(expected)
        .position(|(back, want)| back != want)
        .map(|at| offset + at as u64))
}
