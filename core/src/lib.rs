//! # driftline-core
//!
//! The vocabulary every other Driftline crate speaks: the wire schema
//! (`wire`), the MQTT topic layout (`topic`) and the histogram bucket layouts
//! (`histogram`).
//!
//! Invariants:
//! - Only this crate defines payload bytes and topic strings. The agent and the
//!   collector call [`wire::WindowReport::encode`] and [`wire::accept`]; they
//!   never build or pick apart JSON by hand.
//! - Decoding is strict and total: any byte string either becomes a validated
//!   [`wire::WindowReport`] or a [`wire::Rejection`] with a stable reason code.
//!   Nothing here panics on input.
//! - No I/O, no async runtime, no Arrow: this crate compiles for any device.

pub mod broker;
pub mod histogram;
pub mod status;
pub mod topic;
pub mod wire;
