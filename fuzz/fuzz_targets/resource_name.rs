//! ByteStream resource names (`src/resource_name.rs`), read and write forms: no input panics,
//! and whatever parses formats back (`Display`) to a name that parses to an equal value.
#![no_main]

use hoard::instance_name;
use hoard::resource_name::ResourceName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = ResourceName::parse_read(text) {
        assert!(
            name.upload_id.is_none() && name.metadata.is_none(),
            "{text:?}"
        );
        assert!(instance_name::validate(&name.instance).is_ok(), "{text:?}");
        let again = name.to_string();
        assert_eq!(
            ResourceName::parse_read(&again).ok(),
            Some(name),
            "{text:?} -> {again:?}"
        );
    }
    if let Ok(name) = ResourceName::parse_write(text) {
        assert!(name.upload_id.is_some(), "{text:?}");
        assert!(instance_name::validate(&name.instance).is_ok(), "{text:?}");
        let again = name.to_string();
        assert_eq!(
            ResourceName::parse_write(&again).ok(),
            Some(name),
            "{text:?} -> {again:?}"
        );
    }
});
