//! The deliveries' bodies: GitHub's `push` and `delete` events, GitLab's push and tag push
//! events, and the JSON `hoard hook git` sends, each turned into [`RefChange`]s. Only the
//! fields used here are read; the rest of a payload is ignored.

use serde::{Deserialize, Serialize};

use super::{is_null, Delivery, RefChange, RefKind, Source};
use crate::error::{Error, Result};

/// GitHub lists at most this many commits in a push event.
const GITHUB_MAX_COMMITS: usize = 2048;

#[derive(Deserialize, Default)]
struct Commit {
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
}

fn changed_paths(commits: &[Commit]) -> Vec<String> {
    let mut paths: Vec<String> = commits
        .iter()
        .flat_map(|c| c.added.iter().chain(&c.removed).chain(&c.modified))
        .cloned()
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::InvalidArgument(format!("the body is not a {what}: {e}")))
}

#[derive(Deserialize)]
struct GithubRepository {
    #[serde(default)]
    full_name: String,
}

#[derive(Deserialize)]
struct GithubPusher {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct GithubSender {
    #[serde(default)]
    login: String,
}

#[derive(Deserialize)]
struct GithubPush {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    forced: bool,
    #[serde(default)]
    commits: Vec<Commit>,
    repository: Option<GithubRepository>,
    pusher: Option<GithubPusher>,
}

#[derive(Deserialize)]
struct GithubDelete {
    /// The short name, unlike a push's full ref.
    #[serde(rename = "ref")]
    reference: String,
    ref_type: String,
    repository: Option<GithubRepository>,
    sender: Option<GithubSender>,
    /// Only in a `create` event's body, which has a delete's shape otherwise: a signed create
    /// body resent as a `delete` (the event header is not signed) must not prune.
    master_branch: Option<serde_json::Value>,
}

/// A GitHub delivery of `event` (`X-GitHub-Event`); `None` for events no rule is about.
pub fn github(event: &str, id: Option<String>, body: &[u8]) -> Result<Option<Delivery>> {
    let repo = |r: Option<GithubRepository>| r.map(|r| r.full_name).unwrap_or_default();
    match event {
        "push" => {
            let push: GithubPush = parse(body, "GitHub push event")?;
            let Some((kind, name)) = RefChange::of_ref(&push.reference) else {
                return Ok(Some(empty(Source::Github, id)));
            };
            let deleted = push.deleted || is_null(&push.after);
            let paths = if push.forced {
                Err("a forced push")
            } else if push.commits.len() >= GITHUB_MAX_COMMITS {
                Err("GitHub lists at most 2048 commits")
            } else {
                Ok(changed_paths(&push.commits))
            };
            Ok(Some(Delivery {
                source: Source::Github,
                id,
                repository: repo(push.repository),
                pusher: push.pusher.map(|p| p.name).unwrap_or_default(),
                changes: vec![RefChange {
                    kind,
                    name,
                    deleted,
                    before: push.before,
                    after: push.after,
                    paths,
                }],
            }))
        }
        "delete" => {
            let delete: GithubDelete = parse(body, "GitHub delete event")?;
            if delete.master_branch.is_some() {
                return Err(Error::InvalidArgument(
                    "the body is a GitHub create event's (it has master_branch), not a delete's"
                        .into(),
                ));
            }
            let kind = match delete.ref_type.as_str() {
                "branch" => RefKind::Branch,
                "tag" => RefKind::Tag,
                _ => return Ok(Some(empty(Source::Github, id))),
            };
            Ok(Some(Delivery {
                source: Source::Github,
                id,
                repository: repo(delete.repository),
                pusher: delete.sender.map(|s| s.login).unwrap_or_default(),
                changes: vec![RefChange {
                    kind,
                    name: delete.reference,
                    deleted: true,
                    before: String::new(),
                    after: String::new(),
                    paths: Ok(Vec::new()),
                }],
            }))
        }
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct GitlabProject {
    #[serde(default)]
    path_with_namespace: String,
}

#[derive(Deserialize)]
struct GitlabPush {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    user_username: String,
    project: Option<GitlabProject>,
    #[serde(default)]
    commits: Vec<Commit>,
    /// All the push's commits; `commits` holds at most 20 of them.
    total_commits_count: Option<usize>,
}

/// A GitLab delivery of `event` (`X-Gitlab-Event`); `None` for events no rule is about.
pub fn gitlab(event: &str, id: Option<String>, body: &[u8]) -> Result<Option<Delivery>> {
    if event != "Push Hook" && event != "Tag Push Hook" {
        return Ok(None);
    }
    let push: GitlabPush = parse(body, "GitLab push event")?;
    let Some((kind, name)) = RefChange::of_ref(&push.reference) else {
        return Ok(Some(empty(Source::Gitlab, id)));
    };
    let paths = match push.total_commits_count {
        Some(total) if total > push.commits.len() => Err("GitLab lists at most 20 commits"),
        _ => Ok(changed_paths(&push.commits)),
    };
    Ok(Some(Delivery {
        source: Source::Gitlab,
        id,
        repository: push
            .project
            .map(|p| p.path_with_namespace)
            .unwrap_or_default(),
        pusher: push.user_username,
        changes: vec![RefChange {
            kind,
            name,
            deleted: is_null(&push.after),
            before: push.before,
            after: push.after,
            paths,
        }],
    }))
}

/// What `hoard hook git` sends: the `post-receive` hook's ref updates with their changed
/// paths, worked out by git on the server that received the push.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct GitPush {
    /// Unique per run of the hook; a retried post sends the same one.
    pub delivery: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub pusher: String,
    pub updates: Vec<GitUpdate>,
}

/// One `old new ref` line of `post-receive`.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct GitUpdate {
    #[serde(rename = "ref")]
    pub reference: String,
    pub before: String,
    pub after: String,
    /// `None`: the hook could not list them (the rules then assume they match).
    pub paths: Option<Vec<String>>,
}

/// A delivery from `hoard hook git`.
pub fn git(body: &[u8]) -> Result<Delivery> {
    let push: GitPush = parse(body, "hoard hook git delivery")?;
    if push.delivery.is_empty() {
        return Err(Error::InvalidArgument(
            "the delivery has no id (\"delivery\")".into(),
        ));
    }
    let mut changes = Vec::new();
    for u in push.updates {
        let Some((kind, name)) = RefChange::of_ref(&u.reference) else {
            continue;
        };
        let deleted = is_null(&u.after);
        changes.push(RefChange {
            kind,
            name,
            deleted,
            paths: u.paths.ok_or("the hook could not list them"),
            before: u.before,
            after: u.after,
        });
    }
    Ok(Delivery {
        source: Source::Git,
        id: Some(push.delivery),
        repository: push.repository,
        pusher: push.pusher,
        changes,
    })
}

/// A delivery about a ref no rule can name (notes, pull request refs): nothing to do.
fn empty(source: Source, id: Option<String>) -> Delivery {
    Delivery {
        source,
        id,
        repository: String::new(),
        pusher: String::new(),
        changes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_github_push_lists_the_paths_of_its_commits() {
        let body =
            br#"{"ref":"refs/heads/main","before":"a","after":"b","deleted":false,"forced":false,
            "commits":[{"added":["x"],"removed":[],"modified":[".bazelversion"]},{"added":["x"]}],
            "repository":{"full_name":"acme/app"},"pusher":{"name":"alice"}}"#;
        let d = github("push", Some("1".into()), body).unwrap().unwrap();
        assert_eq!(d.repository, "acme/app");
        assert_eq!(d.pusher, "alice");
        assert_eq!(
            d.changes[0].paths,
            Ok(vec![".bazelversion".into(), "x".into()])
        );
        assert!(!d.changes[0].deleted);
        let forced = br#"{"ref":"refs/heads/main","forced":true,"commits":[]}"#;
        let d = github("push", None, forced).unwrap().unwrap();
        assert!(d.changes[0].paths.is_err());
        let gone = format!(
            r#"{{"ref":"refs/heads/x","after":"{}","deleted":true}}"#,
            "0".repeat(64)
        );
        assert!(
            github("push", None, gone.as_bytes())
                .unwrap()
                .unwrap()
                .changes[0]
                .deleted
        );
        assert!(github("pull_request", None, b"{}").unwrap().is_none());
        let created = br#"{"ref":"x","ref_type":"branch","master_branch":"main"}"#;
        assert!(github("delete", None, created).is_err());
        assert!(github("push", None, b"{\"before\":1}").is_err());
    }

    #[test]
    fn a_gitlab_push_with_more_commits_than_listed_has_unknown_paths() {
        let body = br#"{"object_kind":"push","ref":"refs/heads/main","before":"a","after":"b",
            "user_username":"bob","project":{"path_with_namespace":"g/app"},
            "commits":[{"modified":["WORKSPACE"]}],"total_commits_count":25}"#;
        let d = gitlab("Push Hook", None, body).unwrap().unwrap();
        assert_eq!(d.pusher, "bob");
        assert!(d.changes[0].paths.is_err());
        assert!(gitlab("Merge Request Hook", None, body).unwrap().is_none());
    }
}
