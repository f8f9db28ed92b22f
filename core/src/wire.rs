//! Wire schema v1: one JSON message per device, model and window.
//!
//! The full field reference is `docs/wire-format.md`, with a JSON Schema in
//! `docs/wire-format.schema.json`; golden fixtures live in
//! `core/tests/fixtures/v1/`. In short:
//!
//! - identity: `device_id`, `fleet` (both must match the topic), `model_id`,
//!   `model_version`, `agent_version`;
//! - window: `window_start` (RFC 3339, UTC, aligned to a multiple of
//!   `window_secs` since the Unix epoch), `window_secs`, and `seq`, strictly
//!   increasing per device across restarts;
//! - `privacy`: the mechanism, what this message spent (`epsilon`, `delta`,
//!   `rho`) and `noise_scale`, the noise scale of every noised field;
//! - noised integer counts: `inference_count`, `error_count`, `feedback`,
//!   four standard histograms, optional `custom` histograms and categorical
//!   `categories`. Noised counts may be negative: they are never clamped,
//!   so sums over a fleet stay unbiased.
//!
//! [`accept`] is the collector's single entry point: size limit, topic,
//! version dispatch, strict decoding (unknown fields are errors, integers
//! are integer literals, timestamps are RFC 3339), then
//! [`WindowReport::validate`] and the time bounds. Every failure is a
//! [`Rejection`] with a stable [`Rejection::code`] that ends up in the
//! `quarantine` table.
//!
//! The privacy block must also be consistent: a noised message declares
//! `max_events_per_window` and has noise scales that its mechanism, budget
//! and sensitivity imply ([`WindowReport::implied_noise_scale`], refused as
//! `inconsistent_privacy` otherwise).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::histogram::{self, EdgesError};
use crate::topic::{self, IdentifierError, TopicKind};

/// The schema version this crate writes. Older versions keep decoding.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest payload accepted, in bytes. A v1 message with the default layouts
/// is about 1.5 KiB.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Longest window accepted, in seconds (one day).
pub const MAX_WINDOW_SECS: u32 = 86_400;
/// Most custom numeric histograms per message.
pub const MAX_CUSTOM_HISTOGRAMS: usize = 16;
/// Most categorical features per message.
pub const MAX_CATEGORY_FEATURES: usize = 8;
/// Most categories per categorical feature.
pub const MAX_CATEGORIES: usize = 64;
/// The largest magnitude of any count (2^40, about 10^12): far above what
/// one device records in a day, far below where a sum over a fleet's rows
/// could overflow a 64-bit integer (2^23 such rows).
pub const MAX_COUNT: i64 = 1 << 40;
/// The largest noise scale (Laplace b or Gaussian sigma) a message may
/// declare: a scale above it would make every standard error it enters
/// meaningless.
pub const MAX_NOISE_SCALE: f64 = 1e6;
/// Relative tolerance of the privacy consistency rule
/// ([`WindowReport::implied_noise_scale`]): room for rounding in what a
/// device prints (an epsilon written with six significant digits), far
/// below any error that would matter to a standard error.
pub const PRIVACY_TOLERANCE: f64 = 1e-3;

/// The four histograms every message has, in wire and column order (their
/// fields are [`WindowReport::standard_histograms`]).
pub const STANDARD_HISTOGRAMS: [&str; 4] =
    ["latency_ms", "confidence", "input_tokens", "output_tokens"];

/// Noised fields every message has, in the order of `privacy.noise_scale`
/// documentation; `custom.{name}` and `categories.{name}` come on top.
pub const STANDARD_NOISED_FIELDS: [&str; 7] = [
    "inference_count",
    "error_count",
    "feedback",
    STANDARD_HISTOGRAMS[0],
    STANDARD_HISTOGRAMS[1],
    STANDARD_HISTOGRAMS[2],
    STANDARD_HISTOGRAMS[3],
];

/// One device's report for one model and one window (schema v1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowReport {
    /// Always [`SCHEMA_VERSION`] when written by this crate.
    pub schema_version: u32,
    pub device_id: String,
    pub fleet: String,
    pub model_id: String,
    pub model_version: String,
    pub agent_version: String,
    /// Start of the tumbling window, UTC (RFC 3339 on the wire, see [`rfc3339`]).
    #[serde(deserialize_with = "rfc3339::deserialize")]
    pub window_start: DateTime<Utc>,
    /// Window length in seconds, 1 to [`MAX_WINDOW_SECS`].
    pub window_secs: u32,
    /// Per-device sequence number, strictly increasing across restarts.
    pub seq: u64,
    pub privacy: Privacy,
    /// Inferences recorded in the window (noised).
    pub inference_count: i64,
    /// Inferences that ended in an error (noised).
    pub error_count: i64,
    /// User feedback recorded in the window (noised).
    pub feedback: Feedback,
    /// Inference latency, milliseconds.
    pub latency_ms: Histogram,
    /// Output confidence, 0 to 1.
    pub confidence: Histogram,
    /// Input size, tokens.
    pub input_tokens: Histogram,
    /// Output size, tokens.
    pub output_tokens: Histogram,
    /// Application-defined numeric features, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, Histogram>,
    /// Application-defined categorical features (e.g. predicted label): for
    /// each feature, a count per category. The category set is fixed by the
    /// agent's configuration, never by what was observed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, BTreeMap<String, i64>>,
}

/// The privacy block: which mechanism noised the counts and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    pub mechanism: Mechanism,
    /// Pure-DP epsilon spent by this message (`laplace`), or the epsilon of
    /// the (epsilon, delta) guarantee implied by `rho` (`gaussian`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Delta of the (epsilon, delta) guarantee (`gaussian` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Zero-concentrated DP rho spent by this message (`gaussian` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<f64>,
    /// Noise scale of every noised field, keyed by field name (see
    /// [`WindowReport::noised_fields`]): the Laplace scale `b` or the
    /// Gaussian standard deviation `sigma` of the noise added to each count.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub noise_scale: BTreeMap<String, f64>,
    /// The most events (inferences and feedback) the device counts in one
    /// window (`K`); the noise is calibrated to all of them together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events_per_window: Option<u32>,
    /// The device's configured guarantee for one device and day, with
    /// `device_day_delta` (docs/privacy.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_day_epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_day_delta: Option<f64>,
}

/// The largest `privacy.max_events_per_window` accepted.
pub const MAX_EVENTS_PER_WINDOW: u32 = 1_000_000;

/// How the counts of a message were noised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Exact counts, no differential privacy (e.g. a trusted test device).
    None,
    /// Discrete Laplace noise, pure epsilon-DP.
    Laplace,
    /// Discrete Gaussian noise, rho-zCDP.
    Gaussian,
}

impl Mechanism {
    /// The name used on the wire and in the `metrics.mechanism` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::None => "none",
            Mechanism::Laplace => "laplace",
            Mechanism::Gaussian => "gaussian",
        }
    }
}

/// Feedback counts (noised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    pub positive: i64,
    pub negative: i64,
    pub correction: i64,
}

/// A histogram: `counts[i]` events fell in `[edges[i], edges[i+1])`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<i64>,
}

impl Histogram {
    /// An all-zero histogram over `edges`.
    pub fn zeros(edges: &[f64]) -> Self {
        Histogram {
            edges: edges.to_vec(),
            counts: vec![0; edges.len().saturating_sub(1)],
        }
    }
}

/// Why a message was refused. [`Rejection::code`] is the stable reason stored
/// in `quarantine.reason`; `Display` is the human detail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("payload is {size} bytes, over the limit of {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("topic {topic:?} is not a Driftline metrics topic (driftline/v1/{{fleet}}/{{device_id}}/metrics)")]
    BadTopic { topic: String },
    #[error("payload is not valid JSON: {detail}")]
    InvalidJson { detail: String },
    #[error("payload has no schema_version (absent or null)")]
    MissingSchemaVersion,
    #[error("schema_version {found} is not supported (supported: 1, an integer literal)")]
    UnsupportedSchemaVersion { found: String },
    #[error("payload does not match schema v{version}: {detail}")]
    SchemaViolation { version: u32, detail: String },
    #[error("{field} is {found:?} in the payload but {expected:?} in the topic")]
    TopicMismatch {
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error("{field} {problem}")]
    InvalidField {
        field: String,
        problem: FieldProblem,
    },
    #[error("privacy.noise_scale.{field} is {scale}, but {basis}: accepted from {low} to {high}")]
    InconsistentPrivacy {
        field: String,
        scale: f64,
        /// How the declared privacy implies the scale, in words.
        basis: String,
        low: f64,
        high: f64,
    },
    #[error("the window from {window_start} ({window_secs} s) must start at or after {earliest} and end at or before {latest}")]
    TimestampOutOfRange {
        window_start: DateTime<Utc>,
        window_secs: u32,
        earliest: DateTime<Utc>,
        latest: DateTime<Utc>,
    },
}

impl Rejection {
    /// Stable, snake_case reason code (the `quarantine.reason` column).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::PayloadTooLarge { .. } => "payload_too_large",
            Rejection::BadTopic { .. } => "bad_topic",
            Rejection::InvalidJson { .. } => "invalid_json",
            Rejection::MissingSchemaVersion => "missing_schema_version",
            Rejection::UnsupportedSchemaVersion { .. } => "unsupported_schema_version",
            Rejection::SchemaViolation { .. } => "schema_violation",
            Rejection::TopicMismatch { .. } => "topic_mismatch",
            Rejection::InvalidField { .. } => "invalid_field",
            Rejection::InconsistentPrivacy { .. } => "inconsistent_privacy",
            Rejection::TimestampOutOfRange { .. } => "timestamp_out_of_range",
        }
    }

    fn field(field: impl Into<String>, problem: FieldProblem) -> Self {
        Rejection::InvalidField {
            field: field.into(),
            problem,
        }
    }
}

/// What is wrong with one field of an otherwise well-formed message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FieldProblem {
    #[error("{0}")]
    Identifier(#[from] IdentifierError),
    #[error("{0}")]
    Edges(#[from] EdgesError),
    #[error("has {counts} counts for {edges} edges (need edges - 1)")]
    CountsMismatch { counts: usize, edges: usize },
    #[error("is {value}, outside {min} ..= {max}")]
    OutOfRange {
        value: String,
        min: String,
        max: String,
    },
    #[error("is {value}; it must lie strictly between {min} and {max}")]
    NotBetween {
        value: String,
        min: String,
        max: String,
    },
    #[error("is {value}, above the limit of {max}")]
    AboveLimit { value: String, max: String },
    #[error("is not aligned to the window length ({window_secs} s since the Unix epoch)")]
    Misaligned { window_secs: u32 },
    #[error("is negative ({value}) although the mechanism is \"none\"")]
    NegativeExactCount { value: i64 },
    #[error("has {count} entries, over the limit of {limit}")]
    TooMany { count: usize, limit: usize },
    #[error("is required by mechanism {mechanism:?}")]
    MissingForMechanism { mechanism: &'static str },
    #[error("is not allowed with mechanism {mechanism:?}")]
    NotAllowedForMechanism { mechanism: &'static str },
    #[error("names {name:?}, which is not a noised field of this message")]
    UnknownNoisedField { name: String },
    #[error("must be a finite number > 0, got {value}")]
    NotPositive { value: f64 },
}

/// How far from the collector's clock a window may be.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// The collector's clock at reception.
    pub now: DateTime<Utc>,
    /// Oldest accepted `window_start`, as an age relative to `now`.
    pub max_age: TimeDelta,
    /// How far past `now` the window's end may lie (clock skew).
    pub max_future: TimeDelta,
}

/// The collector's entry point: checks a message received on `topic` and
/// returns the validated report, or why it was refused.
pub fn accept(topic: &str, payload: &[u8], bounds: &TimeBounds) -> Result<WindowReport, Rejection> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Rejection::PayloadTooLarge {
            size: payload.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    let parsed = topic::parse(topic)
        .filter(|t| t.kind == TopicKind::Metrics)
        .ok_or_else(|| Rejection::BadTopic {
            topic: topic.to_owned(),
        })?;
    let report = decode(payload)?;
    if report.device_id != parsed.device_id {
        return Err(Rejection::TopicMismatch {
            field: "device_id",
            found: report.device_id,
            expected: parsed.device_id.to_owned(),
        });
    }
    if report.fleet != parsed.fleet {
        return Err(Rejection::TopicMismatch {
            field: "fleet",
            found: report.fleet,
            expected: parsed.fleet.to_owned(),
        });
    }
    report.validate()?;
    report.check_time(bounds)?;
    Ok(report)
}

/// Decodes a payload of any supported schema version, strictly (unknown
/// fields are errors), without the semantic checks of [`WindowReport::validate`].
pub fn decode(payload: &[u8]) -> Result<WindowReport, Rejection> {
    #[derive(Deserialize)]
    struct VersionProbe {
        schema_version: Option<serde_json::Value>,
    }
    // serde would also read a struct from a JSON array: insist on an object.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
                Ok(_) => Rejection::SchemaViolation {
                    version: 0,
                    detail: "the payload must be a JSON object".into(),
                },
                Err(e) => json_error(&e, 0),
            },
        );
    }
    // One pass for a well-formed message; only a refused one is read again,
    // for its schema version, to say why it was refused.
    let error = match serde_json::from_slice::<WindowReport>(payload) {
        Ok(report) if report.schema_version == SCHEMA_VERSION => return Ok(report),
        Ok(report) => {
            return Err(Rejection::UnsupportedSchemaVersion {
                found: report.schema_version.to_string(),
            })
        }
        Err(e) => e,
    };
    let probe: VersionProbe = serde_json::from_slice(payload).map_err(|e| json_error(&e, 0))?;
    match probe.schema_version {
        None | Some(serde_json::Value::Null) => Err(Rejection::MissingSchemaVersion),
        Some(v) if v.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {
            Err(json_error(&error, SCHEMA_VERSION))
        }
        Some(other) => Err(Rejection::UnsupportedSchemaVersion {
            found: other.to_string(),
        }),
    }
}

fn json_error(e: &serde_json::Error, version: u32) -> Rejection {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => Rejection::SchemaViolation {
            version,
            detail: e.to_string(),
        },
        Category::Syntax | Category::Eof | Category::Io => Rejection::InvalidJson {
            detail: e.to_string(),
        },
    }
}

impl WindowReport {
    /// Encodes the report as compact JSON after checking it with
    /// [`WindowReport::validate`] and the payload size limit, so an agent
    /// never publishes what a collector would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, Rejection> {
        self.validate()?;
        let bytes = serde_json::to_vec(self).map_err(|e| json_error(&e, self.schema_version))?;
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(Rejection::PayloadTooLarge {
                size: bytes.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        Ok(bytes)
    }

    /// The four standard histograms with their names, in
    /// [`STANDARD_HISTOGRAMS`] order.
    pub fn standard_histograms(&self) -> [(&'static str, &Histogram); 4] {
        let [latency, confidence, input, output] = STANDARD_HISTOGRAMS;
        [
            (latency, &self.latency_ms),
            (confidence, &self.confidence),
            (input, &self.input_tokens),
            (output, &self.output_tokens),
        ]
    }

    /// Names of the noised fields of this message, the keys that
    /// `privacy.noise_scale` must hold: `inference_count`, `error_count`,
    /// `feedback`, `latency_ms`, `confidence`, `input_tokens`,
    /// `output_tokens`, `custom.{name}` and `categories.{name}`.
    pub fn noised_fields(&self) -> Vec<String> {
        let mut names: Vec<String> = STANDARD_NOISED_FIELDS.map(str::to_owned).to_vec();
        names.extend(self.custom.keys().map(|k| format!("custom.{k}")));
        names.extend(self.categories.keys().map(|k| format!("categories.{k}")));
        names
    }

    /// Semantic checks beyond the JSON shape: identifiers, window alignment,
    /// histogram layouts, privacy block consistency, limits.
    pub fn validate(&self) -> Result<(), Rejection> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(Rejection::UnsupportedSchemaVersion {
                found: self.schema_version.to_string(),
            });
        }
        for (field, value) in [
            ("device_id", &self.device_id),
            ("fleet", &self.fleet),
            ("model_id", &self.model_id),
        ] {
            topic::check_identifier(value).map_err(|e| Rejection::field(field, e.into()))?;
        }
        for (field, value) in [
            ("model_version", &self.model_version),
            ("agent_version", &self.agent_version),
        ] {
            topic::check_version(value).map_err(|e| Rejection::field(field, e.into()))?;
        }
        if !(1..=MAX_WINDOW_SECS).contains(&self.window_secs) {
            return Err(Rejection::field(
                "window_secs",
                FieldProblem::OutOfRange {
                    value: self.window_secs.to_string(),
                    min: "1".into(),
                    max: MAX_WINDOW_SECS.to_string(),
                },
            ));
        }
        let aligned = self.window_start.timestamp_subsec_nanos() == 0
            && self
                .window_start
                .timestamp()
                .rem_euclid(i64::from(self.window_secs))
                == 0;
        if !aligned {
            return Err(Rejection::field(
                "window_start",
                FieldProblem::Misaligned {
                    window_secs: self.window_secs,
                },
            ));
        }
        if i64::try_from(self.seq).is_err() {
            return Err(Rejection::field(
                "seq",
                FieldProblem::OutOfRange {
                    value: self.seq.to_string(),
                    min: "0".into(),
                    max: i64::MAX.to_string(),
                },
            ));
        }
        self.validate_histograms()?;
        self.check_count_bounds()?;
        self.validate_privacy()
    }

    /// Every count within ±[`MAX_COUNT`], whatever the mechanism.
    fn check_count_bounds(&self) -> Result<(), Rejection> {
        // Not `c.abs()`: i64::MIN has no absolute value (a panic in debug
        // builds, and itself in release, which would pass).
        match self.find_count(|c| !(-MAX_COUNT..=MAX_COUNT).contains(&c)) {
            Some((field, value)) => Err(Rejection::field(
                field,
                FieldProblem::OutOfRange {
                    value: value.to_string(),
                    min: (-MAX_COUNT).to_string(),
                    max: MAX_COUNT.to_string(),
                },
            )),
            None => Ok(()),
        }
    }

    fn validate_histograms(&self) -> Result<(), Rejection> {
        if self.custom.len() > MAX_CUSTOM_HISTOGRAMS {
            return Err(Rejection::field(
                "custom",
                FieldProblem::TooMany {
                    count: self.custom.len(),
                    limit: MAX_CUSTOM_HISTOGRAMS,
                },
            ));
        }
        if self.categories.len() > MAX_CATEGORY_FEATURES {
            return Err(Rejection::field(
                "categories",
                FieldProblem::TooMany {
                    count: self.categories.len(),
                    limit: MAX_CATEGORY_FEATURES,
                },
            ));
        }
        for (name, h) in self.standard_histograms() {
            check_histogram(name.to_owned(), h)?;
        }
        for (name, h) in &self.custom {
            topic::check_identifier(name)
                .map_err(|e| Rejection::field(format!("custom.{name}"), e.into()))?;
            check_histogram(format!("custom.{name}"), h)?;
        }
        for (name, cats) in &self.categories {
            let field = format!("categories.{name}");
            topic::check_identifier(name).map_err(|e| Rejection::field(&field, e.into()))?;
            if cats.len() > MAX_CATEGORIES {
                return Err(Rejection::field(
                    field,
                    FieldProblem::TooMany {
                        count: cats.len(),
                        limit: MAX_CATEGORIES,
                    },
                ));
            }
            for cat in cats.keys() {
                topic::check_version(cat)
                    .map_err(|e| Rejection::field(format!("{field}.{cat}"), e.into()))?;
            }
        }
        Ok(())
    }

    fn validate_privacy(&self) -> Result<(), Rejection> {
        let p = &self.privacy;
        let mechanism = p.mechanism.as_str();
        let required = |name: &str, v: Option<f64>| match v {
            Some(x) if x.is_finite() && x > 0.0 => Ok(()),
            Some(x) => Err(Rejection::field(
                format!("privacy.{name}"),
                FieldProblem::NotPositive { value: x },
            )),
            None => Err(Rejection::field(
                format!("privacy.{name}"),
                FieldProblem::MissingForMechanism { mechanism },
            )),
        };
        let forbidden = |name: &str, v: Option<f64>| match v {
            Some(_) => Err(Rejection::field(
                format!("privacy.{name}"),
                FieldProblem::NotAllowedForMechanism { mechanism },
            )),
            None => Ok(()),
        };
        let below_one = |name: &str, d: f64| {
            if d > 0.0 && d < 1.0 {
                Ok(())
            } else {
                Err(Rejection::field(
                    format!("privacy.{name}"),
                    FieldProblem::NotBetween {
                        value: d.to_string(),
                        min: "0".into(),
                        max: "1".into(),
                    },
                ))
            }
        };
        // Whatever the mechanism (an exact message may declare them too).
        if let Some(k) = p.max_events_per_window {
            if !(1..=MAX_EVENTS_PER_WINDOW).contains(&k) {
                return Err(Rejection::field(
                    "privacy.max_events_per_window",
                    FieldProblem::OutOfRange {
                        value: k.to_string(),
                        min: "1".into(),
                        max: MAX_EVENTS_PER_WINDOW.to_string(),
                    },
                ));
            }
        }
        match (p.device_day_epsilon, p.device_day_delta) {
            (None, None) => {}
            (Some(e), Some(d)) => {
                required("device_day_epsilon", Some(e))?;
                below_one("device_day_delta", d)?;
            }
            (Some(_), None) => required("device_day_delta", None)?,
            (None, Some(_)) => required("device_day_epsilon", None)?,
        }
        match p.mechanism {
            Mechanism::None => {
                forbidden("epsilon", p.epsilon)?;
                forbidden("delta", p.delta)?;
                forbidden("rho", p.rho)?;
                if !p.noise_scale.is_empty() {
                    return Err(Rejection::field(
                        "privacy.noise_scale",
                        FieldProblem::NotAllowedForMechanism { mechanism },
                    ));
                }
                return self.check_exact_counts_non_negative();
            }
            Mechanism::Laplace => {
                required("epsilon", p.epsilon)?;
                forbidden("delta", p.delta)?;
                forbidden("rho", p.rho)?;
            }
            Mechanism::Gaussian => {
                required("rho", p.rho)?;
                if p.epsilon.is_some() || p.delta.is_some() {
                    required("epsilon", p.epsilon)?;
                    required("delta", p.delta)?;
                    below_one("delta", p.delta.unwrap_or_default())?;
                }
            }
        }
        // A noised message declares `K`: without it, no noise scale could be
        // checked against the budget it claims.
        if p.max_events_per_window.is_none() {
            return Err(Rejection::field(
                "privacy.max_events_per_window",
                FieldProblem::MissingForMechanism { mechanism },
            ));
        }
        let fields = self.noised_fields();
        for name in &fields {
            match p.noise_scale.get(name) {
                Some(s) if s.is_finite() && *s > MAX_NOISE_SCALE => {
                    return Err(Rejection::field(
                        format!("privacy.noise_scale.{name}"),
                        FieldProblem::AboveLimit {
                            value: s.to_string(),
                            max: MAX_NOISE_SCALE.to_string(),
                        },
                    ))
                }
                Some(s) if s.is_finite() && *s > 0.0 => {}
                Some(s) => {
                    return Err(Rejection::field(
                        format!("privacy.noise_scale.{name}"),
                        FieldProblem::NotPositive { value: *s },
                    ))
                }
                None => {
                    return Err(Rejection::field(
                        format!("privacy.noise_scale.{name}"),
                        FieldProblem::MissingForMechanism { mechanism },
                    ))
                }
            }
        }
        if let Some(extra) = p.noise_scale.keys().find(|k| !fields.contains(k)) {
            return Err(Rejection::field(
                "privacy.noise_scale",
                FieldProblem::UnknownNoisedField {
                    name: extra.clone(),
                },
            ));
        }
        self.check_privacy_consistency()
    }

    /// How many counts one event moves by one (`Δ1`, docs/privacy.md):
    /// `inference_count`, possibly `error_count`, one bucket of each of the
    /// four standard histograms, one category of each categorical feature
    /// and one bucket of each custom histogram (a feedback moves one
    /// feedback count, which is fewer).
    pub fn per_event_sensitivity(&self) -> u64 {
        6 + self.categories.len() as u64 + self.custom.len() as u64
    }

    /// The noise scale that the declared privacy implies for a window of
    /// this message's layout that was not coarsened: with `K =
    /// privacy.max_events_per_window` and `Δ1` =
    /// [`WindowReport::per_event_sensitivity`], the Laplace `b = K Δ1 /
    /// epsilon` or the Gaussian `sigma = K sqrt(Δ1) / sqrt(2 rho)`. `None`
    /// without `K`, for exact messages, and when the budget is missing.
    pub fn implied_noise_scale(&self) -> Option<f64> {
        let p = &self.privacy;
        let k = f64::from(p.max_events_per_window?);
        let delta1 = self.per_event_sensitivity() as f64;
        match p.mechanism {
            Mechanism::None => None,
            Mechanism::Laplace => Some(k * delta1 / p.epsilon?),
            Mechanism::Gaussian => Some(k * delta1.sqrt() / (2.0 * p.rho?).sqrt()),
        }
    }

    /// The most windows this message can have been merged from by
    /// coarsening (docs/wire-format.md): merging doubles `window_secs` and
    /// adds up `K`, so `m` windows of `K >= 1` events each need `m` to
    /// divide `window_secs` and `K >= m`. `None` without `K`.
    pub fn max_merged_windows(&self) -> Option<u32> {
        let k = self.privacy.max_events_per_window?;
        let power_of_two = 1u32.checked_shl(self.window_secs.trailing_zeros())?;
        Some(power_of_two.min(k).max(1))
    }

    /// The privacy consistency rule: every noise scale `s` of a noised
    /// message (which declares `K`) lies in `[s0 (1 - t), s0 sqrt(m) (1 + t)]`,
    /// `s0` the [`WindowReport::implied_noise_scale`], `m` the
    /// [`WindowReport::max_merged_windows`], `t` [`PRIVACY_TOLERANCE`].
    ///
    /// The lower end holds for every window the agent noises (`s = s0`) and
    /// for every merge of such windows: merged scales add in variance while
    /// their budgets and `K`s add, which never brings `s` below `s0`. The
    /// upper end covers `m` merged windows of one configuration (Gaussian:
    /// `s = s0`; discrete Laplace: `s <= sqrt(m) s0`, as its variance over
    /// `b^2` grows with `b`).
    fn check_privacy_consistency(&self) -> Result<(), Rejection> {
        let p = &self.privacy;
        let (Some(implied), Some(merged), Some(k)) = (
            self.implied_noise_scale(),
            self.max_merged_windows(),
            p.max_events_per_window,
        ) else {
            return Ok(());
        };
        let low = implied * (1.0 - PRIVACY_TOLERANCE);
        let high = implied * f64::from(merged).sqrt() * (1.0 + PRIVACY_TOLERANCE);
        let Some((field, scale)) = p
            .noise_scale
            .iter()
            .find(|(_, s)| !(low..=high).contains(*s))
        else {
            return Ok(());
        };
        let delta1 = self.per_event_sensitivity();
        let budget = match p.mechanism {
            Mechanism::Gaussian => format!(
                "gaussian with rho {}, max_events_per_window {k} and {delta1} counts per event \
                 implies sigma = K sqrt({delta1}) / sqrt(2 rho) = {implied}",
                p.rho.unwrap_or_default()
            ),
            _ => format!(
                "laplace with epsilon {}, max_events_per_window {k} and {delta1} counts per event \
                 implies b = K {delta1} / epsilon = {implied}",
                p.epsilon.unwrap_or_default()
            ),
        };
        let basis = if merged > 1 {
            format!("{budget}, up to sqrt({merged}) times that for a window merged from {merged}")
        } else {
            budget
        };
        Err(Rejection::InconsistentPrivacy {
            field: field.clone(),
            scale: *scale,
            basis,
            low,
            high,
        })
    }

    fn check_exact_counts_non_negative(&self) -> Result<(), Rejection> {
        match self.find_count(|c| c < 0) {
            Some((field, value)) => Err(Rejection::field(
                field,
                FieldProblem::NegativeExactCount { value },
            )),
            None => Ok(()),
        }
    }

    /// The first count of the message for which `bad` holds, with its
    /// field's name (formatted only for that one: this runs on every
    /// message).
    fn find_count(&self, bad: impl Fn(i64) -> bool) -> Option<(String, i64)> {
        let scalars = [
            ("inference_count", self.inference_count),
            ("error_count", self.error_count),
            ("feedback.positive", self.feedback.positive),
            ("feedback.negative", self.feedback.negative),
            ("feedback.correction", self.feedback.correction),
        ];
        if let Some((name, c)) = scalars.into_iter().find(|(_, c)| bad(*c)) {
            return Some((name.to_owned(), c));
        }
        for (name, h) in self.standard_histograms() {
            if let Some(&c) = h.counts.iter().find(|c| bad(**c)) {
                return Some((format!("{name}.counts"), c));
            }
        }
        for (name, h) in &self.custom {
            if let Some(&c) = h.counts.iter().find(|c| bad(**c)) {
                return Some((format!("custom.{name}.counts"), c));
            }
        }
        for (name, cats) in &self.categories {
            if let Some((k, &c)) = cats.iter().find(|(_, c)| bad(**c)) {
                return Some((format!("categories.{name}.{k}"), c));
            }
        }
        None
    }

    /// Checks `window_start` against the collector's clock.
    pub fn check_time(&self, bounds: &TimeBounds) -> Result<(), Rejection> {
        let earliest = bounds.now - bounds.max_age;
        let latest = bounds.now + bounds.max_future;
        let end = self.window_start + TimeDelta::seconds(i64::from(self.window_secs));
        if self.window_start < earliest || end > latest {
            return Err(Rejection::TimestampOutOfRange {
                window_start: self.window_start,
                window_secs: self.window_secs,
                earliest,
                latest,
            });
        }
        Ok(())
    }
}

fn check_histogram(field: String, h: &Histogram) -> Result<(), Rejection> {
    histogram::check_edges(&h.edges)
        .map_err(|e| Rejection::field(format!("{field}.edges"), e.into()))?;
    if h.counts.len() + 1 != h.edges.len() {
        return Err(Rejection::field(
            format!("{field}.counts"),
            FieldProblem::CountsMismatch {
                counts: h.counts.len(),
                edges: h.edges.len(),
            },
        ));
    }
    Ok(())
}

/// Timestamps on the wire: RFC 3339 `date-time`, strictly (`T` or `t`
/// between date and time; `Z`, `z` or `+hh:mm`/`-hh:mm`; optional
/// fractional seconds), as in the published JSON Schema. chrono's own
/// `Deserialize` takes more (a space, `+hhmm`, one-digit months, spaces
/// around), which a firmware checked against the schema would never send
/// and the collector has no reason to accept.
pub mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer};

    /// Parses one RFC 3339 `date-time` into UTC.
    pub fn parse(s: &str) -> Result<DateTime<Utc>, String> {
        let not = |why: &dyn std::fmt::Display| {
            format!("{s:?} is not an RFC 3339 date-time like 2026-11-27T10:00:00Z: {why}")
        };
        // chrono's RFC 3339 parser also takes a space for the `T`.
        if !matches!(s.as_bytes().get(10), Some(b'T' | b't')) {
            return Err(not(&"date and time are separated by T"));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| not(&e))
    }

    /// `#[serde(deserialize_with)]` for a `DateTime<Utc>` field.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    /// `#[serde(deserialize_with)]` for an `Option<DateTime<Utc>>` field
    /// (with `#[serde(default)]`; `null` is `None`).
    pub fn deserialize_option<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "driftline/v1/f/d/metrics";

    fn bounds() -> TimeBounds {
        TimeBounds {
            now: "2026-11-27T12:00:00Z".parse().expect("ts"),
            max_age: TimeDelta::days(30),
            max_future: TimeDelta::hours(1),
        }
    }

    /// A Laplace message of `window_secs` with one label feature (`Δ1` =
    /// 7), `K` = 10 and epsilon 1, every noise scale `scale`.
    fn laplace(window_secs: u32, scale: f64) -> serde_json::Value {
        let edges = serde_json::json!({"edges": [0, 1, 2], "counts": [3, -1]});
        let fields = [
            "inference_count",
            "error_count",
            "feedback",
            "latency_ms",
            "confidence",
            "input_tokens",
            "output_tokens",
            "categories.label",
        ];
        serde_json::json!({
            "schema_version": 1, "device_id": "d", "fleet": "f", "model_id": "m",
            "model_version": "1", "agent_version": "0.1.0",
            "window_start": "2026-11-27T10:00:00Z", "window_secs": window_secs, "seq": 0,
            "privacy": {
                "mechanism": "laplace", "epsilon": 1.0, "max_events_per_window": 10,
                "noise_scale": fields.iter().map(|f| (f.to_string(), serde_json::json!(scale)))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "inference_count": 4, "error_count": 0,
            "feedback": {"positive": 0, "negative": 0, "correction": 0},
            "latency_ms": edges, "confidence": edges, "input_tokens": edges,
            "output_tokens": edges, "categories": {"label": {"a": 1, "b": 2}},
        })
    }

    fn check(v: &serde_json::Value) -> Result<WindowReport, Rejection> {
        accept(TOPIC, v.to_string().as_bytes(), &bounds())
    }

    #[test]
    fn the_noise_scale_must_follow_from_the_declared_privacy() {
        // b = K Δ1 / epsilon = 10 x 7 / 1 = 70; a 60 s window may merge 4
        // windows of 15 s: up to 2 x 70.
        let exact = check(&laplace(60, 70.0)).expect("b = 70");
        assert_eq!(exact.per_event_sensitivity(), 7);
        assert_eq!(exact.implied_noise_scale(), Some(70.0));
        assert_eq!(exact.max_merged_windows(), Some(4));
        for ok in [69.95, 70.0, 100.0, 140.0, 140.1] {
            check(&laplace(60, ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [60.0, 69.9, 140.2, 1000.0, 1e-3] {
            let e = check(&laplace(60, bad)).expect_err("inconsistent");
            assert_eq!(e.code(), "inconsistent_privacy", "{bad}: {e}");
        }
        // An odd window cannot be a merge: b itself, within 0.1 %.
        check(&laplace(75, 70.05)).expect("within tolerance");
        let e = check(&laplace(75, 75.0)).expect_err("odd window, b > 70");
        assert_eq!(
            e.to_string(),
            "privacy.noise_scale.categories.label is 75, but laplace with epsilon 1, \
             max_events_per_window 10 and 7 counts per event implies b = K 7 / epsilon = 70: \
             accepted from 69.93 to 70.07"
        );
        // A day may be 128 merged windows (86400 = 128 x 675) when K allows.
        // K = 10 bounds it to 10 windows of one event each.
        let mut day = laplace(86_400, 70.0 * 3.0);
        day["window_start"] = "2026-11-26T00:00:00Z".into();
        assert_eq!(check(&day).expect("x 3").max_merged_windows(), Some(10));
        day["privacy"]["noise_scale"]["latency_ms"] = (70.0 * 11.0).into();
        assert_eq!(
            check(&day).expect_err("x 11").code(),
            "inconsistent_privacy"
        );
        day["privacy"]["max_events_per_window"] = 200.into();
        day["privacy"]["epsilon"] = 20.into();
        assert_eq!(check(&day).expect("x 11").max_merged_windows(), Some(128));
        // One field off is enough.
        let mut one = laplace(60, 70.0);
        one["privacy"]["noise_scale"]["latency_ms"] = 7.into();
        let e = check(&one).expect_err("one field");
        assert!(
            e.to_string()
                .starts_with("privacy.noise_scale.latency_ms is 7,"),
            "{e}"
        );
    }

    #[test]
    fn gaussian_scales_follow_rho_and_k_is_required() {
        let mut g = laplace(60, 10.0 * 7f64.sqrt());
        g["privacy"]["mechanism"] = "gaussian".into();
        g["privacy"]["rho"] = 0.5.into();
        g["privacy"]
            .as_object_mut()
            .map(|p| p.remove("epsilon"))
            .expect("privacy");
        check(&g).expect("sigma = K sqrt(7) / sqrt(2 rho)");
        g["privacy"]["rho"] = 0.005.into();
        let e = check(&g).expect_err("rho / 100 needs 10 x sigma");
        assert!(
            e.to_string().contains("sigma = K sqrt(7) / sqrt(2 rho)"),
            "{e}"
        );
        // Without K nothing could be checked: a noised message must declare it.
        g["privacy"]
            .as_object_mut()
            .map(|p| p.remove("max_events_per_window"))
            .expect("privacy");
        let e = check(&g).expect_err("no K");
        assert_eq!(e.code(), "invalid_field");
        assert_eq!(
            e.to_string(),
            "privacy.max_events_per_window is required by mechanism \"gaussian\""
        );
        // A vanishing budget implies an infinite scale: refused, no panic.
        let mut tiny = laplace(60, 70.0);
        tiny["privacy"]["epsilon"] = 5e-324.into();
        assert_eq!(
            check(&tiny).expect_err("tiny").code(),
            "inconsistent_privacy"
        );
    }

    #[test]
    fn deltas_and_k_are_checked_whatever_the_mechanism() {
        let mut g = laplace(60, 10.0 * 7f64.sqrt());
        g["privacy"]["mechanism"] = "gaussian".into();
        g["privacy"]["rho"] = 0.5.into();
        g["privacy"]["delta"] = 1.0.into();
        let e = check(&g).expect_err("delta 1");
        assert_eq!(
            e.to_string(),
            "privacy.delta is 1; it must lie strictly between 0 and 1"
        );
        let mut exact = laplace(60, 1.0);
        exact["privacy"] = serde_json::json!({"mechanism": "none", "max_events_per_window": 0});
        exact["error_count"] = 0.into();
        exact["latency_ms"]["counts"] = serde_json::json!([0, 1]);
        for h in ["confidence", "input_tokens", "output_tokens"] {
            exact[h] = exact["latency_ms"].clone();
        }
        assert_eq!(check(&exact).expect_err("K 0").code(), "invalid_field");
        exact["privacy"] = serde_json::json!({"mechanism": "none", "device_day_epsilon": 8,
            "device_day_delta": 5});
        let e = check(&exact).expect_err("delta 5");
        assert!(
            e.to_string().starts_with("privacy.device_day_delta is 5;"),
            "{e}"
        );
        exact["privacy"] = serde_json::json!({"mechanism": "none", "max_events_per_window": 10,
            "device_day_epsilon": 8, "device_day_delta": 1e-6, "epsilon": null});
        check(&exact).expect("exact messages may declare K and the device-day budget");
    }

    #[test]
    fn the_most_negative_count_is_refused_not_a_panic() {
        for count in [
            i64::MIN,
            i64::MIN + 1,
            -MAX_COUNT - 1,
            MAX_COUNT + 1,
            i64::MAX,
        ] {
            let mut v = laplace(60, 70.0);
            v["error_count"] = count.into();
            let e = check(&v).expect_err("out of range");
            assert_eq!(e.code(), "invalid_field", "{count}: {e}");
        }
        let mut v = laplace(60, 70.0);
        v["error_count"] = (-MAX_COUNT).into();
        check(&v).expect("-2^40 is in range");
    }

    #[test]
    fn timestamps_are_strict_rfc_3339() {
        for ok in [
            "2026-11-27T10:00:00Z",
            "2026-11-27t10:00:00z",
            "2026-11-27T11:00:00+01:00",
            "2026-11-27T10:00:00.000Z",
            "2026-11-27T10:00:00-00:00",
        ] {
            let mut v = laplace(60, 70.0);
            v["window_start"] = ok.into();
            check(&v).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "2026-11-27 10:00:00Z",
            "2026-11-27T10:00:00+0100",
            "2026-11-27T10:00:00",
            "2026-1-27T10:00:00Z",
            " 2026-11-27T10:00:00Z",
            "2026-11-27T10:00:00Z\n",
            "2026-11-27T10:00:00 UTC",
            "2026-02-30T10:00:00Z",
        ] {
            let mut v = laplace(60, 70.0);
            v["window_start"] = bad.into();
            let e = check(&v).expect_err(bad);
            assert_eq!(e.code(), "schema_violation", "{bad}: {e}");
            assert!(e.to_string().contains("RFC 3339"), "{e}");
        }
    }

    #[test]
    fn error_texts_state_the_rule_that_applies() {
        let mut v = laplace(60, 70.0);
        v["categories"]["label"] = serde_json::json!({"a#b": 1});
        let e = check(&v).expect_err("category name");
        assert_eq!(
            e.to_string(),
            "categories.label.a#b contains '#'; allowed are ASCII letters, digits and . _ : - +"
        );
        let mut v = laplace(60, 70.0);
        v["privacy"]["noise_scale"]["feedback"] = 2e6.into();
        assert_eq!(
            check(&v).expect_err("scale").to_string(),
            "privacy.noise_scale.feedback is 2000000, above the limit of 1000000"
        );
        let mut v = laplace(60, 70.0);
        v["window_start"] = "2026-11-27T13:00:00Z".into();
        v["window_secs"] = 3600.into();
        let e = check(&v).expect_err("ends too late");
        assert_eq!(
            e.to_string(),
            "the window from 2026-11-27 13:00:00 UTC (3600 s) must start at or after \
             2026-10-28 12:00:00 UTC and end at or before 2026-11-27 13:00:00 UTC"
        );
        let mut v = laplace(60, 70.0);
        v["schema_version"] = 1.0.into();
        assert_eq!(
            check(&v).expect_err("1.0").to_string(),
            "schema_version 1.0 is not supported (supported: 1, an integer literal)"
        );
    }
}
