//! REST connector crash safety (issue 3): SIGKILL the daemon again and again while it
//! projects a few thousand items; prod ends with exactly one item per dev item.

mod common;
mod rest_common;

use std::time::Duration;

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
