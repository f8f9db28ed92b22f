//! Local ingest for applications in any language: JSON over HTTP on
//! loopback (see docs/agent.md for curl and Python examples).
//!
//! - `POST /v1/events`: one event object or an array of them. The whole
//!   request is checked before anything is recorded: a bad event refuses
//!   the request with its index and reason, and records nothing.
//!   `202 {"accepted": n}`; `400` bad JSON or values; `413` body or batch
//!   too large; `422` a model that is not declared in the configuration.
//! - `GET /v1/status`: the agent's status (as published over MQTT) and,
//!   for the device only, `local`: events accepted, requests refused, late
//!   events and clipped values (these depend on events, so they never leave
//!   the device).
//! - `GET /health`: `200 ok`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use driftline_core::status::StatusReport;
use serde::Deserialize;
use serde_json::json;

use driftline_pipeline::event::{Feedback, InferenceEvent};
use driftline_pipeline::window::{ModelHandle, ModelKey, WindowStats};

/// What the HTTP handlers share with the agent loop.
#[derive(Debug)]
pub struct Shared {
    pub models: HashMap<ModelKey, ModelHandle>,
    /// Late events and clipped values, from the windower.
    pub window_stats: WindowStats,
    pub status: Mutex<StatusReport>,
    pub max_batch: usize,
    pub events_accepted: AtomicU64,
    pub requests_refused: AtomicU64,
}

/// One event as apps send it.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum LocalEvent {
    Inference {
        model_id: String,
        model_version: String,
        latency_ms: f64,
        #[serde(default)]
        input_tokens: u32,
        #[serde(default)]
        output_tokens: u32,
        confidence: Option<f64>,
        #[serde(default)]
        error: bool,
        label: Option<String>,
        /// Custom numeric features by name (declared in the configuration).
        #[serde(default)]
        custom: BTreeMap<String, f64>,
        timestamp: Option<DateTime<Utc>>,
    },
    Feedback {
        model_id: String,
        model_version: String,
        kind: FeedbackKind,
        timestamp: Option<DateTime<Utc>>,
    },
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FeedbackKind {
    Positive,
    Negative,
    Correction,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Body {
    Many(Vec<serde_json::Value>),
    One(serde_json::Value),
}

fn refuse(shared: &Shared, status: StatusCode, error: String, index: Option<usize>) -> Response {
    shared.requests_refused.fetch_add(1, Ordering::Relaxed);
    let body = match index {
        Some(i) => json!({ "error": error, "index": i }),
        None => json!({ "error": error }),
    };
    (status, Json(body)).into_response()
}

async fn post_events(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let values = match serde_json::from_slice::<Body>(&body) {
        Ok(Body::Many(v)) => v,
        Ok(Body::One(v)) => vec![v],
        Err(e) => {
            return refuse(
                &shared,
                StatusCode::BAD_REQUEST,
                format!("invalid JSON: {e}"),
                None,
            )
        }
    };
    if values.len() > shared.max_batch {
        let msg = format!(
            "{} events in one request, over the limit of {}",
            values.len(),
            shared.max_batch
        );
        return refuse(&shared, StatusCode::PAYLOAD_TOO_LARGE, msg, None);
    }
    let mut checked = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let event: LocalEvent = match serde_json::from_value(value) {
            Ok(e) => e,
            Err(e) => return refuse(&shared, StatusCode::BAD_REQUEST, e.to_string(), Some(i)),
        };
        let (model_id, model_version) = match &event {
            LocalEvent::Inference {
                model_id,
                model_version,
                ..
            }
            | LocalEvent::Feedback {
                model_id,
                model_version,
                ..
            } => (model_id, model_version),
        };
        let key = ModelKey::new(model_id.clone(), model_version.clone());
        let Some(handle) = shared.models.get(&key) else {
            let msg = format!("model {model_id:?} version {model_version:?} is not declared in the agent's configuration");
            return refuse(&shared, StatusCode::UNPROCESSABLE_ENTITY, msg, Some(i));
        };
        let mut custom_values = Vec::new();
        if let LocalEvent::Inference {
            latency_ms,
            confidence,
            custom,
            ..
        } = &event
        {
            if !latency_ms.is_finite() || confidence.is_some_and(|c| !c.is_finite()) {
                return refuse(
                    &shared,
                    StatusCode::BAD_REQUEST,
                    "numbers must be finite".into(),
                    Some(i),
                );
            }
            let declared = &handle.spec().custom;
            custom_values = vec![f64::NAN; declared.len()];
            for (name, value) in custom {
                let Some(k) = declared.iter().position(|(n, _)| n == name) else {
                    let msg =
                        format!("custom feature {name:?} is not declared for model {model_id:?}");
                    return refuse(&shared, StatusCode::BAD_REQUEST, msg, Some(i));
                };
                if !value.is_finite() {
                    return refuse(
                        &shared,
                        StatusCode::BAD_REQUEST,
                        "numbers must be finite".into(),
                        Some(i),
                    );
                }
                custom_values[k] = *value;
            }
        }
        checked.push((handle, event, custom_values));
    }
    let n = checked.len();
    for (handle, event, custom_values) in checked {
        match event {
            LocalEvent::Inference {
                latency_ms,
                input_tokens,
                output_tokens,
                confidence,
                error,
                label,
                timestamp,
                ..
            } => {
                let e = InferenceEvent {
                    latency_ms,
                    input_tokens,
                    output_tokens,
                    confidence,
                    error,
                    label: label.as_deref(),
                    custom: &custom_values,
                };
                match timestamp {
                    Some(t) => handle.record_at(t, &e),
                    None => handle.record(&e),
                }
            }
            LocalEvent::Feedback {
                kind, timestamp, ..
            } => {
                let f = match kind {
                    FeedbackKind::Positive => Feedback::Positive,
                    FeedbackKind::Negative => Feedback::Negative,
                    FeedbackKind::Correction => Feedback::Correction,
                };
                match timestamp {
                    Some(t) => handle.feedback_at(t, f),
                    None => handle.feedback(f),
                }
            }
        }
    }
    shared
        .events_accepted
        .fetch_add(n as u64, Ordering::Relaxed);
    (StatusCode::ACCEPTED, Json(json!({ "accepted": n }))).into_response()
}

async fn get_status(State(shared): State<Arc<Shared>>) -> Response {
    let status = match shared.status.lock() {
        Ok(s) => s.clone(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let (late_events, clipped_values) = (
        shared.window_stats.late_events(),
        shared.window_stats.clipped_values(),
    );
    Json(json!({
        "status": status,
        "local": {
            "events_accepted": shared.events_accepted.load(Ordering::Relaxed),
            "requests_refused": shared.requests_refused.load(Ordering::Relaxed),
            "late_events": late_events,
            "clipped_values": clipped_values,
            "capped_events": shared.window_stats.capped_events(),
        }
    }))
    .into_response()
}

/// The router, with the body limit applied (413 past it).
pub fn router(shared: Arc<Shared>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/status", get(get_status))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(shared)
}
