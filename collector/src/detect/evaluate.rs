//! Running detectors for a period over the lake and recording what they
//! found, and the lake's clocks (latest event, last evaluation) they follow.

use super::*;

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

pub(super) fn rows(
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
