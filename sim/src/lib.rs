//! The fleet simulator: N virtual devices, each a full agent pipeline
//! (own windows, own privacy noise, own `seq`, own MQTT connection), each
//! running M models with synthetic but plausible distributions, and an
//! optional injected drift. It is the load generator for tests, benchmarks
//! and the demo.
//!
//! Event time is synthetic: window `w` starts at `start + w * window_secs`.
//! Without `live`, windows are published as fast as the broker takes them;
//! with `live`, a window is published only once it has ended in wall time,
//! so a `start` in the past backfills quickly and then the fleet goes on at
//! the pace of the clock. The events are reproducible from `seed`; the
//! privacy noise is not, by design (it comes from a CSPRNG).

pub mod publish;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use driftline_core::broker::BrokerUrl;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, LogNormal, Poisson};
use tokio_util::sync::CancellationToken;

use crate::publish::{PublishError, Publisher};
use driftline_pipeline::event::{Feedback, InferenceEvent};
use driftline_pipeline::guarantee::Report;
use driftline_pipeline::ledger::{Budget, Ledger};
use driftline_pipeline::privacy::{
    DeviceIdentity, MechanismConfig, PrivacyError, PrivateWindow, Privatizer,
};
use driftline_pipeline::release::{release, ReleaseError, Released};
use driftline_pipeline::window::{ModelHandle, ModelKey, ModelSpec, Windower};
use driftline_runtime::tls::TlsFiles;

/// Labels of the simulated models' `label` feature.
pub const LABELS: [&str; 4] = ["billing", "cancel", "support", "other"];
const LABEL_WEIGHTS: [f64; 4] = [0.4, 0.2, 0.3, 0.1];

/// What an injected drift shifts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftKind {
    /// Input size grows by the relative size.
    Input,
    /// Output confidence drops by the relative size.
    Confidence,
    /// Latency grows by the relative size.
    Latency,
    /// The error rate grows by the relative size.
    Errors,
    /// The negative-feedback rate grows by the relative size.
    Feedback,
}

impl FromStr for DriftKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "input" => DriftKind::Input,
            "confidence" => DriftKind::Confidence,
            "latency" => DriftKind::Latency,
            "errors" => DriftKind::Errors,
            "feedback" => DriftKind::Feedback,
            other => {
                return Err(format!(
                    "unknown drift kind {other:?} (input, confidence, latency, errors, feedback)"
                ))
            }
        })
    }
}

/// A drift injected from window index `at` on, for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    pub at: u64,
    pub model_id: String,
    pub kind: DriftKind,
    /// Relative size, e.g. 0.3 for +30 %.
    pub size: f64,
}

/// Everything a simulation run needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub broker: BrokerUrl,
    pub fleet: String,
    pub devices: u32,
    pub models: u32,
    /// Windows per device; `None` runs until cancelled (needs `live`).
    pub windows: Option<u64>,
    pub window_secs: u32,
    pub start: DateTime<Utc>,
    pub seed: u64,
    /// Privacy mechanism and per-window budget of every device.
    pub mechanism: MechanismConfig,
    /// Mean inferences per model and window on each device.
    pub events_per_window: f64,
    pub drift: Option<Drift>,
    pub live: bool,
    /// Each device's privacy budget (kept in memory); windows over it are
    /// withheld, as on a real device.
    pub budget: Budget,
    /// Most events each device counts per model and window.
    pub max_events_per_window: u32,
    /// Index of the first device: devices are `sim-{first_device}` on, so
    /// that two runs can simulate two parts of one fleet.
    pub first_device: u32,
    /// Broker login (username, password) of the virtual devices; `{fleet}`
    /// and `{device}` in the username become each device's own, so that
    /// every device logs in as itself (`{fleet}/{device}` matches the
    /// broker ACL of deploy/mosquitto).
    pub credentials: Option<(String, String)>,
    /// TLS files for an mqtts:// broker.
    pub tls: TlsFiles,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimSummary {
    pub published: u64,
    pub acknowledged: u64,
    /// Windows not published because a device's budget was spent.
    pub withheld: u64,
}

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("device {device}: {source}")]
    Publish {
        device: String,
        source: Box<PublishError>,
    },
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("invalid simulation: {0}")]
    Config(String),
    #[error("a device task failed: {0}")]
    Task(String),
}

/// Live counters, for progress reports while a run goes on.
#[derive(Debug, Default)]
pub struct SimProgress {
    pub published: AtomicU64,
    /// Devices whose event time reached the present (live runs).
    pub caught_up: AtomicU64,
}

/// Runs the fleet until every device published its windows (or `cancel`
/// fires) and the broker acknowledged every message.
pub async fn run(
    config: SimConfig,
    progress: Arc<SimProgress>,
    cancel: CancellationToken,
) -> Result<SimSummary, SimError> {
    if config.windows.is_none() && !config.live {
        return Err(SimError::Config(
            "without --windows the simulation must be live".into(),
        ));
    }
    let config = Arc::new(config);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..config.devices {
        let (config, progress, cancel) = (config.clone(), progress.clone(), cancel.clone());
        tasks.spawn(async move { run_device(index, &config, &progress, &cancel).await });
    }
    let mut summary = SimSummary::default();
    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(s)) => {
                summary.published += s.published;
                summary.acknowledged += s.acknowledged;
                summary.withheld += s.withheld;
            }
            Ok(Err(e)) => {
                cancel.cancel();
                first_error.get_or_insert(e);
            }
            Err(e) => {
                cancel.cancel();
                first_error.get_or_insert(SimError::Task(e.to_string()));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// Device ids of the simulated fleet: `sim-00000`, `sim-00001`, ...
pub fn device_id(index: u32) -> String {
    format!("sim-{index:05}")
}

/// One simulated device: its models, randomness, privatizer and budget.
/// [`DeviceSim::window`] records a window's synthetic events and returns
/// what the device would publish, without any network: [`run`] publishes
/// it, benchmarks hand it to the collector's ingest directly.
pub struct DeviceSim {
    identity: DeviceIdentity,
    rng: ChaCha8Rng,
    windower: Windower,
    privatizer: Privatizer,
    ledger: Ledger,
    models: Vec<(String, ModelHandle, ModelProfile)>,
    start: DateTime<Utc>,
    length: TimeDelta,
    events_per_window: f64,
    drift: Option<Drift>,
    withheld: u64,
}

impl DeviceSim {
    /// Device `index` of the fleet `config` describes.
    pub fn new(index: u32, config: &SimConfig) -> Result<Self, SimError> {
        let mut windower = Windower::new(config.window_secs, config.start);
        let spec = ModelSpec::default()
            .with_labels(LABELS)
            .with_max_events_per_window(config.max_events_per_window);
        let keys: Vec<_> = (0..config.models)
            .map(|m| (ModelKey::new(format!("model-{m}"), "1.0.0"), spec.clone()))
            .collect();
        let guarantee = Report::of(config.mechanism, &config.budget, config.window_secs, &keys)?;
        let models = keys
            .iter()
            .zip(0..)
            .map(|((key, spec), m)| {
                let handle = windower.register(key.clone(), spec);
                (key.model_id.clone(), handle, ModelProfile::new(m))
            })
            .collect();
        Ok(DeviceSim {
            identity: DeviceIdentity {
                device_id: device_id(config.first_device.saturating_add(index)),
                fleet: config.fleet.clone(),
                agent_version: driftline_pipeline::AGENT_VERSION.to_owned(),
            },
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ (u64::from(index) << 20)),
            windower,
            privatizer: Privatizer::new(config.mechanism)?
                .with_device_day(guarantee.device_day.epsilon, guarantee.device_day.delta),
            ledger: Ledger::in_memory(config.budget),
            models,
            start: config.start,
            length: TimeDelta::seconds(i64::from(config.window_secs)),
            events_per_window: config.events_per_window,
            drift: config.drift.clone(),
            withheld: 0,
        })
    }

    pub fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    /// When window `w` (counted from the start) ends.
    pub fn window_end(&self, w: u64) -> DateTime<Utc> {
        self.start + self.length * i32::try_from(w + 1).unwrap_or(i32::MAX)
    }

    /// Windows not published because the budget was spent.
    pub fn withheld(&self) -> u64 {
        self.withheld
    }

    /// Records window `w`'s events and returns the closed windows, noised;
    /// a window over the device's budget is withheld (and counted).
    pub fn window(&mut self, w: u64) -> Result<Vec<PrivateWindow>, SimError> {
        for (model_id, handle, profile) in &self.models {
            let drift = self
                .drift
                .as_ref()
                .filter(|d| w >= d.at && &d.model_id == model_id)
                .map(|d| (d.kind, d.size));
            for _ in 0..profile.event_count(&mut self.rng, self.events_per_window) {
                let (event, feedback) = profile.sample(&mut self.rng, drift);
                handle.record(&event);
                if let Some(f) = feedback {
                    handle.feedback(f);
                }
            }
        }
        let end = self.window_end(w);
        let mut out = Vec::new();
        for closed in self.windower.close_due(end) {
            // Synthetic time is the only clock here: uptime follows it.
            match release(&self.privatizer, &mut self.ledger, closed, end - self.start)? {
                Released::Window(private) => out.push(*private),
                Released::Withheld { .. } => self.withheld += 1,
            }
        }
        Ok(out)
    }
}

async fn run_device(
    index: u32,
    config: &SimConfig,
    progress: &SimProgress,
    cancel: &CancellationToken,
) -> Result<SimSummary, SimError> {
    let mut sim = DeviceSim::new(index, config)?;
    let publish_error = |source: PublishError| SimError::Publish {
        device: device_id(config.first_device.saturating_add(index)),
        source: Box::new(source),
    };
    let identity = sim.identity().clone();
    let login = config.credentials.as_ref().map(|(user, password)| {
        let user = user
            .replace("{fleet}", &identity.fleet)
            .replace("{device}", &identity.device_id);
        (user, password.clone())
    });
    let mut publisher = Publisher::connect(&config.broker, identity, 0, login, &config.tls)
        .map_err(publish_error)?;
    let mut w: u64 = 0;
    let mut live = false;
    while config.windows.is_none_or(|n| w < n) && !cancel.is_cancelled() {
        if config.live {
            let wait = (sim.window_end(w) - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            if !wait.is_zero() && !live {
                live = true;
                progress.caught_up.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => break,
            }
        }
        for private in sim.window(w)? {
            publisher.publish(private).await.map_err(publish_error)?;
            progress.published.fetch_add(1, Ordering::Relaxed);
        }
        w += 1;
    }
    let published = publisher.published();
    // A broker that is down is waited for (the client keeps reconnecting)
    // until every message is acknowledged; once cancelled, for 30 s more.
    if !cancel.is_cancelled() {
        tokio::select! {
            _ = publisher.wait_acked(Duration::from_secs(24 * 3600)) => {}
            _ = cancel.cancelled() => {}
        }
    }
    let acknowledged = publisher
        .finish(Duration::from_secs(30))
        .await
        .map_err(publish_error)?;
    Ok(SimSummary {
        published,
        acknowledged,
        withheld: sim.withheld(),
    })
}

/// Synthetic behaviour of model `model-{m}`: a classifier whose latency,
/// size and confidence distributions differ a little per model.
#[derive(Debug, Clone)]
struct ModelProfile {
    latency_median_ms: f64,
    input_median: f64,
    output_median: f64,
    error_rate: f64,
    feedback_rate: f64,
    negative_share: f64,
}

impl ModelProfile {
    fn new(m: u32) -> Self {
        let m = f64::from(m);
        ModelProfile {
            latency_median_ms: 40.0 * (1.0 + 0.5 * m),
            input_median: 60.0 + 20.0 * m,
            output_median: 20.0 + 5.0 * m,
            error_rate: 0.02,
            feedback_rate: 0.1,
            negative_share: 0.2,
        }
    }

    fn event_count(&self, rng: &mut ChaCha8Rng, mean: f64) -> u64 {
        match Poisson::new(mean.max(1e-9)) {
            Ok(p) => p.sample(rng) as u64,
            Err(_) => 0,
        }
    }

    fn sample(
        &self,
        rng: &mut ChaCha8Rng,
        drift: Option<(DriftKind, f64)>,
    ) -> (InferenceEvent<'static>, Option<Feedback>) {
        let factor = |kind: DriftKind| match drift {
            Some((k, size)) if k == kind => 1.0 + size,
            _ => 1.0,
        };
        let lognormal = |median: f64, sigma: f64, rng: &mut ChaCha8Rng| {
            LogNormal::new(median.ln(), sigma).map_or(median, |d| d.sample(rng))
        };
        let latency_ms = lognormal(
            self.latency_median_ms * factor(DriftKind::Latency),
            0.5,
            rng,
        );
        let input_tokens = lognormal(self.input_median * factor(DriftKind::Input), 0.8, rng);
        let output_tokens = lognormal(self.output_median, 0.6, rng);
        let confidence = Beta::new(8.0, 2.0).map_or(0.8, |d| d.sample(rng))
            * (2.0 - factor(DriftKind::Confidence));
        let error = rng.random_bool((self.error_rate * factor(DriftKind::Errors)).clamp(0.0, 1.0));
        let mut pick = rng.random::<f64>();
        let mut label = LABELS[LABELS.len() - 1];
        for (l, w) in LABELS.iter().zip(LABEL_WEIGHTS) {
            if pick < w {
                label = l;
                break;
            }
            pick -= w;
        }
        let feedback = rng.random_bool(self.feedback_rate).then(|| {
            let negative = (self.negative_share * factor(DriftKind::Feedback)).clamp(0.0, 1.0);
            let r = rng.random::<f64>();
            if r < negative {
                Feedback::Negative
            } else if r < negative + 0.05 {
                Feedback::Correction
            } else {
                Feedback::Positive
            }
        });
        let event = InferenceEvent {
            latency_ms,
            input_tokens: input_tokens.round().clamp(0.0, f64::from(u32::MAX)) as u32,
            output_tokens: output_tokens.round().clamp(0.0, f64::from(u32::MAX)) as u32,
            confidence: Some(confidence.clamp(0.0, 1.0)),
            error,
            label: Some(label),
            custom: &[],
        };
        (event, feedback)
    }
}
