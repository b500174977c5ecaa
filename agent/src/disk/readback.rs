//! Read-back verification: the disk holds the bytes that were hashed.
//!
//! While streaming, each chunk written is recorded from the very buffer the
//! SHA-256 measured: as all zeros, or by its XXH3-128 digest (16 bytes per
//! 4 MiB; it guards against a disk that returns other bytes, not against
//! an adversary, which the SHA-256 does). After the last write and fsync the image extent is read back with
//! several O_DIRECT reads in flight, each chunk checked against its record
//! on the thread that read it. So the read-back costs the reads, not a
//! second SHA-256 pass on one thread; and it still reads everything, so it
//! also catches a write that landed somewhere else.

use crate::disk::aligned::AlignedBuf;
use crate::disk::device::Target;
use crate::image::survey::{Survey, is_zero};
use crate::progress::ProgressMeter;
use crate::{Error, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

/// Reads in flight while reading back: enough to keep a disk's queue busy,
/// and each reader checks what it read while the others wait on the disk.
pub const READS_IN_FLIGHT: usize = 4;

/// The largest zero run checked as one read.
const ZERO_PIECE: u64 = 4 << 20;

/// What one written chunk must read back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// A zero run: zeroed on the disk, checked as zeros.
    Zeros,
    Digest(u128),
}

#[derive(Debug, Clone)]
struct Chunk {
    offset: u64,
    len: usize,
    expected: Expected,
}

/// The chunks written to the target, with what each must read back as.
#[derive(Debug, Clone, Default)]
pub struct WrittenChunks {
    chunks: Vec<Chunk>,
}

impl WrittenChunks {
    /// No chunks yet.
    pub fn new() -> Self {
        WrittenChunks::default()
    }

    /// Records `data`, just written at `offset` of the target.
    pub fn record(&mut self, offset: u64, data: &[u8]) {
        self.record_surveyed(offset, &Survey::of(data));
    }

    /// Records the chunk `survey` describes, just written at `offset`.
    pub fn record_surveyed(&mut self, offset: u64, survey: &Survey) {
        let expected = if survey.all_zero() {
            Expected::Zeros
        } else {
            Expected::Digest(survey.digest())
        };
        self.chunks.push(Chunk {
            offset,
            len: survey.len(),
            expected,
        });
    }

    /// Records `len` bytes at `offset`, just zeroed.
    pub fn record_zeros(&mut self, offset: u64, len: u64) {
        // A zero run is checked in pieces no larger than a data chunk's.
        let mut at = offset;
        while at < offset + len {
            let piece = (offset + len - at).min(ZERO_PIECE);
            self.chunks.push(Chunk {
                offset: at,
                len: piece as usize,
                expected: Expected::Zeros,
            });
            at += piece;
        }
    }

    /// Bytes recorded.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len as u64).sum()
    }

    /// Reads every recorded chunk back from `target`, [`READS_IN_FLIGHT`] at
    /// a time, and checks it. Progress goes to `meter`, counted on from
    /// `done_before`. The first failure is returned: `DiskReadFailed`
    /// naming the offset, or `ReadbackMismatch` naming the bytes.
    pub fn verify(
        &self,
        target: &Target,
        meter: &mut ProgressMeter<'_>,
        done_before: u64,
    ) -> Result<()> {
        if !target.uses_direct_io() {
            // Buffered: the page cache would answer for the disk.
            target.drop_caches()?;
        }
        let extents: Vec<_> = self
            .chunks
            .iter()
            .map(|c| c.offset..c.offset + c.len as u64)
            .collect();
        let mut done = done_before;
        read_each(
            target,
            &extents,
            &|number, bytes| check(target, &self.chunks[number], bytes),
            &mut |_, len, ()| {
                done += len;
                meter.update(done);
            },
        )
    }
}

/// Reads each of `extents` of `target`, [`READS_IN_FLIGHT`] at a time, and
/// calls `check(number, bytes)` on the thread that read it, so that checks
/// run while the other reads wait on the disk; `done(number, length,
/// checked)` runs on the caller's thread as each completes, in any order.
/// The first error stops the reads and is returned.
pub fn read_each<T: Send>(
    target: &Target,
    extents: &[Range<u64>],
    check: &(dyn Fn(usize, &[u8]) -> Result<T> + Sync),
    done: &mut dyn FnMut(usize, u64, T),
) -> Result<()> {
    let largest = extents.iter().map(|e| e.end - e.start).max().unwrap_or(0);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (checked_tx, checked) = mpsc::channel::<(usize, u64, Result<T>)>();
    std::thread::scope(|scope| {
        let mut first_error = None;
        for _ in 0..READS_IN_FLIGHT.min(extents.len()) {
            let checked_tx = checked_tx.clone();
            let (next, stop) = (&next, &stop);
            let reader = move || {
                let mut buffer = AlignedBuf::new(largest as usize);
                while !stop.load(Ordering::Relaxed) {
                    let number = next.fetch_add(1, Ordering::Relaxed);
                    let Some(extent) = extents.get(number) else {
                        break;
                    };
                    let len = extent.end - extent.start;
                    buffer.set_len(len as usize);
                    let result = target
                        .read_at(&mut buffer[..], extent.start)
                        .and_then(|()| check(number, &buffer));
                    if checked_tx.send((number, len, result)).is_err() {
                        break;
                    }
                }
            };
            let spawned = std::thread::Builder::new()
                .name("disk-read".into())
                .spawn_scoped(scope, reader);
            if let Err(e) = spawned {
                stop.store(true, Ordering::Relaxed);
                first_error = Some(Error::io("starting a disk reading thread", e));
                break;
            }
        }
        drop(checked_tx);
        for (number, len, result) in checked {
            match result {
                Ok(value) => done(number, len, value),
                Err(err) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// Reads `extents` of `target` with [`READS_IN_FLIGHT`] reads in flight and
/// hands them to `each(number, bytes)` on the caller's thread in order, so
/// that an in-order digest (SHA-256) runs while the disk reads ahead. At
/// most twice [`READS_IN_FLIGHT`] extents are held at once. The first error
/// stops the reads and is returned.
pub fn read_in_order(
    target: &Target,
    extents: &[Range<u64>],
    each: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
) -> Result<()> {
    let largest = extents.iter().map(|e| e.end - e.start).max().unwrap_or(0) as usize;
    let next = AtomicUsize::new(0);
    // Buffers circulate: a reader takes one before it claims the next
    // extent, so the lowest extent not yet handed on is always being read
    // and the caller never waits on a reader that waits on it.
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..2 * READS_IN_FLIGHT {
        let _ = free_tx.send(AlignedBuf::new(largest));
    }
    let free_rx = std::sync::Mutex::new(free_rx);
    let (read_tx, read) = mpsc::channel::<(usize, Result<AlignedBuf>)>();
    std::thread::scope(|scope| {
        // Owned here, so that it is dropped before the readers are joined.
        let free_tx = free_tx;
        for _ in 0..READS_IN_FLIGHT.min(extents.len()) {
            let read_tx = read_tx.clone();
            let (next, free_rx) = (&next, &free_rx);
            let reader = move || {
                loop {
                    let buffer = match free_rx.lock().map(|free| free.recv()) {
                        Ok(Ok(buffer)) => buffer,
                        _ => break,
                    };
                    let number = next.fetch_add(1, Ordering::Relaxed);
                    let Some(extent) = extents.get(number) else {
                        break;
                    };
                    let mut buffer = buffer;
                    buffer.set_len((extent.end - extent.start) as usize);
                    let result = target
                        .read_at(&mut buffer[..], extent.start)
                        .map(|()| buffer);
                    if read_tx.send((number, result)).is_err() {
                        break;
                    }
                }
            };
            std::thread::Builder::new()
                .name("disk-read".into())
                .spawn_scoped(scope, reader)
                .map_err(|e| Error::io("starting a disk reading thread", e))?;
        }
        drop(read_tx);
        let mut waiting = std::collections::BTreeMap::new();
        let mut hand_on = || -> Result<()> {
            let mut wanted = 0;
            while wanted < extents.len() {
                let Ok((number, result)) = read.recv() else {
                    return Err(Error::io(
                        "reading the target",
                        std::io::Error::other("the reading threads stopped early"),
                    ));
                };
                waiting.insert(number, result?);
                while let Some(buffer) = waiting.remove(&wanted) {
                    each(wanted, &buffer)?;
                    let _ = free_tx.send(buffer);
                    wanted += 1;
                }
            }
            Ok(())
        };
        let handed = hand_on();
        // Without a sender the readers waiting for a buffer end.
        drop(free_tx);
        handed
    })
}

/// Checks `bytes`, read back where `chunk` was written, against its record.
fn check(target: &Target, chunk: &Chunk, bytes: &[u8]) -> Result<()> {
    let matches = match chunk.expected {
        Expected::Zeros => bytes.chunks(4096).all(is_zero),
        Expected::Digest(digest) => xxh3_128(bytes) == digest,
    };
    if matches {
        return Ok(());
    }
    Err(Error::ReadbackMismatch(format!(
        "bytes {}..{} of {} read back differently from the image {} written there",
        chunk.offset,
        chunk.offset + chunk.len as u64,
        target.path().display(),
        match chunk.expected {
            Expected::Zeros => "zeros",
            Expected::Digest(_) => "bytes",
        }
    )))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const MIB: usize = 1 << 20;

    /// A target file holding `bytes`, and chunks recorded from `bytes` in
    /// 1 MiB pieces from 1 MiB on.
    fn written(bytes: &[u8]) -> (tempfile::TempDir, Target, WrittenChunks) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        fs::write(&path, bytes).expect("target");
        let target = Target::open_for_write(&path).expect("opens");
        let mut chunks = WrittenChunks::new();
        for (i, piece) in bytes.chunks(MIB).enumerate().skip(1) {
            chunks.record((i * MIB) as u64, piece);
        }
        (dir, target, chunks)
    }

    fn image() -> Vec<u8> {
        let mut bytes = vec![0u8; 9 * MIB + 1000];
        fastrand::Rng::with_seed(3).fill(&mut bytes[..4 * MIB]);
        fastrand::Rng::with_seed(4).fill(&mut bytes[8 * MIB..]);
        bytes
    }

    #[test]
    fn extents_are_handed_on_in_order_and_an_error_stops_the_reads() {
        let bytes = image();
        let (_dir, target, _) = written(&bytes);
        let extents: Vec<_> = (0..bytes.len() as u64)
            .step_by(300_000)
            .map(|start| start..(start + 300_000).min(bytes.len() as u64))
            .collect();
        let mut seen = Vec::new();
        read_in_order(&target, &extents, &mut |number, read| {
            seen.push(number);
            let extent = &extents[number];
            assert!(read[..] == bytes[extent.start as usize..extent.end as usize]);
            Ok(())
        })
        .expect("reads");
        assert_eq!(seen, (0..extents.len()).collect::<Vec<_>>());
        let mut handed = 0;
        let err = read_in_order(&target, &extents, &mut |number, _| {
            handed += 1;
            if number == 3 {
                return Err(Error::ReadbackMismatch("stop".into()));
            }
            Ok(())
        })
        .expect_err("the error ends it");
        assert!(matches!(err, Error::ReadbackMismatch(_)), "{err}");
        assert_eq!(handed, 4, "nothing is handed on after the error");
        let past_the_end = [0..100, bytes.len() as u64..bytes.len() as u64 + 10];
        let err =
            read_in_order(&target, &past_the_end, &mut |_, _| Ok(())).expect_err("past the end");
        assert!(matches!(err, Error::DiskReadFailed { .. }), "{err}");
    }

    #[test]
    fn what_was_written_verifies_zero_runs_included() {
        let bytes = image();
        let (_dir, target, chunks) = written(&bytes);
        assert_eq!(chunks.bytes(), (bytes.len() - MIB) as u64);
        let zero_chunks = chunks
            .chunks
            .iter()
            .filter(|c| c.expected == Expected::Zeros);
        assert_eq!(zero_chunks.count(), 4, "MiB 4 to 8 are zeros");
        let mut seen = Vec::new();
        {
            let mut report = |p: &reimage_protocol::WriteProgress| seen.push(p.bytes_written);
            let mut meter = ProgressMeter::new(&mut report);
            chunks
                .verify(&target, &mut meter, MIB as u64)
                .expect("verifies");
        }
        assert!(seen.iter().all(|&b| b >= MIB as u64), "{seen:?}");
    }

    #[test]
    fn one_changed_byte_in_data_or_in_a_zero_run_is_a_mismatch_naming_the_chunk() {
        for at in [2 * MIB + 17, 5 * MIB + 4095, 9 * MIB + 999] {
            let bytes = image();
            let (_dir, target, chunks) = written(&bytes);
            target
                .write_at(&[bytes[at] ^ 0x20], at as u64)
                .expect("corrupts");
            let mut report = |_: &reimage_protocol::WriteProgress| {};
            let mut meter = ProgressMeter::new(&mut report);
            let err = chunks
                .verify(&target, &mut meter, 0)
                .expect_err("the change is seen");
            assert_eq!(err.code(), "ReadbackMismatch", "{err}");
            let start = at / MIB * MIB;
            assert!(
                err.to_string().contains(&format!("bytes {start}..")),
                "names the chunk holding byte {at}: {err}"
            );
        }
    }

    #[test]
    fn a_read_past_the_end_fails_with_disk_read_failed() {
        let bytes = image();
        let (_dir, target, mut chunks) = written(&bytes);
        chunks.record(bytes.len() as u64, &[1; 4096]);
        let mut report = |_: &reimage_protocol::WriteProgress| {};
        let mut meter = ProgressMeter::new(&mut report);
        let err = chunks
            .verify(&target, &mut meter, 0)
            .expect_err("past the end");
        assert_eq!(err.code(), "DiskReadFailed", "{err}");
        assert!(
            err.to_string().contains(&format!("offset {}", bytes.len())),
            "{err}"
        );
    }
}
