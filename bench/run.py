"""Driftline query benchmark: the detectors and typical analyst queries on a
simulated lake, through the SQL endpoint (psycopg), through
`driftline-collector query`, and through DuckDB (in-process) on the same
Parquet files; writes the table into BENCHMARKS.md between the markers.

    python3 bench/run.py            # 10M-row lake (about 15 min on 2 cores)
    python3 bench/run.py --quick    # 1M rows, 1 repetition (smoke run)

The lake: the release collector's demo simulates a fleet (real agent
pipelines, real OpenDP noise) for a few hours of event time; DuckDB then
replicates those windows under new device ids until the lake has the
requested number of rows (OpenDP's exact sampler makes simulating every
row take hours). The replicas keep each window's histogram shapes and
drift, with fresh noise (-4..4, triangular) added to every count, so the files
are not runs of identical rows.
"""

import argparse
import datetime
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from procs import free_port
from report import write_block

import duckdb
import psycopg

ROOT = pathlib.Path(__file__).resolve().parent.parent
RELEASE = pathlib.Path(os.environ.get("DRIFTLINE_RELEASE_TARGET",
                                      pathlib.Path.home() / ".cache/driftline/release-target"))
COLLECTOR = pathlib.Path(os.environ.get("DRIFTLINE_COLLECTOR", RELEASE / "release" / "driftline-collector"))
BEGIN, END = "<!-- bench:queries:begin -->", "<!-- bench:queries:end -->"

ANALYST = {
    "count by model and version (1 day)":
        "SELECT model_id, model_version, count(*) AS windows, sum(inference_count) AS inferences "
        "FROM metrics WHERE window_start >= {day_ago} GROUP BY 1, 2 ORDER BY 1, 2",
    "hourly errors and latency buckets (7 days)":
        "SELECT date_trunc('hour', window_start) AS hour, model_id, sum(error_count) AS errors, "
        + ", ".join(f"sum(latency_ms_b{i:02}) AS l{i:02}" for i in range(16))
        + " FROM metrics WHERE window_start >= {week_ago} GROUP BY 1, 2 ORDER BY 1, 2",
    "devices per fleet and version":
        "SELECT fleet, model_version, count(DISTINCT device_id) AS devices FROM metrics "
        "GROUP BY 1, 2 ORDER BY 1, 2",
    "top 20 devices by negative feedback":
        "SELECT device_id, sum(feedback_negative) AS negative FROM metrics "
        "GROUP BY 1 ORDER BY 2 DESC LIMIT 20",
    "5-minute time series of one model (Grafana shape)":
        "SELECT floor(extract(epoch from window_start)/300)*300 AS \"time\", "
        "sum(inference_count) AS inferences FROM metrics "
        "WHERE model_id = 'model-0' AND window_start >= {day_ago} GROUP BY 1 ORDER BY 1",
}

# The statistics functions, for DuckDB: noise_var as a macro (it runs per
# row); the per-group functions as Python UDFs mirroring collector/src/query/stats/.
DUCK_MACROS = [
    "CREATE MACRO noise_var(m, s) AS CASE WHEN s IS NULL OR s <= 0 THEN 0.0 "
    "WHEN m = 'laplace' THEN 2 * exp(-1 / s) / ((1 - exp(-1 / s)) * (1 - exp(-1 / s))) "
    "WHEN m = 'gaussian' THEN s * s ELSE 0.0 END",
]


def build_lake(rows, workdir):
    """The simulated base lake, replicated to `rows` rows."""
    base = workdir / "base"
    hours = 3
    print(f"simulating the base fleet (200 devices x 2 models, {hours} h of event time) ...", flush=True)
    subprocess.run(
        [str(COLLECTOR), "demo", "--duration", "100s", "--devices", "200", "--backfill", f"{hours}h",
         "--pg-listen", "127.0.0.1:0", "--data-dir", str(base)],
        timeout=600,
        check=True, stdout=subprocess.DEVNULL)
    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{base}/metrics/*/*.parquet')").fetchone()[0]
    copies = max(1, -(-rows // n))
    lake = workdir / "lake"
    print(f"replicating {n} simulated windows x {copies} ...", flush=True)
    (lake / "metrics").mkdir(parents=True)
    # Each replica gets fresh noise on every count (as another device's
    # noised counts would differ), so the files compress and decode like a
    # real lake's instead of as runs of identical rows.
    counts = [name for name, kind, *_ in con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{base}/metrics/*/*.parquet', hive_partitioning = false)").fetchall()
        if kind == "BIGINT" and name != "seq"]
    noised = ", ".join(
        f"CASE WHEN k = 0 THEN {c} ELSE {c} + CAST(round((random() - random()) * 4) AS BIGINT) END AS {c}"
        for c in counts)
    con.execute(f"""
        COPY (
            SELECT * EXCLUDE (k) REPLACE (CASE WHEN k = 0 THEN device_id ELSE device_id || '-r' || k END AS device_id,
                                          {noised}),
                   strftime(window_start, '%Y-%m-%d') AS date
            FROM read_parquet('{base}/metrics/*/*.parquet', hive_partitioning = false) m, range({copies}) r(k)
            ORDER BY model_id, window_start, device_id
            LIMIT {rows}
        ) TO '{lake}/metrics' (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (date), ROW_GROUP_SIZE 131072)
    """)
    # The histogram edge sets the collector wrote for the base lake (the
    # replicas' dates are the base's).
    con.execute(f"""
        COPY (SELECT * FROM read_parquet('{base}/histogram_edge_sets/*/*.parquet', hive_partitioning = true))
        TO '{lake}/histogram_edge_sets' (FORMAT parquet, PARTITION_BY (date))
    """)
    total = con.execute(f"SELECT count(*) FROM read_parquet('{lake}/metrics/*/*.parquet')").fetchone()[0]
    return lake, total


def detector_sql(lake, at):
    # The repository's detectors, not the lake's copies (`detect` keeps
    # the copies an earlier version installed).
    out = subprocess.run([str(COLLECTOR), "detect", "--print-sql", "--at", at, "--data-dir", str(lake),
                          "--queries", str(ROOT / "queries" / "detectors")],
                         check=True, capture_output=True, text=True).stdout
    queries = {}
    for block in out.split(";\n"):
        block = block.strip()
        if block.startswith("-- "):
            name, sql = block.split("\n", 1)
            queries[f"detector {name[3:]}"] = sql
    return queries


def duck_inner(sql):
    """A detector's scan-and-aggregate subquery (the part that reads the
    lake), in DuckDB's dialect: the innermost FROM metrics ... GROUP BY."""
    start = sql.rfind("SELECT model_id, model_version", 0, sql.find("FROM metrics"))
    end = sql.find("GROUP BY model_id, model_version", start)
    inner = sql[start:end] + "GROUP BY model_id, model_version"
    inner = re.sub(r"first_value\(([a-z_]+)\)", r"first(\1)", inner)
    return inner.replace("make_array(", "list_value(")


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), rows


def paired(a, b, reps):
    """Runs `a` and `b` alternately `reps` times: their median times and the
    median of the per-repetition ratios a/b. Alternating keeps a slow spell
    of this shared machine from landing on one side only."""
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(a, 1)[0])
        tb.append(timed(b, 1)[0])
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--lake", help="keep the generated lake here and reuse it on the next run")
    args = ap.parse_args()
    rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    reps = 1 if args.quick else 7
    if not COLLECTOR.exists():
        sys.exit(f"build the release collector first:\n  CARGO_TARGET_DIR={RELEASE} "
                 "cargo build --release -p driftline-collector")
    work = pathlib.Path(tempfile.mkdtemp(prefix="driftline-bench-"))
    servers = []
    try:
        if args.lake and (pathlib.Path(args.lake) / "metrics").is_dir():
            lake = pathlib.Path(args.lake)
            total = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{lake}/metrics/*/*.parquet')").fetchone()[0]
        else:
            lake, total = build_lake(rows, work)
            if args.lake:
                shutil.copytree(lake, args.lake)
                lake = pathlib.Path(args.lake)
        con = duckdb.connect()
        for m in DUCK_MACROS:
            con.execute(m)
        con.execute(f"CREATE VIEW metrics AS SELECT * FROM read_parquet('{lake}/metrics/*/*.parquet', hive_partitioning = true)")
        latest = con.execute("SELECT max(window_start) FROM metrics").fetchone()[0]
        at = latest.strftime("%Y-%m-%dT%H:%M:%SZ")
        fmt = lambda t: f"TIMESTAMP '{t.strftime('%Y-%m-%d %H:%M:%S')}'"
        params = {"day_ago": fmt(latest - datetime.timedelta(days=1)),
                  "week_ago": fmt(latest - datetime.timedelta(days=7))}
        queries = {name: (sql.format(**params), sql.format(**params)) for name, sql in ANALYST.items()}
        for name, sql in detector_sql(lake, at).items():
            queries[name] = (sql, duck_inner(sql))

        (work / "no-detectors").mkdir()
        serve, dsn = start_endpoint(lake, work / "no-detectors")
        servers.append(serve)
        # The reference: the same endpoint reading text columns as Utf8
        # (DataFusion's view types off), to show what Utf8View buys.
        plain, plain_dsn = start_endpoint(lake, work / "no-detectors",
                                          {"DATAFUSION_EXECUTION_PARQUET_SCHEMA_FORCE_VIEW_TYPES": "false"},
                                          client_id="bench-utf8")
        servers.append(plain)
        results = []
        with psycopg.connect(dsn, autocommit=True) as pg, psycopg.connect(plain_dsn, autocommit=True) as pg_plain:
            for name, (df_sql, duck_sql) in queries.items():
                endpoint, _ = timed(lambda: pg.execute(df_sql).fetchall(), reps)
                # The detectors' statistics run per group on a few rows; the
                # comparison is on the part that reads the lake.
                scan_sql = duck_sql if name.startswith("detector") else df_sql
                df_scan_sql = scan_sql.replace("list_value(", "make_array(").replace("first(", "first_value(")
                scan_plain, _ = timed(lambda: pg_plain.execute(df_scan_sql).fetchall(), reps)
                cli, _ = timed(lambda: subprocess.run(
                    [str(COLLECTOR), "query", "--format", "csv", "--data-dir", str(lake), "--", df_sql],
                    check=True, capture_output=True), reps)
                # Label and custom-feature detectors aggregate JSON with
                # Driftline's own aggregates: DuckDB has no same-SQL twin.
                if "category_sum" in scan_sql or "custom_sum" in scan_sql:
                    duck = ratio = None
                    scan_df = timed(lambda: pg.execute(df_scan_sql).fetchall(), reps)[0]
                else:
                    scan_df, duck, ratio = paired(lambda: pg.execute(df_scan_sql).fetchall(),
                                                  lambda: con.execute(scan_sql).fetchall(), reps)
                results.append((name, endpoint, scan_df, scan_plain, cli, duck, ratio))
                ratio = f"{ratio:5.2f}" if duck else "  n/a"
                print(f"{name:<50} endpoint {endpoint:7.3f}s  scan {scan_df:7.3f}s  (Utf8 {scan_plain:7.3f}s)  "
                      f"query {cli:7.3f}s  duckdb {duck or 0:7.3f}s  ratio {ratio}", flush=True)
        write(results, total, reps)
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if not os.environ.get("DRIFTLINE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def start_endpoint(lake, queries, env=None, client_id="bench", binary=COLLECTOR):
    """A `serve` (of `binary`) with only the SQL endpoint doing work; its
    psycopg DSN."""
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "serve", "--broker", "mqtt://127.0.0.1:1", "--data-dir", str(lake),
         "--client-id", client_id,
         "--pg-listen", f"127.0.0.1:{port}", "--pg-password", "bench", "--pg-statement-timeout", "10m",
         "--pg-memory-mb", "8192", "--queries", str(queries), "--detect-interval", "24h"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    dsn = f"host=127.0.0.1 port={port} user=driftline password=bench dbname=driftline"
    for _ in range(100):
        try:
            psycopg.connect(dsn).close()
            break
        except psycopg.OperationalError:
            time.sleep(0.2)
    return proc, dsn


def write(results, total, reps):
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `python3 bench/run.py`, "
        f"{total:,} rows, median of {reps}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; DataFusion 55.2 (release build), DuckDB {duckdb.__version__}.",
        "",
        "| query | endpoint (psycopg) | scan part, endpoint | same, text read as Utf8 | `query` CLI (incl. start) | DuckDB, same scan | ratio DataFusion/DuckDB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, endpoint, scan, plain, cli, duck, ratio in results:
        if duck:
            lines.append(f"| {name} | {endpoint:.3f} s | {scan:.3f} s | {plain:.3f} s | {cli:.3f} s | {duck:.3f} s | {ratio:.2f} |")
        else:
            lines.append(f"| {name} | {endpoint:.3f} s | {scan:.3f} s | {plain:.3f} s | {cli:.3f} s | n/a (JSON aggregates) | n/a |")
    lines += ["", "For detectors, \"scan part\" is the detector's aggregation over the lake (both periods in one "
              "pass), the same SQL in both engines; the full detector adds the statistics functions on a few "
              "rows (the endpoint column); it runs alternately with DuckDB's, and the ratio is the median of "
              "the per-repetition ratios. \"Text read as Utf8\": the same endpoint with "
              "`DATAFUSION_EXECUTION_PARQUET_SCHEMA_FORCE_VIEW_TYPES=false`, the reference for reading text as "
              "`Utf8View` (the default)."]
    write_block(BEGIN, END, lines, "Queries: DataFusion against DuckDB")


if __name__ == "__main__":
    main()
