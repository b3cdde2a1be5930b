//! REST connector crash safety (issue 3): SIGKILL the daemon again and again while it
//! projects a few thousand items; prod ends with exactly one item per dev item.

mod common;
mod rest_common;

use std::time::Duration;

use serde_json::Value;

use common::*;
use rest_common::*;

#[test]
fn issue_3_sigkill_during_projection_creates_no_duplicates() {
    let env = rest_env();
    let dev = JsonServer::start(env.dir.path(), "dev", &dev_db(400)); // 400 + 800 + 1600 items
    let prod = JsonServer::start(env.dir.path(), "prod", &empty_db());
    let proxy = FaultProxy::start(&prod.url());
    write_rest_config(&env, &dev.url(), &proxy.url(), "");
    let total = 400 + 800 + 1600;
    let mut kills = 0;
    let mut last_posts = 0;
    for round in 0..40 {
        let daemon = env.spawn_daemon();
        std::thread::sleep(Duration::from_millis(900 + 97 * (round % 7)));
        let posts = proxy.count("POST");
        let n = prod.all("users").len() + prod.all("posts").len() + prod.all("comments").len();
        daemon.kill9();
        if n >= total {
            break;
        }
        // A kill only tests something when it lands while creates are in flight.
        if posts > last_posts {
            kills += 1;
        }
        last_posts = posts;
        if kills >= 10 {
            break;
        }
    }
    assert!(kills >= 5, "only {kills} kills landed during projection");
    let daemon = env.spawn_daemon();
    let done = wait_for(Duration::from_secs(300), || {
        let n = prod.all("users").len() + prod.all("posts").len() + prod.all("comments").len();
        (n >= total && daemon.metric("tidemark_lag_events{pipeline=\"t\"}") == 0.0).then_some(n)
    });
    assert!(
        done.is_some(),
        "prod did not converge after the kills\n{}",
        env.daemon_log()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    let n = prod.all("users").len() + prod.all("posts").len() + prod.all("comments").len();
    assert_eq!(n, total, "prod must hold exactly one item per dev item");
    assert_rest_mirror(&dev, &prod);
    assert_verified(&env);
}

/// Dev holds one user, `alice`; prod is empty. The daemon's POST of alice reaches prod
/// (the proxy holds its answer back) and the daemon is SIGKILLed before it learns alice's
/// id: prod has the item, tidemark's state does not. Then `change` edits dev (and may set
/// the proxy's faults), and a `sync` runs with prod answering again. Returns the env and
/// peers for the asserts.
fn crash_after_post_then(
    change: impl FnOnce(&JsonServer, &FaultProxy),
) -> (Env, JsonServer, JsonServer) {
    crash_after_post_then_with(false, change)
}

/// [`crash_after_post_then`], with the users kind's `prefetch_names` on when asked.
fn crash_after_post_then_with(
    prefetch_names: bool,
    change: impl FnOnce(&JsonServer, &FaultProxy),
) -> (Env, JsonServer, JsonServer) {
    let env = rest_env();
    let dev = JsonServer::start(
        env.dir.path(),
        "dev",
        &serde_json::json!({
            "users": [{"id": 1000, "name": "alice", "active": true, "score": 0, "bio": ""}],
            "posts": [],
            "comments": []
        }),
    );
    let prod = JsonServer::start(env.dir.path(), "prod", &empty_db());
    let proxy = FaultProxy::start(&prod.url());
    *proxy.faults.hold_post.lock().unwrap() = Some("/users".into());
    write_rest_config(&env, &dev.url(), &proxy.url(), "timeout = \"120s\"");
    if prefetch_names {
        let config = std::fs::read_to_string(&env.config).unwrap().replacen(
            "pagination = { style = \"page\", size = 100 }\n",
            "pagination = { style = \"page\", size = 100 }\nprefetch_names = true\n",
            1,
        );
        std::fs::write(&env.config, config).unwrap();
    }
    let daemon = env.spawn_daemon();
    let posted = wait_for(Duration::from_secs(60), || {
        (!prod.all("users").is_empty()).then_some(())
    });
    assert!(
        posted.is_some(),
        "the POST did not reach prod\n{}",
        env.daemon_log()
    );
    daemon.kill9();
    *proxy.faults.hold_post.lock().unwrap() = None;
    assert_eq!(
        prod.all("users").len(),
        1,
        "the killed run created alice once"
    );
    change(&dev, &proxy);
    let out = env.run(&["sync"]);
    assert!(
        out.status.success(),
        "sync after the crash failed\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(proxy);
    (env, dev, prod)
}

/// An item renamed in dev while the create that a crash interrupted had already reached
/// prod is that item, renamed on prod: not left there beside a second one (an orphan).
#[test]
fn an_item_renamed_after_a_crash_that_hid_its_create_is_not_created_twice() {
    let (env, dev, prod) = crash_after_post_then(|dev, _| {
        dev.put(
            "users",
            &1000.into(),
            serde_json::json!({"name": "alice-renamed", "active": true, "score": 0, "bio": ""}),
        )
    });
    let names: Vec<Value> = prod
        .all("users")
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["alice-renamed"],
        "prod must hold the one renamed item"
    );
    assert_rest_mirror(&dev, &prod);
    assert_verified(&env);
}

/// An item deleted in dev while the create that a crash interrupted had already reached
/// prod is deleted from prod too.
#[test]
fn an_item_deleted_after_a_crash_that_hid_its_create_is_deleted_from_prod() {
    let (env, dev, prod) = crash_after_post_then(|dev, _| dev.delete("users", &1000.into()));
    assert_eq!(
        prod.all("users"),
        Vec::<Value>::new(),
        "prod must hold nothing"
    );
    assert_rest_mirror(&dev, &prod);
    assert_verified(&env);
}

/// The name a cut-off create was sent under, given in dev to another item meanwhile: prod
/// ends with one item per dev item, whichever of the two takes prod's item, in one `sync`
/// that exits 0. The proxy orders the race that failed the new item for good: the renamed
/// item's lookup by its noted name (`alice`) is answered first, so it claims prod's item
/// and renames it; the new item's lookup of `alice` is answered later, but before that
/// rename lands, and finds prod's item still named `alice`, claimed by the other one.
#[test]
fn a_name_a_cut_off_create_used_that_another_item_took_since_leaves_one_item_each() {
    let (env, dev, prod) = crash_after_post_then(|dev, proxy| {
        *proxy.faults.slow.lock().unwrap() = vec![
            Slow {
                method: "GET",
                path: "/users?name=alice".into(),
                free: 1,
                delay: Duration::from_millis(400),
            },
            Slow {
                method: "PUT",
                path: "/users/1".into(),
                free: 0,
                delay: Duration::from_millis(1200),
            },
        ];
        dev.put(
            "users",
            &1000.into(),
            serde_json::json!({"name": "alice-renamed", "active": true, "score": 0, "bio": ""}),
        );
        dev.post(
            "users",
            serde_json::json!({"id": 1001, "name": "alice", "active": false, "score": 1, "bio": ""}),
        );
    });
    let mut names: Vec<String> = prod
        .all("users")
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["alice", "alice-renamed"]);
    assert_rest_mirror(&dev, &prod);
    assert_verified(&env);
}

/// As [`a_name_a_cut_off_create_used_that_another_item_took_since_leaves_one_item_each`],
/// the race ordered the same way every run: with `prefetch_names` the new item looks its
/// name up in the batch's listing, which the proxy answers after the renamed item has
/// claimed prod's item (found by its noted name) and while that item's rename is still on
/// its way. The new item waits for the rename, finds its name free and is created: prod's
/// item stays the renamed one's, under its new name.
#[test]
fn a_new_item_whose_name_a_claimed_item_is_being_renamed_away_from_is_created() {
    let (env, dev, prod) = crash_after_post_then_with(true, |dev, proxy| {
        *proxy.faults.slow.lock().unwrap() = vec![
            Slow {
                method: "GET",
                path: "/users?_page=".into(),
                free: 0,
                delay: Duration::from_millis(400),
            },
            Slow {
                method: "PUT",
                path: "/users/1".into(),
                free: 0,
                delay: Duration::from_millis(1200),
            },
        ];
        dev.put(
            "users",
            &1000.into(),
            serde_json::json!({"name": "alice-renamed", "active": true, "score": 0, "bio": ""}),
        );
        dev.post(
            "users",
            serde_json::json!({"id": 1001, "name": "alice", "active": false, "score": 1, "bio": ""}),
        );
    });
    let mut users: Vec<(String, Value)> = prod
        .all("users")
        .iter()
        .map(|u| (u["name"].as_str().unwrap().to_owned(), u["id"].clone()))
        .collect();
    users.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        users,
        [
            ("alice".to_owned(), 2.into()),
            ("alice-renamed".to_owned(), 1.into())
        ],
        "prod's item stays the renamed one's, and the new item is created"
    );
    assert_rest_mirror(&dev, &prod);
    assert_verified(&env);
}
