#!/usr/bin/env bash
# Proof that the ARMv5TE build works: builds armv5te-unknown-linux-musleabi with cross/build
# (Docker-free: Debian's Rust + build-std + zig), then, under `qemu-arm-static -cpu arm926` (a
# true ARMv5 core: any v6+ instruction traps):
#   1. --version            prints the Cargo.toml version
#   2. --arch               prints armv5te-unknown-linux-musleabi
#   3. file                 statically linked 32-bit ARM EABI5 executable
#      size                 stripped, within the 2.5 MiB budget (as bench/size)
#   4. end to end           against a local mosquitto over wss:// (TLS with a CA made here):
#                           a heartbeat whose "machine" is armv5*, the retained status online
#                           with the right arch, and a ping command that round-trips
#   5. unit tests           the library's unit tests built for armv5te and run under arm926
#                           (skipped with TETHER_ARMV5_UNIT_TESTS=0)
#   6. reproducible         the same sources built again at another path give the very same
#                           bytes (so a release's SHA256SUMS can be checked by rebuilding it;
#                           skipped with TETHER_ARMV5_REPRO=0)
# Ends with "armv5: N passed, N failed". Everything it starts is stopped on exit.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
REPO=$(pwd)
# shellcheck source=cross/lib.sh
. cross/lib.sh
TARGET=armv5te-unknown-linux-musleabi
DEVICE=armv5-test

# shellcheck source=tests/lib/suite.sh
. tests/lib/suite.sh
suite armv5

WORK=$(mktemp -d)
PIDS=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ---------------------------------------------------------------------------------------
echo "building $TARGET with cross/build"
start=$(date +%s)
if ! cross/build "$TARGET"; then
    bad "cross/build $TARGET"
    finish
fi
echo "  (built in $(($(date +%s) - start))s)"
VERSION=$(tether_version "$REPO")
BIN=$REPO/dist/tether-agent-$VERSION-$TARGET
arm() { qemu-arm-static -cpu arm926 "$@"; }

# --- 1-3: the binary itself ----------------------------------------------------------------------
out=$(arm "$BIN" --version 2>&1)
if [[ "$out" == *"$VERSION"* ]]; then ok "--version under arm926: $out"; else bad "--version under arm926 printed '$out', expected $VERSION"; fi

out=$(arm "$BIN" --arch 2>&1)
if [ "$out" = "$TARGET" ]; then ok "--arch under arm926: $out"; else bad "--arch under arm926 printed '$out', expected $TARGET"; fi

out=$(file -b "$BIN")
if [[ "$out" == *"ARM, EABI5"* && "$out" == *"statically linked"* ]]; then
    ok "file: $out"
else
    bad "file says '$out', expected a statically linked ARM EABI5 executable"
fi

size=$(stat -c %s "$BIN")
if [ "$size" -le "$TETHER_SIZE_BUDGET" ]; then
    ok "size $size bytes, within the budget of $TETHER_SIZE_BUDGET (bench/size)"
else
    bad "size $size bytes, over the budget of $TETHER_SIZE_BUDGET (bench/size)"
fi

# --- 4: end to end over wss:// -------------------------------------------------------------------
# shellcheck source=tests/lib/broker.sh
. tests/lib/broker.sh
ensure_mosquitto

# Polls the retained message on TOPIC until python3 expression EXPR (over `m`, the parsed JSON)
# holds, for up to SECS seconds. The last message seen is left in $WORK/last.json.
wait_retained() {
    local topic=$1 expr=$2 secs=$3 deadline
    deadline=$(($(date +%s) + secs))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if mosquitto_sub -h 127.0.0.1 -p "$PLAIN" -t "$topic" -C 1 -W 3 > "$WORK/last.json" 2>/dev/null &&
            python3 -c "import json, sys; m = json.load(open(sys.argv[1])); sys.exit(0 if ($expr) else 1)" \
                "$WORK/last.json" 2>/dev/null; then
            return 0
        fi
        sleep 1
    done
    return 1
}

e2e() {
    local hb_pid id
    broker_start "$WORK/broker" || return 1
    PIDS+=("$BROKER_PID")
    PLAIN=$BROKER_PLAIN_PORT

    mkdir -p "$WORK/state"
    cat > "$WORK/agent.json" <<EOF
{"broker": {"url": "wss://localhost:$BROKER_WSS_PORT/", "ca_file": "$BROKER_CA"},
 "device_id": "$DEVICE", "state_dir": "$WORK/state", "heartbeat": {"interval_s": 2}}
EOF
    # Subscribed before the agent starts, so the first heartbeat can't be missed.
    mosquitto_sub -h 127.0.0.1 -p "$PLAIN" -t "tether/$DEVICE/heartbeat" -C 1 -W 120 > "$WORK/heartbeat.json" 2>&1 &
    hb_pid=$!
    PIDS+=("$hb_pid")
    # Started directly, not through the arm function: $! must be qemu itself, not a subshell.
    qemu-arm-static -cpu arm926 "$BIN" --config "$WORK/agent.json" > "$WORK/agent.log" 2>&1 &
    PIDS+=($!)

    if ! wait "$hb_pid"; then
        echo "    no heartbeat on tether/$DEVICE/heartbeat within 120s"
        return 1
    fi
    if ! python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); sys.exit(0 if str(m.get("machine", "")).startswith("armv5") else 1)' \
        "$WORK/heartbeat.json"; then
        echo "    heartbeat's machine is not armv5*: $(head -c 400 "$WORK/heartbeat.json")"
        return 1
    fi
    echo "    heartbeat: machine $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["machine"])' "$WORK/heartbeat.json")"

    if ! wait_retained "tether/$DEVICE/status" \
        "m.get('online') is True and m.get('arch') == '$TARGET'" 30; then
        echo "    retained status is not online with arch $TARGET: $(head -c 400 "$WORK/last.json")"
        return 1
    fi
    echo "    status: $(head -c 200 "$WORK/last.json")"

    id="armv5-$(date +%s)-$$"
    mosquitto_pub -h 127.0.0.1 -p "$PLAIN" -r -q 1 -t "tether/$DEVICE/cmd/ping/$id" -m '{"status":"init"}' || return 1
    if ! wait_retained "tether/$DEVICE/cmd/ping/$id" \
        "m.get('status') == 'successful' and 'version' in m.get('result', {})" 60; then
        echo "    ping $id did not come back successful: $(head -c 400 "$WORK/last.json")"
        return 1
    fi
    echo "    ping: $(head -c 200 "$WORK/last.json")"
}

start=$(date +%s)
if e2e; then
    ok "end to end over wss:// under arm926: heartbeat, status, ping ($(($(date +%s) - start))s)"
else
    bad "end to end over wss:// under arm926 ($(($(date +%s) - start))s)"
    echo "    --- agent log (tail)"
    tail -n 25 "$WORK/agent.log" 2>/dev/null | sed 's/^/    /'
    echo "    --- mosquitto log (tail)"
    tail -n 10 "$WORK/broker/mosquitto.log" 2>/dev/null | sed 's/^/    /'
fi
for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done

# --- 5: the library's unit tests on ARMv5 ---------------------------------------------------------
if [ "${TETHER_ARMV5_UNIT_TESTS:-1}" = 0 ]; then
    skipped "unit tests under arm926 (TETHER_ARMV5_UNIT_TESTS=0)"
else
    start=$(date +%s)
    # Skipped: it reads its own CPU time from /proc/self/stat, which qemu-user fakes (zeros) and
    # finds itself by /proc/self/comm, which is qemu's name; an emulation artifact, not ARMv5's.
    # The build of a cold run takes ~2 min, the tests ~15 s.
    unit_tests() {
        timeout -k 5 "$1" cross/lib-tests "$TARGET" -- --skip metrics::tests::own_process_by_name_and_pidfile \
            > "$WORK/unit.log" 2>&1
    }
    unit_tests 600
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        # qemu-user can deadlock when a multi-threaded program forks: the child hangs in qemu's
        # own locks before exec and the parent waits for it forever (seen once in ~30 runs of the
        # custom-command tests). An emulator bug, not the agent's: a real hang would come again.
        echo "    unit tests timed out: a fork under qemu-user deadlocked? once more"
        grep -E '^test ' "$WORK/unit.log" | tail -2 | sed 's/^/    /'
        pkill -KILL -f "$TARGET/debug/deps/tether-" 2>/dev/null
        unit_tests 300
        rc=$?
    fi
    if [ "$rc" = 0 ]; then
        ok "unit tests under arm926: $(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1 passed/p' "$WORK/unit.log" | tail -1), one skipped ($(($(date +%s) - start))s)"
    else
        bad "unit tests under arm926 ($(($(date +%s) - start))s)"
        grep -E '^(test .* FAILED|failures:|error)|panicked' "$WORK/unit.log" | head -20 | sed 's/^/    /'
        tail -n 15 "$WORK/unit.log" | sed 's/^/    /'
    fi
fi

# --- 6: a rebuild elsewhere is bit for bit the same ------------------------------------------------
if [ "${TETHER_ARMV5_REPRO:-1}" = 0 ]; then
    skipped "reproducible build (TETHER_ARMV5_REPRO=0)"
else
    start=$(date +%s)
    # The working tree's files (committed or not), without build output, in another directory.
    mkdir -p "$WORK/repro"
    git ls-files -z --cached --others --exclude-standard | tar -C "$REPO" --null -T - -cf - | tar -C "$WORK/repro" -xf -
    if (cd "$WORK/repro" && cross/build --no-install "$TARGET") > "$WORK/repro.log" 2>&1; then
        again=$WORK/repro/dist/tether-agent-$VERSION-$TARGET
        if cmp -s "$BIN" "$again"; then
            ok "reproducible: rebuilt in another directory, the same $(stat -c %s "$BIN") bytes ($(($(date +%s) - start))s)"
        else
            bad "reproducible: a rebuild in another directory differs ($(cmp "$BIN" "$again" | head -1))"
        fi
    else
        bad "reproducible: the rebuild failed"
        tail -n 15 "$WORK/repro.log" | sed 's/^/    /'
    fi
fi

finish
