//! The TOML config (`src/config.rs`), parsed and checked the way `hoard serve --config` loads a
//! file (`Config::load` is a read plus `Config::parse`): no text panics, and whatever loads
//! passes the checks again and keeps its namespace names to the safe set.
#![no_main]

use hoard::config::Config;
use hoard::instance_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    assert_eq!(config.check(), Ok(()));
    let ns = &config.namespaces;
    for rule in &ns.rules {
        assert!(
            instance_name::validate_pattern(&rule.pattern).is_ok(),
            "{:?}",
            rule.pattern
        );
    }
    let reads = ns.rules.iter().flat_map(|r| r.read.iter().flatten());
    for name in ns.default.read.iter().chain(reads) {
        assert!(instance_name::validate(name).is_ok(), "{name:?}");
    }
});
