#!/usr/bin/env python3
"""Driftline's benchmark suite: one command, every figure of BENCHMARKS.md.

    python3 bench/suite.py           # the full suite (about 15 min on 2 cores, after the build)
    python3 bench/suite.py --quick   # a smoke run of every part (a few minutes)
    python3 bench/suite.py --only agent,accuracy

It builds the release binaries (into DRIFTLINE_RELEASE_TARGET, default
~/.cache/driftline/release-target, so the debug target of the tests is left
alone), then runs each part; each part prints its table and rewrites its own
block of BENCHMARKS.md, and the header records machine, versions and date.

Parts:
  agent      criterion: ns per recorded event and per noised window, each
             against a reference in the same run; footprint at 1,000 events/s
             (CPU, RSS) and the stripped binary size (bench/agent_footprint.py)
  ingest     end to end through Mosquitto into queryable Parquet against the
             broker's ceiling; collector CPU and RSS; backlog drain; bytes per
             stored window against the JSON payload (bench/ingest.py)
  storage    bytes on disk per stored window of a simulated fleet (real noise),
             against the JSON payload of the same kind of message
  s3         peak memory of compacting one partition of an S3 lake (moto) at
             two sizes, against its size on the store (bench/s3_compact.py)
  queries    detector and analyst SQL through the SQL endpoint and `query`,
             against DuckDB on the same Parquet files (bench/run.py)
  engine     DataFusion 55 alone (its Python package) against DuckDB on one
             file: scans and groupings, text and integer keys (bench/engine.py)
  accuracy   privacy utility against the local-DP lower bound; detection
             delay and false alarms over seeds (collector/benches/accuracy.rs)
  sum        the overflow-checked SQL `sum` against the engine's own, which
             wraps (collector/benches/checked_sum.rs)

Timing figures are never asserted anywhere: they are measured here, next to
their reference, and written down.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from report import write_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RELEASE = pathlib.Path(os.environ.get("DRIFTLINE_RELEASE_TARGET",
                                      pathlib.Path.home() / ".cache/driftline/release-target"))
PARTS = ["agent", "ingest", "storage", "s3", "queries", "engine", "accuracy", "sum"]


def sh(cmd, **kw):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


DEBUG = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/driftline/target"))


def cargo(*args, capture=False, target=RELEASE):
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    return sh(["cargo", *args], cwd=ROOT, env=env, capture_output=capture, text=True)


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine():
    cpu = "?"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    mosquitto = version([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"])
    mosquitto = re.sub(r"^mosquitto version ", "", mosquitto)
    try:
        import duckdb
        duck = duckdb.__version__
    except ImportError:
        duck = "not installed"
    return (f"{cpu}, {os.cpu_count()} cores, {mem}; {platform.system()} {platform.release()}; "
            f"{version(['rustc', '--version'])}; Mosquitto {mosquitto}; DuckDB {duck}; "
            f"DataFusion 55.2, OpenDP 0.16")


CRITERION = re.compile(r"^(\S[^\n]*?)\s*(?:\n\s*)?time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", re.M)


def agent(quick):
    """Criterion (record, window), then the footprint script."""
    out = cargo("bench", "-p", "driftline-agent", "--bench", "record", "--", *(["--quick"] if quick else []),
                capture=True).stdout
    print(out)
    times = {}
    for name, value, unit in CRITERION.findall(out):
        scale = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}[unit]
        times[name.strip()] = float(value) * scale
    ref = times.get("record/reference: one relaxed atomic add")
    enc = times.get("window/reference: encode one message (JSON)")
    lines = [f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             "`cargo bench -p driftline-agent --bench record` (criterion, release), "
             f"{'quick mode, ' if quick else ''}each case against the reference of its group measured in the same run.",
             "", "| case | time per call | reference | ratio |", "|---|---:|---|---:|"]
    for name, ns in times.items():
        if "reference" in name:
            continue
        record = name.startswith("record/")
        base = ref if record else enc
        label = "one relaxed atomic add" if record else "encoding one message as JSON"
        if base:
            lines.append(f"| {name} | {fmt_ns(ns)} | {label}: {fmt_ns(base)} | {ns / base:.1f}x |")
        else:
            lines.append(f"| {name} | {fmt_ns(ns)} | {label}: not measured | |")
    write_block("<!-- bench:agent-record:begin -->", "<!-- bench:agent-record:end -->", lines,
                "Agent: recording an event and closing a window")
    sh([sys.executable, str(BENCH / "agent_footprint.py"), "--agent", str(RELEASE / "release" / "driftline-agent"),
        "--seconds", "10" if quick else "30"])


def storage(quick):
    """The release demo's fleet (real OpenDP noise, labels) for a while,
    then the lake's metrics files per stored window against the wire size."""
    import duckdb
    seconds = 20 if quick else 40
    with tempfile.TemporaryDirectory() as work:
        lake = pathlib.Path(work, "lake")
        sh([str(RELEASE / "release" / "driftline-collector"), "demo", "--duration", f"{seconds}s",
            "--devices", "200", "--pg-listen", "127.0.0.1:0", "--data-dir", str(lake)],
           stdout=subprocess.DEVNULL, timeout=600)
        files = list((lake / "_driftline" / "gens" / "metrics").rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        rows = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet({[str(f) for f in files]})").fetchone()[0]
    fixture = json.loads((ROOT / "core/tests/fixtures/v1/valid/laplace.json").read_text())
    wire = len(json.dumps(fixture, separators=(",", ":")))
    per_window = size / max(rows, 1)
    write_block("<!-- bench:storage:begin -->", "<!-- bench:storage:end -->", [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: the release `demo` for {seconds} s "
        "(200 simulated devices x 2 models with labels, real OpenDP noise, backfill then live), "
        "then the lake's `metrics` files as written (before compaction).",
        "",
        "| measure | value | reference | ratio |",
        "|---|---:|---:|---:|",
        f"| bytes on disk per stored window (zstd Parquet, {rows:,} windows in {len(files)} files) | "
        f"{per_window:.0f} B | JSON payload of the same kind of message (fixture `valid/laplace.json`, "
        f"compact) {wire} B | {per_window / wire:.3f} |",
    ], "Storage: bytes per stored window")


def fmt_ns(ns):
    return f"{ns:.1f} ns" if ns < 1e3 else f"{ns / 1e3:.2f} us" if ns < 1e6 else f"{ns / 1e6:.2f} ms"


def accuracy(quick, dev):
    """Its figures do not depend on the build profile, only its run time:
    `dev` runs it from the tests' debug build instead of a release build."""
    profile = ["--profile", "dev"] if dev else []
    with tempfile.TemporaryDirectory() as out:
        cargo("bench", *profile, "-p", "driftline-collector", "--bench", "accuracy", "--",
              *(["--quick"] if quick else []), "--out", out, target=DEBUG if dev else RELEASE)
        utility = pathlib.Path(out, "utility.md").read_text().splitlines()
        detection = pathlib.Path(out, "detection.md").read_text().splitlines()
    mode = " --quick" if quick else ""
    write_block("<!-- bench:utility:begin -->", "<!-- bench:utility:end -->",
                [f"`cargo bench -p driftline-collector --bench accuracy{mode} -- --only utility`, "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.", "", *utility],
                "Privacy utility against the local-DP lower bound")
    write_block("<!-- bench:detection:begin -->", "<!-- bench:detection:end -->",
                [f"`cargo bench -p driftline-collector --bench accuracy{mode} -- --only detection`, "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.", "", *detection],
                "Detection delay and false alarms")


def checked_sum(quick):
    out = cargo("bench", "-p", "driftline-collector", "--bench", "checked_sum", "--",
                *(["1000000"] if quick else []), capture=True).stdout
    write_block("<!-- bench:checked-sum:begin -->", "<!-- bench:checked-sum:end -->",
                out.strip().splitlines(), "Checked sum")


def preflight(parts):
    """What the parts need beyond the repository: Mosquitto (apt) and the
    Python packages the references use (pip), installed when missing."""
    if {"agent", "ingest"} & set(parts):
        for tool in ["mosquitto", "mosquitto_pub", "mosquitto_sub"]:
            if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
                sys.exit(f"error: {tool} is missing (apt-get install mosquitto mosquitto-clients)")
    if "queries" in parts:
        try:
            import duckdb  # noqa: F401
            import psycopg  # noqa: F401
        except ImportError:
            sh([sys.executable, "-m", "pip", "install", "-q", "duckdb", "psycopg[binary]"])
    if "s3" in parts:
        try:
            import boto3  # noqa: F401
            import moto  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError:
            sh([sys.executable, "-m", "pip", "install", "-q", "moto[server]", "boto3", "pyarrow"])
    if "engine" in parts:
        try:
            import datafusion  # noqa: F401
            import duckdb  # noqa: F401
        except ImportError:
            sh([sys.executable, "-m", "pip", "install", "-q", "duckdb", "datafusion==55.0.0"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of every part")
    ap.add_argument("--only", help=f"comma-separated parts ({', '.join(PARTS)})")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--accuracy-from-debug", action="store_true",
                    help="run the accuracy part from the debug build (same figures, slower)")
    args = ap.parse_args()
    parts = args.only.split(",") if args.only else PARTS
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    preflight(parts)
    started = time.time()
    if not args.skip_build:
        cargo("build", "--release", "--locked", "-p", "driftline-agent", "-p", "driftline-collector", "--bins",
              "--example", "mqtt_replay")
    build_done = time.time()
    spent = {}
    for part in parts:
        t = time.time()
        quick = ["--quick"] if args.quick else []
        if part == "agent":
            agent(args.quick)
        elif part == "storage":
            storage(args.quick)
        elif part == "ingest":
            sh([sys.executable, str(BENCH / "ingest.py"), *quick])
        elif part == "queries":
            sh([sys.executable, str(BENCH / "run.py"), *quick])
        elif part == "s3":
            sh([sys.executable, str(BENCH / "s3_compact.py"), *quick])
        elif part == "engine":
            sh([sys.executable, str(BENCH / "engine.py"), *quick])
        elif part == "accuracy":
            accuracy(args.quick, args.accuracy_from_debug)
        elif part == "sum":
            checked_sum(args.quick)
        spent[part] = time.time() - t
    total = time.time() - build_done
    write_block("<!-- bench:machine:begin -->", "<!-- bench:machine:end -->", [
        f"Last suite run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"`python3 bench/suite.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`, "
        f"{total / 60:.1f} min after the build "
        f"({', '.join(f'{p} {s / 60:.1f} min' for p, s in spent.items())}).",
        f"Machine: {machine()}.",
    ], "Machine")
    print(json.dumps({"minutes": round(total / 60, 1), "parts": {p: round(s / 60, 1) for p, s in spent.items()},
                      "build_minutes": round((build_done - started) / 60, 1)}))


if __name__ == "__main__":
    main()
