//! Crash, fault and bad-input tests of the directory pipeline (issue 6): SIGKILL at random
//! instants, a full and a read-only target disk, a target parent that is a symbolic link,
//! a vanished source root, and graceful shutdown under load. Real binary, real
//! filesystems (a size-limited tmpfs for the full disk).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn committed(env: &Env) -> u64 {
    env.json(&["status"])[0]["committed"].as_u64().unwrap()
}

fn head(env: &Env) -> u64 {
    env.json(&["status"])[0]["head"].as_u64().unwrap()
}

#[test]
fn issue_6_random_sigkills_lose_nothing_and_apply_nothing_twice() {
    let env = Env::dirs(
        "batch_size = 16\nconcurrency = 4\nmax_delete = \"100%\"\nscan_interval = \"100ms\"",
        "prune = true",
    );
    let src = env.src();
    let mut rng = Rng(0x5eed);
    for i in 0..600 {
        write(
            src.join(format!("d{}/f{i}.txt", i % 12)),
            format!("initial {i}\n").repeat(1 + i % 50),
        );
    }
    // The test command runs a short version; `ops/soak.sh SECONDS` runs it for a duration.
    let soak = std::env::var("TIDEMARK_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let deadline = soak.map(|s| Instant::now() + Duration::from_secs(s));
    let mut kills = 0u64;
    let mut changes = 0u64;
    let mut last_committed = 0;
    let mut log_len = 0;
    loop {
        let round = kills;
        match deadline {
            Some(d) if Instant::now() >= d => break,
            None if kills >= 24 => break,
            _ => {}
        }
        let start_committed = committed(&env);
        assert!(
            start_committed >= last_committed,
            "round {round}: committed offset went backwards ({last_committed} → {start_committed})"
        );
        last_committed = start_committed;
        let daemon = env.spawn_daemon();
        // Change the source while the daemon scans and projects.
        for _ in 0..rng.below(40) {
            changes += 1;
            let i = rng.below(700);
            let path = src.join(format!("d{}/f{i}.txt", i % 12));
            match rng.below(4) {
                0 => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => write(
                    &path,
                    format!("round {round} value {}\n", rng.next()).repeat(1 + (i % 30) as usize),
                ),
            }
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(700)));
        daemon.kill9();
        kills += 1;
        let log = env.daemon_log();
        let this_run = &log[log_len..];
        log_len = log.len();
        let again: Vec<u64> = applied_offsets(this_run)
            .into_iter()
            .filter(|o| *o < start_committed)
            .collect();
        assert!(
            again.is_empty(),
            "round {round}: events below the committed offset {start_committed} applied again: {again:?}"
        );
    }

    // Quiesce: let one clean run catch up, then compare.
    let daemon = env.spawn_daemon();
    wait_for(Duration::from_secs(120), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        let s = &v[0];
        let caught_up = s["lag_events"] == 0 && s["last_scan"]["result"] == "ok";
        (caught_up && snapshot(&src) == snapshot(&env.dst())).then_some(())
    })
    .unwrap_or_else(|| {
        let status = daemon.get("/status").text().unwrap_or_default();
        eprintln!("did not converge after {kills} kills; status: {status}");
        assert_mirror(&src, &env.dst());
        panic!("did not converge after {kills} kills")
    });
    assert!(daemon.terminate().success());
    assert_mirror(&src, &env.dst());
    // Times too: a directory whose entries a killed run changed before its flush gets its
    // source time back when the replayed change notes it again.
    let out = env.run(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The log has no gap: offsets 0..head, each exactly once.
    let tail = env.ok(&["log", "tail", "--from", "0"]);
    let offsets: Vec<u64> = tail
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let expected: Vec<u64> = (0..head(&env)).collect();
    assert_eq!(offsets, expected, "the log has a gap or a duplicate");
    let applies = applied_offsets(&env.daemon_log()).len();
    println!(
        "soak figures: kills={kills} source_changes={changes} events={} writes={applies} \
         items={} reapplied_below_commit=0 lost=0 log_gaps=0",
        offsets.len(),
        snapshot(&src).len()
    );
}

/// A size-limited tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root with CAP_SYS_ADMIN (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_owned())
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn issue_6_a_full_target_disk_keeps_the_offset_corrupts_nothing_and_recovers() {
    let env = Env::dirs(
        "batch_size = 4\nconcurrency = 2\nretry_max_backoff = \"1s\"",
        "prune = true",
    );
    let disk = Tmpfs::mount(&env.dst(), "1m");
    for i in 0..12 {
        write(
            env.src().join(format!("big{i:02}.bin")),
            vec![b'a' + i as u8; 200 * 1024],
        );
    }
    let daemon = env.spawn_daemon();
    // The batch's ERROR, logged once the batch has ended and its error is counted; each
    // item the full disk failed said so at debug before then.
    wait_for(Duration::from_secs(30), || {
        env.daemon_log()
            .lines()
            .any(|l| l.contains(" ERROR ") && l.contains("disk is full"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no clear disk-full error; log:\n{}", env.daemon_log()));
    let status: serde_json::Value = daemon.get("/status").json().unwrap();
    let (c, h) = (
        status[0]["committed"].as_u64().unwrap(),
        status[0]["head"].as_u64().unwrap(),
    );
    assert!(
        c < h,
        "offset advanced past events that were not written ({c} of {h})"
    );
    // Whatever reached the target is whole: no torn file is visible.
    for entry in std::fs::read_dir(env.dst()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let name = entry.file_name();
            assert_eq!(
                std::fs::read(entry.path()).unwrap(),
                std::fs::read(env.src().join(&name)).unwrap(),
                "{name:?} is torn"
            );
        }
    }
    assert!(
        daemon.metric("tidemark_apply_errors_total{class=\"transient\",pipeline=\"t\"}") >= 1.0
    );
    // One warning per retry of the batch, not one per item it holds (those are debug).
    let log = env.daemon_log();
    let full: Vec<&str> = log.lines().filter(|l| l.contains("disk is full")).collect();
    assert!(
        full.iter().any(|l| l.contains(" ERROR ")) && full.iter().all(|l| !l.contains(" WARN ")),
        "item-level lines for a batch's failure:\n{}",
        full.join("\n")
    );

    disk.remount("size=16m");
    wait_for(Duration::from_secs(60), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (v[0]["lag_events"] == 0).then_some(())
    })
    .expect("projection recovered once space returned");
    assert!(daemon.terminate().success());
    assert_mirror(&env.src(), &env.dst());
}

/// A full disk under the state directory. sled keeps a failed write's error and fails
/// every later write with it, room or not, so the daemon stops with an error that names
/// the directory and the fix instead of failing every second while /healthz says it is
/// alive; once there is room, the next run finishes the mirror from where it was.
#[test]
fn a_full_state_disk_stops_the_daemon_with_a_clear_error_and_loses_nothing() {
    let env = Env::dirs("", "");
    let disk = Tmpfs::mount(&env.path("state"), "3m");
    for i in 0..6000 {
        write(
            env.src().join(format!("d{:02}/f{i:04}.txt", i % 50)),
            format!("file {i}\n"),
        );
    }
    let mut daemon = env.spawn_daemon();
    let status = wait_for(Duration::from_secs(60), || daemon.child.try_wait().unwrap())
        .unwrap_or_else(|| {
            panic!(
                "the daemon kept running on a broken state database; log:\n{}",
                env.daemon_log()
            )
        });
    assert_eq!(status.code(), Some(1), "{}", env.daemon_log());
    let log = env.daemon_log();
    let fatal = log.lines().last().unwrap_or_default();
    let state_dir = env.path("state").canonicalize().unwrap();
    assert!(
        fatal.starts_with("error: the state database failed: no space left on device")
            && fatal.contains(&format!(
                "the disk of the state directory ({}",
                state_dir.display()
            ))
            && fatal.contains("free space there")
            && fatal.contains("start it again"),
        "{fatal}"
    );
    assert!(
        !log.lines()
            .any(|l| (l.contains(" tidemark") || l.starts_with("error:")) && l.contains("Os {")),
        "an error in debug form:\n{log}"
    );

    disk.remount("size=64m");
    let (scan, project) = env.sync();
    assert_eq!(outcome(&project, "failed"), 0, "{project}");
    assert_eq!(scan["errors"], 0, "{scan}");
    assert_mirror(&env.src(), &env.dst());
}

/// A state disk that is full when a run opens the database: sled writes a snapshot at
/// every open, and the one a full disk cut short used to be read by every later open as
/// the newest, so the state stayed "corrupted" after space was freed (a crash loop under
/// a supervisor). Each run while the disk is full says so; the first run after space is
/// freed goes on, and the target is the mirror.
#[test]
fn a_state_disk_full_when_the_database_opens_recovers_once_there_is_space() {
    let env = Env::dirs("", "");
    let disk = Tmpfs::mount(&env.path("state"), "4m");
    for i in 0..200 {
        write(
            env.src().join(format!("d{:02}/f{i:03}.txt", i % 10)),
            format!("file {i}\n"),
        );
    }
    env.sync();
    // A second run: its open writes a snapshot, and its appends move the log past it, so
    // the next open has a new snapshot to write.
    write(env.src().join("d01/second.txt"), "second\n");
    env.sync();
    // Fill the disk to the last byte.
    let filler = env.path("state/filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let mut byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {
            byte[0] ^= 1;
        }
    }
    write(env.src().join("d00/new.txt"), "new\n");
    let state_dir = env.path("state").canonicalize().unwrap();
    for args in [&["status"][..], &["sync"], &["sync"]] {
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot open state directory {}", state_dir.display()))
                && stderr.contains("No space left on device (os error 28); the disk of the state directory is full: free space there")
                && stderr.matches("os error 28").count() == 1,
            "{args:?}: {stderr}"
        );
    }
    std::fs::remove_file(&filler).unwrap();
    let (scan, project) = env.sync();
    assert_eq!(scan["errors"], 0, "{scan}");
    assert_eq!(outcome(&project, "created"), 1, "{project}");
    assert_mirror(&env.src(), &env.dst());
    drop(disk);
}

/// A full `reports_dir` costs the report, not the run, and leaves nothing behind: the
/// hidden directory a report is written in was left at every failed write, and no
/// retention removed them.
#[test]
fn a_full_reports_disk_warns_and_leaves_no_half_written_report() {
    let env = Env::dirs("", "");
    write(env.src().join("a.txt"), "a\n");
    let reports = env.path("state/reports");
    let disk = Tmpfs::mount(&reports, "4k");
    write(reports.join("filler"), vec![b'x'; 4096]);
    for round in 0..2 {
        write(env.src().join(format!("r{round}.txt")), "r\n");
        let out = env.run(&["sync"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("cannot write report")
                && stderr.contains("the disk of `reports_dir` is full"),
            "{stderr}"
        );
    }
    assert_mirror(&env.src(), &env.dst());
    let left: Vec<_> = std::fs::read_dir(reports.join("t"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in reports_dir: {left:?}");
    drop(disk);
}

/// A target filesystem out of inodes, with space left, fails with ENOSPC as a full one
/// does: the error said "free space" only, while `df -h` showed plenty.
#[test]
fn a_target_out_of_inodes_says_so() {
    let env = Env::dirs("", "");
    for i in 0..40 {
        write(env.src().join(format!("f{i:02}.txt")), "x\n");
    }
    let disk = Tmpfs::mount(&env.dst(), "8m,nr_inodes=16");
    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("target disk is full: out of space or out of inodes")
            && stderr.contains("`df -i`"),
        "{stderr}"
    );
    drop(disk);
}

/// A `project` that a full target disk stops after some batches still writes its report:
/// it counts the files that reached the target and names the error, and under
/// `--log-format json` every stderr line, the fatal one last, is a JSON event.
#[test]
fn a_project_stopped_by_a_full_disk_reports_what_reached_the_target() {
    let env = Env::dirs("batch_size = 4\nconcurrency = 2", "prune = true");
    let disk = Tmpfs::mount(&env.dst(), "1m");
    for i in 0..12 {
        write(
            env.src().join(format!("big{i:02}.bin")),
            vec![b'a' + i as u8; 200 * 1024],
        );
    }
    env.ok(&["scan"]);
    let run = env.run(&["project", "--log-format", "json"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let fatal = events.last().unwrap();
    assert_eq!(fatal["level"], "ERROR", "{fatal}");
    let error = fatal["message"].as_str().unwrap();
    assert!(error.contains("disk is full"), "{error}");

    let dirs = env.report_dirs("t");
    let report = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
    };
    let dir = dirs
        .iter()
        .find(|d| report(d)["run"] == "project")
        .unwrap_or_else(|| panic!("the failed project left no report in {dirs:?}: {stderr}"));
    let r = report(dir);
    let reached: Vec<_> = std::fs::read_dir(env.dst())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .collect();
    for e in &reached {
        assert_eq!(
            std::fs::read(e.path()).unwrap(),
            std::fs::read(env.src().join(e.file_name())).unwrap(),
            "{:?} is torn",
            e.file_name()
        );
    }
    let first = reached.len() as u64;
    assert!((4..12).contains(&first), "{first} files reached the target");
    assert_eq!(r["counts"]["created"], first, "{r}");
    assert_eq!(r["error"], error, "{r}");
    let summary = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    assert!(
        summary.contains(&format!("applied before the error: {first} created")),
        "{summary}"
    );
    let written = format!("report written to {}", dir.display());
    assert!(
        events.iter().any(|e| e["message"] == written.as_str()),
        "no `{written}` event: {stderr}"
    );
    // The line on stdout counts what was applied, not the failing batch's events read.
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains(&format!(
            "t: applied {first} events before the error: {first} created"
        )),
        "{stdout}"
    );

    // With room again, the next run applies the rest: nothing twice, nothing lost.
    disk.remount("size=16m");
    let out = env.json(&["project"]);
    assert_eq!(out[0]["project"]["outcomes"]["created"], 12 - first);
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn issue_6_a_read_only_target_is_a_clear_error_and_recovers() {
    let env = Env::dirs("", "prune = true");
    let disk = Tmpfs::mount(&env.dst(), "8m");
    write(env.src().join("a.txt"), "a");
    disk.remount("ro");
    let out = env.run(&["sync"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("read-only"), "{stderr}");
    assert!(
        stderr.contains("a.txt"),
        "the error names the item: {stderr}"
    );
    assert_eq!(committed(&env), 0, "nothing committed");

    disk.remount("rw");
    env.ok(&["project"]);
    assert_mirror(&env.src(), &env.dst());
}

/// A link on the target where the source has a directory (put there by hand, or left by
/// an older item): the directory takes its place, as rsync would do, and nothing is
/// written through it to where it points.
#[test]
fn issue_6_a_symlinked_parent_on_the_target_is_never_written_through() {
    let env = Env::dirs("", "prune = true");
    let outside = env.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(env.dst()).unwrap();
    std::os::unix::fs::symlink(&outside, env.dst().join("sub")).unwrap();
    write(env.src().join("sub/file.txt"), "must not land outside");
    write(env.src().join("other.txt"), "fine");
    let (_, project) = env.sync();
    assert_eq!(outcome(&project, "failed"), 0, "{project}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through a symlinked parent"
    );
    let sub = std::fs::symlink_metadata(env.dst().join("sub")).unwrap();
    assert!(sub.is_dir(), "the link was replaced by a directory");
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn issue_6_a_vanished_source_root_deletes_nothing() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    write(env.src().join("a.txt"), "a");
    write(env.src().join("b/c.txt"), "c");
    env.sync();
    std::fs::rename(env.src(), env.path("src-moved")).unwrap();
    let out = env.run(&["sync"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be read"));
    std::fs::create_dir(env.src()).unwrap(); // an empty directory where the tree was
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace("max_delete = \"100%\"", "max_delete = \"50%\""));
    let out = env.run(&["sync"]);
    assert_eq!(out.status.code(), Some(3), "withheld deletes: degraded");
    assert!(env.dst().join("a.txt").exists() && env.dst().join("b/c.txt").exists());
    let status = env.json(&["status"]);
    assert_eq!(status[0]["delete_guard"]["would_delete"], 3, "{status}");
}

/// Review issue (lost deletes after a SIGKILL): a scan appends a batch to the log
/// (flushed) and then journals its index changes, which reach the disk only with a later
/// flush. A SIGKILL in between kept the events and lost the index entries; once the source
/// deleted the items, no scan emitted their deletes, and the target kept them for good
/// while `sync` said "nothing to do".
///
/// The killed state is built exactly rather than by a timed kill (which hits the gap about
/// one time in four): the state directory as it was before a scan, with that scan's events
/// appended to its log through the log's own `append`, is what the scanner leaves when it
/// dies after the append returned and before any of its index writes reached the disk.
#[test]
fn a_scan_killed_after_its_append_and_before_its_index_write_loses_no_delete() {
    use tidemark::log::{EventLog, SledLog};
    use tidemark::state::State;
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    write(env.src().join("base.txt"), "base");
    env.sync();
    for i in 0..40 {
        write(env.src().join(format!("n/f{i}")), i.to_string());
    }
    let (state_dir, before) = (env.path("state"), env.path("state-before-scan"));
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&state_dir)
        .arg(&before)
        .status()
        .unwrap();
    assert!(copied.success());
    let scan = env.json(&["scan"]);
    assert_eq!(scan[0]["scan"]["upserts"], 41, "{scan}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let scanned = State::open(&state_dir).unwrap();
        let scanned_log = SledLog::open(scanned.db(), "t").unwrap();
        let killed = State::open(&before).unwrap();
        let killed_log = SledLog::open(killed.db(), "t").unwrap();
        let from = killed_log.head(0).await.unwrap();
        let events: Vec<_> = scanned_log
            .read(0, from, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event.unwrap())
            .collect();
        assert_eq!(events.len(), 41);
        killed_log.append(events).await.unwrap();
    });
    drop(runtime);
    std::fs::remove_dir_all(&state_dir).unwrap();
    std::fs::rename(&before, &state_dir).unwrap();

    // The projector applies what the log holds; then the source deletes it all.
    env.ok(&["project"]);
    assert!(env.dst().join("n/f39").exists());
    std::fs::remove_dir_all(env.src().join("n")).unwrap();
    let (scan, project) = env.sync();
    assert_eq!(
        (scan["upserts"].as_u64(), scan["deletes"].as_u64()),
        (Some(0), Some(41)),
        "{scan}"
    );
    assert_eq!(outcome(&project, "deleted"), 41, "{project}");
    assert!(
        !env.dst().join("n").exists(),
        "the deleted items stay on the target"
    );
    assert_mirror(&env.src(), &env.dst());
    let (scan, _) = env.sync();
    assert_eq!(
        (scan["upserts"].as_u64(), scan["deletes"].as_u64()),
        (Some(0), Some(0)),
        "{scan}"
    );
}

#[test]
fn issue_6_sigterm_during_heavy_projection_commits_and_exits_zero() {
    let env = Env::dirs("batch_size = 50\nscan_interval = \"1h\"", "prune = true");
    for i in 0..3000 {
        write(
            env.src().join(format!("x{}/f{i}", i % 30)),
            format!("{i}").repeat(100),
        );
    }
    env.ok(&["scan"]);
    let daemon = env.spawn_daemon();
    wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (v[0]["committed"].as_u64()? > 0).then_some(())
    })
    .expect("projection started");
    let t0 = Instant::now();
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let c = committed(&env);
    // Everything below the committed offset is on the target; the rest follows on restart.
    env.ok(&["project"]);
    assert!(committed(&env) >= c);
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn issue_6_state_directory_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::dirs("", "");
    write(env.src().join("a"), "a");
    env.sync();
    let mode = std::fs::metadata(env.path("state"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "state directory mode {mode:o}");
}

#[test]
fn issue_6_a_second_signal_exits_at_once_and_loses_nothing() {
    let env = Env::dirs("batch_size = 10\nscan_interval = \"1h\"", "prune = true");
    for i in 0..2000 {
        write(
            env.src().join(format!("s{}/f{i}", i % 20)),
            format!("{i}").repeat(200),
        );
    }
    env.ok(&["scan"]);
    let mut daemon = env.spawn_daemon();
    wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (v[0]["committed"].as_u64()? > 0).then_some(())
    })
    .expect("projection started");
    daemon.signal("TERM");
    daemon.signal("TERM");
    let status = daemon.child.wait().unwrap();
    assert!(status.code() == Some(130) || status.success(), "{status:?}");
    // Whatever was committed is on the target; a restart finishes the rest.
    env.ok(&["project"]);
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn issue_6_symlink_loops_are_listing_errors_and_block_deletes() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace("path = \"src\"", "path = \"src\"\nfollow_symlinks = true"));
    write(env.src().join("a/file.txt"), "a");
    write(env.src().join("doomed.txt"), "d");
    env.sync();
    std::fs::remove_file(env.src().join("doomed.txt")).unwrap();
    std::os::unix::fs::symlink("..", env.src().join("a/loop")).unwrap();
    let out = env.run(&["sync", "--output", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("symbolic link loop"), "{stderr}");
    assert!(
        env.dst().join("doomed.txt").exists(),
        "a scan with a loop emitted deletes"
    );
}

#[test]
fn issue_6_very_long_names_are_mirrored() {
    let env = Env::dirs("", "prune = true");
    let long = "n".repeat(255);
    let mut deep = env.src();
    for _ in 0..12 {
        deep = deep.join("d".repeat(200));
    }
    write(env.src().join(&long), "longest name");
    write(deep.join(&long), "deep and long");
    let (scan, _) = env.sync();
    assert_eq!(scan["errors"], 0, "{scan}");
    assert_mirror(&env.src(), &env.dst());
}

/// Peak resident memory of a process in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn issue_6_a_large_file_is_streamed_not_loaded() {
    let env = Env::dirs("", "prune = true");
    let size: u64 = 1 << 30;
    {
        let f = std::fs::File::create(env.src().join("one-gib.img")).unwrap();
        f.set_len(size).unwrap(); // sparse: reads as zeros without using disk
        use std::io::{Seek, Write};
        let mut f = f;
        f.seek(std::io::SeekFrom::Start(size / 2)).unwrap();
        f.write_all(b"a marker in the middle").unwrap();
    }
    let daemon = env.spawn_daemon();
    wait_for(Duration::from_secs(300), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        let s = &v[0];
        (s["lag_events"] == 0 && s["head"].as_u64()? > 0).then_some(())
    })
    .expect("the large file was mirrored");
    let rss = peak_rss(daemon.child.id());
    assert!(
        rss < 150 * 1024 * 1024,
        "peak RSS {} MiB while copying 1 GiB",
        rss >> 20
    );
    assert!(daemon.terminate().success());
    assert_eq!(
        std::fs::metadata(env.dst().join("one-gib.img"))
            .unwrap()
            .len(),
        size
    );
    let out = env.run(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn issue_6_status_requires_the_bearer_token_which_never_leaks() {
    let env = Env::dirs("", "prune = true");
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&format!(
        "status_token_env = \"TM_RELIABILITY_TOKEN\"\n{config}"
    ));
    let token = "s3cr3t-status-token-4711";
    // SAFETY of the test: the variable name is unique to this test.
    std::env::set_var("TM_RELIABILITY_TOKEN", token);
    write(env.src().join("a.txt"), "a");
    let daemon = env.spawn_daemon();
    assert_eq!(daemon.get("/status").status(), 401);
    let client = reqwest::blocking::Client::new();
    let url = format!("http://{}/status", daemon.addr);
    assert_eq!(
        client
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client.get(&url).bearer_auth(token).send().unwrap().status(),
        200
    );
    assert!(daemon.addr.starts_with("127.0.0.1:"));
    // The CLI asks the running daemon (sled admits one process) with the same token.
    let status = env.ok(&["status"]);
    assert!(status.contains("pipeline t"), "{status}");
    // Without it, `status` says which variable to export.
    let refused = env
        .cmd(&["status"])
        .env_remove("TM_RELIABILITY_TOKEN")
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        refused.contains("401") && refused.contains("export TM_RELIABILITY_TOKEN"),
        "{refused}"
    );
    let wrong = env
        .cmd(&["status"])
        .env("TM_RELIABILITY_TOKEN", "wrong")
        .output()
        .unwrap();
    let wrong = String::from_utf8_lossy(&wrong.stderr).into_owned();
    assert!(
        wrong.contains("refused the token in TM_RELIABILITY_TOKEN") && !wrong.contains("wrong"),
        "{wrong}"
    );
    let metrics = daemon.get("/metrics").text().unwrap();
    assert!(daemon.terminate().success());
    for (what, text) in [
        ("log", env.daemon_log()),
        ("metrics", metrics),
        ("status", status),
        ("refused status", refused),
    ] {
        assert!(!text.contains(token), "the token leaked into the {what}");
    }
}

#[test]
fn issue_6_memory_stays_bounded_while_the_target_is_down_and_the_log_grows() {
    let env = Env::dirs(
        "scan_interval = \"300ms\"\nretry_max_backoff = \"1s\"",
        "prune = true",
    );
    // A regular file where the target directory should be: every write fails transiently.
    write(env.dst(), "not a directory");
    let daemon = env.spawn_daemon();
    let pid = daemon.child.id();
    let mut written = 0;
    for round in 0..3 {
        for i in 0..4000 {
            write(
                env.src().join(format!("r{round}/f{i}.txt")),
                format!("{round}-{i}").repeat(20),
            );
        }
        written += 4000;
        let expected = written;
        wait_for(Duration::from_secs(60), || {
            let v: serde_json::Value = daemon.get("/status").json().ok()?;
            (v[0]["head"].as_u64()? >= expected).then_some(())
        })
        .expect("the scanner keeps appending while the target is down");
    }
    let status: serde_json::Value = daemon.get("/status").json().unwrap();
    assert_eq!(
        status[0]["committed"], 0,
        "nothing can be committed while the target is down"
    );
    assert!(status[0]["lag_events"].as_u64().unwrap() >= 12_000);
    let rss = peak_rss(pid);
    eprintln!("peak RSS with 12 000 events waiting: {} MiB", rss >> 20);
    assert!(
        rss < 100 * 1024 * 1024,
        "peak RSS {} MiB with 12 000 events waiting",
        rss >> 20
    );

    // The target comes back: everything lands.
    std::fs::remove_file(env.dst()).unwrap();
    wait_for(Duration::from_secs(180), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (v[0]["lag_events"] == 0).then_some(())
    })
    .expect("caught up once the target returned");
    assert!(daemon.terminate().success());
    assert_mirror(&env.src(), &env.dst());
}

/// A target subdirectory the daemon's user may not write (another user's) fails its own
/// items, named with their path; the other items are applied and committed, as `rsync`
/// goes on past what it cannot write (its exit 23). Fixing the ownership and replaying
/// from the printed offset brings the failed items over.
#[test]
fn a_target_subdirectory_that_cannot_be_written_fails_only_its_own_items() {
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    assert_eq!(
        uid.trim(),
        "0",
        "this test hands the target to user nobody and keeps one directory root's: run it as root (.ci/run does)"
    );
    let env = Env::dirs("batch_size = 1", "");
    for f in ["a.txt", "sub/b.txt", "zz1.txt", "zz2.txt", "zz3.txt"] {
        write(env.src().join(f), f);
    }
    std::fs::create_dir_all(env.dst()).unwrap();
    let chown = |who: &str, path: &Path| {
        let status = Command::new("chown")
            .args(["-R", who])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    };
    chown("65534:65534", env.dir.path());
    std::fs::create_dir(env.dst().join("sub")).unwrap();
    let as_nobody = |args: &[&str]| {
        use std::os::unix::process::CommandExt;
        env.cmd(args).uid(65534).gid(65534).output().unwrap()
    };

    let out = as_nobody(&["sync"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    for f in ["a.txt", "zz1.txt", "zz2.txt", "zz3.txt"] {
        assert_eq!(std::fs::read_to_string(env.dst().join(f)).unwrap(), f);
    }
    assert!(!env.dst().join("sub/b.txt").exists());
    let sub = env.dst().join("sub");
    assert!(
        stdout.contains("FAILED") && stdout.contains(&*sub.to_string_lossy()),
        "the failure names the target path:\n{stdout}"
    );
    assert_eq!(
        committed(&env),
        head(&env),
        "the failures held up the offset"
    );

    chown("65534:65534", &sub);
    let hint = stdout
        .lines()
        .find_map(|l| l.split("tidemark replay").nth(1))
        .unwrap_or_else(|| panic!("no replay hint:\n{stdout}"));
    let from: String = hint
        .split("--from ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    for args in [&["replay", "--from", &from][..], &["project"]] {
        let out = as_nobody(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_mirror(&env.src(), &env.dst());
}

/// A full target disk stalls the daemon's projector, which retries the batch with backoff:
/// `status` (text, JSON and `/status`) says that it retries, since when, how many times and
/// on what error, where it showed only the lag growing; and stops saying it once a batch
/// goes through.
#[test]
fn a_projector_retrying_on_a_full_target_disk_says_so_in_status_until_a_batch_succeeds() {
    let env = Env::dirs("retry_max_backoff = \"1s\"", "");
    let disk = Tmpfs::mount(&env.dst(), "2m");
    write(env.src().join("big.bin"), noise(3 * 1024 * 1024, 7));
    let before = chrono::Utc::now();
    let daemon = env.spawn_daemon();
    let retrying = |v: &serde_json::Value| v[0]["projector_retrying"].clone();
    let status = wait_for(Duration::from_secs(60), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (retrying(&v)["attempts"].as_u64()? >= 2).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "/status never said the projector retries; log:\n{}",
            env.daemon_log()
        )
    });
    let r = retrying(&status);
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("big.bin") && error.contains("No space left on device"),
        "{status}"
    );
    assert!(
        !error.starts_with("pipeline `t`"),
        "the status names the pipeline: {status}"
    );
    let since: chrono::DateTime<chrono::Utc> = r["since"].as_str().unwrap().parse().unwrap();
    assert!(since >= before && since <= chrono::Utc::now(), "{status}");
    assert!(r["next_attempt_at"].is_string(), "{status}");
    assert!(status[0]["lag_events"].as_u64().unwrap() >= 1, "{status}");

    let text = env.ok(&["status"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("  projector: retrying since "))
        .unwrap_or_else(|| panic!("status does not say the projector retries:\n{text}"));
    assert!(
        line.contains(" failed attempts") && line.contains("No space left on device"),
        "{text}"
    );
    let v = env.json(&["status"]);
    assert!(retrying(&v)["attempts"].as_u64().unwrap() >= 2, "{v}");

    disk.remount("size=16m");
    wait_for(Duration::from_secs(60), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (v[0]["lag_events"] == 0 && retrying(&v).is_null()).then_some(())
    })
    .unwrap_or_else(|| panic!("the retrying did not end; log:\n{}", env.daemon_log()));
    let text = env.ok(&["status"]);
    assert!(!text.contains("projector: retrying"), "{text}");
    // Logged just after the retrying ends (what `/status` showed).
    wait_for(Duration::from_secs(10), || {
        env.daemon_log()
            .contains("the projector goes on: a batch succeeded after")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("its end is not logged:\n{}", env.daemon_log()));
    assert!(daemon.terminate().success());
    assert_mirror(&env.src(), &env.dst());
}

/// A daemon restarted while its projector retries a full target disk says the outage
/// lasts since it began (`status` counted it from the restart, hiding how long the target
/// had been down); the state forgets it once a batch goes through, so the next outage
/// counts from its own start.
#[test]
fn a_restart_during_a_target_outage_keeps_its_start() {
    let env = Env::dirs("retry_max_backoff = \"300ms\"", "");
    let disk = Tmpfs::mount(&env.dst(), "2m");
    write(env.src().join("big.bin"), noise(3 * 1024 * 1024, 7));
    let daemon = env.spawn_daemon();
    let first = daemon.retrying_past(2, &env);
    assert!(daemon.terminate().success());

    let daemon = env.spawn_daemon();
    let again = daemon.retrying_past(first["attempts"].as_u64().unwrap(), &env);
    assert_eq!(again["since"], first["since"], "{again}");
    let since: chrono::DateTime<chrono::Utc> = first["since"].as_str().unwrap().parse().unwrap();
    let text = env.ok(&["status"]);
    assert!(
        text.contains(&format!(
            "projector: retrying since {}",
            since.format("%Y-%m-%d %H:%M:%S UTC")
        )),
        "{text}"
    );
    disk.remount("size=16m");
    daemon.caught_up(&env);
    assert!(daemon.terminate().success());

    // The next outage starts anew.
    let back = chrono::Utc::now();
    disk.remount("size=5m");
    write(env.src().join("big2.bin"), noise(3 * 1024 * 1024, 8));
    let daemon = env.spawn_daemon();
    let next = daemon.retrying_past(0, &env);
    let next_since: chrono::DateTime<chrono::Utc> =
        next["since"].as_str().unwrap().parse().unwrap();
    assert!(next_since > back, "{next}");
    disk.remount("size=16m");
    daemon.caught_up(&env);
    assert!(daemon.terminate().success());
    assert_mirror(&env.src(), &env.dst());
}

/// A daemon stopped during a target outage leaves it in the state: `status` with no
/// daemon running says what its projector was retrying when it stopped (it said nothing
/// of it), and a one-shot `sync` whose batch goes through forgets it (only the next daemon
/// did, logging as just ended an outage long over).
#[test]
fn a_stopped_daemons_outage_shows_in_status_until_a_one_shot_run_goes_through() {
    let (env, daemon, r) = a_daemon_retrying_a_target_moved_aside(2);
    assert!(daemon.terminate().success());
    std::fs::rename(env.path("dst-aside"), env.dst()).unwrap();

    let status = env.json(&["status"]);
    let was = &status[0]["projector_was_retrying"];
    assert_eq!(was["since"], r["since"], "{status}");
    assert!(was["attempts"].as_u64().unwrap() > 2, "{status}");
    assert!(
        was["error"].as_str().unwrap().contains("is gone"),
        "{status}"
    );
    let text = env.ok(&["status"]);
    assert!(
        text.contains("NO DAEMON RUNNING")
            && text.contains("projector: was retrying since ")
            && text.contains("when the daemon stopped"),
        "{text}"
    );

    let (_, project) = env.sync();
    assert_eq!(project["by_kind"]["file"]["created"], 1, "{project}");
    let status = env.json(&["status"]);
    assert!(status[0]["projector_was_retrying"].is_null(), "{status}");
    let text = env.ok(&["status"]);
    assert!(!text.contains("was retrying"), "{text}");
    // The next daemon has no outage to take up and end.
    catches_up_having_said_it_goes_on(&env, env.spawn_daemon(), 0);
}

/// A daemon that synced `a.txt`, whose target directory was moved aside (to `dst-aside`)
/// before `b.txt` was written, once its projector has retried past `attempts`; with its
/// `projector_retrying` then.
fn a_daemon_retrying_a_target_moved_aside(attempts: u64) -> (Env, Daemon, serde_json::Value) {
    let env = Env::dirs("retry_max_backoff = \"300ms\"", "");
    write(env.src().join("a.txt"), "a");
    env.sync();
    let daemon = env.spawn_daemon();
    std::fs::rename(env.dst(), env.path("dst-aside")).unwrap();
    write(env.src().join("b.txt"), "b");
    let retrying = daemon.retrying_past(attempts, &env);
    (env, daemon, retrying)
}

/// `daemon` catches up and stops cleanly, its target the source's mirror, having logged
/// `the projector goes on` `times` times.
fn catches_up_having_said_it_goes_on(env: &Env, daemon: Daemon, times: usize) {
    daemon.caught_up(env);
    assert!(daemon.terminate().success());
    assert_eq!(
        env.log_lines("INFO", "the projector goes on"),
        times,
        "{}",
        env.daemon_log()
    );
    assert_mirror(&env.src(), &env.dst());
}

/// A target unavailable for many retries is logged as an ERROR once, when it begins; at
/// debug while the retries meet the same error; as a warning when the error changes; at
/// info when a batch goes through (the ERROR came at every retry, and flooded the log of a
/// daemon left so overnight).
#[test]
fn a_target_unavailable_for_many_retries_is_logged_when_it_begins_changes_and_ends() {
    let (env, daemon, r) = a_daemon_retrying_a_target_moved_aside(8);
    let attempts = r["attempts"].as_u64().unwrap();
    let lines = |level: &str, what: &str| env.log_lines(level, what);
    let gone = format!("the target directory {} is gone", env.dst().display());
    assert_eq!(lines("ERROR", &gone), 1, "{}", env.daemon_log());
    assert!(lines("DEBUG", &gone) >= 5, "{}", env.daemon_log());

    // Another error: the target's path is a file now.
    write(env.dst(), "not a directory");
    let r = daemon.retrying_past(attempts + 4, &env);
    let error = r["error"].as_str().unwrap().to_owned();
    assert!(!error.contains("is gone"), "{r}");
    assert_eq!(
        lines("WARN", "target unavailable"),
        1,
        "{}",
        env.daemon_log()
    );

    std::fs::remove_file(env.dst()).unwrap();
    std::fs::rename(env.path("dst-aside"), env.dst()).unwrap();
    catches_up_having_said_it_goes_on(&env, daemon, 1);
    assert_eq!(
        lines("ERROR", "target unavailable"),
        1,
        "{}",
        env.daemon_log()
    );
    assert_eq!(
        lines("WARN", "target unavailable"),
        1,
        "{}",
        env.daemon_log()
    );
}

/// The target directory removed under a running daemon is not made again empty: the
/// projector retries and `status` says the target is gone (it made `dst/` again with the
/// next change alone, and status, metrics and `sync` all read 0 lag). Put back, it goes
/// on. A one-shot run on a state that applied items refuses a missing target, and
/// `replay --from 0` then `project` builds it anew.
#[test]
fn a_target_directory_removed_is_not_made_again_empty() {
    let env = Env::dirs("retry_max_backoff = \"1s\"", "prune = true");
    write(env.src().join("a/x.txt"), "x");
    write(env.src().join("y.txt"), "y");
    env.sync();
    let daemon = env.spawn_daemon();
    wait_for(Duration::from_secs(30), || {
        (daemon.metric(r#"tidemark_scans_total{pipeline="t",result="ok"}"#) >= 1.0).then_some(())
    })
    .unwrap_or_else(|| panic!("no scan; log:\n{}", env.daemon_log()));
    std::fs::rename(env.dst(), env.path("dst-aside")).unwrap();
    write(env.src().join("z.txt"), "z");
    let retrying = |v: &serde_json::Value| v[0]["projector_retrying"].clone();
    let status = wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        retrying(&v)["error"].as_str().is_some().then_some(v)
    })
    .unwrap_or_else(|| panic!("no retrying in /status; log:\n{}", env.daemon_log()));
    let error = retrying(&status)["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains(&format!("{} is gone", env.dst().display())),
        "{status}"
    );
    assert!(!env.dst().exists(), "the target was made again");
    assert!(status[0]["lag_events"].as_u64().unwrap() >= 1, "{status}");

    std::fs::rename(env.path("dst-aside"), env.dst()).unwrap();
    wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = daemon.get("/status").json().ok()?;
        (v[0]["lag_events"] == 0 && retrying(&v).is_null()).then_some(())
    })
    .unwrap_or_else(|| panic!("the retrying did not end; log:\n{}", env.daemon_log()));
    assert!(daemon.terminate().success());
    assert_mirror(&env.src(), &env.dst());

    std::fs::remove_dir_all(env.dst()).unwrap();
    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not exist, but items were applied to it")
            && stderr.contains("replay --pipeline t --from 0"),
        "{stderr}"
    );
    assert!(!env.dst().exists(), "the target was made again");
    env.ok(&["replay", "--from", "0"]);
    env.ok(&["project"]);
    assert_mirror(&env.src(), &env.dst());
}

/// A target filesystem unmounted while tidemark was stopped leaves its empty mountpoint
/// at the target's path. Taken for the target, the applied state would skip everything
/// the filesystem holds and write only what comes next into the mountpoint, while lag
/// read 0.
#[test]
fn a_target_filesystem_unmounted_while_stopped_is_not_taken_for_the_mirror() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a/x.txt"), "x");
    write(env.src().join("y.txt"), "y");
    let mount = Tmpfs::mount(&env.dst(), "8m");
    env.sync();
    assert_mirror(&env.src(), &env.dst());
    drop(mount);
    write(env.src().join("z.txt"), "z");
    for command in ["sync", "project"] {
        let out = env.run(&[command]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "the target directory {} was the root of a mounted filesystem and is no longer one",
                env.dst().display()
            )) && stderr.contains("replay --pipeline t --from 0"),
            "{command}: {stderr}"
        );
    }
    assert_eq!(
        entries(&env.dst()),
        0,
        "something was written into the mountpoint"
    );
    // Building the target anew where it is now, as the message says, is taken as the
    // new normal.
    env.ok(&["replay", "--from", "0"]);
    env.ok(&["sync"]);
    assert_mirror(&env.src(), &env.dst());
    write(env.src().join("w.txt"), "w");
    env.ok(&["sync"]);
    assert_mirror(&env.src(), &env.dst());
}

/// A source filesystem unmounted while tidemark was stopped leaves its empty mountpoint
/// at the source's path. Listed as the source, it would delete everything on the target
/// (with `max_delete` allowing it, as here).
#[test]
fn a_source_filesystem_unmounted_while_stopped_deletes_nothing() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    let mount = Tmpfs::mount(&env.src(), "8m");
    write(env.src().join("a/x.txt"), "x");
    write(env.src().join("y.txt"), "y");
    env.sync();
    let before = snapshot(&env.dst());
    assert_eq!(before.len(), 3, "{before:?}");
    drop(mount);
    for args in [&["sync", "--dry-run"][..], &["sync"], &["scan"]] {
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "the source directory {} is empty and no longer the root of a mounted filesystem",
                env.src().display()
            )),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(snapshot(&env.dst()), before, "the target changed");
    // A source meant to be this directory from now on: an entry in it, and the next scan
    // takes it as it is.
    write(env.src().join("new.txt"), "new");
    env.ok(&["sync"]);
    assert_mirror(&env.src(), &env.dst());
}

/// A run killed after it wrote some files and before it committed them leaves the new
/// bytes on the target, with the source's mode and time, while the applied state still
/// holds the earlier version. The next run wrote them all again (a review found 458 of
/// 1999 rewritten after a SIGKILL); it now recognises them by size and time, checks their
/// bytes, and keeps them without a write.
#[test]
fn files_a_killed_run_wrote_before_its_commit_are_not_written_again() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::dirs("", "prune = true");
    for i in 0..20 {
        write(env.src().join(format!("f{i:02}")), format!("one {i}"));
    }
    env.sync();
    for i in 0..20 {
        write(
            env.src().join(format!("f{i:02}")),
            format!("two {i}, longer"),
        );
    }
    env.ok(&["scan"]);
    // What the killed projector left: half of the new files written, mode and time
    // given as the source has them.
    let inodes = |range: std::ops::Range<usize>| -> Vec<u64> {
        range
            .map(|i| {
                std::fs::metadata(env.dst().join(format!("f{i:02}")))
                    .unwrap()
                    .ino()
            })
            .collect()
    };
    for i in 0..10 {
        let name = format!("f{i:02}");
        let status = std::process::Command::new("cp")
            .arg("-p")
            .arg(env.src().join(&name))
            .arg(env.dst().join(&name))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let written = inodes(0..10);
    // `plan` says what `project` then does.
    let plan = env.json(&["plan"]);
    let actions: Vec<(String, String)> = plan[0]["actions"]
        .as_array()
        .unwrap_or_else(|| panic!("{plan}"))
        .iter()
        .map(|a| {
            (
                a["key"].as_str().unwrap().to_owned(),
                a["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (key, action) in &actions {
        let first_half = key.as_str() < "f10";
        assert_eq!(
            action,
            if first_half { "adopt" } else { "update" },
            "{key}: {plan}"
        );
    }
    assert_eq!(actions.len(), 20, "{plan}");
    let out = env.json(&["project"]);
    let outcomes = &out[0]["project"]["outcomes"];
    assert_eq!(outcomes["adopted"], 10, "{out}");
    assert_eq!(outcomes["updated"], 10, "{out}");
    assert_eq!(
        inodes(0..10),
        written,
        "the files already written were written again"
    );
    assert_mirror(&env.src(), &env.dst());
}

/// Copies the directory `from` to `to` as it is (`cp -a`).
fn copy_dir(from: &Path, to: &Path) {
    let copied = Command::new("cp").arg("-a").arg(from).arg(to).status();
    assert!(copied.unwrap().success());
}

/// A state restored from a backup has not seen what the newer history did to the target:
/// a file it created that the source deleted since stayed for good, and a file it deleted
/// that the source has again as it was was never written back, while the run said all was
/// well. The target's writer note tells: the run is refused, saying what happened and what
/// to do (`status`, `verify` too), and the rebuild it names mends the target, `verify`
/// then naming the file only the lost history wrote.
#[test]
fn a_state_restored_from_a_backup_is_refused_on_the_newer_target_until_rebuilt() {
    let env = Env::dirs("", "prune = true");
    for name in ["keep.txt", "back.txt", "a.txt"] {
        write(env.src().join(name), name);
    }
    env.sync();
    let (state, backup) = (env.path("state"), env.path("state-backup"));
    copy_dir(&state, &backup);

    // The newer history: a file created, one renamed, one deleted.
    write(env.src().join("new.txt"), "new");
    std::fs::rename(env.src().join("a.txt"), env.src().join("renamed.txt")).unwrap();
    let back = env.src().join("back.txt");
    let back_time = std::fs::metadata(&back).unwrap().modified().unwrap();
    std::fs::remove_file(&back).unwrap();
    env.sync();
    assert!(env.dst().join("new.txt").exists() && !env.dst().join("back.txt").exists());

    // The backup put back; the source deletes the new file and has the deleted one again,
    // with the same bytes and time.
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&backup, &state);
    std::fs::remove_file(env.src().join("new.txt")).unwrap();
    write(&back, "back.txt");
    let file = std::fs::File::options().write(true).open(&back).unwrap();
    file.set_modified(back_time).unwrap();

    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("this state is older than the target"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Restored from a backup, or a copy"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`tidemark replay --pipeline t --from 0` and then `tidemark sync`"),
        "{stderr}"
    );
    assert!(env.dst().join("new.txt").exists(), "nothing is applied");
    let status = env.run(&["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("BLOCKED") && shown.contains("older than the target"),
        "{shown}"
    );
    let verify = String::from_utf8(env.run(&["verify"]).stdout).unwrap();
    assert!(
        verify.contains("t: the target was last written by commit 2 of pipeline `t`"),
        "{verify}"
    );

    env.ok(&["replay", "--from", "0"]);
    env.ok(&["sync"]);
    assert_eq!(
        std::fs::read(env.dst().join("back.txt")).unwrap(),
        b"back.txt"
    );
    let verify = env.run(&["verify"]);
    let said = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(4), "{said}");
    assert!(said.contains("extra file new.txt"), "{said}");
    assert!(said.contains("never listed in the source"), "{said}");
    std::fs::remove_file(env.dst().join("new.txt")).unwrap();
    assert_mirror(&env.src(), &env.dst());
    env.ok(&["sync"]);
}

/// A config reached through a symbolic link resolves its relative `state_dir` beside the
/// link: a second, fresh state. Its first run said the target's extra entries were there
/// before its first projection, though tidemark wrote them; now it names the state that
/// did, and that state's next run is refused, as the other one wrote the target since.
#[test]
fn a_fresh_state_is_told_which_state_wrote_the_target() {
    let env = Env::dirs("", "prune = true");
    let text = std::fs::read_to_string(&env.config).unwrap();
    let text = text
        .replace("path = \"src\"", &format!("path = {:?}", env.src()))
        .replace("path = \"dst\"", &format!("path = {:?}", env.dst()));
    env.write_config(&text);
    write(env.src().join("a"), "a");
    write(env.src().join("b"), "b");
    env.sync();
    assert!(env.dst().join(".tidemark-tmp/written-by").is_file());
    std::fs::remove_file(env.src().join("b")).unwrap();

    let elsewhere = env.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&env.config, elsewhere.join("tidemark.toml")).unwrap();
    let out = Command::new(bin())
        .arg("--config")
        .arg(elsewhere.join("tidemark.toml"))
        .arg("sync")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("t: the target holds 1 entry the source does not have; tidemark wrote this target before, last in commit 1 of pipeline `t` of the state in"),
        "{stdout}"
    );
    assert!(stdout.contains("symbolic link"), "{stdout}");
    assert!(!stdout.contains("there before"), "{stdout}");

    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another state projected into"), "{stderr}");
}

/// A target written by an older version has no writer note: the run goes on, says
/// nothing of it, and notes itself.
#[test]
fn a_target_without_a_writer_note_is_taken_as_it_is() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a"), "a");
    env.sync();
    let note = env.dst().join(".tidemark-tmp/written-by");
    std::fs::remove_dir_all(note.parent().unwrap()).unwrap();
    write(env.src().join("b"), "b");
    let out = env.run(&["sync"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    for told in [
        "older than the target",
        "another state",
        "wrote this target before",
    ] {
        assert!(!said.contains(told), "{said}");
    }
    assert!(note.is_file());
    assert_mirror(&env.src(), &env.dst());
}

/// Two copies of one state used in turn: copy S is refused on the target the other copy
/// wrote, follows the advice (`replay --from 0`, `sync`) and writes its own run; the
/// other copy, put back, has made more runs than S but not seen S's, and is refused too.
/// It was taken as the target's writer (any older note of its history counted as its
/// own), and a file S wrote that the source deleted since stayed on the target for good.
#[test]
fn a_copy_of_the_state_is_refused_after_the_other_copy_wrote_the_target() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a"), "a");
    env.sync();
    let (state, s, s_prime) = (env.path("state"), env.path("s"), env.path("s-prime"));
    copy_dir(&state, &s);
    for name in ["b", "c"] {
        write(env.src().join(name), name);
        env.sync();
    }
    copy_dir(&state, &s_prime);

    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&s, &state);
    let out = env.run(&["sync"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    env.ok(&["replay", "--from", "0"]);
    write(env.src().join("d"), "d");
    env.sync();
    assert!(env.dst().join("d").exists());

    std::fs::remove_file(env.src().join("d")).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&s_prime, &state);
    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("this state is older than the target")
            && stderr.contains("another copy of this state"),
        "{stderr}"
    );
    assert!(env.dst().join("d").exists(), "nothing is applied");
}

/// The state is flushed with its new mark before the target's note is written: a crash
/// in between leaves the note the state's last run wrote, which is still this state's.
#[test]
fn a_note_left_by_a_crash_before_it_was_written_is_still_the_states() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a"), "a");
    env.sync();
    let note = env.dst().join(".tidemark-tmp/written-by");
    let before = std::fs::read(&note).unwrap();
    write(env.src().join("b"), "b");
    env.sync();
    assert_ne!(std::fs::read(&note).unwrap(), before);
    std::fs::write(&note, &before).unwrap();
    std::fs::remove_file(env.src().join("a")).unwrap();
    env.sync();
    assert_mirror(&env.src(), &env.dst());
}

/// A run that only applies the deletes retained while prune was off (a `project` once it
/// is on) notes itself in the target like any other: a backup of the state from before it
/// is refused. It was not (only a batch of the log noted a run), and the file that run
/// deleted, which the source then had again as it was, was never written back while
/// `sync` said it was unchanged.
#[test]
fn a_backup_from_before_a_run_that_applied_only_retained_deletes_is_refused() {
    let env = Env::dirs("", "prune = false");
    for name in ["f1", "f2"] {
        write(env.src().join(name), name);
    }
    env.sync();
    let f1 = env.src().join("f1");
    let f1_time = std::fs::metadata(&f1).unwrap().modified().unwrap();
    std::fs::remove_file(&f1).unwrap();
    let (_, project) = env.sync();
    assert_eq!(outcome(&project, "retained"), 1, "{project}");
    let (state, backup) = (env.path("state"), env.path("state-backup"));
    copy_dir(&state, &backup);

    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&text.replace("prune = false", "prune = true"));
    env.ok(&["project"]);
    assert!(!env.dst().join("f1").exists());

    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&backup, &state);
    write(&f1, "f1");
    let file = std::fs::File::options().write(true).open(&f1).unwrap();
    file.set_modified(f1_time).unwrap();
    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("this state is older than the target"),
        "{stderr}"
    );
    env.ok(&["replay", "--from", "0"]);
    env.ok(&["sync"]);
    assert_mirror(&env.src(), &env.dst());
}

/// A running daemon's state copied at an instant (a snapshot of its volume, the daemon
/// frozen meanwhile), after the daemon applied a change and before it applied another: put
/// back, it is refused, as the daemon changed the target after the copy. It was not (a
/// daemon noted itself in the target once per process, at its first commit, so the copy's
/// mark was the note's), and a file the daemon wrote after the copy, deleted from the
/// source since, stayed on the target for good.
#[test]
fn a_snapshot_of_a_running_daemons_state_is_refused_once_the_daemon_wrote_after_it() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a"), "a");
    env.sync();
    let daemon = env.spawn_daemon();
    let appears = |name: &str| {
        let path = env.dst().join(name);
        wait_for(Duration::from_secs(30), || path.exists().then_some(()))
            .unwrap_or_else(|| panic!("{name} not applied; log:\n{}", env.daemon_log()));
    };
    write(env.src().join("x"), "x");
    appears("x");
    daemon.caught_up(&env);
    let (state, snapshot) = (env.path("state"), env.path("state-snapshot"));
    daemon.signal("STOP");
    copy_dir(&state, &snapshot);
    daemon.signal("CONT");
    write(env.src().join("y"), "y");
    appears("y");
    daemon.caught_up(&env);
    assert!(daemon.terminate().success());

    std::fs::remove_file(env.src().join("y")).unwrap();
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&snapshot, &state);
    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("this state is older than the target"),
        "{stderr}"
    );
    assert!(env.dst().join("y").exists(), "nothing is applied");
}

/// A run that changed nothing on the target writes no note; each commit that changes it
/// writes one (a daemon's too: once per batch that changed the target, not once per
/// process), keeping the token of the note before it.
#[test]
fn the_writer_note_is_written_by_each_commit_that_changes_the_target() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a"), "a");
    env.sync();
    let note = env.dst().join(".tidemark-tmp/written-by");
    let read =
        || -> serde_json::Value { serde_json::from_slice(&std::fs::read(&note).unwrap()).unwrap() };
    let mut last = read();
    assert_eq!(last["run"], 1, "{last}");
    let (_, project) = env.sync();
    assert_eq!(project["events"], 0, "{project}");
    assert_eq!(read(), last, "a run that applied nothing wrote the note");

    let daemon = env.spawn_daemon();
    for (name, commit) in [("b", 2), ("c", 3)] {
        write(env.src().join(name), name);
        let now = wait_for(Duration::from_secs(30), || {
            Some(read()).filter(|n| n["run"] == commit)
        })
        .unwrap_or_else(|| panic!("no note of commit {commit}; log:\n{}", env.daemon_log()));
        assert_eq!(now["prev"], last["token"], "{now}");
        last = now;
    }
    daemon.caught_up(&env);
    assert!(daemon.terminate().success());
    assert_eq!(read(), last);
}

/// A copy of a running daemon's state, run meanwhile, writes the target's note: the
/// daemon's next commit that changes the target leaves that note there (with a warning)
/// instead of writing its own over it, so the daemon's state is refused at its next start,
/// as it has not seen what the copy did.
#[test]
fn a_daemon_leaves_the_note_of_a_copy_that_wrote_the_target_while_it_ran() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a"), "a");
    env.sync();
    let daemon = env.spawn_daemon();
    daemon.caught_up(&env);
    // The daemon frozen while its state is copied and the copy syncs a new file.
    daemon.signal("STOP");
    copy_dir(&env.path("state"), &env.path("copy"));
    let text = std::fs::read_to_string(&env.config).unwrap();
    let copy = env.path("copy.toml");
    std::fs::write(
        &copy,
        text.replace("state_dir = \"state\"", "state_dir = \"copy\""),
    )
    .unwrap();
    write(env.src().join("b"), "b");
    let out = Command::new(bin())
        .arg("--config")
        .arg(&copy)
        .arg("sync")
        .output()
        .unwrap();
    daemon.signal("CONT");
    assert!(out.status.success(), "{out:?}");
    let note = env.dst().join(".tidemark-tmp/written-by");
    let copys = std::fs::read(&note).unwrap();
    // The daemon adopts the copy's file, and writes another.
    write(env.src().join("c"), "c");
    let c = env.dst().join("c");
    wait_for(Duration::from_secs(30), || c.exists().then_some(()))
        .unwrap_or_else(|| panic!("c not applied; log:\n{}", env.daemon_log()));
    daemon.caught_up(&env);
    assert!(daemon.terminate().success());
    assert_eq!(
        std::fs::read(&note).unwrap(),
        copys,
        "the copy's note is kept"
    );
    assert_eq!(
        env.log_lines("WARN", "projected into the target while this process did"),
        1,
        "{}",
        env.daemon_log()
    );
    let out = env.run(&["sync"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("this state is older than the target"),
        "{stderr}"
    );
}
