//! Rule sets (docs/firewall.md): the small JSON form operators write, read with errors that
//! name the field (`rules[2].ports[1]: ...`), or raw backend text checked to stay inside
//! Tether's own table or chains. Pure: no I/O, shared with tetherctl (its broker warning).

use serde_json::{Map, Value};
use std::net::IpAddr;

/// Limits that keep a rule set, and what it is translated to, small.
pub const MAX_RULES: usize = 1000;
pub const MAX_ITEMS: usize = 64;
pub const MAX_RAW_BYTES: usize = 32 * 1024;
/// Kernel rules a rule set may expand to: iptables takes one per address and port range.
pub const MAX_EXPANDED: usize = 4096;
const MAX_COMMENT: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
        }
    }

    pub fn from_name(name: &str) -> Option<Backend> {
        match name {
            "nftables" => Some(Backend::Nftables),
            "iptables" => Some(Backend::Iptables),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleSet {
    Policy(Policy),
    /// Expert text for one backend: the body of `table inet tether` (nftables), or `-A
    /// TETHER-INPUT|TETHER-OUTPUT ...` lines for IPv4 (`text`) and IPv6 (`text6`) (iptables).
    Raw {
        backend: Backend,
        text: String,
        text6: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub default_in: Action,
    pub default_out: Action,
    /// Loopback traffic (the device talking to itself) passes before any rule (default).
    pub allow_loopback: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub action: Action,
    pub direction: Direction,
    pub protocol: Protocol,
    /// Destination ports (inclusive ranges); empty: any.
    pub ports: Vec<(u16, u16)>,
    /// The peer: source addresses of `in`, destination addresses of `out`; empty: any.
    pub addresses: Vec<Net>,
    pub interface: Option<String>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn bits(&self) -> u8 {
        if self.is_v4() {
            32
        } else {
            128
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        net.checked_shr(shift).unwrap_or(0) == ip.checked_shr(shift).unwrap_or(0)
    }

    /// `10.0.0.0/8`, or the bare address for a single host.
    pub fn text(&self) -> String {
        if self.prefix == self.bits() {
            self.addr.to_string()
        } else {
            format!("{}/{}", self.addr, self.prefix)
        }
    }

    fn parse(text: &str) -> Result<Net, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{text}\": not an IP address or network (10.0.0.0/8, 2001:db8::/32)"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("\"{text}\": the prefix length must be 0 to {bits}"))?,
        };
        let host_mask = |width: u32| (!0u128 >> (128 - width)).checked_shr(u32::from(prefix)).unwrap_or(0);
        let host_bits = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) & host_mask(32),
            IpAddr::V6(a) => u128::from(a) & host_mask(128),
        };
        if host_bits != 0 {
            return Err(format!("\"{text}\": host bits are set after /{prefix}"));
        }
        let net = Net { addr, prefix };
        Ok(net)
    }
}

impl RuleSet {
    /// Reads a rule set; an error names the field, from the rule set's top (`rules[2].ports`).
    pub fn from_json(value: &Value) -> Result<RuleSet, String> {
        let object = value.as_object().ok_or("must be a JSON object")?;
        if let Some(raw) = object.get("raw") {
            if let Some(other) = object.keys().find(|k| *k != "raw") {
                return Err(format!("{other}: not allowed beside \"raw\""));
            }
            return read_raw(raw).map_err(|e| format!("raw.{e}"));
        }
        known_keys(object, &["rules", "default_in", "default_out", "allow_loopback"])?;
        let rules = match object.get("rules") {
            None => Vec::new(),
            Some(Value::Array(rules)) if rules.len() > MAX_RULES => {
                return Err(format!("rules: at most {MAX_RULES} rules, got {}", rules.len()))
            }
            Some(Value::Array(rules)) => rules
                .iter()
                .enumerate()
                .map(|(i, rule)| read_rule(rule).map_err(|e| format!("rules[{i}]{e}")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("rules: must be a list of rules".into()),
        };
        let default = |name: &str| match object.get(name) {
            None => Ok(Action::Allow),
            Some(v) => match v.as_str() {
                Some("allow") => Ok(Action::Allow),
                Some("deny") => Ok(Action::Deny),
                _ => Err(format!("{name}: must be \"allow\" or \"deny\", got {v}")),
            },
        };
        let expanded: usize =
            rules.iter().map(|r: &Rule| r.addresses.len().max(1) * r.ports.len().max(1)).sum();
        if expanded > MAX_EXPANDED {
            return Err(format!(
                "rules: {expanded} address and port combinations, at most {MAX_EXPANDED} (iptables takes a rule \
                 for each)"
            ));
        }
        let allow_loopback = match object.get("allow_loopback") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(format!("allow_loopback: must be true or false, got {v}")),
        };
        Ok(RuleSet::Policy(Policy {
            rules,
            default_in: default("default_in")?,
            default_out: default("default_out")?,
            allow_loopback,
        }))
    }

    /// The backend a raw rule set is written for.
    pub fn raw_backend(&self) -> Option<Backend> {
        match self {
            RuleSet::Raw { backend, .. } => Some(*backend),
            RuleSet::Policy(_) => None,
        }
    }

    /// Whether an outgoing TCP connection to `ip:port` is refused by the rule set: the first
    /// rule that matches it decides, else `default_out`. None for raw text (not analysed).
    pub fn blocks_tcp_to(&self, ip: IpAddr, port: u16) -> Option<bool> {
        let RuleSet::Policy(policy) = self else { return None };
        if policy.allow_loopback && ip.is_loopback() {
            return Some(false);
        }
        let matching = policy.rules.iter().find(|r| {
            r.direction == Direction::Out
                && matches!(r.protocol, Protocol::Tcp | Protocol::Any)
                && (r.ports.is_empty() || r.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)))
                && (r.addresses.is_empty() || r.addresses.iter().any(|n| n.contains(ip)))
                && r.interface.is_none()
        });
        Some(matching.map_or(policy.default_out, |r| r.action) != Action::Allow)
    }
}

fn known_keys(object: &Map<String, Value>, keys: &[&str]) -> Result<(), String> {
    match object.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(unknown) => Err(format!("{unknown}: unknown key (the keys here are {})", keys.join(", "))),
        None => Ok(()),
    }
}

fn read_rule(value: &Value) -> Result<Rule, String> {
    let object = value.as_object().ok_or(": must be a JSON object")?;
    known_keys(object, &["action", "direction", "protocol", "ports", "addresses", "interface", "comment"])
        .map_err(|e| format!(".{e}"))?;
    let word = |name: &str, words: &[&str], default: Option<&str>| -> Result<String, String> {
        match object.get(name) {
            None => {
                default.map(str::to_string).ok_or_else(|| format!(".{name}: missing ({})", words.join(", ")))
            }
            Some(Value::String(s)) if words.contains(&s.as_str()) => Ok(s.clone()),
            Some(v) => Err(format!(".{name}: must be one of {}, got {v}", words.join(", "))),
        }
    };
    let action = match word("action", &["allow", "deny", "reject"], None)?.as_str() {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        _ => Action::Reject,
    };
    let direction = match word("direction", &["in", "out"], None)?.as_str() {
        "in" => Direction::In,
        _ => Direction::Out,
    };
    let protocol = match word("protocol", &["tcp", "udp", "icmp", "any"], Some("any"))?.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        _ => Protocol::Any,
    };
    let ports = list(object, "ports")?
        .iter()
        .enumerate()
        .map(|(i, p)| read_port(p).map_err(|e| format!(".ports[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if !ports.is_empty() && !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(".ports: need \"protocol\": \"tcp\" or \"udp\"".into());
    }
    let addresses = list(object, "addresses")?
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.as_str()
                .ok_or_else(|| format!("must be a string, got {a}"))
                .and_then(Net::parse)
                .map_err(|e| format!(".addresses[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let interface = match object.get("interface") {
        None => None,
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 15
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
        {
            Some(s.clone())
        }
        Some(v) => {
            return Err(format!(
                ".interface: must be an interface name (eth0; up to 15 of A-Z a-z 0-9 . _ -), got {v}"
            ))
        }
    };
    let comment = match object.get("comment") {
        None => None,
        Some(Value::String(s))
            if s.chars().count() <= MAX_COMMENT
                && !s.chars().any(|c| c.is_control() || c == '"' || c == '\\') =>
        {
            Some(s.clone())
        }
        Some(v) => {
            return Err(format!(
                ".comment: must be a string of up to {MAX_COMMENT} characters without quotes, backslashes \
                 or control characters, got {v}"
            ))
        }
    };
    Ok(Rule { action, direction, protocol, ports, addresses, interface, comment })
}

fn list<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a [Value], String> {
    match object.get(name) {
        None => Ok(&[]),
        Some(Value::Array(items)) if items.len() <= MAX_ITEMS => Ok(items),
        Some(Value::Array(items)) => Err(format!(".{name}: at most {MAX_ITEMS} items, got {}", items.len())),
        Some(v) => Err(format!(".{name}: must be a list, got {v}")),
    }
}

/// `22`, `"22"` or `"8000-8080"`.
fn read_port(value: &Value) -> Result<(u16, u16), String> {
    let port = |text: &str| text.trim().parse::<u16>().ok().filter(|p| *p > 0);
    let range = match value {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).filter(|p| *p > 0).map(|p| (p, p)),
        Value::String(s) => match s.split_once('-') {
            Some((lo, hi)) => port(lo).zip(port(hi)),
            None => port(s).map(|p| (p, p)),
        },
        _ => None,
    };
    match range {
        Some((lo, hi)) if lo <= hi => Ok((lo, hi)),
        Some(_) => Err(format!("{value}: a range must go up (\"8000-8080\")")),
        None => Err(format!("must be a port 1 to 65535 or a range \"8000-8080\", got {value}")),
    }
}

fn read_raw(value: &Value) -> Result<RuleSet, String> {
    let object = value.as_object().ok_or("must be a JSON object")?;
    known_keys(object, &["backend", "text", "text6"])?;
    let backend = object
        .get("backend")
        .and_then(Value::as_str)
        .and_then(Backend::from_name)
        .ok_or("backend: must be \"nftables\" or \"iptables\"")?;
    let text = |name: &str| match object.get(name) {
        None => Ok(String::new()),
        Some(Value::String(s)) if s.len() <= MAX_RAW_BYTES => Ok(s.clone()),
        Some(Value::String(s)) => Err(format!("{name}: at most {MAX_RAW_BYTES} bytes, got {}", s.len())),
        Some(v) => Err(format!("{name}: must be a string, got {v}")),
    };
    let (body, body6) = (text("text")?, text("text6")?);
    match backend {
        Backend::Nftables if object.contains_key("text6") => {
            return Err("text6: only for iptables (nftables' table inet tether holds both families)".into())
        }
        Backend::Nftables => check_nft_body(&body).map_err(|e| format!("text: {e}"))?,
        Backend::Iptables => {
            check_iptables_lines(&body).map_err(|e| format!("text: {e}"))?;
            check_iptables_lines(&body6).map_err(|e| format!("text6: {e}"))?;
        }
    }
    Ok(RuleSet::Raw { backend, text: body, text6: body6 })
}

/// Raw nftables text is the body of `table inet tether { ... }`: it may declare chains (with
/// their hooks), sets and rules there, and nothing else. Refused: a `}` that would close the
/// table (braces outside strings and comments must balance and never go below zero), `include`
/// and `define` (which reach outside the text), and control characters but tab and newline.
pub fn check_nft_body(text: &str) -> Result<(), String> {
    let mut depth: i64 = 0;
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let check_word = |word: &mut String, line: usize| -> Result<(), String> {
        let w = std::mem::take(word);
        match w.as_str() {
            "include" | "define" | "redefine" | "undefine" | "table" | "ruleset" => {
                Err(format!("line {line}: \"{w}\" is not allowed: the text is the body of table inet tether"))
            }
            _ => Ok(()),
        }
    };
    while let Some(c) = chars.next() {
        if c.is_control() && c != '\n' && c != '\t' {
            return Err(format!("line {line}: control character {c:?}"));
        }
        if c.is_alphanumeric() || c == '_' || c == '-' {
            word.push(c);
            continue;
        }
        check_word(&mut word, line)?;
        match c {
            '\n' => line += 1,
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\n') | None => return Err(format!("line {line}: a string is not closed")),
                    Some(_) => {}
                }
            },
            '#' => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("line {line}: this }} would close table inet tether"));
                }
            }
            _ => {}
        }
    }
    check_word(&mut word, line)?;
    if depth != 0 {
        return Err("a { is not closed".into());
    }
    Ok(())
}

/// Raw iptables text: `-A TETHER-INPUT ...` and `-A TETHER-OUTPUT ...` lines only (blank
/// lines and `#` comments aside), each one rule of Tether's own chains.
pub fn check_iptables_lines(text: &str) -> Result<(), String> {
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.chars().any(|c| c.is_control()) {
            return Err(format!("line {}: control character", i + 1));
        }
        if !(line.starts_with("-A TETHER-INPUT ") || line.starts_with("-A TETHER-OUTPUT ")) {
            return Err(format!(
                "line {}: only \"-A TETHER-INPUT ...\" and \"-A TETHER-OUTPUT ...\" lines are allowed, got \"{}\"",
                i + 1,
                crate::text::Printable(line)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        RuleSet::from_json(&v).unwrap_err()
    }

    #[test]
    fn a_rule_set_reads_with_defaults() {
        let set = RuleSet::from_json(&json!({
            "default_in": "deny",
            "rules": [{"action": "allow", "direction": "in", "protocol": "tcp", "ports": [22, "8000-8080"],
                       "addresses": ["10.0.0.0/8", "2001:db8::1"]}]
        }))
        .unwrap();
        let RuleSet::Policy(p) = set else { panic!() };
        assert_eq!(p.default_in, Action::Deny);
        assert_eq!(p.default_out, Action::Allow);
        assert_eq!(p.rules[0].ports, vec![(22, 22), (8000, 8080)]);
        assert_eq!(p.rules[0].addresses[1].text(), "2001:db8::1");
        assert_eq!(p.rules[0].addresses[0].text(), "10.0.0.0/8");
    }

    #[test]
    fn errors_name_the_field() {
        let rule = |r: Value| err(json!({"rules": [{"action": "allow", "direction": "in"}, r]}));
        assert_eq!(
            rule(json!({"action": "allow", "direction": "in", "protocol": "tcp", "ports": [22, "90-80"]})),
            "rules[1].ports[1]: \"90-80\": a range must go up (\"8000-8080\")"
        );
        assert_eq!(
            rule(json!({"action": "allow", "direction": "in", "protocol": "tcp", "ports": [0]})),
            "rules[1].ports[0]: must be a port 1 to 65535 or a range \"8000-8080\", got 0"
        );
        assert_eq!(rule(json!({"direction": "in"})), "rules[1].action: missing (allow, deny, reject)");
        assert_eq!(
            rule(json!({"action": "permit", "direction": "in"})),
            "rules[1].action: must be one of allow, deny, reject, got \"permit\""
        );
        assert_eq!(
            rule(json!({"action": "deny", "direction": "in", "ports": [22]})),
            "rules[1].ports: need \"protocol\": \"tcp\" or \"udp\""
        );
        assert_eq!(
            rule(json!({"action": "deny", "direction": "in", "addresses": ["10.0.0.1/8"]})),
            "rules[1].addresses[0]: \"10.0.0.1/8\": host bits are set after /8"
        );
        assert_eq!(
            rule(json!({"action": "deny", "direction": "in", "addresses": ["10.0.0.0/33"]})),
            "rules[1].addresses[0]: \"10.0.0.0/33\": the prefix length must be 0 to 32"
        );
        assert!(rule(json!({"action": "deny", "direction": "in", "port": 1}))
            .starts_with("rules[1].port: unknown key"));
        assert_eq!(
            err(json!({"default_in": "drop"})),
            "default_in: must be \"allow\" or \"deny\", got \"drop\""
        );
        assert_eq!(err(json!([])), "must be a JSON object");
        let wide = json!({"action": "deny", "direction": "in", "protocol": "tcp",
            "ports": (1..=64).collect::<Vec<u16>>(), "addresses": (0..64).map(|i| format!("10.0.0.{i}")).collect::<Vec<_>>()});
        assert_eq!(
            err(json!({"rules": [wide.clone(), wide]})),
            "rules: 8192 address and port combinations, at most 4096 (iptables takes a rule for each)"
        );
        assert!(RuleSet::from_json(
            &json!({"rules": [{"action": "deny", "direction": "out", "addresses": ["0.0.0.0/0", "::/0"]}]})
        )
        .is_ok());
    }

    #[test]
    fn raw_nft_text_stays_in_tethers_table() {
        assert!(check_nft_body("chain input {\n type filter hook input priority 0; policy accept;\n tcp dport 22 accept comment \"}\" # }\n}\n").is_ok());
        assert!(check_nft_body("chain a { }\n}\ntable ip filter { chain b { } }\n{")
            .unwrap_err()
            .contains("would close"));
        assert!(check_nft_body("}").unwrap_err().contains("would close table inet tether"));
        assert!(check_nft_body("include \"/etc/x\"").unwrap_err().contains("\"include\" is not allowed"));
        assert!(check_nft_body("chain a {").unwrap_err().contains("not closed"));
        let raw = |text: &str| err(json!({"raw": {"backend": "nftables", "text": text}}));
        assert_eq!(
            raw("flush ruleset"),
            "raw.text: line 1: \"ruleset\" is not allowed: the text is the body of table inet tether"
        );
        assert_eq!(
            err(json!({"raw": {"backend": "pf", "text": ""}})),
            "raw.backend: must be \"nftables\" or \"iptables\""
        );
    }

    #[test]
    fn raw_iptables_text_only_appends_to_tethers_chains() {
        assert!(check_iptables_lines(
            "# ssh\n-A TETHER-INPUT -p tcp --dport 22 -j ACCEPT\n\n-A TETHER-OUTPUT -j RETURN"
        )
        .is_ok());
        assert!(check_iptables_lines("-A INPUT -j DROP").unwrap_err().starts_with("line 1: only"));
        assert!(check_iptables_lines("-A TETHER-INPUT -j DROP\nCOMMIT\n*nat")
            .unwrap_err()
            .starts_with("line 2: only"));
        assert!(check_iptables_lines("-F TETHER-INPUT").is_err());
    }

    #[test]
    fn what_blocks_the_broker() {
        let set = |v: Value| RuleSet::from_json(&v).unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let deny_1883 = set(
            json!({"rules": [{"action": "deny", "direction": "out", "protocol": "tcp", "ports": [1883]}]}),
        );
        assert_eq!(deny_1883.blocks_tcp_to(ip, 1883), Some(true));
        assert_eq!(deny_1883.blocks_tcp_to("127.0.0.1".parse().unwrap(), 1883), Some(false));
        assert_eq!(deny_1883.blocks_tcp_to(ip, 443), Some(false));
        let closed = set(json!({"default_out": "deny", "rules": [
            {"action": "allow", "direction": "out", "protocol": "tcp", "ports": [443], "addresses": ["192.0.2.0/24"]}]}));
        assert_eq!(closed.blocks_tcp_to(ip, 443), Some(false));
        assert_eq!(closed.blocks_tcp_to("198.51.100.1".parse().unwrap(), 443), Some(true));
        assert_eq!(set(json!({"raw": {"backend": "nftables", "text": ""}})).blocks_tcp_to(ip, 1), None);
    }
}
