//! The REST mirror end to end on the Kafka backend (issue 4): two real json-server peers, a
//! real Kafka-protocol broker, the real binary. With several partitions an item and the
//! item it references may sit in different partitions, so this also proves that deferred
//! references resolve across partitions.

mod common;
mod rest_common;

use common::*;
use rest_common::*;
use serde_json::json;

#[test]
fn issue_4_rest_mirror_through_kafka() {
    let brokers = kafka_brokers();
    let topic = unique("rest");
    let env = rest_env();
    let dev = JsonServer::start(env.dir.path(), "dev", &dev_db(5));
    let prod = JsonServer::start(env.dir.path(), "prod", &empty_db());
    let proxy = FaultProxy::start(&prod.url());
    write_rest_config(&env, &dev.url(), &proxy.url(), "");
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&config.replacen(
        "max_delete = \"100%\"",
        &format!(
            "max_delete = \"100%\"\n{}",
            kafka_log_section(&brokers, &topic, &topic, 3)
        ),
        1,
    ));

    let (scan, project) = env.sync();
    assert_eq!(scan["errors"], 0, "{scan}");
    assert_eq!(outcome(&project, "failed"), 0, "{project}");
    assert_rest_mirror(&dev, &prod);
    let status = env.json(&["status"]);
    assert_eq!(status[0]["log"], "kafka", "{status}");
    assert_eq!(status[0]["lag_events"], 0, "{status}");
    assert_eq!(
        prod.all("posts").len(),
        dev.all("posts").len(),
        "no duplicates"
    );

    // Change, add, delete in dev: exactly one write each; unchanged items cost none.
    let u0 = dev
        .all("users")
        .into_iter()
        .find(|u| u["name"] == "user-0")
        .unwrap();
    let mut changed = u0.clone();
    changed["score"] = json!(7);
    dev.put("users", &u0["id"], changed);
    dev.post(
        "posts",
        json!({"name": "post-kafka", "userId": u0["id"], "title": "via kafka"}),
    );
    let doomed = dev.all("comments").into_iter().next().unwrap();
    dev.delete("comments", &doomed["id"]);
    proxy.seen.lock().unwrap().clear();
    env.sync();
    assert_eq!(proxy.count("PUT"), 1, "{:?}", proxy.seen.lock().unwrap());
    assert_eq!(proxy.count("POST"), 1, "{:?}", proxy.seen.lock().unwrap());
    assert_eq!(proxy.count("DELETE"), 1, "{:?}", proxy.seen.lock().unwrap());
    assert_rest_mirror(&dev, &prod);
    let out = env.run(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
