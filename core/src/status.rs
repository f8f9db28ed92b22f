//! Device status, schema v1: a small retained JSON message on
//! `driftline/v1/{fleet}/{device_id}/status`, published by the agent when it
//! connects and whenever its state changes, and set by the broker as the
//! agent's last will (`state: "offline"`) when the connection drops.
//!
//! It carries nothing derived from events: budget and buffer figures
//! depend only on how many windows were published, not on what happened in
//! them (see docs/privacy.md).
//!
//! The field reference is in `docs/wire-format.md` ("Status message"), the
//! JSON Schema in `docs/status.schema.json`. [`StatusReport::decode`]
//! checks the shape and the identifiers; the collector adds the topic,
//! its clock and the ranges of the counters.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::topic::{check_identifier, check_version};
use crate::wire;

/// Whether the agent is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Online,
    Offline,
}

/// A model the device runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusModel {
    pub model_id: String,
    pub model_version: String,
}

/// The status message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub schema_version: u32,
    pub device_id: String,
    pub fleet: String,
    pub state: DeviceState,
    /// When the agent wrote this status (for the last will: when it connected).
    #[serde(deserialize_with = "wire::rfc3339::deserialize")]
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<StatusModel>,
    /// zCDP rho left in the current budget period (the budget's zCDP
    /// equivalent minus the rho of the windows released in the period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_remaining_rho: Option<f64>,
    /// Device-day epsilon left: the budget minus what the windows released
    /// in the current period compose to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_remaining_epsilon: Option<f64>,
    /// True while the budget is exhausted and windows are not published.
    #[serde(default)]
    pub budget_exhausted: bool,
    /// When publishing resumes, if exhausted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "wire::rfc3339::deserialize_option"
    )]
    pub resumes_at: Option<DateTime<Utc>>,
    /// Windows withheld because the budget was exhausted.
    #[serde(default)]
    pub windows_withheld: u64,
    /// Windows waiting in the on-disk buffer.
    #[serde(default)]
    pub buffered_windows: u64,
    /// Windows lost: dropped from a full buffer or found damaged on disk.
    #[serde(default)]
    pub lost_windows: u64,
}

impl StatusReport {
    /// A status of `state` at `at`, with no models, budget or buffer figures:
    /// the fields a message needs, for the sender to fill in the rest.
    pub fn new(device_id: &str, fleet: &str, state: DeviceState, at: DateTime<Utc>) -> Self {
        StatusReport {
            schema_version: 1,
            device_id: device_id.to_owned(),
            fleet: fleet.to_owned(),
            state,
            at,
            agent_version: None,
            models: Vec::new(),
            budget_remaining_rho: None,
            budget_remaining_epsilon: None,
            budget_exhausted: false,
            resumes_at: None,
            windows_withheld: 0,
            buffered_windows: 0,
            lost_windows: 0,
        }
    }

    /// Compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Plain structs of strings and numbers: serialisation cannot fail,
        // but a failure must still not panic.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Strict decoding: unknown fields are errors, integers are integer
    /// literals, timestamps RFC 3339, `schema_version` is 1, `device_id`,
    /// `fleet` and model ids are identifiers, versions are versions
    /// (`crate::topic`).
    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        let report: StatusReport = serde_json::from_slice(payload)?;
        report.check().map_err(serde::de::Error::custom)?;
        Ok(report)
    }

    /// The rules of [`StatusReport::decode`] beyond the JSON shape.
    fn check(&self) -> Result<(), String> {
        if self.schema_version != wire::SCHEMA_VERSION {
            return Err(format!(
                "schema_version {} is not supported (supported: 1)",
                self.schema_version
            ));
        }
        let mut identifiers = vec![("device_id", &self.device_id), ("fleet", &self.fleet)];
        let mut versions: Vec<(&str, &String)> = self
            .agent_version
            .iter()
            .map(|v| ("agent_version", v))
            .collect();
        for m in &self.models {
            identifiers.push(("models.model_id", &m.model_id));
            versions.push(("models.model_version", &m.model_version));
        }
        for (field, value) in identifiers {
            check_identifier(value).map_err(|e| format!("{field} {value:?} {e}"))?;
        }
        for (field, value) in versions {
            check_version(value).map_err(|e| format!("{field} {value:?} {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let s = StatusReport {
            schema_version: 1,
            device_id: "d".into(),
            fleet: "f".into(),
            state: DeviceState::Online,
            at: "2026-11-27T10:00:00Z".parse().expect("ts"),
            agent_version: Some("0.1.0".into()),
            models: vec![StatusModel {
                model_id: "m".into(),
                model_version: "1".into(),
            }],
            budget_remaining_rho: Some(12.5),
            budget_remaining_epsilon: Some(3.5),
            budget_exhausted: false,
            resumes_at: None,
            windows_withheld: 0,
            buffered_windows: 3,
            lost_windows: 0,
        };
        let bytes = s.encode();
        assert_eq!(StatusReport::decode(&bytes).expect("decode"), s);
        let text = String::from_utf8(bytes)
            .expect("utf8")
            .replace("\"state\"", "\"extra\":1,\"state\"");
        assert!(StatusReport::decode(text.as_bytes()).is_err());
    }

    #[test]
    fn versions_identifiers_and_timestamps_are_checked() {
        let good = serde_json::json!({
            "schema_version": 1, "device_id": "d", "fleet": "f", "state": "offline",
            "at": "2026-11-27T10:00:00+01:00", "agent_version": "0.1.0+git",
            "models": [{"model_id": "m", "model_version": "1+onnx"}],
            "resumes_at": null, "budget_remaining_rho": null, "lost_windows": 0
        });
        let decode = |v: &serde_json::Value| StatusReport::decode(v.to_string().as_bytes());
        let s = decode(&good).expect("valid status");
        assert_eq!(
            s.at,
            "2026-11-27T09:00:00Z".parse::<DateTime<Utc>>().expect("ts")
        );
        for (pointer, value, expected) in [
            ("/schema_version", serde_json::json!(2), "schema_version 2"),
            ("/device_id", serde_json::json!("a b"), "device_id"),
            (
                "/models/0/model_id",
                serde_json::json!("m+1"),
                "models.model_id",
            ),
            (
                "/models/0/model_version",
                serde_json::json!(""),
                "models.model_version",
            ),
            (
                "/agent_version",
                serde_json::json!("0.1 beta"),
                "agent_version",
            ),
            ("/at", serde_json::json!("2026-11-27 10:00:00Z"), "RFC 3339"),
            (
                "/resumes_at",
                serde_json::json!("2026-11-27T10:00:00+0000"),
                "RFC 3339",
            ),
            ("/lost_windows", serde_json::json!(1.0), "floating point"),
        ] {
            let mut bad = good.clone();
            *bad.pointer_mut(pointer).expect("field") = value;
            let e = decode(&bad).expect_err(pointer).to_string();
            assert!(e.contains(expected), "{pointer}: {e}");
        }
    }
}
