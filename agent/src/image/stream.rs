//! The first stages of the pipeline, joined by a fixed pool of aligned
//! buffers so memory stays constant whatever the image size:
//!
//! ```text
//! decoder thread (decodes and surveys) → [filled] → outline (size cap,
//!   │                                     held-back head; the caller)
//!   ├→ the sink (the caller) → its writer threads  ┐
//!   └→ [hashing] → SHA-256 thread                  ┴→ all done with a chunk → [free] → decoder
//! ```
//!
//! A decoded chunk is shared, read-only, by the sink and the SHA-256
//! thread, and goes back to the pool when all are done with it: the disk
//! is written while the same bytes are hashed, so a write costs the slowest
//! of decoding, hashing and disk I/O rather than their sum. The bytes
//! written are the bytes hashed: nobody can change a chunk once it is
//! shared. Its [`Survey`] (zero blocks, digest for the read-back) is taken
//! by the decoder as it fills the buffer, so it describes the same bytes.

use crate::disk::aligned::AlignedBuf;
use crate::image::measure::{ImageSha256, Measured, Outline};
use crate::image::survey::{Survey, Surveyor};
use crate::{Error, Result};
use std::borrow::Cow;
use std::io::Read;
use std::ops::Deref;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

/// Size of one buffer: large writes for O_DIRECT, few channel hand-offs.
pub const CHUNK_SIZE: usize = 4 << 20;
/// The most decoded in one read: small enough to still be in the decoder's
/// cache (L2) when it is surveyed.
const SURVEY_PIECE: usize = 256 << 10;
/// Buffers in flight: enough for the decoder to run a chunk ahead of the
/// writer and the hasher, and for either of those to run a few chunks
/// ahead of the other (24 MiB in all).
pub const POOL_SIZE: usize = 6;

/// The way back to the decoder for buffers done with. Closing it is what
/// stops a decoder waiting for a buffer, so a stream dropped midway never
/// leaves it waiting, even while chunks are still held.
struct Pool {
    free: Mutex<Option<SyncSender<AlignedBuf>>>,
}

impl Pool {
    fn give_back(&self, buffer: AlignedBuf) {
        if let Ok(free) = self.free.lock()
            && let Some(free) = free.as_ref()
        {
            // Never blocks: the channel holds every buffer there is.
            let _ = free.try_send(buffer);
        }
    }

    fn close(&self) {
        if let Ok(mut free) = self.free.lock() {
            free.take();
        }
    }
}

/// A buffer of decoded image bytes, back to its pool when dropped.
struct Pooled {
    buffer: Option<AlignedBuf>,
    /// Taken by the decoder as it filled the buffer.
    survey: Survey,
    pool: Arc<Pool>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

/// One chunk of decoded image bytes, shared read-only by whoever holds a
/// clone of it; its buffer goes back to the pool when the last is dropped.
#[derive(Clone)]
pub struct Chunk(Arc<Pooled>);

impl Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0.buffer.as_deref().unwrap_or_default()
    }
}

impl Chunk {
    /// Its zero blocks and digest, as the decoder found them.
    pub fn survey(&self) -> &Survey {
        &self.0.survey
    }

    /// The survey of `self[from..]`: the decoder's for all of it, else taken
    /// now (only the chunk holding the end of the held head needs that).
    pub fn survey_from(&self, from: usize) -> Cow<'_, Survey> {
        if from == 0 {
            Cow::Borrowed(self.survey())
        } else {
            Cow::Owned(Survey::of(&self[from..]))
        }
    }

    /// A chunk of a copy of `bytes`, belonging to no pool.
    #[cfg(test)]
    pub(crate) fn unpooled(bytes: &[u8]) -> Chunk {
        let mut buffer = AlignedBuf::new(bytes.len());
        buffer.set_len(bytes.len());
        buffer.copy_from_slice(bytes);
        let pool = Arc::new(Pool {
            free: Mutex::new(None),
        });
        Chunk(Arc::new(Pooled {
            survey: Survey::of(&buffer),
            buffer: Some(buffer),
            pool,
        }))
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk").field("len", &self.len()).finish()
    }
}

/// Decoded image bytes in full chunks (only the last one may be short).
pub struct ChunkStream {
    filled: Option<Receiver<Result<Chunk>>>,
    pool: Arc<Pool>,
    reader: Option<JoinHandle<()>>,
}

impl ChunkStream {
    /// Starts the decoder thread over `decoded`, with [`POOL_SIZE`] buffers.
    pub fn spawn(decoded: Box<dyn Read + Send>) -> Result<ChunkStream> {
        let (filled_tx, filled) = mpsc::sync_channel(POOL_SIZE);
        let (free, free_rx) = mpsc::sync_channel(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            free.send(AlignedBuf::new(CHUNK_SIZE)).map_err(|_| {
                Error::io(
                    "starting the reader",
                    std::io::Error::other("channel closed"),
                )
            })?;
        }
        let pool = Arc::new(Pool {
            free: Mutex::new(Some(free)),
        });
        let reader_pool = Arc::clone(&pool);
        let reader = thread::Builder::new()
            .name("image-reader".into())
            .spawn(move || read_chunks(decoded, free_rx, &reader_pool, filled_tx))
            .map_err(|e| Error::io("starting the reader thread", e))?;
        Ok(ChunkStream {
            filled: Some(filled),
            pool,
            reader: Some(reader),
        })
    }

    /// The next chunk, `None` at the end of the image.
    pub fn next_chunk(&mut self) -> Option<Result<Chunk>> {
        self.filled.as_ref()?.recv().ok()
    }
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        // Closing the channel unblocks a decoder waiting to hand a chunk
        // over; closing the pool one waiting for a buffer.
        self.filled.take();
        self.pool.close();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// What the measured stream hands the writer, in image order.
#[derive(Debug)]
pub enum Piece {
    /// The image's first bytes, all [`crate::disk::HEAD_LEN`] of them (or
    /// the whole image if shorter), sent before the chunk that completes
    /// them: nothing may be written before the table is prepared from them.
    Head(Vec<u8>),
    /// The next chunk, within the announced size; it is being hashed.
    Chunk(Chunk),
    /// The end of the image: [`MeasuredStream::finish`] gives its hash.
    End,
}

/// Decoded chunks, outlined in order on the caller's thread and hashed on
/// a thread of their own while the caller writes them.
pub struct MeasuredStream {
    chunks: ChunkStream,
    outline: Option<Outline>,
    head_sent: bool,
    /// The chunk that completed the head, handed on after it.
    after_head: Option<Chunk>,
    hashing: Option<SyncSender<Chunk>>,
    hasher: Option<JoinHandle<String>>,
}

impl MeasuredStream {
    /// Starts the decoder and hashing threads over `decoded`, which must
    /// not run past `cap` bytes if given.
    pub fn spawn(decoded: Box<dyn Read + Send>, cap: Option<u64>) -> Result<MeasuredStream> {
        let chunks = ChunkStream::spawn(decoded)?;
        // Never full: there are only POOL_SIZE chunks.
        let (hashing, to_hash) = mpsc::sync_channel(POOL_SIZE);
        let hasher = thread::Builder::new()
            .name("image-sha256".into())
            .spawn(move || hash_chunks(to_hash))
            .map_err(|e| Error::io("starting the hashing thread", e))?;
        Ok(MeasuredStream {
            chunks,
            outline: Some(Outline::new(cap)),
            head_sent: false,
            after_head: None,
            hashing: Some(hashing),
            hasher: Some(hasher),
        })
    }

    /// The next piece; after an error, `None`.
    pub fn next_piece(&mut self) -> Option<Result<Piece>> {
        if let Some(chunk) = self.after_head.take() {
            return Some(Ok(Piece::Chunk(chunk)));
        }
        let outline = self.outline.as_mut()?;
        let Some(chunk) = self.chunks.next_chunk() else {
            if !self.head_sent {
                self.head_sent = true;
                return Some(Ok(Piece::Head(outline.head().to_vec())));
            }
            self.hashing.take();
            return Some(Ok(Piece::End));
        };
        let chunk = match chunk.and_then(|chunk| outline.update(&chunk).map(|()| chunk)) {
            Ok(chunk) => chunk,
            Err(err) => {
                self.outline = None;
                return Some(Err(err));
            }
        };
        let hashed = self
            .hashing
            .as_ref()
            .map(|hashing| hashing.send(chunk.clone()));
        if !matches!(hashed, Some(Ok(()))) {
            self.outline = None;
            return Some(Err(hashing_stopped()));
        }
        if !self.head_sent
            && let Some(head) = outline.full_head()
        {
            self.head_sent = true;
            let head = head.to_vec();
            self.after_head = Some(chunk);
            return Some(Ok(Piece::Head(head)));
        }
        Some(Ok(Piece::Chunk(chunk)))
    }

    /// What the whole image measured, once [`Piece::End`] was handed on:
    /// waits for the hashing thread to hash the last chunk.
    pub fn finish(&mut self) -> Result<Measured> {
        self.hashing.take();
        let sha256 = self
            .hasher
            .take()
            .and_then(|hasher| hasher.join().ok())
            .ok_or_else(hashing_stopped)?;
        let outline = self.outline.take().ok_or_else(hashing_stopped)?;
        Ok(outline.finish(sha256))
    }
}

impl Drop for MeasuredStream {
    fn drop(&mut self) {
        // The hasher ends once its channel is closed and drained; the
        // decoder when the chunk stream is dropped after it.
        self.hashing.take();
        self.after_head.take();
        if let Some(hasher) = self.hasher.take() {
            let _ = hasher.join();
        }
    }
}

/// The hashing thread ended before the end of the image: it cannot, short
/// of a panic there.
fn hashing_stopped() -> Error {
    Error::io(
        "hashing the image",
        std::io::Error::other("the hashing thread stopped before the end of the image"),
    )
}

/// The SHA-256 of every chunk handed over, in order, until the channel
/// closes; each chunk is dropped as soon as it is hashed.
fn hash_chunks(chunks: Receiver<Chunk>) -> String {
    let mut hasher = ImageSha256::default();
    for chunk in chunks {
        hasher.update(&chunk[..]);
    }
    hasher.finish()
}

fn read_chunks(
    mut decoded: Box<dyn Read + Send>,
    free: Receiver<AlignedBuf>,
    pool: &Arc<Pool>,
    filled: SyncSender<Result<Chunk>>,
) {
    while let Ok(mut buffer) = free.recv() {
        match fill(&mut decoded, &mut buffer) {
            Ok(survey) if survey.is_empty() => return,
            Ok(survey) => {
                let chunk = Chunk(Arc::new(Pooled {
                    buffer: Some(buffer),
                    survey,
                    pool: Arc::clone(pool),
                }));
                if filled.send(Ok(chunk)).is_err() {
                    return;
                }
            }
            Err(err) => {
                let _ = filled.send(Err(err));
                return;
            }
        }
    }
}

/// Fills `buffer` completely unless the image ends first, and returns its
/// survey (whose length is the buffer's), taken a piece of at most
/// [`SURVEY_PIECE`] bytes at a time, each looked at right after it was
/// decoded, while it is in this core's cache.
fn fill(decoded: &mut dyn Read, buffer: &mut AlignedBuf) -> Result<Survey> {
    let capacity = buffer.capacity();
    buffer.set_len(capacity);
    let mut surveyor = Surveyor::default();
    let mut len = 0;
    while len < capacity {
        let end = (len + SURVEY_PIECE).min(capacity);
        match decoded.read(&mut buffer[len..end]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                surveyor.advance(&buffer[..len]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(e, "reading the image")),
        }
    }
    buffer.set_len(len);
    Ok(surveyor.finish(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::HEAD_LEN;
    use sha2::{Digest, Sha256};
    use std::io;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn chunks_are_full_except_the_last_and_concatenate_to_the_input() {
        let mut data = pattern(CHUNK_SIZE * 2 + 1234);
        data[CHUNK_SIZE + 8192..CHUNK_SIZE * 2 - 4096].fill(0);
        let mut stream =
            ChunkStream::spawn(Box::new(io::Cursor::new(data.clone()))).expect("spawns");
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        while let Some(chunk) = stream.next_chunk() {
            let chunk = chunk.expect("reads");
            sizes.push(chunk.len());
            assert_eq!(chunk.survey(), &Survey::of(&chunk), "surveyed as decoded");
            let from = chunk.len().min(4096);
            assert_eq!(
                chunk.survey_from(from).into_owned(),
                Survey::of(&chunk[from..])
            );
            out.extend_from_slice(&chunk);
        }
        assert_eq!(sizes, vec![CHUNK_SIZE, CHUNK_SIZE, 1234]);
        assert!(out == data);
    }

    #[test]
    fn a_read_error_ends_the_stream_with_that_error() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(Error::DownloadFailed("connection reset".into()).into_io())
            }
        }
        let mut stream = ChunkStream::spawn(Box::new(Failing)).expect("spawns");
        let err = stream.next_chunk().expect("an item").expect_err("fails");
        assert_eq!(err.code(), "DownloadFailed");
        assert!(stream.next_chunk().is_none());
    }

    #[test]
    fn dropping_the_stream_early_stops_the_reader_even_with_every_buffer_held() {
        let endless = io::repeat(1);
        let mut stream = ChunkStream::spawn(Box::new(endless)).expect("spawns");
        let held: Vec<_> = (0..POOL_SIZE).filter_map(|_| stream.next_chunk()).collect();
        assert_eq!(held.len(), POOL_SIZE);
        drop(stream); // must not hang: the reader sees the pool close
        drop(held);
    }

    #[test]
    fn a_chunk_goes_back_to_the_pool_only_when_its_last_holder_drops_it() {
        let (free, free_rx) = mpsc::sync_channel(1);
        let pool = Arc::new(Pool {
            free: Mutex::new(Some(free)),
        });
        let chunk = Chunk(Arc::new(Pooled {
            buffer: Some(AlignedBuf::new(4096)),
            survey: Survey::of(&[0; 4096]),
            pool: Arc::clone(&pool),
        }));
        let clone = chunk.clone();
        drop(chunk);
        assert!(free_rx.try_recv().is_err(), "still held by the clone");
        drop(clone);
        assert!(
            free_rx.try_recv().is_ok(),
            "back once the last holder let go"
        );
        let after_close = Chunk(Arc::new(Pooled {
            buffer: Some(AlignedBuf::new(4096)),
            survey: Survey::of(&[0; 4096]),
            pool: Arc::clone(&pool),
        }));
        pool.close();
        drop(after_close);
        assert!(
            matches!(free_rx.try_recv(), Err(mpsc::TryRecvError::Disconnected)),
            "a closed pool takes nothing back and wakes the decoder"
        );
    }

    /// Drains a measured stream as a writer does.
    fn drain(mut stream: MeasuredStream) -> Result<(Vec<u8>, Vec<u8>, Measured)> {
        let (mut head, mut data) = (None, Vec::new());
        loop {
            match stream.next_piece().expect("never cut off")? {
                Piece::Head(bytes) => {
                    assert!(head.is_none(), "one head");
                    // Before the head, nothing past it: a short image's
                    // only chunk may come first, as nothing of it is written.
                    assert!(
                        data.len() < HEAD_LEN,
                        "the head comes before the chunk that completes it"
                    );
                    head = Some(bytes);
                }
                Piece::Chunk(chunk) => data.extend_from_slice(&chunk),
                Piece::End => {
                    let measured = stream.finish()?;
                    return Ok((head.expect("a head"), data, measured));
                }
            }
        }
    }

    #[test]
    fn the_measured_stream_hands_over_the_head_first_and_the_hash_last() {
        let data = pattern(CHUNK_SIZE * 3 + 99);
        let stream =
            MeasuredStream::spawn(Box::new(io::Cursor::new(data.clone())), None).expect("spawns");
        let (head, out, measured) = drain(stream).expect("measures");
        assert_eq!(head, data[..HEAD_LEN]);
        assert!(out == data);
        assert_eq!(measured.size, data.len() as u64);
        assert_eq!(measured.sha256, hex::encode(Sha256::digest(&data)));
    }

    #[test]
    fn a_short_image_is_all_head_and_an_endless_one_stops_at_the_cap() {
        let stream = MeasuredStream::spawn(Box::new(io::Cursor::new(b"tiny".to_vec())), None)
            .expect("spawns");
        let (head, _, measured) = drain(stream).expect("measures");
        assert_eq!(head, b"tiny");
        assert_eq!(measured.size, 4);

        let capped = MeasuredStream::spawn(Box::new(io::repeat(0)), Some(10 * CHUNK_SIZE as u64))
            .expect("spawns");
        let err = drain(capped).expect_err("runs past the cap");
        assert_eq!(err.code(), "ImageSizeMismatch");
    }

    #[test]
    fn dropping_a_measured_stream_midway_joins_its_threads() {
        let mut stream = MeasuredStream::spawn(Box::new(io::repeat(1)), None).expect("spawns");
        // Hold the buffers, as a writer that failed does.
        let held: Vec<_> = (0..3).filter_map(|_| stream.next_piece()).collect();
        drop(stream);
        assert_eq!(held.len(), 3);
    }
}
