//! Fuzzes the subnet file parser (the file twilld, a flannel or a person writes, which twill-cni
//! reads on every ADD): `SubnetFacts::parse` must never panic, and a file it accepts must have
//! a node subnet of a pod subnet's size inside the cluster network, a sane MTU, and render back
//! to the same facts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twill_facts::{SubnetFacts, testing::assert_sane};

fuzz_target!(|text: &str| {
    if let Ok(f) = SubnetFacts::parse(text) {
        assert_sane(&f);
    }
});
