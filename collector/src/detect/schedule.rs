//! When detection runs: after each new period end seen in the lake.

use super::*;

/// Runs detection as event time advances: after each new period end seen
/// in the lake, every detector runs for it, in order, so a backfill or a
/// replay is evaluated like live data. Used by `serve` and `demo`.
pub struct Schedule {
    pub queries: PathBuf,
    pub rule: crate::retrain::RetrainRule,
    pub targets: crate::retrain::Targets,
    /// Most periods caught up per tick (a long backfill is spread out).
    pub max_periods_per_tick: usize,
    /// How long (wall clock) a due period waits for the devices of its
    /// reference period that have not reported past its end yet.
    pub lateness: std::time::Duration,
    /// How far back (event time) a detector that never ran is evaluated.
    pub horizon: TimeDelta,
    last_end: std::collections::HashMap<String, DateTime<Utc>>,
    /// When each period (by detector and end) was first found due but
    /// incomplete.
    waiting: std::collections::HashMap<(String, DateTime<Utc>), std::time::Instant>,
}

/// What one tick found, for printing.
#[derive(Debug, Default)]
pub struct Tick {
    pub events: Vec<Evaluation>,
    pub jobs: Vec<schema::JobEvent>,
    /// Periods evaluated (first evaluations and revisions), all detectors.
    pub evaluated: usize,
    /// Complete periods still to evaluate after this tick, all detectors.
    pub behind: usize,
}

impl Schedule {
    /// Evaluates `detector` for the period ending at `end` (as `revision`),
    /// starts the retraining jobs of what fired, and adds both to `tick`
    /// (the events only if this evaluation stored them first).
    async fn run_period(
        &self,
        ctx: &SessionContext,
        lake: &LakeWriter,
        detector: &Detector,
        end: DateTime<Utc>,
        revision: i64,
        tick: &mut Tick,
    ) -> Result<(), DetectError> {
        let summary = run_all(ctx, lake, std::slice::from_ref(detector), end, revision).await?;
        let fired: Vec<Evaluation> = summary
            .evaluations
            .into_iter()
            .filter(|e| e.fired)
            .collect();
        let jobs = crate::retrain::after_run(ctx, lake, &self.rule, &self.targets, &fired)
            .await
            .map_err(|e| DetectError::Retrain(e.to_string()))?;
        if summary.new_events > 0 {
            tick.events.extend(fired);
        }
        tick.jobs.extend(jobs);
        Ok(())
    }

    pub fn new(
        queries: PathBuf,
        rule: crate::retrain::RetrainRule,
        targets: crate::retrain::Targets,
    ) -> Self {
        Schedule {
            queries,
            rule,
            targets,
            max_periods_per_tick: 16,
            lateness: std::time::Duration::from_secs(300),
            horizon: DEFAULT_HORIZON,
            last_end: Default::default(),
            waiting: Default::default(),
        }
    }

    /// Runs every detector on its periods completed since the last tick;
    /// stops between two runs once `shutdown` is cancelled (the next tick,
    /// or the next start, picks up from there).
    pub async fn tick(
        &mut self,
        ctx: &SessionContext,
        lake: &LakeWriter,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Tick, DetectError> {
        let detectors = load(&self.queries)?;
        let Some(latest) = latest_event_time(ctx)
            .await
            .map_err(|source| DetectError::Query {
                detector: "(latest event time)".into(),
                file: self.queries.clone(),
                source,
            })?
        else {
            return Ok(Tick::default());
        };
        let mut tick = Tick::default();
        match fleet_watermarks(ctx, latest - self.horizon).await {
            Ok(marks) => {
                for (fleet, mark) in marks {
                    metrics::gauge!("driftline_detect_watermark_seconds", "fleet" => fleet)
                        .set(mark.timestamp() as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "fleet watermarks"),
        }
        let mut complete: std::collections::HashMap<(DateTime<Utc>, DateTime<Utc>), Reporting> =
            Default::default();
        for detector in &detectors {
            let newest = detector.periods(latest).current_end;
            let step = TimeDelta::from_std(detector.current).unwrap_or(TimeDelta::hours(1));
            let mut next = match self.last_end.get(&detector.name) {
                Some(last) => *last + step,
                // First tick: after the last period the lake records (so
                // periods that passed while the collector was down are
                // evaluated, a few per tick), or over the horizon for a
                // detector that never ran.
                None => resume_from(ctx, detector, latest, self.horizon)
                    .await
                    .map_err(|source| DetectError::Query {
                        detector: detector.name.clone(),
                        file: self.queries.clone(),
                        source,
                    })?,
            };
            let mut done = 0;
            tracing::debug!(detector = detector.name, %latest, %newest, %next, "detection tick");
            while next <= newest && done < self.max_periods_per_tick {
                if shutdown.is_cancelled() {
                    return Ok(tick);
                }
                // The watermark: a period is evaluated once every device
                // that reported since its reference period began has
                // reported past its end, or once it has waited `lateness`
                // for them.
                let periods = detector.periods(next);
                let key = (periods.reference_start, periods.current_end);
                let Reporting {
                    expected, present, ..
                } = match complete.get(&key) {
                    Some(counts) => *counts,
                    None => {
                        let counts = reporting(ctx, &periods).await.map_err(|source| {
                            DetectError::Query {
                                detector: detector.name.clone(),
                                file: self.queries.clone(),
                                source,
                            }
                        })?;
                        complete.insert(key, counts);
                        counts
                    }
                };
                if present < expected {
                    let since = *self
                        .waiting
                        .entry((detector.name.clone(), next))
                        .or_insert_with(std::time::Instant::now);
                    if since.elapsed() < self.lateness {
                        tracing::debug!(detector = detector.name, period_end = %next, expected, present, "waiting for late devices");
                        break;
                    }
                    tracing::warn!(detector = detector.name, period_end = %next, expected, present, "evaluating a period with devices missing after the lateness bound");
                }
                self.waiting.remove(&(detector.name.clone(), next));
                self.run_period(ctx, lake, detector, next, 0, &mut tick)
                    .await?;
                self.last_end.insert(detector.name.clone(), next);
                metrics::gauge!("driftline_detect_evaluated_until_seconds", "detector" => detector.name.clone())
                    .set(next.timestamp() as f64);
                next += step;
                done += 1;
            }
            // Late data: periods evaluated before more of their rows
            // arrived are evaluated again, as a new revision.
            let late = revisions(ctx, detector, latest, self.horizon)
                .await
                .map_err(|source| DetectError::Query {
                    detector: detector.name.clone(),
                    file: self.queries.clone(),
                    source,
                })?;
            for (end, revision) in late {
                if shutdown.is_cancelled() || done >= self.max_periods_per_tick {
                    break;
                }
                // A revision waits for the late devices like a first
                // evaluation does, so that a backlog still arriving is
                // evaluated once, complete.
                let seen = reporting(ctx, &detector.periods(end))
                    .await
                    .map_err(|source| DetectError::Query {
                        detector: detector.name.clone(),
                        file: self.queries.clone(),
                        source,
                    })?;
                let key = (format!("{}#revision", detector.name), end);
                if seen.present < seen.expected {
                    let since = *self
                        .waiting
                        .entry(key.clone())
                        .or_insert_with(std::time::Instant::now);
                    if since.elapsed() < self.lateness {
                        continue;
                    }
                }
                self.waiting.remove(&key);
                tracing::info!(detector = detector.name, period_end = %end, revision, "late data: evaluating the period again");
                self.run_period(ctx, lake, detector, end, revision, &mut tick)
                    .await?;
                done += 1;
            }
            // Periods complete in the lake but not evaluated yet.
            let behind = if next <= newest {
                (newest - next).num_seconds() / step.num_seconds().max(1) + 1
            } else {
                0
            };
            metrics::gauge!("driftline_detect_lag_periods", "detector" => detector.name.clone())
                .set(behind as f64);
            tick.evaluated += done;
            tick.behind += usize::try_from(behind).unwrap_or(0);
        }
        Ok(tick)
    }
}

/// Runs `schedule` every `interval` until `shutdown`; with `print`, says
/// what fired and which jobs opened (the demo), else logs it.
pub async fn run_schedule(
    mut schedule: Schedule,
    ctx: std::sync::Arc<SessionContext>,
    lake: std::sync::Arc<LakeWriter>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    print: bool,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let say = |line: String| {
        if print {
            println!("  {line}");
        } else {
            tracing::info!("{line}");
        }
    };
    let mut catching_up = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match schedule.tick(&ctx, &lake, &shutdown).await {
            Ok(tick) => {
                if tick.behind > 0 && !catching_up {
                    catching_up = true;
                    say(format!(
                        "detection: catching up, {} periods evaluated, {} to go",
                        tick.evaluated, tick.behind
                    ));
                } else if tick.behind == 0 && catching_up {
                    catching_up = false;
                    say(format!(
                        "detection: caught up ({} periods evaluated in the last round)",
                        tick.evaluated
                    ));
                }
                for e in &tick.events {
                    let line = format!(
                        "drift: {} {} {} {} = {:.3} (threshold {}, p {:.1e}, {} devices) in {} .. {}",
                        e.severity.as_deref().unwrap_or("warning"),
                        e.detector,
                        e.model_id,
                        e.statistic,
                        e.value.unwrap_or(f64::NAN),
                        e.threshold,
                        e.p_value.unwrap_or(f64::NAN),
                        e.devices,
                        e.current_start.format("%H:%M"),
                        e.current_end.format("%H:%M"),
                    );
                    if print {
                        println!("  {line}");
                    } else {
                        tracing::warn!("{line}");
                    }
                }
                for j in &tick.jobs {
                    let line = format!(
                        "retraining job {} for {} {}: {} ({})",
                        j.job_id,
                        j.model_id,
                        j.model_version,
                        j.status,
                        j.detail.as_deref().unwrap_or_default()
                    );
                    if print {
                        println!("  {line}");
                    } else {
                        tracing::warn!("{line}");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "detection failed; retrying next interval"),
        }
    }
}
