//! Broker and proxy URLs: the few forms the agent accepts, parsed strictly so a typo is
//! reported at start rather than as a puzzling connection failure.

use std::fmt;

use crate::text::Printable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// MQTT over WebSocket over TLS.
    Wss,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over TCP.
    Mqtt,
}

impl Scheme {
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Wss | Scheme::Mqtts)
    }
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Wss | Scheme::Ws)
    }
    fn default_port(self) -> u16 {
        match self {
            Scheme::Wss => 443,
            Scheme::Ws => 80,
            Scheme::Mqtts => 8883,
            Scheme::Mqtt => 1883,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Scheme::Wss => "wss",
            Scheme::Ws => "ws",
            Scheme::Mqtts => "mqtts",
            Scheme::Mqtt => "mqtt",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// The WebSocket path (`/mqtt` when the URL has none); unused for mqtt(s).
    pub path: String,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("\"{}\": expected SCHEME://HOST[:PORT][/PATH]", Printable(url)))?;
        let scheme = match scheme {
            "wss" => Scheme::Wss,
            "ws" => Scheme::Ws,
            "mqtts" | "ssl" => Scheme::Mqtts,
            "mqtt" | "tcp" => Scheme::Mqtt,
            other => {
                return Err(format!(
                    "unsupported scheme \"{}\" (use wss, ws, mqtts or mqtt)",
                    Printable(other)
                ))
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not accepted: use username and password_file".into());
        }
        let (host, port) = split_host_port(authority, scheme.default_port())?;
        if path.contains(char::is_whitespace) {
            return Err(format!("\"{}\": path contains white space", Printable(url)));
        }
        let path = if path.is_empty() { "/mqtt".to_string() } else { path.to_string() };
        if !scheme.is_websocket() && path != "/mqtt" && path != "/" {
            return Err(format!("\"{}\": a path only makes sense for ws and wss", Printable(url)));
        }
        Ok(BrokerUrl { scheme, host, port, path })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{}://{}:{}", self.scheme.name(), host, self.port)?;
        if self.scheme.is_websocket() {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

/// An HTTP proxy reached with `CONNECT host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// `user:password` for `Proxy-Authorization: Basic`, when the URL carries it.
    pub credentials: Option<String>,
}

impl ProxyUrl {
    pub fn parse(url: &str) -> Result<ProxyUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| "expected http://[USER:PASSWORD@]HOST[:PORT]".to_string())?;
        let rest = rest.trim_end_matches('/');
        let (credentials, authority) = match rest.rsplit_once('@') {
            Some((cred, auth)) => (Some(cred.to_string()), auth),
            None => (None, rest),
        };
        if authority.contains('/') {
            return Err("a proxy URL has no path".into());
        }
        let (host, port) = split_host_port(authority, 3128)?;
        Ok(ProxyUrl { host, port, credentials })
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in host")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b)) {
        return Err(format!("invalid host \"{}\"", Printable(host)));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("invalid port \"{}\"", Printable(p))),
        },
    };
    Ok((host.to_string(), port))
}

/// The URL with any `user:password@` removed, for logs and `config` output.
pub fn strip_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u = BrokerUrl::parse("wss://broker.example.com/ws").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Wss, "broker.example.com", 443, "/ws")
        );
        let u = BrokerUrl::parse("mqtts://10.0.0.1").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Mqtts, 8883));
        let u = BrokerUrl::parse("ws://[::1]:9001").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 9001, "/mqtt"));
        assert_eq!(BrokerUrl::parse("mqtt://h:1883").unwrap().to_string(), "mqtt://h:1883");
        for bad in
            ["http://x", "wss://", "wss://h:0", "wss://h:99999", "mqtt://u:p@h", "h:1883", "mqtt://h/x"]
        {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn errors_quote_what_was_given_as_people_read_it() {
        let error = |url| BrokerUrl::parse(url).unwrap_err();
        assert_eq!(error("broker:1883"), "\"broker:1883\": expected SCHEME://HOST[:PORT][/PATH]");
        assert_eq!(error("http://x"), "unsupported scheme \"http\" (use wss, ws, mqtts or mqtt)");
        assert_eq!(error("ws://h/a b"), "\"ws://h/a b\": path contains white space");
        assert_eq!(error("mqtt://h/x"), "\"mqtt://h/x\": a path only makes sense for ws and wss");
        assert_eq!(error("mqtt://h\u{1b}[2J"), "invalid host \"h\\u{1b}[2J\"");
        assert_eq!(error("mqtt://h:99999"), "invalid port \"99999\"");
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyUrl::parse("http://u:p@proxy:8080").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.credentials.as_deref()), ("proxy", 8080, Some("u:p")));
        assert_eq!(ProxyUrl::parse("http://proxy").unwrap().port, 3128);
        assert!(ProxyUrl::parse("socks5://proxy").is_err());
        assert_eq!(strip_userinfo("http://u:p@proxy:1"), "http://***@proxy:1");
    }
}
