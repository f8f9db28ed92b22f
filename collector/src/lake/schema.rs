//! Arrow schemas of the lake's tables and the code that turns accepted
//! messages and quarantined ones into record batches.
//!
//! `metrics` has one row per message (device, model, window). Wire fields
//! map to columns one to one; histograms are flattened into one column per
//! bucket (`latency_ms_b00` .. `latency_ms_b15`, NULL past the message's last
//! bucket) beside their edges (`latency_ms_edges`), because the engine sums
//! flat columns faster than the elements of a list column.
//! Each noised field's noise scale has a `scale_*` column (NULL when the
//! mechanism is `none`).

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder,
    ListBuilder, StringBuilder, TimestampMicrosecondBuilder, UInt64Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use driftline_core::histogram::MAX_BUCKETS;
use driftline_core::status::{DeviceState, StatusReport};
use driftline_core::wire::WindowReport;

/// The four standard histograms, in column order.
pub use driftline_core::wire::STANDARD_HISTOGRAMS as HISTOGRAMS;

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Column name of bucket `i` of histogram `h`: `latency_ms_b07`.
pub fn bucket_column(h: &str, i: usize) -> String {
    format!("{h}_b{i:02}")
}

/// Schema of the `metrics` files (the `date` partition column comes on top).
pub fn metrics() -> SchemaRef {
    let mut fields = vec![
        Field::new("received_at", timestamp(), false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("fleet", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("agent_version", DataType::Utf8, false),
        Field::new("window_start", timestamp(), false),
        Field::new("window_secs", DataType::Int32, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("schema_version", DataType::Int32, false),
        Field::new("mechanism", DataType::Utf8, false),
        Field::new("epsilon", DataType::Float64, true),
        Field::new("delta", DataType::Float64, true),
        Field::new("rho", DataType::Float64, true),
        Field::new("inference_count", DataType::Int64, false),
        Field::new("error_count", DataType::Int64, false),
        Field::new("feedback_positive", DataType::Int64, false),
        Field::new("feedback_negative", DataType::Int64, false),
        Field::new("feedback_correction", DataType::Int64, false),
        Field::new("scale_inference_count", DataType::Float64, true),
        Field::new("scale_error_count", DataType::Float64, true),
        Field::new("scale_feedback", DataType::Float64, true),
    ];
    for h in HISTOGRAMS {
        fields.push(Field::new(
            format!("{h}_edges"),
            DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true))),
            false,
        ));
        for i in 0..MAX_BUCKETS {
            fields.push(Field::new(bucket_column(h, i), DataType::Int64, true));
        }
        fields.push(Field::new(format!("scale_{h}"), DataType::Float64, true));
    }
    fields.extend([
        Field::new("custom", DataType::Utf8, true),
        Field::new("categories", DataType::Utf8, true),
        Field::new("noise_scale", DataType::Utf8, true),
        // Added after the first release: older files lack them (null).
        Field::new("max_events_per_window", DataType::Int32, true),
        Field::new("device_day_epsilon", DataType::Float64, true),
        Field::new("device_day_delta", DataType::Float64, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// `batch` in `schema`: columns by name, in `schema`'s order; a nullable
/// column the batch lacks (a file written before the column existed) is
/// all nulls. Compaction writes every old file's rows this way.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema().as_ref() == schema.as_ref() {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => Ok(c.clone()),
            Some(c) => cast(c, field.data_type()),
            None if field.is_nullable() => Ok(datafusion::arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
            None => Err(ArrowError::SchemaError(format!(
                "column {} is missing and not nullable",
                field.name()
            ))),
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// The schema SQL reads a table's files with: text columns as `Utf8View`.
///
/// Files store text as plain Parquet strings (dictionary-encoded by the
/// writer). Read as views, a dictionary page decodes to 16-byte views that
/// hold short values (model ids, versions, fleets) inline, and grouping and
/// comparing them does not copy bytes; read as `Utf8`, every row's bytes are
/// copied out of the dictionary first. BENCHMARKS.md, "Queries", shows the
/// difference.
pub fn for_reading(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => f.as_ref().clone().with_data_type(DataType::Utf8View),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Schema of the `quarantine` files (the `date` partition column comes on top).
pub fn quarantine() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("received_at", timestamp(), false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("fleet", DataType::Utf8, true),
        Field::new("device_id", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("payload_bytes", DataType::Int64, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("payload_text", DataType::Utf8, true),
    ]))
}

/// An accepted message and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWindow {
    pub received_at: DateTime<Utc>,
    pub report: WindowReport,
}

/// A refused message, kept whole.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantinedMessage {
    pub received_at: DateTime<Utc>,
    pub topic: String,
    /// Stable reason code (`driftline_core::wire::Rejection::code`).
    pub reason: &'static str,
    pub detail: String,
    /// The payload's size as received.
    pub size: usize,
    /// The payload, or its first bytes when it was over the size limit.
    pub payload: Vec<u8>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn json_or_null<T: serde::Serialize>(value: &T, empty: bool) -> Option<String> {
    if empty {
        None
    } else {
        serde_json::to_string(value).ok()
    }
}

/// One batch of `metrics` rows, in the order given.
pub fn metrics_batch(rows: &[StoredWindow]) -> Result<RecordBatch, ArrowError> {
    let mut columns = MetricsColumns::default();
    for row in rows {
        columns.push(row.received_at, &row.report);
    }
    columns.finish()
}

/// `metrics` rows under construction, appended one message at a time as
/// they arrive: a held row costs its column values (about 1 KB), not a
/// decoded report's strings, maps and vectors.
pub struct MetricsColumns {
    received_at: TimestampMicrosecondBuilder,
    window_start: TimestampMicrosecondBuilder,
    /// device_id, fleet, model_id, model_version, agent_version, mechanism.
    text: [StringBuilder; 6],
    window_secs: Int32Builder,
    schema_version: Int32Builder,
    seq: Int64Builder,
    /// epsilon, delta, rho.
    privacy: [Float64Builder; 3],
    counts: [Int64Builder; 5],
    scales: [Float64Builder; 3],
    hist_edges: [ListBuilder<Float64Builder>; 4],
    hist_buckets: [[Int64Builder; MAX_BUCKETS]; 4],
    hist_scales: [Float64Builder; 4],
    /// custom, categories, noise_scale (JSON).
    json: [StringBuilder; 3],
    max_events: Int32Builder,
    day_epsilon: Float64Builder,
    day_delta: Float64Builder,
    rows: usize,
}

impl Default for MetricsColumns {
    fn default() -> Self {
        let ts = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
        MetricsColumns {
            received_at: ts(),
            window_start: ts(),
            text: Default::default(),
            window_secs: Int32Builder::new(),
            schema_version: Int32Builder::new(),
            seq: Int64Builder::new(),
            privacy: Default::default(),
            counts: Default::default(),
            scales: Default::default(),
            hist_edges: std::array::from_fn(|_| ListBuilder::new(Float64Builder::new())),
            hist_buckets: Default::default(),
            hist_scales: Default::default(),
            json: Default::default(),
            max_events: Int32Builder::new(),
            day_epsilon: Float64Builder::new(),
            day_delta: Float64Builder::new(),
            rows: 0,
        }
    }
}

impl std::fmt::Debug for MetricsColumns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsColumns")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl MetricsColumns {
    /// Rows appended since the last [`MetricsColumns::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one accepted message as a row.
    pub fn push(&mut self, at: DateTime<Utc>, r: &WindowReport) {
        self.rows += 1;
        self.received_at.append_value(micros(at));
        self.window_start.append_value(micros(r.window_start));
        let text = [
            &r.device_id,
            &r.fleet,
            &r.model_id,
            &r.model_version,
            &r.agent_version,
            r.privacy.mechanism.as_str(),
        ];
        for (b, v) in self.text.iter_mut().zip(text) {
            b.append_value(v);
        }
        self.window_secs
            .append_value(i32::try_from(r.window_secs).unwrap_or(i32::MAX));
        self.schema_version
            .append_value(i32::try_from(r.schema_version).unwrap_or(i32::MAX));
        self.seq
            .append_value(i64::try_from(r.seq).unwrap_or(i64::MAX));
        let privacy = [r.privacy.epsilon, r.privacy.delta, r.privacy.rho];
        for (b, v) in self.privacy.iter_mut().zip(privacy) {
            b.append_option(v);
        }
        let values = [
            r.inference_count,
            r.error_count,
            r.feedback.positive,
            r.feedback.negative,
            r.feedback.correction,
        ];
        for (b, v) in self.counts.iter_mut().zip(values) {
            b.append_value(v);
        }
        let scale = |name: &str| r.privacy.noise_scale.get(name).copied();
        for (b, name) in self
            .scales
            .iter_mut()
            .zip(["inference_count", "error_count", "feedback"])
        {
            b.append_option(scale(name));
        }
        for (k, (name, h)) in r.standard_histograms().into_iter().enumerate() {
            self.hist_edges[k].append_value(h.edges.iter().map(|e| Some(*e)));
            for (i, b) in self.hist_buckets[k].iter_mut().enumerate() {
                b.append_option(h.counts.get(i).copied());
            }
            self.hist_scales[k].append_option(scale(name));
        }
        let json = [
            json_or_null(&r.custom, r.custom.is_empty()),
            json_or_null(&r.categories, r.categories.is_empty()),
            json_or_null(&r.privacy.noise_scale, r.privacy.noise_scale.is_empty()),
        ];
        for (b, v) in self.json.iter_mut().zip(json) {
            b.append_option(v);
        }
        self.max_events.append_option(
            r.privacy
                .max_events_per_window
                .map(|k| i32::try_from(k).unwrap_or(i32::MAX)),
        );
        self.day_epsilon.append_option(r.privacy.device_day_epsilon);
        self.day_delta.append_option(r.privacy.device_day_delta);
    }

    /// The rows appended so far, in order, as one batch; the builders start
    /// empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let [device_id, fleet, model_id, model_version, agent_version, mechanism] = &mut self.text;
        let [epsilon, delta, rho] = &mut self.privacy;
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.received_at.finish()),
            Arc::new(device_id.finish()),
            Arc::new(fleet.finish()),
            Arc::new(model_id.finish()),
            Arc::new(model_version.finish()),
            Arc::new(agent_version.finish()),
            Arc::new(self.window_start.finish()),
            Arc::new(self.window_secs.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.schema_version.finish()),
            Arc::new(mechanism.finish()),
            Arc::new(epsilon.finish()),
            Arc::new(delta.finish()),
            Arc::new(rho.finish()),
        ];
        columns.extend(
            self.counts
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        columns.extend(
            self.scales
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        for k in 0..HISTOGRAMS.len() {
            columns.push(Arc::new(self.hist_edges[k].finish()));
            columns.extend(
                self.hist_buckets[k]
                    .iter_mut()
                    .map(|b| Arc::new(b.finish()) as ArrayRef),
            );
            columns.push(Arc::new(self.hist_scales[k].finish()));
        }
        columns.extend(
            self.json
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        columns.push(Arc::new(self.max_events.finish()));
        columns.push(Arc::new(self.day_epsilon.finish()));
        columns.push(Arc::new(self.day_delta.finish()));
        RecordBatch::try_new(metrics(), columns)
    }
}

/// Schema of the `histogram_edge_sets` files: each distinct set of
/// histogram edges a model version's rows carried, stored once per
/// partition (date of `window_start`). The `histogram_edges` view picks one
/// set per model version, so queries read a few rows instead of decoding
/// the edges of every `metrics` row.
pub fn edge_sets() -> SchemaRef {
    let fields = EDGE_SET_COLUMNS.map(|name| {
        let edges = DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true)));
        match name {
            "model_id" | "model_version" => Field::new(name, DataType::Utf8, false),
            _ => Field::new(name, edges, false),
        }
    });
    Arc::new(Schema::new(fields.to_vec()))
}

/// The columns of [`edge_sets`], every one part of a row's key.
pub const EDGE_SET_COLUMNS: [&str; 6] = [
    "model_id",
    "model_version",
    "latency_ms_edges",
    "confidence_edges",
    "input_tokens_edges",
    "output_tokens_edges",
];

/// The distinct edge sets of `batch`, which holds at least the columns of
/// [`edge_sets`] (a `metrics` batch, or those columns read back from a
/// file; other list field names are cast). Rows are compared by their
/// text and the bytes of their edges, borrowed from the arrays: a flush
/// of thousands of windows of a few versions copies nothing but the few
/// rows it keeps.
pub fn edge_sets_batch(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = edge_sets();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type()),
            None => Err(ArrowError::SchemaError(format!(
                "column {} missing",
                f.name()
            ))),
        })
        .collect::<Result<_, _>>()?;
    let wrong = |what: &str| ArrowError::SchemaError(format!("edge sets: {what}"));
    let (model_id, model_version) = match (
        columns[0].as_string_opt::<i32>(),
        columns[1].as_string_opt::<i32>(),
    ) {
        (Some(id), Some(version)) => (id, version),
        _ => return Err(wrong("model columns are not text")),
    };
    // Each histogram's edges: list offsets and the bytes of all values.
    let edges: Vec<(&[i32], &[u8])> = columns[2..]
        .iter()
        .map(|c| {
            let list = c
                .as_list_opt::<i32>()
                .ok_or_else(|| wrong("edges are not lists"))?;
            let values = list
                .values()
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(|| wrong("edges are not floats"))?;
            Ok((list.value_offsets(), values.values().inner().as_slice()))
        })
        .collect::<Result<_, ArrowError>>()?;
    let edges: [(&[i32], &[u8]); HISTOGRAMS.len()] = edges
        .try_into()
        .map_err(|_| wrong("not one edges column per histogram"))?;
    // Rows come sorted by model: most equal the row before, which a
    // comparison settles without hashing.
    let mut seen = HashSet::new();
    let mut previous = None;
    let first: UInt64Array = (0..batch.num_rows())
        .filter(|&i| {
            let key = (
                model_id.value(i),
                model_version.value(i),
                edges.map(|(offsets, values)| list_bytes(offsets, values, i)),
            );
            let repeat = previous.as_ref() == Some(&key);
            previous = Some(key);
            !repeat && seen.insert(key)
        })
        .map(|i| i as u64)
        .collect();
    let columns = columns
        .iter()
        .map(|c| take(c, &first, None))
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(schema, columns)
}

/// The bytes of list `i`'s values, given the list offsets and the bytes
/// of all values (f64).
fn list_bytes<'a>(offsets: &[i32], values: &'a [u8], i: usize) -> Option<&'a [u8]> {
    let size = std::mem::size_of::<f64>();
    let from = usize::try_from(*offsets.get(i)?).ok()? * size;
    let to = usize::try_from(*offsets.get(i + 1)?).ok()? * size;
    values.get(from..to)
}

/// One batch of `quarantine` rows, in the order given.
pub fn quarantine_batch(rows: &[QuarantinedMessage]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let mut received_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut topic = StringBuilder::new();
    let mut fleet = StringBuilder::new();
    let mut device_id = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut detail = StringBuilder::new();
    let mut payload_bytes = Int64Builder::new();
    let mut payload = BinaryBuilder::new();
    let mut payload_text = StringBuilder::new();
    for q in rows {
        received_at.append_value(micros(q.received_at));
        topic.append_value(&q.topic);
        let parsed = driftline_core::topic::parse(&q.topic);
        fleet.append_option(parsed.map(|t| t.fleet));
        device_id.append_option(parsed.map(|t| t.device_id));
        reason.append_value(q.reason);
        detail.append_value(&q.detail);
        payload_bytes.append_value(i64::try_from(q.size).unwrap_or(i64::MAX));
        payload.append_value(&q.payload);
        payload_text.append_option(std::str::from_utf8(&q.payload).ok());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(received_at.finish()),
        Arc::new(topic.finish()),
        Arc::new(fleet.finish()),
        Arc::new(device_id.finish()),
        Arc::new(reason.finish()),
        Arc::new(detail.finish()),
        Arc::new(payload_bytes.finish()),
        Arc::new(payload.finish()),
        Arc::new(payload_text.finish()),
    ];
    RecordBatch::try_new(quarantine(), columns)
}

/// Schema of the `status` files: one row per status message (online
/// announcements, last wills), partitioned by the date of `at`.
pub fn status() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("received_at", timestamp(), false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("fleet", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("at", timestamp(), false),
        Field::new("agent_version", DataType::Utf8, true),
        Field::new("models", DataType::Utf8, true),
        Field::new("budget_remaining_rho", DataType::Float64, true),
        Field::new("budget_exhausted", DataType::Boolean, false),
        Field::new("resumes_at", timestamp(), true),
        Field::new("windows_withheld", DataType::Int64, false),
        Field::new("buffered_windows", DataType::Int64, false),
        Field::new("lost_windows", DataType::Int64, false),
        // Added after the first release: older files lack it (null).
        Field::new("budget_remaining_epsilon", DataType::Float64, true),
    ]))
}

/// A status message and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredStatus {
    pub received_at: DateTime<Utc>,
    pub report: StatusReport,
}

/// One batch of `status` rows, in the order given.
pub fn status_batch(rows: &[StoredStatus]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let ts = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut received_at, mut at, mut resumes_at) = (ts(), ts(), ts());
    let mut device_id = StringBuilder::new();
    let mut fleet = StringBuilder::new();
    let mut state = StringBuilder::new();
    let mut agent_version = StringBuilder::new();
    let mut models = StringBuilder::new();
    let mut budget = Float64Builder::new();
    let mut budget_epsilon = Float64Builder::new();
    let mut exhausted = BooleanBuilder::new();
    let mut withheld = Int64Builder::new();
    let mut buffered = Int64Builder::new();
    let mut lost = Int64Builder::new();
    let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for row in rows {
        let s = &row.report;
        received_at.append_value(micros(row.received_at));
        device_id.append_value(&s.device_id);
        fleet.append_value(&s.fleet);
        state.append_value(match s.state {
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
        });
        at.append_value(micros(s.at));
        agent_version.append_option(s.agent_version.as_deref());
        let list: Vec<String> = s
            .models
            .iter()
            .map(|m| format!("{}@{}", m.model_id, m.model_version))
            .collect();
        models.append_option((!list.is_empty()).then(|| list.join(",")));
        budget.append_option(s.budget_remaining_rho);
        budget_epsilon.append_option(s.budget_remaining_epsilon);
        exhausted.append_value(s.budget_exhausted);
        resumes_at.append_option(s.resumes_at.map(micros));
        withheld.append_value(count(s.windows_withheld));
        buffered.append_value(count(s.buffered_windows));
        lost.append_value(count(s.lost_windows));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(received_at.finish()),
        Arc::new(device_id.finish()),
        Arc::new(fleet.finish()),
        Arc::new(state.finish()),
        Arc::new(at.finish()),
        Arc::new(agent_version.finish()),
        Arc::new(models.finish()),
        Arc::new(budget.finish()),
        Arc::new(exhausted.finish()),
        Arc::new(resumes_at.finish()),
        Arc::new(withheld.finish()),
        Arc::new(buffered.finish()),
        Arc::new(lost.finish()),
        Arc::new(budget_epsilon.finish()),
    ];
    RecordBatch::try_new(status(), columns)
}

/// Schema of `detector_runs` (every evaluation of a detector for one model
/// version and period) and `drift_events` (the evaluations that fired),
/// partitioned by the date of `current_end`.
pub fn evaluations() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("detected_at", timestamp(), false),
        Field::new("detector", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("statistic", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, false),
        Field::new("p_value", DataType::Float64, true),
        Field::new("alpha", DataType::Float64, false),
        Field::new("reference_start", timestamp(), false),
        Field::new("reference_end", timestamp(), false),
        Field::new("current_start", timestamp(), false),
        Field::new("current_end", timestamp(), false),
        Field::new("devices", DataType::Int64, false),
        Field::new("events", DataType::Int64, false),
        Field::new("epsilon", DataType::Float64, true),
        Field::new("fired", DataType::Boolean, false),
        Field::new("severity", DataType::Utf8, true),
        Field::new("query_file", DataType::Utf8, false),
        // Added later: older files lack them (null).
        Field::new("devices_expected", DataType::Int64, true),
        Field::new("devices_present", DataType::Int64, true),
        // 0 for the first evaluation of a period, n for the n-th after
        // late data (null in older files: 0).
        Field::new("revision", DataType::Int64, true),
        // `metrics` rows in the reference and current periods when it ran.
        Field::new("rows_seen", DataType::Int64, true),
        // Devices of the current period whose weight was capped (null:
        // the detector does not read `metrics`, or an older file).
        Field::new("devices_capped", DataType::Int64, true),
    ]))
}

/// One evaluation of one detector.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evaluation {
    pub detected_at: DateTime<Utc>,
    pub detector: String,
    pub model_id: String,
    pub model_version: String,
    pub statistic: String,
    pub value: Option<f64>,
    pub threshold: f64,
    pub p_value: Option<f64>,
    pub alpha: f64,
    pub reference_start: DateTime<Utc>,
    pub reference_end: DateTime<Utc>,
    pub current_start: DateTime<Utc>,
    pub current_end: DateTime<Utc>,
    pub devices: i64,
    pub events: i64,
    pub epsilon: Option<f64>,
    pub fired: bool,
    /// `warning` or `critical` when fired.
    pub severity: Option<String>,
    pub query_file: String,
    /// Devices that reported in the reference period (the watermark waits
    /// for them), and how many of them had reported past the current
    /// period's end when it was evaluated.
    pub devices_expected: Option<i64>,
    pub devices_present: Option<i64>,
    pub revision: i64,
    pub rows_seen: Option<i64>,
    /// Devices whose weight in the current period was capped at
    /// `device_cap` median devices.
    pub devices_capped: Option<i64>,
}

/// One batch of evaluations.
pub fn evaluations_batch(rows: &[Evaluation]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let ts = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut detected_at, mut rs, mut re, mut cs, mut ce) = (ts(), ts(), ts(), ts(), ts());
    let mut text: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
    let (mut value, mut threshold, mut p, mut alpha, mut eps) = (
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
    );
    let (mut devices, mut events) = (Int64Builder::new(), Int64Builder::new());
    let mut fired = BooleanBuilder::new();
    let mut severity = StringBuilder::new();
    let mut file = StringBuilder::new();
    let (mut expected, mut present) = (Int64Builder::new(), Int64Builder::new());
    let (mut revision, mut rows_seen) = (Int64Builder::new(), Int64Builder::new());
    let mut capped = Int64Builder::new();
    for e in rows {
        detected_at.append_value(micros(e.detected_at));
        for (b, v) in
            text.iter_mut()
                .zip([&e.detector, &e.model_id, &e.model_version, &e.statistic])
        {
            b.append_value(v);
        }
        value.append_option(e.value);
        threshold.append_value(e.threshold);
        p.append_option(e.p_value);
        alpha.append_value(e.alpha);
        rs.append_value(micros(e.reference_start));
        re.append_value(micros(e.reference_end));
        cs.append_value(micros(e.current_start));
        ce.append_value(micros(e.current_end));
        devices.append_value(e.devices);
        events.append_value(e.events);
        eps.append_option(e.epsilon);
        fired.append_value(e.fired);
        severity.append_option(e.severity.as_deref());
        file.append_value(&e.query_file);
        expected.append_option(e.devices_expected);
        present.append_option(e.devices_present);
        revision.append_value(e.revision);
        rows_seen.append_option(e.rows_seen);
        capped.append_option(e.devices_capped);
    }
    let mut text = text.into_iter();
    let mut next_text = || -> ArrayRef {
        match text.next() {
            Some(mut b) => Arc::new(b.finish()),
            None => Arc::new(StringBuilder::new().finish()),
        }
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(detected_at.finish()),
        next_text(),
        next_text(),
        next_text(),
        next_text(),
        Arc::new(value.finish()),
        Arc::new(threshold.finish()),
        Arc::new(p.finish()),
        Arc::new(alpha.finish()),
        Arc::new(rs.finish()),
        Arc::new(re.finish()),
        Arc::new(cs.finish()),
        Arc::new(ce.finish()),
        Arc::new(devices.finish()),
        Arc::new(events.finish()),
        Arc::new(eps.finish()),
        Arc::new(fired.finish()),
        Arc::new(severity.finish()),
        Arc::new(file.finish()),
        Arc::new(expected.finish()),
        Arc::new(present.finish()),
        Arc::new(revision.finish()),
        Arc::new(rows_seen.finish()),
        Arc::new(capped.finish()),
    ];
    RecordBatch::try_new(evaluations(), columns)
}

/// Schema of `retrain_job_events`: every state a retraining job went
/// through (the `retrain_jobs` view shows each job's latest), partitioned
/// by the date of `at`.
pub fn job_events() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("at", timestamp(), false),
        Field::new("period_end", timestamp(), false),
        Field::new("detail", DataType::Utf8, true),
        Field::new("evidence", DataType::Utf8, true),
    ]))
}

/// One state change of a retraining job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub job_id: String,
    pub model_id: String,
    pub model_version: String,
    /// pending, dispatched, acknowledged, succeeded, failed.
    pub status: String,
    pub at: DateTime<Utc>,
    /// End of the detection period that opened the job (event time).
    pub period_end: DateTime<Utc>,
    pub detail: Option<String>,
    /// The JSON sent to the training system (on `pending`).
    pub evidence: Option<String>,
}

/// One batch of job events.
pub fn job_events_batch(rows: &[JobEvent]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let ts = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut at, mut period_end) = (ts(), ts());
    let mut s: Vec<StringBuilder> = (0..4).map(|_| StringBuilder::new()).collect();
    let (mut detail, mut evidence) = (StringBuilder::new(), StringBuilder::new());
    for j in rows {
        for (b, v) in s
            .iter_mut()
            .zip([&j.job_id, &j.model_id, &j.model_version, &j.status])
        {
            b.append_value(v);
        }
        at.append_value(micros(j.at));
        period_end.append_value(micros(j.period_end));
        detail.append_option(j.detail.as_deref());
        evidence.append_option(j.evidence.as_deref());
    }
    let mut columns: Vec<ArrayRef> = s
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    columns.push(Arc::new(at.finish()));
    columns.push(Arc::new(period_end.finish()));
    columns.push(Arc::new(detail.finish()));
    columns.push(Arc::new(evidence.finish()));
    RecordBatch::try_new(job_events(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of edge-set columns, one row per `(model, version, first
    /// latency edge)`; the other histograms share one set.
    fn rows(rows: &[(&str, &str, f64)], item: &str) -> RecordBatch {
        let text = |k: usize| -> ArrayRef {
            let values: Vec<&str> = rows
                .iter()
                .map(|r| if k == 0 { r.0 } else { r.1 })
                .collect();
            Arc::new(datafusion::arrow::array::StringArray::from(values))
        };
        let list = |first: &dyn Fn(usize) -> f64| -> ArrayRef {
            let field = Arc::new(Field::new(item, DataType::Float64, true));
            let mut b = ListBuilder::new(Float64Builder::new()).with_field(field);
            for i in 0..rows.len() {
                b.append_value([Some(first(i)), Some(10.0), Some(100.0)]);
            }
            Arc::new(b.finish())
        };
        let mut columns = vec![text(0), text(1), list(&|i| rows[i].2)];
        columns.extend((0..3).map(|_| list(&|_| 0.0)));
        let fields: Vec<Field> = EDGE_SET_COLUMNS
            .iter()
            .zip(&columns)
            .map(|(name, c)| Field::new(*name, c.data_type().clone(), false))
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch")
    }

    fn firsts(batch: &RecordBatch) -> Vec<(String, String, f64)> {
        let ids = batch.column(0).as_string::<i32>();
        let versions = batch.column(1).as_string::<i32>();
        let latency = batch.column(2).as_list::<i32>();
        (0..batch.num_rows())
            .map(|i| {
                let edges = latency.value(i);
                let edges = edges.as_primitive::<Float64Type>();
                (
                    ids.value(i).to_owned(),
                    versions.value(i).to_owned(),
                    edges.value(0),
                )
            })
            .collect()
    }

    #[test]
    fn edge_sets_keep_each_distinct_set_once_in_first_seen_order() {
        let batch = rows(
            &[
                ("m", "1", 0.0),
                ("m", "1", 0.0),
                ("m", "1", 1.0),
                ("m", "2", 0.0),
                ("n", "1", 0.0),
                ("m", "1", 1.0),
            ],
            "item",
        );
        let sets = edge_sets_batch(&batch).expect("sets");
        assert_eq!(sets.schema(), edge_sets());
        let s = |m: &str, v: &str, e: f64| (m.to_owned(), v.to_owned(), e);
        assert_eq!(
            firsts(&sets),
            [
                s("m", "1", 0.0),
                s("m", "1", 1.0),
                s("m", "2", 0.0),
                s("n", "1", 0.0)
            ]
        );
        // A slice reads its own rows (list offsets do not start at 0).
        assert_eq!(
            firsts(&edge_sets_batch(&batch.slice(2, 3)).expect("sets")),
            [s("m", "1", 1.0), s("m", "2", 0.0), s("n", "1", 0.0)]
        );
        // Lists written by other tools name their item field differently.
        let other = rows(&[("m", "1", 0.0), ("m", "1", 0.0)], "element");
        assert_eq!(
            firsts(&edge_sets_batch(&other).expect("sets")),
            [s("m", "1", 0.0)]
        );
        // Without the edges columns: an error, not a panic.
        let ids = batch.project(&[0, 1]).expect("project");
        assert!(edge_sets_batch(&ids).is_err());
    }
}
