//! The directory mirror end to end on the Kafka backend (issue 4): the real binary, real
//! directories, a fresh topic and group on the broker `ops/peers/kafka.sh start` runs.

mod common;

use std::time::Duration;

use common::*;

fn kafka_env(partitions: u32) -> (Env, String) {
    let brokers = kafka_brokers();
    let topic = unique("mirror");
    let env = Env::dirs(
        &kafka_log_section(&brokers, &topic, &topic, partitions),
        "prune = true",
    );
    (env, topic)
}

#[test]
fn issue_4_mirrors_a_tree_through_kafka() {
    let (env, _topic) = kafka_env(3);
    let src = env.src();
    write(src.join("top.txt"), "top level\n");
    write(src.join("a/b/c/deep.txt"), "nested\n");
    write(src.join("unicode/naïve café ✓.txt"), "ünïcödé\n");
    for i in 0..40 {
        write(src.join(format!("many/f{i:03}.txt")), format!("file {i}\n"));
    }
    let (scan, project) = env.sync();
    assert_eq!(scan["errors"], 0, "{scan}");
    assert_eq!(kind_outcome(&project, "file", "created"), 43, "{project}");
    assert_mirror(&src, &env.dst());

    // Nothing changed: nothing appended, nothing applied.
    let (scan, project) = env.sync();
    assert_eq!(scan["upserts"], 0, "{scan}");
    assert_eq!(project["events"], 0, "{project}");

    // A change and a file delete travel through the topic too.
    write(src.join("top.txt"), "changed\n");
    std::fs::remove_file(src.join("many/f007.txt")).unwrap();
    let (_, project) = env.sync();
    assert_eq!(kind_outcome(&project, "file", "updated"), 1, "{project}");
    assert_eq!(kind_outcome(&project, "file", "deleted"), 1, "{project}");
    assert_mirror(&src, &env.dst());

    let status = env.json(&["status"]);
    assert_eq!(status[0]["log"], "kafka", "{status}");
    assert_eq!(status[0]["lag_events"], 0, "{status}");
}

#[test]
fn issue_4_daemon_tails_kafka_and_lag_returns_to_zero() {
    let (env, _topic) = kafka_env(3);
    write(env.src().join("first.txt"), "1\n");
    let daemon = env.spawn_daemon();
    let ready = wait_for(Duration::from_secs(60), || {
        (daemon.get("/readyz").status() == 200).then_some(())
    });
    assert!(
        ready.is_some(),
        "daemon not ready; log:\n{}",
        env.daemon_log()
    );
    for i in 0..20 {
        write(env.src().join(format!("d/{i}.txt")), format!("{i}\n"));
    }
    let mirrored = wait_for(Duration::from_secs(60), || {
        mirrors_now(&env.src(), &env.dst()).then_some(())
    });
    assert!(mirrored.is_some(), "no mirror; log:\n{}", env.daemon_log());
    let caught_up = wait_for(Duration::from_secs(30), || {
        (daemon.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "lag stays above 0: {:?}",
        daemon.metrics()
    );
    assert!(daemon.terminate().success(), "log:\n{}", env.daemon_log());
}

/// Lag is shown per partition as well as summed: a stalled partition must be visible even
/// when the pipeline's total is dominated by the others.
#[test]
fn issue_4_status_and_metrics_show_lag_per_partition() {
    let (env, _topic) = kafka_env(3);
    for i in 0..30 {
        write(env.src().join(format!("f{i:02}.txt")), format!("{i}\n"));
    }
    let scanned = env.json(&["scan"]);
    assert_eq!(scanned[0]["scan"]["upserts"], 30, "{scanned}");

    // Scanned, not projected: every partition's lag is its share of the 30 events.
    let status = env.json(&["status"]);
    let parts = status[0]["partitions"]
        .as_array()
        .expect("partitions listed");
    assert_eq!(parts.len(), 3, "{status}");
    let lags: Vec<u64> = parts
        .iter()
        .map(|p| p["lag_events"].as_u64().unwrap())
        .collect();
    assert_eq!(lags.iter().sum::<u64>(), 30, "{status}");
    assert_eq!(status[0]["lag_events"], 30, "{status}");
    assert!(
        lags.iter().filter(|&&l| l > 0).count() >= 2,
        "30 keys should spread over partitions: {lags:?}"
    );
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["partition"], i, "{status}");
        assert_eq!(
            p["head"].as_u64().unwrap() - p["committed"].as_u64().unwrap(),
            lags[i],
            "{status}"
        );
        if lags[i] > 0 {
            assert!(p["lag_seconds"].as_f64().unwrap() >= 0.0, "{status}");
        }
    }
    let text = String::from_utf8(env.run(&["status"]).stdout).unwrap();
    for (i, lag) in lags.iter().enumerate() {
        assert!(
            text.contains(&format!("partition {i}: "))
                && text.contains(&format!("lag {lag} events")),
            "status text lacks partition {i}:\n{text}"
        );
    }

    // The daemon projects them; each partition's series returns to 0.
    let daemon = env.spawn_daemon();
    let series = |m: &std::collections::BTreeMap<String, f64>, p: u32| {
        m.iter()
            .find(|(k, _)| {
                k.starts_with("tidemark_partition_lag_events{")
                    && k.contains(&format!("partition=\"{p}\""))
                    && k.contains("pipeline=\"t\"")
            })
            .map(|(_, v)| *v)
    };
    let caught_up = wait_for(Duration::from_secs(60), || {
        let m = daemon.metrics();
        (0..3).all(|p| series(&m, p) == Some(0.0)).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "per-partition lag did not return to 0: {:?}\nlog:\n{}",
        daemon.metrics(),
        env.daemon_log()
    );
    assert_mirror(&env.src(), &env.dst());
    assert!(daemon.terminate().success(), "log:\n{}", env.daemon_log());
}

#[test]
fn issue_4_invalid_records_are_reported_and_skipped() {
    let (env, topic) = kafka_env(1);
    write(env.src().join("good.txt"), "ok\n");
    env.sync();
    // Garbage and a future schema version, written by another producer.
    produce_raw(
        &topic,
        &[
            b"not json at all".to_vec(),
            br#"{"v":99,"kind":"file"}"#.to_vec(),
        ],
    );
    write(env.src().join("after.txt"), "after\n");
    let out = env.cmd(&["sync", "--output", "json"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        kind_outcome(&v[0]["project"], "invalid", "failed"),
        2,
        "{v}"
    );
    assert_eq!(kind_outcome(&v[0]["project"], "file", "created"), 1, "{v}");
    let reported: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("not a valid event"))
        .collect();
    assert_eq!(reported.len(), 2, "{stderr}");
    assert!(
        reported
            .iter()
            .all(|l| l.contains("partition=0") && l.contains("offset=")),
        "{stderr}"
    );
    assert!(stderr.contains("schema version 99"), "{stderr}");
    assert_mirror(&env.src(), &env.dst());
}

/// The daemon's failure alert (`increase(tidemark_applies_total{outcome="failed"}[15m])`)
/// sees the first invalid record of a process: the `invalid` kind's `failed` series is
/// there at 0 from start-up, not created at 1 by the record (which `increase` ignores).
#[test]
fn a_daemons_first_invalid_record_moves_a_series_that_was_at_zero() {
    let (env, topic) = kafka_env(1);
    write(env.src().join("good.txt"), "ok\n");
    env.sync();
    let daemon = env.spawn_daemon();
    let invalid = "tidemark_applies_total{kind=\"invalid\",outcome=\"failed\",pipeline=\"t\"}";
    assert_eq!(daemon.metric(invalid), 0.0, "{:?}", daemon.metrics());

    produce_raw(&topic, &[b"not json at all".to_vec()]);
    let counted = wait_for(Duration::from_secs(30), || {
        (daemon.metric(invalid) == 1.0).then_some(())
    });
    assert!(
        counted.is_some(),
        "{:?}\n{}",
        daemon.metrics(),
        env.daemon_log()
    );
    assert_eq!(
        daemon.metric("tidemark_log_decode_errors_total{pipeline=\"t\"}"),
        1.0
    );
    assert!(daemon.terminate().success(), "{}", env.daemon_log());
}

/// Appends raw bytes to partition 0 of `topic` with a plain rdkafka producer.
fn produce_raw(topic: &str, payloads: &[Vec<u8>]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    for p in payloads {
        producer
            .send(BaseRecord::<(), _>::to(topic).payload(p).partition(0))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Several partitions do not order the events of different items: a directory's delete
/// can be read before the deletes of the files inside it. The directory must still be gone
/// after one `sync`, and only once it is empty.
#[test]
fn deleting_directory_trees_across_partitions_leaves_no_empty_directories() {
    let brokers = kafka_brokers();
    let topic = unique("dirdel");
    let env = Env::dirs(
        &format!(
            "max_delete = \"100%\"\n{}",
            kafka_log_section(&brokers, &topic, &topic, 4)
        ),
        "prune = true",
    );
    let src = env.src();
    write(src.join("kept/stays.txt"), "kept\n");
    let mut files = 0;
    let mut dirs = 0;
    for top in 0..6 {
        dirs += 1;
        for sub in 0..4 {
            dirs += 2;
            for i in 0..15 {
                write(
                    src.join(format!("gone{top}/s{sub}/deeper/f{i:02}.txt")),
                    format!("{top}/{sub}/{i}\n"),
                );
                files += 1;
            }
            write(src.join(format!("gone{top}/s{sub}/beside.txt")), "b\n");
            files += 1;
        }
    }
    let (scan, _) = env.sync();
    assert_eq!(scan["errors"], 0, "{scan}");
    assert_mirror(&src, &env.dst());

    for top in 0..6 {
        std::fs::remove_dir_all(src.join(format!("gone{top}"))).unwrap();
    }
    let (scan, project) = env.sync();
    assert_eq!(scan["deletes"], files + dirs, "{scan}");
    assert_mirror(&src, &env.dst());
    for top in 0..6 {
        assert!(!env.dst().join(format!("gone{top}")).exists(), "{project}");
    }
    assert_eq!(
        kind_outcome(&project, "file", "deleted"),
        files,
        "{project}"
    );
    assert_eq!(kind_outcome(&project, "dir", "deleted"), dirs, "{project}");
    // The scenario really read some directory delete before the contents' deletes: it
    // waited, and is counted by how it ended (`deleted`) and in `waited`.
    assert_eq!(kind_outcome(&project, "dir", "deferred"), 0, "{project}");
    assert!(project["waited"].as_u64().unwrap_or(0) > 0, "{project}");
    assert_eq!(outcome(&project, "retained"), 0, "{project}");
    let status = env.json(&["status"]);
    assert_eq!(status[0]["deferred"], serde_json::json!([]), "{status}");
    assert!(env.dst().join("kept/stays.txt").is_file());
}

/// Review issue (lost deletes after a SIGKILL), on a Kafka log: the topic keeps what a
/// scan appended, and the scan was killed before its index changes reached the disk.
/// Since the log lives outside the state directory, that state is the state directory
/// from before the scan, put back after it. The next scan replays the events of every
/// partition past the index's mark, so what the source removed meanwhile is deleted.
#[test]
fn a_scan_killed_before_its_index_write_loses_no_delete_on_a_kafka_log() {
    let brokers = kafka_brokers();
    let topic = unique("killedscan");
    let env = Env::dirs(
        &format!(
            "max_delete = \"100%\"\n{}",
            kafka_log_section(&brokers, &topic, &topic, 3)
        ),
        "prune = true",
    );
    write(env.src().join("base.txt"), "base\n");
    env.sync();
    for i in 0..30 {
        write(env.src().join(format!("n/f{i}")), format!("{i}\n"));
    }
    let (state, before) = (env.path("state"), env.path("state-before-scan"));
    let cp = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    cp(&state, &before);
    env.ok(&["scan"]);
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::rename(&before, &state).unwrap();

    env.ok(&["project"]);
    assert!(env.dst().join("n/f29").exists());
    std::fs::remove_dir_all(env.src().join("n")).unwrap();
    let (scan, project) = env.sync();
    assert_eq!(scan["deletes"], 31, "{scan}");
    assert_eq!(outcome(&project, "deleted"), 31, "{project}");
    assert_mirror(&env.src(), &env.dst());
}

/// `log tail` and `log show` on a topic with several partitions: every event of every
/// partition is shown (offsets count per partition), not only partition 0's.
#[test]
fn log_tail_and_show_read_every_partition_of_a_kafka_log() {
    let (env, _topic) = kafka_env(3);
    let keys: std::collections::BTreeSet<String> =
        (0..12).map(|i| format!("f{i:02}.txt")).collect();
    for key in &keys {
        write(env.src().join(key), format!("{key}\n"));
    }
    env.sync();
    let events = |out: String| -> Vec<serde_json::Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).expect("one JSON event a line"))
            .collect()
    };

    let all = events(env.ok(&["log", "tail", "--from", "0"]));
    let tailed: std::collections::BTreeSet<String> = all
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tailed, keys, "log tail --from 0 misses events: {all:?}");
    let used: std::collections::BTreeSet<u64> = all
        .iter()
        .map(|e| e["partition"].as_u64().unwrap())
        .collect();
    assert!(
        used.len() > 1,
        "the events should spread over partitions: {all:?}"
    );
    // Without --from: the last 10 of each partition, here all 12.
    assert_eq!(events(env.ok(&["log", "tail"])).len(), 12);

    // Offset 0 exists in every partition that holds an event.
    let shown = events(env.ok(&["log", "show", "0"]));
    assert_eq!(shown.len(), used.len(), "{shown:?}");
    let last = used.iter().max().unwrap().to_string();
    let one = events(env.ok(&["log", "show", "0", "--partition", &last]));
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0]["partition"].as_u64().unwrap().to_string(), last);
    let only = events(env.ok(&["log", "tail", "--from", "0", "--partition", &last]));
    assert!(
        only.iter().all(|e| e["partition"] == one[0]["partition"]),
        "{only:?}"
    );

    let wrong = env.run(&["log", "tail", "--partition", "3"]);
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("--partition 3 does not exist") && err.contains("3 partitions"),
        "{err}"
    );
}

/// `replay --from N` on a topic with several partitions moves every partition to N and
/// says how many events will be applied again: all of them, summed over the partitions,
/// and `project` then applies exactly that many.
#[test]
fn replay_on_a_kafka_log_counts_the_events_of_every_partition() {
    let (env, _topic) = kafka_env(3);
    for i in 0..12 {
        write(env.src().join(format!("f{i:02}.txt")), format!("{i}\n"));
    }
    env.sync();
    let replay = env.json(&["replay", "--from", "0"]);
    assert_eq!(replay[0]["to_apply"], 12, "{replay}");
    let text = env.ok(&["replay", "--from", "0"]);
    assert!(
        text.contains("up to 12 events (summed over the partitions) will be applied again"),
        "{text}"
    );
    let project = env.json(&["project"]);
    assert_eq!(project[0]["project"]["events"], 12, "{project}");
    assert_eq!(
        kind_outcome(&project[0]["project"], "file", "adopted"),
        12,
        "{project}"
    );

    // Past the end of a partition whose events are all applied: said so, nothing moved.
    let status = env.json(&["status"]);
    let smallest = status[0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["head"].as_u64().unwrap())
        .min()
        .unwrap();
    let past = (smallest + 1).to_string();
    let out = env.run(&["replay", "--from", &past]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("all applied") && err.contains("counts per partition"),
        "{err}"
    );
}
