//! Remote access through a real Mosquitto over wss + TLS, the real agent and tetherctl
//! (docs/protocol.md, "Tunnels"): exec like `ssh HOST CMD`, a shell on a terminal, TCP
//! forwarding; limits, refusals, and what a broker-side attacker can and cannot do.

mod common;

use common::ssh::{keygen, public_line};
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// A device online with remote access, and what tetherctl needs to reach it over wss.
struct Setup {
    broker: Broker,
    #[allow(dead_code)] // kept running; the fault tests signal it
    agent: Agent,
    device: String,
    dir: tempfile::TempDir,
    key: PathBuf,
    listener: Listener,
}

impl Setup {
    fn new(device: &str, remote_access: Value) -> Setup {
        Setup::new_on(device, remote_access, Listener::Wss)
    }

    fn new_on(device: &str, remote_access: Value, listener: Listener) -> Setup {
        let broker = Broker::start_default();
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "operator", &["-t", "ed25519"]);
        let authorized = dir.path().join("authorized_keys");
        write_file(&authorized, &public_line(&key));
        let mut config = broker.agent_config(device);
        merge(
            &mut config,
            json!({
                "broker": {"url": broker.url(listener), "ca_file": broker.ca_file()},
                "trust": {"authorized_keys": authorized},
                "remote_access": remote_access,
            }),
        );
        let mut sub = Sub::new(&broker, &status_topic(device));
        let agent = Agent::start(config);
        sub.expect_online(device, secs(15));
        Setup { broker, agent, device: device.to_string(), dir, key, listener }
    }

    /// tetherctl with the connection and identity set; stdin from `stdin`.
    fn tetherctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tetherctl"));
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TETHER_") || k == "RUST_LOG") {
            cmd.env_remove(key);
        }
        cmd.env_remove("SSH_AUTH_SOCK")
            .env("TETHER_BROKER", self.broker.url(self.listener))
            .env("TETHER_CA", self.broker.ca_file())
            .env("TETHER_IDENTITY", &self.key)
            .env("TETHER_KNOWN_DEVICES", self.dir.path().join("known_devices"))
            .args(args);
        cmd
    }

    fn exec(&self, argv: &[&str], stdin: &[u8]) -> Output {
        let mut args = vec!["exec", &self.device, "--"];
        args.extend_from_slice(argv);
        run_with_input(self.tetherctl(&args), stdin)
    }
}

fn run_with_input(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

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
    let expected = sha256_hex(&data);
    assert!(text(&out.stdout).starts_with(&expected), "{} vs {expected}", text(&out.stdout));
    eprintln!("50 MiB through exec in {:?}", started.elapsed());
}
