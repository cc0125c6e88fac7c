//! The agent's connection to the broker: every transport, TLS checks, authentication, the
//! fleet ACL, the HTTP CONNECT proxy, that the agent never listens, and the bounds of the
//! MQTT client itself (driven directly, against the same real broker).

mod common;

use common::*;
use mio::{Events, Poll, Token, Waker};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::config::BrokerConfig;
use tether::net::client::{Client, ClientOptions, Event, BULK_QUEUE_LIMIT, MAX_EVENTS, SEND_QUEUE_LIMIT};

/// Starts an agent with `patch` merged into the quick config, and checks it comes online with
/// a full status and sends heartbeats.
fn online_over(broker: &Broker, device: &str, patch: Value) -> (Agent, Sub) {
    let mut config = broker.agent_config(device);
    merge(&mut config, patch);
    let mut sub = Sub::new(broker, &format!("tether/{device}/#"));
    let agent = Agent::start(config);
    let status = sub.expect_online(device, secs(15));
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "status: {status}");
    assert!(status["arch"].as_str().is_some_and(|a| !a.is_empty()), "status: {status}");
    let since = status["since"].as_u64().unwrap_or_else(|| panic!("status without since: {status}"));
    assert!(since.abs_diff(unix_s()) < 120, "since {since} is not about now ({})", unix_s());
    let hb = sub.expect_live_heartbeat(device, secs(10));
    assert!(hb["seq"].is_u64(), "heartbeat: {hb}");
    (agent, sub)
}

#[test]
fn connects_over_wss() {
    let broker = Broker::start_default();
    // A host name (checked against the certificate's DNS name) rather than an address.
    online_over(
        &broker,
        "dev-wss",
        json!({"broker": {"url": broker.url_with_host(Listener::Wss, "localhost"), "ca_file": broker.ca_file()}}),
    );
}

#[test]
fn connects_over_ws() {
    let broker = Broker::start_default();
    online_over(&broker, "dev-ws", json!({"broker": {"url": broker.url(Listener::Ws)}}));
}

#[test]
fn connects_over_mqtts() {
    let broker = Broker::start_default();
    online_over(
        &broker,
        "dev-mqtts",
        json!({"broker": {"url": broker.url(Listener::Mqtts), "ca_file": broker.ca_file()}}),
    );
}

#[test]
fn connects_over_mqtt_and_publishes_retained() {
    let broker = Broker::start_default();
    let (_agent, mut sub) = online_over(&broker, "dev-mqtt", json!({}));
    sub.expect_live_heartbeat("dev-mqtt", secs(5));
    // A subscriber arriving later gets the status and the last heartbeat from the retained store.
    let mut late = Sub::new(&broker, "tether/dev-mqtt/#");
    let m = late.expect("retained status", secs(5), |m| m.topic == status_topic("dev-mqtt"));
    assert!(m.retained && m.json().unwrap()["online"] == json!(true), "{m:?}");
    let m = late.expect("retained heartbeat", secs(5), |m| m.topic == heartbeat_topic("dev-mqtt"));
    assert!(m.retained && m.json().unwrap()["seq"].is_u64(), "{m:?}");
}

#[test]
fn connects_with_a_client_certificate() {
    let broker = Broker::start_default();
    let (cert, key) = broker.client_cert("dev-mtls");
    let (_agent, _sub) = online_over(
        &broker,
        "dev-mtls",
        json!({"broker": {
            "url": broker.url(Listener::Mtls),
            "ca_file": broker.ca_file(),
            "cert_file": cert,
            "key_file": key,
        }}),
    );
    // The broker took the certificate's CN as the username.
    assert!(broker.log().contains("u'dev-mtls'"), "the broker did not see the client certificate");
}

/// Runs an agent against listener `l` through a `TcpRelay` (to count its connection attempts),
/// with `patch` merged into the quick config. Checks it never comes online, logs a line
/// satisfying `cause` (given in lower case) and keeps trying (3 attempts). Returns the agent,
/// still running, and the relay.
fn never_connects(
    broker: &Broker,
    device: &str,
    l: Listener,
    patch: Value,
    what: &str,
    cause: fn(&str) -> bool,
) -> (Agent, TcpRelay) {
    let relay = TcpRelay::start(broker.ports.of(l));
    let mut config = broker.agent_config(device);
    merge(&mut config, json!({"broker": {"url": broker.url_at(l, "127.0.0.1", relay.port)}}));
    merge(&mut config, patch);
    let mut sub = Sub::new(broker, &status_topic(device));
    let agent = Agent::start(config);
    let line = agent.wait_log_line(secs(15), cause);
    assert!(line.is_some(), "the agent did not log the cause ({what})");
    assert!(
        wait_until(secs(15), || relay.accepted().len() >= 3),
        "the agent did not retry: {} connection attempt(s)",
        relay.accepted().len()
    );
    sub.expect_none("the device online", secs(1), |m| m.payload.contains("\"online\":true"));
    assert!(!broker.log().contains(&format!(" as {device} (")), "the broker accepted {device}");
    (agent, relay)
}

#[test]
fn wrong_ca_never_connects_and_backs_off() {
    let broker = Broker::start_default();
    let patch = json!({"broker": {"ca_file": broker.wrong_ca_file()}, "reconnect": {"min_s": 1, "max_s": 4}});
    let cause = |l: &str| l.contains("unknownissuer") || l.contains("unknown issuer");
    let (_agent, relay) =
        never_connects(&broker, "dev-wrongca", Listener::Mqtts, patch, "unknown issuer", cause);
    // Backoff: the delay starts about min_s (1 s) and grows towards max_s (4 s), never beyond.
    assert!(wait_until(secs(30), || relay.accepted().len() >= 6), "fewer than 6 attempts in 30 s");
    let times = relay.accepted();
    let gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).take(5).collect();
    assert!(gaps[0] < 2.0, "the first retry waited {:.1} s (min_s is 1): {gaps:.1?}", gaps[0]);
    let later = gaps[2..].iter().sum::<f64>() / (gaps.len() - 2) as f64;
    assert!(later > gaps[0] + 0.5, "the delay between attempts did not grow: {gaps:.1?}");
    assert!(gaps.iter().all(|&g| g < 5.0), "a delay longer than max_s (4 s): {gaps:.1?}");
}

#[test]
fn wrong_host_name_never_connects() {
    let broker = Broker::start_default();
    let patch = json!({"broker": {"ca_file": broker.ca_file()}});
    let cause = |l: &str| l.contains("notvalidforname") || l.contains("not valid for name");
    never_connects(&broker, "dev-wrongname", Listener::WrongName, patch, "name mismatch", cause);
}

#[test]
fn mtls_listener_without_client_certificate_never_connects() {
    let broker = Broker::start_default();
    let patch = json!({"broker": {"ca_file": broker.ca_file()}});
    let cause = |l: &str| {
        l.contains("certificaterequired")
            || l.contains("certificate required")
            || l.contains("handshakefailure")
            || l.contains("handshake failure")
            || (l.contains("alert") && l.contains("tls"))
    };
    never_connects(&broker, "dev-nocert", Listener::Mtls, patch, "a TLS alert: certificate required", cause);
}

#[test]
fn wrong_password_is_reported_and_never_online() {
    let broker = Broker::start(BrokerOpts::default().anonymous(false).user("dev-pw", "right-password"));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    write_file(&pw, "wrong-password\n");
    let patch = json!({"broker": {"username": "dev-pw", "password_file": pw}});
    let cause =
        |l: &str| l.contains("not authori") || l.contains("bad user") || l.contains("username or password");
    never_connects(&broker, "dev-pw", Listener::Plain, patch, "bad username or password", cause);
}

#[test]
fn fleet_acl_isolates_devices() {
    let broker = Broker::start(
        BrokerOpts::default().anonymous(false).user("dev-a", "pw-a").user("dev-b", "pw-b").acl(FLEET_ACL),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut op = Sub::new(&broker, "tether/#");
    for (device, password) in [("dev-a", "pw-a"), ("dev-b", "pw-b")] {
        let file = dir.path().join(device);
        write_file(&file, password);
        let mut config = broker.agent_config(device);
        merge(&mut config, json!({"broker": {"username": device, "password_file": file}}));
        agents.push(Agent::start(config));
    }
    for device in ["dev-a", "dev-b"] {
        op.expect_any_time(&format!("{device} online"), secs(15), |m| {
            m.topic == status_topic(device) && m.payload.contains("\"online\":true")
        });
    }
    op.expect_live_heartbeat("dev-b", secs(5));

    // As dev-a: subscribe to dev-b's topics (and everything), publish a command to dev-b.
    let mut as_a = Sub::builder(&broker, "tether/dev-b/#")
        .also("tether/#")
        .user("dev-a", "pw-a")
        .probe_root("tether/dev-a")
        .start();
    let a = Some(("dev-a", "pw-a"));
    let cmd_b = cmd_topic("dev-b", "ping", "from-a");
    publish_as(&broker, a, &cmd_b, br#"{"status":"init"}"#, true);
    // dev-a's own command works (the agent as dev-a works normally).
    let cmd_a = cmd_topic("dev-a", "ping", "own");
    publish_as(&broker, a, &cmd_a, br#"{"status":"init"}"#, true);
    as_a.expect_json(&cmd_a, "ping successful", secs(10), |v| v["status"] == "successful");

    // Meanwhile dev-b kept publishing, the operator saw it, dev-a saw none of it.
    op.expect_live_heartbeat("dev-b", secs(5));
    op.expect_live_heartbeat("dev-b", secs(5));
    as_a.collect(secs(1));
    let leaked: Vec<&Msg> = as_a.seen().iter().filter(|m| m.topic.starts_with("tether/dev-b/")).collect();
    assert!(leaked.is_empty(), "dev-a read dev-b's topics: {leaked:?}");
    assert!(
        as_a.seen().iter().any(|m| m.topic == heartbeat_topic("dev-a")),
        "dev-a does not see its own topics"
    );
    // dev-a's command never reached dev-b's topic, and dev-b ran nothing.
    assert!(
        !op.seen().iter().any(|m| m.topic == cmd_b),
        "dev-a's publish reached dev-b's command topic: {:?}",
        op.seen().iter().filter(|m| m.topic == cmd_b).collect::<Vec<_>>()
    );
    let mut check_b = Sub::new(&broker, "tether/dev-b/cmd/#");
    check_b.expect_none("a message on dev-b's command topic", secs(1), |m| m.topic == cmd_b);
    for agent in &mut agents {
        assert!(agent.running(), "an agent exited");
    }
}

#[test]
fn connects_through_an_http_proxy() {
    let broker = Broker::start_default();
    let proxy = HttpProxy::start(Mode::Tunnel);
    online_over(
        &broker,
        "dev-proxy",
        json!({"broker": {"url": broker.url(Listener::Wss), "ca_file": broker.ca_file(), "proxy": proxy.url()}}),
    );
    let want = format!("127.0.0.1:{}", broker.ports.wss);
    assert!(proxy.targets().contains(&want), "the proxy saw {:?}, not {want}", proxy.targets());
}

#[test]
fn refusing_proxy_is_reported_and_never_online() {
    let broker = Broker::start_default();
    let proxy = HttpProxy::start(Mode::Refuse);
    let mut config = broker.agent_config("dev-refused");
    merge(&mut config, json!({"broker": {"proxy": proxy.url()}}));
    let mut sub = Sub::new(&broker, &status_topic("dev-refused"));
    let agent = Agent::start(config);
    let line = agent.wait_log_line(secs(15), |l| {
        l.contains("proxy") && (l.contains("forbidden") || l.contains(" 403") || l.contains("403 "))
    });
    assert!(line.is_some(), "the agent did not log the proxy's refusal (403)");
    assert!(wait_until(secs(10), || proxy.targets().len() >= 2), "no retry through the proxy");
    sub.expect_none("the device online", secs(1), |m| m.payload.contains("\"online\":true"));
    assert!(!broker.log().contains(" as dev-refused ("), "the agent went around the proxy");
}

#[test]
fn never_listens_on_any_socket() {
    let mut broker = Broker::start_default();
    let (mut agent, mut sub) = online_over(&broker, "dev-nolisten", json!({}));
    // A command and a few heartbeats later, it has sockets but listens on none.
    let topic = cmd_topic("dev-nolisten", "ping", "1");
    publish(&broker, &topic, br#"{"status":"init"}"#, true);
    sub.expect_json(&topic, "ping successful", secs(10), |v| v["status"] == "successful");
    sub.expect_live_heartbeat("dev-nolisten", secs(5));
    assert!(agent.running());
    let pid = agent.pid();
    assert!(socket_count(pid) > 0, "the agent has no socket at all: is it the right process?");
    assert_eq!(listening_sockets(pid), Vec::<String>::new(), "the agent listens");
    // Also while it is disconnected and retrying.
    drop(sub);
    broker.stop();
    std::thread::sleep(secs(2));
    assert_eq!(listening_sockets(pid), Vec::<String>::new(), "the agent listens while offline");
    broker.start_again();
}

/// A web server that answers 404 to everything, as a reverse proxy in front of the broker
/// does for a wrong WebSocket path. Runs until the test process ends.
fn http_404_server() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ =
                conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

#[test]
fn dns_refused_and_http_failures_are_logged_once_per_attempt_with_their_cause() {
    let broker = Broker::start_default();
    let closed_port = free_port();
    let cases = [
        (
            "dev-dns",
            "mqtt://no-such-host.invalid:1883".to_string(),
            "dns: cannot resolve no-such-host.invalid",
        ),
        ("dev-refused", format!("mqtt://127.0.0.1:{closed_port}"), "connection refused"),
        ("dev-404", format!("ws://127.0.0.1:{}/mqtt", http_404_server()), "http 404"),
    ];
    let agents: Vec<Agent> = cases
        .iter()
        .map(|(device, url, _)| {
            let mut config = broker.agent_config(device);
            merge(&mut config, json!({"broker": {"url": url}}));
            Agent::start(config)
        })
        .collect();
    for (agent, (device, url, cause)) in agents.iter().zip(&cases) {
        let failures = || {
            agent
                .log()
                .lines()
                .map(str::to_lowercase)
                .filter(|l| l.contains("retrying in"))
                .collect::<Vec<_>>()
        };
        assert!(
            wait_until(secs(15), || failures().len() >= 3),
            "{device}: fewer than 3 attempts:\n{}",
            agent.log()
        );
        for line in failures() {
            // One line per failed attempt, naming the URL and the cause.
            assert!(line.contains(url) && line.contains(cause), "{device}: {line:?} does not say {cause:?}");
        }
    }
}

/// The library's MQTT client in a mio loop of the test's own, as the agent and tetherctl run it.
struct Driver {
    poll: Poll,
    events: Events,
    client: Client,
    /// Tags of the QoS 1 publishes the broker acknowledged.
    acked: Vec<u64>,
    /// Messages received, in order.
    messages: Vec<String>,
    /// The most events the client held for one turn of the loop.
    largest_batch: usize,
}

impl Driver {
    fn connect(broker: &Broker, client_id: &str, subscriptions: &[&str]) -> Driver {
        Driver::connect_with(json!({"url": broker.url(Listener::Plain)}), client_id, subscriptions)
    }

    /// A client with broker settings `config` (as in the agent's configuration).
    fn connect_with(config: Value, client_id: &str, subscriptions: &[&str]) -> Driver {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(1)).unwrap());
        let config: BrokerConfig = serde_json::from_value(config).unwrap();
        let mut opts = ClientOptions::for_broker(&config, client_id.into()).unwrap();
        opts.subscriptions = subscriptions.iter().map(|s| s.to_string()).collect();
        let client = Client::new(opts, waker, Token(0));
        let mut d = Driver {
            poll,
            events: Events::with_capacity(16),
            client,
            acked: vec![],
            messages: vec![],
            largest_batch: 0,
        };
        assert!(d.run_until(secs(10), |d| d.client.is_up()), "the client did not connect");
        d
    }

    /// Runs the loop until `done` holds (true) or `timeout` passes (false).
    fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&Driver) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            self.take_events();
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            let wake = self.client.next_deadline().map_or(end, |d| d.min(end));
            self.poll.poll(&mut self.events, Some(wake.saturating_duration_since(now))).unwrap();
            let registry = self.poll.registry();
            for event in self.events.iter() {
                match event.token() {
                    Token(0) => self.client.on_socket(registry, event),
                    _ => self.client.on_wake(registry),
                }
            }
            self.client.on_timer(registry, Instant::now());
        }
    }

    fn take_events(&mut self) {
        let mut batch = 0;
        while let Some(event) = self.client.next_event() {
            batch += 1;
            match event {
                Event::Acked(tag) => self.acked.push(tag),
                Event::Message(p) => self.messages.push(String::from_utf8_lossy(&p.payload).into_owned()),
                _ => {}
            }
        }
        self.largest_batch = self.largest_batch.max(batch);
    }
}

#[test]
fn a_stalled_link_refuses_publishes_past_its_bound_while_keepalive_still_goes_in() {
    let broker = Broker::start_default();
    let topic = "tether/dev-bulk/bulk";
    let mut sub = Sub::new(&broker, topic);
    let mut d = Driver::connect(&broker, "dev-bulk", &[]);
    // A frozen broker reads nothing: the kernel's buffers fill, then the client's queue.
    signal(broker.pid(), libc::SIGSTOP);
    let payload = |i: usize| format!("{i:06} {}", "x".repeat(4000));
    let mut accepted = 0;
    while accepted < 20_000 && d.client.publish(topic, payload(accepted).as_bytes(), false, None) {
        accepted += 1;
    }
    let queued = d.client.queued_bytes();
    let refused_qos1 = !d.client.can_publish() && !d.client.publish(topic, b"qos1", false, Some(1));
    // Keepalive is due: the PINGREQ goes in whatever is queued.
    d.client.on_timer(d.poll.registry(), Instant::now() + secs(60));
    let with_ping = d.client.queued_bytes();
    signal(broker.pid(), libc::SIGCONT);

    assert!(accepted < 20_000, "80 MB of publishes taken without a refusal");
    assert!(
        (SEND_QUEUE_LIMIT..SEND_QUEUE_LIMIT + 4100).contains(&queued),
        "{queued} bytes queued when publishes were refused (bound {SEND_QUEUE_LIMIT})"
    );
    assert!(refused_qos1, "a QoS 1 publish was taken past the bound");
    assert_eq!(with_ping, queued + 2, "the PINGREQ was not queued past the bound");

    // The broker reads again: the queue drains, publishing resumes, nothing taken was lost.
    assert!(d.run_until(secs(10), |d| d.client.can_publish()), "publishing did not resume");
    assert!(d.client.publish(topic, b"end", false, Some(7)));
    assert!(d.run_until(secs(10), |d| d.acked.contains(&7)), "the last publish was not acknowledged");
    sub.expect("the last message", secs(20), |m| m.payload == "end");
    let got: Vec<usize> = sub
        .seen()
        .iter()
        .filter(|m| m.payload != "end")
        .filter_map(|m| m.payload.get(..6)?.parse().ok())
        .collect();
    assert!(
        got == (0..accepted).collect::<Vec<_>>(),
        "{} of the {accepted} publishes taken arrived",
        got.len()
    );
    assert!(broker.log().contains("Received PINGREQ from dev-bulk"), "the broker got no PINGREQ");
}

#[test]
fn a_flood_from_the_broker_reaches_the_owner_in_bounded_batches_in_order() {
    let broker = Broker::start_default();
    let topic = "tether/dev-flood/cmd/flood";
    let mut d = Driver::connect(&broker, "dev-flood", &[topic]);
    assert!(d.client.publish(topic, b"subscribed", false, Some(1)));
    assert!(
        d.run_until(secs(10), |d| d.messages.iter().any(|m| m == "subscribed")),
        "subscription not active"
    );

    // 5,000 messages arrive while the client's loop is busy elsewhere: they wait in its socket.
    let want: Vec<String> = (0..5000).map(|i| format!("{i:05}")).collect();
    let mut publisher = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.ports.plain.to_string(), "-t", topic, "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, (want.join("\n") + "\n").as_bytes()).unwrap();
    drop(stdin);
    assert!(publisher.wait().unwrap().success(), "mosquitto_pub failed");
    std::thread::sleep(Duration::from_millis(500));

    d.messages.clear();
    d.largest_batch = 0;
    assert!(
        d.run_until(secs(20), |d| d.messages.len() >= want.len()),
        "{} of 5000 arrived",
        d.messages.len()
    );
    assert!(d.messages == want, "the messages arrived out of order or changed");
    assert!(d.largest_batch <= MAX_EVENTS, "{} events held at once (bound {MAX_EVENTS})", d.largest_batch);
}

/// A TCP relay to `target_port` that forwards what the client sends at `rate` bytes per second
/// at most, as a slow uplink (2G, satellite) would, and counts it. Its socket takes little at a
/// time, so what the client has sent and the link has not carried waits on the client's side.
struct SlowUplink {
    port: u16,
    carried: Arc<AtomicUsize>,
}

impl SlowUplink {
    fn start(target_port: u16, rate: usize) -> SlowUplink {
        let listener = listener_taking_little();
        let port = listener.local_addr().unwrap().port();
        let carried = Arc::new(AtomicUsize::new(0));
        let counter = carried.clone();
        std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let broker = TcpStream::connect(("127.0.0.1", target_port)).unwrap();
            let (mut from_broker, mut to_client) = (broker.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut from_broker, &mut to_client));
            carry_slowly(client, broker, rate, &counter);
        });
        SlowUplink { port, carried }
    }

    /// Bytes carried to the broker so far.
    fn carried(&self) -> usize {
        self.carried.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` at `rate` bytes per second at most, counting in `carried`.
fn carry_slowly(mut from: TcpStream, mut to: TcpStream, rate: usize, carried: &AtomicUsize) {
    let start = Instant::now();
    let mut chunk = [0u8; 512];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&chunk[..n]).is_err() {
            return;
        }
        let total = carried.fetch_add(n, Ordering::SeqCst) + n;
        let due = start + Duration::from_secs_f64(total as f64 / rate as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
}

/// Bulk data sent as fast as the client takes it, over TLS on a 32 KB/s uplink, for seconds:
/// a QoS 1 publish still finds room at once, and little waits ahead of it in the client,
/// rustls and the kernel together, so its PUBACK comes back within a second or so. (Without
/// TCP_NOTSENT_LOWAT the kernel takes megabytes here, a minute and more of this link.)
#[test]
fn a_full_bulk_lane_on_a_slow_link_keeps_little_ahead_of_other_packets() {
    let broker = Broker::start_default();
    let uplink = SlowUplink::start(broker.ports.mqtts, 32 * 1024);
    let config = json!({
        "url": broker.url_at(Listener::Mqtts, "127.0.0.1", uplink.port),
        "ca_file": broker.ca_file(),
    });
    let mut d = Driver::connect_with(config, "dev-lane", &[]);
    let topic = "tether/dev-lane/stream";
    let chunk = vec![b's'; 1024];
    // The PUBLISH packet: type, remaining length (2 bytes), topic length, topic, payload.
    let packet_len = 1 + 2 + 2 + topic.len() + chunk.len();
    let (chunks, mut largest_queue) = stream_bulk(&mut d, topic, &chunk, secs(3), false);
    // TLS records are a little longer than what they carry: this undercounts, by under 1 %.
    let ahead = chunks * packet_len - uplink.carried();
    assert!(d.client.publish(topic, b"control", false, Some(1)), "no room left for a publish");
    let published = Instant::now();
    let (_, largest_later) = stream_bulk(&mut d, topic, &chunk, secs(30), true);
    let acked_after = published.elapsed();
    largest_queue = largest_queue.max(largest_later);

    let bound = BULK_QUEUE_LIMIT + packet_len - chunk.len();
    assert!(largest_queue <= bound, "{largest_queue} bytes of bulk data queued (bound {bound})");
    assert!(ahead < 48 * 1024, "{ahead} bytes sent and not carried yet");
    assert!(acked_after < secs(5), "the PUBACK came {acked_after:?} later");
}

/// Publishes bulk `chunk`s on `topic` whenever the client has room, for `time` or, with
/// `until_acked`, until the publish tagged 1 is acknowledged. Returns how many it published and
/// the most bytes queued meanwhile.
fn stream_bulk(
    d: &mut Driver,
    topic: &str,
    chunk: &[u8],
    time: Duration,
    until_acked: bool,
) -> (usize, usize) {
    let end = Instant::now() + time;
    let (mut chunks, mut largest_queue) = (0, 0);
    while Instant::now() < end && !(until_acked && d.acked.contains(&1)) {
        while d.client.publish_bulk(topic, chunk) {
            chunks += 1;
        }
        largest_queue = largest_queue.max(d.client.queued_bytes());
        d.run_until(secs(1), |d| d.client.bulk_room() >= chunk.len() || d.acked.contains(&1));
    }
    (chunks, largest_queue)
}
