//! The MQTT side of the collector: subscribe (QoS 1) to every device's
//! metrics topic, hand each message to [`Ingest`], flush to the lake on a
//! timer and when enough rows are pending, and on shutdown stop taking
//! messages and flush what was received.
//!
//! The session is persistent (fixed client id, clean session off), so the
//! broker keeps QoS 1 messages for the collector while it is away.
//! Delivery into the lake is at least once: rumqttc acknowledges a message
//! on receipt, so a `kill -9` loses what was received since the last flush
//! (bounded by `flush_interval`); SIGTERM loses nothing.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use driftline_core::broker::BrokerUrl;
use driftline_core::topic::METRICS_FILTER;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use driftline_agent::tls::TlsFiles;

use crate::ingest::{Counters, Ingest, IngestLimits};
use crate::lake::LakeWriter;

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
}

/// Errors that stop the subscriber.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error(transparent)]
    Tls(#[from] driftline_agent::tls::TlsError),
    #[error("final flush failed, {pending} rows not written: {source}")]
    FinalFlush {
        pending: usize,
        source: crate::lake::LakeError,
    },
}

/// Runs until `shutdown` fires, then flushes and returns.
pub async fn run(
    options: SubscriberOptions,
    lake: LakeWriter,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Result<(), SubscriberError> {
    let mut mqtt = MqttOptions::new(
        options.client_id.clone(),
        options.broker.host.clone(),
        options.broker.port,
    );
    mqtt.set_clean_session(false);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024);
    mqtt.set_transport(driftline_agent::tls::transport(
        &options.broker,
        &options.tls,
    )?);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
    let mut ingest = Ingest::new(options.limits, counters.clone());
    let mut ticker = tokio::time::interval(options.flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(200);
    tracing::info!(broker = %options.broker, client_id = options.client_id, "collector subscribing");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => flush(&mut ingest, &lake),
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!(session_present = ack.session_present, "connected to broker");
                    // Subscribing again is harmless when the session survived.
                    if let Err(e) = client.try_subscribe(METRICS_FILTER, QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "cannot queue the subscription");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    counters.subscriptions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(filter = METRICS_FILTER, "subscribed");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    ingest.handle(&p.topic, &p.payload, Utc::now());
                    if ingest.pending() >= options.flush_rows {
                        flush(&mut ingest, &lake);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "broker connection failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
    // Stop taking messages: unacknowledged ones stay with the broker.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => {
                    // Already acknowledged by the client: keep it.
                    ingest.handle(&p.topic, &p.payload, Utc::now());
                }
                Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    })
    .await;
    ingest
        .flush(&lake)
        .map_err(|source| SubscriberError::FinalFlush {
            pending: ingest.pending(),
            source,
        })?;
    tracing::info!("collector stopped; everything received is in the lake");
    Ok(())
}

fn flush(ingest: &mut Ingest, lake: &LakeWriter) {
    if ingest.pending() == 0 {
        return;
    }
    if let Err(e) = ingest.flush(lake) {
        tracing::error!(error = %e, retryable = e.is_retryable(), pending = ingest.pending(), "flush failed; rows stay pending");
    }
}
