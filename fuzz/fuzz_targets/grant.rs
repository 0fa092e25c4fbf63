//! Grants and pattern coverage (`src/auth.rs`): no input panics; a grant that parses formats
//! back to its text; and `covers` never overclaims: whenever it says a grant covers a pattern,
//! every name the pattern matches (tried: the pattern with its stars filled in a few ways) is
//! matched by the grant.
#![no_main]

use hoard::auth::{covers, Grant};
use hoard::namespace::glob_match;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(grant) = text.parse::<Grant>() {
        assert_eq!(grant.to_string(), text);
    }
    // The rest of the input as "grant\npattern".
    let Some((grant, pattern)) = text.split_once('\n') else {
        return;
    };
    if grant.len() > 300 || pattern.len() > 300 {
        return;
    }
    if covers(grant, pattern) {
        for fill in ["", "a", "/", "x/y*z", "**"] {
            let name = pattern.replace('*', fill);
            if glob_match(pattern, &name) {
                assert!(
                    glob_match(grant, &name),
                    "{grant:?} covers {pattern:?} but not {name:?}"
                );
            }
        }
    }
});
