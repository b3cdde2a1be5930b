//! Stopping a daemon on a Kafka log: SIGTERM ends it within `shutdown_timeout` even while
//! the broker is down, and a clean stop hands its partitions back at once. The first test
//! starts its own broker (own port, own data) since it stops it.

mod common;

use std::time::{Duration, Instant};

use common::*;

const PORT: &str = "19196";

/// Files under `a/` in the source, and waits until the daemon mirrored them and its lag is 0.
fn mirror_first(env: &Env, daemon: &Daemon, n: usize) {
    for i in 0..n {
        write(env.src().join(format!("a/{i:03}.txt")), format!("{i}\n"));
    }
    let done = wait_for(Duration::from_secs(60), || {
        (mirrors_now(&env.src(), &env.dst())
            && daemon.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0)
            .then_some(())
    });
    assert!(
        done.is_some(),
        "no first mirror; log:\n{}",
        env.daemon_log()
    );
}

#[test]
fn sigterm_with_the_broker_down_exits_within_shutdown_timeout_keeping_committed_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let brokers = ops("ops/peers/kafka.sh", &["start", PORT, &data]);
    let brokers = brokers.trim();
    struct Stop(String);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new(repo_root().join("ops/peers/kafka.sh"))
                .args(["stop", PORT, &self.0])
                .output();
        }
    }
    let _stop = Stop(data.clone());
    let topic = unique("stop");
    let env = Env::dirs(&kafka_log_section(brokers, &topic, &topic, 2), "");
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace("shutdown_timeout = \"20s\"", "shutdown_timeout = \"4s\""));
    let daemon = env.spawn_daemon();
    mirror_first(&env, &daemon, 10);

    ops("ops/peers/kafka.sh", &["stop", PORT, &data]);
    // A change the scanner cannot append while the broker is down.
    write(env.src().join("b/late.txt"), "late\n");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = daemon.terminate();
    let took = started.elapsed();
    let log = env.daemon_log();
    assert!(
        took < Duration::from_millis(5500),
        "SIGTERM took {took:?} with shutdown_timeout = 4s; log:\n{log}"
    );
    assert_eq!(status.code(), Some(0), "a clean stop; log:\n{log}");
    assert!(
        log.contains("did not answer within"),
        "the log says what the stop gave up on:\n{log}"
    );

    // The broker is back: what was applied before the stop was committed, so nothing is
    // applied again, and the change made during the outage is mirrored now.
    ops("ops/peers/kafka.sh", &["start", PORT, &data]);
    let (_, project) = env.sync();
    assert_eq!(
        kind_outcome(&project, "file", "created"),
        1,
        "only the late file: {project}"
    );
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn a_clean_restart_takes_its_partitions_back_at_once() {
    let brokers = kafka_brokers();
    let topic = unique("restart-at-once");
    // Leases expire 1.5 × 6 s after their holder stopped renewing them.
    let env = Env::dirs(&kafka_log_section(&brokers, &topic, &topic, 2), "");
    let daemon = env.spawn_daemon();
    mirror_first(&env, &daemon, 5);
    assert!(daemon.terminate().success(), "log:\n{}", env.daemon_log());

    for i in 0..5 {
        write(env.src().join(format!("b/{i:03}.txt")), format!("{i}\n"));
    }
    let started = Instant::now();
    let daemon = env.spawn_daemon();
    let mirrored = wait_for(Duration::from_secs(30), || {
        mirrors_now(&env.src(), &env.dst()).then_some(())
    });
    let took = started.elapsed();
    assert!(mirrored.is_some(), "log:\n{}", env.daemon_log());
    assert!(
        took < Duration::from_secs(5),
        "the restarted daemon caught up after {took:?}, not at once; log:\n{}",
        env.daemon_log()
    );
    assert!(
        env.daemon_log().contains("released the partition leases"),
        "the first daemon says it released its partitions; log:\n{}",
        env.daemon_log()
    );
    assert!(daemon.terminate().success(), "log:\n{}", env.daemon_log());
}
