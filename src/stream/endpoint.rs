//! One stream's local end, on either side: a terminal, a process's pipes, a TCP connection,
//! stdin and stdout, as non-blocking file descriptors the event loop polls. Bytes read go into
//! the tunnel as far as the stream's window allows; bytes from the peer wait here (at most a
//! window of them) until the descriptor takes them, and only then count as consumed.

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use super::{Message, StreamId, Tunnel};

/// Bytes read per call.
pub const READ_CHUNK: usize = 32 * 1024;

/// A descriptor registered with the loop under its own token.
pub struct Half {
    fd: OwnedFd,
    pub token: Token,
    /// The loop said it is ready, and it has not returned WouldBlock since (mio is edge
    /// triggered: a ready descriptor is not announced again until drained).
    ready: bool,
    /// A regular file (`tetherctl exec ... < file`) cannot be polled; it is always ready.
    polled: bool,
}

impl Half {
    pub fn register(fd: OwnedFd, token: Token, interest: Interest, registry: &Registry) -> io::Result<Half> {
        let polled = match registry.register(&mut SourceFd(&fd.as_raw_fd()), token, interest) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
            Err(e) => return Err(e),
        };
        Ok(Half { fd, token, ready: true, polled })
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn deregister(&self, registry: &Registry) {
        if self.polled {
            let _ = registry.deregister(&mut SourceFd(&self.fd.as_raw_fd()));
        }
    }
}

/// What a read found.
pub enum Read {
    Bytes(usize),
    /// The other side closed (EOF, or EIO from a terminal whose last holder left).
    End,
    /// Nothing now; the loop will say when.
    Later,
    /// The other side aborted (a connection reset): the stream must be closed with this reason.
    Failed(String),
}

pub struct Endpoint {
    pub reader: Option<Half>,
    pub writer: Option<Half>,
    /// Bytes from the operator not written yet.
    pending: Vec<u8>,
    /// The operator will send no more: close the writer once `pending` is written.
    eof_asked: bool,
    /// How the writer ends when the operator's side ends: `shutdown(SHUT_WR)` for a socket,
    /// close for a pipe, nothing for a terminal (the operator types ^D).
    pub on_eof: OnEof,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnEof {
    Shutdown,
    Close,
    Ignore,
}

impl Endpoint {
    pub fn new(reader: Option<Half>, writer: Option<Half>, on_eof: OnEof) -> Endpoint {
        Endpoint { reader, writer, pending: Vec::new(), eof_asked: false, on_eof }
    }

    pub fn on_ready(&mut self, token: Token) {
        for half in [&mut self.reader, &mut self.writer].into_iter().flatten() {
            if half.token == token {
                half.ready = true;
            }
        }
    }

    pub fn owns(&self, token: Token) -> bool {
        [&self.reader, &self.writer].into_iter().flatten().any(|h| h.token == token)
    }

    /// Whether a read may find something.
    pub fn readable(&self) -> bool {
        self.reader.as_ref().is_some_and(|h| h.ready)
    }

    /// Reads up to `buf.len()` bytes.
    pub fn read(&mut self, buf: &mut [u8]) -> Read {
        let Some(half) = &mut self.reader else { return Read::End };
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::read(half.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            return Read::Bytes(n as usize);
        }
        if n == 0 {
            return Read::End;
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => {
                half.ready = !half.polled;
                Read::Later
            }
            e if e.kind() == io::ErrorKind::Interrupted => Read::Later,
            // A terminal whose last holder left.
            e if e.raw_os_error() == Some(libc::EIO) => Read::End,
            e => Read::Failed(crate::fsutil::error_text(&e)),
        }
    }

    /// Stops reading: deregisters and closes the reader (a socket's other half stays).
    pub fn close_reader(&mut self, registry: &Registry) {
        if let Some(half) = self.reader.take() {
            half.deregister(registry);
        }
    }

    /// Queues bytes from the operator and writes what the descriptor takes now; returns how
    /// many bytes were written (delivered), or an error when the writer is gone.
    pub fn write(&mut self, bytes: &[u8], registry: &Registry) -> Result<usize, String> {
        if self.writer.is_none() {
            return Err("its input is closed".into());
        }
        self.pending.extend_from_slice(bytes);
        self.flush(registry)
    }

    /// The operator will send no more.
    pub fn write_eof(&mut self, registry: &Registry) -> Result<usize, String> {
        self.eof_asked = true;
        self.flush(registry)
    }

    /// Writes pending bytes as far as the descriptor takes them; returns how many.
    pub fn flush(&mut self, registry: &Registry) -> Result<usize, String> {
        let Some(half) = &mut self.writer else { return Ok(0) };
        let mut written = 0;
        while written < self.pending.len() && half.ready {
            let rest = &self.pending[written..];
            // SAFETY: writing from a buffer of the given length.
            let n = unsafe { libc::write(half.raw(), rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                written += n as usize;
                continue;
            }
            match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => half.ready = !half.polled,
                e if e.kind() == io::ErrorKind::Interrupted => {}
                e => return Err(crate::fsutil::error_text(&e)),
            }
        }
        self.pending.drain(..written);
        if self.pending.is_empty() {
            self.pending = Vec::new();
            if self.eof_asked {
                self.end_writer(registry);
            }
        }
        Ok(written)
    }

    fn end_writer(&mut self, registry: &Registry) {
        match self.on_eof {
            OnEof::Ignore => {}
            OnEof::Shutdown => {
                // Once: every shutdown wakes the socket's pollers again (an edge even under
                // EPOLLET), and a writer left registered would be flushed and shut down again
                // at each wake, for ever. The reader's descriptor keeps the socket open.
                if let Some(half) = self.writer.take() {
                    // SAFETY: shutdown on a descriptor we own.
                    unsafe { libc::shutdown(half.raw(), libc::SHUT_WR) };
                    half.deregister(registry);
                }
            }
            OnEof::Close => {
                if let Some(half) = self.writer.take() {
                    half.deregister(registry);
                }
            }
        }
    }

    /// Everything closed: deregistered, descriptors closed. With `abort`, a socket is reset
    /// rather than closed in order (its peer sees the error, as with ssh -L).
    pub fn close(&mut self, registry: &Registry, abort: bool) {
        if abort && self.on_eof == OnEof::Shutdown {
            if let Some(half) = self.reader.as_ref().or(self.writer.as_ref()) {
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: setting SO_LINGER from a local struct of the right size.
                unsafe {
                    libc::setsockopt(
                        half.raw(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
            }
        }
        for half in [self.reader.take(), self.writer.take()].into_iter().flatten() {
            half.deregister(registry);
        }
        self.pending = Vec::new();
    }

    pub fn reader_open(&self) -> bool {
        self.reader.is_some()
    }

    /// Bytes from the peer still to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Both ways are over: nothing more to read, and the peer's end of file written through.
    pub fn finished(&self) -> bool {
        self.reader.is_none() && self.eof_asked && self.pending.is_empty()
    }
}

/// A tunnel's streams and their local ends.
pub type Endpoints = BTreeMap<StreamId, Endpoint>;

/// Bytes from the peer for `stream`: written to its end, counted consumed once written. Data
/// for a stream with no end here (closed already, or never opened) is dropped, and the tunnel's
/// accounting of it too: a peer sending on ever new stream ids cannot grow it.
/// Err: the end cannot take it; the caller closes the stream.
pub fn deliver(
    endpoints: &mut Endpoints,
    tunnel: &mut Tunnel,
    stream: StreamId,
    bytes: &[u8],
    registry: &Registry,
    now: Instant,
) -> Result<(), String> {
    let Some(endpoint) = endpoints.get_mut(&stream) else {
        tunnel.forget(stream);
        return Ok(());
    };
    let written = endpoint.write(bytes, registry)?;
    tunnel.consumed(stream, written, now);
    Ok(())
}

/// Writes what ends that became writable take; returns the streams that failed, and why.
pub fn flush_writers(
    endpoints: &mut Endpoints,
    tunnel: &mut Tunnel,
    registry: &Registry,
    now: Instant,
) -> Vec<(StreamId, String)> {
    let mut failed = Vec::new();
    for (stream, endpoint) in endpoints.iter_mut() {
        match endpoint.flush(registry) {
            Ok(0) => {}
            Ok(n) => tunnel.consumed(*stream, n, now),
            Err(why) => failed.push((*stream, format!("cannot write: {why}"))),
        }
    }
    failed
}

/// Reads the ends into the tunnel, stream by stream in turn, while `may_send` says the
/// connection has room and the tunnel has sent everything queued: bytes wait in the kernel
/// (whose buffers push back on the process or the peer) rather than in memory. An end that
/// reaches its end sends `eof`. Returns whether anything was read, and the streams whose
/// read failed (a reset), for the caller to close with the reason.
pub fn read_sources(
    endpoints: &mut Endpoints,
    tunnel: &mut Tunnel,
    may_send: impl Fn() -> bool,
    registry: &Registry,
    scratch: &mut [u8],
) -> (bool, Vec<(StreamId, String)>) {
    let mut read_any = false;
    let mut failed = Vec::new();
    loop {
        let mut progress = false;
        for (stream, endpoint) in endpoints.iter_mut() {
            if tunnel.unsent() > 0 || !may_send() {
                return (read_any || progress, failed);
            }
            if failed.iter().any(|(s, _)| s == stream) {
                continue;
            }
            let room = tunnel.room(*stream).min(scratch.len());
            if room == 0 || !endpoint.readable() {
                continue;
            }
            match endpoint.read(&mut scratch[..room]) {
                Read::Bytes(n) => {
                    tunnel.send_data(*stream, &scratch[..n]);
                    progress = true;
                }
                Read::End => {
                    endpoint.close_reader(registry);
                    tunnel.send(Message::Eof { stream: *stream });
                    progress = true;
                }
                Read::Later => {}
                Read::Failed(why) => failed.push((*stream, why)),
            }
        }
        if !progress {
            return (read_any, failed);
        }
        read_any = true;
    }
}
