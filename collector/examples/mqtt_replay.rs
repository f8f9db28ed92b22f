//! A strong MQTT publisher for `bench/ingest.py`: replays captured messages
//! as QoS 1 over one connection with a wide in-flight window, and returns
//! once the broker has acknowledged every one.
//!
//! ```sh
//! mqtt_replay HOST PORT FILE [INFLIGHT]
//! ```
//!
//! FILE holds one message per line, `topic payload`, as `mosquitto_sub -v`
//! prints them (a topic has no spaces; a JSON payload no newline). Prints
//! `{"messages": N, "seconds": S}` on stdout.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, file, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: mqtt_replay HOST PORT FILE [INFLIGHT]");
    };
    let inflight: u16 = rest.first().map_or(Ok(1000), |s| s.parse())?;
    let text = std::fs::read(file)?;
    let messages: Vec<(String, bytes::Bytes)> = text
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let space = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
            let topic = String::from_utf8_lossy(&line[..space]).into_owned();
            let payload = bytes::Bytes::copy_from_slice(line.get(space + 1..).unwrap_or_default());
            (topic, payload)
        })
        .collect();
    let total = messages.len();
    let mut options = MqttOptions::new(
        format!("mqtt-replay-{}", std::process::id()),
        host,
        port.parse()?,
    );
    options.set_inflight(inflight);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(inflight) * 2);
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut acked = 0;
    while acked < total {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
            acked += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let client = publisher.await??;
    client.disconnect().await?;
    println!("{{\"messages\": {total}, \"seconds\": {seconds}}}");
    Ok(())
}
