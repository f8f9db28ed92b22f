//! End-to-end tests of `driftline-agent run` with a real Mosquitto:
//! local HTTP ingest, store-and-forward across a broker outage and a
//! `kill -9`, retained status and last will.
//!
//! Mosquitto and curl are required: these tests fail, never skip, when
//! they are missing (.ci/run installs them).

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driftline_core::status::{DeviceState, StatusReport};
use driftline_core::wire::{self, Mechanism};
use driftline_testkit::{free_port, make_certificates, wait_for, Mosquitto};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const AGENT: &str = env!("CARGO_BIN_EXE_driftline-agent");

fn write_config(dir: &Path, broker_port: u16, http_port: u16) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
device_id = "dev-1"
fleet = "e2e"
broker = "mqtt://127.0.0.1:{broker_port}"
state_dir = "{state}"
window = "1s"
[privacy]
# Little noise (b = 7 x 1000 / 20000 = 0.35 per count), so the tests can see
# the events: a test setting, far from private.
mechanism = "laplace"
epsilon = 20000.0
max_events_per_window = 1000
device_day_epsilon = 1e12
budget_rho = 1e12
[http]
listen = "127.0.0.1:{http_port}"
[[models]]
id = "classifier"
version = "1.0.0"
labels = ["cat", "dog"]
[[models.custom]]
name = "brightness"
edges = [0, 0.5, 1]
"#,
            state = dir.join("state").display()
        ),
    )
    .expect("write config");
    path
}

/// A running `driftline-agent run`, killed and reaped on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(config: &Path, http_port: u16) -> Agent {
    let child = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agent");
    wait_for("the agent's HTTP ingest", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    Agent(child)
}

/// POSTs `body` to the agent; returns the HTTP status code.
fn post(http_port: u16, body: &str) -> u16 {
    use std::io::Write;
    let mut curl = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--data-binary",
            "@-",
        ])
        .arg(format!("http://127.0.0.1:{http_port}/v1/events"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl must be installed (apt-get install curl)");
    if let Some(mut stdin) = curl.stdin.take() {
        stdin.write_all(body.as_bytes()).expect("write body");
    }
    let out = curl.wait_with_output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A persistent MQTT session that collects every message on the fleet's topics.
fn probe(port: u16) -> (Client, rumqttc::Connection) {
    probe_as(port, None)
}

/// [`probe`], logging in with `credentials`.
fn probe_as(port: u16, credentials: Option<(&str, &str)>) -> (Client, rumqttc::Connection) {
    let mut options = MqttOptions::new("e2e-probe", "127.0.0.1", port);
    options.set_clean_session(false);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(options, 64);
    client
        .subscribe("driftline/v1/e2e/#", QoS::AtLeastOnce)
        .expect("subscribe");
    for event in connection.iter() {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = event {
            break;
        }
    }
    (client, connection)
}

#[test]
fn windows_survive_a_broker_outage_and_a_kill_and_arrive_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker_port, http_port) = (free_port(), free_port());
    let config = write_config(dir.path(), broker_port, http_port);

    // Create the probe's persistent session, then take the broker down.
    let broker = Mosquitto::persistent(dir.path(), broker_port);
    drop(probe(broker_port));
    broker.stop();

    // The agent starts with no broker; windows go to disk.
    let mut agent = start_agent(&config, http_port);
    let event = r#"{"type":"inference","model_id":"classifier","model_version":"1.0.0","latency_ms":12.5,"confidence":0.9,"label":"cat"}"#;
    let buffer = dir.path().join("state/buffer");
    let buffered_bytes = || -> u64 {
        std::fs::read_dir(&buffer)
            .expect("buffer dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    // At least 2 s of events (two 1-s windows), longer on a loaded machine
    // until windows are on disk.
    let until = Instant::now() + Duration::from_secs(30);
    let mut posted = 0i64;
    for i in 0.. {
        assert_eq!(post(http_port, event), 202);
        posted += 1;
        std::thread::sleep(Duration::from_millis(100));
        if i >= 20 && (buffered_bytes() > 1000 || Instant::now() > until) {
            break;
        }
    }
    // kill -9 mid-outage, then restart on the same state directory.
    let killed_at = chrono::Utc::now();
    agent.0.kill().expect("kill -9");
    agent.0.wait().expect("wait");
    let buffered = buffered_bytes();
    assert!(
        buffered > 1000,
        "windows were buffered on disk ({buffered} bytes)"
    );
    let mut agent = start_agent(&config, http_port);
    for _ in 0..10 {
        assert_eq!(post(http_port, event), 202);
        posted += 1;
        std::thread::sleep(Duration::from_millis(100));
    }

    // The broker returns; the probe's session collects what arrives.
    let broker = Mosquitto::persistent(dir.path(), broker_port);
    let broker_up = chrono::Utc::now();
    let (_client, mut connection) = probe(broker_port);
    let mut reports = Vec::new();
    let mut statuses = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    let mut stopped = false;
    while Instant::now() < until {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.ends_with("/metrics") => {
                reports.push(wire::accept(&p.topic, &p.payload, &bounds()).expect("valid window"));
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                statuses.push(StatusReport::decode(&p.payload).expect("valid status"));
            }
            _ => {}
        }
        // Once the backlog is in (windows are live again), stop gracefully.
        if !stopped && reports.iter().any(|r| r.window_start > broker_up) {
            let _ = Command::new("kill")
                .args(["-TERM", &agent.0.id().to_string()])
                .status();
            let status = agent.0.wait().expect("wait");
            assert!(status.success(), "agent exits 0 on SIGTERM");
            stopped = true;
        }
        if stopped
            && statuses
                .last()
                .is_some_and(|s| s.state == DeviceState::Offline)
        {
            break;
        }
    }
    assert!(
        stopped,
        "the agent drained its buffer; got {} windows, statuses {statuses:?}",
        reports.len()
    );
    assert_eq!(
        statuses.last().map(|s| s.state),
        Some(DeviceState::Offline),
        "goodbye status"
    );

    // Exactly once: no window twice, seq strictly increasing in order of arrival.
    let keys: BTreeSet<_> = reports
        .iter()
        .map(|r| (r.model_id.clone(), r.window_start))
        .collect();
    assert_eq!(keys.len(), reports.len(), "a window arrived twice");
    assert!(
        reports.windows(2).all(|w| w[0].seq < w[1].seq),
        "in order, seq increasing"
    );
    assert!(reports
        .windows(2)
        .all(|w| w[0].window_start < w[1].window_start));
    assert!(reports
        .iter()
        .all(|r| r.privacy.mechanism == Mechanism::Laplace));
    // The windows closed before the kill were delivered.
    let before_kill = reports
        .iter()
        .filter(|r| r.window_start + chrono::TimeDelta::seconds(1) <= killed_at)
        .count();
    assert!(
        before_kill >= 1,
        "windows closed before the kill arrived (killed at {killed_at}): {:?}",
        reports.iter().map(|r| r.window_start).collect::<Vec<_>>()
    );
    // The events of the window open at the kill (at most 10: one event per
    // 100 ms, 1-s windows) are lost, all others arrive. The Laplace noise
    // (b = 0.35 per window) sums to a standard deviation of about
    // 0.5 x sqrt(windows); 6 of those bound it.
    let noisy_total: i64 = reports.iter().map(|r| r.inference_count).sum();
    let slack = (6.0 * 0.5 * (reports.len() as f64).sqrt()).ceil() as i64;
    assert!(
        (posted - 10 - slack..=posted + slack).contains(&noisy_total),
        "{posted} events posted, {noisy_total} in the noised counts of {} windows",
        reports.len()
    );
    broker.stop();
}

fn bounds() -> wire::TimeBounds {
    wire::TimeBounds {
        now: chrono::Utc::now(),
        max_age: chrono::TimeDelta::hours(1),
        max_future: chrono::TimeDelta::minutes(5),
    }
}

#[test]
fn local_ingest_refuses_bad_requests_with_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker_port, http_port) = (free_port(), free_port());
    let config = write_config(dir.path(), broker_port, http_port);
    let _agent = start_agent(&config, http_port);
    let ok = r#"[{"type":"inference","model_id":"classifier","model_version":"1.0.0","latency_ms":3},
                 {"type":"feedback","model_id":"classifier","model_version":"1.0.0","kind":"negative"}]"#;
    assert_eq!(post(http_port, ok), 202);
    assert_eq!(post(http_port, "not json"), 400);
    assert_eq!(
        post(
            http_port,
            r#"{"type":"inference","model_id":"classifier","model_version":"1.0.0","latency_ms":"fast"}"#
        ),
        400
    );
    assert_eq!(
        post(
            http_port,
            r#"{"type":"inference","model_id":"classifier","model_version":"1.0.0","latency_ms":3,"prompt":"raw text"}"#
        ),
        400
    );
    assert_eq!(
        post(
            http_port,
            r#"{"type":"inference","model_id":"other","model_version":"1.0.0","latency_ms":3}"#
        ),
        422
    );
    let with_custom = |feature: &str| {
        format!(
            r#"{{"type":"inference","model_id":"classifier","model_version":"1.0.0","latency_ms":3,"custom":{{"{feature}":0.7}}}}"#
        )
    };
    assert_eq!(post(http_port, &with_custom("brightness")), 202);
    assert_eq!(
        post(http_port, &with_custom("loudness")),
        400,
        "undeclared custom feature"
    );
    // Clipped values are counted in the local status only.
    assert_eq!(
        post(
            http_port,
            r#"{"type":"inference","model_id":"classifier","model_version":"1.0.0","latency_ms":-1,"confidence":3}"#
        ),
        202
    );
    let local = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{http_port}/v1/status")])
        .output()
        .expect("curl");
    let status: serde_json::Value = serde_json::from_slice(&local.stdout).expect("status JSON");
    assert_eq!(status["local"]["clipped_values"], 2, "{status}");
    assert_eq!(
        status["local"]["capped_events"], 0,
        "K is 1000 here: {status}"
    );
    assert_eq!(status["local"]["events_accepted"], 4, "{status}");
    assert_eq!(status["local"]["requests_refused"], 5, "{status}");
    assert_eq!(status["status"]["device_id"], "dev-1");
    let huge = format!("[{}]", vec![r#"{"type":"feedback","model_id":"classifier","model_version":"1.0.0","kind":"positive"}"#; 10_001].join(","));
    assert_eq!(post(http_port, &huge), 413);
}

#[test]
fn check_config_accepts_the_example_and_names_mistakes() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
    let out = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(&example)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intent-classifier"));
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "window = \"90m\"\n[[models]]\nid = \"m\"\nversion = \"1\"\nlabels = [\"a b\"]\n",
    )
    .expect("write");
    let out = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("labels"),
        "{err}"
    );
}

/// Privacy noise must come from a CSPRNG: opendp draws from OpenSSL only
/// with its `use-openssl` feature (otherwise it falls back to a
/// non-cryptographic generator whose noise can be predicted and subtracted).
/// Check that the feature is on in this build, and that the binary links
/// the system's libcrypto (`OPENSSL_NO_VENDOR`), not a vendored copy.
#[test]
fn noise_comes_from_openssl_csprng() {
    let tree = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "driftline-agent",
            "-e",
            "features",
            "-i",
            "opendp",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(
        tree.status.success(),
        "{}",
        String::from_utf8_lossy(&tree.stderr)
    );
    let features = String::from_utf8_lossy(&tree.stdout);
    assert!(
        features
            .lines()
            .any(|l| l.trim() == "opendp feature \"use-openssl\""),
        "opendp is built without use-openssl:\n{features}"
    );
    let ldd = Command::new("ldd").arg(AGENT).output().expect("ldd");
    let linked = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        linked
            .lines()
            .any(|l| l.trim_start().starts_with("libcrypto.so")),
        "the agent does not link the system libcrypto:\n{linked}"
    );
}

#[test]
fn publishes_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_certificates(d);
    let (broker_port, http_port) = (free_port(), free_port());
    let broker = Mosquitto::on_port(
        d,
        broker_port,
        &format!(
            "require_certificate true\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            d.display()
        ),
    );
    let tls = |name: &str| d.join(name).display().to_string();
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &broker_port.to_string(),
            "--cafile",
            &tls("ca.pem"),
        ])
        .args(["--cert", &tls("client.pem"), "--key", &tls("client.key")])
        .args([
            "-t",
            "driftline/v1/e2e/dev-1/metrics",
            "-C",
            "1",
            "-W",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(300));

    let config = write_config(d, broker_port, http_port);
    let text = std::fs::read_to_string(&config)
        .expect("read config")
        .replace(
            &format!("mqtt://127.0.0.1:{broker_port}"),
            &format!("mqtts://localhost:{broker_port}"),
        )
        + &format!(
            "[mqtt]\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            tls("ca.pem"),
            tls("client.pem"),
            tls("client.key")
        );
    std::fs::write(&config, text).expect("write config");
    let _agent = start_agent(&config, http_port);
    let out = sub.wait_with_output().expect("mosquitto_sub");
    assert!(
        out.status.success(),
        "no window arrived over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = wire::accept(
        "driftline/v1/e2e/dev-1/metrics",
        out.stdout.trim_ascii(),
        &bounds(),
    )
    .expect("a valid window over TLS");
    assert_eq!(report.device_id, "dev-1");
    drop(broker);
}

#[test]
fn publishes_over_mqtt_5_and_the_last_will_reports_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker_port, http_port) = (free_port(), free_port());
    let _broker = Mosquitto::persistent(dir.path(), broker_port);
    let (_client, mut connection) = probe(broker_port);
    let config = write_config(dir.path(), broker_port, http_port);
    let text = std::fs::read_to_string(&config).expect("read") + "[mqtt]\nprotocol = \"5\"\n";
    std::fs::write(&config, text).expect("write");
    let mut agent = start_agent(&config, http_port);

    let mut got_window = false;
    let mut killed = false;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            connection.recv_timeout(Duration::from_millis(200))
        else {
            continue;
        };
        if p.topic.ends_with("/metrics") {
            wire::accept(&p.topic, &p.payload, &bounds()).expect("valid window over MQTT 5");
            got_window = true;
            if !killed {
                agent.0.kill().expect("kill -9");
                agent.0.wait().expect("wait");
                killed = true;
            }
        } else if killed {
            let status = StatusReport::decode(&p.payload).expect("status");
            if status.state == DeviceState::Offline {
                assert!(
                    p.retain || !p.dup,
                    "the will is a normal publish to subscribers"
                );
                return;
            }
        }
    }
    panic!("window over MQTT 5: {got_window}; the last will (offline) did not arrive");
}

/// Regression: a batch in flight when the broker dies must be sent again
/// after the reconnect. (The MQTT client drops un-acknowledged publishes of
/// a clean session on reconnect; the agent used to wait for their acks
/// forever and never send another window.)
#[test]
fn a_batch_in_flight_when_the_broker_dies_is_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker_port, http_port) = (free_port(), free_port());
    // Save sessions every second, so the probe's survives a kill -9.
    let start_broker = || {
        let extra = format!(
            "persistence true\nautosave_interval 1\npersistence_location {}/\n",
            dir.path().display()
        );
        Mosquitto::on_port(dir.path(), broker_port, &extra)
    };
    let broker = start_broker();
    drop(probe(broker_port));
    std::thread::sleep(Duration::from_millis(1500)); // the probe's session is saved
    let config = write_config(dir.path(), broker_port, http_port);
    let _agent = start_agent(&config, http_port);
    std::thread::sleep(Duration::from_secs(2));
    // Freeze the broker: the next windows are sent and never acknowledged.
    let pid = broker.pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill")
        .success());
    let frozen_at = chrono::Utc::now();
    std::thread::sleep(Duration::from_secs(3));
    drop(broker); // kill -9 (a stopped process still dies)
    let broker = start_broker();
    let (_client, mut connection) = probe(broker_port);
    let until = Instant::now() + Duration::from_secs(40);
    let mut starts = BTreeSet::new();
    while Instant::now() < until {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            connection.recv_timeout(Duration::from_millis(200))
        {
            if p.topic.ends_with("/metrics") {
                let r = wire::accept(&p.topic, &p.payload, &bounds()).expect("valid window");
                starts.insert(r.window_start);
            }
        }
        // Windows from the frozen period and after the restart both arrive.
        let frozen_window = starts
            .iter()
            .any(|t| *t >= frozen_at && *t < frozen_at + chrono::TimeDelta::seconds(3));
        let live_again = starts
            .iter()
            .any(|t| *t > chrono::Utc::now() - chrono::TimeDelta::seconds(3));
        if frozen_window && live_again {
            drop(broker);
            return;
        }
    }
    panic!("windows of the frozen period or after the restart are missing: {starts:?} (frozen at {frozen_at})");
}

#[test]
fn logs_in_with_username_and_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker_port, http_port) = (free_port(), free_port());
    let passwords = dir.path().join("passwords");
    for (user, password) in [("dev-1", "s3cret"), ("probe", "probe-pw")] {
        let mut cmd = Command::new("mosquitto_passwd");
        if !passwords.exists() {
            cmd.arg("-c");
        }
        let ok = cmd
            .arg("-b")
            .arg(&passwords)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd");
        assert!(ok.success());
    }
    // `with_config` writes `allow_anonymous true` first; the later line wins.
    let auth = format!(
        "password_file {}\nallow_anonymous false\n",
        passwords.display()
    );
    let _broker = Mosquitto::on_port(dir.path(), broker_port, &auth);
    let anonymous = Command::new("mosquitto_sub")
        .args([
            "-p",
            &broker_port.to_string(),
            "-t",
            "x",
            "-C",
            "1",
            "-W",
            "3",
        ])
        .output()
        .expect("mosquitto_sub");
    assert!(
        !anonymous.status.success(),
        "the broker must refuse anonymous clients"
    );
    let (_client, mut connection) = probe_as(broker_port, Some(("probe", "probe-pw")));
    let config = write_config(dir.path(), broker_port, http_port);
    let text = std::fs::read_to_string(&config).expect("read")
        + "[mqtt]\nusername = \"dev-1\"\npassword = \"s3cret\"\n";
    std::fs::write(&config, text).expect("write");
    let _agent = start_agent(&config, http_port);
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            connection.recv_timeout(Duration::from_millis(200))
        {
            if p.topic.ends_with("/metrics") {
                wire::accept(&p.topic, &p.payload, &bounds()).expect("valid window");
                return;
            }
        }
    }
    panic!("no window arrived through a broker that requires a password");
}

/// Every file of a state directory, with its length and content.
fn state_files(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read state dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).expect("read"));
            }
        }
    }
    files
}

/// `driftline-agent run` to completion (it must exit on its own): exit
/// success and stderr.
fn run_to_exit(config: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_second_agent_on_the_same_state_dir_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = free_port();
    // Hour-long windows: the running agent spends nothing during the test,
    // so any change to its state directory would be the second agent's.
    let config = write_config(dir.path(), free_port(), http);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("window = \"1s\"", "window = \"1h\"")).expect("write");
    let _first = start_agent(&config, http);
    let state = dir.path().join("state");
    let before = state_files(&state);
    assert!(
        before.keys().any(|p| p.ends_with("budget.ledger")),
        "{before:?}"
    );
    // The second one is given another port: it must stop at the lock, not
    // at the port, and before it reads or writes anything.
    let second = dir.path().join("second.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let second_port = free_port();
    std::fs::write(
        &second,
        text.replace(
            &format!("127.0.0.1:{http}"),
            &format!("127.0.0.1:{second_port}"),
        ),
    )
    .expect("write");
    let (ok, err) = run_to_exit(&second, &[]);
    assert!(!ok, "the second agent must refuse to run");
    assert!(err.contains("in use by another driftline-agent"), "{err}");
    assert_eq!(
        state_files(&state),
        before,
        "the second agent changed the state directory"
    );
    assert!(TcpStream::connect(("127.0.0.1", second_port)).is_err());
}

#[test]
fn a_missing_ledger_is_refused_not_started_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = free_port();
    let config = write_config(dir.path(), free_port(), http);
    let state = dir.path().join("state");
    {
        let _agent = start_agent(&config, http);
        wait_for("a window spent", Duration::from_secs(20), || {
            std::fs::metadata(state.join("budget.ledger")).is_ok_and(|m| m.len() > 8)
        });
    }
    std::fs::remove_file(state.join("budget.ledger")).expect("delete the ledger");
    let (ok, err) = run_to_exit(&config, &[]);
    assert!(!ok, "an agent without its ledger must not start");
    assert!(
        err.contains("no budget.ledger") && err.contains("--reset-budget"),
        "{err}"
    );
    assert!(!state.join("budget.ledger").exists(), "nothing was created");
    // Said explicitly, it starts (with a warning) and keeps a new ledger.
    let child = Command::new(AGENT)
        .args(["run", "--reset-budget", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agent");
    let _agent = Agent(child);
    wait_for("the agent's HTTP ingest", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", http)).is_ok()
    });
    assert!(state.join("budget.ledger").exists());
}

/// `driftline-agent simulate` runs the simulator's own program
/// (`driftline-agent-simulate`, beside the agent) with its arguments, and
/// exits with its status.
#[test]
fn simulate_runs_the_fleet_simulator_program() {
    let broker = Mosquitto::start();
    let out = Command::new(AGENT)
        .args([
            "simulate",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", broker.port),
        ])
        .args(["--devices", "3", "--models", "2", "--windows", "2"])
        .output()
        .expect("driftline-agent simulate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("published 12 messages, 12 acknowledged by the broker"),
        "{stdout}"
    );
    let help = Command::new(AGENT)
        .args(["simulate", "--help"])
        .output()
        .expect("driftline-agent simulate --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Usage: driftline-agent simulate") && help.contains("--devices"),
        "{help}"
    );
    let refused = Command::new(AGENT)
        .args(["simulate", "--devices", "3"])
        .output()
        .expect("driftline-agent simulate without a broker");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--broker"),
        "{refused:?}"
    );
}
