//! # driftline-collector
//!
//! ingest -> validate -> store -> query:
//!
//! - [`subscriber`]: MQTT subscription (QoS 1, persistent session), drives
//!   [`ingest`].
//! - [`ingest`]: validates each message with `driftline_core::wire::accept`
//!   and queues it for `metrics`, or for `quarantine` with its reason.
//! - [`lake`]: Parquet files, hive-partitioned by date, and the DataFusion
//!   tables over them ([`lake::schema`] maps wire fields to columns).
//! - [`wal`]: the write-ahead log that makes a message durable before it
//!   is acknowledged.
//! - [`observe`]: `/metrics` (Prometheus) and `/health`.
//! - [`maintenance`]: compaction and retention, on a schedule in `serve`.
//! - [`query`]: the DataFusion session shared by every SQL user.
//! - [`endpoint`]: the PostgreSQL-wire SQL endpoint (auth, TLS, read-only,
//!   limits) over the [`query`] session.
//! - [`detect`]: detectors from `queries/detectors/*.sql`, drift events;
//!   [`retrain`]: retraining jobs and their dispatch.
//! - [`demo`]: the whole loop in one process.
//! - [`validate`]: ingest's verdict on messages read from files, for
//!   `driftline-collector validate`.
//!
//! Invariants: nothing received is dropped silently (every message becomes
//! a `metrics` or a `quarantine` row, and both are counted); files appear in
//! the lake atomically; only this crate depends on Arrow, Parquet and
//! DataFusion.

pub mod config;
pub mod demo;
pub mod detect;
pub mod endpoint;
pub mod ingest;
pub mod lake;
pub mod maintenance;
pub mod observe;
pub mod query;
pub mod retrain;
pub mod subscriber;
pub mod validate;
pub mod wal;
