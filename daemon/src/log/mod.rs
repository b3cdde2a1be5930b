//! The event log boundary: the [`EventLog`] trait every backend implements, the records it
//! returns and the errors of each operation.
//!
//! Offsets are per partition, assigned by the log, and only grow. A committed offset is the
//! *next offset to read*: every event below it has been applied to the target.

pub mod kafka;
pub mod sled;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tidemark_proto::{DecodeError, Event};

use crate::config::{LogConfig, PipelineConfig};
use crate::state::State;

pub use self::kafka::KafkaLog;
pub use self::sled::SledLog;

/// One record as read back: where it sits, and the event or why it could not be decoded.
#[derive(Debug)]
pub struct Record {
    /// Partition it was read from.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// The event, or the reason the bytes are not one (reported, never fatal).
    pub event: Result<Event, DecodeError>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Appending failed; nothing in the batch may be assumed durable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The backend refused or failed the write.
    #[error("append to the {backend} log failed: {source}")]
    Backend {
        /// `sled` or `kafka`.
        backend: &'static str,
        /// Why.
        source: BoxError,
    },
}

/// Reading events or the head offset failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The backend failed the read.
    #[error("read from the {backend} log failed: {source}")]
    Backend {
        /// `sled` or `kafka`.
        backend: &'static str,
        /// Why.
        source: BoxError,
    },
}

/// Reading a committed offset failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadOffsetError {
    /// The backend failed the read.
    #[error(
        "reading the committed offset of `{consumer}` from the {backend} log failed: {source}"
    )]
    Backend {
        /// `sled` or `kafka`.
        backend: &'static str,
        /// The consumer.
        consumer: String,
        /// Why.
        source: BoxError,
    },
}

/// Committing or moving an offset failed; the previous committed offset still holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The backend failed the write.
    #[error("committing the offset of `{consumer}` to the {backend} log failed: {source}")]
    Backend {
        /// `sled` or `kafka`.
        backend: &'static str,
        /// The consumer.
        consumer: String,
        /// Why.
        source: BoxError,
    },
}

/// Reaching the log's backend, or making the log ready there, failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No broker answered: the message names them, why the last attempt failed, and what
    /// to do.
    #[error(
        "cannot reach the Kafka brokers {brokers} ({reason}); start the broker, or fix `brokers` in [pipeline.log.kafka]"
    )]
    Unreachable {
        /// The configured bootstrap brokers.
        brokers: String,
        /// Why, as the client last said (`… Connection refused`), or how long it waited.
        reason: String,
    },
    /// A broker answered but refused to authenticate this client (the SASL handshake or
    /// the credentials): the message points at the `sasl.*` properties and
    /// `secret_properties`, never at `brokers`, and holds no secret.
    #[error(
        "the Kafka brokers {brokers} answered but refused to authenticate this client ({reason}); check `security.protocol`, `sasl.mechanism` and `sasl.username` in `properties` and `sasl.password` in `secret_properties` of [pipeline.log.kafka] against the broker's SASL setup (that it takes this mechanism and knows this user and password)"
    )]
    Authentication {
        /// The configured bootstrap brokers.
        brokers: String,
        /// Why, as the client said (`… SASL PLAIN mechanism handshake failed …`).
        reason: String,
    },
    /// Every broker went away during a one-shot command and none came back within a
    /// few seconds: the run stops there, with what it committed before.
    #[error(
        "lost the Kafka brokers {brokers} during the run ({reason}); what was committed before stays, and the next run goes on from there: start the broker, or fix `brokers` in [pipeline.log.kafka], then run again"
    )]
    Lost {
        /// The configured bootstrap brokers.
        brokers: String,
        /// Why, as the client last said (`… Connection refused`).
        reason: String,
    },
    /// The brokers kept their connections open but stopped answering during a one-shot
    /// command (a paused, hung or overloaded broker): a request got no answer within its
    /// timeout, and the run stops there, with what it committed before.
    #[error(
        "the Kafka brokers {brokers} stopped answering during the run: {request} got no answer within {waited:?} while the connections stayed open (a paused, hung or overloaded broker); what was committed before stays, and the next run goes on from there: restart the broker, or find what holds it up, then run again"
    )]
    Silent {
        /// The configured bootstrap brokers.
        brokers: String,
        /// The request left unanswered (`a read`, `a commit`, …).
        request: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// The backend answered but the log cannot be used (its topic cannot be created or
    /// has no partitions).
    #[error("the {backend} log is not ready: {message}")]
    NotReady {
        /// `kafka`.
        backend: &'static str,
        /// Why, and what to do.
        message: String,
    },
}

/// Taking every partition for a one-shot projection failed; nothing was taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TakeError {
    /// Another process renews leases of the group: a running daemon, or another one-shot
    /// `project` or `sync`.
    #[error(
        "{holders} other process{} (a running `tidemark run`, or another `project` or `sync`) {} partition{} {} of topic `{topic}` for consumer group `{group}`; a one-shot run would project them as well and could move the group's committed offsets back. Stop {}, or let {} project (`tidemark status` shows the lag), then run again",
        if *holders == 1 { "" } else { "es" },
        if *holders == 1 { "holds" } else { "hold" },
        if partitions.len() == 1 { "" } else { "s" },
        partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        if *holders == 1 { "it" } else { "them" },
        if *holders == 1 { "it" } else { "them" },
    )]
    Held {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// Partitions whose lease names another process, once one of them was seen
        /// renewing while this one looked.
        partitions: Vec<u32>,
        /// How many processes hold them.
        holders: usize,
    },
    /// The backend failed.
    #[error("taking the partitions of group `{group}` on the {backend} log failed: {source}")]
    Backend {
        /// `kafka`.
        backend: &'static str,
        /// The consumer group.
        group: String,
        /// Why.
        source: BoxError,
    },
}

/// How long a log waits for an unreachable backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// `tidemark run`: appends wait out a broker restart (the Kafka producer retries for
    /// 5 minutes) and `run` retries connecting with backoff.
    Daemon,
    /// One-shot commands: connecting gives up as soon as every broker was found down (10 s
    /// at most), and for good for the rest of the command; so does any later request
    /// once the brokers are down, or left it unanswered for 10 s; an append gives up after
    /// 10 s without acknowledgement.
    OneShot,
}

/// Releasing this process's share of the partitions failed; it expires instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The backend failed the write.
    #[error(
        "releasing the partition leases of group `{group}` on the {backend} log failed: {source}"
    )]
    Backend {
        /// `kafka`.
        backend: &'static str,
        /// The consumer group whose leases stay until they expire.
        group: String,
        /// Why.
        source: BoxError,
    },
}

/// An append-only, ordered, durable event log.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Backend name for messages and status (`sled`, `kafka`).
    fn backend(&self) -> &'static str;

    /// Number of partitions; each has its own offsets.
    fn partitions(&self) -> u32;

    /// Which log this is, for records that count in its offsets (the source index's
    /// [`crate::state::LogMark`]): the backend, and for Kafka the topic. The default is the
    /// backend's name.
    fn identity(&self) -> String {
        self.backend().to_owned()
    }

    /// Appends the events in order, assigning partition and offset, and returns only once
    /// they are durable.
    async fn append(&self, events: Vec<Event>) -> Result<(), AppendError>;

    /// Reads up to `max` records of `partition` from offset `from` on, in offset order.
    async fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, ReadError>;

    /// Next offset the partition will assign (one past the last record).
    async fn head(&self, partition: u32) -> Result<u64, ReadError>;

    /// Waits until the partition's head is above `offset` or `timeout` passes; returns the head.
    async fn wait_beyond(
        &self,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, ReadError>;

    /// The consumer's committed offset (next offset to read); 0 if it never committed.
    async fn committed(&self, consumer: &str, partition: u32) -> Result<u64, ReadOffsetError>;

    /// [`EventLog::head`] for `status`, which must answer soon: a backend that otherwise
    /// waits out an unreachable peer (the daemon's Kafka log rides out broker restarts)
    /// gives up within seconds once it finds the peer down, with an error that says so
    /// and what to do.
    async fn head_for_status(&self, partition: u32) -> Result<u64, ReadError> {
        self.head(partition).await
    }

    /// [`EventLog::committed`] for `status`, as [`EventLog::head_for_status`].
    async fn committed_for_status(
        &self,
        consumer: &str,
        partition: u32,
    ) -> Result<u64, ReadOffsetError> {
        self.committed(consumer, partition).await
    }

    /// Moves the committed offset forward to `next`; a lower value is ignored.
    async fn commit(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError>;

    /// Sets the committed offset to any value, backwards included (`replay`).
    async fn seek(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError>;

    /// Reaches the backend and makes sure the log exists (Kafka: contacts the brokers and
    /// creates the topic). `run` retries it with backoff and reports not-ready until it
    /// succeeds; every other operation connects on first use.
    async fn connect(&self) -> Result<(), ConnectError> {
        Ok(())
    }

    /// The partitions `consumer` should work on now, in order. A backend whose consumers
    /// share partitions through group membership (Kafka) joins the consumer's group and
    /// returns its current assignment, which a rebalance may change at any time; the
    /// default is every partition.
    async fn assigned(&self, _consumer: &str) -> Result<Vec<u32>, ReadError> {
        Ok((0..self.partitions()).collect())
    }

    /// Takes every partition for a one-shot `project` or `sync` and holds them until
    /// [`EventLog::release`], so that no daemon projects or commits them meanwhile; refuses
    /// ([`TakeError::Held`]) while another process holds any. The default (a log no other
    /// process shares) is every partition at once.
    async fn take_all(&self, _consumer: &str) -> Result<Vec<u32>, TakeError> {
        Ok((0..self.partitions()).collect())
    }

    /// Gives up the partitions [`EventLog::assigned`] or [`EventLog::take_all`] handed this process, once its
    /// projector has stopped and committed, so another process (or the next start) takes
    /// them at once; nothing is committed through this log afterwards. A process that
    /// dies without it loses its partitions only when their leases expire.
    async fn release(&self) -> Result<(), ReleaseError> {
        Ok(())
    }

    /// Whether several processes may work on this log's partitions in turn, so a
    /// partition this process gains may have been projected by another one meanwhile.
    fn shared(&self) -> bool {
        false
    }

    /// Where `consumer`'s committed offsets are kept, as the user configures it, when that
    /// is outside this process's state (a Kafka consumer group): there they can change
    /// (the `group` setting) or be lost without the state knowing, so a projector compares
    /// them with what it committed itself ([`crate::state::CommitMark`]). `None` (the
    /// default): the offsets live in the state database, beside the applied state.
    fn offsets_home(&self, _consumer: &str) -> Option<String> {
        None
    }

    /// The partition the events of an item are appended to, by its identity
    /// ([`tidemark_proto::Event::identity`]).
    fn partition_of(&self, _identity: &str) -> u32 {
        0
    }
}

/// Opens the log a pipeline is configured with, waiting for its backend as `patience` says.
pub fn open(
    pipeline: &PipelineConfig,
    state: &State,
    patience: Patience,
) -> Result<Arc<dyn EventLog>, ReadError> {
    match &pipeline.log {
        LogConfig::Sled => Ok(Arc::new(SledLog::open(state.db(), &pipeline.name)?)),
        LogConfig::Kafka(kafka) => Ok(Arc::new(KafkaLog::new(kafka, &pipeline.name, patience)?)),
    }
}
