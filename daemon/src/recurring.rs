//! Conditions a daemon meets again and again (a target down, files it cannot read, a
//! delete guard that trips): logged when they begin, at debug while they repeat, as a
//! warning when they change, and (by the caller) at info when they clear.

use std::collections::HashSet;
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
}
