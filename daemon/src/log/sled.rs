//! The embedded event log: one sled tree of events per pipeline, plus a tree of committed
//! offsets. One partition.
//!
//! # On-disk format
//!
//! Tree `log/<pipeline>` holds *chunks*. An appended batch is cut, in order, into chunks of
//! consecutive events; each chunk is one sled value keyed by the offset of its first event
//! (8 bytes, big-endian, so key order is offset order). A chunk value is:
//!
//! ```text
//! format: u8 = 1 | count: u32 LE | count × (len: u32 LE | len bytes of Event::encode JSON)
//! ```
//!
//! The `i`-th event of the chunk keyed `k` has offset `k + i`; the JSON's `partition` and
//! `offset` fields are written as 0 (the events are encoded before the append lock assigns
//! offsets) and set from the key when read. Chunks are contiguous: the next chunk's key is
//! `k + count`, and the head is the last key plus its count. To read from `from`, the
//! reader starts at the last key ≤ `from` (a reverse range lookup) and skips the events
//! before `from`.
//!
//! A chunk holds at most [`CHUNK_BYTES`] of framed events (an event larger than that gets
//! a chunk of its own). Chunks stay that small on purpose: sled 0.34 writes any page larger
//! than a quarter of its 512 KiB segment to a separate blob file that its `flush` never
//! fsyncs, and a leaf page holds up to 16 values, so a leaf of chunks stays inside the
//! fsynced log. A chunk whose header or framing is damaged is reported as undecodable
//! records (one per offset the header claims, or one if the header itself is unreadable);
//! reading goes on with the next chunk.
//!
//! A frame of length 0 is an event dropped by [`drop_superseded`] (`tidemark compact`): its
//! offset stays taken, and readers skip it.
//!
//! Tree `offsets/<pipeline>`: key `<consumer>\0<partition>`, value the committed offset
//! (the next offset to read), u64 big-endian.

use std::time::Duration;

use async_trait::async_trait;
use tidemark_proto::{DecodeError, Event};
use tokio::sync::{watch, Mutex};

use super::{AppendError, CommitError, EventLog, ReadError, ReadOffsetError, Record};

const BACKEND: &str = "sled";

/// Format byte of a chunk value.
const CHUNK_FORMAT: u8 = 1;

/// Bytes of a chunk header: format byte and event count.
const CHUNK_HEADER: usize = 5;

/// Most framed event bytes a chunk holds, unless one event alone is larger. 16 leaf entries
/// of this size stay under sled's blob threshold (128 KiB less headers); see the module
/// docs.
pub const CHUNK_BYTES: usize = 6 * 1024;

/// The sled-backed [`EventLog`].
pub struct SledLog {
    db: sled::Db,
    events: sled::Tree,
    offsets: sled::Tree,
    /// Serialises appenders so offsets are assigned in the order batches become durable.
    append_lock: Mutex<()>,
    /// Head offset, published after each durable append so tailing readers wake up; reads
    /// stop below it, so chunks of a failed append are never returned.
    head: watch::Sender<u64>,
}

fn read_err(e: sled::Error) -> ReadError {
    ReadError::Backend {
        backend: BACKEND,
        source: Box::new(crate::state::LogDbError::new(e)),
    }
}

fn offset_key(consumer: &str, partition: u32) -> Vec<u8> {
    format!("{consumer}\0{partition}").into_bytes()
}

impl SledLog {
    /// Opens (or creates) the log of `pipeline` in the state database.
    pub fn open(db: &sled::Db, pipeline: &str) -> Result<SledLog, ReadError> {
        let events = db.open_tree(format!("log/{pipeline}")).map_err(read_err)?;
        let offsets = db
            .open_tree(format!("offsets/{pipeline}"))
            .map_err(read_err)?;
        let head = match events.last().map_err(read_err)? {
            Some((k, v)) => decode_offset(&k) + Chunk::parse(&v).count,
            None => 0,
        };
        Ok(SledLog {
            db: db.clone(),
            events,
            offsets,
            append_lock: Mutex::new(()),
            head: watch::channel(head).0,
        })
    }

    /// Writes a committed offset and makes it durable before returning.
    async fn set_offset(
        &self,
        consumer: &str,
        partition: u32,
        next: u64,
        forward_only: bool,
    ) -> Result<(), CommitError> {
        let key = offset_key(consumer, partition);
        let err = |e: sled::Error| CommitError::Backend {
            backend: BACKEND,
            consumer: consumer.to_owned(),
            source: Box::new(crate::state::LogDbError::new(e)),
        };
        self.offsets
            .fetch_and_update(&key, |old| {
                let old = old.map(decode_offset);
                match old {
                    Some(o) if forward_only && o >= next => Some(o.to_be_bytes().to_vec()),
                    _ => Some(next.to_be_bytes().to_vec()),
                }
            })
            .map_err(err)?;
        self.db.flush_async().await.map_err(err)?;
        Ok(())
    }
}

fn decode_offset(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

/// Encodes events into chunk values, each with the index of its first event in `events`.
/// Offsets are not part of the values, so this runs before the append lock.
fn encode_chunks(events: &mut [Event]) -> Vec<(u64, Vec<u8>)> {
    let mut chunks = Vec::new();
    let mut value = Vec::new();
    let mut json = Vec::new();
    let (mut start, mut count) = (0u64, 0u32);
    for (i, event) in events.iter_mut().enumerate() {
        event.partition = 0;
        event.offset = 0;
        json.clear();
        serde_json::to_writer(&mut json, event).expect("an Event always serializes");
        let frame = 4 + json.len();
        if count > 0 && value.len() - CHUNK_HEADER + frame > CHUNK_BYTES {
            close_chunk(&mut value, count);
            chunks.push((start, std::mem::take(&mut value)));
            (start, count) = (i as u64, 0);
        }
        if count == 0 {
            value.reserve(CHUNK_HEADER + frame.max(CHUNK_BYTES));
            value.extend_from_slice(&[CHUNK_FORMAT, 0, 0, 0, 0]);
        }
        let len = u32::try_from(json.len()).expect("an event is under 4 GiB");
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(&json);
        count += 1;
    }
    if count > 0 {
        close_chunk(&mut value, count);
        chunks.push((start, value));
    }
    chunks
}

/// Writes the event count into a chunk's header.
fn close_chunk(value: &mut [u8], count: u32) {
    value[1..CHUNK_HEADER].copy_from_slice(&count.to_le_bytes());
}

/// A chunk value as read back.
struct Chunk<'a> {
    /// Offsets the chunk covers from its key on.
    count: u64,
    /// The framed events, or why the header is unreadable.
    frames: Result<&'a [u8], &'static str>,
}

impl<'a> Chunk<'a> {
    fn parse(value: &'a [u8]) -> Chunk<'a> {
        match value {
            [CHUNK_FORMAT, c0, c1, c2, c3, frames @ ..] => Chunk {
                count: u64::from(u32::from_le_bytes([*c0, *c1, *c2, *c3])),
                frames: Ok(frames),
            },
            _ => Chunk {
                count: 1,
                frames: Err("unknown chunk format (a log written by another tidemark version?)"),
            },
        }
    }

    /// The record at each offset from `first` on: its encoded event, or why it has none.
    fn records(&self) -> impl Iterator<Item = Result<&'a [u8], &'static str>> + '_ {
        let mut rest = self.frames;
        (0..self.count).map(move |_| {
            let frames = rest?;
            let Some((len, tail)) = frames.split_first_chunk::<4>() else {
                rest = Err("chunk is shorter than its event count says");
                return Err("chunk is shorter than its event count says");
            };
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                rest = Err("chunk is shorter than its event count says");
                return Err("event frame runs past the end of its chunk");
            }
            let (frame, tail) = tail.split_at(len);
            rest = Ok(tail);
            Ok(frame)
        })
    }
}

/// A record that could not be read out of its chunk, as a decode error of that offset.
fn damaged(reason: &str) -> DecodeError {
    DecodeError::Malformed(<serde_json::Error as serde::de::Error>::custom(format!(
        "damaged sled log record: {reason}"
    )))
}

#[async_trait]
impl EventLog for SledLog {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn partitions(&self) -> u32 {
        1
    }

    async fn append(&self, mut events: Vec<Event>) -> Result<(), AppendError> {
        if events.is_empty() {
            return Ok(());
        }
        let chunks = encode_chunks(&mut events);
        let err = |e: sled::Error| AppendError::Backend {
            backend: BACKEND,
            source: Box::new(crate::state::LogDbError::new(e)),
        };
        let _guard = self.append_lock.lock().await;
        let first = *self.head.borrow();
        let mut batch = sled::Batch::default();
        // Chunks a failed append left above the head would be read as part of this batch.
        for stale in self.events.range(first.to_be_bytes()..).keys() {
            batch.remove(stale.map_err(err)?);
        }
        for (start, value) in chunks {
            batch.insert(&(first + start).to_be_bytes(), value);
        }
        self.events.apply_batch(batch).map_err(err)?;
        self.db.flush_async().await.map_err(err)?;
        self.head.send_replace(first + events.len() as u64);
        Ok(())
    }

    async fn read(&self, _partition: u32, from: u64, max: usize) -> Result<Vec<Record>, ReadError> {
        let head = *self.head.borrow();
        let mut out = Vec::new();
        if from >= head || max == 0 {
            return Ok(out);
        }
        let start = match self.events.range(..=from.to_be_bytes()).next_back() {
            Some(item) => item.map_err(read_err)?.0,
            None => sled::IVec::from(&from.to_be_bytes()),
        };
        for item in self.events.range(start..) {
            let (k, v) = item.map_err(read_err)?;
            let first = decode_offset(&k);
            let chunk = Chunk::parse(&v);
            let skip = from.saturating_sub(first);
            for (offset, bytes) in (first..).zip(chunk.records()).skip(skip as usize) {
                if offset >= head || out.len() == max {
                    return Ok(out);
                }
                let event = match bytes {
                    // Dropped by a compaction: a later event of the same item follows.
                    Ok([]) => continue,
                    Ok(bytes) => Event::decode(bytes).map(|mut e| {
                        e.partition = 0;
                        e.offset = offset;
                        e
                    }),
                    Err(reason) => Err(damaged(reason)),
                };
                out.push(Record {
                    partition: 0,
                    offset,
                    event,
                });
            }
        }
        Ok(out)
    }

    async fn head(&self, _partition: u32) -> Result<u64, ReadError> {
        Ok(*self.head.borrow())
    }

    async fn wait_beyond(
        &self,
        _partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, ReadError> {
        let mut rx = self.head.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|head| *head > offset)).await;
        let head = *rx.borrow();
        Ok(head)
    }

    async fn committed(&self, consumer: &str, partition: u32) -> Result<u64, ReadOffsetError> {
        let value = self
            .offsets
            .get(offset_key(consumer, partition))
            .map_err(|e| ReadOffsetError::Backend {
                backend: BACKEND,
                consumer: consumer.to_owned(),
                source: Box::new(crate::state::LogDbError::new(e)),
            })?;
        Ok(value.map_or(0, |v| decode_offset(&v)))
    }

    async fn commit(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError> {
        self.set_offset(consumer, partition, next, true).await
    }

    async fn seek(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError> {
        self.set_offset(consumer, partition, next, false).await
    }
}

/// What [`drop_superseded`] did to one pipeline's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogCompacted {
    /// Events dropped: every consumer had passed them, and a later event of the same item
    /// supersedes each.
    pub dropped: u64,
    /// Events kept.
    pub kept: u64,
}

/// Old chunks rewritten per atomic batch.
const COMPACT_GROUP: usize = 1000;

/// Drops the events of `pipeline`'s log that every consumer has passed (below the least
/// committed offset) and that a later event of the same item supersedes, as Kafka's
/// `cleanup.policy=compact` does: the latest event of every item stays, deletes included,
/// so `replay --from 0` still rebuilds the target, and the log stays proportional to the
/// source instead of to its history. Offsets do not move: a dropped event's frame is left
/// empty (4 bytes), and chunks of dropped events are merged. Each group of chunks is
/// replaced in one atomic batch by chunks that cover the same offsets, so a reader at any
/// moment sees the old or the new. Appends only write above the head, so this may run
/// while the log is in use.
pub fn drop_superseded(db: &sled::Db, pipeline: &str) -> Result<LogCompacted, sled::Error> {
    let done = compact_log(db, pipeline, None)?;
    db.flush()?;
    Ok(done)
}

/// [`drop_superseded`] into `to`, an empty tree of another database: every chunk of
/// `pipeline`'s log is copied there, those with superseded events replaced as
/// [`drop_superseded`] replaces them, and `db` is left as it is (sled appends what it
/// rewrites, so dropping in place before a copy made the old database grow).
pub fn copy_without_superseded(
    db: &sled::Db,
    pipeline: &str,
    to: &sled::Tree,
) -> Result<LogCompacted, sled::Error> {
    compact_log(db, pipeline, Some(to))
}

/// [`drop_superseded`] in place (`to` is `None`), or into `to`.
fn compact_log(
    db: &sled::Db,
    pipeline: &str,
    to: Option<&sled::Tree>,
) -> Result<LogCompacted, sled::Error> {
    #[derive(serde::Deserialize)]
    struct Item {
        kind: String,
        key: String,
    }
    let identity = |frame: &[u8]| {
        serde_json::from_slice::<Item>(frame)
            .ok()
            .map(|i| tidemark_proto::item_identity(&i.kind, &i.key))
    };
    let events = db.open_tree(format!("log/{pipeline}"))?;
    let offsets = db.open_tree(format!("offsets/{pipeline}"))?;
    let mut below = None::<u64>;
    for v in offsets.iter().values() {
        let o = decode_offset(&v?);
        below = Some(below.map_or(o, |b| b.min(o)));
    }
    let copy_from = |from: std::ops::RangeFrom<[u8; 8]>| -> Result<(), sled::Error> {
        if let Some(to) = to {
            for item in events.range(from) {
                let (k, v) = item?;
                to.insert(k, v)?;
            }
        }
        Ok(())
    };
    let Some(below) = below else {
        copy_from(0u64.to_be_bytes()..)?;
        return Ok(LogCompacted::default());
    };
    // The offset of every item's latest event.
    let mut latest: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut live = 0u64;
    for item in events.iter() {
        let (k, v) = item?;
        let first = decode_offset(&k);
        for (offset, frame) in (first..).zip(Chunk::parse(&v).records()) {
            if let Some(id) = frame.ok().filter(|f| !f.is_empty()).and_then(identity) {
                latest.insert(id, offset);
                live += 1;
            }
        }
    }

    /// A group of old chunks and the chunks replacing them, covering the same offsets.
    #[derive(Default)]
    struct Group {
        old: Vec<(sled::IVec, sled::IVec)>,
        new: Vec<(u64, Vec<u8>)>,
        /// The chunk being built: first offset, event count, value.
        building: Option<(u64, u32, Vec<u8>)>,
        dropped: u64,
    }
    impl Group {
        fn close(&mut self) {
            if let Some((first, count, mut value)) = self.building.take() {
                close_chunk(&mut value, count);
                self.new.push((first, value));
            }
        }
        fn push(&mut self, offset: u64, frame: &[u8]) {
            let full = self
                .building
                .as_ref()
                .is_some_and(|(_, _, v)| v.len() - CHUNK_HEADER + 4 + frame.len() > CHUNK_BYTES);
            if full {
                self.close();
            }
            let (_, count, value) = self
                .building
                .get_or_insert_with(|| (offset, 0, vec![CHUNK_FORMAT, 0, 0, 0, 0]));
            let len = u32::try_from(frame.len()).expect("an event is under 4 GiB");
            value.extend_from_slice(&len.to_le_bytes());
            value.extend_from_slice(frame);
            *count += 1;
        }
        /// Replaces the old chunks by the new ones, when events were dropped from them. A
        /// group that only merges chunks is left as it is: sled appends what is rewritten,
        /// so merging a log with nothing to drop made the database bigger (a state of 20k
        /// files synced once went from 18 MB to 35 MB) for nothing `compact` keeps.
        /// Into `to`, the group goes as it was when nothing was dropped from it.
        fn apply(
            &mut self,
            events: &sled::Tree,
            to: Option<&sled::Tree>,
        ) -> Result<u64, sled::Error> {
            self.close();
            let group = std::mem::take(self);
            let mut batch = sled::Batch::default();
            match to {
                None if group.dropped == 0 => return Ok(0),
                None => {
                    for (k, _) in group.old {
                        batch.remove(k);
                    }
                }
                Some(_) if group.dropped == 0 => {
                    for (k, v) in group.old {
                        batch.insert(k, v);
                    }
                }
                Some(_) => {}
            }
            if group.dropped > 0 {
                for (first, value) in group.new {
                    batch.insert(&first.to_be_bytes(), value);
                }
            }
            to.unwrap_or(events).apply_batch(batch)?;
            Ok(group.dropped)
        }
    }

    let mut group = Group::default();
    let mut dropped = 0;
    for item in events.range(..below.to_be_bytes()) {
        let (k, v) = item?;
        let first = decode_offset(&k);
        let chunk = Chunk::parse(&v);
        let records: Result<Vec<&[u8]>, _> = chunk.frames.and_then(|_| chunk.records().collect());
        let Ok(records) = records else {
            // Damaged: left exactly as it is, for readers to report.
            group.close();
            if let Some(to) = to {
                to.insert(k, v)?;
            }
            continue;
        };
        group.old.push((k, v.clone()));
        for (offset, frame) in (first..).zip(records) {
            let superseded = !frame.is_empty()
                && offset < below
                && identity(frame).is_some_and(|id| latest.get(&id) != Some(&offset));
            if superseded {
                group.dropped += 1;
                group.push(offset, &[]);
            } else {
                group.push(offset, frame);
            }
        }
        if group.old.len() >= COMPACT_GROUP {
            dropped += group.apply(&events, to)?;
        }
    }
    dropped += group.apply(&events, to)?;
    copy_from(below.to_be_bytes()..)?;
    Ok(LogCompacted {
        dropped,
        kept: live - dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str) -> Event {
        Event::decode(
            serde_json::json!({
                "v": 1, "pipeline": "t", "kind": "file", "key": key, "op": "upsert",
                "observed_at": "2024-01-01T00:00:00Z", "scan": "s",
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    /// A damaged chunk yields one undecodable record per offset it claims; the records
    /// around it, and appends after a restart, are unaffected.
    #[tokio::test]
    async fn damaged_chunk_is_reported_per_offset() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = SledLog::open(&db, "t").unwrap();
        log.append(vec![event("a"), event("b"), event("c")])
            .await
            .unwrap();
        // Offsets 3 and 4: the first frame is not JSON, the second runs past the end.
        let mut bad = vec![CHUNK_FORMAT, 2, 0, 0, 0, 3, 0, 0, 0];
        bad.extend_from_slice(b"{{{");
        bad.extend_from_slice(&[200, 0, 0, 0, b'{']);
        log.events.insert(3u64.to_be_bytes(), bad).unwrap();
        drop(log);
        let log = SledLog::open(&db, "t").unwrap();
        assert_eq!(
            log.head(0).await.unwrap(),
            5,
            "the head counts the damaged chunk"
        );
        log.append(vec![event("d"), event("e")]).await.unwrap();
        let records = log.read(0, 0, 100).await.unwrap();
        let got: Vec<(u64, Option<String>)> = records
            .iter()
            .map(|r| (r.offset, r.event.as_ref().ok().map(|e| e.key.clone())))
            .collect();
        let some = |k: &str| Some(k.to_owned());
        assert_eq!(
            got,
            vec![
                (0, some("a")),
                (1, some("b")),
                (2, some("c")),
                (3, None),
                (4, None),
                (5, some("d")),
                (6, some("e")),
            ]
        );
        let from_4: Vec<u64> = log
            .read(0, 4, 2)
            .await
            .unwrap()
            .iter()
            .map(|r| r.offset)
            .collect();
        assert_eq!(from_4, vec![4, 5]);
    }

    /// Only events every consumer passed and a later event of their item supersedes are
    /// dropped; offsets, the head and reads around the gaps stay as they were.
    #[tokio::test]
    async fn compaction_drops_superseded_events_below_the_least_committed_offset() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = SledLog::open(&db, "t").unwrap();
        let keys = ["a", "b", "a", "c", "a", "b", "c"];
        for k in keys {
            log.append(vec![event(k)]).await.unwrap();
        }
        async fn offsets(log: &SledLog, from: u64) -> Vec<(u64, String)> {
            log.read(0, from, 100)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.offset, r.event.as_ref().unwrap().key.clone()))
                .collect()
        }
        // Nothing committed: nothing is dropped.
        assert_eq!(drop_superseded(&db, "t").unwrap().dropped, 0);
        log.commit("t.projector", 0, 6).await.unwrap();
        log.commit("other", 0, 5).await.unwrap();
        let done = drop_superseded(&db, "t").unwrap();
        // Below 5: a@0 and a@2 (a@4 is the latest), c@3 is superseded by c@6; b@1 by b@5.
        assert_eq!(
            done,
            LogCompacted {
                dropped: 4,
                kept: 3
            }
        );
        drop(log);
        let log = SledLog::open(&db, "t").unwrap();
        assert_eq!(log.head(0).await.unwrap(), 7);
        let s = |o: u64, k: &str| (o, k.to_owned());
        assert_eq!(
            offsets(&log, 0).await,
            vec![s(4, "a"), s(5, "b"), s(6, "c")]
        );
        assert_eq!(
            offsets(&log, 1).await,
            vec![s(4, "a"), s(5, "b"), s(6, "c")]
        );
        assert_eq!(log.read(0, 0, 1).await.unwrap()[0].offset, 4);
        log.append(vec![event("d")]).await.unwrap();
        assert_eq!(
            offsets(&log, 5).await,
            vec![s(5, "b"), s(6, "c"), s(7, "d")]
        );
        assert_eq!(drop_superseded(&db, "t").unwrap().dropped, 0, "idempotent");
    }

    #[test]
    fn chunks_stay_within_their_budget() {
        let mut events: Vec<Event> = (0..1000).map(|i| event(&format!("k{i}"))).collect();
        events[500].name = Some("x".repeat(3 * CHUNK_BYTES));
        let chunks = encode_chunks(&mut events);
        let mut next = 0;
        for (start, value) in &chunks {
            let chunk = Chunk::parse(value);
            assert_eq!(*start, next, "chunks are contiguous");
            assert!(
                value.len() - CHUNK_HEADER <= CHUNK_BYTES || chunk.count == 1,
                "only a single large event exceeds the budget"
            );
            assert!(chunk.records().all(|r| r.is_ok()));
            next += chunk.count;
        }
        assert_eq!(next, 1000);
    }
}
