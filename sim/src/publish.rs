//! MQTT publishing (QoS 1) of noised windows, for the simulator.
//!
//! [`Publisher`] owns one MQTT connection with a persistent session. Its
//! event loop runs in a task that counts broker acknowledgements and
//! reconnects with backoff; when the broker kept the session, rumqttc
//! re-sends unacknowledged QoS 1 messages after a reconnect, so delivery is
//! at least once and `seq` lets the collector drop duplicates. (A broker
//! that loses the session loses those messages: the simulator then reports
//! them as unacknowledged. The agent proper re-sends from its disk buffer.)

use std::time::Duration;

use driftline_core::broker::BrokerUrl;
use driftline_core::topic;
use driftline_core::wire::Rejection;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use driftline_core::status::{DeviceState, StatusReport};
use driftline_pipeline::privacy::{DeviceIdentity, PrivateWindow};

/// A status message of a simulated device.
fn status(device: &DeviceIdentity, state: DeviceState) -> Vec<u8> {
    StatusReport {
        agent_version: Some(device.agent_version.clone()),
        ..StatusReport::new(&device.device_id, &device.fleet, state, chrono::Utc::now())
    }
    .encode()
}

/// Errors of the publisher.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Tls(#[from] driftline_runtime::tls::TlsError),
    #[error("the window does not encode as a valid message: {0}")]
    Encode(#[from] Rejection),
    #[error("the MQTT client stopped: {0}")]
    ClientClosed(String),
    #[error("{missing} of {published} messages were not acknowledged within {waited:?}")]
    Unacknowledged {
        published: u64,
        missing: u64,
        waited: Duration,
    },
}

impl PublishError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PublishError::ClientClosed(_) | PublishError::Unacknowledged { .. }
        )
    }
}

/// One device's MQTT connection.
pub struct Publisher {
    client: AsyncClient,
    device: DeviceIdentity,
    topic: String,
    next_seq: u64,
    published: u64,
    acked: watch::Receiver<u64>,
    driver: JoinHandle<()>,
}

impl Publisher {
    /// Connects (in the background) to `broker` as `device`; `first_seq` is
    /// the first sequence number to use.
    pub fn connect(
        broker: &BrokerUrl,
        device: DeviceIdentity,
        first_seq: u64,
        credentials: Option<(String, String)>,
        tls: &driftline_runtime::tls::TlsFiles,
    ) -> Result<Self, PublishError> {
        let client_id = format!("driftline-{}-{}", device.fleet, device.device_id);
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(100);
        // A persistent session: after a reconnect the client re-sends what
        // the broker had not acknowledged (with a clean session it would
        // drop it, and this publisher has no disk buffer to re-send from).
        options.set_clean_session(false);
        if let Some((username, password)) = credentials {
            options.set_credentials(username, password);
        }
        // Like a real agent: retained status, offline as the last will.
        let status_topic = topic::status_topic(&device.fleet, &device.device_id);
        options.set_last_will(rumqttc::LastWill::new(
            &status_topic,
            status(&device, DeviceState::Offline),
            QoS::AtLeastOnce,
            true,
        ));
        options.set_transport(driftline_runtime::tls::transport(broker, tls)?);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        // QoS 0: its acknowledgement would count as a window's.
        let _ = client.try_publish(
            &status_topic,
            QoS::AtMostOnce,
            true,
            status(&device, DeviceState::Online),
        );
        let (acked_tx, acked) = watch::channel(0u64);
        let device_id = device.device_id.clone();
        let driver = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(100);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(device_id, error = %e, ?backoff, "MQTT connection failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        Ok(Publisher {
            client,
            topic: topic::metrics_topic(&device.fleet, &device.device_id),
            device,
            next_seq: first_seq,
            published: 0,
            acked,
            driver,
        })
    }

    /// Encodes `window` with the next `seq` and queues it for sending (QoS 1).
    pub async fn publish(&mut self, window: PrivateWindow) -> Result<(), PublishError> {
        let report = window.into_report(&self.device, self.next_seq);
        let payload = report.encode()?;
        self.client
            .publish(self.topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| PublishError::ClientClosed(e.to_string()))?;
        self.next_seq += 1;
        self.published += 1;
        Ok(())
    }

    /// Messages handed to the client so far.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Waits until the broker acknowledged everything published so far, at
    /// most `timeout`; returns whether it did.
    pub async fn wait_acked(&mut self, timeout: Duration) -> bool {
        let published = self.published;
        tokio::time::timeout(timeout, self.acked.wait_for(|n| *n >= published))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the broker acknowledged everything published (at most
    /// `timeout`), then disconnects. Returns the number acknowledged.
    pub async fn finish(mut self, timeout: Duration) -> Result<u64, PublishError> {
        let published = self.published;
        let waited = self.wait_acked(timeout).await;
        let acked = *self.acked.borrow();
        let topic = topic::status_topic(&self.device.fleet, &self.device.device_id);
        let offline = status(&self.device, DeviceState::Offline);
        let _ = self
            .client
            .publish(topic, QoS::AtMostOnce, true, offline)
            .await;
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.driver).await;
        self.driver.abort();
        if waited {
            Ok(acked)
        } else {
            Err(PublishError::Unacknowledged {
                published,
                missing: published.saturating_sub(acked),
                waited: timeout,
            })
        }
    }
}
