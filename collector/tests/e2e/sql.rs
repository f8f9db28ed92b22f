//! The SQL endpoint and `query` over the lake: PostgreSQL clients, edge
//! sets, lakes written by earlier releases.

use super::*;

/// A connection string for the SQL endpoint on `port`.
fn pg_dsn(port: u16, password: &str) -> String {
    format!("host=127.0.0.1 port={port} user=driftline password={password} dbname=driftline")
}

/// The SQLSTATE of a failed statement or connection.
fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no code: {e}"))
}

async fn pg_connect(
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&pg_dsn(port, password), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[test]
fn sql_endpoint_answers_psql_psycopg_tokio_postgres_and_grafana() {
    let broker = Mosquitto::start();
    let data = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let metrics_port = free_port();
    let collector = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-sql",
        &[
            "--pg-listen",
            &format!("127.0.0.1:{port}"),
            "--pg-password",
            "pw",
            "--pg-statement-timeout",
            "10s",
            "--pg-max-connections",
            "4",
            "--pg-memory-mb",
            "16",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let (devices, windows) = (20u32, 12u64);
    simulate_in_background(sim_config(broker.url(), devices, 1, windows, 3))
        .join()
        .expect("simulator");
    let expected = u64::from(devices) * windows;
    assert_eq!(
        wait_for_rows(data.path(), expected, Duration::from_secs(30)).0,
        expected
    );
    wait_for_port(port, "SQL endpoint");

    // psql, simple protocol.
    let url = format!("postgresql://driftline:pw@127.0.0.1:{port}/driftline");
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([
                url.as_str(),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql must be installed (package postgresql-client)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = psql("SELECT count(*) AS n FROM metrics");
    assert!(ok, "psql: {err}");
    assert_eq!(out, expected.to_string());
    let (ok, _, err) = psql("DROP TABLE metrics");
    assert!(!ok && err.contains("read-only"), "DROP refused: {err}");

    // psycopg 3, extended protocol with server-side binding.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/psycopg_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!(
            "host=127.0.0.1 port={port} user=driftline password=pw dbname=driftline"
        ))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "psycopg: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = pg_connect(port, "pw").await.expect("connect");

        // Binary results of every type the lake has, and NULLs.
        let rows = client
            .query(
                "SELECT device_id, window_start, epsilon, seq, window_secs, \
                 mechanism = 'laplace' AS laplace, rho, latency_ms_b15 \
                 FROM metrics ORDER BY device_id, window_start LIMIT 5",
                &[],
            )
            .await
            .expect("typed query");
        assert_eq!(rows.len(), 5);
        let first = &rows[0];
        let device: String = first.get(0);
        let start: DateTime<Utc> = first.get(1);
        assert!(Utc::now() - start < TimeDelta::hours(2), "{start}");
        assert_eq!(first.get::<_, f64>(2), 60.0);
        assert!(first.get::<_, i64>(3) >= 0);
        assert_eq!(first.get::<_, i32>(4), 60);
        assert!(first.get::<_, bool>(5));
        assert_eq!(first.get::<_, Option<f64>>(6), None);
        let _: Option<i64> = first.get(7);

        // Parameters of several types.
        let since = Utc::now() - TimeDelta::days(1);
        let n: i64 = client
            .query_one(
                "SELECT count(*) AS n FROM metrics WHERE device_id = $1 AND window_start >= $2 AND epsilon > $3",
                &[&device, &since, &0.5f64],
            )
            .await
            .expect("parameters")
            .get(0);
        assert_eq!(n, windows as i64);

        // What Grafana's PostgreSQL data source sends.
        let health = client.simple_query("SELECT 1").await.expect("health check");
        assert!(!health.is_empty());
        let tables: Vec<String> = client
            .query(
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = 'public' ORDER BY table_name",
                &[],
            )
            .await
            .expect("tables")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for t in ["devices", "metrics", "quarantine", "status"] {
            assert!(tables.iter().any(|x| x == t), "{t} in {tables:?}");
        }
        let types: Vec<(String, String)> = client
            .query(
                "SELECT column_name, data_type FROM information_schema.columns \
                 WHERE table_name = 'metrics' AND column_name IN ('window_start', 'device_id', 'epsilon', 'seq') \
                 ORDER BY column_name",
                &[],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            types,
            [
                ("device_id", "text"),
                ("epsilon", "double precision"),
                ("seq", "bigint"),
                ("window_start", "timestamp with time zone"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        let search_path: String = client
            .query_one("SELECT current_setting('search_path') AS p", &[])
            .await
            .expect("current_setting")
            .get(0);
        assert!(search_path.contains("public"));
        let tz = client.simple_query("SHOW timezone").await.expect("SHOW timezone");
        let tz = tz.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(tz.as_deref(), Some("UTC"));
        let from = (Utc::now() - TimeDelta::hours(6)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let to = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let series = client
            .query(
                &format!(
                    "SELECT floor(extract(epoch from window_start)/300)*300 AS \"time\", \
                     model_id AS metric, sum(inference_count) AS value FROM metrics \
                     WHERE window_start BETWEEN '{from}' AND '{to}' GROUP BY 1, 2 ORDER BY 1"
                ),
                &[],
            )
            .await
            .expect("time series");
        assert!(!series.is_empty());

        // Writes of every kind are refused with SQLSTATE 25006.
        for sql in [
            "CREATE TABLE t (a int)",
            "INSERT INTO metrics (device_id) VALUES ('x')",
            "DELETE FROM metrics",
            "COPY metrics TO STDOUT",
            "CREATE VIEW v AS SELECT 1",
            "SET datafusion.execution.batch_size = 1",
        ] {
            let e = client.batch_execute(sql).await.expect_err(sql);
            assert_eq!(sqlstate(&e), "25006", "{sql}: {e}");
            let e = client.query(sql, &[]).await.expect_err(sql);
            assert_eq!(sqlstate(&e), "25006", "{sql} (extended): {e}");
        }

        // A runaway query is cancelled by the time limit ...
        let started = Instant::now();
        let e = client
            .query("SELECT sum(a.seq * b.x) AS n FROM metrics a CROSS JOIN generate_series(1, 100000000000) AS b(x)", &[])
            .await
            .expect_err("runaway query");
        assert_eq!(sqlstate(&e), "57014", "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
        // ... and the server is healthy: the same and a new connection work.
        let one: i64 = client.query_one("SELECT 1::bigint AS one", &[]).await.expect("after timeout").get(0);
        assert_eq!(one, 1);
        // The client's cancel request (what psql sends on Ctrl-C) stops a
        // running statement before its time limit, in both protocols.
        for extended in [false, true] {
            let token = client.cancel_token();
            let canceller = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                token.cancel_query(tokio_postgres::NoTls).await
            });
            let runaway = "SELECT sum(a.seq * b.x) AS n FROM metrics a CROSS JOIN generate_series(1, 100000000000) AS b(x)";
            let e = if extended {
                client.query(runaway, &[]).await.map(drop).expect_err("cancelled")
            } else {
                client.simple_query(runaway).await.map(drop).expect_err("cancelled")
            };
            let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
            assert_eq!(sqlstate(&e), "57014", "{e}");
            assert_eq!(message, "canceling statement due to user request");
            canceller.await.expect("canceller").expect("cancel request sent");
        }
        let one: i64 = client.query_one("SELECT 1::bigint AS one", &[]).await.expect("after cancel").get(0);
        assert_eq!(one, 1);
        let other = pg_connect(port, "pw").await.expect("new connection");
        other.simple_query("SELECT 1").await.expect("new connection query");

        // A query that needs more memory than the pool has fails cleanly.
        let e = client
            .query(
                "SELECT count(*) AS n FROM (SELECT DISTINCT a.device_id || b.device_id || c.device_id || \
                 CAST(a.seq AS VARCHAR) || CAST(b.seq AS VARCHAR) AS k \
                 FROM metrics a, metrics b, metrics c) t",
                &[],
            )
            .await
            .expect_err("over the memory limit");
        let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
        assert_eq!(sqlstate(&e), "53200", "{message}");
        assert!(message.contains("Resources exhausted"), "{message}");
        let one: i64 = client.query_one("SELECT 1::bigint AS one", &[]).await.expect("after memory error").get(0);
        assert_eq!(one, 1);

        // Wrong password.
        let e = pg_connect(port, "wrong").await.expect_err("wrong password refused");
        assert_eq!(sqlstate(&e), "28P01", "{e}");

        // The connection limit (4): two open, two more fit, the fifth is refused.
        let c3 = pg_connect(port, "pw").await.expect("third");
        let c4 = pg_connect(port, "pw").await.expect("fourth");
        let e = pg_connect(port, "pw").await.expect_err("fifth refused");
        assert_eq!(sqlstate(&e), "53300", "{e}");
        drop((c3, c4));
    });
    // Each refusal (psql's DROP, psycopg's CREATE TABLE, 6 statements in
    // both protocols), time-out, cancel and memory error above is counted once.
    let metrics = http_get(metrics_port, "/metrics");
    for line in [
        "driftline_sql_refused_total 14",
        "driftline_sql_errors_total{sqlstate=\"57014\"} 4",
        "driftline_sql_errors_total{sqlstate=\"53200\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(
        metrics.contains("driftline_sql_statements_total{protocol=\"extended\"}"),
        "{metrics}"
    );
    collector.terminate();
}

#[test]
fn histogram_edges_are_stored_once_per_version_and_derived_for_older_lakes() {
    use driftline_collector::ingest::{Ingest, IngestLimits};
    use driftline_collector::lake::LakeWriter;
    let data = tempfile::tempdir().expect("tempdir");
    let lake = LakeWriter::open(data.path()).expect("lake");
    let today = DateTime::from_timestamp(Utc::now().timestamp() / 86_400 * 86_400, 0).expect("ts");
    let yesterday = today - TimeDelta::days(1);
    let received = Utc::now();
    let latency = [0, 0, 0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let input = [0, 0, 0, 0, 10, 20, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let confidence = [0, 0, 0, 0, 0, 0, 5, 10, 15, 10];
    // Version 1 on both days, its latency edges changed today (a new
    // agent configuration); version 2 only today. Each device sends two
    // windows a day, in two flushes.
    let window = |device: &str, version: &str, start: DateTime<Utc>, seq: u64, coarse: bool| {
        let text = fixture_window(
            device, "m", version, start, seq, latency, confidence, input, 0, 0,
        );
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("fixture");
        if coarse {
            v["latency_ms"] =
                serde_json::json!({"edges": [0, 10, 100, 1000], "counts": [10, 20, 10]});
            v["inference_count"] = serde_json::json!(40);
        }
        v.to_string()
    };
    for flush in 0..2u64 {
        let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Default::default()));
        for d in 0..3 {
            let device = format!("dev-{d}");
            let topic = format!("driftline/v1/golden/{device}/metrics");
            let offset = TimeDelta::minutes(15 * flush as i64);
            for (version, start, coarse) in [
                ("1", yesterday + offset, false),
                ("1", today + offset, true),
                ("2", today + offset, false),
            ] {
                let msg = window(
                    &device,
                    version,
                    start,
                    flush * 3 + u64::from(coarse),
                    coarse,
                );
                assert!(
                    matches!(
                        ingest.handle(&topic, msg.as_bytes(), received),
                        driftline_collector::ingest::Outcome::Accepted
                    ),
                    "{msg}"
                );
            }
        }
        ingest.flush(&lake).expect("flush");
    }
    let sets = "SELECT date, model_version, array_to_string(latency_ms_edges, ' ') \
                FROM histogram_edge_sets ORDER BY 1, 2";
    let default_edges = "0 1 2 5 10 20 50 100 200 500 1000 2000 5000 10000 20000 50000 100000";
    let day = |t: DateTime<Utc>| t.format("%Y-%m-%d").to_string();
    let row = |cells: &[&str]| cells.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let expected_sets = vec![
        row(&[&day(yesterday), "1", default_edges]),
        row(&[&day(today), "1", "0 10 100 1000"]),
        row(&[&day(today), "2", default_edges]),
    ];
    // 18 windows in two flushes: one row per distinct set and date.
    assert_eq!(query(data.path(), sets), expected_sets);
    // Version 1 ran with two edge sets: the view says so.
    let view = "SELECT model_version, array_to_string(latency_ms_edges, ' '), \
                array_to_string(confidence_edges, ' '), edge_sets FROM histogram_edges ORDER BY 1";
    let confidence_edges = "0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1";
    let expected_view = vec![
        row(&["1", "0 10 100 1000", confidence_edges, "2"]),
        row(&["2", default_edges, confidence_edges, "1"]),
    ];
    assert_eq!(query(data.path(), view), expected_view);
    // model_windows takes each window's latency mean from those edges:
    // today's version 1 windows are 10/20/10 in [0,10), [10,100),
    // [100,1000) ms: (10*5 + 20*55 + 10*550) / 40.
    let mean = query(
        data.path(),
        &format!(
            "SELECT round(latency_mean_ms, 3) FROM model_windows \
             WHERE model_version = '1' AND window_start = '{}'",
            today.to_rfc3339()
        ),
    );
    assert_eq!(mean, vec![row(&["166.25"])]);

    // A lake written before the edge sets existed: the partitions are
    // gone, and the next maintenance pass derives them from `metrics`.
    for entry in std::fs::read_dir(data.path().join("histogram_edge_sets")).expect("dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("unlink partition");
    }
    let generations = data.path().join("_driftline/gens/histogram_edge_sets");
    std::fs::remove_dir_all(generations).expect("remove generations");
    assert_eq!(query(data.path(), sets), Vec::<Vec<String>>::new());
    let out = collector_cli(&["compact"], data.path());
    for t in [yesterday, today] {
        assert!(
            out.contains(&format!("derived histogram_edge_sets/date={}", day(t))),
            "{out}"
        );
    }
    assert_eq!(query(data.path(), sets), expected_sets);
    assert_eq!(query(data.path(), view), expected_view);
    // Nothing left to derive.
    assert!(!collector_cli(&["compact"], data.path()).contains("derived"));
}

/// Files written before `metrics` gained the device-day columns still
/// compact with newer ones, and read as nulls there.
#[test]
fn a_lake_from_before_the_device_day_columns_compacts_and_reads() {
    use driftline_collector::lake::schema::{self, StoredWindow};
    use driftline_collector::lake::{LakeWriter, METRICS};

    let data = tempfile::tempdir().expect("tempdir");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/v1/valid/laplace.json");
    let report = driftline_core::wire::decode(&std::fs::read(fixture).expect("fixture"))
        .expect("valid fixture");
    let date = report.window_start.format("%Y-%m-%d").to_string();
    let stored = |device: &str, k: Option<u32>| {
        let mut r = report.clone();
        r.device_id = device.into();
        r.privacy.max_events_per_window = k;
        r.privacy.device_day_epsilon = k.map(|_| 8.0);
        r.privacy.device_day_delta = k.map(|_| 1e-6);
        StoredWindow {
            received_at: Utc::now(),
            report: r,
        }
    };
    let new = schema::metrics_batch(&[stored("new-agent", Some(10))]).expect("batch");
    let full = schema::metrics_batch(&[stored("old-agent", None)]).expect("batch");
    let kept: Vec<usize> = (0..full.num_columns())
        .filter(|&i| {
            let name = full.schema().field(i).name().clone();
            ![
                "max_events_per_window",
                "device_day_epsilon",
                "device_day_delta",
            ]
            .contains(&name.as_str())
        })
        .collect();
    let old = full.project(&kept).expect("the old schema");
    let writer = LakeWriter::open(data.path()).expect("lake");
    writer.append(METRICS, &date, &old).expect("old file");
    writer.append(METRICS, &date, &new).expect("new file");
    let compacted = writer.compact_all(2, Duration::ZERO).expect("compaction");
    assert!(
        compacted.iter().any(|c| c.table == METRICS),
        "{compacted:?}"
    );
    let out = collector_cli(
        &[
            "query",
            "--format",
            "csv",
            "SELECT device_id, max_events_per_window, device_day_epsilon FROM metrics ORDER BY device_id",
        ],
        data.path(),
    );
    assert_eq!(
        out.trim(),
        "device_id,max_events_per_window,device_day_epsilon\nnew-agent,10,8.0\nold-agent,,"
    );
    let privacy = collector_cli(
        &[
            "query",
            "--format",
            "csv",
            "SELECT device_id, max_events_per_window, device_day_epsilon, windows FROM privacy ORDER BY device_id",
        ],
        data.path(),
    );
    assert_eq!(privacy.trim(), "device_id,max_events_per_window,device_day_epsilon,windows\nnew-agent,10,8.0,1\nold-agent,,,1");
}
