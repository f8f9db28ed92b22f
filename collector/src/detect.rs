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

mod builtin;
mod evaluate;
mod render;
mod schedule;

pub use builtin::*;
pub use evaluate::*;
pub use render::*;
pub use schedule::*;

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
