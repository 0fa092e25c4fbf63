//! Log lines that a flood could multiply: at most one a second per kind, each saying how many
//! were suppressed since the last, so a flood of bad calls can neither fill the log nor slow
//! good callers behind the logger.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// One kind of log line (a `static` each).
pub struct Throttle {
    /// Second (since the first line of any kind, from 1) of the last line logged.
    last: AtomicU64,
    unlogged: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle {
            last: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` if this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        self.allow_at(EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1)
    }

    /// [`Throttle::allow`] at second `now` (from 1).
    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Relaxed);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.unlogged.swap(0, Relaxed))
        } else {
            self.unlogged.fetch_add(1, Relaxed);
            None
        }
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_a_count_of_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.allow_at(1), Some(0));
        assert_eq!(t.allow_at(1), None);
        assert_eq!(t.allow_at(1), None);
        assert_eq!(t.allow_at(2), Some(2));
        assert_eq!(t.allow_at(2), None);
        assert_eq!(t.allow_at(7), Some(1));
    }
}
