#!/usr/bin/env python3
"""The SQL endpoint against an earlier build of itself: the detectors and
analyst queries of bench/run.py, on the same lake, through two release
collectors serving side by side, run alternately; writes the table into
BENCHMARKS.md between the markers.

    python3 bench/endpoint_ab.py --baseline PATH/TO/OLD/driftline-collector \\
        [--lake DIR] [--rows N] [--reps 7] [--label "what changed"]

The baseline is built from an earlier commit into its own target dir, e.g.
    git worktree add /tmp/base REV
    (cd /tmp/base && CARGO_TARGET_DIR=~/.cache/driftline/release-target \\
        cargo build --release -p driftline-collector)
Each figure is the median of `reps` runs; the ratio is the median of the
per-repetition ratios new/baseline, so a slow spell of this shared machine
does not land on one side only.
"""

import argparse
import datetime
import pathlib
import platform
import os
import shutil
import signal
import statistics
import tempfile
import time

import duckdb
import psycopg

import run
from report import write_block

BEGIN, END = "<!-- bench:endpoint-ab:begin -->", "<!-- bench:endpoint-ab:end -->"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="the earlier driftline-collector binary")
    ap.add_argument("--lake", help="reuse (or keep) the generated lake here")
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--label", default="", help="what the baseline lacks, for the table's header")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="driftline-ab-"))
    servers = []
    try:
        if args.lake and (pathlib.Path(args.lake) / "metrics").is_dir():
            lake = pathlib.Path(args.lake)
        else:
            lake, _ = run.build_lake(args.rows, work)
            if args.lake:
                shutil.copytree(lake, args.lake)
                lake = pathlib.Path(args.lake)
        con = duckdb.connect()
        total = con.execute(f"SELECT count(*) FROM read_parquet('{lake}/metrics/*/*.parquet')").fetchone()[0]
        latest = con.execute(f"SELECT max(window_start) FROM read_parquet('{lake}/metrics/*/*.parquet')").fetchone()[0]
        at = latest.strftime("%Y-%m-%dT%H:%M:%SZ")
        fmt = lambda t: f"TIMESTAMP '{t.strftime('%Y-%m-%d %H:%M:%S')}'"
        params = {"day_ago": fmt(latest - datetime.timedelta(days=1)),
                  "week_ago": fmt(latest - datetime.timedelta(days=7))}
        queries = {name: sql.format(**params) for name, sql in run.ANALYST.items()}
        queries.update(run.detector_sql(lake, at))
        (work / "no-detectors").mkdir()
        new, new_dsn = run.start_endpoint(lake, work / "no-detectors", client_id="ab-new")
        servers.append(new)
        old, old_dsn = run.start_endpoint(lake, work / "no-detectors", client_id="ab-old",
                                          binary=args.baseline)
        servers.append(old)
        results = []
        with psycopg.connect(new_dsn, autocommit=True) as a, psycopg.connect(old_dsn, autocommit=True) as b:
            for name, sql in queries.items():
                rows_a = a.execute(sql).fetchall()
                rows_b = b.execute(sql).fetchall()
                same = len(rows_a) == len(rows_b)
                t_new, t_old, ratio = run.paired(lambda: a.execute(sql).fetchall(),
                                                 lambda: b.execute(sql).fetchall(), args.reps)
                results.append((name, t_old, t_new, ratio, same))
                print(f"{name:<50} baseline {t_old:7.3f}s  new {t_new:7.3f}s  ratio {ratio:5.2f}"
                      f"{'' if same else '  (row counts differ!)'}", flush=True)
        lines = [
            f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"`python3 bench/endpoint_ab.py`, {total:,} rows, median of {args.reps}, alternating; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; release builds."
            + (f" Baseline: {args.label}." if args.label else ""),
            "",
            "| query | baseline endpoint | this endpoint | ratio this/baseline | same rows |",
            "|---|---:|---:|---:|---|",
        ]
        for name, t_old, t_new, ratio, same in results:
            lines.append(f"| {name} | {t_old:.3f} s | {t_new:.3f} s | {ratio:.2f} | {'yes' if same else 'NO'} |")
        write_block(BEGIN, END, lines, "Queries: the endpoint against its previous build")
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
