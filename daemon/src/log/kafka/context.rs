//! What librdkafka says on its own: its log lines and client errors, logged once per kind
//! instead of several times a second, and the brokers' reachability as the clients see it.
//!
//! librdkafka retries a broker it cannot reach every few hundred milliseconds, and every
//! client of a log (producer, readers, offset clients, admin) reports each attempt: with
//! the broker down, a one-shot `sync` printed about 250 `AllBrokersDown` and "connection
//! refused" lines before its own error. Here the first line of each kind (librdkafka's
//! facility, or the error code) is logged at warn, its repeats at debug, and the kind is
//! warned about again once it has been quiet for [`REPEAT_AFTER`], so a daemon still says
//! so when the broker goes away again an hour later.
//!
//! The context also keeps what a one-shot command needs to give up early and say why: how
//! many times a client reported every broker down, and the last connection failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::log::Patience;

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
    /// A one-shot command's own error names unreachable brokers and why: librdkafka's
    /// connection failures are logged at debug only.
    quiet_connect_failures: bool,
    /// Per kind of message, when it was last seen; a kind seen within [`REPEAT_AFTER`]
    /// is logged at debug.
    seen: Mutex<HashMap<String, Instant>>,
    /// The last client error other than "every broker is down" (a refused connection, an
    /// answer that is no Kafka protocol), without librdkafka's timing suffix.
    last_failure: Mutex<Option<String>>,
    /// Whether that error was an authentication failure (a SASL handshake or credentials
    /// the broker refused): the broker answered, so "cannot reach" would send the user to
    /// the wrong setting.
    auth_failed: Mutex<bool>,
    /// How many times a client reported every broker down.
    all_down: watch::Sender<u64>,
}

impl LogContext {
    /// A context for the clients of a log on `brokers`.
    pub(super) fn new(brokers: &str, patience: Patience) -> LogContext {
        LogContext {
            shared: Arc::new(Shared {
                brokers: brokers.to_owned(),
                quiet_connect_failures: patience == Patience::OneShot,
                seen: Mutex::new(HashMap::new()),
                last_failure: Mutex::new(None),
                auth_failed: Mutex::new(false),
                all_down: watch::channel(0).0,
            }),
        }
    }

    /// Follows the count of "every broker is down" reports.
    pub(super) fn all_down(&self) -> watch::Receiver<u64> {
        self.shared.all_down.subscribe()
    }

    /// The last client error other than "every broker is down", such as
    /// `127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused`.
    pub(super) fn last_failure(&self) -> Option<String> {
        self.shared.last_failure.lock().unwrap().clone()
    }

    /// Whether [`LogContext::last_failure`] is the brokers refusing to authenticate this
    /// client (librdkafka's `Authentication`, `SaslAuthenticationFailed`,
    /// `UnsupportedSASLMechanism`, `IllegalSASLState`).
    pub(super) fn auth_failed(&self) -> bool {
        *self.shared.auth_failed.lock().unwrap()
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
        let serious = (level as i32) <= (RDKafkaLogLevel::Warning as i32)
            && !(fac == "FAIL" && self.shared.quiet_connect_failures);
        if serious && self.first(&format!("log {fac}")) {
            warn!(%brokers, "Kafka client: {fac} {message} (repeats are logged at debug level)");
        } else {
            debug!(%brokers, "Kafka client: {fac} {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.shared.all_down.send_modify(|n| *n += 1);
        } else {
            // "… Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in
            // state CONNECT)": why the broker that went down last did.
            let reason = reason.split(" (after ").next().unwrap_or(reason);
            *self.shared.last_failure.lock().unwrap() = Some(reason.to_owned());
            *self.shared.auth_failed.lock().unwrap() = matches!(
                code,
                Some(
                    RDKafkaErrorCode::Authentication
                        | RDKafkaErrorCode::SaslAuthenticationFailed
                        | RDKafkaErrorCode::UnsupportedSASLMechanism
                        | RDKafkaErrorCode::IllegalSASLState
                )
            );
        }
        let connect_failure = matches!(
            code,
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown)
        );
        let quiet = connect_failure && self.shared.quiet_connect_failures;
        let kind = match code {
            Some(c) => format!("error {c:?}"),
            None => format!("error {error}"),
        };
        let brokers = &self.shared.brokers;
        if self.first(&kind) && !quiet {
            warn!(%brokers, "Kafka client: {error}: {reason} (repeats are logged at debug level)");
        } else {
            debug!(%brokers, "Kafka client: {error}: {reason}");
        }
    }
}

impl ConsumerContext for LogContext {}
