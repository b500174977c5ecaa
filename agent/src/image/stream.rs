//! The first two threads of the pipeline, joined by a fixed pool of aligned
//! buffers so memory stays constant whatever the image size:
//!
//! ```text
//! decoder thread → [filled] → measuring thread (SHA-256, size cap, head)
//!   → [measured] → the writer (the caller) → [free] → decoder thread
//! ```
//!
//! Decoding, hashing and disk I/O each run on their own thread, so a write
//! costs the slowest of the three rather than their sum.

use crate::disk::aligned::AlignedBuf;
use crate::image::measure::{Measure, Measured};
use crate::{Error, Result};
use std::io::Read;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

/// Size of one buffer: large writes for O_DIRECT, few channel hand-offs.
pub const CHUNK_SIZE: usize = 4 << 20;
/// Buffers in flight: enough for the decoder to run a chunk ahead of the
/// hasher and the hasher a chunk ahead of the writer, with one to spare
/// at each hand-off (24 MiB in all).
pub const POOL_SIZE: usize = 6;

/// Decoded image bytes in full chunks (only the last one may be short).
pub struct ChunkStream {
    filled: Option<Receiver<Result<AlignedBuf>>>,
    reader: Option<JoinHandle<()>>,
}

/// Hands used buffers back to the decoder. It is the pool's only way back:
/// once it is dropped the decoder stops at its next buffer, so dropping it
/// before joining can never leave the decoder waiting.
pub struct Recycler(SyncSender<AlignedBuf>);

impl Recycler {
    /// Hands a buffer back to the decoder.
    pub fn recycle(&self, buffer: AlignedBuf) {
        // The decoder may have finished; then the buffer is simply dropped.
        let _ = self.0.send(buffer);
    }
}

impl ChunkStream {
    /// Starts the decoder thread over `decoded`, with [`POOL_SIZE`] buffers.
    pub fn spawn(decoded: Box<dyn Read + Send>) -> Result<(ChunkStream, Recycler)> {
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
        let reader = thread::Builder::new()
            .name("image-reader".into())
            .spawn(move || read_chunks(decoded, free_rx, filled_tx))
            .map_err(|e| Error::io("starting the reader thread", e))?;
        let stream = ChunkStream {
            filled: Some(filled),
            reader: Some(reader),
        };
        Ok((stream, Recycler(free)))
    }

    /// The next chunk, `None` at the end of the image.
    pub fn next_chunk(&mut self) -> Option<Result<AlignedBuf>> {
        self.filled.as_ref()?.recv().ok()
    }
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        // Closing the channel unblocks a decoder waiting to hand a chunk
        // over; one waiting for a buffer wakes when the recycler is dropped.
        self.filled.take();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// What the measuring thread hands the writer, in image order.
#[derive(Debug)]
pub enum Piece {
    /// The image's first bytes, all [`crate::disk::HEAD_LEN`] of them (or
    /// the whole image if shorter), sent before the chunk that completes
    /// them: nothing may be written before the table is prepared from them.
    Head(Vec<u8>),
    /// The next chunk, hashed.
    Chunk(AlignedBuf),
    /// The end of the image and what it measured; nothing follows.
    End(Measured),
}

/// Decoded chunks that passed the measuring stage on its own thread.
pub struct MeasuredStream {
    pieces: Option<Receiver<Result<Piece>>>,
    recycler: Option<Recycler>,
    measurer: Option<JoinHandle<()>>,
}

impl MeasuredStream {
    /// Starts the decoder and measuring threads over `decoded`, which must
    /// not run past `cap` bytes if given.
    pub fn spawn(decoded: Box<dyn Read + Send>, cap: Option<u64>) -> Result<MeasuredStream> {
        let (chunks, recycler) = ChunkStream::spawn(decoded)?;
        let (pieces_tx, pieces) = mpsc::sync_channel(POOL_SIZE);
        let measurer = thread::Builder::new()
            .name("image-sha256".into())
            .spawn(move || measure_chunks(chunks, Measure::new(cap), &pieces_tx))
            .map_err(|e| Error::io("starting the hashing thread", e))?;
        Ok(MeasuredStream {
            pieces: Some(pieces),
            recycler: Some(recycler),
            measurer: Some(measurer),
        })
    }

    /// The next piece; `None` only if the measuring thread is gone, which
    /// it never is before [`Piece::End`] or an error.
    pub fn next_piece(&mut self) -> Option<Result<Piece>> {
        self.pieces.as_ref()?.recv().ok()
    }

    /// Hands a written chunk's buffer back to the decoder.
    pub fn recycle(&self, buffer: AlignedBuf) {
        if let Some(recycler) = &self.recycler {
            recycler.recycle(buffer);
        }
    }
}

impl Drop for MeasuredStream {
    fn drop(&mut self) {
        // The order matters: the measurer stops at its next hand-off, the
        // decoder at its next buffer; then neither can wait on the other.
        self.pieces.take();
        self.recycler.take();
        if let Some(measurer) = self.measurer.take() {
            let _ = measurer.join();
        }
    }
}

fn measure_chunks(
    mut chunks: ChunkStream,
    mut measure: Measure,
    pieces: &SyncSender<Result<Piece>>,
) {
    let mut head_sent = false;
    while let Some(chunk) = chunks.next_chunk() {
        let piece = chunk.and_then(|chunk| measure.update(&chunk).map(|()| chunk));
        let chunk = match piece {
            Ok(chunk) => chunk,
            Err(err) => {
                let _ = pieces.send(Err(err));
                return;
            }
        };
        if !head_sent && let Some(head) = measure.full_head() {
            head_sent = true;
            if pieces.send(Ok(Piece::Head(head.to_vec()))).is_err() {
                return;
            }
        }
        if pieces.send(Ok(Piece::Chunk(chunk))).is_err() {
            return;
        }
    }
    if !head_sent
        && pieces
            .send(Ok(Piece::Head(measure.head().to_vec())))
            .is_err()
    {
        return;
    }
    let _ = pieces.send(Ok(Piece::End(measure.finish())));
}

fn read_chunks(
    mut decoded: Box<dyn Read + Send>,
    free: Receiver<AlignedBuf>,
    filled: SyncSender<Result<AlignedBuf>>,
) {
    while let Ok(mut buffer) = free.recv() {
        match fill(&mut decoded, &mut buffer) {
            Ok(0) => return,
            Ok(_) => {
                if filled.send(Ok(buffer)).is_err() {
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

/// Fills `buffer` completely unless the image ends first.
fn fill(decoded: &mut dyn Read, buffer: &mut AlignedBuf) -> Result<usize> {
    let capacity = buffer.capacity();
    buffer.set_len(capacity);
    let mut len = 0;
    while len < capacity {
        match decoded.read(&mut buffer[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(e, "reading the image")),
        }
    }
    buffer.set_len(len);
    Ok(len)
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
        let data = pattern(CHUNK_SIZE * 2 + 1234);
        let (mut stream, recycler) =
            ChunkStream::spawn(Box::new(io::Cursor::new(data.clone()))).expect("spawns");
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        while let Some(chunk) = stream.next_chunk() {
            let chunk = chunk.expect("reads");
            sizes.push(chunk.len());
            out.extend_from_slice(&chunk);
            recycler.recycle(chunk);
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
        let (mut stream, _recycler) = ChunkStream::spawn(Box::new(Failing)).expect("spawns");
        let err = stream.next_chunk().expect("an item").expect_err("fails");
        assert_eq!(err.code(), "DownloadFailed");
        assert!(stream.next_chunk().is_none());
    }

    #[test]
    fn dropping_the_stream_early_stops_the_reader() {
        let endless = io::repeat(1);
        let (mut stream, recycler) = ChunkStream::spawn(Box::new(endless)).expect("spawns");
        assert!(stream.next_chunk().is_some());
        drop(recycler);
        drop(stream); // must not hang: the reader sees the channels close
    }

    /// Drains a measured stream, recycling as a writer does.
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
                Piece::Chunk(chunk) => {
                    data.extend_from_slice(&chunk);
                    stream.recycle(chunk);
                }
                Piece::End(measured) => return Ok((head.expect("a head"), data, measured)),
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
