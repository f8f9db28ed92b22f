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
//! (and likewise `status`, `detector_runs`, `drift_events`,
//! `retrain_job_events`, `histogram_edge_sets`).
//!
//! `metrics` is partitioned by the date of `window_start` (event time),
//! `quarantine` by the date of `received_at`. Files are zstd-compressed and
//! sorted by `model_id`, `window_start`, `device_id`. A file is written under
//! a hidden temporary name, fsynced, then renamed into place, so readers
//! never see a partial file. `{instance}` is unique per collector process, so
//! several collectors can write to one lake.
//!
//! The lake can also live on S3 or an S3-compatible store (`--lake
//! s3://bucket/prefix`): see [`object`].

pub mod object;
pub mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;

/// The tables of the lake, by name as seen in SQL.
pub const METRICS: &str = "metrics";
pub const QUARANTINE: &str = "quarantine";
pub const STATUS: &str = "status";
pub const DETECTOR_RUNS: &str = "detector_runs";
pub const DRIFT_EVENTS: &str = "drift_events";
pub const JOB_EVENTS: &str = "retrain_job_events";
/// The distinct histogram edges of `metrics` rows (see
/// [`schema::edge_sets`]), written with them.
pub const EDGE_SETS: &str = "histogram_edge_sets";
/// A table of the lake. Registration in SQL, the key index, writing and
/// compaction all read this one entry: adding a table is adding an entry
/// to [`TABLES`], and a name not there is an error, never a table that
/// silently stores nothing.
#[derive(Debug)]
pub struct TableSpec {
    /// Its name in SQL and its directory.
    pub name: &'static str,
    /// The schema of its files (the lake adds the `date` partition column).
    pub schema: fn() -> SchemaRef,
    /// The columns that identify a row: two rows with equal keys are the
    /// same fact, stored once.
    pub key: &'static [&'static str],
    /// The column that tells a redelivery from a conflicting message: rows
    /// with one key and one version are the same message delivered again (a
    /// retry, a replay from the write-ahead log); with another version, a
    /// second message for a fact already stored (a device re-sending a
    /// window under a new seq), which is not stored and is reported as a
    /// conflict.
    pub version: Option<&'static str>,
}

impl TableSpec {
    /// The key columns and the version column: what the index reads of a
    /// file.
    pub fn index_columns(&self) -> Vec<&'static str> {
        let mut columns = self.key.to_vec();
        columns.extend(self.version);
        columns
    }
}

/// The key of `detector_runs` and `drift_events`: a late arrival
/// re-evaluates a period as a new revision.
const EVALUATION_KEY: &[&str] = &[
    "detector",
    "model_id",
    "model_version",
    "statistic",
    "current_start",
    "revision",
];

/// Every table stored in the lake.
pub const TABLES: [TableSpec; 7] = [
    TableSpec {
        name: METRICS,
        schema: schema::metrics,
        // One window of one device (of its fleet: ids are unique within a
        // fleet) and model version counts once, whatever its seq.
        key: &[
            "fleet",
            "device_id",
            "model_id",
            "model_version",
            "window_start",
            "window_secs",
        ],
        version: Some("seq"),
    },
    TableSpec {
        name: QUARANTINE,
        schema: schema::quarantine,
        key: &["received_at", "topic", "payload"],
        version: None,
    },
    TableSpec {
        name: STATUS,
        schema: schema::status,
        key: &["device_id", "at", "state"],
        version: None,
    },
    TableSpec {
        name: DETECTOR_RUNS,
        schema: schema::evaluations,
        key: EVALUATION_KEY,
        version: None,
    },
    TableSpec {
        name: DRIFT_EVENTS,
        schema: schema::evaluations,
        key: EVALUATION_KEY,
        version: None,
    },
    TableSpec {
        name: JOB_EVENTS,
        schema: schema::job_events,
        key: &["job_id", "status"],
        version: None,
    },
    TableSpec {
        name: EDGE_SETS,
        schema: schema::edge_sets,
        key: &schema::EDGE_SET_COLUMNS,
        version: None,
    },
];

/// The table named `name`.
pub fn table(name: &str) -> Result<&'static TableSpec, LakeError> {
    TABLES
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| LakeError::UnknownTable(name.to_owned()))
}

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
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: datafusion::parquet::errors::ParquetError,
    },
    #[error("cannot register table {table}: {source}")]
    Register {
        table: &'static str,
        source: datafusion::error::DataFusionError,
    },
    #[error("object store, {what}: {source}")]
    Store {
        what: String,
        source: Box<object_store::Error>,
    },
    #[error("lake {url}: {reason}")]
    Location { url: String, reason: String },
    #[error("manifest {what}: {reason}")]
    Manifest { what: String, reason: String },
    #[error("table {table}: other writers kept changing its manifest; try again")]
    Contention { table: &'static str },
    #[error("the lake's I/O runtime is not running")]
    Runtime,
    #[error("the lake has no table {0}")]
    UnknownTable(String),
}

impl LakeError {
    /// Whether a later attempt may succeed (disk full, permissions fixed).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LakeError::Io { .. } | LakeError::Store { .. } | LakeError::Contention { .. }
        )
    }
}

/// Where a lake lives: a directory, or an object store.
#[derive(Debug, Clone)]
pub enum Location {
    Dir(PathBuf),
    Object(Arc<object::ObjectLake>),
}

impl Location {
    /// `--lake URL` when given, else the data directory.
    pub fn resolve(lake: Option<&str>, data_dir: &Path) -> Result<Self, LakeError> {
        match lake {
            Some(url) => Ok(Location::Object(Arc::new(object::ObjectLake::from_url(
                url,
            )?))),
            None => Ok(Location::Dir(data_dir.to_path_buf())),
        }
    }
}

/// Writes Parquet files into one lake directory: see [`writer`].
pub use writer::{Appended, Compacted, LakeWriter};

/// Registers the lake's tables in `ctx`, creating empty directories if the
/// lake is new. Files written later are seen by later queries.
pub async fn register(ctx: &SessionContext, location: &Location) -> Result<(), LakeError> {
    // Text columns are read as `Utf8View` unless the session turns
    // DataFusion's `schema_force_view_types` off (see `schema::for_reading`).
    let views = ctx
        .state()
        .config()
        .options()
        .execution
        .parquet
        .schema_force_view_types;
    let read = |schema: SchemaRef| {
        if views {
            schema::for_reading(&schema)
        } else {
            schema
        }
    };
    let root = match location {
        Location::Dir(root) => root,
        Location::Object(lake) => return register_object(ctx, lake, read),
    };
    for table in &TABLES {
        register_table(ctx, root, table.name, read((table.schema)())).await?;
    }
    Ok(())
}

/// The tables of an object-store lake: each scan reads the table's
/// manifest (see [`object::ManifestTable`]).
fn register_object(
    ctx: &SessionContext,
    lake: &Arc<object::ObjectLake>,
    read: impl Fn(SchemaRef) -> SchemaRef,
) -> Result<(), LakeError> {
    let (url, store) = lake.store();
    ctx.register_object_store(url, store);
    for spec in &TABLES {
        let (table, schema) = (spec.name, read(object::schema_with_date(&(spec.schema)())));
        let provider = object::ManifestTable::new(lake.clone(), table, schema);
        ctx.register_table(table, Arc::new(provider))
            .map_err(|source| LakeError::Register { table, source })?;
    }
    Ok(())
}

async fn register_table(
    ctx: &SessionContext,
    root: &Path,
    table: &'static str,
    table_schema: SchemaRef,
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
        .with_schema(table_schema);
    let listing = ListingTable::try_new(config).map_err(register)?;
    ctx.register_table(table, Arc::new(listing))
        .map_err(register)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_s_key_and_version_are_columns_of_its_schema() {
        for table in &TABLES {
            let schema = (table.schema)();
            for column in table.index_columns() {
                assert!(
                    schema.field_with_name(column).is_ok(),
                    "{}: no column {column}",
                    table.name
                );
            }
            assert!(!table.key.is_empty(), "{} has a key", table.name);
        }
    }

    #[test]
    fn writing_to_an_unknown_table_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = LakeWriter::open(dir.path()).expect("lake");
        let batch = schema::metrics_batch(&[]).expect("empty batch");
        let err = lake
            .append("metricz", "2026-11-27", &batch)
            .expect_err("unknown table");
        assert!(
            matches!(err, LakeError::UnknownTable(ref t) if t == "metricz"),
            "{err}"
        );
        assert!(!dir.path().join("metricz").exists(), "nothing was created");
        assert!(table(METRICS).is_ok());
    }
}
