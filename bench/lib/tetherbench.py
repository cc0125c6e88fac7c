#!/usr/bin/env python3
"""Measurements for bench/burst and bench/soak: a bare MQTT 3.1.1 client over plain TCP
(standard library only: a mosquitto_pub per message would take minutes, and mosquitto_sub at
QoS 1 loses messages past the broker's queue bound), the agent under test as a child process,
and its memory read from /proc.

    tetherbench.py burst --bin B --label L --plain-port P --wss-port W --ca CA --work DIR [--count N]
        one burst of N retained `ping` requests; prints one JSON line of results
    tetherbench.py summary FILE
        min / median of each burst result per label, and their ratios
    tetherbench.py soak --bin B --plain-port P --wss-port W --ca CA --work DIR [options]
        idle RSS, then N commands (each cleared, as tetherctl does) and M `heartbeat`
        commands; prints VmRSS / VmHWM over time; exit 1 when RSS ends > 10 % above idle
"""

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

ROOT = "tether"

# ---------------------------------------------------------------------------------------------
# MQTT 3.1.1, the packets a benchmark needs


def _string(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _remaining_length(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(header, body):
    return bytes([header]) + _remaining_length(len(body)) + body


class Publish:
    __slots__ = ("topic", "payload", "retained", "at")

    def __init__(self, topic, payload, retained, at):
        self.topic, self.payload, self.retained, self.at = topic, payload, retained, at

    def json(self):
        try:
            return json.loads(self.payload)
        except ValueError:
            return None


class Mqtt:
    """One connection. Subscribes at QoS 0 (a stock Mosquitto caps QoS 1 deliveries at ~1,000
    queued); publishes at QoS 0 or 1, pipelined."""

    def __init__(self, port, client_id):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbuf = bytearray()
        self.next_pkid = 0
        self.acks = 0
        self.connacked = self.subacked = False
        self.messages = []
        keepalive = 3600
        self.sock.sendall(_packet(0x10, _string("MQTT") + bytes([4, 0x02]) + struct.pack(">H", keepalive)
                                  + _string(client_id)))
        self._wait(lambda: self.connacked, 10, "no CONNACK")

    def fileno(self):
        return self.sock.fileno()

    def _pkid(self):
        self.next_pkid = self.next_pkid % 65535 + 1
        return self.next_pkid

    def subscribe(self, filters):
        body = struct.pack(">H", self._pkid()) + b"".join(_string(f) + b"\x00" for f in filters)
        self.subacked = False
        self.sock.sendall(_packet(0x82, body))
        self._wait(lambda: self.subacked, 10, "no SUBACK")

    def publish_all(self, messages, retain, qos=1):
        """Sends every (topic, payload) at once; with QoS 1, waits for every acknowledgement."""
        header = 0x30 | (qos << 1) | (1 if retain else 0)
        out = bytearray()
        for topic, payload in messages:
            pkid = struct.pack(">H", self._pkid()) if qos else b""
            out += _packet(header, _string(topic) + pkid + payload)
        before = self.acks
        self.sock.sendall(out)
        if qos:
            want = before + len(messages)
            self._wait(lambda: self.acks >= want, 60, f"{len(messages)} publishes not acknowledged in 60 s")

    def take(self):
        """The publishes received since the last call."""
        out, self.messages = self.messages, []
        return out

    def receive(self):
        """Reads what the socket has now, without waiting."""
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        if data == b"":
            raise ConnectionError("the broker closed the connection")
        if data:
            self.inbuf += data
        self._parse()

    def _parse(self):
        now = time.monotonic()
        while len(self.inbuf) >= 2:
            length, shift, pos = 0, 0, 1
            while True:
                if pos >= len(self.inbuf):
                    return
                byte = self.inbuf[pos]
                length |= (byte & 0x7F) << shift
                shift += 7
                pos += 1
                if not byte & 0x80:
                    break
            if len(self.inbuf) < pos + length:
                return
            header = self.inbuf[0]
            body = bytes(self.inbuf[pos:pos + length])
            del self.inbuf[:pos + length]
            kind = header >> 4
            if kind == 2:
                if body[1] != 0:
                    raise ConnectionError(f"connection refused, code {body[1]}")
                self.connacked = True
            elif kind == 4:
                self.acks += 1
            elif kind == 9:
                self.subacked = True
            elif kind == 3:
                qos = (header >> 1) & 3
                topic_len = struct.unpack(">H", body[:2])[0]
                topic = body[2:2 + topic_len].decode("utf-8", "replace")
                start = 2 + topic_len + (2 if qos else 0)
                self.messages.append(Publish(topic, body[start:], bool(header & 1), now))

    def _wait(self, done, timeout, what):
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(what)
            select.select([self.sock], [], [], left)
            self.receive()

    def close(self):
        try:
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()


def wait_any(clients, timeout):
    """Publishes from any of `clients` within `timeout` (maybe none)."""
    buffered = any(client.messages for client in clients)
    ready, _, _ = select.select(clients, [], [], 0 if buffered else max(timeout, 0))
    out = []
    for client in clients:
        if client in ready:
            client.receive()
        out += client.take()
    return out


def retained(port, topic_filter, settle_s=0.0):
    """The retained messages under `topic_filter` now: topic -> payload. A probe published
    after subscribing marks the end of the retained replay on Mosquitto; brokers that stream
    retained messages after the SUBACK (aedes) send the probe first: with `settle_s`, reading
    goes on after the probe until no retained message came for that long."""
    probe = f"{ROOT}/_bench/snapshot/{os.getpid()}/{time.monotonic_ns()}"
    client = Mqtt(port, f"bench-snapshot-{os.getpid()}-{time.monotonic_ns()}")
    client.subscribe([topic_filter, probe])
    client.publish_all([(probe, b"end")], retain=False, qos=0)
    found = {}
    probed, last_retained = False, time.monotonic()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for m in wait_any([client], 0.05 if probed else 1):
            if m.topic == probe:
                probed = True
            elif m.retained:
                found[m.topic] = m.payload
                last_retained = m.at
        if probed and time.monotonic() - last_retained >= settle_s:
            client.close()
            return found
    raise TimeoutError(f"the snapshot of {topic_filter} did not end within 60 s")


# ---------------------------------------------------------------------------------------------
# The agent under test


def memory_kb(pid):
    """VmRSS (= RssAnon, the heap and stacks, + RssFile, the binary's pages read so far + RssShmem),
    VmHWM and Threads of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


class Agent:
    def __init__(self, binary, work, args, device, heartbeat_s, extra_config=None):
        os.makedirs(work, exist_ok=True)
        self.work = work
        self.config = os.path.join(work, "agent.json")
        self.state_dir = os.path.join(work, "state")
        self.log_path = os.path.join(work, "agent.log")
        config = {
            "broker": {"url": f"wss://localhost:{args.wss_port}/mqtt", "ca_file": args.ca},
            "device_id": device,
            "state_dir": self.state_dir,
            "heartbeat": {"interval_s": heartbeat_s},
            **(extra_config or {}),
        }
        with open(self.config, "w") as f:
            json.dump(config, f)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([binary, "--config", self.config], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        self.pid = self.proc.pid

    def memory(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited ({self.proc.returncode}); see {self.log_path}")
        return memory_kb(self.pid)

    def connections(self):
        with open(self.log_path, errors="replace") as f:
            return f.read().count("connected to ")

    def stop(self):
        """Stops the agent; when a measurement failed, shows the end of its log (the work
        directory is about to be deleted)."""
        if sys.exc_info()[0] is not None:
            with open(self.log_path, errors="replace") as f:
                tail = f.readlines()[-20:]
            sys.stderr.write("the agent's last log lines:\n" + "".join("  " + line for line in tail))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_online(watcher, device, beats_wanted=2, timeout=30):
    """Waits for the device's online status and live heartbeats; returns the last one's time."""
    online, beats = False, []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for m in wait_any([watcher], 0.5):
            if m.topic == f"{ROOT}/{device}/status" and (m.json() or {}).get("online") is True:
                online = True
            if m.topic == f"{ROOT}/{device}/heartbeat" and not m.retained and online:
                beats.append(m.at)
        if len(beats) >= beats_wanted:
            return beats[-1]
    raise TimeoutError(f"{device} not online with live heartbeats within {timeout} s")


def is_final(state):
    return isinstance(state, dict) and state.get("status") in ("successful", "failed")


def init_payload(params=None):
    return json.dumps({"status": "init", **(params or {})}).encode()


# ---------------------------------------------------------------------------------------------
# bench/burst: one burst


def burst(args):
    device = f"burst-{args.label}-{os.getpid()}"
    watcher = Mqtt(args.plain_port, f"bench-watch-{device}")
    watcher.subscribe([f"{ROOT}/{device}/status", f"{ROOT}/{device}/heartbeat"])
    answers = Mqtt(args.plain_port, f"bench-answers-{device}")
    answers.subscribe([f"{ROOT}/{device}/cmd/ping/+"])
    agent = Agent(args.bin, args.work, args, device, heartbeat_s=1)
    try:
        last_beat = wait_online(watcher, device)
        time.sleep(1)
        rss_before = agent.memory()["VmRSS"]
        result = run_burst(args, device, agent, watcher, answers, last_beat)
        result["rss_before_kb"] = rss_before
    finally:
        agent.stop()
    print(json.dumps(result), flush=True)


def run_burst(args, device, agent, watcher, answers, last_beat):
    requests = [(f"{ROOT}/{device}/cmd/ping/b{i:05}", init_payload()) for i in range(args.count)]
    operator = Mqtt(args.plain_port, f"bench-operator-{device}")
    started = time.monotonic()
    sender = threading.Thread(target=operator.publish_all, args=(requests, True))
    sender.start()
    beats, finals, offline, peak_rss = [last_beat], {}, 0, 0
    settle_until = None
    last_progress = started
    while settle_until is None or time.monotonic() < settle_until:
        for m in wait_any([watcher, answers], 0.1):
            if m.topic.endswith("/heartbeat") and not m.retained:
                beats.append(m.at)
            elif m.topic.endswith("/status") and (m.json() or {}).get("online") is False:
                offline += 1
            elif "/cmd/ping/" in m.topic and is_final(m.json()) and m.topic not in finals:
                finals[m.topic] = m.at
                last_progress = m.at
        peak_rss = max(peak_rss, agent.memory()["VmRSS"])
        now = time.monotonic()
        stalled = now - last_progress > args.stall_s
        if settle_until is None and (len(finals) == args.count or stalled or now - started > args.max_s):
            # Heartbeats keep being watched a little longer: a gap may straddle the end.
            settle_until = now + 3
    sender.join()
    operator.close()
    memory = agent.memory()
    states = {t: json.loads(p) if p else None for t, p in retained(args.plain_port, f"{ROOT}/{device}/cmd/ping/+").items()}
    answered = sum(1 for s in states.values() if is_final(s))
    took = (max(finals.values()) - started) if finals else float("nan")
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    return {
        "label": args.label,
        "count": args.count,
        "answered": answered,
        "answered_live": len(finals),
        "left_init": sum(1 for s in states.values() if isinstance(s, dict) and s.get("status") == "init"),
        "seconds": round(took, 3),
        "per_s": round(len(finals) / took, 1) if finals else 0.0,
        "heartbeats": len(beats) - 1,
        "worst_gap_s": round(max(gaps), 3) if gaps else float("nan"),
        "offline_statuses": offline,
        "connections": agent.connections(),
        "peak_rss_kb": max(peak_rss, memory["VmHWM"]),
        "rss_after_kb": memory["VmRSS"],
    }


# ---------------------------------------------------------------------------------------------
# bench/burst: the summary


BURST_METRICS = [
    # key, label, format, higher is better
    ("answered", "commands answered (of {count})", "{:.0f}", True),
    ("per_s", "commands/s end to end", "{:.0f}", True),
    ("seconds", "s to the last answer", "{:.2f}", False),
    ("worst_gap_s", "worst heartbeat gap, s (1 s interval)", "{:.2f}", False),
    ("offline_statuses", "offline statuses (broker gave up)", "{:.0f}", False),
    ("connections", "connections made (1 = never dropped)", "{:.0f}", False),
    ("peak_rss_kb", "peak RSS (VmHWM), kB", "{:.0f}", False),
    ("rss_after_kb", "RSS after the burst, kB", "{:.0f}", False),
]


def summary(args):
    runs = {}
    with open(args.file) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                runs.setdefault(r["label"], []).append(r)
    labels = list(runs)
    count = runs[labels[0]][0]["count"]
    print(f"{len(runs[labels[0]])} runs each; min / median (min = fewest, or lowest, not best)")
    header = f"{'':40}" + "".join(f"{label:>24}" for label in labels)
    if len(labels) == 2:
        header += f"{labels[0] + ' / ' + labels[1]:>22}"
    print(header)
    for key, name, fmt, _ in BURST_METRICS:
        row = f"{name.format(count=count):40}"
        medians = []
        for label in labels:
            values = [r[key] for r in runs[label]]
            medians.append(statistics.median(values))
            row += f"{fmt.format(min(values)) + ' / ' + fmt.format(medians[-1]):>24}"
        if len(medians) == 2:
            row += f"{ratio(medians[0], medians[1]):>22}"
        print(row)


def ratio(a, b):
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.2f}x"


# ---------------------------------------------------------------------------------------------
# bench/soak


class Sampler:
    """Prints VmRSS and VmHWM every `every` seconds with the phase and progress."""

    def __init__(self, agent, every):
        self.agent, self.every = agent, every
        self.started = time.monotonic()
        self.phase, self.progress = "idle", ""
        self.next_print = 0.0
        print(f"{'t, s':>7}  {'phase':<13} {'progress':<14} {'VmRSS kB':>9} {'VmHWM kB':>9} {'RssAnon':>8} "
              f"{'RssFile':>8} {'threads':>7}")

    def tick(self, force=False):
        now = time.monotonic() - self.started
        if force or now >= self.next_print:
            self.next_print = now + self.every
            m = self.agent.memory()
            print(f"{now:7.1f}  {self.phase:<13} {self.progress:<14} {m['VmRSS']:9} {m['VmHWM']:9} "
                  f"{m['RssAnon']:8} {m['RssFile']:8} {m['Threads']:7}", flush=True)
            return m
        return None


def soak(args):
    device = f"soak-{os.getpid()}"
    cmd_filter = f"{ROOT}/{device}/cmd/+/+"
    watcher = Mqtt(args.plain_port, f"bench-watch-{device}")
    watcher.subscribe([f"{ROOT}/{device}/status", f"{ROOT}/{device}/heartbeat", cmd_filter])
    agent = Agent(args.bin, args.work, args, device, heartbeat_s=args.interval_s)
    seqs = {"answered": set(), "published": set()}
    after = []
    try:
        wait_online(watcher, device, beats_wanted=1)
        sampler = Sampler(agent, args.sample_s)
        idle = settle(sampler, args.idle_s, [watcher])["VmRSS"]
        operator = Mqtt(args.plain_port, f"bench-operator-{device}")
        for r in range(1, args.rounds + 1):
            drive(sampler, f"commands {r}", operator, watcher, device, "ping", args.commands, args.batch, seqs)
            drive(sampler, f"heartbeats {r}", operator, watcher, device, "heartbeat", args.heartbeats, 1, seqs)
            after.append(settle(sampler, args.idle_s, [watcher])["VmRSS"])
        left = retained(args.plain_port, cmd_filter)
        state_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(agent.state_dir) for f in fs)
    finally:
        agent.stop()
    unpublished = len(seqs["answered"] - seqs["published"])
    print(f"heartbeat commands answered: {len(seqs['answered'])} distinct seqs, {unpublished} of them not seen "
          f"published; commands left retained on the broker: {len(left)}; state dir: {state_bytes} bytes")
    print(f"idle VmRSS {idle} kB")
    for r, rss in enumerate(after, 1):
        print(f"after round {r} ({args.commands} commands, {args.heartbeats} heartbeats) and {args.idle_s:.0f} s "
              f"idle: VmRSS {rss} kB, {(rss - idle) / idle * 100:+.1f} % over idle")
    growth = (after[-1] - idle) / idle * 100
    problems = [what for what, bad in [
        (f"RSS {growth:+.1f} % over idle (limit +10 %)", growth > 10),
        ("commands left on the broker", len(left) > 0),
        ("heartbeats missing", len(seqs["answered"]) < args.heartbeats * args.rounds or unpublished)] if bad]
    print("soak: " + ("RSS within 10 % of idle" if not problems else "FAILED: " + "; ".join(problems)))
    sys.exit(1 if problems else 0)


def settle(sampler, seconds, clients):
    """Lets the agent idle for `seconds` (reading what arrives); returns the last sample."""
    sampler.phase, sampler.progress = "idle", ""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        wait_any(clients, min(0.5, max(end - time.monotonic(), 0)))
        sampler.tick()
    return sampler.tick(force=True)


def drive(sampler, phase, operator, watcher, device, op, total, batch, seqs):
    """Sends `total` `op` commands, `batch` at a time; waits for each batch's final states,
    then clears them (an empty retained message), as tetherctl does after each command."""
    sampler.phase = phase
    done = 0
    while done < total:
        n = min(batch, total - done)
        prefix = phase.replace(" ", "")
        topics = [f"{ROOT}/{device}/cmd/{op}/{prefix}-{i:06}" for i in range(done, done + n)]
        waiting = set(topics)
        operator.publish_all([(t, init_payload()) for t in topics], retain=True)
        end = time.monotonic() + 30
        while waiting:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(waiting)} {op} commands unanswered after 30 s, e.g. {min(waiting)}")
            for m in wait_any([watcher], 0.5):
                state = m.json()
                if m.topic.endswith("/heartbeat") and isinstance(state, dict):
                    seqs["published"].add(state.get("seq"))
                elif m.topic in waiting and is_final(state):
                    waiting.discard(m.topic)
                    if op == "heartbeat":
                        seqs["answered"].add((state.get("result") or {}).get("seq"))
        operator.publish_all([(t, b"") for t in topics], retain=True)
        tenth = (done * 10 // total, (done + n) * 10 // total)
        done += n
        sampler.progress = f"{done}/{total}"
        sampler.tick(force=tenth[0] != tenth[1])


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("burst", "soak"):
        p = sub.add_parser(name)
        p.add_argument("--bin", required=True)
        p.add_argument("--plain-port", type=int, required=True)
        p.add_argument("--wss-port", type=int, required=True)
        p.add_argument("--ca", required=True)
        p.add_argument("--work", required=True)
    b = sub.choices["burst"]
    b.add_argument("--label", required=True)
    b.add_argument("--count", type=int, default=5000)
    b.add_argument("--stall-s", type=float, default=20, help="give up after this long without a new answer")
    b.add_argument("--max-s", type=float, default=300)
    s = sub.choices["soak"]
    s.add_argument("--commands", type=int, default=10000)
    s.add_argument("--heartbeats", type=int, default=3456)
    s.add_argument("--batch", type=int, default=100, help="commands in flight at once")
    s.add_argument("--interval-s", type=int, default=25, help="the agent's own heartbeat interval")
    s.add_argument("--rounds", type=int, default=2, help="repeats of the load: a creep grows each round")
    s.add_argument("--idle-s", type=float, default=30)
    s.add_argument("--sample-s", type=float, default=5)
    m = sub.add_parser("summary")
    m.add_argument("file")
    args = parser.parse_args()
    try:
        {"burst": burst, "soak": soak, "summary": summary}[args.what](args)
    except (OSError, RuntimeError) as e:  # timeouts and refused connections included
        sys.exit(f"tetherbench {args.what}: {e}")


if __name__ == "__main__":
    main()
