# Shared by cross/build, cross/lib-tests, cross/run, bench/size and tests/suites/armv5.sh.
# Source it; sourcing runs nothing.
# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this

# The six release targets, in the order cross/build builds them.
TETHER_TARGETS=(
    armv5te-unknown-linux-musleabi
    arm-unknown-linux-musleabihf
    armv7-unknown-linux-musleabihf
    aarch64-unknown-linux-musl
    i686-unknown-linux-musl
    x86_64-unknown-linux-musl
)

# Budget for the stripped tether-agent on armv5te (bench/size): 2.5 MiB.
TETHER_SIZE_BUDGET=$((5 * 1024 * 1024 / 2))

# Features of std for release builds (cargo -Zbuild-std-features; TETHER_BUILD_STD_FEATURES
# overrides). Naming any replaces cargo's default "panic-unwind backtrace default": no backtrace
# symbolizer (addr2line, gimli, miniz_oxide: nothing to symbolize in a stripped binary anyway;
# panic messages stay), and optimize_for_size picks std's smaller algorithms. Measured on
# armv5te: -12% and a further -3% (cross/README.md).
TETHER_STD_FEATURES_DEFAULT=optimize_for_size

# Pinned so a build is reproducible and the size table in cross/README.md stays meaningful.
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.0

tether_is_target() {
    local t
    for t in "${TETHER_TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
    return 1
}

# The command prefix that runs a binary of TARGET on this x86_64 machine, one word a line
# (nothing for x86_64). There is no binfmt_misc here, so foreign binaries go through qemu-user
# explicitly, on a CPU no newer than the target's baseline: a v6 instruction in an ARMv5TE
# build traps on arm926 instead of passing unnoticed on qemu's default "max" CPU. i686 means
# SSE2 to Rust; qemu-user has no pentium4 model, so n270 (an SSE2/SSSE3 Atom) stands in.
tether_runner() {
    case "$1" in
        armv5te-*) printf '%s\n' qemu-arm-static -cpu arm926 ;;
        arm-*) printf '%s\n' qemu-arm-static -cpu arm1176 ;;
        armv7-*) printf '%s\n' qemu-arm-static -cpu cortex-a7 ;;
        aarch64-*) printf '%s\n' qemu-aarch64-static -cpu cortex-a53 ;;
        i686-*) printf '%s\n' qemu-i386-static -cpu n270 ;;
        x86_64-*) ;;
        *) echo "tether_runner: unknown target $1" >&2; return 1 ;;
    esac
}

# The version in Cargo.toml's [package] table.
tether_version() {
    awk '/^\[/ { pkg = ($0 == "[package]") } pkg && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }' \
        "${1:-.}/Cargo.toml"
}

_tx_log() { echo "cross: $*" >&2; }
_tx_die() { _tx_log "error: $*"; exit 1; }
_tx_as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
_tx_deb_version() {
    dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'
}
# Debian's compiler and std source are usable when both are installed at the same version.
_tx_debian_rust_ok() {
    local rv sv
    rv=$(_tx_deb_version rustc-web) sv=$(_tx_deb_version rust-web-src)
    [ -n "$rv" ] && [ "$rv" = "$sv" ] && [ -n "$(_tx_deb_version cargo-web)" ] &&
        [ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ]
}
_tx_pip_ok() {
    python3 - "$ZIGLANG_VERSION" "$CARGO_ZIGBUILD_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("ziglang"), version("cargo-zigbuild")) == tuple(sys.argv[1:3]) else 1)
EOF
}

# Makes the Docker-free cross toolchain ready and exports its environment, for the project at
# ROOT: Debian's Rust (rustc-web, with its std source rust-web-src at the very same version,
# for -Zbuild-std), zig (PyPI ziglang) as C cross compiler and linker with musl for every
# target, cargo-zigbuild to drive it, qemu-user-static to run what was built.
# Installs what is missing unless INSTALL is 0. Sets TETHER_ZIGBUILD (the cargo-zigbuild to run)
# and CARGO_TARGET_DIR=ROOT/target/cross, so it never fights a `cargo build` in target/.
#   tether_cross_setup ROOT [INSTALL]
# TETHER_RUST_BIN=DIR uses DIR/cargo and DIR/rustc instead of Debian's /usr/bin (they need their
# rust-src, e.g. a rustup nightly with the rust-src component).
tether_cross_setup() {
    local root=$1 install=${2:-1} apt_pkgs=() rust_bin sysroot zig tool bindir
    if [ -z "${TETHER_RUST_BIN:-}" ] && ! _tx_debian_rust_ok; then
        # One transaction, so all three come at the same (candidate) version.
        apt_pkgs+=(rustc-web cargo-web rust-web-src)
    fi
    command -v qemu-arm-static >/dev/null 2>&1 || apt_pkgs+=(qemu-user-static)
    command -v file >/dev/null 2>&1 || apt_pkgs+=(file)
    if [ "${#apt_pkgs[@]}" -gt 0 ]; then
        [ "$install" = 1 ] || _tx_die "missing Debian packages: ${apt_pkgs[*]}"
        _tx_log "installing ${apt_pkgs[*]}"
        _tx_as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive _tx_as_root apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
        if [ -z "${TETHER_RUST_BIN:-}" ]; then
            _tx_debian_rust_ok || _tx_die "rustc-web and rust-web-src are not at the same version"
        fi
    fi
    if ! _tx_pip_ok; then
        [ "$install" = 1 ] ||
            _tx_die "missing PyPI packages ziglang==$ZIGLANG_VERSION cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
        _tx_log "installing ziglang==$ZIGLANG_VERSION cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
        if ! python3 -m pip --version >/dev/null 2>&1; then
            _tx_as_root apt-get update -qq
            DEBIAN_FRONTEND=noninteractive _tx_as_root apt-get install -y -qq python3-pip >/dev/null
        fi
        local pip=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore
                   "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION")
        # Debian's own python3 refuses (PEP 668) unless told; pyenv's or a venv's does not.
        "${pip[@]}" || "${pip[@]}" --break-system-packages
        _tx_pip_ok || _tx_die "pip install of ziglang/cargo-zigbuild did not take"
    fi

    rust_bin=${TETHER_RUST_BIN:-/usr/bin}
    if [ ! -x "$rust_bin/cargo" ] || [ ! -x "$rust_bin/rustc" ]; then
        _tx_die "no cargo/rustc in $rust_bin"
    fi
    sysroot=$("$rust_bin/rustc" --print sysroot)
    [ -f "$sysroot/lib/rustlib/src/rust/library/Cargo.lock" ] ||
        _tx_die "$rust_bin/rustc has no std source in $sysroot/lib/rustlib/src (rust-web-src/rust-src)"

    zig=$(python3 -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')
    TETHER_ZIGBUILD=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/cargo-zigbuild
    [ -x "$TETHER_ZIGBUILD" ] || TETHER_ZIGBUILD=$(command -v cargo-zigbuild) ||
        _tx_die "cargo-zigbuild not found"

    # A private bin directory first in PATH: Debian's cargo/rustc (rustup's proxies would win
    # otherwise) and zig, without putting all of /usr/bin ahead of the caller's PATH.
    export CARGO_TARGET_DIR="$root/target/cross"
    bindir="$CARGO_TARGET_DIR/bin"
    mkdir -p "$bindir"
    for tool in cargo rustc rustdoc; do
        if [ -x "$rust_bin/$tool" ]; then ln -sfn "$rust_bin/$tool" "$bindir/$tool"; fi
    done
    ln -sfn "$zig" "$bindir/zig"
    export PATH="$bindir:$PATH" CARGO="$bindir/cargo" RUSTC="$bindir/rustc" RUSTC_BOOTSTRAP=1
    # Source paths end up in the binary (panic locations): the same everywhere, so that anyone
    # can rebuild a release bit for bit, and no build machine's home directory ships.
    TETHER_REMAP_FLAGS=""
    local from
    for from in "$root=/tether" "${CARGO_HOME:-$HOME/.cargo}=/cargo"; do
        case "$from" in *" "*) ;; *) TETHER_REMAP_FLAGS+=" --remap-path-prefix=$from" ;; esac
    done
    # Anything that would change what gets built behind our back.
    unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER \
          CARGO_BUILD_TARGET CARGO_BUILD_RUSTFLAGS RUSTUP_TOOLCHAIN
    _tx_log "$("$RUSTC" --version), zig $("$zig" version), cargo-zigbuild $CARGO_ZIGBUILD_VERSION"
}

# Exports the rustflags every cross build of TARGET needs, plus EXTRA.
#   tether_target_env TARGET [EXTRA]
tether_target_env() {
    local var
    var="CARGO_TARGET_$(echo "$1" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    # Zig supplies the crt objects and libc; Rust's own self-contained copies would clash with
    # them (the link fails on rcrt1.o).
    export "$var=-C link-self-contained=no${TETHER_REMAP_FLAGS:-}${2:+ $2}"
}
