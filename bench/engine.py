"""DataFusion 55 itself against DuckDB on one Parquet file: where the
endpoint's remaining gap (the count by model and version, "Queries") comes
from, with none of Driftline's code in the path.

    python3 bench/engine.py            # 10M rows, 7 paired repetitions
    python3 bench/engine.py --quick    # 1M rows, 2 repetitions

DataFusion runs from its Python package (`pip install datafusion==55.0.0`:
DataFusion 55 in the package's own release build; the collector links
55.2 from crates.io), set up as the collector sets up its sessions: twice
as many partitions as cores, filters inside the Parquet decoder, text read
as `Utf8View`, UTC session time zone. The
file is shaped like the bench lake's `metrics` for these queries: two
models, a canary version on a tenth of the devices, sorted by model and
time, zstd, row groups of 128 Ki rows; it also holds the model and version
as integer keys, to measure what integer keys in the lake would buy.
"""

import argparse
import datetime
import os
import pathlib
import re
import shutil
import statistics
import tempfile
import time

import datafusion
import duckdb
from datafusion import SessionConfig, SessionContext

from report import write_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:engine:begin -->", "<!-- bench:engine:end -->"
# "The last day", as bench/run.py asks it; like the bench lake (3 hours of
# windows), the file holds only rows inside it.
SINCE = "WHERE window_start >= TIMESTAMP '2026-11-26 00:00:00'"
QUERIES = {
    "scan and filter, no grouping":
        f"SELECT count(*), sum(inference_count) FROM metrics {SINCE}",
    "group by model (text)":
        f"SELECT model_id, count(*), sum(inference_count) FROM metrics {SINCE} GROUP BY 1 ORDER BY 1",
    "group by model and version (text): the bench's query":
        f"SELECT model_id, model_version, count(*), sum(inference_count) FROM metrics {SINCE} "
        "GROUP BY 1, 2 ORDER BY 1, 2",
    "the same without the time filter":
        "SELECT model_id, model_version, count(*), sum(inference_count) FROM metrics "
        "GROUP BY 1, 2 ORDER BY 1, 2",
    "group by model and version (integer keys)":
        f"SELECT model_key, version_key, count(*), sum(inference_count) FROM metrics {SINCE} "
        "GROUP BY 1, 2 ORDER BY 1, 2",
}


def collector_datafusion():
    """The DataFusion version Cargo.lock pins for the collector."""
    lock = (ROOT / "Cargo.lock").read_text()
    return re.search(r'name = "datafusion"\nversion = "([^"]+)"', lock).group(1)


def make_file(rows, path):
    duckdb.connect().execute(f"""
        COPY (
            SELECT 'model-' || (i % 2) AS model_id,
                   CASE WHEN (i // 2) % 10 = 0 THEN '1.1.0' ELSE '1.0.0' END AS model_version,
                   CAST(i % 2 AS INTEGER) AS model_key,
                   CAST((i // 2) % 10 = 0 AS INTEGER) AS version_key,
                   'device-' || ((i // 2) % 20000) AS device_id,
                   TIMESTAMPTZ '2026-11-27 00:00:00+00' + to_seconds(60 * (i // 40000)) AS window_start,
                   CAST(random() * 100 AS BIGINT) AS inference_count,
                   CAST(random() * 10 AS BIGINT) AS error_count
            FROM range({rows}) t(i)
            ORDER BY model_id, window_start, device_id
        ) TO '{path}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 131072)
    """)


def datafusion_session(path):
    config = (SessionConfig()
              .with_target_partitions(2 * (os.cpu_count() or 1))
              .set("datafusion.execution.parquet.pushdown_filters", "true")
              .set("datafusion.execution.time_zone", "UTC"))
    ctx = SessionContext(config)
    ctx.register_parquet("metrics", str(path))
    return ctx


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows, reps = (1_000_000, 2) if args.quick else (10_000_000, 7)
    pinned = collector_datafusion()
    if datafusion.__version__.split(".")[0] != pinned.split(".")[0]:
        raise SystemExit(f"the collector links DataFusion {pinned}, this Python has {datafusion.__version__}: "
                         f"pip install 'datafusion=={pinned.split('.')[0]}.*'")
    work = pathlib.Path(tempfile.mkdtemp(prefix="driftline-engine-"))
    try:
        measure(rows, reps, work / "metrics.parquet", pinned)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(rows, reps, path, pinned):
    print(f"writing {rows:,} rows to {path} ...", flush=True)
    make_file(rows, path)
    duck = duckdb.connect()
    duck.execute(f"CREATE VIEW metrics AS SELECT * FROM read_parquet('{path}')")
    df = datafusion_session(path)
    started = datetime.datetime.now(datetime.timezone.utc)
    table = []
    for name, sql in QUERIES.items():
        run_df = lambda: sorted(tuple(r.values()) for r in df.sql(sql).to_pylist())  # noqa: E731
        run_duck = lambda: sorted(duck.execute(sql).fetchall())  # noqa: E731
        if run_df() != run_duck():
            raise SystemExit(f"{name}: DataFusion and DuckDB disagree")
        t_df, t_duck = [], []
        for _ in range(reps):  # alternately, so a slow spell lands on both
            t_df.append(timed(run_df)[0])
            t_duck.append(timed(run_duck)[0])
        ratio = statistics.median(a / b for a, b in zip(t_df, t_duck))
        table.append((name, statistics.median(t_df), statistics.median(t_duck), ratio))
        print(f"{name}: DataFusion {table[-1][1]:.3f} s, DuckDB {table[-1][2]:.3f} s, {ratio:.2f}x", flush=True)
    lines = [
        f"Run {started:%Y-%m-%d %H:%M} UTC, `python3 bench/engine.py`, {rows:,} rows in one file, "
        f"median of {reps}, run alternately; DataFusion {datafusion.__version__} (Python package; "
        f"the collector links {pinned}), DuckDB {duckdb.__version__}.",
        "",
        "| query | DataFusion | DuckDB | ratio DataFusion/DuckDB |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {a:.3f} s | {b:.3f} s | {r:.2f} |" for n, a, b, r in table),
    ]
    write_block(BEGIN, END, lines, "Queries: the engine alone")


if __name__ == "__main__":
    main()
