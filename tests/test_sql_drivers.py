"""The drivers and tools analysts reach the SQL endpoint with: SQLAlchemy 2
(the postgresql+psycopg dialect) with pandas, psql's catalog commands,
PgJDBC, and the Go drivers behind Grafana's data source (pgx v4, lib/pq).
Each connects, runs Grafana-shaped SQL with bound parameters and reflects
the `metrics` table."""

import subprocess
from datetime import datetime, timedelta, timezone

import pandas
import pytest
import sqlalchemy

from harness import ROOT


@pytest.fixture(scope="module")
def engine(sql_collector):
    url = f"postgresql+psycopg://driftline:pw@127.0.0.1:{sql_collector['port']}/driftline"
    engine = sqlalchemy.create_engine(url)
    yield engine
    engine.dispose()


def test_sqlalchemy_connects_and_reads_the_version(engine):
    with engine.connect() as conn:
        version = conn.execute(sqlalchemy.text("SELECT version()")).scalar()
        assert version.startswith("PostgreSQL 16.")
        assert "Driftline" in version and "DataFusion" in version
    assert engine.dialect.server_version_info[:1] == (16,)


def test_pandas_reads_a_query_with_bound_datetimes(engine, sql_collector):
    since = datetime.now(timezone.utc) - timedelta(days=1)
    frame = pandas.read_sql(
        sqlalchemy.text(
            "SELECT model_id, model_version, count(*) AS windows, sum(inference_count) AS inferences "
            "FROM metrics WHERE window_start >= :since AND fleet = :fleet "
            "GROUP BY model_id, model_version ORDER BY model_id"),
        engine, params={"since": since, "fleet": "sql"})
    assert list(frame.columns) == ["model_id", "model_version", "windows", "inferences"]
    assert frame["windows"].sum() == sql_collector["windows"]
    assert frame["inferences"].sum() == 3 * sql_collector["windows"]
    # A time series as a dashboard reads it, with a timestamp index.
    series = pandas.read_sql(
        sqlalchemy.text(
            "SELECT window_start AS time, sum(inference_count) AS value FROM metrics "
            "WHERE window_start BETWEEN :start AND :end GROUP BY 1 ORDER BY 1"),
        engine, params={"start": since, "end": datetime.now(timezone.utc)},
        index_col="time", parse_dates=["time"])
    assert len(series) == 10
    assert str(series.index.dtype).startswith("datetime64")


def test_sqlalchemy_reflects_the_lake(engine):
    inspector = sqlalchemy.inspect(engine)
    tables = inspector.get_table_names()
    for table in ("metrics", "status", "quarantine", "drift_events"):
        assert table in tables, tables
    assert "devices" in inspector.get_view_names()
    columns = {c["name"]: c for c in inspector.get_columns("metrics")}
    assert isinstance(columns["window_start"]["type"], sqlalchemy.types.TIMESTAMP)
    assert columns["window_start"]["type"].timezone
    assert isinstance(columns["device_id"]["type"], sqlalchemy.types.String)
    assert isinstance(columns["seq"]["type"], sqlalchemy.types.BigInteger)
    assert inspector.get_pk_constraint("metrics")["constrained_columns"] == []
    assert inspector.get_indexes("metrics") == []


def test_pandas_reads_a_whole_table(engine, sql_collector):
    frame = pandas.read_sql_table("metrics", engine, columns=["device_id", "window_start", "seq"])
    assert len(frame) == sql_collector["windows"]
    assert str(frame["window_start"].dtype).startswith("datetime64")


def test_a_read_only_transaction_with_savepoints(engine):
    with engine.connect() as conn:
        with conn.begin():
            with conn.begin_nested():
                assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
            # A failed statement inside a savepoint does not end the
            # transaction once it is rolled back to.
            nested = conn.begin_nested()
            with pytest.raises(sqlalchemy.exc.DBAPIError):
                conn.execute(sqlalchemy.text("SELECT * FROM no_such_table"))
            nested.rollback()
            assert conn.execute(sqlalchemy.text("SELECT 2")).scalar() == 2


@pytest.mark.parametrize("command, expected", [
    ("\\dt", "metrics"),
    ("\\d metrics", "window_start"),
    ("\\dv", "devices"),
    ("\\df", "List of functions"),
])
def test_psql_catalog_commands(sql_collector, command, expected):
    out = subprocess.run(
        ["psql", f"postgresql://driftline:pw@127.0.0.1:{sql_collector['port']}/driftline",
         "-X", "-c", command],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout, out.stdout


POSTGRES_JAR = "/usr/share/java/postgresql.jar"
GOPATH = "/usr/share/gocode"


def test_jdbc_metadata_and_prepared_timestamps(sql_collector):
    """PgJDBC (Debian's libpostgresql-jdbc-java), as DBeaver or a BI tool
    uses it: see tests/drivers/JdbcClient.java."""
    url = f"jdbc:postgresql://127.0.0.1:{sql_collector['port']}/driftline?user=driftline&password=pw"
    out = subprocess.run(
        ["java", "-cp", POSTGRES_JAR, str(ROOT / "tests/drivers/JdbcClient.java"), url,
         str(sql_collector["windows"])],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok prepared timestamp query, run 6" in out.stdout, out.stdout


def test_go_drivers_grafana_uses(sql_collector, tmp_path):
    """pgx v4 (native and database/sql) and lib/pq, built offline from
    Debian's packages in GOPATH mode: see tests/drivers/goclient.go."""
    env = {"GO111MODULE": "off", "GOPATH": GOPATH, "GOCACHE": str(tmp_path / "cache"),
           "HOME": str(tmp_path), "PATH": "/usr/bin:/bin:/usr/lib/go/bin"}
    binary = tmp_path / "goclient"
    built = subprocess.run(["go", "build", "-o", str(binary), str(ROOT / "tests/drivers/goclient.go")],
                           capture_output=True, text=True, env=env, timeout=600)
    assert built.returncode == 0, built.stderr
    dsn = f"postgres://driftline:pw@127.0.0.1:{sql_collector['port']}/driftline?sslmode=disable"
    out = subprocess.run([str(binary), dsn, str(sql_collector["windows"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok postgres SELECT INTO refused" in out.stdout, out.stdout
