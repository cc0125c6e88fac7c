#!/usr/bin/env bash
# Checks the Yocto layer meta-agent/ (no oe-core and no build here: see check 10):
#   1. tether-agent-crates.inc is exactly what meta-agent/scripts/update-crates-inc makes of Cargo.lock
#   2. every crates.io package of Cargo.lock is in it with its exact sha256, and nothing else
#      (read independently of the generator; also proven to catch a stale or edited file)
#   3. LIC_FILES_CHKSUM's md5 is the md5 of LICENSE, and LICENSE is Cargo.toml's license
#   4. both recipes' version (PV, from the file name) is Cargo.toml's version
#   5. oelint-adv reports nothing on the layer's .bb/.bbappend/.inc/.conf files
#   6. tether-agent-bin's tune -> binary mapping covers the six targets of cross/, and only them
#   7. the files the recipes install exist (init.d/ script and defaults, layer files) and the
#      sample agent.json passes the agent's own --check-config
#   8. meta-agent/scripts/update-bin-checksums pins every target's binary of the version
#   9. conf/layer.conf declares the collection, its dependency and the releases
#  10. bitbake itself (the `bb` package PyPI's bitbake-setup ships, no oe-core) parses the layer
#      and both recipes with stand-ins for oe-core's classes, and tether-agent-bin's
#      fetch/unpack/compile/install run on a fake dist/ (meta-agent/tests/bitbake-check.py)
# Ends with "meta-agent: N passed, N failed".
#   OELINT_ADV          oelint-adv command to use (default: the one on PATH, installed with pip
#                       when missing)
#   TETHER_AGENT_BIN    agent binary for check 7 (default target/debug/tether-agent, built when missing)
#   BITBAKE_LIB         directory holding bitbake's `bb` package for check 10 (default: bitbake-setup
#                       installed with pip into target/meta-agent/ when missing)
# shellcheck disable=SC2016  # single-quoted patterns match bitbake's ${...} literally
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
REPO=$(pwd)
LAYER=$REPO/meta-agent
RECIPES=$LAYER/recipes-core/tether-agent
CRATES_INC=$RECIPES/tether-agent-crates.inc
REGEN="meta-agent/scripts/update-crates-inc"
OELINT_VERSION=9.11.2
BITBAKE_SETUP_VERSION=2.19.0

# shellcheck source=tests/lib/suite.sh
. tests/lib/suite.sh
suite meta-agent

T=$(mktemp -d /tmp/tether-meta-agent.XXXXXX)
trap 'rm -rf "$T"' EXIT

command -v python3 >/dev/null 2>&1 || { bad "python3 is installed (the layer's scripts need it)"; finish; }

cargo_version=$(python3 - "$REPO/Cargo.toml" <<'EOF'
import re, sys
section = None
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line.startswith("["):
        section = line
    elif section == "[package]":
        m = re.match(r'^version\s*=\s*"([^"]+)"', line)
        if m:
            print(m.group(1))
            break
EOF
)
cargo_license=$(sed -n 's/^license *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)

# --- 1. the generated crates .inc is up to date ------------------------------------------------
if python3 "$REPO/$REGEN" --lock "$REPO/Cargo.lock" --stdout >"$T/crates.inc" 2>"$T/regen.err"; then
    if diff -u "$CRATES_INC" "$T/crates.inc" >"$T/crates.diff"; then
        ok "tether-agent-crates.inc is what $REGEN makes of Cargo.lock"
    else
        sed -n '1,40s/^/    /p' "$T/crates.diff"
        bad "tether-agent-crates.inc is stale: run $REGEN (and commit it with Cargo.lock)"
    fi
else
    cat "$T/regen.err"
    bad "$REGEN failed on Cargo.lock"
fi

# --- 2. Cargo.lock and the .inc agree, read without the generator ------------------------------
# lock_crates LOCK: "name version sha256" of each crates.io package, sorted.
lock_crates() {
    awk '
        function flush() {
            if (name != "" && source ~ /^"(registry\+https:\/\/github\.com\/rust-lang\/crates\.io-index|sparse\+https:\/\/index\.crates\.io\/)/)
                print name, version, (sum == "" ? "NO-CHECKSUM" : sum)
            name = version = source = sum = ""
        }
        /^\[\[package\]\]$/ { flush(); inpkg = 1; next }
        /^\[/ { flush(); inpkg = 0; next }
        inpkg && /^name = /     { name = $3; gsub(/"/, "", name) }
        inpkg && /^version = /  { version = $3; gsub(/"/, "", version) }
        inpkg && /^source = /   { source = $3 }
        inpkg && /^checksum = / { sum = $3; gsub(/"/, "", sum) }
        END { flush() }
    ' "$1" | sort
}
# inc_crates INC: the same triples as the .inc lists them; anything malformed becomes a line
# that cannot match.
inc_crates() {
    local inc=$1
    grep -o 'crate://[^ ]*' "$inc" | sed -n 's|^crate://crates\.io/\([^/;]*\)/\([^/;]*\);name=\(.*\)$|\1 \2 \3|p' |
        awk '{ if ($3 != $1 "-" $2) print "BAD-NAME-PARAM", $0; else print $1, $2 }' | sort >"$T/inc.uris"
    grep -c 'crate://' "$inc" >"$T/inc.count" || true
    sed -n 's/^SRC_URI\[\(.*\)\.sha256sum\] = "\([0-9a-f]*\)"$/\1 \2/p' "$inc" | sort >"$T/inc.sums"
    grep -c '^SRC_URI\[' "$inc" >"$T/inc.sumcount" || true
    # join "name version" with "name-version sha256"
    awk 'NR == FNR { sum[$1] = $2; next } { key = $1 "-" $2; print $1, $2, (key in sum ? sum[key] : "NO-CHECKSUM") }' \
        "$T/inc.sums" "$T/inc.uris" | sort
}
# agree LOCK INC: 0 when they list the same crates with the same checksums; prints differences.
agree() {
    local lock=$1 inc=$2 rc=0
    lock_crates "$lock" >"$T/a.lock"
    inc_crates "$inc" >"$T/a.inc"
    if ! diff "$T/a.lock" "$T/a.inc" >"$T/a.diff"; then
        echo "    < in Cargo.lock   > in the .inc"
        sed -n '1,20s/^/    /p' "$T/a.diff"
        rc=1
    fi
    local n_lock n_uri n_sum
    n_lock=$(wc -l <"$T/a.lock")
    n_uri=$(cat "$T/inc.count")
    n_sum=$(cat "$T/inc.sumcount")
    if [ "$n_uri" != "$n_lock" ] || [ "$n_sum" != "$n_lock" ]; then
        echo "    Cargo.lock has $n_lock crates.io packages; the .inc has $n_uri crate:// entries and $n_sum checksums"
        rc=1
    fi
    if grep -q NO-CHECKSUM "$T/a.lock" "$T/a.inc"; then
        echo "    a crate without a checksum"
        rc=1
    fi
    return $rc
}
if agree "$REPO/Cargo.lock" "$CRATES_INC"; then
    ok "every crates.io package of Cargo.lock ($(wc -l <"$T/a.lock")) is in the .inc with its sha256, and nothing else"
else
    bad "Cargo.lock and tether-agent-crates.inc disagree: run $REGEN"
fi

# The check above must be able to fail, and the generator must follow Cargo.lock: a lock with a
# crate added (plus a path and a git dependency, which are not crates.io's) and an .inc with a
# checksum changed.
cp "$REPO/Cargo.lock" "$T/more.lock"
cat >>"$T/more.lock" <<'EOF'

[[package]]
name = "zz-added-crate"
version = "9.8.7"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

[[package]]
name = "zz-path-dep"
version = "0.1.0"

[[package]]
name = "zz-git-dep"
version = "0.2.0"
source = "git+https://example.invalid/zz.git#0123456789abcdef0123456789abcdef01234567"
EOF
awk '!done && /^SRC_URI\[.*sha256sum\] = "/ {
        c = substr($0, index($0, "\"") + 1, 1); sub("= \"" c, "= \"" (c == "0" ? "1" : "0")); done = 1
    } { print }' "$CRATES_INC" >"$T/edited.inc"
grep -v 'crate://' "$CRATES_INC" >"$T/dropped.inc"
selftest=""
agree "$T/more.lock" "$CRATES_INC" >/dev/null && selftest+=" (missed a crate added to Cargo.lock)"
agree "$REPO/Cargo.lock" "$T/edited.inc" >/dev/null && selftest+=" (missed a changed checksum)"
agree "$REPO/Cargo.lock" "$T/dropped.inc" >/dev/null && selftest+=" (missed the crate:// entries being gone)"
if python3 "$REPO/$REGEN" --lock "$T/more.lock" --stdout >"$T/more.inc" 2>"$T/more.err"; then
    agree "$T/more.lock" "$T/more.inc" >/dev/null || selftest+=" (the generator's output for the longer lock does not agree with it)"
    grep -q 'crate://crates.io/zz-added-crate/9.8.7;name=zz-added-crate-9.8.7' "$T/more.inc" ||
        selftest+=" (the generator left out the added crate)"
    grep -q 'zz-path-dep\|zz-git-dep' "$T/more.inc" && selftest+=" (the generator took a path or git dependency)"
    grep -q 'zz-git-dep' "$T/more.err" || selftest+=" (the generator did not warn about the git dependency)"
else
    selftest+=" (the generator failed on a lock with an added crate: $(head -n1 "$T/more.err"))"
fi
if [ -z "$selftest" ]; then
    ok "the crate check catches an added crate, a changed checksum and a dropped list; the generator follows"
else
    bad "crate check self-test:$selftest"
fi

# --- 3. license ------------------------------------------------------------------------------
lic_problems=""
[ -f "$REPO/LICENSE" ] || lic_problems+=" (no LICENSE file)"
grep -q 'Apache License' "$REPO/LICENSE" 2>/dev/null && grep -q 'Version 2.0, January 2004' "$REPO/LICENSE" ||
    lic_problems+=" (LICENSE is not the Apache License 2.0 text)"
n_chk=0
while read -r file md5; do
    n_chk=$((n_chk + 1))
    actual=$(md5sum "$REPO/$file" 2>/dev/null | cut -d' ' -f1)
    [ "$actual" = "$md5" ] || lic_problems+=" ($file: LIC_FILES_CHKSUM says md5 $md5, the file has ${actual:-none})"
done < <(grep -h '^LIC_FILES_CHKSUM' "$RECIPES"/*.bb "$RECIPES"/*.inc |
    grep -o 'file://[^;" ]*;md5=[0-9a-f]*' | sed 's|^file://\([^;]*\);md5=\(.*\)$|\1 \2|')
[ "$n_chk" -ge 1 ] || lic_problems+=" (no LIC_FILES_CHKSUM entry found)"
recipe_license=$(sed -n 's/^LICENSE = "\(.*\)"$/\1/p' "$RECIPES"/tether-agent-common.inc | head -n1)
[ "$recipe_license" = "$cargo_license" ] ||
    lic_problems+=" (the recipes' LICENSE \"$recipe_license\" is not Cargo.toml's \"$cargo_license\")"
if [ -z "$lic_problems" ]; then
    ok "LIC_FILES_CHKSUM matches LICENSE ($n_chk entries), LICENSE = \"$recipe_license\" as in Cargo.toml"
else
    bad "license:$lic_problems"
fi

# --- 4. recipe versions ----------------------------------------------------------------------
ver_problems=""
for pn in tether-agent tether-agent-bin; do
    files=()
    for f in "$RECIPES/${pn}"_*.bb; do [ -e "$f" ] && files+=("$f"); done
    if [ "${#files[@]}" != 1 ]; then
        ver_problems+=" (${#files[@]} recipes named ${pn}_*.bb, want 1)"
        continue
    fi
    pv=$(basename "${files[0]}" .bb)
    pv=${pv#"${pn}"_}
    grep -q '^PV\b' "${files[0]}" && ver_problems+=" ($pn sets PV itself)"
    [ "$pv" = "$cargo_version" ] || ver_problems+=" (${pn}_$pv.bb: Cargo.toml says $cargo_version, git mv it to ${pn}_$cargo_version.bb)"
done
[ -n "$cargo_version" ] || ver_problems+=" (no version in Cargo.toml)"
grep -q '^export TETHER_VERSION = "${PV}"$' "$RECIPES"/tether-agent_*.bb ||
    ver_problems+=" (tether-agent does not build the agent with TETHER_VERSION = \${PV}: it would report Cargo.toml's version, not the package's)"
if [ -z "$ver_problems" ]; then
    ok "tether-agent and tether-agent-bin are version $cargo_version, as Cargo.toml"
else
    bad "versions:$ver_problems"
fi

# --- 5. oelint-adv ---------------------------------------------------------------------------
oelint=()
if [ -n "${OELINT_ADV:-}" ]; then
    read -r -a oelint <<<"$OELINT_ADV"
elif command -v oelint-adv >/dev/null 2>&1; then
    oelint=(oelint-adv)
elif python3 -c 'import oelint_adv' 2>/dev/null; then
    oelint=(python3 -m oelint_adv)
else
    echo "installing oelint-adv==$OELINT_VERSION (pip)"
    pip_user=()
    [ "$(id -u)" = 0 ] || [ -n "${VIRTUAL_ENV:-}" ] || pip_user=(--user)
    if python3 -m pip install --quiet --disable-pip-version-check "${pip_user[@]}" "oelint-adv==$OELINT_VERSION" >"$T/pip.log" 2>&1; then
        if command -v oelint-adv >/dev/null 2>&1; then oelint=(oelint-adv); else oelint=(python3 -m oelint_adv); fi
    else
        tail -n 5 "$T/pip.log"
    fi
fi
if [ "${#oelint[@]}" = 0 ]; then
    bad "oelint-adv is available (python3 -m pip install oelint-adv==$OELINT_VERSION)"
else
    mapfile -t lint_files < <(find "$LAYER" -type f \( -name '*.bb' -o -name '*.bbappend' -o -name '*.inc' -o -name '*.conf' \) | sort)
    lint_version=$("${oelint[@]}" --version 2>/dev/null | head -n1)
    # Run from the layer so that paths in .oelint.cfg resolve; OELINT_CONFIG names the file.
    if (cd "$LAYER" && OELINT_CONFIG="$LAYER/.oelint.cfg" "${oelint[@]}" --quiet "${lint_files[@]}") >"$T/lint.out" 2>&1 &&
        ! grep -q . "$T/lint.out"; then
        ok "oelint-adv ($lint_version) finds nothing in ${#lint_files[@]} files"
    else
        sed "s|$LAYER/||" "$T/lint.out" | sed -n '1,40s/^/    /p'
        bad "oelint-adv ($lint_version) findings on the layer: fix them, or suppress one with its reason (meta-agent/.oelint.cfg)"
    fi
fi

# --- 6. tether-agent-bin's arch mapping ------------------------------------------------------
if [ -f "$REPO/cross/lib.sh" ]; then
    targets=$(bash -c '. "$1" && printf "%s\n" "${TETHER_TARGETS[@]}"' _ "$REPO/cross/lib.sh")
    targets_from="cross/lib.sh"
else
    targets=$(printf '%s\n' armv5te-unknown-linux-musleabi arm-unknown-linux-musleabihf armv7-unknown-linux-musleabihf \
        aarch64-unknown-linux-musl i686-unknown-linux-musl x86_64-unknown-linux-musl)
    targets_from="the six release targets (no cross/lib.sh)"
fi
if python3 - "$RECIPES"/tether-agent-bin_*.bb "$targets" >"$T/arch.out" 2>&1 <<'EOF'; then
import re, sys
recipe, targets = sys.argv[1], sys.argv[2].split()
text = open(recipe, encoding="utf-8").read()
m = re.search(r"^def tether_agent_rust_target\(d\):\n(?:(?:[ \t]+.*)?\n)+", text, re.M)
if not m:
    sys.exit("no 'def tether_agent_rust_target(d):' in %s" % recipe)
scope = {}
exec(m.group(0), scope)
fn = scope["tether_agent_rust_target"]

class D:
    def __init__(self, **v): self.v = v
    def getVar(self, name, expand=True): return self.v.get(name)

# TARGET_ARCH and TUNE_FEATURES of oe-core tunes (conf/machine/include/...) and what they get.
cases = [
    ("arm926ejs (qemuarmv5)",         "arm", "arm armv5 thumb dsp", "armv5te-unknown-linux-musleabi"),
    ("armv5te with vfp, hard float",  "arm", "arm armv5 thumb dsp vfp callconvention-hard", "armv5te-unknown-linux-musleabi"),
    ("arm1176jzfshf (raspberrypi0)",  "arm", "arm armv6 vfp thumb callconvention-hard", "arm-unknown-linux-musleabihf"),
    ("armv6 without vfp",             "arm", "arm armv6 thumb", "armv5te-unknown-linux-musleabi"),
    ("cortexa7thf-neon-vfpv4",        "arm", "arm armv7ve vfp thumb neon vfpv4 callconvention-hard", "armv7-unknown-linux-musleabihf"),
    ("cortexa8hf-neon",               "arm", "arm armv7a vfp thumb neon callconvention-hard", "armv7-unknown-linux-musleabihf"),
    ("armv7a softfp (vfp, no hf)",    "arm", "arm armv7a vfp", "armv7-unknown-linux-musleabihf"),
    ("cortexa15thf (qemuarm)",        "arm", "arm armv7ve vfp thumb neon callconvention-hard", "armv7-unknown-linux-musleabihf"),
    ("cortexa53 (qemuarm64)",         "aarch64", "aarch64 armv8a crc crypto cortexa53", "aarch64-unknown-linux-musl"),
    ("core2-32 (qemux86)",            "i686", "m32 core2", "i686-unknown-linux-musl"),
    ("i586 (no SSE2)",                "i586", "m32 i586", ""),
    ("corei7-64 (qemux86-64)",        "x86_64", "m64 corei7", "x86_64-unknown-linux-musl"),
    ("armv4t (arm920t)",              "arm", "arm armv4 thumb", ""),
    ("armv7a big-endian",             "armeb", "arm armv7a vfp bigendian", ""),
    ("armv7a hf, bigendian feature",  "arm", "arm armv7a vfp callconvention-hard bigendian", ""),
    ("x86-64-x32",                    "x86_64", "m64 mx32 corei7", ""),
    ("aarch64_be",                    "aarch64_be", "aarch64 bigendian", ""),
    ("mips32r2",                      "mipsel", "o32 mips32r2", ""),
    ("riscv64",                       "riscv64", "riscv64", ""),
    ("powerpc",                       "powerpc", "m32 fpu-hard", ""),
]
problems, covered = [], set()
for label, arch, feats, want in cases:
    got = fn(D(TARGET_ARCH=arch, TUNE_FEATURES=feats))
    if got != want:
        problems.append("%s: got %r, want %r" % (label, got, want))
    if got and got not in targets:
        problems.append("%s: %r is not one of cross/'s targets" % (label, got))
    covered.add(got)
missing = [t for t in targets if t not in covered]
if missing:
    problems.append("no tune maps to %s" % ", ".join(missing))
if len(targets) != 6:
    problems.append("expected six cross targets, found %d: %s" % (len(targets), " ".join(targets)))
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
    ok "tether-agent-bin maps tunes onto all six targets of $targets_from (and skips the rest)"
else
    sed -n '1,20s/^/    /p' "$T/arch.out"
    bad "tether-agent-bin's tune -> binary mapping"
fi

# --- 7. what the recipes install exists; the sample config is valid --------------------------
inst_problems=""
for f in init.d/tether-agent init.d/tether-agent.default LICENSE Cargo.lock; do
    [ -f "$REPO/$f" ] || inst_problems+=" ($f, which the recipes take from the source tree, is missing)"
done
[ -x "$REPO/init.d/tether-agent" ] || inst_problems+=" (init.d/tether-agent is not executable)"
while read -r uri; do
    [ -f "$RECIPES/files/$uri" ] || inst_problems+=" (SRC_URI names file://$uri, not in files/)"
done < <(sed -n 's/^SRC_URI = "\(.*\)"$/\1/p' "$RECIPES/tether-agent-common.inc" | tr ' ' '\n' | sed -n 's|^file://||p')
init_name=$(sed -n 's/^INITSCRIPT_NAME = "\(.*\)"$/\1/p' "$RECIPES/tether-agent-common.inc")
unit=$(sed -n 's/^SYSTEMD_SERVICE:${PN} = "\(.*\)"$/\1/p' "$RECIPES/tether-agent-common.inc")
[ "$init_name" = tether-agent ] || inst_problems+=" (INITSCRIPT_NAME is \"$init_name\")"
[ -n "$unit" ] && [ -f "$RECIPES/files/$unit" ] || inst_problems+=" (SYSTEMD_SERVICE \"$unit\" is not in files/)"
grep -q 'install -m 0755 ${S}/init.d/tether-agent ' "$RECIPES/tether-agent-common.inc" ||
    inst_problems+=" (the init script is not installed from the source tree's init.d/)"
grep -q 'install -d -m 0700 ${D}${TETHER_AGENT_STATEDIR}' "$RECIPES/tether-agent-common.inc" ||
    inst_problems+=" (the state directory is not created 0700)"
if ! python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); assert c["broker"]["url"]' \
    "$RECIPES/files/agent.json" 2>/dev/null; then
    inst_problems+=" (files/agent.json is not JSON with broker.url)"
fi
BIN=${TETHER_AGENT_BIN:-target/debug/tether-agent}
if [ ! -x "$BIN" ] && [ -z "${TETHER_AGENT_BIN:-}" ] && command -v cargo >/dev/null 2>&1; then
    echo "building tether-agent"
    cargo build --quiet --bin tether-agent >"$T/build.log" 2>&1 || tail -n 20 "$T/build.log"
fi
if [ -x "$BIN" ]; then
    # With state_dir moved under $T: --check-config creates state_dir and writes in it, and this
    # host's /var/lib is not the device's.
    python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); c["state_dir"] = sys.argv[2]
json.dump(c, open(sys.argv[3], "w"))' "$RECIPES/files/agent.json" "$T/state" "$T/agent.json" 2>/dev/null
    if ! "$BIN" --config "$T/agent.json" --check-config >"$T/check.out" 2>&1; then
        inst_problems+=" (tether-agent --check-config rejects files/agent.json: $(head -n 3 "$T/check.out" | tr '\n' ' '))"
    fi
else
    inst_problems+=" (no agent binary at $BIN to check files/agent.json with)"
fi
if [ -z "$inst_problems" ]; then
    ok "init script, defaults file, config and unit exist; files/agent.json passes tether-agent --check-config"
else
    bad "installed files:$inst_problems"
fi

# --- 8. update-bin-checksums -----------------------------------------------------------------
{
    for t in $targets; do
        printf '%064x  tether-agent-%s-%s\n' "$RANDOM$RANDOM" "$cargo_version" "$t"
    done
    printf '%064x  tether-agent-0.0.1-x86_64-unknown-linux-musl\n' 1    # another version: left out
    printf '%064x  README\n' 2
} >"$T/SHA256SUMS"
pin_problems=""
if python3 "$LAYER/scripts/update-bin-checksums" "$T/SHA256SUMS" --output "$T/pins.inc" >"$T/pins.out" 2>&1; then
    expected=$(for t in $targets; do
        printf 'TETHER_AGENT_BIN_SHA256[tether-agent-%s-%s] = "%s"\n' "$cargo_version" "$t" \
            "$(sed -n "s/^\([0-9a-f]*\)  tether-agent-$cargo_version-$t\$/\1/p" "$T/SHA256SUMS")"
    done | sort)
    got=$(grep '^TETHER_AGENT_BIN_SHA256' "$T/pins.inc" | sort)
    if [ "$got" != "$expected" ]; then
        diff <(echo "$expected") <(echo "$got") | sed -n '1,10s/^/    /p'
        pin_problems+=" (its output is not one pin per target of $cargo_version)"
    fi
else
    sed 's/^/    /' "$T/pins.out"
    pin_problems+=" (it failed)"
fi
grep -q 'TETHER_AGENT_BIN = "tether-agent-${PV}-${TETHER_AGENT_RUST_TARGET}"' "$RECIPES"/tether-agent-bin_*.bb ||
    pin_problems+=" (tether-agent-bin no longer fetches tether-agent-\${PV}-<target>, the name cross/build writes)"
if grep -v '^#' "$RECIPES/tether-agent-bin-checksums.inc" | grep -v '^$' |
    grep -qv '^TETHER_AGENT_BIN_SHA256\[tether-agent-[^]]*\] = "[0-9a-f]\{64\}"$'; then
    pin_problems+=" (tether-agent-bin-checksums.inc has a line that is not a TETHER_AGENT_BIN_SHA256 pin)"
fi
if [ -z "$pin_problems" ]; then
    ok "update-bin-checksums pins the six binaries of $cargo_version under the names tether-agent-bin fetches"
else
    bad "update-bin-checksums:$pin_problems"
fi

# --- 9. layer.conf ---------------------------------------------------------------------------
conf=$LAYER/conf/layer.conf
conf_problems=""
grep -q '^BBFILE_COLLECTIONS += "tether-agent"$' "$conf" || conf_problems+=" (BBFILE_COLLECTIONS)"
grep -q '^BBFILE_PATTERN_tether-agent = "^${LAYERDIR}/"$' "$conf" || conf_problems+=" (BBFILE_PATTERN)"
grep -q '^BBFILE_PRIORITY_tether-agent = "[0-9]*"$' "$conf" || conf_problems+=" (BBFILE_PRIORITY)"
grep -q '^LAYERDEPENDS_tether-agent = "core"$' "$conf" || conf_problems+=" (LAYERDEPENDS core)"
compat=$(sed -n 's/^LAYERSERIES_COMPAT_tether-agent = "\(.*\)"$/\1/p' "$conf")
for rel in kirkstone langdale mickledore nanbield scarthgap styhead walnascar whinlatter wrynose; do
    case " $compat " in *" $rel "*) ;; *) conf_problems+=" (LAYERSERIES_COMPAT lacks $rel)" ;; esac
done
grep -q 'recipes-\*/\*/\*\.bb ' "$conf" || conf_problems+=" (BBFILES does not pick up recipes-*/*/*.bb)"
if [ -z "$conf_problems" ]; then
    ok "layer.conf: collection tether-agent, depends on core, compatible with kirkstone .. $(echo "$compat" | awk '{print $NF}')"
else
    bad "layer.conf:$conf_problems"
fi

# --- 10. bitbake parses and runs the recipes -------------------------------------------------
bblib=${BITBAKE_LIB:-$REPO/target/meta-agent/bitbake-setup-$BITBAKE_SETUP_VERSION}
if [ ! -f "$bblib/bb/__init__.py" ] && [ -z "${BITBAKE_LIB:-}" ]; then
    echo "installing bitbake-setup==$BITBAKE_SETUP_VERSION (pip) into ${bblib#"$REPO"/}"
    rm -rf "$bblib.tmp"
    if python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$bblib.tmp" \
        "bitbake-setup==$BITBAKE_SETUP_VERSION" >"$T/bbpip.log" 2>&1; then
        rm -rf "$bblib"
        mv "$bblib.tmp" "$bblib"
    else
        tail -n 5 "$T/bbpip.log"
        rm -rf "$bblib.tmp"
    fi
fi
if [ ! -f "$bblib/bb/__init__.py" ]; then
    bad "bitbake's bb package at $bblib (python3 -m pip install --target DIR bitbake-setup==$BITBAKE_SETUP_VERSION)"
elif python3 "$LAYER/tests/bitbake-check.py" "$bblib" >"$T/bbcheck.out" 2>&1; then
    ok "bitbake ($(sed -n 's/^  (bitbake \(.*\))$/\1/p' "$T/bbcheck.out")) parses the layer and recipes; $(tail -n1 "$T/bbcheck.out" | sed 's/^bitbake-check: //')"
else
    grep -v '^  ok ' "$T/bbcheck.out" | sed -n '1,30s/^/    /p'
    bad "bitbake check of the recipes (python3 meta-agent/tests/bitbake-check.py $bblib)"
fi

finish
