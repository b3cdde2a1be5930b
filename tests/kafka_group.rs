//! Several daemons, one consumer group (issue 4): two `tidemark run` processes project the
//! same Kafka pipeline, one of them is SIGKILLed mid-projection, the other takes its
//! partitions over; the target equals the source and no file is written twice.

mod common;

use std::time::Duration;

use common::*;

/// Lines of a daemon log saying a `kind` item was applied with `outcome`.
fn applied_lines<'a>(
    log: &'a str,
    kind: &'a str,
    outcome: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    log.lines()
        .filter(|l| l.contains(" applied ") || l.contains(": applied"))
        .filter(move |l| l.contains(&format!("kind={kind} ")))
        .filter(move |l| {
            l.contains(&format!("outcome=\"{outcome}\""))
                || l.contains(&format!("outcome={outcome}"))
        })
}

/// How many `kind` items a daemon log says were applied with `outcome`.
fn applied(log: &str, kind: &str, outcome: &str) -> usize {
    applied_lines(log, kind, outcome).count()
}

/// Keys of the `kind` items a daemon log says were applied with `outcome`.
fn applied_keys(log: &str, kind: &str, outcome: &str) -> Vec<String> {
    applied_lines(log, kind, outcome)
        .filter_map(|l| {
            l.split(" key=")
                .nth(1)?
                .split(' ')
                .next()
                .map(str::to_owned)
        })
        .collect()
}

/// A config for a daemon with its own state and port, mirroring `src` into `dst`.
fn config(src: &std::path::Path, dst: &std::path::Path, role: &str, kafka: &str) -> String {
    format!(
        r#"state_dir = "state"
listen = "127.0.0.1:0"
shutdown_timeout = "20s"

[[pipeline]]
name = "t"
scan_interval = "500ms"
role = "{role}"
batch_size = 5
concurrency = 1
{kafka}
[pipeline.source.dir]
path = "{}"

[pipeline.target.dir]
path = "{}"
"#,
        src.display(),
        dst.display()
    )
}

#[test]
fn issue_4_sigkill_one_of_two_daemons_the_other_takes_over() {
    let brokers = kafka_brokers();
    let topic = unique("group");
    let kafka = kafka_log_section(&brokers, &topic, &topic, 4);
    let scanner = Env::dirs("", "");
    let other = Env::dirs("", "");
    let (src, dst) = (scanner.src(), scanner.dst());
    const FILES: usize = 400;
    scanner.write_config(&config(&src, &dst, "both", &kafka));
    other.write_config(&config(&src, &dst, "project", &kafka));

    // Both daemons hold partitions before any event exists, so both project from the start.
    let victim = other.spawn_daemon();
    let survivor = scanner.spawn_daemon();
    let both_leased = wait_for(Duration::from_secs(90), || {
        (scanner.daemon_log().contains("leased partitions")
            && other.daemon_log().contains("leased partitions"))
        .then_some(())
    });
    assert!(
        both_leased.is_some(),
        "both daemons lease partitions; logs:\n{}\n{}",
        scanner.daemon_log(),
        other.daemon_log()
    );
    for i in 0..FILES {
        write(
            src.join(format!("f/{i:04}.txt")),
            format!("content of file {i}\n").repeat(50),
        );
    }
    let victim_projects = wait_for(Duration::from_secs(90), || {
        (applied(&other.daemon_log(), "file", "created") > 0).then_some(())
    });
    assert!(
        victim_projects.is_some(),
        "both daemons project (the group split the partitions); logs:\n{}\n{}",
        scanner.daemon_log(),
        other.daemon_log()
    );
    victim.kill9();

    let mirrored = wait_for(Duration::from_secs(120), || {
        mirrors_now(&src, &dst).then_some(())
    });
    assert!(
        mirrored.is_some(),
        "no mirror after the takeover; survivor log:\n{}",
        scanner.daemon_log()
    );
    assert_mirror(&src, &dst);
    let caught_up = wait_for(Duration::from_secs(30), || {
        (survivor.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "lag stays above 0: {:?}",
        survivor.metrics()
    );

    // No duplicate effect: each file was written exactly once, by one daemon or the other;
    // what the victim applied but had not committed was adopted, not rewritten. Counted per
    // file: the projector logs a batch's outcomes only after the batch is applied and
    // flushed, so files the victim wrote in the batch it was killed in have no `created`
    // line anywhere; the survivor must adopt them (no second write), and there can be at
    // most one batch (`batch_size = 5`) of them.
    let (a, b) = (scanner.daemon_log(), other.daemon_log());
    let logs = format!("survivor log:\n{a}\nvictim log:\n{b}");
    let per_key = |outcome: &str| {
        let mut n = std::collections::BTreeMap::<String, usize>::new();
        for log in [&a, &b] {
            for key in applied_keys(log, "file", outcome) {
                *n.entry(key).or_default() += 1;
            }
        }
        n
    };
    let (created, adopted) = (per_key("created"), per_key("adopted"));
    let twice: Vec<&String> = created
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(twice.is_empty(), "files created twice: {twice:?}; {logs}");
    let unlogged: Vec<String> = (0..FILES)
        .map(|i| format!("f/{i:04}.txt"))
        .filter(|k| !created.contains_key(k))
        .collect();
    let not_adopted: Vec<&String> = unlogged
        .iter()
        .filter(|k| !adopted.contains_key(*k))
        .collect();
    assert!(
        not_adopted.is_empty(),
        "files neither created nor adopted: {not_adopted:?}; {logs}"
    );
    assert!(
        unlogged.len() <= 5,
        "{} files not created by either daemon (at most the victim's last batch): {unlogged:?}; {logs}",
        unlogged.len()
    );
    let updated = applied(&a, "file", "updated") + applied(&b, "file", "updated");
    assert_eq!(updated, 0, "no file rewritten; {logs}");
    assert!(
        a.contains("took over partitions"),
        "the survivor took partitions over:\n{a}"
    );
    assert!(survivor.terminate().success());
}
