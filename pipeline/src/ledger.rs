//! The privacy budget ledger: what a device has released, so that no crash,
//! restart or clock change can ever let it release more than its budget
//! per rolling period (by default: epsilon 8 at delta 1e-6 per day).
//!
//! Every published window is an entry: its [`Cost`] (Laplace epsilon or
//! Gaussian rho), the wall-clock time and the agent's **uptime**, a
//! monotonic measure of elapsed time that the ledger persists and that no
//! clock setting moves. An entry counts against the period until **both**
//! say the period has passed since it: a wall clock set forward (or one
//! that jumps at boot) releases nothing, and a clock set back keeps future
//! entries counting. Time while the agent is stopped does not advance the
//! uptime, so after a restart spends expire later, never earlier. The
//! entries that count are composed by [`crate::accountant`] into one
//! `(epsilon, delta)`; a window is granted only if that stays within the
//! budget.
//!
//! Spending is **write-ahead**: [`Ledger::try_spend`] appends the entry to
//! the ledger file and fsyncs it before it returns, and only then may the
//! caller draw noise and publish. A crash after the spend and before the
//! publish loses a window but never overspends.
//!
//! # File format (`budget.ledger`)
//!
//! ```text
//! header  8 bytes   b"DLLEDG02"
//! record 32 bytes   crc32 (u32 LE) of the next 28 bytes,
//!                   kind (u32 LE: 0 uptime checkpoint, 1 Laplace epsilon,
//!                   2 Gaussian rho), wall time (Unix microseconds, i64 LE),
//!                   uptime (microseconds, i64 LE), value (f64 LE)
//! ```
//!
//! On open, a short **last** record is a torn write (its spend never
//! returned) and is dropped. A whole record that fails its CRC, a file
//! shorter than its header and one record (the ledger always writes an
//! uptime checkpoint when it opens), or a version 1 file (`DLLEDG01`, whose
//! spends were per event) means the spends are unknown: the ledger then
//! assumes the whole budget was spent at the time of opening, which is
//! safe. The file is rewritten (temporary file, fsync, rename) with only the
//! live entries when it has grown stale.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};

use crate::accountant::{self, Cost, Spent};
use crate::privacy::PrivacyError;

const MAGIC: &[u8; 8] = b"DLLEDG02";
const RECORD: usize = 32;
/// Version 1 (per-event spends, no cap): read as damaged.
const MAGIC_V1: &[u8; 8] = b"DLLEDG01";

/// Budget per rolling period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// The most `epsilon` (at `delta`) the windows of one period may
    /// compose to; `None` sets no such bound (simulations).
    pub epsilon: Option<f64>,
    pub delta: f64,
    /// An optional second bound, on the zCDP rho of one period.
    pub rho: Option<f64>,
    /// The span the guarantee covers (a day by default).
    pub period: TimeDelta,
    /// The window length. The events of one `period` can fall into windows
    /// whose closes span `period` inclusive (one more window per model than
    /// `period / window`), so a spend counts for `period + window / 2`: a
    /// half-window of slack for the jitter of the agent's tick, never a
    /// whole window. Zero for simulated devices, whose spends are exact.
    pub window: TimeDelta,
}

impl Budget {
    /// The zCDP rho this budget allows: `rho`, or the rho whose optimal
    /// conversion is `epsilon` at `delta`, whichever is smaller; `None`
    /// when the budget is unbounded.
    pub fn rho_equivalent(&self) -> Option<f64> {
        let from_epsilon = self.epsilon.map(|e| {
            let (mut lo, mut hi) = (0.0f64, e);
            while hi - lo > 1e-9 * hi {
                let mid = (lo + hi) / 2.0;
                match accountant::zcdp_epsilon(mid, self.delta) {
                    Ok(x) if x <= e => lo = mid,
                    _ => hi = mid,
                }
            }
            lo
        });
        match (from_epsilon, self.rho) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The present, as the ledger sees it: the wall clock and the agent's
/// persisted uptime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall: DateTime<Utc>,
    pub up: TimeDelta,
}

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("budget exhausted: the last {period} already compose to epsilon {spent_epsilon:.3}; resumes at {resumes_at}")]
    Exhausted {
        spent_epsilon: f64,
        period: TimeDelta,
        resumes_at: DateTime<Utc>,
    },
    #[error("a spend must be a finite cost >= 0, got {0:?}")]
    BadSpend(Cost),
    #[error("accounting failed: {0}")]
    Accounting(#[from] PrivacyError),
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

/// One granted spend.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    wall: DateTime<Utc>,
    up: TimeDelta,
    cost: Cost,
}

/// The accounting itself: plain state, no I/O.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    budget: Budget,
    /// [`Budget::rho_equivalent`], computed when first needed.
    rho_budget: std::sync::OnceLock<Option<f64>>,
    /// In the order spent.
    entries: VecDeque<Entry>,
}

impl BudgetState {
    pub fn new(budget: Budget) -> Self {
        BudgetState {
            budget,
            rho_budget: std::sync::OnceLock::new(),
            entries: VecDeque::new(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// How long a spend counts: the period, plus half a window (see
    /// [`Budget::window`]).
    fn span(&self) -> TimeDelta {
        self.budget.period + self.budget.window / 2
    }

    /// Whether `e` still counts at `now`: until both the wall clock and
    /// the uptime say a span has passed since it.
    fn counts(&self, e: &Entry, now: Now) -> bool {
        e.wall > now.wall - self.span() || e.up > now.up - self.span()
    }

    /// When `e` stops counting, on the wall clock, if both clocks advance
    /// together from `now`.
    fn expires(&self, e: &Entry, now: Now) -> DateTime<Utc> {
        let by_wall = e.wall + self.span();
        let by_up = now.wall + (e.up + self.span() - now.up);
        by_wall.max(by_up)
    }

    /// What the entries counting at `now` add up to.
    pub fn spent(&self, now: Now) -> Spent {
        let mut s = Spent::default();
        for e in self.entries.iter().filter(|e| self.counts(e, now)) {
            s.add(e.cost);
        }
        s
    }

    /// The device-day epsilon (at the budget's delta) spent at `now`.
    pub fn spent_epsilon(&self, now: Now) -> Result<f64, LedgerError> {
        Ok(self.spent(now).epsilon(self.budget.delta)?.0)
    }

    /// Epsilon still available at `now`; `None` with no epsilon bound.
    pub fn remaining_epsilon(&self, now: Now) -> Result<Option<f64>, LedgerError> {
        let spent = self.spent_epsilon(now)?;
        Ok(self.budget.epsilon.map(|b| (b - spent).max(0.0)))
    }

    /// zCDP rho still available at `now` (see [`Budget::rho_equivalent`]).
    pub fn remaining_rho(&self, now: Now) -> Option<f64> {
        let rho = self.spent(now).rho();
        self.rho_budget().map(|b| (b - rho).max(0.0))
    }

    fn rho_budget(&self) -> Option<f64> {
        *self.rho_budget.get_or_init(|| self.budget.rho_equivalent())
    }

    fn fits(&self, spent: &Spent) -> Result<bool, LedgerError> {
        if let Some(rho) = self.budget.rho {
            if spent.rho() > rho {
                return Ok(false);
            }
        }
        Ok(match self.budget.epsilon {
            // Basic composition first: when it fits, the tight one does.
            Some(eps) if spent.pure_sum().is_some_and(|sum| sum <= eps) => true,
            Some(eps) => spent.epsilon(self.budget.delta)?.0 <= eps,
            None => true,
        })
    }

    /// Whether `cost` may be spent at `now`; the error says when it may.
    pub fn check(&self, now: Now, cost: Cost) -> Result<(), LedgerError> {
        if !cost.is_valid() {
            return Err(LedgerError::BadSpend(cost));
        }
        let mut live: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| self.counts(e, now))
            .collect();
        let with = |entries: &[&Entry]| {
            let mut s = Spent::default();
            entries.iter().for_each(|e| s.add(e.cost));
            s.add(cost);
            s
        };
        if self.fits(&with(&live))? {
            return Ok(());
        }
        let spent_epsilon = self.spent_epsilon(now)?;
        // The fewest expiries after which the spend fits (more expiries
        // only help): binary search over the entries by expiry.
        live.sort_by_key(|e| self.expires(e, now));
        let resumes_at = if !self.fits(&with(&[]))? {
            // Even an empty period cannot hold this spend.
            DateTime::<Utc>::MAX_UTC
        } else {
            let (mut lo, mut hi) = (1, live.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.fits(&with(&live[mid..]))? {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            live.get(lo - 1).map_or(now.wall, |e| self.expires(e, now))
        };
        Err(LedgerError::Exhausted {
            spent_epsilon,
            period: self.budget.period,
            resumes_at,
        })
    }

    /// Records a spend (after [`BudgetState::check`] and persistence).
    fn commit(&mut self, now: Now, cost: Cost) {
        self.entries.push_back(Entry {
            wall: now.wall,
            up: now.up,
            cost,
        });
    }

    /// Forgets entries that no longer count at `now`. Uptime only grows,
    /// so an entry the uptime has released never counts again.
    pub fn prune(&mut self, now: Now) -> usize {
        let before = self.entries.len();
        let span = self.span();
        self.entries
            .retain(|e| e.wall > now.wall - span || e.up > now.up - span);
        before - self.entries.len()
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
    /// The uptime the file had reached when it was opened.
    recovered_up: TimeDelta,
}

impl Ledger {
    /// An in-memory ledger without a bound: every window is granted (and
    /// recorded). For benchmarks and tests that need windows released
    /// whatever their cost.
    pub fn unbounded() -> Self {
        Ledger::in_memory(Budget {
            epsilon: None,
            delta: 1e-6,
            rho: None,
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        })
    }

    /// A ledger that lives only in memory.
    pub fn in_memory(budget: Budget) -> Self {
        Ledger {
            state: BudgetState::new(budget),
            file: None,
            records: 0,
            recovered_up: TimeDelta::zero(),
        }
    }

    /// Opens (or creates) the ledger file at `path`; `wall` is the present
    /// (a damaged file counts as the whole budget spent then). The uptime
    /// goes on from [`Ledger::recovered_uptime`].
    pub fn open(path: &Path, budget: Budget, wall: DateTime<Utc>) -> Result<Self, LedgerError> {
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
        let mut up = TimeDelta::zero();
        // A ledger this code wrote holds at least its header and one
        // record (the uptime checkpoint written on open). Anything less,
        // including an empty file, lost its spends.
        let mut damaged = path.exists() && bytes.len() < MAGIC.len() + RECORD;
        match bytes.get(..MAGIC.len()) {
            Some(m) if m == MAGIC => {
                let records: Vec<&[u8]> = bytes[MAGIC.len()..].chunks(RECORD).collect();
                let last = records.len().saturating_sub(1);
                for (i, record) in records.iter().enumerate() {
                    match decode_record(record) {
                        Some(r) => {
                            up = up.max(r.up);
                            if let Some(cost) = r.cost {
                                state.entries.push_back(Entry {
                                    wall: r.wall,
                                    up: r.up,
                                    cost,
                                });
                            }
                        }
                        // A short last record is a torn write: that spend
                        // never returned. A whole record that fails its
                        // check may have been granted: damage.
                        None if i == last && record.len() < RECORD => {}
                        None => damaged = true,
                    }
                }
            }
            Some(m) if m == MAGIC_V1 => {
                // Version 1 counted one event per window with no cap: its
                // spends say nothing about whole device-windows.
                tracing::warn!(path = %path.display(), "a version 1 privacy ledger: its spends cannot be converted; the budget counts as spent for one period");
                damaged = true;
            }
            Some(_) => {
                return Err(LedgerError::NotALedger {
                    path: path.to_path_buf(),
                })
            }
            None => {}
        }
        if damaged {
            tracing::error!(path = %path.display(), "damaged privacy ledger; assuming the whole budget is spent");
            // Twice each bound: more than any budget holds.
            let now = Now { wall, up };
            if let Some(epsilon) = budget.epsilon {
                state.commit(
                    now,
                    Cost::Laplace {
                        epsilon: 2.0 * epsilon,
                    },
                );
            }
            if let Some(rho) = budget.rho {
                state.commit(now, Cost::Gaussian { rho: 2.0 * rho });
            }
        }
        let now = Now { wall, up };
        state.prune(now);
        let mut ledger = Ledger {
            state,
            file: None,
            records: 0,
            recovered_up: up,
        };
        ledger.rewrite(path, up)?;
        Ok(ledger)
    }

    /// The uptime recorded in the file when it was opened: the agent's
    /// uptime goes on from there.
    pub fn recovered_uptime(&self) -> TimeDelta {
        self.recovered_up
    }

    pub fn state(&self) -> &BudgetState {
        &self.state
    }

    /// Spends `cost` at `now` if the budget allows, durably, before
    /// returning. Only after `Ok` may the caller noise and publish.
    pub fn try_spend(&mut self, now: Now, cost: Cost) -> Result<(), LedgerError> {
        self.state.check(now, cost)?;
        self.append(now, Some(cost))?;
        self.state.commit(now, cost);
        if self.records > 4 * self.state.entries.len().max(256) {
            self.state.prune(now);
            if let Some((path, _)) = &self.file {
                let path = path.clone();
                self.rewrite(&path, now.up)?;
            }
        }
        Ok(())
    }

    /// Persists the uptime reached at `now` without spending, so that a
    /// restart does not lose it (the agent calls this when it withholds a
    /// window).
    pub fn checkpoint(&mut self, now: Now) -> Result<(), LedgerError> {
        self.append(now, None)
    }

    fn append(&mut self, now: Now, cost: Option<Cost>) -> Result<(), LedgerError> {
        if let Some((path, file)) = &mut self.file {
            let io = |source| LedgerError::Io {
                path: path.clone(),
                source,
            };
            file.write_all(&encode_record(now.wall, now.up, cost))
                .map_err(io)?;
            file.sync_data().map_err(io)?;
            self.records += 1;
        }
        Ok(())
    }

    /// Writes the live entries (and the uptime reached, `up`) to a fresh
    /// file and swaps it in atomically.
    fn rewrite(&mut self, path: &Path, up: TimeDelta) -> Result<(), LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("ledger.tmp");
        let mut bytes = MAGIC.to_vec();
        for e in &self.state.entries {
            bytes.extend_from_slice(&encode_record(e.wall, e.up, Some(e.cost)));
        }
        let last_wall = self
            .state
            .entries
            .back()
            .map_or(DateTime::UNIX_EPOCH, |e| e.wall);
        bytes.extend_from_slice(&encode_record(last_wall, up, None));
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        self.records = self.state.entries.len() + 1;
        self.file = Some((path.to_path_buf(), file));
        Ok(())
    }
}

/// A decoded record: a spend, or (no cost) an uptime checkpoint.
struct Record {
    wall: DateTime<Utc>,
    up: TimeDelta,
    cost: Option<Cost>,
}

fn encode_record(wall: DateTime<Utc>, up: TimeDelta, cost: Option<Cost>) -> [u8; RECORD] {
    let (kind, value) = match cost {
        None => (0u32, 0.0),
        Some(Cost::Laplace { epsilon }) => (1, epsilon),
        Some(Cost::Gaussian { rho }) => (2, rho),
    };
    let mut out = [0u8; RECORD];
    out[4..8].copy_from_slice(&kind.to_le_bytes());
    out[8..16].copy_from_slice(&wall.timestamp_micros().to_le_bytes());
    out[16..24].copy_from_slice(&up.num_microseconds().unwrap_or(i64::MAX).to_le_bytes());
    out[24..32].copy_from_slice(&value.to_le_bytes());
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_record(bytes: &[u8]) -> Option<Record> {
    if bytes.len() != RECORD {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[..4].try_into().ok()?);
    if crc != crc32fast::hash(&bytes[4..]) {
        return None;
    }
    let kind = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
    let wall = DateTime::from_timestamp_micros(i64::from_le_bytes(bytes[8..16].try_into().ok()?))?;
    let up = TimeDelta::microseconds(i64::from_le_bytes(bytes[16..24].try_into().ok()?));
    let value = f64::from_le_bytes(bytes[24..32].try_into().ok()?);
    let cost = match kind {
        0 => None,
        1 => Some(Cost::Laplace { epsilon: value }),
        2 => Some(Cost::Gaussian { rho: value }),
        _ => return None,
    };
    (cost.is_none_or(|c| c.is_valid()) && up >= TimeDelta::zero()).then_some(Record {
        wall,
        up,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        "2026-11-27T00:00:00Z".parse().expect("ts")
    }

    /// Wall clock and uptime `h` hours after `t0`.
    fn at(hours: i64) -> Now {
        Now {
            wall: t0() + TimeDelta::hours(hours),
            up: TimeDelta::hours(hours),
        }
    }

    fn day(epsilon: f64) -> Budget {
        Budget {
            epsilon: Some(epsilon),
            delta: 1e-6,
            rho: None,
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        }
    }

    fn lap(epsilon: f64) -> Cost {
        Cost::Laplace { epsilon }
    }

    #[test]
    fn spends_up_to_the_budget_then_waits_for_the_period_to_roll() {
        let mut l = Ledger::in_memory(day(1.0));
        l.try_spend(at(0), lap(0.5)).expect("first");
        l.try_spend(at(1), lap(0.5)).expect("second");
        match l.try_spend(at(2), lap(0.1)) {
            Err(LedgerError::Exhausted { resumes_at, .. }) => {
                assert_eq!(resumes_at, t0() + TimeDelta::days(1))
            }
            other => panic!("expected exhaustion, got {other:?}"),
        }
        l.try_spend(at(24), lap(0.5))
            .expect("the first spend expired");
        assert!(l.try_spend(at(24), lap(0.1)).is_err());
    }

    #[test]
    fn the_budget_is_in_composed_epsilon_not_in_a_sum() {
        // 48 windows of 0.2 compose to 6.7 at delta 1e-6 (a sum would say
        // 9.6): all of them fit a budget of 7, and the 58th does not.
        let mut l = Ledger::in_memory(day(7.0));
        let mut granted = 0;
        for i in 0..60 {
            let now = Now {
                wall: t0() + TimeDelta::minutes(i),
                up: TimeDelta::minutes(i),
            };
            if l.try_spend(now, lap(0.2)).is_ok() {
                granted += 1;
            }
        }
        assert!((48..58).contains(&granted), "granted {granted}");
        let eps = l.state().spent_epsilon(at(1)).expect("eps");
        assert!(eps <= 7.0 && eps > 6.5, "{eps}");
    }

    #[test]
    fn a_wall_clock_set_forward_releases_nothing() {
        let mut l = Ledger::in_memory(day(1.0));
        l.try_spend(at(0), lap(1.0)).expect("whole budget");
        // Two days later by the wall clock, one hour by the uptime.
        let jumped = Now {
            wall: t0() + TimeDelta::days(2),
            up: TimeDelta::hours(1),
        };
        match l.try_spend(jumped, lap(0.1)) {
            Err(LedgerError::Exhausted { resumes_at, .. }) => {
                assert_eq!(resumes_at, jumped.wall + TimeDelta::hours(23))
            }
            other => panic!("expected exhaustion, got {other:?}"),
        }
        // And set back: the spend is in the future, it still counts.
        let back = Now {
            wall: t0() - TimeDelta::days(3),
            up: TimeDelta::days(2),
        };
        assert!(l.try_spend(back, lap(0.1)).is_err());
        let both = Now {
            wall: t0() + TimeDelta::days(2),
            up: TimeDelta::days(1),
        };
        l.try_spend(both, lap(0.1))
            .expect("both clocks say a day has passed");
    }

    #[test]
    fn survives_reopen_and_ignores_a_torn_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("open");
        l.try_spend(at(0), lap(0.4)).expect("spend");
        l.try_spend(at(3), lap(0.4)).expect("spend");
        drop(l);
        // A crash in the middle of a third append.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&encode_record(t0(), TimeDelta::hours(3), Some(lap(0.4)))[..11])
            .expect("torn");
        drop(f);
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("reopen");
        assert_eq!(l.recovered_uptime(), TimeDelta::hours(3));
        let eps = l.state().spent_epsilon(at(3)).expect("eps");
        assert!((eps - 0.8).abs() < 1e-4, "{eps}");
        assert!(l.try_spend(at(3), lap(0.4)).is_err(), "0.8 + 0.4 > 1.0");
        l.try_spend(at(3), lap(0.2)).expect("fits");
    }

    #[test]
    fn a_damaged_ledger_counts_as_fully_spent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("open");
        l.try_spend(at(0), lap(0.1)).expect("spend");
        l.try_spend(at(0), lap(0.1)).expect("spend");
        drop(l);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[MAGIC.len() + 10] ^= 0xff; // inside the first record
        std::fs::write(&path, &bytes).expect("write");
        let l = Ledger::open(&path, day(1.0), at(1).wall).expect("reopen");
        assert_eq!(l.state().remaining_epsilon(at(2)).expect("eps"), Some(0.0));
        assert!(l.state().check(at(2), lap(0.01)).is_err());
        assert!(l.state().remaining_epsilon(at(26)).expect("eps") > Some(0.0));
        std::fs::write(&path, b"garbage!garbage").expect("write");
        assert!(matches!(
            Ledger::open(&path, day(1.0), t0()),
            Err(LedgerError::NotALedger { .. })
        ));
    }

    #[test]
    fn files_whose_spends_are_unknown_count_as_fully_spent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let spent_at_open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).expect("write");
            let l = Ledger::open(&path, day(1.0), at(0).wall).expect("open");
            l.state().remaining_epsilon(at(1)).expect("eps")
        };
        // Empty, header only, a version 1 file, a whole last record that
        // fails its check.
        assert_eq!(spent_at_open(b""), Some(0.0));
        assert_eq!(spent_at_open(MAGIC), Some(0.0));
        assert_eq!(spent_at_open(b"DLLEDG01"), Some(0.0));
        let mut bad_last = MAGIC.to_vec();
        bad_last.extend_from_slice(&encode_record(t0(), TimeDelta::zero(), None));
        bad_last.extend_from_slice(&[0u8; RECORD]);
        assert_eq!(spent_at_open(&bad_last), Some(0.0));
        // A short last record is a torn write: nothing was granted.
        let mut torn = MAGIC.to_vec();
        torn.extend_from_slice(&encode_record(t0(), TimeDelta::zero(), None));
        torn.extend_from_slice(&[0u8; 7]);
        assert_eq!(spent_at_open(&torn), Some(1.0));
        // No file at all: a fresh budget.
        std::fs::remove_file(&path).expect("remove");
        let l = Ledger::open(&path, day(1.0), t0()).expect("fresh");
        assert_eq!(l.state().remaining_epsilon(at(0)).expect("eps"), Some(1.0));
    }

    #[test]
    fn a_checkpoint_keeps_the_uptime_across_a_restart_without_spends() {
        // An exhausted agent publishes nothing, but checkpoints: after a
        // restart its uptime goes on from there, so its budget comes back.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let mut l = Ledger::open(&path, day(1.0), t0()).expect("open");
        l.try_spend(at(0), lap(1.0)).expect("whole budget");
        l.checkpoint(at(20)).expect("checkpoint");
        drop(l);
        let l = Ledger::open(&path, day(1.0), at(20).wall).expect("reopen");
        assert_eq!(l.recovered_uptime(), TimeDelta::hours(20));
        // Four more hours of uptime after the restart: a day since the spend.
        l.state()
            .check(at(24), lap(0.5))
            .expect("the spend left the period");
    }

    #[test]
    fn a_spend_counts_half_a_window_past_the_period() {
        // Daily budget, hourly windows: the events of one day can touch 25
        // windows whose closes span exactly a day; all of them count
        // together, and the 26th (a day and an hour after the first) does
        // not meet the first.
        // (A rho bound, so that the count is exact.)
        let budget = Budget {
            epsilon: None,
            rho: Some(25.0),
            window: TimeDelta::hours(1),
            ..day(1.0)
        };
        let one = Cost::Gaussian { rho: 1.0 };
        let mut l = Ledger::in_memory(budget);
        for h in 0..=24 {
            l.try_spend(at(h), one).expect("25 windows fit 25");
        }
        assert!(
            l.state().check(at(24), one).is_err(),
            "the first still counts a day later"
        );
        l.try_spend(at(25), one)
            .expect("25 hours later the first no longer counts");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Spend(f64),
        Advance(i64),
        /// The wall clock alone moves (set forward or back), in minutes.
        SetClock(i64),
        Crash {
            torn: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0.0f64..0.4).prop_map(Op::Spend),
            2 => (0i64..30).prop_map(Op::Advance),
            1 => (-300i64..300).prop_map(Op::SetClock),
            1 => (0usize..RECORD).prop_map(|torn| Op::Crash { torn }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the spends, time steps (minutes, period one hour), wall
        /// clock changes and crashes (with a torn write), the spends granted
        /// within any hour of real elapsed time never compose to more than
        /// the budget, and the ledger never forgets one of them.
        #[test]
        fn never_overspends_across_crashes_and_clock_changes(ops in proptest::collection::vec(op(), 1..120)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("budget.ledger");
            let budget = Budget { epsilon: Some(1.0), delta: 1e-6, rho: None, period: TimeDelta::hours(1), window: TimeDelta::zero() };
            // Real elapsed time, the wall clock, and the ledger's uptime
            // (which loses the time since its last record at each crash).
            let (mut real, mut wall) = (TimeDelta::zero(), t0());
            let mut ledger = Ledger::open(&path, budget, wall).expect("open");
            let mut lost = TimeDelta::zero();
            let mut granted: Vec<(TimeDelta, f64)> = Vec::new();
            for op in ops {
                let now = Now { wall, up: real - lost };
                match op {
                    Op::Spend(eps) => {
                        if ledger.try_spend(now, lap(eps)).is_ok() {
                            granted.push((real, eps));
                        }
                    }
                    Op::Advance(minutes) => {
                        real += TimeDelta::minutes(minutes);
                        wall += TimeDelta::minutes(minutes);
                    }
                    Op::SetClock(minutes) => wall += TimeDelta::minutes(minutes),
                    Op::Crash { torn } => {
                        drop(ledger);
                        if torn > 0 {
                            let mut f = OpenOptions::new().append(true).open(&path).expect("open");
                            f.write_all(&encode_record(wall, now.up, Some(lap(0.3)))[..torn]).expect("torn");
                        }
                        ledger = Ledger::open(&path, budget, wall).expect("reopen");
                        lost += (real - lost) - ledger.recovered_uptime();
                    }
                }
                let mut in_period = Spent::default();
                for (_, eps) in granted.iter().filter(|(t, _)| *t > real - budget.period) {
                    in_period.add(lap(*eps));
                }
                let (eps, _) = in_period.epsilon(budget.delta).expect("eps");
                prop_assert!(eps <= 1.0 + 1e-9, "granted epsilon {eps} in one hour");
                let now = Now { wall, up: real - lost };
                let known = ledger.state().spent(now);
                prop_assert!(known.epsilon(1e-6).expect("eps").0 >= eps - 1e-9, "the ledger forgot a spend");
            }
        }
    }

    #[test]
    fn impossible_spends_never_resume() {
        let l = Ledger::in_memory(day(1.0));
        match l.state().check(at(0), lap(2.0)) {
            Err(LedgerError::Exhausted { resumes_at, .. }) => {
                assert_eq!(resumes_at, DateTime::<Utc>::MAX_UTC)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            l.state().check(at(0), lap(f64::NAN)),
            Err(LedgerError::BadSpend(_))
        ));
    }
}
