//! Device status, schema v1: a small retained JSON message on
//! `driftline/v1/{fleet}/{device_id}/status`, published by the agent when it
//! connects and whenever its state changes, and set by the broker as the
//! agent's last will (`state: "offline"`) when the connection drops.
//!
//! It carries nothing derived from events: budget and buffer figures
//! depend only on how many windows were published, not on what happened in
//! them (see docs/privacy.md).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Plain structs of strings and numbers: serialisation cannot fail,
        // but a failure must still not panic.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Strict decoding; unknown fields are errors.
    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
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
}
