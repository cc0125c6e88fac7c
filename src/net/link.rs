//! A connected byte pipe to the broker, whatever carries it: TCP or TLS, with or without a
//! WebSocket on top. MQTT packets go in and come out as bytes; the pipe never blocks.

use super::ws::{self, Decoded, Deframer};
use crate::memory::Drained;
use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use rustls::{ClientConnection, StreamOwned};
use std::io::{self, Read, Write};

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// TLS records rustls may hold that the socket has not taken, beyond `Link::queued`: whatever
/// waits there waits ahead of a PINGREQ, unseen by the send queue's bounds. One small record
/// per write costs 0.5 % of overhead; rustls' default (64 KiB) would be 6 s on a 10 KB/s link.
const TLS_SEND_BUFFER: usize = 4 * 1024;

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => write_tls(s, buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => send_tls_records(s),
        }
    }
}

/// Encrypts what rustls takes of `buf` once the socket has taken all it held before. Unlike
/// rustls' own `Stream::write`, it never reads: that one reads the socket when writing
/// blocks, and the broker's bytes it takes in then (a PINGRESP) would wait unseen, the
/// readable event they raised already spent.
fn write_tls(tls: &mut TlsStream, buf: &[u8]) -> io::Result<usize> {
    send_tls_records(tls)?;
    let taken = tls.conn.writer().write(buf)?;
    // `taken` bytes are rustls' now whatever happens: an error shows again at the next call.
    let _ = send_tls_records(tls);
    Ok(taken)
}

/// Writes the TLS records rustls holds until the socket takes no more (`WouldBlock`).
fn send_tls_records(tls: &mut TlsStream) -> io::Result<()> {
    while tls.conn.wants_write() {
        match tls.conn.write_tls(&mut tls.sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What reading found besides bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// Everything available was read; more may come later.
    WouldBlock,
    /// The read budget is used up: decode what came, then read again.
    More,
    /// The broker closed the connection.
    Closed,
}

/// The connection to the broker once dialled: MQTT bytes in and out, over a WebSocket or not.
pub struct Link {
    stream: Stream,
    /// Bytes the socket has not taken yet. Written bytes leave from the front in O(1), however
    /// little the socket takes at a time.
    out: BytesMut,
    /// Set when a WebSocket carries the MQTT bytes.
    ws: Option<Deframer>,
}

/// Bytes read per call; small to keep the agent's memory flat.
const READ_CHUNK: usize = 4096;
/// Bytes read before the caller decodes them: however much the broker sends at once (a huge
/// retained message), the agent holds a bounded amount of it.
const READ_BUDGET: usize = 16 * READ_CHUNK;

impl Link {
    /// MQTT straight on TCP or TLS.
    pub fn raw(stream: Stream) -> Link {
        Link::new(stream, None)
    }

    /// MQTT in WebSocket binary frames, on a stream whose handshake is done.
    pub fn websocket(stream: Stream) -> Link {
        Link::new(stream, Some(Deframer::default()))
    }

    fn new(mut stream: Stream, ws: Option<Deframer>) -> Link {
        if let Stream::Tls(tls) = &mut stream {
            tls.conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
        }
        Link { stream, out: BytesMut::new(), ws }
    }

    pub fn tcp(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// Bytes queued that the socket has not taken yet (WebSocket framing included). Not
    /// counted: up to `TLS_SEND_BUFFER` bytes inside rustls, and what the kernel holds unsent
    /// (see `dial::NOTSENT_LOWAT`).
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Queues `bytes` and writes as much as the socket takes now.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.ws {
            Some(_) => ws::encode_mqtt(bytes, &mut self.out),
            None => self.out.extend_from_slice(bytes),
        }
        self.flush()
    }

    /// Writes queued bytes until done or the socket is full (then the next writable event
    /// calls this again). No byte goes into rustls while it holds some the socket has not
    /// taken, so it holds at most `TLS_SEND_BUFFER` and the rest waits here, counted.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.out.release_if_empty();
        match self.stream.flush() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }

    /// Appends the MQTT bytes available now to `inbuf`, up to a budget; returns how it ended
    /// and how many bytes came from the socket (frames included).
    pub fn read_into(&mut self, inbuf: &mut BytesMut) -> io::Result<(ReadEnd, usize)> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut budget = READ_BUDGET;
        let end = loop {
            if budget == 0 {
                break ReadEnd::More;
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(0) => break ReadEnd::Closed,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break ReadEnd::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            budget = budget.saturating_sub(n);
            match &mut self.ws {
                None => inbuf.extend_from_slice(&chunk[..n]),
                Some(ws) => {
                    if ws.decode(&mut chunk[..n], inbuf, &mut self.out)? == Decoded::Closed {
                        break ReadEnd::Closed;
                    }
                }
            }
        };
        // Pongs for the pings just read.
        self.flush()?;
        Ok((end, READ_BUDGET - budget))
    }
}
