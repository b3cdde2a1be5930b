//! One-shot operator flows on directory pipelines (`replay`, `sync`, `plan`, `verify`)
//! as an operator re-syncing after a failure meets them: the real binary, real directories.

mod common;

use common::*;

/// Two directory pipelines, `pa` (source `a`, six files) and `pb` (source `b`, one file),
/// synced once.
fn two_pipelines() -> Env {
    let env = Env::dirs("", "");
    env.write_config(
        r#"state_dir = "state"
listen = "127.0.0.1:0"

[[pipeline]]
name = "pa"
[pipeline.source.dir]
path = "a"
[pipeline.target.dir]
path = "da"

[[pipeline]]
name = "pb"
[pipeline.source.dir]
path = "b"
[pipeline.target.dir]
path = "db"
"#,
    );
    for i in 0..6 {
        write(env.path("a").join(format!("{i}.txt")), format!("{i}"));
    }
    write(env.path("b").join("only.txt"), "b");
    env.ok(&["sync"]);
    env
}

fn committed(env: &Env) -> Vec<(String, u64)> {
    env.json(&["status"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["pipeline"].as_str().unwrap().to_owned(),
                s["committed"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `replay --from 4` without `--pipeline` on two pipelines, one of whose logs is shorter:
/// refused, and no pipeline moved (it used to replay `pa` and then fail on `pb`, exit 1,
/// leaving `pa` half-replayed behind an error that read as if nothing happened).
#[test]
fn replay_refused_for_one_pipeline_moves_none() {
    let env = two_pipelines();
    let before = committed(&env);
    assert_eq!(before, vec![("pa".into(), 6), ("pb".into(), 1)]);
    let out = env.run(&["replay", "--from", "4"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(committed(&env), before, "no committed offset moved");
    assert!(
        out.stdout.is_empty(),
        "nothing reported as replayed: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pipeline `pb`: --from 4 is past the log head 1")
            && stderr.contains("no pipeline was replayed"),
        "{stderr}"
    );
    // With the pipeline named, it works.
    env.ok(&["replay", "--pipeline", "pa", "--from", "4"]);
    assert_eq!(committed(&env), vec![("pa".into(), 4), ("pb".into(), 1)]);
}

/// Ctrl-C of a long one-shot `sync`: it used to die at once (exit 130 from the default
/// handler), printing nothing and leaving no report. Now it finishes and commits the batch
/// in flight, says so, leaves a report that counts what reached the target, exits 130,
/// and the next `sync` finishes the mirror.
#[test]
fn ctrl_c_of_a_one_shot_sync_commits_reports_and_exits_130() {
    let env = Env::dirs("batch_size = 64", "prune = true");
    for d in 0..40 {
        for f in 0..200 {
            write(
                env.src().join(format!("d{d}/f{f}")),
                noise(2048, (d * 1000 + f) as u64),
            );
        }
    }
    // Through `env --default-signal`: a harness started in the background may have SIGINT
    // ignored, while a terminal's Ctrl-C reaches a process with the default disposition.
    let mut cmd = std::process::Command::new("env");
    cmd.arg("--default-signal=INT")
        .arg(bin())
        .arg("--config")
        .arg(&env.config)
        .args(["sync", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Interrupt once the target has started to fill.
    let _ = wait_for(std::time::Duration::from_secs(60), || {
        std::fs::read_dir(env.dst().join("d0"))
            .ok()
            .and_then(|mut d| d.next())
    })
    .expect("the sync starts writing");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let interrupted = v[0]["interrupted"]
        .as_str()
        .expect("says it was interrupted");
    assert!(interrupted.contains("SIGINT"), "{interrupted}");
    // The report counts exactly what reached the target and was committed.
    let report_dir = v[0]["report_dir"].as_str().expect("a report was written");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{report_dir}/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["interrupted"].as_str(), Some(interrupted));
    let files_on_target = walk_target(&env.dst())
        .filter(|e| e.file_type().is_file())
        .count() as u64;
    assert!(files_on_target < 8000, "interrupted before the end");
    assert_eq!(
        kind_outcome(&report, "file", "created"),
        files_on_target,
        "{report}"
    );
    let status = &env.json(&["status"])[0];
    assert_eq!(
        status["committed"].as_u64(),
        report["counts"]["created"].as_u64(),
        "what the report counts is committed: {status}"
    );
    // The next sync goes on and finishes the mirror.
    env.ok(&["sync"]);
    assert_mirror(&env.src(), &env.dst());
}

/// A file whose place a non-empty directory holds (prune off) fails. `plan` and
/// `sync --dry-run` used to list it as `retry … (waiting since …)`, and the dry-run report
/// said `1 deferred`, `failures: none`: read at 3 a.m., the next sync looked like it would
/// settle it, while it fails again as long as the directory stays. Now both show the
/// failure and its reason, and the dry-run report lists it under `failures`.
#[test]
fn plan_and_dry_run_show_a_failed_item_with_its_reason() {
    let env = Env::dirs("max_delete = \"100%\"", "");
    write(env.src().join("x/a"), "a");
    env.ok(&["sync"]);
    std::fs::remove_dir_all(env.src().join("x")).unwrap();
    write(env.src().join("x"), "now a file");
    let out = env.run(&["sync"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let reason = "a directory that is not empty is in its place";
    for args in [&["plan"][..], &["sync", "--dry-run"]] {
        let out = env.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("retry file x"))
            .unwrap_or_else(|| panic!("{args:?}: {stdout}"));
        assert!(
            line.contains("failed ") && line.contains(reason) && !line.contains("waiting"),
            "{args:?}: {line}"
        );
        let v = env.json(args);
        let dir = v[0]["report_dir"].as_str().unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(format!("{dir}/report.json")).unwrap()).unwrap();
        let failures = report["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 1, "{args:?}: {report}");
        assert_eq!(failures[0]["key"], "x");
        assert!(
            failures[0]["reason"].as_str().unwrap().contains(reason),
            "{report}"
        );
        let summary = std::fs::read_to_string(format!("{dir}/summary.txt")).unwrap();
        assert!(summary.contains("failures: 1"), "{summary}");
    }
    // And the sync it previewed does fail again, the directory being still there.
    assert_eq!(env.run(&["sync"]).status.code(), Some(3));
}

/// A target changed by hand (a file altered, one removed, one added). `verify` said
/// `DRIFT` and nothing more, and README promised that `replay --from 0` then `project`
/// "repairs all of it"; it puts back the missing and different files, but the added one,
/// in no event, stays, and `verify` went on saying DRIFT. Now `verify` says what repairs
/// which, and following it leaves a clean target.
#[test]
fn verify_says_how_to_repair_a_hand_changed_target_and_that_works() {
    let env = Env::dirs("", "prune = true");
    for i in 0..4 {
        write(env.src().join(format!("{i}.txt")), format!("{i}"));
    }
    env.ok(&["sync"]);
    write(env.dst().join("1.txt"), "changed by hand");
    std::fs::remove_file(env.dst().join("2.txt")).unwrap();
    write(env.dst().join("stray.txt"), "added by hand");

    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("`tidemark replay --pipeline t --from 0` then `tidemark project`"),
        "{text}"
    );
    assert!(
        text.contains("remove them from the target by hand"),
        "{text}"
    );

    // The advice, followed.
    env.ok(&["replay", "--pipeline", "t", "--from", "0"]);
    env.ok(&["project"]);
    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4), "the stray file stays: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("--from 0"),
        "nothing left that a replay repairs: {text}"
    );
    assert!(
        text.contains("remove them from the target by hand"),
        "{text}"
    );
    std::fs::remove_file(env.dst().join("stray.txt")).unwrap();
    env.ok(&["verify"]);
    assert_mirror(&env.src(), &env.dst());
}

/// Files removed from the source, with more deletes than `max_delete` allows: the guard
/// withholds them, so they stay on the target and `verify` lists them as extra. It said
/// they "were never listed in the source" and must be removed by hand, when raising
/// `max_delete` (as the guard's own message says) deletes them. Now it says the last scan
/// withheld its deletes, and why.
#[test]
fn verify_says_extra_items_may_be_deletes_the_guard_withheld() {
    let env = Env::dirs("", "prune = true");
    for i in 0..4 {
        write(env.src().join(format!("{i}.txt")), format!("{i}"));
    }
    env.ok(&["sync"]);
    for i in 0..3 {
        std::fs::remove_file(env.src().join(format!("{i}.txt"))).unwrap();
    }
    assert_eq!(env.run(&["sync"]).status.code(), Some(3), "the guard trips");

    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the last scan emitted no deletes (the delete guard withheld 3: max_delete = 50% allows 2)"),
        "{text}"
    );
    assert!(
        !text.contains("the extra items were never listed in the source"),
        "{text}"
    );

    // What it says, followed: a scan the guard lets through deletes them.
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace("name = \"t\"", "name = \"t\"\nmax_delete = \"100%\""));
    env.ok(&["sync"]);
    env.ok(&["verify"]);
    assert_mirror(&env.src(), &env.dst());
}

/// Globs narrowed after files were mirrored: the scan would delete them, and the guard
/// withholds it (or `prune = false` retains it). `verify` said "target matches source",
/// exit 0, as it compared the target through the new globs. It now lists what tidemark
/// wrote there and why it stays, and leaves the target's own files the globs leave out.
#[test]
fn verify_sees_files_the_narrowed_globs_leave_out_while_their_deletes_are_withheld() {
    let env = Env::dirs("", "prune = true");
    for i in 0..4 {
        write(env.src().join(format!("a/{i}.txt")), format!("{i}"));
        write(env.src().join(format!("b/{i}.log")), format!("log {i}"));
    }
    env.ok(&["sync"]);
    // A file of the target's own, never written by tidemark and out of the globs.
    write(env.dst().join("own.log"), "kept by someone else");
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace(
        "[pipeline.source.dir]",
        "max_delete = \"1\"\n\n[pipeline.source.dir]\nexclude = [\"**/*.log\"]",
    ));
    assert_eq!(env.run(&["sync"]).status.code(), Some(3), "the guard trips");
    assert!(env.dst().join("b/0.log").exists());

    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 0..4 {
        assert!(text.contains(&format!("extra file b/{i}.log")), "{text}");
    }
    assert!(!text.contains("own.log"), "{text}");
    assert!(text.contains("the delete guard withheld"), "{text}");
    // The source still has them: its globs leave them out.
    assert!(
        text.contains("the source no longer lists") && text.contains("left out by its globs"),
        "{text}"
    );

    // What it says, followed: a scan the guard lets through deletes them.
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace("max_delete = \"1\"", "max_delete = \"100%\""));
    env.ok(&["sync"]);
    env.ok(&["verify"]);
    assert!(!env.dst().join("b/0.log").exists());
    assert!(env.dst().join("own.log").exists());
}

/// `status` while a one-shot `sync` holds the state cannot read it, and no daemon serves
/// it. It used to say "is the daemon running? `tidemark status` asks it over HTTP" and
/// that `listen.addr` cannot be read: now it names the sync (pid, command line, since
/// when) and says to try again once it has ended. A second `sync` is told the same.
#[test]
fn status_during_a_one_shot_sync_names_it_and_says_to_wait() {
    let env = Env::dirs("", "prune = true");
    for d in 0..40 {
        for f in 0..100 {
            write(env.src().join(format!("d{d}/f{f}")), format!("{d} {f}"));
        }
    }
    /// The sync, stopped (SIGSTOP) so it holds the state while the test looks; killed
    /// if the test fails.
    struct Held(std::process::Child);
    impl Drop for Held {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let signal = |pid: u32, signal| {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    };
    let mut held = Held(
        env.cmd(&["--quiet", "sync"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = held.0.id();
    wait_for(std::time::Duration::from_secs(30), || {
        let note = std::fs::read_to_string(env.path("state/holder")).ok()?;
        (note.lines().next()? == pid.to_string()).then_some(())
    })
    .expect("the sync notes that it holds the state");
    signal(pid, rustix::process::Signal::STOP);

    for args in [&["status"][..], &["sync"]] {
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "is in use by a one-shot `tidemark sync`, pid {pid} (`"
            )) && stderr.contains("sync`, since ")
                && stderr.contains("try again once it has ended"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("listen.addr") && !stderr.contains("daemon"),
            "{args:?}: {stderr}"
        );
    }

    signal(pid, rustix::process::Signal::CONT);
    assert!(held.0.wait().unwrap().success());
    assert_eq!(env.json(&["status"])[0]["lag_events"], 0);
    assert_mirror(&env.src(), &env.dst());
}
