//! Operations (issue 5): the alert rules pass `promtool check rules` and their unit tests
//! (one firing case per alert), the example Prometheus config is valid, the dashboard is
//! importable JSON with valid PromQL, and every metric the dashboard and the rules
//! reference is one a running daemon exports. Needs Debian's `prometheus` package:
//! `ops/peers/prometheus.sh install`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

const INSTALL: &str = "ops/peers/prometheus.sh install";

/// Runs promtool; fails naming the install command when it is missing.
fn promtool(args: &[&str], cwd: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}); install it with `{INSTALL}`"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn ops(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join("ops").join(rel))
        .unwrap_or_else(|e| panic!("ops/{rel}: {e}"))
}

/// Alert names defined in alerts.yml.
fn alert_names() -> BTreeSet<String> {
    ops("prometheus/alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Every PromQL expression of the dashboard, with Grafana's variables filled in.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&ops("grafana/tidemark.json")).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "tidemark");
    assert!(dash["title"].is_string() && dash["schemaVersion"].is_u64());
    assert_eq!(dash["__inputs"][0]["pluginId"], "prometheus");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("every target has an expr");
            exprs.push(
                e.replace("$__rate_interval", "1m")
                    .replace("$__range", "1h")
                    .replace("$pipeline", ".*"),
            );
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs
}

/// Metric names a text mentions (`tidemark_…`), histogram series folded to their family.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("tidemark_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| f.ends_with("_seconds")))
                .unwrap_or(name);
            out.insert(family.to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn issue_5_alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = repo_root().join("ops/prometheus");
    let check = promtool(&["check", "rules", "alerts.yml"], &dir);
    let alerts = alert_names();
    assert!(
        check.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{check}"
    );
    let test = promtool(&["test", "rules", "alerts_test.yml"], &dir);
    assert!(test.contains("SUCCESS"), "{test}");
    promtool(&["check", "config", "prometheus.yml"], &dir);

    // Every alert the issue asks for exists, and each has a unit test that expects it to fire.
    for wanted in [
        "TidemarkLagHigh",
        "TidemarkScannerStale",
        "TidemarkProjectorStuck",
        "TidemarkApplyFailuresRising",
        "TidemarkDeleteGuardTripped",
        "TidemarkRetainedDeletesWithheld",
        "TidemarkTargetDown",
        "TidemarkDown",
        "TidemarkItemsWaiting",
        "TidemarkItemsStillFailing",
        "TidemarkAbsent",
    ] {
        assert!(alerts.contains(wanted), "alerts.yml lacks {wanted}");
    }
    let tests = ops("prometheus/alerts_test.yml");
    for alert in &alerts {
        let firing = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_labels")
        });
        assert!(firing, "alerts_test.yml has no case in which {alert} fires");
    }
}

#[test]
fn issue_5_dashboard_queries_are_valid_promql() {
    // promtool has no query checker, so load every dashboard query as a recording rule.
    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    std::fs::write(tmp.path().join("dashboard.yml"), rules).unwrap();
    promtool(&["check", "rules", "dashboard.yml"], tmp.path());
}

#[test]
fn issue_5_dashboard_and_rules_reference_only_exported_metrics() {
    let mut refs = referenced(&ops("prometheus/alerts.yml"));
    let from_rules = refs.len();
    let dashboard = dashboard_exprs();
    for e in &dashboard {
        refs.extend(referenced(e));
    }
    assert!(from_rules >= 8 && refs.len() >= 15, "{refs:?}");
    // What on-call looks for first, and the disk the state fills, each have a panel.
    for wanted in [
        "tidemark_lag_events",
        "tidemark_lag_seconds",
        "tidemark_source_freshness_seconds",
        "tidemark_delete_guard_active",
        "tidemark_state_size_bytes",
        "tidemark_deferred_age_seconds",
        "tidemark_failed_items",
        "tidemark_log_readable",
    ] {
        assert!(
            dashboard.iter().any(|e| referenced(e).contains(wanted)),
            "the dashboard has no panel for {wanted}"
        );
    }
    // Nor is a daemon Prometheus cannot scrape, whose own series all go stale.
    assert!(
        dashboard
            .iter()
            .any(|e| e.contains(r#"up{job=~"tidemark.*"}"#)),
        "the dashboard has no panel for the scrape target's `up`"
    );

    // A daemon that has appended and applied, so kind-labelled series exist too.
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a/b.txt"), "b");
    let d = env.spawn_daemon();
    wait_for(std::time::Duration::from_secs(30), || {
        (d.metric(r#"tidemark_applies_total{kind="file",outcome="created",pipeline="t"}"#) == 1.0)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the daemon applied nothing; log:\n{}", env.daemon_log()));
    let text = d.get("/metrics").text().unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = refs.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the alert rules use metrics the daemon does not export: {missing:?}"
    );
    assert!(d.terminate().success());
}

/// Grafana skips a range mapping whose `to` is null (its check is `value > to`, true for
/// null), so the freshness stat showed "56 years" instead of "never": every range bound
/// of the dashboard is a number.
#[test]
fn every_range_mapping_of_the_dashboard_has_numeric_bounds() {
    let dash: serde_json::Value = serde_json::from_str(&ops("grafana/tidemark.json")).unwrap();
    let mut ranges = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        let mappings = panel["fieldConfig"]["defaults"]["mappings"].as_array();
        for m in mappings
            .into_iter()
            .flatten()
            .filter(|m| m["type"] == "range")
        {
            ranges += 1;
            let options = &m["options"];
            assert!(
                options["from"].is_number() && options["to"].is_number(),
                "panel {}: {m}",
                panel["title"]
            );
        }
    }
    assert!(ranges > 0, "the freshness stat's \"never\" mapping is gone");
}

/// tidemark.json is what generate.py writes: an edit made to the JSON alone (as the
/// freshness stat's numeric bound once was) is lost at the next generation.
#[test]
fn the_dashboard_is_what_its_generator_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("generate.py");
    std::fs::copy(repo_root().join("ops/grafana/generate.py"), &script).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{out:?}");
    let generated = std::fs::read_to_string(tmp.path().join("tidemark.json")).unwrap();
    assert!(
        generated == ops("grafana/tidemark.json"),
        "ops/grafana/tidemark.json differs from what generate.py writes: edit the generator and run `python3 ops/grafana/generate.py`"
    );
}

/// `$__range` is the length of the dashboard's time range: in a time series each point
/// counts a whole range before it (the left half reaching before the range shown), so the
/// "delete guard trips in the time range" panel read as more trips than the range held.
/// Only an instant query, evaluated once at the range's end, counts the range itself.
#[test]
fn the_dashboard_counts_over_its_time_range_only_in_instant_queries() {
    let dash: serde_json::Value = serde_json::from_str(&ops("grafana/tidemark.json")).unwrap();
    let mut ranged = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if t["expr"].as_str().unwrap_or_default().contains("$__range") {
                ranged += 1;
                assert!(
                    t["instant"] == true && panel["type"] == "stat",
                    "panel {}: {t}",
                    panel["title"]
                );
            }
        }
    }
    assert!(
        ranged > 0,
        "the delete guard trips in the time range are gone"
    );
}
