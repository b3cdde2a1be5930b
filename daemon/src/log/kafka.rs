//! The Kafka event log: one topic per pipeline, an idempotent producer, records keyed by
//! kind/key, committed offsets kept in a consumer group, partitions split between daemons
//! by leases.
//!
//! Pieces, each a librdkafka client:
//! - the **producer** (`enable.idempotence`, `acks=all`) appends; an append returns once the
//!   broker acknowledged every record of the batch;
//! - one **reader** per partition reads by position (`assign` at an offset, never a group),
//!   so reading is independent of ownership and of committed offsets;
//! - one **group client** per consumer name keeps committed offsets (plain commits, never
//!   a group member);
//! - once a consumer's owner calls [`EventLog::assigned`], a [`Leases`] thread decides
//!   which partitions this process projects; from then on the consumer commits only
//!   partitions it holds. A one-shot `project` or `sync` calls [`EventLog::take_all`]
//!   instead: it holds every partition for its run, or refuses while a daemon holds some.
//!
//! A consumer name maps to a Kafka group: the pipeline's projector (`<pipeline>.projector`)
//! uses the configured `group`; any other name `c` uses `<group>.<c>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tidemark_proto::Event;
use tokio::sync::{watch, Mutex, OnceCell};
use tracing::{debug, info, warn};

use super::{
    AppendError, BoxError, CommitError, ConnectError, EventLog, Patience, ReadError,
    ReadOffsetError, Record, ReleaseError, TakeError,
};
use crate::config::KafkaLogConfig;

mod context;

use context::LogContext;

const BACKEND: &str = "kafka";

/// Deadline of one request to the brokers (metadata, watermarks, offsets); a one-shot
/// command whose request got no answer within it takes the brokers for silent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits for records it knows exist (below the high watermark).
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// How long a one-shot command's append waits for the brokers to acknowledge it (the
/// daemon's producer waits 5 minutes, through a broker restart).
const ONE_SHOT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a one-shot command's request (and the daemon's questions about offsets for
/// `status`, see [`KafkaLog::query`]) still waits once a client reported every broker
/// down while it waited: librdkafka reconnects to a broker that answers within a few hundred
/// milliseconds, and one that does not would hold each request for its whole timeout (a
/// `sync` whose broker died took 24–30 s to fail, a request after another).
const DOWN_GRACE: Duration = Duration::from_secs(2);

/// How often tailing readers look at the high watermark when no local append woke them.
const TAIL_POLL: Duration = Duration::from_millis(100);

/// The Kafka-backed [`EventLog`].
pub struct KafkaLog {
    config: KafkaLogConfig,
    /// Consumer name of the pipeline's projector; it keeps its offsets in `config.group`.
    projector: String,
    producer: FutureProducer<LogContext>,
    /// Answers watermark queries; never subscribes, never commits.
    meta: Arc<BaseConsumer<LogContext>>,
    /// Every client's context: librdkafka's own lines, once per kind.
    context: LogContext,
    /// Partition count: the configured one until [`KafkaLog::connect`] reads the topic's.
    partitions: AtomicU32,
    /// Set once the brokers answered and the topic exists.
    connected: OnceCell<()>,
    /// How long to wait for unreachable brokers.
    patience: Patience,
    /// A one-shot command's failure to connect, or brokers it lost or that stopped
    /// answering, returned at once by every later call: each call waiting for the brokers
    /// again made a `sync` take 40 s to fail.
    gave_up: std::sync::OnceLock<ConnectError>,
    readers: SyncMutex<HashMap<u32, Arc<Mutex<Reader>>>>,
    groups: SyncMutex<HashMap<String, Arc<Group>>>,
    /// Partition ownership of each consumer whose owner asked [`EventLog::assigned`].
    leases: SyncMutex<HashMap<String, Arc<Leases>>>,
    /// Bumped after each local append so tailing readers in this process wake at once.
    appended: watch::Sender<u64>,
}

/// A positional reader of one partition.
struct Reader {
    consumer: StreamConsumer<LogContext>,
    /// Offset the next record received will have, when the consumer is positioned.
    next: Option<u64>,
}

/// The client that keeps one consumer group's committed offsets.
struct Group {
    consumer: Arc<BaseConsumer<LogContext>>,
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(e)
}

fn read_err(e: impl Into<BoxError>) -> ReadError {
    ReadError::Backend {
        backend: BACKEND,
        source: e.into(),
    }
}

/// The partition of an item: a stable hash of kind/key, so one item's events share a
/// partition (and stay in order) and [`EventLog::partition_of`] can say which one.
pub fn partition_for(identity: &str, partitions: u32) -> u32 {
    let hash = blake3::hash(identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % u64::from(partitions.max(1))) as u32
}

impl KafkaLog {
    /// A log on the configured topic. Creates the clients only; the brokers are first
    /// contacted by [`EventLog::connect`] or the first operation.
    pub fn new(
        config: &KafkaLogConfig,
        pipeline: &str,
        patience: Patience,
    ) -> Result<KafkaLog, ReadError> {
        let context = LogContext::new(&config.brokers, patience);
        let ack_timeout = ack_timeout(patience);
        let producer: FutureProducer<LogContext> = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", ack_timeout.as_millis().to_string())
            .create_with_context(context.clone())
            .map_err(read_err)?;
        let meta: BaseConsumer<LogContext> = client_config(config)
            .set("group.id", format!("{}.meta", config.group))
            .set("enable.auto.commit", "false")
            .create_with_context(context.clone())
            .map_err(read_err)?;
        Ok(KafkaLog {
            config: config.clone(),
            projector: format!("{pipeline}.projector"),
            producer,
            meta: Arc::new(meta),
            context,
            partitions: AtomicU32::new(config.partitions),
            connected: OnceCell::new(),
            patience,
            gave_up: std::sync::OnceLock::new(),
            readers: SyncMutex::new(HashMap::new()),
            groups: SyncMutex::new(HashMap::new()),
            leases: SyncMutex::new(HashMap::new()),
            appended: watch::channel(0).0,
        })
    }

    fn ack_timeout(&self) -> Duration {
        ack_timeout(self.patience)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    /// The Kafka consumer group that keeps `consumer`'s offsets.
    pub fn group_id(&self, consumer: &str) -> String {
        if consumer == self.projector {
            self.config.group.clone()
        } else {
            format!("{}.{consumer}", self.config.group)
        }
    }

    async fn ensure_connected(&self) -> Result<(), ConnectError> {
        if let Some(e) = self.gave_up.get() {
            return Err(e.clone());
        }
        self.connected
            .get_or_try_init(|| async {
                // A caller that waited for another's failed attempt fails with it.
                if let Some(e) = self.gave_up.get() {
                    return Err(e.clone());
                }
                let connected = self.create_topic().await;
                if let (Err(e), Patience::OneShot) = (&connected, self.patience) {
                    let _ = self.gave_up.set(e.clone());
                }
                connected
            })
            .await
            .map(|_| ())
    }

    /// Awaits `request` to the brokers (`what`, for the error), which `unanswered` tells
    /// apart from an answer: its client gave up waiting. A one-shot command gives up on the
    /// brokers when, while it waits,
    /// - a client reports every broker down and the request does not finish within
    ///   [`DOWN_GRACE`] after that: they went away ([`ConnectError::Lost`]);
    /// - it gets no answer within [`REQUEST_TIMEOUT`] (its client's own timeout, or this
    ///   one for a request without one, such as a commit): they keep their connections
    ///   but stopped answering ([`ConnectError::Silent`]).
    ///
    /// That failure is kept, so every later call fails with it at once instead of waiting
    /// out its own timeout. The daemon waits (it rides out broker restarts).
    async fn request<T>(
        &self,
        what: &'static str,
        request: impl std::future::Future<Output = T>,
        unanswered: impl Fn(&T) -> bool,
    ) -> Result<T, ConnectError> {
        if let Some(e) = self.gave_up.get() {
            return Err(e.clone());
        }
        if self.patience == Patience::Daemon {
            return Ok(request.await);
        }
        let mut down = self.context.all_down();
        down.borrow_and_update();
        tokio::pin!(request);
        tokio::select! {
            biased;
            out = &mut request => {
                return match unanswered(&out) {
                    true => Err(self.give_up(self.silent(what))),
                    false => Ok(out),
                };
            }
            _ = tokio::time::sleep(REQUEST_TIMEOUT) => {
                return Err(self.give_up(self.silent(what)));
            }
            _ = down.changed() => {}
        }
        match tokio::time::timeout(DOWN_GRACE, &mut request).await {
            Ok(out) if !unanswered(&out) => Ok(out),
            _ if self.context.auth_failed() => Err(self.give_up(self.unreachable(None))),
            _ => Err(self.give_up(ConnectError::Lost {
                brokers: self.config.brokers.clone(),
                reason: self
                    .context
                    .last_failure()
                    .unwrap_or_else(|| "every broker is down".into()),
            })),
        }
    }

    /// A question to the brokers about offsets (`what`, for the error), as
    /// [`KafkaLog::request`] asks it; with `soon` (for `status`), the daemon, which
    /// otherwise waits out the brokers, gives up on a question still unanswered
    /// [`DOWN_GRACE`] after a client reported every broker down while it waited, with the
    /// error a one-shot command gives ([`ConnectError::Unreachable`]: the brokers, why,
    /// and what to do) instead of librdkafka's `OperationTimedOut` after the whole
    /// [`REQUEST_TIMEOUT`]: `status` says within seconds why the offsets cannot be read.
    /// Nothing is given up for good; the next question tries the brokers again. The
    /// projector's own questions wait as before: giving up sooner would only send it
    /// round its loop (out of the waits a stop cuts short) more often.
    async fn query<T>(
        &self,
        what: &'static str,
        request: impl std::future::Future<Output = T>,
        unanswered: impl Fn(&T) -> bool,
        soon: bool,
    ) -> Result<T, ConnectError> {
        if !soon || self.patience != Patience::Daemon {
            return self.request(what, request, unanswered).await;
        }
        let mut down = self.context.all_down();
        down.borrow_and_update();
        tokio::pin!(request);
        tokio::select! {
            biased;
            out = &mut request => return Ok(out),
            _ = down.changed() => {}
        }
        match tokio::time::timeout(DOWN_GRACE, &mut request).await {
            Ok(out) if !unanswered(&out) => Ok(out),
            _ => Err(self.unreachable(None)),
        }
    }

    /// The head of `partition`; `soon`: see [`KafkaLog::query`].
    async fn read_head(&self, partition: u32, soon: bool) -> Result<u64, ReadError> {
        self.ensure_connected().await.map_err(read_err)?;
        let (meta, topic) = (self.meta.clone(), self.config.topic.clone());
        let (_, high) = self
            .query(
                "a request for a partition's head",
                tokio::task::spawn_blocking(move || {
                    meta.fetch_watermarks(&topic, partition as i32, REQUEST_TIMEOUT)
                }),
                blocking_timed_out,
                soon,
            )
            .await
            .map_err(read_err)?
            .map_err(read_err)?
            .map_err(read_err)?;
        Ok(high.max(0) as u64)
    }

    /// `consumer`'s committed offset of `partition`; `soon`: see [`KafkaLog::query`].
    async fn read_committed(
        &self,
        consumer: &str,
        partition: u32,
        soon: bool,
    ) -> Result<u64, ReadOffsetError> {
        let err = |source: BoxError| ReadOffsetError::Backend {
            backend: BACKEND,
            consumer: consumer.to_owned(),
            source,
        };
        self.ensure_connected()
            .await
            .map_err(|e| err(Box::new(e)))?;
        let group = self.group(consumer).map_err(err)?;
        let tpl = self
            .tpl(partition, Offset::Invalid)
            .map_err(|e| err(boxed(e)))?;
        let client = group.consumer.clone();
        let offsets = self
            .query(
                "a request for a committed offset",
                tokio::task::spawn_blocking(move || client.committed_offsets(tpl, REQUEST_TIMEOUT)),
                blocking_timed_out,
                soon,
            )
            .await
            .map_err(|e| err(boxed(e)))?
            .map_err(|e| err(boxed(e)))?
            .map_err(|e| err(boxed(e)))?;
        let offset = offsets
            .find_partition(&self.config.topic, partition as i32)
            .map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(o)) if o > 0 => o as u64,
            _ => 0,
        })
    }

    /// Keeps a one-shot command's failure for every later call; the first one kept stays.
    fn give_up(&self, e: ConnectError) -> ConnectError {
        self.gave_up.get_or_init(|| e).clone()
    }

    /// The brokers left `what` unanswered for [`REQUEST_TIMEOUT`].
    fn silent(&self, what: &'static str) -> ConnectError {
        ConnectError::Silent {
            brokers: self.config.brokers.clone(),
            request: what,
            waited: REQUEST_TIMEOUT,
        }
    }

    /// The brokers could not be reached, or refused to authenticate this client
    /// ([`ConnectError::Authentication`]): why, as the clients last said.
    fn unreachable(&self, e: Option<KafkaError>) -> ConnectError {
        let brokers = self.config.brokers.clone();
        let reason = match (self.context.last_failure(), e) {
            (Some(failure), _) if self.context.auth_failed() => {
                return ConnectError::Authentication {
                    brokers,
                    reason: failure,
                }
            }
            (Some(failure), _) => failure,
            (None, Some(e)) => e.to_string(),
            (None, None) => "every broker is down".into(),
        };
        ConnectError::Unreachable { brokers, reason }
    }

    /// Creates the topic unless it exists, then reads its partition count. A one-shot
    /// command gives up as soon as a client reports every broker down.
    async fn create_topic(&self) -> Result<(), ConnectError> {
        let not_ready = |message: String| ConnectError::NotReady {
            backend: BACKEND,
            message,
        };
        // Metadata first: it fails fast and clearly when no broker answers.
        let meta = self.meta.clone();
        let fetch = tokio::task::spawn_blocking(move || meta.fetch_metadata(None, REQUEST_TIMEOUT));
        let fetched = match self.patience {
            Patience::Daemon => fetch.await,
            Patience::OneShot => {
                let mut all_down = self.context.all_down();
                tokio::select! {
                    fetched = fetch => fetched,
                    _ = all_down.wait_for(|n| *n > 0) => return Err(self.unreachable(None)),
                }
            }
        };
        fetched
            .map_err(|e| not_ready(e.to_string()))?
            .map_err(|e| self.unreachable(Some(e)))?;
        let admin: AdminClient<LogContext> = client_config(&self.config)
            .create_with_context(self.context.clone())
            .map_err(|e| not_ready(e.to_string()))?;
        let partitions = i32::try_from(self.config.partitions).unwrap_or(i32::MAX);
        let replication = i32::try_from(self.config.replication).unwrap_or(1);
        let topic = NewTopic::new(
            &self.config.topic,
            partitions,
            TopicReplication::Fixed(replication),
        )
        .set("cleanup.policy", &self.config.cleanup_policy);
        let results = admin
            .create_topics(
                [&topic],
                &AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT)),
            )
            .await
            .map_err(|e| self.unreachable(Some(e)))?;
        for result in results {
            match result {
                Ok(name) => info!(topic = %name, partitions, "created the Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(not_ready(format!(
                        "cannot create the Kafka topic `{name}`: {code}; create it by hand or fix the broker's permissions"
                    )))
                }
            }
        }
        let count = self
            .topic_partitions()
            .await
            .map_err(|e| not_ready(e.to_string()))?;
        if count != self.config.partitions {
            info!(
                topic = %self.config.topic,
                partitions = count,
                "the topic exists with its own partition count; using it"
            );
        }
        self.partitions.store(count, Ordering::SeqCst);
        Ok(())
    }

    /// Partition count of the topic, waiting briefly for a new topic's metadata.
    async fn topic_partitions(&self) -> Result<u32, ReadError> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let (meta, topic) = (self.meta.clone(), self.config.topic.clone());
            let md = tokio::task::spawn_blocking(move || {
                meta.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
            })
            .await
            .map_err(read_err)?
            .map_err(read_err)?;
            let count = md
                .topics()
                .iter()
                .find(|t| t.name() == self.config.topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len() as u32);
            if count > 0 {
                return Ok(count);
            }
            if Instant::now() > deadline {
                return Err(read_err(format!(
                    "the Kafka topic `{}` has no partitions in the brokers' metadata",
                    self.config.topic
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Appends the events in order and returns where each landed (partition, offset), once
    /// the broker acknowledged all of them. `log migrate` maps offsets with it.
    pub async fn append_acked(&self, events: Vec<Event>) -> Result<Vec<(u32, u64)>, AppendError> {
        let err = |e: BoxError| AppendError::Backend {
            backend: BACKEND,
            source: e,
        };
        self.ensure_connected()
            .await
            .map_err(|e| err(Box::new(e)))?;
        let partitions = self.partitions();
        let mut pending = Vec::with_capacity(events.len());
        // Enqueue every record first, in order; the idempotent producer keeps that order
        // per partition through retries, and the acknowledgements are awaited together.
        for mut event in events {
            let partition = partition_for(&event.identity(), partitions);
            event.partition = partition;
            let payload = event.encode();
            // Compaction keeps the last record per message key: kind/key is the item.
            let key = format!("{}/{}", event.kind, event.key);
            let mut record = FutureRecord::to(&self.config.topic)
                .key(key.as_bytes())
                .payload(&payload)
                .partition(partition as i32);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(err(boxed(e))),
                }
            }
        }
        let mut landed = Vec::with_capacity(pending.len());
        for delivery in pending {
            let delivered = self
                .request(
                    "the acknowledgement of appended events",
                    delivery,
                    |d| matches!(d, Ok(Err((e, _))) if timed_out(e)),
                )
                .await
                .map_err(|e| err(Box::new(e)))?;
            match delivered {
                Ok(Ok(d)) => landed.push((d.partition as u32, d.offset as u64)),
                Ok(Err((e, _))) => {
                    let what = if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
                    {
                        format!(
                            "did not acknowledge the events within {:?}",
                            self.ack_timeout()
                        )
                    } else {
                        format!("did not take the events ({e})")
                    };
                    let why = self
                        .context
                        .last_failure()
                        .map_or_else(String::new, |f| format!("; the last client error: {f}"));
                    return Err(err(format!(
                        "the Kafka brokers {} {what}{why}; what they did not acknowledge is not in the log, and the next scan finds it again",
                        self.config.brokers
                    )
                    .into()));
                }
                Err(_) => return Err(err("the Kafka producer was shut down".into())),
            }
        }
        self.appended.send_modify(|n| *n += 1);
        Ok(landed)
    }

    fn reader(&self, partition: u32) -> Result<Arc<Mutex<Reader>>, ReadError> {
        let mut readers = self.readers.lock().unwrap();
        if let Some(r) = readers.get(&partition) {
            return Ok(r.clone());
        }
        let consumer: StreamConsumer<LogContext> = client_config(&self.config)
            .set("group.id", format!("{}.reader", self.config.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(self.context.clone())
            .map_err(read_err)?;
        let r = Arc::new(Mutex::new(Reader {
            consumer,
            next: None,
        }));
        readers.insert(partition, r.clone());
        Ok(r)
    }

    fn group(&self, consumer: &str) -> Result<Arc<Group>, BoxError> {
        let id = self.group_id(consumer);
        let mut groups = self.groups.lock().unwrap();
        if let Some(g) = groups.get(&id) {
            return Ok(g.clone());
        }
        let g = Arc::new(Group {
            consumer: Arc::new(plain_client(&self.config, &id, &self.context)?),
        });
        groups.insert(id, g.clone());
        Ok(g)
    }

    /// The leases of `consumer`, started (and their thread running) on first use.
    fn leases(&self, consumer: &str) -> Result<Arc<Leases>, BoxError> {
        let id = self.group_id(consumer);
        let mut all = self.leases.lock().unwrap();
        if let Some(l) = all.get(&id) {
            return Ok(l.clone());
        }
        let leases = Arc::new(Leases::new(
            &self.config,
            &id,
            self.partitions(),
            &self.context,
            false,
        )?);
        Leases::start(&leases)?;
        all.insert(id, leases.clone());
        Ok(leases)
    }

    fn tpl(&self, partition: u32, offset: Offset) -> Result<TopicPartitionList, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.config.topic, partition as i32, offset)?;
        Ok(tpl)
    }

    async fn write_offset(
        &self,
        consumer: &str,
        partition: u32,
        next: u64,
        forward_only: bool,
    ) -> Result<(), CommitError> {
        let err = |source: BoxError| CommitError::Backend {
            backend: BACKEND,
            consumer: consumer.to_owned(),
            source,
        };
        self.ensure_connected()
            .await
            .map_err(|e| err(Box::new(e)))?;
        if forward_only {
            let current = self
                .committed(consumer, partition)
                .await
                .map_err(|e| err(Box::new(e)))?;
            if current >= next {
                return Ok(());
            }
        }
        let leases = self
            .leases
            .lock()
            .unwrap()
            .get(&self.group_id(consumer))
            .cloned();
        if let Some(leases) = leases {
            // A daemon commits only partitions it holds: after a takeover or a handover the
            // new holder continues from the last committed offset (re-applying without
            // duplicate effect), so a late commit from here must not move it.
            if !leases.holds(partition) {
                return Err(err(format!(
                    "partition {partition} is no longer held by this daemon in group `{}`; its new holder continues from the last committed offset",
                    self.group_id(consumer)
                )
                .into()));
            }
        }
        let group = self.group(consumer).map_err(err)?;
        let tpl = self
            .tpl(partition, Offset::Offset(next as i64))
            .map_err(|e| err(boxed(e)))?;
        let client = group.consumer.clone();
        self.request(
            "a commit",
            tokio::task::spawn_blocking(move || client.commit(&tpl, CommitMode::Sync)),
            blocking_timed_out,
        )
        .await
        .map_err(|e| err(boxed(e)))?
        .map_err(|e| err(boxed(e)))?
        .map_err(|e| err(boxed(e)))
    }
}

/// Whether a client gave up waiting for the brokers' answer to a request.
fn timed_out(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::MessageTimedOut)
    )
}

/// [`timed_out`], for a call run on a blocking thread.
fn blocking_timed_out<T>(out: &Result<Result<T, KafkaError>, tokio::task::JoinError>) -> bool {
    matches!(out, Ok(Err(e)) if timed_out(e))
}

/// How long the producer waits for the brokers to acknowledge a record.
fn ack_timeout(patience: Patience) -> Duration {
    match patience {
        Patience::Daemon => Duration::from_secs(300),
        Patience::OneShot => ONE_SHOT_ACK_TIMEOUT,
    }
}

/// The settings every client of a log shares: brokers plus the user's extra properties.
fn client_config(config: &KafkaLogConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", "tidemark")
        .set("log_level", "3");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    for (k, v) in &config.secret_properties {
        c.set(k, v.expose());
    }
    c
}

/// A client that commits and reads offsets of group `id` without ever joining it.
fn plain_client(
    config: &KafkaLogConfig,
    id: &str,
    context: &LogContext,
) -> Result<BaseConsumer<LogContext>, KafkaError> {
    client_config(config)
        .set("group.id", id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create_with_context(context.clone())
}

/// Which partitions of the topic this process projects, for one consumer group.
///
/// Why leases and not the broker's consumer-group membership: tansu 0.6 (the broker the
/// tests and the project run on) evicts a member whose session expired inside its
/// `Heartbeat` handler but leaves the group `Formed` with the same generation, the dead
/// member still recorded as leader and the old assignments. The survivor is told to
/// rebalance, rejoins as a follower of the dead leader and is handed its old share again:
/// the dead daemon's partitions are never projected (seen in tansu's debug log; its
/// `OffsetFetch` also returns empty commit metadata, so that cannot carry a lease either).
/// Ownership therefore depends on nothing but offset commits, which every Kafka-protocol
/// broker stores faithfully:
///
/// - **Lease slots.** Group `<group>.tidemark-lease` keeps one committed "offset" per
///   partition holding `(owner << 32) | (lease << 16) | seq` with bit 62 set, where `owner`
///   is a random id of this process, `lease` its `session_timeout` in seconds and `seq`
///   changes on every write (a release writes owner 0 and the sequence alone, as earlier
///   builds did). A holder rewrites its slots every `lease / 3`.
/// - **Expiry by observation.** A slot another process holds counts as expired once its
///   value has not changed for 1.5 × `lease` by this process's own clock (no clock sync
///   needed), the longer of its own `lease` and the one the slot declares (a daemon with a
///   shorter `session_timeout` took a live one's partitions, which it renews less often).
///   A holder that could not rewrite a slot for `lease` stops projecting it first, so it
///   is fenced before anyone else may take it.
/// - **Claims.** A free slot is written, re-read after a settle delay, and held only if it
///   still carries this process's value (the later of two simultaneous claimants wins; a
///   double holding is also dropped at the next round by whoever sees the other's value).
/// - **Balance.** A process holding at least two partitions fewer than the busiest holder
///   writes its id into that holder's *want slot* (group `<group>.tidemark-want`); the
///   holder gives one such partition over by writing the wanter into its lease slot, at
///   its next [`EventLog::assigned`] call, i.e. after its batches on it were committed.
///
/// The guarantees stay those of the projector: a holder commits only what it holds and
/// only after the target applied it; a new holder resumes from the committed offset and
/// adopts what its predecessor applied but did not commit.
struct Leases {
    /// This process's owner id (30 random bits, never 0).
    me: u32,
    /// Group id of the consumer, for messages.
    group: String,
    topic: String,
    partitions: u32,
    /// How long a holder may go without rewriting its slots (`session_timeout`).
    lease: Duration,
    /// Commits and reads the lease slots.
    slots: BaseConsumer<LogContext>,
    /// Commits and reads the want slots.
    wants: BaseConsumer<LogContext>,
    state: SyncMutex<LeaseState>,
    /// Set by [`Leases::release`], or when the one-shot run waiting in
    /// [`Leases::take_all`] stopped waiting (Ctrl-C): this process neither renews nor
    /// claims any more.
    closed: AtomicBool,
    /// A one-shot run's leases ([`EventLog::take_all`]): it holds every partition for its
    /// run and neither hands one over nor asks for one.
    exclusive: bool,
}

#[derive(Default)]
struct LeaseState {
    /// Changes the value of every slot write.
    seq: u32,
    /// Partitions held, with when their slot was last written.
    held: BTreeMap<u32, Instant>,
    /// Partitions promised to another owner, given over at the next `hand_over`.
    handover: BTreeMap<u32, u32>,
}

/// What [`Leases::take_all`] found.
enum Taken {
    /// Every partition, held now.
    All(Vec<u32>),
    /// Partitions live holders renew, and how many holders there are; nothing was taken.
    Held {
        partitions: Vec<u32>,
        holders: usize,
    },
    /// The run stopped waiting ([`Leases::closed`]); nothing was taken.
    Abandoned,
}

/// Sets [`Leases::closed`] when dropped: a one-shot run that stops waiting for
/// [`Leases::take_all`] (its future dropped on Ctrl-C) ends the watch, and no slot is
/// claimed after it.
struct CloseOnDrop(Option<Arc<Leases>>);

impl CloseOnDrop {
    /// The wait is over: the leases stay as [`Leases::take_all`] left them.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(leases) = &self.0 {
            leases.closed.store(true, Ordering::SeqCst);
        }
    }
}

/// Slot writes: partition and value.
type Claims = Vec<(u32, i64)>;

/// A slot value and when this process first saw it.
type Seen = HashMap<(&'static str, u32), (Option<i64>, Instant)>;

fn owner_of(slot: Option<i64>) -> u32 {
    slot.map_or(0, |v| ((v >> 32) & OWNER_BITS) as u32)
}

/// The 30 bits of a slot value's owner, above bit 32.
const OWNER_BITS: i64 = 0x3FFF_FFFF;

/// Bit 62 of a slot value: its writer's lease (`session_timeout`, whole seconds) is in
/// bits 16–31, and the sequence in bits 0–15. Values written by earlier builds, and
/// releases (owner 0, which those builds must read as free), have it clear.
const DECLARES_LEASE: i64 = 1 << 62;

/// The lease the writer of `slot` declared, if it declared one.
fn declared_lease(slot: Option<i64>) -> Option<Duration> {
    slot.filter(|v| v & DECLARES_LEASE != 0)
        .map(|v| Duration::from_secs(((v >> 16) & 0xFFFF) as u64))
}

impl Leases {
    fn new(
        config: &KafkaLogConfig,
        group: &str,
        partitions: u32,
        context: &LogContext,
        exclusive: bool,
    ) -> Result<Leases, KafkaError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let seed = format!("{}-{nanos}-{group}", std::process::id());
        let mut first = [0u8; 4];
        first.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..4]);
        let me = (u32::from_le_bytes(first) & 0x3fff_ffff).max(1);
        Ok(Leases {
            me,
            group: group.to_owned(),
            topic: config.topic.clone(),
            partitions,
            lease: config.session_timeout.max(Duration::from_secs(1)),
            slots: plain_client(config, &format!("{group}.tidemark-lease"), context)?,
            wants: plain_client(config, &format!("{group}.tidemark-want"), context)?,
            state: SyncMutex::new(LeaseState::default()),
            closed: AtomicBool::new(false),
            exclusive,
        })
    }

    /// Starts the thread that keeps the leases. It holds a weak reference: it ends once
    /// the log (and its leases) is dropped, or the leases are released.
    fn start(leases: &Arc<Leases>) -> std::io::Result<()> {
        let worker = Arc::downgrade(leases);
        std::thread::Builder::new()
            .name(format!("kafka-leases-{}", leases.group))
            .spawn(move || Leases::maintain(worker))
            .map(|_| ())
    }

    /// Takes every partition for a one-shot run, or says which are held by live holders. Slots nobody holds (never written, or
    /// released: owner 0) are free at once; a slot naming an owner is watched for up to
    /// 1.5 × `lease`, as a daemon does before it takes a dead holder's partition: a
    /// holder that rewrites it is alive (a daemon renews every `lease / 3`), one that does
    /// not has expired. Then every slot is claimed, and held only if every claim still
    /// stands after the settle delay; otherwise the claims that stand are given back.
    fn take_all(&self) -> Result<Taken, KafkaError> {
        let first = self.read(&self.slots)?;
        let mut named: Vec<u32> = (0..self.partitions)
            .filter(|&p| owner_of(first[p as usize]) != 0)
            .collect();
        if !named.is_empty() {
            let expiry = named
                .iter()
                .map(|&p| self.expiry(first[p as usize]))
                .max()
                .unwrap_or_default();
            info!(
                group = %self.group,
                partitions = ?named,
                "partition leases of the group name a holder; watching them for up to {expiry:?} to tell a live one from one that stopped without releasing them"
            );
            let since = Instant::now();
            while !named.is_empty() && since.elapsed() < expiry {
                std::thread::sleep(Duration::from_millis(250));
                if self.closed.load(Ordering::SeqCst) {
                    return Ok(Taken::Abandoned);
                }
                let now = self.read(&self.slots)?;
                let renewed: Vec<u32> = named
                    .iter()
                    .copied()
                    .filter(|&p| {
                        now[p as usize] != first[p as usize] && owner_of(now[p as usize]) != 0
                    })
                    .collect();
                if !renewed.is_empty() {
                    // One holder is seen alive: every partition a slot names is counted,
                    // with its owner (the others renew at their own times, and one that
                    // has stopped leaves its partitions to the live ones soon): counting
                    // only those seen renewing named too few processes and partitions.
                    let held: Vec<u32> = (0..self.partitions)
                        .filter(|&p| {
                            let owner = owner_of(now[p as usize]);
                            owner != 0 && owner != self.me
                        })
                        .collect();
                    let holders: BTreeSet<u32> =
                        held.iter().map(|&p| owner_of(now[p as usize])).collect();
                    return Ok(Taken::Held {
                        partitions: held,
                        holders: holders.len(),
                    });
                }
                // Released meanwhile (a daemon stopped cleanly): free.
                named.retain(|&p| owner_of(now[p as usize]) != 0);
            }
        }
        if self.closed.load(Ordering::SeqCst) {
            return Ok(Taken::Abandoned);
        }
        let mut state = self.state.lock().unwrap();
        let claims: Claims = (0..self.partitions)
            .map(|p| (p, self.value(self.me, &mut state)))
            .collect();
        drop(state);
        let claimed_at = Instant::now();
        self.write(&self.slots, &claims)?;
        std::thread::sleep((self.lease / 6).min(Duration::from_secs(1)));
        let after = self.read(&self.slots)?;
        let (won, lost): (Claims, Claims) = claims
            .iter()
            .partition(|(p, v)| after[*p as usize] == Some(*v));
        let abandoned = self.closed.load(Ordering::SeqCst);
        if !lost.is_empty() || abandoned {
            // Another process claimed at the same time: give back what this one won.
            let mut state = self.state.lock().unwrap();
            let back: Claims = won
                .iter()
                .map(|&(p, _)| (p, self.value(0, &mut state)))
                .collect();
            drop(state);
            self.write(&self.slots, &back)?;
            if abandoned {
                return Ok(Taken::Abandoned);
            }
            let partitions: Vec<u32> = lost.iter().map(|&(p, _)| p).collect();
            let holders: BTreeSet<u32> = partitions
                .iter()
                .map(|&p| owner_of(after[p as usize]))
                .collect();
            return Ok(Taken::Held {
                partitions,
                holders: holders.len(),
            });
        }
        let mut state = self.state.lock().unwrap();
        for &(p, _) in &won {
            state.held.insert(p, claimed_at);
        }
        info!(group = %self.group, partitions = ?state.held.keys().collect::<Vec<_>>(), "leased every partition for this run");
        Ok(Taken::All((0..self.partitions).collect()))
    }

    fn holds(&self, partition: u32) -> bool {
        self.state.lock().unwrap().held.contains_key(&partition)
    }

    fn value(&self, owner: u32, state: &mut LeaseState) -> i64 {
        state.seq = state.seq.wrapping_add(1);
        if owner == 0 {
            return i64::from(state.seq);
        }
        let secs = self.lease.as_secs_f64().ceil().clamp(1.0, 65535.0) as i64;
        DECLARES_LEASE | (i64::from(owner) << 32) | (secs << 16) | i64::from(state.seq & 0xFFFF)
    }

    /// How long a slot holding `slot` may go unchanged before its holder counts as gone:
    /// 1.5 × the longer of this process's lease and the one its writer declared, so that
    /// a daemon with a shorter `session_timeout` does not take the partitions of a live
    /// one with a longer one (which renews only every third of its own).
    fn expiry(&self, slot: Option<i64>) -> Duration {
        self.lease.max(declared_lease(slot).unwrap_or_default()) * 3 / 2
    }

    /// Every slot of `client`'s group: the committed value, `None` if never written.
    fn read(&self, client: &BaseConsumer<LogContext>) -> Result<Vec<Option<i64>>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(&self.topic, p as i32, Offset::Invalid)?;
        }
        let got = client.committed_offsets(tpl, REQUEST_TIMEOUT)?;
        Ok((0..self.partitions)
            .map(|p| {
                match got
                    .find_partition(&self.topic, p as i32)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(v)) if v >= 0 => Some(v),
                    _ => None,
                }
            })
            .collect())
    }

    fn write(
        &self,
        client: &BaseConsumer<LogContext>,
        values: &[(u32, i64)],
    ) -> Result<(), KafkaError> {
        if values.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, v) in values {
            tpl.add_partition_offset(&self.topic, p as i32, Offset::Offset(v))?;
        }
        client.commit(&tpl, CommitMode::Sync)
    }

    /// Gives over the partitions promised to other owners and returns those held now.
    fn hand_over(&self) -> Vec<u32> {
        let mut state = self.state.lock().unwrap();
        for (p, to) in std::mem::take(&mut state.handover) {
            state.held.remove(&p);
            let value = self.value(to, &mut state);
            match self.write(&self.slots, &[(p, value)]) {
                Ok(()) => {
                    info!(group = %self.group, partition = p, "handed a partition over to another daemon")
                }
                // The slot still names this process, which takes it back at its next round.
                Err(e) => {
                    warn!(group = %self.group, partition = p, "cannot hand a partition over: {e}")
                }
            }
        }
        state.held.keys().copied().collect()
    }

    /// Gives up every partition held, for good: their slots are rewritten with owner 0,
    /// which every process reads as free, so another daemon (or the next start) takes them
    /// at its next round instead of waiting for them to expire. Called once the projector
    /// stopped and committed; from here on this process commits nothing for the group.
    fn release(&self) -> Result<Vec<u32>, KafkaError> {
        self.closed.store(true, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        state.handover.clear();
        let mut held: BTreeSet<u32> = std::mem::take(&mut state.held).into_keys().collect();
        // A claim still settling (written, not yet confirmed as held) names this process
        // too: left, it kept its partition from others for 1.5 × the lease. Rounds after
        // `closed` claim nothing, and this lock keeps the one under way out.
        if let Ok(slots) = self.read(&self.slots) {
            held.extend((0..self.partitions).filter(|&p| owner_of(slots[p as usize]) == self.me));
        }
        let values: Vec<(u32, i64)> = held
            .iter()
            .map(|&p| (p, self.value(0, &mut state)))
            .collect();
        self.write(&self.slots, &values)?;
        // A want of this process left standing would have a busier holder hand it a
        // partition after it stopped: the slot would then name a process that is gone,
        // and the partition wait 1.5 × the lease for anyone.
        if let Ok(wants) = self.read(&self.wants) {
            let mine: Vec<(u32, i64)> = (0..self.partitions)
                .filter(|&p| owner_of(wants[p as usize]) == self.me)
                .map(|p| (p, self.value(0, &mut state)))
                .collect();
            if let Err(e) = self.write(&self.wants, &mine) {
                debug!(group = %self.group, "cannot withdraw this process's wants: {e}");
            }
        }
        Ok(held.into_iter().collect())
    }

    /// Keeps the leases until the log is dropped or they are released.
    fn maintain(leases: std::sync::Weak<Leases>) {
        let mut seen = Seen::new();
        while let Some(this) = leases.upgrade() {
            if this.closed.load(Ordering::SeqCst) {
                break;
            }
            let round = this.lease / 3;
            if let Err(e) = this.round(&mut seen, round) {
                warn!(group = %this.group, "cannot renew partition leases: {e}");
                this.fence();
            }
            drop(this);
            std::thread::sleep(round);
        }
    }

    /// Stops projecting partitions whose slot could not be rewritten for a whole lease.
    fn fence(&self) {
        let mut state = self.state.lock().unwrap();
        let lease = self.lease;
        let stale: Vec<u32> = state
            .held
            .iter()
            .filter(|(_, at)| at.elapsed() > lease)
            .map(|(p, _)| *p)
            .collect();
        for p in stale {
            state.held.remove(&p);
            state.handover.remove(&p);
            warn!(group = %self.group, partition = p, "lease not renewed in time; stopped projecting the partition");
        }
    }

    fn round(&self, seen: &mut Seen, round: Duration) -> Result<(), KafkaError> {
        let slots = self.read(&self.slots)?;
        let wants = self.read(&self.wants)?;
        let now = Instant::now();
        for (kind, values) in [("lease", &slots), ("want", &wants)] {
            for (p, v) in values.iter().enumerate() {
                let entry = seen.entry((kind, p as u32)).or_insert((*v, now));
                if entry.0 != *v {
                    *entry = (*v, now);
                }
            }
        }
        // The owner of a slot another process keeps rewriting; 0 when free or expired.
        let live = |kind: &'static str, p: u32, values: &[Option<i64>]| -> u32 {
            let v = values[p as usize];
            match seen.get(&(kind, p)) {
                Some((_, since)) if now.duration_since(*since) < self.expiry(v) => owner_of(v),
                _ => 0,
            }
        };

        let mut state = self.state.lock().unwrap();
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Partitions whose slot names someone else were taken over (or reset): let go.
        let lost: Vec<u32> = state
            .held
            .keys()
            .copied()
            .filter(|p| owner_of(slots[*p as usize]) != self.me)
            .collect();
        for p in lost {
            state.held.remove(&p);
            state.handover.remove(&p);
            warn!(group = %self.group, partition = p, "another daemon holds the partition now; stopped projecting it");
        }
        let renew: Vec<u32> = state
            .held
            .keys()
            .copied()
            .filter(|p| !state.handover.contains_key(p))
            .collect();
        let values: Vec<(u32, i64)> = renew
            .iter()
            .map(|&p| (p, self.value(self.me, &mut state)))
            .collect();
        let sent = Instant::now();
        match self.write(&self.slots, &values) {
            Ok(()) => {
                for p in renew {
                    state.held.insert(p, sent);
                }
            }
            Err(e) => {
                drop(state);
                return Err(e);
            }
        }

        // Free slots (never written, expired, or still naming this process) are claimed.
        let free: Vec<u32> = (0..self.partitions)
            .filter(|p| !state.held.contains_key(p) && !state.handover.contains_key(p))
            .filter(|&p| owner_of(slots[p as usize]) == self.me || live("lease", p, &slots) == 0)
            .collect();
        let claims: Vec<(u32, i64)> = free
            .iter()
            .map(|&p| (p, self.value(self.me, &mut state)))
            .collect();
        let claimed_at = Instant::now();
        self.write(&self.slots, &claims)?;
        drop(state);
        if !claims.is_empty() {
            std::thread::sleep((round / 2).min(Duration::from_secs(1)));
            let after = self.read(&self.slots)?;
            let mut state = self.state.lock().unwrap();
            if self.closed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let won: Vec<u32> = claims
                .iter()
                .filter(|(p, v)| after[*p as usize] == Some(*v))
                .map(|(p, _)| *p)
                .collect();
            for &p in &won {
                state.held.insert(p, claimed_at);
            }
            if !won.is_empty() {
                info!(group = %self.group, partitions = ?won, "leased partitions");
            }
        }

        // Balance: hand one partition to a wanter that holds two fewer, or want one.
        if self.exclusive {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap();
        let mine = state.held.len() - state.handover.len();
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for p in 0..self.partitions {
            let owner = live("lease", p, &slots);
            if owner != 0 && owner != self.me {
                *counts.entry(owner).or_default() += 1;
            }
        }
        if state.handover.is_empty() {
            let give = state.held.keys().copied().find_map(|p| {
                let wanter = live("want", p, &wants);
                (wanter != 0
                    && wanter != self.me
                    && mine > counts.get(&wanter).copied().unwrap_or(0) + 1)
                    .then_some((p, wanter))
            });
            if let Some((p, wanter)) = give {
                state.handover.insert(p, wanter);
            }
        }
        let busiest = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(o, n)| (*o, *n));
        if let Some((owner, most)) = busiest {
            if mine + 1 < most {
                let p = (0..self.partitions).find(|&p| live("lease", p, &slots) == owner);
                if let Some(p) = p {
                    let value = self.value(self.me, &mut state);
                    self.write(&self.wants, &[(p, value)])?;
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn partitions(&self) -> u32 {
        self.partitions.load(Ordering::SeqCst)
    }

    fn identity(&self) -> String {
        format!("{BACKEND}:{}", self.config.topic)
    }

    async fn append(&self, events: Vec<Event>) -> Result<(), AppendError> {
        if events.is_empty() {
            return Ok(());
        }
        self.append_acked(events).await.map(|_| ())
    }

    async fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, ReadError> {
        let head = self.head(partition).await?;
        if from >= head || max == 0 {
            return Ok(Vec::new());
        }
        let want = max.min((head - from) as usize);
        let reader = self.reader(partition)?;
        let mut reader = reader.lock().await;
        if reader.next != Some(from) {
            let tpl = self
                .tpl(partition, Offset::Offset(from as i64))
                .map_err(read_err)?;
            reader.consumer.assign(&tpl).map_err(read_err)?;
            reader.next = Some(from);
        }
        let mut out = Vec::with_capacity(want);
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        while out.len() < want {
            // The deadline is the whole read's: only a read that got nothing is unanswered.
            let nothing_yet = out.is_empty();
            let received = self
                .request(
                    "a read",
                    tokio::time::timeout_at(deadline, reader.consumer.recv()),
                    |r| nothing_yet && r.is_err(),
                )
                .await;
            let received = match received {
                Ok(received) => received,
                Err(e) => {
                    reader.next = None;
                    return Err(read_err(e));
                }
            };
            let message = match received {
                Err(_) => break,
                Ok(Err(e)) => {
                    reader.next = None;
                    return Err(read_err(e));
                }
                Ok(Ok(m)) => m,
            };
            let offset = message.offset() as u64;
            if message.partition() != partition as i32 || offset < from {
                continue;
            }
            let event = Event::decode(message.payload().unwrap_or_default()).map(|mut e| {
                e.partition = partition;
                e.offset = offset;
                e
            });
            out.push(Record {
                partition,
                offset,
                event,
            });
            if offset + 1 >= head {
                break;
            }
        }
        if let Some(last) = out.last() {
            reader.next = Some(last.offset + 1);
        } else {
            reader.next = None;
            return Err(read_err(format!(
                "no record of partition {partition} of `{}` arrived within {READ_DEADLINE:?} although the head is {head} and the read started at {from}",
                self.config.topic
            )));
        }
        Ok(out)
    }

    async fn head(&self, partition: u32) -> Result<u64, ReadError> {
        self.read_head(partition, false).await
    }

    async fn head_for_status(&self, partition: u32) -> Result<u64, ReadError> {
        self.read_head(partition, true).await
    }

    async fn wait_beyond(
        &self,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut appended = self.appended.subscribe();
        loop {
            let head = self.head(partition).await?;
            if head > offset || tokio::time::Instant::now() >= deadline {
                return Ok(head);
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + TAIL_POLL),
                appended.changed(),
            )
            .await;
        }
    }

    async fn committed(&self, consumer: &str, partition: u32) -> Result<u64, ReadOffsetError> {
        self.read_committed(consumer, partition, false).await
    }

    async fn committed_for_status(
        &self,
        consumer: &str,
        partition: u32,
    ) -> Result<u64, ReadOffsetError> {
        self.read_committed(consumer, partition, true).await
    }

    async fn commit(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError> {
        self.write_offset(consumer, partition, next, true).await
    }

    async fn seek(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError> {
        self.write_offset(consumer, partition, next, false).await
    }

    async fn connect(&self) -> Result<(), ConnectError> {
        self.ensure_connected().await
    }

    async fn assigned(&self, consumer: &str) -> Result<Vec<u32>, ReadError> {
        self.ensure_connected().await.map_err(read_err)?;
        let leases = self.leases(consumer).map_err(read_err)?;
        // Between two calls the projector has finished (and committed) its batches, so this
        // is where partitions promised to another daemon are let go.
        tokio::task::spawn_blocking(move || leases.hand_over())
            .await
            .map_err(read_err)
    }

    async fn take_all(&self, consumer: &str) -> Result<Vec<u32>, TakeError> {
        let group = self.group_id(consumer);
        let err = |source: BoxError| TakeError::Backend {
            backend: BACKEND,
            group: group.clone(),
            source,
        };
        self.ensure_connected()
            .await
            .map_err(|e| err(Box::new(e)))?;
        if let Some(held) = self.leases.lock().unwrap().get(&group) {
            return Err(err(format!(
                "this process already takes part in the group (holding {:?})",
                held.state.lock().unwrap().held.keys().collect::<Vec<_>>()
            )
            .into()));
        }
        let leases = Arc::new(
            Leases::new(&self.config, &group, self.partitions(), &self.context, true)
                .map_err(|e| err(boxed(e)))?,
        );
        let taking = leases.clone();
        let watching = CloseOnDrop(Some(leases.clone()));
        let taken = tokio::task::spawn_blocking(move || taking.take_all())
            .await
            .map_err(|e| err(boxed(e)))?
            .map_err(|e| err(boxed(e)))?;
        watching.disarm();
        match taken {
            Taken::All(all) => {
                Leases::start(&leases).map_err(|e| err(boxed(e)))?;
                self.leases.lock().unwrap().insert(group, leases);
                Ok(all)
            }
            Taken::Held {
                partitions,
                holders,
            } => Err(TakeError::Held {
                group,
                topic: self.config.topic.clone(),
                partitions,
                holders,
            }),
            Taken::Abandoned => Err(err("stopped waiting for the partition leases".into())),
        }
    }

    async fn release(&self) -> Result<(), ReleaseError> {
        let all: Vec<Arc<Leases>> = self.leases.lock().unwrap().values().cloned().collect();
        for leases in all {
            let group = leases.group.clone();
            let err = |source: BoxError| ReleaseError::Backend {
                backend: BACKEND,
                group: group.clone(),
                source,
            };
            if self.gave_up.get().is_some() {
                // The run's error already says why; no waiting for the brokers again.
                leases.closed.store(true, Ordering::SeqCst);
                return Err(err(format!(
                    "the Kafka brokers {} are gone or stopped answering",
                    self.config.brokers
                )
                .into()));
            }
            let held = tokio::task::spawn_blocking(move || leases.release())
                .await
                .map_err(|e| err(boxed(e)))?
                .map_err(|e| err(boxed(e)))?;
            if !held.is_empty() {
                info!(group = %group, partitions = ?held, "released the partition leases; another daemon may take them at once");
            }
        }
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn offsets_home(&self, consumer: &str) -> Option<String> {
        Some(self.group_id(consumer))
    }

    fn partition_of(&self, identity: &str) -> u32 {
        partition_for(identity, self.partitions())
    }
}
