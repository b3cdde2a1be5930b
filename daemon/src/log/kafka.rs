//! The Kafka event log: one topic per pipeline, an idempotent producer, records keyed by
//! kind/key, committed offsets kept in a consumer group whose members split the partitions.
//!
//! Pieces, each a librdkafka client:
//! - the **producer** (`enable.idempotence`, `acks=all`) appends; an append returns once the
//!   broker acknowledged every record of the batch;
//! - one **reader** per partition reads by position (`assign` at an offset, never a group),
//!   so reading is independent of membership and of committed offsets;
//! - one **group client** per consumer name keeps committed offsets. It commits as a plain
//!   client until its owner calls [`EventLog::assigned`]; from then on it is a member of the
//!   group (subscribed, its partitions paused so it never fetches) and the group decides
//!   which partitions this process projects. A member only commits partitions it holds.
//!
//! A consumer name maps to a Kafka group: the pipeline's projector (`<pipeline>.projector`)
//! uses the configured `group`; any other name `c` uses `<group>.<c>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tidemark_proto::Event;
use tokio::sync::{watch, Mutex, OnceCell};
use tracing::{info, warn};

use super::{AppendError, BoxError, CommitError, EventLog, ReadError, ReadOffsetError, Record};
use crate::config::KafkaLogConfig;

const BACKEND: &str = "kafka";

/// Deadline of one request to the brokers (metadata, watermarks, offsets).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits for records it knows exist (below the high watermark).
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// How often tailing readers look at the high watermark when no local append woke them.
const TAIL_POLL: Duration = Duration::from_millis(100);

/// The Kafka-backed [`EventLog`].
pub struct KafkaLog {
    config: KafkaLogConfig,
    /// Consumer name of the pipeline's projector; it keeps its offsets in `config.group`.
    projector: String,
    producer: FutureProducer,
    /// Answers watermark queries; never subscribes, never commits.
    meta: Arc<BaseConsumer>,
    /// Partition count: the configured one until [`KafkaLog::connect`] reads the topic's.
    partitions: AtomicU32,
    /// Set once the brokers answered and the topic exists.
    connected: OnceCell<()>,
    readers: SyncMutex<HashMap<u32, Arc<Mutex<Reader>>>>,
    groups: SyncMutex<HashMap<String, Arc<Group>>>,
    /// Bumped after each local append so tailing readers in this process wake at once.
    appended: watch::Sender<u64>,
}

/// A positional reader of one partition.
struct Reader {
    consumer: StreamConsumer,
    /// Offset the next record received will have, when the consumer is positioned.
    next: Option<u64>,
}

/// The client that keeps one consumer group's committed offsets.
struct Group {
    id: String,
    consumer: Arc<BaseConsumer<MemberContext>>,
    /// Set once the client subscribed and is a member of the group.
    joined: AtomicBool,
    /// Tells the polling thread of a member to stop.
    stop: Arc<AtomicBool>,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Rebalance hooks of a group member: pause every assigned partition (a member keeps
/// offsets, it does not fetch; readers do) and log what changed.
struct MemberContext {
    group: String,
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                info!(group = %self.group, partitions = ?parts, "consumer group assigned partitions");
                if let Err(e) = consumer.pause(tpl) {
                    warn!(group = %self.group, "cannot pause assigned partitions: {e}");
                }
            }
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                info!(group = %self.group, partitions = ?parts, "consumer group revoked partitions");
            }
            Rebalance::Error(e) => {
                warn!(group = %self.group, "consumer group rebalance failed: {e}")
            }
        }
    }
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
    pub fn new(config: &KafkaLogConfig, pipeline: &str) -> Result<KafkaLog, ReadError> {
        let producer: FutureProducer = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .map_err(read_err)?;
        let meta: BaseConsumer = client_config(config)
            .set("group.id", format!("{}.meta", config.group))
            .set("enable.auto.commit", "false")
            .create()
            .map_err(read_err)?;
        Ok(KafkaLog {
            config: config.clone(),
            projector: format!("{pipeline}.projector"),
            producer,
            meta: Arc::new(meta),
            partitions: AtomicU32::new(config.partitions),
            connected: OnceCell::new(),
            readers: SyncMutex::new(HashMap::new()),
            groups: SyncMutex::new(HashMap::new()),
            appended: watch::channel(0).0,
        })
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

    async fn ensure_connected(&self) -> Result<(), ReadError> {
        self.connected
            .get_or_try_init(|| self.create_topic())
            .await
            .map(|_| ())
    }

    /// Creates the topic unless it exists, then reads its partition count.
    async fn create_topic(&self) -> Result<(), ReadError> {
        let unreachable = |e: KafkaError| {
            read_err(format!(
                "cannot reach the Kafka brokers {} ({e}); check `brokers` in [pipeline.log.kafka] and that the broker runs",
                self.config.brokers
            ))
        };
        // Metadata first: it fails fast and clearly when no broker answers.
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || meta.fetch_metadata(None, REQUEST_TIMEOUT))
            .await
            .map_err(read_err)?
            .map_err(unreachable)?;
        let admin: AdminClient<DefaultClientContext> =
            client_config(&self.config).create().map_err(read_err)?;
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
            .map_err(unreachable)?;
        for result in results {
            match result {
                Ok(name) => info!(topic = %name, partitions, "created the Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(read_err(format!(
                        "cannot create the Kafka topic `{name}`: {code}; create it by hand or fix the broker's permissions"
                    )))
                }
            }
        }
        let count = self.topic_partitions().await?;
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
            match delivery.await {
                Ok(Ok(d)) => landed.push((d.partition as u32, d.offset as u64)),
                Ok(Err((e, _))) => return Err(err(boxed(e))),
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
        let consumer: StreamConsumer = client_config(&self.config)
            .set("group.id", format!("{}.reader", self.config.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .create()
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
        let timeout_ms = self.config.session_timeout.as_millis().max(1000);
        let client: BaseConsumer<MemberContext> = client_config(&self.config)
            .set("group.id", &id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("session.timeout.ms", timeout_ms.to_string())
            .set("heartbeat.interval.ms", (timeout_ms / 4).to_string())
            .set("partition.assignment.strategy", "roundrobin")
            .create_with_context(MemberContext { group: id.clone() })?;
        let g = Arc::new(Group {
            id: id.clone(),
            consumer: Arc::new(client),
            joined: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
        });
        groups.insert(id, g.clone());
        Ok(g)
    }

    /// Subscribes the group client and starts the thread that keeps its membership alive
    /// (heartbeats and rebalances are served by polling).
    fn join(&self, group: &Group) -> Result<(), BoxError> {
        if group.joined.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        group.consumer.subscribe(&[&self.config.topic])?;
        let (consumer, stop, id) = (group.consumer.clone(), group.stop.clone(), group.id.clone());
        std::thread::Builder::new()
            .name(format!("kafka-group-{id}"))
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // Partitions are paused, so this serves rebalances and returns no records
                    // (a record fetched before the pause took effect is dropped: readers read).
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                        warn!(group = %id, "consumer group: {e}");
                    }
                }
                consumer.unsubscribe();
            })?;
        Ok(())
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
        let group = self.group(consumer).map_err(err)?;
        if group.joined.load(Ordering::SeqCst) {
            // A member commits only what it holds: after a rebalance another daemon owns
            // the partition and re-applies from its committed offset (without duplicate
            // effect), so a late commit from here must not move it.
            let held = group
                .consumer
                .assignment()
                .map_err(|e| err(boxed(e)))?
                .elements_for_topic(&self.config.topic)
                .iter()
                .any(|e| e.partition() == partition as i32);
            if !held {
                return Err(err(format!(
                    "partition {partition} is no longer assigned to this daemon in group `{}`; its new owner continues from the last committed offset",
                    group.id
                )
                .into()));
            }
        }
        let tpl = self
            .tpl(partition, Offset::Offset(next as i64))
            .map_err(|e| err(boxed(e)))?;
        let client = group.consumer.clone();
        tokio::task::spawn_blocking(move || client.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| err(boxed(e)))?
            .map_err(|e| err(boxed(e)))
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
    c
}

#[async_trait]
impl EventLog for KafkaLog {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn partitions(&self) -> u32 {
        self.partitions.load(Ordering::SeqCst)
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
            let received = tokio::time::timeout_at(deadline, reader.consumer.recv()).await;
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
        self.ensure_connected().await?;
        let (meta, topic) = (self.meta.clone(), self.config.topic.clone());
        let (_, high) = tokio::task::spawn_blocking(move || {
            meta.fetch_watermarks(&topic, partition as i32, REQUEST_TIMEOUT)
        })
        .await
        .map_err(read_err)?
        .map_err(read_err)?;
        Ok(high.max(0) as u64)
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
        let offsets =
            tokio::task::spawn_blocking(move || client.committed_offsets(tpl, REQUEST_TIMEOUT))
                .await
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

    async fn commit(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError> {
        self.write_offset(consumer, partition, next, true).await
    }

    async fn seek(&self, consumer: &str, partition: u32, next: u64) -> Result<(), CommitError> {
        self.write_offset(consumer, partition, next, false).await
    }

    async fn connect(&self) -> Result<(), ReadError> {
        self.ensure_connected().await
    }

    async fn assigned(&self, consumer: &str) -> Result<Vec<u32>, ReadError> {
        self.ensure_connected().await?;
        let group = self.group(consumer).map_err(read_err)?;
        self.join(&group).map_err(read_err)?;
        let assignment = group.consumer.assignment().map_err(read_err)?;
        let mut parts: Vec<u32> = assignment
            .elements_for_topic(&self.config.topic)
            .iter()
            .map(|e| e.partition() as u32)
            .collect();
        parts.sort_unstable();
        Ok(parts)
    }

    fn shared(&self) -> bool {
        true
    }

    fn partition_of(&self, identity: &str) -> u32 {
        partition_for(identity, self.partitions())
    }
}
