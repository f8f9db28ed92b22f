"""Peak memory of compacting one partition of an S3 lake (moto), at two
partition sizes: what grows with the partition's rows, against the
partition's size on the store. Writes BENCHMARKS.md.

    python3 bench/s3_compact.py            # 1.9 M and 3.8 M rows
    python3 bench/s3_compact.py --quick    # 0.2 M and 0.5 M rows

The partition: the release demo's windows (real noise), copied under new
device ids with pyarrow into 8 files, uploaded to moto with a manifest
that lists them; then `driftline-collector compact` merges them into one.
"""

import argparse
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from procs import free_port, wait_port
from report import write_block

RELEASE = pathlib.Path(os.environ.get("DRIFTLINE_RELEASE_TARGET",
                                      pathlib.Path.home() / ".cache/driftline/release-target"))
COLLECTOR = pathlib.Path(os.environ.get("DRIFTLINE_COLLECTOR", RELEASE / "release" / "driftline-collector"))
BEGIN, END = "<!-- bench:s3-compact:begin -->", "<!-- bench:s3-compact:end -->"
FILES = 8
TIMEOUT = 1800


def base_windows(work):
    """The demo's stored windows, and the date of the partition the
    benchmark puts them in (all in one, whatever their windows' dates)."""
    subprocess.run([str(COLLECTOR), "demo", "--duration", "20s", "--devices", "100", "--backfill", "1h",
                    "--pg-listen", "127.0.0.1:0", "--data-dir", str(work / "base")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    files = sorted((work / "base" / "metrics").glob("*/*.parquet"))
    date = files[0].parent.name.split("=", 1)[1]
    return pa.concat_tables([pq.read_table(f, partitioning=None) for f in files]), date


def partition_files(base, copies, date, out):
    """`copies` copies of `base` under new device ids, in FILES files with
    a constant `date` column, as the collector writes them to a store
    (pyarrow keeps the collector's Arrow schema in each file)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    device = base.schema.get_field_index("device_id")
    per = max(1, copies // FILES)
    for i in range(FILES):
        parts = [base.set_column(device, "device_id",
                                 pc.binary_join_element_wise(base["device_id"], pa.scalar(f"-r{k}"), ""))
                 for k in range(i * per, (i + 1) * per)]
        table = pa.concat_tables(parts)
        table = table.append_column(pa.field("date", pa.string(), nullable=False),
                                    pa.array([date] * table.num_rows, pa.string()))
        pq.write_table(table, out / f"part-{i}.parquet", compression="zstd")
    return per * FILES * base.num_rows, sum(p.stat().st_size for p in out.iterdir())


def compact_peak_rss(client, env, files, date, state):
    """Uploads `files` as table metrics' partition `date`, compacts it:
    the collector's peak RSS in KiB and the line it printed."""
    for o in client.list_objects_v2(Bucket="lake").get("Contents", []):
        client.delete_object(Bucket="lake", Key=o["Key"])
    names = []
    for p in sorted(files.iterdir()):
        key = f"metrics/date={date}/{p.name}"
        client.upload_file(str(p), "lake", f"prod/{key}")
        names.append(key)
    manifest = {"partitions": {date: {"id": "bench", "generation": 0, "files": names}}, "retired": []}
    client.put_object(Bucket="lake", Key="prod/_driftline/manifests/metrics.json", Body=json.dumps(manifest).encode())
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    with open(state / "stdout", "w+") as out, open(state / "stderr", "w+") as err:
        proc = subprocess.Popen([str(COLLECTOR), "compact", "--lake", "s3://lake/prod", "--data-dir",
                                 str(state / "data"), "--grace", "0s"], env=env, stdout=out, stderr=err)
        # wait4, not wait: this child's own peak RSS (ru_maxrss, KiB).
        deadline = time.monotonic() + TIMEOUT
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise SystemExit(f"compact ran longer than {TIMEOUT} s")
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"compact failed:\n{err.read()[-2000:]}")
        line = next((l for l in out.read().splitlines() if "compacted metrics" in l), None)
        if line is None:
            raise SystemExit(f"compact merged nothing:\n{err.read()[-2000:]}")
    return usage.ru_maxrss, line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not COLLECTOR.exists():
        raise SystemExit(f"build the release collector first:\n  CARGO_TARGET_DIR={RELEASE} "
                         "cargo build --release -p driftline-collector")
    moto_server = shutil.which("moto_server")
    if not moto_server:
        raise SystemExit("moto_server is missing: pip install 'moto[server]' boto3")
    work = pathlib.Path(tempfile.mkdtemp(prefix="driftline-s3-compact-"))
    port = free_port()
    moto = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        client.create_bucket(Bucket="lake")
        base, date = base_windows(work)
        started = datetime.datetime.now(datetime.timezone.utc)
        runs = []
        for copies in ((16, 40) if args.quick else (160, 320)):
            rows, size = partition_files(base, copies, date, work / "files")
            t = time.monotonic()
            rss, line = compact_peak_rss(client, env, work / "files", date, work / "state")
            runs.append((rows, size, rss, time.monotonic() - t))
            print(f"{rows:,} rows, {size / 1e6:.0f} MB: peak RSS {rss / 1024:.0f} MiB ({line})", flush=True)
    finally:
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)
    (r1, s1, m1, _), (r2, s2, m2, _) = runs
    per_row = (m2 - m1) * 1024 / (r2 - r1)
    per_byte = (m2 - m1) * 1024 / (s2 - s1)
    lines = [
        f"Run {started:%Y-%m-%d %H:%M} UTC, `python3 bench/s3_compact.py{' --quick' if args.quick else ''}`: "
        f"one `metrics` partition on moto ({FILES} files of the release demo's windows under new device ids), "
        "merged by the release `driftline-collector compact`.",
        "",
        "| partition | bytes on the store | collector peak RSS | compaction time |",
        "|---|---:|---:|---:|",
        *(f"| {r:,} rows | {s / 2**20:.0f} MiB | {m / 1024:.0f} MiB | {t:.1f} s |" for r, s, m, t in runs),
        "",
        f"Growth of peak RSS with the partition: {per_row:.0f} B per row, "
        f"{per_byte:.2f} B per byte on the store.",
    ]
    write_block(BEGIN, END, lines, "Compaction on S3: peak memory")


if __name__ == "__main__":
    main()
