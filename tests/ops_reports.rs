//! Operations (issue 5): one-shot runs, plans and changed daemon cycles write `report.json`
//! and `summary.txt`; the JSON matches the schema in `docs/reports.md`, its counts match what
//! the target received, and old reports are pruned to `report_retention`.

mod common;
mod rest_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The schema tables of `docs/reports.md`: table heading (`report.json`, `scan`,
/// `failures`, `delete_guard`) → field → type.
fn schema() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = std::fs::read_to_string(repo_root().join("docs/reports.md")).unwrap();
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## `") {
            table = h.trim_end_matches('`').to_owned();
        } else if line.starts_with('`') && line.ends_with(':') {
            table = line.trim_end_matches(':').trim_matches('`').to_owned();
        } else if let Some(rest) = line.strip_prefix("Each of `") {
            table = rest.split('`').next().unwrap().to_owned();
        } else if line.starts_with("| `") && !table.is_empty() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells[2].contains(' ') && !cells[2].contains(" or ") {
                continue; // the configuration table (default values), not a schema
            }
            out.entry(table.clone())
                .or_default()
                .insert(cells[1].trim_matches('`').to_owned(), cells[2].to_owned());
        }
    }
    for t in ["report.json", "scan", "failures", "delete_guard"] {
        assert!(
            out.contains_key(t),
            "docs/reports.md has no `{t}` table: {out:?}"
        );
    }
    out
}

fn type_ok(v: &Value, ty: &str) -> bool {
    ty.split(" or ").any(|t| match t {
        "integer" => v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        // A field left out of some reports: when present, it has one of the other types.
        "absent" => false,
        other => panic!("docs/reports.md uses unknown type `{other}`"),
    })
}

/// Asserts `v` has exactly the documented fields of `table` (less those documented as
/// `… or absent` that it leaves out), with their types.
fn conforms(v: &Value, table: &str, schema: &BTreeMap<String, BTreeMap<String, String>>) {
    let fields = &schema[table];
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{table} is not an object: {v}"));
    let keys: Vec<&String> = obj.keys().collect();
    let documented: Vec<&String> = fields
        .iter()
        .filter(|(f, ty)| obj.contains_key(*f) || !ty.ends_with(" or absent"))
        .map(|(f, _)| f)
        .collect();
    assert_eq!(
        keys, documented,
        "{table} fields differ from docs/reports.md"
    );
    for (field, ty) in fields.iter().filter(|(f, _)| obj.contains_key(*f)) {
        assert!(
            type_ok(&obj[field], ty),
            "{table}.{field} should be {ty}: {}",
            obj[field]
        );
    }
}

fn check(report: &Value) {
    let schema = schema();
    conforms(report, "report.json", &schema);
    if !report["scan"].is_null() {
        conforms(&report["scan"], "scan", &schema);
    }
    for f in report["failures"].as_array().unwrap() {
        conforms(f, "failures", &schema);
    }
    conforms(&report["delete_guard"], "delete_guard", &schema);
    if !report["projector_retrying"].is_null() {
        conforms(&report["projector_retrying"], "projector_retrying", &schema);
    }
    assert_eq!(report["report_version"], 1);
    assert!(report["generated_at_utc"].as_str().unwrap().ends_with('Z'));
}

/// Report directories of pipeline `t`, oldest first.
fn report_dirs(env: &Env) -> Vec<PathBuf> {
    env.report_dirs("t")
}

fn read_report(dir: &Path) -> (Value, String) {
    let json = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let summary = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    (serde_json::from_str(&json).unwrap(), summary)
}

/// `sync --output json` and the report it wrote.
fn sync_report(env: &Env, args: &[&str]) -> (Value, String) {
    sync_report_exiting(env, args, 0)
}

/// As [`sync_report`], for a run that exits with `code`.
fn sync_report_exiting(env: &Env, args: &[&str], code: i32) -> (Value, String) {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let run = env.run(&a);
    assert_eq!(run.status.code(), Some(code), "{run:?}");
    let out: Value = serde_json::from_slice(&run.stdout).expect("stdout is JSON");
    let dir = out[0]["report_dir"]
        .as_str()
        .expect("the run names its report");
    let name = Path::new(dir).file_name().unwrap().to_str().unwrap();
    assert!(
        name.len() >= 16
            && chrono::NaiveDateTime::parse_from_str(&name[..16], "%Y%m%dT%H%M%SZ").is_ok(),
        "report directory {dir} is not named YYYYMMDDTHHMMSSZ"
    );
    assert!(Path::new(dir).starts_with(env.path("state/reports/t")));
    read_report(Path::new(dir))
}

fn count_files(root: &Path) -> (u64, u64) {
    let (mut files, mut dirs) = (0, 0);
    for e in walk_target(root) {
        if e.file_type().is_dir() {
            dirs += 1;
        } else {
            files += 1;
        }
    }
    (files, dirs)
}

#[test]
fn issue_5_reports_match_schema_and_what_the_target_received() {
    let env = Env::dirs("max_delete = 2", "prune = true");
    for i in 0..7 {
        write(
            env.src().join(format!("d{}/f{i}.txt", i % 3)),
            format!("v1 {i}"),
        );
    }

    // A sync: counts equal what landed on the target.
    let (r, summary) = sync_report(&env, &["sync"]);
    check(&r);
    assert_eq!(
        (r["run"].as_str(), r["dry_run"].as_bool()),
        (Some("sync"), Some(false))
    );
    let (files, dirs) = count_files(&env.dst());
    assert_eq!((files, dirs), (7, 3));
    assert_eq!(r["by_kind"]["file"]["created"], files);
    // A directory may already exist when its own event is applied (a file inside it was
    // written first, concurrently): the target then reports it updated or adopted.
    let dir_outcomes = &r["by_kind"]["dir"];
    let present: u64 = ["created", "updated", "adopted"]
        .iter()
        .map(|o| dir_outcomes[o].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(present, dirs, "{dir_outcomes}");
    let all: u64 = r["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(all, files + dirs);
    assert_eq!(r["scan"]["upserts"], 10);
    assert_eq!(r["delete_guard"]["decision"], "passed");
    assert_eq!(r["delete_guard"]["limit"], "2");
    assert!(
        summary.contains("pipeline t") && summary.contains("file: 7 created"),
        "{summary}"
    );

    // A plan is a dry run: it counts what `project` would do and writes nothing.
    write(env.src().join("new.txt"), "new");
    std::fs::remove_file(env.src().join("d0/f0.txt")).unwrap();
    write(env.src().join("d1/f1.txt"), "v2");
    env.ok(&["scan"]);
    let plan = env.json(&["plan"]);
    let (r, summary) = read_report(Path::new(plan[0]["report_dir"].as_str().unwrap()));
    check(&r);
    assert_eq!(
        (r["run"].as_str(), r["dry_run"].as_bool()),
        (Some("plan"), Some(true))
    );
    assert_eq!(r["counts"]["created"], 1);
    // d1/f1.txt, and the time of d0, whose entries changed.
    assert_eq!(r["counts"]["updated"], 2);
    assert_eq!(r["counts"]["deleted"], 1);
    assert!(summary.contains("dry run"), "{summary}");
    assert!(!env.dst().join("new.txt").exists());
    assert_eq!(r["delete_guard"]["decision"], "not_evaluated");

    // The projection that follows matches the plan and the target.
    let out = env.json(&["project"]);
    let (r, _) = read_report(Path::new(out[0]["report_dir"].as_str().unwrap()));
    check(&r);
    assert!(r["scan"].is_null());
    assert_eq!(r["by_kind"]["file"]["created"], 1);
    assert_eq!(r["by_kind"]["file"]["updated"], 1);
    assert_eq!(r["by_kind"]["file"]["deleted"], 1);
    assert_eq!(std::fs::read(env.dst().join("d1/f1.txt")).unwrap(), b"v2");
    assert_mirror(&env.src(), &env.dst());

    // Emptying the source trips the guard; the report says so.
    std::fs::remove_dir_all(env.src()).unwrap();
    std::fs::create_dir(env.src()).unwrap();
    let (r, summary) = sync_report_exiting(&env, &["sync"], 3);
    check(&r);
    assert_eq!(r["delete_guard"]["decision"], "tripped");
    assert_eq!(r["delete_guard"]["allowed"], 2);
    assert_eq!(r["delete_guard"]["deletes"], 10);
    assert!(summary.contains("TRIPPED"), "{summary}");
    assert_eq!(count_files(&env.dst()), (7, 3), "nothing was deleted");
}

/// A sync that an error stops (prod keeps failing one item past its `retry_budget`,
/// after earlier batches went through) still writes its report: the counts are what
/// reached prod, the error is the one on stderr, and the output names the report.
#[test]
fn a_sync_stopped_by_an_error_reports_what_reached_the_target_and_the_error() {
    use rest_common::*;
    let env = rest_env();
    // 3 users, 6 posts, 12 comments: 21 events in batches of 4.
    let dev = JsonServer::start(env.dir.path(), "dev", &dev_db(3));
    let prod = JsonServer::start(env.dir.path(), "prod", &empty_db());
    let proxy = FaultProxy::start(&prod.url());
    write_rest_config(&env, &dev.url(), &proxy.url(), "");
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("retry_budget = \"20s\"", "retry_budget = \"1s\"")
        .replace(
            "max_delete = \"100%\"",
            "max_delete = \"100%\"\nbatch_size = 4",
        );
    env.write_config(&config);
    // A late comment that prod answers 500 to: a target that stopped taking writes.
    *proxy.faults.fail_body.lock().unwrap() = Some("comment-2-0-1".into());

    let run = env.run(&["sync", "--output", "json"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let fatal = stderr
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("error: "))
        .unwrap_or_else(|| panic!("no fatal line last: {stderr}"));
    let dirs = report_dirs(&env);
    assert_eq!(dirs.len(), 1, "the failed run left no report: {stderr}");
    let (r, summary) = read_report(&dirs[0]);
    check(&r);
    assert_eq!(r["run"], "sync");
    assert_eq!(r["error"], fatal, "the report names the error on stderr");
    assert!(fatal.contains("target unavailable"), "{fatal}");

    let reached: u64 = ["users", "posts", "comments"]
        .iter()
        .map(|k| prod.all(k).len() as u64)
        .sum();
    assert!(
        reached > 4 && reached < 21,
        "the run should stop after some batches: {reached} items on prod"
    );
    assert_eq!(
        r["counts"]["created"], reached,
        "the report counts what reached prod: {r}"
    );
    assert_eq!(
        r["by_kind"]["comments"]["created"],
        prod.all("comments").len() as u64
    );
    assert_eq!(r["scan"]["upserts"], 21);
    assert!(
        summary.contains(&format!("error: the run stopped, exit 1: {fatal}"))
            && summary.contains(&format!("applied before the error: {reached} created")),
        "{summary}"
    );
    for text in [&summary, &r.to_string(), &stderr.to_string()] {
        assert!(!text.contains(TOKEN), "the bearer token leaked: {text}");
    }
    // The output names the report, as a finished run's does.
    let out: Value = serde_json::from_slice(&run.stdout).expect("stdout is JSON");
    let dir = dirs[0].display().to_string();
    assert_eq!(out[0]["report_dir"], dir, "{out}");
    assert_eq!(out[0]["error"], fatal, "{out}");
    assert!(
        stderr.contains(&format!("report written to {dir}")),
        "{stderr}"
    );

    // Once prod takes the item, the next sync brings the rest, and its report has no error.
    *proxy.faults.fail_body.lock().unwrap() = None;
    let (r, _) = sync_report(&env, &["sync"]);
    check(&r);
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["counts"]["created"], 21 - reached);
    assert_rest_mirror(&dev, &prod);
}

#[test]
fn issue_5_old_reports_are_pruned_to_the_retention() {
    let env = Env::dirs("", "");
    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&format!("report_retention = 3\n{text}"));
    write(env.src().join("a.txt"), "a");
    let mut written = Vec::new();
    for _ in 0..5 {
        let out = env.json(&["sync"]);
        written.push(PathBuf::from(out[0]["report_dir"].as_str().unwrap()));
    }
    let dirs = report_dirs(&env);
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    // The newest three survive.
    let mut newest = written[2..].to_vec();
    newest.sort();
    assert_eq!(dirs, newest);
}

#[test]
fn issue_5_daemon_cycles_that_change_something_write_reports() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a.txt"), "a");
    let d = env.spawn_daemon();
    // The apply is counted in the cycle of its scan or, if the projector committed it
    // just as that cycle ended, in the next one; never lost, never twice.
    let total = |rs: &[Value], f: &dyn Fn(&Value) -> &Value| -> u64 {
        rs.iter().map(|r| f(r).as_u64().unwrap_or(0)).sum()
    };
    let rs = wait_for(Duration::from_secs(30), || {
        let rs = cycle_reports(&env);
        (env.dst().join("a.txt").exists() && total(&rs, &|r| &r["by_kind"]["file"]["created"]) >= 1)
            .then_some(rs)
    })
    .unwrap_or_else(|| panic!("no cycle report; log:\n{}", env.daemon_log()));
    for r in &rs {
        check(r);
    }
    assert_eq!(total(&rs, &|r| &r["by_kind"]["file"]["created"]), 1);
    assert_eq!(total(&rs, &|r| &r["scan"]["upserts"]), 1);
    assert_eq!(
        rs[0]["scan"]["upserts"], 1,
        "the first cycle report is the scan's"
    );
    // Idle cycles write nothing more.
    let before = report_dirs(&env).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(report_dirs(&env).len(), before, "idle cycles wrote reports");
    assert!(env.daemon_log().contains("cycle finished"));
    assert!(d.terminate().success());
}

/// The files the daemon's cycle reports of pipeline `t` count created, all together.
fn created_in_cycle_reports(env: &Env) -> u64 {
    cycle_reports(env)
        .iter()
        .map(|r| r["by_kind"]["file"]["created"].as_u64().unwrap_or(0))
        .sum()
}

/// Every report of pipeline `t` written by daemon cycles, oldest first.
fn cycle_reports(env: &Env) -> Vec<Value> {
    report_dirs(env)
        .iter()
        .map(|dir| read_report(dir).0)
        .filter(|r| r["run"] == "cycle")
        .collect()
}

#[test]
fn a_lasting_condition_is_reported_when_it_begins_and_ends_not_at_every_cycle() {
    let env = Env::dirs("", "prune = true");
    for i in 0..4 {
        write(env.src().join(format!("f{i}")), format!("{i}"));
    }
    let d = env.spawn_daemon();
    let series = |name: &str| format!("{name}{{pipeline=\"t\"}}");
    // Mirrored and reported: an apply is counted after its file is written, so a cycle
    // that ended before the count left it to a later one, and that one, met with the trip
    // below, was a second report saying the guard tripped.
    wait_for(Duration::from_secs(30), || {
        (env.dst().exists()
            && count_files(&env.dst()).0 == 4
            && created_in_cycle_reports(&env) == 4)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no mirror; log:\n{}", env.daemon_log()));

    // The source is emptied (its files moved aside, to come back as they were): the guard
    // trips at every scan, and the reports say so once. In one step (the source swapped
    // with an empty directory): a scan between the moves of single files would see a
    // source half emptied (deletes the guard lets through, or a trip of other numbers).
    std::fs::create_dir(env.path("aside")).unwrap();
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        env.src(),
        rustix::fs::CWD,
        env.path("aside"),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), || {
        (d.metric(&series("tidemark_delete_guard_trips_total")) >= 5.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the guard did not trip; log:\n{}", env.daemon_log()));
    let tripped = |rs: &[Value]| {
        rs.iter()
            .filter(|r| r["delete_guard"]["decision"] == "tripped")
            .count()
    };
    assert_eq!(tripped(&cycle_reports(&env)), 1, "one report per trip");
    assert_eq!(count_files(&env.dst()).0, 4, "nothing was deleted");

    // The source root goes away: every scan fails, and counts as a scan error.
    std::fs::rename(env.src(), env.path("src.gone")).unwrap();
    wait_for(Duration::from_secs(30), || {
        let m = d.metrics();
        let n = m
            .iter()
            .find(|(k, _)| {
                k.starts_with("tidemark_scans_total{")
                    && k.contains("result=\"failed\"")
                    && k.contains("pipeline=\"t\"")
            })
            .map_or(0.0, |(_, v)| *v);
        (n >= 4.0).then_some(())
    })
    .unwrap_or_else(|| panic!("scans did not fail; log:\n{}", env.daemon_log()));
    assert!(d.metric(&series("tidemark_scan_errors_total")) >= 4.0);
    let rs = cycle_reports(&env);
    let failed_reports: Vec<&Value> = rs
        .iter()
        .filter(|r| r["scan"]["result"] == "failed")
        .collect();
    assert_eq!(
        failed_reports.len(),
        1,
        "one report while the source is gone"
    );
    check(failed_reports[0]);
    assert_eq!(failed_reports[0]["scan"]["errors"], 1);
    // The log says so once too (it repeated the ERROR at every scan), though every
    // failed scan counts above.
    let log = env.daemon_log();
    let errors = |log: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("src cannot be read"))
            .count()
    };
    assert_eq!(
        errors(&log),
        1,
        "one ERROR while the source is gone:\n{log}"
    );

    // The files come back: the condition ends, and that is reported too; then idle cycles
    // write nothing.
    std::fs::rename(env.path("aside"), env.src()).unwrap();
    let rs = wait_for(Duration::from_secs(30), || {
        let rs = cycle_reports(&env);
        (rs.last().unwrap()["scan"]["result"] == "ok").then_some(rs)
    })
    .unwrap_or_else(|| panic!("no report of the recovery; log:\n{}", env.daemon_log()));
    let last = rs.last().unwrap();
    check(last);
    let log = env.daemon_log();
    assert_eq!(errors(&log), 1, "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("INFO")
                && l.contains("the source is back: the scan succeeded after"))
            .count(),
        1,
        "its end is logged once:\n{log}"
    );
    assert_eq!(last["delete_guard"]["decision"], "passed");
    assert_eq!(last["scan"]["upserts"], 0, "the files came back unchanged");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        cycle_reports(&env).len(),
        rs.len(),
        "idle cycles wrote reports"
    );
    assert_eq!(tripped(&cycle_reports(&env)), 1);
    assert!(d.terminate().success());
}

/// A daemon whose target is unavailable says so in its cycle reports, once per outage
/// (`projector_retrying`: since when, the failed attempts, the error; the summary's
/// `projector: retrying … since … target unavailable`), though nothing else happens; they
/// said nothing of it. A report says when it ends.
#[test]
fn a_target_outage_is_reported_when_it_begins_and_ends() {
    let env = Env::dirs("retry_max_backoff = \"300ms\"", "");
    write(env.src().join("a.txt"), "a");
    let d = env.spawn_daemon();
    // Mirrored and reported: a create counted in a cycle during the outage would write
    // a second report saying the projector retries.
    wait_for(Duration::from_secs(30), || {
        (env.dst().join("a.txt").exists() && created_in_cycle_reports(&env) == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("no mirror; log:\n{}", env.daemon_log()));
    let retrying_reports = || -> Vec<(Value, String)> {
        report_dirs(&env)
            .iter()
            .map(|dir| read_report(dir))
            .filter(|(r, _)| r["run"] == "cycle" && r["projector_retrying"].is_object())
            .collect()
    };
    let before = chrono::Utc::now();
    std::fs::rename(env.dst(), env.path("dst-aside")).unwrap();
    write(env.src().join("b.txt"), "b");
    let first = d.retrying_past(3, &env);
    let (report, summary) = wait_for(Duration::from_secs(30), || retrying_reports().pop())
        .unwrap_or_else(|| panic!("no report of the outage; log:\n{}", env.daemon_log()));
    check(&report);
    let r = &report["projector_retrying"];
    assert_eq!(r["since"], first["since"], "{report}");
    let since: chrono::DateTime<chrono::Utc> = r["since"].as_str().unwrap().parse().unwrap();
    assert!(since >= before, "{report}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.starts_with("target unavailable: ") && error.contains("is gone"),
        "{report}"
    );
    let line = summary
        .lines()
        .find(|l| l.starts_with("projector: retrying with backoff since "))
        .unwrap_or_else(|| panic!("the summary does not say it:\n{summary}"));
    assert!(
        line.contains(&since.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            && line.contains("target unavailable: "),
        "{summary}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        retrying_reports().len(),
        1,
        "one report per outage, not per cycle"
    );

    // Back: a report says the outage ended.
    std::fs::rename(env.path("dst-aside"), env.dst()).unwrap();
    wait_for(Duration::from_secs(30), || {
        let rs = cycle_reports(&env);
        let last = rs.last()?;
        (env.dst().join("b.txt").exists() && last["projector_retrying"].is_null()).then_some(())
    })
    .unwrap_or_else(|| panic!("no report of the end; log:\n{}", env.daemon_log()));
    // No other report for the outage alone. The batch that ends it is counted before the
    // projector notes that it goes on: a cycle ending in between reports that batch with
    // the outage still on, and the next one its end.
    let rs = retrying_reports();
    assert!(
        rs[1..]
            .iter()
            .all(|(r, _)| r["counts"]["created"].as_u64() >= Some(1)),
        "{rs:?}"
    );
    assert!(rs.len() <= 2, "{rs:?}");
    assert!(d.terminate().success());
}

#[test]
fn the_last_cycle_report_after_sigterm_counts_every_appended_and_applied_event() {
    // A slow projector (small batches, one at a time) and a big tree, so SIGTERM lands
    // while the projector has a batch in flight and, most likely, while the scan runs.
    let env = Env::dirs("batch_size = 32\nconcurrency = 1", "");
    let items = 20_000u64;
    for i in 0..items - 100 {
        write(env.src().join(format!("d{}/f{i}", i % 100)), i.to_string());
    }
    let d = env.spawn_daemon();
    wait_for(Duration::from_secs(60), || {
        (d.metric(r#"tidemark_committed_offset{pipeline="t"}"#) > 0.0).then_some(())
    })
    .unwrap_or_else(|| panic!("nothing committed; log:\n{}", env.daemon_log()));
    assert!(d.terminate().success(), "log:\n{}", env.daemon_log());

    let status = env.json(&["status"]);
    let (head, committed) = (
        status[0]["head"].as_u64().unwrap(),
        status[0]["committed"].as_u64().unwrap(),
    );
    assert!(
        committed < head,
        "the projector caught up before SIGTERM, so this run tests nothing"
    );
    let rs = cycle_reports(&env);
    for r in &rs {
        check(r);
    }
    let appended: u64 = rs
        .iter()
        .map(|r| r["scan"]["upserts"].as_u64().unwrap_or(0))
        .sum();
    let applied: u64 = rs
        .iter()
        .flat_map(|r| r["counts"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(appended, head, "every appended event is in a report");
    assert_eq!(applied, committed, "every committed apply is in a report");
    if head < items {
        assert!(
            rs.iter().any(|r| r["scan"]["result"] == "interrupted"),
            "the scan was cut short: {rs:?}"
        );
    }
}

/// A state directory that existed kept its mode 0755, and a separate `reports_dir` was
/// created 0755: another local user could read the log (with `inline_limit`, the bytes of
/// a source file only its owner may read) and the reports (issue). A reports directory
/// tidemark creates is owner-only; a state or reports directory that others can reach is
/// left as its user made it and warned of once at start, saying what to run.
#[test]
fn a_state_or_reports_directory_others_can_read_is_warned_of_and_new_reports_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    const WARNING: &str = "can be read by its group and others (mode 0755)";
    let env = Env::dirs("inline_limit = 4096", "");
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replace(
        "state_dir = \"state\"",
        "state_dir = \"state\"\nreports_dir = \"reports\"",
    ));
    let mode = |rel: &str| {
        std::fs::metadata(env.path(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    let chmod = |rel: &str, mode: u32| {
        std::fs::set_permissions(env.path(rel), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // Reachable by others, as a home directory usually is (a test's is 0700).
    chmod("", 0o755);
    std::fs::create_dir(env.path("state")).unwrap();
    chmod("state", 0o755);
    write(env.src().join("a.txt"), "owner-only bytes");
    chmod("src/a.txt", 0o600);
    let warned = |out: &std::process::Output, what: &str| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(what) && l.contains(WARNING))
            .count()
    };

    let sync = env.run(&["sync"]);
    assert!(sync.status.success(), "{sync:?}");
    let state = env.path("state").display().to_string();
    assert_eq!(
        warned(&sync, &format!("state directory {state} ")),
        1,
        "{sync:?}"
    );
    assert!(
        String::from_utf8_lossy(&sync.stderr).contains(&format!("run `chmod 700 {state}`")),
        "{sync:?}"
    );
    assert_eq!(
        mode("state"),
        0o755,
        "a directory the user made keeps its mode"
    );
    for created in ["reports", "reports/t"] {
        assert_eq!(mode(created), 0o700, "{created}");
    }
    assert_eq!(warned(&sync, "reports directory"), 0, "{sync:?}");

    // A reports directory the user opened, a state directory closed: that one is warned of.
    chmod("reports", 0o755);
    chmod("state", 0o700);
    let sync = env.run(&["sync"]);
    assert_eq!(warned(&sync, "reports directory"), 1, "{sync:?}");
    assert_eq!(warned(&sync, "state directory"), 0, "{sync:?}");

    // The daemon warns once, not at every cycle.
    chmod("state", 0o755);
    let daemon = env.spawn_daemon();
    write(env.src().join("b.txt"), "b");
    wait_for(Duration::from_secs(30), || {
        (std::fs::read_dir(env.path("reports/t")).unwrap().count() >= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("no cycle report; log:\n{}", env.daemon_log()));
    assert!(daemon.terminate().success());
    assert_eq!(env.log_lines("WARN", WARNING), 2, "{}", env.daemon_log());

    chmod("state", 0o700);
    chmod("reports", 0o700);
    let sync = env.run(&["sync"]);
    assert!(
        !String::from_utf8_lossy(&sync.stderr).contains("can be read by"),
        "{sync:?}"
    );
}
