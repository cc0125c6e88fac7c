//! Port forwarding end to end (docs/protocol.md, "Tunnels"): `tetherctl forward` through a real
//! Mosquitto over wss + TLS to the real agent, which connects to servers on its side. What a
//! user of `ssh -L` expects: concurrent and large downloads, refusals that say why, half-closed
//! connections, a device that never listens, and Ctrl-C that cleans up on both sides.

mod common;

use common::remote::Setup;
use common::*;
use serde_json::json;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// `LPORT:HOST:HPORT`, as tetherctl forward takes it.
fn spec(local_port: u16, target: &str) -> String {
    format!("{local_port}:{target}")
}

/// `tetherctl forward` running in the background, its stderr collected; killed when dropped.
struct Forward {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Forward {
    /// Starts `tetherctl forward DEVICE SPECS...` and returns once it said "forwarding" for each
    /// and listens on each local port (seen in /proc: a probe connection would be forwarded).
    fn start(setup: &Setup, specs: &[String]) -> Forward {
        let mut args = vec!["forward", setup.device.as_str()];
        args.extend(specs.iter().map(String::as_str));
        let mut child = setup
            .tetherctl(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let collected = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                collected.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let mut forward = Forward { child, stderr };
        let ports: Vec<u16> = specs.iter().map(|s| s.split(':').next().unwrap().parse().unwrap()).collect();
        let ready = wait_until(secs(40), || {
            let said = forward.stderr().matches("tetherctl: forwarding ").count() == specs.len();
            (said && ports.iter().all(|port| listens_on(forward.pid(), *port))) || !forward.running()
        });
        assert!(ready && forward.running(), "tetherctl forward did not start:\n{}", forward.stderr());
        forward
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Ctrl-C, then its exit status.
    fn interrupt(&mut self, timeout: Duration) -> ExitStatus {
        signal(self.pid(), libc::SIGINT);
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("tetherctl forward still runs {timeout:?} after SIGINT"))
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("----- tetherctl forward's stderr -----\n{}-----", self.stderr());
        }
    }
}

/// Whether process `pid` has a TCP socket listening on `port`.
fn listens_on(pid: u32, port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    listening_sockets(pid).iter().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "tcp: sl local_address rem_address st ..."
        fields.first().is_some_and(|f| f.starts_with("tcp"))
            && fields.get(2).is_some_and(|a| a.ends_with(&suffix))
    })
}

/// Runs a command to its end, killing it after `timeout`.
fn run_to_end(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    thread::spawn(move || {
        if !wait_until(timeout, || flag.load(Ordering::SeqCst)) {
            signal(pid, libc::SIGKILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `python3 -m http.server` serving files of a temporary directory on 127.0.0.1.
struct HttpServer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl HttpServer {
    fn start() -> HttpServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut server = HttpServer { child, dir, port };
        let up = wait_until(secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() || server.child.try_wait().unwrap().is_some()
        });
        assert!(up && server.child.try_wait().unwrap().is_none(), "python3 -m http.server did not start");
        server
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` of `http://127.0.0.1:PORT/PATH` (no proxy), the body to stdout or to `into`.
fn curl(port: u16, path: &str, into: Option<&Path>) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "120"]);
    if let Some(file) = into {
        cmd.arg("-o").arg(file);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/{path}"));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// A TCP server on the device's side, a thread per connection running `serve`; counts the
/// connections it accepted and those it is done with.
struct TargetServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
}

impl TargetServer {
    fn start(serve: fn(TcpStream)) -> TargetServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepted_count, done_count) = (accepted.clone(), done.clone());
        thread::spawn(move || {
            for connection in listener.incoming().map_while(Result::ok) {
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let done_count = done_count.clone();
                thread::spawn(move || {
                    serve(connection);
                    done_count.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        TargetServer { port, accepted, done }
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }
}

/// Reads the whole request (to the client's end of file), then answers it reversed.
fn reverse(mut connection: TcpStream) {
    let mut request = Vec::new();
    if connection.read_to_end(&mut request).is_ok() {
        request.reverse();
        let _ = connection.write_all(&request);
    }
}

/// Keeps the connection until the other side closes it (end of file or reset).
fn hold(mut connection: TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(connection.read(&mut buf), Ok(n) if n > 0) {}
}

/// A listener whose accept queue is full (backlog 0, one connection waiting in it): the SYN of
/// a further connect is dropped until `accept` makes room, and retried about 1 s later.
fn listener_with_a_full_queue() -> (TcpListener, TcpStream) {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen() again on a listening socket of ours only changes its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let queued = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    (listener, queued)
}

/// Whether some socket of `pid`'s network namespace is connecting (SYN_SENT) to 127.0.0.1:PORT.
fn connecting_to(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"02")
    })
}

fn sha256_of_file(path: &Path) -> String {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    tether::agent::files::sha256_prefix(&file, len).unwrap()
}

/// Writes `size` random bytes to `path`.
fn write_random_file(path: &Path, size: usize) {
    let mut file = File::create(path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size / chunk.len() {
        tether::random::fill(&mut chunk);
        file.write_all(&chunk).unwrap();
    }
}

#[test]
fn twenty_concurrent_curls_through_a_forward_all_get_the_file() {
    let s = Setup::new("dev-fwd-many", json!({}));
    let site = HttpServer::start();
    let content: String = (0..1000).map(|i| format!("line {i} of the small file\n")).collect();
    write_file(&site.path("small.txt"), &content);
    let local = free_port();
    let _forward = Forward::start(&s, &[spec(local, &site.target())]);

    let curls: Vec<Child> = (0..20).map(|_| curl(local, "small.txt", None).spawn().unwrap()).collect();
    for (i, child) in curls.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "curl {i}: {}: {}", out.status, text(&out.stderr));
        assert!(out.stdout == content.as_bytes(), "curl {i} got {} bytes, not the file", out.stdout.len());
    }
}

#[test]
fn a_large_download_through_a_forward_arrives_intact() {
    // What the issue asks; the debug build moves 25 to 50 MB/s here, so 5 to 10 s of it.
    const SIZE: usize = 256 << 20;
    let s = Setup::new("dev-fwd-large", json!({}));
    let site = HttpServer::start();
    write_random_file(&site.path("large.bin"), SIZE);
    let expected = sha256_of_file(&site.path("large.bin"));
    let local = free_port();
    let _forward = Forward::start(&s, &[spec(local, &site.target())]);

    let received = s.dir.path().join("large.bin");
    let started = Instant::now();
    let out = curl(local, "large.bin", Some(&received)).output().unwrap();
    let elapsed = started.elapsed();
    assert!(out.status.success(), "curl: {}: {}", out.status, text(&out.stderr));
    assert_eq!(std::fs::metadata(&received).unwrap().len(), SIZE as u64);
    assert_eq!(sha256_of_file(&received), expected);
    let rate = SIZE as f64 / 1e6 / elapsed.as_secs_f64();
    eprintln!("{} MiB through the forward in {elapsed:?}: {rate:.1} MB/s", SIZE >> 20);
}

#[test]
fn a_refused_connection_is_closed_with_the_reason_and_the_forward_goes_on() {
    let refused = "127.0.0.1:1";
    let probe = TcpStream::connect(refused).map(|_| ()).map_err(|e| e.kind());
    assert_eq!(probe, Err(std::io::ErrorKind::ConnectionRefused), "the test needs {refused} refused here");
    let s = Setup::new("dev-fwd-refused", json!({}));
    let site = HttpServer::start();
    write_file(&site.path("index.txt"), "still here\n");
    let (to_refused, to_site) = (free_port(), free_port());
    let forward = Forward::start(&s, &[spec(to_refused, refused), spec(to_site, &site.target())]);

    let refusals = || {
        let says_why =
            |l: &&str| l.contains(&format!(" to {refused} on ")) && l.contains("Connection refused");
        forward.stderr().lines().filter(says_why).count()
    };

    let out = curl(to_refused, "index.txt", None).output().unwrap();
    assert_closed_by_the_forward(&out);
    let said = wait_until(secs(10), || refusals() == 1);
    assert!(said, "no line naming {refused} and the reason:\n{}", forward.stderr());

    let out = curl(to_site, "index.txt", None).output().unwrap();
    assert!(out.status.success(), "curl: {}: {}", out.status, text(&out.stderr));
    assert_eq!(text(&out.stdout), "still here\n");
    let again = curl(to_refused, "index.txt", None).output().unwrap();
    assert_closed_by_the_forward(&again);
    assert!(wait_until(secs(10), || refusals() == 2), "{}", forward.stderr());
}

/// curl saw its connection closed with nothing received: before its connect was even confirmed
/// (7: the reset came that fast), before, while or after the request went (55, 56, 52).
fn assert_closed_by_the_forward(out: &Output) {
    assert!(
        matches!(out.status.code(), Some(7 | 52 | 55 | 56)),
        "curl: {}: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn a_target_outside_the_allow_list_is_refused_at_open() {
    let s = Setup::new("dev-fwd-outside", json!({}));
    let local = free_port();
    let out = run_to_end(s.tetherctl(&["forward", &s.device, &spec(local, "10.1.2.3:80")]), secs(40));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("10.1.2.3:80") && stderr.contains("remote_access.forward.allow"), "{stderr}");
    assert!(!stderr.contains("tetherctl: forwarding "), "{stderr}");
}

#[test]
fn an_allow_list_with_one_port_refuses_the_next_one() {
    let s = Setup::new("dev-fwd-one-port", json!({"forward": {"allow": ["127.0.0.1:8080"]}}));
    let out =
        run_to_end(s.tetherctl(&["forward", &s.device, &spec(free_port(), "127.0.0.1:8081")]), secs(40));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1:8081") && stderr.contains("remote_access.forward.allow"), "{stderr}");

    // The port allowed opens.
    let mut allowed = Forward::start(&s, &[spec(free_port(), "127.0.0.1:8080")]);
    assert!(allowed.stderr().contains("to 127.0.0.1:8080 on dev-fwd-one-port"), "{}", allowed.stderr());
    assert_eq!(allowed.interrupt(secs(15)).code(), Some(0));
}

#[test]
fn a_client_that_half_closes_still_gets_the_whole_answer() {
    let s = Setup::new("dev-fwd-half", json!({}));
    let server = TargetServer::start(reverse);
    let local = free_port();
    let forward = Forward::start(&s, &[spec(local, &server.target())]);

    // More than a window (256 KiB) each way.
    let request: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut client = TcpStream::connect(("127.0.0.1", local)).unwrap();
    client.set_read_timeout(Some(secs(30))).unwrap();
    client.write_all(&request).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).expect("the whole answer within 30 s");
    let mut expected = request.clone();
    expected.reverse();
    assert_eq!(answer.len(), expected.len());
    assert!(answer == expected, "the answer is not the request reversed");
    assert!(!forward.stderr().contains("connection 1"), "{}", forward.stderr());
}

#[test]
fn the_device_connects_out_and_never_listens() {
    let s = Setup::new("dev-fwd-nolisten", json!({}));
    let server = TargetServer::start(hold);
    let local = free_port();
    let forward = Forward::start(&s, &[spec(local, &server.target())]);

    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", local)).unwrap()).collect();
    assert!(wait_until(secs(20), || server.accepted() == 3), "accepted {} of 3", server.accepted());
    let agent_listens = listening_sockets(s.agent.pid());
    assert!(agent_listens.is_empty(), "the agent listens:\n{}", agent_listens.join("\n"));
    // The same look at tetherctl finds its listener: the check sees listeners where they are.
    assert!(listens_on(forward.pid(), local), "{:?}", listening_sockets(forward.pid()));
    assert_eq!(server.done(), 0, "a connection through the forward ended early");
    drop(clients);
}

#[test]
fn ctrl_c_ends_the_forward_and_the_device_closes_its_connections() {
    let s = Setup::new("dev-fwd-ctrl-c", json!({}));
    let server = TargetServer::start(hold);
    let local = free_port();
    let mut forward = Forward::start(&s, &[spec(local, &server.target())]);
    let mut client = TcpStream::connect(("127.0.0.1", local)).unwrap();
    client.write_all(b"hello").unwrap();
    assert!(wait_until(secs(20), || server.accepted() == 1), "the device did not connect");
    assert_eq!(server.done(), 0);

    assert_eq!(forward.interrupt(secs(20)).code(), Some(0), "{}", forward.stderr());
    assert!(wait_until(secs(20), || server.done() == 1), "the device kept its connection open");
    client.set_read_timeout(Some(secs(10))).unwrap();
    let mut rest = Vec::new();
    let read = client.read_to_end(&mut rest);
    assert!(read.is_err() || rest.is_empty(), "the client's connection still gave {read:?}");
    assert!(s.agent.wait_log("closed by the operator", secs(10)), "the agent did not end the tunnel");
}

#[test]
fn what_a_client_sends_while_the_device_still_connects_reaches_the_server() {
    let s = Setup::new("dev-fwd-early", json!({}));
    let (listener, queued) = listener_with_a_full_queue();
    let port = listener.local_addr().unwrap().port();
    let local = free_port();
    let forward = Forward::start(&s, &[spec(local, &format!("127.0.0.1:{port}"))]);

    let mut client = TcpStream::connect(("127.0.0.1", local)).unwrap();
    client.write_all(b"sent before the device connected").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let waiting = wait_until(secs(20), || connecting_to(s.agent.pid(), port));
    assert!(waiting, "the device's connection was not held back:\n{}", forward.stderr());
    // Room in the queue: the device's SYN goes through when retried, about 1 s from the first,
    // long after the request and its end of file reached the device.
    drop(listener.accept().unwrap());
    drop(queued);
    thread::spawn(move || reverse(listener.accept().unwrap().0));
    client.set_read_timeout(Some(secs(20))).unwrap();
    let mut answer = Vec::new();
    let read = client.read_to_end(&mut answer);
    assert!(read.is_ok(), "no whole answer within 20 s ({read:?}); got {:?}", text(&answer));
    assert_eq!(text(&answer), "detcennoc ecived eht erofeb tnes");
}

/// A forward whose connections are over costs nothing: neither the agent nor tetherctl spins
/// on the closed sockets while the forward stays open.
#[test]
fn a_finished_connection_leaves_both_sides_idle() {
    let s = Setup::new("dev-fwd-idle", json!({}));
    let site = HttpServer::start();
    write_file(&site.path("small.txt"), "hello\n");
    let local = free_port();
    let forward = Forward::start(&s, &[spec(local, &site.target())]);
    for _ in 0..3 {
        let out = curl(local, "small.txt", None).output().unwrap();
        assert_eq!(text(&out.stdout), "hello\n", "{}", text(&out.stderr));
    }
    thread::sleep(secs(1));
    let (agent, ctl) = (s.agent.pid(), forward.pid());
    let before = (cpu_ticks(agent), cpu_ticks(ctl));
    thread::sleep(secs(3));
    let used = (cpu_ticks(agent) - before.0, cpu_ticks(ctl) - before.1);
    assert!(
        used.0 <= 5 && used.1 <= 5,
        "CPU ticks in 3 s after the connections ended: agent {}, tetherctl {}",
        used.0,
        used.1
    );
}
