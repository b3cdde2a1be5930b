//! The embedded event log: one sled tree per pipeline, keyed by big-endian offset, plus a
//! tree of committed offsets. One partition.

use std::time::Duration;

use async_trait::async_trait;
use tidemark_proto::Event;
use tokio::sync::{watch, Mutex};

use super::{AppendError, CommitError, EventLog, ReadError, ReadOffsetError, Record};

const BACKEND: &str = "sled";

/// The sled-backed [`EventLog`].
pub struct SledLog {
    db: sled::Db,
    events: sled::Tree,
    offsets: sled::Tree,
    /// Serialises appenders so offsets are assigned in the order batches become durable.
    append_lock: Mutex<()>,
    /// Head offset, published after each durable append so tailing readers wake up.
    head: watch::Sender<u64>,
}

fn read_err(e: sled::Error) -> ReadError {
    ReadError::Backend {
        backend: BACKEND,
        source: Box::new(e),
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
            Some((k, _)) => decode_offset(&k) + 1,
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
            source: Box::new(e),
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
        let _guard = self.append_lock.lock().await;
        let first = *self.head.borrow();
        let mut batch = sled::Batch::default();
        for (i, event) in events.iter_mut().enumerate() {
            event.partition = 0;
            event.offset = first + i as u64;
            batch.insert(&event.offset.to_be_bytes(), event.encode());
        }
        let err = |e: sled::Error| AppendError::Backend {
            backend: BACKEND,
            source: Box::new(e),
        };
        self.events.apply_batch(batch).map_err(err)?;
        self.db.flush_async().await.map_err(err)?;
        self.head.send_replace(first + events.len() as u64);
        Ok(())
    }

    async fn read(&self, _partition: u32, from: u64, max: usize) -> Result<Vec<Record>, ReadError> {
        let mut out = Vec::new();
        for item in self.events.range(from.to_be_bytes()..).take(max) {
            let (k, v) = item.map_err(read_err)?;
            out.push(Record {
                partition: 0,
                offset: decode_offset(&k),
                event: Event::decode(&v),
            });
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
                source: Box::new(e),
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
