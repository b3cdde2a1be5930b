//! `tidemark verify`: lists source and target, compares them item by item by checksum
//! (and mode, and a file's modification time), and reports what is missing, extra or
//! different. For REST targets, target items are mapped back to source ids through the
//! remap table and compared as canonical JSON without ignored and server-managed fields.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use serde::Serialize;
use tidemark_proto::{item_identity, item_version};

use crate::config::{
    HttpSourceConfig, HttpTargetConfig, PipelineConfig, SourceConfig, TargetConfig,
};
use crate::progress::Progress;
use crate::source::{DirSource, ListError, Listing, Source};
use crate::state::{State, StateError};
use crate::target::fs::TMP_DIR;

/// Drift between source and target. Items are identities (`kind\0key`); JSON shows each
/// as `{"kind": …, "key": …}`.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Items compared.
    pub compared: u64,
    /// In the source, not in the target.
    #[serde(serialize_with = "items")]
    pub missing: Vec<String>,
    /// In the target, not in the source, with prune on: drift.
    #[serde(serialize_with = "items")]
    pub extra: Vec<String>,
    /// In the target, not in the source, with prune off: kept on purpose, no drift.
    #[serde(serialize_with = "items")]
    pub retained: Vec<String>,
    /// In both, with different content, mode or (files) modification time.
    #[serde(serialize_with = "items")]
    pub different: Vec<String>,
    /// Entries that could not be read, each after its side (`source: …`, `target: …`).
    pub unreadable: Vec<String>,
    /// Whether the target prunes: items only it has are `extra`, else `retained`.
    pub prune: bool,
    /// Why the pipeline's last scan emitted no deletes (its delete guard tripped, or its
    /// listing had errors), if it did not: items the source no longer has then stay on
    /// the target until a later scan emits their deletes, and show as `extra` meanwhile.
    #[serde(skip)]
    pub deletes_withheld: Option<String>,
}

/// Serializes identities as `{"kind", "key"}` objects.
fn items<S: serde::Serializer>(ids: &[String], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Item<'a> {
        kind: &'a str,
        key: &'a str,
    }
    s.collect_seq(ids.iter().map(|id| {
        let (kind, key) = id.split_once('\0').unwrap_or(("", id));
        Item { kind, key }
    }))
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
    fn only_in_target(&mut self, ids: impl IntoIterator<Item = String>) {
        if self.prune {
            self.extra.extend(ids);
        } else {
            self.retained.extend(ids);
        }
    }

    /// A human summary listing every drifted item.
    pub fn to_text(&self, pipeline: &str) -> String {
        let mut out = String::new();
        for (label, items) in [
            ("missing", &self.missing),
            ("different", &self.different),
            ("unreadable", &self.unreadable),
            ("extra", &self.extra),
            ("retained", &self.retained),
        ] {
            for i in items {
                out.push_str(&format!("{label:>10} {}\n", i.replace('\0', " ")));
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
        // What to do about it: a change made on the target by hand stays until its item
        // changes in the source, and an item only the target has is in no event at all.
        if !self.missing.is_empty() || !self.different.is_empty() {
            out.push_str(&format!(
                "{pipeline}: `tidemark replay --pipeline {pipeline} --from 0` then `tidemark project` puts the missing and different items back (equal ones are adopted, not rewritten)\n"
            ));
        }
        if !self.unreadable.is_empty() {
            out.push_str(&format!(
                "{pipeline}: what could not be read is left out of the comparison (neither missing, different nor extra): make it readable to the user tidemark runs as, then verify again\n"
            ));
        }
        match (&self.deletes_withheld, self.extra.is_empty()) {
            (_, true) => {}
            (None, false) => out.push_str(&format!(
                "{pipeline}: the extra items were never listed in the source, so no event deletes them and a replay does not either: remove them from the target by hand if they should go\n"
            )),
            // Not every extra item is one put there by hand: the source may have had it
            // and the scan that found it gone have withheld its delete.
            (Some(why), false) => out.push_str(&format!(
                "{pipeline}: the last scan emitted no deletes ({why}), so extra items the source had until then stay until a scan emits their deletes (`tidemark status` says more); the others were never listed in the source, so no event deletes them and a replay does not either: remove them from the target by hand if they should go\n"
            )),
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
            Ok(Listing::Skipped { .. }) => {}
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
            Err(e) => {
                unread.items.insert(id);
                unreadable.push(format!("{side}: {e}"));
            }
        }
    }
    Ok((out, unread))
}

/// Compares a pipeline's source and target; `state` holds the remap table REST targets
/// are compared through, and the last scan, which says whether deletes were withheld.
pub async fn verify(
    pipeline: &PipelineConfig,
    state: &State,
    progress: &Progress,
) -> Result<VerifyReport, VerifyError> {
    let mut report = verify_items(pipeline, state, progress).await?;
    let last_scan = state
        .scans()
        .and_then(|s| s.get(&pipeline.name))
        .map_err(|source| VerifyError::State {
            pipeline: pipeline.name.clone(),
            source,
        })?;
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
    Ok(report)
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
    let mut target_view = s.clone();
    target_view.path = t.path.clone();
    target_view.exclude.push(TMP_DIR.into());
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
            &DirSource::new(&target_view, 0),
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
    for (id, version) in &source {
        report.compared += 1;
        match target.get(id) {
            None => {
                progress.inc(1);
                if !target_unread.hides(id, &target) {
                    report.missing.push(id.clone());
                }
            }
            Some(v) if v != version => report.different.push(id.clone()),
            Some(_) => {}
        }
    }
    report.only_in_target(
        target
            .keys()
            .filter(|k| !source.contains_key(*k) && !source_unread.hides(k, &source))
            .cloned(),
    );
    Ok(report)
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
            Ok(Listing::Skipped { .. }) => {}
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
                src.insert(
                    item_identity(&i.kind, &i.key),
                    comparable(body, &[], &strip),
                );
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
            let Some(key) = to_source.get(&(kind.name.clone(), tid.clone())) else {
                report.only_in_target([format!("{}\0(target id {tid})", kind.name)]);
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
            dst.insert(
                item_identity(&kind.name, key),
                comparable(item, &kind.ignore, &tk.strip),
            );
        }
    }
    for (id, sum) in &src {
        report.compared += 1;
        if !to_target.contains_key(id) {
            progress.inc(1);
            report.missing.push(id.clone());
            continue;
        }
        match dst.get(id) {
            None => {
                progress.inc(1);
                report.missing.push(id.clone());
            }
            Some(d) if d != sum => report.different.push(id.clone()),
            Some(_) => {}
        }
    }
    report.only_in_target(
        dst.keys()
            .filter(|k| !src.contains_key(*k) && !unread.hides(k, &src))
            .cloned(),
    );
    Ok(report)
}
