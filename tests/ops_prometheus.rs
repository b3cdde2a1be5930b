//! Operations (issue 5): a real Prometheus (Debian's package, started by
//! `ops/peers/prometheus.sh`) with a config derived from `ops/prometheus/prometheus.yml`
//! scrapes a running daemon; its HTTP API shows `tidemark_lag_events` rise above 0 while
//! the target is down and return to 0 once the projector caught up.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

const INSTALL: &str = "ops/peers/prometheus.sh install";

/// A Prometheus started by the peer script, stopped (by its pid file) on drop.
struct Prometheus {
    url: String,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(config: &std::path::Path, dir: PathBuf) -> Prometheus {
        let found = Command::new("prometheus").arg("--version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "the prometheus server is not installed; install it with `{INSTALL}`"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = repo_root().join("ops/peers/prometheus.sh");
        let out = Command::new(&script)
            .arg("start")
            .arg(config)
            .arg(port.to_string())
            .arg(&dir)
            .output()
            .expect("ops/peers/prometheus.sh runs");
        let prometheus = Prometheus {
            url: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            port,
            dir,
        };
        assert!(
            out.status.success(),
            "`ops/peers/prometheus.sh start` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        prometheus
    }

    /// The API's `data` for `path` with `query`.
    fn api(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let r: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .expect("prometheus answers")
            .json()
            .expect("prometheus answers JSON");
        assert_eq!(r["status"], "success", "{r}");
        r["data"].clone()
    }

    /// The value of an instant query returning one series, if it returns one.
    fn value(&self, q: &str) -> Option<f64> {
        let data = self.api("/api/v1/query", &[("query", q)]);
        data["result"][0]["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("ops/peers/prometheus.sh"))
            .arg("stop")
            .arg(self.port.to_string())
            .arg(&self.dir)
            .status();
    }
}

/// `ops/prometheus/prometheus.yml` with the daemon as target and short intervals; every
/// rewrite must find its text, so the example and this test stay in step.
fn derived_config(example: &str, daemon: &str) -> String {
    let mut text = example.to_owned();
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 250ms"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("scrape_timeout: 10s", "scrape_timeout: 250ms"),
        ("\"127.0.0.1:9464\"", &format!("\"{daemon}\"")),
    ] {
        assert!(
            text.contains(from),
            "ops/prometheus/prometheus.yml lacks `{from}`"
        );
        text = text.replace(from, to);
    }
    text
}

#[test]
fn issue_5_real_prometheus_sees_lag_rise_and_return_to_zero() {
    let env = Env::dirs("", "prune = true");
    for i in 0..30 {
        write(env.src().join(format!("f{i}.txt")), format!("file {i}"));
    }
    // The target is down (its root is a regular file), so lag stays up until we fix it.
    write(env.dst(), "not a directory");
    let d = env.spawn_daemon();

    let prom_dir = env.path("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let example =
        std::fs::read_to_string(repo_root().join("ops/prometheus/prometheus.yml")).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        derived_config(&example, &d.addr),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("ops/prometheus/alerts.yml"),
        prom_dir.join("alerts.yml"),
    )
    .unwrap();
    let prom = Prometheus::start(&prom_dir.join("prometheus.yml"), prom_dir.clone());

    // Prometheus scrapes the daemon and loaded the alert rules.
    let q = r#"tidemark_lag_events{job="tidemark", pipeline="t"}"#;
    let lag = wait_for(Duration::from_secs(30), || {
        prom.value(q).filter(|v| *v > 0.0)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never saw lag > 0 (it has {:?}); prometheus log:\n{}\ndaemon log:\n{}",
            prom.value(q),
            prom.log(),
            env.daemon_log()
        )
    });
    assert_eq!(lag, 30.0);
    assert_eq!(prom.value(r#"up{job="tidemark"}"#), Some(1.0));
    let rules = prom.api("/api/v1/rules", &[]);
    let loaded: usize = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    let defined = std::fs::read_to_string(prom_dir.join("alerts.yml"))
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert: "))
        .count();
    assert!(defined >= 13, "alerts.yml defines {defined} alerts");
    assert_eq!(loaded, defined, "alert rules loaded: {rules}");
    let seconds = wait_for(Duration::from_secs(10), || {
        prom.value(r#"tidemark_lag_seconds{pipeline="t"}"#)
            .filter(|v| *v >= 1.0)
    });
    assert!(
        seconds.is_some(),
        "lag in seconds did not grow while the target was down"
    );

    // The target comes back: lag returns to 0 in Prometheus.
    std::fs::remove_file(env.dst()).unwrap();
    wait_for(Duration::from_secs(60), || {
        (prom.value(q) == Some(0.0)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus still sees lag {:?}; daemon log:\n{}",
            prom.value(q),
            env.daemon_log()
        )
    });
    // Both states are in Prometheus's history.
    let peak = prom.value(r#"max_over_time(tidemark_lag_events{pipeline="t"}[5m])"#);
    assert_eq!(peak, Some(30.0));
    assert_eq!(
        prom.value(r#"sum(tidemark_applies_total{pipeline="t", outcome="created"})"#),
        Some(30.0)
    );
    assert_mirror(&env.src(), &env.dst());
    assert!(d.terminate().success());
}
