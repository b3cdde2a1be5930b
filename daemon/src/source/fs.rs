//! The directory source: a streaming walk of a tree with include/exclude globs, a quick
//! check (size, mtime, inode, mode) so unchanged files are not re-hashed, and streaming
//! blake3 of changed files.
//!
//! Keys are paths relative to the root, `/`-separated, encoded with
//! [`tidemark_proto::pathkey`] so non-UTF-8 names survive. Directories are items of kind
//! `dir` (so empty directories and their modes are mirrored), symbolic links are items of
//! kind `symlink` carrying their target path unless `follow_symlinks` is on, and special
//! files (FIFOs, sockets, devices) are skipped with a warning.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use globset::{Glob, GlobSet, GlobSetBuilder};
use tidemark_proto::{checksum_bytes, pathkey, Blob, Body, ChecksumWriter};
use tokio::sync::mpsc;

use super::{Entry, FetchError, Item, ListError, ListStream, Listing, Source};
use crate::config::DirSourceConfig;

/// Size of the buffer files are read through; large files are streamed, never loaded.
const READ_BUF: usize = 256 * 1024;

/// A directory tree as a [`Source`].
pub struct DirSource {
    inner: Arc<Walker>,
    inline_limit: u64,
}

struct Walker {
    root: PathBuf,
    /// `None` means everything is included.
    include: Option<GlobSet>,
    exclude: GlobSet,
    follow_symlinks: bool,
}

fn globset(globs: &[String]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).expect("globs are checked when the config is loaded"));
    }
    b.build().expect("a set of valid globs builds")
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

impl DirSource {
    /// A source over `cfg.path`; files up to `inline_limit` bytes are carried inline.
    pub fn new(cfg: &DirSourceConfig, inline_limit: u64) -> DirSource {
        DirSource {
            inner: Arc::new(Walker {
                root: cfg.path.clone(),
                include: (!cfg.include.is_empty()).then(|| globset(&cfg.include)),
                exclude: globset(&cfg.exclude),
                follow_symlinks: cfg.follow_symlinks,
            }),
            inline_limit,
        }
    }

    /// Root of the tree.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

impl Walker {
    fn walk(&self, tx: &mpsc::Sender<Result<Listing, ListError>>) {
        let send = |item| tx.blocking_send(item).is_ok();
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                send(Err(ListError::Root {
                    message: format!("source {} is not a directory", self.root.display()),
                }));
                return;
            }
            Err(e) => {
                send(Err(ListError::Root {
                    message: format!(
                        "source directory {} cannot be read: {e}; check source.dir.path in the config and that the directory is mounted",
                        self.root.display()
                    ),
                }));
                return;
            }
        }
        let mut walk = walkdir::WalkDir::new(&self.root)
            .min_depth(1)
            .follow_links(self.follow_symlinks)
            .into_iter();
        while let Some(next) = walk.next() {
            let entry = match next {
                Ok(entry) => entry,
                Err(e) => {
                    let key = e.path().map(|p| key_of(&self.root, p)).unwrap_or_default();
                    let message = match e.loop_ancestor() {
                        Some(a) => format!("symbolic link loop back to {}", a.display()),
                        None => e
                            .io_error()
                            .map_or_else(|| e.to_string(), |io| io.to_string()),
                    };
                    if !send(Err(ListError::Entry { key, message })) {
                        return;
                    }
                    continue;
                }
            };
            let key = key_of(&self.root, entry.path());
            let ft = entry.file_type();
            if self.exclude.is_match(
                entry
                    .path()
                    .strip_prefix(&self.root)
                    .unwrap_or(entry.path()),
            ) {
                if ft.is_dir() {
                    walk.skip_current_dir();
                }
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(&self.root)
                .unwrap_or(entry.path());
            let included = self.include.as_ref().is_none_or(|g| g.is_match(rel));
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    if !send(Err(ListError::Entry {
                        key,
                        message: e.to_string(),
                    })) {
                        return;
                    }
                    continue;
                }
            };
            let listing = if ft.is_dir() {
                if self.include.is_some() {
                    continue;
                }
                Listing::Entry(Entry {
                    kind: "dir".into(),
                    key,
                    fingerprint: Some(format!("d:{:o}", meta.mode() & 0o777)),
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
                        meta.mode() & 0o777
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
            if !send(Ok(listing)) {
                return;
            }
        }
    }
}

#[async_trait]
impl Source for DirSource {
    fn list(&self) -> ListStream {
        let (tx, rx) = mpsc::channel(1024);
        let walker = self.inner.clone();
        tokio::task::spawn_blocking(move || walker.walk(&tx));
        Box::pin(tokio_stream_from(rx))
    }

    async fn fetch(&self, entry: Entry) -> Result<Item, FetchError> {
        let walker = self.inner.clone();
        let inline_limit = self.inline_limit;
        let key = entry.key.clone();
        tokio::task::spawn_blocking(move || read_item(&walker.root, entry, inline_limit))
            .await
            .unwrap_or_else(|e| {
                Err(FetchError::Entry {
                    key,
                    message: format!("reader task failed: {e}"),
                })
            })
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn read_item(root: &Path, entry: Entry, inline_limit: u64) -> Result<Item, FetchError> {
    let err = |message: String| FetchError::Entry {
        key: entry.key.clone(),
        message,
    };
    let path = path_of(root, &entry.key).ok_or_else(|| err("not a valid path key".into()))?;
    let mut item = Item {
        kind: entry.kind.clone(),
        key: entry.key.clone(),
        checksum: String::new(),
        mode: None,
        name: None,
        refs: vec![],
        body: None,
        blob: None,
    };
    match entry.kind.as_str() {
        "dir" => {
            let meta = std::fs::metadata(&path).map_err(|e| err(e.to_string()))?;
            item.checksum = checksum_bytes(b"");
            item.mode = Some(meta.mode() & 0o777);
        }
        "symlink" => {
            let target = std::fs::read_link(&path).map_err(|e| err(e.to_string()))?;
            let bytes = target.as_os_str().as_bytes().to_vec();
            item.checksum = checksum_bytes(&bytes);
            item.body = Some(Body::Base64(bytes));
        }
        _ => {
            let mut file = File::open(&path).map_err(|e| err(e.to_string()))?;
            let meta = file.metadata().map_err(|e| err(e.to_string()))?;
            let (checksum, size, bytes) = hash_reader(&mut file, meta.len() <= inline_limit)
                .map_err(|e| err(e.to_string()))?;
            item.checksum = checksum;
            item.mode = Some(meta.mode() & 0o777);
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

/// Streams a reader through blake3; keeps the bytes when `keep` is set.
pub fn hash_reader(
    reader: &mut impl Read,
    keep: bool,
) -> std::io::Result<(String, u64, Option<Vec<u8>>)> {
    let mut hasher = ChecksumWriter::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut kept = keep.then(Vec::new);
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
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
}
