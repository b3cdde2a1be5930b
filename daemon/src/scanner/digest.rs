//! The scanner's source index: per indexed key, its content version and fingerprint.
//!
//! In memory a scan keeps a digest of it: per key, a 16-byte hash of the key, 8-byte
//! hashes of the fingerprint and the content version, and whether the listing has shown
//! it yet (33 bytes of payload per key, never the keys or the listing themselves).
//! Entries are diffed without a sled lookup each, and keys still unseen at the end are the
//! deletes, without a second pass over the index.
//!
//! On disk the index is a snapshot and a journal ([`State::index_snapshot`],
//! [`State::index_journal`]):
//! - the snapshot holds the digest (3.3 MB for 100k keys) and, in a part of its own that
//!   only a scan with deletes reads, the indexed keys' names, as of a journal position;
//! - the journal holds every index change after that, written after the log has made the
//!   change's event durable. Its records go to the end of one sled tree, so a changed item
//!   costs no read of a sled page on the disk. One record per key, as the index was kept
//!   before, did: 1000 changed files among 100k touched about 1600 scattered pages.
//!
//! A scan reads the snapshot and replays the journal after its position. When it ends
//! with more changes journaled than an eighth of the index (at least [`FOLD_MIN`]), it
//! folds them into a new snapshot, one sequential write, and then removes them from the
//! journal; a crash in between leaves records the next scan skips by their position. A
//! scan without a stored snapshot (the first, or one after a crash in the first) stores
//! one when it ends.
//!
//! State directories written before kept the index as one sled record per key (tree
//! `index/<pipeline>`); the first scan reads them all, stores them as a snapshot and drops
//! the tree.

use std::collections::{HashMap, HashSet};

use tracing::{debug, warn};

use crate::log::sled::CHUNK_BYTES;
use crate::state::{IndexEntry, Journal, Snapshot, SnapshotHeader, State, StateError};

/// Digest part format: this tag, then the entry count (u64), then per entry the key hash
/// (u128), 1 if the fingerprint hash is set (u8), the fingerprint hash (u64, 0 when unset)
/// and the version hash (u64), all little-endian.
const TAG: &[u8; 8] = b"tmdgst-1";
const ENTRY_LEN: usize = 16 + 1 + 8 + 8;

/// Names part format: this tag, the name count (u64), then per name its length (u32) and
/// its UTF-8 bytes, little-endian.
const NAMES_TAG: &[u8; 8] = b"tmnames1";

/// Journal record format: this tag, then per change its kind (u8: 0 removed, 1 indexed
/// without a fingerprint, 2 with one), the key's length (u32) and UTF-8 bytes, and for an
/// indexed key the fingerprint hash (u64, kind 2 only) and the version hash (u64), all
/// little-endian. A record holds at most [`CHUNK_BYTES`] unless one change is larger.
const JOURNAL_TAG: &[u8; 8] = b"tmjrnl-1";

/// Snapshot parts.
const DIGEST: usize = 0;
const NAMES: usize = 1;

/// Fewest journaled changes a fold waits for (see the module's documentation).
const FOLD_MIN: usize = 1024;

/// 128 bits of blake3: a key's stand-in in memory (keys must not collide with each other).
fn hash128(bytes: &[u8]) -> u128 {
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

/// Where an index was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The stored snapshot (and the journal after it).
    Snapshot,
    /// The per-key records of an older state directory, now moved into a snapshot.
    LegacyIndex,
    /// Nothing stored yet but, maybe, the journal.
    Empty,
}

impl Origin {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Origin::Snapshot => "snapshot",
            Origin::LegacyIndex => "per-key index records (moved into a snapshot)",
            Origin::Empty => "nothing stored",
        }
    }
}

pub(super) struct Digest {
    entries: HashMap<u128, KnownEntry>,
    /// Keys added to or removed from the index since the snapshot: an added key's name,
    /// `None` for a removed one. With the snapshot's names, the names of the index.
    names: HashMap<u128, Option<Box<str>>>,
    snapshot: Snapshot,
    /// The stored snapshot's header; `None` while none is stored.
    header: Option<SnapshotHeader>,
    journal: Journal,
    /// Position of the journal's last record.
    last: u64,
    /// Changes journaled after the snapshot.
    journaled: usize,
    /// The state's name of the pipeline, for errors.
    pipeline: String,
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
    /// Reads the index of `pipeline` as [`Digest::open`] does, writing nothing: an older
    /// state directory's per-key index is read, not moved (for `verify` and dry runs,
    /// which only read).
    pub(super) fn peek(state: &State, pipeline: &str) -> Result<Digest, StateError> {
        Digest::open(state, pipeline, false).map(|(digest, _)| digest)
    }

    /// Reads the index of `pipeline`: the stored snapshot and the journal after it, and
    /// says where it came from. With `write`, an older state directory's per-key index is
    /// moved into a snapshot first; without (a dry run), it is read where it is.
    pub(super) fn open(
        state: &State,
        pipeline: &str,
        write: bool,
    ) -> Result<(Digest, Origin), StateError> {
        let mut digest = Digest {
            entries: HashMap::new(),
            names: HashMap::new(),
            snapshot: state.index_snapshot(pipeline)?,
            header: None,
            journal: state.index_journal(pipeline)?,
            last: 0,
            journaled: 0,
            pipeline: pipeline.to_owned(),
        };
        digest.header = digest.snapshot.header()?;
        let origin = match (digest.header, state.legacy_index(pipeline)?) {
            (Some(header), legacy) => {
                let part = digest.snapshot.part(&header, DIGEST)?;
                digest.entries = decode(&part).ok_or_else(|| {
                    digest.unreadable("index-digest", "its digest does not decode")
                })?;
                if legacy.is_some() && write {
                    // A crash came between storing the snapshot and dropping the records.
                    state.drop_legacy_index(pipeline)?;
                }
                Origin::Snapshot
            }
            (None, Some(legacy)) if write => {
                digest.migrate(&legacy)?;
                state.drop_legacy_index(pipeline)?;
                Origin::LegacyIndex
            }
            (None, Some(legacy)) => {
                // Read where it is; its names kept beside the digest, for the deletes a
                // dry run finds.
                let names = digest.read_legacy(&legacy)?.finish();
                for name in decode_names(&names).into_iter().flatten() {
                    let key = hash128(name.as_bytes());
                    digest.names.insert(key, Some(name.into()));
                }
                Origin::LegacyIndex
            }
            (None, None) => Origin::Empty,
        };
        let from = digest.header.map_or(0, |h| h.position);
        digest.last = from;
        let records: Vec<_> = digest.journal.after(from).collect::<Result<_, _>>()?;
        for (position, record) in records {
            let changes = digest
                .replay(&record)
                .ok_or_else(|| digest.unreadable("index-journal", "a record does not decode"))?;
            digest.journaled += changes;
            digest.last = position;
        }
        Ok((digest, origin))
    }

    fn unreadable(&self, tree: &str, reason: &str) -> StateError {
        StateError::Unreadable {
            key: format!("{tree}/{}", self.pipeline),
            reason: reason.to_owned(),
        }
    }

    /// Reads every record of an older state directory's per-key index and stores them as
    /// the snapshot.
    fn migrate(&mut self, legacy: &crate::state::Records<IndexEntry>) -> Result<(), StateError> {
        let names = self.read_legacy(legacy)?;
        self.last = self.journal.last()?;
        self.header = Some(
            self.snapshot
                .put(self.last, [&encode(&self.entries), &names.finish()])?,
        );
        Ok(())
    }

    /// Reads every record of an older state directory's per-key index into the digest;
    /// returns their names.
    fn read_legacy(
        &mut self,
        legacy: &crate::state::Records<IndexEntry>,
    ) -> Result<NamesPart, StateError> {
        let mut names = NamesPart::default();
        legacy.for_each_raw(|identity, value| {
            let entry: Hashed =
                serde_json::from_slice(value).map_err(|source| StateError::Corrupt {
                    key: String::from_utf8_lossy(identity).into_owned(),
                    source,
                })?;
            let name = std::str::from_utf8(identity).map_err(|_| StateError::Unreadable {
                key: String::from_utf8_lossy(identity).into_owned(),
                reason: "an index key is not UTF-8".into(),
            })?;
            self.entries.insert(
                hash128(identity),
                KnownEntry::new(&entry.version, entry.fingerprint.as_deref(), false),
            );
            names.push(name);
            Ok(())
        })?;
        Ok(names)
    }

    /// Indexed keys.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The indexed version of `identity`, if it is indexed.
    pub(super) fn version_of(&self, identity: &str) -> Option<PreviousVersion> {
        self.entries
            .get(&hash128(identity.as_bytes()))
            .map(|known| PreviousVersion(known.version))
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

    /// Takes back [`Digest::see`] for `identity`: the entry vanished before it was read,
    /// so it is absent from this scan after all.
    pub(super) fn unsee(&mut self, identity: &str) {
        if let Some(known) = self.entries.get_mut(&hash128(identity.as_bytes())) {
            known.seen = false;
        }
    }

    /// Records index changes the scan made (puts of entries it listed, and removes) in
    /// the journal, atomically, and in the digest.
    pub(super) fn apply(
        &mut self,
        changes: &[(&str, Option<&IndexEntry>)],
    ) -> Result<(), StateError> {
        self.record(changes, true, true)
    }

    /// Records index changes that events in the log hold and the index missed (see
    /// `Scanner::catch_up`), before the listing is diffed: a put is not seen yet, so an
    /// item the source no longer has is deleted by this scan. With `write` they are
    /// journaled; without (a dry run) kept in memory only.
    pub(super) fn catch_up(
        &mut self,
        changes: &[(&str, Option<&IndexEntry>)],
        write: bool,
    ) -> Result<(), StateError> {
        self.record(changes, false, write)
    }

    fn record(
        &mut self,
        changes: &[(&str, Option<&IndexEntry>)],
        seen: bool,
        write: bool,
    ) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        if write {
            let records = encode_changes(changes);
            self.journal.append(self.last + 1, &records)?;
            self.last += records.len() as u64;
            self.journaled += changes.len();
        }
        for (identity, entry) in changes {
            let known = entry.map(|e| KnownEntry::new(&e.version, e.fingerprint.as_deref(), seen));
            self.change(hash128(identity.as_bytes()), identity, known);
        }
        Ok(())
    }

    /// One index change, in memory.
    fn change(&mut self, key: u128, identity: &str, known: Option<KnownEntry>) {
        match known {
            Some(known) => {
                if self.entries.insert(key, known).is_none() {
                    self.names.insert(key, Some(identity.into()));
                }
            }
            None => {
                if self.entries.remove(&key).is_some() {
                    self.names.insert(key, None);
                }
            }
        }
    }

    /// Applies one journal record; the number of changes it held, `None` when it does not
    /// decode.
    fn replay(&mut self, record: &[u8]) -> Option<usize> {
        let mut rest = record.strip_prefix(JOURNAL_TAG.as_slice())?;
        let mut changes = 0;
        while let Some((&kind, tail)) = rest.split_first() {
            let (len, tail) = tail.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            let identity = std::str::from_utf8(tail.get(..len)?).ok()?;
            let mut tail = &tail[len..];
            let mut next_u64 = || {
                let (v, t) = tail.split_first_chunk::<8>()?;
                tail = t;
                Some(u64::from_le_bytes(*v))
            };
            let known = match kind {
                0 => None,
                1 | 2 => {
                    let fingerprint = if kind == 2 { Some(next_u64()?) } else { None };
                    Some(KnownEntry {
                        fingerprint,
                        version: next_u64()?,
                        seen: false,
                    })
                }
                _ => return None,
            };
            rest = tail;
            self.change(hash128(identity.as_bytes()), identity, known);
            changes += 1;
        }
        Some(changes)
    }

    /// Hashes of the indexed keys the listing did not show.
    pub(super) fn unseen(&self) -> HashSet<u128> {
        self.entries
            .iter()
            .filter(|(_, k)| !k.seen)
            .map(|(h, _)| *h)
            .collect()
    }

    /// Names of the indexed keys among `keys` (hashes, as [`Digest::unseen`] gives them).
    /// A key whose name is not stored (never, unless the state was damaged) is left out
    /// with a warning: without its name it cannot be deleted, and no delete is better than
    /// a wrong one.
    pub(super) fn names_of(&self, keys: &HashSet<u128>) -> Result<Vec<String>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = Vec::with_capacity(keys.len());
        self.for_each_name(|key, name| {
            if keys.contains(&key) {
                found.push(name.to_owned());
            }
        })?;
        if found.len() < keys.len() {
            warn!(
                pipeline = %self.pipeline,
                missing = keys.len() - found.len(),
                "the index holds keys whose names are not stored; they are not deleted"
            );
        }
        Ok(found)
    }

    /// Calls `f` with every indexed key's hash and name.
    fn for_each_name(&self, mut f: impl FnMut(u128, &str)) -> Result<(), StateError> {
        if let Some(header) = &self.header {
            let part = self.snapshot.part(header, NAMES)?;
            let names = decode_names(&part)
                .ok_or_else(|| self.unreadable("index-digest", "its names do not decode"))?;
            for name in names {
                let key = hash128(name.as_bytes());
                if !self.names.contains_key(&key) {
                    f(key, name);
                }
            }
        }
        for (key, name) in &self.names {
            if let Some(name) = name {
                f(*key, name);
            }
        }
        Ok(())
    }

    /// Ends a scan: folds the journal into a new snapshot when it holds more than an
    /// eighth of the index (at least [`FOLD_MIN`] changes), or when no snapshot is stored.
    pub(super) fn store(&mut self) -> Result<(), StateError> {
        let fold_at = (self.entries.len() / 8).max(FOLD_MIN);
        let due = match self.header {
            Some(_) => self.journaled > fold_at,
            None => self.journaled > 0,
        };
        if !due {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut names = NamesPart::default();
        self.for_each_name(|_, name| names.push(name))?;
        let header = self
            .snapshot
            .put(self.last, [&encode(&self.entries), &names.finish()])?;
        self.journal.remove_through(self.last)?;
        self.header = Some(header);
        debug!(
            pipeline = %self.pipeline,
            keys = self.entries.len(),
            folded = self.journaled,
            seconds = started.elapsed().as_secs_f64(),
            "index journal folded into a new snapshot"
        );
        self.names.clear();
        self.journaled = 0;
        Ok(())
    }
}

/// A names part being written.
struct NamesPart {
    bytes: Vec<u8>,
    count: u64,
}

impl Default for NamesPart {
    fn default() -> NamesPart {
        let mut bytes = NAMES_TAG.to_vec();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        NamesPart { bytes, count: 0 }
    }
}

impl NamesPart {
    fn push(&mut self, name: &str) {
        let len = u32::try_from(name.len()).expect("a key under 4 GiB");
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.count += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes[NAMES_TAG.len()..NAMES_TAG.len() + 8].copy_from_slice(&self.count.to_le_bytes());
        self.bytes
    }
}

fn decode_names(bytes: &[u8]) -> Option<Vec<&str>> {
    let body = bytes.strip_prefix(NAMES_TAG.as_slice())?;
    let (count, mut rest) = body.split_first_chunk::<8>()?;
    let count = usize::try_from(u64::from_le_bytes(*count)).ok()?;
    let mut names = Vec::with_capacity(count.min(rest.len() / 4));
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        names.push(std::str::from_utf8(tail.get(..len)?).ok()?);
        rest = &tail[len..];
    }
    rest.is_empty().then_some(names)
}

/// Journal records for `changes`, each at most [`CHUNK_BYTES`] unless one change is larger.
fn encode_changes(changes: &[(&str, Option<&IndexEntry>)]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut record = JOURNAL_TAG.to_vec();
    for (identity, entry) in changes {
        let len = 1 + 4 + identity.len() + 16;
        if record.len() > JOURNAL_TAG.len() && record.len() + len > CHUNK_BYTES {
            records.push(std::mem::replace(&mut record, JOURNAL_TAG.to_vec()));
        }
        let kind: u8 = match entry {
            None => 0,
            Some(e) if e.fingerprint.is_none() => 1,
            Some(_) => 2,
        };
        record.push(kind);
        let n = u32::try_from(identity.len()).expect("a key under 4 GiB");
        record.extend_from_slice(&n.to_le_bytes());
        record.extend_from_slice(identity.as_bytes());
        if let Some(e) = entry {
            if let Some(fp) = &e.fingerprint {
                record.extend_from_slice(&hash64(fp).to_le_bytes());
            }
            record.extend_from_slice(&hash64(&e.version).to_le_bytes());
        }
    }
    if record.len() > JOURNAL_TAG.len() {
        records.push(record);
    }
    records
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

    fn entry(version: &str, fingerprint: Option<&str>) -> IndexEntry {
        IndexEntry {
            version: version.into(),
            fingerprint: fingerprint.map(str::to_owned),
        }
    }

    fn load(state: &State) -> (Digest, Origin) {
        Digest::open(state, "p", true).unwrap()
    }

    fn changed_from(seen: Seen, version: &str) -> bool {
        matches!(seen, Seen::Changed(previous) if previous.is(version))
    }

    /// Names of the keys the listing did not show, sorted.
    fn unseen_names(digest: &Digest) -> Vec<String> {
        let mut names = digest.names_of(&digest.unseen()).unwrap();
        names.sort();
        names
    }

    #[test]
    fn an_index_is_read_back_from_its_snapshot_and_journal() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (a, b) = (entry("v1", Some("1:2:3")), entry("v2", None));
        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::Empty);
        digest.apply(&[("a", Some(&a)), ("b", Some(&b))]).unwrap();
        digest.store().unwrap();

        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::Snapshot);
        assert_eq!(digest.len(), 2);
        assert_eq!(digest.see("a", Some("1:2:3")), Seen::Unchanged);
        assert!(changed_from(digest.see("a", Some("1:2:4")), "v1"));
        assert!(changed_from(digest.see("b", Some("1:2:3")), "v2"));
        assert!(!changed_from(digest.see("b", None), "v1"));
        assert_eq!(digest.see("c", Some("1:2:3")), Seen::New);
        assert!(digest.unseen().is_empty());

        // A scan changes `a`, adds `c`, removes `b` and "crashes" before it ends: what it
        // journaled is the index the next scan reads.
        let c = entry("v3", Some("4:5:6"));
        digest
            .apply(&[("a", Some(&entry("v9", Some("9:9:9")))), ("c", Some(&c))])
            .unwrap();
        digest.apply(&[("b", None)]).unwrap();
        drop(digest);
        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::Snapshot);
        assert_eq!(digest.len(), 2);
        assert_eq!(digest.see("a", Some("9:9:9")), Seen::Unchanged);
        assert_eq!(digest.see("b", None), Seen::New);
        assert_eq!(unseen_names(&digest), ["c"]);
    }

    #[test]
    fn a_crash_between_a_fold_and_the_journal_removal_replays_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (mut digest, _) = load(&state);
        let v = entry("v1", Some("1:1:1"));
        digest.apply(&[("a", Some(&v)), ("b", Some(&v))]).unwrap();
        digest.store().unwrap();
        let (mut digest, _) = load(&state);
        digest.apply(&[("a", None), ("c", Some(&v))]).unwrap();

        // The fold's snapshot is stored, and the "crash" comes before the journal records
        // it includes are removed.
        let mut names = NamesPart::default();
        digest.for_each_name(|_, name| names.push(name)).unwrap();
        let last = digest.last;
        digest
            .snapshot
            .put(last, [&encode(&digest.entries), &names.finish()])
            .unwrap();
        drop(digest);
        assert!(state.index_journal("p").unwrap().after(0).count() > 0);

        let (digest, origin) = load(&state);
        assert_eq!(origin, Origin::Snapshot);
        assert_eq!(
            digest.journaled, 0,
            "records the snapshot includes are skipped"
        );
        assert_eq!(digest.len(), 2);
        assert_eq!(unseen_names(&digest), ["b", "c"]);
    }

    #[test]
    fn a_fold_keeps_the_names_of_the_index_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (mut digest, _) = load(&state);
        let names: Vec<String> = (0..3000).map(|i| format!("dir/file-{i}")).collect();
        let v = entry("v1", Some("1:1:1"));
        let puts: Vec<_> = names.iter().map(|n| (n.as_str(), Some(&v))).collect();
        digest.apply(&puts).unwrap();
        digest.store().unwrap();
        assert_eq!(state.index_journal("p").unwrap().after(0).count(), 0);

        // Below the fold threshold the changes stay journaled.
        let (mut digest, _) = load(&state);
        digest
            .apply(&[("dir/file-7", None), ("new", Some(&v))])
            .unwrap();
        digest.store().unwrap();
        assert!(state.index_journal("p").unwrap().after(0).count() > 0);

        // Past it they are folded, and the names still describe the index.
        let (mut digest, _) = load(&state);
        let removes: Vec<_> = names[100..1200]
            .iter()
            .map(|n| (n.as_str(), None))
            .collect();
        digest.apply(&removes).unwrap();
        digest.apply(&[("dir/file-7", Some(&v))]).unwrap();
        digest.store().unwrap();
        assert_eq!(state.index_journal("p").unwrap().after(0).count(), 0);

        let (mut digest, _) = load(&state);
        assert_eq!(digest.len(), 3000 - 1100 + 1);
        digest.see("dir/file-0", Some("1:1:1"));
        let mut expected: Vec<String> = names[1..100]
            .iter()
            .chain(&names[1200..])
            .cloned()
            .collect();
        expected.push("new".into());
        expected.sort();
        assert_eq!(unseen_names(&digest), expected);
    }

    #[test]
    fn a_legacy_per_key_index_is_moved_into_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state
            .legacy_index_for_tests("p")
            .apply([
                ("a", Some(&entry("v1", Some("1:2:3")))),
                ("b", Some(&entry("v2", None))),
            ])
            .unwrap();

        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::LegacyIndex);
        assert!(state.legacy_index("p").unwrap().is_none());
        assert_eq!(digest.see("a", Some("1:2:3")), Seen::Unchanged);
        drop(digest);

        let (mut digest, origin) = load(&state);
        assert_eq!(origin, Origin::Snapshot);
        assert_eq!(digest.see("a", Some("1:2:3")), Seen::Unchanged);
        assert!(changed_from(digest.see("b", None), "v2"));
        assert_eq!(unseen_names(&digest), Vec::<String>::new());
        let (digest, _) = load(&state);
        assert_eq!(unseen_names(&digest), ["a", "b"]);
    }

    /// `verify` reads the index through `peek`: an older per-key index is read, and left
    /// where it is for the next scan to move.
    #[test]
    fn a_peek_reads_a_legacy_index_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state
            .legacy_index_for_tests("p")
            .apply([("a", Some(&entry("v1", Some("1:2:3"))))])
            .unwrap();
        let digest = Digest::peek(&state, "p").unwrap();
        assert!(digest.version_of("a").is_some_and(|v| v.is("v1")));
        assert!(digest.version_of("b").is_none());
        assert!(state.legacy_index("p").unwrap().is_some());
        assert!(state
            .index_snapshot("p")
            .unwrap()
            .header()
            .unwrap()
            .is_none());
        let (_, origin) = load(&state);
        assert_eq!(origin, Origin::LegacyIndex);
    }

    #[test]
    fn a_journal_record_that_does_not_decode_is_an_error_naming_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let journal = state.index_journal("p").unwrap();
        journal.append(1, &[b"tmjrnl-1\x07".to_vec()]).unwrap();
        let err = Digest::open(&state, "p", true).err().unwrap().to_string();
        assert!(err.contains("index-journal/p"), "{err}");
    }

    #[test]
    fn journal_records_stay_under_the_chunk_size_and_decode_back() {
        let names: Vec<String> = (0..500)
            .map(|i| format!("a/long/directory/name/{i}"))
            .collect();
        let v = entry("v1", Some("1:2:3"));
        let changes: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), (i % 3 != 0).then_some(&v)))
            .collect();
        let records = encode_changes(&changes);
        assert!(records.len() > 1);
        assert!(records.iter().all(|r| r.len() <= CHUNK_BYTES));
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (mut digest, _) = load(&state);
        let replayed: usize = records.iter().map(|r| digest.replay(r).unwrap()).sum();
        assert_eq!(replayed, 500);
        assert_eq!(digest.len(), 500 - 167);
    }

    #[test]
    fn a_value_that_does_not_decode_is_rejected() {
        assert!(decode(b"").is_none());
        assert!(decode(b"tmdgst-1\x01\0\0\0\0\0\0\0short").is_none());
        assert!(decode(b"tmdgst99\0\0\0\0\0\0\0\0").is_none());
        let mut entries = HashMap::new();
        entries.insert(7, KnownEntry::new("v1", Some("1:2:3"), true));
        let mut bytes = encode(&entries);
        assert_eq!(decode(&bytes).map(|e| e.len()), Some(1));
        bytes[TAG.len() + 8 + 16] = 2;
        assert!(decode(&bytes).is_none());

        let mut names = NamesPart::default();
        names.push("x");
        let mut bytes = names.finish();
        assert_eq!(decode_names(&bytes), Some(vec!["x"]));
        bytes.push(0);
        assert_eq!(decode_names(&bytes), None);
    }
}
