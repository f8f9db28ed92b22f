//! `driftline-agent run`: the agent as a long-running sidecar.
//!
//! One loop drives plain state: every second it closes due windows
//! ([`Windower`]), spends their budget write-ahead ([`Ledger`]), noises
//! them ([`Privatizer`]), stamps the next `seq` ([`SeqFile`]) and appends
//! the encoded message to the on-disk queue ([`DiskQueue`]); and it sends
//! the queue's front to the broker in batches, acknowledging queue records
//! only once the broker acknowledged them (QoS 1). The local HTTP ingest
//! ([`crate::http`]) records into the same lock-free model handles.
//!
//! MQTT (3.1.1 or 5, see [`crate::mqtt`]): a retained status message on
//! connect and on every state change,
//! and the same topic as last will (`offline`, retained), so the fleet
//! view knows when a device drops. Reconnects back off exponentially with
//! jitter, capped at 30 s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use driftline_core::status::{DeviceState, StatusModel, StatusReport};
use driftline_core::topic;
use rand::Rng;

use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferError, DiskQueue};
use crate::config::AgentConfig;
use crate::http::{self, Shared};
use crate::mqtt::{Session, SessionEvent, SessionOptions};
use driftline_pipeline::guarantee::Report;
use driftline_pipeline::ledger::{Ledger, LedgerError, Now};
use driftline_pipeline::privacy::{DeviceIdentity, PrivacyError, Privatizer};
use driftline_pipeline::release::{release, ReleaseError, Released};
use driftline_pipeline::window::Windower;

/// Records sent to the broker per batch.
const BATCH: usize = 64;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error("cannot listen for local events on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] driftline_runtime::tls::TlsError),
    #[error("state directory {path} is in use by another driftline-agent (it holds {path}/lock); stop that agent first, or give this one its own --state-dir")]
    Locked { path: PathBuf },
    #[error("state directory {path} holds a sequence number or buffered windows but no budget.ledger: the privacy budget spent so far is unknown, and a fresh one would let this device publish more than its budget. Restore the ledger, or start with --reset-budget to accept that (it is logged)")]
    LedgerMissing { path: PathBuf },
}

impl From<ReleaseError> for AgentError {
    fn from(e: ReleaseError) -> Self {
        match e {
            ReleaseError::Privacy(e) => e.into(),
            ReleaseError::Ledger(e) => e.into(),
        }
    }
}

/// The state directory, locked for this process: the lock is taken before
/// anything in the directory is read or written and held until the agent
/// exits, so a second agent on the same directory changes nothing.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: std::fs::File,
}

impl StateDir {
    /// Creates (if needed) and locks `path`. Unless `reset_budget`, refuses
    /// a directory that has other state but no ledger: its budget would
    /// start afresh.
    pub fn open(path: &Path, reset_budget: bool) -> Result<Self, AgentError> {
        let state = |source| AgentError::State {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(state)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("lock"))
            .map_err(state)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AgentError::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(state(e)),
        }
        let ledger = path.join(LEDGER_FILE).exists();
        let other_state = path.join(SEQ_FILE).exists() || path.join(BUFFER_DIR).exists();
        if !ledger && other_state {
            if !reset_budget {
                return Err(AgentError::LedgerMissing {
                    path: path.to_path_buf(),
                });
            }
            tracing::warn!(state_dir = %path.display(), "--reset-budget: the budget ledger is missing and starts afresh; this device may exceed its privacy budget for the current period");
        }
        Ok(StateDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The files of the state directory.
const LEDGER_FILE: &str = "budget.ledger";
const SEQ_FILE: &str = "seq";
const BUFFER_DIR: &str = "buffer";

/// The per-device sequence number, strictly increasing across restarts.
///
/// The file holds a high-water mark reserved ahead of use (in blocks of
/// 1000, written with fsync and an atomic rename): after a crash the agent
/// resumes above everything it may have used, skipping at most one block.
#[derive(Debug)]
pub struct SeqFile {
    path: PathBuf,
    next: u64,
    reserved: u64,
}

impl SeqFile {
    const BLOCK: u64 = 1000;

    pub fn open(path: &Path) -> Result<Self, AgentError> {
        let next = match std::fs::read_to_string(path) {
            Ok(text) => text.trim().parse().unwrap_or_else(|_| {
                tracing::error!(path = %path.display(), "unreadable seq file; restarting above the current time in ms");
                u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(AgentError::State {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut seq = SeqFile {
            path: path.to_path_buf(),
            next,
            reserved: next,
        };
        seq.reserve()?;
        Ok(seq)
    }

    fn reserve(&mut self) -> Result<(), AgentError> {
        let reserved = self.next + Self::BLOCK;
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(reserved.to_string().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|source| AgentError::State {
            path: self.path.clone(),
            source,
        })?;
        self.reserved = reserved;
        Ok(())
    }

    /// The next sequence number.
    pub fn take(&mut self) -> Result<u64, AgentError> {
        if self.next >= self.reserved {
            self.reserve()?;
        }
        let n = self.next;
        self.next += 1;
        Ok(n)
    }
}

/// What the loop keeps between ticks.
struct Loop {
    config: AgentConfig,
    identity: DeviceIdentity,
    windower: Windower,
    privatizer: Privatizer,
    ledger: Ledger,
    seq: SeqFile,
    queue: DiskQueue,
    shared: Arc<Shared>,
    withheld: u64,
    exhausted_until: Option<DateTime<Utc>>,
    /// The ledger's uptime when it was opened, and when that was.
    uptime: (TimeDelta, std::time::Instant),
}

impl Loop {
    /// The present for the ledger: the wall clock and the persisted uptime.
    fn now(&self, wall: DateTime<Utc>) -> Now {
        let (base, since) = self.uptime;
        let elapsed = TimeDelta::from_std(since.elapsed()).unwrap_or(TimeDelta::MAX);
        Now {
            wall,
            up: base + elapsed,
        }
    }

    /// Closes due windows: spend, noise, stamp, queue.
    fn close_windows(&mut self, wall: DateTime<Utc>) -> Result<(), AgentError> {
        let now = self.now(wall);
        let due = self.windower.close_due(wall);
        if due.is_empty() {
            return Ok(());
        }
        let _span = tracing::info_span!("close_windows", windows = due.len()).entered();
        for window in due {
            match release(&self.privatizer, &mut self.ledger, window, now.up)? {
                Released::Window(private) => {
                    self.exhausted_until = None;
                    let report = private.into_report(&self.identity, self.seq.take()?);
                    match report.encode() {
                        Ok(bytes) => {
                            self.queue.push(&bytes)?;
                            metrics::counter!("driftline_agent_windows_queued_total").increment(1);
                        }
                        Err(e) => tracing::error!(error = %e, "window does not encode; dropped"),
                    }
                }
                Released::Withheld { resumes_at } => {
                    self.withheld += 1;
                    // Only the uptime is lost if this fails: conservative.
                    if let Err(e) = self.ledger.checkpoint(now) {
                        tracing::warn!(error = %e, "could not persist the uptime");
                    }
                    if self.exhausted_until.is_none() {
                        tracing::warn!(%resumes_at, "privacy budget exhausted; withholding windows");
                    }
                    self.exhausted_until = Some(resumes_at);
                }
            }
        }
        Ok(())
    }

    /// Hands the agent's figures to the metrics facade (OTLP when
    /// configured; free otherwise). Only figures that do not depend on the
    /// events leave the device: counts of events and of refused local
    /// requests stay on the loopback endpoint (`GET /v1/status`).
    fn publish_metrics(&self, status: &StatusReport) {
        metrics::counter!("driftline_agent_windows_withheld_total").absolute(self.withheld);
        metrics::counter!("driftline_agent_windows_lost_total").absolute(status.lost_windows);
        metrics::gauge!("driftline_agent_windows_buffered").set(status.buffered_windows as f64);
        metrics::gauge!("driftline_agent_budget_remaining_rho")
            .set(status.budget_remaining_rho.unwrap_or(0.0));
        metrics::gauge!("driftline_agent_budget_remaining_epsilon")
            .set(status.budget_remaining_epsilon.unwrap_or(0.0));
        metrics::gauge!("driftline_agent_connected").set(match status.state {
            DeviceState::Online => 1.0,
            DeviceState::Offline => 0.0,
        });
    }

    fn status(&self, state: DeviceState, wall: DateTime<Utc>) -> StatusReport {
        let losses = self.queue.losses();
        let now = self.now(wall);
        let budget = self.ledger.state();
        StatusReport {
            agent_version: Some(self.identity.agent_version.clone()),
            models: self
                .config
                .models
                .iter()
                .map(|(k, _)| StatusModel {
                    model_id: k.model_id.clone(),
                    model_version: k.model_version.clone(),
                })
                .collect(),
            budget_remaining_rho: budget.remaining_rho(now),
            budget_remaining_epsilon: budget.remaining_epsilon(now).ok().flatten(),
            budget_exhausted: self.exhausted_until.is_some(),
            resumes_at: self.exhausted_until,
            windows_withheld: self.withheld,
            buffered_windows: self.queue.len() as u64,
            lost_windows: losses.dropped_records + losses.corrupt_records,
            ..StatusReport::new(&self.identity.device_id, &self.identity.fleet, state, wall)
        }
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let state_dir = StateDir::open(&config.state_dir, config.reset_budget)?;
    let now = Utc::now();
    let ledger = Ledger::open(&state_dir.path().join(LEDGER_FILE), config.budget, now)?;
    let uptime = (ledger.recovered_uptime(), std::time::Instant::now());
    let seq = SeqFile::open(&state_dir.path().join(SEQ_FILE))?;
    let mut queue = DiskQueue::open(&state_dir.path().join(BUFFER_DIR), config.buffer_max_bytes)?;
    queue.set_coarsener(Box::new(crate::coarsen::coarsen_payloads));
    let guarantee = Report::of(
        config.mechanism,
        &config.budget,
        config.window_secs,
        &config.models,
    )?;
    let privatizer = Privatizer::new(config.mechanism)?
        .with_device_day(guarantee.device_day.epsilon, guarantee.device_day.delta);
    let mut windower = Windower::new(config.window_secs, now);
    let models: HashMap<_, _> = config
        .models
        .iter()
        .map(|(key, spec)| (key.clone(), windower.register(key.clone(), spec)))
        .collect();
    let identity = DeviceIdentity {
        device_id: config.device_id.clone(),
        fleet: config.fleet.clone(),
        agent_version: driftline_pipeline::AGENT_VERSION.to_owned(),
    };
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.http_listen,
            source,
        })?;
    let placeholder = StatusReport::new(
        &identity.device_id,
        &identity.fleet,
        DeviceState::Offline,
        now,
    );
    let shared = Arc::new(Shared {
        models,
        window_stats: windower.stats(),
        status: Mutex::new(placeholder),
        max_batch: config.max_batch,
        events_accepted: AtomicU64::new(0),
        requests_refused: AtomicU64::new(0),
    });
    let router = http::router(shared.clone(), config.max_body_bytes);
    let http_stop = shutdown.clone();
    let http_task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "local ingest stopped");
        }
    });
    tracing::info!(
        device_id = identity.device_id,
        fleet = identity.fleet,
        broker = %config.broker,
        http = %config.http_listen,
        buffered = queue.len(),
        "agent running"
    );

    let status_topic = topic::status_topic(&identity.fleet, &identity.device_id);
    let metrics_topic = topic::metrics_topic(&identity.fleet, &identity.device_id);
    let mut state = Loop {
        config,
        identity,
        windower,
        privatizer,
        ledger,
        seq,
        queue,
        shared,
        withheld: 0,
        exhausted_until: None,
        uptime,
    };
    let will = state.status(DeviceState::Offline, now);
    let mut session = Session::new(SessionOptions {
        protocol: state.config.mqtt_protocol,
        client_id: format!(
            "driftline-{}-{}",
            state.identity.fleet, state.identity.device_id
        ),
        broker: state.config.broker.clone(),
        keep_alive: state.config.keep_alive,
        credentials: state
            .config
            .mqtt_username
            .clone()
            .zip(state.config.mqtt_password.clone()),
        tls: state.config.tls.clone(),
        will: Some((status_topic.clone(), will.encode())),
        capacity: 4 * BATCH,
    })?;

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected = false;
    // Records of the queue's front handed to the client, and acks seen.
    let (mut in_flight, mut acked) = (0usize, 0usize);
    let mut backoff = Duration::from_millis(250);
    let mut last_status: Option<StatusReport> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let now = Utc::now();
                state.close_windows(now)?;
                let status = state.status(if connected { DeviceState::Online } else { DeviceState::Offline }, now);
                if let Ok(mut s) = state.shared.status.lock() {
                    *s = status.clone();
                }
                state.publish_metrics(&status);
                // Publish the status when its state changes, and at least
                // once a minute (budget and buffer figures move every window).
                let changed = last_status.as_ref().is_none_or(|old| {
                    (old.state, old.budget_exhausted, old.windows_withheld, old.lost_windows)
                        != (status.state, status.budget_exhausted, status.windows_withheld, status.lost_windows)
                        || now - old.at >= chrono::TimeDelta::seconds(60)
                });
                if connected && changed {
                    session.try_publish(&status_topic, false, true, status.encode());
                    last_status = Some(status);
                }
            }
            event = session.poll() => match event {
                Ok(SessionEvent::Connected) => {
                    // A new session: whatever was in flight on the old
                    // connection will never be acknowledged (the client
                    // drops it). It is still at the queue's front and goes
                    // out again with the next batch: at least once, and
                    // `seq` lets the collector drop a duplicate.
                    (in_flight, acked) = (0, 0);
                    state.queue.set_in_flight(0);
                    connected = true;
                    backoff = Duration::from_millis(250);
                    last_status = None;
                    tracing::info!("connected to broker");
                }
                Ok(SessionEvent::Acked) => {
                    acked += 1;
                    if in_flight > 0 && acked >= in_flight {
                        state.queue.ack_front(in_flight)?;
                        metrics::counter!("driftline_agent_windows_acknowledged_total").increment(in_flight as u64);
                        (in_flight, acked) = (0, 0);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(error = %e, "lost the broker; buffering on disk");
                    }
                    connected = false;
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let wait = backoff.mul_f64(jitter);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            },
        }
        // Hand the next batch to the client when the previous one is done.
        if connected && in_flight == 0 && !state.queue.is_empty() {
            for (_, payload) in state.queue.peek(BATCH)? {
                if !session.try_publish(&metrics_topic, true, false, payload) {
                    break;
                }
                in_flight += 1;
            }
            state.queue.set_in_flight(in_flight);
        }
    }

    // Graceful stop: say goodbye, leave unacknowledged windows on disk.
    let goodbye = state.status(DeviceState::Offline, Utc::now());
    session.try_publish(&status_topic, false, true, goodbye.encode());
    session.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = session.poll().await {
            match event {
                SessionEvent::Acked => acked += 1,
                SessionEvent::Disconnected => break,
                _ => {}
            }
        }
    })
    .await;
    if in_flight > 0 && acked >= in_flight {
        state.queue.ack_front(in_flight)?;
    }
    let _ = http_task.await;
    tracing::info!(buffered = state.queue.len(), "agent stopped");
    Ok(())
}
