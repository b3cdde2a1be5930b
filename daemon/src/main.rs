//! The `tidemark` command line: parses arguments, sets up logging, and calls the library.
//!
//! Exit codes: 0 success; 1 error; 2 bad usage; 3 finished degraded (some items failed or
//! were left waiting, a scan had errors, or the delete guard withheld a scan's deletes; for
//! `sync --dry-run`, would); 4 `verify` found drift;
//! 128 + the signal's number when a signal stopped a one-shot `scan`, `project` or `sync`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tidemark::config::{ApiSecrets, Config};
use tidemark::daemon::{self, LISTEN_ADDR_FILE};
use tidemark::log::Patience;
use tidemark::metrics::metrics;
use tidemark::pipeline::Pipeline;
use tidemark::progress::{LogWriter, Progress};
use tidemark::projector::PlannedAction;
use tidemark::report::Report;
use tidemark::scanner::StartedListing;
use tidemark::state::{item_label, State, StateError};
use tidemark::verify;
use tokio_util::sync::CancellationToken;

const EXIT_DEGRADED: u8 = 3;
const EXIT_DRIFT: u8 = 4;

/// Whether stdout was found closed (or failing): the rest of the output is dropped.
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes a command's output to stdout. Unlike `print!`, a reader that has gone
/// (`tidemark status | head -1`) is no panic: the output is dropped from there on and the
/// command finishes its work (a sync still syncs every pipeline and writes its reports).
fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let text = args.to_string();
    let text = tidemark::http::redact_known(&text);
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            tracing::warn!("cannot write to stdout, the rest of the output is dropped: {e}");
        }
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Keep a target a faithful mirror of a source, through a replayable event log.
#[derive(Parser)]
#[command(name = "tidemark", version, about, long_about = None)]
struct Cli {
    /// Config file.
    #[arg(
        short,
        long,
        global = true,
        env = "TIDEMARK_CONFIG",
        default_value = "config/tidemark.toml"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// No progress bars and only warnings and errors in the log.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: every pipeline's scanner and projector, plus /metrics, /healthz,
    /// /readyz and /status. SIGINT/SIGTERM/SIGHUP finish in-flight work, commit and exit 0
    /// (129 for SIGHUP, so a supervisor restarting on failure starts it again on the config
    /// as it is now; 1 when `shutdown_timeout` passes first, naming the tasks still running).
    Run,
    /// List the source once and append its changes to the log.
    Scan(Select),
    /// Apply the log to the target until caught up.
    Project(Select),
    /// Scan and project at once (the target fills while the source is read), until the
    /// target has caught up with the scan; for one-shot use.
    Sync(SyncArgs),
    /// Show what `project` would do. Nothing is written to the target, the log or the
    /// state database; a dry-run report is kept in `reports_dir` (default
    /// `{state_dir}/reports`).
    Plan(Select),
    /// Offsets, lag, last scan, delete guard and failures per pipeline.
    Status(Select),
    /// Compare source and target item by item by checksum, mode and modification time;
    /// exit 4 on drift.
    Verify(Select),
    /// Move a projector's committed offset back (never forward): the events from there on
    /// are applied again.
    Replay {
        #[command(flatten)]
        select: Select,
        /// Offset to replay from (0 rebuilds the target).
        #[arg(long)]
        from: u64,
    },
    /// Read the event log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Rewrite the state database (log, index, applied state) into a new one without the
    /// space sled has not reclaimed, and put it in place. Stop the daemon first.
    Compact {
        /// Output format on stdout.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

impl Command {
    /// The subcommand's name, as typed.
    fn name(&self) -> &'static str {
        match self {
            Command::Run => "run",
            Command::Scan(_) => "scan",
            Command::Project(_) => "project",
            Command::Sync(_) => "sync",
            Command::Plan(_) => "plan",
            Command::Status(_) => "status",
            Command::Verify(_) => "verify",
            Command::Replay { .. } => "replay",
            Command::Log(_) => "log",
            Command::Compact { .. } => "compact",
        }
    }

    /// Whether the command needs the REST APIs' secrets: only those that talk to a source
    /// or target API do. The others read the state and the log, or ask the daemon (`plan`
    /// asks an API target nothing), so an on-call person needs no API token to run them.
    fn api_secrets(&self) -> ApiSecrets {
        match self {
            Command::Run
            | Command::Scan(_)
            | Command::Project(_)
            | Command::Sync(_)
            | Command::Verify(_) => ApiSecrets::Required,
            Command::Plan(_)
            | Command::Status(_)
            | Command::Replay { .. }
            | Command::Log(_)
            | Command::Compact { .. } => ApiSecrets::IfAvailable,
        }
    }
}

#[derive(Subcommand)]
enum LogCommand {
    /// Print events from an offset on, one JSON object a line. A Kafka log is read
    /// partition by partition (offsets count per partition).
    Tail {
        #[command(flatten)]
        select: Select,
        /// First offset to print, in every partition (default: the last 10 events of each).
        #[arg(long)]
        from: Option<u64>,
        /// Only this partition of a Kafka log (default: every partition).
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Print one event. On a Kafka log an offset exists once per partition: every
    /// partition's event at that offset is printed, unless `--partition` picks one.
    Show {
        #[command(flatten)]
        select: Select,
        /// Its offset.
        offset: u64,
        /// Only this partition of a Kafka log (default: every partition).
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Copy a pipeline's sled log (in `state_dir`) into the Kafka topic its config now
    /// names, keeping order, and move the projector's committed position to match, so
    /// syncing continues on Kafka with nothing applied twice.
    Migrate {
        #[command(flatten)]
        select: Select,
    },
}

#[derive(clap::Args)]
struct SyncArgs {
    #[command(flatten)]
    select: Select,
    /// Show what the sync would do (what the scan would find, then what projecting the
    /// log and those changes would do to the target). Nothing is written to the target,
    /// the log or the index; a dry-run report is kept in `reports_dir` (default
    /// `{state_dir}/reports`). Exits 3 where the sync would: a degraded scan, or items it
    /// would leave waiting or failed.
    #[arg(short = 'n', long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct Select {
    /// Only this pipeline (default: all).
    #[arg(short, long)]
    pipeline: Option<String>,
    /// Output format on stdout.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn init_logging(format: LogFormat, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// How long the process waits, once a command is done, for blocking calls still running.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

fn main() -> ExitCode {
    let cli = Cli::parse();
    tidemark::state::set_command(cli.command.name());
    let log_format = cli.log_format;
    init_logging(log_format, cli.quiet);
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    let result = runtime.block_on(dispatch(cli));
    // Calls into librdkafka still waiting on an unreachable broker (each bounded by its own
    // request timeout, up to a minute for a commit) hold nothing that is not durable or
    // given up by now: the process does not wait for them.
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(code) => code,
        Err(e) => {
            print_fatal(log_format, &fatal_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error that ends a command as one line: library errors already quote their cause,
/// so each cause is printed only once. Secrets are redacted where the errors are made.
fn fatal_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !message.contains(&cause) {
            message = if message.is_empty() {
                cause
            } else {
                format!("{message}: {cause}")
            };
        }
    }
    message
}

/// The error that ends the command, on stderr in the log's format: under
/// `--log-format json` a reader parsing each line as an event must not meet plain text.
/// Written directly, not as a `tracing` event, so `RUST_LOG` cannot filter it out.
fn print_fatal(format: LogFormat, message: &str) {
    let message = &*tidemark::http::redact_known(message);
    /// Fields in the order `tracing`'s JSON events have them.
    #[derive(serde::Serialize)]
    struct Event<'a> {
        timestamp: String,
        level: &'static str,
        message: &'a str,
        target: &'static str,
    }
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::to_string(&Event {
                timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                level: "ERROR",
                message,
                target: "tidemark",
            })
            .expect("an event serializes")
        ),
    }
}

/// A stop signal: its name and the exit code a command it stopped ends with (128 + its
/// number, as shells report a process a signal killed).
#[derive(Clone, Copy)]
struct Signal {
    name: &'static str,
    exit: u8,
}

/// Waits for the first SIGTERM, SIGINT or SIGHUP and returns it. A second one exits at once.
async fn shutdown_signal() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler installs");
    let first = tokio::select! {
        _ = term.recv() => Signal { name: "SIGTERM", exit: 143 },
        _ = int.recv() => Signal { name: "SIGINT", exit: 130 },
        _ = hup.recv() => {
            tracing::warn!(
                "SIGHUP: stopping cleanly; tidemark does not reload its config in place; it exits 129, so a supervisor that restarts on failure (systemd's Restart=on-failure) starts it again on the config as it is now"
            );
            Signal { name: "SIGHUP", exit: 129 }
        }
    };
    // A second signal means "now": committed work is durable, so exiting loses nothing.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        eprintln!(
            "second signal: exiting at once; uncommitted events are applied again on restart"
        );
        std::process::exit(130);
    });
    first
}

/// For a one-shot `scan`, `project` or `sync`: a token the first stop signal cancels, and
/// the signal, once one came. The run then finishes and commits the batch in flight,
/// starts no other, writes its report and exits 128 + the signal's number.
fn one_shot_stop() -> (
    CancellationToken,
    std::sync::Arc<std::sync::OnceLock<Signal>>,
) {
    let stop = CancellationToken::new();
    let got = std::sync::Arc::new(std::sync::OnceLock::new());
    let (token, slot) = (stop.clone(), got.clone());
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        tracing::warn!(
            "{}: stopping: the batch in flight is finished and committed, no other is started; the next run goes on from there (a second signal exits at once)",
            signal.name
        );
        let _ = slot.set(signal);
        token.cancel();
    });
    (stop, got)
}

struct Session {
    config: Config,
    state: State,
    /// Where an empty state lives for a read-only command run before anything else (see
    /// [`Session::open_read_only`]); removed after `state` is closed.
    scratch: Option<tempfile::TempDir>,
}

impl Session {
    fn open(config: Config) -> Result<Session> {
        let state = State::open(&config.state_dir)?;
        tidemark::state::warn_if_open_to_others(&config.state_dir, &config.reports_dir);
        Ok(Session {
            config,
            state,
            scratch: None,
        })
    }

    /// For commands that only read (`status`, `plan`, `verify`, `log`): a state directory
    /// that does not exist yet is not created; they see an empty state, as nothing has
    /// run with this config.
    fn open_read_only(config: Config) -> Result<Session> {
        if config.state_dir.exists() {
            return Session::open(config);
        }
        let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
        let state = State::open(scratch.path())?;
        Ok(Session {
            config,
            state,
            scratch: Some(scratch),
        })
    }

    fn pipelines(&self, select: &Select) -> Result<Vec<Pipeline>> {
        self.config
            .select(select.pipeline.as_deref())
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(|p| Pipeline::build(p, &self.state, Patience::OneShot).map_err(Into::into))
            .collect()
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let config = Config::load_with(&cli.config, cli.command.api_secrets())?;
    let show_progress = !cli.quiet;
    match cli.command {
        Command::Run => {
            let dir = config.state_dir.clone();
            let got = std::sync::Arc::new(std::sync::OnceLock::new());
            let seen = got.clone();
            daemon::run(config, async move {
                let _ = seen.set(shutdown_signal().await);
            })
            .await?;
            // As a one-shot run does: the next start need not read all it wrote back.
            if metrics().events_written() >= CHECKPOINT_AFTER {
                checkpoint(&dir);
            }
            // SIGHUP is how operators ask a daemon to reload; exiting non-zero makes a
            // supervisor that restarts on failure start it again on the config as it is now.
            Ok(match got.get() {
                Some(signal) if signal.name == "SIGHUP" => ExitCode::from(signal.exit),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Status(select) => status(config, &select).await,
        Command::Scan(select) => scan_project(config, &select, true, false, show_progress).await,
        Command::Project(select) => scan_project(config, &select, false, true, show_progress).await,
        Command::Sync(args) if args.dry_run => {
            dry_sync(
                Session::open_read_only(config)?,
                &args.select,
                show_progress,
            )
            .await
        }
        Command::Sync(args) => scan_project(config, &args.select, true, true, show_progress).await,
        Command::Plan(select) => plan(Session::open_read_only(config)?, &select).await,
        Command::Verify(select) => {
            let session = Session::open_read_only(config)?;
            let mut drift = false;
            let mut reports = Vec::new();
            for p in session.pipelines(&select)? {
                let progress = Progress::new(show_progress, "verify", None);
                let report = verify::verify(&p.config, &session.state, &progress).await?;
                progress.finish();
                drift |= !report.is_clean();
                if select.output == Output::Text {
                    out!("{}", report.to_text(p.name()));
                }
                reports.push(json!({"pipeline": p.name(), "report": report}));
            }
            if select.output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&reports)?);
            }
            Ok(if drift {
                ExitCode::from(EXIT_DRIFT)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Replay { select, from } => {
            let session = Session::open(config)?;
            let pipelines = session.pipelines(&select)?;
            let nothing_moved = if pipelines.len() > 1 {
                "; no pipeline was replayed (offsets are per pipeline: choose one with --pipeline)"
            } else {
                ""
            };
            // Every selected pipeline is checked before any is moved: offsets are per
            // pipeline, and a refusal half-way would leave the ones before it replayed
            // while the error reads as if nothing happened. Offsets count per partition
            // (one partition for sled): `from` applies to each, and the events to apply
            // again are summed over them.
            let mut checked = Vec::with_capacity(pipelines.len());
            for p in &pipelines {
                // Another config's log: a replay writes its events into this target.
                p.projector.check_owner(false)?;
                if let (1.., Some(was)) = (from, p.projector.changed_target()?) {
                    anyhow::bail!(
                        "pipeline `{}`: the target changed from {was}: only `--from 0` builds the new one (what was applied below {from} went to the old one){nothing_moved}",
                        p.name()
                    );
                }
                p.log.connect().await?;
                if let Some(why) = p.projector.replay_unweighed(from).await? {
                    anyhow::bail!("pipeline `{}`: {why}{nothing_moved}", p.name());
                }
                let partitions = p.log.partitions();
                let mut heads = Vec::new();
                for partition in 0..partitions {
                    heads.push(p.log.head(partition).await?);
                }
                let top = heads.iter().copied().max().unwrap_or(0);
                anyhow::ensure!(
                    from <= top,
                    "pipeline `{}`: --from {from} is past the log head {top}{}{nothing_moved}",
                    p.name(),
                    if partitions > 1 {
                        " of its largest partition"
                    } else {
                        ""
                    }
                );
                // Forward would mark events never applied as done: the target would miss
                // them for good.
                for (partition, part_head) in heads.iter().enumerate() {
                    let committed = p.projector.committed(partition as u32).await?;
                    if from <= committed {
                        continue;
                    }
                    if committed < *part_head {
                        anyhow::bail!(
                            "pipeline `{}`: --from {from} is past the committed offset {committed}{}; replay only moves it back (the events from {committed} on are not applied yet, and `project` applies them){nothing_moved}",
                            p.name(),
                            if partitions > 1 { format!(" of partition {partition}") } else { String::new() }
                        );
                    }
                    anyhow::bail!(
                        "pipeline `{}`: --from {from} is past the end of partition {partition}, which holds {part_head} events, all applied; on a Kafka log --from counts per partition and moves every partition to it, so give at most {committed}{nothing_moved}",
                        p.name(),
                    );
                }
                checked.push((heads.iter().sum::<u64>(), partitions, heads));
            }
            let mut out = Vec::new();
            for (p, (head, partitions, heads)) in pipelines.iter().zip(checked) {
                // At most: `compact` drops superseded events, which offsets still count.
                let to_apply: u64 = heads.iter().map(|h| h.saturating_sub(from)).sum();
                p.projector.replay(from).await?;
                if select.output == Output::Text {
                    outln!(
                        "pipeline {}: committed offset set to {from}{}; up to {to_apply} events{} will be applied again by `project` or `run`",
                        p.name(),
                        if partitions > 1 { " in each partition" } else { "" },
                        if partitions > 1 { " (summed over the partitions)" } else { "" },
                    );
                }
                out.push(json!({"pipeline": p.name(), "committed": from, "head": head, "to_apply": to_apply}));
            }
            if select.output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&out)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(cmd) => match cmd {
            LogCommand::Migrate { .. } => log_command(Session::open(config)?, cmd).await,
            _ => log_command(Session::open_read_only(config)?, cmd).await,
        },
        Command::Compact { output } => {
            let progress = Progress::new(show_progress, "compact", None);
            let dir = config.state_dir.clone();
            let done = tokio::task::spawn_blocking(move || {
                let done = State::compact(&dir, &progress);
                progress.finish();
                done
            })
            .await
            .context("the compaction task failed")??;
            match output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&done)?),
                Output::Text => outln!("state {} {done}", config.state_dir.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn status(config: Config, select: &Select) -> Result<ExitCode> {
    // Checked here, not only when the state is opened: a misspelled name must not read
    // as "nothing to report" when the daemon answers instead.
    config
        .select(select.pipeline.as_deref())
        .map_err(anyhow::Error::msg)?;
    let last_daemon = tidemark::state::last_daemon(&config.state_dir);
    let mut statuses: Vec<serde_json::Value> = match Session::open_read_only(config.clone()) {
        Ok(session) => {
            // The state opened, so no daemon holds it: one that held it last is not
            // running (stopped, or killed); on-call must see that it is down, and what its
            // projector was retrying when it stopped (a target that refuses writes).
            let gone = last_daemon.map(|h| h.to_string());
            let mut out = Vec::new();
            for p in session.pipelines(select)? {
                let mut s = serde_json::to_value(p.status().await?)?;
                s["daemon_not_running"] = gone.clone().into();
                s["projector_was_retrying"] = serde_json::to_value(p.projector.noted_outage())?;
                out.push(s);
            }
            out
        }
        Err(e) => {
            let Some(StateError::Locked { path, holder }) = e.downcast_ref::<StateError>() else {
                return Err(e);
            };
            // A one-shot run serves no status: its error says whose it is and what to do.
            let daemon = holder.as_ref().and_then(|h| h.is_daemon());
            if daemon == Some(false) {
                return Err(e);
            }
            // The daemon holds the database: ask it. One just started writes its address
            // once it listens.
            let addr_file = config.state_dir.join(LISTEN_ADDR_FILE);
            let wait = if daemon == Some(true) {
                tidemark::state::HOLDER_WAIT
            } else {
                std::time::Duration::ZERO
            };
            let addr = read_when_there(&addr_file, wait).await.map_err(|read| {
                match daemon {
                    Some(_) => anyhow::anyhow!("{e}; and {} cannot be read: {read}", addr_file.display()),
                    // Not known to be the daemon, and no daemon's address: a one-shot
                    // run, or a tidemark that has not said which it is.
                    None => anyhow::anyhow!(
                        "state directory {} is in use by another tidemark process{}, and no daemon serves its status there ({} does not exist): probably a one-shot run; try again once it has ended",
                        path.display(),
                        holder.as_ref().map(|h| format!(", {h}")).unwrap_or_default(),
                        addr_file.display()
                    ),
                }
            })?;
            let url = format!("http://{}/status", addr.trim());
            // Straight to the daemon, with its token: never through a proxy `http_proxy`
            // names (which would get the token), never on to where a redirect points.
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()?;
            let mut request = client.get(&url);
            let token_var = config.status_token_env.as_deref();
            // As the daemon reads it: without the whitespace around it.
            let token = token_var
                .and_then(|v| std::env::var(v).ok())
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            if let Some(token) = &token {
                tidemark::http::remember_secret(token);
                request = request.bearer_auth(token);
            }
            let all = request
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| {
                    let hint = status_token_hint(&e, token_var, token.is_some());
                    let e = anyhow::Error::new(e.without_url())
                        .context(format!("asking the running daemon at {url}"));
                    match hint {
                        Some(hint) => anyhow::anyhow!("{e:#}; {hint}"),
                        None => e,
                    }
                })?;
            if all.status().is_redirection() {
                anyhow::bail!(
                    "asking the running daemon at {url}: HTTP {} (a redirect), not followed: a tidemark daemon never redirects; check that {} names this daemon's address",
                    all.status(),
                    addr_file.display()
                );
            }
            let all: Vec<serde_json::Value> = all.json().await?;
            all.into_iter()
                .filter(|s| {
                    select
                        .pipeline
                        .as_deref()
                        .is_none_or(|n| s["pipeline"] == n)
                })
                .collect()
        }
    };
    // Asked of a running daemon, the fields are there too (`null`: it runs).
    for s in statuses
        .iter_mut()
        .filter(|s| s.get("daemon_not_running").is_none())
    {
        s["daemon_not_running"] = serde_json::Value::Null;
        s["projector_was_retrying"] = serde_json::Value::Null;
    }
    // A first run whose source cannot be read stops before it creates the state, so it
    // records no scan: what it met is shown as the source is now.
    for s in statuses.iter_mut().filter(|s| s["last_scan"].is_null()) {
        let pipeline = s["pipeline"].as_str().unwrap_or_default();
        if let Some(message) = source_unreadable(&config, pipeline) {
            s["source_error"] = message.into();
        }
    }
    // A pipeline whose status is partly unknown (its log cannot be read, as with a Kafka
    // broker down) fails the command, as it does without a daemon, after what is known.
    // So does one that no run applies anything to until a person settles it.
    let errors: Vec<&str> = statuses
        .iter()
        .flat_map(|s| [s["error"].as_str(), s["blocked"].as_str()])
        .flatten()
        .collect();
    let code = if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if select.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&statuses)?);
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("; "));
        }
        return Ok(code);
    }
    for s in &statuses {
        outln!(
            "pipeline {} ({} log)",
            s["pipeline"].as_str().unwrap_or("?"),
            s["log"].as_str().unwrap_or("?")
        );
        if let Some(last) = s["daemon_not_running"].as_str() {
            outln!(
                "  NO DAEMON RUNNING: the last one, {last}, has stopped (or was killed); nothing is scanned or applied until it runs again"
            );
        }
        if let Some(error) = s["error"].as_str() {
            outln!("  ERROR: {error}");
            if s.get("max_delete").is_none() {
                // The daemon could not read even the local state: nothing else is known.
                continue;
            }
        }
        if let Some(blocked) = s["blocked"].as_str() {
            outln!("  BLOCKED: nothing is applied, whatever the lag reads: {blocked}");
        }
        if s["head"].is_null() {
            outln!("  head ?  committed ?  lag ? (unknown while the log cannot be read)");
        } else {
            outln!(
                "  head {}  committed {}  lag {} events, {:.1} s",
                s["head"],
                s["committed"],
                s["lag_events"],
                s["lag_seconds"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(parts) = s["partitions"].as_array().filter(|p| p.len() > 1) {
            for part in parts {
                outln!(
                    "    partition {}: head {}  committed {}  lag {} events, {:.1} s",
                    part["partition"],
                    part["head"],
                    part["committed"],
                    part["lag_events"],
                    part["lag_seconds"].as_f64().unwrap_or(0.0)
                );
            }
        }
        let at = |r: &serde_json::Value, field: &str| {
            r[field]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
        };
        let since = |r: &serde_json::Value| {
            at(r, "since").map_or("?".into(), |t| {
                t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            })
        };
        if let Some(r) = s.get("projector_retrying").filter(|r| !r.is_null()) {
            let next = at(r, "next_attempt_at").map_or(String::new(), |t| {
                let secs = (t - chrono::Utc::now()).num_milliseconds().max(0) as f64 / 1000.0;
                format!(", the next in {secs:.1} s")
            });
            outln!(
                "  projector: retrying since {} ({} failed attempts{next}): {}",
                since(r),
                r["attempts"],
                r["error"].as_str().unwrap_or("?")
            );
        }
        if let Some(r) = s.get("projector_was_retrying").filter(|r| !r.is_null()) {
            outln!(
                "  projector: was retrying since {} when the daemon stopped ({} failed attempts): {}; the next `run`, `sync` or `project` tries again",
                since(r),
                r["attempts"],
                r["error"].as_str().unwrap_or("?")
            );
        }
        let scans = s["role"].as_str() != Some("project");
        if !scans {
            outln!("  source: not scanned by this daemon (role = \"project\"): the daemon with role \"scan\" or \"both\" scans, and its `tidemark status` shows its scans and source freshness (as does `tidemark_source_freshness_seconds` in its /metrics)");
        }
        match s["source_freshness_seconds"].as_f64() {
            _ if !scans => {}
            Some(f) => {
                outln!("  source freshness {f:.1} s (since the last complete, error-free scan)")
            }
            None => outln!("  source freshness: no complete, error-free scan yet"),
        }
        match s.get("last_scan").filter(|v| !v.is_null()) {
            _ if !scans => {}
            Some(scan) => outln!(
                "  last scan {} at {}: {} ({} listed, {} upserts, {} deletes, {} errors, {:.2} s)",
                scan["id"].as_str().unwrap_or("?"),
                scan["started_at"].as_str().unwrap_or("?"),
                scan["result"].as_str().unwrap_or("?"),
                scan["listed"],
                scan["upserts"],
                scan["deletes"],
                scan["errors"],
                scan["duration_secs"].as_f64().unwrap_or(0.0)
            ),
            None => match s["source_error"].as_str() {
                _ if !s["scan_in_progress"].is_null() => outln!("  no scan finished yet"),
                Some(message) => outln!("  no scan recorded; a scan now fails: {message}"),
                None => outln!("  no scan yet"),
            },
        }
        if let Some(scan) = s.get("last_scan").filter(|v| !v.is_null()) {
            let shown: Vec<&str> = match scan["error_messages"].as_array() {
                Some(all) => all.iter().filter_map(|m| m.as_str()).collect(),
                // A scan recorded before the errors were kept: its first one.
                None => scan["message"].as_str().into_iter().collect(),
            };
            for m in &shown {
                outln!("    error: {m}");
            }
            let more = scan["errors"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(shown.len() as u64);
            if more > 0 && !shown.is_empty() {
                outln!("    and {more} more errors (the log names each)");
            }
        }
        if let Some(scan) = s.get("scan_in_progress").filter(|v| !v.is_null()) {
            let started = scan["started_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            let running = started.map_or(String::new(), |t| {
                let secs = (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
                format!(" ({secs:.1} s)")
            });
            outln!(
                "  scan {} in progress since {}{running}: {} listed, {} upserts and {} deletes appended, {} errors so far",
                scan["id"].as_str().unwrap_or("?"),
                started.map_or("?".into(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
                scan["listed"],
                scan["upserts"],
                scan["deletes"],
                scan["errors"]
            );
        }
        outln!("  max_delete {}", s["max_delete"].as_str().unwrap_or("?"));
        if let Some(g) = s.get("delete_guard").filter(|v| !v.is_null()) {
            outln!(
                "  DELETE GUARD TRIPPED: the last scan would delete {} items, max_delete = {} allows {}; no deletes were emitted",
                g["would_delete"], g["limit"].as_str().unwrap_or("?"), g["allowed"]
            );
        }
        let back = s["retained_back"].as_u64().unwrap_or(0);
        if let Some(why) = s["retained_withheld"].as_str() {
            outln!("  RETAINED DELETES WITHHELD: {why}");
        } else if let Some(n) = s["retained_deletes"].as_u64().filter(|n| *n > 0) {
            if s["prune"] == true {
                outln!(
                    "  {n} deletes retained while prune was off: applied by the next `sync` or `project`, or by the daemon once its projector has caught up"
                );
            } else {
                outln!(
                    "  {n} deletes retained (not applied while prune is off): the target keeps those items until prune = true, then they are applied once the projector has caught up"
                );
            }
        }
        if back > 0 {
            outln!(
                "  {back} of the retained deletes are of items the source has again: not applied; the next scan brings those items up to date"
            );
        }
        if let Some(deferred) = s["deferred"].as_array().filter(|d| !d.is_empty()) {
            outln!("  {} deferred items:", deferred.len());
            for d in deferred.iter().take(20) {
                outln!(
                    "    {} (offset {}, since {}): {}",
                    item_label(
                        d["kind"].as_str().unwrap_or("?"),
                        d["key"].as_str().unwrap_or("?"),
                        d["name"].as_str()
                    ),
                    d["offset"],
                    d["since"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("?")
                );
            }
        }
        if let Some(failed) = s["failed"].as_array().filter(|f| !f.is_empty()) {
            outln!("  {} failed items:", failed.len());
            for f in failed.iter().take(20) {
                outln!(
                    "    {} (offset {}): {}",
                    item_label(
                        f["kind"].as_str().unwrap_or("?"),
                        f["key"].as_str().unwrap_or("?"),
                        f["name"].as_str()
                    ),
                    f["offset"],
                    f["reason"].as_str().unwrap_or("?")
                );
            }
            if let Some(first) = failed.iter().filter_map(|f| f["offset"].as_u64()).min() {
                outln!(
                    "  {}",
                    retry_hint(s["pipeline"].as_str().unwrap_or("?"), first)
                );
            }
        }
    }
    Ok(code)
}

/// Why `pipeline`'s directory source cannot be walked now, if it cannot (see
/// `tidemark::source::fs::root_dir`).
fn source_unreadable(config: &Config, pipeline: &str) -> Option<String> {
    let p = config.pipelines.iter().find(|p| p.name == pipeline)?;
    let tidemark::config::SourceConfig::Dir(d) = &p.source else {
        return None;
    };
    tidemark::source::fs::root_dir(&d.path).err()
}

/// The contents of `file`, waiting up to `wait` for it to be there.
async fn read_when_there(
    file: &std::path::Path,
    wait: std::time::Duration,
) -> std::io::Result<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match std::fs::read_to_string(file) {
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            read => return read,
        }
    }
}

/// What to do when the daemon refused `status` for want of its token (401): which
/// variable to export. Names the variable, never prints its value.
fn status_token_hint(e: &reqwest::Error, var: Option<&str>, set: bool) -> Option<String> {
    let refused = e.status() == Some(reqwest::StatusCode::UNAUTHORIZED);
    refused.then(|| match (var, set) {
        (Some(var), false) => format!(
            "the daemon's /status needs its bearer token: export {var} (named by status_token_env) with the token the daemon was started with, then run `tidemark status` again"
        ),
        (Some(var), true) => format!(
            "the daemon refused the token in {var}: export {var} with the token the daemon was started with"
        ),
        (None, _) => "the daemon's /status needs a bearer token: set status_token_env in this config to the variable the daemon reads it from, and export that variable".into(),
    })
}

/// The walk of the first selected pipeline's source directory, started before the state
/// database is opened. Opening sled reads a header from every segment of its file (50–90
/// ms on a cold cache for the state of 100k files), and the walk needs nothing from the
/// state, so it runs meanwhile. A run that then fails to open the state just drops it.
/// REST sources are listed by their scanner as before: their requests go through the
/// scanner's client, which holds the `in_flight` limit.
struct EarlyListing {
    pipeline: String,
    listing: StartedListing,
}

impl EarlyListing {
    fn start(config: &Config, select: &Select) -> Option<EarlyListing> {
        let first = *config.select(select.pipeline.as_deref()).ok()?.first()?;
        if !matches!(first.source, tidemark::config::SourceConfig::Dir(_)) {
            return None;
        }
        Some(EarlyListing {
            pipeline: first.name.clone(),
            listing: StartedListing::start(tidemark::source::build(first)),
        })
    }
}

async fn scan_project(
    config: Config,
    select: &Select,
    scan: bool,
    project: bool,
    show_progress: bool,
) -> Result<ExitCode> {
    // A first run whose source cannot be walked fails before it creates a state directory.
    if scan && !config.state_dir.exists() {
        for p in config
            .select(select.pipeline.as_deref())
            .unwrap_or_default()
        {
            if let tidemark::config::SourceConfig::Dir(d) = &p.source {
                if let Err(message) = tidemark::source::fs::root_dir(&d.path) {
                    anyhow::bail!("pipeline `{}`: {message}", p.name);
                }
            }
        }
    }
    let run_started = chrono::Utc::now();
    let mut early = scan.then(|| EarlyListing::start(&config, select)).flatten();
    let session = Session::open(config)?;
    // Installed once the state is open: Ctrl-C before that has nothing to commit.
    let (stop, signalled) = one_shot_stop();
    let mut degraded = false;
    // Events appended and applied: what this run wrote to the state database.
    let mut written = 0;
    let mut out = Entries {
        output: select.output,
        entries: Vec::new(),
    };
    let run = match (scan, project) {
        (true, false) => "scan",
        (false, true) => "project",
        _ => "sync",
    };
    for p in session.pipelines(select)? {
        let mut entry = json!({"pipeline": p.name()});
        let mut run_report = Report::new(p.name(), run, false, p.config.max_delete);
        // A log that cannot be reached ends the run before it starts, in seconds (a Kafka
        // broker that is down), instead of a scan whose appends all fail. On a log daemons
        // share, a projecting run takes every partition first (and gives them back at the
        // end), or refuses while a daemon holds some.
        // Taking them may watch the leases for up to 1.5 × session_timeout: a signal
        // ends the watch at once (nothing is taken then).
        // A target changed under applied state refuses the run before its scan appends
        // anything, as `plan` does, not after.
        let ready = match p.log.connect().await {
            Err(e) => Err(format!("pipeline `{}`: {e}", p.name())),
            Ok(()) if project => match p.projector.check_target(false).await {
                Err(e) => Err(e.to_string()),
                Ok(()) => tokio::select! {
                    biased;
                    _ = stop.cancelled() => Ok(()),
                    taken = p.projector.take_all() => taken.map_err(|e| e.to_string()),
                },
            },
            Ok(()) => Ok(()),
        };
        if let (Ok(()), Some(signal)) = (&ready, signalled.get().filter(|_| project)) {
            let message = format!(
                "interrupted by {} while waiting for the partition leases: nothing was scanned, appended or applied; run `tidemark {run}` again",
                signal.name
            );
            let report_dir = write_report(&session, &run_report.with_interruption(&message));
            out.end(entry, "interrupted", &message, report_dir)?;
            return Ok(ExitCode::from(signal.exit));
        }
        if let Err(e) = ready {
            let message = format!("{e} (nothing was scanned, appended or applied)");
            let report_dir = write_report(&session, &run_report.with_error(&message));
            out.end(entry, "error", &message, report_dir)?;
            anyhow::bail!(message);
        }
        // A first projection into a target that already holds entries says, at its end,
        // how many of them the source does not have (looked at before it writes any).
        let prefilled = project.then(|| p.prefilled()).flatten();
        // `sync` projects while it scans, so the target fills as the source is read.
        let scan_bar = scan.then(|| Progress::new(show_progress, "scan", None));
        // `project` counts towards the log's head once it has read it; `sync` cannot know
        // the total while the scan appends.
        let project_bar = project.then(|| match scan {
            true => Progress::new(show_progress, "project", None),
            false => Progress::counting(show_progress, "project"),
        });
        let scanning = CancellationToken::new();
        let scanned = async {
            let scan_bar = scan_bar.as_ref()?;
            let listing = early.take_if(|e| e.pipeline == p.name()).map(|e| e.listing);
            let record = p.scanner.scan_listing(scan_bar, listing, &stop).await;
            scan_bar.finish();
            scanning.cancel();
            Some(record)
        };
        let projected = async {
            let project_bar = project_bar.as_ref()?;
            let report = if scan {
                p.projector.follow(project_bar, &scanning, &stop).await
            } else {
                p.projector.catch_up(project_bar, &stop).await
            };
            project_bar.finish();
            Some(report)
        };
        let (scanned, projected) = tokio::join!(scanned, projected);
        if project {
            // Projected and committed: hand the partitions back, so a daemon takes them at
            // once (else they expire after 1.5 × session_timeout).
            match tokio::time::timeout(RELEASE_WAIT, p.log.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    pipeline = %p.name(),
                    "{e}; they expire after 1.5 × session_timeout"
                ),
                Err(_) => tracing::warn!(
                    pipeline = %p.name(),
                    "the event log did not answer within {RELEASE_WAIT:?}; the partition leases expire after 1.5 × session_timeout"
                ),
            }
        }
        // An error still leaves the run's report, with what was applied before it (the
        // target did change), then ends the run; the scan's error first, as before.
        let mut stopped: Option<anyhow::Error> = None;
        let scanned = scanned.and_then(|record| match record {
            Ok(record) => Some(record),
            Err(e) => {
                stopped = Some(e.into());
                // The failed scan's record (what it appended before), as `status` shows
                // it; none when the error kept it from being stored.
                session
                    .state
                    .scans()
                    .and_then(|s| s.get(p.name()))
                    .ok()
                    .flatten()
                    .filter(|r| r.result == "failed" && r.started_at >= run_started)
            }
        });
        // A scan that did not list everything leaves the index short of the source.
        let listed_all = scanned.as_ref().is_none_or(|r| r.result == "ok");
        if let Some(record) = scanned {
            // Withheld deletes leave the target holding what the source no longer has; a
            // cron job must be able to see that (rsync's `--max-delete` exits 25).
            degraded |= record.errors > 0 || record.guard.is_some();
            written += record.upserts + record.deletes;
            if select.output == Output::Text {
                print_scan(p.name(), &record, false);
            }
            entry["scan"] = serde_json::to_value(&record)?;
            run_report = run_report.with_scan(&record);
        }
        let projected = projected.map(|report| {
            report.unwrap_or_else(|e| {
                stopped.get_or_insert(e.source.into());
                *e.done
            })
        });
        if let Some(report) = projected {
            // A file that changed while it was copied is not on the target as the source
            // has it now: the run did not finish the mirror (rsync says so with its 24).
            let stale = report.stale_left;
            // Items still waiting at the end for what only a person can change (a file
            // whose place a directory on the target keeps with entries the source never
            // had): the run did not bring them, and a cron job must not read it as done
            // (it exited 0 at every run while the item never came). Those waiting for
            // referenced items wait for a later scan instead, and fail after
            // `reference_wait`.
            let waiting = if stopped.is_none() {
                session
                    .state
                    .deferred(p.name())
                    .map(|d| {
                        d.iter()
                            .filter_map(Result::ok)
                            .filter(|(_, d)| {
                                d.event.refs.is_empty() && d.taken.is_none() && d.error.is_none()
                            })
                            .count()
                    })
                    .unwrap_or(0)
            } else {
                0
            };
            // Directory deletes the same: the directory holds entries the source does not
            // have (put there by hand), so only a person can let its delete through (it
            // exited 0 with "1 deferred" and no word of why).
            let dirs_waiting = if stopped.is_none() {
                (session.state.dir_deletes(p.name()))
                    .map(|d| d.len())
                    .unwrap_or(0)
            } else {
                0
            };
            degraded |= !report.failures.is_empty()
                || stale > 0
                || waiting > 0
                || dirs_waiting > 0
                || report.retained_withheld.is_some();
            written += report.events;
            let target_only = match (&prefilled, &stopped, signalled.get()) {
                (Some(pre), None, None) if listed_all => pre.target_only(&Default::default()).await,
                _ => None,
            };
            if select.output == Output::Text {
                let mut counts: Vec<String> = report
                    .outcomes
                    .iter()
                    .map(|(o, n)| format!("{n} {}", o.as_str()))
                    .collect();
                if report.superseded > 0 {
                    counts.push(format!(
                        "{} skipped (a later event of the item follows)",
                        report.superseded
                    ));
                }
                // Stopped by an error, the failing batch's events were read but not all
                // applied: what the outcomes count is what was.
                let items: u64 = report.outcomes.values().sum();
                let (events, before) = match stopped {
                    Some(_) => (items, " before the error".into()),
                    // Retained deletes, waiting and failed items of earlier runs are
                    // applied without an event of this run's.
                    None if items > report.events => (
                        report.events,
                        format!(" and {} from earlier runs", items - report.events),
                    ),
                    None => (report.events, String::new()),
                };
                // "nothing to do" would contradict the error that follows.
                let what = match (counts.is_empty(), stopped.is_some()) {
                    (true, true) => String::new(),
                    (true, false) => ": nothing to do".into(),
                    (false, _) => format!(": {}{}", counts.join(", "), waited_note(report.waited)),
                };
                outln!("{}: applied {events} events{before}{what}", p.name());
                for f in &report.failures {
                    outln!("{}: FAILED {}: {}", p.name(), f.item(), f.reason);
                }
                if let Some(first) = report.failures.iter().map(|f| f.offset).min() {
                    outln!("{}", retry_hint(p.name(), first));
                }
                if stale > 0 {
                    outln!(
                        "{}: {stale} items changed in the source while they were copied and were left as they were; the next scan brings them",
                        p.name()
                    );
                }
                if waiting > 0 {
                    outln!(
                        "{}: {waiting} items still wait for a directory in their place on the target to be empty (it holds entries the source does not have) and were not applied; `tidemark status` names them",
                        p.name()
                    );
                }
                if dirs_waiting > 0 {
                    outln!(
                        "{}: {dirs_waiting} directories the source deleted are still on the target, their deletes waiting for them to be empty (they hold entries the source does not have); remove those entries (`tidemark verify` lists them) and the next run deletes the directories",
                        p.name()
                    );
                }
                if let Some(withheld) = &report.retained_withheld {
                    outln!("{}: {withheld}", p.name());
                }
            }
            entry["project"] = serde_json::to_value(&report)?;
            entry["waiting"] = waiting.into();
            entry["directories_waiting"] = dirs_waiting.into();
            run_report = run_report
                .with_project(&report)
                .with_target_only(target_only);
            print_target_only(select.output, p.name(), &run_report, &mut entry);
        }
        if let (None, Some(signal)) = (&stopped, signalled.get()) {
            let lag = p.projector.lag().await.ok();
            let message = format!(
                "interrupted by {}: what was applied before it is committed{}; run `tidemark {run}` again to go on from there",
                signal.name,
                match lag {
                    Some(n) if n > 0 => format!(", {n} events in the log are not applied yet"),
                    _ => String::new(),
                }
            );
            let report_dir = write_report(&session, &run_report.with_interruption(&message));
            out.end(entry, "interrupted", &message, report_dir)?;
            return Ok(ExitCode::from(signal.exit));
        }
        if let Some(e) = stopped {
            let message = fatal_message(&e);
            let report_dir = write_report(&session, &run_report.with_error(&message));
            out.end(entry, "error", &message, report_dir)?;
            return Err(e);
        }
        entry["report_dir"] = write_report(&session, &run_report).into();
        out.entries.push(entry);
    }
    out.print()?;
    if written >= CHECKPOINT_AFTER {
        let dir = session.state.path().to_owned();
        drop(session);
        checkpoint(&dir);
    }
    Ok(if degraded {
        ExitCode::from(EXIT_DEGRADED)
    } else {
        ExitCode::SUCCESS
    })
}

/// How long a one-shot run waits for its log to take back its partitions.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Events a run appends or applies before it leaves the state database a fresh snapshot
/// ([`State::checkpoint`]): below this, what the next start reads back is a few hundredths
/// of a second at most, about what the checkpoint would cost.
const CHECKPOINT_AFTER: u64 = 10_000;

/// Checkpoints the state database of `dir`, closed by the caller. Best effort: a database
/// still held (or one that fails to open now) is left as it is, and the next start reads
/// more.
fn checkpoint(dir: &std::path::Path) {
    let started = std::time::Instant::now();
    match State::checkpoint(dir) {
        Ok(()) => tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "state database checkpointed"
        ),
        Err(e) => tracing::debug!("state database not checkpointed: {e}"),
    }
}

/// Writes a run's report; a report that cannot be written is logged, not fatal: the run
/// itself succeeded. Returns the report's directory.
/// After a run's counts: how many of the items counted waited for other items first
/// (the items they reference, a directory in their place) and were applied in the same
/// run. `deferred` counts only those still waiting.
fn waited_note(waited: u64) -> String {
    match waited {
        0 => String::new(),
        n => format!(" ({n} waited for other items first)"),
    }
}

/// What to run once the cause of a permanent failure is fixed: a failed item is not tried
/// again until it changes in the source or its event is replayed.
fn retry_hint(pipeline: &str, first_offset: u64) -> String {
    format!(
        "failed items are tried again whenever they change in the source, by a running daemon every `failed_retry_interval` (and at its start), and otherwise by the next `tidemark sync` or `tidemark project`: fix the cause (the message says what to do) and wait for the daemon, or run one; with the daemon stopped, `tidemark replay --pipeline {pipeline} --from {first_offset}` then `tidemark project` applies everything from there again (items already equal on the target are adopted, not rewritten)"
    )
}

fn write_report(session: &Session, report: &Report) -> Option<String> {
    let config = &session.config;
    match report.write(&config.reports_dir, config.report_retention) {
        Ok(dir) => {
            tracing::info!(pipeline = %report.pipeline, "report written to {}", dir.display());
            Some(dir.display().to_string())
        }
        Err(e) => {
            tracing::warn!(pipeline = %report.pipeline, "{e}");
            None
        }
    }
}

/// Prints what a first projection into a target that already held entries says of those
/// the source does not have, as `report` has them, or adds it to the pipeline's JSON `entry`.
fn print_target_only(
    output: Output,
    pipeline: &str,
    report: &Report,
    entry: &mut serde_json::Value,
) {
    let (Some(n), Some(note)) = (report.target_only, report.target_only_note()) else {
        return;
    };
    match output {
        Output::Text => outln!("{pipeline}: {note}"),
        Output::Json => {
            entry["target_only"] = n.into();
            if let Some(by) = &report.target_written_by {
                entry["target_written_by"] = by.as_str().into();
            }
        }
    }
}

/// How many entries of a target that held some before `p`'s first projection the source
/// does not have, when `actions` plan that projection ([`verify::Prefilled`]).
async fn planned_target_only(
    p: &Pipeline,
    actions: &[PlannedAction],
) -> Option<verify::TargetOnly> {
    let prefilled = p.prefilled()?;
    let upserted = actions
        .iter()
        .filter(|a| matches!(a.action, "create" | "adopt" | "update"))
        .map(|a| tidemark::proto::item_identity(&a.kind, &a.key))
        .collect();
    prefilled.target_only(&upserted).await
}

async fn plan(session: Session, select: &Select) -> Result<ExitCode> {
    let mut out = Vec::new();
    for p in session.pipelines(select)? {
        let actions = p.projector.plan().await?;
        // The plan is about the log: what the source holds now is the scan's to find,
        // and "nothing to do" read as "in sync" before the first scan.
        let last_scan = session.state.scans()?.get(p.name())?;
        if select.output == Output::Text {
            let nothing = match last_scan {
                Some(_) => "nothing in the log to apply; `tidemark sync --dry-run` also shows what a scan of the source would find",
                None => "nothing in the log to apply, and no scan has run yet; `tidemark sync --dry-run` shows what a scan of the source would find",
            };
            print_plan(p.name(), "plan", &actions, nothing);
        }
        let report = Report::new(p.name(), "plan", true, p.config.max_delete)
            .with_plan(&actions)
            .with_target_only(planned_target_only(&p, &actions).await);
        let mut entry = json!({
            "pipeline": p.name(),
            "actions": actions,
            "last_scan_at": last_scan.map(|s| s.started_at),
            "report_dir": write_dry_report(&session, &report),
        });
        print_target_only(select.output, p.name(), &report, &mut entry);
        out.push(entry);
    }
    if select.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `sync --dry-run`: what the scan would find, then what projecting the log and those
/// changes would do, writing neither the log, the index nor the target; only its report.
async fn dry_sync(session: Session, select: &Select, show_progress: bool) -> Result<ExitCode> {
    let mut out = Vec::new();
    let mut degraded = false;
    for p in session.pipelines(select)? {
        let progress = Progress::new(show_progress, "scan", None);
        let preview = p.scanner.preview(&progress).await?;
        progress.finish();
        let record = preview.record;
        let actions = p.projector.plan_with(preview.events).await?;
        // As `sync` exits 3 for what it leaves waiting or failed, and for retained deletes
        // `max_delete` withholds (the only `retain`s with a reason).
        degraded |= record.errors > 0
            || record.guard.is_some()
            || actions.iter().any(|a| {
                matches!(a.action, "wait" | "fail") || (a.action == "retain" && a.reason.is_some())
            });
        if select.output == Output::Text {
            print_scan(p.name(), &record, true);
            print_plan(p.name(), "dry run", &actions, "nothing to do");
        }
        let report = Report::new(p.name(), "sync", true, p.config.max_delete)
            .with_scan(&record)
            .with_plan(&actions)
            .with_target_only(planned_target_only(&p, &actions).await);
        let mut entry = json!({
            "pipeline": p.name(),
            "scan": record,
            "actions": actions,
            "report_dir": write_dry_report(&session, &report),
        });
        print_target_only(select.output, p.name(), &report, &mut entry);
        out.push(entry);
    }
    if select.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if degraded {
        ExitCode::from(EXIT_DEGRADED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints a scan's summary line, and the delete guard's when it tripped (or, `dry`, would).
fn print_scan(pipeline: &str, record: &tidemark::state::ScanRecord, dry: bool) {
    outln!(
        "{pipeline}: scanned {} items: {} upserts, {} deletes, {} errors, {} skipped{} in {:.2} s{}",
        record.listed,
        record.upserts,
        record.deletes,
        record.errors,
        record.skipped,
        tidemark::report::vanished_note(record.vanished),
        record.duration_secs,
        if dry {
            " (dry run: nothing appended)"
        } else {
            ""
        }
    );
    if record.not_appended > 0 {
        outln!(
            "{pipeline}: {} changes found were not appended (the log did not acknowledge them); the next scan finds them again",
            record.not_appended
        );
    }
    if let Some(g) = &record.guard {
        outln!(
            "{pipeline}: {} {} deletes withheld (max_delete = {} allows {})",
            if dry {
                "the delete guard would trip:"
            } else {
                "delete guard tripped:"
            },
            g.would_delete,
            g.limit,
            g.allowed
        );
    }
}

/// What a one-shot `scan`, `project` or `sync` prints per pipeline: with `--output json`,
/// every entry at the end, as one array.
struct Entries {
    output: Output,
    entries: Vec<serde_json::Value>,
}

impl Entries {
    /// Ends the run at a pipeline that stopped it: its `entry` gets `key` (`error` or
    /// `interrupted`) = `message` and the report's directory, and the entries so far are
    /// printed for JSON; as text, an interruption is printed (`main` prints an error).
    fn end(
        &mut self,
        mut entry: serde_json::Value,
        key: &str,
        message: &str,
        report_dir: Option<String>,
    ) -> anyhow::Result<()> {
        if self.output == Output::Text && key == "interrupted" {
            let pipeline = entry["pipeline"].as_str().unwrap_or_default();
            outln!("{pipeline}: {message}");
        }
        entry[key] = message.into();
        entry["report_dir"] = report_dir.into();
        self.entries.push(entry);
        self.print()
    }

    /// Prints the entries as a JSON array, for `--output json`.
    fn print(&self) -> anyhow::Result<()> {
        if self.output == Output::Json {
            outln!("{}", serde_json::to_string_pretty(&self.entries)?);
        }
        Ok(())
    }
}

/// Prints planned actions, one a line (unchanged items left out), then their counts, or
/// `nothing` when there are none; when an action takes in two events (a `replace`), also
/// the outcomes the run will count, one an event, as it reports them.
fn print_plan(pipeline: &str, what: &str, actions: &[PlannedAction], nothing: &str) {
    let mut counts = std::collections::BTreeMap::new();
    let mut outcomes = std::collections::HashMap::new();
    for a in actions {
        *counts.entry(a.action).or_insert(0) += 1;
        for (_, outcome) in a.outcomes() {
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        if a.action == "skip" || a.action == "superseded" {
            continue;
        }
        let at = match (a.offset, a.old_offset) {
            (Some(offset), Some(old)) => format!("offsets {offset} and {old}"),
            (Some(offset), None) => format!("offset {offset}"),
            (None, _) => "found by this scan".into(),
        };
        let mut item = item_label(&a.kind, &a.key, a.name.as_deref());
        if let Some(old) = &a.old_kind {
            item = format!("{old} -> {item}");
        }
        let mut detail = match (a.waiting_since, &a.failed) {
            (_, Some(failed)) => format!(
                ", failed {}: {}; tried again, and fails again unless its cause is gone",
                failed.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                failed.reason
            ),
            (Some(since), None) => format!(
                ", waiting since {}",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            (None, None) => String::new(),
        };
        if let Some(reason) = &a.reason {
            detail = format!("{detail}: {reason}");
        }
        outln!("{:>7} {item} ({at}{detail})", a.action);
    }
    let summary: Vec<String> = counts.iter().map(|(a, n)| format!("{n} {a}")).collect();
    // A replace is two events (the new item's upsert, the old one's delete), which the run
    // counts one by one.
    let by_event = if actions.iter().any(|a| a.old_kind.is_some()) {
        let counted: Vec<String> = tidemark::target::Outcome::ALL
            .iter()
            .filter_map(|o| {
                outcomes
                    .get(o.as_str())
                    .map(|n| format!("{n} {}", o.as_str()))
            })
            .collect();
        format!(" (the run counts them by event: {})", counted.join(", "))
    } else {
        String::new()
    };
    outln!(
        "{pipeline}: {what}: {}{by_event}",
        if summary.is_empty() {
            nothing.into()
        } else {
            summary.join(", ")
        }
    );
}

/// A dry run's report, except when nothing has run with this config: no report directory
/// is made for it then.
fn write_dry_report(session: &Session, report: &Report) -> Option<String> {
    session
        .scratch
        .is_none()
        .then(|| write_report(session, report))
        .flatten()
}

async fn log_command(session: Session, cmd: LogCommand) -> Result<ExitCode> {
    let print = |r: tidemark::log::Record| match r.event {
        Ok(e) => outln!("{}", String::from_utf8_lossy(&e.encode())),
        Err(err) => outln!(
            "{}",
            json!({"partition": r.partition, "offset": r.offset, "error": err.to_string()})
        ),
    };
    match cmd {
        LogCommand::Migrate { select } => {
            for p in session.pipelines(&select)? {
                migrate(&session, &p).await?;
            }
        }
        LogCommand::Show {
            select,
            offset,
            partition,
        } => {
            for p in session.pipelines(&select)? {
                let mut found = false;
                let mut heads = Vec::new();
                for part in partitions_to_read(&p, partition).await? {
                    let records = p.log.read(part, offset, 1).await?;
                    match records.into_iter().next().filter(|r| r.offset == offset) {
                        Some(r) => {
                            found = true;
                            print(r);
                        }
                        None => heads.push((part, p.log.head(part).await?)),
                    }
                }
                if !found {
                    // Below a head, `compact` may have dropped the event; from the head on
                    // none was ever written.
                    let why = if heads.iter().any(|(_, head)| offset < *head) {
                        "; `compact` drops events a later event of the same item supersedes"
                    } else {
                        ": the log ends before it"
                    };
                    let heads = match heads.as_slice() {
                        [(_, head)] if p.log.partitions() == 1 => format!("head is {head}"),
                        _ => heads
                            .iter()
                            .map(|(part, head)| format!("partition {part} head {head}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    };
                    anyhow::bail!(
                        "pipeline `{}`: no event at offset {offset} ({heads}{why})",
                        p.name(),
                    );
                }
            }
        }
        LogCommand::Tail {
            select,
            from,
            partition,
        } => {
            for p in session.pipelines(&select)? {
                for part in partitions_to_read(&p, partition).await? {
                    let head = p.log.head(part).await?;
                    let mut next = from.unwrap_or(head.saturating_sub(10));
                    while next < head {
                        let records = p.log.read(part, next, 1000).await?;
                        let Some(last) = records.last() else { break };
                        next = last.offset + 1;
                        records.into_iter().for_each(print);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The partitions `log tail|show` read: `only`, checked against the log, or all of them.
async fn partitions_to_read(p: &Pipeline, only: Option<u32>) -> Result<Vec<u32>> {
    // A Kafka log knows the topic's partition count once it has reached the brokers.
    p.log.connect().await?;
    let count = p.log.partitions();
    match only {
        Some(part) if part >= count => anyhow::bail!(
            "pipeline `{}`: --partition {part} does not exist; its {} log has {count} partition{} (0 to {})",
            p.name(),
            p.log.backend(),
            if count == 1 { "" } else { "s" },
            count - 1
        ),
        Some(part) => Ok(vec![part]),
        None => Ok((0..count).collect()),
    }
}

/// `log migrate` for one pipeline: sled records in offset order → Kafka, then the
/// projector's committed offset mapped onto each Kafka partition.
async fn migrate(session: &Session, p: &Pipeline) -> Result<()> {
    use tidemark::config::LogConfig;
    use tidemark::log::{EventLog, KafkaLog, SledLog};
    let LogConfig::Kafka(kafka) = &p.config.log else {
        anyhow::bail!(
            "pipeline `{}`: its config names no Kafka log; set [pipeline.log.kafka] first, then migrate",
            p.name()
        );
    };
    let sled = SledLog::open(session.state.db(), p.name())?;
    let to = KafkaLog::new(kafka, p.name(), Patience::OneShot)?;
    to.connect().await?;
    let consumer = p.projector.consumer();
    let mut heads = Vec::new();
    for part in 0..to.partitions() {
        heads.push(to.head(part).await?);
    }
    anyhow::ensure!(
        heads.iter().all(|h| *h == 0),
        "pipeline `{}`: Kafka topic `{}` already holds records; migrate copies into a new, empty topic",
        p.name(),
        to.topic()
    );
    let head = sled.head(0).await?;
    let applied = sled.committed(consumer, 0).await?.min(head);
    // Next offset to read per Kafka partition: one past the last copied event that the
    // projector had already applied (sled offset below its committed offset).
    let mut next = vec![0u64; to.partitions() as usize];
    // How far the source index reflects the log (`state::LogMark`), mapped the same way:
    // the events it does not cover yet are replayed into it by the first scan.
    let marks = session.state.index_marks()?;
    let indexed = marks
        .get(p.name())?
        .filter(|m| m.log == sled.identity())
        .map(|m| m.heads.first().copied().unwrap_or(0));
    let mut covered = vec![0u64; to.partitions() as usize];
    let (mut from, mut copied, mut invalid) = (0, 0u64, 0u64);
    while from < head {
        let records = sled.read(0, from, 1000).await?;
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        let mut events = Vec::with_capacity(records.len());
        let mut sled_offsets = Vec::with_capacity(records.len());
        for r in records {
            match r.event {
                Ok(e) => {
                    sled_offsets.push(r.offset);
                    events.push(e);
                }
                Err(e) => {
                    invalid += 1;
                    eprintln!("skipping sled offset {} (not a valid event): {e}", r.offset);
                }
            }
        }
        copied += events.len() as u64;
        for (sled_offset, (partition, offset)) in
            sled_offsets.into_iter().zip(to.append_acked(events).await?)
        {
            if sled_offset < applied {
                next[partition as usize] = offset + 1;
            }
            if indexed.is_some_and(|i| sled_offset < i) {
                covered[partition as usize] = offset + 1;
            }
        }
    }
    if indexed.is_some() {
        let mark = tidemark::state::LogMark {
            log: to.identity(),
            heads: covered,
        };
        marks.put(p.name(), &mark)?;
        session.state.flush().await?;
    }
    for (partition, n) in next.iter().enumerate() {
        to.seek(consumer, partition as u32, *n).await?;
    }
    outln!(
        "pipeline {}: copied {copied} events ({invalid} invalid skipped) from sled into Kafka topic `{}`; committed offsets per partition {next:?} (sled committed {applied} of {head})",
        p.name(),
        to.topic()
    );
    Ok(())
}
