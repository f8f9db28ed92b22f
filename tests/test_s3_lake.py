"""The lake on an S3-compatible server (moto, started by the test, with
conditional puts): two collectors share one MQTT subscription on a real
Mosquitto and write one S3 lake. Every window is stored exactly once, even
when the whole fleet publishes everything twice; bad input lands in the
quarantine table on S3; `query` reads the lake from S3; `compact` merges
each partition into one file, drops nothing, and deletes the replaced
files after the grace period."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import boto3
import pytest

from harness import AGENT, COLLECTOR, free_port, wait_port

BUCKET = "driftline-lake"
LAKE = f"s3://{BUCKET}/prod"


@pytest.fixture
def s3():
    moto = shutil.which("moto_server")
    assert moto, "moto_server is missing (pip install 'moto[server]'; .ci/run installs it)"
    port = free_port()
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
               AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    proc.terminate()
    proc.wait(timeout=10)


def query(env, sql):
    out = subprocess.run([str(COLLECTOR), "query", "--lake", LAKE, "--format", "json", sql],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def objects(client, prefix):
    got = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in got.get("Contents", []))


def manifest(client, table):
    body = client.get_object(Bucket=BUCKET, Key=f"prod/_driftline/manifests/{table}.json")["Body"]
    return json.loads(body.read())


def test_two_collectors_write_one_s3_lake_exactly_once(tmp_path, s3, broker):
    assert COLLECTOR.exists() and AGENT.exists(), "build first (cargo build)"
    env, client = s3
    collectors = []
    for name in ["c1", "c2"]:
        health = free_port()
        proc = subprocess.Popen(
            [str(COLLECTOR), "serve", "--broker", f"mqtt://127.0.0.1:{broker}",
             "--data-dir", str(tmp_path / name), "--lake", LAKE, "--client-id", f"s3-{name}",
             "--share-group", "s3-test", "--flush-interval", "1s",
             "--metrics-listen", f"127.0.0.1:{health}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        collectors.append((proc, health))
    try:
        for proc, health in collectors:
            deadline = time.time() + 30
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{health}/health").status == 200:
                        break
                except OSError:
                    pass
                assert time.time() < deadline, "collector never subscribed"
                time.sleep(0.2)

        # The whole fleet publishes its first 3 windows, which are stored;
        # then all 5 (the first 3 again: same keys, new noise). The second
        # flush holds new rows, so the partition has at least two files,
        # whatever the flush timing.
        devices, models, windows = 6, 2, 5
        for n in (3, windows):
            sim = subprocess.run(
                [str(AGENT), "simulate", "--broker", f"mqtt://127.0.0.1:{broker}",
                 "--devices", str(devices), "--models", str(models), "--windows", str(n),
                 "--start", "2026-11-20T10:00:00Z", "--fleet", "s3"],
                env=env, capture_output=True, text=True, timeout=120)
            assert sim.returncode == 0, sim.stderr
            deadline = time.time() + 60
            while time.time() < deadline:
                rows = query(env, "SELECT count(*) AS n FROM metrics")
                if rows and rows[0]["n"] >= devices * models * n:
                    break
                time.sleep(0.5)
        bad = subprocess.run(["mosquitto_pub", "-p", str(broker), "-q", "1",
                              "-t", "driftline/v1/s3/sim-00000/metrics", "-m", "{not json"],
                             capture_output=True, timeout=30)
        assert bad.returncode == 0, bad.stderr

        expected = devices * models * windows
        deadline = time.time() + 60
        while time.time() < deadline:
            rows = query(env, "SELECT count(*) AS n FROM metrics")
            if rows and rows[0]["n"] >= expected:
                break
            time.sleep(1)
    finally:
        for proc, _ in collectors:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in collectors:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out

    keys = "count(DISTINCT device_id || model_id || CAST(window_start AS VARCHAR) || CAST(seq AS VARCHAR))"
    rows = query(env, f"SELECT count(*) AS n, {keys} AS keys, min(date) AS day FROM metrics")
    assert rows == [{"n": expected, "keys": expected, "day": "2026-11-20"}], rows
    quarantined = query(env, "SELECT reason FROM quarantine")
    assert [r["reason"] for r in quarantined] == ["invalid_json"], quarantined

    # The files are Parquet objects on S3, listed by the table's manifest.
    data = [k for k in objects(client, "prod/metrics/") if k.endswith(".parquet")]
    listed = manifest(client, "metrics")["partitions"]["2026-11-20"]["files"]
    assert len(listed) >= 2 and sorted(f"prod/{f}" for f in listed) == data

    # Compaction: one file per partition, the same rows, old files gone.
    out = subprocess.run([str(COLLECTOR), "compact", "--lake", LAKE, "--data-dir", str(tmp_path / "c1"),
                          "--grace", "0s"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"compacted metrics/date=2026-11-20: {len(listed)} files -> 1, {expected} rows" in out.stdout, out.stdout
    after = manifest(client, "metrics")
    assert len(after["partitions"]["2026-11-20"]["files"]) == 1
    assert after["retired"] == []
    assert len([k for k in objects(client, "prod/metrics/") if k.endswith(".parquet")]) == 1
    rows = query(env, f"SELECT count(*) AS n, {keys} AS keys FROM metrics")
    assert rows == [{"n": expected, "keys": expected}], rows

    # A lake from before edge sets were stored: with the table's partition
    # gone from its manifest, the next maintenance pass derives it again
    # from metrics (reading only the model and edges columns, by range).
    edges_sql = "SELECT model_id, model_version, latency_ms_edges FROM histogram_edges ORDER BY 1, 2"
    edges = query(env, edges_sql)
    assert len(edges) == models and all(len(e["latency_ms_edges"]) > 1 for e in edges), edges
    sets = manifest(client, "histogram_edge_sets")
    del sets["partitions"]["2026-11-20"]
    client.put_object(Bucket=BUCKET, Key="prod/_driftline/manifests/histogram_edge_sets.json",
                      Body=json.dumps(sets).encode())
    assert query(env, edges_sql) == []
    out = subprocess.run([str(COLLECTOR), "compact", "--lake", LAKE, "--data-dir", str(tmp_path / "c1"),
                          "--grace", "0s"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "derived histogram_edge_sets/date=2026-11-20 from metrics" in out.stdout, out.stdout
    assert query(env, edges_sql) == edges


def test_a_lake_url_that_is_not_s3_is_refused_with_a_reason(tmp_path):
    assert COLLECTOR.exists(), "build first (cargo build)"
    out = subprocess.run([str(COLLECTOR), "query", "--lake", "ftp://somewhere/lake", "SELECT 1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "only s3:// lakes are supported" in out.stderr, out.stderr
