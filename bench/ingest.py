"""Driftline ingest benchmark: messages/s from a publisher through Mosquitto
into queryable Parquet, against the ceiling of the same broker delivering
the same payloads to a subscriber that only counts (mosquitto_sub); then a
backlog drain (the collector away while the messages queue) with its peak
RSS; and bytes on disk per stored window. Writes BENCHMARKS.md.

    python3 bench/ingest.py            # 200,000 messages
    python3 bench/ingest.py --quick    # 20,000
"""

import argparse
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

from procs import cpu_seconds, free_port, peak_rss_kib, wait_port
from report import write_block
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RELEASE = pathlib.Path(os.environ.get("DRIFTLINE_RELEASE_TARGET",
                                      pathlib.Path.home() / ".cache/driftline/release-target"))
COLLECTOR = pathlib.Path(os.environ.get("DRIFTLINE_COLLECTOR", RELEASE / "release" / "driftline-collector"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BEGIN, END = "<!-- bench:ingest:begin -->", "<!-- bench:ingest:end -->"


def payloads(n, path):
    """n distinct valid messages (the documented example on 50 devices),
    one per line, for `mosquitto_pub -l`; returns the mean payload size."""
    example = json.loads((ROOT / "core/tests/fixtures/v1/valid/laplace.json").read_text())
    now = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
    total = 0
    with open(path, "w") as out:
        for i in range(n):
            device, window = i % 50, i // 50
            m = dict(example)
            m["device_id"] = f"bench-{device:04d}"
            m["window_start"] = (now - datetime.timedelta(minutes=window + 5)).strftime("%Y-%m-%dT%H:%M:%SZ")
            m["seq"] = window
            line = json.dumps(m, separators=(",", ":"))
            total += len(line)
            out.write(line + "\n")
    return total / n


def publish(port, path):
    """All lines of `path` as QoS 1 messages, each on its device's topic."""
    # mosquitto_pub -l takes one topic and the collector checks the topic
    # against the payload: one publisher process per device, concurrently.
    lines = pathlib.Path(path).read_text().splitlines()
    by_device = {}
    for line in lines:
        d = json.loads(line)["device_id"]
        by_device.setdefault(d, []).append(line)
    procs = []
    for d, msgs in by_device.items():
        p = subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-l",
                              "-i", f"pub-{d}", "-t", f"driftline/v1/eu-kiosks/{d}/metrics"],
                             stdin=subprocess.PIPE, text=True)
        procs.append((p, "\n".join(msgs) + "\n"))
    for p, text in procs:
        p.stdin.write(text)
        p.stdin.close()
    for p, _ in procs:
        p.wait()


def stored(metrics_port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("driftline_windows_stored_total "):
            return int(float(line.split()[1]))
    return 0


def serve(port, lake, metrics_port):
    p = subprocess.Popen([str(COLLECTOR), "serve", "--broker", f"mqtt://127.0.0.1:{port}",
                          "--client-id", "bench", "--data-dir", str(lake), "--flush-interval", "1s",
                          "--metrics-listen", f"127.0.0.1:{metrics_port}", "--queries", str(lake.parent / "none")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=1)
            return p
        except OSError:
            time.sleep(0.1)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 20_000 if args.quick else 200_000
    if not COLLECTOR.exists():
        raise SystemExit(f"build the release collector first (CARGO_TARGET_DIR={RELEASE})")
    work = pathlib.Path(tempfile.mkdtemp(prefix="driftline-ingest-"))
    (work / "none").mkdir()
    try:
        port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 0\nmax_inflight_messages 1000\nmessage_size_limit 16777216\n")
        broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        lines = work / "messages.txt"
        size = payloads(n, lines)

        # Ceiling: the broker to a subscriber that only counts.
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
                                "-t", "driftline/v1/+/+/metrics", "-C", str(n)],
                               stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        t = time.perf_counter()
        publish(port, lines)
        sub.wait()
        ceiling = n / (time.perf_counter() - t)

        # Driftline: publisher to queryable Parquet.
        lake, metrics_port = work / "lake", free_port()
        collector = serve(port, lake, metrics_port)
        cpu0 = cpu_seconds(collector.pid)
        t = time.perf_counter()
        publish(port, lines)
        while stored(metrics_port) < n:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t
        live = n / elapsed
        cpu = cpu_seconds(collector.pid) - cpu0
        live_rss = peak_rss_kib(collector.pid) / 1024
        collector.send_signal(signal.SIGTERM)
        collector.wait()

        # Backlog: the same number of new messages queue while the collector
        # is away, then it drains them.
        shifted = work / "backlog.txt"
        with open(shifted, "w") as out:
            for line in lines.read_text().splitlines():
                m = json.loads(line)
                m["seq"] += 100_000
                out.write(json.dumps(m, separators=(",", ":")) + "\n")
        publish(port, shifted)
        collector = serve(port, lake, metrics_port)
        t = time.perf_counter()
        peak = 0.0
        while stored(metrics_port) < n:
            peak = max(peak, peak_rss_kib(collector.pid) / 1024)
            time.sleep(0.05)
        drain = n / (time.perf_counter() - t)
        peak = max(peak, peak_rss_kib(collector.pid) / 1024)
        collector.send_signal(signal.SIGTERM)
        collector.wait()
        broker.terminate()
        broker.wait()

        disk = sum(f.stat().st_size for f in (lake / "_driftline" / "gens" / "metrics").rglob("*.parquet"))
        per_window = disk / (2 * n)
        print(f"ceiling {ceiling:,.0f} msg/s; driftline {live:,.0f} msg/s ({live / ceiling:.0%}); "
              f"backlog drain {drain:,.0f} msg/s, peak RSS {peak:.0f} MiB; {per_window:.0f} B/window "
              f"vs {size:.0f} B JSON")
        write(n, ceiling, live, drain, peak, per_window, size, cpu, elapsed, live_rss)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(n, ceiling, live, drain, peak, per_window, size, cpu, elapsed, live_rss):
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `python3 bench/ingest.py`, "
        f"{n:,} messages of {size:.0f} B, Mosquitto on loopback (in-flight window 1000), release collector, "
        f"{os.cpu_count()} cores shared by broker, publishers and collector.",
        "",
        "| measure | value | reference | ratio |",
        "|---|---:|---:|---:|",
        f"| sustained ingest, publish to queryable Parquet (WAL fsync before ack) | {live:,.0f} msg/s | "
        f"ceiling: same broker to a counting `mosquitto_sub`, {ceiling:,.0f} msg/s | {live / ceiling:.2f} |",
        f"| collector CPU during sustained ingest | {cpu / elapsed:.2f} cores ({1e6 * cpu / n:.0f} us per message) | "
        f"{os.cpu_count()} cores on the machine | |",
        f"| peak RSS of the collector during sustained ingest | {live_rss:.0f} MiB | | |",
        f"| backlog drain ({n:,} queued while the collector was away) | {drain:,.0f} msg/s | ceiling {ceiling:,.0f} msg/s | {drain / ceiling:.2f} |",
        f"| peak RSS of the collector during the drain | {peak:.0f} MiB | | |",
        f"| bytes on disk per stored window (zstd Parquet) | {per_window:.0f} B | JSON payload {size:.0f} B | {per_window / size:.3f} |",
    ]
    write_block(BEGIN, END, lines, "Ingest: end to end against the broker's ceiling")


if __name__ == "__main__":
    main()
