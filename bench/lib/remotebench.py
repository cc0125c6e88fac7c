#!/usr/bin/env python3
"""Measurements for bench/remote: remote access (tetherctl shell and forward) through a local
Mosquitto over wss + TLS, side by side with OpenSSH on the same machine, and the agent's memory,
commands and heartbeats while a tunnel runs at full speed. Standard library only, plus the
programs measured (tether-agent, tetherctl, ssh, sshd) and curl.

    remotebench.py measure --agent B --ctl B --plain-port P --wss-port W --ca CA --broker-pid PID
                           --work DIR --out FILE [--keys N] [--key-gap-ms MS] [--size-mib N]
                           [--runs N] [--requests N] [--no-ssh]
        runs every measurement, prints each figure as it comes and writes them all to FILE (JSON)
    remotebench.py summary FILE [--size-bytes N] [--size-note TEXT]
        the table of goals, measured figures and whether each is met
"""

import argparse
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tetherbench as tb  # noqa: E402  (the MQTT client, the agent, /proc memory)

MIB = 1 << 20
HEARTBEAT_S = 1
PROMPT = b"BENCH> "
# Goals (the issue's): printed next to the figures, checked in the summary.
GOAL_ECHO_P99_MS = 5.0
GOAL_ECHO_VS_SSH = 2.0
GOAL_FORWARD_MB_S = 30.0
GOAL_RSS_DURING_KB = 8 * 1024
GOAL_RSS_BACK_PCT = 10.0
GOAL_PING_S = 1.0
GOAL_HEARTBEAT_GAP_S = 1.5 * HEARTBEAT_S
GOAL_ARMV5_BYTES = int(2.5 * MIB)


class Stop(Exception):
    """SIGTERM or SIGHUP: unwind, so that every `finally` cleans up."""


def on_signal(signum, _frame):
    # Once: a second signal (Ctrl-C, then bench/remote's SIGTERM) must not cut the cleanup short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# ---------------------------------------------------------------------------------------------
# Processes: every child is registered, and ended (TERM, then KILL) on the way out


class Children:
    def __init__(self):
        self.procs = []

    def start(self, argv, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kwargs)
        self.procs.append(proc)
        return proc

    def end(self, proc, grace=5.0):
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def end_all(self):
        for proc in reversed(list(self.procs)):
            self.end(proc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on {port} within {timeout} s")


def cpu_s(pid, children=False):
    """User + system CPU seconds of a process so far (0 when it is gone); with `children`, and
    those of its children that it has waited for (an sshd's sessions once they ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks = int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def percentile(sorted_values, p):
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(round(p / 100 * len(sorted_values) + 0.4999)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ---------------------------------------------------------------------------------------------
# OpenSSH beside it: a private sshd on a loopback port, the operator's key authorized


def start_sshd(children, work, operator_pub):
    """Starts sshd; returns (port, its process, the directory made for it or None) or raises
    RuntimeError saying why it cannot run."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.access(sshd, os.X_OK) or not shutil.which("ssh"):
        raise RuntimeError("no sshd or ssh (Debian: openssh-server, openssh-client)")
    sshd = os.path.abspath(sshd)  # sshd re-executes itself: it wants an absolute path
    d = os.path.join(work, "sshd")
    os.makedirs(d)
    host_key = os.path.join(d, "host_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
    authorized = os.path.join(d, "authorized_keys")
    shutil.copy(operator_pub, authorized)
    port = free_port()
    config = os.path.join(d, "sshd_config")
    with open(config, "w") as f:
        f.write(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {d}/sshd.pid
AuthorizedKeysFile {authorized}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
AllowTcpForwarding yes
PermitTTY yes
Subsystem sftp internal-sftp
PrintMotd no
PrintLastLog no
UseDNS no
LogLevel ERROR
""")
    # Debian's sshd, started as root, wants its privilege separation directory.
    made_run_dir = None
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)
        made_run_dir = "/run/sshd"
    check = subprocess.run([sshd, "-t", "-f", config], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"sshd -t: {check.stderr.strip()}")
    log = open(os.path.join(d, "sshd.log"), "wb")
    proc = children.start([sshd, "-D", "-e", "-f", config], stdout=log, stderr=log)
    wait_port(port, proc, 10, "sshd")
    return port, proc, made_run_dir


def ssh_argv(key, port, program="ssh"):
    """ssh (or scp: its port is -P) to the private sshd with the operator's key, nothing else."""
    return [program, "-4", "-F", "/dev/null", "-i", key, "-P" if program == "scp" else "-p", str(port),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]


# ---------------------------------------------------------------------------------------------
# Keystroke echo through a pty, as a person at a terminal types


class PtySession:
    """A program (tetherctl shell, ssh -tt) on the slave side of a fresh pty; we are the
    terminal: we write keys to the master and read what the program shows."""

    def __init__(self, children, argv, env, label):
        self.label = label
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.proc = children.start(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                   start_new_session=True)
        os.close(slave)
        self.children = children
        self.buf = bytearray()
        self.seen = bytearray()  # everything, for a failure's message

    def read_until(self, done, timeout):
        end = time.monotonic() + timeout
        while not done(self.buf):
            left = end - time.monotonic()
            if left <= 0:
                tail = bytes(self.seen[-300:]).decode("utf-8", "replace")
                raise TimeoutError(f"{self.label}: no expected output within {timeout} s; last output: {tail!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    data = b""
                if not data:
                    tail = bytes(self.seen[-300:]).decode("utf-8", "replace")
                    raise RuntimeError(f"{self.label}: the terminal closed; last output: {tail!r}")
                self.buf += data
                self.seen += data

    def quiet(self, seconds):
        """Reads until nothing came for `seconds`."""
        while True:
            ready, _, _ = select.select([self.master], [], [], seconds)
            if not ready:
                return
            data = os.read(self.master, 65536)
            if not data:
                return
            self.seen += data

    def start(self, timeout):
        """Waits for the remote shell, then sets a prompt of our own to know when a line is done."""
        self.read_until(lambda b: len(b) > 0, timeout)
        self.quiet(0.5)
        self.buf.clear()
        self.line(b"PS1='BENCH''> '", timeout=10)  # the echo shows BENCH''> , the prompt BENCH>

    def line(self, text, timeout=10):
        self.buf.clear()
        os.write(self.master, text + b"\r")
        self.read_until(lambda b: b.endswith(PROMPT), timeout)

    def key(self, ch):
        """One keystroke; the seconds until its echo came back."""
        self.buf.clear()
        started = time.perf_counter()
        os.write(self.master, ch)
        self.read_until(lambda b: ch in b, 5)
        return time.perf_counter() - started

    def close(self):
        try:
            os.write(self.master, b"\rexit\r")
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.children.end(self.proc)
        os.close(self.master)


def type_keys(session, count, gap_s, samples):
    """`count` printable keys, one at a time, each timed to its echo. Typed after `#` (a
    comment), in lines of 64 keys, so that the shell runs nothing and the line stays short."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
    typed = 0
    while typed < count:
        session.key(b"#")
        for i in range(min(64, count - typed)):
            time.sleep(gap_s)
            samples.append(session.key(alphabet[(typed + i) % len(alphabet):][:1]))
        typed += min(64, count - typed)
        session.line(b"")


def echo_stats(samples):
    ms = sorted(s * 1000 for s in samples)
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": ms[-1],
            "mean_ms": statistics.fmean(ms)}


def measure_echo(args, children, env, ssh_port, results):
    sessions = [("tetherctl", PtySession(children, [args.ctl, "shell", args.device], env, "tetherctl shell"))]
    if ssh_port:
        argv = ssh_argv(args.key, ssh_port) + ["-tt", "localhost", "/bin/sh", "-l"]
        sessions.append(("ssh", PtySession(children, argv, env, "ssh -tt")))
    samples = {label: [] for label, _ in sessions}
    try:
        for label, s in sessions:
            s.start(45)
        # Side by side: blocks of 100 keys, taking turns, so both see the same machine.
        total = args.keys * args.runs
        block = 0
        while block * 100 < total:
            n = min(100, total - block * 100)
            order = sessions if block % 2 == 0 else list(reversed(sessions))
            for label, s in order:
                type_keys(s, n, args.key_gap_ms / 1000, samples[label])
            block += 1
    finally:
        for _, s in sessions:
            s.close()
    for label, values in samples.items():
        results["echo"][label] = echo_stats(values)
        r = results["echo"][label]
        print(f"  {label:<10} {r['n']} keys: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
              f"max {r['max_ms']:.2f} ms (goal p99 <= {GOAL_ECHO_P99_MS:g} ms, within {GOAL_ECHO_VS_SSH:g}x of ssh)",
              flush=True)


# ---------------------------------------------------------------------------------------------
# Forward throughput, with the agent watched while it moves the bytes


class HeartbeatWatch(threading.Thread):
    """Records the arrival time of every live heartbeat of the device (plain MQTT, QoS 0)."""

    def __init__(self, port, device):
        super().__init__(daemon=True)
        self.client = tb.Mqtt(port, f"bench-{device}-beats")
        self.client.subscribe([f"{tb.ROOT}/{device}/heartbeat"])
        self.beats = []
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stopping.is_set():
                for m in tb.wait_any([self.client], 0.2):
                    if not m.retained:
                        self.beats.append(m.at)
        except (OSError, ConnectionError) as e:
            self.error = str(e)

    def stop(self):
        self.stopping.set()
        self.join(5)
        self.client.close()

    def worst_gap(self, start, end):
        """The longest time without a heartbeat that overlaps [start, end], and the beats in it."""
        beats = sorted(self.beats)
        gaps = [b - a for a, b in zip(beats, beats[1:]) if b >= start and a <= end]
        inside = sum(1 for b in beats if start <= b <= end)
        return (max(gaps) if gaps else float("nan")), inside


def make_blob(path, size):
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class Stalled(RuntimeError):
    """A download that got nothing for STALL_S seconds."""


STALL_S = 5
ATTEMPTS = 10  # a forwarded connection may lose its request (see README, "Remote access")


def curl(url, expect_bytes):
    """Downloads `url` to /dev/null; (seconds, MB/s). Stalled when nothing came for STALL_S."""
    out = subprocess.run(["curl", "-sS", "--max-time", "600", "--speed-time", str(STALL_S), "--speed-limit", "1",
                          "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url], capture_output=True, text=True)
    size, seconds = (out.stdout.split() + ["0", "0"])[:2]
    if out.returncode == 28:  # curl's "operation timed out"
        raise Stalled(f"curl {url}: stalled after {int(float(size))} bytes")
    if out.returncode != 0:
        raise RuntimeError(f"curl {url}: {out.stderr.strip()} (exit {out.returncode})")
    if int(float(size)) != expect_bytes:
        raise RuntimeError(f"curl {url}: {size} bytes, expected {expect_bytes}")
    seconds = float(seconds)
    return seconds, expect_bytes / 1e6 / seconds


def retried(what, stalls, attempt):
    """`attempt()`, again after a stall (counted in `stalls`), ATTEMPTS times at most."""
    for _ in range(ATTEMPTS - 1):
        try:
            return attempt()
        except Stalled as e:
            stalls.append(str(e))
            print(f"    {what}: {e}; again", flush=True)
    return attempt()


def curl_sha256(url):
    digest = hashlib.sha256()
    proc = subprocess.Popen(["curl", "-s", "--max-time", "600", "--speed-time", str(STALL_S), "--speed-limit", "1", url],
                            stdout=subprocess.PIPE)
    try:
        while True:
            chunk = proc.stdout.read(MIB)
            if not chunk:
                break
            digest.update(chunk)
    finally:
        proc.stdout.close()
        proc.wait()
    if proc.returncode == 28:
        raise Stalled(f"curl {url}: stalled")
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url}: exit {proc.returncode}")
    return digest.hexdigest()


def short_requests(port, count, timeout):
    """`count` HTTP/1.0 GETs of a small file, each sent the moment the connection is up (as
    curl and browsers do); (seconds of each answered one, how many got no answer in `timeout`)."""
    times, stalled = [], 0
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /small HTTP/1.0\r\nHost: bench\r\n\r\n")
            try:
                while s.recv(65536):
                    pass
                times.append(time.perf_counter() - started)
            except socket.timeout:
                stalled += 1
    return times, stalled


def start_forward(children, args, env, hport, log_path):
    """tetherctl forward on a port of the kernel's choice; returns (process, local port)."""
    log = open(log_path, "wb")
    proc = children.start([args.ctl, "forward", args.device, f"0:127.0.0.1:{hport}"], stdout=log, stderr=log, env=env)
    end = time.monotonic() + 45
    while time.monotonic() < end:
        with open(log_path, errors="replace") as f:
            for line in f:
                if "forwarding 127.0.0.1:" in line:
                    return proc, int(line.split("forwarding 127.0.0.1:")[1].split()[0])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path, errors="replace") as f:
        raise RuntimeError(f"tetherctl forward did not start: {f.read().strip()}")


def watched(agent, transfer, watch, pids, beside=None):
    """`transfer()` (a dict with at least "s" and "mb_s") on a thread while the agent's memory
    is sampled every 100 ms; `beside(done)` on another (done: an Event set when the transfer
    ended). Adds the agent's peak VmRSS, its VmHWM after, the worst heartbeat gap over the
    transfer, the CPU seconds (and % of the wall time) of each of `pids` (name -> pid, or
    (pid, True) to count the children it waited for) and how busy the machine was."""
    pids = {k: p if isinstance(p, tuple) else (p, False) for k, p in pids.items()}
    cpu0 = {k: cpu_s(*p) for k, p in pids.items()}
    busy0 = machine_busy()
    done = threading.Event()
    result = {}
    peak = {"VmRSS": 0, "Threads": 0}

    def run():
        try:
            result.update(transfer())
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            result["error"] = e
        finally:
            done.set()

    threads = [threading.Thread(target=run, daemon=True)]
    if beside:
        threads.append(threading.Thread(target=beside, args=(done,), daemon=True))
    started = time.monotonic()
    for t in threads:
        t.start()
    while not done.wait(0.1):
        m = agent.memory()
        peak["VmRSS"] = max(peak["VmRSS"], m["VmRSS"])
        peak["Threads"] = max(peak["Threads"], m["Threads"])
    ended = time.monotonic()
    for t in threads:
        t.join()
    busy1 = machine_busy()
    cpu = {k: cpu_s(*p) - cpu0[k] for k, p in pids.items() if not p[1]}
    if "error" in result:
        raise result["error"]
    time.sleep(HEARTBEAT_S * 1.5)  # the gap that straddles the end is closed by the next beat
    # After the pause: a process's children are counted once it has waited for them.
    cpu.update({k: cpu_s(*p) - cpu0[k] for k, p in pids.items() if p[1]})
    gap, beats = watch.worst_gap(started, ended)
    m = agent.memory()
    wall = ended - started
    result.update({
        "rss_max_kb": peak["VmRSS"], "hwm_kb": m["VmHWM"], "threads_max": peak["Threads"],
        "heartbeat_gap_s": gap, "heartbeats": beats, "cpu_s": cpu, "cpu_pct": {k: v / wall * 100 for k, v in cpu.items()},
        "machine_busy_pct": (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * 100,
    })
    return result


def watched_transfer(args, agent, forward, url, size, broker_pid, watch):
    """The download through tetherctl forward, watched, with a `tetherctl cmd DEV ping` timed
    1 s into it."""
    ping = {}

    def pinger(done):
        if done.wait(1.0):
            ping["note"] = "the transfer ended before the ping was sent"
            return
        started = time.monotonic()
        out = subprocess.run([args.ctl, "cmd", args.device, "ping"], capture_output=True, text=True, env=args.env)
        ping["s"] = time.monotonic() - started
        ping["code"] = out.returncode
        ping["during"] = not done.is_set()
        if out.returncode != 0:
            ping["note"] = (out.stderr or out.stdout).strip()[-200:]

    def download():
        seconds, mb_s = curl(url, size)
        return {"s": seconds, "mb_s": mb_s}

    pids = {"agent": agent.pid, "tetherctl": forward.pid, "mosquitto": broker_pid}
    result = watched(agent, download, watch, pids, beside=pinger)
    result["ping"] = ping
    return result


def memory(agent):
    """VmRSS and its two parts: RssAnon (heap, stacks) and RssFile (the binary's pages)."""
    m = agent.memory()
    return {k: m[k] for k in ("VmRSS", "RssAnon", "RssFile")}


def measure_forward(args, children, env, agent, ssh_port, watch, results):
    size = args.size_mib * MIB
    www = os.path.join(args.work, "www")
    os.makedirs(www)
    sha = make_blob(os.path.join(www, "blob"), size)
    make_blob(os.path.join(www, "small"), 1024)
    hport = free_port()
    http = children.start([sys.executable, "-m", "http.server", str(hport), "--bind", "127.0.0.1", "--directory", www],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(hport, http, 10, "python3 -m http.server")
    time.sleep(2)
    rss = results["rss"]
    rss["before_transfer"] = memory(agent)
    forward, fport = start_forward(children, args, env, hport, os.path.join(args.work, "forward.log"))
    paths = {"direct": hport, "tetherctl": fport}
    ssh_fwd = None
    if ssh_port:
        sport = free_port()
        ssh_fwd = children.start(ssh_argv(args.key, ssh_port) + ["-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                                                 f"{sport}:127.0.0.1:{hport}", "localhost"],
                                 stderr=subprocess.DEVNULL)
        wait_port(sport, ssh_fwd, 20, "ssh -L")
        paths["ssh"] = sport
    time.sleep(1)
    rss["forward_open"] = memory(agent)
    fw = results["forward"]
    fw.update({label: [] for label in paths})
    fw["watched"], fw["stalls"] = [], {label: [] for label in paths}
    labels = list(paths)
    for run in range(args.runs):
        order = labels[run % len(labels):] + labels[:run % len(labels)]
        for label in order:
            url = f"http://127.0.0.1:{paths[label]}/blob"
            stalls = fw["stalls"][label]
            if label == "tetherctl":
                w = retried(label, stalls, lambda: watched_transfer(args, agent, forward, url, size, args.broker_pid, watch))
                fw["watched"].append(w)
                fw[label].append(w["mb_s"])
                print(f"  run {run + 1}: tetherctl {w['mb_s']:.1f} MB/s ({w['s']:.1f} s); agent VmRSS max "
                      f"{w['rss_max_kb']} kB; ping {ping_text(w['ping'])}; worst heartbeat gap "
                      f"{w['heartbeat_gap_s']:.2f} s; CPU agent {w['cpu_pct']['agent']:.0f} %, tetherctl "
                      f"{w['cpu_pct']['tetherctl']:.0f} %, mosquitto {w['cpu_pct']['mosquitto']:.0f} %, "
                      f"machine {w['machine_busy_pct']:.0f} % busy", flush=True)
            else:
                seconds, mb_s = retried(label, stalls, lambda: curl(url, size))
                fw[label].append(mb_s)
                print(f"  run {run + 1}: {label:<9} {mb_s:.1f} MB/s ({seconds:.1f} s)", flush=True)
    got = retried("sha256", fw["stalls"]["tetherctl"], lambda: curl_sha256(f"http://127.0.0.1:{fport}/blob"))
    fw["sha256_ok"] = got == sha
    print(f"  sha256 of {args.size_mib} MiB through tetherctl forward: {'matches' if got == sha else 'DIFFERS: ' + got}",
          flush=True)
    # Short connections: the request goes out the moment the connection is up.
    fw["requests"] = {}
    for label in labels:
        times, stalled = short_requests(paths[label], args.requests, STALL_S)
        ms = sorted(t * 1000 for t in times)
        fw["requests"][label] = {"n": args.requests, "stalled": stalled, "p50_ms": percentile(ms, 50),
                                 "max_ms": ms[-1] if ms else float("nan")}
        r = fw["requests"][label]
        print(f"  {args.requests} short GETs via {label}: {stalled} got no answer within {STALL_S} s; answered in "
              f"p50 {r['p50_ms']:.1f} ms, max {r['max_ms']:.1f} ms", flush=True)
    time.sleep(5)
    rss["after_transfer"] = memory(agent)
    children.end(forward)
    if ssh_fwd:
        children.end(ssh_fwd)
    children.end(http)
    time.sleep(5)
    rss["after_close"] = memory(agent)
    rss["hwm_kb"] = agent.memory()["VmHWM"]


RSS_POINTS = [("idle", "idle, no tunnel yet"), ("before_transfer", "after the shells, before the forward"),
              ("forward_open", "forward open, idle"), ("after_transfer", "5 s after the last transfer"),
              ("after_close", "5 s after the forward closed")]


def exit_after_summary(ok):
    """The runs' last words: the machine's load (figures vary with it), then the exit status."""
    print()
    print(f"Shared machine: figures vary from run to run; compare the columns of one run. Load now: "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    sys.exit(0 if ok else 1)


def kb(m):
    return f"VmRSS {m['VmRSS']} kB (RssAnon {m['RssAnon']}, RssFile {m['RssFile']})"


def ping_text(ping):
    if "s" not in ping:
        return ping.get("note", "not sent")
    text = f"{ping['s']:.2f} s"
    if ping.get("code"):
        text += f" (exit {ping['code']}: {ping.get('note', '')})"
    if not ping.get("during"):
        text += " (ended after the transfer)"
    return text


# ---------------------------------------------------------------------------------------------


class Rig:
    """What bench/remote and bench/files set up alike, all ended on the way out (a `with`):
    - an operator key made by ssh-keygen (args.key) in the agent's authorized_keys, and
      tetherctl's environment (args.env: the broker over wss + TLS, that key, its own
      known_devices);
    - the agent (args.device = NAME-PID) with a HEARTBEAT_S heartbeat, online, its key recorded
      by a first `tetherctl cmd DEV ping` and a second one timed (ping_idle_s);
    - a private sshd on a loopback port with the same key authorized (ssh_port and sshd_pid; both
      None with --no-ssh or where sshd cannot run, and `ssh` says why);
    - `watch`, a HeartbeatWatch started."""

    def __init__(self, args, name, extra_config=None):
        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)
        self.args = args
        args.device = f"{name}-{os.getpid()}"
        os.makedirs(args.work, exist_ok=True)
        args.key = os.path.join(args.work, "operator")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-operator", "-f", args.key],
                       check=True)
        self.authorized = os.path.join(args.work, "authorized_keys")
        shutil.copy(args.key + ".pub", self.authorized)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_") and k not in ("SSH_AUTH_SOCK", "RUST_LOG")}
        env.update({"TETHER_BROKER": f"wss://localhost:{args.wss_port}/mqtt", "TETHER_CA": args.ca,
                    "TETHER_IDENTITY": args.key, "TETHER_KNOWN_DEVICES": os.path.join(args.work, "known_devices"),
                    "TERM": "xterm"})
        args.env = env
        self.extra_config = {"trust": {"authorized_keys": self.authorized}, **(extra_config or {})}
        self.children = Children()
        self.agent = self.watch = self.made_run_dir = None
        self.ssh_port = self.sshd_pid = self.ping_idle_s = None
        self.ssh = None

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start(self):
        args = self.args
        watcher = tb.Mqtt(args.plain_port, f"bench-{args.device}-watch")
        watcher.subscribe([f"{tb.ROOT}/{args.device}/status", f"{tb.ROOT}/{args.device}/heartbeat"])
        self.agent = tb.Agent(args.agent, os.path.join(args.work, "agent"), args, args.device,
                              heartbeat_s=HEARTBEAT_S, extra_config=self.extra_config)
        tb.wait_online(watcher, args.device)
        watcher.close()
        if args.no_ssh:
            self.ssh = "skipped: --no-ssh"
        else:
            try:
                self.ssh_port, sshd, self.made_run_dir = start_sshd(self.children, args.work, args.key + ".pub")
                self.sshd_pid = sshd.pid
                self.ssh = f"sshd on 127.0.0.1:{self.ssh_port}"
            except (RuntimeError, OSError, subprocess.CalledProcessError, TimeoutError) as e:
                self.ssh = f"skipped: {e}"
        print(f"  ssh: {self.ssh}", flush=True)
        # The first cmd records the device's key (trust on first use); the second is the idle figure.
        for _ in range(2):
            started = time.monotonic()
            subprocess.run([args.ctl, "cmd", args.device, "ping"], check=True, env=args.env, capture_output=True)
            self.ping_idle_s = time.monotonic() - started
        self.watch = HeartbeatWatch(args.plain_port, args.device)
        self.watch.start()

    def __exit__(self, *_exc):
        if self.watch:
            self.watch.stop()
        self.children.end_all()
        if self.agent:
            self.agent.stop()
        if self.made_run_dir:
            shutil.rmtree(self.made_run_dir, ignore_errors=True)


def print_goals(rows):
    """The table of the goals: rows of (goal, measured, met: True, False, None when not
    measured, or "" for a figure shown without a goal); returns the goals missed."""
    print()
    print(f"{'goal':<40}{'met':<5}measured")
    for goal, measured, met in rows:
        print(f"{goal:<40}{'' if met == '' else '-' if met is None else 'yes' if met else 'NO':<5}{measured}")
    missed = [goal.strip() for goal, _, met in rows if met is False]
    print(f"goals: {sum(1 for *_, m in rows if m)} met, {len(missed)} missed, "
          f"{sum(1 for *_, m in rows if m is None)} not measured")
    return missed


def rig_arguments(parser, *required):
    """A Rig's arguments (the binaries, the broker's ports, pid and CA, the work directory) and
    the `required` ones named, all required."""
    for name in ("--agent", "--ctl", "--ca", "--work", *required):
        parser.add_argument(name, required=True)
    for name in ("--plain-port", "--wss-port", "--broker-pid"):
        parser.add_argument(name, type=int, required=True)


def measure(args):
    results = {"keys": args.keys, "runs": args.runs, "size_mib": args.size_mib, "key_gap_ms": args.key_gap_ms,
               "echo": {}, "forward": {}, "rss": {}, "ping_idle_s": None, "ssh": None}
    try:
        with Rig(args, "remote") as rig:
            results.update({"device": args.device, "ssh": rig.ssh, "ping_idle_s": rig.ping_idle_s})
            time.sleep(2)
            results["rss"]["idle"] = memory(rig.agent)
            print(f"  agent idle: {kb(results['rss']['idle'])}; tetherctl cmd ping {results['ping_idle_s']:.2f} s",
                  flush=True)

            print(f"keystroke echo: {args.keys * args.runs} keys each, {args.key_gap_ms:g} ms between the echo of one "
                  "and the next key", flush=True)
            measure_echo(args, rig.children, args.env, rig.ssh_port, results)

            print(f"forward: {args.size_mib} MiB over HTTP (python3 -m http.server), curl to /dev/null, "
                  f"{args.runs} run(s); MB = 10^6 bytes", flush=True)
            measure_forward(args, rig.children, args.env, rig.agent, rig.ssh_port, rig.watch, results)
            if rig.watch.error:
                results["heartbeat_watch_error"] = rig.watch.error
    finally:
        with open(args.out, "w") as f:
            json.dump(results, f)


# ---------------------------------------------------------------------------------------------
# The summary


def summary(args):
    with open(args.file) as f:
        r = json.load(f)
    rows = []  # (goal, measured, met: True / False / None)

    echo = r.get("echo", {})
    t, s = echo.get("tetherctl"), echo.get("ssh")
    print()
    print(f"{'keystroke echo, ms':<34}{'p50':>9}{'p99':>9}{'max':>9}{'mean':>9}")
    for label, e in echo.items():
        print(f"  {label + ' (' + str(e['n']) + ' keys)':<32}{e['p50_ms']:9.2f}{e['p99_ms']:9.2f}{e['max_ms']:9.2f}"
              f"{e['mean_ms']:9.2f}")
    if t and s:
        print(f"  {'tetherctl / ssh':<32}" + "".join(f"{t[k] / s[k]:8.2f}x" for k in ("p50_ms", "p99_ms", "max_ms", "mean_ms")))
    if t:
        rows.append((f"keystroke echo p99 <= {GOAL_ECHO_P99_MS:g} ms", f"{t['p99_ms']:.2f} ms", t["p99_ms"] <= GOAL_ECHO_P99_MS))
        if s:
            ratio = t["p99_ms"] / s["p99_ms"]
            rows.append((f"  and within {GOAL_ECHO_VS_SSH:g}x of ssh (p99)", f"{ratio:.2f}x ({s['p99_ms']:.2f} ms ssh)",
                         ratio <= GOAL_ECHO_VS_SSH))
        else:
            rows.append((f"  and within {GOAL_ECHO_VS_SSH:g}x of ssh (p99)", f"no ssh ({r.get('ssh')})", None))

    fw = r.get("forward", {})
    labels = [label for label in ("direct", "tetherctl", "ssh") if fw.get(label)]
    if labels:
        print()
        print(f"{'forward ' + str(r['size_mib']) + ' MiB, MB/s':<34}{'min':>9}{'median':>9}{'max':>9}   vs direct")
        direct = statistics.median(fw["direct"]) if fw.get("direct") else None
        for label in labels:
            v = fw[label]
            vs = f"{statistics.median(v) / direct:8.2f}x" if direct else ""
            print(f"  {label:<32}{min(v):9.1f}{statistics.median(v):9.1f}{max(v):9.1f}   {vs}")
        if fw.get("tetherctl") and fw.get("ssh"):
            print(f"  {'tetherctl / ssh':<32}{'':>18}{statistics.median(fw['tetherctl']) / statistics.median(fw['ssh']):8.2f}x")
    requests = fw.get("requests", {})
    if requests:
        print()
        print(f"{'short GETs (1 KiB), sent at once':<34}{'stalled':>9}{'p50 ms':>9}{'max ms':>9}")
        for label, q in requests.items():
            print(f"  {label:<32}{str(q['stalled']) + '/' + str(q['n']):>9}{q['p50_ms']:9.1f}{q['max_ms']:9.1f}")
    if fw.get("tetherctl"):
        med = statistics.median(fw["tetherctl"])
        rows.append((f"forward >= {GOAL_FORWARD_MB_S:g} MB/s (median)", f"{med:.1f} MB/s", med >= GOAL_FORWARD_MB_S))
        rows.append(("sha256 through the forward", "matches" if fw.get("sha256_ok") else "DIFFERS", bool(fw.get("sha256_ok"))))
        stalls = len(fw["stalls"]["tetherctl"]) + requests.get("tetherctl", {}).get("stalled", 0)
        tries = len(fw["tetherctl"]) + len(fw["stalls"]["tetherctl"]) + 1 + requests.get("tetherctl", {}).get("n", 0)
        rows.append(("every forwarded connection answered", f"{stalls} of {tries} stalled", stalls == 0))

    rss = r.get("rss", {})
    watched = fw.get("watched", [])
    if watched:
        # VmHWM too: the kernel folds each thread's RSS count in now and then, so neither is exact.
        during = max(max(w["rss_max_kb"] for w in watched), max(w["hwm_kb"] for w in watched))
        rows.append((f"agent VmRSS during <= {GOAL_RSS_DURING_KB // 1024} MiB", f"{during} kB peak (VmRSS/100 ms, VmHWM)",
                     during <= GOAL_RSS_DURING_KB))
    if "after_close" in rss:
        print()
        print(f"{'agent memory, kB':<40}{'VmRSS':>9}{'RssAnon':>9}{'RssFile':>9}")
        for key, what in RSS_POINTS:
            m = rss[key]
            print(f"  {what:<38}{m['VmRSS']:9}{m['RssAnon']:9}{m['RssFile']:9}")
        if watched:
            print(f"  {'during the transfer, max (VmRSS)':<38}{max(w['rss_max_kb'] for w in watched):9}")
        print(f"  {'VmHWM at the end':<38}{rss['hwm_kb']:9}")
        base, after = rss["idle"], rss["after_close"]
        pct = (after["VmRSS"] - base["VmRSS"]) / base["VmRSS"] * 100
        rows.append((f"  back to idle after (<= +{GOAL_RSS_BACK_PCT:g} %)",
                     f"{after['VmRSS']} kB vs {base['VmRSS']} kB idle ({pct:+.1f} %; heap {after['RssAnon'] - base['RssAnon']:+} kB)",
                     pct <= GOAL_RSS_BACK_PCT))
    if watched:
        pings = [w["ping"] for w in watched]
        sent = [p for p in pings if "s" in p]
        if sent:
            worst = max(p["s"] for p in sent)
            ok = all(p.get("code") == 0 and p.get("during") for p in sent) and worst <= GOAL_PING_S
            rows.append((f"ping during the transfer <= {GOAL_PING_S:g} s", f"{worst:.2f} s (idle {r['ping_idle_s']:.2f} s)"
                         + ("" if all(p.get("during") for p in sent) else ", not all during"), ok))
        else:
            rows.append((f"ping during the transfer <= {GOAL_PING_S:g} s", pings[0].get("note", "not sent"), None))
        gap = max(w["heartbeat_gap_s"] for w in watched)
        rows.append((f"heartbeat gap <= {GOAL_HEARTBEAT_GAP_S:g} s ({HEARTBEAT_S} s interval)", f"{gap:.2f} s max",
                     gap <= GOAL_HEARTBEAT_GAP_S))

    if args.size_bytes:
        note = f" ({args.size_note})" if args.size_note else ""
        rows.append((f"armv5te binary <= {GOAL_ARMV5_BYTES / MIB:g} MiB",
                     f"{args.size_bytes} B = {args.size_bytes / MIB:.2f} MiB{note}", args.size_bytes <= GOAL_ARMV5_BYTES))
    else:
        rows.append((f"armv5te binary <= {GOAL_ARMV5_BYTES / MIB:g} MiB", args.size_note or "not built", None))

    print_goals(rows)
    if fw.get("tetherctl") and not fw.get("sha256_ok"):
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure")
    rig_arguments(m, "--out")
    m.add_argument("--keys", type=int, default=1000)
    m.add_argument("--key-gap-ms", type=float, default=20)
    m.add_argument("--size-mib", type=int, default=256)
    m.add_argument("--runs", type=int, default=1)
    m.add_argument("--requests", type=int, default=20, help="short GETs through each path")
    m.add_argument("--no-ssh", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("file")
    s.add_argument("--size-bytes", type=int)
    s.add_argument("--size-note")
    args = parser.parse_args()
    try:
        {"measure": measure, "summary": summary}[args.what](args)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # timeouts included
        sys.exit(f"remotebench {args.what}: {e}")
    except Stop as e:
        sys.exit(f"remotebench {args.what}: stopped by {e}")


if __name__ == "__main__":
    main()
