# shellcheck shell=bash
# What every shell suite shares: counting checks, the closing line, and installing missing tools.
# Source it; then `suite NAME` starts counting, and `finish` prints "NAME: N passed, N failed"
# (", N skipped" when any) and exits non-zero if a check failed.

suite() {
    SUITE_NAME=$1 SUITE_PASS=0 SUITE_FAIL=0 SUITE_SKIP=0
}
ok() { SUITE_PASS=$((SUITE_PASS + 1)); echo "  ok    $*"; }
bad() { SUITE_FAIL=$((SUITE_FAIL + 1)); echo "  FAIL  $*"; }
skipped() { SUITE_SKIP=$((SUITE_SKIP + 1)); echo "  skip  $*"; }
finish() {
    local line="$SUITE_NAME: $SUITE_PASS passed, $SUITE_FAIL failed"
    [ "$SUITE_SKIP" -gt 0 ] && line+=", $SUITE_SKIP skipped"
    echo "$line"
    [ "$SUITE_FAIL" = 0 ]
    exit
}

# Installs, with apt-get, the Debian package of each COMMAND:PACKAGE whose command is missing
# (as root, or through sudo). A second run installs nothing.
#   install_missing mosquitto:mosquitto mosquitto_sub:mosquitto-clients
install_missing() {
    local spec need=() sudo_=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${spec%%:*}" ] || need+=("${spec#*:}")
    done
    [ "${#need[@]}" -gt 0 ] || return 0
    echo "installing: ${need[*]}"
    [ "$(id -u)" = 0 ] || sudo_=(sudo)
    "${sudo_[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
}
