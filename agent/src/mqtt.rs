//! One MQTT session over protocol 3.1.1 or 5, reduced to what the agent
//! needs: connect with credentials, transport (TCP or TLS) and a retained
//! last will; publish; and events (connected, a QoS 1 acknowledgement,
//! disconnected). rumqttc has a client per protocol; this hides which.

use std::time::Duration;

use driftline_core::broker::BrokerUrl;
use rumqttc::v5::mqttbytes::v5::Packet as PacketV5;
use rumqttc::{Event, Outgoing, Packet, QoS};

use driftline_runtime::tls::{self, TlsError, TlsFiles};

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    V311,
    V5,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub protocol: Protocol,
    pub client_id: String,
    pub broker: BrokerUrl,
    pub keep_alive: Duration,
    pub credentials: Option<(String, String)>,
    pub tls: TlsFiles,
    /// Retained last will: topic and payload, QoS 1.
    pub will: Option<(String, Vec<u8>)>,
    /// Capacity of the request queue.
    pub capacity: usize,
}

/// What the event loop saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    Connected,
    /// The broker acknowledged a QoS 1 publish.
    Acked,
    /// Our disconnect went out.
    Disconnected,
    Other,
}

// Event loops are large; box them so the enum stays small.
enum Client {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

/// The session; poll it continuously, publishing only enqueues.
pub struct Session(Client);

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Client::V4(..) => "Session(MQTT 3.1.1)",
            Client::V5(..) => "Session(MQTT 5)",
        })
    }
}

fn qos(at_least_once: bool) -> QoS {
    if at_least_once {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    }
}

fn qos5(at_least_once: bool) -> rumqttc::v5::mqttbytes::QoS {
    if at_least_once {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    }
}

impl Session {
    pub fn new(o: SessionOptions) -> Result<Self, TlsError> {
        let transport = tls::transport(&o.broker, &o.tls)?;
        Ok(Session(match o.protocol {
            Protocol::V311 => {
                let mut m =
                    rumqttc::MqttOptions::new(o.client_id, o.broker.host.clone(), o.broker.port);
                m.set_keep_alive(o.keep_alive).set_transport(transport);
                if let Some((u, p)) = o.credentials {
                    m.set_credentials(u, p);
                }
                if let Some((topic, payload)) = o.will {
                    m.set_last_will(rumqttc::LastWill::new(
                        topic,
                        payload,
                        QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (c, e) = rumqttc::AsyncClient::new(m, o.capacity);
                Client::V4(c, Box::new(e))
            }
            Protocol::V5 => {
                let mut m = rumqttc::v5::MqttOptions::new(
                    o.client_id,
                    o.broker.host.clone(),
                    o.broker.port,
                );
                m.set_keep_alive(o.keep_alive).set_transport(transport);
                if let Some((u, p)) = o.credentials {
                    m.set_credentials(u, p);
                }
                if let Some((topic, payload)) = o.will {
                    m.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        topic,
                        payload,
                        qos5(true),
                        true,
                        None,
                    ));
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(m, o.capacity);
                Client::V5(c, Box::new(e))
            }
        }))
    }

    /// The next event; an error means the connection failed (the next poll
    /// reconnects).
    pub async fn poll(&mut self) -> Result<SessionEvent, String> {
        match &mut self.0 {
            Client::V4(_, e) => match e.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(SessionEvent::Connected),
                Ok(Event::Incoming(Packet::PubAck(_))) => Ok(SessionEvent::Acked),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(SessionEvent::Disconnected),
                Ok(_) => Ok(SessionEvent::Other),
                Err(err) => Err(err.to_string()),
            },
            Client::V5(_, e) => match e.poll().await {
                Ok(rumqttc::v5::Event::Incoming(PacketV5::ConnAck(_))) => {
                    Ok(SessionEvent::Connected)
                }
                Ok(rumqttc::v5::Event::Incoming(PacketV5::PubAck(_))) => Ok(SessionEvent::Acked),
                Ok(rumqttc::v5::Event::Outgoing(Outgoing::Disconnect)) => {
                    Ok(SessionEvent::Disconnected)
                }
                Ok(_) => Ok(SessionEvent::Other),
                Err(err) => Err(err.to_string()),
            },
        }
    }

    /// Queues a publish; false if the request queue is full or closed.
    pub fn try_publish(
        &self,
        topic: &str,
        at_least_once: bool,
        retain: bool,
        payload: Vec<u8>,
    ) -> bool {
        match &self.0 {
            Client::V4(c, _) => c
                .try_publish(topic, qos(at_least_once), retain, payload)
                .is_ok(),
            Client::V5(c, _) => c
                .try_publish(topic, qos5(at_least_once), retain, payload)
                .is_ok(),
        }
    }

    /// Queues a clean disconnect.
    pub fn try_disconnect(&self) {
        let _ = match &self.0 {
            Client::V4(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}
