# tether-agent from the prebuilt static (musl) binaries that cross/build writes, for builds
# without Rust: installs dist/tether-agent-${PV}-<rust target> as ${bindir}/tether-agent, with
# the same init script, defaults file, config, unit and state directory as the tether-agent
# recipe, which it replaces (put either one in an image, not both). PV is the version in
# Cargo.toml (the layer's test checks it): rename this file when it changes.

require tether-agent-common.inc

SUMMARY:${PN} = "Tether device agent (prebuilt static binary)"

# The binaries come from one of:
# - TETHER_AGENT_DIST_DIR, a directory holding cross/build's output (the binaries and
#   SHA256SUMS). By default the dist/ of the source checkout (TETHER_AGENT_SRCDIR).
# - TETHER_AGENT_DIST_URL, when set: a URL of a directory (no trailing slash) with the same
#   files, e.g. a release's downloads. Its binary must be pinned by TETHER_AGENT_BIN_SHA256.
TETHER_AGENT_DIST_DIR ??= "${@os.path.join(d.getVar('TETHER_AGENT_SRCDIR'), 'dist') if d.getVar('TETHER_AGENT_SRCDIR') else ''}"
TETHER_AGENT_DIST_URL ??= ""

# The sha256 each binary must have, as flags named after the files:
#   TETHER_AGENT_BIN_SHA256[tether-agent-0.1.0-x86_64-unknown-linux-musl] = "..."
# scripts/update-bin-checksums writes them from a release's SHA256SUMS into this file; local.conf
# or a bbappend may set them too. A binary from TETHER_AGENT_DIST_DIR is also checked against
# the SHA256SUMS next to it.
require tether-agent-bin-checksums.inc

# The cross/ target whose binary runs on the machine's tune ("" when none does: the recipe is
# then skipped on it). Set TETHER_AGENT_RUST_TARGET to choose another.
def tether_agent_rust_target(d):
    arch = d.getVar('TARGET_ARCH') or ''
    features = (d.getVar('TUNE_FEATURES') or '').split()
    if 'bigendian' in features or 'mx32' in features:
        return ''
    if arch == 'x86_64':
        return 'x86_64-unknown-linux-musl'
    # Rust's i686 means a Pentium 4 (SSE2): it would trap on the i586-class CPUs (Quark, Geode,
    # Vortex86) that i586 tunes are for.
    if arch == 'i686':
        return 'i686-unknown-linux-musl'
    if arch == 'aarch64':
        return 'aarch64-unknown-linux-musl'
    if arch != 'arm':
        return ''
    vfp = any(f == 'vfp' or f.startswith('vfpv') or f == 'neon' for f in features)
    if vfp and any(f.startswith(('armv7', 'armv8')) for f in features):
        return 'armv7-unknown-linux-musleabihf'
    if vfp and 'armv6' in features:
        return 'arm-unknown-linux-musleabihf'
    # armv5te code, soft float: runs on any ARMv5TE or later core, with or without a VFP.
    if any(f.startswith(('armv5', 'armv6', 'armv7', 'armv8')) for f in features):
        return 'armv5te-unknown-linux-musleabi'
    return ''

TETHER_AGENT_RUST_TARGET ??= "${@tether_agent_rust_target(d)}"
TETHER_AGENT_BIN = "tether-agent-${PV}-${TETHER_AGENT_RUST_TARGET}"

# No binary for this tune (armv4, i586, big-endian, x32, other architectures): skip the recipe.
COMPATIBLE_HOST = "${@'.*' if d.getVar('TETHER_AGENT_RUST_TARGET') else 'none'}"

# Local files are looked up in the dist directory, then in the checkout. Expanded here, while
# the recipe is parsed: set TETHER_AGENT_SRCDIR and TETHER_AGENT_DIST_DIR in a conf file
# (local.conf, site.conf, a distro conf), not in a bbappend.
# This recipe's files are outside the layer, so the recipe itself extends FILESPATH:
# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext
FILESEXTRAPATHS:prepend := "${@''.join(p + ':' for p in (d.getVar('TETHER_AGENT_DIST_DIR'), d.getVar('TETHER_AGENT_SRCDIR')) if p)}"

# The three files this recipe needs from the project's tree, copied from a local checkout
# (through FILESEXTRAPATHS above) into the same place git would check them out to.
TETHER_AGENT_BIN_TREE_URI = "${@'file://init.d/tether-agent;subdir=tether-src file://init.d/tether-agent.default;subdir=tether-src file://LICENSE;subdir=tether-src' if d.getVar('TETHER_AGENT_SRCDIR') else d.getVar('TETHER_AGENT_TREE_URI')}"
TETHER_AGENT_BIN_URI = "${@'%s/%s;name=bin' % (d.getVar('TETHER_AGENT_DIST_URL'), d.getVar('TETHER_AGENT_BIN')) if d.getVar('TETHER_AGENT_DIST_URL') else 'file://%s file://SHA256SUMS' % d.getVar('TETHER_AGENT_BIN')}"

SRC_URI += "${TETHER_AGENT_BIN_TREE_URI} ${TETHER_AGENT_BIN_URI}"
SRC_URI[bin.sha256sum] = "${@d.getVarFlag('TETHER_AGENT_BIN_SHA256', d.getVar('TETHER_AGENT_BIN')) or ''}"

S = "${TETHER_AGENT_UNPACKDIR}/tether-src"

# Nothing here is compiled: no compiler or C library needed to build it.
INHIBIT_DEFAULT_DEPS = "1"
do_configure[noexec] = "1"

# Checks the binary before anything installs it: against its pinned sha256 when there is one,
# and against the SHA256SUMS fetched with it from a local dist directory.
python do_compile() {
    import hashlib
    name = d.getVar('TETHER_AGENT_BIN')
    unpackdir = d.getVar('TETHER_AGENT_UNPACKDIR')
    with open(os.path.join(unpackdir, name), 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    checked = False
    pinned = d.getVarFlag('TETHER_AGENT_BIN_SHA256', name) or ''
    if pinned:
        if digest != pinned.lower():
            bb.fatal('%s has sha256 %s, but TETHER_AGENT_BIN_SHA256[%s] is %s' % (name, digest, name, pinned))
        checked = True
    sums = os.path.join(unpackdir, 'SHA256SUMS')
    if os.path.exists(sums):
        listed = {}
        with open(sums) as f:
            for line in f:
                fields = line.split()
                if len(fields) == 2:
                    listed[os.path.basename(fields[1].lstrip('*'))] = fields[0].lower()
        if name not in listed:
            bb.fatal('%s is not listed in the SHA256SUMS next to it (%s): rerun cross/build' % (name, d.getVar('TETHER_AGENT_DIST_DIR')))
        if listed[name] != digest:
            bb.fatal('%s has sha256 %s, but SHA256SUMS says %s: rerun cross/build' % (name, digest, listed[name]))
        checked = True
    if not checked:
        bb.fatal('nothing to check %s against: set TETHER_AGENT_BIN_SHA256[%s] (scripts/update-bin-checksums)' % (name, name))
    bb.note('%s: sha256 %s verified' % (name, digest))
}
do_compile[doc] = "Checks the prebuilt binary's sha256"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${TETHER_AGENT_UNPACKDIR}/${TETHER_AGENT_BIN} ${D}${bindir}/tether-agent
    tether_agent_install_common
}

# The binary is already stripped (cross/ builds it so) and statically linked, so it has no
# debug information to split off and none of the dynamic sections the ldflags check looks for.
INHIBIT_PACKAGE_STRIP = "1"
INHIBIT_PACKAGE_DEBUG_SPLIT = "1"
# Both checks are about how a binary was built, which cross/ decides for this one:
# nooelint: oelint.vars.insaneskip
INSANE_SKIP:${PN} += "already-stripped ldflags"

RPROVIDES:${PN} += "tether-agent"
RCONFLICTS:${PN} += "tether-agent"
RREPLACES:${PN} += "tether-agent"
