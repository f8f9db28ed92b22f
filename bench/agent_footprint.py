#!/usr/bin/env python3
"""Agent footprint at a steady event rate (default 1,000 events/s).

Starts a throwaway Mosquitto and `driftline-agent run` (release build),
posts events to the agent's local HTTP ingest in batches of 100 at the
target rate for --seconds, and samples both processes from /proc: CPU time
(user+system) and resident memory (peak VmHWM). Mosquitto, which carries the
agent's traffic in the same run, is the reference. Also reports the size of
the stripped agent binary against Mosquitto's.

    python3 bench/agent_footprint.py [--agent PATH] [--seconds N]

Writes its table into BENCHMARKS.md (between the agent-footprint markers).
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

from procs import cpu_seconds, free_port, peak_rss_kib, wait_port
from report import write_block

RELEASE = os.environ.get("DRIFTLINE_RELEASE_TARGET",
                         os.path.expanduser("~/.cache/driftline/release-target"))
BEGIN, END = "<!-- bench:agent-footprint:begin -->", "<!-- bench:agent-footprint:end -->"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", default=os.path.join(RELEASE, "release", "driftline-agent"))
    ap.add_argument("--rate", type=int, default=1000, help="events per second")
    ap.add_argument("--seconds", type=int, default=30)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="dl-footprint-")
    mqtt_port, http_port = free_port(), free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(mqtt_port)
    cfg = os.path.join(tmp, "agent.toml")
    with open(cfg, "w") as f:
        f.write(f"""device_id = "bench-1"
fleet = "bench"
broker = "mqtt://127.0.0.1:{mqtt_port}"
state_dir = "{tmp}/state"
window = "10s"
[http]
listen = "127.0.0.1:{http_port}"
[[models]]
id = "classifier"
version = "1.0.0"
labels = ["a", "b", "c"]
""")
    agent = subprocess.Popen([args.agent, "run", "--config", cfg],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(http_port)
    batch = [{"type": "inference", "model_id": "classifier", "model_version": "1.0.0",
              "latency_ms": 10 + i % 90, "input_tokens": 50 + i, "output_tokens": 5,
              "confidence": (i % 10) / 10, "label": "abc"[i % 3]} for i in range(100)]
    body = json.dumps(batch).encode()
    per_second = max(1, args.rate // 100)
    start_cpu = (cpu_seconds(agent.pid), cpu_seconds(broker.pid))
    start = time.time()
    sent = 0
    for second in range(args.seconds):
        for k in range(per_second):
            target = start + second + k / per_second
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/events", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=5) as resp:
                sent += json.load(resp)["accepted"]
    elapsed = time.time() - start
    agent_cpu = cpu_seconds(agent.pid) - start_cpu[0]
    broker_cpu = cpu_seconds(broker.pid) - start_cpu[1]
    agent_rss, broker_rss = peak_rss_kib(agent.pid), peak_rss_kib(broker.pid)
    agent.terminate()
    agent.wait(10)
    broker.terminate()
    broker.wait(10)

    stripped = os.path.join(tmp, "driftline-agent.stripped")
    shutil.copy(args.agent, stripped)
    subprocess.run(["strip", stripped], check=True)
    agent_size = os.path.getsize(stripped)
    broker_size = os.path.getsize(shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    shutil.rmtree(tmp, ignore_errors=True)

    rate = sent / elapsed
    print(f"events sent          {sent} in {elapsed:.1f} s ({rate:.0f}/s)")
    print(f"agent CPU            {100 * agent_cpu / elapsed:.2f} % of one core "
          f"({1e6 * agent_cpu / sent:.2f} us per event)")
    print(f"reference: mosquitto {100 * broker_cpu / elapsed:.2f} % of one core")
    print(f"agent peak RSS       {agent_rss / 1024:.1f} MiB")
    print(f"reference: mosquitto {broker_rss / 1024:.1f} MiB (ratio {agent_rss / max(broker_rss, 1):.1f}x)")
    print(f"stripped agent       {agent_size / 1e6:.1f} MB "
          f"(mosquitto binary {broker_size / 1e6:.2f} MB, dynamically linked)")
    write_block(BEGIN, END, [
        f"Run {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"`python3 bench/agent_footprint.py`: {args.rate:,} inference events/s posted to the local HTTP "
        f"ingest in batches of 100 for {args.seconds} s; Mosquitto carries the agent's traffic in the same run.",
        "",
        "| measure | agent | reference: Mosquitto, same run | ratio |",
        "|---|---|---|---|",
        f"| events recorded | {sent:,} in {elapsed:.1f} s ({rate:,.0f}/s) | | |",
        f"| CPU | {100 * agent_cpu / elapsed:.2f} % of one core ({1e6 * agent_cpu / max(sent, 1):.1f} us per event, "
        f"HTTP + JSON included) | {100 * broker_cpu / elapsed:.2f} % | |",
        f"| peak RSS (VmHWM) | {agent_rss / 1024:.1f} MiB | {broker_rss / 1024:.1f} MiB | "
        f"{agent_rss / max(broker_rss, 1):.1f}x |",
        f"| stripped binary (release, `strip`, OpenTelemetry built in) | {agent_size / 1e6:.1f} MB | "
        f"{broker_size / 1e6:.2f} MB (dynamically linked, plus libmosquitto) | {agent_size / broker_size:.0f}x |",
    ], "Agent: footprint at 1,000 events/s")


if __name__ == "__main__":
    main()
