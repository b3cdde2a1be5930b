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

/// The names of the entries of `dir`, sorted, as the target spells them.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".tidemark"))
        .collect();
    names.sort();
    names
}

/// Each of the top entries `top` (`Readme` or `README`, `a` or `A`) holds the content of
/// the source item with its spelling (`a/same` or `A/same` for a directory).
fn assert_entries_hold_their_items(env: &Env, top: &[String]) {
    for name in top {
        let file = if name.eq_ignore_ascii_case("readme") {
            name.clone()
        } else {
            format!("{name}/same")
        };
        assert_eq!(
            std::fs::read(env.dst().join(&file)).unwrap(),
            std::fs::read(env.src().join(&file)).unwrap(),
            "{file}"
        );
    }
}

/// Issue: on a target that folds case, two source items whose paths differ in case only
/// (`Readme` and `README`, `a/same` and `A/same`) were both "written" to one entry, the
/// run exiting 0, and deleting one from the source deleted the other's file. Now the
/// first keeps the place, the second fails naming both keys (and `verify` says so), and
/// its delete leaves the first alone.
#[test]
fn issue_exfat_items_whose_keys_differ_in_case_only_never_share_an_entry() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    let _fs = Exfat::mount(&env.dst());
    write(env.src().join("Readme"), "first");
    write(env.src().join("README"), "second");
    write(env.src().join("a/same"), "lower");
    write(env.src().join("A/same"), "upper");

    let project = sync_degraded(&env);
    assert_eq!(outcome(&project, "failed"), 3, "{project}");
    let failures = failed(&env);
    assert_eq!(failures.len(), 3, "{failures:?}");
    let top = names(&env.dst());
    assert_eq!(top.len(), 2, "{top:?}");
    assert_entries_hold_their_items(&env, &top);
    for (key, reason) in &failures {
        let holder = if key.eq_ignore_ascii_case("readme") {
            top.iter()
                .find(|n| n.eq_ignore_ascii_case("readme"))
                .unwrap()
        } else {
            top.iter().find(|n| n.eq_ignore_ascii_case("a")).unwrap()
        };
        assert!(
            reason.contains(&format!("`{key}`")) && reason.contains(&format!("`{holder}")),
            "{key}: {reason}"
        );
        assert!(reason.contains("folds the case"), "{reason}");
    }
    let out = env.run(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    // What is missing is what failed, said with its reason; nothing is extra.
    assert!(text.contains("3 missing"), "{text}");
    assert!(text.contains(" 0 extra"), "{text}");
    for (key, _) in &failures {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!(" {key} failed: ")) && l.contains("folds the case")),
            "{key}: {text}"
        );
    }

    // The source deletes the failed ones: the others stay.
    let winners: Vec<String> = top.clone();
    let readme = if winners.contains(&"Readme".to_string()) {
        "README"
    } else {
        "Readme"
    };
    let dir = if winners.contains(&"a".to_string()) {
        "A"
    } else {
        "a"
    };
    std::fs::remove_file(env.src().join(readme)).unwrap();
    std::fs::remove_dir_all(env.src().join(dir)).unwrap();
    let out = env.run(&["sync"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(failed(&env), vec![]);
    assert_eq!(names(&env.dst()), winners);
    assert_entries_hold_their_items(&env, &winners);
}

/// Issue: a rename that changes only the case of a name (`Readme` to `README`, a
/// directory `docs` to `Docs`) left the target without the file: the new item was
/// written over the old one's entry, then the old one's delete removed it. Now the new
/// item waits for the old one's delete, and one sync ends with it on the target.
#[test]
fn issue_exfat_a_rename_of_the_case_only_ends_with_the_item_on_the_target() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = true");
    let _fs = Exfat::mount(&env.dst());
    write(env.src().join("Readme"), "read me");
    write(env.src().join("docs/guide"), "guide");
    env.sync();
    std::fs::rename(env.src().join("Readme"), env.src().join("README")).unwrap();
    std::fs::rename(env.src().join("docs"), env.src().join("Docs")).unwrap();
    env.sync();
    assert_eq!(names(&env.dst()), ["Docs", "README"]);
    assert_eq!(std::fs::read(env.dst().join("README")).unwrap(), b"read me");
    assert_eq!(names(&env.dst().join("Docs")), ["guide"]);
    assert_eq!(
        std::fs::read(env.dst().join("Docs/guide")).unwrap(),
        b"guide"
    );
    let (_, project) = env.sync();
    assert_eq!(outcome(&project, "failed"), 0, "{project}");
    assert_eq!(failed(&env), vec![]);
}

/// Issue: with `prune = false` a rename of the case only never reached the target: the
/// old name's delete is retained, so its entry was held for good, and the new item failed
/// at every run naming "another source item" that the source no longer had. The new
/// spelling takes the entry over (renamed, then written), as a live item must.
#[test]
fn issue_exfat_a_rename_of_the_case_only_reaches_the_target_with_prune_off() {
    let env = Env::dirs("max_delete = \"100%\"", "prune = false");
    let _fs = Exfat::mount(&env.dst());
    write(env.src().join("Readme"), "read me");
    write(env.src().join("docs/guide"), "guide");
    env.sync();
    std::fs::remove_file(env.src().join("Readme")).unwrap();
    write(env.src().join("README"), "READ ME, changed");
    std::fs::rename(env.src().join("docs"), env.src().join("Docs")).unwrap();
    let (_, project) = env.sync();
    assert_eq!(outcome(&project, "failed"), 0, "{project}");
    assert_eq!(names(&env.dst()), ["Docs", "README"]);
    assert_eq!(
        std::fs::read(env.dst().join("README")).unwrap(),
        b"READ ME, changed"
    );
    assert_eq!(names(&env.dst().join("Docs")), ["guide"]);
    let out = env.run(&["sync"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(failed(&env), vec![]);
}

/// Issue: after a clean sync to exFAT, `verify` called every item `different` forever
/// (exFAT shows every mode as 777, exfat-fuse keeps times to the second), without saying
/// what differs, and advised a replay that changed nothing. It compares what the target
/// can hold now, and says what differs.
#[test]
fn issue_exfat_verify_compares_what_the_target_can_hold() {
    let env = Env::dirs("", "prune = true");
    let _fs = Exfat::mount(&env.dst());
    write(env.src().join("a.txt"), "alpha");
    write(env.src().join("d/b.txt"), "beta");
    env.sync();
    let out = env.ok(&["verify"]);
    assert!(out.contains("target matches source"), "{out}");

    write(env.dst().join("d/b.txt"), "changed on the target");
    let out = env.run(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.contains("different file d/b.txt (content"), "{text}");
    assert!(text.contains("1 different"), "{text}");
}
