//! Broker restarts (issue 4): the daemon keeps running while its broker restarts; appends
//! and projection resume, no event is lost, none is applied twice, lag returns to 0. This
//! test starts its own broker (own port, own data) so other tests keep theirs.

mod common;

use std::time::Duration;

use common::*;

const PORT: &str = "19193";

struct Broker {
    dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> (Broker, String) {
        let dir = tempfile::tempdir().unwrap();
        let addr = ops(
            "ops/peers/kafka.sh",
            &["start", PORT, dir.path().to_str().unwrap()],
        );
        (Broker { dir }, addr.trim().to_owned())
    }

    fn run(&self, cmd: &str) {
        ops(
            "ops/peers/kafka.sh",
            &[cmd, PORT, self.dir.path().to_str().unwrap()],
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.run("stop");
    }
}

fn applied(log: &str, outcome: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("applied") && l.contains("kind=file "))
        .filter(|l| {
            l.contains(&format!("outcome=\"{outcome}\""))
                || l.contains(&format!("outcome={outcome}"))
        })
        .count()
}

#[test]
fn issue_4_broker_restart_during_a_run_loses_nothing() {
    let (broker, brokers) = Broker::start();
    let topic = unique("restart");
    let env = Env::dirs(
        &format!(
            "batch_size = 10\n{}",
            kafka_log_section(&brokers, &topic, &topic, 2)
        ),
        "",
    );
    for i in 0..50 {
        write(
            env.src().join(format!("a/{i:03}.txt")),
            format!("before {i}\n"),
        );
    }
    let daemon = env.spawn_daemon();
    let first = wait_for(Duration::from_secs(90), || {
        mirrors_now(&env.src(), &env.dst()).then_some(())
    });
    assert!(
        first.is_some(),
        "no first mirror; log:\n{}",
        env.daemon_log()
    );

    broker.run("restart");
    // Changes made while the broker is (re)starting and after.
    for i in 0..50 {
        write(
            env.src().join(format!("b/{i:03}.txt")),
            format!("after {i}\n"),
        );
    }
    let mirrored = wait_for(Duration::from_secs(180), || {
        mirrors_now(&env.src(), &env.dst()).then_some(())
    });
    assert!(
        mirrored.is_some(),
        "no mirror after the restart; log:\n{}",
        env.daemon_log()
    );
    let caught_up = wait_for(Duration::from_secs(60), || {
        (daemon.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "lag stays above 0: {:?}",
        daemon.metrics()
    );
    let log = env.daemon_log();
    assert_eq!(
        applied(&log, "created"),
        100,
        "every file created exactly once:\n{log}"
    );
    assert_eq!(applied(&log, "updated"), 0, "no file rewritten:\n{log}");
    assert!(daemon.terminate().success(), "log:\n{}", env.daemon_log());
}

#[test]
fn issue_4_unreachable_broker_at_start_is_not_ready_then_recovers() {
    // A port nobody listens on yet: the daemon reports not ready and retries.
    let dir = tempfile::tempdir().unwrap();
    let port = "19194";
    let topic = unique("late");
    let env = Env::dirs(
        &kafka_log_section(&format!("127.0.0.1:{port}"), &topic, &topic, 1),
        "",
    );
    write(env.src().join("x.txt"), "x\n");
    let daemon = env.spawn_daemon();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(daemon.get("/readyz").status(), 503);
    // The first attempt gives up after the 10 s metadata deadline, then retries.
    let reported = wait_for(Duration::from_secs(40), || {
        let log = env.daemon_log();
        (log.contains("cannot reach the Kafka brokers") && log.contains("retrying in"))
            .then_some(())
    });
    assert!(reported.is_some(), "{}", env.daemon_log());
    assert_eq!(daemon.get("/readyz").status(), 503);

    let d = dir.path().to_str().unwrap();
    ops("ops/peers/kafka.sh", &["start", port, d]);
    let ready = wait_for(Duration::from_secs(90), || {
        (daemon.get("/readyz").status() == 200).then_some(())
    });
    let result = std::panic::catch_unwind(|| {
        assert!(ready.is_some(), "never ready; log:\n{}", env.daemon_log());
        let mirrored = wait_for(Duration::from_secs(60), || {
            mirrors_now(&env.src(), &env.dst()).then_some(())
        });
        assert!(mirrored.is_some(), "no mirror; log:\n{}", env.daemon_log());
    });
    drop(daemon);
    ops("ops/peers/kafka.sh", &["stop", port, d]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// While the broker is down, `/metrics` still answers within Prometheus's default 10 s
/// scrape timeout (a failed scrape blanks the dashboard and reads as the daemon down), and
/// `tidemark_source_freshness_seconds` keeps growing while scans cannot append; once the
/// broker is back the change arrives and freshness falls back.
#[test]
fn metrics_answer_and_freshness_grows_while_the_broker_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let (port, d) = ("19195", dir.path().to_str().unwrap().to_owned());
    let brokers = ops("ops/peers/kafka.sh", &["start", port, &d]);
    let topic = unique("down");
    let env = Env::dirs(&kafka_log_section(brokers.trim(), &topic, &topic, 1), "");
    write(env.src().join("before.txt"), "before\n");
    let daemon = env.spawn_daemon();
    let result = std::panic::catch_unwind(|| {
        let mirrored = wait_for(Duration::from_secs(60), || {
            mirrors_now(&env.src(), &env.dst()).then_some(())
        });
        assert!(mirrored.is_some(), "no mirror; log:\n{}", env.daemon_log());
        let readable = r#"tidemark_log_readable{pipeline="t"}"#;
        assert_eq!(daemon.metric(readable), 1.0);

        ops("ops/peers/kafka.sh", &["stop", port, &d]);
        // A change the scanner cannot append: no scan succeeds from now on.
        write(env.src().join("during.txt"), "during\n");
        std::thread::sleep(Duration::from_secs(15));
        let started = std::time::Instant::now();
        let metrics = daemon.metrics();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "/metrics took {took:?} while the broker is down; log:\n{}",
            env.daemon_log()
        );
        let freshness = metrics["tidemark_source_freshness_seconds{pipeline=\"t\"}"];
        assert!(
            freshness > 10.0,
            "freshness {freshness} s, though no scan succeeded for 15 s: {metrics:?}"
        );
        // What TidemarkLogUnreachable fires on: nothing else moves while the log is down.
        assert_eq!(metrics[readable], 0.0, "{metrics:?}");

        ops("ops/peers/kafka.sh", &["start", port, &d]);
        let mirrored = wait_for(Duration::from_secs(90), || {
            mirrors_now(&env.src(), &env.dst()).then_some(())
        });
        assert!(
            mirrored.is_some(),
            "no mirror after the broker came back; log:\n{}",
            env.daemon_log()
        );
        let fresh = wait_for(Duration::from_secs(30), || {
            (daemon.metric("tidemark_source_freshness_seconds{pipeline=\"t\"}") < 5.0).then_some(())
        });
        assert!(
            fresh.is_some(),
            "freshness stays high: {:?}",
            daemon.metrics()
        );
        assert_eq!(daemon.metric(readable), 1.0);
    });
    drop(daemon);
    ops("ops/peers/kafka.sh", &["stop", port, &d]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
