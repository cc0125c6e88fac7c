//! End-to-end test harness: a real Mosquitto on free loopback ports with certificates made at
//! test time, the real `tether-agent` binary, `mosquitto_sub`/`mosquitto_pub` as the operator,
//! and a tiny HTTP CONNECT proxy. Every test builds its own broker, so tests run in parallel.
//!
//! When a test panics, dropping the `Agent` and the `Broker` prints the tail of their logs.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_tether-agent");
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// The operator account the harness adds whenever the broker has a password file (the name the
/// documented fleet ACL gives operators).
pub const ADMIN_USER: &str = "operator";
pub const ADMIN_PASSWORD: &str = "operator-pw";
/// The fleet ACL documented in docs/protocol.md.
pub const FLEET_ACL: &str = "# operators
user operator
topic readwrite tether/#
# each device: username = its device id
pattern readwrite tether/%u/#
";

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

pub fn unix_s() -> u64 {
    unix_ms() / 1000
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A loopback listener whose connections take little at a time (a 4 KiB receive buffer): what
/// a client sends past it and the relay behind has not carried waits on the client's side.
pub fn listener_taking_little() -> TcpListener {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket and a c_int option value of the given length; accepted sockets
    // inherit the buffer size.
    unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    listener
}

/// Whether something accepts TCP on the port; the source port of a successful probe goes to
/// `probes` (so the broker's log of that connection can be told from a client's).
fn port_open(port: u16, probes: &mut HashSet<u16>) -> bool {
    match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) {
        Ok(s) => {
            if let Ok(a) = s.local_addr() {
                probes.insert(a.port());
            }
            true
        }
        Err(_) => false,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command to completion, panicking with its output when it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn signal(pid: u32, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Stops a server with SIGTERM and waits for it to exit; SIGKILL when it has not within 10 s.
pub fn terminate(mut child: Child) {
    signal(child.id(), libc::SIGTERM);
    if wait_child(&mut child, secs(10)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits for a child to exit, up to `timeout`.
/// Waits for a child whose stdout and stderr are piped, and reads them; kills it and panics
/// after `timeout`.
pub fn wait_child_output(child: &mut Child, timeout: Duration) -> std::process::Output {
    let Some(status) = wait_child(child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("pid {} did not exit within {timeout:?}", child.id());
    };
    let read = |pipe: Option<&mut dyn std::io::Read>| {
        let mut bytes = Vec::new();
        if let Some(pipe) = pipe {
            pipe.read_to_end(&mut bytes).unwrap();
        }
        bytes
    };
    let stdout = read(child.stdout.as_mut().map(|p| p as &mut dyn std::io::Read));
    let stderr = read(child.stderr.as_mut().map(|p| p as &mut dyn std::io::Read));
    std::process::Output { status, stdout, stderr }
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// Runs `openssl` with `args` split at white space.
fn openssl(dir: &Path, args: &str) {
    run(Command::new("openssl").current_dir(dir).args(args.split_whitespace()));
}

const OPENSSL_CNF: &str = "[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[wrongname]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:wrong.example
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
";

const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

/// A self-signed CA, `NAME.key`/`NAME.pem` (`cn` without spaces).
fn make_ca(dir: &Path, name: &str, cn: &str) {
    openssl(
        dir,
        &format!(
            "req -x509 {EC_KEY} -keyout {name}.key -out {name}.pem -days 30 -subj /CN={cn} \
             -config openssl.cnf -extensions ca"
        ),
    );
}

/// A key and a certificate `NAME.key`/`NAME.pem` signed by `ca`, with the extensions of `section`.
fn make_leaf(dir: &Path, ca: &str, name: &str, cn: &str, section: &str) {
    openssl(
        dir,
        &format!("req -new {EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={cn} -config openssl.cnf"),
    );
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -CAserial {ca}.srl \
             -out {name}.pem -days 30 -extfile openssl.cnf -extensions {section}"
        ),
    );
}

/// In `dir`: a test CA (`ca.pem`, `ca.key`), a server certificate it signed for localhost and
/// 127.0.0.1 (`server.pem`, `server.key`), and an unrelated CA (`wrongca.pem`).
pub fn make_test_certs(dir: &Path) {
    fs::write(dir.join("openssl.cnf"), OPENSSL_CNF).unwrap();
    make_ca(dir, "ca", "Tether-Test-CA");
    make_leaf(dir, "ca", "server", "localhost", "server");
    make_ca(dir, "wrongca", "Unrelated-Test-CA");
}

// ---------------------------------------------------------------------------------------------
// Broker

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// mqtt:// (TCP)
    Plain,
    /// mqtts:// (TLS, server cert for localhost and 127.0.0.1)
    Mqtts,
    /// ws:// (websockets)
    Ws,
    /// wss:// (websockets over TLS)
    Wss,
    /// mqtts:// requiring a client certificate signed by the CA; its CN is the username.
    Mtls,
    /// mqtts:// serving a certificate valid only for `wrong.example`.
    WrongName,
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub plain: u16,
    pub mqtts: u16,
    pub ws: u16,
    pub wss: u16,
    pub mtls: u16,
    pub wrongname: u16,
}

impl Ports {
    fn pick() -> Ports {
        Ports {
            plain: free_port(),
            mqtts: free_port(),
            ws: free_port(),
            wss: free_port(),
            mtls: free_port(),
            wrongname: free_port(),
        }
    }
    pub fn all(&self) -> [u16; 6] {
        [self.plain, self.mqtts, self.ws, self.wss, self.mtls, self.wrongname]
    }
    pub fn of(&self, l: Listener) -> u16 {
        match l {
            Listener::Plain => self.plain,
            Listener::Mqtts => self.mqtts,
            Listener::Ws => self.ws,
            Listener::Wss => self.wss,
            Listener::Mtls => self.mtls,
            Listener::WrongName => self.wrongname,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BrokerOpts {
    pub allow_anonymous: bool,
    /// Users of the password file; when any is given, `operator` (the harness's admin) is added.
    pub users: Vec<(String, String)>,
    /// Content of the ACL file.
    pub acl: Option<String>,
    /// Lines for the top of the config, e.g. `max_queued_messages 0`.
    pub settings: Vec<String>,
}

impl Default for BrokerOpts {
    fn default() -> Self {
        BrokerOpts { allow_anonymous: true, users: Vec::new(), acl: None, settings: Vec::new() }
    }
}

impl BrokerOpts {
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }
    pub fn acl(mut self, acl: &str) -> Self {
        self.acl = Some(acl.into());
        self
    }
    pub fn anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }
    pub fn setting(mut self, line: &str) -> Self {
        self.settings.push(line.into());
        self
    }
}

/// A Mosquitto of its own, in a temporary directory, with persistence there (retained messages
/// and persistent sessions survive `stop()` + `start_again()`).
pub struct Broker {
    dir: tempfile::TempDir,
    pub ports: Ports,
    child: Option<Child>,
    admin: Option<(String, String)>,
    /// Source ports of the harness's own readiness probes.
    probes: HashSet<u16>,
}

impl Broker {
    /// A broker accepting anonymous clients.
    pub fn start_default() -> Broker {
        Broker::start(BrokerOpts::default())
    }

    pub fn start(opts: BrokerOpts) -> Broker {
        let dir = tempfile::Builder::new().prefix("tether-broker-").tempdir().unwrap();
        let d = dir.path();
        make_test_certs(d);
        make_leaf(d, "ca", "wrongname", "wrong.example", "wrongname");

        let mut admin = None;
        if !opts.users.is_empty() {
            let pw = d.join("passwd");
            let mut users = opts.users.clone();
            if !users.iter().any(|(u, _)| u == ADMIN_USER) {
                users.push((ADMIN_USER.into(), ADMIN_PASSWORD.into()));
            }
            fs::write(&pw, "").unwrap();
            for (user, password) in &users {
                run(Command::new("mosquitto_passwd").arg("-b").arg(&pw).arg(user).arg(password));
            }
            let (u, p) = users.iter().find(|(u, _)| u == ADMIN_USER).unwrap();
            admin = Some((u.clone(), p.clone()));
        }
        if let Some(acl) = &opts.acl {
            fs::write(d.join("acl"), acl).unwrap();
        }

        let mut broker = Broker { dir, ports: Ports::pick(), child: None, admin, probes: HashSet::new() };
        // A port picked free can be taken by someone else before Mosquitto binds it: retry
        // with new ports.
        for attempt in 1..=4 {
            broker.write_config(&opts);
            match broker.spawn() {
                Ok(()) => return broker,
                Err(e) if attempt < 4 => {
                    eprintln!("broker did not start ({e}); retrying on other ports");
                    broker.ports = Ports::pick();
                }
                Err(e) => panic!("broker did not start: {e}\n{}", tail(&broker.log_path(), 50)),
            }
        }
        unreachable!()
    }

    fn write_config(&self, opts: &BrokerOpts) {
        let d = self.dir.path();
        let p = self.ports;
        let tls = |extra: &str, cert: &str| {
            format!(
                "cafile {ca}\ncertfile {d}/{cert}.pem\nkeyfile {d}/{cert}.key\n{extra}",
                ca = d.join("ca.pem").display(),
                d = d.display()
            )
        };
        let mut conf = String::new();
        if unsafe { libc::geteuid() } == 0 {
            conf += "user root\n";
        }
        conf += &format!(
            "per_listener_settings false\nallow_anonymous {}\n\
             persistence true\npersistence_location {}/\nautosave_interval 1\n\
             log_dest file {}\nlog_type all\nconnection_messages true\nset_tcp_nodelay true\n",
            opts.allow_anonymous,
            d.display(),
            self.log_path().display()
        );
        if !opts.users.is_empty() {
            conf += &format!("password_file {}\n", d.join("passwd").display());
        }
        if opts.acl.is_some() {
            conf += &format!("acl_file {}\n", d.join("acl").display());
        }
        for line in &opts.settings {
            conf += &format!("{line}\n");
        }
        conf += &format!("\nlistener {} 127.0.0.1\n", p.plain);
        conf += &format!("\nlistener {} 127.0.0.1\n{}", p.mqtts, tls("", "server"));
        conf += &format!("\nlistener {} 127.0.0.1\nprotocol websockets\n", p.ws);
        conf += &format!("\nlistener {} 127.0.0.1\nprotocol websockets\n{}", p.wss, tls("", "server"));
        conf += &format!(
            "\nlistener {} 127.0.0.1\n{}",
            p.mtls,
            tls("require_certificate true\nuse_identity_as_username true\n", "server")
        );
        conf += &format!("\nlistener {} 127.0.0.1\n{}", p.wrongname, tls("", "wrongname"));
        fs::write(d.join("mosquitto.conf"), conf).unwrap();
    }

    fn spawn(&mut self) -> Result<(), String> {
        let out = OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot run {MOSQUITTO}: {e}"))?;
        let mut ports = self.ports.all().to_vec();
        let end = Instant::now() + secs(15);
        loop {
            let probes = &mut self.probes;
            ports.retain(|&p| !port_open(p, probes));
            if ports.is_empty() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("mosquitto exited: {status}"));
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return Err("mosquitto's ports did not open within 15 s".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the broker (SIGTERM: it saves its database) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
    }

    /// Starts the broker again: same ports, same directory, same data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again() while the broker runs");
        if let Err(e) = self.spawn() {
            panic!("broker did not start again: {e}\n{}", tail(&self.log_path(), 50));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker not running").id()
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }
    /// Watches the lines the broker logs from now on.
    pub fn watch_log(&self) -> LogWatch {
        use std::io::Seek;
        let mut file = fs::File::open(self.log_path()).unwrap();
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        LogWatch { lines: std::io::BufReader::new(file), line: String::new() }
    }
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    /// A CA that signed none of the broker's certificates.
    pub fn wrong_ca_file(&self) -> PathBuf {
        self.dir.path().join("wrongca.pem")
    }
    /// The admin credentials (`operator`) when the broker has a password file.
    pub fn admin(&self) -> Option<(&str, &str)> {
        self.admin.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// A client certificate and key signed by the broker's CA, with CN = `device_id`.
    pub fn client_cert(&self, device_id: &str) -> (PathBuf, PathBuf) {
        let name = format!("client-{device_id}");
        make_leaf(self.dir.path(), "ca", &name, device_id, "client");
        (self.dir.path().join(format!("{name}.pem")), self.dir.path().join(format!("{name}.key")))
    }

    /// The URL of a listener as the agent takes it; `127.0.0.1` as the host (the server
    /// certificate is valid for it).
    pub fn url(&self, l: Listener) -> String {
        self.url_with_host(l, "127.0.0.1")
    }

    pub fn url_with_host(&self, l: Listener, host: &str) -> String {
        self.url_at(l, host, self.ports.of(l))
    }

    /// The URL for listener `l`'s protocol at another address (e.g. a `TcpRelay` to it).
    pub fn url_at(&self, l: Listener, host: &str, port: u16) -> String {
        match l {
            Listener::Plain => format!("mqtt://{host}:{port}"),
            Listener::Ws => format!("ws://{host}:{port}/mqtt"),
            Listener::Wss => format!("wss://{host}:{port}/mqtt"),
            Listener::Mqtts | Listener::Mtls | Listener::WrongName => format!("mqtts://{host}:{port}"),
        }
    }

    /// A config for an agent on the plain listener, quick to test with: heartbeats every
    /// second, reconnect between 1 and 2 s. Edit it with `merge`.
    pub fn agent_config(&self, device_id: &str) -> Value {
        json!({
            "broker": { "url": self.url(Listener::Plain), "keepalive_s": 10 },
            "device_id": device_id,
            "heartbeat": { "interval_s": 1, "disks": ["/"] },
            "reconnect": { "min_s": 1, "max_s": 2 },
            "reboot_command": ["/bin/false"],
            "trust": { "authorized_keys": operator_authorized_keys(self.dir.path()) },
        })
    }

    /// Unix times (seconds, from Mosquitto's log) of the TCP connections made to `port`, less
    /// the harness's own readiness probes.
    pub fn connection_times(&self, port: u16) -> Vec<u64> {
        let needle = format!(" on port {port}.");
        self.log()
            .lines()
            .filter(|l| l.contains("New connection from") && l.contains(&needle))
            .filter(|l| {
                let from = l.split("New connection from ").nth(1).unwrap_or_default();
                let src = from.split(' ').next().unwrap_or_default().rsplit(':').next().unwrap_or_default();
                !src.parse().is_ok_and(|p: u16| self.probes.contains(&p))
            })
            .filter_map(|l| l.split(':').next()?.trim().parse().ok())
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- broker log (last 120 lines) {} -----\n{}\n----- end of broker log -----",
                self.log_path().display(),
                tail(&self.log_path(), 120)
            );
        }
    }
}

/// Merges `patch` into `base`: objects key by key, anything else replaced (`null` removes a key).
/// New lines of a broker's log, read as they come: fast enough to act in the middle of a burst.
pub struct LogWatch {
    lines: std::io::BufReader<fs::File>,
    line: String,
}

impl LogWatch {
    /// Waits for a line containing `needle`, polling every millisecond.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        use std::io::BufRead;
        let deadline = Instant::now() + timeout;
        loop {
            if self.lines.read_line(&mut self.line).unwrap() == 0 {
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(1));
            } else if self.line.ends_with('\n') {
                if self.line.contains(needle) {
                    self.line.clear();
                    return true;
                }
                self.line.clear();
            }
        }
    }
}

/// Stops process `pid` for `pause` as soon as the broker has its subscription: in the middle of
/// the retained burst, which makes Mosquitto drop messages to it.
pub fn stall_once_subscribed(log: &mut LogWatch, client_id: &str, pid: u32, pause: Duration) {
    let needle = format!("Received SUBSCRIBE from {client_id}");
    assert!(log.wait_for(&needle, secs(10)), "{client_id} never subscribed");
    signal(pid, libc::SIGSTOP);
    thread::sleep(pause);
    signal(pid, libc::SIGCONT);
}

/// The tests' operator: an ed25519 key every agent the harness configures trusts (see
/// `operator_authorized_keys`), so that tests sign requests the way tetherctl does.
pub fn operator_key() -> &'static tether::trust::DeviceKey {
    static KEY: std::sync::OnceLock<tether::trust::DeviceKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let pkcs8 = tether::trust::DeviceKey::generate().expect("an ed25519 key");
        tether::trust::DeviceKey::load(&pkcs8).expect("the key just made")
    })
}

/// An authorized_keys file in `dir` trusting `operator_key()` for every op; its path.
pub fn operator_authorized_keys(dir: &Path) -> PathBuf {
    let path = dir.join("authorized_keys");
    if !path.exists() {
        fs::write(&path, format!("{}\n", operator_key().openssh_public("test-operator"))).unwrap();
    }
    path
}

/// A retained init for `op`/`id` on `device`, signed by `operator_key()` now, as tetherctl
/// sends it.
pub fn signed_init(device: &str, op: &str, id: &str, params: Value) -> Vec<u8> {
    let params = params.as_object().cloned().unwrap_or_default();
    let text = tether::trust::Request::new(device, op, id, unix_s(), params).to_text();
    let sig = operator_key().sign_sshsig(tether::trust::REQUEST_NAMESPACE, text.as_bytes());
    json!({"status": "init", "request": text, "sig": sig}).to_string().into_bytes()
}

pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p,
    }
}

pub fn status_topic(device: &str) -> String {
    format!("tether/{device}/status")
}
pub fn heartbeat_topic(device: &str) -> String {
    format!("tether/{device}/heartbeat")
}
pub fn cmd_topic(device: &str, op: &str, id: &str) -> String {
    format!("tether/{device}/cmd/{op}/{id}")
}

// ---------------------------------------------------------------------------------------------
// mosquitto_pub / mosquitto_sub

/// Publishes with QoS 1 as the broker's admin (or anonymously).
pub fn publish(broker: &Broker, topic: &str, payload: &[u8], retain: bool) {
    publish_as(broker, broker.admin(), topic, payload, retain)
}

/// Publishes with QoS 1 as `creds` (user, password); an empty payload is a null message (with
/// `retain`, it clears the retained message).
pub fn publish_as(broker: &Broker, creds: Option<(&str, &str)>, topic: &str, payload: &[u8], retain: bool) {
    publish_at(broker.ports.plain, creds, topic, payload, retain)
}

/// Publishes with QoS 1 to the broker (or cluster node) listening for plain MQTT on `port`.
pub fn publish_at(port: u16, creds: Option<(&str, &str)>, topic: &str, payload: &[u8], retain: bool) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic]);
    if let Some((u, p)) = creds {
        cmd.args(["-u", u, "-P", p]);
    }
    if retain {
        cmd.arg("-r");
    }
    if payload.is_empty() {
        cmd.arg("-n");
    } else {
        cmd.arg("-s");
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(payload).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub to {topic} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes a JSON value (QoS 1).
pub fn publish_json(broker: &Broker, topic: &str, payload: &Value, retain: bool) {
    publish(broker, topic, payload.to_string().as_bytes(), retain)
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: String,
    /// Delivered from the broker's retained store (MQTT 3.1.1: a message forwarded live has
    /// the flag clear even when it was published retained).
    pub retained: bool,
    /// When the harness received it.
    pub at: Instant,
}

impl Msg {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.payload).ok()
    }
    fn short(&self) -> String {
        let mut p = self.payload.clone();
        if p.len() > 300 {
            let mut cut = 300;
            while !p.is_char_boundary(cut) {
                cut -= 1;
            }
            p = format!("{}… ({} bytes)", &p[..cut], self.payload.len());
        }
        format!("{}{} {}", if self.retained { "[retained] " } else { "" }, self.topic, p)
    }
}

pub mod builds;
pub mod cluster;
pub mod files;
pub mod http;
pub mod pty;
pub mod raw;
pub mod remote;
pub mod ssh;

const PROBE_MARK: &str = "/_harness/probe/";

/// A `mosquitto_sub` (QoS 1) whose messages the test reads. `new` returns once the
/// subscription is active (a probe message published after subscribing came back).
pub struct Sub {
    child: Child,
    rx: Receiver<Msg>,
    /// Everything received so far, for error messages.
    seen: Vec<Msg>,
    filter: String,
    stderr: Arc<Mutex<String>>,
}

pub struct SubBuilder {
    /// The broker's (or cluster node's) plain MQTT port.
    port: u16,
    filters: Vec<String>,
    creds: Option<(String, String)>,
    probe_root: String,
    client_id: Option<String>,
}

impl SubBuilder {
    /// Subscribe (and probe) with these credentials instead of the broker's admin ones.
    pub fn user(mut self, user: &str, password: &str) -> Self {
        self.creds = Some((user.into(), password.into()));
        self
    }
    /// Where the probe goes (`ROOT/_harness/probe/N`): somewhere these credentials may use.
    pub fn probe_root(mut self, root: &str) -> Self {
        self.probe_root = root.into();
        self
    }
    /// Another topic filter.
    pub fn also(mut self, filter: &str) -> Self {
        self.filters.push(filter.into());
        self
    }
    /// A persistent session (clean session off) with this client id: the broker keeps the
    /// subscription and queues QoS 1 messages while the client is away, across broker restarts.
    /// mosquitto_sub reconnects by itself after the broker comes back.
    pub fn persistent(mut self, client_id: &str) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    pub fn start(self) -> Sub {
        let probe = format!("{}{}{}", self.probe_root, PROBE_MARK, unique());
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"]);
        cmd.args(["-F", "%r %t %x"]);
        for f in &self.filters {
            cmd.args(["-t", f]);
        }
        cmd.args(["-t", &probe]);
        if let Some((u, p)) = &self.creds {
            cmd.args(["-u", u, "-P", p]);
        }
        if let Some(id) = &self.client_id {
            cmd.args(["-c", "-i", id]);
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let probe_seen = Arc::new(AtomicBool::new(false));
        let probe_flag = probe_seen.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(3, ' ');
                let retained = parts.next() == Some("1");
                let topic = parts.next().unwrap_or_default().to_string();
                let payload = hex_decode(parts.next().unwrap_or_default());
                if topic.contains(PROBE_MARK) {
                    probe_flag.store(true, Ordering::SeqCst);
                    continue;
                }
                let msg = Msg { topic, payload, retained, at: Instant::now() };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let err_buf = stderr.clone();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            err_buf.lock().unwrap().push_str(&s);
        });

        let creds = self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        let mut sub = Sub { child, rx, seen: Vec::new(), filter: self.filters.join(" "), stderr };
        let end = Instant::now() + secs(15);
        while !probe_seen.load(Ordering::SeqCst) {
            if let Some(status) = sub.child.try_wait().unwrap() {
                panic!("mosquitto_sub {} exited: {status}: {}", sub.filter, sub.stderr.lock().unwrap());
            }
            assert!(Instant::now() < end, "mosquitto_sub {}: subscription not active after 15 s", sub.filter);
            publish_at(self.port, creds, &probe, b"probe", false);
            wait_until(Duration::from_millis(300), || probe_seen.load(Ordering::SeqCst));
        }
        sub
    }
}

fn hex_decode(s: &str) -> String {
    let bytes: Vec<u8> =
        (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Sub {
    /// Subscribes to `filter` as the broker's admin (or anonymously).
    pub fn new(broker: &Broker, filter: &str) -> Sub {
        Sub::builder(broker, filter).start()
    }

    pub fn builder(broker: &Broker, filter: &str) -> SubBuilder {
        let mut builder = Sub::builder_at(broker.ports.plain, filter);
        builder.creds = broker.admin().map(|(u, p)| (u.to_string(), p.to_string()));
        builder
    }

    /// Anonymous, on the broker or cluster node whose plain MQTT port is `port`.
    pub fn builder_at(port: u16, filter: &str) -> SubBuilder {
        SubBuilder {
            port,
            filters: vec![filter.into()],
            creds: None,
            probe_root: "tether".into(),
            client_id: None,
        }
    }

    fn next(&mut self, deadline: Instant) -> Option<Msg> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(m) => {
                self.seen.push(m.clone());
                Some(m)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                panic!("mosquitto_sub {} is gone ({status:?}); {}", self.filter, self.history())
            }
        }
    }

    fn history(&self) -> String {
        let n = self.seen.len();
        let shown: Vec<String> =
            self.seen[n.saturating_sub(40)..].iter().map(|m| format!("  {}", m.short())).collect();
        format!(
            "{n} message(s) seen on {} (last 40):\n{}\nmosquitto_sub stderr: {}",
            self.filter,
            shown.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// The next message satisfying `pred`, skipping the others; panics after `timeout`.
    pub fn expect(&mut self, what: &str, timeout: Duration, mut pred: impl FnMut(&Msg) -> bool) -> Msg {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline) {
                Some(m) if pred(&m) => return m,
                Some(_) => {}
                None if Instant::now() >= deadline => {
                    panic!("timed out after {timeout:?} waiting for {what}; {}", self.history())
                }
                None => {}
            }
        }
    }

    /// A message satisfying `pred` among those received so far (matched or skipped by earlier
    /// waits), or else the next one to arrive: for things that come in no particular order.
    pub fn expect_any_time(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Msg) -> bool,
    ) -> Msg {
        match self.seen.iter().find(|m| pred(m)) {
            Some(m) => m.clone(),
            None => self.expect(what, timeout, pred),
        }
    }

    /// The next message on `topic` whose payload is JSON satisfying `pred`.
    pub fn expect_json(
        &mut self,
        topic: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let m = self.expect(&format!("{what} on {topic}"), timeout, |m| {
            m.topic == topic && m.json().is_some_and(|v| pred(&v))
        });
        m.json().unwrap()
    }

    /// Panics if a message satisfying `pred` arrives within `during`.
    pub fn expect_none(&mut self, what: &str, during: Duration, mut pred: impl FnMut(&Msg) -> bool) {
        let deadline = Instant::now() + during;
        while let Some(m) = self.next(deadline) {
            assert!(!pred(&m), "unexpected {what}: {}; {}", m.short(), self.history());
        }
    }

    /// Everything that arrives within `during`.
    pub fn collect(&mut self, during: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + during;
        let mut out = Vec::new();
        while let Some(m) = self.next(deadline) {
            out.push(m);
        }
        out
    }

    /// Waits for `{"online":true}` on the device's status topic.
    pub fn expect_online(&mut self, device: &str, timeout: Duration) -> Value {
        self.expect_json(&status_topic(device), "{\"online\":true}", timeout, |v| v["online"] == json!(true))
    }

    pub fn expect_offline(&mut self, device: &str, timeout: Duration) -> Value {
        self.expect_json(&status_topic(device), "{\"online\":false}", timeout, |v| {
            v["online"] == json!(false)
        })
    }

    /// The next heartbeat forwarded live (not a retained copy from the broker's store).
    pub fn expect_live_heartbeat(&mut self, device: &str, timeout: Duration) -> Value {
        let topic = heartbeat_topic(device);
        let m = self.expect(&format!("a live heartbeat on {topic}"), timeout, |m| {
            m.topic == topic && !m.retained && m.json().is_some()
        });
        m.json().unwrap()
    }

    /// Takes in every message until none came for `quiet`; then `seen` has them all.
    pub fn drain(&mut self, quiet: Duration) {
        while self.next(Instant::now() + quiet).is_some() {}
    }

    /// Messages received so far (for assertions over history).
    pub fn seen(&self) -> &[Msg] {
        &self.seen
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Agent

/// The real `tether-agent`, run with `--config` in a temporary directory of its own
/// (`state_dir` defaults to `DIR/state`), RUST_LOG=debug, output appended to `DIR/agent.log`.
pub struct Agent {
    dir: tempfile::TempDir,
    /// The binary it runs: `AGENT_BIN`, or a copy of it or another build.
    bin: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    exit: Option<ExitStatus>,
}

impl Agent {
    pub fn start(config: Value) -> Agent {
        Agent::start_with_env(config, &[])
    }

    /// Starts it with extra environment variables (e.g. `TETHER_BOOT_ID_FILE`).
    pub fn start_with_env(config: Value, env: &[(&str, &str)]) -> Agent {
        Agent::start_bin(config, env, Path::new(AGENT_BIN))
    }

    /// Starts `bin` (another build, or a copy that an update may replace).
    pub fn start_bin(config: Value, env: &[(&str, &str)], bin: &Path) -> Agent {
        let dir = tempfile::Builder::new().prefix("tether-agent-").tempdir().unwrap();
        let mut agent = Agent {
            dir,
            bin: bin.to_path_buf(),
            child: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            exit: None,
        };
        agent.write_config(config);
        agent.spawn();
        agent
    }

    /// Writes the config file (adding `state_dir` when it has none); takes effect on restart or
    /// SIGHUP.
    pub fn write_config(&self, mut config: Value) {
        if config.get("state_dir").is_none() {
            config["state_dir"] = json!(self.state_dir());
        }
        fs::write(self.config_path(), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }

    /// Writes raw text as the config file.
    pub fn write_config_text(&self, text: &str) {
        fs::write(self.config_path(), text).unwrap();
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.exit = None;
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.json")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }
    /// Watches the lines the broker logs from now on.
    pub fn watch_log(&self) -> LogWatch {
        use std::io::Seek;
        let mut file = fs::File::open(self.log_path()).unwrap();
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        LogWatch { lines: std::io::BufReader::new(file), line: String::new() }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log().contains(needle)
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_contains(needle))
    }

    /// Waits until some line of the log satisfies `pred` (given the line in lower case);
    /// returns that line.
    pub fn wait_log_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.log().lines().map(str::to_lowercase).find(|l| pred(l));
            found.is_some()
        });
        found
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent not running").id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait().unwrap() {
                None => true,
                Some(status) => {
                    self.exit = Some(status);
                    false
                }
            },
        }
    }

    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig)
    }

    /// SIGKILL to the agent alone (not its process group) and waits for it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent not running");
        signal(child.id(), libc::SIGKILL);
        self.exit = Some(child.wait().unwrap());
    }

    /// SIGTERM, then waits (up to 15 s) for the exit status.
    pub fn term(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        signal(child.id(), libc::SIGTERM);
        let status = wait_child(&mut child, secs(15));
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit within 15 s of SIGTERM");
        };
        self.exit = Some(status);
        status
    }

    /// Waits for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_child(child, timeout)?;
        self.child = None;
        self.exit = Some(status);
        Some(status)
    }

    /// Starts it again with the same config, state and environment (stopping it first with
    /// SIGTERM if it still runs).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.term();
        }
        let mut log = OpenOptions::new().append(true).open(self.log_path()).unwrap();
        writeln!(log, "===== test harness: restarting the agent =====").unwrap();
        self.spawn();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // What it started (custom commands may run in process groups of their own).
            let started = descendants(child.id());
            let _ = child.kill();
            let _ = child.wait();
            for pid in started {
                signal(pid, libc::SIGKILL);
            }
        }
        if thread::panicking() {
            eprintln!(
                "----- agent log (last 150 lines) {} -----\n{}\n----- end of agent log -----",
                self.log_path().display(),
                tail(&self.log_path(), 150)
            );
        }
    }
}

/// Runs the agent binary with `args` to completion (e.g. `--version`), with a 30 s limit.
pub fn run_agent(args: &[&str]) -> Output {
    let child = Command::new(AGENT_BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let args_text = format!("{args:?}");
    thread::spawn(move || {
        if !wait_until(secs(30), || flag.load(Ordering::SeqCst)) {
            eprintln!("tether-agent {args_text} still running after 30 s: killing it");
            signal(pid, libc::SIGKILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    out
}

/// stdout + stderr of an `Output`, as text.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A signal's or exit code's description, for messages.
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The parent pid of a process, from /proc/PID/stat.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // PID (COMM) STATE PPID ...: COMM may hold spaces and parentheses; it ends at the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Every live process, by pid.
fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The live (not zombie) children of `pid`, not theirs.
pub fn children(pid: u32) -> Vec<u32> {
    let live = |p: u32| {
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
    };
    all_pids().into_iter().filter(|&p| parent_pid(p) == Some(pid) && live(p)).collect()
}

/// The children, grandchildren... of `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids().into_iter().filter_map(|p| Some((p, parent_pid(p)?))).collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

/// A process's command line, arguments split.
pub fn cmdline(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sockets of a process

/// The listening sockets a process owns: TCP/TCP6 in LISTEN, unconnected bound UDP/UDP6,
/// listening unix sockets. Matched through the socket inodes of `/proc/PID/fd`.
pub fn listening_sockets(pid: u32) -> Vec<String> {
    let mut inodes = HashSet::new();
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in entries.flatten() {
            if let Ok(target) = fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    for (file, listen_state) in [("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == listen_state && inodes.contains(f[9]) {
                found.push(format!("{file}: {line}"));
            }
        }
    }
    let text = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 = __SO_ACCEPTCON.
        if f.len() > 6
            && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x10000 != 0)
            && inodes.contains(f[6])
        {
            found.push(format!("unix: {line}"));
        }
    }
    found
}

/// How many socket inodes a process has open (to make sure `listening_sockets` looked at a
/// process that has sockets at all).
pub fn socket_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")))
                .count()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// HTTP CONNECT proxy

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Tunnels to the requested target.
    Tunnel,
    /// Answers `403 Forbidden`.
    Refuse,
}

pub struct HttpProxy {
    pub port: u16,
    targets: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl HttpProxy {
    pub fn start(mode: Mode) -> HttpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (targets.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let t = t.clone();
                thread::spawn(move || {
                    let _ = proxy_conn(conn, mode, &t);
                });
            }
        });
        HttpProxy { port, targets, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The CONNECT targets (`host:port`) requested so far.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn proxy_conn(mut client: TcpStream, mode: Mode, targets: &Mutex<Vec<String>>) -> std::io::Result<()> {
    client.set_read_timeout(Some(secs(10)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default().to_string());
    if method != "CONNECT" {
        client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    }
    targets.lock().unwrap().push(target.clone());
    if mode == Mode::Refuse {
        client.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    }
    let upstream = match TcpStream::connect(&target) {
        Ok(s) => s,
        Err(_) => {
            client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
    };
    client.set_read_timeout(None)?;
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    relay(client, upstream)
}

/// A TCP relay on a loopback port to a port of the broker, recording when each connection was
/// accepted: counts a client's connection attempts, whatever the broker logs about them.
pub struct TcpRelay {
    pub port: u16,
    accepted: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl TcpRelay {
    pub fn start(target_port: u16) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                a.lock().unwrap().push(Instant::now());
                thread::spawn(move || {
                    if let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)) {
                        let _ = relay(client, upstream);
                    }
                });
            }
        });
        TcpRelay { port, accepted, stop }
    }

    /// When each connection was accepted.
    pub fn accepted(&self) -> Vec<Instant> {
        self.accepted.lock().unwrap().clone()
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies both ways until both sides are done.
fn relay(a: TcpStream, b: TcpStream) -> std::io::Result<()> {
    let (mut a2, mut b2) = (a.try_clone()?, b.try_clone()?);
    let (mut a1, mut b1) = (a, b);
    let up = thread::spawn(move || {
        let _ = std::io::copy(&mut a1, &mut b1);
        let _ = b1.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut b2, &mut a2);
    let _ = a2.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Small file helpers

pub fn write_file(path: &Path, text: &str) {
    let mut f = File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

pub fn read_to_string(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// A process's CPU time so far, user and system (utime + stime), in clock ticks (10 ms).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A process's resident memory (VmRSS, kB); 0 once it is gone.
pub fn vm_rss_kb(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
