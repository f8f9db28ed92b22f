//! Retraining jobs: a rule turns drift events into jobs, jobs are
//! dispatched to a webhook (signed JSON) or a command, and their states are
//! kept in `retrain_job_events` (the `retrain_jobs` view shows the latest).
//!
//! The rule, per model: the events of the run must match (detectors,
//! severity); the model must have fired in each of the last `consecutive`
//! periods; no job of the model may be open (pending, dispatched,
//! acknowledged); the last job must be older than `cooldown` (event time).
//! A job's id is `{model_id}-{period end}`: running detection again for the
//! same period finds the job already there and dispatches nothing twice.
//!
//! Webhook: `POST` of the evidence JSON with `Content-Type:
//! application/json`, `X-Driftline-Job: {job_id}` (use it as the idempotency
//! key), and with a secret the signature headers of [`signature`]. A 2xx answer marks the job dispatched; timeouts, 5xx, 408
//! and 429 are retried with exponential backoff (4 attempts); other answers
//! fail the job. Command: run with `sh -c`, the evidence on stdin; exit 0
//! marks it dispatched. MQTT: published (QoS 1) to a configured topic; the
//! broker's acknowledgement marks it dispatched. The training system reports
//! back (acknowledged, succeeded, failed) with `POST /v1/jobs/{job_id}/status`
//! on `serve --metrics-listen` (signed the same way, with
//! `--job-report-secret`, see [`crate::observe`]) or `driftline-collector
//! job-status`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::lake::schema::{self, Evaluation, JobEvent};
use crate::lake::{LakeError, LakeWriter, JOB_EVENTS};
use crate::query::{self, QueryError};

/// When drift events become a job.
#[derive(Debug, Clone)]
pub struct RetrainRule {
    /// Detectors that count; empty: all.
    pub detectors: Vec<String>,
    /// `warning` or `critical`.
    pub min_severity: String,
    pub consecutive: u32,
    pub cooldown: Duration,
    /// A job for a period that ended longer ago than this (wall clock) is
    /// recorded as `stale` and not dispatched: a backfill of old history
    /// must not retrain today.
    pub max_age: Duration,
}

impl Default for RetrainRule {
    fn default() -> Self {
        RetrainRule {
            detectors: Vec::new(),
            min_severity: "warning".into(),
            consecutive: 2,
            cooldown: Duration::from_secs(6 * 3600),
            max_age: Duration::from_secs(86_400),
        }
    }
}

/// Where jobs go.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub webhook: Option<String>,
    /// HMAC-SHA256 key for the webhook's signature header.
    pub secret: Option<String>,
    /// A shell command that receives the evidence on stdin.
    pub command: Option<String>,
    /// An MQTT topic the evidence is published to (QoS 1).
    pub mqtt: Option<MqttTarget>,
}

/// Publishing jobs over MQTT.
#[derive(Debug, Clone)]
pub struct MqttTarget {
    pub broker: driftline_core::broker::BrokerUrl,
    pub topic: String,
    pub credentials: Option<crate::subscriber::Credentials>,
    pub tls: driftline_runtime::tls::TlsFiles,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.command.is_none() && self.mqtt.is_none()
    }
}

/// Errors of the job ledger.
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("no retraining job {0}")]
    UnknownJob(String),
    #[error("status must be one of acknowledged, succeeded, failed (got {0:?})")]
    Status(String),
}

/// The JSON a training system receives.
#[derive(Debug, Serialize)]
pub struct Evidence<'a> {
    pub job_id: &'a str,
    pub model_id: &'a str,
    pub model_version: &'a str,
    pub period_end: DateTime<Utc>,
    pub events: Vec<&'a Evaluation>,
    /// SQL that shows the events, for psql or Grafana.
    pub sql: String,
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn scalar_i64(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> Result<i64, QueryError> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    let batches = query::run(ctx, sql).await?;
    Ok(batches
        .first()
        .filter(|b| b.num_rows() > 0)
        .and_then(|b| datafusion::arrow::compute::cast(b.column(0), &DataType::Int64).ok())
        .and_then(|a| {
            let a = a.as_primitive::<Int64Type>();
            (!a.is_null(0)).then(|| a.value(0))
        })
        .unwrap_or(0))
}

/// Opens and dispatches the jobs the rule asks for after a detection run.
/// Returns the job events recorded.
pub async fn after_run(
    ctx: &datafusion::prelude::SessionContext,
    lake: &LakeWriter,
    rule: &RetrainRule,
    targets: &Targets,
    evaluations: &[Evaluation],
) -> Result<Vec<JobEvent>, RetrainError> {
    let mut models: std::collections::BTreeMap<(&str, &str), Vec<&Evaluation>> = Default::default();
    for e in evaluations.iter().filter(|e| {
        e.fired
            && (rule.detectors.is_empty() || rule.detectors.contains(&e.detector))
            && severity_rank(e.severity.as_deref().unwrap_or(""))
                >= severity_rank(&rule.min_severity)
    }) {
        models
            .entry((&e.model_id, &e.model_version))
            .or_default()
            .push(e);
    }
    let mut recorded = Vec::new();
    for ((model_id, model_version), events) in models {
        let Some(end) = events.iter().map(|e| e.current_end).max() else {
            continue;
        };
        let length = events
            .iter()
            .map(|e| e.current_end - e.current_start)
            .min()
            .unwrap_or_default();
        // Fired in each of the last `consecutive` periods?
        let since = end - length * i32::try_from(rule.consecutive.max(1)).unwrap_or(1);
        let periods = scalar_i64(
            ctx,
            &format!(
                "SELECT count(DISTINCT current_end) AS n FROM drift_events \
                 WHERE model_id = {} AND model_version = {} \
                 AND current_end > TIMESTAMP '{}' AND current_end <= TIMESTAMP '{}'",
                quote(model_id),
                quote(model_version),
                since.to_rfc3339(),
                end.to_rfc3339()
            ),
        )
        .await?;
        if periods < i64::from(rule.consecutive.max(1)) {
            continue;
        }
        let job_id = format!("{model_id}-{}", end.format("%Y%m%dT%H%MZ"));
        let open = scalar_i64(
            ctx,
            &format!(
                "SELECT count(*) AS n FROM retrain_jobs WHERE model_id = {} AND job_id <> {} \
                 AND (status IN ('pending', 'dispatched', 'acknowledged') \
                      OR period_end > TIMESTAMP '{}')",
                quote(model_id),
                quote(&job_id),
                (end - chrono::TimeDelta::from_std(rule.cooldown).unwrap_or_default()).to_rfc3339()
            ),
        )
        .await?;
        if open > 0 {
            continue;
        }
        let evidence = Evidence {
            job_id: &job_id,
            model_id,
            model_version,
            period_end: end,
            events: events.clone(),
            sql: format!(
                "SELECT * FROM drift_events WHERE model_id = {} AND model_version = {} \
                 AND current_end = TIMESTAMP '{}'",
                quote(model_id),
                quote(model_version),
                end.format("%Y-%m-%dT%H:%M:%SZ")
            ),
        };
        let body = serde_json::to_string_pretty(&evidence).unwrap_or_default();
        let pending = JobEvent {
            job_id: job_id.clone(),
            model_id: model_id.to_owned(),
            model_version: model_version.to_owned(),
            status: "pending".into(),
            at: Utc::now(),
            period_end: end,
            detail: Some(format!("{} drift event(s)", events.len())),
            evidence: Some(body.clone()),
        };
        if record(lake, &pending)? == 0 {
            continue; // this job exists: dispatched before
        }
        recorded.push(pending.clone());
        if targets.is_empty() {
            continue;
        }
        let age = Utc::now() - end;
        let max_age = chrono::TimeDelta::from_std(rule.max_age).unwrap_or(chrono::TimeDelta::MAX);
        let (status, detail) = if age > max_age {
            (
                "stale",
                format!(
                    "not dispatched: the period ended {} ago, more than --retrain-max-age",
                    humantime::format_duration(age.to_std().unwrap_or_default())
                ),
            )
        } else {
            match dispatch(targets, &job_id, body).await {
                Ok(detail) => ("dispatched", detail),
                Err(detail) => ("failed", detail),
            }
        };
        let next = JobEvent {
            status: status.into(),
            at: Utc::now(),
            detail: Some(detail),
            evidence: None,
            ..pending
        };
        record(lake, &next)?;
        metrics::counter!("driftline_jobs_total", "status" => status).increment(1);
        recorded.push(next);
    }
    Ok(recorded)
}

/// Stores one job event; returns 1 if new, 0 if it was there already.
fn record(lake: &LakeWriter, event: &JobEvent) -> Result<usize, RetrainError> {
    let batch = schema::job_events_batch(std::slice::from_ref(event)).map_err(|source| {
        LakeError::Arrow {
            table: JOB_EVENTS,
            source,
        }
    })?;
    let date = event.at.format("%Y-%m-%d").to_string();
    Ok(lake.append(JOB_EVENTS, &date, &batch)?.rows)
}

/// Records a status reported by the training system.
pub async fn report(
    ctx: &datafusion::prelude::SessionContext,
    lake: &LakeWriter,
    job_id: &str,
    status: &str,
    detail: Option<String>,
) -> Result<(), RetrainError> {
    if !["acknowledged", "succeeded", "failed"].contains(&status) {
        return Err(RetrainError::Status(status.to_owned()));
    }
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::TimestampMicrosecondType;
    let batches = query::run(
        ctx,
        &format!(
            "SELECT model_id, model_version, period_end FROM retrain_jobs WHERE job_id = {}",
            quote(job_id)
        ),
    )
    .await?;
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Err(RetrainError::UnknownJob(job_id.to_owned()));
    };
    let text = |i: usize| {
        datafusion::arrow::compute::cast(b.column(i), &datafusion::arrow::datatypes::DataType::Utf8)
            .ok()
            .map(|a| a.as_string::<i32>().value(0).to_owned())
            .unwrap_or_default()
    };
    let period_end = b
        .column(2)
        .as_primitive_opt::<TimestampMicrosecondType>()
        .and_then(|a| DateTime::from_timestamp_micros(a.value(0)))
        .unwrap_or_else(Utc::now);
    record(
        lake,
        &JobEvent {
            job_id: job_id.to_owned(),
            model_id: text(0),
            model_version: text(1),
            status: status.to_owned(),
            at: Utc::now(),
            period_end,
            detail,
            evidence: None,
        },
    )?;
    Ok(())
}

/// Sends a job to every target; the first failure fails it.
#[tracing::instrument(name = "retrain_dispatch", skip(targets, body))]
async fn dispatch(targets: &Targets, job_id: &str, body: String) -> Result<String, String> {
    let mut done = Vec::new();
    if let Some(url) = &targets.webhook {
        let (url, secret, job) = (url.clone(), targets.secret.clone(), job_id.to_owned());
        let body = body.clone();
        tokio::task::spawn_blocking(move || post(&url, secret.as_deref(), &job, &body))
            .await
            .map_err(|e| e.to_string())??;
        done.push(format!(
            "webhook {}",
            targets.webhook.as_deref().unwrap_or_default()
        ));
    }
    if let Some(command) = &targets.command {
        run_command(command, &body).await?;
        done.push("command".to_owned());
    }
    if let Some(mqtt) = &targets.mqtt {
        publish(mqtt, job_id, &body).await?;
        done.push(format!("MQTT topic {}", mqtt.topic));
    }
    Ok(format!("sent to {}", done.join(" and ")))
}

/// The signed request scheme of the webhook and of job reports: the
/// headers `X-Driftline-Timestamp: {Unix seconds}` and
/// `X-Driftline-Signature: sha256={hex}`, where hex is the HMAC-SHA256,
/// under the shared secret, of `{timestamp}.{METHOD}.{path}.{body}`. The
/// path (which holds the job id) and the method are signed, so a signature
/// is good for one request only; the receiver refuses timestamps more than
/// [`SIGNATURE_MAX_AGE`] away from its clock and signatures it has seen.
pub fn signature(secret: &str, timestamp: i64, method: &str, path: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, &signed_message(timestamp, method, path, body));
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`signature`] signs: `{timestamp}.{method}.{path}.{body}`.
pub fn signed_message(timestamp: i64, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut message = format!("{timestamp}.{method}.{path}.").into_bytes();
    message.extend_from_slice(body);
    message
}

/// How far a signed request's timestamp may be from the receiver's clock.
pub const SIGNATURE_MAX_AGE: Duration = Duration::from_secs(300);

fn post(url: &str, secret: Option<&str>, job_id: &str, body: &str) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut delay = Duration::from_millis(500);
    let mut last = String::new();
    for attempt in 1..=4 {
        let mut request = agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Driftline-Job", job_id);
        if let Some(secret) = secret {
            // Signed at each attempt, with the time it is sent.
            let timestamp = Utc::now().timestamp();
            let path =
                url::Url::parse(url).map_or_else(|_| "/".to_owned(), |u| u.path().to_owned());
            request = request
                .header("X-Driftline-Timestamp", timestamp.to_string())
                .header(
                    "X-Driftline-Signature",
                    format!(
                        "sha256={}",
                        signature(secret, timestamp, "POST", &path, body.as_bytes())
                    ),
                );
        }
        match request.send(body) {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let code = response.status().as_u16();
                last = format!("webhook answered {code}");
                if !(code >= 500 || code == 408 || code == 429) {
                    return Err(last);
                }
            }
            Err(e) => last = format!("webhook: {e}"),
        }
        tracing::warn!(attempt, error = %last, "retraining webhook failed; retrying");
        if attempt < 4 {
            std::thread::sleep(delay);
            delay *= 2;
        }
    }
    Err(format!("{last} (4 attempts)"))
}

/// Publishes the evidence (QoS 1) and waits for the broker's PubAck.
async fn publish(target: &MqttTarget, job_id: &str, body: &str) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new(
        format!("driftline-jobs-{}", std::process::id()),
        target.broker.host.clone(),
        target.broker.port,
    );
    if let Some(c) = &target.credentials {
        options.set_credentials(c.username.clone(), c.password.clone());
    }
    options.set_transport(
        driftline_runtime::tls::transport(&target.broker, &target.tls)
            .map_err(|e| e.to_string())?,
    );
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .try_publish(
            &target.topic,
            QoS::AtLeastOnce,
            false,
            body.as_bytes().to_vec(),
        )
        .map_err(|e| e.to_string())?;
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(format!("MQTT {}: {e}", target.broker)),
            }
        }
    })
    .await
    .map_err(|_| format!("MQTT {}: no acknowledgement in 10 s", target.broker))?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Outgoing(Outgoing::Disconnect) = event {
                break;
            }
        }
    })
    .await;
    tracing::debug!(job_id, topic = target.topic, "job published");
    acked
}

async fn run_command(command: &str, body: &str) -> Result<(), String> {
    let (command, body) = (command.to_owned(), body.to_owned());
    tokio::task::spawn_blocking(move || run_command_blocking(&command, &body))
        .await
        .map_err(|e| e.to_string())?
}

/// Runs `sh -c command` with `body` on stdin, at most 60 s.
fn run_command_blocking(command: &str, body: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(body.as_bytes())
            .map_err(|e| format!("writing to {command:?}: {e}"))?;
    }
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{command:?} exited with {status}")),
            Ok(None) if std::time::Instant::now() > until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{command:?} ran longer than 60 s"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_method_path_and_body() {
        // Python: hmac.new(b"Jefe", b"1700000000.POST./v1/jobs/m-1/status.what do
        // ya want for nothing?", hashlib.sha256).hexdigest()
        assert_eq!(
            signature(
                "Jefe",
                1_700_000_000,
                "POST",
                "/v1/jobs/m-1/status",
                b"what do ya want for nothing?"
            ),
            "6d2d1d54a39c7d8f48da3e91e0502411f2e271a9ff34486469edf13b877a9ffc"
        );
    }

    fn drift(end: chrono::DateTime<Utc>) -> Evaluation {
        Evaluation {
            detected_at: Utc::now(),
            detector: "error_rate".into(),
            model_id: "m".into(),
            model_version: "1".into(),
            statistic: "error_rate_increase".into(),
            value: Some(0.2),
            threshold: 0.01,
            p_value: Some(1e-9),
            alpha: 0.001,
            reference_start: end - chrono::TimeDelta::minutes(75),
            reference_end: end - chrono::TimeDelta::minutes(15),
            current_start: end - chrono::TimeDelta::minutes(15),
            current_end: end,
            devices: 30,
            events: 900,
            epsilon: Some(1.0),
            fired: true,
            severity: Some("critical".into()),
            query_file: "error_rate.sql".into(),
            devices_expected: Some(30),
            devices_present: Some(30),
            revision: 0,
            rows_seen: Some(150),
            devices_capped: Some(0),
        }
    }

    /// Two drifted periods in a row, `ago` before now, recorded and handed
    /// to the rule; returns the status of the job's last event.
    fn job_status(ago: chrono::TimeDelta, max_age: Duration) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = LakeWriter::open(dir.path()).expect("lake");
        let end = chrono::DateTime::from_timestamp((Utc::now() - ago).timestamp() / 900 * 900, 0)
            .expect("ts");
        let events = [drift(end - chrono::TimeDelta::minutes(15)), drift(end)];
        let batch = schema::evaluations_batch(&events).expect("batch");
        lake.append(
            crate::lake::DRIFT_EVENTS,
            &end.format("%Y-%m-%d").to_string(),
            &batch,
        )
        .expect("append");
        let rule = RetrainRule {
            max_age,
            ..RetrainRule::default()
        };
        // Nothing listens there: a dispatch attempt fails.
        let targets = Targets {
            webhook: Some("http://127.0.0.1:9/jobs".into()),
            ..Targets::default()
        };
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let jobs = rt.block_on(async {
            let ctx = crate::query::session(dir.path()).await.expect("session");
            after_run(&ctx, &lake, &rule, &targets, &events[1..])
                .await
                .expect("rule")
        });
        jobs.last().map(|j| j.status.clone()).unwrap_or_default()
    }

    #[test]
    fn a_job_for_an_old_period_is_recorded_stale_not_dispatched() {
        let day = Duration::from_secs(86_400);
        assert_eq!(job_status(chrono::TimeDelta::days(3), day), "stale");
        // A recent one is dispatched (and fails here: nobody listens).
        assert_eq!(job_status(chrono::TimeDelta::hours(1), day), "failed");
    }
}
