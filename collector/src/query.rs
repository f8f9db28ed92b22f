//! SQL over the lake: the one DataFusion session setup shared by the
//! `query` command (and, later, the SQL endpoint and the detectors), and
//! the output formats of `query`.

use std::path::Path;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use std::sync::Arc;

use crate::lake::{self, LakeError, Location};

pub mod checked_sum;
mod date_trunc;
mod information_schema;
mod json;
pub mod limits;
pub mod pg;
pub mod stats;

/// Errors of a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("{0}")]
    Sql(#[from] DataFusionError),
    #[error("cannot format the result: {0}")]
    Format(#[from] datafusion::arrow::error::ArrowError),
}

/// Output format of `driftline-collector query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// A session with every lake table registered, the PostgreSQL catalog
/// (`pg_catalog`, `current_setting`, ...) and no memory limit. Timestamps
/// are shown in UTC.
pub async fn session(data_dir: &Path) -> Result<SessionContext, QueryError> {
    session_at(&Location::Dir(data_dir.to_path_buf()), None).await
}

/// [`session`] whose queries together may use at most `memory_limit`
/// bytes: a query that needs more fails with "Resources exhausted" and
/// leaves the others alone.
pub async fn session_with_limit(
    data_dir: &Path,
    memory_limit: Option<usize>,
) -> Result<SessionContext, QueryError> {
    session_at(&Location::Dir(data_dir.to_path_buf()), memory_limit).await
}

/// [`session_with_limit`] over the lake at `location` (a directory or an
/// object store).
pub async fn session_at(
    location: &Location,
    memory_limit: Option<usize>,
) -> Result<SessionContext, QueryError> {
    // DATAFUSION_* environment variables tune the engine (for example
    // DATAFUSION_EXECUTION_BATCH_SIZE); Driftline's own settings follow.
    let config = SessionConfig::from_env()?
        // Replaced by `information_schema` with PostgreSQL type names below.
        .with_information_schema(false)
        .with_default_catalog_and_schema(CATALOG, "public")
        .set_str("datafusion.execution.time_zone", "UTC");
    // Filters are applied while decoding Parquet: the columns of rows a
    // detector's time range excludes are never decoded or copied (5 of the
    // 6 comparable detectors ran 10-25 % faster, BENCHMARKS.md "Queries").
    let config = default_option(
        config,
        "datafusion.execution.parquet.pushdown_filters",
        "true",
    );
    // Twice as many partitions as cores. A file scan is split into one byte
    // range per partition before statistics prune row groups, so the rows
    // of a recent time range or of one model (sorted together in a file)
    // sat in one range and were decoded on one core while the other idled.
    // With smaller ranges, DataFusion's work stealing hands the busy ones
    // to idle cores: the Grafana-shaped series went from 1.67x to 0.94x of
    // DuckDB's time, other queries within noise (BENCHMARKS.md, "Queries").
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let config = default_option(
        config,
        "datafusion.execution.target_partitions",
        &(2 * cores).to_string(),
    );
    // No cache of directory listings: a long-lived session (the SQL
    // endpoint, detection) must see the files flushed after it started.
    let mut runtime = RuntimeEnvBuilder::new().with_object_list_cache_limit(0);
    if let Some(bytes) = memory_limit {
        // A hard limit: no spilling to temporary files, which would trade
        // the memory bound for an unbounded disk.
        runtime = runtime
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(bytes)))
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            );
    }
    let ctx = SessionContext::new_with_config_rt(config, runtime.build_arc()?);
    // Before any view is planned: views keep the `sum` they were planned with.
    ctx.register_udaf(checked_sum::udaf());
    lake::register(&ctx, location).await?;
    for (_, sql) in VIEWS {
        ctx.sql(sql).await?;
    }
    datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
        &ctx,
        CATALOG,
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|e| QueryError::Sql(*e))?;
    pg::add_missing_columns(&ctx, CATALOG).await?;
    ctx.register_udf(pg::current_setting());
    ctx.register_udf(pg::version());
    ctx.register_udf(pg::to_regtype());
    ctx.register_udf(pg::json_build_object());
    for udf in pg::visibility_functions() {
        ctx.register_udf(udf);
    }
    for udf in pg::null_catalog_functions() {
        ctx.register_udf(udf);
    }
    ctx.register_udf(date_trunc::udf());
    for udf in stats::udfs()
        .into_iter()
        .chain(stats::count_udfs())
        .chain(stats::custom_udfs())
    {
        ctx.register_udf(udf);
    }
    for udaf in std::iter::once(stats::category_sum_udaf()).chain(stats::custom_udafs()) {
        ctx.register_udaf(udaf);
    }
    ctx.sql(&model_windows_view()).await?;
    if let Some(catalog) = ctx.catalog(CATALOG) {
        let catalogs = ctx.state().catalog_list().clone();
        catalog.register_schema(
            information_schema::NAME,
            Arc::new(information_schema::PgInformationSchema::new(catalogs)),
        )?;
    }
    Ok(ctx)
}

/// Sets DataFusion option `key` to Driftline's default `value`, unless its
/// environment variable (`datafusion.a.b` is `DATAFUSION_A_B`, as
/// [`SessionConfig::from_env`] reads it) already decided.
fn default_option(config: SessionConfig, key: &str, value: &str) -> SessionConfig {
    let var = key.replace('.', "_").to_uppercase();
    if std::env::var_os(var).is_some() {
        config
    } else {
        config.set_str(key, value)
    }
}

/// The views of every session, from `queries/views/` (each file says what
/// its view is for), in the order they are created. `model_windows`, whose
/// SQL repeats per histogram bucket, is built by [`model_windows_view`].
pub const VIEWS: [(&str, &str); 5] = [
    ("devices", include_str!("../../queries/views/devices.sql")),
    ("privacy", include_str!("../../queries/views/privacy.sql")),
    (
        "detector_results",
        include_str!("../../queries/views/detector_results.sql"),
    ),
    (
        "retrain_jobs",
        include_str!("../../queries/views/retrain_jobs.sql"),
    ),
    (
        "histogram_edges",
        include_str!("../../queries/views/histogram_edges.sql"),
    ),
];

/// `model_windows`: fleet aggregates per model, version and window, with
/// the standard error of each noised sum (from the noise scales every row
/// carries) and the mean latency estimated from the fleet histogram.
/// Sums of noised counts are unbiased; rates are ratios of unbiased sums.
pub fn model_windows_view() -> String {
    let se = |count: &str, scale: &str| {
        format!(
            "sum({count}) AS {name}, sqrt(sum(noise_var(mechanism, {scale}))) AS {name}_se",
            name = match count {
                "inference_count" => "inferences",
                "error_count" => "errors",
                "feedback_negative" => "negative_feedback",
                "feedback_positive" => "positive_feedback",
                other => other,
            }
        )
    };
    let sum_of = |terms: &[String]| format!("({})", terms.join(" + "));
    let buckets: Vec<String> = (0..driftline_core::histogram::MAX_BUCKETS)
        .map(|i| format!("sum(latency_ms_b{i:02}) AS l{i:02}"))
        .collect();
    // Bucket k spans edges[k+1] .. edges[k+2] (arrays are 1-based); its
    // midpoint stands for its latencies. Missing buckets are NULL: skipped.
    let weighted: Vec<String> = (0..driftline_core::histogram::MAX_BUCKETS)
        .map(|i| {
            format!(
                "coalesce(l{i:02} * (latency_ms_edges[{a}] + latency_ms_edges[{b}]) / 2.0, 0)",
                a = i + 1,
                b = i + 2
            )
        })
        .collect();
    let totals: Vec<String> = (0..driftline_core::histogram::MAX_BUCKETS)
        .map(|i| format!("coalesce(l{i:02}, 0)"))
        .collect();
    let mid = |i: usize| {
        format!(
            "(latency_ms_edges[{a}] + latency_ms_edges[{b}]) / 2.0",
            a = i + 1,
            b = i + 2
        )
    };
    let present = |i: usize, x: String| format!("CASE WHEN l{i:02} IS NULL THEN 0 ELSE {x} END");
    let m1: Vec<String> = (0..driftline_core::histogram::MAX_BUCKETS)
        .map(|i| present(i, mid(i)))
        .collect();
    let m2: Vec<String> = (0..driftline_core::histogram::MAX_BUCKETS)
        .map(|i| present(i, format!("{m} * {m}", m = mid(i))))
        .collect();
    let k: Vec<String> = (0..driftline_core::histogram::MAX_BUCKETS)
        .map(|i| present(i, "1".into()))
        .collect();
    format!(
        "CREATE VIEW model_windows AS
SELECT model_id, model_version, window_start, window_secs, devices, epsilon,
       inferences, inferences_se, errors, errors_se,
       negative_feedback, negative_feedback_se, positive_feedback, positive_feedback_se,
       CAST(errors AS DOUBLE) / nullif(inferences, 0) AS error_rate,
       CAST(negative_feedback AS DOUBLE) / nullif(inferences, 0) AS negative_feedback_rate,
       latency_n / nullif(latency_d, 0) AS latency_mean_ms,
       -- Delta method: Var(N/D) ~ (Var N - 2 r Cov(N,D) + r^2 Var D) / D^2,
       -- every bucket carrying the same noise variance latency_var.
       sqrt(greatest(latency_var * (latency_m2 - 2.0 * (latency_n / latency_d) * latency_m1
            + (latency_n / latency_d) * (latency_n / latency_d) * latency_k), 0))
            / abs(nullif(latency_d, 0)) AS latency_mean_se
FROM (
  SELECT w.*, e.latency_ms_edges, {weighted} AS latency_n, {totals} AS latency_d,
         {m1} AS latency_m1, {m2} AS latency_m2, {k} AS latency_k
  FROM (
    SELECT model_id, model_version, window_start, max(window_secs) AS window_secs,
           count(DISTINCT device_id) AS devices, max(epsilon) AS epsilon,
           {inferences}, {errors}, {negative}, {positive},
           sum(noise_var(mechanism, scale_latency_ms)) AS latency_var,
           {buckets}
    FROM metrics
    GROUP BY model_id, model_version, window_start
  ) w
  LEFT JOIN histogram_edges e ON e.model_id = w.model_id AND e.model_version = w.model_version
)",
        weighted = sum_of(&weighted),
        totals = sum_of(&totals),
        m1 = sum_of(&m1),
        m2 = sum_of(&m2),
        k = sum_of(&k),
        inferences = se("inference_count", "scale_inference_count"),
        errors = se("error_count", "scale_error_count"),
        negative = se("feedback_negative", "scale_feedback"),
        positive = se("feedback_positive", "scale_feedback"),
        buckets = buckets.join(", "),
    )
}

/// The catalog (PostgreSQL: database) the tables live in.
pub const CATALOG: &str = "driftline";

/// Runs one read-only statement: DDL, DML and `SET`-like statements are
/// refused with an error.
pub async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, options).await?;
    Ok(df.collect().await?)
}

/// Renders batches in `format`.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<String, QueryError> {
    use datafusion::arrow::{csv, json, util::pretty};
    Ok(match format {
        Format::Table => pretty::pretty_format_batches(batches)?.to_string(),
        Format::Csv => {
            let mut out = Vec::new();
            let mut w = csv::WriterBuilder::new().with_header(true).build(&mut out);
            for b in batches {
                w.write(b)?;
            }
            drop(w);
            String::from_utf8_lossy(&out).into_owned()
        }
        Format::Json => {
            let mut out = Vec::new();
            let mut w = json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            String::from_utf8_lossy(&out).into_owned()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `queries/views/` is a view of every session.
    #[test]
    fn the_views_are_the_shipped_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries/views");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .expect("queries/views")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        shipped.sort();
        let mut built_in: Vec<String> = VIEWS.iter().map(|(n, _)| format!("{n}.sql")).collect();
        built_in.sort();
        assert_eq!(built_in, shipped);
        for (name, sql) in VIEWS {
            assert!(sql.contains(&format!("CREATE VIEW {name} AS")), "{name}");
        }
    }
}
