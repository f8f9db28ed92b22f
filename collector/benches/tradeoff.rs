//! What a device-day budget can detect: the trade-off table of
//! BENCHMARKS.md ("Privacy against detection") and docs/privacy.md.
//!
//! `cargo bench -p driftline-collector --bench tradeoff [-- TRIALS]`
//!
//! For each device-day epsilon (at delta 1e-6), window length and fleet
//! size, the agent's default configuration (Gaussian noise, `K` = 10
//! events per model and window, two models) is calibrated by the agent's
//! own accountant, and the three standard drifts are run through the
//! built-in detectors' statistics (`query::stats`, the functions their SQL
//! calls, with their thresholds and alpha 0.001): latency +30 %
//! (`latency_regression`), mean confidence 0.8 -> 0.7 (`prediction_drift`)
//! and an error rate doubling from 2 % (`error_rate`).
//!
//! The fleet is simulated at the level the detectors see: per period, the
//! fleet's counted events (each device-window counts `min(Poisson, K)`
//! events), spread over the buckets, plus the Gaussian noise of every
//! device-window (variance `sigma^2` per count, summed). Each device makes
//! 60 inferences per model and hour. The current period is 15 minutes or
//! one window, whichever is longer, and the reference the 4 periods before
//! it, as in the detectors. A drift starts at a period boundary; the delay
//! is from its start to the end of the first period that fires, and a
//! drift not found within 6 hours is missed. Null periods (no drift) are
//! evaluated too, to count false alarms.

use driftline_collector::query::stats::{
    hist_quantile, hist_quantile_se, hist_shift_pvalue, normal_sf, psi, rate_z,
};
use driftline_core::histogram::{CONFIDENCE_EDGES, LATENCY_MS_EDGES};
use driftline_pipeline::accountant;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution, Normal};
use statrs::distribution::{Beta, ContinuousCDF, LogNormal};

const EPSILONS: [f64; 4] = [1.0, 2.0, 4.0, 8.0];
const WINDOWS: [(u32, &str); 3] = [(60, "1 min"), (900, "15 min"), (3600, "1 h")];
const FLEETS: [u64; 4] = [100, 1_000, 10_000, 100_000];
const K: u32 = 10;
/// Counts one inference moves (no labels, no custom features).
const PER_EVENT: f64 = 6.0;
const MODELS: u64 = 2;
const INFERENCES_PER_HOUR: f64 = 60.0;
const ALPHA: f64 = 0.001;
const HORIZON_SECS: u32 = 6 * 3600;
const NULL_PERIODS: usize = 8;

#[derive(Clone, Copy, Debug)]
enum Drift {
    Latency,
    Confidence,
    Errors,
}

impl Drift {
    fn name(self) -> &'static str {
        match self {
            Drift::Latency => "latency +30 %",
            Drift::Confidence => "confidence 0.8 -> 0.7",
            Drift::Errors => "error rate 2 % -> 4 %",
        }
    }
}

/// What one model does, before or after the drift.
struct Behaviour {
    latency: Vec<f64>,
    confidence: Vec<f64>,
    error_rate: f64,
}

fn bucket_probabilities(edges: &[f64], cdf: impl Fn(f64) -> f64) -> Vec<f64> {
    let n = edges.len() - 1;
    (0..n)
        .map(|i| {
            // Values outside the edges are clipped into the end buckets.
            let lo = if i == 0 { 0.0 } else { cdf(edges[i]) };
            let hi = if i == n - 1 { 1.0 } else { cdf(edges[i + 1]) };
            (hi - lo).max(0.0)
        })
        .collect()
}

fn behaviour(drift: Option<Drift>) -> Result<Behaviour, Box<dyn std::error::Error>> {
    let latency_scale: f64 = if matches!(drift, Some(Drift::Latency)) {
        1.3
    } else {
        1.0
    };
    let latency = LogNormal::new((120.0 * latency_scale).ln(), 0.8)?;
    let (a, b) = if matches!(drift, Some(Drift::Confidence)) {
        (7.0, 3.0)
    } else {
        (8.0, 2.0)
    };
    let confidence = Beta::new(a, b)?;
    Ok(Behaviour {
        latency: bucket_probabilities(&LATENCY_MS_EDGES, |x| latency.cdf(x)),
        confidence: bucket_probabilities(&CONFIDENCE_EDGES, |x| confidence.cdf(x)),
        error_rate: if matches!(drift, Some(Drift::Errors)) {
            0.04
        } else {
            0.02
        },
    })
}

/// Mean and variance of `min(X, K)`, `X ~ Poisson(lambda)`.
fn capped_poisson(lambda: f64) -> (f64, f64) {
    let (mut p, mut mean, mut second, mut below) = ((-lambda).exp(), 0.0, 0.0, 0.0);
    for k in 0..K {
        let k = f64::from(k);
        mean += k * p;
        second += k * k * p;
        below += p;
        p *= lambda / (k + 1.0);
    }
    let kf = f64::from(K);
    let rest = (1.0 - below).max(0.0);
    mean += kf * rest;
    second += kf * kf * rest;
    (mean, second - mean * mean)
}

/// One period's fleet sums as the detectors see them.
struct Period {
    latency: Vec<f64>,
    confidence: Vec<f64>,
    inferences: f64,
    errors: f64,
}

struct Cell {
    /// Device-windows in one current period.
    device_windows: f64,
    events_mean: f64,
    events_var: f64,
    noise_var: f64,
}

fn multinomial(rng: &mut ChaCha8Rng, n: u64, p: &[f64]) -> Vec<f64> {
    let (mut left, mut mass) = (n, 1.0);
    let mut out = Vec::with_capacity(p.len());
    for (i, pi) in p.iter().enumerate() {
        let x = if i == p.len() - 1 || mass <= 0.0 {
            left
        } else {
            Binomial::new(left, (pi / mass).clamp(0.0, 1.0)).map_or(0, |b| b.sample(rng))
        };
        out.push(x as f64);
        left -= x.min(left);
        mass -= pi;
    }
    out
}

fn period(rng: &mut ChaCha8Rng, cell: &Cell, b: &Behaviour) -> Period {
    let events = Normal::new(
        cell.device_windows * cell.events_mean,
        (cell.device_windows * cell.events_var).sqrt(),
    )
    .map_or(0.0, |d| d.sample(rng))
    .round()
    .max(0.0) as u64;
    let latency = multinomial(rng, events, &b.latency);
    let confidence = multinomial(rng, events, &b.confidence);
    let errors = Binomial::new(events, b.error_rate).map_or(0, |d| d.sample(rng)) as f64;
    let noise = Normal::new(0.0, cell.noise_var.sqrt()).ok();
    let mut noisy = |x: f64| x + noise.as_ref().map_or(0.0, |d| d.sample(rng)).round();
    Period {
        latency: latency.into_iter().map(&mut noisy).collect(),
        confidence: confidence.into_iter().map(&mut noisy).collect(),
        inferences: noisy(events as f64),
        errors: noisy(errors),
    }
}

fn sum(periods: &[Period], f: impl Fn(&Period) -> Vec<f64>) -> Vec<f64> {
    let mut out = f(&periods[0]);
    for p in &periods[1..] {
        for (o, x) in out.iter_mut().zip(f(p)) {
            *o += x;
        }
    }
    out
}

/// Whether `drift`'s detector fires on `current` against `reference` (4
/// periods), as its SQL decides.
fn fires(drift: Drift, reference: &[Period], current: &Period, noise_var: f64) -> bool {
    let (v_ref, v_cur) = (noise_var * reference.len() as f64, noise_var);
    match drift {
        Drift::Latency => {
            let r = sum(reference, |p| p.latency.clone());
            let edges = LATENCY_MS_EDGES;
            let (Some(rp), Some(cp)) = (
                hist_quantile(&edges, &r, 0.5),
                hist_quantile(&edges, &current.latency, 0.5),
            ) else {
                return false;
            };
            let (Some(rs), Some(cs)) = (
                hist_quantile_se(&edges, &r, 0.5, v_ref),
                hist_quantile_se(&edges, &current.latency, 0.5, v_cur),
            ) else {
                return false;
            };
            let p = normal_sf((cp - rp) / (rs * rs + cs * cs).sqrt());
            rp > 0.0 && cp / rp - 1.0 >= 0.2 && p.is_some_and(|p| p < ALPHA)
        }
        Drift::Confidence => {
            let r = sum(reference, |p| p.confidence.clone());
            let p = hist_shift_pvalue(&r, &current.confidence, v_ref, v_cur);
            psi(&r, &current.confidence).is_some_and(|v| v >= 0.1) && p.is_some_and(|p| p < ALPHA)
        }
        Drift::Errors => {
            let (rx, rn) = (
                reference.iter().map(|p| p.errors).sum::<f64>(),
                reference.iter().map(|p| p.inferences).sum::<f64>(),
            );
            let (cx, cn) = (current.errors, current.inferences);
            if rn <= 0.0 || cn <= 0.0 {
                return false;
            }
            let z = rate_z(rx, rn, v_ref, v_ref, cx, cn, v_cur, v_cur);
            cx / cn - rx / rn >= 0.01 && z.and_then(normal_sf).is_some_and(|p| p < ALPHA)
        }
    }
}

struct Outcome {
    delays_min: Vec<f64>,
    missed: usize,
    false_alarms: usize,
    null_evaluations: usize,
}

fn run_cell(
    epsilon: f64,
    window_secs: u32,
    fleet: u64,
    drift: Drift,
    trials: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    // The windows one day's events can touch, as the agent calibrates.
    let windows_per_day = driftline_pipeline::accountant::windows_per_period(
        chrono::TimeDelta::days(1),
        window_secs,
        MODELS as usize,
    );
    let rho = accountant::calibrate(false, windows_per_day, epsilon, 1e-6)?;
    let sigma = f64::from(K) * PER_EVENT.sqrt() / (2.0 * rho).sqrt();
    let period_secs = window_secs.max(900);
    let per_device = f64::from(period_secs / window_secs);
    let (events_mean, events_var) =
        capped_poisson(INFERENCES_PER_HOUR * f64::from(window_secs) / 3600.0);
    let cell = Cell {
        device_windows: fleet as f64 * per_device,
        events_mean,
        events_var,
        noise_var: fleet as f64 * per_device * sigma * sigma,
    };
    let (before, after) = (behaviour(None)?, behaviour(Some(drift))?);
    let mut out = Outcome {
        delays_min: Vec::new(),
        missed: 0,
        false_alarms: 0,
        null_evaluations: 0,
    };
    let horizon = (HORIZON_SECS / period_secs) as usize;
    for _ in 0..trials {
        let mut periods: Vec<Period> = (0..4 + NULL_PERIODS)
            .map(|_| period(rng, &cell, &before))
            .collect();
        for j in 4..periods.len() {
            out.null_evaluations += 1;
            if fires(drift, &periods[j - 4..j], &periods[j], cell.noise_var) {
                out.false_alarms += 1;
            }
        }
        let start = periods.len();
        let mut found = None;
        for j in 0..horizon {
            periods.push(period(rng, &cell, &after));
            let now = start + j;
            if fires(drift, &periods[now - 4..now], &periods[now], cell.noise_var) {
                found = Some(f64::from(period_secs) * (j + 1) as f64 / 60.0);
                break;
            }
        }
        match found {
            Some(d) => out.delays_min.push(d),
            None => out.missed += 1,
        }
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trials: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!(
        "Gaussian noise, K = {K} events per model and window, {MODELS} models, {INFERENCES_PER_HOUR} inferences per device, model and hour; \
         alpha {ALPHA}; cell = drifts found within 6 h of {trials} trials, and their median delay."
    );
    let mut false_alarms = (0, 0);
    for drift in [Drift::Latency, Drift::Confidence, Drift::Errors] {
        println!("\n{}\n", drift.name());
        println!(
            "| device-day epsilon | window | {} |",
            FLEETS.map(|n| format!("{n} devices")).join(" | ")
        );
        println!("|---|---|---:|---:|---:|---:|");
        for epsilon in EPSILONS {
            for (window_secs, window) in WINDOWS {
                let mut cells = Vec::new();
                for fleet in FLEETS {
                    let o = run_cell(epsilon, window_secs, fleet, drift, trials, &mut rng)?;
                    false_alarms.0 += o.false_alarms;
                    false_alarms.1 += o.null_evaluations;
                    let found = o.delays_min.len();
                    cells.push(if found == 0 {
                        format!("0/{trials}")
                    } else {
                        let mut d = o.delays_min.clone();
                        d.sort_by(f64::total_cmp);
                        format!("{found}/{trials}, {:.0} min", d[d.len() / 2])
                    });
                }
                println!("| {epsilon} | {window} | {} |", cells.join(" | "));
            }
        }
    }
    println!(
        "\nfalse alarms: {} in {} evaluations of periods without drift (alpha {ALPHA} expects {:.1})",
        false_alarms.0,
        false_alarms.1,
        false_alarms.1 as f64 * ALPHA
    );
    Ok(())
}
