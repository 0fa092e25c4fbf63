//! Instance names as requests carry them: which are well formed. A name can never smuggle path
//! tricks or REAPI's reserved words into storage keys or resource names. (What a namespace
//! reads, writes and keeps is policy: `namespace.rs`.)

use crate::error::{echo, Error, Result};

/// Longest instance name accepted, in bytes.
pub const MAX_INSTANCE_NAME_LEN: usize = 256;

/// Path segments REAPI reserves in resource names; an instance name may not contain them.
pub const RESERVED_SEGMENTS: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Checks an instance name from a request. The empty name is the default instance.
pub fn validate(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > MAX_INSTANCE_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "instance name is {} bytes long; at most {MAX_INSTANCE_NAME_LEN} are allowed",
            name.len()
        )));
    }
    for segment in name.split('/') {
        let bad = if segment.is_empty() {
            Some("an empty path segment")
        } else if segment == "." || segment == ".." {
            Some("a '.' or '..' segment")
        } else if RESERVED_SEGMENTS.contains(&segment) {
            Some("a segment reserved by REAPI")
        } else if segment.chars().any(|c| c.is_control() || c.is_whitespace()) {
            Some("whitespace or control characters")
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(Error::InvalidArgument(format!(
                "instance name {} is invalid: it contains {why} ({})",
                echo(name),
                echo(segment)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["", "main", "ci/main", "ci/branches/feature-x", "a_b.c"] {
            assert!(validate(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_tricks() {
        for n in [
            "/main", "main/", "a//b", "../x", "a/./b", "x/blobs", "uploads", "a b", "a\0b",
        ] {
            assert!(validate(n).is_err(), "{n:?}");
        }
        assert!(validate(&"x".repeat(MAX_INSTANCE_NAME_LEN + 1)).is_err());
    }
}
