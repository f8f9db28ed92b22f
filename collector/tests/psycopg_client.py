"""psycopg 3 against the collector's SQL endpoint (extended protocol).

Run by collector/tests/e2e/sql.rs with the endpoint's DSN as the only argument;
exits non-zero with a message on the first failed check.
"""

import datetime
import sys
import threading

import psycopg


def main(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        # Parameters, bound by the server (extended protocol).
        device = conn.execute("SELECT min(device_id) AS d FROM metrics").fetchone()[0]
        n = conn.execute(
            "SELECT count(*) AS n FROM metrics WHERE device_id = %s AND seq >= %s",
            (device, 0),
        ).fetchone()[0]
        assert n > 0, f"no rows for {device}"

        # Named server-side statements, text and binary results.
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            cur.execute(
                "SELECT device_id, window_start, epsilon, seq, mechanism = 'laplace' AS laplace, "
                "rho, inference_count FROM metrics WHERE device_id = %s "
                "ORDER BY window_start LIMIT 3",
                (device,),
                prepare=True,
            )
            rows = cur.fetchall()
            assert len(rows) == 3, rows
            dev, start, eps, seq, laplace, rho, count = rows[0]
            assert dev == device
            assert isinstance(start, datetime.datetime) and start.utcoffset() == datetime.timedelta(0), start
            assert eps == 60.0 and isinstance(eps, float), eps
            assert isinstance(seq, int) and isinstance(count, int), (seq, count)
            assert laplace is True
            assert rho is None

        # A timestamptz parameter.
        since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        recent = conn.execute(
            "SELECT count(*) AS n FROM metrics WHERE window_start >= %s", (since,)
        ).fetchone()[0]
        assert recent == conn.execute("SELECT count(*) AS n FROM metrics").fetchone()[0]

        # Writes are refused with SQLSTATE 25006, and the session goes on.
        try:
            conn.execute("CREATE TABLE scratch (a int)")
            raise SystemExit("CREATE TABLE was accepted")
        except psycopg.errors.ReadOnlySqlTransaction:
            conn.rollback()
        assert conn.execute("SELECT 1 AS one").fetchone()[0] == 1

        # A cancel request (what interrupting a notebook cell sends) stops a
        # runaway statement long before the time limit, with SQLSTATE 57014.
        cancel = getattr(conn, "cancel_safe", conn.cancel)
        timer = threading.Timer(0.5, cancel)
        timer.start()
        try:
            conn.execute("SELECT sum(a.seq * b.x) AS n FROM metrics a "
                         "CROSS JOIN generate_series(1, 100000000000) AS b(x)").fetchone()
            raise SystemExit("the runaway statement was not cancelled")
        except psycopg.errors.QueryCanceled as e:
            assert "user request" in str(e), e
            conn.rollback()
        finally:
            timer.cancel()
        assert conn.execute("SELECT 1 AS one").fetchone()[0] == 1


if __name__ == "__main__":
    main(sys.argv[1])
    print("psycopg: ok")
