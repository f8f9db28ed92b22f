//! `driftline-collector demo`: the whole loop in one process, with no
//! external service. An embedded MQTT broker (rumqttd) on loopback, the
//! collector's subscriber writing the lake, and a simulated fleet that
//! backfills recent hours in accelerated event time up to the present, then
//! goes on live, with a latency drift injected into `model-0`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use driftline_core::broker::BrokerUrl;
use driftline_pipeline::ledger::Budget;
use driftline_pipeline::privacy::MechanismConfig;
use driftline_pipeline::window;
use driftline_sim::{Drift, DriftKind, SimConfig, SimProgress};
use tokio_util::sync::CancellationToken;

use crate::detect;
use crate::endpoint::{Endpoint, EndpointError, EndpointOptions};
use crate::ingest::{Counters, IngestLimits};
use crate::lake::{LakeError, LakeWriter};
use crate::query::{self, Format, QueryError};
use crate::retrain::{RetrainRule, Targets};
use crate::subscriber::{self, SubscriberError, SubscriberOptions};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long; `None` runs until cancelled.
    pub duration: Option<Duration>,
    pub data_dir: PathBuf,
    /// Where the embedded broker listens; port 0 picks a free port.
    pub mqtt_listen: SocketAddr,
    pub devices: u32,
    pub models: u32,
    /// Event time replayed before going live.
    pub backfill: Duration,
    pub window_secs: u32,
    pub epsilon: f64,
    /// Where the SQL endpoint listens (user `driftline`, password `driftline`).
    pub pg_listen: SocketAddr,
}

/// Events each simulated device counts per model and window (twice the
/// simulator's mean of 30).
const DEMO_MAX_EVENTS_PER_WINDOW: u32 = 60;

/// The demo's SQL login.
pub const DEMO_USER: &str = "driftline";
pub const DEMO_PASSWORD: &str = "driftline";

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot listen on {addr} for the embedded broker: {source}")]
    BrokerAddress {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded broker did not start: {0}")]
    Broker(String),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Subscriber(#[from] SubscriberError),
    #[error(transparent)]
    Simulation(#[from] driftline_sim::SimError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Detect(#[from] detect::DetectError),
}

/// What the demo did, for tests and the final printout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub published: u64,
    pub stored: u64,
    pub quarantined: u64,
}

/// Runs the demo until `options.duration` passes or `cancel` fires.
pub async fn run(
    options: DemoOptions,
    cancel: CancellationToken,
) -> Result<DemoSummary, DemoError> {
    let broker_addr = start_broker(options.mqtt_listen)?;
    let broker = BrokerUrl {
        host: broker_addr.ip().to_string(),
        port: broker_addr.port(),
        tls: false,
    };
    let lake = Arc::new(LakeWriter::open(&options.data_dir)?);
    crate::maintenance::backfill_edges(&lake);
    let lake_for_detection = lake.clone();

    let counters = Arc::new(Counters::default());
    let stop_collector = CancellationToken::new();
    let collector = tokio::spawn(subscriber::run(
        SubscriberOptions {
            broker: broker.clone(),
            client_id: "driftline-demo-collector".into(),
            flush_interval: Duration::from_secs(2),
            flush_rows: 50_000,
            limits: IngestLimits::default(),
            tls: Default::default(),
            credentials: None,
            share_group: None,
        },
        lake,
        counters.clone(),
        stop_collector.clone(),
    ));

    // The broker keeps nothing for a subscriber it has not seen yet: start
    // the fleet only once the collector's subscription is confirmed.
    let until = Instant::now() + Duration::from_secs(10);
    while counters.subscriptions.load(Ordering::Relaxed) == 0 {
        if Instant::now() > until || collector.is_finished() {
            return Err(DemoError::Broker(
                "the collector could not subscribe within 10 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let length = TimeDelta::seconds(i64::from(options.window_secs));
    let backfill_windows =
        i64::try_from(options.backfill.as_secs() / u64::from(options.window_secs)).unwrap_or(0);
    let start = window::align(Utc::now(), options.window_secs)
        - length * i32::try_from(backfill_windows).unwrap_or(0);
    // The drift starts 45 minutes before the present (two whole 15-minute
    // detection periods are then drifted by the time the fleet is live), or
    // two thirds into a shorter backfill.
    let drift_windows_back = 45 * 60 / i64::from(options.window_secs);
    let drift_at = if backfill_windows >= drift_windows_back * 2 {
        u64::try_from(backfill_windows - drift_windows_back).unwrap_or(0)
    } else {
        u64::try_from(backfill_windows * 2 / 3).unwrap_or(0)
    };
    let drift_time = start + length * i32::try_from(drift_at).unwrap_or(0);
    let sim = SimConfig {
        broker: broker.clone(),
        fleet: "demo".into(),
        devices: options.devices,
        models: options.models,
        windows: None,
        window_secs: options.window_secs,
        start,
        seed: 42,
        mechanism: MechanismConfig::Laplace {
            epsilon: options.epsilon,
        },
        events_per_window: 30.0,
        drift: Some(Drift {
            at: drift_at,
            model_id: "model-0".into(),
            kind: DriftKind::Latency,
            size: 0.5,
        }),
        live: true,
        budget: Budget {
            epsilon: None,
            delta: 1e-6,
            rho: None,
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        },
        max_events_per_window: DEMO_MAX_EVENTS_PER_WINDOW,
        first_device: 0,
        credentials: None,
        tls: Default::default(),
    };
    let guarantee = driftline_pipeline::guarantee::Report::of(
        sim.mechanism,
        &sim.budget,
        sim.window_secs,
        &(0..sim.models)
            .map(|m| {
                (
                    driftline_pipeline::window::ModelKey::new(format!("model-{m}"), "1.0.0"),
                    driftline_pipeline::window::ModelSpec::default()
                        .with_max_events_per_window(DEMO_MAX_EVENTS_PER_WINDOW),
                )
            })
            .collect::<Vec<_>>(),
    )
    .map_err(driftline_sim::SimError::from)?;

    let ctx = Arc::new(query::session_with_limit(&options.data_dir, Some(1 << 30)).await?);
    let endpoint = Endpoint::bind(
        ctx,
        EndpointOptions::new(
            options.pg_listen,
            vec![(DEMO_USER.into(), DEMO_PASSWORD.into())],
        ),
    )
    .await?;
    let pg_addr = endpoint
        .local_addr()
        .map_err(|e| DemoError::Broker(format!("SQL endpoint address: {e}")))?;
    let stop_endpoint = CancellationToken::new();
    let endpoint_task = tokio::spawn(endpoint.run(stop_endpoint.clone()));

    // Detectors run as event time advances; jobs go to a command that
    // files each job's evidence in the data dir.
    let queries = options.data_dir.join("_driftline").join("queries");
    detect::install_builtin(&queries)?;
    let inbox = options.data_dir.join("retrain-requests");
    std::fs::create_dir_all(&inbox).map_err(|e| DemoError::Broker(e.to_string()))?;
    let schedule = detect::Schedule::new(
        queries,
        RetrainRule::default(),
        Targets {
            command: Some(format!(
                "cat > '{}'/job-$(date +%s%N).json",
                inbox.display()
            )),
            ..Targets::default()
        },
    );
    let stop_detection = CancellationToken::new();
    let detection = tokio::spawn(detect::run_schedule(
        schedule,
        Arc::new(query::session(&options.data_dir).await?),
        lake_for_detection,
        Duration::from_secs(5),
        stop_detection.clone(),
        true,
    ));

    println!("Driftline demo");
    println!("  data dir     {}", options.data_dir.display());
    println!("  MQTT broker  {broker} (embedded)");
    println!(
        "  fleet        {} devices x {} models, {} s windows, epsilon {} per window",
        options.devices, options.models, options.window_secs, options.epsilon
    );
    println!(
        "  privacy      device-day epsilon {:.0} at delta 1e-6: a demonstration setting, not private \
         (the agent's default is 8; see docs/privacy.md)",
        guarantee.device_day.epsilon
    );
    println!("  event time   {start} .. now, then live");
    println!("  drift        model-0 latency +50% from {drift_time}");
    println!(
        "  SQL          psql \"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@{}:{}/driftline\"",
        pg_addr.ip(),
        pg_addr.port()
    );
    println!();

    inject_bad_messages(&broker).await;
    let progress = Arc::new(SimProgress::default());
    let stop_sim = CancellationToken::new();
    let fleet = tokio::spawn(driftline_sim::run(sim, progress.clone(), stop_sim.clone()));

    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    let mut announced_live = false;
    loop {
        if !announced_live
            && progress.caught_up.load(Ordering::Relaxed) >= u64::from(options.devices)
        {
            announced_live = true;
            println!(
                "[{:>4}s] caught up with the present: the fleet is live",
                started.elapsed().as_secs()
            );
        }
        let until_deadline = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(until_deadline) => if deadline.is_some() { break },
            _ = ticker.tick() => println!(
                "[{:>4}s] published {:>7}  stored {:>7}  quarantined {}",
                started.elapsed().as_secs(),
                progress.published.load(Ordering::Relaxed),
                counters.stored_windows.load(Ordering::Relaxed),
                counters.quarantined.load(Ordering::Relaxed),
            ),
        }
    }

    stop_sim.cancel();
    stop_detection.cancel();
    let _ = detection.await;
    let sim_summary = fleet
        .await
        .map_err(|e| driftline_sim::SimError::Task(e.to_string()))??;
    // Everything the broker acknowledged reaches the collector; wait for it.
    let wait_until = Instant::now() + Duration::from_secs(20);
    while counters.received.load(Ordering::Relaxed) < sim_summary.acknowledged
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_collector.cancel();
    collector
        .await
        .map_err(|e| DemoError::Broker(format!("collector task: {e}")))??;
    stop_endpoint.cancel();
    let _ = endpoint_task.await;

    let summary = DemoSummary {
        published: sim_summary.published,
        stored: counters.stored_windows.load(Ordering::Relaxed),
        quarantined: counters.stored_quarantine.load(Ordering::Relaxed),
    };
    println!();
    println!(
        "published {} windows, stored {}, quarantined {}",
        summary.published, summary.stored, summary.quarantined
    );
    let ctx = query::session(&options.data_dir).await?;
    let sql = "SELECT model_id, model_version, count(*) AS windows, \
               count(DISTINCT device_id) AS devices, sum(inference_count) AS inferences \
               FROM metrics GROUP BY model_id, model_version ORDER BY model_id";
    let batches = query::run(&ctx, sql).await?;
    println!("{}", query::render(&batches, Format::Table)?);
    println!();
    let events = query::run(
        &ctx,
        "SELECT detector, model_id, statistic, round(value, 3) AS value, severity, \
         current_end FROM drift_events ORDER BY current_end, detector",
    )
    .await?;
    println!("Drift events:");
    println!("{}", query::render(&events, Format::Table)?);
    let jobs = query::run(
        &ctx,
        "SELECT job_id, model_id, status, created_at FROM retrain_jobs ORDER BY created_at",
    )
    .await?;
    println!("Retraining jobs (evidence in {}):", inbox.display());
    println!("{}", query::render(&jobs, Format::Table)?);
    println!();
    println!("Query the lake:");
    println!(
        "  driftline-collector query --data-dir {} \"select model_id, count(*) from metrics group by 1\"",
        options.data_dir.display()
    );
    Ok(summary)
}

/// A misbehaving device: three messages the collector must quarantine (so
/// the quarantine table and its dashboard panel have something to show).
async fn inject_bad_messages(broker: &BrokerUrl) {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let options = MqttOptions::new(
        "driftline-demo-bad-device",
        broker.host.clone(),
        broker.port,
    );
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let topic = driftline_core::topic::metrics_topic("demo", "broken-device");
    let bad: [&[u8]; 3] = [
        b"{ not json",
        br#"{"schema_version": 99}"#,
        br#"{"schema_version": 1, "device_id": "broken-device"}"#,
    ];
    for payload in bad {
        let _ = client.try_publish(&topic, QoS::AtLeastOnce, false, payload.to_vec());
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
                break;
            }
        }
    })
    .await;
}

/// Starts rumqttd on its own thread and waits until it accepts connections.
fn start_broker(listen: SocketAddr) -> Result<SocketAddr, DemoError> {
    // Bind once ourselves: this picks a free port for port 0 and reports a
    // taken address clearly instead of connecting to someone else's broker.
    let addr = TcpListener::bind(listen)
        .and_then(|l| l.local_addr())
        .map_err(|source| DemoError::BrokerAddress {
            addr: listen,
            source,
        })?;
    let config = format!(
        r#"
id = 0
[router]
max_connections = 100000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "demo"
listen = "{addr}"
next_connection_delay_ms = 0
  [v4.1.connections]
  connection_timeout_ms = 60000
  max_payload_size = 1048576
  max_inflight_count = 500
  dynamic_filters = true
"#
    );
    let config: rumqttd::Config =
        toml::from_str(&config).map_err(|e| DemoError::Broker(e.to_string()))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| DemoError::Broker(e.to_string()))?;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(DemoError::Broker(format!(
        "not listening on {addr} after 10 s"
    )))
}
