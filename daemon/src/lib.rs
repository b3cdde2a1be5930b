//! tidemark: an event-sourced sync daemon that keeps a target a faithful mirror of a source.
//!
//! # Layout
//!
//! - [`blocking`]: blocking file-system work handed to pool threads in runs.
//! - [`config`]: the TOML config: raw parsed types, validation, errors naming file, line and key.
//! - [`state`]: the sled database of local state: source index, applied state, scan records.
//! - [`log`]: the [`log::EventLog`] trait (append, read, tail, head, committed offsets) and its backends.
//! - [`source`]: the [`source::Source`] trait (streaming listing, item content) and its connectors.
//! - [`target`]: the [`target::Target`] trait (apply one event, durability barrier) and its connectors.
//! - [`scanner`]: listing → diff against the source index → events appended to the log.
//! - [`projector`]: events → target, applied state, committed offset.
//! - [`pipeline`]: one configured pipeline wired together: its log, scanner, projector, status.
//! - [`http`]: the REST connector's HTTP client: secret headers, retries, rate limits, redaction.
//! - [`http_config`]: the REST connector's config types and secret resolution.
//! - [`daemon`]: `tidemark run`: every pipeline's loops, the HTTP endpoints, shutdown order.
//! - [`metrics`]: every Prometheus metric, defined once.
//! - [`server`]: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`verify`]: `tidemark verify`: source and target compared item by item.
//! - [`progress`]: progress bars on a terminal, silence when piped; log lines kept above the bars.
//! - [`report`]: `report.json` and `summary.txt` of every run and changed daemon cycle.
//! - [`recurring`]: conditions met round after round, logged when they begin, change, clear.
//! - [`writer`]: the note a directory target keeps of the state that last projected into it.
//!
//! The flow and its guarantees are described in `docs/ARCHITECTURE.md`.
#![deny(missing_docs)]

pub mod blocking;
pub mod config;
pub mod daemon;
pub mod http;
pub mod http_config;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod progress;
pub mod projector;
pub mod recurring;
pub mod report;
pub mod scanner;
pub mod server;
pub mod source;
pub mod state;
pub mod target;
pub mod verify;
pub mod writer;

pub use tidemark_proto as proto;
