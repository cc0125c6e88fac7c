# shellcheck shell=bash disable=SC2034  # BROKER_* are read by the scripts that source this
# Shell helpers shared by the demo, the shell suites and the benchmarks: a test CA, and a
# Mosquitto with a plain listener (for local subscribers) and a wss listener, on free ports.
# Source it, then: broker_start DIR  → sets BROKER_PLAIN_PORT, BROKER_WSS_PORT, BROKER_CA.

# shellcheck source=tests/lib/suite.sh
. "$(dirname "${BASH_SOURCE[0]}")/suite.sh"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A CA and a server certificate for localhost / 127.0.0.1, valid for a few days.
make_test_certs() {
    local dir=$1
    mkdir -p "$dir"
    # P-256: quick to verify, also for an ARM agent under qemu.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj "/CN=Tether test CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$dir/server.ext"
    openssl x509 -req -days 7 -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
    chmod 644 "$dir"/*.pem "$dir"/*.key
}

# Starts mosquitto in the background; its pid goes to BROKER_PID, its log to DIR/mosquitto.log.
broker_start() {
    local dir=$1
    make_test_certs "$dir"
    BROKER_PLAIN_PORT=$(free_port)
    BROKER_WSS_PORT=$(free_port)
    BROKER_CA=$dir/ca.pem
    # Mosquitto 2.0 started as root drops to user "mosquitto" unless told to stay.
    local user_line=""
    [ "$(id -u)" = 0 ] && user_line="user root"
    cat > "$dir/mosquitto.conf" <<CONF
$user_line
per_listener_settings false
allow_anonymous true
persistence false
log_dest file $dir/mosquitto.log
set_tcp_nodelay true
listener $BROKER_PLAIN_PORT 127.0.0.1
listener $BROKER_WSS_PORT 127.0.0.1
protocol websockets
certfile $dir/server.pem
keyfile $dir/server.key
CONF
    "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$dir/mosquitto.conf" 2>>"$dir/mosquitto.stderr" &
    BROKER_PID=$!
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_WSS_PORT") 2>/dev/null &&
            (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PLAIN_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "mosquitto did not start; see $dir/mosquitto.log" >&2
    return 1
}

# Installs mosquitto and its clients when missing (Debian/Ubuntu).
ensure_mosquitto() {
    install_missing mosquitto:mosquitto mosquitto_sub:mosquitto-clients python3:python3 openssl:openssl
}
