//! `tidemark verify`: lists source and target, compares them item by item by checksum
//! (and mode, and a file's modification time), and reports what is missing, extra or
//! different. For REST targets, target items are mapped back to source ids through the
//! remap table and compared as canonical JSON without ignored and server-managed fields.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use serde::Serialize;
use tidemark_proto::{item_identity, item_version};

use crate::config::{
    DirSourceConfig, DirTargetConfig, HttpSourceConfig, HttpTargetConfig, PipelineConfig,
    SourceConfig, TargetConfig,
};
use crate::progress::Progress;
use crate::scanner::IndexView;
use crate::source::{DirSource, FetchError, ListError, Listing, Source};
use crate::state::{item_label, State, StateError};
use crate::target::fs::TMP_DIR;

/// Drift between source and target.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Items compared.
    pub compared: u64,
    /// In the source, not in the target.
    pub missing: Vec<Drifted>,
    /// In the target, not in the source, with prune on: drift.
    pub extra: Vec<Drifted>,
    /// In the target, not in the source, with prune off: kept on purpose, no drift.
    pub retained: Vec<Drifted>,
    /// In both, with different content, mode or (files) modification time.
    pub different: Vec<Drifted>,
    /// Entries that could not be read, each after its side (`source: …`, `target: …`).
    pub unreadable: Vec<String>,
    /// Whether the target prunes: items only it has are `extra`, else `retained`.
    pub prune: bool,
    /// Why the pipeline's last scan emitted no deletes (its delete guard tripped, or its
    /// listing had errors), if it did not: items the source no longer has then stay on
    /// the target until a later scan emits their deletes, and show as `extra` meanwhile.
    #[serde(skip)]
    pub deletes_withheld: Option<String>,
    /// Who wrote a directory target last, by its writer note ([`crate::writer`]), when
    /// that is not this state: what that history wrote or deleted is not known here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_written_by: Option<String>,
}

/// An item that is not on the target as it is in the source. JSON shows it as
/// `{"kind", "key"}`, with `"name"` when the source names it (or, for a REST item only
/// the target has, the target), and `"target_id"` for such an item.
#[derive(Debug, Clone, Serialize)]
pub struct Drifted {
    /// Kind of the item.
    pub kind: String,
    /// Key of the item: its source key (for a REST target item that no source id maps
    /// to, `(target id …)`).
    pub key: String,
    /// The item's name in the source (a REST kind's `name_field`), since a REST key is an
    /// id that says nothing to a person; for a REST item only the target has, its name
    /// there (the target kind's `name_field`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The id of a REST item only the target has, there: what a person looks it up by on
    /// the target, where its source key (an id the source no longer has) says nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    /// The source's version of a missing or different item: whether the log holds it
    /// tells a sync from a replay as what brings the item back.
    #[serde(skip)]
    version: Option<String>,
    /// What brings it in line with the source, as the state tells ([`verify`] sets it).
    #[serde(skip)]
    pub fix: Option<Fix>,
    /// What differs of a different item (`content`, `mode`, `time`), as far as the
    /// target can hold it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differs: Vec<&'static str>,
}

impl Drifted {
    /// The item of identity `id` (`kind\0key`).
    fn new(id: &str) -> Drifted {
        let (kind, key) = id.split_once('\0').unwrap_or(("", id));
        Drifted {
            kind: kind.to_owned(),
            key: key.to_owned(),
            name: None,
            target_id: None,
            version: None,
            fix: None,
            differs: Vec::new(),
        }
    }

    /// With the source's `version` of it and its `name` there.
    fn in_source(mut self, version: &str, name: Option<&str>) -> Drifted {
        self.version = Some(version.to_owned());
        self.name = name.map(str::to_owned);
        self
    }

    fn identity(&self) -> String {
        item_identity(&self.kind, &self.key)
    }

    /// With the target's `id` of it and its `name` there: a REST item only the target
    /// has.
    fn on_target(mut self, id: String, name: Option<String>) -> Drifted {
        self.target_id = Some(id);
        self.name = name;
        self
    }

    /// How a person reads it: `kind key`, and its name when it has one; for a REST item
    /// only the target has, its target id too (`users 1000 ("user-0") at target id 7`),
    /// unless that is its key (`users (target id 7) ("stray")`: no source id maps to it).
    pub fn label(&self) -> String {
        let label = item_label(&self.kind, &self.key, self.name.as_deref());
        match &self.target_id {
            Some(id) if self.key != unmapped(id) => format!("{label} at target id {id}"),
            _ => label,
        }
    }
}

/// The key `verify` gives a REST target item that no source id maps to.
fn unmapped(target_id: &str) -> String {
    format!("(target id {target_id})")
}

/// What brings a drifted item in line with the source, as the source index, the applied
/// state, the failures and the waiting directory deletes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fix {
    /// The source changed (or deleted) it since its last scan, or the log holds its
    /// change and the target does not have it yet: `sync`.
    Sync,
    /// The log holds the source's version, the projector applied it and the target
    /// differs all the same (changed there by hand): only a replay writes it again.
    Replay,
    /// The source's content changed without its modification time moving (written in
    /// place with its time put back, or within the timestamp resolution of its
    /// filesystem): the scans' quick check does not read it again, so a sync does not
    /// bring it; touching the source file does.
    Unseen,
    /// The source no longer has it, but the last scan withheld its delete (see
    /// [`VerifyReport::deletes_withheld`]).
    Withheld,
    /// A directory the source deleted, whose delete waits for it to be empty.
    Waiting,
    /// Its last event failed, for this reason; the next run tries it again.
    Failed(String),
    /// Never listed in the source (put on the target by hand): no event deletes it.
    ByHand,
    /// Neither this process's source index nor its applied state holds it, but the log
    /// it shares with other daemons ends its item with a delete not applied yet: retained
    /// while `prune` was off (by whichever daemon held its partition), or not yet read.
    Logged,
}

/// The labels of up to five items, and how many more there are.
fn some(items: &[&Drifted]) -> String {
    const SHOWN: usize = 5;
    let mut text = items
        .iter()
        .take(SHOWN)
        .map(|d| d.label())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

impl VerifyReport {
    /// No drift.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.different.is_empty()
            && self.unreadable.is_empty()
            && self.extra.is_empty()
    }

    /// Counts items only the target has as `extra`, or with prune off as `retained`.
    fn only_in_target(&mut self, items: impl IntoIterator<Item = Drifted>) {
        if self.prune {
            self.extra.extend(items);
        } else {
            self.retained.extend(items);
        }
    }

    /// A human summary listing every drifted item, and what brings each in line.
    pub fn to_text(&self, pipeline: &str) -> String {
        let mut out = String::new();
        for (label, items) in [("missing", &self.missing), ("different", &self.different)] {
            for i in items {
                out.push_str(&format!("{label:>10} {}", i.label()));
                if !i.differs.is_empty() {
                    out.push_str(&format!(" ({})", i.differs.join(", ")));
                }
                out.push('\n');
            }
        }
        for i in &self.unreadable {
            out.push_str(&format!("{:>10} {i}\n", "unreadable"));
        }
        for (label, items) in [("extra", &self.extra), ("retained", &self.retained)] {
            for i in items {
                out.push_str(&format!("{label:>10} {}\n", i.label()));
            }
        }
        out.push_str(&format!(
            "{pipeline}: verified {} items: {} missing, {} different, {} unreadable, {} {}{}\n",
            self.compared,
            self.missing.len(),
            self.different.len(),
            self.unreadable.len(),
            if self.prune {
                self.extra.len()
            } else {
                self.retained.len()
            },
            if self.prune {
                "extra"
            } else {
                "retained (prune is off)"
            },
            if self.is_clean() {
                "; target matches source"
            } else {
                "; DRIFT"
            },
        ));
        if let Some(by) = &self.target_written_by {
            out.push_str(&format!(
                "{pipeline}: the target was last written by {by}, not by this state: what that history wrote or deleted is not known here, so an item below said to be never listed in the source may be a file it wrote that the source has deleted since, and one changed there by hand one it changed or deleted; `tidemark plan` says what to do\n"
            ));
        }
        // What to do about it, by what the state says of each item: most drift is a
        // change the next sync brings; a change made on the target by hand stays until
        // its item changes in the source; an item only the target has, never listed in
        // the source, is in no event at all.
        let drifted: Vec<&Drifted> = self
            .missing
            .iter()
            .chain(&self.different)
            .chain(&self.extra)
            .collect();
        let with = |fix: &Fix| -> Vec<&Drifted> {
            drifted
                .iter()
                .filter(|d| d.fix.as_ref() == Some(fix))
                .copied()
                .collect()
        };
        let items = with(&Fix::Sync);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: `tidemark sync` brings {} in line: the source changed them since its last scan, or the log holds changes of them the target does not have yet\n",
                some(&items)
            ));
        }
        let items = with(&Fix::Unseen);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: the source's content of {} changed without its modification time moving (written in place with its time put back, as `cp -p` or `touch -r` do, or within the timestamp resolution of the source's filesystem), so scans, which read a file again only when its size, time or inode moved, do not see it: `touch` them in the source, then `tidemark sync`\n",
                some(&items)
            ));
        }
        let items = with(&Fix::Replay);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: the log's last change of {} was applied and the target differs all the same (changed there by hand?): `tidemark replay --pipeline {pipeline} --from 0` then `tidemark project` puts them back (equal ones are adopted, not rewritten)\n",
                some(&items)
            ));
        }
        let items = with(&Fix::Withheld);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: the source no longer lists {} (removed there, or left out by its globs), but the last scan emitted no deletes ({}): they stay until a scan emits their deletes (`tidemark status` says more)\n",
                some(&items),
                self.deletes_withheld.as_deref().unwrap_or("see `tidemark status`"),
            ));
        }
        let items = with(&Fix::Waiting);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: the source deleted {}, and each such delete waits for its directory to be empty on the target, which holds entries the source does not have: once they are gone (remove them by hand if the source never had them), the next `tidemark sync` or the running daemon removes the directory (`tidemark status` lists the waiting delete)\n",
                some(&items)
            ));
        }
        let failed: Vec<(&Drifted, &str)> = drifted
            .iter()
            .filter_map(|d| match &d.fix {
                Some(Fix::Failed(why)) => Some((*d, why.as_str())),
                _ => None,
            })
            .collect();
        for (d, why) in &failed {
            out.push_str(&format!("{pipeline}: {} failed: {why}\n", d.label()));
        }
        if !failed.is_empty() {
            out.push_str(&format!(
                "{pipeline}: a replay does not mend a failed item: once what its failure says is fixed, the next `tidemark sync` tries it again (`tidemark status` lists failures)\n"
            ));
        }
        let items = with(&Fix::Logged);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: the log's last event of {} is a delete the target has not had (retained while `prune` was off, by whichever daemon held its partition, or not applied yet): with `prune = true`, the daemon that holds its partition applies it once caught up, or, with no daemon running, the next `tidemark sync`\n",
                some(&items)
            ));
        }
        let items = with(&Fix::ByHand);
        if !items.is_empty() {
            out.push_str(&format!(
                "{pipeline}: {}: never listed in the source by this pipeline, so no event deletes them and a replay does not either: remove them from the target by hand if they should go (a pipeline renamed starts without the history of its old name)\n",
                some(&items)
            ));
        }
        if !self.unreadable.is_empty() {
            out.push_str(&format!(
                "{pipeline}: what could not be read is left out of the comparison (neither missing, different nor extra): make it readable to the user tidemark runs as, then verify again\n"
            ));
        }
        out
    }
}

/// Verification could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A side could not be listed at all.
    #[error("pipeline `{pipeline}`: {source}")]
    List {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: ListError,
    },
    /// The remap table could not be read.
    #[error("pipeline `{pipeline}`: {source}")]
    State {
        /// The pipeline.
        pipeline: String,
        /// Why.
        source: StateError,
    },
    /// A kind could not be listed on one side (its API did not answer, or answered with
    /// a page that is not a list): nothing can be said about its drift.
    #[error("pipeline `{pipeline}`: cannot verify, the {side} could not be listed: {source}")]
    Incomplete {
        /// The pipeline.
        pipeline: String,
        /// `source` or `target`.
        side: &'static str,
        /// Why.
        source: ListError,
    },
    /// The source and target kinds cannot be compared.
    #[error("pipeline `{pipeline}`: {message}")]
    Unsupported {
        /// The pipeline.
        pipeline: String,
        /// Why.
        message: String,
    },
}

/// What one side could not read. Such an item may be there all the same, and as anything:
/// it is only `unreadable`, never `missing`, `different` or `extra` (calling an item the
/// source could not read `extra` invited deleting it from the target by hand).
#[derive(Debug, Default)]
struct Unread {
    /// Items listed but not read (identities).
    items: HashSet<String>,
    /// Keys that could not be listed: an entry, or a directory whose entries are then
    /// unknown (the directory itself is listed, and compared, when its own entry was read).
    keys: Vec<String>,
}

impl Unread {
    /// Whether `id` may be on this side as something other than what was `read` there.
    fn hides(&self, id: &str, read: &BTreeMap<String, String>) -> bool {
        if self.items.contains(id) {
            return true;
        }
        let key = id.split_once('\0').map_or(id, |(_, key)| key);
        self.keys.iter().any(|k| {
            k.is_empty()
                || key
                    .strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
                || (key == k
                    && !read
                        .keys()
                        .any(|r| r.split_once('\0').is_some_and(|(_, rk)| rk == k)))
        })
    }
}

/// Lists and reads every item of `source`, the `side` named in what is unreadable;
/// `fetched` is told each item's identity.
async fn collect(
    side: &str,
    source: &dyn Source,
    fetched: impl Fn(&str),
    unreadable: &mut Vec<String>,
) -> Result<(BTreeMap<String, String>, Unread), ListError> {
    let mut entries = Vec::new();
    let mut unread = Unread::default();
    let mut listing = source.list();
    while let Some(next) = listing.next().await {
        match next {
            Ok(Listing::Entry(e)) => entries.push(e),
            // Gone while listed: absent, as if never listed.
            Ok(Listing::Skipped { .. } | Listing::Vanished { .. }) => {}
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                if let ListError::Entry { key, .. } = &e {
                    unread.keys.push(key.clone());
                }
                unreadable.push(format!("{side}: {e}"));
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut items = futures::stream::iter(entries)
        .map(|e| async {
            let id = item_identity(&e.kind, &e.key);
            (id, source.fetch(e).await)
        })
        .buffer_unordered(8);
    while let Some((id, item)) = items.next().await {
        match item {
            Ok(i) => {
                fetched(&id);
                out.insert(
                    id,
                    // A file's time too: `sync` mirrors it, so a target file whose time
                    // is not its source file's is drift (`replay --from 0`, then
                    // `project`, sets it).
                    item_version(&i.checksum, i.mode, i.mtime_ns),
                );
            }
            Err(FetchError::Vanished { .. }) => {}
            Err(e) => {
                unread.items.insert(id);
                unreadable.push(format!("{side}: {e}"));
            }
        }
    }
    Ok((out, unread))
}

/// Compares a pipeline's source and target; `state` holds the remap table REST targets
/// are compared through, and what tells each drifted item's [`Fix`]: the source index,
/// the applied state, the failures, the waiting directory deletes and the last scan, which
/// says whether deletes were withheld.
pub async fn verify(
    pipeline: &PipelineConfig,
    state: &State,
    progress: &Progress,
) -> Result<VerifyReport, VerifyError> {
    let mut report = verify_items(pipeline, state, progress).await?;
    let state_err = |source| VerifyError::State {
        pipeline: pipeline.name.clone(),
        source,
    };
    let last_scan = state
        .scans()
        .and_then(|s| s.get(&pipeline.name))
        .map_err(state_err)?;
    report.deletes_withheld = last_scan.and_then(|scan| match (&scan.guard, scan.errors) {
        (Some(g), _) => Some(format!(
            "the delete guard withheld {}: max_delete = {} allows {}",
            g.would_delete, g.limit, g.allowed
        )),
        (None, 1) => Some("its listing had an error".into()),
        (None, 0) if scan.result == crate::scanner::INTERRUPTED => {
            Some("it was interrupted".into())
        }
        (None, 0) => None,
        (None, errors) => Some(format!("its listing had {errors} errors")),
    });
    if let TargetConfig::Dir(t) = &pipeline.target {
        let mark = state.writer_mark(&pipeline.name).map_err(state_err)?;
        let written = crate::writer::judge(crate::writer::read_note(&t.path), mark.as_ref());
        report.target_written_by = written.elsewhere().map(|n| n.describe());
    }
    if report.is_clean() {
        return Ok(report);
    }
    let index = IndexView::read(state, &pipeline.name).map_err(state_err)?;
    let applied = state.applied(&pipeline.name).map_err(state_err)?;
    let dir_deletes = state.dir_deletes(&pipeline.name).map_err(state_err)?;
    let failures = state.failures(&pipeline.name).map_err(state_err)?;
    let withheld = report.deletes_withheld.is_some();
    for d in report.missing.iter_mut().chain(&mut report.different) {
        let id = d.identity();
        // A failed item's cause is on the target's side (a name another item holds, a
        // rejected body): a replay fails the same way.
        if let Some(f) = failures.get(&id).map_err(state_err)? {
            d.fix = Some(Fix::Failed(f.reason));
            continue;
        }
        let now = d.version.as_deref().unwrap_or_default();
        let applied = applied.get(&id).map_err(state_err)?;
        // The scans last read it at the version the target has, its time now is that
        // version's and only its content differs: the quick check (size, time, inode)
        // does not see the change, so a sync would not bring it.
        let unseen = |a: &crate::state::Applied| {
            index.holds_at(&id, &a.version)
                && tidemark_proto::version_mtime(now).is_some()
                && tidemark_proto::version_mtime(now) == tidemark_proto::version_mtime(&a.version)
                && tidemark_proto::version_checksum(now)
                    != tidemark_proto::version_checksum(&a.version)
        };
        d.fix = Some(
            if index.holds_at(&id, now) && applied.as_ref().is_some_and(|a| a.version == now) {
                Fix::Replay
            } else if applied.as_ref().is_some_and(unseen) {
                Fix::Unseen
            } else {
                Fix::Sync
            },
        );
    }
    for d in &mut report.extra {
        let id = d.identity();
        // The next scan emits the delete of an indexed item, if the last one's reason to
        // withhold it is gone; the log holds the delete of one applied and no longer
        // indexed.
        d.fix = Some(if let Some(f) = failures.get(&id).map_err(state_err)? {
            Fix::Failed(f.reason)
        } else if dir_deletes.contains(&id).map_err(state_err)? {
            Fix::Waiting
        } else if index.holds(&id) && withheld {
            Fix::Withheld
        } else if index.holds(&id) || applied.contains(&id).map_err(state_err)? {
            Fix::Sync
        } else {
            Fix::ByHand
        });
    }
    logged_deletes(pipeline, state, &mut report.extra).await;
    Ok(report)
}

/// On a log other processes share, the local state does not know every item the source
/// listed (another daemon applied it, or this one forgot its applied state when it took
/// its partition over): an `extra` item it calls [`Fix::ByHand`] may have its delete in
/// the log, retained while `prune` was off. Reads the partitions of those items and
/// makes [`Fix::Logged`] those whose last event is a delete. A log that cannot be read
/// leaves them as they were, with a warning.
async fn logged_deletes(pipeline: &PipelineConfig, state: &State, extra: &mut [Drifted]) {
    let mut asked: BTreeMap<String, Option<bool>> = extra
        .iter()
        .filter(|d| d.fix == Some(Fix::ByHand))
        .map(|d| (d.identity(), None))
        .collect();
    if asked.is_empty() || !matches!(pipeline.log, crate::config::LogConfig::Kafka(_)) {
        return;
    }
    let read = async {
        let log = crate::log::open(pipeline, state, crate::log::Patience::OneShot)
            .map_err(|e| e.to_string())?;
        let partitions: std::collections::BTreeSet<u32> =
            asked.keys().map(|id| log.partition_of(id)).collect();
        for p in partitions {
            let head = log.head(p).await.map_err(|e| e.to_string())?;
            let mut at = 0;
            while at < head {
                let records = log.read(p, at, 1000).await.map_err(|e| e.to_string())?;
                let Some(last) = records.last() else { break };
                at = last.offset + 1;
                for event in records.into_iter().filter_map(|r| r.event.ok()) {
                    if let Some(deleted) = asked.get_mut(&event.identity()) {
                        *deleted = Some(event.op == tidemark_proto::Op::Delete);
                    }
                }
            }
        }
        Ok::<_, String>(())
    };
    if let Err(e) = read.await {
        tracing::warn!(
            pipeline = %pipeline.name,
            "cannot read the log to tell whether it holds the deletes of the items only the target has: {e}"
        );
        return;
    }
    for d in extra.iter_mut() {
        if asked.get(&d.identity()) == Some(&Some(true)) {
            d.fix = Some(Fix::Logged);
        }
    }
}

/// [`verify`]'s comparison, item by item.
async fn verify_items(
    pipeline: &PipelineConfig,
    state: &State,
    progress: &Progress,
) -> Result<VerifyReport, VerifyError> {
    let list_err = |source| VerifyError::List {
        pipeline: pipeline.name.clone(),
        source,
    };
    let (s, t) = match (&pipeline.source, &pipeline.target) {
        (SourceConfig::Dir(s), TargetConfig::Dir(t)) => (s, t),
        (SourceConfig::Http(s), TargetConfig::Http(t)) => {
            return verify_http(pipeline, s, t, state, progress).await
        }
        _ => {
            return Err(VerifyError::Unsupported {
                pipeline: pipeline.name.clone(),
                message: "verify compares a directory with a directory or an API with an API"
                    .into(),
            })
        }
    };
    let target_view = target_view(s, t);
    let mut report = VerifyReport {
        prune: t.prune,
        ..Default::default()
    };
    let (source, source_unread) = collect(
        "source",
        &DirSource::new(s, 0),
        |_| progress.inc(1),
        &mut report.unreadable,
    )
    .await
    .map_err(list_err)?;
    // Then the bar counts items compared: a source item once its target side is read.
    progress.count_to(source.len() as u64);
    // A target nothing was written to yet holds nothing: every item is missing.
    let (target, target_unread) = if std::fs::symlink_metadata(&t.path)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        (BTreeMap::new(), Unread::default())
    } else if std::fs::metadata(&t.path).is_ok_and(|m| !m.is_dir()) {
        return Err(VerifyError::Incomplete {
            pipeline: pipeline.name.clone(),
            side: "target",
            source: ListError::Root {
                message: format!(
                    "{} is not a directory; target.dir.path must name one",
                    t.path.display()
                ),
            },
        });
    } else {
        collect(
            "target",
            &DirSource::new(&target_view, 0).of_target(),
            |id| {
                if source.contains_key(id) {
                    progress.inc(1);
                }
            },
            &mut report.unreadable,
        )
        .await
        .map_err(list_err)?
    };
    let keeps = Keeps::probe(&t.path);
    for (id, version) in &source {
        report.compared += 1;
        match target.get(id) {
            None => {
                progress.inc(1);
                if !target_unread.hides(id, &target) {
                    report
                        .missing
                        .push(Drifted::new(id).in_source(version, None));
                }
            }
            Some(v) if v != version => {
                let differs = keeps.differs(version, v);
                if !differs.is_empty() {
                    let mut d = Drifted::new(id).in_source(version, None);
                    d.differs = differs;
                    report.different.push(d);
                }
            }
            Some(_) => {}
        }
    }
    let out_of_scope = written_out_of_scope(pipeline, s, &target_view, &target, state).await?;
    report.only_in_target(
        target
            .keys()
            .filter(|k| !source.contains_key(*k) && !source_unread.hides(k, &source))
            .chain(&out_of_scope)
            .map(|id| Drifted::new(id)),
    );
    Ok(report)
}

/// The source's config pointed at the target `t`: the target listed as the source is, with
/// the same globs, less the target's scratch directory.
fn target_view(s: &DirSourceConfig, t: &DirTargetConfig) -> DirSourceConfig {
    let mut view = s.clone();
    view.path = t.path.clone();
    view.exclude.push(TMP_DIR.into());
    view
}

/// A pipeline's first projection into a directory target that already holds entries (a
/// former rsync mirror, a copy made by hand): tidemark never deletes what it did not write,
/// so what the target holds and the source does not stays there, and the run says so once
/// ([`Prefilled::target_only`]) instead of leaving it to `verify` to find.
pub struct Prefilled {
    /// The target, listed as the source is ([`target_view`]).
    target: DirSourceConfig,
    pipeline: String,
    state: State,
    /// Who wrote the target last, by its writer note ([`crate::writer`]): the entries
    /// are then tidemark's, of a history this state does not have, not there before.
    written_by: Option<String>,
}

/// What [`Prefilled::target_only`] found.
pub struct TargetOnly {
    /// Entries of the target the source does not have.
    pub entries: u64,
    /// Who wrote the target last, by its writer note ([`Prefilled::written_by`]).
    pub written_by: Option<String>,
}

impl Prefilled {
    /// `Some` when `pipeline` has applied nothing yet (its first projection, or a replay
    /// from 0) and its directory target holds an entry: one read of the applied state's
    /// first record and, only when there is none, of the target root's first entries.
    pub fn check(pipeline: &PipelineConfig, state: &State) -> Option<Prefilled> {
        let (SourceConfig::Dir(s), TargetConfig::Dir(t)) = (&pipeline.source, &pipeline.target)
        else {
            return None;
        };
        if !state.applied(&pipeline.name).ok()?.is_empty() {
            return None;
        }
        let mut entries = std::fs::read_dir(&t.path).ok()?;
        entries
            .any(|e| e.is_ok_and(|e| e.file_name() != TMP_DIR))
            .then(|| Prefilled {
                target: target_view(s, t),
                pipeline: pipeline.name.clone(),
                state: state.clone(),
                written_by: crate::writer::read_note(&t.path).map(|n| {
                    let mut by = n.describe();
                    if n.state_dir != state.path() {
                        by.push_str(", not this config's state: if it is this config's state reached another way (a config reached through a symbolic link resolves a relative `state_dir` beside the link), stop and point `state_dir` at it");
                    }
                    by
                }),
            })
    }

    /// How many entries of the target the source does not have: those that neither the
    /// source index (what the last scan listed), the applied state nor `planned` (the
    /// identities a plan upserts) holds. Only listed, never read; entries that cannot be
    /// listed are not counted. `None` when the target cannot be listed, or nothing is
    /// known of the source (no scan, nothing applied or planned: every entry would count).
    pub async fn target_only(&self, planned: &HashSet<String>) -> Option<TargetOnly> {
        let state = &self.state;
        let index = IndexView::read(state, &self.pipeline).ok()?;
        let applied = state.applied(&self.pipeline).ok()?;
        let scanned = state.scans().ok()?.contains(&self.pipeline).ok()?;
        if !scanned && applied.is_empty() && planned.is_empty() {
            return None;
        }
        let target = DirSource::new(&self.target, 0).of_target();
        let mut listing = target.list();
        let mut only = 0;
        while let Some(next) = listing.next().await {
            match next {
                Ok(Listing::Entry(e)) => {
                    let id = item_identity(&e.kind, &e.key);
                    if !index.holds(&id) && !planned.contains(&id) && !applied.contains(&id).ok()? {
                        only += 1;
                    }
                }
                Err(e) if e.is_fatal() => return None,
                _ => {}
            }
        }
        Some(TargetOnly {
            entries: only,
            written_by: self.written_by.clone(),
        })
    }
}

/// What a directory target's filesystem keeps of the mode and time tidemark gives an item,
/// probed once per verify with a file made (and removed) in its `.tidemark-tmp/`: exFAT
/// shows every mode as 777 and exfat-fuse keeps times to the second, so comparing them
/// as they are made every item `different` forever, and a replay changes nothing.
struct Keeps {
    /// Whether a mode set is shown as set.
    modes: bool,
    /// The step, in nanoseconds, of the times kept (1: exact).
    step_ns: i64,
}

impl Keeps {
    fn probe(root: &std::path::Path) -> Keeps {
        let exact = Keeps {
            modes: true,
            step_ns: 1,
        };
        let tmp = root.join(TMP_DIR);
        let made = match std::fs::create_dir(&tmp) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(_) => return exact,
        };
        let probe = tmp.join(format!("verify-probe-{}", std::process::id()));
        let at: i64 = 1_000_000_000_123_456_789;
        let kept = std::fs::File::create(&probe).and_then(|f| {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(at as u64);
            f.set_modified(time)?;
            std::fs::metadata(&probe)
        });
        let _ = std::fs::remove_file(&probe);
        if made {
            let _ = std::fs::remove_dir(&tmp);
        }
        let Ok(m) = kept else {
            return exact;
        };
        use std::os::unix::fs::MetadataExt;
        let got = crate::source::fs::mtime_ns(&m).unwrap_or(at);
        let step_ns = [1, 1_000, 1_000_000, 10_000_000, 1_000_000_000]
            .into_iter()
            .find(|step| (at - got).abs() < *step)
            .unwrap_or(2_000_000_000);
        Keeps {
            modes: m.mode() & 0o7777 == 0o640,
            step_ns,
        }
    }

    /// What differs between an item's version in the source and on the target
    /// (`checksum+mode@time`), leaving out what the target cannot hold.
    fn differs(&self, source: &str, target: &str) -> Vec<&'static str> {
        fn parts(version: &str) -> (&str, Option<&str>, Option<i64>) {
            let (content, time) = match version.rsplit_once('@') {
                Some((c, t)) => (c, t.parse().ok()),
                None => (version, None),
            };
            let (checksum, mode) = match content.split_once('+') {
                Some((c, m)) => (c, Some(m)),
                None => (content, None),
            };
            (checksum, mode, time)
        }
        let (s, t) = (parts(source), parts(target));
        let mut differs = Vec::new();
        if s.0 != t.0 {
            differs.push("content");
        }
        if self.modes && s.1 != t.1 {
            differs.push("mode");
        }
        let time_differs = match (s.2, t.2) {
            (Some(a), Some(b)) => (a - b).abs() >= self.step_ns,
            (a, b) => a != b,
        };
        if time_differs {
            differs.push("time");
        }
        differs
    }
}

/// The items of a directory target that the source's `include` and `exclude` leave out of
/// the comparison and that tidemark wrote (its applied state or source index holds them):
/// globs narrowed after they were mirrored, their deletes withheld or retained since.
/// Only these count, so that files of the target's own that the globs leave out on
/// purpose (`*.log` written there by something else) are not drift.
async fn written_out_of_scope(
    pipeline: &PipelineConfig,
    s: &DirSourceConfig,
    scoped: &DirSourceConfig,
    in_scope: &BTreeMap<String, String>,
    state: &State,
) -> Result<Vec<String>, VerifyError> {
    if s.include.is_empty() && s.exclude.is_empty() {
        return Ok(Vec::new());
    }
    let mut whole = scoped.clone();
    whole.include.clear();
    whole.exclude = vec![TMP_DIR.into()];
    // Unreadable entries were reported by the scoped listing, where they count.
    let (all, _) = collect(
        "target",
        &DirSource::new(&whole, 0).of_target(),
        |_| {},
        &mut Vec::new(),
    )
    .await
    .map_err(|source| VerifyError::List {
        pipeline: pipeline.name.clone(),
        source,
    })?;
    let state_err = |source| VerifyError::State {
        pipeline: pipeline.name.clone(),
        source,
    };
    let applied = state.applied(&pipeline.name).map_err(state_err)?;
    let index = IndexView::read(state, &pipeline.name).map_err(state_err)?;
    let mut written = Vec::new();
    for id in all.keys().filter(|id| !in_scope.contains_key(*id)) {
        if index.holds(id) || applied.contains(id).map_err(state_err)? {
            written.push(id.clone());
        }
    }
    Ok(written)
}

/// The comparable form of a REST item: without ignored and server-managed fields.
fn comparable(mut item: serde_json::Value, ignore: &[String], strip: &[String]) -> String {
    tidemark_proto::strip_fields(&mut item, ignore);
    tidemark_proto::strip_fields(&mut item, strip);
    tidemark_proto::checksum_json(&item, &[])
}

async fn verify_http(
    pipeline: &PipelineConfig,
    s: &HttpSourceConfig,
    t: &HttpTargetConfig,
    state: &State,
    progress: &Progress,
) -> Result<VerifyReport, VerifyError> {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::http::{id_string, HttpClient};
    use crate::source::HttpSource;

    let list_err = |source| VerifyError::List {
        pipeline: pipeline.name.clone(),
        source,
    };
    let mut report = VerifyReport {
        prune: t.prune,
        ..Default::default()
    };
    // Source: identity → comparable checksum.
    let source = HttpSource::new(&pipeline.name, s);
    let mut src: BTreeMap<String, String> = BTreeMap::new();
    // Identity → the source's version (as its scans index it) and name.
    let mut about: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut entries = Vec::new();
    let incomplete = |side, source| VerifyError::Incomplete {
        pipeline: pipeline.name.clone(),
        side,
        source,
    };
    let mut listing = source.list();
    while let Some(next) = listing.next().await {
        match next {
            Ok(Listing::Entry(e)) => entries.push(e),
            // Gone while listed: absent, as if never listed.
            Ok(Listing::Skipped { .. } | Listing::Vanished { .. }) => {}
            Err(e) if e.is_fatal() => return Err(list_err(e)),
            Err(e @ ListError::Kind { .. }) => return Err(incomplete("source", e)),
            Err(e) => report.unreadable.push(format!("source: {e}")),
        }
    }
    let mut unread = Unread::default();
    let mut fetched = futures::stream::iter(entries)
        .map(|e| async {
            let id = item_identity(&e.kind, &e.key);
            (id, source.fetch(e).await)
        })
        .buffer_unordered(8);
    while let Some((id, item)) = fetched.next().await {
        progress.inc(1);
        match item {
            Ok(i) => {
                let Some(tidemark_proto::Body::Json(body)) = i.body else {
                    continue;
                };
                let strip = t.kind(&i.kind).map(|k| k.strip.clone()).unwrap_or_default();
                about.insert(
                    id.clone(),
                    (item_version(&i.checksum, i.mode, i.mtime_ns), i.name),
                );
                src.insert(id, comparable(body, &[], &strip));
            }
            Err(e) => {
                unread.items.insert(id);
                report.unreadable.push(format!("source: {e}"));
            }
        }
    }
    progress.count_to(src.len() as u64);
    // The remap table, both ways.
    let remap = state
        .remap(&pipeline.name)
        .map_err(|source| VerifyError::State {
            pipeline: pipeline.name.clone(),
            source,
        })?;
    let mut to_target: HashMap<String, String> = HashMap::new();
    let mut to_source: HashMap<(String, String), String> = HashMap::new();
    for r in remap.iter() {
        let (identity, tid) = r.map_err(|source| VerifyError::State {
            pipeline: pipeline.name.clone(),
            source,
        })?;
        let (kind, key) = identity.split_once('\0').unwrap_or(("", &identity));
        to_source.insert((kind.to_owned(), tid.clone()), key.to_owned());
        to_target.insert(identity.clone(), tid);
    }
    // Target: identity → comparable checksum, through the remap table.
    let client = Arc::new(HttpClient::new(&pipeline.name, "target", &t.endpoint));
    let mut dst: BTreeMap<String, String> = BTreeMap::new();
    // Identity → the target's id and name of it, to name an item only the target has.
    let mut on_target: HashMap<String, (String, Option<String>)> = HashMap::new();
    for kind in &s.kinds {
        let Some(tk) = t.kind(&kind.name) else {
            continue;
        };
        let mut items = HttpSource::list_raw(
            client.clone(),
            kind.name.clone(),
            tk.path.clone(),
            tk.pagination.clone(),
            tk.items.clone(),
            tk.id_field.clone(),
            4,
        );
        while let Some(next) = items.next().await {
            let mut item = match next {
                Ok(i) => i,
                Err(e @ ListError::Kind { .. }) => return Err(incomplete("target", e)),
                Err(e) => {
                    report.unreadable.push(format!("target: {e}"));
                    continue;
                }
            };
            let Some(tid) = item.pointer(&tk.id_field).and_then(id_string) else {
                report.unreadable.push(format!(
                    "target: a `{}` item has no id at `{}`",
                    kind.name, tk.id_field
                ));
                continue;
            };
            let name = item.pointer(&tk.name_field).and_then(id_string);
            let Some(key) = to_source.get(&(kind.name.clone(), tid.clone())) else {
                let id = item_identity(&kind.name, &unmapped(&tid));
                report.only_in_target([Drifted::new(&id).on_target(tid, name)]);
                continue;
            };
            if src.contains_key(&item_identity(&kind.name, key)) {
                progress.inc(1);
            }
            // Reference fields back to source ids.
            for r in &kind.refs {
                let back = |v: &mut serde_json::Value| {
                    if let Some(k) =
                        id_string(v).and_then(|id| to_source.get(&(r.kind.clone(), id)))
                    {
                        *v = match (&*v, k.parse::<i64>()) {
                            (serde_json::Value::Number(_), Ok(n)) => n.into(),
                            _ => k.clone().into(),
                        };
                    }
                };
                match item.pointer_mut(&r.field) {
                    Some(serde_json::Value::Array(ids)) => ids.iter_mut().for_each(back),
                    Some(v) => back(v),
                    None => {}
                }
            }
            let id = item_identity(&kind.name, key);
            dst.insert(id.clone(), comparable(item, &kind.ignore, &tk.strip));
            on_target.insert(id, (tid, name));
        }
    }
    for (id, sum) in &src {
        report.compared += 1;
        let drifted = || {
            let (version, name) = &about[id];
            Drifted::new(id).in_source(version, name.as_deref())
        };
        match dst.get(id).filter(|_| to_target.contains_key(id)) {
            None => {
                progress.inc(1);
                report.missing.push(drifted());
            }
            Some(d) if d != sum => report.different.push(drifted()),
            Some(_) => {}
        }
    }
    report.only_in_target(
        dst.keys()
            .filter(|k| !src.contains_key(*k) && !unread.hides(k, &src))
            .map(|id| match on_target.remove(id) {
                Some((tid, name)) => Drifted::new(id).on_target(tid, name),
                None => Drifted::new(id),
            }),
    );
    Ok(report)
}
