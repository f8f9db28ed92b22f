//! Local differential privacy: the only place where exact counts become
//! publishable numbers.
//!
//! Unit of privacy: **one event** (one inference or one feedback) of one
//! window. Adding or removing an inference changes `inference_count`,
//! possibly `error_count`, one bucket of each of the four histograms and,
//! when the model declares labels, one label count, and one bucket of each
//! custom feature it has a value for, each by one; a feedback event changes
//! one feedback count by one. The L1 sensitivity of the whole window vector
//! is therefore `6 + (1 if labels) + (number of custom features)`.
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
use opendp::combinators::make_zCDP_to_approxDP;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{L1Distance, L2Distance};

use crate::window::{ClosedWindow, ModelKey, WindowCounts, LABEL_FEATURE};

/// Errors of the privacy module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    #[error("epsilon per window must be a finite number > 0, got {0}")]
    BadEpsilon(f64),
    #[error("rho per window must be a finite number > 0, got {0}")]
    BadRho(f64),
    #[error("delta must lie strictly between 0 and 1, got {0}")]
    BadDelta(f64),
    #[error("OpenDP refused the {step}: {message}")]
    OpenDp { step: &'static str, message: String },
}

fn opendp_error(step: &'static str) -> impl Fn(opendp::error::Error) -> PrivacyError {
    move |e| PrivacyError::OpenDp {
        step,
        message: e.to_string(),
    }
}

/// Which mechanism noises the counts, and its per-window budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MechanismConfig {
    /// Discrete Laplace, pure `epsilon`-DP per window.
    Laplace { epsilon: f64 },
    /// Discrete Gaussian, `rho`-zCDP per window; `delta` is only used to
    /// report the equivalent (epsilon, delta) guarantee on the wire.
    Gaussian { rho: f64, delta: f64 },
}

/// Turns exact windows into noised ones, spending the configured budget
/// per window.
///
/// OpenDP measurements are not `Send`, so one is built for each window (a
/// cheap constructor) rather than kept across awaits.
#[derive(Debug, Clone)]
pub struct Privatizer {
    mechanism: MechanismConfig,
}

impl Privatizer {
    /// Discrete Laplace noise with pure `epsilon`-DP per window.
    pub fn laplace(epsilon: f64) -> Result<Self, PrivacyError> {
        Privatizer::new(MechanismConfig::Laplace { epsilon })
    }

    /// A privatizer for `mechanism`, after checking its parameters.
    pub fn new(mechanism: MechanismConfig) -> Result<Self, PrivacyError> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match mechanism {
            MechanismConfig::Laplace { epsilon } if !positive(epsilon) => {
                Err(PrivacyError::BadEpsilon(epsilon))
            }
            MechanismConfig::Gaussian { rho, .. } if !positive(rho) => {
                Err(PrivacyError::BadRho(rho))
            }
            MechanismConfig::Gaussian { delta, .. } if !(positive(delta) && delta < 1.0) => {
                Err(PrivacyError::BadDelta(delta))
            }
            _ => Ok(Privatizer { mechanism }),
        }
    }

    pub fn mechanism(&self) -> MechanismConfig {
        self.mechanism
    }

    /// What one window costs in zCDP rho, for the budget ledger: `rho` for
    /// gaussian, `epsilon^2 / 2` for laplace (pure epsilon-DP implies
    /// `epsilon^2 / 2`-zCDP).
    pub fn rho_per_window(&self) -> f64 {
        match self.mechanism {
            MechanismConfig::Laplace { epsilon } => epsilon * epsilon / 2.0,
            MechanismConfig::Gaussian { rho, .. } => rho,
        }
    }

    /// The noise scale used for a window with this L1 sensitivity: the
    /// Laplace `b = Δ / epsilon`, or the Gaussian `sigma = sqrt(Δ / (2 rho))`
    /// (the L2 sensitivity is `sqrt(Δ)`: Δ counts move by one each).
    pub fn scale_for(&self, sensitivity: i64) -> f64 {
        let delta = sensitivity as f64;
        match self.mechanism {
            MechanismConfig::Laplace { epsilon } => delta / epsilon,
            MechanismConfig::Gaussian { rho, .. } => (delta / (2.0 * rho)).sqrt(),
        }
    }

    /// Adds noise to `counts` and returns them with the privacy block.
    fn noise(
        &self,
        counts: &[i64],
        sensitivity: i64,
        fields: Vec<String>,
    ) -> Result<(Vec<i64>, Privacy), PrivacyError> {
        let scale = self.scale_for(sensitivity);
        let noise_scale = fields.into_iter().map(|f| (f, scale)).collect();
        match self.mechanism {
            MechanismConfig::Laplace { .. } => {
                let m = make_laplace::<_, _, MaxDivergence>(
                    VectorDomain::new(AtomDomain::<i64>::default()),
                    L1Distance::<i64>::default(),
                    scale,
                    None,
                )
                .map_err(opendp_error("Laplace measurement"))?;
                let epsilon = m.map(&sensitivity).map_err(opendp_error("privacy map"))?;
                let noised = m
                    .invoke(&counts.to_vec())
                    .map_err(opendp_error("noise sampling"))?;
                let privacy = Privacy {
                    mechanism: Mechanism::Laplace,
                    epsilon: Some(epsilon),
                    delta: None,
                    rho: None,
                    noise_scale,
                };
                Ok((noised, privacy))
            }
            MechanismConfig::Gaussian { delta, .. } => {
                // The next f64 above sqrt(Δ), so rounding never understates it.
                let l2 = f64::from_bits((sensitivity as f64).sqrt().to_bits() + 1);
                let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    VectorDomain::new(AtomDomain::<i64>::default()),
                    L2Distance::<f64>::default(),
                    scale,
                    None,
                )
                .map_err(opendp_error("Gaussian measurement"))?;
                let rho = m.map(&l2).map_err(opendp_error("privacy map"))?;
                let noised = m
                    .invoke(&counts.to_vec())
                    .map_err(opendp_error("noise sampling"))?;
                let epsilon = make_zCDP_to_approxDP(m)
                    .and_then(|approx| approx.map(&l2))
                    .and_then(|profile| profile.epsilon(delta))
                    .map_err(opendp_error("zCDP to (epsilon, delta) conversion"))?;
                let privacy = Privacy {
                    mechanism: Mechanism::Gaussian,
                    epsilon: Some(epsilon),
                    delta: Some(delta),
                    rho: Some(rho),
                    noise_scale,
                };
                Ok((noised, privacy))
            }
        }
    }

    /// Noises every count of `window`.
    pub fn privatize(&self, window: ClosedWindow) -> Result<PrivateWindow, PrivacyError> {
        let c = &window.counts;
        let spec = &c.spec;
        let mut fields: Vec<String> = wire::STANDARD_NOISED_FIELDS.map(str::to_owned).to_vec();
        if !spec.labels.is_empty() {
            fields.push(format!("categories.{LABEL_FEATURE}"));
        }
        fields.extend(spec.custom.iter().map(|(name, _)| format!("custom.{name}")));
        let (noised, privacy) = self.noise(&flatten(c), sensitivity(c), fields)?;
        let mut values = noised.into_iter();
        let mut next = |n: usize| -> Vec<i64> { values.by_ref().take(n).collect() };
        let head = next(5);
        let hist = |edges: &[f64], counts: Vec<i64>| Histogram {
            edges: edges.to_vec(),
            counts,
        };
        let latency_ms = hist(&spec.latency_ms_edges, next(c.latency_ms.len()));
        let confidence = hist(&spec.confidence_edges, next(c.confidence.len()));
        let input_tokens = hist(&spec.input_tokens_edges, next(c.input_tokens.len()));
        let output_tokens = hist(&spec.output_tokens_edges, next(c.output_tokens.len()));
        let mut categories = BTreeMap::new();
        if !spec.labels.is_empty() {
            let counts = next(spec.labels.len());
            categories.insert(
                LABEL_FEATURE.to_owned(),
                spec.labels.iter().cloned().zip(counts).collect(),
            );
        }
        let custom = spec
            .custom
            .iter()
            .zip(&c.custom)
            .map(|((name, edges), counts)| (name.clone(), hist(edges, next(counts.len()))))
            .collect();
        let get = |i: usize| head.get(i).copied().unwrap_or(0);
        Ok(PrivateWindow {
            model: window.model,
            window_start: window.window_start,
            window_secs: window.window_secs,
            privacy,
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
            custom,
            categories,
        })
    }
}

/// L1 sensitivity of a window vector to one event (module docs).
fn sensitivity(c: &WindowCounts) -> i64 {
    6 + i64::from(!c.spec.labels.is_empty()) + c.spec.custom.len() as i64
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
    for h in &c.custom {
        v.extend_from_slice(h);
    }
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
    custom: BTreeMap<String, Histogram>,
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
            custom: self.custom,
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
        let m = w.register(
            ModelKey::new("m", "1"),
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
                custom: &[],
            };
            m.record(&e);
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
    fn custom_features_are_noised_and_declared() {
        let at: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().expect("ts");
        let mut w = Windower::new(60, at);
        let m = w.register(
            ModelKey::new("m", "1"),
            &ModelSpec::default().with_custom("brightness", &[0.0, 0.5, 1.0]),
        );
        m.record(&InferenceEvent {
            custom: &[0.7],
            ..InferenceEvent::default()
        });
        let p = Privatizer::laplace(1.0).expect("privatizer");
        let report = p
            .privatize(w.close_due(at + chrono::TimeDelta::seconds(60)).remove(0))
            .expect("noised")
            .into_report(&device(), 0);
        report.validate().expect("valid message");
        assert_eq!(report.custom["brightness"].counts.len(), 2);
        assert_eq!(
            report.privacy.noise_scale["custom.brightness"], 7.0,
            "sensitivity 6 + 1 custom"
        );
    }

    #[test]
    fn bad_epsilon_is_refused() {
        assert_eq!(
            Privatizer::laplace(0.0).err(),
            Some(PrivacyError::BadEpsilon(0.0))
        );
        assert!(Privatizer::laplace(f64::NAN).is_err());
    }

    fn device() -> DeviceIdentity {
        DeviceIdentity {
            device_id: "d".into(),
            fleet: "f".into(),
            agent_version: "0".into(),
        }
    }

    /// Noise draws from empty windows (so each count is pure noise).
    fn draws(p: &Privatizer, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n + 20);
        while out.len() < n {
            let report = p
                .privatize(closed_window(&[], 0))
                .expect("noised")
                .into_report(&device(), 0);
            out.extend(report.latency_ms.counts.iter().map(|c| *c as f64));
            out.push(report.inference_count as f64);
        }
        out
    }

    /// Sample mean and variance must match the distribution's within 5
    /// standard errors (a false failure has probability ~1e-6).
    /// `kurtosis` is mu4 / sigma^4 (6 for Laplace, 3 for Gaussian).
    fn assert_moments(draws: &[f64], variance: f64, kurtosis: f64) {
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 5.0 * (variance / n).sqrt(), "mean {mean}");
        let se_var = ((kurtosis - 1.0) * variance * variance / n).sqrt();
        assert!(
            (var - variance).abs() < 5.0 * se_var,
            "variance {var}, expected {variance}"
        );
    }

    #[test]
    fn laplace_noise_matches_its_scale() {
        // Discrete Laplace with scale b: variance 2q / (1 - q)^2, q = e^(-1/b).
        let p = Privatizer::laplace(2.0).expect("privatizer");
        let b = p.scale_for(6);
        assert_eq!(b, 3.0);
        let q = (-1.0 / b).exp();
        assert_moments(&draws(&p, 40_000), 2.0 * q / (1.0 - q).powi(2), 6.0);
    }

    #[test]
    fn gaussian_noise_matches_its_scale_and_reports_rho() {
        let p = Privatizer::new(MechanismConfig::Gaussian {
            rho: 0.5,
            delta: 1e-6,
        })
        .expect("privatizer");
        let sigma = p.scale_for(6);
        assert!((sigma - 6f64.sqrt()).abs() < 1e-12);
        // The discrete Gaussian's variance equals sigma^2 up to e^(-2 pi^2 sigma^2).
        assert_moments(&draws(&p, 40_000), sigma * sigma, 3.0);

        let report = p
            .privatize(closed_window(&["cat"], 5))
            .expect("noised")
            .into_report(&device(), 3);
        report.validate().expect("valid message");
        assert_eq!(report.privacy.mechanism, Mechanism::Gaussian);
        let rho = report.privacy.rho.expect("rho");
        assert!((rho - 0.5).abs() < 1e-9, "rho {rho}");
        let eps = report.privacy.epsilon.expect("epsilon");
        // rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP; OpenDP's
        // conversion is at least that tight.
        let classic = 0.5 + 2.0 * (0.5 * (1e6f64).ln()).sqrt();
        assert!(eps > 0.5 && eps <= classic, "epsilon {eps}");
        assert_eq!(report.privacy.delta, Some(1e-6));
    }

    #[test]
    fn bad_gaussian_parameters_are_refused() {
        assert_eq!(
            Privatizer::new(MechanismConfig::Gaussian {
                rho: -1.0,
                delta: 1e-6
            })
            .err(),
            Some(PrivacyError::BadRho(-1.0))
        );
        assert_eq!(
            Privatizer::new(MechanismConfig::Gaussian {
                rho: 1.0,
                delta: 1.0
            })
            .err(),
            Some(PrivacyError::BadDelta(1.0))
        );
    }
}
