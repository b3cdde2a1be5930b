//! Events → target: reads from the committed offset, skips events whose content is already
//! applied, applies the rest with bounded concurrency while keeping each key's order, makes
//! the writes durable, records applied state and only then commits the offset.
//!
//! The committed offset is the *next offset to read*: the contiguous prefix of events that
//! finished. A transient failure (disk full, target down) stops the prefix there, and the
//! batch is retried with backoff; a permanent failure is recorded against its key and the
//! offset moves on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use tidemark_proto::{Event, Op};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::log::{CommitError, EventLog, ReadError, ReadOffsetError};
use crate::metrics::metrics;
use crate::progress::Progress;
use crate::state::{Applied, Failure, State, StateError};
use crate::target::{ApplyError, Outcome, Target};

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
    /// The target could not take writes; nothing from the failed event on was committed.
    #[error("pipeline `{pipeline}`: target unavailable: {source}")]
    Apply {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ApplyError,
    },
}

/// What a projection run did, for `project`/`sync` output and reports.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ProjectReport {
    /// Events read.
    pub events: u64,
    /// Events by outcome.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Events by kind and outcome.
    pub by_kind: BTreeMap<String, BTreeMap<Outcome, u64>>,
    /// Events that failed permanently, with their reasons.
    pub failures: Vec<Failure>,
    /// Committed offset (next to read) when the run ended, summed over partitions.
    pub committed: u64,
}

impl ProjectReport {
    fn count(&mut self, kind: &str, outcome: Outcome) {
        *self.outcomes.entry(outcome).or_insert(0) += 1;
        *self
            .by_kind
            .entry(kind.to_owned())
            .or_default()
            .entry(outcome)
            .or_insert(0) += 1;
    }

    fn merge(&mut self, other: ProjectReport) {
        self.events += other.events;
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
        self.failures.extend(other.failures);
    }

    /// The count of one outcome.
    pub fn get(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(&outcome).copied().unwrap_or(0)
    }
}

/// One planned action, as `plan` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    /// Offset of the event.
    pub offset: u64,
    /// `create`, `update`, `delete`, `retain` (delete not applied: prune is off) or `skip`.
    pub action: &'static str,
    /// Kind of the item.
    pub kind: String,
    /// Key of the item.
    pub key: String,
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
}

#[derive(Default)]
struct GroupResult {
    done: Vec<Done>,
    /// Offset and error of the first transient failure; the group stopped there.
    stopped: Option<(u64, ApplyError)>,
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
        Projector {
            pipeline: pipeline.to_owned(),
            consumer: format!("{pipeline}.projector"),
            log,
            target,
            state,
            prune,
            concurrency,
            batch_size,
        }
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

    async fn committed(&self, partition: u32) -> Result<u64, ProjectError> {
        self.log
            .committed(&self.consumer, partition)
            .await
            .map_err(|source| ProjectError::ReadOffset {
                pipeline: self.pipeline.clone(),
                source,
            })
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

    /// Applies one batch of one partition and commits what finished. Returns the report and
    /// the number of records read (0 when caught up). A transient failure is returned as
    /// an error after the finished prefix is committed.
    pub async fn step(&self, partition: u32) -> Result<(ProjectReport, usize), ProjectError> {
        let committed = self.committed(partition).await?;
        let records = self
            .log
            .read(partition, committed, self.batch_size)
            .await
            .map_err(|source| ProjectError::Read {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        if records.is_empty() {
            return Ok((ProjectReport::default(), 0));
        }
        let t0 = Instant::now();
        let read = records.len();
        let end = records.last().map_or(committed, |r| r.offset + 1);
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;

        // Group by key, keeping each key's events in log order.
        let mut groups: Vec<Vec<Event>> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        let mut report = ProjectReport {
            events: read as u64,
            ..Default::default()
        };
        for record in records {
            match record.event {
                Ok(event) => {
                    let id = event.identity();
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
                    report.count("invalid", Outcome::Failed);
                }
            }
        }
        // Directory deletes go last and in order, after the contents they may hold.
        let (dir_deletes, others): (Vec<_>, Vec<_>) = groups
            .into_iter()
            .partition(|g| g[0].op == Op::Delete && g[0].kind == "dir");
        let mut results: Vec<GroupResult> = stream::iter(others)
            .map(|g| self.apply_group(g, &applied))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for g in dir_deletes {
            results.push(self.apply_group(g, &applied).await);
        }

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
        if let Err(source) = self.target.flush().await {
            metrics()
                .apply_errors
                .with_label_values(&[&self.pipeline, "transient"])
                .inc();
            return Err(ProjectError::Apply {
                pipeline: self.pipeline.clone(),
                source,
            });
        }

        let failures = self
            .state
            .failures(&self.pipeline)
            .map_err(self.err_state())?;
        let mut puts: Vec<(String, Option<Applied>)> = Vec::new();
        let mut failed: Vec<(String, Option<Failure>)> = Vec::new();
        for d in results.into_iter().flat_map(|r| r.done) {
            report.count(&d.kind, d.outcome);
            if d.outcome.wrote() || d.outcome == Outcome::Adopted {
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
                        offset: d.offset,
                        reason,
                        at: Utc::now(),
                    };
                    report.failures.push(f.clone());
                    failed.push((d.identity.clone(), Some(f)));
                }
                None if d.outcome != Outcome::Stale => failed.push((d.identity.clone(), None)),
                None => {}
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
        failures
            .apply(failed.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
            .map_err(self.err_state())?;
        self.state.flush().await.map_err(self.err_state())?;
        self.log
            .commit(&self.consumer, partition, next)
            .await
            .map_err(|source| ProjectError::Commit {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        report.committed = next;

        let m = metrics();
        let p = self.pipeline.as_str();
        for (kind, outcomes) in &report.by_kind {
            for (outcome, n) in outcomes {
                m.applies
                    .with_label_values(&[p, kind, outcome.as_str()])
                    .inc_by(*n);
            }
        }
        m.apply_duration
            .with_label_values(&[p])
            .observe(t0.elapsed().as_secs_f64());
        m.last_apply
            .with_label_values(&[p])
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        if let Some(source) = transient {
            m.apply_errors.with_label_values(&[p, "transient"]).inc();
            return Err(ProjectError::Apply {
                pipeline: self.pipeline.clone(),
                source,
            });
        }
        Ok((report, read))
    }

    async fn apply_group(
        &self,
        events: Vec<Event>,
        applied: &crate::state::Records<Applied>,
    ) -> GroupResult {
        let mut result = GroupResult::default();
        let identity = events[0].identity();
        let mut prior = match applied.get(&identity) {
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
            };
            if let Some(outcome) = decide(&event, prior.as_ref(), self.prune) {
                result.done.push(done(outcome, Change::Keep, None));
                continue;
            }
            match self.target.apply(&event, prior.as_ref()).await {
                Ok(effect) => {
                    let change = match (event.op, effect.outcome) {
                        (_, Outcome::Stale | Outcome::Deferred) => Change::Keep,
                        (Op::Upsert, _) => {
                            let a = Applied {
                                version: event.version(),
                                offset: event.offset,
                                target_id: effect
                                    .target_id
                                    .or_else(|| prior.as_ref().and_then(|p| p.target_id.clone())),
                            };
                            prior = Some(a.clone());
                            Change::Put(a)
                        }
                        (Op::Delete, _) => {
                            prior = None;
                            Change::Remove
                        }
                    };
                    result.done.push(done(effect.outcome, change, None));
                }
                Err(e @ ApplyError::Transient { .. }) => {
                    warn!(pipeline = %self.pipeline, offset = event.offset, "{e}; will retry");
                    result.stopped = Some((event.offset, e));
                    break;
                }
                Err(e @ ApplyError::Permanent { .. }) => {
                    metrics()
                        .apply_errors
                        .with_label_values(&[&self.pipeline, "permanent"])
                        .inc();
                    error!(pipeline = %self.pipeline, offset = event.offset, "{e}; the key is blocked until it changes");
                    result
                        .done
                        .push(done(Outcome::Failed, Change::Keep, Some(e.to_string())));
                }
            }
        }
        result
    }

    /// Projects until every partition is caught up with the head as it was at the start.
    pub async fn catch_up(&self, progress: &Progress) -> Result<ProjectReport, ProjectError> {
        let mut total = ProjectReport::default();
        let mut targets = Vec::new();
        let mut remaining = 0;
        for p in 0..self.log.partitions() {
            let head = self.head(p).await?;
            remaining += head.saturating_sub(self.committed(p).await?);
            targets.push((p, head));
        }
        progress.set_total(remaining);
        for (p, head) in targets {
            while self.committed(p).await? < head {
                let (report, read) = self.step(p).await?;
                progress.inc(read as u64);
                total.merge(report);
                if read == 0 {
                    break;
                }
            }
            total.committed += self.committed(p).await?;
        }
        Ok(total)
    }

    /// Tails the log until `cancel` fires, retrying failures with exponential backoff. A
    /// batch in flight when `cancel` fires is finished and committed first.
    pub async fn run(&self, cancel: CancellationToken) {
        use backoff::backoff::Backoff;
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(200))
            .with_max_interval(Duration::from_secs(30))
            .with_max_elapsed_time(None)
            .build();
        while !cancel.is_cancelled() {
            let mut read = 0;
            let mut failed = false;
            for p in 0..self.log.partitions() {
                match self.step(p).await {
                    Ok((report, n)) => {
                        read += n;
                        if n > 0 {
                            info!(
                                pipeline = %self.pipeline,
                                events = report.events,
                                committed = report.committed,
                                outcomes = ?report.outcomes,
                                "applied a batch"
                            );
                        }
                    }
                    Err(e) => {
                        error!("{e}");
                        failed = true;
                    }
                }
            }
            if failed {
                let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            backoff.reset();
            if read == 0 {
                let committed = match self.committed(0).await {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = self.log.wait_beyond(0, committed, Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// What `project` would do from the committed offsets on, without writing anything.
    pub async fn plan(&self) -> Result<Vec<PlannedAction>, ProjectError> {
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        // Applied versions as the plan goes, so a key's later events see its earlier ones.
        let mut overlay: HashMap<String, Option<Applied>> = HashMap::new();
        let mut actions = Vec::new();
        for p in 0..self.log.partitions() {
            let mut from = self.committed(p).await?;
            loop {
                let records = self
                    .log
                    .read(p, from, self.batch_size)
                    .await
                    .map_err(|source| ProjectError::Read {
                        pipeline: self.pipeline.clone(),
                        source,
                    })?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                for record in records {
                    let Ok(event) = record.event else { continue };
                    let id = event.identity();
                    let prior = match overlay.get(&id) {
                        Some(p) => p.clone(),
                        None => applied.get(&id).map_err(self.err_state())?,
                    };
                    let action = match (decide(&event, prior.as_ref(), self.prune), event.op) {
                        (Some(Outcome::Retained), _) => "retain",
                        (Some(_), _) => "skip",
                        (None, Op::Delete) => {
                            overlay.insert(id, None);
                            "delete"
                        }
                        (None, Op::Upsert) => {
                            overlay.insert(
                                id,
                                Some(Applied {
                                    version: event.version(),
                                    offset: event.offset,
                                    target_id: None,
                                }),
                            );
                            if prior.is_some() {
                                "update"
                            } else {
                                "create"
                            }
                        }
                    };
                    actions.push(PlannedAction {
                        offset: event.offset,
                        action,
                        kind: event.kind,
                        key: event.key,
                    });
                }
            }
        }
        Ok(actions)
    }

    /// Moves the committed offset to `from` and forgets what was applied at or after it, so
    /// the events from there on are applied again (`from = 0` rebuilds the target).
    pub async fn replay(&self, from: u64) -> Result<(), ProjectError> {
        let applied = self
            .state
            .applied(&self.pipeline)
            .map_err(self.err_state())?;
        if from == 0 {
            applied.clear().map_err(self.err_state())?;
        } else {
            let stale: Vec<String> = applied
                .iter()
                .filter_map(|r| match r {
                    Ok((k, a)) if a.offset >= from => Some(Ok(k)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(self.err_state())?;
            applied
                .apply(stale.iter().map(|k| (k.as_str(), None)))
                .map_err(self.err_state())?;
        }
        self.state.flush().await.map_err(self.err_state())?;
        for p in 0..self.log.partitions() {
            self.log
                .seek(&self.consumer, p, from)
                .await
                .map_err(|source| ProjectError::Commit {
                    pipeline: self.pipeline.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}
