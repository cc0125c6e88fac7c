//! `tetherctl shell`, `exec` and `forward`: ssh's everyday uses, through the broker.
//!
//! shell and exec: stdin goes to stream 0 (through ssh's escapes on a terminal), stream 0 comes
//! to stdout and, without a terminal, stream 1 to stderr; the remote exit code becomes
//! tetherctl's. forward: each connection accepted on a local port becomes a stream to its
//! target on the device.

use mio::net::TcpListener;
use mio::{Interest, Token};
use serde_json::{json, Map};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tether::stream::endpoint::{Endpoints, OnEof};
use tether::stream::{Message, StreamId};

use crate::settings::Settings;
use crate::tty::{self, EscapeFilter, NonBlockingFd, RawMode};
use crate::tunnel::{self, Keyboard, Link, Step};
use crate::{exit, Failure};

/// What `shell` and `exec` were asked.
#[derive(Debug, PartialEq)]
pub struct Interactive {
    pub device: String,
    /// None for a login shell.
    pub argv: Option<Vec<String>>,
    /// A terminal on the device (always for shell; `-t` for exec).
    pub pty: bool,
    /// `-e`: the escape character, None for none.
    pub escape: Option<u8>,
    pub timeout: Option<Duration>,
}

/// What tetherctl exits with when the tunnel fails after it opened (ssh's choice too): the
/// remote command's own codes stay unambiguous below it.
const TUNNEL_LOST: u8 = 255;

pub fn interactive(settings: &Settings, req: &Interactive) -> Result<u8, Failure> {
    let mut params = Map::new();
    let op = match &req.argv {
        None => "shell",
        Some(argv) => {
            params.insert("argv".into(), json!(argv));
            params.insert("pty".into(), json!(req.pty));
            "exec"
        }
    };
    if req.pty {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        params.insert("term".into(), json!(term));
        if let Some((rows, cols)) = tty::window_size() {
            params.insert("rows".into(), json!(rows));
            params.insert("cols".into(), json!(cols));
        }
    }
    let mut link = tunnel::open(settings, &req.device, op, params)?;
    // Only now: the signal handlers that restore the terminal are installed.
    let mut raw = match req.pty {
        true => Some(RawMode::stdin().map_err(|e| Failure::error(format!("stdin: {e}")))?),
        false => None,
    };
    let on_terminal = raw.as_ref().is_some_and(RawMode::is_raw);
    if on_terminal {
        link.watch_resize()?;
    }
    let keyboard = Some(if on_terminal { req.escape } else { None });
    let io = LocalIo::new(&mut link, req.pty, keyboard)?;
    let (code, message) = run_interactive(link, io, req.timeout);
    if let Some(raw) = &mut raw {
        raw.restore();
    }
    if let Some(message) = message {
        eprintln!("tetherctl: {message}");
    }
    Ok(code)
}

/// stdin (unless the remote side reads nothing), stdout and stderr as the tunnel's local
/// ends; their non-blocking guards.
pub struct LocalIo {
    endpoints: Endpoints,
    keyboard: Option<Keyboard>,
    _guards: Vec<NonBlockingFd>,
}

impl LocalIo {
    /// `keyboard`: stdin is read, with this escape character (None: no escapes); None: stdin
    /// is left alone.
    pub fn new(link: &mut Link, pty: bool, keyboard: Option<Option<u8>>) -> Result<LocalIo, Failure> {
        let mut guards = Vec::new();
        let mut nonblocking = |fd: RawFd| -> Result<OwnedFd, Failure> {
            let guard = NonBlockingFd::new(fd).map_err(|e| Failure::error(format!("fd {fd}: {e}")))?;
            let copy = duplicate(guard.fd())?;
            guards.push(guard);
            Ok(copy)
        };
        let stdout = nonblocking(1)?;
        let stderr = if pty { None } else { Some(nonblocking(2)?) };
        let stdin = keyboard.map(|escape| Ok::<_, Failure>((nonblocking(0)?, escape))).transpose()?;
        let mut endpoints = Endpoints::new();
        endpoints.insert(0, link.endpoint(None, Some(stdout), OnEof::Ignore)?);
        if let Some(stderr) = stderr {
            endpoints.insert(1, link.endpoint(None, Some(stderr), OnEof::Ignore)?);
        }
        let keyboard = stdin
            .map(|(stdin, escape)| {
                let endpoint = link.endpoint(Some(stdin), None, OnEof::Ignore)?;
                Ok::<_, Failure>(Keyboard::new(endpoint, EscapeFilter::new(escape)))
            })
            .transpose()?;
        Ok(LocalIo { endpoints, keyboard, _guards: guards })
    }
}

/// Runs until the remote side ends; returns the exit code, and what to tell the user.
pub fn run_interactive(mut link: Link, mut io: LocalIo, timeout: Option<Duration>) -> (u8, Option<String>) {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut exit_code: Option<i32> = None;
    let (reason, code, message) = loop {
        let step = match link.step(&mut io.endpoints, io.keyboard.as_mut(), deadline) {
            Ok(step) => step,
            Err(failure) => break (failure.message.clone(), failure.code, Some(failure.message)),
        };
        match step {
            Step::Message(Message::Exit { code }) => exit_code = Some(code),
            Step::Message(Message::End { reason }) => {
                let message = match (exit_code, reason.is_empty()) {
                    (Some(_), _) => None,
                    (None, true) => Some(format!("{} ended the session", link.device)),
                    (None, false) => Some(format!("{}: {reason}", link.device)),
                };
                let code = exit_code.map_or(TUNNEL_LOST, |code| code.clamp(0, 255) as u8);
                break (String::new(), code, message);
            }
            Step::Resized => {
                if let Some((rows, cols)) = tty::window_size() {
                    link.tunnel.send(Message::Resize { rows, cols });
                }
            }
            Step::Disconnect => {
                break ("the operator disconnected".into(), TUNNEL_LOST, Some("disconnected (~.)".into()))
            }
            Step::Interrupted => break ("interrupted".into(), exit::INTERRUPTED, None),
            Step::TimedOut => {
                let message = Some("timed out: the remote command was stopped".into());
                break ("timed out".into(), exit::TIMED_OUT, message);
            }
            Step::Message(_) | Step::Ready(_) => {}
        }
    };
    link.close(&mut io.endpoints, &reason);
    (code, message)
}

/// `LADDR:LPORT:HOST:HPORT` or `LPORT:HOST:HPORT` (LADDR defaults to 127.0.0.1).
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardSpec {
    pub listen: SocketAddr,
    pub target: String,
}

impl ForwardSpec {
    pub fn parse(text: &str) -> Result<ForwardSpec, String> {
        let bad = || format!("{text:?} is not [LADDR:]LPORT:HOST:HPORT (e.g. 8080:127.0.0.1:80)");
        // The target is the last two fields; HOST may be [v6].
        let (front, hport) = text.rsplit_once(':').ok_or_else(bad)?;
        let (front, host) = match front.strip_suffix(']') {
            Some(inner) => {
                let (front, host) = inner.rsplit_once(":[").ok_or_else(bad)?;
                (front, format!("[{host}]"))
            }
            None => front.rsplit_once(':').map(|(f, h)| (f, h.to_string())).ok_or_else(bad)?,
        };
        let (laddr, lport) = match front.rsplit_once(':') {
            Some((laddr, lport)) => (laddr.trim_start_matches('[').trim_end_matches(']'), lport),
            None => ("127.0.0.1", front),
        };
        let lport: u16 = lport.parse().map_err(|_| bad())?;
        let laddr: std::net::IpAddr = laddr.parse().map_err(|_| bad())?;
        hport.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ForwardSpec { listen: SocketAddr::new(laddr, lport), target: format!("{host}:{hport}") })
    }
}

struct Listener {
    socket: TcpListener,
    token: Token,
    target: String,
}

pub fn forward(settings: &Settings, device: &str, specs: &[ForwardSpec]) -> Result<u8, Failure> {
    // Bound first: a port in use fails before anything is asked of the device.
    let mut sockets = Vec::new();
    for spec in specs {
        let socket = TcpListener::bind(spec.listen)
            .map_err(|e| Failure::error(format!("cannot listen on {}: {e}", spec.listen)))?;
        sockets.push((socket, spec));
    }
    let mut targets: Vec<&str> = specs.iter().map(|s| s.target.as_str()).collect();
    targets.dedup();
    let mut params = Map::new();
    params.insert("targets".into(), json!(targets));
    let mut link = tunnel::open(settings, device, "forward", params)?;
    let mut listeners = Vec::new();
    for (mut socket, spec) in sockets {
        let half_token = Token(usize::MAX - listeners.len());
        link.registry()
            .register(&mut socket, half_token, Interest::READABLE)
            .map_err(|e| Failure::error(format!("cannot poll: {e}")))?;
        let shown = socket.local_addr().map_or(spec.listen.to_string(), |a| a.to_string());
        eprintln!("tetherctl: forwarding {shown} to {} on {device}", spec.target);
        listeners.push(Listener { socket, token: half_token, target: spec.target.clone() });
    }
    let mut endpoints = Endpoints::new();
    let mut names: BTreeMap<StreamId, String> = BTreeMap::new();
    let mut next_stream: StreamId = 1;
    let code = loop {
        let step = match link.step(&mut endpoints, None, None) {
            Ok(step) => step,
            Err(failure) => {
                eprintln!("tetherctl: {}", failure.message);
                break TUNNEL_LOST;
            }
        };
        match step {
            Step::Ready(token) => {
                let Some(listener) = listeners.iter().find(|l| l.token == token) else { continue };
                accept_all(&mut link, listener, &mut endpoints, &mut names, &mut next_stream)?;
            }
            Step::Message(Message::Close { stream, reason }) => {
                let target = names.remove(&stream).unwrap_or_default();
                if !reason.is_empty() {
                    eprintln!("tetherctl: connection {stream} to {target} on {device}: {reason}");
                }
            }
            Step::Message(Message::End { reason }) => {
                eprintln!(
                    "tetherctl: {device} ended the forward{}",
                    if reason.is_empty() { String::new() } else { format!(": {reason}") }
                );
                break exit::FAILED;
            }
            Step::Interrupted | Step::Disconnect => break exit::SUCCESS,
            _ => {}
        }
        close_finished(&mut link, &mut endpoints, &mut names);
    };
    link.close(&mut endpoints, "");
    Ok(code)
}

fn accept_all(
    link: &mut Link,
    listener: &Listener,
    endpoints: &mut Endpoints,
    names: &mut BTreeMap<StreamId, String>,
    next_stream: &mut StreamId,
) -> Result<(), Failure> {
    loop {
        let (socket, peer) = match listener.socket.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => {
                log::warn!("accept on {}: {e}", listener.target);
                return Ok(());
            }
        };
        let stream = *next_stream;
        *next_stream += 1;
        // SAFETY: the descriptor comes from a socket we own and give up here.
        let fd = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
        let writer = fd.try_clone().map_err(|e| Failure::error(format!("dup: {e}")))?;
        log::debug!("connection {stream} from {peer} to {}", listener.target);
        link.tunnel.send(Message::Open { stream, target: listener.target.clone() });
        endpoints.insert(stream, link.endpoint(Some(fd), Some(writer), OnEof::Shutdown)?);
        names.insert(stream, listener.target.clone());
    }
}

/// Connections over both ways are closed, and the device told.
fn close_finished(link: &mut Link, endpoints: &mut Endpoints, names: &mut BTreeMap<StreamId, String>) {
    let done: Vec<StreamId> = endpoints.iter().filter(|(_, e)| e.finished()).map(|(s, _)| *s).collect();
    for stream in done {
        link.close_stream(endpoints, stream, "");
        names.remove(&stream);
    }
}

fn duplicate(fd: RawFd) -> Result<OwnedFd, Failure> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(Failure::error(format!("dup: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `copy` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let spec = ForwardSpec::parse("8080:127.0.0.1:80").unwrap();
        assert_eq!((spec.listen.to_string(), spec.target), ("127.0.0.1:8080".into(), "127.0.0.1:80".into()));
        let spec = ForwardSpec::parse("0.0.0.0:2222:localhost:22").unwrap();
        assert_eq!((spec.listen.to_string(), spec.target), ("0.0.0.0:2222".into(), "localhost:22".into()));
        let spec = ForwardSpec::parse("[::1]:9000:[::1]:9001").unwrap();
        assert_eq!((spec.listen.to_string(), spec.target), ("[::1]:9000".into(), "[::1]:9001".into()));
        for bad in ["8080", "8080:host", "x:host:80", "8080:host:0", "8080::80", "nope:8080:h:80"] {
            assert!(ForwardSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
