//! Any bytes as a lease key and value: never panics; a key that parses renders back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twill_agent::overlay::lease::{LeaseAttrs, LeaseSubnets};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (key, value) = data.split_at(split);
    if let Ok(key) = std::str::from_utf8(key)
        && let Ok(s) = LeaseSubnets::parse_key(key)
    {
        assert_eq!(LeaseSubnets::parse_key(&s.key()), Ok(s));
    }
    if let Ok(attrs) = LeaseAttrs::parse("fuzz", value) {
        let again = LeaseAttrs::parse("fuzz", attrs.to_json().as_bytes()).unwrap();
        assert_eq!(again, attrs);
        let _ = attrs.vxlan(false);
        let _ = attrs.vxlan(true);
    }
});
