//! Operations (issue 5): a running daemon exports every metric `docs/metrics.md` documents
//! (and nothing undocumented), lag rises and returns to 0, freshness grows between scans
//! and resets after one, and `/status` carries what operators need.

mod common;
mod rest_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use rest_common::Recorder;

/// `name → type` of every metric in `docs/metrics.md`'s tables.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `tidemark_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let kind = cells[2].to_owned();
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "docs/metrics.md: `{name}` has type `{kind}`"
        );
        assert!(
            out.insert(name.clone(), kind).is_none(),
            "docs/metrics.md documents `{name}` twice"
        );
    }
    assert!(out.len() >= 15, "docs/metrics.md lists only {out:?}");
    out
}

/// `name → type` from the `# TYPE` lines of an exposition.
fn exported(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

fn lag(d: &Daemon) -> (f64, f64) {
    let m = d.metrics();
    (
        m[r#"tidemark_lag_events{pipeline="t"}"#],
        m[r#"tidemark_lag_seconds{pipeline="t"}"#],
    )
}

#[test]
fn issue_5_every_documented_metric_is_exported_and_lag_returns_to_zero() {
    let env = Env::dirs("", "prune = true");
    for i in 0..40 {
        write(
            env.src().join(format!("d{}/f{i}.txt", i % 4)),
            format!("file {i}"),
        );
    }
    // The target is down: its root is a regular file, so every write fails transiently.
    write(env.dst(), "not a directory");
    let d = env.spawn_daemon();

    // The scanner appends as it walks, so lag rises in steps: wait for a finished scan,
    // then read the lag from a later scrape. A scrape computes the lag before it renders,
    // so the scrape that first shows the scan finished may hold the lag from just before
    // the scan's last append.
    wait_for(Duration::from_secs(30), || {
        d.metrics()
            .get(r#"tidemark_last_scan_success_timestamp_seconds{pipeline="t"}"#)
            .is_some_and(|&at| at > 0.0)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no scan finished; log:\n{}", env.daemon_log()));
    let stuck = wait_for(Duration::from_secs(30), || {
        let (events, seconds) = lag(&d);
        (seconds > 0.0).then_some((events, seconds))
    })
    .unwrap_or_else(|| panic!("lag never rose above 0; log:\n{}", env.daemon_log()));
    assert_eq!(stuck.0, 44.0, "40 files and 4 directories wait");
    // The source is idle and nothing is applied: lag in seconds keeps growing.
    std::thread::sleep(Duration::from_millis(1500));
    let (events, seconds) = lag(&d);
    assert_eq!(events, stuck.0);
    assert!(
        seconds >= stuck.1 + 1.0,
        "lag in seconds went from {} to {seconds} while the target was down",
        stuck.1
    );
    let m = d.metrics();
    assert!(m[r#"tidemark_apply_errors_total{class="transient",pipeline="t"}"#] > 0.0);

    // The target comes back: the projector catches up and lag returns to 0.
    std::fs::remove_file(env.dst()).unwrap();
    wait_for(Duration::from_secs(60), || {
        (lag(&d) == (0.0, 0.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("lag stayed at {:?}; log:\n{}", lag(&d), env.daemon_log()));
    let m = d.metrics();
    assert_eq!(
        m[r#"tidemark_applies_total{kind="file",outcome="created",pipeline="t"}"#],
        40.0
    );
    assert_eq!(
        m[r#"tidemark_log_head_offset{pipeline="t"}"#],
        m[r#"tidemark_committed_offset{pipeline="t"}"#]
    );
    assert!(m[r#"tidemark_last_apply_timestamp_seconds{pipeline="t"}"#] > 1.6e9);
    let on_disk = dir_size(&env.path("state/db"));
    let reported = m["tidemark_state_size_bytes"];
    assert!(
        reported > 0.0 && reported <= on_disk as f64,
        "state size {reported} against {on_disk} bytes in state/db"
    );
    // Every documented metric is exported with its documented type (those labelled by
    // kind exist once events were applied), and every exported tidemark metric is
    // documented.
    let text = d.get("/metrics").text().unwrap();
    let exported = exported(&text);
    let documented = documented();
    for (name, kind) in &documented {
        assert_eq!(
            exported.get(name),
            Some(kind),
            "docs/metrics.md documents {name} as a {kind}; /metrics has {:?}",
            exported.get(name)
        );
    }
    for name in exported.keys().filter(|n| n.starts_with("tidemark_")) {
        assert!(
            documented.contains_key(name),
            "{name} is exported but not documented in docs/metrics.md"
        );
    }

    assert_mirror(&env.src(), &env.dst());
    assert!(d.terminate().success());
}

#[test]
fn issue_5_freshness_grows_between_scans_and_resets_after_one() {
    let env = Env::dirs("", "");
    // Replace the harness's 200 ms interval: the scanner idles 3 s between scans.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("scan_interval = \"200ms\"", "scan_interval = \"3s\"");
    env.write_config(&text);
    write(env.src().join("a.txt"), "a");
    let d = env.spawn_daemon();
    let series = r#"tidemark_source_freshness_seconds{pipeline="t"}"#;
    let success = r#"tidemark_last_scan_success_timestamp_seconds{pipeline="t"}"#;
    wait_for(Duration::from_secs(20), || {
        (d.metric(success) > 0.0).then_some(())
    })
    .expect("a first scan succeeds");

    // Sample for two scan intervals: the value must climb past 2 s while the scanner
    // sleeps, then drop below 1 s once the next scan finished.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut peak, mut reset_after_peak, mut samples) = (0.0f64, false, Vec::new());
    while Instant::now() < deadline && !reset_after_peak {
        let f = d.metric(series);
        samples.push(f);
        if f > peak {
            peak = f;
        }
        if peak >= 2.0 && f < 1.0 {
            reset_after_peak = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        peak >= 2.0 && reset_after_peak,
        "freshness did not grow past 2 s and reset: {samples:?}"
    );

    // `/status` carries the same figure and the last scan's time, duration and result.
    let status: serde_json::Value = d.get("/status").json().unwrap();
    let s = &status[0];
    assert_eq!(s["pipeline"], "t");
    for key in [
        "head",
        "committed",
        "lag_events",
        "lag_seconds",
        "source_freshness_seconds",
        "failed",
        "deferred",
        "delete_guard",
    ] {
        assert!(s.get(key).is_some(), "/status lacks `{key}`: {s}");
    }
    assert_eq!(s["last_scan"]["result"], "ok");
    assert!(s["last_scan"]["started_at"].is_string());
    assert!(s["last_scan"]["duration_secs"].is_number());
    assert!(s["source_freshness_seconds"].as_f64().unwrap() < 4.0);

    // `tidemark status` asks the running daemon and prints the same.
    let out = env.ok(&["status"]);
    assert!(out.contains("last scan"), "{out}");
    assert!(out.contains("freshness"), "{out}");
    assert!(d.terminate().success());
}

#[test]
fn a_restart_keeps_the_last_apply_time() {
    let env = Env::dirs("", "");
    write(env.src().join("a.txt"), "a");
    let series = r#"tidemark_last_apply_timestamp_seconds{pipeline="t"}"#;
    let d = env.spawn_daemon();
    let applied = wait_for(Duration::from_secs(30), || {
        let at = d.metric(series);
        (at > 0.0).then_some(at)
    })
    .unwrap_or_else(|| panic!("nothing applied; log:\n{}", env.daemon_log()));
    assert!(d.terminate().success());

    // The source is idle, so the restarted daemon applies nothing: the gauge must come
    // from the state, not read 0 (which a "since last apply" panel shows as 56 years).
    let d = env.spawn_daemon();
    assert_eq!(d.metric(series), applied);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(d.metric(series), applied, "nothing new was applied");
    assert!(d.terminate().success());
}

/// A daemon that only projects (`role = "project"`) exports none of the scanner's series:
/// a last scan time of 0 fired `TidemarkScannerStale` forever on such a healthy daemon.
/// Nor does it wait for a scan of its own to be ready.
#[test]
fn a_daemon_that_does_not_scan_exports_no_scanner_series() {
    let env = Env::dirs("role = \"project\"", "");
    write(env.src().join("a.txt"), "a");
    env.ok(&["scan"]);
    let d = env.spawn_daemon();
    let lagless = wait_for(Duration::from_secs(30), || {
        (d.metric(r#"tidemark_lag_events{pipeline="t"}"#) == 0.0).then_some(())
    });
    assert!(lagless.is_some(), "log:\n{}", env.daemon_log());
    let ready = wait_for(Duration::from_secs(10), || {
        (d.get("/readyz").status() == 200).then_some(())
    });
    assert!(ready.is_some(), "{}", d.get("/readyz").text().unwrap());
    let text = d.get("/metrics").text().unwrap();
    for series in [
        "tidemark_last_scan_success_timestamp_seconds",
        "tidemark_source_freshness_seconds",
        "tidemark_delete_guard_active",
        "tidemark_scans_total",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(series)),
            "{series} exported:\n{text}"
        );
    }
    assert!(d.terminate().success());
}

#[test]
fn sighup_stops_the_daemon_cleanly_and_exits_129_for_its_supervisor_to_restart_it() {
    let env = Env::dirs("", "");
    write(env.src().join("a.txt"), "a");
    let d = env.spawn_daemon();
    wait_for(Duration::from_secs(30), || {
        env.dst().join("a.txt").exists().then_some(())
    })
    .unwrap_or_else(|| panic!("nothing applied; log:\n{}", env.daemon_log()));
    let status = d.stop_with("HUP");
    let log = env.daemon_log();
    // Non-zero, so systemd's Restart=on-failure (ops/systemd) starts it again.
    assert_eq!(status.code(), Some(129), "log:\n{log}");
    assert!(
        log.contains("SIGHUP") && log.contains("does not reload"),
        "{log}"
    );
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(
        !env.path("state/listen.addr").exists(),
        "the address file is left behind"
    );
}

#[test]
fn status_of_a_misspelled_pipeline_is_an_error_while_the_daemon_runs() {
    let env = Env::dirs("", "");
    let d = env.spawn_daemon();
    for output in ["text", "json"] {
        let out = env.run(&["status", "--pipeline", "nosuch", "--output", output]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stderr.contains("nosuch") && stderr.contains("known: t"),
            "{stderr}"
        );
    }
    // The right name is answered by the daemon.
    let out = env.json(&["status", "--pipeline", "t"]);
    assert_eq!(out[0]["pipeline"], "t");
    assert!(d.terminate().success());
}

#[test]
fn a_listen_address_in_use_names_the_config_line() {
    let env = Env::dirs("", "");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    env.write_config(&text);
    let out = env.run(&["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}"))
            && stderr.contains(&format!("{}:2", env.config.display())),
        "{stderr}"
    );
}

/// A daemon that cannot start leaves no address behind for `status` to ask, and says
/// what is missing: here the variable `status_token_env` names.
#[test]
fn a_daemon_that_cannot_start_leaves_no_address_file() {
    let env = Env::dirs("", "");
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nstatus_token_env = \"TM_UNSET_STATUS_TOKEN\"",
    );
    env.write_config(&text);
    let out = env
        .cmd(&["run"])
        .env_remove("TM_UNSET_STATUS_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TM_UNSET_STATUS_TOKEN"), "{stderr}");
    assert!(
        !env.path("state/listen.addr").exists(),
        "the address file is left behind: {stderr}"
    );
}

/// Under `--log-format json` every line on stderr is a JSON event, the error that ends the
/// command too; the text format keeps `error: …`.
#[test]
fn the_error_that_ends_a_command_follows_the_log_format() {
    let env = Env::dirs("", "");
    let out = env.run(&["--log-format", "json", "status", "--pipeline", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let last = events.last().expect("the error is printed");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(last["timestamp"].is_string(), "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no pipeline named `nope`")),
        "{last}"
    );
    let out = env.run(&["status", "--pipeline", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: no pipeline named `nope`"),
        "{stderr}"
    );
}

/// Makes the config of `env` (listening on `127.0.0.1:0`) require the `/status` token in
/// the variable `var`.
fn requires_status_token(env: &Env, var: &str) {
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:0\"\nstatus_token_env = \"{var}\""),
    );
    env.write_config(&text);
}

/// `status_token_env` naming an empty variable made the token `""`, which a request
/// without any token matches: `/status` was open while its config said it was not. An
/// empty variable stops the daemon at start, naming it; the whitespace around a token
/// is dropped, as around every secret, by the daemon and by `tidemark status` alike.
#[test]
fn an_empty_status_token_variable_stops_the_daemon_instead_of_opening_status() {
    const VAR: &str = "TM_OPS_STATUS_TOKEN_TRIM";
    let env = Env::dirs("", "");
    requires_status_token(&env, VAR);
    let mut run = env
        .cmd(&["run"])
        .env(VAR, " \n")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_for(Duration::from_secs(30), || run.try_wait().unwrap());
    if exited.is_none() {
        run.kill().unwrap();
    }
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        exited.is_some(),
        "the daemon started with an empty token: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("environment variable `{VAR}` is empty"))
            && stderr.contains("or remove status_token_env"),
        "{stderr}"
    );
    // SAFETY of the test: the variable name is unique to this test.
    std::env::set_var(VAR, "tok-status-91\n");
    let daemon = env.spawn_daemon();
    assert_eq!(daemon.get("/status").status(), 401);
    let url = format!("http://{}/status", daemon.addr);
    let client = reqwest::blocking::Client::new();
    assert_eq!(
        client
            .get(&url)
            .bearer_auth("tok-status-91")
            .send()
            .unwrap()
            .status(),
        200
    );
    let status = env.ok(&["status"]);
    assert!(status.contains("pipeline t"), "{status}");
    assert!(daemon.terminate().success());
}

/// `listen` on an address other machines reach, without `status_token_env`, served
/// `/status` (failure reasons quoting API answers, URLs and file names) to anyone, and
/// nothing said so (issue; ops/k8s shipped that config): the daemon warns once at start,
/// naming the address and the setting that closes it; with a token, or on loopback, not.
#[test]
fn status_open_to_other_machines_without_a_token_is_warned_of_at_start() {
    const VAR: &str = "TM_OPS_STATUS_TOKEN_OPEN";
    const WARNING: &str = "answers anyone who can reach that address";
    let env = Env::dirs("", "");
    let loopback = std::fs::read_to_string(&env.config).unwrap();
    let open = loopback.replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    let with_token = open.replace(
        "listen = \"0.0.0.0:0\"",
        &format!("listen = \"0.0.0.0:0\"\nstatus_token_env = \"{VAR}\""),
    );
    // SAFETY of the test: the variable name is unique to this test.
    std::env::set_var(VAR, "tok-status-open-3e9");
    for (config, warned) in [(&open, 1), (&with_token, 0), (&loopback, 0)] {
        env.write_config(config);
        let _ = std::fs::remove_file(env.path("daemon.log"));
        let daemon = env.spawn_daemon();
        let addr = daemon.addr.clone();
        assert!(daemon.terminate().success());
        let log = env.daemon_log();
        assert_eq!(env.log_lines("WARN", WARNING), warned, "{config}\n{log}");
        if warned > 0 {
            let line = log.lines().find(|l| l.contains(WARNING)).unwrap();
            assert!(
                line.contains(&format!("/status on {addr}"))
                    && line.contains("set status_token_env = \"VAR\""),
                "{line}"
            );
        }
    }
}

/// `tidemark status` asked a running daemon through the proxy `http_proxy` names, and
/// so handed the proxy the `/status` token (issue): it goes straight to the daemon, the
/// proxy gets nothing, and the status is the daemon's.
#[test]
fn status_asks_the_daemon_directly_and_never_hands_its_token_to_a_proxy() {
    const VAR: &str = "TM_OPS_STATUS_TOKEN_PROXY";
    const TOKEN: &str = "tok-status-proxy-7c1";
    let env = Env::dirs("", "");
    requires_status_token(&env, VAR);
    // SAFETY of the test: the variable name is unique to this test.
    std::env::set_var(VAR, TOKEN);
    let daemon = env.spawn_daemon();
    let proxy = Recorder::start();
    let mut status = env.cmd(&["status", "--output", "json"]);
    for var in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        status.env(var, proxy.url());
    }
    let out = status
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .unwrap();
    assert!(daemon.terminate().success());
    let requests = proxy.requests();
    assert!(requests.is_empty(), "the proxy was asked: {requests:?}");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["pipeline"], "t", "{v}");
}

/// A pipeline whose source no scan has listed yet (here the directory is missing, so
/// every scan fails) is not ready, and its freshness counts from the daemon's start: it
/// read 0, as fresh as a scan just done, and `/readyz` answered 200. The first scan that
/// lists the source makes it ready and fresh.
#[test]
fn a_pipeline_never_scanned_is_not_ready_and_not_fresh() {
    let env = Env::dirs("", "");
    std::fs::remove_dir(env.src()).unwrap();
    let started = Instant::now();
    let d = env.spawn_daemon();
    let freshness = r#"tidemark_source_freshness_seconds{pipeline="t"}"#;
    wait_for(Duration::from_secs(30), || {
        (d.metric(r#"tidemark_scans_total{pipeline="t",result="failed"}"#) >= 3.0
            && started.elapsed() >= Duration::from_secs(2))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("no failed scans; log:\n{}", env.daemon_log()));
    let ready = d.get("/readyz");
    assert_eq!(ready.status(), 503);
    let why = ready.text().unwrap();
    assert!(
        why.contains("pipeline `t`") && why.contains("no scan has listed the source"),
        "{why}"
    );
    let first = d.metric(freshness);
    assert!(
        first >= 1.0 && first <= started.elapsed().as_secs_f64(),
        "freshness {first} s, {:?} after the start",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        d.metric(freshness) >= first + 1.0,
        "freshness does not grow"
    );
    assert_eq!(
        d.metric(r#"tidemark_last_scan_success_timestamp_seconds{pipeline="t"}"#),
        0.0
    );

    write(env.src().join("a.txt"), "a");
    let ready = wait_for(Duration::from_secs(30), || {
        (d.get("/readyz").status() == 200).then_some(())
    });
    assert!(ready.is_some(), "log:\n{}", env.daemon_log());
    assert!(d.metric(freshness) < 1.0, "{}", d.metric(freshness));
    assert!(d.terminate().success());
}

/// A directory delete waiting for entries put there by hand waits for good: the age of
/// the longest-waiting item grows (what `TidemarkItemsWaiting` alerts on) and drops to 0
/// once the directory is emptied and removed.
#[test]
fn a_waiting_directory_delete_ages_in_the_deferred_age_gauge() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    env.leave_a_directory_delete_waiting();
    let d = env.spawn_daemon();
    let age = r#"tidemark_deferred_age_seconds{pipeline="t"}"#;
    let first = wait_for(Duration::from_secs(30), || {
        let a = d.metric(age);
        (a >= 1.0).then_some(a)
    })
    .unwrap_or_else(|| panic!("{:?}", d.metrics()));
    std::thread::sleep(Duration::from_millis(1100));
    assert!(d.metric(age) >= first + 1.0, "the age does not grow");
    // The same age `status` gives the waiting delete.
    let status: serde_json::Value = d.get("/status").json().unwrap();
    let since: chrono::DateTime<chrono::Utc> = status[0]["deferred"][0]["since"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let waited = (chrono::Utc::now() - since).num_milliseconds() as f64 / 1000.0;
    assert!((waited - d.metric(age)).abs() < 2.0, "{waited} {status}");

    std::fs::remove_file(env.dst().join("old/stray.txt")).unwrap();
    let cleared = wait_for(Duration::from_secs(30), || {
        (!env.dst().join("old").exists() && d.metric(age) == 0.0).then_some(())
    });
    assert!(cleared.is_some(), "{:?}", d.metrics());
    assert!(d.terminate().success());
}
