//! zstd for ByteStream's `compressed-blobs/zstd/...` transfers.
//!
//! Compressed uploads are decompressed as they arrive and fed to an ordinary [`Upload`], which
//! verifies the *uncompressed* bytes against the digest and refuses any byte beyond its declared
//! size: a decompression bomb fails with INVALID_ARGUMENT after at most one output buffer more
//! than the declared size, and nothing is stored. Compressed reads compress the stored bytes on
//! the fly. Blobs are always stored uncompressed, so every blob can be served both ways.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::error::{Error, Result};
use crate::store::{BlobStream, Upload};

/// Size of the buffer decompressed or compressed output is collected in.
const OUT_BUF: usize = 128 << 10;

/// zstd level for reads: fast, since the client pays for decompression and we for compression.
const READ_LEVEL: i32 = 1;

fn bad_zstd(e: std::io::Error) -> Error {
    Error::InvalidArgument(format!("upload is not valid zstd data: {e}"))
}

/// An upload whose bytes arrive zstd-compressed.
pub struct ZstdUpload {
    inner: Box<dyn Upload>,
    decoder: Decoder<'static>,
    out: Vec<u8>,
    /// Compressed bytes received: what `write_offset` counts for compressed uploads.
    received: u64,
    /// Whether the last input ended exactly at the end of a zstd frame.
    frame_done: bool,
}

impl ZstdUpload {
    /// `size` is the blob's declared (uncompressed) size. The decoder's window is capped at what
    /// that size can need, but never below 2^23 (8 MiB): encoders streaming without a known
    /// content size use their level's default window (up to 2^23 through level 19) whatever the
    /// blob's size. So a frame header cannot demand a 128 MiB window for a small blob.
    pub fn new(inner: Box<dyn Upload>, size: u64) -> Result<Self> {
        let mut decoder = Decoder::new().map_err(|e| Error::internal("zstd decoder", e))?;
        let window_log = (64 - size.max(1).leading_zeros()).clamp(23, 27);
        decoder
            .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(window_log))
            .map_err(|e| Error::internal("zstd decoder", e))?;
        Ok(ZstdUpload {
            inner,
            decoder,
            out: vec![0u8; OUT_BUF],
            received: 0,
            frame_done: false,
        })
    }
}

#[async_trait]
impl Upload for ZstdUpload {
    fn committed(&self) -> u64 {
        self.received
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        self.received += data.len() as u64;
        let mut input = InBuffer::around(&data);
        loop {
            let before = input.pos();
            let mut output = OutBuffer::around(&mut self.out[..]);
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(bad_zstd)?;
            let produced = output.pos();
            // A frame ends when the decoder says so; only real progress (input consumed or
            // output produced) can start a new one. A run that merely drains an exactly full
            // buffer makes no progress and must not clear the flag.
            if hint == 0 {
                self.frame_done = true;
            } else if produced > 0 || input.pos() > before {
                self.frame_done = false;
            }
            if produced > 0 {
                self.inner
                    .append(Bytes::copy_from_slice(&self.out[..produced]))
                    .await?;
            }
            // Done when all input is consumed and the decoder had room to spare.
            if input.pos() == data.len() && produced < self.out.len() {
                return Ok(());
            }
        }
    }

    async fn stop(&mut self) {
        self.inner.stop().await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        if !self.frame_done {
            return Err(Error::InvalidArgument(
                "compressed upload ended in the middle of a zstd frame".into(),
            ));
        }
        self.inner.commit().await
    }
}

/// Compresses a blob stream with zstd. A task compresses into a bounded channel, so a slow
/// client holds at most a few compressed chunks in memory.
pub fn compress(input: BlobStream) -> Result<BlobStream> {
    let encoder = Encoder::new(READ_LEVEL).map_err(|e| Error::internal("zstd encoder", e))?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(e) = compress_into(input, encoder, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(ReceiverStream::new(rx).boxed())
}

async fn compress_into(
    mut input: BlobStream,
    mut encoder: Encoder<'static>,
    tx: &mpsc::Sender<Result<Bytes>>,
) -> Result<()> {
    while let Some(chunk) = input.next().await {
        let out = encode(&mut encoder, &chunk?)?;
        if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
            return Ok(()); // the client went away
        }
    }
    let _ = tx.send(Ok(finish(&mut encoder)?)).await;
    Ok(())
}

fn encode(encoder: &mut Encoder<'static>, chunk: &[u8]) -> Result<Bytes> {
    let mut src = InBuffer::around(chunk);
    let mut out = Vec::new();
    let mut buf = vec![0u8; OUT_BUF];
    while src.pos() < chunk.len() {
        let mut dst = OutBuffer::around(&mut buf[..]);
        encoder
            .run(&mut src, &mut dst)
            .map_err(|e| Error::internal("zstd compression", e))?;
        let n = dst.pos();
        out.extend_from_slice(&buf[..n]);
    }
    Ok(Bytes::from(out))
}

fn finish(encoder: &mut Encoder<'static>) -> Result<Bytes> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; OUT_BUF];
    loop {
        let mut dst = OutBuffer::around(&mut buf[..]);
        let remaining = encoder
            .finish(&mut dst, true)
            .map_err(|e| Error::internal("zstd compression", e))?;
        let n = dst.pos();
        out.extend_from_slice(&buf[..n]);
        if remaining == 0 {
            return Ok(Bytes::from(out));
        }
    }
}
