//! # driftline-runtime
//!
//! What both Driftline programs, the edge agent and the collector, need
//! around their work: TLS for MQTT connections and the SQL endpoint
//! ([`tls`]), and logs, metrics and their OpenTelemetry export
//! ([`telemetry`]).

pub mod telemetry;
pub mod tls;
