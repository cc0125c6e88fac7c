# tether-agent built from source with cargo. PV is the version in Cargo.toml (the layer's test
# checks it): rename this file when Cargo.toml's version changes.
#
# Needs the build's Rust to be at least Cargo.toml's rust-version (1.85); teams whose Yocto
# build has no (or an older) Rust use tether-agent-bin instead (README.md, "Which recipe").

require tether-agent-common.inc

# Every crates.io crate of Cargo.lock, pinned with its sha256 (generated; see its header).
require tether-agent-crates.inc

SUMMARY:${PN}-ctl = "tetherctl, the operator CLI for a Tether fleet"

inherit cargo externalsrc

# The project's tree: the local checkout, built in place by externalsrc (which does nothing
# when EXTERNALSRC is empty), or git (TETHER_AGENT_SRCDIR = "").
SRC_URI += "${TETHER_AGENT_TREE_URI}"
S = "${TETHER_AGENT_UNPACKDIR}/tether-src"
EXTERNALSRC = "${TETHER_AGENT_SRCDIR}"
# Leave the checkout as it is (no oe-workdir/oe-logs links in it).
EXTERNALSRC_SYMLINKS = ""

# The release profile (cargo.bbclass passes --release unless DEBUG_BUILD = "1"), i.e.
# Cargo.toml's [profile.release]: opt-level "z", lto, codegen-units 1, panic "abort". Only its
# strip is turned off: the build system strips the binaries itself when it packages them
# (keeping the symbols in ${PN}-dbg), and binaries stripped by cargo would fail the
# already-stripped QA check.
export CARGO_PROFILE_RELEASE_STRIP = "false"

# The version the agent reports in its heartbeat and `--version` (build.rs): the package's, so
# that a bbappend's PV ("0.1.0+git${SRCPV}", say) is what the fleet shows.
export TETHER_VERSION = "${PV}"

PACKAGES =+ "${PN}-ctl"
FILES:${PN}-ctl += "${bindir}/tetherctl"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/tether-agent ${D}${bindir}/tether-agent
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/tetherctl ${D}${bindir}/tetherctl
    tether_agent_install_common
}
