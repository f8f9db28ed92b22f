//! Store-and-forward: an on-disk FIFO of encoded messages, so that windows
//! survive a broker outage and a restart and are delivered in order, at
//! least once (`seq` lets the collector drop duplicates).
//!
//! # On-disk format
//!
//! A directory of segment files `{id:016x}.seg`, appended in order:
//!
//! ```text
//! segment header  8 bytes   b"DLSEG001"
//! record          4 bytes   payload length (u32 LE)
//!                 4 bytes   crc32 of the payload (u32 LE)
//!                 n bytes   payload (one encoded WindowReport)
//! ```
//!
//! and a `cursor` file, `b"DLCUR001"` + segment id (u64 LE) + offset
//! (u64 LE) + crc32 of those 16 bytes: the first record not yet
//! acknowledged. The cursor is replaced atomically (temporary file, fsync,
//! rename); fully acknowledged segments are deleted. Every push is fsynced
//! before it returns, so a `kill -9` loses only the open window.
//!
//! On open, a record whose length or CRC does not check ends its segment:
//! a torn tail (the push never returned) is cut off; anything else counts as
//! lost (`corrupt_records`), is logged, and delivery goes on with the next
//! segment — never a crash loop.
//!
//! The queue is bounded in bytes (default 64 MiB). Past the bound it first
//! **coarsens** the oldest segment it may touch (not the front one, which
//! holds the cursor and the records in flight, nor the one being written):
//! a coarsener given by the agent ([`crate::coarsen::coarsen_payloads`])
//! merges pairs of windows into windows of twice the length, and the
//! segment is rewritten atomically (temporary file, fsync, rename). Only
//! when nothing can be merged is the oldest segment not in flight dropped,
//! its records counted in `dropped_records`, which the agent reports in its
//! status message.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const SEGMENT_MAGIC: &[u8; 8] = b"DLSEG001";
const CURSOR_MAGIC: &[u8; 8] = b"DLCUR001";
const RECORD_HEADER: u64 = 8;
/// Largest payload accepted (the wire limit is 64 KiB).
pub const MAX_RECORD: usize = 1024 * 1024;

/// Errors of the queue.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("record of {size} bytes is over the limit of {MAX_RECORD}")]
    TooLarge { size: usize },
}

impl BufferError {
    /// I/O errors (disk full, a failing card) may pass; a too-large record never will.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BufferError::Io { .. })
    }
}

/// Position of a record: segment id and byte offset of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordId {
    segment: u64,
    offset: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Records not yet acknowledged: (offset, payload length).
    records: VecDeque<(u64, u32)>,
    /// Bytes of the file.
    len: u64,
}

/// Counters of what the queue could not keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records dropped because the queue was full.
    pub dropped_records: u64,
    /// Records found damaged on open.
    pub corrupt_records: u64,
    /// Records merged into coarser ones (not lost: their counts live on).
    pub merged_records: u64,
}

/// Rewrites a run of payloads into fewer (see [`crate::coarsen`]).
pub type Coarsener = Box<dyn FnMut(Vec<Vec<u8>>) -> Vec<Vec<u8>> + Send>;

/// The on-disk FIFO.
pub struct DiskQueue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    writer: Option<File>,
    losses: Losses,
    coarsener: Option<Coarsener>,
    /// Front records handed to the broker and not yet acknowledged: never
    /// dropped or rewritten.
    in_flight: usize,
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue")
            .field("dir", &self.dir)
            .field("records", &self.len())
            .field("losses", &self.losses)
            .finish_non_exhaustive()
    }
}

impl DiskQueue {
    /// Opens (or creates) the queue in `dir`, bounded to `max_bytes` on disk.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, BufferError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BufferError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cursor = read_cursor(&dir.join("cursor"));
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        ids.sort_unstable();
        let mut queue = DiskQueue {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(4096),
            segment_bytes: (max_bytes / 8).clamp(4096, 8 * 1024 * 1024),
            segments: VecDeque::new(),
            writer: None,
            losses: Losses::default(),
            coarsener: None,
            in_flight: 0,
        };
        for id in ids {
            let path = queue.segment_path(id);
            if cursor.is_some_and(|c| id < c.segment) {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let mut segment = queue.scan(id)?;
            if let Some(c) = cursor.filter(|c| c.segment == id) {
                segment.records.retain(|(offset, _)| *offset >= c.offset);
            }
            queue.segments.push_back(segment);
        }
        Ok(queue)
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.seg"))
    }

    /// Reads a segment's records, cutting off a torn or damaged tail.
    fn scan(&mut self, id: u64) -> Result<Segment, BufferError> {
        let path = self.segment_path(id);
        let io = |source| BufferError::Io {
            path: path.clone(),
            source,
        };
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io)?;
        let mut records = VecDeque::new();
        let mut offset = SEGMENT_MAGIC.len();
        let good_header = bytes.get(..SEGMENT_MAGIC.len()) == Some(SEGMENT_MAGIC.as_slice());
        // A torn write (the push never returned) leaves a record whose
        // header or payload runs past the end of the file; a complete record
        // whose CRC fails is damage.
        let mut damaged = !good_header && !bytes.is_empty();
        while good_header && offset + RECORD_HEADER as usize <= bytes.len() {
            let word = |at: usize| {
                u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            };
            let (len, crc) = (word(offset), word(offset + 4));
            let start = offset + RECORD_HEADER as usize;
            let Some(payload) = bytes.get(start..start + len as usize) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                damaged = true;
                break;
            }
            records.push_back((offset as u64, len));
            offset = start + len as usize;
        }
        if damaged {
            self.losses.corrupt_records += 1;
            tracing::error!(segment = %path.display(), offset, "damaged buffer segment; skipping its tail");
        }
        if offset < bytes.len() {
            let f = OpenOptions::new().write(true).open(&path).map_err(io)?;
            let keep = if good_header { offset as u64 } else { 0 };
            f.set_len(keep).and_then(|()| f.sync_all()).map_err(io)?;
        }
        Ok(Segment {
            id,
            records,
            len: if good_header { offset as u64 } else { 0 },
        })
    }

    /// Appends `payload` durably (fsync). Drops the oldest segment first if
    /// the queue would exceed its bound.
    pub fn push(&mut self, payload: &[u8]) -> Result<RecordId, BufferError> {
        if payload.len() > MAX_RECORD {
            return Err(BufferError::TooLarge {
                size: payload.len(),
            });
        }
        let need = RECORD_HEADER + payload.len() as u64;
        let full = |q: &Self| {
            q.segments
                .back()
                .is_none_or(|s| s.len == 0 || s.len + need > q.segment_bytes)
        };
        if full(self) || self.writer.is_none() {
            self.start_segment()?;
        }
        while self.disk_bytes() + need > self.max_bytes && self.segments.len() > 1 {
            if !self.coarsen_one()? && !self.drop_oldest()? {
                break;
            }
        }
        let segment = self.segments.back_mut().ok_or_else(|| BufferError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other("no open segment"),
        })?;
        let path = self.dir.join(format!("{:016x}.seg", segment.id));
        let writer = self.writer.as_mut().ok_or_else(|| BufferError::Io {
            path: path.clone(),
            source: std::io::Error::other("no open segment"),
        })?;
        let mut record = Vec::with_capacity(need as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        writer
            .write_all(&record)
            .and_then(|()| writer.sync_data())
            .map_err(|source| BufferError::Io { path, source })?;
        let id = RecordId {
            segment: segment.id,
            offset: segment.len,
        };
        segment
            .records
            .push_back((segment.len, payload.len() as u32));
        segment.len += need;
        Ok(id)
    }

    fn start_segment(&mut self) -> Result<(), BufferError> {
        let id = self.segments.back().map_or(1, |s| s.id + 1);
        let path = self.segment_path(id);
        let io = |source| BufferError::Io {
            path: path.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(SEGMENT_MAGIC)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.segments.push_back(Segment {
            id,
            records: VecDeque::new(),
            len: SEGMENT_MAGIC.len() as u64,
        });
        self.writer = Some(f);
        Ok(())
    }

    /// Sets the function that merges records when the queue is full.
    pub fn set_coarsener(&mut self, coarsener: Coarsener) {
        self.coarsener = Some(coarsener);
    }

    /// Tells the queue how many front records are in flight (handed to the
    /// broker, not yet acknowledged); those are never dropped or rewritten.
    pub fn set_in_flight(&mut self, n: usize) {
        self.in_flight = n;
    }

    fn records_before(&self, i: usize) -> usize {
        self.segments.iter().take(i).map(|s| s.records.len()).sum()
    }

    /// Drops the oldest segment that holds no record in flight and is not
    /// being written; false if there is none.
    fn drop_oldest(&mut self) -> Result<bool, BufferError> {
        let last = self.segments.len().saturating_sub(1);
        // Segment i holds no record in flight iff all in-flight records
        // come before it (for the front one: iff none is in flight).
        let candidate = (0..last).find(|&i| self.records_before(i) >= self.in_flight);
        let Some(s) = candidate.and_then(|i| self.segments.remove(i)) else {
            return Ok(false);
        };
        self.losses.dropped_records += s.records.len() as u64;
        tracing::warn!(
            records = s.records.len(),
            "buffer full; dropped the oldest windows"
        );
        let path = self.segment_path(s.id);
        std::fs::remove_file(&path).map_err(|source| BufferError::Io { path, source })?;
        Ok(true)
    }

    /// Coarsens the oldest segment that may be rewritten (not the front
    /// one, which the cursor points into, not the one being written, none
    /// holding a record in flight) and that shrinks; false if none does.
    fn coarsen_one(&mut self) -> Result<bool, BufferError> {
        let Some(mut coarsen) = self.coarsener.take() else {
            return Ok(false);
        };
        let mut result = Ok(false);
        let last = self.segments.len().saturating_sub(1);
        for i in 1..last {
            if self.records_before(i) < self.in_flight {
                continue;
            }
            let payloads = match self.read_segment(i) {
                Ok(p) => p,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let before = payloads.len();
            let merged = coarsen(payloads);
            if merged.len() < before {
                result = self.rewrite_segment(i, &merged).map(|()| {
                    self.losses.merged_records += (before - merged.len()) as u64;
                    true
                });
                break;
            }
        }
        self.coarsener = Some(coarsen);
        result
    }

    fn read_segment(&self, i: usize) -> Result<Vec<Vec<u8>>, BufferError> {
        let skip = self.records_before(i);
        let n = self.segments.get(i).map_or(0, |s| s.records.len());
        Ok(self
            .peek(skip + n)?
            .into_iter()
            .skip(skip)
            .map(|(_, p)| p)
            .collect())
    }

    /// Replaces segment `i`'s records with `payloads`, atomically.
    fn rewrite_segment(&mut self, i: usize, payloads: &[Vec<u8>]) -> Result<(), BufferError> {
        let Some(id) = self.segments.get(i).map(|s| s.id) else {
            return Ok(());
        };
        let path = self.segment_path(id);
        let tmp = self.dir.join(format!("{id:016x}.seg.tmp"));
        let io = |source| BufferError::Io {
            path: path.clone(),
            source,
        };
        let mut bytes = SEGMENT_MAGIC.to_vec();
        let mut records = VecDeque::new();
        for p in payloads {
            records.push_back((bytes.len() as u64, p.len() as u32));
            bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            bytes.extend_from_slice(p);
        }
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        if let Some(s) = self.segments.get_mut(i) {
            s.records = records;
            s.len = bytes.len() as u64;
        }
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Records waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.segments.iter().map(|s| s.records.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn losses(&self) -> Losses {
        self.losses
    }

    /// Up to `n` records from the front, oldest first.
    pub fn peek(&self, n: usize) -> Result<Vec<(RecordId, Vec<u8>)>, BufferError> {
        let mut out = Vec::new();
        for s in &self.segments {
            if out.len() >= n {
                break;
            }
            let path = self.segment_path(s.id);
            let io = |source| BufferError::Io {
                path: path.clone(),
                source,
            };
            let mut f = File::open(&path).map_err(io)?;
            for (offset, len) in s.records.iter().take(n - out.len()) {
                use std::io::Seek;
                let mut payload = vec![0u8; *len as usize];
                f.seek(std::io::SeekFrom::Start(offset + RECORD_HEADER))
                    .and_then(|_| f.read_exact(&mut payload))
                    .map_err(io)?;
                out.push((
                    RecordId {
                        segment: s.id,
                        offset: *offset,
                    },
                    payload,
                ));
            }
        }
        Ok(out)
    }

    /// Acknowledges the `n` oldest records, durably: they are never
    /// delivered again, even after a restart.
    pub fn ack_front(&mut self, mut n: usize) -> Result<(), BufferError> {
        self.in_flight = self.in_flight.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            let k = n.min(front.records.len());
            front.records.drain(..k);
            n -= k;
            let is_last = self.segments.len() == 1;
            if self.segments.front().is_some_and(|s| s.records.is_empty()) && !is_last {
                if let Some(s) = self.segments.pop_front() {
                    let path = self.segment_path(s.id);
                    std::fs::remove_file(&path)
                        .map_err(|source| BufferError::Io { path, source })?;
                }
            } else if k == 0 {
                break;
            }
        }
        self.write_cursor()
    }

    fn write_cursor(&self) -> Result<(), BufferError> {
        let (segment, offset) = match self.segments.front() {
            Some(s) => (s.id, s.records.front().map_or(s.len, |(o, _)| *o)),
            None => (0, 0),
        };
        let mut bytes = CURSOR_MAGIC.to_vec();
        bytes.extend_from_slice(&segment.to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        let crc = crc32fast::hash(&bytes[8..24]);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let path = self.dir.join("cursor");
        let tmp = self.dir.join("cursor.tmp");
        let io = |source| BufferError::Io {
            path: path.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}

fn read_cursor(path: &Path) -> Option<RecordId> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != 28 || &bytes[..8] != CURSOR_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[24..28].try_into().ok()?);
    if crc != crc32fast::hash(&bytes[8..24]) {
        return None;
    }
    Some(RecordId {
        segment: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
        offset: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftline_core::wire::WindowReport;
    use proptest::prelude::*;

    fn payloads(q: &DiskQueue) -> Vec<Vec<u8>> {
        q.peek(usize::MAX)
            .expect("peek")
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    #[test]
    fn survives_restart_in_order_with_acks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = DiskQueue::open(dir.path(), 1 << 20).expect("open");
        for i in 0..10u8 {
            q.push(&[i; 100]).expect("push");
        }
        q.ack_front(3).expect("ack");
        drop(q);
        let q = DiskQueue::open(dir.path(), 1 << 20).expect("reopen");
        let got = payloads(&q);
        assert_eq!(got.len(), 7);
        assert_eq!(got[0], vec![3u8; 100]);
        assert_eq!(got[6], vec![9u8; 100]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_damaged_record_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = DiskQueue::open(dir.path(), 1 << 20).expect("open");
        q.push(b"first").expect("push");
        q.push(b"second").expect("push");
        drop(q);
        let seg = dir.path().join(format!("{:016x}.seg", 1));
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(&[200, 0, 0, 0, 1, 2]).expect("torn header");
        drop(f);
        let mut q = DiskQueue::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(payloads(&q), vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(q.losses().corrupt_records, 0, "a torn tail is not a loss");
        q.push(b"third").expect("push after recovery");
        drop(q);
        // Flip a byte inside "first": its CRC fails, the rest of the segment is cut.
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes[SEGMENT_MAGIC.len() + 9] ^= 0xff;
        std::fs::write(&seg, &bytes).expect("write");
        let q = DiskQueue::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(q.losses().corrupt_records, 1);
        assert!(payloads(&q).len() <= 1);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = DiskQueue::open(dir.path(), 64 * 1024).expect("open");
        for i in 0..200u32 {
            q.push(&[(i % 251) as u8; 1000]).expect("push");
        }
        assert!(q.disk_bytes() <= 64 * 1024);
        let kept = q.len() as u64;
        assert_eq!(kept + q.losses().dropped_records, 200);
        assert_eq!(
            payloads(&q).last(),
            Some(&vec![199u8; 1000]),
            "the newest are kept"
        );
    }

    #[test]
    fn a_full_queue_coarsens_before_it_drops() {
        use crate::coarsen::coarsen_payloads;
        use driftline_pipeline::privacy::MechanismConfig;
        // 600 periods x 2 models of ~1.2 KB windows (about 1.4 MB) into a
        // 512 KiB queue: its 64 KiB segments are coarsened, pass after pass.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = DiskQueue::open(dir.path(), 512 * 1024).expect("open");
        q.set_coarsener(Box::new(coarsen_payloads));
        let ws = crate::coarsen::tests::windows(
            MechanismConfig::Laplace { epsilon: 1.0 },
            "2026-11-27T00:00:00Z",
            600,
        );
        let total: i64 = ws.iter().map(|r| r.inference_count).sum();
        for w in &ws {
            q.push(&w.encode().expect("encode")).expect("push");
        }
        assert!(q.disk_bytes() <= 512 * 1024);
        let losses = q.losses();
        assert!(losses.merged_records > 0, "{losses:?}");
        assert_eq!(
            losses.dropped_records, 0,
            "coarsening made room: {losses:?}"
        );
        let kept: Vec<WindowReport> = payloads(&q)
            .iter()
            .map(|p| driftline_core::wire::decode(p).expect("decode"))
            .collect();
        assert!(kept.iter().all(|r| r.validate().is_ok()));
        assert_eq!(
            kept.iter().map(|r| r.inference_count).sum::<i64>(),
            total,
            "no count lost"
        );
        // Every minute is still covered exactly once per model.
        for model in ["m0", "m1"] {
            let minutes: i64 = kept
                .iter()
                .filter(|r| r.model_id == model)
                .map(|r| i64::from(r.window_secs) / 60)
                .sum();
            assert_eq!(minutes, 600, "{model}");
        }
        // Old windows got coarser; the newest are still one minute (the
        // front segment, which holds the cursor, is never rewritten).
        assert!(kept.iter().map(|r| r.window_secs).max() > Some(120));
        assert_eq!(kept.last().map(|r| r.window_secs), Some(60));
    }

    #[test]
    fn records_in_flight_are_never_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = DiskQueue::open(dir.path(), 16 * 1024).expect("open");
        for i in 0..10u8 {
            q.push(&[i; 500]).expect("push");
        }
        let front = payloads(&q)[..4].to_vec();
        q.set_in_flight(4);
        for i in 10..200u8 {
            q.push(&[i; 500]).expect("push");
        }
        assert_eq!(
            payloads(&q)[..4],
            front[..],
            "the in-flight records are still at the front"
        );
        q.ack_front(4).expect("ack");
        assert_ne!(payloads(&q)[0], front[0]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(Vec<u8>),
        Ack(usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => proptest::collection::vec(any::<u8>(), 0..600).prop_map(Op::Push),
            2 => (0usize..6).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The queue behaves like an in-memory VecDeque under random
        /// pushes, acks and restarts (the bound is large enough not to drop).
        #[test]
        fn behaves_like_a_vecdeque(ops in proptest::collection::vec(op(), 1..80)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut q = DiskQueue::open(dir.path(), 1 << 22).expect("open");
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push(p) => {
                        q.push(&p).expect("push");
                        model.push_back(p);
                    }
                    Op::Ack(n) => {
                        q.ack_front(n).expect("ack");
                        for _ in 0..n.min(model.len()) {
                            model.pop_front();
                        }
                    }
                    Op::Reopen => {
                        drop(q);
                        q = DiskQueue::open(dir.path(), 1 << 22).expect("reopen");
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(payloads(&q), model.iter().cloned().collect::<Vec<_>>());
            }
        }
    }
}
