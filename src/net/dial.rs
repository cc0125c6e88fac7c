//! Builds a `Link` step by step without blocking: TCP connect, optional HTTP CONNECT proxy,
//! optional TLS, optional WebSocket handshake. Each socket event moves it as far as it can go.

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use tungstenite::client::ClientRequestBuilder;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};

use super::link::{Link, Stream, TlsStream};
use super::url::{BrokerUrl, ProxyUrl};

/// Largest proxy response head we accept.
const MAX_PROXY_RESPONSE: usize = 8192;
/// Unsent bytes past which the kernel takes no more from the socket and stops reporting it
/// writable. Its send buffer grows to megabytes on its own (tcp_wmem), and a PINGREQ or PUBACK
/// behind megabytes on a 10 KB/s link misses the keepalive; 16 KiB is 1.6 s there, and still
/// keeps a fast link busy, as the kernel asks for more (a writable event) at half of it.
/// Bytes sent and not yet acknowledged do not count: throughput does not depend on it.
const NOTSENT_LOWAT: usize = 16 * 1024;

/// Where and how to connect; built once per config.
pub struct Route {
    pub broker: BrokerUrl,
    pub proxy: Option<ProxyUrl>,
    pub tls: Option<Arc<ClientConfig>>,
}

impl Route {
    /// The host and port the TCP connection goes to: the proxy's, when there is one.
    pub fn first_hop(&self) -> (String, u16) {
        match &self.proxy {
            Some(p) => (p.host.clone(), p.port),
            None => (self.broker.host.clone(), self.broker.port),
        }
    }
}

enum Stage {
    Tcp { sock: TcpStream, addr: SocketAddr },
    Proxy { sock: TcpStream, request: Vec<u8>, response: Vec<u8> },
    Tls { tls: Box<TlsStream> },
    Ws { mid: MidHandshake<ClientHandshake<Stream>> },
    Failed,
}

/// What one step of the handshake came to.
enum Step {
    /// Needs the socket to become readable or writable.
    Wait(Stage),
    /// Can go on at once.
    Next(Stage),
    Done(Link),
}

pub struct Dialer {
    route: Arc<Route>,
    addrs: VecDeque<SocketAddr>,
    stage: Stage,
    token: Token,
    certificate_rejected: bool,
}

impl Dialer {
    /// Starts a TCP connect to the first of `addrs`; later ones are tried if it fails.
    pub fn start(
        route: Arc<Route>,
        addrs: Vec<SocketAddr>,
        registry: &Registry,
        token: Token,
    ) -> Result<Dialer, String> {
        let mut dialer =
            Dialer { route, addrs: addrs.into(), stage: Stage::Failed, token, certificate_rejected: false };
        dialer.connect_next(registry, None)?;
        Ok(dialer)
    }

    fn connect_next(&mut self, registry: &Registry, last_error: Option<String>) -> Result<(), String> {
        let mut error = last_error;
        while let Some(addr) = self.addrs.pop_front() {
            match TcpStream::connect(addr) {
                Ok(mut sock) => {
                    registry
                        .register(&mut sock, self.token, Interest::READABLE | Interest::WRITABLE)
                        .map_err(|e| format!("register socket: {e}"))?;
                    self.stage = Stage::Tcp { sock, addr };
                    return Ok(());
                }
                Err(e) => error = Some(format!("TCP connect to {addr}: {}", describe_io(&e))),
            }
        }
        Err(error.unwrap_or_else(|| "no address to connect to".into()))
    }

    /// Moves the handshake forward; `Ok(Some(link))` once the byte pipe is ready for MQTT.
    pub fn advance(&mut self, registry: &Registry) -> Result<Option<Link>, String> {
        loop {
            let step = match std::mem::replace(&mut self.stage, Stage::Failed) {
                Stage::Tcp { sock, addr } => match tcp_connected(&sock) {
                    Ok(true) => self.after_tcp(sock)?,
                    Ok(false) => Step::Wait(Stage::Tcp { sock, addr }),
                    Err(e) => {
                        let why = format!("TCP connect to {addr}: {}", describe_io(&e));
                        self.connect_next(registry, Some(why))?;
                        return Ok(None);
                    }
                },
                Stage::Proxy { sock, request, response } => self.proxy_step(sock, request, response)?,
                Stage::Tls { tls } => self.tls_step(tls)?,
                Stage::Ws { mid } => ws_step(mid.handshake())?,
                Stage::Failed => return Err("connection attempt already failed".into()),
            };
            match step {
                Step::Wait(stage) => {
                    self.stage = stage;
                    return Ok(None);
                }
                Step::Next(stage) => self.stage = stage,
                Step::Done(link) => return Ok(Some(link)),
            }
        }
    }

    fn after_tcp(&self, sock: TcpStream) -> Result<Step, String> {
        let _ = sock.set_nodelay(true);
        limit_unsent(&sock);
        if self.route.proxy.is_some() {
            return Ok(Step::Next(Stage::Proxy {
                sock,
                request: proxy_request(&self.route),
                response: Vec::new(),
            }));
        }
        self.after_proxy(sock)
    }

    fn after_proxy(&self, sock: TcpStream) -> Result<Step, String> {
        let Some(config) = &self.route.tls else {
            return self.after_transport(Stream::Plain(sock));
        };
        let host = &self.route.broker.host;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| format!("TLS: invalid server name \"{host}\": {e}"))?;
        let conn = ClientConnection::new(Arc::clone(config), name).map_err(|e| format!("TLS: {e}"))?;
        Ok(Step::Next(Stage::Tls { tls: Box::new(StreamOwned::new(conn, sock)) }))
    }

    fn after_transport(&self, stream: Stream) -> Result<Step, String> {
        if !self.route.broker.scheme.is_websocket() {
            return Ok(Step::Done(Link::raw(stream)));
        }
        let url = &self.route.broker;
        let scheme = if url.scheme.is_tls() { "wss" } else { "ws" };
        let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
        let uri = format!("{scheme}://{host}:{}{}", url.port, url.path)
            .parse()
            .map_err(|e| format!("WebSocket: bad URL: {e}"))?;
        let request = ClientRequestBuilder::new(uri).with_sub_protocol("mqtt");
        ws_step(tungstenite::client::client(request, stream))
    }

    /// Whether the attempt failed because the broker's certificate did not verify.
    pub fn certificate_rejected(&self) -> bool {
        self.certificate_rejected
    }

    fn tls_step(&mut self, mut tls: Box<TlsStream>) -> Result<Step, String> {
        while tls.conn.is_handshaking() {
            let tls = &mut *tls;
            match tls.conn.complete_io(&mut tls.sock) {
                Ok((0, 0)) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.certificate_rejected =
                        super::tls::error_in(&e).is_some_and(super::tls::is_certificate_rejection);
                    return Err(describe_io(&e));
                }
            }
        }
        if tls.conn.is_handshaking() {
            return Ok(Step::Wait(Stage::Tls { tls }));
        }
        self.after_transport(Stream::Tls(tls))
    }

    fn proxy_step(
        &self,
        mut sock: TcpStream,
        mut request: Vec<u8>,
        mut response: Vec<u8>,
    ) -> Result<Step, String> {
        let proxy_err = |what: String| format!("proxy {}: {what}", self.route.first_hop().0);
        while !request.is_empty() {
            match sock.write(&request) {
                Ok(n) => {
                    request.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Step::Wait(Stage::Proxy { sock, request, response }))
                }
                Err(e) => return Err(proxy_err(describe_io(&e))),
            }
        }
        // Byte by byte, so nothing after the response head (the TLS or MQTT data that follows)
        // is swallowed. The head is short and this happens once per connection.
        let mut byte = [0u8; 1];
        while !response.ends_with(b"\r\n\r\n") {
            match sock.read(&mut byte) {
                Ok(0) => return Err(proxy_err("closed the connection during CONNECT".into())),
                Ok(_) => response.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Step::Wait(Stage::Proxy { sock, request, response }))
                }
                Err(e) => return Err(proxy_err(describe_io(&e))),
            }
            if response.len() > MAX_PROXY_RESPONSE {
                return Err(proxy_err("response head too long".into()));
            }
        }
        let head = String::from_utf8_lossy(&response);
        let status_line = head.lines().next().unwrap_or("").trim().to_string();
        let code = status_line.split_whitespace().nth(1).unwrap_or("");
        if !code.starts_with('2') {
            return Err(proxy_err(format!("refused CONNECT: {status_line}")));
        }
        self.after_proxy(sock)
    }
}

fn ws_step(
    result: Result<
        (tungstenite::WebSocket<Stream>, tungstenite::handshake::client::Response),
        HandshakeError<ClientHandshake<Stream>>,
    >,
) -> Result<Step, String> {
    match result {
        // From here on the link frames MQTT itself (see ws.rs). tungstenite has read nothing
        // past the handshake response: an MQTT broker sends nothing before our CONNECT.
        Ok((ws, _response)) => Ok(Step::Done(Link::websocket(ws.into_inner()))),
        Err(HandshakeError::Interrupted(mid)) => Ok(Step::Wait(Stage::Ws { mid })),
        Err(HandshakeError::Failure(e)) => Err(describe_ws(e)),
    }
}

fn proxy_request(route: &Route) -> Vec<u8> {
    let b = &route.broker;
    let target = if b.host.contains(':') {
        format!("[{}]:{}", b.host, b.port)
    } else {
        format!("{}:{}", b.host, b.port)
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(credentials) = route.proxy.as_ref().and_then(|p| p.credentials.as_deref()) {
        request.push_str(&format!("Proxy-Authorization: Basic {}\r\n", base64(credentials.as_bytes())));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// Sets `NOTSENT_LOWAT` on `sock`. A kernel without it (before Linux 3.12) only keeps the
/// larger backlog: the connection works as well.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn limit_unsent(sock: &TcpStream) {
    use std::os::fd::AsRawFd;
    let value = NOTSENT_LOWAT as libc::c_int;
    // SAFETY: a valid socket and a c_int option value of the given length.
    let result = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        log::debug!("TCP_NOTSENT_LOWAT not set: {}", io::Error::last_os_error());
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn limit_unsent(_sock: &TcpStream) {}

fn tcp_connected(sock: &TcpStream) -> io::Result<bool> {
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    match sock.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Words for an I/O error, naming TLS causes when the error wraps one.
pub fn describe_io(e: &io::Error) -> String {
    if let Some(tls) = super::tls::error_in(e) {
        return super::tls::describe_error(tls);
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed unexpectedly".into(),
        _ => e.to_string(),
    }
}

fn describe_ws(e: tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(response) => {
            format!("WebSocket: broker answered HTTP {} to the upgrade (wrong path or not a websockets listener?)", response.status())
        }
        tungstenite::Error::Io(e) => format!("WebSocket: {}", describe_io(&e)),
        other => format!("WebSocket: {other}"),
    }
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, expected) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("user:pass", "dXNlcjpwYXNz")]
        {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }
}
