//! Events → target: reads from the committed offset, skips events whose content is already
//! applied, applies the rest with bounded concurrency while keeping each key's order, makes
//! the writes durable, records applied state and only then commits the offset.
//!
//! The committed offset is the *next offset to read*: the contiguous prefix of events that
//! finished. A transient failure (disk full, target down) stops the prefix there, and the
//! batch is retried with backoff; a permanent failure is recorded against its key, with a
//! copy of its event, and the offset moves on. Each later run tries the recorded failures
//! once more (`retry_failed`), as their cause may have been fixed by hand meanwhile; one
//! that failed waiting for a referenced item is tried as soon as that item is applied.
//!
//! For targets that assign ids, a remap table keeps (kind, source key) → target id apart
//! from applied state (so a `replay` adopts instead of duplicating). Reference fields are
//! rewritten to target ids before an event is applied; an event whose references are not
//! applied yet is *deferred*: kept in state (so the offset may pass it) and applied as soon
//! as they are. Two items that reference each other are written in two passes: the first
//! without the unresolved fields, then patched. A reference that stays unresolved past
//! the target's reference wait fails its event with a report naming it. A deferred event
//! the target fails transiently keeps waiting, with that error as its reason, and rests a
//! while (a one-shot run ends with its error), while the others go on.
//!
//! A directory delete that finds its directory not empty is *pending*: on a log of several
//! partitions the deletes of its contents are not ordered with it and may come later. It is
//! kept in state and tried again (deepest first, `rmdir` only) after every later batch
//! until the directory is empty and removed; a newer event for the directory supersedes it.
//!
//! A delete read while `prune` is off is *retained*: kept in state and applied once `prune`
//! is on. On a log several daemons share, the retained deletes a daemon keeps are those of
//! the partitions it holds; a mark in the log ([`RETAINED_MARK`]) says where a partition
//! may hold deletes retained by whoever held it, and the daemon that holds it with `prune`
//! on reads them from the log there ([`Projector::apply_retained`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tidemark_proto::{item_identity, version_checksum, version_mtime, Body, Event, Op, Ref};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::DeleteLimit;
use crate::log::{CommitError, EventLog, ReadError, ReadOffsetError, TakeError};
use crate::metrics::{metrics, Metrics, FAILED_AGAIN};
use crate::progress::Progress;
use crate::recurring::{log_recurring, Failing, Recurring};
use crate::state::{
    item_label, Applied, CommitMark, Creating, Deferred, Failure, Outage, OwnerError,
    PendingDelete, Records, ReplayMark, SourceNoted, State, StateError, StoredFailure, Taken,
};
use crate::target::{ApplyError, Claims, Creations, Outcome, Probe, Target};
use crate::writer::{WriterMark, WriterNote, Written};

/// Projection stopped short of the batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectError {
    /// Events could not be read.
    #[error("pipeline `{pipeline}`: {source}")]
    Read {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ReadError,
    },
    /// The committed offset could not be read.
    #[error("pipeline `{pipeline}`: {source}")]
    ReadOffset {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ReadOffsetError,
    },
    /// The committed offset could not be written.
    #[error("pipeline `{pipeline}`: {source}")]
    Commit {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: CommitError,
    },
    /// Applied state could not be read or written.
    #[error("pipeline `{pipeline}`: {source}")]
    State {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: StateError,
    },
    /// The partitions could not be taken for a one-shot run (another process holds some).
    #[error("pipeline `{pipeline}`: {source}")]
    Take {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: TakeError,
    },
    /// The state is another pipeline's: another source's log, another target.
    #[error(transparent)]
    Owner(#[from] OwnerError),
    /// The configured target is not the one the applied state was built on.
    #[error("pipeline `{pipeline}`: the target is now {now}, but what was applied so far went to {was}; nothing is applied until this is settled. To build the new target from the log, run `tidemark replay --pipeline {pipeline} --from 0` and then `tidemark project` (files already equal are adopted, not rewritten); to keep the old target, put its setting back")]
    TargetChanged {
        /// The pipeline.
        pipeline: String,
        /// The target in the state.
        was: String,
        /// The configured target.
        now: String,
    },
    /// The target is gone (a directory target's root removed or not mounted) while the
    /// applied state says items were written to it.
    #[error("pipeline `{pipeline}`: {missing}, but items were applied to it; nothing is applied until it is back: put it back (mount its filesystem), or to build it anew run `tidemark replay --pipeline {pipeline} --from 0` and then `tidemark project`")]
    TargetMissing {
        /// The pipeline.
        pipeline: String,
        /// What is missing.
        missing: String,
    },
    /// The log's committed offsets (a Kafka consumer group's) are behind what this state
    /// committed or applied there itself: projecting from them would apply the topic's
    /// history again onto the live target, old deletes included, so nothing is projected.
    #[error("pipeline `{pipeline}`: the consumer group `{group}` has committed offsets behind what this state has already applied from {log}: {}; projecting from there would apply that history again onto the live target (its old deletes remove files the source has now, until later events put them back), so nothing is projected. The likely cause: the `group` in [pipeline.log.kafka] was changed (or the broker lost the group's offsets, or the topic was made anew). Put the old `group` back; or, to rebuild the target from the whole topic on purpose, run `tidemark replay --pipeline {pipeline} --from 0` and then `tidemark project` (every event is applied again, old deletes included)", behind_text(behind))]
    GroupBehind {
        /// The pipeline.
        pipeline: String,
        /// The consumer group, as configured now.
        group: String,
        /// The log ([`EventLog::identity`]: `kafka:<topic>`).
        log: String,
        /// Per partition behind: the group's committed offset, and what this state last
        /// committed there (`None`: a state from before those were noted, which has
        /// applied items while the group has no offset at all).
        behind: Vec<(u32, u64, Option<u64>)>,
    },
    /// The target was last written by another state, or by a run of this state's history
    /// that this state has not seen ([`crate::writer`]): the reason and what to do.
    #[error("{0}")]
    WrittenElsewhere(String),
    /// The target could not take writes; nothing from the failed event on was committed.
    #[error("pipeline `{pipeline}`: target unavailable: {source}")]
    Apply {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ApplyError,
    },
}

/// The partitions of [`ProjectError::GroupBehind`], as its message lists them.
fn behind_text(behind: &[(u32, u64, Option<u64>)]) -> String {
    behind
        .iter()
        .map(|(p, group, ours)| match ours {
            Some(ours) => format!("partition {p} at offset {group}, while this state committed up to {ours}"),
            None => format!("partition {p} has no committed offset, while this state holds items applied from it"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A projection (a [`Projector::step`], [`Projector::catch_up`], [`Projector::follow`])
/// that an error stopped, with what it had done before: the batches it committed, and of
/// the batch that met the error what was applied and recorded (the finished prefix and
/// what the batch did past the failed event, which a retry skips). A one-shot run reports
/// it, since the target did change.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct Stopped {
    /// What was applied before the error; boxed so a `Result` stays small.
    pub done: Box<ProjectReport>,
    /// The error that stopped the projection.
    #[source]
    pub source: ProjectError,
}

impl From<ProjectError> for Stopped {
    /// An error met before anything was applied.
    fn from(source: ProjectError) -> Stopped {
        Stopped {
            done: Box::default(),
            source,
        }
    }
}

/// What a projection run did, for `project`/`sync` output and reports.
///
/// The outcomes are those the run ended with: an item deferred (waiting for the items it
/// references) and applied later in the run counts once, by the outcome of that apply,
/// and in [`ProjectReport::waited`]; `deferred` counts the items still waiting at the end.
/// The apply metric counts every attempt instead ([`ProjectReport::applies`]).
#[derive(Debug, Default, Clone, Serialize)]
pub struct ProjectReport {
    /// Events read.
    pub events: u64,
    /// Items by the outcome this run left them with.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// The same by kind.
    pub by_kind: BTreeMap<String, BTreeMap<Outcome, u64>>,
    /// Items this run kept waiting (deferred) and then applied: counted in `outcomes` by
    /// that apply's outcome, not as `deferred`.
    #[serde(skip_serializing_if = "is_zero")]
    pub waited: u64,
    /// Events skipped because a later event of the same item was in the log already (a
    /// target that [skips superseded events](crate::target::Target::skips_superseded)):
    /// in `events`, not in `outcomes`.
    #[serde(skip_serializing_if = "is_zero")]
    pub superseded: u64,
    /// Every apply by kind and outcome, as `tidemark_applies_total` counts them: an item
    /// deferred, then created, counts in both.
    #[serde(skip)]
    applies: BTreeMap<(String, Outcome), u64>,
    /// Items counted `deferred` that are still waiting, with their kind: a later outcome
    /// of the item replaces that count.
    #[serde(skip)]
    waiting: BTreeMap<String, String>,
    /// Items of this report counted by another outcome that were not waiting in it: when
    /// it is merged into a run's total, the ones the run had counted `deferred` leave it.
    #[serde(skip)]
    ended: BTreeMap<String, Outcome>,
    /// Items counted `failed`, with their kind: a later outcome of the item in the same
    /// run (tried again once an item it waited for appeared) replaces that count and its
    /// entry in `failures`; a stale one does not, as the failure stays.
    #[serde(skip)]
    failed_items: BTreeMap<String, String>,
    /// Items this report counted by a write made without some of their reference fields
    /// (one side of a cycle, or an item that references itself), with their kind: the
    /// patch that completes the write is the same item's second pass, not another
    /// outcome of it.
    #[serde(skip)]
    written_partially: BTreeMap<String, String>,
    /// Patches this report counted of items it did not see written partially, with the
    /// kind and outcome: when it is merged into a run's total that did, the count leaves
    /// it.
    #[serde(skip)]
    patched: BTreeMap<String, (String, Outcome)>,
    /// Events that failed permanently, with their reasons.
    pub failures: Vec<Failure>,
    /// Committed offset (next to read) when the run ended, summed over partitions. When
    /// the log cannot say (its brokers went away or stopped answering), what this run
    /// last read or committed itself; `None` when it had not for every partition, never
    /// a guess.
    pub committed: Option<u64>,
    /// Content bytes of the events that wrote to the target.
    pub bytes_written: u64,
    /// Items whose last event in this run was stale (the source changed while it was
    /// copied) and that no later event brought: the target lacks their source content.
    #[serde(skip)]
    pub stale_left: u64,
    /// Of the `failed` by kind, those of items already failed before (a retry, or a later
    /// event of the item): counted `failed_again` in the metrics, so that only an item's
    /// first failure raises the failure alert. The report counts every failure.
    #[serde(skip)]
    pub failed_again: BTreeMap<String, u64>,
    /// Set when the deletes retained while `prune` was off were more than `max_delete`
    /// allows and none was applied: why, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retained_withheld: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ProjectReport {
    /// Counts an outcome that is no item's (a record that is not an event).
    fn count(&mut self, kind: &str, outcome: Outcome) {
        *self.applies.entry((kind.to_owned(), outcome)).or_insert(0) += 1;
        self.add(kind, outcome);
    }

    /// Counts the outcome of an apply of item `identity`: a deferral once while the item
    /// waits, and a later outcome in place of it; a write without some reference fields
    /// (`partial`) once with the patch that completes it (`patch`: a write of an item
    /// whose applied version is such a write).
    fn count_item(
        &mut self,
        identity: &str,
        kind: &str,
        outcome: Outcome,
        partial: bool,
        patch: bool,
    ) {
        *self.applies.entry((kind.to_owned(), outcome)).or_insert(0) += 1;
        if outcome != Outcome::Stale {
            self.unfail(identity);
        }
        if patch && Self::completes(outcome) {
            if self.written_partially.remove(identity).is_some() {
                return;
            }
            self.patched
                .insert(identity.to_owned(), (kind.to_owned(), outcome));
        }
        if partial {
            self.written_partially
                .insert(identity.to_owned(), kind.to_owned());
        }
        if outcome == Outcome::Failed {
            self.failed_items
                .insert(identity.to_owned(), kind.to_owned());
        }
        if outcome == Outcome::Deferred {
            if self.waiting.contains_key(identity) {
                return;
            }
            self.ended.remove(identity);
            self.waiting.insert(identity.to_owned(), kind.to_owned());
        } else if let Some(was) = self.waiting.remove(identity) {
            self.end_wait(&was, outcome);
        } else {
            self.ended.insert(identity.to_owned(), outcome);
        }
        self.add(kind, outcome);
    }

    /// Whether a patch with this outcome completed the item's write.
    fn completes(outcome: Outcome) -> bool {
        matches!(
            outcome,
            Outcome::Updated | Outcome::Adopted | Outcome::Unchanged
        )
    }

    /// Takes back one count of `outcome` for `kind`.
    fn less(&mut self, kind: &str, outcome: Outcome) {
        fn less(counts: &mut BTreeMap<Outcome, u64>, outcome: Outcome) {
            if let Some(n) = counts.get_mut(&outcome) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&outcome);
                }
            }
        }
        less(&mut self.outcomes, outcome);
        if let Some(counts) = self.by_kind.get_mut(kind) {
            less(counts, outcome);
            if counts.is_empty() {
                self.by_kind.remove(kind);
            }
        }
    }

    fn add(&mut self, kind: &str, outcome: Outcome) {
        *self.outcomes.entry(outcome).or_insert(0) += 1;
        *self
            .by_kind
            .entry(kind.to_owned())
            .or_default()
            .entry(outcome)
            .or_insert(0) += 1;
    }

    /// Takes back the `failed` count of item `identity`, and its failure, if it has one.
    fn unfail(&mut self, identity: &str) {
        let Some(kind) = self.failed_items.remove(identity) else {
            return;
        };
        if let Some(i) = self
            .failures
            .iter()
            .rposition(|f| item_identity(&f.kind, &f.key) == identity)
        {
            self.failures.remove(i);
        }
        let less = |counts: &mut BTreeMap<Outcome, u64>| {
            if let Some(n) = counts.get_mut(&Outcome::Failed) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&Outcome::Failed);
                }
            }
        };
        less(&mut self.outcomes);
        if let Some(counts) = self.by_kind.get_mut(&kind) {
            less(counts);
            if counts.is_empty() {
                self.by_kind.remove(&kind);
            }
        }
    }

    /// An item of `kind` counted `deferred` got `outcome`.
    fn end_wait(&mut self, kind: &str, outcome: Outcome) {
        fn less(counts: &mut BTreeMap<Outcome, u64>, outcome: Outcome) {
            if let Some(n) = counts.get_mut(&outcome) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&outcome);
                }
            }
        }
        less(&mut self.outcomes, Outcome::Deferred);
        if let Some(counts) = self.by_kind.get_mut(kind) {
            less(counts, Outcome::Deferred);
            if counts.is_empty() {
                self.by_kind.remove(kind);
            }
        }
        if !matches!(
            outcome,
            Outcome::Failed | Outcome::Stale | Outcome::Retained | Outcome::Deferred
        ) {
            self.waited += 1;
        }
    }

    /// Adds what `other`, a later part of the run, did.
    fn merge(&mut self, mut other: ProjectReport) {
        if other.retained_withheld.is_some() {
            self.retained_withheld = other.retained_withheld.take();
        }
        self.events += other.events;
        self.superseded += other.superseded;
        self.stale_left += other.stale_left;
        self.bytes_written += other.bytes_written;
        self.waited += other.waited;
        for (identity, outcome) in &other.ended {
            if let Some(kind) = self.waiting.remove(identity) {
                self.end_wait(&kind, *outcome);
            }
            if *outcome != Outcome::Stale {
                self.unfail(identity);
            }
        }
        for identity in other.waiting.keys() {
            self.unfail(identity);
        }
        // A patch of an item this part saw written partially: counted with that write.
        for (identity, (kind, outcome)) in std::mem::take(&mut other.patched) {
            if self.written_partially.remove(&identity).is_some() {
                other.less(&kind, outcome);
            } else {
                self.patched.insert(identity, (kind, outcome));
            }
        }
        self.written_partially.append(&mut other.written_partially);
        self.failed_items.append(&mut other.failed_items);
        for (identity, kind) in std::mem::take(&mut other.waiting) {
            match self.waiting.entry(identity) {
                // Still waiting: counted once, when it started.
                std::collections::btree_map::Entry::Occupied(_) => {
                    other.end_wait(&kind, Outcome::Deferred)
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(kind);
                }
            }
        }
        for (kind, outcomes) in other.by_kind {
            for (outcome, n) in outcomes {
                *self.outcomes.entry(outcome).or_insert(0) += n;
                *self
                    .by_kind
                    .entry(kind.clone())
                    .or_default()
                    .entry(outcome)
                    .or_insert(0) += n;
            }
        }
        for (key, n) in other.applies {
            *self.applies.entry(key).or_insert(0) += n;
        }
        self.failures.extend(other.failures);
        for (kind, n) in other.failed_again {
            *self.failed_again.entry(kind).or_insert(0) += n;
        }
    }

    /// The count of one outcome.
    pub fn get(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(&outcome).copied().unwrap_or(0)
    }
}

/// One planned action, as `plan` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    /// Offset of the event; none for an event a dry run found but did not append.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// `create`, `update`, `delete`, `retain` (delete not applied: prune is off), `skip`,
    /// `superseded` (a later event of the item follows, so this one changes nothing),
    /// `replace` (the source replaced an item of another kind at this path, `old_kind`:
    /// its delete and this upsert are one change on the target), `retry`: an event a
    /// previous projection kept waiting (for the items it references, or a directory
    /// delete for the directory to empty), or one that failed in an earlier run, tried
    /// again; `wait`: one the run leaves waiting, for a directory on the target to be
    /// empty that holds entries the source does not have (`reason` names them), or `fail`:
    /// one the run fails (`reason` says why).
    pub action: &'static str,
    /// Kind of the item.
    pub kind: String,
    /// Key of the item.
    pub key: String,
    /// The item's name, when the event carries one (a REST kind's `name_field`): a
    /// source id alone does not tell a person which item it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `retry`: when the event started waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<DateTimeUtc>,
    /// For the `retry` of an item that failed in an earlier run: that failure, with its
    /// reason. A plan cannot tell whether its cause is gone; shown so that a retry is not
    /// read as an item that merely waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
    /// For a `replace` (or a `wait` or `fail` where the source changed the kind of item):
    /// the kind of item the source had at this path, whose delete this entry takes in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_kind: Option<String>,
    /// The offset of that item's delete (none when a dry run found it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_offset: Option<u64>,
    /// For `wait` and `fail`: why, as the run would say it, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the event is a delete: what the target holds at its path decides
    /// ([`Projector::plan_places`]).
    #[serde(skip)]
    op: Op,
    /// How the run counts the old item's delete that this entry takes in.
    #[serde(skip)]
    old_outcome: Option<Outcome>,
}

impl PlannedAction {
    fn new(action: &'static str, event: Event, offset: Option<u64>) -> PlannedAction {
        PlannedAction {
            offset,
            action,
            kind: event.kind,
            key: event.key,
            name: event.name,
            waiting_since: None,
            failed: None,
            old_kind: None,
            old_offset: None,
            reason: None,
            op: event.op,
            old_outcome: None,
        }
    }

    /// How the run counts this action, one outcome an event (a `replace` is two: the new
    /// item's upsert and the old one's delete): (kind, outcome), as its report names them.
    pub fn outcomes(&self) -> Vec<(&str, &str)> {
        let outcome = match self.action {
            "create" => "created",
            "update" => "updated",
            "adopt" => "adopted",
            "delete" => "deleted",
            "retain" => "retained",
            "skip" => "unchanged",
            "retry" | "wait" => "deferred",
            "fail" => "failed",
            // The old directory held entries when the upsert came: it waited for the
            // deletes to empty it, and then found nothing in its place.
            "replace" if self.old_outcome == Some(Outcome::Deleted) => "created",
            "replace" => "updated",
            other => other,
        };
        let mut outcomes = vec![(self.kind.as_str(), outcome)];
        if let (Some(kind), Some(old)) = (&self.old_kind, self.old_outcome) {
            outcomes.push((kind.as_str(), old.as_str()));
        }
        outcomes
    }
}

/// The first few of `items`, for a message: `a, b, c and 4 more`.
fn few(items: &[String]) -> String {
    const SHOWN: usize = 3;
    let shown = items[..items.len().min(SHOWN)].join(", ");
    match items.len().saturating_sub(SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// A plan being made ([`Projector::plan_with`]).
struct Plan<'a> {
    applied: &'a Records<Applied>,
    /// Applied versions as the plan goes, so a key's later events see its earlier ones.
    overlay: HashMap<String, Option<Applied>>,
    /// Every key the log still has an event for: that event replaces a waiting one.
    seen: BTreeSet<String>,
    actions: Vec<PlannedAction>,
}

impl Plan<'_> {
    /// Notes `event`, which a later event of its item follows: `project` skips it.
    fn superseded(&mut self, event: Event, offset: Option<u64>) {
        self.seen.insert(event.identity());
        self.actions
            .push(PlannedAction::new("superseded", event, offset));
    }
}

/// What applying one event did to the applied state.
enum Change {
    Keep,
    Put(Applied),
    Remove,
}

struct Done {
    offset: u64,
    identity: String,
    kind: String,
    key: String,
    outcome: Outcome,
    change: Change,
    failure: Option<String>,
    /// New target id (`Some(Some)`), forgotten one (`Some(None)`), or untouched.
    remap: Option<Option<String>>,
    /// The event still waits for references (deferred, or written without them).
    deferred: Option<Event>,
    /// Written without its unresolved reference fields.
    partial: bool,
    /// Written whole over a version written without them: the second pass of a write.
    patch: bool,
    /// A directory delete that found the directory not empty; tried again later.
    waiting_delete: Option<Event>,
    /// A delete not applied because `prune` is off; applied once it is on.
    retained: Option<Event>,
    /// Content bytes the event carries (inline or blob), for progress.
    bytes: u64,
    /// The event a failure keeps for the next run's retry: the failed one, or a stale one
    /// (a newer version of an item that may have failed before).
    retry: Option<Event>,
    /// Deferred because the target item it would adopt mirrors another source item.
    taken: Option<Taken>,
    /// The scan that found the event: a put of a path ends a retained delete of another
    /// kind of item there from the same scan or an earlier one ([`Projector::track_retained`]).
    scan: Option<String>,
}

/// The offset of each item's last event in a partition's backlog ([`Projector::backlog`]).
#[derive(Default)]
struct Backlog {
    last: HashMap<String, u64>,
}

/// What stands of the deletes retained while `prune` was off, once it is on
/// ([`Projector::retained_standing`]).
pub struct RetainedStanding {
    /// Of items the source holds again: left for the next scan to bring up to date.
    pub back: usize,
    /// Why the others are not applied, when they are more than `max_delete` allows.
    pub withheld: Option<String>,
}

/// The offsets of a partition's deletes that a later event of their item follows, and the
/// head they were read up to ([`Projector::superseded_deletes`]).
type SupersededDeletes = (u64, Arc<HashSet<u64>>);

/// A partition's [`Backlog`] and the offset it ends before.
struct BacklogEntry {
    end: u64,
    shared: Arc<Backlog>,
}

/// Target ids of referenced items: the remap table plus what this batch applied so far.
struct Refs<'a> {
    remap: &'a Records<String>,
    fresh: std::sync::Mutex<HashMap<String, Option<String>>>,
    /// Items the batch deletes (and may make again) once the upserts are done: nothing is
    /// put under their old mirrors meanwhile, which the delete (and a cascading target)
    /// would take along; what references them waits until they are through.
    withheld: std::sync::Mutex<HashSet<String>>,
    /// Items the batch applies with only their old target id to go by (after a replay):
    /// the target may make one again under a new id, so what references one waits until
    /// it is through, rather than going with the old id at the same time.
    rebuilt: std::sync::Mutex<HashSet<String>>,
}

impl<'a> Refs<'a> {
    fn new(remap: &'a Records<String>) -> Refs<'a> {
        Refs {
            remap,
            fresh: Default::default(),
            withheld: Default::default(),
            rebuilt: Default::default(),
        }
    }

    /// Of `ready`, those to apply now: not one that references another ready item being
    /// [rebuilt](Refs::rebuilt), which goes first; all of them when each waits for another
    /// (a cycle), so that nothing stalls.
    fn first_of(&self, ready: Vec<String>, pending: &BTreeMap<String, Deferred>) -> Vec<String> {
        let rebuilt = self.rebuilt.lock().expect("not poisoned");
        let set: HashSet<&String> = ready.iter().collect();
        let waits = |id: &String| {
            pending.get(id).is_some_and(|d| {
                d.event.refs.iter().any(|r| {
                    let other = item_identity(&r.kind, &r.key);
                    other != *id && rebuilt.contains(&other) && set.contains(&other)
                })
            })
        };
        let now: Vec<String> = ready.iter().filter(|id| !waits(id)).cloned().collect();
        if now.is_empty() {
            ready
        } else {
            now
        }
    }

    fn target_id(&self, identity: &str) -> Result<Option<String>, StateError> {
        if let Some(id) = self.fresh.lock().expect("not poisoned").get(identity) {
            return Ok(id.clone());
        }
        self.remap.get(identity)
    }

    fn record(&self, identity: &str, id: Option<String>) {
        self.fresh
            .lock()
            .expect("not poisoned")
            .insert(identity.to_owned(), id);
    }

    /// The event with every resolvable reference field holding its target id, and the
    /// references that are not resolvable yet.
    fn resolve(&self, event: &Event) -> Result<(Event, Vec<Ref>), StateError> {
        let mut out = event.clone();
        let mut missing = Vec::new();
        let withheld = self.withheld.lock().expect("not poisoned");
        for r in &event.refs {
            let identity = item_identity(&r.kind, &r.key);
            if withheld.contains(&identity) {
                missing.push(r.clone());
                continue;
            }
            match self.target_id(&identity)? {
                Some(id) => {
                    if let Some(Body::Json(body)) = &mut out.body {
                        if let Some(slot) = body.pointer_mut(&r.path) {
                            *slot = match (&*slot, id.parse::<i64>()) {
                                (serde_json::Value::Number(_), Ok(n)) => n.into(),
                                _ => id.into(),
                            };
                        }
                    }
                }
                None => missing.push(r.clone()),
            }
        }
        Ok((out, missing))
    }
}

/// Which source item each target id mirrors: the remap table read backwards, built at the
/// first question and kept current as remaps are recorded. A target that adopts by name
/// asks it before taking over an item, so two source items with one name never end up
/// mirrored to one target item (the second would overwrite the first's mirror, and its
/// delete would delete it).
struct ClaimTable {
    state: State,
    pipeline: String,
    index: Mutex<Option<ClaimIndex>>,
}

#[derive(Default)]
struct ClaimIndex {
    /// `kind\0target id` → the identities mirrored to it (several only in a state written
    /// before claims were checked).
    owners: HashMap<String, BTreeSet<String>>,
    /// Identity → its `kind\0target id`.
    of: HashMap<String, String>,
}

impl ClaimIndex {
    fn set(&mut self, identity: &str, slot: Option<String>) {
        if let Some(old) = self.of.remove(identity) {
            if let Some(owners) = self.owners.get_mut(&old) {
                owners.remove(identity);
                if owners.is_empty() {
                    self.owners.remove(&old);
                }
            }
        }
        if let Some(slot) = slot {
            self.owners
                .entry(slot.clone())
                .or_default()
                .insert(identity.to_owned());
            self.of.insert(identity.to_owned(), slot);
        }
    }

    fn other(&self, slot: &str, identity: &str) -> Option<String> {
        let other = self.owners.get(slot)?.iter().find(|o| *o != identity)?;
        Some(
            other
                .split_once('\0')
                .map_or(other.as_str(), |(_, key)| key)
                .to_owned(),
        )
    }
}

/// The slot of a target id in the claims: the target id under its kind.
fn slot_of(identity: &str, target_id: &str) -> String {
    let kind = identity.split_once('\0').map_or(identity, |(kind, _)| kind);
    item_identity(kind, target_id)
}

impl ClaimTable {
    fn with<R>(&self, f: impl FnOnce(&mut ClaimIndex) -> R) -> R {
        let mut index = self
            .index
            .lock()
            .expect("the claims lock is never poisoned");
        let index = index.get_or_insert_with(|| {
            let mut built = ClaimIndex::default();
            let read = self.state.remap(&self.pipeline).and_then(|remap| {
                for entry in remap.iter() {
                    let (identity, target_id) = entry?;
                    let slot = slot_of(&identity, &target_id);
                    built.set(&identity, Some(slot));
                }
                Ok(())
            });
            if let Err(e) = read {
                warn!(pipeline = %self.pipeline, "cannot read the remap table to tell which target items are mirrored already: {e}");
            }
            built
        });
        f(index)
    }

    /// Notes remaps as they are recorded, once the table is built (until then the remap
    /// table it is built from holds them).
    fn recorded(&self, remapped: &[(String, Option<String>)]) {
        let mut index = self
            .index
            .lock()
            .expect("the claims lock is never poisoned");
        if let Some(index) = index.as_mut() {
            for (identity, target_id) in remapped {
                index.set(identity, target_id.as_ref().map(|t| slot_of(identity, t)));
            }
        }
    }
}

impl Claims for ClaimTable {
    fn claim(&self, kind: &str, target_id: &str, identity: &str) -> Result<(), String> {
        let slot = item_identity(kind, target_id);
        self.with(|index| match index.other(&slot, identity) {
            Some(other) => Err(other),
            None => {
                index.set(identity, Some(slot));
                Ok(())
            }
        })
    }

    fn release(&self, kind: &str, target_id: &str, identity: &str) {
        let slot = item_identity(kind, target_id);
        self.with(|index| {
            if index.of.get(identity) == Some(&slot) {
                index.set(identity, None);
            }
        })
    }

    fn other_owner(&self, kind: &str, target_id: &str, identity: &str) -> Option<String> {
        let slot = item_identity(kind, target_id);
        self.with(|index| index.other(&slot, identity))
    }

    fn applied_keys(&self) -> Result<Vec<String>, String> {
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(|e| e.to_string())?;
        applied
            .keys()
            .map(|id| {
                let id = id.map_err(|e| e.to_string())?;
                Ok(id
                    .split_once('\0')
                    .map_or(id.as_str(), |(_, key)| key)
                    .to_owned())
            })
            .collect()
    }
}

/// The names each item's creates were sent under, noted before each POST and kept until
/// the item's target id (or its delete) is recorded (`State::creating`): a crash in
/// between leaves the created item on the target with no id in the state, and the target
/// finds it by these names however the source changed the item since.
struct CreateNotes {
    state: State,
    pipeline: String,
    /// The identities with notes, read from the state at the first question (usually
    /// none), so that recording a batch costs no state lookup per item to drop them.
    noted: Mutex<Option<HashSet<String>>>,
    /// Notes written so far, counted.
    written: std::sync::atomic::AtomicU64,
    /// How many of them the last flush made durable. One flush at a time, for every
    /// note written before it began: sled 0.34 runs each flush on its own small pool of
    /// threads, and as many flushes at once as creates in flight took every thread of it
    /// waiting for a write no thread was left to do (the run hung).
    flushed: tokio::sync::Mutex<u64>,
}

impl CreateNotes {
    fn tree(&self) -> Result<Records<Creating>, StateError> {
        self.state.creating(&self.pipeline)
    }

    /// Runs `f` on the identities with notes, read from the state at the first call.
    fn with<R>(&self, f: impl FnOnce(&mut HashSet<String>) -> R) -> Result<R, StateError> {
        let mut noted = self.noted.lock().expect("the notes lock is never poisoned");
        if noted.is_none() {
            *noted = Some(self.tree()?.keys().collect::<Result<_, _>>()?);
        }
        Ok(f(noted.as_mut().expect("just read")))
    }

    /// Drops the notes of `settled` (items whose target id or delete is being recorded),
    /// in the same unflushed write as their applied state, which comes first.
    fn settle<'a>(&self, settled: impl IntoIterator<Item = &'a str>) -> Result<(), StateError> {
        let gone: Vec<&str> = self.with(|noted| {
            settled
                .into_iter()
                .filter(|identity| noted.remove(*identity))
                .collect()
        })?;
        if gone.is_empty() {
            return Ok(());
        }
        self.tree()?.apply(gone.into_iter().map(|k| (k, None)))
    }
}

#[async_trait::async_trait]
impl Creations for CreateNotes {
    async fn note(&self, identity: &str, name: &str) -> Result<(), String> {
        let tree = self.tree().map_err(|e| e.to_string())?;
        let mut creating = tree
            .get(identity)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        if creating.names.iter().any(|n| n == name) {
            return Ok(());
        }
        creating.names.push(name.to_owned());
        tree.put(identity, &creating).map_err(|e| e.to_string())?;
        self.with(|noted| noted.insert(identity.to_owned()))
            .map_err(|e| e.to_string())?;
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed = self.flushed.lock().await;
        if *flushed < mine {
            let upto = self.written.load(Ordering::SeqCst);
            self.state.flush().await.map_err(|e| e.to_string())?;
            *flushed = upto;
        }
        Ok(())
    }

    fn noted(&self, identity: &str) -> Result<Vec<String>, String> {
        if !self
            .with(|noted| noted.contains(identity))
            .map_err(|e| e.to_string())?
        {
            return Ok(Vec::new());
        }
        let tree = self.tree().map_err(|e| e.to_string())?;
        Ok(tree
            .get(identity)
            .map_err(|e| e.to_string())?
            .map(|c| c.names)
            .unwrap_or_default())
    }
}

/// Where the wait of an item whose references did not come in time ends
/// ([`Projector::chain_ends`]), as people read items (`posts `600``).
#[derive(Default)]
struct Chain {
    /// The referenced items that wait themselves for others.
    waiting: Vec<String>,
    /// The items at the ends of the waits, which the target does not have and which
    /// nothing waiting brings: what to add to the source.
    ends: Vec<String>,
}

/// Which failed items wait for which missing items: for each failed upsert, the items it
/// references that had no target id when its failure was recorded (typically a reference
/// that did not resolve within the reference wait). A batch that applies one of those
/// items tries its failed dependents at once ([`Projector::settle_deferred`]), as it
/// settles the items still waiting, without reading the whole failed list after every
/// batch. Built from the failed list at the first question, kept current as failures are
/// recorded.
#[derive(Default)]
struct FailedWaits {
    /// Missing item → the failed items waiting for it.
    dependents: HashMap<String, BTreeSet<String>>,
    /// Failed item → the items it waits for.
    waits_for: HashMap<String, Vec<String>>,
}

impl FailedWaits {
    /// Notes that failed item `identity` waits for `missing` (nothing: it left the failed
    /// list, or waits for no item).
    fn set(&mut self, identity: &str, missing: Vec<String>) {
        for m in self.waits_for.remove(identity).unwrap_or_default() {
            if let Some(d) = self.dependents.get_mut(&m) {
                d.remove(identity);
                if d.is_empty() {
                    self.dependents.remove(&m);
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        for m in &missing {
            self.dependents
                .entry(m.clone())
                .or_default()
                .insert(identity.to_owned());
        }
        self.waits_for.insert(identity.to_owned(), missing);
    }
}

/// The items `event` references that `target_id` knows no target id of (an upsert's
/// references; nothing for a delete).
fn missing_refs(
    event: &Event,
    target_id: impl Fn(&str) -> Result<Option<String>, StateError>,
) -> Result<Vec<String>, StateError> {
    let mut missing = Vec::new();
    if event.op != Op::Upsert {
        return Ok(missing);
    }
    for r in &event.refs {
        let identity = item_identity(&r.kind, &r.key);
        if !missing.contains(&identity) && target_id(&identity)?.is_none() {
            missing.push(identity);
        }
    }
    Ok(missing)
}

/// Removes the fields at `refs`' paths, array elements last-first so indices stay valid.
fn strip_refs(event: &mut Event, refs: &[Ref]) {
    let Some(Body::Json(body)) = &mut event.body else {
        return;
    };
    let mut paths: Vec<&str> = refs.iter().map(|r| r.path.as_str()).collect();
    let key = |p: &str| {
        let (parent, last) = p.rsplit_once('/').unwrap_or(("", p));
        (
            parent.to_owned(),
            std::cmp::Reverse(last.parse::<u64>().unwrap_or(0)),
        )
    };
    paths.sort_by_key(|p| key(p));
    let owned: Vec<String> = paths.into_iter().map(str::to_owned).collect();
    tidemark_proto::strip_fields(body, &owned);
}

#[derive(Default)]
struct GroupResult {
    done: Vec<Done>,
    /// Offset and error of the first transient failure; the group stopped there.
    stopped: Option<(u64, ApplyError)>,
}

/// Brings the stored deferred events up to date with a batch's results: an event deferred
/// again is kept (since its first deferral), any other finished event of a key supersedes
/// that key's deferred one. Keys whose events stopped on a transient failure stay as they are.
fn merge_deferred(
    pending: &mut BTreeMap<String, Deferred>,
    results: &[GroupResult],
    now: DateTimeUtc,
) {
    for d in results.iter().flat_map(|r| &r.done) {
        match &d.deferred {
            Some(event) => {
                let since = pending.get(&d.identity).map_or(now, |p| p.since);
                pending.insert(
                    d.identity.clone(),
                    Deferred {
                        event: event.clone(),
                        since,
                        partial: d.partial,
                        taken: d.taken.clone(),
                        error: None,
                    },
                );
            }
            None => {
                pending.remove(&d.identity);
            }
        }
    }
}

/// Decides from applied state alone what an event needs: `Some(outcome)` when the target
/// need not be touched, `None` when it must be applied.
pub fn decide(event: &Event, prior: Option<&Applied>, prune: bool) -> Option<Outcome> {
    match event.op {
        Op::Upsert if prior.is_some_and(|p| p.version == event.version()) => {
            Some(Outcome::Unchanged)
        }
        Op::Upsert => None,
        Op::Delete if !prune => Some(Outcome::Retained),
        Op::Delete => None,
    }
}

type DateTimeUtc = chrono::DateTime<Utc>;

/// Applied state of the items a batch touches, read ahead.
struct Priors<'a> {
    applied: &'a Records<Applied>,
    read: HashMap<String, Option<Applied>>,
}

impl<'a> Priors<'a> {
    /// Blocking threads reading applied state at once.
    const READERS: usize = 16;

    /// Nothing read ahead: every item's applied state is read when it is applied.
    fn direct(applied: &'a Records<Applied>) -> Priors<'a> {
        Priors {
            applied,
            read: HashMap::new(),
        }
    }

    /// Reads the applied state of `identities` on several blocking threads at once. On a
    /// cold cache each read waits on the disk, and the applies, polled on one task, would
    /// otherwise wait for them one after another (a cold `project` of 1000 changed files
    /// among 100k took 0.86 s, and 0.46 s with the reads ahead). A read that fails here is
    /// simply read again when its item is applied, which reports the error.
    async fn read_ahead(applied: &'a Records<Applied>, identities: Vec<String>) -> Priors<'a> {
        let mut read = HashMap::with_capacity(identities.len());
        if identities.len() >= 2 * Self::READERS {
            let per_reader = identities.len().div_ceil(Self::READERS);
            let readers: Vec<_> = identities
                .chunks(per_reader)
                .map(|chunk| {
                    let (applied, chunk) = (applied.clone(), chunk.to_vec());
                    tokio::task::spawn_blocking(move || {
                        chunk
                            .into_iter()
                            .filter_map(|id| applied.get(&id).ok().map(|prior| (id, prior)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for reader in readers {
                read.extend(reader.await.unwrap_or_default());
            }
        }
        Priors { applied, read }
    }

    fn get(&self, identity: &str) -> Result<Option<Applied>, StateError> {
        match self.read.get(identity) {
            Some(prior) => Ok(prior.clone()),
            None => self.applied.get(identity),
        }
    }
}

/// Makes `tree` hold exactly `keep`, atomically (not yet flushed).
fn replace_all<T: Serialize + serde::de::DeserializeOwned>(
    tree: &Records<T>,
    keep: &BTreeMap<String, T>,
) -> Result<(), StateError> {
    let gone: Vec<String> = tree
        .keys()
        .filter(|k| k.as_ref().map_or(true, |k| !keep.contains_key(k)))
        .collect::<Result<_, _>>()?;
    tree.apply(
        gone.iter()
            .map(|k| (k.as_str(), None))
            .chain(keep.iter().map(|(k, v)| (k.as_str(), Some(v)))),
    )
}

/// The consumer whose committed "offset" of each partition of a log several daemons share
/// marks where that partition may hold deletes retained while `prune` was off (group
/// `<group>.tidemark-retained` on Kafka): 0 for none, else one past the lowest offset of
/// such a delete. Written by the holder that retains one, before it commits past it; the
/// holder with `prune` on reads the partition's deletes that still stand from there, applies
/// them and sets it back to 0. Each daemon's retained state only knows what it read itself,
/// and partitions move between daemons.
pub const RETAINED_MARK: &str = "tidemark-retained";

/// Applies one pipeline's log to its target.
pub struct Projector {
    pipeline: String,
    /// Consumer name the committed offsets are kept under.
    consumer: String,
    log: Arc<dyn EventLog>,
    target: Arc<dyn Target>,
    state: State,
    prune: bool,
    concurrency: usize,
    batch_size: usize,
    /// Longest pause between retries when the target refuses a batch.
    retry_max_backoff: Duration,
    /// Per partition, the offsets past the committed one that a batch stopped by a
    /// transient failure applied and recorded anyway. The retry reads them again; they
    /// are skipped, so a delete is not sent twice and no outcome is counted twice (a
    /// projector stuck on one item must not look busy on a dashboard).
    done_ahead: Mutex<HashMap<u32, BTreeSet<u64>>>,
    /// Per partition, the committed offset as this projector last read it from the log or
    /// committed it: what a run's report says it committed when the log stops answering
    /// at its end ([`ProjectReport::committed`]), instead of nothing.
    known_committed: Mutex<HashMap<u32, u64>>,
    /// Per partition, for a target that skips superseded events, the offset of each
    /// item's last event in what the log held past the committed offset when the
    /// projector first read that partition (a backlog, as after a `replay`); dropped once
    /// the committed offset has passed all of it. Events appended later are compared
    /// within their batch.
    backlog_last: Mutex<HashMap<u32, BacklogEntry>>,
    /// Per partition, for a target that gets every event, the offsets of the deletes that
    /// a later event of their item follows, in what the log held from the committed offset
    /// to the head when it was read, and that head ([`Projector::superseded_deletes`]).
    later_deletes: Mutex<HashMap<u32, SupersededDeletes>>,
    /// Since the run began, items whose last event was stale, with its offset; a later
    /// event of the item applied takes it off ([`ProjectReport::stale_left`]).
    stale: Mutex<HashMap<String, u64>>,
    /// Whether this run has tried the failed items again ([`Projector::retry_failed`]):
    /// once per run, so an item failing again costs one attempt, counted once.
    retried: AtomicBool,
    /// Items that failed in this run before the retry: just tried, so not tried again.
    failed_now: Mutex<HashSet<String>>,
    /// The transient failure that stopped the last pass over the failed items, which a
    /// one-shot run ends with (as with a transient failure of an event in the log).
    retry_stopped: Mutex<Option<ApplyError>>,
    /// When the daemon's next pass over the failed items is due
    /// ([`Projector::retry_failed_when_due`]).
    retry_due: Mutex<RetryDue>,
    /// Which source item each target id mirrors, for a target that adopts by name.
    claims: Arc<ClaimTable>,
    /// The names creates were sent under, until the item's target id is recorded.
    creations: Arc<CreateNotes>,
    /// Set for the last settling of a one-shot run ([`Projector::fail_taken`]): events
    /// waiting for a target item another source item holds fail then, not after the
    /// reference wait.
    last_call: AtomicBool,
    /// What this projector did since a daemon cycle last took it ([`Projector::tally`]):
    /// each report merged where the apply metric counts it, before the batch is
    /// committed, so a cycle that ends at lag 0 holds every apply of the cycle and no
    /// apply lands in two cycles. `None` until the first take: a one-shot run, or a daemon
    /// that only projects, writes no cycle reports and keeps nothing here.
    tally: Mutex<Option<ProjectReport>>,
    /// Which failed items wait for which missing items, so that applying one tries them.
    /// `None` until the first question.
    failed_waits: Mutex<Option<FailedWaits>>,
    /// On a log other processes share, the partitions this process holds since its last
    /// look (`None`: not known yet): a failed item of another partition is not tried here,
    /// as another process may have applied newer events of it.
    holding: Mutex<Option<BTreeSet<u32>>>,
    /// Deferred items whose last try the target failed transiently, by identity: they
    /// rest, so the batches after them do not each wait out a retry budget for them.
    resting: Mutex<HashMap<String, Resting>>,
    /// Set by [`Projector::run`], the daemon: a resting item is tried again after a pause;
    /// a one-shot run tries it once.
    tailing: AtomicBool,
    /// While the daemon retries with backoff (a target that refuses the batch, a log that
    /// cannot be read), what `status` shows of it: the metrics count the errors, but only
    /// this says that the projector is stuck, since when and on what. `None` once a pass
    /// over the partitions succeeds. Kept in the state too ([`State::outages`]), so that a
    /// daemon restarted during an outage says since when it lasts.
    retrying: Mutex<Option<Retrying>>,
    /// The errors the daemon's retries met (without the counts of their give-ups): logged
    /// when the outage begins, at debug while it repeats, as a warning when the error
    /// changes ([`Recurring`]); [`Projector::retried`] says when it ends.
    failing: Recurring<String>,
    /// The items the target fails again and again (at each retry of the failed items, or
    /// of a resting one), by identity: each logged when its failure begins, at debug while
    /// it repeats, as a warning when its error changes ([`Failing`]), and at info when it
    /// goes through ([`Projector::record`]).
    items_failing: Failing<String>,
    /// The configured source (its identity), checked with the target against those the
    /// state notes ([`State::check_owner`]): the log of another config's pipeline of the
    /// same name holds that source's events. `None` checks nothing.
    source: Option<String>,
    /// On a log other processes share, the partitions gained since this process last read
    /// the deletes retained there ([`Projector::read_retained`]): another process may have
    /// retained deletes in them, or applied newer events of items retained here, so they
    /// are read from the log once `prune` is on.
    retained_unread: Mutex<BTreeSet<u32>>,
    /// On a log other processes share, each held partition's [`RETAINED_MARK`] as last read
    /// or written here; dropped when the partition moves.
    retained_marks: Mutex<HashMap<u32, u64>>,
    /// Applies recorded since the last writer mark changed the target (an item written,
    /// deleted or adopted): the next commit takes a new mark and writes the target's note
    /// of it ([`Projector::flush_noted`]).
    unmarked: AtomicBool,
    /// The token of the writer note on the target as this process knows it: that of each
    /// note it read there at a mark, or wrote. A mark keeps it ([`WriterMark::prev`]): a
    /// crash before the mark's note is written leaves that one.
    on_target: Mutex<Option<String>>,
    /// The target's note was found to be another writer's at a mark: this process writes
    /// none over it from then on ([`Projector::mark_writer`]).
    overwritten: AtomicBool,
    /// The pipeline's delete limit, which the deletes retained while `prune` was off are
    /// weighed against when it is turned on ([`Projector::apply_retained`]).
    max_delete: DeleteLimit,
    /// How many retained deletes the limit held back, round by round, for a daemon that
    /// meets it at every pass to warn once.
    retained_guard: Recurring<u64>,
    /// Batches recorded by this process ([`Projector::record`]): what can change the
    /// retained deletes or the applied state.
    recorded: AtomicU64,
    /// The limit's last refusal and the `recorded` count it was made at: a daemon asks
    /// at every pass while idle, and weighing reads every retained delete, the source
    /// path of each and the whole applied state, so the answer stands until a batch.
    retained_held: Mutex<Option<(u64, String)>>,
}

/// The daemon's projector retrying with backoff, as `status` and the cycle reports show
/// it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrying {
    /// Since when, how many attempts, the last error: what the state keeps of it.
    #[serde(flatten)]
    pub outage: Outage,
    /// When the next attempt starts.
    pub next_attempt_at: chrono::DateTime<Utc>,
}

impl Projector {
    /// A projector of `log` onto `target`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pipeline: &str,
        log: Arc<dyn EventLog>,
        target: Arc<dyn Target>,
        state: State,
        prune: bool,
        concurrency: usize,
        batch_size: usize,
    ) -> Projector {
        let claims = Arc::new(ClaimTable {
            state: state.clone(),
            pipeline: pipeline.to_owned(),
            index: Mutex::default(),
        });
        target.set_claims(claims.clone());
        let creations = Arc::new(CreateNotes {
            state: state.clone(),
            pipeline: pipeline.to_owned(),
            noted: Mutex::default(),
            written: Default::default(),
            flushed: Default::default(),
        });
        target.set_creations(creations.clone());
        Projector {
            pipeline: pipeline.to_owned(),
            consumer: format!("{pipeline}.projector"),
            log,
            target,
            state,
            prune,
            concurrency,
            batch_size,
            retry_max_backoff: Duration::from_secs(30),
            done_ahead: Mutex::default(),
            known_committed: Mutex::default(),
            backlog_last: Mutex::default(),
            later_deletes: Mutex::default(),
            stale: Mutex::default(),
            retried: AtomicBool::new(false),
            failed_now: Mutex::default(),
            retry_stopped: Mutex::default(),
            retry_due: Mutex::new(RetryDue::new(Duration::from_secs(5 * 60))),
            claims,
            creations,
            last_call: AtomicBool::new(false),
            tally: Mutex::new(None),
            failed_waits: Mutex::new(None),
            holding: Mutex::new(None),
            resting: Mutex::default(),
            tailing: AtomicBool::new(false),
            unmarked: AtomicBool::new(false),
            on_target: Mutex::new(None),
            overwritten: AtomicBool::new(false),
            retrying: Mutex::new(None),
            failing: Recurring::default(),
            items_failing: Failing::default(),
            source: None,
            retained_unread: Mutex::default(),
            retained_marks: Mutex::default(),
            max_delete: DeleteLimit::Percent(100.0),
            retained_guard: Recurring::default(),
            recorded: AtomicU64::new(0),
            retained_held: Mutex::new(None),
        }
    }

    /// Why `deletes` retained while `prune` was off, applied at once now that it is on,
    /// are more than `max_delete` allows (`None`: they are not). Each scan's deletes are
    /// weighed by the scanner's guard; these are many scans' at once, so they are weighed
    /// together, against the items on the target (the applied state). Not on a log other
    /// processes share: a daemon's applied state there is its partitions' share of the
    /// target, no measure of the whole.
    fn retained_over_limit(&self, deletes: usize) -> Result<Option<String>, ProjectError> {
        Ok(self.retained_limit(deletes)?.map(|(allowed, on_target)| {
            format!(
                "prune is on, and the {deletes} deletes retained while it was off are more than max_delete = {} allows ({allowed} of the {on_target} items on the target): none is applied. If they are intended, raise max_delete in the config and run again (restart a running daemon); `tidemark plan` lists them",
                self.max_delete
            )
        }))
    }

    /// `max_delete`'s allowance and the items on the target, when `deletes` retained
    /// deletes are more than it allows (`None` within it, or not weighed).
    fn retained_limit(&self, deletes: usize) -> Result<Option<(u64, u64)>, ProjectError> {
        if deletes == 0 || self.log.shared() || self.max_delete == DeleteLimit::Percent(100.0) {
            return Ok(None);
        }
        let on_target = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?
            .len() as u64;
        let allowed = self.max_delete.allowed(on_target);
        Ok((deletes as u64 > allowed).then_some((allowed, on_target)))
    }

    /// With `prune` on, why a replay from `from` must not go ahead: it forgets the deletes
    /// retained while prune was off at or after `from` and applies them as the events
    /// they are, which no limit weighs, so a replay applied every delete that `max_delete`
    /// withheld (those of items the source has again aside, as [`Projector::apply_retained`]
    /// leaves them).
    pub async fn replay_unweighed(&self, from: u64) -> Result<Option<String>, ProjectError> {
        if !self.prune {
            return Ok(None);
        }
        let stored = self
            .state
            .retained(&self.pipeline)
            .map_err(self.err_state())?;
        let mut deletes = 0;
        for id in stored.keys() {
            let id = id.map_err(self.err_state())?;
            if let Some(p) = stored.get(&id).map_err(self.err_state())? {
                if p.event.offset >= from && !self.target.source_holds(&p.event).await {
                    deletes += 1;
                }
            }
        }
        Ok(self.retained_limit(deletes)?.map(|(allowed, on_target)| {
            format!(
                "the replay would apply the {deletes} deletes retained while prune was off from offset {from} on, which max_delete = {} withholds ({allowed} of the {on_target} items on the target): a replay applies them as events, unweighed. If they are intended, raise max_delete in the config first; otherwise put prune back off for the replay",
                self.max_delete
            )
        }))
    }

    /// Whether the target applies deletes (`prune = true`).
    pub fn prunes(&self) -> bool {
        self.prune
    }

    /// With `prune` on, what stands of the deletes retained while it was off, as
    /// [`Projector::apply_retained`] weighs them: how many are of items the source holds
    /// again (left for the next scan), and why the others are not applied when together
    /// they are more than `max_delete` allows (`None` within the limit). `None` with prune
    /// off. What `status` shows: one `lstat` per retained delete, only with prune on.
    pub async fn retained_standing(&self) -> Result<Option<RetainedStanding>, ProjectError> {
        if !self.prune {
            return Ok(None);
        }
        let stored = self
            .state
            .retained(&self.pipeline)
            .map_err(self.err_state())?;
        let (mut back, mut standing) = (0, 0);
        for id in stored.keys() {
            let id = id.map_err(self.err_state())?;
            match stored.get(&id).map_err(self.err_state())? {
                Some(p) if self.target.source_holds(&p.event).await => back += 1,
                Some(_) => standing += 1,
                None => {}
            }
        }
        Ok(Some(RetainedStanding {
            back,
            withheld: self.retained_over_limit(standing)?,
        }))
    }

    /// The same, weighing the deletes retained while `prune` was off against `limit`
    /// before it applies them once prune is on.
    pub fn with_max_delete(mut self, limit: DeleteLimit) -> Projector {
        self.max_delete = limit;
        self
    }

    /// The same, checking before it applies anything that the state is this `source`'s
    /// (an identity, as [`State::check_owner`] takes it) and this target's.
    pub fn with_source(mut self, source: String) -> Projector {
        self.source = Some(source);
        self
    }

    /// Refuses a state that is another pipeline's ([`State::check_owner`]); with `record`,
    /// notes the configured source when none is noted (a state of an earlier build).
    pub fn check_owner(&self, record: bool) -> Result<(), ProjectError> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let noted = self
            .state
            .check_owner(&self.pipeline, source, &self.target.identity())?;
        if record && noted == SourceNoted::None {
            self.state
                .sources()
                .and_then(|s| s.put(&self.pipeline, source))
                .map_err(self.err_state())?;
        }
        Ok(())
    }

    /// Whether the daemon's projector is retrying with backoff now, since when and why.
    pub fn retrying(&self) -> Option<Retrying> {
        self.retrying.lock().unwrap().clone()
    }

    /// The outage the last daemon's projector was retrying when it stopped, as the state
    /// keeps it ([`State::outages`]) until a batch goes through: what `status` shows with
    /// no daemon running.
    pub fn noted_outage(&self) -> Option<Outage> {
        self.state
            .outages()
            .and_then(|o| o.get(&self.pipeline))
            .unwrap_or_else(|e| {
                warn!(pipeline = %self.pipeline, "cannot read the outage the last daemon noted: {e}");
                None
            })
    }

    /// Forgets the outage the state keeps, once a batch went through.
    fn forget_outage(&self) {
        if let Err(e) = self.state.outages().and_then(|o| o.remove(&self.pipeline)) {
            warn!(pipeline = %self.pipeline, "cannot clear the outage noted in the state: {e}");
        }
    }

    /// Takes up the outage a daemon stopped during left in the state, if any: the
    /// retrying goes on counting from its start, and ends as any does.
    fn resume_outage(&self) {
        if let Some(outage) = self.noted_outage() {
            *self.retrying.lock().unwrap() = Some(Retrying {
                outage,
                next_attempt_at: Utc::now(),
            });
        }
    }

    /// A one-shot run's batch went through: the outage the last daemon noted, if any, is
    /// over, and is forgotten (else `status` showed it, and the next daemon took it up only
    /// to say it ended).
    fn outage_over(&self) {
        let Some(Outage {
            since, attempts, ..
        }) = self.noted_outage()
        else {
            return;
        };
        self.forget_outage();
        info!(
            pipeline = %self.pipeline,
            attempts,
            since = %since,
            "the outage the last daemon was retrying since {since} ({attempts} failed attempts) is over: a batch went through"
        );
    }

    /// Logs the errors of an attempt of [`Projector::run`] that failed ([`Recurring`]:
    /// once while they stay the same) and notes the attempt, the next one starting after
    /// `delay`.
    fn retry_after(&self, errors: &[ProjectError], delay: Duration) {
        let Some(last) = errors.last() else {
            return;
        };
        for e in errors {
            let message = crate::http::redact_known(&e.to_string()).into_owned();
            let seen = self.failing.met(crate::http::without_tally(&message));
            log_recurring!(
                seen,
                error,
                [],
                format!("{message} (retried with backoff; logged again if the error changes, and when a batch goes through)")
            );
        }
        self.failing.end_round();
        let now = Utc::now();
        // The status names the pipeline already.
        let message = last.to_string();
        let prefix = format!("pipeline `{}`: ", self.pipeline);
        let message = message.strip_prefix(&prefix).unwrap_or(&message);
        let message = crate::http::redact_known(message).into_owned();
        let mut retrying = self.retrying.lock().unwrap();
        let r = retrying.get_or_insert_with(|| Retrying {
            outage: Outage {
                since: now,
                attempts: 0,
                error: String::new(),
            },
            next_attempt_at: now,
        });
        r.outage.attempts += 1;
        r.outage.error = message;
        r.next_attempt_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
        if let Err(e) = self
            .state
            .outages()
            .and_then(|o| o.put(&self.pipeline, &r.outage))
        {
            warn!(pipeline = %self.pipeline, "cannot note the outage in the state: {e}");
        }
    }

    /// Ends the retrying [`Projector::retry_after`] noted, once an attempt succeeded.
    fn retried(&self) {
        self.failing.end_round();
        let Some(r) = self.retrying.lock().unwrap().take() else {
            return;
        };
        let Outage {
            since, attempts, ..
        } = r.outage;
        info!(
            pipeline = %self.pipeline,
            attempts,
            since = %since,
            "the projector goes on: a batch succeeded after {attempts} failed attempts since {since}"
        );
        self.forget_outage();
    }

    /// Sets the pause before the daemon's first pass over the failed items after the one
    /// at its start (`failed_retry_interval`).
    pub fn with_failed_retry_interval(self, first: Duration) -> Projector {
        *self.retry_due.lock().unwrap() = RetryDue::new(first);
        self
    }

    /// Caps the pause between retries of a batch the target refused.
    pub fn with_retry_max_backoff(mut self, max: Duration) -> Projector {
        self.retry_max_backoff = max;
        self
    }

    /// What this projector applied since the last call, for a daemon cycle's report:
    /// items by the outcome they ended with, as a one-shot run's report counts them (an
    /// item deferred and then applied counts by that apply and in `waited`; `deferred`
    /// counts those still waiting). The first call starts the tally and returns nothing.
    pub fn tally(&self) -> ProjectReport {
        self.tally
            .lock()
            .unwrap()
            .replace(ProjectReport::default())
            .unwrap_or_default()
    }

    /// Consumer name of this projector's committed offsets.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn err_state(&self) -> impl Fn(StateError) -> ProjectError + '_ {
        |source| ProjectError::State {
            pipeline: self.pipeline.clone(),
            source,
        }
    }

    /// The committed offset of `partition`: the events below it are applied.
    pub async fn committed(&self, partition: u32) -> Result<u64, ProjectError> {
        let committed = self
            .log
            .committed(&self.consumer, partition)
            .await
            .map_err(|source| ProjectError::ReadOffset {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        self.known_committed
            .lock()
            .unwrap()
            .insert(partition, committed);
        Ok(committed)
    }

    async fn head(&self, partition: u32) -> Result<u64, ProjectError> {
        self.log
            .head(partition)
            .await
            .map_err(|source| ProjectError::Read {
                pipeline: self.pipeline.clone(),
                source,
            })
    }

    /// Events not yet applied, summed over partitions.
    pub async fn lag(&self) -> Result<u64, ProjectError> {
        let mut lag = 0;
        for p in 0..self.log.partitions() {
            lag += self.head(p).await?.saturating_sub(self.committed(p).await?);
        }
        Ok(lag)
    }

    /// The last offset of each item in `partition`'s backlog: read once, from
    /// `committed` to the head, the first time the partition is projected; `None` once
    /// the committed offset has passed it (or there was none).
    async fn backlog(
        &self,
        partition: u32,
        committed: u64,
    ) -> Result<Option<Arc<Backlog>>, ProjectError> {
        if let Some(b) = self.backlog_last.lock().unwrap().get_mut(&partition) {
            if committed >= b.end {
                // All of it applied: its memory goes.
                b.shared = Arc::default();
                return Ok(None);
            }
            return Ok(Some(Arc::clone(&b.shared)));
        }
        let mut last = HashMap::new();
        let head = self
            .read_to_head(partition, committed, |offset, event| {
                last.insert(event.identity(), offset);
            })
            .await?;
        let shared = Arc::new(Backlog { last });
        self.backlog_last.lock().unwrap().insert(
            partition,
            BacklogEntry {
                end: head,
                shared: Arc::clone(&shared),
            },
        );
        Ok((committed < head).then_some(shared))
    }

    /// Reads `partition` from `from` to its head as it is now, handing each event (with
    /// its offset) to `each`; records that are no valid event are passed over. Returns
    /// that head.
    async fn read_to_head(
        &self,
        partition: u32,
        from: u64,
        mut each: impl FnMut(u64, Event),
    ) -> Result<u64, ProjectError> {
        let read_err = |source| ProjectError::Read {
            pipeline: self.pipeline.clone(),
            source,
        };
        let head = self.log.head(partition).await.map_err(read_err)?;
        let mut at = from;
        while at < head {
            let records = self
                .log
                .read(partition, at, self.batch_size.max(1000))
                .await
                .map_err(read_err)?;
            let Some(end) = records.last().map(|r| r.offset + 1) else {
                break;
            };
            for r in records.into_iter().filter(|r| r.offset < head) {
                if let Ok(event) = r.event {
                    each(r.offset, event);
                }
            }
            at = end;
        }
        Ok(head)
    }

    /// The offsets of the deletes in `partition`'s log, from `from` to its head, that a
    /// later event of the same item follows: read through once when a batch meets a
    /// delete of an item the source holds again whose later event is not in the batch (a
    /// `replay` over a history where the item was deleted and made again), and kept while
    /// the deletes asked about lie below the head it was read to. Only deletes are
    /// remembered while reading, not every item, so a long log costs one pass and little
    /// memory.
    async fn superseded_deletes(
        &self,
        partition: u32,
        from: u64,
        offset: u64,
    ) -> Result<Arc<HashSet<u64>>, ProjectError> {
        if let Some((end, set)) = self.later_deletes.lock().unwrap().get(&partition) {
            if offset < *end {
                return Ok(Arc::clone(set));
            }
        }
        let mut open: HashMap<String, u64> = HashMap::new();
        let mut superseded = HashSet::new();
        let head = self
            .read_to_head(partition, from, |offset, event| {
                let id = event.identity();
                if let Some(delete) = open.remove(&id) {
                    superseded.insert(delete);
                }
                if event.op == Op::Delete {
                    open.insert(id, offset);
                }
            })
            .await?;
        let set = Arc::new(superseded);
        self.later_deletes
            .lock()
            .unwrap()
            .insert(partition, (head, Arc::clone(&set)));
        Ok(set)
    }

    /// The offsets of the deletes among `records` that a later event of their item follows
    /// (see [`Projector::superseded_deletes`]); nothing is looked at in a batch without
    /// deletes.
    async fn batch_superseded_deletes(
        &self,
        partition: u32,
        committed: u64,
        records: &[crate::log::Record],
    ) -> Result<HashSet<u64>, ProjectError> {
        let mut superseded = HashSet::new();
        let deletes = |r: &&crate::log::Record| matches!(&r.event, Ok(e) if e.op == Op::Delete);
        if !records.iter().any(|r| deletes(&r)) {
            return Ok(superseded);
        }
        let mut open: HashMap<String, (u64, &Event)> = HashMap::new();
        for record in records {
            if let Ok(event) = &record.event {
                let id = event.identity();
                if let Some((delete, _)) = open.remove(&id) {
                    superseded.insert(delete);
                }
                if event.op == Op::Delete {
                    open.insert(id, (record.offset, event));
                }
            }
        }
        for (offset, event) in open.into_values() {
            if self.target.source_holds(event).await
                && self
                    .superseded_deletes(partition, committed, offset)
                    .await?
                    .contains(&offset)
            {
                superseded.insert(offset);
            }
        }
        Ok(superseded)
    }

    /// Applies one batch of one partition and commits what finished. Returns the report and
    /// the number of records read (0 when caught up). A transient failure is returned as
    /// an error after the finished prefix is committed, with what the batch applied.
    pub async fn step(&self, partition: u32) -> Result<(ProjectReport, usize), Stopped> {
        self.step_showing(partition, None).await
    }

    /// [`Projector::step`], moving `progress` by each key's events as they are applied (a
    /// batch of REST items takes seconds: counting it only once done left the bar at 0),
    /// and by the records it skips at once; a whole batch moves it by the records read.
    async fn step_showing(
        &self,
        partition: u32,
        progress: Option<&Progress>,
    ) -> Result<(ProjectReport, usize), Stopped> {
        let committed = self.committed(partition).await?;
        let records = self
            .log
            .read(partition, committed, self.batch_size)
            .await
            .map_err(|source| ProjectError::Read {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        if records.is_empty() && deferred.is_empty() {
            return Ok((ProjectReport::default(), 0));
        }
        let dir_pending = self
            .state
            .dir_deletes(&self.pipeline)
            .map_err(self.err_state())?;
        let remap = self.state.remap(&self.pipeline).map_err(self.err_state())?;
        let t0 = Instant::now();
        let read = records.len();
        let end = records.last().map_or(committed, |r| r.offset + 1);
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;

        // Each item's last event, in the backlog and in this batch, for a target that
        // gets only that one.
        let skip = self.target.skips_superseded();
        let backlog = if skip {
            self.backlog(partition, committed).await?
        } else {
            None
        };
        let mut last: HashMap<String, u64> = HashMap::new();
        if skip {
            for record in &records {
                if let Ok(event) = &record.event {
                    last.insert(event.identity(), record.offset);
                }
            }
        }
        // A target that gets every event still skips a delete that a later event of its
        // item follows: applied, it removed an item the next event then made again, so a
        // `replay` onto a live target took every item deleted and made again in its
        // history (a directory replaced wholesale, say) off the target for a while. Looked
        // for within the batch, and, for a delete of an item the source holds again, in
        // the log past it.
        let superseded_deletes = if skip {
            HashSet::new()
        } else {
            self.batch_superseded_deletes(partition, committed, &records)
                .await?
        };

        // Group by key, keeping each key's events in log order.
        let mut groups: Vec<Vec<Event>> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        let mut report = ProjectReport {
            events: read as u64,
            ..Default::default()
        };
        let ahead = self
            .done_ahead
            .lock()
            .unwrap()
            .get(&partition)
            .cloned()
            .unwrap_or_default();
        for record in records {
            if ahead.contains(&record.offset) {
                report.events -= 1;
                continue;
            }
            match record.event {
                Ok(event) => {
                    let id = event.identity();
                    let later = |o: Option<&u64>| o.is_some_and(|&o| o > record.offset);
                    if skip
                        && (later(last.get(&id))
                            || later(backlog.as_ref().and_then(|b| b.last.get(&id))))
                        || superseded_deletes.contains(&record.offset)
                    {
                        report.superseded += 1;
                        continue;
                    }
                    let g = *group_of.entry(id).or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                    groups[g].push(event);
                }
                Err(e) => {
                    metrics()
                        .decode_errors
                        .with_label_values(&[&self.pipeline])
                        .inc();
                    error!(
                        pipeline = %self.pipeline,
                        partition = record.partition,
                        offset = record.offset,
                        "skipping a log record that is not a valid event: {e}"
                    );
                    report.count(crate::metrics::INVALID_KIND, Outcome::Failed);
                }
            }
        }
        let grouped: usize = groups.iter().map(Vec::len).sum();
        if let Some(progress) = progress {
            // Skipped (applied ahead, or not an event): nothing to wait for.
            progress.inc((read - grouped) as u64);
        }
        // Directory deletes go last and in order, after the contents they may hold.
        let (dir_deletes, others): (Vec<_>, Vec<_>) = groups
            .into_iter()
            .partition(|g| g[0].op == Op::Delete && g[0].kind == "dir");
        let refs = Refs::new(&remap);
        let priors = Priors::read_ahead(&applied, group_of.keys().cloned().collect()).await;
        let applying = |g: Vec<Event>| {
            let events = g.len() as u64;
            let apply = self.apply_group(g, &priors, &refs, false);
            async move {
                let r = apply.await;
                if let Some(progress) = progress {
                    progress.inc(events);
                }
                r
            }
        };
        // Deletes of a kind the batch's upserts reference go after them: those upserts
        // may move items away from the one deleted, and a target that deletes what
        // references an item along with it (json-server's dependents, `ON DELETE
        // CASCADE`) would take them too. A target that adopts by name takes the other
        // deletes first: an item deleted in the source and made again under a new id with
        // its name must not find (and adopt) the mirror its old id's delete is about to
        // remove.
        // Deferred upserts count too: they are applied after this batch's own, below,
        // and may be moving items away from the one deleted as well.
        let waiting: Vec<Event> = deferred
            .iter()
            .map(|r| r.map(|(_, d)| d.event))
            .collect::<Result<_, _>>()
            .map_err(self.err_state())?;
        let referenced: HashSet<String> = others
            .iter()
            .flatten()
            .chain(&waiting)
            .filter(|e| e.op == Op::Upsert)
            .flat_map(|e| e.refs.iter().map(|r| r.kind.clone()))
            .collect();
        drop(waiting);
        let (last, others): (Vec<_>, Vec<_>) = others
            .into_iter()
            .partition(|g| g[0].op == Op::Delete && referenced.contains(&g[0].kind));
        // Nothing goes under those items' old mirrors meanwhile: an item made again under
        // its deleted id (APIs that hand out the highest id plus one do) gets a new mirror
        // after its delete, and what references it waits for that one.
        let mut held: HashSet<String> = last.iter().map(|g| g[0].identity()).collect();
        // So does what references an item applied again with only its old target id to go
        // by (after a replay): the target may have lost it (deleted by hand, or by a
        // cascade) and make it again under a new id, which its referrers must carry; with
        // the old id they pointed at nothing, and the next level below needed another
        // replay.
        let mut rebuilt = HashSet::new();
        for g in &others {
            let (kind, identity) = (&g[0].kind, g[0].identity());
            if g[0].op == Op::Upsert
                && referenced.contains(kind)
                && priors.get(&identity).map_err(self.err_state())?.is_none()
                && remap.contains(&identity).map_err(self.err_state())?
            {
                held.insert(identity.clone());
                rebuilt.insert(identity);
            }
        }
        *refs.rebuilt.lock().expect("not poisoned") = rebuilt;
        refs.withheld
            .lock()
            .expect("not poisoned")
            .clone_from(&held);
        let (first, then): (Vec<_>, Vec<_>) = if self.target.deletes_first() {
            others.into_iter().partition(|g| g[0].op == Op::Delete)
        } else {
            (Vec::new(), others)
        };
        let mut results: Vec<GroupResult> = Vec::new();
        for phase in [first, then] {
            results.extend(
                stream::iter(phase)
                    .map(applying)
                    .buffer_unordered(self.concurrency)
                    .collect::<Vec<_>>()
                    .await,
            );
        }
        for g in dir_deletes {
            results.push(applying(g).await);
        }
        // The deferred upserts that can go now (those waiting for an item this batch
        // created) go before those deletes too; the deleted keys' own deferred events wait
        // for their deletes, which supersede them.
        let mut pending: BTreeMap<String, Deferred> = deferred
            .iter()
            .collect::<Result<_, _>>()
            .map_err(self.err_state())?;
        merge_deferred(&mut pending, &results, Utc::now());
        let (mut pending, mut settled) = self
            .settle_deferred(pending, &applied, &refs, &held)
            .await?;
        let tail: Vec<GroupResult> = stream::iter(last)
            .map(applying)
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        drop(priors);
        merge_deferred(&mut pending, &tail, Utc::now());
        results.extend(tail);
        // What waited for a deleted item goes now if the batch made it again (under its
        // new mirror); else it keeps waiting.
        if !held.is_empty() {
            refs.withheld.lock().expect("not poisoned").clear();
            let (still, more) = self
                .settle_deferred(pending, &applied, &refs, &HashSet::new())
                .await?;
            pending = still;
            settled.extend(more);
        }
        let (waiting, removed) = self
            .settle_dir_deletes(&group_of, &results, &dir_pending, &applied, &refs)
            .await?;

        let mut next = end;
        let mut transient = None;
        for r in &mut results {
            if let Some((offset, e)) = r.stopped.take() {
                if offset < next {
                    next = offset;
                    transient = Some(e);
                }
            }
        }
        self.keep_dir_times()?;
        if let Err(source) = self.target.flush().await {
            metrics()
                .apply_errors
                .with_label_values(&[&self.pipeline, "transient"])
                .inc();
            return Err(ProjectError::Apply {
                pipeline: self.pipeline.clone(),
                source,
            }
            .into());
        }

        let dones: Vec<Done> = results
            .into_iter()
            .flat_map(|r| r.done)
            .chain(settled)
            .chain(removed)
            .collect();
        let done_ahead: BTreeSet<u64> = dones
            .iter()
            .map(|d| d.offset)
            .chain(ahead)
            .filter(|o| (next..end).contains(o))
            .collect();
        let retained = self
            .state
            .retained(&self.pipeline)
            .map_err(self.err_state())?;
        let retained_changes = self.track_retained(&retained, &dones)?;
        self.mark_retained(&retained_changes).await?;
        self.record(dones, &mut report, Some(partition), &applied, &remap)?;
        retained
            .apply(
                retained_changes
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_ref())),
            )
            .map_err(self.err_state())?;
        replace_all(&deferred, &pending).map_err(self.err_state())?;
        replace_all(&dir_pending, &waiting).map_err(self.err_state())?;
        metrics()
            .deferred_events
            .with_label_values(&[&self.pipeline])
            .set((pending.len() + waiting.len()) as i64);
        let now = Utc::now();
        if next > committed {
            self.state
                .last_applies()
                .and_then(|r| r.put(&self.pipeline, &now))
                .map_err(self.err_state())?;
        }
        self.flush_noted().await?;
        // Counted before the commit: whoever sees the lag reach 0 sees these applies too.
        self.count_applies(&report);
        let m = metrics();
        let p = self.pipeline.as_str();
        if let Err(source) = self.log.commit(&self.consumer, partition, next).await {
            // The batch's writes are on the target and its applied state is durable (a
            // retry finds them applied): the error carries them.
            report.committed = Some(committed);
            return Err(Stopped {
                done: Box::new(report),
                source: ProjectError::Commit {
                    pipeline: self.pipeline.clone(),
                    source,
                },
            });
        }
        report.committed = Some(next);
        if next > committed {
            // After the commit: a mark ahead of the group would refuse the next start.
            if let Err(e) = self.mark_commit(partition, next) {
                return Err(Stopped {
                    done: Box::new(report),
                    source: e,
                });
            }
        }
        self.known_committed
            .lock()
            .unwrap()
            .entry(partition)
            .and_modify(|c| *c = (*c).max(next))
            .or_insert(next);
        let mut ahead = self.done_ahead.lock().unwrap();
        if done_ahead.is_empty() {
            ahead.remove(&partition);
        } else {
            ahead.insert(partition, done_ahead);
        }
        drop(ahead);

        m.apply_duration
            .with_label_values(&[p])
            .observe(t0.elapsed().as_secs_f64());
        // Only progress counts as an apply: a projector stuck retrying must look stuck.
        if next > committed {
            Metrics::set_time(&m.last_apply, p, now);
        }
        if let Some(source) = transient {
            m.apply_errors.with_label_values(&[p, "transient"]).inc();
            return Err(Stopped {
                done: Box::new(report),
                source: ProjectError::Apply {
                    pipeline: self.pipeline.clone(),
                    source,
                },
            });
        }
        Ok((report, read))
    }

    /// Counts what was done in the report and writes applied state, failures and the remap
    /// table (not yet flushed).
    fn record(
        &self,
        dones: impl IntoIterator<Item = Done>,
        report: &mut ProjectReport,
        partition: Option<u32>,
        applied: &Records<Applied>,
        remap: &Records<String>,
    ) -> Result<(), ProjectError> {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        let failures = self
            .state
            .stored_failures(&self.pipeline)
            .map_err(self.err_state())?;
        let mut puts: Vec<(String, Option<Applied>)> = Vec::new();
        let mut failed: Vec<(String, Option<StoredFailure>)> = Vec::new();
        let mut remapped: Vec<(String, Option<String>)> = Vec::new();
        let mut stale = self.stale.lock().unwrap();
        for d in dones {
            if let Some(id) = d.remap.clone() {
                remapped.push((d.identity.clone(), id));
            }
            report.count_item(&d.identity, &d.kind, d.outcome, d.partial, d.patch);
            if !matches!(
                d.outcome,
                Outcome::Failed | Outcome::Deferred | Outcome::Stale
            ) {
                if let Some(f) = self.items_failing.cleared(&d.identity) {
                    info!(
                        pipeline = %self.pipeline,
                        kind = %d.kind,
                        key = %d.key,
                        since = %f.since,
                        "{} `{}` {} after {} failed tries since {}: its failure is over",
                        d.kind,
                        d.key,
                        d.outcome.as_str(),
                        f.tries,
                        f.since
                    );
                }
            }
            if d.outcome == Outcome::Stale {
                stale.insert(d.identity.clone(), d.offset);
            } else if stale.get(&d.identity).is_some_and(|&o| o < d.offset) {
                stale.remove(&d.identity);
            }
            if d.outcome.wrote() {
                report.bytes_written += d.bytes;
            }
            if d.outcome.wrote() || d.outcome == Outcome::Adopted {
                self.unmarked.store(true, Ordering::SeqCst);
                debug!(
                    pipeline = %self.pipeline,
                    partition,
                    offset = d.offset,
                    kind = %d.kind,
                    key = %d.key,
                    outcome = d.outcome.as_str(),
                    "applied"
                );
            }
            match d.failure {
                Some(reason) => {
                    let f = Failure {
                        kind: d.kind.clone(),
                        key: d.key.clone(),
                        name: d.retry.as_ref().and_then(|e| e.name.clone()),
                        offset: d.offset,
                        reason,
                        at: Utc::now(),
                    };
                    report.failures.push(f.clone());
                    let already = match failed.iter().rev().find(|(k, _)| *k == d.identity) {
                        Some((_, earlier)) => earlier.is_some(),
                        None => failures.contains(&d.identity).map_err(self.err_state())?,
                    };
                    if already {
                        *report.failed_again.entry(d.kind.clone()).or_insert(0) += 1;
                    }
                    if !self.retried.load(Ordering::SeqCst) {
                        self.failed_now.lock().unwrap().insert(d.identity.clone());
                    }
                    let stored = StoredFailure {
                        failure: f,
                        event: d.retry.clone(),
                    };
                    failed.push((d.identity.clone(), Some(stored)));
                }
                None if d.outcome != Outcome::Stale => failed.push((d.identity.clone(), None)),
                None => {
                    // A stale event of a failed item is the item's newest version: the
                    // retry tries that one, never the older failed one (a failed delete
                    // must not be applied once the source has the item again).
                    if let Some(event) = d.retry.clone() {
                        let earlier = match failed.iter().rev().find(|(k, _)| *k == d.identity) {
                            Some((_, f)) => f.clone(),
                            None => failures.get(&d.identity).map_err(self.err_state())?,
                        };
                        if let Some(mut f) = earlier.filter(|f| f.failure.offset <= event.offset) {
                            f.event = Some(event);
                            failed.push((d.identity.clone(), Some(f)));
                        }
                    }
                }
            }
            match d.change {
                Change::Keep => {}
                Change::Put(a) => puts.push((d.identity, Some(a))),
                Change::Remove => puts.push((d.identity, None)),
            }
        }
        applied
            .apply(puts.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
            .map_err(self.err_state())?;
        // Written after the applied state they give way to.
        self.creations
            .settle(puts.iter().map(|(k, _)| k.as_str()))
            .map_err(self.err_state())?;
        failures
            .apply(failed.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
            .map_err(self.err_state())?;
        for (identity, new) in &remapped {
            let Some(new) = new else { continue };
            match remap.get(identity).map_err(self.err_state())? {
                Some(old) if old != *new => warn!(
                    pipeline = %self.pipeline,
                    "{} has a new id on the target, {new} (it was {old}: deleted there by hand, or by a cascade?); items of the target that reference it still carry {old}, and no change of theirs is coming to rewrite them: `tidemark replay --from 0` then `tidemark project` does (equal items are adopted, not written again)",
                    identity.replacen('\0', " ", 1)
                ),
                _ => {}
            }
        }
        remap
            .apply(remapped.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
            .map_err(self.err_state())?;
        self.claims.recorded(&remapped);
        if let Some(waits) = self.failed_waits.lock().unwrap().as_mut() {
            for (identity, f) in &failed {
                let missing = match f.as_ref().and_then(|f| f.event.as_ref()) {
                    Some(event) => {
                        missing_refs(event, |id| remap.get(id)).map_err(self.err_state())?
                    }
                    None => Vec::new(),
                };
                waits.set(identity, missing);
            }
        }
        Ok(())
    }

    /// Runs `f` on the index of the items failed items wait for ([`FailedWaits`]), built
    /// from the failed list and the remap table at the first call.
    fn with_failed_waits<R>(
        &self,
        f: impl FnOnce(&mut FailedWaits) -> R,
    ) -> Result<R, ProjectError> {
        let mut waits = self.failed_waits.lock().unwrap();
        if waits.is_none() {
            let remap = self.state.remap(&self.pipeline).map_err(self.err_state())?;
            let stored = self
                .state
                .stored_failures(&self.pipeline)
                .map_err(self.err_state())?;
            let mut built = FailedWaits::default();
            for entry in stored.iter() {
                let (identity, failure) = entry.map_err(self.err_state())?;
                if let Some(event) = &failure.event {
                    let missing =
                        missing_refs(event, |id| remap.get(id)).map_err(self.err_state())?;
                    built.set(&identity, missing);
                }
            }
            *waits = Some(built);
        }
        Ok(f(waits.as_mut().expect("built above")))
    }

    /// Failed items that waited for an item `refs` now has a target id for and that this
    /// process may try (on a shared log, those of the partitions it holds), except those
    /// in `skip`, with their failed events: each of the items in `appeared` (identities)
    /// is looked up once.
    fn revivable(
        &self,
        appeared: &[String],
        refs: &Refs<'_>,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Vec<Event>, ProjectError> {
        let waiting: BTreeSet<String> = self.with_failed_waits(|w| {
            appeared
                .iter()
                .filter_map(|a| w.dependents.get(a))
                .flatten()
                .cloned()
                .collect()
        })?;
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        let holding = self.holding.lock().unwrap().clone();
        let stored = self
            .state
            .stored_failures(&self.pipeline)
            .map_err(self.err_state())?;
        let mut events = Vec::new();
        for identity in waiting {
            if skip(&identity) || !self.held_here(holding.as_ref(), &identity) {
                continue;
            }
            let Some(event) = stored
                .get(&identity)
                .map_err(self.err_state())?
                .and_then(|f| f.event)
            else {
                continue;
            };
            let (_, missing) = refs.resolve(&event).map_err(self.err_state())?;
            if event.op == Op::Upsert && missing.is_empty() {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// Whether this process applies `identity`'s events: always on a log of its own; on
    /// a log other processes share, when it holds the item's partition (`holding`, as
    /// last taken).
    fn held_here(&self, holding: Option<&BTreeSet<u32>>, identity: &str) -> bool {
        !self.log.shared() || holding.is_some_and(|h| h.contains(&self.log.partition_of(identity)))
    }

    /// Passes the target the applied times of the directories it changed, which it gives
    /// them back at the flush ([`Target::changed_dirs`]).
    fn keep_dir_times(&self) -> Result<(), ProjectError> {
        let changed = self.target.changed_dirs();
        if changed.is_empty() {
            return Ok(());
        }
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        // On a log other processes share, a directory's events go to its partition's
        // holder: this process's applied version of one in a partition it does not hold
        // is stale (it held it once), and would take back the time the holder gave it
        // (two daemons left directory times wrong for good). Without one, the target gives
        // the directory back the time it had before the change.
        let holding = self.holding.lock().unwrap().clone();
        let mut times = Vec::with_capacity(changed.len());
        for key in changed {
            let id = item_identity("dir", &key);
            if !self.held_here(holding.as_ref(), &id) {
                continue;
            }
            if let Some(a) = applied.get(&id).map_err(self.err_state())? {
                times.extend(version_mtime(&a.version).map(|ns| (key, ns)));
            }
        }
        self.target.keep_dir_times(times);
        Ok(())
    }

    /// Makes what was applied to the target durable.
    async fn flush_target(&self) -> Result<(), ProjectError> {
        self.keep_dir_times()?;
        self.target
            .flush()
            .await
            .map_err(|source| ProjectError::Apply {
                pipeline: self.pipeline.clone(),
                source,
            })
    }

    /// Sets the deferred-events gauge: the stored deferred events plus `dir_deletes`
    /// waiting directory deletes.
    fn count_deferred(&self, dir_deletes: usize) -> Result<(), ProjectError> {
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        metrics()
            .deferred_events
            .with_label_values(&[&self.pipeline])
            .set((deferred.len() + dir_deletes) as i64);
        Ok(())
    }

    /// Adds a report's applies to the apply counters (every attempt); the failures of
    /// items that were failed already count as `failed_again`, not `failed`. And adds the
    /// report to the daemon cycle's [`Projector::tally`], which counts each item once, by
    /// how it ended.
    fn count_applies(&self, report: &ProjectReport) {
        if let Some(tally) = self.tally.lock().unwrap().as_mut() {
            tally.merge(report.clone());
        }
        let m = metrics();
        for ((kind, outcome), n) in &report.applies {
            let mut n = *n;
            if *outcome == Outcome::Failed {
                let again = report.failed_again.get(kind).copied().unwrap_or(0).min(n);
                if again > 0 {
                    m.applies
                        .with_label_values(&[&self.pipeline, kind, FAILED_AGAIN])
                        .inc_by(again);
                }
                n -= again;
            }
            if n > 0 {
                m.applies
                    .with_label_values(&[&self.pipeline, kind, outcome.as_str()])
                    .inc_by(n);
            }
        }
    }

    /// Directory deletes that found their directory not empty. This batch's (`batch`: the
    /// identities it holds events for) are added; earlier ones for items this batch has a
    /// newer event for are dropped (a directory the source re-created stays); then every
    /// waiting one is tried again, deepest first, so a parent follows its children. The
    /// target only ever removes an empty directory. Returns what still waits and what was
    /// done (a removal counts as `deleted`; a retry that still finds content counts
    /// nothing, the first attempt was counted `deferred`).
    async fn settle_dir_deletes(
        &self,
        batch: &HashMap<String, usize>,
        results: &[GroupResult],
        stored: &Records<PendingDelete>,
        applied: &Records<Applied>,
        refs: &Refs<'_>,
    ) -> Result<(BTreeMap<String, PendingDelete>, Vec<Done>), ProjectError> {
        let now = Utc::now();
        let before: BTreeMap<String, PendingDelete> = stored
            .iter()
            .collect::<Result<_, _>>()
            .map_err(self.err_state())?;
        let mut waiting: BTreeMap<String, PendingDelete> = before
            .iter()
            .filter(|(id, _)| !batch.contains_key(*id))
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        // Each key's events finished in log order: its last one decides.
        for d in results.iter().flat_map(|r| &r.done) {
            match &d.waiting_delete {
                Some(event) => {
                    let since = before.get(&d.identity).map_or(now, |p| p.since);
                    waiting.insert(
                        d.identity.clone(),
                        PendingDelete {
                            event: event.clone(),
                            since,
                        },
                    );
                }
                None => {
                    waiting.remove(&d.identity);
                }
            }
        }
        let mut done = Vec::new();
        // A child's identity extends its parent's, so reverse key order is deepest first.
        let ids: Vec<String> = waiting.keys().rev().cloned().collect();
        for id in ids {
            let event = waiting[&id].event.clone();
            let r = self
                .apply_group(vec![event], &Priors::direct(applied), refs, false)
                .await;
            if let Some((_, e)) = r.stopped {
                warn!(pipeline = %self.pipeline, "{e}; the directory delete is tried again later");
                continue;
            }
            for d in r.done {
                if d.waiting_delete.is_none() {
                    waiting.remove(&id);
                    done.push(d);
                }
            }
        }
        Ok((waiting, done))
    }

    /// Tries the pending directory deletes again outside a batch (the daemon does so while
    /// idle, at most once a second): on a log several daemons share, another one may have
    /// applied the deletes of the contents. Writes the target and state only when a
    /// directory was removed; no offset moves.
    pub async fn retry_dir_deletes(&self) -> Result<ProjectReport, ProjectError> {
        let stored = self
            .state
            .dir_deletes(&self.pipeline)
            .map_err(self.err_state())?;
        if stored.is_empty() {
            return Ok(ProjectReport::default());
        }
        let remap = self.state.remap(&self.pipeline).map_err(self.err_state())?;
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        let refs = Refs::new(&remap);
        let (waiting, done) = self
            .settle_dir_deletes(&HashMap::new(), &[], &stored, &applied, &refs)
            .await?;
        let mut report = ProjectReport::default();
        if done.is_empty() {
            return Ok(report);
        }
        self.flush_target().await?;
        self.record(done, &mut report, None, &applied, &remap)?;
        replace_all(&stored, &waiting).map_err(self.err_state())?;
        self.count_deferred(waiting.len())?;
        self.flush_noted().await?;
        self.count_applies(&report);
        Ok(report)
    }

    /// How a batch changes the retained deletes: a delete retained because `prune` is off
    /// is added; any other event for an item drops its entry (the source has the item
    /// again, or the delete was applied). Each key's events finished in log order, so its
    /// last one decides.
    fn track_retained(
        &self,
        stored: &Records<PendingDelete>,
        dones: &[Done],
    ) -> Result<BTreeMap<String, Option<PendingDelete>>, ProjectError> {
        let mut changes = BTreeMap::new();
        let any_stored = !stored.is_empty();
        let now = Utc::now();
        for d in dones {
            match &d.retained {
                Some(event) => {
                    changes.insert(
                        d.identity.clone(),
                        Some(PendingDelete {
                            event: event.clone(),
                            since: now,
                        }),
                    );
                }
                None if changes.contains_key(&d.identity)
                    || (any_stored
                        && stored.contains(&d.identity).map_err(self.err_state())?) =>
                {
                    changes.insert(d.identity.clone(), None);
                }
                None => {}
            }
        }
        // A path the source has again as another kind of item (a file it replaced by a
        // link or a directory, in the same scan or a later one): the delete retained for
        // the old one no longer stands, as the target holds the new one there. (Its delete
        // would find that and leave it, but `status` and `plan` would count it.)
        if self.target.one_item_per_path() {
            for d in dones.iter().filter(|d| matches!(d.change, Change::Put(_))) {
                let Some(scan) = &d.scan else { continue };
                for kind in ["file", "dir", "symlink"].iter().filter(|k| **k != d.kind) {
                    let other = item_identity(kind, &d.key);
                    let retained_by = match changes.get(&other) {
                        Some(p) => p.as_ref().map(|p| p.event.scan.clone()),
                        None if any_stored => stored
                            .get(&other)
                            .map_err(self.err_state())?
                            .map(|p| p.event.scan),
                        None => None,
                    };
                    if retained_by.is_some_and(|by| by <= *scan) {
                        changes.insert(other, None);
                    }
                }
            }
        }
        Ok(changes)
    }

    /// With `prune` on, applies the deletes retained while it was off: files and links
    /// first, then directories, deepest first (one that still holds entries waits as any
    /// directory delete does). Called once the log is caught up, so an item the source has
    /// again has already dropped its entry. A transient failure stops the pass; what is
    /// left is tried on the next one.
    ///
    /// On a log other processes share, only the deletes of `partitions` (held here) are
    /// applied, and those of a partition gained since its deletes were last read are read
    /// from the log first ([`Projector::read_retained`]): what this process retained there
    /// may be stale (another one applied the item's newer events meanwhile), and another
    /// process (stopped, or retired for good) may have retained deletes there. Once a held
    /// partition has none left, its [`RETAINED_MARK`] is cleared.
    pub async fn apply_retained(&self, partitions: &[u32]) -> Result<ProjectReport, ProjectError> {
        let mut report = ProjectReport::default();
        if !self.prune {
            return Ok(report);
        }
        let recorded = self.recorded.load(Ordering::Relaxed);
        if let Some((at, why)) = &*self.retained_held.lock().unwrap() {
            if *at == recorded {
                report.retained_withheld = Some(why.clone());
                return Ok(report);
            }
        }
        let withheld = metrics()
            .retained_deletes_withheld
            .with_label_values(&[&self.pipeline]);
        let stored = self
            .state
            .retained(&self.pipeline)
            .map_err(self.err_state())?;
        let shared = self.log.shared();
        if shared {
            self.read_retained(partitions, &stored).await?;
        }
        if stored.is_empty() {
            withheld.set(0);
            if shared {
                self.clear_retained_marks(partitions, &stored).await?;
            }
            return Ok(report);
        }
        let (dirs, others): (Vec<String>, Vec<String>) = stored
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err_state())?
            .into_iter()
            .filter(|id| !shared || partitions.contains(&self.log.partition_of(id)))
            .partition(|id| id.starts_with(&item_identity("dir", "")));
        // The source has some of them again (`project` runs no scan to say so): left
        // retained, for the next scan's upsert to settle.
        let mut back = 0;
        let mut kept: [Vec<String>; 2] = Default::default();
        for (ids, kept) in [others, dirs].into_iter().zip(kept.iter_mut()) {
            for id in ids {
                match stored.get(&id).map_err(self.err_state())? {
                    Some(p) if self.target.source_holds(&p.event).await => back += 1,
                    Some(_) => kept.push(id),
                    None => {}
                }
            }
        }
        let [others, dirs] = kept;
        if back > 0 {
            let message = format!(
                "{back} of the deletes retained while prune was off are not applied: the source has those items again, and the next scan brings them up to date"
            );
            // A daemon meets them at every idle pass until its next scan.
            if self.tailing.load(Ordering::SeqCst) {
                debug!(pipeline = %self.pipeline, "{message}");
            } else {
                info!(pipeline = %self.pipeline, "{message}");
            }
        }
        let total = dirs.len() + others.len();
        if total == 0 {
            withheld.set(0);
            self.retained_guard.end_round();
            self.clear_retained_marks(partitions, &stored).await?;
            return Ok(report);
        }
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        if let Some(message) = self.retained_over_limit(total)? {
            withheld.set(total as i64);
            log_recurring!(
                self.retained_guard.met(total as u64),
                warn,
                [pipeline = %self.pipeline,],
                message
            );
            self.retained_guard.end_round();
            *self.retained_held.lock().unwrap() = Some((recorded, message.clone()));
            report.retained_withheld = Some(message);
            return Ok(report);
        }
        *self.retained_held.lock().unwrap() = None;
        withheld.set(0);
        self.retained_guard.end_round();
        info!(
            pipeline = %self.pipeline,
            deletes = total,
            "prune is on: applying the deletes retained while it was off"
        );
        let remap = self.state.remap(&self.pipeline).map_err(self.err_state())?;
        let dir_pending = self
            .state
            .dir_deletes(&self.pipeline)
            .map_err(self.err_state())?;
        // A child's identity extends its parent's, so reverse key order is deepest first.
        let chunks = others
            .chunks(self.batch_size)
            .map(|c| (c.to_vec(), true))
            .chain(
                dirs.into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .chunks(self.batch_size)
                    .map(|c| (c.to_vec(), false)),
            )
            .collect::<Vec<_>>();
        for (ids, concurrent) in chunks {
            let mut events = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(p) = stored.get(id).map_err(self.err_state())? {
                    events.push(p.event);
                }
            }
            let refs = Refs::new(&remap);
            let (concurrent, in_order) = if concurrent {
                (events, Vec::new())
            } else {
                (Vec::new(), events)
            };
            let (dones, waiting, stopped) = self
                .apply_aside(concurrent, in_order, &applied, &refs, &dir_pending)
                .await?;
            let finished: Vec<String> = dones.iter().map(|d| d.identity.clone()).collect();
            self.record(dones, &mut report, None, &applied, &remap)?;
            stored
                .apply(finished.iter().map(|id| (id.as_str(), None)))
                .map_err(self.err_state())?;
            replace_all(&dir_pending, &waiting).map_err(self.err_state())?;
            self.flush_noted().await?;
            if let Some((_, e)) = stopped.into_iter().next() {
                warn!(
                    pipeline = %self.pipeline,
                    "{e}; the deletes retained while prune was off are tried again later"
                );
                break;
            }
        }
        self.count_deferred(dir_pending.len())?;
        self.count_applies(&report);
        if shared {
            self.clear_retained_marks(partitions, &stored).await?;
        }
        Ok(report)
    }

    /// Notes in the log, for each partition of a log other processes share where `changes`
    /// retain a delete, that deletes may stand there from its offset on
    /// ([`RETAINED_MARK`]), before the batch's offset is committed: whichever process holds
    /// the partition once `prune` is on then finds them, even if this one never runs again.
    async fn mark_retained(
        &self,
        changes: &BTreeMap<String, Option<PendingDelete>>,
    ) -> Result<(), ProjectError> {
        if !self.log.shared() {
            return Ok(());
        }
        let mut lowest: BTreeMap<u32, u64> = BTreeMap::new();
        for (id, kept) in changes {
            if let Some(kept) = kept {
                let at = lowest.entry(self.log.partition_of(id)).or_insert(u64::MAX);
                *at = (*at).min(kept.event.offset);
            }
        }
        for (partition, offset) in lowest {
            self.mark_retained_at(partition, offset).await?;
        }
        Ok(())
    }

    /// Moves `partition`'s [`RETAINED_MARK`] down to cover a delete retained at `offset`.
    async fn mark_retained_at(&self, partition: u32, offset: u64) -> Result<(), ProjectError> {
        let mark = self.retained_mark(partition).await?;
        if mark != 0 && mark <= offset + 1 {
            return Ok(());
        }
        self.set_retained_mark(partition, offset + 1).await
    }

    /// `partition`'s [`RETAINED_MARK`], as last read or written here, else from the log.
    async fn retained_mark(&self, partition: u32) -> Result<u64, ProjectError> {
        if let Some(&mark) = self.retained_marks.lock().unwrap().get(&partition) {
            return Ok(mark);
        }
        let mark = self
            .log
            .committed(RETAINED_MARK, partition)
            .await
            .map_err(|source| ProjectError::ReadOffset {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        self.retained_marks.lock().unwrap().insert(partition, mark);
        Ok(mark)
    }

    async fn set_retained_mark(&self, partition: u32, mark: u64) -> Result<(), ProjectError> {
        self.log
            .seek(RETAINED_MARK, partition, mark)
            .await
            .map_err(|source| ProjectError::Commit {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        self.retained_marks.lock().unwrap().insert(partition, mark);
        Ok(())
    }

    /// Clears the [`RETAINED_MARK`] of each of `partitions` (held here, their deletes read)
    /// that no delete retained here stands in any more.
    async fn clear_retained_marks(
        &self,
        partitions: &[u32],
        stored: &Records<PendingDelete>,
    ) -> Result<(), ProjectError> {
        let marked: Vec<u32> = {
            let marks = self.retained_marks.lock().unwrap();
            let unread = self.retained_unread.lock().unwrap();
            partitions
                .iter()
                .filter(|p| marks.get(p).is_some_and(|m| *m != 0) && !unread.contains(p))
                .copied()
                .collect()
        };
        if marked.is_empty() {
            return Ok(());
        }
        let mut left = BTreeSet::new();
        for id in stored.keys() {
            left.insert(self.log.partition_of(&id.map_err(self.err_state())?));
        }
        for p in marked.into_iter().filter(|p| !left.contains(p)) {
            self.set_retained_mark(p, 0).await?;
        }
        Ok(())
    }

    /// For each of `partitions` (held here) not read since this process gained it, replaces
    /// the deletes retained here of its items by those that still stand in the log: from
    /// its [`RETAINED_MARK`] (or the lowest offset retained here, for deletes retained
    /// before the mark existed) up to the committed offset, every item whose last event is
    /// a delete. A partition with neither costs one read of its mark.
    async fn read_retained(
        &self,
        partitions: &[u32],
        stored: &Records<PendingDelete>,
    ) -> Result<(), ProjectError> {
        let unread: Vec<u32> = {
            let unread = self.retained_unread.lock().unwrap();
            partitions
                .iter()
                .filter(|p| unread.contains(p))
                .copied()
                .collect()
        };
        for partition in unread {
            let mark = self.retained_mark(partition).await?;
            let mut from = mark.checked_sub(1);
            let mut here = Vec::new();
            for entry in stored.iter() {
                let (id, kept) = entry.map_err(self.err_state())?;
                if self.log.partition_of(&id) == partition {
                    from = Some(from.map_or(kept.event.offset, |f| f.min(kept.event.offset)));
                    here.push(id);
                }
            }
            if let Some(from) = from {
                let upto = self.committed(partition).await?;
                let standing = self.standing_deletes(partition, from, upto).await?;
                let now = Utc::now();
                let mut changes: Vec<(String, Option<PendingDelete>)> = here
                    .into_iter()
                    .filter(|id| !standing.contains_key(id))
                    .map(|id| (id, None))
                    .collect();
                let superseded = changes.len();
                for (id, event) in standing {
                    if !stored.contains(&id).map_err(self.err_state())? {
                        changes.push((id, Some(PendingDelete { event, since: now })));
                    }
                }
                info!(
                    pipeline = %self.pipeline,
                    partition,
                    from,
                    to = upto,
                    found = changes.len() - superseded,
                    superseded,
                    "read the deletes retained while prune was off from the log"
                );
                stored
                    .apply(
                        changes
                            .iter()
                            .map(|(id, kept)| (id.as_str(), kept.as_ref())),
                    )
                    .map_err(self.err_state())?;
                self.state.flush().await.map_err(self.err_state())?;
            }
            self.retained_unread.lock().unwrap().remove(&partition);
        }
        Ok(())
    }

    /// The items of `partition` whose last event in `from..upto` is a delete, with it.
    async fn standing_deletes(
        &self,
        partition: u32,
        from: u64,
        upto: u64,
    ) -> Result<BTreeMap<String, Event>, ProjectError> {
        let mut standing = BTreeMap::new();
        let mut at = from;
        while at < upto {
            let records = self
                .log
                .read(partition, at, self.batch_size.max(1000))
                .await
                .map_err(|source| ProjectError::Read {
                    pipeline: self.pipeline.clone(),
                    source,
                })?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for record in records.into_iter().filter(|r| r.offset < upto) {
                let Ok(event) = record.event else { continue };
                if event.op == Op::Delete {
                    standing.insert(event.identity(), event);
                } else {
                    standing.remove(&event.identity());
                }
            }
        }
        Ok(standing)
    }

    /// On a log other processes share, when the partitions held change (`held`, of which
    /// `gained` are new, or the first look): the deletes retained here of partitions no
    /// longer held are left to their new holder, through the partition's
    /// [`RETAINED_MARK`] (moved down to cover them, for those retained before the mark
    /// existed); those of the gained ones are read from the log again once `prune` is on.
    async fn hold_retained(
        &self,
        held: &BTreeSet<u32>,
        gained: &BTreeSet<u32>,
    ) -> Result<(), ProjectError> {
        self.retained_marks
            .lock()
            .unwrap()
            .retain(|p, _| held.contains(p) && !gained.contains(p));
        {
            let mut unread = self.retained_unread.lock().unwrap();
            unread.retain(|p| held.contains(p));
            unread.extend(gained);
        }
        let stored = self
            .state
            .retained(&self.pipeline)
            .map_err(self.err_state())?;
        if stored.is_empty() {
            return Ok(());
        }
        let mut lowest: BTreeMap<u32, u64> = BTreeMap::new();
        let mut gone = Vec::new();
        for entry in stored.iter() {
            let (id, kept) = entry.map_err(self.err_state())?;
            let partition = self.log.partition_of(&id);
            if !held.contains(&partition) {
                let at = lowest.entry(partition).or_insert(u64::MAX);
                *at = (*at).min(kept.event.offset);
                gone.push(id);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        for (&partition, &offset) in &lowest {
            self.mark_retained_at(partition, offset).await?;
            self.retained_marks.lock().unwrap().remove(&partition);
        }
        stored
            .apply(gone.iter().map(|id| (id.as_str(), None)))
            .map_err(self.err_state())?;
        self.state.flush().await.map_err(self.err_state())?;
        info!(
            pipeline = %self.pipeline,
            partitions = ?lowest.keys().collect::<Vec<_>>(),
            deletes = gone.len(),
            "deletes retained while prune was off are left to the daemon holding their partitions now"
        );
        Ok(())
    }

    /// Applies events outside the log's order, each on its own (deletes retained while
    /// prune was off, failed items tried again): `concurrent` ones `concurrency` at a time,
    /// then `in_order` ones one after the other (directory deletes, deepest first); then
    /// settles the pending directory deletes and makes the target durable. Returns what
    /// finished (settled directory deletes included), the directory deletes still waiting,
    /// and the first transient error that stopped an event.
    async fn apply_aside(
        &self,
        concurrent: Vec<Event>,
        in_order: Vec<Event>,
        applied: &Records<Applied>,
        refs: &Refs<'_>,
        dir_pending: &Records<PendingDelete>,
    ) -> Result<
        (
            Vec<Done>,
            BTreeMap<String, PendingDelete>,
            Vec<(String, ApplyError)>,
        ),
        ProjectError,
    > {
        let priors = Priors::direct(applied);
        let (mut ids, mut results): (Vec<String>, Vec<GroupResult>) = stream::iter(concurrent)
            .map(|e| {
                let id = e.identity();
                let priors = &priors;
                async move { (id, self.apply_group(vec![e], priors, refs, false).await) }
            })
            .buffer_unordered(self.concurrency)
            .unzip()
            .await;
        for e in in_order {
            ids.push(e.identity());
            results.push(self.apply_group(vec![e], &priors, refs, false).await);
        }
        let mut stopped = Vec::new();
        for (id, r) in ids.into_iter().zip(&mut results) {
            if let Some((_, e)) = r.stopped.take() {
                stopped.push((id, e));
            }
        }
        let (waiting, removed) = self
            .settle_dir_deletes(&HashMap::new(), &results, dir_pending, applied, refs)
            .await?;
        self.flush_target().await?;
        let dones = results
            .into_iter()
            .flat_map(|r| r.done)
            .chain(removed)
            .collect();
        Ok((dones, waiting, stopped))
    }

    /// Tries the items that failed permanently in an earlier run once more, once per run:
    /// at the end of a one-shot `project` or `sync` and when the daemon's projector first
    /// catches up, after the retained deletes (so a failure that `prune = true` fixes, a
    /// directory in a file's place, finds its place empty). The user may have fixed the
    /// cause (set `prune`, removed what was in the way, fixed a permission or the API's
    /// validation), and nothing else would bring the item before it changes in the source.
    ///
    /// Each item's stored event is applied as the log's would be: a success leaves the
    /// failed list and counts its outcome, a failure replaces the old one (counted once:
    /// items that failed earlier in this run are not tried again), and an item whose
    /// references still do not resolve stays as it was. Only a key's newest event is kept
    /// for it (a later event either clears the failure or, when stale, replaces the stored
    /// one), so a retry deletes nothing the log would not, and a delete meets `prune` as
    /// any other does: retained while it is off. On a shared log, only the items of
    /// `partitions` (held by this daemon) are tried. A transient failure stops the pass.
    pub async fn retry_failed(&self, partitions: &[u32]) -> Result<ProjectReport, ProjectError> {
        if self.retried.swap(true, Ordering::SeqCst) {
            return Ok(ProjectReport::default());
        }
        let failed_now = std::mem::take(&mut *self.failed_now.lock().unwrap());
        self.retry_stored(partitions, &failed_now, "in an earlier run")
            .await
    }

    /// The daemon's later passes over the failed items, as [`Projector::retry_failed`]'s
    /// but every item: the first `failed_retry_interval` after the first call, then after
    /// a pause that doubles while a pass leaves failures (up to an hour, or the interval if
    /// longer) and starts again from the interval once none are left. A daemon runs for
    /// weeks; a cause fixed meanwhile (prod's validation, a permission) needs no restart.
    pub async fn retry_failed_when_due(
        &self,
        partitions: &[u32],
    ) -> Result<ProjectReport, ProjectError> {
        if !self.retry_due.lock().unwrap().due(Instant::now()) {
            return Ok(ProjectReport::default());
        }
        let report = self
            .retry_stored(partitions, &HashSet::new(), "earlier")
            .await;
        self.forget_items_gone();
        let left = self
            .state
            .stored_failures(&self.pipeline)
            .map_or(true, |s| !s.is_empty());
        self.retry_due
            .lock()
            .unwrap()
            .passed(Instant::now(), report.is_err() || left);
        report
    }

    /// Tries the stored failures again but those in `skip`; `when` says when they failed.
    async fn retry_stored(
        &self,
        partitions: &[u32],
        skip: &HashSet<String>,
        when: &str,
    ) -> Result<ProjectReport, ProjectError> {
        let mut report = ProjectReport::default();
        let stored = self
            .state
            .stored_failures(&self.pipeline)
            .map_err(self.err_state())?;
        if stored.is_empty() {
            return Ok(report);
        }
        let remap = self.state.remap(&self.pipeline).map_err(self.err_state())?;
        let mut candidates = Vec::new();
        let entries: Vec<(String, StoredFailure)> = stored
            .iter()
            .collect::<Result<_, _>>()
            .map_err(self.err_state())?;
        for (id, f) in entries {
            if skip.contains(&id)
                || (self.log.shared() && !partitions.contains(&self.log.partition_of(&id)))
            {
                continue;
            }
            match f.event {
                Some(event) => candidates.push(event),
                None => {
                    if let Some(event) = self.failed_event_in_log(&id, &f.failure).await {
                        candidates.push(event);
                    }
                }
            }
        }
        // An item whose references do not resolve yet stays as it was; one that a pass
        // brings to the target may be what it references, so the items left are looked
        // at again after every pass that made something, in the same run.
        loop {
            let refs = Refs::new(&remap);
            let (mut events, mut waiting) = (Vec::new(), Vec::new());
            for event in candidates {
                if event.op == Op::Upsert && !event.refs.is_empty() {
                    let (_, missing) = refs.resolve(&event).map_err(self.err_state())?;
                    if !missing.is_empty() {
                        waiting.push(event);
                        continue;
                    }
                }
                events.push(event);
            }
            if events.is_empty() {
                return Ok(report);
            }
            let (pass, stopped) = self.retry_pass(events, &stored, &remap, when).await?;
            let made_it = [Outcome::Created, Outcome::Updated, Outcome::Adopted]
                .iter()
                .any(|o| pass.get(*o) > 0);
            report.merge(pass);
            if stopped || !made_it || waiting.is_empty() {
                return Ok(report);
            }
            candidates = waiting;
        }
    }

    /// One pass of [`Projector::retry_stored`] over `events`, whose references resolve;
    /// also says whether a transient failure stopped it.
    async fn retry_pass(
        &self,
        events: Vec<Event>,
        stored: &Records<StoredFailure>,
        remap: &Records<String>,
        when: &str,
    ) -> Result<(ProjectReport, bool), ProjectError> {
        let mut report = ProjectReport::default();
        let refs = Refs::new(remap);
        info!(
            pipeline = %self.pipeline,
            items = events.len(),
            "trying the items that failed {when} again"
        );
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        let dir_pending = self
            .state
            .dir_deletes(&self.pipeline)
            .map_err(self.err_state())?;
        let retained = self
            .state
            .retained(&self.pipeline)
            .map_err(self.err_state())?;
        // Directory deletes last and deepest first, after the contents they may hold.
        let (mut dir_deletes, others): (Vec<Event>, Vec<Event>) = events
            .into_iter()
            .partition(|e| e.op == Op::Delete && e.kind == "dir");
        dir_deletes.sort_by(|a, b| b.key.cmp(&a.key));
        let (dones, waiting, stopped) = self
            .apply_aside(others, dir_deletes, &applied, &refs, &dir_pending)
            .await?;
        // What the target deferred (a directory still in a file's place, with prune on)
        // waits as any deferred event does.
        let now = Utc::now();
        let newly_deferred: Vec<(String, Deferred)> = dones
            .iter()
            .filter_map(|d| {
                let event = d.deferred.clone()?;
                Some((
                    d.identity.clone(),
                    Deferred {
                        event,
                        since: now,
                        partial: d.partial,
                        taken: d.taken.clone(),
                        error: None,
                    },
                ))
            })
            .collect();
        let retained_changes = self.track_retained(&retained, &dones)?;
        self.mark_retained(&retained_changes).await?;
        self.record(dones, &mut report, None, &applied, remap)?;
        retained
            .apply(
                retained_changes
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_ref())),
            )
            .map_err(self.err_state())?;
        deferred
            .apply(newly_deferred.iter().map(|(k, v)| (k.as_str(), Some(v))))
            .map_err(self.err_state())?;
        replace_all(&dir_pending, &waiting).map_err(self.err_state())?;
        self.count_deferred(waiting.len())?;
        self.flush_noted().await?;
        self.count_applies(&report);
        // An item that stopped on a transient failure stays on the failed list, with what
        // went wrong this time: `status` showing the reason it failed with days ago, while
        // it now meets a 500, would send the on-call person after the wrong cause.
        let mut changes = Vec::new();
        for (id, e) in &stopped {
            if let Some(mut f) = stored.get(id).map_err(self.err_state())? {
                f.failure.reason = format!(
                    "{} (a transient failure when tried again)",
                    crate::http::redact_known(&e.to_string())
                );
                f.failure.at = now;
                changes.push((id.as_str(), f));
            }
        }
        stored
            .apply(changes.iter().map(|(id, f)| (*id, Some(f))))
            .map_err(self.err_state())?;
        let Some((_, e)) = stopped.into_iter().next() else {
            return Ok((report, false));
        };
        self.state.flush().await.map_err(self.err_state())?;
        warn!(
            pipeline = %self.pipeline,
            "{e}; the items that failed earlier are tried again at the next run"
        );
        *self.retry_stopped.lock().unwrap() = Some(e);
        Ok((report, true))
    }

    /// The failed event of a failure recorded before failures kept a copy of it: the log's
    /// event at its offset, if the log still holds it (`compact` may have dropped it).
    async fn failed_event_in_log(&self, identity: &str, f: &Failure) -> Option<Event> {
        let partition = self.log.partition_of(identity);
        let found = match self.log.read(partition, f.offset, 1).await {
            Ok(records) => records
                .into_iter()
                .find(|r| r.offset == f.offset)
                .and_then(|r| r.event.ok())
                .filter(|e| e.identity() == identity),
            Err(e) => {
                warn!(pipeline = %self.pipeline, "{e}");
                None
            }
        };
        if found.is_none() {
            warn!(
                pipeline = %self.pipeline,
                kind = %f.kind,
                key = %f.key,
                "the failed event at offset {} is no longer in the log, so it cannot be tried again; it is applied when the item changes in the source, or after `tidemark replay --pipeline {} --from 0` and `tidemark project`",
                f.offset,
                self.pipeline
            );
        }
        found
    }

    /// The items of `pending` that rest ([`Resting`]): their event failed transiently and
    /// their pause is not over.
    fn resting_now(&self, pending: &BTreeMap<String, Deferred>) -> BTreeSet<String> {
        let now = Instant::now();
        self.resting
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, r)| {
                r.until.is_none_or(|until| now < until)
                    && pending.get(*id).is_some_and(|d| d.event.offset == r.offset)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Lets deferred item `identity`, whose `event` the target just failed transiently
    /// with `e`, rest: in the daemon until a pause that doubles while it keeps failing
    /// (from 1 s up to the longest pause between a batch's retries), in a one-shot run
    /// until the run ends, which ends with the error ([`Projector::still_failing`]).
    /// Counts and logs the error; returns its message, the item's reason to wait.
    fn rest(&self, identity: &str, event: &Event, e: &ApplyError) -> String {
        metrics()
            .apply_errors
            .with_label_values(&[&self.pipeline, "transient"])
            .inc();
        let message = match e {
            ApplyError::Transient { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let mut resting = self.resting.lock().unwrap();
        let first = Duration::from_secs(1).min(self.retry_max_backoff);
        let pause = match resting.get(identity) {
            Some(r) if r.offset == event.offset => {
                (r.pause * 2).min(self.retry_max_backoff.max(first))
            }
            _ => first,
        };
        let tailing = self.tailing.load(Ordering::SeqCst);
        let when = if tailing {
            format!("tried again in {}", humantime::format_duration(pause))
        } else {
            "tried again by the next run".into()
        };
        self.item_failed(
            event,
            &e.to_string(),
            format!("{e}; the item waits and is {when}; the items that do not depend on it go on"),
        );
        resting.insert(
            identity.to_owned(),
            Resting {
                offset: event.offset,
                until: tailing.then(|| Instant::now() + pause),
                pause,
                kind: event.kind.clone(),
                key: event.key.clone(),
                message: message.clone(),
            },
        );
        message
    }

    /// Whether the item of delete `event` never reached the target: no applied state
    /// (`prior`), and nothing where it would be (an item that came and went between two
    /// projections, whose upsert was skipped as stale; a replay). Its delete changes
    /// nothing, so with prune off it is not retained either: `status`, the metrics and
    /// `plan` counted a retained delete that `verify` found nothing of.
    async fn never_reached(&self, event: &Event, prior: Option<&Applied>) -> bool {
        if prior.is_some() {
            return false;
        }
        match self.target.probe(event).await {
            Probe::Absent => true,
            // Another kind of item in its place (a file the source put where this directory
            // was, applied first in the same batch): that item's, nothing of this one.
            Probe::Different => self
                .target
                .holds(&event.key)
                .await
                .is_some_and(|held| held.kind != event.kind),
            Probe::Equal | Probe::Unknown => false,
        }
    }

    /// Logs that the target failed item `event` with `error` (`message`, its log line) as
    /// [`Failing`] says: at error when the item's failure begins, as a warning when its
    /// error changes, at debug while it repeats (a daemon retries it for a night).
    fn item_failed(&self, event: &Event, error: &str, message: String) {
        let error = crate::http::without_tally(&crate::http::redact_known(error));
        let seen = self.items_failing.failed(event.identity(), error);
        log_recurring!(
            seen,
            error,
            [
                pipeline = %self.pipeline,
                kind = %event.kind,
                key = %event.key,
                name = event.name.as_deref(),
                offset = event.offset,
            ],
            message
        );
    }

    /// Forgets the failing items ([`Projector::item_failed`]) neither failed nor waiting
    /// any more: they left without going through (superseded, or another daemon's).
    fn forget_items_gone(&self) {
        let pipeline = &self.pipeline;
        let (Ok(failed), Ok(waiting)) = (
            self.state.stored_failures(pipeline),
            self.state.deferred(pipeline),
        ) else {
            return;
        };
        self.items_failing.retain(|id| {
            failed.contains(id).unwrap_or(true) || waiting.contains(id).unwrap_or(true)
        });
    }

    /// The error of an item the target failed transiently in this run that still waits
    /// (the first by identity), for a one-shot run to end with once it has applied all
    /// else: a transient failure ends a one-shot run (exit 1), as the log's do.
    fn still_failing(&self) -> Result<Option<ApplyError>, ProjectError> {
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        let resting = self.resting.lock().unwrap();
        let mut ids: Vec<&String> = resting.keys().collect();
        ids.sort();
        for id in ids {
            let r = &resting[id];
            let waits = deferred
                .get(id)
                .map_err(self.err_state())?
                .is_some_and(|d| d.event.offset == r.offset);
            if waits {
                return Ok(Some(ApplyError::Transient {
                    kind: r.kind.clone(),
                    key: r.key.clone(),
                    message: format!(
                        "{}; the item waits (what does not depend on it was applied) and the next `sync` or `project` tries it again",
                        r.message
                    ),
                }));
            }
        }
        Ok(None)
    }

    /// Applies the deferred events in `pending` (earlier batches' and this one's) whose
    /// references now resolve, and the failed items that waited for an item applied since
    /// ([`FailedWaits`]), breaks cycles by writing one item without its unresolved
    /// fields, and fails events that waited longer than the target's reference wait. One
    /// the target fails transiently keeps waiting, with the error, and rests
    /// ([`Resting`]); the others go on. Returns what still waits and what was done.
    async fn settle_deferred(
        &self,
        mut pending: BTreeMap<String, Deferred>,
        applied: &Records<Applied>,
        refs: &Refs<'_>,
        held: &HashSet<String>,
    ) -> Result<(BTreeMap<String, Deferred>, Vec<Done>), ProjectError> {
        let now = Utc::now();
        let mut settled = Vec::new();
        // Events the target deferred again although nothing they reference is missing (a
        // directory still in a file's place): tried once per call, as only a later batch
        // can change that. And those the target failed transiently a moment ago: they
        // rest (`Resting`) while the others go on.
        let mut blocked: BTreeSet<String> = self.resting_now(&pending);
        // Failed items that waited for an item the target now has are tried as the
        // waiting ones are: the items given a target id (`refs`' fresh ones, this batch's
        // and each round's) are looked up once each in the index of what failed items
        // wait for.
        let mut looked: HashSet<String> = HashSet::new();
        let mut revived: HashSet<String> = HashSet::new();
        for _round in 0..10_000 {
            let appeared: Vec<String> = refs
                .fresh
                .lock()
                .expect("not poisoned")
                .iter()
                .filter(|(id, target_id)| target_id.is_some() && !looked.contains(*id))
                .map(|(id, _)| id.clone())
                .collect();
            if !appeared.is_empty() {
                looked.extend(appeared.iter().cloned());
                let events = self.revivable(&appeared, refs, |id| {
                    pending.contains_key(id) || held.contains(id) || revived.contains(id)
                })?;
                for event in events {
                    debug!(
                        pipeline = %self.pipeline,
                        kind = %event.kind,
                        key = %event.key,
                        "trying a failed item again: an item it references reached the target"
                    );
                    let id = event.identity();
                    revived.insert(id.clone());
                    pending.insert(
                        id,
                        Deferred {
                            event,
                            since: now,
                            partial: false,
                            taken: None,
                            error: None,
                        },
                    );
                }
            }
            if pending.is_empty() {
                break;
            }
            let mut ready = Vec::new();
            // What each item that may be one side of a cycle waits for, and its offset.
            let mut waits_of: HashMap<&String, (u64, Vec<String>)> = HashMap::new();
            for (id, d) in pending.iter().filter(|(id, _)| !held.contains(*id)) {
                let (_, missing) = refs.resolve(&d.event).map_err(self.err_state())?;
                if missing.is_empty() {
                    // One waiting for a target item another source item holds goes once
                    // that item let it go (deleted, or mirrored elsewhere).
                    let still_claimed = d.taken.as_ref().is_some_and(|t| {
                        self.target.still_taken(&d.event).unwrap_or_else(|| {
                            self.claims
                                .other_owner(&d.event.kind, &t.target_id, id)
                                .is_some()
                        })
                    });
                    if !blocked.contains(id) && !still_claimed {
                        ready.push(id.clone());
                    }
                } else if !blocked.contains(id)
                    && refs.target_id(id).map_err(self.err_state())?.is_none()
                    && missing.iter().all(|r| {
                        // Not a cycle if what it waits for is not tried in this call (it
                        // rests, or the target deferred it again).
                        let waits = item_identity(&r.kind, &r.key);
                        pending.contains_key(&waits)
                            && !held.contains(&waits)
                            && !blocked.contains(&waits)
                    })
                {
                    let waits = missing.iter().map(|r| item_identity(&r.kind, &r.key));
                    waits_of.insert(id, (d.event.offset, waits.collect()));
                }
            }
            // Only items that wait, directly or through other such items, for nothing but
            // one another: a chain that ends at an item that is missing (or not tried now)
            // is no cycle, and writing one of its items without its references would
            // leave it so (a comment whose post waits for a user dev never had).
            let mut alive: HashSet<&String> = waits_of.keys().copied().collect();
            loop {
                let dead: Vec<&String> = alive
                    .iter()
                    .filter(|id| waits_of[*id].1.iter().any(|w| !alive.contains(w)))
                    .copied()
                    .collect();
                if dead.is_empty() {
                    break;
                }
                for id in dead {
                    alive.remove(id);
                }
            }
            let cyclic = alive
                .iter()
                .min_by_key(|id| waits_of[*id].0)
                .map(|id| (waits_of[*id].0, (*id).clone()));
            let (batch, partial) = match (ready.is_empty(), cyclic) {
                (false, _) => (refs.first_of(ready, &pending), false),
                (true, Some((_, id))) => (vec![id], true),
                (true, None) => break,
            };
            let taken: Vec<Deferred> = batch.iter().filter_map(|id| pending.remove(id)).collect();
            let since: HashMap<String, (DateTimeUtc, bool)> = taken
                .iter()
                .map(|d| (d.event.identity(), (d.since, d.partial)))
                .collect();
            let priors = Priors::direct(applied);
            let out: Vec<(String, GroupResult)> = stream::iter(taken.clone())
                .map(|d| {
                    let id = d.event.identity();
                    let apply = self.apply_group(vec![d.event], &priors, refs, partial);
                    async move { (id, apply.await) }
                })
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
            for (id, r) in out {
                if let Some((_, e)) = r.stopped {
                    // The target failed this one for now: it waits, with that error as
                    // its reason, and rests; the others go on, the next rounds too (what
                    // this round created may be what they wait for).
                    if let Some(d) = taken.iter().find(|d| d.event.identity() == id) {
                        let mut d = d.clone();
                        d.error = Some(self.rest(&id, &d.event, &e));
                        blocked.insert(id.clone());
                        pending.insert(id, d);
                    }
                }
                for mut d in r.done {
                    self.resting.lock().unwrap().remove(&d.identity);
                    // Waiting written without some references (a cycle's first pass) and
                    // now written whole: its patch, whose applied state is not stored yet.
                    if since.get(&d.identity).is_some_and(|(_, partial)| *partial) && !d.partial {
                        d.patch = true;
                    }
                    if d.outcome == Outcome::Deferred {
                        blocked.insert(d.identity.clone());
                    }
                    if let Some(event) = &d.deferred {
                        let (at, was_partial) =
                            since.get(&d.identity).copied().unwrap_or((now, false));
                        pending.insert(
                            d.identity.clone(),
                            Deferred {
                                event: event.clone(),
                                since: at,
                                partial: d.partial || was_partial,
                                taken: d.taken.clone(),
                                error: None,
                            },
                        );
                    }
                    settled.push(d);
                }
            }
        }
        // A failed item tried again stays failed, not waiting, unless it was applied (or
        // the target deferred it): one the target kept failing, or left for another round.
        if !revived.is_empty() {
            let done: HashSet<&str> = settled.iter().map(|d| d.identity.as_str()).collect();
            pending.retain(|id, _| !revived.contains(id) || done.contains(id.as_str()));
        }
        // Only a wait for references, or for a target item another source item holds,
        // expires; what waits for the target (a directory in the way) waits as long as
        // that directory's delete does. A target item still held at the end of a one-shot
        // run ([`Projector::fail_taken`]) fails then: its holder's delete would have come.
        let wait = self.target.reference_wait();
        let last_call = self.last_call.load(Ordering::SeqCst);
        let mut expired = Vec::new();
        for (id, d) in &pending {
            let waited = (now - d.since).to_std().unwrap_or_default() >= wait;
            let due = waited || (last_call && d.taken.is_some());
            if held.contains(id) || !due {
                continue;
            }
            let (_, missing) = refs.resolve(&d.event).map_err(self.err_state())?;
            if !missing.is_empty() {
                if waited {
                    expired.push((id.clone(), missing));
                }
            } else if d.taken.is_some() {
                expired.push((id.clone(), missing));
            }
        }
        // Where each expired item's wait ends: a referenced item that waits itself (or
        // failed waiting) for another is not what is missing, the item at the end of that
        // chain is (a comment whose post waits for a user dev does not have: the user).
        let expired_waits: HashMap<String, Vec<String>> = expired
            .iter()
            .map(|(id, missing)| {
                let waits = missing.iter().map(|r| item_identity(&r.kind, &r.key));
                (id.clone(), waits.collect())
            })
            .collect();
        let mut chains: HashMap<String, Chain> = HashMap::new();
        for (id, missing) in &expired {
            let chain = self.chain_ends(missing, &expired_waits, &pending, refs)?;
            chains.insert(id.clone(), chain);
        }
        for (id, missing) in expired {
            let Some(d) = pending.remove(&id) else {
                continue;
            };
            let named: Vec<String> = missing
                .iter()
                .map(|r| format!("{} `{}` (at {})", r.kind, r.key, r.path))
                .collect();
            // Referenced items that wait themselves because the target fails them: the
            // source has them, so that is what to look at.
            let failing: Vec<String> = missing
                .iter()
                .filter(|r| {
                    pending
                        .get(&item_identity(&r.kind, &r.key))
                        .is_some_and(|p| p.error.is_some())
                })
                .map(|r| format!("{} `{}`", r.kind, r.key))
                .collect();
            let chain = chains.remove(&id).unwrap_or_default();
            let advice = if !failing.is_empty() && failing.len() == missing.len() {
                format!(
                    "the target keeps failing {} (`status` says how)",
                    failing.join(", ")
                )
            } else if !chain.waiting.is_empty() && !chain.ends.is_empty() {
                let ends = chain.ends.join(", ");
                format!(
                    "{} {} for {ends}, which the target does not have either; add {ends} to the source or fix the reference",
                    chain.waiting.join(", "),
                    if chain.waiting.len() == 1 { "waits itself" } else { "wait themselves" },
                )
            } else {
                "add the referenced item to the source or fix the reference".into()
            };
            let reason = match &d.taken {
                Some(t) if missing.is_empty() => t.reason.clone(),
                _ => format!(
                    "references {}, which did not appear on the target within {}; {advice} (the item is tried again as soon as the referenced item reaches the target, at the next run, or when it changes)",
                    named.join(", "),
                    humantime::format_duration(wait)
                ),
            };
            self.item_failed(&d.event, &reason, reason.clone());
            metrics()
                .apply_errors
                .with_label_values(&[&self.pipeline, "permanent"])
                .inc();
            settled.push(Done {
                offset: d.event.offset,
                identity: id,
                kind: d.event.kind.clone(),
                key: d.event.key.clone(),
                outcome: Outcome::Failed,
                change: Change::Keep,
                failure: Some(reason),
                remap: None,
                deferred: None,
                partial: false,
                patch: false,
                waiting_delete: None,
                retained: None,
                bytes: 0,
                retry: Some(d.event.clone()),
                taken: None,
                scan: None,
            });
        }
        Ok((pending, settled))
    }

    /// Follows the references `missing` of an item whose wait ran out through the
    /// referenced items that wait themselves: those still waiting (`pending`), expiring
    /// with it (`expired`) or failed waiting for others (the failed items' waits), to the
    /// items at the ends, which nothing brings. An item waiting for the target rather
    /// than for references (failing, or holding a name) ends a chain without being
    /// missing.
    fn chain_ends(
        &self,
        missing: &[Ref],
        expired: &HashMap<String, Vec<String>>,
        pending: &BTreeMap<String, Deferred>,
        refs: &Refs<'_>,
    ) -> Result<Chain, ProjectError> {
        let waits_of = |id: &str| -> Result<Option<Vec<String>>, ProjectError> {
            if let Some(waits) = expired.get(id) {
                return Ok(Some(waits.clone()));
            }
            if let Some(d) = pending.get(id) {
                let (_, missing) = refs.resolve(&d.event).map_err(self.err_state())?;
                let waits = missing.iter().map(|r| item_identity(&r.kind, &r.key));
                return Ok(Some(waits.collect()));
            }
            self.with_failed_waits(|w| w.waits_for.get(id).cloned())
        };
        let label = |id: &str| match id.split_once('\0') {
            Some((kind, key)) => format!("{kind} `{key}`"),
            None => format!("`{id}`"),
        };
        let mut chain = Chain::default();
        let mut seen: HashSet<String> = HashSet::new();
        let mut next: Vec<String> = Vec::new();
        for r in missing {
            let id = item_identity(&r.kind, &r.key);
            if waits_of(&id)?.is_some() && !chain.waiting.contains(&label(&id)) {
                chain.waiting.push(label(&id));
            }
            next.push(id);
        }
        next.reverse();
        while let Some(id) = next.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            match waits_of(&id)? {
                Some(waits) => next.extend(waits.into_iter().rev()),
                None => chain.ends.push(label(&id)),
            }
        }
        Ok(chain)
    }

    async fn apply_group(
        &self,
        events: Vec<Event>,
        priors: &Priors<'_>,
        refs: &Refs<'_>,
        partial: bool,
    ) -> GroupResult {
        let mut result = GroupResult::default();
        let identity = events[0].identity();
        let mut prior = match priors.get(&identity) {
            Ok(p) => p,
            Err(e) => {
                let offset = events[0].offset;
                result.stopped = Some((
                    offset,
                    ApplyError::Transient {
                        kind: events[0].kind.clone(),
                        key: events[0].key.clone(),
                        message: format!("cannot read applied state: {e}"),
                    },
                ));
                return result;
            }
        };
        for event in events {
            let done = |outcome, change, failure| Done {
                offset: event.offset,
                identity: identity.clone(),
                kind: event.kind.clone(),
                key: event.key.clone(),
                outcome,
                change,
                failure,
                remap: None,
                deferred: None,
                partial: false,
                patch: false,
                waiting_delete: None,
                retained: None,
                bytes: tidemark_proto::content_len(event.body.as_ref(), event.blob.as_ref()),
                retry: None,
                taken: None,
                scan: Some(event.scan.clone()),
            };
            if let Some(mut outcome) = decide(&event, prior.as_ref(), self.prune) {
                if outcome == Outcome::Retained && self.never_reached(&event, prior.as_ref()).await
                {
                    // Nothing of it to keep: `unchanged`, as with prune on.
                    outcome = Outcome::Unchanged;
                }
                let mut d = done(outcome, Change::Keep, None);
                if outcome == Outcome::Retained {
                    d.retained = Some(event.clone());
                }
                result.done.push(d);
                continue;
            }
            let transient = |message: String| ApplyError::Transient {
                kind: event.kind.clone(),
                key: event.key.clone(),
                message,
            };
            // What the target knows the item by: applied state, else the remap table (a
            // replay or a cycle's first pass), as a prior without a version.
            let known = match refs.target_id(&identity) {
                Ok(id) => id,
                Err(e) => {
                    result.stopped = Some((
                        event.offset,
                        transient(format!("cannot read the remap table: {e}")),
                    ));
                    break;
                }
            };
            let target_prior = match (&prior, known) {
                (Some(p), Some(id)) if p.target_id.is_none() => Some(Applied {
                    target_id: Some(id),
                    ..p.clone()
                }),
                (None, Some(id)) => Some(Applied {
                    version: String::new(),
                    offset: 0,
                    target_id: Some(id),
                }),
                (p, _) => p.clone(),
            };
            let mut to_apply = None;
            let mut written_partially = false;
            // The applied version is a write without some reference fields: this one,
            // written whole, is its patch.
            let was_partial = prior
                .as_ref()
                .is_some_and(|p| p.version.starts_with("partial:"));
            if event.op == Op::Upsert && !event.refs.is_empty() {
                let (resolved, missing) = match refs.resolve(&event) {
                    Ok(r) => r,
                    Err(e) => {
                        result.stopped = Some((
                            event.offset,
                            transient(format!("cannot read the remap table: {e}")),
                        ));
                        break;
                    }
                };
                if !missing.is_empty() && !partial {
                    let mut d = done(Outcome::Deferred, Change::Keep, None);
                    d.deferred = Some(event.clone());
                    result.done.push(d);
                    continue;
                }
                let mut resolved = resolved;
                if !missing.is_empty() {
                    strip_refs(&mut resolved, &missing);
                    written_partially = true;
                }
                to_apply = Some(resolved);
            }
            match self
                .target
                .apply(to_apply.as_ref().unwrap_or(&event), target_prior.as_ref())
                .await
            {
                Ok(effect) => {
                    let mut remap = None;
                    let change = match (event.op, effect.outcome) {
                        (_, Outcome::Stale | Outcome::Deferred) => Change::Keep,
                        (Op::Upsert, _) => {
                            let target_id = effect.target_id.or_else(|| {
                                target_prior.as_ref().and_then(|p| p.target_id.clone())
                            });
                            if let Some(id) = &target_id {
                                refs.record(&identity, Some(id.clone()));
                                remap = Some(Some(id.clone()));
                            }
                            let a = Applied {
                                version: if written_partially {
                                    format!("partial:{}", event.version())
                                } else {
                                    event.version()
                                },
                                offset: event.offset,
                                target_id,
                            };
                            prior = Some(a.clone());
                            Change::Put(a)
                        }
                        (Op::Delete, _) => {
                            if target_prior.as_ref().is_some_and(|p| p.target_id.is_some())
                                || effect.target_id.is_some()
                            {
                                refs.record(&identity, None);
                                remap = Some(None);
                            }
                            prior = None;
                            Change::Remove
                        }
                    };
                    let mut d = done(effect.outcome, change, None);
                    d.remap = remap;
                    if effect.outcome == Outcome::Stale {
                        d.retry = Some(event.clone());
                    }
                    if effect.outcome == Outcome::Deferred {
                        match event.op {
                            Op::Delete => d.waiting_delete = Some(event.clone()),
                            // A directory still holds its place (its contents' deletes are
                            // not all applied yet): tried again after each batch.
                            Op::Upsert => d.deferred = Some(event.clone()),
                        }
                    }
                    if written_partially {
                        d.deferred = Some(event.clone());
                        d.partial = true;
                    } else {
                        d.patch = was_partial;
                    }
                    result.done.push(d);
                }
                Err(e @ ApplyError::Transient { .. }) => {
                    // The batch's error (its first such item) is what the caller logs, once
                    // per retry: a full disk fails every item, and a line each drowned it.
                    debug!(
                        pipeline = %self.pipeline,
                        kind = %event.kind,
                        key = %event.key,
                        offset = event.offset,
                        "{e}; will retry"
                    );
                    result.stopped = Some((event.offset, e));
                    break;
                }
                Err(ApplyError::Taken {
                    kind,
                    key,
                    target_id,
                    message,
                }) => {
                    // The other item's delete may be in a later batch: wait for it.
                    debug!(
                        pipeline = %self.pipeline,
                        kind = %event.kind,
                        key = %event.key,
                        offset = event.offset,
                        "waiting for another source item to let go of the target item it would adopt: {message}"
                    );
                    let mut d = done(Outcome::Deferred, Change::Keep, None);
                    d.deferred = Some(event.clone());
                    d.taken = Some(Taken {
                        target_id,
                        reason: format!("{kind} `{key}`: {message}"),
                    });
                    result.done.push(d);
                }
                Err(e @ ApplyError::Permanent { .. }) => {
                    metrics()
                        .apply_errors
                        .with_label_values(&[&self.pipeline, "permanent"])
                        .inc();
                    self.item_failed(
                        &event,
                        &e.to_string(),
                        format!(
                            "{e}; once the cause is fixed it is tried again: by a running daemon every failed_retry_interval, otherwise by the next `sync` or `project` (or, with the daemon stopped, `tidemark replay --pipeline {} --from {}` then `tidemark project`)",
                            self.pipeline,
                            event.offset
                        ),
                    );
                    let mut d = done(Outcome::Failed, Change::Keep, Some(e.to_string()));
                    d.retry = Some(event.clone());
                    result.done.push(d);
                }
            }
        }
        result
    }

    /// Projects until every partition is caught up with the head as it was at the start,
    /// or until `stop` fires: then the batch in flight is finished and committed, and no
    /// other is started. An error returns what was applied before it.
    pub async fn catch_up(
        &self,
        progress: &Progress,
        stop: &CancellationToken,
    ) -> Result<ProjectReport, Stopped> {
        let mut total = ProjectReport::default();
        let run = async {
            self.recover().await?;
            self.catch_up_to_heads(progress, &mut total, stop).await
        };
        match run.await {
            Ok(()) => Ok(total),
            Err(source) => Err(self.stopped(total, source).await),
        }
    }

    /// Projects while a scan appends (`sync`): applies each whole batch (`batch_size`
    /// events) as soon as the log holds it, until `scanning` fires, then catches up with the
    /// head as it is then. A large sync fills the target while the source is still being
    /// read, instead of after it; per-key order, idempotence and the commit rule are those
    /// of every other step. An error returns what was applied before it.
    ///
    /// Only whole batches: every step ends with a filesystem sync and two database
    /// flushes, and a target may list itself once per batch (`prefetch_names`). Applying
    /// whatever had arrived made a re-sync of 1000 changed files among 100k take
    /// 1.35–1.53 s instead of 0.98–1.22 s (4 runs each, cold cache, 2 cores).
    ///
    /// Once `stop` fires, the batch in flight is finished and committed, and no other is
    /// started: the events the scan appended beyond it wait in the log for the next run.
    pub async fn follow(
        &self,
        progress: &Progress,
        scanning: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<ProjectReport, Stopped> {
        let mut total = ProjectReport::default();
        match self.follow_into(progress, scanning, stop, &mut total).await {
            Ok(()) => Ok(total),
            Err(source) => Err(self.stopped(total, source).await),
        }
    }

    /// [`Projector::follow`], adding what it applies to `total` as it goes.
    async fn follow_into(
        &self,
        progress: &Progress,
        scanning: &CancellationToken,
        stop: &CancellationToken,
        total: &mut ProjectReport,
    ) -> Result<(), ProjectError> {
        self.recover().await?;
        let least = self.batch_size as u64;
        while !scanning.is_cancelled() && !stop.is_cancelled() {
            let mut read = 0;
            for p in 0..self.log.partitions() {
                if self.head(p).await? < self.committed(p).await? + least {
                    continue;
                }
                read += self.step_into(p, Some(progress), total).await?;
            }
            if read == 0 {
                // Nothing new: wait for the scanner's next append (or its end).
                let wanted = self.committed(0).await? + least - 1;
                tokio::select! {
                    biased;
                    _ = scanning.cancelled() => {}
                    _ = stop.cancelled() => {}
                    _ = self.log.wait_beyond(0, wanted, Duration::from_millis(200)) => {}
                }
            }
        }
        self.catch_up_to_heads(progress, total, stop).await
    }

    /// One [`Projector::step`], adding what it applied to `total`, also when it fails, and
    /// moving `progress`. Returns the records read.
    async fn step_into(
        &self,
        partition: u32,
        progress: Option<&Progress>,
        total: &mut ProjectReport,
    ) -> Result<usize, ProjectError> {
        match self.step_showing(partition, progress).await {
            Ok((report, read)) => {
                if let Some(progress) = progress {
                    progress.add_bytes(report.bytes_written);
                }
                total.merge(report);
                if read > 0 {
                    self.outage_over();
                }
                Ok(read)
            }
            Err(Stopped { done, source }) => {
                total.merge(*done);
                Err(source)
            }
        }
    }

    /// The error that stopped a projection, with what it applied before: `done`, with the
    /// committed offsets as they are now (those the log cannot say, as this run last read
    /// or committed them) and the items left stale.
    async fn stopped(&self, mut done: ProjectReport, source: ProjectError) -> Stopped {
        let mut committed = Some(0);
        for p in 0..self.log.partitions() {
            let c = match self.committed(p).await {
                Ok(c) => Some(c),
                Err(_) => self.known_committed.lock().unwrap().get(&p).copied(),
            };
            committed = committed.zip(c).map(|(sum, c)| sum + c);
        }
        done.committed = committed;
        done.stale_left = self.stale.lock().unwrap().len() as u64;
        Stopped {
            done: Box::new(done),
            source,
        }
    }

    /// Projects every partition up to its head as it is now, adding what it applies to
    /// `total`, whose committed offset it sets. Once `stop` fires no further batch is
    /// started, and neither are the retries of waiting, retained or failed items.
    async fn catch_up_to_heads(
        &self,
        progress: &Progress,
        total: &mut ProjectReport,
        stop: &CancellationToken,
    ) -> Result<(), ProjectError> {
        let mut targets = Vec::new();
        let mut remaining = 0;
        for p in 0..self.log.partitions() {
            let head = self.head(p).await?;
            remaining += head.saturating_sub(self.committed(p).await?);
            targets.push((p, head));
        }
        progress.set_remaining(remaining);
        let mut stepped = false;
        for &(p, head) in &targets {
            while !stop.is_cancelled() && self.committed(p).await? < head {
                let read = self.step_into(p, Some(progress), total).await?;
                stepped = true;
                if read == 0 {
                    break;
                }
            }
        }
        if stop.is_cancelled() {
            total.committed = Some(self.committed_sum(&targets).await?);
            total.stale_left = self.stale.lock().unwrap().len() as u64;
            return Ok(());
        }
        // As the daemon does on every pass, even when the log holds nothing new, what
        // earlier batches kept waiting is tried again: items waiting for their references
        // (which fail once `reference_wait` is over) and directory deletes waiting for the
        // directory to empty. Every step settles both, so only a run without one needs to.
        if !stepped {
            let deferred = self
                .state
                .deferred(&self.pipeline)
                .map_err(self.err_state())?;
            match targets.first() {
                Some(&(p, _)) if !deferred.is_empty() => {
                    self.step_into(p, None, total).await?;
                }
                _ => total.merge(self.retry_dir_deletes().await?),
            }
        }
        let partitions: Vec<u32> = targets.iter().map(|&(p, _)| p).collect();
        total.merge(self.apply_retained(&partitions).await?);
        let retried = self.retry_failed(&partitions).await?;
        let made_it = [Outcome::Created, Outcome::Updated, Outcome::Adopted]
            .iter()
            .any(|o| retried.get(*o) > 0);
        total.merge(retried);
        // Items waiting for one that failed earlier and has just made it go now, not at
        // the next run: one more step settles them (the log holds nothing new).
        if made_it {
            let deferred = self
                .state
                .deferred(&self.pipeline)
                .map_err(self.err_state())?;
            if let Some(&(p, _)) = targets.first().filter(|_| !deferred.is_empty()) {
                self.step_into(p, None, total).await?;
            }
        }
        if let Some(&(p, _)) = targets.first() {
            self.fail_taken(p, total).await?;
        }
        // An item the target failed transiently waited while the run went on; the run
        // ends with its error now, as with a transient failure of an event in the log.
        // So does a failed item tried again that met a transient failure.
        let retry_stopped = self.retry_stopped.lock().unwrap().take();
        if let Some(source) = self.still_failing()?.or(retry_stopped) {
            return Err(ProjectError::Apply {
                pipeline: self.pipeline.clone(),
                source,
            });
        }
        total.committed = Some(self.committed_sum(&targets).await?);
        total.stale_left = self.stale.lock().unwrap().len() as u64;
        // With nothing to read (a log that could not be read then), the run going through
        // ends the outage too.
        self.outage_over();
        Ok(())
    }

    /// The committed offsets of the partitions of `targets` (partition, head), summed.
    async fn committed_sum(&self, targets: &[(u32, u64)]) -> Result<u64, ProjectError> {
        let mut sum = 0;
        for &(p, _) in targets {
            sum += self.committed(p).await?;
        }
        Ok(sum)
    }

    /// The end of a one-shot run: an event still waiting for a target item another source
    /// item holds fails now, with the target's reason (two source items with one name).
    /// The run has applied the whole log, the retained deletes and the retries, so the
    /// other item's delete, had the source deleted it, would have let the target item go
    /// already. One more settling (on `partition`, with nothing new to read) applies
    /// those it did let go and fails the others.
    async fn fail_taken(
        &self,
        partition: u32,
        total: &mut ProjectReport,
    ) -> Result<(), ProjectError> {
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        let mut taken = false;
        for entry in deferred.iter() {
            let (_, d) = entry.map_err(self.err_state())?;
            taken |= d.taken.is_some();
        }
        if !taken {
            return Ok(());
        }
        self.last_call.store(true, Ordering::SeqCst);
        let settled = self.step_into(partition, None, total).await;
        self.last_call.store(false, Ordering::SeqCst);
        settled.map(|_| ())
    }

    /// The target the state was built on, when the config now names another one.
    pub fn changed_target(&self) -> Result<Option<String>, ProjectError> {
        let was = self
            .state
            .targets()
            .and_then(|t| t.get(&self.pipeline))
            .map_err(self.err_state())?;
        Ok(was
            .map(crate::state::resolved_identity)
            .filter(|was| *was != self.target.identity()))
    }

    /// Checks that the configured target is the one the applied state was built on, and
    /// with `record` notes it when no target is noted yet: after `path` or `base_url`
    /// changes, skipping the events already applied would leave the new target empty
    /// while lag reads 0. A noted target that never got anything (a first run that the
    /// target refused: a read-only mount, a path that is a file) is no such target: the
    /// configured one takes its place, and with `record` is noted instead. A target root
    /// that is gone, or no longer the filesystem it was, is refused too
    /// ([`Projector::check_mount`]).
    pub async fn check_target(&self, record: bool) -> Result<(), ProjectError> {
        self.check_owner(record)?;
        self.check_identity(record).await?;
        self.check_mount(record).await?;
        self.check_writer().await
    }

    /// How the target's writer note stands to this state ([`crate::writer::judge`]); on a
    /// log other processes share, several states project into one target by design, so
    /// nothing is told there ([`Written::Unnoted`]). One read of the note.
    pub async fn written(&self) -> Result<Written, ProjectError> {
        Ok(self.read_written().await?.0)
    }

    /// [`Projector::written`], with the token of the note read.
    async fn read_written(&self) -> Result<(Written, Option<String>), ProjectError> {
        if self.log.shared() {
            return Ok((Written::Unnoted, None));
        }
        let Some(note) = self.target.writer_note().await else {
            return Ok((Written::Unnoted, None));
        };
        let token = note.mark.token.clone();
        let mark = (self.state.writer_mark(&self.pipeline)).map_err(self.err_state())?;
        Ok((crate::writer::judge(Some(note), mark.as_ref()), Some(token)))
    }

    /// Refuses to project from a state that has applied items when the target was last
    /// written by another state, or by a run of this state's history this state has not
    /// seen (a backup restored, a copy used elsewhere): what that history did is not here,
    /// so what it wrote and the source deleted would stay for good. A state with nothing
    /// applied (a new one, or after `replay --from 0`) takes the target over. The note let
    /// pass is the one this process knows on the target ([`Projector::on_target`]): another
    /// found there at its next mark was written by another process meanwhile.
    async fn check_writer(&self) -> Result<(), ProjectError> {
        let (written, token) = self.read_written().await?;
        self.judge_writer(written)?;
        if token.is_some() {
            *self.on_target.lock().unwrap() = token;
        }
        Ok(())
    }

    /// [`Projector::check_writer`]'s verdict on `written`.
    fn judge_writer(&self, written: Written) -> Result<(), ProjectError> {
        if written.elsewhere().is_none() {
            return Ok(());
        }
        let applied = self.state.applied(&self.pipeline);
        if applied.map_err(self.err_state())?.is_empty() {
            return Ok(());
        }
        if let Written::Other(n) = &written {
            // Another pipeline of this state: a rename put back, as its warning advises.
            let theirs = (self.state.writer_mark(&n.pipeline)).map_err(self.err_state())?;
            if theirs.is_some_and(|m| m.state == n.mark.state) {
                warn!(
                    pipeline = %self.pipeline,
                    "the target was last written by pipeline `{}` of this state ({}): if that was this pipeline renamed, what it wrote that the source has deleted since stays on the target (`tidemark verify` lists it)",
                    n.pipeline, n.describe()
                );
                return Ok(());
            }
        }
        let mark = (self.state.writer_mark(&self.pipeline)).map_err(self.err_state())?;
        let target = self.target.identity();
        let target = target.strip_prefix("dir ").unwrap_or(&target);
        match written.refusal(&self.pipeline, target, mark.as_ref()) {
            Some(why) => Err(ProjectError::WrittenElsewhere(why)),
            None => Ok(()),
        }
    }

    /// Makes what was applied durable in the state (flushes it), with a new writer mark
    /// when the applies changed the target ([`Projector::mark_writer`]), then writes the
    /// target's note of that mark: every commit of applies to the target goes through here
    /// (a batch's; a pass over the retained deletes, the failed items or the directory
    /// deletes waiting), so a run that only applied those is noted too (a backup of the
    /// state from before such a run was not refused: a file it deleted that the source
    /// then had again as it was was never written back). A mark per commit that changed
    /// the target, not per run: a daemon's state copied while it runs (a snapshot of its
    /// volume) is then refused once the daemon changed the target after the copy; with a
    /// mark per process it never was. A commit that changed nothing (all unchanged,
    /// superseded, failed, retained or deferred) writes no note: the target is as the
    /// state's last mark left it.
    async fn flush_noted(&self) -> Result<(), ProjectError> {
        let mark = self.mark_writer().await?;
        self.state.flush().await.map_err(self.err_state())?;
        if let Some(mark) = mark {
            self.note_writer(mark).await;
        }
        Ok(())
    }

    /// The state's next mark, put in the state write of a commit whose applies changed the
    /// target ([`Projector::flush_noted`], which writes the target's note once that is
    /// durable); `None` when they changed nothing, and on a log other processes share.
    /// The note is read first (one small read): one that is not what this process last
    /// wrote or found there is another writer's, which a note of this state would hide
    /// from this state's next start; it is left there, with a warning.
    async fn mark_writer(&self) -> Result<Option<WriterMark>, ProjectError> {
        if self.log.shared() || !self.unmarked.swap(false, Ordering::SeqCst) {
            return Ok(None);
        }
        if self.overwritten.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let marks = self.state.writer_marks().map_err(self.err_state())?;
        let last = marks.get(&self.pipeline).map_err(self.err_state())?;
        let known = self.on_target.lock().unwrap().clone();
        let on_target = match (self.target.writer_note().await, known) {
            (Some(n), Some(known)) if n.mark.token != known => {
                self.overwritten.store(true, Ordering::SeqCst);
                warn!(
                    pipeline = %self.pipeline,
                    "the target's writer note names {}, not what this process last wrote or found there: another state, or a copy of this one, projected into the target while this process did, and what it did is not in this state. That note is left as it is, so this state's next start is refused, saying what to do",
                    n.describe()
                );
                return Ok(None);
            }
            (Some(n), _) => {
                *self.on_target.lock().unwrap() = Some(n.mark.token.clone());
                n.mark.token
            }
            (None, Some(known)) => known,
            // None, or none that can be read (the target root gone for a while): the note
            // of the state's last mark is taken to be there.
            (None, None) => last.as_ref().map(|m| m.token.clone()).unwrap_or_default(),
        };
        let mark = WriterMark::next(last.as_ref(), &on_target);
        marks.put(&self.pipeline, &mark).map_err(self.err_state())?;
        Ok(Some(mark))
    }

    /// Writes the target's note of `mark` ([`Projector::mark_writer`]); a note
    /// that cannot be written is warned of, as it weakens only that check (the next mark
    /// keeps the token of the note still there, which stays this state's).
    async fn note_writer(&self, mark: WriterMark) {
        let token = mark.token.clone();
        let note = WriterNote {
            mark,
            pipeline: self.pipeline.clone(),
            state_dir: self.state.path().to_owned(),
            at: Utc::now(),
        };
        match self.target.put_writer_note(&note).await {
            Ok(()) => *self.on_target.lock().unwrap() = Some(token),
            Err(e) => warn!(
                pipeline = %self.pipeline,
                "cannot note in the target which state wrote it ({e}): a copy of this state restored from a backup would not be told from it"
            ),
        }
    }

    /// [`Projector::check_target`]'s check of what the target is, and of a root gone.
    async fn check_identity(&self, record: bool) -> Result<(), ProjectError> {
        let now = self.target.identity();
        let targets = self.state.targets().map_err(self.err_state())?;
        let was = targets.get(&self.pipeline).map_err(self.err_state())?;
        match was.map(crate::state::resolved_identity) {
            Some(was) if was != now => {
                if !self.nothing_applied().await? {
                    return Err(ProjectError::TargetChanged {
                        pipeline: self.pipeline.clone(),
                        was,
                        now,
                    });
                }
                if record {
                    info!(
                        pipeline = %self.pipeline,
                        "the target is now {now}; nothing was ever applied to {was}, so the new one is simply used"
                    );
                    targets
                        .put(&self.pipeline, &now)
                        .map_err(self.err_state())?;
                }
                Ok(())
            }
            None if record => {
                self.warn_of_a_renamed_pipeline(&targets, &now)?;
                targets.put(&self.pipeline, &now).map_err(self.err_state())
            }
            _ => {
                // Made anew, it would get only what comes next, and lag would read 0.
                if let Some(missing) = self.target.missing().await {
                    let applied = self.state.applied(&self.pipeline);
                    if !applied.map_err(self.err_state())?.is_empty() {
                        return Err(ProjectError::TargetMissing {
                            pipeline: self.pipeline.clone(),
                            missing,
                        });
                    }
                }
                Ok(())
            }
        }
    }

    /// Warns, when this pipeline is new to the state, of another pipeline of the state
    /// (one the config no longer names) that wrote to the same target: most likely this
    /// one renamed. Its history is kept under the old name, so the new one adopts what the
    /// target holds and never deletes what the source deleted before the rename.
    fn warn_of_a_renamed_pipeline(
        &self,
        targets: &Records<String>,
        now: &str,
    ) -> Result<(), ProjectError> {
        for noted in targets.iter() {
            let (other, target) = noted.map_err(self.err_state())?;
            if other != self.pipeline && crate::state::resolved_identity(target) == now {
                warn!(
                    pipeline = %self.pipeline,
                    "pipeline `{}` is new to this state directory, but its pipeline `{other}` wrote to the same target ({now}): if `{}` is `{other}` renamed, stop and put the old name back, as a pipeline's history (what it applied, the deletes it owes) is kept under its name; under the new name, what the source deleted before the rename stays on the target (`tidemark verify` lists it)",
                    self.pipeline, self.pipeline
                );
            }
        }
        Ok(())
    }

    /// Refuses a target root that was the root of a mounted filesystem when the projector
    /// last started and no longer is, while items are applied: its filesystem was
    /// unmounted while tidemark was stopped, and the empty mountpoint in its place would
    /// be taken for the target (what comes next written into it, lag reading 0). With
    /// `record`, notes what the root is now.
    async fn check_mount(&self, record: bool) -> Result<(), ProjectError> {
        let Some(now) = self.target.mounted().await else {
            return Ok(());
        };
        let was = (self.state.target_mount(&self.pipeline)).map_err(self.err_state())?;
        if was == Some(true) && !now {
            let applied = self.state.applied(&self.pipeline);
            if !applied.map_err(self.err_state())?.is_empty() {
                let target = self.target.identity();
                let target = target.strip_prefix("dir ").unwrap_or(&target);
                return Err(ProjectError::TargetMissing {
                    pipeline: self.pipeline.clone(),
                    missing: format!(
                        "the target directory {target} was the root of a mounted filesystem and is no longer one (the filesystem was unmounted: this is the mountpoint under it)"
                    ),
                });
            }
        }
        if record && was != Some(now) {
            (self.state.target_mounts())
                .and_then(|m| m.put(&self.pipeline, &now))
                .map_err(self.err_state())?;
        }
        Ok(())
    }

    /// How long [`Projector::nothing_applied`] waits for the log's committed offsets.
    const OFFSETS_WAIT: Duration = Duration::from_secs(10);

    /// Whether this pipeline never applied anything to a target: no applied state, no id
    /// remapped, nothing waiting, retained or failed, no batch ever committed, and every
    /// committed offset 0. A log that cannot tell its committed offsets within
    /// [`Projector::OFFSETS_WAIT`] (a Kafka broker down) counts as having applied some.
    async fn nothing_applied(&self) -> Result<bool, ProjectError> {
        let (s, p) = (&self.state, self.pipeline.as_str());
        let empty = || -> Result<bool, StateError> {
            Ok(s.applied(p)?.is_empty()
                && s.remap(p)?.is_empty()
                && s.deferred(p)?.is_empty()
                && s.dir_deletes(p)?.is_empty()
                && s.retained(p)?.is_empty()
                && s.failures(p)?.is_empty()
                && !s.last_applies()?.contains(p)?)
        };
        let empty = empty().map_err(self.err_state())?;
        if !empty {
            return Ok(false);
        }
        let offsets = async {
            self.log.connect().await.ok()?;
            for partition in 0..self.log.partitions() {
                if self.committed(partition).await.ok()? > 0 {
                    return Some(false);
                }
            }
            Some(true)
        };
        Ok(tokio::time::timeout(Self::OFFSETS_WAIT, offsets)
            .await
            .ok()
            .flatten()
            .unwrap_or(false))
    }

    /// Settles what an interrupted run left on the target before new work starts.
    async fn recover(&self) -> Result<(), ProjectError> {
        self.stale.lock().unwrap().clear();
        self.check_target(true).await?;
        self.flush_target().await
    }

    /// Tails the log until `cancel` fires, retrying failures with exponential backoff. A
    /// batch in flight when `cancel` fires is finished and committed first.
    pub async fn run(&self, cancel: CancellationToken) {
        use backoff::backoff::Backoff;
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(200))
            .with_max_interval(self.retry_max_backoff)
            .with_max_elapsed_time(None)
            .build();
        // Partitions held since the last look, for logs whose partitions move between daemons.
        let mut owned: Option<BTreeSet<u32>> = None;
        let mut last_dir_retry = Instant::now();
        self.tailing.store(true, Ordering::SeqCst);
        self.resume_outage();
        if let Err(e) = self.recover().await {
            error!("{e}");
        }
        while !cancel.is_cancelled() {
            let mut read = 0;
            // The errors of this pass, if any failed.
            let mut failed = Vec::new();
            // The log (its consumer group, for Kafka) decides which partitions are ours.
            let partitions = match self.take_assignment(&mut owned).await {
                Ok(p) => p,
                Err(e) => {
                    failed.push(e);
                    Vec::new()
                }
            };
            for &p in &partitions {
                match self.step(p).await {
                    Ok((report, n)) => {
                        read += n;
                        if n > 0 {
                            debug!(
                                pipeline = %self.pipeline,
                                events = report.events,
                                committed = ?report.committed,
                                outcomes = ?report.outcomes,
                                "applied a batch"
                            );
                        }
                    }
                    Err(e) => failed.push(e.source),
                }
            }
            if !failed.is_empty() {
                let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                self.retry_after(&failed, delay);
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            backoff.reset();
            self.retried();
            if read == 0 {
                // Caught up: deletes retained while prune was off are applied now, then
                // (once, at the daemon's start) the items that failed in an earlier run
                // are tried again.
                if let Err(e) = self.apply_retained(&partitions).await {
                    error!("{e}");
                }
                if let Err(e) = self.retry_failed(&partitions).await {
                    error!("{e}");
                }
                // And again, now and then, while any are left.
                if let Err(e) = self.retry_failed_when_due(&partitions).await {
                    error!("{e}");
                }
            }
            if read == 0 && last_dir_retry.elapsed() >= Duration::from_secs(1) {
                // Another daemon may have deleted what kept a pending directory delete waiting.
                last_dir_retry = Instant::now();
                if let Err(e) = self.retry_dir_deletes().await {
                    error!("{e}");
                }
            }
            if read == 0 {
                // Tail the first partition; with several, wake often enough for the others.
                let wait = if partitions.len() > 1 { 200 } else { 1000 };
                let wait = Duration::from_millis(wait);
                let Some(&first) = partitions.first() else {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                };
                let committed = match self.committed(first).await {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = self.log.wait_beyond(first, committed, wait) => {}
                }
            }
        }
    }

    /// The partitions to project now. On a shared log, a partition this projector did not
    /// hold on its last look may have been projected by another daemon meanwhile, so the
    /// local applied state of its items is forgotten: their next events are checked against
    /// the target itself (which adopts equal content without writing) instead of being
    /// skipped on a record that may be out of date.
    async fn take_assignment(
        &self,
        owned: &mut Option<BTreeSet<u32>>,
    ) -> Result<Vec<u32>, ProjectError> {
        let partitions =
            self.log
                .assigned(&self.consumer)
                .await
                .map_err(|source| ProjectError::Read {
                    pipeline: self.pipeline.clone(),
                    source,
                })?;
        if !self.log.shared() {
            return Ok(partitions);
        }
        let gained: BTreeSet<u32> = partitions
            .iter()
            .filter(|p| owned.as_ref().is_none_or(|o| !o.contains(p)))
            .copied()
            .collect();
        self.check_group(&gained).await?;
        self.forget_applied(&gained).await?;
        let held: BTreeSet<u32> = partitions.iter().copied().collect();
        if owned.as_ref() != Some(&held) {
            self.hold_retained(&held, &gained).await?;
        }
        *owned = Some(held);
        self.holding.lock().unwrap().clone_from(owned);
        Ok(partitions)
    }

    /// Consumer whose committed "offsets" on a log with an [`EventLog::offsets_home`] count
    /// the `replay`s made on the group, from any state: each bumps them by one. A group's
    /// offsets that went back behind this state's [`CommitMark`] after such a count rose
    /// were moved by a replay, not lost.
    const REPLAYS: &'static str = "tidemark-replays";

    /// The key of `partition`'s [`CommitMark`].
    fn commit_key(&self, partition: u32) -> String {
        format!("{}/{}/{partition}", self.pipeline, self.log.identity())
    }

    /// The replays made on the group for `partition` ([`Projector::REPLAYS`]).
    async fn replays(&self, partition: u32) -> Result<u64, ProjectError> {
        self.log
            .committed(Self::REPLAYS, partition)
            .await
            .map_err(|source| ProjectError::ReadOffset {
                pipeline: self.pipeline.clone(),
                source,
            })
    }

    /// Before this process projects `partitions` of a log whose committed offsets live
    /// outside the state (a Kafka consumer group), refuses when the group's offset of any
    /// is behind what this state committed there ([`CommitMark`]) while no `replay` moved
    /// it back: the `group` setting was changed, or the broker lost the group's offsets,
    /// and projecting would apply the topic's history again onto the live target
    /// ([`ProjectError::GroupBehind`]). A state from before those marks were kept is
    /// refused when the group has no offset on any of them, the topic has events there
    /// and this state holds items applied from them. Otherwise notes the group's offsets
    /// and replay counts as this state's marks.
    async fn check_group(&self, partitions: &BTreeSet<u32>) -> Result<(), ProjectError> {
        let Some(group) = self.log.offsets_home(&self.consumer) else {
            return Ok(());
        };
        if partitions.is_empty() {
            return Ok(());
        }
        let marks = self.state.log_commits().map_err(self.err_state())?;
        let mut behind = Vec::new();
        let mut seen = Vec::new();
        let mut marked = false;
        for &p in partitions {
            let committed = self.committed(p).await?;
            let replays = self.replays(p).await?;
            let key = self.commit_key(p);
            let mark = marks.get(&key).map_err(self.err_state())?;
            marked |= mark.is_some();
            if let Some(m) = mark {
                if committed < m.next && replays <= m.replays {
                    behind.push((p, committed, Some(m.next)));
                }
            }
            seen.push((key, committed, replays));
        }
        if behind.is_empty() && !marked && seen.iter().all(|(_, c, _)| *c == 0) {
            let mut with_events = BTreeSet::new();
            for &p in partitions {
                if self.head(p).await? > 0 {
                    with_events.insert(p);
                }
            }
            let applied = self
                .state
                .applied(&self.pipeline)
                .map_err(self.err_state())?;
            for key in applied.keys() {
                let p = self.log.partition_of(&key.map_err(self.err_state())?);
                if with_events.remove(&p) {
                    behind.push((p, 0, None));
                }
                if with_events.is_empty() {
                    break;
                }
            }
            behind.sort_unstable();
        }
        if !behind.is_empty() {
            return Err(ProjectError::GroupBehind {
                pipeline: self.pipeline.clone(),
                group,
                log: self.log.identity(),
                behind,
            });
        }
        for (key, next, replays) in seen {
            marks
                .put(&key, &CommitMark { next, replays })
                .map_err(self.err_state())?;
        }
        Ok(())
    }

    /// Notes that this state committed `next` on `partition` ([`Projector::check_group`]).
    fn mark_commit(&self, partition: u32, next: u64) -> Result<(), ProjectError> {
        if self.log.offsets_home(&self.consumer).is_none() {
            return Ok(());
        }
        let marks = self.state.log_commits().map_err(self.err_state())?;
        let key = self.commit_key(partition);
        let replays = marks
            .get(&key)
            .map_err(self.err_state())?
            .map_or(0, |m| m.replays);
        marks
            .put(&key, &CommitMark { next, replays })
            .map_err(self.err_state())
    }

    /// Forgets the local applied state of the items of `gained`, partitions this process
    /// did not hold until now: another process may have applied newer events of them.
    async fn forget_applied(&self, gained: &BTreeSet<u32>) -> Result<(), ProjectError> {
        if gained.is_empty() {
            return Ok(());
        }
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        let forgotten = applied
            .remove_where(|k, _| gained.contains(&self.log.partition_of(k)))
            .map_err(self.err_state())?;
        self.state.flush().await.map_err(self.err_state())?;
        info!(
            pipeline = %self.pipeline,
            partitions = ?gained,
            forgotten,
            "took over partitions; their items are checked against the target"
        );
        Ok(())
    }

    /// For a one-shot `project` or `sync`: takes every partition of the log for this run
    /// ([`EventLog::take_all`]; [`EventLog::release`] gives them back), or refuses while
    /// another process (a daemon) holds any. On a log other processes share, the local
    /// applied state of every item is then forgotten, as a daemon forgets that of the
    /// partitions it gains: they may have applied newer events meanwhile.
    pub async fn take_all(&self) -> Result<(), ProjectError> {
        let taken =
            self.log
                .take_all(&self.consumer)
                .await
                .map_err(|source| ProjectError::Take {
                    pipeline: self.pipeline.clone(),
                    source,
                })?;
        if self.log.shared() {
            let taken: BTreeSet<u32> = taken.into_iter().collect();
            self.check_group(&taken).await?;
            self.forget_applied(&taken).await?;
            self.hold_retained(&taken, &taken).await?;
            *self.holding.lock().unwrap() = Some(taken);
        }
        Ok(())
    }

    /// What `project` would do from the committed offsets on, without writing anything;
    /// sorted by key.
    pub async fn plan(&self) -> Result<Vec<PlannedAction>, ProjectError> {
        self.plan_with(Vec::new()).await
    }

    /// Like [`Projector::plan`], with `unlogged` (the events a dry-run scan found, in
    /// order) as if they were appended after the log's head.
    pub async fn plan_with(
        &self,
        unlogged: Vec<Event>,
    ) -> Result<Vec<PlannedAction>, ProjectError> {
        self.check_target(false).await?;
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        let mut plan = Plan {
            applied: &applied,
            overlay: HashMap::new(),
            seen: BTreeSet::new(),
            actions: Vec::new(),
        };
        // An event that a later one of its item follows changes nothing in the end: the
        // target gets the item's last state (a REST target skips it, a directory target
        // finds the source moved on and skips it as stale). A first pass finds each item's
        // last event, keeping only identities and offsets, not the events.
        let mut last: HashMap<String, (Option<u32>, u64)> = HashMap::new();
        for p in 0..self.log.partitions() {
            self.plan_pass(p, async |event, offset| {
                last.insert(event.identity(), (Some(p), offset));
                Ok(())
            })
            .await?;
        }
        for (i, event) in unlogged.iter().enumerate() {
            last.insert(event.identity(), (None, i as u64));
        }
        let superseded = |event: &Event, at: (Option<u32>, u64)| {
            last.get(&event.identity()).is_some_and(|l| *l != at)
        };
        for p in 0..self.log.partitions() {
            self.plan_pass(p, async |event, offset| {
                if superseded(&event, (Some(p), offset)) {
                    plan.superseded(event, Some(offset));
                    Ok(())
                } else {
                    self.plan_event(&mut plan, event, Some(offset)).await
                }
            })
            .await?;
        }
        for (i, event) in unlogged.into_iter().enumerate() {
            if superseded(&event, (None, i as u64)) {
                plan.superseded(event, None);
            } else {
                self.plan_event(&mut plan, event, None).await?;
            }
        }
        let Plan {
            seen,
            mut actions,
            overlay,
            ..
        } = plan;
        // Then, as `project` does after a batch, the events kept waiting (below the
        // committed offset, so no log read finds them).
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        let dir_deletes = self
            .state
            .dir_deletes(&self.pipeline)
            .map_err(self.err_state())?;
        let upserts = deferred
            .iter()
            .map(|r| r.map(|(id, d)| (id, d.event, d.since)));
        let deletes = dir_deletes
            .iter()
            .map(|r| r.map(|(id, d)| (id, d.event, d.since)));
        let mut waiting: Vec<(Event, DateTimeUtc, Option<Failure>)> = Vec::new();
        for entry in upserts.chain(deletes) {
            let (id, event, since) = entry.map_err(self.err_state())?;
            if !seen.contains(&id) {
                waiting.push((event, since, None));
            }
        }
        // And, once per run, what failed in an earlier one (`retry_failed`).
        let failed = self
            .state
            .stored_failures(&self.pipeline)
            .map_err(self.err_state())?;
        let remap = self.state.remap(&self.pipeline).map_err(self.err_state())?;
        for entry in failed.iter() {
            let (id, f) = entry.map_err(self.err_state())?;
            let Some(event) = f.event.filter(|_| !seen.contains(&id)) else {
                continue;
            };
            // `project` leaves a failed item alone while what it references is missing
            // (neither on the target nor made by this plan's events).
            let mut missing = false;
            if event.op == Op::Upsert {
                for r in &event.refs {
                    let rid = item_identity(&r.kind, &r.key);
                    let planned = overlay.get(&rid).is_some_and(Option::is_some);
                    if !planned && remap.get(&rid).map_err(self.err_state())?.is_none() {
                        missing = true;
                    }
                }
            }
            if !missing {
                waiting.push((event, f.failure.at, Some(f.failure)));
            }
        }
        waiting.sort_by_key(|(event, _, _)| event.offset);
        actions.extend(waiting.into_iter().map(|(event, since, failed)| {
            let offset = Some(event.offset);
            PlannedAction {
                waiting_since: Some(since),
                failed,
                ..PlannedAction::new("retry", event, offset)
            }
        }));
        // Last, once caught up: with prune on, the deletes retained while it was off.
        if self.prune {
            let retained = self
                .state
                .retained(&self.pipeline)
                .map_err(self.err_state())?;
            let mut deletes = Vec::new();
            for entry in retained.iter() {
                let (id, d) = entry.map_err(self.err_state())?;
                if !seen.contains(&id) && !self.target.source_holds(&d.event).await {
                    let offset = Some(d.event.offset);
                    deletes.push(PlannedAction::new("delete", d.event, offset));
                }
            }
            // Weighed as `apply_retained` weighs them: over `max_delete`, none is applied.
            if let Some(why) = self.retained_over_limit(deletes.len())? {
                for delete in &mut deletes {
                    delete.action = "retain";
                    delete.reason = Some(why.clone());
                }
            }
            actions.append(&mut deletes);
        }
        self.plan_places(&mut actions).await;
        // Listings run in parallel, so log order differs between runs; a person reads
        // a plan sorted by key, as `rsync -n` lists. The sort is stable: a key's actions
        // stay in the order `project` takes them.
        actions.sort_by(|a, b| (&a.key, &a.kind).cmp(&(&b.key, &b.kind)));
        Ok(actions)
    }

    /// Corrects a plan's actions for what the target holds at their paths, as `project`
    /// will find it (only a directory target says, [`Target::holds`]): a directory
    /// delete, or the upsert of a file or link with a directory in its place, waits while
    /// that directory keeps entries that no planned delete removes (`wait`; with prune off
    /// the upsert fails instead, `fail`), and an upsert whose path holds an item of
    /// another kind that the plan deletes (a file the source replaced by a directory or a
    /// link, a directory by a file) is one `replace` of it, counted as the run counts it.
    async fn plan_places(&self, actions: &mut Vec<PlannedAction>) {
        let removes = |a: &PlannedAction| {
            a.op == Op::Delete && a.failed.is_none() && matches!(a.action, "delete" | "retry")
        };
        // What the run removes: the planned deletes, and the waiting directory deletes.
        let removed: HashSet<String> = actions
            .iter()
            .filter(|a| removes(a))
            .map(|a| item_identity(&a.kind, &a.key))
            .collect();
        // Paths where the plan deletes an item: an upsert there may replace it.
        let deleting: HashSet<&str> = actions
            .iter()
            .filter(|a| a.op == Op::Delete)
            .map(|a| a.key.as_str())
            .collect();
        // Directory deletes deepest first, so that a parent knows which of its directories
        // stay; then the upserts, which find those directories in their place. (A
        // `create` found nothing there; a directory's upsert minds only an item it
        // replaces.)
        let mut order: Vec<usize> = (0..actions.len())
            .filter(|&i| {
                let a = &actions[i];
                (a.op == Op::Upsert
                    && a.failed.is_none()
                    && matches!(a.action, "update" | "adopt" | "retry")
                    && (a.kind != "dir" || deleting.contains(a.key.as_str())))
                    || (a.kind == "dir" && removes(a))
            })
            .collect();
        order.sort_by_key(|&i| {
            let a = &actions[i];
            (
                a.op == Op::Upsert,
                std::cmp::Reverse(a.key.matches('/').count()),
            )
        });
        let mut waiting: HashSet<String> = HashSet::new();
        let mut taken_in = Vec::new();
        for i in order {
            let Some(held) = self.target.holds(&actions[i].key).await else {
                continue;
            };
            let a = &actions[i];
            // The entries that stay: deleted by nothing, or directories whose deletes wait.
            let stays: Vec<String> = match held.kind {
                "dir" if a.kind != "dir" || a.op == Op::Delete => held
                    .entries
                    .iter()
                    .filter(|(kind, key)| {
                        !removed.contains(&item_identity(kind, key)) || waiting.contains(key)
                    })
                    .map(|(kind, key)| item_label(kind, key, None))
                    .collect(),
                _ => Vec::new(),
            };
            if a.op == Op::Delete {
                if !stays.is_empty() {
                    waiting.insert(a.key.clone());
                    let a = &mut actions[i];
                    a.action = "wait";
                    a.reason = Some(format!(
                        "the directory holds entries the source does not have ({}); its delete waits until they are removed by hand, and the next run then deletes it",
                        few(&stays)
                    ));
                }
                continue;
            }
            // The item the source had here before, of the kind the target holds, whose
            // delete the plan holds too.
            let old = (held.kind != a.kind)
                .then(|| {
                    actions.iter().position(|o| {
                        o.op == Op::Delete
                            && o.key == a.key
                            && o.kind == held.kind
                            && matches!(o.action, "delete" | "retry" | "wait" | "retain")
                    })
                })
                .flatten();
            let a = &mut actions[i];
            if !stays.is_empty() && self.prune {
                a.action = "wait";
                a.reason = Some(format!(
                    "a directory in its place on the target holds entries the source does not have ({}); it waits until they are removed by hand, and the next run then applies it",
                    few(&stays)
                ));
            } else if !stays.is_empty() {
                a.action = "fail";
                a.reason = Some(crate::target::fs::DIR_IN_THE_WAY_UNPRUNED.into());
            } else if old.is_some() {
                a.action = "replace";
            }
            let Some(o) = old else { continue };
            let old_outcome = match actions[o].action {
                "wait" => Outcome::Deferred,
                "retain" => Outcome::Retained,
                // Not empty when the upsert comes (its entries' deletes follow it): the
                // upsert waits, the directory's delete removes it.
                _ if !held.entries.is_empty() => Outcome::Deleted,
                // The upsert replaced it; its delete finds the new item and leaves it.
                _ => Outcome::Unchanged,
            };
            let (kind, offset) = (actions[o].kind.clone(), actions[o].offset);
            let a = &mut actions[i];
            a.old_kind = Some(kind);
            a.old_offset = offset;
            a.old_outcome = Some(old_outcome);
            taken_in.push(o);
        }
        taken_in.sort_unstable();
        taken_in.dedup();
        for o in taken_in.into_iter().rev() {
            actions.remove(o);
        }
    }

    /// Reads partition `p` of the log from `from` for a plan.
    async fn plan_read(&self, p: u32, from: u64) -> Result<Vec<crate::log::Record>, ProjectError> {
        self.log
            .read(p, from, self.batch_size)
            .await
            .map_err(|source| ProjectError::Read {
                pipeline: self.pipeline.clone(),
                source,
            })
    }

    /// Calls `each` with every event of partition `p` from its committed offset on, and
    /// its offset.
    async fn plan_pass(
        &self,
        p: u32,
        mut each: impl AsyncFnMut(Event, u64) -> Result<(), ProjectError>,
    ) -> Result<(), ProjectError> {
        let mut from = self.committed(p).await?;
        loop {
            let records = self.plan_read(p, from).await?;
            let Some(end) = records.last() else { break };
            from = end.offset + 1;
            for record in records {
                if let Ok(event) = record.event {
                    each(event, record.offset).await?;
                }
            }
        }
        Ok(())
    }

    /// Adds what `project` would do with `event` to `plan`.
    async fn plan_event(
        &self,
        plan: &mut Plan<'_>,
        event: Event,
        offset: Option<u64>,
    ) -> Result<(), ProjectError> {
        let id = event.identity();
        plan.seen.insert(id.clone());
        let prior = match plan.overlay.get(&id) {
            Some(p) => p.clone(),
            None => plan.applied.get(&id).map_err(self.err_state())?,
        };
        let action = match (decide(&event, prior.as_ref(), self.prune), event.op) {
            (Some(Outcome::Retained), _) if self.never_reached(&event, prior.as_ref()).await => {
                "skip"
            }
            (Some(Outcome::Retained), _) => "retain",
            (Some(_), _) => "skip",
            (None, Op::Delete) => {
                plan.overlay.insert(id, None);
                if self.never_reached(&event, prior.as_ref()).await {
                    "skip"
                } else {
                    "delete"
                }
            }
            (None, Op::Upsert) => {
                plan.overlay.insert(
                    id,
                    Some(Applied {
                        version: event.version(),
                        offset: event.offset,
                        target_id: None,
                    }),
                );
                if let Some(prior) = &prior {
                    // Removed from the target by hand since: `project` creates it again.
                    // Written by a run killed before its commit: `project` keeps it. (Only
                    // the mode or time moved: the bytes stay, and that is an update.)
                    let attributes = version_checksum(&prior.version) == event.checksum;
                    match self.target.present(&event).await {
                        Some(false) => "create",
                        _ if !attributes && self.target.written(&event).await => "adopt",
                        _ => "update",
                    }
                } else {
                    // No applied state (a replay, a pre-filled target): what `project`
                    // does depends on what the target holds.
                    match self.target.probe(&event).await {
                        Probe::Equal => "adopt",
                        Probe::Different => "update",
                        Probe::Absent | Probe::Unknown => "create",
                    }
                }
            }
        };
        plan.actions.push(PlannedAction::new(action, event, offset));
        Ok(())
    }

    /// Moves the committed offset to `from` and forgets what was applied at or after it, so
    /// the events from there on are applied again (`from = 0` rebuilds the target).
    pub async fn replay(&self, from: u64) -> Result<(), ProjectError> {
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        // The remap table is kept: replayed events adopt the items they created. Unless
        // the target changed: its ids are the old target's, and a replay that kept them
        // wrote dev's items over whatever the new target holds under those ids.
        if let Some(was) = self.changed_target()? {
            let forgotten = self
                .state
                .remap(&self.pipeline)
                .and_then(|r| r.remove_where(|_, _| true))
                .map_err(self.err_state())?;
            // The names creates were sent under are the old target's business too.
            self.state
                .creating(&self.pipeline)
                .and_then(|r| r.remove_where(|_, _| true))
                .map_err(self.err_state())?;
            info!(
                pipeline = %self.pipeline,
                "the target changed from {was}: its {forgotten} target ids are forgotten, so the new target's items are found by name or created"
            );
        }
        let deferred = self
            .state
            .deferred(&self.pipeline)
            .map_err(self.err_state())?;
        deferred
            .remove_where(|_, d| d.event.offset >= from)
            .map_err(self.err_state())?;
        self.state
            .dir_deletes(&self.pipeline)
            .and_then(|t| t.remove_where(|_, d| d.event.offset >= from))
            .map_err(self.err_state())?;
        self.state
            .retained(&self.pipeline)
            .and_then(|t| t.remove_where(|_, d| d.event.offset >= from))
            .map_err(self.err_state())?;
        applied
            .remove_where(|_, a| a.offset >= from)
            .map_err(self.err_state())?;
        // Replaying is how a new target is built: the state is now about the configured one.
        self.state
            .targets()
            .and_then(|t| t.put(&self.pipeline, &self.target.identity()))
            .map_err(self.err_state())?;
        // The events the target had before are re-applied: their lag counts from now.
        let replays = self.state.replays().map_err(self.err_state())?;
        let at = chrono::Utc::now();
        for p in 0..self.log.partitions() {
            let until = self.committed(p).await?;
            let key = format!("{}/{p}", self.pipeline);
            if from < until {
                replays.put(&key, &ReplayMark { until, at })
            } else {
                replays.remove(&key)
            }
            .map_err(self.err_state())?;
        }
        self.state.flush().await.map_err(self.err_state())?;
        let commit_err = |source| ProjectError::Commit {
            pipeline: self.pipeline.clone(),
            source,
        };
        for p in 0..self.log.partitions() {
            self.log
                .seek(&self.consumer, p, from)
                .await
                .map_err(commit_err)?;
        }
        if self.log.offsets_home(&self.consumer).is_some() {
            // Counted on the group, so every other state that projects it takes the
            // offsets moved back for a replay, not for a change of `group`.
            let marks = self.state.log_commits().map_err(self.err_state())?;
            for p in 0..self.log.partitions() {
                let replays = self.replays(p).await? + 1;
                self.log
                    .seek(Self::REPLAYS, p, replays)
                    .await
                    .map_err(commit_err)?;
                let mark = CommitMark {
                    next: from,
                    replays,
                };
                marks
                    .put(&self.commit_key(p), &mark)
                    .map_err(self.err_state())?;
            }
            self.state.flush().await.map_err(self.err_state())?;
        }
        Ok(())
    }
}

/// A deferred item whose last try the target failed transiently (a 5xx past the retry
/// budget, a timeout: it cannot tell a server that fails one item from one that fails),
/// while nothing it references is missing. It keeps waiting, with that error as its
/// reason, but is not tried again before `until`.
#[derive(Debug)]
struct Resting {
    /// Offset of the event that failed: a newer event of the item is tried at once.
    offset: u64,
    /// When it may be tried again; `None` (a one-shot run): not in this run.
    until: Option<Instant>,
    /// The pause before `until`, doubled at each failure in a row.
    pause: Duration,
    /// Kind of the item.
    kind: String,
    /// Key of the item.
    key: String,
    /// The error, secrets redacted.
    message: String,
}

/// The schedule of the daemon's later passes over the failed items.
#[derive(Debug)]
struct RetryDue {
    /// The pause after a pass that left nothing failed (`failed_retry_interval`).
    first: Duration,
    /// The pause before the next pass.
    pause: Duration,
    /// When the next pass is due; unset until the first call.
    at: Option<Instant>,
}

impl RetryDue {
    /// Longest pause between two passes that keep meeting failures (unless `first` is
    /// longer).
    const MAX: Duration = Duration::from_secs(60 * 60);

    fn new(first: Duration) -> RetryDue {
        RetryDue {
            first,
            pause: first,
            at: None,
        }
    }

    /// Whether a pass is due at `now`; the first call only starts the clock.
    fn due(&mut self, now: Instant) -> bool {
        match self.at {
            Some(at) => now >= at,
            None => {
                self.at = Some(now + self.pause);
                false
            }
        }
    }

    /// After a pass at `now`: the pause doubles while failures are `left`.
    fn passed(&mut self, now: Instant, left: bool) {
        self.pause = if left {
            (self.pause * 2).min(Self::MAX.max(self.first))
        } else {
            self.first
        };
        self.at = Some(now + self.pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write without some reference fields and the patch that completes it count once,
    /// by the write, also when a daemon cycle's tally merges them from two batches.
    #[test]
    fn a_partial_write_and_its_patch_count_once() {
        let item = item_identity("users", "500");
        let mut one = ProjectReport::default();
        one.count_item(&item, "users", Outcome::Deferred, false, false);
        one.count_item(&item, "users", Outcome::Created, true, false);
        one.count_item(&item, "users", Outcome::Updated, false, true);
        assert_eq!(one.outcomes, BTreeMap::from([(Outcome::Created, 1)]));

        let mut first = ProjectReport::default();
        first.count_item(&item, "users", Outcome::Created, true, false);
        let mut second = ProjectReport::default();
        second.count_item(&item, "users", Outcome::Updated, false, true);
        // A later run's patch alone is that run's update.
        assert_eq!(second.outcomes, BTreeMap::from([(Outcome::Updated, 1)]));
        first.merge(second);
        assert_eq!(first.outcomes, BTreeMap::from([(Outcome::Created, 1)]));
        assert_eq!(
            first.by_kind,
            BTreeMap::from([("users".to_owned(), BTreeMap::from([(Outcome::Created, 1)]))])
        );
    }
}
