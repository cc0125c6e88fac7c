//! The kernel side: a rule set translated to an `nft -f` script that (re)creates `table inet
//! tether` alone, in one transaction, or to `iptables-restore --noflush` input that rewrites
//! only the chains TETHER-INPUT and TETHER-OUTPUT and the one jump to each from INPUT and
//! OUTPUT. Translating is pure (unit tested); running the tools blocks, so the loop calls
//! `apply` on a worker (and at start, before connecting).
//!
//! An `allow` lets a packet go on to whatever else the system has (nftables: `accept` ends
//! only this table's chain; iptables: `RETURN` to the built-in chain), so Tether never opens
//! what another firewall closes; `deny` drops, `reject` rejects. Packets of established
//! connections, and IPv6 neighbour discovery, are always let through, and loopback traffic
//! unless the rule set says `allow_loopback: false`: rules govern new connections.

use super::rules::{Action, Backend, Direction, Net, Policy, Protocol, Rule, RuleSet};
use crate::fsutil::error_text;
use crate::runner::{self, End, Output, Program};

pub const NFT_TABLE: &str = "inet tether";
pub const IPT_CHAINS: [(&str, &str); 2] = [("INPUT", "TETHER-INPUT"), ("OUTPUT", "TETHER-OUTPUT")];
/// iptables waits this long at most for the xtables lock another program holds, rather than
/// for ever (the agent applies rules at start, before it connects).
const WAIT: &str = "-w";
const WAIT_S: &str = "10";
/// Chain priority of Tether's base chains (nftables' `filter`).
const NFT_PRIORITY: &str = "filter";

const ND_TYPES: &str = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert";

/// The `nft -f` script that makes `table inet tether` hold `set`, or removes it (None): the
/// table is declared, deleted and made again in the same transaction, so it is never seen
/// half-made and nothing else is touched.
pub fn nft_script(set: Option<&RuleSet>) -> String {
    let mut script = format!("table {NFT_TABLE}\ndelete table {NFT_TABLE}\n");
    let body = match set {
        None => return script,
        Some(RuleSet::Raw { text, .. }) => text.clone(),
        Some(RuleSet::Policy(policy)) => nft_body(policy),
    };
    script.push_str(&format!("table {NFT_TABLE} {{\n{body}\n}}\n"));
    script
}

fn nft_body(policy: &Policy) -> String {
    let mut body = String::new();
    for (direction, chain, hook, default, iface) in [
        (Direction::In, "input", "input", policy.default_in, "iifname"),
        (Direction::Out, "output", "output", policy.default_out, "oifname"),
    ] {
        let verdict = if default == Action::Allow { "accept" } else { "drop" };
        body.push_str(&format!(
            "\tchain {chain} {{\n\t\ttype filter hook {hook} priority {NFT_PRIORITY}; policy {verdict};\n\
             \t\tct state established,related accept\n\t\ticmpv6 type {{ {ND_TYPES} }} accept\n"
        ));
        if policy.allow_loopback {
            body.push_str(&format!("\t\t{iface} \"lo\" accept\n"));
        }
        for rule in policy.rules.iter().filter(|r| r.direction == direction) {
            for line in nft_rule(rule) {
                body.push_str(&format!("\t\t{line}\n"));
            }
        }
        body.push_str("\t}\n");
    }
    body
}

/// One rule as nft rules: one per address family when it names addresses of both.
fn nft_rule(rule: &Rule) -> Vec<String> {
    let (iface, peer) = match rule.direction {
        Direction::In => ("iifname", "saddr"),
        Direction::Out => ("oifname", "daddr"),
    };
    let verdict = match rule.action {
        Action::Allow => "accept",
        Action::Deny => "drop",
        Action::Reject => "reject",
    };
    let mut lines = Vec::new();
    for (family, nets) in families(&rule.addresses) {
        let mut parts = Vec::new();
        if let Some(name) = &rule.interface {
            parts.push(format!("{iface} \"{name}\""));
        }
        if let Some(v4) = family {
            let nets: Vec<String> = nets.iter().map(Net::text).collect();
            parts.push(format!("{} {peer} {}", if v4 { "ip" } else { "ip6" }, nft_set(&nets)));
        }
        let l4 = match rule.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => match family {
                Some(true) => "icmp",
                Some(false) => "ipv6-icmp",
                None => "{ icmp, ipv6-icmp }",
            },
            Protocol::Any => "",
        };
        if rule.ports.is_empty() {
            if !l4.is_empty() {
                parts.push(format!("meta l4proto {l4}"));
            }
        } else {
            let ports: Vec<String> = rule
                .ports
                .iter()
                .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
                .collect();
            parts.push(format!("{l4} dport {}", nft_set(&ports)));
        }
        parts.push(verdict.to_string());
        if let Some(comment) = &rule.comment {
            parts.push(format!("comment \"{comment}\""));
        }
        lines.push(parts.join(" "));
    }
    lines
}

fn nft_set(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        _ => format!("{{ {} }}", items.join(", ")),
    }
}

/// The addresses split by family: `[(None, [])]` for any address, else `Some(is_v4)` with the
/// addresses of that family.
fn families(addresses: &[Net]) -> Vec<(Option<bool>, Vec<Net>)> {
    if addresses.is_empty() {
        return vec![(None, Vec::new())];
    }
    [true, false]
        .into_iter()
        .map(|v4| (Some(v4), addresses.iter().filter(|n| n.is_v4() == v4).copied().collect::<Vec<_>>()))
        .filter(|(_, nets)| !nets.is_empty())
        .collect()
}

/// What the iptables side holds now, for one family: how many jumps to each Tether chain the
/// built-in chains hold, and whether the chains exist (`iptables -S` output).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IptState {
    pub jumps: [usize; 2],
    pub chains: [bool; 2],
}

impl IptState {
    pub fn read(listing: &str) -> IptState {
        let mut state = IptState::default();
        for (i, (builtin, chain)) in IPT_CHAINS.iter().enumerate() {
            let jump = format!("-A {builtin} -j {chain}");
            state.jumps[i] = listing.lines().filter(|l| l.trim() == jump).count();
            state.chains[i] = listing.lines().any(|l| l.trim() == format!("-N {chain}"));
        }
        state
    }

    fn is_empty(&self) -> bool {
        self == &IptState::default()
    }
}

/// `iptables-restore --noflush` input for one family (`v4`): Tether's chains made to hold
/// `set` with exactly one jump to each, first in INPUT and OUTPUT; or, for None, the jumps and
/// chains removed. None when there is nothing to do (nothing of Tether's there to remove).
pub fn iptables_script(set: Option<&RuleSet>, v4: bool, now: &IptState) -> Option<String> {
    if set.is_none() && now.is_empty() {
        return None;
    }
    let mut script = String::from("*filter\n");
    for (_, chain) in IPT_CHAINS {
        script.push_str(&format!(":{chain} - [0:0]\n-F {chain}\n"));
    }
    for (i, (builtin, chain)) in IPT_CHAINS.iter().enumerate() {
        let keep = usize::from(set.is_some());
        for _ in keep..now.jumps[i] {
            script.push_str(&format!("-D {builtin} -j {chain}\n"));
        }
        if keep == 1 && now.jumps[i] == 0 {
            script.push_str(&format!("-I {builtin} 1 -j {chain}\n"));
        }
    }
    match set {
        None => {
            for (_, chain) in IPT_CHAINS {
                script.push_str(&format!("-X {chain}\n"));
            }
        }
        Some(RuleSet::Raw { text, text6, .. }) => {
            let lines = if v4 { text } else { text6 };
            for line in lines.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                script.push_str(line);
                script.push('\n');
            }
        }
        Some(RuleSet::Policy(policy)) => script.push_str(&iptables_rules(policy, v4)),
    }
    script.push_str("COMMIT\n");
    Some(script)
}

fn iptables_rules(policy: &Policy, v4: bool) -> String {
    let mut out = String::new();
    for ((_, chain), direction, default, iface) in [
        (IPT_CHAINS[0], Direction::In, policy.default_in, "-i"),
        (IPT_CHAINS[1], Direction::Out, policy.default_out, "-o"),
    ] {
        out.push_str(&format!("-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"));
        if policy.allow_loopback {
            out.push_str(&format!("-A {chain} {iface} lo -j RETURN\n"));
        }
        if !v4 {
            for kind in [
                "neighbour-solicitation",
                "neighbour-advertisement",
                "router-solicitation",
                "router-advertisement",
            ] {
                out.push_str(&format!("-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j RETURN\n"));
            }
        }
        for rule in policy.rules.iter().filter(|r| r.direction == direction) {
            for line in iptables_rule(rule, v4) {
                out.push_str(&format!("-A {chain} {line}\n"));
            }
        }
        if default != Action::Allow {
            out.push_str(&format!("-A {chain} -j DROP\n"));
        }
    }
    out
}

/// One rule as iptables rules of one family: one per address and port (range); none when
/// it names addresses of the other family only.
fn iptables_rule(rule: &Rule, v4: bool) -> Vec<String> {
    let (iface, peer) = match rule.direction {
        Direction::In => ("-i", "-s"),
        Direction::Out => ("-o", "-d"),
    };
    let target = match rule.action {
        Action::Allow => "-j RETURN",
        Action::Deny => "-j DROP",
        Action::Reject => "-j REJECT",
    };
    let nets: Vec<Option<Net>> = if rule.addresses.is_empty() {
        vec![None]
    } else {
        let nets: Vec<Option<Net>> =
            rule.addresses.iter().filter(|n| n.is_v4() == v4).map(|n| Some(*n)).collect();
        if nets.is_empty() {
            return Vec::new();
        }
        nets
    };
    let proto = match rule.protocol {
        Protocol::Tcp => Some("tcp"),
        Protocol::Udp => Some("udp"),
        Protocol::Icmp if v4 => Some("icmp"),
        Protocol::Icmp => Some("ipv6-icmp"),
        Protocol::Any => None,
    };
    let ports: Vec<Option<String>> = if rule.ports.is_empty() {
        vec![None]
    } else {
        rule.ports
            .iter()
            .map(|(lo, hi)| Some(if lo == hi { lo.to_string() } else { format!("{lo}:{hi}") }))
            .collect()
    };
    let mut lines = Vec::new();
    for net in &nets {
        for port in &ports {
            let mut parts = Vec::new();
            if let Some(name) = &rule.interface {
                parts.push(format!("{iface} {name}"));
            }
            if let Some(net) = net {
                parts.push(format!("{peer} {}", net.text()));
            }
            if let Some(proto) = proto {
                parts.push(format!("-p {proto}"));
            }
            if let Some(port) = port {
                parts.push(format!("--dport {port}"));
            }
            if let Some(comment) = &rule.comment {
                parts.push(format!("-m comment --comment \"{comment}\""));
            }
            parts.push(target.to_string());
            lines.push(parts.join(" "));
        }
    }
    lines
}

/// The backend to use: `nftables` or `iptables` as configured, or for `auto` nftables when
/// `nft` works, else iptables when `iptables` works. Quick enough for the event loop: neither
/// tool is asked to wait for a lock.
pub fn detect(configured: &str) -> Result<Backend, String> {
    match configured {
        "nftables" => Ok(Backend::Nftables),
        "iptables" => Ok(Backend::Iptables),
        _ if run("nft", &["list", "tables"], None).is_ok() => Ok(Backend::Nftables),
        _ if iptables_works(&run("iptables", &["-S", "OUTPUT"], None)) => Ok(Backend::Iptables),
        _ => Err("no firewall backend: neither `nft list tables` nor `iptables -S` works here".into()),
    }
}

/// Whether `iptables -S` ran, or would have but for the xtables lock another program holds
/// (legacy iptables refuses at once without `-w`; applying waits for it, on a worker).
fn iptables_works(listed: &Result<String, String>) -> bool {
    match listed {
        Ok(_) => true,
        Err(why) => why.contains("xtables lock"),
    }
}

/// Puts `set` in force on `backend` (None: removes Tether's rules), touching nothing else.
pub fn apply(backend: Backend, set: Option<&RuleSet>) -> Result<(), String> {
    if let Some(raw) = set.and_then(RuleSet::raw_backend).filter(|b| *b != backend) {
        return Err(format!(
            "the rule set is raw {} text, the backend here is {}",
            raw.name(),
            backend.name()
        ));
    }
    match backend {
        Backend::Nftables => run("nft", &["-f", "-"], Some(&nft_script(set))).map(drop),
        Backend::Iptables => {
            for (v4, list, restore) in
                [(true, "iptables", "iptables-restore"), (false, "ip6tables", "ip6tables-restore")]
            {
                if !v4 && !has_ipv6() {
                    continue;
                }
                let now = IptState::read(&run(list, &[WAIT, WAIT_S, "-S"], None)?);
                if let Some(script) = iptables_script(set, v4, &now) {
                    run(restore, &[WAIT, WAIT_S, "--noflush"], Some(&script))?;
                }
            }
            Ok(())
        }
    }
}

/// What the kernel holds of Tether's rules, as the backend lists them ("" when none).
pub fn list(backend: Backend) -> String {
    match backend {
        Backend::Nftables => run("nft", &["list", "table", "inet", "tether"], None).unwrap_or_default(),
        Backend::Iptables => {
            let mut out = String::new();
            for program in ["iptables", "ip6tables"].into_iter().filter(|p| *p == "iptables" || has_ipv6()) {
                for (_, chain) in IPT_CHAINS {
                    if let Ok(text) = run(program, &[WAIT, WAIT_S, "-S", chain], None) {
                        out.push_str(&text);
                    }
                }
            }
            out
        }
    }
}

/// Whether the kernel has IPv6 (a device built without it has no ip6tables to fill).
fn has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Runs a tool, with `input` on its stdin; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let argv: Vec<String> = std::iter::once(program).chain(args.iter().copied()).map(String::from).collect();
    let tool = Program {
        stdin: input.map(str::as_bytes),
        // Dies with the agent: a change cut short must not land after the next start has put
        // the previous rules back.
        die_with_caller: true,
        ..Program::new(&argv, Output::StdoutAndStderr { max_bytes: usize::MAX })
    };
    let finished = runner::run(&tool).map_err(|e| format!("cannot run {program}: {}", error_text(&e)))?;
    let status = match finished.end {
        End::Exited(status) if status.success() => {
            return Ok(String::from_utf8_lossy(&finished.stdout).into_owned())
        }
        End::Exited(status) => runner::describe(status),
        End::TimedOut | End::Stopped => "stopped".into(),
    };
    let stderr = String::from_utf8_lossy(&finished.stderr);
    let stderr: String = stderr.trim().chars().take(2000).collect();
    Err(format!("{program} {} failed ({status}): {stderr}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(v: serde_json::Value) -> RuleSet {
        RuleSet::from_json(&v).unwrap()
    }

    #[test]
    fn iptables_holding_its_lock_is_still_iptables() {
        let held = "iptables -S OUTPUT failed (exited with 4): Another app is currently holding the \
                    xtables lock. Perhaps you want to use the -w option?";
        assert!(iptables_works(&Err(held.into())));
        assert!(iptables_works(&Ok("-P OUTPUT ACCEPT\n".into())));
        let missing = "cannot run iptables: No such file or directory (os error 2)";
        assert!(!iptables_works(&Err(missing.into())));
        let no_kernel = "iptables -S OUTPUT failed (exited with 3): iptables v1.8.7 (legacy): can't \
                         initialize iptables table `filter': Table does not exist";
        assert!(!iptables_works(&Err(no_kernel.into())));
    }

    #[test]
    fn nft_makes_tethers_table_alone() {
        assert_eq!(nft_script(None), "table inet tether\ndelete table inet tether\n");
        let script = nft_script(Some(&set(json!({"default_in": "deny", "rules": [
            {"action": "allow", "direction": "in", "protocol": "tcp", "ports": [22, "8000-8080"],
             "addresses": ["10.0.0.0/8", "fd00::/8"], "comment": "ssh"},
            {"action": "reject", "direction": "out", "protocol": "icmp"},
            {"action": "deny", "direction": "out", "interface": "eth1"}]}))));
        assert_eq!(
            script,
            "table inet tether\ndelete table inet tether\ntable inet tether {\n\
             \tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\
             \t\tct state established,related accept\n\
             \t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept\n\
             \t\tiifname \"lo\" accept\n\
             \t\tip saddr 10.0.0.0/8 tcp dport { 22, 8000-8080 } accept comment \"ssh\"\n\
             \t\tip6 saddr fd00::/8 tcp dport { 22, 8000-8080 } accept comment \"ssh\"\n\
             \t}\n\
             \tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n\
             \t\tct state established,related accept\n\
             \t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept\n\
             \t\toifname \"lo\" accept\n\
             \t\tmeta l4proto { icmp, ipv6-icmp } reject\n\
             \t\toifname \"eth1\" drop\n\
             \t}\n\n}\n"
        );
        let raw = nft_script(Some(&set(json!({"raw": {"backend": "nftables", "text": "chain x { }"}}))));
        assert!(raw.ends_with("table inet tether {\nchain x { }\n}\n"), "{raw}");
    }

    #[test]
    fn iptables_rewrites_tethers_chains_and_one_jump_each() {
        let rules = set(json!({"default_out": "deny", "allow_loopback": false, "rules": [
            {"action": "allow", "direction": "out", "protocol": "tcp", "ports": [443, "1000-2000"], "addresses": ["192.0.2.1"]},
            {"action": "deny", "direction": "in", "protocol": "udp", "addresses": ["2001:db8::/32"]}]}));
        let fresh = iptables_script(Some(&rules), true, &IptState::default()).unwrap();
        assert_eq!(
            fresh,
            "*filter\n:TETHER-INPUT - [0:0]\n-F TETHER-INPUT\n:TETHER-OUTPUT - [0:0]\n-F TETHER-OUTPUT\n\
             -I INPUT 1 -j TETHER-INPUT\n-I OUTPUT 1 -j TETHER-OUTPUT\n\
             -A TETHER-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n\
             -A TETHER-OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n\
             -A TETHER-OUTPUT -d 192.0.2.1 -p tcp --dport 443 -j RETURN\n\
             -A TETHER-OUTPUT -d 192.0.2.1 -p tcp --dport 1000:2000 -j RETURN\n\
             -A TETHER-OUTPUT -j DROP\nCOMMIT\n"
        );
        let open = iptables_script(Some(&set(json!({}))), true, &IptState::default()).unwrap();
        assert!(open.contains("-A TETHER-INPUT -i lo -j RETURN\n-A TETHER-OUTPUT -m conntrack"), "{open}");
        let v6 = iptables_script(Some(&rules), false, &IptState::default()).unwrap();
        assert!(v6.contains("-A TETHER-INPUT -s 2001:db8::/32 -p udp -j DROP\n"), "{v6}");
        assert!(!v6.contains("192.0.2.1"), "{v6}");
        let listing = "-P INPUT ACCEPT\n-N TETHER-INPUT\n-N TETHER-OUTPUT\n-A INPUT -j TETHER-INPUT\n\
                       -A INPUT -j TETHER-INPUT\n-A OUTPUT -j TETHER-OUTPUT\n-A TETHER-INPUT -j DROP\n";
        let now = IptState::read(listing);
        assert_eq!(now, IptState { jumps: [2, 1], chains: [true, true] });
        let again = iptables_script(Some(&rules), true, &now).unwrap();
        assert!(again.contains("-D INPUT -j TETHER-INPUT\n") && !again.contains("-I "), "{again}");
        assert_eq!(
            iptables_script(None, true, &now).unwrap(),
            "*filter\n:TETHER-INPUT - [0:0]\n-F TETHER-INPUT\n:TETHER-OUTPUT - [0:0]\n-F TETHER-OUTPUT\n\
             -D INPUT -j TETHER-INPUT\n-D INPUT -j TETHER-INPUT\n-D OUTPUT -j TETHER-OUTPUT\n\
             -X TETHER-INPUT\n-X TETHER-OUTPUT\nCOMMIT\n"
        );
        assert_eq!(iptables_script(None, true, &IptState::default()), None);
    }

    #[test]
    fn a_raw_rule_set_runs_on_its_own_backend_only() {
        let raw = set(json!({"raw": {"backend": "iptables", "text": "-A TETHER-INPUT -j DROP"}}));
        assert!(apply(Backend::Nftables, Some(&raw)).unwrap_err().contains("raw iptables text"));
    }
}
