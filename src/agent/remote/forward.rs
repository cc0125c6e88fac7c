//! A forwarded connection until it is established: its target's name resolved on a worker
//! (literal addresses need none), then a non-blocking connect the loop watches, trying each
//! address in turn (IPv4 first: services on "localhost" mostly listen there).

use mio::{Interest, Registry, Token};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

use crate::config::split_host_port;
use crate::stream::StreamId;
use crate::worker::Workers;

type Resolved = (String, StreamId, Result<Vec<SocketAddr>, String>);

/// Resolves targets: literal addresses at once, names on a worker thread.
pub struct Resolver {
    workers: Workers<Resolved>,
    ready: VecDeque<Resolved>,
}

impl Resolver {
    pub fn new(waker: Arc<mio::Waker>) -> Resolver {
        Resolver { workers: Workers::new(waker), ready: VecDeque::new() }
    }

    /// Starts resolving `target` for stream `stream` of tunnel `id`; the addresses come back
    /// through `try_recv`.
    pub fn start(&mut self, id: &str, stream: StreamId, target: &str) -> Connecting {
        let connecting = Connecting {
            target: target.to_string(),
            rest: Vec::new(),
            socket: None,
            early: Vec::new(),
            early_eof: false,
        };
        let Some((host, port)) = split_host_port(target) else {
            self.ready.push_back((id.into(), stream, Err(format!("{target} is not host:port"))));
            return connecting;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port: u16 = port.parse().unwrap_or(0);
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.ready.push_back((id.into(), stream, Ok(vec![SocketAddr::new(ip, port)])));
            return connecting;
        }
        let (job_id, job_target) = (id.to_string(), target.to_string());
        let spawned = self.workers.spawn("resolve", move || {
            let result = (host.as_str(), port)
                .to_socket_addrs()
                .map(|addrs| addrs.collect::<Vec<_>>())
                .map_err(|e| format!("cannot resolve {job_target}: {e}"));
            (job_id, stream, result)
        });
        if let Err(why) = spawned {
            self.ready.push_back((id.into(), stream, Err(why)));
        }
        connecting
    }

    pub fn try_recv(&mut self) -> Option<Resolved> {
        self.ready.pop_front().or_else(|| self.workers.try_recv())
    }
}

pub struct Connecting {
    target: String,
    /// Addresses not tried yet.
    rest: Vec<SocketAddr>,
    /// The connect under way, and the token it is registered under.
    socket: Option<(mio::net::TcpStream, Token, SocketAddr)>,
    /// What the operator sent before the connection was made (it sends right after open), and
    /// whether its end of file came: written once connected. The tunnel's window bounds it.
    early: Vec<u8>,
    early_eof: bool,
}

impl Connecting {
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Bytes from the operator that came before the connection was made.
    pub fn hold(&mut self, bytes: &[u8]) {
        self.early.extend_from_slice(bytes);
    }

    /// The operator's end of file came before the connection was made.
    pub fn hold_eof(&mut self) {
        self.early_eof = true;
    }

    /// What came before the connection was made, and whether the end of file did.
    pub fn take_early(&mut self) -> (Vec<u8>, bool) {
        (std::mem::take(&mut self.early), self.early_eof)
    }

    pub fn token(&self) -> Option<Token> {
        self.socket.as_ref().map(|(_, token, _)| *token)
    }

    /// The target's addresses are known: connects to the first.
    pub fn connect(
        mut self,
        resolved: Result<Vec<SocketAddr>, String>,
        token: Token,
        registry: &Registry,
    ) -> Result<Connecting, String> {
        let mut addrs = resolved?;
        if addrs.is_empty() {
            return Err(format!("{} has no address", self.target));
        }
        addrs.sort_by_key(|a| a.is_ipv6());
        addrs.reverse(); // popped from the end
        self.rest = addrs;
        self.next(token, registry)?;
        Ok(self)
    }

    fn next(&mut self, token: Token, registry: &Registry) -> Result<(), String> {
        let mut last_error = String::new();
        while let Some(addr) = self.rest.pop() {
            match mio::net::TcpStream::connect(addr) {
                Ok(mut socket) => {
                    registry
                        .register(&mut socket, token, Interest::WRITABLE)
                        .map_err(|e| format!("cannot poll a socket: {e}"))?;
                    self.socket = Some((socket, token, addr));
                    return Ok(());
                }
                Err(e) => last_error = format!("connection to {} ({addr}) failed: {e}", self.target),
            }
        }
        Err(last_error)
    }

    /// The connect's socket is ready: the connected descriptor, None while still connecting,
    /// or why every address failed.
    pub fn finish(&mut self, registry: &Registry) -> Result<Option<OwnedFd>, String> {
        let Some((socket, token, addr)) = &self.socket else { return Ok(None) };
        let failure = match socket.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match socket.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return Ok(None),
                Err(e) => Some(e),
            },
        };
        let (token, addr) = (*token, *addr);
        let (mut socket, _, _) = self.socket.take().expect("checked above");
        let _ = registry.deregister(&mut socket);
        let Some(error) = failure else {
            // SAFETY: the descriptor comes from a socket we own and give up here.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) }));
        };
        let why = format!("connection to {} ({addr}) failed: {error}", self.target);
        if self.rest.is_empty() {
            return Err(why);
        }
        self.next(token, registry).map(|()| None).map_err(|_| why)
    }

    pub fn cancel(&mut self, registry: &Registry) {
        if let Some((mut socket, _, _)) = self.socket.take() {
            let _ = registry.deregister(&mut socket);
        }
    }
}
