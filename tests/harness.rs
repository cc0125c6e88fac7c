//! Proves the test harness itself, without the agent: the broker's listeners, its
//! certificates, persistence across a restart, mosquitto_sub/pub, the proxy and the socket probe.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

/// An MQTT 3.1.1 CONNECT (client id "p", clean session, keepalive 60).
const MQTT_CONNECT: [u8; 15] = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'p'];
const MQTT_CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];

fn read_some(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    buf.truncate(got);
    buf
}

/// `openssl s_client` against a port; returns (handshake verified, output).
fn s_client(port: u16, ca: &std::path::Path, extra: &[&str], send: &[u8]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-verify_return_error", "-CAfile"])
        .arg(ca)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(send).unwrap();
    // Leave stdin open a moment so s_client reads the answer before it sees EOF.
    std::thread::sleep(std::time::Duration::from_millis(700));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = output_text(&out);
    (text.contains("Verify return code: 0 (ok)"), text)
}

fn ws_upgrade(host: &str) -> Vec<u8> {
    format!(
        "GET /mqtt HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn plain_listener_round_trips_and_retains() {
    let broker = Broker::start_default();
    let mut sub = Sub::new(&broker, "test/#");
    publish(&broker, "test/a", br#"{"x": 1, "s": "two words"}"#, false);
    let m = sub.expect("test/a", secs(5), |m| m.topic == "test/a");
    assert_eq!(m.json().unwrap()["s"], "two words");
    assert!(!m.retained);

    publish(&broker, "test/kept", b"{\"k\":true}", true);
    sub.expect("live test/kept", secs(5), |m| m.topic == "test/kept");
    let mut fresh = Sub::new(&broker, "test/#");
    let m = fresh.expect("retained test/kept", secs(5), |m| m.topic == "test/kept");
    assert!(m.retained, "a message from the retained store is flagged retained");

    // An empty retained message clears it; the subscriber sees it with an empty payload.
    publish(&broker, "test/kept", b"", true);
    let m = fresh.expect("the clearing message", secs(5), |m| m.topic == "test/kept");
    assert_eq!(m.payload, "");
    let mut third = Sub::new(&broker, "test/#");
    third.expect_none("a cleared retained message", secs(1), |m| m.topic == "test/kept");
}

#[test]
fn retained_messages_and_sessions_survive_a_broker_restart() {
    let mut broker = Broker::start_default();
    let mut sub = Sub::builder(&broker, "test/#").persistent("harness-persistent").start();
    publish(&broker, "test/r", b"kept", true);
    sub.expect("test/r", secs(5), |m| m.topic == "test/r");
    let port = broker.ports.plain;
    broker.stop();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the broker is stopped");
    broker.start_again();
    assert_eq!(broker.ports.plain, port);
    // The retained message persisted...
    let mut fresh = Sub::new(&broker, "test/#");
    let m = fresh.expect("retained test/r after restart", secs(5), |m| m.topic == "test/r");
    assert!(m.retained && m.payload == "kept");
    // ...and the persistent subscriber reconnected by itself and gets new messages.
    publish(&broker, "test/after", b"1", false);
    sub.expect("test/after via the reconnected persistent subscriber", secs(10), |m| m.topic == "test/after");
}

#[test]
fn password_file_and_acl() {
    let broker = Broker::start(BrokerOpts::default().anonymous(false).user("dev-a", "pa").acl(FLEET_ACL));
    assert_eq!(broker.admin(), Some((ADMIN_USER, ADMIN_PASSWORD)));
    let mut op = Sub::new(&broker, "tether/#");
    let mut a = Sub::builder(&broker, "tether/#").user("dev-a", "pa").probe_root("tether/dev-a").start();
    publish_as(&broker, Some(("dev-a", "pa")), "tether/dev-a/x", b"mine", false);
    publish_as(&broker, Some(("dev-a", "pa")), "tether/dev-b/x", b"not mine", false);
    publish(&broker, "tether/dev-b/y", b"for b", false);
    publish(&broker, "tether/dev-a/y", b"for a", false);
    op.expect("dev-a's own publish", secs(5), |m| m.topic == "tether/dev-a/x");
    op.expect("operator's publish to b", secs(5), |m| m.topic == "tether/dev-b/y");
    a.expect("operator's publish to a", secs(5), |m| m.topic == "tether/dev-a/y");
    op.expect_none("dev-a publishing on dev-b's topics", secs(1), |m| m.topic == "tether/dev-b/x");
    assert!(
        !a.seen().iter().any(|m| m.topic.starts_with("tether/dev-b/")),
        "dev-a read dev-b's topics: {:?}",
        a.seen()
    );
    // Anonymous clients are refused.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.ports.plain.to_string(), "-t", "tether/x", "-m", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "anonymous publish accepted");
}

#[test]
fn tls_listeners_serve_the_expected_certificates() {
    let broker = Broker::start_default();
    let p = broker.ports;
    let ca = broker.ca_file();

    // mqtts: verified against the CA, for both names in the certificate; MQTT answers.
    for name in [&["-verify_hostname", "localhost"][..], &["-verify_ip", "127.0.0.1"][..]] {
        let (ok, text) = s_client(p.mqtts, &ca, name, &MQTT_CONNECT);
        assert!(ok, "mqtts {name:?}: {text}");
    }
    // The unrelated CA does not verify it.
    let (ok, _) = s_client(p.mqtts, &broker.wrong_ca_file(), &["-verify_ip", "127.0.0.1"], b"");
    assert!(!ok, "the wrong CA verified the server");
    // wss: TLS, then a websocket upgrade.
    let (ok, text) = s_client(p.wss, &ca, &["-verify_ip", "127.0.0.1"], &ws_upgrade("127.0.0.1"));
    assert!(ok && text.contains("101"), "wss: {text}");
    // wrongname: a good chain, for wrong.example only.
    let (ok, text) = s_client(p.wrongname, &ca, &["-verify_hostname", "wrong.example"], b"");
    assert!(ok, "wrongname with its own name: {text}");
    let (ok, _) = s_client(p.wrongname, &ca, &["-verify_ip", "127.0.0.1"], b"");
    assert!(!ok, "wrongname verified for 127.0.0.1");

    // mtls: with a client certificate a client connects (its CN becomes its username);
    // without one it is refused.
    let (cert, key) = broker.client_cert("dev-m");
    let mut sub = Sub::new(&broker, "m/#");
    let port = p.mtls.to_string();
    let base = ["-h", "localhost", "-p", port.as_str(), "-q", "1", "-t", "m/x", "-m", "hi"];
    let out = Command::new("mosquitto_pub")
        .args(base)
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "mtls with a client cert: {}", output_text(&out));
    sub.expect("m/x over mtls", secs(5), |m| m.topic == "m/x");
    assert!(broker.log().contains("as dev-m") || broker.log().contains("u'dev-m'"), "{}", broker.log());
    let out = Command::new("mosquitto_pub").args(base).arg("--cafile").arg(&ca).output().unwrap();
    assert!(!out.status.success(), "mtls without a client cert was accepted");

    // ws: a plain websocket upgrade.
    let mut s = TcpStream::connect(("127.0.0.1", p.ws)).unwrap();
    s.write_all(&ws_upgrade("127.0.0.1")).unwrap();
    let answer = String::from_utf8_lossy(&read_some(&mut s, 12)).into_owned();
    assert!(answer.contains("101"), "ws upgrade: {answer:?}");
}

#[test]
fn http_proxy_tunnels_and_refuses() {
    let broker = Broker::start_default();
    let proxy = HttpProxy::start(Mode::Tunnel);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let target = format!("127.0.0.1:{}", broker.ports.plain);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).unwrap();
    let head = read_some(&mut s, "HTTP/1.1 200 Connection established\r\n\r\n".len());
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    s.write_all(&MQTT_CONNECT).unwrap();
    assert_eq!(read_some(&mut s, 4), MQTT_CONNACK_OK);
    assert_eq!(proxy.targets(), vec![target.clone()]);

    let refusing = HttpProxy::start(Mode::Refuse);
    let mut s = TcpStream::connect(("127.0.0.1", refusing.port)).unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
    let head = String::from_utf8_lossy(&read_some(&mut s, 64)).into_owned();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[test]
fn listening_socket_probe_sees_the_brokers_listeners() {
    let broker = Broker::start_default();
    let found = listening_sockets(broker.pid());
    assert!(found.len() >= 6, "expected the broker's 6 listeners: {found:?}");
    // A process with only a client connection listens on nothing.
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.ports.plain.to_string(), "-t", "x"])
        .spawn()
        .unwrap();
    assert!(wait_until(secs(5), || socket_count(sub.id()) > 0));
    assert_eq!(listening_sockets(sub.id()), Vec::<String>::new());
    sub.kill().unwrap();
    sub.wait().unwrap();
}

#[test]
fn broker_log_records_connections_per_port() {
    let broker = Broker::start_default();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", broker.ports.plain)).unwrap();
        s.write_all(&MQTT_CONNECT).unwrap();
        assert_eq!(read_some(&mut s, 4), MQTT_CONNACK_OK);
    }
    assert!(wait_until(secs(5), || broker.connection_times(broker.ports.plain).len() >= 2));
    assert!(broker.connection_times(broker.ports.mqtts).is_empty());
}

#[test]
fn merge_patches_json() {
    let mut v = serde_json::json!({"a": {"b": 1, "c": 2}, "d": 3});
    merge(&mut v, serde_json::json!({"a": {"b": 5, "c": null}, "e": [1]}));
    assert_eq!(v, serde_json::json!({"a": {"b": 5}, "d": 3, "e": [1]}));
}
