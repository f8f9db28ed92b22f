//! # driftline-agent
//!
//! The on-device side of Driftline: applications record inference events
//! and feedback; the agent aggregates them per model into tumbling windows
//! ([`window`]), adds calibrated differential-privacy noise ([`privacy`]) and
//! publishes one message per model and window over MQTT ([`publish`]).
//! [`simulate`] runs many such pipelines as a synthetic fleet.
//!
//! Invariants:
//! - Raw events and exact counts never leave [`window`] and [`privacy`]: the
//!   publisher only accepts a [`privacy::PrivateWindow`], which only
//!   [`privacy::Privatizer::privatize`] can construct.
//! - Payloads are built by `driftline_core::wire`, never by hand.
//! - No Arrow, Parquet or DataFusion: the agent stays small for devices.

pub mod accountant;
pub mod buffer;
pub mod coarsen;
pub mod config;
pub mod event;
pub mod guarantee;
pub mod http;
pub mod ledger;
pub mod mqtt;
pub mod privacy;
pub mod publish;
pub mod runtime;
pub mod simulate;
pub mod telemetry;
pub mod tls;
pub mod window;

/// The agent's version, written into every message as `agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
