//! `driftline-collector validate`: the collector's verdict on messages,
//! without a broker or a lake, for firmware developers and for the tests
//! that hold the published JSON Schemas to the collector
//! (`tests/test_wire_agreement.py`).
//!
//! It reads JSON lines `{"topic": "...", "payload": ...}` and prints one
//! line per input, `{"accepted": bool, "reason": "code" | null, "detail":
//! "..."}`, deciding exactly as ingest does for each message on its own:
//! [`driftline_core::wire::accept`] for metrics (and anything that is not a
//! status topic), [`crate::ingest::accept_status`] for status messages.
//! What ingest decides from the lake or its own state (a window stored
//! already, quarantine quotas) is not part of a message's validity and is
//! not checked here.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use driftline_core::topic::{self, TopicKind};
use driftline_core::wire::{self, TimeBounds};
use serde::{Deserialize, Serialize};

use crate::ingest::{self, IngestLimits};

/// `driftline-collector validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Files of JSON lines `{"topic": "...", "payload": ...}`, checked in
    /// order; none or `-`: standard input. A string payload is used as the
    /// message's exact bytes; any other JSON value is serialised compactly
    /// first (keys sorted).
    pub files: Vec<PathBuf>,
    /// The collector's clock for the time bounds (RFC 3339). Default: now.
    #[arg(long)]
    pub now: Option<DateTime<Utc>>,
    /// Oldest accepted window start, relative to --now (serve's
    /// --max-event-age). Default: 30d
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_event_age: Option<Duration>,
    /// How far past --now a window may end (serve's --max-future-skew).
    /// Default: 1h
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_future_skew: Option<Duration>,
}

/// The verdict on one message, one JSON line of output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub accepted: bool,
    /// The reason code a `quarantine` row would get; `None` when accepted.
    pub reason: Option<&'static str>,
    /// The `quarantine.detail` sentence, or what was accepted.
    pub detail: String,
}

/// The reason of an input line that is not `{"topic", "payload"}`: a
/// mistake in the input, not a reason the collector ever gives.
pub const BAD_INPUT: &str = "bad_input";

#[derive(Deserialize)]
struct Input {
    topic: String,
    payload: serde_json::Value,
}

/// What ingest decides about `payload` received on `topic` at `bounds.now`,
/// from the message alone.
pub fn verdict(topic: &str, payload: &[u8], bounds: &TimeBounds) -> Verdict {
    // Dispatch as `Ingest::handle` does: status topics get the status
    // check, every other topic the metrics decoder (which refuses topics
    // that are not metrics topics as `bad_topic`).
    let is_status = topic::parse(topic).is_some_and(|t| t.kind == TopicKind::Status);
    let result = if is_status {
        ingest::accept_status(topic, payload, bounds)
            .map(|s| format!("status of {} in {}: {:?}", s.device_id, s.fleet, s.state))
            .map_err(|detail| (ingest::INVALID_STATUS, detail))
    } else {
        wire::accept(topic, payload, bounds)
            .map(|r| {
                format!(
                    "window of {} {} from {} ({} s)",
                    r.model_id,
                    r.model_version,
                    r.window_start
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    r.window_secs
                )
            })
            .map_err(|r| (r.code(), r.to_string()))
    };
    match result {
        Ok(detail) => Verdict {
            accepted: true,
            reason: None,
            detail,
        },
        Err((reason, detail)) => Verdict {
            accepted: false,
            reason: Some(reason),
            detail,
        },
    }
}

/// The verdict on one input line.
pub fn verdict_on_line(line: &str, bounds: &TimeBounds) -> Verdict {
    let input: Input = match serde_json::from_str(line) {
        Ok(input) => input,
        Err(e) => {
            return Verdict {
                accepted: false,
                reason: Some(BAD_INPUT),
                detail: format!("the input line is not {{\"topic\": ..., \"payload\": ...}}: {e}"),
            }
        }
    };
    let payload = match input.payload {
        serde_json::Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    verdict(&input.topic, &payload, bounds)
}

/// Runs the subcommand: one output line per non-blank input line; an
/// error (exit status 1) when any message was refused.
pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let defaults = IngestLimits::default();
    let span = |d: Option<Duration>, default: TimeDelta| -> anyhow::Result<TimeDelta> {
        Ok(d.map(TimeDelta::from_std).transpose()?.unwrap_or(default))
    };
    let bounds = TimeBounds {
        now: args.now.unwrap_or_else(Utc::now),
        max_age: span(args.max_event_age, defaults.max_event_age)?,
        max_future: span(args.max_future_skew, defaults.max_future_skew)?,
    };
    let sources: Vec<Option<PathBuf>> = if args.files.is_empty() {
        vec![None]
    } else {
        args.files
            .into_iter()
            .map(|f| (f.as_os_str() != "-").then_some(f))
            .collect()
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let (mut seen, mut refused) = (0usize, 0usize);
    for source in sources {
        let reader: Box<dyn BufRead> = match &source {
            None => Box::new(std::io::stdin().lock()),
            Some(path) => Box::new(BufReader::new(
                File::open(path).with_context(|| format!("opening {}", path.display()))?,
            )),
        };
        let name = source
            .as_ref()
            .map_or("standard input".to_owned(), |p| p.display().to_string());
        for line in reader.lines() {
            let line = line.with_context(|| format!("reading {name}"))?;
            if line.trim().is_empty() {
                continue;
            }
            let v = verdict_on_line(&line, &bounds);
            seen += 1;
            refused += usize::from(!v.accepted);
            serde_json::to_writer(&mut out, &v)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    if refused > 0 {
        anyhow::bail!("{refused} of {seen} messages refused");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> TimeBounds {
        TimeBounds {
            now: "2026-11-27T12:00:00Z".parse().expect("ts"),
            max_age: TimeDelta::days(30),
            max_future: TimeDelta::hours(1),
        }
    }

    fn fixture() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../core/tests/fixtures/v1/valid/laplace.json");
        std::fs::read_to_string(path).expect("fixture")
    }

    #[test]
    fn metrics_and_status_get_ingest_verdicts() {
        let metrics = "driftline/v1/eu-kiosks/kiosk-0007/metrics";
        let line = serde_json::json!({"topic": metrics, "payload": fixture()}).to_string();
        let v = verdict_on_line(&line, &bounds());
        assert!(v.accepted, "{v:?}");
        assert_eq!(v.reason, None);
        // The same message as a JSON value rather than its bytes.
        let value: serde_json::Value = serde_json::from_str(&fixture()).expect("json");
        let line = serde_json::json!({"topic": metrics, "payload": value}).to_string();
        assert!(verdict_on_line(&line, &bounds()).accepted);
        // Time bounds follow --now.
        let late = TimeBounds {
            now: "2027-01-01T00:00:00Z".parse().expect("ts"),
            ..bounds()
        };
        let v = verdict_on_line(&line, &late);
        assert_eq!(v.reason, Some("timestamp_out_of_range"), "{v:?}");
        let other = serde_json::json!({"topic": "driftline/v1/eu-kiosks/other/metrics",
            "payload": fixture()})
        .to_string();
        assert_eq!(
            verdict_on_line(&other, &bounds()).reason,
            Some("topic_mismatch")
        );
        let status = serde_json::json!({
            "topic": "driftline/v1/eu-kiosks/kiosk-0007/status",
            "payload": {"schema_version": 1, "device_id": "kiosk-0007", "fleet": "eu-kiosks",
                "state": "online", "at": "2026-11-27T11:59:00Z"},
        })
        .to_string();
        let v = verdict_on_line(&status, &bounds());
        assert!(v.accepted, "{v:?}");
        let v = verdict_on_line(&status.replace("kiosk-0007/status", "x/status"), &bounds());
        assert_eq!(v.reason, Some(ingest::INVALID_STATUS));
        let v = verdict_on_line(r#"{"payload": 1}"#, &bounds());
        assert_eq!(v.reason, Some(BAD_INPUT));
        assert!(v.detail.contains("topic"), "{v:?}");
    }
}
