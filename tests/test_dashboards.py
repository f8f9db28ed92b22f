"""Every Grafana panel's SQL, expanded the way Grafana's PostgreSQL data
source expands its macros and template variables for the last 3 hours, runs
against a collector filled by the demo's simulated fleet (with its drift),
and returns rows. The dashboard JSON is checked too."""

import json
import re
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from harness import COLLECTOR, ROOT, free_port

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A demo (60 devices, 90 minutes of backfill with a latency drift) and
    its SQL endpoint, once the drift has been detected and a job opened."""
    assert COLLECTOR.exists(), f"build the collector first (cargo build): {COLLECTOR}"
    port = free_port()
    data = tmp_path_factory.mktemp("lake")
    demo = subprocess.Popen(
        [str(COLLECTOR), "demo", "--duration", "240s", "--devices", "60",
         "--pg-listen", f"127.0.0.1:{port}", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dsn = f"host=127.0.0.1 port={port} user=driftline password=driftline dbname=driftline"
    deadline = time.time() + 200
    ready = False
    while time.time() < deadline and demo.poll() is None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                jobs = conn.execute("SELECT count(*) AS n FROM retrain_jobs").fetchone()[0]
                if jobs > 0:
                    ready = True
                    break
        except psycopg.OperationalError:
            pass
        time.sleep(2)
    try:
        assert ready, "the demo never opened a retraining job"
        yield dsn
    finally:
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=60)
        assert demo.returncode == 0, out


def expand(sql, variables, start, end):
    """Grafana's PostgreSQL macros and template variables."""
    def seconds(interval):
        interval = interval.strip().strip("'")
        if interval == "$__interval":
            interval = "1m"
        n, unit = int(interval[:-1]), interval[-1]
        return n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]

    fmt = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")
    sql = re.sub(r"\$__timeGroupAlias\(([^,]+),\s*([^)]+)\)",
                 lambda m: f'floor(extract(epoch from {m[1]})/{seconds(m[2])})*{seconds(m[2])} AS "time"', sql)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)",
                 lambda m: f"{m[1]} BETWEEN '{fmt(start)}' AND '{fmt(end)}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{fmt(start)}'").replace("$__timeTo()", f"'{fmt(end)}'")
    sql = sql.replace("$__interval", "'1m'")
    for name, values in variables.items():
        sql = sql.replace(f"${name}", ",".join("'" + v.replace("'", "''") + "'" for v in values))
    return sql


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_json_is_well_formed(path):
    d = json.loads(path.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert d["uid"].startswith("driftline-")
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert t["rawSql"].strip()
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "fleet", "model", "version"]


def test_generated_dashboards_are_committed():
    before = {p: p.read_text() for p in DASHBOARDS}
    subprocess.run(["python3", str(ROOT / "dashboards/generate.py")], check=True)
    after = {p: p.read_text() for p in DASHBOARDS}
    assert before == after, "run python3 dashboards/generate.py and commit"


def test_every_panel_returns_rows(endpoint):
    end = datetime.now(timezone.utc)
    start = end - timedelta(hours=3)
    with psycopg.connect(endpoint, autocommit=True) as conn:
        # Template variables, by their own queries (dependencies first).
        template = json.loads(DASHBOARDS[0].read_text())["templating"]["list"]
        variables = {}
        for v in template:
            if v["type"] != "query":
                continue
            rows = conn.execute(expand(v["query"], variables, start, end)).fetchall()
            assert rows, f"variable {v['name']} has no values"
            variables[v["name"]] = [r[0] for r in rows]
        failures = []
        for path in DASHBOARDS:
            for panel in json.loads(path.read_text())["panels"]:
                for target in panel["targets"]:
                    sql = expand(target["rawSql"], variables, start, end)
                    try:
                        rows = conn.execute(sql).fetchall()
                    except psycopg.Error as e:
                        failures.append(f"{path.stem}/{panel['title']}: {e}")
                        continue
                    if not rows:
                        failures.append(f"{path.stem}/{panel['title']}: no rows")
        assert not failures, "\n".join(failures)


def test_histogram_panels_agree_with_each_rows_edges(endpoint):
    """The latency and confidence panels take edges from `histogram_edges`;
    reading them from every metrics row gives the same series."""
    end = datetime.now(timezone.utc)
    start = end - timedelta(hours=3)
    panels = {p["title"]: p["targets"][0]["rawSql"]
              for p in json.loads((ROOT / "dashboards/model-quality.json").read_text())["panels"]}
    every_row = {
        "Median latency (ms)":
            "hist_quantile(first_value(latency_ms_edges), make_array("
            + ", ".join(f"sum(latency_ms_b{i:02})" for i in range(16)) + "), 0.5)",
        "Mean confidence":
            "hist_mean(first_value(confidence_edges), make_array("
            + ", ".join(f"sum(confidence_b{i:02})" for i in range(10)) + "))",
    }
    with psycopg.connect(endpoint, autocommit=True) as conn:
        models = [r[0] for r in conn.execute("SELECT DISTINCT model_id FROM metrics").fetchall()]
        versions = [r[0] for r in conn.execute("SELECT DISTINCT model_version FROM metrics").fetchall()]
        fleets = [r[0] for r in conn.execute("SELECT DISTINCT fleet FROM metrics").fetchall()]
        variables = {"fleet": fleets, "model": models, "version": versions}
        for title, value in every_row.items():
            reference = expand(
                "SELECT $__timeGroupAlias(window_start, '5m'), model_id || ' ' || model_version AS metric, "
                f"{value} AS v FROM metrics WHERE $__timeFilter(window_start) GROUP BY 1, 2 ORDER BY 1, 2",
                variables, start, end)
            panel = f"SELECT * FROM ({expand(panels[title], variables, start, end)}) p ORDER BY 1, 2"
            want = conn.execute(reference).fetchall()
            got = conn.execute(panel).fetchall()
            assert len(want) > 10, title
            assert [r[:2] for r in got] == [r[:2] for r in want], title
            for g, w in zip(got, want):
                if w[2] is None:
                    assert g[2] is None, (title, g, w)
                else:
                    assert g[2] == pytest.approx(w[2], rel=1e-9), (title, g, w)
