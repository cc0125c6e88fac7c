#!/usr/bin/env python3
"""Runs the layer's recipes through bitbake itself, without oe-core and without a build.

    python3 meta-agent/tests/bitbake-check.py BB_LIB_DIR

BB_LIB_DIR holds bitbake's `bb` package (tests/suites/meta-agent.sh installs the one PyPI's
bitbake-setup ships). oe-core is not here, so small stand-ins take the place of its classes
(base, cargo, externalsrc, update-rc.d, systemd) and of bitbake.conf: they define what the
recipes read, the way oe-core does, and nothing else. With those, for several machines and both
source modes (local checkout, git), it checks that bitbake parses both recipes and the layer.conf,
what SRC_URI, S, the binary name and COMPATIBLE_HOST come to, that bitbake's fetcher accepts
every SRC_URI entry and finds every local file, and it runs tether-agent-bin's real
do_fetch/do_unpack/do_compile/do_install (and tether-agent's do_install) on a fake dist/ and
build tree, then looks at the installed files. It prints one line per check and exits 1 when
one fails.
"""

import hashlib
import logging
import os
import shutil
import stat
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
LAYER = os.path.dirname(HERE)
TOP = os.path.dirname(LAYER)
RECIPES = os.path.join(LAYER, "recipes-core", "tether-agent")

BITBAKE_CONF = r'''
TOPDIR ?= "/nonexistent"
TMPDIR = "${TOPDIR}/tmp"
DL_DIR = "${TOPDIR}/downloads"
PN = "${@bb.parse.vars_from_file(d.getVar('FILE', False),d)[0] or 'defaultpkgname'}"
PV = "${@bb.parse.vars_from_file(d.getVar('FILE', False),d)[1] or '1.0'}"
PR = "r0"
BPN = "${PN}"
BP = "${BPN}-${PV}"
P = "${PN}-${PV}"
FILE_DIRNAME = "${@os.path.dirname(d.getVar('FILE', False))}"
THISDIR = "${@os.path.dirname(d.getVar('FILE'))}"
WORKDIR = "${TMPDIR}/work/${PN}/${PV}"
UNPACKDIR ??= "${WORKDIR}/sources"
S = "${UNPACKDIR}/${BP}"
B = "${S}"
T = "${WORKDIR}/temp"
D = "${WORKDIR}/image"
prefix = "/usr"
exec_prefix = "/usr"
bindir = "${exec_prefix}/bin"
sysconfdir = "/etc"
localstatedir = "/var"
nonarch_base_libdir = "/lib"
systemd_system_unitdir = "${nonarch_base_libdir}/systemd/system"
MACHINE ??= "qemux86-64"
TARGET_ARCH ??= "x86_64"
TUNE_FEATURES ??= "m64 corei7"
HOST_SYS = "${TARGET_ARCH}-poky-linux"
OVERRIDES = "${TARGET_ARCH}:pn-${PN}:${MACHINE}"
FILESEXTRAPATHS ?= "__default:"
FILESOVERRIDES = "${TARGET_ARCH}:${MACHINE}"
FILESPATH = "${@base_set_filespath(["${FILE_DIRNAME}/${BP}", "${FILE_DIRNAME}/${BPN}", "${FILE_DIRNAME}/files"], d)}"
PACKAGES = "${PN}-dbg ${PN}-dev ${PN}"
FILES:${PN} = "${bindir}/* ${sysconfdir}"
SRCREV ??= "INVALID"
BB_STRICT_CHECKSUM = "1"
'''

CLASSES = {
    # What of oe-core's base.bbclass the recipes rely on: FILESPATH, the fetch/unpack tasks,
    # COMPATIBLE_HOST.
    "base": r'''
def base_set_filespath(path, d):
    filespath = []
    extrapaths = (d.getVar("FILESEXTRAPATHS") or "").replace("__default:", "")
    if extrapaths != "":
        path = extrapaths.split(":") + path
    overrides = (":" + (d.getVar("FILESOVERRIDES") or "")).split(":")
    overrides.reverse()
    for o in overrides:
        for p in path:
            if p != "":
                filespath.append(os.path.join(p, o))
    return ":".join(filespath)

addtask fetch
do_fetch[dirs] = "${DL_DIR}"
addtask unpack after do_fetch
do_unpack[dirs] = "${UNPACKDIR}"
do_compile[dirs] = "${B}"
do_install[dirs] = "${B}"
do_install[cleandirs] = "${D}"
addtask configure after do_unpack
addtask compile after do_configure
addtask install after do_compile

python base_do_fetch() {
    src_uri = (d.getVar('SRC_URI') or "").split()
    if src_uri:
        bb.fetch2.Fetch(src_uri, d).download()
}

python base_do_unpack() {
    src_uri = (d.getVar('SRC_URI') or "").split()
    if src_uri:
        bb.fetch2.Fetch(src_uri, d).unpack(d.getVar('UNPACKDIR') or d.getVar('WORKDIR'))
}

base_do_configure() {
	:
}

base_do_compile() {
	:
}

base_do_install() {
	:
}

EXPORT_FUNCTIONS do_fetch do_unpack do_configure do_compile do_install

python () {
    import re
    need_host = d.getVar('COMPATIBLE_HOST')
    if need_host and not re.match(need_host, d.getVar('HOST_SYS')):
        raise bb.parse.SkipRecipe("incompatible with host %s (not in COMPATIBLE_HOST)" % d.getVar('HOST_SYS'))
    if not d.getVar('LICENSE'):
        bb.fatal('no LICENSE')
}
''',
    # cargo.bbclass: its build directory and target subdirectory.
    "cargo": r'''
B = "${WORKDIR}/build"
CARGO_TARGET_SUBDIR ?= "${HOST_SYS}/release"
cargo_do_compile() {
	:
}
EXPORT_FUNCTIONS do_compile
''',
    # externalsrc.bbclass, the part that matters here: with EXTERNALSRC set, S is that tree,
    # B is separate and SRC_URI keeps only its local (file, crate) entries.
    "externalsrc": r'''
python () {
    externalsrc = d.getVar('EXTERNALSRC')
    if externalsrc:
        d.setVar('S', externalsrc)
        d.setVar('B', '${WORKDIR}/${BPN}-${PV}/')
        fetch = bb.fetch2.Fetch((d.getVar('SRC_URI') or '').split(), d)
        d.setVar('SRC_URI', ' '.join(u for u in fetch.urls if fetch.ud[u].type in ('file', 'npmsw', 'crate')))
}
''',
    "update-rc.d": "",
    "systemd": "",
}

results = []


def check(desc, cond, detail=""):
    results.append(bool(cond))
    if cond or not detail:
        print("  %s %s" % ("ok  " if cond else "FAIL", desc))
    else:
        # The last line of a long message (a bitbake traceback ends with the exception).
        lines = [x for x in str(detail).strip().splitlines() if x.strip()] or [""]
        print("  FAIL %s: %s" % (desc, lines[-1].strip()[:300]))
    return cond


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.path.insert(0, sys.argv[1])
    work = tempfile.mkdtemp(prefix="tether-bbcheck.")
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = results.count(False)
    print("bitbake-check: %d passed, %d failed" % (results.count(True), failed))
    return 1 if failed else 0


class Messages(logging.Handler):
    """Keeps what bitbake logs (bb.fatal's message among it)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(work):
    # bitbake's siggen imports hashserv, which bitbake-setup does not ship; no hash server is used.
    stubs = os.path.join(work, "pystubs", "hashserv")
    os.makedirs(stubs)
    with open(os.path.join(stubs, "__init__.py"), "w") as f:
        f.write("def is_valid_unihash(u):\n    return True\n")
    open(os.path.join(stubs, "client.py"), "w").close()
    sys.path.insert(0, os.path.dirname(stubs))

    import bb
    import bb.build
    import bb.data
    import bb.fetch2
    import bb.parse
    import bb.siggen
    import bb.utils
    from bb.parse.parse_py import BBHandler  # noqa: F401 (registers the parsers)

    print("  (bitbake %s)" % bb.__version__)
    meta = os.path.join(work, "oe-core-standin")
    os.makedirs(os.path.join(meta, "conf"))
    os.makedirs(os.path.join(meta, "classes"))
    with open(os.path.join(meta, "conf", "bitbake.conf"), "w") as f:
        f.write(BITBAKE_CONF)
    for name, body in CLASSES.items():
        with open(os.path.join(meta, "classes", name + ".bbclass"), "w") as f:
            f.write(body)

    def config(**extra):
        bb.parse.clear_cache()
        d = bb.data.init()
        d.setVar("__bbclasstype", "global")
        d.setVar("BBPATH", meta)
        d.setVar("TOPDIR", os.path.join(work, "build"))
        for k, v in extra.items():
            d.setVar(k, v)
        d = bb.parse.handle(os.path.join("conf", "bitbake.conf"), d, 0)
        d.setVar("LAYERDIR", LAYER)
        d = bb.parse.handle(os.path.join(LAYER, "conf", "layer.conf"), d, 0)
        d.delVar("LAYERDIR")
        d.setVar("BBPATH", d.getVar("BBPATH"))
        bb.parse.BBHandler.inherit("base", "config", 0, d)
        d.setVar("__bbclasstype", "recipe")
        bb.parse.siggen = bb.siggen.init(d)
        return d

    def parse(recipe, **extra):
        d = config(**extra)
        stores = bb.parse.handle(recipe, bb.data.createCopy(d), 0)
        return stores[""]

    def skipped(rd):
        return rd.getVar("__SKIPPED")

    recipes = {}
    for name in sorted(os.listdir(RECIPES)):
        if name.endswith(".bb"):
            recipes[name.rsplit("_", 1)[0]] = os.path.join(RECIPES, name)
    src_bb, bin_bb = recipes.get("tether-agent"), recipes.get("tether-agent-bin")
    if not check("both recipes are there", src_bb and bin_bb, sorted(recipes)):
        return

    d = config()
    check("layer.conf parses: collection tether-agent", "tether-agent" in (d.getVar("BBFILE_COLLECTIONS") or "").split())

    # --- tether-agent, local checkout (the default) -------------------------------------------
    rd = parse(src_bb)
    check("tether-agent parses", not skipped(rd), skipped(rd))
    check("tether-agent builds the checkout around the layer (S)", rd.getVar("S") == TOP, rd.getVar("S"))
    check("  with externalsrc, separate build directory", rd.getVar("EXTERNALSRC") == TOP and rd.getVar("B") != TOP)
    src_uri = rd.getVar("SRC_URI").split()
    crates = [u for u in src_uri if u.startswith("crate://")]
    check("  SRC_URI: the layer's files and every crate, no git", "file://agent.json" in src_uri
          and "file://tether-agent.service" in src_uri and crates and not any(u.startswith("git://") for u in src_uri),
          src_uri[:4])
    missing = [n for n in crates if not rd.getVarFlag("SRC_URI", n.split(";name=")[1] + ".sha256sum")]
    check("  each of the %d crates has its sha256 flag" % len(crates), not missing, missing[:3])
    try:
        fetch = bb.fetch2.Fetch(src_uri, rd)
        types_ = sorted({fetch.ud[u].type for u in fetch.urls})
        locals_ = [fetch.localpath(u) for u in fetch.urls if fetch.ud[u].type == "file"]
        check("  bitbake's fetcher takes every entry (%s)" % ", ".join(types_), True)
        check("  and finds the local files in the layer", all(os.path.exists(p) for p in locals_), locals_)
    except Exception as e:  # noqa: BLE001
        check("  bitbake's fetcher takes every entry", False, e)
    check("  strip left to the build system", rd.getVar("CARGO_PROFILE_RELEASE_STRIP") == "false"
          and rd.getVarFlag("CARGO_PROFILE_RELEASE_STRIP", "export"))
    check("  tetherctl in its own package", (rd.getVar("PACKAGES") or "").split()[0] == "tether-agent-ctl"
          and rd.getVar("FILES:tether-agent-ctl").strip() == "/usr/bin/tetherctl")
    check("  init script and unit declared", rd.getVar("INITSCRIPT_NAME") == "tether-agent"
          and rd.getVar("SYSTEMD_SERVICE:tether-agent") == "tether-agent.service")

    # tether-agent's do_install, with a fake cargo output
    if src_bb:
        fake_target = os.path.join(work, "target", "some-triple", "release")
        os.makedirs(fake_target)
        for b in ("tether-agent", "tetherctl"):
            with open(os.path.join(fake_target, b), "w") as f:
                f.write("#!/bin/sh\necho %s\n" % b)
        keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5xk0fake alice@ops",
                'ops="ping,config" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9fake ci@build']
        rd = parse(src_bb, TETHER_AGENT_AUTHORIZED_KEYS="\\n".join(keys))
        rd.setVar("B", work)
        rd.setVar("CARGO_TARGET_SUBDIR", "some-triple/release")
        try:
            # Only the layer's files: the crates would need the network.
            files = [u for u in rd.getVar("SRC_URI").split() if u.startswith("file://")]
            bb.utils.mkdirhier(rd.getVar("UNPACKDIR"))
            bb.fetch2.Fetch(files, rd).unpack(rd.getVar("UNPACKDIR"))
            bb.build.exec_func("do_install", rd)
            check_image(rd.getVar("D"), with_ctl=True, authorized_keys=keys)
        except Exception as e:  # noqa: BLE001
            check("tether-agent do_install runs", False, e)

    # --- git mode -----------------------------------------------------------------------------
    rev = "0123456789abcdef0123456789abcdef01234567"
    for recipe in (src_bb, bin_bb):
        rd = parse(recipe, TETHER_AGENT_SRCDIR="", TETHER_AGENT_SRCREV=rev, TETHER_AGENT_DIST_URL="https://example.invalid/v1")
        pn = rd.getVar("PN")
        src_uri = rd.getVar("SRC_URI").split()
        gits = [u for u in src_uri if u.startswith("git://")]
        check("%s with TETHER_AGENT_SRCDIR = \"\" fetches git into tether-src" % pn,
              len(gits) == 1 and "destsuffix=tether-src" in gits[0] and rd.getVar("S").endswith("/sources/tether-src")
              and not rd.getVar("EXTERNALSRC"), (gits, rd.getVar("S")))
        try:
            fetch = bb.fetch2.Fetch(gits, rd)
            ud = fetch.ud[fetch.urls[0]]
            check("  bitbake's git fetcher takes it at TETHER_AGENT_SRCREV", ud.revision == rev if hasattr(ud, "revision")
                  else ud.revisions.get("default") == rev)
        except Exception as e:  # noqa: BLE001
            check("  bitbake's git fetcher takes it", False, e)
    rd = parse(src_bb, TETHER_AGENT_SRCDIR="")
    try:
        bb.fetch2.Fetch([u for u in rd.getVar("SRC_URI").split() if u.startswith("git://")], rd)
        check("git mode without TETHER_AGENT_SRCREV is refused", False, "bitbake accepted SRCREV INVALID")
    except Exception as e:  # noqa: BLE001
        check("git mode without TETHER_AGENT_SRCREV is refused (%s)" % type(e).__name__, "SRCREV" in str(e), e)

    # Before styhead (no UNPACKDIR) files land in WORKDIR.
    rd = parse(bin_bb, TETHER_AGENT_SRCDIR="", TETHER_AGENT_SRCREV=rev, TETHER_AGENT_DIST_URL="https://example.invalid/v1")
    rd.delVar("UNPACKDIR")
    check("without UNPACKDIR (kirkstone..scarthgap) S is WORKDIR/tether-src",
          rd.getVar("S") == rd.expand("${WORKDIR}/tether-src"), rd.getVar("S"))

    # --- tether-agent-bin on machines -----------------------------------------------------------
    machines = [
        ("qemuarmv5", "arm", "arm armv5 thumb dsp", "armv5te-unknown-linux-musleabi"),
        ("raspberrypi0", "arm", "arm armv6 vfp thumb callconvention-hard", "arm-unknown-linux-musleabihf"),
        ("qemuarm", "arm", "arm armv7ve vfp thumb neon callconvention-hard", "armv7-unknown-linux-musleabihf"),
        ("qemuarm64", "aarch64", "aarch64 armv8a crc cortexa57", "aarch64-unknown-linux-musl"),
        ("qemux86", "i686", "m32 core2", "i686-unknown-linux-musl"),
        ("qemux86-64", "x86_64", "m64 corei7", "x86_64-unknown-linux-musl"),
        ("qemumips", "mips", "o32 bigendian fpu-hard mips32r2", None),
    ]
    for machine, arch, tune, target in machines:
        rd = parse(bin_bb, MACHINE=machine, TARGET_ARCH=arch, TUNE_FEATURES=tune)
        if target is None:
            check("tether-agent-bin is skipped on %s" % machine, skipped(rd), "not skipped")
            continue
        name = "tether-agent-%s-%s" % (rd.getVar("PV"), target)
        src_uri = rd.getVar("SRC_URI").split()
        check("tether-agent-bin on %s installs %s" % (machine, name), not skipped(rd) and rd.getVar("TETHER_AGENT_BIN") == name
              and "file://" + name in src_uri, skipped(rd) or (rd.getVar("TETHER_AGENT_BIN"), src_uri))

    rd = parse(bin_bb, TETHER_AGENT_DIST_URL="https://downloads.example.invalid/v9")
    name = rd.getVar("TETHER_AGENT_BIN")
    rd.setVarFlag("TETHER_AGENT_BIN_SHA256", name, "ab" * 32)
    src_uri = rd.getVar("SRC_URI").split()
    check("tether-agent-bin downloads from TETHER_AGENT_DIST_URL, pinned by TETHER_AGENT_BIN_SHA256",
          "https://downloads.example.invalid/v9/%s;name=bin" % name in src_uri
          and rd.getVarFlag("SRC_URI", "bin.sha256sum") == "ab" * 32, src_uri)

    # --- tether-agent-bin: fetch, unpack, verify and install from a fake dist/ ----------------
    dist = os.path.join(work, "dist")
    os.makedirs(dist)
    rd = parse(bin_bb, TETHER_AGENT_DIST_DIR=dist)
    name = rd.getVar("TETHER_AGENT_BIN")
    payload = b"\x7fELF fake tether-agent\n"
    with open(os.path.join(dist, name), "wb") as f:
        f.write(payload)
    digest = hashlib.sha256(payload).hexdigest()
    with open(os.path.join(dist, "SHA256SUMS"), "w") as f:
        f.write("%s  %s\n%s  tether-agent-%s-other-target\n" % (digest, name, "0" * 64, rd.getVar("PV")))
    rd = parse(bin_bb, TETHER_AGENT_DIST_DIR=dist)
    try:
        for task in ("do_fetch", "do_unpack", "do_compile", "do_install"):
            bb.build.exec_func(task, rd)
        check("tether-agent-bin fetches, unpacks, checks and installs %s" % name, True)
        check_image(rd.getVar("D"), with_ctl=False, payload=payload)
        check("  the tree files came from the checkout", open(os.path.join(rd.getVar("S"), "LICENSE"), "rb").read()
              == open(os.path.join(TOP, "LICENSE"), "rb").read())
    except Exception as e:  # noqa: BLE001
        check("tether-agent-bin fetches, unpacks, checks and installs %s" % name, False, e)

    messages = Messages()
    logging.getLogger("BitBake").addHandler(messages)
    for what, sums, pin, why in (
            ("a SHA256SUMS that disagrees", "%s  %s\n" % ("1" * 64, name), None, "but SHA256SUMS says"),
            ("a SHA256SUMS without it", "%s  README\n" % ("1" * 64), None, "is not listed in the SHA256SUMS"),
            ("a pin that disagrees", "%s  %s\n" % (digest, name), "2" * 64, "but TETHER_AGENT_BIN_SHA256[")):
        with open(os.path.join(dist, "SHA256SUMS"), "w") as f:
            f.write(sums)
        rd = parse(bin_bb, TETHER_AGENT_DIST_DIR=dist)
        if pin:
            rd.setVarFlag("TETHER_AGENT_BIN_SHA256", name, pin)
        messages.lines.clear()
        try:
            for task in ("do_fetch", "do_unpack", "do_compile"):
                bb.build.exec_func(task, rd)
            check("tether-agent-bin refuses a binary with %s" % what, False, "do_compile passed")
        except Exception as e:  # noqa: BLE001
            said = [m for m in messages.lines if why in m]
            check("tether-agent-bin refuses a binary with %s" % what, said, messages.lines[-1] if messages.lines else e)


def check_image(D, with_ctl, payload=None, authorized_keys=None):
    def mode(p):
        return stat.S_IMODE(os.stat(os.path.join(D, p)).st_mode)

    def exists(p):
        return os.path.exists(os.path.join(D, p))

    expect = {
        "usr/bin/tether-agent": 0o755,
        "etc/init.d/tether-agent": 0o755,
        "etc/default/tether-agent": 0o644,
        "etc/tether/agent.json": 0o644,
        "lib/systemd/system/tether-agent.service": 0o644,
        "var/lib/tether": 0o700,
    }
    if with_ctl:
        expect["usr/bin/tetherctl"] = 0o755
    wrong = ["%s (%s)" % (p, oct(mode(p)) if exists(p) else "missing") for p, m in sorted(expect.items())
             if not exists(p) or mode(p) != m]
    check("  installs %s with their modes" % ", ".join(sorted(expect)), not wrong, wrong)
    same = open(os.path.join(D, "etc/init.d/tether-agent"), "rb").read() == open(os.path.join(TOP, "init.d/tether-agent"), "rb").read()
    check("  the init script is the project's init.d/tether-agent", same)
    unit = open(os.path.join(D, "lib/systemd/system/tether-agent.service")).read()
    check("  the unit has its paths filled in", "@" not in unit and "ExecStart=/usr/bin/tether-agent " in unit
          and "EnvironmentFile=-/etc/default/tether-agent" in unit)
    if payload is not None:
        check("  /usr/bin/tether-agent is the binary from dist/", open(os.path.join(D, "usr/bin/tether-agent"), "rb").read() == payload)
    keys_file = os.path.join(D, "etc/tether/authorized_keys")
    if authorized_keys is None:
        check("  no authorized_keys without TETHER_AGENT_AUTHORIZED_KEYS", not os.path.exists(keys_file))
    else:
        installed = open(keys_file).read() if os.path.exists(keys_file) else None
        check("  TETHER_AGENT_AUTHORIZED_KEYS installed as /etc/tether/authorized_keys, one key a line, 0644",
              installed == "\n".join(authorized_keys) + "\n" and mode("etc/tether/authorized_keys") == 0o644,
              repr(installed))


if __name__ == "__main__":
    sys.exit(main())
