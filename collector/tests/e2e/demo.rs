//! `driftline-collector demo`: the whole system in one process.

use super::*;

#[test]
fn demo_runs_and_leaves_a_queryable_lake() {
    let data = tempfile::tempdir().expect("tempdir");
    let pg_port = free_port();
    let demo = Command::new(COLLECTOR)
        .args([
            "demo",
            "--duration",
            "12s",
            "--devices",
            "4",
            "--backfill",
            "20m",
            "--pg-listen",
            &format!("127.0.0.1:{pg_port}"),
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run demo");
    // While it runs, the SQL endpoint answers with the demo login.
    wait_for_port(pg_port, "demo SQL endpoint");
    let until = Instant::now() + Duration::from_secs(10);
    let live = loop {
        let out = Command::new("psql")
            .args([
                &format!("postgresql://driftline:driftline@127.0.0.1:{pg_port}/driftline"),
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT count(*) AS n FROM metrics",
            ])
            .output()
            .expect("psql");
        let n: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if n > 0 || Instant::now() > until {
            break n;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(live > 0, "psql sees the demo's windows while it runs");
    let out = demo.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("driftline-collector query"),
        "demo prints how to query: {stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "psql \"postgresql://driftline:driftline@127.0.0.1:{pg_port}/driftline\""
        )),
        "demo prints the psql line: {stdout}"
    );
    assert!(!parquet_files(&data.path().join("metrics")).is_empty());
    // 4 devices x 2 models x 20 backfilled windows at least.
    let rows = query(
        data.path(),
        "SELECT model_id, count(*) AS windows, count(DISTINCT device_id) AS devices \
         FROM metrics GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, model) in rows.iter().zip(["model-0", "model-1"]) {
        assert_eq!(row[0], model);
        assert!(row[1].parse::<u64>().expect("count") >= 80, "{row:?}");
        assert_eq!(row[2], "4");
    }
    let since = (Utc::now() - TimeDelta::minutes(25)).to_rfc3339();
    let recent = query(
        data.path(),
        &format!("SELECT count(*) FROM metrics WHERE window_start < TIMESTAMP '{since}'"),
    );
    assert_eq!(
        recent,
        vec![vec!["0".to_string()]],
        "event time ends at the present"
    );
}
