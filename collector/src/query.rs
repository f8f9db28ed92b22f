//! SQL over the lake: the one DataFusion session setup shared by the
//! `query` command (and, later, the SQL endpoint and the detectors), and
//! the output formats of `query`.

use std::path::Path;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::lake::{self, LakeError};

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

/// A session with every lake table registered. Timestamps are shown in UTC.
pub async fn session(data_dir: &Path) -> Result<SessionContext, QueryError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .set_str("datafusion.execution.time_zone", "UTC");
    let ctx = SessionContext::new_with_config(config);
    lake::register(&ctx, data_dir).await?;
    ctx.sql(DEVICES_VIEW).await?;
    Ok(ctx)
}

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
