//! A store's clock: Unix seconds, plus an offset only tests move (to test retention and TTL
//! without waiting). One for every backend, so "idle for N" means the same everywhere.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

#[derive(Default)]
pub struct Clock {
    offset: AtomicU64,
}

impl Clock {
    /// Now, in Unix seconds (saturating at `u32::MAX`, the width stored with every record).
    pub fn now(&self) -> u32 {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        (wall + self.offset.load(Relaxed)).min(u32::MAX as u64) as u32
    }

    /// Pretends `by` more time has passed.
    pub fn advance(&self, by: Duration) {
        self.offset.fetch_add(by.as_secs(), Relaxed);
    }
}
