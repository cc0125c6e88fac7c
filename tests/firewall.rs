//! The `firewall` op (docs/firewall.md) on the real kernel firewall, for both backends. Each
//! test moves its own thread into a new network namespace (unshare(CLONE_NEWNET)) before it
//! starts anything: Mosquitto, the agent, tetherctl and the tools all run there, on its
//! loopback, and the namespace goes with the last of them. Rules of "another firewall" are put
//! there first and must read byte for byte the same after every apply and revert.
//!
//! Needs root, nftables and iptables (tests/setup-deps installs them); fails saying so without.

mod common;

use common::remote::{text, Setup};
use common::{cmd_topic, secs, status_topic, wait_until, Listener, Sub};
use serde_json::{json, Value};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Nft,
    Ipt,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nftables",
            Backend::Ipt => "iptables",
        }
    }

    /// Tether's rules as the kernel lists them ("" when there are none).
    fn tether_rules(self) -> String {
        match self {
            Backend::Nft => try_sh("nft list table inet tether").unwrap_or_default(),
            Backend::Ipt => ["iptables", "ip6tables"]
                .iter()
                .flat_map(|t| ["TETHER-INPUT", "TETHER-OUTPUT"].map(|c| try_sh(&format!("{t} -w -S {c}"))))
                .map(Result::unwrap_or_default)
                .collect(),
        }
    }

    /// Removes Tether's rules behind the agent's back (as a reboot does).
    fn wipe(self) {
        match self {
            Backend::Nft => drop(sh("nft delete table inet tether")),
            Backend::Ipt => {
                for t in ["iptables", "ip6tables"] {
                    sh(&format!(
                        "{t} -w -D INPUT -j TETHER-INPUT; {t} -w -D OUTPUT -j TETHER-OUTPUT; {t} -w -F TETHER-INPUT; \
                         {t} -w -F TETHER-OUTPUT; {t} -w -X TETHER-INPUT; {t} -w -X TETHER-OUTPUT"
                    ));
                }
            }
        };
        assert_eq!(self.tether_rules(), "");
    }
}

fn try_sh(script: &str) -> Result<String, String> {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("{script}: {}", text(&out.stderr)))
    }
}

fn sh(script: &str) -> String {
    try_sh(script).unwrap_or_else(|e| panic!("{e}"))
}

/// This thread, and all it starts from now on, in a network namespace of its own with its
/// loopback up; another firewall's rules in it.
fn isolate() {
    for tool in ["nft", "iptables", "ip6tables", "iptables-save", "ip6tables-restore", "ip"] {
        assert!(
            try_sh(&format!("command -v {tool}")).is_ok(),
            "{tool} is missing: these tests need nftables and iptables (tests/setup-deps installs them)"
        );
    }
    // SAFETY: unshare changes only this thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {} (these tests need root and network namespaces)",
        std::io::Error::last_os_error()
    );
    sh("ip link set lo up");
    sh("nft add table ip other; nft add chain ip other c '{ type filter hook input priority 10; }'; \
        nft add rule ip other c tcp dport 7 counter drop comment '\"theirs\"'");
    for t in ["iptables", "ip6tables"] {
        sh(&format!(
            "{t} -w -A INPUT -p tcp --dport 9 -j DROP; {t} -w -N OTHER; {t} -w -A OTHER -p udp --dport 9 -j RETURN; \
             {t} -w -A OUTPUT -j OTHER"
        ));
    }
}

/// Everything but Tether's own: the other nft table, the list of tables, and iptables-save
/// for both families without Tether's chains and jumps, comments and counters.
fn others() -> String {
    let mut out = sh("nft list table ip other");
    out += &sh("nft list tables").lines().filter(|l| !l.contains("tether")).collect::<Vec<_>>().join("\n");
    for save in ["iptables-save", "ip6tables-save"] {
        for line in sh(save).lines().filter(|l| !l.starts_with('#') && !l.contains("TETHER")) {
            out.push('\n');
            out.push_str(line.split(" [").next().unwrap_or(line));
        }
    }
    out
}

fn device(name: &str, backend: Backend) -> Setup {
    Setup::with_sections(
        name,
        json!({"firewall": {"backend": backend.name()}, "broker": {"keepalive_s": 5}}),
        Listener::Mqtts,
    )
}

/// `tetherctl firewall DEV ARGS... --json`: exit code, the JSON it printed (Null if none),
/// stderr.
fn firewall(s: &Setup, args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["firewall", s.device.as_str()];
    all.extend_from_slice(args);
    all.push("--json");
    outcome(&s.tetherctl(&all).output().unwrap())
}

/// `firewall`, which must end `successful`: its final state and stderr.
fn succeeds(s: &Setup, args: &[&str]) -> (Value, String) {
    let (code, state, err) = firewall(s, args);
    assert_eq!((code, state["status"].as_str()), (0, Some("successful")), "{args:?}: {state} {err}");
    (state, err)
}

fn outcome(out: &Output) -> (i32, Value, String) {
    let state = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), state, text(&out.stderr))
}

fn ruleset_file(s: &Setup, name: &str, rules: &Value) -> String {
    let path = s.dir.path().join(name);
    std::fs::write(&path, rules.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

fn show(s: &Setup) -> Value {
    let (code, state, err) = firewall(s, &["show"]);
    assert_eq!(code, 0, "show: {state} {err}");
    state["result"].clone()
}

fn benign() -> Value {
    json!({"rules": [
        {"action": "deny", "direction": "in", "protocol": "tcp", "ports": [9999], "comment": "not here"},
        {"action": "allow", "direction": "out", "protocol": "udp", "ports": [53], "addresses": ["10.0.0.0/8", "fd00::/8"]}
    ]})
}

fn broker_port(s: &Setup) -> u16 {
    s.broker.ports.of(Listener::Mqtts)
}

/// A rule set that cuts the device from its broker: new connections to its port dropped.
fn cutting(s: &Setup) -> Value {
    json!({"allow_loopback": false, "rules": [{"action": "deny", "direction": "out", "protocol": "tcp", "ports": [broker_port(s)]}]})
}

fn shows_9999(backend: Backend) -> bool {
    let rules = backend.tether_rules();
    match backend {
        Backend::Nft => rules.contains("tcp dport 9999 drop comment \"not here\""),
        Backend::Ipt => rules.contains("--dport 9999 -m comment --comment \"not here\" -j DROP"),
    }
}

fn kept_listed_survives_a_restart_and_reverts(backend: Backend) {
    isolate();
    let before = others();
    let s = device(&format!("fw-keep-{}", backend.name()), backend);
    let file = ruleset_file(&s, "benign.json", &benign());
    let (_, err) = succeeds(&s, &["apply", &file, "--confirm-s", "10"]);
    assert!(!err.contains("warning"), "{err}");
    assert!(shows_9999(backend), "{}", backend.tether_rules());
    assert_eq!(others(), before);
    let shown = show(&s);
    assert_eq!(shown["ruleset"], benign());
    assert_eq!(shown["pending"], Value::Null);
    assert_eq!(shown["backend"], backend.name());
    assert!(shown["kernel"].as_str().unwrap().contains("9999"), "{shown}");
    let out = s.tetherctl(&["firewall", &s.device, "show"]).output().unwrap();
    let people = text(&out.stdout);
    assert!(
        people.starts_with(&format!(
            "backend: {}   persist: yes\npending: none\nrule set in force:\n",
            backend.name()
        )) && people.contains("  1. deny   in  tcp  ports 9999 from any  # not here\n")
            && people.contains("  2. allow  out udp  ports 53 to 10.0.0.0/8,fd00::/8\n")
            && people.contains("Tether's rules in the kernel:\n"),
        "{people}"
    );
    // Nothing to confirm.
    let (code, state, _) = firewall(&s, &["confirm"]);
    assert_eq!(code, 1);
    assert_eq!(state["reason"], "no firewall change awaits confirmation");

    // Bad input, through tetherctl and straight to the device: refused, nothing changed.
    let kernel = backend.tether_rules();
    let bad = ruleset_file(
        &s,
        "bad.json",
        &json!({"rules": [{"action": "allow", "direction": "in", "protocol": "tcp", "ports": ["90-80"]}]}),
    );
    let (code, _, err) = firewall(&s, &["apply", &bad]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rules[0].ports[0]: \"90-80\": a range must go up") && err.contains("nothing was sent"),
        "{err}"
    );
    let raw_text = match backend {
        Backend::Nft => "chain c { }\n}\ntable ip other {\nchain c {",
        Backend::Ipt => "-A INPUT -j DROP",
    };
    for (ruleset, expected) in [
        (
            json!({"rules": [{"action": "allow", "direction": "up"}]}),
            "ruleset.rules[0].direction: must be one of in, out, got \"up\"",
        ),
        (json!({"raw": {"backend": backend.name(), "text": raw_text}}), "ruleset.raw.text: line "),
        (json!({"default_out": "deny", "rules": "all"}), "ruleset.rules: must be a list of rules"),
    ] {
        let params = json!({"action": "apply", "ruleset": ruleset}).to_string();
        let out = s.tetherctl(&["cmd", &s.device, "firewall", "--json", &params]).output().unwrap();
        let (code, state, err) = outcome(&out);
        assert_eq!(code, 1, "{state} {err}");
        assert!(state["reason"].as_str().unwrap().starts_with(expected), "{state}");
    }
    assert_eq!(backend.tether_rules(), kernel);
    assert_eq!(others(), before);

    // A reboot loses the kernel's rules: the agent puts them back at start.
    let mut s = s;
    s.agent.term();
    backend.wipe();
    let mut status = Sub::new(&s.broker, &status_topic(&s.device));
    s.agent.restart();
    status.expect_online(&s.device, secs(15));
    assert!(wait_until(secs(5), || shows_9999(backend)), "not applied again at start:\n{}", s.agent.log());
    assert_eq!(others(), before);

    // Revert: back to no rules at all.
    succeeds(&s, &["revert", "--confirm-s", "10"]);
    assert_eq!(backend.tether_rules(), "");
    assert_eq!(others(), before);
    let shown = show(&s);
    assert_eq!((shown["ruleset"].clone(), shown["previous"].clone()), (Value::Null, benign()));

    // Raw text for experts, inside Tether's table or chains.
    let raw = match backend {
        Backend::Nft => json!({"raw": {"backend": "nftables",
            "text": "chain input {\n type filter hook input priority 0; policy accept;\n tcp dport 4444 drop # }\n}"}}),
        Backend::Ipt => {
            json!({"raw": {"backend": "iptables", "text": "-A TETHER-INPUT -p tcp --dport 4444 -j DROP",
            "text6": "-A TETHER-INPUT -p tcp --dport 4444 -j DROP"}})
        }
    };
    let file = ruleset_file(&s, "raw.json", &raw);
    let (_, err) = succeeds(&s, &["apply", &file, "--confirm-s", "10"]);
    assert!(err.contains("raw rules: tetherctl cannot tell whether they block the broker"), "{err}");
    let kernel = backend.tether_rules();
    assert_eq!(kernel.matches("4444").count(), if backend == Backend::Nft { 1 } else { 2 }, "{kernel}");
    assert_eq!(others(), before);
    succeeds(&s, &["revert", "--confirm-s", "10"]);
    assert_eq!(backend.tether_rules(), "");
    assert_eq!(others(), before);

    // firewall.disable, on SIGHUP: changes refused, show still answers.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(s.agent.config_path()).unwrap()).unwrap();
    config["firewall"]["disable"] = json!(true);
    s.agent.write_config(config);
    s.agent.signal(libc::SIGHUP);
    assert!(wait_until(secs(5), || s.agent.log_contains("config reloaded")), "{}", s.agent.log());
    let (code, state, _) = firewall(&s, &["apply", &file]);
    assert_eq!(code, 1, "{state}");
    assert_eq!(state["reason"], "the firewall is not managed on this device (firewall.disable)");
    assert_eq!(show(&s)["ruleset"], Value::Null);
    assert_eq!(backend.tether_rules(), "");
}

fn cutting_the_broker_is_reverted(backend: Backend) {
    isolate();
    let before = others();
    let s = device(&format!("fw-cut-{}", backend.name()), backend);
    let mut status = Sub::new(&s.broker, &status_topic(&s.device));
    status.expect_online(&s.device, secs(10));
    let file = ruleset_file(&s, "cut.json", &cutting(&s));
    let started = Instant::now();
    let (code, state, err) = firewall(&s, &["apply", &file, "--confirm-s", "10"]);
    let took = started.elapsed();
    assert!(err.contains("warning: this rule set blocks the broker"), "{err}");
    assert_eq!((code, state["status"].as_str()), (1, Some("failed")), "{state} {err}");
    let reason = state["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("not confirmed within 10 s: no broker round trip on a fresh connection"),
        "{reason}"
    );
    assert!(took < secs(10 + 8), "the answer took {took:?}");
    status.expect_offline(&s.device, secs(1));
    status.expect_online(&s.device, secs(10));
    assert_eq!(backend.tether_rules(), "");
    assert_eq!(others(), before);
    assert_eq!(show(&s)["ruleset"], Value::Null);
}

/// `tetherctl firewall DEV apply FILE` left running (it waits up to 90 s for the answer), once
/// the device has put the rules in the kernel.
fn applied_in_background(s: &Setup, file: &str, backend: Backend) -> std::process::Child {
    let apply = s
        .tetherctl(&["firewall", &s.device, "apply", file, "--confirm-s", "60", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = broker_port(s).to_string();
    assert!(
        wait_until(secs(10), || backend.tether_rules().contains(&port)),
        "not applied:\n{}",
        s.agent.log()
    );
    apply
}

fn a_kill_9_after_the_apply_is_reverted_at_start(backend: Backend) {
    isolate();
    let before = others();
    let mut s = device(&format!("fw-kill-{}", backend.name()), backend);
    let file = ruleset_file(&s, "cut.json", &cutting(&s));
    let apply = applied_in_background(&s, &file, backend);
    let port = broker_port(&s).to_string();
    s.agent.kill9();
    assert!(backend.tether_rules().contains(&port), "the rules went with the agent");
    let journal: Value =
        serde_json::from_slice(&std::fs::read(s.agent.state_dir().join("firewall.json")).unwrap()).unwrap();
    assert!(journal["pending"]["id"].is_string(), "{journal}");
    s.agent.restart();
    // Reverted before the agent connected.
    let connected_again =
        || s.agent.log().rsplit("restarting the agent").next().unwrap().contains("connected to");
    assert!(wait_until(secs(15), connected_again), "not back:\n{}", s.agent.log());
    assert_eq!(backend.tether_rules(), "");
    assert_eq!(others(), before);
    let log = s.agent.log();
    let restart = log.rfind("restarting the agent").unwrap();
    let (reverted, connected) =
        (log[restart..].find("restored at its start"), log[restart..].find("connected"));
    assert!(reverted.is_some() && connected.is_some() && reverted < connected, "{}", &log[restart..]);
    let out = common::wait_child_output(&mut { apply }, secs(30));
    let (code, state, err) = outcome(&out);
    assert_eq!(code, 1, "{state} {err}");
    assert!(
        state["reason"].as_str().unwrap().starts_with("the agent restarted before the change was confirmed"),
        "{state}"
    );

    // A clean stop does not leave a pending change in force either.
    let apply = applied_in_background(&s, &file, backend);
    s.agent.term();
    assert_eq!(backend.tether_rules(), "");
    assert_eq!(others(), before);
    s.agent.restart();
    let (code, state, err) = outcome(&common::wait_child_output(&mut { apply }, secs(30)));
    assert_eq!(code, 1, "{state} {err}");
    assert!(
        state["reason"].as_str().unwrap().starts_with("the agent stopped before the change was confirmed"),
        "{state}"
    );
}

fn an_explicit_confirm_keeps_and_its_absence_reverts(backend: Backend) {
    isolate();
    let before = others();
    let s = device(&format!("fw-confirm-{}", backend.name()), backend);
    let file = ruleset_file(&s, "benign.json", &benign());
    let (code, _, err) = firewall(&s, &["apply", &file, "--confirm", "--confirm-s", "20"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("tetherctl firewall {} confirm", s.device)), "{err}");
    let pending = show(&s)["pending"].clone();
    assert_eq!(pending["confirm"], true, "{pending}");
    let (code, state, err) = firewall(&s, &["confirm"]);
    assert_eq!(code, 0, "{state} {err}");
    assert_eq!(state["result"]["confirmed"], pending["id"]);
    let shown = show(&s);
    assert_eq!((shown["pending"].clone(), shown["ruleset"].clone()), (Value::Null, benign()));
    assert!(shows_9999(backend));

    // Another change, never confirmed: the benign rules come back by themselves.
    let other = json!({"default_in": "deny", "allow_loopback": false, "rules": [{"action": "allow", "direction": "in", "protocol": "tcp", "ports": [broker_port(&s)]}]});
    let file = ruleset_file(&s, "other.json", &other);
    let (code, _, err) = firewall(&s, &["apply", &file, "--confirm", "--confirm-s", "6"]);
    assert_eq!(code, 0, "{err}");
    let topic = err.lines().last().map(str::to_string).unwrap_or_default();
    let id = show(&s)["pending"]["id"].as_str().unwrap().to_string();
    assert!(!shows_9999(backend));
    // One change at a time.
    for args in [vec!["revert"], vec!["apply", &file]] {
        let (code, state, _) = firewall(&s, &args);
        assert_eq!(code, 1, "{state}");
        let reason = state["reason"].as_str().unwrap();
        assert!(reason.starts_with(&format!("a firewall change is pending (command {id})")), "{reason}");
    }
    let mut answers = Sub::new(&s.broker, &cmd_topic(&s.device, "firewall", &id));
    let state = answers
        .expect_json(&cmd_topic(&s.device, "firewall", &id), "failed", secs(15), |v| v["status"] == "failed");
    assert!(
        state["reason"].as_str().unwrap().contains("no confirm came from the operator"),
        "{state} ({topic})"
    );
    assert!(shows_9999(backend), "{}", backend.tether_rules());
    let shown = show(&s);
    assert_eq!((shown["pending"].clone(), shown["ruleset"].clone()), (Value::Null, benign()));
    assert_eq!(others(), before);
}

/// The config names another backend: the next apply puts the rules there and takes Tether's off
/// the old one; a change that is not confirmed puts them back exactly where they were, and a
/// revert goes back to the previous rule set on the backend now in use.
#[test]
fn a_rule_set_applied_after_the_backend_changed_moves_there_and_nothing_stays_behind() {
    isolate();
    let before = others();
    let s = device("fw-move", Backend::Nft);
    let file = ruleset_file(&s, "benign.json", &benign());
    succeeds(&s, &["apply", &file, "--confirm-s", "10"]);
    assert!(shows_9999(Backend::Nft) && !shows_9999(Backend::Ipt));

    let mut config: Value = serde_json::from_slice(&std::fs::read(s.agent.config_path()).unwrap()).unwrap();
    config["firewall"]["backend"] = json!("iptables");
    s.agent.write_config(config);
    s.agent.signal(libc::SIGHUP);
    let reloaded = wait_until(secs(10), || s.agent.log().contains("config reloaded"));
    assert!(reloaded, "{}", s.agent.log());
    // Not confirmed: back on nftables, nothing on iptables.
    let (code, _, err) = firewall(&s, &["apply", &file, "--confirm", "--confirm-s", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(shows_9999(Backend::Ipt) && !shows_9999(Backend::Nft), "moved while pending");
    let reverted = wait_until(secs(20), || show(&s)["pending"].is_null());
    assert!(reverted && shows_9999(Backend::Nft), "{}", s.agent.log());
    assert!(!shows_9999(Backend::Ipt), "{}", Backend::Ipt.tether_rules());

    let other = json!({"rules": [{"action": "deny", "direction": "in", "protocol": "tcp", "ports": [8888]}]});
    let other_file = ruleset_file(&s, "other.json", &other);
    succeeds(&s, &["apply", &other_file, "--confirm-s", "10"]);
    assert!(Backend::Ipt.tether_rules().contains("8888"), "{}", Backend::Ipt.tether_rules());
    assert_eq!(Backend::Nft.tether_rules(), "", "nothing of Tether's left on the old backend");
    assert_eq!(show(&s)["backend"], "iptables");

    succeeds(&s, &["revert", "--confirm-s", "10"]);
    assert!(shows_9999(Backend::Ipt) && !Backend::Ipt.tether_rules().contains("8888"));
    assert_eq!(Backend::Nft.tether_rules(), "");
    assert_eq!(others(), before);
}

#[test]
fn nftables_rules_are_kept_listed_survive_a_restart_and_revert() {
    kept_listed_survives_a_restart_and_reverts(Backend::Nft);
}

#[test]
fn iptables_rules_are_kept_listed_survive_a_restart_and_revert() {
    kept_listed_survives_a_restart_and_reverts(Backend::Ipt);
}

#[test]
fn nftables_rules_that_cut_the_broker_are_reverted() {
    cutting_the_broker_is_reverted(Backend::Nft);
}

#[test]
fn iptables_rules_that_cut_the_broker_are_reverted() {
    cutting_the_broker_is_reverted(Backend::Ipt);
}

#[test]
fn nftables_a_kill_9_after_the_apply_is_reverted_at_start() {
    a_kill_9_after_the_apply_is_reverted_at_start(Backend::Nft);
}

#[test]
fn iptables_a_kill_9_after_the_apply_is_reverted_at_start() {
    a_kill_9_after_the_apply_is_reverted_at_start(Backend::Ipt);
}

#[test]
fn nftables_an_explicit_confirm_keeps_and_its_absence_reverts() {
    an_explicit_confirm_keeps_and_its_absence_reverts(Backend::Nft);
}

#[test]
fn iptables_an_explicit_confirm_keeps_and_its_absence_reverts() {
    an_explicit_confirm_keeps_and_its_absence_reverts(Backend::Ipt);
}
