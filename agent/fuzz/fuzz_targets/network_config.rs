//! Any bytes as flannel's network config: never panics; what parses satisfies the invariants the
//! allocator relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twill_agent::overlay::config::NetworkConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = NetworkConfig::parse(text) {
        assert!(cfg.enable_ipv4 || cfg.enable_ipv6);
        if let Some(net) = cfg.network {
            assert!(cfg.subnet_len > net.prefix_len() && cfg.subnet_len <= 30);
            assert!(cfg.subnet_min <= cfg.subnet_max);
            assert!(net.contains(&cfg.subnet_min.unwrap()));
            assert!(net.contains(&cfg.subnet_max.unwrap()));
        }
        if let Some(net) = cfg.ipv6_network {
            assert!(cfg.ipv6_subnet_len > net.prefix_len());
            assert!(cfg.ipv6_subnet_min <= cfg.ipv6_subnet_max);
        }
    }
});
