//! The HTTP endpoints of `tidemark run`: `/metrics` (Prometheus text), `/healthz`
//! (the process answers), `/readyz` (pipelines are built and running, and each one this
//! process scans has had a scan list its source) and `/status` (JSON).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;
use crate::pipeline::Pipeline;

/// What the endpoints read.
pub struct ServerState {
    /// The running pipelines.
    pub pipelines: Vec<Arc<Pipeline>>,
    /// Set once every pipeline's loops are started; cleared when shutdown begins.
    pub ready: AtomicBool,
    /// Bearer token `/status` requires, when configured (`status_token_env`).
    pub status_token: Option<String>,
}

/// Whether the request carries the configured bearer token (compared in constant time).
fn authorized(state: &ServerState, headers: &axum::http::HeaderMap) -> bool {
    let Some(expected) = &state.status_token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn refresh(state: &ServerState) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in &state.pipelines {
        match p.status().await {
            Ok(s) => out.push(serde_json::to_value(s).expect("status serializes")),
            Err(e) => out.push(serde_json::json!({"pipeline": p.name(), "error": e.to_string()})),
        }
    }
    out
}

/// How long a scrape of `/metrics` waits for the offsets to be read afresh. Past it (a
/// Kafka broker down makes each read wait for its 10 s deadline) the scrape answers with
/// the gauges as the daemon's refresh last set them, the local ones brought up to date,
/// well within Prometheus's default 10 s scrape timeout: a scrape that timed out would
/// blank the dashboard and read as the daemon being down.
const SCRAPE_REFRESH_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

async fn metrics_handler(State(state): State<Arc<ServerState>>) -> Response {
    if tokio::time::timeout(SCRAPE_REFRESH_LIMIT, refresh(&state))
        .await
        .is_err()
    {
        let now = chrono::Utc::now();
        for p in &state.pipelines {
            // A state that cannot be read shows in the daemon's own log and refresh.
            let _ = p.refresh_local_gauges(now);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
        .into_response()
}

async fn status_handler(
    State(state): State<Arc<ServerState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "/status requires `Authorization: Bearer <token>` (status_token_env)\n",
        )
            .into_response();
    }
    // Messages in the state were redacted when stored; once more with every secret known now.
    let body = serde_json::to_string(&refresh(&state).await).expect("status serializes");
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::http::redact_known(&body).into_owned(),
    )
        .into_response()
}

/// Ready once every pipeline runs and each one this process scans has had a scan list
/// its source: before that, freshness and lag 0 say nothing (the daemon has not looked).
/// A 503 names what it waits for.
async fn ready_handler(State(state): State<Arc<ServerState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting (waiting for the event logs) or stopping\n",
        )
            .into_response();
    }
    let waiting: Vec<String> = state
        .pipelines
        .iter()
        .filter(|p| p.awaits_first_scan())
        .map(|p| {
            let now = match p.scanner.in_progress() {
                Some(s) => format!("its first scan is in progress, {} listed so far", s.listed),
                None => "waiting for its next scan; `tidemark status` shows the last one".into(),
            };
            format!(
                "pipeline `{}`: no scan has listed the source since the daemon started ({now})",
                p.name()
            )
        })
        .collect();
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", waiting.join("; ")),
        )
            .into_response()
    }
}

/// Serves the endpoints on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status_handler))
        .route("/readyz", get(ready_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
