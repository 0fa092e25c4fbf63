//! The event log that several nodes share through their object store.
//!
//! Events are recorded as *blocks*: objects named by the sequence of their first event, each
//! holding a run of consecutive events of one class. A node records a block only with a
//! conditional create (S3's `If-None-Match: *`) at the sequence after the newest block it has
//! read, so two nodes can never number two events alike: the loser of a race reads the
//! winner's block and tries again after it. Blocks begin where the one before ended, so the
//! chain is gapless except where retention deleted blocks.
//!
//! Every node reads the whole chain once at start and then every `refresh` (and at once after
//! recording), into the local trees of `mod.rs`, which its watchers read as for a local log.
//! So a watcher on any node sees every node's events, in one order, and can resume on any node
//! with the same `start_after`.
//!
//! Retention works per class, as for a local log, on each node's mirror; a block of a class
//! retention has passed is deleted `delete_grace` later (by every node that read it; deleting
//! is idempotent). The grace keeps a block's key from being taken again by a node whose view
//! is older than that: a node re-reads the chain before recording whenever its last read is a
//! quarter of the grace old.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{oneshot, watch, Notify};

use super::{class_of, now_unix_ms, Event, EventKind, Shared, INVALIDATIONS, STORED, TREES};
use crate::error::{Error, Result};

/// Events in one block at most (a few hundred KiB).
const MAX_BLOCK: usize = 1000;
/// Events waiting to be recorded at most; beyond, publishing fails (the store is unreachable
/// for long, and the events would otherwise pile up in memory).
const MAX_PENDING: usize = 100_000;
/// How long [`Feed::announce`] waits for its events to be recorded.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(30);
/// How long a watcher's start waits for this node's first (or next) read of the chain.
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);
/// Blocks read at once.
const PARALLEL_READS: usize = 16;
/// How long shutdown waits for the events still waiting to be recorded.
const FINAL_ROUND: Duration = Duration::from_secs(5);
/// Pause after a failed read or write of the shared log.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Starts every block: the format, then the writing node's id and its count of blocks, so a
/// node tells its own block (a create whose reply was lost) from another's.
const MAGIC: &[u8; 8] = b"HOARDEV1";

/// Where the shared log's blocks live (the bucket, `store/bucket/events.rs`). Blocks are opaque
/// bytes to it, named by their first sequence.
#[async_trait]
pub trait SharedLog: Send + Sync + 'static {
    /// The first sequences of the blocks that begin after `after`, in increasing order.
    async fn list_after(&self, after: u64) -> Result<Vec<u64>>;
    /// The block that begins at `first`; `None` if there is none (retention deleted it).
    async fn read(&self, first: u64) -> Result<Option<Bytes>>;
    /// Creates the block that begins at `first` unless one exists; false if one does.
    async fn create(&self, first: u64, block: Bytes) -> Result<bool>;
    /// Deletes the block that begins at `first`; one already gone is no error.
    async fn delete(&self, first: u64) -> Result<()>;
}

/// An event waiting to be recorded, and who waits for its sequence.
struct Pending {
    event: Event,
    done: Option<oneshot::Sender<u64>>,
}

/// A block this node has read or written, for retention.
struct Block {
    first: u64,
    last: u64,
    class: usize,
    /// When retention passed every event in it (deleted `delete_grace` later).
    dropped_at: Option<Instant>,
}

/// The shared side of an [`super::EventLog`]: what waits to be recorded, and the chain's store.
pub(super) struct Feed {
    log: Arc<dyn SharedLog>,
    pending: Mutex<VecDeque<Pending>>,
    /// Wakes the loop: something to record, a watcher to catch up, or shutdown.
    wake: Notify,
    refresh: Duration,
    delete_grace: Duration,
    /// Reads of the chain completed (the first, at start, reads it all).
    reads: watch::Sender<u64>,
    writer_id: u64,
    /// Blocks this node has built, for their headers.
    built: AtomicU64,
}

impl Feed {
    pub(super) fn new(log: Arc<dyn SharedLog>, refresh: Duration, delete_grace: Duration) -> Self {
        Feed {
            log,
            pending: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            refresh,
            delete_grace,
            reads: watch::channel(0).0,
            writer_id: uuid::Uuid::new_v4().as_u64_pair().0,
            built: AtomicU64::new(0),
        }
    }

    /// Queues `event` to be recorded; `done` learns its sequence.
    pub(super) fn enqueue(&self, event: Event, done: Option<oneshot::Sender<u64>>) -> Result<()> {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        if class_of(kind).is_none() {
            return Err(Error::internal(
                "publishing a watch event",
                format!("event kind {} is not publishable", event.kind),
            ));
        }
        let mut pending = self.pending.lock();
        if pending.len() >= MAX_PENDING {
            return Err(Error::Unavailable(format!(
                "{MAX_PENDING} watch events wait to be recorded in the object store, which does \
                 not take them; try again once it answers"
            )));
        }
        pending.push_back(Pending { event, done });
        drop(pending);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues `events` in order and waits (up to [`ANNOUNCE_WAIT`]) until the shared log holds
    /// them all; their sequences.
    pub(super) async fn announce(&self, events: Vec<Event>) -> Result<Vec<u64>> {
        let mut waits = Vec::with_capacity(events.len());
        for event in events {
            let (tx, rx) = oneshot::channel();
            self.enqueue(event, Some(tx))?;
            waits.push(rx);
        }
        let all = futures::future::join_all(waits);
        match tokio::time::timeout(ANNOUNCE_WAIT, all).await {
            Ok(done) => done
                .into_iter()
                .map(|r| {
                    r.map_err(|_| {
                        Error::Unavailable(
                            "the server is shutting down before the watch event was recorded in \
                             the object store"
                                .into(),
                        )
                    })
                })
                .collect(),
            Err(_) => Err(Error::Unavailable(format!(
                "the object store has not taken the watch event within {ANNOUNCE_WAIT:?}; it \
                 stays queued on this node and is recorded once the store answers"
            ))),
        }
    }

    /// Waits until a read of the chain that began after this call has completed (bounded);
    /// false if none did in time.
    pub(super) async fn catch_up(&self) -> bool {
        let mut reads = self.reads.subscribe();
        // A read in progress may have listed before the caller's event existed: wait for the
        // one after it (the first read, at start, counts whole).
        let now = *reads.borrow_and_update();
        let target = if now == 0 { 1 } else { now + 2 };
        self.wake.notify_one();
        tokio::time::timeout(CATCH_UP_WAIT, reads.wait_for(|n| *n >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the chain has been read once (bounded); false if it has not.
    pub(super) async fn loaded(&self) -> bool {
        let mut reads = self.reads.subscribe();
        tokio::time::timeout(CATCH_UP_WAIT, reads.wait_for(|n| *n >= 1))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub(super) fn notify(&self) {
        self.wake.notify_one();
    }

    /// Reads the whole chain into the trees (start). A class's events before its oldest block
    /// are gone: everything up to the last gap before that block counts as deleted for it
    /// (retention deletes a class's blocks oldest first, so gaps after it are other classes').
    async fn load(&self, s: &Shared, blocks: &mut VecDeque<Block>) -> Result<()> {
        let firsts = self.log.list_after(0).await?;
        let reads = firsts.into_iter().map(|first| {
            let log = self.log.clone();
            async move { log.read(first).await.map(|b| (first, b)) }
        });
        let mut read = futures::stream::iter(reads).buffered(PARALLEL_READS);
        let mut next = 1u64;
        let mut gaps_end: Vec<u64> = Vec::new();
        let mut oldest = [None::<u64>; 2];
        while let Some(got) = read.next().await {
            let (first, body) = got?;
            let Some(body) = body else { continue };
            if first > next {
                gaps_end.push(first - 1);
            }
            let events = match decode(first, &body) {
                Ok((_, events)) => events,
                Err(e) => {
                    tracing::error!(error = %e, first, "skipping a malformed watch block");
                    skip_unreadable(s, first)?;
                    gaps_end.push(first);
                    next = first + 1;
                    continue;
                }
            };
            let (class, last) = take_in(s, blocks, first, &events)?;
            oldest[class].get_or_insert(first);
            next = last + 1;
        }
        for class in [INVALIDATIONS, STORED] {
            let before = oldest[class].unwrap_or(u64::MAX);
            if let Some(&through) = gaps_end.iter().rev().find(|&&end| end < before) {
                s.mark_trimmed(class, through)?;
            }
        }
        tracing::info!(
            blocks = blocks.len(),
            newest = next - 1,
            "read the shared watch event log"
        );
        Ok(())
    }

    /// Reads the blocks other nodes recorded since the last read. A gap (blocks deleted before
    /// this node read them) counts as deleted for both classes: watchers that would need it
    /// are told, never silently skipped past it.
    async fn tail(&self, s: &Shared, blocks: &mut VecDeque<Block>) -> Result<()> {
        let after = s.writer.lock().next - 1;
        for first in self.log.list_after(after).await? {
            let Some(body) = self.log.read(first).await? else {
                continue;
            };
            let next = s.writer.lock().next;
            if first > next {
                tracing::warn!(
                    from = next,
                    through = first - 1,
                    "watch events were deleted from the shared log before this node read them"
                );
                s.mark_trimmed(INVALIDATIONS, first - 1)?;
                s.mark_trimmed(STORED, first - 1)?;
            }
            let (writer, events) = match decode(first, &body) {
                Ok(block) => block,
                Err(e) => {
                    tracing::error!(error = %e, first, "skipping a malformed watch block");
                    skip_unreadable(s, first)?;
                    continue;
                }
            };
            let took = take_in(s, blocks, first, &events);
            if writer == self.writer_id {
                // This node's own block, whose create answered with an error (or was refused
                // because a retry of it had already landed): its events are the oldest
                // waiting ones, recorded now (whatever became of the local copy).
                self.settle(&events);
            }
            took?;
        }
        Ok(())
    }

    /// The oldest waiting events are recorded as `events`: their waiters learn the sequences.
    fn settle(&self, events: &[Event]) {
        let waiting: Vec<Pending> = {
            let mut pending = self.pending.lock();
            let n = events.len().min(pending.len());
            pending.drain(..n).collect()
        };
        for (p, e) in waiting.into_iter().zip(events) {
            if let Some(done) = p.done {
                let _ = done.send(e.sequence);
            }
        }
    }

    /// One round: read what is new, record what waits, delete what retention passed.
    async fn round(&self, s: &Shared, blocks: &mut VecDeque<Block>) -> Result<()> {
        self.tail(s, blocks).await?;
        let mut read_at = Instant::now();
        self.reads.send_modify(|n| *n += 1);
        loop {
            if read_at.elapsed() > self.delete_grace / 4 {
                self.tail(s, blocks).await?;
                read_at = Instant::now();
            }
            let Some((first, events, bytes)) = self.next_block(s) else {
                break;
            };
            // A create whose answer is lost fails the round; the next round's read of the
            // chain finds the block if it landed and recognises it as this node's.
            if !self.log.create(first, bytes).await? {
                // Another node took this sequence (or a retry of this create landed first):
                // read its block, then try after it. A block this node cannot read gains
                // nothing: fail the round, so the loop pauses.
                self.tail(s, blocks).await?;
                if s.writer.lock().next <= first {
                    return Err(Error::internal(
                        "recording watch events",
                        format!("block {first} of the shared log is taken and cannot be read"),
                    ));
                }
                read_at = Instant::now();
                continue;
            }
            // Recorded in the shared log: the waiters learn so even if the local copy failed.
            let took = take_in(s, blocks, first, &events);
            self.settle(&events);
            took?;
        }
        self.delete_dropped(s, blocks).await;
        Ok(())
    }

    /// The oldest waiting events of one class (at most [`MAX_BLOCK`]), numbered from the next
    /// sequence, and their block.
    fn next_block(&self, s: &Shared) -> Option<(u64, Vec<Event>, Bytes)> {
        let first = s.writer.lock().next;
        let pending = self.pending.lock();
        let class = class_of(pending.front()?.event.kind());
        let events: Vec<Event> = pending
            .iter()
            .take(MAX_BLOCK)
            .take_while(|p| class_of(p.event.kind()) == class)
            .zip(first..)
            .map(|(p, sequence)| {
                let mut event = p.event.clone();
                event.sequence = sequence;
                if event.time_unix_ms == 0 {
                    event.time_unix_ms = now_unix_ms();
                }
                event
            })
            .collect();
        drop(pending);
        let count = self.built.fetch_add(1, Ordering::Relaxed);
        let bytes = encode(self.writer_id, count, &events);
        Some((first, events, bytes))
    }

    /// Deletes the blocks whose events retention passed on this node `delete_grace` ago.
    async fn delete_dropped(&self, s: &Shared, blocks: &mut VecDeque<Block>) {
        let now = Instant::now();
        for block in blocks.iter_mut() {
            if block.dropped_at.is_none() && block.last <= s.retired_through(block.class) {
                block.dropped_at = Some(now);
            }
        }
        let mut kept = VecDeque::with_capacity(blocks.len());
        for block in blocks.drain(..) {
            let due = block
                .dropped_at
                .is_some_and(|at| now.duration_since(at) >= self.delete_grace);
            if !due {
                kept.push_back(block);
                continue;
            }
            if let Err(e) = self.log.delete(block.first).await {
                tracing::warn!(error = %e, first = block.first, "deleting an old watch block");
                kept.push_back(block);
            }
        }
        *blocks = kept;
    }

    /// Ends every wait for a sequence (shutdown): the events are not recorded.
    fn fail_all(&self) {
        self.pending.lock().clear();
    }
}

/// The shared log's loop: read the whole chain, then a round every `refresh` or when woken.
pub(super) async fn run(shared: Weak<Shared>, feed: Arc<Feed>) {
    let mut blocks = VecDeque::new();
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.head.borrow().closed {
            feed.fail_all();
            return;
        }
        match feed.load(&s, &mut blocks).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading the shared watch event log; retrying");
                blocks.clear();
            }
        }
        drop(s);
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    feed.reads.send_modify(|n| *n += 1);
    loop {
        tokio::select! {
            _ = feed.wake.notified() => {}
            _ = tokio::time::sleep(feed.refresh) => {}
        }
        let Some(s) = shared.upgrade() else { return };
        if s.head.borrow().closed {
            // Shutdown: what waits is recorded if the store takes it soon, else lost.
            if !feed.pending.lock().is_empty() {
                let last = tokio::time::timeout(FINAL_ROUND, feed.round(&s, &mut blocks));
                if !matches!(last.await, Ok(Ok(()))) {
                    tracing::warn!(
                        events = feed.pending.lock().len(),
                        "watch events not recorded in the object store before shutdown"
                    );
                }
            }
            feed.fail_all();
            return;
        }
        if let Err(e) = feed.round(&s, &mut blocks).await {
            tracing::warn!(error = %e, "the shared watch event log; retrying");
            drop(s);
            tokio::time::sleep(RETRY_PAUSE).await;
            feed.wake.notify_one();
        }
    }
}

/// A block this node cannot decode counts as one deleted event at `first`, of either class:
/// watchers that would need it are told (OUT_OF_RANGE), and recording goes on after it
/// instead of retrying its taken name forever. Events it held past `first` show as the gap
/// before the next block.
fn skip_unreadable(s: &Shared, first: u64) -> Result<()> {
    s.mark_trimmed(INVALIDATIONS, first)?;
    s.mark_trimmed(STORED, first)?;
    let mut w = s.writer.lock();
    w.next = w.next.max(first + 1);
    Ok(())
}

/// Puts a block's events (non-empty, one class: checked by [`decode`] or built so) into the
/// trees and remembers the block for retention; its class and last sequence.
fn take_in(
    s: &Shared,
    blocks: &mut VecDeque<Block>,
    first: u64,
    events: &[Event],
) -> Result<(usize, u64)> {
    let class = events
        .first()
        .and_then(|e| class_of(e.kind()))
        .unwrap_or(INVALIDATIONS);
    let last = events.last().map_or(first, |e| e.sequence);
    s.insert_recorded(events)?;
    blocks.push_back(Block {
        first,
        last,
        class,
        dropped_at: None,
    });
    Ok((class, last))
}

fn encode(writer_id: u64, count: u64, events: &[Event]) -> Bytes {
    let mut out = BytesMut::with_capacity(24 + events.len() * 128);
    out.put_slice(MAGIC);
    out.put_u64(writer_id);
    out.put_u64(count);
    for event in events {
        // Encoding into a BytesMut grows it as needed; it cannot fail.
        let _ = event.encode_length_delimited(&mut out);
    }
    out.freeze()
}

/// The writing node's id and the events of the block that begins at `first`: at least one,
/// consecutive from `first`, all of one class.
fn decode(first: u64, block: &[u8]) -> Result<(u64, Vec<Event>)> {
    let bad = |why: String| {
        Error::internal(
            format!("reading watch block {first} of the shared log"),
            why,
        )
    };
    if block.len() < 24 || &block[..8] != MAGIC {
        return Err(bad("not a hoard watch block".into()));
    }
    let writer = u64::from_be_bytes(block[8..16].try_into().unwrap_or_default());
    let mut rest = &block[24..];
    let mut events = Vec::new();
    let mut class: Option<usize> = None;
    while rest.has_remaining() {
        let event = Event::decode_length_delimited(&mut rest).map_err(|e| bad(e.to_string()))?;
        let expected = first + events.len() as u64;
        if event.sequence != expected {
            return Err(bad(format!(
                "event {} where {expected} was due",
                event.sequence
            )));
        }
        let Some(this) = class_of(event.kind()) else {
            return Err(bad(format!("event {} has no known kind", event.sequence)));
        };
        if class.is_some_and(|c| c != this) {
            return Err(bad(format!(
                "event {} is not of the block's class ({})",
                event.sequence,
                TREES[class.unwrap_or(INVALIDATIONS)]
            )));
        }
        class = Some(this);
        events.push(event);
    }
    if events.is_empty() {
        return Err(bad("no events".into()));
    }
    Ok((writer, events))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::config::WatchConfig;
    use crate::watch::tests::take;
    use crate::watch::{EventLog, Start, Subscription};

    /// A shared log in memory that can lose the answer to a create that landed.
    #[derive(Default)]
    struct Lossy {
        blocks: Mutex<BTreeMap<u64, Bytes>>,
        lose_next_answer: AtomicBool,
    }

    #[async_trait]
    impl SharedLog for Lossy {
        async fn list_after(&self, after: u64) -> Result<Vec<u64>> {
            Ok(self
                .blocks
                .lock()
                .range(after + 1..)
                .map(|(k, _)| *k)
                .collect())
        }
        async fn read(&self, first: u64) -> Result<Option<Bytes>> {
            Ok(self.blocks.lock().get(&first).cloned())
        }
        async fn create(&self, first: u64, block: Bytes) -> Result<bool> {
            let created = match self.blocks.lock().entry(first) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(block);
                    true
                }
                std::collections::btree_map::Entry::Occupied(_) => false,
            };
            if created && self.lose_next_answer.swap(false, Ordering::SeqCst) {
                return Err(Error::Unavailable("the answer was lost".into()));
            }
            Ok(created)
        }
        async fn delete(&self, first: u64) -> Result<()> {
            self.blocks.lock().remove(&first);
            Ok(())
        }
    }

    fn node(log: &Arc<Lossy>, retained: u64, refresh: Duration) -> EventLog {
        let config = WatchConfig {
            retained_events: retained,
            max_lag: 1_000_000,
        };
        EventLog::shared(log.clone(), &config, refresh, Duration::ZERO).expect("log")
    }

    fn invalidation(epoch: u64) -> Event {
        Event::namespace_invalidated("ns", epoch, "why", "t")
    }

    /// Every invalidation from the start.
    fn everything() -> Subscription {
        Subscription {
            namespace_pattern: String::new(),
            start: Start::After(0),
            kinds: vec![],
        }
    }

    fn sequences(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.sequence).collect()
    }

    #[tokio::test]
    async fn a_create_whose_answer_is_lost_records_its_events_once() {
        let log = Arc::new(Lossy::default());
        let a = node(&log, 1000, Duration::from_millis(50));
        log.lose_next_answer.store(true, Ordering::SeqCst);
        assert_eq!(a.announce(vec![invalidation(1)]).await.expect("first"), [1]);
        assert_eq!(
            a.announce(vec![invalidation(2)]).await.expect("second"),
            [2]
        );
        assert_eq!(log.list_after(0).await.expect("list"), [1, 2]);
        let mut watcher = Box::pin(a.watch(everything()).await.expect("watch").into_stream());
        let seen = take(&mut watcher, 2).await;
        assert_eq!(sequences(&seen), [1, 2]);
        assert_eq!(seen.iter().map(|e| e.epoch).collect::<Vec<_>>(), [1, 2]);
    }

    /// Retention 3 on two nodes: `a` records invalidation 1 and then 11 stored results, so its
    /// retention deletes blocks `b` never read (`b` read block 1 at start, then only when woken).
    /// Both stay alive for the test (`a` deletes its retired blocks a grace later).
    async fn gap_left_by_another_node() -> (Arc<Lossy>, EventLog, EventLog) {
        let log = Arc::new(Lossy::default());
        let a = node(&log, 3, Duration::from_millis(50));
        a.announce(vec![invalidation(1)])
            .await
            .expect("invalidation");
        let b = node(&log, 3, Duration::from_secs(3600));
        assert!(b.watch(everything()).await.is_ok(), "b has read the log");
        for i in 0..11 {
            let stored = Event::action_result_stored("ns", crate::digest::Digest::of(&[i]), "t");
            a.announce(vec![stored]).await.expect("stored result");
        }
        (log, a, b)
    }

    #[tokio::test]
    async fn a_gap_another_nodes_retention_left_does_not_delete_blocks_this_one_keeps() {
        let (log, _a, b) = gap_left_by_another_node().await;
        // a's retention deleted the older stored results' blocks, which b never read.
        assert_eq!(log.list_after(0).await.expect("list"), [1, 10, 11, 12]);
        b.announce(vec![invalidation(2)]).await.expect("through b");
        b.announce(vec![invalidation(3)])
            .await
            .expect("again through b");
        let left = log.list_after(0).await.expect("list");
        assert_eq!(
            left.first(),
            Some(&1),
            "b deleted an invalidation that retention keeps: {left:?}"
        );
        // A watcher on a fresh node still gets every invalidation.
        let c = node(&log, 3, Duration::from_millis(50));
        let mut watcher = Box::pin(c.watch(everything()).await.expect("watch").into_stream());
        let seen = take(&mut watcher, 3).await;
        assert_eq!(sequences(&seen), [1, 13, 14]);
    }

    #[tokio::test]
    async fn an_unreadable_newest_block_is_skipped_and_recording_goes_on() {
        let log = Arc::new(Lossy::default());
        let a = node(&log, 1000, Duration::from_millis(50));
        assert_eq!(a.announce(vec![invalidation(1)]).await.expect("first"), [1]);
        log.create(2, Bytes::from_static(b"not a watch block"))
            .await
            .expect("garbage");
        assert_eq!(
            a.announce(vec![invalidation(2)]).await.expect("after it"),
            [3]
        );
        let gone = a
            .watch(Subscription {
                start: Start::After(1),
                ..everything()
            })
            .await
            .err()
            .expect("event 2 is unreadable");
        assert_eq!(gone.error.code(), tonic::Code::OutOfRange);
        // A node started now reads past it too.
        let b = node(&log, 1000, Duration::from_millis(50));
        assert_eq!(b.announce(vec![invalidation(3)]).await.expect("on b"), [4]);
    }

    #[tokio::test]
    async fn retention_after_a_gap_keeps_the_gap_marked_for_watchers() {
        let (_log, _a, b) = gap_left_by_another_node().await;
        // b finds the gap 2..9, then its own retention trims invalidation 1.
        for epoch in 2..5 {
            b.announce(vec![invalidation(epoch)])
                .await
                .expect("through b");
        }
        let gone = b
            .watch(Subscription {
                start: Start::After(1),
                ..everything()
            })
            .await
            .err()
            .expect("events after 1 are partly gone");
        assert_eq!(gone.error.code(), tonic::Code::OutOfRange);
    }
}
