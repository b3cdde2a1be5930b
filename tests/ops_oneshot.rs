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
