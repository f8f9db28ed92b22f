//! # driftline-agent
//!
//! The on-device side of Driftline: applications record inference events
//! and feedback (Rust API, or the local HTTP endpoint of [`http`]); the
//! agent runs them through the window pipeline (`driftline_pipeline`:
//! windows, privacy budget, noise), keeps what it could not yet send in a
//! disk queue ([`buffer`], merged by [`coarsen`] when full) and publishes
//! over MQTT ([`mqtt`]); [`runtime`] is the loop that ties them together,
//! [`config`] its settings.
//!
//! Invariants:
//! - Raw events and exact counts never leave the pipeline: the agent only
//!   handles `driftline_pipeline::privacy::PrivateWindow`s and their
//!   messages.
//! - No Arrow, Parquet or DataFusion, and no fleet simulator (that is
//!   `driftline-sim`, run by `driftline-agent simulate` as a program of its
//!   own): the agent stays small for devices.

/// The recording API apps call (docs/agent.md, "Recording from Rust"):
/// events, models and their windows, from the pipeline.
pub use driftline_pipeline::{event, window};

pub mod buffer;
pub mod coarsen;
pub mod config;
pub mod http;
pub mod mqtt;
pub mod runtime;
