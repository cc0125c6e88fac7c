//! Downloads for software updates: one file from an `https://` or `http://` URL, checked
//! against the size and sha256 its update names, written into the download directory and
//! resumed with an HTTP Range request after a cut link or an agent restart.
//!
//! Blocking: run [`Download::run`] on a worker thread (src/worker.rs) with a [`Cancel`] the
//! event loop keeps (a flow aborted, the agent stopping) and a progress callback that passes
//! [`Progress`] on to the loop; it is called at most once a second.
//!
//! On disk the bytes go to a partial file beside the destination, `.NAME.SHA.part` (SHA: the
//! first 16 hex digits of the expected sha256, so that no other file's download resumes from
//! it), made 0600, never through a link, and locked while a download writes it. Once all
//! `size` bytes are there and their sha256 is right, it is fsynced and renamed to the
//! destination, the directory fsynced. The bytes are written and hashed as they arrive (after
//! the bytes already on disk when resuming) by a thread of its own, beside the one that reads
//! them. Memory is bounded whatever the size: two 128 KiB buffers plus ureq's and rustls' own.
//!
//! One call makes one attempt, one HTTP request (and its redirects). After a failure
//! ([`Failure::retryable`] says which are worth another attempt):
//! - the link was cut, the server stalled, could not be reached or answered 5xx: call again
//!   later; the bytes on disk are kept and the next attempt asks only for the rest;
//! - otherwise the same call fails the same way until something is fixed. Where the partial
//!   file's bytes are known bad (a wrong hash, more bytes than `size`, a server file of another
//!   size) or fill the disk, it is removed, so that the attempt after a fix starts clean.
//!
//! A cancelled download keeps its bytes too (the agent stopping resumes at its next start);
//! [`Download::discard`] removes them when the update is given up. A destination that is
//! already there with the right size and hash is taken as it is, without a request.
//!
//! TLS: verification is always on, against `updates.ca_file` or the system store, with the
//! rustls and ring the broker connection uses. A proxy is an HTTP CONNECT proxy
//! (`broker.proxy`'s form), used for `http://` URLs too; the `http_proxy` family of
//! environment variables is ignored, as it is for the broker.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ureq::http::{HeaderMap, StatusCode, Uri};
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::agent::files::hash_prefix_until;
use crate::fsutil::{self, error_text};
use crate::net::url::ProxyUrl;

/// TCP connect (to the server or the proxy), each address; DNS has the resolver's own timeouts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the next bytes (TLS handshake, response head, body) or for room to send:
/// a server or link that stops for this long cuts the attempt (the bytes so far are kept).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// What ureq reads from the socket at most at a time.
const BUFFER_BYTES: usize = 64 * 1024;
/// What the body is written to the file and hashed in: two of them, one being filled while the
/// other is written.
const CHUNK_BYTES: usize = 128 * 1024;
/// The most plaintext one TLS record carries.
const TLS_RECORD_BYTES: usize = 16 * 1024;
/// How much is written before its write-back to disk is started.
const WRITEBACK_BYTES: u64 = 8 * 1024 * 1024;
/// The request head is small: ureq's default of 128 KiB would be memory for nothing.
const OUTPUT_BUFFER_BYTES: usize = 16 * 1024;
const MAX_REDIRECTS: u32 = 5;
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Where the TLS errors send the reader.
const CA_KEY: &str = "updates.ca_file";

/// One file to download. One download per destination at a time (a second one is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// `https://...` or `http://...`.
    pub url: String,
    /// Of the whole file: 64 hex digits, either case.
    pub sha256: String,
    /// Of the whole file, in bytes.
    pub size: u64,
    /// Where the file ends up, in the download directory (`updates.download_dir`); its
    /// directory is made (private) when missing. Replaced if it is there with other content.
    pub dest: PathBuf,
    /// PEM CA(s) to trust instead of the system store (`updates.ca_file`).
    pub ca_file: Option<PathBuf>,
    /// `http://[user:password@]host[:port]`, an HTTP CONNECT proxy (`broker.proxy`).
    pub proxy: Option<String>,
}

/// How far a download is: `done` of `total` bytes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// Stops a download from another thread. Clones share the state; once cancelled it stays so,
/// so use a new one for each download (or flow).
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: AtomicBool,
    /// The HTTP client of the request under way, to shut its connection down.
    running: Mutex<Option<ureq::Agent>>,
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancel").field("cancelled", &self.is_cancelled()).finish()
    }
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Stops the download: it returns `Cancelled` at once from a read or write blocked on the
    /// network, at the next block from anything else. A DNS lookup or TCP connect under way
    /// is not cut short, only bounded by its timeout (the resolver's; 30 s for a connect).
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        if let Some(agent) = self.running().take() {
            agent.shutdown();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn running(&self) -> MutexGuard<'_, Option<ureq::Agent>> {
        self.0.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `cancel` shut `agent` down, until the guard is dropped; None when cancelled
    /// already. (Set before the flag is read: a `cancel` in between sees the agent.)
    fn watch(&self, agent: &ureq::Agent) -> Option<Watching<'_>> {
        *self.running() = Some(agent.clone());
        if self.is_cancelled() {
            self.running().take();
            return None;
        }
        Some(Watching(self))
    }
}

struct Watching<'a>(&'a Cancel);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.running().take();
    }
}

/// A download that did not complete: the URL (without user, password or query, which may
/// hold secrets) and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadError {
    pub url: String,
    pub failure: Failure,
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "download of {}: {}", self.url, self.failure)
    }
}

impl std::error::Error for DownloadError {}

/// What went wrong, each with its message. "Kept": the bytes on disk stay for the next attempt
/// to resume; "removed": the partial file is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request cannot be made as given (URL, sha256, destination, proxy URL); nothing was
    /// fetched.
    Invalid(String),
    /// HTTP 404 or 410. Kept.
    NotFound { status: u16 },
    /// Another HTTP status that is not the file. Kept.
    Status { status: u16 },
    /// The server's file is not `size` bytes (Content-Length, Content-Range). Removed.
    SizeMismatch { expected: u64, server: u64 },
    /// The server sent more than `size` bytes. Removed.
    TooLong { size: u64 },
    /// All `size` bytes came, but their sha256 is not the one expected. Removed.
    HashMismatch { expected: String, actual: String },
    /// The connection was cut, or stalled, before all the bytes came. Kept.
    Truncated { done: u64, size: u64, cause: String },
    /// The server sent something else than asked (a range from elsewhere, redirects without
    /// end). Kept.
    BadResponse(String),
    /// No connection, or no response: DNS, TCP, the proxy, a timeout. Kept.
    Unreachable(String),
    /// The server's certificate was not verified, or the CAs to trust could not be read.
    Tls(String),
    /// Too little free space for the rest of the file: nothing was fetched. Kept.
    NoSpace { dir: PathBuf, free: u64, needed: u64 },
    /// The disk filled up while writing. Removed, to give the space back.
    DiskFull { dir: PathBuf, done: u64, size: u64 },
    /// The partial or the destination file could not be read, written or renamed.
    File { path: PathBuf, cause: String },
    /// Stopped by [`Cancel`]. Kept.
    Cancelled { done: u64, size: u64 },
}

impl Failure {
    /// Whether another attempt as it is may succeed: the network or the server's state, not
    /// the request, the file or the device.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Truncated { .. } | Failure::Unreachable(_) => true,
            Failure::Status { status } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const REMOVED: &str = "the partial download was removed";
        match self {
            Failure::Invalid(why) => f.write_str(why),
            Failure::NotFound { status } => write!(f, "not found on the server (HTTP {status})"),
            Failure::Status { status } => write!(f, "the server answered HTTP {}", status_text(*status)),
            Failure::SizeMismatch { expected, server } => write!(
                f,
                "the server's file is {server} bytes, the update says {expected}: not the same file; {REMOVED}"
            ),
            Failure::TooLong { size } => {
                write!(f, "the server sent more than the {size} bytes the update says; {REMOVED}")
            }
            Failure::HashMismatch { expected, actual } => write!(
                f,
                "sha256 mismatch: the bytes downloaded have {actual}, the update says {expected}; {REMOVED}"
            ),
            Failure::Truncated { done, size, cause } => write!(
                f,
                "cut after {done} of {size} bytes ({cause}); they are kept, the next attempt resumes from there"
            ),
            Failure::BadResponse(why) => write!(f, "bad response: {why}"),
            Failure::Unreachable(why) => write!(f, "cannot reach the server: {why}"),
            Failure::Tls(why) => f.write_str(why),
            Failure::NoSpace { dir, free, needed } => {
                write!(f, "not enough space in {}: {free} bytes free, {needed} needed", dir.display())
            }
            Failure::DiskFull { dir, done, size } => write!(
                f,
                "{} is full after {done} of {size} bytes were written; {REMOVED} to give the space back",
                dir.display()
            ),
            Failure::File { path, cause } => write!(f, "{}: {cause}", path.display()),
            Failure::Cancelled { done, size } => {
                write!(f, "cancelled after {done} of {size} bytes (kept for a resume)")
            }
        }
    }
}

fn status_text(status: u16) -> String {
    match StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

impl Download {
    /// Downloads the file (or the rest of it) to `dest`, verified: `Ok(dest)` once it is there
    /// whole, with the right sha256. `progress` gets the bytes on disk at the start of the
    /// transfer and then at most once a second.
    pub fn run(&self, cancel: &Cancel, mut progress: impl FnMut(Progress)) -> Result<PathBuf, DownloadError> {
        self.attempt(cancel, &mut progress)
            .map_err(|failure| DownloadError { url: shown_url(&self.url), failure })
    }

    /// The partial file of this download (there or not).
    pub fn partial_path(&self) -> PathBuf {
        let name = self.dest.file_name().unwrap_or_default().to_string_lossy();
        let tag: String = self.sha256.chars().filter(char::is_ascii_hexdigit).take(16).collect();
        self.dest.with_file_name(format!(".{name}.{}.part", tag.to_ascii_lowercase()))
    }

    /// Removes the partial file, when the update is given up (not while `run` goes on).
    pub fn discard(&self) -> Result<(), DownloadError> {
        let path = self.partial_path();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DownloadError {
                url: shown_url(&self.url),
                failure: Failure::File { path, cause: error_text(&e) },
            }),
            _ => Ok(()),
        }
    }

    fn attempt(&self, cancel: &Cancel, progress: &mut dyn FnMut(Progress)) -> Result<PathBuf, Failure> {
        let expected = check_sha256(&self.sha256)?;
        let url = check_url(&self.url)?;
        let dir = self.dir()?;
        fsutil::create_private_dir(dir).map_err(|e| file_failure(dir, &e))?;
        if self.already_there(&expected, cancel)? {
            return Ok(self.dest.clone());
        }
        let mut part = Partial::open(self.partial_path(), self.size, cancel)?;
        if part.done < self.size {
            if let Err(failure) = self.fetch(url, &mut part, cancel, progress) {
                // No litter from an attempt that got no byte (no space, unreachable, TLS, 404...).
                if part.done == 0 {
                    part.remove();
                }
                return Err(failure);
            }
        }
        part.finish(&expected, &self.dest)
    }

    fn dir(&self) -> Result<&Path, Failure> {
        match (self.dest.parent(), self.dest.file_name()) {
            (Some(dir), Some(_)) if !dir.as_os_str().is_empty() => Ok(dir),
            _ => Err(Failure::Invalid(format!(
                "the destination {} must be a file in a directory",
                self.dest.display()
            ))),
        }
    }

    /// Whether `dest` is the file already (a download finished before a restart).
    fn already_there(&self, expected: &str, cancel: &Cancel) -> Result<bool, Failure> {
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.dest);
        let Ok(file) = opened else { return Ok(false) };
        if !file.metadata().is_ok_and(|m| m.is_file() && m.len() == self.size) {
            return Ok(false);
        }
        let hash =
            hash_of(&file, self.size, &self.dest, cancel, Failure::Cancelled { done: 0, size: self.size })?;
        Ok(crate::trust::hex(hash.finish().as_ref()) == expected)
    }

    /// One request for the bytes `part` lacks, once there is room for them, written to it as
    /// they come.
    fn fetch(
        &self,
        url: &str,
        part: &mut Partial,
        cancel: &Cancel,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), Failure> {
        let needed = self.size - part.done;
        let free = fsutil::free_bytes(&part.file).map_err(|e| file_failure(&part.path, &e))?;
        if free < needed {
            let dir = part.path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Err(Failure::NoSpace { dir, free, needed });
        }
        let agent = self.http_client(url)?;
        let cancelled = |part: &Partial| Failure::Cancelled { done: part.done, size: self.size };
        let Some(_watching) = cancel.watch(&agent) else { return Err(cancelled(part)) };
        let mut request = agent.get(url);
        if part.done > 0 {
            request = request.header("Range", format!("bytes={}-", part.done));
        }
        let mut response = match request.call() {
            Ok(response) => response,
            Err(_) if cancel.is_cancelled() => return Err(cancelled(part)),
            Err(e) => return Err(request_failure(e)),
        };
        self.check_response(response.status().as_u16(), response.headers(), part)?;
        let writer = ChunkWriter::start(part).map_err(|cause| Failure::Truncated {
            done: part.done,
            size: self.size,
            cause,
        })?;
        let received = self.receive(response.body_mut().as_reader(), part, &writer, cancel, progress);
        let Some(written) = writer.finish() else {
            let cause = "the thread writing the download failed".to_string();
            return Err(Failure::Truncated { done: part.done, size: self.size, cause });
        };
        (part.done, part.hash) = (written.done, written.hash);
        if let Some(e) = written.error {
            return Err(part.write_failure(&e, self.size));
        }
        received
    }

    /// Hands the body to `writer` as it comes, all of it or until it fails (or the writer
    /// does: then its error is the one to report).
    fn receive(
        &self,
        mut body: impl Read,
        part: &mut Partial,
        writer: &ChunkWriter,
        cancel: &Cancel,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), Failure> {
        let cancelled = |part: &Partial| Failure::Cancelled { done: part.done, size: self.size };
        let mut reported = Instant::now();
        progress(Progress { done: part.done, total: self.size });
        loop {
            if cancel.is_cancelled() {
                return Err(cancelled(part));
            }
            let Some(mut chunk) = writer.spare_buffer() else { return Ok(()) };
            let (n, read) = fill(&mut body, &mut chunk, PROGRESS_EVERY);
            if part.done + n as u64 > self.size {
                part.remove();
                return Err(Failure::TooLong { size: self.size });
            }
            writer.write(chunk, n);
            part.done += n as u64;
            if reported.elapsed() >= PROGRESS_EVERY {
                progress(Progress { done: part.done, total: self.size });
                reported = Instant::now();
            }
            match read {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) if cancel.is_cancelled() => return Err(cancelled(part)),
                Err(e) => {
                    let cause = describe(ureq::Error::from(e));
                    return Err(Failure::Truncated { done: part.done, size: self.size, cause });
                }
            }
        }
        if part.done < self.size {
            let cause = "the server ended the response early".to_string();
            return Err(Failure::Truncated { done: part.done, size: self.size, cause });
        }
        Ok(())
    }

    /// Whether the response is the file, or the rest of it as asked; a server that ignored
    /// the Range header sends it whole, and `part` starts over.
    fn check_response(&self, status: u16, headers: &HeaderMap, part: &mut Partial) -> Result<(), Failure> {
        let size = self.size;
        let mismatch = |part: &Partial, server| {
            part.remove();
            Err(Failure::SizeMismatch { expected: size, server })
        };
        match status {
            200 => {
                if let Some(length) = header_number(headers, "content-length").filter(|&l| l != size) {
                    return mismatch(part, length);
                }
                if part.done > 0 {
                    log::info!(
                        "download of {}: the server ignored the Range request and sends the whole file: \
                         starting over from byte 0 (the {} bytes on disk are dropped)",
                        shown_url(&self.url),
                        part.done
                    );
                    part.restart()?;
                }
                Ok(())
            }
            206 if part.done > 0 => match content_range(headers) {
                Some((_, Some(total))) if total != size => mismatch(part, total),
                Some((start, _)) if start == part.done => Ok(()),
                Some((start, _)) => Err(Failure::BadResponse(format!(
                    "asked for the bytes from {}, the server sent them from {start}",
                    part.done
                ))),
                None => Err(Failure::BadResponse("HTTP 206 without a valid Content-Range".into())),
            },
            // The server's file ends before the bytes already downloaded.
            416 if part.done > 0 => {
                part.remove();
                Err(match content_range(headers) {
                    Some((_, Some(total))) => Failure::SizeMismatch { expected: size, server: total },
                    _ => Failure::BadResponse(format!(
                        "HTTP 416: the server's file is shorter than the {} bytes downloaded already; the \
                         partial download was removed",
                        part.done
                    )),
                })
            }
            404 | 410 => Err(Failure::NotFound { status }),
            _ => Err(Failure::Status { status }),
        }
    }

    /// An HTTP client for this download: TLS with the CAs to trust, the proxy, the timeouts.
    fn http_client(&self, url: &str) -> Result<ureq::Agent, Failure> {
        // Only https needs CAs: a device without a CA store still downloads over http (a
        // redirect to https then fails verification, with the reason).
        let certs = match is_https(url) {
            true => crate::net::tls::trusted_certs(CA_KEY, self.ca_file.as_deref()).map_err(Failure::Tls)?,
            false => Vec::new(),
        };
        let roots = certs.iter().map(|cert| Certificate::from_der(cert.as_ref()).to_owned()).collect();
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let proxy = self.proxy.as_deref().map(proxy_of).transpose()?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(MAX_REDIRECTS)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(STALL_TIMEOUT))
            .timeout_per_write(Some(STALL_TIMEOUT))
            // Set, or ureq would take one from the environment.
            .proxy(proxy)
            .tls_config(tls)
            .user_agent(format!("tether-agent/{}", crate::VERSION))
            .input_buffer_size(BUFFER_BYTES)
            .output_buffer_size(OUTPUT_BUFFER_BYTES)
            .build();
        Ok(config.new_agent())
    }
}

/// The partial file, open and locked, with the sha256 of the bytes in it so far.
struct Partial {
    file: File,
    path: PathBuf,
    done: u64,
    hash: ring::digest::Context,
}

impl Partial {
    /// Opens (or makes) the partial file and hashes what it holds; more than `size` bytes is a
    /// leftover of no use, dropped.
    fn open(path: PathBuf, size: u64, cancel: &Cancel) -> Result<Partial, Failure> {
        let file = fsutil::open_append(&path).map_err(|e| file_failure(&path, &e))?;
        // SAFETY: flock on a descriptor we own; LOCK_NB never blocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            let cause = match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => "another download of this file is under way".into(),
                _ => error_text(&e),
            };
            return Err(Failure::File { path, cause });
        }
        let meta = file.metadata().map_err(|e| file_failure(&path, &e))?;
        if !meta.is_file() {
            return Err(Failure::File { path, cause: "not a regular file".into() });
        }
        let mut part = Partial { file, path, done: meta.len(), hash: new_hash() };
        if part.done > size {
            log::warn!(
                "{}: {} bytes, more than the file's {size}: starting over",
                part.path.display(),
                part.done
            );
            part.restart()?;
        }
        let cancelled = Failure::Cancelled { done: part.done, size };
        part.hash = hash_of(&part.file, part.done, &part.path, cancel, cancelled)?;
        Ok(part)
    }

    /// The hash of the bytes so far, for a [`ChunkWriter`] to go on with (a new one in its place
    /// until it is given back).
    fn take_hash(&mut self) -> ring::digest::Context {
        std::mem::replace(&mut self.hash, new_hash())
    }

    fn restart(&mut self) -> Result<(), Failure> {
        self.file.set_len(0).map_err(|e| file_failure(&self.path, &e))?;
        self.done = 0;
        self.hash = new_hash();
        Ok(())
    }

    /// What a failed write of the download means; a full disk gets its space back.
    fn write_failure(&self, e: &io::Error, size: u64) -> Failure {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
            self.remove();
            let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Failure::DiskFull { dir, done: self.done, size };
        }
        file_failure(&self.path, e)
    }

    fn remove(&self) {
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("{}: cannot remove it: {}", self.path.display(), error_text(&e));
            }
        }
    }

    /// Checks the sha256 and puts the file in place (durably), or removes it.
    fn finish(self, expected: &str, dest: &Path) -> Result<PathBuf, Failure> {
        let actual = crate::trust::hex(self.hash.clone().finish().as_ref());
        if actual != expected {
            self.remove();
            return Err(Failure::HashMismatch { expected: expected.into(), actual });
        }
        self.file.sync_all().map_err(|e| file_failure(&self.path, &e))?;
        fs::rename(&self.path, dest).map_err(|e| file_failure(dest, &e))?;
        fsutil::sync_dir(dest.parent().unwrap_or(Path::new("."))).map_err(|e| file_failure(dest, &e))?;
        Ok(dest.to_path_buf())
    }
}

/// Reads into `buf` while the body comes fast: until it is full, the body ends or fails, a read
/// returns less than a TLS record's worth (the bytes at hand are all there is for now) or
/// `within` has passed. A chunk for one write and one hash update rather than one per record,
/// yet what a slow or stalled link brings goes to the disk and the progress at once. Returns
/// the bytes read and whether more may come (or the error that ended the body, after those).
fn fill(body: &mut impl Read, buf: &mut [u8], within: Duration) -> (usize, io::Result<bool>) {
    let started = Instant::now();
    let mut filled = 0;
    while filled < buf.len() {
        match body.read(&mut buf[filled..]) {
            Ok(0) => return (filled, Ok(false)),
            Ok(n) if n < TLS_RECORD_BYTES => return (filled + n, Ok(true)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (filled, Err(e)),
        }
        if started.elapsed() >= within {
            break;
        }
    }
    (filled, Ok(true))
}

/// Writes a download's chunks to its partial file on a thread of its own, hashes them and
/// starts their write-back to disk every few MiB, so that the final fsync finds little left to
/// do. The download thread keeps TLS alone: with two cores both run side by side (the writes
/// and the hash were over half of one thread's time, the fsync of 256 MiB 0.1 s). Chunks go
/// there and come back to be filled again, two in all.
struct ChunkWriter {
    chunks: mpsc::SyncSender<(Vec<u8>, usize)>,
    spares: mpsc::Receiver<Vec<u8>>,
    thread: thread::JoinHandle<Written>,
}

/// What a [`ChunkWriter`] did: the bytes in the file and their hash; the first write that
/// failed, after which it wrote nothing.
struct Written {
    done: u64,
    hash: ring::digest::Context,
    error: Option<io::Error>,
}

impl ChunkWriter {
    /// Appends to `part`, going on from its hash; fails when no thread can be started.
    fn start(part: &mut Partial) -> Result<ChunkWriter, String> {
        let mut file = part.file.try_clone().map_err(|e| error_text(&e))?;
        let mut written_back = part.done;
        let mut written = Written { done: part.done, hash: part.take_hash(), error: None };
        let (chunks, to_write) = mpsc::sync_channel::<(Vec<u8>, usize)>(1);
        let (give_back, spares) = mpsc::sync_channel(2);
        for _ in 0..2 {
            let _ = give_back.send(vec![0u8; CHUNK_BYTES]);
        }
        let thread = crate::runner::spawn_small("download-write", move || {
            for (chunk, len) in to_write {
                if let Err(e) = file.write_all(&chunk[..len]) {
                    written.error = Some(e);
                    // Dropping `give_back` tells the download to stop.
                    break;
                }
                written.done += len as u64;
                written.hash.update(&chunk[..len]);
                if written.done - written_back >= WRITEBACK_BYTES {
                    start_writeback(&file, written_back, written.done);
                    written_back = written.done;
                }
                // Fails once the download stopped taking buffers: then none is needed.
                let _ = give_back.send(chunk);
            }
            written
        })
        .map_err(|e| format!("cannot start a thread to write the download: {}", error_text(&e)))?;
        Ok(ChunkWriter { chunks, spares, thread })
    }

    /// A buffer to fill, once the thread is done with it; None once the thread stopped.
    fn spare_buffer(&self) -> Option<Vec<u8>> {
        self.spares.recv().ok()
    }

    /// Writes and hashes the first `len` bytes of `chunk`, after those given before.
    fn write(&self, chunk: Vec<u8>, len: usize) {
        // Fails only if the thread stopped, which `finish` reports.
        let _ = self.chunks.send((chunk, len));
    }

    /// What was done, once all the chunks given are written; None if the thread panicked.
    fn finish(self) -> Option<Written> {
        drop(self.chunks);
        self.thread.join().ok()
    }
}

/// Starts writing `file`'s bytes `from..to` to disk, without waiting for it.
fn start_writeback(file: &File, from: u64, to: u64) {
    let (offset, len) = (from as libc::off64_t, (to - from) as libc::off64_t);
    // SAFETY: a descriptor we own; the call only starts I/O on the page cache. A failure (no
    // such support) leaves the work to the final fsync, which reports real errors.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// The sha256 context fed with the first `len` bytes of `file` (at `path`); `cancelled` when
/// the cancel comes first.
fn hash_of(
    file: &File,
    len: u64,
    path: &Path,
    cancel: &Cancel,
    cancelled: Failure,
) -> Result<ring::digest::Context, Failure> {
    hash_prefix_until(file, len, || cancel.is_cancelled()).map_err(|e| match cancel.is_cancelled() {
        true => cancelled,
        false => file_failure(path, &e),
    })
}

fn new_hash() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}

fn file_failure(path: &Path, e: &io::Error) -> Failure {
    Failure::File { path: path.to_path_buf(), cause: error_text(e) }
}

fn check_sha256(sha256: &str) -> Result<String, Failure> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(sha256.to_ascii_lowercase());
    }
    Err(Failure::Invalid(format!("the sha256 must be 64 hex digits, got \"{sha256}\"")))
}

fn is_https(url: &str) -> bool {
    url.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

fn check_url(url: &str) -> Result<&str, Failure> {
    let http = url.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
    let host = Uri::try_from(url).ok().and_then(|uri| uri.host().map(|h| !h.is_empty()));
    if (http || is_https(url)) && host == Some(true) {
        return Ok(url);
    }
    Err(Failure::Invalid(format!("not an https:// or http:// URL with a host: \"{}\"", shown_url(url))))
}

/// The URL as logs and messages show it: no `user:password@`, no query (a signed URL's
/// token) or fragment.
pub fn shown_url(url: &str) -> String {
    let (base, cut) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], "?…"),
        None => (url, ""),
    };
    format!("{}{cut}", crate::net::url::strip_userinfo(base))
}

fn proxy_of(url: &str) -> Result<ureq::Proxy, Failure> {
    let invalid =
        |e: String| Failure::Invalid(format!("the proxy {}: {e}", crate::net::url::strip_userinfo(url)));
    let proxy = ProxyUrl::parse(url).map_err(invalid)?;
    let mut builder = ureq::Proxy::builder(ureq::ProxyProtocol::Http).host(&proxy.host).port(proxy.port);
    if let Some(credentials) = &proxy.credentials {
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        builder = builder.username(user).password(password);
    }
    builder.build().map_err(|e| invalid(e.to_string()))
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes FIRST-LAST/TOTAL` (or `bytes */TOTAL`, with 416): the first byte
/// (0 for `*`) and the total when known.
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let value = headers.get("content-range")?.to_str().ok()?.trim();
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let total = if total == "*" { None } else { Some(total.parse().ok()?) };
    let first = match range {
        "*" => 0,
        _ => range.split_once('-')?.0.parse().ok()?,
    };
    Some((first, total))
}

/// A failure before the response: TLS, or no connection.
fn request_failure(e: ureq::Error) -> Failure {
    match tls_failure(&e) {
        Some(tls) => Failure::Tls(tls),
        None if matches!(e, ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed) => {
            Failure::BadResponse(describe(e))
        }
        None => Failure::Unreachable(describe(e)),
    }
}

fn tls_failure(e: &ureq::Error) -> Option<String> {
    let tls = match e {
        ureq::Error::Rustls(tls) => tls,
        ureq::Error::Io(io) => crate::net::tls::error_in(io)?,
        _ => return None,
    };
    Some(crate::net::tls::describe_error_of(tls, "download server", CA_KEY))
}

/// Words for a ureq error.
fn describe(e: ureq::Error) -> String {
    if let Some(tls) = tls_failure(&e) {
        return tls;
    }
    match e {
        ureq::Error::Io(io) => crate::net::dial::describe_io(&io),
        ureq::Error::Timeout(phase) => format!("timed out ({phase})"),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectProxyFailed(why) => format!("proxy: {why}"),
        ureq::Error::TooManyRedirects => format!("more than {MAX_REDIRECTS} redirects"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn content_range_forms() {
        let range = |value| content_range(&headers(&[("content-range", value)]));
        assert_eq!(range("bytes 100-999/1000"), Some((100, Some(1000))));
        assert_eq!(range("bytes 100-999/*"), Some((100, None)));
        assert_eq!(range("bytes */1000"), Some((0, Some(1000))));
        for bad in ["bytes 100-999", "items 1-2/3", "bytes x-1/2", "bytes 1-2/y"] {
            assert_eq!(range(bad), None, "{bad}");
        }
        assert_eq!(content_range(&headers(&[])), None);
        assert_eq!(header_number(&headers(&[("content-length", " 42 ")]), "content-length"), Some(42));
    }

    #[test]
    fn urls_are_checked_and_shown_without_secrets() {
        assert!(check_url("https://updates.example.com/fw.bin").is_ok());
        assert!(check_url("HTTP://10.0.0.1:8080/fw.bin").is_ok());
        for bad in ["ftp://h/x", "https://", "https:///x", "updates.example.com/fw.bin", ""] {
            assert!(matches!(check_url(bad), Err(Failure::Invalid(_))), "{bad}");
        }
        assert_eq!(
            shown_url("https://user:pw@h.example/fw.bin?X-Amz-Signature=abc@def"),
            "https://***@h.example/fw.bin?…"
        );
        assert_eq!(shown_url("http://h/a#frag"), "http://h/a?…");
        assert_eq!(shown_url("http://h/a"), "http://h/a");
    }

    #[test]
    fn the_request_is_checked_before_anything_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let download = |url: &str, sha256: &str, dest: PathBuf| Download {
            url: url.into(),
            sha256: sha256.into(),
            size: 1,
            dest,
            ca_file: None,
            proxy: Some("socks5://p".into()),
        };
        let sha = "A".repeat(64);
        let fail = |d: Download| d.run(&Cancel::new(), |_| {}).unwrap_err();
        let e = fail(download("http://127.0.0.1:1/x", "abc", dir.path().join("x")));
        assert_eq!(
            e.to_string(),
            "download of http://127.0.0.1:1/x: the sha256 must be 64 hex digits, got \"abc\""
        );
        let e = fail(download("file:///etc/passwd", &sha, dir.path().join("x")));
        assert!(matches!(e.failure, Failure::Invalid(_)), "{e}");
        let e = fail(download("http://127.0.0.1:1/x", &sha, PathBuf::from("x")));
        assert_eq!(e.failure, Failure::Invalid("the destination x must be a file in a directory".into()));
        let e = fail(download("http://127.0.0.1:1/x", &sha, dir.path().join("x")));
        assert_eq!(
            e.failure,
            Failure::Invalid("the proxy socks5://p: expected http://[USER:PASSWORD@]HOST[:PORT]".into())
        );
        let cancel = Cancel::new();
        cancel.cancel();
        let mut d = download("http://127.0.0.1:1/x", &sha, dir.path().join("x"));
        d.proxy = None;
        assert_eq!(d.run(&cancel, |_| {}).unwrap_err().failure, Failure::Cancelled { done: 0, size: 1 });
        assert_eq!(d.partial_path(), dir.path().join(format!(".x.{}.part", "a".repeat(16))));
        d.discard().unwrap();
        assert!(!d.partial_path().exists());
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        assert!(Failure::Truncated { done: 1, size: 2, cause: "reset".into() }.retryable());
        assert!(Failure::Unreachable("refused".into()).retryable());
        assert!(Failure::Status { status: 503 }.retryable());
        assert!(!Failure::Status { status: 403 }.retryable());
        assert!(!Failure::NotFound { status: 404 }.retryable());
        assert!(!Failure::HashMismatch { expected: "a".into(), actual: "b".into() }.retryable());
        assert_eq!(
            Failure::Status { status: 503 }.to_string(),
            "the server answered HTTP 503 Service Unavailable"
        );
    }

    /// Reads as scripted: each item one read's bytes (or an error), then the end.
    struct Scripted(std::collections::VecDeque<io::Result<Vec<u8>>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(Err(e)) => Err(e),
                Some(Ok(bytes)) => {
                    assert!(bytes.len() <= buf.len(), "the script reads more than asked");
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    Ok(bytes.len())
                }
            }
        }
    }

    #[test]
    fn a_chunk_takes_reads_while_they_bring_whole_records_and_no_more() {
        let record = |byte| Ok(vec![byte; TLS_RECORD_BYTES]);
        let mut buf = vec![0u8; 3 * TLS_RECORD_BYTES];
        let long = Duration::from_secs(60);

        let mut body = Scripted([record(1), record(2), record(3), record(4)].into());
        let (n, more) = fill(&mut body, &mut buf, long);
        assert_eq!((n, more.unwrap()), (3 * TLS_RECORD_BYTES, true), "full, the fourth left");
        assert_eq!((buf[0], buf[n - 1]), (1, 3));

        // A short read is what the link had: not held back waiting for more.
        let mut body = Scripted([record(1), Ok(vec![9; 1000]), record(2)].into());
        let (n, more) = fill(&mut body, &mut buf, long);
        assert_eq!((n, more.unwrap()), (TLS_RECORD_BYTES + 1000, true));

        let mut body = Scripted([record(1)].into());
        let (n, more) = fill(&mut body, &mut buf, long);
        assert_eq!((n, more.unwrap()), (TLS_RECORD_BYTES, false), "the end");

        // An error after some bytes: those are kept for the caller to write first.
        let cut = io::Error::new(io::ErrorKind::ConnectionReset, "cut");
        let mut body = Scripted([Err(io::ErrorKind::Interrupted.into()), record(1), Err(cut)].into());
        let (n, more) = fill(&mut body, &mut buf, long);
        assert_eq!((n, more.unwrap_err().kind()), (TLS_RECORD_BYTES, io::ErrorKind::ConnectionReset));

        let mut body = Scripted([record(1), record(2)].into());
        let (n, more) = fill(&mut body, &mut buf, Duration::ZERO);
        assert_eq!((n, more.unwrap()), (TLS_RECORD_BYTES, true), "time is up after a read");
    }
}
