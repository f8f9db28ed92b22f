"""Writes the Grafana dashboards (*.json) of this folder from the panel
definitions below: one place for the SQL, checked by tests/test_dashboards.py.
Run: python3 dashboards/generate.py"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
DS = {"type": "grafana-postgresql-datasource", "uid": "${datasource}"}

# Template variables shared by every dashboard: fleet, model, version.
VARIABLES = [
    {"name": "datasource", "type": "datasource", "query": "grafana-postgresql-datasource",
     "current": {"text": "Driftline", "value": "driftline"}},
    {"name": "fleet", "type": "query", "datasource": DS, "multi": True, "includeAll": True,
     # The fleets of the devices view, without building that view (its
     # per-device aggregation is most of a dashboard's load time).
     "query": "SELECT fleet AS __text FROM metrics UNION SELECT fleet FROM status "
              "WHERE fleet IS NOT NULL ORDER BY 1", "refresh": 2},
    {"name": "model", "type": "query", "datasource": DS, "multi": True, "includeAll": True,
     "query": "SELECT DISTINCT model_id AS __text FROM metrics WHERE $__timeFilter(window_start) ORDER BY 1",
     "refresh": 2},
    {"name": "version", "type": "query", "datasource": DS, "multi": True, "includeAll": True,
     "query": "SELECT DISTINCT model_version AS __text FROM metrics WHERE $__timeFilter(window_start) "
              "AND model_id IN ($model) ORDER BY 1",
     "refresh": 2},
]

FILTER = "$__timeFilter(window_start) AND fleet IN ($fleet) AND model_id IN ($model) AND model_version IN ($version)"

DASHBOARDS = {
    "fleet-overview": ("Driftline: fleet overview", [
        ("stat", "Devices online", "Devices whose last status is online (last will clears it).",
         "SELECT count(*) AS online FROM devices WHERE state = 'online' AND fleet IN ($fleet)"),
        ("stat", "Devices seen in range", "Devices with at least one window in the time range.",
         f"SELECT count(DISTINCT device_id) AS devices FROM metrics WHERE {FILTER}"),
        ("timeseries", "Windows per minute", "Messages stored per minute of event time, per model.",
         "SELECT $__timeGroupAlias(window_start, '1m'), model_id AS metric, count(*) AS windows "
         f"FROM metrics WHERE {FILTER} GROUP BY 1, 2 ORDER BY 1"),
        ("timeseries", "Ingest lag (s)", "Seconds from the end of a window to its arrival at the collector.",
         "SELECT $__timeGroupAlias(window_start, '1m'), "
         "avg(CAST(EXTRACT(EPOCH FROM received_at) - EXTRACT(EPOCH FROM window_start) - window_secs AS DOUBLE)) AS lag_s "
         f"FROM metrics WHERE {FILTER} GROUP BY 1 ORDER BY 1"),
        ("table", "Quarantine by reason", "Refused messages in the range, by reason code.",
         "SELECT reason, count(*) AS messages, max(received_at) AS last FROM quarantine "
         "WHERE $__timeFilter(received_at) GROUP BY reason ORDER BY messages DESC"),
        ("table", "Devices", "Last status, agent and model versions, budget left.",
         "SELECT device_id, fleet, state, last_seen, agent_version, model_versions, budget_remaining_rho "
         "FROM devices WHERE fleet IN ($fleet) ORDER BY last_seen DESC LIMIT 200"),
    ]),
    "model-quality": ("Driftline: model quality", [
        ("timeseries", "Inferences per window (with standard error)",
         "Fleet sum of noised inference counts; the band is +/- 2 standard errors of the privacy noise.",
         "SELECT $__timeGroupAlias(window_start, $__interval), model_id || ' ' || model_version AS metric, "
         "sum(inferences) AS inferences, sum(inferences) - 2 * sqrt(sum(inferences_se * inferences_se)) AS low, "
         "sum(inferences) + 2 * sqrt(sum(inferences_se * inferences_se)) AS high "
         "FROM model_windows WHERE $__timeFilter(window_start) AND model_id IN ($model) AND model_version IN ($version) "
         "GROUP BY 1, 2 ORDER BY 1"),
        ("timeseries", "Median latency (ms)", "Fleet median latency from the noisy histograms, per model version.",
         "SELECT h.\"time\", h.model_id || ' ' || h.model_version AS metric, "
         "hist_quantile(e.latency_ms_edges, h.counts, 0.5) AS p50_ms FROM ("
         "SELECT $__timeGroupAlias(window_start, '5m'), model_id, model_version, make_array("
         + ", ".join(f"sum(latency_ms_b{i:02})" for i in range(16)) +
         ") AS counts "
         f"FROM metrics WHERE {FILTER} GROUP BY 1, 2, 3) h "
         "JOIN histogram_edges e ON e.model_id = h.model_id AND e.model_version = h.model_version ORDER BY 1"),
        ("timeseries", "Error rate", "Failed inferences / inferences (ratio of unbiased sums).",
         "SELECT $__timeGroupAlias(window_start, '5m'), model_id || ' ' || model_version AS metric, "
         "CAST(sum(error_count) AS DOUBLE) / nullif(sum(inference_count), 0) AS error_rate "
         f"FROM metrics WHERE {FILTER} GROUP BY 1, 2 ORDER BY 1"),
        ("timeseries", "Negative feedback rate", "Negative user feedback / inferences.",
         "SELECT $__timeGroupAlias(window_start, '5m'), model_id || ' ' || model_version AS metric, "
         "CAST(sum(feedback_negative) AS DOUBLE) / nullif(sum(inference_count), 0) AS negative_rate "
         f"FROM metrics WHERE {FILTER} GROUP BY 1, 2 ORDER BY 1"),
        ("timeseries", "Mean confidence", "Mean of the confidence histogram (bucket midpoints).",
         "SELECT h.\"time\", h.model_id || ' ' || h.model_version AS metric, "
         "hist_mean(e.confidence_edges, h.counts) AS confidence FROM ("
         "SELECT $__timeGroupAlias(window_start, '5m'), model_id, model_version, make_array("
         + ", ".join(f"sum(confidence_b{i:02})" for i in range(10)) +
         ") AS counts "
         f"FROM metrics WHERE {FILTER} GROUP BY 1, 2, 3) h "
         "JOIN histogram_edges e ON e.model_id = h.model_id AND e.model_version = h.model_version ORDER BY 1"),
    ]),
    "drift": ("Driftline: drift and retraining", [
        ("timeseries", "Detector statistics", "Each detector's statistic per period (the threshold is in the table below).",
         "SELECT current_end AS \"time\", detector || ' ' || model_id || ' ' || model_version AS metric, value "
         "FROM detector_runs WHERE $__timeFilter(current_end) AND model_id IN ($model) ORDER BY 1"),
        ("table", "Drift events", "Evaluations that fired: value over threshold and p-value under alpha.",
         "SELECT current_end, detector, model_id, model_version, statistic, value, threshold, p_value, "
         "severity, devices, events, epsilon FROM drift_events "
         "WHERE $__timeFilter(current_end) AND model_id IN ($model) ORDER BY current_end DESC"),
        ("table", "Retraining jobs", "Jobs opened by the retraining rule and their latest state.",
         "SELECT job_id, model_id, model_version, status, created_at, updated_at, detail "
         "FROM retrain_jobs WHERE model_id IN ($model) ORDER BY created_at DESC"),
    ]),
    "privacy": ("Driftline: privacy", [
        ("timeseries", "Epsilon per window", "Largest epsilon a device spent on one window, per model.",
         "SELECT $__timeGroupAlias(window_start, '5m'), model_id AS metric, max(epsilon) AS epsilon "
         f"FROM metrics WHERE {FILTER} GROUP BY 1, 2 ORDER BY 1"),
        ("table", "Device-day guarantee",
         "What each device's numbers are worth: its mechanism, the most events a window counts (K) "
         "and the (epsilon, delta) its configuration guarantees per device and day (docs/privacy.md).",
         "SELECT device_id, fleet, model_id, mechanism, max_events_per_window, device_day_epsilon, "
         "device_day_delta, windows, last_window_start FROM privacy WHERE fleet IN ($fleet) "
         "ORDER BY device_day_epsilon DESC NULLS FIRST, device_id LIMIT 200"),
        ("table", "Budget left", "Device-day epsilon (and zCDP rho) left in each device's current period, "
         "from its last status.",
         "SELECT device_id, fleet, budget_remaining_epsilon, budget_remaining_rho, budget_exhausted, state "
         "FROM devices WHERE fleet IN ($fleet) ORDER BY budget_remaining_epsilon NULLS LAST LIMIT 200"),
    ]),
}


def panel(i, kind, title, description, sql):
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "targets": [{"refId": "A", "datasource": DS, "editorMode": "code", "format":
                     "time_series" if kind == "timeseries" else "table", "rawQuery": True, "rawSql": sql}],
    }


def main():
    for name, (title, panels) in DASHBOARDS.items():
        dashboard = {
            "uid": f"driftline-{name}",
            "title": title,
            "tags": ["driftline"],
            "timezone": "utc",
            "schemaVersion": 39,
            "time": {"from": "now-3h", "to": "now"},
            "refresh": "30s",
            "templating": {"list": VARIABLES},
            "panels": [panel(i, *p) for i, p in enumerate(panels)],
        }
        (HERE / f"{name}.json").write_text(json.dumps(dashboard, indent=2) + "\n")


if __name__ == "__main__":
    main()
