//! Drift detection: the SQL files of `queries/detectors/`, run by
//! DataFusion over the lake for one period of event time, recorded in
//! `detector_runs` (every evaluation) and `drift_events` (those that fired).
//!
//! A detector file starts with a header of `-- key: value` lines:
//!
//! ```sql
//! -- name: latency_regression
//! -- description: Mean latency of each model version against the reference period.
//! -- current: 15m          (the period under test)
//! -- reference: 1h         (the period before it, the baseline)
//! -- threshold: 0.2        (the effect size that matters: value > threshold)
//! -- alpha: 0.001          (the false-alarm rate per evaluation: p_value < alpha)
//! -- min_devices: 10
//! -- device_cap: 10        (no device weighs more than 10 median devices)
//! SELECT model_id, model_version, 'mean_latency_increase' AS statistic,
//!        ... AS value, ... AS p_value, devices, events, epsilon FROM ...
//! ```
//!
//! The body returns one row per model version with the columns `model_id`,
//! `model_version`, `statistic`, `value`, `p_value`, `devices`, `events`,
//! `epsilon`. An evaluation fires when `value > threshold` and
//! `p_value < alpha`: the p-values come from the noise-aware tests of
//! [`crate::query::stats`], so alpha is the false-alarm rate whatever the
//! privacy noise. Placeholders: see [`render`] and `queries/README.md`.
//!
//! **Robust fleet sums.** Where the body reads `FROM metrics`, it reads the
//! period's rows with a `device_weight` per device and period: 1, or for a
//! device whose inferences in the period exceed `device_cap` times the
//! median device's (of its model version), the factor that brings it down
//! to that cap. The sum placeholders multiply every count by it (and its
//! noise variance by its square), so one device, whatever counts it sends,
//! weighs at most `device_cap` median devices in a fleet sum. How many
//! devices were capped is recorded in `detector_runs.devices_capped`.
//!
//! Files are read at every run: a new or edited detector is picked up
//! without a restart. Evaluations are keyed by (detector, model_id,
//! model_version, current_start), so running twice for the same period
//! records nothing twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::prelude::SessionContext;
use driftline_core::histogram::MAX_BUCKETS;

use crate::lake::schema::{self, Evaluation};
use crate::lake::{LakeError, LakeWriter, DETECTOR_RUNS, DRIFT_EVENTS};
use crate::query::{self, QueryError};

/// One detector file.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    pub body: String,
    pub current: Duration,
    pub reference: Duration,
    pub threshold: f64,
    pub alpha: f64,
    pub min_devices: u64,
    /// Most a device weighs in a period, in median devices (0: no cap).
    pub device_cap: f64,
}

/// Errors of detection.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("cannot read detectors in {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {problem}")]
    Header { file: PathBuf, problem: String },
    #[error("detector {detector} ({file}) failed: {source}")]
    Query {
        detector: String,
        file: PathBuf,
        source: QueryError,
    },
    #[error("detector {detector}: result column {column} is missing or of the wrong type")]
    Column { detector: String, column: String },
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("retraining: {0}")]
    Retrain(String),
}

/// Reads every `*.sql` file of `dir` (sorted by name). A file whose header
/// is wrong is an error: a detector silently skipped would be worse.
pub fn load(dir: &Path) -> Result<Vec<Detector>, DetectError> {
    let read = |source| DetectError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).map_err(|source| DetectError::Read {
                path: file.clone(),
                source,
            })?;
            parse(file, &text).map_err(|problem| DetectError::Header {
                file: file.clone(),
                problem,
            })
        })
        .collect()
}

/// Parses a detector file: the header, then the SQL body.
pub fn parse(file: &Path, text: &str) -> Result<Detector, String> {
    let mut fields = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(comment) = line.trim().strip_prefix("--") else {
            break;
        };
        if let Some((key, value)) = comment.split_once(':') {
            // A value may carry an explanation in parentheses.
            let value = value.split(" (").next().unwrap_or(value).trim();
            fields.insert(key.trim().to_owned(), value.to_owned());
        }
    }
    let get = |key: &str| {
        fields
            .get(key)
            .cloned()
            .ok_or_else(|| format!("header `-- {key}:` is missing"))
    };
    let duration = |key: &str| {
        get(key).and_then(|v| {
            humantime::parse_duration(&v).map_err(|e| format!("header {key}: {v:?}: {e}"))
        })
    };
    let number = |key: &str, default: Option<f64>| match (fields.get(key), default) {
        (Some(v), _) => v
            .parse::<f64>()
            .map_err(|e| format!("header {key}: {v:?}: {e}")),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(format!("header `-- {key}:` is missing")),
    };
    let detector = Detector {
        name: get("name")?,
        description: fields.get("description").cloned().unwrap_or_default(),
        file: file.to_path_buf(),
        body: text.to_owned(),
        current: duration("current")?,
        reference: duration("reference")?,
        threshold: number("threshold", None)?,
        alpha: number("alpha", Some(0.001))?,
        min_devices: number("min_devices", Some(10.0))? as u64,
        device_cap: number("device_cap", Some(DEFAULT_DEVICE_CAP))?,
    };
    if !(detector.device_cap == 0.0 || detector.device_cap >= 1.0) {
        return Err("device_cap must be 0 (no cap) or at least 1".into());
    }
    if detector.current.is_zero() || detector.reference.is_zero() {
        return Err("current and reference must be longer than 0s".into());
    }
    if !(0.0..1.0).contains(&detector.alpha) {
        return Err("alpha must be in [0, 1)".into());
    }
    if !detector
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "name {:?}: letters, digits, _ and - only",
            detector.name
        ));
    }
    Ok(detector)
}

/// The reference and current periods of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Periods {
    pub reference_start: DateTime<Utc>,
    pub current_start: DateTime<Utc>,
    pub current_end: DateTime<Utc>,
}

impl Detector {
    /// The last complete period ending at or before `at`: periods are
    /// aligned to multiples of `current` since the Unix epoch.
    pub fn periods(&self, at: DateTime<Utc>) -> Periods {
        let current = TimeDelta::from_std(self.current).unwrap_or(TimeDelta::hours(1));
        let reference = TimeDelta::from_std(self.reference).unwrap_or(TimeDelta::hours(1));
        let current_end = at.duration_trunc(current).unwrap_or(at);
        Periods {
            reference_start: current_end - current - reference,
            current_start: current_end - current,
            current_end,
        }
    }
}

/// Default `device_cap`: a device weighs at most 10 median devices.
pub const DEFAULT_DEVICE_CAP: f64 = 10.0;

/// Each device's weight in the reference and current periods of `p`
/// (`in_current` tells which): columns `device_id`, `model_id`,
/// `model_version`, `in_current`, `device_weight`. A device's inferences
/// in a period (noised, so floored at 0) above `cap` times the median
/// device's are scaled down to that; nobody is capped below one inference.
fn device_weights(p: &Periods, cap: f64) -> String {
    format!(
        "SELECT device_id, model_id, model_version, in_current, \
                CASE WHEN n > limit_n THEN limit_n / n ELSE 1.0 END AS device_weight \
         FROM (SELECT device_id, model_id, model_version, in_current, n, \
                      {cap:?} * greatest(median(n) OVER (PARTITION BY model_id, model_version, in_current), 1.0) AS limit_n \
               FROM (SELECT device_id, model_id, model_version, window_start >= {cur} AS in_current, \
                            CAST(greatest(sum(inference_count), 0) AS DOUBLE) AS n \
                     FROM metrics WHERE window_start >= {start} AND window_start < {end} \
                     GROUP BY device_id, model_id, model_version, window_start >= {cur}))",
        cur = literal(p.current_start),
        start = literal(p.reference_start),
        end = literal(p.current_end),
    )
}

/// Where a detector's `FROM metrics` finds each device's weight.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// Computed within the statement: self-contained SQL, as
    /// `detect --print-sql` shows it.
    Inline,
    /// A table holding [`device_weights`]'s rows, computed beforehand (one
    /// scan of `metrics` serves the statement and `devices_capped`).
    Table(&'a str),
}

/// The rows of `metrics` in the periods of `p`, each with its device's
/// `device_weight`: what a detector's `FROM metrics` reads.
fn weighted_metrics(p: &Periods, cap: f64, weights: Weights<'_>) -> String {
    let weights = match weights {
        Weights::Inline => format!("({})", device_weights(p, cap)),
        Weights::Table(name) => name.to_owned(),
    };
    format!(
        "(SELECT m.*, w.device_weight FROM {weights} w JOIN metrics m \
          ON m.device_id = w.device_id AND m.model_id = w.model_id \
             AND m.model_version = w.model_version \
             AND (m.window_start >= {cur}) = w.in_current \
          WHERE m.window_start >= {start} AND m.window_start < {end}) AS metrics",
        cur = literal(p.current_start),
        start = literal(p.reference_start),
        end = literal(p.current_end),
    )
}

/// Whether `detector`'s sums are weighted: it reads `FROM metrics` and its
/// `device_cap` is not 0.
fn is_weighted(detector: &Detector) -> bool {
    detector.device_cap != 0.0 && find_from_metrics(&detector.body).next().is_some()
}

/// Where `body` says `FROM metrics` (any case and spacing): the byte range
/// of each.
fn find_from_metrics(body: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let lower = body.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut search = 0;
    while let Some(at) = lower[search..].find("from").map(|i| i + search) {
        search = at + 4;
        let before_ok = at == 0 || !is_word(lower.as_bytes()[at - 1]);
        let after = &lower[at + 4..];
        let spaces = after.len() - after.trim_start().len();
        let table = &after[spaces..];
        let ends = table
            .as_bytes()
            .get("metrics".len())
            .is_none_or(|b| !is_word(*b));
        if before_ok && spaces > 0 && table.starts_with("metrics") && ends {
            let end = at + 4 + spaces + "metrics".len();
            found.push(at..end);
            search = end;
        }
    }
    found.into_iter()
}

/// `detector`'s body with each `FROM metrics` reading
/// [`weighted_metrics`], if [`is_weighted`].
fn weigh_metrics(detector: &Detector, p: &Periods, weights: Weights<'_>) -> String {
    let body = &detector.body;
    if !is_weighted(detector) {
        return body.clone();
    }
    let mut out = String::with_capacity(body.len());
    let mut rest = 0;
    for range in find_from_metrics(body) {
        out.push_str(&body[rest..range.start]);
        out.push_str("FROM ");
        out.push_str(&weighted_metrics(p, detector.device_cap, weights));
        rest = range.end;
    }
    out.push_str(&body[rest..]);
    out
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn literal(t: DateTime<Utc>) -> String {
    format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// The noise scale of a noised field: its `scale_*` column, or for
/// `categories.{name}` and `custom.{name}` its entry in `noise_scale`.
fn scale_of(field: &str) -> String {
    match field {
        "feedback_positive" | "feedback_negative" | "feedback_correction" => {
            "scale_feedback".into()
        }
        f if f.starts_with("categories.") || f.starts_with("custom.") => {
            format!("json_number(noise_scale, '{}')", f.replace('\'', "''"))
        }
        other => format!("scale_{other}"),
    }
}

/// The detector's SQL for `p`. Placeholders:
/// - `{reference_start}`, `{current_start}`, `{current_end}`: timestamps;
///   `{threshold}`, `{alpha}`, `{min_devices}`: the header's values;
/// - `{in_reference}`, `{in_current}`: conditions on `window_start`;
/// - `{ref_hist:h}`, `{cur_hist:h}`: histogram `h` (latency_ms,
///   confidence, input_tokens, output_tokens) summed over the period, as
///   a list of bucket counts (one pass over the flat bucket columns);
/// - `{ref_sum:c}`, `{cur_sum:c}`: noised count `c` summed over the period;
/// - `{ref_noise:f}`, `{cur_noise:f}`: the noise variance of such a sum (of
///   each bucket, for a histogram).
///
/// Sums are weighted by `device_weight` where the body reads `FROM metrics`
/// (see the module's "Robust fleet sums"), the weights found as `weights`
/// says.
pub fn render(detector: &Detector, p: &Periods, weights: Weights<'_>) -> String {
    let body = weigh_metrics(detector, p, weights);
    let (w, w2) = if is_weighted(detector) {
        (" * device_weight", " * device_weight * device_weight")
    } else {
        ("", "")
    };
    let in_reference = format!(
        "(window_start >= {} AND window_start < {})",
        literal(p.reference_start),
        literal(p.current_start)
    );
    let in_current = format!(
        "(window_start >= {} AND window_start < {})",
        literal(p.current_start),
        literal(p.current_end)
    );
    let mut sql = body;
    for (tag, cond) in [("ref", &in_reference), ("cur", &in_current)] {
        for h in crate::lake::schema::HISTOGRAMS {
            let buckets: Vec<String> = (0..MAX_BUCKETS)
                .map(|i| format!("sum(CASE WHEN {cond} THEN {h}_b{i:02}{w} END)"))
                .collect();
            sql = sql.replace(
                &format!("{{{tag}_hist:{h}}}"),
                &format!("make_array({})", buckets.join(", ")),
            );
        }
        // Counts and noise of any field named in the file.
        while let Some(start) = sql.find(&format!("{{{tag}_sum:")) {
            let Some(len) = sql[start..].find('}') else {
                break;
            };
            let field = sql[start + tag.len() + 6..start + len].to_owned();
            sql.replace_range(
                start..=start + len,
                &format!("sum(CASE WHEN {cond} THEN {field}{w} ELSE 0 END)"),
            );
        }
        while let Some(start) = sql.find(&format!("{{{tag}_noise:")) {
            let Some(len) = sql[start..].find('}') else {
                break;
            };
            let field = sql[start + tag.len() + 8..start + len].to_owned();
            sql.replace_range(
                start..=start + len,
                &format!(
                    "sum(CASE WHEN {cond} THEN noise_var(mechanism, {}){w2} ELSE 0 END)",
                    scale_of(&field)
                ),
            );
        }
    }
    sql.replace("{in_reference}", &in_reference)
        .replace("{in_current}", &in_current)
        .replace("{reference_start}", &literal(p.reference_start))
        .replace("{current_start}", &literal(p.current_start))
        .replace("{current_end}", &literal(p.current_end))
        .replace("{threshold}", &format!("{:?}", detector.threshold))
        .replace("{alpha}", &format!("{:?}", detector.alpha))
        .replace("{min_devices}", &detector.min_devices.to_string())
}

/// Runs one detector for the period ending at or before `at`.
#[tracing::instrument(name = "detector", skip_all, fields(detector = %detector.name, %at))]
/// `revision` is 0 for a period's first evaluation, n for its n-th after
/// late data.
pub async fn evaluate(
    ctx: &SessionContext,
    detector: &Detector,
    at: DateTime<Utc>,
    revision: i64,
) -> Result<Vec<Evaluation>, DetectError> {
    evaluate_with(&mut WeightCache::new(ctx), detector, at, revision).await
}

/// [`evaluate`] with the devices' weights of `cache`: detectors of one run
/// that share their periods and `device_cap` share one computation.
pub async fn evaluate_with(
    cache: &mut WeightCache<'_>,
    detector: &Detector,
    at: DateTime<Utc>,
    revision: i64,
) -> Result<Vec<Evaluation>, DetectError> {
    let ctx = cache.ctx;
    let periods = detector.periods(at);
    let failed = |source| DetectError::Query {
        detector: detector.name.clone(),
        file: detector.file.clone(),
        source,
    };
    let weights = if is_weighted(detector) {
        cache
            .get(&periods, detector.device_cap)
            .await
            .map_err(failed)?
    } else {
        None
    };
    let sql = render(
        detector,
        &periods,
        weights.map_or(Weights::Inline, |t| Weights::Table(&t.name)),
    );
    let batches = query::run(ctx, &sql).await.map_err(failed)?;
    let reporting = reporting(ctx, &periods).await.map_err(failed)?;
    let capped = weights.map(|t| &t.capped);
    let mut out = Vec::new();
    for batch in &batches {
        let mut evaluations = rows(detector, &periods, batch, reporting, revision)?;
        for e in &mut evaluations {
            e.devices_capped = capped.as_ref().map(|c| {
                c.get(&(e.model_id.clone(), e.model_version.clone()))
                    .copied()
                    .unwrap_or(0)
            });
        }
        out.extend(evaluations);
    }
    Ok(out)
}

/// The devices' weights of the runs of one tick, by periods and
/// `device_cap`, each computed once; their tables leave the session when
/// the cache is dropped.
pub struct WeightCache<'a> {
    ctx: &'a SessionContext,
    tables: HashMap<(Periods, u64), Option<WeightTable<'a>>>,
}

impl<'a> WeightCache<'a> {
    pub fn new(ctx: &'a SessionContext) -> Self {
        WeightCache {
            ctx,
            tables: HashMap::new(),
        }
    }

    /// The weights for `p` and `cap` (`None`: no device reported).
    async fn get(&mut self, p: &Periods, cap: f64) -> Result<Option<&WeightTable<'a>>, QueryError> {
        let key = (*p, cap.to_bits());
        if !self.tables.contains_key(&key) {
            let batches = query::run(self.ctx, &device_weights(p, cap)).await?;
            let table = WeightTable::register(self.ctx, batches)?;
            self.tables.insert(key, table);
        }
        Ok(self.tables.get(&key).and_then(Option::as_ref))
    }
}

/// The devices' weights of one evaluation, registered as a table of the
/// session (under a name no other evaluation uses) until dropped, and the
/// devices of the current period they cap, per model and version.
struct WeightTable<'a> {
    ctx: &'a SessionContext,
    name: String,
    capped: HashMap<(String, String), i64>,
}

impl<'a> WeightTable<'a> {
    /// `None` when there are no rows: no device reported in the periods, so
    /// the statement reads no weights.
    fn register(
        ctx: &'a SessionContext,
        batches: Vec<RecordBatch>,
    ) -> Result<Option<Self>, datafusion::error::DataFusionError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let Some(schema) = batches.first().map(|b| b.schema()) else {
            return Ok(None);
        };
        let mut capped = HashMap::new();
        for batch in &batches {
            let column = |name: &str, to: &DataType| match batch.column_by_name(name) {
                Some(c) => Ok(cast(c, to)?),
                None => Err(datafusion::error::DataFusionError::Internal(format!(
                    "device weights lack {name}"
                ))),
            };
            let (model, version) = (
                column("model_id", &DataType::Utf8)?,
                column("model_version", &DataType::Utf8)?,
            );
            let current = column("in_current", &DataType::Boolean)?;
            let weight = column("device_weight", &DataType::Float64)?;
            let (model, version) = (model.as_string::<i32>(), version.as_string::<i32>());
            let (current, weight) = (current.as_boolean(), weight.as_primitive::<Float64Type>());
            for i in 0..batch.num_rows() {
                if current.value(i) && weight.value(i) < 1.0 {
                    *capped
                        .entry((model.value(i).to_owned(), version.value(i).to_owned()))
                        .or_insert(0) += 1;
                }
            }
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("driftline_device_weights_{n}");
        let table = datafusion::datasource::MemTable::try_new(schema, vec![batches])?;
        ctx.register_table(name.as_str(), std::sync::Arc::new(table))?;
        Ok(Some(WeightTable { ctx, name, capped }))
    }
}

impl Drop for WeightTable<'_> {
    fn drop(&mut self) {
        let _ = self.ctx.deregister_table(self.name.as_str());
    }
}

fn rows(
    detector: &Detector,
    p: &Periods,
    batch: &RecordBatch,
    seen: Reporting,
    revision: i64,
) -> Result<Vec<Evaluation>, DetectError> {
    let missing = |column: &str| DetectError::Column {
        detector: detector.name.clone(),
        column: column.to_owned(),
    };
    let column = |name: &str, to: DataType| {
        batch
            .column_by_name(name)
            .and_then(|c| cast(c, &to).ok())
            .ok_or_else(|| missing(name))
    };
    let (model, version, statistic) = (
        column("model_id", DataType::Utf8)?,
        column("model_version", DataType::Utf8)?,
        column("statistic", DataType::Utf8)?,
    );
    let (value, p_value, epsilon) = (
        column("value", DataType::Float64)?,
        column("p_value", DataType::Float64)?,
        column("epsilon", DataType::Float64)?,
    );
    let (devices, events) = (
        column("devices", DataType::Int64)?,
        column("events", DataType::Int64)?,
    );
    let text = |a: &dyn Array, i: usize| a.as_string::<i32>().value(i).to_owned();
    let float = |a: &dyn Array, i: usize| {
        let a = a.as_primitive::<Float64Type>();
        (!a.is_null(i) && a.value(i).is_finite()).then(|| a.value(i))
    };
    let int = |a: &dyn Array, i: usize| {
        let a = a.as_primitive::<Int64Type>();
        if a.is_null(i) {
            0
        } else {
            a.value(i)
        }
    };
    let now = Utc::now();
    Ok((0..batch.num_rows())
        .map(|i| {
            let (v, pv) = (float(&value, i), float(&p_value, i));
            let devices = int(&devices, i);
            let fired = devices >= detector.min_devices as i64
                && v.is_some_and(|v| v > detector.threshold)
                && pv.is_some_and(|pv| pv < detector.alpha);
            let severity = fired.then(|| {
                let strong = v.is_some_and(|v| v > 2.0 * detector.threshold)
                    && pv.is_some_and(|pv| pv < detector.alpha / 100.0);
                if strong { "critical" } else { "warning" }.to_owned()
            });
            Evaluation {
                detected_at: now,
                detector: detector.name.clone(),
                model_id: text(&model, i),
                model_version: text(&version, i),
                statistic: text(&statistic, i),
                value: v,
                threshold: detector.threshold,
                p_value: pv,
                alpha: detector.alpha,
                reference_start: p.reference_start,
                reference_end: p.current_start,
                current_start: p.current_start,
                current_end: p.current_end,
                devices,
                events: int(&events, i),
                epsilon: float(&epsilon, i),
                fired,
                severity,
                query_file: detector
                    .file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned(),
                devices_expected: i64::try_from(seen.expected).ok(),
                devices_present: i64::try_from(seen.present).ok(),
                revision,
                rows_seen: i64::try_from(seen.rows).ok(),
                devices_capped: None,
            }
        })
        .collect())
}

/// What one run recorded.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub evaluations: Vec<Evaluation>,
    /// Drift events stored now (0 when this period was evaluated before).
    pub new_events: usize,
}

/// Runs every detector for the period ending at or before `at` and records
/// the results. Evaluations already in the lake are not stored again.
#[tracing::instrument(name = "detection", skip_all, fields(detectors = detectors.len(), %at))]
pub async fn run_all(
    ctx: &SessionContext,
    lake: &LakeWriter,
    detectors: &[Detector],
    at: DateTime<Utc>,
    revision: i64,
) -> Result<RunSummary, DetectError> {
    let mut summary = RunSummary::default();
    let mut weights = WeightCache::new(ctx);
    for detector in detectors {
        let evaluations = evaluate_with(&mut weights, detector, at, revision).await?;
        metrics::counter!("driftline_detector_runs_total", "detector" => detector.name.clone())
            .increment(1);
        summary.evaluations.extend(evaluations);
    }
    let by_date = |rows: Vec<&Evaluation>| {
        let mut m: std::collections::BTreeMap<String, Vec<Evaluation>> = Default::default();
        for e in rows {
            m.entry(e.current_end.format("%Y-%m-%d").to_string())
                .or_default()
                .push(e.clone());
        }
        m
    };
    for (date, rows) in by_date(summary.evaluations.iter().collect()) {
        let batch = schema::evaluations_batch(&rows).map_err(|source| LakeError::Arrow {
            table: DETECTOR_RUNS,
            source,
        })?;
        lake.append(DETECTOR_RUNS, &date, &batch)?;
    }
    for (date, rows) in by_date(summary.evaluations.iter().filter(|e| e.fired).collect()) {
        let batch = schema::evaluations_batch(&rows).map_err(|source| LakeError::Arrow {
            table: DRIFT_EVENTS,
            source,
        })?;
        let stored = lake.append(DRIFT_EVENTS, &date, &batch)?.rows;
        metrics::counter!("driftline_drift_events_total").increment(stored as u64);
        summary.new_events += stored;
    }
    Ok(summary)
}

/// The end of the newest window in the lake (event time), if any.
pub async fn latest_event_time(ctx: &SessionContext) -> Result<Option<DateTime<Utc>>, QueryError> {
    let batches = query::run(
        ctx,
        "SELECT CAST(max(window_start) AS BIGINT) AS t, max(window_secs) AS s FROM metrics",
    )
    .await?;
    let Some(batch) = batches.first() else {
        return Ok(None);
    };
    let (Some(t), Some(s)) = (batch.column_by_name("t"), batch.column_by_name("s")) else {
        return Ok(None);
    };
    let (Ok(t), Ok(s)) = (cast(t, &DataType::Int64), cast(s, &DataType::Int64)) else {
        return Ok(None);
    };
    let (t, s) = (t.as_primitive::<Int64Type>(), s.as_primitive::<Int64Type>());
    if t.is_empty() || t.is_null(0) {
        return Ok(None);
    }
    // window_start is in microseconds.
    Ok(DateTime::from_timestamp_micros(t.value(0))
        .map(|start| start + TimeDelta::seconds(if s.is_null(0) { 0 } else { s.value(0) })))
}

/// Who and what a period's evaluation sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reporting {
    /// Devices that reported any window since the reference period began
    /// (in it, in the current period, or later: a backlog that is still
    /// arriving shows each device's first windows early).
    pub expected: u64,
    /// Of those, the ones that reported a window ending at or after the end
    /// of the current period.
    pub present: u64,
    /// `metrics` rows in the reference and current periods: when it grows
    /// after an evaluation, late data arrived and the period is revised.
    pub rows: u64,
}

/// [`Reporting`] of `periods`, from the lake as it is now.
pub async fn reporting(ctx: &SessionContext, periods: &Periods) -> Result<Reporting, QueryError> {
    let ts = |t: DateTime<Utc>| format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%SZ"));
    let sql = format!(
        "SELECT CAST(count(*) AS BIGINT) AS expected, \
                CAST(sum(CASE WHEN last_end_us >= {end_us} THEN 1 ELSE 0 END) AS BIGINT) AS present, \
                CAST(sum(rows_in) AS BIGINT) AS rows_in \
         FROM (SELECT device_id, \
                      max(CAST(window_start AS BIGINT) + CAST(window_secs AS BIGINT) * 1000000) AS last_end_us, \
                      sum(CASE WHEN window_start < {current_end} THEN 1 ELSE 0 END) AS rows_in \
               FROM metrics WHERE window_start >= {reference_start} GROUP BY device_id) d",
        end_us = periods.current_end.timestamp_micros(),
        current_end = ts(periods.current_end),
        reference_start = ts(periods.reference_start),
    );
    let batches = query::run(ctx, &sql).await?;
    let value = |name: &str| -> u64 {
        batches
            .first()
            .and_then(|b| b.column_by_name(name))
            .and_then(|c| cast(c, &DataType::Int64).ok())
            .map(|c| {
                let c = c.as_primitive::<Int64Type>();
                if c.is_empty() || c.is_null(0) {
                    0
                } else {
                    u64::try_from(c.value(0)).unwrap_or(0)
                }
            })
            .unwrap_or(0)
    };
    Ok(Reporting {
        expected: value("expected"),
        present: value("present"),
        rows: value("rows_in"),
    })
}

/// The start of the oldest window in the lake (event time), if any.
pub async fn earliest_event_time(
    ctx: &SessionContext,
) -> Result<Option<DateTime<Utc>>, QueryError> {
    time_of(
        ctx,
        "SELECT CAST(min(window_start) AS BIGINT) AS t FROM metrics",
    )
    .await
}

/// The time in column `t` (Unix microseconds) of the first row `sql`
/// returns, if any.
async fn time_of(ctx: &SessionContext, sql: &str) -> Result<Option<DateTime<Utc>>, QueryError> {
    let batches = query::run(ctx, sql).await?;
    let Some(t) = batches.first().and_then(|b| b.column_by_name("t")) else {
        return Ok(None);
    };
    let Ok(t) = cast(t, &DataType::Int64) else {
        return Ok(None);
    };
    let t = t.as_primitive::<Int64Type>();
    if t.is_empty() || t.is_null(0) {
        return Ok(None);
    }
    Ok(DateTime::from_timestamp_micros(t.value(0)))
}

/// The end of the first period `detector` has to evaluate when the lake's
/// newest window ends at `latest`: the period after the last one
/// `detector_runs` records for it; for a detector that never ran, the
/// first period within `horizon` of the newest one (and not before the
/// lake's first window), so that a detector added later is evaluated over
/// recent history too.
pub async fn resume_from(
    ctx: &SessionContext,
    detector: &Detector,
    latest: DateTime<Utc>,
    horizon: TimeDelta,
) -> Result<DateTime<Utc>, QueryError> {
    let step = TimeDelta::from_std(detector.current).unwrap_or(TimeDelta::hours(1));
    if let Some(last) = last_evaluated(ctx, &detector.name).await? {
        return Ok(last + step);
    }
    let newest = detector.periods(latest).current_end;
    let first = match earliest_event_time(ctx).await? {
        Some(t) => detector.periods(t).current_end + step,
        None => newest,
    };
    Ok(first.max(newest - horizon).min(newest))
}

/// The periods of `detector` within `horizon` of `latest` that gained
/// `metrics` rows (in their reference or current period) since their last
/// evaluation, each with the revision to record next. Evaluations from
/// before `rows_seen` existed are not revised.
pub async fn revisions(
    ctx: &SessionContext,
    detector: &Detector,
    latest: DateTime<Utc>,
    horizon: TimeDelta,
) -> Result<Vec<(DateTime<Utc>, i64)>, QueryError> {
    let ts = |t: DateTime<Utc>| format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%SZ"));
    let since = latest - horizon;
    let runs = query::run(
        ctx,
        &format!(
            "SELECT CAST(current_end AS BIGINT) AS end_us, max(coalesce(revision, 0)) AS revision, \
                    max(rows_seen) AS rows_seen \
             FROM detector_runs WHERE detector = '{}' AND current_end > {} AND rows_seen IS NOT NULL \
             GROUP BY current_end ORDER BY current_end",
            detector.name.replace('\'', "''"),
            ts(since)
        ),
    )
    .await?;
    let step = TimeDelta::from_std(detector.current).unwrap_or(TimeDelta::hours(1));
    let reference = TimeDelta::from_std(detector.reference).unwrap_or(TimeDelta::hours(1));
    // Rows per aligned step of window_start (Unix seconds) since the
    // oldest reference.
    let counts = query::run(
        ctx,
        &format!(
            "SELECT to_unixtime(date_bin(INTERVAL '{} seconds', window_start, TIMESTAMP '1970-01-01T00:00:00Z')) AS bucket, \
                    count(*) AS n \
             FROM metrics WHERE window_start >= {} GROUP BY 1",
            step.num_seconds().max(1),
            ts(since - reference - step)
        ),
    )
    .await?;
    let column = |batch: &RecordBatch, name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| cast(c, &DataType::Int64).ok())
    };
    let mut buckets = std::collections::BTreeMap::new();
    for batch in &counts {
        if let (Some(b), Some(n)) = (column(batch, "bucket"), column(batch, "n")) {
            let (b, n) = (b.as_primitive::<Int64Type>(), n.as_primitive::<Int64Type>());
            for i in 0..batch.num_rows() {
                if !b.is_null(i) && !n.is_null(i) {
                    buckets.insert(b.value(i), n.value(i));
                }
            }
        }
    }
    let mut out = Vec::new();
    for batch in &runs {
        let (Some(end), Some(rev), Some(seen)) = (
            column(batch, "end_us"),
            column(batch, "revision"),
            column(batch, "rows_seen"),
        ) else {
            continue;
        };
        let (end, rev, seen) = (
            end.as_primitive::<Int64Type>(),
            rev.as_primitive::<Int64Type>(),
            seen.as_primitive::<Int64Type>(),
        );
        for i in 0..batch.num_rows() {
            if end.is_null(i) || seen.is_null(i) {
                continue;
            }
            let Some(end_t) = DateTime::from_timestamp_micros(end.value(i)) else {
                continue;
            };
            let p = detector.periods(end_t);
            let now: i64 = buckets
                .range(p.reference_start.timestamp()..p.current_end.timestamp())
                .map(|(_, n)| n)
                .sum();
            if now > seen.value(i) {
                out.push((end_t, if rev.is_null(i) { 0 } else { rev.value(i) } + 1));
            }
        }
    }
    Ok(out)
}

/// Each fleet's watermark: how far in event time every one of its devices
/// that reported since `since` has reported (the earliest of their latest
/// window ends).
pub async fn fleet_watermarks(
    ctx: &SessionContext,
    since: DateTime<Utc>,
) -> Result<Vec<(String, DateTime<Utc>)>, QueryError> {
    let batches = query::run(
        ctx,
        &format!(
            "SELECT fleet, min(last_end_us) AS mark FROM ( \
                 SELECT fleet, device_id, \
                        max(CAST(window_start AS BIGINT) + CAST(window_secs AS BIGINT) * 1000000) AS last_end_us \
                 FROM metrics WHERE window_start >= TIMESTAMP '{}' GROUP BY fleet, device_id) d \
             GROUP BY fleet",
            since.format("%Y-%m-%dT%H:%M:%SZ")
        ),
    )
    .await?;
    let mut out = Vec::new();
    for batch in &batches {
        let (Some(fleet), Some(mark)) = (
            batch
                .column_by_name("fleet")
                .and_then(|c| cast(c, &DataType::Utf8).ok()),
            batch
                .column_by_name("mark")
                .and_then(|c| cast(c, &DataType::Int64).ok()),
        ) else {
            continue;
        };
        let (fleet, mark) = (fleet.as_string::<i32>(), mark.as_primitive::<Int64Type>());
        for i in 0..batch.num_rows() {
            if fleet.is_null(i) || mark.is_null(i) {
                continue;
            }
            if let Some(t) = DateTime::from_timestamp_micros(mark.value(i)) {
                out.push((fleet.value(i).to_owned(), t));
            }
        }
    }
    Ok(out)
}

/// Default of how far back a detector that never ran is evaluated.
pub const DEFAULT_HORIZON: TimeDelta = TimeDelta::days(1);

/// The end of the last period of `detector` recorded in `detector_runs`,
/// if any: where detection resumes after a restart.
pub async fn last_evaluated(
    ctx: &SessionContext,
    detector: &str,
) -> Result<Option<DateTime<Utc>>, QueryError> {
    time_of(
        ctx,
        &format!(
            "SELECT CAST(max(current_end) AS BIGINT) AS t FROM detector_runs WHERE detector = '{}'",
            detector.replace('\'', "''")
        ),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_replace_unedited_detectors_and_keep_edited_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect("read");
        install(dir.path(), &[("a.sql", "a v1"), ("b.sql", "b v1")], &[]).expect("install");
        assert_eq!(
            (read("a.sql"), read("b.sql")),
            ("a v1".into(), "b v1".into())
        );
        // The user edits b; a new version changes both.
        std::fs::write(dir.path().join("b.sql"), "b mine").expect("edit");
        install(dir.path(), &[("a.sql", "a v2"), ("b.sql", "b v2")], &[]).expect("upgrade");
        assert_eq!(
            (read("a.sql"), read("b.sql")),
            ("a v2".into(), "b mine".into())
        );
        // Still edited at the next upgrade; a deleted file comes back.
        std::fs::remove_file(dir.path().join("a.sql")).expect("delete");
        install(dir.path(), &[("a.sql", "a v3"), ("b.sql", "b v3")], &[]).expect("upgrade");
        assert_eq!(
            (read("a.sql"), read("b.sql")),
            ("a v3".into(), "b mine".into())
        );
        // A copy from before the record existed is kept: its origin is unknown.
        std::fs::remove_file(dir.path().join(INSTALLED)).expect("forget");
        install(dir.path(), &[("a.sql", "a v4"), ("b.sql", "b v4")], &[]).expect("upgrade");
        assert_eq!(
            (read("a.sql"), read("b.sql")),
            ("a v3".into(), "b mine".into())
        );
        // Neither file is as installed: nothing is recorded.
        assert!(read(INSTALLED).is_empty());
        // ... unless it is a text shipped before the record (by name and
        // SHA-256): that one is upgraded and recorded.
        std::fs::write(dir.path().join("a.sql"), "a old").expect("old copy");
        let (old_a, old_b) = (sha256(b"a old"), sha256(b"b v1"));
        let shipped = [("a.sql", old_a.as_str()), ("b.sql", old_b.as_str())];
        install(
            dir.path(),
            &[("a.sql", "a v5"), ("b.sql", "b v5")],
            &shipped,
        )
        .expect("upgrade");
        assert_eq!(
            (read("a.sql"), read("b.sql")),
            ("a v5".into(), "b mine".into())
        );
        assert!(read(INSTALLED).starts_with("a.sql "));
    }

    /// Every file of `queries/detectors/` is built in, and nothing else.
    #[test]
    fn the_built_in_detectors_are_the_shipped_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries/detectors");
        let mut shipped: Vec<(String, String)> = std::fs::read_dir(&dir)
            .expect("queries/detectors")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .map(|p| {
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).expect("read"))
            })
            .collect();
        shipped.sort();
        let built_in: Vec<(String, String)> = BUILTIN
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        assert_eq!(built_in, shipped);
    }

    #[test]
    fn texts_shipped_before_the_record_name_built_in_detectors() {
        for (name, hash) in SHIPPED_BEFORE_RECORD {
            assert!(BUILTIN.iter().any(|(n, _)| *n == name), "{name}");
            assert!(
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "{hash}"
            );
        }
    }

    fn detector(body: &str) -> Result<Detector, String> {
        parse(Path::new("x.sql"), body)
    }

    #[test]
    fn headers_parse_and_errors_are_clear() {
        let d = detector(
            "-- name: lat\n-- current: 15m (the period under test)\n-- reference: 1h\n-- threshold: 0.2\nSELECT 1",
        )
        .expect("parses");
        assert_eq!(d.current, Duration::from_secs(900));
        assert_eq!((d.alpha, d.min_devices), (0.001, 10));
        let e = detector("-- name: lat\n-- current: 15m\n-- threshold: 0.2\nSELECT 1")
            .expect_err("no reference");
        assert!(e.contains("reference"), "{e}");
        let e =
            detector("-- name: lat\n-- current: soon\n-- reference: 1h\n-- threshold: 1\nSELECT 1")
                .expect_err("bad duration");
        assert!(e.contains("current"), "{e}");
    }

    #[test]
    fn sums_are_weighted_where_the_body_reads_from_metrics() {
        let header = "-- name: w\n-- current: 15m\n-- reference: 1h\n-- threshold: 0.2\n";
        let at: DateTime<Utc> = "2026-11-27T10:37:12Z".parse().expect("ts");
        let body =
            "SELECT {cur_sum:error_count} FROM\n  Metrics WHERE x IN (SELECT 1 from metrics_old) \
                    UNION ALL SELECT 1 FROM metrics";
        let d = detector(&format!("{header}{body}")).expect("parses");
        let sql = render(&d, &d.periods(at), Weights::Table("t"));
        // Both reads of the table, and not the other table, whatever the case.
        assert_eq!(sql.matches("FROM t w JOIN metrics m").count(), 2, "{sql}");
        assert!(sql.contains("from metrics_old"), "{sql}");
        assert!(
            sql.contains("THEN error_count * device_weight ELSE 0 END"),
            "{sql}"
        );
        // device_cap 0: nothing weighted.
        let d = detector(&format!("{header}-- device_cap: 0\n{body}")).expect("parses");
        let sql = render(&d, &d.periods(at), Weights::Table("t"));
        assert!(!sql.contains("device_weight"), "{sql}");
        assert!(detector(&format!("{header}-- device_cap: 0.5\nSELECT 1")).is_err());
    }

    #[test]
    fn periods_align_and_placeholders_expand() {
        let d = detector(
            "-- name: lat\n-- current: 15m\n-- reference: 1h\n-- threshold: 0.2\n\
             SELECT {ref_hist:latency_ms}, {cur_sum:error_count}, {cur_noise:feedback_negative} WHERE {in_current}",
        )
        .expect("parses");
        let at: DateTime<Utc> = "2026-11-27T10:37:12Z".parse().expect("ts");
        let p = d.periods(at);
        assert_eq!(p.current_end.to_rfc3339(), "2026-11-27T10:30:00+00:00");
        assert_eq!(p.current_start.to_rfc3339(), "2026-11-27T10:15:00+00:00");
        assert_eq!(p.reference_start.to_rfc3339(), "2026-11-27T09:15:00+00:00");
        let sql = render(&d, &p, Weights::Inline);
        assert!(sql.contains(
            "make_array(sum(CASE WHEN (window_start >= TIMESTAMP '2026-11-27T09:15:00Z'"
        ));
        assert!(sql.contains("latency_ms_b15 END)"));
        assert!(sql.contains("THEN error_count ELSE 0 END)"));
        assert!(sql.contains("noise_var(mechanism, scale_feedback)"));
        assert!(!sql.contains('{'), "{sql}");
    }
}

/// Runs detection as event time advances: after each new period end seen
/// in the lake, every detector runs for it, in order, so a backfill or a
/// replay is evaluated like live data. Used by `serve` and `demo`.
pub struct Schedule {
    pub queries: PathBuf,
    pub rule: crate::retrain::RetrainRule,
    pub targets: crate::retrain::Targets,
    /// Most periods caught up per tick (a long backfill is spread out).
    pub max_periods_per_tick: usize,
    /// How long (wall clock) a due period waits for the devices of its
    /// reference period that have not reported past its end yet.
    pub lateness: std::time::Duration,
    /// How far back (event time) a detector that never ran is evaluated.
    pub horizon: TimeDelta,
    last_end: std::collections::HashMap<String, DateTime<Utc>>,
    /// When each period (by detector and end) was first found due but
    /// incomplete.
    waiting: std::collections::HashMap<(String, DateTime<Utc>), std::time::Instant>,
}

/// What one tick found, for printing.
#[derive(Debug, Default)]
pub struct Tick {
    pub events: Vec<Evaluation>,
    pub jobs: Vec<schema::JobEvent>,
    /// Periods evaluated (first evaluations and revisions), all detectors.
    pub evaluated: usize,
    /// Complete periods still to evaluate after this tick, all detectors.
    pub behind: usize,
}

impl Schedule {
    pub fn new(
        queries: PathBuf,
        rule: crate::retrain::RetrainRule,
        targets: crate::retrain::Targets,
    ) -> Self {
        Schedule {
            queries,
            rule,
            targets,
            max_periods_per_tick: 16,
            lateness: std::time::Duration::from_secs(300),
            horizon: DEFAULT_HORIZON,
            last_end: Default::default(),
            waiting: Default::default(),
        }
    }

    /// Runs every detector on its periods completed since the last tick;
    /// stops between two runs once `shutdown` is cancelled (the next tick,
    /// or the next start, picks up from there).
    pub async fn tick(
        &mut self,
        ctx: &SessionContext,
        lake: &LakeWriter,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Tick, DetectError> {
        let detectors = load(&self.queries)?;
        let Some(latest) = latest_event_time(ctx)
            .await
            .map_err(|source| DetectError::Query {
                detector: "(latest event time)".into(),
                file: self.queries.clone(),
                source,
            })?
        else {
            return Ok(Tick::default());
        };
        let mut tick = Tick::default();
        match fleet_watermarks(ctx, latest - self.horizon).await {
            Ok(marks) => {
                for (fleet, mark) in marks {
                    metrics::gauge!("driftline_detect_watermark_seconds", "fleet" => fleet)
                        .set(mark.timestamp() as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "fleet watermarks"),
        }
        let mut complete: std::collections::HashMap<(DateTime<Utc>, DateTime<Utc>), Reporting> =
            Default::default();
        for detector in &detectors {
            let newest = detector.periods(latest).current_end;
            let step = TimeDelta::from_std(detector.current).unwrap_or(TimeDelta::hours(1));
            let mut next = match self.last_end.get(&detector.name) {
                Some(last) => *last + step,
                // First tick: after the last period the lake records (so
                // periods that passed while the collector was down are
                // evaluated, a few per tick), or over the horizon for a
                // detector that never ran.
                None => resume_from(ctx, detector, latest, self.horizon)
                    .await
                    .map_err(|source| DetectError::Query {
                        detector: detector.name.clone(),
                        file: self.queries.clone(),
                        source,
                    })?,
            };
            let mut done = 0;
            tracing::debug!(detector = detector.name, %latest, %newest, %next, "detection tick");
            while next <= newest && done < self.max_periods_per_tick {
                if shutdown.is_cancelled() {
                    return Ok(tick);
                }
                // The watermark: a period is evaluated once every device
                // that reported since its reference period began has
                // reported past its end, or once it has waited `lateness`
                // for them.
                let periods = detector.periods(next);
                let key = (periods.reference_start, periods.current_end);
                let Reporting {
                    expected, present, ..
                } = match complete.get(&key) {
                    Some(counts) => *counts,
                    None => {
                        let counts = reporting(ctx, &periods).await.map_err(|source| {
                            DetectError::Query {
                                detector: detector.name.clone(),
                                file: self.queries.clone(),
                                source,
                            }
                        })?;
                        complete.insert(key, counts);
                        counts
                    }
                };
                if present < expected {
                    let since = *self
                        .waiting
                        .entry((detector.name.clone(), next))
                        .or_insert_with(std::time::Instant::now);
                    if since.elapsed() < self.lateness {
                        tracing::debug!(detector = detector.name, period_end = %next, expected, present, "waiting for late devices");
                        break;
                    }
                    tracing::warn!(detector = detector.name, period_end = %next, expected, present, "evaluating a period with devices missing after the lateness bound");
                }
                self.waiting.remove(&(detector.name.clone(), next));
                let summary = run_all(ctx, lake, std::slice::from_ref(detector), next, 0).await?;
                let fired: Vec<Evaluation> = summary
                    .evaluations
                    .into_iter()
                    .filter(|e| e.fired)
                    .collect();
                let jobs = crate::retrain::after_run(ctx, lake, &self.rule, &self.targets, &fired)
                    .await
                    .map_err(|e| DetectError::Retrain(e.to_string()))?;
                if summary.new_events > 0 {
                    tick.events.extend(fired);
                }
                tick.jobs.extend(jobs);
                self.last_end.insert(detector.name.clone(), next);
                metrics::gauge!("driftline_detect_evaluated_until_seconds", "detector" => detector.name.clone())
                    .set(next.timestamp() as f64);
                next += step;
                done += 1;
            }
            // Late data: periods evaluated before more of their rows
            // arrived are evaluated again, as a new revision.
            let late = revisions(ctx, detector, latest, self.horizon)
                .await
                .map_err(|source| DetectError::Query {
                    detector: detector.name.clone(),
                    file: self.queries.clone(),
                    source,
                })?;
            for (end, revision) in late {
                if shutdown.is_cancelled() || done >= self.max_periods_per_tick {
                    break;
                }
                // A revision waits for the late devices like a first
                // evaluation does, so that a backlog still arriving is
                // evaluated once, complete.
                let seen = reporting(ctx, &detector.periods(end))
                    .await
                    .map_err(|source| DetectError::Query {
                        detector: detector.name.clone(),
                        file: self.queries.clone(),
                        source,
                    })?;
                let key = (format!("{}#revision", detector.name), end);
                if seen.present < seen.expected {
                    let since = *self
                        .waiting
                        .entry(key.clone())
                        .or_insert_with(std::time::Instant::now);
                    if since.elapsed() < self.lateness {
                        continue;
                    }
                }
                self.waiting.remove(&key);
                tracing::info!(detector = detector.name, period_end = %end, revision, "late data: evaluating the period again");
                let summary =
                    run_all(ctx, lake, std::slice::from_ref(detector), end, revision).await?;
                let fired: Vec<Evaluation> = summary
                    .evaluations
                    .into_iter()
                    .filter(|e| e.fired)
                    .collect();
                let jobs = crate::retrain::after_run(ctx, lake, &self.rule, &self.targets, &fired)
                    .await
                    .map_err(|e| DetectError::Retrain(e.to_string()))?;
                if summary.new_events > 0 {
                    tick.events.extend(fired);
                }
                tick.jobs.extend(jobs);
                done += 1;
            }
            // Periods complete in the lake but not evaluated yet.
            let behind = if next <= newest {
                (newest - next).num_seconds() / step.num_seconds().max(1) + 1
            } else {
                0
            };
            metrics::gauge!("driftline_detect_lag_periods", "detector" => detector.name.clone())
                .set(behind as f64);
            tick.evaluated += done;
            tick.behind += usize::try_from(behind).unwrap_or(0);
        }
        Ok(tick)
    }
}

include!(concat!(env!("OUT_DIR"), "/builtin_detectors.rs"));

/// Writes the built-in detectors into `dir` (which then can be edited).
/// See [`install`].
pub fn install_builtin(dir: &Path) -> Result<(), DetectError> {
    install(dir, &BUILTIN, &SHIPPED_BEFORE_RECORD)
}

/// Where [`install`] records what it wrote: one `name sha256` line per
/// detector file.
const INSTALLED: &str = ".builtin-sha256";

/// SHA-256 of every built-in detector text that versions before the
/// [`INSTALLED`] record shipped (those kept no record; from the
/// repository's history, 0cb15e8 to be4fbf9): a copy equal to one of them
/// is unedited, so an upgrade replaces it as well, the way dpkg recognises
/// an unchanged conffile. Frozen: every later text is recorded when it is
/// installed.
const SHIPPED_BEFORE_RECORD: [(&str, &str); 11] = [
    (
        "canary_latency.sql",
        "10391f0aba9f8932ff48e3fa01266931c884a3b4e51cf2e76ad9ba6947bff7c3",
    ),
    (
        "canary_latency.sql",
        "d38cd996c953ff47d060167973b5d62e24cabd312d3c3e93fa3aa18216300e73",
    ),
    (
        "canary_latency.sql",
        "d5f01ed3207a3105ad8b431153699aea4875ca9ae977df12b082ba96b077417f",
    ),
    (
        "custom_drift.sql",
        "0b12c6a884bda76ab2f5ae173d1b69dbd4fe8a2492459b656dc2b7137e412434",
    ),
    (
        "error_rate.sql",
        "8cf5dcbf691e613481f38ade7ac35f78b5ce9e22b16264b8f7473a9e1083c913",
    ),
    (
        "input_drift.sql",
        "3379b608832e0e3f690d4b67abbf3edbb805e3a067c1bc3fa17288c9b4c42e24",
    ),
    (
        "label_drift.sql",
        "0107f3f9e706b502e0560a68fa810dcef45978e8046711c30804da5f05656518",
    ),
    (
        "latency_regression.sql",
        "2c00010666f5939d1ddf11d6dc3e68658d4225ebe0200c826335f9ac9b3db620",
    ),
    (
        "latency_regression.sql",
        "2e948f90fe582471b04838903f2b8d127792ee7cdba97f74e7525098c5a73b94",
    ),
    (
        "negative_feedback.sql",
        "2106226490727afb91e0faad33839db5784d3e0d288dbf2ce13433a2ae6696e7",
    ),
    (
        "prediction_drift.sql",
        "e1a337624a95e1b309963ae8cd5ee229fa3c321408cb96cb34eec88f40b1786b",
    ),
];

/// Writes `detectors` into `dir`: a missing file is written; a file still
/// as this function last wrote it, or equal to a text of `shipped` (name
/// and SHA-256 of texts installed before the record existed), is replaced
/// by the new text, so upgrades reach unedited copies; an edited file (or
/// one of unknown origin) is kept, with a warning when the built-in text
/// differs from it.
fn install(
    dir: &Path,
    detectors: &[(&str, &str)],
    shipped: &[(&str, &str)],
) -> Result<(), DetectError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DetectError::Read { path, source }
    };
    std::fs::create_dir_all(dir).map_err(error(dir))?;
    let record = dir.join(INSTALLED);
    let installed: HashMap<String, String> = std::fs::read_to_string(&record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, hash)| (name.to_owned(), hash.to_owned()))
        .collect();
    let mut lines = Vec::new();
    for (name, text) in detectors {
        let path = dir.join(name);
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(error(&path)(e)),
        };
        let unedited = current.as_ref().is_some_and(|c| {
            let hash = sha256(c);
            installed.get(*name) == Some(&hash) || shipped.contains(&(*name, hash.as_str()))
        });
        match current {
            Some(c) if c == text.as_bytes() => {}
            Some(_) if !unedited => {
                tracing::warn!(
                    path = %path.display(),
                    "this detector differs from the built-in one and from every text an earlier version installed (edited): kept; delete it to get the current one"
                );
                continue;
            }
            previous => {
                std::fs::write(&path, text).map_err(error(&path))?;
                if previous.is_some() {
                    tracing::info!(path = %path.display(), "built-in detector updated");
                }
            }
        }
        lines.push(format!("{name} {}\n", sha256(text.as_bytes())));
    }
    std::fs::write(&record, lines.concat()).map_err(error(&record))?;
    Ok(())
}

/// The SHA-256 of `text`, in lowercase hex.
pub(crate) fn sha256(text: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, text)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `schedule` every `interval` until `shutdown`; with `print`, says
/// what fired and which jobs opened (the demo), else logs it.
pub async fn run_schedule(
    mut schedule: Schedule,
    ctx: std::sync::Arc<SessionContext>,
    lake: std::sync::Arc<LakeWriter>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    print: bool,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let say = |line: String| {
        if print {
            println!("  {line}");
        } else {
            tracing::info!("{line}");
        }
    };
    let mut catching_up = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match schedule.tick(&ctx, &lake, &shutdown).await {
            Ok(tick) => {
                if tick.behind > 0 && !catching_up {
                    catching_up = true;
                    say(format!(
                        "detection: catching up, {} periods evaluated, {} to go",
                        tick.evaluated, tick.behind
                    ));
                } else if tick.behind == 0 && catching_up {
                    catching_up = false;
                    say(format!(
                        "detection: caught up ({} periods evaluated in the last round)",
                        tick.evaluated
                    ));
                }
                for e in &tick.events {
                    let line = format!(
                        "drift: {} {} {} {} = {:.3} (threshold {}, p {:.1e}, {} devices) in {} .. {}",
                        e.severity.as_deref().unwrap_or("warning"),
                        e.detector,
                        e.model_id,
                        e.statistic,
                        e.value.unwrap_or(f64::NAN),
                        e.threshold,
                        e.p_value.unwrap_or(f64::NAN),
                        e.devices,
                        e.current_start.format("%H:%M"),
                        e.current_end.format("%H:%M"),
                    );
                    if print {
                        println!("  {line}");
                    } else {
                        tracing::warn!("{line}");
                    }
                }
                for j in &tick.jobs {
                    let line = format!(
                        "retraining job {} for {} {}: {} ({})",
                        j.job_id,
                        j.model_id,
                        j.model_version,
                        j.status,
                        j.detail.as_deref().unwrap_or_default()
                    );
                    if print {
                        println!("  {line}");
                    } else {
                        tracing::warn!("{line}");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "detection failed; retrying next interval"),
        }
    }
}
