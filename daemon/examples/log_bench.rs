//! Event log throughput (issue 4): append and read events/s of 1 KiB events for `SledLog`
//! and `KafkaLog`, side by side with their ceilings on the same machine — raw sequential
//! file appends with one fsync per batch (sled's disk) and a plain rdkafka producer and
//! consumer on the same broker (Kafka's). Run it through `ops/bench/log.sh`.
//!
//! Usage: `log_bench BROKERS [EVENTS] [BATCH]`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tidemark::config::KafkaLogConfig;
use tidemark::log::{EventLog, KafkaLog, SledLog};
use tidemark::proto::Event;

/// One event whose encoded form is 1 KiB.
fn event(i: usize) -> Event {
    let mut e = Event::decode(
        serde_json::json!({
            "v": 1, "pipeline": "bench", "offset": 0, "kind": "file",
            "key": format!("bench/{i:08}.txt"), "op": "upsert",
            "checksum": tidemark::proto::checksum_bytes(&i.to_le_bytes()),
            "observed_at": "2024-01-01T00:00:00Z", "scan": "bench",
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let len = e.encode().len();
    e.name = Some("x".repeat(1024usize.saturating_sub(len + 10)));
    e
}

fn rate(n: usize, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

fn kafka_config(brokers: &str, name: &str) -> KafkaLogConfig {
    KafkaLogConfig {
        brokers: brokers.to_owned(),
        topic: name.to_owned(),
        partitions: 1,
        replication: 1,
        cleanup_policy: "delete".into(),
        group: name.to_owned(),
        session_timeout: Duration::from_secs(10),
        properties: BTreeMap::new(),
        secret_properties: Vec::new(),
    }
}

async fn bench_log(log: Arc<dyn EventLog>, events: &[Event], batch: usize) -> (f64, f64) {
    log.connect().await.unwrap();
    let t0 = Instant::now();
    for chunk in events.chunks(batch) {
        log.append(chunk.to_vec()).await.unwrap();
    }
    let append = rate(events.len(), t0.elapsed());
    let t0 = Instant::now();
    let mut n = 0;
    for p in 0..log.partitions() {
        let head = log.head(p).await.unwrap();
        let mut from = 0;
        while from < head {
            let records = log.read(p, from, batch).await.unwrap();
            from = records.last().unwrap().offset + 1;
            n += records.len();
        }
    }
    assert_eq!(n, events.len());
    (append, rate(n, t0.elapsed()))
}

fn bench_file(payloads: &[Vec<u8>], batch: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.log");
    let mut f = std::fs::File::create(&path).unwrap();
    let t0 = Instant::now();
    for chunk in payloads.chunks(batch) {
        for p in chunk {
            f.write_all(&(p.len() as u32).to_le_bytes()).unwrap();
            f.write_all(p).unwrap();
        }
        f.sync_data().unwrap();
    }
    let append = rate(payloads.len(), t0.elapsed());
    let t0 = Instant::now();
    let bytes = std::fs::read(&path).unwrap();
    let (mut at, mut n) = (0, 0);
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let _ = Event::decode(&bytes[at + 4..at + 4 + len]).unwrap();
        at += 4 + len;
        n += 1;
    }
    (append, rate(n, t0.elapsed()))
}

async fn bench_plain_kafka(brokers: &str, payloads: &[Vec<u8>], batch: usize) -> (f64, f64) {
    let topic = format!("bench-plain-{}", std::process::id());
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // Same topic settings as KafkaLog creates.
    let log = KafkaLog::new(
        &kafka_config(brokers, &topic),
        "bench",
        tidemark::log::Patience::Daemon,
    )
    .unwrap();
    log.connect().await.unwrap();
    let t0 = Instant::now();
    for chunk in payloads.chunks(batch) {
        let pending: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let key = format!("file/bench/{i}");
                producer
                    .send_result(FutureRecord::to(&topic).key(&key).payload(p).partition(0))
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        for d in pending {
            d.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
    let append = rate(payloads.len(), t0.elapsed());
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(0))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let t0 = Instant::now();
    let mut n = 0;
    while n < payloads.len() {
        let m = consumer.recv().await.unwrap();
        let _ = Event::decode(m.payload().unwrap()).unwrap();
        n += 1;
    }
    (append, rate(n, t0.elapsed()))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args
        .get(1)
        .expect("usage: log_bench BROKERS [EVENTS] [BATCH]")
        .clone();
    let n: usize = args.get(2).map_or(20_000, |s| s.parse().unwrap());
    let batch: usize = args.get(3).map_or(1000, |s| s.parse().unwrap());
    let events: Vec<Event> = (0..n).map(event).collect();
    let payloads: Vec<Vec<u8>> = events.iter().map(Event::encode).collect();
    let size = payloads.iter().map(Vec::len).sum::<usize>() / n;
    println!("{n} events of {size} bytes, batches of {batch}");

    let file = bench_file(&payloads, batch);
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .unwrap();
    let sled = bench_log(
        Arc::new(SledLog::open(&db, "bench").unwrap()),
        &events,
        batch,
    )
    .await;
    let plain = bench_plain_kafka(&brokers, &payloads, batch).await;
    let topic = format!("bench-log-{}", std::process::id());
    let kafka = bench_log(
        Arc::new(
            KafkaLog::new(
                &kafka_config(&brokers, &topic),
                "bench",
                tidemark::log::Patience::Daemon,
            )
            .unwrap(),
        ),
        &events,
        batch,
    )
    .await;

    println!("| log | append events/s | read events/s |");
    println!("|---|---:|---:|");
    for (name, (a, r)) in [
        ("raw file appends, fsync per batch", file),
        ("SledLog", sled),
        ("plain rdkafka producer/consumer", plain),
        ("KafkaLog", kafka),
    ] {
        println!("| {name} | {a:.0} | {r:.0} |");
    }
    println!(
        "SledLog / raw file: append {:.0}%, read {:.0}% (target ≥ 50%)",
        100.0 * sled.0 / file.0,
        100.0 * sled.1 / file.1
    );
    println!(
        "KafkaLog / plain rdkafka: append {:.0}%, read {:.0}% (target ≥ 80%)",
        100.0 * kafka.0 / plain.0,
        100.0 * kafka.1 / plain.1
    );
}
