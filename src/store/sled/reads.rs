//! The CAS read paths: existence checks, whole-blob gets and streaming reads. Small blobs
//! (segment records, and inline blobs of older data dirs) are re-hashed (SHA-256) before they
//! are served; file blobs are streamed by the file tier
//! ([`crate::store::files::read`]), which reports damage back here.
//!
//! Must not: hold a sled iterator or a file across an `.await`.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use xxhash_rust::xxh3::xxh3_64;

use super::entry::{entry_sums, Location};
use super::Inner;
use crate::digest::{verify, Digest};
use crate::error::{Error, Result};
use crate::store::files::read::Blob;
use crate::store::segments::{Found, Place};
use crate::store::BlobStream;

impl Inner {
    /// The subset of `digests` that is not stored; records a use of each one that is.
    pub(super) fn find_missing(&self, digests: &[Digest]) -> Vec<Digest> {
        self.find_missing_used_at(digests, self.clock.now())
    }

    /// [`Inner::find_missing`], recording each use at `at` (a time to come, for
    /// `Cas::retain`).
    pub(super) fn find_missing_used_at(&self, digests: &[Digest], at: u32) -> Vec<Digest> {
        let now = at.max(self.clock.now());
        let found = self.index.touch_all(digests, now);
        let mut missing = Vec::with_capacity(digests.len());
        missing.extend(
            digests
                .iter()
                .zip(found)
                .filter(|(d, found)| !found && !d.is_empty_blob())
                .map(|(d, _)| *d),
        );
        missing
    }

    pub(super) async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let place = self.index.touch_place(digest, self.clock.now());
        if let Some(data) = self.at_indexed_place(digest, place) {
            return Ok(Some(data));
        }
        let found = place.is_some();
        match self.lookup(digest)? {
            None => {
                self.forget_if_unbacked(digest, found);
                Ok(None)
            }
            Some(Location::Inline { id }) => self.inline_data(digest, id),
            Some(Location::Segment { place }) => self.segment_data(digest, place),
            Some(Location::File { xxh3 }) => {
                let path = self.files.blob_path(digest);
                let data = match tokio::fs::read(&path).await {
                    Ok(data) => Bytes::from(data),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.drop_damaged(digest, Location::File { xxh3 }, "blob file is missing");
                        return Ok(None);
                    }
                    Err(e) => return Err(Error::internal(format!("reading blob {digest}"), e)),
                };
                if data.len() as u64 != digest.size || xxh3_64(&data) != xxh3 {
                    self.drop_damaged(
                        digest,
                        Location::File { xxh3 },
                        "blob file does not match its checksum",
                    );
                    return Ok(None);
                }
                Ok(Some(data))
            }
        }
    }

    /// A stream of the blob's bytes from `offset`, at most `limit` of them, in pieces of at
    /// most `chunk_size`. Call from a Tokio runtime (file reads run on a blocking thread).
    pub(super) fn read(
        self: &Arc<Self>,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>> {
        let end = match limit {
            Some(l) => digest.size.min(offset.saturating_add(l)),
            None => digest.size,
        };
        if digest.is_empty_blob() {
            return Ok(Some(futures::stream::empty().boxed()));
        }
        let place = self.index.touch_place(digest, self.clock.now());
        let pieces = |data: Bytes| -> BlobStream {
            let data = data.slice(offset as usize..end as usize);
            let chunks: Vec<Result<Bytes>> = (0..data.len())
                .step_by(chunk_size.max(1))
                .map(|at| Ok(data.slice(at..data.len().min(at + chunk_size))))
                .collect();
            futures::stream::iter(chunks).boxed()
        };
        if let Some(data) = self.at_indexed_place(digest, place) {
            return Ok(Some(pieces(data)));
        }
        let found = place.is_some();
        match self.lookup_entry(digest)? {
            None => {
                self.forget_if_unbacked(digest, found);
                Ok(None)
            }
            Some((small @ (Location::Inline { .. } | Location::Segment { .. }), _)) => {
                let data = match small {
                    Location::Segment { place } => self.segment_data(digest, place)?,
                    Location::Inline { id } => self.inline_data(digest, id)?,
                    Location::File { .. } => None,
                };
                Ok(data.map(pieces))
            }
            Some((Location::File { xxh3 }, entry)) => {
                let path = self.files.blob_path(digest);
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.drop_damaged(digest, Location::File { xxh3 }, "blob file is missing");
                        return Ok(None);
                    }
                    Err(e) => return Err(Error::internal(format!("opening blob {digest}"), e)),
                };
                let digest = *digest;
                let blob = Blob {
                    file,
                    digest,
                    xxh3,
                    sums: entry_sums(&entry, digest.size),
                };
                let permit = self.transfers.permit()?;
                let store = self.clone();
                let damaged =
                    move |why: &str| store.drop_damaged(&digest, Location::File { xxh3 }, why);
                Ok(Some(self.reads.stream(
                    blob,
                    offset..end,
                    chunk_size,
                    permit,
                    damaged,
                )))
            }
        }
    }

    /// A small blob's bytes read at the place the in-memory index keeps for it. `None` if there
    /// is no place, or the record there is gone or not intact: then the caller looks the blob
    /// up again (compaction may have moved it meanwhile), which decides whether it is damaged.
    /// A place is only ever a record of this very hash (segments are append-only, never
    /// reused), and the bytes are checked against the digest, so an outdated place can cost a
    /// look, never a wrong blob.
    fn at_indexed_place(&self, digest: &Digest, place: Option<Option<u64>>) -> Option<Bytes> {
        let place = Place(place.flatten()?);
        match self.segments.read(place, &digest.hash, digest.size) {
            Ok(Found::Data(data)) if verify(*digest, &data).is_ok() => Some(data),
            _ => None,
        }
    }

    /// A segment blob's bytes, verified against its digest (SHA-256: small blobs are cheap to
    /// hash, and that leaves no checksum of our own to keep).
    fn segment_data(&self, digest: &Digest, place: Place) -> Result<Option<Bytes>> {
        let mut place = place;
        // Compaction may move the record between the lookup and the read: then the entry
        // names the new place, and one more look finds it.
        for _ in 0..3 {
            let why = match self.segments.read(place, &digest.hash, digest.size)? {
                Found::Data(data) if verify(*digest, &data).is_ok() => return Ok(Some(data)),
                Found::Data(_) => "segment record does not match its digest",
                Found::Damaged(why) => why,
                Found::Gone => match self.lookup(digest)? {
                    Some(Location::Segment { place: moved }) if moved != place => {
                        place = moved;
                        continue;
                    }
                    Some(Location::Segment { .. }) => "segment file is missing",
                    // Gone or stored anew meanwhile: read as it is now.
                    Some(_) | None => return self.small_now(digest),
                },
            };
            self.drop_damaged(digest, Location::Segment { place }, why);
            return Ok(None);
        }
        Ok(None)
    }

    /// A small blob's bytes as the index names them now (after a move raced a read).
    fn small_now(&self, digest: &Digest) -> Result<Option<Bytes>> {
        match self.lookup(digest)? {
            Some(Location::Inline { id }) => self.inline_data(digest, id),
            Some(Location::Segment { place }) => {
                match self.segments.read(place, &digest.hash, digest.size)? {
                    Found::Data(data) if verify(*digest, &data).is_ok() => Ok(Some(data)),
                    _ => Ok(None),
                }
            }
            _ => Ok(None),
        }
    }

    /// An inline blob's bytes, verified against its digest.
    fn inline_data(&self, digest: &Digest, id: u64) -> Result<Option<Bytes>> {
        let Some(v) = self.blobs.get(id.to_be_bytes())? else {
            self.drop_damaged(digest, Location::Inline { id }, "inline data is missing");
            return Ok(None);
        };
        if verify(*digest, &v).is_err() {
            self.drop_damaged(
                digest,
                Location::Inline { id },
                "inline data does not match its digest",
            );
            return Ok(None);
        }
        Ok(Some(Bytes::copy_from_slice(&v)))
    }
}
