//! Local differential privacy: the only place where exact counts become
//! publishable numbers.
//!
//! Unit of privacy: **everything one device recorded in one window**, and,
//! through the budget ledger, in one day (docs/privacy.md). One event (an
//! inference or a feedback) changes at most `Δ1 = 6 + (1 if labels) +
//! (number of custom features)` counts by one each: `inference_count`,
//! possibly `error_count`, one bucket of each of the four histograms, one
//! label count, one bucket per custom feature; a feedback changes one
//! feedback count. A window counts at most `K = max_events_per_window`
//! events ([`crate::window`]), so removing all of a device's events from a
//! window changes the vector by at most `K Δ1` in L1 norm and `K sqrt(Δ1)`
//! in L2 norm (all `K` events in the same buckets).
//!
//! The vector is released with OpenDP's `make_laplace` (`L1Distance`,
//! discrete Laplace) or `make_gaussian` (`L2Distance`, discrete Gaussian)
//! over `VectorDomain<AtomDomain<i64>>`, which sample exactly (no
//! floating-point leaks) from OpenSSL's CSPRNG. The scale is calibrated to
//! the window's sensitivity, and the epsilon or rho written on the wire is
//! what OpenDP's privacy map reports for it, not a formula of ours.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use driftline_core::wire::{self, Histogram, Mechanism, Privacy, WindowReport};
use opendp::combinators::make_zCDP_to_approxDP;
use opendp::core::Measurement;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{L1Distance, L2Distance};

use crate::accountant::Cost;
use crate::window::{ClosedWindow, ModelKey, ModelSpec, WindowCounts, LABEL_FEATURE};

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
    /// The device-day guarantee `(epsilon, delta)` stamped on every message.
    device_day: Option<(f64, f64)>,
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
            _ => Ok(Privatizer {
                mechanism,
                device_day: None,
            }),
        }
    }

    /// The privatizer that also declares the device-day guarantee
    /// `(epsilon, delta)` in every message.
    pub fn with_device_day(mut self, epsilon: f64, delta: f64) -> Self {
        self.device_day = Some((epsilon, delta));
        self
    }

    pub fn mechanism(&self) -> MechanismConfig {
        self.mechanism
    }

    /// What one window costs as configured (OpenDP's privacy map may round
    /// it up by a hair: the ledger charges [`Privatizer::cost_of`]).
    pub fn cost(&self) -> Cost {
        match self.mechanism {
            MechanismConfig::Laplace { epsilon } => Cost::Laplace { epsilon },
            MechanismConfig::Gaussian { rho, .. } => Cost::Gaussian { rho },
        }
    }

    /// The noise scale of a window whose events each move `per_event`
    /// counts by one, with at most `k` events: the Laplace `b = k Δ1 /
    /// epsilon` or the Gaussian `sigma = k sqrt(Δ1) / sqrt(2 rho)`.
    pub fn scale_for(&self, per_event: i64, k: u32) -> f64 {
        match self.mechanism {
            MechanismConfig::Laplace { epsilon } => l1_sensitivity(per_event, k) / epsilon,
            MechanismConfig::Gaussian { rho, .. } => {
                l2_sensitivity(per_event, k) / (2.0 * rho).sqrt()
            }
        }
    }

    /// What releasing `window` costs, as OpenDP's privacy map reports it
    /// for the window's sensitivity: what the ledger charges before the
    /// window is noised.
    pub fn cost_of(&self, window: &ClosedWindow) -> Result<Cost, PrivacyError> {
        let spec = &window.counts.spec;
        self.cost_for(per_event_sensitivity(spec), spec.max_events_per_window)
    }

    /// OpenDP's privacy map of the mechanism for a window of `k` events
    /// that move `per_event` counts each.
    pub fn cost_for(&self, per_event: i64, k: u32) -> Result<Cost, PrivacyError> {
        let scale = self.scale_for(per_event, k);
        let map = opendp_error("privacy map");
        match self.mechanism {
            MechanismConfig::Laplace { .. } => {
                let epsilon = laplace(scale)?
                    .map(&(i64::from(k) * per_event))
                    .map_err(map)?;
                Ok(Cost::Laplace { epsilon })
            }
            MechanismConfig::Gaussian { .. } => {
                let rho = gaussian(scale)?
                    .map(&l2_sensitivity(per_event, k))
                    .map_err(map)?;
                Ok(Cost::Gaussian { rho })
            }
        }
    }

    /// Adds noise to `counts` and returns them with the privacy block.
    fn noise(
        &self,
        counts: &[i64],
        per_event: i64,
        k: u32,
        fields: Vec<String>,
    ) -> Result<(Vec<i64>, Privacy), PrivacyError> {
        let scale = self.scale_for(per_event, k);
        let noise_scale = fields.into_iter().map(|f| (f, scale)).collect();
        let (device_day_epsilon, device_day_delta) = self.device_day.unzip();
        match self.mechanism {
            MechanismConfig::Laplace { .. } => {
                let m = laplace(scale)?;
                let l1 = i64::from(k) * per_event;
                let epsilon = m.map(&l1).map_err(opendp_error("privacy map"))?;
                let noised = m
                    .invoke(&counts.to_vec())
                    .map_err(opendp_error("noise sampling"))?;
                let privacy = Privacy {
                    mechanism: Mechanism::Laplace,
                    epsilon: Some(epsilon),
                    delta: None,
                    rho: None,
                    noise_scale,
                    max_events_per_window: Some(k),
                    device_day_epsilon,
                    device_day_delta,
                };
                Ok((noised, privacy))
            }
            MechanismConfig::Gaussian { delta, .. } => {
                let l2 = l2_sensitivity(per_event, k);
                let m = gaussian(scale)?;
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
                    max_events_per_window: Some(k),
                    device_day_epsilon,
                    device_day_delta,
                };
                Ok((noised, privacy))
            }
        }
    }

    /// Noises every count of `window`.
    pub(crate) fn privatize(&self, window: ClosedWindow) -> Result<PrivateWindow, PrivacyError> {
        let c = &window.counts;
        let spec = &c.spec;
        let mut fields: Vec<String> = wire::STANDARD_NOISED_FIELDS.map(str::to_owned).to_vec();
        if !spec.labels.is_empty() {
            fields.push(format!("categories.{LABEL_FEATURE}"));
        }
        fields.extend(spec.custom.iter().map(|(name, _)| format!("custom.{name}")));
        let (noised, privacy) = self.noise(
            &flatten(c),
            per_event_sensitivity(&c.spec),
            c.spec.max_events_per_window,
            fields,
        )?;
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

/// The window vector with discrete Laplace noise of scale `scale`.
fn laplace(
    scale: f64,
) -> Result<Measurement<Counts, L1Distance<i64>, MaxDivergence, Vec<i64>>, PrivacyError> {
    make_laplace(
        Counts::new(AtomDomain::default()),
        L1Distance::default(),
        scale,
        None,
    )
    .map_err(opendp_error("Laplace measurement"))
}

/// The window vector with discrete Gaussian noise of scale `scale`.
fn gaussian(
    scale: f64,
) -> Result<Measurement<Counts, L2Distance<f64>, ZeroConcentratedDivergence, Vec<i64>>, PrivacyError>
{
    make_gaussian(
        Counts::new(AtomDomain::default()),
        L2Distance::default(),
        scale,
        None,
    )
    .map_err(opendp_error("Gaussian measurement"))
}

/// OpenDP's domain of a window's counts.
type Counts = VectorDomain<AtomDomain<i64>>;

/// How many counts one event moves by one (module docs): the L1
/// sensitivity of a window to one event.
pub fn per_event_sensitivity(spec: &ModelSpec) -> i64 {
    6 + i64::from(!spec.labels.is_empty()) + spec.custom.len() as i64
}

/// L1 sensitivity of a window to all of its (at most `k`) events.
pub fn l1_sensitivity(per_event: i64, k: u32) -> f64 {
    (i64::from(k) * per_event) as f64
}

/// L2 sensitivity of a window to all of its (at most `k`) events: `k
/// sqrt(Δ1)`, rounded up to the next f64 so that it is never understated.
pub fn l2_sensitivity(per_event: i64, k: u32) -> f64 {
    let l2 = f64::from(k) * (per_event as f64).sqrt();
    f64::from_bits(l2.to_bits() + 1)
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
    use crate::window::Windower;

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
        // K = 10 events of 7 counts each: b = 70 / epsilon.
        assert_eq!(report.privacy.noise_scale["latency_ms"], 70.0);
        assert_eq!(report.privacy.max_events_per_window, Some(10));
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
            report.privacy.noise_scale["custom.brightness"], 70.0,
            "K = 10 events of sensitivity 6 + 1 custom"
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
        let b = p.scale_for(6, 10);
        assert_eq!(b, 30.0);
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
        // L2 sensitivity K sqrt(6) = 10 sqrt(6), rho 0.5: sigma = 10 sqrt(6).
        let sigma = p.scale_for(6, 10);
        assert!((sigma - 10.0 * 6f64.sqrt()).abs() < 1e-9);
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

    /// A model with two buckets per histogram, so that an audit draws few
    /// values per window.
    fn small_window(events: usize, k: u32) -> ClosedWindow {
        let at: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().expect("ts");
        let mut w = Windower::new(60, at);
        let edges = vec![0.0, 1.0, 2.0];
        let spec = ModelSpec {
            latency_ms_edges: edges.clone(),
            confidence_edges: edges.clone(),
            input_tokens_edges: edges.clone(),
            output_tokens_edges: edges,
            ..ModelSpec::default()
        }
        .with_max_events_per_window(k);
        let m = w.register(ModelKey::new("m", "1"), &spec);
        for _ in 0..events {
            m.record(&InferenceEvent {
                latency_ms: 1.5,
                input_tokens: 1,
                output_tokens: 1,
                confidence: Some(1.5),
                error: true,
                label: None,
                custom: &[],
            });
        }
        w.close_due(at + chrono::TimeDelta::seconds(60)).remove(0)
    }

    /// An empirical lower bound on the epsilon of `p` for one device's
    /// window, from `n` releases of two neighbouring windows: empty, and
    /// full (K events, all in the same buckets, so every touched count
    /// moves by K). The test event is "every touched count is at least K",
    /// where the Laplace likelihood ratio is largest (exactly e^epsilon);
    /// its probabilities get one-sided Wilson bounds at z = 4, so the
    /// bound exceeds the true epsilon with probability below 1e-4.
    fn audit_lower_bound(p: &Privatizer, k: u32, n: usize) -> f64 {
        let touched = |r: &WindowReport| {
            [
                r.inference_count,
                r.error_count,
                r.latency_ms.counts[1],
                r.confidence.counts[1],
                r.input_tokens.counts[1],
                r.output_tokens.counts[1],
            ]
        };
        let hits = |events: usize| {
            (0..n)
                .filter(|_| {
                    let r = p
                        .privatize(small_window(events, k))
                        .expect("noised")
                        .into_report(&device(), 0);
                    touched(&r).iter().all(|c| *c >= i64::from(k))
                })
                .count() as f64
        };
        let (full, empty) = (hits(k as usize), hits(0));
        let z = 4.0f64;
        let nf = n as f64;
        let wilson = |x: f64, sign: f64| {
            let p = x / nf;
            let centre = p + z * z / (2.0 * nf);
            let spread = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt();
            (centre + sign * spread) / (1.0 + z * z / nf)
        };
        (wilson(full, -1.0) / wilson(empty, 1.0)).ln()
    }

    #[test]
    fn an_empirical_audit_stays_under_the_claimed_epsilon_and_catches_a_halved_scale() {
        let k = 2;
        let claimed = 1.0;
        let honest = Privatizer::laplace(claimed).expect("privatizer");
        let lower = audit_lower_bound(&honest, k, 20_000);
        assert!(
            lower <= claimed,
            "the audit found epsilon >= {lower} for a claim of {claimed}"
        );
        assert!(
            lower > 0.2,
            "the audit is too weak to catch anything: {lower}"
        );
        // Half the noise scale: the same claim, but twice the real epsilon.
        let broken = Privatizer::laplace(2.0 * claimed).expect("privatizer");
        let lower = audit_lower_bound(&broken, k, 20_000);
        assert!(
            lower > claimed,
            "a halved scale went unnoticed: lower bound {lower}"
        );
    }
}
