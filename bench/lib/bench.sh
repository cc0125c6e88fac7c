# shellcheck shell=bash disable=SC2034  # work, bins and build are read by the scripts that source this
# What bench/remote and bench/files share. Source it after tests/lib/broker.sh: it makes $work
# (a temporary directory) and, on the way out, ends the step run by in_background and the broker
# ($BROKER_PID) and deletes $work. Then:
#   bench_build [--host-build]        builds tether-agent and tetherctl; sets bins (their
#                                     directory) and build (what they are), prints their sizes
#   ensure_sshd NAME                  installs openssh-server when missing and root (for ssh/scp)
#   in_background CMD...              runs CMD so that Ctrl-C or SIGTERM stops it at once
#   broker_stop                       ends the broker

work=$(mktemp -d)
BROKER_PID="" child=""
cleanup() {
    if [ -n "$child" ]; then
        kill "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    broker_stop
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

broker_stop() {
    if [ -n "$BROKER_PID" ]; then
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    BROKER_PID=""
}

# Long steps run in the background and are waited for, so that Ctrl-C or SIGTERM stops them
# at once (bash runs a trap only when a foreground command ends) and the cleanup ends them.
in_background() {
    local rc=0
    "$@" &
    child=$!
    wait "$child" || rc=$?
    child=""
    return "$rc"
}

# Both binaries: static musl when rustup has the target (what ships is static), else the host's.
bench_build() {
    local host_build=${1:-} host musl note=""
    host=$(rustc -vV | sed -n 's/^host: //p')
    musl=${host%-gnu}-musl
    if [ -n "$host_build" ]; then
        note="--host-build"
    elif ! rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
        note="rustup has no $musl target"
    else
        install_missing musl-gcc:musl-tools || true
        command -v musl-gcc >/dev/null || note="no musl-gcc for ring's C (Debian: musl-tools)"
    fi
    if [ -z "$note" ]; then
        # ring's C and assembly: musl-gcc, the host's gcc against musl's headers.
        env "CC_${musl//-/_}=musl-gcc" cargo build --release --target "$musl" --bin tether-agent --bin tetherctl 2>&1 | tail -1
        bins=target/$musl/release
        build="static musl ($musl)"
    else
        cargo build --release --bin tether-agent --bin tetherctl 2>&1 | tail -1
        bins=target/release
        build="host build ($host), not static musl: $note"
    fi
}

# The header of a run: the build, the broker, the machine and its load, the binaries.
bench_describe() {
    local name=$1 b
    echo "$name: $build; $(mosquitto -h 2>/dev/null | head -1 || true), wss + TLS; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for b in tether-agent tetherctl; do
        echo "  $bins/$b: $(stat -c %s "$bins/$b") bytes, $(file -b "$bins/$b" | grep -o 'static-pie linked\|statically linked\|dynamically linked')"
    done
}

ensure_sshd() {
    if ! [ -x /usr/sbin/sshd ] && ! command -v sshd >/dev/null && [ "$(id -u)" = 0 ]; then
        install_missing sshd:openssh-server || echo "$1: could not install openssh-server"
    fi
}
