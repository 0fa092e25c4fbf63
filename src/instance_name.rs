//! Instance names as requests carry them: which are well formed. A name can never smuggle path
//! tricks or REAPI's reserved words into storage keys or resource names, nor pose as another
//! name: names are limited to a safe set of characters, so two names that look alike are the
//! same name. (What a namespace reads, writes and keeps is policy: `namespace.rs`.)
//!
//! The safe set is ASCII letters, digits and [`SAFE_PUNCTUATION`] within segments, `/` between
//! them. Restricting beats normalising (NFC plus a mixed-script rule): zero-width characters,
//! bidi overrides, word joiners, look-alike letters from other scripts and full-width forms
//! are all simply refused, no Unicode tables are needed, and the rule fits in one sentence of
//! the README. Patterns over names (`[namespaces]` rules) follow the same rule, plus `*`.

use crate::error::{echo, Error, Result};

/// Longest instance name accepted, in bytes.
pub const MAX_INSTANCE_NAME_LEN: usize = 256;

/// Punctuation allowed within a segment, besides ASCII letters and digits.
pub const SAFE_PUNCTUATION: &str = "-_.+=@~,";

/// The wildcard of namespace patterns: any run of characters, including `/`.
pub const WILDCARD: char = '*';

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

/// Whether `c` may appear in an instance name (`/` separates segments).
pub fn is_safe_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '/' || SAFE_PUNCTUATION.contains(c)
}

/// Checks an instance name from a request. The empty name is the default instance.
pub fn validate(name: &str) -> Result<()> {
    check(name, Kind::Name)
}

/// Checks a pattern over instance names, as `[[namespaces.rule]]` patterns are written: an
/// instance name in which `*` may stand for any run of characters. The empty pattern is the
/// empty name. A segment without `*` follows the rules of a name's segments: one that no valid
/// name has (`a//b`, `..`, `blobs`) would make a rule that silently matches nothing.
pub fn validate_pattern(pattern: &str) -> Result<()> {
    check(pattern, Kind::Pattern)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Name,
    Pattern,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Name => "instance name",
            Kind::Pattern => "namespace pattern",
        }
    }
}

/// The first segment of the namespaces hoard keeps its own records under
/// (`hoard.hook-deliveries`, `hoard.replica-copies`): no client may name them, so no
/// invalidation or prune can reach them.
pub const RESERVED_PREFIX: &str = "hoard.";

fn check(text: &str, kind: Kind) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    let what = kind.what();
    if text.len() > MAX_INSTANCE_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; at most {MAX_INSTANCE_NAME_LEN} are allowed",
            text.len()
        )));
    }
    let wildcard = kind == Kind::Pattern;
    if let Some((at, c)) = text
        .chars()
        .enumerate()
        .find(|&(_, c)| !(is_safe_char(c) || wildcard && c == WILDCARD))
    {
        let extra = if wildcard {
            ", \"*\" as a wildcard"
        } else {
            ""
        };
        return Err(Error::InvalidArgument(format!(
            "{what} {} is invalid: its character {} is U+{:04X} ({}), which is outside the \
             safe set (ASCII letters, digits and \"{SAFE_PUNCTUATION}\" within segments, \"/\" \
             between them{extra}); names are limited to it so that one name cannot pose as \
             another",
            echo(text),
            at + 1,
            c as u32,
            describe(c, kind),
        )));
    }
    let first = text.split('/').next().unwrap_or("");
    if first.starts_with(RESERVED_PREFIX) && !(wildcard && first.contains(WILDCARD)) {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is invalid: names starting with {RESERVED_PREFIX:?} are reserved for \
             hoard's own records (webhook deliveries, a replica's copies)",
            echo(text)
        )));
    }
    for segment in text.split('/') {
        let bad = if segment.is_empty() {
            Some("an empty path segment")
        } else if wildcard && segment.contains(WILDCARD) {
            None
        } else if segment == "." || segment == ".." {
            Some("a '.' or '..' segment")
        } else if RESERVED_SEGMENTS.contains(&segment) {
            Some("a segment reserved by REAPI")
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(Error::InvalidArgument(format!(
                "{what} {} is invalid: it contains {why} ({})",
                echo(text),
                echo(segment)
            )));
        }
    }
    Ok(())
}

/// What kind of character `c` is, for the message: the name in the error is echoed escaped,
/// but a look-alike letter still looks like the letter it imitates.
fn describe(c: char, kind: Kind) -> &'static str {
    match c {
        '\u{061C}'
        | '\u{200E}'
        | '\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}' => "a bidirectional-text control",
        '\u{00AD}'
        | '\u{034F}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200D}'
        | '\u{2060}'..='\u{2064}'
        | '\u{FEFF}' => "an invisible character",
        '\u{FF01}'..='\u{FF5E}' => "a full-width form",
        WILDCARD if kind == Kind::Name => "a wildcard, which only patterns may contain",
        c if c.is_control() => "a control character",
        c if c.is_whitespace() => "whitespace",
        c if c.is_ascii() => "punctuation outside the safe set",
        c if c.is_alphanumeric() => "a letter or digit outside ASCII",
        _ => "a character outside ASCII",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<()>) -> String {
        match result {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "",
            "main",
            "ci/main",
            "ci/branches/feature-x",
            "a_b.c",
            "user@host",
            "v1.2+build=3",
            "~alice/tmp,2",
            "UPPER/lower/0123456789",
            "...",
            "a..b",
        ] {
            assert!(validate(n).is_ok(), "{n}");
        }
        assert!(validate(&"x".repeat(MAX_INSTANCE_NAME_LEN)).is_ok());
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

    #[test]
    fn hoards_own_namespaces_cannot_be_named() {
        for n in ["hoard.hook-deliveries", "hoard.replica-copies/x", "hoard.x"] {
            assert!(
                message(validate(n)).contains("reserved for hoard's own records"),
                "{n}"
            );
            assert!(validate_pattern(n).is_err(), "{n}");
        }
        assert!(validate("hoard").is_ok());
        assert!(validate("ci/hoard.x").is_ok());
        // A pattern may still match them by wildcard; none is ever a known namespace.
        assert!(validate_pattern("hoa*").is_ok());
    }

    /// Every name here looks like (or prints as) an ordinary one; each must be refused, naming
    /// the character and where it is.
    #[test]
    fn refuses_look_alikes_naming_the_character() {
        for (name, code, position) in [
            ("ci/main\u{200B}", "U+200B", 8),         // zero-width space
            ("ci/m\u{202E}niam", "U+202E", 5),        // right-to-left override
            ("ci/ma\u{0456}n", "U+0456", 6),          // Cyrillic і
            ("ci/ma\u{200D}in", "U+200D", 6),         // zero-width joiner
            ("ci/ma\u{200C}in", "U+200C", 6),         // zero-width non-joiner
            ("ci/ma\u{2060}in", "U+2060", 6),         // word joiner
            ("\u{FEFF}ci/main", "U+FEFF", 1),         // byte-order mark
            ("ci/\u{202D}main", "U+202D", 4),         // left-to-right override
            ("ci/\u{2067}niam\u{2069}", "U+2067", 4), // right-to-left isolate ... pop
            ("ci/\u{2066}main", "U+2066", 4),         // left-to-right isolate
            ("ci/\u{2068}main", "U+2068", 4),         // first-strong isolate
            ("ci/main\u{2069}", "U+2069", 8),         // pop directional isolate
            ("ci/\u{200F}main", "U+200F", 4),         // right-to-left mark
            ("ci\u{00A0}main", "U+00A0", 3),          // no-break space
            ("ci/\u{FF4D}ain", "U+FF4D", 4),          // full-width m
            ("\u{FF43}\u{FF49}", "U+FF43", 1),        // full-width ci
            ("ci/ma\u{0301}in", "U+0301", 6),         // combining acute accent
            ("ci/main*", "U+002A", 8),
            ("ci/mai?", "U+003F", 7),
            ("ci/main\t", "U+0009", 8),
            ("ci:main", "U+003A", 3),
        ] {
            let m = message(validate(name));
            assert!(
                m.contains(&format!("character {position} is {code}")),
                "{name:?}: {m}"
            );
            assert!(m.contains("cannot pose as another"), "{m}");
        }
    }

    #[test]
    fn the_message_says_what_kind_of_character_it_is() {
        let m = |n: &str| message(validate(n));
        assert!(m("ci/m\u{202E}niam").contains("bidirectional-text control"));
        assert!(m("ci/main\u{200B}").contains("invisible"));
        assert!(m("ci/ma\u{0456}n").contains("letter or digit outside ASCII"));
        assert!(m("ci/\u{FF4D}ain").contains("full-width"));
        assert!(m("ci/*").contains("wildcard"));
        // The name is echoed escaped, so the override cannot reorder the message around it.
        assert!(!m("ci/m\u{202E}niam").contains('\u{202E}'));
    }

    #[test]
    fn patterns_are_names_with_wildcards() {
        for p in [
            "",
            "*",
            "ci/*",
            "ci/branches/*",
            "dev-*",
            "*-tmp",
            "a*b*c",
            "*/old",
        ] {
            assert!(validate_pattern(p).is_ok(), "{p}");
        }
        for p in [
            "ci/ma\u{0456}n*",
            "ci/*\u{200B}",
            "ci/?",
            "ci/[ab]",
            "ci/{a,b}",
            "ci//*",
            "/*",
            "*/",
            "ci/../*",
            "*/blobs/*",
            "a\0*",
        ] {
            assert!(validate_pattern(p).is_err(), "{p:?}");
        }
        assert!(validate_pattern(&"*".repeat(MAX_INSTANCE_NAME_LEN + 1)).is_err());
        let m = message(validate_pattern("ci/ma\u{0456}n*"));
        assert!(m.starts_with("namespace pattern"), "{m}");
        assert!(m.contains("\"*\" as a wildcard"), "{m}");
    }
}
