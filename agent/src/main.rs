//! `driftline-agent`: see `driftline-agent --help` and README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use driftline_agent::config::{AgentConfig, AgentFile, ModelSection, Overrides};
use driftline_agent::runtime;
use driftline_pipeline::guarantee::Report;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "driftline-agent", version, about = "Driftline on-device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: local ingest, windows, privacy noise, buffer, publish.
    Run(RunArgs),
    /// Simulate N devices, each a full agent pipeline, publishing W windows
    /// (runs `driftline-agent-simulate`, installed beside this binary; see
    /// `driftline-agent simulate --help`).
    #[command(disable_help_flag = true)]
    Simulate {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Check a configuration file and print the resolved settings.
    CheckConfig(CheckConfigArgs),
    /// Print the privacy guarantee of a configuration without running it.
    PrivacyReport(PrivacyReportArgs),
}

#[derive(clap::Args)]
struct PrivacyReportArgs {
    /// TOML config file; the flags below override it.
    #[arg(long, env = "DRIFTLINE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, value_parser = ["laplace", "gaussian"])]
    mechanism: Option<String>,
    /// Epsilon per window (laplace); default: calibrated to the budget.
    #[arg(long)]
    epsilon: Option<f64>,
    /// Rho per window (gaussian); default: calibrated to the budget.
    #[arg(long)]
    rho: Option<f64>,
    /// Device-day budget: epsilon at --delta (default 8).
    #[arg(long)]
    device_day_epsilon: Option<f64>,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    window_secs: Option<u32>,
    /// Number of models (without --config: ids model-0 .. model-{M-1},
    /// no labels or custom features).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    models: Option<u32>,
    #[arg(long)]
    max_events_per_window: Option<u32>,
    #[arg(long)]
    delta: Option<f64>,
    #[arg(long, default_value = "text", value_parser = ["json", "text"])]
    format: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file (see agent/agent.example.toml).
    #[arg(long, env = "DRIFTLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Broker address, mqtt://host:port.
    #[arg(long, env = "DRIFTLINE_BROKER")]
    broker: Option<String>,
    /// This device's id.
    #[arg(long, env = "DRIFTLINE_DEVICE_ID")]
    device_id: Option<String>,
    /// Fleet the device belongs to.
    #[arg(long, env = "DRIFTLINE_FLEET")]
    fleet: Option<String>,
    /// Directory for the ledger, sequence number and buffer.
    #[arg(long, env = "DRIFTLINE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Address of the local HTTP ingest.
    #[arg(long, env = "DRIFTLINE_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Start with a fresh privacy budget when budget.ledger is missing from
    /// a state directory that holds other state (refused otherwise). The
    /// device may then exceed its budget for the current period; logged.
    #[arg(long)]
    reset_budget: bool,
}

#[derive(clap::Args)]
struct CheckConfigArgs {
    /// TOML config file.
    #[arg(long, env = "DRIFTLINE_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Simulate { args } = cli.command {
        // Before telemetry and the runtime: the simulator sets up its own.
        return simulate(args);
    }
    driftline_runtime::telemetry::run_program("driftline-agent", "warn", None, dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run_command(args).await,
        Command::Simulate { .. } => anyhow::bail!("simulate runs its own program"),
        Command::CheckConfig(args) => check_config_command(&args),
        Command::PrivacyReport(args) => privacy_report_command(args),
    }
}

fn resolve(config: Option<&Path>, over: Overrides) -> anyhow::Result<AgentConfig> {
    let file = match config {
        Some(path) => AgentFile::load(path)?,
        None => AgentFile::default(),
    };
    Ok(AgentConfig::resolve(file, over)?)
}

async fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let over = Overrides {
        broker: args.broker,
        device_id: args.device_id,
        fleet: args.fleet,
        state_dir: args.state_dir,
        http_listen: args.http_listen,
        reset_budget: args.reset_budget,
    };
    let config = resolve(args.config.as_deref(), over)?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    runtime::run(config, shutdown).await?;
    Ok(())
}

fn check_config_command(args: &CheckConfigArgs) -> anyhow::Result<()> {
    let c = resolve(Some(&args.config), Overrides::default())?;
    println!("{}: valid", args.config.display());
    println!("  device       {} in fleet {}", c.device_id, c.fleet);
    println!("  broker       {}", c.broker);
    println!("  window       {} s", c.window_secs);
    println!("  state dir    {}", c.state_dir.display());
    println!("  local ingest http://{}", c.http_listen);
    for (model, spec) in &c.models {
        println!(
            "  model        {} {} ({} labels, at most {} events per window)",
            model.model_id,
            model.model_version,
            spec.labels.len(),
            spec.max_events_per_window
        );
    }
    println!("privacy:");
    print!("{}", report_of(&c)?.text());
    Ok(())
}

fn report_of(c: &AgentConfig) -> anyhow::Result<Report> {
    Ok(Report::of(
        c.mechanism,
        &c.budget,
        c.window_secs,
        &c.models,
    )?)
}

fn privacy_report_command(args: PrivacyReportArgs) -> anyhow::Result<()> {
    let mut file = match &args.config {
        Some(path) => AgentFile::load(path)?,
        None => AgentFile::default(),
    };
    if let Some(m) = args.models {
        file.models = (0..m)
            .map(|i| ModelSection {
                id: format!("model-{i}"),
                version: "1".into(),
                labels: Vec::new(),
                latency_ms_edges: None,
                confidence_edges: None,
                input_tokens_edges: None,
                output_tokens_edges: None,
                custom: Vec::new(),
                max_events_per_window: None,
            })
            .collect();
    } else if file.models.is_empty() {
        anyhow::bail!("give --config with [[models]], or --models M");
    }
    if let Some(w) = args.window_secs {
        file.window = Some(Duration::from_secs(u64::from(w)));
    }
    let p = &mut file.privacy;
    if args.mechanism.is_some() {
        p.mechanism = args.mechanism;
    }
    p.epsilon = args.epsilon.or(p.epsilon);
    p.rho = args.rho.or(p.rho);
    p.delta = args.delta.or(p.delta);
    p.device_day_epsilon = args.device_day_epsilon.or(p.device_day_epsilon);
    if let Some(k) = args.max_events_per_window {
        p.max_events_per_window = Some(k);
        for m in &mut file.models {
            m.max_events_per_window = None;
        }
    }
    let config = AgentConfig::resolve(file, Overrides::default())?;
    let report = report_of(&config)?;
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// The fleet simulator is its own program (`driftline-agent-simulate`,
/// crate `driftline-sim`), so that the edge binary does not carry it:
/// `simulate` replaces this process with it, found beside this binary or
/// on `PATH`.
fn simulate(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    const PROGRAM: &str = "driftline-agent-simulate";
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(PROGRAM)))
        .filter(|path| path.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(PROGRAM));
    let error = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "error: cannot run the fleet simulator {}: {error} (it is built with this agent: cargo build -p driftline-agent)",
        program.display()
    );
    ExitCode::FAILURE
}
