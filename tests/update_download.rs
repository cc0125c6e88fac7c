//! The downloader of software updates (src/agent/update/download.rs) against a real nginx on
//! loopback (tests/common/http.rs: HTTPS with a CA made here, Range answered natively), and a
//! few misbehaving servers written here for what nginx never does (too many bytes, a body cut
//! at a chosen byte, a stall). Every download runs on a thread with the agent's worker stack.

mod common;

use common::http::{Nginx, Served, SLOW_BYTES_PER_S};
use common::{secs, wait_until, HttpProxy, Mode};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tether::agent::update::download::{Cancel, Download, DownloadError, Failure, Progress};

/// The agent runs blocking work on threads with this stack (src/worker.rs).
const WORKER_STACK: usize = 256 * 1024;
const MIB: usize = 1024 * 1024;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    tether::random::fill(&mut data);
    data
}

/// A download of `data` (its size and sha256) from `url` to `dest`.
fn download(url: &str, data: &[u8], dest: &Path) -> Download {
    Download {
        url: url.into(),
        sha256: tether::trust::sha256_hex(data),
        size: data.len() as u64,
        dest: dest.into(),
        ca_file: None,
        proxy: None,
    }
}

/// nginx serving `len` random bytes as `/fw.bin`, a temp dir, and the download of those bytes
/// from `path` (`fw.bin`, `slow/fw.bin`...) over http to `DIR/fw.bin`.
fn serving(len: usize, path: &str) -> (Nginx, Vec<u8>, tempfile::TempDir, Download) {
    let nginx = Nginx::start();
    let data = random_bytes(len);
    nginx.put("fw.bin", &data);
    let dir = tempfile::tempdir().unwrap();
    let d = download(&nginx.url(path), &data, &dir.path().join("fw.bin"));
    (nginx, data, dir, d)
}

struct Outcome {
    result: Result<PathBuf, DownloadError>,
    reports: Vec<(Instant, Progress)>,
}

impl Outcome {
    fn failure(self) -> Failure {
        match self.result {
            Ok(path) => panic!("downloaded to {}", path.display()),
            Err(e) => {
                // Every failure reads as a sentence naming the download.
                assert!(e.to_string().starts_with("download of http"), "{e}");
                e.failure
            }
        }
    }

    fn ok(self) -> PathBuf {
        self.result.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Starts `download` on a thread sized like the agent's workers.
fn start(download: &Download, cancel: &Cancel) -> JoinHandle<Outcome> {
    let (download, cancel) = (download.clone(), cancel.clone());
    thread::Builder::new()
        .stack_size(WORKER_STACK)
        .spawn(move || {
            let mut reports = Vec::new();
            let result = download.run(&cancel, |p| reports.push((Instant::now(), p)));
            Outcome { result, reports }
        })
        .unwrap()
}

fn run(download: &Download) -> Outcome {
    start(download, &Cancel::new()).join().unwrap()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The names in `dir` (hidden partial files included).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn served(status: u16, bytes: usize, range: &str, uri: &str) -> Served {
    Served { status, bytes: bytes as u64, range: range.into(), uri: uri.into() }
}

/// An HTTP server on a free loopback port that reads each request's head and lets `answer`
/// write whatever it likes; the connection is closed when `answer` returns.
fn misbehaving(answer: impl Fn(&mut TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(answer);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let (Ok(mut conn), answer) = (conn, answer.clone()) else { continue };
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                answer(&mut conn);
            });
        }
    });
    port
}

#[test]
fn https_download_with_the_test_ca_is_verified_and_kept() {
    let (nginx, data, dir, mut d) = serving(3 * MIB + 17, "fw.bin");
    let downloads = dir.path().join("downloads");
    d.url = nginx.https_url("fw.bin");
    d.dest = downloads.join("fw.bin");
    d.ca_file = Some(nginx.ca_file());

    let out = run(&d);
    assert_eq!(out.reports.first().map(|r| r.1), Some(Progress { done: 0, total: data.len() as u64 }));
    assert_eq!(out.ok(), d.dest);
    assert!(fs::read(&d.dest).unwrap() == data, "the file differs");
    assert_eq!(names(&downloads), ["fw.bin"], "no partial file is left");
    assert_eq!(fs::metadata(&downloads).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(fs::metadata(&d.dest).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(nginx.served(), [served(200, data.len(), "", "/fw.bin")]);

    // Already there (an agent restarted after the download): checked, not fetched again.
    assert_eq!(run(&d).ok(), d.dest);
    assert_eq!(nginx.served().len(), 1);
}

#[test]
fn tls_verification_fails_without_the_servers_ca() {
    let (nginx, _, dir, mut d) = serving(1000, "fw.bin");
    d.url = nginx.https_url("fw.bin");
    for ca_file in [None, Some(nginx.wrong_ca_file())] {
        d.ca_file = ca_file.clone();
        let failure = run(&d).failure();
        let Failure::Tls(why) = &failure else { panic!("{ca_file:?}: {failure:?}") };
        // The system store has no test CA; a store without any CA says to set the key too.
        assert!(
            why.contains("signed by an unknown CA (UnknownIssuer): check updates.ca_file")
                || why.contains("no trusted CA certificates in the system store; set updates.ca_file"),
            "{why}"
        );
        assert!(!failure.retryable());
    }
    d.ca_file = Some(dir.path().join("missing.pem"));
    let failure = run(&d).failure();
    assert!(matches!(&failure, Failure::Tls(why) if why.starts_with("updates.ca_file: ")), "{failure:?}");
    assert_eq!(names(dir.path()), Vec::<String>::new(), "an attempt that got nothing leaves nothing");
    assert!(nginx.served().iter().all(|s| s.status != 200));
}

#[test]
fn through_an_http_connect_proxy_for_https_and_http() {
    let (nginx, data, dir, _) = serving(100_000, "fw.bin");
    let proxy = HttpProxy::start(Mode::Tunnel);
    for (i, url) in [nginx.https_url("fw.bin"), nginx.url("fw.bin")].iter().enumerate() {
        let mut d = download(url, &data, &dir.path().join(format!("fw{i}.bin")));
        d.ca_file = Some(nginx.ca_file());
        d.proxy = Some(proxy.url());
        run(&d).ok();
        assert!(fs::read(&d.dest).unwrap() == data);
    }
    let expected = [format!("127.0.0.1:{}", nginx.https_port), format!("127.0.0.1:{}", nginx.http_port)];
    assert_eq!(proxy.targets(), expected);

    let refusing = HttpProxy::start(Mode::Refuse);
    let mut d = download(&nginx.url("fw.bin"), &data, &dir.path().join("refused.bin"));
    d.proxy = Some(refusing.url());
    let failure = run(&d).failure();
    assert!(
        matches!(&failure, Failure::Unreachable(why) if why.contains("proxy") && why.contains("403")),
        "{failure:?}"
    );
    assert!(failure.retryable());
}

#[test]
fn a_cut_transfer_keeps_its_bytes_and_resumes_with_range() {
    let (mut nginx, data, _dir, d) = serving(2 * MIB, "slow/fw.bin");
    let running = start(&d, &Cancel::new());
    // Three seconds in (nginx sends the first second's worth at once): three progress reports at least.
    let cut_at = 4 * SLOW_BYTES_PER_S;
    assert!(wait_until(secs(20), || file_len(&d.partial_path()) >= cut_at), "the download did not start");
    nginx.stop();
    let out = running.join().unwrap();

    // Progress: from 0, growing, at most once a second.
    let reports = &out.reports;
    assert!(reports.len() >= 3, "{reports:?}");
    assert_eq!(reports[0].1, Progress { done: 0, total: data.len() as u64 });
    for pair in reports.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(990), "reports closer than 1 s: {reports:?}");
        assert!(pair[1].1.done >= pair[0].1.done);
    }
    let failure = out.failure();
    let Failure::Truncated { done, size, .. } = failure.clone() else { panic!("{failure:?}") };
    assert!(failure.retryable());
    assert!(failure.to_string().contains("they are kept, the next attempt resumes from there"), "{failure}");
    assert!(done >= cut_at && done < size, "{failure:?}");
    let done = done as usize;
    assert!(fs::read(d.partial_path()).unwrap() == data[..done], "the partial file is not the file's start");

    // The server back: only the rest is asked for, and the whole is verified.
    nginx.start_again();
    let rest = Download { url: nginx.url("fw.bin"), ..d.clone() };
    run(&rest).ok();
    assert!(fs::read(&d.dest).unwrap() == data);
    assert_eq!(
        nginx.served().last(),
        Some(&served(206, data.len() - done, &format!("bytes={done}-"), "/fw.bin"))
    );
    assert!(!d.partial_path().exists());
}

#[test]
fn a_partial_file_from_before_a_restart_is_resumed_or_dropped_by_its_hash() {
    let (nginx, data, dir, d) = serving(MIB, "fw.bin");

    // The right bytes: the rest is fetched and the hash continues over them.
    fs::write(d.partial_path(), &data[..300_000]).unwrap();
    run(&d).ok();
    assert!(fs::read(&d.dest).unwrap() == data);
    assert_eq!(nginx.served(), [served(206, data.len() - 300_000, "bytes=300000-", "/fw.bin")]);

    // Wrong bytes (another file, a torn write): the hash of the whole says so, and the partial
    // file is removed so that the next attempt starts clean.
    fs::remove_file(&d.dest).unwrap();
    fs::write(d.partial_path(), random_bytes(300_000)).unwrap();
    let failure = run(&d).failure();
    assert!(
        matches!(&failure, Failure::HashMismatch { expected, .. } if *expected == d.sha256),
        "{failure:?}"
    );
    assert!(failure.to_string().contains("the partial download was removed"), "{failure}");
    assert_eq!(names(dir.path()), Vec::<String>::new());
    run(&d).ok();
    assert!(fs::read(&d.dest).unwrap() == data);
    assert_eq!(nginx.served().last(), Some(&served(200, data.len(), "", "/fw.bin")));

    // A server whose file is not the one the update names.
    let sha256 = tether::trust::sha256_hex(b"another file");
    let other = Download { sha256, dest: dir.path().join("other.bin"), ..d.clone() };
    assert!(matches!(run(&other).failure(), Failure::HashMismatch { .. }));
    assert!(!other.dest.exists() && !other.partial_path().exists());
}

#[test]
fn a_server_that_ignores_range_is_read_from_byte_zero() {
    let (nginx, data, _dir, d) = serving(MIB, "norange/fw.bin");
    fs::write(d.partial_path(), &data[..500_000]).unwrap();
    run(&d).ok();
    assert!(fs::read(&d.dest).unwrap() == data);
    assert_eq!(nginx.served(), [served(200, data.len(), "bytes=500000-", "/norange/fw.bin")]);
}

#[test]
fn http_errors_are_named_and_leave_nothing() {
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let d = download(&nginx.url("missing.bin"), b"x", &dir.path().join("fw.bin"));
    let e = run(&d).result.unwrap_err();
    assert_eq!(e.failure, Failure::NotFound { status: 404 });
    assert_eq!(
        e.to_string(),
        format!(
            "download of http://127.0.0.1:{}/missing.bin: not found on the server (HTTP 404)",
            nginx.http_port
        )
    );
    // A directory without an index: 403.
    let d = download(&nginx.url(""), b"x", &dir.path().join("fw.bin"));
    let failure = run(&d).failure();
    assert_eq!(failure.to_string(), "the server answered HTTP 403 Forbidden");
    assert!(!failure.retryable());
    // Nothing listens there.
    let d = download(&format!("http://127.0.0.1:{}/fw.bin", common::free_port()), b"x", &d.dest);
    let failure = run(&d).failure();
    assert_eq!(failure, Failure::Unreachable("connection refused".into()));
    assert_eq!(names(dir.path()), Vec::<String>::new());
}

#[test]
fn sizes_that_differ_and_too_many_bytes_are_refused() {
    let (_nginx, data, dir, mut d) = serving(200_000, "fw.bin");

    // Content-Length says so before a byte is written.
    d.size = data.len() as u64 - 1;
    assert_eq!(run(&d).failure(), Failure::SizeMismatch { expected: d.size, server: data.len() as u64 });
    // And Content-Range when resuming: the partial file goes.
    d.size = data.len() as u64 + 5;
    fs::write(d.partial_path(), &data[..100]).unwrap();
    assert_eq!(run(&d).failure(), Failure::SizeMismatch { expected: d.size, server: data.len() as u64 });
    assert_eq!(names(dir.path()), Vec::<String>::new());

    // No length announced, and more bytes than the update says.
    let len = data.len();
    let body = data.clone();
    let port = misbehaving(move |s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let _ = s.write_all(&body);
        let _ = s.write_all(b"0123456789");
    });
    let d = download(&format!("http://127.0.0.1:{port}/fw.bin"), &data, &dir.path().join("fw.bin"));
    assert_eq!(run(&d).failure(), Failure::TooLong { size: len as u64 });
    assert_eq!(names(dir.path()), Vec::<String>::new());

    // The length announced, the connection closed halfway: the half is kept.
    let body = data.clone();
    let port = misbehaving(move |s| {
        let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes());
        let _ = s.write_all(&body[..len / 2]);
    });
    let d = download(&format!("http://127.0.0.1:{port}/fw.bin"), &data, &dir.path().join("fw.bin"));
    let failure = run(&d).failure();
    assert!(matches!(&failure, Failure::Truncated { done, .. } if *done == len as u64 / 2), "{failure:?}");
    assert!(fs::read(d.partial_path()).unwrap() == data[..len / 2]);
}

#[test]
fn cancel_stops_a_stalled_download_at_once_and_a_second_one_is_refused() {
    let port = misbehaving(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n");
        let _ = s.write_all(&[7u8; 1000]);
        // Then nothing, for longer than the test waits.
        thread::sleep(secs(30));
    });
    let dir = tempfile::tempdir().unwrap();
    let mut d =
        download(&format!("http://127.0.0.1:{port}/fw.bin"), &[0u8; 10000], &dir.path().join("fw.bin"));
    d.size = 10000;
    let cancel = Cancel::new();
    let running = start(&d, &cancel);
    assert!(wait_until(secs(10), || file_len(&d.partial_path()) == 1000), "the first bytes did not come");
    // A second download of the same file meanwhile is refused, the first one untouched.
    let second = run(&d).failure();
    assert_eq!(
        second,
        Failure::File { path: d.partial_path(), cause: "another download of this file is under way".into() }
    );
    assert_eq!(file_len(&d.partial_path()), 1000);
    thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    cancel.cancel();
    let out = running.join().unwrap();
    assert!(asked.elapsed() < Duration::from_millis(500), "took {:?} to stop", asked.elapsed());
    assert_eq!(out.failure(), Failure::Cancelled { done: 1000, size: 10000 });
    assert_eq!(file_len(&d.partial_path()), 1000);
    d.discard().unwrap();
    assert_eq!(names(dir.path()), Vec::<String>::new());
}

/// A small tmpfs mounted for the test (the machine's root does it); unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) {
        let mut filler = fs::File::create(self.path().join("filler")).unwrap();
        while filler.write_all(&[0u8; 4096]).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_is_named_before_and_while_writing() {
    let disk = match Tmpfs::mount("1m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_is_named_before_and_while_writing: cannot mount a tmpfs ({why}); run the tests as root");
            return;
        }
    };
    let nginx = Nginx::start();
    let big = random_bytes(2 * MIB);
    nginx.put("big.bin", &big);
    let downloads = disk.path().join("downloads");

    // Checked before asking: nothing is fetched.
    let d = download(&nginx.url("big.bin"), &big, &downloads.join("big.bin"));
    let failure = run(&d).failure();
    let Failure::NoSpace { dir, free, needed } = &failure else { panic!("{failure:?}") };
    assert_eq!((dir.as_path(), *needed), (downloads.as_path(), big.len() as u64));
    assert!(*free < *needed);
    assert!(failure.to_string().starts_with(&format!("not enough space in {}: ", downloads.display())));
    assert_eq!(nginx.served(), []);
    assert_eq!(names(&downloads), Vec::<String>::new());

    // The disk fills up meanwhile: the partial file goes, to give the space back.
    let data = random_bytes(900 * 1024);
    nginx.put("fw.bin", &data);
    let d = download(&nginx.url("slow/fw.bin"), &data, &downloads.join("fw.bin"));
    let running = start(&d, &Cancel::new());
    // Past the first second's worth, which nginx sends at once.
    if !wait_until(secs(10), || file_len(&d.partial_path()) > SLOW_BYTES_PER_S) {
        panic!("the download did not start: {:?}", running.join().unwrap().result);
    }
    disk.fill();
    let failure = running.join().unwrap().failure();
    assert!(
        matches!(&failure, Failure::DiskFull { dir, size, .. } if *dir == downloads && *size == data.len() as u64),
        "{failure:?}"
    );
    assert!(failure.to_string().contains("is full after"), "{failure}");
    assert_eq!(names(&downloads), Vec::<String>::new());
}

/// Throughput against curl, and memory, for a 256 MiB download over HTTPS from nginx on
/// loopback. Not a check: prints the figures (`cargo test --release --test update_download --
/// --ignored --nocapture`).
#[test]
#[ignore]
fn measure_throughput_and_memory_of_256_mib() {
    let nginx = Nginx::start();
    let size = 256 * MIB;
    // Written a piece at a time: the test process's own peak stays small.
    let mut file = fs::File::create(nginx.file("big.bin")).unwrap();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    for _ in 0..size / MIB {
        let piece = random_bytes(MIB);
        hash.update(&piece);
        file.write_all(&piece).unwrap();
    }
    drop(file);
    let dir = tempfile::tempdir().unwrap();
    let url = nginx.https_url("big.bin");
    let d = Download {
        url: url.clone(),
        sha256: tether::trust::hex(hash.finish().as_ref()),
        size: size as u64,
        dest: dir.path().join("big.bin"),
        ca_file: Some(nginx.ca_file()),
        proxy: None,
    };
    let status_kb = |field: &str| {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    // Resets VmHWM to the current VmRSS (Linux 4.0+).
    fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss_before = status_kb("VmRSS:");
    let curl = |args: &[&str]| {
        let t = Instant::now();
        let out = dir.path().join("curl.bin");
        let status = Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(nginx.ca_file())
            .arg("-o")
            .arg(&out)
            .arg(&url)
            .status()
            .unwrap();
        assert!(status.success());
        if !args.is_empty() {
            assert!(Command::new(args[0]).args(&args[1..]).arg(&out).output().unwrap().status.success());
        }
        t.elapsed().as_secs_f64()
    };
    let mut best = [f64::MAX; 3];
    for _ in 0..3 {
        let _ = fs::remove_file(&d.dest);
        let t = Instant::now();
        run(&d).ok();
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        best[1] = best[1].min(curl(&[]));
        best[2] = best[2].min(curl(&["sha256sum"]));
    }
    let rate = |s: f64| 256.0 / s;
    println!(
        "256 MiB over https from nginx on loopback, best of 3: tether {:.2} s ({:.0} MiB/s, sha256 \
         included); curl {:.2} s ({:.0} MiB/s): {:.0} %; curl then sha256sum {:.2} s: {:.0} %",
        best[0],
        rate(best[0]),
        best[1],
        rate(best[1]),
        100.0 * best[1] / best[0],
        best[2],
        100.0 * best[2] / best[0],
    );
    println!(
        "this process (the test harness): VmRSS {rss_before} kB before, peak (VmHWM) {} kB during the downloads",
        status_kb("VmHWM:")
    );
}
