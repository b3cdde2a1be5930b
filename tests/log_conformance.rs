//! The event log conformance suite (issue 4): one set of cases, written once against the
//! `EventLog` trait, run on every backend — `SledLog` on a fresh database and `KafkaLog` on
//! a fresh topic of the broker `ops/peers/kafka.sh start` runs (`TIDEMARK_KAFKA_BROKERS`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark::config::KafkaLogConfig;
use tidemark::log::{EventLog, KafkaLog, Record, SledLog};
use tidemark::proto::Event;

/// A backend under test: opens its log, and opens it again as a restarted process would.
trait Backend {
    /// Opens the log; the previous handle must have been dropped (a process restart).
    fn open(&self) -> Arc<dyn EventLog>;
}

/// A sled database in a temporary directory.
struct Sled {
    dir: tempfile::TempDir,
}

impl Sled {
    fn new() -> Sled {
        Sled {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Backend for Sled {
    fn open(&self) -> Arc<dyn EventLog> {
        let db = sled::Config::new()
            .path(self.dir.path().join("db"))
            .open()
            .unwrap();
        Arc::new(SledLog::open(&db, "t").unwrap())
    }
}

/// A fresh topic and group on the test broker.
struct Kafka {
    config: KafkaLogConfig,
}

impl Kafka {
    fn new(partitions: u32) -> Kafka {
        let name = common::unique("conformance");
        Kafka {
            config: KafkaLogConfig {
                brokers: common::kafka_brokers(),
                topic: name.clone(),
                partitions,
                replication: 1,
                cleanup_policy: "delete".into(),
                group: name,
                session_timeout: Duration::from_secs(6),
                properties: BTreeMap::new(),
                secret_properties: Vec::new(),
            },
        }
    }
}

impl Backend for Kafka {
    fn open(&self) -> Arc<dyn EventLog> {
        Arc::new(KafkaLog::new(&self.config, "t", tidemark::log::Patience::Daemon).unwrap())
    }
}

/// An upsert of `key` whose content is `content`.
fn event(key: &str, content: &str) -> Event {
    let json = serde_json::json!({
        "v": 1,
        "pipeline": "t",
        "offset": 0,
        "kind": "file",
        "key": key,
        "op": "upsert",
        "checksum": tidemark::proto::checksum_bytes(content.as_bytes()),
        "observed_at": "2024-01-01T00:00:00Z",
        "scan": "s1",
    });
    Event::decode(json.to_string().as_bytes()).expect("test events are valid")
}

fn ok(record: &Record) -> &Event {
    record.event.as_ref().expect("records decode")
}

/// Every record of every partition, read from offset 0 in batches of 7.
async fn read_all(log: &dyn EventLog) -> Vec<Record> {
    let mut out = Vec::new();
    for p in 0..log.partitions() {
        let head = log.head(p).await.unwrap();
        let mut from = 0;
        while from < head {
            let batch = log.read(p, from, 7).await.unwrap();
            let last = batch
                .last()
                .expect("records below the head are readable")
                .offset;
            assert!(batch.len() <= 7);
            from = last + 1;
            out.extend(batch);
        }
    }
    out
}

async fn append_read_order(b: &dyn Backend) {
    let log = b.open();
    log.connect().await.unwrap();
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for batch in 0..3 {
        let events: Vec<Event> = (0..10)
            .map(|i| {
                let (key, content) = (format!("k{}", i % 4), format!("{batch}-{i}"));
                expected
                    .entry(key.clone())
                    .or_default()
                    .push(content.clone());
                event(&key, &content)
            })
            .collect();
        log.append(events).await.unwrap();
    }
    let records = read_all(&*log).await;
    assert_eq!(records.len(), 30);
    let mut heads = 0;
    for p in 0..log.partitions() {
        let offsets: Vec<u64> = records
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.offset)
            .collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "offsets grow: {offsets:?}"
        );
        heads += log.head(p).await.unwrap();
    }
    assert_eq!(heads, 30, "heads sum to the records appended");
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &records {
        let e = ok(r);
        assert_eq!(
            (e.partition, e.offset),
            (r.partition, r.offset),
            "events carry their position"
        );
        assert_eq!(
            r.partition,
            log.partition_of(&e.identity()),
            "an item has one partition"
        );
        seen.entry(e.key.clone())
            .or_default()
            .push(e.checksum.clone());
    }
    let expected: BTreeMap<String, Vec<String>> = expected
        .into_iter()
        .map(|(k, v)| {
            let sums = v
                .iter()
                .map(|c| tidemark::proto::checksum_bytes(c.as_bytes()))
                .collect();
            (k, sums)
        })
        .collect();
    assert_eq!(
        seen, expected,
        "every key's events come back in append order"
    );
}

async fn durable_across_reopen(b: &dyn Backend) {
    let log = b.open();
    log.append((0..12).map(|i| event(&format!("d{i}"), "x")).collect())
        .await
        .unwrap();
    let before: Vec<(u32, u64, String)> = read_all(&*log)
        .await
        .iter()
        .map(|r| (r.partition, r.offset, ok(r).key.clone()))
        .collect();
    drop(log);
    let log = b.open();
    let after: Vec<(u32, u64, String)> = read_all(&*log)
        .await
        .iter()
        .map(|r| (r.partition, r.offset, ok(r).key.clone()))
        .collect();
    assert_eq!(before.len(), 12);
    assert_eq!(
        before, after,
        "a reopened log holds what was appended, where it was"
    );
    // Offsets keep growing after the restart.
    log.append(vec![event("d0", "y")]).await.unwrap();
    let p = log.partition_of(&event("d0", "y").identity());
    let last = log.read(p, 0, 100).await.unwrap().pop().unwrap();
    assert!(before.iter().all(|(q, o, _)| *q != p || *o < last.offset));
}

async fn committed_offsets(b: &dyn Backend) {
    let log = b.open();
    log.append((0..10).map(|i| event(&format!("c{i}"), "x")).collect())
        .await
        .unwrap();
    let p = log.partition_of(&event("c0", "x").identity());
    assert_eq!(
        log.committed("alpha", p).await.unwrap(),
        0,
        "never committed: 0"
    );
    log.commit("alpha", p, 2).await.unwrap();
    assert_eq!(log.committed("alpha", p).await.unwrap(), 2);
    log.commit("alpha", p, 1).await.unwrap();
    assert_eq!(
        log.committed("alpha", p).await.unwrap(),
        2,
        "commit never moves back"
    );
    assert_eq!(
        log.committed("beta", p).await.unwrap(),
        0,
        "consumers are independent"
    );
    drop(log);
    let log = b.open();
    assert_eq!(
        log.committed("alpha", p).await.unwrap(),
        2,
        "committed offsets survive a restart"
    );
}

async fn tailing(b: &dyn Backend) {
    let log = b.open();
    let e = event("tail", "1");
    let p = log.partition_of(&e.identity());
    log.append(vec![e]).await.unwrap();
    let head = log.head(p).await.unwrap();

    let t0 = Instant::now();
    let same = log
        .wait_beyond(p, head, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(same, head, "nothing appended: the head is unchanged");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "it waited for the timeout"
    );

    let waiter = {
        let log = log.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let h = log
                .wait_beyond(p, head, Duration::from_secs(20))
                .await
                .unwrap();
            (h, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    log.append(vec![event("tail", "2")]).await.unwrap();
    let (h, waited) = waiter.await.unwrap();
    assert!(h > head, "the waiter saw the new head");
    assert!(
        waited < Duration::from_secs(10),
        "it woke soon after the append: {waited:?}"
    );
    let tail = log.read(p, head, 10).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(ok(&tail[0]).checksum, tidemark::proto::checksum_bytes(b"2"));
}

async fn replay_from_an_offset(b: &dyn Backend) {
    let log = b.open();
    log.append((0..6).map(|i| event("same", &i.to_string())).collect())
        .await
        .unwrap();
    let p = log.partition_of(&event("same", "0").identity());
    let head = log.head(p).await.unwrap();
    log.commit("proj", p, head).await.unwrap();
    log.seek("proj", p, head - 4).await.unwrap();
    assert_eq!(
        log.committed("proj", p).await.unwrap(),
        head - 4,
        "seek moves back"
    );
    let again = log.read(p, head - 4, 100).await.unwrap();
    let contents: Vec<String> = again.iter().map(|r| ok(r).checksum.clone()).collect();
    let expected: Vec<String> = (2..6)
        .map(|i: i32| tidemark::proto::checksum_bytes(i.to_string().as_bytes()))
        .collect();
    assert_eq!(
        contents, expected,
        "a replay reads the same events again, in order"
    );
    assert_eq!(again[0].offset, head - 4);
    // Reading an earlier position after a later one works (readers are positional).
    let first = log.read(p, head - 6, 1).await.unwrap();
    assert_eq!(first[0].offset, head - 6);
}

async fn concurrent_appenders(b: &dyn Backend) {
    let log = b.open();
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                for batch in 0..5 {
                    let events = (0..10)
                        .map(|i| event(&format!("w{w}"), &format!("{batch:02}-{i:02}")))
                        .collect();
                    log.append(events).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let records = read_all(&*log).await;
    assert_eq!(records.len(), 200, "every event landed once");
    let positions: BTreeSet<(u32, u64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(positions.len(), 200, "no two events share a position");
    for w in 0..4 {
        let key = format!("w{w}");
        let got: Vec<String> = records
            .iter()
            .filter(|r| ok(r).key == key)
            .map(|r| ok(r).checksum.clone())
            .collect();
        let want: Vec<String> = (0..5)
            .flat_map(|b| (0..10).map(move |i| format!("{b:02}-{i:02}")))
            .map(|c| tidemark::proto::checksum_bytes(c.as_bytes()))
            .collect();
        assert_eq!(got, want, "appender {w}'s events are in its order");
    }
}

/// Batches larger than a backend's storage unit (a sled chunk holds about 6 KiB), read
/// after a restart from every offset, the middle of an earlier batch included.
async fn read_from_any_offset_after_reopen(b: &dyn Backend) {
    let log = b.open();
    let big = |i: usize| {
        let mut e = event(&format!("m{i}"), &i.to_string());
        e.name = Some(format!("{i}-").repeat(100));
        e
    };
    log.append((0..100).map(big).collect()).await.unwrap();
    log.append((100..105).map(big).collect()).await.unwrap();
    drop(log);
    let log = b.open();
    let all = read_all(&*log).await;
    assert_eq!(all.len(), 105, "every event is there after the restart");
    for p in 0..log.partitions() {
        let records: Vec<(u64, String)> = all
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| (r.offset, ok(r).key.clone()))
            .collect();
        for (i, (from, _)) in records.iter().enumerate() {
            let got: Vec<(u64, String)> = log
                .read(p, *from, 7)
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    assert_eq!(ok(r).offset, r.offset, "events carry their offset");
                    (r.offset, ok(r).key.clone())
                })
                .collect();
            let want = &records[i..records.len().min(i + 7)];
            assert_eq!(got, want, "reading from offset {from} of partition {p}");
        }
    }
    for r in &all {
        let i: usize = ok(r).key[1..].parse().unwrap();
        assert_eq!(ok(r).name, big(i).name, "event {i} comes back whole");
    }
}

/// The same cases for every backend: `conformance!(module, backend constructor)`.
macro_rules! conformance {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn append_read_order() {
                super::append_read_order(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn durable_across_reopen() {
                super::durable_across_reopen(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn committed_offsets() {
                super::committed_offsets(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tailing() {
                super::tailing(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replay_from_an_offset() {
                super::replay_from_an_offset(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_appenders() {
                super::concurrent_appenders(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn read_from_any_offset_after_reopen() {
                super::read_from_any_offset_after_reopen(&$backend).await;
            }
        }
    };
}

conformance!(sled_log, Sled::new());
conformance!(kafka_log, Kafka::new(3));
