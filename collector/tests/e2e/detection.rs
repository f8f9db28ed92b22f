//! Detectors, their periods and revisions, retraining jobs and webhooks.

use super::*;

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
    use driftline_sim::{Drift, DriftKind};
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
    // Input +200 % from the second hour: large enough that the unseeded
    // privacy noise cannot hide it in its first period.
    config.drift = Some(driftline_sim::Drift {
        at: 60,
        model_id: "model-0".into(),
        kind: driftline_sim::DriftKind::Input,
        size: 2.0,
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
    // The drift is found where it starts.
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
    use driftline_sim::{Drift, DriftKind};
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

    // The second hour arrives while it is down, input size +200 %: a shift
    // the (unseeded) privacy noise cannot hide in its first period, which
    // at +50 % it did once in a few dozen runs. This test is about the
    // backlog, not about sensitivity (BENCHMARKS.md measures that).
    let mut during = sim_config(broker.url(), devices, 1, 60, 22);
    during.start = outage;
    during.drift = Some(Drift {
        at: 0,
        model_id: "model-0".into(),
        kind: DriftKind::Input,
        size: 2.0,
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
