//! The aya side of the seam: the typed maps of a loaded or pinned dataplane ([`AyaMaps`]),
//! their expected layouts (checked before a pinned map is re-used), and the small helpers
//! every map operation shares (absent keys are not errors when deleting or looking up).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead as _},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError, MapInfo, MapType, PerCpuArray},
};
use tracing::warn;
use twill_common::service::{
    AffinityKey, AffinityValue, BackendKey, BackendValue, CtKey, CtValue, LbConfig, LocalAddrKey,
    MAP_AFFINITY, MAP_BACKEND, MAP_CONFIG, MAP_COUNT, MAP_CT, MAP_LOCAL_ADDR, MAP_MAGLEV,
    MAP_REVNAT, MAP_SOCK, MAP_SVC, MAX_LOCAL_ADDRS, MaglevTable, RevNatValue, SockKey, SockValue,
    SvcCount, SvcKey, SvcValue,
};

use super::{EbpfLbError, LbLimits, MapUsage, map_err, not_found};
use crate::shared::bpf::{EbpfError, OBJECT_NAME};

/// The typed maps.
pub struct AyaMaps {
    pub(super) svc: HashMap<MapData, SvcKey, SvcValue>,
    pub(super) backends: HashMap<MapData, BackendKey, BackendValue>,
    pub(super) maglev: HashMap<MapData, u32, MaglevTable>,
    pub(super) ct: HashMap<MapData, CtKey, CtValue>,
    pub(super) affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub(super) sock: HashMap<MapData, SockKey, SockValue>,
    pub(super) revnat: HashMap<MapData, u32, RevNatValue>,
    pub(super) count: PerCpuArray<MapData, SvcCount>,
    pub(super) local_addrs: HashMap<MapData, LocalAddrKey, u32>,
    pub(super) config: Array<MapData, LbConfig>,
}

/// Opaque: the maps' contents are read through their accessors, not printed.
impl std::fmt::Debug for AyaMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaMaps").finish_non_exhaustive()
    }
}

impl AyaMaps {
    /// Takes the maps out of a loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            svc: take_map(ebpf, MAP_SVC)?,
            backends: take_map(ebpf, MAP_BACKEND)?,
            maglev: take_map(ebpf, MAP_MAGLEV)?,
            ct: take_map(ebpf, MAP_CT)?,
            affinity: take_map(ebpf, MAP_AFFINITY)?,
            sock: take_map(ebpf, MAP_SOCK)?,
            revnat: take_map(ebpf, MAP_REVNAT)?,
            count: take_map(ebpf, MAP_COUNT)?,
            local_addrs: take_map(ebpf, MAP_LOCAL_ADDR)?,
            config: take_map(ebpf, MAP_CONFIG)?,
        })
    }

    /// Opens the maps pinned in `pin_dir` by a running (or stopped) dataplane, without loading
    /// any program: what [`EbpfLbView`] reads.
    pub(super) fn from_pins(pin_dir: &Path) -> Result<Self, EbpfLbError> {
        use aya::maps::Map;
        fn pinned<T: TryFrom<Map, Error = MapError>>(
            pin_dir: &Path,
            name: &'static str,
            wrap: fn(MapData) -> Map,
        ) -> Result<T, EbpfLbError> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| EbpfLbError::Map {
                operation: "open pinned",
                map: name,
                key: path.display().to_string(),
                source: Box::new(source),
            })?;
            T::try_from(wrap(data)).map_err(|source| EbpfLbError::Map {
                operation: "open pinned",
                map: name,
                key: path.display().to_string(),
                source: Box::new(source),
            })
        }
        Ok(Self {
            svc: pinned(pin_dir, MAP_SVC, Map::HashMap)?,
            backends: pinned(pin_dir, MAP_BACKEND, Map::HashMap)?,
            maglev: pinned(pin_dir, MAP_MAGLEV, Map::HashMap)?,
            ct: pinned(pin_dir, MAP_CT, Map::LruHashMap)?,
            affinity: pinned(pin_dir, MAP_AFFINITY, Map::LruHashMap)?,
            sock: pinned(pin_dir, MAP_SOCK, Map::LruHashMap)?,
            revnat: pinned(pin_dir, MAP_REVNAT, Map::HashMap)?,
            count: pinned(pin_dir, MAP_COUNT, Map::PerCpuArray)?,
            local_addrs: pinned(pin_dir, MAP_LOCAL_ADDR, Map::HashMap)?,
            config: pinned(pin_dir, MAP_CONFIG, Map::Array)?,
        })
    }

    /// Counters of the services `ids`, summed over CPUs.
    pub(super) fn counters(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, SvcCount>, EbpfLbError> {
        let mut out = BTreeMap::new();
        for id in ids {
            out.insert(id, self.count_of(id)?);
        }
        Ok(out)
    }

    /// One service's counters, summed over CPUs.
    pub(super) fn count_of(&self, id: u32) -> Result<SvcCount, EbpfLbError> {
        let per_cpu = self
            .count
            .get(&id, 0)
            .map_err(map_err("lookup", MAP_COUNT, id))?;
        Ok(per_cpu
            .iter()
            .fold(SvcCount::default(), |acc, c| acc.wrapping_add(*c)))
    }

    /// Fill level and kernel memory of every map; the user-space-written maps are counted from
    /// the service values (`fill`), the LRU maps by iterating them.
    pub(super) fn occupancy(
        &self,
        fill: impl IntoIterator<Item = impl std::borrow::Borrow<SvcValue>>,
    ) -> Vec<MapUsage> {
        let (mut n, mut programmed_backends, mut with_table) = (0u64, 0u64, 0u64);
        for value in fill {
            let value = value.borrow();
            n += 1;
            programmed_backends += u64::from(value.backends);
            with_table += u64::from(value.backends > 0);
        }
        let usage = |name: &'static str, map: &MapData, entries: Option<u64>| {
            let info = map.info().ok();
            MapUsage {
                name,
                entries,
                max_entries: info.as_ref().map_or(0, MapInfo::max_entries),
                memlock_bytes: memlock(map),
            }
        };
        vec![
            usage(MAP_SVC, self.svc.map(), Some(n)),
            usage(MAP_BACKEND, self.backends.map(), Some(programmed_backends)),
            usage(MAP_MAGLEV, self.maglev.map(), Some(with_table)),
            usage(MAP_CT, self.ct.map(), Some(count_keys(self.ct.keys()))),
            usage(
                MAP_AFFINITY,
                self.affinity.map(),
                Some(count_keys(self.affinity.keys())),
            ),
            usage(
                MAP_SOCK,
                self.sock.map(),
                Some(count_keys(self.sock.keys())),
            ),
            usage(MAP_REVNAT, self.revnat.map(), Some(n)),
            usage(MAP_COUNT, self.count.map(), None),
            usage(
                MAP_LOCAL_ADDR,
                self.local_addrs.map(),
                Some(count_keys(self.local_addrs.keys())),
            ),
            usage(MAP_CONFIG, self.config.map(), None),
        ]
    }
}

/// Expected kernel layout of a map: name, type, key size, value size, `BPF_F_NO_PREALLOC`,
/// size.
pub(super) type MapSpec = (&'static str, MapType, usize, usize, bool, u32);

fn spec<K, V>(name: &'static str, map_type: MapType, no_prealloc: bool, max: u32) -> MapSpec {
    use std::mem::size_of;
    (
        name,
        map_type,
        size_of::<K>(),
        size_of::<V>(),
        no_prealloc,
        max,
    )
}

/// Expected kernel layout of each map.
pub(super) fn map_specs(limits: &LbLimits) -> [MapSpec; 10] {
    [
        spec::<SvcKey, SvcValue>(MAP_SVC, MapType::Hash, true, limits.max_services),
        spec::<BackendKey, BackendValue>(MAP_BACKEND, MapType::Hash, true, limits.max_backends),
        spec::<u32, MaglevTable>(MAP_MAGLEV, MapType::Hash, true, limits.max_services),
        spec::<CtKey, CtValue>(MAP_CT, MapType::LruHash, false, limits.max_ct),
        spec::<AffinityKey, AffinityValue>(
            MAP_AFFINITY,
            MapType::LruHash,
            false,
            limits.max_affinity,
        ),
        spec::<SockKey, SockValue>(MAP_SOCK, MapType::LruHash, false, limits.max_sock),
        spec::<u32, RevNatValue>(MAP_REVNAT, MapType::Hash, true, limits.max_services),
        spec::<u32, SvcCount>(MAP_COUNT, MapType::PerCpuArray, false, limits.max_services),
        spec::<LocalAddrKey, u32>(MAP_LOCAL_ADDR, MapType::Hash, true, MAX_LOCAL_ADDRS),
        spec::<u32, LbConfig>(MAP_CONFIG, MapType::Array, false, 1),
    ]
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing {
        object: OBJECT_NAME,
        kind: "map",
        name,
    })?;
    T::try_from(map).map_err(|source| EbpfError::OpenMap {
        map: name,
        source: Box::new(source),
    })
}

/// Deletes `key`, tolerating its absence.
pub(super) fn remove<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), EbpfLbError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(err) if not_found(&err) => Ok(()),
        Err(err) => Err(map_err("delete", name, key)(err)),
    }
}

/// The keys of `map` whose entries `pick` selects (an entry that cannot be read is skipped:
/// the kernel may replace LRU entries while the map is iterated).
pub(super) fn keys_where<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    mut pick: impl FnMut(&K, &V) -> bool,
) -> Vec<K> {
    map.iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| pick(k, v))
        .map(|(k, _)| k)
        .collect()
}

/// Deletes `keys`, tolerating absent ones.
pub(super) fn remove_all<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    keys: &[K],
) -> Result<(), EbpfLbError> {
    keys.iter().try_for_each(|key| remove(map, name, key))
}

/// Number of keys a map iteration yields.
fn count_keys<K: aya::Pod>(keys: aya::maps::MapKeys<'_, K>) -> u64 {
    keys.flatten().count() as u64
}

/// `Ok(None)` for a missing key.
pub(super) fn optional<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(err) if not_found(&err) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Unpins (drops) pinned maps whose layout differs from this build's, before the loader would
/// re-use them.
pub(super) fn check_pinned_maps(pin_dir: &Path, specs: &[MapSpec]) -> Result<(), EbpfLbError> {
    for &(name, map_type, key_size, value_size, no_prealloc, max_entries) in specs {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let compatible = match MapInfo::from_pin(&path) {
            Ok(info) => {
                let same = info.map_type().ok() == Some(map_type)
                    && info.key_size() as usize == key_size
                    && info.value_size() as usize == value_size
                    && (info.map_flags() & twill_common::service::BPF_F_NO_PREALLOC != 0)
                        == no_prealloc;
                if same && info.max_entries() != max_entries {
                    warn!(
                        map = name,
                        pinned = info.max_entries(),
                        wanted = max_entries,
                        "pinned map keeps its size"
                    );
                }
                same
            }
            Err(err) => {
                warn!(map = name, error = %err, "cannot inspect pinned map");
                false
            }
        };
        if !compatible {
            warn!(map = name, path = %path.display(), "pinned map has another layout; recreating");
            fs::remove_file(&path).map_err(|source| EbpfLbError::Io {
                operation: "unpin incompatible map",
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// The `memlock` line of the map's fdinfo: the kernel's count of its memory (Linux >= 6.4 counts
/// the elements actually allocated).
fn memlock(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let file = fs::File::open(format!("/proc/self/fdinfo/{fd}")).ok()?;
    io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("memlock:").map(|v| v.trim().parse().ok()))?
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use twill_common::service::MAPS;

    #[test]
    fn map_specs_cover_every_map_once() {
        let specs = map_specs(&LbLimits::default());
        let names: BTreeSet<&str> = specs.iter().map(|s| s.0).collect();
        assert_eq!(names, MAPS.into_iter().collect());
        assert_eq!(specs.len(), MAPS.len());
    }
}
