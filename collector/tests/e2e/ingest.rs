//! Ingest: agents and hand-written messages through a real Mosquitto into
//! the lake exactly once, TLS and logins, crashes and shared subscriptions.

use super::*;

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
fn serve_reads_from_a_tls_broker_with_a_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
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
    let broker = Mosquitto::from_conf(&dir.path().join("mosquitto.conf"), port);
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
    // One window of `device` in `fleet`, `back` windows before one fixed
    // minute (taken once: a minute boundary passing during the test must
    // not make two of the windows one).
    let now = recent_window_start(60, 0);
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/v1/valid/laplace.json"),
    )
    .expect("fixture");
    let window = |fleet: &str, device: &str, back: i64| {
        let start =
            (now - TimeDelta::minutes(back)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        fixture
            .replace("2026-11-27T10:00:00Z", &start)
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
    drop(broker);
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

/// While the lake cannot be written, the collector holds at most twice
/// `--flush-rows` rows and reads nothing more from the broker, so the
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
