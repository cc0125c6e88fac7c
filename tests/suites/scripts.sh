#!/usr/bin/env bash
# Every shell script of the project is shellcheck clean: the ones git tracks whose first line
# names sh or bash, and the sourced libraries (which carry a `shellcheck shell=` directive).
# The init script is checked as POSIX sh by tests/suites/initd.sh, so here too (its shebang).
# Ends with "scripts: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=tests/lib/suite.sh
. tests/lib/suite.sh
suite scripts
install_missing shellcheck:shellcheck

while IFS= read -r script; do
    if out=$(shellcheck -x "$script" 2>&1); then
        ok "$script"
    else
        bad "$script"
        printf '    %s\n' "${out//$'\n'/$'\n'    }"
    fi
done < <(git ls-files | while IFS= read -r f; do
    [ -f "$f" ] || continue
    if head -n 1 "$f" | grep -qE '^#!.*[/ ](ba)?sh$' || head -n 5 "$f" | grep -q '^# shellcheck shell='; then
        echo "$f"
    fi
done)

finish
