//! Instance names and namespace patterns (`src/instance_name.rs`): no input panics, and any
//! accepted name consists only of the safe set, within the length limit, with no empty, `.`,
//! `..` or reserved segment. Checked here against the rule as the README states it, written
//! out again rather than calling the code under test.
#![no_main]

use hoard::instance_name::{self, MAX_INSTANCE_NAME_LEN, RESERVED_SEGMENTS};
use hoard::namespace::glob_match;
use libfuzzer_sys::fuzz_target;

fn safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.+=@~,/".contains(&b)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let as_name = instance_name::validate(text);
    let as_pattern = instance_name::validate_pattern(text);
    if as_name.is_ok() {
        assert!(text.len() <= MAX_INSTANCE_NAME_LEN, "{text:?}");
        assert!(text.bytes().all(safe), "{text:?}");
        if !text.is_empty() {
            for segment in text.split('/') {
                assert!(
                    !segment.is_empty() && segment != "." && segment != "..",
                    "{text:?}"
                );
                assert!(!RESERVED_SEGMENTS.contains(&segment), "{text:?}");
            }
        }
        // Every name is also a pattern, which matches itself.
        assert!(as_pattern.is_ok(), "{text:?}");
        assert!(glob_match(text, text), "{text:?}");
    }
    if as_pattern.is_ok() {
        assert!(text.len() <= MAX_INSTANCE_NAME_LEN, "{text:?}");
        assert!(text.bytes().all(|b| safe(b) || b == b'*'), "{text:?}");
        // A pattern without a wildcard is a name.
        if !text.contains('*') {
            assert!(as_name.is_ok(), "{text:?}");
        }
    }
});
