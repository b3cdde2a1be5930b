//! `tidemark run`: every pipeline's scanner (on its interval) and projector (tailing the
//! log), the HTTP endpoints, and the shutdown order — stop the scanners, let the projectors
//! finish and commit their batch, flush, exit.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::log::Patience;
use crate::pipeline::{Pipeline, PipelineError};
use crate::progress::Progress;
use crate::report::Cycle;
use crate::server::{self, ServerState};
use crate::state::{State, StateError};

/// Name of the file in `state_dir` holding the address the endpoints listen on.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

/// How often the lag and freshness gauges are recomputed, so they stay true while the
/// source is idle and nobody scrapes.
const GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a scan asked to stop may take to append what it found before it is dropped.
const SCAN_WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a clean stop waits for the event log to take back this daemon's partitions.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Local state could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// A pipeline could not be built.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The endpoints' address could not be bound.
    #[error("cannot listen on {addr}: {source} ({hint})")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
        /// Where to change it.
        hint: String,
    },
    /// `status_token_env` names a variable that is not set, or empty: an empty token would
    /// leave `/status` open to any request without one.
    #[error("{why}, or remove status_token_env")]
    StatusToken {
        /// The variable's name.
        var: String,
        /// What is wrong with it, naming it (never its value).
        why: String,
    },
    /// Tasks still running when the shutdown deadline passed.
    #[error("shutdown deadline passed with tasks still running: {0}")]
    Deadline(String),
    /// The state database met an I/O error, which this process cannot get past.
    #[error("the state database failed: {0}. The daemon stopped, as it cannot use the database again until it is opened anew: start it again (a supervisor such as systemd does) and it goes on from the last committed offset")]
    StateBroken(String),
}

/// Names of running tasks, so a missed shutdown deadline can say which ones hang.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<BTreeSet<String>>>);

struct RunningGuard(Running, String);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap().remove(&self.1);
    }
}

impl Running {
    fn enter(&self, name: String) -> RunningGuard {
        self.0.lock().unwrap().insert(name.clone());
        RunningGuard(self.clone(), name)
    }
}

/// Runs every pipeline until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let state = State::open(&config.state_dir)?;
    crate::state::warn_if_open_to_others(&config.state_dir, &config.reports_dir);
    let pipelines = config
        .pipelines
        .iter()
        .map(|p| Pipeline::build(p, &state, Patience::Daemon).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    for p in pipelines.iter().filter(|p| p.config.role.projects()) {
        p.projector
            .check_target(true)
            .await
            .map_err(PipelineError::from)?;
    }

    let listen_err = |source| RunError::Listen {
        addr: config.listen,
        source,
        hint: match config.listen_line {
            Some(line) => format!(
                "`listen` is set at {}:{line}; give it a free address",
                config.file.display()
            ),
            None => format!(
                "that is the default; add `listen = \"127.0.0.1:PORT\"` with a free port to {}",
                config.file.display()
            ),
        },
    };
    let status_token = match &config.status_token_env {
        None => None,
        Some(var) => {
            // Trimmed, and refused when empty, as every secret (`SecretSource::resolve`,
            // which also remembers it for redaction).
            let source = crate::http_config::SecretSource {
                env: Some(var.clone()),
                file: None,
            };
            let token = source
                .resolve(Path::new(""), "status_token_env")
                .map_err(|why| RunError::StatusToken {
                    var: var.clone(),
                    why,
                })?;
            Some(token.expose().to_owned())
        }
    };
    let listener = TcpListener::bind(config.listen).await.map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    if status_token.is_none() && !addr.ip().is_loopback() {
        warn!(
            %addr,
            "/status on {addr} answers anyone who can reach that address: its failure reasons quote API answers, URLs and file names; set status_token_env = \"VAR\" in {} (and export VAR, the token every request must then carry), or listen on 127.0.0.1",
            config.file.display()
        );
    }
    let addr_file: PathBuf = config.state_dir.join(LISTEN_ADDR_FILE);
    if let Err(e) = std::fs::write(&addr_file, format!("{addr}\n")) {
        warn!("cannot write {}: {e}", addr_file.display());
    }
    // Removed however the daemon ends from here on, so `status` never asks a dead address.
    let _addr_file = RemovedOnDrop(addr_file);
    info!(%addr, "serving /metrics /healthz /readyz /status on http://{addr}");

    let tracker = TaskTracker::new();
    let running = Running::default();
    let scanners = CancellationToken::new();
    let projectors = CancellationToken::new();
    let endpoints = CancellationToken::new();
    let server_state = Arc::new(ServerState {
        pipelines: pipelines.clone(),
        ready: false.into(),
        status_token,
    });
    let server = {
        let (state, cancel) = (server_state.clone(), endpoints.clone());
        tokio::spawn(async move {
            if let Err(e) = server::serve(listener, state, cancel).await {
                error!("HTTP endpoints stopped: {e}");
            }
        })
    };

    // A log on a remote broker may be unreachable at start: retry with backoff while
    // /readyz says not ready, and stop quietly if asked to meanwhile.
    tokio::pin!(shutdown);
    for p in &pipelines {
        let mut delay = std::time::Duration::from_millis(500);
        loop {
            // A stop ends an attempt too, not only the pause between two: an attempt
            // may wait up to the brokers' timeout.
            let attempt = tokio::select! {
                biased;
                _ = &mut shutdown => None,
                connected = p.log.connect() => Some(connected),
            };
            let stopped = match attempt {
                Some(Ok(())) => break,
                Some(Err(e)) => {
                    error!(pipeline = %p.name(), "{e}; retrying in {delay:?} (/readyz answers not ready until then)");
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => true,
                        _ = tokio::time::sleep(delay) => false,
                    }
                }
                None => true,
            };
            if stopped {
                endpoints.cancel();
                let _ = server.await;
                info!("stopped before the event log was reachable");
                return Ok(());
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(30));
        }
        p.refresh_gauges().await?;
    }

    for p in &pipelines {
        // Cancelled once this pipeline's projector has committed its last batch, so the
        // last cycle's report counts that batch.
        let projected = CancellationToken::new();
        let (pipeline, cancel, guard) = (
            p.clone(),
            scanners.clone(),
            running.enter(format!("scanner {}", p.name())),
        );
        // Started before the projector, so the first cycle counts its first batch.
        let cycle = p.config.role.scans().then(|| {
            Cycle::new(
                p.clone(),
                config.reports_dir.clone(),
                config.report_retention,
            )
        });
        let last_batch = projected.clone();
        tracker.spawn(async move {
            let _guard = guard;
            let Some(mut cycle) = cycle else {
                return;
            };
            let progress = Progress::hidden();
            loop {
                // A scan asked to stop appends what it has found and returns; one stuck
                // on its peer is dropped after SCAN_WIND_DOWN.
                let wind_down = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(SCAN_WIND_DOWN).await;
                };
                tokio::select! {
                    biased;
                    result = pipeline.scanner.scan_until(&progress, &cancel) => {
                        match result {
                            Ok(record) => {
                                pipeline.note_scan(&record.result);
                                cycle.scanned(record)
                            }
                            Err(e) => cycle.scan_failed(&e),
                        }
                    }
                    _ = wind_down => {
                        warn!(pipeline = %pipeline.name(), "the scan did not stop within {SCAN_WIND_DOWN:?}; dropped (the next start lists the source again)");
                        break;
                    }
                }
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = cycle.wait(pipeline.config.scan_interval) => {}
                }
            }
            last_batch.cancelled().await;
            cycle.finish().await;
        });
        let (pipeline, cancel, guard) = (
            p.clone(),
            projectors.clone(),
            running.enter(format!("projector {}", p.name())),
        );
        tracker.spawn(async move {
            let (_guard, _projected) = (guard, projected.drop_guard());
            if pipeline.config.role.projects() {
                pipeline.projector.run(cancel).await;
            }
        });
    }
    {
        let (pipelines, cancel, guard) = (
            pipelines.clone(),
            projectors.clone(),
            running.enter("gauges".into()),
        );
        tracker.spawn(async move {
            let _guard = guard;
            loop {
                // A refresh waiting on a broker that does not answer ends with the run.
                let refresh = async {
                    for p in &pipelines {
                        if let Err(e) = p.refresh_gauges().await {
                            warn!("cannot refresh the lag gauges: {e}");
                        }
                    }
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = refresh => {}
                }
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(GAUGE_REFRESH) => {}
                }
            }
        });
    }
    server_state.ready.store(true, Ordering::SeqCst);
    info!(pipelines = pipelines.len(), "tidemark is running");

    let broken = tokio::select! {
        _ = shutdown => None,
        _ = crate::state::broken().cancelled() => crate::state::broken_by(),
    };
    match broken {
        None => info!("shutting down: stopping scanners, letting projectors finish their batch"),
        Some(e) => error!("the state database failed: {e}; stopping the daemon, as this process cannot use the database again"),
    }
    server_state.ready.store(false, Ordering::SeqCst);
    scanners.cancel();
    projectors.cancel();
    tracker.close();
    let finished = tokio::time::timeout(config.shutdown_timeout, tracker.wait()).await;
    if finished.is_ok() {
        // Every projector has stopped and committed: hand the partitions back now rather
        // than let another daemon (or the next start) wait for the leases to expire. Past
        // the deadline a projector may still commit, so its leases are left to expire.
        for p in pipelines.iter().filter(|p| p.config.role.projects()) {
            match tokio::time::timeout(RELEASE_WAIT, p.log.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(pipeline = %p.name(), "{e}; gave up releasing them: they expire after 1.5 × session_timeout")
                }
                Err(_) => {
                    warn!(pipeline = %p.name(), "the event log did not answer within {RELEASE_WAIT:?}; gave up releasing the partition leases: they expire after 1.5 × session_timeout")
                }
            }
        }
    }
    endpoints.cancel();
    let _ = server.await;
    if let Some(e) = broken {
        return Err(RunError::StateBroken(e.to_owned()));
    }
    state.flush().await?;
    if finished.is_err() {
        let names: Vec<String> = running.0.lock().unwrap().iter().cloned().collect();
        return Err(RunError::Deadline(names.join(", ")));
    }
    info!("stopped cleanly");
    Ok(())
}

/// A file removed when this is dropped.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
