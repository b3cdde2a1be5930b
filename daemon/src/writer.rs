//! The writer note: which state last projected into a directory target, and how recently.
//!
//! A state restored from a backup, or one of two copies of a state used in turn, has not
//! seen what the newer history did to the target: files it wrote that the source deleted
//! since, files it deleted that the source has again as they were. Nothing in the state
//! tells, so the target keeps a small note of its last writer (`.tidemark-tmp/written-by`),
//! written at every commit that changed the target, and the state keeps what it last wrote
//! there ([`WriterMark`]); a projector compares the two before it applies anything.

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::target::fs::TMP_DIR;

/// The note's file name, in the target's `.tidemark-tmp/`.
pub const NOTE_FILE: &str = "written-by";

/// What a state keeps of its pipeline's last commit that changed the target (tree
/// `writer-marks`, keyed by pipeline), and what it writes into the target's note with
/// [`WriterNote`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterMark {
    /// The id of this pipeline's history in this state, made at its first mark: a copy
    /// of the state directory (a backup) keeps it, another state has another.
    pub state: String,
    /// Commits of that history that changed the target so far: a copy restored from a
    /// backup has fewer than the note the newer history left. Kept as `run`, which it
    /// counted when a mark was taken once per projecting run (the counts go on from
    /// there).
    #[serde(rename = "run")]
    pub commits: u64,
    /// The last commit's own token: two copies that each made one commit more have the
    /// same count and differ here.
    pub token: String,
    /// The token of the note that was on the target when this mark was taken (that of the
    /// mark before when none could be read; empty without either): the state is flushed
    /// with its new mark before the note is written, so a crash in between leaves that
    /// note, which is then still this state's. `None` in a mark of an earlier version,
    /// which did not keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

impl WriterMark {
    /// The mark of the commit after `last` (a new history id when there is none), taken
    /// while the target's note has the token `on_target` (empty: no note).
    pub fn next(last: Option<&WriterMark>, on_target: &str) -> WriterMark {
        WriterMark {
            state: last.map_or_else(fresh_id, |m| m.state.clone()),
            commits: last.map_or(1, |m| m.commits + 1),
            token: fresh_id(),
            prev: Some(on_target.to_owned()),
        }
    }
}

/// The note a directory target keeps of the state that last projected into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterNote {
    /// That state's mark for the commit that wrote it.
    #[serde(flatten)]
    pub mark: WriterMark,
    /// The pipeline, as that state names it.
    pub pipeline: String,
    /// That state's directory, as its process saw it: where a person finds it.
    pub state_dir: PathBuf,
    /// When the note was written (just after that commit).
    pub at: DateTime<Utc>,
}

impl WriterNote {
    /// Who wrote the target, for people: the state directory, pipeline, commit and time.
    pub fn describe(&self) -> String {
        format!(
            "commit {} of pipeline `{}` of the state in {} ({})",
            self.mark.commits,
            self.pipeline,
            self.state_dir.display(),
            self.at.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// How the target's note stands to this state's mark ([`judge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// No note (a target written by an older version, or never): nothing to tell.
    Unnoted,
    /// This state wrote the target last (or its note did not reach the disk).
    Ours,
    /// This state's history wrote it, in a commit this state has not seen: the state is
    /// older than the target (restored from a backup, or a copy used elsewhere too).
    Behind(Box<WriterNote>),
    /// Another state (or this state's pipeline under another name) wrote it.
    Other(Box<WriterNote>),
}

/// How the target's `note` stands to the state's `mark`. The note of the mark, and the
/// note that was on the target when the mark was taken (the state is flushed with its new
/// mark before the note is written, so a crash in between leaves that one), are this
/// state's; any other note of its history is one this state has not seen: a newer commit
/// of a backup's history, or a commit of another copy, which may count fewer than this
/// one (two copies used in turn). A mark of an earlier version, which kept no such token,
/// takes a note of its own history exactly one behind as its own.
pub fn judge(note: Option<WriterNote>, mark: Option<&WriterMark>) -> Written {
    let Some(note) = note else {
        return Written::Unnoted;
    };
    let Some(m) = mark else {
        return Written::Other(Box::new(note));
    };
    let theirs = &note.mark;
    if theirs.token == m.token || m.prev.as_deref() == Some(theirs.token.as_str()) {
        return Written::Ours;
    }
    if theirs.state != m.state {
        return Written::Other(Box::new(note));
    }
    if m.prev.is_none() && theirs.commits + 1 == m.commits {
        return Written::Ours;
    }
    Written::Behind(Box::new(note))
}

impl Written {
    /// The note of a writer that is not this state.
    pub fn elsewhere(&self) -> Option<&WriterNote> {
        match self {
            Written::Behind(n) | Written::Other(n) => Some(n),
            Written::Unnoted | Written::Ours => None,
        }
    }

    /// Why a projection from this state, with applied state, would do harm to `target`,
    /// and what to do (`None` when it would not): [`crate::projector::ProjectError::WrittenElsewhere`].
    pub fn refusal(
        &self,
        pipeline: &str,
        target: &str,
        mark: Option<&WriterMark>,
    ) -> Option<String> {
        let seen = mark.map_or(0, |m| m.commits);
        let (what, other) = match self {
            Written::Behind(n) if n.mark.commits >= seen => (
                format!(
                    "this state is older than the target: {target} was last written by {}, and this state has seen {seen} such commit(s). Restored from a backup, or a copy of the state used elsewhere too? What those newer commits did is not in this state",
                    n.describe()
                ),
                "put the newer state back in its place",
            ),
            Written::Behind(n) => (
                format!(
                    "this state is older than the target: {target} was last written by {}, a commit of another copy of this state that this one has not seen (this state has made {seen} of its own). Two copies of the state used in turn (a backup put back and used, then the other copy)? What that copy did is not in this state",
                    n.describe()
                ),
                "put the state that wrote the target last back in its place",
            ),
            Written::Other(n) => (
                format!(
                    "another state projected into {target} after this one: {}. Two states on one target (a config reached through a symbolic link resolves a relative `state_dir` beside the link; two configs naming one target)? What that state did is not in this one",
                    n.describe()
                ),
                "point `state_dir` at the state that wrote the target last",
            ),
            Written::Unnoted | Written::Ours => return None,
        };
        Some(format!(
            "pipeline `{pipeline}`: {what}: files that history wrote that the source has deleted since would stay on the target for good, and files it deleted that the source has again as they were would never be written back. Nothing is applied until this is settled: {other}; or, to go on from this state, run `tidemark replay --pipeline {pipeline} --from 0` and then `tidemark sync` (equal files are adopted, not rewritten), then `tidemark verify`: the extra entries it says were never listed in the source are those only the other history wrote (remove them by hand if they should go)"
        ))
    }
}

/// The note in the directory target `root`; `None` when there is none, or it cannot be
/// read or parsed (taken as none: a target written by an older version has none).
pub fn read_note(root: &Path) -> Option<WriterNote> {
    let bytes = std::fs::read(root.join(TMP_DIR).join(NOTE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `note` into the directory target `root`, in place of the last one in one step
/// (written beside it, then renamed over it). Not synced here: the next commit's `syncfs`
/// makes it durable, before that commit's state write, and a note lost to a power cut
/// leaves the one before, whose token the state's mark keeps ([`WriterMark::prev`]), which
/// [`judge`] takes as this state's.
pub fn write_note(root: &Path, note: &WriterNote) -> std::io::Result<()> {
    let dir = root.join(TMP_DIR);
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let part = dir.join(format!("{NOTE_FILE}.{}", std::process::id()));
    std::fs::write(&part, serde_json::to_vec(note)?)?;
    std::fs::rename(&part, dir.join(NOTE_FILE))
}

/// A new random id (16 hex digits): the process's randomly seeded hasher, the time and
/// the pid, hashed.
fn fresh_id() -> String {
    let seeded = std::collections::hash_map::RandomState::new().hash_one(0u8);
    let mut h = blake3::Hasher::new();
    h.update(&seeded.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    h.update(&now.to_le_bytes());
    h.finalize().to_hex()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(mark: &WriterMark) -> WriterNote {
        WriterNote {
            mark: mark.clone(),
            pipeline: "t".into(),
            state_dir: "/s".into(),
            at: Utc::now(),
        }
    }

    /// A restored backup is behind the note its newer history left; two copies that each
    /// made a commit are told apart by the token; another state is another; no note tells
    /// nothing, and the note that was on the target when the mark was taken (a crash
    /// before the new one was written) is ours.
    #[test]
    fn the_note_is_judged_against_the_states_mark() {
        let five = WriterMark::next(None, "");
        let six = WriterMark::next(Some(&five), &five.token);
        assert_eq!(six.state, five.state);
        assert_eq!(judge(None, Some(&five)), Written::Unnoted);
        assert_eq!(judge(Some(note(&six)), Some(&six)), Written::Ours);
        assert_eq!(judge(Some(note(&five)), Some(&six)), Written::Ours);
        assert!(matches!(
            judge(Some(note(&six)), Some(&five)),
            Written::Behind(_)
        ));
        let copy = WriterMark::next(Some(&five), &five.token);
        assert!(matches!(
            judge(Some(note(&six)), Some(&copy)),
            Written::Behind(_)
        ));
        let other = WriterMark::next(None, "");
        assert!(matches!(
            judge(Some(note(&six)), Some(&other)),
            Written::Other(_)
        ));
        assert!(matches!(judge(Some(note(&six)), None), Written::Other(_)));
        // A state that took the target over (nothing applied) and crashed before its
        // note was written: the other state's note is still there.
        let taking = WriterMark::next(None, &six.token);
        assert_eq!(judge(Some(note(&six)), Some(&taking)), Written::Ours);
    }

    /// Two copies of one state used in turn: the one with more commits is not taken for
    /// the writer of an older note of its history that the other copy wrote.
    #[test]
    fn a_copy_with_more_commits_is_behind_the_other_copys_note() {
        let one = WriterMark::next(None, "");
        let two = WriterMark::next(Some(&one), &one.token);
        let three = WriterMark::next(Some(&two), &two.token);
        let their_two = WriterMark::next(Some(&one), &three.token);
        let Written::Behind(n) = judge(Some(note(&their_two)), Some(&three)) else {
            panic!("a diverged copy's note is not this state's");
        };
        let why = Written::Behind(n).refusal("t", "/d", Some(&three)).unwrap();
        assert!(why.contains("another copy of this state"), "{why}");
        // A mark of an earlier version kept no token of the note before it: a note of
        // its history one behind is still its own, two behind is not.
        let old = WriterMark {
            prev: None,
            ..three.clone()
        };
        assert_eq!(judge(Some(note(&two)), Some(&old)), Written::Ours);
        assert!(matches!(
            judge(Some(note(&one)), Some(&old)),
            Written::Behind(_)
        ));
        let parsed: WriterMark =
            serde_json::from_str(r#"{"state":"a","run":2,"token":"b"}"#).unwrap();
        assert_eq!(parsed.prev, None);
    }
}
