//! The agent's life: last will, clean shutdown, broker outages, the offline queue across
//! restarts, and configuration reload on SIGHUP.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

fn config(broker: &Broker, device: &str, patch: Value) -> Value {
    let mut c = broker.agent_config(device);
    merge(&mut c, patch);
    c
}

fn seq(hb: &Value) -> u64 {
    hb["seq"].as_u64().unwrap_or_else(|| panic!("heartbeat without seq: {hb}"))
}

fn ts(hb: &Value) -> u64 {
    hb["ts"].as_u64().unwrap_or_else(|| panic!("heartbeat without ts: {hb}"))
}

/// The heartbeats of `device` the subscriber got live (not from the retained store), in order.
fn live_heartbeats(sub: &Sub, device: &str) -> Vec<Value> {
    let topic = heartbeat_topic(device);
    sub.seen().iter().filter(|m| m.topic == topic && !m.retained).filter_map(|m| m.json()).collect()
}

/// Waits for a live heartbeat collected after `after_ms` (unix ms), i.e. one made after the
/// agent was back online.
fn wait_fresh_heartbeat(sub: &mut Sub, device: &str, after_ms: u64) {
    let topic = heartbeat_topic(device);
    sub.expect(&format!("a heartbeat made after {after_ms}"), secs(30), |m| {
        m.topic == topic && !m.retained && m.json().is_some_and(|hb| ts(&hb) > after_ms)
    });
}

/// Every seq from `first` on arrived exactly once, in order; returns them.
fn assert_each_once_in_order(hbs: &[Value], first: u64) -> Vec<u64> {
    let seqs: Vec<u64> = hbs.iter().map(seq).filter(|&s| s >= first).collect();
    let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, want, "heartbeat seqs from {first} on: not each exactly once in order");
    seqs
}

/// Stops the broker half-way between two heartbeats (1 s apart), `last` being the latest: not
/// while one is in flight, when QoS 1 lets the broker deliver it twice to the subscriber.
fn stop_between_heartbeats(broker: &mut Broker, last: &Value) {
    let at = ts(last) + 500;
    sleep(Duration::from_millis(at.saturating_sub(unix_ms())));
    broker.stop();
}

fn made_between(hbs: &[Value], from_ms: u64, to_ms: u64) -> usize {
    hbs.iter().filter(|hb| (from_ms..to_ms).contains(&ts(hb))).count()
}

#[test]
fn kill_9_leaves_the_will_and_no_seq_is_used_twice() {
    let broker = Broker::start_default();
    let d = "dev-will";
    let mut sub = Sub::builder(&broker, &status_topic(d)).also(&heartbeat_topic(d)).start();
    let mut agent = Agent::start(config(&broker, d, json!({})));
    let online = sub.expect_online(d, secs(15));
    let last = seq(&sub.expect_live_heartbeat(d, secs(10)));
    agent.kill9();
    // The socket closes with the process: the broker sends the will at once (no keepalive wait).
    sub.expect_offline(d, secs(5));
    let mut late = Sub::new(&broker, &status_topic(d));
    let m = late.expect("the retained status", secs(5), |_| true);
    assert!(m.retained, "the will is not retained: {m:?}");
    // The will keeps what the device runs and its key, for `tetherctl devices` to show while
    // it is away.
    assert_eq!(m.json(), Some(offline_of(&online)));

    // The seq is not saved for each heartbeat, but a crash must not make it repeat. (A
    // heartbeat the broker took but whose PUBACK the killed agent never read is sent again:
    // QoS 1 is at least once. So look at one collected after the restart.)
    let restarted = unix_ms();
    agent.restart();
    let topic = heartbeat_topic(d);
    let m = sub.expect("a heartbeat made after the restart", secs(15), |m| {
        m.topic == topic && m.json().is_some_and(|hb| ts(&hb) > restarted)
    });
    let next = seq(&m.json().unwrap());
    assert!(next > last, "seq repeated after kill -9: {last} then {next}");
}

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                files.push((entry.path(), meta.len(), meta.modified().unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_connected_agent_does_not_write_its_state_dir_for_each_heartbeat() {
    let broker = Broker::start_default();
    let d = "dev-flash";
    let mut sub = Sub::new(&broker, &heartbeat_topic(d));
    let agent = Agent::start(config(&broker, d, json!({})));
    sub.expect_live_heartbeat(d, secs(15));
    sub.expect_live_heartbeat(d, secs(5));
    let before = snapshot(&agent.state_dir());
    for _ in 0..5 {
        sub.expect_live_heartbeat(d, secs(5));
    }
    // Past the outbox's store delay (5 s) for the first of them, too.
    sleep(Duration::from_secs(1));
    assert_eq!(snapshot(&agent.state_dir()), before, "the state dir changed while heartbeats flowed");
    let queued = std::fs::read_dir(agent.state_dir().join("outbox")).unwrap().count();
    assert_eq!(queued, 0, "messages the broker acknowledged are on disk");
}

#[test]
fn sigterm_goes_offline_cleanly_and_seq_survives_restart() {
    let broker = Broker::start_default();
    let d = "dev-term";
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let mut agent = Agent::start(config(&broker, d, json!({})));
    let online = sub.expect_online(d, secs(15));
    let last = seq(&sub.expect_live_heartbeat(d, secs(10)));
    let status = agent.term();
    assert_eq!(status.code(), Some(0), "SIGTERM: {}", describe(&status));
    sub.expect_offline(d, secs(5));
    let mut late = Sub::new(&broker, &status_topic(d));
    let m = late.expect("the retained status", secs(5), |_| true);
    assert!(m.retained && m.json() == Some(offline_of(&online)), "{m:?}");

    agent.restart();
    sub.expect_online(d, secs(15));
    let next = seq(&sub.expect_live_heartbeat(d, secs(10)));
    assert!(next > last, "seq went back after a restart: {last} then {next}");
}

#[test]
fn sigterm_during_a_slow_collection_leaves_no_seq_gap() {
    let broker = Broker::start_default();
    let d = "dev-slowterm";
    let mut sub = Sub::new(&broker, &heartbeat_topic(d));
    // Collections take ~0.8 s, so a SIGTERM soon after a heartbeat lands in the next one.
    let slow =
        json!({"heartbeat": {"custom": {"slow": {"command": ["/bin/sh", "-c", "sleep 0.8; echo 1"]}}}});
    let mut agent = Agent::start(config(&broker, d, slow));
    let last = seq(&sub.expect_live_heartbeat(d, secs(15)));
    sleep(Duration::from_millis(400));
    let status = agent.term();
    assert_eq!(status.code(), Some(0), "SIGTERM: {}", describe(&status));
    agent.restart();
    let next = seq(&sub.expect_live_heartbeat(d, secs(15)));
    assert_eq!(next, last + 1, "the heartbeat cut short by the stop left a gap: {last} then {next}");
}

#[test]
fn reconnects_after_a_broker_outage_and_delivers_every_heartbeat() {
    let mut broker = Broker::start_default();
    let d = "dev-outage";
    let mut sub =
        Sub::builder(&broker, &heartbeat_topic(d)).also(&status_topic(d)).persistent("outage-sub").start();
    let _agent = Agent::start(config(&broker, d, json!({})));
    sub.expect_online(d, secs(15));
    let hb = sub.expect_live_heartbeat(d, secs(10));
    let first = seq(&hb);

    stop_between_heartbeats(&mut broker, &hb);
    let stopped = unix_ms();
    // Longer than three heartbeats.
    sleep(Duration::from_millis(4500));
    let restarted = unix_ms();
    broker.start_again();
    sub.expect_online(d, secs(30));
    wait_fresh_heartbeat(&mut sub, d, restarted + 1500);

    let hbs = live_heartbeats(&sub, d);
    assert_each_once_in_order(&hbs, first);
    let during = made_between(&hbs, stopped, restarted);
    assert!(during >= 3, "only {during} heartbeat(s) made during the outage were delivered");
}

#[test]
fn offline_queue_survives_an_agent_restart() {
    let mut broker = Broker::start_default();
    let d = "dev-queue";
    let mut sub =
        Sub::builder(&broker, &heartbeat_topic(d)).also(&status_topic(d)).persistent("queue-sub").start();
    let mut agent = Agent::start(config(&broker, d, json!({})));
    sub.expect_online(d, secs(15));
    let hb = sub.expect_live_heartbeat(d, secs(10));
    let first = seq(&hb);

    stop_between_heartbeats(&mut broker, &hb);
    let stopped = unix_ms();
    // Restart the agent while the broker is away: what it queued is in state_dir. SIGTERM
    // half-way between heartbeats too (3 after the last one delivered), so that none is being
    // collected when it comes.
    sleep(Duration::from_millis((ts(&hb) + 3500).saturating_sub(unix_ms())));
    agent.term();
    let agent_restarted = unix_ms();
    agent.restart();
    sleep(Duration::from_millis(2500));
    let restarted = unix_ms();
    broker.start_again();
    sub.expect_online(d, secs(30));
    wait_fresh_heartbeat(&mut sub, d, restarted + 1500);

    let hbs = live_heartbeats(&sub, d);
    assert_each_once_in_order(&hbs, first);
    let before = made_between(&hbs, stopped, agent_restarted);
    let after = made_between(&hbs, agent_restarted, restarted);
    assert!(before >= 2, "{before} heartbeat(s) queued before the agent restarted were delivered");
    assert!(after >= 1, "{after} heartbeat(s) queued after the agent restarted were delivered");
}

/// A 5.5 s outage with 1 s heartbeats against an offline bound that holds two of them: at
/// most two from the outage are delivered, in order, and the next heartbeat counts the rest.
fn assert_outage_is_bounded(d: &str, offline_buffer: Value) {
    let mut broker = Broker::start_default();
    let mut sub = Sub::builder(&broker, &heartbeat_topic(d))
        .also(&status_topic(d))
        .persistent(&format!("{d}-sub"))
        .start();
    let _agent = Agent::start(config(&broker, d, json!({ "offline_buffer": offline_buffer })));
    sub.expect_online(d, secs(15));
    let hb = sub.expect_live_heartbeat(d, secs(10));

    stop_between_heartbeats(&mut broker, &hb);
    let stopped = unix_ms();
    sleep(Duration::from_millis(5500));
    let restarted = unix_ms();
    broker.start_again();
    sub.expect_online(d, secs(30));
    wait_fresh_heartbeat(&mut sub, d, restarted + 1500);

    let hbs = live_heartbeats(&sub, d);
    let seqs: Vec<u64> = hbs.iter().map(seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs out of order or repeated: {seqs:?}");
    let during = made_between(&hbs, stopped, restarted);
    assert!(during <= 2, "{during} heartbeats from the outage delivered, the bound holds 2");
    let dropped = hbs.last().unwrap()["dropped"].as_u64().unwrap_or(0);
    assert!(dropped >= 1, "the heartbeat after the outage says dropped = {dropped}");
}

#[test]
fn offline_queue_is_bounded_by_messages_and_counts_what_it_dropped() {
    assert_outage_is_bounded("dev-bounded", json!({"max_messages": 2}));
}

#[test]
fn offline_queue_is_bounded_by_bytes_and_counts_what_it_dropped() {
    // A heartbeat here is 400-500 bytes with its topic: 1000 bytes hold two.
    assert_outage_is_bounded("dev-bounded-bytes", json!({"max_bytes": 1000}));
}

#[test]
fn sighup_reloads_the_config() {
    let broker = Broker::start_default();
    let d = "dev-hup";
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let agent = Agent::start(config(&broker, d, json!({"heartbeat": {"interval_s": 3}})));
    sub.expect_online(d, secs(15));
    sub.expect_live_heartbeat(d, secs(10));
    let pid = agent.pid();

    agent.write_config(config(&broker, d, json!({"heartbeat": {"interval_s": 1}})));
    agent.signal(libc::SIGHUP);
    // Three heartbeats a second apart: impossible at the old 3 s interval.
    sub.expect_live_heartbeat(d, secs(10));
    let a = ts(&sub.expect_live_heartbeat(d, secs(5)));
    let b = ts(&sub.expect_live_heartbeat(d, secs(5)));
    assert!(b - a < 2000, "heartbeats {} ms apart after reloading interval_s 1", b - a);
    assert_eq!(agent.pid(), pid);
    sub.expect_none("the device going offline", Duration::from_millis(200), |m| {
        m.payload.contains("\"online\":false")
    });
}

#[test]
fn sighup_with_a_broken_config_is_refused() {
    let broker = Broker::start_default();
    let d = "dev-badhup";
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let mut agent = Agent::start(config(&broker, d, json!({})));
    sub.expect_online(d, secs(15));
    sub.expect_live_heartbeat(d, secs(10));

    let mut broken = config(&broker, d, json!({"heartbeat": {"interval_s": 7}}));
    broken["bogus_key"] = json!(1);
    agent.write_config(broken);
    agent.signal(libc::SIGHUP);
    let line = agent.wait_log_line(secs(10), |l| l.contains("bogus_key"));
    assert!(line.is_some(), "the agent did not log why it refused the new config (bogus_key)");
    // It goes on with the old config: online, a heartbeat every second.
    let a = ts(&sub.expect_live_heartbeat(d, secs(5)));
    let b = ts(&sub.expect_live_heartbeat(d, secs(5)));
    assert!(b - a < 2000, "heartbeats {} ms apart: the broken config was applied", b - a);
    assert!(agent.running(), "the agent exited on a broken config");
    assert!(
        !sub.seen().iter().any(|m| m.topic == status_topic(d) && m.payload.contains("\"online\":false")),
        "the device went offline"
    );
    // Unparseable JSON: the same.
    agent.write_config_text("{ not json");
    agent.signal(libc::SIGHUP);
    sub.expect_live_heartbeat(d, secs(5));
    sub.expect_live_heartbeat(d, secs(5));
    assert!(agent.running(), "the agent exited on an unparseable config");
}

#[test]
fn a_broker_that_stops_answering_is_declared_dead_within_one_and_a_half_keepalives() {
    let broker = Broker::start_default();
    let d = "dev-frozen";
    let mut sub = Sub::new(&broker, &heartbeat_topic(d));
    let agent = Agent::start(config(&broker, d, json!({"broker": {"keepalive_s": 5}})));
    sub.expect_live_heartbeat(d, secs(15));
    // Frozen, not gone: the kernel keeps the TCP connection up, the broker says nothing.
    signal(broker.pid(), libc::SIGSTOP);
    let frozen = std::time::Instant::now();
    let line = agent.wait_log_line(secs(15), |l| l.contains("did not answer"));
    let after = frozen.elapsed();
    signal(broker.pid(), libc::SIGCONT);
    let line = line.unwrap_or_else(|| panic!("no 'did not answer' in the log:\n{}", agent.log()));
    // 1.5 x 5 s from the last packet heard, which came at most a heartbeat before the freeze.
    assert!(after <= Duration::from_millis(7500 + 1500), "declared dead after {after:?}: {line}");
    assert!(after >= Duration::from_millis(5000), "declared dead too early, after {after:?}: {line}");
    let reconnected = wait_until(secs(15), || agent.log().matches("connected to").count() >= 2);
    assert!(reconnected, "the agent did not reconnect once the broker answered again:\n{}", agent.log());
}

#[test]
fn agents_that_lose_their_broker_together_do_not_reconnect_together() {
    let mut broker = Broker::start_default();
    // Each agent through a relay of its own, which records when it connects. min_s 3: the
    // broker is back long before the first retry, which therefore succeeds.
    let relays: Vec<TcpRelay> = (0..6).map(|_| TcpRelay::start(broker.ports.plain)).collect();
    let mut sub = Sub::new(&broker, "tether/+/status");
    let _agents: Vec<Agent> = relays
        .iter()
        .enumerate()
        .map(|(i, relay)| {
            let url = broker.url_at(Listener::Plain, "127.0.0.1", relay.port);
            let patch = json!({"broker": {"url": url}, "reconnect": {"min_s": 3, "max_s": 6}});
            Agent::start(config(&broker, &format!("dev-herd-{i}"), patch))
        })
        .collect();
    let mut online = std::collections::HashSet::new();
    sub.expect("every agent online", secs(15), |m| {
        m.payload.contains("\"online\":true")
            && online.insert(m.topic.clone())
            && online.len() == relays.len()
    });

    broker.stop();
    let stopped = std::time::Instant::now();
    broker.start_again();
    let reconnected = |r: &TcpRelay| r.accepted().into_iter().find(|&t| t > stopped);
    assert!(
        wait_until(secs(15), || relays.iter().all(|r| reconnected(r).is_some())),
        "not every agent reconnected within 15 s"
    );
    let mut after: Vec<f64> =
        relays.iter().filter_map(reconnected).map(|t| (t - stopped).as_secs_f64()).collect();
    after.sort_by(f64::total_cmp);
    let spread = after[after.len() - 1] - after[0];
    assert!(spread >= 0.1, "all {} agents reconnected within {spread:.3} s: {after:.3?}", after.len());
    assert!(after[0] >= 1.0, "an agent retried {:.3} s after losing the broker (min_s 3)", after[0]);
}

/// New connections of `user` the broker accepted so far.
fn broker_logins(broker: &Broker, user: &str) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!("u'{user}'")))
        .count()
}

/// A password rotated under the same path: SIGHUP with nothing changed keeps the connection, a
/// password file that cannot be read is refused and keeps it too, and once the broker and the
/// device both have the new password, SIGHUP makes the agent log in again with it.
#[test]
fn sighup_reconnects_when_the_password_file_changed_and_only_then() {
    let d = "dev-rotate";
    let broker = Broker::start(BrokerOpts::default().anonymous(false).user(d, "pw-old"));
    let password_file = tempfile::NamedTempFile::new().unwrap();
    let pw = password_file.path();
    write_file(pw, "pw-old\n");
    let mut sub = Sub::new(&broker, &status_topic(d));
    let agent = Agent::start(config(&broker, d, json!({"broker": {"username": d, "password_file": pw}})));
    sub.expect_online(d, secs(15));
    assert_eq!(broker_logins(&broker, d), 1);

    let reloads = |agent: &Agent| agent.log().matches("config reloaded").count();
    agent.signal(libc::SIGHUP);
    assert!(agent.wait_log("config reloaded", secs(10)), "the unchanged config was not reloaded");
    sub.expect_none("a status change after a SIGHUP that changed nothing", secs(2), |_| true);
    assert_eq!(broker_logins(&broker, d), 1, "the agent logged in again though nothing changed");
    assert!(!agent.log_contains("reconnecting"), "the agent reconnected though nothing changed");

    std::fs::remove_file(pw).unwrap();
    agent.signal(libc::SIGHUP);
    let refused =
        agent.wait_log_line(secs(10), |l| l.contains("reload refused") && l.contains("password_file"));
    assert!(refused.is_some(), "a reload with the password file gone was not refused");
    sub.expect_none("a status change after a refused reload", secs(2), |_| true);
    assert_eq!(broker_logins(&broker, d), 1, "the refused reload dropped the connection");
    assert_eq!(reloads(&agent), 1);

    // The broker takes the new password only: it drops the agent, whose old one fails now.
    let passwd = broker.dir().join("passwd");
    let rotated =
        std::process::Command::new("mosquitto_passwd").arg("-b").arg(&passwd).args([d, "pw-new"]).status();
    assert!(rotated.unwrap().success(), "mosquitto_passwd failed");
    signal(broker.pid(), libc::SIGHUP);
    let refused_old = |l: &str| l.contains("bad username or password") || l.contains("not authorised");
    assert!(
        agent.wait_log_line(secs(10), refused_old).is_some(),
        "the broker did not refuse the old password"
    );
    sub.expect_none("the device online with the old password", secs(2), |m| {
        m.payload.contains("\"online\":true")
    });

    write_file(pw, "pw-new\n");
    agent.signal(libc::SIGHUP);
    sub.expect_online(d, secs(5));
    assert_eq!(broker_logins(&broker, d), 2, "not one new login");
    let line = agent.wait_log_line(secs(1), |l| l.contains("reconnecting"));
    assert!(line.is_some_and(|l| l.contains("broker.password_file changed")), "the log does not say why");
    assert_eq!(reloads(&agent), 2);
}

/// A TCP relay to the broker whose agent-to-broker direction the test can hold, as a link that
/// stalls: what the agent sends piles up in its socket, then in its send queue. The relay's
/// side takes little (a small receive buffer), so that queue fills within a heartbeat or two.
struct StallingRelay {
    port: u16,
    held: Arc<AtomicBool>,
}

impl StallingRelay {
    fn start(broker_port: u16) -> StallingRelay {
        let listener = listener_taking_little();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicBool::new(false));
        let relay_held = held.clone();
        std::thread::spawn(move || {
            for agent in listener.incoming().flatten() {
                let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)) else { continue };
                let held = relay_held.clone();
                std::thread::spawn(move || relay_unless_held(agent, broker, &held));
            }
        });
        StallingRelay { port, held }
    }

    fn hold(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }
}

fn relay_unless_held(agent: TcpStream, broker: TcpStream, held: &AtomicBool) {
    let (mut from_broker, mut to_agent) = (broker.try_clone().unwrap(), agent.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_broker, &mut to_agent);
        let _ = to_agent.shutdown(Shutdown::Write);
    });
    let (mut from_agent, mut to_broker) = (agent, broker);
    let mut chunk = [0u8; 4096];
    let wait_while_held = || {
        while held.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(10));
        }
    };
    loop {
        wait_while_held();
        let n = match from_agent.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_while_held();
        if to_broker.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    // A close without DISCONNECT, as the agent's: the broker publishes the will.
    let _ = to_broker.shutdown(Shutdown::Write);
}

/// An agent through a `StallingRelay`, with 1 MB heartbeats: online, then the link held until
/// its send queue is full (past what the kernel takes: little, see NOTSENT_LOWAT), then SIGTERM.
/// Returns once the agent says the offline status waits.
fn stop_on_a_stalled_link(broker: &Broker, d: &str) -> (Agent, StallingRelay, Sub, tempfile::TempDir) {
    let relay = StallingRelay::start(broker.ports.plain);
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("blob");
    write_file(&blob, &"x".repeat(1_000_000));
    let patch = json!({
        "broker": {"url": broker.url_at(Listener::Plain, "127.0.0.1", relay.port)},
        "heartbeat": {"custom": {"blob": {"file": blob, "max_bytes": 1_048_576}}},
        "offline_buffer": {"max_bytes": 64 << 20},
    });
    let mut sub = Sub::new(broker, &status_topic(d));
    let agent = Agent::start(config(broker, d, patch));
    sub.expect_online(d, secs(15));
    relay.hold(true);
    sleep(Duration::from_millis(5500));
    agent.signal(libc::SIGTERM);
    let waits = agent.wait_log("the offline status waits for room", secs(5));
    assert!(waits, "the send queue was not full at SIGTERM: the test proves nothing");
    (agent, relay, sub, dir)
}

/// A link that moves again within the grace: the agent sends its offline status itself, then
/// says goodbye (DISCONNECT).
#[test]
fn sigterm_with_a_full_send_queue_still_publishes_the_offline_status() {
    let broker = Broker::start_default();
    let d = "dev-stall";
    let (mut agent, relay, mut sub, _dir) = stop_on_a_stalled_link(&broker, d);
    relay.hold(false);
    let status = agent.wait_exit(secs(10)).expect("the agent did not stop within 10 s");
    assert_eq!(status.code(), Some(0), "SIGTERM: {}", describe(&status));
    sub.expect_offline(d, secs(5));
    assert!(agent.log_contains("stopped;"), "the agent did not stop cleanly");
    assert!(
        broker.log().contains(&format!("Received DISCONNECT from {d}")),
        "the agent did not say goodbye once the offline status was through"
    );
    let mut late = Sub::new(&broker, &status_topic(d));
    let m = late.expect("the retained status", secs(5), |_| true);
    assert!(m.retained && m.json().is_some_and(|v| v["online"] == false), "{m:?}");
}

/// A link that stays stalled: after the grace the agent closes without DISCONNECT, so the
/// broker publishes the will once it sees the connection gone.
#[test]
fn sigterm_on_a_link_that_stays_stalled_leaves_the_will() {
    let broker = Broker::start_default();
    let d = "dev-stall-will";
    let (mut agent, relay, mut sub, _dir) = stop_on_a_stalled_link(&broker, d);
    let status = agent.wait_exit(secs(5)).expect("the agent did not stop within the grace");
    assert_eq!(status.code(), Some(0), "SIGTERM: {}", describe(&status));
    assert!(agent.log_contains("closing without a goodbye"), "the agent does not say why it left");
    relay.hold(false);
    sub.expect_offline(d, secs(10));
    assert!(
        !broker.log().contains(&format!("Received DISCONNECT from {d}")),
        "a DISCONNECT reached the broker, which then drops the will"
    );
    let mut late = Sub::new(&broker, &status_topic(d));
    let m = late.expect("the retained status", secs(5), |_| true);
    assert!(m.retained && m.json().is_some_and(|v| v["online"] == false), "{m:?}");
}

/// The offline status a device leaves: its online status without `online` and `since`.
fn offline_of(online: &Value) -> Value {
    let mut offline = online.clone();
    offline["online"] = json!(false);
    offline.as_object_mut().map(|fields| fields.remove("since"));
    offline
}

/// A retained `{"online":false}` the device never reads (here its ACL lets it write its status
/// but not read it; on aedes, a late will its duplicate filter withholds) is put right within
/// 12 heartbeat intervals: the agent publishes its online status again now and then.
#[test]
fn a_stale_offline_status_the_device_cannot_read_is_put_right() {
    let d = "dev-blind";
    let acl = format!(
        "user operator\ntopic readwrite tether/#\nuser {d}\ntopic write tether/{d}/status\n\
         topic write tether/{d}/heartbeat\ntopic readwrite tether/{d}/cmd/#\n"
    );
    let broker = Broker::start(BrokerOpts::default().anonymous(false).user(d, "pw").acl(&acl));
    let password = broker.dir().join("device-password");
    write_file(&password, "pw");
    let mut config = broker.agent_config(d);
    merge(&mut config, json!({"broker": {"username": d, "password_file": password}}));
    let mut sub = Sub::new(&broker, &status_topic(d));
    let _agent = Agent::start(config);
    sub.expect_online(d, secs(15));

    publish_json(&broker, &status_topic(d), &json!({"online": false}), true);
    sub.expect_offline(d, secs(5));
    let started = Instant::now();
    sub.expect_online(d, secs(20));
    println!("online again after {:?}", started.elapsed());
}
