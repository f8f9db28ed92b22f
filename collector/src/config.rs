//! `serve` configuration: defaults < TOML file (`--config`) < environment
//! (`DRIFTLINE_*`) < flags. clap resolves flag-or-env; [`ServeFile`] holds
//! the file; [`ServeConfig::resolve`] layers them over the defaults.
//! `collector/collector.example.toml` documents every key and is parsed by
//! a test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::TimeDelta;
use driftline_core::broker::BrokerUrl;
use driftline_runtime::tls::TlsFiles;
use serde::Deserialize;

use crate::endpoint::EndpointOptions;
use crate::ingest::IngestLimits;
use crate::subscriber::{Credentials, SubscriberOptions};

/// Default lake directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "driftline-data";

/// The TOML file: every key is optional and named like its flag.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    /// MQTT broker, `mqtt://host:port`.
    pub broker: Option<String>,
    /// Lake directory (with `lake`: the local state directory).
    pub data_dir: Option<PathBuf>,
    /// The lake on an object store, `s3://bucket/prefix` (default: the
    /// data directory).
    pub lake: Option<String>,
    /// MQTT client id; the broker keeps the session under it.
    pub client_id: Option<String>,
    /// How often pending rows are written to the lake.
    #[serde(default, with = "humantime_serde")]
    pub flush_interval: Option<Duration>,
    /// Pending rows that trigger an early flush.
    pub flush_rows: Option<usize>,
    /// Oldest accepted window, relative to reception.
    #[serde(default, with = "humantime_serde")]
    pub max_event_age: Option<Duration>,
    /// How far in the future a window may end (clock skew).
    #[serde(default, with = "humantime_serde")]
    pub max_future_skew: Option<Duration>,
    /// Quarantine rows kept per device and hour; further refused messages
    /// of that device and hour are counted only.
    pub quarantine_quota: Option<u32>,
    /// CA certificates (PEM) for mqtts:// (default: the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that require one.
    pub tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub tls_client_key: Option<PathBuf>,
    /// Broker login.
    pub mqtt_username: Option<String>,
    pub mqtt_password: Option<String>,
    /// MQTT shared-subscription group, for several collectors on one stream.
    pub share_group: Option<String>,
    /// How often partitions with many small files are compacted.
    #[serde(default, with = "humantime_serde")]
    pub compact_interval: Option<Duration>,
    /// Files a partition needs before it is compacted.
    pub compact_min_files: Option<usize>,
    /// Partitions older than this are deleted (default: kept forever).
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// SQL endpoint address.
    pub pg_listen: Option<SocketAddr>,
    /// SQL endpoint login (one user).
    pub pg_user: Option<String>,
    pub pg_password: Option<String>,
    /// More SQL users, name = password (file only).
    pub pg_users: Option<BTreeMap<String, String>>,
    /// PEM certificate and key: the endpoint offers TLS.
    pub pg_tls_cert: Option<PathBuf>,
    pub pg_tls_key: Option<PathBuf>,
    pub pg_max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub pg_statement_timeout: Option<Duration>,
    /// Memory all SQL queries together may use, in MiB.
    pub pg_memory_mb: Option<usize>,
    /// The largest value one SQL function call may build, in MiB.
    pub pg_max_value_mb: Option<usize>,
    /// How long a SQL client has to log in.
    #[serde(default, with = "humantime_serde")]
    pub pg_login_timeout: Option<Duration>,
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
    #[error("{key} must be {expected}")]
    Invalid {
        key: &'static str,
        expected: &'static str,
    },
}

impl ServeFile {
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

    /// `self` with every key that `over` sets replaced.
    pub fn overlay(self, over: ServeFile) -> ServeFile {
        ServeFile {
            broker: over.broker.or(self.broker),
            data_dir: over.data_dir.or(self.data_dir),
            lake: over.lake.or(self.lake),
            client_id: over.client_id.or(self.client_id),
            flush_interval: over.flush_interval.or(self.flush_interval),
            flush_rows: over.flush_rows.or(self.flush_rows),
            max_event_age: over.max_event_age.or(self.max_event_age),
            max_future_skew: over.max_future_skew.or(self.max_future_skew),
            quarantine_quota: over.quarantine_quota.or(self.quarantine_quota),
            tls_ca_file: over.tls_ca_file.or(self.tls_ca_file),
            tls_client_cert: over.tls_client_cert.or(self.tls_client_cert),
            tls_client_key: over.tls_client_key.or(self.tls_client_key),
            mqtt_username: over.mqtt_username.or(self.mqtt_username),
            mqtt_password: over.mqtt_password.or(self.mqtt_password),
            share_group: over.share_group.or(self.share_group),
            compact_interval: over.compact_interval.or(self.compact_interval),
            compact_min_files: over.compact_min_files.or(self.compact_min_files),
            retention: over.retention.or(self.retention),
            pg_listen: over.pg_listen.or(self.pg_listen),
            pg_user: over.pg_user.or(self.pg_user),
            pg_password: over.pg_password.or(self.pg_password),
            pg_users: over.pg_users.or(self.pg_users),
            pg_tls_cert: over.pg_tls_cert.or(self.pg_tls_cert),
            pg_tls_key: over.pg_tls_key.or(self.pg_tls_key),
            pg_max_connections: over.pg_max_connections.or(self.pg_max_connections),
            pg_statement_timeout: over.pg_statement_timeout.or(self.pg_statement_timeout),
            pg_memory_mb: over.pg_memory_mb.or(self.pg_memory_mb),
            pg_max_value_mb: over.pg_max_value_mb.or(self.pg_max_value_mb),
            pg_login_timeout: over.pg_login_timeout.or(self.pg_login_timeout),
        }
    }
}

/// The resolved `serve` configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// `s3://bucket/prefix`, or `None` for the lake in `data_dir`.
    pub lake: Option<String>,
    pub subscriber: SubscriberOptions,
    pub maintenance: Maintenance,
    /// The SQL endpoint, if a password is configured.
    pub endpoint: Option<EndpointOptions>,
    /// Memory all SQL queries together may use.
    pub sql_memory_bytes: usize,
}

/// Default address of the SQL endpoint (README.md).
pub const DEFAULT_PG_LISTEN: &str = "127.0.0.1:5433";

/// Lake upkeep that `serve` runs on a schedule (and `compact` once).
#[derive(Debug, Clone)]
pub struct Maintenance {
    pub compact_interval: Duration,
    pub compact_min_files: usize,
    /// Partitions older than this are deleted; `None` keeps everything.
    pub retention: Option<Duration>,
}

impl ServeConfig {
    /// Applies the defaults to what the file, env and flags left unset, and
    /// validates the result.
    pub fn resolve(layers: ServeFile) -> Result<Self, ConfigError> {
        let broker: BrokerUrl = layers
            .broker
            .as_deref()
            .unwrap_or("mqtt://127.0.0.1:1883")
            .parse()?;
        let flush_interval = layers.flush_interval.unwrap_or(Duration::from_secs(10));
        if flush_interval.is_zero() || flush_interval > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                key: "flush_interval",
                expected: "between 1ms and 1h",
            });
        }
        let flush_rows = layers.flush_rows.unwrap_or(50_000);
        if flush_rows == 0 {
            return Err(ConfigError::Invalid {
                key: "flush_rows",
                expected: "at least 1",
            });
        }
        let delta = |d: Duration, key| {
            TimeDelta::from_std(d).map_err(|_| ConfigError::Invalid {
                key,
                expected: "a duration under 100 years",
            })
        };
        let defaults = IngestLimits::default();
        let limits = IngestLimits {
            max_event_age: match layers.max_event_age {
                Some(d) => delta(d, "max_event_age")?,
                None => defaults.max_event_age,
            },
            max_future_skew: match layers.max_future_skew {
                Some(d) => delta(d, "max_future_skew")?,
                None => defaults.max_future_skew,
            },
            quarantine_quota: layers.quarantine_quota.unwrap_or(defaults.quarantine_quota),
        };
        let client_id = layers
            .client_id
            .unwrap_or_else(|| "driftline-collector".to_owned());
        if client_id.is_empty() {
            return Err(ConfigError::Invalid {
                key: "client_id",
                expected: "non-empty",
            });
        }
        let credentials = match (layers.mqtt_username, layers.mqtt_password) {
            (Some(username), password) => Some(Credentials {
                username,
                password: password.unwrap_or_default(),
            }),
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "mqtt_password",
                    expected: "given together with mqtt_username",
                })
            }
            (None, None) => None,
        };
        if let Some(group) = &layers.share_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(ConfigError::Invalid {
                    key: "share_group",
                    expected: "a non-empty name without '/', '+' or '#'",
                });
            }
        }
        let maintenance = Maintenance {
            compact_interval: layers.compact_interval.unwrap_or(Duration::from_secs(600)),
            compact_min_files: layers.compact_min_files.unwrap_or(8).max(2),
            retention: layers.retention,
        };
        if maintenance.compact_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "compact_interval",
                expected: "longer than 0s",
            });
        }
        let mut users: Vec<(String, String)> =
            layers.pg_users.unwrap_or_default().into_iter().collect();
        if let Some(password) = layers.pg_password {
            users.push((
                layers.pg_user.unwrap_or_else(|| "driftline".into()),
                password,
            ));
        }
        if users.iter().any(|(u, p)| u.is_empty() || p.is_empty()) {
            return Err(ConfigError::Invalid {
                key: "pg_users",
                expected: "non-empty user names and passwords",
            });
        }
        let tls = match (layers.pg_tls_cert, layers.pg_tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "pg_tls_cert",
                    expected: "given together with pg_tls_key",
                })
            }
        };
        let statement_timeout = layers
            .pg_statement_timeout
            .unwrap_or(Duration::from_secs(60));
        let max_connections = layers.pg_max_connections.unwrap_or(64);
        if statement_timeout.is_zero() || max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "pg_statement_timeout/pg_max_connections",
                expected: "above zero",
            });
        }
        let login_timeout = layers.pg_login_timeout.unwrap_or(Duration::from_secs(10));
        let max_value_mb = layers.pg_max_value_mb.unwrap_or(64);
        if login_timeout.is_zero() || max_value_mb == 0 {
            return Err(ConfigError::Invalid {
                key: "pg_login_timeout/pg_max_value_mb",
                expected: "above zero",
            });
        }
        let endpoint = (!users.is_empty()).then(|| EndpointOptions {
            tls,
            max_connections,
            statement_timeout,
            login_timeout,
            max_value_bytes: max_value_mb.saturating_mul(1 << 20),
            ..EndpointOptions::new(
                layers.pg_listen.unwrap_or_else(|| {
                    DEFAULT_PG_LISTEN
                        .parse()
                        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5433)))
                }),
                users,
            )
        });
        Ok(ServeConfig {
            endpoint,
            sql_memory_bytes: layers.pg_memory_mb.unwrap_or(2048).saturating_mul(1 << 20),
            maintenance,
            lake: layers.lake,
            data_dir: layers
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            subscriber: SubscriberOptions {
                broker,
                client_id,
                flush_interval,
                flush_rows,
                limits,
                tls: TlsFiles {
                    ca_file: layers.tls_ca_file,
                    client_cert: layers.tls_client_cert,
                    client_key: layers.tls_client_key,
                },
                credentials,
                share_group: layers.share_group,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("collector.example.toml");
        let file = ServeFile::load(&path).expect("example parses");
        assert!(file.broker.is_some() && file.flush_interval.is_some());
        let config = ServeConfig::resolve(file).expect("example is valid");
        assert_eq!(config.subscriber.flush_interval, Duration::from_secs(10));
        assert_eq!(config.subscriber.limits.max_event_age, TimeDelta::days(30));
    }

    #[test]
    fn later_layers_win() {
        let file = ServeFile {
            broker: Some("mqtt://file:1".into()),
            flush_rows: Some(7),
            ..ServeFile::default()
        };
        let flags = ServeFile {
            broker: Some("mqtt://flag:2".into()),
            ..ServeFile::default()
        };
        let config = ServeConfig::resolve(file.overlay(flags)).expect("valid");
        assert_eq!(config.subscriber.broker.host, "flag");
        assert_eq!(config.subscriber.flush_rows, 7);
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<ServeFile>("brokr = \"mqtt://x:1\"").is_err());
        assert!(toml::from_str::<ServeFile>("flush_interval = \"soon\"").is_err());
        let zero = ServeFile {
            flush_interval: Some(Duration::ZERO),
            ..ServeFile::default()
        };
        assert!(matches!(
            ServeConfig::resolve(zero),
            Err(ConfigError::Invalid {
                key: "flush_interval",
                ..
            })
        ));
        let bad_broker = ServeFile {
            broker: Some("http://x".into()),
            ..ServeFile::default()
        };
        assert!(matches!(
            ServeConfig::resolve(bad_broker),
            Err(ConfigError::Broker(_))
        ));
    }
}
