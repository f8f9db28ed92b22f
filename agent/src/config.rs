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

use crate::ledger::Budget;
use crate::mqtt::Protocol;
use crate::privacy::{MechanismConfig, PrivacyError, Privatizer};
use crate::tls::TlsFiles;
use crate::window::{ModelKey, ModelSpec};

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
    /// `laplace` (default) or `gaussian`.
    pub mechanism: Option<String>,
    /// Epsilon per window, laplace (default 1.0).
    pub epsilon: Option<f64>,
    /// Rho per window, gaussian (default 0.5).
    pub rho: Option<f64>,
    /// Delta used to report (epsilon, delta) for gaussian (default 1e-6).
    pub delta: Option<f64>,
    /// zCDP rho the device may spend per budget period (default 1000).
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
        let window = file.window.unwrap_or(Duration::from_secs(60));
        let window_secs = u32::try_from(window.as_secs())
            .ok()
            .filter(|s| (1..=86_400).contains(s) && window.subsec_nanos() == 0)
            .ok_or_else(|| invalid("window", "must be whole seconds between 1s and 1d"))?;

        let p = file.privacy;
        let mechanism = match p.mechanism.as_deref().unwrap_or("laplace") {
            "laplace" => MechanismConfig::Laplace {
                epsilon: p.epsilon.unwrap_or(1.0),
            },
            "gaussian" => MechanismConfig::Gaussian {
                rho: p.rho.unwrap_or(0.5),
                delta: p.delta.unwrap_or(1e-6),
            },
            other => {
                return Err(invalid(
                    "privacy.mechanism",
                    format!("{other:?} is not laplace or gaussian"),
                ))
            }
        };
        let privatizer = Privatizer::new(mechanism)?;
        let period = p.budget_period.unwrap_or(Duration::from_secs(86_400));
        let budget = Budget {
            rho: p.budget_rho.unwrap_or(1000.0),
            period: TimeDelta::from_std(period)
                .ok()
                .filter(|d| *d > TimeDelta::zero())
                .ok_or_else(|| invalid("privacy.budget_period", "must be a positive duration"))?,
        };
        if !(budget.rho.is_finite() && budget.rho >= privatizer.rho_per_window()) {
            return Err(invalid(
                "privacy.budget_rho",
                format!(
                    "must be at least the cost of one window ({} rho)",
                    privatizer.rho_per_window()
                ),
            ));
        }

        if file.models.is_empty() {
            return Err(invalid("models", "declare at least one [[models]] entry"));
        }
        let mut models = Vec::new();
        for (i, m) in file.models.into_iter().enumerate() {
            let key = format!("models[{i}]");
            topic::check_identifier(&m.id).map_err(|e| invalid(format!("{key}.id"), e))?;
            topic::check_version(&m.version).map_err(|e| invalid(format!("{key}.version"), e))?;
            let mut spec = ModelSpec::default().with_labels(m.labels);
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
        assert_eq!(config.window_secs, 60);
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.models[1].1.custom.len(), 1);
        assert_eq!(
            config.models[0].1.labels,
            vec!["billing", "cancel", "other", "support"]
        );
        assert_eq!(config.budget.period, TimeDelta::days(1));
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
        f.privacy.budget_rho = Some(0.1);
        assert!(bad(f).contains("budget_rho"));
        let mut f = file;
        f.privacy.mechanism = Some("rappor".into());
        assert!(bad(f).contains("privacy.mechanism"));
        assert!(toml::from_str::<AgentFile>("devic_id = \"x\"").is_err());
    }
}
