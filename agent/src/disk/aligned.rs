//! A heap buffer whose start is aligned for O_DIRECT.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Alignment of [`AlignedBuf`] and of the offsets and lengths that go through
/// O_DIRECT. 4096 covers every logical block size in use (512 and 4096).
pub const ALIGNMENT: usize = 4096;

/// A heap buffer whose first byte is aligned to [`ALIGNMENT`], as O_DIRECT
/// requires of the memory it transfers.
///
/// Built from a `Vec<u8>` over-allocated by one alignment unit, so no unsafe
/// allocation code is needed: the heap block of a `Vec` that never grows does
/// not move, so the aligned offset into it stays valid.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zero-filled buffer of `capacity` bytes rounded up to a multiple of
    /// [`ALIGNMENT`]. Its length starts at the full capacity.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.next_multiple_of(ALIGNMENT);
        let storage = vec![0u8; capacity + ALIGNMENT];
        let misalignment = storage.as_ptr().addr() % ALIGNMENT;
        let start = (ALIGNMENT - misalignment) % ALIGNMENT;
        AlignedBuf {
            storage,
            start,
            capacity,
            len: capacity,
        }
    }

    /// The bytes in use: `[0, len)`.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes in use: `[0, len)`, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Sets how many bytes are in use. Bytes exposed by growing keep whatever
    /// they held before (zeros, or earlier data).
    ///
    /// # Panics
    /// If `len` exceeds [`capacity`](Self::capacity): that is a bug in the caller.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "AlignedBuf::set_len({len}) exceeds capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// How many bytes the buffer can hold, a multiple of [`ALIGNMENT`].
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Allocations from this size up get pages of their own from the allocator.
const OWN_PAGES_FROM: usize = 1 << 20;

/// Makes the allocator give every allocation of [`OWN_PAGES_FROM`] or more
/// (the pipeline's 4 MiB buffers among them) a mapping of its own, handed
/// back to the kernel when it is freed. Called first thing in `main`.
///
/// glibc does that by default only until the first such block is freed:
/// then it raises its threshold above that size, and later buffers come
/// from per-thread arenas that keep their pages after use. The pipeline's
/// buffers are allocated and freed on different threads, so the daemon's
/// resident memory grew with every operation (65.7 MiB after two reimages
/// in `bench/api.sh`). Setting the threshold fixes it where it is.
///
/// The buffers stay heap blocks with their alignment slack after them: a
/// buffer mapped exactly to its length crashed the VM's shutdown handoff
/// (a fault in BLAKE3's AVX2 code at the mapping's end under QEMU TCG;
/// on this host's CPU a slice that ends at a guard page hashes cleanly).
pub fn give_large_buffers_their_own_pages() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it is
    // called before any other thread exists, so no allocation races it.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, OWN_PAGES_FROM as i32);
    }
}

/// Whether `data` starts at an [`ALIGNMENT`] boundary in memory.
pub(crate) fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr().addr().is_multiple_of(ALIGNMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_aligned_for_many_sizes() {
        // Allocate several at once so the allocator hands out differently
        // placed blocks; each must still start aligned.
        let bufs: Vec<AlignedBuf> = (0..64).map(|i| AlignedBuf::new(i * 1000 + 1)).collect();
        for buf in &bufs {
            assert!(
                is_aligned(buf),
                "buffer at {:p} is not aligned",
                buf.as_ptr()
            );
            assert_eq!(buf.capacity() % ALIGNMENT, 0);
            assert_eq!(buf.len(), buf.capacity());
        }
    }

    #[test]
    fn capacity_rounds_up_to_the_alignment() {
        assert_eq!(AlignedBuf::new(0).capacity(), 0);
        assert_eq!(AlignedBuf::new(1).capacity(), 4096);
        assert_eq!(AlignedBuf::new(4096).capacity(), 4096);
        assert_eq!(AlignedBuf::new(4097).capacity(), 8192);
    }

    #[test]
    fn set_len_limits_the_slices_and_alignment_survives_a_move() {
        let mut buf = AlignedBuf::new(8192);
        buf.as_mut_slice().fill(7);
        buf.set_len(100);
        assert_eq!(buf.as_slice(), &[7u8; 100][..]);
        let moved = buf;
        assert!(is_aligned(&moved));
        assert_eq!(moved.len(), 100);
    }

    #[test]
    #[should_panic(expected = "exceeds capacity")]
    fn set_len_beyond_capacity_is_a_bug() {
        AlignedBuf::new(4096).set_len(4097);
    }
}
