//! End-to-end tests: a real Mosquitto started on a free port, the real
//! `driftline-collector` binary, devices publishing through the agent library
//! and through `mosquitto_pub`, and the lake read back with `query`.
//!
//! Mosquitto is required: these tests fail, never skip, when it is missing.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use driftline_core::broker::BrokerUrl;
use driftline_pipeline::ledger::Budget;
use driftline_pipeline::privacy::MechanismConfig;
use driftline_sim::{SimConfig, SimProgress};
use driftline_testkit::{free_port, make_certificates, wait_for_port, Mosquitto};
use tokio_util::sync::CancellationToken;

mod demo;
mod detection;
mod ingest;
mod sql;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_driftline-collector");

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
fn simulate_in_background(config: SimConfig) -> std::thread::JoinHandle<driftline_sim::SimSummary> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(driftline_sim::run(
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
