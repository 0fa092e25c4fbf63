//! The watch event log's blocks in the bucket (`crate::watch::SharedLog`): one object per
//! block, `events/<first sequence, 20 digits>`, created with `If-None-Match: *`, so the
//! names sort as the sequences do and no two nodes ever create the same one. What a block
//! holds is `crate::watch`'s business.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions};

use super::{bucket_error, BucketStore, Inner};
use crate::error::Result;
use crate::watch::SharedLog;

/// The shared event log of a bucket store's nodes.
pub struct BucketEvents {
    store: BucketStore,
}

impl BucketStore {
    /// The watch event log every node on this bucket and prefix shares.
    pub fn events(&self) -> BucketEvents {
        BucketEvents {
            store: self.clone(),
        }
    }
}

impl Inner {
    fn events_dir(&self) -> Path {
        self.root.clone().join("events")
    }

    fn block_path(&self, first: u64) -> Path {
        self.events_dir().join(format!("{first:020}"))
    }
}

#[async_trait]
impl SharedLog for BucketEvents {
    async fn list_after(&self, after: u64) -> Result<Vec<u64>> {
        let inner = &self.store.inner;
        let dir = inner.events_dir();
        let mut listed = inner
            .bucket
            .list_with_offset(Some(&dir), &inner.block_path(after));
        let mut firsts = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| bucket_error("listing watch events", e))?;
            // Anything else under the prefix is not a block, and not ours to judge.
            if let Some(first) = meta.location.filename().and_then(|n| n.parse::<u64>().ok()) {
                if first > after {
                    firsts.push(first);
                }
            }
        }
        // S3 lists in name order; not every object store promises it.
        firsts.sort_unstable();
        Ok(firsts)
    }

    async fn read(&self, first: u64) -> Result<Option<Bytes>> {
        let inner = &self.store.inner;
        let got = inner
            .fetch_bytes(&inner.block_path(first), "reading watch events")
            .await?;
        Ok(got.map(|(bytes, _)| bytes))
    }

    async fn create(&self, first: u64, block: Bytes) -> Result<bool> {
        let inner = &self.store.inner;
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match inner
            .bucket
            .put_opts(&inner.block_path(first), block.into(), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(bucket_error("recording watch events", e)),
        }
    }

    async fn delete(&self, first: u64) -> Result<()> {
        let inner = &self.store.inner;
        match inner.bucket.delete(&inner.block_path(first)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(bucket_error("deleting old watch events", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use object_store::memory::InMemory;

    use super::*;
    use crate::config::{S3Config, WatchConfig};
    use crate::digest::Digest;
    use crate::watch::tests::take;
    use crate::watch::{Event, EventKind, EventLog, Start, Subscription};

    /// Nodes' logs on one in-memory object store (whose conditional creates are atomic, as
    /// S3's are).
    struct Bucket {
        store: BucketStore,
    }

    impl Bucket {
        fn new() -> Self {
            Bucket {
                store: BucketStore::with_bucket(Arc::new(InMemory::new()), &S3Config::default()),
            }
        }

        fn node(&self, retained: u64, grace: Duration) -> EventLog {
            let config = WatchConfig {
                retained_events: retained,
                max_lag: 1_000_000,
            };
            EventLog::shared(
                Arc::new(self.store.events()),
                &config,
                Duration::from_millis(50),
                grace,
            )
            .unwrap()
        }

        async fn blocks(&self) -> Vec<u64> {
            self.store.events().list_after(0).await.unwrap()
        }
    }

    fn every_kind(start: Start) -> Subscription {
        Subscription {
            namespace_pattern: String::new(),
            start,
            kinds: vec![
                EventKind::ActionInvalidated,
                EventKind::NamespaceInvalidated,
                EventKind::NamespaceDropped,
                EventKind::ActionResultStored,
            ],
        }
    }

    /// Publishes 20 stored results and announces 20 invalidations of namespace `node`,
    /// alternating; the sequences the announces returned.
    async fn announcing(log: &EventLog, node: &str) -> Vec<u64> {
        let mut sequences = Vec::new();
        for i in 0..20 {
            log.publish(Event::action_result_stored(node, action(i), "t"))
                .unwrap();
            let event = Event::namespace_invalidated(node, i, "race", "t");
            sequences.extend(log.announce(vec![event]).await.unwrap());
        }
        sequences
    }

    fn action(i: u64) -> Digest {
        Digest::of(format!("action {i}").as_bytes())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nodes_racing_to_record_number_every_event_once_and_alike() {
        let bucket = Bucket::new();
        let (a, b) = (
            bucket.node(1000, Duration::ZERO),
            bucket.node(1000, Duration::ZERO),
        );
        let mut on_a = Box::pin(
            a.watch(every_kind(Start::After(0)))
                .await
                .unwrap()
                .into_stream(),
        );
        let mut on_b = Box::pin(
            b.watch(every_kind(Start::After(0)))
                .await
                .unwrap()
                .into_stream(),
        );
        // Both nodes announce and publish at once, so their creates collide.
        let (from_a, from_b) = tokio::join!(announcing(&a, "a"), announcing(&b, "b"));
        let seen_a = take(&mut on_a, 80).await;
        let seen_b = take(&mut on_b, 80).await;
        let numbers: Vec<u64> = seen_a.iter().map(|e| e.sequence).collect();
        assert_eq!(numbers, (1..=80).collect::<Vec<_>>(), "gapless, each once");
        assert_eq!(
            seen_a, seen_b,
            "both nodes see the same events in the same order"
        );
        for (node, announced) in [("a", &from_a), ("b", &from_b)] {
            let epochs: Vec<u64> = seen_a
                .iter()
                .filter(|e| e.namespace == node && e.kind() == EventKind::NamespaceInvalidated)
                .map(|e| e.epoch)
                .collect();
            assert_eq!(
                epochs,
                (0..20).collect::<Vec<_>>(),
                "node {node}'s order kept"
            );
            for (i, seq) in announced.iter().enumerate() {
                assert_eq!(
                    seen_a[*seq as usize - 1].epoch,
                    i as u64,
                    "announce said {seq}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_node_that_starts_later_reads_the_log_and_resumes_where_another_left_off() {
        let bucket = Bucket::new();
        let a = bucket.node(1000, Duration::ZERO);
        let mut sequences = Vec::new();
        for i in 0..10 {
            let event = Event::action_invalidated("ns", action(i), "why", "t");
            sequences.extend(a.announce(vec![event]).await.unwrap());
        }
        let mut on_a = Box::pin(
            a.watch(every_kind(Start::After(0)))
                .await
                .unwrap()
                .into_stream(),
        );
        let first_four = take(&mut on_a, 4).await;
        drop(on_a);
        // A node started after all that resumes the stream from where a's watcher stopped...
        let b = bucket.node(1000, Duration::ZERO);
        let resume = first_four.last().unwrap().sequence;
        let mut on_b = Box::pin(
            b.watch(every_kind(Start::After(resume)))
                .await
                .unwrap()
                .into_stream(),
        );
        let rest = take(&mut on_b, 6).await;
        let all: Vec<u64> = first_four.iter().chain(&rest).map(|e| e.sequence).collect();
        assert_eq!(all, sequences);
        // ...and numbers its own events after everyone's.
        let next = b
            .announce(vec![Event::namespace_dropped("ns", "gone", "t")])
            .await
            .unwrap();
        assert_eq!(next, [11]);
        // A sequence a node has not read yet (recorded through another a moment ago) is
        // waited for, not refused as "beyond the newest".
        let mut from_b = Box::pin(
            b.watch(every_kind(Start::After(11)))
                .await
                .unwrap()
                .into_stream(),
        );
        let later = a
            .announce(vec![Event::namespace_invalidated("ns", 2, "", "t")])
            .await
            .unwrap();
        assert_eq!(later, [12]);
        let on_a_late = a.watch(every_kind(Start::After(12))).await.unwrap();
        assert_eq!(on_a_late.start_after(), 12);
        assert_eq!(take(&mut from_b, 1).await[0].sequence, 12);
    }

    #[tokio::test]
    async fn retention_deletes_old_blocks_per_class_and_a_new_node_says_what_is_gone() {
        let bucket = Bucket::new();
        let a = bucket.node(3, Duration::ZERO);
        // Invalidations 1-2, then ten stored results, then an invalidation: the stored ones
        // push each other out, never the invalidations.
        for i in 0..2 {
            a.announce(vec![Event::namespace_invalidated("ns", i, "", "t")])
                .await
                .unwrap();
        }
        for i in 0..10 {
            a.announce(vec![Event::action_result_stored("ns", action(i), "t")])
                .await
                .unwrap();
        }
        a.announce(vec![Event::namespace_invalidated("ns", 9, "", "t")])
            .await
            .unwrap();
        // Deleted on a later round (the grace is zero here).
        a.announce(vec![Event::namespace_dropped("other", "", "t")])
            .await
            .unwrap();
        let blocks = bucket.blocks().await;
        assert_eq!(
            blocks,
            [2, 10, 11, 12, 13, 14],
            "3 stored and 3 invalidations kept"
        );
        let b = bucket.node(3, Duration::ZERO);
        // Invalidations are all there from the start; old stored results are gone.
        let invalidations = b
            .watch(Subscription {
                namespace_pattern: String::new(),
                start: Start::After(1),
                kinds: vec![EventKind::NamespaceInvalidated, EventKind::NamespaceDropped],
            })
            .await
            .unwrap();
        let mut invalidations = Box::pin(invalidations.into_stream());
        let got: Vec<u64> = take(&mut invalidations, 3)
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(got, [2, 13, 14]);
        let stored = b
            .watch(Subscription {
                namespace_pattern: String::new(),
                start: Start::After(5),
                kinds: vec![EventKind::ActionResultStored],
            })
            .await
            .err()
            .expect("stored results after 5 are partly gone");
        assert_eq!(stored.error.code(), tonic::Code::OutOfRange);
        assert_eq!(stored.oldest_available, Some(10));
    }
}
