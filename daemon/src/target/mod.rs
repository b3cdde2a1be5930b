//! The target boundary: the [`Target`] trait (apply one event; a durability barrier before
//! offsets are committed), the outcomes it reports and how it fails.

pub mod fs;
pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tidemark_proto::Event;

use crate::config::{PipelineConfig, SourceConfig, TargetConfig};
use crate::state::Applied;

pub use self::fs::DirTarget;
pub use self::http::HttpTarget;

/// What applying (or deciding not to apply) one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The item did not exist on the target and was written.
    Created,
    /// The item existed and was rewritten.
    Updated,
    /// An equal item already existed on the target and was taken over without a write.
    Adopted,
    /// The item was removed from the target.
    Deleted,
    /// Nothing to do on the target: the applied state already had this content, or a
    /// delete found the item already absent (never mirrored, or removed behind tidemark's
    /// back).
    Unchanged,
    /// The source no longer holds the content the event describes; a newer event follows.
    Stale,
    /// Waiting: an upsert for items it references (or for another source item to let go of
    /// the target item it would adopt by name), a directory delete for the directory to be
    /// empty. Kept in state and applied later.
    Deferred,
    /// The event failed permanently; kept in state and tried again once by each later run
    /// and now and then while the daemon runs, or applied when its key changes. The
    /// metrics count an item's first failure as `failed`, later ones as `failed_again`.
    Failed,
    /// A delete that was not applied because the target does not prune.
    Retained,
}

impl Outcome {
    /// Every outcome, for metrics and reports.
    pub const ALL: [Outcome; 9] = [
        Outcome::Created,
        Outcome::Updated,
        Outcome::Adopted,
        Outcome::Deleted,
        Outcome::Unchanged,
        Outcome::Stale,
        Outcome::Deferred,
        Outcome::Failed,
        Outcome::Retained,
    ];

    /// The lowercase label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Adopted => "adopted",
            Outcome::Deleted => "deleted",
            Outcome::Unchanged => "unchanged",
            Outcome::Stale => "stale",
            Outcome::Deferred => "deferred",
            Outcome::Failed => "failed",
            Outcome::Retained => "retained",
        }
    }

    /// Whether the target was written.
    pub fn wrote(self) -> bool {
        matches!(self, Outcome::Created | Outcome::Updated | Outcome::Deleted)
    }
}

/// The result of a successful apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    /// What happened.
    pub outcome: Outcome,
    /// The id the target knows the item by, for targets that assign ids.
    pub target_id: Option<String>,
}

impl From<Outcome> for Effect {
    fn from(outcome: Outcome) -> Effect {
        Effect {
            outcome,
            target_id: None,
        }
    }
}

/// Applying an event failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The target could not take the write now (disk full, read-only, unreachable, 5xx):
    /// the event stays uncommitted and is retried with backoff.
    #[error("{kind} `{key}`: {message}")]
    Transient {
        /// Kind of the item.
        kind: String,
        /// Key of the item.
        key: String,
        /// What failed and what to do.
        message: String,
    },
    /// The target item this one would adopt by name mirrors another source item. That
    /// item's delete may still come, in a later batch (the source deleted it and made this
    /// one under a new id with its name): the projector keeps the event waiting until the
    /// other item lets the target item go, and fails it with this error if it never does
    /// (at the end of a one-shot run, or after the target's reference wait).
    #[error("{kind} `{key}`: {message}")]
    Taken {
        /// Kind of the item.
        kind: String,
        /// Key of the item.
        key: String,
        /// The target id the other source item holds.
        target_id: String,
        /// What failed and what to do, should the other item keep it.
        message: String,
    },
    /// This event can never be applied as it is (unsafe path, rejected by the target):
    /// counted, reported, kept in state and tried again by the next run (the cause may be
    /// fixed by then), or when its key changes.
    #[error("{kind} `{key}`: {message}")]
    Permanent {
        /// Kind of the item.
        kind: String,
        /// Key of the item.
        key: String,
        /// What failed and what to do.
        message: String,
    },
}

/// Something events are applied to.
#[async_trait]
pub trait Target: Send + Sync {
    /// Applies one event. `prior` is what the projector last applied for the key. Deletes
    /// reach the target only when it prunes; unchanged content never reaches it.
    async fn apply(&self, event: &Event, prior: Option<&Applied>) -> Result<Effect, ApplyError>;

    /// Makes every apply so far durable and clears debris of interrupted writes; called
    /// before offsets are committed and once when a projector starts.
    async fn flush(&self) -> Result<(), ApplyError>;

    /// The keys of the directories whose entries the applies since the last flush changed
    /// and whose time no event of theirs set since: a target that mirrors directory times
    /// gives each, at the flush, the time of its applied version, passed in
    /// [`Target::keep_dir_times`]. A crash between a change and its flush is mended
    /// too, as the replayed change notes its directory again.
    fn changed_dirs(&self) -> Vec<String> {
        Vec::new()
    }

    /// The times (nanoseconds since the Unix epoch) of directories [`Target::changed_dirs`]
    /// named, for the next flush.
    fn keep_dir_times(&self, _times: Vec<(String, i64)>) {}

    /// What the target is (`dir /abs/path`, `http https://host/base`), with no secret in
    /// it: the applied state is only true of this target, so a projector refuses to go on
    /// when it changes (see `Projector::check_target`).
    fn identity(&self) -> String;

    /// How long an event may wait for the items it references (see the projector's
    /// deferral) before it fails with a report naming the missing reference.
    fn reference_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(300)
    }

    /// What the target holds for an upsert's item that no applied state covers (after a
    /// `replay`, or in a pre-filled target), looked at without writing: what `plan` shows.
    async fn probe(&self, _event: &Event) -> Probe {
        Probe::Unknown
    }

    /// What the target holds at `key`, looked at without writing, for `plan`: what the
    /// item of another kind an upsert finds there (a directory in a file's place, a file in
    /// a directory's) does to it, and what keeps a directory delete waiting. `None`:
    /// nothing there, or not looked at (a target that cannot tell without a request).
    async fn holds(&self, _key: &str) -> Option<Held> {
        None
    }

    /// Whether the pipeline's source holds the item of a delete again, and lists it, looked
    /// at without a scan: a delete retained while `prune` was off is then not applied
    /// (`false`: not looked at, as where the source is not a directory this process sees).
    async fn source_holds(&self, _event: &Event) -> bool {
        false
    }

    /// Whether the target holds anything where an upsert of an item it applied before
    /// would go, looked at without writing and without reading content (`None`: not
    /// looked at): an item removed from the target by hand is created again, and `plan`
    /// says `create`, not `update`.
    async fn present(&self, _event: &Event) -> Option<bool> {
        None
    }

    /// Whether the target already holds an upsert's item as the event has it, although
    /// the applied state holds an earlier version: written by a run killed before its
    /// commit, which `project` keeps (`adopted`) instead of writing it again. Looked at
    /// without writing, for `plan`; only where it is cheap to tell (a directory target:
    /// a file with the event's size and time, whose bytes are then read).
    async fn written(&self, _event: &Event) -> bool {
        false
    }

    /// What is missing when the target itself is gone (a directory target's root), so
    /// that a projector with applied state refuses to start on it; `None` otherwise. A
    /// directory target notes the root it finds as the one it writes to: one removed
    /// later is not made again.
    async fn missing(&self) -> Option<String> {
        None
    }

    /// Whether the target's root is the root of a mounted filesystem (a directory on
    /// another device than its parent); `None` when that does not apply or cannot be
    /// told. A projector notes it, so that a filesystem unmounted while tidemark was
    /// stopped, which leaves the empty mountpoint in its place, is not taken for the
    /// target.
    async fn mounted(&self) -> Option<bool> {
        None
    }

    /// The note the target keeps of the state that last projected into it
    /// ([`crate::writer`]); `None` when it keeps none (a REST target), has none yet, or it
    /// cannot be read.
    async fn writer_note(&self) -> Option<crate::writer::WriterNote> {
        None
    }

    /// Writes that note, after each commit that changed the target, once the state's mark is
    /// durable.
    async fn put_writer_note(&self, _note: &crate::writer::WriterNote) -> std::io::Result<()> {
        Ok(())
    }

    /// Hands a target that adopts existing items by name the table of which source item
    /// each target id mirrors (the projector's remap table), so that it never adopts, nor
    /// deletes, an item another source item owns. Called once by the projector.
    fn set_claims(&self, _claims: Arc<dyn Claims>) {}

    /// Hands a target that creates items with ids of its own choosing (a POST) the
    /// durable notes of the names its creates are sent under, kept until the item's
    /// target id is recorded, so that an item a crash left on the target unrecorded is
    /// found again after the source renamed or deleted it. Called once by the projector.
    fn set_creations(&self, _creations: Arc<dyn Creations>) {}

    /// Whether a batch's deletes are applied before its upserts. A target that adopts by
    /// name wants them first: a source item deleted and made again under a new id with the
    /// same name must have its old mirror deleted before the new one looks for its name.
    fn deletes_first(&self) -> bool {
        false
    }

    /// Whether an event that a later event of the same item supersedes is skipped rather
    /// than applied. A target whose writes reach beyond the item (a REST API that deletes
    /// what references a deleted item with it) must get each item's last state only: a
    /// `replay` that wrote an item's history again could delete, through an id the source
    /// gave out twice, a live item's children. A directory target reads the source's
    /// current bytes and counts an older event `stale` instead.
    fn skips_superseded(&self) -> bool {
        false
    }

    /// Whether an upsert that waits for a place another source item holds
    /// ([`ApplyError::Taken`]) still finds it held, for a target that keeps such places
    /// itself (a directory that folds the case of names); `None`: the projector's claims
    /// tell (a target id another source item mirrors).
    fn still_taken(&self, _event: &Event) -> Option<bool> {
        None
    }

    /// Whether an item's key is a place that holds one item of any kind (a directory
    /// target's path: a file, a directory or a link), so that putting one there ends a
    /// retained delete of another kind of item at the same key.
    fn one_item_per_path(&self) -> bool {
        false
    }
}

/// Which source item (identity) each target id of a kind mirrors, for targets that assign
/// their own ids and adopt by name: one target item mirrors at most one source item.
pub trait Claims: Send + Sync {
    /// Claims `target_id` of `kind` for `identity`, unless another source item holds it:
    /// then `Err` with that item's key.
    fn claim(&self, kind: &str, target_id: &str, identity: &str) -> Result<(), String>;

    /// Gives up a claim made for an adoption that was not carried out.
    fn release(&self, kind: &str, target_id: &str, identity: &str);

    /// The key of a source item other than `identity` that `target_id` of `kind` mirrors.
    fn other_owner(&self, kind: &str, target_id: &str, identity: &str) -> Option<String>;

    /// The keys of every item the applied state holds: for a directory target that folds
    /// the case of names, which spelling holds each name there. Read once per run, and
    /// only by such a target.
    fn applied_keys(&self) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
}

/// The names a target's creates of each item were sent under, noted durably before the
/// request goes and forgotten once the projector records the item's target id (or its
/// delete): what finds an item whose create a crash cut off from its record.
#[async_trait]
pub trait Creations: Send + Sync {
    /// Notes that `identity` is about to be created on the target under `name`, and
    /// returns once the note is on disk; an error (the state cannot be written) means the
    /// create must not be sent.
    async fn note(&self, identity: &str, name: &str) -> Result<(), String>;

    /// The names noted for `identity` (none once its target id is recorded).
    fn noted(&self, identity: &str) -> Result<Vec<String>, String>;
}

/// What a target holds at a key ([`Target::holds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The kind of item there: `file`, `dir` or `symlink`.
    pub kind: &'static str,
    /// For a directory, its entries as (kind, key): which of them the plan's deletes remove
    /// decides whether it can go.
    pub entries: Vec<(&'static str, String)>,
}

/// What a target holds where an upsert would go, for `plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Not looked at (the target cannot tell without a request per item).
    Unknown,
    /// Nothing there: the upsert creates it.
    Absent,
    /// The same content is there: the upsert adopts it without writing.
    Equal,
    /// Something else is there: the upsert replaces it.
    Different,
}

/// Builds the target a pipeline is configured with. A directory target is told the
/// pipeline's directory source (if it has one), so that it skips as stale a directory or
/// link upsert the source no longer holds.
pub fn build(pipeline: &PipelineConfig) -> Arc<dyn Target> {
    match &pipeline.target {
        TargetConfig::Dir(cfg) => {
            // Sources with include globs list no directories, so nothing else removes the
            // directories a delete leaves empty.
            let (dirs_are_items, source) = match &pipeline.source {
                SourceConfig::Dir(s) => (s.include.is_empty(), Some(s)),
                SourceConfig::Http(_) => (true, None),
            };
            Arc::new(DirTarget::new(cfg, !dirs_are_items).with_source(source))
        }
        TargetConfig::Http(cfg) => Arc::new(HttpTarget::new(&pipeline.name, cfg)),
    }
}
