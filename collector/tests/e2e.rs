//! End-to-end tests: a real Mosquitto started on a free port, the real
//! `driftline-collector` binary, devices publishing through the agent library
//! and through `mosquitto_pub`, and the lake read back with `query`.
//!
//! Mosquitto is required: these tests fail, never skip, when it is missing.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use driftline_agent::ledger::Budget;
use driftline_agent::privacy::MechanismConfig;
use driftline_agent::simulate::{self, SimConfig, SimProgress};
use driftline_core::broker::BrokerUrl;
use tokio_util::sync::CancellationToken;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_driftline-collector");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} is not listening on port {port}");
}

/// A Mosquitto broker on a free loopback port, stopped on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Self {
        Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), "")
    }

    /// Mosquitto with `extra` configuration lines, its files in `dir`.
    fn with_config(dir: tempfile::TempDir, extra: &str) -> Self {
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install mosquitto); .ci/run installs it");
        wait_for_port(port, "mosquitto");
        Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> BrokerUrl {
        BrokerUrl {
            host: "127.0.0.1".into(),
            port: self.port,
            tls: false,
        }
    }

    fn publish(&self, topic: &str, payload_file: &Path) {
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-f",
            ])
            .arg(payload_file)
            .status()
            .expect("mosquitto_pub must be installed (apt-get install mosquitto-clients)");
        assert!(status.success(), "mosquitto_pub failed for {topic}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `driftline-collector serve`, started and waited for until subscribed.
struct Collector {
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Collector {
    fn serve(broker: &BrokerUrl, data_dir: &Path, client_id: &str) -> Self {
        Collector::serve_with(broker, data_dir, client_id, &[])
    }

    /// `serve` with `extra` flags, waited for until subscribed.
    fn serve_with(broker: &BrokerUrl, data_dir: &Path, client_id: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(COLLECTOR)
            .args([
                "serve",
                "--broker",
                &broker.to_string(),
                "--client-id",
                client_id,
            ])
            .args(extra)
            .args(["--flush-interval", "300ms", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start collector");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let collector = Collector { child, log };
        collector.wait_for_log("subscribed", Duration::from_secs(15));
        collector
    }

    fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "collector never logged {needle:?}; log so far:\n{}",
            seen.join("\n")
        );
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then the exit status must be 0.
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "collector exited with {status} after SIGTERM"
                );
                return;
            }
            assert!(
                Instant::now() < until,
                "collector did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `driftline-collector {args} --data-dir {data_dir}`, asserts that
/// it exits 0 (showing its stderr if not) and returns its stdout.
fn collector_cli(args: &[&str], data_dir: &Path) -> String {
    let out = Command::new(COLLECTOR)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run driftline-collector");
    assert!(
        out.status.success(),
        "driftline-collector {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `driftline-collector query --format csv` and returns the rows
/// (without the header).
fn query(data_dir: &Path, sql: &str) -> Vec<Vec<String>> {
    collector_cli(&["query", "--format", "csv", sql], data_dir)
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect()
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "parquet") {
                found.push(p);
            }
        }
    }
    found
}

/// The golden fixture `valid/laplace.json` (device kiosk-0007), moved to a
/// recent window so the collector accepts it.
fn recent_laplace_fixture() -> String {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/v1/valid/laplace.json");
    let recent = recent_window_start(60, 2).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::fs::read_to_string(fixture)
        .expect("fixture")
        .replace("2026-11-27T10:00:00Z", &recent)
}

fn recent_window_start(window_secs: i64, windows_back: i64) -> DateTime<Utc> {
    let now = Utc::now().timestamp();
    let aligned = now - now.rem_euclid(window_secs) - windows_back * window_secs;
    DateTime::from_timestamp(aligned, 0).expect("timestamp")
}

/// `GET http://127.0.0.1:{port}{path}` with curl: the body, a newline and
/// the status code.
fn http_get(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_windows_reach_the_lake_exactly_once() {
    let broker = Mosquitto::start();
    let data = tempfile::tempdir().expect("tempdir");
    let metrics_port = free_port();
    let collector = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-agent",
        &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
    );

    let (devices, models, windows) = (3u32, 2u32, 4u64);
    let summary = simulate_in_background(sim_config(broker.url(), devices, models, windows, 7))
        .join()
        .expect("simulator thread");
    let expected = u64::from(devices * models) * windows;
    assert_eq!(summary.published, expected);
    assert_eq!(summary.acknowledged, expected);

    // Everything acknowledged by the broker must be stored once SIGTERM
    // returns: give the broker a moment to hand it over, then stop.
    std::thread::sleep(Duration::from_secs(1));
    // The collector's own metrics, scraped like Prometheus does.
    let health = http_get(metrics_port, "/health");
    assert!(
        health.ends_with("200") && health.contains("\"subscribed\":true"),
        "{health}"
    );
    let metrics = http_get(metrics_port, "/metrics");
    assert!(
        metrics.contains(&format!("driftline_windows_stored_total {expected}")),
        "{metrics}"
    );
    assert!(
        metrics.contains("driftline_flush_seconds_count"),
        "{metrics}"
    );
    collector.terminate();

    let rows = query(
        data.path(),
        "SELECT count(*) AS n, count(DISTINCT device_id) AS devices, \
         count(DISTINCT model_id) AS models, \
         count(DISTINCT device_id || model_id || CAST(window_start AS VARCHAR)) AS keys, \
         min(mechanism) AS mechanism, max(epsilon) AS eps FROM metrics",
    );
    assert_eq!(
        rows,
        vec![vec![
            expected.to_string(),
            devices.to_string(),
            models.to_string(),
            expected.to_string(),
            "laplace".to_string(),
            "60.0".to_string()
        ]]
    );
    let per_device_seq = query(
        data.path(),
        "SELECT device_id, min(seq) AS lo, max(seq) AS hi, count(*) AS n FROM metrics \
         GROUP BY device_id ORDER BY device_id",
    );
    assert_eq!(per_device_seq.len(), devices as usize);
    // The devices view: per device, its windows of every model and each of
    // its model versions once, sorted; the same as computed straight from
    // every row (the view groups by device, model and version first).
    // (Spaces for the view's commas: this helper splits CSV on commas.)
    let devices_view = query(
        data.path(),
        "SELECT device_id, windows, replace(model_versions, ',', ' ') AS model_versions \
         FROM devices ORDER BY device_id",
    );
    let direct = query(
        data.path(),
        "SELECT device_id, count(*) AS windows, array_to_string(array_sort(array_distinct(\
         array_agg(model_id || '@' || model_version))), ' ') AS model_versions \
         FROM metrics GROUP BY device_id ORDER BY device_id",
    );
    assert_eq!(devices_view, direct);
    assert_eq!(devices_view.len(), devices as usize);
    for row in &devices_view {
        assert_eq!(row[1], (u64::from(models) * windows).to_string());
        assert_eq!(row[2].split(' ').count(), models as usize, "{row:?}");
    }
    for row in per_device_seq {
        let per_device = u64::from(models) * windows;
        assert_eq!(
            row[1..],
            [
                "0".to_string(),
                (per_device - 1).to_string(),
                per_device.to_string()
            ]
        );
    }
    let files = parquet_files(&data.path().join("metrics"));
    assert!(!files.is_empty());
    assert!(
        files.iter().all(|f| f
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("date="))),
        "files are in date= partitions: {files:?}"
    );
    let quarantined = query(data.path(), "SELECT count(*) FROM quarantine");
    assert_eq!(quarantined, vec![vec!["0".to_string()]]);
}

#[test]
fn handwritten_message_is_stored_and_malformed_ones_are_quarantined() {
    let broker = Mosquitto::start();
    let data = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let mut collector = Collector::serve(&broker.url(), data.path(), "e2e-manual");

    // The example of docs/wire-format.md, moved to a recent window.
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/wire-format.md"),
    )
    .expect("docs/wire-format.md");
    let start = doc.find("```json\n").expect("json block") + "```json\n".len();
    let end = start + doc[start..].find("```").expect("end of block");
    let recent = recent_window_start(60, 2).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let example = doc[start..end].replace("2026-11-27T10:00:00Z", &recent);
    let topic = "driftline/v1/eu-kiosks/kiosk-0007/metrics";
    let write = |name: &str, body: &[u8]| {
        let p = files.path().join(name);
        std::fs::write(&p, body).expect("write payload");
        p
    };
    broker.publish(topic, &write("good.json", example.as_bytes()));
    // The same message again (an agent retry): stored once.
    broker.publish(topic, &write("good.json", example.as_bytes()));
    // The device's status, and one that lies about its device.
    let status = serde_json::json!({
        "schema_version": 1, "device_id": "kiosk-0007", "fleet": "eu-kiosks",
        "state": "offline", "at": recent, "agent_version": "0.1.0",
        "models": [{"model_id": "intent-classifier", "model_version": "2.3.1"}],
        "budget_remaining_rho": 0.25
    });
    let status_topic = "driftline/v1/eu-kiosks/kiosk-0007/status";
    broker.publish(
        status_topic,
        &write("status.json", status.to_string().as_bytes()),
    );
    let mut liar = status.clone();
    liar["device_id"] = "kiosk-0008".into();
    broker.publish(
        status_topic,
        &write("liar.json", liar.to_string().as_bytes()),
    );

    let mut doc_json: serde_json::Value = serde_json::from_str(&example).expect("json");
    let variant = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = doc_json.clone();
        f(&mut v);
        serde_json::to_vec(&v).expect("json")
    };
    let malformed: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{ this is not json".to_vec(), "invalid_json"),
        (
            "unknown version",
            variant(&|v| v["schema_version"] = 99.into()),
            "unsupported_schema_version",
        ),
        (
            "wrong type",
            variant(&|v| v["inference_count"] = "many".into()),
            "schema_violation",
        ),
        (
            "missing field",
            variant(&|v| {
                v.as_object_mut().map(|o| o.remove("latency_ms"));
            }),
            "schema_violation",
        ),
        ("too large", vec![b' '; 70 * 1024], "payload_too_large"),
        (
            "device mismatch",
            variant(&|v| v["device_id"] = "someone-else".into()),
            "topic_mismatch",
        ),
        (
            "ancient",
            variant(&|v| v["window_start"] = "2001-01-01T00:00:00Z".into()),
            "timestamp_out_of_range",
        ),
    ];
    for (i, (what, body, _)) in malformed.iter().enumerate() {
        broker.publish(topic, &write(&format!("bad-{i}.json"), body));
        assert!(collector.is_running(), "collector died after {what}");
    }
    // The same window again under another seq (a replay, not a retry):
    // one window counts once, so it is quarantined as duplicate_window.
    doc_json["seq"] = 7.into();
    broker.publish(
        topic,
        &write("replay.json", &serde_json::to_vec(&doc_json).expect("json")),
    );
    // Still healthy: the next window, seq 2, is stored too.
    doc_json["seq"] = 2.into();
    doc_json["window_start"] = recent_window_start(60, 1)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        .into();
    broker.publish(
        topic,
        &write("good-2.json", &serde_json::to_vec(&doc_json).expect("json")),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(collector.is_running());
    collector.terminate();

    let stored = query(
        data.path(),
        "SELECT seq, inference_count, latency_ms_b01 FROM metrics ORDER BY seq",
    );
    assert_eq!(stored, vec![vec!["1", "4", "2"], vec!["2", "4", "2"]]);
    let reasons = query(
        data.path(),
        "SELECT reason, count(*) AS n FROM quarantine GROUP BY reason ORDER BY reason",
    );
    let mut expected: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, _, reason) in &malformed {
        *expected.entry(reason).or_default() += 1;
    }
    expected.insert("invalid_status", 1);
    expected.insert("duplicate_window", 1);
    let expected: Vec<Vec<String>> = expected
        .into_iter()
        .map(|(r, n)| vec![r.to_string(), n.to_string()])
        .collect();
    assert_eq!(reasons, expected);
    // The payload is kept with the topic and a readable detail: its size,
    // and of one over the size limit only the first 4 KiB.
    let kept = query(
        data.path(),
        "SELECT payload_bytes, length(payload), device_id, length(detail) > 10 AS has_detail \
         FROM quarantine WHERE reason = 'payload_too_large'",
    );
    assert_eq!(
        kept,
        vec![vec![
            (70 * 1024).to_string(),
            "4096".into(),
            "kiosk-0007".into(),
            "true".into()
        ]]
    );
    // The devices view joins the last status with what metrics show.
    let devices = query(
        data.path(),
        "SELECT device_id, fleet, state, windows, agent_version, model_versions, \
         budget_remaining_rho FROM devices",
    );
    assert_eq!(
        devices,
        vec![vec![
            "kiosk-0007",
            "eu-kiosks",
            "offline",
            "2",
            "0.1.0",
            "intent-classifier@2.3.1",
            "0.25"
        ]]
    );
}

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

/// A CA and a server certificate for localhost, made with the openssl CLI.
fn make_server_certificate(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Driftline test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // Mosquitto started as root reads its files as the `mosquitto` user;
    // openssl writes keys 0600. These keys exist only for this test.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(dir.to_path_buf(), 0o755), (dir.join("server.key"), 0o644)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

#[test]
fn serve_reads_from_a_tls_broker_with_a_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_server_certificate(dir.path());
    let d = dir.path().display().to_string();
    for (user, password) in [("collector", "c-secret"), ("kiosk-0007", "k-secret")] {
        let mut cmd = Command::new("mosquitto_passwd");
        if !dir.path().join("passwords").exists() {
            cmd.arg("-c");
        }
        let ok = cmd
            .args(["-b", &format!("{d}/passwords"), user, password])
            .status()
            .expect("mosquitto_passwd must be installed (package mosquitto)");
        assert!(ok.success());
    }
    // `with_config` writes `allow_anonymous true` first; the later line wins.
    let extra = format!(
        "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
         password_file {d}/passwords\nallow_anonymous false\n"
    );
    let broker = Mosquitto::with_config(dir, &extra);
    let data = tempfile::tempdir().expect("tempdir");
    let ca = format!("{d}/ca.pem");
    let tls_url = BrokerUrl {
        host: "localhost".into(),
        port: broker.port,
        tls: true,
    };
    let collector = Collector::serve_with(
        &tls_url,
        data.path(),
        "e2e-tls",
        &[
            "--tls-ca-file",
            &ca,
            "--mqtt-username",
            "collector",
            "--mqtt-password",
            "c-secret",
        ],
    );

    let body = recent_laplace_fixture();
    let payload = data.path().join("message.json");
    std::fs::write(&payload, body).expect("write");
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            &broker.port.to_string(),
            "--cafile",
            &ca,
            "-q",
            "1",
            "-u",
            "kiosk-0007",
            "-P",
            "k-secret",
        ])
        .args(["-t", "driftline/v1/eu-kiosks/kiosk-0007/metrics", "-f"])
        .arg(&payload)
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "publish over TLS");
    std::thread::sleep(Duration::from_secs(1));
    collector.terminate();
    assert_eq!(
        query(data.path(), "SELECT device_id, seq FROM metrics"),
        vec![vec!["kiosk-0007".to_string(), "1042".to_string()]]
    );
}

/// A simulated fleet of `devices` x `models`, `windows` recent windows each.
fn sim_config(broker: BrokerUrl, devices: u32, models: u32, windows: u64, seed: u64) -> SimConfig {
    SimConfig {
        broker,
        fleet: "e2e".into(),
        devices,
        models,
        windows: Some(windows),
        window_secs: 60,
        start: recent_window_start(60, windows as i64 + 5),
        seed,
        // 60 events per window at epsilon 60: noise b = 7 per count, enough
        // to see drifts on a few dozen devices (a test setting, not private).
        mechanism: MechanismConfig::Laplace { epsilon: 60.0 },
        events_per_window: 20.0,
        drift: None,
        live: false,
        budget: Budget {
            epsilon: None,
            delta: 1e-6,
            rho: None,
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        },
        max_events_per_window: 60,
        first_device: 0,
        credentials: None,
        tls: Default::default(),
    }
}

/// Runs the simulator on its own thread; the handle returns its summary.
fn simulate_in_background(config: SimConfig) -> std::thread::JoinHandle<simulate::SimSummary> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(simulate::run(
            config,
            Arc::new(SimProgress::default()),
            CancellationToken::new(),
        ))
        .expect("simulation")
    })
}

/// Polls the lake until `metrics` holds `expected` rows (or times out),
/// then returns (rows, distinct keys).
fn wait_for_rows(data_dir: &Path, expected: u64, timeout: Duration) -> (u64, u64) {
    let sql = "SELECT count(*) AS n, count(DISTINCT device_id || '|' || model_id || '|' || \
               CAST(window_start AS VARCHAR) || '|' || CAST(seq AS VARCHAR)) AS keys FROM metrics";
    let until = Instant::now() + timeout;
    loop {
        let rows = query(data_dir, sql);
        let n: u64 = rows[0][0].parse().expect("count");
        let keys: u64 = rows[0][1].parse().expect("keys");
        if n >= expected || Instant::now() > until {
            return (n, keys);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Mosquitto keeps every queued message for an absent collector.
const UNBOUNDED_QUEUE: &str = "max_queued_messages 0\n";

#[test]
fn collector_killed_mid_stream_stores_every_window_exactly_once() {
    let broker = Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), UNBOUNDED_QUEUE);
    let data = tempfile::tempdir().expect("tempdir");
    // Small flushes, so the first file lands while the stream is young;
    // and a stream long enough (24,000 windows) that a fast machine is
    // still publishing when the kill comes.
    let mut collector = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-kill",
        &["--flush-rows", "200"],
    );
    let (devices, windows) = (200u32, 120u64);
    let sim = simulate_in_background(sim_config(broker.url(), devices, 1, windows, 11));

    // Kill -9 as soon as the first file is in the lake.
    let until = Instant::now() + Duration::from_secs(60);
    while parquet_files(&data.path().join("metrics")).is_empty() {
        assert!(Instant::now() < until, "nothing reached the lake");
        std::thread::sleep(Duration::from_millis(20));
    }
    collector.child.kill().expect("SIGKILL");
    let _ = collector.child.wait();
    assert!(
        !sim.is_finished(),
        "the stream must still be running when the collector dies"
    );
    let stored_at_kill = wait_for_rows(data.path(), 0, Duration::ZERO).0;

    // Restart under the same client id: the write-ahead log is replayed
    // and the broker delivers the rest.
    let collector = Collector::serve(&broker.url(), data.path(), "e2e-kill");
    let summary = sim.join().expect("simulator thread");
    let expected = u64::from(devices) * windows;
    assert_eq!(summary.acknowledged, expected);
    let (rows, keys) = wait_for_rows(data.path(), expected, Duration::from_secs(120));
    collector.terminate();
    assert!(
        stored_at_kill < expected,
        "killed after {stored_at_kill} of {expected}"
    );
    assert_eq!(
        (rows, keys),
        (expected, expected),
        "every window exactly once"
    );

    // Compaction merges each partition into one file and keeps every row.
    let compacted = collector_cli(&["compact", "--grace", "0s"], data.path());
    assert!(compacted.contains("compacted metrics/date="), "{compacted}");
    let files = parquet_files(&data.path().join("metrics"));
    let partitions: std::collections::BTreeSet<_> =
        files.iter().filter_map(|f| f.parent()).collect();
    assert_eq!(
        files.len(),
        partitions.len(),
        "one file per partition: {files:?}"
    );
    assert_eq!(
        wait_for_rows(data.path(), expected, Duration::ZERO),
        (expected, expected)
    );
    // Replaced files are gone from disk, not only from view.
    assert_eq!(
        parquet_files(&data.path().join("_driftline/gens/metrics")).len(),
        files.len()
    );
}

#[test]
fn two_collectors_share_one_stream_without_loss_or_duplicates() {
    let broker = Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), UNBOUNDED_QUEUE);
    let data = tempfile::tempdir().expect("tempdir");
    let share = ["--share-group", "e2e"];
    let a = Collector::serve_with(&broker.url(), data.path(), "e2e-share-a", &share);
    let b = Collector::serve_with(&broker.url(), data.path(), "e2e-share-b", &share);
    let (devices, windows) = (100u32, 20u64);
    let summary = simulate_in_background(sim_config(broker.url(), devices, 1, windows, 5))
        .join()
        .expect("simulator thread");
    let expected = u64::from(devices) * windows;
    assert_eq!(summary.acknowledged, expected);
    let (rows, keys) = wait_for_rows(data.path(), expected, Duration::from_secs(60));
    // Both took part: files come from two writer instances.
    let writers: std::collections::BTreeSet<String> = parquet_files(&data.path().join("metrics"))
        .iter()
        .filter_map(|f| {
            f.file_name()?
                .to_str()?
                .split('-')
                .nth(1)
                .map(str::to_owned)
        })
        .collect();
    a.terminate();
    b.terminate();
    assert_eq!((rows, keys), (expected, expected));
    assert_eq!(writers.len(), 2, "both collectors wrote: {writers:?}");
}

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

/// One noise-free (`mechanism: none`) window report with the given
/// histograms, for a fixture lake whose detector results are exact.
#[allow(clippy::too_many_arguments)]
fn fixture_window(
    device: &str,
    model: &str,
    version: &str,
    start: DateTime<Utc>,
    seq: u64,
    latency: [i64; 16],
    confidence: [i64; 10],
    input: [i64; 16],
    errors: i64,
    negative: i64,
) -> String {
    let inferences: i64 = latency.iter().sum();
    serde_json::json!({
        "schema_version": 1, "device_id": device, "fleet": "golden",
        "model_id": model, "model_version": version, "agent_version": "0.1.0",
        "window_start": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "window_secs": 900, "seq": seq,
        "privacy": { "mechanism": "none" },
        "inference_count": inferences, "error_count": errors,
        "feedback": { "positive": 10, "negative": negative, "correction": 0 },
        "latency_ms": {
            "edges": [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000],
            "counts": latency },
        "confidence": { "edges": [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1], "counts": confidence },
        "input_tokens": {
            "edges": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768],
            "counts": input },
        "output_tokens": {
            "edges": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768],
            "counts": input },
        // An app feature that shifts with the drift too.
        "custom": { "brightness": { "edges": [0, 0.5, 1],
            "counts": if errors > 4 { [30, 10] } else { [10, 30] } } },
        // Labels follow the errors: a drifting window predicts differently.
        "categories": { "label": if errors > 4 {
            serde_json::json!({"billing": 5, "cancel": 30, "other": 5})
        } else {
            serde_json::json!({"billing": 25, "cancel": 5, "support": 10})
        } }
    })
    .to_string()
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

/// Headers (lower-cased names) and body of an HTTP request.
type Request = (Vec<(String, String)>, String);

/// A one-request HTTP server: returns the port and a handle yielding the
/// request's headers (lower-cased names) and body.
fn one_request_server(status: u16) -> (u16, std::thread::JoinHandle<Request>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut headers = Vec::new();
        let mut line = String::new();
        reader.read_line(&mut line).expect("request line");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_lowercase(), v.trim().to_owned()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).expect("body");
        let reply =
            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        stream.write_all(reply.as_bytes()).expect("reply");
        (headers, String::from_utf8_lossy(&body).into_owned())
    });
    (port, handle)
}

#[test]
fn detectors_give_the_expected_results_on_a_fixture_lake_and_jobs_reach_a_signed_webhook() {
    use driftline_collector::ingest::{Ingest, IngestLimits};
    use driftline_collector::lake::LakeWriter;
    let data = tempfile::tempdir().expect("tempdir");
    // Four reference windows (an hour) and one current window of 15 min,
    // ending at `end`: a recent, aligned time so the lake accepts it.
    let end = DateTime::from_timestamp(Utc::now().timestamp() / 900 * 900, 0).expect("ts");
    let current = end - TimeDelta::minutes(15);
    let mut stable_latency = [0i64; 16];
    stable_latency[5] = 40; // all in [20, 50): median 35 ms
    let mut slow_latency = [0i64; 16];
    slow_latency[6] = 40; // all in [50, 100): median 75 ms
    let mut slower_latency = [0i64; 16];
    slower_latency[7] = 40; // all in [100, 200): median 150 ms
    let confident = [0, 0, 0, 0, 0, 0, 5, 10, 15, 10];
    let unsure = [0, 0, 5, 10, 15, 10, 0, 0, 0, 0];
    let short = [0, 0, 0, 0, 10, 20, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let long = [0, 0, 0, 0, 0, 0, 0, 0, 10, 20, 10, 0, 0, 0, 0, 0];
    let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Default::default()));
    let received = Utc::now();
    for d in 0..12 {
        let device = format!("dev-{d:02}");
        for w in 0..5i64 {
            let start = end - TimeDelta::minutes(15 * (5 - w));
            let now = start == current;
            let seq = w as u64 * 3;
            let topic = format!("driftline/v1/golden/{device}/metrics");
            let stable = fixture_window(
                &device,
                "m-stable",
                "1",
                start,
                seq,
                stable_latency,
                confident,
                short,
                1,
                2,
            );
            let drifting = if now {
                fixture_window(
                    &device,
                    "m-drift",
                    "1",
                    start,
                    seq + 1,
                    slow_latency,
                    unsure,
                    long,
                    8,
                    12,
                )
            } else {
                fixture_window(
                    &device,
                    "m-drift",
                    "1",
                    start,
                    seq + 1,
                    stable_latency,
                    confident,
                    short,
                    1,
                    2,
                )
            };
            ingest.handle(&topic, stable.as_bytes(), received);
            ingest.handle(&topic, drifting.as_bytes(), received);
            if now && d < 6 {
                let canary = fixture_window(
                    &device,
                    "m-drift",
                    "2",
                    start,
                    seq + 2,
                    slower_latency,
                    unsure,
                    long,
                    8,
                    12,
                );
                ingest.handle(&topic, canary.as_bytes(), received);
            }
        }
    }
    let lake = LakeWriter::open(data.path()).expect("lake");
    ingest.flush(&lake).expect("flush");
    assert_eq!(
        ingest
            .counters()
            .quarantined
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let (port, request) = one_request_server(200);
    // Jobs also go to an MQTT topic; a subscriber waits for the first one.
    let broker = Mosquitto::start();
    let mut jobs_topic = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "training/jobs",
        ])
        .args(["-q", "1", "-C", "1", "-W", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(300));
    let broker_url = broker.url().to_string();
    let at = (end + TimeDelta::minutes(1)).to_rfc3339();
    let webhook_path = "/retrain".to_owned();
    let webhook = format!("http://127.0.0.1:{port}{webhook_path}");
    let detect = || {
        collector_cli(
            &[
                "detect",
                "--at",
                &at,
                "--retrain-consecutive",
                "1",
                "--retrain-secret",
                "s3cret",
                "--retrain-webhook",
                &webhook,
                "--retrain-mqtt-topic",
                "training/jobs",
                "--retrain-broker",
                &broker_url,
            ],
            data.path(),
        )
    };
    let first = detect();
    assert!(first.contains("new drift events"), "{first}");

    // Golden results: which evaluations fire, and the exact values.
    let fired = query(
        data.path(),
        "SELECT detector, model_id, model_version, fired, round(value, 4) AS value FROM detector_runs \
         ORDER BY detector, model_id, model_version",
    );
    let expected: Vec<Vec<String>> = [
        // canary: v2's median 150 ms against v1's 75 ms.
        ["canary_latency", "m-drift", "2", "true", "1.0"],
        // error rate: 8/40 against 1/40.
        ["custom_drift", "m-drift", "1", "true", "PSI"],
        ["custom_drift", "m-stable", "1", "false", "0.0"],
        ["error_rate", "m-drift", "1", "true", "0.175"],
        ["error_rate", "m-stable", "1", "false", "0.0"],
        ["input_drift", "m-drift", "1", "true", "PSI"],
        // A version with no reference period has no value, and stays quiet.
        ["input_drift", "m-drift", "2", "false", ""],
        ["input_drift", "m-stable", "1", "false", "0.0"],
        ["label_drift", "m-drift", "1", "true", "PSI"],
        ["label_drift", "m-drift", "2", "false", ""],
        ["label_drift", "m-stable", "1", "false", "0.0"],
        // median 75 ms against 35 ms: +114.29%.
        ["latency_regression", "m-drift", "1", "true", "1.1429"],
        ["latency_regression", "m-drift", "2", "false", ""],
        ["latency_regression", "m-stable", "1", "false", "0.0"],
        ["negative_feedback", "m-drift", "1", "true", "0.25"],
        ["negative_feedback", "m-stable", "1", "false", "0.0"],
        ["prediction_drift", "m-drift", "1", "true", "PSI"],
        ["prediction_drift", "m-drift", "2", "false", ""],
        ["prediction_drift", "m-stable", "1", "false", "0.0"],
    ]
    .iter()
    .map(|r| r.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(fired.len(), expected.len(), "{fired:?}");
    for (got, want) in fired.iter().zip(&expected) {
        assert_eq!(got[..4], want[..4], "{got:?}");
        if want[4] != "PSI" {
            assert_eq!(got[4], want[4], "{got:?}");
        } else {
            // Disjoint or nearly disjoint shares: a PSI far over 0.1.
            let psi: f64 = got[4].parse().expect("psi");
            assert!(psi > 1.0, "{got:?}");
        }
    }

    // The job reached the webhook, signed.
    let (headers, body) = request.join().expect("server");
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let evidence: serde_json::Value = serde_json::from_str(&body).expect("evidence JSON");
    assert_eq!(evidence["model_id"], "m-drift");
    assert_eq!(
        header("x-driftline-job"),
        evidence["job_id"].as_str().unwrap_or_default()
    );
    // Signed over its timestamp, method, path and body.
    let timestamp: i64 = header("x-driftline-timestamp").parse().expect("timestamp");
    assert!((Utc::now().timestamp() - timestamp).abs() < 600);
    assert_eq!(
        header("x-driftline-signature"),
        format!(
            "sha256={}",
            driftline_collector::retrain::signature(
                "s3cret",
                timestamp,
                "POST",
                &webhook_path,
                body.as_bytes()
            )
        )
    );
    assert!(evidence["events"].as_array().is_some_and(|e| e.len() >= 5));
    assert!(evidence["sql"]
        .as_str()
        .unwrap_or_default()
        .contains("drift_events"));
    // The same evidence arrived on the MQTT topic.
    let mut published = String::new();
    std::io::Read::read_to_string(
        jobs_topic.stdout.as_mut().expect("mosquitto_sub stdout"),
        &mut published,
    )
    .expect("read mosquitto_sub");
    let _ = jobs_topic.wait();
    let over_mqtt: serde_json::Value =
        serde_json::from_str(published.trim()).expect("MQTT evidence");
    assert_eq!(over_mqtt["job_id"], evidence["job_id"]);

    // Running again for the same period records and dispatches nothing.
    let second = detect();
    assert!(second.contains("(0 new drift events)"), "{second}");
    assert!(!second.contains(" job "), "{second}");
    let counts = query(
        data.path(),
        "SELECT (SELECT count(*) FROM drift_events) AS events, (SELECT count(*) FROM retrain_jobs) AS jobs",
    );
    // One job: the canary (same model) waits while the first is open.
    assert_eq!(counts, vec![vec!["8".to_string(), "1".to_string()]]);

    // The training system reports back: over HTTP to a running collector
    // (signed), then with the CLI.
    let job = evidence["job_id"].as_str().unwrap_or_default().to_owned();
    let metrics_port = free_port();
    let serve = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-jobs",
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--retrain-secret",
            "s3cret",
            "--detect-interval",
            "1h",
        ],
    );
    let report = |job: &str, body: &str, timestamp: i64, signature: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args(["-H", &format!("X-Driftline-Timestamp: {timestamp}")])
            .args(["-H", &format!("X-Driftline-Signature: sha256={signature}")])
            .args(["--data-binary", body])
            .arg(format!(
                "http://127.0.0.1:{metrics_port}/v1/jobs/{job}/status"
            ))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sign = |job: &str, body: &str, timestamp: i64| {
        driftline_collector::retrain::signature(
            "s3cret",
            timestamp,
            "POST",
            &format!("/v1/jobs/{job}/status"),
            body.as_bytes(),
        )
    };
    let now = Utc::now().timestamp();
    let body = r#"{"status": "acknowledged", "detail": "queued"}"#;
    let good = sign(&job, body, now);
    assert_eq!(
        report(&job, body, now, "00"),
        "401",
        "unsigned reports are refused"
    );
    // The same body and signature cannot mark another job.
    assert_eq!(report("m-stable-20260101T0000Z", body, now, &good), "401");
    // A signature made ten minutes ago is refused, even if never used.
    let old = now - 600;
    assert_eq!(report(&job, body, old, &sign(&job, body, old)), "401");
    assert_eq!(report(&job, body, now, &good), "200");
    // Sent again, the same signed report is a replay.
    assert_eq!(report(&job, body, now, &good), "409");
    let bad_status = r#"{"status": "done"}"#;
    assert_eq!(
        report(&job, bad_status, now, &sign(&job, bad_status, now)),
        "400"
    );
    serve.terminate();
    let acknowledged = query(
        data.path(),
        &format!("SELECT detail FROM retrain_job_events WHERE job_id = '{job}' AND status = 'acknowledged'"),
    );
    assert_eq!(acknowledged, vec![vec!["queued".to_string()]]);
    collector_cli(
        &["job-status", &job, "succeeded", "--detail", "run 42"],
        data.path(),
    );
    let status = query(
        data.path(),
        &format!("SELECT status, detail FROM retrain_jobs WHERE job_id = '{job}'"),
    );
    assert_eq!(
        status,
        vec![vec!["succeeded".to_string(), "run 42".to_string()]]
    );
}

#[test]
fn shipped_mosquitto_config_binds_logins_to_topics() {
    // deploy/mosquitto as docker-compose runs it, with secrets made by its
    // secrets.sh, the port and the paths moved into a temp dir.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto");
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let made = Command::new("sh")
        .arg(deploy.join("secrets.sh"))
        .arg(&secrets)
        .args(["eu-kiosks:2", "us-kiosks:1"])
        .output()
        .expect("sh");
    assert!(made.status.success(), "{made:?}");
    let d = dir.path().display().to_string();
    let port = free_port();
    let conf = std::fs::read_to_string(deploy.join("mosquitto.conf"))
        .expect("mosquitto.conf")
        .replace(
            "listener 8883 0.0.0.0",
            &format!("listener {port} 127.0.0.1"),
        )
        .replace("/mosquitto/secrets/", &format!("{}/", secrets.display()))
        .replace("/mosquitto/config/", &format!("{}/", deploy.display()))
        .replace("/mosquitto/data/", &format!("{d}/"));
    assert!(
        conf.contains("use_username_as_clientid true") && conf.contains("allow_anonymous false")
    );
    std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write conf");
    let mut child = Command::new("mosquitto")
        .arg("-c")
        .arg(dir.path().join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    wait_for_port(port, "mosquitto");
    let password = |login: &str| {
        std::fs::read_to_string(secrets.join(format!("{login}.password")))
            .expect("password")
            .trim()
            .to_owned()
    };
    let url = BrokerUrl {
        host: "127.0.0.1".into(),
        port,
        tls: true,
    };
    let data = tempfile::tempdir().expect("tempdir");
    let ca = secrets.join("ca.crt").display().to_string();
    let collector_password = password("collector");
    let collector = Collector::serve_with(
        &url,
        data.path(),
        "driftline-collector",
        &[
            "--mqtt-username",
            "driftline-collector",
            "--mqtt-password",
            &collector_password,
            "--tls-ca-file",
            &ca,
        ],
    );
    // mosquitto_pub over TLS as `login`, with `client_id` if given; whether
    // the broker accepted the connection.
    let publish = |login: &str, client_id: Option<&str>, topic: &str, body: &str| {
        let file = data.path().join("message.json");
        std::fs::write(&file, body).expect("write");
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(["--cafile", &ca, "-u", login, "-P"])
            .arg(password(login.split('/').next().unwrap_or(login)))
            .args(["-t", topic, "-f"])
            .arg(&file);
        if let Some(id) = client_id {
            cmd.args(["-i", id]);
        }
        cmd.status().expect("mosquitto_pub").success()
    };
    // One window of `device` in `fleet`, `back` windows ago.
    let window = |fleet: &str, device: &str, back: i64| {
        let start =
            recent_window_start(60, back).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let recent = recent_window_start(60, 2).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        recent_laplace_fixture()
            .replace(&recent, &start)
            .replace("kiosk-0007", device)
            .replace("eu-kiosks", fleet)
    };
    let topic = |fleet: &str, device: &str| format!("driftline/v1/{fleet}/{device}/metrics");
    let (me, other) = ("eu-kiosks/sim-00000", "eu-kiosks/sim-00001");
    // While a device keeps connecting under the collector's client id, and
    // writes to another device's and another fleet's topics (the broker
    // drops those), the other device's 10 windows all arrive.
    for back in 2..12 {
        let theirs = window("eu-kiosks", "sim-00001", back);
        assert!(publish(
            other,
            None,
            &topic("eu-kiosks", "sim-00001"),
            &theirs
        ));
        let forged = window("eu-kiosks", "sim-00001", back + 20);
        publish(
            me,
            Some("driftline-collector"),
            &topic("eu-kiosks", "sim-00001"),
            &forged,
        );
        let elsewhere = window("us-kiosks", "sim-00000", back);
        publish(
            me,
            Some("driftline-collector"),
            &topic("us-kiosks", "sim-00000"),
            &elsewhere,
        );
    }
    // Its own topic is its to write, whatever client id it asks for; so is
    // the other fleet's device's.
    let own = window("eu-kiosks", "sim-00000", 2);
    assert!(publish(
        me,
        Some("driftline-collector"),
        &topic("eu-kiosks", "sim-00000"),
        &own
    ));
    let us = window("us-kiosks", "sim-00000", 2);
    assert!(publish(
        "us-kiosks/sim-00000",
        None,
        &topic("us-kiosks", "sim-00000"),
        &us
    ));
    // A wrong password, or no TLS: refused at connect.
    let connects = |password: &str, tls: bool| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"]);
        if tls {
            cmd.args(["--cafile", &ca]);
        }
        cmd.args(["-u", me, "-P", password, "-m", "{}"])
            .args(["-t", &topic("eu-kiosks", "sim-00000")])
            .status()
            .expect("mosquitto_pub")
            .success()
    };
    assert!(!connects("wrong", true));
    assert!(!connects(&password("eu-kiosks"), false));
    // Every window sent on an allowed topic (12), then a flush more for
    // anything else to show up.
    let until = Instant::now() + Duration::from_secs(10);
    while query(data.path(), "SELECT count(*) FROM metrics") != [["12"]] && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rows = query(
        data.path(),
        "SELECT fleet, device_id, count(*) FROM metrics GROUP BY fleet, device_id ORDER BY 1, 2",
    );
    let log: Vec<String> = collector.log.try_iter().collect();
    collector.terminate();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        rows,
        vec![
            vec!["eu-kiosks".to_string(), "sim-00000".into(), "1".into()],
            vec!["eu-kiosks".to_string(), "sim-00001".into(), "10".into()],
            vec!["us-kiosks".to_string(), "sim-00000".into(), "1".into()],
        ]
    );
    // The collector kept its connection throughout.
    assert!(
        !log.iter().any(|l| l.contains("broker connection failed")),
        "{}",
        log.join("\n")
    );
}

#[test]
fn one_device_weighs_at_most_device_cap_median_devices() {
    use driftline_collector::ingest::{Ingest, IngestLimits, Outcome};
    let (data, lake, queries) = detection_lake();
    let now = Utc::now().timestamp();
    let base = DateTime::from_timestamp(now - now.rem_euclid(900) - 6 * 3600, 0).expect("ts");
    // 20 honest devices: 40 inferences and one error a window.
    write_periods(&lake, base, 0..5, 0..20);
    // One more device claims, in the last period, a million times their
    // inferences with half of them failing.
    let hostile = |errors: i64, scale: i64| {
        let mut latency = [0; 16];
        latency[5] = 40 * scale;
        fixture_window(
            "dev-99",
            "m",
            "1",
            base + TimeDelta::minutes(60),
            4,
            latency,
            [0, 0, 0, 0, 0, 0, 5, 10, 15, 10],
            [0, 0, 0, 0, 10, 20, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            errors,
            2,
        )
    };
    let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Default::default()));
    let topic = "driftline/v1/golden/dev-99/metrics";
    let message = hostile(20_000_000, 1_000_000);
    assert!(matches!(
        ingest.handle(topic, message.as_bytes(), Utc::now()),
        Outcome::Accepted
    ));
    ingest.flush(&lake).expect("flush");
    let detectors = driftline_collector::detect::load(&queries).expect("detectors");
    let error_rate = detectors
        .iter()
        .find(|d| d.name == "error_rate")
        .expect("error_rate");
    let at = base + TimeDelta::minutes(75);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let evaluation = rt.block_on(async {
        let ctx = driftline_collector::query::session(data.path())
            .await
            .expect("session");
        driftline_collector::detect::evaluate(&ctx, error_rate, at, 0)
            .await
            .expect("evaluate")
    });
    assert_eq!(evaluation.len(), 1, "{evaluation:?}");
    let e = &evaluation[0];
    // Capped at 10 median devices (400 inferences, 200 errors): the fleet's
    // rate is (20 + 200) / (800 + 400), not the hostile device's 0.5.
    let capped = 220.0 / 1200.0 - 1.0 / 40.0;
    let value = e.value.expect("value");
    assert!((value - capped).abs() < 1e-9, "{value} != {capped}");
    assert_eq!(e.devices_capped, Some(1));
    assert_eq!(e.devices, 21);
}

/// Noise-free 15-minute windows of model `m` for `devices` over `periods`
/// after `base` (the golden fixture's shape: one error and two negative
/// feedbacks a window), written to the lake in one flush.
fn write_periods(
    lake: &driftline_collector::lake::LakeWriter,
    base: DateTime<Utc>,
    periods: std::ops::Range<i32>,
    devices: std::ops::Range<i32>,
) {
    use driftline_collector::ingest::{Ingest, IngestLimits, Outcome};
    let mut ingest = Ingest::new(IngestLimits::default(), Arc::new(Default::default()));
    for p in periods {
        for d in devices.clone() {
            let device = format!("dev-{d:02}");
            let msg = fixture_window(
                &device,
                "m",
                "1",
                base + TimeDelta::minutes(15) * p,
                p as u64,
                [0, 0, 0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 5, 10, 15, 10],
                [0, 0, 0, 0, 10, 20, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                1,
                2,
            );
            let topic = format!("driftline/v1/golden/{device}/metrics");
            assert!(matches!(
                ingest.handle(&topic, msg.as_bytes(), Utc::now()),
                Outcome::Accepted
            ));
        }
    }
    ingest.flush(lake).expect("flush");
}

/// An empty lake with the built-in detectors installed: its directory, its
/// writer and the detectors' folder.
fn detection_lake() -> (
    tempfile::TempDir,
    driftline_collector::lake::LakeWriter,
    PathBuf,
) {
    let data = tempfile::tempdir().expect("tempdir");
    let lake = driftline_collector::lake::LakeWriter::open(data.path()).expect("lake");
    let queries = data.path().join("_driftline/queries");
    driftline_collector::detect::install_builtin(&queries).expect("detectors");
    (data, lake, queries)
}

/// One tick of `schedule` over the lake in `dir`, on a fresh session (so
/// it sees every file flushed so far).
fn tick_once(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    lake: &driftline_collector::lake::LakeWriter,
    schedule: &mut driftline_collector::detect::Schedule,
) {
    rt.block_on(async {
        let ctx = driftline_collector::query::session(dir)
            .await
            .expect("session");
        schedule
            .tick(&ctx, lake, &CancellationToken::new())
            .await
            .expect("tick");
    })
}

/// Yesterday, on the hour: within the collector's accepted event ages.
fn yesterday_on_the_hour() -> DateTime<Utc> {
    DateTime::from_timestamp((Utc::now().timestamp() / 3600 - 24) * 3600, 0).expect("ts")
}

#[test]
fn a_period_waits_for_its_late_devices_up_to_the_lateness_bound() {
    use driftline_collector::detect::Schedule;
    let (data, lake, queries) = detection_lake();
    let base = yesterday_on_the_hour();
    // Twelve devices for seven periods; the eighth so far from six only.
    write_periods(&lake, base, 0..7, 0..12);
    write_periods(&lake, base, 7..8, 0..6);
    // The newest evaluated period of error_rate, and the devices it
    // expected and found.
    let newest = |dir: &Path| {
        query(
            dir,
            "SELECT replace(CAST(current_end AS VARCHAR), ' ', 'T') AS t, devices_expected, \
             devices_present FROM detector_runs WHERE detector = 'error_rate' \
             ORDER BY current_end DESC LIMIT 1",
        )
        .into_iter()
        .next()
        .unwrap_or_default()
    };
    let at = |p: i32| {
        (base + TimeDelta::minutes(15 * i64::from(p)))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string()
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tick = |schedule: &mut Schedule| tick_once(&rt, data.path(), &lake, schedule);
    let mut waiting = Schedule::new(queries.clone(), Default::default(), Default::default());
    waiting.lateness = Duration::from_secs(3600);
    tick(&mut waiting);
    let first = newest(data.path());
    assert!(
        first[0].starts_with(&at(7)) && first[1..] == ["12", "12"],
        "the complete periods are evaluated, the one six devices are missing from waits: {first:?}"
    );
    // The late devices arrive: the period is complete and evaluated.
    write_periods(&lake, base, 7..8, 6..12);
    tick(&mut waiting);
    let after = newest(data.path());
    assert!(
        after[0].starts_with(&at(8)) && after[1..] == ["12", "12"],
        "{after:?}"
    );
    // With a lateness of zero an incomplete period is evaluated at once,
    // and the run records who was missing.
    let (other, other_lake, other_queries) = detection_lake();
    write_periods(&other_lake, base, 0..7, 0..12);
    write_periods(&other_lake, base, 7..8, 0..6);
    let mut eager_schedule = Schedule::new(other_queries, Default::default(), Default::default());
    eager_schedule.lateness = Duration::ZERO;
    tick_once(&rt, other.path(), &other_lake, &mut eager_schedule);
    let eager = newest(other.path());
    assert!(
        eager[0].starts_with(&at(8)) && eager[1..] == ["12", "6"],
        "{eager:?}"
    );
    // The six arrive after all: that period is evaluated again, once, as
    // revision 1, which supersedes revision 0 in `detector_results`.
    write_periods(&other_lake, base, 7..8, 6..12);
    tick_once(&rt, other.path(), &other_lake, &mut eager_schedule);
    tick_once(&rt, other.path(), &other_lake, &mut eager_schedule);
    let revisions = |table: &str| {
        query(
            other.path(),
            &format!(
                "SELECT revision, devices_present FROM {table} WHERE detector = 'error_rate' \
                 AND replace(CAST(current_end AS VARCHAR), ' ', 'T') LIKE '{}%' ORDER BY revision",
                at(8)
            ),
        )
    };
    assert_eq!(revisions("detector_runs"), [["0", "6"], ["1", "12"]]);
    assert_eq!(revisions("detector_results"), [["1", "12"]]);
    // No other period was revised.
    assert_eq!(
        query(
            other.path(),
            "SELECT count(*) FROM detector_runs WHERE revision > 0 AND detector = 'error_rate'"
        ),
        [["1"]]
    );
}

#[test]
fn detection_resumes_after_a_restart_and_evaluates_every_missed_period() {
    use driftline_collector::detect::Schedule;
    let (data, lake, queries) = detection_lake();
    // Yesterday, on the hour: sixteen 15-minute periods of 12 devices.
    let base = yesterday_on_the_hour();
    let period = TimeDelta::minutes(15);
    let write = |periods: std::ops::Range<i32>| write_periods(&lake, base, periods, 0..12);
    let evaluated = |dir: &Path| -> Vec<String> {
        query(
            dir,
            "SELECT DISTINCT CAST(current_end AS VARCHAR) FROM detector_runs \
             WHERE detector = 'error_rate' ORDER BY 1",
        )
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tick_until_idle = |schedule: &mut Schedule| {
        for _ in 0..10 {
            let before = evaluated(data.path()).len();
            tick_once(&rt, data.path(), &lake, schedule);
            if evaluated(data.path()).len() == before {
                break;
            }
        }
    };
    write(0..8);
    let mut first = Schedule::new(queries.clone(), Default::default(), Default::default());
    tick_until_idle(&mut first);
    // A first start evaluates every complete period since the lake's first
    // window (the first has no reference data, so no row): seven.
    let once = evaluated(data.path());
    assert_eq!(once.len(), 7, "{once:?}");
    // The collector is down while two more hours arrive; a new process
    // resumes after the last recorded period and evaluates all eight.
    drop(first);
    write(8..16);
    let mut restarted = Schedule::new(queries.clone(), Default::default(), Default::default());
    tick_until_idle(&mut restarted);
    let all = evaluated(data.path());
    assert_eq!(all.len(), 15, "{all:?}");
    let ends: Vec<DateTime<Utc>> = all
        .iter()
        .map(|t| {
            chrono::NaiveDateTime::parse_from_str(&t.replace(' ', "T")[..19], "%Y-%m-%dT%H:%M:%S")
                .expect("timestamp")
                .and_utc()
        })
        .collect();
    assert_eq!(ends[0], base + period * 2);
    assert!(ends.windows(2).all(|w| w[1] - w[0] == period), "{all:?}");
    assert_eq!(ends[14], base + period * 16);

    // `detect --since` re-evaluates a range on demand; what is recorded
    // already is not recorded twice.
    let rfc = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let range = [
        "detect",
        "--since",
        &rfc(base),
        "--until",
        &rfc(base + period * 16),
    ];
    let runs = "SELECT count(*) FROM detector_runs";
    let recorded = query(data.path(), runs);
    collector_cli(&range, data.path());
    assert_eq!(query(data.path(), runs), recorded);

    // A detector added later: `detect` evaluates it over the lake's
    // history, in order, and a second `detect` has nothing left to do.
    let text = std::fs::read_to_string(queries.join("error_rate.sql")).expect("detector");
    std::fs::write(
        queries.join("error_rate_v2.sql"),
        text.replace("-- name: error_rate", "-- name: error_rate_v2"),
    )
    .expect("new detector");
    collector_cli(&["detect"], data.path());
    let added = query(
        data.path(),
        "SELECT count(DISTINCT current_end) AS n, replace(CAST(min(current_end) AS VARCHAR), ' ', 'T') \
         AS first FROM detector_runs WHERE detector = 'error_rate_v2'",
    );
    assert_eq!(added[0][0], "15", "{added:?}");
    let first = (base + period * 2).format("%Y-%m-%dT%H:%M:%S").to_string();
    assert!(added[0][1].starts_with(&first), "{added:?}");
    // (Detectors that produce no rows on this lake leave no progress to
    // resume from, so they run again over the horizon: idempotently.)
    let recorded = query(data.path(), runs);
    collector_cli(&["detect"], data.path());
    assert_eq!(query(data.path(), runs), recorded);
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

/// An HTTP server that answers 200 to every request and counts them.
fn counting_server() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let mut len = 0usize;
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                let l = line.trim_end().to_lowercase();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, hits)
}

/// Waits (up to 3 minutes) until `input_drift` has a run, matching
/// `condition` (SQL, or "true"), for the period ending at `end`.
fn wait_for_input_drift_run(data_dir: &Path, end: DateTime<Utc>, condition: &str) {
    let sql = format!(
        "SELECT count(*) FROM detector_runs WHERE detector = 'input_drift' AND {condition} \
         AND replace(CAST(current_end AS VARCHAR), ' ', 'T') LIKE '{}%'",
        end.format("%Y-%m-%dT%H:%M:%S")
    );
    let until = Instant::now() + Duration::from_secs(180);
    while query(data_dir, &sql) == [["0"]] {
        assert!(
            Instant::now() < until,
            "detection did not reach {end}: {sql}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One site of a fleet delivers its two hours two hours late, and only its
/// devices drifted. The periods, first evaluated without it, are evaluated
/// again once each when it arrives; the drift, visible only in the late
/// data, is found in a revision and opens a job.
#[test]
fn a_site_two_hours_late_revises_each_period_once_and_its_drift_is_found() {
    use driftline_agent::simulate::{Drift, DriftKind};
    let broker = Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), UNBOUNDED_QUEUE);
    let data = tempfile::tempdir().expect("tempdir");
    let (port, hits) = counting_server();
    let webhook = format!("http://127.0.0.1:{port}/jobs");
    let metrics_port = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let collector = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-late-site",
        &[
            "--metrics-listen",
            &metrics_listen,
            "--detect-interval",
            "1s",
            "--detect-lateness",
            "20s",
            "--retrain-consecutive",
            "1",
            "--retrain-webhook",
            &webhook,
            "--retrain-secret",
            "k",
        ],
    );
    let start = recent_window_start(900, 9);
    let last_end = start + TimeDelta::minutes(120);
    // Site A: 20 devices, on time, steady.
    let mut site_a = sim_config(broker.url(), 20, 1, 120, 31);
    site_a.start = start;
    simulate_in_background(site_a).join().expect("simulator");
    wait_for_input_drift_run(data.path(), last_end, "true");
    assert_eq!(
        query(data.path(), "SELECT count(*) FROM drift_events"),
        [["0"]]
    );
    // Site B: 20 other devices, the same two hours, input +300 % from the
    // second hour, delivered now. (At +100 % the privacy noise, which is
    // not seeded, hid the half-fleet shift in one CI run.)
    let mut site_b = sim_config(broker.url(), 20, 1, 120, 32);
    site_b.start = start;
    site_b.first_device = 20;
    site_b.drift = Some(Drift {
        at: 60,
        model_id: "model-0".into(),
        kind: DriftKind::Input,
        size: 3.0,
    });
    simulate_in_background(site_b).join().expect("simulator");
    wait_for_input_drift_run(data.path(), last_end, "revision = 1");
    std::thread::sleep(Duration::from_secs(3));
    // Every device of the fleet has reported up to the end: so says the
    // fleet's watermark.
    let metrics = http_get(metrics_port, "/metrics");
    let mark = format!(
        "driftline_detect_watermark_seconds{{fleet=\"e2e\"}} {}",
        last_end.timestamp()
    );
    assert!(metrics.contains(&mark), "{mark} not in\n{metrics}");
    collector.terminate();
    // Each period: revision 0 with site A's 20 devices, then exactly one
    // revision with all 40.
    assert_eq!(
        query(
            data.path(),
            "SELECT revision, count(*) AS runs, min(devices_present) AS least, \
                    max(devices_present) AS most \
             FROM detector_runs WHERE detector = 'input_drift' GROUP BY revision ORDER BY revision"
        ),
        [["0", "8", "20", "20"], ["1", "8", "40", "40"]]
    );
    // The drift is found in a revision, from the second hour on, and the
    // rule opens one job for it.
    let found = query(
        data.path(),
        "SELECT min(revision) AS revision, replace(CAST(min(current_start) AS VARCHAR), ' ', 'T') AS t \
         FROM drift_events WHERE detector = 'input_drift'",
    );
    assert_eq!(found[0][0], "1", "{found:?}");
    // (Half the fleet drifted: the first drifted period is found in most
    // runs, the next one otherwise; never a period before the drift.)
    let period = |m: i64| {
        (start + TimeDelta::minutes(m))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string()
    };
    assert!(
        found[0][1].starts_with(&period(60)) || found[0][1].starts_with(&period(75)),
        "{found:?}"
    );
    assert_eq!(
        query(
            data.path(),
            "SELECT count(*) AS jobs, max(status) AS status FROM retrain_jobs"
        ),
        [["1", "dispatched"]]
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A cold start on a replayed backlog: two hours of 40 devices arrive at
/// once, each device at its own pace, to a collector that has never seen
/// them. Every period is evaluated once, with all 40 present, and the
/// drift of the second hour is found where it starts.
#[test]
fn a_replayed_history_is_evaluated_once_per_period_with_every_device() {
    let broker = Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), UNBOUNDED_QUEUE);
    let data = tempfile::tempdir().expect("tempdir");
    let collector = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-replay",
        &["--detect-interval", "1s"],
    );
    let devices = 40u32;
    let mut config = sim_config(broker.url(), devices, 1, 120, 23);
    config.start = recent_window_start(900, 9);
    config.drift = Some(driftline_agent::simulate::Drift {
        at: 60,
        model_id: "model-0".into(),
        kind: driftline_agent::simulate::DriftKind::Input,
        size: 0.5,
    });
    let start = config.start;
    let last_end = config.start + TimeDelta::minutes(120);
    simulate_in_background(config).join().expect("simulator");
    wait_for_input_drift_run(data.path(), last_end, "true");
    std::thread::sleep(Duration::from_secs(3));
    collector.terminate();
    // Eight periods end within the two hours: each evaluated once, every
    // device present, nothing revised.
    assert_eq!(
        query(
            data.path(),
            "SELECT count(*) AS runs, count(DISTINCT current_end) AS periods, \
                    min(devices_present) AS least, max(revision) AS revision \
             FROM detector_runs WHERE detector = 'input_drift'"
        ),
        [["8", "8", &devices.to_string(), "0"]]
    );
    // The drift (input +50 % from the second hour) is found where it starts.
    let found = query(
        data.path(),
        "SELECT replace(CAST(min(current_start) AS VARCHAR), ' ', 'T') AS t FROM drift_events \
         WHERE detector = 'input_drift'",
    );
    let drift_start = (start + TimeDelta::minutes(60))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    assert!(found[0][0].starts_with(&drift_start), "{found:?}");
}

/// Store-and-forward after an outage. A fleet of 40 devices reports an
/// hour; the collector goes down; the next hour, with a drift from its
/// start, arrives as one unordered backlog when it is back. Every period
/// of the outage is evaluated once, with all 40 devices present, the drift
/// is found where it starts, and the signed webhook fires once.
#[test]
fn a_backlog_after_an_outage_is_evaluated_period_by_period_and_retrains_once() {
    use driftline_agent::simulate::{Drift, DriftKind};
    let broker = Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), UNBOUNDED_QUEUE);
    let data = tempfile::tempdir().expect("tempdir");
    let (port, hits) = counting_server();
    let webhook = format!("http://127.0.0.1:{port}/jobs");
    // One drifted period opens a job (the next periods' references already
    // hold drifted data, so the input shift is seen once).
    let flags = [
        "--detect-interval",
        "1s",
        "--retrain-consecutive",
        "1",
        "--retrain-webhook",
        &webhook,
        "--retrain-secret",
        "k",
    ];
    let devices = 40u32;
    let start = recent_window_start(900, 9);
    let outage = start + TimeDelta::minutes(60);
    let last_end = start + TimeDelta::minutes(120);
    let ts = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S").to_string();

    // The first hour, while the collector runs.
    let collector = Collector::serve_with(&broker.url(), data.path(), "e2e-outage", &flags);
    let mut before = sim_config(broker.url(), devices, 1, 60, 21);
    before.start = start;
    simulate_in_background(before).join().expect("simulator");
    wait_for_input_drift_run(data.path(), outage, "true");
    collector.terminate();

    // The second hour arrives while it is down, input size +50 %.
    let mut during = sim_config(broker.url(), devices, 1, 60, 22);
    during.start = outage;
    during.drift = Some(Drift {
        at: 0,
        model_id: "model-0".into(),
        kind: DriftKind::Input,
        size: 0.5,
    });
    let summary = simulate_in_background(during).join().expect("simulator");
    assert_eq!(summary.acknowledged, u64::from(devices) * 60);
    let collector = Collector::serve_with(&broker.url(), data.path(), "e2e-outage", &flags);
    wait_for_input_drift_run(data.path(), last_end, "true");
    std::thread::sleep(Duration::from_secs(3));
    collector.terminate();

    // Every period of the outage once, each with all 40 devices present.
    let runs = query(
        data.path(),
        &format!(
            "SELECT count(*) AS runs, count(DISTINCT current_end) AS periods, \
                    min(devices_present) AS least, max(revision) AS revision \
             FROM detector_runs WHERE detector = 'input_drift' \
             AND current_end > TIMESTAMP '{}Z'",
            ts(outage)
        ),
    );
    assert_eq!(runs, [["4", "4", &devices.to_string(), "0"]]);
    // The drift is found in its first period, and not before.
    let first = query(
        data.path(),
        "SELECT replace(CAST(min(current_start) AS VARCHAR), ' ', 'T') AS t FROM drift_events \
         WHERE detector = 'input_drift'",
    );
    assert!(first[0][0].starts_with(&ts(outage)), "{first:?}");
    let events = query(
        data.path(),
        "SELECT detector, CAST(current_end AS VARCHAR) AS e, severity, revision FROM drift_events ORDER BY 2",
    );
    // One job, dispatched once.
    assert_eq!(
        query(
            data.path(),
            "SELECT count(*) AS jobs, max(status) AS status FROM retrain_jobs"
        ),
        [["1", "dispatched"]],
        "{events:?}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// While the lake cannot be written, the collector stops reading from the
/// broker once `--flush-rows` rows wait for a flush that failed, so the
/// backlog waits at the broker and not in the collector's memory; it
/// retries at every flush interval, and once the lake is writable again
/// every window is stored, once.
#[test]
fn a_failing_lake_keeps_the_backlog_at_the_broker_and_loses_nothing() {
    let broker = Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), UNBOUNDED_QUEUE);
    let data = tempfile::tempdir().expect("tempdir");
    // A file where the metrics partitions' directories go: every write of
    // `metrics` fails, even for root.
    let gens = data.path().join("_driftline").join("gens");
    std::fs::create_dir_all(&gens).expect("mkdir");
    std::fs::write(gens.join("metrics"), b"not a directory").expect("block the lake");
    let metrics_port = free_port();
    let collector = Collector::serve_with(
        &broker.url(),
        data.path(),
        "e2e-failing-lake",
        &[
            "--flush-rows",
            "10",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let (devices, models, windows) = (10u32, 1u32, 8u64);
    let expected = u64::from(devices * models) * windows;
    let summary = simulate_in_background(sim_config(broker.url(), devices, models, windows, 11))
        .join()
        .expect("simulator thread");
    assert_eq!(summary.acknowledged, expected);
    collector.wait_for_log("flush failed", Duration::from_secs(15));
    // Several retries (every 300 ms) later, the collector holds no more
    // than twice --flush-rows windows: it read no further from the broker.
    std::thread::sleep(Duration::from_secs(2));
    let metrics = http_get(metrics_port, "/metrics");
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}")) as u64
    };
    let accepted = counter("driftline_messages_accepted_total");
    assert!(counter("driftline_flush_errors_total") >= 2, "{metrics}");
    assert!(
        accepted <= 2 * 10 && accepted < expected,
        "the collector kept reading from the broker while the lake failed: {accepted} windows accepted"
    );
    std::fs::remove_file(gens.join("metrics")).expect("unblock the lake");
    let (n, keys) = wait_for_rows(data.path(), expected, Duration::from_secs(30));
    assert_eq!((n, keys), (expected, expected));
    collector.terminate();
}
