//! The reader side of the pipeline: a thread that decodes the image into a
//! fixed pool of aligned buffers, so memory stays constant whatever the
//! image size and decoding overlaps with hashing and writing.

use crate::disk::aligned::AlignedBuf;
use crate::{Error, Result};
use std::io::Read;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

/// Size of one buffer: large writes for O_DIRECT, few channel hand-offs.
pub const CHUNK_SIZE: usize = 4 << 20;
/// Buffers in flight: enough for the decoder to run ahead of the writer.
pub const POOL_SIZE: usize = 4;

/// Decoded image bytes in full chunks (only the last one may be short).
pub struct ChunkStream {
    filled: Option<Receiver<Result<AlignedBuf>>>,
    free: Option<SyncSender<AlignedBuf>>,
    reader: Option<JoinHandle<()>>,
}

impl ChunkStream {
    /// Starts the reader thread over `decoded`.
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
        let reader = thread::Builder::new()
            .name("image-reader".into())
            .spawn(move || read_chunks(decoded, free_rx, filled_tx))
            .map_err(|e| Error::io("starting the reader thread", e))?;
        Ok(ChunkStream {
            filled: Some(filled),
            free: Some(free),
            reader: Some(reader),
        })
    }

    /// The next chunk, `None` at the end of the image.
    pub fn next_chunk(&mut self) -> Option<Result<AlignedBuf>> {
        self.filled.as_ref()?.recv().ok()
    }

    /// Hands a buffer back to the reader.
    pub fn recycle(&self, buffer: AlignedBuf) {
        // The reader may have finished; then the buffer is simply dropped.
        if let Some(free) = &self.free {
            let _ = free.send(buffer);
        }
    }
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        // Closing both channels unblocks the reader wherever it waits; then
        // join it so no thread outlives the write that started it.
        self.filled.take();
        self.free.take();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
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
    use std::io;

    #[test]
    fn chunks_are_full_except_the_last_and_concatenate_to_the_input() {
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 1234)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut stream =
            ChunkStream::spawn(Box::new(io::Cursor::new(data.clone()))).expect("spawns");
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        while let Some(chunk) = stream.next_chunk() {
            let chunk = chunk.expect("reads");
            sizes.push(chunk.len());
            out.extend_from_slice(&chunk);
            stream.recycle(chunk);
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
    fn dropping_the_stream_early_stops_the_reader() {
        let endless = io::repeat(1);
        let mut stream = ChunkStream::spawn(Box::new(endless)).expect("spawns");
        assert!(stream.next_chunk().is_some());
        drop(stream); // must not hang: the reader sees the channel close
    }
}
