//! Operations (issue 5): `scan`, `project`, `sync` and `verify` draw progress on a terminal
//! (run under a pseudo-terminal with util-linux `script`) and nothing when stderr is piped
//! or `--quiet` is given.

mod common;

use common::*;

/// Marks only a progress bar leaves: the templates' words and terminal control sequences.
fn progress_marks(text: &str) -> Vec<&'static str> {
    ["ETA", "/s", "\u{1b}[2K", "\r"]
        .into_iter()
        .filter(|m| text.contains(m))
        .collect()
}

/// What a terminal [`COLS`] wide shows once `drawn` has been drawn on it: the control
/// sequences progress bars use (cursor up and down, clear line, clear to the end) are
/// played, colours dropped, and a line filled to the last column wraps on the next
/// character, as xterm does.
fn screen(drawn: &str) -> Vec<String> {
    let mut lines: Vec<Vec<char>> = Vec::new();
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = drawn.chars().peekable();
    while let Some(c) = chars.next() {
        if lines.len() <= row {
            lines.resize(row + 1, Vec::new());
        }
        match c {
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut arg = String::new();
                let cmd = loop {
                    match chars.next() {
                        Some(c) if c.is_ascii_alphabetic() => break c,
                        Some(c) => arg.push(c),
                        None => break ' ',
                    }
                };
                let n = arg.parse::<usize>().unwrap_or(1);
                match cmd {
                    'A' => (row, col) = (row.saturating_sub(n), col.min(COLS - 1)),
                    'B' => (row, col) = (row + n, col.min(COLS - 1)),
                    'K' if arg == "2" => lines[row].clear(),
                    'K' => lines[row].truncate(col),
                    'J' => {
                        lines[row].truncate(col);
                        lines.truncate(row + 1);
                    }
                    _ => {}
                }
            }
            '\r' => col = 0,
            '\n' => row += 1,
            c => {
                if col == COLS {
                    (row, col) = (row + 1, 0);
                    if lines.len() <= row {
                        lines.resize(row + 1, Vec::new());
                    }
                }
                let line = &mut lines[row];
                if line.len() <= col {
                    line.resize(col + 1, ' ');
                }
                line[col] = c;
                col += 1;
            }
        }
    }
    let mut shown: Vec<String> = lines
        .iter()
        .map(|l| l.iter().collect::<String>().trim_end().to_owned())
        .collect();
    while shown.last().is_some_and(String::is_empty) {
        shown.pop();
    }
    shown
}

/// Lines of `screen` that are a bar's frame (its prefix, right-aligned).
fn bar_lines(screen: &[String]) -> Vec<&String> {
    screen
        .iter()
        .filter(|l| {
            ["scan ", "project ", "verify "]
                .iter()
                .any(|p| l.trim_start().starts_with(p) && l.starts_with("   "))
        })
        .collect()
}

/// The rates a bar drew (`1,234/s`), as drawn.
fn rates(drawn: &str) -> Vec<&str> {
    drawn
        .match_indices("/s")
        .map(|(at, _)| drawn[..at].rsplit(' ').next().unwrap_or(""))
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
    for rate in rates(&scan) {
        assert!(
            !rate.is_empty() && rate.chars().all(|c| c.is_ascii_digit() || c == ','),
            "a rate is not a whole number: {rate:?} in {scan:?}"
        );
    }
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
}

/// `project` draws a spinner until it has read how many events it will apply, then a bar
/// towards that: its first frame was a full bar at `0/0`.
#[test]
fn the_project_bar_is_not_full_before_it_knows_its_total() {
    let env = Env::dirs("", "");
    tree(&env);
    env.ok(&["scan"]);
    let drawn = under_pty(&env, "project");
    let frames: Vec<&str> = drawn
        .split("   project ")
        .skip(1)
        .map(|f| f.split(['\r', '\n', '\u{1b}']).next().unwrap_or(""))
        .collect();
    assert!(!frames.is_empty(), "no progress drawn: {drawn:?}");
    let full = format!("[{}]", "=".repeat(40));
    assert!(
        !frames[0].starts_with(&full),
        "the first frame is a full bar: {frames:#?}"
    );
    for frame in &frames {
        assert!(
            !frame.contains("/0 "),
            "a bar towards 0: {frame:?} in {frames:#?}"
        );
    }
    assert!(
        frames.iter().any(|f| f.contains("/1,530")),
        "no bar towards the 1,530 events: {frames:#?}"
    );
}

/// `verify` counts each item compared once, not once per side: 8,040 items never show as
/// more. (Enough items that a frame is drawn while the target is read.)
#[test]
fn verify_counts_items_compared() {
    let env = Env::dirs("", "");
    for i in 0..8000 {
        write(env.src().join(format!("d{}/f{i}.txt", i % 40)), "x");
    }
    env.ok(&["sync"]);
    let drawn = under_pty(&env, "verify");
    let counts = counts(&drawn, "verify");
    assert!(!counts.is_empty(), "no progress drawn by verify: {drawn:?}");
    assert!(
        counts.iter().all(|n| *n <= 8040),
        "verify counted past the 8,040 items: {counts:?}"
    );
}

/// `-q` draws nothing on a terminal, not even a first frame of a bar that is then hidden.
#[test]
fn quiet_draws_no_frame_on_a_terminal() {
    let env = Env::dirs("", "");
    tree(&env);
    for args in ["--quiet sync", "-q verify", "-q scan", "-q project"] {
        let quiet = under_pty(&env, args);
        assert!(
            !quiet.contains("/s") && !quiet.contains("ETA") && !quiet.contains("\u{1b}[2K"),
            "`{args}` drew progress: {quiet:?}"
        );
    }
}

/// A log line written while bars are drawn is printed whole above them, and finished bars
/// leave no line behind: the terminal shows the log and the summary, nothing else.
#[test]
fn log_lines_go_above_the_bars_and_no_frame_is_left() {
    let env = Env::dirs("", "");
    tree(&env);
    let drawn = under_pty_logging(&env, "sync", "info");
    assert!(drawn.contains("/s"), "no progress drawn: {drawn:?}");
    let shown = screen(&drawn);
    assert_eq!(bar_lines(&shown), Vec::<&String>::new(), "{shown:#?}");
    assert!(
        shown
            .iter()
            .any(|l| l.contains("INFO") && l.contains("scan finished") && l.contains("result=ok")),
        "the scan's log line is not shown whole: {shown:#?}"
    );
    assert!(
        shown
            .iter()
            .any(|l| l.starts_with("t: applied 1530 events")),
        "{shown:#?}"
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
