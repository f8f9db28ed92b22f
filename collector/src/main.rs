//! `driftline-collector`: see `driftline-collector --help` and README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use driftline_collector::config::{ServeConfig, ServeFile, DEFAULT_DATA_DIR};
use driftline_collector::demo::{self, DemoOptions};
use driftline_collector::endpoint::Endpoint;
use driftline_collector::ingest::Counters;
use driftline_collector::lake::{LakeWriter, Location};
use driftline_collector::query::{self, Format};
use driftline_collector::{detect, maintenance, observe, retrain, subscriber};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: ingest makes many small
/// allocations per message (BENCHMARKS.md, "Ingest profile").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "driftline-collector",
    version,
    about = "Driftline collector: MQTT ingest into a Parquet lake, SQL over it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole system in one process: embedded broker, collector, simulated fleet.
    Demo(DemoArgs),
    /// Long-running collector against an external MQTT broker.
    Serve(Box<ServeArgs>),
    /// Run one SQL statement over the lake and print the result.
    Query(QueryArgs),
    /// Merge small files and apply retention once, then exit.
    Compact(CompactArgs),
    /// Run every detector once, record drift events and retraining jobs.
    Detect(Box<DetectArgs>),
    /// Record a retraining job's state reported by the training system.
    JobStatus(JobStatusArgs),
    /// Check messages as ingest would: JSON lines {"topic", "payload"} in,
    /// one {"accepted", "reason", "detail"} line out per message.
    Validate(driftline_collector::validate::ValidateArgs),
}

#[derive(clap::Args)]
struct DetectArgs {
    /// Lake directory.
    #[arg(long, env = "DRIFTLINE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The lake on S3 or an S3-compatible store, s3://bucket/prefix
    /// (credentials and endpoint from AWS_* variables). Default: the data
    /// directory.
    #[arg(long, env = "DRIFTLINE_LAKE")]
    lake: Option<String>,
    /// Folder of detector SQL files. Default: the built-in detectors.
    #[arg(long, env = "DRIFTLINE_QUERIES")]
    queries: Option<PathBuf>,
    /// Evaluate as of this event time (RFC 3339). Default: the latest data.
    #[arg(long, env = "DRIFTLINE_AT", conflicts_with = "since")]
    at: Option<chrono::DateTime<chrono::Utc>>,
    /// Evaluate every period that ends after this event time (RFC 3339),
    /// in order, up to --until; periods already evaluated are not recorded
    /// again.
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// With --since: the last period end to evaluate. Default: the latest
    /// data.
    #[arg(long, requires = "since")]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Print each detector's SQL for that time (placeholders filled) and
    /// exit without running anything.
    #[arg(long)]
    print_sql: bool,
    /// Without --at or --since: a period whose reference devices have not
    /// all reported past its end is evaluated only once it ended this long
    /// ago (wall clock); until then detection stops before it.
    #[arg(long, env = "DRIFTLINE_DETECT_LATENESS", default_value = "5m", value_parser = humantime::parse_duration)]
    detect_lateness: Duration,
    /// How far back (event time) a detector that never ran is evaluated.
    #[arg(long, env = "DRIFTLINE_DETECT_HORIZON", default_value = "1d", value_parser = humantime::parse_duration)]
    detect_horizon: Duration,
    #[command(flatten)]
    retrain: RetrainArgs,
}

#[derive(clap::Args, Clone)]
struct RetrainArgs {
    /// POST retraining jobs (JSON evidence) to this URL.
    #[arg(long, env = "DRIFTLINE_RETRAIN_WEBHOOK")]
    retrain_webhook: Option<String>,
    /// HMAC-SHA256 key: the webhook's X-Driftline-Signature header.
    #[arg(long, env = "DRIFTLINE_RETRAIN_SECRET", hide_env_values = true)]
    retrain_secret: Option<String>,
    /// HMAC-SHA256 key job reports (POST /v1/jobs/{id}/status) must be
    /// signed with. Default: --retrain-secret (a signature covers the
    /// method and path, so a webhook's cannot pass for a report).
    #[arg(long, env = "DRIFTLINE_JOB_REPORT_SECRET", hide_env_values = true)]
    job_report_secret: Option<String>,
    /// Run this shell command per job, the evidence JSON on stdin.
    #[arg(long, env = "DRIFTLINE_RETRAIN_COMMAND")]
    retrain_command: Option<String>,
    /// Publish each job's evidence to this MQTT topic (QoS 1), on the
    /// collector's broker (`serve`) or `--retrain-broker` (`detect`).
    #[arg(long, env = "DRIFTLINE_RETRAIN_MQTT_TOPIC")]
    retrain_mqtt_topic: Option<String>,
    /// Broker for --retrain-mqtt-topic (mqtt:// or mqtts://). `serve` uses
    /// its own broker and login by default.
    #[arg(long, env = "DRIFTLINE_RETRAIN_BROKER")]
    retrain_broker: Option<String>,
    /// Periods in a row a model must drift before a job opens.
    #[arg(long, env = "DRIFTLINE_RETRAIN_CONSECUTIVE", default_value_t = 2)]
    retrain_consecutive: u32,
    /// Least time (event time) between two jobs of one model.
    #[arg(long, env = "DRIFTLINE_RETRAIN_COOLDOWN", default_value = "6h", value_parser = humantime::parse_duration)]
    retrain_cooldown: Duration,
    /// A job whose drifted period ended longer ago than this (a backfill,
    /// a catch-up after an outage) is recorded as `stale`, not dispatched.
    #[arg(long, env = "DRIFTLINE_RETRAIN_MAX_AGE", default_value = "1d", value_parser = humantime::parse_duration)]
    retrain_max_age: Duration,
    /// Lowest severity that counts: warning or critical.
    #[arg(
        long,
        env = "DRIFTLINE_RETRAIN_MIN_SEVERITY",
        default_value = "warning"
    )]
    retrain_min_severity: String,
}

impl RetrainArgs {
    fn rule(&self) -> retrain::RetrainRule {
        retrain::RetrainRule {
            detectors: Vec::new(),
            min_severity: self.retrain_min_severity.clone(),
            consecutive: self.retrain_consecutive,
            cooldown: self.retrain_cooldown,
            max_age: self.retrain_max_age,
        }
    }

    /// Where jobs go; `subscriber` gives `serve`'s broker and login.
    fn targets(
        &self,
        subscriber: Option<&subscriber::SubscriberOptions>,
    ) -> anyhow::Result<retrain::Targets> {
        let mqtt = match (&self.retrain_mqtt_topic, &self.retrain_broker, subscriber) {
            (None, _, _) => None,
            (Some(topic), Some(url), _) => Some(retrain::MqttTarget {
                broker: url.parse().context("--retrain-broker")?,
                topic: topic.clone(),
                credentials: None,
                tls: Default::default(),
            }),
            (Some(topic), None, Some(s)) => Some(retrain::MqttTarget {
                broker: s.broker.clone(),
                topic: topic.clone(),
                credentials: s.credentials.clone(),
                tls: s.tls.clone(),
            }),
            (Some(_), None, None) => anyhow::bail!("--retrain-mqtt-topic needs --retrain-broker"),
        };
        Ok(retrain::Targets {
            webhook: self.retrain_webhook.clone(),
            secret: self.retrain_secret.clone(),
            command: self.retrain_command.clone(),
            mqtt,
        })
    }
}

#[derive(clap::Args)]
struct JobStatusArgs {
    /// Lake directory.
    #[arg(long, env = "DRIFTLINE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The lake on S3 or an S3-compatible store, s3://bucket/prefix
    /// (credentials and endpoint from AWS_* variables). Default: the data
    /// directory.
    #[arg(long, env = "DRIFTLINE_LAKE")]
    lake: Option<String>,
    /// The job id (X-Driftline-Job of the webhook, job_id in retrain_jobs).
    job_id: String,
    /// acknowledged, succeeded or failed.
    status: String,
    /// Free text kept with the state (e.g. a training run's URL).
    #[arg(long)]
    detail: Option<String>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Stop after this long (30s, 5m, 2h). Default: until Ctrl-C.
    #[arg(long, env = "DRIFTLINE_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Lake directory. Default: a fresh folder under the system temp dir.
    #[arg(long, env = "DRIFTLINE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the embedded MQTT broker. Default: a free port on loopback.
    #[arg(long, env = "DRIFTLINE_MQTT_LISTEN", default_value = "127.0.0.1:0")]
    mqtt_listen: SocketAddr,
    /// Simulated devices.
    #[arg(long, env = "DRIFTLINE_DEVICES", default_value_t = 200)]
    devices: u32,
    /// Models per device.
    #[arg(long, env = "DRIFTLINE_MODELS", default_value_t = 2)]
    models: u32,
    /// Event time replayed before going live (30m, 3h).
    #[arg(long, env = "DRIFTLINE_BACKFILL", default_value = "90m", value_parser = humantime::parse_duration)]
    backfill: Duration,
    /// Epsilon spent per window by each simulated device, for its whole
    /// window of at most 60 events (the default keeps the noise at 7 per
    /// count, so that 200 devices show the drift within minutes; it is a
    /// demonstration setting, not a private one: docs/privacy.md).
    #[arg(long, env = "DRIFTLINE_EPSILON", default_value_t = 60.0)]
    epsilon: f64,
    /// SQL endpoint (PostgreSQL wire protocol); user and password `driftline`.
    #[arg(long, env = "DRIFTLINE_PG_LISTEN", default_value = "127.0.0.1:5433")]
    pg_listen: SocketAddr,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (see collector/collector.example.toml).
    #[arg(long, env = "DRIFTLINE_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT broker, mqtt://host:port. Default: mqtt://127.0.0.1:1883
    #[arg(long, env = "DRIFTLINE_BROKER")]
    broker: Option<String>,
    /// Lake directory. Default: ./driftline-data. With --lake: where the
    /// write-ahead log and other local state live.
    #[arg(long, env = "DRIFTLINE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The lake on S3 or an S3-compatible store, s3://bucket/prefix
    /// (credentials and endpoint from AWS_* variables). Default: the data
    /// directory.
    #[arg(long, env = "DRIFTLINE_LAKE")]
    lake: Option<String>,
    /// MQTT client id (the broker keeps the persistent session under it).
    #[arg(long, env = "DRIFTLINE_CLIENT_ID")]
    client_id: Option<String>,
    /// How often received rows are written to Parquet. Default: 10s
    #[arg(long, env = "DRIFTLINE_FLUSH_INTERVAL", value_parser = humantime::parse_duration)]
    flush_interval: Option<Duration>,
    /// Pending rows that trigger an early flush. Default: 50000
    #[arg(long, env = "DRIFTLINE_FLUSH_ROWS")]
    flush_rows: Option<usize>,
    /// Oldest accepted window start, relative to reception. Default: 30d
    #[arg(long, env = "DRIFTLINE_MAX_EVENT_AGE", value_parser = humantime::parse_duration)]
    max_event_age: Option<Duration>,
    /// How far past the collector's clock a window may end. Default: 1h
    #[arg(long, env = "DRIFTLINE_MAX_FUTURE_SKEW", value_parser = humantime::parse_duration)]
    max_future_skew: Option<Duration>,
    /// Quarantine rows kept per device and hour, so that one device cannot
    /// fill the disk; further refused messages are counted
    /// (driftline_quarantine_over_quota_total). Default: 1000
    #[arg(long, env = "DRIFTLINE_QUARANTINE_QUOTA")]
    quarantine_quota: Option<u32>,
    /// CA certificates (PEM) for an mqtts:// broker. Default: the system's roots.
    #[arg(long, env = "DRIFTLINE_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that require one.
    #[arg(long, env = "DRIFTLINE_TLS_CLIENT_CERT")]
    tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "DRIFTLINE_TLS_CLIENT_KEY")]
    tls_client_key: Option<PathBuf>,
    /// Broker username.
    #[arg(long, env = "DRIFTLINE_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// Broker password.
    #[arg(long, env = "DRIFTLINE_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// Shared-subscription group: collectors of one group split the stream.
    #[arg(long, env = "DRIFTLINE_SHARE_GROUP")]
    share_group: Option<String>,
    /// How often small files are compacted. Default: 10m
    #[arg(long, env = "DRIFTLINE_COMPACT_INTERVAL", value_parser = humantime::parse_duration)]
    compact_interval: Option<Duration>,
    /// Files a partition needs before it is compacted. Default: 8
    #[arg(long, env = "DRIFTLINE_COMPACT_MIN_FILES")]
    compact_min_files: Option<usize>,
    /// Delete partitions older than this (30d, 52w). Default: keep forever.
    #[arg(long, env = "DRIFTLINE_RETENTION", value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// SQL endpoint address. Default: 127.0.0.1:5433
    #[arg(long, env = "DRIFTLINE_PG_LISTEN")]
    pg_listen: Option<SocketAddr>,
    /// SQL endpoint user. Default: driftline
    #[arg(long, env = "DRIFTLINE_PG_USER")]
    pg_user: Option<String>,
    /// SQL endpoint password; without one (and no pg_users in the file) the
    /// endpoint stays off.
    #[arg(long, env = "DRIFTLINE_PG_PASSWORD", hide_env_values = true)]
    pg_password: Option<String>,
    /// PEM certificate chain: the endpoint offers TLS.
    #[arg(long, env = "DRIFTLINE_PG_TLS_CERT")]
    pg_tls_cert: Option<PathBuf>,
    /// PEM private key of --pg-tls-cert.
    #[arg(long, env = "DRIFTLINE_PG_TLS_KEY")]
    pg_tls_key: Option<PathBuf>,
    /// Concurrent SQL connections. Default: 64
    #[arg(long, env = "DRIFTLINE_PG_MAX_CONNECTIONS")]
    pg_max_connections: Option<usize>,
    /// Longest a SQL statement may run. Default: 60s
    #[arg(long, env = "DRIFTLINE_PG_STATEMENT_TIMEOUT", value_parser = humantime::parse_duration)]
    pg_statement_timeout: Option<Duration>,
    /// Memory all SQL queries together may use, in MiB. Default: 2048
    #[arg(long, env = "DRIFTLINE_PG_MEMORY_MB")]
    pg_memory_mb: Option<usize>,
    /// The largest value (text, list) one SQL function call may build, in
    /// MiB (repeat, lpad, array_repeat, ...). Default: 64
    #[arg(long, env = "DRIFTLINE_PG_MAX_VALUE_MB")]
    pg_max_value_mb: Option<usize>,
    /// How long a SQL client has from connecting to being logged in.
    /// Default: 10s
    #[arg(long, env = "DRIFTLINE_PG_LOGIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pg_login_timeout: Option<Duration>,
    /// Folder of detector SQL files, re-read at every run. Default: the
    /// built-in detectors.
    #[arg(long, env = "DRIFTLINE_QUERIES")]
    queries: Option<PathBuf>,
    /// How often to look for newly completed detection periods.
    #[arg(long, env = "DRIFTLINE_DETECT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    detect_interval: Duration,
    /// How long a period waits for the devices of its reference period
    /// that have not reported past its end (offline devices, a backlog
    /// still arriving) before it is evaluated without them.
    #[arg(long, env = "DRIFTLINE_DETECT_LATENESS", default_value = "5m", value_parser = humantime::parse_duration)]
    detect_lateness: Duration,
    /// How far back (event time) a detector that never ran (a new detector
    /// file, a new lake) is evaluated.
    #[arg(long, env = "DRIFTLINE_DETECT_HORIZON", default_value = "1d", value_parser = humantime::parse_duration)]
    detect_horizon: Duration,
    #[command(flatten)]
    retrain: RetrainArgs,
    /// Serve /metrics (Prometheus) and /health here. Default: off.
    #[arg(long, env = "DRIFTLINE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct CompactArgs {
    /// Lake directory.
    #[arg(long, env = "DRIFTLINE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The lake on S3 or an S3-compatible store, s3://bucket/prefix
    /// (credentials and endpoint from AWS_* variables). Default: the data
    /// directory.
    #[arg(long, env = "DRIFTLINE_LAKE")]
    lake: Option<String>,
    /// Files a partition needs before it is compacted.
    #[arg(long, env = "DRIFTLINE_COMPACT_MIN_FILES", default_value_t = 2)]
    compact_min_files: usize,
    /// Also delete partitions older than this (30d, 52w).
    #[arg(long, env = "DRIFTLINE_RETENTION", value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Replaced files are deleted once they are this old, so queries that
    /// started before the compaction can finish.
    #[arg(long, env = "DRIFTLINE_COMPACT_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    grace: Duration,
}

#[derive(clap::Args)]
struct QueryArgs {
    /// Lake directory.
    #[arg(long, env = "DRIFTLINE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The lake on S3 or an S3-compatible store, s3://bucket/prefix
    /// (credentials and endpoint from AWS_* variables). Default: the data
    /// directory.
    #[arg(long, env = "DRIFTLINE_LAKE")]
    lake: Option<String>,
    /// Output format.
    #[arg(long, env = "DRIFTLINE_FORMAT", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The SQL statement (read-only).
    sql: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Query(_)
        | Command::Compact(_)
        | Command::Detect(_)
        | Command::JobStatus(_)
        | Command::Validate(_) => "warn",
        // rumqttd reports every client disconnect as an error: quiet by
        // default in the demo (RUST_LOG=rumqttd=warn shows it).
        Command::Demo(_) => "warn,rumqttd=off",
        Command::Serve(_) => "info,rumqttc=warn",
    };
    // `serve` with --metrics-listen renders the metrics as Prometheus text.
    let prometheus = match &cli.command {
        Command::Serve(args) if args.metrics_listen.is_some() => {
            match observe::prometheus_recorder() {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    driftline_runtime::telemetry::run_program(
        "driftline-collector",
        default_level,
        prometheus,
        dispatch(cli.command),
    )
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => demo_command(args).await,
        Command::Serve(args) => serve_command(*args).await,
        Command::Query(args) => query_command(args).await,
        Command::Compact(args) => compact_command(args),
        Command::Detect(args) => detect_command(*args).await,
        Command::JobStatus(args) => job_status_command(args).await,
        Command::Validate(args) => driftline_collector::validate::run(args),
    }
}

/// Cancelled on SIGTERM or SIGINT (Ctrl-C).
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    Ok(token)
}

async fn demo_command(args: DemoArgs) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => {
            let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
            std::env::temp_dir().join(format!("driftline-demo-{stamp}-{}", std::process::id()))
        }
    };
    let options = DemoOptions {
        duration: args.duration,
        data_dir,
        mqtt_listen: args.mqtt_listen,
        devices: args.devices,
        models: args.models,
        backfill: args.backfill,
        window_secs: 60,
        epsilon: args.epsilon,
        pg_listen: args.pg_listen,
    };
    demo::run(options, shutdown_on_signal()?).await?;
    Ok(())
}

async fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ServeFile::load(path)?,
        None => ServeFile::default(),
    };
    let flags = ServeFile {
        broker: args.broker,
        data_dir: args.data_dir,
        lake: args.lake,
        client_id: args.client_id,
        flush_interval: args.flush_interval,
        flush_rows: args.flush_rows,
        max_event_age: args.max_event_age,
        max_future_skew: args.max_future_skew,
        quarantine_quota: args.quarantine_quota,
        tls_ca_file: args.tls_ca_file,
        tls_client_cert: args.tls_client_cert,
        tls_client_key: args.tls_client_key,
        mqtt_username: args.mqtt_username,
        mqtt_password: args.mqtt_password,
        share_group: args.share_group,
        compact_interval: args.compact_interval,
        compact_min_files: args.compact_min_files,
        retention: args.retention,
        pg_listen: args.pg_listen,
        pg_user: args.pg_user,
        pg_password: args.pg_password,
        pg_users: None,
        pg_tls_cert: args.pg_tls_cert,
        pg_tls_key: args.pg_tls_key,
        pg_max_connections: args.pg_max_connections,
        pg_statement_timeout: args.pg_statement_timeout,
        pg_memory_mb: args.pg_memory_mb,
        pg_max_value_mb: args.pg_max_value_mb,
        pg_login_timeout: args.pg_login_timeout,
    };
    let config = ServeConfig::resolve(file.overlay(flags))?;
    let location = Location::resolve(config.lake.as_deref(), &config.data_dir)?;
    let lake = Arc::new(LakeWriter::open_at(&location, &config.data_dir)?);
    tracing::info!(data_dir = %config.data_dir.display(), lake = ?config.lake, "lake opened");
    let opened = lake.clone();
    tokio::task::spawn_blocking(move || maintenance::backfill_edges(&opened)).await?;
    let shutdown = shutdown_on_signal()?;
    let counters = Arc::new(Counters::default());
    // The ingest counters reach the metrics facade (and so OTLP) every few
    // seconds, not only when Prometheus scrapes.
    let published = counters.clone();
    let publishing = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = publishing.cancelled() => break,
                _ = tick.tick() => observe::publish_counters(&published),
            }
        }
        observe::publish_counters(&published);
    });
    if let Some(listen) = args.metrics_listen {
        let secret = args
            .retrain
            .job_report_secret
            .as_ref()
            .or(args.retrain.retrain_secret.as_ref());
        let jobs = match secret {
            Some(secret) => Some(observe::JobsApi::new(
                Arc::new(query::session_at(&location, None).await?),
                lake.clone(),
                secret.clone(),
            )),
            None => None,
        };
        let addr = observe::serve(listen, counters.clone(), jobs, shutdown.clone())
            .await
            .with_context(|| format!("serving metrics on {listen}"))?;
        tracing::info!(%addr, "metrics and health endpoint listening");
    }
    let sql = match config.endpoint {
        Some(endpoint) => {
            let ctx = query::session_at(&location, Some(config.sql_memory_bytes)).await?;
            let endpoint = Endpoint::bind(Arc::new(ctx), endpoint).await?;
            tracing::info!(listen = %endpoint.local_addr()?, "SQL endpoint listening");
            Some(tokio::spawn(endpoint.run(shutdown.clone())))
        }
        None => {
            tracing::warn!("SQL endpoint off: set --pg-password (or pg_users in the config file)");
            None
        }
    };
    let queries = queries_dir(args.queries.clone(), &config.data_dir)?;
    let targets = args.retrain.targets(Some(&config.subscriber))?;
    let mut schedule = detect::Schedule::new(queries, args.retrain.rule(), targets);
    schedule.lateness = args.detect_lateness;
    schedule.horizon = chrono::TimeDelta::from_std(args.detect_horizon)?;
    let detection = tokio::spawn(detect::run_schedule(
        schedule,
        Arc::new(query::session_at(&location, None).await?),
        lake.clone(),
        args.detect_interval,
        shutdown.clone(),
        false,
    ));
    let upkeep = tokio::spawn(maintenance::run(
        lake.clone(),
        config.maintenance,
        shutdown.clone(),
    ));
    let result = subscriber::run(config.subscriber, lake, counters, shutdown.clone()).await;
    shutdown.cancel();
    let _ = upkeep.await;
    let _ = detection.await;
    if let Some(sql) = sql {
        let _ = sql.await;
    }
    result?;
    Ok(())
}

/// The detector folder: `--queries`, or the built-in detectors copied into
/// the lake (`_driftline/queries`).
fn queries_dir(queries: Option<PathBuf>, data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    match queries {
        Some(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("no detector folder {} (--queries)", dir.display());
            }
            Ok(dir)
        }
        None => {
            let dir = data_dir.join("_driftline").join("queries");
            detect::install_builtin(&dir)?;
            Ok(dir)
        }
    }
}

async fn detect_command(args: DetectArgs) -> anyhow::Result<()> {
    let location = lake_location(args.lake.as_deref(), &args.data_dir)?;
    let queries = queries_dir(args.queries, &args.data_dir)?;
    let detectors = detect::load(&queries)?;
    let lake = LakeWriter::open_at(&location, &args.data_dir)?;
    maintenance::backfill_edges(&lake);
    let ctx = query::session_at(&location, None).await?;
    let latest = match args.at {
        Some(at) => at,
        None => match detect::latest_event_time(&ctx).await? {
            Some(t) => t,
            None => {
                println!("the lake holds no metrics yet: nothing to evaluate");
                return Ok(());
            }
        },
    };
    if args.print_sql {
        for d in &detectors {
            println!(
                "-- {}\n{};\n",
                d.name,
                detect::render(d, &d.periods(latest), detect::Weights::Inline).trim_end()
            );
        }
        return Ok(());
    }
    // One run as of --at; with --since every period of each detector from
    // `since` to `until`, in order; otherwise every complete period since
    // each detector's last recorded one (or over the horizon).
    let mut runs: Vec<(Vec<detect::Detector>, chrono::DateTime<chrono::Utc>)> = Vec::new();
    match (args.since, args.at) {
        (None, Some(at)) => runs.push((detectors.clone(), at)),
        (Some(since), _) => {
            let until = args.until.unwrap_or(latest);
            for d in &detectors {
                let step = chrono::TimeDelta::from_std(d.current)?;
                let mut end = d.periods(since).current_end;
                if end <= since {
                    end += step;
                }
                while end <= d.periods(until).current_end {
                    runs.push((vec![d.clone()], end));
                    end += step;
                }
            }
        }
        (None, None) => {
            let horizon = chrono::TimeDelta::from_std(args.detect_horizon)?;
            let lateness = chrono::TimeDelta::from_std(args.detect_lateness)?;
            for d in &detectors {
                let step = chrono::TimeDelta::from_std(d.current)?;
                let newest = d.periods(latest).current_end;
                let mut end = detect::resume_from(&ctx, d, latest, horizon).await?;
                while end <= newest {
                    let detect::Reporting {
                        expected, present, ..
                    } = detect::reporting(&ctx, &d.periods(end)).await?;
                    if present < expected && chrono::Utc::now() - end < lateness {
                        println!(
                            "{}: period ending {end} waits for {} of {expected} devices (--detect-lateness)",
                            d.name,
                            expected - present
                        );
                        break;
                    }
                    runs.push((vec![d.clone()], end));
                    end += step;
                }
            }
        }
    }
    // Detectors due at the same period end run together.
    let mut by_end: std::collections::BTreeMap<_, Vec<detect::Detector>> = Default::default();
    for (ds, end) in runs {
        by_end.entry(end).or_default().extend(ds);
    }
    if by_end.is_empty() {
        println!("every detector is up to date as of {latest}: nothing new to evaluate");
    }
    let targets = args.retrain.targets(None)?;
    for (at, detectors) in by_end {
        detect_once(
            &ctx,
            &lake,
            &detectors,
            at,
            0,
            &args.retrain.rule(),
            &targets,
        )
        .await?;
    }
    // Late data: periods that gained rows since their last evaluation are
    // evaluated again, as a new revision.
    if args.since.is_none() && args.at.is_none() {
        let horizon = chrono::TimeDelta::from_std(args.detect_horizon)?;
        let ctx = query::session_at(&location, None).await?;
        for d in &detectors {
            for (end, revision) in detect::revisions(&ctx, d, latest, horizon).await? {
                println!(
                    "{}: late data for the period ending {end}: revision {revision}",
                    d.name
                );
                let one = std::slice::from_ref(d);
                detect_once(
                    &ctx,
                    &lake,
                    one,
                    end,
                    revision,
                    &args.retrain.rule(),
                    &targets,
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// Runs `detectors` as of `at`, prints what they found, and opens jobs.
async fn detect_once(
    ctx: &datafusion::prelude::SessionContext,
    lake: &LakeWriter,
    detectors: &[detect::Detector],
    at: chrono::DateTime<chrono::Utc>,
    revision: i64,
    rule: &retrain::RetrainRule,
    targets: &retrain::Targets,
) -> anyhow::Result<()> {
    let summary = detect::run_all(ctx, lake, detectors, at, revision).await?;
    let fired: Vec<_> = summary
        .evaluations
        .iter()
        .filter(|e| e.fired)
        .cloned()
        .collect();
    println!(
        "{} detectors, {} evaluations as of {at}: {} fired ({} new drift events)",
        detectors.len(),
        summary.evaluations.len(),
        fired.len(),
        summary.new_events
    );
    for e in &summary.evaluations {
        println!(
            "  {:<8} {:<20} {:<10} {:<12} {:<34} value {:>9} threshold {:<6} p {:>9}  devices {}",
            if e.fired {
                e.severity.as_deref().unwrap_or("fired")
            } else {
                "ok"
            },
            e.detector,
            e.model_id,
            e.model_version,
            e.statistic,
            e.value.map_or("-".into(), |v| format!("{v:.4}")),
            e.threshold,
            e.p_value.map_or("-".into(), |p| format!("{p:.2e}")),
            e.devices
        );
    }
    let jobs = retrain::after_run(ctx, lake, rule, targets, &fired).await?;
    for j in &jobs {
        println!(
            "  job {} ({} {}): {} {}",
            j.job_id,
            j.model_id,
            j.model_version,
            j.status,
            j.detail.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

async fn job_status_command(args: JobStatusArgs) -> anyhow::Result<()> {
    let location = lake_location(args.lake.as_deref(), &args.data_dir)?;
    let lake = LakeWriter::open_at(&location, &args.data_dir)?;
    let ctx = query::session_at(&location, None).await?;
    retrain::report(&ctx, &lake, &args.job_id, &args.status, args.detail).await?;
    println!("job {}: {}", args.job_id, args.status);
    Ok(())
}

fn compact_command(args: CompactArgs) -> anyhow::Result<()> {
    let location = lake_location(args.lake.as_deref(), &args.data_dir)?;
    let lake = LakeWriter::open_at(&location, &args.data_dir)?;
    let report = maintenance::once(&lake, args.compact_min_files, args.retention, args.grace)?;
    for c in &report.compacted {
        println!(
            "compacted {}/date={}: {} files -> 1, {} rows, {} duplicates dropped",
            c.table, c.date, c.files_before, c.rows, c.duplicates
        );
    }
    for p in &report.dropped {
        println!("dropped {p} (retention)");
    }
    for date in &report.edges_backfilled {
        println!("derived histogram_edge_sets/date={date} from metrics");
    }
    if report.compacted.is_empty()
        && report.dropped.is_empty()
        && report.edges_backfilled.is_empty()
    {
        println!("nothing to do");
    }
    Ok(())
}

/// `--lake` when given; else the data directory, which must exist.
fn lake_location(lake: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<Location> {
    if lake.is_none() && !data_dir.is_dir() {
        anyhow::bail!(
            "no lake at {} (use --data-dir or --lake)",
            data_dir.display()
        );
    }
    Ok(Location::resolve(lake, data_dir)?)
}

async fn query_command(args: QueryArgs) -> anyhow::Result<()> {
    let location = lake_location(args.lake.as_deref(), &args.data_dir)?;
    let ctx = query::session_at(&location, None).await?;
    let batches = query::run(&ctx, &args.sql).await?;
    print!("{}", query::render(&batches, args.format)?);
    if args.format == Format::Table {
        println!();
    }
    Ok(())
}
