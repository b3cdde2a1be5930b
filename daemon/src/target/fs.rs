//! The directory target: atomic writes (a new file linked in complete; a replacement
//! written in `.tidemark-tmp/` on the same filesystem, then swapped in), modes carried,
//! one filesystem sync per commit batch, deletes only when pruning, and keys that can
//! never escape the root.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use tidemark_proto::{checksum_bytes, pathkey, version_checksum, Body, ChecksumWriter, Event, Op};

use super::{ApplyError, Claims, Effect, Held, Outcome, Probe, Target};
use crate::blocking::Runner;
use crate::config::{DirSourceConfig, DirTargetConfig};
use crate::source::fs::{hash_reader, mtime_ns, with_read_buffer};
use crate::state::Applied;

/// Most directories remembered as created ahead of their own events.
const IMPLICIT_DIRS_MAX: usize = 100_000;

/// Directories under `.tidemark-tmp/` replacements are written in (at most 64).
const TMP_SHARDS: u64 = 16;

/// Name of the directory under the root that holds files being written.
pub const TMP_DIR: &str = ".tidemark-tmp";

/// Why a file or link fails whose place a directory holds that is not empty, with prune
/// off: what the directory holds is never removed.
pub const DIR_IN_THE_WAY_UNPRUNED: &str = "a directory that is not empty is in its place, and with prune = false what it holds is never removed; remove the directory on the target or set prune = true";

/// Whether `rel` (a path below the target root) is [`TMP_DIR`] or below it.
fn in_scratch(rel: &Path) -> bool {
    rel.components().next() == Some(Component::Normal(OsStr::new(TMP_DIR)))
}

/// [`in_scratch`] for an event's key.
fn is_scratch(key: &str) -> bool {
    pathkey::decode(key).is_some_and(|bytes| in_scratch(Path::new(OsStr::from_bytes(&bytes))))
}

/// The last component of a temporary path (`{pid}-{n}`), unique within a process.
fn tmp_name(tmp: &Path) -> String {
    tmp.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether the file found as `m` has the event's size and modification time, as tidemark
/// gives the files it writes: one a run killed before its commit may have written, whose
/// bytes then decide.
fn written_as(event: &Event, m: &fs::Metadata) -> bool {
    event.mtime_ns.is_some() && event.mtime_ns == mtime_ns(m) && content_len(event) == Some(m.len())
}

/// The length of a file event's content, from its inline bytes or its blob.
fn content_len(event: &Event) -> Option<u64> {
    match (&event.body, &event.blob) {
        (Some(Body::Base64(b)), _) => Some(b.len() as u64),
        (_, Some(blob)) => Some(blob.size),
        _ => None,
    }
}

/// Files from this size on start their writeback as soon as they are written.
const EARLY_WRITEBACK: u64 = 64 * 1024;

/// Starts writing a large file's pages to disk now, without waiting for it, so the
/// batch's `syncfs` finds them written or on their way instead of starting every file's
/// writeback itself once all copies are done: the disk writes while the other copies run.
/// `POSIX_FADV_DONTNEED` starts writeback of dirty pages (`WB_SYNC_NONE`) and drops only
/// clean ones. Not for small files: per-file writeback of 100k small files cost an
/// initial sync a third more than one `syncfs` per batch (BENCHMARKS.md). A hint: when it
/// fails, the `syncfs` does the work as before.
fn start_writeback(out: &File, event: &Event) {
    if content_len(event).is_some_and(|len| len >= EARLY_WRITEBACK) {
        let _ = rustix::fs::fadvise(out, 0, None, rustix::fs::Advice::DontNeed);
    }
}

/// Whether `m` is a directory with permission bits `mode`.
fn is_dir_with(m: &fs::Metadata, mode: u32) -> bool {
    m.is_dir() && m.permissions().mode() & 0o7777 == mode
}

/// Whether `path` (whose metadata is `m`) is a symbolic link to `target`.
fn links_to(path: &Path, m: &fs::Metadata, target: &[u8]) -> bool {
    m.file_type().is_symlink()
        && fs::read_link(path).is_ok_and(|t| t.as_os_str().as_bytes() == target)
}

/// Times that set the modification time to `ns` nanoseconds since the Unix epoch and
/// leave the access time alone.
fn modified_at(ns: i64) -> rustix::fs::Timestamps {
    use rustix::fs::{Timespec, UTIME_OMIT};
    rustix::fs::Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: ns.div_euclid(1_000_000_000),
            tv_nsec: ns.rem_euclid(1_000_000_000) as _,
        },
    }
}

/// A directory tree as a [`Target`].
pub struct DirTarget {
    inner: Arc<Inner>,
    /// Applies, in runs ([`Runner`]).
    writers: Runner,
}

struct Inner {
    root: PathBuf,
    /// Deletes are applied (`prune = true`); otherwise a directory's contents stay, so a
    /// file that would take its place never can.
    prune: bool,
    /// Remove directories a delete leaves empty; set when the source lists no directories
    /// itself (include globs), since otherwise directory deletes are events of their own.
    remove_empty_parents: bool,
    /// Parent directories already checked not to be symbolic links since the last flush;
    /// saves an lstat per ancestor per file.
    safe_dirs: Mutex<HashSet<PathBuf>>,
    /// The root's device and inode, once this process found or made it: a root removed or
    /// unmounted later is not made again (see [`Inner::check_root`]).
    root_id: Mutex<Option<(u64, u64)>>,
    /// Directories created because a file below them was written before their own event;
    /// that event then reports them `created`, not `updated`. Kept across flushes, since
    /// the directory's event may come in a later batch (a `sync` projects while it
    /// scans); not kept when the source lists no directories, as no event would remove
    /// them, and bounded by [`IMPLICIT_DIRS_MAX`]. Held while such a directory is created
    /// and while a directory's event looks for it, so the event never sees the directory
    /// before it is recorded here.
    implicit_dirs: Mutex<HashSet<PathBuf>>,
    tmp_seq: AtomicU64,
    /// Bit `n` set: shard `n` of `.tidemark-tmp/` exists (since the last flush, which
    /// removes them).
    tmp_ready: AtomicU64,
    /// This process's id, part of every temporary name.
    pid: u32,
    /// Set once `O_TMPFILE` or linking through `/proc` failed here; every new file then
    /// goes through `.tidemark-tmp/`.
    no_tmpfile: AtomicBool,
    /// Set once `RENAME_EXCHANGE` was refused here; replacements are then renamed over.
    no_exchange: AtomicBool,
    /// Set once a link by descriptor (`AT_EMPTY_PATH`, which needs `CAP_DAC_READ_SEARCH`)
    /// was refused; new files are then linked through `/proc/self/fd`.
    no_empty_path_link: AtomicBool,
    /// Directories of ours without owner write or search permission (a source's read-only
    /// directories are mirrored with their modes) opened (`u+wx`) for a change to their
    /// entries, with the mode each is given back at the next flush.
    opened: Mutex<HashMap<PathBuf, u32>>,
    /// The user the process writes as: only its own directories are opened.
    uid: u32,
    /// Directories whose entries were changed since the last flush (their time moved),
    /// with the time each had before: the one it gets back when neither its event nor its
    /// applied version gives one (the applied state of a partition this process took over
    /// is forgotten, and a delete retained while `prune` was off and applied later comes
    /// after its directory's own event).
    changed_dirs: Mutex<HashMap<PathBuf, Option<i64>>>,
    /// The modification time each directory gets at the next flush, after every change
    /// to its entries: from its own event in the batch, or its applied version
    /// ([`Target::keep_dir_times`]).
    dir_times: Mutex<HashMap<PathBuf, i64>>,
    /// Held (by a hash of the path) while a file or link is put in place and while a
    /// delete checks what is at its path and removes it: a file the source replaced by a
    /// link (or the reverse) has a delete and an upsert of two identities, applied
    /// concurrently, and the delete must never remove the new item.
    places: Box<[Mutex<()>]>,
    /// The pipeline's directory source, when it has one: where a directory or link upsert
    /// looks whether the source still holds it ([`Inner::moved_on`]), as a file upsert
    /// opens its blob. Without it, history was made again: a replay or a long-stopped
    /// projector made directories and links the source had deleted since, and with
    /// `prune = false` they stayed.
    source: Option<SourceDir>,
    /// Whether the target folds the case of names (exFAT; a casefolded ext4 directory):
    /// probed once per process in `.tidemark-tmp/` ([`Inner::folds`]). Only then are
    /// `spellings` kept: an ordinary target does no work per item for it.
    folds: OnceLock<bool>,
    /// Held while `folds` is probed.
    probing: Mutex<()>,
    /// On a target that folds case: the key (spelling) of the item, or of the directory
    /// of items, that holds each place there (the key folded), so that two source items
    /// whose keys differ in case only never share one target entry (the second
    /// overwrote the first, and its delete removed it). Filled from the applied state
    /// when the target is found to fold, and kept current by this process's applies.
    spellings: Mutex<HashMap<String, String>>,
    /// The projector's claims, which give the applied keys `spellings` starts from.
    claims: OnceLock<Arc<dyn Claims>>,
}

/// The directory source an upsert's directory or link is looked up in.
struct SourceDir {
    root: PathBuf,
    /// A followed link to a directory is listed as a directory: looked at through it.
    follow_symlinks: bool,
    /// Which items the source lists ([`Inner::source_holds`]).
    globs: crate::source::fs::Globs,
}

/// A key as a target that folds the case of names sees it.
fn folded(key: &str) -> String {
    key.to_lowercase()
}

/// The keys of the places a key takes: its directories', from the top, then its own.
fn places_of(key: &str) -> impl Iterator<Item = &str> {
    key.match_indices('/')
        .map(|(i, _)| &key[..i])
        .chain(std::iter::once(key))
}

/// Stripes of [`Inner::places`].
const PLACE_LOCKS: usize = 64;

#[derive(Debug)]
enum Failure {
    Transient(String),
    Permanent(String),
    /// Permission denied: this item's failure while the target root itself can be written
    /// (a subdirectory owned by someone else), else the whole target's.
    Denied(String),
    /// On a target that folds case, another source item (this key) holds the place.
    Taken(String),
    /// The target refused this item with an error that names no condition of the whole
    /// target (a name or kind of item its filesystem cannot hold: a link on exFAT,
    /// `ENOSYS`; a name with `*` or `:` there, `ENOENT`; `EILSEQ`, `ENAMETOOLONG`,
    /// `EINVAL`, `EFBIG`): it would refuse it again at every retry, so it is this item's
    /// failure while the root is as this process found it and can be written (checked
    /// only then, see [`Inner::item_alone`]), else the whole target's.
    Refused(String),
    Stale,
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        match e.raw_os_error() {
            Some(1 | 13) => Failure::Denied(describe_io(&e)),
            Some(errno) if !target_wide(errno) => Failure::Refused(describe_io(&e)),
            _ => Failure::Transient(describe_io(&e)),
        }
    }
}

/// Whether a target filesystem refused a name it cannot hold (`EILSEQ`, `ENAMETOOLONG`,
/// `EINVAL`): nothing can be there under it.
fn unholdable_name(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::ILSEQ | Errno::NAMETOOLONG | Errno::INVAL)
    )
}

/// Whether an error number says something of the whole target that may pass (space,
/// quota, a read-only or failing filesystem, a FUSE daemon gone, resources of the
/// process): the batch waits and is retried. Any other error is the item's own.
fn target_wide(errno: i32) -> bool {
    use rustix::io::Errno;
    [
        Errno::NOSPC,
        Errno::DQUOT,
        Errno::ROFS,
        Errno::IO,
        Errno::NOTCONN,
        Errno::STALE,
        Errno::NODEV,
        Errno::NXIO,
        Errno::NOMEDIUM,
        Errno::UCLEAN,
        Errno::REMOTEIO,
        Errno::SHUTDOWN,
        Errno::TIMEDOUT,
        Errno::HOSTDOWN,
        Errno::HOSTUNREACH,
        Errno::NETDOWN,
        Errno::NETUNREACH,
        Errno::CONNABORTED,
        Errno::CONNRESET,
        Errno::CONNREFUSED,
        Errno::MFILE,
        Errno::NFILE,
        Errno::NOMEM,
        Errno::NOBUFS,
        Errno::NOLCK,
        Errno::AGAIN,
        Errno::INTR,
        Errno::BUSY,
        Errno::DEADLK,
        Errno::CANCELED,
    ]
    .contains(&Errno::from_raw_os_error(errno))
}

/// The source file a file event's blob names, opened to copy; `None` for an event that
/// carries its bytes (or is no file).
fn open_source(event: &Event) -> Result<Option<File>, Failure> {
    let Some(blob) = event.blob.as_ref().filter(|_| {
        !matches!(event.kind.as_str(), "dir" | "symlink")
            && !matches!(event.body, Some(Body::Base64(_)))
    }) else {
        return Ok(None);
    };
    let Some(path) = pathkey::decode(&blob.locator) else {
        return Err(Failure::Permanent(
            "blob locator is not a valid path".into(),
        ));
    };
    match File::open(OsStr::from_bytes(&path)) {
        Ok(f) => Ok(Some(f)),
        Err(e) => Err(source_open_failure(&e, &blob.locator)),
    }
}

/// What an upsert makes of a source file it cannot open to copy. Nothing there, or no
/// longer a file there (a parent the source made a file: `ENOTDIR`; a link loop: `ELOOP`;
/// a directory: `EISDIR`): the item moved on since its scan, and a newer event follows,
/// so the event is stale. The source refusing to be read (`EACCES`, `EPERM`) is that
/// item's failure, tried again later. Both used to fail the whole target as unavailable,
/// so the projector retried one event forever and nothing after it was applied. Other
/// errors (`EIO`, out of descriptors) may pass: the target is retried.
fn source_open_failure(e: &std::io::Error, locator: &str) -> Failure {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    match errno {
        Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::ISDIR) => Failure::Stale,
        Some(Errno::ACCESS | Errno::PERM) => Failure::Permanent(format!(
            "cannot read source {locator}: {e} (permission denied on the source; the item is tried again once it can be read)"
        )),
        _ => Failure::Transient(format!("cannot read source {locator}: {e}")),
    }
}

fn describe_io(e: &std::io::Error) -> String {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    let hint = match errno {
        Some(Errno::NOSPC) => " (target disk is full: out of space or out of inodes, `df -h` and `df -i` on it tell which; free some: a daemon resumes by itself, and the next sync goes on from the last commit)",
        Some(Errno::ROFS) => " (target filesystem is read-only)",
        Some(Errno::ACCESS | Errno::PERM) => " (permission denied on the target; check ownership)",
        Some(Errno::NOSYS | Errno::OPNOTSUPP) => " (the target filesystem cannot hold this kind of item: FAT and exFAT have no symbolic links; exclude it in the source, or set follow_symlinks to copy what it points to)",
        Some(Errno::ILSEQ) => " (the target filesystem cannot hold this name: it is not valid in the filesystem's character set; rename it in the source or exclude it)",
        Some(Errno::NAMETOOLONG) => " (the name is too long for the target filesystem; rename it in the source or exclude it)",
        Some(Errno::NOENT) => " (the target filesystem refuses this name: FAT and exFAT hold none with any of \" * : < > ? \\ |; rename it in the source or exclude it)",
        Some(Errno::INVAL) => " (the target filesystem refuses this name or item; rename it in the source or exclude it)",
        Some(Errno::FBIG) => " (the file is too large for the target filesystem: FAT32 holds at most 4 GiB; exclude it in the source)",
        _ => "",
    };
    format!("{e}{hint}")
}

impl DirTarget {
    /// A target writing below `cfg.path`.
    pub fn new(cfg: &DirTargetConfig, remove_empty_parents: bool) -> DirTarget {
        DirTarget {
            inner: Arc::new(Inner {
                root: cfg.path.clone(),
                prune: cfg.prune,
                remove_empty_parents,
                safe_dirs: Mutex::new(HashSet::new()),
                root_id: Mutex::new(None),
                implicit_dirs: Mutex::new(HashSet::new()),
                tmp_seq: AtomicU64::new(0),
                tmp_ready: AtomicU64::new(0),
                pid: std::process::id(),
                no_tmpfile: AtomicBool::new(false),
                no_exchange: AtomicBool::new(false),
                no_empty_path_link: AtomicBool::new(false),
                opened: Mutex::new(HashMap::new()),
                uid: rustix::process::geteuid().as_raw(),
                changed_dirs: Mutex::new(HashMap::new()),
                dir_times: Mutex::new(HashMap::new()),
                places: (0..PLACE_LOCKS).map(|_| Mutex::new(())).collect(),
                source: None,
                folds: OnceLock::new(),
                probing: Mutex::new(()),
                spellings: Mutex::new(HashMap::new()),
                claims: OnceLock::new(),
            }),
            writers: Runner::for_files(),
        }
    }

    /// The same target, told its pipeline's directory source (`None` for other sources):
    /// a directory or link upsert that the source no longer holds is then stale.
    pub fn with_source(mut self, source: Option<&DirSourceConfig>) -> DirTarget {
        Arc::get_mut(&mut self.inner)
            .expect("set before the target is shared")
            .source = source.map(|s| SourceDir {
            root: s.path.clone(),
            follow_symlinks: s.follow_symlinks,
            globs: crate::source::fs::Globs::new(s),
        });
        self
    }
}

impl Inner {
    /// The lock of `path`'s place ([`Inner::places`]).
    fn place(&self, path: &Path) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        path.hash(&mut h);
        let stripe = (h.finish() % self.places.len() as u64) as usize;
        self.places[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The path of a key, refusing keys that would leave the root.
    fn resolve(&self, key: &str) -> Result<PathBuf, Failure> {
        let bytes = pathkey::decode(key)
            .ok_or_else(|| Failure::Permanent("key is not a valid path encoding".into()))?;
        let rel = Path::new(OsStr::from_bytes(&bytes));
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(Failure::Permanent(
                "path is absolute or contains `..`; refusing to write outside the target root"
                    .into(),
            ));
        }
        if in_scratch(rel) {
            return Err(Failure::Permanent(format!(
                "`{TMP_DIR}` at the top of a directory target holds tidemark's temporary files and is emptied after every batch, so nothing can be mirrored there; exclude it in the source (`exclude = [\"{TMP_DIR}\", \"{TMP_DIR}/**\"]`) or rename it"
            )));
        }
        Ok(self.root.join(rel))
    }

    /// Notes that the entries of `dir` are about to change, which moves its modification
    /// time: the flush gives it its source time back, or else the time it has now. The
    /// root is no item and keeps its own.
    fn changing(&self, dir: &Path) {
        if dir == self.root || self.changed_dirs.lock().unwrap().contains_key(dir) {
            return;
        }
        // Looked at before the change (the first to note a directory does it before its
        // own change, and every other change is noted after it).
        let before = fs::symlink_metadata(dir)
            .ok()
            .filter(|m| m.is_dir())
            .and_then(|m| mtime_ns(&m));
        self.changed_dirs
            .lock()
            .unwrap()
            .entry(dir.to_owned())
            .or_insert(before);
    }

    /// Gives each directory with a time to get (see `dir_times`) that time, after every
    /// change to its entries so that it stays. A directory that is gone or no longer a
    /// directory is skipped; one whose time cannot be set is reported and left, as
    /// `verify` then shows.
    fn set_dir_times(&self) {
        use rustix::fs::{utimensat, AtFlags, CWD};
        let changed = std::mem::take(&mut *self.changed_dirs.lock().unwrap());
        let mut times = std::mem::take(&mut *self.dir_times.lock().unwrap());
        for (dir, before) in changed {
            if let Some(ns) = before {
                times.entry(dir).or_insert(ns);
            }
        }
        for (dir, ns) in times {
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() && mtime_ns(&m) != Some(ns) => {}
                _ => continue,
            }
            if let Err(e) = utimensat(CWD, &dir, &modified_at(ns), AtFlags::SYMLINK_NOFOLLOW) {
                tracing::warn!(
                    "cannot give directory {} its source modification time: {}",
                    dir.display(),
                    describe_io(&e.into())
                );
            }
        }
    }

    /// Runs `op`, a change to the entries of `dir`. When it is refused for want of
    /// permission and `dir`, or a directory between the root and it, is ours but lacks
    /// owner write or search permission (the mode of a read-only source directory, which
    /// only root could write through), that directory is opened until the next flush,
    /// which gives its mode back, and `op` runs again: as `rsync` does for a user who is
    /// not root.
    fn in_dir<T>(
        &self,
        dir: &Path,
        mut op: impl FnMut() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match op() {
            Err(e) if e.kind() == ErrorKind::PermissionDenied && self.open_up(dir) => op(),
            r => r,
        }
    }

    /// Opens (`u+wx`) each directory of ours from below the root down to `dir` that lacks
    /// either, remembering its mode. `true` when one is open now (by this call or another
    /// writer's), so the refused change is worth trying again.
    fn open_up(&self, dir: &Path) -> bool {
        let Ok(rel) = dir.strip_prefix(&self.root) else {
            return false;
        };
        let mut opened = self.opened.lock().unwrap();
        let mut any = false;
        let mut d = self.root.clone();
        for c in rel.components() {
            d.push(c);
            if opened.contains_key(&d) {
                any = true;
                continue;
            }
            let Ok(m) = fs::symlink_metadata(&d) else {
                break;
            };
            let mode = m.mode() & 0o7777;
            if !m.is_dir() || m.uid() != self.uid {
                break;
            }
            if mode & 0o300 == 0o300 {
                continue;
            }
            if fs::set_permissions(&d, Permissions::from_mode(mode | 0o300)).is_err() {
                break;
            }
            self.note_opened(&d, mode);
            opened.insert(d.clone(), mode);
            any = true;
        }
        any
    }

    /// Where opened directories are noted, so that a process killed before its flush does
    /// not leave them open: the next flush (the first thing a run does) gives them back.
    fn opened_journal(&self) -> PathBuf {
        self.root.join(TMP_DIR).join("opened")
    }

    fn note_opened(&self, dir: &Path, mode: u32) {
        let Ok(rel) = dir.strip_prefix(&self.root) else {
            return;
        };
        let line = serde_json::json!([mode, pathkey::encode(rel.as_os_str().as_bytes())]);
        let _ = fs::create_dir_all(self.root.join(TMP_DIR));
        let noted = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.opened_journal())
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = noted {
            tracing::warn!(
                "cannot note that {} was opened for writing ({e}); if tidemark is killed before the batch ends, it keeps owner write permission",
                dir.display()
            );
        }
    }

    /// Sets a directory's mode, or the mode it gets back at the flush while it is open.
    fn set_dir_mode(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        let mut opened = self.opened.lock().unwrap();
        match opened.get_mut(path) {
            Some(kept) => {
                *kept = mode;
                fs::set_permissions(path, Permissions::from_mode(mode | 0o300))
            }
            None => fs::set_permissions(path, Permissions::from_mode(mode)),
        }
    }

    /// Gives the opened directories their modes back, deepest first (a parent without
    /// search permission would keep its children's from being set).
    fn close_opened(&self) -> Result<(), Failure> {
        let mut opened = self.opened.lock().unwrap();
        let mut dirs: Vec<(PathBuf, u32)> = opened.drain().collect();
        // Those a killed process opened, unless changed since: still open as it left them.
        for line in fs::read_to_string(self.opened_journal())
            .unwrap_or_default()
            .lines()
        {
            let Ok((mode, key)) = serde_json::from_str::<(u32, String)>(line) else {
                continue;
            };
            let Some(rel) = pathkey::decode(&key) else {
                continue;
            };
            let d = self.root.join(OsStr::from_bytes(&rel));
            let still_open = fs::symlink_metadata(&d)
                .is_ok_and(|m| m.is_dir() && m.mode() & 0o7777 == mode | 0o300);
            if still_open && !dirs.iter().any(|(o, _)| *o == d) {
                dirs.push((d, mode));
            }
        }
        dirs.sort_by_key(|(d, _)| std::cmp::Reverse(d.components().count()));
        let mut failed = None;
        for (d, mode) in dirs {
            match fs::set_permissions(&d, Permissions::from_mode(mode)) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    failed.get_or_insert(format!(
                        "cannot give {} its mode {mode:o} back: {}",
                        d.display(),
                        describe_io(&e)
                    ));
                    opened.insert(d, mode);
                }
                _ => {}
            }
        }
        failed.map_or(Ok(()), |m| Err(Failure::Transient(m)))
    }

    /// Whether this process may create and remove entries in the target root.
    fn root_writable(&self) -> bool {
        use rustix::fs::{access, Access};
        access(&self.root, Access::WRITE_OK | Access::EXEC_OK).is_ok()
    }

    /// Whether an error met on one item is that item's alone: the root is still the
    /// directory this process found or made (not gone, not unmounted) and can be written.
    /// Asked on error paths only.
    fn item_alone(&self) -> bool {
        let found = fs::metadata(&self.root).ok().filter(|m| m.is_dir());
        let same = match (*self.root_id.lock().unwrap(), found) {
            (_, None) => false,
            (Some(was), Some(m)) => was == (m.dev(), m.ino()),
            (None, Some(_)) => true,
        };
        same && self.root_writable()
    }

    /// Why the target root could not be made, naming the root: "File exists" alone points
    /// at the item being written.
    fn root_error(&self, e: std::io::Error) -> Failure {
        let what = match fs::symlink_metadata(&self.root) {
            Ok(m) if m.file_type().is_symlink() => {
                " (it is a symbolic link to no directory; target.dir.path must name a directory or a place to create one)"
            }
            Ok(m) if !m.is_dir() => {
                " (it is a file, not a directory; target.dir.path must name a directory or a place to create one)"
            }
            _ => "",
        };
        Failure::Transient(format!(
            "cannot create the target directory {}: {}{what}",
            self.root.display(),
            describe_io(&e)
        ))
    }

    /// Makes the root when this process has not seen it yet; once it has, a root that is
    /// gone, or another directory (its filesystem unmounted, or remounted), is a failure
    /// of the whole target, tried again: made anew, it would hold only what comes next,
    /// while the applied state says everything before is there and `status` reads 0 lag.
    fn check_root(&self) -> Result<(), Failure> {
        use std::os::unix::fs::MetadataExt;
        let mut seen = self.root_id.lock().unwrap();
        let found = match fs::metadata(&self.root) {
            Ok(m) if !m.is_dir() => {
                return Err(self.root_error(rustix::io::Errno::EXIST.into()));
            }
            Ok(m) => Some((m.dev(), m.ino())),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(self.root_error(e)),
        };
        let advice = "tidemark does not make a target it wrote to again, as it would then lack everything applied before: put it back (mount its filesystem), or stop tidemark and run `tidemark replay --from 0`, then `tidemark project`, to build it anew";
        match (*seen, found) {
            (Some(_), None) => Err(Failure::Transient(format!(
                "the target directory {} is gone (removed, or its filesystem unmounted); {advice}",
                self.root.display()
            ))),
            (Some(was), Some(now)) if was != now => Err(Failure::Transient(format!(
                "the target directory {} is another directory than the one this process wrote to (replaced, or its filesystem unmounted or mounted anew); {advice}",
                self.root.display()
            ))),
            (Some(_), Some(_)) => Ok(()),
            (None, Some(now)) => {
                *seen = Some(now);
                Ok(())
            }
            (None, None) => {
                fs::create_dir_all(&self.root).map_err(|e| self.root_error(e))?;
                let m = fs::metadata(&self.root).map_err(|e| self.root_error(e))?;
                *seen = Some((m.dev(), m.ino()));
                Ok(())
            }
        }
    }

    /// Creates the parents of `path` and checks none of them is a symbolic link. What was
    /// checked is remembered until the next flush, so each directory (the root too) is
    /// looked at once per batch, not once per new directory below it.
    fn prepare_parents(&self, path: &Path) -> Result<(), Failure> {
        let parent = path.parent().expect("resolved paths are below the root");
        let known = |dir: &Path| self.safe_dirs.lock().unwrap().contains(dir);
        if known(parent) {
            return Ok(());
        }
        if !known(&self.root) {
            self.check_root()?;
            self.safe_dirs.lock().unwrap().insert(self.root.clone());
        }
        let mut dir = self.root.clone();
        let rel = parent.strip_prefix(&self.root).unwrap_or(Path::new(""));
        for c in rel.components() {
            dir.push(c);
            if known(&dir) {
                continue;
            }
            let up = dir.parent().expect("below the root").to_owned();
            match self.in_dir(&up, || fs::symlink_metadata(&dir)) {
                Ok(m) if m.is_dir() => {}
                // The source has a directory here now (the event's key is below it), so the
                // file or link the target still holds is an older item's: it is replaced,
                // never written through. Its own delete finds the directory and leaves it.
                Ok(_) => self.make_dir_in_place_of(&dir)?,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    let mut implicit = self.implicit_dirs.lock().unwrap();
                    self.changing(&up);
                    match self.in_dir(&up, || fs::create_dir(&dir)) {
                        Ok(()) if !self.remove_empty_parents => {
                            if implicit.len() >= IMPLICIT_DIRS_MAX {
                                // Events that never came (a source that stopped listing
                                // them); forgetting only miscounts a later `created` as
                                // `updated`.
                                implicit.clear();
                            }
                            implicit.insert(dir.clone());
                        }
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
            self.safe_dirs.lock().unwrap().insert(dir.clone());
        }
        Ok(())
    }

    /// Removes the file or link at `path` and creates a directory there. Another writer
    /// may do the same at once: a directory already there is kept, never removed.
    fn make_dir_in_place_of(&self, path: &Path) -> Result<(), Failure> {
        let dir = path.parent().expect("resolved paths are below the root");
        self.changing(dir);
        match self.in_dir(dir, || fs::remove_file(path)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(21) => {}
            Err(e) => return Err(e.into()),
        }
        match self.in_dir(dir, || fs::create_dir(path)) {
            Err(e)
                if e.kind() == ErrorKind::AlreadyExists
                    && fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) =>
            {
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// A fresh temporary name in one of the [`TMP_SHARDS`] directories of `.tidemark-tmp/`,
    /// taken in turn: with every replacement created in one directory and renamed out of
    /// it, concurrent writers queued on that directory's lock.
    fn tmp_path(&self) -> Result<PathBuf, Failure> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let shard = n % TMP_SHARDS;
        let dir = self.root.join(TMP_DIR).join(format!("{shard:02}"));
        // Created once per batch (a flush removes them), not once per file.
        if self.tmp_ready.load(Ordering::Acquire) & (1 << shard) == 0 {
            fs::create_dir_all(&dir)?;
            self.tmp_ready.fetch_or(1 << shard, Ordering::AcqRel);
        }
        Ok(dir.join(format!("{}-{n}", self.pid)))
    }

    /// Whether the target folds the case of names, probed the first time the root is
    /// there (made first when `make_root`, as a write would): a file made in
    /// `.tidemark-tmp/` is looked up by its name in upper case. A target found to fold
    /// gets its `spellings` from the applied state. `false` while it cannot be told.
    fn folds(&self, make_root: bool) -> bool {
        if let Some(folds) = self.folds.get() {
            return *folds;
        }
        let _probing = self.probing.lock().unwrap();
        if let Some(folds) = self.folds.get() {
            return *folds;
        }
        if make_root && self.check_root().is_err() {
            return false;
        }
        let tmp = self.root.join(TMP_DIR);
        match fs::create_dir(&tmp) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return false,
            _ => {}
        }
        let probe = tmp.join(format!("case-probe-{}", self.pid));
        if File::create(&probe).is_err() {
            return false;
        }
        let folds = fs::symlink_metadata(tmp.join(format!("CASE-PROBE-{}", self.pid))).is_ok();
        let _ = fs::remove_file(&probe);
        if folds {
            let keys = self
                .claims
                .get()
                .map_or(Ok(Vec::new()), |c| c.applied_keys());
            let mut spellings = self.spellings.lock().unwrap();
            match keys {
                Ok(keys) => {
                    for key in &keys {
                        for place in places_of(key) {
                            spellings
                                .entry(folded(place))
                                .or_insert_with(|| place.to_owned());
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    "the target directory {} folds the case of names, and the applied state cannot be read to tell which item holds each name there ({e}); only what this process applies is known",
                    self.root.display()
                ),
            }
            tracing::info!(
                "the target directory {} folds the case of names: source items whose paths differ in case only cannot both be mirrored there",
                self.root.display()
            );
        }
        let _ = self.folds.set(folds);
        folds
    }

    /// The key of another item that holds a place `key` takes, on a target that folds
    /// case.
    fn holder(&self, key: &str) -> Option<String> {
        let spellings = self.spellings.lock().unwrap();
        places_of(key).find_map(|place| {
            spellings
                .get(&folded(place))
                .filter(|held| *held != place)
                .cloned()
        })
    }

    /// Takes the places of `key` (its directories' and its own) on a target that folds
    /// case, unless another item holds one. `Ok(true)`: its own place is newly taken.
    ///
    /// With `prune = false`, a place held by an item the source no longer has (its delete
    /// retained: `Readme` renamed to `README` in the source) is taken over: the entry is
    /// renamed to the new spelling, which is then written as the item it holds. Waiting
    /// for the old item's delete, as with prune on, waited for good, and the new item
    /// failed at every run naming a source item that did not exist.
    fn take_places(&self, key: &str) -> Result<bool, Failure> {
        let mut spellings = self.spellings.lock().unwrap();
        let mut fresh = Vec::new();
        for place in places_of(key) {
            let f = folded(place);
            match spellings.get(&f) {
                Some(held) if held != place => {
                    if self.prune || self.source_has(held) {
                        return Err(Failure::Taken(held.clone()));
                    }
                    let (from, to) = (self.resolve(held)?, self.resolve(place)?);
                    match fs::rename(&from, &to) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                    tracing::debug!(
                        key = %place,
                        "the target folds the case of names: took over the entry of `{held}`, which the source no longer has (its delete retained, as prune is off)"
                    );
                    spellings.insert(f, place.to_owned());
                }
                Some(_) => {}
                None => fresh.push((f, place)),
            }
        }
        let own = fresh.last().is_some_and(|(_, place)| *place == key);
        for (f, place) in fresh {
            spellings.insert(f, place.to_owned());
        }
        Ok(own)
    }

    /// Whether the source has an entry at `key` (of any kind): `true` when it cannot be
    /// told (no directory source this process sees, a key that is no path).
    fn source_has(&self, key: &str) -> bool {
        let Some(source) = &self.source else {
            return true;
        };
        let Some(rel) = pathkey::decode(key) else {
            return true;
        };
        fs::symlink_metadata(source.root.join(OsStr::from_bytes(&rel))).is_ok()
    }

    /// Lets go of `key`'s own place on a target that folds case, when it holds it.
    fn release_place(&self, key: &str) {
        let mut spellings = self.spellings.lock().unwrap();
        let f = folded(key);
        if spellings.get(&f).is_some_and(|held| held == key) {
            spellings.remove(&f);
        }
    }

    fn upsert(&self, event: &Event, prior: Option<&Applied>) -> Result<Outcome, Failure> {
        if !self.folds(true) {
            return self.write_item(event, prior);
        }
        let own = self.take_places(&event.key)?;
        let written = self.write_item(event, prior);
        if own
            && !matches!(
                written,
                Ok(Outcome::Created | Outcome::Updated | Outcome::Adopted)
            )
        {
            self.release_place(&event.key);
        }
        written
    }

    fn write_item(&self, event: &Event, prior: Option<&Applied>) -> Result<Outcome, Failure> {
        let path = self.resolve(&event.key)?;
        // The source first: a file gone from it (a newer event follows) is stale before
        // anything is made on the target. Opened after its parents were made, a stale
        // file's directory was made again after the batch had deleted it, and stayed.
        let mut source = open_source(event)?;
        // So is a directory or link the source no longer holds as the event has it.
        if self.moved_on(event, &path) {
            return Err(Failure::Stale);
        }
        self.prepare_parents(&path)?;
        // A directory's event decides `created` from the lstat and the implicit set
        // together, while no file below it can create it in between.
        let parent = path.parent().expect("resolved paths are below the root");
        let mut implicit = (event.kind == "dir").then(|| self.implicit_dirs.lock().unwrap());
        let existing = match self.in_dir(parent, || fs::symlink_metadata(&path)) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let fresh = if existing.is_some() {
            Outcome::Updated
        } else {
            Outcome::Created
        };
        let mode = event.mode.unwrap_or(0o644);
        // The source replaced a directory by a file or link: only an empty one can go.
        let existing = match existing {
            Some(m) if m.is_dir() && event.kind != "dir" => {
                if !self.remove_dir_in_the_way(&path)? {
                    return Ok(Outcome::Deferred);
                }
                None
            }
            e => e,
        };
        match event.kind.as_str() {
            "dir" => {
                match &existing {
                    Some(m) if m.is_dir() => {}
                    // The source replaced a file or link by this directory.
                    Some(_) => self.make_dir_in_place_of(&path)?,
                    // A concurrent write below it may have created it since the lstat;
                    // anything else there now (a link) is replaced, never followed.
                    None => match self.in_dir(parent, || {
                        self.changing(parent);
                        fs::create_dir(&path)
                    }) {
                        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                            self.make_dir_in_place_of(&path)?
                        }
                        r => r?,
                    },
                }
                // Created a moment ago for a file inside it: this event is its creation.
                let implicit = implicit.take().is_some_and(|mut set| set.remove(&path));
                // One with this mode already, never applied here (a replay, a new state):
                // taken over, as an equal file is.
                let equal = prior.is_none()
                    && !implicit
                    && existing.as_ref().is_some_and(|m| is_dir_with(m, mode));
                self.set_dir_mode(&path, mode)?;
                if let Some(ns) = event.mtime_ns {
                    self.dir_times.lock().unwrap().insert(path, ns);
                }
                Ok(match (implicit, equal) {
                    (true, _) => Outcome::Created,
                    (false, true) => Outcome::Adopted,
                    (false, false) => fresh,
                })
            }
            "symlink" => {
                let Some(Body::Base64(target)) = &event.body else {
                    return Err(Failure::Permanent(
                        "symlink event carries no link target".into(),
                    ));
                };
                if checksum_bytes(target) != event.checksum {
                    return Err(Failure::Permanent(
                        "link target does not match its checksum".into(),
                    ));
                }
                // An equal link is already there: taken over without a write.
                if existing
                    .as_ref()
                    .is_some_and(|m| links_to(&path, m, target))
                {
                    return Ok(Outcome::Adopted);
                }
                let tmp = self.tmp_path()?;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &tmp)?;
                self.replace(&tmp, &path, existing.as_ref())?;
                Ok(fresh)
            }
            _ => {
                if let Some(m) = existing.as_ref().filter(|m| m.is_file()) {
                    // Only the mode or the time moved (a `chmod`, a `touch`): the applied
                    // state says the file there holds these bytes, so they stay as they are.
                    let applied = prior.map(|p| version_checksum(&p.version));
                    if applied == Some(event.checksum.as_str())
                        && content_len(event) == Some(m.len())
                    {
                        self.set_attributes(&path, m, event, mode)?;
                        return Ok(Outcome::Updated);
                    }
                    // Adopt an equal file that is already there instead of rewriting it:
                    // with no applied state (a replay, a pre-filled target), or with the
                    // applied state of an earlier version while the file has this event's
                    // size and time, as tidemark gives what it writes (written by a run
                    // killed before its commit; it was written again). Its bytes decide.
                    if (prior.is_none() || written_as(event, m))
                        && self.same_content(&path, event)?
                    {
                        // Written by a run that stopped before its flush, perhaps: that
                        // run's change to the directory's entries is this one's too.
                        self.changing(parent);
                        self.set_attributes(&path, m, event, mode)?;
                        return Ok(Outcome::Adopted);
                    }
                }
                if existing.is_none() && self.create_in_place(&path, event, mode, &mut source)? {
                    return Ok(fresh);
                }
                let tmp = self.tmp_path()?;
                let written = self.write_tmp(&tmp, event, mode, &mut source);
                if let Err(e) = written {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                self.replace(&tmp, &path, existing.as_ref())?;
                Ok(fresh)
            }
        }
    }

    /// Whether the source holds, and its globs list, an item of the event's kind at its
    /// key: a delete retained while `prune` was off whose item came back (or came back
    /// into the globs) is not applied when prune is turned on, though no scan has run
    /// since (`project`). `false` without a directory source this process can see.
    fn source_holds(&self, event: &Event) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        let Some(rel) = pathkey::decode(&event.key) else {
            return false;
        };
        let rel = Path::new(OsStr::from_bytes(&rel));
        if !source.globs.lists(rel, &event.kind) {
            return false;
        }
        let path = source.root.join(rel);
        let meta = if source.follow_symlinks {
            fs::metadata(&path)
        } else {
            fs::symlink_metadata(&path)
        };
        meta.is_ok_and(|m| match event.kind.as_str() {
            "dir" => m.is_dir(),
            "symlink" => m.file_type().is_symlink(),
            _ => m.is_file(),
        })
    }

    /// Whether the source no longer holds the directory or link that an upsert would make
    /// at `path` (nothing there, another kind of item, a link to elsewhere): the item
    /// moved on since its scan and a newer event of it follows, so the upsert is stale, as
    /// a file's is when its blob no longer matches. One lstat or readlink per directory or
    /// link event; files are not looked at here. A source root this process cannot see (a
    /// projector on another machine) tells nothing: the event is applied.
    fn moved_on(&self, event: &Event, path: &Path) -> bool {
        use rustix::io::Errno;
        let Some(source) = &self.source else {
            return false;
        };
        let in_source = || {
            let rel = path.strip_prefix(&self.root).unwrap_or(path);
            source.root.join(rel)
        };
        let holds = match (event.kind.as_str(), &event.body) {
            ("dir", _) if source.follow_symlinks => fs::metadata(in_source()).map(|m| m.is_dir()),
            ("dir", _) => fs::symlink_metadata(in_source()).map(|m| m.is_dir()),
            ("symlink", Some(Body::Base64(target))) => {
                fs::read_link(in_source()).map(|t| t.as_os_str().as_bytes() == target.as_slice())
            }
            _ => return false,
        };
        match holds.map_err(|e| e.raw_os_error().map(Errno::from_raw_os_error)) {
            Ok(holds) => !holds,
            // readlink of something that is not a link.
            Err(Some(Errno::INVAL)) => true,
            Err(Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP)) => source.root.is_dir(),
            // Unknown (the source refuses to be read): applied as before.
            Err(_) => false,
        }
    }

    /// Removes the directory at `path` for the file or link that takes its place. `false`:
    /// it still holds entries, which the deletes of its contents (in this batch or a later
    /// one) remove; the projector tries the event again after each batch. Without prune
    /// those deletes never reach the target, so the event fails instead.
    fn remove_dir_in_the_way(&self, path: &Path) -> Result<bool, Failure> {
        let dir = path.parent().expect("resolved paths are below the root");
        self.changing(dir);
        match self.in_dir(dir, || fs::remove_dir(path)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
            Err(e) if e.raw_os_error() == Some(39) && self.prune => Ok(false),
            Err(e) if e.raw_os_error() == Some(39) => {
                Err(Failure::Permanent(DIR_IN_THE_WAY_UNPRUNED.into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What [`Inner::upsert`] would find at the event's path, without writing. Only a file
    /// of the same content is adopted; a directory or link already there is written again
    /// (and counted `updated`).
    fn probe(&self, event: &Event) -> Probe {
        let Ok(path) = self.resolve(&event.key) else {
            return Probe::Unknown;
        };
        let m = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Nothing there, or a file where a parent would be: nothing can be there.
            Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(20) => {
                return Probe::Absent
            }
            Err(_) => return Probe::Unknown,
        };
        // As the upsert decides with no applied state: what it adopts without a write.
        let equal = match (event.kind.as_str(), &event.body) {
            ("dir", _) => is_dir_with(&m, event.mode.unwrap_or(0o644)),
            ("symlink", Some(Body::Base64(target))) => links_to(&path, &m, target),
            ("symlink", _) => false,
            _ => m.is_file() && self.same_content(&path, event).unwrap_or(false),
        };
        if equal {
            Probe::Equal
        } else {
            Probe::Different
        }
    }

    /// What is at `key` ([`Target::holds`]); `None` also when it cannot be read.
    fn holds(&self, key: &str) -> Option<Held> {
        let path = self.resolve(key).ok()?;
        let kind_of = |t: fs::FileType| match t {
            t if t.is_dir() => "dir",
            t if t.is_symlink() => "symlink",
            _ => "file",
        };
        let kind = kind_of(fs::symlink_metadata(&path).ok()?.file_type());
        let mut entries = Vec::new();
        if kind == "dir" {
            for entry in fs::read_dir(&path).ok()? {
                let entry = entry.ok()?;
                let rel = path.join(entry.file_name());
                let rel = rel.strip_prefix(&self.root).ok()?;
                entries.push((
                    kind_of(entry.file_type().ok()?),
                    pathkey::encode(rel.as_os_str().as_bytes()),
                ));
            }
        }
        Some(Held { kind, entries })
    }

    fn same_content(&self, path: &Path, event: &Event) -> Result<bool, Failure> {
        if content_len(event) != Some(fs::metadata(path)?.len()) {
            return Ok(false);
        }
        let (checksum, _, _) = hash_reader(&mut File::open(path)?, false)?;
        Ok(checksum == event.checksum)
    }

    /// Gives the file at `path` (found as `m`) the event's mode and modification time where
    /// they differ, without opening it: a file whose mode grants its owner nothing is
    /// changed as well.
    fn set_attributes(
        &self,
        path: &Path,
        m: &fs::Metadata,
        event: &Event,
        mode: u32,
    ) -> Result<(), Failure> {
        use rustix::fs::{utimensat, AtFlags, CWD};
        let dir = path.parent().expect("resolved paths are below the root");
        if m.mode() & 0o7777 != mode {
            self.in_dir(dir, || {
                fs::set_permissions(path, Permissions::from_mode(mode))
            })?;
        }
        if let Some(ns) = event.mtime_ns.filter(|ns| Some(*ns) != mtime_ns(m)) {
            let times = modified_at(ns);
            let set =
                || utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(Into::into);
            self.in_dir(dir, set)?;
        }
        Ok(())
    }

    /// Writes the event's bytes to a new file at `tmp`.
    fn write_tmp(
        &self,
        tmp: &Path,
        event: &Event,
        mode: u32,
        source: &mut Option<File>,
    ) -> Result<(), Failure> {
        self.write_into(&mut File::create(tmp)?, event, mode, source)
    }

    /// Writes a new file as an unnamed inode in its own directory (`O_TMPFILE`) and links
    /// it in once it is complete: no reader sees half a file and a killed write leaves no
    /// debris. Allocating the inode in its directory, not in `.tidemark-tmp/`, spreads new
    /// files over the filesystem as their directories are; with every file born in one
    /// directory, ext4 spent half of an initial sync of 100k files searching one block
    /// group for free inodes. `Ok(false)`: not done (no `O_TMPFILE` or `/proc` here, or
    /// the name was taken meanwhile); the caller writes it the usual way.
    fn create_in_place(
        &self,
        path: &Path,
        event: &Event,
        mode: u32,
        source: &mut Option<File>,
    ) -> Result<bool, Failure> {
        use rustix::fs::{AtFlags, Mode, OFlags, CWD};
        if self.no_tmpfile.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let dir = path.parent().expect("resolved paths are below the root");
        let open = || {
            rustix::fs::open(
                dir,
                OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(std::io::Error::from)
        };
        let fd = match self.in_dir(dir, open) {
            Ok(fd) => fd,
            Err(e)
                if matches!(
                    rustix::io::Errno::from_io_error(&e),
                    Some(
                        rustix::io::Errno::OPNOTSUPP
                            | rustix::io::Errno::ISDIR
                            | rustix::io::Errno::INVAL
                    )
                ) =>
            {
                self.no_tmpfile.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            Err(_) => return Ok(false),
        };
        let mut out = File::from(fd);
        self.write_into(&mut out, event, mode, source)?;
        self.changing(dir);
        let _place = self.place(path);
        // By descriptor when allowed: resolving `/proc/self/fd/N` for every new file cost
        // a third of the link's time in an initial sync of 100k files.
        if !self.no_empty_path_link.load(Ordering::Relaxed) {
            match rustix::fs::linkat(&out, "", CWD, path, AtFlags::EMPTY_PATH) {
                Ok(()) => return Ok(true),
                Err(rustix::io::Errno::EXIST) => return Ok(false),
                // What a caller without the capability gets.
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
                    self.no_empty_path_link.store(true, Ordering::Relaxed)
                }
                Err(_) => {}
            }
        }
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&out));
        match rustix::fs::linkat(CWD, proc.as_str(), CWD, path, AtFlags::SYMLINK_FOLLOW) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(_) => {
                self.no_tmpfile.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// Writes the event's bytes to `out`, checking them against the checksum on the way.
    fn write_into(
        &self,
        out: &mut File,
        event: &Event,
        mode: u32,
        source: &mut Option<File>,
    ) -> Result<(), Failure> {
        match (&event.body, &event.blob) {
            (Some(Body::Base64(bytes)), _) => {
                if checksum_bytes(bytes) != event.checksum {
                    return Err(Failure::Permanent(
                        "inline bytes do not match the event's checksum; the log is corrupt".into(),
                    ));
                }
                out.write_all(bytes)?;
            }
            (_, Some(_)) => {
                // Opened by the upsert; read from the start again when a first write into
                // another file gave up (a name taken meanwhile).
                let src = match source {
                    Some(f) => f,
                    None => source.insert(open_source(event)?.ok_or_else(|| {
                        Failure::Permanent("file event carries neither body nor blob".into())
                    })?),
                };
                std::io::Seek::rewind(src)?;
                let copied = with_read_buffer(|buf| {
                    let mut hasher = ChecksumWriter::new();
                    loop {
                        let n = match src.read(buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            // The source changed or vanished under us; a newer event follows.
                            Err(_) => return Err(Failure::Stale),
                        };
                        hasher.update(&buf[..n]);
                        out.write_all(&buf[..n])?;
                    }
                    Ok(hasher.finish())
                })?;
                if copied != event.checksum {
                    return Err(Failure::Stale);
                }
                start_writeback(out, event);
            }
            _ => {
                return Err(Failure::Permanent(
                    "file event carries neither body nor blob".into(),
                ))
            }
        }
        out.set_permissions(Permissions::from_mode(mode))?;
        if let Some(ns) = event.mtime_ns {
            rustix::fs::futimens(&*out, &modified_at(ns)).map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    fn replace(
        &self,
        tmp: &Path,
        path: &Path,
        existing: Option<&fs::Metadata>,
    ) -> Result<(), Failure> {
        let dir = path.parent().expect("resolved paths are below the root");
        self.changing(dir);
        let _place = self.place(path);
        if existing.is_some() && self.exchange(tmp, path)? {
            return Ok(());
        }
        self.in_dir(dir, || fs::rename(tmp, path))?;
        Ok(())
    }

    /// Swaps the finished file at `tmp` with the file or link at `path` in one step
    /// (`RENAME_EXCHANGE`), then removes the old one, now at `tmp`. Readers see the old
    /// content or the new, as with a rename. A rename over an existing file costs ext4
    /// more: it starts writing the new file's data back there and then
    /// (`auto_da_alloc`), one file at a time, where the batch's `syncfs` writes all of them
    /// together: projecting 1000 replaced files (warm cache, 2 cores) took 0.28 s instead
    /// of 0.36 s (BENCHMARKS.md). `Ok(false)`: not done (no such swap on this filesystem,
    /// or `path` is gone); the caller renames.
    fn exchange(&self, tmp: &Path, path: &Path) -> Result<bool, Failure> {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        use rustix::io::Errno;
        if self.no_exchange.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let dir = path.parent().expect("resolved paths are below the root");
        let swap = || renameat_with(CWD, tmp, CWD, path, RenameFlags::EXCHANGE).map_err(Into::into);
        match self.in_dir(dir, swap).map_err(|e| Errno::from_io_error(&e)) {
            Ok(()) => {}
            Err(Some(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)) => {
                self.no_exchange.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            Err(_) => return Ok(false),
        }
        if fs::remove_file(tmp).is_ok() || !fs::symlink_metadata(tmp).is_ok_and(|m| m.is_dir()) {
            // An old file that could not be removed goes with the next flush.
            return Ok(true);
        }
        // A directory took the file's place since the lstat. It must not stay in
        // `.tidemark-tmp/`, which every flush empties: swap it back.
        if let Err(e) = renameat_with(CWD, tmp, CWD, path, RenameFlags::EXCHANGE) {
            let kept = self.root.join(format!(".tidemark-kept-{}", tmp_name(tmp)));
            fs::rename(tmp, &kept)?;
            return Err(Failure::Permanent(format!(
                "a directory took the file's place while it was written and could not be put back ({e}); it is at {}",
                kept.display()
            )));
        }
        let _ = fs::remove_file(tmp);
        Err(Failure::Permanent(
            "a directory took the file's place while it was written".into(),
        ))
    }

    /// On a target that folds case, a delete leaves alone the entry of another item that
    /// holds its place (`Readme` when `README` is deleted), and lets go of the place once
    /// nothing is there.
    fn delete(&self, event: &Event) -> Result<Outcome, Failure> {
        if !self.folds(false) {
            return self.remove_item(event);
        }
        if let Some(holder) = self.holder(&event.key) {
            tracing::debug!(
                key = %event.key,
                "not deleted: the target folds the case of names, and `{holder}` holds its place there"
            );
            return Ok(Outcome::Unchanged);
        }
        let removed = self.remove_item(event);
        let gone = self.resolve(&event.key).is_ok_and(|path| {
            fs::symlink_metadata(path).is_err_and(|e| e.kind() == ErrorKind::NotFound)
        });
        if removed.is_ok() && gone {
            self.release_place(&event.key);
        }
        removed
    }

    fn remove_item(&self, event: &Event) -> Result<Outcome, Failure> {
        if is_scratch(&event.key) {
            // Never mirrored (see `resolve`), so already absent; the scratch directory
            // itself is not the source's to remove.
            return Ok(Outcome::Unchanged);
        }
        let path = self.resolve(&event.key)?;
        let dir = path.parent().expect("resolved paths are below the root");
        self.changing(dir);
        let removed = if event.kind == "dir" {
            match self.in_dir(dir, || fs::remove_dir(&path)) {
                Err(e) if e.raw_os_error() == Some(39) => {
                    // Something remains: deletes not applied yet (another partition's), or
                    // entries the source never had. Never removed with its contents; the
                    // projector tries again after later batches.
                    return Ok(Outcome::Deferred);
                }
                r => r.map(|()| true),
            }
        } else {
            let _place = self.place(&path);
            self.in_dir(dir, || {
                let is_link = fs::symlink_metadata(&path)?.file_type().is_symlink();
                if is_link != (event.kind == "symlink") {
                    return Ok(false);
                }
                fs::remove_file(&path).map(|()| true)
            })
        };
        // Gone already, or another kind of item took its place (a file where the directory
        // was, a directory where the file was, a link where the file was or the reverse,
        // or a file in place of a parent): that item has its own events, and this delete
        // must not remove it. Nothing was deleted, so the outcome is `unchanged`, not
        // `deleted`.
        let outcome = match removed {
            Ok(true) => Outcome::Deleted,
            Ok(false) => return Ok(Outcome::Unchanged),
            Err(e) if e.kind() == ErrorKind::NotFound => Outcome::Unchanged,
            Err(e) if matches!(e.raw_os_error(), Some(20 | 21)) => return Ok(Outcome::Unchanged),
            // A name the target filesystem cannot hold (exFAT: not UTF-8, too long, `*`):
            // its upsert failed, so it is not there.
            Err(e) if unholdable_name(&e) => return Ok(Outcome::Unchanged),
            Err(e) => return Err(e.into()),
        };
        self.safe_dirs.lock().unwrap().remove(&path);
        self.dir_times.lock().unwrap().remove(&path);
        if self.remove_empty_parents {
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == self.root {
                    break;
                }
                let up = d.parent().unwrap_or(d);
                self.changing(up);
                if self.in_dir(up, || fs::remove_dir(d)).is_err() {
                    break;
                }
                if self.folds.get() == Some(&true) {
                    if let Ok(rel) = d.strip_prefix(&self.root) {
                        self.release_place(&pathkey::encode(rel.as_os_str().as_bytes()));
                    }
                }
                self.safe_dirs.lock().unwrap().remove(d);
                dir = d.parent();
            }
        }
        Ok(outcome)
    }

    fn sync(&self) -> Result<(), Failure> {
        self.safe_dirs.lock().unwrap().clear();
        if !self.root.exists() {
            return Ok(());
        }
        // Before the sync, so the times and modes given back are as durable as the batch.
        self.set_dir_times();
        self.close_opened()?;
        let root = File::open(&self.root)?;
        rustix::fs::syncfs(&root).map_err(|e| Failure::Transient(format!("syncfs: {e}")))?;
        // No write is in flight during a flush, so anything left in the temporary directory
        // is debris of a process killed between write and rename; the writer note stays.
        let tmp = self.root.join(TMP_DIR);
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                if e.file_name() != crate::writer::NOTE_FILE {
                    let path = e.path();
                    let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
                }
            }
            let _ = fs::remove_dir(&tmp);
        }
        self.tmp_ready.store(0, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl Target for DirTarget {
    async fn apply(&self, event: &Event, prior: Option<&Applied>) -> Result<Effect, ApplyError> {
        let inner = self.inner.clone();
        let owned = event.clone();
        let prior = prior.cloned();
        let result = self
            .writers
            .run(move || match owned.op {
                Op::Upsert => inner.upsert(&owned, prior.as_ref()),
                Op::Delete => inner.delete(&owned),
            })
            .await
            .unwrap_or_else(|e| Err(Failure::Transient(format!("writer task failed: {e}"))));
        // Where it failed: the key alone does not say which target a message is about.
        let at =
            |message: String| format!("{}: {message}", self.inner.root.join(&event.key).display());
        match result {
            Ok(outcome) => Ok(outcome.into()),
            Err(Failure::Stale) => Ok(Outcome::Stale.into()),
            // One item below a root that can be written must not hold up the others.
            Err(Failure::Denied(message) | Failure::Refused(message))
                if self.inner.item_alone() =>
            {
                Err(ApplyError::Permanent {
                    kind: event.kind.clone(),
                    key: event.key.clone(),
                    message: at(message),
                })
            }
            Err(
                Failure::Transient(message) | Failure::Denied(message) | Failure::Refused(message),
            ) => Err(ApplyError::Transient {
                kind: event.kind.clone(),
                key: event.key.clone(),
                message: at(message),
            }),
            Err(Failure::Permanent(message)) => Err(ApplyError::Permanent {
                kind: event.kind.clone(),
                key: event.key.clone(),
                message,
            }),
            Err(Failure::Taken(holder)) => Err(ApplyError::Taken {
                kind: event.kind.clone(),
                key: event.key.clone(),
                message: format!(
                    "the target directory {} folds the case of names (as exFAT does), and `{holder}`, another source item or its directory, holds this name there; rename one of them in the source, or exclude one (tried again once `{holder}` is gone)",
                    self.inner.root.display()
                ),
                target_id: holder,
            }),
        }
    }

    fn set_claims(&self, claims: Arc<dyn Claims>) {
        let _ = self.inner.claims.set(claims);
    }

    fn still_taken(&self, event: &Event) -> Option<bool> {
        let inner = &self.inner;
        Some(inner.folds.get() == Some(&true) && inner.holder(&event.key).is_some())
    }

    async fn probe(&self, event: &Event) -> Probe {
        let inner = self.inner.clone();
        let event = event.clone();
        tokio::task::spawn_blocking(move || inner.probe(&event))
            .await
            .unwrap_or(Probe::Unknown)
    }

    async fn holds(&self, key: &str) -> Option<Held> {
        let inner = self.inner.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || inner.holds(&key))
            .await
            .ok()
            .flatten()
    }

    /// Also notes the root it finds, as the one this process writes to.
    async fn missing(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        match fs::metadata(&self.inner.root) {
            Err(e) if e.kind() == ErrorKind::NotFound => Some(format!(
                "the target directory {} does not exist",
                self.inner.root.display()
            )),
            Ok(m) if m.is_dir() => {
                self.inner
                    .root_id
                    .lock()
                    .unwrap()
                    .get_or_insert((m.dev(), m.ino()));
                None
            }
            _ => None,
        }
    }

    async fn mounted(&self) -> Option<bool> {
        crate::config::mount_root(&self.inner.root)
    }

    async fn writer_note(&self) -> Option<crate::writer::WriterNote> {
        let root = self.inner.root.clone();
        tokio::task::spawn_blocking(move || crate::writer::read_note(&root))
            .await
            .ok()
            .flatten()
    }

    async fn put_writer_note(&self, note: &crate::writer::WriterNote) -> std::io::Result<()> {
        let (root, note) = (self.inner.root.clone(), note.clone());
        tokio::task::spawn_blocking(move || crate::writer::write_note(&root, &note)).await?
    }

    async fn written(&self, event: &Event) -> bool {
        let inner = self.inner.clone();
        let event = event.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(path) = inner.resolve(&event.key) else {
                return false;
            };
            let Ok(m) = fs::symlink_metadata(&path) else {
                return false;
            };
            m.is_file()
                && event.kind == "file"
                && written_as(&event, &m)
                && inner.same_content(&path, &event).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }

    async fn source_holds(&self, event: &Event) -> bool {
        let inner = self.inner.clone();
        let event = event.clone();
        tokio::task::spawn_blocking(move || inner.source_holds(&event))
            .await
            .unwrap_or(false)
    }

    async fn present(&self, event: &Event) -> Option<bool> {
        let path = self.inner.resolve(&event.key).ok()?;
        tokio::task::spawn_blocking(move || match fs::symlink_metadata(&path) {
            Ok(_) => Some(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Some(false),
            Err(_) => None,
        })
        .await
        .ok()
        .flatten()
    }

    fn identity(&self) -> String {
        format!("dir {}", self.inner.root.display())
    }

    fn one_item_per_path(&self) -> bool {
        true
    }

    fn changed_dirs(&self) -> Vec<String> {
        let inner = &self.inner;
        let timed = inner.dir_times.lock().unwrap();
        inner
            .changed_dirs
            .lock()
            .unwrap()
            .keys()
            .filter(|d| !timed.contains_key(*d))
            .filter_map(|d| d.strip_prefix(&inner.root).ok())
            .map(|rel| pathkey::encode(rel.as_os_str().as_bytes()))
            .collect()
    }

    fn keep_dir_times(&self, times: Vec<(String, i64)>) {
        let inner = &self.inner;
        let mut timed = inner.dir_times.lock().unwrap();
        for (key, ns) in times {
            if let Ok(path) = inner.resolve(&key) {
                timed.entry(path).or_insert(ns);
            }
        }
    }

    async fn flush(&self) -> Result<(), ApplyError> {
        let inner = self.inner.clone();
        let root = inner.root.display().to_string();
        match tokio::task::spawn_blocking(move || inner.sync()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(
                Failure::Transient(message)
                | Failure::Permanent(message)
                | Failure::Denied(message)
                | Failure::Refused(message)
                | Failure::Taken(message),
            )) => Err(ApplyError::Transient {
                kind: "dir".into(),
                key: root,
                message,
            }),
            Ok(Err(Failure::Stale)) => Ok(()),
            Err(e) => Err(ApplyError::Transient {
                kind: "dir".into(),
                key: root,
                message: format!("sync task failed: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use tidemark_proto::SCHEMA_VERSION;

    fn event(key: &str) -> Event {
        let bytes = b"escape attempt".to_vec();
        Event {
            v: SCHEMA_VERSION,
            pipeline: "t".into(),
            partition: 0,
            offset: 0,
            kind: "file".into(),
            key: key.into(),
            op: Op::Upsert,
            checksum: checksum_bytes(&bytes),
            mode: Some(0o644),
            name: None,
            refs: vec![],
            body: Some(Body::Base64(bytes)),
            blob: None,
            mtime_ns: None,
            observed_at: Utc::now(),
            scan: "s".into(),
        }
    }

    #[test]
    fn a_source_that_is_no_longer_a_file_is_stale_and_one_that_refuses_is_the_items_failure() {
        let failure =
            |errno: i32| source_open_failure(&std::io::Error::from_raw_os_error(errno), "d/inner");
        for errno in [2, 20, 40, 21] {
            assert!(matches!(failure(errno), Failure::Stale), "{errno}");
        }
        for errno in [13, 1] {
            let Failure::Permanent(message) = failure(errno) else {
                panic!("{errno}: not the item's failure");
            };
            assert!(
                message.contains("d/inner") && message.contains("source"),
                "{message}"
            );
        }
        assert!(matches!(failure(5), Failure::Transient(_)));
    }

    #[test]
    fn only_errors_of_the_whole_target_are_transient() {
        let failure = |errno: i32| Failure::from(std::io::Error::from_raw_os_error(errno));
        // ENOSPC, EDQUOT, EROFS, EIO, ENOTCONN, EMFILE
        for errno in [28, 122, 30, 5, 107, 24] {
            assert!(matches!(failure(errno), Failure::Transient(_)), "{errno}");
        }
        // ENOSYS, ENOENT, EILSEQ, ENAMETOOLONG, EINVAL, EFBIG
        for errno in [38, 2, 84, 36, 22, 27] {
            assert!(matches!(failure(errno), Failure::Refused(_)), "{errno}");
        }
        assert!(matches!(failure(13), Failure::Denied(_)));
    }

    #[tokio::test]
    async fn keys_never_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let target = DirTarget::new(
            &DirTargetConfig {
                path: root.clone(),
                prune: true,
            },
            false,
        );
        for key in [
            "../escape.txt",
            "a/../../escape.txt",
            "/etc/escape.txt",
            "%2E%2E/escape.txt",
            "",
            "./x",
        ] {
            let err = target.apply(&event(key), None).await.unwrap_err();
            assert!(
                matches!(&err, ApplyError::Permanent { message, .. } if message.contains("outside the target root")),
                "{key}: {err}"
            );
        }
        assert!(!dir.path().join("escape.txt").exists());
        assert!(target.apply(&event("inside/ok.txt"), None).await.is_ok());
        assert_eq!(
            fs::read(root.join("inside/ok.txt")).unwrap(),
            b"escape attempt"
        );
    }

    fn target(root: &Path) -> DirTarget {
        DirTarget::new(
            &DirTargetConfig {
                path: root.to_owned(),
                prune: true,
            },
            false,
        )
    }

    fn with_bytes(key: &str, bytes: &[u8]) -> Event {
        Event {
            checksum: checksum_bytes(bytes),
            body: Some(Body::Base64(bytes.to_vec())),
            ..event(key)
        }
    }

    /// Files left under `.tidemark-tmp/`.
    fn debris(root: &Path) -> Vec<PathBuf> {
        let Ok(shards) = fs::read_dir(root.join(TMP_DIR)) else {
            return vec![];
        };
        shards
            .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// A process killed between opening a read-only directory and its flush leaves the
    /// directory open; the next process's first flush gives it its mode back, and leaves
    /// alone one whose mode was changed since.
    #[tokio::test]
    async fn a_directory_a_killed_process_left_open_gets_its_mode_back() {
        let dir = tempfile::tempdir().unwrap();
        let (ro, changed) = (dir.path().join("ro"), dir.path().join("changed"));
        for d in [&ro, &changed] {
            fs::create_dir(d).unwrap();
            fs::set_permissions(d, Permissions::from_mode(0o755)).unwrap();
        }
        let killed = target(dir.path());
        killed.inner.note_opened(&ro, 0o555);
        killed.inner.note_opened(&changed, 0o555);
        fs::set_permissions(&changed, Permissions::from_mode(0o700)).unwrap();
        drop(killed);

        target(dir.path()).flush().await.unwrap();
        let mode = |d: &Path| fs::metadata(d).unwrap().mode() & 0o7777;
        assert_eq!(mode(&ro), 0o555);
        assert_eq!(mode(&changed), 0o700);
        assert!(!dir.path().join(TMP_DIR).exists());
    }

    /// A process killed after writing a file into a directory, before its flush, leaves
    /// the directory with the time of that write. The next process adopts the file when
    /// the event is replayed, and its flush gives the directory its applied time back.
    #[tokio::test]
    async fn a_directory_a_killed_write_moved_gets_its_time_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        let at = 1_000_000_000_000_000_007;
        let dir_event = Event {
            kind: "dir".into(),
            checksum: checksum_bytes(b""),
            body: None,
            mode: Some(0o755),
            mtime_ns: Some(at),
            ..event("d")
        };
        let first = target(dir.path());
        first.apply(&dir_event, None).await.unwrap();
        first.flush().await.unwrap();
        let time = || mtime_ns(&fs::metadata(&d).unwrap());
        assert_eq!(time(), Some(at));
        let file = with_bytes("d/f.txt", b"written, never flushed");
        first.apply(&file, None).await.unwrap();
        drop(first);
        assert_ne!(time(), Some(at));

        let next = target(dir.path());
        let effect = next.apply(&file, None).await.unwrap();
        assert_eq!(effect.outcome, Outcome::Adopted);
        assert_eq!(next.changed_dirs(), vec!["d".to_string()]);
        next.keep_dir_times(vec![("d".into(), at)]);
        next.flush().await.unwrap();
        assert_eq!(time(), Some(at));
        assert!(
            next.changed_dirs().is_empty(),
            "a flush forgets what it set"
        );
    }

    #[tokio::test]
    async fn a_replaced_file_takes_its_place_and_the_old_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(dir.path());
        target
            .apply(&with_bytes("a.txt", b"old"), None)
            .await
            .unwrap();
        let prior = Applied {
            version: "old".into(),
            offset: 0,
            target_id: None,
        };
        let effect = target
            .apply(&with_bytes("a.txt", b"new content"), Some(&prior))
            .await
            .unwrap();
        assert_eq!(effect.outcome, Outcome::Updated);
        assert_eq!(fs::read(dir.path().join("a.txt")).unwrap(), b"new content");
        assert_eq!(debris(dir.path()), Vec::<PathBuf>::new());
    }

    /// The source turned directory `x` into a file and file `y` into a directory: the old
    /// items' deletes, applied after the new items were written, leave the new ones alone
    /// and count as done (`unchanged`: nothing was deleted), instead of failing (and being
    /// retried) forever.
    #[tokio::test]
    async fn a_delete_that_finds_another_kind_of_item_in_its_place_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(dir.path());
        fs::write(dir.path().join("x"), b"now a file").unwrap();
        fs::create_dir_all(dir.path().join("y/inner")).unwrap();
        for (kind, key) in [("dir", "x"), ("file", "y"), ("file", "x/old.txt")] {
            let delete = Event {
                kind: kind.into(),
                op: Op::Delete,
                body: None,
                ..event(key)
            };
            let effect = target.apply(&delete, None).await.unwrap();
            assert_eq!(effect.outcome, Outcome::Unchanged, "{kind} {key}");
        }
        assert_eq!(fs::read(dir.path().join("x")).unwrap(), b"now a file");
        assert!(dir.path().join("y/inner").is_dir());
    }

    #[test]
    fn a_directory_that_took_a_files_place_is_put_back_not_swapped_away() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(dir.path());
        let inner = &target.inner;
        let path = dir.path().join("x");
        fs::write(&path, b"file").unwrap();
        let was_a_file = fs::symlink_metadata(&path).unwrap();
        // Between the lstat and the swap, someone replaces the file by a directory.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep.txt"), b"theirs").unwrap();
        let tmp = inner.tmp_path().unwrap();
        fs::write(&tmp, b"ours").unwrap();

        let err = inner.replace(&tmp, &path, Some(&was_a_file)).unwrap_err();
        assert!(
            matches!(&err, Failure::Permanent(m) if m.contains("a directory took the file's place")),
            "{err:?}"
        );
        assert_eq!(fs::read(path.join("keep.txt")).unwrap(), b"theirs");
        assert_eq!(debris(dir.path()), Vec::<PathBuf>::new());
        // The flush that empties `.tidemark-tmp/` leaves it alone.
        inner.sync().unwrap();
        assert_eq!(fs::read(path.join("keep.txt")).unwrap(), b"theirs");
    }

    #[tokio::test]
    async fn a_file_waits_while_a_directory_holds_its_place_and_fails_without_prune() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("d/sub")).unwrap();
        fs::write(dir.path().join("d/sub/f"), b"old").unwrap();
        let file = with_bytes("d", b"now a file");

        let no_prune = DirTarget::new(
            &DirTargetConfig {
                path: dir.path().to_owned(),
                prune: false,
            },
            false,
        );
        let err = no_prune.apply(&file, None).await.unwrap_err();
        assert!(
            matches!(&err, ApplyError::Permanent { message, .. } if message.contains("prune = false")),
            "{err}"
        );

        let target = target(dir.path());
        let effect = target.apply(&file, None).await.unwrap();
        assert_eq!(effect.outcome, Outcome::Deferred);
        assert_eq!(fs::read(dir.path().join("d/sub/f")).unwrap(), b"old");
        assert_eq!(debris(dir.path()), Vec::<PathBuf>::new());

        // Once the deletes of its contents emptied it, the file takes its place.
        fs::remove_file(dir.path().join("d/sub/f")).unwrap();
        fs::remove_dir(dir.path().join("d/sub")).unwrap();
        let effect = target.apply(&file, None).await.unwrap();
        assert_eq!(effect.outcome, Outcome::Updated);
        assert_eq!(fs::read(dir.path().join("d")).unwrap(), b"now a file");
    }
}
