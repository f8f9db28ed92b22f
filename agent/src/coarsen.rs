//! Coarsening: when the disk buffer is full, two buffered windows of the
//! same model are merged into one window of twice the length instead of
//! dropping data. Sums of noised counts stay unbiased, and each event is
//! still in exactly one published window, so the privacy guarantee per event
//! is unchanged.
//!
//! Windows `[t, t+w)` and `[t+w, t+2w)` merge when `t` is a multiple of
//! `2w` (the result stays UTC-aligned), everything but the counts is equal
//! (the privacy block included: windows from before and after a change of
//! the budget stay apart), and `2w` is at most a day; merged windows can
//! merge again (4w, 8w, ...). So a message merged from `m` windows has the
//! noise scales the collector's consistency rule expects: `s0` (Gaussian)
//! or at most `sqrt(m) s0` (Laplace), `s0` the scale its summed budget and
//! `K` imply (docs/wire-format.md).
//! Counts are summed. The noise of a merged count is the sum of two draws;
//! its `noise_scale` is the scale of a single draw with the same variance:
//! exact for Gaussian (`sqrt(s1^2 + s2^2)`), variance-equivalent for
//! discrete Laplace (docs/wire-format.md, "Coarsened windows").

use std::collections::{BTreeMap, HashMap};

use chrono::TimeDelta;
use driftline_core::wire::{self, Histogram, Mechanism, WindowReport};

/// Variance of discrete Laplace noise of scale `b`: `2q / (1-q)^2`, `q = e^(-1/b)`.
pub fn laplace_variance(b: f64) -> f64 {
    let q = (-1.0 / b).exp();
    2.0 * q / (1.0 - q).powi(2)
}

/// The discrete Laplace scale whose variance is `v` (inverse of [`laplace_variance`]).
pub fn laplace_scale_for_variance(v: f64) -> f64 {
    // v (1-q)^2 = 2q  =>  q = ((v + 1) - sqrt(2v + 1)) / v
    let q = ((v + 1.0) - (2.0 * v + 1.0).sqrt()) / v;
    -1.0 / q.ln()
}

fn combined_scale(mechanism: Mechanism, a: f64, b: f64) -> f64 {
    match mechanism {
        Mechanism::Laplace => laplace_scale_for_variance(laplace_variance(a) + laplace_variance(b)),
        Mechanism::Gaussian | Mechanism::None => (a * a + b * b).sqrt(),
    }
}

fn add_histograms(a: &Histogram, b: &Histogram) -> Option<Histogram> {
    (a.edges == b.edges && a.counts.len() == b.counts.len()).then(|| Histogram {
        edges: a.edges.clone(),
        counts: a.counts.iter().zip(&b.counts).map(|(x, y)| x + y).collect(),
    })
}

/// Merges `a` and the window right after it, or `None` if they cannot merge.
pub fn merge(a: &WindowReport, b: &WindowReport) -> Option<WindowReport> {
    let w = i64::from(a.window_secs);
    let same = a.schema_version == b.schema_version
        && a.device_id == b.device_id
        && a.fleet == b.fleet
        && a.model_id == b.model_id
        && a.model_version == b.model_version
        && a.window_secs == b.window_secs
        && a.privacy == b.privacy
        && b.window_start == a.window_start + TimeDelta::seconds(w)
        && a.window_start.timestamp().rem_euclid(2 * w) == 0
        && 2 * w <= i64::from(wire::MAX_WINDOW_SECS)
        && a.custom.keys().eq(b.custom.keys())
        && a.categories.len() == b.categories.len();
    if !same {
        return None;
    }
    let mut categories = BTreeMap::new();
    for ((name, ca), (name_b, cb)) in a.categories.iter().zip(&b.categories) {
        if name != name_b || !ca.keys().eq(cb.keys()) {
            return None;
        }
        categories.insert(
            name.clone(),
            ca.iter().map(|(k, x)| (k.clone(), x + cb[k])).collect(),
        );
    }
    let mut custom = BTreeMap::new();
    for (name, h) in &a.custom {
        custom.insert(name.clone(), add_histograms(h, &b.custom[name])?);
    }
    let max = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let mechanism = a.privacy.mechanism;
    let noise_scale = a
        .privacy
        .noise_scale
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                combined_scale(mechanism, *s, b.privacy.noise_scale[k]),
            )
        })
        .collect();
    // Post-processing of two released windows: it spends nothing more.
    // The merged message declares what its parts cost together (pure
    // epsilons and rhos add; a Gaussian epsilon is that of the summed rho)
    // and the events both may hold; when that count does not fit the
    // wire's bound the pair stays unmerged.
    let sum = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| x + y);
    let rho = sum(a.privacy.rho, b.privacy.rho);
    let delta = max(a.privacy.delta, b.privacy.delta);
    let epsilon = match mechanism {
        Mechanism::Gaussian => rho
            .zip(delta)
            .and_then(|(r, d)| driftline_pipeline::accountant::zcdp_epsilon(r, d).ok())
            .filter(|_| a.privacy.epsilon.is_some()),
        _ => sum(a.privacy.epsilon, b.privacy.epsilon),
    };
    let max_events_per_window = match (
        a.privacy.max_events_per_window,
        b.privacy.max_events_per_window,
    ) {
        (Some(x), Some(y)) => Some(
            x.checked_add(y)
                .filter(|k| *k <= wire::MAX_EVENTS_PER_WINDOW)?,
        ),
        _ => None,
    };
    Some(WindowReport {
        window_secs: a.window_secs * 2,
        privacy: wire::Privacy {
            mechanism,
            epsilon,
            delta,
            rho,
            noise_scale,
            max_events_per_window,
            device_day_epsilon: max(a.privacy.device_day_epsilon, b.privacy.device_day_epsilon),
            device_day_delta: max(a.privacy.device_day_delta, b.privacy.device_day_delta),
        },
        inference_count: a.inference_count + b.inference_count,
        error_count: a.error_count + b.error_count,
        feedback: wire::Feedback {
            positive: a.feedback.positive + b.feedback.positive,
            negative: a.feedback.negative + b.feedback.negative,
            correction: a.feedback.correction + b.feedback.correction,
        },
        latency_ms: add_histograms(&a.latency_ms, &b.latency_ms)?,
        confidence: add_histograms(&a.confidence, &b.confidence)?,
        input_tokens: add_histograms(&a.input_tokens, &b.input_tokens)?,
        output_tokens: add_histograms(&a.output_tokens, &b.output_tokens)?,
        custom,
        categories,
        ..a.clone()
    })
}

/// Coarsens a run of encoded messages (one buffer segment): every window
/// that has its aligned successor in the run absorbs it. Order is kept
/// (a merged window takes the place of the first); payloads that do not
/// decode are kept as they are.
pub fn coarsen_payloads(payloads: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let decoded: Vec<Option<WindowReport>> =
        payloads.iter().map(|p| wire::decode(p).ok()).collect();
    let mut by_start: HashMap<(String, String, i64, u32), usize> = HashMap::new();
    for (i, r) in decoded.iter().enumerate() {
        if let Some(r) = r {
            by_start.insert(
                (
                    r.model_id.clone(),
                    r.model_version.clone(),
                    r.window_start.timestamp(),
                    r.window_secs,
                ),
                i,
            );
        }
    }
    let mut absorbed = vec![false; payloads.len()];
    let mut out = Vec::with_capacity(payloads.len());
    for (i, payload) in payloads.into_iter().enumerate() {
        if absorbed[i] {
            continue;
        }
        let merged = decoded[i].as_ref().and_then(|a| {
            let next = a.window_start.timestamp() + i64::from(a.window_secs);
            let j = *by_start.get(&(
                a.model_id.clone(),
                a.model_version.clone(),
                next,
                a.window_secs,
            ))?;
            let b = decoded[j].as_ref().filter(|_| j > i && !absorbed[j])?;
            let m = merge(a, b)?;
            let bytes = m.encode().ok()?;
            absorbed[j] = true;
            Some(bytes)
        });
        out.push(merged.unwrap_or(payload));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use chrono::{DateTime, Utc};
    use driftline_pipeline::privacy::{DeviceIdentity, MechanismConfig, Privatizer};
    use driftline_pipeline::window::{ModelKey, ModelSpec, Windower};

    /// `window` released through an unbounded ledger: noised.
    fn noised(
        p: &Privatizer,
        window: driftline_pipeline::window::ClosedWindow,
    ) -> driftline_pipeline::privacy::PrivateWindow {
        use driftline_pipeline::release::{release, Released};
        let mut ledger = driftline_pipeline::ledger::Ledger::unbounded();
        match release(p, &mut ledger, window, TimeDelta::zero()).expect("release") {
            Released::Window(w) => *w,
            Released::Withheld { .. } => panic!("an unbounded ledger withheld a window"),
        }
    }

    /// Noised windows of two models, `n` periods from `start`.
    pub(crate) fn windows(mechanism: MechanismConfig, start: &str, n: usize) -> Vec<WindowReport> {
        let start: DateTime<Utc> = start.parse().expect("ts");
        let mut w = Windower::new(60, start);
        let spec = ModelSpec::default().with_labels(["a", "b"]);
        let m0 = w.register(ModelKey::new("m0", "1"), &spec);
        w.register(ModelKey::new("m1", "1"), &spec);
        let p = Privatizer::new(mechanism).expect("privatizer");
        let device = DeviceIdentity {
            device_id: "d".into(),
            fleet: "f".into(),
            agent_version: "0".into(),
        };
        let mut out = Vec::new();
        for i in 0..n {
            for _ in 0..5 {
                m0.record(&driftline_pipeline::event::InferenceEvent {
                    latency_ms: 12.0,
                    input_tokens: 10,
                    output_tokens: 2,
                    confidence: Some(0.9),
                    error: false,
                    label: Some("a"),
                    custom: &[],
                });
            }
            let closed = w.close_due(start + TimeDelta::minutes(i as i64 + 1));
            for c in closed {
                let seq = out.len() as u64;
                out.push(noised(&p, c).into_report(&device, seq));
            }
        }
        out
    }

    #[test]
    fn adjacent_aligned_windows_merge_with_summed_counts() {
        let ws = windows(
            MechanismConfig::Laplace { epsilon: 1.0 },
            "2026-11-27T10:00:00Z",
            2,
        );
        let (a, b) = (&ws[0], &ws[2]); // m0 at 10:00 and 10:01
        assert_eq!((a.model_id.as_str(), b.model_id.as_str()), ("m0", "m0"));
        let m = merge(a, b).expect("mergeable");
        m.validate().expect("a valid message");
        assert_eq!(m.window_secs, 120);
        assert_eq!(m.window_start, a.window_start);
        assert_eq!(m.inference_count, a.inference_count + b.inference_count);
        assert_eq!(
            m.latency_ms.counts[4],
            a.latency_ms.counts[4] + b.latency_ms.counts[4]
        );
        assert_eq!(
            m.categories["label"]["a"],
            a.categories["label"]["a"] + b.categories["label"]["a"]
        );
        // Two releases of epsilon 1: the merged message declares both.
        assert_eq!(m.privacy.epsilon, Some(2.0));
        assert_eq!(
            m.privacy.max_events_per_window,
            a.privacy.max_events_per_window.map(|k| 2 * k)
        );
        let (sa, sm) = (
            a.privacy.noise_scale["latency_ms"],
            m.privacy.noise_scale["latency_ms"],
        );
        assert!(
            (laplace_variance(sm) - 2.0 * laplace_variance(sa)).abs() < 1e-9 * laplace_variance(sa)
        );
        // Not mergeable: other model, wrong order, misaligned start.
        assert!(merge(&ws[0], &ws[3]).is_none());
        assert!(merge(b, a).is_none());
        let odd = windows(
            MechanismConfig::Laplace { epsilon: 1.0 },
            "2026-11-27T10:01:00Z",
            2,
        );
        assert!(
            merge(&odd[0], &odd[2]).is_none(),
            "10:01-10:03 is not aligned to 2 minutes"
        );
    }

    #[test]
    fn gaussian_scales_add_in_quadrature() {
        let ws = windows(
            MechanismConfig::Gaussian {
                rho: 0.5,
                delta: 1e-6,
            },
            "2026-11-27T10:00:00Z",
            2,
        );
        let m = merge(&ws[0], &ws[2]).expect("mergeable");
        let s = ws[0].privacy.noise_scale["confidence"];
        assert!((m.privacy.noise_scale["confidence"] - s * 2f64.sqrt()).abs() < 1e-12);
    }

    /// Every message the agent writes, one window or coarsened as far as a
    /// day allows, passes the collector's decoder, and in particular its
    /// privacy consistency rule (docs/wire-format.md), whatever the
    /// mechanism, budget, `K`, window and features.
    #[test]
    fn the_collector_accepts_every_window_and_every_coarsening_of_it() {
        use driftline_core::topic;
        use driftline_pipeline::event::InferenceEvent;
        use driftline_pipeline::privacy::per_event_sensitivity;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20_261_127);
        let start: DateTime<Utc> = "2026-11-26T00:00:00Z".parse().expect("ts");
        let bounds = wire::TimeBounds {
            now: start + TimeDelta::days(1) + TimeDelta::minutes(1),
            max_age: TimeDelta::days(30),
            max_future: TimeDelta::hours(1),
        };
        let device = DeviceIdentity {
            device_id: "d".into(),
            fleet: "f".into(),
            agent_version: "0".into(),
        };
        let topic = topic::metrics_topic("f", "d");
        for case in 0..16u32 {
            let mechanism = if case % 2 == 0 {
                MechanismConfig::Laplace {
                    epsilon: rng.random_range(0.01..50.0),
                }
            } else {
                MechanismConfig::Gaussian {
                    rho: rng.random_range(0.0005..20.0),
                    delta: 1e-6,
                }
            };
            let window_secs = [1, 15, 60, 75, 900, 3600, 7200, 86_400][(case / 2) as usize];
            let k = rng.random_range(1..=300);
            let mut spec = ModelSpec::default().with_max_events_per_window(k);
            if case % 3 != 0 {
                spec = spec.with_labels(["a", "b", "c"]);
            }
            for c in 0..case % 4 {
                spec = spec.with_custom(format!("f{c}"), &[0.0, 0.5, 1.0]);
            }
            let mut w = Windower::new(window_secs, start);
            let m = w.register(ModelKey::new("m", "1"), &spec);
            let p = Privatizer::new(mechanism)
                .expect("privatizer")
                .with_device_day(8.0, 1e-6);
            // Up to 64 windows: six rounds of coarsening where a day allows.
            let n = (86_400 / window_secs).clamp(1, 64);
            let mut payloads = Vec::new();
            for i in 0..n {
                for _ in 0..rng.random_range(0..=k) {
                    m.record(&InferenceEvent {
                        latency_ms: rng.random_range(0.0..500.0),
                        confidence: Some(rng.random()),
                        error: rng.random_bool(0.1),
                        label: Some("b"),
                        custom: &[0.7, 0.2, 0.9],
                        ..InferenceEvent::default()
                    });
                }
                let end = start + TimeDelta::seconds(i64::from(window_secs) * i64::from(i + 1));
                for closed in w.close_due(end) {
                    let report = noised(&p, closed).into_report(&device, u64::from(i));
                    payloads.push(report.encode().expect("encode"));
                }
            }
            let mut merges = 0;
            loop {
                for payload in &payloads {
                    let r = wire::accept(&topic, payload, &bounds).unwrap_or_else(|e| {
                        panic!("case {case} ({mechanism:?}, K {k}), {merges} rounds: {e}")
                    });
                    assert_eq!(
                        r.per_event_sensitivity(),
                        per_event_sensitivity(&spec) as u64,
                        "the collector counts the agent's sensitivity"
                    );
                }
                let next = coarsen_payloads(payloads.clone());
                if next.len() == payloads.len() {
                    break;
                }
                payloads = next;
                merges += 1;
            }
            // Rounds until no two windows pair up any more: at most 64
            // windows, and the day starts at an odd multiple of 86400 s, so
            // at a multiple of 3840 s or 57600 s it does not.
            let expected = match window_secs {
                1 | 15 | 75 => 6,
                60 | 900 => 5,
                3600 => 4, // 24 -> 12 -> 6 -> 3 -> 2 windows
                7200 => 3, // 12 -> 6 -> 3 -> 2
                _ => 0,
            };
            assert_eq!(merges, expected, "case {case}, {window_secs} s");
        }
    }

    #[test]
    fn windows_of_different_budgets_stay_apart() {
        let a = windows(
            MechanismConfig::Laplace { epsilon: 1.0 },
            "2026-11-27T10:00:00Z",
            2,
        );
        let b = windows(
            MechanismConfig::Laplace { epsilon: 2.0 },
            "2026-11-27T10:00:00Z",
            2,
        );
        assert!(merge(&a[0], &a[2]).is_some());
        // m0 at 10:00 under epsilon 1, at 10:01 under epsilon 2 (a restart
        // with another budget): merging would declare a scale no budget
        // implies.
        assert!(merge(&a[0], &b[2]).is_none());
    }

    #[test]
    fn laplace_variance_inverts() {
        for b in [0.3, 1.0, 7.0, 70.0] {
            assert!(
                (laplace_scale_for_variance(laplace_variance(b)) - b).abs() < 1e-9 * b,
                "{b}"
            );
        }
    }

    #[test]
    fn a_segment_coarsens_to_half_and_keeps_every_count() {
        let ws = windows(
            MechanismConfig::Laplace { epsilon: 1.0 },
            "2026-11-27T10:00:00Z",
            8,
        );
        let total: i64 = ws.iter().map(|r| r.inference_count).sum();
        let payloads: Vec<Vec<u8>> = ws.iter().map(|r| r.encode().expect("encode")).collect();
        let once = coarsen_payloads(payloads);
        assert_eq!(
            once.len(),
            8,
            "16 one-minute windows of 2 models become 8 two-minute ones"
        );
        let twice = coarsen_payloads(once);
        assert_eq!(twice.len(), 4);
        let merged: Vec<WindowReport> = twice
            .iter()
            .map(|p| wire::decode(p).expect("decode"))
            .collect();
        assert!(merged
            .iter()
            .all(|r| r.window_secs == 240 && r.validate().is_ok()));
        assert_eq!(merged.iter().map(|r| r.inference_count).sum::<i64>(), total);
        assert_eq!(
            coarsen_payloads(vec![b"not a window".to_vec()]),
            vec![b"not a window".to_vec()]
        );
    }
}
