//! The MQTT side of the collector: subscribe (QoS 1) to every device's
//! metrics and status topics, hand each message to [`Ingest`], flush to the
//! lake on a timer and when enough rows are pending. A flush runs on a
//! blocking thread while the loop goes on receiving, logging and
//! acknowledging; one flush at a time, so the lake sees batches in order.
//!
//! Delivery is exactly once into the lake:
//! - the session is persistent (fixed client id, clean session off), so the
//!   broker keeps QoS 1 messages while the collector is away;
//! - acknowledgements are manual: a message is acknowledged only after it is
//!   in the write-ahead log ([`crate::wal`]) and fsynced. Whatever was
//!   waiting for the disk when the loop found no more ready messages is
//!   committed with one fsync (group commit);
//! - after a crash the log is replayed into the lake, and the broker
//!   re-sends what was never acknowledged;
//! - the lake drops rows whose key it already holds ([`crate::lake`]), so
//!   replays, redeliveries and agent retries are stored once.
//!
//! Memory stays bounded whatever the broker's backlog, and while the lake
//! cannot be written: the broker sends at most its in-flight window of
//! unacknowledged messages, and the loop holds at most twice `flush_rows`
//! rows (waiting and being written), reading nothing more from the broker
//! past that. A failed flush is retried at the next flush interval.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use driftline_core::broker::BrokerUrl;
use driftline_core::topic::{METRICS_FILTER, STATUS_FILTER};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use tokio_util::sync::CancellationToken;

use driftline_runtime::tls::TlsFiles;

use crate::ingest::{Batch, Counters, Ingest, IngestLimits};
use crate::lake::{LakeError, LakeWriter};
use crate::wal::{Wal, WalError};

/// Largest MQTT packet read from the broker. Payloads over the wire limit
/// (64 KiB) are still read, so they can be quarantined rather than break
/// the connection; keep the broker's `message_size_limit` at or below this.
pub const MAX_INCOMING_PACKET: usize = 16 * 1024 * 1024;

/// How the subscriber connects and flushes.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    pub broker: BrokerUrl,
    pub client_id: String,
    pub flush_interval: Duration,
    /// Flush early once this many rows are pending.
    pub flush_rows: usize,
    pub limits: IngestLimits,
    /// CA and client certificate files for `mqtts://`.
    pub tls: TlsFiles,
    /// Username and password for the broker.
    pub credentials: Option<Credentials>,
    /// MQTT shared-subscription group: collectors of one group split the
    /// metrics stream between them (`$share/{group}/...`).
    pub share_group: Option<String>,
}

/// Broker login.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Errors that stop the subscriber.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error(transparent)]
    Tls(#[from] driftline_runtime::tls::TlsError),
    #[error("{0}; unacknowledged messages stay with the broker")]
    Wal(#[from] WalError),
    #[error("cannot store the {records} messages replayed from the write-ahead log: {source}")]
    Replay {
        records: usize,
        source: crate::lake::LakeError,
    },
    #[error("a flush to the lake panicked; its rows stay in the write-ahead log and are stored at the next start: {0}")]
    FlushPanicked(String),
    #[error("final flush failed, {pending} rows not written (they stay in the write-ahead log): {source}")]
    FinalFlush {
        pending: usize,
        source: crate::lake::LakeError,
    },
}

/// The write-ahead log directory of collector `client_id` in a lake.
pub fn wal_dir(lake_root: &std::path::Path, client_id: &str) -> std::path::PathBuf {
    let safe: String = client_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    lake_root.join("_driftline").join("wal").join(safe)
}

/// The metrics filter, shared between the collectors of `group` if any.
pub fn metrics_filter(group: Option<&str>) -> String {
    match group {
        Some(g) => format!("$share/{g}/{METRICS_FILTER}"),
        None => METRICS_FILTER.to_owned(),
    }
}

/// Runs until `shutdown` fires, then flushes and returns.
pub async fn run(
    options: SubscriberOptions,
    lake: Arc<LakeWriter>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Result<(), SubscriberError> {
    let (mut wal, recovered) = Wal::open(&wal_dir(lake.root(), &options.client_id))?;
    let mut ingest = Ingest::new(options.limits, counters.clone());
    if !recovered.records.is_empty() {
        let records = recovered.records.len();
        for r in &recovered.records {
            ingest.handle(&r.topic, &r.payload, r.received_at);
        }
        counters
            .replayed
            .fetch_add(records as u64, std::sync::atomic::Ordering::Relaxed);
        ingest
            .flush(&lake)
            .map_err(|source| SubscriberError::Replay { records, source })?;
        wal.rotate()?;
        wal.remove_sealed()?;
        tracing::info!(
            records,
            skipped = recovered.skipped,
            "write-ahead log replayed into the lake"
        );
    }
    let mut mqtt = MqttOptions::new(
        options.client_id.clone(),
        options.broker.host.clone(),
        options.broker.port,
    );
    mqtt.set_clean_session(false);
    mqtt.set_manual_acks(true);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024);
    if let Some(credentials) = &options.credentials {
        mqtt.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    mqtt.set_transport(driftline_runtime::tls::transport(
        &options.broker,
        &options.tls,
    )?);
    // Acknowledgements go through this channel; it never holds more than the
    // broker's in-flight window.
    let (client, mut eventloop) = AsyncClient::new(mqtt, 65_536);
    let filters = [
        SubscribeFilter::new(
            metrics_filter(options.share_group.as_deref()),
            QoS::AtLeastOnce,
        ),
        SubscribeFilter::new(STATUS_FILTER.to_owned(), QoS::AtLeastOnce),
    ];
    let mut unacked: Vec<Publish> = Vec::new();
    let mut flushing: Option<Flushing> = None;
    let mut ticker = tokio::time::interval(options.flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(200);
    tracing::info!(broker = %options.broker, client_id = options.client_id, share_group = ?options.share_group, "collector subscribing");
    // Whether the last flush failed: then the next waits for the timer.
    let mut failing = false;
    loop {
        // At most twice `flush_rows` rows wait or are being written: past
        // that the loop stops reading from the broker (while a write runs,
        // or while the lake fails), so the backlog waits at the broker.
        // A full batch starts a flush, unless one runs or the last failed
        // (then the timer retries).
        if flushing.is_none() && !failing && ingest.pending() >= options.flush_rows {
            flushing =
                blocking(|| start_flush(&mut ingest, &lake, &mut wal, &client, &mut unacked))?;
        }
        let held = ingest.pending() + flushing.as_ref().map_or(0, |f| f.rows);
        let paused = held >= 2 * options.flush_rows;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            joined = written(&mut flushing), if flushing.is_some() => {
                if let Some(done) = flushing.take() {
                    failing = !finish(done.sealed, joined, &mut ingest, &mut wal)?;
                }
            }
            _ = ticker.tick() => if flushing.is_none() {
                flushing = blocking(|| start_flush(&mut ingest, &lake, &mut wal, &client, &mut unacked))?;
            },
            event = eventloop.poll(), if !paused => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!(session_present = ack.session_present, "connected to broker");
                    // Subscribing again is harmless when the session survived.
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %e, "cannot queue the subscription");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    counters.subscriptions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(filters = ?filters, "subscribed");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Utc::now();
                    wal.append(now, &p.topic, &p.payload)?;
                    ingest.handle_bytes(&p.topic, p.payload.clone(), now);
                    unacked.push(p);
                }
                Ok(_) => {}
                Err(e) => {
                    // What was received but not acknowledged is re-sent by
                    // the broker after the reconnect.
                    unacked.clear();
                    tracing::warn!(error = %e, ?backoff, "broker connection failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
            // No message is ready: make what arrived durable, then ack it.
            _ = std::future::ready(()), if !unacked.is_empty() => {
                commit(&mut wal, &client, &mut unacked)?;
            }
        }
    }
    // Acknowledge what is durable, then leave: messages that arrive after
    // this are not acknowledged and stay with the broker.
    commit(&mut wal, &client, &mut unacked)?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
                break;
            }
        }
    })
    .await;
    if let Some(done) = flushing.take() {
        let joined = done.task.await;
        finish(done.sealed, joined, &mut ingest, &mut wal)?;
    }
    wal.rotate()?;
    ingest
        .flush(&lake)
        .map_err(|source| SubscriberError::FinalFlush {
            pending: ingest.pending(),
            source,
        })?;
    wal.remove_sealed()?;
    tracing::info!("collector stopped; everything acknowledged is in the lake");
    Ok(())
}

/// What a flush task gives back: the batch (holding the rows it could not
/// write), the outcome and how long it took.
type Written = (Batch, Result<(), LakeError>, Duration);

/// A flush running on a blocking thread.
struct Flushing {
    /// The write-ahead log segment started when the flush began: the
    /// segments before it hold the flush's messages.
    sealed: u64,
    /// Rows in the batch.
    rows: usize,
    task: tokio::task::JoinHandle<Written>,
}

/// Waits for the running flush, if any (never resolves without one).
async fn written(flushing: &mut Option<Flushing>) -> Result<Written, tokio::task::JoinError> {
    match flushing.as_mut() {
        Some(f) => (&mut f.task).await,
        None => std::future::pending().await,
    }
}

/// Makes the received messages durable and acknowledged, seals the log's
/// segment and hands the pending rows to a flush on a blocking thread.
/// Nothing to write: no flush.
fn start_flush(
    ingest: &mut Ingest,
    lake: &Arc<LakeWriter>,
    wal: &mut Wal,
    client: &AsyncClient,
    unacked: &mut Vec<Publish>,
) -> Result<Option<Flushing>, WalError> {
    if ingest.pending() == 0 {
        return Ok(None);
    }
    commit(wal, client, unacked)?;
    let sealed = wal.rotate()?;
    let mut batch = ingest.take();
    let rows = batch.rows();
    let lake = lake.clone();
    let span = tracing::info_span!("flush", pending = batch.rows());
    let task = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let written = batch.write(&lake);
        (batch, written, started.elapsed())
    });
    Ok(Some(Flushing { sealed, rows, task }))
}

/// Takes a finished flush's outcome: rows it could not write go back to
/// `ingest` (and stay in the log) for the next flush; once everything was
/// written, the log's segments sealed for it are deleted. Returns whether
/// everything was written.
fn finish(
    sealed: u64,
    joined: Result<Written, tokio::task::JoinError>,
    ingest: &mut Ingest,
    wal: &mut Wal,
) -> Result<bool, SubscriberError> {
    let (batch, written, took) =
        joined.map_err(|e| SubscriberError::FlushPanicked(e.to_string()))?;
    metrics::histogram!("driftline_flush_seconds").record(took.as_secs_f64());
    ingest.restore(batch);
    match written {
        Ok(()) => {
            wal.remove_sealed_before(sealed)?;
            Ok(true)
        }
        Err(e) => {
            tracing::error!(error = %e, retryable = e.is_retryable(), pending = ingest.pending(), "flush failed; rows stay pending and in the write-ahead log, retried at the next flush interval");
            Ok(false)
        }
    }
}

/// Runs blocking work (fsync) so that, on a multi-threaded runtime, the
/// worker's other tasks move to another thread meanwhile instead of
/// waiting.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Makes the received messages durable with one fsync, then acknowledges
/// them.
fn commit(wal: &mut Wal, client: &AsyncClient, unacked: &mut Vec<Publish>) -> Result<(), WalError> {
    wal.commit()?;
    for p in unacked.drain(..) {
        if let Err(e) = client.try_ack(&p) {
            // Not acknowledged: the broker re-sends it, the lake drops the copy.
            tracing::warn!(error = %e, "cannot queue an acknowledgement");
        }
    }
    Ok(())
}
