//! Why a store refused a write up front, counted per reason for `stats` and `/metrics`
//! (`hoard_refused_writes_total{reason}`). Both backends count into a [`RefusedWrites`]; the
//! reasons are a fixed set, so the metric's series are known (and present at 0) from the start.
//!
//! Counted: writes of blobs and action results (and upload steps) turned away before any byte
//! is stored. Not counted: writes that were attempted and failed (an ENOSPC in the middle of a
//! write is an error, and closes the gate for the writes after it, which are then counted), and
//! the store's own background saves (namespace last uses, the sweep), which would count once a
//! minute for as long as the disk stays full.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::StoreStats;
use crate::error::Error;

/// A reason a store refuses writes: the `reason` label of `hoard_refused_writes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over `storage.max_size`, and eviction cannot make room now (every blob within
    /// `min_retention`, after an unclean start, or eviction still catching up).
    CacheFull,
    /// One write larger than `storage.max_size`: it can never fit.
    TooLarge,
    /// The data dir's disk is full (below the free-space floor, or a write met ENOSPC).
    DiskFull,
    /// The data dir's file system is read-only (a write met EROFS).
    ReadOnly,
    /// The database failed a flush; sled refuses writes until hoard restarts (sled only).
    DatabaseFailed,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::CacheFull,
        Refusal::TooLarge,
        Refusal::DiskFull,
        Refusal::ReadOnly,
        Refusal::DatabaseFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::CacheFull => "cache_full",
            Refusal::TooLarge => "too_large",
            Refusal::DiskFull => "disk_full",
            Refusal::ReadOnly => "read_only",
            Refusal::DatabaseFailed => "database_failed",
        }
    }

    /// The reason behind a refusal of the disk gate (`store/sled/space.rs`), by its error.
    pub(crate) fn of_unwritable(e: &Error) -> Refusal {
        match e {
            Error::StorageUnwritable(_) => Refusal::ReadOnly,
            Error::Unavailable(_) => Refusal::DatabaseFailed,
            _ => Refusal::DiskFull,
        }
    }

    /// This reason's count in `stats`.
    pub fn count_in(self, stats: &StoreStats) -> u64 {
        match self {
            Refusal::CacheFull => stats.refused_cache_full,
            Refusal::TooLarge => stats.refused_too_large,
            Refusal::DiskFull => stats.refused_disk_full,
            Refusal::ReadOnly => stats.refused_read_only,
            Refusal::DatabaseFailed => stats.refused_database_failed,
        }
    }
}

/// Refusals since start, one atomic per reason.
#[derive(Default)]
pub struct RefusedWrites([AtomicU64; Refusal::ALL.len()]);

impl RefusedWrites {
    /// One write refused for `why`.
    pub fn count(&self, why: Refusal) {
        self.0[why as usize].fetch_add(1, Relaxed);
    }

    /// Writes the counts (and their total, `refused_writes`) into `stats`.
    pub fn report(&self, stats: &mut StoreStats) {
        let n = |why: Refusal| self.0[why as usize].load(Relaxed);
        stats.refused_cache_full = n(Refusal::CacheFull);
        stats.refused_too_large = n(Refusal::TooLarge);
        stats.refused_disk_full = n(Refusal::DiskFull);
        stats.refused_read_only = n(Refusal::ReadOnly);
        stats.refused_database_failed = n(Refusal::DatabaseFailed);
        stats.refused_writes = Refusal::ALL.iter().map(|&why| n(why)).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_under_their_reason_and_in_the_total() {
        let refused = RefusedWrites::default();
        refused.count(Refusal::DiskFull);
        refused.count(Refusal::DiskFull);
        refused.count(Refusal::TooLarge);
        let mut stats = StoreStats::default();
        refused.report(&mut stats);
        assert_eq!(stats.refused_writes, 3);
        let by_reason: Vec<u64> = Refusal::ALL.iter().map(|r| r.count_in(&stats)).collect();
        assert_eq!(by_reason, [0, 1, 2, 0, 0]);
    }
}
