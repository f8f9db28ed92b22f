//! Local differential privacy: the only place where exact counts become
//! publishable numbers.
//!
//! Unit of privacy: **one event** (one inference or one feedback) of one
//! window. Adding or removing an inference changes `inference_count`,
//! possibly `error_count`, one bucket of each of the four histograms and,
//! when the model declares labels, one label count, each by one; a feedback
//! event changes one feedback count by one. The L1 sensitivity of the whole
//! window vector is therefore `6 + (1 if labels)`.
//!
//! The vector is released with OpenDP's `make_laplace` over
//! `VectorDomain<AtomDomain<i64>>` and `L1Distance<i64>`, which samples the
//! discrete Laplace distribution exactly (no floating-point leaks) from
//! OpenSSL's CSPRNG. The scale is `sensitivity / epsilon`, and the epsilon
//! written on the wire is what OpenDP's privacy map reports for that
//! sensitivity, not a formula of ours. See docs/privacy.md.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use driftline_core::wire::{self, Histogram, Mechanism, Privacy, WindowReport};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_laplace;
use opendp::measures::MaxDivergence;
use opendp::metrics::L1Distance;

use crate::window::{ClosedWindow, ModelKey, WindowCounts, LABEL_FEATURE};

/// Errors of the privacy module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    #[error("epsilon per window must be a finite number > 0, got {0}")]
    BadEpsilon(f64),
    #[error("OpenDP refused the {step}: {message}")]
    OpenDp { step: &'static str, message: String },
}

fn opendp_error(step: &'static str) -> impl Fn(opendp::error::Error) -> PrivacyError {
    move |e| PrivacyError::OpenDp {
        step,
        message: e.to_string(),
    }
}

/// Turns exact windows into noised ones, spending `epsilon` per window.
///
/// OpenDP measurements are not `Send`, so one is built for each window (a
/// cheap constructor) rather than kept across awaits.
#[derive(Debug, Clone)]
pub struct Privatizer {
    epsilon: f64,
}

impl Privatizer {
    /// Discrete Laplace noise with pure `epsilon`-DP per window.
    pub fn laplace(epsilon: f64) -> Result<Self, PrivacyError> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(PrivacyError::BadEpsilon(epsilon));
        }
        Ok(Privatizer { epsilon })
    }

    /// Epsilon spent by each published window.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The Laplace scale `b` used for a window with this L1 sensitivity.
    pub fn scale_for(&self, sensitivity: i64) -> f64 {
        sensitivity as f64 / self.epsilon
    }

    /// Noises every count of `window`.
    pub fn privatize(&self, window: ClosedWindow) -> Result<PrivateWindow, PrivacyError> {
        let c = &window.counts;
        let sensitivity = sensitivity(c);
        let scale = self.scale_for(sensitivity);
        let measurement = make_laplace::<_, _, MaxDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L1Distance::<i64>::default(),
            scale,
            None,
        )
        .map_err(opendp_error("Laplace measurement"))?;
        let spent = measurement
            .map(&sensitivity)
            .map_err(opendp_error("privacy map"))?;
        let noised = measurement
            .invoke(&flatten(c))
            .map_err(opendp_error("noise sampling"))?;
        let mut values = noised.into_iter();
        let mut next = |n: usize| -> Vec<i64> { values.by_ref().take(n).collect() };
        let head = next(5);
        let spec = &c.spec;
        let hist = |edges: &[f64], counts: Vec<i64>| Histogram {
            edges: edges.to_vec(),
            counts,
        };
        let latency_ms = hist(&spec.latency_ms_edges, next(c.latency_ms.len()));
        let confidence = hist(&spec.confidence_edges, next(c.confidence.len()));
        let input_tokens = hist(&spec.input_tokens_edges, next(c.input_tokens.len()));
        let output_tokens = hist(&spec.output_tokens_edges, next(c.output_tokens.len()));
        let mut categories = BTreeMap::new();
        let mut fields = vec![
            "inference_count",
            "error_count",
            "feedback",
            "latency_ms",
            "confidence",
            "input_tokens",
            "output_tokens",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        if !spec.labels.is_empty() {
            let counts = next(spec.labels.len());
            categories.insert(
                LABEL_FEATURE.to_owned(),
                spec.labels.iter().cloned().zip(counts).collect(),
            );
            fields.push(format!("categories.{LABEL_FEATURE}"));
        }
        let get = |i: usize| head.get(i).copied().unwrap_or(0);
        Ok(PrivateWindow {
            model: window.model,
            window_start: window.window_start,
            window_secs: window.window_secs,
            privacy: Privacy {
                mechanism: Mechanism::Laplace,
                epsilon: Some(spent),
                delta: None,
                rho: None,
                noise_scale: fields.into_iter().map(|f| (f, scale)).collect(),
            },
            inference_count: get(0),
            error_count: get(1),
            feedback: wire::Feedback {
                positive: get(2),
                negative: get(3),
                correction: get(4),
            },
            latency_ms,
            confidence,
            input_tokens,
            output_tokens,
            categories,
        })
    }
}

/// L1 sensitivity of a window vector to one event (module docs).
fn sensitivity(c: &WindowCounts) -> i64 {
    6 + i64::from(!c.spec.labels.is_empty())
}

/// The window as one vector, in the order [`Privatizer::privatize`] reads it.
fn flatten(c: &WindowCounts) -> Vec<i64> {
    let mut v = Vec::with_capacity(64);
    v.extend([c.inference_count, c.error_count]);
    v.extend(c.feedback);
    for h in [
        &c.latency_ms,
        &c.confidence,
        &c.input_tokens,
        &c.output_tokens,
    ] {
        v.extend_from_slice(h);
    }
    v.extend_from_slice(&c.labels);
    v
}

/// A noised window: the only thing the publisher accepts. It can only be
/// made by [`Privatizer::privatize`].
#[derive(Debug, Clone, PartialEq)]
pub struct PrivateWindow {
    model: ModelKey,
    window_start: DateTime<Utc>,
    window_secs: u32,
    privacy: Privacy,
    inference_count: i64,
    error_count: i64,
    feedback: wire::Feedback,
    latency_ms: Histogram,
    confidence: Histogram,
    input_tokens: Histogram,
    output_tokens: Histogram,
    categories: BTreeMap<String, BTreeMap<String, i64>>,
}

/// Who publishes: the fields every message of a device shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub fleet: String,
    pub agent_version: String,
}

impl PrivateWindow {
    pub fn model(&self) -> &ModelKey {
        &self.model
    }

    pub fn window_start(&self) -> DateTime<Utc> {
        self.window_start
    }

    /// The wire message for this window, with the device's next `seq`.
    pub fn into_report(self, device: &DeviceIdentity, seq: u64) -> WindowReport {
        WindowReport {
            schema_version: wire::SCHEMA_VERSION,
            device_id: device.device_id.clone(),
            fleet: device.fleet.clone(),
            model_id: self.model.model_id,
            model_version: self.model.model_version,
            agent_version: device.agent_version.clone(),
            window_start: self.window_start,
            window_secs: self.window_secs,
            seq,
            privacy: self.privacy,
            inference_count: self.inference_count,
            error_count: self.error_count,
            feedback: self.feedback,
            latency_ms: self.latency_ms,
            confidence: self.confidence,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            custom: BTreeMap::new(),
            categories: self.categories,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InferenceEvent;
    use crate::window::{ModelSpec, Windower};

    fn closed_window(labels: &[&str], events: usize) -> ClosedWindow {
        let at: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().expect("ts");
        let mut w = Windower::new(60, at);
        let m = ModelKey::new("m", "1");
        w.register(
            m.clone(),
            &ModelSpec::default().with_labels(labels.iter().copied()),
        );
        for _ in 0..events {
            let e = InferenceEvent {
                latency_ms: 12.0,
                input_tokens: 100,
                output_tokens: 10,
                confidence: Some(0.9),
                error: false,
                label: Some("cat"),
            };
            w.record(at, &m, &e);
        }
        w.close_due(at + chrono::TimeDelta::seconds(60)).remove(0)
    }

    #[test]
    fn noised_window_is_a_valid_message_with_declared_scales() {
        let p = Privatizer::laplace(1.0).expect("privatizer");
        let private = p
            .privatize(closed_window(&["cat", "dog"], 40))
            .expect("noised");
        let device = DeviceIdentity {
            device_id: "d".into(),
            fleet: "f".into(),
            agent_version: "0.1.0".into(),
        };
        let report = private.into_report(&device, 7);
        report
            .validate()
            .expect("agent output passes the collector's checks");
        assert_eq!(report.privacy.mechanism, Mechanism::Laplace);
        let eps = report.privacy.epsilon.expect("epsilon");
        assert!(
            (eps - 1.0).abs() < 1e-9,
            "OpenDP's map gives the configured epsilon, got {eps}"
        );
        assert_eq!(report.privacy.noise_scale["latency_ms"], 7.0);
        assert_eq!(report.privacy.noise_scale.len(), 8);
        assert_eq!(report.categories["label"].len(), 3);
    }

    #[test]
    fn bad_epsilon_is_refused() {
        assert_eq!(
            Privatizer::laplace(0.0).err(),
            Some(PrivacyError::BadEpsilon(0.0))
        );
        assert!(Privatizer::laplace(f64::NAN).is_err());
    }

    #[test]
    fn laplace_noise_matches_its_scale() {
        // Discrete Laplace with scale b: mean 0, variance
        // 2 e^(-1/b) / (1 - e^(-1/b))^2. Over n draws the sample mean and
        // variance must lie within 5 standard errors (false failure ~1e-6).
        let epsilon = 2.0;
        let p = Privatizer::laplace(epsilon).expect("privatizer");
        let b = p.scale_for(6);
        let q = (-1.0 / b).exp();
        let variance = 2.0 * q / (1.0 - q).powi(2);
        let mut draws = Vec::new();
        while draws.len() < 40_000 {
            let report = p
                .privatize(closed_window(&[], 0))
                .expect("noised")
                .into_report(
                    &DeviceIdentity {
                        device_id: "d".into(),
                        fleet: "f".into(),
                        agent_version: "0".into(),
                    },
                    0,
                );
            draws.extend(report.latency_ms.counts.iter().map(|c| *c as f64));
            draws.push(report.inference_count as f64);
        }
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 5.0 * (variance / n).sqrt(), "mean {mean}");
        // Var of the sample variance ~ (mu4 - sigma^4) / n; for Laplace mu4 = 6 sigma^4.
        let se_var = (5.0 * variance * variance / n).sqrt();
        assert!(
            (var - variance).abs() < 5.0 * se_var,
            "variance {var}, expected {variance}"
        );
    }
}
