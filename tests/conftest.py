"""Fixtures shared by the Python tests."""

import subprocess

import pytest

from harness import MOSQUITTO, free_port, wait_port


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto of this test's own on a free port (anonymous, no
    persistence); yields the port."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sql_collector(tmp_path_factory):
    """`driftline-collector serve` with its SQL endpoint (password `pw`,
    8 connections, 10 s statement limit, 3 s to log in) over a lake of 40
    windows published through a Mosquitto of its own. Yields a dict: dsn,
    port, pid, data (the lake directory), metrics_port, windows."""
    import json
    import time
    from datetime import datetime, timedelta, timezone

    import psycopg

    from harness import COLLECTOR

    assert COLLECTOR.exists(), f"build the collector first (cargo build): {COLLECTOR}"
    tmp = tmp_path_factory.mktemp("sql")
    broker_port, pg_port, metrics_port = free_port(), free_port(), free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(broker_port)
    data = tmp / "lake"
    log = open(tmp / "collector.log", "w")
    collector = subprocess.Popen(
        [str(COLLECTOR), "serve", "--broker", f"mqtt://127.0.0.1:{broker_port}",
         "--client-id", "sql-tests", "--data-dir", str(data), "--flush-interval", "300ms",
         "--pg-listen", f"127.0.0.1:{pg_port}", "--pg-password", "pw",
         "--pg-max-connections", "8", "--pg-statement-timeout", "10s",
         "--pg-login-timeout", "3s", "--pg-memory-mb", "256",
         "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(pg_port)
        # Published before the collector subscribes, a message is lost.
        deadline = time.time() + 30
        while "subscribed" not in (tmp / "collector.log").read_text():
            assert time.time() < deadline and collector.poll() is None, \
                (tmp / "collector.log").read_text()
            time.sleep(0.1)
        start = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=1)
        lines = []
        for d in range(4):
            for w in range(10):
                lines.append(json.dumps({
                    "schema_version": 1, "device_id": f"dev-{d}", "fleet": "sql",
                    "model_id": "m", "model_version": "1", "agent_version": "0.1.0",
                    "window_start": (start + timedelta(minutes=w)).isoformat(),
                    "window_secs": 60, "seq": w, "privacy": {"mechanism": "none"},
                    "inference_count": 3, "error_count": 0,
                    "feedback": {"positive": 1, "negative": 0, "correction": 0},
                    "latency_ms": {"edges": [0, 10, 100, 1000], "counts": [1, 2, 0]},
                    "confidence": {"edges": [0, 0.5, 1], "counts": [0, 3]},
                    "input_tokens": {"edges": [0, 100, 1000], "counts": [3, 0]},
                    "output_tokens": {"edges": [0, 100, 1000], "counts": [2, 1]}}))
        for d in range(4):
            subprocess.run(["mosquitto_pub", "-p", str(broker_port), "-q", "1",
                            "-t", f"driftline/v1/sql/dev-{d}/metrics", "-l"],
                           input="\n".join(lines[d * 10:(d + 1) * 10]) + "\n",
                           text=True, check=True, timeout=30)
        dsn = f"host=127.0.0.1 port={pg_port} user=driftline password=pw dbname=driftline"
        deadline = time.time() + 60
        n = 0
        while time.time() < deadline:
            with psycopg.connect(dsn, autocommit=True) as conn:
                n = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
            if n == 40:
                break
            time.sleep(0.5)
        assert n == 40, f"{n} of 40 windows stored"
        yield {"dsn": dsn, "port": pg_port, "pid": collector.pid, "data": data,
               "metrics_port": metrics_port, "windows": 40}
    finally:
        collector.terminate()
        collector.wait(timeout=30)
        broker.terminate()
        broker.wait(timeout=10)
        log.close()
