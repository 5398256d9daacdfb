//! CNI spec versions: which ones twill answers and what each one allows.
//!
//! A runtime states the version in the config's `cniVersion` and expects the result in exactly that
//! version. Versions are compared numerically (`0.10.0 > 0.4.0`); the set twill answers is closed,
//! so an unknown version is error 1 rather than a guess at a format.
//!
//! Kept with the result model it serves (see [`crate::result`] for why neither `cni-plugin` nor
//! `rscni-types` replaces them).

use std::fmt;

/// The spec version twill implements.
pub const CURRENT: &str = "1.1.0";

/// Every version twill answers, oldest first (the `supportedVersions` of VERSION).
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A parsed `major.minor.patch` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Patch.
    pub patch: u16,
}

impl Version {
    /// 0.4.0: the first with CHECK.
    pub const V0_4_0: Version = Version::new(0, 4, 0);
    /// 1.0.0: `ips[].version` dropped.
    pub const V1_0_0: Version = Version::new(1, 0, 0);
    /// 1.1.0: GC, STATUS, interface `mtu`, route `mtu`/`advmss`/`priority`/`table`/`scope`.
    pub const V1_1_0: Version = Version::new(1, 1, 0);

    /// A version from its parts.
    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `major.minor.patch`; `None` when it is not three numbers.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let v = Version::new(
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        );
        it.next().is_none().then_some(v)
    }

    /// Whether twill answers this version.
    pub fn is_supported(self) -> bool {
        SUPPORTED.iter().any(|s| Version::parse(s) == Some(self))
    }

    /// Results of this version carry `ips[].version` ("4"/"6").
    pub fn has_ip_version_field(self) -> bool {
        self < Self::V1_0_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_numerically() {
        assert!(Version::parse("0.10.0").unwrap() > Version::parse("0.4.0").unwrap());
        assert!(Version::parse("1.0.0").unwrap() > Version::parse("0.4.0").unwrap());
        assert_eq!(Version::parse("1.1"), None);
        assert_eq!(Version::parse("1.1.0.0"), None);
        assert_eq!(Version::parse("a.b.c"), None);
        assert_eq!(Version::parse("1.1.0").unwrap().to_string(), "1.1.0");
    }

    #[test]
    fn supported_set() {
        for v in SUPPORTED {
            assert!(Version::parse(v).unwrap().is_supported(), "{v}");
        }
        assert!(!Version::parse("0.2.0").unwrap().is_supported());
        assert!(!Version::parse("1.2.0").unwrap().is_supported());
        assert!(Version::parse("0.4.0").unwrap().has_ip_version_field());
        assert!(!Version::parse("1.0.0").unwrap().has_ip_version_field());
    }
}
