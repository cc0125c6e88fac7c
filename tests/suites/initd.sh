#!/usr/bin/env bash
# Drives the SysV init script init.d/tether-agent against the real agent, in a temporary root
# (DAEMON, PIDFILE, LOGFILE and DEFAULTS_FILE come from the environment, as the script allows; the
# defaults file is the shipped init.d/tether-agent.default with the config path changed):
#   static   `shellcheck -s sh` is clean; the LSB header; the example defaults file
#   debian   `bash init.d/tether-agent ...`, Debian's start-stop-daemon (package dpkg)
#   busybox  `busybox sh init.d/tether-agent ...`, with a directory of busybox applet links first
#            in PATH (start-stop-daemon, readlink, sleep, cat, ...) and busybox sh as the shell
#            that execs the agent
# Each mode: start/status/pidfile, start twice, reload (SIGHUP reaches the agent: its log says
# "reload"), force-reload, broken config (start/reload/restart refuse, a running agent is kept),
# restart, stop (waits, removes the pidfile), kill -9 (status 1), a pidfile whose pid now belongs
# to another program, ENABLED=no, a daemon that ignores SIGTERM (a stand-in script: SIGKILL after
# STOP_TIMEOUT), LOG_TARGET=syslog through a fake logger, LOGFILE rotated at LOG_MAX_KB (lines whole,
# none lost across the rotation), and starting without start-stop-daemon.
# Ends with "initd: N passed, N failed".
#   TETHER_AGENT_BIN   the agent to test (default target/debug/tether-agent, built when missing)
# check evals its conditions (single-quoted on purpose), which shellcheck cannot follow:
# shellcheck disable=SC2016,SC2034,SC2317
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
REPO=$(pwd)
SCRIPT=$REPO/init.d/tether-agent
EXAMPLE_DEFAULTS=$REPO/init.d/tether-agent.default

# shellcheck source=tests/lib/suite.sh
. tests/lib/suite.sh
suite initd
# check DESCRIPTION CONDITION: one test; CONDITION is shell code, evaluated here and now.
check() { if eval "$2"; then ok "$1"; else bad "$1"; fi; }

# --- tools: installed only when missing ----------------------------------------------------------
install_missing busybox:busybox shellcheck:shellcheck start-stop-daemon:dpkg

# --- the agent under test ------------------------------------------------------------------------
BIN=${TETHER_AGENT_BIN:-target/debug/tether-agent}
if [ ! -x "$BIN" ] && [ -z "${TETHER_AGENT_BIN:-}" ]; then
    echo "building tether-agent"
    cargo build --bin tether-agent || {
        bad "cargo build --bin tether-agent"
        finish
    }
fi
if [ ! -x "$BIN" ]; then
    bad "the agent $BIN exists"
    finish
fi
# The agent logs a line containing "reload" on SIGHUP. A stand-in without that string (an agent
# still being written) gets those two checks skipped, not failed; every other check still runs.
agent_logs_reload=1
grep -aqi reload "$BIN" || agent_logs_reload=0

T=$(mktemp -d /tmp/tether-initd.XXXXXX)
sleeper=""
# started_from DIR [PROC]: the pids (other than this shell) whose command line mentions DIR/. A
# process that exits between the listing of PROC (/proc) and the read of its cmdline is skipped
# without a word: its redirection is silenced too (a `2>/dev/null` after `<` came too late).
started_from() {
    local d p
    for d in "${2:-/proc}"/[0-9]*; do
        p=${d##*/}
        [ "$p" = "$$" ] && continue
        if tr '\0' ' ' 2>/dev/null <"$d/cmdline" | grep -qF "$1/"; then echo "$p"; fi
    done
}
cleanup() {
    # Whatever still runs from the temporary root: agents, stand-ins, fake loggers.
    local p
    for p in $(started_from "$T"); do kill -9 "$p" 2>/dev/null; done
    [ -n "$sleeper" ] && kill -9 "$sleeper" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

# --- process helpers -----------------------------------------------------------------------------
# alive PID: exists and is not a zombie (in a container nothing may reap orphans).
alive() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ $s != Z* && $s != X* && $s != x* ]]
}
dead() { ! alive "${1:-0}"; }
# agent_count: live processes whose executable is this mode's copy of the agent.
agent_count() {
    local d n=0
    for d in /proc/[0-9]*; do
        [ "$(readlink "$d/exe" 2>/dev/null)" = "$AGENT" ] && alive "${d#/proc/}" && n=$((n + 1))
    done
    echo "$n"
}
# is_agent PID: alive, and the agent itself (not a shell, a wrapper or logger).
is_agent() { [ -n "$1" ] && alive "$1" && [ "$(readlink "/proc/$1/exe")" = "$AGENT" ]; }
# wait_until SECONDS CONDITION: polls the shell code every 0.1 s.
wait_until() {
    local n=$(($1 * 10))
    until eval "$2"; do
        [ "$n" -le 0 ] && return 1
        n=$((n - 1))
        sleep 0.1
    done
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
pidfile_pid() { cat "$PIDFILE" 2>/dev/null; }
says() { grep -qi -- "$1" <<<"$out"; }
reload_lines() { grep -ci reload "$1" 2>/dev/null || true; }

# initd [VAR=VALUE...] ACTION: runs the init script in this mode, with a clean environment as init
# gives it; sets $out (its stdout and stderr, also shown indented) and $rc.
initd() {
    local vars=()
    while [ $# -gt 1 ]; do
        vars+=("$1")
        shift
    done
    # shellcheck disable=SC2086  # MODE_SHELL is "bash" or "busybox sh"
    out=$(env -i PATH="$MODE_PATH" DEFAULTS_FILE="$DEFAULTS" DAEMON="$AGENT" PIDFILE="$PIDFILE" \
        LOGFILE="$LOG" LOG_TARGET=file WRAPPER_SH="$MODE_SH" "${vars[@]}" \
        $MODE_SHELL "$SCRIPT" "$1" 2>&1)
    rc=$?
    # shellcheck disable=SC2001
    [ -n "$out" ] && sed 's/^/        | /' <<<"$out"
    return 0
}

# write_config [STATE_DIR]: a valid config (the state_dir of this root by default).
write_config() {
    printf '{"broker":{"url":"mqtt://127.0.0.1:1"},"device_id":"t1","state_dir":"%s","log_level":"info"}\n' \
        "${1:-$ROOT/var/lib/tether}" >"$CONFIG"
}
break_config() { printf '{"broker": {"url": ' >"$CONFIG"; }
# write_defaults yes|no: the shipped example, with ENABLED and the config path of this root.
write_defaults() {
    sed -e "s|^ENABLED=.*|ENABLED=\"$1\"|" \
        -e "s|^DAEMON_ARGS=.*|DAEMON_ARGS=\"--config $CONFIG\"|" "$EXAMPLE_DEFAULTS" >"$DEFAULTS"
}

# --- static checks -------------------------------------------------------------------------------
echo "== initd: static"
check "shellcheck -s sh init.d/tether-agent is clean" 'shellcheck -s sh "$SCRIPT"'
header=$(sed -n '/^### BEGIN INIT INFO/,/^### END INIT INFO/p' "$SCRIPT")
check "LSB header: Provides, Required-Start/Stop, Default-Start/Stop, descriptions" '
    grep -q "^# Provides: *tether-agent$" <<<"$header" &&
    grep -q "^# Required-Start: .*\$network" <<<"$header" &&
    grep -q "^# Required-Start: .*\$remote_fs" <<<"$header" &&
    grep -q "^# Required-Stop: .*\$network" <<<"$header" &&
    grep -q "^# Default-Start: *2 3 4 5$" <<<"$header" &&
    grep -q "^# Default-Stop: *0 1 6$" <<<"$header" &&
    grep -q "^# Short-Description: ." <<<"$header" &&
    grep -q "^# Description: ." <<<"$header"'
check "the script is executable and starts with #!/bin/sh" \
    '[ -x "$SCRIPT" ] && [ "$(head -n1 "$SCRIPT")" = "#!/bin/sh" ]'
# systemd reads the defaults file too (EnvironmentFile=): comments and KEY="value" lines only.
check "the example defaults file: ENABLED and DAEMON_ARGS set, plain KEY=\"value\" lines only" '
    grep -q "^ENABLED=\"yes\"$" "$EXAMPLE_DEFAULTS" &&
    grep -q "^DAEMON_ARGS=\"--config /etc/tether/agent.json\"$" "$EXAMPLE_DEFAULTS" &&
    ! grep -Ev "^(#.*|[A-Z_]+=\"[^\"\$\`]*\"|)$" "$EXAMPLE_DEFAULTS"'

# A pid listed, then gone before its cmdline is read; and one started from the temporary root.
mkdir -p "$T/fakeproc/4242" "$T/fakeproc/4243"
printf 'agent\0--config\0%s/etc/agent.json\0' "$T" >"$T/fakeproc/4243/cmdline"
check "cleanup: a process that vanished while listed is skipped quietly, the test's own is found" \
    '[ "$(started_from "$T" "$T/fakeproc" 2>&1)" = 4243 ]'

# --- behaviour, once per mode --------------------------------------------------------------------
run_mode() {
    MODE=$1
    ROOT=$T/$MODE
    mkdir -p "$ROOT"/usr/bin "$ROOT"/etc/default "$ROOT"/etc/tether "$ROOT"/var/run \
        "$ROOT"/var/log "$ROOT"/var/lib/tether "$ROOT"/fakelog
    # A copy, so that a concurrent cargo build cannot swap the binary under a running test.
    cp "$BIN" "$ROOT/usr/bin/tether-agent"
    AGENT=$(readlink -f "$ROOT/usr/bin/tether-agent")
    PIDFILE=$ROOT/var/run/tether-agent.pid
    LOG=$ROOT/var/log/tether-agent.log
    CONFIG=$ROOT/etc/tether/agent.json
    DEFAULTS=$ROOT/etc/default/tether-agent
    write_config
    write_defaults yes

    local pid pid2 before t0 t1 lpid bb=$ROOT/bb a
    case $MODE in
    debian)
        MODE_SHELL=bash
        MODE_SH=/bin/sh
        MODE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        ;;
    busybox)
        mkdir -p "$bb"
        for a in $(busybox --list); do ln -sf "$(command -v busybox)" "$bb/$a"; done
        MODE_SHELL="busybox sh"
        MODE_SH=$bb/sh
        MODE_PATH=$bb:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        ;;
    esac
    echo "== initd: $MODE ($MODE_SHELL)"
    case $MODE in
    debian) check "start-stop-daemon in PATH is Debian's" \
        'env -i PATH="$MODE_PATH" start-stop-daemon --version 2>&1 | grep -q Debian' ;;
    busybox) check "start-stop-daemon in PATH is busybox's" \
        '[ "$(env -i PATH="$MODE_PATH" busybox sh -c "command -v start-stop-daemon")" = "$bb/start-stop-daemon" ]' ;;
    esac

    initd status
    check "status, never started: exit 3" '[ "$rc" = 3 ]'

    # start
    initd start
    pid=$(pidfile_pid)
    check "start: exit 0" '[ "$rc" = 0 ]'
    check "start: the pidfile holds the agent's own pid (not a shell's)" 'is_agent "$pid"'
    check "start: exactly one agent runs" '[ "$(agent_count)" = 1 ]'
    check "start: the agent's stderr goes to LOGFILE" 'wait_until 5 "[ -s \"\$LOG\" ]"'
    initd status
    check "status, running: exit 0, names the pid" '[ "$rc" = 0 ] && says "$pid"'

    # start again: a no-op
    initd start
    check "start when running: exit 0, says already running" '[ "$rc" = 0 ] && says "already running"'
    check "start when running: the same pid, still one agent" \
        '[ "$(pidfile_pid)" = "$pid" ] && [ "$(agent_count)" = 1 ]'

    # reload: SIGHUP, which the agent logs
    sleep 0.5 # the agent's signal handlers are in place
    before=$(reload_lines "$LOG")
    initd reload
    check "reload: exit 0" '[ "$rc" = 0 ]'
    if [ "$agent_logs_reload" = 1 ]; then
        check "reload: the agent got SIGHUP (a new line with \"reload\" in its log)" \
            'wait_until 5 "[ \"\$(reload_lines \"\$LOG\")\" -gt \"\$before\" ]"'
    else
        skipped "reload: the agent got SIGHUP ($BIN has no reload logging yet)"
    fi
    check "reload: the same agent still runs" 'is_agent "$pid"'
    initd force-reload
    check "force-reload: exit 0, the same agent" '[ "$rc" = 0 ] && [ "$(pidfile_pid)" = "$pid" ] && is_agent "$pid"'

    # a broken config: reload and restart refuse, the running agent is kept
    break_config
    initd reload
    check "reload, broken config: exit 6, says the config check failed" \
        '[ "$rc" = 6 ] && says "configuration check failed"'
    initd restart
    check "restart, broken config: fails, says so, the same agent still runs" \
        '[ "$rc" != 0 ] && says "configuration check failed" && [ "$(pidfile_pid)" = "$pid" ] && is_agent "$pid"'
    write_config

    # restart
    initd restart
    pid2=$(pidfile_pid)
    check "restart: exit 0, a new agent in the pidfile, the old one gone, one agent" \
        '[ "$rc" = 0 ] && [ "$pid2" != "$pid" ] && is_agent "$pid2" && dead "$pid" && [ "$(agent_count)" = 1 ]'

    # stop
    t0=$(now_ms)
    initd stop
    t1=$(now_ms)
    check "stop: exit 0, the agent exited on SIGTERM in $((t1 - t0)) ms (no SIGKILL)" \
        '[ "$rc" = 0 ] && ! says SIGKILL'
    check "stop: the agent is gone when stop returns, no agent runs" 'dead "$pid2" && [ "$(agent_count)" = 0 ]'
    check "stop: the pidfile is removed" '[ ! -e "$PIDFILE" ]'
    initd status
    check "status, stopped: exit 3" '[ "$rc" = 3 ]'
    initd stop
    check "stop, not running: exit 0" '[ "$rc" = 0 ]'
    initd reload
    check "reload, not running: exit 7" '[ "$rc" = 7 ]'
    initd try-restart
    check "try-restart, not running: exit 0, starts nothing" \
        '[ "$rc" = 0 ] && [ "$(agent_count)" = 0 ] && [ ! -e "$PIDFILE" ]'

    # killed: dead, but the pidfile exists
    initd start
    pid=$(pidfile_pid)
    kill -9 "$pid" 2>/dev/null
    wait_until 5 'dead "$pid"'
    initd status
    check "status after kill -9: exit 1 (dead, the pidfile is left)" '[ "$rc" = 1 ] && [ -f "$PIDFILE" ]'
    initd start
    pid2=$(pidfile_pid)
    check "start over the stale pidfile: exit 0, a new agent in the pidfile" \
        '[ "$rc" = 0 ] && [ "$pid2" != "$pid" ] && is_agent "$pid2"'
    initd stop

    # a pidfile whose pid now belongs to another program
    sleep 300 &
    sleeper=$!
    echo "$sleeper" >"$PIDFILE"
    initd status
    check "status, pid reused by another program: not running (exit 1)" '[ "$rc" = 1 ]'
    initd stop
    check "stop, pid reused by another program: exit 0, leaves it alone, removes the pidfile" \
        '[ "$rc" = 0 ] && alive "$sleeper" && [ ! -e "$PIDFILE" ]'
    echo "$sleeper" >"$PIDFILE"
    initd start
    pid=$(pidfile_pid)
    check "start, pid reused by another program: starts the agent, the other program lives" \
        '[ "$rc" = 0 ] && is_agent "$pid" && alive "$sleeper"'
    initd stop
    kill -9 "$sleeper" 2>/dev/null
    wait "$sleeper" 2>/dev/null
    sleeper=""

    # a broken config: start refuses
    break_config
    initd start
    check "start, broken config: fails, says the config check failed" \
        '[ "$rc" != 0 ] && says "configuration check failed"'
    check "start, broken config: no agent, no pidfile" '[ "$(agent_count)" = 0 ] && [ ! -e "$PIDFILE" ]'
    # a state_dir the agent cannot write in (sysfs takes no files, not even root's)
    write_config /sys
    initd start
    check "start, state_dir not writable: exit 6, the check names state_dir, no agent" \
        '[ "$rc" = 6 ] && says "state_dir: /sys: cannot write in it" && [ "$(agent_count)" = 0 ]'
    write_config

    # ENABLED=no
    write_defaults no
    initd start
    check "ENABLED=no: start exits 0 and says it is disabled" '[ "$rc" = 0 ] && says disabled'
    check "ENABLED=no: no agent, no pidfile" '[ "$(agent_count)" = 0 ] && [ ! -e "$PIDFILE" ]'
    write_defaults yes

    # not installed; an unknown action
    initd DAEMON="$ROOT/usr/bin/missing" start
    check "start, DAEMON missing: exit 5" '[ "$rc" = 5 ]'
    initd frobnicate
    check "unknown action: exit 2 and the usage" '[ "$rc" = 2 ] && says usage'

    # a daemon that ignores SIGTERM is SIGKILLed after STOP_TIMEOUT
    cat >"$ROOT/usr/bin/stubborn-agent" <<'EOF'
#!/bin/sh
case " $* " in *" --check-config "*) exit 0 ;; esac
trap '' TERM
echo "stubborn stand-in started" >&2
while :; do sleep 1; done
EOF
    chmod +x "$ROOT/usr/bin/stubborn-agent"
    initd DAEMON="$ROOT/usr/bin/stubborn-agent" start
    pid=$(pidfile_pid)
    check "SIGTERM ignored: the stand-in started" '[ "$rc" = 0 ] && alive "$pid"'
    sleep 0.3
    t0=$(now_ms)
    initd DAEMON="$ROOT/usr/bin/stubborn-agent" STOP_TIMEOUT=2 stop
    t1=$(now_ms)
    check "SIGTERM ignored: stop sends SIGKILL after STOP_TIMEOUT=2 ($((t1 - t0)) ms), exit 0" \
        '[ "$rc" = 0 ] && says SIGKILL && [ $((t1 - t0)) -ge 2000 ] && [ $((t1 - t0)) -lt 8000 ]'
    check "SIGTERM ignored: the process is gone, the pidfile removed" 'dead "$pid" && [ ! -e "$PIDFILE" ]'

    # LOG_TARGET=syslog: a fake logger, first in PATH, gets the agent's output through the fifo
    cat >"$ROOT/fakelog/logger" <<EOF
#!/bin/sh
echo "\$*" >"$ROOT/fakelog/args"
echo \$\$ >"$ROOT/fakelog/pid"
exec cat >>"$ROOT/fakelog/syslog.txt"
EOF
    chmod +x "$ROOT/fakelog/logger"
    local mode_path=$MODE_PATH
    MODE_PATH=$ROOT/fakelog:$MODE_PATH
    initd LOG_TARGET=syslog start
    pid=$(pidfile_pid)
    check "LOG_TARGET=syslog: start exit 0, the pidfile holds the agent (not logger, not a shell)" \
        '[ "$rc" = 0 ] && is_agent "$pid"'
    check "LOG_TARGET=syslog: logger runs with -t tether-agent" \
        'wait_until 3 "grep -q -- \"-t tether-agent\" \"\$ROOT/fakelog/args\" 2>/dev/null"'
    check "LOG_TARGET=syslog: the agent's output reaches logger" \
        'wait_until 5 "[ -s \"\$ROOT/fakelog/syslog.txt\" ]"'
    sleep 0.5
    initd LOG_TARGET=syslog reload
    if [ "$agent_logs_reload" = 1 ]; then
        check "LOG_TARGET=syslog: the agent's \"reload\" line reaches logger" \
            'wait_until 5 "grep -qi reload \"\$ROOT/fakelog/syslog.txt\""'
    else
        skipped "LOG_TARGET=syslog: the agent's \"reload\" line reaches logger (no reload logging yet)"
    fi
    lpid=$(cat "$ROOT/fakelog/pid" 2>/dev/null)
    initd LOG_TARGET=syslog stop
    check "LOG_TARGET=syslog: stop exit 0, the agent is gone" '[ "$rc" = 0 ] && dead "$pid"'
    check "LOG_TARGET=syslog: logger exits with the agent" 'wait_until 3 "dead \"\$lpid\""'
    MODE_PATH=$mode_path

    # LOGFILE kept under LOG_MAX_KB: a stand-in writes 100 numbered lines (about 6 KiB)
    cat >"$ROOT/usr/bin/chatty-agent" <<'EOF'
#!/bin/sh
case " $* " in *" --check-config "*) exit 0 ;; esac
i=1
while [ "$i" -le 100 ]; do
    echo "chatty line $i, one of a hundred that make more than a KiB"
    i=$((i + 1))
done
echo "chatty done" >&2
while :; do sleep 1; done
EOF
    chmod +x "$ROOT/usr/bin/chatty-agent"
    rm -f "$LOG" "$LOG.1"
    initd DAEMON="$ROOT/usr/bin/chatty-agent" LOG_MAX_KB=1 start
    pid=$(pidfile_pid)
    check "LOG_MAX_KB=1: start exit 0, the pidfile holds the stand-in (not the rotating shell)" \
        '[ "$rc" = 0 ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = chatty-agent ]'
    check "LOG_MAX_KB=1: its stdout and stderr reach LOGFILE" 'wait_until 5 "grep -q \"chatty done\" \"\$LOG\""'
    check "LOG_MAX_KB=1: LOGFILE was rotated to LOGFILE.1; neither is above 1 KiB and a line" \
        '[ -s "$LOG.1" ] && [ "$(wc -c <"$LOG")" -le 1100 ] && [ "$(wc -c <"$LOG.1")" -le 1100 ]'
    check "LOG_MAX_KB=1: every line whole, none lost between LOGFILE.1 and LOGFILE, up to the last" '
        ! grep -hqv "^chatty \(line [0-9]*, one of a hundred that make more than a KiB\|done\)$" "$LOG.1" "$LOG" &&
        cat "$LOG.1" "$LOG" | sed -n "s/^chatty line \([0-9]*\),.*/\1/p" |
            awk "NR > 1 && \$1 != prev + 1 { bad = 1 } { prev = \$1 } END { exit bad || prev != 100 }"'
    initd DAEMON="$ROOT/usr/bin/chatty-agent" stop
    check "LOG_MAX_KB=1: stop exit 0; the rotating shell ends with the daemon" \
        '[ "$rc" = 0 ] && dead "$pid" && wait_until 3 "[ -z \"\$(started_from \"\$ROOT\")\" ]"'
    initd LOG_MAX_KB=0 start
    pid=$(pidfile_pid)
    check "LOG_MAX_KB=0: the agent appends to LOGFILE itself, no rotating shell" \
        '[ "$rc" = 0 ] && is_agent "$pid" && wait_until 5 "grep -q . \"\$LOG\"" &&
        [ "$(readlink "/proc/$pid/fd/2")" = "$LOG" ]'
    initd stop

    # no start-stop-daemon at all
    initd START_STOP_DAEMON=none start
    pid=$(pidfile_pid)
    check "without start-stop-daemon: start exit 0, the pidfile holds the agent" \
        '[ "$rc" = 0 ] && is_agent "$pid"'
    initd START_STOP_DAEMON=none stop
    check "without start-stop-daemon: stop exit 0, the agent is gone" '[ "$rc" = 0 ] && dead "$pid"'

    check "end of $MODE: no agent left running" '[ "$(agent_count)" = 0 ]'
}

run_mode debian
run_mode busybox
finish
