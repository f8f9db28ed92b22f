//! The collector's write-ahead log: every message is appended here and
//! fsynced *before* it is acknowledged to the broker, so a message the broker
//! handed over survives a `kill -9` of the collector.
//!
//! The log is a directory of segments `wal-{n:012}.log`. A segment starts
//! with the 8-byte header `DLWAL001` (format version 1; segments of
//! releases before the header have none and are read the same way). Each
//! record is framed as `[u32 length][u32 crc32][i64 received_at µs]
//! [u16 topic length][topic][payload]` (little endian). A flush to the lake starts a new
//! segment first; once the flush succeeded the older, sealed segments are
//! deleted. At start-up, what is left is replayed into the lake; the lake's
//! keys drop what an earlier flush had already stored. A torn record at the
//! end of a segment (a crash in the middle of a write) was never fsynced,
//! hence never acknowledged: it is skipped and the broker sends it again.
//!
//! One process owns a log directory (an exclusive `flock` on `LOCK`).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// One logged message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub received_at: DateTime<Utc>,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "write-ahead log {0} is in use by another collector (give each collector its own --client-id)"
    )]
    Locked(PathBuf),
    #[error("write-ahead log segment {0} has an unknown format (written by a newer collector?); it was left as it is")]
    UnknownFormat(PathBuf),
}

/// The first bytes of a segment: a magic and the format version.
const SEGMENT_HEADER: &[u8; 8] = b"DLWAL001";
/// What every version's header starts with.
const HEADER_FAMILY: &[u8; 5] = b"DLWAL";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WalError {
    let path = path.to_path_buf();
    move |source| WalError::Io { path, source }
}

/// An open write-ahead log.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    _lock: File,
    segment: u64,
    writer: BufWriter<File>,
    path: PathBuf,
    /// Records appended since the last commit.
    uncommitted: usize,
}

/// What [`Wal::open`] found left by the previous run.
#[derive(Debug, Default)]
pub struct Recovered {
    pub records: Vec<Record>,
    /// Torn or corrupt records skipped (never acknowledged).
    pub skipped: usize,
}

impl Wal {
    /// Opens (creating) the log in `dir` and returns what earlier runs left.
    pub fn open(dir: &Path) -> Result<(Wal, Recovered), WalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(WalError::Locked(dir.to_path_buf()));
        }
        let mut recovered = Recovered::default();
        let segments = segments(dir)?;
        for (_, path) in &segments {
            read_segment(path, &mut recovered)?;
        }
        let segment = segments.last().map_or(0, |(n, _)| n + 1);
        let (writer, path) = create_segment(dir, segment)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                _lock: lock,
                segment,
                writer,
                path,
                uncommitted: 0,
            },
            recovered,
        ))
    }

    /// Appends one message (buffered: durable after [`Wal::commit`]).
    pub fn append(
        &mut self,
        received_at: DateTime<Utc>,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), WalError> {
        let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
        let topic = &topic.as_bytes()[..usize::from(topic_len)];
        let micros = received_at.timestamp_micros().to_le_bytes();
        let len = u32::try_from(micros.len() + 2 + topic.len() + payload.len()).unwrap_or(u32::MAX);
        let mut crc = crc32fast::Hasher::new();
        for part in [&micros[..], &topic_len.to_le_bytes(), topic, payload] {
            crc.update(part);
        }
        let crc = crc.finalize();
        let write = |w: &mut BufWriter<File>| {
            w.write_all(&len.to_le_bytes())?;
            w.write_all(&crc.to_le_bytes())?;
            w.write_all(&micros)?;
            w.write_all(&topic_len.to_le_bytes())?;
            w.write_all(topic)?;
            w.write_all(payload)
        };
        write(&mut self.writer).map_err(io(&self.path))?;
        self.uncommitted += 1;
        Ok(())
    }

    /// Records appended and not yet committed.
    pub fn uncommitted(&self) -> usize {
        self.uncommitted
    }

    /// Makes every appended record durable (one fsync for the group).
    pub fn commit(&mut self) -> Result<(), WalError> {
        if self.uncommitted == 0 {
            return Ok(());
        }
        self.writer.flush().map_err(io(&self.path))?;
        self.writer.get_ref().sync_data().map_err(io(&self.path))?;
        self.uncommitted = 0;
        Ok(())
    }

    /// Commits and starts a new segment; the earlier ones are sealed.
    /// Returns the new segment's number, for [`Wal::remove_sealed_before`].
    pub fn rotate(&mut self) -> Result<u64, WalError> {
        self.commit()?;
        let (writer, path) = create_segment(&self.dir, self.segment + 1)?;
        self.segment += 1;
        self.writer = writer;
        self.path = path;
        Ok(self.segment)
    }

    /// Deletes every sealed segment (their messages are in the lake).
    pub fn remove_sealed(&mut self) -> Result<usize, WalError> {
        self.remove_sealed_before(self.segment)
    }

    /// Deletes the segments numbered below `segment`, a number
    /// [`Wal::rotate`] returned: those sealed by that rotation and before,
    /// whose messages a flush has since stored. Segments sealed by a later
    /// rotation stay.
    pub fn remove_sealed_before(&mut self, segment: u64) -> Result<usize, WalError> {
        let mut removed = 0;
        for (n, path) in segments(&self.dir)? {
            if n < segment.min(self.segment) {
                std::fs::remove_file(&path).map_err(io(&path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        Ok(removed)
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:012}.log"))
}

fn create_segment(dir: &Path, n: u64) -> Result<(BufWriter<File>, PathBuf), WalError> {
    let path = segment_path(dir, n);
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    // Durable with the segment's first commit.
    file.write_all(SEGMENT_HEADER).map_err(io(&path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((BufWriter::with_capacity(256 * 1024, file), path))
}

/// The segments of `dir`, by number.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let n = name
                .to_str()?
                .strip_prefix("wal-")?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Reads every whole, intact record of one segment.
fn read_segment(path: &Path, out: &mut Recovered) -> Result<(), WalError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(path))?;
    let mut rest = match bytes.strip_prefix(SEGMENT_HEADER.as_slice()) {
        Some(records) => records,
        // A crash while the header was written: nothing was logged yet.
        None if SEGMENT_HEADER.starts_with(&bytes) => &[],
        None if bytes.starts_with(HEADER_FAMILY) => {
            return Err(WalError::UnknownFormat(path.to_path_buf()))
        }
        // A segment from before the header: records from the first byte.
        None => bytes.as_slice(),
    };
    while !rest.is_empty() {
        match parse_record(rest) {
            Some((record, used)) => {
                out.records.push(record);
                rest = &rest[used..];
            }
            None => {
                tracing::warn!(path = %path.display(), bytes = rest.len(), "torn record at the end of a write-ahead log segment skipped (it was never acknowledged)");
                out.skipped += 1;
                break;
            }
        }
    }
    Ok(())
}

/// One record from the front of `bytes` and its length, or `None` if the
/// frame is incomplete or corrupt.
fn parse_record(bytes: &[u8]) -> Option<(Record, usize)> {
    let len = usize::try_from(u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?)).ok()?;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let body = bytes.get(8..8 + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let micros = i64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let topic_len = usize::from(u16::from_le_bytes(body.get(8..10)?.try_into().ok()?));
    let topic = std::str::from_utf8(body.get(10..10 + topic_len)?).ok()?;
    let payload = body.get(10 + topic_len..)?;
    Some((
        Record {
            received_at: DateTime::from_timestamp_micros(micros)?,
            topic: topic.to_owned(),
            payload: payload.to_vec(),
        },
        8 + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("timestamp")
    }

    #[test]
    fn committed_records_survive_and_sealed_segments_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, recovered) = Wal::open(dir.path()).expect("open");
        assert!(recovered.records.is_empty());
        wal.append(at("2026-11-27T10:00:00Z"), "a/b", b"one")
            .expect("append");
        wal.append(at("2026-11-27T10:00:01Z"), "a/c", b"")
            .expect("append");
        wal.commit().expect("commit");
        // A second open of the same log is refused while the first holds it.
        assert!(matches!(Wal::open(dir.path()), Err(WalError::Locked(_))));
        drop(wal);
        let (mut wal, recovered) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(recovered.records.len(), 2);
        assert_eq!(recovered.records[0].topic, "a/b");
        assert_eq!(recovered.records[0].payload, b"one");
        assert_eq!(recovered.records[1].received_at, at("2026-11-27T10:00:01Z"));
        assert_eq!(wal.remove_sealed().expect("remove"), 1);
        wal.append(at("2026-11-27T10:00:02Z"), "a/d", b"three")
            .expect("append");
        wal.rotate().expect("rotate");
        drop(wal);
        let (_wal, recovered) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(recovered.records.len(), 1);
        assert_eq!(recovered.records[0].payload, b"three");
    }

    #[test]
    fn a_torn_tail_is_skipped_and_earlier_records_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        wal.append(at("2026-11-27T10:00:00Z"), "t", b"whole")
            .expect("append");
        wal.append(at("2026-11-27T10:00:00Z"), "t", b"torn")
            .expect("append");
        wal.commit().expect("commit");
        let path = wal.path.clone();
        drop(wal);
        let len = std::fs::metadata(&path).expect("meta").len();
        let file = File::options().write(true).open(&path).expect("open");
        file.set_len(len - 2).expect("truncate");
        let (_wal, recovered) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(recovered.records.len(), 1);
        assert_eq!(recovered.records[0].payload, b"whole");
        assert_eq!(recovered.skipped, 1);
    }

    /// A flush that started before a later rotation removes only what it
    /// stored: the segment sealed after it started stays for the next one.
    #[test]
    fn removal_stops_at_the_flush_s_own_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        wal.append(at("2026-11-27T10:00:00Z"), "t", b"first flush")
            .expect("append");
        let first = wal.rotate().expect("rotate");
        wal.append(at("2026-11-27T10:00:01Z"), "t", b"second flush")
            .expect("append");
        wal.rotate().expect("rotate");
        assert_eq!(wal.remove_sealed_before(first).expect("remove"), 1);
        drop(wal);
        let (_wal, recovered) = Wal::open(dir.path()).expect("reopen");
        let payloads: Vec<&[u8]> = recovered.records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(payloads, [&b"second flush"[..]]);
    }

    /// Segments written before the header existed are still replayed; a
    /// segment of an unknown version is refused, not misread.
    #[test]
    fn headerless_segments_are_read_and_unknown_versions_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        wal.append(at("2026-11-27T10:00:00Z"), "t", b"old")
            .expect("append");
        wal.commit().expect("commit");
        let path = wal.path.clone();
        drop(wal);
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(&bytes[..8], SEGMENT_HEADER);
        std::fs::write(&path, &bytes[8..]).expect("strip the header");
        let (wal, recovered) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(recovered.records.len(), 1);
        assert_eq!(recovered.records[0].payload, b"old");
        drop(wal);
        std::fs::write(&path, b"DLWAL002 from the future").expect("write");
        assert!(matches!(
            Wal::open(dir.path()),
            Err(WalError::UnknownFormat(p)) if p == path
        ));
    }
}
