//! Group commit: a write is acknowledged only after sled has flushed it to disk, and one flush
//! serves every write that asked while the previous flush ran. A round syncs the segment files
//! written since the last one ([`Segments::sync`]) before it flushes sled.
//!
//! sled flushes on a 500 ms timer of its own; a reply sent before that flush can be lost to a
//! SIGKILL or a power cut, and a client that was told "stored" then builds on a blob that is
//! gone. Flushing once per write would cost an fsync each. Here one thread flushes in rounds:
//! it takes every waiter queued so far, flushes once, and answers them all, so under load the
//! cost of an fsync is shared by all the writes that arrived during the previous one.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::space::Space;
use crate::error::{Error, Result};
use crate::store::segments::Segments;

type Waiter = oneshot::Sender<std::result::Result<(), sled::Error>>;

/// The flushing thread and the queue of writes waiting for it.
pub(super) struct GroupCommit {
    /// `None` once dropped, which ends the thread.
    queue: Option<mpsc::Sender<Waiter>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the flushing thread for `db`. After each flush it tops up the disk cushion that
    /// keeps sled's next flushes from running out of space (see [`Space`]).
    pub(super) fn start(
        db: sled::Db,
        segments: std::sync::Arc<Segments>,
        space: std::sync::Arc<Space>,
    ) -> Result<Self> {
        let (queue, rx) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("hoard-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut round = vec![first];
                    round.extend(rx.try_iter());
                    // Segment records first: an entry sled makes durable may name them.
                    let result = segments
                        .sync()
                        .map_err(sled::Error::Io)
                        .and_then(|()| db.flush().map(drop));
                    match &result {
                        Ok(()) => {
                            space.top_up();
                        }
                        // sled refuses every write after this until it is reopened.
                        Err(e) => space.mark_broken(e),
                    }
                    for waiter in round {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .map_err(|e| Error::internal("starting the commit thread", e))?;
        Ok(GroupCommit {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Returns once everything written to sled before the call is on disk.
    pub(super) async fn durable(&self) -> Result<()> {
        outcome(self.enqueue()?.await)
    }

    /// The blocking form, for work already on a blocking thread.
    pub(super) fn durable_blocking(&self) -> Result<()> {
        outcome(self.enqueue()?.blocking_recv())
    }

    /// Joins the next round.
    fn enqueue(&self) -> Result<oneshot::Receiver<std::result::Result<(), sled::Error>>> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .as_ref()
            .and_then(|q| q.send(tx).ok())
            .ok_or_else(|| Error::Unavailable("the store is closed".into()))?;
        Ok(rx)
    }
}

/// What a round's answer means for the waiting write.
fn outcome(
    answer: std::result::Result<std::result::Result<(), sled::Error>, oneshot::error::RecvError>,
) -> Result<()> {
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::Unavailable("the store is closed".into())),
    }
}

impl Drop for GroupCommit {
    /// Ends the thread and waits for it: it holds the database, and a restart in the same
    /// process must be able to reopen it.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
