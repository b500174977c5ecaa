//! A buffer whose start is aligned for O_DIRECT.

use nix::sys::mman::{self, MapFlags, ProtFlags};
use std::alloc::Layout;
use std::ffi::c_void;
use std::fmt;
use std::num::NonZeroUsize;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of [`AlignedBuf`] and of the offsets and lengths that go through
/// O_DIRECT. 4096 covers every logical block size in use (512 and 4096).
pub const ALIGNMENT: usize = 4096;

/// A buffer whose first byte is aligned to [`ALIGNMENT`], as O_DIRECT
/// requires of the memory it transfers.
///
/// Its pages are an anonymous mapping of their own rather than heap memory:
/// they are page-aligned by construction, zero until written, and go back
/// to the kernel when the buffer is dropped. The write pipeline's 4 MiB
/// buffers come and go on different threads; from the heap, each thread's
/// malloc arena kept them after they were freed, and the daemon's resident
/// memory grew with every operation.
pub struct AlignedBuf {
    /// The mapping; `None` for a buffer of no bytes.
    pages: Option<NonNull<c_void>>,
    capacity: usize,
    len: usize,
}

// SAFETY: the mapping is owned by this buffer alone (no other pointer to it
// exists), so it moves between threads and is shared read-only like a Vec.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `capacity` bytes rounded up to a multiple of
    /// [`ALIGNMENT`]. Its length starts at the full capacity. Out of memory,
    /// it aborts as a `Vec` does.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.next_multiple_of(ALIGNMENT);
        let pages = NonZeroUsize::new(capacity).map(|length| {
            // SAFETY: a fresh private anonymous mapping aliases nothing.
            let mapped = unsafe {
                mman::mmap_anonymous(
                    None,
                    length,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE,
                )
            };
            mapped.unwrap_or_else(|_| {
                std::alloc::handle_alloc_error(
                    Layout::from_size_align(capacity, ALIGNMENT).unwrap_or(Layout::new::<u8>()),
                )
            })
        });
        AlignedBuf {
            pages,
            capacity,
            len: capacity,
        }
    }

    /// The bytes in use: `[0, len)`.
    pub fn as_slice(&self) -> &[u8] {
        match self.pages {
            // SAFETY: the mapping holds `capacity` readable bytes, `len` is
            // at most that, and it lives as long as `self`.
            Some(pages) => unsafe {
                std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), self.len)
            },
            None => &[],
        }
    }

    /// The bytes in use: `[0, len)`, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.pages {
            // SAFETY: as in `as_slice`; `&mut self` makes the access unique.
            Some(pages) => unsafe {
                std::slice::from_raw_parts_mut(pages.as_ptr().cast::<u8>(), self.len)
            },
            None => &mut [],
        }
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

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pages) = self.pages.take() {
            // SAFETY: the mapping of `capacity` bytes is this buffer's, and
            // no slice of it outlives `self`. A failed munmap leaks it.
            let _ = unsafe { mman::munmap(pages, self.capacity) };
        }
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
    fn a_new_buffer_reads_as_zeros_and_a_reused_one_keeps_its_bytes() {
        let mut buf = AlignedBuf::new(3 * ALIGNMENT);
        assert!(buf.iter().all(|&b| b == 0));
        buf.as_mut_slice()[ALIGNMENT + 5] = 9;
        buf.set_len(0);
        buf.set_len(3 * ALIGNMENT);
        assert_eq!(buf[ALIGNMENT + 5], 9);
        assert_eq!(AlignedBuf::new(0).as_slice(), &[] as &[u8]);
    }

    #[test]
    #[should_panic(expected = "exceeds capacity")]
    fn set_len_beyond_capacity_is_a_bug() {
        AlignedBuf::new(4096).set_len(4097);
    }
}
