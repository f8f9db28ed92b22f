//! The privacy budget ledger: what a device has spent, so that no crash or
//! restart can ever make it spend more than its budget per rolling period.
//!
//! Accounting is in zero-concentrated DP (rho), where composition is a sum:
//! a Gaussian window spends its rho, a Laplace window with pure epsilon
//! spends `epsilon^2 / 2` (pure epsilon-DP implies that rho-zCDP). A spend at
//! time `t` counts against every period that contains `t`: at time `now`,
//! the entries with `t > now - period` (future entries too, so a clock that
//! jumps back never frees budget early).
//!
//! Spending is **write-ahead**: [`Ledger::try_spend`] appends the entry to
//! the ledger file and fsyncs it before it returns, and only then may the
//! caller draw noise and publish. A crash after the spend and before the
//! publish loses a window but never overspends.
//!
//! # File format (`budget.ledger`)
//!
//! ```text
//! header  8 bytes   b"DLLEDG01"
//! record 20 bytes   crc32 (u32 LE) of the next 16 bytes,
//!                   t: Unix microseconds (i64 LE), rho (f64 LE)
//! ```
//!
//! On open, a short or CRC-failing **last** record is a torn write (its spend
//! never returned) and is dropped. A bad record anywhere else means the file
//! was damaged: the ledger then assumes the whole budget was spent at the
//! time of opening, which is safe. The file is rewritten (temporary file,
//! fsync, rename) with only the live entries when it has grown stale.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};

const MAGIC: &[u8; 8] = b"DLLEDG01";
const RECORD: usize = 20;

/// Budget per rolling period, in zCDP rho.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub rho: f64,
    pub period: TimeDelta,
}

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("budget exhausted: {spent:.3} of {budget} rho spent in the last {period}; resumes at {resumes_at}")]
    Exhausted {
        spent: f64,
        budget: f64,
        period: TimeDelta,
        resumes_at: DateTime<Utc>,
    },
    #[error("a spend must be a finite rho >= 0, got {0}")]
    BadSpend(f64),
    #[error("ledger file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger file {path} is not a Driftline ledger")]
    NotALedger { path: PathBuf },
}

impl LedgerError {
    /// `Exhausted` passes with time; I/O errors may pass; the rest do not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LedgerError::Exhausted { .. } | LedgerError::Io { .. })
    }
}

/// The accounting itself: plain state, no I/O.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    budget: Budget,
    /// (time, rho), in the order spent.
    entries: VecDeque<(DateTime<Utc>, f64)>,
}

impl BudgetState {
    pub fn new(budget: Budget) -> Self {
        BudgetState {
            budget,
            entries: VecDeque::new(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    fn counts_at(&self, t: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        t > now - self.budget.period
    }

    /// Rho spent in the period ending at `now`.
    pub fn spent(&self, now: DateTime<Utc>) -> f64 {
        self.entries
            .iter()
            .filter(|(t, _)| self.counts_at(*t, now))
            .map(|(_, rho)| rho)
            .sum()
    }

    /// Rho still available at `now`.
    pub fn remaining(&self, now: DateTime<Utc>) -> f64 {
        (self.budget.rho - self.spent(now)).max(0.0)
    }

    /// Whether `rho` may be spent at `now`; the error says when it may.
    pub fn check(&self, now: DateTime<Utc>, rho: f64) -> Result<(), LedgerError> {
        if !(rho.is_finite() && rho >= 0.0) {
            return Err(LedgerError::BadSpend(rho));
        }
        let spent = self.spent(now);
        if spent + rho <= self.budget.rho {
            return Ok(());
        }
        // The earliest time at which enough old entries have expired.
        let mut still = spent + rho;
        let mut resumes_at = now;
        for (t, r) in self.entries.iter().filter(|(t, _)| self.counts_at(*t, now)) {
            if still <= self.budget.rho {
                break;
            }
            still -= r;
            resumes_at = *t + self.budget.period;
        }
        if still > self.budget.rho {
            // Even an empty period cannot hold this spend.
            resumes_at = DateTime::<Utc>::MAX_UTC;
        }
        Err(LedgerError::Exhausted {
            spent,
            budget: self.budget.rho,
            period: self.budget.period,
            resumes_at,
        })
    }

    /// Records a spend (after [`BudgetState::check`] and persistence).
    pub fn commit(&mut self, now: DateTime<Utc>, rho: f64) {
        self.entries.push_back((now, rho));
    }

    /// Forgets entries that no longer count at `now` and never will again.
    pub fn prune(&mut self, now: DateTime<Utc>) -> usize {
        let before = self.entries.len();
        let period = self.budget.period;
        self.entries.retain(|(t, _)| *t > now - period);
        before - self.entries.len()
    }

    fn entries(&self) -> impl Iterator<Item = &(DateTime<Utc>, f64)> {
        self.entries.iter()
    }
}

/// A [`BudgetState`] persisted in a write-ahead file (or kept in memory, for
/// simulations).
#[derive(Debug)]
pub struct Ledger {
    state: BudgetState,
    file: Option<(PathBuf, File)>,
    /// Records in the file, to decide when to rewrite it.
    records: usize,
}

impl Ledger {
    /// A ledger that lives only in memory.
    pub fn in_memory(budget: Budget) -> Self {
        Ledger {
            state: BudgetState::new(budget),
            file: None,
            records: 0,
        }
    }

    /// Opens (or creates) the ledger file at `path`; `now` is used when
    /// the file turns out damaged (the budget is then taken as spent now).
    pub fn open(path: &Path, budget: Budget, now: DateTime<Utc>) -> Result<Self, LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut state = BudgetState::new(budget);
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io)?;
        }
        if !bytes.is_empty() {
            if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
                return Err(LedgerError::NotALedger {
                    path: path.to_path_buf(),
                });
            }
            let body = &bytes[MAGIC.len()..];
            let records: Vec<&[u8]> = body.chunks(RECORD).collect();
            let last = records.len().saturating_sub(1);
            for (i, record) in records.iter().enumerate() {
                match decode_record(record) {
                    Some((t, rho)) => state.commit(t, rho),
                    // A torn last write: that spend never returned.
                    None if i == last => {}
                    None => {
                        tracing::error!(path = %path.display(), record = i, "damaged privacy ledger; assuming the whole budget is spent");
                        state.commit(now, budget.rho);
                    }
                }
            }
        }
        state.prune(now);
        let mut ledger = Ledger {
            state,
            file: None,
            records: 0,
        };
        ledger.rewrite(path)?;
        Ok(ledger)
    }

    pub fn state(&self) -> &BudgetState {
        &self.state
    }

    /// Rho still available at `now`.
    pub fn remaining(&self, now: DateTime<Utc>) -> f64 {
        self.state.remaining(now)
    }

    /// Spends `rho` at `now` if the budget allows, durably, before
    /// returning. Only after `Ok` may the caller noise and publish.
    pub fn try_spend(&mut self, now: DateTime<Utc>, rho: f64) -> Result<(), LedgerError> {
        self.state.check(now, rho)?;
        if let Some((path, file)) = &mut self.file {
            let io = |source| LedgerError::Io {
                path: path.clone(),
                source,
            };
            file.write_all(&encode_record(now, rho)).map_err(io)?;
            file.sync_data().map_err(io)?;
            self.records += 1;
        }
        self.state.commit(now, rho);
        if self.records > 4 * self.state.entries.len().max(256) {
            self.state.prune(now);
            if let Some((path, _)) = &self.file {
                let path = path.clone();
                self.rewrite(&path)?;
            }
        }
        Ok(())
    }

    /// Writes the live entries to a fresh file and swaps it in atomically.
    fn rewrite(&mut self, path: &Path) -> Result<(), LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("ledger.tmp");
        let mut bytes = MAGIC.to_vec();
        for (t, rho) in self.state.entries() {
            bytes.extend_from_slice(&encode_record(*t, *rho));
        }
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        self.records = self.state.entries.len();
        self.file = Some((path.to_path_buf(), file));
        Ok(())
    }
}

fn encode_record(t: DateTime<Utc>, rho: f64) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[4..12].copy_from_slice(&t.timestamp_micros().to_le_bytes());
    out[12..20].copy_from_slice(&rho.to_le_bytes());
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_record(bytes: &[u8]) -> Option<(DateTime<Utc>, f64)> {
    if bytes.len() != RECORD {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[..4].try_into().ok()?);
    if crc != crc32fast::hash(&bytes[4..]) {
        return None;
    }
    let micros = i64::from_le_bytes(bytes[4..12].try_into().ok()?);
    let rho = f64::from_le_bytes(bytes[12..20].try_into().ok()?);
    let t = DateTime::from_timestamp_micros(micros)?;
    (rho.is_finite() && rho >= 0.0).then_some((t, rho))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        "2026-11-27T00:00:00Z".parse().expect("ts")
    }

    fn day(rho: f64) -> Budget {
        Budget {
            rho,
            period: TimeDelta::days(1),
        }
    }

    #[test]
    fn spends_up_to_the_budget_then_waits_for_the_period_to_roll() {
        let mut l = Ledger::in_memory(day(1.0));
        let t = t0();
        l.try_spend(t, 0.5).expect("first");
        l.try_spend(t + TimeDelta::hours(1), 0.5).expect("second");
        match l.try_spend(t + TimeDelta::hours(2), 0.1) {
            Err(LedgerError::Exhausted { resumes_at, .. }) => {
                assert_eq!(resumes_at, t + TimeDelta::days(1))
            }
            other => panic!("expected exhaustion, got {other:?}"),
        }
        l.try_spend(t + TimeDelta::days(1), 0.5)
            .expect("the first spend expired");
        assert!(l.try_spend(t + TimeDelta::days(1), 0.1).is_err());
    }

    #[test]
    fn survives_reopen_and_ignores_a_torn_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("open");
        l.try_spend(t0(), 0.4).expect("spend");
        l.try_spend(t0(), 0.4).expect("spend");
        drop(l);
        // A crash in the middle of a third append.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&encode_record(t0(), 0.4)[..11]).expect("torn");
        drop(f);
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("reopen");
        assert!((l.state().spent(t0()) - 0.8).abs() < 1e-12);
        assert!(l.try_spend(t0(), 0.4).is_err(), "0.8 + 0.4 > 1.0");
        l.try_spend(t0(), 0.2).expect("fits");
    }

    #[test]
    fn a_damaged_ledger_counts_as_fully_spent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("open");
        l.try_spend(t0(), 0.1).expect("spend");
        l.try_spend(t0(), 0.1).expect("spend");
        drop(l);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[MAGIC.len() + 6] ^= 0xff; // inside the first record
        std::fs::write(&path, &bytes).expect("write");
        let l = Ledger::open(&path, day(1.0), t0() + TimeDelta::hours(1)).expect("reopen");
        assert_eq!(l.remaining(t0() + TimeDelta::hours(2)), 0.0);
        assert!(l.remaining(t0() + TimeDelta::hours(26)) > 0.0);
        std::fs::write(&path, b"garbage!garbage").expect("write");
        assert!(matches!(
            Ledger::open(&path, day(1.0), t0()),
            Err(LedgerError::NotALedger { .. })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Spend(f64),
        Advance(i64),
        Crash { torn: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0.0f64..0.4).prop_map(Op::Spend),
            2 => (0i64..30).prop_map(Op::Advance),
            1 => (0usize..RECORD).prop_map(|torn| Op::Crash { torn }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the spends, clock steps (minutes, period one hour) and
        /// crashes (with a torn write), no rolling period ever holds more
        /// granted spending than the budget, and no granted spend is lost.
        #[test]
        fn never_overspends_across_crashes(ops in proptest::collection::vec(op(), 1..120)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("budget.ledger");
            let budget = Budget { rho: 1.0, period: TimeDelta::hours(1) };
            let mut now = t0();
            let mut ledger = Ledger::open(&path, budget, now).expect("open");
            let mut granted: Vec<(DateTime<Utc>, f64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Spend(rho) => {
                        if ledger.try_spend(now, rho).is_ok() {
                            granted.push((now, rho));
                        }
                    }
                    Op::Advance(minutes) => now += TimeDelta::minutes(minutes),
                    Op::Crash { torn } => {
                        drop(ledger);
                        if torn > 0 {
                            let mut f = OpenOptions::new().append(true).open(&path).expect("open");
                            f.write_all(&encode_record(now, 0.3)[..torn]).expect("torn");
                        }
                        ledger = Ledger::open(&path, budget, now).expect("reopen");
                    }
                }
                let in_window: f64 = granted
                    .iter()
                    .filter(|(t, _)| *t > now - budget.period)
                    .map(|(_, r)| r)
                    .sum();
                prop_assert!(in_window <= budget.rho + 1e-9, "granted {in_window} in one period");
                prop_assert!(ledger.state().spent(now) >= in_window - 1e-9, "the ledger forgot a spend");
            }
        }
    }

    #[test]
    fn impossible_spends_never_resume() {
        let l = Ledger::in_memory(day(1.0));
        match l.state().check(t0(), 2.0) {
            Err(LedgerError::Exhausted { resumes_at, .. }) => {
                assert_eq!(resumes_at, DateTime::<Utc>::MAX_UTC)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            l.state().check(t0(), f64::NAN),
            Err(LedgerError::BadSpend(_))
        ));
    }
}
