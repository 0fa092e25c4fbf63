//! Instance names: the namespaces that partition the action cache, and the policy over them.
//!
//! Every well-formed instance name is served and has its own action cache; CAS content is shared
//! across instances because it is addressed by content. This module owns what "well formed"
//! means, so that a name can never smuggle path tricks or REAPI's reserved words into storage keys
//! or resource names, and [`Policy`]: which namespaces an instance reads (itself, then e.g.
//! `ci/main`) and where its writes go (itself, nowhere, or another namespace), from the
//! `[namespaces]` config.

use crate::config::NamespacesConfig;
use crate::error::{echo, Error, Result};

/// Read chains and write targets per instance name (the `[namespaces]` config).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    config: NamespacesConfig,
}

impl Policy {
    pub fn new(config: &NamespacesConfig) -> Self {
        Policy {
            config: config.clone(),
        }
    }

    /// The namespaces an instance's action-cache lookups try, in order: itself first, then its
    /// rule's `read` list (without repeats).
    pub fn read_chain<'a>(&'a self, instance: &'a str) -> Vec<&'a str> {
        let extra = match self.config.rule(instance).and_then(|r| r.read.as_ref()) {
            Some(read) => read,
            None => &self.config.default.read,
        };
        let mut chain = vec![instance];
        for name in extra {
            if !chain.contains(&name.as_str()) {
                chain.push(name);
            }
        }
        chain
    }

    /// Where an instance's action results are stored; `None` if it is read-only.
    pub fn write_target<'a>(&'a self, instance: &'a str) -> Option<&'a str> {
        let write = match self.config.rule(instance).and_then(|r| r.write.as_ref()) {
            Some(w) => w,
            None => &self.config.default.write,
        };
        match write.as_str() {
            "self" => Some(instance),
            "none" => None,
            other => Some(other),
        }
    }
}

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
    fn branches_read_main_and_write_themselves() {
        let config = crate::config::Config::parse(
            "[[namespaces.rule]]\npattern = \"ci/branches/*\"\nread = [\"ci/main\"]\n\
             [[namespaces.rule]]\npattern = \"ci/release\"\nwrite = \"none\"\n\
             read = [\"ci/main\", \"ci/release\"]\n",
        )
        .unwrap();
        let p = Policy::new(&config.namespaces);
        assert_eq!(p.read_chain("ci/branches/x"), ["ci/branches/x", "ci/main"]);
        assert_eq!(p.write_target("ci/branches/x"), Some("ci/branches/x"));
        assert_eq!(p.read_chain("ci/main"), ["ci/main"]);
        assert_eq!(p.write_target("ci/main"), Some("ci/main"));
        assert_eq!(p.read_chain("ci/release"), ["ci/release", "ci/main"]);
        assert_eq!(p.write_target("ci/release"), None);
        assert!(crate::config::Config::parse(
            "[[namespaces.rule]]\npattern = \"x\"\nread = [\"a/../b\"]\n"
        )
        .is_err());
    }

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
