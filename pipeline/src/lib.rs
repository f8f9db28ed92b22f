//! # driftline-pipeline
//!
//! The window pipeline every Driftline device runs, the edge agent and each
//! simulated device alike: applications' inference events and feedback
//! ([`event`]) are counted per model into tumbling windows ([`window`]); a
//! closed window spends privacy budget ([`ledger`], composed by
//! [`accountant`]) and only then gets calibrated OpenDP noise ([`privacy`]),
//! both in one step, [`release::release`];
//! [`guarantee`] states what a configuration guarantees per device-day.
//!
//! Invariants:
//! - Raw events and exact counts never leave [`window`] and [`privacy`]:
//!   what leaves is a [`privacy::PrivateWindow`], which only
//!   [`release::release`] hands out, after the window's cost is in the
//!   ledger.
//! - Payloads are built by `driftline_core::wire`, never by hand.
//! - No I/O beyond the ledger's own file, no Arrow, Parquet or DataFusion:
//!   this runs on devices.

pub mod accountant;
pub mod event;
pub mod guarantee;
pub mod ledger;
pub mod privacy;
pub mod release;
pub mod window;

/// The agent's version, written into every message as `agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
