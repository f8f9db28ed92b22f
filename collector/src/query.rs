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
    Ok(ctx)
}

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
