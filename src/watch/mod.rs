//! The persisted event log behind the watch stream (`hoard.watch.v1.Watch`).
//!
//! Publishers append events with [`EventLog::publish`]; each gets the next sequence number. A
//! background task fsyncs the database and only then lets watchers see the events, so a sequence
//! a watcher was sent is never reused after a crash. Watchers are cursors over the log, not
//! queues: each reads `(its position, durable]` in small batches and waits when caught up, so a
//! slow watcher costs a position and a few events of memory, and writers never wait for it.
//!
//! Events live in two sled trees with one sequence space: invalidations, and the far more
//! frequent "action result stored" events. Each tree keeps its newest `watch.retained_events`,
//! so a busy cache's stores never push invalidations out of the log, and watchers that do not ask
//! for stores never read them. Keys are sequences (u64 big-endian), values encoded [`Event`]s.
//!
//! With a store that several nodes share (the bucket backend), the log is shared too
//! (`shared.rs`): events are recorded as blocks in the object store, which numbers them for
//! every node, and each node's trees become a mirror of the shared log that its watchers read.
//!
//! This module knows sled trees only; it does not know gRPC (the service maps [`WatchError`]).

mod shared;

pub use shared::SharedLog;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::WatchConfig;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::namespace::glob_match;
pub use crate::proto::watch::{Event, EventKind};

/// The two trees events are kept in; an event's class follows from its kind.
const TREES: [&str; 2] = ["events", "events-stored"];
/// Per class, the largest sequence retention has deleted (u64 BE), under key `TREES[class]`.
const META_TREE: &str = "events-meta";
/// On a replica: the upstream sequence relayed through (u64 BE), under this key of
/// `META_TREE`, for when no relayed event says it (a resync, a stream that started idle).
const RELAYED_KEY: &str = "relayed-through";
const INVALIDATIONS: usize = 0;
const STORED: usize = 1;
/// Events read from the log per step of a watcher: small, so memory per watcher stays small.
const BATCH: usize = 64;
/// A watcher's lag is counted against events that have been visible for at least this long, so
/// a burst that becomes visible at once (one fsync can publish thousands of events) does not
/// cut off watchers that are keeping up, while one that stopped reading is cut off regardless of
/// how long it was parked.
pub const LAG_GRACE: Duration = Duration::from_secs(1);

fn class_of(kind: EventKind) -> Option<usize> {
    match kind {
        EventKind::ActionInvalidated
        | EventKind::NamespaceInvalidated
        | EventKind::NamespaceDropped => Some(INVALIDATIONS),
        EventKind::ActionResultStored => Some(STORED),
        EventKind::Unspecified => None,
    }
}

/// Constructors for the events hoard publishes; [`EventLog::publish`] fills in the sequence and,
/// if unset, the time. `caller` is who caused the event (`crate::auth::Caller::name`).
impl Event {
    /// One action result was removed from `namespace`.
    pub fn action_invalidated(
        namespace: &str,
        action: Digest,
        reason: &str,
        caller: &str,
    ) -> Event {
        Event {
            kind: EventKind::ActionInvalidated as i32,
            namespace: namespace.to_string(),
            action_digest: Some(action.to_proto()),
            reason: reason.to_string(),
            caller: caller.to_string(),
            ..Default::default()
        }
    }

    /// Every action result of `namespace` older than `epoch` became invisible.
    pub fn namespace_invalidated(namespace: &str, epoch: u64, reason: &str, caller: &str) -> Event {
        Event {
            kind: EventKind::NamespaceInvalidated as i32,
            namespace: namespace.to_string(),
            epoch,
            reason: reason.to_string(),
            caller: caller.to_string(),
            ..Default::default()
        }
    }

    /// `namespace` and all its action results were deleted.
    pub fn namespace_dropped(namespace: &str, reason: &str, caller: &str) -> Event {
        Event {
            kind: EventKind::NamespaceDropped as i32,
            namespace: namespace.to_string(),
            reason: reason.to_string(),
            caller: caller.to_string(),
            ..Default::default()
        }
    }

    /// `caller` stored an action result in `namespace`.
    pub fn action_result_stored(namespace: &str, action: Digest, caller: &str) -> Event {
        Event {
            kind: EventKind::ActionResultStored as i32,
            namespace: namespace.to_string(),
            action_digest: Some(action.to_proto()),
            caller: caller.to_string(),
            ..Default::default()
        }
    }
}

/// What watchers may see: events up to `durable` are fsynced.
#[derive(Clone, Copy, Debug)]
struct Head {
    durable: u64,
    /// Set on shutdown: every watcher ends with UNAVAILABLE.
    closed: bool,
}

struct Class {
    tree: sled::Tree,
    /// Largest sequence of this class deleted by retention: the tree holds every event of the
    /// class after it. Raised before the deletion, so a reader that checks it after reading
    /// notices any hole it read across.
    trimmed_through: AtomicU64,
    /// Largest sequence of this class that this node's retention deleted (not counting
    /// events other nodes deleted from a shared log): what a shared log's blocks may be
    /// deleted by.
    retired_through: AtomicU64,
}

/// Publisher state, changed only under its mutex so sequences are inserted in order.
struct Writer {
    next: u64,
    /// Events per class (sled's `len` is a scan).
    counts: [u64; 2],
}

struct Shared {
    classes: [Class; 2],
    meta: sled::Tree,
    writer: Mutex<Writer>,
    head: watch::Sender<Head>,
    /// Wakes the syncer after a publish; a wake during a sync leaves a permit for another round.
    wake: Arc<Notify>,
    retained: u64,
    max_lag: u64,
    lag_grace: Duration,
    /// When `durable` advanced to what, over the last `lag_grace` plus the sample just before:
    /// answers "what was durable `lag_grace` ago". A few hundred entries at most (one per fsync).
    advances: Mutex<VecDeque<(Instant, u64)>>,
    /// Set when the log is shared: the trees mirror it, and events are recorded through this.
    feed: Option<Arc<shared::Feed>>,
}

impl Shared {
    /// The newest sequence that has been visible for at least `lag_grace`.
    fn settled(&self) -> u64 {
        let mut advances = self.advances.lock();
        let now = Instant::now();
        prune(
            &mut advances,
            now.checked_sub(self.lag_grace).unwrap_or(now),
        );
        advances.front().map_or(0, |a| a.1)
    }

    /// Makes `durable` visible to watchers (it only ever rises).
    fn advance(&self, durable: u64) {
        self.record_advance(durable);
        self.head.send_if_modified(|h| {
            let advanced = durable > h.durable;
            h.durable = h.durable.max(durable);
            advanced
        });
    }

    /// Puts events already numbered and made durable elsewhere (the shared log) into the
    /// trees, in sequence order, past everything there, then makes them visible.
    fn insert_recorded(&self, events: &[Event]) -> Result<()> {
        let Some(last) = events.last().map(|e| e.sequence) else {
            return Ok(());
        };
        {
            let mut w = self.writer.lock();
            for event in events {
                let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
                let Some(index) = class_of(kind) else {
                    continue;
                };
                if event.sequence < w.next {
                    continue;
                }
                let class = &self.classes[index];
                class
                    .tree
                    .insert(event.sequence.to_be_bytes(), event.encode_to_vec())?;
                w.next = event.sequence + 1;
                w.counts[index] += 1;
                if w.counts[index] > self.retained {
                    let excess = w.counts[index] - self.retained;
                    w.counts[index] -= trim(class, &self.meta, index, excess)?;
                }
            }
            w.next = w.next.max(last + 1);
        }
        self.advance(last);
        Ok(())
    }

    /// Records that the events of `class` up to `through` are gone (deleted from the shared
    /// log before this node read them): watchers that would need them are told so.
    fn mark_trimmed(&self, class: usize, through: u64) -> Result<()> {
        let c = &self.classes[class];
        if through > c.trimmed_through.load(Ordering::SeqCst) {
            self.meta.insert(TREES[class], &through.to_be_bytes()[..])?;
            c.trimmed_through.fetch_max(through, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The largest sequence of `class` this node's retention deleted.
    fn retired_through(&self, class: usize) -> u64 {
        self.classes[class].retired_through.load(Ordering::SeqCst)
    }

    fn record_advance(&self, durable: u64) {
        let mut advances = self.advances.lock();
        let now = Instant::now();
        advances.push_back((now, durable));
        prune(
            &mut advances,
            now.checked_sub(self.lag_grace).unwrap_or(now),
        );
    }
}

/// Drops samples older than `cutoff` except the newest of them, which is what was durable then.
/// (If every sample is newer, the first is the value at open: nothing changed before it.)
fn prune(advances: &mut VecDeque<(Instant, u64)>, cutoff: Instant) {
    while advances.len() >= 2 && advances[1].0 <= cutoff {
        advances.pop_front();
    }
}

/// The event log; share it as `Arc<EventLog>`. Dropping it stops the syncer and ends watchers.
pub struct EventLog {
    shared: Arc<Shared>,
    /// Taken by [`EventLog::shutdown`], which waits for the task to end.
    syncer: Mutex<Option<JoinHandle<()>>>,
}

/// Where a watcher begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// After this sequence (the last one the client handled). 0: the oldest retained.
    After(u64),
    /// After the newest durable event.
    Now,
}

/// What a watcher asks for.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Instance names (`*` matches any run of characters); empty matches every name.
    pub namespace_pattern: String,
    pub start: Start,
    /// Empty: every kind except `ActionResultStored`.
    pub kinds: Vec<EventKind>,
}

impl Subscription {
    /// Validates the raw kinds of a request.
    pub fn new(namespace_pattern: String, start: Start, kinds: &[i32]) -> Result<Self> {
        let kinds = kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| match EventKind::try_from(k) {
                Ok(kind) if kind != EventKind::Unspecified => Ok(kind),
                _ => Err(Error::InvalidArgument(format!(
                    "kinds[{i}]: {k} is not an event kind (1 to 4, see hoard.watch.v1.EventKind)"
                ))),
            })
            .collect::<Result<_>>()?;
        Ok(Subscription {
            namespace_pattern,
            start,
            kinds,
        })
    }
}

/// Why a watch stream ended, and where the client can go on from.
#[derive(Debug)]
pub struct WatchError {
    /// OutOfRange, ResourceExhausted, Unavailable, InvalidArgument or Internal.
    pub error: Error,
    /// Reconnecting with `start_after` set to this loses and repeats nothing.
    pub resume_after: Option<u64>,
    /// The log holds every event from this sequence on (set with OutOfRange).
    pub oldest_available: Option<u64>,
}

impl From<Error> for WatchError {
    fn from(error: Error) -> Self {
        WatchError {
            error,
            resume_after: None,
            oldest_available: None,
        }
    }
}

/// The relay mark: the upstream position, and the newest local sequence when it was set.
fn relayed_mark(upstream_position: u64, local: u64) -> Vec<u8> {
    let mut mark = upstream_position.to_be_bytes().to_vec();
    mark.extend_from_slice(&local.to_be_bytes());
    mark
}

fn seq_of(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| Error::internal("event log", format!("bad key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl EventLog {
    /// Opens the log in the trees `tree` opens (e.g. `|name| store.tree(name)`), applies the
    /// retention of `config`, and starts the syncer. Needs a Tokio runtime.
    pub fn open(
        tree: impl Fn(&str) -> Result<sled::Tree>,
        config: &WatchConfig,
    ) -> Result<EventLog> {
        Self::open_with_grace(tree, config, LAG_GRACE)
    }

    fn open_with_grace(
        tree: impl Fn(&str) -> Result<sled::Tree>,
        config: &WatchConfig,
        lag_grace: Duration,
    ) -> Result<EventLog> {
        Self::open_with(tree, config, lag_grace, None)
    }

    fn open_with(
        tree: impl Fn(&str) -> Result<sled::Tree>,
        config: &WatchConfig,
        lag_grace: Duration,
        feed: Option<Arc<shared::Feed>>,
    ) -> Result<EventLog> {
        let meta = tree(META_TREE)?;
        let open_class = |name: &str| -> Result<(Class, u64, u64)> {
            let t = tree(name)?;
            let trimmed = match meta.get(name)? {
                Some(v) => seq_of(&v)?,
                None => 0,
            };
            let last = match t.last()? {
                Some((k, _)) => seq_of(&k)?,
                None => 0,
            };
            let count = t.len() as u64;
            let class = Class {
                tree: t,
                trimmed_through: AtomicU64::new(trimmed),
                retired_through: AtomicU64::new(trimmed),
            };
            Ok((class, last, count))
        };
        let (invalidations, last0, count0) = open_class(TREES[INVALIDATIONS])?;
        let (stored, last1, count1) = open_class(TREES[STORED])?;
        let classes = [invalidations, stored];
        let mut counts = [count0, count1];
        // Retention may have been lowered since the last run.
        for (i, class) in classes.iter().enumerate() {
            if counts[i] > config.retained_events {
                counts[i] -= trim(class, &meta, i, counts[i] - config.retained_events)?;
            }
        }
        // Retention keeps each class's newest event, so the newest sequence is never deleted
        // and numbering never restarts; a gap (`relay_gap`) is past every event, in the marks.
        let newest = last0
            .max(last1)
            .max(classes[0].trimmed_through.load(Ordering::SeqCst))
            .max(classes[1].trimmed_through.load(Ordering::SeqCst));
        let shared = Arc::new(Shared {
            classes,
            meta,
            writer: Mutex::new(Writer {
                next: newest + 1,
                counts,
            }),
            // What was read back from disk is durable.
            head: watch::channel(Head {
                durable: newest,
                closed: false,
            })
            .0,
            wake: Arc::new(Notify::new()),
            retained: config.retained_events,
            max_lag: config.max_lag,
            lag_grace,
            advances: Mutex::new(VecDeque::from([(Instant::now(), newest)])),
            feed: feed.clone(),
        });
        // A weak reference: dropping the log releases its trees (and the database) at once.
        let syncer = match feed {
            Some(feed) => tokio::spawn(shared::run(Arc::downgrade(&shared), feed)),
            None => tokio::spawn(sync_loop(Arc::downgrade(&shared), shared.wake.clone())),
        };
        Ok(EventLog {
            shared,
            syncer: Mutex::new(Some(syncer)),
        })
    }

    /// A log in a temporary database, deleted when the log is dropped: for servers whose store
    /// has no sled database of its own (tests with hand-built stores).
    pub fn temporary(config: &WatchConfig) -> Result<EventLog> {
        let db = sled::Config::new().temporary(true).open()?;
        EventLog::open(|name| Ok(db.open_tree(name)?), config)
    }

    /// A log shared by every node on `log` (the bucket), mirrored in a temporary database. It
    /// reads what other nodes recorded every `refresh`, and deletes blocks retention dropped
    /// `delete_grace` after dropping them. Needs a Tokio runtime.
    pub fn shared(
        log: Arc<dyn SharedLog>,
        config: &WatchConfig,
        refresh: Duration,
        delete_grace: Duration,
    ) -> Result<EventLog> {
        let db = sled::Config::new().temporary(true).open()?;
        let feed = Arc::new(shared::Feed::new(log, refresh, delete_grace));
        EventLog::open_with(
            |name| Ok(db.open_tree(name)?),
            config,
            LAG_GRACE,
            Some(feed),
        )
    }

    /// Publishes `event` without waiting: watchers receive it once it is durable (after the
    /// next fsync, or once the shared log holds it; a background task batches those, so
    /// callers on a request path do not wait). For events whose sequence the caller needs,
    /// [`EventLog::announce`].
    ///
    /// Build events with [`Event::action_invalidated`], [`Event::namespace_invalidated`],
    /// [`Event::namespace_dropped`] or [`Event::action_result_stored`].
    pub fn publish(&self, event: Event) -> Result<()> {
        match &self.shared.feed {
            Some(feed) => feed.enqueue(event, None),
            None => self.append(event).map(drop),
        }
    }

    /// Publishes `events` in order and returns their sequences once watchers can see them (so
    /// they survive a crash). If the log closes first (shutdown), a local log's sequences are
    /// returned all the same (its final flush persists them); a shared log's events that are
    /// not yet recorded give an error.
    pub async fn announce(&self, events: Vec<Event>) -> Result<Vec<u64>> {
        if let Some(feed) = &self.shared.feed {
            return feed.announce(events).await;
        }
        let sequences = events
            .into_iter()
            .map(|e| self.append(e))
            .collect::<Result<Vec<u64>>>()?;
        if let Some(&last) = sequences.last() {
            if let Err(e) = self.wait_durable(last).await {
                tracing::warn!(error = %e, last, "watch events recorded, not yet fsynced");
            }
        }
        Ok(sequences)
    }

    /// Appends `event` to a local log and returns its sequence number at once; watchers get
    /// it after the next fsync.
    fn append(&self, mut event: Event) -> Result<u64> {
        let s = &*self.shared;
        if s.feed.is_some() {
            return Err(Error::internal(
                "publishing a watch event",
                "a shared log numbers events when it records them",
            ));
        }
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        let Some(class_index) = class_of(kind) else {
            return Err(Error::internal(
                "publishing a watch event",
                format!("event kind {} is not publishable", event.kind),
            ));
        };
        if event.time_unix_ms == 0 {
            event.time_unix_ms = now_unix_ms();
        }
        let class = &s.classes[class_index];
        let seq = {
            let mut w = s.writer.lock();
            let seq = w.next;
            event.sequence = seq;
            class
                .tree
                .insert(seq.to_be_bytes(), event.encode_to_vec())?;
            w.next += 1;
            w.counts[class_index] += 1;
            if w.counts[class_index] > s.retained {
                let excess = w.counts[class_index] - s.retained;
                w.counts[class_index] -= trim(class, &s.meta, class_index, excess)?;
            }
            seq
        };
        s.wake.notify_one();
        Ok(seq)
    }

    /// On a replica: appends an event read from the upstream's log, keeping its upstream
    /// sequence in `upstream_sequence` (so [`EventLog::relayed_through`] is durable with it)
    /// and its time and cause; it gets the next sequence here.
    pub fn relay(&self, mut event: Event) -> Result<u64> {
        event.upstream_sequence = event.sequence;
        self.append(event)
    }

    /// On a replica: the upstream sequence this log has relayed through (`None`: it never
    /// relayed or marked anything, a first start): the newest relayed event's, or the mark a
    /// resync or a fresh start left if that came later (an upstream whose log was replaced
    /// numbers from 1 again).
    pub fn relayed_through(&self) -> Result<Option<u64>> {
        let s = &*self.shared;
        let (mut through, mut at) = match s.meta.get(RELAYED_KEY)? {
            Some(v) if v.len() == 16 => (Some(seq_of(&v[..8])?), seq_of(&v[8..])?),
            _ => (None, 0),
        };
        for class in &s.classes {
            if let Some((key, value)) = class.tree.last()? {
                let seq = seq_of(&key)?;
                if seq > at {
                    let event = Event::decode(value.as_ref())
                        .map_err(|e| Error::internal("decoding the newest watch event", e))?;
                    if event.upstream_sequence > 0 {
                        (through, at) = (Some(event.upstream_sequence), seq);
                    }
                }
            }
        }
        Ok(through)
    }

    /// On a replica whose upstream could not give it every event (its log had moved on):
    /// takes one sequence for the gap and marks everything through it as gone, so each watcher
    /// of this log is told to resync (OUT_OF_RANGE) rather than miss events silently; and
    /// records that the upstream's log is relayed from `upstream_position` on. Durable on
    /// return.
    pub async fn relay_gap(&self, upstream_position: u64) -> Result<u64> {
        let s = &*self.shared;
        let seq = {
            let mut w = s.writer.lock();
            let seq = w.next;
            w.next += 1;
            for (index, class) in s.classes.iter().enumerate() {
                s.meta.insert(TREES[index], &seq.to_be_bytes()[..])?;
                class.trimmed_through.fetch_max(seq, Ordering::SeqCst);
                class.retired_through.fetch_max(seq, Ordering::SeqCst);
            }
            s.meta
                .insert(RELAYED_KEY, relayed_mark(upstream_position, seq))?;
            seq
        };
        s.meta.flush_async().await?;
        s.wake.notify_one();
        Ok(seq)
    }

    /// On a replica: records that the upstream's log is relayed from `upstream_position` on
    /// (a stream that started at the upstream's newest event). Durable on return, so a crash
    /// before the first event cannot make the next start skip events unnoticed.
    pub async fn relay_from(&self, upstream_position: u64) -> Result<()> {
        let s = &*self.shared;
        {
            let w = s.writer.lock();
            s.meta
                .insert(RELAYED_KEY, relayed_mark(upstream_position, w.next - 1))?;
        }
        s.meta.flush_async().await?;
        Ok(())
    }

    /// Waits until every event up to `sequence` is durable and visible to watchers.
    pub async fn wait_durable(&self, sequence: u64) -> Result<()> {
        let mut head = self.shared.head.subscribe();
        head.wait_for(|h| h.durable >= sequence || h.closed)
            .await
            .map_err(|_| Error::Unavailable("the event log is closed".into()))?;
        if head.borrow().durable >= sequence {
            Ok(())
        } else {
            Err(Error::Unavailable("the event log is closed".into()))
        }
    }

    /// The newest sequence watchers can see.
    #[cfg(test)]
    fn durable(&self) -> u64 {
        self.shared.head.borrow().durable
    }

    /// Ends every watch stream with UNAVAILABLE (their clients reconnect elsewhere or later);
    /// new watchers are refused the same way. Called when shutdown begins, so open streams do
    /// not hold the graceful shutdown open.
    pub fn close(&self) {
        self.shared.head.send_modify(|h| h.closed = true);
        // The syncer finishes a sync in progress, then sees `closed` and ends.
        self.shared.wake.notify_one();
        if let Some(feed) = &self.shared.feed {
            feed.notify();
        }
    }

    /// Closes the log and waits until its syncer has ended, so that the database is no longer
    /// held by it (a restart in the same process can open it again at once).
    pub async fn shutdown(&self) {
        self.close();
        let syncer = self.syncer.lock().take();
        if let Some(syncer) = syncer {
            let _ = syncer.await;
        }
    }

    /// Starts a watcher. Fails at once with OUT_OF_RANGE if events after the start point are no
    /// longer all retained, or if the start point is beyond the newest event. With a shared log,
    /// a start point beyond what this node has read first waits for one read of the shared log
    /// (a client resuming here with a sequence another node sent it).
    pub async fn watch(&self, sub: Subscription) -> Result<Watcher, WatchError> {
        if let Some(feed) = &self.shared.feed {
            if !feed.loaded().await {
                return Err(WatchError::from(Error::Unavailable(
                    "this node has not read the shared watch event log yet (is the object store \
                     reachable?); try again shortly"
                        .into(),
                )));
            }
            if let Start::After(n) = sub.start {
                let next = self.shared.writer.lock().next;
                if n >= next && !feed.catch_up().await {
                    return Err(WatchError::from(Error::Unavailable(format!(
                        "start_after {n} is beyond what this node has read of the shared watch \
                         event log, and it cannot read further now (is the object store \
                         reachable?); try again shortly"
                    ))));
                }
            }
        }
        self.watch_now(sub)
    }

    fn watch_now(&self, sub: Subscription) -> Result<Watcher, WatchError> {
        let s = &self.shared;
        let head = *s.head.borrow();
        if head.closed {
            return Err(shutting_down(match sub.start {
                Start::After(n) => n,
                Start::Now => head.durable,
            }));
        }
        let newest = s.writer.lock().next - 1;
        let kinds: Vec<EventKind> = if sub.kinds.is_empty() {
            vec![
                EventKind::ActionInvalidated,
                EventKind::NamespaceInvalidated,
                EventKind::NamespaceDropped,
            ]
        } else {
            sub.kinds
        };
        let mut classes: Vec<usize> = kinds.iter().filter_map(|k| class_of(*k)).collect();
        classes.sort_unstable();
        classes.dedup();
        let available_after = classes
            .iter()
            .map(|&c| s.classes[c].trimmed_through.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0);
        let position = match sub.start {
            Start::Now => head.durable,
            Start::After(0) => available_after,
            Start::After(n) if n > newest => {
                return Err(WatchError {
                    error: Error::OutOfRange(format!(
                        "start_after {n} is beyond the newest event, {newest}: this server's log \
                         never held it (was the data dir replaced?); resync, then watch with \
                         start_after={available_after}"
                    )),
                    resume_after: None,
                    oldest_available: Some(available_after + 1),
                });
            }
            Start::After(n) if n < available_after => {
                return Err(compacted(n, available_after, s.retained));
            }
            Start::After(n) => n,
        };
        Ok(Watcher {
            shared: s.clone(),
            head: s.head.subscribe(),
            position,
            classes,
            kinds,
            pattern: sub.namespace_pattern,
            pending: VecDeque::new(),
            min_lag: s.settled().saturating_sub(position),
            done: false,
        })
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        if let Some(syncer) = self.syncer.lock().take() {
            syncer.abort();
        }
        self.close();
    }
}

fn shutting_down(resume_after: u64) -> WatchError {
    WatchError {
        error: Error::Unavailable(format!(
            "the server is shutting down; reconnect with start_after={resume_after}"
        )),
        resume_after: Some(resume_after),
        oldest_available: None,
    }
}

fn compacted(after: u64, available_after: u64, retained: u64) -> WatchError {
    let oldest = available_after + 1;
    WatchError {
        error: Error::OutOfRange(format!(
            "events after {after} are no longer retained (the log keeps the newest {retained} \
             of each class); the oldest still available is {oldest}: resync, then watch with \
             start_after={available_after}"
        )),
        resume_after: None,
        oldest_available: Some(oldest),
    }
}

/// Deletes the `excess` oldest events of a class; returns how many it deleted.
fn trim(class: &Class, meta: &sled::Tree, index: usize, excess: u64) -> Result<u64> {
    let keys = class
        .tree
        .iter()
        .keys()
        .take(excess as usize)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let Some(last) = keys.last() else {
        return Ok(0);
    };
    let through = seq_of(last)?;
    // Recorded before deleting: a crash in between over-states what was trimmed, never hides it.
    // Only ever raised: a gap marked further on (a shared log's) must stay marked.
    let marked = through.max(class.trimmed_through.load(Ordering::SeqCst));
    meta.insert(TREES[index], &marked.to_be_bytes()[..])?;
    class.trimmed_through.fetch_max(through, Ordering::SeqCst);
    class.retired_through.fetch_max(through, Ordering::SeqCst);
    let mut batch = sled::Batch::default();
    for k in &keys {
        batch.remove(k);
    }
    class.tree.apply_batch(batch)?;
    Ok(keys.len() as u64)
}

/// Makes published events durable and then visible, one fsync for all events published since the
/// previous one.
async fn sync_loop(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.head.borrow().closed {
            return;
        }
        let target = shared.writer.lock().next - 1;
        if target <= shared.head.borrow().durable {
            continue;
        }
        // Flushing any tree flushes the whole database: events and the writes before them.
        match shared.meta.flush_async().await {
            Ok(_) => shared.advance(target),
            Err(e) => {
                tracing::warn!(error = %e, "fsync of the watch event log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                shared.wake.notify_one();
            }
        }
    }
}

/// One watcher's cursor over the log. Turn it into a stream with [`Watcher::into_stream`].
pub struct Watcher {
    shared: Arc<Shared>,
    head: watch::Receiver<Head>,
    /// The last sequence read (sent, or skipped by the filter): where a reconnect resumes.
    position: u64,
    /// The classes (trees) the kinds live in, sorted.
    classes: Vec<usize>,
    kinds: Vec<EventKind>,
    pattern: String,
    /// Events read and not yet handed out; at most one batch per class.
    pending: VecDeque<Event>,
    /// The smallest lag this stream has had. Lag is counted from it, so a client resuming far
    /// back is not cut off while it gains ground, only when it loses more.
    min_lag: u64,
    done: bool,
}

impl Watcher {
    /// The sequence the stream starts after (what `start_after` resolved to).
    pub fn start_after(&self) -> u64 {
        self.position
    }

    /// The events, in sequence order, until the watcher falls behind, the log is closed, or the
    /// stream is dropped. It ends with one error saying where to resume.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event, WatchError>> + Send {
        futures::stream::unfold(self, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        })
    }

    async fn next(&mut self) -> Option<Result<Event, WatchError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let head = *self.head.borrow_and_update();
            if head.closed {
                self.done = true;
                return Some(Err(shutting_down(self.position)));
            }
            // Lag: how far behind the events that have been visible for `lag_grace`.
            let lag = self.shared.settled().saturating_sub(self.position);
            self.min_lag = self.min_lag.min(lag);
            let fell = lag - self.min_lag;
            if fell > self.shared.max_lag {
                self.done = true;
                return Some(Err(WatchError {
                    error: Error::ResourceExhausted(format!(
                        "watcher fell {fell} events behind (limit {}, counting events visible \
                         for over {:?}): reconnect with start_after={} and read faster",
                        self.shared.max_lag, self.shared.lag_grace, self.position
                    )),
                    resume_after: Some(self.position),
                    oldest_available: None,
                }));
            }
            if head.durable <= self.position {
                if self.head.changed().await.is_err() {
                    self.done = true;
                    return Some(Err(shutting_down(self.position)));
                }
                continue;
            }
            if let Err(e) = self.read_batch(head.durable) {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    /// Reads the next events up to `durable` (at most [`BATCH`] per class) into `pending`.
    /// Synchronous: no sled iterator lives across an `.await`.
    fn read_batch(&mut self, durable: u64) -> Result<(), WatchError> {
        let from = self.position + 1;
        let mut upper = durable;
        let mut read: Vec<(u64, sled::IVec)> = Vec::new();
        for &c in &self.classes {
            let tree = &self.shared.classes[c].tree;
            let mut n = 0;
            for item in tree.range(from.to_be_bytes()..=upper.to_be_bytes()) {
                let (key, value) = item.map_err(Error::from)?;
                let seq = seq_of(&key)?;
                read.push((seq, value));
                n += 1;
                if n == BATCH {
                    // This class may have more below `upper`: stop the whole step here.
                    upper = seq;
                    break;
                }
            }
        }
        // An event deleted by retention before we read it would be a silent hole.
        for &c in &self.classes {
            let trimmed = self.shared.classes[c]
                .trimmed_through
                .load(Ordering::SeqCst);
            if trimmed > self.position {
                let available_after = self
                    .classes
                    .iter()
                    .map(|&c| {
                        self.shared.classes[c]
                            .trimmed_through
                            .load(Ordering::SeqCst)
                    })
                    .max()
                    .unwrap_or(trimmed);
                return Err(compacted(
                    self.position,
                    available_after,
                    self.shared.retained,
                ));
            }
        }
        read.retain(|(seq, _)| *seq <= upper);
        read.sort_unstable_by_key(|(seq, _)| *seq);
        for (seq, value) in read {
            let event = Event::decode(value.as_ref())
                .map_err(|e| Error::internal(format!("decoding watch event {seq}"), e))?;
            if self.wants(&event) {
                self.pending.push_back(event);
            }
        }
        self.position = upper;
        Ok(())
    }

    fn wants(&self, event: &Event) -> bool {
        self.kinds.contains(&event.kind())
            && (self.pattern.is_empty() || glob_match(&self.pattern, &event.namespace))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use futures::StreamExt;

    use super::*;

    fn config(retained: u64, max_lag: u64) -> WatchConfig {
        WatchConfig {
            retained_events: retained,
            max_lag,
        }
    }

    fn open(db: &sled::Db, config: &WatchConfig) -> EventLog {
        EventLog::open(|name| Ok(db.open_tree(name)?), config).unwrap()
    }

    fn temp_db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    fn action(i: u64) -> Digest {
        Digest::of(format!("action {i}").as_bytes())
    }

    fn sub(start: Start, kinds: &[EventKind]) -> Subscription {
        Subscription {
            namespace_pattern: String::new(),
            start,
            kinds: kinds.to_vec(),
        }
    }

    /// Reads `n` events from a stream, failing on an error or a 5 s stall.
    pub(crate) async fn take(
        stream: &mut (impl Stream<Item = Result<Event, WatchError>> + Unpin),
        n: usize,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        while out.len() < n {
            let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("event in time")
                .expect("stream open");
            out.push(next.expect("event"));
        }
        out
    }

    #[tokio::test]
    async fn watchers_see_published_events_in_order_after_they_are_durable() {
        let db = temp_db();
        let log = open(&db, &config(1000, 1000));
        let w = log
            .watch_now(sub(Start::After(0), &[EventKind::ActionResultStored]))
            .unwrap();
        assert_eq!(w.start_after(), 0);
        let mut stream = Box::pin(w.into_stream());
        let mut seqs = Vec::new();
        for i in 0..200 {
            seqs.push(
                log.append(Event::action_result_stored("ns", action(i), "t"))
                    .unwrap(),
            );
        }
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let got = take(&mut stream, 200).await;
        assert_eq!(got.iter().map(|e| e.sequence).collect::<Vec<_>>(), seqs);
        assert_eq!(got[7].action_digest, Some(action(7).to_proto()));
        assert!(got[0].time_unix_ms > 0);
        log.wait_durable(200).await.unwrap();
        assert_eq!(log.durable(), 200);
    }

    #[tokio::test]
    async fn filters_by_kind_and_namespace() {
        let db = temp_db();
        let log = open(&db, &config(100, 1000));
        let default_kinds = log.watch_now(sub(Start::After(0), &[])).unwrap();
        let ci = log
            .watch_now(Subscription {
                namespace_pattern: "ci/*".into(),
                start: Start::After(0),
                kinds: vec![EventKind::ActionResultStored, EventKind::NamespaceDropped],
            })
            .unwrap();
        log.append(Event::action_result_stored("ci/main", action(1), "t"))
            .unwrap();
        log.append(Event::namespace_dropped("dev", "gone", "t"))
            .unwrap();
        log.append(Event::action_invalidated("ci/x", action(2), "flaky", "t"))
            .unwrap();
        log.append(Event::namespace_dropped("ci/branches/old", "", "t"))
            .unwrap();
        log.append(Event::namespace_invalidated("ci/main", 7, "", "t"))
            .unwrap();
        let mut all = Box::pin(default_kinds.into_stream());
        let got: Vec<u64> = take(&mut all, 4).await.iter().map(|e| e.sequence).collect();
        assert_eq!(got, [2, 3, 4, 5], "every kind but stored results");
        let mut ci = Box::pin(ci.into_stream());
        let got: Vec<u64> = take(&mut ci, 2).await.iter().map(|e| e.sequence).collect();
        assert_eq!(got, [1, 4]);
    }

    #[tokio::test]
    async fn resuming_after_a_sequence_repeats_and_loses_nothing() {
        let db = temp_db();
        let log = open(&db, &config(1000, 1000));
        for i in 0..100 {
            log.append(Event::action_invalidated("a", action(i), "", "t"))
                .unwrap();
        }
        log.wait_durable(100).await.unwrap();
        let mut first = Box::pin(
            log.watch_now(sub(Start::After(0), &[]))
                .unwrap()
                .into_stream(),
        );
        let seen = take(&mut first, 37).await;
        drop(first);
        let last = seen.last().unwrap().sequence;
        let mut second = Box::pin(
            log.watch_now(sub(Start::After(last), &[]))
                .unwrap()
                .into_stream(),
        );
        let rest = take(&mut second, 63).await;
        let all: Vec<u64> = seen.iter().chain(&rest).map(|e| e.sequence).collect();
        assert_eq!(all, (1..=100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn sequences_continue_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = open(&db, &config(10, 100));
            for i in 0..25 {
                log.append(Event::action_invalidated("a", action(i), "", "t"))
                    .unwrap();
            }
            log.wait_durable(25).await.unwrap();
            log.shutdown().await;
            assert_eq!(
                log.wait_durable(26).await.unwrap_err().code(),
                tonic::Code::Unavailable
            );
        }
        let db = sled::open(dir.path()).unwrap();
        let log = open(&db, &config(10, 100));
        assert_eq!(log.durable(), 25);
        assert_eq!(
            log.append(Event::namespace_dropped("a", "", "t")).unwrap(),
            26,
            "no sequence is reused"
        );
        // Retention survived the restart: 15 was deleted, 16 is still there.
        let err = log.watch_now(sub(Start::After(14), &[])).err().unwrap();
        assert_eq!(err.oldest_available, Some(17));
        assert!(log.watch_now(sub(Start::After(16), &[])).is_ok());
    }

    #[tokio::test]
    async fn old_start_points_are_out_of_range_and_name_the_oldest_available() {
        let db = temp_db();
        let log = open(&db, &config(10, 1000));
        for i in 0..30 {
            log.append(Event::action_invalidated("a", action(i), "", "t"))
                .unwrap();
        }
        log.wait_durable(30).await.unwrap();
        let err = log.watch_now(sub(Start::After(5), &[])).err().unwrap();
        assert_eq!(err.error.code(), tonic::Code::OutOfRange);
        assert_eq!(err.oldest_available, Some(21));
        assert!(err
            .error
            .to_string()
            .contains("oldest still available is 21"));
        // Exactly at the edge is fine, and 0 means "the oldest retained".
        let w = log.watch_now(sub(Start::After(20), &[])).unwrap();
        assert_eq!(w.start_after(), 20);
        let w = log.watch_now(sub(Start::After(0), &[])).unwrap();
        assert_eq!(w.start_after(), 20);
        let mut s = Box::pin(w.into_stream());
        assert_eq!(take(&mut s, 1).await[0].sequence, 21);
        // Beyond the newest: the client's log came from elsewhere.
        let err = log.watch_now(sub(Start::After(31), &[])).err().unwrap();
        assert_eq!(err.error.code(), tonic::Code::OutOfRange);
        // From now.
        assert_eq!(
            log.watch_now(sub(Start::Now, &[])).unwrap().start_after(),
            30
        );
    }

    #[tokio::test]
    async fn action_results_stored_do_not_push_invalidations_out() {
        let db = temp_db();
        let log = open(&db, &config(5, 1000));
        log.append(Event::namespace_dropped("a", "", "t")).unwrap();
        for i in 0..50 {
            log.append(Event::action_result_stored("a", action(i), "t"))
                .unwrap();
        }
        log.wait_durable(51).await.unwrap();
        let mut s = Box::pin(
            log.watch_now(sub(Start::After(0), &[]))
                .unwrap()
                .into_stream(),
        );
        assert_eq!(take(&mut s, 1).await[0].sequence, 1);
        // Stored results keep their own newest 5: 47..=51.
        let w = log
            .watch_now(sub(Start::After(0), &[EventKind::ActionResultStored]))
            .unwrap();
        assert_eq!(w.start_after(), 46);
        assert!(log
            .watch_now(sub(Start::After(1), &[EventKind::ActionResultStored]))
            .is_err());
    }

    #[tokio::test]
    async fn a_watcher_overtaken_by_retention_mid_stream_is_told_so() {
        let db = temp_db();
        let log = open(&db, &config(10, 1000));
        let mut s = Box::pin(
            log.watch_now(sub(Start::After(0), &[]))
                .unwrap()
                .into_stream(),
        );
        log.append(Event::namespace_dropped("a", "", "t")).unwrap();
        assert_eq!(take(&mut s, 1).await[0].sequence, 1);
        for i in 0..100 {
            log.append(Event::action_invalidated("a", action(i), "", "t"))
                .unwrap();
        }
        log.wait_durable(101).await.unwrap();
        let err = loop {
            match s.next().await.expect("an error ends the stream") {
                Ok(e) => assert!(e.sequence <= 1 + BATCH as u64, "{}", e.sequence),
                Err(e) => break e,
            }
        };
        assert_eq!(err.error.code(), tonic::Code::OutOfRange);
        assert_eq!(err.oldest_available, Some(92));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_cut_off_and_can_resume() {
        let db = temp_db();
        let log = EventLog::open_with_grace(
            |name| Ok(db.open_tree(name)?),
            &config(10_000, 50),
            Duration::ZERO,
        )
        .unwrap();
        let mut s = Box::pin(log.watch_now(sub(Start::Now, &[])).unwrap().into_stream());
        for i in 0..10 {
            log.append(Event::action_invalidated("a", action(i), "", "t"))
                .unwrap();
        }
        let first = take(&mut s, 10).await;
        // Stop reading while writers go on: publishing never waits for the watcher.
        for i in 10..200 {
            log.append(Event::action_invalidated("a", action(i), "", "t"))
                .unwrap();
        }
        log.wait_durable(200).await.unwrap();
        let err = s.next().await.unwrap().expect_err("cut off");
        assert_eq!(err.error.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.resume_after, Some(10));
        assert_eq!(first.last().unwrap().sequence, 10);
        // Resuming 190 behind (more than max_lag) works: it gains ground, so it is not cut off.
        let mut s = Box::pin(
            log.watch_now(sub(Start::After(10), &[]))
                .unwrap()
                .into_stream(),
        );
        let rest = take(&mut s, 190).await;
        assert_eq!(
            rest.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            (11..=200).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_burst_is_not_mistaken_for_a_slow_watcher() {
        let db = temp_db();
        let grace = Duration::from_millis(100);
        let log =
            EventLog::open_with_grace(|name| Ok(db.open_tree(name)?), &config(10_000, 10), grace)
                .unwrap();
        let mut s = Box::pin(log.watch_now(sub(Start::Now, &[])).unwrap().into_stream());
        // The watcher waits, caught up, for longer than the grace period...
        let mut first = s.next();
        assert!(tokio::time::timeout(grace * 3, &mut first).await.is_err());
        // ...then 500 events become visible in one step, 50 times the lag limit: it reads on.
        for i in 0..500 {
            log.append(Event::action_invalidated("a", action(i), "", "t"))
                .unwrap();
        }
        log.wait_durable(500).await.unwrap();
        assert_eq!(first.await.unwrap().unwrap().sequence, 1);
        assert_eq!(take(&mut s, 499).await.last().unwrap().sequence, 500);
    }

    #[tokio::test]
    async fn a_slow_reader_is_cut_off_while_the_writer_keeps_its_pace() {
        let db = temp_db();
        let log = Arc::new(
            EventLog::open_with_grace(
                |name| Ok(db.open_tree(name)?),
                &config(10_000, 20),
                Duration::from_millis(50),
            )
            .unwrap(),
        );
        let mut s = Box::pin(log.watch_now(sub(Start::Now, &[])).unwrap().into_stream());
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    log.append(Event::action_invalidated("a", action(i), "", "t"))
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let mut got = Vec::new();
        let err = loop {
            match s.next().await.expect("ends with an error") {
                Ok(e) => got.push(e.sequence),
                Err(e) => break e,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        writer.await.unwrap();
        assert_eq!(err.error.code(), tonic::Code::ResourceExhausted);
        let resume = err.resume_after.unwrap();
        assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
        assert_eq!(
            resume,
            got.len() as u64,
            "resume right after the last event sent"
        );
        assert!(resume < 300);
    }

    #[tokio::test]
    async fn closing_ends_watchers_with_their_resume_point() {
        let db = temp_db();
        let log = open(&db, &config(100, 100));
        let mut s = Box::pin(
            log.watch_now(sub(Start::After(0), &[]))
                .unwrap()
                .into_stream(),
        );
        log.append(Event::namespace_dropped("a", "", "t")).unwrap();
        take(&mut s, 1).await;
        log.close();
        let err = s.next().await.unwrap().err().unwrap();
        assert_eq!(err.error.code(), tonic::Code::Unavailable);
        assert_eq!(err.resume_after, Some(1));
        assert!(s.next().await.is_none());
        assert!(log.watch_now(sub(Start::After(1), &[])).is_err());
    }

    #[test]
    fn unknown_kinds_are_invalid() {
        let e = Subscription::new(String::new(), Start::Now, &[4, 9]).unwrap_err();
        assert!(e.to_string().contains("kinds[1]"), "{e}");
        assert!(Subscription::new(String::new(), Start::Now, &[0]).is_err());
    }
}
