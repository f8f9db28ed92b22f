//! Tumbling windows, aligned to UTC: exact per-window counts for each
//! registered model.
//!
//! This is plain state (no clock, no I/O): callers pass the event time in.
//! A registered model gets a window every period, even an empty one, so that
//! whether a message is published never depends on the events (see
//! docs/privacy.md). Exact counts never leave this crate: [`ClosedWindow`]
//! can only be turned into a message by [`crate::privacy::Privatizer`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use driftline_core::histogram::{self, CONFIDENCE_EDGES, LATENCY_MS_EDGES, TOKEN_EDGES};

use crate::event::{Feedback, InferenceEvent};

/// Name of the categorical feature fed by [`InferenceEvent::label`].
pub const LABEL_FEATURE: &str = "label";
/// Category that collects labels outside a model's declared set.
pub const OTHER_LABEL: &str = "other";

/// A model as it appears on the wire.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelKey {
    pub model_id: String,
    pub model_version: String,
}

impl ModelKey {
    pub fn new(model_id: impl Into<String>, model_version: impl Into<String>) -> Self {
        ModelKey {
            model_id: model_id.into(),
            model_version: model_version.into(),
        }
    }
}

/// Histogram layouts and the label set of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub latency_ms_edges: Vec<f64>,
    pub confidence_edges: Vec<f64>,
    pub input_tokens_edges: Vec<f64>,
    pub output_tokens_edges: Vec<f64>,
    /// Declared labels; empty means the model publishes no `label` feature.
    /// [`OTHER_LABEL`] is added when missing.
    pub labels: Vec<String>,
    /// Custom numeric features: name and bucket edges, in declaration order.
    pub custom: Vec<(String, Vec<f64>)>,
    /// Most events (inferences and feedback together) counted per window;
    /// the rest are dropped and counted locally (`K` in docs/privacy.md).
    pub max_events_per_window: u32,
}

/// Default of [`ModelSpec::max_events_per_window`].
pub const DEFAULT_MAX_EVENTS_PER_WINDOW: u32 = 10;

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            latency_ms_edges: LATENCY_MS_EDGES.to_vec(),
            confidence_edges: CONFIDENCE_EDGES.to_vec(),
            input_tokens_edges: TOKEN_EDGES.to_vec(),
            output_tokens_edges: TOKEN_EDGES.to_vec(),
            labels: Vec::new(),
            custom: Vec::new(),
            max_events_per_window: DEFAULT_MAX_EVENTS_PER_WINDOW,
        }
    }
}

impl ModelSpec {
    /// The spec with `labels` as its declared label set.
    pub fn with_labels<S: Into<String>>(mut self, labels: impl IntoIterator<Item = S>) -> Self {
        self.labels = labels.into_iter().map(Into::into).collect();
        if !self.labels.is_empty() && !self.labels.iter().any(|l| l == OTHER_LABEL) {
            self.labels.push(OTHER_LABEL.to_owned());
        }
        self.labels.sort();
        self.labels.dedup();
        self
    }

    /// The spec with another cap on the events counted per window.
    pub fn with_max_events_per_window(mut self, k: u32) -> Self {
        self.max_events_per_window = k;
        self
    }

    /// The spec with one more custom numeric feature.
    pub fn with_custom(mut self, name: impl Into<String>, edges: &[f64]) -> Self {
        self.custom.push((name.into(), edges.to_vec()));
        self
    }
}

/// Exact counts of one model in one window. Crate-private fields: only the
/// privacy module reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowCounts {
    pub(crate) spec: ModelSpec,
    pub(crate) inference_count: i64,
    pub(crate) error_count: i64,
    pub(crate) feedback: [i64; 3],
    pub(crate) latency_ms: Vec<i64>,
    pub(crate) confidence: Vec<i64>,
    pub(crate) input_tokens: Vec<i64>,
    pub(crate) output_tokens: Vec<i64>,
    /// One count per declared label, in `spec.labels` order.
    pub(crate) labels: Vec<i64>,
    /// One histogram per custom feature, in `spec.custom` order.
    pub(crate) custom: Vec<Vec<i64>>,
}

/// The live counters of one model's open window: plain atomics, so that
/// recording allocates nothing and recorders never wait for each other.
///
/// `gate` separates recording from closing: recorders hold it shared, the
/// closing window exclusively, so an event is counted whole in one window
/// and `events` (the cap's counter) belongs to the same window as the
/// counts it admitted.
#[derive(Debug)]
struct ModelCells {
    spec: ModelSpec,
    gate: RwLock<()>,
    /// Events admitted to the open window, against the cap.
    events: AtomicU64,
    inference_count: AtomicI64,
    error_count: AtomicI64,
    feedback: [AtomicI64; 3],
    latency_ms: Box<[AtomicI64]>,
    confidence: Box<[AtomicI64]>,
    input_tokens: Box<[AtomicI64]>,
    output_tokens: Box<[AtomicI64]>,
    labels: Box<[AtomicI64]>,
    custom: Box<[Box<[AtomicI64]>]>,
}

fn cells(n: usize) -> Box<[AtomicI64]> {
    (0..n).map(|_| AtomicI64::new(0)).collect()
}

fn drain(cells: &[AtomicI64]) -> Vec<i64> {
    cells.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect()
}

impl ModelCells {
    fn new(spec: &ModelSpec) -> Self {
        let buckets = |edges: &[f64]| cells(edges.len().saturating_sub(1));
        ModelCells {
            gate: RwLock::new(()),
            events: AtomicU64::new(0),
            inference_count: AtomicI64::new(0),
            error_count: AtomicI64::new(0),
            feedback: [AtomicI64::new(0), AtomicI64::new(0), AtomicI64::new(0)],
            latency_ms: buckets(&spec.latency_ms_edges),
            confidence: buckets(&spec.confidence_edges),
            input_tokens: buckets(&spec.input_tokens_edges),
            output_tokens: buckets(&spec.output_tokens_edges),
            labels: cells(spec.labels.len()),
            custom: spec
                .custom
                .iter()
                .map(|(_, edges)| buckets(edges))
                .collect(),
            spec: spec.clone(),
        }
    }

    /// Takes one of the open window's `max_events_per_window` slots.
    fn admit(&self) -> bool {
        self.events.fetch_add(1, Ordering::Relaxed) < u64::from(self.spec.max_events_per_window)
    }

    /// Counts the event unless the window is full; returns whether it was
    /// counted and how many of its values were clipped into a histogram's
    /// first or last bucket.
    fn add(&self, e: &InferenceEvent<'_>) -> (bool, u64) {
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if !self.admit() {
            return (false, 0);
        }
        let spec = &self.spec;
        let outside = |edges: &[f64], v: f64| {
            u64::from(
                !(edges.first().is_some_and(|lo| v >= *lo)
                    && edges.last().is_some_and(|hi| v <= *hi)),
            )
        };
        let mut clipped = outside(&spec.latency_ms_edges, e.latency_ms);
        let bump = |c: &AtomicI64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        bump(&self.inference_count);
        if e.error {
            bump(&self.error_count);
        }
        bump(&self.latency_ms[histogram::bucket_index(&spec.latency_ms_edges, e.latency_ms)]);
        // A model without a confidence still counts the event, in bucket 0,
        // so that every event moves every histogram by exactly one.
        let confidence = e.confidence.unwrap_or(0.0);
        if e.confidence.is_some() {
            clipped += outside(&spec.confidence_edges, confidence);
        }
        bump(&self.confidence[histogram::bucket_index(&spec.confidence_edges, confidence)]);
        let input = f64::from(e.input_tokens);
        clipped += outside(&spec.input_tokens_edges, input);
        bump(&self.input_tokens[histogram::bucket_index(&spec.input_tokens_edges, input)]);
        let output = f64::from(e.output_tokens);
        clipped += outside(&spec.output_tokens_edges, output);
        bump(&self.output_tokens[histogram::bucket_index(&spec.output_tokens_edges, output)]);
        if !spec.labels.is_empty() {
            let label = e.label.unwrap_or(OTHER_LABEL);
            let idx = spec
                .labels
                .binary_search_by(|l| l.as_str().cmp(label))
                .or_else(|_| {
                    spec.labels
                        .binary_search_by(|l| l.as_str().cmp(OTHER_LABEL))
                });
            if let Ok(i) = idx {
                bump(&self.labels[i]);
            }
        }
        for ((value, (_, edges)), cells) in
            e.custom.iter().zip(&spec.custom).zip(self.custom.iter())
        {
            if value.is_nan() {
                continue;
            }
            clipped += outside(edges, *value);
            bump(&cells[histogram::bucket_index(edges, *value)]);
        }
        (true, clipped)
    }

    /// Counts the feedback unless the window is full; returns whether it
    /// was counted.
    fn add_feedback(&self, f: Feedback) -> bool {
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if !self.admit() {
            return false;
        }
        let i = match f {
            Feedback::Positive => 0,
            Feedback::Negative => 1,
            Feedback::Correction => 2,
        };
        self.feedback[i].fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes the counts so far and resets them to zero, with no event half
    /// recorded (see `gate`).
    fn drain(&self) -> WindowCounts {
        let _closing = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.events.store(0, Ordering::Relaxed);
        WindowCounts {
            inference_count: self.inference_count.swap(0, Ordering::Relaxed),
            error_count: self.error_count.swap(0, Ordering::Relaxed),
            feedback: [0, 1, 2].map(|i| self.feedback[i].swap(0, Ordering::Relaxed)),
            latency_ms: drain(&self.latency_ms),
            confidence: drain(&self.confidence),
            input_tokens: drain(&self.input_tokens),
            output_tokens: drain(&self.output_tokens),
            labels: drain(&self.labels),
            custom: self.custom.iter().map(|c| drain(c)).collect(),
            spec: self.spec.clone(),
        }
    }

    fn zeros(&self) -> WindowCounts {
        let zeros = |c: &[AtomicI64]| vec![0; c.len()];
        WindowCounts {
            inference_count: 0,
            error_count: 0,
            feedback: [0; 3],
            latency_ms: zeros(&self.latency_ms),
            confidence: zeros(&self.confidence),
            input_tokens: zeros(&self.input_tokens),
            output_tokens: zeros(&self.output_tokens),
            labels: zeros(&self.labels),
            custom: self.custom.iter().map(|c| zeros(c)).collect(),
            spec: self.spec.clone(),
        }
    }
}

/// A finished window of one model, ready to be privatized.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub model: ModelKey,
    pub window_start: DateTime<Utc>,
    pub window_secs: u32,
    pub(crate) counts: WindowCounts,
}

/// State shared by the [`Windower`] and every [`ModelHandle`].
#[derive(Debug)]
struct Shared {
    /// Start of the open window, Unix seconds.
    open: AtomicI64,
    late_events: AtomicU64,
    clipped_values: AtomicU64,
    capped_events: AtomicU64,
}

/// The recording side of one model: cheap to clone, safe to share between
/// threads, lock-free and allocation-free to record with.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    cells: Arc<ModelCells>,
    shared: Arc<Shared>,
}

impl ModelHandle {
    /// The model's layouts, labels and custom features.
    pub fn spec(&self) -> &ModelSpec {
        &self.cells.spec
    }

    /// Records an inference in the open window (or, when the window already
    /// holds `max_events_per_window` events, counts it as capped).
    #[inline]
    pub fn record(&self, event: &InferenceEvent<'_>) {
        let (counted, clipped) = self.cells.add(event);
        if !counted {
            self.note_capped();
        }
        if clipped > 0 {
            self.shared
                .clipped_values
                .fetch_add(clipped, Ordering::Relaxed);
        }
    }

    /// Records an inference that happened at `at`. An event older than the
    /// open window still goes to the open window, and is counted as late.
    pub fn record_at(&self, at: DateTime<Utc>, event: &InferenceEvent<'_>) {
        self.note_late(at);
        self.record(event);
    }

    /// Records user feedback in the open window (capped like inferences).
    #[inline]
    pub fn feedback(&self, f: Feedback) {
        if !self.cells.add_feedback(f) {
            self.note_capped();
        }
    }

    /// Records feedback given at `at` (late ones are counted, as above).
    pub fn feedback_at(&self, at: DateTime<Utc>, f: Feedback) {
        self.note_late(at);
        self.feedback(f);
    }

    fn note_capped(&self) {
        self.shared.capped_events.fetch_add(1, Ordering::Relaxed);
    }

    fn note_late(&self, at: DateTime<Utc>) {
        if at.timestamp() < self.shared.open.load(Ordering::Relaxed) {
            self.shared.late_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters of a [`Windower`], readable from other tasks. They depend on
/// events: keep them on the device.
#[derive(Debug, Clone)]
pub struct WindowStats(Arc<Shared>);

impl WindowStats {
    pub fn late_events(&self) -> u64 {
        self.0.late_events.load(Ordering::Relaxed)
    }

    pub fn clipped_values(&self) -> u64 {
        self.0.clipped_values.load(Ordering::Relaxed)
    }

    /// Events not counted because their window already held
    /// `max_events_per_window`.
    pub fn capped_events(&self) -> u64 {
        self.0.capped_events.load(Ordering::Relaxed)
    }
}

/// Tumbling windows of a fixed length, aligned to the Unix epoch, over a
/// set of registered models.
///
/// Every period from the first window on is closed, with or without
/// events, so the messages a device publishes do not depend on its events.
#[derive(Debug)]
pub struct Windower {
    window_secs: u32,
    shared: Arc<Shared>,
    models: BTreeMap<ModelKey, Arc<ModelCells>>,
}

impl Windower {
    /// Windows of `window_secs` (1..=86400, checked by the config layer),
    /// the first one being the window that contains `start`.
    pub fn new(window_secs: u32, start: DateTime<Utc>) -> Self {
        let window_secs = window_secs.max(1);
        Windower {
            window_secs,
            shared: Arc::new(Shared {
                open: AtomicI64::new(align(start, window_secs).timestamp()),
                late_events: AtomicU64::new(0),
                clipped_values: AtomicU64::new(0),
                capped_events: AtomicU64::new(0),
            }),
            models: BTreeMap::new(),
        }
    }

    pub fn window_secs(&self) -> u32 {
        self.window_secs
    }

    /// Start of the open window.
    pub fn open_window(&self) -> DateTime<Utc> {
        let secs = self.shared.open.load(Ordering::Relaxed);
        DateTime::from_timestamp(secs, 0).unwrap_or_default()
    }

    /// Events recorded with a time before their window had closed.
    pub fn late_events(&self) -> u64 {
        self.stats().late_events()
    }

    /// Values clipped into a histogram's first or last bucket.
    pub fn clipped_values(&self) -> u64 {
        self.stats().clipped_values()
    }

    /// Events dropped by the per-window cap.
    pub fn capped_events(&self) -> u64 {
        self.stats().capped_events()
    }

    /// A handle on the counters above, for other tasks.
    pub fn stats(&self) -> WindowStats {
        WindowStats(self.shared.clone())
    }

    /// Registers a model (once; later calls return the same handle and keep
    /// the first spec). From now on it yields a window every period.
    pub fn register(&mut self, model: ModelKey, spec: &ModelSpec) -> ModelHandle {
        let cells = self
            .models
            .entry(model)
            .or_insert_with(|| Arc::new(ModelCells::new(spec)))
            .clone();
        ModelHandle {
            cells,
            shared: self.shared.clone(),
        }
    }

    /// Closes every window that ended at or before `now`: one per
    /// registered model and period, empty periods included. The counts
    /// recorded so far go to the oldest of them.
    ///
    /// The clock may jump (a device that boots at 1970 and then gets its
    /// time, a suspended laptop, a clock set back). When `now` is more than
    /// a day of windows past the open window, the open window closes alone
    /// and the periods in between are skipped: their empty windows would
    /// only spend budget (and, after a jump of years, memory). When `now`
    /// is more than a window before it, the open window moves back to
    /// `now`'s, keeping its counts. Both depend on the clock, never on
    /// events.
    pub fn close_due(&mut self, now: DateTime<Utc>) -> Vec<ClosedWindow> {
        let current = align(now, self.window_secs).timestamp();
        let length = i64::from(self.window_secs);
        let open = self.shared.open.load(Ordering::Relaxed);
        if open > current + length {
            tracing::warn!(
                open,
                now = current,
                "the clock went back; the open window follows it"
            );
            self.shared.open.store(current, Ordering::Relaxed);
            return Vec::new();
        }
        let day = (86_400 / length).max(1);
        if (current - open) / length > day {
            tracing::warn!(
                open,
                now = current,
                "the clock jumped ahead; skipping the windows in between"
            );
            let window_start = DateTime::from_timestamp(open, 0).unwrap_or_default();
            let closed = self
                .models
                .iter()
                .map(|(model, cells)| ClosedWindow {
                    model: model.clone(),
                    window_start,
                    window_secs: self.window_secs,
                    counts: cells.drain(),
                })
                .collect();
            self.shared.open.store(current, Ordering::Relaxed);
            return closed;
        }
        let mut closed = Vec::new();
        let mut first = true;
        loop {
            let open = self.shared.open.load(Ordering::Relaxed);
            if open >= current {
                break;
            }
            let window_start = DateTime::from_timestamp(open, 0).unwrap_or_default();
            closed.extend(self.models.iter().map(|(model, cells)| ClosedWindow {
                model: model.clone(),
                window_start,
                window_secs: self.window_secs,
                counts: if first { cells.drain() } else { cells.zeros() },
            }));
            first = false;
            self.shared.open.store(open + length, Ordering::Relaxed);
        }
        closed
    }
}

/// The start of the `window_secs` window containing `t`.
pub fn align(t: DateTime<Utc>, window_secs: u32) -> DateTime<Utc> {
    let secs = i64::from(window_secs.max(1));
    let start = t.timestamp() - t.timestamp().rem_euclid(secs);
    DateTime::from_timestamp(start, 0).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("timestamp")
    }

    fn event(latency_ms: f64, label: Option<&str>) -> InferenceEvent<'_> {
        InferenceEvent {
            latency_ms,
            input_tokens: 10,
            output_tokens: 3,
            confidence: Some(0.95),
            error: false,
            label,
            custom: &[],
        }
    }

    #[test]
    fn windows_are_aligned_and_close_when_their_period_ends() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:30Z"));
        assert_eq!(w.open_window(), t("2026-11-27T10:00:00Z"));
        let m = w.register(ModelKey::new("m", "1"), &ModelSpec::default());
        m.record(&event(3.0, None));
        m.record(&event(7.0, None));
        assert!(w.close_due(t("2026-11-27T10:00:59Z")).is_empty());
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].window_start, t("2026-11-27T10:00:00Z"));
        assert_eq!(closed[0].counts.inference_count, 2);
        assert_eq!(closed[0].counts.latency_ms[2], 1, "3 ms is in [2, 5)");
        assert_eq!(closed[0].counts.latency_ms[3], 1, "7 ms is in [5, 10)");
        assert_eq!(closed[0].counts.latency_ms.iter().sum::<i64>(), 2);
        assert_eq!(
            closed[0].counts.confidence[9], 2,
            "0.95 is in the last bucket"
        );
    }

    #[test]
    fn registered_models_publish_empty_windows() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let busy = w.register(ModelKey::new("busy", "1"), &ModelSpec::default());
        w.register(ModelKey::new("idle", "1"), &ModelSpec::default());
        busy.record(&event(1.0, None));
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        assert_eq!(closed.len(), 2);
        let idle = closed
            .iter()
            .find(|c| c.model.model_id == "idle")
            .expect("idle window");
        assert_eq!(idle.counts.inference_count, 0);
        assert!(w.close_due(t("2026-11-27T10:01:30Z")).is_empty());
        // Three quiet periods later, each period still yields its windows.
        busy.record(&event(1.0, None));
        let quiet = w.close_due(t("2026-11-27T10:04:10Z"));
        assert_eq!(quiet.len(), 6);
        assert_eq!(quiet[4].window_start, t("2026-11-27T10:03:00Z"));
        let busy_counts: Vec<i64> = quiet
            .iter()
            .filter(|c| c.model.model_id == "busy")
            .map(|c| c.counts.inference_count)
            .collect();
        assert_eq!(
            busy_counts,
            vec![1, 0, 0],
            "counts go to the oldest closed window"
        );
    }

    #[test]
    fn custom_features_are_counted_in_their_own_histograms() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let spec = ModelSpec::default()
            .with_custom("brightness", &[0.0, 0.5, 1.0])
            .with_custom("temperature_c", &[-20.0, 0.0, 20.0, 40.0]);
        let m = w.register(ModelKey::new("m", "1"), &spec);
        m.record(&InferenceEvent {
            custom: &[0.7, 25.0],
            ..event(1.0, None)
        });
        m.record(&InferenceEvent {
            custom: &[f64::NAN, -5.0],
            ..event(1.0, None)
        });
        m.record(&InferenceEvent {
            custom: &[0.1],
            ..event(1.0, None)
        });
        m.record(&event(1.0, None));
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        let c = &closed[0].counts;
        assert_eq!(
            c.custom,
            vec![vec![1, 1], vec![1, 0, 1]],
            "NaN and missing values are not counted"
        );
        assert_eq!(c.inference_count, 4);
    }

    #[test]
    fn out_of_range_values_are_clipped_and_counted() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let m = w.register(ModelKey::new("m", "1"), &ModelSpec::default());
        m.record(&event(3.0, None));
        assert_eq!(w.clipped_values(), 0);
        let mut e = event(-5.0, None);
        e.confidence = Some(1.7);
        e.input_tokens = 1_000_000;
        m.record(&e);
        assert_eq!(w.clipped_values(), 3);
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        let c = &closed[0].counts;
        assert_eq!(c.latency_ms[0], 1, "-5 ms is clipped into the first bucket");
        assert_eq!(c.confidence[9], 2, "1.7 is clipped into the last bucket");
        assert_eq!(*c.input_tokens.last().expect("bucket"), 1);
    }

    #[test]
    fn late_events_go_to_the_open_window_and_are_counted() {
        let mut w = Windower::new(60, t("2026-11-27T10:05:00Z"));
        let m = w.register(ModelKey::new("m", "1"), &ModelSpec::default());
        m.record_at(t("2026-11-27T10:05:10Z"), &event(1.0, None));
        m.record_at(t("2026-11-27T10:03:00Z"), &event(1.0, None));
        m.feedback_at(t("2026-11-27T10:04:59Z"), Feedback::Positive);
        assert_eq!(w.late_events(), 2);
        let closed = w.close_due(t("2026-11-27T10:06:00Z"));
        assert_eq!(closed[0].counts.inference_count, 2);
        assert_eq!(closed[0].counts.feedback, [1, 0, 0]);
    }

    #[test]
    fn labels_outside_the_declared_set_count_as_other() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let m = w.register(
            ModelKey::new("m", "1"),
            &ModelSpec::default().with_labels(["cat", "dog"]),
        );
        m.record(&event(1.0, Some("dog")));
        m.record(&event(1.0, Some("axolotl")));
        m.record(&event(1.0, None));
        m.feedback(Feedback::Negative);
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        let c = &closed[0].counts;
        assert_eq!(c.spec.labels, vec!["cat", "dog", "other"]);
        assert_eq!(c.labels, vec![0, 1, 2]);
        assert_eq!(c.feedback, [0, 1, 0]);
    }

    #[test]
    fn concurrent_recording_loses_no_event() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let spec = ModelSpec::default().with_max_events_per_window(u32::MAX);
        let m = w.register(ModelKey::new("m", "1"), &spec);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.record(&event(12.0, None));
                    }
                })
            })
            .collect();
        let mut total = 0;
        let mut minute = t("2026-11-27T10:01:00Z");
        for _ in 0..20 {
            total += w
                .close_due(minute)
                .iter()
                .map(|c| c.counts.inference_count)
                .sum::<i64>();
            minute += chrono::TimeDelta::minutes(1);
        }
        for th in threads {
            th.join().expect("thread");
        }
        total += w
            .close_due(minute)
            .iter()
            .map(|c| c.counts.inference_count)
            .sum::<i64>();
        assert_eq!(total, 40_000);
    }

    #[test]
    fn no_window_counts_more_than_its_cap_even_under_concurrency() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let spec = ModelSpec::default().with_max_events_per_window(7);
        let m = w.register(ModelKey::new("m", "1"), &spec);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for j in 0..5_000 {
                        if (i + j) % 3 == 0 {
                            m.feedback(Feedback::Negative);
                        } else {
                            m.record(&event(12.0, None));
                        }
                    }
                })
            })
            .collect();
        let mut counted = 0;
        let mut minute = t("2026-11-27T10:01:00Z");
        let mut close = |w: &mut Windower, at| {
            for c in w.close_due(at) {
                let c = c.counts;
                let events = c.inference_count + c.feedback.iter().sum::<i64>();
                assert!(events <= 7, "a window counted {events} events");
                assert_eq!(c.latency_ms.iter().sum::<i64>(), c.inference_count);
                counted += events;
            }
        };
        for _ in 0..50 {
            close(&mut w, minute);
            minute += chrono::TimeDelta::minutes(1);
        }
        for th in threads {
            th.join().expect("thread");
        }
        close(&mut w, minute);
        assert_eq!(counted as u64 + w.capped_events(), 20_000);
    }

    #[test]
    fn a_clock_that_jumps_closes_one_window_not_millions() {
        let mut w = Windower::new(60, t("1970-01-01T00:00:30Z"));
        let m = w.register(ModelKey::new("m", "1"), &ModelSpec::default());
        m.record(&event(12.0, None));
        // NTP sets the clock 56 years ahead: the open window closes alone.
        let closed = w.close_due(t("2026-11-27T10:00:30Z"));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].window_start, t("1970-01-01T00:00:00Z"));
        assert_eq!(closed[0].counts.inference_count, 1);
        assert_eq!(w.open_window(), t("2026-11-27T10:00:00Z"));
        // Set back by an hour: nothing closes, the open window follows.
        m.record(&event(12.0, None));
        assert!(w.close_due(t("2026-11-27T09:00:30Z")).is_empty());
        assert_eq!(w.open_window(), t("2026-11-27T09:00:00Z"));
        let closed = w.close_due(t("2026-11-27T09:01:00Z"));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].counts.inference_count, 1, "the counts stayed");
        // A gap within a day still closes every period, empty ones too.
        assert_eq!(w.close_due(t("2026-11-27T09:11:00Z")).len(), 10);
    }
}
