//! The collector's own health and metrics: `GET /metrics` (Prometheus text
//! format) and `GET /health` on `--metrics-listen`; with a retraining
//! secret, also `POST /v1/jobs/{job_id}/status` for the training system to
//! report a job's state (`{"status": "succeeded", "detail": "..."}`, signed
//! like the webhook, see [`crate::retrain::signature`]: a request whose
//! timestamp is more than 5 minutes off is refused with 401, one whose
//! signature was already used with 409).
//!
//! Counters live in [`Counters`] (atomics the ingest path bumps); at each
//! scrape, and every few seconds for OpenTelemetry, [`publish_counters`]
//! copies them into the `metrics` facade, which also takes the values
//! recorded where things happen (`driftline_flush_seconds`,
//! `driftline_detector_runs_total`, `driftline_jobs_total`). The recorder
//! behind the facade (`driftline_runtime::telemetry`) feeds both this
//! endpoint's Prometheus registry and, when `OTEL_EXPORTER_OTLP_*` is set,
//! OTLP.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use driftline_runtime::telemetry::LocalRecorder;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::ingest::Counters;

#[derive(Clone)]
struct Observed {
    prometheus: PrometheusHandle,
    counters: Arc<Counters>,
    jobs: Option<Arc<JobsApi>>,
}

/// What the job-status route needs.
pub struct JobsApi {
    pub ctx: Arc<datafusion::prelude::SessionContext>,
    pub lake: Arc<crate::lake::LakeWriter>,
    /// The HMAC key requests must be signed with.
    pub secret: String,
    /// Signatures accepted in the last [`crate::retrain::SIGNATURE_MAX_AGE`]
    /// (with their timestamps): a replay is refused.
    pub seen: std::sync::Mutex<std::collections::HashMap<Vec<u8>, i64>>,
}

impl JobsApi {
    pub fn new(
        ctx: Arc<datafusion::prelude::SessionContext>,
        lake: Arc<crate::lake::LakeWriter>,
        secret: String,
    ) -> Self {
        JobsApi {
            ctx,
            lake,
            secret,
            seen: Default::default(),
        }
    }

    /// Checks a report's signature headers against `method`, `path` and
    /// `body`; the error is the HTTP status and why.
    fn verify(
        &self,
        headers: &axum::http::HeaderMap,
        path: &str,
        body: &[u8],
    ) -> Result<(), (StatusCode, String)> {
        let unauthorized = |why: &str| (StatusCode::UNAUTHORIZED, why.to_owned());
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let timestamp: i64 = header("x-driftline-timestamp")
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| unauthorized("missing or malformed X-Driftline-Timestamp"))?;
        let now = chrono::Utc::now().timestamp();
        let max_age = crate::retrain::SIGNATURE_MAX_AGE.as_secs() as i64;
        if (now - timestamp).abs() > max_age {
            return Err(unauthorized(
                "X-Driftline-Timestamp is more than 5 minutes from the collector's clock",
            ));
        }
        let tag = header("x-driftline-signature")
            .and_then(|v| v.strip_prefix("sha256="))
            .and_then(|hex| {
                (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|b| u8::from_str_radix(b, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>()
            })
            .ok_or_else(|| unauthorized("missing or malformed X-Driftline-Signature"))?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
        let message = crate::retrain::signed_message(timestamp, "POST", path, body);
        ring::hmac::verify(&key, &message, &tag)
            .map_err(|_| unauthorized("wrong X-Driftline-Signature"))?;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "lock".to_owned()))?;
        seen.retain(|_, t| (now - *t).abs() <= max_age);
        if seen.insert(tag, timestamp).is_some() {
            return Err((
                StatusCode::CONFLICT,
                "this signed report was already received (replay)".to_owned(),
            ));
        }
        Ok(())
    }
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The Prometheus registry `/metrics` renders, as the recorder to hand to
/// `telemetry::init` (once per process, before [`serve`]).
pub fn prometheus_recorder() -> anyhow::Result<LocalRecorder> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0])?
        .build_recorder();
    PROMETHEUS
        .set(recorder.handle())
        .map_err(|_| anyhow::anyhow!("the Prometheus recorder is already built"))?;
    Ok(Box::new(recorder))
}

/// Serves `/metrics` and `/health` on `listen` until `shutdown`. Returns
/// the bound address.
pub async fn serve(
    listen: SocketAddr,
    counters: Arc<Counters>,
    jobs: Option<JobsApi>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let prometheus = PROMETHEUS
        .get()
        .cloned()
        .ok_or_else(|| std::io::Error::other("the Prometheus recorder is not installed"))?;
    let state = Observed {
        prometheus,
        counters,
        jobs: jobs.map(Arc::new),
    };
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/health", get(health))
        .route("/v1/jobs/:job_id/status", axum::routing::post(job_status))
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
    publish_counters(&o.counters);
    (
        [("content-type", "text/plain; version=0.0.4")],
        o.prometheus.render(),
    )
}

/// Copies the ingest counters into the `metrics` facade.
pub fn publish_counters(c: &Counters) {
    for (name, count) in [
        ("driftline_messages_received_total", &c.received),
        ("driftline_messages_accepted_total", &c.accepted),
        ("driftline_status_messages_total", &c.status),
        ("driftline_windows_stored_total", &c.stored_windows),
        ("driftline_duplicates_dropped_total", &c.duplicates),
        ("driftline_files_written_total", &c.files_written),
        ("driftline_flush_errors_total", &c.flush_errors),
        ("driftline_wal_replayed_total", &c.replayed),
        ("driftline_quarantine_over_quota_total", &c.over_quota),
    ] {
        metrics::counter!(name).absolute(count.load(Ordering::Relaxed));
    }
    for (reason, n) in c.quarantined_by_reason() {
        metrics::counter!("driftline_messages_quarantined_total", "reason" => reason).absolute(n);
    }
    metrics::gauge!("driftline_subscribed").set(if c.subscriptions.load(Ordering::Relaxed) > 0 {
        1.0
    } else {
        0.0
    });
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

#[derive(serde::Deserialize)]
struct StatusReport {
    status: String,
    detail: Option<String>,
}

async fn job_status(
    State(o): State<Observed>,
    axum::extract::Path(job_id): axum::extract::Path<String>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let reply = |code: StatusCode, message: String| {
        (
            code,
            axum::Json(serde_json::json!({ "job_id": job_id, "message": message })),
        )
    };
    let Some(jobs) = &o.jobs else {
        return reply(
            StatusCode::NOT_FOUND,
            "job reports need --job-report-secret (or --retrain-secret)".into(),
        );
    };
    // The path as the client sent (and signed) it.
    if let Err((code, why)) = jobs.verify(&headers, uri.path(), &body) {
        return reply(code, why);
    }
    let report: StatusReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    match crate::retrain::report(
        &jobs.ctx,
        &jobs.lake,
        &job_id,
        &report.status,
        report.detail,
    )
    .await
    {
        Ok(()) => reply(StatusCode::OK, report.status),
        Err(e @ crate::retrain::RetrainError::UnknownJob(_)) => {
            reply(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ crate::retrain::RetrainError::Status(_)) => {
            reply(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
