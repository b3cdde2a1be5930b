//! `tidemark log migrate` (issue 4): a pipeline moves from its sled log to a Kafka topic
//! with events still unapplied; syncing continues on Kafka with nothing applied twice.

mod common;

use common::*;

#[test]
fn issue_4_migrate_sled_to_kafka_then_keep_syncing() {
    let brokers = kafka_brokers();
    let topic = unique("migrate");
    let env = Env::dirs("", "prune = true");
    for i in 0..30 {
        write(
            env.src().join(format!("old/{i:02}.txt")),
            format!("old {i}\n"),
        );
    }
    let (_, project) = env.sync();
    assert_eq!(kind_outcome(&project, "file", "created"), 30, "{project}");
    // Scanned but not yet projected when the backend changes.
    for i in 0..10 {
        write(
            env.src().join(format!("pending/{i}.txt")),
            format!("pending {i}\n"),
        );
    }
    write(env.src().join("old/00.txt"), "changed before the move\n");
    env.ok(&["scan"]);

    let sled_config = std::fs::read_to_string(&env.config).unwrap();
    let kafka_config = sled_config.replace(
        "\n[pipeline.source.dir]",
        &format!(
            "{}\n[pipeline.source.dir]",
            kafka_log_section(&brokers, &topic, &topic, 3)
        ),
    );
    env.write_config(&kafka_config);
    let out = env.ok(&["log", "migrate"]);
    assert!(out.contains("copied"), "{out}");

    // Only what sled had not applied is applied now.
    let project = &env.json(&["project"])[0]["project"];
    assert_eq!(kind_outcome(project, "file", "created"), 10, "{project}");
    assert_eq!(kind_outcome(project, "file", "updated"), 1, "{project}");
    assert_eq!(
        outcome(project, "unchanged") + outcome(project, "adopted"),
        0,
        "{project}"
    );
    assert_mirror(&env.src(), &env.dst());
    let status = env.json(&["status"]);
    assert_eq!(status[0]["log"], "kafka", "{status}");
    assert_eq!(status[0]["lag_events"], 0, "{status}");

    // Syncing continues on Kafka.
    write(env.src().join("new.txt"), "after the move\n");
    let (scan, project) = env.sync();
    assert_eq!(scan["upserts"], 1, "{scan}");
    assert_eq!(kind_outcome(&project, "file", "created"), 1, "{project}");
    assert_eq!(project["events"], 1, "{project}");
    assert_mirror(&env.src(), &env.dst());

    // A second migrate refuses to copy into a topic that already has records.
    let again = env.run(&["log", "migrate"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds records"));
}
