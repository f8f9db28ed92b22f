"""OpenTelemetry export: an agent and a collector, pointed at an OTLP/HTTP
receiver by the standard OTEL_EXPORTER_OTLP_* variables, send traces,
metrics and logs that decode with the OpenTelemetry protobuf definitions. The
receiver is a real HTTP server; the broker is a real Mosquitto."""

import os
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from harness import AGENT, COLLECTOR, ROOT, free_port


class Received:
    """What the receiver decoded, per service.name."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans = {}    # service -> [span name]
        self.metrics = {}  # service -> {metric name: last value}
        self.logs = {}     # service -> [(severity text, body)]
        self.content_types = set()

    def add_traces(self, body):
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            for rs in req.resource_spans:
                service = resource_service(rs.resource)
                for ss in rs.scope_spans:
                    self.spans.setdefault(service, []).extend(s.name for s in ss.spans)

    def add_metrics(self, body):
        req = metrics_service_pb2.ExportMetricsServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            for rm in req.resource_metrics:
                service = resource_service(rm.resource)
                seen = self.metrics.setdefault(service, {})
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        points = getattr(m, kind).data_points
                        if kind == "histogram":
                            seen[m.name] = sum(p.count for p in points)
                        elif points:
                            p = points[-1]
                            seen[m.name] = p.as_int if p.HasField("as_int") else p.as_double

    def add_logs(self, body):
        req = logs_service_pb2.ExportLogsServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            for rl in req.resource_logs:
                service = resource_service(rl.resource)
                for sl in rl.scope_logs:
                    self.logs.setdefault(service, []).extend(
                        (r.severity_text, r.body.string_value) for r in sl.log_records)

    def snapshot(self):
        with self.lock:
            return ({k: list(v) for k, v in self.spans.items()},
                    {k: dict(v) for k, v in self.metrics.items()})

    def log_bodies(self, service):
        with self.lock:
            return [body for _, body in self.logs.get(service, [])]


def resource_service(resource):
    for kv in resource.attributes:
        if kv.key == "service.name":
            return kv.value.string_value
    return "?"


def start_receiver():
    """An OTLP/HTTP receiver on a free port: (server, endpoint, received)."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.content_types.add(self.headers.get("Content-Type"))
            if self.path == "/v1/traces":
                received.add_traces(body)
            elif self.path == "/v1/metrics":
                received.add_metrics(body)
            elif self.path == "/v1/logs":
                received.add_logs(body)
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", received


@pytest.fixture
def receiver():
    server, endpoint, received = start_receiver()
    yield endpoint, received
    server.shutdown()


def otel_env(endpoint):
    env = dict(os.environ)
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_BLRP_SCHEDULE_DELAY": "200",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    })
    return env


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_agent_and_collector_export_traces_metrics_and_logs(tmp_path, receiver, broker):
    assert COLLECTOR.exists() and AGENT.exists(), "build first (cargo build)"
    endpoint, received = receiver
    broker = f"mqtt://127.0.0.1:{broker}"
    metrics_port = free_port()
    collector = subprocess.Popen(
        [str(COLLECTOR), "serve", "--broker", broker, "--data-dir", str(tmp_path / "lake"),
         "--flush-interval", "1s", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        env=otel_env(endpoint), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
device_id = "otel-test-1"
fleet = "otel"
broker = "{broker}"
state_dir = "{tmp_path / 'agent-state'}"
window = "1s"
[privacy]
mechanism = "laplace"
epsilon = 1.0
device_day_epsilon = 1000000.0
budget_rho = 100000.0
[http]
listen = "127.0.0.1:{free_port()}"
[[models]]
id = "m"
version = "1"
labels = ["a", "b"]
""")
    agent = subprocess.Popen([str(AGENT), "run", "--config", str(config)],
                             env=otel_env(endpoint), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            spans, metrics = received.snapshot()
            c = metrics.get("driftline-collector", {})
            a = metrics.get("driftline-agent", {})
            if ("flush" in spans.get("driftline-collector", [])
                    and "close_windows" in spans.get("driftline-agent", [])
                    and c.get("driftline_windows_stored_total", 0) >= 3
                    and c.get("driftline_flush_seconds", 0) >= 1
                    and a.get("driftline_agent_windows_acknowledged_total", 0) >= 3
                    and "subscribed" in received.log_bodies("driftline-collector")
                    and "connected to broker" in received.log_bodies("driftline-agent")):
                break
            assert collector.poll() is None and agent.poll() is None
            time.sleep(0.25)
        spans, metrics = received.snapshot()
        assert "flush" in spans.get("driftline-collector", []), spans.keys()
        assert "close_windows" in spans.get("driftline-agent", []), spans.keys()
        collected = metrics.get("driftline-collector", {})
        assert collected.get("driftline_windows_stored_total", 0) >= 3, collected
        assert collected.get("driftline_messages_received_total", 0) >= 3, collected
        assert collected.get("driftline_flush_seconds", 0) >= 1, collected
        agent_metrics = metrics.get("driftline-agent", {})
        assert agent_metrics.get("driftline_agent_windows_acknowledged_total", 0) >= 3
        assert agent_metrics.get("driftline_agent_budget_remaining_rho", 0) > 0
        assert received.content_types == {"application/x-protobuf"}
        # The same figures still reach Prometheus: one recorder feeds both.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        stored = [line for line in text.splitlines()
                  if line.startswith("driftline_windows_stored_total ")]
        assert stored and float(stored[0].split()[1]) >= 3, text
        # Logs: Driftline's own events, with their severity.
        assert "subscribed" in received.log_bodies("driftline-collector")
        assert "connected to broker" in received.log_bodies("driftline-agent")
        with received.lock:
            assert ("INFO", "subscribed") in received.logs["driftline-collector"]
    finally:
        stop(agent)
        stop(collector)
    # What they log while stopping is exported before they exit.
    assert "agent stopped" in received.log_bodies("driftline-agent")
    assert ("collector stopped; everything acknowledged is in the lake"
            in received.log_bodies("driftline-collector"))


def test_unsupported_otlp_protocol_is_refused_with_a_reason(tmp_path):
    assert AGENT.exists(), "build first (cargo build)"
    env = otel_env("http://127.0.0.1:4317")
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    run = subprocess.run([str(AGENT), "check-config", "--config",
                          str(ROOT / "agent" / "agent.example.toml")],
                         env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "http/protobuf" in run.stderr, run.stderr



def test_agent_telemetry_does_not_depend_on_events(tmp_path, broker):
    """The same agent configuration run three times, recording 0, 37 and 91
    events: what it exports over OTLP (metric values, span names, log
    messages) is the same, so nobody watching the telemetry learns how the
    device was used. The events themselves are counted on the loopback
    endpoint only."""
    import json

    exported = []
    for n in (0, 37, 91):
        server, endpoint, received = start_receiver()
        http_port = free_port()
        run_dir = tmp_path / f"run-{n}"
        run_dir.mkdir()
        config = run_dir / "agent.toml"
        # Hour-long windows: no window closes during the run, so every
        # figure the agent exports is the same whatever the timing.
        config.write_text(f"""
device_id = "otel-privacy"
fleet = "otel"
broker = "mqtt://127.0.0.1:{broker}"
state_dir = "{run_dir / 'state'}"
window = "1h"
[privacy]
epsilon = 1.0
budget_rho = 100.0
[http]
listen = "127.0.0.1:{http_port}"
[[models]]
id = "m"
version = "1"
""")
        agent = subprocess.Popen([str(AGENT), "run", "--config", str(config)],
                                 env=otel_env(endpoint),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            event = {"type": "inference", "model_id": "m", "model_version": "1", "latency_ms": 5}
            if n:
                req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/events",
                                             data=json.dumps([event] * n).encode(), method="POST")
                assert urllib.request.urlopen(req, timeout=10).status == 202
            status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/status"))
            assert status["local"]["events_accepted"] == n
            # Three metric exports after the events.
            deadline = time.time() + 30
            while time.time() < deadline and received.snapshot()[1].get("driftline-agent", {}) \
                    .get("driftline_agent_connected") != 1:
                time.sleep(0.2)
            time.sleep(3.5)
        finally:
            stop(agent)
            server.shutdown()
        spans, metrics = received.snapshot()
        exported.append({
            "metrics": metrics.get("driftline-agent", {}),
            "spans": sorted(set(spans.get("driftline-agent", []))),
            "logs": sorted(set(received.log_bodies("driftline-agent"))),
        })
    assert exported[0]["metrics"], "the agent exported no metrics"
    assert "driftline_agent_budget_remaining_rho" in exported[0]["metrics"]
    assert exported[0] == exported[1] == exported[2], exported
    for name in exported[0]["metrics"]:
        assert "event" not in name and "request" not in name, name
