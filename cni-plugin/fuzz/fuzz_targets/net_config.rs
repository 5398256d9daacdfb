//! Fuzzes the network-config parser with arbitrary stdin: `load_conf` must never panic, must
//! answer only with the config error codes (1, 2, 6, 7), and a config it accepts must render
//! its `prevResult` in every supported version without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twill_cni::config::load_conf;
use twill_cni::version::{SUPPORTED, Version};

fuzz_target!(|data: &[u8]| {
    match load_conf(data) {
        Ok(conf) => {
            if let Some(prev) = conf.prev_result {
                for v in SUPPORTED {
                    let out = prev.to_version(Version::parse(v).unwrap());
                    assert!(out.is_object());
                }
            }
        }
        Err(e) => assert!(
            matches!(e.code, 1 | 2 | 6 | 7),
            "unexpected code {}: {}",
            e.code,
            e.msg
        ),
    }
});
