//! Operations (issue 5): `scan`, `project`, `sync` and `verify` draw progress on a terminal
//! (run under a pseudo-terminal with util-linux `script`) and nothing when stderr is piped
//! or `--quiet` is given.

mod common;

use std::process::Command;

use common::*;

/// Runs the binary with `args` under a pseudo-terminal; returns everything it drew.
fn under_pty(env: &Env, args: &str) -> String {
    let cmd = format!(
        "{} --config {} {args}",
        bin().display(),
        env.config.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("RUST_LOG", "warn")
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `script` ({e}); install util-linux: apt-get install -y util-linux")
        });
    assert!(
        out.status.success(),
        "tidemark {args} under a pty failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Marks only a progress bar leaves: the templates' words and terminal control sequences.
fn progress_marks(text: &str) -> Vec<&'static str> {
    ["ETA", "/s", "\u{1b}[2K", "\r"]
        .into_iter()
        .filter(|m| text.contains(m))
        .collect()
}

fn tree(env: &Env) {
    for i in 0..1500 {
        write(
            env.src().join(format!("d{}/f{i}.txt", i % 30)),
            format!("{i}").repeat(200),
        );
    }
}

#[test]
fn issue_5_progress_appears_on_a_terminal() {
    let env = Env::dirs("", "");
    tree(&env);
    let scan = under_pty(&env, "scan");
    assert!(scan.contains("scan"), "{scan:?}");
    assert!(
        scan.contains("/s") && scan.contains("\u{1b}[2K"),
        "no progress drawn by scan: {scan:?}"
    );
    let project = under_pty(&env, "project");
    assert!(
        project.contains("project") && project.contains("ETA") && project.contains("/1,530"),
        "no progress bar drawn by project: {project:?}"
    );
    let verify = under_pty(&env, "verify");
    assert!(
        verify.contains("verify") && verify.contains("/s"),
        "no progress drawn by verify: {verify:?}"
    );
    // --quiet draws nothing even on a terminal.
    let quiet = under_pty(&env, "--quiet verify");
    assert!(
        !quiet.contains("ETA") && !quiet.contains("\u{1b}[2K"),
        "--quiet drew progress: {quiet:?}"
    );
}

/// `sync` scans and projects at once: both bars are drawn, one line each.
#[test]
fn issue_5_sync_draws_scan_and_project_bars_together() {
    let env = Env::dirs("", "");
    tree(&env);
    let sync = under_pty(&env, "sync");
    // Bar prefixes are right-aligned to 10 columns; the summary lines are not.
    assert!(
        sync.contains("      scan ") && sync.contains("   project ") && sync.contains("/s"),
        "sync did not draw both bars: {sync:?}"
    );
    assert_mirror(&env.src(), &env.dst());
}

#[test]
fn issue_5_no_progress_when_piped() {
    let env = Env::dirs("", "");
    tree(&env);
    for args in [&["scan"][..], &["project"], &["verify"], &["sync"]] {
        let out = env.cmd(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            progress_marks(&stderr),
            Vec::<&str>::new(),
            "{args:?} stderr: {stderr:?}"
        );
        assert!(
            !stdout.contains("ETA") && !stdout.contains('\r'),
            "{args:?} stdout: {stdout:?}"
        );
    }
}
