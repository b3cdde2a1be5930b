//! Conditions a daemon meets again and again (a target down, files it cannot read, a
//! delete guard that trips): logged when they begin, at debug while they repeat, as a
//! warning when they change, and (by the caller) at info when they clear. A whole
//! round's condition is a [`Recurring`]; items that each keep failing on their own (an
//! item the target refuses at every retry) are a [`Failing`].

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;

/// How a condition [`Recurring::met`] stands against the rounds before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Nothing was met in the last round or this one so far: logged at the condition's
    /// own level (error or warning).
    Began,
    /// Something else was met in the last round or this one: logged as a warning.
    Changed,
    /// Met in the last round (or already in this one): logged at debug.
    Again,
}

/// What a repeated check (a scan, a retry of a batch) met in its last round and in the one
/// running, so that a daemon left for a night in the same trouble logs it once, not at
/// every round. A round's "what" is any key: one error's text, a set of items, an entry
/// that cannot be read. Counters and `status` still see every round.
#[derive(Debug)]
pub struct Recurring<K> {
    rounds: Mutex<Rounds<K>>,
}

#[derive(Debug)]
struct Rounds<K> {
    /// What the last ended round met.
    last: HashSet<K>,
    /// What the round running has met so far.
    this: HashSet<K>,
}

impl<K> Default for Recurring<K> {
    fn default() -> Self {
        Recurring {
            rounds: Mutex::new(Rounds {
                last: HashSet::new(),
                this: HashSet::new(),
            }),
        }
    }
}

impl<K: Eq + Hash> Recurring<K> {
    /// Notes that the running round met `key`, and says how to log it.
    pub fn met(&self, key: K) -> Seen {
        let mut r = self.rounds.lock().unwrap();
        let seen = if r.last.contains(&key) || r.this.contains(&key) {
            Seen::Again
        } else if r.last.is_empty() && r.this.is_empty() {
            Seen::Began
        } else {
            Seen::Changed
        };
        r.this.insert(key);
        seen
    }

    /// Ends the running round; returns whether it cleared the condition: the round before
    /// met something, this one nothing (the caller logs that at info).
    pub fn end_round(&self) -> bool {
        let mut r = self.rounds.lock().unwrap();
        let this = std::mem::take(&mut r.this);
        let cleared = !r.last.is_empty() && this.is_empty();
        r.last = this;
        cleared
    }
}

/// Items that each keep failing on their own (an item the target refuses at every retry
/// of the failed items, one that rests after a 500 and meets it again), so that a daemon
/// left for a night with one such item logs its failure when it begins, when its error
/// changes and (by the caller) when it clears, not at every retry. Holds only the items
/// failing now: [`Failing::cleared`] forgets one that went through, [`Failing::retain`]
/// those that left otherwise (another daemon's now, superseded).
#[derive(Debug)]
pub struct Failing<K> {
    items: Mutex<HashMap<K, Failed>>,
}

/// What [`Failing`] keeps of an item failing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// Its last error, as compared with the next one: without what differs from one try
    /// to the next of the same failure (a give-up's attempts and time).
    pub error: String,
    /// When the first failure in a row was met.
    pub since: chrono::DateTime<chrono::Utc>,
    /// Failed tries in a row.
    pub tries: u64,
}

impl<K> Default for Failing<K> {
    fn default() -> Self {
        Failing {
            items: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash> Failing<K> {
    /// Notes that `key` failed with `error`, and says how to log it: [`Seen::Began`] for
    /// an item not failing before, [`Seen::Changed`] for another error than its last,
    /// [`Seen::Again`] for the same.
    pub fn failed(&self, key: K, error: String) -> Seen {
        let mut items = self.items.lock().unwrap();
        match items.get_mut(&key) {
            Some(f) => {
                f.tries += 1;
                if f.error == error {
                    Seen::Again
                } else {
                    f.error = error;
                    Seen::Changed
                }
            }
            None => {
                items.insert(
                    key,
                    Failed {
                        error,
                        since: chrono::Utc::now(),
                        tries: 1,
                    },
                );
                Seen::Began
            }
        }
    }

    /// Forgets `key`, which went through; returns its failure if it was failing (the
    /// caller logs that it cleared).
    pub fn cleared<Q>(&self, key: &Q) -> Option<Failed>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut items = self.items.lock().unwrap();
        if items.is_empty() {
            return None;
        }
        items.remove(key)
    }

    /// Forgets the items `failing` no longer holds: they left without going through.
    pub fn retain(&self, mut failing: impl FnMut(&K) -> bool) {
        self.items.lock().unwrap().retain(|k, _| failing(k));
    }
}

/// Logs `$message` as [`Seen`] says: at `$began` (`error` or `warn`) when the condition
/// begins, as a warning when it changes, at debug while it repeats. `$field`s are those of
/// `tracing` (`pipeline = %name,`, trailing comma included).
macro_rules! log_recurring {
    ($seen:expr, $began:ident, [$($field:tt)*], $message:expr) => {
        match $seen {
            $crate::recurring::Seen::Began => tracing::$began!($($field)* "{}", $message),
            $crate::recurring::Seen::Changed => tracing::warn!($($field)* "{}", $message),
            $crate::recurring::Seen::Again => {
                tracing::debug!($($field)* "{} (still; logged when it began)", $message)
            }
        }
    };
}
pub(crate) use log_recurring;

#[cfg(test)]
mod tests {
    use super::*;

    /// One error at every round is news once; another error is a change; a round without
    /// any clears it, and the same error after that begins anew.
    #[test]
    fn a_condition_is_news_when_it_begins_or_changes_and_clears_once() {
        let r = Recurring::default();
        assert_eq!(r.met("down"), Seen::Began);
        assert!(!r.end_round());
        for _ in 0..3 {
            assert_eq!(r.met("down"), Seen::Again);
            assert!(!r.end_round());
        }
        assert_eq!(r.met("disk full"), Seen::Changed);
        assert_eq!(r.met("down"), Seen::Again, "met in the round before");
        assert!(!r.end_round());
        assert!(r.end_round(), "a round that met nothing clears it");
        assert!(!r.end_round(), "cleared once");
        assert_eq!(r.met("down"), Seen::Began);
    }

    /// Each item's failure is news when it begins and when its error changes; another
    /// item failing is news of its own; an item cleared or left is forgotten.
    #[test]
    fn an_items_failure_is_news_when_it_begins_or_changes_and_is_forgotten_once_over() {
        let f = Failing::default();
        assert_eq!(f.failed("a", "500".into()), Seen::Began);
        assert_eq!(f.failed("a", "500".into()), Seen::Again);
        assert_eq!(f.failed("b", "500".into()), Seen::Began, "its own");
        assert_eq!(f.failed("a", "422".into()), Seen::Changed);
        let a = f.cleared("a").expect("a was failing");
        assert_eq!((a.error.as_str(), a.tries), ("422", 3));
        assert_eq!(f.cleared("a"), None, "cleared once");
        assert_eq!(f.failed("a", "422".into()), Seen::Began, "begins anew");
        f.retain(|k| *k != "b");
        assert_eq!(
            f.failed("b", "500".into()),
            Seen::Began,
            "b left, forgotten"
        );
    }
}
