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

use crate::lake::{self, LakeError};

mod information_schema;
mod pg;
pub use pg::setting;

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
    session_with_limit(data_dir, None).await
}

/// [`session`] whose queries together may use at most `memory_limit`
/// bytes: a query that needs more fails with "Resources exhausted" and
/// leaves the others alone.
pub async fn session_with_limit(
    data_dir: &Path,
    memory_limit: Option<usize>,
) -> Result<SessionContext, QueryError> {
    let config = SessionConfig::new()
        // Replaced by `information_schema` with PostgreSQL type names below.
        .with_information_schema(false)
        .with_default_catalog_and_schema(CATALOG, "public")
        .set_str("datafusion.execution.time_zone", "UTC");
    let mut runtime = RuntimeEnvBuilder::new();
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
    lake::register(&ctx, data_dir).await?;
    ctx.sql(DEVICES_VIEW).await?;
    datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
        &ctx,
        CATALOG,
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|e| QueryError::Sql(*e))?;
    ctx.register_udf(pg::current_setting());
    if let Some(catalog) = ctx.catalog(CATALOG) {
        let catalogs = ctx.state().catalog_list().clone();
        catalog.register_schema(
            information_schema::NAME,
            Arc::new(information_schema::PgInformationSchema::new(catalogs)),
        )?;
    }
    Ok(ctx)
}

/// The catalog (PostgreSQL: database) the tables live in.
pub const CATALOG: &str = "driftline";

/// `devices`: one row per device seen in `metrics` or `status`: its last
/// status (online, or offline from its last will), when it was last heard
/// from, its agent and model versions and its privacy budget.
pub const DEVICES_VIEW: &str = "
CREATE VIEW devices AS
WITH seen AS (
    SELECT device_id,
           max(fleet) AS fleet,
           max(received_at) AS last_seen,
           max(window_start) AS last_window_start,
           count(*) AS windows,
           array_to_string(array_sort(array_distinct(array_agg(model_id || '@' || model_version))), ',') AS model_versions,
           max(agent_version) AS agent_version
    FROM metrics GROUP BY device_id
), last_status AS (
    SELECT * FROM (
        SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY at DESC, received_at DESC) AS rn
        FROM status
    ) WHERE rn = 1
)
SELECT coalesce(s.device_id, l.device_id) AS device_id,
       coalesce(s.fleet, l.fleet) AS fleet,
       coalesce(l.state, 'unknown') AS state,
       l.at AS state_since,
       CASE WHEN s.last_seen IS NULL THEN l.received_at
            WHEN l.received_at IS NULL THEN s.last_seen
            ELSE greatest(s.last_seen, l.received_at) END AS last_seen,
       s.last_window_start,
       coalesce(s.windows, 0) AS windows,
       coalesce(l.agent_version, s.agent_version) AS agent_version,
       coalesce(s.model_versions, l.models) AS model_versions,
       l.budget_remaining_rho,
       coalesce(l.budget_exhausted, false) AS budget_exhausted,
       l.buffered_windows,
       l.lost_windows
FROM seen s FULL OUTER JOIN last_status l ON s.device_id = l.device_id
";

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
