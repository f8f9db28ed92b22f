//! The lake: Parquet files under the data directory, and the DataFusion
//! tables over them.
//!
//! Layout (hive-style, partitioned by UTC date):
//!
//! ```text
//! {data_dir}/metrics/date=2026-11-27/part-{instance}-{counter}.parquet
//! {data_dir}/quarantine/date=2026-11-27/part-{instance}-{counter}.parquet
//! ```
//!
//! `metrics` is partitioned by the date of `window_start` (event time),
//! `quarantine` by the date of `received_at`. Files are zstd-compressed and
//! sorted by `model_id`, `window_start`, `device_id`. A file is written under
//! a hidden temporary name, fsynced, then renamed into place, so readers
//! never see a partial file. `{instance}` is unique per collector process, so
//! several collectors can write to one lake.

pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::SessionContext;

/// The tables of the lake, by name as seen in SQL.
pub const METRICS: &str = "metrics";
pub const QUARANTINE: &str = "quarantine";

/// Errors of the lake.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode Parquet for {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: datafusion::parquet::errors::ParquetError,
    },
    #[error("cannot build an Arrow batch for {table}: {source}")]
    Arrow {
        table: &'static str,
        source: datafusion::arrow::error::ArrowError,
    },
    #[error("cannot register table {table}: {source}")]
    Register {
        table: &'static str,
        source: datafusion::error::DataFusionError,
    },
}

impl LakeError {
    /// Whether a later attempt may succeed (disk full, permissions fixed).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LakeError::Io { .. })
    }
}

/// Writes Parquet files into one lake directory.
#[derive(Debug)]
pub struct LakeWriter {
    root: PathBuf,
    instance: String,
    counter: AtomicU64,
}

impl LakeWriter {
    /// A writer for the lake at `root`, creating the table directories.
    pub fn open(root: &Path) -> Result<Self, LakeError> {
        for table in [METRICS, QUARANTINE] {
            let dir = root.join(table);
            std::fs::create_dir_all(&dir).map_err(|source| LakeError::Io { path: dir, source })?;
        }
        Ok(LakeWriter {
            root: root.to_path_buf(),
            instance: instance_id(),
            counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `batch` as one new file of `table` in partition `date=...`.
    /// Returns the file's path.
    pub fn write(
        &self,
        table: &str,
        date: &str,
        batch: &RecordBatch,
    ) -> Result<PathBuf, LakeError> {
        let dir = self.root.join(table).join(format!("date={date}"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LakeError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("part-{}-{n:08}.parquet", self.instance);
        let tmp = dir.join(format!(".{name}.tmp"));
        let path = dir.join(&name);
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let parquet = |source| LakeError::Parquet {
            path: tmp.clone(),
            source,
        };
        let mut writer =
            ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(parquet)?;
        writer.write(batch).map_err(parquet)?;
        let file = writer.into_inner().map_err(parquet)?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(path)
    }
}

/// A name unique to this process: start time and pid.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}{:05x}",
        nanos & 0xffff_ffff_ffff,
        std::process::id() & 0xfffff
    )
}

/// Registers the lake's tables in `ctx`, creating empty directories if the
/// lake is new. Files written later are seen by later queries.
pub async fn register(ctx: &SessionContext, root: &Path) -> Result<(), LakeError> {
    for (table, schema) in [
        (METRICS, schema::metrics()),
        (QUARANTINE, schema::quarantine()),
    ] {
        register_table(ctx, root, table, schema).await?;
    }
    Ok(())
}

async fn register_table(
    ctx: &SessionContext,
    root: &Path,
    table: &'static str,
    file_schema: SchemaRef,
) -> Result<(), LakeError> {
    let dir = root.join(table);
    std::fs::create_dir_all(&dir).map_err(|source| LakeError::Io {
        path: dir.clone(),
        source,
    })?;
    let register = |source| LakeError::Register { table, source };
    let url = ListingTableUrl::parse(format!("{}/", dir.display())).map_err(register)?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![("date".to_owned(), DataType::Utf8)]);
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(file_schema);
    let listing = ListingTable::try_new(config).map_err(register)?;
    ctx.register_table(table, Arc::new(listing))
        .map_err(register)?;
    Ok(())
}
