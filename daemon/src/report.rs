//! Run reports: every one-shot run and every daemon cycle that changed something leaves a
//! `report.json` (schema in `docs/reports.md`) and a human `summary.txt` under
//! `{reports_dir}/{pipeline}/{YYYYMMDDTHHMMSSZ}/`; the oldest are pruned to the retention.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::config::DeleteLimit;
use crate::pipeline::Pipeline;
use crate::projector::{PlannedAction, ProjectReport, Retrying};
use crate::state::{Failure, ScanRecord};

/// Version of the `report.json` schema; bumped on any incompatible change.
pub const REPORT_VERSION: u32 = 1;

/// Name of a report directory: the UTC time it was written.
const STAMP: &str = "%Y%m%dT%H%M%SZ";

/// How long a cycle's end waits for the pipeline's status (which reads the log's offsets).
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// What to check when a report cannot be written.
fn write_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            "the disk of `reports_dir` is full: free space there or point `reports_dir` elsewhere"
        }
        _ => "check `reports_dir` in the config and its permissions",
    }
}

/// A report could not be written or old ones pruned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A report file or directory could not be written.
    #[error("cannot write report {}: {source} ({})", path.display(), write_hint(source))]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An old report could not be listed or removed.
    #[error("cannot prune old reports in {}: {source}", path.display())]
    Prune {
        /// The pipeline's report directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The scan part of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanSummary {
    /// Scan id (also in every event it produced).
    pub id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration_secs: f64,
    /// `ok`, `degraded` or `failed`.
    pub result: String,
    /// Items listed.
    pub listed: u64,
    /// Upserts appended.
    pub upserts: u64,
    /// Deletes appended.
    pub deletes: u64,
    /// Changes found that the log did not take (its append failed); the next scan finds
    /// them again. Left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_appended: u64,
    /// Entries that could not be listed or read.
    pub errors: u64,
    /// Entries skipped on purpose.
    pub skipped: u64,
    /// Entries gone by the time the scan read them (removed or renamed mid-scan): absent,
    /// not errors. Left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vanished: u64,
    /// What the errors were (the first 20; the log has every one): the items left out
    /// and why, secrets redacted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_messages: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `, N vanished mid-scan` for a scan that met entries gone before it read them; empty
/// otherwise.
pub fn vanished_note(vanished: u64) -> String {
    if vanished == 0 {
        String::new()
    } else {
        format!(", {vanished} vanished mid-scan (absent, not errors)")
    }
}

/// What the delete guard decided, so a reader sees why deletes did or did not happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardDecision {
    /// `passed` (deletes within the limit were emitted), `tripped` (all withheld),
    /// `skipped` (the listing had errors or the scan was interrupted, so no deletes were
    /// considered) or
    /// `not_evaluated` (no scan in this run).
    pub decision: String,
    /// Deletes the scan emitted (`passed`) or would have emitted (`tripped`).
    pub deletes: u64,
    /// Deletes the limit allowed, when it was evaluated.
    pub allowed: Option<u64>,
    /// The configured `max_delete`, as written.
    pub limit: String,
}

/// One `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub report_version: u32,
    /// The pipeline.
    pub pipeline: String,
    /// `scan`, `project`, `sync`, `plan` or `cycle` (a daemon scan interval).
    pub run: String,
    /// When the report was written.
    pub generated_at_utc: DateTime<Utc>,
    /// True when nothing was written to the target (`plan`).
    pub dry_run: bool,
    /// The scan of this run, if it scanned.
    pub scan: Option<ScanSummary>,
    /// Items by the outcome the run (or daemon cycle) left them with (`created`,
    /// `updated`, … as in `tidemark_applies_total`, which counts every attempt instead);
    /// for a dry run, the outcomes the events would have.
    pub counts: BTreeMap<String, u64>,
    /// The same counts per kind.
    pub by_kind: BTreeMap<String, BTreeMap<String, u64>>,
    /// Items the run kept waiting (for the items they reference) and then applied: in
    /// `counts` by the outcome of that apply, not as `deferred`. Left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub waited: u64,
    /// Events that failed, with their reasons.
    pub failures: Vec<Failure>,
    /// The delete guard's decision.
    pub delete_guard: GuardDecision,
    /// The error that stopped the run (exit 1), as printed on stderr: the counts are what
    /// it applied before. Absent from the report of a run that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a one-shot run stopped early on a signal (Ctrl-C), as printed on stdout: the
    /// counts are what it applied and committed before. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// Only in the report of a pipeline's first projection (or plan of it) into a
    /// directory target that already held entries: how many of them the source does not
    /// have, which tidemark leaves alone ([`target_only_note`]). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_only: Option<u64>,
    /// With `target_only`, who wrote the target before, by its writer note
    /// ([`crate::writer`]): those entries are tidemark's, of a history this state lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_written_by: Option<String>,
    /// Only in a daemon cycle's report while its projector retries with backoff (the
    /// target unavailable, the log unreadable): since when (the outage's start, across
    /// restarts), the failed attempts, the last error (secrets redacted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projector_retrying: Option<Retrying>,
}

/// What a pipeline's first projection into a target that already held entries says of
/// the `n` of them the source does not have: `verify` alone told of them before. With
/// `written_by` (the target's writer note), tidemark wrote them, not someone before it.
pub fn target_only_note(n: u64, written_by: Option<&str>) -> String {
    let entries = if n == 1 { "entry" } else { "entries" };
    match written_by {
        None => format!(
            "the target holds {n} {entries} the source does not have (there before this pipeline's first projection); tidemark leaves them alone, as it deletes only what it wrote; `tidemark verify` lists them"
        ),
        Some(by) => format!(
            "the target holds {n} {entries} the source does not have; tidemark wrote this target before, last in {by}, and this state has none of that history: they may be files it wrote that the source has deleted since; they are left alone, as tidemark deletes only what this state wrote; `tidemark verify` lists them (remove them by hand if they should go)"
        ),
    }
}

impl Report {
    /// An empty report of `run` on `pipeline` whose guard limit is `max_delete`.
    pub fn new(pipeline: &str, run: &str, dry_run: bool, max_delete: DeleteLimit) -> Report {
        Report {
            report_version: REPORT_VERSION,
            pipeline: pipeline.to_owned(),
            run: run.to_owned(),
            generated_at_utc: Utc::now(),
            dry_run,
            scan: None,
            counts: BTreeMap::new(),
            by_kind: BTreeMap::new(),
            waited: 0,
            failures: Vec::new(),
            delete_guard: GuardDecision {
                decision: "not_evaluated".into(),
                deletes: 0,
                allowed: None,
                limit: max_delete.to_string(),
            },
            error: None,
            interrupted: None,
            target_only: None,
            target_written_by: None,
            projector_retrying: None,
        }
    }

    /// Records how many entries of a pre-filled target the source does not have
    /// ([`crate::verify::Prefilled`]), when there are any.
    pub fn with_target_only(mut self, found: Option<crate::verify::TargetOnly>) -> Report {
        if let Some(found) = found.filter(|f| f.entries > 0) {
            self.target_only = Some(found.entries);
            self.target_written_by = found.written_by;
        }
        self
    }

    /// What the run says of the entries only the target has ([`target_only_note`]).
    pub fn target_only_note(&self) -> Option<String> {
        let n = self.target_only?;
        Some(target_only_note(n, self.target_written_by.as_deref()))
    }

    /// Records the error that stopped the run.
    pub fn with_error(mut self, message: &str) -> Report {
        self.error = Some(message.to_owned());
        self
    }

    /// Records the signal that stopped the run before it finished.
    pub fn with_interruption(mut self, message: &str) -> Report {
        self.interrupted = Some(message.to_owned());
        self
    }

    /// Adds a scan and the guard's decision on it.
    pub fn with_scan(mut self, record: &ScanRecord) -> Report {
        self.scan = Some(ScanSummary {
            id: record.id.clone(),
            started_at: record.started_at,
            duration_secs: record.duration_secs,
            result: record.result.clone(),
            listed: record.listed,
            upserts: record.upserts,
            deletes: record.deletes,
            not_appended: record.not_appended,
            errors: record.errors,
            skipped: record.skipped,
            vanished: record.vanished,
            error_messages: record.error_messages.clone(),
        });
        let g = &mut self.delete_guard;
        // A scan that did not weigh its deletes keeps the trip of the last one that did
        // (`Scanner::scan_inner`): it decided nothing itself.
        match (&record.guard, record.result == "ok") {
            (Some(trip), true) => {
                g.decision = "tripped".into();
                g.deletes = trip.would_delete;
                g.allowed = Some(trip.allowed);
                g.limit = trip.limit.clone();
            }
            (_, false) => g.decision = "skipped".into(),
            (None, true) => {
                g.decision = "passed".into();
                g.deletes = record.deletes;
            }
        }
        self
    }

    /// Adds what a projection did.
    pub fn with_project(mut self, report: &ProjectReport) -> Report {
        self.add_counts(report);
        self.failures.extend(report.failures.iter().cloned());
        self
    }

    /// Adds a projection's counts and `waited`, not its failures.
    fn add_counts(&mut self, report: &ProjectReport) {
        for (kind, outcomes) in &report.by_kind {
            for (outcome, n) in outcomes {
                self.add(kind, outcome.as_str(), *n);
            }
        }
        self.waited += report.waited;
    }

    /// Adds what a plan would do, as the outcomes `project` would report, and the failed
    /// items it would try again, with the reason each failed, as `failures`.
    pub fn with_plan(mut self, actions: &[PlannedAction]) -> Report {
        for a in actions {
            if let Some(failed) = &a.failed {
                self.failures.push(failed.clone());
            }
            for (kind, outcome) in a.outcomes() {
                self.add(kind, outcome, 1);
            }
        }
        self
    }

    fn add(&mut self, kind: &str, outcome: &str, n: u64) {
        if n == 0 {
            return;
        }
        *self.counts.entry(outcome.to_owned()).or_insert(0) += n;
        *self
            .by_kind
            .entry(kind.to_owned())
            .or_default()
            .entry(outcome.to_owned())
            .or_insert(0) += n;
    }

    /// Whether the run did (or, dry, would do) anything: appended events, target writes,
    /// new failures.
    pub fn activity(&self) -> bool {
        self.scan
            .as_ref()
            .is_some_and(|s| s.upserts + s.deletes > 0)
            || self
                .counts
                .iter()
                .any(|(o, n)| *n > 0 && o != "unchanged" && o != "retained")
            || !self.failures.is_empty()
    }

    /// A condition that lasts until someone acts, described so that two runs meeting
    /// the same one compare equal: a scan that did not end `ok` (with its error count),
    /// a tripped delete guard (with its numbers) or a projector retrying (since when, on
    /// which error, without the counts of its give-ups). `None` when the run met none.
    pub fn condition(&self) -> Option<String> {
        let scan = self
            .scan
            .as_ref()
            .filter(|s| s.result != "ok" || s.errors > 0)
            .map(|s| format!("scan {} with {} errors", s.result, s.errors));
        let g = &self.delete_guard;
        let guard = (g.decision == "tripped").then(|| {
            format!(
                "delete guard tripped: {} deletes, {} allowed by {}",
                g.deletes,
                g.allowed.unwrap_or(0),
                g.limit
            )
        });
        let retrying = self.projector_retrying.as_ref().map(|r| {
            format!(
                "projector retrying since {}: {}",
                r.outage.since,
                crate::http::without_tally(&r.outage.error)
            )
        });
        let all: Vec<String> = scan.into_iter().chain(guard).chain(retrying).collect();
        (!all.is_empty()).then(|| all.join("; "))
    }

    /// The human summary written beside `report.json`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "tidemark {} report for pipeline {}{}",
            self.run,
            self.pipeline,
            if self.dry_run {
                " (dry run: nothing was written)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "generated {}",
            self.generated_at_utc
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        if let Some(error) = &self.error {
            let _ = writeln!(s, "error: the run stopped, exit 1: {error}");
        }
        if let Some(interrupted) = &self.interrupted {
            let _ = writeln!(s, "{interrupted}");
        }
        if let Some(r) = &self.projector_retrying {
            let _ = writeln!(
                s,
                "projector: retrying with backoff since {} ({} failed attempts so far; `tidemark status` shows the latest): {}",
                r.outage.since.format("%Y-%m-%d %H:%M:%S UTC"),
                r.outage.attempts,
                r.outage.error
            );
        }
        match &self.scan {
            Some(scan) => {
                let _ = writeln!(
                    s,
                    "scan {} {} in {:.2} s: {} listed, {} upserts, {} deletes, {} errors, {} skipped{}",
                    scan.id,
                    scan.result,
                    scan.duration_secs,
                    scan.listed,
                    scan.upserts,
                    scan.deletes,
                    scan.errors,
                    scan.skipped,
                    vanished_note(scan.vanished)
                );
                for e in &scan.error_messages {
                    let _ = writeln!(s, "  error: {e}");
                }
                let more = scan.errors.saturating_sub(scan.error_messages.len() as u64);
                if more > 0 && !scan.error_messages.is_empty() {
                    let _ = writeln!(s, "  and {more} more errors (the log names each)");
                }
                if scan.not_appended > 0 {
                    let _ = writeln!(
                        s,
                        "scan: {} changes found were not appended (the log did not acknowledge them); the next scan finds them again",
                        scan.not_appended
                    );
                }
            }
            None => {
                let _ = writeln!(s, "scan: none in this run");
            }
        }
        let g = &self.delete_guard;
        let _ = match g.decision.as_str() {
            "tripped" => writeln!(
                s,
                "delete guard: TRIPPED: {} deletes withheld, max_delete = {} allows {}; if they are intended, raise max_delete, then restart the daemon or run `tidemark sync`",
                g.deletes,
                g.limit,
                g.allowed.unwrap_or(0)
            ),
            "passed" => writeln!(
                s,
                "delete guard: passed ({} deletes emitted, max_delete = {})",
                g.deletes, g.limit
            ),
            "skipped" => writeln!(
                s,
                "delete guard: no deletes considered, {}",
                match &self.scan {
                    Some(scan) if scan.result == crate::scanner::INTERRUPTED =>
                        "the scan was interrupted",
                    _ => "the listing had errors",
                }
            ),
            _ => writeln!(s, "delete guard: not evaluated (no scan)"),
        };
        let verb = if self.dry_run {
            "would apply"
        } else if self.error.is_some() {
            "applied before the error"
        } else if self.interrupted.is_some() {
            "applied before the interruption"
        } else {
            "applied"
        };
        let line = |counts: &BTreeMap<String, u64>| {
            counts
                .iter()
                .map(|(o, n)| format!("{n} {o}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.counts.is_empty() {
            let _ = writeln!(s, "{verb}: nothing");
        } else {
            let waited = match self.waited {
                0 => String::new(),
                n => format!(" ({n} waited for other items first)"),
            };
            let _ = writeln!(s, "{verb}: {}{waited}", line(&self.counts));
            for (kind, counts) in &self.by_kind {
                let _ = writeln!(s, "  {kind}: {}", line(counts));
            }
        }
        if let Some(note) = self.target_only_note() {
            let _ = writeln!(s, "{note}");
        }
        if self.failures.is_empty() {
            let _ = writeln!(s, "failures: none");
        } else {
            let _ = writeln!(s, "failures: {}", self.failures.len());
            for f in &self.failures {
                let _ = writeln!(s, "  {} (offset {}): {}", f.item(), f.offset, f.reason);
            }
        }
        s
    }

    /// Writes `report.json` and `summary.txt` into a new directory under
    /// `{reports_dir}/{pipeline}/`, then prunes that pipeline's reports to `retention`.
    /// Returns the new directory.
    pub fn write(&self, reports_dir: &Path, retention: usize) -> Result<PathBuf, ReportError> {
        let base = reports_dir.join(&self.pipeline);
        let stamp = self.generated_at_utc.format(STAMP).to_string();
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ReportError::Write { path, source }
        };
        // Owner-only, as the state directory: reports name files and quote failure
        // reasons. (A directory that exists keeps its mode.)
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(write_err(&base))?;
        let names: Vec<String> = std::fs::read_dir(&base)
            .map_err(write_err(&base))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // A clock set back (or a report written ahead of it) would name this report before
        // earlier ones, and retention, which goes by name, removed it at once: it takes the
        // newest report's second then (its `generated_at_utc` still says when it was made).
        let stamp = names
            .iter()
            .filter_map(|name| name.split('-').next())
            .filter(|s| chrono::NaiveDateTime::parse_from_str(s, STAMP).is_ok())
            .max()
            .filter(|newest| **newest > *stamp)
            .map_or(stamp, |newest| newest.to_owned());
        // Two reports in the same second get `-1`, `-2`, … so neither is lost. The suffix
        // goes past every existing one, so a pruned name is never reused for a newer report.
        let mut n = names
            .iter()
            .filter_map(|name| match name.strip_prefix(stamp.as_str())? {
                "" => Some(0),
                rest => rest.strip_prefix('-')?.parse::<u64>().ok(),
            })
            .max()
            .map_or(0, |m| m + 1);
        let mut dir = if n == 0 {
            base.join(&stamp)
        } else {
            base.join(format!("{stamp}-{n}"))
        };
        // Both files are written into a hidden directory that is renamed into place, so a
        // reader never sees a report directory without its files.
        let tmp = base.join(format!(".{stamp}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(write_err(&tmp))?;
        let json = serde_json::to_string_pretty(self).expect("reports serialize");
        for (name, text) in [("summary.txt", self.summary()), ("report.json", json)] {
            let bytes = crate::http::redact_known(&text).into_owned();
            let path = tmp.join(name);
            if let Err(e) = std::fs::write(&path, bytes) {
                // Its name holds this report's second: left, every failed write (a full
                // disk) left one more that no retention removes.
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(write_err(&path)(e));
            }
        }
        loop {
            match std::fs::rename(&tmp, &dir) {
                Ok(()) => break,
                // A report of the same second already took the name (ENOTEMPTY).
                Err(e)
                    if e.kind() == std::io::ErrorKind::AlreadyExists
                        || e.raw_os_error() == Some(39) =>
                {
                    n += 1;
                    dir = base.join(format!("{stamp}-{n}"));
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(write_err(&dir)(e));
                }
            }
        }
        prune(&base, retention)?;
        Ok(dir)
    }
}

/// Deletes the oldest report directories of one pipeline beyond `retention`. Only
/// directories named like a report are touched.
pub fn prune(pipeline_dir: &Path, retention: usize) -> Result<(), ReportError> {
    let err = |source| ReportError::Prune {
        path: pipeline_dir.to_owned(),
        source,
    };
    let mut reports: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(pipeline_dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stamp = name.split('-').next().unwrap_or("");
        if entry.file_type().map_err(err)?.is_dir()
            && chrono::NaiveDateTime::parse_from_str(stamp, STAMP).is_ok()
        {
            reports.push(name);
        }
    }
    // Oldest first: the stamp sorts by time, and `-n` suffixes sort after their stamp.
    reports.sort_by(|a, b| {
        let key = |s: &str| {
            let (t, n) = s.split_once('-').unwrap_or((s, "0"));
            (t.to_owned(), n.parse::<u64>().unwrap_or(0))
        };
        key(a).cmp(&key(b))
    });
    let excess = reports.len().saturating_sub(retention);
    for name in &reports[..excess] {
        std::fs::remove_dir_all(pipeline_dir.join(name)).map_err(err)?;
    }
    Ok(())
}

/// A daemon cycle of one pipeline: a scan and the projection that follows it until the
/// projector catches up or the scan interval ends. Its counts are the projector's
/// [`Projector::tally`](crate::projector::Projector::tally) between the end of one cycle
/// and the end of the next: items by the outcome they ended with in the cycle, as a
/// one-shot run counts them, tallied where `tidemark_applies_total` counts, so no apply is
/// counted twice or lost between cycles.
///
/// A cycle writes a report when it did something, or when a lasting condition (a failed
/// or degraded scan, a tripped guard) begins, changes or ends; a guard that stays tripped
/// for hours leaves one report, not one per cycle pushing older history out of
/// `report_retention`.
pub struct Cycle {
    pipeline: Arc<Pipeline>,
    reports_dir: PathBuf,
    retention: usize,
    since: DateTime<Utc>,
    scan: Option<ScanRecord>,
    /// The cycle's scan failed: its record is the one `status` shows.
    scan_failed: bool,
    /// The previous cycle's [`Report::condition`].
    condition: Option<String>,
    /// The failure the scans keep meeting, for the log.
    failing: Lasting,
    /// The daemon's first projection goes into a directory target that already held
    /// entries: the first cycle whose scan completed says how many of them the source
    /// does not have, once.
    prefilled: Option<crate::verify::Prefilled>,
}

impl Cycle {
    /// Starts counting the first cycle of `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>, reports_dir: PathBuf, retention: usize) -> Cycle {
        pipeline.projector.tally();
        let prefilled = pipeline
            .config
            .role
            .projects()
            .then(|| pipeline.prefilled())
            .flatten();
        Cycle {
            prefilled,
            pipeline,
            reports_dir,
            retention,
            since: Utc::now(),
            scan: None,
            scan_failed: false,
            condition: None,
            failing: Lasting::default(),
        }
    }

    /// Records the cycle's scan; logs that the scans work again when they failed before.
    pub fn scanned(&mut self, record: ScanRecord) {
        if let Some(ended) = self.failing.ended() {
            info!(
                pipeline = %self.pipeline.name(),
                "{}: the scan succeeded after {} failed scans since {}",
                if ended.source { "the source is back" } else { "scans work again" },
                ended.failures,
                ended.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
        self.scan = Some(record);
    }

    /// Records that the cycle's scan failed with `e`; the report takes the failed scan's
    /// record from the pipeline's status. The error is logged as a lasting condition
    /// ([`Lasting`]): when it begins, as a reminder at growing intervals, and (by
    /// [`Cycle::scanned`]) when it ends, not at every cycle.
    pub fn scan_failed(&mut self, e: &crate::scanner::ScanError) {
        self.scan_failed = true;
        let source = matches!(e, crate::scanner::ScanError::List { .. });
        match self
            .failing
            .failed(e.to_string(), source, std::time::Instant::now())
        {
            Note::Began => error!(
                "{e} (while it lasts, it is logged again at growing intervals, up to hourly; each failed scan still counts in tidemark_scans_total and `status`)"
            ),
            Note::Reminder { failures, since } => error!(
                "{e} (still: {failures} failed scans since {})",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            Note::Repeat => debug!("{e}"),
        }
    }

    /// Waits out `interval`; as soon as the projector has caught up (or when the interval
    /// ends) logs the cycle's summary line and writes its report if it changed anything.
    pub async fn wait(&mut self, interval: Duration) {
        let deadline = tokio::time::Instant::now() + interval;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            // The projector tallies a batch's applies before committing it, so at lag 0
            // every apply of this cycle is in the tally.
            if matches!(self.pipeline.projector.lag().await, Ok(0)) {
                break;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(200))).await;
        }
        self.finish().await;
        tokio::time::sleep_until(deadline).await;
    }

    /// Ends the cycle: logs its summary line, writes its report if it changed anything
    /// and starts the next one.
    pub async fn finish(&mut self) {
        let name = self.pipeline.name().to_owned();
        let config = &self.pipeline.config;
        let mut report = Report::new(&name, "cycle", false, config.max_delete);
        // The status reads the event log's offsets; a broker that does not answer must not
        // hold up the cycle (or the daemon's shutdown) for its request timeouts.
        let status = match tokio::time::timeout(STATUS_WAIT, self.pipeline.status()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                warn!(pipeline = %name, "the event log did not answer within {STATUS_WAIT:?}; the cycle's report leaves out its failures and the failed scan");
                None
            }
        };
        let failed_scan = std::mem::take(&mut self.scan_failed)
            .then(|| status.as_ref().and_then(|s| s.last_scan.clone()))
            .flatten();
        if let Some(scan) = self.scan.take().or(failed_scan) {
            // One that did not list everything leaves the index short of the source.
            if scan.result == "ok" {
                if let Some(prefilled) = self.prefilled.take() {
                    report =
                        report.with_target_only(prefilled.target_only(&Default::default()).await);
                }
            }
            report = report.with_scan(&scan);
        }
        if let Some(note) = report.target_only_note() {
            info!(pipeline = %name, "{note}");
        }
        report.add_counts(&self.pipeline.projector.tally());
        report.projector_retrying = self.pipeline.projector.retrying();
        if let Some(status) = status {
            report.failures = status
                .failed
                .into_iter()
                .filter(|f| f.at >= self.since)
                .collect();
        }
        self.since = report.generated_at_utc;
        let outcomes: Vec<String> = report
            .counts
            .iter()
            .map(|(o, n)| format!("{n} {o}"))
            .collect();
        let events: u64 = report.counts.values().sum();
        let condition = report.condition();
        let changed = condition != self.condition;
        self.condition = condition;
        // A cycle that changed nothing and met nothing new (an idle daemon, or one whose
        // lasting failure was logged when it began) is logged at debug, not every interval.
        let notable = report.activity() || changed || report.target_only.is_some();
        macro_rules! cycle_finished {
            ($level:ident) => {
                $level!(
                    pipeline = %name,
                    upserts = report.scan.as_ref().map_or(0, |s| s.upserts),
                    deletes = report.scan.as_ref().map_or(0, |s| s.deletes),
                    events,
                    outcomes = %if outcomes.is_empty() { "none".to_owned() } else { outcomes.join(", ") },
                    failures = report.failures.len(),
                    delete_guard = %report.delete_guard.decision,
                    "cycle finished"
                )
            };
        }
        if notable {
            cycle_finished!(info);
        } else {
            cycle_finished!(debug);
        }
        if notable {
            if let Err(e) = report.write(&self.reports_dir, self.retention) {
                warn!(pipeline = %name, "{e}");
            }
        }
    }
}

/// First pause before a lasting failure is logged again ([`Lasting`]).
const REMIND_FIRST: Duration = Duration::from_secs(60);
/// Longest pause between two reminders of a lasting failure.
const REMIND_MAX: Duration = Duration::from_secs(60 * 60);

/// A failure the daemon's scans keep meeting (the source directory gone): logged when it
/// begins (or its message changes), again [`REMIND_FIRST`] later and at doubling
/// intervals up to [`REMIND_MAX`] while it lasts, and when it ends. The reports treat a
/// lasting condition the same way ([`Cycle`]); the metrics and `status` count every
/// failed scan.
#[derive(Debug, Default)]
struct Lasting {
    ongoing: Option<Ongoing>,
}

/// A [`Lasting`] failure while it lasts.
#[derive(Debug)]
struct Ongoing {
    message: String,
    /// Whether the source itself could not be listed.
    source: bool,
    since: DateTime<Utc>,
    /// Failed scans with this message.
    failures: u64,
    /// The pause before the next reminder, once it is due.
    pause: Duration,
    remind_at: std::time::Instant,
}

/// What to log of one failure ([`Lasting::failed`]).
#[derive(Debug, PartialEq)]
enum Note {
    /// It begins: at error level.
    Began,
    /// A reminder is due: at error level, with the count since it began.
    Reminder { failures: u64, since: DateTime<Utc> },
    /// A repeat in between: at debug level.
    Repeat,
}

impl Lasting {
    /// One more failure with `message` at `now`.
    fn failed(&mut self, message: String, source: bool, now: std::time::Instant) -> Note {
        match &mut self.ongoing {
            Some(o) if o.message == message => {
                o.failures += 1;
                if now < o.remind_at {
                    return Note::Repeat;
                }
                o.remind_at = now + o.pause;
                o.pause = (o.pause * 2).min(REMIND_MAX);
                Note::Reminder {
                    failures: o.failures,
                    since: o.since,
                }
            }
            _ => {
                self.ongoing = Some(Ongoing {
                    message,
                    source,
                    since: Utc::now(),
                    failures: 1,
                    pause: (REMIND_FIRST * 2).min(REMIND_MAX),
                    remind_at: now + REMIND_FIRST,
                });
                Note::Began
            }
        }
    }

    /// The failure that has ended, if one was ongoing.
    fn ended(&mut self) -> Option<Ongoing> {
        self.ongoing.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure met at every scan is logged when it begins, then 1, 3, 7, … minutes
    /// later (the pause doubling up to an hour), and again at once when its message
    /// changes; its end returns what it was.
    #[test]
    fn a_lasting_failure_is_logged_when_it_begins_then_at_doubling_intervals() {
        let t0 = std::time::Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut lasting = Lasting::default();
        let gone = || "source directory /src cannot be read".to_owned();
        assert_eq!(lasting.failed(gone(), true, at(0)), Note::Began);
        let mut logged = Vec::new();
        for second in 1..=(3 * 3600) {
            if lasting.failed(gone(), true, at(second)) != Note::Repeat {
                logged.push(second);
            }
        }
        let minutes: Vec<u64> = logged.iter().map(|s| s / 60).collect();
        assert_eq!(
            minutes,
            [1, 3, 7, 15, 31, 63, 123],
            "reminders after 1, 2, 4, … minutes, then hourly"
        );
        assert!(matches!(
            lasting.failed(gone(), true, at(3 * 3600 + 1)),
            Note::Repeat
        ));
        // Another error is another condition: logged at once.
        assert_eq!(
            lasting.failed("the log refused the append".into(), false, at(3 * 3600 + 2)),
            Note::Began
        );
        let ended = lasting.ended().expect("it was ongoing");
        assert_eq!((ended.failures, ended.source), (1, false));
        assert!(lasting.ended().is_none());
        assert_eq!(lasting.failed(gone(), true, at(3 * 3600 + 3)), Note::Began);
    }

    /// A report written after the clock was set back (or after one written ahead of it)
    /// is named after the newest report, so retention, which goes by name, keeps it: it
    /// was named by its own earlier second and removed at once.
    #[test]
    fn a_report_written_after_the_clock_went_back_is_kept_by_retention() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = dir.path().join("p/20991231T235959Z");
        std::fs::create_dir_all(&ahead).unwrap();
        let report = Report::new("p", "sync", false, crate::config::DeleteLimit::Count(1));
        let written = report.write(dir.path(), 1).unwrap();
        assert_eq!(
            written.file_name().unwrap().to_string_lossy(),
            "20991231T235959Z-1"
        );
        assert!(written.exists(), "the new report was pruned");
        assert!(!ahead.exists(), "the older one is the one pruned");
        // A clock that is right again names reports by their own second once more.
        let next = Report::new("p", "sync", false, crate::config::DeleteLimit::Count(1))
            .write(&dir.path().join("other"), 1)
            .unwrap();
        assert!(!next
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("2099"));
    }

    /// A report lost to a full disk says so, rather than sending the reader to check
    /// permissions.
    #[test]
    fn a_report_lost_to_a_full_disk_names_the_full_disk() {
        let full = ReportError::Write {
            path: "/var/lib/tidemark/reports/p/x/summary.txt".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        let message = full.to_string();
        assert!(
            message.contains("the disk of `reports_dir` is full")
                && !message.contains("permissions"),
            "{message}"
        );
        let denied = ReportError::Write {
            path: "/r".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(denied.to_string().contains("its permissions"), "{denied}");
    }
}
