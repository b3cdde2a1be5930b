//! `tidemark verify`: lists source and target, compares them item by item by checksum
//! (and mode), and reports what is missing, extra or different.

use std::collections::BTreeMap;

use futures::StreamExt;
use serde::Serialize;
use tidemark_proto::{content_version, item_identity};

use crate::config::{PipelineConfig, SourceConfig, TargetConfig};
use crate::progress::Progress;
use crate::source::{DirSource, ListError, Listing, Source};
use crate::target::fs::TMP_DIR;

/// Drift between source and target.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Items compared.
    pub compared: u64,
    /// In the source, not in the target.
    pub missing: Vec<String>,
    /// In the target, not in the source (drift only when the target prunes).
    pub extra: Vec<String>,
    /// In both, with different content or mode.
    pub different: Vec<String>,
    /// Entries that could not be read on either side.
    pub unreadable: Vec<String>,
    /// Whether extra items count as drift.
    pub prune: bool,
}

impl VerifyReport {
    /// No drift.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.different.is_empty()
            && self.unreadable.is_empty()
            && (!self.prune || self.extra.is_empty())
    }

    /// A human summary listing every drifted item.
    pub fn to_text(&self, pipeline: &str) -> String {
        let mut out = String::new();
        for (label, items) in [
            ("missing", &self.missing),
            ("different", &self.different),
            ("unreadable", &self.unreadable),
            (if self.prune { "extra" } else { "retained" }, &self.extra),
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
            self.extra.len(),
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
}

async fn collect(
    source: &dyn Source,
    progress: &Progress,
    unreadable: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, ListError> {
    let mut entries = Vec::new();
    let mut listing = source.list();
    while let Some(next) = listing.next().await {
        match next {
            Ok(Listing::Entry(e)) => entries.push(e),
            Ok(Listing::Skipped { .. }) => {}
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    let mut out = BTreeMap::new();
    let mut fetched = futures::stream::iter(entries)
        .map(|e| source.fetch(e))
        .buffer_unordered(8);
    while let Some(item) = fetched.next().await {
        progress.inc(1);
        match item {
            Ok(i) => {
                out.insert(
                    item_identity(&i.kind, &i.key),
                    content_version(&i.checksum, i.mode),
                );
            }
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    Ok(out)
}

/// Compares a pipeline's source and target.
pub async fn verify(
    pipeline: &PipelineConfig,
    progress: &Progress,
) -> Result<VerifyReport, VerifyError> {
    let list_err = |source| VerifyError::List {
        pipeline: pipeline.name.clone(),
        source,
    };
    let (SourceConfig::Dir(s), TargetConfig::Dir(t)) = (&pipeline.source, &pipeline.target);
    let mut target_view = s.clone();
    target_view.path = t.path.clone();
    target_view.exclude.push(TMP_DIR.into());
    let mut report = VerifyReport {
        prune: t.prune,
        ..Default::default()
    };
    let source = collect(&DirSource::new(s, 0), progress, &mut report.unreadable)
        .await
        .map_err(list_err)?;
    let target = collect(
        &DirSource::new(&target_view, 0),
        progress,
        &mut report.unreadable,
    )
    .await
    .map_err(list_err)?;
    for (id, version) in &source {
        report.compared += 1;
        match target.get(id) {
            None => report.missing.push(id.clone()),
            Some(v) if v != version => report.different.push(id.clone()),
            Some(_) => {}
        }
    }
    report.extra = target
        .keys()
        .filter(|k| !source.contains_key(*k))
        .cloned()
        .collect();
    Ok(report)
}
