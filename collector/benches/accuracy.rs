//! What the privacy noise costs in accuracy, measured with the real parts:
//! the agent's OpenDP privatizer, the collector's ingest and lake, and the
//! built-in detector SQL run by DataFusion.
//!
//! - `utility`: error of the fleet mean latency and of the fleet latency
//!   histogram against the local-DP minimax lower bound, whose order is
//!   `range / (epsilon * sqrt(n))` for a mean and `k / (epsilon * sqrt(n))`
//!   (L1) for a `k`-bucket histogram, `n` protected units.
//! - `detection`: for each simulated drift kind, how long after the drift
//!   the matching detector fires, and how often any detector fires when
//!   nothing drifted, over many seeds.
//!
//! `cargo bench -p driftline-collector --bench accuracy -- [--quick]
//! [--only utility|detection] [--seeds N] [--out DIR]` prints markdown tables and, with
//! `--out`, writes them to `DIR/utility.md` and `DIR/detection.md`
//! (`bench/suite.py` puts them into BENCHMARKS.md). Accuracy does not
//! depend on the build profile; only the run time does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use driftline_collector::detect;
use driftline_collector::ingest::{Counters, Ingest, IngestLimits};
use driftline_collector::lake::LakeWriter;
use driftline_collector::query;
use driftline_collector::query::stats::hist_mean;
use driftline_core::histogram::{bucket_index, LATENCY_MS_EDGES};
use driftline_pipeline::event::InferenceEvent;
use driftline_pipeline::ledger::Budget;
use driftline_pipeline::privacy::{MechanismConfig, Privatizer};
use driftline_pipeline::window::{ModelKey, ModelSpec, Windower};
use driftline_sim::{DeviceSim, Drift, DriftKind, SimConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};

type Error = Box<dyn std::error::Error + Send + Sync>;
/// A message as the broker would deliver it: topic, payload, arrival.
type Message = (String, Vec<u8>, DateTime<Utc>);

struct Options {
    quick: bool,
    only: Option<String>,
    /// Fleets simulated per drift in `detection` (default 4, 1 if quick).
    seeds: Option<u64>,
    out: Option<PathBuf>,
}

fn options() -> Result<Options, Error> {
    let mut o = Options {
        quick: false,
        only: None,
        seeds: None,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--only" => o.only = args.next(),
            "--out" => o.out = args.next().map(PathBuf::from),
            "--seeds" => o.seeds = Some(args.next().ok_or("--seeds needs a number")?.parse()?),
            // cargo bench passes --bench to every harness.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(o)
}

fn main() -> Result<(), Error> {
    let o = options()?;
    let started = std::time::Instant::now();
    let wanted = |what: &str| o.only.as_deref().is_none_or(|w| w == what);
    let mut blocks = Vec::new();
    if wanted("utility") {
        blocks.push(("utility", utility(o.quick)?));
    }
    if wanted("detection") {
        let seeds = o.seeds.unwrap_or(if o.quick { 1 } else { 4 });
        blocks.push(("detection", detection(seeds)?));
    }
    for (name, text) in &blocks {
        println!("{text}");
        if let Some(dir) = &o.out {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{name}.md")), text)?;
        }
    }
    eprintln!("accuracy benchmarks took {:.0?}", started.elapsed());
    Ok(())
}

/// Runs `work(thread, threads)` on one thread per core and concatenates
/// what they return (the first error wins).
fn on_every_core<T: Send>(
    work: impl Fn(usize, usize) -> Result<Vec<T>, Error> + Sync,
) -> Result<Vec<T>, Error> {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let results: Vec<Result<Vec<T>, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                s.spawn(move || work(t, threads))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect()
    });
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

// ---------------------------------------------------------------- utility

/// One device's window: exactly one inference, so `n` devices are `n`
/// protected units (the unit is one event), the setting of the local-DP
/// lower bound. Returns the exact and the noised latency histogram.
fn one_device(
    privatizer: &Privatizer,
    windower: &mut Windower,
    handle: &driftline_pipeline::window::ModelHandle,
    end: &mut DateTime<Utc>,
    latency_ms: f64,
) -> Result<(usize, Vec<i64>, i64), Error> {
    handle.record_at(
        *end - TimeDelta::seconds(30),
        &InferenceEvent {
            latency_ms,
            input_tokens: 10,
            output_tokens: 10,
            confidence: Some(0.9),
            error: false,
            label: None,
            custom: &[],
        },
    );
    let closed = windower.close_due(*end);
    *end += TimeDelta::seconds(60);
    let (mut noised, mut count) = (Vec::new(), 0);
    for window in closed {
        let mut ledger = driftline_pipeline::ledger::Ledger::unbounded();
        let driftline_pipeline::release::Released::Window(private) =
            driftline_pipeline::release::release(
                privatizer,
                &mut ledger,
                window,
                TimeDelta::zero(),
            )?
        else {
            return Err("an unbounded ledger withheld a window".into());
        };
        let report = private.into_report(
            &driftline_pipeline::privacy::DeviceIdentity {
                device_id: "u".into(),
                fleet: "u".into(),
                agent_version: "0".into(),
            },
            0,
        );
        noised = report.latency_ms.counts;
        count = report.inference_count;
    }
    Ok((bucket_index(&LATENCY_MS_EDGES, latency_ms), noised, count))
}

struct Cell {
    epsilon: f64,
    n: usize,
    trials: usize,
    /// RMSE of `hist_mean` (the SQL function: negative buckets count as 0).
    clamped_rmse: f64,
    /// RMSE of the plain ratio `sum(mid * bucket) / sum(inference_count)`,
    /// each sum unbiased.
    plain_rmse: f64,
    hist_l1: f64,
}

/// `sum(mid * bucket) / inferences` without clamping.
fn plain_mean(counts: &[f64], inferences: f64) -> f64 {
    let num: f64 = counts
        .iter()
        .enumerate()
        .map(|(k, c)| c * (LATENCY_MS_EDGES[k] + LATENCY_MS_EDGES[k + 1]) / 2.0)
        .sum();
    if inferences > 0.0 {
        num / inferences
    } else {
        0.0
    }
}

/// `trials` fleets of `n` devices at `epsilon`, spread over the cores.
fn cell(epsilon: f64, n: usize, trials: usize, seed: u64) -> Result<Cell, Error> {
    let errors = on_every_core(|t, threads| {
        let privatizer = Privatizer::laplace(epsilon)?;
        let start = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .ok_or("date")?;
        let mut windower = Windower::new(60, start);
        // One inference per device: K = 1, so the device is the unit.
        let spec = ModelSpec::default().with_max_events_per_window(1);
        let handle = windower.register(ModelKey::new("m", "1"), &spec);
        let mut end = start + TimeDelta::seconds(60);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((t as u64) << 32));
        let latency = LogNormal::new(120f64.ln(), 0.8)?;
        let k = LATENCY_MS_EDGES.len() - 1;
        let mut out = Vec::new();
        for _ in (t..trials).step_by(threads) {
            let mut exact = vec![0f64; k];
            let mut noised = vec![0f64; k];
            let mut inferences = 0f64;
            for _ in 0..n {
                let (bucket, counts, count) = one_device(
                    &privatizer,
                    &mut windower,
                    &handle,
                    &mut end,
                    latency.sample(&mut rng),
                )?;
                exact[bucket] += 1.0;
                inferences += count as f64;
                for (sum, c) in noised.iter_mut().zip(counts) {
                    *sum += c as f64;
                }
            }
            // The estimator the SQL uses (hist_mean), with and
            // without the noise: the difference is the noise's.
            let truth = hist_mean(&LATENCY_MS_EDGES, &exact).ok_or("empty")?;
            let estimate = hist_mean(&LATENCY_MS_EDGES, &noised).unwrap_or(0.0);
            let clamped: Vec<f64> = noised.iter().map(|c| c.max(0.0)).collect();
            let total: f64 = clamped.iter().sum::<f64>().max(1.0);
            let l1: f64 = clamped
                .iter()
                .zip(&exact)
                .map(|(c, e)| (c / total - e / n as f64).abs())
                .sum();
            out.push([
                estimate - truth,
                plain_mean(&noised, inferences) - truth,
                l1,
            ]);
        }
        Ok(out)
    })?;
    let m = errors.len().max(1) as f64;
    Ok(Cell {
        epsilon,
        n,
        trials: errors.len(),
        clamped_rmse: (errors.iter().map(|e| e[0] * e[0]).sum::<f64>() / m).sqrt(),
        plain_rmse: (errors.iter().map(|e| e[1] * e[1]).sum::<f64>() / m).sqrt(),
        hist_l1: errors.iter().map(|e| e[2]).sum::<f64>() / m,
    })
}

fn utility(quick: bool) -> Result<String, Error> {
    let range = LATENCY_MS_EDGES[LATENCY_MS_EDGES.len() - 1] - LATENCY_MS_EDGES[0];
    let k = (LATENCY_MS_EDGES.len() - 1) as f64;
    let sizes: &[(usize, usize)] = if quick {
        &[(100, 10), (1000, 2)]
    } else {
        &[(100, 100), (1000, 20), (10_000, 4)]
    };
    let mut lines = vec![
        "| epsilon | devices n | fleets | bound range/(eps*sqrt n) (ms) | RMSE of mean latency, plain ratio (ms) | ratio to bound | RMSE, hist_mean (clamped) (ms) | ratio to bound | bound k/(eps*sqrt n) | mean L1 error of histogram | ratio to bound |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for (i, epsilon) in [0.5, 1.0, 2.0].into_iter().enumerate() {
        for (j, &(n, trials)) in sizes.iter().enumerate() {
            let c = cell(epsilon, n, trials, 1000 + (i * 10 + j) as u64)?;
            let sqrt_n = (c.n as f64).sqrt();
            let mean_bound = range / (c.epsilon * sqrt_n);
            let hist_bound = k / (c.epsilon * sqrt_n);
            lines.push(format!(
                "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.3} | {:.3} | {:.2} |",
                c.epsilon,
                c.n,
                c.trials,
                mean_bound,
                c.plain_rmse,
                c.plain_rmse / mean_bound,
                c.clamped_rmse,
                c.clamped_rmse / mean_bound,
                hist_bound,
                c.hist_l1,
                c.hist_l1 / hist_bound
            ));
            eprintln!("{}", lines[lines.len() - 1]);
        }
    }
    Ok(lines.join("\n"))
}

// -------------------------------------------------------------- detection

/// A drift the simulator can inject, its relative size, and the detector
/// that should see it. The rates start at 2% (errors, negative feedback per
/// inference): a doubling and a quadrupling.
const DRIFTS: [(DriftKind, &str, f64, &str); 7] = [
    (DriftKind::Input, "input", 0.3, "input_drift"),
    (DriftKind::Confidence, "confidence", 0.1, "prediction_drift"),
    (DriftKind::Latency, "latency", 0.3, "latency_regression"),
    (DriftKind::Errors, "errors", 1.0, "error_rate"),
    (DriftKind::Errors, "errors", 3.0, "error_rate"),
    (DriftKind::Feedback, "feedback", 1.0, "negative_feedback"),
    (DriftKind::Feedback, "feedback", 3.0, "negative_feedback"),
];

const DEVICES: u32 = 30;
const EVENTS_PER_WINDOW: f64 = 40.0;
const DRIFT_AT: u64 = 90;
const WINDOWS: u64 = 150;

/// One simulated fleet (2 models, drift on model-0 from window 90),
/// ingested into a fresh lake; every built-in detector evaluated at each
/// 15-minute boundary from 75 to 150 minutes.
fn run_fleet(
    rt: &tokio::runtime::Runtime,
    kind: DriftKind,
    size: f64,
    seed: u64,
) -> Result<Vec<driftline_collector::lake::schema::Evaluation>, Error> {
    let start = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .ok_or("date")?;
    let config = SimConfig {
        broker: "mqtt://127.0.0.1:1".parse()?,
        fleet: "bench".into(),
        devices: DEVICES,
        models: 2,
        windows: Some(WINDOWS),
        window_secs: 60,
        start,
        seed,
        mechanism: MechanismConfig::Laplace { epsilon: 60.0 },
        events_per_window: EVENTS_PER_WINDOW,
        drift: Some(Drift {
            at: DRIFT_AT,
            model_id: "model-0".into(),
            kind,
            size,
        }),
        live: false,
        budget: Budget {
            epsilon: None,
            delta: 1e-6,
            rho: None,
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        },
        max_events_per_window: 60,
        first_device: 0,
        credentials: None,
        tls: Default::default(),
    };
    // Devices noise their windows on every core.
    let messages: Vec<Message> = on_every_core(|t, threads| {
        let mut out = Vec::new();
        for index in (t as u32..config.devices).step_by(threads) {
            let mut sim = DeviceSim::new(index, &config)?;
            let topic =
                driftline_core::topic::metrics_topic(&config.fleet, &sim.identity().device_id);
            let mut seq = 0;
            for w in 0..WINDOWS {
                for private in sim.window(w)? {
                    let report = private.into_report(sim.identity(), seq);
                    seq += 1;
                    out.push((topic.clone(), report.encode()?, sim.window_end(w)));
                }
            }
        }
        Ok(out)
    })?;
    let dir = tempfile::tempdir()?;
    let lake = LakeWriter::open(dir.path())?;
    let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Counters::default()));
    for (topic, payload, at) in messages {
        ingest.handle(&topic, &payload, at + TimeDelta::seconds(1));
    }
    ingest.flush(&lake)?;
    let queries = dir.path().join("_driftline").join("queries");
    detect::install_builtin(&queries)?;
    let detectors = detect::load(&queries)?;
    rt.block_on(async {
        let ctx = query::session(dir.path()).await?;
        let mut out = Vec::new();
        for minute in (75..=150).step_by(15) {
            let at = start + TimeDelta::minutes(minute);
            for d in &detectors {
                out.extend(detect::evaluate(&ctx, d, at, 0).await?);
            }
        }
        Ok(out)
    })
}

/// `k/n` with its exact (Clopper-Pearson) 95 % interval.
fn rate_interval(k: u64, n: u64) -> String {
    use statrs::distribution::{Beta, ContinuousCDF};
    if n == 0 {
        return "-".into();
    }
    let (kf, nf) = (k as f64, n as f64);
    let quantile = |a: f64, b: f64, q: f64| Beta::new(a, b).map_or(f64::NAN, |d| d.inverse_cdf(q));
    let lower = if k == 0 {
        0.0
    } else {
        quantile(kf, nf - kf + 1.0, 0.025)
    };
    let upper = if k == n {
        1.0
    } else {
        quantile(kf + 1.0, nf - kf, 0.975)
    };
    format!("{:.4} ({lower:.4}-{upper:.4})", kf / nf)
}

/// One run's first alarm and first job, in minutes after the onset.
type Delays = (Option<i64>, Option<i64>);

#[derive(Default)]
struct Tally {
    evaluations: u64,
    fired: u64,
    /// Times two consecutive periods fired: what would open a retraining
    /// job under the default rule (`--retrain-consecutive 2`).
    consecutive: u64,
    alpha: f64,
}

fn detection(seeds: u64) -> Result<String, Error> {
    let rt = tokio::runtime::Runtime::new()?;
    let onset = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .ok_or("date")?
        + TimeDelta::minutes(DRIFT_AT as i64);
    // Per drift: each run's first alarm and first job, in minutes after
    // the onset.
    let mut delays: BTreeMap<String, Vec<Delays>> = BTreeMap::new();
    let mut quiet: BTreeMap<String, Tally> = BTreeMap::new();
    for (kind, name, size, detector) in DRIFTS {
        for seed in 0..seeds {
            let evaluations = run_fleet(&rt, kind, size, 7919 * seed + 17)?;
            let mut first: Option<i64> = None;
            // The first drifted period that fired right after another: where
            // the default retraining rule (two in a row) opens a job.
            let mut job: Option<i64> = None;
            // Whether the previous period of (detector, model) fired.
            let mut previous: BTreeMap<(String, String), bool> = BTreeMap::new();
            for e in &evaluations {
                let drifted =
                    e.detector == detector && e.model_id == "model-0" && e.current_end > onset;
                let before = previous.insert((e.detector.clone(), e.model_id.clone()), e.fired);
                if drifted {
                    if e.fired {
                        let delay = (e.current_end - onset).num_minutes();
                        first = Some(first.map_or(delay, |f| f.min(delay)));
                        if before == Some(true) && job.is_none() {
                            job = Some(delay);
                        }
                    }
                } else {
                    // Nothing this detector looks at drifted here (before
                    // the onset, the other model, or another kind).
                    let t = quiet.entry(e.detector.clone()).or_default();
                    t.evaluations += 1;
                    t.fired += u64::from(e.fired);
                    t.alpha = e.alpha;
                    t.consecutive += u64::from(e.fired && before == Some(true));
                }
            }
            eprintln!("{name} drift +{size}, seed {seed}: first alarm {first:?} min after onset");
            delays
                .entry(format!("{name} {size}"))
                .or_default()
                .push((first, job));
        }
    }
    let mut lines = vec![
        format!(
            "{DEVICES} devices x 2 models, {EVENTS_PER_WINDOW} inferences per model per minute, epsilon 60 per window for K = 60 events (noise b = 7 per count); \
             drift on model-0 from minute {DRIFT_AT}; detectors evaluated every 15 minutes \
             (their current period is 15 minutes, so 15 min is the earliest possible alarm); {seeds} seed(s) per drift."
        ),
        String::new(),
        "| drift (size) | detector | detected | median delay (min) | worst delay (min) | job opened (two in a row) | median delay to the job (min) |".to_owned(),
        "|---|---|---|---|---|---|---|".to_owned(),
    ];
    for (kind, name, size, detector) in DRIFTS {
        let _ = kind;
        let runs = delays
            .get(&format!("{name} {size}"))
            .cloned()
            .unwrap_or_default();
        let sorted = |pick: fn(&Delays) -> Option<i64>| {
            let mut v: Vec<i64> = runs.iter().filter_map(pick).collect();
            v.sort_unstable();
            v
        };
        let (hit, jobs) = (sorted(|r| r.0), sorted(|r| r.1));
        let median = |v: &[i64]| v.get(v.len() / 2).map_or("-".into(), |d| d.to_string());
        let worst = hit.last().map_or("-".into(), |d| d.to_string());
        lines.push(format!(
            "| {name} (+{:.0}%) | {detector} | {}/{} | {} | {worst} | {}/{} | {} |",
            size * 100.0,
            hit.len(),
            runs.len(),
            median(&hit),
            jobs.len(),
            runs.len(),
            median(&jobs),
        ));
    }
    lines.push(String::new());
    lines.push(
        "| detector | evaluations without drift | false alarms | rate (95% interval) | alpha | two in a row (a job) |"
            .to_owned(),
    );
    lines.push("|---|---|---|---|---|---|".to_owned());
    let mut total = Tally::default();
    for (detector, t) in &quiet {
        lines.push(format!(
            "| {detector} | {} | {} | {} | {} | {} |",
            t.evaluations,
            t.fired,
            rate_interval(t.fired, t.evaluations),
            t.alpha,
            t.consecutive
        ));
        total.evaluations += t.evaluations;
        total.fired += t.fired;
        total.consecutive += t.consecutive;
        total.alpha = t.alpha;
    }
    lines.push(format!(
        "| all | {} | {} | {} | {} | {} |",
        total.evaluations,
        total.fired,
        rate_interval(total.fired, total.evaluations),
        total.alpha,
        total.consecutive
    ));
    Ok(lines.join("\n"))
}
