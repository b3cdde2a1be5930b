//! A directory target on exFAT (exfat-fuse, `ops/peers/exfat.sh`): a filesystem that holds
//! no symbolic links, refuses some names and folds the case of names.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use common::*;

/// The keys of the failed items `status --output json` lists, sorted, with their reasons.
fn failed(env: &Env) -> Vec<(String, String)> {
    let status = env.json(&["status"]);
    let mut failed: Vec<(String, String)> = status[0]["failed"]
        .as_array()
        .unwrap_or_else(|| panic!("{status}"))
        .iter()
        .map(|f| {
            (
                f["key"].as_str().unwrap().to_owned(),
                f["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    failed.sort();
    failed
}

/// `sync --output json` that exits 3 (items failed): the project report.
fn sync_degraded(env: &Env) -> serde_json::Value {
    let out = env.run(&["sync", "--output", "json"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["project"].clone()
}

/// Issue: an item the target refuses for good (a link on exFAT: `ENOSYS`; a name it
/// cannot hold: `ENOENT`, `EILSEQ`) was taken for the target being down: the batch was
/// retried forever and nothing after it applied. Each is that item's failure now, listed
/// with what to do; the others are written, and the run says it was degraded (exit 3).
/// Once the source lets go of them (removed, or excluded), their failures go too.
#[test]
fn issue_exfat_items_the_target_cannot_hold_fail_alone() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    let _fs = Exfat::mount(&env.dst());
    write(env.src().join("ok.txt"), "fine");
    write(env.src().join("d/star*"), "star");
    write(env.src().join("a:b"), "colon");
    write(
        env.src().join(OsStr::from_bytes(b"latin1-\xe9")),
        "not UTF-8",
    );
    std::os::unix::fs::symlink("ok.txt", env.src().join("link")).unwrap();
    write(env.src().join("z/after.txt"), "after them");

    let project = sync_degraded(&env);
    assert_eq!(outcome(&project, "failed"), 4, "{project}");
    assert_eq!(std::fs::read(env.dst().join("ok.txt")).unwrap(), b"fine");
    assert_eq!(
        std::fs::read(env.dst().join("z/after.txt")).unwrap(),
        b"after them"
    );
    let failures = failed(&env);
    let keys: Vec<&str> = failures.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["a:b", "d/star*", "latin1-%E9", "link"],
        "{failures:?}"
    );
    for (key, reason) in &failures {
        let says = match key.as_str() {
            "link" => "no symbolic links",
            "latin1-%E9" => "character set",
            _ => "refuses this name",
        };
        assert!(reason.contains(says), "{key}: {reason}");
    }
    // Nothing waits in the log: the run went past them.
    let plan = env.ok(&["plan"]);
    assert!(plan.contains("retry"), "{plan}");

    // Gone from the source, or renamed: the failures go with them.
    std::fs::remove_file(env.src().join("link")).unwrap();
    std::fs::remove_file(env.src().join("a:b")).unwrap();
    std::fs::rename(env.src().join("d/star*"), env.src().join("d/star")).unwrap();
    std::fs::remove_file(env.src().join(OsStr::from_bytes(b"latin1-\xe9"))).unwrap();
    let out = env.run(&["sync"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(failed(&env), vec![]);
    assert_eq!(std::fs::read(env.dst().join("d/star")).unwrap(), b"star");
}
