//! What a scan keeps of the source index in memory: per indexed key, hashes of its
//! fingerprint and content version and whether the listing has shown it yet (33 bytes of
//! payload per key, never the keys or the listing themselves). Entries are diffed without
//! a lookup in sled each, and keys still unseen at the end are the deletes, without a
//! second pass over the index.
//!
//! A scan that changed the index (or read it whole) stores the digest in sled when it
//! ends ([`Snapshot`], 3.3 MB for 100k keys), and the next scan reads that instead of
//! every index record: on a cold cache, reading 100k JSON index records took 0.6–0.8 s,
//! as long as listing the tree, and the stored digest 0.02–0.03 s. The first index change
//! after that goes through [`Records::apply_clearing`], which removes the stored digest
//! in the same transaction, so a stored digest always describes the index as it is, even
//! after a crash in the middle of a scan.

use std::collections::{HashMap, HashSet};

use crate::state::{IndexEntry, Records, Snapshot, StateError};

/// Stored digest format: this tag, then the entry count (u64), then per entry the key
/// hash (u128), 1 if the fingerprint hash is set (u8), the fingerprint hash (u64, 0 when
/// unset) and the version hash (u64), all little-endian. A value that does not decode is
/// ignored and the index is read instead.
const TAG: &[u8; 8] = b"tmdgst-1";
const ENTRY_LEN: usize = 16 + 1 + 8 + 8;

/// 128 bits of blake3: a key's stand-in in memory (keys must not collide with each other).
pub(super) fn hash128(bytes: &[u8]) -> u128 {
    let h = blake3::hash(bytes);
    u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
}

/// 64 bits of blake3: a fingerprint's or version's stand-in, only ever compared with the
/// same key's previous one.
fn hash64(text: &str) -> u64 {
    let h = blake3::hash(text.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The fields of an index record the digest needs, read without copying.
#[derive(serde::Deserialize)]
struct Hashed<'a> {
    #[serde(borrow)]
    version: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    fingerprint: Option<std::borrow::Cow<'a, str>>,
}

/// What the digest knows of a listed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Indexed with the same fingerprint: nothing to read.
    Unchanged,
    /// Not indexed.
    New,
    /// Indexed with another fingerprint (or none): read it and compare the version.
    Changed(PreviousVersion),
}

/// The hash of an indexed content version, to compare a re-read item's version with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PreviousVersion(u64);

impl PreviousVersion {
    /// Whether `version` is the indexed one.
    pub(super) fn is(self, version: &str) -> bool {
        self.0 == hash64(version)
    }
}

/// Where a digest was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The value a previous scan stored.
    Stored,
    /// Every index record (no stored digest, or a stale or unreadable one).
    Index,
}

impl Origin {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Origin::Stored => "stored digest",
            Origin::Index => "index records",
        }
    }
}

pub(super) struct Digest {
    entries: HashMap<u128, KnownEntry>,
    snapshot: Snapshot,
    /// Whether the stored value equals `entries` (without the seen flags).
    stored: bool,
}

struct KnownEntry {
    /// Hash of the indexed fingerprint; `None` when the index has none.
    fingerprint: Option<u64>,
    /// Hash of the indexed content version.
    version: u64,
    seen: bool,
}

impl KnownEntry {
    fn new(version: &str, fingerprint: Option<&str>, seen: bool) -> KnownEntry {
        KnownEntry {
            fingerprint: fingerprint.map(hash64),
            version: hash64(version),
            seen,
        }
    }
}

impl Digest {
    /// Reads the stored digest, or every index record when none is stored.
    pub(super) fn load(
        index: &Records<IndexEntry>,
        snapshot: Snapshot,
    ) -> Result<(Digest, Origin), StateError> {
        if let Some(entries) = snapshot.get()?.and_then(|bytes| decode(&bytes)) {
            let digest = Digest {
                entries,
                snapshot,
                stored: true,
            };
            return Ok((digest, Origin::Stored));
        }
        let mut entries = HashMap::new();
        index.for_each_raw(|identity, value| {
            let entry: Hashed =
                serde_json::from_slice(value).map_err(|source| StateError::Corrupt {
                    key: String::from_utf8_lossy(identity).into_owned(),
                    source,
                })?;
            entries.insert(
                hash128(identity),
                KnownEntry::new(&entry.version, entry.fingerprint.as_deref(), false),
            );
            Ok(())
        })?;
        let digest = Digest {
            entries,
            snapshot,
            stored: false,
        };
        Ok((digest, Origin::Index))
    }

    /// Indexed keys.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Marks `identity` seen and compares its `fingerprint` with the indexed one.
    pub(super) fn see(&mut self, identity: &str, fingerprint: Option<&str>) -> Seen {
        let Some(known) = self.entries.get_mut(&hash128(identity.as_bytes())) else {
            return Seen::New;
        };
        known.seen = true;
        match (fingerprint, known.fingerprint) {
            (Some(fp), Some(indexed)) if hash64(fp) == indexed => Seen::Unchanged,
            _ => Seen::Changed(PreviousVersion(known.version)),
        }
    }

    /// Writes index changes (puts and removes) and keeps the digest equal to the index.
    pub(super) fn apply(
        &mut self,
        index: &Records<IndexEntry>,
        changes: &[(&str, Option<&IndexEntry>)],
    ) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        if self.stored {
            index.apply_clearing(changes.iter().copied(), &self.snapshot)?;
            self.stored = false;
        } else {
            index.apply(changes.iter().copied())?;
        }
        for (identity, entry) in changes {
            let key = hash128(identity.as_bytes());
            match entry {
                Some(entry) => {
                    self.entries.insert(
                        key,
                        KnownEntry::new(&entry.version, entry.fingerprint.as_deref(), true),
                    );
                }
                None => {
                    self.entries.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Hashes of the indexed keys the listing did not show.
    pub(super) fn unseen(&self) -> HashSet<u128> {
        self.entries
            .iter()
            .filter(|(_, k)| !k.seen)
            .map(|(h, _)| *h)
            .collect()
    }

    /// Stores the digest for the next scan, unless the stored value is already equal.
    pub(super) fn store(&mut self) -> Result<(), StateError> {
        if self.stored {
            return Ok(());
        }
        self.snapshot.put(&encode(&self.entries))?;
        self.stored = true;
        Ok(())
    }
}

fn encode(entries: &HashMap<u128, KnownEntry>) -> Vec<u8> {
    let mut out = Vec::with_capacity(TAG.len() + 8 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(TAG);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (key, known) in entries {
        out.extend_from_slice(&key.to_le_bytes());
        out.push(u8::from(known.fingerprint.is_some()));
        out.extend_from_slice(&known.fingerprint.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&known.version.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Option<HashMap<u128, KnownEntry>> {
    let body = bytes.strip_prefix(TAG.as_slice())?;
    let (count, body) = body.split_first_chunk::<8>()?;
    let count = usize::try_from(u64::from_le_bytes(*count)).ok()?;
    if body.len() != count.checked_mul(ENTRY_LEN)? {
        return None;
    }
    let mut entries = HashMap::with_capacity(count);
    for entry in body.chunks_exact(ENTRY_LEN) {
        let key = u128::from_le_bytes(entry[..16].try_into().ok()?);
        let fingerprint = match entry[16] {
            0 => None,
            1 => Some(u64::from_le_bytes(entry[17..25].try_into().ok()?)),
            _ => return None,
        };
        let version = u64::from_le_bytes(entry[25..].try_into().ok()?);
        entries.insert(
            key,
            KnownEntry {
                fingerprint,
                version,
                seen: false,
            },
        );
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;

    fn entry(version: &str, fingerprint: Option<&str>) -> IndexEntry {
        IndexEntry {
            version: version.into(),
            fingerprint: fingerprint.map(str::to_owned),
        }
    }

    fn load(state: &State) -> (Digest, Origin) {
        let index = state.index("p").unwrap();
        Digest::load(&index, state.index_digest("p").unwrap()).unwrap()
    }

    fn changed_from(seen: Seen, version: &str) -> bool {
        matches!(seen, Seen::Changed(previous) if previous.is(version))
    }

    #[test]
    fn a_stored_digest_is_read_back_and_equals_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (a, b) = (entry("v1", Some("1:2:3")), entry("v2", None));
        let index = state.index("p").unwrap();
        index.apply([("a", Some(&a)), ("b", Some(&b))]).unwrap();

        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::Index);
        digest.store().unwrap();

        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::Stored);
        assert_eq!(digest.len(), 2);
        assert_eq!(digest.see("a", Some("1:2:3")), Seen::Unchanged);
        assert!(changed_from(digest.see("a", Some("1:2:4")), "v1"));
        assert!(changed_from(digest.see("b", Some("1:2:3")), "v2"));
        assert!(!changed_from(digest.see("b", None), "v1"));
        assert_eq!(digest.see("c", Some("1:2:3")), Seen::New);
        assert!(digest.unseen().is_empty());
    }

    #[test]
    fn the_first_index_change_removes_the_stored_digest_and_the_next_store_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let index = state.index("p").unwrap();
        let a = entry("v1", Some("1:2:3"));
        index.apply([("a", Some(&a))]).unwrap();
        load(&state).0.store().unwrap();

        // A scan changes `a`, adds `b` and then "crashes" before storing the digest.
        let (mut digest, _) = load(&state);
        let (a2, b) = (entry("v2", Some("1:2:9")), entry("v3", Some("4:5:6")));
        digest
            .apply(&index, &[("a", Some(&a2)), ("b", Some(&b))])
            .unwrap();
        assert!(state.index_digest("p").unwrap().get().unwrap().is_none());
        let (mut fresh, origin) = load(&state);
        assert_eq!(origin, Origin::Index);
        assert_eq!(fresh.see("a", Some("1:2:9")), Seen::Unchanged);

        // A scan that ends stores the digest of the index as it now is.
        digest.apply(&index, &[("b", None)]).unwrap();
        digest.store().unwrap();
        let (mut stored, origin) = load(&state);
        assert_eq!(origin, Origin::Stored);
        assert_eq!(stored.len(), 1);
        assert!(changed_from(stored.see("a", Some("7:7:7")), "v2"));
        assert_eq!(stored.see("b", Some("4:5:6")), Seen::New);
    }

    #[test]
    fn a_value_that_does_not_decode_is_ignored() {
        assert!(decode(b"").is_none());
        assert!(decode(b"tmdgst-1\x01\0\0\0\0\0\0\0short").is_none());
        assert!(decode(b"tmdgst99\0\0\0\0\0\0\0\0").is_none());
        let mut entries = HashMap::new();
        entries.insert(7, KnownEntry::new("v1", Some("1:2:3"), true));
        let mut bytes = encode(&entries);
        assert_eq!(decode(&bytes).map(|e| e.len()), Some(1));
        bytes[TAG.len() + 8 + 16] = 2;
        assert!(decode(&bytes).is_none());
    }
}
