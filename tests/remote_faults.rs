//! Tunnels under attack and failure, through a real Mosquitto over wss + TLS: frames forged or
//! replayed by someone with broker credentials change nothing; the operator vanishing, the
//! agent stopping and the broker restarting each end (or keep) a session the way
//! docs/protocol.md says; sessions leave nothing behind.

mod common;

use common::remote::{remote_pid, Setup};
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// tetherctl's output once it exited; what it and the agent said when it did not.
fn finish(mut child: Child, within: Duration, agent: &Agent) -> Output {
    if wait_until(within, || child.try_wait().unwrap().is_some()) {
        return child.wait_with_output().unwrap();
    }
    signal(child.id(), libc::SIGKILL);
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "STDOUT {}\nSTDERR {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("AGENT {}", agent.log());
    panic!("tetherctl did not exit");
}

/// One line of a running tetherctl's stdout.
fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

/// The tunnel id, from the agent's log line "tunnel ID: exec ... opened".
fn tunnel_id(agent: &Agent) -> String {
    let line = agent
        .wait_log_line(secs(15), |l| l.contains("tunnel ") && l.contains(" opened"))
        .expect("a tunnel opened");
    line.split("tunnel ").nth(1).and_then(|rest| rest.split(':').next()).unwrap().to_string()
}

/// Someone with broker credentials can neither inject a keystroke nor replay one: forged and
/// replayed frames are dropped (logged), and the session goes on untouched.
#[test]
fn forged_and_replayed_frames_change_nothing() {
    let s = Setup::new("dev-forge", json!({}));
    let mut ctl = s.spawn_exec(&["cat"]);
    let mut stdin = ctl.stdin.take().unwrap();
    let mut stdout = BufReader::new(ctl.stdout.take().unwrap());
    let id = tunnel_id(&s.agent);
    let to_device = format!("tether/{}/s/{id}/o", s.device);

    // The next frame the operator sends, captured in hex.
    let mut capture = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &s.broker.ports.of(Listener::Plain).to_string(), "-t", &to_device])
        .args(["-C", "1", "-F", "%x"])
        .args(
            s.broker
                .admin()
                .map(|(u, p)| vec!["-u".to_string(), u.to_string(), "-P".into(), p.to_string()])
                .unwrap_or_default(),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500)); // subscribed
    stdin.write_all(b"first\n").unwrap();
    assert_eq!(read_line(&mut stdout), "first\n");
    let mut hex = String::new();
    capture.stdout.take().unwrap().read_to_string(&mut hex).unwrap();
    let _ = capture.wait();
    let captured: Vec<u8> = (0..hex.trim().len() / 2)
        .map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(captured.len() > 9, "captured {hex:?}");

    let mut forged = captured.clone();
    forged[1..9].copy_from_slice(&99u64.to_be_bytes());
    publish(&s.broker, &to_device, &forged, false);
    publish(&s.broker, &to_device, b"\x00garbage that is no frame at all", false);
    publish(&s.broker, &to_device, &captured, false);
    assert!(
        s.agent.wait_log(&format!("tunnel {id}: dropped a frame that is not from its operator"), secs(10)),
        "{}",
        s.agent.log()
    );
    stdin.write_all(b"second\n").unwrap();
    assert_eq!(read_line(&mut stdout), "second\n", "the replayed \"first\" was not typed again");
    drop(stdin);
    let out = finish(ctl, secs(20), &s.agent);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// An operator killed mid-transfer: its will tells the device, which ends the session and its
/// process after the grace.
#[test]
fn an_operator_killed_mid_transfer_leaves_nothing_running_on_the_device() {
    let s = Setup::new("dev-vanish", json!({}));
    let pid_file = s.dir.path().join("remote.pid");
    let script = format!("echo $$ > {}; exec cat > /dev/null", pid_file.display());
    let mut ctl = s.spawn_exec(&["sh", "-c", &script]);
    let mut stdin = ctl.stdin.take().unwrap();
    let remote = remote_pid(&pid_file);
    let feeder = std::thread::spawn(move || {
        let block = vec![7u8; 64 * 1024];
        while stdin.write_all(&block).is_ok() {}
    });
    std::thread::sleep(Duration::from_millis(500));
    signal(ctl.id(), libc::SIGKILL);
    let _ = ctl.wait();
    feeder.join().unwrap();
    assert!(s.agent.wait_log("the operator's connection dropped", secs(10)), "{}", s.agent.log());
    assert!(wait_until(secs(30), || gone(remote)), "the remote process outlived its operator");
    assert!(s.agent.log_contains("did not come back"), "{}", s.agent.log());
}

/// The agent stopping ends its sessions: the operator is told why, the processes go.
#[test]
fn an_agent_stopping_ends_its_sessions_and_their_processes() {
    let mut s = Setup::new("dev-stop", json!({}));
    let pid_file = s.dir.path().join("remote.pid");
    let script = format!("echo $$ > {}; exec sleep 100", pid_file.display());
    let ctl = s.spawn_exec(&["sh", "-c", &script]);
    let remote = remote_pid(&pid_file);
    s.agent.term();
    let out = finish(ctl, secs(20), &s.agent);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("the agent is stopping"), "{stderr}");
    assert!(wait_until(secs(10), || gone(remote)), "the remote process outlived the agent");
}

/// A broker restart in the middle of a session loses nothing: both sides resend what was not
/// acknowledged once they are back.
#[test]
fn a_session_survives_a_broker_restart_without_losing_a_byte() {
    let mut s = Setup::new("dev-restart", json!({}));
    let ctl = s.spawn_exec(&["sh", "-c", "for i in $(seq 1 40); do echo line $i; sleep 0.1; done"]);
    std::thread::sleep(Duration::from_millis(1200));
    s.broker.stop();
    std::thread::sleep(Duration::from_millis(1500));
    s.broker.start_again();
    let out = finish(ctl, secs(30), &s.agent);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout, expected, "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// 100 sessions opened and closed: the agent's descriptors are back to where they were, and
/// its memory too (within what one session's buffers take).
#[test]
fn a_hundred_sessions_leave_no_descriptor_or_memory_behind() {
    let s = Setup::new("dev-hundred", json!({"max_sessions": 8}));
    let pid = s.agent.pid();
    // Four at a time (remote_access.max_sessions_per_key).
    let run = |n: usize| {
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..n / 4 {
                        let mut exec = s.tetherctl(&["exec", &s.device, "--", "sh", "-c", "echo hi"]);
                        let out = exec.stdin(Stdio::null()).output().unwrap();
                        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
                        assert_eq!(out.stdout, b"hi\n");
                    }
                });
            }
        });
    };
    run(8);
    let settled =
        || wait_until(secs(10), || !s.agent.log().lines().last().unwrap_or_default().contains("ending"));
    settled();
    std::thread::sleep(Duration::from_secs(6)); // every tunnel past its linger
    let (fds, rss) = (open_fds(pid), vm_rss_kb(pid));
    run(100);
    std::thread::sleep(Duration::from_secs(6));
    let (fds_after, rss_after) = (open_fds(pid), vm_rss_kb(pid));
    eprintln!("fds {fds} -> {fds_after}, VmRSS {rss} -> {rss_after} kB");
    assert_eq!(fds_after, fds, "descriptors leaked");
    assert!(rss_after <= rss + 512, "VmRSS grew from {rss} to {rss_after} kB over 100 sessions");
}

/// A device that no longer knows a session (here: its agent was killed and started again)
/// says so when the operator's tetherctl probes after 20 s of silence: tetherctl exits with
/// the reason instead of waiting forever. The killed agent's process died with it.
#[test]
fn an_operator_whose_device_forgot_the_session_is_told_and_exits() {
    let mut s = Setup::new("dev-forgot", json!({}));
    let pid_file = s.dir.path().join("remote.pid");
    let ctl = s.spawn_exec(&["sh", "-c", &format!("echo $$ > {}; exec sleep 100", pid_file.display())]);
    let remote = remote_pid(&pid_file);
    s.agent.kill9();
    assert!(wait_until(secs(10), || gone(remote)), "the remote process outlived the agent's kill -9");
    s.agent.restart();
    let out = finish(ctl, secs(45), &s.agent);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("does not know this session"), "{stderr}");
}
