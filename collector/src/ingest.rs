//! Ingest state: every received message is either accepted into the
//! pending `metrics` rows or kept, whole, as a pending `quarantine` row with
//! its reason. [`Ingest::flush`] writes what is pending to the lake.
//!
//! Plain state without I/O of its own (the lake writer is passed in), so
//! tests drive it directly; [`crate::subscriber`] drives it from MQTT.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::{
    concat_batches, lexsort_to_indices, take_record_batch, SortColumn,
};
use datafusion::arrow::datatypes::TimestampMicrosecondType;
use datafusion::arrow::error::ArrowError;
use driftline_core::status::StatusReport;
use driftline_core::topic::TopicKind;
use driftline_core::wire::{self, TimeBounds};

use crate::lake::schema::{self, MetricsColumns, QuarantinedMessage, StoredStatus};
use crate::lake::{LakeError, LakeWriter, METRICS, QUARANTINE, STATUS};

/// Limits applied to every message.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// Oldest accepted `window_start`, relative to reception.
    pub max_event_age: TimeDelta,
    /// How far a window's end may lie past reception (clock skew).
    pub max_future_skew: TimeDelta,
    /// Quarantine rows kept per device (the topic's fleet and device) and
    /// hour of reception; the device's further refused messages in that
    /// hour are counted, not kept. 0: no limit.
    pub quarantine_quota: u32,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_event_age: TimeDelta::days(30),
            max_future_skew: TimeDelta::hours(1),
            quarantine_quota: 1000,
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
    /// Status messages accepted (online, offline, last will).
    pub status: AtomicU64,
    /// Rows written to the lake, per table.
    pub stored_windows: AtomicU64,
    pub stored_quarantine: AtomicU64,
    pub stored_status: AtomicU64,
    /// Rows not written because the lake already held their key
    /// (redeliveries, agent retries, replays after a crash).
    pub duplicates: AtomicU64,
    pub files_written: AtomicU64,
    pub flush_errors: AtomicU64,
    /// Messages replayed from the write-ahead log at start-up.
    pub replayed: AtomicU64,
    /// Refused messages not kept because their device had used its
    /// quarantine quota for the hour.
    pub over_quota: AtomicU64,
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

    fn count_quarantined(&self, reason: &'static str, n: u64) {
        self.quarantined.fetch_add(n, Ordering::Relaxed);
        if let Ok(mut m) = self.quarantined_by_reason.lock() {
            *m.entry(reason).or_default() += n;
        }
    }
}

/// Reason code of a status message that does not parse or whose device
/// does not match its topic.
pub const INVALID_STATUS: &str = "invalid_status";
/// Reason code of an accepted message that could not be turned into a lake
/// row (a bug or a schema change, never expected).
pub const UNSTORABLE: &str = "unstorable";
/// Reason code of a window the lake holds already under another `seq`: one
/// window of a device, model and version counts once, and the first kept
/// wins (docs/wire-format.md).
pub const DUPLICATE_WINDOW: &str = "duplicate_window";

/// Reason code of the last quarantine row a device gets in an hour: the
/// quota is used up, and its further refused messages are counted only.
pub const QUARANTINE_QUOTA: &str = "quarantine_quota";

/// How much of a payload over the size limit a `quarantine` row keeps.
pub const QUARANTINE_KEPT_BYTES: usize = 4096;

/// Where a quarantine row stands against its device's hourly quota.
enum Quota {
    Within,
    /// This row is the last kept: the quota is `.0`.
    Reached(u32),
    /// Counted, not kept.
    Exceeded,
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Status,
    Quarantined { reason: &'static str },
}

/// Rows waiting for a flush, by table and partition date.
#[derive(Debug, Default)]
struct Pending {
    metrics: BTreeMap<NaiveDate, PendingWindows>,
    quarantine: BTreeMap<NaiveDate, Vec<QuarantinedMessage>>,
    status: BTreeMap<NaiveDate, Vec<StoredStatus>>,
    rows: usize,
}

/// One partition date's accepted windows, as `metrics` columns: the rows
/// of a failed write (`built`), then the rows appended since (`building`).
#[derive(Debug, Default)]
struct PendingWindows {
    built: Vec<RecordBatch>,
    building: MetricsColumns,
    /// Each row's message as received, in row order: what a quarantine row
    /// keeps if the lake refuses the row (`duplicate_window`).
    messages: Vec<Bytes>,
}

/// The partition a timestamp falls in (its UTC date).
fn date_of(at: DateTime<Utc>) -> NaiveDate {
    at.date_naive()
}

/// A partition date as the lake names it.
fn partition(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// Quarantine rows kept this hour (`hour`), per device.
#[derive(Debug, Default)]
struct QuotaBook {
    used: HashMap<String, u32>,
    hour: i64,
}

/// What queuing a quarantine row needs. Shared by [`Ingest`] and the
/// [`Batch`] it hands to a flush, which quarantines the rows the lake
/// refuses (`duplicate_window`) while the ingest loop goes on: both charge
/// one quota.
#[derive(Debug, Clone)]
struct Quarantiner {
    counters: Arc<Counters>,
    quota: u32,
    book: Arc<Mutex<QuotaBook>>,
}

/// Validates messages and keeps their rows until [`Ingest::take`] hands
/// them to a flush.
#[derive(Debug)]
pub struct Ingest {
    limits: IngestLimits,
    quarantiner: Quarantiner,
    pending: Pending,
}

/// The rows of one flush, taken out of [`Ingest`]: [`Batch::write`] stores
/// them (on any thread), and [`Ingest::restore`] takes back what a failed
/// write left.
#[derive(Debug)]
pub struct Batch {
    quarantiner: Quarantiner,
    pending: Pending,
    /// Rows written, freed by [`Ingest::restore`] on the ingest loop's
    /// thread, whose allocator then reuses their memory for the next rows
    /// (freed on the flush's thread, it went back to the system and was
    /// faulted in again: a sixth of the collector's CPU).
    written: Written,
}

/// Rows a [`Batch`] wrote, per table.
#[derive(Debug, Default)]
struct Written {
    metrics: Vec<PendingWindows>,
    status: Vec<Vec<StoredStatus>>,
    quarantine: Vec<Vec<QuarantinedMessage>>,
}

impl Ingest {
    pub fn new(limits: IngestLimits, counters: Arc<Counters>) -> Self {
        Ingest {
            limits,
            quarantiner: Quarantiner {
                counters,
                quota: limits.quarantine_quota,
                book: Arc::default(),
            },
            pending: Pending::default(),
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.quarantiner.counters
    }

    /// Rows waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.pending.rows
    }

    /// Validates one message and queues it as a `metrics`, `status` or
    /// `quarantine` row.
    pub fn handle(&mut self, topic: &str, payload: &[u8], received_at: DateTime<Utc>) -> Outcome {
        self.handle_bytes(topic, Bytes::copy_from_slice(payload), received_at)
    }

    /// [`Ingest::handle`] for a payload the caller owns (an MQTT
    /// message's), kept without a copy until its row is written.
    pub fn handle_bytes(
        &mut self,
        topic: &str,
        payload: Bytes,
        received_at: DateTime<Utc>,
    ) -> Outcome {
        let counters = &self.quarantiner.counters;
        counters.received.fetch_add(1, Ordering::Relaxed);
        self.pending.rows += 1;
        let parsed = driftline_core::topic::parse(topic);
        let bounds = TimeBounds {
            now: received_at,
            max_age: self.limits.max_event_age,
            max_future: self.limits.max_future_skew,
        };
        if parsed.is_some_and(|t| t.kind == TopicKind::Status) {
            return match accept_status(topic, &payload, &bounds) {
                Ok(report) => {
                    counters.status.fetch_add(1, Ordering::Relaxed);
                    self.pending
                        .status
                        .entry(date_of(report.at))
                        .or_default()
                        .push(StoredStatus {
                            received_at,
                            report,
                        });
                    Outcome::Status
                }
                Err(detail) => self.quarantiner.quarantine(
                    &mut self.pending,
                    topic,
                    &payload,
                    received_at,
                    INVALID_STATUS,
                    detail,
                ),
            };
        }
        match wire::accept(topic, &payload, &bounds) {
            Ok(report) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                let windows = self
                    .pending
                    .metrics
                    .entry(date_of(report.window_start))
                    .or_default();
                windows.building.push(received_at, &report);
                windows.messages.push(payload);
                Outcome::Accepted
            }
            Err(rejection) => self.quarantiner.quarantine(
                &mut self.pending,
                topic,
                &payload,
                received_at,
                rejection.code(),
                rejection.to_string(),
            ),
        }
    }

    /// Hands every pending row to a flush; new messages queue anew.
    pub fn take(&mut self) -> Batch {
        Batch {
            quarantiner: self.quarantiner.clone(),
            pending: std::mem::take(&mut self.pending),
            written: Written::default(),
        }
    }

    /// Takes back the rows a failed [`Batch::write`] left, for the next
    /// flush.
    pub fn restore(&mut self, batch: Batch) {
        let Batch {
            pending: left,
            written,
            ..
        } = batch;
        drop(written);
        let pending = &mut self.pending;
        for (date, mut left) in left.metrics {
            // The failed rows go first, as they arrived first.
            let windows = pending.metrics.entry(date).or_default();
            left.built.append(&mut windows.built);
            left.messages.append(&mut windows.messages);
            windows.built = left.built;
            windows.messages = left.messages;
        }
        for (date, rows) in left.quarantine {
            pending.quarantine.entry(date).or_default().extend(rows);
        }
        for (date, rows) in left.status {
            pending.status.entry(date).or_default().extend(rows);
        }
        pending.rows += left.rows;
    }

    /// Writes every pending row to the lake ([`Batch::write`]); rows whose
    /// write fails stay pending.
    pub fn flush(&mut self, lake: &LakeWriter) -> Result<(), LakeError> {
        let mut batch = self.take();
        let written = batch.write(lake);
        self.restore(batch);
        written
    }
}

impl Quarantiner {
    /// Queues a refused message as a `quarantine` row in `pending`.
    fn quarantine(
        &self,
        pending: &mut Pending,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
        reason: &'static str,
        detail: String,
    ) -> Outcome {
        let (reason, detail) = match self.charge_quota(topic, received_at) {
            Quota::Within => (reason, detail),
            Quota::Reached(quota) => (
                QUARANTINE_QUOTA,
                format!(
                    "{reason}: {detail}; this device's quarantine quota ({quota} rows an hour) is used up: its further refused messages this hour are counted, not kept"
                ),
            ),
            Quota::Exceeded => {
                self.counters.over_quota.fetch_add(1, Ordering::Relaxed);
                pending.rows = pending.rows.saturating_sub(1);
                return Outcome::Quarantined { reason };
            }
        };
        tracing::warn!(topic, reason, detail, "message quarantined");
        self.counters.count_quarantined(reason, 1);
        // An oversized payload is kept in part: enough to see what it was,
        // not enough for a device to fill the disk (or the collector's
        // memory until the flush) with a few large messages.
        let (kept, detail) = if payload.len() > wire::MAX_PAYLOAD_BYTES {
            let hex = crate::detect::sha256(payload);
            (
                payload[..QUARANTINE_KEPT_BYTES].to_vec(),
                format!(
                    "{detail}; kept the first {QUARANTINE_KEPT_BYTES} bytes, SHA-256 of all {} bytes {hex}",
                    payload.len()
                ),
            )
        } else {
            (payload.to_vec(), detail)
        };
        pending
            .quarantine
            .entry(date_of(received_at))
            .or_default()
            .push(QuarantinedMessage {
                received_at,
                topic: topic.to_owned(),
                reason,
                detail,
                size: payload.len(),
                payload: kept,
            });
        Outcome::Quarantined { reason }
    }

    /// Counts one quarantine row against the quota of the topic's device
    /// (its first four levels, `driftline/v1/{fleet}/{device}`) for the
    /// hour of `at`.
    fn charge_quota(&self, topic: &str, at: DateTime<Utc>) -> Quota {
        if self.quota == 0 {
            return Quota::Within;
        }
        // A poisoned lock only means another flush panicked mid-update;
        // the counts are still usable.
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let hour = at.timestamp().div_euclid(3600);
        if hour != book.hour {
            book.hour = hour;
            book.used.clear();
        }
        let device = topic.splitn(5, '/').take(4).collect::<Vec<_>>().join("/");
        let used = book.used.entry(device).or_default();
        *used = used.saturating_add(1);
        match (*used).cmp(&self.quota) {
            std::cmp::Ordering::Less => Quota::Within,
            std::cmp::Ordering::Equal => Quota::Reached(self.quota),
            std::cmp::Ordering::Greater => Quota::Exceeded,
        }
    }
}

impl Batch {
    /// Rows in this batch.
    pub fn rows(&self) -> usize {
        self.pending.rows
    }

    /// Writes the rows to the lake, one file per table and date; rows whose
    /// key the lake already holds are dropped as duplicates, and a window
    /// the lake holds under another `seq` becomes a `duplicate_window`
    /// quarantine row. A partition whose write fails stays in the batch;
    /// the first error is returned after the other partitions were tried.
    pub fn write(&mut self, lake: &LakeWriter) -> Result<(), LakeError> {
        let pending = &mut self.pending;
        let counters = &self.quarantiner.counters;
        let mut unstorable = Vec::new();
        let metrics = flush_metrics(lake, &mut pending.metrics, counters, &mut unstorable);
        let status = flush_table(
            lake,
            STATUS,
            &mut pending.status,
            schema::status_batch,
            &counters.stored_status,
            counters,
            Some((
                &|s: &StoredStatus| {
                    let r = &s.report;
                    let topic = driftline_core::topic::status_topic(&r.fleet, &r.device_id);
                    (s.received_at, topic, r.encode())
                },
                &mut unstorable,
            )),
        );
        // Rows that cannot become lake rows, or whose window is stored
        // under another seq, are kept as quarantine rows.
        let unstorable_count = unstorable.len();
        for (received_at, topic, payload, reason, detail) in unstorable {
            self.quarantiner
                .quarantine(pending, &topic, &payload, received_at, reason, detail);
        }
        pending.rows = pending.rows.saturating_sub(unstorable_count);
        // A quarantine row that cannot be encoded stays pending (and the
        // flush fails): there is no further place to keep it.
        let quarantine = flush_table(
            lake,
            QUARANTINE,
            &mut pending.quarantine,
            schema::quarantine_batch,
            &counters.stored_quarantine,
            counters,
            None,
        );
        pending.rows = pending
            .rows
            .saturating_sub(metrics.rows + status.rows + quarantine.rows);
        self.written.metrics.extend(metrics.written);
        self.written.status.extend(status.written);
        self.written.quarantine.extend(quarantine.written);
        match metrics.error.or(status.error).or(quarantine.error) {
            Some(e) => {
                counters.flush_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            None => Ok(()),
        }
    }
}

/// Parses a status message and checks it against its topic, the
/// collector's clock (`at` no further ahead than a window may be, and at
/// most `max_event_age` or a year old, whichever is longer) and the ranges
/// of its counters.
pub fn accept_status(
    topic: &str,
    payload: &[u8],
    bounds: &TimeBounds,
) -> Result<StatusReport, String> {
    if payload.len() > wire::MAX_PAYLOAD_BYTES {
        return Err(format!(
            "{} bytes, over the {} byte limit",
            payload.len(),
            wire::MAX_PAYLOAD_BYTES
        ));
    }
    let report = StatusReport::decode(payload).map_err(|e| e.to_string())?;
    // A last will carries the time its connection began, which can be
    // long before it is published: the past bound is at least a year.
    let max_age = bounds.max_age.max(TimeDelta::days(365));
    let (earliest, latest) = (bounds.now - max_age, bounds.now + bounds.max_future);
    if report.at < earliest || report.at > latest {
        return Err(format!(
            "at {} is outside the accepted range {earliest} .. {latest}",
            report.at
        ));
    }
    let max = wire::MAX_COUNT as u64;
    for (name, value) in [
        ("windows_withheld", report.windows_withheld),
        ("buffered_windows", report.buffered_windows),
        ("lost_windows", report.lost_windows),
    ] {
        if value > max {
            return Err(format!("{name} is {value}, outside 0 ..= {max}"));
        }
    }
    for (name, value) in [
        ("budget_remaining_rho", report.budget_remaining_rho),
        ("budget_remaining_epsilon", report.budget_remaining_epsilon),
    ] {
        if let Some(x) = value {
            if !(x.is_finite() && x >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0, got {x}"));
            }
        }
    }
    match driftline_core::topic::parse(topic) {
        Some(t) if t.device_id == report.device_id && t.fleet == report.fleet => Ok(report),
        _ => Err(format!(
            "topic {topic} does not match device {} of fleet {}",
            report.device_id, report.fleet
        )),
    }
}

/// The message a lake row came from: when it arrived, its topic, its payload.
type Original = (DateTime<Utc>, String, Vec<u8>);

/// A row that is not stored: its message, the reason code and the detail.
type Unstorable = (DateTime<Utc>, String, Vec<u8>, &'static str, String);

/// How to turn a row back into its message, and where unstorable rows go.
type ToQuarantine<'a, T> = Option<(&'a dyn Fn(&T) -> Original, &'a mut Vec<Unstorable>)>;

/// Rows taken out of the pending map by one flush, the first error, and
/// the rows written (to be freed by the caller).
struct Flushed<W> {
    rows: usize,
    error: Option<LakeError>,
    written: Vec<W>,
}

/// The metrics topic a window's message came from (read back from the
/// payload: only for the rare row the lake refuses).
fn metrics_topic_of(payload: &[u8]) -> String {
    wire::decode(payload)
        .map(|r| driftline_core::topic::metrics_topic(&r.fleet, &r.device_id))
        .unwrap_or_default()
}

/// One date's windows as one batch, sorted by model, window start and
/// device (a file's row groups then prune well on time and model); the
/// messages follow the rows. On error the columns are lost, the messages
/// are not.
fn sorted_windows(windows: &mut PendingWindows) -> Result<RecordBatch, ArrowError> {
    let mut parts = std::mem::take(&mut windows.built);
    if !windows.building.is_empty() {
        parts.push(windows.building.finish()?);
    }
    let batch = match parts.len() {
        1 => parts.remove(0),
        _ => concat_batches(&schema::metrics(), &parts)?,
    };
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .cloned()
            .ok_or_else(|| ArrowError::SchemaError(format!("metrics has no column {name}")))
    };
    let keys = ["model_id", "window_start", "device_id"]
        .into_iter()
        .map(|name| {
            column(name).map(|values| SortColumn {
                values,
                options: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let order = lexsort_to_indices(&keys, None)?;
    let mut messages = Vec::with_capacity(windows.messages.len());
    for &row in order.values() {
        if let Some(m) = windows.messages.get(row as usize) {
            messages.push(m.clone());
        }
    }
    windows.messages = messages;
    take_record_batch(&batch, &order)
}

/// Writes each date's windows as one `metrics` file. A date whose write
/// fails stays pending; rows that cannot be encoded at all, and windows
/// the lake holds under another `seq`, go to `refused` as their message
/// and the reason.
fn flush_metrics(
    lake: &LakeWriter,
    pending: &mut BTreeMap<NaiveDate, PendingWindows>,
    counters: &Counters,
    refused: &mut Vec<Unstorable>,
) -> Flushed<PendingWindows> {
    let mut flushed = Flushed {
        rows: 0,
        error: None,
        written: Vec::new(),
    };
    for (date, mut windows) in std::mem::take(pending) {
        let rows = windows.messages.len();
        let batch = match sorted_windows(&mut windows) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(table = METRICS, error = %e, rows, "rows cannot be encoded; quarantined");
                flushed.rows += rows;
                let received_at = Utc::now();
                refused.extend(windows.messages.iter().map(|payload| {
                    let detail = format!("cannot store in {METRICS}: {e}");
                    let topic = metrics_topic_of(payload);
                    (received_at, topic, payload.to_vec(), UNSTORABLE, detail)
                }));
                continue;
            }
        };
        match lake.append(METRICS, &partition(date), &batch) {
            Ok(appended) => {
                flushed.rows += rows;
                let received_at = batch.column(0).as_primitive::<TimestampMicrosecondType>();
                for &(row, stored) in &appended.conflicts {
                    let Some(payload) = windows.messages.get(row) else {
                        continue;
                    };
                    let at =
                        DateTime::from_timestamp_micros(received_at.value(row)).unwrap_or_default();
                    let detail = format!(
                        "the lake holds this window (fleet, device, model, version, window_start, window_secs) already, from the message with seq {stored}; a window counts once"
                    );
                    let topic = metrics_topic_of(payload);
                    refused.push((at, topic, payload.to_vec(), DUPLICATE_WINDOW, detail));
                }
                counters
                    .stored_windows
                    .fetch_add(appended.rows as u64, Ordering::Relaxed);
                counters
                    .duplicates
                    .fetch_add(appended.duplicates as u64, Ordering::Relaxed);
                if let Some(path) = appended.path {
                    counters.files_written.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(table = METRICS, rows = appended.rows, duplicates = appended.duplicates, path = %path.display(), "flushed");
                }
                windows.built = vec![batch];
                flushed.written.push(windows);
            }
            Err(e) => {
                windows.built = vec![batch];
                pending.insert(date, windows);
                flushed.error.get_or_insert(e);
            }
        }
    }
    flushed
}

/// Writes each date's rows of one table as one file. Rows whose write fails
/// stay pending; rows that cannot be encoded at all go to `to_quarantine`
/// as their original message and the reason, or without it stay pending.
fn flush_table<T>(
    lake: &LakeWriter,
    table: &'static str,
    pending: &mut BTreeMap<NaiveDate, Vec<T>>,
    build: fn(&[T]) -> Result<RecordBatch, ArrowError>,
    stored: &AtomicU64,
    counters: &Counters,
    to_quarantine: ToQuarantine<'_, T>,
) -> Flushed<Vec<T>> {
    let mut flushed = Flushed {
        rows: 0,
        error: None,
        written: Vec::new(),
    };
    let mut to_quarantine = to_quarantine;
    for (date, rows) in std::mem::take(pending) {
        let batch = match (build(&rows), to_quarantine.as_mut()) {
            (Ok(batch), _) => batch,
            (Err(e), Some((original, unstorable))) => {
                tracing::error!(table, error = %e, rows = rows.len(), "rows cannot be encoded; quarantined");
                flushed.rows += rows.len();
                unstorable.extend(rows.iter().map(|row| {
                    let (at, topic, payload) = original(row);
                    let detail = format!("cannot store in {table}: {e}");
                    (at, topic, payload, UNSTORABLE, detail)
                }));
                continue;
            }
            (Err(source), None) => {
                tracing::error!(table, error = %source, rows = rows.len(), "rows cannot be encoded; kept pending");
                pending.insert(date, rows);
                flushed
                    .error
                    .get_or_insert(LakeError::Arrow { table, source });
                continue;
            }
        };
        match lake.append(table, &partition(date), &batch) {
            Ok(appended) => {
                flushed.rows += rows.len();
                if let Some((original, refused)) = to_quarantine.as_mut() {
                    for &(row, stored) in &appended.conflicts {
                        let (at, topic, payload) = original(&rows[row]);
                        let detail = format!(
                            "the lake holds this window (fleet, device, model, version, window_start, window_secs) already, from the message with seq {stored}; a window counts once"
                        );
                        refused.push((at, topic, payload, DUPLICATE_WINDOW, detail));
                    }
                }
                stored.fetch_add(appended.rows as u64, Ordering::Relaxed);
                counters
                    .duplicates
                    .fetch_add(appended.duplicates as u64, Ordering::Relaxed);
                if let Some(path) = appended.path {
                    counters.files_written.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(table, rows = appended.rows, duplicates = appended.duplicates, path = %path.display(), "flushed");
                }
                flushed.written.push(rows);
            }
            Err(e) => {
                pending.insert(date, rows);
                flushed.error.get_or_insert(e);
            }
        }
    }
    flushed
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "driftline/v1/eu-kiosks/kiosk-0007/metrics";

    fn fixture() -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../core/tests/fixtures/v1/valid/laplace.json");
        serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json")
    }

    async fn rows(dir: &std::path::Path, sql: &str) -> Vec<Vec<String>> {
        let ctx = crate::query::session(dir).await.expect("session");
        let batches = crate::query::run(&ctx, sql).await.expect("query");
        let text = crate::query::render(&batches, crate::query::Format::Csv).expect("csv");
        text.lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_owned).collect())
            .collect()
    }

    #[test]
    fn the_documented_status_message_is_accepted() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/wire-format.md"),
        )
        .expect("docs/wire-format.md");
        let section = &doc[doc.find("## Status message").expect("status section")..];
        let start = section.find("```json\n").expect("json block") + "```json\n".len();
        let end = start + section[start..].find("```").expect("end of block");
        let received = Utc::now();
        let example = section[start..end].replace(
            "2026-11-27T10:00:00Z",
            &received.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Default::default()));
        let outcome = ingest.handle(
            "driftline/v1/eu-kiosks/kiosk-0007/status",
            example.as_bytes(),
            received,
        );
        assert!(matches!(outcome, Outcome::Status), "{outcome:?}: {example}");
    }

    #[tokio::test]
    async fn a_window_counts_once_whatever_its_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = LakeWriter::open(dir.path()).expect("lake");
        let counters = Arc::new(Counters::default());
        let received: DateTime<Utc> = "2026-11-27T10:01:30Z".parse().expect("ts");
        let mut report = fixture();
        let first = serde_json::to_vec(&report).expect("json");
        report["seq"] = serde_json::json!(5000);
        report["inference_count"] = serde_json::json!(470);
        let replay = serde_json::to_vec(&report).expect("json");
        // In one flush a retry (same seq) and a replay (another seq), then
        // the replay again in a later flush.
        let mut ingest = Ingest::new(IngestLimits::default(), counters.clone());
        for payload in [&first, &first, &replay] {
            assert!(matches!(
                ingest.handle(TOPIC, payload, received),
                Outcome::Accepted
            ));
        }
        ingest.flush(&lake).expect("flush");
        let mut ingest = Ingest::new(IngestLimits::default(), counters.clone());
        let later = received + TimeDelta::seconds(5);
        assert!(matches!(
            ingest.handle(TOPIC, &replay, later),
            Outcome::Accepted
        ));
        ingest.flush(&lake).expect("flush");
        // One row, the first; the retry is a duplicate; both replays are in
        // quarantine with the seq that was kept.
        let stored = rows(dir.path(), "SELECT seq, inference_count FROM metrics").await;
        assert_eq!(stored, vec![vec!["1042".to_owned(), "47".to_owned()]]);
        assert_eq!(counters.duplicates.load(Ordering::Relaxed), 1);
        let refused = rows(
            dir.path(),
            "SELECT reason, detail LIKE '%seq 1042%', CAST(payload AS VARCHAR) LIKE '%\"seq\":5000%' \
             FROM quarantine ORDER BY received_at",
        )
        .await;
        let row = vec!["duplicate_window".to_owned(), "true".into(), "true".into()];
        assert_eq!(refused, vec![row.clone(), row]);
        assert_eq!(counters.quarantined_by_reason()[DUPLICATE_WINDOW], 2);
    }

    #[tokio::test]
    async fn rows_of_a_failed_write_are_written_with_later_ones_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = LakeWriter::open(dir.path()).expect("lake");
        let counters = Arc::new(Counters::default());
        let mut ingest = Ingest::new(IngestLimits::default(), counters.clone());
        let received: DateTime<Utc> = "2026-11-27T12:00:00Z".parse().expect("ts");
        let message = |minute: i64| {
            let mut report = fixture();
            let start: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().expect("ts");
            report["window_start"] =
                serde_json::json!((start + TimeDelta::minutes(minute)).to_rfc3339());
            report["seq"] = serde_json::json!(minute);
            serde_json::to_vec(&report).expect("json")
        };
        // A file where the partitions' directories go: the write fails.
        let blocker = dir.path().join("_driftline/gens/metrics");
        std::fs::create_dir_all(blocker.parent().expect("parent")).expect("mkdir");
        std::fs::write(&blocker, b"in the way").expect("blocker");
        for minute in [5, 3] {
            ingest.handle(TOPIC, &message(minute), received);
        }
        assert!(ingest.flush(&lake).is_err(), "the partition is blocked");
        assert_eq!(ingest.pending(), 2, "the failed rows stay pending");
        // A later message, earlier in time, joins them.
        ingest.handle(TOPIC, &message(1), received);
        std::fs::remove_file(&blocker).expect("unblock");
        ingest.flush(&lake).expect("flush");
        assert_eq!(ingest.pending(), 0);
        assert_eq!(counters.stored_windows.load(Ordering::Relaxed), 3);
        // One file, sorted by window start.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("metrics/date=2026-11-27"))
            .expect("partition")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let reader =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&files[0]).expect("open"),
            )
            .expect("parquet")
            .build()
            .expect("reader");
        let mut seqs = Vec::new();
        for batch in reader {
            let batch = batch.expect("batch");
            let seq = batch.column_by_name("seq").expect("seq");
            let seq = seq.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            seqs.extend(seq.values().iter().copied());
        }
        assert_eq!(seqs, vec![1, 3, 5]);
    }

    #[tokio::test]
    async fn one_device_cannot_fill_the_quarantine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = LakeWriter::open(dir.path()).expect("lake");
        let counters = Arc::new(Counters::default());
        let limits = IngestLimits {
            quarantine_quota: 3,
            ..IngestLimits::default()
        };
        let mut ingest = Ingest::new(limits, counters.clone());
        let hour: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().expect("ts");
        let other = "driftline/v1/eu-kiosks/kiosk-0008/metrics";
        for i in 0..5 {
            let at = hour + TimeDelta::seconds(i);
            ingest.handle(TOPIC, format!("not json {i}").as_bytes(), at);
        }
        ingest.handle(other, b"not json", hour);
        // The next hour starts a new quota.
        ingest.handle(TOPIC, b"not json", hour + TimeDelta::hours(1));
        ingest.flush(&lake).expect("flush");
        let kept = rows(
            dir.path(),
            "SELECT topic, reason, count(*) FROM quarantine GROUP BY topic, reason ORDER BY 1, 2",
        )
        .await;
        let row =
            |topic: &str, reason: &str, n: &str| vec![topic.to_owned(), reason.into(), n.into()];
        assert_eq!(
            kept,
            vec![
                row(TOPIC, "invalid_json", "3"),
                row(TOPIC, QUARANTINE_QUOTA, "1"),
                row(other, "invalid_json", "1"),
            ]
        );
        assert_eq!(counters.over_quota.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn oversized_and_out_of_range_messages_are_kept_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = LakeWriter::open(dir.path()).expect("lake");
        let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Default::default()));
        let mut report = fixture();
        let received: DateTime<Utc> = "2026-11-27T10:01:30Z".parse().expect("ts");
        // 15 MiB of padding in a field nobody reads.
        let huge = vec![b'x'; 15 << 20];
        assert!(matches!(
            ingest.handle(TOPIC, &huge, received),
            Outcome::Quarantined {
                reason: "payload_too_large"
            }
        ));
        // Counts that would overflow a fleet sum.
        report["inference_count"] = serde_json::json!(i64::MAX);
        let overflow = serde_json::to_vec(&report).expect("json");
        assert!(matches!(
            ingest.handle(TOPIC, &overflow, received),
            Outcome::Quarantined {
                reason: "invalid_field"
            }
        ));
        // A status from the far future, with an impossible counter.
        let status = serde_json::json!({
            "schema_version": 1, "device_id": "kiosk-0007", "fleet": "eu-kiosks",
            "state": "online", "at": "9999-12-31T00:00:00Z", "models": [],
            "budget_exhausted": false, "windows_withheld": 0, "buffered_windows": 0,
            "lost_windows": 0
        });
        let status_topic = "driftline/v1/eu-kiosks/kiosk-0007/status";
        for bad in [status.clone(), {
            let mut s = status.clone();
            s["at"] = serde_json::json!("2026-11-27T10:01:00Z");
            s["windows_withheld"] = serde_json::json!(u64::MAX);
            s
        }] {
            let bytes = serde_json::to_vec(&bad).expect("json");
            assert!(
                matches!(
                    ingest.handle(status_topic, &bytes, received),
                    Outcome::Quarantined {
                        reason: INVALID_STATUS
                    }
                ),
                "{bad}"
            );
        }
        ingest.flush(&lake).expect("flush");
        let stored = rows(
            dir.path(),
            "SELECT reason, payload_bytes, length(payload), detail LIKE '%SHA-256 of all%' \
             FROM quarantine ORDER BY payload_bytes DESC",
        )
        .await;
        assert_eq!(
            stored[0][..3],
            ["payload_too_large", &(15u64 << 20).to_string(), "4096"]
        );
        assert_eq!(stored[0][3], "true");
        assert_eq!(stored.len(), 4);
        assert!(stored[1..].iter().all(|r| r[3] == "false"));
        // Nothing reached the other tables: no status partition in year 9999.
        assert!(!dir.path().join("status/date=9999-12-31").exists());
        assert!(
            !dir.path().join("metrics").exists()
                || rows(dir.path(), "SELECT count(*) FROM metrics").await[0][0] == "0"
        );
    }
}
