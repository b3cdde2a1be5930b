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
    #[error("cannot open state directory {}: {}", path.display(), IoCause(source, None))]
    Open {
        /// The state directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the database.
    #[error("state directory {} is in use by {}", path.display(), in_use_by(holder.as_deref()))]
    Locked {
        /// The state directory.
        path: PathBuf,
        /// Which process holds it, when it said so ([`HOLDER`]); boxed so a `Result`
        /// stays small.
        holder: Option<Box<Holder>>,
    },
    /// A read or write failed.
    #[error("state database: {}", DbError(.0))]
    Db(sled::Error),
    /// A stored value is damaged: not in the format its reader knows.
    #[error("state value `{key}` is unreadable: {reason}")]
    Unreadable {
        /// Its key or tree.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored record could not be decoded.
    #[error("state record `{key}` is corrupt: {source}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// A noted directory source (`dir /path`) as its path alone, for advice about the path.
fn bare_path(source: &str) -> &str {
    source.strip_prefix("dir ").unwrap_or(source)
}

/// A pipeline's state is another pipeline's: what [`State::check_owner`] refuses. Nothing
/// is scanned, appended or applied then.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnerError {
    /// Both the source and the target differ from those the state was built on (boxed:
    /// a `Result` stays small).
    #[error("{0}")]
    Other(Box<OtherPipeline>),
    /// The source differs from the one the log was read from, which is still there.
    #[error("pipeline `{pipeline}`: the state directory {} holds pipeline `{pipeline}` read from {was}, which is still there, while this config's pipeline `{pipeline}` reads {now}; the log's events read their files from {was}. Nothing was scanned or applied. If {now_path} is this source's new home (a copy of {was_path} you have moved on to), move {was_path} away or remove it and run again: a source whose old path is gone is taken as moved, and the next scan reads every item again. If not, two configs likely share this state directory (`state` beside the config file is the default `state_dir` of every config there) and both name their pipeline `{pipeline}`, or pipelines were renamed: give this config its own `state_dir` (or its pipeline another name)", state_dir.display(), was_path = bare_path(was), now_path = bare_path(now))]
    SourceStillThere {
        /// The pipeline.
        pipeline: String,
        /// The state directory.
        state_dir: PathBuf,
        /// The source the state notes.
        was: String,
        /// The configured source.
        now: String,
    },
    /// The state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Another pipeline's state: what [`OwnerError::Other`] names.
#[derive(Debug)]
pub struct OtherPipeline {
    /// The pipeline.
    pub pipeline: String,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The source the state notes.
    pub source_was: String,
    /// The target the state notes.
    pub target_was: String,
    /// The configured source.
    pub source_now: String,
    /// The configured target.
    pub target_now: String,
}

impl std::fmt::Display for OtherPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, dir) = (&self.pipeline, self.state_dir.display());
        let (sw, tw, sn, tn) = (
            &self.source_was,
            &self.target_was,
            &self.source_now,
            &self.target_now,
        );
        write!(f, "pipeline `{p}`: the state directory {dir} holds pipeline `{p}` of another source and target: its log was read from {sw} and applied to {tw}, while this config's pipeline `{p}` reads {sn} into {tn}. Most likely two configs share this state directory (`state` beside the config file is the default `state_dir` of every config there) and both name their pipeline `{p}`, or pipelines were renamed or swapped. Nothing was scanned or applied: give this config its own `state_dir` (or its pipeline another name) and run it again; a new state reads the source afresh, and files the target already holds as they are are adopted, not rewritten. Do not replay this pipeline: its log holds the other source's events, and a replay writes them into this target")
    }
}

/// The source a pipeline's state notes, as [`State::check_owner`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceNoted {
    /// None: the state was written before sources were noted, or nothing ran yet.
    None,
    /// The configured one.
    Same,
    /// Another, which is gone, with the target unchanged: the configured source is the
    /// same tree moved. The log's events read from the old path, so the next scan reads
    /// every item again and appends it (the projector skips what the target holds).
    Moved {
        /// The noted source.
        was: String,
    },
}

/// What the scanner last saw of a source item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Version ([`tidemark_proto::item_version`]: checksum, mode, modification time) of the
    /// last appended upsert.
    pub version: String,
    /// The source's cheap change token (size, mtime, inode); an equal token skips hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// How far a pipeline's event log is reflected in its source index: every event below
/// `heads` (per partition) that the pipeline's scanner appended is in the index as it is
/// on disk. Written only after the index changes it covers were flushed, so a crash
/// leaves it behind the index, never ahead; a scan that finds the log past it replays the
/// events in between into the index first (`scanner.rs`, `catch_up`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    /// The log it counts in ([`crate::log::EventLog::identity`]): a mark of another log
    /// (after `log migrate`, or a config pointing at another topic) says nothing of this one.
    pub log: String,
    /// Per partition, the next offset the index does not cover yet.
    pub heads: Vec<u64>,
}

/// What the projector last applied for an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// Version applied ([`tidemark_proto::Event::version`]); an event with the same version
    /// is skipped.
    pub version: String,
    /// Offset of the event that applied it.
    pub offset: u64,
    /// Id the target gave the item, for targets that assign ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
}

/// The names a target's creates of one item were sent under while no target id of it is
/// recorded (`creating/<pipeline>`): noted durably before each POST and dropped with the
/// record of the item's target id. A crash between a POST and that record leaves the item
/// on the target with no id in the state; the next run finds it by one of these names,
/// also when the source has renamed or deleted the item meanwhile (the event that
/// created it is then superseded, and a lookup by the current name misses it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Creating {
    /// Each name a POST of the item was about to be sent under, in order.
    pub names: Vec<String>,
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
    /// Waiting for another source item to let go of the target item this one would adopt
    /// by name (its delete may follow in a later batch), rather than for references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken: Option<Taken>,
    /// Why its last try did not apply it although nothing it references is missing: the
    /// target failed it transiently (a 5xx past the retry budget, a timeout), secrets
    /// redacted. `status` shows it as the reason it waits; the next try replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The target item a waiting event would adopt by name, which another source item holds
/// (`ApplyError::Taken`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Taken {
    /// The target id the other source item holds.
    pub target_id: String,
    /// The failure, should the other item keep it.
    pub reason: String,
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

/// How a person reads an item's identity: `kind key`, and its name quoted when it has one
/// (`users 17 ("alice")`), since a REST source's key is an id that says nothing.
pub fn item_label(kind: &str, key: &str, name: Option<&str>) -> String {
    // A directory source's key escapes `%` (and bytes that are not UTF-8): a name that is
    // UTF-8 is shown as the file is named, `100%.txt`, not `100%25.txt`.
    let shown = matches!(kind, "file" | "dir" | "symlink")
        .then(|| tidemark_proto::pathkey::decode(key))
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let key = shown.as_deref().unwrap_or(key);
    // One line per item: a newline in a name would forge a line of its own (`evil⏎delete
    // file important` read as a planned delete), so control characters are escaped as
    // Rust writes them (`\n`, `\u{1b}`), and a backslash is doubled to stay unambiguous
    // where there is one.
    let key: std::borrow::Cow<str> = if key.chars().any(char::is_control) {
        key.chars()
            .map(|c| match c {
                '\\' => "\\\\".to_owned(),
                c if c.is_control() => c.escape_debug().to_string(),
                c => c.to_string(),
            })
            .collect::<String>()
            .into()
    } else {
        key.into()
    };
    match name {
        Some(name) => format!("{kind} {key} ({name:?})"),
        None => format!("{kind} {key}"),
    }
}

impl Failure {
    /// The failed item, as [`item_label`] writes it.
    pub fn item(&self) -> String {
        item_label(&self.kind, &self.key, self.name.as_deref())
    }
}

/// A failed event kept for `status` until the key's next event is applied, or the next
/// run's retry of it succeeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Kind of the item.
    pub kind: String,
    /// Key of the item.
    pub key: String,
    /// The item's name (a REST kind's `name_field`, which adoption uses), so that a person
    /// can tell which item a source id is; none for files and for deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Offset of the failed event.
    pub offset: u64,
    /// What went wrong (secrets redacted).
    pub reason: String,
    /// When it failed.
    pub at: DateTime<Utc>,
}

/// A failure as the state keeps it: what `status` shows, and the event the next run tries
/// again (`Projector::retry_failed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFailure {
    /// What `status` and the reports show.
    #[serde(flatten)]
    pub failure: Failure,
    /// A copy of the event to try again: the log may no longer hold it (`compact` drops an
    /// event a later one of the item supersedes, and a later stale event does). The failed
    /// event, or a stale event of the item read after it. `None` in records written before
    /// retries existed; the retry then looks for the event in the log at `offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<tidemark_proto::Event>,
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

/// A daemon projector's run of failed attempts in a row (a target that refuses its
/// batches, a log that cannot be read), kept so that a daemon restarted during it counts
/// from when it began, not from the restart; removed once a batch goes through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    /// When the first attempt of this run of failures failed.
    pub since: DateTime<Utc>,
    /// Attempts that failed since then, in a row.
    pub attempts: u64,
    /// The last attempt's error, secrets redacted.
    pub error: String,
}

/// What this state last committed on one partition of a log that keeps its committed
/// offsets outside the state (a Kafka consumer group), so a projector can tell that the
/// group's offsets went back behind its own work: the `group` was changed, or the broker
/// lost them ([`crate::projector::ProjectError::GroupBehind`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CommitMark {
    /// The offset this state last committed (the next offset to read), or set by a
    /// `replay` made from this state.
    pub next: u64,
    /// The group's replay count (bumped by every `replay`, from any state) when this
    /// state last looked: a higher count later means a replay, not a loss, moved the
    /// group's offsets back.
    pub replays: u64,
}

/// A `replay` of one partition: the events below `until` had been applied before it, so
/// their lag counts from `at` (when the replay began), not from when they were observed:
/// a rebuild is as far behind as it has been running, not as old as the log.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplayMark {
    /// The committed offset before the replay.
    pub until: u64,
    /// When the replay was made.
    pub at: DateTime<Utc>,
}

impl ReplayMark {
    /// When the event at `offset`, observed at `observed`, counts as waiting since.
    pub fn waiting_since(
        mark: Option<&ReplayMark>,
        offset: u64,
        observed: DateTime<Utc>,
    ) -> DateTime<Utc> {
        match mark {
            Some(m) if offset < m.until => observed.max(m.at),
            _ => observed,
        }
    }
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
    /// Changes found that the log did not take (its append failed, as with a Kafka broker
    /// down): not in the log nor in the index, so the next scan finds them again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_appended: u64,
    /// Entries that could not be listed or read.
    pub errors: u64,
    /// Entries skipped on purpose (special files).
    pub skipped: u64,
    /// Entries that were gone by the time the scan read them (removed or renamed after
    /// their directory was listed): absent, not errors.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vanished: u64,
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
    /// The errors met, the first [`ERRORS_KEPT`] of them, so that `status` and the report
    /// name every item a scan left out, not only the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_messages: Vec<String>,
}

/// Error messages a scan record keeps ([`ScanRecord::error_messages`]); the log has all.
pub const ERRORS_KEPT: usize = 20;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The local state database.
#[derive(Clone)]
pub struct State {
    db: sled::Db,
    path: PathBuf,
}

impl State {
    /// Opens (creating with owner-only permissions) the state directory. When another
    /// process holds it and has not noted itself yet ([`HOLDER`]: it opens the database
    /// first, then notes itself), the note is waited for up to [`HOLDER_WAIT`], so that
    /// the error names it.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        match State::open_once(dir) {
            Err(StateError::Locked { path, holder: None }) => Err(StateError::Locked {
                holder: holder(dir, HOLDER_WAIT).map(Box::new),
                path,
            }),
            opened => opened,
        }
    }

    /// [`State::open`] without waiting for the holder's note.
    fn open_once(dir: &Path) -> Result<State, StateError> {
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
        remove_unfinished_snapshots(&dir.join(DB)).map_err(open_err)?;
        let db = sled::Config::new()
            .path(dir.join(DB))
            .open()
            .map_err(|e| open_error(e, dir))?;
        // A compaction killed while it copied left its partial copy: holding the lock,
        // this process knows none is running. (One killed between its two renames is
        // finished above, on the old database, which the copy did not replace.)
        let partial = dir.join(DB_COMPACTING);
        if partial.exists() {
            if let Err(e) = std::fs::remove_dir_all(&partial) {
                tracing::warn!(path = %partial.display(), "cannot remove what an interrupted compaction left: {e}");
            }
        }
        let _ = OPENED.set(dir.to_owned());
        note_holder(dir);
        Ok(State {
            db,
            path: dir.to_owned(),
        })
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying database, for the sled event log.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The per-key source index of a pipeline as state directories written before the
    /// journaled index kept it, if this database has one; the scanner moves it into
    /// [`State::index_snapshot`] and then drops it with [`State::drop_legacy_index`].
    pub fn legacy_index(&self, pipeline: &str) -> Result<Option<Records<IndexEntry>>, StateError> {
        let name = format!("index/{pipeline}");
        if !self.db.tree_names().iter().any(|n| n == name.as_bytes()) {
            return Ok(None);
        }
        self.records(&name).map(Some)
    }

    /// The legacy per-key index tree of a pipeline, created if missing: tests write one to
    /// see it moved.
    #[cfg(test)]
    pub fn legacy_index_for_tests(&self, pipeline: &str) -> Records<IndexEntry> {
        self.records(&format!("index/{pipeline}")).unwrap()
    }

    /// Drops the legacy per-key index of a pipeline, once the snapshot that replaces it
    /// is durable (flushed first here, so no crash can keep the drop without it).
    pub fn drop_legacy_index(&self, pipeline: &str) -> Result<(), StateError> {
        self.db.flush()?;
        self.db.drop_tree(format!("index/{pipeline}"))?;
        Ok(())
    }

    /// The projector's applied state for a pipeline.
    pub fn applied(&self, pipeline: &str) -> Result<Records<Applied>, StateError> {
        self.records(&format!("applied/{pipeline}"))
    }

    /// Events that failed permanently, as `status` shows them. Each is tried again once by
    /// the next run (`Projector::retry_failed`) and stays until its key's next event is
    /// applied or a retry succeeds.
    pub fn failures(&self, pipeline: &str) -> Result<Records<Failure>, StateError> {
        self.records(&format!("failed/{pipeline}"))
    }

    /// The same records as [`State::failures`], with the copy of each failed event the
    /// retry applies.
    pub fn stored_failures(&self, pipeline: &str) -> Result<Records<StoredFailure>, StateError> {
        self.records(&format!("failed/{pipeline}"))
    }

    /// The id remap table: item identity (kind, source key) → target id, for targets that
    /// assign ids. Kept apart from applied state so a `replay` adopts instead of creating
    /// duplicates.
    pub fn remap(&self, pipeline: &str) -> Result<Records<String>, StateError> {
        self.records(&format!("remap/{pipeline}"))
    }

    /// The names creates of items with no recorded target id were sent under, by item
    /// identity ([`Creating`]).
    pub fn creating(&self, pipeline: &str) -> Result<Records<Creating>, StateError> {
        self.records(&format!("creating/{pipeline}"))
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

    /// Deletes not applied because `prune` was off, by item identity: the target still
    /// holds those items. When `prune` is on they are applied once the projector has caught
    /// up (a newer event for the item, the source re-creating it, drops its entry first).
    pub fn retained(&self, pipeline: &str) -> Result<Records<PendingDelete>, StateError> {
        self.records(&format!("retained/{pipeline}"))
    }

    /// The stored snapshot of a pipeline's source index (see `scanner/digest.rs`): the
    /// digest a scan keeps in memory and the indexed keys' names, as of a position of
    /// [`State::index_journal`].
    pub fn index_snapshot(&self, pipeline: &str) -> Result<Snapshot, StateError> {
        Ok(Snapshot {
            tree: self.db.open_tree(format!("index-digest/{pipeline}"))?,
        })
    }

    /// The journal of a pipeline's source index: the index changes since its snapshot.
    pub fn index_journal(&self, pipeline: &str) -> Result<Journal, StateError> {
        Ok(Journal {
            tree: self.db.open_tree(format!("index-journal/{pipeline}"))?,
        })
    }

    /// How far each pipeline's log is reflected in its source index, keyed by pipeline
    /// name ([`LogMark`]).
    pub fn index_marks(&self) -> Result<Records<LogMark>, StateError> {
        self.records("index-log")
    }

    /// Last scan record of each pipeline, keyed by pipeline name.
    pub fn scans(&self) -> Result<Records<ScanRecord>, StateError> {
        self.records("scans")
    }

    /// The target each pipeline's applied state is true of (`Target::identity`), keyed by
    /// pipeline name; compare through [`resolved_identity`].
    pub fn targets(&self) -> Result<Records<String>, StateError> {
        self.records("targets")
    }

    /// Whether each pipeline's source root was the root of a mounted filesystem at its
    /// last complete scan (`Source::mounted`), keyed by pipeline name.
    pub fn source_mounts(&self) -> Result<Records<bool>, StateError> {
        self.records("source-mounts")
    }

    /// The record of [`State::source_mounts`] for `pipeline`, read without writing.
    pub fn source_mount(&self, pipeline: &str) -> Result<Option<bool>, StateError> {
        self.record_if_any("source-mounts", pipeline)
    }

    /// The source each pipeline's log and source index were built from
    /// (`Source::identity`), keyed by pipeline name; compare through [`resolved_identity`].
    /// A state written before it was noted has none: the configured source is taken then.
    pub fn sources(&self) -> Result<Records<String>, StateError> {
        self.records("sources")
    }

    /// Checks that this state's pipeline `pipeline` is the one configured, reading only:
    /// the source its log was built from and the target its applied state is about, as
    /// noted, against `source` and `target` (identities, as `Source::identity` and
    /// `Target::identity` give them). Two configs beside each other share their default
    /// `state_dir`, and a pipeline of the same name in both then reads the other's log,
    /// whose events name the other source's files: refused when both the source and the
    /// target differ ([`OwnerError::Other`]), and when only the source does while the
    /// noted directory source is still there ([`OwnerError::SourceStillThere`]). A noted
    /// source that is gone, with the target unchanged, is this source moved
    /// ([`SourceNoted::Moved`]).
    pub fn check_owner(
        &self,
        pipeline: &str,
        source: &str,
        target: &str,
    ) -> Result<SourceNoted, OwnerError> {
        let Some(was) = self.sources()?.get(pipeline)?.map(resolved_identity) else {
            return Ok(SourceNoted::None);
        };
        if was == source {
            return Ok(SourceNoted::Same);
        }
        let target_was = self.targets()?.get(pipeline)?.map(resolved_identity);
        if let Some(target_was) = target_was.filter(|t| t != target) {
            return Err(OwnerError::Other(Box::new(OtherPipeline {
                pipeline: pipeline.to_owned(),
                state_dir: self.path.clone(),
                source_was: was,
                target_was,
                source_now: source.to_owned(),
                target_now: target.to_owned(),
            })));
        }
        let old_there = was
            .strip_prefix("dir ")
            .is_some_and(|old| Path::new(old).is_dir());
        if old_there {
            return Err(OwnerError::SourceStillThere {
                pipeline: pipeline.to_owned(),
                state_dir: self.path.clone(),
                was,
                now: source.to_owned(),
            });
        }
        Ok(SourceNoted::Moved { was })
    }

    /// What each pipeline's last projecting run wrote into its directory target's note
    /// ([`crate::writer::WriterMark`]), keyed by pipeline name.
    pub fn writer_marks(&self) -> Result<Records<crate::writer::WriterMark>, StateError> {
        self.records("writer-marks")
    }

    /// The record of [`State::writer_marks`] for `pipeline`, read without writing.
    pub fn writer_mark(
        &self,
        pipeline: &str,
    ) -> Result<Option<crate::writer::WriterMark>, StateError> {
        self.record_if_any("writer-marks", pipeline)
    }

    /// Whether each pipeline's target root was the root of a mounted filesystem when the
    /// projector last started (`Target::mounted`), keyed by pipeline name.
    pub fn target_mounts(&self) -> Result<Records<bool>, StateError> {
        self.records("target-mounts")
    }

    /// The record of [`State::target_mounts`] for `pipeline`, read without writing.
    pub fn target_mount(&self, pipeline: &str) -> Result<Option<bool>, StateError> {
        self.record_if_any("target-mounts", pipeline)
    }

    /// When each pipeline's projector last made progress (applied and committed a batch),
    /// keyed by pipeline name, so the gauge of it is right again after a restart.
    pub fn last_applies(&self) -> Result<Records<DateTime<Utc>>, StateError> {
        self.records("last-apply")
    }

    /// The outage each pipeline's daemon projector is retrying, keyed by pipeline name.
    pub fn outages(&self) -> Result<Records<Outage>, StateError> {
        self.records("outages")
    }

    /// The last `replay` of each partition, keyed `<pipeline>/<partition>`.
    pub fn replays(&self) -> Result<Records<ReplayMark>, StateError> {
        self.records("replays")
    }

    /// Per pipeline, log and partition (`<pipeline>/<log identity>/<partition>`), what this
    /// state last committed on a log that keeps its offsets elsewhere ([`CommitMark`]).
    pub fn log_commits(&self) -> Result<Records<CommitMark>, StateError> {
        self.records("log-commits")
    }

    /// [`State::replays`], or `None` when no replay was ever made: read-only commands
    /// (`status`) look without creating the tree.
    pub fn replays_if_any(&self) -> Result<Option<Records<ReplayMark>>, StateError> {
        let made = self
            .db
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == b"replays");
        made.then(|| self.replays()).transpose()
    }

    /// The record under `key` in `tree`, without making the tree when it does not exist
    /// yet: opening a tree makes it, which is a write, and `status` and `plan` read only.
    fn record_if_any<T: Serialize + DeserializeOwned>(
        &self,
        tree: &str,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        if !self.db.tree_names().iter().any(|n| n == tree.as_bytes()) {
            return Ok(None);
        }
        self.records(tree)?.get(key)
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

    /// Opens the database of `dir` once more and closes it, to leave a fresh sled snapshot
    /// behind. sled 0.34 keeps its page table as a snapshot plus the log written after it,
    /// and every open reads that log back and writes a new snapshot. After a run that wrote
    /// much, the next start read it from a cold disk: the first re-sync after an initial
    /// sync of 100k files spent 0.32–0.34 s opening the database instead of 0.07–0.09 s.
    /// Right after the run the log is still in the page cache, and reading it here took
    /// 0.05 s. Needs the database to itself: every handle of the run must be dropped. sled's
    /// threads let go of the lock shortly after the last handle is dropped, so a locked
    /// database is tried again for up to two seconds before the error is returned.
    pub fn checkpoint(dir: &Path) -> Result<(), StateError> {
        once_unlocked(|| State::open_once(dir).map(drop))
    }

    /// Rewrites the database of `dir` into a new one holding exactly the same records,
    /// and puts it in place of the old one. sled 0.34 reclaims the space of rewritten
    /// pages lazily, and with a log that only grows it hardly does: on 10k files, 80
    /// re-syncs of 100 changed files each left 78 MB on disk for about 10 MB of records
    /// (and growing); the rewrite took 0.4 s and left 23 MB. On a state with nothing to
    /// reclaim the rewrite can take more room than the original (20k files synced once:
    /// 19 MiB, rewritten 25 MiB): then the rewrite is discarded and the database is kept
    /// as it is ([`Compacted::replaced`] is false), so a compaction never leaves a bigger
    /// state. Needs the database to itself (no daemon running). `progress` counts the
    /// records copied.
    pub fn compact(dir: &Path, progress: &Progress) -> Result<Compacted, StateError> {
        let io_err = |source| StateError::Open {
            path: dir.to_owned(),
            source,
        };
        let old = State::open(dir)?;
        let (current, retired) = (dir.join(DB), dir.join(DB_RETIRED));
        // Measured as files, not as sled's `size_on_disk`: that leaves out the snapshot the
        // new database gets below, which made a state with nothing to reclaim bigger.
        let before = dir_bytes(&current).map_err(io_err)?;
        // Holding the old database's lock, no other compaction is writing this one.
        let fresh = dir.join(DB_COMPACTING);
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh).map_err(io_err)?;
        }
        let new = sled::Config::new().path(&fresh).open()?;
        let mut records = 0;
        let mut log_events_dropped = 0;
        for name in old.db.tree_names() {
            let to = new.open_tree(&name)?;
            // The events a later event of their item supersedes are left behind.
            if let Some(pipeline) = name.strip_prefix(b"log/") {
                let pipeline = String::from_utf8_lossy(pipeline);
                let done = crate::log::sled::copy_without_superseded(&old.db, &pipeline, &to)?;
                log_events_dropped += done.dropped;
                progress.inc(to.len() as u64);
                records += to.len() as u64;
                continue;
            }
            let from = old.db.open_tree(&name)?;
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
        drop(new);
        // Written since its only open, the new database has no snapshot yet: the first
        // start after the swap would read all of it back from disk (see `checkpoint`).
        once_unlocked(|| {
            sled::Config::new()
                .path(&fresh)
                .open()
                .map(drop)
                .map_err(|e| open_error(e, &fresh))
        })?;
        // The old one measured again: opening it may have written a snapshot.
        let (now, rewritten) = (
            dir_bytes(&current).map_err(io_err)?,
            dir_bytes(&fresh).map_err(io_err)?,
        );
        if rewritten >= now {
            // Closed and released above; the old database is left as it is.
            std::fs::remove_dir_all(&fresh).map_err(io_err)?;
            return Ok(Compacted {
                records,
                // Dropped from the discarded copy only.
                log_events_dropped: 0,
                before,
                after: now,
                rewritten,
                replaced: false,
            });
        }
        // Swapped while the old database is still open and locked, so no tidemark opens
        // it in between; a crash between the two renames is finished by the next open.
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
            log_events_dropped,
            before,
            after: rewritten,
            rewritten,
            replaced: true,
        })
    }
}

// Not `#[from]`: that would make sled's error the cause, which a chain of causes would
// show a second time in its debug form.
impl From<sled::Error> for StateError {
    fn from(e: sled::Error) -> StateError {
        note_failure(&e);
        StateError::Db(e)
    }
}

/// The first I/O error the state database met in this process, and a token cancelled
/// then. sled 0.34 keeps a failed write's error and fails every later write with it, even
/// once the disk has room again: only opening the database again gets past it, so the
/// daemon watches [`broken`] and stops (for its supervisor to start it again).
static BROKEN: std::sync::LazyLock<(
    std::sync::OnceLock<String>,
    tokio_util::sync::CancellationToken,
)> = std::sync::LazyLock::new(Default::default);

/// Cancelled once the state database has met an I/O error; [`broken_by`] says which.
pub fn broken() -> &'static tokio_util::sync::CancellationToken {
    &BROKEN.1
}

/// The I/O error that broke the state database, as [`DbError`] shows it.
pub fn broken_by() -> Option<&'static str> {
    BROKEN.0.get().map(String::as_str)
}

fn note_failure(e: &sled::Error) {
    if matches!(e, sled::Error::Io(_)) {
        let _ = BROKEN.0.set(DbError(e).to_string());
        BROKEN.1.cancel();
    }
}

/// The state directory this process opened (one per process), for errors that only
/// have sled's to go on.
static OPENED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A sled error as a reader needs it: an I/O error by its own words (sled shows its debug
/// form) and, when the disk is full, which directory's disk and what to do.
pub struct DbError<'a>(pub &'a sled::Error);

impl std::fmt::Display for DbError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            sled::Error::Io(e) => IoCause(e, OPENED.get().map(PathBuf::as_path)).fmt(f),
            e => e.fmt(f),
        }
    }
}

/// An I/O error of the state database, with [`DbError`]'s words and advice; `.1` is the
/// state directory, when the message does not name it already.
struct IoCause<'a>(&'a std::io::Error, Option<&'a Path>);

impl std::fmt::Display for IoCause<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let IoCause(e, dir) = *self;
        // sled hands most I/O errors on as a custom error holding the original's debug
        // form (`Os { code: 28, … }`): its kind reads better.
        match e.kind() {
            std::io::ErrorKind::StorageFull if e.raw_os_error().is_none() => {
                write!(f, "no space left on device")?
            }
            kind if e.raw_os_error().is_none() && e.to_string().starts_with("Os {") => {
                write!(f, "{kind}")?
            }
            _ => write!(f, "{e}")?,
        }
        if e.kind() == std::io::ErrorKind::StorageFull {
            let dir = dir
                .map(|d| format!(" ({})", d.display()))
                .unwrap_or_default();
            write!(
                f,
                "; the disk of the state directory{dir} is full: free space there (or move `state_dir`) and run again. Nothing is lost: what was made durable stays, and the rest is done again"
            )?;
        }
        Ok(())
    }
}

/// A sled error of the log, shown as [`DbError`] shows it, its cause kept.
#[derive(Debug)]
pub struct LogDbError(sled::Error);

impl LogDbError {
    /// Wraps `e`, noting an I/O error for [`broken`].
    pub fn new(e: sled::Error) -> LogDbError {
        note_failure(&e);
        LogDbError(e)
    }
}

impl std::fmt::Display for LogDbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        DbError(&self.0).fmt(f)
    }
}

impl std::error::Error for LogDbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            sled::Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// What opening the sled database at `path` failed with: held by another process
/// ([`StateError::Locked`]), an I/O error naming the path, or sled's own.
/// Warns of the state directory or the reports directory when users other than its owner
/// can reach it: the state holds the log (with `inline_limit`, files' bytes, from files
/// only their owner may read) and both hold failure reasons quoting API answers, URLs and
/// file names. tidemark creates both owner-only but never changes the mode of one a user
/// made: the warning says what to run. A directory inside one its owner alone can enter
/// (the default reports directory in a state directory of mode 0700) is not warned of.
pub fn warn_if_open_to_others(state_dir: &Path, reports_dir: &Path) {
    let dirs = [
        (
            state_dir,
            "state directory",
            "the event log (with inline_limit, the bytes of source files), the failures and their reasons",
        ),
        (
            reports_dir,
            "reports directory",
            "reports naming files and quoting failure reasons",
        ),
    ];
    for (dir, what, holds) in dirs {
        let Some((mode, who)) = open_to(dir) else {
            continue;
        };
        tracing::warn!(
            path = %dir.display(),
            "the {what} {} can be read by {who} (mode {mode:04o}): it holds {holds}; run `chmod 700 {}` (tidemark creates it so, and never changes the mode of one you made)",
            dir.display(),
            dir.display()
        );
    }
}

/// The mode of `dir` and who besides its owner can reach it (`group`, `others`, or both),
/// through every directory above it; `None` when only its owner can, or it does not exist.
fn open_to(dir: &Path) -> Option<(u32, &'static str)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::fs::canonicalize(dir).ok()?;
    let mode = std::fs::metadata(&dir).ok()?.permissions().mode() & 0o7777;
    // Who may enter every directory above it (the search bit of group and of others).
    let mut above = 0o011;
    for parent in dir.ancestors().skip(1) {
        above &= std::fs::metadata(parent).ok()?.permissions().mode();
    }
    let group = above & 0o010 != 0 && mode & 0o070 != 0;
    let others = above & 0o001 != 0 && mode & 0o007 != 0;
    match (group, others) {
        (true, true) => Some((mode, "its group and others")),
        (true, false) => Some((mode, "its group")),
        (false, true) => Some((mode, "others")),
        (false, false) => None,
    }
}

fn open_error(e: sled::Error, path: &Path) -> StateError {
    match e {
        e if is_locked(&e) => StateError::Locked {
            path: path.to_owned(),
            holder: holder(path, std::time::Duration::ZERO).map(Box::new),
        },
        sled::Error::Io(source) => StateError::Open {
            path: path.to_owned(),
            source,
        },
        e => e.into(),
    }
}

/// sled could not open a database because another handle holds its lock.
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"))
}

/// Runs `open` (which opens a database and closes it) until the database is not locked,
/// for up to two seconds: sled's threads let go of the lock shortly after the last handle
/// is dropped.
fn once_unlocked(open: impl Fn() -> Result<(), StateError>) -> Result<(), StateError> {
    let mut tries = 0;
    loop {
        match open() {
            Err(StateError::Locked { .. }) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            done => return done,
        }
    }
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        bytes += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(bytes)
}

/// The sled database's directory in a state directory.
const DB: &str = "db";
/// Which process holds the database, written by each process that opens it, so the one
/// refused can say who holds it (an operator's second `sync`, or the daemon).
pub const HOLDER: &str = "holder";

/// The tidemark command this process runs (`run`, `sync`, …), for its [`HOLDER`] note.
static COMMAND: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names the tidemark command this process runs (`run`, `sync`, `status`, …), which its
/// [`HOLDER`] note then gives: a process refused by it can tell the daemon, which answers
/// `status` over HTTP, from a one-shot run, which ends by itself. Call before opening.
pub fn set_command(name: &'static str) {
    let _ = COMMAND.set(name);
}

/// A process holding a state database, as it noted itself in [`HOLDER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its command line (redacted).
    pub command_line: String,
    /// When it opened the database (RFC 3339).
    pub since: String,
    /// The tidemark command it runs ([`set_command`]); none in a note that does not say.
    pub command: Option<String>,
}

impl Holder {
    /// Whether it is the daemon (`tidemark run`); `None` when its note does not say.
    pub fn is_daemon(&self) -> Option<bool> {
        self.command.as_deref().map(|c| c == "run")
    }
}

impl std::fmt::Display for Holder {
    /// `pid N (`COMMAND LINE`, since TIME)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (`{}`, since {})",
            self.pid, self.command_line, self.since
        )
    }
}

/// Who [`StateError::Locked`] says holds the database, and what to do about it.
fn in_use_by(holder: Option<&Holder>) -> String {
    match holder {
        Some(h) if h.is_daemon() == Some(true) => format!(
            "the tidemark daemon, {h}: stop it first, or leave the work to it (`tidemark status` asks it over HTTP)"
        ),
        Some(h) => match h.command.as_deref() {
            Some(command) => format!(
                "a one-shot `tidemark {command}`, {h}; try again once it has ended{}",
                if matches!(command, "scan" | "project" | "sync" | "verify" | "compact") {
                    " (its progress shows on the terminal it runs in)"
                } else {
                    ""
                }
            ),
            None => format!(
                "another tidemark process, {h} (is the daemon running? `tidemark status` asks it over HTTP)"
            ),
        },
        None => "another tidemark process, which has not noted which one it is (is the daemon running? `tidemark status` asks it over HTTP)".into(),
    }
}

/// Notes in `dir` that this process holds its database: its pid, command line, start and
/// tidemark command. Best effort: a state directory that cannot take it only loses the
/// hint.
fn note_holder(dir: &Path) {
    let args: Vec<String> = std::env::args().collect();
    let text = format!(
        "{}\n{}\n{}\n{}\n",
        std::process::id(),
        args.join(" "),
        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        COMMAND.get().copied().unwrap_or_default()
    );
    let daemon = COMMAND.get().copied() == Some("run");
    for name in [HOLDER, DAEMON_NOTE]
        .into_iter()
        .take(if daemon { 2 } else { 1 })
    {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        if std::fs::write(&tmp, &text).is_err() || std::fs::rename(&tmp, dir.join(name)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// The note of the last daemon that held the database ([`last_daemon`]).
const DAEMON_NOTE: &str = "daemon";

/// The last daemon (`tidemark run`) that held `dir`'s database, as it noted itself
/// ([`note_holder`] notes a daemon twice: in the holder note, which every later open
/// overwrites, and here), alive or not: a `status` that opens the state itself tells
/// from it that the daemon is not running.
pub fn last_daemon(dir: &Path) -> Option<Holder> {
    read_note(&dir.join(DAEMON_NOTE))
}

/// What the note in `dir` says ([`note_holder`]), whether or not its process still lives.
fn holder_note(dir: &Path) -> Option<Holder> {
    read_note(&dir.join(HOLDER))
}

fn read_note(path: &Path) -> Option<Holder> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let pid: u32 = lines.next()?.parse().ok()?;
    let (command_line, since) = (lines.next()?, lines.next()?);
    // A command line holds no secret (they come from the environment or files), but it
    // is shown redacted all the same.
    Some(Holder {
        pid,
        command_line: crate::http::redact_known(command_line).into_owned(),
        since: since.to_owned(),
        command: lines.next().filter(|c| !c.is_empty()).map(str::to_owned),
    })
}

fn process_lives(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// How long a process refused the database waits for its holder's note: the holder opens
/// the database (a few tenths of a second for a large state), then notes itself.
pub const HOLDER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Who holds the database of `dir`, as the holder noted it ([`note_holder`]), waiting up
/// to `wait` for a note from a live process other than this one: a second `sync` started
/// right after a first one meets the first's lock before its note. `None` when no such
/// note came (an earlier holder's note, of a process now gone, does not count); at once
/// for a note of this very process (a second handle in one process).
fn holder(dir: &Path, wait: std::time::Duration) -> Option<Holder> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let note = holder_note(dir);
        if note.as_ref().is_some_and(|h| h.pid == std::process::id()) {
            return None;
        }
        if let Some(h) = note.filter(|h| process_lives(h.pid)) {
            return Some(h);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// A compaction's new database while it is written.
const DB_COMPACTING: &str = "db.compacting";
/// The database a compaction replaced, until it is removed.
const DB_RETIRED: &str = "db.old";

/// What [`State::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Compacted {
    /// Records copied (every tree, the log included).
    pub records: u64,
    /// Events dropped from the sled logs: every consumer had passed them, and a later
    /// event of the same item supersedes each (`log::sled::drop_superseded`).
    pub log_events_dropped: u64,
    /// Bytes on disk before.
    pub before: u64,
    /// Bytes on disk after: the rewritten database's when it replaced the old one, the old
    /// one's otherwise.
    pub after: u64,
    /// Bytes the rewritten database took.
    pub rewritten: u64,
    /// Whether the rewritten database replaced the old one: only when it is smaller.
    pub replaced: bool,
}

impl std::fmt::Display for Compacted {
    /// What `tidemark compact` prints after `state <dir> `.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use indicatif::HumanBytes;
        if self.replaced {
            write!(
                f,
                "compacted: {} superseded log events dropped, {} records, {} -> {} on disk",
                self.log_events_dropped,
                self.records,
                HumanBytes(self.before),
                HumanBytes(self.after)
            )
        } else {
            write!(
                f,
                "not rewritten: {} records; nothing to reclaim: the rewritten state would take {} against {} now; kept as it is, superseded log events included",
                self.records,
                HumanBytes(self.rewritten),
                HumanBytes(self.after)
            )
        }
    }
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

/// Removes the snapshots an open of the database at `db` began and never finished. sled
/// 0.34 writes a snapshot at every open, as `snap.<lsn>.generating` renamed to `snap.<lsn>`
/// once complete; an open that failed on the way (a full disk, a kill) leaves the file,
/// and as its name sorts last the next open reads it as the newest snapshot and calls the
/// database corrupted, for good. The earlier snapshot it was to replace is still there
/// (sled removes it only after the rename). Done under sled's own lock on the data file,
/// so no live open is writing one; when another process holds that lock, nothing is
/// touched and the open that follows says who holds it.
fn remove_unfinished_snapshots(db: &Path) -> std::io::Result<()> {
    let data = match std::fs::File::open(db.join("db")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match rustix::fs::flock(&data, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    for entry in std::fs::read_dir(db)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let path = db.join(&*name);
            std::fs::remove_file(&path)?;
            tracing::info!(path = %path.display(), "removed a snapshot an earlier open of the state database left unfinished");
        }
    }
    // Closing the file lets the lock go, for sled to take.
    drop(data);
    Ok(())
}

/// Stored values derived from a tree of records (see [`State::index_snapshot`]), kept in
/// their own tree as chunks of at most [`crate::log::sled::CHUNK_BYTES`]: sled 0.34 writes
/// a larger page to a blob file its `flush` does not fsync, and the index digest of 100k
/// keys is 3.3 MB. A snapshot has [`SNAPSHOT_PARTS`] parts, read apart (the index reads its
/// names only to delete), and the position of the last [`Journal`] record it includes. A
/// header records both; `put` writes the chunks and the header in one batch.
pub struct Snapshot {
    tree: sled::Tree,
}

/// Parts of a [`Snapshot`].
pub const SNAPSHOT_PARTS: usize = 2;

/// Where a stored [`Snapshot`]'s parts are, and what it includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The last journal record the snapshot includes; 0 when none.
    pub position: u64,
    counts: [u32; SNAPSHOT_PARTS],
}

impl Snapshot {
    /// Key of the header: the journal position (u64) and each part's chunk count (u32),
    /// big-endian. A part's chunks are keyed by its tag and their index, u32 big-endian.
    const HEADER: &'static [u8] = b"h";
    /// Header of the format without parts or journal (before the journaled index),
    /// removed by the first `put`.
    const LEGACY_HEADER: &'static [u8] = b"n";
    const PART_TAGS: [u8; SNAPSHOT_PARTS] = [b'c', b'm'];

    fn chunk_key(part: usize, i: u32) -> [u8; 5] {
        let [a, b, c, d] = i.to_be_bytes();
        [Self::PART_TAGS[part], a, b, c, d]
    }

    fn unreadable(&self, reason: &str) -> StateError {
        StateError::Unreadable {
            key: String::from_utf8_lossy(&self.tree.name()).into_owned(),
            reason: reason.to_owned(),
        }
    }

    /// The header, if a snapshot is stored.
    pub fn header(&self) -> Result<Option<SnapshotHeader>, StateError> {
        let Some(header) = self.tree.get(Self::HEADER)? else {
            return Ok(None);
        };
        let bad = || self.unreadable("its header is not 16 bytes");
        let (position, rest) = header.split_first_chunk::<8>().ok_or_else(bad)?;
        let mut counts = [0; SNAPSHOT_PARTS];
        let mut rest = rest;
        for count in &mut counts {
            let (c, tail) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
            *count = u32::from_be_bytes(*c);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad());
        }
        Ok(Some(SnapshotHeader {
            position: u64::from_be_bytes(*position),
            counts,
        }))
    }

    /// The bytes of one part of the snapshot `header` describes.
    pub fn part(&self, header: &SnapshotHeader, part: usize) -> Result<Vec<u8>, StateError> {
        let mut bytes = Vec::new();
        for i in 0..header.counts[part] {
            match self.tree.get(Self::chunk_key(part, i))? {
                Some(chunk) => bytes.extend_from_slice(&chunk),
                None => return Err(self.unreadable("a chunk its header counts is missing")),
            }
        }
        Ok(bytes)
    }

    /// Stores `parts` as the snapshot that includes the journal up to `position`,
    /// atomically, and returns its header.
    pub fn put(
        &self,
        position: u64,
        parts: [&[u8]; SNAPSHOT_PARTS],
    ) -> Result<SnapshotHeader, StateError> {
        let mut batch = sled::Batch::default();
        let mut header = position.to_be_bytes().to_vec();
        let mut counts = [0; SNAPSHOT_PARTS];
        for (part, bytes) in parts.iter().enumerate() {
            let chunks = bytes.chunks(crate::log::sled::CHUNK_BYTES);
            let count = u32::try_from(chunks.len()).expect("a snapshot under 24 TiB");
            for (i, chunk) in (0..).zip(chunks) {
                batch.insert(&Self::chunk_key(part, i), chunk);
            }
            for old in self
                .tree
                .range(Self::chunk_key(part, count)..=Self::chunk_key(part, u32::MAX))
            {
                batch.remove(old?.0);
            }
            header.extend_from_slice(&count.to_be_bytes());
            counts[part] = count;
        }
        batch.remove(Self::LEGACY_HEADER);
        batch.insert(Self::HEADER, header);
        self.tree.apply_batch(batch)?;
        Ok(SnapshotHeader { position, counts })
    }
}

/// Records appended under increasing positions (u64 big-endian keys, from 1), so an append
/// writes only the tree's last leaf, which is in memory: unlike a write keyed by item, it
/// never waits for a page on the disk. Read back from a position; removed up to one once a
/// [`Snapshot`] includes them.
pub struct Journal {
    tree: sled::Tree,
}

impl Journal {
    /// Position of the last record; 0 when there is none.
    pub fn last(&self) -> Result<u64, StateError> {
        Ok(match self.tree.last()? {
            Some((k, _)) => Self::position(&k)?,
            None => 0,
        })
    }

    fn position(key: &[u8]) -> Result<u64, StateError> {
        <[u8; 8]>::try_from(key)
            .map(u64::from_be_bytes)
            .map_err(|_| StateError::Unreadable {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "a journal key is not 8 bytes".into(),
            })
    }

    /// Appends `records` under `first`, `first + 1`, …, atomically.
    pub fn append(&self, first: u64, records: &[Vec<u8>]) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        for (position, record) in (first..).zip(records) {
            batch.insert(&position.to_be_bytes(), record.as_slice());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The records after `position`, in order, with their positions.
    pub fn after(
        &self,
        position: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StateError>> + '_ {
        let from = position.saturating_add(1).to_be_bytes();
        self.tree.range(from..).map(|r| {
            let (k, v) = r?;
            Ok((Self::position(&k)?, v))
        })
    }

    /// Removes the records up to `position`, atomically.
    pub fn remove_through(&self, position: u64) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        for key in self.tree.range(..=position.to_be_bytes()).keys() {
            batch.remove(key?);
        }
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

/// A recorded target identity (`dir /path`) with the path resolved as the config resolves
/// a target path now ([`crate::config::resolved`]); other identities as they are. States
/// written before the config resolved target paths hold them as written
/// (`/etc/tidemark/../d16`), and one directory must not read as a changed target.
pub fn resolved_identity(identity: String) -> String {
    match identity.strip_prefix("dir ") {
        Some(path) => format!("dir {}", crate::config::resolved(Path::new(path)).display()),
        None => identity,
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

    /// A directory item is shown as its file is named (`100%.txt`); a name that is not
    /// UTF-8 keeps its escapes, and a REST id is shown as it is.
    #[test]
    fn an_item_label_escapes_control_characters_so_that_a_name_cannot_forge_a_line() {
        let label = item_label("file", "evil\ndelete file important", None);
        assert_eq!(label, "file evil\\ndelete file important");
        assert_eq!(label.lines().count(), 1);
        assert_eq!(
            item_label("file", "a\\b\u{1b}[2J", None),
            "file a\\\\b\\u{1b}[2J"
        );
        assert_eq!(item_label("file", "plain\\name", None), "file plain\\name");
    }

    #[test]
    fn an_item_label_shows_a_file_as_it_is_named() {
        assert_eq!(item_label("file", "d/100%25.txt", None), "file d/100%.txt");
        assert_eq!(item_label("dir", "bad%FFname", None), "dir bad%FFname");
        assert_eq!(
            item_label("users", "a%25b", Some("ann")),
            "users a%25b (\"ann\")"
        );
    }

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

    /// sled's newest snapshot in `dir`: the log position it covers (0: none yet).
    fn snapshot_position(dir: &Path) -> u64 {
        std::fs::read_dir(dir.join(DB))
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                let hex = name.strip_prefix("snap.")?;
                u64::from_str_radix(hex, 16).ok()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_checkpoint_leaves_a_snapshot_of_everything_written_and_waits_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let written = snapshot_position(dir.path());
        let applied = state.applied("p").unwrap();
        for k in 0..5000 {
            let a = Applied {
                version: format!("blake3:{k:064}"),
                offset: k,
                target_id: None,
            };
            applied.put(&format!("file\0k{k}"), &a).unwrap();
        }
        futures::executor::block_on(state.flush()).unwrap();
        drop((applied, state));
        // Right after the drop sled's threads may still hold the lock: it waits for them.
        State::checkpoint(dir.path()).unwrap();
        assert!(
            snapshot_position(dir.path()) > written,
            "the snapshot covers the records written after the last open"
        );
        let state = reopen(dir.path());
        let applied = state.applied("p").unwrap();
        assert_eq!(applied.iter().count(), 5000);
        assert_eq!(applied.get("file\0k4999").unwrap().unwrap().offset, 4999);

        // A database another handle holds is not checkpointed; the error says so.
        let err = State::checkpoint(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }

    /// A second process started right after a first one meets its lock before the first
    /// has noted itself (it opens the database, then notes itself): the refusal waits for
    /// the note and names the holder, instead of nobody (or an earlier, gone process).
    #[test]
    fn a_refusal_waits_for_the_holders_note_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let _held = State::open(dir.path()).unwrap();
        // The note an earlier process left, now gone: a pid no process has.
        let gone = (2..u32::MAX)
            .rev()
            .find(|pid| !process_lives(*pid))
            .unwrap();
        let note = |pid: u32, command: &str| {
            std::fs::write(
                dir.path().join(HOLDER),
                format!("{pid}\ntidemark {command}\n2024-01-01T00:00:00Z\n{command}\n"),
            )
            .unwrap()
        };
        note(gone, "plan");
        let noting = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(300));
                // pid 1 lives: the holder that has just noted itself.
                note(1, "sync");
            });
            State::open(dir.path()).err()
        });
        let Some(StateError::Locked { holder, .. }) = &noting else {
            panic!("{noting:?}");
        };
        let holder = holder.as_ref().expect("the refusal names the holder");
        assert_eq!(holder.pid, 1);
        assert_eq!(holder.is_daemon(), Some(false));
        let message = noting.unwrap().to_string();
        assert!(
            message.contains("in use by a one-shot `tidemark sync`, pid 1 (`tidemark sync`")
                && message.contains("try again once it has ended"),
            "{message}"
        );
    }

    /// A state written before target paths were resolved holds one as written: it reads
    /// as the same directory resolved; other targets read as they are.
    #[test]
    fn a_target_recorded_with_dot_dot_reads_resolved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cfg")).unwrap();
        let written = format!("dir {}/cfg/../d16", dir.path().display());
        let real = dir.path().canonicalize().unwrap().join("d16");
        assert_eq!(
            resolved_identity(written),
            format!("dir {}", real.display())
        );
        let api = "http https://example.com".to_owned();
        assert_eq!(resolved_identity(api.clone()), api);
    }

    #[test]
    fn compaction_keeps_every_record_of_every_tree() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = State::open(dir.path()).unwrap();
            let index = state.records::<IndexEntry>("index/p").unwrap();
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
        assert!(
            snapshot_position(dir.path()) > 0,
            "the compacted database has a snapshot, so its next open reads nothing back"
        );
        let state = reopen(dir.path());
        let index = state.records::<IndexEntry>("index/p").unwrap();
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
            state
                .records::<IndexEntry>("index/p")
                .unwrap()
                .put("k", &entry("v"))
                .unwrap();
            state.db().flush().unwrap();
        }
        // Crashed after moving the old database aside, before the new one was in place:
        // the old one comes back.
        std::fs::rename(dir.path().join(DB), dir.path().join(DB_RETIRED)).unwrap();
        {
            let state = reopen(dir.path());
            assert_eq!(
                state
                    .records::<IndexEntry>("index/p")
                    .unwrap()
                    .get("k")
                    .unwrap(),
                Some(entry("v"))
            );
        }
        assert!(!dir.path().join(DB_RETIRED).exists());
        // Crashed after putting the new one in place: the old one is removed.
        std::fs::create_dir(dir.path().join(DB_RETIRED)).unwrap();
        let state = reopen(dir.path());
        assert_eq!(
            state
                .records::<IndexEntry>("index/p")
                .unwrap()
                .get("k")
                .unwrap(),
            Some(entry("v"))
        );
        assert!(!dir.path().join(DB_RETIRED).exists());
    }

    #[test]
    fn a_snapshot_is_stored_in_chunks_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let snapshot = state.index_snapshot("p").unwrap();
        assert_eq!(snapshot.header().unwrap(), None);
        // What the format before the journaled index left: its header and more chunks.
        snapshot
            .tree
            .insert(Snapshot::LEGACY_HEADER, &[0, 0, 0, 41])
            .unwrap();
        snapshot
            .tree
            .insert(Snapshot::chunk_key(0, 40), b"old")
            .unwrap();

        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let names = b"names".repeat(5000);
        let stored = snapshot.put(7, [&big, &names]).unwrap();
        assert_eq!(snapshot.header().unwrap(), Some(stored));
        assert_eq!(snapshot.tree.get(Snapshot::LEGACY_HEADER).unwrap(), None);
        assert_eq!(snapshot.tree.get(Snapshot::chunk_key(0, 40)).unwrap(), None);
        let header = snapshot.header().unwrap().unwrap();
        assert_eq!(header.position, 7);
        assert_eq!(snapshot.part(&header, 0).unwrap(), big);
        assert_eq!(snapshot.part(&header, 1).unwrap(), names);
        assert!(
            snapshot
                .tree
                .iter()
                .values()
                .all(|v| v.unwrap().len() <= crate::log::sled::CHUNK_BYTES),
            "no value may reach sled's blob threshold"
        );

        // A smaller one leaves none of the bigger one's chunks behind.
        snapshot.put(9, [b"small", b""]).unwrap();
        let header = snapshot.header().unwrap().unwrap();
        assert_eq!(header.position, 9);
        assert_eq!(snapshot.part(&header, 0).unwrap(), b"small");
        assert_eq!(snapshot.part(&header, 1).unwrap(), b"");
        assert_eq!(snapshot.tree.len(), 2);

        // A missing chunk is an error that names the tree, not a shorter value.
        snapshot.tree.remove(Snapshot::chunk_key(0, 0)).unwrap();
        let err = snapshot.part(&header, 0).unwrap_err().to_string();
        assert!(err.contains("index-digest/p"), "{err}");
    }

    #[test]
    fn a_journal_reads_back_after_a_position_and_forgets_what_was_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let journal = state.index_journal("p").unwrap();
        assert_eq!(journal.last().unwrap(), 0);
        journal
            .append(1, &[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
            .unwrap();
        journal.append(4, &[b"d".to_vec()]).unwrap();
        assert_eq!(journal.last().unwrap(), 4);
        let after = |p| -> Vec<(u64, Vec<u8>)> {
            journal
                .after(p)
                .map(|r| r.map(|(k, v)| (k, v.to_vec())).unwrap())
                .collect()
        };
        assert_eq!(after(2), vec![(3, b"c".to_vec()), (4, b"d".to_vec())]);
        journal.remove_through(3).unwrap();
        assert_eq!(after(0), vec![(4, b"d".to_vec())]);
        assert_eq!(journal.last().unwrap(), 4);
    }

    #[test]
    fn the_legacy_index_is_there_only_until_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        assert!(state.legacy_index("p").unwrap().is_none());
        state
            .records::<IndexEntry>("index/p")
            .unwrap()
            .put("k", &entry("v"))
            .unwrap();
        let legacy = state.legacy_index("p").unwrap().unwrap();
        assert_eq!(legacy.get("k").unwrap(), Some(entry("v")));
        state.drop_legacy_index("p").unwrap();
        assert!(state.legacy_index("p").unwrap().is_none());
    }

    /// A failure written before failures kept their event reads back without one (the retry
    /// then looks in the log), and `status`'s view of a new one leaves the event out.
    #[test]
    fn failures_read_back_with_and_without_their_event() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let failure = Failure {
            kind: "file".into(),
            key: "x".into(),
            name: None,
            offset: 7,
            reason: "in the way".into(),
            at: Utc::now(),
        };
        state
            .failures("p")
            .unwrap()
            .put("file\0old", &failure)
            .unwrap();
        let old = state
            .stored_failures("p")
            .unwrap()
            .get("file\0old")
            .unwrap();
        assert_eq!(old.as_ref().map(|f| &f.failure), Some(&failure));
        assert_eq!(old.and_then(|f| f.event), None);

        let event = tidemark_proto::Event::decode(
            br#"{"v":1,"pipeline":"p","partition":0,"offset":7,"kind":"file","key":"x","op":"upsert","checksum":"blake3:00","observed_at":"2024-01-01T00:00:00Z","scan":"s"}"#,
        );
        let Ok(event) = event else {
            panic!("{event:?}");
        };
        let stored = StoredFailure {
            failure: failure.clone(),
            event: Some(event.clone()),
        };
        let tree = state.stored_failures("p").unwrap();
        tree.put("file\0new", &stored).unwrap();
        assert_eq!(tree.get("file\0new").unwrap(), Some(stored));
        let shown = state.failures("p").unwrap().get("file\0new").unwrap();
        assert_eq!(shown, Some(failure));
    }
}
