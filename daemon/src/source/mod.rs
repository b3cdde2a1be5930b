//! The source boundary: the [`Source`] trait (a streaming listing plus the content of one
//! listed entry) and the types it produces.

pub mod fs;
pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tidemark_proto::{Blob, Body, Ref};

use crate::config::{PipelineConfig, SourceConfig};

pub use self::fs::DirSource;
pub use self::http::HttpSource;

/// One listed entry, before its content is read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Resource kind (`file`, `dir`, `symlink`, or an API kind).
    pub kind: String,
    /// Stable key in the source.
    pub key: String,
    /// Cheap change token (size, mtime, inode, mode); when it equals the index's, the
    /// entry is unchanged and is not read. `None` for sources without one.
    pub fingerprint: Option<String>,
    /// Content the listing already fetched (API sources); directory sources leave it empty.
    pub payload: Option<serde_json::Value>,
}

/// One entry with its content: what an upsert event carries.
#[derive(Debug, Clone)]
pub struct Item {
    /// Resource kind.
    pub kind: String,
    /// Stable key in the source.
    pub key: String,
    /// `blake3:<hex>` of the canonical content.
    pub checksum: String,
    /// Permission bits, for files and directories.
    pub mode: Option<u32>,
    /// Natural key for adoption.
    pub name: Option<String>,
    /// References to other items.
    pub refs: Vec<Ref>,
    /// Inline content.
    pub body: Option<Body>,
    /// Out-of-line content.
    pub blob: Option<Blob>,
    /// A file's modification time, in nanoseconds since the Unix epoch.
    pub mtime_ns: Option<i64>,
    /// What the source found wrong with the item that does not keep it out of the scan
    /// (a REST item without a name). The scanner warns of it once per item per process,
    /// as of a skipped special file, not at every scan of a daemon.
    pub warning: Option<String>,
    /// Whether the item has each reference field its kind configures (REST sources, but
    /// for the `optional` ones): a field that no item of its kind has is most likely a
    /// mistyped pointer, which the scanner reports (see [`RefField`]).
    pub ref_fields: Vec<RefField>,
}

/// A configured reference field as one item holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefField {
    /// Its JSON pointer, as configured.
    pub field: String,
    /// Whether the item has it (with any value, null included).
    pub present: bool,
    /// When it does not: the pointer of a field the item has whose name differs only in
    /// case or by a letter or two (`/userId` for `/userid`), for the scanner's advice.
    pub near: Option<String>,
}

/// What a listing yields besides errors.
#[derive(Debug)]
pub enum Listing {
    /// An entry to diff against the index.
    Entry(Entry),
    /// An entry left out on purpose (a special file); reported, not an error.
    Skipped {
        /// Its key.
        key: String,
        /// Why it was left out.
        reason: String,
    },
    /// An entry that was gone by the time the walk looked at it: nothing is at its path
    /// any more (removed or renamed after its directory was read, as temporary files
    /// are). Not an error: it is absent, like an entry that was never listed, so an
    /// indexed one is deleted (see [`Source::absent`]).
    Vanished {
        /// Its kind, when the listing knows it (a directory that could not be opened).
        kind: Option<String>,
        /// Its key.
        key: String,
    },
}

/// What [`Source::mounted`] found at the source's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// The root of a mounted filesystem.
    Root,
    /// A directory of its parent's filesystem (this one), holding nothing.
    Empty(std::path::PathBuf),
    /// A directory of its parent's filesystem, holding entries.
    Plain,
}

/// A listing error. [`ListError::Root`] ends the scan; the others cost one entry or one
/// page, and any of them keeps the scan from emitting deletes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListError {
    /// The source itself cannot be listed (missing or unreadable root).
    #[error("{message}")]
    Root {
        /// What is wrong and what to do.
        message: String,
    },
    /// One kind of item could not be listed, or not to its end: its API did not answer
    /// within the retry budget, or answered with a page that is not a valid list.
    #[error("cannot list kind `{kind}`: {message}")]
    Kind {
        /// The kind.
        kind: String,
        /// Why.
        message: String,
    },
    /// One entry could not be listed.
    #[error("cannot list `{key}`: {message}")]
    Entry {
        /// Key of the entry (or of the directory that could not be read).
        key: String,
        /// Why.
        message: String,
    },
}

impl ListError {
    /// Whether the whole listing failed (as opposed to one entry).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ListError::Root { .. })
    }
}

/// The content of a listed entry could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Reading the entry failed.
    #[error("cannot read `{key}`: {message}")]
    Entry {
        /// Key of the entry.
        key: String,
        /// Why.
        message: String,
    },
    /// The entry was gone when its content was read: nothing is at its path any more.
    /// Not an error, as for [`Listing::Vanished`].
    #[error("`{key}` vanished before it could be read")]
    Vanished {
        /// Its kind.
        kind: String,
        /// Its key.
        key: String,
    },
}

/// A streaming listing.
pub type ListStream = BoxStream<'static, Result<Listing, ListError>>;

/// Something that can be listed and read.
#[async_trait]
pub trait Source: Send + Sync {
    /// Streams the listing; never holds the whole listing in memory.
    fn list(&self) -> ListStream;

    /// Reads one entry's content and computes its checksum.
    async fn fetch(&self, entry: Entry) -> Result<Item, FetchError>;

    /// Whether the source's root is the root of a mounted filesystem (a directory on
    /// another device than its parent), and if not, whether it is empty; `None` when that
    /// does not apply or cannot be told. The scanner notes it, so that a filesystem
    /// unmounted while tidemark was stopped, which leaves its empty mountpoint in its
    /// place, is not listed as a source whose every item was deleted.
    fn mounted(&self) -> Option<Mount> {
        None
    }

    /// Which of `entries` (kind, key) are absent from the source now. A scan asks before
    /// it deletes what vanished while it ran (and what was under it), so an entry removed
    /// and made again during the scan is not deleted; and, for a source that
    /// [`confirms_deletes`](Source::confirms_deletes), before it deletes anything. An
    /// error (the source itself moved during the scan, an API that does not answer)
    /// counts as a listing error: the scan emits no deletes. Sources that never report a
    /// vanished entry, nor confirm deletes, confirm nothing absent.
    async fn absent(
        &self,
        entries: Vec<(String, String)>,
    ) -> Result<std::collections::HashSet<(String, String)>, String> {
        let _ = entries;
        Ok(Default::default())
    }

    /// Whether a scan asks [`Source::absent`] about every entry it would delete, not only
    /// about what vanished: a source whose listing can miss a live entry without knowing
    /// it (an API whose pages shift when an item before them is deleted mid-listing).
    fn confirms_deletes(&self) -> bool {
        false
    }

    /// Whether a scan asks [`Source::absent`] about every entry it did not list, quietly
    /// (a source where that is cheap, and whose listing misses an entry that is renamed
    /// away and back while its directory is read).
    fn rechecks_unlisted(&self) -> bool {
        false
    }
}

/// Builds the source a pipeline is configured with. A directory source is told the
/// pipeline's target directory (if it has one), so that a followed link cannot lead it
/// into its own target.
pub fn build(pipeline: &PipelineConfig) -> Arc<dyn Source> {
    match &pipeline.source {
        SourceConfig::Dir(cfg) => {
            Arc::new(DirSource::new(cfg, pipeline.inline_limit).with_target(pipeline.target_dir()))
        }
        SourceConfig::Http(cfg) => Arc::new(HttpSource::new(&pipeline.name, cfg)),
    }
}
