//! A bare MQTT 3.1.1 client over plain TCP for tests that move thousands of messages: a
//! `mosquitto_pub` per message would take minutes, and `mosquitto_sub` at QoS 1 loses
//! messages past the broker's queue bound.

use bytes::BytesMut;
use mqttbytes::v4::{self, Packet};
use mqttbytes::QoS;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub struct RawClient {
    stream: TcpStream,
    inbuf: BytesMut,
    next_pkid: u16,
}

/// A publish as received.
#[derive(Debug, Clone)]
pub struct RawMsg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retained: bool,
    pub at: Instant,
}

impl RawClient {
    pub fn connect(port: u16, client_id: &str) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
        stream.set_nodelay(true).unwrap();
        let mut client = RawClient { stream, inbuf: BytesMut::new(), next_pkid: 0 };
        let mut connect = v4::Connect::new(client_id);
        connect.keep_alive = 600;
        client.send(&Packet::Connect(connect));
        match client.read_packet(Duration::from_secs(10)) {
            Some(Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => client,
            other => panic!("no CONNACK: {other:?}"),
        }
    }

    /// Publishes every message at QoS 1, pipelined, and waits for all acknowledgements.
    pub fn publish_all(&mut self, messages: &[(String, Vec<u8>)], retain: bool) {
        let mut buf = BytesMut::new();
        for (topic, payload) in messages {
            let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload.clone());
            p.retain = retain;
            p.pkid = self.pkid();
            p.write(&mut buf).unwrap();
        }
        self.stream.write_all(&buf).unwrap();
        let mut acked = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked < messages.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_packet(left) {
                Some(Packet::PubAck(_)) => acked += 1,
                Some(_) => {}
                None => panic!("{acked} of {} publishes acknowledged in 60 s", messages.len()),
            }
        }
    }

    /// Subscribes at QoS 0 (a stock Mosquitto caps QoS 1 deliveries at ~1,000 queued).
    pub fn subscribe(&mut self, filters: &[&str]) {
        let mut sub = v4::Subscribe::new_many(
            filters.iter().map(|f| v4::SubscribeFilter::new(f.to_string(), QoS::AtMostOnce)),
        );
        sub.pkid = self.pkid();
        self.send(&Packet::Subscribe(sub));
        loop {
            match self.read_packet(Duration::from_secs(10)) {
                Some(Packet::SubAck(_)) => return,
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
    }

    /// The next publish within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<RawMsg> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.read_packet(left)? {
                Packet::Publish(p) => {
                    return Some(RawMsg {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                        at: Instant::now(),
                    })
                }
                _ => continue,
            }
        }
    }

    /// The retained messages under `filter` now: topic → payload.
    pub fn retained(port: u16, filter: &str) -> BTreeMap<String, Vec<u8>> {
        let probe = format!("tether/_harness/snapshot/{}", std::process::id());
        let mut client = RawClient::connect(port, &format!("snapshot-{}", super::unique()));
        client.subscribe(&[filter, &probe]);
        client.publish_qos0(&probe, b"end");
        let mut out = BTreeMap::new();
        while let Some(m) = client.next(Duration::from_secs(30)) {
            if m.topic == probe {
                return out;
            }
            if m.retained {
                out.insert(m.topic, m.payload);
            }
        }
        panic!("the snapshot of {filter} did not end within 30 s ({} messages)", out.len());
    }

    pub fn publish_qos0(&mut self, topic: &str, payload: &[u8]) {
        self.send(&Packet::Publish(v4::Publish::new(topic, QoS::AtMostOnce, payload.to_vec())));
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    fn send(&mut self, packet: &Packet) {
        let mut buf = BytesMut::new();
        match packet {
            Packet::Connect(p) => p.write(&mut buf),
            Packet::Publish(p) => p.write(&mut buf),
            Packet::Subscribe(p) => p.write(&mut buf),
            other => panic!("not sent by this client: {other:?}"),
        }
        .unwrap();
        self.stream.write_all(&buf).unwrap();
    }

    fn read_packet(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = Instant::now() + timeout;
        loop {
            match v4::read(&mut self.inbuf, 1 << 24) {
                Ok(packet) => return Some(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the broker: {e:?}"),
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the broker closed the connection"),
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                // A read with a timeout returns EINTR after the process was stopped and
                // continued, even with no signal handler.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return None
                }
                Err(e) => panic!("reading from the broker: {e}"),
            }
        }
    }
}
