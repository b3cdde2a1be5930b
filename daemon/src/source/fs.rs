//! The directory source: a streaming walk of a tree with include/exclude globs, a quick
//! check (size, mtime, inode, mode) so unchanged files are not re-hashed, and streaming
//! blake3 of changed files.
//!
//! Keys are paths relative to the root, `/`-separated, encoded with
//! [`tidemark_proto::pathkey`] so non-UTF-8 names survive. Directories are items of kind
//! `dir` (so empty directories, their modes and their modification times are mirrored),
//! symbolic links are items of kind `symlink` carrying their target path unless
//! `follow_symlinks` is on, and special files (FIFOs, sockets, devices) are skipped with a
//! warning.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use tidemark_proto::{checksum_bytes, pathkey, Blob, Body, ChecksumWriter};
use tokio::sync::mpsc;

use super::{Entry, FetchError, Item, ListError, ListStream, Listing, Mount, Source};
use crate::blocking::Runner;
use crate::config::DirSourceConfig;

/// Size of the buffer files are read through; large files are streamed, never loaded.
const READ_BUF: usize = 256 * 1024;

/// A directory tree as a [`Source`].
pub struct DirSource {
    inner: Arc<Walker>,
    inline_limit: u64,
    /// Reads of changed files, in runs ([`Runner`]).
    readers: Runner,
}

struct Walker {
    root: PathBuf,
    globs: Globs,
    follow_symlinks: bool,
    /// The pipeline's target directory, for a directory target. A followed link that leads
    /// into it would mirror the target into itself, one level deeper at every sync.
    target: Option<PathBuf>,
    /// (device, inode) of the root when the last walk started: a root moved or unmounted
    /// mid-walk makes whole directories vanish, which must not become deletes.
    root_id: std::sync::Mutex<Option<(u64, u64)>>,
    /// What the walked tree is to the user: `"source"`, or `"target"` when `verify`
    /// lists a target with the source's rules. Errors about the root name it so.
    side: &'static str,
}

fn globset(globs: &[String]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).expect("globs are checked when the config is loaded"));
    }
    b.build().expect("a set of valid globs builds")
}

/// A directory source's `include` and `exclude` globs, applied as its walk applies them,
/// for a question about one item (not used by the walk itself).
pub struct Globs {
    /// `None` means everything is included.
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Globs {
    /// The globs of `cfg`.
    pub fn new(cfg: &DirSourceConfig) -> Globs {
        Globs {
            include: (!cfg.include.is_empty()).then(|| globset(&cfg.include)),
            exclude: globset(&cfg.exclude),
        }
    }

    /// Whether a walk lists an item of `kind` at `rel`: neither it nor a directory on its
    /// way is excluded, and with `include` globs it is no directory (those are not items
    /// then) and they match it.
    pub fn lists(&self, rel: &Path, kind: &str) -> bool {
        let mut way = PathBuf::new();
        for part in rel.components() {
            way.push(part);
            if !self.exclude.is_empty() && self.exclude.is_match(&way) {
                return false;
            }
        }
        self.include
            .as_ref()
            .is_none_or(|g| kind != "dir" && g.is_match(rel))
    }
}

/// Whether `name` in the directory `root` is a tidemark target's scratch directory: named
/// `.tidemark-tmp` and holding a writer note (a directory of that name without one is
/// listed, and a target then refuses it by name).
fn is_tidemark_scratch(root: &Path, name: &OsStr) -> bool {
    name == crate::target::fs::TMP_DIR
        && root
            .join(name)
            .join(crate::writer::NOTE_FILE)
            .symlink_metadata()
            .is_ok_and(|m| m.is_file())
}

/// The key of `path` below `root`.
pub fn key_of(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    pathkey::encode(rel.as_os_str().as_bytes())
}

/// The path of `key` below `root`; `None` when the key is not a valid encoding.
pub fn path_of(root: &Path, key: &str) -> Option<PathBuf> {
    Some(root.join(OsStr::from_bytes(&pathkey::decode(key)?)))
}

/// The metadata of a source root that is a directory, or why it cannot be walked.
pub fn root_dir(root: &Path) -> Result<std::fs::Metadata, String> {
    side_root_dir(root, "source")
}

/// [`root_dir`] of the `side` (`"source"` or `"target"`) the walked tree is.
fn side_root_dir(root: &Path, side: &str) -> Result<std::fs::Metadata, String> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(m),
        Ok(_) => Err(format!("{side} {} is not a directory", root.display())),
        Err(e) => Err(format!(
            "{side} directory {} cannot be read: {e}; check {side}.dir.path in the config and that the directory is mounted",
            root.display()
        )),
    }
}

impl DirSource {
    /// A source over `cfg.path`; files up to `inline_limit` bytes are carried inline.
    pub fn new(cfg: &DirSourceConfig, inline_limit: u64) -> DirSource {
        DirSource {
            inner: Arc::new(Walker {
                root: cfg.path.clone(),
                globs: Globs::new(cfg),
                follow_symlinks: cfg.follow_symlinks,
                target: None,
                root_id: Default::default(),
                side: "source",
            }),
            inline_limit,
            readers: Runner::for_files(),
        }
    }

    /// The same walk over a target directory (for `verify`): errors about its root call
    /// it the target.
    pub fn of_target(mut self) -> DirSource {
        Arc::get_mut(&mut self.inner)
            .expect("set before the source is shared")
            .side = "target";
        self
    }

    /// The same source, told its pipeline's target directory (`None` for other targets):
    /// with `follow_symlinks`, a link that leads there is a listing error, not followed.
    pub fn with_target(mut self, target: Option<&Path>) -> DirSource {
        Arc::get_mut(&mut self.inner)
            .expect("set before the source is shared")
            .target = target.map(Path::to_owned);
        self
    }

    /// Root of the tree.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

/// Directories read at once by the walk. Listing a cold tree waits on the disk for every
/// directory block and inode; several reads in flight keep the device's queue busy (on
/// the benchmark machine a cold no-change scan of 100k files went from 3.6 s to about
/// 1.5 s), and a warm walk loses nothing by it. More threads than that cost CPU the rest
/// of the scan needs: on the 2-core benchmark machine 4 beat 8 in every paired re-sync
/// with changes (BENCHMARKS.md), and no-change re-syncs came out even. Machines with more
/// cores were not measured.
const WALK_THREADS: usize = 4;
/// Listings sent to the scanner in one message, to keep channel wake-ups per entry low.
const LIST_CHUNK: usize = 256;

type ListSender = mpsc::Sender<Vec<Result<Listing, ListError>>>;

/// A directory waiting to be read.
struct DirWork {
    path: PathBuf,
    /// (device, inode) of the directories above it, when links are followed, to refuse
    /// a link back to one of them (a loop).
    ancestors: Option<Arc<Vec<(u64, u64, PathBuf)>>>,
}

/// The directories still to read, shared by the walking threads.
struct WorkQueue {
    dirs: Vec<DirWork>,
    /// Threads reading a directory now; they may add more.
    busy: usize,
    /// The scanner stopped listening.
    stop: bool,
}

/// What one walking thread gathers before sending.
struct Batch<'a> {
    tx: &'a ListSender,
    items: Vec<Result<Listing, ListError>>,
}

impl Batch<'_> {
    /// Queues one listing; `false` once the scanner stopped listening.
    fn push(&mut self, item: Result<Listing, ListError>) -> bool {
        self.items.push(item);
        self.items.len() < LIST_CHUNK || self.send()
    }

    fn send(&mut self) -> bool {
        self.items.is_empty()
            || self
                .tx
                .blocking_send(std::mem::take(&mut self.items))
                .is_ok()
    }
}

impl Walker {
    /// Walks the tree with [`WALK_THREADS`] threads, streaming listings to `tx`. The order
    /// of entries is not defined; only the directory list waiting to be read is held.
    fn walk(&self, tx: &ListSender) {
        let send = |item| tx.blocking_send(vec![item]).is_ok();
        let root_meta = match side_root_dir(&self.root, self.side) {
            Ok(m) => m,
            Err(message) => {
                send(Err(ListError::Root { message }));
                return;
            }
        };
        *self.root_id.lock().expect("root id lock") = Some((root_meta.dev(), root_meta.ino()));
        let queue = std::sync::Mutex::new(WorkQueue {
            dirs: vec![DirWork {
                path: self.root.clone(),
                ancestors: self
                    .follow_symlinks
                    .then(|| Arc::new(vec![(root_meta.dev(), root_meta.ino(), self.root.clone())])),
            }],
            busy: 0,
            stop: false,
        });
        let ready = std::sync::Condvar::new();
        // Resolved at every walk: the target may have been created, or moved, since.
        let target = self
            .target
            .as_deref()
            .filter(|_| self.follow_symlinks)
            .map(crate::config::resolved);
        std::thread::scope(|s| {
            for _ in 0..WALK_THREADS {
                s.spawn(|| self.walk_thread(&queue, &ready, tx, target.as_deref()));
            }
        });
    }

    fn walk_thread(
        &self,
        queue: &std::sync::Mutex<WorkQueue>,
        ready: &std::sync::Condvar,
        tx: &ListSender,
        target: Option<&Path>,
    ) {
        let mut batch = Batch {
            tx,
            items: Vec::with_capacity(LIST_CHUNK),
        };
        loop {
            let work = {
                let mut q = queue.lock().expect("walk queue lock");
                loop {
                    if q.stop {
                        return;
                    }
                    if let Some(w) = q.dirs.pop() {
                        q.busy += 1;
                        break w;
                    }
                    if q.busy == 0 {
                        drop(q);
                        ready.notify_all();
                        batch.send();
                        return;
                    }
                    // Send what is gathered before waiting, so the scanner is never starved.
                    if !batch.items.is_empty() {
                        drop(q);
                        if !batch.send() {
                            queue.lock().expect("walk queue lock").stop = true;
                            ready.notify_all();
                            return;
                        }
                        q = queue.lock().expect("walk queue lock");
                        continue;
                    }
                    q = ready.wait(q).expect("walk queue lock");
                }
            };
            let mut found = Vec::new();
            let listening = self.read_dir(&work, &mut batch, &mut found, target);
            let mut q = queue.lock().expect("walk queue lock");
            q.busy -= 1;
            q.stop |= !listening;
            let woken = found.len();
            q.dirs.extend(found);
            let done = q.busy == 0 && q.dirs.is_empty();
            drop(q);
            if done || !listening {
                ready.notify_all();
            } else {
                for _ in 0..woken {
                    ready.notify_one();
                }
            }
        }
    }

    /// Lists one directory into `batch` and its subdirectories into `found`; `false` once
    /// the scanner stopped listening. `target` is the resolved target directory when links
    /// are followed and the target is a directory.
    fn read_dir(
        &self,
        work: &DirWork,
        batch: &mut Batch,
        found: &mut Vec<DirWork>,
        target: Option<&Path>,
    ) -> bool {
        let at_root = work.path == self.root;
        let entries = match std::fs::read_dir(&work.path) {
            Ok(entries) => entries,
            // Removed or renamed since its parent was read. The root is never taken for
            // gone here: a scan that lost its whole source must not delete everything.
            Err(e) if work.path != self.root && vanished(&work.path, &e) => {
                return batch.push(Ok(Listing::Vanished {
                    kind: Some("dir".into()),
                    key: key_of(&self.root, &work.path),
                }))
            }
            // The root itself (its permissions taken away): the scan fails as for a root
            // that is gone, naming it, instead of an entry error with an empty name.
            Err(e) if work.path == self.root => {
                return batch.push(Err(ListError::Root {
                    message: format!(
                        "{} directory {} cannot be listed: {e}; check its permissions for the user tidemark runs as",
                        self.side,
                        self.root.display()
                    ),
                }))
            }
            Err(e) => {
                return batch.push(Err(ListError::Entry {
                    key: key_of(&self.root, &work.path),
                    message: e.to_string(),
                }))
            }
        };
        // Paths relative to the root are built from the directory's once, not stripped
        // from every entry's absolute path.
        let rel_dir = work
            .path
            .strip_prefix(&self.root)
            .unwrap_or(Path::new(""))
            .to_owned();
        for next in entries {
            let entry = match next {
                Ok(entry) => entry,
                Err(e) => {
                    if !batch.push(Err(ListError::Entry {
                        key: key_of(&self.root, &work.path),
                        message: e.to_string(),
                    })) {
                        return false;
                    }
                    continue;
                }
            };
            let rel = rel_dir.join(entry.file_name());
            if !self.globs.exclude.is_empty() && self.globs.exclude.is_match(&rel) {
                continue;
            }
            // A source that is itself a tidemark target (a chain: dev to staging, staging
            // to prod) keeps tidemark's scratch directory and writer note at its top; they
            // are that pipeline's, and no target can hold them.
            if at_root && is_tidemark_scratch(&work.path, &entry.file_name()) {
                continue;
            }
            let key = pathkey::encode(rel.as_os_str().as_bytes());
            let meta = if self.follow_symlinks {
                std::fs::metadata(entry.path())
            } else {
                // fstatat on the open directory: no path walk from the root per entry.
                entry.metadata()
            };
            let meta = match meta {
                Ok(m) => m,
                Err(e) if vanished(&entry.path(), &e) => {
                    if !batch.push(Ok(Listing::Vanished { kind: None, key })) {
                        return false;
                    }
                    continue;
                }
                Err(e) => {
                    if !batch.push(Err(ListError::Entry {
                        key,
                        message: e.to_string(),
                    })) {
                        return false;
                    }
                    continue;
                }
            };
            let ft = meta.file_type();
            if let Some(message) = target.and_then(|t| reaches_target(&entry, &meta, t)) {
                if !batch.push(Err(ListError::Entry { key, message })) {
                    return false;
                }
                continue;
            }
            if ft.is_dir() {
                let path = entry.path();
                let ancestors = match &work.ancestors {
                    None => None,
                    Some(up) => {
                        if let Some((_, _, a)) = up
                            .iter()
                            .find(|(dev, ino, _)| *dev == meta.dev() && *ino == meta.ino())
                        {
                            if !batch.push(Err(ListError::Entry {
                                key,
                                message: format!("symbolic link loop back to {}", a.display()),
                            })) {
                                return false;
                            }
                            continue;
                        }
                        let mut chain = Vec::with_capacity(up.len() + 1);
                        chain.extend(up.iter().cloned());
                        chain.push((meta.dev(), meta.ino(), path.clone()));
                        Some(Arc::new(chain))
                    }
                };
                found.push(DirWork { path, ancestors });
            }
            let included = self.globs.include.as_ref().is_none_or(|g| g.is_match(&rel));
            let listing = if ft.is_dir() {
                if self.globs.include.is_some() {
                    continue;
                }
                Listing::Entry(Entry {
                    kind: "dir".into(),
                    key,
                    // Its time moves when an entry is added, removed or renamed in it.
                    fingerprint: Some(format!(
                        "d:{:o}:{}.{}",
                        meta.mode() & 0o7777,
                        meta.mtime(),
                        meta.mtime_nsec()
                    )),
                    payload: None,
                })
            } else if !included {
                continue;
            } else if ft.is_file() {
                Listing::Entry(Entry {
                    kind: "file".into(),
                    key,
                    fingerprint: Some(format!(
                        "f:{}:{}.{}:{}:{:o}",
                        meta.len(),
                        meta.mtime(),
                        meta.mtime_nsec(),
                        meta.ino(),
                        meta.mode() & 0o7777
                    )),
                    payload: None,
                })
            } else if ft.is_symlink() {
                Listing::Entry(Entry {
                    kind: "symlink".into(),
                    key,
                    fingerprint: Some(format!(
                        "l:{}.{}:{}",
                        meta.mtime(),
                        meta.mtime_nsec(),
                        meta.ino()
                    )),
                    payload: None,
                })
            } else {
                Listing::Skipped {
                    key,
                    reason: "special file (FIFO, socket or device) is not mirrored".into(),
                }
            };
            if !batch.push(Ok(listing)) {
                return false;
            }
        }
        true
    }
}

/// Why a followed symbolic link may not be listed: it leads to the target directory or
/// into it, or to a directory that holds the target. `None` for anything else (an entry
/// that is not a link, a link elsewhere). Links are compared by their resolved path, so
/// only the links of a walk pay for it.
fn reaches_target(
    entry: &std::fs::DirEntry,
    meta: &std::fs::Metadata,
    target: &Path,
) -> Option<String> {
    if !entry.file_type().is_ok_and(|t| t.is_symlink()) {
        return None;
    }
    let to = std::fs::canonicalize(entry.path()).ok()?;
    let how = if to.starts_with(target) {
        "leads to the target"
    } else if meta.is_dir() && target.starts_with(&to) {
        "leads to a directory holding the target"
    } else {
        return None;
    };
    Some(format!(
        "symbolic link to {} {how} {}; not followed, as it would mirror the target into itself (a source must not reach its own target)",
        to.display(),
        target.display()
    ))
}

#[async_trait]
impl Source for DirSource {
    fn list(&self) -> ListStream {
        // At most this many chunks of LIST_CHUNK listings (64k entries, about 8 MB) wait
        // for the scanner, so the walk keeps going while `scan` and `sync` open the state
        // database and read the index, which on a cold cache take 0.1–0.4 s for a tree
        // of 100k files. With 16k entries the walk stopped to wait: a cold re-sync of 1000
        // changed files among 100k took 1.28 s instead of 1.21 s (5 pairs), for 8 MB more
        // at the peak of an initial sync (163 MB instead of 155 MB).
        let (tx, rx) = mpsc::channel(256);
        let walker = self.inner.clone();
        tokio::task::spawn_blocking(move || walker.walk(&tx));
        Box::pin(tokio_stream_from(rx).flat_map(futures::stream::iter))
    }

    fn mounted(&self) -> Option<Mount> {
        let root = &self.inner.root;
        if crate::config::mount_root(root)? {
            return Some(Mount::Root);
        }
        let mut entries = std::fs::read_dir(root).ok()?;
        Some(match entries.next() {
            None => Mount::Empty(root.clone()),
            Some(_) => Mount::Plain,
        })
    }

    async fn fetch(&self, entry: Entry) -> Result<Item, FetchError> {
        let walker = self.inner.clone();
        let inline_limit = self.inline_limit;
        let key = entry.key.clone();
        self.readers
            .run(move || read_item(&walker.root, entry, inline_limit))
            .await
            .unwrap_or_else(|e| {
                Err(FetchError::Entry {
                    key,
                    message: format!("reader task failed: {e}"),
                })
            })
    }

    /// Asked about every entry a scan did not list, one `lstat` each: a file saved by
    /// renaming it away and writing it anew (vim's backup, emacs) is missing from its
    /// directory's listing for a moment, and was deleted from the target until the next
    /// scan put it back.
    fn rechecks_unlisted(&self) -> bool {
        true
    }

    async fn absent(
        &self,
        entries: Vec<(String, String)>,
    ) -> Result<std::collections::HashSet<(String, String)>, String> {
        let walker = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let root = &walker.root;
            let walked = *walker.root_id.lock().expect("root id lock");
            let now = std::fs::metadata(root).ok().map(|m| (m.dev(), m.ino()));
            if walked.is_none() || now != walked {
                return Err(format!(
                    "the source directory {} was moved, removed or unmounted during the scan, so what vanished from it is not deleted",
                    root.display()
                ));
            }
            // Absent: not found, another kind of item there now, or left out by the globs
            // (narrowed since it was listed). Any other answer (a permission error) keeps
            // the entry's delete back.
            Ok(entries
                .into_iter()
                .filter(|(kind, key)| {
                    let Some(path) = path_of(root, key) else {
                        return false;
                    };
                    let rel = path.strip_prefix(root).unwrap_or(&path);
                    if !walker.globs.lists(rel, kind) {
                        return true;
                    }
                    let meta = std::fs::symlink_metadata(&path);
                    let meta = match meta {
                        Ok(m) if walker.follow_symlinks && m.file_type().is_symlink() => {
                            std::fs::metadata(&path).or(Ok(m))
                        }
                        m => m,
                    };
                    match meta {
                        Ok(m) => !match kind.as_str() {
                            "dir" => m.is_dir(),
                            "symlink" => m.file_type().is_symlink(),
                            _ => m.is_file(),
                        },
                        // A directory on its way is now a file (`ENOTDIR`): nothing
                        // of it is there either.
                        Err(e) => matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                        ),
                    }
                })
                .collect())
        })
        .await
        .unwrap_or_else(|e| Err(format!("checking what vanished failed: {e}")))
    }
}

/// Whether `e`, met at `path`, means the entry is gone: the path is not found, and no
/// link is there either (a link whose target is missing is an error, not a vanished entry).
fn vanished(path: &Path, e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        && std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A file's modification time in nanoseconds since the Unix epoch (none past year 2262).
pub fn mtime_ns(meta: &std::fs::Metadata) -> Option<i64> {
    meta.mtime()
        .checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(meta.mtime_nsec()))
}

fn read_item(root: &Path, entry: Entry, inline_limit: u64) -> Result<Item, FetchError> {
    let path = path_of(root, &entry.key).ok_or_else(|| FetchError::Entry {
        key: entry.key.clone(),
        message: "not a valid path key".into(),
    })?;
    let err = |e: std::io::Error| {
        if vanished(&path, &e) {
            FetchError::Vanished {
                kind: entry.kind.clone(),
                key: entry.key.clone(),
            }
        } else {
            FetchError::Entry {
                key: entry.key.clone(),
                message: e.to_string(),
            }
        }
    };
    let mut item = Item {
        kind: entry.kind.clone(),
        key: entry.key.clone(),
        checksum: String::new(),
        mode: None,
        name: None,
        refs: vec![],
        body: None,
        blob: None,
        mtime_ns: None,
        warning: None,
        ref_fields: vec![],
    };
    match entry.kind.as_str() {
        "dir" => {
            let meta = std::fs::metadata(&path).map_err(err)?;
            item.checksum = checksum_bytes(b"");
            item.mode = Some(meta.mode() & 0o7777);
            item.mtime_ns = mtime_ns(&meta);
        }
        "symlink" => {
            let target = std::fs::read_link(&path).map_err(err)?;
            let bytes = target.as_os_str().as_bytes().to_vec();
            item.checksum = checksum_bytes(&bytes);
            item.body = Some(Body::Base64(bytes));
        }
        _ => {
            let mut file = File::open(&path).map_err(err)?;
            let meta = file.metadata().map_err(err)?;
            let (checksum, size, bytes) =
                hash_reader(&mut file, meta.len() <= inline_limit).map_err(err)?;
            item.checksum = checksum;
            item.mode = Some(meta.mode() & 0o7777);
            item.mtime_ns = mtime_ns(&meta);
            match bytes {
                Some(bytes) if size <= inline_limit => item.body = Some(Body::Base64(bytes)),
                _ => {
                    item.blob = Some(Blob {
                        size,
                        locator: pathkey::encode(path.as_os_str().as_bytes()),
                    })
                }
            }
        }
    }
    Ok(item)
}

thread_local! {
    /// One read buffer per thread, reused for every file: allocating and zeroing 256 KiB
    /// per file cost more than hashing a typical small file (8% of an initial sync).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; READ_BUF]);
}

/// Runs `f` with this thread's reusable read buffer. Not reentrant: `f` must not call it.
pub fn with_read_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUFFER.with(|b| f(&mut b.borrow_mut()))
}

/// Streams a reader through blake3; keeps the bytes when `keep` is set.
pub fn hash_reader(
    reader: &mut impl Read,
    keep: bool,
) -> std::io::Result<(String, u64, Option<Vec<u8>>)> {
    with_read_buffer(|buf| {
        let mut hasher = ChecksumWriter::new();
        let mut kept = keep.then(Vec::new);
        let mut size = 0u64;
        loop {
            let n = match reader.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            if let Some(k) = kept.as_mut() {
                k.extend_from_slice(&buf[..n]);
            }
            size += n as u64;
        }
        Ok((hasher.finish(), size, kept))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the walk lists for the directory `path` of the tree at `root`.
    fn read(root: &Path, path: &Path) -> Vec<Result<Listing, ListError>> {
        let source = DirSource::new(
            &DirSourceConfig {
                path: root.to_owned(),
                include: vec![],
                exclude: vec![],
                follow_symlinks: false,
            },
            0,
        );
        let (tx, _rx) = mpsc::channel(4);
        let mut batch = Batch {
            tx: &tx,
            items: vec![],
        };
        let work = DirWork {
            path: path.to_owned(),
            ancestors: None,
        };
        assert!(source.inner.read_dir(&work, &mut batch, &mut vec![], None));
        batch.items
    }

    /// A directory removed between its parent's listing and its own read is absent (its
    /// indexed contents are deleted); the root gone is an error, never a reason to delete
    /// everything; a directory that exists but cannot be read is an error.
    #[test]
    fn a_directory_gone_before_its_read_is_vanished_but_a_gone_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        std::fs::create_dir(&root).unwrap();
        let listed = read(&root, &root.join("gone"));
        assert!(
            matches!(&listed[..], [Ok(Listing::Vanished { kind: Some(k), key })] if k == "dir" && key == "gone"),
            "{listed:?}"
        );
        std::fs::remove_dir(&root).unwrap();
        let listed = read(&root, &root);
        assert!(
            matches!(&listed[..], [Err(ListError::Root { message })] if message.contains(&root.display().to_string())),
            "{listed:?}"
        );
        // Not a directory: an error, not vanished.
        std::fs::write(dir.path().join("file"), "").unwrap();
        let listed = read(dir.path(), &dir.path().join("file"));
        assert!(
            matches!(&listed[..], [Err(ListError::Entry { .. })]),
            "{listed:?}"
        );
    }

    /// A link whose target is missing is an error when links are followed (the link is
    /// there), and a file gone when it is read is vanished.
    #[test]
    fn a_dangling_link_is_an_error_and_a_gone_file_vanished() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("link")).unwrap();
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!vanished(&dir.path().join("link"), &gone));
        assert!(vanished(&dir.path().join("file"), &gone));
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(!vanished(&dir.path().join("file"), &denied));
        let read = |kind: &str, key: &str| {
            read_item(
                dir.path(),
                Entry {
                    kind: kind.into(),
                    key: key.into(),
                    fingerprint: None,
                    payload: None,
                },
                0,
            )
        };
        assert!(matches!(
            read("file", "file"),
            Err(FetchError::Vanished { .. })
        ));
        assert!(matches!(
            read("file", "link"),
            Err(FetchError::Entry { .. })
        ));
    }
}
