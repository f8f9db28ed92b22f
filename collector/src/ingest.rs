//! Ingest state: every received message is either accepted into the
//! pending `metrics` rows or kept, whole, as a pending `quarantine` row with
//! its reason. [`Ingest::flush`] writes what is pending to the lake.
//!
//! Plain state without I/O of its own (the lake writer is passed in), so
//! tests drive it directly; [`crate::subscriber`] drives it from MQTT.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeDelta, Utc};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use driftline_core::wire::{self, TimeBounds};

use crate::lake::schema::{self, QuarantinedMessage, StoredWindow};
use crate::lake::{LakeError, LakeWriter, METRICS, QUARANTINE};

/// Limits applied to every message.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// Oldest accepted `window_start`, relative to reception.
    pub max_event_age: TimeDelta,
    /// How far a window's end may lie past reception (clock skew).
    pub max_future_skew: TimeDelta,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_event_age: TimeDelta::days(30),
            max_future_skew: TimeDelta::hours(1),
        }
    }
}

/// Live counters, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct Counters {
    /// Subscriptions the broker confirmed (SubAck), across reconnects.
    pub subscriptions: AtomicU64,
    pub received: AtomicU64,
    pub accepted: AtomicU64,
    pub quarantined: AtomicU64,
    /// Rows written to the lake (metrics and quarantine).
    pub stored_windows: AtomicU64,
    pub stored_quarantine: AtomicU64,
    pub files_written: AtomicU64,
    pub flush_errors: AtomicU64,
    quarantined_by_reason: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    /// Quarantined messages per reason code.
    pub fn quarantined_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.quarantined_by_reason
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Quarantined { reason: &'static str },
}

/// Pending rows, by partition date, waiting for the next flush.
#[derive(Debug)]
pub struct Ingest {
    limits: IngestLimits,
    counters: Arc<Counters>,
    metrics: BTreeMap<String, Vec<StoredWindow>>,
    quarantine: BTreeMap<String, Vec<QuarantinedMessage>>,
    pending: usize,
}

impl Ingest {
    pub fn new(limits: IngestLimits, counters: Arc<Counters>) -> Self {
        Ingest {
            limits,
            counters,
            metrics: BTreeMap::new(),
            quarantine: BTreeMap::new(),
            pending: 0,
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Rows waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Validates one message and queues it as a metrics or quarantine row.
    pub fn handle(&mut self, topic: &str, payload: &[u8], received_at: DateTime<Utc>) -> Outcome {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.pending += 1;
        let bounds = TimeBounds {
            now: received_at,
            max_age: self.limits.max_event_age,
            max_future: self.limits.max_future_skew,
        };
        match wire::accept(topic, payload, &bounds) {
            Ok(report) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                let date = report.window_start.format("%Y-%m-%d").to_string();
                self.metrics.entry(date).or_default().push(StoredWindow {
                    received_at,
                    report,
                });
                Outcome::Accepted
            }
            Err(rejection) => {
                let reason = rejection.code();
                tracing::warn!(topic, reason, detail = %rejection, "message quarantined");
                self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut m) = self.counters.quarantined_by_reason.lock() {
                    *m.entry(reason).or_default() += 1;
                }
                let date = received_at.format("%Y-%m-%d").to_string();
                self.quarantine
                    .entry(date)
                    .or_default()
                    .push(QuarantinedMessage {
                        received_at,
                        topic: topic.to_owned(),
                        reason,
                        detail: rejection.to_string(),
                        payload: payload.to_vec(),
                    });
                Outcome::Quarantined { reason }
            }
        }
    }

    /// Writes every pending row to the lake, one file per table and date.
    /// A partition whose write fails stays pending for the next flush; the
    /// first error is returned after the other partitions were tried.
    pub fn flush(&mut self, lake: &LakeWriter) -> Result<(), LakeError> {
        for rows in self.metrics.values_mut() {
            rows.sort_by(|a, b| {
                let (a, b) = (&a.report, &b.report);
                (&a.model_id, a.window_start, &a.device_id).cmp(&(
                    &b.model_id,
                    b.window_start,
                    &b.device_id,
                ))
            });
        }
        let counters = &self.counters;
        let (metrics_rows, metrics_error) = flush_table(
            lake,
            METRICS,
            &mut self.metrics,
            schema::metrics_batch,
            &counters.stored_windows,
            counters,
        );
        let (quarantine_rows, quarantine_error) = flush_table(
            lake,
            QUARANTINE,
            &mut self.quarantine,
            schema::quarantine_batch,
            &counters.stored_quarantine,
            counters,
        );
        self.pending = self.pending.saturating_sub(metrics_rows + quarantine_rows);
        match metrics_error.or(quarantine_error) {
            Some(e) => {
                self.counters.flush_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            None => Ok(()),
        }
    }
}

/// Writes each date's rows of one table as one file; rows whose write fails
/// stay in `pending`. Returns the rows written and the first error.
fn flush_table<T>(
    lake: &LakeWriter,
    table: &'static str,
    pending: &mut BTreeMap<String, Vec<T>>,
    build: fn(&[T]) -> Result<RecordBatch, ArrowError>,
    stored: &AtomicU64,
    counters: &Counters,
) -> (usize, Option<LakeError>) {
    let mut written_rows = 0;
    let mut first_error = None;
    for (date, rows) in std::mem::take(pending) {
        let written = build(&rows)
            .map_err(|source| LakeError::Arrow { table, source })
            .and_then(|batch| lake.write(table, &date, &batch));
        match written {
            Ok(path) => {
                written_rows += rows.len();
                stored.fetch_add(rows.len() as u64, Ordering::Relaxed);
                counters.files_written.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(table, rows = rows.len(), path = %path.display(), "flushed");
            }
            Err(e) => {
                pending.insert(date, rows);
                first_error.get_or_insert(e);
            }
        }
    }
    (written_rows, first_error)
}
