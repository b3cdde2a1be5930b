//! One-shot commands on a Kafka log whose brokers are down, go away, stop answering or
//! refuse the events: they fail within seconds with one error naming the brokers, count
//! nothing as appended that the log did not take, commit nothing the target lacks, and
//! the next sync mirrors everything. The tests that start their own broker (own port, own
//! data, on a port nothing listens on before) take turns with the port.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

const PORT: &str = "19410";

/// Held by each test that uses [`PORT`]: they run one after the other.
static PORT_TAKEN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The port of the broker the `status` test starts and stops: its own, so it needs no
/// turn with the others.
const STATUS_PORT: &str = "19530";

/// Stops the broker on a port with data in the directory.
struct Stop(&'static str, String);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("ops/peers/kafka.sh"))
            .args(["stop", self.0, &self.1])
            .output();
    }
}

/// Runs the binary as a user would: the default log level (the harness asks for debug).
fn run_quiet(env: &Env, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = env
        .cmd(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("tidemark runs");
    (out, started.elapsed())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn sync_with_the_broker_down_fails_within_seconds_naming_it_and_the_next_sync_mirrors() {
    let _port = PORT_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let addr = format!("127.0.0.1:{PORT}");
    assert!(
        !tcp_answers(&addr),
        "something listens on {addr}; this test needs the port free"
    );
    let topic = unique("down");
    let env = Env::dirs(&kafka_log_section(&addr, &topic, &topic, 2), "prune = true");
    for i in 0..20 {
        write(env.src().join(format!("a/{i:02}.txt")), format!("{i}\n"));
    }

    let (out, took) = run_quiet(&env, &["sync", "--output", "json"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let shown = format!(
        "after {took:?}, {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        took < Duration::from_secs(30),
        "a one-shot sync must not wait for the producer's 5 minutes; {shown}"
    );
    assert!(
        stderr.contains(&format!("cannot reach the Kafka brokers {addr}"))
            && stderr.contains("Connection refused")
            && stderr.contains("start the broker"),
        "one error names the broker, why, and what to do; {shown}"
    );
    assert!(
        stderr.lines().count() < 10,
        "librdkafka's retries must not flood stderr; {shown}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let scan = &v[0]["scan"];
    assert!(
        scan.is_null() || (scan["upserts"] == 0 && scan["deletes"] == 0),
        "nothing was appended, so nothing is counted as appended; {shown}"
    );
    let report = run_report(&v[0]);
    assert!(
        report["scan"].is_null() || report["scan"]["upserts"] == 0,
        "{report}"
    );
    assert!(
        report["error"].as_str().unwrap().contains(&addr),
        "{report}"
    );
    let report_dir = v[0]["report_dir"].as_str().unwrap();
    let summary =
        std::fs::read_to_string(std::path::Path::new(report_dir).join("summary.txt")).unwrap();
    assert!(!summary.contains(" 20 upserts"), "{summary}");
    assert!(
        !env.dst().exists() || snapshot(&env.dst()).is_empty(),
        "the target is untouched"
    );

    // The broker is up now: the next sync mirrors everything (the index recorded nothing).
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let _stop = Stop(PORT, data_dir.clone());
    ops("ops/peers/kafka.sh", &["start", PORT, &data_dir]);
    let (scan, project) = env.sync();
    assert_eq!(scan["upserts"], 21, "20 files and their directory: {scan}");
    assert_eq!(kind_outcome(&project, "file", "created"), 20, "{project}");
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn a_sync_whose_events_the_log_refuses_counts_none_as_appended() {
    let brokers = kafka_brokers();
    let topic = unique("refused");
    // librdkafka refuses, before sending, a record larger than `message.max.bytes`: these
    // files travel inside their events (`inline_limit`), base64, about 4 KB each.
    let section = kafka_log_section(&brokers, &topic, &topic, 2);
    let refusing = format!(
        "inline_limit = 8192\n{section}properties = {{ \"message.max.bytes\" = \"1000\" }}\n"
    );
    let env = Env::dirs(&refusing, "");
    for i in 0..5 {
        write(env.src().join(format!("{i}.bin")), noise(3000, i + 1));
    }

    let (out, _) = run_quiet(&env, &["sync"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let shown = format!("{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        stdout.contains(": 0 upserts, 0 deletes"),
        "the summary counts only what the log took; {shown}"
    );
    assert!(
        stdout.contains("changes found were not appended"),
        "and says what it found but could not append; {shown}"
    );
    let status = env.json(&["status"]);
    let last = &status[0]["last_scan"];
    assert_eq!(last["result"], "failed", "{status}");
    assert_eq!(last["upserts"], 0, "{status}");
    assert!(last["not_appended"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(!env.dst().exists() || snapshot(&env.dst()).is_empty());

    // Without the limit, the next sync finds and mirrors everything.
    env.write_config(
        &std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("properties = { \"message.max.bytes\" = \"1000\" }\n", ""),
    );
    let (scan, project) = env.sync();
    assert_eq!(scan["upserts"], 5, "{scan}");
    assert_eq!(kind_outcome(&project, "file", "created"), 5, "{project}");
    assert_mirror(&env.src(), &env.dst());
}

/// How a test takes the broker away from a one-shot `sync` mid-run, and gives it back.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// The broker process is killed (`kill -9`): its connections close.
    Dies,
    /// The broker process is paused (`kill -STOP`): alive, its connections open, no
    /// answers.
    Silent,
}

/// Sends `signal` to the broker whose data is in `data` (its pid is in `broker.pid`).
fn signal_broker(data: &std::path::Path, signal: &str) -> bool {
    let pid = std::fs::read_to_string(data.join("broker.pid")).unwrap_or_default();
    std::process::Command::new("kill")
        .args([signal, pid.trim()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Resumes a paused broker when dropped, also when the test panics, so that the broker
/// can be stopped and the next test finds the port free.
struct Resume(std::path::PathBuf);

impl Drop for Resume {
    fn drop(&mut self) {
        signal_broker(&self.0, "-CONT");
    }
}

/// A one-shot `sync` on a broker of its own that is taken away (`loss`) while the sync
/// projects: the run fails within `within`, with one error whose line holds each of
/// `says`, and writes its report, which counts what was applied and says what was
/// committed. Nothing is lost: no offset was committed past what the target has, so once
/// the broker is back the next sync mirrors everything, each file created exactly once
/// over both runs.
fn a_sync_losing_its_broker_mid_run(loss: Loss, within: Duration, says: &[&str]) {
    let _port = PORT_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let addr = format!("127.0.0.1:{PORT}");
    assert!(
        !tcp_answers(&addr),
        "something listens on {addr}; this test needs the port free"
    );
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let _stop = Stop(PORT, data_dir.clone());
    ops("ops/peers/kafka.sh", &["start", PORT, &data_dir]);
    let topic = unique("lost");
    // Small batches, so the projection is still going when the broker goes.
    let section = format!(
        "batch_size = 5\n{}",
        kafka_log_section(&addr, &topic, &topic, 2)
    );
    let env = Env::dirs(&section, "prune = true");
    let files = 2000;
    for i in 0..files {
        write(env.src().join(format!("{i:04}.txt")), format!("{i}\n"));
    }

    let child = env
        .cmd(&["sync", "--output", "json"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tidemark runs");
    // Files only: the target's `.tidemark-tmp` is no file applied.
    let applying = wait_for(Duration::from_secs(60), || {
        let n = std::fs::read_dir(env.dst()).map_or(0, |d| {
            d.filter(|e| e.as_ref().is_ok_and(|e| e.file_name() != WRITER_NOTE[0]))
                .count()
        });
        (n >= 50).then_some(())
    });
    assert!(applying.is_some(), "the sync applied nothing");
    let _resume = Resume(data.path().to_owned());
    let signal = match loss {
        Loss::Dies => "-9",
        Loss::Silent => "-STOP",
    };
    assert!(
        signal_broker(data.path(), signal),
        "kill {signal} the broker"
    );
    let lost = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = lost.elapsed();
    eprintln!("the sync ended {took:?} after the broker went ({loss:?})");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let shown = format!(
        "{took:?} after the broker went ({loss:?}), {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        took < within,
        "a one-shot run whose broker went must not wait out every request's timeout; {shown}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{shown}");
    for said in says {
        assert!(
            errors[0].contains(&said.replace("{addr}", &addr)),
            "the error names the brokers, what happened and what to do ({said}); {shown}"
        );
    }
    assert!(
        stderr.lines().count() < 10,
        "librdkafka's retries must not flood stderr; {shown}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let project = &v[0]["project"];
    let first = kind_outcome(project, "file", "created");
    assert!(first >= 50, "the report counts what was applied; {shown}");
    // The committed offsets could not be read back at the end: the report says what the
    // run committed (short of what it applied by the batches in flight at most), not 0.
    let committed = project["committed"].as_u64().unwrap_or(0);
    assert!(
        committed > 0 && committed <= first && first - committed <= 10,
        "the report says what the run committed, {committed} of {first} created; {shown}"
    );
    let report = run_report(&v[0]);
    assert!(
        report["error"].as_str().unwrap().contains(&addr),
        "{report}"
    );

    // The broker is back: the next sync goes on from the committed offsets.
    match loss {
        Loss::Dies => {
            ops("ops/peers/kafka.sh", &["start", PORT, &data_dir]);
        }
        Loss::Silent => assert!(signal_broker(data.path(), "-CONT")),
    }
    let (_, project) = env.sync();
    assert_eq!(
        first + kind_outcome(&project, "file", "created"),
        files,
        "every file created exactly once; the rest adopted or already applied: {project}"
    );
    assert_mirror(&env.src(), &env.dst());
}

/// A broker that dies while a one-shot `sync` projects: the run fails within seconds, not
/// after librdkafka's request timeouts one after another (24–30 s).
#[test]
fn a_sync_whose_broker_dies_mid_run_fails_within_seconds_and_the_next_sync_finishes() {
    a_sync_losing_its_broker_mid_run(
        Loss::Dies,
        Duration::from_secs(8),
        &[
            "lost the Kafka brokers {addr} during the run",
            "start the broker",
            "run again",
        ],
    );
}

/// A broker that stays connected but stops answering while a one-shot `sync` projects (a
/// paused or hung process): the first request it leaves unanswered ends the run, within
/// about one request timeout (10 s), not after each request's timeout one after another.
#[test]
fn a_sync_whose_broker_goes_silent_mid_run_fails_within_one_timeout_and_the_next_sync_finishes() {
    a_sync_losing_its_broker_mid_run(
        Loss::Silent,
        Duration::from_secs(15),
        &[
            "the Kafka brokers {addr} stopped answering during the run",
            "restart the broker",
            "run again",
        ],
    );
}

/// The `report.json` of the run whose output entry (`--output json`) is `entry`.
fn run_report(entry: &serde_json::Value) -> serde_json::Value {
    let dir = entry["report_dir"]
        .as_str()
        .expect("the run wrote its report");
    let text = std::fs::read_to_string(std::path::Path::new(dir).join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A daemon stopped while it is still trying to reach its brokers stops at once: the
/// attempt in flight is given up, not waited out (one against a broker that accepts the
/// connection and never answers took about 10 s, past a short `shutdown_timeout`).
#[test]
fn a_daemon_stopped_while_it_reaches_for_a_silent_broker_stops_at_once() {
    // A "broker" that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            held.push(conn);
        }
    });
    let topic = unique("silent");
    let env = Env::dirs(&kafka_log_section(&addr, &topic, &topic, 1), "");
    let daemon = env.spawn_daemon();
    // Well into its first attempt.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let status = daemon.terminate();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}\n{}", env.daemon_log());
    assert!(
        took < Duration::from_secs(4),
        "the daemon took {took:?} to stop:\n{}",
        env.daemon_log()
    );
    assert!(
        env.daemon_log()
            .contains("stopped before the event log was reachable"),
        "{}",
        env.daemon_log()
    );
}

/// `tidemark status` while the daemon's broker is down: the daemon cannot read the log's
/// offsets, and `status` says so (the pipeline, the brokers, why, what to do) and exits 1,
/// as it does without a daemon, instead of printing `head null` with exit 0; what the local
/// state holds (the last scan, the delete guard) is still shown.
#[test]
fn status_while_the_daemons_broker_is_down_names_the_error_exits_1_and_shows_the_local_state() {
    let addr = format!("127.0.0.1:{STATUS_PORT}");
    assert!(
        !tcp_answers(&addr),
        "something listens on {addr}; this test needs the port free"
    );
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let stop = Stop(STATUS_PORT, data_dir.clone());
    ops("ops/peers/kafka.sh", &["start", STATUS_PORT, &data_dir]);
    let topic = unique("status-down");
    let env = Env::dirs(&kafka_log_section(&addr, &topic, &topic, 2), "prune = true");
    for i in 0..4 {
        write(env.src().join(format!("{i}.txt")), format!("{i}\n"));
    }
    let daemon = env.spawn_daemon();
    wait_for(Duration::from_secs(60), || {
        mirrors_now(&env.src(), &env.dst()).then_some(())
    })
    .unwrap_or_else(|| panic!("no first mirror; log:\n{}", env.daemon_log()));
    // Three of four files gone: more than max_delete (50%) allows, so the guard trips.
    for i in 1..4 {
        std::fs::remove_file(env.src().join(format!("{i}.txt"))).unwrap();
    }
    wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        v[0]["delete_guard"].is_object().then_some(())
    })
    .unwrap_or_else(|| panic!("the delete guard did not trip; log:\n{}", env.daemon_log()));

    ops("ops/peers/kafka.sh", &["stop", STATUS_PORT, &data_dir]);
    let out = env.run(&["status"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let shown = format!("{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        stdout.lines().any(|l| l.contains("pipeline `t`")
            && l.contains(&format!("cannot reach the Kafka brokers {addr}"))
            && l.contains("Connection refused")
            && l.contains("start the broker")),
        "one line names the pipeline, the brokers, why and what to do; {shown}"
    );
    assert!(
        stdout.contains("  last scan ")
            && stdout.contains("DELETE GUARD TRIPPED: the last scan would delete 3 items")
            && stdout.contains("max_delete 50%"),
        "the local state is shown all the same; {shown}"
    );
    assert!(
        !stdout.contains("null") && !stdout.contains("no scan yet"),
        "{shown}"
    );

    let out = env.run(&["status", "--output", "json"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let shown = format!("{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        stderr.contains("error: pipeline `t`: ") && stderr.contains("start the broker"),
        "{shown}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let s = &v[0];
    assert!(
        s["error"].as_str().is_some_and(|e| e.contains(&addr)),
        "{shown}"
    );
    assert!(s["head"].is_null() && s["lag_events"].is_null(), "{shown}");
    assert_eq!(s["delete_guard"]["would_delete"], 3, "{shown}");
    assert!(s["last_scan"]["id"].is_string(), "{shown}");
    assert_eq!(s["max_delete"], "50%", "{shown}");
    daemon.terminate();
    drop(stop);
}

/// Review finding: a broker that refused the SASL handshake was reported as unreachable
/// ("start the broker, or fix `brokers`"). tansu answers SASL_PLAINTEXT's handshake with a
/// refusal, which is exactly that case: `status` and `sync` now say the broker answered
/// but refused to authenticate, point at the `sasl.*` properties and `secret_properties`,
/// and the password appears nowhere in what they print.
#[test]
fn a_refused_sasl_handshake_is_named_as_such_and_the_password_is_never_printed() {
    let brokers = kafka_brokers();
    let topic = unique("sasl");
    let password = "pw-7f3a9c-never-print";
    let env = Env::dirs(
        &format!(
            "{}properties = {{\"security.protocol\"=\"SASL_PLAINTEXT\",\"sasl.mechanism\"=\"PLAIN\",\"sasl.username\"=\"tm\"}}\nsecret_properties = {{\"sasl.password\"={{env=\"TM_TEST_KPW\"}}}}\n",
            kafka_log_section(&brokers, &topic, &topic, 1)
        ),
        "",
    );
    write(env.src().join("a.txt"), "a\n");
    for args in [&["status"][..], &["sync"][..]] {
        let out = env.cmd(args).env("TM_TEST_KPW", password).output().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{args:?}\n{stdout}\n{stderr}");
        let said = format!("{stdout}{stderr}");
        assert!(
            said.contains("answered but refused to authenticate this client")
                && said.contains("`sasl.username`")
                && said.contains("`secret_properties`"),
            "{args:?}\n{said}"
        );
        assert!(!said.contains("cannot reach"), "{args:?}\n{said}");
        assert!(
            !said.contains(password),
            "{args:?} printed the password:\n{said}"
        );
    }
    assert!(!env.dst().join("a.txt").exists());
}
