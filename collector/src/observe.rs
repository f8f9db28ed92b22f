//! The collector's own health and metrics: `GET /metrics` (Prometheus text
//! format) and `GET /health` on `--metrics-listen`.
//!
//! Counters live in [`Counters`] (atomics the ingest path bumps); at each
//! scrape they are copied into the `metrics` registry, which also holds the
//! histograms recorded where things happen (`driftline_flush_seconds`,
//! `driftline_detector_runs_total`, `driftline_jobs_total`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::ingest::Counters;

#[derive(Clone)]
struct Observed {
    prometheus: PrometheusHandle,
    counters: Arc<Counters>,
}

/// Installs the metrics recorder (once per process) and serves `/metrics`
/// and `/health` on `listen` until `shutdown`. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0])
        .map_err(std::io::Error::other)?
        .build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(std::io::Error::other)?;
    let state = Observed {
        prometheus,
        counters,
    };
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/health", get(health))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(addr)
}

async fn render(State(o): State<Observed>) -> impl IntoResponse {
    let c = &o.counters;
    let total = |name: &'static str, v: u64| metrics::counter!(name).absolute(v);
    total(
        "driftline_messages_received_total",
        c.received.load(Ordering::Relaxed),
    );
    total(
        "driftline_messages_accepted_total",
        c.accepted.load(Ordering::Relaxed),
    );
    total(
        "driftline_status_messages_total",
        c.status.load(Ordering::Relaxed),
    );
    total(
        "driftline_windows_stored_total",
        c.stored_windows.load(Ordering::Relaxed),
    );
    total(
        "driftline_duplicates_dropped_total",
        c.duplicates.load(Ordering::Relaxed),
    );
    total(
        "driftline_files_written_total",
        c.files_written.load(Ordering::Relaxed),
    );
    total(
        "driftline_flush_errors_total",
        c.flush_errors.load(Ordering::Relaxed),
    );
    total(
        "driftline_wal_replayed_total",
        c.replayed.load(Ordering::Relaxed),
    );
    for (reason, n) in c.quarantined_by_reason() {
        metrics::counter!("driftline_messages_quarantined_total", "reason" => reason).absolute(n);
    }
    metrics::gauge!("driftline_subscribed").set(if c.subscriptions.load(Ordering::Relaxed) > 0 {
        1.0
    } else {
        0.0
    });
    (
        [("content-type", "text/plain; version=0.0.4")],
        o.prometheus.render(),
    )
}

async fn health(State(o): State<Observed>) -> impl IntoResponse {
    let subscribed = o.counters.subscriptions.load(Ordering::Relaxed) > 0;
    let body = serde_json::json!({
        "status": if subscribed { "ok" } else { "starting" },
        "subscribed": subscribed,
        "received": o.counters.received.load(Ordering::Relaxed),
        "flush_errors": o.counters.flush_errors.load(Ordering::Relaxed),
    });
    let code = if subscribed {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}
