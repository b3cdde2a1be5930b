//! What librdkafka says on its own: its log lines and client errors, logged once per kind
//! instead of several times a second.
//!
//! librdkafka retries a broker it cannot reach every few hundred milliseconds, and every
//! client of a log (producer, readers, offset clients, admin) reports each attempt: with
//! the broker down, a one-shot `sync` printed about 250 `AllBrokersDown` and "connection
//! refused" lines before its own error. Here the first line of each kind (librdkafka's
//! facility, or the error code) is logged at warn, its repeats at debug, and the kind is
//! warned about again once it has been quiet for [`REPEAT_AFTER`], so a daemon still says
//! so when the broker goes away again an hour later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use tracing::{debug, warn};

/// How long a kind of message must have been quiet before it is warned about again.
const REPEAT_AFTER: Duration = Duration::from_secs(300);

/// The context of every client of one [`super::KafkaLog`]; clones share what they saw.
#[derive(Clone)]
pub(super) struct LogContext {
    shared: Arc<Shared>,
}

struct Shared {
    /// The configured bootstrap brokers, named in every line.
    brokers: String,
    /// Per kind of message, when it was last seen; a kind seen within [`REPEAT_AFTER`]
    /// is logged at debug.
    seen: Mutex<HashMap<String, Instant>>,
}

impl LogContext {
    /// A context for the clients of a log on `brokers`.
    pub(super) fn new(brokers: &str) -> LogContext {
        LogContext {
            shared: Arc::new(Shared {
                brokers: brokers.to_owned(),
                seen: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether a line of `kind` is to be logged at warn now (else at debug).
    fn first(&self, kind: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.shared.seen.lock().unwrap();
        seen.insert(kind.to_owned(), now)
            .is_none_or(|last| now.duration_since(last) >= REPEAT_AFTER)
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let brokers = &self.shared.brokers;
        let serious = (level as i32) <= (RDKafkaLogLevel::Warning as i32);
        if serious && self.first(&format!("log {fac}")) {
            warn!(%brokers, "Kafka client: {fac} {message} (repeats are logged at debug level)");
        } else {
            debug!(%brokers, "Kafka client: {fac} {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let kind = match code {
            Some(c) => format!("error {c:?}"),
            None => format!("error {error}"),
        };
        let brokers = &self.shared.brokers;
        if self.first(&kind) {
            warn!(%brokers, "Kafka client: {error}: {reason} (repeats are logged at debug level)");
        } else {
            debug!(%brokers, "Kafka client: {error}: {reason}");
        }
    }
}

impl ConsumerContext for LogContext {}
