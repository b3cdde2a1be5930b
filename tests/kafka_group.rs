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
    config_with(src, dst, role, kafka, "")
}

/// [`config`] with `target_extra` (TOML lines) in the target's table.
fn config_with(
    src: &std::path::Path,
    dst: &std::path::Path,
    role: &str,
    kafka: &str,
    target_extra: &str,
) -> String {
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
{target_extra}
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

/// Committed offset of each partition of pipeline `t`, as `tidemark status` reads them
/// from the group.
fn committed(env: &Env) -> Vec<u64> {
    let status = env.json(&["status"]);
    status[0]["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("no partitions in {status}"))
        .iter()
        .map(|p| p["committed"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_one_shot_sync_refuses_while_a_daemon_holds_the_group_and_never_moves_offsets_back() {
    let brokers = kafka_brokers();
    let topic = unique("oneshot");
    let kafka = kafka_log_section(&brokers, &topic, &topic, 2);
    let daemon_env = Env::dirs("", "");
    let oneshot = Env::dirs("", "");
    let (src, dst) = (daemon_env.src(), daemon_env.dst());
    daemon_env.write_config(&config(&src, &dst, "both", &kafka));
    oneshot.write_config(&config(&src, &dst, "both", &kafka));
    for i in 0..20 {
        write(src.join(format!("f/{i:02}.txt")), format!("{i}\n"));
    }
    let daemon = daemon_env.spawn_daemon();
    let caught_up = wait_for(Duration::from_secs(60), || {
        (mirrors_now(&src, &dst) && daemon.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0)
            .then_some(())
    });
    assert!(caught_up.is_some(), "log:\n{}", daemon_env.daemon_log());

    // A one-shot sync on the group the daemon projects refuses, naming the group and
    // what to do, before it scans or applies anything; the offsets stay where they are.
    let before = committed(&oneshot);
    let started = std::time::Instant::now();
    let out = oneshot.run(&["sync"]);
    let took = started.elapsed();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let shown = format!(
        "after {took:?}, {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        stderr.contains(&format!("consumer group `{topic}`"))
            && stderr.contains("holds partitions 0, 1")
            && stderr.contains("tidemark run")
            && stderr.contains("nothing was scanned, appended or applied"),
        "{shown}"
    );
    assert!(!stdout.contains("scanned"), "{shown}");
    assert!(took < Duration::from_secs(20), "{shown}");
    let after = committed(&oneshot);
    assert!(
        after.iter().zip(&before).all(|(a, b)| a >= b),
        "committed offsets went back: {before:?} → {after:?}"
    );

    // The daemon goes on; once it stopped cleanly (releasing its partitions) the same
    // sync runs at once, and its commits only move the offsets forward.
    write(src.join("g/late.txt"), "late\n");
    let mirrored = wait_for(Duration::from_secs(60), || {
        mirrors_now(&src, &dst).then_some(())
    });
    assert!(mirrored.is_some(), "log:\n{}", daemon_env.daemon_log());
    assert!(daemon.terminate().success());
    let before = committed(&oneshot);
    write(src.join("h/after.txt"), "after\n");
    let started = std::time::Instant::now();
    let (_, project) = oneshot.sync();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "released partitions are taken at once, not after their leases expire"
    );
    assert_eq!(kind_outcome(&project, "file", "created"), 1, "{project}");
    assert_mirror(&src, &dst);
    let after = committed(&oneshot);
    assert!(
        after.iter().zip(&before).all(|(a, b)| a >= b)
            && after.iter().sum::<u64>() > before.iter().sum::<u64>(),
        "committed offsets must only move forward: {before:?} → {after:?}"
    );

    // The one-shot sync gave its partitions back: a daemon started now projects at once.
    let daemon = daemon_env.spawn_daemon();
    write(src.join("i/next.txt"), "next\n");
    let started = std::time::Instant::now();
    let mirrored = wait_for(Duration::from_secs(30), || {
        mirrors_now(&src, &dst).then_some(())
    });
    assert!(mirrored.is_some(), "log:\n{}", daemon_env.daemon_log());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the daemon waited for the one-shot run's leases to expire; log:\n{}",
        daemon_env.daemon_log()
    );
    assert!(daemon.terminate().success());
}

/// A daemon of a two-partition group on a topic named after `topic` that mirrored a file
/// and was then killed (its leases are never released nor renewed again), and a one-shot
/// setup of the same group, source and target: the daemon's env (which holds the source
/// and the target) and the one-shot's.
fn killed_daemon_and_a_one_shot(topic: &str) -> (Env, Env) {
    let brokers = kafka_brokers();
    let topic = unique(topic);
    let kafka = kafka_log_section(&brokers, &topic, &topic, 2);
    let daemon_env = Env::dirs("", "");
    let oneshot = Env::dirs("", "");
    let (src, dst) = (daemon_env.src(), daemon_env.dst());
    daemon_env.write_config(&config(&src, &dst, "both", &kafka));
    oneshot.write_config(&config(&src, &dst, "both", &kafka));
    write(src.join("a.txt"), "a\n");
    let daemon = daemon_env.spawn_daemon();
    let mirrored = wait_for(Duration::from_secs(60), || {
        mirrors_now(&src, &dst).then_some(())
    });
    assert!(mirrored.is_some(), "log:\n{}", daemon_env.daemon_log());
    daemon.kill9();
    (daemon_env, oneshot)
}

#[test]
fn a_one_shot_sync_takes_the_partitions_of_a_killed_daemon_once_their_leases_expire() {
    let (daemon_env, oneshot) = killed_daemon_and_a_one_shot("oneshot-killed");
    let (src, dst) = (daemon_env.src(), daemon_env.dst());
    let before = committed(&oneshot);
    write(src.join("b.txt"), "b\n");
    let started = std::time::Instant::now();
    let (_, project) = oneshot.sync();
    let took = started.elapsed();
    // session_timeout = 6s: the leases expire 9 s after their last renewal.
    assert!(
        took < Duration::from_secs(30),
        "the sync waited {took:?} for the dead daemon's leases"
    );
    assert_eq!(kind_outcome(&project, "file", "created"), 1, "{project}");
    assert_mirror(&src, &dst);
    let after = committed(&oneshot);
    assert!(
        after.iter().zip(&before).all(|(a, b)| a >= b),
        "committed offsets went back: {before:?} → {after:?}"
    );
}

/// Ctrl-C while a one-shot sync watches a killed daemon's leases (for up to 1.5 ×
/// `session_timeout`) ends the watch at once, with the usual stop message and exit 130,
/// instead of once the watch is over: nothing scanned, taken or applied, the report says
/// so, and the next sync mirrors.
#[test]
fn ctrl_c_while_a_one_shot_sync_watches_the_leases_stops_it_at_once() {
    let (daemon_env, oneshot) = killed_daemon_and_a_one_shot("oneshot-sigint");
    let (src, dst) = (daemon_env.src(), daemon_env.dst());
    write(src.join("b.txt"), "b\n");

    let log = oneshot.path("oneshot.log");
    let child = oneshot
        .cmd(&["sync", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("tidemark runs");
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let watching = wait_for(Duration::from_secs(30), || {
        stderr().contains("watching them").then_some(())
    });
    assert!(watching.is_some(), "no lease watch:\n{}", stderr());
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let signalled = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    eprintln!("the sync ended {took:?} after SIGINT");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let shown = format!(
        "{took:?} after SIGINT, {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        stderr()
    );
    assert_eq!(out.status.code(), Some(130), "{shown}");
    // The watch alone lasts up to 9 s here (session_timeout = 6s).
    assert!(took < Duration::from_secs(3), "{shown}");
    assert!(
        stderr().contains("SIGINT: stopping"),
        "the usual stop message; {shown}"
    );
    assert!(!stderr().contains("leased every partition"), "{shown}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert!(
        v[0]["interrupted"]
            .as_str()
            .unwrap_or_default()
            .contains("while waiting for the partition leases"),
        "{shown}"
    );
    let report_dir = v[0]["report_dir"]
        .as_str()
        .expect("the run wrote its report");
    assert!(std::path::Path::new(report_dir)
        .join("report.json")
        .is_file());
    assert!(!dst.join("b.txt").exists(), "nothing was applied; {shown}");

    // Once the dead daemon's leases have expired, the next sync mirrors.
    let (_, project) = oneshot.sync();
    assert_eq!(kind_outcome(&project, "file", "created"), 1, "{project}");
    assert_mirror(&src, &dst);
}

/// Each regular file below `root` by path → (inode, modification time): a file deleted
/// and made again, or rewritten, shows as a different pair.
fn inodes(root: &std::path::Path) -> std::collections::BTreeMap<String, (u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, (meta.ino(), meta.mtime(), meta.mtime_nsec()));
            }
        }
    }
    out
}

/// Review finding: changing the consumer `group` between runs made the next start project
/// the topic from offset 0 onto the live target, old deletes included (files the source
/// has were removed until later events put them back), without a word. Now a one-shot
/// `sync` and the daemon refuse, naming the group and the offsets, and touch nothing;
/// with the old group back, syncing goes on; `replay --from 0` rebuilds on purpose.
#[test]
fn changing_the_group_refuses_instead_of_replaying_the_topic_onto_the_target() {
    let brokers = kafka_brokers();
    let topic = unique("regroup");
    let (old, new) = (format!("{topic}-old"), format!("{topic}-new"));
    let env = Env::dirs(
        &kafka_log_section(&brokers, &topic, &old, 2),
        "prune = true",
    );
    let src = env.src();
    for i in 0..8 {
        write(src.join(format!("d/f{i}.txt")), format!("{i}\n"));
    }
    env.sync();
    // History: the topic holds deletes of files the source has again now.
    for i in 0..4 {
        std::fs::remove_file(src.join(format!("d/f{i}.txt"))).unwrap();
    }
    env.sync();
    for i in 0..4 {
        write(src.join(format!("d/f{i}.txt")), format!("{i} again\n"));
    }
    env.sync();
    assert_mirror(&src, &env.dst());
    let before = inodes(&env.dst());
    assert_eq!(before.len(), 8, "{before:?}");

    let text = std::fs::read_to_string(&env.config).unwrap();
    let with = |group: &str| {
        text.replace(
            &format!("group = \"{old}\""),
            &format!("group = \"{group}\""),
        )
    };
    env.write_config(&with(&new));
    let out = env.run(&["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("consumer group `{new}`"))
            && err.contains("behind")
            && err.contains("was changed")
            && err.contains("replay --pipeline t --from 0"),
        "{err}"
    );
    assert_eq!(
        inodes(&env.dst()),
        before,
        "the refused sync touched the target"
    );

    // The daemon refuses the same way, and keeps its hands off the target.
    let daemon = env.spawn_daemon();
    let refused = wait_for(Duration::from_secs(60), || {
        env.daemon_log()
            .contains(&format!(
                "consumer group `{new}` has committed offsets behind"
            ))
            .then_some(())
    });
    assert!(refused.is_some(), "log:\n{}", env.daemon_log());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(inodes(&env.dst()), before, "log:\n{}", env.daemon_log());
    assert!(daemon.terminate().success(), "log:\n{}", env.daemon_log());
    assert_eq!(inodes(&env.dst()), before, "log:\n{}", env.daemon_log());

    // The old group back: syncing goes on where it was, nothing written again.
    env.write_config(&with(&old));
    write(src.join("d/g.txt"), "new\n");
    let (_, project) = env.sync();
    // The new file and its directory's new time: nothing of the history again.
    assert_eq!(project["events"], 2, "{project}");
    assert_eq!(kind_outcome(&project, "file", "created"), 1, "{project}");
    assert_mirror(&src, &env.dst());

    // A rebuild on purpose with the new group: replay from 0, then sync.
    env.write_config(&with(&new));
    env.ok(&["replay", "--from", "0"]);
    env.sync();
    assert_mirror(&src, &env.dst());
}

/// Review finding: `status` of a `role = "project"` daemon said `no complete, error-free
/// scan yet` and `no scan yet` while the scanning daemon scanned normally, as if the
/// source were never read. It now says this daemon does not scan and where scans show.
#[test]
fn status_of_a_project_role_daemon_says_it_does_not_scan_instead_of_no_scan_yet() {
    let brokers = kafka_brokers();
    let topic = unique("roles");
    let kafka = kafka_log_section(&brokers, &topic, &topic, 1);
    let scanner = Env::dirs("", "");
    let projector = Env::dirs("", "");
    let (src, dst) = (scanner.src(), scanner.dst());
    scanner.write_config(&config(&src, &dst, "scan", &kafka));
    projector.write_config(&config(&src, &dst, "project", &kafka));
    write(src.join("a.txt"), "a\n");
    scanner.ok(&["scan"]);
    let said = projector.ok(&["status"]);
    assert!(
        said.contains("not scanned by this daemon (role = \"project\")")
            && said.contains("role \"scan\" or \"both\" scans"),
        "{said}"
    );
    assert!(
        !said.contains("no scan yet") && !said.contains("no complete, error-free scan yet"),
        "{said}"
    );
    let status = projector.json(&["status"]);
    assert_eq!(status[0]["role"], "project", "{status}");
    // The scanning side still shows its scan.
    let scanned = scanner.ok(&["status"]);
    assert!(scanned.contains("last scan "), "{scanned}");
}

/// Two daemons, `a` (role both) and `b` (role project), with `prune = false` on one
/// topic of 4 partitions, holding two partitions each, and the deletes of `DELETED` of
/// `FILES` mirrored files retained by both. Returns their envs (a's holds the source and
/// the target), the running daemons and the Kafka table of their configs.
fn both_retaining(name: &str) -> (Env, Env, Daemon, Daemon, String) {
    let brokers = kafka_brokers();
    let topic = unique(name);
    let kafka = kafka_log_section(&brokers, &topic, &topic, 4);
    let a_env = Env::dirs("", "");
    let b_env = Env::dirs("", "");
    let (src, dst) = (a_env.src(), a_env.dst());
    a_env.write_config(&config_with(&src, &dst, "both", &kafka, "prune = false"));
    b_env.write_config(&config_with(&src, &dst, "project", &kafka, "prune = false"));
    let b = b_env.spawn_daemon();
    let a = a_env.spawn_daemon();
    let logs = || format!("a:\n{}\nb:\n{}", a_env.daemon_log(), b_env.daemon_log());
    let halves = wait_for(Duration::from_secs(90), || {
        (held(&a_env.daemon_log()) == 2 && held(&b_env.daemon_log()) == 2).then_some(())
    });
    assert!(
        halves.is_some(),
        "the daemons split the partitions; {}",
        logs()
    );
    for i in 0..FILES {
        write(src.join(format!("f/{i:02}.txt")), format!("first {i}\n"));
    }
    let split = wait_for(Duration::from_secs(90), || {
        (mirrors_now(&src, &dst)
            && applied(&a_env.daemon_log(), "file", "created") > 0
            && applied(&b_env.daemon_log(), "file", "created") > 0)
            .then_some(())
    });
    assert!(split.is_some(), "both daemons project; {}", logs());
    for i in 0..DELETED {
        std::fs::remove_file(src.join(format!("f/{i:02}.txt"))).unwrap();
    }
    let retained = |d: &Daemon| {
        let s: serde_json::Value = d.get("/status").json().unwrap();
        s[0]["retained_deletes"].as_u64().unwrap_or(0)
    };
    let both = wait_for(Duration::from_secs(60), || {
        let (ra, rb) = (retained(&a), retained(&b));
        (ra > 0 && rb > 0 && ra + rb == DELETED as u64).then_some(())
    });
    assert!(
        both.is_some(),
        "both daemons retain deletes ({} and {}); {}",
        retained(&a),
        retained(&b),
        logs()
    );
    (a_env, b_env, a, b, kafka)
}

const FILES: usize = 40;

/// How many partitions a daemon log says the daemon holds now: those it leased, less
/// those it handed over or stopped projecting.
fn held(log: &str) -> usize {
    let leased: usize = log
        .lines()
        .filter(|l| l.contains("leased partitions"))
        .filter_map(|l| l.split("partitions=[").nth(1)?.split(']').next())
        .map(|list| list.split(',').filter(|p| !p.trim().is_empty()).count())
        .sum();
    let gone = log
        .lines()
        .filter(|l| {
            l.contains("handed a partition over to another daemon")
                || l.contains("stopped projecting the partition")
                || l.contains("stopped projecting it")
        })
        .count();
    leased.saturating_sub(gone)
}
const DELETED: usize = 20;

/// Waits until `daemon` has caught up (lag 0).
fn caught_up(daemon: &Daemon) {
    let caught_up = wait_for(Duration::from_secs(30), || {
        (daemon.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "lag stays above 0: {:?}",
        daemon.metrics()
    );
}

/// Checks that `verify` (run once the daemon of `env` has stopped) finds the target equal
/// to the source.
fn verified(env: &Env) {
    let out = env.run(&["verify"]);
    assert!(
        out.status.success(),
        "verify finds drift:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Review finding: deletes `b` retained while `prune = false` were applied after a
/// restart with `prune = true` although `a` had meanwhile taken b's partitions and
/// applied the source's re-created files: b deleted live files, lag 0, and `sync` did
/// nothing about it. A retained delete is applied only by the daemon holding its
/// partition, and only while the log's last event of the item is that delete.
#[test]
fn retained_deletes_of_a_daemon_that_lost_their_partitions_delete_no_live_file() {
    let (a_env, b_env, a, b, kafka) = both_retaining("retained-moved");
    let (src, dst) = (a_env.src(), a_env.dst());
    let logs = || format!("a:\n{}\nb:\n{}", a_env.daemon_log(), b_env.daemon_log());
    assert!(b.terminate().success());
    // a takes b's partitions and applies the files the source has again.
    for i in 0..DELETED {
        write(src.join(format!("f/{i:02}.txt")), format!("second {i}\n"));
    }
    let back = wait_for(Duration::from_secs(60), || {
        mirrors_now(&src, &dst).then_some(())
    });
    assert!(back.is_some(), "a applies the re-created files; {}", logs());
    assert!(a.terminate().success());

    a_env.write_config(&config_with(&src, &dst, "both", &kafka, "prune = true"));
    b_env.write_config(&config_with(&src, &dst, "project", &kafka, "prune = true"));
    let took_over = |env: &Env| env.daemon_log().matches("took over partitions").count();
    let (a_before, b_before) = (took_over(&a_env), took_over(&b_env));
    let a = a_env.spawn_daemon();
    let taken = wait_for(Duration::from_secs(60), || {
        (took_over(&a_env) > a_before).then_some(())
    });
    assert!(taken.is_some(), "a takes the partitions again; {}", logs());
    let b = b_env.spawn_daemon();
    let b_holds = wait_for(Duration::from_secs(90), || {
        (took_over(&b_env) > b_before).then_some(())
    });
    assert!(b_holds.is_some(), "b holds partitions again; {}", logs());
    // Time for b's idle passes, where the retained deletes are applied.
    std::thread::sleep(Duration::from_secs(5));
    assert!(mirrors_now(&src, &dst), "live files deleted; {}", logs());
    assert_mirror(&src, &dst);
    caught_up(&a);
    caught_up(&b);
    assert!(b.terminate().success());
    assert!(a.terminate().success());
    verified(&a_env);
    verified(&b_env);
}

/// Review finding: deletes retained by a daemon that is then retired were lost: with
/// `prune = true` on the daemon left, the deleted files stayed on the target for good,
/// lag 0, and `verify` said they were never listed in the source. The daemon that holds
/// a partition applies the deletes standing in the log there, whoever saw them first.
#[test]
fn retained_deletes_of_a_retired_daemon_are_applied_by_the_one_holding_their_partitions() {
    let (a_env, b_env, a, b, kafka) = both_retaining("retained-retired");
    let (src, dst) = (a_env.src(), a_env.dst());
    let logs = || format!("a:\n{}\nb:\n{}", a_env.daemon_log(), b_env.daemon_log());
    let took_over = a_env.daemon_log().matches("took over partitions").count();
    assert!(b.terminate().success());
    let taken = wait_for(Duration::from_secs(60), || {
        (a_env.daemon_log().matches("took over partitions").count() > took_over).then_some(())
    });
    assert!(taken.is_some(), "a takes b's partitions; {}", logs());
    assert!(a.terminate().success());
    // b is retired; a prunes from now on.
    a_env.write_config(&config_with(&src, &dst, "both", &kafka, "prune = true"));
    // Before a runs again, `verify` says the log holds the deletes of the files b saw
    // deleted, not that the source never listed them.
    let out = a_env.run(&["verify"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(4), "{said}");
    assert!(
        said.contains("the log's last event of") && !said.contains("never listed"),
        "{said}"
    );
    let a = a_env.spawn_daemon();
    let pruned = wait_for(Duration::from_secs(60), || {
        mirrors_now(&src, &dst).then_some(())
    });
    assert!(
        pruned.is_some(),
        "the deleted files stay on the target: {:?}; {}",
        (0..DELETED)
            .map(|i| format!("f/{i:02}.txt"))
            .filter(|f| dst.join(f).exists())
            .collect::<Vec<_>>(),
        logs()
    );
    assert_mirror(&src, &dst);
    caught_up(&a);
    assert!(a.terminate().success());
    verified(&a_env);
}

/// Review finding: a daemon with a shorter `session_timeout` took the partitions of a live
/// one with a longer one, which renews its leases every third of its own (60 s: every 20
/// s), judging them expired by its own 6 s; both projected the same partitions until the
/// other noticed, and a partition went back and forth every 20 s. A lease now declares
/// its holder's `session_timeout`, and expiry waits for the longer of the two.
#[test]
fn a_daemon_with_a_shorter_session_timeout_does_not_take_a_live_ones_partitions() {
    let brokers = kafka_brokers();
    let topic = unique("timeouts");
    let kafka = kafka_log_section(&brokers, &topic, &topic, 4);
    let long = Env::dirs("", "");
    let short = Env::dirs("", "");
    let (src, dst) = (long.src(), long.dst());
    long.write_config(&config(&src, &dst, "both", &kafka).replace("\"6s\"", "\"60s\""));
    short.write_config(&config(&src, &dst, "project", &kafka));
    let long_daemon = long.spawn_daemon();
    wait_for(Duration::from_secs(60), || {
        long.daemon_log()
            .contains("leased partitions")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no lease; log:\n{}", long.daemon_log()));
    let short_daemon = short.spawn_daemon();
    // Past 1.5 × 6 s twice over, and past the 60 s daemon's first renewal (20 s).
    std::thread::sleep(Duration::from_secs(25));
    let log = long.daemon_log();
    assert!(
        !log.contains("another daemon holds the partition now"),
        "the 6 s daemon took a live 60 s daemon's partitions; logs:\n{log}\n{}",
        short.daemon_log()
    );
    assert!(short_daemon.terminate().success());
    assert!(long_daemon.terminate().success());
}

/// Review finding: a one-shot `sync` refused while daemons held every partition named only
/// the holders it happened to see renewing first ("1 other process holds partitions 1,
/// 3" with two daemons holding all four). It now names every partition another process
/// holds, and how many processes hold them.
#[test]
fn a_refused_one_shot_names_every_daemon_and_partition_holding_the_group() {
    let brokers = kafka_brokers();
    let topic = unique("holders");
    let kafka = kafka_log_section(&brokers, &topic, &topic, 4);
    let (a_env, b_env, oneshot) = (Env::dirs("", ""), Env::dirs("", ""), Env::dirs("", ""));
    let (src, dst) = (a_env.src(), a_env.dst());
    a_env.write_config(&config(&src, &dst, "both", &kafka));
    b_env.write_config(&config(&src, &dst, "project", &kafka));
    oneshot.write_config(&config(&src, &dst, "both", &kafka));
    // Started a second apart, the two renew their leases at different times.
    let a = a_env.spawn_daemon();
    wait_for(Duration::from_secs(60), || {
        a_env
            .daemon_log()
            .contains("leased partitions")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("log:\n{}", a_env.daemon_log()));
    std::thread::sleep(Duration::from_millis(1000));
    let b = b_env.spawn_daemon();
    wait_for(Duration::from_secs(90), || {
        b_env
            .daemon_log()
            .contains("leased partitions")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("logs:\n{}\n{}", a_env.daemon_log(), b_env.daemon_log()));
    // Each try sees the two renew in another order; without the fix, a try that saw one
    // renew first named that one alone (3 runs of 3 failed within four tries).
    for _ in 0..4 {
        let out = oneshot.run(&["sync"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("2 other processes")
                && stderr.contains("hold partitions 0, 1, 2, 3 of topic"),
            "{stderr}"
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(b.terminate().success());
    assert!(a.terminate().success());
}

/// The partition of item `kind`/`key` on a topic of `partitions`.
fn partition(kind: &str, key: &str, partitions: u32) -> u32 {
    tidemark::log::kafka::partition_for(&tidemark::proto::item_identity(kind, key), partitions)
}

/// A file name in directory `dir` whose item falls in `wanted` of 2 partitions.
fn file_in(dir: &str, wanted: u32, tag: &str) -> String {
    (0..)
        .map(|i| format!("{dir}/{tag}{i}.txt"))
        .find(|key| partition("file", key, 2) == wanted)
        .unwrap()
}

/// Review finding: with two projecting daemons, a directory's time on the target went
/// wrong for good. The daemon that applied the directory's events before its partition
/// moved kept its applied version; when it later changed an entry of that directory (a
/// file of its own partition), it gave the directory back that stale time over the one
/// the partition's new holder had set. `verify` showed the drift, and `sync` did nothing.
#[test]
fn a_directorys_time_stays_right_when_its_partition_moved_to_another_daemon() {
    let brokers = kafka_brokers();
    let topic = unique("dirtimes");
    let kafka = kafka_log_section(&brokers, &topic, &topic, 2);
    let (a_env, b_env) = (Env::dirs("", ""), Env::dirs("", ""));
    let (src, dst) = (a_env.src(), a_env.dst());
    a_env.write_config(&config(&src, &dst, "both", &kafka));
    b_env.write_config(&config(&src, &dst, "project", &kafka));
    // One directory per partition, each with a file of each partition.
    let dirs: Vec<String> = (0..2)
        .map(|p| {
            (0..)
                .map(|i| format!("d{i}"))
                .find(|d| partition("dir", d, 2) == p)
                .unwrap()
        })
        .collect();
    for dir in &dirs {
        for p in 0..2 {
            write(src.join(file_in(dir, p, "f")), "first\n");
        }
    }
    // `a` alone applies every directory's events first.
    let a = a_env.spawn_daemon();
    wait_for(Duration::from_secs(60), || {
        mirrors_now(&src, &dst).then_some(())
    })
    .unwrap_or_else(|| panic!("log:\n{}", a_env.daemon_log()));
    caught_up(&a);
    // `b` takes one partition over; the directory of that partition is now b's to time.
    let b = b_env.spawn_daemon();
    let b_partition = wait_for(Duration::from_secs(90), || {
        let log = b_env.daemon_log();
        let line = log.lines().find(|l| l.contains("leased partitions"))?;
        line.split("partitions=[").nth(1)?[..1].parse::<u32>().ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "b leased nothing; logs:\n{}\n{}",
            a_env.daemon_log(),
            b_env.daemon_log()
        )
    });
    let dir = &dirs[b_partition as usize];
    // The handover done on a's side too (it commits before it lets go).
    std::thread::sleep(Duration::from_secs(2));
    // A new file of b's partition: b applies it and the directory's new time.
    write(src.join(file_in(dir, b_partition, "new")), "new\n");
    let times_equal = || {
        let s = std::fs::metadata(src.join(dir))
            .unwrap()
            .modified()
            .unwrap();
        let d = std::fs::metadata(dst.join(dir)).ok()?.modified().ok()?;
        (s == d).then_some(())
    };
    wait_for(Duration::from_secs(30), || {
        (mirrors_now(&src, &dst) && times_equal().is_some()).then_some(())
    })
    .unwrap_or_else(|| panic!("logs:\n{}\n{}", a_env.daemon_log(), b_env.daemon_log()));
    // A file of a's partition rewritten in place (the source directory's time does not
    // move): a replaces it on the target, which moves the directory's time there, and
    // gives the directory back its time.
    let a_file = src.join(file_in(dir, 1 - b_partition, "f"));
    std::fs::write(&a_file, "second\n").unwrap();
    wait_for(Duration::from_secs(30), || {
        mirrors_now(&src, &dst).then_some(())
    })
    .unwrap_or_else(|| panic!("logs:\n{}\n{}", a_env.daemon_log(), b_env.daemon_log()));
    caught_up(&a);
    caught_up(&b);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        times_equal().is_some(),
        "{dir}'s time on the target is not the source's; logs:\n{}\n{}",
        a_env.daemon_log(),
        b_env.daemon_log()
    );
    assert!(b.terminate().success());
    assert!(a.terminate().success());
    verified(&a_env);
}
