//! What checking `sum` for overflow costs: BENCHMARKS.md, "Checked sum".
//!
//! `cargo bench -p driftline-collector --bench checked_sum [-- ROWS]`
//!
//! The same queries over one in-memory table of ROWS rows (default 10
//! million; BIGINT counts as in `metrics`, 5,000 devices in 500 groups),
//! run alternately with the engine's own `sum` (which wraps on overflow)
//! and with Driftline's ([`driftline_collector::query::checked_sum`]),
//! 7 times each; the table reports medians and the median of the
//! per-repetition ratios. Prints the markdown block.

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::functions_aggregate::sum::Sum;
use datafusion::logical_expr::AggregateUDF;
use datafusion::prelude::SessionContext;

const QUERIES: [(&str, &str); 3] = [
    (
        "ungrouped",
        "SELECT SUM(inference_count), SUM(error_count) FROM t",
    ),
    (
        "500 groups",
        "SELECT model_id, SUM(inference_count), SUM(error_count) FROM t GROUP BY model_id",
    ),
    (
        "5,000 groups",
        "SELECT device_id, SUM(inference_count), SUM(error_count) FROM t GROUP BY device_id",
    ),
];
const REPETITIONS: usize = 7;

fn table(rows: usize) -> Result<MemTable, Box<dyn std::error::Error>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("inference_count", DataType::Int64, false),
        Field::new("error_count", DataType::Int64, false),
    ]));
    let devices: Vec<String> = (0..5_000).map(|d| format!("device-{d:05}")).collect();
    let models: Vec<String> = (0..500).map(|m| format!("model-{m:03}")).collect();
    let mut batches = Vec::new();
    let batch_rows = 65_536;
    for start in (0..rows).step_by(batch_rows) {
        let n = batch_rows.min(rows - start);
        let row = |i: usize| start + i;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| &devices[row(i) % devices.len()]),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| &models[row(i) % models.len()]),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (0..n).map(|i| (row(i) % 97) as i64 - 3),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (0..n).map(|i| (row(i) % 7) as i64 - 1),
                )),
            ],
        )?;
        batches.push(batch);
    }
    // Two partitions, as the two cores of the machine scan them.
    let half = batches.len().div_ceil(2);
    let second = batches.split_off(half);
    Ok(MemTable::try_new(schema, vec![batches, second])?)
}

async fn time(ctx: &SessionContext, sql: &str) -> Result<f64, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let batches = ctx.sql(sql).await?.collect().await?;
    let elapsed = started.elapsed().as_secs_f64();
    std::hint::black_box(batches);
    Ok(elapsed)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let built_in = SessionContext::new();
    built_in.register_udaf(AggregateUDF::from(Sum::new()));
    let checked = SessionContext::new();
    checked.register_udaf(driftline_collector::query::checked_sum::udaf());
    let data = Arc::new(table(rows)?);
    built_in.register_table("t", data.clone())?;
    checked.register_table("t", data)?;
    let mut lines = vec![
        format!(
            "`cargo bench -p driftline-collector --bench checked_sum`, {rows} rows in memory, {REPETITIONS} alternating repetitions, {} UTC.",
            chrono::Utc::now().format("%Y-%m-%d %H:%M")
        ),
        String::new(),
        "| query (two BIGINT sums) | engine's `sum` (wraps) | checked `sum` | ratio |".into(),
        "|---|---:|---:|---:|".into(),
    ];
    for (name, sql) in QUERIES {
        // Warm up both, and check they agree.
        let a = built_in.sql(sql).await?.collect().await?;
        let b = checked.sql(sql).await?.collect().await?;
        let text =
            |x| datafusion::arrow::util::pretty::pretty_format_batches(x).map(|t| t.to_string());
        if name == "ungrouped" && text(&a)? != text(&b)? {
            return Err(format!("{name}: the two sums differ").into());
        }
        let (mut ta, mut tb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..REPETITIONS {
            let x = time(&built_in, sql).await?;
            let y = time(&checked, sql).await?;
            ta.push(x);
            tb.push(y);
            ratios.push(y / x);
        }
        lines.push(format!(
            "| {name} | {:.1} ms | {:.1} ms | {:.2} |",
            median(ta) * 1e3,
            median(tb) * 1e3,
            median(ratios)
        ));
    }
    println!("{}", lines.join("\n"));
    Ok(())
}
