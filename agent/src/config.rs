//! `run` configuration: defaults < TOML file (`--config`) < environment
//! (`DRIFTLINE_*`) < flags, with sections mirroring the modules.
//! `agent/agent.example.toml` documents every key; a test parses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::TimeDelta;
use driftline_core::broker::BrokerUrl;
use driftline_core::histogram;
use driftline_core::topic;
use serde::Deserialize;

use crate::mqtt::Protocol;
use driftline_core::wire::MAX_EVENTS_PER_WINDOW;
use driftline_pipeline::ledger::{Budget, BudgetState, Now};
use driftline_pipeline::privacy::{MechanismConfig, PrivacyError, Privatizer};
use driftline_pipeline::window::{ModelKey, ModelSpec, DEFAULT_MAX_EVENTS_PER_WINDOW};
use driftline_runtime::tls::TlsFiles;

/// The TOML file. Every key is optional except the models.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// This device's id (default: the host name).
    pub device_id: Option<String>,
    /// Fleet the device belongs to (default: `default`).
    pub fleet: Option<String>,
    /// MQTT broker, `mqtt://host:port` (default: `mqtt://127.0.0.1:1883`).
    pub broker: Option<String>,
    /// Directory for the ledger, the sequence number and the buffer
    /// (default: `/var/lib/driftline-agent`).
    pub state_dir: Option<PathBuf>,
    /// Window length (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    #[serde(default)]
    pub privacy: PrivacySection,
    #[serde(default)]
    pub mqtt: MqttSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub buffer: BufferSection,
    /// The models this device runs; only these can be recorded.
    #[serde(default)]
    pub models: Vec<ModelSection>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// `gaussian` (default) or `laplace`.
    pub mechanism: Option<String>,
    /// The guarantee per device and budget period: epsilon at `delta`
    /// (default 8). Windows that would exceed it are withheld.
    pub device_day_epsilon: Option<f64>,
    /// Delta of the device-day guarantee and of gaussian's per-window
    /// (epsilon, delta) (default 1e-6).
    pub delta: Option<f64>,
    /// Epsilon per window, laplace (default: the largest with which the
    /// period's windows of every model compose to `device_day_epsilon`).
    pub epsilon: Option<f64>,
    /// Rho per window, gaussian (default: calibrated the same way).
    pub rho: Option<f64>,
    /// Most events counted per model and window (default 10); a model's
    /// own `max_events_per_window` wins.
    pub max_events_per_window: Option<u32>,
    /// An optional second bound: zCDP rho per budget period.
    pub budget_rho: Option<f64>,
    /// Length of the rolling budget period (default 1d).
    #[serde(default, with = "humantime_serde")]
    pub budget_period: Option<Duration>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// Protocol version: "3.1.1" (default) or "5".
    pub protocol: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Keep-alive interval (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
    /// CA certificates (PEM) for mqtts:// (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for brokers that require one.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Local ingest address (default 127.0.0.1:7070). Keep it on loopback.
    pub listen: Option<SocketAddr>,
    /// Largest request body (default 1 MiB).
    pub max_body_bytes: Option<usize>,
    /// Most events per request (default 10000).
    pub max_batch: Option<usize>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferSection {
    /// Bound of the on-disk buffer (default 64 MiB).
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub id: String,
    pub version: String,
    /// Declared labels of the `label` feature (empty: no label feature).
    #[serde(default)]
    pub labels: Vec<String>,
    pub latency_ms_edges: Option<Vec<f64>>,
    pub confidence_edges: Option<Vec<f64>>,
    pub input_tokens_edges: Option<Vec<f64>>,
    pub output_tokens_edges: Option<Vec<f64>>,
    /// Custom numeric features (`[[models.custom]]`: `name`, `edges`).
    #[serde(default)]
    pub custom: Vec<CustomSection>,
    /// Most events counted per window for this model.
    pub max_events_per_window: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomSection {
    pub name: String,
    pub edges: Vec<f64>,
}

/// Errors of configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid broker address: {0}")]
    Broker(#[from] driftline_core::broker::BrokerUrlError),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("privacy: {0}")]
    Privacy(#[from] PrivacyError),
}

fn invalid(key: impl Into<String>, problem: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.to_string(),
    }
}

impl AgentFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// Values given as flags or environment variables; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub broker: Option<String>,
    pub device_id: Option<String>,
    pub fleet: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub http_listen: Option<SocketAddr>,
    /// Start with a fresh budget ledger when it is missing from a state
    /// directory that has other state (`run --reset-budget`).
    pub reset_budget: bool,
}

/// Window length unless configured: long enough that a device-day budget of
/// epsilon 8 leaves each window a useful share (docs/privacy.md).
pub const DEFAULT_WINDOW_SECS: u64 = 900;

/// Device-day epsilon unless configured (at delta 1e-6).
pub const DEFAULT_DEVICE_DAY_EPSILON: f64 = 8.0;

/// Resolves the privacy section for `models` models with `window_secs`
/// windows: the per-window mechanism (calibrated to the device-day budget
/// unless given) and the budget the ledger enforces.
fn resolve_privacy(
    p: PrivacySection,
    window_secs: u32,
    models: usize,
) -> Result<(MechanismConfig, Budget), ConfigError> {
    let delta = p.delta.unwrap_or(1e-6);
    if !(delta > 0.0 && delta < 1.0) {
        return Err(invalid(
            "privacy.delta",
            "must lie strictly between 0 and 1",
        ));
    }
    let device_day = p.device_day_epsilon.unwrap_or(DEFAULT_DEVICE_DAY_EPSILON);
    if !(device_day.is_finite() && device_day > 0.0) {
        return Err(invalid(
            "privacy.device_day_epsilon",
            "must be a finite number > 0",
        ));
    }
    let period = p.budget_period.unwrap_or(Duration::from_secs(86_400));
    // A shorter period would make `device_day_epsilon` a guarantee for less
    // than a day while every message calls it one.
    let period = TimeDelta::from_std(period)
        .ok()
        .filter(|d| *d >= TimeDelta::days(1))
        .ok_or_else(|| invalid("privacy.budget_period", "must be at least 1d"))?;
    let budget = Budget {
        epsilon: Some(device_day),
        delta,
        rho: p.budget_rho,
        period,
        window: TimeDelta::seconds(i64::from(window_secs)),
    };
    let windows = windows_per_period(period, window_secs, models);
    // A hair under the budget: the ledger charges what OpenDP's privacy map
    // reports, which may round the configured figure up.
    let target = device_day * (1.0 - 1e-9);
    let calibrated =
        |laplace| driftline_pipeline::accountant::calibrate(laplace, windows, target, delta);
    let mechanism = match p.mechanism.as_deref().unwrap_or("gaussian") {
        "laplace" => MechanismConfig::Laplace {
            epsilon: match p.epsilon {
                Some(e) => e,
                None => calibrated(true)?,
            },
        },
        "gaussian" => MechanismConfig::Gaussian {
            rho: match p.rho {
                Some(r) => r,
                None => calibrated(false)?,
            },
            delta,
        },
        other => {
            return Err(invalid(
                "privacy.mechanism",
                format!("{other:?} is not laplace or gaussian"),
            ))
        }
    };
    let privatizer = Privatizer::new(mechanism)?;
    let cost = privatizer.cost();
    if let Some(cap) = budget.rho {
        let mut one = driftline_pipeline::accountant::Spent::default();
        one.add(cost);
        if !(cap.is_finite() && one.rho() <= cap) {
            return Err(invalid(
                "privacy.budget_rho",
                format!(
                    "must be at least the cost of one window ({} rho)",
                    one.rho()
                ),
            ));
        }
    }
    let one = BudgetState::new(budget);
    let now = Now {
        wall: chrono::DateTime::UNIX_EPOCH,
        up: TimeDelta::zero(),
    };
    if one.check(now, cost).is_err() {
        return Err(invalid(
            "privacy.device_day_epsilon",
            format!(
                "a single window ({:?}) already exceeds the budget",
                privatizer.cost()
            ),
        ));
    }
    Ok((mechanism, budget))
}

pub use driftline_pipeline::accountant::windows_per_period;

/// Where the agent keeps its ledger, sequence number and buffer unless
/// told otherwise: an absolute path, so that the budget does not depend on
/// the directory the agent was started from.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/driftline-agent";

/// The resolved, validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: String,
    pub fleet: String,
    pub broker: BrokerUrl,
    pub state_dir: PathBuf,
    /// See [`Overrides::reset_budget`].
    pub reset_budget: bool,
    pub window_secs: u32,
    pub mechanism: MechanismConfig,
    pub budget: Budget,
    pub mqtt_protocol: Protocol,
    pub mqtt_username: Option<String>,
    pub mqtt_password: Option<String>,
    pub keep_alive: Duration,
    pub tls: TlsFiles,
    pub http_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub buffer_max_bytes: u64,
    pub models: Vec<(ModelKey, ModelSpec)>,
}

impl AgentConfig {
    /// Layers `over` on `file`, applies defaults, validates.
    pub fn resolve(file: AgentFile, over: Overrides) -> Result<Self, ConfigError> {
        let device_id = over
            .device_id
            .or(file.device_id)
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "device".to_owned());
        topic::check_identifier(&device_id).map_err(|e| invalid("device_id", e))?;
        let fleet = over
            .fleet
            .or(file.fleet)
            .unwrap_or_else(|| "default".to_owned());
        topic::check_identifier(&fleet).map_err(|e| invalid("fleet", e))?;
        let broker: BrokerUrl = over
            .broker
            .or(file.broker)
            .unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_owned())
            .parse()?;
        let window = file
            .window
            .unwrap_or(Duration::from_secs(DEFAULT_WINDOW_SECS));
        let window_secs = u32::try_from(window.as_secs())
            .ok()
            .filter(|s| (1..=86_400).contains(s) && window.subsec_nanos() == 0)
            .ok_or_else(|| invalid("window", "must be whole seconds between 1s and 1d"))?;

        if file.models.is_empty() {
            return Err(invalid("models", "declare at least one [[models]] entry"));
        }
        let mut models = Vec::new();
        for (i, m) in file.models.into_iter().enumerate() {
            let key = format!("models[{i}]");
            topic::check_identifier(&m.id).map_err(|e| invalid(format!("{key}.id"), e))?;
            topic::check_version(&m.version).map_err(|e| invalid(format!("{key}.version"), e))?;
            let k = m
                .max_events_per_window
                .or(file.privacy.max_events_per_window)
                .unwrap_or(DEFAULT_MAX_EVENTS_PER_WINDOW);
            if !(1..=MAX_EVENTS_PER_WINDOW).contains(&k) {
                return Err(invalid(
                    format!("{key}.max_events_per_window"),
                    format!("must be between 1 and {MAX_EVENTS_PER_WINDOW}"),
                ));
            }
            let mut spec = ModelSpec::default()
                .with_labels(m.labels)
                .with_max_events_per_window(k);
            for (name, edges, slot) in [
                (
                    "latency_ms_edges",
                    m.latency_ms_edges,
                    &mut spec.latency_ms_edges,
                ),
                (
                    "confidence_edges",
                    m.confidence_edges,
                    &mut spec.confidence_edges,
                ),
                (
                    "input_tokens_edges",
                    m.input_tokens_edges,
                    &mut spec.input_tokens_edges,
                ),
                (
                    "output_tokens_edges",
                    m.output_tokens_edges,
                    &mut spec.output_tokens_edges,
                ),
            ] {
                if let Some(edges) = edges {
                    histogram::check_edges(&edges)
                        .map_err(|e| invalid(format!("{key}.{name}"), e))?;
                    *slot = edges;
                }
            }
            if m.custom.len() > driftline_core::wire::MAX_CUSTOM_HISTOGRAMS {
                return Err(invalid(
                    format!("{key}.custom"),
                    "at most 16 custom features",
                ));
            }
            for (j, c) in m.custom.into_iter().enumerate() {
                let at = format!("{key}.custom[{j}]");
                topic::check_identifier(&c.name).map_err(|e| invalid(format!("{at}.name"), e))?;
                histogram::check_edges(&c.edges).map_err(|e| invalid(format!("{at}.edges"), e))?;
                if spec.custom.iter().any(|(n, _)| *n == c.name) {
                    return Err(invalid(at, "declared twice"));
                }
                spec.custom.push((c.name, c.edges));
            }
            for label in &spec.labels {
                topic::check_version(label).map_err(|e| invalid(format!("{key}.labels"), e))?;
            }
            let model = ModelKey::new(m.id, m.version);
            if models.iter().any(|(k, _)| *k == model) {
                return Err(invalid(key, "declared twice"));
            }
            models.push((model, spec));
        }

        let (mechanism, budget) = resolve_privacy(file.privacy, window_secs, models.len())?;

        Ok(AgentConfig {
            device_id,
            fleet,
            broker,
            state_dir: over
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            reset_budget: over.reset_budget,
            window_secs,
            mechanism,
            budget,
            mqtt_protocol: match file.mqtt.protocol.as_deref() {
                None | Some("3.1.1") => Protocol::V311,
                Some("5") => Protocol::V5,
                Some(other) => {
                    return Err(invalid(
                        "mqtt.protocol",
                        format!("{other:?} is not \"3.1.1\" or \"5\""),
                    ))
                }
            },
            mqtt_username: file.mqtt.username,
            mqtt_password: file.mqtt.password,
            keep_alive: file.mqtt.keep_alive.unwrap_or(Duration::from_secs(30)),
            tls: TlsFiles {
                ca_file: file.mqtt.ca_file,
                client_cert: file.mqtt.client_cert,
                client_key: file.mqtt.client_key,
            },
            http_listen: over
                .http_listen
                .or(file.http.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
            max_body_bytes: file.http.max_body_bytes.unwrap_or(1024 * 1024),
            max_batch: file.http.max_batch.unwrap_or(10_000),
            buffer_max_bytes: file.buffer.max_bytes.unwrap_or(64 * 1024 * 1024),
            models,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
        let file = AgentFile::load(&path).expect("example parses");
        let config = AgentConfig::resolve(file, Overrides::default()).expect("example is valid");
        assert_eq!(config.device_id, "kiosk-0007");
        assert_eq!(config.window_secs, 900);
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.models[0].1.max_events_per_window, 20);
        assert_eq!(config.models[1].1.max_events_per_window, 10);
        assert_eq!(config.models[1].1.custom.len(), 1);
        assert_eq!(
            config.models[0].1.labels,
            vec!["billing", "cancel", "other", "support"]
        );
        assert_eq!(config.budget.period, TimeDelta::days(1));
    }

    #[test]
    fn the_default_configuration_gives_at_most_epsilon_8_per_device_day() {
        let file: AgentFile = toml::from_str(
            "[[models]]\nid = \"a\"\nversion = \"1\"\n[[models]]\nid = \"b\"\nversion = \"1\"\nlabels = [\"x\"]\n",
        )
        .expect("toml");
        let c = AgentConfig::resolve(file, Overrides::default()).expect("valid");
        let r = driftline_pipeline::guarantee::Report::of(
            c.mechanism,
            &c.budget,
            c.window_secs,
            &c.models,
        )
        .expect("report");
        assert_eq!(
            r.windows_per_day,
            2 * 97,
            "two models, 15-minute windows, 96 + 1"
        );
        assert_eq!(
            r.budget.windows_granted, r.windows_per_day,
            "no window withheld"
        );
        assert!(
            r.device_day.epsilon <= 8.0 && r.device_day.epsilon > 7.9,
            "{}",
            r.device_day.epsilon
        );
        assert_eq!(r.device_day.delta, 1e-6);
        assert_eq!(r.max_events_per_window, 10);
    }

    #[test]
    fn overrides_win_and_mistakes_are_named() {
        let file: AgentFile =
            toml::from_str("device_id = \"a\"\n[[models]]\nid = \"m\"\nversion = \"1\"\n")
                .expect("toml");
        let over = Overrides {
            device_id: Some("b".into()),
            ..Overrides::default()
        };
        assert_eq!(
            AgentConfig::resolve(file.clone(), over)
                .expect("valid")
                .device_id,
            "b"
        );
        let bad = |f: AgentFile| {
            AgentConfig::resolve(f, Overrides::default())
                .expect_err("invalid")
                .to_string()
        };
        let mut f = file.clone();
        f.models.clear();
        assert!(bad(f).contains("models"));
        let mut f = file.clone();
        f.models[0].latency_ms_edges = Some(vec![5.0, 1.0]);
        assert!(bad(f).contains("models[0].latency_ms_edges"));
        let mut f = file.clone();
        f.privacy.budget_rho = Some(1e-6);
        assert!(bad(f).contains("budget_rho"));
        let mut f = file.clone();
        f.privacy.max_events_per_window = Some(0);
        assert!(bad(f).contains("models[0].max_events_per_window"));
        let mut f = file.clone();
        f.privacy.mechanism = Some("laplace".into());
        f.privacy.epsilon = Some(9.0);
        assert!(
            bad(f).contains("device_day_epsilon"),
            "one window over the budget"
        );
        let mut f = file;
        f.privacy.mechanism = Some("rappor".into());
        assert!(bad(f).contains("privacy.mechanism"));
        assert!(toml::from_str::<AgentFile>("devic_id = \"x\"").is_err());
    }
}
