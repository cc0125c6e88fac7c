//! A real nginx (Debian's `nginx-light`, tests/setup-deps) on free loopback ports, plain HTTP and
//! HTTPS with certificates made at test time, serving the files of a directory of its own:
//! `/NAME` as it is (Range requests answered with 206), `/slow/NAME` at 256 KiB/s, and
//! `/norange/NAME` ignoring Range (`max_ranges 0`: always the whole file, 200). Its access log
//! tells what each request asked for and got.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{free_port, make_test_certs, secs, tail, terminate};

pub const NGINX: &str = "/usr/sbin/nginx";
/// How fast `/slow/` serves (nginx sends the first second's worth at once).
pub const SLOW_BYTES_PER_S: u64 = 256 * 1024;

/// One line of the access log.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub status: u16,
    pub bytes: u64,
    /// The Range header, "" when none.
    pub range: String,
    pub uri: String,
}

pub struct Nginx {
    dir: tempfile::TempDir,
    pub http_port: u16,
    pub https_port: u16,
    child: Option<Child>,
}

impl Nginx {
    pub fn start() -> Nginx {
        let dir = tempfile::Builder::new().prefix("tether-nginx-").tempdir().unwrap();
        let d = dir.path();
        make_test_certs(d);
        fs::create_dir_all(d.join("www")).unwrap();
        fs::create_dir_all(d.join("tmp")).unwrap();
        let (http_port, https_port) = (free_port(), free_port());
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format tether '$status $body_bytes_sent \"$http_range\" $request_uri';
    access_log {d}/access.log tether;
    client_body_temp_path {d}/tmp;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.key;
        root {d}/www;
        location /slow/ {{ alias {d}/www/; limit_rate {rate}; }}
        location /norange/ {{ alias {d}/www/; max_ranges 0; }}
    }}
}}
",
            d = d.display(),
            http = http_port,
            https = https_port,
            rate = SLOW_BYTES_PER_S,
        );
        fs::write(d.join("nginx.conf"), conf).unwrap();
        let mut nginx = Nginx { http_port, https_port, dir, child: None };
        nginx.start_again();
        nginx
    }

    /// Starts it again after `stop`: same ports, same files.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again() while nginx runs");
        let d = self.dir.path();
        let log = OpenOptions::new().create(true).append(true).open(d.join("stderr.log")).unwrap();
        let mut child = Command::new(NGINX)
            .arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {NGINX} (tests/setup-deps installs nginx-light): {e}"));
        let end = Instant::now() + secs(15);
        while [self.http_port, self.https_port]
            .iter()
            .any(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_err())
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nginx exited: {status}\n{}", self.logs());
            }
            assert!(Instant::now() < end, "nginx's ports did not open within 15 s\n{}", self.logs());
            thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Fast shutdown (SIGTERM): the transfers under way are cut.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
    }

    /// Serves `bytes` as `/NAME` (and `/slow/NAME`, `/norange/NAME`).
    pub fn put(&self, name: &str, bytes: &[u8]) {
        fs::write(self.file(name), bytes).unwrap();
    }

    /// Where `/NAME` is served from, to write a big file piece by piece.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("www").join(name)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.http_port)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}", self.https_port)
    }

    /// The CA that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing nginx serves.
    pub fn wrong_ca_file(&self) -> PathBuf {
        self.dir.path().join("wrongca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The requests served so far, in order (a request is logged when it ends).
    pub fn served(&self) -> Vec<Served> {
        let text = fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let (status, rest) = line.split_once(' ').unwrap();
                let (bytes, rest) = rest.split_once(' ').unwrap();
                let (range, uri) = rest.strip_prefix('"').unwrap().split_once("\" ").unwrap();
                let range = if range == "-" { "" } else { range };
                Served {
                    status: status.parse().unwrap(),
                    bytes: bytes.parse().unwrap(),
                    range: range.into(),
                    uri: uri.into(),
                }
            })
            .collect()
    }

    fn logs(&self) -> String {
        let d = self.dir.path();
        format!("{}\n{}", tail(&d.join("stderr.log"), 20), tail(&d.join("error.log"), 20))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- nginx logs\n{}", self.logs());
        }
        self.stop();
    }
}
