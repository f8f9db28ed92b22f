"""The SQL endpoint under attack, with real clients (psql for the simple
protocol, psycopg for the extended one, raw sockets before login): writes
hidden in EXPLAIN, SELECT INTO or cursors, engine settings in every
quoting, one connection's settings leaking to another, values built to
exhaust memory, and sockets that never log in. After each, the file
system and the lake are as they were."""

import hashlib
import socket
import subprocess
import time
import urllib.request

import psycopg
import pytest


def lake_files(data):
    """Every file of the lake's tables, with its content hash."""
    tables = [p for p in data.iterdir() if p.is_dir() and not p.name.startswith("_")]
    return {str(f.relative_to(data)): hashlib.sha256(f.read_bytes()).hexdigest()
            for t in tables for f in t.rglob("*") if f.is_file()}


def sqlstate_of(dsn, sql, prepare):
    """The SQLSTATE `sql` fails with through psycopg (extended protocol,
    server-side prepared when `prepare`), or None if it ran."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(sql, prepare=prepare)
        except psycopg.Error as e:
            return e.sqlstate
    return None


def psql(port, sql):
    """psql (simple protocol): (exit status, output)."""
    out = subprocess.run(
        ["psql", f"postgresql://driftline:pw@127.0.0.1:{port}/driftline", "-X", "-A", "-t",
         "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout.strip() + out.stderr.strip()


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_writes_hidden_anywhere_are_refused_and_change_nothing(sql_collector, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    attacks = [
        f"EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{victim}'",
        f"COPY (SELECT 1 AS a) TO '{victim}'",
        f"COPY metrics TO '{tmp_path}/dump'",
        "EXPLAIN ANALYZE INSERT INTO metrics SELECT * FROM metrics LIMIT 3",
        "EXPLAIN INSERT INTO metrics SELECT * FROM metrics LIMIT 3",
        "INSERT INTO metrics SELECT * FROM metrics LIMIT 3",
        "SELECT 42 AS answer INTO t",
        "CREATE TABLE t AS SELECT 42 AS answer",
        "CREATE VIEW v AS SELECT 1",
        "DELETE FROM metrics",
        "DROP TABLE metrics",
        "EXPLAIN SET datafusion.execution.batch_size = 1",
        "PREPARE p AS SELECT 1",
        "COPY metrics FROM STDIN",
        "LISTEN anything",
        "CALL anything()",
    ]
    before = lake_files(sql_collector["data"])
    dsn = sql_collector["dsn"]
    for sql in attacks:
        code, out = psql(sql_collector["port"], sql)
        assert code != 0 and "read-only" in out, f"psql {sql}: {out}"
        for prepare in (False, True):
            assert sqlstate_of(dsn, sql, prepare) == "25006", f"{sql} (prepare={prepare})"
    # A cursor over a write is refused the same way.
    with psycopg.connect(dsn) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("DECLARE c CURSOR FOR SELECT 42 AS answer INTO t2")
        assert e.value.sqlstate == "25006", e.value
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "dump").exists() and not (tmp_path / "x.csv").exists()
    assert lake_files(sql_collector["data"]) == before
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == sql_collector["windows"]
        for table in ("t", "t2", "v", "x"):
            with pytest.raises(psycopg.Error):
                conn.execute(f"SELECT * FROM {table}")


@pytest.mark.parametrize("setting", [
    "datafusion.runtime.memory_limit = '1K'",
    "\"datafusion\".runtime.memory_limit = '1K'",
    "\"datafusion\".\"runtime\".\"memory_limit\" TO '16G'",
    "DATAFUSION.EXECUTION.TIME_ZONE = '-03:00'",
    "\"datafusion\".execution.time_zone = '-03:00'",
    "datafusion.runtime.temp_directory = '/tmp/elsewhere'",
    "SESSION datafusion.execution.batch_size TO 1",
])
def test_engine_settings_are_refused_in_every_quoting(sql_collector, setting):
    dsn = sql_collector["dsn"]
    for prepare in (False, True):
        assert sqlstate_of(dsn, f"SET {setting}", prepare) == "25006"
    code, out = psql(sql_collector["port"], f"SET {setting}")
    assert code != 0 and "read-only" in out, out
    # Every connection still has the server's settings.
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = conn.execute("SELECT count(DISTINCT device_id) FROM metrics").fetchone()[0]
        assert n == 4
        assert conn.execute("SHOW timezone").fetchone()[0] == "UTC"


def test_settings_are_per_connection(sql_collector):
    dsn = sql_collector["dsn"]
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        a.execute("SET TIME ZONE '-03:00'")
        a.execute("SET application_name = 'analyst-a'")
        a.execute("SET statement_timeout = '300ms'")
        assert a.execute("SHOW timezone").fetchone()[0] == "-03:00"
        assert a.execute("SELECT current_setting('timezone')").fetchone()[0] == "-03:00"
        assert b.execute("SELECT current_setting('timezone')").fetchone()[0] == "UTC"
        assert a.execute("SHOW application_name").fetchone()[0] == "analyst-a"
        assert a.info.parameter_status("TimeZone") == "-03:00"
        assert b.execute("SHOW timezone").fetchone()[0] == "UTC"
        assert b.execute("SHOW application_name").fetchone()[0] == ""
        # now() in each connection's own zone, in both protocols.
        for prepare in (False, True):
            a_now = a.execute("SELECT CAST(now() AS VARCHAR)", prepare=prepare).fetchone()[0]
            b_now = b.execute("SELECT CAST(now() AS VARCHAR)", prepare=prepare).fetchone()[0]
            assert a_now.endswith("-03:00"), a_now
            assert not b_now.endswith("-03:00"), b_now
        # A's lower time limit stops A's runaway query, not B's work.
        runaway = ("SELECT sum(a.seq * b.x) FROM metrics a "
                   "CROSS JOIN generate_series(1, 100000000000) AS b(x)")
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as e:
            a.execute(runaway)
        assert e.value.sqlstate == "57014"
        assert time.monotonic() - started < 5
        assert b.execute("SELECT count(*) FROM metrics").fetchone()[0] == sql_collector["windows"]
        # Raising the limit above the server's (10 s) does not.
        a.execute("SET statement_timeout = '1h'")
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as e:
            a.execute(runaway)
        assert e.value.sqlstate == "57014"
        assert 8 < time.monotonic() - started < 30
        # RESET and DISCARD ALL return to the start.
        a.execute("RESET timezone")
        assert a.execute("SHOW timezone").fetchone()[0] == "UTC"
        a.execute("SET TIME ZONE 'Europe/Berlin'")
        a.execute("DISCARD ALL")
        assert a.execute("SHOW timezone").fetchone()[0] == "UTC"
        for bad, state in [("SET timezone = 'Mars/Olympus'", "22023"),
                           ("SET no_such_parameter = 1", "42704"),
                           ("SET server_version = '9.0'", "55P02")]:
            with pytest.raises(psycopg.Error) as e:
                a.execute(bad)
            assert e.value.sqlstate == state, bad


def test_values_built_to_exhaust_memory_are_refused(sql_collector):
    dsn = sql_collector["dsn"]
    pid = sql_collector["pid"]
    bombs = [
        "SELECT length(repeat('x', 1500000000))",
        "SELECT length(lpad('x', 1500000000, 'y'))",
        "SELECT cardinality(array_repeat(1, 1000000000))",
        "SELECT cardinality(range(1, 100000000000))",
        # One call over a column: 40 rows of 8 MB.
        "SELECT sum(length(repeat(device_id, 1600000))) FROM metrics",
        "SELECT length(concat(repeat('x', 40000000), repeat('y', 40000000)))",
        # A constant is copied into every row of a batch.
        "SELECT repeat('x', 60000000) AS r FROM metrics",
        "DECLARE c CURSOR FOR SELECT repeat('x', 60000000) FROM metrics",
    ]
    peak = peak_rss_bytes(pid)
    for sql in bombs:
        for prepare in (False, True):
            started = time.monotonic()
            assert sqlstate_of(dsn, sql, prepare) == "54000", sql
            assert time.monotonic() - started < 5, sql
    grown = peak_rss_bytes(pid) - peak
    assert grown < 400 << 20, f"peak RSS grew by {grown >> 20} MiB"
    # An aggregate that grows with its rows is stopped by the memory pool
    # (53200) or the value limit (54000), not by the machine.
    agg = ("SELECT length(string_agg(repeat('x', 60000000), ',')) "
           "FROM generate_series(1, 64)")
    assert sqlstate_of(dsn, agg, False) in ("53200", "54000")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT length(repeat('ab', 1000))").fetchone()[0] == 2000
    assert 'driftline_sql_errors_total{sqlstate="54000"}' in metrics(sql_collector["metrics_port"])


def test_sockets_that_never_log_in_lock_nobody_out(sql_collector):
    port = sql_collector["port"]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        # 8 idle sockets, 8 connection slots: a real user still logs in,
        # as many times as there are slots.
        conns = [psycopg.connect(sql_collector["dsn"], autocommit=True) for _ in range(8)]
        try:
            assert conns[0].execute("SELECT 1").fetchone()[0] == 1
            with pytest.raises(psycopg.OperationalError) as e:
                psycopg.connect(sql_collector["dsn"])
            assert "too many clients" in str(e.value)
        finally:
            for c in conns:
                c.close()
        # The idle sockets are closed once the login time (3 s) is up.
        for s in idle:
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    # One address cannot hold more than 16 connections in login.
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        time.sleep(0.5)
        closed = 0
        for s in flood:
            s.settimeout(0.2)
            try:
                if s.recv(1024)[:1] in (b"E", b""):
                    closed += 1
            except TimeoutError:
                pass
        assert closed >= 4, closed
    finally:
        for s in flood:
            s.close()
    text = metrics(sql_collector["metrics_port"])
    assert 'driftline_sql_refused_connections_total{reason="login_timeout"}' in text
    assert 'driftline_sql_connections{state="active"}' in text


def test_failed_logins_are_delayed_and_counted(sql_collector):
    dsn = sql_collector["dsn"].replace("password=pw", "password=wrong")
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(dsn)
    assert time.monotonic() - started >= 1.0
    assert "password authentication failed" in str(e.value)
    assert "driftline_sql_failed_logins_total" in metrics(sql_collector["metrics_port"])
