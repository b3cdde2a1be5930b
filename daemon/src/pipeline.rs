//! One configured pipeline wired together: its log, scanner and projector, and the status
//! and lag figures `status`, `/status` and `/metrics` show.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;

use crate::config::PipelineConfig;
use crate::log::{self, EventLog};
use crate::metrics::{metrics, Metrics};
use crate::projector::{ProjectError, Projector, Retrying};
use crate::scanner::{ScanProgress, Scanner};
use crate::state::{Failure, GuardTrip, ReplayMark, ScanRecord, State, StateError};
use crate::verify::Prefilled;
use crate::{source, target};

/// A pipeline could not be built or inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// Its log could not be opened.
    #[error("pipeline `{pipeline}`: {source}")]
    OpenLog {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: log::ReadError,
    },
    /// Local state could not be read.
    #[error("pipeline `{pipeline}`: {source}")]
    State {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: StateError,
    },
    /// Offsets could not be read.
    #[error(transparent)]
    Project(#[from] ProjectError),
}

/// Offsets and lag of one partition of a pipeline's log.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    /// Partition number.
    pub partition: u32,
    /// Next offset the log assigns in this partition.
    pub head: u64,
    /// Next offset the projector reads in this partition.
    pub committed: u64,
    /// Events of this partition not yet applied.
    pub lag_events: u64,
    /// Age of this partition's oldest unapplied event, 0 when caught up.
    pub lag_seconds: f64,
}

/// Offsets, lag and health of one pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineStatus {
    /// Pipeline name.
    pub pipeline: String,
    /// Log backend.
    pub log: &'static str,
    /// What this daemon does for the pipeline: one with `project` never scans, so its
    /// scan fields stay empty while the scanning daemon scans, and `status` says so.
    pub role: crate::config::Role,
    /// Why the log cannot be read now (a Kafka broker that is down), and what to do. The
    /// offsets and the lag are `None` then, and `partitions` is empty; the rest comes from
    /// the local state and is shown all the same.
    pub error: Option<String>,
    /// Next offset the log assigns (summed over partitions).
    pub head: Option<u64>,
    /// Next offset the projector reads (summed over partitions).
    pub committed: Option<u64>,
    /// Events not yet applied.
    pub lag_events: Option<u64>,
    /// Age of the oldest unapplied event, 0 when caught up.
    pub lag_seconds: Option<f64>,
    /// The same, per partition of the log (one entry for the sled log).
    pub partitions: Vec<PartitionStatus>,
    /// Seconds since the last complete, error-free scan (`null` before the first one).
    pub source_freshness_seconds: Option<f64>,
    /// The last scan that ended.
    pub last_scan: Option<ScanRecord>,
    /// The daemon's scan running now, with its counts so far (a first scan of a large
    /// source appends thousands of events before it ends and records itself). Only the
    /// daemon knows it; `null` otherwise.
    pub scan_in_progress: Option<ScanProgress>,
    /// Set while the last scan's deletes are withheld by `max_delete`.
    pub delete_guard: Option<GuardTrip>,
    /// The configured delete limit (`max_delete`), shown whether or not it tripped.
    pub max_delete: String,
    /// Events that failed permanently; each is tried again by the next run and when it
    /// changes in the source.
    pub failed: Vec<Failure>,
    /// Events waiting for the items they reference, and directory deletes waiting for the
    /// directory to be empty, with what they wait for.
    pub deferred: Vec<DeferredItem>,
    /// Deletes not applied because `prune` is off: the target still holds those items.
    /// With `prune = true` they are applied once the projector has caught up.
    pub retained_deletes: usize,
    /// Whether the target applies deletes (`prune = true`).
    pub prune: bool,
    /// With `prune = true`: how many of `retained_deletes` are of items the source holds
    /// again, which stay for the next scan to bring up to date instead of being applied.
    pub retained_back: usize,
    /// With `prune = true`: why the retained deletes are not applied, when together they
    /// are more than `max_delete` allows ([`Projector::retained_withheld`]); `null`
    /// otherwise.
    pub retained_withheld: Option<String>,
    /// Set while the daemon's projector retries with backoff (the target refuses writes:
    /// a full disk, a server down; or the log cannot be read): the lag grows, and this
    /// says why. Only the daemon knows it; `null` otherwise.
    pub projector_retrying: Option<Retrying>,
    /// Why every `sync`, `project`, `plan` and `run` of this pipeline refuses to apply
    /// anything until a person settles it (the target changed or is gone under applied
    /// state, the state is another pipeline's): [`Projector::check_target`], reading
    /// only. `null` when nothing blocks it. The lag reads 0 then while nothing moves.
    pub blocked: Option<String>,
}

/// An event waiting for the items it references (or a directory delete waiting for its
/// directory to be empty), as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeferredItem {
    /// Kind of the item.
    pub kind: String,
    /// Key of the item.
    pub key: String,
    /// The item's name, when its event carries one (a REST kind's `name_field`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Offset of the waiting event.
    pub offset: u64,
    /// When it was first deferred.
    pub since: chrono::DateTime<Utc>,
    /// What it waits for.
    pub reason: String,
}

/// A pipeline ready to scan and project.
pub struct Pipeline {
    /// Its config.
    pub config: PipelineConfig,
    /// Its event log.
    pub log: Arc<dyn EventLog>,
    /// Its scanner.
    pub scanner: Scanner,
    /// Its projector.
    pub projector: Projector,
    state: State,
    /// Held by [`Pipeline::status`] from its first read to its last gauge update. The
    /// daemon's gauge task and every `/metrics` scrape refresh the gauges; without it, a
    /// refresh that read the offsets earlier could set its older figures over a newer
    /// one's (a scrape once showed 1 event waiting after a scan that appended 44).
    refreshing: tokio::sync::Mutex<()>,
    /// What the last refresh that reached the log saw unapplied, so the lag in seconds
    /// keeps growing while the log cannot be read (a Kafka broker down).
    unapplied: std::sync::Mutex<Unapplied>,
    /// When this process built the pipeline: the freshness gauge counts from it until a
    /// first complete scan, rather than read 0 (a scan just done) for a pipeline never
    /// scanned.
    started: chrono::DateTime<Utc>,
    /// Set once a scan of this process has listed the source (`ok` or `degraded`):
    /// `/readyz` answers 503 naming the pipeline until then.
    scanned: AtomicBool,
}

/// Seconds from `at` to `now`; 0 without `at`.
fn age_at(now: chrono::DateTime<Utc>, at: Option<chrono::DateTime<Utc>>) -> f64 {
    at.map_or(0.0, |o| {
        ((now - o).num_milliseconds().max(0)) as f64 / 1000.0
    })
}

/// What [`Pipeline::status`] reads from the log.
struct LogOffsets {
    /// Next offset the log assigns, summed over partitions.
    head: u64,
    /// Next offset the projector reads, summed over partitions.
    committed: u64,
    /// When the oldest unapplied event of any partition was observed.
    oldest: Option<chrono::DateTime<Utc>>,
    /// Each partition's figures, and when its oldest unapplied event was observed.
    partitions: Vec<(PartitionStatus, Option<chrono::DateTime<Utc>>)>,
}

/// When the oldest unapplied events were observed, as the last refresh that read the log
/// found them: for the pipeline, and per partition.
#[derive(Default)]
struct Unapplied {
    oldest: Option<chrono::DateTime<Utc>>,
    partitions: Vec<Option<chrono::DateTime<Utc>>>,
    /// Set when the last refresh could not read the log: the lag gauges then age.
    log_unreadable: bool,
    /// When the last refresh that could not read the log gave up, and why: a status that
    /// waited for that refresh to end shows its error instead of asking the log again
    /// (with a Kafka broker down, each ask waits for the client to find it down).
    unreadable_at: Option<(std::time::Instant, String)>,
}

impl Pipeline {
    /// A first projection into a directory target that already holds entries, checked
    /// before the projector applies anything ([`Prefilled::check`]).
    pub fn prefilled(&self) -> Option<Prefilled> {
        Prefilled::check(&self.config, &self.state)
    }

    /// Builds the pipeline's components on the shared state; its log waits for an
    /// unreachable backend as `patience` says.
    pub fn build(
        config: &PipelineConfig,
        state: &State,
        patience: log::Patience,
    ) -> Result<Pipeline, PipelineError> {
        let log = log::open(config, state, patience).map_err(|source| PipelineError::OpenLog {
            pipeline: config.name.clone(),
            source,
        })?;
        let target = target::build(config);
        let scanner = Scanner::new(
            &config.name,
            source::build(config),
            log.clone(),
            state.clone(),
            config.max_delete,
        )
        .with_owner(config.source_identity(), target.identity());
        let projector = Projector::new(
            &config.name,
            log.clone(),
            target,
            state.clone(),
            config.target.prune(),
            config.concurrency,
            config.batch_size,
        )
        .with_source(config.source_identity())
        .with_max_delete(config.max_delete)
        .with_retry_max_backoff(config.retry_max_backoff)
        .with_failed_retry_interval(config.failed_retry_interval);
        let scans = config.role.scans();
        metrics().init_pipeline(
            &config.name,
            log.partitions(),
            &config.source.kinds(),
            scans,
        );
        // The scanner's gauges as the last scan left them, so a restart neither resolves a
        // tripped delete guard's alert nor shows "never scanned" until its first scan ends.
        let last_scan = state
            .scans()
            .and_then(|s| s.get(&config.name))
            .map_err(|source| PipelineError::State {
                pipeline: config.name.clone(),
                source,
            })?;
        if let Some(scan) = last_scan.filter(|_| scans) {
            if let Some(at) = scan.last_success_at {
                Metrics::set_time(&metrics().last_scan_success, &config.name, at);
            }
            metrics()
                .delete_guard_active
                .with_label_values(&[&config.name])
                .set(i64::from(scan.guard.is_some()));
        }
        let last_apply = state
            .last_applies()
            .and_then(|r| r.get(&config.name))
            .map_err(|source| PipelineError::State {
                pipeline: config.name.clone(),
                source,
            })?;
        if let Some(at) = last_apply {
            Metrics::set_time(&metrics().last_apply, &config.name, at);
        }
        Ok(Pipeline {
            config: config.clone(),
            log,
            scanner,
            projector,
            state: state.clone(),
            refreshing: tokio::sync::Mutex::new(()),
            unapplied: std::sync::Mutex::new(Unapplied::default()),
            started: Utc::now(),
            scanned: AtomicBool::new(false),
        })
    }

    /// Pipeline name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Notes a scan of this process that ended with `result`: one that listed the source
    /// (`ok`, or `degraded` by some entries) makes the pipeline ready.
    pub fn note_scan(&self, result: &str) {
        if matches!(result, "ok" | "degraded") {
            self.scanned.store(true, Ordering::SeqCst);
        }
    }

    /// Whether this process scans the pipeline and no scan of it has listed the source yet
    /// (a `role = "project"` daemon never scans, so it never waits for one).
    pub fn awaits_first_scan(&self) -> bool {
        self.config.role.scans() && !self.scanned.load(Ordering::SeqCst)
    }

    /// Updates the gauges that do not need the log: the failed items, the scanner's
    /// freshness and, while
    /// the log cannot be read, the lag in seconds aged from the last figures read (nothing
    /// unapplied then can have been committed since). Returns the last scan.
    ///
    /// `/metrics` calls it when a full refresh takes too long, so a scrape answers in
    /// time while a Kafka broker is down and still shows the scanner and lag growing.
    pub fn refresh_local_gauges(
        &self,
        now: chrono::DateTime<Utc>,
    ) -> Result<Option<ScanRecord>, PipelineError> {
        let last_scan = self
            .state
            .scans()
            .and_then(|s| s.get(&self.config.name))
            .map_err(|source| PipelineError::State {
                pipeline: self.config.name.clone(),
                source,
            })?;
        let failed = self
            .state
            .failures(&self.config.name)
            .map_err(|source| PipelineError::State {
                pipeline: self.config.name.clone(),
                source,
            })?
            .len();
        let m = metrics();
        let p = [self.config.name.as_str()];
        m.failed_items.with_label_values(&p).set(failed as i64);
        if self.config.role.scans() {
            // Never scanned completely: the source has not been seen since this process
            // started, at best.
            let since = last_scan
                .as_ref()
                .and_then(|s| s.last_success_at)
                .unwrap_or(self.started);
            m.source_freshness_seconds
                .with_label_values(&p)
                .set(age_at(now, Some(since)));
        }
        let known = self.unapplied.lock().unwrap();
        if known.log_unreadable {
            m.lag_seconds
                .with_label_values(&p)
                .set(age_at(now, known.oldest));
            for (part, at) in known.partitions.iter().enumerate() {
                m.partition_lag_seconds
                    .with_label_values(&[p[0], &part.to_string()])
                    .set(age_at(now, *at));
            }
        }
        Ok(last_scan)
    }

    /// The log's offsets, summed and per partition, and when the unapplied events were
    /// observed.
    async fn offsets(
        &self,
        age: impl Fn(Option<chrono::DateTime<Utc>>) -> f64,
    ) -> Result<LogOffsets, PipelineError> {
        let mut head = 0;
        let mut committed = 0;
        let mut oldest: Option<chrono::DateTime<Utc>> = None;
        let mut partitions = Vec::new();
        let state_err = |source| PipelineError::State {
            pipeline: self.config.name.clone(),
            source,
        };
        let replays = self.state.replays_if_any().map_err(state_err)?;
        for p in 0..self.log.partitions() {
            let replay = match &replays {
                Some(r) => r
                    .get(&format!("{}/{p}", self.config.name))
                    .map_err(state_err)?,
                None => None,
            };
            let read_err = |source| ProjectError::Read {
                pipeline: self.config.name.clone(),
                source,
            };
            let h = self.log.head_for_status(p).await.map_err(read_err)?;
            let c = self
                .log
                .committed_for_status(self.projector.consumer(), p)
                .await
                .map_err(|source| ProjectError::ReadOffset {
                    pipeline: self.config.name.clone(),
                    source,
                })?;
            head += h;
            committed += c.min(h);
            let mut first_unapplied = None;
            if c < h {
                let first = self.log.read(p, c, 1).await.map_err(read_err)?;
                if let Some(record) = first.into_iter().next() {
                    if let Ok(e) = record.event {
                        let since = ReplayMark::waiting_since(
                            replay.as_ref(),
                            record.offset,
                            e.observed_at,
                        );
                        first_unapplied = Some(since);
                        oldest = Some(oldest.map_or(since, |o| o.min(since)));
                    }
                }
            }
            partitions.push((
                PartitionStatus {
                    partition: p,
                    head: h,
                    committed: c.min(h),
                    lag_events: h - c.min(h),
                    lag_seconds: age(first_unapplied),
                },
                first_unapplied,
            ));
        }
        Ok(LogOffsets {
            head,
            committed,
            oldest,
            partitions,
        })
    }

    /// Reads offsets, lag and the last scan, and updates the lag metrics with them. A log
    /// that cannot be read is no error here: the status says why in
    /// [`PipelineStatus::error`], and still shows what the local state holds (the last
    /// scan, the delete guard, the failed and waiting items), which on-call people need
    /// most while the log is down.
    pub async fn status(&self) -> Result<PipelineStatus, PipelineError> {
        self.read_status(true).await.map(|(status, _)| status)
    }

    /// Updates the lag metrics as [`Pipeline::status`] does, without counting the retained
    /// deletes: that walks every one (sled counts a tree by iterating it), which with
    /// `prune` off grows with every delete the source ever had; the daemon refreshes its
    /// gauges every second. Fails when the log cannot be read.
    pub async fn refresh_gauges(&self) -> Result<(), PipelineError> {
        match self.read_status(false).await? {
            (_, Some(unreadable)) => Err(unreadable),
            (_, None) => Ok(()),
        }
    }

    /// Why the projector refuses to start, as `plan` checks it (reading only); `None`
    /// when it would start. Errors reading the state or the log are the status's own.
    async fn blocked(&self) -> Option<String> {
        match self.projector.check_target(false).await {
            Err(
                e @ (ProjectError::Owner(_)
                | ProjectError::TargetChanged { .. }
                | ProjectError::TargetMissing { .. }
                | ProjectError::WrittenElsewhere(_)),
            ) => Some(e.to_string()),
            _ => None,
        }
    }

    /// The status, and the error of a log that could not be read (also in the status's
    /// `error`); `retained_deletes` counted only with `retained`, 0 otherwise.
    async fn read_status(
        &self,
        retained: bool,
    ) -> Result<(PipelineStatus, Option<PipelineError>), PipelineError> {
        let asked = std::time::Instant::now();
        let _refreshing = self.refreshing.lock().await;
        let state_err = |source| PipelineError::State {
            pipeline: self.config.name.clone(),
            source,
        };
        let now = Utc::now();
        let age = |at: Option<chrono::DateTime<Utc>>| age_at(now, at);
        let last_scan = self.refresh_local_gauges(now)?;
        let freshness = last_scan
            .as_ref()
            .and_then(|s| s.last_success_at)
            .map(|at| age(Some(at)));
        // A status asked while a refresh was reading the log, which it could not: that
        // refresh's answer, given since the status was asked, is this one's too.
        let failed_meanwhile = match &self.unapplied.lock().unwrap().unreadable_at {
            Some((at, e)) if retained && *at >= asked => Some(e.clone()),
            _ => None,
        };
        let (offsets, error, unreadable) = match failed_meanwhile {
            Some(message) => (None, Some(message), None),
            None => match self.offsets(age).await {
                Ok(read) => {
                    *self.unapplied.lock().unwrap() = Unapplied {
                        oldest: read.oldest,
                        partitions: read.partitions.iter().map(|(_, at)| *at).collect(),
                        log_unreadable: false,
                        unreadable_at: None,
                    };
                    (Some(read), None, None)
                }
                Err(e) => {
                    let mut known = self.unapplied.lock().unwrap();
                    known.log_unreadable = true;
                    known.unreadable_at = Some((std::time::Instant::now(), e.to_string()));
                    drop(known);
                    self.refresh_local_gauges(Utc::now())?;
                    (None, Some(e.to_string()), Some(e))
                }
            },
        };
        let m = metrics();
        let p = [self.config.name.as_str()];
        m.log_readable
            .with_label_values(&p)
            .set(i64::from(offsets.is_some()));
        let failed = self
            .state
            .failures(&self.config.name)
            .map_err(state_err)?
            .iter()
            .map(|r| r.map(|(_, f)| f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(state_err)?;
        let mut deferred = self
            .state
            .deferred(&self.config.name)
            .map_err(state_err)?
            .iter()
            .map(|r| {
                r.map(|(_, d)| {
                    let refs: Vec<String> = d
                        .event
                        .refs
                        .iter()
                        .map(|r| format!("{} {} (at {})", r.kind, r.key, r.path))
                        .collect();
                    DeferredItem {
                        reason: if let Some(error) = &d.error {
                            format!(
                                "the target failed it: {error}; it is tried again by the daemon after a pause, or by the next `sync` or `project`"
                            )
                        } else if let Some(t) = &d.taken {
                            format!(
                                "waiting for the source item that holds the target item it would adopt by name (id {}) to let it go, as its delete may still come; fails if it does not: {}",
                                t.target_id, t.reason
                            )
                        } else if d.event.refs.is_empty() {
                            "waiting for the directory in its place on the target to be empty (the deletes of what it holds are not all applied yet, or the target holds entries the source does not have); tried again after every batch".into()
                        } else if d.partial {
                            format!(
                                "written without its references, to patch once they exist: {}",
                                refs.join(", ")
                            )
                        } else {
                            format!("waiting for referenced items: {}", refs.join(", "))
                        },
                        kind: d.event.kind,
                        key: d.event.key,
                        name: d.event.name,
                        offset: d.event.offset,
                        since: d.since,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(state_err)?;
        for r in self
            .state
            .dir_deletes(&self.config.name)
            .map_err(state_err)?
            .iter()
        {
            let (_, d) = r.map_err(state_err)?;
            deferred.push(DeferredItem {
                reason: "directory delete waiting for the directory to be empty (the deletes of its contents are not all applied yet, or the target holds entries the source does not have); tried again after every batch".into(),
                kind: d.event.kind,
                key: d.event.key,
                name: d.event.name,
                offset: d.event.offset,
                since: d.since,
            });
        }

        let mut partitions = Vec::new();
        if let Some(LogOffsets {
            head,
            committed,
            oldest,
            partitions: read,
        }) = &offsets
        {
            m.log_head_offset.with_label_values(&p).set(*head as i64);
            m.committed_offset
                .with_label_values(&p)
                .set(*committed as i64);
            m.lag_events
                .with_label_values(&p)
                .set((head - committed) as i64);
            m.lag_seconds.with_label_values(&p).set(age(*oldest));
            for (part, _) in read {
                let labels = [p[0], &part.partition.to_string()];
                m.partition_lag_events
                    .with_label_values(&labels)
                    .set(part.lag_events as i64);
                m.partition_lag_seconds
                    .with_label_values(&labels)
                    .set(part.lag_seconds);
                partitions.push(part.clone());
            }
        }
        m.deferred_events
            .with_label_values(&p)
            .set(deferred.len() as i64);
        m.deferred_age_seconds
            .with_label_values(&p)
            .set(age(deferred.iter().map(|d| d.since).min()));
        // A gauge, not a reason to fail the status: a real state error shows elsewhere.
        if let Ok(bytes) = self.state.size_on_disk() {
            m.state_size_bytes.set(bytes as i64);
        }
        let retained_deletes = if retained {
            self.state
                .retained(&self.config.name)
                .map_err(state_err)?
                .len()
        } else {
            0
        };
        let standing = match retained_deletes {
            0 => None,
            _ => self.projector.retained_standing().await?,
        };
        let status = PipelineStatus {
            pipeline: self.config.name.clone(),
            log: self.log.backend(),
            role: self.config.role,
            error,
            head: offsets.as_ref().map(|o| o.head),
            committed: offsets.as_ref().map(|o| o.committed),
            lag_events: offsets.as_ref().map(|o| o.head - o.committed),
            lag_seconds: offsets.as_ref().map(|o| age(o.oldest)),
            partitions,
            source_freshness_seconds: freshness,
            delete_guard: last_scan.as_ref().and_then(|s| s.guard.clone()),
            max_delete: self.config.max_delete.to_string(),
            last_scan,
            scan_in_progress: self.scanner.in_progress(),
            failed,
            deferred,
            retained_deletes,
            prune: self.projector.prunes(),
            retained_back: standing.as_ref().map_or(0, |s| s.back),
            retained_withheld: standing.and_then(|s| s.withheld),
            projector_retrying: self.projector.retrying(),
            blocked: if retained { self.blocked().await } else { None },
        };
        Ok((status, unreadable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon's pipeline starts with the scanner's gauges as its last scan left them: a
    /// restart must not resolve a tripped delete guard's alert, nor read "never scanned"
    /// (0), while its first scan runs. (A test of the real daemon cannot tell the gauges
    /// restored from the first scan's: that scan ends before the first scrape.)
    #[tokio::test]
    async fn a_pipeline_starts_with_its_last_scans_guard_and_success_time() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let text = "state_dir = \"state\"\n[[pipeline]]\nname = \"restored\"\n[pipeline.source.dir]\npath = \"src\"\n[pipeline.target.dir]\npath = \"dst\"\n";
        let config = crate::config::Config::parse(&dir.path().join("t.toml"), text).unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        let record: ScanRecord = serde_json::from_value(serde_json::json!({
            "id": "20261122T000000.000Z",
            "started_at": "2026-11-22T00:00:00Z",
            "duration_secs": 1.0,
            "listed": 20, "upserts": 0, "deletes": 0, "errors": 0, "skipped": 0,
            "result": "ok",
            "guard": {"would_delete": 20, "allowed": 10, "limit": "10"},
            "last_success_at": "2026-11-21T12:00:00Z",
        }))
        .unwrap();
        state.scans().unwrap().put("restored", &record).unwrap();
        Pipeline::build(&config.pipelines[0], &state, crate::log::Patience::Daemon).unwrap();
        let m = metrics();
        assert_eq!(
            m.delete_guard_active.with_label_values(&["restored"]).get(),
            1
        );
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-21T12:00:00Z").unwrap();
        assert_eq!(
            m.last_scan_success.with_label_values(&["restored"]).get(),
            at.timestamp() as f64
        );
    }
}
