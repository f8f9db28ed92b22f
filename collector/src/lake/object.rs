//! The lake on an object store (S3 or an S3-compatible server), through the
//! `object_store` crate.
//!
//! Layout under the lake URL `s3://bucket/prefix`:
//!
//! ```text
//! {table}/date=2026-11-27/g000001-part-{instance}-{n}.parquet   data files
//! _driftline/manifests/{table}.json                             the table
//! ```
//!
//! An object store has no rename and no symbolic link, so a table is its
//! manifest: the files of each date partition, and the files replaced but
//! not yet deleted. Readers ([`ManifestTable`]) read the manifest first and
//! scan exactly the files it lists. Writers put a new file under a name
//! nobody else uses (put-if-absent), then replace the manifest with a
//! conditional put on its ETag. A writer that loses that race (another
//! collector committed first) re-reads the manifest, checks its keys
//! against the files added meanwhile, and tries again, so two collectors
//! never store one key twice and nothing needs a lock. Compaction writes the
//! merged file and swaps the partition's list in one manifest update;
//! retention drops dates the same way. Replaced files are deleted after the
//! grace period, so queries planned on the previous manifest can finish.
//!
//! The data files carry `date` as a column (the local lake has it in the
//! directory name), so both lakes show the same columns to SQL.
//!
//! Credentials and endpoint come from the standard `AWS_*` variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` for an S3-compatible server, `AWS_ALLOW_HTTP=true`
//! for one without TLS). The store must support conditional puts
//! (`If-Match`, `If-None-Match`): AWS S3 does, as do MinIO, Cloudflare R2
//! and moto.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use datafusion::arrow::array::{ArrayRef, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::{
    AsyncFileReader, MetadataSuffixFetch, ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder,
};
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::ExecutionPlan;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
pub use object_store::UpdateVersion;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use url::Url;

use super::LakeError;

/// One table's manifest.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Date partitions: their live files, paths relative to the lake URL.
    pub partitions: BTreeMap<String, Partition>,
    /// Files no longer in any partition, waiting for the grace period.
    #[serde(default)]
    pub retired: Vec<Retired>,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    /// Unique per creation of the partition: a date dropped by retention
    /// and written again is a new partition to every writer's key index.
    #[serde(default)]
    pub id: String,
    /// Bumped by each compaction; part of new file names.
    pub generation: u64,
    pub files: Vec<String>,
}

impl Partition {
    /// A new, empty partition.
    pub fn new(id: String) -> Self {
        Partition {
            id,
            generation: 0,
            files: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Retired {
    pub file: String,
    pub at: DateTime<Utc>,
}

impl Manifest {
    /// Every live file, sorted by partition.
    pub fn files(&self) -> impl Iterator<Item = &String> {
        self.partitions.values().flat_map(|p| p.files.iter())
    }
}

/// A manifest as read, with the version a conditional update must match
/// (`None`: the table has no manifest yet).
pub type Versioned = (Manifest, Option<UpdateVersion>);

/// A lake on an object store.
#[derive(Debug)]
pub struct ObjectLake {
    store: Arc<dyn ObjectStore>,
    /// The URL it was opened from with the `AWS_*` settings, to open it
    /// again with its own client ([`ObjectLake::reopen`]).
    source: Option<String>,
    /// `s3://bucket/`: what the store is registered under in DataFusion.
    store_url: Url,
    /// `s3://bucket/prefix/`: the lake's root.
    url: Url,
    /// `prefix`, as a path inside the bucket.
    prefix: ObjectPath,
}

fn store_error(what: String) -> impl FnOnce(object_store::Error) -> LakeError {
    move |source| LakeError::Store {
        what,
        source: Box::new(source),
    }
}

impl ObjectLake {
    /// The lake at `url` (`s3://bucket/prefix`), with credentials and
    /// endpoint from the `AWS_*` variables.
    pub fn from_url(url: &str) -> Result<Self, LakeError> {
        let invalid = |reason: String| LakeError::Location {
            url: url.to_owned(),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() != "s3" {
            return Err(invalid("only s3:// lakes are supported".into()));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| invalid("no bucket".into()))?
            .to_owned();
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let mut lake =
            Self::with_store(Arc::new(store), &parsed).map_err(|e| invalid(e.to_string()))?;
        lake.source = Some(url.to_owned());
        Ok(lake)
    }

    /// The same lake with its own store client (HTTP connections are
    /// driven by the runtime that opened them: the writer's live on the
    /// lake's I/O runtime, the query engine's on its own). A lake made
    /// with [`ObjectLake::with_store`] is shared as is.
    pub fn reopen(self: &Arc<Self>) -> Result<Arc<Self>, LakeError> {
        match &self.source {
            Some(url) => Ok(Arc::new(Self::from_url(url)?)),
            None => Ok(self.clone()),
        }
    }

    /// The lake at `url` in `store` (registered in DataFusion under the
    /// URL's scheme and bucket).
    pub fn with_store(store: Arc<dyn ObjectStore>, url: &Url) -> Result<Self, url::ParseError> {
        let bucket = url.host_str().unwrap_or_default();
        let prefix = url.path().trim_matches('/').to_owned();
        let store_url = Url::parse(&format!("{}://{bucket}/", url.scheme()))?;
        let root = if prefix.is_empty() {
            store_url.clone()
        } else {
            store_url.join(&format!("{prefix}/"))?
        };
        Ok(ObjectLake {
            store,
            source: None,
            store_url,
            url: root,
            prefix: ObjectPath::from(prefix),
        })
    }

    /// The lake's root URL, ending in `/`.
    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn store(&self) -> (&Url, Arc<dyn ObjectStore>) {
        (&self.store_url, self.store.clone())
    }

    fn path(&self, relative: &str) -> ObjectPath {
        relative
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn manifest_path(table: &str) -> String {
        format!("_driftline/manifests/{table}.json")
    }

    /// `table`'s manifest and its version (an empty manifest if none yet).
    pub async fn read_manifest(&self, table: &str) -> Result<Versioned, LakeError> {
        let name = Self::manifest_path(table);
        match self.store.get(&self.path(&name)).await {
            Ok(got) => {
                let version = UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let bytes = got.bytes().await.map_err(store_error(name.clone()))?;
                let manifest = serde_json::from_slice(&bytes).map_err(|e| LakeError::Manifest {
                    what: name,
                    reason: e.to_string(),
                })?;
                Ok((manifest, Some(version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok((Manifest::default(), None)),
            Err(e) => Err(store_error(name)(e)),
        }
    }

    /// Replaces `table`'s manifest if it is still at `version`. `false`:
    /// another writer changed it first (read it again and retry).
    pub async fn write_manifest(
        &self,
        table: &str,
        manifest: &Manifest,
        version: Option<UpdateVersion>,
    ) -> Result<bool, LakeError> {
        let name = Self::manifest_path(table);
        let body = serde_json::to_vec_pretty(manifest).map_err(|e| LakeError::Manifest {
            what: name.clone(),
            reason: e.to_string(),
        })?;
        let mode = match version {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        match self
            .store
            .put_opts(&self.path(&name), PutPayload::from(body), mode.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_error(name)(e)),
        }
    }

    /// Puts a new object; fails if the name is taken.
    pub async fn put_new(&self, relative: &str, bytes: Vec<u8>) -> Result<(), LakeError> {
        self.store
            .put_opts(
                &self.path(relative),
                PutPayload::from(bytes),
                PutMode::Create.into(),
            )
            .await
            .map(|_| ())
            .map_err(store_error(relative.to_owned()))
    }

    /// A whole object, in memory (the lake streams its reads instead,
    /// see [`ObjectLake::get_into`] and [`ObjectLake::read_columns`];
    /// tests read what was stored).
    #[cfg(test)]
    pub async fn get(&self, relative: &str) -> Result<Bytes, LakeError> {
        let what = relative.to_owned();
        let got = self
            .store
            .get(&self.path(relative))
            .await
            .map_err(store_error(what.clone()))?;
        got.bytes().await.map_err(store_error(what))
    }

    /// The `columns` of Parquet object `relative`, a batch at a time:
    /// ranged reads fetch the footer and those columns' chunks only.
    pub async fn read_columns(
        &self,
        relative: &str,
        columns: &[String],
    ) -> Result<ParquetRecordBatchStream<RangeReader>, LakeError> {
        let read = |source| LakeError::Read {
            path: PathBuf::from(relative),
            source,
        };
        let reader = RangeReader {
            store: self.store.clone(),
            path: self.path(relative),
        };
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(read)?;
        let mask =
            ProjectionMask::columns(builder.parquet_schema(), columns.iter().map(String::as_str));
        builder.with_projection(mask).build().map_err(read)
    }

    /// Copies object `relative` into `file` as it arrives, so an object of
    /// any size (a compacted day) is read with bounded memory.
    pub async fn get_into(
        &self,
        relative: &str,
        file: std::fs::File,
    ) -> Result<std::fs::File, LakeError> {
        let got = self
            .store
            .get(&self.path(relative))
            .await
            .map_err(store_error(relative.to_owned()))?;
        let mut stream = got.into_stream();
        let mut out = tokio::fs::File::from_std(file);
        let local = |source| LakeError::Io {
            path: PathBuf::from(relative),
            source,
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store_error(relative.to_owned()))?;
            out.write_all(&chunk).await.map_err(local)?;
        }
        out.flush().await.map_err(local)?;
        Ok(out.into_std().await)
    }

    /// Uploads local `file` as object `relative` in parts of [`PART`]
    /// bytes (a multipart upload, two parts in flight), so an object of
    /// any size is written with bounded memory; a failed upload is
    /// aborted. `relative` must be a new, unique name: unlike
    /// [`ObjectLake::put_new`] this does not check.
    pub async fn put_file(&self, relative: &str, file: std::fs::File) -> Result<(), LakeError> {
        let upload = self
            .store
            .put_multipart(&self.path(relative))
            .await
            .map_err(store_error(relative.to_owned()))?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART);
        let copied = match copy_parts(tokio::fs::File::from_std(file), &mut parts, relative).await {
            // Every part stored before completing: `finish` does not abort
            // the upload when a part failed.
            Ok(()) => parts
                .wait_for_capacity(0)
                .await
                .map_err(store_error(relative.to_owned())),
            Err(e) => Err(e),
        };
        if let Err(e) = copied {
            // S3 keeps an unfinished upload's parts (stored, not listed)
            // until it is aborted or a lifecycle rule removes them.
            if let Err(abort) = parts.abort().await {
                tracing::warn!(
                    object = relative,
                    error = %abort,
                    "cannot abort the multipart upload: a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes its parts"
                );
            }
            return Err(e);
        }
        parts
            .finish()
            .await
            .map(|_| ())
            .map_err(store_error(relative.to_owned()))
    }

    /// Deletes an object; one already gone is fine.
    pub async fn delete(&self, relative: &str) -> Result<(), LakeError> {
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(relative.to_owned())(e)),
        }
    }
}

/// A Parquet object read by byte ranges: the footer first (a suffix
/// request), then the column chunks a projection needs. The parquet
/// crate's recommended way to read from `object_store` (its own
/// `ParquetObjectReader` is deprecated).
pub struct RangeReader {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
}

fn parquet_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for RangeReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, datafusion::parquet::errors::Result<Bytes>> {
        self.store
            .get_range(&self.path, range)
            .map(|r| r.map_err(parquet_error))
            .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, datafusion::parquet::errors::Result<Vec<Bytes>>> {
        async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(parquet_error)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, datafusion::parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_via_suffix_and_finish(self)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

impl MetadataSuffixFetch for &mut RangeReader {
    fn fetch_suffix(
        &mut self,
        suffix: usize,
    ) -> BoxFuture<'_, datafusion::parquet::errors::Result<Bytes>> {
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Suffix(suffix as u64)),
            ..Default::default()
        };
        async move {
            let got = self
                .store
                .get_opts(&self.path, options)
                .await
                .map_err(parquet_error)?;
            got.bytes().await.map_err(parquet_error)
        }
        .boxed()
    }
}

/// The `columns` of Parquet object `relative` of `lake`, as an iterator for
/// synchronous code: each batch is fetched on the lake's I/O runtime when
/// asked for ([`ObjectLake::read_columns`]).
pub fn column_batches(
    lake: &Arc<ObjectLake>,
    relative: &str,
    columns: &[&str],
) -> Result<impl Iterator<Item = Result<RecordBatch, LakeError>>, LakeError> {
    let (l, name) = (lake.clone(), relative.to_owned());
    let columns: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
    let stream = block_on(async move { l.read_columns(&name, &columns).await })?;
    let path = PathBuf::from(relative);
    let mut stream = Some(stream);
    Ok(std::iter::from_fn(move || {
        let mut s = stream.take()?;
        let next = block_on(async move { Ok((s.next().await, s)) });
        match next {
            Ok((Some(batch), s)) => {
                stream = Some(s);
                Some(batch.map_err(|source| LakeError::Read {
                    path: path.clone(),
                    source,
                }))
            }
            Ok((None, _)) => None,
            Err(e) => Some(Err(e)),
        }
    }))
}

/// The part size of [`ObjectLake::put_file`] (S3 wants at least 5 MiB
/// for every part but the last).
const PART: usize = 8 << 20;

/// Feeds `file`, from its start, into `parts`.
async fn copy_parts(
    mut file: tokio::fs::File,
    parts: &mut WriteMultipart,
    relative: &str,
) -> Result<(), LakeError> {
    let local = |source| LakeError::Io {
        path: PathBuf::from(relative),
        source,
    };
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(local)?;
    let mut buf = vec![0; PART];
    loop {
        let n = file.read(&mut buf).await.map_err(local)?;
        if n == 0 {
            return Ok(());
        }
        parts
            .wait_for_capacity(2)
            .await
            .map_err(store_error(relative.to_owned()))?;
        parts.write(&buf[..n]);
    }
}

/// Runs `future` to completion on the lake's I/O runtime and waits for it,
/// from synchronous code (the lake writer is synchronous, like the local
/// file system it was written for). The caller's thread waits; the I/O
/// itself runs on the I/O runtime's own threads, so this works on any
/// thread, inside another runtime or not.
pub fn block_on<T: Send + 'static>(
    future: impl Future<Output = Result<T, LakeError>> + Send + 'static,
) -> Result<T, LakeError> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    let runtime = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("driftline-lake-io")
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
        .ok_or(LakeError::Runtime)?;
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().map_err(|_| LakeError::Runtime)?
}

/// `batch` with a constant `date` column appended: how data files on an
/// object store carry their partition.
pub fn with_date(batch: &RecordBatch, date: &str) -> Result<RecordBatch, LakeError> {
    let arrow = |source| LakeError::Arrow {
        table: "date column",
        source,
    };
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new("date", DataType::Utf8, false)));
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![date; batch.num_rows()])));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(arrow)
}

/// `schema` with the `date` column last, as [`with_date`] writes it and as
/// the local lake's partition column shows it.
pub fn schema_with_date(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new("date", DataType::Utf8, false)));
    Arc::new(Schema::new(fields))
}

/// A table of an object-store lake: each scan reads the manifest and
/// scans exactly the files it lists.
#[derive(Debug)]
pub struct ManifestTable {
    lake: Arc<ObjectLake>,
    table: &'static str,
    /// The table's schema, `date` included.
    schema: SchemaRef,
}

impl ManifestTable {
    pub fn new(lake: Arc<ObjectLake>, table: &'static str, schema: SchemaRef) -> Self {
        ManifestTable {
            lake,
            table,
            schema,
        }
    }
}

#[async_trait]
impl TableProvider for ManifestTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Used to prune row groups by their statistics; DataFusion still
        // filters the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let external = |e: LakeError| DataFusionError::External(Box::new(e));
        let (manifest, _) = self
            .lake
            .read_manifest(self.table)
            .await
            .map_err(external)?;
        let urls = manifest
            .files()
            .map(|f| ListingTableUrl::parse(format!("{}{f}", self.lake.url())))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        if urls.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(self.schema.clone());
        ListingTable::try_new(config)?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// Whether a replaced file's grace period is over (queries planned on the
/// manifest that still listed it have had time to finish).
pub fn retired_due(retired: &Retired, grace: Duration) -> bool {
    (Utc::now() - retired.at)
        .to_std()
        .is_ok_and(|age| age >= grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::schema::{job_events_batch, JobEvent};
    use crate::lake::{LakeWriter, Location, JOB_EVENTS};

    fn events(ids: std::ops::Range<u32>) -> RecordBatch {
        let at = Utc::now();
        let rows: Vec<JobEvent> = ids
            .map(|i| JobEvent {
                job_id: format!("job-{i}"),
                model_id: "m".into(),
                model_version: "1".into(),
                status: "pending".into(),
                at,
                period_end: at,
                detail: None,
                evidence: None,
            })
            .collect();
        job_events_batch(&rows).expect("batch")
    }

    /// A store whose next manifest update lands but is reported as
    /// "precondition failed", as when a retried request meets its own first
    /// attempt (when `armed`); it counts the bytes its reads return.
    #[derive(Debug, Default)]
    struct LostReply {
        inner: object_store::memory::InMemory,
        armed: std::sync::atomic::AtomicBool,
        bytes_read: std::sync::atomic::AtomicU64,
    }

    impl std::fmt::Display for LostReply {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "LostReply")
        }
    }

    #[async_trait]
    impl ObjectStore for LostReply {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let update = matches!(opts.mode, PutMode::Update(_));
            let result = self.inner.put_opts(location, payload, opts).await?;
            if update
                && location.as_ref().ends_with(".json")
                && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(object_store::Error::Precondition {
                    path: location.to_string(),
                    source: "the retry of a put that landed".into(),
                });
            }
            Ok(result)
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            let got = self.inner.get_opts(location, options).await?;
            self.bytes_read.fetch_add(
                got.range.end - got.range.start,
                std::sync::atomic::Ordering::SeqCst,
            );
            Ok(got)
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A manifest update that landed but was reported as failed must count
    /// as committed: deleting the file would lose rows the manifest lists.
    #[test]
    fn a_commit_reported_as_failed_is_recognised() {
        let url = Url::parse("s3://bucket/lake").expect("url");
        let store = Arc::new(LostReply::default());
        let lake = Arc::new(ObjectLake::with_store(store.clone(), &url).expect("lake"));
        let state = tempfile::tempdir().expect("tempdir");
        let writer =
            LakeWriter::open_at(&Location::Object(lake.clone()), state.path()).expect("writer");
        // The first append creates the manifest; the second updates it.
        assert_eq!(
            writer
                .append(JOB_EVENTS, "2026-11-20", &events(0..5))
                .expect("first")
                .rows,
            5
        );
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let second = writer
            .append(JOB_EVENTS, "2026-11-20", &events(3..10))
            .expect("second");
        assert_eq!((second.rows, second.duplicates), (5, 2));
        assert!(
            !store.armed.load(std::sync::atomic::Ordering::SeqCst),
            "the lost reply happened"
        );
        let (manifest, _) = block_on({
            let lake = lake.clone();
            async move { lake.read_manifest(JOB_EVENTS).await }
        })
        .expect("manifest");
        // Both files are listed and both still exist.
        assert_eq!(manifest.files().count(), 2);
        for file in manifest.files() {
            block_on({
                let (lake, file) = (lake.clone(), file.clone());
                async move { lake.get(&file).await }
            })
            .expect("a listed file exists");
        }
    }

    /// Two writers (two collectors) append overlapping rows to one table at
    /// the same time: the manifest's conditional updates make one of them
    /// retry against the other's files, and every key is stored once.
    #[test]
    fn concurrent_writers_store_each_key_once() {
        let url = Url::parse("s3://bucket/lake").expect("url");
        let store = Arc::new(object_store::memory::InMemory::new());
        let lake = Arc::new(ObjectLake::with_store(store, &url).expect("lake"));
        let location = Location::Object(lake.clone());
        let state = tempfile::tempdir().expect("tempdir");
        let writers: Vec<LakeWriter> = (0..2)
            .map(|_| LakeWriter::open_at(&location, state.path()).expect("writer"))
            .collect();
        let stored: usize = std::thread::scope(|s| {
            let handles: Vec<_> = writers
                .iter()
                .enumerate()
                .map(|(w, writer)| {
                    s.spawn(move || {
                        // Batches of 10 ids, shifted by 5 between writers
                        // and between rounds: every id is sent 2-4 times.
                        (0..20u32)
                            .map(|round| {
                                let start = round * 5 + w as u32 * 5;
                                writer
                                    .append(JOB_EVENTS, "2026-11-20", &events(start..start + 10))
                                    .expect("append")
                                    .rows
                            })
                            .sum::<usize>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("writer thread"))
                .sum()
        });
        // Ids 0..110 exist (the last batch of writer 1 ends at 5*19+5+10).
        assert_eq!(stored, 110);
        let (manifest, _) = block_on({
            let lake = lake.clone();
            async move { lake.read_manifest(JOB_EVENTS).await }
        })
        .expect("manifest");
        let mut ids = Vec::new();
        for file in manifest.files() {
            let bytes = block_on({
                let (lake, file) = (lake.clone(), file.clone());
                async move { lake.get(&file).await }
            })
            .expect("file");
            let reader =
                datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
                    bytes, 1024,
                )
                .expect("parquet");
            for batch in reader {
                let batch = batch.expect("batch");
                let column = batch.column_by_name("job_id").expect("job_id");
                let strings = column
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("strings");
                ids.extend(strings.iter().flatten().map(str::to_owned));
                assert!(batch.column_by_name("date").is_some());
            }
        }
        let total = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!((total, ids.len()), (110, 110));

        // Compaction leaves one file with the same rows; retention then
        // drops the partition.
        let compacted = writers[0].compact_all(2, Duration::ZERO).expect("compact");
        assert_eq!(compacted.len(), 1);
        assert_eq!(compacted[0].rows, 110);
        let (manifest, _) = block_on({
            let lake = lake.clone();
            async move { lake.read_manifest(JOB_EVENTS).await }
        })
        .expect("manifest");
        assert_eq!(manifest.files().count(), 1);
        assert!(manifest.retired.is_empty());
        let dropped = writers[1]
            .drop_before(chrono::NaiveDate::from_ymd_opt(2026, 11, 21).expect("date"))
            .expect("retention");
        assert_eq!(
            dropped,
            vec!["retrain_job_events/date=2026-11-20".to_owned()]
        );
        assert!(writers[1].dates(JOB_EVENTS).expect("dates").is_empty());
    }

    /// An object larger than a part goes up in parts and comes back whole,
    /// through local files on both ways.
    #[test]
    fn objects_larger_than_a_part_round_trip_through_files() {
        use std::io::{Read, Seek, Write};
        let url = Url::parse("s3://bucket/lake").expect("url");
        let store = Arc::new(object_store::memory::InMemory::new());
        let lake = Arc::new(ObjectLake::with_store(store, &url).expect("lake"));
        // Two and a half parts, each byte telling its offset apart.
        let data: Vec<u8> = (0..PART * 5 / 2).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(&data).expect("write");
        let l = lake.clone();
        block_on(async move { l.put_file("t/date=2026-11-20/big.parquet", file).await })
            .expect("upload");
        let l = lake.clone();
        let stored =
            block_on(async move { l.get("t/date=2026-11-20/big.parquet").await }).expect("get");
        assert!(
            stored == data,
            "{} bytes stored of {}",
            stored.len(),
            data.len()
        );
        let l = lake.clone();
        let mut back = block_on(async move {
            let file = tempfile::tempfile().expect("tempfile");
            l.get_into("t/date=2026-11-20/big.parquet", file).await
        })
        .expect("download");
        let mut read = Vec::new();
        back.rewind().expect("rewind");
        back.read_to_end(&mut read).expect("read");
        assert!(
            read == data,
            "{} bytes read back of {}",
            read.len(),
            data.len()
        );
    }

    /// Reading some columns of an object fetches its footer and those
    /// columns' chunks, not the object.
    #[test]
    fn column_reads_fetch_only_the_projected_columns() {
        use datafusion::arrow::array::Int64Array;
        let rows = 20_000;
        let key: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows));
        // A wide column that does not compress: most of the object.
        let payload: ArrayRef =
            Arc::new(StringArray::from_iter_values((0..rows).map(|i| {
                format!("{:064x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            })));
        let batch =
            RecordBatch::try_from_iter([("key", key), ("payload", payload)]).expect("batch");
        let mut bytes = Vec::new();
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None)
                .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let size = bytes.len() as u64;

        let store = Arc::new(LostReply::default());
        let url = Url::parse("s3://bucket/lake").expect("url");
        let lake = Arc::new(ObjectLake::with_store(store.clone(), &url).expect("lake"));
        let l = lake.clone();
        block_on(async move { l.put_new("t/f.parquet", bytes).await }).expect("put");
        let keys: Vec<i64> = column_batches(&lake, "t/f.parquet", &["key"])
            .expect("open")
            .flat_map(|b| {
                let b = b.expect("batch");
                assert_eq!(b.num_columns(), 1);
                let keys = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("i64");
                keys.values().to_vec()
            })
            .collect();
        assert_eq!(keys, (0..rows).collect::<Vec<_>>());
        let read = store.bytes_read.load(std::sync::atomic::Ordering::SeqCst);
        assert!(read * 5 < size, "read {read} of {size} bytes");
    }
}
