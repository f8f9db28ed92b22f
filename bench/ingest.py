"""Driftline ingest benchmark: messages/s from one strong publisher through
Mosquitto into queryable Parquet, against the ceiling of the same broker
delivering the same messages from the same publisher to a subscriber that
only counts; then a backlog drain (the collector away while the messages
queue) with its peak RSS; and bytes on disk per stored window. Writes
BENCHMARKS.md.

The messages are real: `driftline-agent simulate` publishes them once to a
broker while `mosquitto_sub -v` captures them (noise, histograms, seq and
all). The publisher is `collector/examples/mqtt_replay.rs`: one rumqttc
connection with an in-flight window of 1000, so the ceiling is the
broker's, not the publishers'.

    python3 bench/ingest.py            # 240,000 messages (200 devices x 2 models x 600 windows)
    python3 bench/ingest.py --quick    # 24,000
    python3 bench/ingest.py --profile  # also `perf record` the collector during sustained ingest
    python3 bench/ingest.py --reference OLD_COLLECTOR  # A/B: rounds alternate with another build

Each of `--rounds` rounds (default 3) measures the ceiling, then sustained
ingest, then the drain, on a fresh lake; the table gives the median round
and the range, since the ratio moves with whatever else the shared machine
runs.
"""

import argparse
import datetime
import statistics
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

from procs import cpu_seconds, free_port, peak_rss_kib, wait_port
from report import write_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
RELEASE = pathlib.Path(os.environ.get("DRIFTLINE_RELEASE_TARGET",
                                      pathlib.Path.home() / ".cache/driftline/release-target"))
COLLECTOR = pathlib.Path(os.environ.get("DRIFTLINE_COLLECTOR", RELEASE / "release" / "driftline-collector"))
AGENT = RELEASE / "release" / "driftline-agent"
# `driftline-agent simulate` runs it.
SIMULATOR = RELEASE / "release" / "driftline-agent-simulate"
REPLAY = RELEASE / "release" / "examples" / "mqtt_replay"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BEGIN, END = "<!-- bench:ingest:begin -->", "<!-- bench:ingest:end -->"
PROFILE_BEGIN, PROFILE_END = "<!-- bench:ingest-profile:begin -->", "<!-- bench:ingest-profile:end -->"
INFLIGHT = 1000


def broker(work):
    """A Mosquitto for the run: no persistence, unbounded queue, the same
    in-flight window as the shipped configuration."""
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages 0\nmax_inflight_messages {INFLIGHT}\nmessage_size_limit 65536\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def capture(port, devices, windows, path):
    """What `simulate` publishes for `devices` x 2 models x `windows`
    one-minute windows ending now, as `topic payload` lines."""
    n = devices * 2 * windows
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-v",
                            "-t", "driftline/v1/+/+/metrics", "-C", str(n)], stdout=open(path, "w"))
    time.sleep(0.5)
    subprocess.run([str(AGENT), "simulate", "--broker", f"mqtt://127.0.0.1:{port}", "--devices", str(devices),
                    "--models", "2", "--windows", str(windows), "--window-secs", "60", "--seed", "7",
                    "--fleet", "bench"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sub.wait(timeout=600)
    lines = path.read_bytes().splitlines()
    assert len(lines) == n, f"captured {len(lines)} of {n} messages"
    return sum(len(line.split(b" ", 1)[1]) for line in lines) / n


def renamed(src, dst, prefix):
    """The messages of `src` as other devices' (device ids prefixed), so
    that they are new windows to the lake."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        for line in f:
            out.write(line.replace(b"/sim-", b"/" + prefix + b"-").replace(
                b'"device_id":"sim-', b'"device_id":"' + prefix + b"-"))


def replay(port, path):
    """Publishes every message of `path` (QoS 1) and returns once all are
    acknowledged: the seconds it took."""
    out = subprocess.run([str(REPLAY), "127.0.0.1", str(port), str(path), str(INFLIGHT)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["seconds"]


def stored(metrics_port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("driftline_windows_stored_total "):
            return int(float(line.split()[1]))
    return 0


def serve(collector, port, lake, metrics_port, flush):
    p = subprocess.Popen([str(collector), "serve", "--broker", f"mqtt://127.0.0.1:{port}",
                          "--client-id", "bench", "--data-dir", str(lake), "--flush-interval", flush,
                          "--metrics-listen", f"127.0.0.1:{metrics_port}", "--queries", str(lake.parent / "none")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=1)
            return p
        except OSError:
            time.sleep(0.1)
    return p


def wait_stored(metrics_port, n, pid=None):
    """Waits until the collector has stored `n` windows; the peak RSS seen."""
    peak = 0.0
    while stored(metrics_port) < n:
        if pid:
            peak = max(peak, peak_rss_kib(pid) / 1024)
        time.sleep(0.02)
    return peak


def round_(collector, port, messages, n, work, flush, perf_data=None):
    """One round: the ceiling, then `collector` ingesting the same messages
    live, then draining as many queued while it was away."""
    # Ceiling: the publisher to the broker to a subscriber that only counts.
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
                            "-t", "driftline/v1/+/+/metrics", "-C", str(n)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    t = time.perf_counter()
    replay(port, messages)
    sub.wait()
    ceiling = n / (time.perf_counter() - t)

    # Driftline: the same publisher to queryable Parquet.
    lake = work / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    metrics_port = free_port()
    proc = serve(collector, port, lake, metrics_port, flush)
    perf = None
    if perf_data:
        perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(proc.pid), "-o", str(perf_data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    cpu0 = cpu_seconds(proc.pid)
    t = time.perf_counter()
    replay(port, messages)
    wait_stored(metrics_port, n)
    elapsed = time.perf_counter() - t
    cpu = cpu_seconds(proc.pid) - cpu0
    live_rss = peak_rss_kib(proc.pid) / 1024
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    proc.send_signal(signal.SIGTERM)
    proc.wait()

    # Backlog: as many new windows queue while the collector is away,
    # then it drains them.
    backlog = work / "backlog.txt"
    renamed(messages, backlog, b"bak")
    replay(port, backlog)
    proc = serve(collector, port, lake, metrics_port, flush)
    t = time.perf_counter()
    peak = wait_stored(metrics_port, n, proc.pid)
    drain = n / (time.perf_counter() - t)
    peak = max(peak, peak_rss_kib(proc.pid) / 1024)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    # End the collector's persistent session, so that the next round's
    # messages do not queue for it.
    subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "bench", "-t", "driftline/none",
                    "-E"], check=True, stdout=subprocess.DEVNULL)
    disk = sum(f.stat().st_size for f in (lake / "_driftline" / "gens" / "metrics").rglob("*.parquet"))
    return {"ceiling": ceiling, "live": n / elapsed, "ratio": n / elapsed / ceiling, "drain": drain,
            "drain_ratio": drain / ceiling, "cpu_us": 1e6 * cpu / n, "cores": cpu / elapsed,
            "live_rss": live_rss, "peak": peak, "per_window": disk / (2 * n)}


def median(rounds, key):
    return statistics.median(r[key] for r in rounds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="perf record the collector during sustained ingest")
    ap.add_argument("--flush", default="2s", help="the collector's --flush-interval (default 2s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reference", type=pathlib.Path,
                    help="another collector binary, measured in alternate rounds of the same run")
    args = ap.parse_args()
    devices, windows = (20, 600) if args.quick else (200, 600)
    n = devices * 2 * windows
    for binary in (COLLECTOR, AGENT, SIMULATOR, REPLAY) + ((args.reference,) if args.reference else ()):
        if not binary.exists():
            raise SystemExit(f"missing {binary}: cargo build --release -p driftline-collector -p driftline-agent "
                             f"--bins --example mqtt_replay (CARGO_TARGET_DIR={RELEASE})")
    work = pathlib.Path(tempfile.mkdtemp(prefix="driftline-ingest-"))
    (work / "none").mkdir()
    try:
        proc, port = broker(work)
        messages = work / "messages.txt"
        size = capture(port, devices, windows, messages)
        rounds, reference = [], []
        for i in range(args.rounds):
            if args.reference:
                reference.append(round_(args.reference, port, messages, n, work, args.flush))
            perf_data = work / "perf.data" if args.profile and i == 0 else None
            rounds.append(round_(COLLECTOR, port, messages, n, work, args.flush, perf_data))
            r = rounds[-1]
            print(f"round {i + 1}: ceiling {r['ceiling']:,.0f} msg/s; driftline {r['live']:,.0f} msg/s "
                  f"({r['ratio']:.2f}), {r['cpu_us']:.1f} us/msg; drain {r['drain']:,.0f} msg/s, peak RSS "
                  f"{r['peak']:.0f} MiB" + (f"; reference {reference[-1]['ratio']:.2f}, "
                                            f"{reference[-1]['cpu_us']:.1f} us/msg" if reference else ""))
        proc.terminate()
        proc.wait()
        write(n, size, rounds, reference, args.flush)
        if args.profile:
            profile(work / "perf.data")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile(data):
    """The collector's CPU by component, from `perf report` of the
    sustained-ingest run (self time per symbol, grouped by crate/module)."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol",
                             "--stdio", "-q", "--percent-limit", "0.3"],
                            capture_output=True, text=True).stdout
    rows = []
    for line in report.splitlines():
        line = line.strip()
        if not line or not line[0].isdigit() or "%" not in line:
            continue
        percent, rest = line.split("%", 1)
        symbol = rest.split("]", 1)[-1].strip()
        rows.append((float(percent), symbol))
    groups = {}
    for percent, symbol in rows:
        groups[component(symbol)] = groups.get(component(symbol), 0.0) + percent
    lines = [f"`python3 bench/ingest.py --profile`: `perf record -F 999 -g` of the collector during sustained "
             f"ingest, self time by component (symbols of at least 0.3 %; the rest is spread thinner).", "",
             "| component | share of the collector's CPU |", "|---|---:|"]
    for name, percent in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {percent:.1f} % |")
    lines += ["", "Top symbols:", "", "| symbol | self |", "|---|---:|"]
    for percent, symbol in rows[:15]:
        lines.append(f"| `{symbol[:100].strip()}` | {percent:.1f} % |")
    write_block(PROFILE_BEGIN, PROFILE_END, lines, "Ingest profile")


COMPONENTS = [
    ("JSON decode and validation", ["serde_json", "driftline_core::wire", "serde::", "wire::accept", "Deserialize"]),
    ("write-ahead log (write, fsync)", ["wal::", "fsync", "fdatasync", "sync_file_range", "ext4_", "jbd2"]),
    ("Parquet encode and compression", ["parquet::", "zstd", "ZSTD_", "arrow_"]),
    ("key index (hashing)", ["lake::writer", "hash", "Hash", "RowConverter", "arrow_row"]),
    ("MQTT (rumqttc, TLS, sockets)", ["rumqttc", "tcp_", "sock_", "__sys_", "recv", "send", "mqttbytes"]),
    ("memory allocation and copies", ["malloc", "free", "realloc", "memcpy", "memmove", "_int_", "alloc::",
                                      "mi_malloc", "mi_free", "_mi_", "mi_heap", "unlink_chunk"]),
    ("async runtime", ["tokio::"]),
]


def component(symbol):
    for name, needles in COMPONENTS:
        if any(n in symbol for n in needles):
            return name
    return "other (kernel, libc, unresolved)"


def spread(rounds, key, fmt):
    """The median of `key` over the rounds, and its range."""
    values = [r[key] for r in rounds]
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def write(n, size, rounds, reference, flush):
    m = lambda key: median(rounds, key)
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `python3 bench/ingest.py`, "
        f"{n:,} real simulator messages (mean {size:.0f} B) replayed by one publisher with an in-flight window of "
        f"{INFLIGHT} (`collector/examples/mqtt_replay.rs`), Mosquitto on loopback, release collector with "
        f"`--flush-interval {flush}`, {os.cpu_count()} cores shared by broker, publisher and collector. "
        f"Median of {len(rounds)} rounds (range in brackets); each round measures its own ceiling.",
        "",
        "| measure | value | reference | ratio |",
        "|---|---:|---:|---:|",
        f"| sustained ingest, publish to queryable Parquet (WAL fsync before ack) | {m('live'):,.0f} msg/s | "
        f"ceiling: the same publisher through the same broker to a counting `mosquitto_sub`, {m('ceiling'):,.0f} msg/s | "
        f"{spread(rounds, 'ratio', '{:.2f}')} |",
        f"| collector CPU during sustained ingest | {m('cores'):.2f} cores ({spread(rounds, 'cpu_us', '{:.1f}')} us per message) | "
        f"{os.cpu_count()} cores on the machine | |",
        f"| peak RSS of the collector during sustained ingest | {spread(rounds, 'live_rss', '{:.0f}')} MiB | | |",
        f"| backlog drain ({n:,} queued while the collector was away) | {m('drain'):,.0f} msg/s | "
        f"ceiling {m('ceiling'):,.0f} msg/s | {spread(rounds, 'drain_ratio', '{:.2f}')} |",
        f"| peak RSS of the collector during the drain | {spread(rounds, 'peak', '{:.0f}')} MiB | | |",
        f"| bytes on disk per stored window (zstd Parquet) | {m('per_window'):.0f} B | JSON payload {size:.0f} B | "
        f"{m('per_window') / size:.3f} |",
    ]
    if reference:
        r = lambda key: median(reference, key)
        lines += [
            "",
            f"Reference build (`--reference`), measured in alternate rounds of the same run: sustained "
            f"{spread(reference, 'ratio', '{:.2f}')} of the ceiling at {spread(reference, 'cpu_us', '{:.1f}')} us "
            f"per message; drain {spread(reference, 'drain_ratio', '{:.2f}')}; peak RSS "
            f"{spread(reference, 'live_rss', '{:.0f}')} MiB sustained, {spread(reference, 'peak', '{:.0f}')} MiB "
            f"draining. This build against it: CPU per message x{m('cpu_us') / r('cpu_us'):.2f}, "
            f"drain peak RSS x{m('peak') / r('peak'):.2f}.",
        ]
    write_block(BEGIN, END, lines, "Ingest: end to end against the broker's ceiling")


if __name__ == "__main__":
    main()
