//! VCS webhooks (`[hooks]`): pushes and branch deletions from GitHub, GitLab or a plain git
//! server's `post-receive` hook (`hoard hook git`) turned into invalidations and prunes.
//!
//! A forge's delivery is parsed into [`RefChange`]s (`payload.rs`); each `[[hooks.rule]]`
//! that matches a change names a namespace pattern to invalidate or prune, with `{branch}` or
//! `{tag}` filled in. Every action goes through [`Invalidation`], the Admin service's path, so
//! it is serialized, announced on the watch log and durable before the reply; the event's
//! reason names the forge, the ref, the commits, who pushed and the rule. Deliveries are
//! remembered by id in the action store (namespace `hoard.hook-deliveries`), so a replayed or
//! redelivered one is applied once, across restarts and, on a shared bucket, across nodes.
//! The HTTP side (signatures, status codes) is `http.rs`.

mod http;
mod payload;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::auth::{Access, Caller};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::invalidation::{Invalidation, Target};
use crate::namespace::glob_match;
use crate::store::{ActionRecord, ActionStore};

pub use http::HooksLayer;
pub use payload::{GitPush, GitUpdate};

/// The namespace deliveries are remembered under (`instance_name::RESERVED_PREFIX`: no client
/// can name it, so no invalidation or prune reaches it).
pub const DELIVERIES: &str = "hoard.hook-deliveries";
/// A ref that does not exist, as git and the forges write it in a SHA-1 repository: the "before"
/// of a creation, the "after" of a deletion.
pub const ZERO_SHA: &str = "0000000000000000000000000000000000000000";
/// GitHub reports a deleted branch twice, as a `push` with `deleted: true` and as a `delete`
/// event; the second within this many seconds of the first is its twin and is not applied
/// again.
const TWIN_WINDOW_SECS: u64 = 600;

/// Whether a commit id is git's "no commit" (all zeros: 40 in SHA-1 repositories, 64 in
/// SHA-256 ones).
pub fn is_null(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b == b'0')
}

/// Text from a delivery (a pusher, a repository, a ref name) as it goes into reasons and
/// logs: control characters escaped, at most 200 characters.
fn shown(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// `[hooks]`: webhook secrets and the rules that map ref changes to actions.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// The secret of the GitHub webhook (`X-Hub-Signature-256`); without it `/hooks/github`
    /// answers 404.
    pub github_secret_file: Option<PathBuf>,
    /// The secret token of the GitLab webhook (`X-Gitlab-Token`); without it `/hooks/gitlab`
    /// answers 404.
    pub gitlab_token_file: Option<PathBuf>,
    /// `[[hooks.rule]]`, every matching rule applied, in order.
    #[serde(rename = "rule")]
    pub rules: Vec<HookRule>,
}

/// One `[[hooks.rule]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HookRule {
    /// `push` (a ref created or moved) or `delete` (a ref deleted).
    pub on: HookOn,
    /// A pattern (`*` for any run of characters, `/` included) over branch names; with
    /// neither this nor `tags`, every branch.
    pub branches: Option<String>,
    /// A pattern over tag names; the rule then applies to tags instead of branches.
    pub tags: Option<String>,
    /// For `push`: patterns over the changed files' paths; the rule applies only if one
    /// matches. Empty: every push.
    #[serde(default)]
    pub paths: Vec<String>,
    /// A namespace pattern to invalidate (`{branch}` or `{tag}` filled in).
    pub invalidate: Option<String>,
    /// A namespace pattern to drop (protected namespaces excepted).
    pub prune: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HookOn {
    Push,
    Delete,
}

impl HookRule {
    fn ref_kind(&self) -> RefKind {
        match self.tags {
            Some(_) => RefKind::Tag,
            None => RefKind::Branch,
        }
    }

    fn ref_pattern(&self) -> &str {
        self.tags
            .as_deref()
            .or(self.branches.as_deref())
            .unwrap_or("*")
    }

    /// The action and its namespace pattern, as written.
    fn action(&self) -> (Action, &str) {
        match (&self.invalidate, &self.prune) {
            (Some(p), _) => (Action::Invalidate, p),
            (None, Some(p)) => (Action::Prune, p),
            // `check` refuses a rule with neither.
            (None, None) => (Action::Invalidate, ""),
        }
    }

    fn check(&self, n: usize) -> std::result::Result<(), String> {
        let at = format!("hooks.rule {n}");
        if self.branches.is_some() && self.tags.is_some() {
            return Err(format!("{at}: set branches or tags, not both"));
        }
        if self.invalidate.is_some() == self.prune.is_some() {
            return Err(format!(
                "{at}: set exactly one of invalidate and prune (a namespace pattern)"
            ));
        }
        if self.on == HookOn::Delete && !self.paths.is_empty() {
            return Err(format!(
                "{at}: paths apply to pushes only (a deleted ref changes no files)"
            ));
        }
        let refs = self.ref_pattern();
        if refs.is_empty() || refs.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{at}: {:?} is not a pattern over ref names",
                self.ref_pattern()
            ));
        }
        for p in &self.paths {
            if p.is_empty() {
                return Err(format!("{at}: an empty pattern in paths matches nothing"));
            }
        }
        let (_, target) = self.action();
        let placeholder = self.ref_kind().placeholder();
        let other = match self.ref_kind() {
            RefKind::Branch => RefKind::Tag.placeholder(),
            RefKind::Tag => RefKind::Branch.placeholder(),
        };
        if target.contains(other) {
            return Err(format!(
                "{at}: {other} in {target:?}, but the rule is over {}; use {placeholder}",
                self.ref_kind().plural()
            ));
        }
        let sample = target.replace(placeholder, "x");
        if sample.contains(['{', '}']) {
            return Err(format!(
                "{at}: {target:?} has a placeholder other than {placeholder}"
            ));
        }
        crate::instance_name::validate_pattern(&sample)
            .map_err(|e| format!("{at}: {target:?}: {e}"))?;
        if sample.is_empty() {
            return Err(format!("{at}: the namespace pattern is empty"));
        }
        Ok(())
    }
}

impl HooksConfig {
    pub fn check(&self) -> std::result::Result<(), String> {
        for (i, rule) in self.rules.iter().enumerate() {
            rule.check(i + 1)?;
        }
        Ok(())
    }

    /// Whether any endpoint can be used (a forge's secret, or rules for `hoard hook git`).
    pub fn enabled(&self) -> bool {
        self.github_secret_file.is_some()
            || self.gitlab_token_file.is_some()
            || !self.rules.is_empty()
    }
}

/// Reads a secret file: its contents without the trailing newline, never empty.
pub fn read_secret(path: &std::path::Path, what: &str) -> std::result::Result<Vec<u8>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{what} {}: cannot read it: {e}", path.display()))?;
    let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    if text.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(text.to_vec())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    Branch,
    Tag,
}

impl RefKind {
    fn placeholder(self) -> &'static str {
        match self {
            RefKind::Branch => "{branch}",
            RefKind::Tag => "{tag}",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            RefKind::Branch => "branches",
            RefKind::Tag => "tags",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            RefKind::Branch => "branch",
            RefKind::Tag => "tag",
        }
    }
}

/// One ref a delivery reports as created, moved or deleted.
#[derive(Clone, Debug, PartialEq)]
pub struct RefChange {
    pub kind: RefKind,
    /// The short name (`main`, `feature/x`, `v1.2`).
    pub name: String,
    pub deleted: bool,
    /// Commit ids, where the sender gave them ("" when not).
    pub before: String,
    pub after: String,
    /// The paths the push changed, or why they are not known in full (a truncated commit
    /// list, a forced push); unknown paths match every `paths` rule, so a toolchain change is
    /// never missed.
    pub paths: std::result::Result<Vec<String>, &'static str>,
}

impl RefChange {
    /// From a full ref name; `None` for refs that are neither branches nor tags.
    pub fn of_ref(full: &str) -> Option<(RefKind, String)> {
        if let Some(b) = full.strip_prefix("refs/heads/") {
            Some((RefKind::Branch, b.to_string()))
        } else {
            full.strip_prefix("refs/tags/")
                .map(|t| (RefKind::Tag, t.to_string()))
        }
    }

    fn commits(&self) -> String {
        let short = |s: &str| s.chars().take(8).collect::<String>();
        let (before, after) = (self.before.as_str(), self.after.as_str());
        let absent = |id: &str| id.is_empty() || is_null(id);
        match (absent(before), absent(after)) {
            (true, true) => String::new(),
            (false, true) => format!(" (was {})", short(before)),
            (true, false) => format!(" at {}", short(after)),
            (false, false) => format!(" {}..{}", short(before), short(after)),
        }
    }
}

/// Where a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Github,
    Gitlab,
    Git,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Github => "github",
            Source::Gitlab => "gitlab",
            Source::Git => "git",
        }
    }
}

/// A delivery, parsed: what changed, where and by whom.
#[derive(Debug)]
pub struct Delivery {
    pub source: Source,
    /// The sender's delivery id (replays of one id are applied once); `None`: not remembered.
    pub id: Option<String>,
    pub repository: String,
    pub pusher: String,
    pub changes: Vec<RefChange>,
}

/// Webhook bodies read at the same time; more wait for a turn.
const BODIES_AT_ONCE: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Invalidate,
    Prune,
}

/// One rule applied to one ref change, before it is carried out.
struct Planned {
    rule: usize,
    action: Action,
    pattern: String,
    reason: String,
}

/// The webhooks' state: secrets, rules, and the paths into the store.
pub struct Hooks {
    rules: Vec<HookRule>,
    github_secret: Option<Vec<u8>>,
    /// SHA-256 of GitLab's token, compared in constant time.
    gitlab_token: Option<[u8; 32]>,
    protected: Vec<String>,
    invalidation: Arc<Invalidation>,
    deliveries: Arc<dyn ActionStore>,
    auth: Arc<crate::auth::Authenticator>,
    /// One delivery at a time: a replay racing its original is seen as a replay.
    serial: tokio::sync::Mutex<()>,
    /// Bodies being read at once (each up to 25 MiB), so a flood cannot fill memory.
    bodies: tokio::sync::Semaphore,
}

impl Hooks {
    /// From `[hooks]`; reads the secret files (an unreadable or empty one stops the start).
    pub fn new(
        config: &HooksConfig,
        protected: Vec<String>,
        invalidation: Arc<Invalidation>,
        deliveries: Arc<dyn ActionStore>,
        auth: Arc<crate::auth::Authenticator>,
    ) -> Result<Self> {
        let github_secret = match &config.github_secret_file {
            Some(p) => {
                Some(read_secret(p, "hooks.github_secret_file").map_err(Error::InvalidArgument)?)
            }
            None => None,
        };
        let gitlab_token = match &config.gitlab_token_file {
            Some(p) => {
                let token =
                    read_secret(p, "hooks.gitlab_token_file").map_err(Error::InvalidArgument)?;
                Some(Sha256::digest(&token).into())
            }
            None => None,
        };
        Ok(Hooks {
            rules: config.rules.clone(),
            github_secret,
            gitlab_token,
            protected,
            invalidation,
            deliveries,
            auth,
            serial: tokio::sync::Mutex::new(()),
            bodies: tokio::sync::Semaphore::new(BODIES_AT_ONCE),
        })
    }

    /// The rules each change matches, with the reasons their events will carry.
    fn plan(&self, delivery: &Delivery) -> Vec<Planned> {
        let mut planned = Vec::new();
        for change in &delivery.changes {
            for (i, rule) in self.rules.iter().enumerate() {
                let on = if change.deleted {
                    HookOn::Delete
                } else {
                    HookOn::Push
                };
                if rule.on != on
                    || rule.ref_kind() != change.kind
                    || !glob_match(rule.ref_pattern(), &change.name)
                {
                    continue;
                }
                let why_paths = match (&change.paths, rule.paths.is_empty()) {
                    (_, true) => String::new(),
                    (Err(unknown), false) => {
                        format!(", changed paths not known in full ({unknown}): assumed to match")
                    }
                    (Ok(paths), false) => {
                        let hits: Vec<&str> = paths
                            .iter()
                            .filter(|p| rule.paths.iter().any(|pat| glob_match(pat, p)))
                            .map(String::as_str)
                            .collect();
                        if hits.is_empty() {
                            continue;
                        }
                        let mut shown = hits.iter().take(3).copied().collect::<Vec<_>>().join(", ");
                        if hits.len() > 3 {
                            shown.push_str(&format!(" and {} more", hits.len() - 3));
                        }
                        format!(", changed {shown}")
                    }
                };
                let (action, written) = rule.action();
                let pattern = written.replace(change.kind.placeholder(), &change.name);
                let verb = if change.deleted { "deleted" } else { "pushed" };
                let by = match delivery.pusher.as_str() {
                    "" => String::new(),
                    who => format!(" by {}", shown(who)),
                };
                let repo = match delivery.repository.as_str() {
                    "" => String::new(),
                    r => format!(" in {}", shown(r)),
                };
                let reason = format!(
                    "{} {verb} {} {}{}{repo}{by}{why_paths}: hooks.rule {} ({} {:?})",
                    delivery.source.name(),
                    change.kind.noun(),
                    shown(&change.name),
                    change.commits(),
                    i + 1,
                    match action {
                        Action::Invalidate => "invalidate",
                        Action::Prune => "prune",
                    },
                    written,
                );
                planned.push(Planned {
                    rule: i + 1,
                    action,
                    pattern,
                    reason,
                });
            }
        }
        planned
    }

    /// The key of a record in [`DELIVERIES`]: what it is about, hashed.
    fn key(parts: &[&str]) -> Digest {
        let mut hash = Sha256::new();
        for p in parts {
            hash.update(p.as_bytes());
            hash.update([0]);
        }
        Digest {
            hash: hash.finalize().into(),
            size: 0,
        }
    }

    /// Waits for a turn to read a webhook body.
    pub async fn body_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.bodies.acquire().await.ok()
    }

    /// The server's `[auth]`, which `/hooks/git` deliveries authenticate against.
    pub fn auth(&self) -> &crate::auth::Authenticator {
        &self.auth
    }

    /// Applies what `delivery`'s changes match, on behalf of `caller` (whose grants must cover
    /// every action for `hoard hook git`; a forge's secret is the server's own rules' say-so).
    ///
    /// A delivery is remembered by its id and by its body's hash once it has acted: the same
    /// id again, or the same signed body under another id (a captured delivery replayed), is
    /// answered from the record and changes nothing.
    pub async fn apply(
        &self,
        mut delivery: Delivery,
        body: &[u8],
        caller: &Caller,
        peer: &str,
    ) -> Result<serde_json::Value> {
        let _serial = self.serial.lock().await;
        let source = delivery.source.name();
        let body_hash = hex::encode(Sha256::digest(body));
        let mut keys = vec![Self::key(&[source, "body", &body_hash])];
        if let Some(id) = &delivery.id {
            keys.push(Self::key(&[source, "id", id]));
        }
        for key in &keys {
            if let Some(seen) = self.deliveries.get(DELIVERIES, key).await? {
                let mut earlier: serde_json::Value =
                    serde_json::from_slice(&seen.result).unwrap_or(serde_json::Value::Null);
                tracing::info!(
                    source,
                    delivery = shown(delivery.id.as_deref().unwrap_or("")),
                    peer,
                    "webhook delivery replayed: applied already, nothing done"
                );
                if let Some(map) = earlier.as_object_mut() {
                    map.insert("replayed".into(), true.into());
                }
                return Ok(earlier);
            }
        }
        // GitHub's second report of a deletion (push `deleted: true`, then `delete`, or the
        // other way round) is dropped here.
        let now = self.invalidation.clock();
        let mut twins = Vec::new();
        let mut twin_keys = Vec::new();
        if delivery.source == Source::Github {
            let mut kept = Vec::new();
            for change in std::mem::take(&mut delivery.changes) {
                if change.deleted {
                    let kind = change.kind.noun();
                    let key =
                        Self::key(&[source, "deleted", &delivery.repository, kind, &change.name]);
                    if let Some(r) = self.deliveries.get(DELIVERIES, &key).await? {
                        if now.saturating_sub(u64::from(r.last_used)) < TWIN_WINDOW_SECS {
                            twins.push(change.name);
                            continue;
                        }
                    }
                    twin_keys.push(key);
                }
                kept.push(change);
            }
            delivery.changes = kept;
        }
        let planned = self.plan(&delivery);
        // Every action checked before any is done: a refused delivery changes nothing.
        if delivery.source == Source::Git {
            for p in &planned {
                caller.require_all(Access::Admin, &p.pattern)?;
            }
        }
        let caller_name = match delivery.source {
            Source::Git => caller.name().to_string(),
            forge => forge.name().to_string(),
        };
        let mut applied = Vec::new();
        for p in &planned {
            let namespaces: Vec<serde_json::Value> = match p.action {
                Action::Invalidate => self
                    .invalidation
                    .invalidate(Target::Pattern(&p.pattern), &p.reason, &caller_name, peer)
                    .await?
                    .into_iter()
                    .map(|ns| serde_json::json!({"name": ns.name, "epoch": ns.epoch}))
                    .collect(),
                Action::Prune => self
                    .invalidation
                    .prune_except(&p.pattern, &p.reason, &caller_name, peer, &self.protected)
                    .await?
                    .into_iter()
                    .map(|ns| serde_json::json!({"name": ns.name, "removed": ns.removed}))
                    .collect(),
            };
            applied.push(serde_json::json!({
                "rule": p.rule,
                "action": match p.action { Action::Invalidate => "invalidate", Action::Prune => "prune" },
                "pattern": p.pattern,
                "reason": p.reason,
                "namespaces": namespaces,
            }));
        }
        let mut summary = serde_json::json!({
            "delivery": delivery.id,
            "replayed": false,
            "refs": delivery.changes.len(),
            "applied": applied,
        });
        if !twins.is_empty() {
            summary["twins"] = serde_json::json!(twins);
        }
        tracing::info!(
            source,
            delivery = shown(delivery.id.as_deref().unwrap_or("")),
            refs = delivery.changes.len(),
            actions = planned.len(),
            caller = caller_name,
            peer,
            "webhook delivery applied"
        );
        // A delivery that did nothing is not remembered: its replay does nothing either.
        if !planned.is_empty() {
            let record = ActionRecord {
                last_used: now as u32,
                epoch: 0,
                result: serde_json::to_vec(&summary)
                    .map_err(|e| Error::internal("encoding a delivery's summary", e))?
                    .into(),
            };
            for key in keys.iter().chain(&twin_keys) {
                self.deliveries.put(DELIVERIES, key, record.clone()).await?;
            }
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> std::result::Result<HooksConfig, String> {
        let c: HooksConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn rules_are_checked() {
        assert!(rules(
            "[[rule]]\non = \"push\"\nbranches = \"main\"\npaths = [\".bazelversion\"]\ninvalidate = \"ci/**\"\n\
             [[rule]]\non = \"delete\"\nprune = \"ci/branches/{branch}\"\n\
             [[rule]]\non = \"push\"\ntags = \"v*\"\ninvalidate = \"release/{tag}\"\n"
        )
        .is_ok());
        for (bad, says) in [
            ("on = \"push\"\n", "exactly one of invalidate and prune"),
            (
                "on = \"push\"\ninvalidate = \"a\"\nprune = \"b\"\n",
                "exactly one",
            ),
            (
                "on = \"delete\"\npaths = [\"x\"]\nprune = \"b\"\n",
                "paths apply to pushes only",
            ),
            (
                "on = \"push\"\nbranches = \"a\"\ntags = \"b\"\ninvalidate = \"x\"\n",
                "not both",
            ),
            ("on = \"push\"\ninvalidate = \"ci/{tag}\"\n", "use {branch}"),
            (
                "on = \"push\"\ninvalidate = \"ci/{sha}\"\n",
                "placeholder other than",
            ),
            ("on = \"push\"\ninvalidate = \"ci//x\"\n", "hooks.rule 1"),
            (
                "on = \"push\"\nbranches = \"a b\"\ninvalidate = \"x\"\n",
                "not a pattern",
            ),
        ] {
            let err = rules(&format!("[[rule]]\n{bad}")).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        assert!(rules("[[rule]]\non = \"merge\"\ninvalidate = \"x\"\n").is_err());
    }

    #[test]
    fn refs_are_branches_or_tags() {
        assert_eq!(
            RefChange::of_ref("refs/heads/feature/x"),
            Some((RefKind::Branch, "feature/x".into()))
        );
        assert_eq!(
            RefChange::of_ref("refs/tags/v1"),
            Some((RefKind::Tag, "v1".into()))
        );
        assert_eq!(RefChange::of_ref("refs/notes/commits"), None);
    }
}
