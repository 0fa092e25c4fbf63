//! The `authorization` header parser (`src/auth.rs`): no input panics, an error never repeats
//! the credentials it refused, and what parses is what was sent.
#![no_main]

use hoard::auth::{parse_authorization, Credentials};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_authorization(data) {
        Ok(Credentials::Bearer(token)) => {
            assert!(!token.is_empty() && !token.contains(char::is_whitespace));
            let text = std::str::from_utf8(data).expect("parsed input is UTF-8");
            assert!(text.contains(&token));
        }
        Ok(Credentials::Basic { token, .. }) => assert!(!token.is_empty()),
        Err(message) => {
            // Whatever followed the scheme (or stood in its place) is never echoed: no
            // token-like word of the input (8+ characters with a digit, which no word of the
            // messages has) shows up in the message.
            if let Ok(text) = std::str::from_utf8(data) {
                let token_like = |w: &&str| w.len() >= 8 && w.bytes().any(|b| b.is_ascii_digit());
                for word in text.split_whitespace().filter(token_like) {
                    assert!(!message.contains(word), "{message:?} echoes {word:?}");
                }
            }
        }
    }
});
