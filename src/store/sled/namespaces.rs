//! Namespace records in tree `namespaces`: `name` → epoch (u64 BE) ‖ last use (u32 BE) ‖
//! invalidated at (u64 BE) ‖ reason (UTF-8). What they mean is `crate::namespace`'s business;
//! this file only keeps them.

use crate::error::Result;
use crate::store::NamespaceInfo;

fn encode(r: &NamespaceInfo) -> Vec<u8> {
    let reason = r.reason.as_deref().unwrap_or("");
    let mut v = Vec::with_capacity(20 + reason.len());
    v.extend_from_slice(&r.epoch.to_be_bytes());
    v.extend_from_slice(&(r.last_used.min(u32::MAX as u64) as u32).to_be_bytes());
    v.extend_from_slice(&r.invalidated_at.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(reason.as_bytes());
    v
}

fn decode(name: &[u8], v: &[u8]) -> Option<NamespaceInfo> {
    let invalidated_at = u64::from_be_bytes(v.get(12..20)?.try_into().ok()?);
    let reason = String::from_utf8_lossy(v.get(20..)?).into_owned();
    Some(NamespaceInfo {
        name: String::from_utf8_lossy(name).into_owned(),
        epoch: u64::from_be_bytes(v.get(0..8)?.try_into().ok()?),
        last_used: u32::from_be_bytes(v.get(8..12)?.try_into().ok()?) as u64,
        invalidated_at: (invalidated_at > 0).then_some(invalidated_at),
        reason: (!reason.is_empty()).then_some(reason),
    })
}

/// Every record in the tree (unreadable ones are skipped).
pub(super) fn load(tree: &sled::Tree) -> Result<Vec<NamespaceInfo>> {
    let mut out = Vec::new();
    for entry in tree.iter() {
        let (k, v) = entry?;
        out.extend(decode(&k, &v));
    }
    Ok(out)
}

/// Writes records (one insert each: sled's batches stall every other writer).
pub(super) fn save(tree: &sled::Tree, records: &[NamespaceInfo]) -> Result<()> {
    for r in records {
        tree.insert(r.name.as_bytes(), encode(r))?;
    }
    Ok(())
}

pub(super) fn remove(tree: &sled::Tree, name: &str) -> Result<()> {
    tree.remove(name.as_bytes())?;
    Ok(())
}
