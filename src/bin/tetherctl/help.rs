//! What tetherctl says about itself: `--help`, `help [COMMAND]`, `COMMAND --help`, the usage
//! line of a usage error, and the words shell completion offers all come from the tables here.

pub struct CommandHelp {
    pub name: &'static str,
    /// Arguments after the name, for the usage line.
    pub args: &'static str,
    /// Options of this command alone (connection options go with every command).
    pub options: &'static [&'static str],
    pub about: &'static str,
}

pub const COMMANDS: &[CommandHelp] = &[
    CommandHelp {
        name: "devices",
        args: "[--json]",
        options: &["--json"],
        about: "every device with a retained status or heartbeat: online, age of the last
heartbeat, CPU, memory and first disk used, agent version (kept while the device
is offline), and KEY: the start of the fingerprint of the key the device signs
its answers with (--json: \"fingerprint\", whole). A key met for the first time is
recorded in known_devices; a device whose key differs from the one recorded is
marked CHANGED, with a warning, and devices exits 4. Fails (exit 1) rather than
show a list it cannot know is complete.",
    },
    CommandHelp {
        name: "watch",
        args: "[DEVICE] [--json]",
        options: &["--json"],
        about: "heartbeats and status changes as they arrive (retained ones first, marked
\"(retained)\") until Ctrl-C; --json: one JSON object per line",
    },
    CommandHelp {
        name: "cmd",
        args: "DEVICE OP [--json PARAMS] [--timeout S] [--queue]",
        options: &["--json", "--timeout", "--queue"],
        about: "runs OP on DEVICE and prints its final answer (JSON); PARAMS is a JSON object
of parameters. Progress goes to stderr. Waits S seconds (default 30); then the
command is withdrawn, or with --queue kept (retained) for the device to run
when it comes back, and its topic is printed. A DEVICE that has never reported
(no retained status) is refused at once (exit 67), unless --queue: then the
command waits for it. The request is signed (see -i); when the device's status
presents a key, it must be the one known_devices holds (else exit 4, nothing
sent; a key met for the first time is recorded), and the answer must be signed
by it for this very command (else exit 5: forged, its result not shown). Who
asked, as the device saw it, goes to stderr.",
    },
    CommandHelp {
        name: "cmds",
        args: "DEVICE [--json] [--clear [--pending|--final|--all|ID...]]",
        options: &["--json", "--clear", "--pending", "--final", "--all"],
        about: "the commands retained for DEVICE: pending (sent, not started), executing, and
final (answered, not cleared), oldest first. --clear removes them from the
broker: by default the pending and final ones and any unreadable one, never an
executing one; --pending or --final: only those; --all: executing ones too;
ID... (or OP/ID...): exactly those, whatever their state. Prints what it
cleared; an ID that is not there is an error and nothing is cleared.",
    },
    CommandHelp {
        name: "ops",
        args: "DEVICE [--json]",
        options: &["--json"],
        about: "the ops DEVICE advertises",
    },
    CommandHelp {
        name: "shell",
        args: "DEVICE [-e CHAR]",
        options: &["-e"],
        about: "a login shell on DEVICE, on a terminal, like ssh: end-to-end encrypted (the
broker sees only ciphertext), through the broker alone. The local terminal is
put in raw mode and restored on every way out; its size follows the window.
Escapes after a newline: ~. disconnects, ~? lists them, ~~ sends ~; -e CHAR
changes the escape character, -e none turns them off. Exits with the shell's
exit status (255 if the session ended otherwise).",
    },
    CommandHelp {
        name: "exec",
        args: "DEVICE [-t] [-e CHAR] [--timeout S] -- CMD [ARGS...]",
        options: &["-t", "-e", "--timeout"],
        about: "runs CMD (no shell: wrap it in sh -c '...' for one) on DEVICE like ssh HOST CMD:
stdin goes to it until end of file, its stdout and stderr come back apart, and
its exit status becomes tetherctl's (128+N for signal N; 255 if the session
ended otherwise). Works in pipelines: tar c dir | tetherctl exec dev -- tar x.
-t: on a terminal (raw mode and escapes as for shell). --timeout S: stop it
after S seconds (exit 2).",
    },
    CommandHelp {
        name: "forward",
        args: "DEVICE [LADDR:]LPORT:HOST:HPORT...",
        options: &[],
        about: "listens on LADDR:LPORT (default 127.0.0.1) here and forwards each connection to
HOST:HPORT as seen from DEVICE, like ssh -L; several at once. The device must
allow each target (remote_access.forward.allow; loopback only by default). A
connection the device cannot make is closed here, with the reason on stderr.
Until Ctrl-C.",
    },
    CommandHelp {
        name: "ls",
        args: "DEVICE PATH [--json]",
        options: &["--json"],
        about: "lists directory PATH on DEVICE (or PATH itself when it is not one) like ls -l:
type and mode, owner, group, size, mtime (UTC), name (a link with its text).
Within the device's file_transfer limits (chroot, follow_symlinks). --json: the
entries as the device sent them.",
    },
    CommandHelp {
        name: "logs",
        args: "DEVICE [SOURCE...] [-n N] [-f] [--since TIME] [--grep RE] | DEVICE --list [--json]",
        options: &["-n", "-f", "--since", "--grep", "--list", "--json"],
        about: "prints the lines of the device's logs (default: its system log; --list shows
the sources it offers: its logs.sources config and the built-in syslog, agent,
logread, journal). -n N: the last N lines; --since TIME: lines written from
then on (2026-12-04T10:00:00Z; \"2026-12-04 10:00\" in the device's local time;
or a time ago: 30s, 10m, 2h, 1d, 1w); --grep RE: lines matching the regular
expression. All applied on the device, so only
those lines cross the link. -f: then follow what is written, across rotation
(rename) and truncation, until interrupted. Lines of several sources are
prefixed with the source's name; what happens to a source (missing, rotated)
is told on stderr; exit 1 if a source could not be read.",
    },
    CommandHelp {
        name: "update",
        args: "FLOW.json (DEVICE... | --all | --where TEST[,...]) [--batch N] [--max-failures K] [--json] [--timeout S] | status ID [--json]",
        options: &["--all", "--where", "--batch", "--max-failures", "--json", "--timeout"],
        about: "rolls the update flow in FLOW.json (docs/updates.md) out to the devices named,
all devices (--all), or those whose status or heartbeat passes each TEST:
KEY=VALUE, KEY!=VALUE, KEY<VALUE, <=, >, >= (--where version<1.2.0,arch=armv7;
KEY a dotted path such as custom.firmware; values ordered as versions, 1.10
after 1.9; a device without KEY passes no test), in waves of N (default 10): a wave is sent, then
waited for until each device is final, or offline (its flow stays queued for
it: pending). Once K devices failed, no more waves go. Each request is signed
for its device and each answer checked against the device's key. Shows a
table on a terminal, JSON lines otherwise. `update status ID` shows a rollout
again from the retained states. Exit 0: all successful; 1: some failed or the
rollout stopped; 2: some pending.",
    },
    CommandHelp {
        name: "firewall",
        args: "DEVICE show | apply FILE | revert | confirm [--confirm] [--confirm-s S] [--json] [--timeout S]",
        options: &["--confirm", "--confirm-s", "--json", "--timeout"],
        about: "manages DEVICE's firewall rules, in Tether's own table or chains only
(docs/firewall.md). apply FILE sends the rule set in FILE (JSON; checked here
first, and a warning when it would block this broker); revert goes back to the
rule set before; show prints what is in force, what is pending, and Tether's
rules as the kernel lists them (--json: the device's answer as JSON). A change
must reach the broker again on a fresh connection within S seconds
(--confirm-s, default 60 on the device), or the device restores its previous
rules by itself and the command fails (exit 1). --confirm: the operator must
also send `firewall DEVICE confirm` within that time; apply returns once the
device waits for it.",
    },
    CommandHelp {
        name: "get",
        args: "DEVICE REMOTE [LOCAL|-] [--json] [--timeout S]",
        options: &["--json", "--timeout"],
        about: "copies file REMOTE from DEVICE to LOCAL (default: its name, here; a directory:
its name inside it; -: stdout), end-to-end encrypted. Written to .NAME.tether-part
next to LOCAL, checked against the device's sha256 of the whole file, then
renamed: a mismatch is an error and leaves nothing under LOCAL. A transfer cut
by a broken link resumes from the bytes already here, retried for S seconds
(default 60). Directories are refused (no recursive copy). Progress on a
terminal; --json prints a summary (resumed_from: the bytes already here when
the transfer that finished started).",
    },
    CommandHelp {
        name: "put",
        args: "LOCAL|- DEVICE REMOTE [--json] [--timeout S]",
        options: &["--json", "--timeout"],
        about: "copies file LOCAL (-: stdin, read whole first for its size and sha256) to
REMOTE on DEVICE: written to a temp file there, checked against the sha256,
then renamed over REMOTE, which keeps its old content until then. A transfer
cut by a broken link resumes from what the device holds, retried for S seconds
(default 60). The device's file_transfer limits apply (chroot, allow_overwrite,
max_file_size, free space...); a refusal gives its reason (exit 1).
Directories are refused (no recursive copy), here and on DEVICE. Progress on a
terminal; --json prints a summary (resumed_from: the bytes the device already
held when the transfer that finished started).",
    },
    CommandHelp {
        name: "known-devices",
        args: "[forget DEVICE...]",
        options: &[],
        about: "the device keys recorded so far (DEVICE FINGERPRINT), or forget DEVICE's, so
that the key it presents next is recorded instead: how to accept a device's
new key after checking its fingerprint on the device. Needs no broker.",
    },
    CommandHelp {
        name: "completions",
        args: "bash",
        options: &[],
        about: "prints a bash completion script: commands, options, and device ids
(asked of the broker as you type). Install it with
  tetherctl completions bash > /etc/bash_completion.d/tetherctl
or for yourself: source <(tetherctl completions bash) in ~/.bashrc",
    },
    CommandHelp { name: "help", args: "[COMMAND]", options: &[], about: "this help, or COMMAND's" },
];

/// Connection options that take a file name, and those that take another value.
pub const FILE_OPTIONS: &[&str] =
    &["--ca", "--cert", "--key", "--password-file", "--config", "-i", "--identity", "--known-devices"];
pub const VALUE_OPTIONS: &[&str] =
    &["--broker", "--username", "--proxy", "--topic-root", "--connect-timeout"];

/// Options every command takes: the connection and the output.
pub const COMMON_OPTIONS: &[&str] = &[
    "--broker",
    "--ca",
    "--cert",
    "--key",
    "--username",
    "--password-file",
    "--proxy",
    "--topic-root",
    "--config",
    "--connect-timeout",
    "--identity",
    "--known-devices",
    "--verbose",
    "--help",
];

const HEADER: &str = "tetherctl: look after a Tether fleet through its MQTT broker

usage: tetherctl [OPTIONS] COMMAND [ARGS]
       tetherctl help [COMMAND]     COMMAND --help works too

commands:";

const FOOTER: &str = r#"connection (a flag wins over its environment variable, which wins over the --config file):
  --broker URL[,URL...]  wss://, ws://, mqtts:// or mqtt://; several:  TETHER_BROKER
                         the nodes of one cluster, tried in turn.
  --ca FILE              CA certificate(s) to trust (PEM); default:    TETHER_CA
                         the system's. The broker's certificate is always verified.
  --cert FILE --key FILE client certificate and key (mutual TLS)      TETHER_CERT TETHER_KEY
  --username NAME                                                      TETHER_USERNAME
  --password-file FILE   file holding the password                     TETHER_PASSWORD_FILE
  --proxy URL            HTTP proxy: http://[USER:PASSWORD@]HOST[:PORT] TETHER_PROXY
  --topic-root ROOT      default "tether"                              TETHER_TOPIC_ROOT
  --config FILE          JSON: the agent's own config file works;      TETHER_CONFIG
                         tetherctl takes its "broker" and "topic_root"
  --connect-timeout S    give up connecting after S seconds (default 10)

signing and device keys (flag, then environment, then the --config file's "identity" and
"known_devices"):
  -i, --identity FILE    sign requests with this key: a private key    TETHER_IDENTITY
                         file (ssh-keygen asks for its passphrase), or a
                         .pub whose key is in ssh-agent. Default: the
                         first key in ssh-agent (SSH_AUTH_SOCK) of a type
                         devices accept (ed25519, ECDSA P-256, RSA).
                         Without any, requests go unsigned: devices run
                         ping and heartbeat only, by default.
  --known-devices FILE   the keys of the devices met so far (trust on  TETHER_KNOWN_DEVICES
                         first use, like ssh's known_hosts); default:
                         $XDG_CONFIG_HOME/tether/known_devices, else
                         ~/.config/tether/known_devices

other options:
  -v, --verbose          debug logging (default: warnings; RUST_LOG works too)
  -h, --help             this help
  -V, --version          tetherctl's version

exit status:
  0    success
  1    cmd: the device answered "failed"; devices, ops, cmds: the list could not be
       known complete; or another error
  2    cmd: no final answer within --timeout
  3    could not connect to the broker within --connect-timeout
  4    cmd, devices: a device presents another key than the one known_devices holds
       for it (cmd sent nothing); after checking, accept the new key with
       tetherctl known-devices forget DEVICE
  5    cmd: the answer is not signed by the device's key for this command: rejected
       as forged, its result not shown
  64   bad command line
  67   cmd: the device has never reported (no retained status); see --queue
  78   bad connection settings (broker URL, certificate, key or password file, config
       file), or the broker's certificate failed verification (unknown CA, wrong host
       name, expired)
  130  interrupted (Ctrl-C) before finishing; watch exits 0 on Ctrl-C"#;

pub fn find(name: &str) -> Option<&'static CommandHelp> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// `tetherctl devices [--json]`
pub fn usage(command: &CommandHelp) -> String {
    format!("tetherctl {} {}", command.name, command.args)
}

/// The whole help, or one command's.
pub fn text(command: Option<&CommandHelp>) -> String {
    match command {
        Some(c) => format!(
            "usage: {}\n\n{}\n\nConnection options, environment and exit status: tetherctl help",
            usage(c),
            c.about
        ),
        None => {
            let mut text = HEADER.to_string();
            for c in COMMANDS {
                text += &format!("\n  {} {}\n", c.name, c.args);
                for line in c.about.lines() {
                    text += &format!("      {line}\n");
                }
            }
            format!("{text}\n{FOOTER}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_its_help_and_the_whole_help_lists_them_all() {
        let all = text(None);
        for c in COMMANDS {
            assert!(all.contains(&format!("\n  {} {}\n", c.name, c.args)), "{}", c.name);
            let one = text(find(c.name));
            assert!(one.starts_with(&format!("usage: tetherctl {} ", c.name)), "{one}");
            assert!(c.options.iter().all(|o| c.args.contains(o)), "{}: options in the usage", c.name);
        }
        assert!(all.contains("exit status:") && all.contains("  67 "), "{all}");
        assert!(all.contains("\n  4    ") && all.contains("\n  5    "), "{all}");
    }
}
