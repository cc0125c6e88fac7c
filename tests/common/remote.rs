//! A device online with remote access behind a real Mosquitto over wss + TLS (certificates made
//! now), an operator key made by ssh-keygen that the device trusts, and tetherctl set up to
//! reach it: what the remote access and remote terminal tests share.

use super::ssh::{keygen, public_line};
use super::*;

/// A device online with remote access, and what tetherctl needs to reach it.
pub struct Setup {
    pub broker: Broker,
    /// Kept running; tests read its pid to find the processes it started.
    pub agent: Agent,
    pub device: String,
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub listener: Listener,
}

impl Setup {
    /// Over wss, with `remote_access` as the device's config section.
    pub fn new(device: &str, remote_access: Value) -> Setup {
        Setup::new_on(device, remote_access, Listener::Wss)
    }

    pub fn new_on(device: &str, remote_access: Value, listener: Listener) -> Setup {
        Setup::with_sections(device, json!({ "remote_access": remote_access }), listener)
    }

    /// Over `listener`, with `sections` merged into the device's config.
    pub fn with_sections(device: &str, sections: Value, listener: Listener) -> Setup {
        Setup::with_sections_env(device, sections, listener, &[])
    }

    /// `with_sections`, the agent started with `env` added to its environment.
    pub fn with_sections_env(
        device: &str,
        sections: Value,
        listener: Listener,
        env: &[(&str, &str)],
    ) -> Setup {
        Setup::with_agent_bin(device, sections, listener, env, Path::new(AGENT_BIN))
    }

    /// `with_sections_env`, the agent running `bin`.
    pub fn with_agent_bin(
        device: &str,
        sections: Value,
        listener: Listener,
        env: &[(&str, &str)],
        bin: &Path,
    ) -> Setup {
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
            }),
        );
        merge(&mut config, sections);
        let mut sub = Sub::new(&broker, &status_topic(device));
        let agent = Agent::start_bin(config, env, bin);
        sub.expect_online(device, secs(15));
        Setup { broker, agent, device: device.to_string(), dir, key, listener }
    }

    /// tetherctl with the connection and identity set, and nothing from the test's environment
    /// that could change them.
    pub fn tetherctl(&self, args: &[&str]) -> Command {
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

    /// `tetherctl exec DEVICE -- ARGV` with `stdin` as its input, to its end.
    pub fn exec(&self, argv: &[&str], stdin: &[u8]) -> Output {
        run_with_input(self.tetherctl(&self.exec_args(argv)), stdin)
    }

    /// `tetherctl exec DEVICE -- ARGV` running, its stdin, stdout and stderr piped.
    pub fn spawn_exec(&self, argv: &[&str]) -> std::process::Child {
        let mut exec = self.tetherctl(&self.exec_args(argv));
        exec.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// The arguments of `tetherctl exec DEVICE -- ARGV`.
    pub fn exec_args<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["exec", &self.device, "--"];
        args.extend_from_slice(argv);
        args
    }
}

/// The pid a remote command wrote to `file` (`echo $$ > FILE`), once it has.
pub fn remote_pid(file: &Path) -> u32 {
    let mut pid = None;
    let started = wait_until(secs(20), || {
        pid = fs::read_to_string(file).ok().and_then(|t| t.trim().parse().ok());
        pid.is_some()
    });
    assert!(started, "the remote command never started");
    pid.unwrap()
}

pub fn run_with_input(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// tetherctl's log: what it logs on stderr, each line with the time it came.
pub fn timed_lines(stderr: impl Read + Send + 'static) -> thread::JoinHandle<Vec<(Instant, String)>> {
    thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).map(|line| (Instant::now(), line)).collect()
    })
}
