//! Remote access through a real Mosquitto over wss + TLS, the real agent and tetherctl
//! (docs/protocol.md, "Tunnels"): exec like `ssh HOST CMD`, a shell on a terminal, TCP
//! forwarding; limits, refusals, and what a broker-side attacker can and cannot do.

mod common;

use common::remote::{text, timed_lines, Setup};
use common::{secs, signal};
use serde_json::json;
use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[test]
fn exec_returns_stdout_stderr_and_the_exit_code_apart() {
    let s = Setup::new("dev-exec", json!({}));
    let out = s.exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], b"");
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));

    let killed = s.exec(&["sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(killed.status.code(), Some(128 + 15), "a signal is 128+n: {}", text(&killed.stderr));

    let missing = s.exec(&["/no/such/program"], b"");
    assert_ne!(missing.status.code(), Some(0));
    assert!(text(&missing.stderr).contains("/no/such/program"), "{}", text(&missing.stderr));
}

#[test]
fn exec_pipes_50_mib_of_stdin_through_sha256sum() {
    let s = Setup::new("dev-pipe", json!({}));
    let mut data = vec![0u8; 50 << 20];
    tether::random::fill(&mut data);
    let started = Instant::now();
    let out = s.exec(&["sha256sum"], &data);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let expected = tether::trust::sha256_hex(&data);
    assert!(text(&out.stdout).starts_with(&expected), "{} vs {expected}", text(&out.stdout));
    eprintln!("50 MiB through exec in {:?}", started.elapsed());
}

/// `tetherctl exec DEVICE -- echo TEXT` with stdin at its end at once and RUST_LOG=debug.
fn start_echo(s: &Setup, text: &str) -> Child {
    let mut command = s.tetherctl(&s.exec_args(&["echo", text]));
    command.env("RUST_LOG", "debug").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command.spawn().unwrap()
}

/// How long the repair of a loss may take: less than the 2 s timers of the tunnels, so that an
/// output late by one of them shows.
const SOON: Duration = Duration::from_millis(1500);

/// A short command's output and end come as soon as the device sends them: tetherctl's last
/// frame (stdin's end) is acknowledged before either side leaves, and tetherctl does not wait
/// out its 2 s for acknowledgements.
#[test]
fn a_short_command_ends_without_waiting_out_a_timer() {
    let s = Setup::new("dev-quick", json!({}));
    let mut tetherctl = start_echo(&s, "quick");
    let log = timed_lines(tetherctl.stderr.take().unwrap());
    let mut stdout = tetherctl.stdout.take().unwrap();
    let mut first = [0; 64];
    let n = stdout.read(&mut first).unwrap();
    let output_came = Instant::now();
    let mut output = first[..n].to_vec();
    stdout.read_to_end(&mut output).unwrap();
    let status = tetherctl.wait().unwrap();
    let ended = Instant::now();
    let log = log.join().unwrap();
    assert_eq!((status.code(), text(&output)), (Some(0), "quick\n".to_string()));
    let opened = log.iter().find(|(_, line)| line.contains("open to dev-quick")).expect("tetherctl logs it");
    let (to_output, to_end) = (output_came - opened.0, ended - output_came);
    assert!(to_output < SOON, "the output came {to_output:?} after the tunnel opened");
    assert!(to_end < SOON, "tetherctl exited {to_end:?} after the output came");
}

/// Frames the device sent before tetherctl had the keys to open them (here all of them:
/// tetherctl is held stopped from its request until the device has ended the tunnel) are asked
/// for again as soon as tetherctl has the keys, not left to the device's resend timer (2 s).
#[test]
fn what_the_device_sent_before_tetherctl_had_the_keys_comes_at_once() {
    let s = Setup::new("dev-early", json!({}));
    let mut broker_log = s.broker.watch_log();
    let mut agent_log = s.agent.watch_log();
    let tetherctl = start_echo(&s, "early");
    assert!(broker_log.wait_for("'tether/dev-early/cmd/exec/", secs(10)), "tetherctl asked");
    signal(tetherctl.id(), libc::SIGSTOP);
    let device_ended = agent_log.wait_for(": ending", secs(10));
    signal(tetherctl.id(), libc::SIGCONT);
    assert!(device_ended, "the device ran the command and ended the tunnel");
    let resumed = Instant::now();
    let out = tetherctl.wait_with_output().unwrap();
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "early\n".to_string()),
        "{}",
        text(&out.stderr)
    );
    assert!(resumed.elapsed() < SOON, "tetherctl took {:?} once resumed", resumed.elapsed());
}
