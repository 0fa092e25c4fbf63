//! Who is calling, and what they may do: tokens, client certificates and grants (`[auth]`).
//!
//! [`Authenticator`] turns a request's `authorization` header (or its mTLS certificate) into a
//! [`Caller`]; the authentication layer (`layers.rs`) does that once per call and leaves the
//! caller in the request's extensions. Services then ask the caller for the access each
//! namespace needs ([`Caller::require`]) once they know the instance name, which is inside the
//! message, not the headers.
//!
//! A grant is `access:pattern`: `read`, `write` (implies read) or `admin` (implies write, and
//! adds invalidation, prune, gc, verify and stats) over the namespaces `pattern` matches (the
//! `*` patterns of `[namespaces]`, see [`glob_match`]). The config holds only `sha256:<hex>` of
//! each token.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::connections::Peer;
use crate::error::{Error, Result};
use crate::metrics::AuthFailure;
use crate::namespace::glob_match;
use crate::throttle::Throttle;

/// The name provenance and logs give a caller without credentials.
pub const ANONYMOUS: &str = "anonymous";

/// How certificate callers are named (`cert:ci-runner`), so no certificate can pose as a
/// token or as `anonymous` in provenance and logs.
pub const CERT_PREFIX: &str = "cert:";

/// The pattern that matches every namespace, the default one (`""`) included.
const EVERYTHING: &str = "*";

/// How much a caller may do within the namespaces a grant covers; each level includes those
/// below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Nothing (only `auth.anonymous` can say this).
    None,
    /// Read blobs and action results, capabilities, watch.
    Read,
    /// Also upload blobs and action results.
    Write,
    /// Also invalidate, prune, gc, verify and stats.
    Admin,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::Read => "read",
            Access::Write => "write",
            Access::Admin => "admin",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `access:pattern`, as written in `grants = [...]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Grant {
    pub access: Access,
    pub pattern: String,
}

impl FromStr for Grant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((access, pattern)) = s.split_once(':') else {
            return Err(format!(
                "grant {s:?} is not access:pattern (e.g. \"read:**\" or \"write:ci/**\")"
            ));
        };
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            "admin" => Access::Admin,
            other => {
                return Err(format!(
                    "grant {s:?}: access {other:?} is not read, write or admin"
                ))
            }
        };
        if pattern.is_empty() {
            return Err(format!(
                "grant {s:?} has an empty pattern; \"**\" grants every namespace"
            ));
        }
        // A pattern no valid name can match (a look-alike character, `a//b`) would be a grant
        // that silently grants nothing.
        crate::instance_name::validate_pattern(pattern).map_err(|e| format!("grant {s:?}: {e}"))?;
        Ok(Grant {
            access,
            pattern: pattern.to_string(),
        })
    }
}

impl TryFrom<String> for Grant {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.access, self.pattern)
    }
}

/// Whether every name `pattern` matches is matched by `grant` as well (both `*` patterns).
///
/// Sound, not complete: it answers yes only when each `*` of `pattern` falls inside a `*` of
/// `grant` and every literal character lines up, which is how grants and pattern invalidations
/// are written in practice (`ci/*` covers `ci/pr-*`; `ci/pr-*` does not cover `ci/*`).
pub fn covers(grant: &str, pattern: &str) -> bool {
    let g: Vec<char> = grant.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // next[j] / row[j]: grant[i+1..] / grant[i..] can produce pattern[j..]. A grant `*`
    // absorbs any run of pattern tokens (stars included); a grant literal matches only the
    // same pattern literal. Two rows: memory is linear in the pattern.
    let mut next = vec![false; p.len() + 1];
    next[p.len()] = true;
    let mut row = vec![false; p.len() + 1];
    for &gc in g.iter().rev() {
        for j in (0..=p.len()).rev() {
            row[j] = if gc == '*' {
                next[j] || (j < p.len() && row[j + 1])
            } else {
                j < p.len() && p[j] != '*' && p[j] == gc && next[j + 1]
            };
        }
        std::mem::swap(&mut next, &mut row);
    }
    next[0]
}

/// A request's namespace pattern where the empty one means every namespace (Watch,
/// PruneNamespaces).
pub fn pattern_or_everything(pattern: &str) -> &str {
    if pattern.is_empty() {
        EVERYTHING
    } else {
        pattern
    }
}

/// The credentials one `authorization` header carries.
#[derive(PartialEq, Eq)]
pub enum Credentials {
    /// `Bearer <token>`.
    Bearer(String),
    /// `Basic base64(user:token)`: the token is the password; the user is only logged.
    Basic { user: String, token: String },
}

// Never the token in debug output.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Bearer(_) => f.write_str("Bearer(…)"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user:?}, …)"),
        }
    }
}

impl Credentials {
    fn token(&self) -> &str {
        match self {
            Credentials::Bearer(t) => t,
            Credentials::Basic { token, .. } => token,
        }
    }
}

/// Parses an `authorization` header value. The scheme is case-insensitive (RFC 9110); the
/// error says what was wrong without echoing the secret.
pub fn parse_authorization(value: &[u8]) -> Result<Credentials, String> {
    let value = std::str::from_utf8(value)
        .map_err(|_| "the authorization header is not valid UTF-8".to_string())?
        .trim();
    let (scheme, rest) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err("the authorization header says Bearer but carries no token".into());
        }
        if rest.contains(char::is_whitespace) {
            return Err("the bearer token contains whitespace".into());
        }
        Ok(Credentials::Bearer(rest.to_string()))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| "the Basic credentials are not valid base64".to_string())?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| "the Basic credentials are not valid UTF-8".to_string())?;
        let Some((user, token)) = decoded.split_once(':') else {
            return Err("the Basic credentials are not user:token".into());
        };
        if token.is_empty() {
            return Err("the Basic credentials carry an empty token".into());
        }
        Ok(Credentials::Basic {
            user: user.to_string(),
            token: token.to_string(),
        })
    } else {
        // Never echoed: a client that sends its bare token has it where the scheme should be.
        Err(
            "unknown authorization scheme (or a token without one): use \"Bearer <token>\" \
             (or Basic user:token)"
                .into(),
        )
    }
}

/// `sha256:<hex>` of a token, the form the config stores.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// A fresh random 256-bit token from the OS's generator, URL-safe base64 without padding
/// (43 characters, safe in headers and shells).
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::internal("reading random bytes", e))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// `[auth]`: what callers without credentials get, and who else may do what.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// What a caller without credentials may do, over every namespace. Default `none`.
    #[serde(default = "no_access")]
    pub anonymous: Access,
    /// `[[auth.token]]`: bearer tokens by the SHA-256 of their value.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// `[[auth.client_cert]]`: mTLS client certificates by subject common name.
    #[serde(default, rename = "client_cert")]
    pub client_certs: Vec<ClientCertConfig>,
}

fn no_access() -> Access {
    Access::None
}

/// One `[[auth.token]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs, provenance and events; never the token itself.
    pub name: String,
    /// `sha256:<64 hex digits>` of the token (`hoard token hash`).
    pub hash: String,
    pub grants: Vec<Grant>,
}

/// One `[[auth.client_cert]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// The certificate subject's common name (CN).
    pub subject: String,
    pub grants: Vec<Grant>,
}

impl AuthConfig {
    /// Rejects names and hashes that would make callers ambiguous.
    pub fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for t in &self.tokens {
            // Names are shown in logs and provenance: plain ASCII, so none can look like another
            // (or like a certificate's `cert:` name, or `anonymous`).
            let plain = |c: char| c != '/' && crate::instance_name::is_safe_char(c);
            if t.name.is_empty()
                || t.name.eq_ignore_ascii_case(ANONYMOUS)
                || !t.name.chars().all(plain)
            {
                return Err(format!(
                    "auth.token name {:?} must be ASCII letters, digits and - _ . + = @ ~ , (and \
                     not \"anonymous\")",
                    t.name
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(format!("auth.token name {:?} appears twice", t.name));
            }
            parse_hash(&t.hash).map_err(|e| format!("auth.token {:?}: {e}", t.name))?;
        }
        let mut hashes = std::collections::HashSet::new();
        for t in &self.tokens {
            if !hashes.insert(t.hash.to_ascii_lowercase()) {
                return Err(format!(
                    "auth.token {:?} has the same hash as another token",
                    t.name
                ));
            }
        }
        let mut subjects = std::collections::HashSet::new();
        for c in &self.client_certs {
            if c.subject.is_empty()
                || c.subject.chars().any(char::is_control)
                || !subjects.insert(c.subject.as_str())
            {
                return Err(format!(
                    "auth.client_cert subject {:?} is empty, has control characters or \
                     appears twice",
                    c.subject
                ));
            }
        }
        Ok(())
    }
}

/// `sha256:<hex>` → the 32 bytes.
fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let hex_part = text
        .strip_prefix("sha256:")
        .ok_or_else(|| "hash must start with \"sha256:\" (see `hoard token hash`)".to_string())?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| "hash must be sha256: and 64 hex digits".to_string())?;
    Ok(out)
}

/// Who a call comes from, and their grants; the authentication layer puts one in every
/// request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    inner: Arc<CallerInner>,
    /// Where the call came from, for the log line of a refusal.
    peer: Option<SocketAddr>,
}

#[derive(Debug)]
struct CallerInner {
    name: String,
    grants: Vec<Grant>,
}

impl Caller {
    fn new(name: impl Into<String>, grants: Vec<Grant>) -> Self {
        Caller {
            inner: Arc::new(CallerInner {
                name: name.into(),
                grants,
            }),
            peer: None,
        }
    }

    /// The same caller, calling from `peer` (the authentication layer sets it per call).
    pub fn from_peer(mut self, peer: Option<SocketAddr>) -> Self {
        self.peer = peer;
        self
    }

    /// The caller with every right: what every call is when there is no `[auth]` section.
    pub fn unrestricted() -> Self {
        Caller::new(ANONYMOUS, vec![everything(Access::Admin)])
    }

    /// The token name, certificate subject or `anonymous`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The caller of a request, as the authentication layer left it. A request that did not
    /// pass the layer (no route should) gets a caller with no grants: closed, not open.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller::new("unauthenticated", Vec::new()))
    }

    /// Whether the caller has `access` on `namespace`.
    pub fn may(&self, access: Access, namespace: &str) -> bool {
        self.inner
            .grants
            .iter()
            .any(|g| g.access >= access && glob_match(&g.pattern, namespace))
    }

    /// Whether the caller has `access` on every namespace `pattern` matches.
    pub fn may_all(&self, access: Access, pattern: &str) -> bool {
        self.inner
            .grants
            .iter()
            .any(|g| g.access >= access && covers(&g.pattern, pattern))
    }

    /// [`Caller::may`], or PERMISSION_DENIED naming the namespace and the access lacking.
    pub fn require(&self, access: Access, namespace: &str) -> Result<()> {
        if self.may(access, namespace) {
            return Ok(());
        }
        Err(self.deny(format!(
            "{} may not {} namespace {}: no {access} grant covers it",
            self.describe(),
            verb(access),
            crate::error::echo(namespace)
        )))
    }

    /// [`Caller::require`] for a call through `instance` that acts on `namespace` (an upload
    /// needs write where the instance's results go): the refusal names both when they differ.
    pub fn require_through(&self, access: Access, namespace: &str, instance: &str) -> Result<()> {
        if namespace == instance || self.may(access, namespace) {
            return self.require(access, namespace);
        }
        Err(self.deny(format!(
            "{} may not {} namespace {}, where instance {} stores its results: no {access} \
             grant covers it",
            self.describe(),
            verb(access),
            crate::error::echo(namespace),
            crate::error::echo(instance)
        )))
    }

    /// [`Caller::may_all`], or PERMISSION_DENIED naming the pattern.
    pub fn require_all(&self, access: Access, pattern: &str) -> Result<()> {
        if self.may_all(access, pattern) {
            return Ok(());
        }
        let what = if pattern == EVERYTHING {
            "every namespace".to_string()
        } else {
            format!("every namespace matching {}", crate::error::echo(pattern))
        };
        Err(self.deny(format!(
            "{} may not {} {what}: this needs {access} over all of it",
            self.describe(),
            verb(access)
        )))
    }

    /// PERMISSION_DENIED, logged with the caller's name and address (rate-limited), so a
    /// token probing namespaces it has no grant for leaves a trace.
    fn deny(&self, message: String) -> Error {
        if let Some(suppressed) = DENIED.allow() {
            let peer = self
                .peer
                .map_or_else(|| "unknown".to_string(), |a| a.to_string());
            tracing::warn!(caller = %self.inner.name, %peer, suppressed, "permission denied: {message}");
        }
        Error::PermissionDenied(message)
    }

    /// Admin over every namespace: what store-wide calls (stats, gc, verify, prune) need.
    pub fn require_admin_everywhere(&self) -> Result<()> {
        self.require_all(Access::Admin, EVERYTHING)
    }

    fn describe(&self) -> String {
        if self.inner.name == ANONYMOUS {
            "an anonymous caller".to_string()
        } else {
            format!("caller {:?}", self.inner.name)
        }
    }
}

fn verb(access: Access) -> &'static str {
    match access {
        Access::None | Access::Read => "read",
        Access::Write => "write to",
        Access::Admin => "administer",
    }
}

fn everything(access: Access) -> Grant {
    Grant {
        access,
        pattern: EVERYTHING.to_string(),
    }
}

/// Log lines of refusals, each kind at most one a second.
static UNAUTHENTICATED: Throttle = Throttle::new();
static DENIED: Throttle = Throttle::new();

/// Turns credentials into callers; built once from `[auth]`.
pub struct Authenticator {
    /// `None`: no `[auth]` section, every call is unrestricted.
    config: Option<Known>,
}

struct Known {
    anonymous: Option<Caller>,
    tokens: Vec<([u8; 32], Caller)>,
    certs: std::collections::HashMap<String, Caller>,
}

impl Authenticator {
    /// From the `[auth]` section; `None` leaves everything open, as before auth existed.
    pub fn new(config: Option<&AuthConfig>) -> Result<Self> {
        let config = match config {
            None => None,
            Some(c) => {
                c.check().map_err(Error::InvalidArgument)?;
                let mut tokens = Vec::with_capacity(c.tokens.len());
                for t in &c.tokens {
                    let hash = parse_hash(&t.hash).map_err(Error::InvalidArgument)?;
                    tokens.push((hash, Caller::new(&t.name, t.grants.clone())));
                }
                let certs = c
                    .client_certs
                    .iter()
                    .map(|cc| {
                        (
                            cc.subject.clone(),
                            Caller::new(cert_name(&cc.subject), cc.grants.clone()),
                        )
                    })
                    .collect();
                let anonymous = match c.anonymous {
                    Access::None => None,
                    level => Some(Caller::new(ANONYMOUS, vec![everything(level)])),
                };
                Some(Known {
                    anonymous,
                    tokens,
                    certs,
                })
            }
        };
        Ok(Authenticator { config })
    }

    /// Whether an `[auth]` section is in force.
    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// The caller behind `authorization` (if sent) and the connection's peer: a token decides
    /// if one is sent; otherwise a client certificate the TLS handshake verified; otherwise the
    /// anonymous grants. UNAUTHENTICATED for wrong credentials, and for none when anonymous
    /// access is `none`.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<&Peer>,
    ) -> Result<Caller> {
        self.check(authorization, peer).map_err(|(_, e)| e)
    }

    /// [`Self::authenticate`], with why a refusal happened (for `hoard_auth_failures_total`).
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<&Peer>,
    ) -> std::result::Result<Caller, (AuthFailure, Error)> {
        let Some(known) = &self.config else {
            return Ok(Caller::unrestricted());
        };
        if let Some(header) = authorization {
            let credentials = parse_authorization(header)
                .map_err(|e| self.refuse(peer, AuthFailure::Malformed, &e))?;
            let digest: [u8; 32] = Sha256::digest(credentials.token().as_bytes()).into();
            // Every configured hash is compared, each in constant time, so the timing shows
            // neither the token nor which entry matched.
            let mut found: Option<&Caller> = None;
            for (hash, caller) in &known.tokens {
                if constant_time_eq(hash, &digest) {
                    found = Some(caller);
                }
            }
            return match found {
                Some(caller) => Ok(caller.clone()),
                None => {
                    // Not even the Basic user: some clients put the token there.
                    let how = match &credentials {
                        Credentials::Basic { .. } => " (Basic credentials)",
                        Credentials::Bearer(_) => "",
                    };
                    Err(self.refuse(
                        peer,
                        AuthFailure::UnknownToken,
                        &format!("unknown token{how}"),
                    ))
                }
            };
        }
        if let Some(subject) = peer.and_then(|p| p.cert_subject.as_deref()) {
            if let Some(caller) = known.certs.get(subject) {
                return Ok(caller.clone());
            }
            // A certificate the CA signed but nobody listed: the anonymous grants, under its
            // own name; nothing at all when anonymous callers get nothing.
            return match &known.anonymous {
                Some(a) => Ok(Caller::new(cert_name(subject), a.inner.grants.clone())),
                None => Err(self.refuse(
                    peer,
                    AuthFailure::UnlistedCertificate,
                    &format!(
                        "certificate subject {} is not listed in [[auth.client_cert]]",
                        crate::error::echo(subject)
                    ),
                )),
            };
        }
        match &known.anonymous {
            Some(caller) => Ok(caller.clone()),
            None => Err(self.refuse(peer, AuthFailure::NoCredentials, "no credentials")),
        }
    }

    /// UNAUTHENTICATED, logged with the peer address (never the token), rate-limited.
    fn refuse(&self, peer: Option<&Peer>, reason: AuthFailure, why: &str) -> (AuthFailure, Error) {
        if let Some(suppressed) = UNAUTHENTICATED.allow() {
            tracing::warn!(
                peer = %Peer::addr_text(peer),
                suppressed,
                "authentication failed: {why}"
            );
        }
        let error = Error::Unauthenticated(format!(
            "authentication failed: {why}; send \"authorization: Bearer <token>\" with a token \
             this server knows"
        ));
        (reason, error)
    }
}

/// `cert:<CN>`, control characters escaped.
fn cert_name(subject: &str) -> String {
    format!("{CERT_PREFIX}{}", subject.escape_debug())
}

/// Whether two hashes are equal, in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(list: &[&str]) -> Vec<Grant> {
        list.iter().map(|g| g.parse().unwrap()).collect()
    }

    #[test]
    fn grants_parse_and_refuse() {
        let g: Grant = "write:ci/**".parse().unwrap();
        assert_eq!(g.access, Access::Write);
        assert_eq!(g.pattern, "ci/**");
        assert_eq!(g.to_string(), "write:ci/**");
        for bad in [
            "read",
            "none:**",
            "READ:**",
            "write:",
            "read:a b",
            ":x",
            "write:ci/ma\u{456}n",
            "read:ci//*",
            "read:ci/?",
            "read:*/blobs",
        ] {
            assert!(bad.parse::<Grant>().is_err(), "{bad}");
        }
        for good in [
            "read:**",
            "read:*",
            "write:ci/**",
            "admin:dev/alice",
            "read:ci/pr-*",
        ] {
            assert_eq!(good.parse::<Grant>().unwrap().to_string(), good);
        }
    }

    #[test]
    fn access_levels_include_those_below() {
        let c = Caller::new("ci", grants(&["write:ci/**", "read:**"]));
        assert!(c.may(Access::Read, "dev/alice"));
        assert!(!c.may(Access::Write, "dev/alice"));
        assert!(c.may(Access::Write, "ci/main"));
        assert!(c.may(Access::Read, "ci/main"));
        assert!(!c.may(Access::Admin, "ci/main"));
        assert!(c.may(Access::Read, ""), "** covers the default instance");
        let err = c
            .require(Access::Write, "dev/alice")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"dev/alice\"") && err.contains("write"),
            "{err}"
        );
    }

    #[test]
    fn coverage_is_sound() {
        assert!(covers("*", "ci/*"));
        assert!(covers("ci/**", "ci/pr-*"));
        assert!(covers("ci/*", "ci/main"));
        assert!(!covers("ci/pr-*", "ci/*"));
        assert!(!covers("ci/main", "ci/*"));
        assert!(!covers("ci/*", "*"));
        assert!(covers("*a*", "xa*"));
        assert!(!covers("*a", "*a*"));
    }

    proptest::proptest! {
        /// Whenever `covers` says yes, every name the pattern matches is matched by the grant.
        #[test]
        fn covers_never_overclaims(g in "[ab/*]{0,6}", p in "[ab/*]{0,6}", n in "[ab/]{0,8}") {
            if covers(&g, &p) && glob_match(&p, &n) {
                proptest::prop_assert!(glob_match(&g, &n), "{g} covers {p} but not {n}");
            }
        }
    }

    #[test]
    fn authorization_headers() {
        assert_eq!(
            parse_authorization(b"Bearer abc").unwrap(),
            Credentials::Bearer("abc".into())
        );
        assert_eq!(
            parse_authorization(b"bearer  abc ").unwrap(),
            Credentials::Bearer("abc".into())
        );
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("bob:s3cret:x")
        );
        assert_eq!(
            parse_authorization(basic.as_bytes()).unwrap(),
            Credentials::Basic {
                user: "bob".into(),
                token: "s3cret:x".into()
            }
        );
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Token abc",
            b"Basic !!!",
            b"Basic Ym9i",
            b"\xff\xfe",
            b"",
            b"Bearer a b",
        ] {
            let e = parse_authorization(bad).unwrap_err();
            assert!(!e.is_empty());
        }
        // Neither a scheme nor a bare token is ever echoed.
        for secret in [
            &b"Digest secret-here"[..],
            b"bare-secret-here",
            b"Bearer\tsecret-here x",
        ] {
            let e = parse_authorization(secret).unwrap_err();
            assert!(!e.contains("secret"), "{e}");
        }
        assert_eq!(
            parse_authorization(b"Bearer\tabc").unwrap(),
            Credentials::Bearer("abc".into())
        );
    }

    #[test]
    fn tokens_authenticate_by_hash() {
        let token = new_token().unwrap();
        assert_eq!(token.len(), 43);
        assert_ne!(token, new_token().unwrap());
        let config = AuthConfig {
            anonymous: Access::Read,
            tokens: vec![TokenConfig {
                name: "ci".into(),
                hash: hash_token(&token),
                grants: grants(&["write:ci/**"]),
            }],
            client_certs: vec![ClientCertConfig {
                subject: "runner".into(),
                grants: grants(&["admin:**"]),
            }],
        };
        let auth = Authenticator::new(Some(&config)).unwrap();
        let header = format!("Bearer {token}");
        let ci = auth.authenticate(Some(header.as_bytes()), None).unwrap();
        assert_eq!(ci.name(), "ci");
        assert!(ci.may(Access::Write, "ci/main"));
        let e = auth.authenticate(Some(b"Bearer nope"), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.to_string().contains("nope"));
        let anon = auth.authenticate(None, None).unwrap();
        assert_eq!(anon.name(), ANONYMOUS);
        assert!(anon.may(Access::Read, "x") && !anon.may(Access::Write, "x"));
        let peer = Peer {
            addr: None,
            cert_subject: Some("runner".into()),
        };
        let runner = auth.authenticate(None, Some(&peer)).unwrap();
        assert!(runner.may(Access::Admin, "anything"));
        let closed = AuthConfig {
            anonymous: Access::None,
            ..config
        };
        let auth = Authenticator::new(Some(&closed)).unwrap();
        let e = auth.authenticate(None, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn config_checks() {
        let ok = TokenConfig {
            name: "a".into(),
            hash: hash_token("x"),
            grants: vec![],
        };
        let mut c = AuthConfig {
            anonymous: Access::None,
            tokens: vec![ok.clone(), ok.clone()],
            client_certs: vec![],
        };
        assert!(c.check().unwrap_err().contains("twice"));
        c.tokens[1].name = "b".into();
        assert!(c.check().unwrap_err().contains("same hash"));
        c.tokens[1].hash = "sha256:zz".into();
        assert!(c.check().is_err());
        c.tokens[1].hash = hash_token("y");
        c.check().unwrap();
        for bad in [
            ANONYMOUS,
            "Anonymous",
            "cert:x",
            "ci\u{202e}",
            "ci bot",
            "a/b",
        ] {
            c.tokens[1].name = bad.into();
            assert!(c.check().is_err(), "{bad:?}");
        }
        c.tokens[1].name = "ci-bot_2".into();
        c.check().unwrap();
        c.client_certs = vec![
            ClientCertConfig {
                subject: "runner".into(),
                grants: vec![],
            },
            ClientCertConfig {
                subject: "runner".into(),
                grants: vec![],
            },
        ];
        assert!(c.check().unwrap_err().contains("twice"));
    }
}
