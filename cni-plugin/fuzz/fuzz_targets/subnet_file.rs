//! Fuzzes the subnet file parser (the file twilld, a flannel or a person writes, which twill-cni
//! reads on every ADD): `SubnetFacts::parse` must never panic, and a file it accepts must have
//! a node subnet of a pod subnet's size inside the cluster network, a sane MTU, and render back
//! to the same facts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twill_facts::{IPV4_SUBNET_PREFIX, IPV6_SUBNET_PREFIX, SubnetFacts};

fuzz_target!(|text: &str| {
    let Ok(f) = SubnetFacts::parse(text) else {
        return;
    };
    if let Some(s) = f.subnet {
        assert!(IPV4_SUBNET_PREFIX.contains(&s.prefix_len()), "{f:?}");
        assert!(f.network.is_none_or(|n| n.contains(&s.trunc())), "{f:?}");
    }
    if let Some(s) = f.ipv6_subnet {
        assert!(IPV6_SUBNET_PREFIX.contains(&s.prefix_len()), "{f:?}");
        assert!(
            f.ipv6_network.is_none_or(|n| n.contains(&s.trunc())),
            "{f:?}"
        );
    }
    assert!((68..=65535).contains(&f.mtu), "{f:?}");
    assert_eq!(SubnetFacts::parse(&f.render()).ok(), Some(f));
});
