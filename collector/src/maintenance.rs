//! Lake upkeep: compaction (many small files per partition become one) and
//! retention (old partitions are deleted). `serve` runs it every
//! `compact_interval`; `driftline-collector compact` runs it once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Maintenance;
use crate::lake::{Compacted, LakeError, LakeWriter};

/// Replaced generations are kept this long in `serve`, so that queries
/// planned before a compaction can still read them.
pub const GRACE: Duration = Duration::from_secs(600);

/// What one pass did.
#[derive(Debug, Default)]
pub struct Report {
    pub compacted: Vec<Compacted>,
    /// Partitions deleted by retention, as `table/date=...`.
    pub dropped: Vec<String>,
    /// Dates of `metrics` whose histogram edge sets were derived (written
    /// before the collector stored them).
    pub edges_backfilled: Vec<String>,
}

/// Derives the histogram edge sets of `metrics` partitions that have none
/// (see [`LakeWriter::backfill_edge_sets`]), logging what it did. Run when
/// a collector starts on a lake, so that detectors find every version's
/// edges; an error is logged and left to the next maintenance pass.
pub fn backfill_edges(lake: &LakeWriter) {
    match lake.backfill_edge_sets() {
        Ok(dates) if !dates.is_empty() => {
            tracing::info!(?dates, "histogram edge sets derived for older partitions")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot derive histogram edge sets; retrying at the next maintenance pass")
        }
    }
}

/// One pass: retention first (no point compacting what goes), then
/// compaction.
#[tracing::instrument(name = "maintenance", skip(lake))]
pub fn once(
    lake: &LakeWriter,
    min_files: usize,
    retention: Option<Duration>,
    grace: Duration,
) -> Result<Report, LakeError> {
    let mut report = Report::default();
    if let Some(age) = retention {
        let age = chrono::TimeDelta::from_std(age).unwrap_or(chrono::TimeDelta::MAX);
        let cutoff = Utc::now()
            .date_naive()
            .checked_sub_signed(age)
            .unwrap_or(chrono::NaiveDate::MIN);
        report.dropped = lake.drop_before(cutoff)?;
    }
    report.edges_backfilled = lake.backfill_edge_sets()?;
    report.compacted = lake.compact_all(min_files, grace)?;
    Ok(report)
}

/// Runs [`once`] every `compact_interval` until `shutdown`.
pub async fn run(lake: Arc<LakeWriter>, config: Maintenance, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(config.compact_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let lake = lake.clone();
        let (min_files, retention) = (config.compact_min_files, config.retention);
        let pass = tokio::task::spawn_blocking(move || once(&lake, min_files, retention, GRACE));
        match pass.await {
            Ok(Ok(report)) => {
                for c in &report.compacted {
                    tracing::info!(
                        table = c.table,
                        date = c.date,
                        files = c.files_before,
                        rows = c.rows,
                        duplicates = c.duplicates,
                        "partition compacted"
                    );
                }
                for p in &report.dropped {
                    tracing::info!(partition = p, "partition dropped (retention)");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "lake maintenance failed; retrying next interval")
            }
            Err(e) => tracing::error!(error = %e, "lake maintenance task failed"),
        }
    }
}
