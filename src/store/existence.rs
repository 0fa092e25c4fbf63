//! A bounded memory of blobs seen in a store other nodes write to (a bucket, an upstream), so
//! FindMissingBlobs need not ask it again for each. Positive answers only.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::digest::Digest;

/// Blobs this node has seen in the bucket (or upstream), each for at most `max_age`, at most `capacity` of
/// them. Only positive answers: a blob can vanish from the bucket (lifecycle rules, a delete
/// by hand), and a node may claim it for at most `max_age` after; a "missing" is never kept,
/// so an upload through another node is found at once. The oldest sighting goes first when
/// it is full (a queue in sighting order: O(1) per insert, never a scan under the lock).
pub struct Existence {
    inner: Mutex<Sightings>,
    capacity: usize,
    max_age: Duration,
}

#[derive(Default)]
struct Sightings {
    at: HashMap<Digest, Instant>,
    /// Every sighting in order; one whose time no longer matches `at` was renewed since.
    order: std::collections::VecDeque<(Digest, Instant)>,
}

impl Existence {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Existence {
            inner: Mutex::new(Sightings::default()),
            capacity,
            max_age,
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        let mut s = self.inner.lock();
        match s.at.get(digest) {
            Some(at) if at.elapsed() < self.max_age => true,
            Some(_) => {
                s.at.remove(digest);
                false
            }
            None => false,
        }
    }

    pub fn insert(&self, digest: Digest) {
        if self.capacity == 0 || self.max_age.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut s = self.inner.lock();
        s.at.insert(digest, now);
        s.order.push_back((digest, now));
        // Drop sightings past the bound, and renewed ones, from the front.
        while s.at.len() > self.capacity || s.order.len() > 2 * self.capacity {
            let Some((old, when)) = s.order.pop_front() else {
                break;
            };
            if s.at.get(&old) == Some(&when) {
                s.at.remove(&old);
            }
        }
    }

    pub fn remove(&self, digest: &Digest) {
        self.inner.lock().at.remove(digest);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Existence;
    use crate::digest::Digest;
    use std::time::Duration;

    #[test]
    fn existence_is_bounded_in_size_and_age() {
        let seen = Existence::new(100, Duration::from_secs(60));
        let digests: Vec<Digest> = (0..250u32).map(|i| Digest::of(&i.to_le_bytes())).collect();
        for d in &digests {
            seen.insert(*d);
            assert!(seen.len() <= 100);
        }
        // The newest are kept, the oldest went first.
        assert!(seen.contains(&digests[249]) && seen.contains(&digests[150]));
        assert!(!seen.contains(&digests[149]) && !seen.contains(&digests[0]));
        // A renewed sighting outlives its first place in the queue.
        let renew = Existence::new(3, Duration::from_secs(60));
        for d in &digests[..3] {
            renew.insert(*d);
        }
        renew.insert(digests[0]);
        renew.insert(digests[3]);
        assert!(renew.contains(&digests[0]), "renewed, so not the oldest");
        assert!(!renew.contains(&digests[1]), "the oldest sighting went");
        let aged = Existence::new(100, Duration::from_millis(20));
        aged.insert(digests[0]);
        assert!(aged.contains(&digests[0]));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!aged.contains(&digests[0]), "an old answer is asked again");
        let off = Existence::new(0, Duration::from_secs(60));
        off.insert(digests[0]);
        assert!(!off.contains(&digests[0]));
    }
}
