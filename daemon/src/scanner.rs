//! Listing → events: diffs a streaming listing against the source index, appends an
//! `upsert` for every new or changed item and, after a listing without any error, a
//! `delete` for every indexed key no longer listed — unless the delete guard trips. The
//! index is updated only after the log has made the events durable.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use tidemark_proto::{content_version, item_identity, Event, Op, SCHEMA_VERSION};
use tracing::{debug, info, warn};

use crate::config::DeleteLimit;
use crate::log::{AppendError, EventLog};
use crate::metrics::metrics;
use crate::progress::Progress;
use crate::source::{Entry, FetchError, Item, ListError, Listing, Source};
use crate::state::{GuardTrip, IndexEntry, Records, ScanRecord, State, StateError};

/// Events appended per durable batch.
const APPEND_BATCH: usize = 1000;
/// Inline bytes buffered before a batch is appended regardless of its length.
const APPEND_BYTES: u64 = 16 * 1024 * 1024;
/// Longest a found change waits for its batch to fill: a projector following the log
/// (`sync`, the daemon) applies changes while the rest of the tree is still listed, so
/// a scan that finds a few changes among many unchanged files does not hold them all
/// until the listing ends.
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
    /// The index could not be read or written.
    #[error("pipeline `{pipeline}`: {source}")]
    State {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: StateError,
    },
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
}

/// An entry being read: its previous index entry, its fingerprint, and the read.
type Fetch = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (Option<IndexEntry>, Option<String>, Result<Item, FetchError>),
            > + Send,
    >,
>;

#[derive(Default)]
struct Pending {
    events: Vec<Event>,
    index: Vec<(String, IndexEntry)>,
    bytes: u64,
}

/// 128 bits of blake3: a key's (or fingerprint's) stand-in in memory.
fn seen_hash(identity: &str) -> u128 {
    hash128(identity.as_bytes())
}

fn hash128(bytes: &[u8]) -> u128 {
    let h = blake3::hash(bytes);
    u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
}

/// The one field of an index record the digest needs, read without copying.
#[derive(serde::Deserialize)]
struct FingerprintOnly<'a> {
    #[serde(borrow, default)]
    fingerprint: Option<std::borrow::Cow<'a, str>>,
}

/// What a scan keeps of the index in memory, read in one pass when it starts: per indexed
/// key, a hash of its fingerprint and whether the listing has shown it yet (32 bytes of
/// payload per key, never the keys or the listing themselves). Unchanged entries are
/// recognised without a lookup in sled each, and keys still unseen at the end are the
/// deletes, without a second pass over the index.
struct Known {
    entries: HashMap<u128, KnownEntry>,
}

struct KnownEntry {
    /// Hash of the indexed fingerprint; `None` when the index has none.
    fingerprint: Option<u128>,
    seen: bool,
}

impl Known {
    fn load(index: &Records<IndexEntry>) -> Result<Known, StateError> {
        let mut entries = HashMap::new();
        index.for_each_raw(|identity, value| {
            let entry: FingerprintOnly =
                serde_json::from_slice(value).map_err(|source| StateError::Corrupt {
                    key: String::from_utf8_lossy(identity).into_owned(),
                    source,
                })?;
            entries.insert(
                hash128(identity),
                KnownEntry {
                    fingerprint: entry.fingerprint.as_deref().map(seen_hash),
                    seen: false,
                },
            );
            Ok(())
        })?;
        Ok(Known { entries })
    }

    /// Marks `identity` seen; returns whether it was indexed and whether its fingerprint
    /// equals `fingerprint` (so it need not be read).
    fn see(&mut self, identity: &str, fingerprint: Option<&str>) -> (bool, bool) {
        match self.entries.get_mut(&seen_hash(identity)) {
            None => (false, false),
            Some(known) => {
                known.seen = true;
                let same = match (fingerprint, known.fingerprint) {
                    (Some(fp), Some(indexed)) => seen_hash(fp) == indexed,
                    _ => false,
                };
                (true, same)
            }
        }
    }

    /// Hashes of the indexed keys the listing did not show.
    fn unseen(&self) -> HashSet<u128> {
        self.entries
            .iter()
            .filter(|(_, k)| !k.seen)
            .map(|(h, _)| *h)
            .collect()
    }
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
        let started_at = Utc::now();
        let t0 = Instant::now();
        let mut record = ScanRecord {
            id: started_at.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
            started_at,
            duration_secs: 0.0,
            listed: 0,
            upserts: 0,
            deletes: 0,
            errors: 0,
            skipped: 0,
            result: "ok".into(),
            guard: None,
            last_success_at: None,
            message: None,
        };
        let outcome = self.scan_into(&mut record, progress).await;
        record.duration_secs = t0.elapsed().as_secs_f64();
        let m = metrics();
        let p = self.pipeline.as_str();
        m.scan_duration
            .with_label_values(&[p])
            .observe(record.duration_secs);
        if let Err(e) = &outcome {
            record.result = "failed".into();
            record.message = Some(e.to_string());
        } else if record.errors > 0 {
            record.result = "degraded".into();
        } else {
            record.last_success_at = Some(Utc::now());
        }
        if record.last_success_at.is_none() {
            let previous = self
                .state
                .scans()
                .and_then(|s| s.get(p))
                .map_err(self.state_err())?;
            record.last_success_at = previous.and_then(|r| r.last_success_at);
        }
        if let Some(at) = record.last_success_at {
            m.last_scan_success
                .with_label_values(&[p])
                .set(at.timestamp_millis() as f64 / 1000.0);
        }
        m.scans.with_label_values(&[p, &record.result]).inc();
        m.delete_guard_active
            .with_label_values(&[p])
            .set(i64::from(record.guard.is_some()));
        self.state
            .scans()
            .and_then(|s| s.put(p, &record))
            .map_err(self.state_err())?;
        outcome?;
        info!(
            pipeline = p,
            scan = %record.id,
            listed = record.listed,
            upserts = record.upserts,
            deletes = record.deletes,
            errors = record.errors,
            skipped = record.skipped,
            result = %record.result,
            seconds = record.duration_secs,
            "scan finished"
        );
        Ok(record)
    }

    async fn scan_into(
        &self,
        record: &mut ScanRecord,
        progress: &Progress,
    ) -> Result<(), ScanError> {
        let index = self.state.index(&self.pipeline).map_err(self.state_err())?;
        let loading = Instant::now();
        let mut known = Known::load(&index).map_err(self.state_err())?;
        debug!(
            pipeline = %self.pipeline,
            keys = known.entries.len(),
            seconds = loading.elapsed().as_secs_f64(),
            "index digest loaded"
        );
        let mut listing = self.source.list();
        let mut listing_done = false;
        let mut fetching: FuturesUnordered<Fetch> = FuturesUnordered::new();
        let mut pending = Pending::default();
        let mut flush = tokio::time::interval(APPEND_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = flush.tick(), if !pending.events.is_empty() => {
                    self.append(&mut pending).await?;
                }
                Some((previous, fingerprint, fetched)) = fetching.next(), if !fetching.is_empty() => {
                    match fetched {
                        Ok(item) => {
                            progress.add_bytes(tidemark_proto::content_len(item.body.as_ref(), item.blob.as_ref()));
                            self.stage(item, previous, fingerprint, &mut pending, record);
                            if pending.events.len() >= APPEND_BATCH || pending.bytes >= APPEND_BYTES {
                                self.append(&mut pending).await?;
                            }
                        }
                        Err(e) => self.entry_error(record, e.to_string()),
                    }
                }
                next = listing.next(), if !listing_done && fetching.len() < self.fetch_concurrency => {
                    match next {
                        None => listing_done = true,
                        Some(Err(e)) if e.is_fatal() => {
                            return Err(ScanError::List { pipeline: self.pipeline.clone(), source: e });
                        }
                        Some(Err(e)) => self.entry_error(record, e.to_string()),
                        Some(Ok(Listing::Skipped { key, reason })) => {
                            record.skipped += 1;
                            warn!(pipeline = %self.pipeline, key = %key, "{reason}");
                        }
                        Some(Ok(Listing::Entry(entry))) => {
                            record.listed += 1;
                            progress.inc(1);
                            if let Some(fetch) = self.diff(entry, &mut known, &index)? {
                                fetching.push(fetch);
                            }
                        }
                    }
                }
                else => break,
            }
        }
        self.append(&mut pending).await?;
        if record.errors > 0 {
            warn!(
                pipeline = %self.pipeline,
                errors = record.errors,
                "the listing had errors, so this scan emits no deletes"
            );
            return Ok(());
        }
        let unseen = known.unseen();
        drop(known);
        self.deletes(record, &unseen).await
    }

    /// Diffs one listed entry against the digest: `None` when it is unchanged, otherwise
    /// the read of its content (with its previous index entry).
    fn diff(
        &self,
        entry: Entry,
        known: &mut Known,
        index: &Records<IndexEntry>,
    ) -> Result<Option<Fetch>, ScanError> {
        let identity = item_identity(&entry.kind, &entry.key);
        let (indexed, unchanged) = known.see(&identity, entry.fingerprint.as_deref());
        if unchanged {
            return Ok(None);
        }
        let previous = if indexed {
            index.get(&identity).map_err(self.state_err())?
        } else {
            None
        };
        let source = self.source.clone();
        let fingerprint = entry.fingerprint.clone();
        Ok(Some(Box::pin(async move {
            (previous, fingerprint, source.fetch(entry).await)
        })))
    }

    fn entry_error(&self, record: &mut ScanRecord, message: String) {
        record.errors += 1;
        metrics()
            .scan_errors
            .with_label_values(&[&self.pipeline])
            .inc();
        warn!(pipeline = %self.pipeline, "{message}");
        record.message.get_or_insert(message);
    }

    fn stage(
        &self,
        item: Item,
        previous: Option<IndexEntry>,
        fingerprint: Option<String>,
        pending: &mut Pending,
        record: &mut ScanRecord,
    ) {
        let identity = item_identity(&item.kind, &item.key);
        let entry = IndexEntry {
            version: content_version(&item.checksum, item.mode),
            fingerprint,
        };
        let changed = previous.is_none_or(|p| p.version != entry.version);
        pending.index.push((identity, entry));
        if !changed {
            return;
        }
        record.upserts += 1;
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
            observed_at: Utc::now(),
            scan: record.id.clone(),
        });
    }

    /// Appends the pending events, then (only then) records them in the index.
    async fn append(&self, pending: &mut Pending) -> Result<(), ScanError> {
        self.append_events(std::mem::take(&mut pending.events))
            .await?;
        let index = self.state.index(&self.pipeline).map_err(self.state_err())?;
        index
            .apply(pending.index.iter().map(|(k, v)| (k.as_str(), Some(v))))
            .map_err(self.state_err())?;
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

    /// Emits deletes for the indexed keys the listing did not contain (`unseen`, by
    /// hash), within the guard.
    async fn deletes(
        &self,
        record: &mut ScanRecord,
        unseen: &HashSet<u128>,
    ) -> Result<(), ScanError> {
        let would_delete = unseen.len() as u64;
        if would_delete == 0 {
            return Ok(());
        }
        let index = self.state.index(&self.pipeline).map_err(self.state_err())?;
        let gone = |k: &Result<String, StateError>| {
            k.as_ref().map_or(true, |k| unseen.contains(&seen_hash(k)))
        };
        let allowed = self.max_delete.allowed(index.len() as u64);
        if would_delete > allowed {
            let trip = GuardTrip {
                would_delete,
                allowed,
                limit: self.max_delete.to_string(),
            };
            metrics()
                .delete_guard_trips
                .with_label_values(&[&self.pipeline])
                .inc();
            warn!(
                pipeline = %self.pipeline,
                would_delete,
                allowed,
                limit = %trip.limit,
                "delete guard tripped: this scan would delete {would_delete} of {} items, more than max_delete = {} allows; no deletes were emitted. If the deletes are intended, raise max_delete and scan again",
                index.len(),
                trip.limit
            );
            record.guard = Some(trip);
            return Ok(());
        }
        let mut doomed: Vec<String> = index
            .keys()
            .filter(gone)
            .collect::<Result<_, _>>()
            .map_err(self.state_err())?;
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
                        observed_at,
                        scan: record.id.clone(),
                    }
                })
                .collect();
            self.append_events(events).await?;
            index
                .apply(chunk.iter().map(|k| (k.as_str(), None)))
                .map_err(self.state_err())?;
            record.deletes += chunk.len() as u64;
        }
        Ok(())
    }
}
