//! Tumbling windows, aligned to UTC: exact per-window counts for each
//! registered model.
//!
//! This is plain state (no clock, no I/O): callers pass the event time in.
//! A registered model gets a window every period, even an empty one, so that
//! whether a message is published never depends on the events (see
//! docs/privacy.md). Exact counts never leave this crate: [`ClosedWindow`]
//! can only be turned into a message by [`crate::privacy::Privatizer`].

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
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
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            latency_ms_edges: LATENCY_MS_EDGES.to_vec(),
            confidence_edges: CONFIDENCE_EDGES.to_vec(),
            input_tokens_edges: TOKEN_EDGES.to_vec(),
            output_tokens_edges: TOKEN_EDGES.to_vec(),
            labels: Vec::new(),
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
}

impl WindowCounts {
    fn new(spec: &ModelSpec) -> Self {
        let zeros = |edges: &[f64]| vec![0; edges.len().saturating_sub(1)];
        WindowCounts {
            inference_count: 0,
            error_count: 0,
            feedback: [0; 3],
            latency_ms: zeros(&spec.latency_ms_edges),
            confidence: zeros(&spec.confidence_edges),
            input_tokens: zeros(&spec.input_tokens_edges),
            output_tokens: zeros(&spec.output_tokens_edges),
            labels: vec![0; spec.labels.len()],
            spec: spec.clone(),
        }
    }

    fn add(&mut self, e: &InferenceEvent<'_>) {
        let spec = &self.spec;
        self.inference_count += 1;
        self.error_count += i64::from(e.error);
        self.latency_ms[histogram::bucket_index(&spec.latency_ms_edges, e.latency_ms)] += 1;
        // A model without a confidence still counts the event, in bucket 0,
        // so that every event moves every histogram by exactly one.
        let confidence = e.confidence.unwrap_or(0.0);
        self.confidence[histogram::bucket_index(&spec.confidence_edges, confidence)] += 1;
        let input = f64::from(e.input_tokens);
        self.input_tokens[histogram::bucket_index(&spec.input_tokens_edges, input)] += 1;
        let output = f64::from(e.output_tokens);
        self.output_tokens[histogram::bucket_index(&spec.output_tokens_edges, output)] += 1;
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
                self.labels[i] += 1;
            }
        }
    }

    fn add_feedback(&mut self, f: Feedback) {
        let i = match f {
            Feedback::Positive => 0,
            Feedback::Negative => 1,
            Feedback::Correction => 2,
        };
        self.feedback[i] += 1;
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

/// Per-model tumbling windows of a fixed length, aligned to the Unix epoch.
///
/// Every period from the first window on is closed, with or without
/// events, so the messages a device publishes do not depend on its events.
#[derive(Debug)]
pub struct Windower {
    window_secs: u32,
    /// Start of the open window.
    open: DateTime<Utc>,
    models: BTreeMap<ModelKey, WindowCounts>,
    /// Events whose time fell before the open window (counted, then
    /// recorded in the open window).
    late_events: u64,
}

impl Windower {
    /// Windows of `window_secs` (1..=86400, checked by the config layer),
    /// the first one being the window that contains `start`.
    pub fn new(window_secs: u32, start: DateTime<Utc>) -> Self {
        let window_secs = window_secs.max(1);
        Windower {
            window_secs,
            open: align(start, window_secs),
            models: BTreeMap::new(),
            late_events: 0,
        }
    }

    pub fn window_secs(&self) -> u32 {
        self.window_secs
    }

    /// Events recorded after their window had closed.
    pub fn late_events(&self) -> u64 {
        self.late_events
    }

    /// Registers a model; from now on it publishes a window every period.
    pub fn register(&mut self, model: ModelKey, spec: &ModelSpec) {
        self.models
            .entry(model)
            .or_insert_with(|| WindowCounts::new(spec));
    }

    /// Records an inference at time `at`. Returns the windows that closed
    /// because `at` lies past the open window. Unregistered models are
    /// registered with the default spec.
    pub fn record(
        &mut self,
        at: DateTime<Utc>,
        model: &ModelKey,
        event: &InferenceEvent<'_>,
    ) -> Vec<ClosedWindow> {
        let closed = self.advance(at);
        self.counts(model).add(event);
        closed
    }

    /// Records feedback at time `at`, like [`Windower::record`].
    pub fn feedback(
        &mut self,
        at: DateTime<Utc>,
        model: &ModelKey,
        f: Feedback,
    ) -> Vec<ClosedWindow> {
        let closed = self.advance(at);
        self.counts(model).add_feedback(f);
        closed
    }

    /// Closes every window that ended at or before `now`, one per
    /// registered model and period, empty periods included.
    pub fn close_due(&mut self, now: DateTime<Utc>) -> Vec<ClosedWindow> {
        self.close_before(align(now, self.window_secs))
    }

    fn counts(&mut self, model: &ModelKey) -> &mut WindowCounts {
        self.models
            .entry(model.clone())
            .or_insert_with(|| WindowCounts::new(&ModelSpec::default()))
    }

    fn advance(&mut self, at: DateTime<Utc>) -> Vec<ClosedWindow> {
        let window = align(at, self.window_secs);
        if window < self.open {
            self.late_events += 1;
            return Vec::new();
        }
        self.close_before(window)
    }

    /// Closes the open window and its successors until `window` is open.
    fn close_before(&mut self, window: DateTime<Utc>) -> Vec<ClosedWindow> {
        let length = TimeDelta::seconds(i64::from(self.window_secs));
        let mut closed = Vec::new();
        while self.open < window {
            let start = self.open;
            closed.extend(self.models.iter_mut().map(|(model, counts)| {
                let fresh = WindowCounts::new(&counts.spec);
                ClosedWindow {
                    model: model.clone(),
                    window_start: start,
                    window_secs: self.window_secs,
                    counts: std::mem::replace(counts, fresh),
                }
            }));
            self.open = start + length;
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
        }
    }

    #[test]
    fn windows_are_aligned_and_close_when_time_moves_on() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:30Z"));
        let m = ModelKey::new("m", "1");
        assert!(w
            .record(t("2026-11-27T10:00:59Z"), &m, &event(3.0, None))
            .is_empty());
        assert!(w
            .record(t("2026-11-27T10:00:01Z"), &m, &event(7.0, None))
            .is_empty());
        let closed = w.record(t("2026-11-27T10:01:00Z"), &m, &event(7.0, None));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].window_start, t("2026-11-27T10:00:00Z"));
        assert_eq!(closed[0].counts.inference_count, 2);
        assert_eq!(closed[0].counts.latency_ms[2], 1, "3 ms is in [2, 5)");
        assert_eq!(closed[0].counts.latency_ms[3], 1, "7 ms is in [5, 10)");
        assert_eq!(closed[0].counts.latency_ms.iter().sum::<i64>(), 2);
    }

    #[test]
    fn registered_models_publish_empty_windows() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let busy = ModelKey::new("busy", "1");
        let idle = ModelKey::new("idle", "1");
        w.register(idle.clone(), &ModelSpec::default());
        w.record(t("2026-11-27T10:00:10Z"), &busy, &event(1.0, None));
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        assert_eq!(closed.len(), 2);
        let idle_window = closed
            .iter()
            .find(|c| c.model == idle)
            .expect("idle window");
        assert_eq!(idle_window.counts.inference_count, 0);
        assert!(w.close_due(t("2026-11-27T10:01:30Z")).is_empty());
        // Three quiet periods later, each period still yields its windows.
        let quiet = w.close_due(t("2026-11-27T10:04:10Z"));
        assert_eq!(quiet.len(), 6);
        assert_eq!(quiet[4].window_start, t("2026-11-27T10:03:00Z"));
    }

    #[test]
    fn late_events_go_to_the_open_window_and_are_counted() {
        let mut w = Windower::new(60, t("2026-11-27T10:05:00Z"));
        let m = ModelKey::new("m", "1");
        w.record(t("2026-11-27T10:05:00Z"), &m, &event(1.0, None));
        w.record(t("2026-11-27T10:03:00Z"), &m, &event(1.0, None));
        assert_eq!(w.late_events(), 1);
        let closed = w.close_due(t("2026-11-27T10:06:00Z"));
        assert_eq!(closed[0].counts.inference_count, 2);
    }

    #[test]
    fn labels_outside_the_declared_set_count_as_other() {
        let mut w = Windower::new(60, t("2026-11-27T10:00:00Z"));
        let m = ModelKey::new("m", "1");
        w.register(m.clone(), &ModelSpec::default().with_labels(["cat", "dog"]));
        w.record(t("2026-11-27T10:00:00Z"), &m, &event(1.0, Some("dog")));
        w.record(t("2026-11-27T10:00:00Z"), &m, &event(1.0, Some("axolotl")));
        w.record(t("2026-11-27T10:00:00Z"), &m, &event(1.0, None));
        w.feedback(t("2026-11-27T10:00:00Z"), &m, Feedback::Negative);
        let closed = w.close_due(t("2026-11-27T10:01:00Z"));
        let c = &closed[0].counts;
        assert_eq!(c.spec.labels, vec!["cat", "dog", "other"]);
        assert_eq!(c.labels, vec![0, 1, 2]);
        assert_eq!(c.feedback, [0, 1, 0]);
    }
}
