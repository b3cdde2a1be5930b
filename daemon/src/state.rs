//! Local state in one sled database: the scanner's source index, the projector's applied
//! state, failures, id remap table, deferred events and pending directory deletes, and the
//! last scan record of each pipeline.
//!
//! One database holds everything a pipeline needs, so one `flush` makes a whole batch
//! durable. sled lets only one process open it: a second `tidemark` on the same
//! `state_dir` gets [`StateError::Locked`].

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::progress::Progress;

/// Local state could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The state directory could not be created or opened.
    #[error("cannot open state directory {}: {source}", path.display())]
    Open {
        /// The state directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the database.
    #[error("state directory {} is in use by another tidemark process (is the daemon running? `tidemark status` asks it over HTTP)", path.display())]
    Locked {
        /// The state directory.
        path: PathBuf,
    },
    /// A read or write failed.
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    /// A stored record could not be decoded.
    #[error("state record `{key}` is corrupt: {source}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// What the scanner last saw of a source item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Checksum and mode ([`tidemark_proto::content_version`]) of the last appended upsert.
    pub version: String,
    /// The source's cheap change token (size, mtime, inode); an equal token skips hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What the projector last applied for an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// Content version applied; an event with the same version is skipped.
    pub version: String,
    /// Offset of the event that applied it.
    pub offset: u64,
    /// Id the target gave the item, for targets that assign ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
}

/// An event waiting for the items it references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deferred {
    /// The event, as read from the log.
    pub event: tidemark_proto::Event,
    /// When it was first deferred; after the target's reference wait it fails.
    pub since: DateTime<Utc>,
    /// Written without its unresolved reference fields to break a cycle; patched once
    /// they resolve.
    #[serde(default)]
    pub partial: bool,
}

/// A directory delete not applied yet because the directory was not empty (the deletes of
/// its contents had not all been applied: on a log of several partitions they are not
/// ordered with it). Re-attempted after later batches until the directory is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingDelete {
    /// The delete event, as read from the log.
    pub event: tidemark_proto::Event,
    /// When it was first found not empty.
    pub since: DateTime<Utc>,
}

/// A failed event kept for `status` until the key changes again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Kind of the item.
    pub kind: String,
    /// Key of the item.
    pub key: String,
    /// Offset of the failed event.
    pub offset: u64,
    /// What went wrong (secrets redacted).
    pub reason: String,
    /// When it failed.
    pub at: DateTime<Utc>,
}

/// The delete guard's decision on one scan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardTrip {
    /// Deletes the scan would have emitted.
    pub would_delete: u64,
    /// Deletes the limit allowed.
    pub allowed: u64,
    /// The configured limit, as written.
    pub limit: String,
}

/// Summary of one scan, kept for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanRecord {
    /// Scan id (also in every event it produced).
    pub id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration_secs: f64,
    /// Items listed.
    pub listed: u64,
    /// Upserts appended.
    pub upserts: u64,
    /// Deletes appended.
    pub deletes: u64,
    /// Entries that could not be listed or read.
    pub errors: u64,
    /// Entries skipped on purpose (special files).
    pub skipped: u64,
    /// `ok`, `degraded` (some entries failed; no deletes) or `failed`.
    pub result: String,
    /// Set when the delete guard withheld this scan's deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardTrip>,
    /// When the last complete, error-free scan finished (this one or an earlier one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<DateTime<Utc>>,
    /// First error met, for people reading `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The local state database.
#[derive(Clone)]
pub struct State {
    db: sled::Db,
    path: PathBuf,
}

impl State {
    /// Opens (creating with owner-only permissions) the state directory.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        let open_err = |source| StateError::Open {
            path: dir.to_owned(),
            source,
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(open_err)?;
        }
        finish_interrupted_compaction(dir).map_err(open_err)?;
        match sled::Config::new().path(dir.join(DB)).open() {
            Ok(db) => Ok(State {
                db,
                path: dir.to_owned(),
            }),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                Err(StateError::Locked {
                    path: dir.to_owned(),
                })
            }
            Err(sled::Error::Io(e)) => Err(open_err(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying database, for the sled event log.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The scanner's index of a pipeline's source.
    pub fn index(&self, pipeline: &str) -> Result<Records<IndexEntry>, StateError> {
        self.records(&format!("index/{pipeline}"))
    }

    /// The projector's applied state for a pipeline.
    pub fn applied(&self, pipeline: &str) -> Result<Records<Applied>, StateError> {
        self.records(&format!("applied/{pipeline}"))
    }

    /// Events that failed permanently and block their key until it changes.
    pub fn failures(&self, pipeline: &str) -> Result<Records<Failure>, StateError> {
        self.records(&format!("failed/{pipeline}"))
    }

    /// The id remap table: item identity (kind, source key) → target id, for targets that
    /// assign ids. Kept apart from applied state so a `replay` adopts instead of creating
    /// duplicates.
    pub fn remap(&self, pipeline: &str) -> Result<Records<String>, StateError> {
        self.records(&format!("remap/{pipeline}"))
    }

    /// Events waiting for the items they reference, by item identity; the committed
    /// offset may pass them, so they are kept here until applied, superseded or failed.
    pub fn deferred(&self, pipeline: &str) -> Result<Records<Deferred>, StateError> {
        self.records(&format!("deferred/{pipeline}"))
    }

    /// Directory deletes waiting for the directory to be empty, by item identity; the
    /// committed offset may pass them, so they are kept here until applied or superseded.
    pub fn dir_deletes(&self, pipeline: &str) -> Result<Records<PendingDelete>, StateError> {
        self.records(&format!("dir-deletes/{pipeline}"))
    }

    /// The stored digest of a pipeline's index: what the scanner keeps of the index in
    /// memory, written after a scan so the next one reads one value instead of the whole
    /// index. [`Records::apply_clearing`] removes it together with the index change that
    /// makes it stale.
    pub fn index_digest(&self, pipeline: &str) -> Result<Snapshot, StateError> {
        Ok(Snapshot {
            tree: self.db.open_tree(format!("index-digest/{pipeline}"))?,
        })
    }

    /// Last scan record of each pipeline, keyed by pipeline name.
    pub fn scans(&self) -> Result<Records<ScanRecord>, StateError> {
        self.records("scans")
    }

    fn records<T>(&self, tree: &str) -> Result<Records<T>, StateError> {
        Ok(Records {
            tree: self.db.open_tree(tree)?,
            _t: std::marker::PhantomData,
        })
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StateError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StateError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Rewrites the database of `dir` into a new one holding exactly the same records,
    /// and puts it in place of the old one. sled 0.34 reclaims the space of rewritten
    /// pages lazily, and with a log that only grows it hardly does: on 10k files, 80
    /// re-syncs of 100 changed files each left 78 MB on disk for about 10 MB of records
    /// (and growing); the rewrite took 0.4 s and left 23 MB. Needs the database to itself
    /// (no daemon running). `progress` counts the records copied.
    pub fn compact(dir: &Path, progress: &Progress) -> Result<Compacted, StateError> {
        let io_err = |source| StateError::Open {
            path: dir.to_owned(),
            source,
        };
        let old = State::open(dir)?;
        let before = old.size_on_disk()?;
        // Holding the old database's lock, no other compaction is writing this one.
        let fresh = dir.join(DB_COMPACTING);
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh).map_err(io_err)?;
        }
        let new = sled::Config::new().path(&fresh).open()?;
        let mut records = 0;
        for name in old.db.tree_names() {
            let (from, to) = (old.db.open_tree(&name)?, new.open_tree(&name)?);
            let mut batch = sled::Batch::default();
            let mut pending = 0;
            for kv in from.iter() {
                let (k, v) = kv?;
                progress.add_bytes((k.len() + v.len()) as u64);
                batch.insert(k, v);
                pending += 1;
                if pending == 1000 {
                    to.apply_batch(std::mem::take(&mut batch))?;
                    progress.inc(pending);
                    records += pending;
                    pending = 0;
                }
            }
            to.apply_batch(batch)?;
            progress.inc(pending);
            records += pending;
        }
        new.flush()?;
        let after = new.size_on_disk()?;
        drop(new);
        // Swapped while the old database is still open and locked, so no tidemark opens
        // it in between; a crash between the two renames is finished by the next open.
        let (current, retired) = (dir.join(DB), dir.join(DB_RETIRED));
        std::fs::rename(&current, &retired).map_err(io_err)?;
        std::fs::rename(&fresh, &current).map_err(io_err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        drop(old);
        // A tidemark that opened the new database meanwhile may have removed the old one.
        match std::fs::remove_dir_all(&retired) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(e)),
            _ => {}
        }
        Ok(Compacted {
            records,
            before,
            after,
        })
    }
}

/// The sled database's directory in a state directory.
const DB: &str = "db";
/// A compaction's new database while it is written.
const DB_COMPACTING: &str = "db.compacting";
/// The database a compaction replaced, until it is removed.
const DB_RETIRED: &str = "db.old";

/// What [`State::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Compacted {
    /// Records copied (every tree, the log included).
    pub records: u64,
    /// Bytes on disk before.
    pub before: u64,
    /// Bytes on disk after.
    pub after: u64,
}

/// Finishes a compaction a crash interrupted while it swapped the databases: with the old
/// one moved aside and the new one not yet in place, the old one goes back; with both in
/// place, the old one is removed. A half-written new one is removed by the next
/// compaction.
fn finish_interrupted_compaction(dir: &Path) -> std::io::Result<()> {
    let (current, retired) = (dir.join(DB), dir.join(DB_RETIRED));
    if !retired.exists() {
        return Ok(());
    }
    if current.exists() {
        std::fs::remove_dir_all(&retired)
    } else {
        std::fs::rename(&retired, &current)
    }
}

/// One stored value derived from a tree of records (see [`State::index_digest`]), kept in
/// its own tree as chunks of at most [`crate::log::sled::CHUNK_BYTES`]: sled 0.34 writes a
/// larger page to a blob file its `flush` does not fsync, and a digest of 100k keys is
/// 3.3 MB. A header records the chunk count; [`Records::apply_clearing`] removes the
/// header, which is enough to make the stored value absent.
pub struct Snapshot {
    tree: sled::Tree,
}

impl Snapshot {
    /// Key of the header: the chunk count, u32 big-endian. Chunks are keyed `c` and their
    /// index, u32 big-endian.
    const HEADER: &'static [u8] = b"n";

    fn chunk_key(i: u32) -> [u8; 5] {
        let [a, b, c, d] = i.to_be_bytes();
        [b'c', a, b, c, d]
    }

    /// The stored bytes, if a snapshot is stored.
    pub fn get(&self) -> Result<Option<Vec<u8>>, StateError> {
        let Some(header) = self.tree.get(Self::HEADER)? else {
            return Ok(None);
        };
        let Ok(count) = <[u8; 4]>::try_from(header.as_ref()).map(u32::from_be_bytes) else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        for i in 0..count {
            match self.tree.get(Self::chunk_key(i))? {
                Some(chunk) => bytes.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
        Ok(Some(bytes))
    }

    /// Stores `bytes` as the snapshot, atomically.
    pub fn put(&self, bytes: &[u8]) -> Result<(), StateError> {
        let chunks = bytes.chunks(crate::log::sled::CHUNK_BYTES);
        let count = u32::try_from(chunks.len()).expect("a snapshot under 24 TiB");
        let mut batch = sled::Batch::default();
        for (i, chunk) in (0..).zip(chunks) {
            batch.insert(&Self::chunk_key(i), chunk);
        }
        for old in self
            .tree
            .range(Self::chunk_key(count)..Self::chunk_key(u32::MAX))
        {
            batch.remove(old?.0);
        }
        batch.insert(Self::HEADER, &count.to_be_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }
}

/// A sled tree of JSON records keyed by item identity (or pipeline name).
pub struct Records<T> {
    tree: sled::Tree,
    _t: std::marker::PhantomData<T>,
}

impl<T> Clone for Records<T> {
    fn clone(&self) -> Self {
        Records {
            tree: self.tree.clone(),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Records<T> {
    /// The record under `key`.
    pub fn get(&self, key: &str) -> Result<Option<T>, StateError> {
        match self.tree.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StateError::Corrupt {
                        key: key.to_owned(),
                        source,
                    })
            }
        }
    }

    /// Whether a record exists under `key`.
    pub fn contains(&self, key: &str) -> Result<bool, StateError> {
        Ok(self.tree.contains_key(key)?)
    }

    /// Writes one record.
    pub fn put(&self, key: &str, value: &T) -> Result<(), StateError> {
        self.tree.insert(
            key,
            serde_json::to_vec(value).expect("state records serialize"),
        )?;
        Ok(())
    }

    /// Removes one record.
    pub fn remove(&self, key: &str) -> Result<(), StateError> {
        self.tree.remove(key)?;
        Ok(())
    }

    /// Applies puts (`Some`) and removes (`None`) atomically.
    pub fn apply<'a>(
        &self,
        changes: impl IntoIterator<Item = (&'a str, Option<&'a T>)>,
    ) -> Result<(), StateError>
    where
        T: 'a,
    {
        self.tree.apply_batch(Self::batch(changes))?;
        Ok(())
    }

    /// Like [`Records::apply`], and removes `snapshot` in the same transaction: a crash
    /// can never leave the changes without the removal, so a snapshot that is still
    /// stored describes the records as they are.
    pub fn apply_clearing<'a>(
        &self,
        changes: impl IntoIterator<Item = (&'a str, Option<&'a T>)>,
        snapshot: &Snapshot,
    ) -> Result<(), StateError>
    where
        T: 'a,
    {
        use sled::Transactional;
        let batch = Self::batch(changes);
        (&self.tree, &snapshot.tree)
            .transaction(|(records, snap)| {
                records.apply_batch(&batch)?;
                snap.remove(Snapshot::HEADER)?;
                Ok(())
            })
            .map_err(
                |e: sled::transaction::TransactionError<std::convert::Infallible>| match e {
                    sled::transaction::TransactionError::Storage(e) => StateError::Db(e),
                    sled::transaction::TransactionError::Abort(never) => match never {},
                },
            )?;
        Ok(())
    }

    fn batch<'a>(changes: impl IntoIterator<Item = (&'a str, Option<&'a T>)>) -> sled::Batch
    where
        T: 'a,
    {
        let mut batch = sled::Batch::default();
        for (key, value) in changes {
            match value {
                Some(v) => {
                    batch.insert(key, serde_json::to_vec(v).expect("state records serialize"))
                }
                None => batch.remove(key),
            }
        }
        batch
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Every record, in key order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(String, T), StateError>> + '_ {
        self.tree.iter().map(|r| {
            let (k, v) = r?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = serde_json::from_slice(&v).map_err(|source| StateError::Corrupt {
                key: key.clone(),
                source,
            })?;
            Ok((key, value))
        })
    }

    /// Calls `f` with every key and stored value as bytes, in key order, without decoding
    /// or copying them (for passes over large trees).
    pub fn for_each_raw(
        &self,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        for r in self.tree.iter() {
            let (k, v) = r?;
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = Result<String, StateError>> + '_ {
        self.tree
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
    }

    /// Removes every record for which `doomed(key, record)` holds, atomically; returns
    /// how many were removed.
    pub fn remove_where(&self, doomed: impl Fn(&str, &T) -> bool) -> Result<usize, StateError> {
        let mut keys = Vec::new();
        for record in self.iter() {
            let (key, value) = record?;
            if doomed(&key, &value) {
                keys.push(key);
            }
        }
        self.apply(keys.iter().map(|k| (k.as_str(), None)))?;
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` once the previous handle's sled threads have let go of the lock on `dir`
    /// (they finish shortly after the handle is dropped).
    fn once_released<T>(dir: &Path, f: impl Fn() -> Result<T, StateError>) -> T {
        for _ in 0..100 {
            match f() {
                Err(StateError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed locked", dir.display())
    }

    fn reopen(dir: &Path) -> State {
        once_released(dir, || State::open(dir))
    }

    fn entry(version: &str) -> IndexEntry {
        IndexEntry {
            version: version.into(),
            fingerprint: None,
        }
    }

    #[test]
    fn compaction_keeps_every_record_of_every_tree() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = State::open(dir.path()).unwrap();
            let index = state.index("p").unwrap();
            for round in 0..20 {
                for k in 0..500 {
                    index
                        .put(&format!("k{k}"), &entry(&format!("v{round}")))
                        .unwrap();
                }
            }
            state
                .applied("q")
                .unwrap()
                .put(
                    "a",
                    &Applied {
                        version: "x".into(),
                        offset: 7,
                        target_id: None,
                    },
                )
                .unwrap();
            state.db().flush().unwrap();
        }
        let done = once_released(dir.path(), || {
            State::compact(dir.path(), &Progress::hidden())
        });
        assert_eq!(done.records, 501);
        assert!(!dir.path().join(DB_COMPACTING).exists());
        assert!(!dir.path().join(DB_RETIRED).exists());
        let state = reopen(dir.path());
        let index = state.index("p").unwrap();
        assert_eq!(index.len(), 500);
        assert_eq!(index.get("k42").unwrap(), Some(entry("v19")));
        assert_eq!(
            state
                .applied("q")
                .unwrap()
                .get("a")
                .unwrap()
                .unwrap()
                .offset,
            7
        );
    }

    #[test]
    fn a_compaction_interrupted_between_its_renames_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = State::open(dir.path()).unwrap();
            state.index("p").unwrap().put("k", &entry("v")).unwrap();
            state.db().flush().unwrap();
        }
        // Crashed after moving the old database aside, before the new one was in place:
        // the old one comes back.
        std::fs::rename(dir.path().join(DB), dir.path().join(DB_RETIRED)).unwrap();
        {
            let state = reopen(dir.path());
            assert_eq!(
                state.index("p").unwrap().get("k").unwrap(),
                Some(entry("v"))
            );
        }
        assert!(!dir.path().join(DB_RETIRED).exists());
        // Crashed after putting the new one in place: the old one is removed.
        std::fs::create_dir(dir.path().join(DB_RETIRED)).unwrap();
        let state = reopen(dir.path());
        assert_eq!(
            state.index("p").unwrap().get("k").unwrap(),
            Some(entry("v"))
        );
        assert!(!dir.path().join(DB_RETIRED).exists());
    }

    #[test]
    fn a_snapshot_is_stored_in_chunks_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let snapshot = state.index_digest("p").unwrap();
        assert_eq!(snapshot.get().unwrap(), None);

        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        snapshot.put(&big).unwrap();
        assert_eq!(snapshot.get().unwrap().as_deref(), Some(big.as_slice()));
        assert!(
            snapshot
                .tree
                .iter()
                .values()
                .all(|v| v.unwrap().len() <= crate::log::sled::CHUNK_BYTES),
            "no value may reach sled's blob threshold"
        );

        // A smaller one leaves none of the bigger one's chunks behind.
        snapshot.put(b"small").unwrap();
        assert_eq!(
            snapshot.get().unwrap().as_deref(),
            Some(b"small".as_slice())
        );
        assert_eq!(snapshot.tree.len(), 2);

        let index = state.index("p").unwrap();
        let entry = IndexEntry {
            version: "v".into(),
            fingerprint: None,
        };
        index
            .apply_clearing([("k", Some(&entry))], &snapshot)
            .unwrap();
        assert_eq!(snapshot.get().unwrap(), None);
        assert_eq!(index.get("k").unwrap(), Some(entry));
    }
}
