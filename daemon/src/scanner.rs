//! Listing → events: diffs a streaming listing against the source index, appends an
//! `upsert` for every new or changed item and, after a listing without any error, a
//! `delete` for every indexed key no longer listed — unless the delete guard trips. The
//! index is updated only after the log has made the events durable, and records how far
//! the log it reflects goes ([`LogMark`]): a scan that finds the log further first brings
//! the index up to it from the events in between ([`Scanner::catch_up`]), so a crash
//! between an append and its index changes reaching the disk loses nothing.

mod digest;

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use tidemark_proto::{item_identity, item_version, Event, Op, SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::DeleteLimit;
use crate::log::{AppendError, EventLog, ReadError};
use crate::metrics::{metrics, Metrics};
use crate::progress::Progress;
use crate::recurring::{log_recurring, Recurring, Seen as Repeat};
use crate::source::{Entry, FetchError, Item, ListError, ListStream, Listing, Mount, Source};
use crate::state::{
    GuardTrip, IndexEntry, LogMark, OwnerError, ScanRecord, SourceNoted, State, StateError,
    ERRORS_KEPT,
};
use digest::{Digest, PreviousVersion, Seen};

/// Result of a scan stopped by shutdown before its listing ended (see
/// [`Scanner::scan_until`]).
pub const INTERRUPTED: &str = "interrupted";

/// Events appended per durable batch.
const APPEND_BATCH: usize = 1000;
/// Inline bytes buffered before a batch is appended regardless of its length.
const APPEND_BYTES: u64 = 16 * 1024 * 1024;
/// Longest a found change waits for its batch to fill: the daemon's projector applies
/// changes while the rest of the tree is still listed, so a scan that finds a few changes
/// among many unchanged files does not hold them all until the listing ends.
const APPEND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// A scan failed as a whole; events appended before the failure stay valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// The source could not be listed at all.
    #[error("pipeline `{pipeline}`: {source}")]
    List {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ListError,
    },
    /// The log refused the events.
    #[error("pipeline `{pipeline}`: {source}")]
    Append {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: AppendError,
    },
    /// The log could not be read to bring the index up to it.
    #[error("pipeline `{pipeline}`: {source}")]
    Read {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ReadError,
    },
    /// The index could not be read or written.
    #[error("pipeline `{pipeline}`: {source}")]
    State {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: StateError,
    },
    /// The state is another pipeline's (another source's log): nothing was scanned.
    #[error(transparent)]
    Owner(#[from] OwnerError),
}

/// A listing of a source, started before the scan that consumes it.
pub struct StartedListing {
    listing: ListStream,
    started_at: chrono::DateTime<Utc>,
    started: Instant,
    /// The source that lists: it knows what its walk saw (the root it started from),
    /// which the scan asks it about before it emits deletes ([`Source::absent`]).
    source: Arc<dyn Source>,
}

impl StartedListing {
    /// Starts listing `source`.
    pub fn start(source: Arc<dyn Source>) -> StartedListing {
        StartedListing {
            listing: source.list(),
            started_at: Utc::now(),
            started: Instant::now(),
            source,
        }
    }
}

/// A pipeline's source index as its last scans left it, read without writing anything:
/// which items the source had when it was last listed, and at which version (`verify`
/// tells by it what the next scan changes from what the log already holds).
pub struct IndexView(Digest);

impl IndexView {
    /// Reads `pipeline`'s index.
    pub fn read(state: &State, pipeline: &str) -> Result<IndexView, StateError> {
        Digest::peek(state, pipeline).map(IndexView)
    }

    /// Whether the index holds `identity`: the last scan listed it (or a scan before,
    /// whose delete of it was withheld), and no delete of it is in the log since.
    pub fn holds(&self, identity: &str) -> bool {
        self.0.version_of(identity).is_some()
    }

    /// Whether the index holds `identity` at `version`: the log holds that version's event.
    pub fn holds_at(&self, identity: &str, version: &str) -> bool {
        self.0.version_of(identity).is_some_and(|v| v.is(version))
    }
}

/// Turns listings of one pipeline's source into events.
pub struct Scanner {
    pipeline: String,
    source: Arc<dyn Source>,
    log: Arc<dyn EventLog>,
    state: State,
    max_delete: DeleteLimit,
    /// Entries read and hashed at once.
    fetch_concurrency: usize,
    /// Longest a found change waits for its batch to fill ([`APPEND_INTERVAL`]).
    append_interval: std::time::Duration,
    /// Keys already warned about as skipped: a FIFO or socket left in the tree is warned
    /// about once per process, not at every scan (each scan still counts it).
    warned_skipped: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Items already warned of ([`Item::warning`], an identity and its warning): a REST
    /// item without a name is warned of once per process, not at every scan; later scans
    /// count such items at debug.
    warned_items: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    /// Reference fields (kind, pointer) that no item of their kind had at the last scan
    /// that read any: a lasting condition, warned of when it begins, at debug while it
    /// lasts (every such scan is still degraded, and `status` shows why), and noted when
    /// it ends.
    absent_refs: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    /// The items (identities, sorted) that the scans deciding their deletes did not list
    /// although the source still has them: the same items missed scan after scan (a
    /// `path` that filters them out, with `confirm_deletes` on) are warned of once, at
    /// debug while they stay the same, and again when they change.
    kept_in_source: Recurring<Vec<String>>,
    /// The delete guard's trips (deletes it would have made, deletes allowed): a daemon
    /// whose guard trips scan after scan for the same deletes warns once, at debug while it
    /// repeats (every trip is still counted and recorded), and again when what it
    /// withholds changes.
    guard_warned: Recurring<(u64, u64)>,
    /// The entries the scans could not list or read (their errors' messages): an
    /// unreadable file is warned of when a scan first meets it, at debug while the scans
    /// after keep meeting it, and an info line says when a complete scan meets none.
    entry_errors: Recurring<String>,
    /// The scan running now, as far as it went, for `status`: a first scan of a large
    /// source takes minutes, and the log fills with its events meanwhile, while its record
    /// is written only at its end.
    running: std::sync::Mutex<Option<ScanProgress>>,
    /// The source that listed the running scan, when a listing started before the scan
    /// did ([`StartedListing`]): asked what is absent, as it knows the walk it made.
    lister: std::sync::Mutex<Option<Arc<dyn Source>>>,
    /// The configured source and target (identities), checked against those the state
    /// notes before a scan reads or appends anything ([`State::check_owner`]): a log
    /// another config's pipeline of the same name built is not this source's to diff.
    /// `None` checks nothing.
    owner: Option<(String, String)>,
}

/// A scan still running, as `status` shows it: its counts so far.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScanProgress {
    /// Scan id (also in every event it appended).
    pub id: String,
    /// When it started.
    pub started_at: chrono::DateTime<Utc>,
    /// Entries listed so far.
    pub listed: u64,
    /// Upserts appended to the log so far.
    pub upserts: u64,
    /// Deletes appended so far (only once the listing is complete).
    pub deletes: u64,
    /// Entries that could not be listed or read so far.
    pub errors: u64,
}

/// Forgets the running scan ([`Scanner::in_progress`]) when dropped: when the scan ends,
/// and also when the daemon drops a scan that did not stop in time.
struct Running<'a>(&'a std::sync::Mutex<Option<ScanProgress>>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = None;
    }
}

/// What one scan noticed about the items it read, besides their changes.
#[derive(Default)]
struct Noticed {
    /// Items whose warning an earlier scan of this process gave already.
    repeated_warnings: u64,
    /// Entries this scan could not list or read that the scan before could not either
    /// (logged at debug).
    repeated_errors: u64,
    /// Per kind and reference field, how the items read hold it.
    refs: std::collections::BTreeMap<(String, String), RefTally>,
    /// Keys of the entries that vanished before the scan read them.
    vanished: std::collections::HashSet<String>,
}

/// How the items of one kind read by a scan hold one reference field.
#[derive(Default)]
struct RefTally {
    /// Some item has it.
    present: bool,
    /// Items without it.
    absent: u64,
    /// A near field one of those has (see [`crate::source::RefField::near`]).
    near: Option<String>,
}

/// An entry being read: its indexed version (`None` if new), its fingerprint, and the read.
type Fetch = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Option<PreviousVersion>,
                    Option<String>,
                    Result<Item, FetchError>,
                ),
            > + Send,
    >,
>;

/// What a scan would append, found without appending anything (`sync --dry-run`).
pub struct Preview {
    /// The scan's summary, as a real scan would record it.
    pub record: ScanRecord,
    /// The events the scan would append, in order.
    pub events: Vec<Event>,
}

/// Where a scan's events go: the log, or (a dry run) a list kept for the caller, with
/// the index left as it was.
enum Sink {
    Log,
    Dry(Vec<Event>),
}

#[derive(Default)]
struct Pending {
    events: Vec<Event>,
    index: Vec<(String, IndexEntry)>,
    bytes: u64,
}

impl Scanner {
    /// A scanner appending `source`'s changes to `log`.
    pub fn new(
        pipeline: &str,
        source: Arc<dyn Source>,
        log: Arc<dyn EventLog>,
        state: State,
        max_delete: DeleteLimit,
    ) -> Scanner {
        // Reads of changed files wait on the disk more than on the CPU when the tree is
        // cold, so more of them are kept in flight than there are cores.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Scanner {
            pipeline: pipeline.to_owned(),
            source,
            log,
            state,
            max_delete,
            fetch_concurrency: (cores * 4).max(16),
            append_interval: APPEND_INTERVAL,
            warned_skipped: Default::default(),
            warned_items: Default::default(),
            absent_refs: Default::default(),
            kept_in_source: Default::default(),
            guard_warned: Default::default(),
            entry_errors: Default::default(),
            running: Default::default(),
            lister: Default::default(),
            owner: None,
        }
    }

    /// The same, checking before each scan that the state is this source's and target's
    /// (identities, as [`State::check_owner`] takes them).
    pub fn with_owner(mut self, source: String, target: String) -> Scanner {
        self.owner = Some((source, target));
        self
    }

    /// Checks that the state is this pipeline's ([`State::check_owner`]); with `write`,
    /// notes the configured source when none is noted (a state of an earlier build).
    /// Whether the source moved: then every listed item is read and appended again, as
    /// the log's events read from its old path.
    fn check_owner(&self, write: bool) -> Result<bool, ScanError> {
        let Some((source, target)) = &self.owner else {
            return Ok(false);
        };
        match self.state.check_owner(&self.pipeline, source, target)? {
            SourceNoted::Same => Ok(false),
            SourceNoted::None => {
                if write {
                    self.state
                        .sources()
                        .and_then(|s| s.put(&self.pipeline, source))
                        .map_err(self.state_err())?;
                }
                Ok(false)
            }
            SourceNoted::Moved { was } => {
                info!(
                    pipeline = %self.pipeline,
                    "the source is now {source}, and {was}, which the log was read from, is gone: taken as moved, so this scan reads every item again and appends it (the target is not written where it already holds it)"
                );
                Ok(true)
            }
        }
    }

    /// The scan running now, with its counts so far; `None` between scans.
    pub fn in_progress(&self) -> Option<ScanProgress> {
        self.running.lock().unwrap().clone()
    }

    /// Brings the running scan's counts up to `record`'s.
    fn publish(&self, record: &ScanRecord) {
        if let Some(running) = self.running.lock().unwrap().as_mut() {
            running.listed = record.listed;
            running.upserts = record.upserts;
            running.deletes = record.deletes;
            running.errors = record.errors;
        }
    }

    fn state_err(&self) -> impl Fn(StateError) -> ScanError + '_ {
        |source| ScanError::State {
            pipeline: self.pipeline.clone(),
            source,
        }
    }

    /// Runs one scan and records its summary for `status`.
    pub async fn scan(&self, progress: &Progress) -> Result<ScanRecord, ScanError> {
        self.scan_inner(progress, None, None).await
    }

    /// Like [`Scanner::scan`], winding down early once `stop` is cancelled: the changes
    /// found so far are appended (and recorded in the index), no deletes are emitted, and
    /// the record's result is `interrupted`, so the daemon's last report counts every
    /// event the scan appended.
    pub async fn scan_until(
        &self,
        progress: &Progress,
        stop: &CancellationToken,
    ) -> Result<ScanRecord, ScanError> {
        self.scan_inner(progress, None, Some(stop)).await
    }

    /// Like [`Scanner::scan_until`], over `early` when it is given: a listing of this
    /// scanner's source started before the scan (see `EarlyListing` in `main.rs`). The
    /// scan's record then starts, and its duration counts, from when the listing started.
    /// A one-shot run passes the token its first signal cancels (Ctrl-C).
    pub async fn scan_listing(
        &self,
        progress: &Progress,
        early: Option<StartedListing>,
        stop: &CancellationToken,
    ) -> Result<ScanRecord, ScanError> {
        self.scan_inner(progress, early, Some(stop)).await
    }

    async fn scan_inner(
        &self,
        progress: &Progress,
        early: Option<StartedListing>,
        stop: Option<&CancellationToken>,
    ) -> Result<ScanRecord, ScanError> {
        let (listing, started_at, t0) = match early {
            Some(e) => {
                *self.lister.lock().unwrap() = Some(e.source);
                (Some(e.listing), e.started_at, e.started)
            }
            None => {
                *self.lister.lock().unwrap() = None;
                (None, Utc::now(), Instant::now())
            }
        };
        // Before any record: another pipeline's state keeps its own last scan.
        let reemit = self.check_owner(true)?;
        let mut record = new_record(started_at);
        *self.running.lock().unwrap() = Some(ScanProgress {
            id: record.id.clone(),
            started_at,
            listed: 0,
            upserts: 0,
            deletes: 0,
            errors: 0,
        });
        let running = Running(&self.running);
        let outcome = self
            .scan_into(&mut record, progress, listing, &mut Sink::Log, stop, reemit)
            .await;
        record.duration_secs = t0.elapsed().as_secs_f64();
        let m = metrics();
        let p = self.pipeline.as_str();
        m.scan_duration
            .with_label_values(&[p])
            .observe(record.duration_secs);
        if let Err(e) = &outcome {
            record.result = "failed".into();
            record.message = Some(e.to_string());
            if record.error_messages.len() < ERRORS_KEPT {
                record.error_messages.push(e.to_string());
            }
            if matches!(e, ScanError::List { .. }) {
                // The source itself could not be listed (its root is gone or unreadable):
                // that is a listing error too, and the errors panel must show it.
                record.errors += 1;
                m.scan_errors.with_label_values(&[p]).inc();
            }
        } else if record.result == INTERRUPTED {
            // Neither a success nor degraded: the next scan lists the rest.
        } else if record.errors > 0 {
            record.result = "degraded".into();
        } else {
            record.last_success_at = Some(Utc::now());
            self.note_mount()?;
        }
        if record.last_success_at.is_none() {
            let previous = self
                .state
                .scans()
                .and_then(|s| s.get(p))
                .map_err(self.state_err())?;
            // A scan that did not weigh its deletes (a listing error, a failure, an
            // interruption) leaves a tripped guard as it was: the deletes are still
            // withheld, and the gauge, its alert and `status` dropped it, to page again
            // at the next complete scan.
            if record.guard.is_none() {
                record.guard = previous.as_ref().and_then(|r| r.guard.clone());
            }
            record.last_success_at = previous.and_then(|r| r.last_success_at);
        }
        if let Some(at) = record.last_success_at {
            Metrics::set_time(&m.last_scan_success, p, at);
        }
        m.scans.with_label_values(&[p, &record.result]).inc();
        m.delete_guard_active
            .with_label_values(&[p])
            .set(i64::from(record.guard.is_some()));
        self.state
            .scans()
            .and_then(|s| s.put(p, &record))
            .map_err(self.state_err())?;
        // Recorded: `status` shows it as the last scan from here on.
        drop(running);
        outcome?;
        info!(
            pipeline = %p,
            scan = %record.id,
            listed = record.listed,
            upserts = record.upserts,
            deletes = record.deletes,
            errors = record.errors,
            skipped = record.skipped,
            vanished = record.vanished,
            result = %record.result,
            seconds = record.duration_secs,
            "scan finished"
        );
        Ok(record)
    }

    /// Fails the scan when the source root was the root of a mounted filesystem at the
    /// last complete scan and no longer is: the filesystem was unmounted, and its
    /// mountpoint (empty, or holding what was there before the mount) would be listed as
    /// a source whose every item was deleted. Nothing is appended, so nothing is deleted.
    fn check_mount(&self) -> Result<(), ScanError> {
        let Some(Mount::Empty(root)) = self.source.mounted() else {
            return Ok(());
        };
        if self
            .state
            .source_mount(&self.pipeline)
            .map_err(self.state_err())?
            == Some(true)
        {
            return Err(ScanError::List {
                pipeline: self.pipeline.clone(),
                source: ListError::Root {
                    message: format!(
                        "the source directory {} is empty and no longer the root of a mounted filesystem, as it was at the last complete scan (the filesystem was unmounted: this is its mountpoint); nothing is listed or deleted until it is mounted again. (A source meant to be this directory from now on: put an entry in it, and the next scan takes it as it is)",
                        root.display()
                    ),
                },
            });
        }
        Ok(())
    }

    /// Notes, after a complete scan, whether the source root is a mountpoint.
    fn note_mount(&self) -> Result<(), ScanError> {
        let Some(now) = self.source.mounted().map(|m| m == Mount::Root) else {
            return Ok(());
        };
        let mounts = self.state.source_mounts().map_err(self.state_err())?;
        if mounts.get(&self.pipeline).map_err(self.state_err())? != Some(now) {
            mounts.put(&self.pipeline, &now).map_err(self.state_err())?;
        }
        Ok(())
    }

    /// What a scan would append now, without appending it, recording it or touching the
    /// index: the listing, the reads of new and changed items, the delete guard and the
    /// listing errors are those of a real scan. Its events have no offsets yet.
    pub async fn preview(&self, progress: &Progress) -> Result<Preview, ScanError> {
        let t0 = Instant::now();
        let mut record = new_record(Utc::now());
        let mut sink = Sink::Dry(Vec::new());
        let reemit = self.check_owner(false)?;
        self.scan_into(&mut record, progress, None, &mut sink, None, reemit)
            .await?;
        record.duration_secs = t0.elapsed().as_secs_f64();
        if record.errors > 0 {
            record.result = "degraded".into();
        }
        let Sink::Dry(events) = sink else {
            unreachable!("a preview collects its events")
        };
        Ok(Preview { record, events })
    }

    async fn scan_into(
        &self,
        record: &mut ScanRecord,
        progress: &Progress,
        listing: Option<ListStream>,
        sink: &mut Sink,
        stop: Option<&CancellationToken>,
        reemit: bool,
    ) -> Result<(), ScanError> {
        // The walk starts before the digest is read, and fills its channel meanwhile.
        let mut listing = listing.unwrap_or_else(|| self.source.list());
        self.check_mount()?;
        let loading = Instant::now();
        // A dry run writes nothing, not even an older state's index moved into a snapshot.
        let write = !matches!(sink, Sink::Dry(_));
        let (mut known, origin) =
            Digest::open(&self.state, &self.pipeline, write).map_err(self.state_err())?;
        debug!(
            pipeline = %self.pipeline,
            keys = known.len(),
            from = origin.as_str(),
            seconds = loading.elapsed().as_secs_f64(),
            "index loaded"
        );
        let stopped = async {
            match stop {
                Some(stop) => stop.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        // A log that does not answer (a Kafka broker down) must not hold up a shutdown: a
        // catch-up cut short is done again by the next scan, as its mark did not move.
        let caught_up = tokio::select! {
            biased;
            caught_up = self.catch_up(&mut known, write) => caught_up?,
            _ = &mut stopped => {
                record.result = INTERRUPTED.into();
                info!(pipeline = %self.pipeline, "scan interrupted before it listed anything");
                return Ok(());
            }
        };
        let mut listing_done = false;
        let mut fetching: FuturesUnordered<Fetch> = FuturesUnordered::new();
        let mut pending = Pending::default();
        let mut flush = tokio::time::interval(self.append_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interrupted = false;
        let mut noticed = Noticed::default();
        loop {
            if write {
                self.publish(record);
            }
            // Once the listing is done and every read is back, what is pending is appended
            // right away below, not at the next tick: waiting for it kept every scan with
            // changes up to 50 ms longer than its work (25 ms on average).
            let finished = listing_done && fetching.is_empty();
            tokio::select! {
                biased;
                _ = &mut stopped, if !finished => {
                    interrupted = true;
                    break;
                }
                _ = flush.tick(), if !pending.events.is_empty() && !finished => {
                    self.append(&mut pending, &mut known, sink, record).await?;
                }
                Some((previous, fingerprint, fetched)) = fetching.next(), if !fetching.is_empty() => {
                    match fetched {
                        Ok(item) => {
                            self.notice(&item, &mut noticed);
                            progress.add_bytes(tidemark_proto::content_len(item.body.as_ref(), item.blob.as_ref()));
                            self.stage(item, previous, fingerprint, &mut pending, record);
                            if pending.events.len() >= APPEND_BATCH || pending.bytes >= APPEND_BYTES {
                                self.append(&mut pending, &mut known, sink, record).await?;
                            }
                        }
                        Err(FetchError::Vanished { kind, key }) => {
                            known.unsee(&item_identity(&kind, &key));
                            self.vanished(record, &mut noticed, key);
                        }
                        Err(e) => noticed.repeated_errors += u64::from(self.entry_error(record, e.to_string())),
                    }
                }
                next = listing.next(), if !listing_done && fetching.len() < self.fetch_concurrency => {
                    match next {
                        None => listing_done = true,
                        Some(Err(e)) if e.is_fatal() => {
                            return Err(ScanError::List { pipeline: self.pipeline.clone(), source: e });
                        }
                        Some(Err(e)) => noticed.repeated_errors += u64::from(self.entry_error(record, e.to_string())),
                        Some(Ok(Listing::Skipped { key, reason })) => {
                            record.skipped += 1;
                            if self.warned_skipped.lock().unwrap().insert(key.clone()) {
                                warn!(pipeline = %self.pipeline, key = %key, "{reason} (warned once; every scan counts it as skipped)");
                            } else {
                                debug!(pipeline = %self.pipeline, key = %key, "{reason}");
                            }
                        }
                        Some(Ok(Listing::Vanished { kind, key })) => {
                            if let Some(kind) = kind {
                                known.unsee(&item_identity(&kind, &key));
                            }
                            self.vanished(record, &mut noticed, key);
                        }
                        Some(Ok(Listing::Entry(entry))) => {
                            record.listed += 1;
                            progress.inc(1);
                            if let Some(fetch) = self.diff(entry, &mut known, reemit) {
                                fetching.push(fetch);
                            }
                        }
                    }
                }
                else => break,
            }
        }
        self.append(&mut pending, &mut known, sink, record).await?;
        if noticed.repeated_warnings > 0 {
            debug!(
                pipeline = %self.pipeline,
                items = noticed.repeated_warnings,
                "{} items still have what an earlier scan warned of (once per item per process)",
                noticed.repeated_warnings
            );
        }
        // Errors already warned of as lasting conditions by an earlier scan.
        let repeated = if interrupted {
            0
        } else {
            self.absent_refs(&noticed, record) + noticed.repeated_errors
        };
        if interrupted {
            info!(
                pipeline = %self.pipeline,
                upserts = record.upserts,
                "scan interrupted: the changes found so far are appended, no deletes; the next scan goes on"
            );
            record.result = INTERRUPTED.into();
        } else if record.errors > repeated {
            warn!(
                pipeline = %self.pipeline,
                errors = record.errors,
                "the listing had errors, so this scan emits no deletes"
            );
        } else if record.errors > 0 {
            debug!(
                pipeline = %self.pipeline,
                errors = record.errors,
                "the listing had errors, so this scan emits no deletes"
            );
        } else {
            self.deletes(record, &mut known, sink, &noticed.vanished)
                .await?;
        }
        if !interrupted && self.entry_errors.end_round() {
            info!(
                pipeline = %self.pipeline,
                "the entries the scans before could not list or read are all read again"
            );
        }
        if let Sink::Log = sink {
            known.store().map_err(self.state_err())?;
            if caught_up && record.upserts + record.deletes > 0 {
                self.mark_covered(stop).await?;
            }
            // Every item of the moved source is in the log anew: it is the source now.
            // A scan that missed some reads them all again next time.
            if reemit && !interrupted && record.errors == 0 {
                if let Some((source, _)) = &self.owner {
                    self.state
                        .sources()
                        .and_then(|s| s.put(&self.pipeline, source))
                        .map_err(self.state_err())?;
                }
            }
        }
        Ok(())
    }

    fn read_err(&self) -> impl Fn(ReadError) -> ScanError + '_ {
        |source| ScanError::Read {
            pipeline: self.pipeline.clone(),
            source,
        }
    }

    /// The log's head in each partition.
    async fn heads(&self) -> Result<Vec<u64>, ReadError> {
        let mut heads = Vec::new();
        for partition in 0..self.log.partitions() {
            heads.push(self.log.head(partition).await?);
        }
        Ok(heads)
    }

    /// Records that the index reflects the whole log, once its changes are durable: only
    /// this pipeline's scanner appends to its log, and every event it appended is in the
    /// index by now. A failure to do so is only warned of: the next scan replays the
    /// events since the last mark into the index, which they are in already.
    /// When `stop` is cancelled and the heads are not at hand at once (a Kafka broker that
    /// does not answer), the mark stays where it was, so as not to hold up a shutdown.
    async fn mark_covered(&self, stop: Option<&CancellationToken>) -> Result<(), ScanError> {
        self.state.flush().await.map_err(self.state_err())?;
        let stopped = async {
            match stop {
                Some(stop) => stop.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let heads = tokio::select! {
            biased;
            heads = self.heads() => heads,
            _ = stopped => {
                debug!(pipeline = %self.pipeline, "stopping: the source index's mark stays where it was; the next scan reads this scan's events again");
                return Ok(());
            }
        };
        let heads = match heads {
            Ok(heads) => heads,
            Err(e) => {
                warn!(pipeline = %self.pipeline, "the source index is up to date, but the log's head could not be read to note so ({e}); the next scan reads this scan's events again");
                return Ok(());
            }
        };
        let mark = LogMark {
            log: self.log.identity(),
            heads,
        };
        self.state
            .index_marks()
            .and_then(|m| m.put(&self.pipeline, &mark))
            .map_err(self.state_err())
    }

    /// Brings the index up to the log before a scan diffs against it. A scan appends a
    /// batch (durable), then journals its index changes, which reach the disk with a later
    /// flush; a crash in between (SIGKILL, OOM, power loss) keeps events the index does
    /// not have. Re-listing re-emits such an item only while the source still has it: one
    /// it deleted meanwhile would never get its delete. So the index notes how far the log
    /// it reflects goes ([`LogMark`], written after its changes were flushed), and the
    /// events past that mark are replayed into it here: an upsert indexes the event's
    /// version without a fingerprint (the event has no inode, so the next listing re-reads
    /// the item rather than trust a quick check), a delete removes the key. Nothing past
    /// the mark (every clean scan ends by moving it) costs one small read and the heads.
    ///
    /// A state without a mark (its first scan, or one written before marks were kept), or
    /// with the mark of another log (`log migrate` maps it; a config naming another topic),
    /// takes its index as it is and marks the log's heads now, durably, before anything is
    /// appended. A dry run (`write` false) replays into memory only.
    ///
    /// `Ok(false)`: the log could not be read (a Kafka broker down), and the scan goes on
    /// with the index as it is, as scans did before marks were kept (so one that finds
    /// nothing to append still records its result, a tripped delete guard included); it
    /// then leaves the mark where it was, and the next scan catches up.
    async fn catch_up(&self, known: &mut Digest, write: bool) -> Result<bool, ScanError> {
        match self.try_catch_up(known, write).await {
            Err(ScanError::Read { source, .. }) => {
                debug!(pipeline = %self.pipeline, "the log cannot be read to bring the source index up to it ({source}); this scan goes on with the index as it is, and the next one catches up");
                Ok(false)
            }
            done => done.map(|()| true),
        }
    }

    async fn try_catch_up(&self, known: &mut Digest, write: bool) -> Result<(), ScanError> {
        let marks = self.state.index_marks().map_err(self.state_err())?;
        let log = self.log.identity();
        let heads = self.heads().await.map_err(self.read_err())?;
        let covered = match marks.get(&self.pipeline).map_err(self.state_err())? {
            Some(mark) if mark.log == log => mark.heads,
            other => {
                if write {
                    if let Some(other) = other {
                        info!(pipeline = %self.pipeline, "the source index was kept against log `{}`, this is `{log}`: the index is taken as it is", other.log);
                    }
                    marks
                        .put(&self.pipeline, &LogMark { log, heads })
                        .map_err(self.state_err())?;
                    self.state.flush().await.map_err(self.state_err())?;
                }
                return Ok(());
            }
        };
        let mut behind = false;
        let mut replayed = 0u64;
        for (partition, &head) in (0u32..).zip(&heads) {
            let from = covered.get(partition as usize).copied().unwrap_or(0);
            if from == head {
                continue;
            }
            behind = true;
            if from > head {
                warn!(pipeline = %self.pipeline, partition, head, mark = from, "the log `{log}` ends before the offset its source index was last brought up to (was it recreated?); the index is taken as it is for this partition");
                continue;
            }
            let mut at = from;
            while at < head {
                let records = self
                    .log
                    .read(partition, at, APPEND_BATCH)
                    .await
                    .map_err(self.read_err())?;
                let Some(last) = records.last() else { break };
                at = last.offset + 1;
                let mut changes = Vec::with_capacity(records.len());
                for r in records.into_iter().filter(|r| r.offset < head) {
                    match r.event {
                        Ok(e) if e.pipeline == self.pipeline => {
                            let entry = (e.op == Op::Upsert).then(|| IndexEntry {
                                version: e.version(),
                                fingerprint: None,
                            });
                            changes.push((e.identity(), entry));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            debug!(pipeline = %self.pipeline, partition, offset = r.offset, "not replayed into the source index: {e}");
                        }
                    }
                }
                let changes: Vec<_> = changes
                    .iter()
                    .map(|(identity, entry)| (identity.as_str(), entry.as_ref()))
                    .collect();
                replayed += changes.len() as u64;
                known.catch_up(&changes, write).map_err(self.state_err())?;
            }
        }
        if !behind {
            return Ok(());
        }
        if replayed > 0 {
            info!(
            pipeline = %self.pipeline,
            events = replayed,
            "the log held {replayed} events past its source index (a scan stopped after appending them, before the index recorded them); the index has them now, so this scan deletes what the source removed since"
            );
        }
        if write {
            self.state.flush().await.map_err(self.state_err())?;
            marks
                .put(&self.pipeline, &LogMark { log, heads })
                .map_err(self.state_err())?;
        }
        Ok(())
    }

    /// Diffs one listed entry against the digest: `None` when it is unchanged, otherwise
    /// the read of its content (with its indexed version, to tell a touched file from a
    /// changed one). With `reemit` (the source moved), every entry is read and appended.
    fn diff(&self, entry: Entry, known: &mut Digest, reemit: bool) -> Option<Fetch> {
        let identity = item_identity(&entry.kind, &entry.key);
        let previous = match known.see(&identity, entry.fingerprint.as_deref()) {
            _ if reemit => None,
            Seen::Unchanged => return None,
            Seen::New => None,
            Seen::Changed(previous) => Some(previous),
        };
        let source = self.source.clone();
        let fingerprint = entry.fingerprint.clone();
        Some(Box::pin(async move {
            (previous, fingerprint, source.fetch(entry).await)
        }))
    }

    /// Warns of what the source found wrong with `item`, once per item per process, and
    /// tallies how it holds its kind's reference fields.
    fn notice(&self, item: &Item, noticed: &mut Noticed) {
        for r in &item.ref_fields {
            let tally = noticed
                .refs
                .entry((item.kind.clone(), r.field.clone()))
                .or_default();
            if r.present {
                tally.present = true;
            } else {
                tally.absent += 1;
                if tally.near.is_none() {
                    tally.near.clone_from(&r.near);
                }
            }
        }
        let Some(warning) = &item.warning else {
            return;
        };
        let first = self
            .warned_items
            .lock()
            .unwrap()
            .insert((item_identity(&item.kind, &item.key), warning.clone()));
        if first {
            warn!(
                pipeline = %self.pipeline,
                kind = %item.kind,
                key = %item.key,
                "{warning} (warned once per item; later scans count such items at debug)"
            );
        } else {
            noticed.repeated_warnings += 1;
        }
    }

    /// Counts a reference field that none of the items of its kind the scan read has as
    /// a listing error: most likely its pointer is mistyped (`/userid` for `/userId`), and
    /// the items go to the target with the source's ids there, unmapped. A field that
    /// some items lack is an optional reference and fine. Warned of when it begins, at
    /// debug while it lasts; returns how many of those errors an earlier scan warned of.
    fn absent_refs(&self, noticed: &Noticed, record: &mut ScanRecord) -> u64 {
        let mut lasting = self.absent_refs.lock().unwrap();
        let mut repeated = 0;
        for ((kind, field), tally) in &noticed.refs {
            let key = (kind.clone(), field.clone());
            if tally.present {
                if lasting.remove(&key) {
                    info!(pipeline = %self.pipeline, kind = %kind, "kind `{kind}`: items have the reference field `{field}` again");
                }
                continue;
            }
            let n = tally.absent;
            let message = format!(
                "kind `{kind}`: none of the {n} items read has the reference field `{field}`, so no reference is mapped there; items that hold it under another name reach the target with the source's ids in it.{} Fix the `field` of that [[…kind.ref]], or set `optional = true` on it if every item may lack the field",
                tally
                    .near
                    .as_ref()
                    .map(|near| format!(" Did you mean `{near}`?"))
                    .unwrap_or_default()
            );
            let first = lasting.insert(key);
            if !first {
                repeated += 1;
            }
            let seen = if first { Repeat::Began } else { Repeat::Again };
            self.listing_error(record, message, seen);
        }
        repeated
    }

    /// Counts an entry that vanished before the scan read it; logged at debug, as temporary
    /// files come and go all the time (the scan's summary line counts them).
    fn vanished(&self, record: &mut ScanRecord, noticed: &mut Noticed, key: String) {
        record.vanished += 1;
        debug!(pipeline = %self.pipeline, key = %key, "vanished before the scan read it; absent from this scan");
        noticed.vanished.insert(key);
    }

    /// Counts and logs an entry that could not be listed or read: warned of when a scan
    /// first meets it, at debug while the scans after meet it again ([`Recurring`]).
    /// Returns whether the scan before met it too.
    fn entry_error(&self, record: &mut ScanRecord, message: String) -> bool {
        let seen = self.entry_errors.met(message.clone());
        self.listing_error(record, message, seen);
        seen == Repeat::Again
    }

    /// Counts a listing error (so the scan emits no deletes) and logs it: as a warning,
    /// but at debug when an earlier scan warned of it (`seen` is [`Repeat::Again`]).
    fn listing_error(&self, record: &mut ScanRecord, message: String, seen: Repeat) {
        let message = format!("{message}; this scan emits no deletes");
        record.errors += 1;
        metrics()
            .scan_errors
            .with_label_values(&[&self.pipeline])
            .inc();
        log_recurring!(seen, warn, [pipeline = %self.pipeline,], &message);
        if record.error_messages.len() < ERRORS_KEPT {
            record.error_messages.push(message.clone());
        }
        record.message.get_or_insert(message);
    }

    fn stage(
        &self,
        item: Item,
        previous: Option<PreviousVersion>,
        fingerprint: Option<String>,
        pending: &mut Pending,
        record: &mut ScanRecord,
    ) {
        let identity = item_identity(&item.kind, &item.key);
        let entry = IndexEntry {
            version: item_version(&item.checksum, item.mode, item.mtime_ns),
            fingerprint,
        };
        let changed = previous.is_none_or(|p| !p.is(&entry.version));
        pending.index.push((identity, entry));
        if !changed {
            return;
        }
        pending.bytes += match &item.body {
            Some(tidemark_proto::Body::Base64(b)) => b.len() as u64,
            Some(tidemark_proto::Body::Json(_)) => 1024,
            None => 256,
        };
        pending.events.push(Event {
            v: SCHEMA_VERSION,
            pipeline: self.pipeline.clone(),
            partition: 0,
            offset: 0,
            kind: item.kind,
            key: item.key,
            op: Op::Upsert,
            checksum: item.checksum,
            mode: item.mode,
            name: item.name,
            refs: item.refs,
            body: item.body,
            blob: item.blob,
            mtime_ns: item.mtime_ns,
            observed_at: Utc::now(),
            scan: record.id.clone(),
        });
    }

    /// Appends the pending events, then (only then) records them in the index and counts
    /// them in `record`: a record counts only what the log took (`not_appended` the rest).
    async fn append(
        &self,
        pending: &mut Pending,
        known: &mut Digest,
        sink: &mut Sink,
        record: &mut ScanRecord,
    ) -> Result<(), ScanError> {
        let upserts = pending.events.len() as u64;
        if let Sink::Dry(events) = sink {
            events.append(&mut pending.events);
            pending.index.clear();
            pending.bytes = 0;
            record.upserts += upserts;
            return Ok(());
        }
        if let Err(e) = self
            .append_events(std::mem::take(&mut pending.events))
            .await
        {
            record.not_appended += upserts;
            return Err(e);
        }
        record.upserts += upserts;
        let changes: Vec<_> = pending
            .index
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v)))
            .collect();
        known.apply(&changes).map_err(self.state_err())?;
        pending.index.clear();
        pending.bytes = 0;
        Ok(())
    }

    /// Appends events durably and counts them.
    async fn append_events(&self, events: Vec<Event>) -> Result<(), ScanError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut counts = std::collections::BTreeMap::new();
        for e in &events {
            *counts.entry((e.kind.clone(), e.op)).or_insert(0u64) += 1;
        }
        self.log
            .append(events)
            .await
            .map_err(|source| ScanError::Append {
                pipeline: self.pipeline.clone(),
                source,
            })?;
        for ((kind, op), n) in counts {
            metrics()
                .events_appended
                .with_label_values(&[&self.pipeline, &kind, op.as_str()])
                .inc_by(n);
        }
        Ok(())
    }

    /// Emits deletes for the indexed keys the listing did not show, within the guard.
    async fn deletes(
        &self,
        record: &mut ScanRecord,
        known: &mut Digest,
        sink: &mut Sink,
        vanished: &std::collections::HashSet<String>,
    ) -> Result<(), ScanError> {
        let unseen = known.unseen();
        if unseen.is_empty() {
            self.kept_in_source.end_round();
            if !matches!(sink, Sink::Dry(_)) {
                self.guard_warned.end_round();
            }
            return Ok(());
        }
        let indexed = known.len();
        // A source that is asked about every unlisted entry (an API: one request each) is
        // asked only when the guard lets the scan through, so a listing that lost much
        // costs no requests.
        let confirm = self.source.confirms_deletes();
        if confirm && self.guard_trips(unseen.len() as u64, indexed, sink, record) {
            return Ok(());
        }
        // What vanished during the scan, or was under a directory that did, is deleted
        // only if it is still absent now: a file removed and made again while the scan
        // ran (as some programs save) keeps its place until the next scan reads it. So is
        // everything unlisted, for a source whose listing can miss a live item without
        // knowing it (an API whose pages shifted while they were read).
        let mut doomed = None;
        let recheck = self.source.rechecks_unlisted();
        if confirm || recheck || !vanished.is_empty() {
            let names = known.names_of(&unseen).map_err(self.state_err())?;
            match self.still_absent(names, vanished, confirm, recheck).await {
                Ok(names) => doomed = Some(names),
                Err(message) => {
                    let _ = self.entry_error(record, message);
                    return Ok(());
                }
            }
        }
        let would_delete = doomed.as_ref().map_or(unseen.len(), Vec::len) as u64;
        // Asked also with nothing to delete, so that a scan which does not trip it ends
        // the repeat of its warning.
        if self.guard_trips(would_delete, indexed, sink, record) || would_delete == 0 {
            return Ok(());
        }
        let mut doomed = match doomed {
            Some(doomed) => doomed,
            None => known.names_of(&unseen).map_err(self.state_err())?,
        };
        // Deepest first, so a directory's contents are deleted before the directory.
        doomed.sort_by_key(|id| std::cmp::Reverse(id.matches('/').count()));
        let observed_at = Utc::now();
        for chunk in doomed.chunks(APPEND_BATCH) {
            let events: Vec<Event> = chunk
                .iter()
                .map(|id| {
                    let (kind, key) = id.split_once('\0').unwrap_or(("file", id));
                    Event {
                        v: SCHEMA_VERSION,
                        pipeline: self.pipeline.clone(),
                        partition: 0,
                        offset: 0,
                        kind: kind.to_owned(),
                        key: key.to_owned(),
                        op: Op::Delete,
                        checksum: String::new(),
                        mode: None,
                        name: None,
                        refs: vec![],
                        body: None,
                        blob: None,
                        mtime_ns: None,
                        observed_at,
                        scan: record.id.clone(),
                    }
                })
                .collect();
            if let Sink::Dry(dry) = sink {
                dry.extend(events);
                record.deletes += chunk.len() as u64;
                continue;
            }
            if let Err(e) = self.append_events(events).await {
                record.not_appended += chunk.len() as u64;
                return Err(e);
            }
            let changes: Vec<_> = chunk.iter().map(|k| (k.as_str(), None)).collect();
            known.apply(&changes).map_err(self.state_err())?;
            record.deletes += chunk.len() as u64;
            self.publish(record);
        }
        Ok(())
    }

    /// Whether `would_delete` deletes out of `indexed` items are more than `max_delete`
    /// allows: then the guard trips (counted, logged and recorded; a dry run only records
    /// it) and the scan emits none.
    fn guard_trips(
        &self,
        would_delete: u64,
        indexed: usize,
        sink: &Sink,
        record: &mut ScanRecord,
    ) -> bool {
        let allowed = self.max_delete.allowed(indexed as u64);
        if would_delete > allowed {
            let trip = GuardTrip {
                would_delete,
                allowed,
                limit: self.max_delete.to_string(),
            };
            if let Sink::Dry(_) = sink {
                record.guard = Some(trip);
                return true;
            }
            metrics()
                .delete_guard_trips
                .with_label_values(&[&self.pipeline])
                .inc();
            let message = format!(
                "delete guard tripped: this scan would delete {would_delete} of {indexed} items, more than max_delete = {} allows; no deletes were emitted. If the deletes are intended, raise max_delete in the config, then restart the daemon (or, with no daemon running, run `tidemark sync`)",
                trip.limit
            );
            let seen = self.guard_warned.met((would_delete, allowed));
            self.guard_warned.end_round();
            log_recurring!(seen, warn, [pipeline = %self.pipeline, would_delete, allowed, limit = %trip.limit,], message);
            record.guard = Some(trip);
            return true;
        }
        if !matches!(sink, Sink::Dry(_)) {
            self.guard_warned.end_round();
        }
        false
    }

    /// The identities among `doomed` to delete: all of them but those that vanished during
    /// the scan, or were under a directory that did, and are back at their path now; with
    /// `all` (a source that confirms every delete) or `every` (one that checks every
    /// unlisted entry quietly), all of them but those the source still has.
    async fn still_absent(
        &self,
        doomed: Vec<String>,
        vanished: &std::collections::HashSet<String>,
        all: bool,
        every: bool,
    ) -> Result<Vec<String>, String> {
        let entry = |id: &str| {
            let (kind, key) = id.split_once('\0').unwrap_or(("file", id));
            (kind.to_owned(), key.to_owned())
        };
        let (check, sure): (Vec<String>, Vec<String>) = doomed.into_iter().partition(|id| {
            let (_, key) = entry(id);
            all || every
                || std::iter::successors(Some(key.as_str()), |k| {
                    k.rsplit_once('/').map(|(up, _)| up)
                })
                .any(|k| vanished.contains(k))
        });
        if check.is_empty() {
            return Ok(sure);
        }
        let source = (self.lister.lock().unwrap().clone()).unwrap_or_else(|| self.source.clone());
        let absent = source
            .absent(check.iter().map(|id| entry(id)).collect())
            .await?;
        let (gone, back): (Vec<String>, Vec<String>) = check
            .into_iter()
            .partition(|id| absent.contains(&entry(id)));
        if back.is_empty() {
            if all {
                self.kept_in_source.end_round();
            }
            return Ok(sure.into_iter().chain(gone).collect());
        }
        if all {
            let n = back.len();
            let mut kept = back;
            kept.sort();
            let named: Vec<String> = kept
                .iter()
                .take(10)
                .map(|id| {
                    let (kind, key) = entry(id);
                    format!("{kind} {key}")
                })
                .collect();
            let more = if n > named.len() { ", …" } else { "" };
            let seen = self.kept_in_source.met(kept);
            self.kept_in_source.end_round();
            let message = format!(
                "{n} items this scan did not list are still in the source, so they are not deleted: {}{more}. Most likely items before them were deleted while the pages were read, which shifts the rest; the next scan lists them. If it keeps happening, the kind's `path` leaves them out of its listing while they can still be read one by one: when it filters items out on purpose (`?active=true`), set `confirm_deletes = false` on the kind so that items leaving the filter are deleted",
                named.join(", ")
            );
            // Warned of when it begins or the items change; while the same items keep
            // being missed, a daemon's every scan would repeat the same warning.
            log_recurring!(seen, warn, [pipeline = %self.pipeline, items = n,], message);
        } else {
            debug!(
                pipeline = %self.pipeline,
                entries = back.len(),
                "entries this scan did not list are in the source (made again, or renamed back, while their directory was read); their deletes are left to the next scan"
            );
        }
        Ok(sure.into_iter().chain(gone).collect())
    }
}

/// The summary of a scan started at `started_at`, before it has found anything.
fn new_record(started_at: chrono::DateTime<Utc>) -> ScanRecord {
    ScanRecord {
        id: started_at.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
        started_at,
        duration_secs: 0.0,
        listed: 0,
        upserts: 0,
        deletes: 0,
        not_appended: 0,
        errors: 0,
        skipped: 0,
        vanished: 0,
        result: "ok".into(),
        guard: None,
        last_success_at: None,
        message: None,
        error_messages: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DirSourceConfig;
    use crate::log::sled::SledLog;
    use crate::source::fs::DirSource;
    use std::time::Duration;

    /// A scanner of pipeline `p` from the directory `src` into a sled log in `state`, with
    /// no delete guard.
    fn scanner_of(src: std::path::PathBuf, state: &State) -> (Scanner, Arc<SledLog>) {
        scanner_over(Arc::new(dir_source(src)), state)
    }

    fn dir_source(src: std::path::PathBuf) -> DirSource {
        DirSource::new(
            &DirSourceConfig {
                path: src,
                include: vec![],
                exclude: vec![],
                follow_symlinks: false,
            },
            0,
        )
    }

    fn scanner_over(source: Arc<dyn Source>, state: &State) -> (Scanner, Arc<SledLog>) {
        let log = Arc::new(SledLog::open(state.db(), "p").unwrap());
        let scanner = Scanner::new(
            "p",
            source,
            log.clone(),
            state.clone(),
            DeleteLimit::Percent(100.0),
        );
        (scanner, log)
    }

    /// A directory source that another program changes while it is scanned: `on_read` runs
    /// just before the scan reads `key`, `before_deletes` when the scan asks which of the
    /// entries that vanished are still absent (at the scan's end).
    struct Meddled {
        dir: DirSource,
        key: &'static str,
        on_read: Box<dyn Fn() + Send + Sync>,
        before_deletes: Box<dyn Fn() + Send + Sync>,
    }

    #[async_trait::async_trait]
    impl Source for Meddled {
        fn list(&self) -> ListStream {
            self.dir.list()
        }

        async fn fetch(&self, entry: Entry) -> Result<Item, FetchError> {
            if entry.key == self.key {
                (self.on_read)();
            }
            self.dir.fetch(entry).await
        }

        async fn absent(
            &self,
            entries: Vec<(String, String)>,
        ) -> Result<std::collections::HashSet<(String, String)>, String> {
            (self.before_deletes)();
            self.dir.absent(entries).await
        }
    }

    /// Keys of the deletes in `log`.
    async fn deleted(log: &SledLog) -> Vec<String> {
        let mut keys: Vec<String> = log
            .read(0, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|r| r.event.ok())
            .filter(|e| e.op == Op::Delete)
            .map(|e| e.key)
            .collect();
        keys.sort();
        keys
    }

    /// A file removed between the listing and its read (a temporary file, a file some
    /// program deletes) is absent, not an error: the scan still emits the deletes of what
    /// the source removed, and the vanished file's own delete. With constant churn of
    /// temporary files, counting them as errors withheld every scan's deletes.
    #[tokio::test]
    async fn a_file_that_vanishes_mid_scan_is_absent_and_does_not_withhold_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for name in ["a.txt", "b.txt", "old.txt"] {
            std::fs::write(src.join(name), name).unwrap();
        }
        let state = State::open(&dir.path().join("state")).unwrap();
        let a = src.join("a.txt");
        let source = Meddled {
            dir: dir_source(src.clone()),
            key: "a.txt",
            on_read: Box::new(move || std::fs::remove_file(&a).unwrap()),
            before_deletes: Box::new(|| {}),
        };
        let (scanner, _) = scanner_of(src.clone(), &state);
        scanner.scan(&Progress::hidden()).await.unwrap();
        // The source removes old.txt, and a.txt changes: the next scan reads it, and it
        // is gone by then.
        std::fs::remove_file(src.join("old.txt")).unwrap();
        std::fs::write(src.join("a.txt"), "changed, then removed").unwrap();
        drop(scanner);
        let (scanner, log) = scanner_over(Arc::new(source), &state);
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!(
            (record.errors, record.vanished, record.result.as_str()),
            (0, 1, "ok"),
            "{:?}",
            record.error_messages
        );
        assert_eq!(deleted(&log).await, ["a.txt", "old.txt"]);
    }

    /// A source directory moved away mid-scan (and an empty one made in its place) makes
    /// what the scan had yet to read vanish; none of it is deleted, and the scan says why.
    #[tokio::test]
    async fn a_source_moved_away_mid_scan_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for name in ["a.txt", "sub/b.txt", "sub/c.txt"] {
            let path = src.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, name).unwrap();
        }
        let state = State::open(&dir.path().join("state")).unwrap();
        let (scanner, _) = scanner_of(src.clone(), &state);
        scanner.scan(&Progress::hidden()).await.unwrap();
        drop(scanner);
        std::fs::write(src.join("a.txt"), "changed").unwrap();
        let (from, to) = (src.clone(), dir.path().join("moved"));
        let source = Meddled {
            dir: dir_source(src.clone()),
            key: "a.txt",
            on_read: Box::new(move || {
                std::fs::rename(&from, &to).unwrap();
                std::fs::create_dir(&from).unwrap();
            }),
            before_deletes: Box::new(|| {}),
        };
        let (scanner, log) = scanner_over(Arc::new(source), &state);
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.deletes, record.result.as_str()), (0, "degraded"));
        assert!(
            record
                .error_messages
                .iter()
                .any(|m| m.contains("was moved, removed or unmounted during the scan")),
            "{:?}",
            record.error_messages
        );
        assert!(deleted(&log).await.is_empty());
    }

    /// An entry that vanished during the scan but is back at its path by the scan's end
    /// (removed and written again, as some programs save) is not deleted; the next scan
    /// reads it.
    #[tokio::test]
    async fn a_file_removed_and_made_again_during_the_scan_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "a").unwrap();
        std::fs::write(src.join("old.txt"), "old").unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        let (scanner, _) = scanner_of(src.clone(), &state);
        scanner.scan(&Progress::hidden()).await.unwrap();
        drop(scanner);
        std::fs::remove_file(src.join("old.txt")).unwrap();
        std::fs::write(src.join("a.txt"), "changed").unwrap();
        let (a, again) = (src.join("a.txt"), src.join("a.txt"));
        let source = Meddled {
            dir: dir_source(src.clone()),
            key: "a.txt",
            on_read: Box::new(move || std::fs::remove_file(&a).unwrap()),
            before_deletes: Box::new(move || {
                if !again.exists() {
                    std::fs::write(&again, "saved again").unwrap();
                }
            }),
        };
        let (scanner, log) = scanner_over(Arc::new(source), &state);
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.vanished, record.deletes), (1, 1));
        assert_eq!(deleted(&log).await, ["old.txt"]);
        drop(scanner);
        let (scanner, _) = scanner_of(src, &state);
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.upserts, record.deletes), (1, 0));
    }

    /// An upsert of `key` with `content`'s checksum, as a scan of the directory source
    /// appends it.
    fn upsert(key: &str, content: &str) -> Event {
        Event {
            v: SCHEMA_VERSION,
            pipeline: "p".into(),
            partition: 0,
            offset: 0,
            kind: "file".into(),
            key: key.into(),
            op: Op::Upsert,
            checksum: tidemark_proto::checksum_bytes(content.as_bytes()),
            mode: Some(0o644),
            name: None,
            refs: vec![],
            body: None,
            blob: None,
            mtime_ns: Some(1),
            observed_at: Utc::now(),
            scan: "killed".into(),
        }
    }

    /// Review issue (lost deletes after a SIGKILL): a scan appended a batch, durably, and
    /// was killed before its index changes reached the disk. The source then deleted the
    /// item: the next scan must still emit its delete, from the event the log holds.
    #[tokio::test]
    async fn an_item_whose_event_the_index_missed_is_deleted_once_the_source_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("kept.txt"), "kept").unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        let (scanner, log) = scanner_of(src.clone(), &state);
        scanner.scan(&Progress::hidden()).await.unwrap();
        // The killed scan's batch: in the log, not in the index. The source has removed
        // the item since.
        log.append(vec![upsert("gone.txt", "gone")]).await.unwrap();
        let preview = scanner.preview(&Progress::hidden()).await.unwrap();
        assert_eq!(preview.record.deletes, 1, "a dry run finds the delete too");
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.upserts, record.deletes), (0, 1));
        assert_eq!(deleted(&log).await, ["gone.txt"]);
        // Caught up: the next scan has nothing to replay or emit.
        let head = log.head(0).await.unwrap();
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.upserts, record.deletes), (0, 0));
        assert_eq!(log.head(0).await.unwrap(), head);
    }

    /// The quick check never trusts a replayed entry: the log's last event of `a.txt` has
    /// another version than the file the index last saw (the killed scan read it changed,
    /// and it was put back since, with its old size, time and inode), so the file is read
    /// again and its upsert emitted.
    #[tokio::test]
    async fn a_replayed_upsert_makes_the_next_scan_read_the_item_again() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "one").unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        let (scanner, log) = scanner_of(src.clone(), &state);
        scanner.scan(&Progress::hidden()).await.unwrap();
        log.append(vec![upsert("a.txt", "two")]).await.unwrap();
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.upserts, record.deletes), (1, 0));
        let last = log.read(0, 0, 100).await.unwrap().pop().unwrap();
        let event = last.event.unwrap();
        assert_eq!(event.checksum, tidemark_proto::checksum_bytes(b"one"));
        // Read once, indexed with its fingerprint again: no more reads.
        let record = scanner.scan(&Progress::hidden()).await.unwrap();
        assert_eq!((record.upserts, record.deletes), (0, 0));
    }

    /// Once the listing is done and every read is back, the scan appends what it found and
    /// ends; it does not wait for the next tick of its append interval (an hour here).
    #[tokio::test]
    async fn a_scan_that_has_read_everything_ends_without_waiting_for_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for i in 0..50 {
            std::fs::write(src.join(format!("f{i}")), i.to_string()).unwrap();
        }
        let state = State::open(&dir.path().join("state")).unwrap();
        let (mut scanner, log) = scanner_of(src, &state);
        // The first tick comes at once and takes the first change found; the other 49
        // would wait an hour for the second.
        scanner.append_interval = Duration::from_secs(3600);
        let record =
            tokio::time::timeout(Duration::from_secs(20), scanner.scan(&Progress::hidden()))
                .await
                .expect("the scan waited for its next append tick after reading everything")
                .unwrap();
        assert_eq!(record.upserts, 50);
        assert_eq!(log.head(0).await.unwrap(), 50);
    }

    /// A dry run (`sync --dry-run`) reads an older state directory's per-key index where it
    /// is: moving it into a snapshot would be a write (issue: the preview moved it).
    #[tokio::test]
    async fn a_preview_leaves_an_older_per_key_index_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("new.txt"), "new").unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        let entry = crate::state::IndexEntry {
            version: "blake3:old".into(),
            fingerprint: None,
        };
        state
            .legacy_index_for_tests("p")
            .apply([("file\0gone.txt", Some(&entry))])
            .unwrap();
        let (scanner, log) = scanner_of(src, &state);
        let preview = scanner.preview(&Progress::hidden()).await.unwrap();
        assert_eq!((preview.record.upserts, preview.record.deletes), (1, 1));
        assert!(
            state.legacy_index("p").unwrap().is_some(),
            "moved by a dry run"
        );
        assert!(state
            .index_snapshot("p")
            .unwrap()
            .header()
            .unwrap()
            .is_none());
        assert_eq!(log.head(0).await.unwrap(), 0);
    }
}
