//! Writing the lake: exactly-once appends, compaction and retention.
//!
//! A partition `{table}/date=D` is a symbolic link to a *generation*
//! directory `_driftline/gens/{table}/date=D/gNNNNNN`. Appends add files to
//! the current generation; compaction writes a new generation and swaps the
//! link with one `rename`, so a reader lists either every old file or the
//! one new file, never a mix. Old generations are deleted after a grace
//! period, so queries planned against them can finish.
//!
//! Every row has a key (see [`super::TableSpec`]); a partition's keys are kept in
//! memory while the partition is written to, and rows whose key is already
//! in the partition are dropped: as duplicates when their
//! [`super::TableSpec::version`] matches the stored row's (the same message delivered
//! again), as conflicts otherwise (another message claiming the same fact),
//! which the caller quarantines. Writers of one table take an
//! exclusive lock (`_driftline/locks/{table}.lock`) around
//! read-index-then-write, so several collectors on one lake never store a
//! key twice.
//!
//! On an object store (see [`super::object`]) the same writer keeps the
//! same promises with a manifest per table instead of links and locks.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chrono::NaiveDate;
use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::compute::{concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::{ArrowWriter, ProjectionMask};
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

use super::object::{self, ObjectLake};
use super::{schema, LakeError, Location, EDGE_SETS, METRICS, TABLES};

/// A row's key hash and its version (0 for tables without a version).
type KeyVersion = (u128, i64);

/// Rows per Parquet row group: small enough that statistics prune a scan,
/// large enough that a scan reads big sequential chunks.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Partitions not written to for this long leave the in-memory key index.
const INDEX_IDLE: Duration = Duration::from_secs(3600);

/// What one [`LakeWriter::append`] did.
#[derive(Debug, Default)]
pub struct Appended {
    /// The new file, if any row was new.
    pub path: Option<PathBuf>,
    pub rows: usize,
    pub duplicates: usize,
    /// Rows not stored because the partition holds their key under another
    /// version: (row of the batch, version stored).
    pub conflicts: Vec<(usize, i64)>,
}

/// What compacting one partition did.
#[derive(Debug)]
pub struct Compacted {
    pub table: &'static str,
    pub date: String,
    pub files_before: usize,
    pub rows: usize,
    pub duplicates: usize,
}

/// Keys of one partition (with each key's version), as of the files listed
/// in `files`.
struct PartitionIndex {
    generation: PathBuf,
    files: HashSet<String>,
    keys: HashMap<u128, i64>,
    used: Instant,
}

/// Which rows of a batch to store: those whose key neither `known` nor
/// `added` holds (adding them to `added`). The others are duplicates, or
/// conflicts when the version differs; both are counted into `appended`.
fn new_rows(
    known: Option<&HashMap<u128, i64>>,
    added: &mut HashMap<u128, i64>,
    keys: &[KeyVersion],
    appended: &mut Appended,
) -> BooleanArray {
    let keep: BooleanArray = keys
        .iter()
        .enumerate()
        .map(|(row, (key, version))| {
            let stored = match known.and_then(|k| k.get(key)) {
                Some(stored) => Some(*stored),
                None => match added.entry(*key) {
                    Entry::Vacant(e) => {
                        e.insert(*version);
                        None
                    }
                    Entry::Occupied(e) => Some(*e.get()),
                },
            };
            if let Some(stored) = stored.filter(|stored| stored != version) {
                appended.conflicts.push((row, stored));
            }
            Some(stored.is_none())
        })
        .collect();
    appended.rows = keep.true_count();
    appended.duplicates = keys.len() - appended.rows - appended.conflicts.len();
    keep
}

/// How many times an append to an object-store lake retries after
/// another writer changed the manifest first.
const MANIFEST_RETRIES: usize = 50;

/// The index entry of one partition, marked as used. An entry of another
/// generation (another collector compacted the partition, or re-created
/// it) starts over empty.
fn partition_entry<'a>(
    index: &'a mut HashMap<(&'static str, String), PartitionIndex>,
    table: &'static str,
    date: &str,
    generation: &Path,
) -> &'a mut PartitionIndex {
    let empty = || PartitionIndex {
        generation: generation.to_path_buf(),
        files: HashSet::new(),
        keys: HashMap::new(),
        used: Instant::now(),
    };
    let entry = index.entry((table, date.to_owned())).or_insert_with(empty);
    if entry.generation != generation {
        *entry = empty();
    }
    entry.used = Instant::now();
    entry
}

/// Writes Parquet files into one lake directory, or into a lake on an
/// object store.
pub struct LakeWriter {
    /// The lake directory; for an object-store lake, the local state
    /// directory (write-ahead log).
    root: PathBuf,
    object: Option<Arc<ObjectLake>>,
    /// One lock per table (in `TABLES` order) for object-store writes.
    object_locks: [Mutex<()>; TABLES.len()],
    instance: String,
    counter: AtomicU64,
    index: Mutex<HashMap<(&'static str, String), PartitionIndex>>,
    hashers: (RandomState, RandomState),
}

impl std::fmt::Debug for LakeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeWriter")
            .field("root", &self.root)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LakeError {
    let path = path.to_path_buf();
    move |source| LakeError::Io { path, source }
}

impl LakeWriter {
    /// A writer for the lake at `root`, creating the table directories.
    pub fn open(root: &Path) -> Result<Self, LakeError> {
        for table in TABLES.map(|t| t.name) {
            let dir = root.join(table);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let locks = root.join("_driftline").join("locks");
        std::fs::create_dir_all(&locks).map_err(io(&locks))?;
        Ok(LakeWriter {
            root: root.to_path_buf(),
            object: None,
            object_locks: Default::default(),
            instance: instance_id(),
            counter: AtomicU64::new(0),
            index: Mutex::new(HashMap::new()),
            hashers: (RandomState::new(), RandomState::new()),
        })
    }

    /// A writer for the lake at `location`; `state_dir` keeps local state
    /// (for a directory lake, it is the lake).
    pub fn open_at(location: &Location, state_dir: &Path) -> Result<Self, LakeError> {
        match location {
            Location::Dir(root) => Self::open(root),
            Location::Object(lake) => Ok(LakeWriter {
                root: state_dir.to_path_buf(),
                // Its own HTTP client: requests and their connections live
                // on the lake's I/O runtime, apart from the query engine's.
                object: Some(lake.reopen()?),
                object_locks: Default::default(),
                instance: instance_id(),
                counter: AtomicU64::new(0),
                index: Mutex::new(HashMap::new()),
                hashers: (RandomState::new(), RandomState::new()),
            }),
        }
    }

    /// The lake directory, or for an object-store lake the local state
    /// directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Appends the rows of `batch` whose key is not yet in partition
    /// `date` of `table` as one new file. A `metrics` batch's edge sets go
    /// to `histogram_edge_sets` first, so that no stored window lacks its
    /// edges (the sets the partition holds are dropped as duplicates).
    pub fn append(
        &self,
        table: &'static str,
        date: &str,
        batch: &RecordBatch,
    ) -> Result<Appended, LakeError> {
        super::table(table)?;
        if table == METRICS {
            let sets = schema::edge_sets_batch(batch).map_err(|source| LakeError::Arrow {
                table: EDGE_SETS,
                source,
            })?;
            self.append(EDGE_SETS, date, &sets)?;
        }
        if let Some(lake) = &self.object {
            return self.append_object(lake, table, date, batch);
        }
        let _lock = self.lock(table)?;
        let generation = self.generation(table, date, true)?;
        let keys = self.keys(table, batch)?;
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.refresh(&mut index, table, date, &generation)?;
        let mut appended = Appended::default();
        let keep = new_rows(None, &mut entry.keys, &keys, &mut appended);
        if appended.rows > 0 {
            let batch = filter_record_batch(batch, &keep)
                .map_err(|source| LakeError::Arrow { table, source })?;
            let written = self
                .new_file(&generation, "part", &batch)
                .and_then(|mut file| {
                    file.write(&batch)?;
                    file.finish()
                });
            match written {
                Ok(path) => {
                    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                        entry.files.insert(name.to_owned());
                    }
                    appended.path = Some(path);
                }
                Err(e) => {
                    // Nothing was stored: forget these keys so a retry can.
                    for ((k, _), kept) in keys.iter().zip(keep.iter()) {
                        if kept == Some(true) {
                            entry.keys.remove(k);
                        }
                    }
                    return Err(e);
                }
            }
        }
        index.retain(|_, p| p.used.elapsed() < INDEX_IDLE);
        Ok(appended)
    }

    /// Merges the files of every partition that has at least `min_files`
    /// into one, dropping duplicate keys, then deletes generations replaced
    /// more than `grace` ago.
    pub fn compact_all(
        &self,
        min_files: usize,
        grace: Duration,
    ) -> Result<Vec<Compacted>, LakeError> {
        let mut done = Vec::new();
        if let Some(lake) = &self.object {
            for table in TABLES.map(|t| t.name) {
                for date in self.dates(table)? {
                    if let Some(c) = self.compact_object(lake, table, &date, min_files.max(2))? {
                        done.push(c);
                    }
                }
                self.delete_retired(lake, table, grace)?;
            }
            return Ok(done);
        }
        for table in TABLES.map(|t| t.name) {
            for date in self.dates(table)? {
                if let Some(c) = self.compact(table, &date, min_files.max(2))? {
                    done.push(c);
                }
            }
            self.collect_garbage(table, grace)?;
        }
        Ok(done)
    }

    /// Deletes every partition dated before `cutoff`. Returns the
    /// partitions dropped, as `table/date=...`.
    pub fn drop_before(&self, cutoff: NaiveDate) -> Result<Vec<String>, LakeError> {
        let mut dropped = Vec::new();
        if let Some(lake) = &self.object {
            for table in TABLES.map(|t| t.name) {
                dropped.extend(self.drop_before_object(lake, table, cutoff)?);
            }
            return Ok(dropped);
        }
        for table in TABLES.map(|t| t.name) {
            for date in self.dates(table)? {
                let Ok(day) = NaiveDate::parse_from_str(&date, "%Y-%m-%d") else {
                    continue;
                };
                if day >= cutoff {
                    continue;
                }
                let _lock = self.lock(table)?;
                let link = self.partition(table, &date);
                // Removing the link makes the partition disappear at once.
                std::fs::remove_file(&link).map_err(io(&link))?;
                let gens = self.generations_dir(table, &date);
                if gens.exists() {
                    std::fs::remove_dir_all(&gens).map_err(io(&gens))?;
                }
                self.index
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(table, date.clone()));
                dropped.push(format!("{table}/date={date}"));
            }
        }
        Ok(dropped)
    }

    /// Dates of `table`'s partitions, sorted.
    pub fn dates(&self, table: &'static str) -> Result<Vec<String>, LakeError> {
        if let Some(lake) = &self.object {
            let (manifest, _) = read_manifest(lake, table)?;
            return Ok(manifest.partitions.into_keys().collect());
        }
        let dir = self.root.join(table);
        let mut dates: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("date="))
                    .map(str::to_owned)
            })
            .collect();
        dates.sort();
        Ok(dates)
    }

    /// Writes the edge sets of every `metrics` partition that has none (a
    /// lake written before `histogram_edge_sets` existed), reading only the
    /// model and edges columns. Returns the dates filled.
    pub fn backfill_edge_sets(&self) -> Result<Vec<String>, LakeError> {
        let have: HashSet<String> = self.dates(EDGE_SETS)?.into_iter().collect();
        let columns = schema::EDGE_SET_COLUMNS;
        let arrow = |source| LakeError::Arrow {
            table: EDGE_SETS,
            source,
        };
        let mut filled = Vec::new();
        for date in self.dates(METRICS)? {
            if have.contains(&date) {
                continue;
            }
            let mut sets = Vec::new();
            self.for_each_batch(METRICS, &date, &columns, &mut |batch| {
                sets.push(schema::edge_sets_batch(&batch).map_err(arrow)?);
                Ok(())
            })?;
            let all = concat_batches(&schema::edge_sets(), &sets).map_err(arrow)?;
            let distinct = schema::edge_sets_batch(&all).map_err(arrow)?;
            if distinct.num_rows() > 0 {
                self.append(EDGE_SETS, &date, &distinct)?;
                filled.push(date);
            }
        }
        Ok(filled)
    }

    /// Calls `f` with each batch of partition `date` of `table`, reading
    /// only `columns`. A partition that does not exist has no batches.
    fn for_each_batch(
        &self,
        table: &'static str,
        date: &str,
        columns: &[&str],
        f: &mut dyn FnMut(RecordBatch) -> Result<(), LakeError>,
    ) -> Result<(), LakeError> {
        if let Some(lake) = &self.object {
            let (manifest, _) = read_manifest(lake, table)?;
            let files = manifest
                .partitions
                .get(date)
                .map(|p| p.files.clone())
                .unwrap_or_default();
            for file in files {
                for batch in object::column_batches(lake, &file, columns)? {
                    f(batch?)?;
                }
            }
            return Ok(());
        }
        let Ok(generation) = self.generation(table, date, false) else {
            return Ok(());
        };
        for file in parquet_files(&generation)? {
            for batch in read_batches(&file, Some(columns))? {
                f(batch?)?;
            }
        }
        Ok(())
    }

    fn compact(
        &self,
        table: &'static str,
        date: &str,
        min_files: usize,
    ) -> Result<Option<Compacted>, LakeError> {
        let _lock = self.lock(table)?;
        let link = self.partition(table, date);
        if !link.is_symlink() {
            return Ok(None);
        }
        let current = self.generation(table, date, false)?;
        let files = parquet_files(&current)?;
        if files.len() < min_files {
            return Ok(None);
        }
        let number = generation_number(&current).unwrap_or(0) + 1;
        let next = self
            .generations_dir(table, date)
            .join(format!("g{number:06}"));
        std::fs::create_dir_all(&next).map_err(io(&next))?;
        let mut keys = HashMap::new();
        let mut out: Option<NewFile> = None;
        let mut duplicates = 0;
        for file in &files {
            for batch in read_batches(file, None)? {
                let batch = self.first_seen(table, &batch?, &mut keys, &mut duplicates)?;
                let out = match &mut out {
                    Some(out) => out,
                    None => out.insert(self.new_file(&next, "compact", &batch)?),
                };
                out.write(&batch)?;
            }
        }
        let Some(out) = out else {
            return Ok(None);
        };
        let rows = keys.len();
        let path = out.finish()?;
        swap_link(&link, &relative_target(table, date, number))?;
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.insert(
            (table, date.to_owned()),
            PartitionIndex {
                generation: next.clone(),
                files: path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| HashSet::from([n.to_owned()]))
                    .unwrap_or_default(),
                keys,
                used: Instant::now(),
            },
        );
        // The replaced generation's age counts from now.
        let _ = File::open(&current).and_then(|d| d.set_modified(SystemTime::now()));
        Ok(Some(Compacted {
            table,
            date: date.to_owned(),
            files_before: files.len(),
            rows,
            duplicates,
        }))
    }

    /// Deletes generation directories that no link points to and that were
    /// replaced more than `grace` ago.
    fn collect_garbage(&self, table: &'static str, grace: Duration) -> Result<(), LakeError> {
        let base = self.root.join("_driftline").join("gens").join(table);
        let Ok(partitions) = std::fs::read_dir(&base) else {
            return Ok(());
        };
        let _lock = self.lock(table)?;
        for partition in partitions.filter_map(|e| e.ok()) {
            let name = partition.file_name();
            let Some(date) = name.to_str().and_then(|n| n.strip_prefix("date=")) else {
                continue;
            };
            let current = self.generation(table, date, false).ok();
            let Ok(gens) = std::fs::read_dir(partition.path()) else {
                continue;
            };
            for generation in gens.filter_map(|e| e.ok()) {
                let path = generation.path();
                if Some(&path) == current.as_ref() {
                    continue;
                }
                let old = generation
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= grace);
                if old {
                    std::fs::remove_dir_all(&path).map_err(io(&path))?;
                }
            }
        }
        Ok(())
    }

    fn partition(&self, table: &str, date: &str) -> PathBuf {
        self.root.join(table).join(format!("date={date}"))
    }

    fn generations_dir(&self, table: &str, date: &str) -> PathBuf {
        self.root
            .join("_driftline")
            .join("gens")
            .join(table)
            .join(format!("date={date}"))
    }

    /// The directory the partition's link points to, created with its link
    /// when `create` and the partition is new.
    fn generation(&self, table: &str, date: &str, create: bool) -> Result<PathBuf, LakeError> {
        let link = self.partition(table, date);
        match std::fs::read_link(&link) {
            Ok(target) => Ok(match target.file_name() {
                Some(name) => self.generations_dir(table, date).join(name),
                None => target,
            }),
            // A plain directory (made by hand or another tool): used as is,
            // never compacted.
            Err(_) if link.is_dir() => Ok(link),
            Err(_) if create => {
                let generation = self.generations_dir(table, date).join("g000001");
                std::fs::create_dir_all(&generation).map_err(io(&generation))?;
                swap_link(&link, &relative_target(table, date, 1))?;
                Ok(generation)
            }
            Err(e) => Err(LakeError::Io {
                path: link,
                source: e,
            }),
        }
    }

    /// The index entry of a partition, brought up to date with the files
    /// of `generation` (other collectors may have added some).
    fn refresh<'a>(
        &self,
        index: &'a mut HashMap<(&'static str, String), PartitionIndex>,
        table: &'static str,
        date: &str,
        generation: &Path,
    ) -> Result<&'a mut PartitionIndex, LakeError> {
        let entry = partition_entry(index, table, date, generation);
        for file in parquet_files(generation)? {
            let Some(name) = file.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if entry.files.contains(&name) {
                continue;
            }
            for batch in read_batches(&file, Some(&super::table(table)?.index_columns()))? {
                entry.keys.extend(self.keys(table, &batch?)?);
            }
            entry.files.insert(name);
        }
        Ok(entry)
    }

    /// The rows of `batch` whose key is not in `seen` yet (adding them),
    /// in the table's current schema; counts the others in `duplicates`.
    /// Compaction's merge step.
    fn first_seen(
        &self,
        table: &'static str,
        batch: &RecordBatch,
        seen: &mut HashMap<u128, i64>,
        duplicates: &mut usize,
    ) -> Result<RecordBatch, LakeError> {
        let schema = (super::table(table)?.schema)();
        let batch = &schema::conform(batch, &schema)
            .map_err(|source| LakeError::Arrow { table, source })?;
        let keep: BooleanArray = self
            .keys(table, batch)?
            .iter()
            .map(|(k, version)| match seen.entry(*k) {
                Entry::Vacant(e) => {
                    e.insert(*version);
                    Some(true)
                }
                Entry::Occupied(_) => Some(false),
            })
            .collect();
        *duplicates += batch.num_rows() - keep.true_count();
        filter_record_batch(batch, &keep).map_err(|source| LakeError::Arrow { table, source })
    }

    /// The key of every row of `batch` (a 128-bit hash of its key columns)
    /// and its version.
    fn keys(&self, table: &'static str, batch: &RecordBatch) -> Result<Vec<KeyVersion>, LakeError> {
        let arrow = |source| LakeError::Arrow { table, source };
        // A file written before a nullable key column existed keys it as
        // null, as compaction and SQL read it.
        let spec = super::table(table)?;
        let schema = (spec.schema)();
        let columns: Vec<ArrayRef> = spec
            .key
            .iter()
            .map(|name| match batch.column_by_name(name) {
                Some(c) => Ok(c.clone()),
                None => schema
                    .field_with_name(name)
                    .ok()
                    .filter(|f| f.is_nullable())
                    .map(|f| {
                        datafusion::arrow::array::new_null_array(f.data_type(), batch.num_rows())
                    })
                    .ok_or_else(|| {
                        arrow(datafusion::arrow::error::ArrowError::SchemaError(format!(
                            "key column {name} missing"
                        )))
                    }),
            })
            .collect::<Result<_, _>>()?;
        let fields = columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields).map_err(arrow)?;
        let rows = converter.convert_columns(&columns).map_err(arrow)?;
        let versions = match spec.version {
            Some(name) => {
                let column = batch.column_by_name(name).ok_or_else(|| {
                    arrow(datafusion::arrow::error::ArrowError::SchemaError(format!(
                        "version column {name} missing"
                    )))
                })?;
                let column =
                    datafusion::arrow::compute::cast(column, &DataType::Int64).map_err(arrow)?;
                Some(column.as_primitive::<Int64Type>().clone())
            }
            None => None,
        };
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let bytes = row.as_ref();
                let high = self.hashers.0.hash_one(bytes);
                let low = self.hashers.1.hash_one(bytes);
                let version = versions.as_ref().map_or(0, |v| v.value(i));
                ((u128::from(high) << 64) | u128::from(low), version)
            })
            .collect())
    }

    /// A new file of `dir`, visible once [`NewFile::finish`] returns.
    fn new_file(
        &self,
        dir: &Path,
        prefix: &str,
        batch: &RecordBatch,
    ) -> Result<NewFile, LakeError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n:08}.parquet", self.instance);
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let writer =
            ArrowWriter::try_new(file, batch.schema(), Some(properties())).map_err(|source| {
                LakeError::Parquet {
                    path: tmp.clone(),
                    source,
                }
            })?;
        Ok(NewFile {
            path: dir.join(name),
            tmp,
            writer,
        })
    }

    /// Exclusive lock on one table's writes, across processes.
    fn lock(&self, table: &str) -> Result<File, LakeError> {
        let path = self
            .root
            .join("_driftline")
            .join("locks")
            .join(format!("{table}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(file)
    }
}

/// The object-store backend: the same promises as the directory lake,
/// with a manifest per table (see [`super::object`]).
impl LakeWriter {
    fn append_object(
        &self,
        lake: &Arc<ObjectLake>,
        table: &'static str,
        date: &str,
        batch: &RecordBatch,
    ) -> Result<Appended, LakeError> {
        let keys = self.keys(table, batch)?;
        // One writer of a table at a time in this process (detection, job
        // reports and maintenance share the writer); other processes are
        // kept apart by the manifest's conditional put.
        let _table = self.table_lock(table);
        for attempt in 0..MANIFEST_RETRIES {
            let (mut manifest, version) = read_manifest(lake, table)?;
            let partition = manifest
                .partitions
                .entry(date.to_owned())
                .or_insert_with(|| object::Partition::new(self.unique("p")));
            self.index_object(lake, table, date, partition)?;
            // New keys: not in the partition, and each once in the batch
            // (on a copy of the index: the manifest may not take this file).
            let mut appended = Appended::default();
            let mut added = HashMap::new();
            let keep = {
                let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
                let known = index.get(&(table, date.to_owned())).map(|p| &p.keys);
                new_rows(known, &mut added, &keys, &mut appended)
            };
            if appended.rows == 0 {
                return Ok(appended);
            }
            let new = filter_record_batch(batch, &keep)
                .map_err(|source| LakeError::Arrow { table, source })?;
            let name = format!(
                "{table}/date={date}/g{:06}-{}.parquet",
                partition.generation,
                self.unique("part")
            );
            let bytes = encode(&object::with_date(&new, date)?, &name)?;
            partition.files.push(name.clone());
            let (l, file) = (lake.clone(), name.clone());
            object::block_on(async move { l.put_new(&file, bytes).await })?;
            if commit(lake, table, date, &name, manifest, version)? {
                let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = index.get_mut(&(table, date.to_owned())) {
                    entry.files.insert(name.clone());
                    entry.keys.extend(added);
                }
                index.retain(|_, p| p.used.elapsed() < INDEX_IDLE);
                appended.path = Some(PathBuf::from(name));
                return Ok(appended);
            }
            // Another writer committed first: this file is in no manifest.
            metrics::counter!("driftline_lake_manifest_conflicts_total", "table" => table)
                .increment(1);
            tracing::debug!(table, date, "manifest changed meanwhile; appending again");
            let l = lake.clone();
            object::block_on(async move { l.delete(&name).await })?;
            // Back off a little, more with each conflict, with jitter.
            let wait = 5 * (attempt as u64 + 1) + rand::random::<u64>() % 10;
            std::thread::sleep(Duration::from_millis(wait.min(200)));
        }
        Err(LakeError::Contention { table })
    }

    /// A temporary file in the local state directory, deleted when closed,
    /// for an object (`name`) on its way to or from the store.
    fn scratch(&self, name: &str) -> Result<std::fs::File, LakeError> {
        std::fs::create_dir_all(&self.root)
            .and_then(|()| tempfile::tempfile_in(&self.root))
            .map_err(|source| LakeError::Io {
                path: PathBuf::from(name),
                source,
            })
    }

    /// Object `file` of `lake`, copied into a [`LakeWriter::scratch`] file:
    /// compaction's way to read every column. Reading them by ranges
    /// instead ([`object::column_batches`], as the key index does for a few
    /// columns) measured slower and larger on `bench/s3_compact.py`
    /// (13.0 s against 9.6 s, 66 B against 59 B of peak memory per row).
    fn fetch(&self, lake: &Arc<ObjectLake>, file: &str) -> Result<std::fs::File, LakeError> {
        let (l, name, local) = (lake.clone(), file.to_owned(), self.scratch(file)?);
        object::block_on(async move { l.get_into(&name, local).await })
    }

    /// A name no other writer uses: `{what}-{instance}-{counter}`.
    fn unique(&self, what: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{what}-{}-{n:08}", self.instance)
    }

    /// Serializes this process's writes to one table of an object-store
    /// lake.
    fn table_lock(&self, table: &str) -> std::sync::MutexGuard<'_, ()> {
        let i = TABLES.iter().position(|t| t.name == table).unwrap_or(0);
        self.object_locks[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the index of one partition up to date with `partition`'s
    /// files (other collectors may have added some, or compacted it).
    fn index_object(
        &self,
        lake: &Arc<ObjectLake>,
        table: &'static str,
        date: &str,
        partition: &object::Partition,
    ) -> Result<(), LakeError> {
        let generation = PathBuf::from(format!("{}/g{:06}", partition.id, partition.generation));
        let unread: Vec<String> = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let entry = partition_entry(&mut index, table, date, &generation);
            partition
                .files
                .iter()
                .filter(|f| !entry.files.contains(*f))
                .cloned()
                .collect()
        };
        for file in unread {
            let mut keys = Vec::new();
            for batch in object::column_batches(lake, &file, &super::table(table)?.index_columns())?
            {
                keys.extend(self.keys(table, &batch?)?);
            }
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = index.get_mut(&(table, date.to_owned())) {
                entry.keys.extend(keys);
                entry.files.insert(file);
            }
        }
        Ok(())
    }

    fn compact_object(
        &self,
        lake: &Arc<ObjectLake>,
        table: &'static str,
        date: &str,
        min_files: usize,
    ) -> Result<Option<Compacted>, LakeError> {
        let _table = self.table_lock(table);
        let (mut manifest, version) = read_manifest(lake, table)?;
        let Some(partition) = manifest.partitions.get(date).cloned() else {
            return Ok(None);
        };
        if partition.files.len() < min_files {
            return Ok(None);
        }
        let generation = partition.generation + 1;
        let name = format!(
            "{table}/date={date}/g{generation:06}-{}.parquet",
            self.unique("compact")
        );
        let parquet = |source| LakeError::Parquet {
            path: PathBuf::from(&name),
            source,
        };
        // Streamed through local temporary files, as on a directory lake:
        // one input batch and one output row group in memory.
        let mut keys = HashMap::new();
        let mut out: Option<ArrowWriter<std::fs::File>> = None;
        let mut duplicates = 0;
        for file in &partition.files {
            let local = self.fetch(lake, file)?;
            for batch in read_parquet(local, Path::new(file), None)? {
                let batch = self.first_seen(table, &batch?, &mut keys, &mut duplicates)?;
                let writer = match &mut out {
                    Some(w) => w,
                    None => out.insert(
                        ArrowWriter::try_new(
                            self.scratch(&name)?,
                            batch.schema(),
                            Some(properties()),
                        )
                        .map_err(parquet)?,
                    ),
                };
                writer.write(&batch).map_err(parquet)?;
            }
        }
        let Some(writer) = out else {
            return Ok(None);
        };
        let local = writer.into_inner().map_err(parquet)?;
        let (l, file) = (lake.clone(), name.clone());
        object::block_on(async move { l.put_file(&file, local).await })?;
        let now = chrono::Utc::now();
        manifest
            .retired
            .extend(partition.files.iter().map(|f| object::Retired {
                file: f.clone(),
                at: now,
            }));
        manifest.partitions.insert(
            date.to_owned(),
            object::Partition {
                id: partition.id.clone(),
                generation,
                files: vec![name.clone()],
            },
        );
        if !commit(lake, table, date, &name, manifest, version)? {
            // Changed meanwhile (another collector's append): compact on
            // the next pass.
            let l = lake.clone();
            object::block_on(async move { l.delete(&name).await })?;
            return Ok(None);
        }
        let rows = keys.len();
        self.index.lock().unwrap_or_else(|e| e.into_inner()).insert(
            (table, date.to_owned()),
            PartitionIndex {
                generation: PathBuf::from(format!("{}/g{generation:06}", partition.id)),
                files: HashSet::from([name]),
                keys,
                used: Instant::now(),
            },
        );
        Ok(Some(Compacted {
            table,
            date: date.to_owned(),
            files_before: partition.files.len(),
            rows,
            duplicates,
        }))
    }

    /// Deletes the files replaced more than `grace` ago.
    fn delete_retired(
        &self,
        lake: &Arc<ObjectLake>,
        table: &'static str,
        grace: Duration,
    ) -> Result<(), LakeError> {
        let _table = self.table_lock(table);
        let (mut manifest, version) = read_manifest(lake, table)?;
        let (due, keep): (Vec<_>, Vec<_>) = manifest
            .retired
            .drain(..)
            .partition(|r| object::retired_due(r, grace));
        if due.is_empty() {
            return Ok(());
        }
        for retired in &due {
            let (l, name) = (lake.clone(), retired.file.clone());
            object::block_on(async move { l.delete(&name).await })?;
        }
        manifest.retired = keep;
        // If another writer changed the manifest meanwhile, the next pass
        // forgets these (deleting a deleted file is fine).
        write_manifest(lake, table, manifest, version)?;
        Ok(())
    }

    fn drop_before_object(
        &self,
        lake: &Arc<ObjectLake>,
        table: &'static str,
        cutoff: NaiveDate,
    ) -> Result<Vec<String>, LakeError> {
        let _table = self.table_lock(table);
        for _ in 0..MANIFEST_RETRIES {
            let (mut manifest, version) = read_manifest(lake, table)?;
            let old: Vec<String> = manifest
                .partitions
                .keys()
                .filter(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok_and(|day| day < cutoff))
                .cloned()
                .collect();
            if old.is_empty() {
                return Ok(Vec::new());
            }
            let now = chrono::Utc::now();
            for date in &old {
                if let Some(p) = manifest.partitions.remove(date) {
                    manifest.retired.extend(
                        p.files
                            .into_iter()
                            .map(|file| object::Retired { file, at: now }),
                    );
                }
            }
            if write_manifest(lake, table, manifest, version)? {
                let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
                for date in &old {
                    index.remove(&(table, date.clone()));
                }
                return Ok(old
                    .into_iter()
                    .map(|d| format!("{table}/date={d}"))
                    .collect());
            }
        }
        Err(LakeError::Contention { table })
    }
}

fn read_manifest(
    lake: &Arc<ObjectLake>,
    table: &'static str,
) -> Result<object::Versioned, LakeError> {
    let l = lake.clone();
    object::block_on(async move { l.read_manifest(table).await })
}

fn write_manifest(
    lake: &Arc<ObjectLake>,
    table: &'static str,
    manifest: object::Manifest,
    version: Option<object::UpdateVersion>,
) -> Result<bool, LakeError> {
    let l = lake.clone();
    object::block_on(async move { l.write_manifest(table, &manifest, version).await })
}

/// Replaces `table`'s manifest (which lists the new file `name` under
/// `date`) if it is still at `version`. Whether it was replaced: a
/// "precondition failed" or an error can both hide a put that landed (the
/// client retries requests), so then the manifest itself is asked whether
/// it lists `name` (names are unique). An error that leaves the answer
/// unknown is returned: the file stays (an orphan at worst, never read) and
/// the caller retries the whole batch.
fn commit(
    lake: &Arc<ObjectLake>,
    table: &'static str,
    date: &str,
    name: &str,
    manifest: object::Manifest,
    version: Option<object::UpdateVersion>,
) -> Result<bool, LakeError> {
    let outcome = write_manifest(lake, table, manifest, version);
    if let Ok(true) = outcome {
        return Ok(true);
    }
    let listed = read_manifest(lake, table).map(|(m, _)| {
        m.partitions
            .get(date)
            .is_some_and(|p| p.files.iter().any(|f| f == name))
    });
    match (outcome, listed) {
        (_, Ok(true)) => Ok(true),
        (Ok(_), Ok(false)) => Ok(false),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    }
}

/// How every Parquet file of the lake is written.
fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

/// `batch` as the bytes of one Parquet file (`name` is for errors).
fn encode(batch: &RecordBatch, name: &str) -> Result<Vec<u8>, LakeError> {
    let parquet = |source| LakeError::Parquet {
        path: PathBuf::from(name),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(Vec::new(), batch.schema(), Some(properties())).map_err(parquet)?;
    writer.write(batch).map_err(parquet)?;
    writer.into_inner().map_err(parquet)
}

/// A Parquet file being written under a hidden temporary name.
struct NewFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: ArrowWriter<File>,
}

impl NewFile {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), LakeError> {
        self.writer
            .write(batch)
            .map_err(|source| LakeError::Parquet {
                path: self.tmp.clone(),
                source,
            })
    }

    /// Closes, fsyncs and renames the file into place.
    fn finish(self) -> Result<PathBuf, LakeError> {
        let NewFile { path, tmp, writer } = self;
        let file = writer.into_inner().map_err(|source| LakeError::Parquet {
            path: tmp.clone(),
            source,
        })?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir);
        }
        Ok(path)
    }
}

/// The link target of generation `number`, relative to `{table}/`.
fn relative_target(table: &str, date: &str, number: u64) -> PathBuf {
    PathBuf::from(format!(
        "../_driftline/gens/{table}/date={date}/g{number:06}"
    ))
}

fn generation_number(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix('g')?.parse().ok()
}

/// Points `link` at `target` in one atomic rename.
fn swap_link(link: &Path, target: &Path) -> Result<(), LakeError> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let name = link
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("partition");
    let tmp = dir.join(format!(".{name}.link.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, link).map_err(io(link))?;
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The visible Parquet files of a directory, sorted by name.
fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, LakeError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && n.ends_with(".parquet"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads a Parquet file batch by batch, all columns or only `columns`.
fn read_batches(
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<impl Iterator<Item = Result<RecordBatch, LakeError>>, LakeError> {
    read_parquet(File::open(path).map_err(io(path))?, path, columns)
}

/// Parquet from a file or from bytes, batch by batch; `path` names it in
/// errors.
fn read_parquet<R: datafusion::parquet::file::reader::ChunkReader + 'static>(
    reader: R,
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<impl Iterator<Item = Result<RecordBatch, LakeError>>, LakeError> {
    let read = |source| LakeError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(reader).map_err(read)?;
    if let Some(columns) = columns {
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(read)?;
    let path = path.to_path_buf();
    Ok(reader.map(move |batch| {
        batch.map_err(|e| LakeError::Read {
            path: path.clone(),
            source: e.into(),
        })
    }))
}

/// A name unique to this process: start time and pid.
fn instance_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}{:05x}",
        nanos & 0xffff_ffff_ffff,
        std::process::id() & 0xfffff
    )
}
