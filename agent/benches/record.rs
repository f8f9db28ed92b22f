//! Cost of recording one inference event on the hot path, against the
//! floor of one relaxed atomic increment measured in the same run.
//! Results go to BENCHMARKS.md (`cargo bench -p driftline-agent --bench record`).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{TimeDelta, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use driftline_pipeline::event::{Feedback, InferenceEvent};
use driftline_pipeline::ledger::Ledger;
use driftline_pipeline::privacy::{DeviceIdentity, Privatizer};
use driftline_pipeline::release::{release, Released};
use driftline_pipeline::window::{ModelKey, ModelSpec, Windower};

fn record(c: &mut Criterion) {
    let mut windower = Windower::new(60, Utc::now());
    // No cap, so that every call counts (the window never closes here; with
    // the default cap all but the first 10 calls would return early).
    let labels = ModelSpec::default()
        .with_labels(["billing", "cancel", "support", "other"])
        .with_max_events_per_window(u32::MAX);
    let model = windower.register(ModelKey::new("intent", "1.0.0"), &labels);
    let events: Vec<InferenceEvent<'static>> = (0..64)
        .map(|i| InferenceEvent {
            latency_ms: f64::from(i * 37 % 900),
            input_tokens: (i * 53 % 4000) as u32,
            output_tokens: (i * 7 % 300) as u32,
            confidence: Some(f64::from(i % 10) / 10.0),
            error: i % 50 == 0,
            label: Some(["billing", "cancel", "support", "unknown"][(i % 4) as usize]),
            custom: &[],
        })
        .collect();
    let mut group = c.benchmark_group("record");
    let floor = AtomicU64::new(0);
    group.bench_function("reference: one relaxed atomic add", |b| {
        b.iter(|| floor.fetch_add(black_box(1), Ordering::Relaxed))
    });
    let mut i = 0usize;
    group.bench_function("ModelHandle::record (with label)", |b| {
        b.iter(|| {
            i = (i + 1) & 63;
            model.record(black_box(&events[i]));
        })
    });
    group.bench_function("ModelHandle::feedback", |b| {
        b.iter(|| model.feedback(black_box(Feedback::Negative)))
    });
    group.finish();
}

/// Noising one closed window (67 counts with labels) with OpenDP's exact
/// discrete Laplace sampler, against encoding the resulting message as JSON.
fn privatize(c: &mut Criterion) {
    let mut group = c.benchmark_group("window");
    let labels = ModelSpec::default().with_labels(["billing", "cancel", "support", "other"]);
    let start = Utc::now();
    let privatizer = Privatizer::laplace(1.0).expect("privatizer");
    let device = DeviceIdentity {
        device_id: "bench".into(),
        fleet: "bench".into(),
        agent_version: "0".into(),
    };
    let mut windower = Windower::new(60, start);
    windower.register(ModelKey::new("intent", "1.0.0"), &labels);
    let mut minute = start;
    let mut closed = move || {
        minute += chrono::TimeDelta::minutes(1);
        windower.close_due(minute).remove(0)
    };
    let mut ledger = Ledger::unbounded();
    let mut noised = move |w| match release(&privatizer, &mut ledger, w, TimeDelta::zero()) {
        Ok(Released::Window(w)) => *w,
        other => panic!("an unbounded ledger released no window: {other:?}"),
    };
    let report = noised(closed()).into_report(&device, 1);
    group.bench_function("reference: encode one message (JSON)", |b| {
        b.iter(|| black_box(&report).encode().expect("encode"))
    });
    group.bench_function(
        "release one window (budget spend + Laplace noise, 67 counts)",
        |b| b.iter_batched(&mut closed, &mut noised, criterion::BatchSize::SmallInput),
    );
    group.finish();
}

criterion_group!(benches, record, privatize);
criterion_main!(benches);
