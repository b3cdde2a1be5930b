//! The TOML config: the raw types serde parses, the validated types that build the
//! components, and errors that name the file, the line and the key.
//!
//! Relative paths are resolved against the directory of the config file, so a config works
//! the same from any working directory (and under systemd).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

pub use crate::http_config::{ApiSecrets, HttpSourceConfig, HttpTargetConfig};
use crate::http_config::{At, Refused};

/// What to do about a config file that is not there: where it was looked for, and how to
/// name another one.
fn read_hint(file: &Path, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::NotFound {
        return String::new();
    }
    let whence = if file.is_relative() {
        std::env::current_dir()
            .map(|d| format!(" (relative to the working directory {})", d.display()))
            .unwrap_or_default()
    } else {
        String::new()
    };
    format!("{whence}; name the config with --config FILE or TIDEMARK_CONFIG")
}

/// A config that could not be loaded. Every variant names the file; parse and validation
/// errors name the line and the key too.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}{}", file.display(), read_hint(file, source))]
    Read {
        /// The config file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown, missing or mistyped key.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Parse {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value parsed but is not usable.
    #[error("{}:{line}: `{key}`: {message}", file.display())]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the value.
        line: usize,
        /// Dotted key path, e.g. `pipeline.demo.max_delete`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    /// Where the sled database (log, index, applied state) lives.
    pub state_dir: PathBuf,
    /// Address of the HTTP endpoints; loopback unless configured otherwise.
    pub listen: SocketAddr,
    /// The line `listen` is set on; `None` when it is the default.
    pub listen_line: Option<usize>,
    /// How long `run` waits for in-flight work after SIGINT/SIGTERM before it gives up.
    pub shutdown_timeout: Duration,
    /// Name of the environment variable holding the bearer token `/status` requires; the
    /// token itself never appears in the config. `None`: `/status` is open (it is on
    /// loopback unless `listen` says otherwise).
    pub status_token_env: Option<String>,
    /// The pipelines, in file order.
    pub pipelines: Vec<PipelineConfig>,
    /// Where run reports go: `{reports_dir}/{pipeline}/{YYYYMMDDTHHMMSSZ}/` (default
    /// `{state_dir}/reports`), so a re-sync can be explained after the fact.
    pub reports_dir: PathBuf,
    /// Reports kept per pipeline; older ones are deleted when a new one is written.
    pub report_retention: usize,
}

/// One pipeline: a source mirrored into a target through an event log.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Unique name; labels metrics and names the log.
    pub name: String,
    /// Time between the end of one scan and the start of the next in `run`.
    pub scan_interval: Duration,
    /// What is listed.
    pub source: SourceConfig,
    /// What is written.
    pub target: TargetConfig,
    /// Where events are kept.
    pub log: LogConfig,
    /// Largest number of deletes one scan may emit before the guard withholds them all.
    pub max_delete: DeleteLimit,
    /// File bytes up to this size travel inside the event; larger files are read from the
    /// source by the projector. 0 (default) keeps the log small when both run together.
    pub inline_limit: u64,
    /// Events applied at once (different keys; one key's events stay in order).
    pub concurrency: usize,
    /// Events read, applied and committed as one batch.
    pub batch_size: usize,
    /// Longest pause between retries of a batch the target could not take (backoff grows
    /// exponentially up to this); also bounds how long recovery waits once the target is back.
    pub retry_max_backoff: Duration,
    /// How long the daemon waits before it tries items that failed permanently again
    /// (after the pass at its start); the pause doubles after each pass that leaves
    /// failures, up to an hour or this, whichever is longer.
    pub failed_retry_interval: Duration,
    /// What `run` does for this pipeline: scan, project or both.
    pub role: Role,
}

/// What `tidemark run` does for a pipeline. With a shared log (Kafka) exactly one daemon
/// should scan the source; any number may project, sharing the log's partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Scan the source and project the log (the default; the only sensible role with sled).
    #[default]
    Both,
    /// Only scan the source and append to the log.
    Scan,
    /// Only project the log onto the target.
    Project,
}

impl Role {
    /// Whether this daemon runs the pipeline's scanner.
    pub fn scans(self) -> bool {
        matches!(self, Role::Both | Role::Scan)
    }

    /// Whether this daemon runs the pipeline's projector.
    pub fn projects(self) -> bool {
        matches!(self, Role::Both | Role::Project)
    }
}

/// Which source connector.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SourceConfig {
    /// A directory tree.
    Dir(DirSourceConfig),
    /// A REST API (`[pipeline.source.http]`).
    Http(HttpSourceConfig),
}

/// Which target connector.
#[derive(Debug, Clone)]
#[non_exhaustive]
// One per pipeline, built once at start: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum TargetConfig {
    /// A directory tree.
    Dir(DirTargetConfig),
    /// A REST API (`[pipeline.target.http]`).
    Http(HttpTargetConfig),
}

impl PipelineConfig {
    /// The target's directory, for a directory target.
    pub fn target_dir(&self) -> Option<&Path> {
        match &self.target {
            TargetConfig::Dir(d) => Some(&d.path),
            TargetConfig::Http(_) => None,
        }
    }

    /// What the source is (`dir /abs/path`, resolved as a target's path is; `http
    /// base_url`, which carries no secret), as the state notes the source its log was
    /// read from (`State::check_owner`).
    pub fn source_identity(&self) -> String {
        match &self.source {
            SourceConfig::Dir(d) => format!("dir {}", resolved(&d.path).display()),
            SourceConfig::Http(h) => format!("http {}", h.endpoint.base_url),
        }
    }
}

impl SourceConfig {
    /// The kinds of item the source lists (`kind` of its events and metrics).
    pub fn kinds(&self) -> Vec<String> {
        match self {
            SourceConfig::Dir(_) => ["file", "dir", "symlink"].map(String::from).to_vec(),
            SourceConfig::Http(h) => h.kinds.iter().map(|k| k.name.clone()).collect(),
        }
    }
}

impl TargetConfig {
    /// Whether deletes are applied (`prune = true`) or only recorded.
    pub fn prune(&self) -> bool {
        match self {
            TargetConfig::Dir(d) => d.prune,
            TargetConfig::Http(h) => h.prune,
        }
    }
}

/// Which event log backend.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum LogConfig {
    /// The embedded sled log in `state_dir`.
    #[default]
    Sled,
    /// A Kafka topic (`[pipeline.log.kafka]`).
    Kafka(KafkaLogConfig),
}

/// `[pipeline.log.kafka]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaLogConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The pipeline's topic; one topic per pipeline (default `tidemark.<pipeline>`).
    pub topic: String,
    /// Partitions of the topic when tidemark creates it; an existing topic keeps its own.
    pub partitions: u32,
    /// Replication factor of the topic when tidemark creates it.
    pub replication: u32,
    /// `cleanup.policy` of the topic when tidemark creates it: `compact` keeps the latest
    /// event of every kind/key (enough to rebuild a mirror), `delete` keeps everything
    /// until retention removes it.
    pub cleanup_policy: String,
    /// Consumer group the projectors of this pipeline share (default `tidemark.<pipeline>`);
    /// daemons in one group split the partitions between them.
    pub group: String,
    /// Partition lease length: a daemon renews its leases every third of it, and another
    /// daemon takes over a partition whose lease went unrenewed for 1.5 times it (see
    /// `log/kafka.rs`, `Leases`).
    pub session_timeout: Duration,
    /// Extra librdkafka client properties (`security.protocol`, `sasl.mechanism`, …).
    pub properties: std::collections::BTreeMap<String, String>,
    /// Client properties that are secrets (`sasl.password`, …), read from environment
    /// variables or files when the config is loaded and never printed.
    pub secret_properties: Vec<(String, crate::http_config::Secret)>,
}

/// `[pipeline.log.kafka]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafkaLog {
    brokers: Spanned<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "default_kafka_partitions")]
    partitions: Spanned<u32>,
    #[serde(default = "default_kafka_replication")]
    replication: Spanned<u32>,
    #[serde(default = "default_cleanup_policy")]
    cleanup_policy: Spanned<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    session_timeout: Duration,
    #[serde(default = "empty_spanned")]
    properties: Spanned<std::collections::BTreeMap<String, String>>,
    #[serde(default = "empty_spanned")]
    secret_properties:
        Spanned<std::collections::BTreeMap<String, crate::http_config::SecretSource>>,
}

fn empty_spanned<T: Default>() -> Spanned<T> {
    Spanned::new(0..0, T::default())
}

fn default_kafka_partitions() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn default_kafka_replication() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}
fn default_cleanup_policy() -> Spanned<String> {
    Spanned::new(0..0, "compact".to_owned())
}
/// Shortest `session_timeout` accepted (the leases' own floor, `log/kafka.rs`).
const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(1);
fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[pipeline.source.dir]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSourceConfig {
    /// Root of the tree to mirror.
    pub path: PathBuf,
    /// Globs (relative to the root) of files to mirror; empty means everything.
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs of files and directories to leave out; they win over `include`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Follow symbolic links and mirror what they point to. Off by default: links are
    /// mirrored as links, with their target path unchanged.
    #[serde(default)]
    pub follow_symlinks: bool,
}

/// `[pipeline.target.dir]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirTargetConfig {
    /// Root of the mirror; created if missing.
    pub path: PathBuf,
    /// Apply deletes. Off by default: deletes are recorded in the log and shown by `plan`.
    #[serde(default)]
    pub prune: bool,
}

/// The delete guard's limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeleteLimit {
    /// At most this many deletes per scan.
    Count(u64),
    /// At most this percentage of the indexed items per scan, rounded down: below 100%,
    /// a scan that would empty the source always trips it, however few items it holds.
    Percent(f64),
}

impl DeleteLimit {
    /// The number of deletes allowed for an index of `indexed` items.
    pub fn allowed(self, indexed: u64) -> u64 {
        match self {
            DeleteLimit::Count(n) => n,
            DeleteLimit::Percent(p) => (indexed as f64 * p / 100.0).floor() as u64,
        }
    }
}

impl std::fmt::Display for DeleteLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeleteLimit::Count(n) => write!(f, "{n}"),
            DeleteLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl<'de> Deserialize<'de> for DeleteLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DeleteLimit;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a count such as 100 or a percentage such as \"10%\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DeleteLimit, E> {
                u64::try_from(v)
                    .map(DeleteLimit::Count)
                    .map_err(|_| E::custom("max_delete cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DeleteLimit, E> {
                Ok(DeleteLimit::Count(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DeleteLimit, E> {
                // A count written as a string ("50") means what 50 means.
                if let Ok(n) = v.trim().parse::<u64>() {
                    return Ok(DeleteLimit::Count(n));
                }
                let pct = v.trim().strip_suffix('%').ok_or_else(|| {
                    E::custom(format!("max_delete `{v}` must be a count or end in `%`"))
                })?;
                match pct.trim().parse::<f64>() {
                    Ok(p) if (0.0..=100.0).contains(&p) => Ok(DeleteLimit::Percent(p)),
                    _ => Err(E::custom(format!(
                        "max_delete `{v}` must be a percentage between 0% and 100%"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    shutdown_timeout: Duration,
    #[serde(default)]
    status_token_env: Option<String>,
    #[serde(rename = "pipeline", default)]
    pipelines: Vec<RawPipeline>,
    #[serde(default)]
    reports_dir: Option<PathBuf>,
    #[serde(default = "default_report_retention")]
    report_retention: Spanned<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Spanned<String>,
    #[serde(default = "default_scan_interval")]
    scan_interval: Spanned<humantime_serde::Serde<Duration>>,
    source: RawSource,
    target: RawTarget,
    #[serde(default)]
    log: RawLog,
    #[serde(default = "default_max_delete")]
    max_delete: DeleteLimit,
    #[serde(default)]
    inline_limit: u64,
    #[serde(default = "default_concurrency")]
    concurrency: Spanned<usize>,
    #[serde(default = "default_batch_size")]
    batch_size: Spanned<usize>,
    #[serde(default = "default_retry_max_backoff", with = "humantime_serde")]
    retry_max_backoff: Duration,
    #[serde(default = "default_failed_retry_interval", with = "humantime_serde")]
    failed_retry_interval: Duration,
    #[serde(default)]
    role: Role,
}

/// `[pipeline.source.*]`: exactly one of its tables.
enum RawSource {
    Dir(Spanned<DirSourceConfig>),
    Http(Spanned<HttpSourceConfig>),
}

/// `[pipeline.target.*]`: exactly one of its tables.
#[allow(clippy::large_enum_variant)]
enum RawTarget {
    Dir(Spanned<DirTargetConfig>),
    Http(Spanned<HttpTargetConfig>),
}

/// What a pipeline's `source` or `target` table holding two connectors is refused with;
/// [`Config::parse_with`] moves the error to the second one's line.
const EXACTLY_ONE: &str = "a pipeline has exactly one";

/// `Deserialize` for an enum written as a table that holds exactly one of its variants'
/// tables (`[pipeline.source.dir]` or `[pipeline.source.http]`). Serde's own enums say
/// only "wanted exactly 1 element, more than 1 element" when it holds two.
macro_rules! one_table_of {
    ($ty:ident, $what:literal, $($variant:ident = $key:literal),+) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(concat!("a table with one of ", $("`", $key, "` "),+))
                    }
                    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        const KEYS: &[&str] = &[$($key),+];
                        let Some(first) = map.next_key::<String>()? else {
                            return Err(de::Error::custom(format!(
                                "{EXACTLY_ONE} {}; found none: add one of {}",
                                $what,
                                KEYS.iter().map(|k| format!("[pipeline.{}.{k}]", $what)).collect::<Vec<_>>().join(" or ")
                            )));
                        };
                        let value = match first.as_str() {
                            $($key => $ty::$variant(map.next_value()?),)+
                            other => return Err(de::Error::unknown_variant(other, KEYS)),
                        };
                        if let Some(second) = map.next_key::<String>()? {
                            return Err(de::Error::custom(format!(
                                "{EXACTLY_ONE} {}; found `{first}` and `{second}`: keep one",
                                $what
                            )));
                        }
                        Ok(value)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}
one_table_of!(RawSource, "source", Dir = "dir", Http = "http");
one_table_of!(RawTarget, "target", Dir = "dir", Http = "http");

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum RawLog {
    #[default]
    Sled,
    Kafka(Box<RawKafkaLog>),
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:9464".to_owned())
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_report_retention() -> Spanned<usize> {
    Spanned::new(0..0, 100)
}
/// Shortest `scan_interval` accepted.
const MIN_SCAN_INTERVAL: Duration = Duration::from_millis(100);

fn default_scan_interval() -> Spanned<humantime_serde::Serde<Duration>> {
    Spanned::new(0..0, Duration::from_secs(10).into())
}
fn default_max_delete() -> DeleteLimit {
    DeleteLimit::Percent(50.0)
}
fn default_concurrency() -> Spanned<usize> {
    Spanned::new(0..0, 16)
}
fn default_retry_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_failed_retry_interval() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_batch_size() -> Spanned<usize> {
    Spanned::new(0..0, 1024)
}

impl Config {
    /// Reads, parses and validates a config file, reading every secret.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        Config::load_with(file, ApiSecrets::Required)
    }

    /// Reads, parses and validates a config file, reading the REST APIs' secrets as
    /// `secrets` says (everything else is validated either way).
    pub fn load_with(file: &Path, secrets: ApiSecrets) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse_with(file, &text, secrets)
    }

    /// Parses and validates config text, reading every secret; `file` is used for
    /// messages and relative paths.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(file, text, ApiSecrets::Required)
    }

    /// As [`Config::parse`], reading the REST APIs' secrets as `secrets` says.
    pub fn parse_with(file: &Path, text: &str, secrets: ApiSecrets) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let mut message = e.message().trim().to_owned();
            // The endpoint's keys are flattened into `[…http]`, so a secret written into
            // one (`bearer = "…"`, a header's `value`) is reported at the table: point at
            // the value itself.
            // So is a misspelled key in an inline table there (`bearer = { evn = "X" }`):
            // point at that key.
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split_once('`'))
                .map(|(name, _)| name.to_owned());
            let unknown_at = e
                .span()
                .zip(unknown.as_deref())
                .and_then(|(s, name)| key_in_table(text, s, name));
            let span = match e.span() {
                Some(s) if message.contains("never written in the config") => {
                    Some(written_secret_at(text, s.start).unwrap_or(s))
                }
                Some(_) if unknown_at.is_some() => unknown_at.as_ref().map(|(key, _)| key.clone()),
                // Two `[pipeline.source.*]`: the second one's line.
                Some(s) if message.starts_with(EXACTLY_ONE) => {
                    Some(second_key(text, s.clone()).unwrap_or(s))
                }
                s => s,
            };
            let (line, column) = span.clone().map_or((1, 1), |s| line_col(text, s.start));
            // A value of the wrong type or form ("invalid value: string \"soon\", expected
            // a duration") and a table missing a key come without the key they belong to:
            // name it, as every other config error does (a misspelled key by the table
            // that holds it).
            let key = match &unknown_at {
                Some((_, table)) => key_at(text, table.start),
                None => span.clone().and_then(|s| key_at(text, s.start)),
            };
            // Other messages ("duplicate key") do not say which key; quote what the span covers.
            let at = span
                .and_then(|s| text.get(s))
                .and_then(|t| t.lines().next());
            if let Some(key) = key {
                message = format!("`{key}`: {message}");
            } else if let Some(at) = at
                .map(str::trim)
                .filter(|t| !t.is_empty() && !message.contains('`'))
            {
                message = format!("{message}: `{at}`");
            }
            ConfigError::Parse {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        })?;
        // Relative paths are resolved against the config file's directory, made absolute
        // here: the log records source paths (blob locators) that later runs read, and a
        // run from another working directory must find the same files.
        let absolute = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
        let base = absolute.parent().unwrap_or(Path::new("/"));
        let invalid =
            |span: std::ops::Range<usize>, key: String, message: String| ConfigError::Invalid {
                file: file.to_owned(),
                line: line_col(text, span.start).0,
                key,
                message,
            };

        let listen = raw.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
            invalid(
                raw.listen.span(),
                "listen".into(),
                format!(
                    "`{}` is not an address such as 127.0.0.1:9464 ({e})",
                    raw.listen.get_ref()
                ),
            )
        })?;

        if raw.shutdown_timeout.is_zero() {
            return Err(invalid(
                value_span(text, &["shutdown_timeout"]).unwrap_or(0..0),
                "shutdown_timeout".into(),
                "must be more than 0s: it is how long `tidemark run` waits for the work in flight when it is stopped, and at 0 every stop would give up at once and exit 1".into(),
            ));
        }

        if *raw.report_retention.get_ref() == 0 {
            return Err(invalid(
                raw.report_retention.span(),
                "report_retention".into(),
                "must be at least 1 (the number of reports kept per pipeline)".into(),
            ));
        }

        if raw.pipelines.is_empty() {
            return Err(invalid(
                0..0,
                "pipeline".into(),
                "no [[pipeline]] is configured; add one (see config/tidemark.toml)".into(),
            ));
        }

        let home = |path: &Path, at: &[&str], key: String| {
            home_expanded(path)
                .map_err(|message| invalid(value_span(text, at).unwrap_or(0..0), key, message))
        };
        let state_dir = base.join(home(&raw.state_dir, &["state_dir"], "state_dir".into())?);
        let reports_dir = match &raw.reports_dir {
            Some(d) => base.join(home(d, &["reports_dir"], "reports_dir".into())?),
            None => state_dir.join("reports"),
        };
        // What tidemark writes itself, every run, with the line it is set on (`None`: a
        // default) and what it defaults to.
        let own_dirs = [
            (
                &state_dir,
                "state_dir",
                "state directory",
                "`state` beside the config file",
            ),
            (
                &reports_dir,
                "reports_dir",
                "reports directory",
                "`reports` in the state directory",
            ),
        ]
        .map(|(dir, k, what, default)| (dir, k, what, default, value_span(text, &[k])));

        let mut pipelines: Vec<PipelineConfig> = Vec::new();
        for (index, p) in raw.pipelines.into_iter().enumerate() {
            let name = p.name.get_ref().clone();
            let key = |k: &str| format!("pipeline.{name}.{k}");
            // What the HTTP validation refuses, on the line of the key it is about (or the
            // nearest table holding it), named as the user wrote it.
            let refused =
                |r: Refused, side: &str, table: std::ops::Range<usize>, kinds: &[&str]| {
                    let (mut path, shown) = match r.at {
                        At::Table => (vec![], String::new()),
                        At::Key(k) => (vec![k.to_string()], format!(".{k}")),
                        At::Entry(array, i) => {
                            (vec![array.to_string(), i.to_string()], format!(".{array}"))
                        }
                        At::Kind(i, k) => (
                            vec!["kind".into(), i.to_string(), k.into()],
                            format!(".kind.{}.{k}", kinds.get(i).copied().unwrap_or_default()),
                        ),
                        At::Pagination(i, k) => (
                            vec!["kind".into(), i.to_string(), "pagination".into(), k.into()],
                            format!(
                                ".kind.{}.pagination.{k}",
                                kinds.get(i).copied().unwrap_or_default()
                            ),
                        ),
                    };
                    let prefix = [
                        "pipeline".to_string(),
                        index.to_string(),
                        side.into(),
                        "http".into(),
                    ];
                    let span = loop {
                        if path.is_empty() {
                            break table;
                        }
                        if let Some(span) = value_span(text, &[&prefix[..], &path].concat()) {
                            break span;
                        }
                        path.pop();
                    };
                    invalid(span, key(&format!("{side}.http{shown}")), r.message)
                };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    p.name.span(),
                    "pipeline.name".into(),
                    format!("`{name}` must be non-empty and use only letters, digits, `-` and `_`"),
                ));
            }
            if pipelines.iter().any(|q| q.name == name) {
                return Err(invalid(
                    p.name.span(),
                    "pipeline.name".into(),
                    format!("pipeline `{name}` is defined twice"),
                ));
            }
            for (value, k) in [
                (&p.concurrency, "concurrency"),
                (&p.batch_size, "batch_size"),
            ] {
                if *value.get_ref() == 0 {
                    return Err(invalid(value.span(), key(k), "must be at least 1".into()));
                }
            }
            if **p.scan_interval.get_ref() < MIN_SCAN_INTERVAL {
                return Err(invalid(
                    p.scan_interval.span(),
                    key("scan_interval"),
                    format!(
                        "must be at least {} (a scan lists the whole source; back to back they would keep a core busy)",
                        humantime::format_duration(MIN_SCAN_INTERVAL)
                    ),
                ));
            }
            for (value, k, why) in [
                (
                    p.retry_max_backoff,
                    "retry_max_backoff",
                    "it is the longest pause between retries of a batch the target refused, and at 0 they would follow each other without a pause",
                ),
                (
                    p.failed_retry_interval,
                    "failed_retry_interval",
                    "it is the pause before the daemon tries failed items again, and at 0 it would try them again and again without a pause",
                ),
            ] {
                if value.is_zero() {
                    let at = ["pipeline", &index.to_string(), k];
                    return Err(invalid(
                        value_span(text, &at).unwrap_or(0..0),
                        key(k),
                        format!("must be more than 0s: {why}"),
                    ));
                }
            }
            let source = match p.source {
                RawSource::Dir(d) => {
                    let span = d.span();
                    let mut d = d.into_inner();
                    let at = ["pipeline", &index.to_string(), "source", "dir", "path"];
                    d.path = base.join(home(&d.path, &at, key("source.dir.path"))?);
                    for (list, globs) in [("include", &d.include), ("exclude", &d.exclude)] {
                        for (j, glob) in globs.iter().enumerate() {
                            if let Err(e) = globset::Glob::new(glob) {
                                // The glob's own line (a list may span several).
                                let at = [
                                    "pipeline",
                                    &index.to_string(),
                                    "source",
                                    "dir",
                                    list,
                                    &j.to_string(),
                                ];
                                return Err(invalid(
                                    value_span(text, &at).unwrap_or(span.clone()),
                                    key(&format!("source.dir.{list}")),
                                    format!("bad glob `{glob}`: {e}"),
                                ));
                            }
                        }
                    }
                    SourceConfig::Dir(d)
                }
                RawSource::Http(h) => {
                    let span = h.span();
                    let mut h = h.into_inner();
                    if let Err(r) = h.validate(base, secrets) {
                        let kinds: Vec<&str> = h.kinds.iter().map(|k| k.name.as_str()).collect();
                        return Err(refused(r, "source", span, &kinds));
                    }
                    SourceConfig::Http(h)
                }
            };
            let target = match p.target {
                RawTarget::Dir(d) => {
                    let span = d.span();
                    let mut d = d.into_inner();
                    // Resolved (`..`, symbolic links) where it exists: the applied state
                    // records the target by this path, and messages show it, so one
                    // directory written two ways is one target.
                    let at = ["pipeline", &index.to_string(), "target", "dir", "path"];
                    d.path = resolved(&base.join(home(&d.path, &at, key("target.dir.path"))?));
                    let path_span = key_span(text, span.clone(), "path");
                    let source_root = match &source {
                        SourceConfig::Dir(s) => Some(&s.path),
                        SourceConfig::Http(_) => None,
                    };
                    if let Some(root) = source_root {
                        if let Some(how) = overlap(&d.path, root) {
                            return Err(invalid(
                                path_span.clone(),
                                key("target.dir.path"),
                                format!(
                                    "target {} and source {} overlap{}; a mirror must not be inside its source or contain it",
                                    d.path.display(),
                                    root.display(),
                                    how.through()
                                ),
                            ));
                        }
                    }
                    if let Some((other, how)) = pipelines.iter().find_map(|q| match &q.target {
                        TargetConfig::Dir(t) => overlap(&d.path, &t.path).map(|how| (q, how)),
                        TargetConfig::Http(_) => None,
                    }) {
                        return Err(invalid(
                            path_span,
                            key("target.dir.path"),
                            format!(
                                "target {} overlaps the target of pipeline `{}` ({}){}; two pipelines writing one directory overwrite and delete each other's files, so give each its own",
                                d.path.display(),
                                other.name,
                                other.target_dir().map_or(String::new(), |p| p.display().to_string()),
                                how.through()
                            ),
                        ));
                    }
                    TargetConfig::Dir(d)
                }
                RawTarget::Http(h) => {
                    let span = h.span();
                    let mut h = h.into_inner();
                    if let Err(r) = h.validate(base, secrets) {
                        let kinds: Vec<&str> = h.kinds.iter().map(|k| k.name.as_str()).collect();
                        return Err(refused(r, "target", span, &kinds));
                    }
                    if let SourceConfig::Http(s) = &source {
                        if s.endpoint.api().is_some() && s.endpoint.api() == h.endpoint.api() {
                            return Err(refused(
                                Refused {
                                    message: format!(
                                        "target `{}` is the source's API (`{}`, the same once a trailing slash, a default port and the case of scheme and host are set aside): every sync would write each item back where it was listed, one more copy each time; point the target at another deployment",
                                        h.endpoint.base_url, s.endpoint.base_url
                                    ),
                                    at: At::Key("base_url"),
                                },
                                "target",
                                span,
                                &[],
                            ));
                        }
                        if let Some(k) = s.kinds.iter().find(|k| h.kind(&k.name).is_none()) {
                            return Err(invalid(
                                span,
                                key("target.http.kind"),
                                format!("source kind `{}` has no [[…target.http.kind]] saying where to write it", k.name),
                            ));
                        }
                    }
                    TargetConfig::Http(h)
                }
            };
            let log = match p.log {
                RawLog::Sled => LogConfig::Sled,
                RawLog::Kafka(k) => {
                    let k = *k;
                    if k.brokers.get_ref().trim().is_empty() {
                        return Err(invalid(
                            k.brokers.span(),
                            key("log.kafka.brokers"),
                            "is empty; list the bootstrap brokers as host:port,host:port".into(),
                        ));
                    }
                    for (value, k2) in [
                        (&k.partitions, "log.kafka.partitions"),
                        (&k.replication, "log.kafka.replication"),
                    ] {
                        if *value.get_ref() == 0 {
                            return Err(invalid(
                                value.span(),
                                key(k2),
                                "must be at least 1".into(),
                            ));
                        }
                    }
                    if k.session_timeout < MIN_SESSION_TIMEOUT {
                        let at = [
                            "pipeline",
                            &index.to_string(),
                            "log",
                            "kafka",
                            "session_timeout",
                        ];
                        return Err(invalid(
                            value_span(text, &at).unwrap_or(0..0),
                            key("log.kafka.session_timeout"),
                            format!(
                                "must be at least {}: a daemon renews its partition leases every third of it",
                                humantime::format_duration(MIN_SESSION_TIMEOUT)
                            ),
                        ));
                    }
                    let policy = k.cleanup_policy.get_ref();
                    if !matches!(policy.as_str(), "compact" | "delete" | "compact,delete") {
                        return Err(invalid(
                            k.cleanup_policy.span(),
                            key("log.kafka.cleanup_policy"),
                            format!("`{policy}` must be `compact`, `delete` or `compact,delete`"),
                        ));
                    }
                    // A property's own line, else its table's.
                    let property_span = |k2: &str| {
                        let at = [
                            "pipeline",
                            &index.to_string(),
                            "log",
                            "kafka",
                            "properties",
                            k2,
                        ];
                        value_span(text, &at).unwrap_or(k.properties.span())
                    };
                    if let Some(k2) = k.properties.get_ref().keys().find(|k2| {
                        let k2 = k2.to_ascii_lowercase();
                        k2.contains("password") || k2.contains("secret")
                    }) {
                        return Err(invalid(
                            property_span(k2),
                            key(&format!("log.kafka.properties.{k2}")),
                            format!("`{k2}` is a secret and secrets are never written in the config; set it under [pipeline.log.kafka.secret_properties] as \"{k2}\" = {{ env = \"VAR\" }} or {{ file = \"PATH\" }}"),
                        ));
                    }
                    for (k2, v) in k.properties.get_ref() {
                        kafka_property_check(k2, v).map_err(|message| {
                            invalid(
                                property_span(k2),
                                key(&format!("log.kafka.properties.{k2}")),
                                message,
                            )
                        })?;
                    }
                    let mut secret_properties = Vec::new();
                    for (prop, source) in k.secret_properties.get_ref() {
                        let at = [
                            "pipeline",
                            &index.to_string(),
                            "log",
                            "kafka",
                            "secret_properties",
                            prop,
                        ];
                        let span = value_span(text, &at).unwrap_or(k.secret_properties.span());
                        let shown = key(&format!("log.kafka.secret_properties.{prop}"));
                        let secret = source
                            .resolve(base, &format!("secret property `{prop}`"))
                            .map_err(|message| invalid(span.clone(), shown.clone(), message))?;
                        kafka_property_check(prop, secret.expose())
                            .map_err(|message| invalid(span, shown, message))?;
                        secret_properties.push((prop.clone(), secret));
                    }
                    LogConfig::Kafka(KafkaLogConfig {
                        brokers: k.brokers.into_inner(),
                        topic: k.topic.unwrap_or_else(|| format!("tidemark.{name}")),
                        partitions: k.partitions.into_inner(),
                        replication: k.replication.into_inner(),
                        cleanup_policy: k.cleanup_policy.into_inner(),
                        group: k.group.unwrap_or_else(|| format!("tidemark.{name}")),
                        session_timeout: k.session_timeout,
                        properties: k.properties.into_inner(),
                        secret_properties,
                    })
                }
            };
            // The state and the reports change at every run: inside a directory source
            // they would be mirrored, and as mirroring writes them anew the daemon would
            // never go quiet; inside a directory target `verify` would count them as drift.
            let source_dir = match &source {
                SourceConfig::Dir(d) => Some(&d.path),
                SourceConfig::Http(_) => None,
            };
            let target_dir = match &target {
                TargetConfig::Dir(d) => Some(&d.path),
                TargetConfig::Http(_) => None,
            };
            for (root, side, why) in [
                (
                    source_dir,
                    "source",
                    "every scan would mirror what tidemark writes there to the target, and the daemon would never go quiet",
                ),
                (
                    target_dir,
                    "target",
                    "`verify` would count what tidemark writes there as drift",
                ),
            ] {
                let Some(root) = root else { continue };
                for (dir, k, what, default, written) in &own_dirs {
                    let Some(how) = inside(dir, root) else {
                        continue;
                    };
                    return Err(match written {
                        Some(span) => invalid(
                            span.clone(),
                            k.to_string(),
                            format!(
                                "the {what} {} is inside the {side} directory {} of pipeline `{name}`{}: {why}; put it outside",
                                dir.display(),
                                root.display(),
                                how.through()
                            ),
                        ),
                        None => {
                            let at = ["pipeline", &index.to_string(), side, "dir", "path"];
                            invalid(
                                value_span(text, &at).unwrap_or(0..0),
                                key(&format!("{side}.dir.path")),
                                format!(
                                    "the {side} directory {} holds the {what} {}{} (`{k}` is not set and defaults to {default}): {why}; set `{k}` to a directory outside it",
                                    root.display(),
                                    dir.display(),
                                    how.through()
                                ),
                            )
                        }
                    });
                }
            }
            pipelines.push(PipelineConfig {
                name,
                scan_interval: p.scan_interval.into_inner().into_inner(),
                source,
                target,
                log,
                role: p.role,
                max_delete: p.max_delete,
                inline_limit: p.inline_limit,
                concurrency: p.concurrency.into_inner(),
                batch_size: p.batch_size.into_inner(),
                retry_max_backoff: p.retry_max_backoff,
                failed_retry_interval: p.failed_retry_interval,
            });
        }

        Ok(Config {
            file: file.to_owned(),
            reports_dir,
            report_retention: raw.report_retention.into_inner(),
            state_dir,
            listen,
            listen_line: (raw.listen.span() != (0..0))
                .then(|| line_col(text, raw.listen.span().start).0),
            shutdown_timeout: raw.shutdown_timeout,
            status_token_env: raw.status_token_env,
            pipelines,
        })
    }

    /// The named pipeline, or all of them when `name` is `None`.
    pub fn select(&self, name: Option<&str>) -> Result<Vec<&PipelineConfig>, String> {
        match name {
            None => Ok(self.pipelines.iter().collect()),
            Some(n) => self
                .pipelines
                .iter()
                .find(|p| p.name == n)
                .map(|p| vec![p])
                .ok_or_else(|| {
                    let known: Vec<&str> = self.pipelines.iter().map(|p| p.name.as_str()).collect();
                    format!(
                        "no pipeline named `{n}` in {} (known: {})",
                        self.file.display(),
                        known.join(", ")
                    )
                }),
        }
    }
}

/// Checks a librdkafka client property at load time, so that the error has the file and
/// the line: what this build's librdkafka cannot do (TLS, SASL mechanisms other than
/// those built in), said in tidemark's words with what it can do instead, then
/// librdkafka's own check of the name and value. A refused value is not repeated: it
/// may be a credential written where it does not belong.
fn kafka_property_check(name: &str, value: &str) -> Result<(), String> {
    let features = kafka_features();
    let has = |f: &str| features.split(',').any(|g| g == f);
    match name {
        "security.protocol" => {
            let v = value.to_ascii_lowercase();
            if matches!(v.as_str(), "ssl" | "sasl_ssl") && !has("ssl") {
                return Err(format!(
                    "`{}` needs TLS; {}",
                    value.to_ascii_uppercase(),
                    kafka_security_supported()
                ));
            }
        }
        "sasl.mechanism" | "sasl.mechanisms" => {
            let feature = match value {
                "PLAIN" => "sasl_plain",
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => "sasl_scram",
                "OAUTHBEARER" => "sasl_oauthbearer",
                "GSSAPI" => "sasl_gssapi",
                v if ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]
                    .contains(&v.to_ascii_uppercase().as_str()) =>
                {
                    return Err(format!(
                        "SASL mechanism names are upper case: `{}`",
                        v.to_ascii_uppercase()
                    ));
                }
                _ => {
                    return Err(format!(
                        "the value is not one SASL mechanism librdkafka knows (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI); {}",
                        kafka_security_supported()
                    ))
                }
            };
            if !has(feature) {
                return Err(format!(
                    "SASL mechanism `{value}` is not built into this tidemark; {}",
                    kafka_security_supported()
                ));
            }
        }
        _ => {}
    }
    if let Err(e) = rdkafka::ClientConfig::new()
        .set(name, value)
        .create_native_config()
    {
        let why = match e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) => desc,
            e => e.to_string(),
        }
        .replace(&format!("\"{value}\""), "(value not shown)");
        // Unquoted too, unless so short it would blank out other words.
        let why = if value.len() >= 4 {
            why.replace(value, "(value not shown)")
        } else {
            why
        };
        // What is missing from the build ("OpenSSL not available at build time").
        let missing = why.contains("at build time") || why.contains("in this build");
        return Err(
            if missing && (why.contains("OpenSSL") || name.starts_with("sasl")) {
                format!(
                    "librdkafka refuses it: {why}; {}",
                    kafka_security_supported()
                )
            } else if missing {
                format!(
                    "librdkafka refuses it: {why}; this build's librdkafka has {}",
                    features.replace(',', ", ")
                )
            } else {
                format!("librdkafka refuses it: {why}")
            },
        );
    }
    Ok(())
}

/// The features this build's librdkafka has (`builtin.features`: `gzip,snappy,sasl,…`).
fn kafka_features() -> &'static str {
    static FEATURES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FEATURES.get_or_init(|| {
        rdkafka::ClientConfig::new()
            .create_native_config()
            .and_then(|c| c.get("builtin.features"))
            .unwrap_or_default()
    })
}

/// What this build can do of TLS and SASL, for an error that refuses something else: the
/// rdkafka crate is built with its default features, so librdkafka has no OpenSSL (no
/// TLS, and so no SCRAM or OAUTHBEARER) and no Cyrus SASL (no GSSAPI).
fn kafka_security_supported() -> String {
    let features = kafka_features();
    let has = |f: &str| features.split(',').any(|g| g == f);
    let mut protocols = vec!["PLAINTEXT", "SASL_PLAINTEXT"];
    if has("ssl") {
        protocols.extend(["SSL", "SASL_SSL"]);
    }
    let mechanisms: Vec<&str> = [
        ("sasl_plain", &["PLAIN"][..]),
        ("sasl_scram", &["SCRAM-SHA-256", "SCRAM-SHA-512"]),
        ("sasl_oauthbearer", &["OAUTHBEARER"]),
        ("sasl_gssapi", &["GSSAPI"]),
    ]
    .into_iter()
    .filter(|(f, _)| has(f))
    .flat_map(|(_, m)| m.iter().copied())
    .collect();
    let or = |items: &[&str]| {
        let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
        match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => "none".into(),
        }
    };
    let mut said = format!(
        "this build supports `security.protocol` {} and `sasl.mechanism` {}",
        or(&protocols),
        or(&mechanisms)
    );
    if !has("ssl") {
        said.push_str(" (its librdkafka is built without TLS; SASL_PLAINTEXT sends the password unencrypted, so use it on a trusted network only)");
    }
    said
}

/// Where the first secret written as a plain value (`bearer = "…"`, a `[[…header]]` or
/// `[[…query]]` entry's `value`) at or after `from` is: the span of that value.
fn written_secret_at(text: &str, from: usize) -> Option<std::ops::Range<usize>> {
    fn find(
        key: &str,
        v: &toml::Spanned<toml::de::DeValue>,
        in_entry: bool,
        found: &mut Vec<std::ops::Range<usize>>,
    ) {
        match v.get_ref() {
            toml::de::DeValue::String(_) if key == "bearer" || (in_entry && key == "value") => {
                found.push(v.span())
            }
            toml::de::DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    find(k.get_ref(), v, false, found);
                }
            }
            toml::de::DeValue::Array(items) => {
                let entries = matches!(key, "header" | "query");
                for item in items {
                    if let toml::de::DeValue::Table(t) = item.get_ref() {
                        for (k, v) in t.iter() {
                            find(k.get_ref(), v, entries, found);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut found = Vec::new();
    for (k, v) in doc.get_ref().iter() {
        find(k.get_ref(), v, false, &mut found);
    }
    found
        .into_iter()
        .filter(|s| s.start >= from)
        .min_by_key(|s| s.start)
}

/// Where the key `name` is in the table whose span is `table` (its `[header]`, or the
/// braces of an inline table), for an error serde reports at the table: the table's own
/// key if it has one, else the first one in a table, inline table or array of tables
/// inside it. The span of the key, and that of the table holding it (which names it).
/// `None` when there is no such table or key.
fn key_in_table(
    text: &str,
    table: std::ops::Range<usize>,
    name: &str,
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    use toml::de::{DeTable, DeValue};
    type Value<'d> = toml::Spanned<DeValue<'d>>;
    /// The tables below `v` (`v` first), with their spans.
    fn tables<'a, 'd>(v: &'a Value<'d>, out: &mut Vec<(&'a DeTable<'d>, std::ops::Range<usize>)>) {
        match v.get_ref() {
            DeValue::Table(t) => {
                out.push((t, v.span()));
                for (_, v) in t.iter() {
                    tables(v, out);
                }
            }
            DeValue::Array(items) => items.iter().for_each(|i| tables(i, out)),
            _ => {}
        }
    }
    let doc = DeTable::parse(text).ok()?;
    let root = toml::Spanned::new(0..text.len(), DeValue::Table(doc.into_inner()));
    let found = table_with_span(&root, &table)?;
    let mut all = Vec::new();
    tables(found, &mut all);
    let (own, nested) = all.split_first()?;
    let named = |(t, holder): &(&DeTable, std::ops::Range<usize>)| {
        t.iter()
            .find(|(k, _)| k.get_ref() == name)
            .map(|(k, _)| (k.span(), holder.clone()))
    };
    named(own).or_else(|| nested.iter().filter_map(named).min_by_key(|(s, _)| s.start))
}

/// The table below `v` (or `v`) whose span is `span`.
fn table_with_span<'a, 'd>(
    v: &'a toml::Spanned<toml::de::DeValue<'d>>,
    span: &std::ops::Range<usize>,
) -> Option<&'a toml::Spanned<toml::de::DeValue<'d>>> {
    use toml::de::DeValue;
    if v.span() == *span && matches!(v.get_ref(), DeValue::Table(_)) {
        return Some(v);
    }
    match v.get_ref() {
        DeValue::Table(t) => t.iter().find_map(|(_, v)| table_with_span(v, span)),
        DeValue::Array(items) => items.iter().find_map(|i| table_with_span(i, span)),
        _ => None,
    }
}

/// The span of the second key, in file order, of the table whose span is `table`: where
/// a table that holds one thing holds a second one.
fn second_key(text: &str, table: std::ops::Range<usize>) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let root = toml::Spanned::new(0..text.len(), toml::de::DeValue::Table(doc.into_inner()));
    let toml::de::DeValue::Table(t) = table_with_span(&root, &table)?.get_ref() else {
        return None;
    };
    let mut keys: Vec<_> = t.iter().map(|(k, _)| k.span()).collect();
    keys.sort_by_key(|s| s.start);
    keys.into_iter().nth(1)
}

/// The dotted path of the key whose value covers byte `offset` of `text`, the innermost
/// one, such as `pipeline.demo.scan_interval`: a pipeline is named by its `name`, other
/// array elements by their index. `None` when the text is not valid TOML or no value
/// covers `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    /// Whether `offset` lies in `v`, found under `label`: `path` ends with the key then.
    fn under(
        label: String,
        v: &toml::Spanned<toml::de::DeValue>,
        offset: usize,
        path: &mut Vec<String>,
    ) -> bool {
        path.push(label);
        let found = match v.get_ref() {
            toml::de::DeValue::Table(t) => {
                t.iter()
                    .any(|(k, v)| under(k.get_ref().to_string(), v, offset, path))
                    // A table's own error ("missing field `path`") names the table.
                    || v.span().contains(&offset)
            }
            toml::de::DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let name = match item.get_ref() {
                    toml::de::DeValue::Table(t) => {
                        t.iter()
                            .find_map(|(k, v)| match (k.get_ref().as_ref(), v.get_ref()) {
                                ("name", toml::de::DeValue::String(name)) => Some(name.to_string()),
                                _ => None,
                            })
                    }
                    _ => None,
                };
                under(name.unwrap_or_else(|| i.to_string()), item, offset, path)
            }),
            _ => v.span().contains(&offset),
        };
        if !found {
            path.pop();
        }
        found
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    doc.get_ref()
        .iter()
        .any(|(k, v)| under(k.get_ref().to_string(), v, offset, &mut path))
        .then(|| path.join("."))
}

/// The span of the value at `path` in the TOML `text`: table keys, and array elements by
/// their index (`["pipeline", "0", "source", "http", "kind", "1", "path"]`). `None` when
/// the text is not valid TOML or nothing is written there (a default).
fn value_span(text: &str, path: &[impl AsRef<str>]) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let (first, rest) = path.split_first()?;
    let mut value = doc
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == first.as_ref())
        .map(|(_, v)| v)?;
    for step in rest {
        value = match value.get_ref() {
            toml::de::DeValue::Table(t) => t.iter().find(|(k, _)| k.get_ref() == step.as_ref())?.1,
            toml::de::DeValue::Array(items) => items.get(step.as_ref().parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value.span())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// How one directory was found to be another or inside it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inside {
    /// By its path, as written or once resolved ([`resolved`]).
    Path,
    /// Through a mount (a bind mount shows one directory at two paths): the directory at
    /// `at`, the inner one or one of its ancestors, is the one at `is`.
    Mount { at: PathBuf, is: PathBuf },
}

impl Inside {
    /// What an error adds to the paths it names: nothing when they show the overlap, the
    /// two paths of the one directory when a mount hides it.
    pub(crate) fn through(&self) -> String {
        match self {
            Inside::Path => String::new(),
            Inside::Mount { at, is } => format!(
                " ({} and {} are one directory, shown at two paths by a mount)",
                at.display(),
                is.display()
            ),
        }
    }
}

/// `path` with a leading `~` made the home directory (`$HOME`), as a shell would; other
/// shell forms (`~user`, `$VAR`) are refused rather than taken as literal names, which
/// made directories named `~` or `$HOME` beside the config.
fn home_expanded(path: &Path) -> Result<PathBuf, String> {
    let text = path.to_string_lossy();
    if let Some(rest) = text.strip_prefix('~') {
        if rest.is_empty() || rest.starts_with('/') {
            let home = std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .ok_or_else(|| {
                    format!("`{text}` starts with `~`, but HOME is not set: write the path in full")
                })?;
            return Ok(PathBuf::from(home).join(rest.trim_start_matches('/')));
        }
        return Err(format!(
            "`{text}`: `~user` is not expanded; write the path in full"
        ));
    }
    let variable = text.match_indices('$').any(|(i, _)| {
        text[i + 1..]
            .chars()
            .next()
            .is_some_and(|c| c == '{' || c == '_' || c.is_ascii_alphabetic())
    });
    if variable {
        return Err(format!(
            "`{text}`: environment variables are not expanded in paths; write the path in full (a leading `~` is the home directory)"
        ));
    }
    Ok(path.to_owned())
}

/// Whether one of two directories is the other or inside it ([`inside`], either way
/// round).
pub(crate) fn overlap(a: &Path, b: &Path) -> Option<Inside> {
    inside(a, b).or_else(|| inside(b, a))
}

/// Whether `dir` is `root` or inside it: as written (its `..` taken lexically: `cfg/../src`
/// is not inside `cfg`) or once resolved ([`resolved`]), so a symbolic link in either path
/// that leads there counts; or by identity, so a bind mount that shows `root` elsewhere
/// does too: `root`'s device and inode are those of `dir` or of one of its ancestors (for a
/// `dir` that does not exist yet, of its nearest existing ancestor and up).
fn inside(dir: &Path, root: &Path) -> Option<Inside> {
    use std::os::unix::fs::MetadataExt;
    let lexical = |p: &Path| resolve_rest(PathBuf::new(), p.components());
    if lexical(dir).starts_with(lexical(root)) || resolved(dir).starts_with(resolved(root)) {
        return Some(Inside::Path);
    }
    // A `root` that does not exist is nothing a mount can show elsewhere.
    let root = resolved(root);
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let root_id = id(&root)?;
    resolved(dir)
        .ancestors()
        .find(|a| id(a) == Some(root_id))
        .map(|at| Inside::Mount {
            at: at.to_owned(),
            is: root,
        })
}

/// `base` with `components` appended, `..` taking the last one off and `.` nothing.
fn resolve_rest<'a>(
    base: PathBuf,
    components: impl IntoIterator<Item = std::path::Component<'a>>,
) -> PathBuf {
    components.into_iter().fold(base, |mut p, c| {
        match c {
            std::path::Component::ParentDir => {
                p.pop();
            }
            std::path::Component::CurDir => {}
            c => p.push(c),
        }
        p
    })
}

/// The span of the line that sets `key` in the table whose span (its header, or the
/// braces of an inline table) is `table`, for an error on that line; `table` when the key
/// is not written there (a default).
fn key_span(text: &str, table: std::ops::Range<usize>, key: &str) -> std::ops::Range<usize> {
    let inline = text.get(table.clone()).is_some_and(|t| t.starts_with('{'));
    // A `[header]` table's keys follow it, up to the next header.
    let (from, to) = if inline {
        (table.start, table.end)
    } else {
        (table.end, text.len())
    };
    let mut at = from;
    for line in text.get(from..to).unwrap_or("").split_inclusive('\n') {
        let trimmed = line.trim_start();
        if !inline && trimmed.starts_with('[') {
            break;
        }
        let start = at + (line.len() - trimmed.len());
        at += line.len();
        let mut words = trimmed.trim_start_matches('{').split('=');
        if words.next().map(str::trim) == Some(key) && words.next().is_some() {
            return start..start + trimmed.trim_end().len();
        }
    }
    table
}

/// Whether `dir` is the root of a mounted filesystem (on another device than its parent);
/// `None` when it is not a directory or cannot be looked at. Compared within one look at
/// both, never across runs (device numbers may change at a reboot).
pub(crate) fn mount_root(dir: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let here = std::fs::metadata(dir).ok().filter(|m| m.is_dir())?;
    let parent = std::fs::metadata(dir.join("..")).ok()?;
    Some(here.dev() != parent.dev())
}

/// `path` with its longest existing ancestor resolved (symbolic links, `..`) and the rest
/// appended, its `..` taken lexically (what does not exist is no link): where a directory
/// that may not exist yet will be.
pub(crate) fn resolved(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return resolve_rest(real, rest.into_iter().rev());
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state_dir = "state"

[[pipeline]]
name = "demo"
scan_interval = "2s"
max_delete = "10%"

[pipeline.source.dir]
path = "src"
exclude = ["*.tmp"]

[pipeline.target.dir]
path = "dst"
prune = true
"#;

    /// A target reached through a symbolic link is inside its source all the same.
    #[test]
    fn a_target_inside_its_source_through_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/src")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("data"), dir.path().join("dst")).unwrap();
        let file = dir.path().join("t.toml");
        let source = GOOD.replace("path = \"src\"", "path = \"data/src\"");
        let err = Config::parse(&file, &source).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
        assert!(err.contains("target.dir.path"), "{err}");
        let link = GOOD.replace("path = \"dst\"", "path = \"src-link\"");
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("src"), dir.path().join("src-link")).unwrap();
        let err = Config::parse(&file, &link).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    /// The first pipeline's HTTP source.
    fn http_source(config: &Config) -> &HttpSourceConfig {
        let SourceConfig::Http(h) = &config.pipelines[0].source else {
            panic!("an HTTP source")
        };
        h
    }

    /// The secret headers `h` resolved, by name, with their values.
    fn resolved_headers(h: &HttpSourceConfig) -> Vec<(&str, &str)> {
        h.endpoint
            .resolved_headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.expose()))
            .collect()
    }

    /// The message `Config::parse` fails with on `text`, as the file `t.toml`.
    fn parse_err(text: &str) -> String {
        Config::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = Config::parse(Path::new("/etc/tidemark/t.toml"), GOOD).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/tidemark/state"));
        let p = &c.pipelines[0];
        assert_eq!(p.scan_interval, Duration::from_secs(2));
        assert_eq!(p.max_delete, DeleteLimit::Percent(10.0));
        let SourceConfig::Dir(s) = &p.source else {
            panic!("a dir source")
        };
        assert_eq!(s.path, Path::new("/etc/tidemark/src"));
        assert!(p.target.prune());
        assert_eq!(c.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn a_scan_interval_of_zero_is_refused_on_its_line() {
        let bad = GOOD.replace("\"2s\"", "\"0s\"");
        let err = parse_err(&bad);
        let line = bad.lines().position(|l| l.contains("\"0s\"")).unwrap() + 1;
        assert!(err.contains(&format!("t.toml:{line}:")), "{err}");
        assert!(err.contains("`pipeline.demo.scan_interval`"), "{err}");
        assert!(err.contains("at least 100ms"), "{err}");
    }

    /// A pipeline from an API's `users` at `path` to a directory; `source_extra` (keys,
    /// then tables) goes into `[pipeline.source.http]` after `base_url`.
    fn api_config(base_url: &str, source_extra: &str, path: &str) -> String {
        format!(
            r#"state_dir = "state"
[[pipeline]]
name = "api"
[pipeline.source.http]
base_url = "{base_url}"
{source_extra}
[[pipeline.source.http.kind]]
name = "users"
path = "{path}"
[pipeline.target.dir]
path = "dst"
"#
        )
    }

    #[test]
    fn a_secret_written_in_the_config_is_refused_without_being_repeated() {
        let text = api_config(
            "http://127.0.0.1:9",
            "bearer = \"LITERAL-TOKEN-4f2a\"",
            "/users",
        );
        let err = parse_err(&text);
        assert!(!err.contains("LITERAL-TOKEN-4f2a"), "{err}");
        assert!(err.contains("never written in the config"), "{err}");
        assert!(err.contains("{ env = "), "{err}");
        // On the line that holds it, not on `[pipeline.source.http]`'s.
        assert!(err.contains("t.toml:6:"), "{err}");
        assert!(err.contains("`pipeline.api.source.http.bearer`"), "{err}");
        let header = api_config(
            "http://127.0.0.1:9",
            "[[pipeline.source.http.header]]\nname = \"X-Api-Key\"\nvalue = \"LITERAL-TOKEN-4f2a\"",
            "/users",
        );
        let err = parse_err(&header);
        assert!(!err.contains("LITERAL-TOKEN-4f2a"), "{err}");
        assert!(
            err.contains("`X-Api-Key` is a secret and is never written in the config"),
            "{err}"
        );
        assert!(err.contains("t.toml:8:"), "{err}");
    }

    /// Credentials in a URL (`user:pass@`, `?api_key=`) would stay in the file and show
    /// wherever the URL is reported: refused, named, never repeated.
    #[test]
    fn credentials_in_a_url_are_refused_without_being_repeated() {
        let config = |base_url: &str, path: &str| api_config(base_url, "", path);
        let err = parse_err(&config(
            "https://admin:Hunter2-pw@api.example.com/v1",
            "/users",
        ));
        assert!(!err.contains("Hunter2-pw"), "{err}");
        assert!(err.contains("user name or password"), "{err}");
        assert!(err.contains("t.toml:5:"), "on the base_url line: {err}");
        let err = parse_err(&config(
            "https://api.example.com/v1?api_key=K-9931",
            "/users",
        ));
        assert!(!err.contains("K-9931"), "{err}");
        assert!(
            err.contains("`api_key`") && err.contains("[[…query]]"),
            "{err}"
        );
        let err = parse_err(&config(
            "https://api.example.com",
            "/users?access_token=T-77",
        ));
        assert!(!err.contains("T-77"), "{err}");
        assert!(
            err.contains("kind `users`: path has `access_token`"),
            "{err}"
        );
        // Ordinary parameters are not credentials.
        let ordinary = config(
            "https://api.example.com?api-version=2024-01",
            "/users?author=ann&sort_key=id",
        );
        Config::parse(Path::new("t.toml"), &ordinary).unwrap();
    }

    /// A request timeout of 0 made every request time out (issue), and other durations
    /// of 0 make no more sense: refused on their line, naming the key. `reference_wait`
    /// may be 0 (fail an item with a missing reference at once), and `scan_interval` has
    /// its own floor.
    #[test]
    fn durations_of_zero_are_refused_on_their_line() {
        let http = |extra: &str| api_config("https://api.example.com", extra, "/users");
        let kafka = |extra: &str| {
            GOOD.replace(
                "[pipeline.source.dir]",
                &format!(
                    "[pipeline.log.kafka]\nbrokers = \"b:9092\"\n{extra}\n[pipeline.source.dir]"
                ),
            )
        };
        for (text, set, key) in [
            (
                format!("shutdown_timeout = \"0s\"\n{GOOD}"),
                "shutdown_timeout",
                "shutdown_timeout",
            ),
            (
                GOOD.replace("max_delete", "retry_max_backoff = \"0s\"\nmax_delete"),
                "retry_max_backoff",
                "pipeline.demo.retry_max_backoff",
            ),
            (
                GOOD.replace("max_delete", "failed_retry_interval = \"0ms\"\nmax_delete"),
                "failed_retry_interval",
                "pipeline.demo.failed_retry_interval",
            ),
            (
                kafka("session_timeout = \"0s\""),
                "session_timeout",
                "pipeline.demo.log.kafka.session_timeout",
            ),
            (
                kafka("session_timeout = \"500ms\""),
                "session_timeout",
                "pipeline.demo.log.kafka.session_timeout",
            ),
            (
                http("timeout = \"0s\""),
                "timeout",
                "pipeline.api.source.http.timeout",
            ),
            (
                http("retry_budget = \"0s\""),
                "retry_budget",
                "pipeline.api.source.http.retry_budget",
            ),
            (
                api_to_api(
                    "https://dev.example.com",
                    "https://prod.example.com",
                    "timeout = \"0s\"",
                ),
                "timeout",
                "pipeline.api.target.http.timeout",
            ),
        ] {
            let err = parse_err(&text);
            let line = last_line_with(&text, set);
            assert!(err.contains(&format!("t.toml:{line}: ")), "{err}\n{text}");
            assert!(err.contains(&format!("`{key}`: ")), "{err}");
            assert!(
                err.contains("must be more than 0s") || err.contains("must be at least 1s"),
                "{err}"
            );
        }
        Config::parse(
            Path::new("t.toml"),
            &api_to_api(
                "https://dev.example.com",
                "https://prod.example.com",
                "reference_wait = \"0s\"",
            ),
        )
        .unwrap();
    }

    /// A pipeline from the API at `source_url` to the one at `target_url`, both with the
    /// kind `users`; `target_extra` goes into `[pipeline.target.http]` after `base_url`.
    fn api_to_api(source_url: &str, target_url: &str, target_extra: &str) -> String {
        format!(
            "{}[pipeline.target.http]\nbase_url = \"{target_url}\"\n{target_extra}\n\
             [[pipeline.target.http.kind]]\nname = \"users\"\npath = \"/users\"\n",
            api_config(source_url, "", "/users")
                .replace("[pipeline.target.dir]\npath = \"dst\"\n", "")
        )
    }

    /// The 1-based line of the last line of `text` that contains `part`.
    fn last_line_with(text: &str, part: &str) -> usize {
        text.lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.contains(part))
            .unwrap()
            + 1
    }

    /// Two kinds of one name would be one kind listed or written twice: refused on the
    /// second one's `name` line, on either side (issue: both were accepted).
    #[test]
    fn two_rest_kinds_of_one_name_are_refused_on_the_second_ones_line() {
        let second = "[[pipeline.source.http.kind]]\nname = \"users\"\npath = \"/people\"\n";
        let source = api_to_api("https://dev.example.com", "https://prod.example.com", "").replace(
            "[pipeline.target.http]",
            &format!("{second}[pipeline.target.http]"),
        );
        let err = parse_err(&source);
        let line = last_line_with(
            source.split("[pipeline.target.http]").next().unwrap(),
            "name = \"users\"",
        );
        assert!(err.contains(&format!("t.toml:{line}: ")), "{err}\n{source}");
        assert!(
            err.contains("`pipeline.api.source.http.kind.users.name`")
                && err.contains("kind `users` is configured twice (the 1st and the 2nd"),
            "{err}"
        );
        let target = format!(
            "{}[[pipeline.target.http.kind]]\nname = \"users\"\npath = \"/people\"\n",
            api_to_api("https://dev.example.com", "https://prod.example.com", "")
        );
        let err = parse_err(&target);
        let line = last_line_with(&target, "name = \"users\"");
        assert!(err.contains(&format!("t.toml:{line}: ")), "{err}\n{target}");
        assert!(
            err.contains("`pipeline.api.target.http.kind.users.name`")
                && err.contains("configured twice"),
            "{err}"
        );
        // Different names are fine.
        Config::parse(
            Path::new("t.toml"),
            &target.replace(
                "name = \"users\"\npath = \"/people\"",
                "name = \"people\"\npath = \"/people\"",
            ),
        )
        .unwrap();
    }

    /// A REST target that is the source's API gets one more copy of every item at every
    /// sync (issue: accepted): refused on the target's `base_url`, however the URL is
    /// written. Another host, port, path or query is another API.
    #[test]
    fn a_rest_target_that_is_its_sources_api_is_refused() {
        for (source, target) in [
            ("https://api.example.com/v1", "https://api.example.com/v1"),
            (
                "https://api.example.com/v1",
                "HTTPS://API.Example.com:443/v1/",
            ),
            ("http://127.0.0.1:80", "http://127.0.0.1/"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ] {
            let text = api_to_api(source, target, "");
            let err = parse_err(&text);
            let line = last_line_with(&text, "base_url");
            assert!(err.contains(&format!("t.toml:{line}: ")), "{err}\n{text}");
            assert!(
                err.contains("`pipeline.api.target.http.base_url`")
                    && err.contains("is the source's API"),
                "{err}"
            );
        }
        for (source, target) in [
            ("https://api.example.com/v1", "https://api.example.com/v2"),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8081"),
            ("http://dev.example.com", "https://dev.example.com"),
            (
                "https://api.example.com/?env=dev",
                "https://api.example.com/?env=prod",
            ),
        ] {
            Config::parse(Path::new("t.toml"), &api_to_api(source, target, "")).unwrap();
        }
    }

    /// A credential in a kind's `path` is refused on the `path` line, naming the kind's key,
    /// not on its table's header: the error says where to edit.
    #[test]
    fn a_credential_in_a_kind_path_is_refused_on_the_path_line() {
        let text = api_config("https://api.example.com", "", "/users?access_token=T-77");
        let err = parse_err(&text);
        let line = text.lines().position(|l| l.contains("T-77")).unwrap() + 1;
        assert!(err.contains(&format!("t.toml:{line}:")), "{err}");
        assert!(
            err.contains("`pipeline.api.source.http.kind.users.path`"),
            "{err}"
        );
        assert!(!err.contains("T-77"), "{err}");

        let target = format!(
            "{}[pipeline.target.http]\nbase_url = \"https://prod.example.com\"\n\
             [[pipeline.target.http.kind]]\nname = \"users\"\nfind = \"/users?name={{name}}\"\n\
             path = \"/users?api_key=K-1\"\n",
            api_config("https://api.example.com", "", "/users")
                .replace("[pipeline.target.dir]\npath = \"dst\"\n", "")
        );
        let err = parse_err(&target);
        let line = target.lines().position(|l| l.contains("K-1")).unwrap() + 1;
        assert!(err.contains(&format!("t.toml:{line}:")), "{err}");
        assert!(
            err.contains("`pipeline.api.target.http.kind.users.path`"),
            "{err}"
        );
        assert!(!err.contains("K-1"), "{err}");
    }

    /// An endpoint's secret that cannot be read, or a bad `base_url`, is refused on the
    /// line of its own key (or `[[…header]]` entry), naming that key, not on the line of
    /// `[pipeline.source.http]`, which may be far above it.
    #[test]
    fn an_unreadable_secret_is_refused_on_its_own_line() {
        let var = "TIDEMARK_TEST_UNSET_BEARER_9F3";
        std::env::remove_var(var);
        let cases = [
            (
                api_config(
                    "https://api.example.com",
                    &format!("timeout = \"5s\"\nbearer = {{ env = \"{var}\" }}"),
                    "/users",
                ),
                var,
                "`pipeline.api.source.http.bearer`",
            ),
            (
                api_config(
                    "https://api.example.com",
                    "[[pipeline.source.http.header]]\nname = \"X-Api-Key\"\nfile = \"missing-key.txt\"",
                    "/users",
                ),
                "[[pipeline.source.http.header]]",
                "`pipeline.api.source.http.header`",
            ),
            (
                api_config("ftp://api.example.com", "", "/users"),
                "ftp://",
                "`pipeline.api.source.http.base_url`",
            ),
        ];
        for (text, on_line, key) in cases {
            let err = parse_err(&text);
            let line = text.lines().position(|l| l.contains(on_line)).unwrap() + 1;
            assert!(err.contains(&format!("t.toml:{line}:")), "{err}\n{text}");
            assert!(err.contains(key), "{err}");
        }
    }

    /// The commands that talk to no API load the config without its API secrets (issue:
    /// `tidemark status` needed both tokens); everything else is validated as it is for
    /// the others, a secret source's form included, and a secret that can be read is
    /// still read (for redaction).
    #[test]
    fn api_secrets_that_cannot_be_read_are_left_out_only_when_not_required() {
        let var = "TIDEMARK_TEST_UNSET_BEARER_4C1";
        std::env::remove_var(var);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.txt"), "readable-key-77\n").unwrap();
        let file = dir.path().join("t.toml");
        let text = api_config(
            "https://api.example.com",
            &format!(
                "bearer = {{ env = \"{var}\" }}\n[[pipeline.source.http.header]]\nname = \"X-Api-Key\"\nfile = \"key.txt\""
            ),
            "/users",
        );
        let err = Config::parse(&file, &text).unwrap_err().to_string();
        assert!(
            err.contains(var) && err.contains("`pipeline.api.source.http.bearer`"),
            "{err}"
        );
        let config = Config::parse_with(&file, &text, ApiSecrets::IfAvailable).unwrap();
        let h = http_source(&config);
        let headers = resolved_headers(h);
        assert_eq!(headers, [("X-Api-Key", "readable-key-77")]);
        // Not a way around the rest of the validation.
        for (bad, why) in [
            (
                text.replace(&format!("{{ env = \"{var}\" }}"), "{ }"),
                "set exactly one of `env`",
            ),
            (
                text.replace(
                    &format!("{{ env = \"{var}\" }}"),
                    &format!("{{ env = \"{var}\", file = \"key.txt\" }}"),
                ),
                "set exactly one of `env`",
            ),
            (text.replace("https://", "ftp://"), "must be http or https"),
            (
                text.replace("path = \"/users\"", "path = \"/users?api_key=K-3\""),
                "looks like a credential",
            ),
        ] {
            let err = Config::parse_with(&file, &bad, ApiSecrets::IfAvailable)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err}\n{bad}");
        }
    }

    /// A token from an environment variable with a trailing newline was sent as an
    /// invalid header, so the client left the Authorization header out with a warning;
    /// an empty one sent `Bearer ` (issue). Variables lose the whitespace around the
    /// secret, as files do, and one that is empty then is refused on the line of its key,
    /// naming the variable, never the value; a value no header can carry is refused too.
    #[test]
    fn a_secret_from_a_variable_is_trimmed_and_an_empty_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(dir.path().join("key.txt"), "  file-key-5 \r\n").unwrap();
        let var = "TIDEMARK_TEST_BEARER_TRIM_6D2";
        let text = api_config(
            "https://api.example.com",
            &format!(
                "timeout = \"5s\"\nbearer = {{ env = \"{var}\" }}\n[[pipeline.source.http.header]]\nname = \"X-Api-Key\"\nfile = \"key.txt\""
            ),
            "/users",
        );
        std::env::set_var(var, "tok-6d2\n");
        let config = Config::parse(&file, &text).unwrap();
        let headers = resolved_headers(http_source(&config));
        assert_eq!(
            headers,
            [
                ("authorization", "Bearer tok-6d2"),
                ("X-Api-Key", "file-key-5")
            ]
        );
        let line = last_line_with(&text, "bearer");
        for (value, says) in [
            ("", "is empty; put"),
            (" \n\t", "is empty but for whitespace"),
        ] {
            std::env::set_var(var, value);
            let err = Config::parse(&file, &text).unwrap_err().to_string();
            assert!(err.contains(&format!("t.toml:{line}: ")), "{err}");
            assert!(
                err.contains("`pipeline.api.source.http.bearer`")
                    && err.contains(&format!("environment variable `{var}` {says}")),
                "{err}"
            );
            // A command that needs no API secret leaves it out, as an unset one.
            let config = Config::parse_with(&file, &text, ApiSecrets::IfAvailable).unwrap();
            assert_eq!(
                resolved_headers(http_source(&config)),
                [("X-Api-Key", "file-key-5")]
            );
        }
        std::env::set_var(var, "tok-6d2\nX-Injected: 1");
        let err = Config::parse(&file, &text).unwrap_err().to_string();
        assert!(err.contains(&format!("t.toml:{line}: ")), "{err}");
        assert!(err.contains("cannot be sent in an HTTP header"), "{err}");
        assert!(
            !err.contains("tok-6d2") && !err.contains("Injected"),
            "{err}"
        );
        std::env::remove_var(var);
        let bad_name = text.replace("\"X-Api-Key\"", "\"X Api Key\"");
        let err = Config::parse_with(&file, &bad_name, ApiSecrets::IfAvailable)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid HTTP header name"), "{err}");
        // A Kafka secret property the same.
        std::env::set_var("TIDEMARK_TEST_EMPTY_SASL_6D2", "");
        let kafka = GOOD.replace(
            "[pipeline.source.dir]",
            "[pipeline.log.kafka]\nbrokers = \"b:9092\"\n[pipeline.log.kafka.secret_properties]\n\"sasl.password\" = { env = \"TIDEMARK_TEST_EMPTY_SASL_6D2\" }\n\n[pipeline.source.dir]",
        );
        let err = parse_err(&kafka);
        assert!(
            err.contains("`TIDEMARK_TEST_EMPTY_SASL_6D2` is empty")
                && err.contains("`pipeline.demo.log.kafka.secret_properties.sasl.password`"),
            "{err}"
        );
    }

    #[test]
    fn a_secret_query_parameter_is_resolved_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.txt"), "k/ey+42\n").unwrap();
        let path = dir.path().join("t.toml");
        let secrets = "[[pipeline.source.http.query]]\nname = \"api_key\"\nfile = \"key.txt\"\n\
                       [[pipeline.source.http.header]]\nname = \"X-Api-Key\"\nfile = \"key.txt\"";
        std::fs::write(
            &path,
            api_config("https://api.example.com", secrets, "/users"),
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        let h = http_source(&config);
        let headers = resolved_headers(h);
        assert_eq!(headers, [("X-Api-Key", "k/ey+42")]);
        let client = crate::http::HttpClient::new("api", "source", &h.endpoint);
        let url = client.url("/users?_page=2").unwrap();
        assert_eq!(
            url,
            "https://api.example.com/users?_page=2&api_key=k%2Fey%2B42"
        );
        assert_eq!(
            client.shown(&url),
            "https://api.example.com/users?_page=2&api_key=***"
        );
        // A next-page link that carries it already is left as it is.
        let link = "https://api.example.com/users?api_key=k%2Fey%2B42&_page=3";
        assert_eq!(client.url(link).as_deref(), Ok(link));
        assert_eq!(client.redact("raw k/ey+42"), "raw ***");
    }

    /// A bad glob was reported on the line of `[pipeline.source.dir]`, and a misspelled
    /// key inside an inline table of an HTTP side (`bearer = { evn = "X" }`) on the line
    /// of `[pipeline.source.http]` (issue): each is reported on its own line, naming its
    /// key.
    #[test]
    fn a_bad_glob_or_a_misspelled_inline_key_is_named_on_its_own_line() {
        for (text, on, key, says) in [
            (
                GOOD.replace(
                    "exclude = [\"*.tmp\"]",
                    "exclude = [\n  \"*.tmp\",\n  \"a[\",\n]",
                ),
                "\"a[\"",
                "`pipeline.demo.source.dir.exclude`",
                "bad glob `a[`",
            ),
            (
                GOOD.replace(
                    "exclude = [\"*.tmp\"]",
                    "follow_symlinks = false\ninclude = [\"*.txt\", \"b{\"]",
                ),
                "include",
                "`pipeline.demo.source.dir.include`",
                "bad glob `b{`",
            ),
            (
                api_config(
                    "https://api.example.com",
                    "timeout = \"5s\"\nbearer = { evn = \"X\" }",
                    "/users",
                ),
                "evn",
                "`pipeline.api.source.http.bearer`",
                "unknown field `evn`, expected `env` or `file`",
            ),
            (
                api_config(
                    "https://api.example.com",
                    "timeout = \"5s\"\nretries = 3",
                    "/users",
                ),
                "retries",
                "`pipeline.api.source.http`",
                "unknown field `retries`",
            ),
            (
                api_config(
                    "https://api.example.com",
                    "[[pipeline.source.http.header]]\nname = \"X-Key\"\nevn = \"K\"",
                    "/users",
                ),
                "evn",
                "`pipeline.api.source.http.header",
                "unknown field `evn`",
            ),
            (
                api_to_api(
                    "https://dev.example.com",
                    "https://prod.example.com",
                    "timeout = \"5s\"\nbearer = { file = \"t\", evn = \"X\" }",
                ),
                "evn",
                "`pipeline.api.target.http.bearer`",
                "unknown field `evn`",
            ),
        ] {
            let err = parse_err(&text);
            let line = last_line_with(&text, on);
            assert!(err.contains(&format!("t.toml:{line}:")), "{err}\n{text}");
            assert!(err.contains(key) && err.contains(says), "{err}");
        }
    }

    /// Two `[pipeline.source.*]` (or `target.*`) tables got serde's "wanted exactly 1
    /// element, more than 1 element" (issue): the error says what is wrong, on the line
    /// of the second table.
    #[test]
    fn a_pipeline_with_two_sources_or_targets_is_told_it_has_one() {
        let two_sources = api_config("https://api.example.com", "", "/users").replace(
            "[pipeline.target.dir]",
            "[pipeline.source.dir]\npath = \"src\"\n[pipeline.target.dir]",
        );
        let two_targets = GOOD.replace(
            "prune = true\n",
            "prune = true\n\n[pipeline.target.http]\nbase_url = \"https://api.example.com\"\n",
        );
        let inline = GOOD.replace(
            "[pipeline.source.dir]\npath = \"src\"\nexclude = [\"*.tmp\"]",
            "source = { http = { base_url = \"https://a.example.com\" }, dir = { path = \"src\" } }",
        );
        for (text, on, says) in [
            (
                &two_sources,
                "[pipeline.source.dir]",
                "a pipeline has exactly one source; found `dir` and `http`: keep one",
            ),
            (
                &two_targets,
                "[pipeline.target.http]",
                "a pipeline has exactly one target; found `dir` and `http`",
            ),
            (
                &inline,
                "source = {",
                "a pipeline has exactly one source; found `dir` and `http`",
            ),
        ] {
            let err = parse_err(text);
            let line = last_line_with(text, on);
            assert!(err.contains(&format!("t.toml:{line}:")), "{err}\n{text}");
            assert!(
                err.contains(says) && !err.contains("wanted exactly"),
                "{err}"
            );
        }
        // The column too: the second table's name in the inline table.
        let err = parse_err(&inline);
        let column = inline
            .lines()
            .find(|l| l.starts_with("source = {"))
            .unwrap()
            .find("dir =")
            .unwrap()
            + 1;
        assert!(err.contains(&format!(":{column}: ")), "{err}");
        // None, and one of an unknown kind.
        let none = GOOD.replace(
            "[pipeline.source.dir]\npath = \"src\"\nexclude = [\"*.tmp\"]",
            "source = {}",
        );
        let err = parse_err(&none);
        assert!(
            err.contains("a pipeline has exactly one source; found none: add one of [pipeline.source.dir] or [pipeline.source.http]"),
            "{err}"
        );
        let ftp = GOOD.replace("[pipeline.target.dir]", "[pipeline.target.ftp]");
        let err = parse_err(&ftp);
        assert!(
            err.contains("unknown variant `ftp`, expected `dir` or `http`"),
            "{err}"
        );
    }

    #[test]
    fn misspelled_key_names_key_and_line() {
        let bad = GOOD.replace("prune = true", "pruen = true");
        let err = parse_err(&bad);
        assert!(err.starts_with("t.toml:15:"), "{err}");
        assert!(err.contains("unknown field `pruen`"), "{err}");
    }

    #[test]
    fn bad_max_delete_is_explained() {
        let bad = GOOD.replace("\"10%\"", "\"lots\"");
        let err = parse_err(&bad);
        assert!(err.contains("t.toml:7:"), "{err}");
        assert!(err.contains("max_delete `lots`"), "{err}");
    }

    #[test]
    fn a_quoted_count_is_a_count() {
        let quoted = GOOD.replace("\"10%\"", "\"50\"");
        let config = Config::parse(Path::new("t.toml"), &quoted).unwrap();
        assert_eq!(config.pipelines[0].max_delete, DeleteLimit::Count(50));
        let negative = GOOD.replace("\"10%\"", "\"-1\"");
        assert!(parse_err(&negative).contains("max_delete `-1`"));
    }

    #[test]
    fn bad_duration_names_line() {
        let bad = GOOD.replace("\"2s\"", "\"soon\"");
        let err = parse_err(&bad);
        assert!(err.contains("t.toml:6:"), "{err}");
        assert!(err.contains("`pipeline.demo.scan_interval`"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let bad = GOOD.replace("prune = true", "prune = \"yes\"");
        let err = parse_err(&bad);
        assert!(err.starts_with("t.toml:15:"), "{err}");
        assert!(
            err.contains("`pipeline.demo.target.dir.prune`: invalid type"),
            "{err}"
        );
        let bad = GOOD.replace("exclude = [\"*.tmp\"]", "exclude = [\"*.tmp\", 3]");
        let err = parse_err(&bad);
        assert!(err.starts_with("t.toml:11:"), "{err}");
        assert!(
            err.contains("`pipeline.demo.source.dir.exclude.1`"),
            "{err}"
        );
        // A table missing a required key is named too.
        let bad = GOOD.replace("path = \"src\"\n", "");
        let err = parse_err(&bad);
        assert!(
            err.contains("`pipeline.demo.source.dir`: missing field `path`"),
            "{err}"
        );
    }

    #[test]
    fn overlapping_source_and_target_are_refused() {
        let bad = GOOD.replace("path = \"dst\"", "path = \"src/mirror\"");
        let err = parse_err(&bad);
        assert!(err.contains("overlap"), "{err}");
    }

    /// Pipelines `a` (`sa` → `ta`) and `b` (`sb` → `tb`).
    fn two_pipelines(ta: &str, tb: &str) -> String {
        format!(
            r#"state_dir = "state"
[[pipeline]]
name = "a"
[pipeline.source.dir]
path = "sa"
[pipeline.target.dir]
path = "{ta}"

[[pipeline]]
name = "b"
[pipeline.source.dir]
path = "sb"
[pipeline.target.dir]
prune = true
path = "{tb}"
"#
        )
    }

    /// Two pipelines writing one directory overwrite and prune each other's files: refused
    /// on the second one's `path` line, naming the first.
    #[test]
    fn two_pipelines_with_one_target_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cfg/t.toml");
        std::fs::create_dir_all(dir.path().join("cfg")).unwrap();
        let err = |text: &str| Config::parse(&file, text).unwrap_err().to_string();
        let same = two_pipelines("../dst_same", "../dst_same");
        let line = same
            .lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.contains("dst_same"))
            .unwrap()
            + 1;
        let e = err(&same);
        assert!(e.contains(&format!("t.toml:{line}: ")), "{e}");
        assert!(e.contains("`pipeline.b.target.dir.path`"), "{e}");
        assert!(e.contains("pipeline `a`"), "{e}");
        // The same directory written another way, one inside the other, or reached
        // through a symbolic link.
        let absolute = dir.path().join("dst_same").display().to_string();
        assert!(err(&two_pipelines("../dst_same", &absolute)).contains("pipeline `a`"));
        assert!(err(&two_pipelines("../dst_same/b", "../dst_same")).contains("pipeline `a`"));
        assert!(err(&two_pipelines("../dst_same", "../dst_same/b")).contains("pipeline `a`"));
        std::fs::create_dir(dir.path().join("dst_same")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("dst_same"), dir.path().join("link")).unwrap();
        assert!(err(&two_pipelines("../dst_same", "../link/b")).contains("pipeline `a`"));
        // Chained pipelines (one's target is the next one's source) and siblings are fine.
        Config::parse(&file, &two_pipelines("sb", "../dst_b")).unwrap();
        Config::parse(&file, &two_pipelines("../dst_same", "../dst_same2")).unwrap();
    }

    /// The state and reports directories inside a directory source were mirrored, and
    /// the daemon never went quiet; inside a directory target, `verify` reported them as
    /// drift (issue). Refused on the line of the key that puts them there: written any
    /// way (`..`, a symbolic link), and by default too.
    #[test]
    fn a_state_or_reports_directory_inside_a_source_or_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cfg/src")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("cfg/src"), dir.path().join("cfg/link"))
            .unwrap();
        let file = dir.path().join("cfg/t.toml");
        let err = |text: &str| Config::parse(&file, text).unwrap_err().to_string();
        for (set, key, side) in [
            ("state_dir = \"src/.tidemark\"", "state_dir", "source"),
            ("state_dir = \"src\"", "state_dir", "source"),
            ("state_dir = \"x/../src/state\"", "state_dir", "source"),
            ("state_dir = \"link/state\"", "state_dir", "source"),
            ("state_dir = \"dst/state\"", "state_dir", "target"),
            ("reports_dir = \"src/reports\"", "reports_dir", "source"),
            ("reports_dir = \"dst\"", "reports_dir", "target"),
        ] {
            let text = GOOD.replace("state_dir = \"state\"", set);
            let e = err(&text);
            assert!(e.contains("t.toml:2: "), "{set}: {e}");
            assert!(e.contains(&format!("`{key}`: the ")), "{set}: {e}");
            assert!(
                e.contains(&format!("inside the {side} directory")),
                "{set}: {e}"
            );
        }
        // Not set, they default to `state` beside the config file: the key that puts
        // the source or target around it is named, and what to set.
        let text = GOOD
            .replace("state_dir = \"state\"\n", "")
            .replace("path = \"src\"", "path = \".\"")
            .replace("path = \"dst\"", "path = \"../dst\"");
        let e = err(&text);
        let line = last_line_with(&text, "path = \".\"");
        assert!(e.contains(&format!("t.toml:{line}: ")), "{e}");
        assert!(
            e.contains("`pipeline.demo.source.dir.path`")
                && e.contains("`state_dir` is not set and defaults to")
                && e.contains("set `state_dir` to a directory outside it"),
            "{e}"
        );
        let text = GOOD
            .replace("state_dir = \"state\"\n", "")
            .replace("path = \"src\"", "path = \"../src\"")
            .replace("path = \"dst\"", "path = \".\"");
        let e = err(&text);
        assert!(
            e.contains("`pipeline.demo.target.dir.path`")
                && e.contains("holds the state directory"),
            "{e}"
        );
        // Beside them, or holding them, is fine.
        Config::parse(&file, GOOD).unwrap();
        Config::parse(
            &file,
            &GOOD.replace("state_dir = \"state\"", "state_dir = \".\""),
        )
        .unwrap();
        Config::parse(
            &file,
            &GOOD.replace("state_dir = \"state\"", "state_dir = \"srcs/state\""),
        )
        .unwrap();
    }

    /// A target written with `..` is shown and recorded resolved.
    #[test]
    fn a_target_path_is_resolved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cfg")).unwrap();
        let text = GOOD.replace("path = \"dst\"", "path = \"../d16\"");
        let c = Config::parse(&dir.path().join("cfg/t.toml"), &text).unwrap();
        let real = dir.path().canonicalize().unwrap().join("d16");
        assert_eq!(c.pipelines[0].target_dir(), Some(real.as_path()));
    }

    #[test]
    fn duplicate_key_is_quoted() {
        let bad = GOOD.replace(
            "scan_interval = \"2s\"",
            "scan_interval = \"2s\"\nscan_interval = \"3s\"",
        );
        let err = parse_err(&bad);
        assert!(err.starts_with("t.toml:7:"), "{err}");
        assert!(err.contains("scan_interval"), "{err}");
    }

    #[test]
    fn reports_default_under_state_and_retention_is_checked() {
        let c = Config::parse(Path::new("/etc/tidemark/t.toml"), GOOD).unwrap();
        assert_eq!(c.reports_dir, Path::new("/etc/tidemark/state/reports"));
        assert_eq!(c.report_retention, 100);
        let custom = format!("reports_dir = \"/var/log/tm\"\nreport_retention = 3\n{GOOD}");
        let c = Config::parse(Path::new("/etc/tidemark/t.toml"), &custom).unwrap();
        assert_eq!(c.reports_dir, Path::new("/var/log/tm"));
        assert_eq!(c.report_retention, 3);
        let bad = format!("report_retention = 0\n{GOOD}");
        let err = parse_err(&bad);
        assert!(err.starts_with("t.toml:1: `report_retention`"), "{err}");
    }

    #[test]
    fn delete_limit_rounds_down() {
        // Rounded down: emptying a source of one item (or three, at 50%) trips the guard.
        assert_eq!(DeleteLimit::Percent(50.0).allowed(1), 0);
        assert_eq!(DeleteLimit::Percent(50.0).allowed(2), 1);
        assert_eq!(DeleteLimit::Percent(50.0).allowed(3), 1);
        assert_eq!(DeleteLimit::Percent(100.0).allowed(3), 3);
        assert_eq!(DeleteLimit::Percent(10.0).allowed(1000), 100);
        assert_eq!(DeleteLimit::Count(3).allowed(1000), 3);
    }

    /// A Kafka property librdkafka refuses (an unknown name, a bad value) is a config
    /// error on that property's line, and the refused value is not repeated: it may be a
    /// credential written where it does not belong.
    #[test]
    fn a_kafka_property_librdkafka_refuses_is_named_on_its_line_without_its_value() {
        for (line, what) in [
            (
                "\"security.protocol\" = \"user:hunter2\"",
                "security.protocol",
            ),
            (
                "\"sasl.jaas.config\" = \"x password=hunter2\"",
                "sasl.jaas.config",
            ),
        ] {
            let text = GOOD.replace(
                "[pipeline.source.dir]",
                &format!("[pipeline.log.kafka]\nbrokers = \"b:9092\"\n[pipeline.log.kafka.properties]\n\"client.rack\" = \"r1\"\n{line}\n\n[pipeline.source.dir]"),
            );
            let err = parse_err(&text);
            let at = text.lines().position(|l| l == line).unwrap() + 1;
            assert!(err.contains(&format!("t.toml:{at}:")), "{err}");
            assert!(
                err.contains(&format!("log.kafka.properties.{what}"))
                    && err.contains("librdkafka refuses it"),
                "{err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    /// GOOD with a Kafka log whose `[…properties]` are `properties` (lines).
    fn kafka_with(properties: &str) -> String {
        GOOD.replace(
            "[pipeline.source.dir]",
            &format!("[pipeline.log.kafka]\nbrokers = \"b:9092\"\n[pipeline.log.kafka.properties]\n{properties}\n\n[pipeline.source.dir]"),
        )
    }

    /// This build's librdkafka has no TLS (the rdkafka crate's default features: no
    /// OpenSSL, no Cyrus SASL). `SASL_SSL`, the README's example, failed only in a
    /// command, and SCRAM only when a command made its client (issue): both, and every
    /// other TLS setting, are refused at load on their line, saying what this build
    /// supports.
    #[test]
    fn kafka_security_this_build_cannot_do_is_refused_on_its_line() {
        assert!(
            !kafka_features().split(',').any(|f| f == "ssl"),
            "this test pins a build without TLS: {}",
            kafka_features()
        );
        for (line, what, says) in [
            (
                "\"security.protocol\" = \"SASL_SSL\"",
                "security.protocol",
                "`SASL_SSL` needs TLS; this build supports",
            ),
            (
                "\"security.protocol\" = \"ssl\"",
                "security.protocol",
                "`SSL` needs TLS",
            ),
            (
                "\"sasl.mechanisms\" = \"SCRAM-SHA-256\"",
                "sasl.mechanisms",
                "SASL mechanism `SCRAM-SHA-256` is not built into this tidemark",
            ),
            (
                "\"sasl.mechanism\" = \"SCRAM-SHA-512\"",
                "sasl.mechanism",
                "`SCRAM-SHA-512` is not built into",
            ),
            (
                "\"sasl.mechanism\" = \"OAUTHBEARER\"",
                "sasl.mechanism",
                "`OAUTHBEARER` is not built into",
            ),
            (
                "\"sasl.mechanism\" = \"GSSAPI\"",
                "sasl.mechanism",
                "`GSSAPI` is not built into",
            ),
            (
                "\"sasl.mechanism\" = \"plain\"",
                "sasl.mechanism",
                "names are upper case: `PLAIN`",
            ),
            (
                "\"sasl.mechanism\" = \"PLAIN,SCRAM-SHA-256\"",
                "sasl.mechanism",
                "not one SASL mechanism librdkafka knows",
            ),
            (
                "\"ssl.ca.location\" = \"/etc/ssl/ca.pem\"",
                "ssl.ca.location",
                "OpenSSL not available at build time",
            ),
        ] {
            let text = kafka_with(&format!("\"client.rack\" = \"r1\"\n{line}"));
            let err = parse_err(&text);
            let at = text.lines().position(|l| l == line).unwrap() + 1;
            assert!(err.contains(&format!("t.toml:{at}: ")), "{err}");
            assert!(
                err.contains(&format!("`pipeline.demo.log.kafka.properties.{what}`")),
                "{err}"
            );
            assert!(err.contains(says), "{err}");
            assert!(
                err.contains("this build supports `security.protocol` `PLAINTEXT` or `SASL_PLAINTEXT` and `sasl.mechanism` `PLAIN`")
                    || says.contains("upper case"),
                "{err}"
            );
        }
        // What it can do.
        let ok = kafka_with(
            "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"tidemark\"",
        );
        Config::parse(Path::new("t.toml"), &ok).unwrap();
        // Another feature the build lacks says which it has.
        let err = parse_err(&kafka_with("\"compression.codec\" = \"zstd\""));
        assert!(
            err.contains("this build's librdkafka has gzip, snappy"),
            "{err}"
        );
        // A secret property this build cannot use, on its own line.
        std::env::set_var("TIDEMARK_TEST_SSL_KEY_PASSWORD", "k3y-pass");
        let text = GOOD.replace(
            "[pipeline.source.dir]",
            "[pipeline.log.kafka]\nbrokers = \"b:9092\"\n[pipeline.log.kafka.secret_properties]\n\"sasl.password\" = { env = \"TIDEMARK_TEST_SSL_KEY_PASSWORD\" }\n\"ssl.key.password\" = { env = \"TIDEMARK_TEST_SSL_KEY_PASSWORD\" }\n\n[pipeline.source.dir]",
        );
        let err = parse_err(&text);
        let at = last_line_with(&text, "ssl.key.password");
        assert!(err.contains(&format!("t.toml:{at}: ")), "{err}");
        assert!(
            err.contains("`pipeline.demo.log.kafka.secret_properties.ssl.key.password`")
                && err.contains("OpenSSL not available"),
            "{err}"
        );
        assert!(!err.contains("k3y-pass"), "{err}");
    }

    #[test]
    fn kafka_secrets_come_from_the_environment_never_the_config() {
        let kafka = GOOD.replace(
            "[pipeline.source.dir]",
            "[pipeline.log.kafka]\nbrokers = \"b:9092\"\n[pipeline.log.kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\n[pipeline.source.dir]",
        );
        let err = parse_err(&kafka);
        assert!(
            err.contains("sasl.password") && err.contains("secret_properties"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");

        std::env::set_var("TIDEMARK_TEST_SASL_PASSWORD", "hunter3");
        let ok = GOOD.replace(
            "[pipeline.source.dir]",
            "[pipeline.log.kafka]\nbrokers = \"b:9092\"\n[pipeline.log.kafka.secret_properties]\n\"sasl.password\" = { env = \"TIDEMARK_TEST_SASL_PASSWORD\" }\n\n[pipeline.source.dir]",
        );
        let c = Config::parse(Path::new("t.toml"), &ok).unwrap();
        let LogConfig::Kafka(k) = &c.pipelines[0].log else {
            panic!("kafka log expected")
        };
        assert_eq!(k.secret_properties[0].0, "sasl.password");
        assert_eq!(k.secret_properties[0].1.expose(), "hunter3");
        assert!(
            !format!("{c:?}").contains("hunter3"),
            "Debug shows the secret"
        );

        let missing = ok.replace("TIDEMARK_TEST_SASL_PASSWORD", "TIDEMARK_TEST_UNSET_VAR");
        let err = parse_err(&missing);
        assert!(err.contains("TIDEMARK_TEST_UNSET_VAR"), "{err}");
    }

    proptest::proptest! {
        /// No input makes the parser panic; every rejection names the file.
        #[test]
        fn any_text_parses_or_fails_cleanly(text in "\\PC{0,400}") {
            if let Err(e) = Config::parse(Path::new("p.toml"), &text) {
                proptest::prop_assert!(e.to_string().starts_with("p.toml"));
            }
        }

        /// Corrupting one byte of a good config never panics.
        #[test]
        fn corrupted_configs_fail_cleanly(at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
            let mut bytes = GOOD.as_bytes().to_vec();
            let i = at % bytes.len();
            bytes[i] = byte;
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = Config::parse(Path::new("p.toml"), &text) {
                proptest::prop_assert!(e.to_string().starts_with("p.toml"));
            }
        }
    }
}
