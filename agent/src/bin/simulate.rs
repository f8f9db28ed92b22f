//! `driftline-agent-simulate`, run as `driftline-agent simulate`: a
//! synthetic fleet of virtual devices, each a full agent pipeline
//! ([`driftline_sim`]). A program of its own so that the edge binary does
//! not carry the simulator.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clap::Parser;
use driftline_core::broker::BrokerUrl;
use driftline_pipeline::ledger::Budget;
use driftline_pipeline::privacy::MechanismConfig;
use driftline_pipeline::window;
use driftline_runtime::tls::TlsFiles;
use driftline_sim::{Drift, DriftKind, SimConfig, SimProgress};
use tokio_util::sync::CancellationToken;

/// Simulate N devices, each a full agent pipeline, publishing W windows.
#[derive(Parser)]
#[command(
    name = "driftline-agent simulate",
    bin_name = "driftline-agent simulate",
    version
)]
struct SimulateArgs {
    /// Broker address, mqtt://host:port.
    #[arg(long, env = "DRIFTLINE_BROKER")]
    broker: BrokerUrl,
    /// Broker login of the virtual devices. `{fleet}` and `{device}` become
    /// each device's own, so `{fleet}/{device}` logs every device in as
    /// itself (the username scheme of deploy/mosquitto's ACL).
    #[arg(long, env = "DRIFTLINE_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    #[arg(long, env = "DRIFTLINE_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// CA certificates (PEM) for an mqtts:// broker. Default: the system's roots.
    #[arg(long, env = "DRIFTLINE_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that require one.
    #[arg(long, env = "DRIFTLINE_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert.
    #[arg(long, env = "DRIFTLINE_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// Number of virtual devices.
    #[arg(long, env = "DRIFTLINE_DEVICES", default_value_t = 10)]
    devices: u32,
    /// Models per device (ids model-0 .. model-{M-1}).
    #[arg(long, env = "DRIFTLINE_MODELS", default_value_t = 2)]
    models: u32,
    /// Windows per device and model. Required unless --live.
    #[arg(long, env = "DRIFTLINE_WINDOWS", required_unless_present = "live")]
    windows: Option<u64>,
    /// Window length in seconds.
    #[arg(long, env = "DRIFTLINE_WINDOW_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    window_secs: u32,
    /// Event time of the first window (RFC 3339). Default: so that the last
    /// window ends at the present.
    #[arg(long, env = "DRIFTLINE_START")]
    start: Option<DateTime<Utc>>,
    /// Seed of the synthetic events (the privacy noise is never seeded).
    #[arg(long, env = "DRIFTLINE_SEED", default_value_t = 0)]
    seed: u64,
    /// Privacy mechanism: laplace (pure epsilon-DP) or gaussian (rho-zCDP).
    #[arg(long, env = "DRIFTLINE_MECHANISM", default_value = "laplace",
          value_parser = ["laplace", "gaussian"])]
    mechanism: String,
    /// Epsilon spent per published window (laplace).
    #[arg(long, env = "DRIFTLINE_EPSILON", default_value_t = 1.0)]
    epsilon: f64,
    /// zCDP rho spent per published window (gaussian).
    #[arg(long, env = "DRIFTLINE_RHO", default_value_t = 0.5)]
    rho: f64,
    /// Delta of the (epsilon, delta) guarantee reported for gaussian.
    #[arg(long, env = "DRIFTLINE_DELTA", default_value_t = 1e-6)]
    delta: f64,
    /// Fleet name used in topics and messages.
    #[arg(long, env = "DRIFTLINE_FLEET", default_value = "sim")]
    fleet: String,
    /// Mean inferences per model and window on each device.
    #[arg(long, env = "DRIFTLINE_EVENTS_PER_WINDOW", default_value_t = 30.0)]
    events_per_window: f64,
    /// Most events each device counts per model and window (K); the noise
    /// is calibrated to all of them.
    #[arg(long, env = "DRIFTLINE_MAX_EVENTS_PER_WINDOW", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_events_per_window: u32,
    /// zCDP rho each device may spend per day; windows over it are withheld.
    #[arg(long, env = "DRIFTLINE_BUDGET_RHO", default_value_t = 100_000.0)]
    budget_rho: f64,
    /// After reaching the present, go on publishing at the pace of the clock.
    #[arg(long, env = "DRIFTLINE_LIVE")]
    live: bool,
    /// Window index from which the drift applies.
    #[arg(long, env = "DRIFTLINE_DRIFT_AT", requires_all = ["drift_model", "drift_kind", "drift_size"])]
    drift_at: Option<u64>,
    /// Model whose behaviour drifts, e.g. model-0.
    #[arg(long, env = "DRIFTLINE_DRIFT_MODEL", requires = "drift_at")]
    drift_model: Option<String>,
    /// What drifts: input, confidence, latency, errors or feedback.
    #[arg(long, env = "DRIFTLINE_DRIFT_KIND", requires = "drift_at")]
    drift_kind: Option<DriftKind>,
    /// Relative size of the drift, e.g. 0.3.
    #[arg(long, env = "DRIFTLINE_DRIFT_SIZE", requires = "drift_at")]
    drift_size: Option<f64>,
}

fn main() -> ExitCode {
    let args = SimulateArgs::parse();
    driftline_runtime::telemetry::run_program(
        "driftline-agent",
        "warn",
        None,
        simulate_command(args),
    )
}

async fn simulate_command(args: SimulateArgs) -> anyhow::Result<()> {
    let drift = match (
        args.drift_at,
        args.drift_model,
        args.drift_kind,
        args.drift_size,
    ) {
        (Some(at), Some(model_id), Some(kind), Some(size)) => Some(Drift {
            at,
            model_id,
            kind,
            size,
        }),
        _ => None,
    };
    let length = TimeDelta::seconds(i64::from(args.window_secs));
    let start = args.start.unwrap_or_else(|| {
        let windows = i32::try_from(args.windows.unwrap_or(60)).unwrap_or(i32::MAX);
        window::align(Utc::now(), args.window_secs) - length * windows
    });
    let config = SimConfig {
        broker: args.broker,
        fleet: args.fleet,
        devices: args.devices,
        models: args.models,
        windows: args.windows,
        window_secs: args.window_secs,
        start,
        seed: args.seed,
        mechanism: match args.mechanism.as_str() {
            "gaussian" => MechanismConfig::Gaussian {
                rho: args.rho,
                delta: args.delta,
            },
            _ => MechanismConfig::Laplace {
                epsilon: args.epsilon,
            },
        },
        events_per_window: args.events_per_window,
        drift,
        live: args.live,
        // Simulated devices are bounded only by --budget-rho: they exist to
        // exercise the pipeline, and print what their setting guarantees.
        budget: Budget {
            epsilon: None,
            delta: args.delta,
            rho: Some(args.budget_rho),
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        },
        max_events_per_window: args.max_events_per_window,
        first_device: 0,
        credentials: args
            .mqtt_username
            .map(|u| (u, args.mqtt_password.unwrap_or_default())),
        tls: TlsFiles {
            ca_file: args.tls_ca_file,
            client_cert: args.tls_client_cert,
            client_key: args.tls_client_key,
        },
    };
    let progress = Arc::new(SimProgress::default());
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop.cancel();
        }
    });
    let total = config
        .windows
        .map(|w| w * u64::from(config.devices) * u64::from(config.models));
    let reporter = {
        let progress = progress.clone();
        tokio::spawn(async move {
            // A progress bar on a terminal, a line every 5 s otherwise.
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = total.map_or_else(
                    indicatif::ProgressBar::new_spinner,
                    indicatif::ProgressBar::new,
                );
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {pos}/{len} windows {per_sec} {elapsed}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            });
            loop {
                let published = progress.published.load(Ordering::Relaxed);
                match &bar {
                    Some(bar) => {
                        bar.set_position(published);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        eprintln!("published {published}");
                    }
                }
            }
        })
    };
    let summary = driftline_sim::run(config, progress, cancel).await;
    reporter.abort();
    let summary = summary?;
    println!(
        "published {} messages, {} acknowledged by the broker{}",
        summary.published,
        summary.acknowledged,
        if summary.withheld > 0 {
            format!(", {} withheld (privacy budget spent)", summary.withheld)
        } else {
            String::new()
        }
    );
    Ok(())
}
