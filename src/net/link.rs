//! A connected byte pipe to the broker, whatever carries it: TCP or TLS, with or without a
//! WebSocket on top. MQTT packets go in and come out as bytes; the pipe never blocks.

use bytes::BytesMut;
use mio::net::TcpStream;
use rustls::{ClientConnection, StreamOwned};
use std::io::{self, Read, Write};
use tungstenite::{Message, WebSocket};

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

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
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// What reading found besides bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// Everything available was read; more may come later.
    WouldBlock,
    /// The broker closed the connection.
    Closed,
}

pub enum Link {
    Raw { stream: Stream, out: Vec<u8> },
    Ws(Box<WebSocket<Stream>>),
}

/// Bytes read per call; small to keep the agent's memory flat.
const READ_CHUNK: usize = 4096;

impl Link {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Link::Raw { stream, .. } => stream.tcp(),
            Link::Ws(ws) => ws.get_ref().tcp(),
        }
    }

    /// Queues `bytes` and writes as much as the socket takes now.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Link::Raw { out, .. } => out.extend_from_slice(bytes),
            Link::Ws(ws) => match ws.write(Message::binary(bytes.to_vec())) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ws_io_error(e)),
            },
        }
        self.flush()
    }

    /// Writes queued bytes until done or the socket is full (then the next writable event
    /// calls this again).
    pub fn flush(&mut self) -> io::Result<()> {
        let result = match self {
            Link::Raw { stream, out } => flush_raw(stream, out),
            Link::Ws(ws) => ws.flush().map_err(ws_io_error),
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }

    /// Appends every byte available now to `inbuf`.
    pub fn read_into(&mut self, inbuf: &mut BytesMut) -> io::Result<ReadEnd> {
        match self {
            Link::Raw { stream, .. } => read_raw(stream, inbuf),
            Link::Ws(ws) => read_ws(ws, inbuf),
        }
    }
}

fn flush_raw(stream: &mut Stream, out: &mut Vec<u8>) -> io::Result<()> {
    while !out.is_empty() {
        match stream.write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.flush()
}

fn read_raw(stream: &mut Stream, inbuf: &mut BytesMut) -> io::Result<ReadEnd> {
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(ReadEnd::Closed),
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadEnd::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn read_ws(ws: &mut WebSocket<Stream>, inbuf: &mut BytesMut) -> io::Result<ReadEnd> {
    loop {
        match ws.read() {
            Ok(Message::Binary(data)) => inbuf.extend_from_slice(&data),
            Ok(Message::Close(_)) => return Ok(ReadEnd::Closed),
            // Text frames are not MQTT; pings are answered by tungstenite on the next flush.
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // A ping read above queued a pong: send it.
                let _ = ws.flush();
                return Ok(ReadEnd::WouldBlock);
            }
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {
                return Ok(ReadEnd::Closed)
            }
            Err(e) => return Err(ws_io_error(e)),
        }
    }
}

pub fn ws_io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(format!("WebSocket: {other}")),
    }
}
