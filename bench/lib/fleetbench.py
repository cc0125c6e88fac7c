#!/usr/bin/env python3
"""bench/fleet's driver: a fleet of real agents on one Mosquitto, then on a cluster of aedes
nodes sharing Redis (both started by bench/fleet), measured side by side. Standard library
only; the MQTT client is tetherbench.py's.

    fleetbench.py --agent-bin B --ctl-bin C --work DIR --pids-file F
                  --mosquitto PORT:PID --nodes PORT:PID,PORT:PID,... --redis-pid PID
                  [--agents N] [--heartbeat S] [--window N]

For each broker: starts the agents (at most --window of them started and not yet online at
once), times them until all are online (their retained status, watched at QoS 0), lists them
with `tetherctl devices --json` through every node, sums their memory from /proc, sends each a
`ping` (a retained request, as `tetherctl cmd --queue` leaves it). On the cluster, node 0 is
killed (SIGKILL) just before the pings: it times every agent that was on it until it is online
again through the others, and lists the fleet again 10 s later and at the end. Heartbeats are watched all
along from a node that stays up: their `seq` gaps are compared with the agents' own `dropped`
counters. Every agent logs to its own file; a command logged `executing` twice is counted.
Prints the table; writes every figure to DIR/results.json.
"""

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

from tetherbench import ROOT, Mqtt, is_final, init_payload, retained

# After all agents are back, how long the cluster gets before the fleet is listed again: the
# dead node's wills come 3 to 5 s late from the others, and the agents they hit put it right.
SETTLE_AFTER_FAILOVER_S = 10
STOP_TIMEOUT_S = 20


def log(text):
    print(f"  {time.strftime('%H:%M:%S')} {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# What a raw subscriber on one node sees of the whole fleet


class Watcher(threading.Thread):
    """Reads `R/+/status`, `R/+/heartbeat` and `R/+/cmd/ping/+` at QoS 0 on its own thread,
    from before the first agent starts until the end of the phase."""

    def __init__(self, port, name):
        super().__init__(daemon=True)
        self.client = Mqtt(port, f"bench-fleet-watch-{name}-{os.getpid()}")
        self.client.subscribe([f"{ROOT}/+/status", f"{ROOT}/+/heartbeat", f"{ROOT}/+/cmd/ping/+"])
        self.lock = threading.Lock()
        self.stopping = False
        self.error = None
        self.online_at = {}  # device -> when its first online status came
        self.since_floor = None  # set at a node kill: a status with since >= it is a new connection
        self.back_at = {}  # device -> when its first status with such a since came
        self.offline = Counter()  # device -> offline statuses (wills, clean stops) seen live
        self.seqs = defaultdict(list)  # device -> heartbeat seqs seen live, in order
        self.dropped = {}  # device -> the highest `dropped` its heartbeats carried
        self.beat_at = {}  # device -> when its latest live heartbeat came
        self.finals = {}  # command topic -> when its final state came

    def run(self):
        try:
            while not self.stopping:
                ready, _, _ = select.select([self.client], [], [], 0.2)
                if ready:
                    self.client.receive()
                messages = self.client.take()
                if messages:
                    with self.lock:
                        for m in messages:
                            self._take(m)
        except Exception as e:  # reported by check()
            self.error = e

    def _take(self, m):
        parts = m.topic.split("/")
        if len(parts) < 3 or parts[0] != ROOT:
            return
        device, kind, value = parts[1], parts[2], m.json()
        if kind == "status" and isinstance(value, dict):
            if value.get("online") is True:
                self.online_at.setdefault(device, m.at)
                floor = self.since_floor
                if floor is not None and isinstance(value.get("since"), int) and value["since"] >= floor:
                    self.back_at.setdefault(device, m.at)
            elif not m.retained:
                self.offline[device] += 1
        elif kind == "heartbeat" and not m.retained and isinstance(value, dict):
            self.seqs[device].append(value.get("seq"))
            self.dropped[device] = max(self.dropped.get(device, 0), value.get("dropped") or 0)
            self.beat_at[device] = m.at
        elif kind == "cmd" and len(parts) == 5 and is_final(value):
            self.finals.setdefault(m.topic, m.at)

    def check(self):
        if self.error is not None:
            raise RuntimeError(f"the watcher lost its connection: {self.error}")

    def count(self, what, devices):
        """How many of `devices` are in the dict named `what`."""
        with self.lock:
            table = getattr(self, what)
            return sum(1 for d in devices if d in table)

    def stop(self):
        self.stopping = True
        self.join(2)
        try:
            self.client.close()
        except OSError:
            pass


def fmt_s(x):
    return "-" if x is None else f"{x:.1f} s"


def wait_for(what, done, timeout, watcher):
    """Polls `done()` until it is true; returns the seconds it took, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        watcher.check()
        if done():
            return time.monotonic() - started
        time.sleep(0.05)
    log(f"gave up waiting {timeout:.0f} s for {what}")
    return None


# ---------------------------------------------------------------------------------------------
# The agents


class Fleet:
    def __init__(self, args, label, urls):
        self.args, self.label, self.urls = args, label, urls
        self.ids = [f"{label}-{i:05}" for i in range(args.agents)]
        self.dir = os.path.join(args.work, label)
        self.procs = {}

    def start(self, i):
        """Agent i, its config, state and log in DIR/LABEL/ID/; it tries node i mod N first."""
        device = self.ids[i]
        home = os.path.join(self.dir, device)
        os.makedirs(home, exist_ok=True)
        n = len(self.urls)
        urls = [self.urls[(i + k) % n] for k in range(n)]
        config = {
            "broker": {"url": urls if n > 1 else urls[0], "keepalive_s": 10},
            "device_id": device,
            "state_dir": os.path.join(home, "state"),
            "heartbeat": {"interval_s": self.args.heartbeat},
            "reconnect": {"min_s": 1, "max_s": 5},
            "reboot_command": ["/bin/false"],
        }
        with open(os.path.join(home, "agent.json"), "w") as f:
            json.dump(config, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env["RUST_LOG"] = "info"
        with open(os.path.join(home, "agent.log"), "wb") as out:
            proc = subprocess.Popen([self.args.agent_bin, "--config", os.path.join(home, "agent.json")],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        self.procs[device] = proc
        with open(self.args.pids_file, "a") as f:
            f.write(f"{proc.pid}\n")

    def start_all(self, watcher):
        """Starts every agent, at most `window` started and not online yet at once; returns the
        seconds until all were online (None if some never were)."""
        started = time.monotonic()
        for i in range(len(self.ids)):
            # Only this fleet's devices report on this broker.
            while i - len(watcher.online_at) >= self.args.window:
                watcher.check()
                if time.monotonic() - started > self.args.online_timeout:
                    break
                time.sleep(0.02)
            self.start(i)
            self.check_alive()
        log(f"{self.label}: {len(self.ids)} agents started in {time.monotonic() - started:.1f} s")
        left = self.args.online_timeout - (time.monotonic() - started)
        wait_for("every agent online", lambda: watcher.count("online_at", self.ids) == len(self.ids),
                 max(left, 1), watcher)
        with watcher.lock:
            times = [watcher.online_at[d] - started for d in self.ids if d in watcher.online_at]
        return {"all_online_s": max(times) if len(times) == len(self.ids) else None,
                "online": len(times), "median_online_s": statistics.median(times) if times else None}

    def check_alive(self):
        dead = [d for d, p in self.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"agent {dead[0]} exited ({self.procs[dead[0]].returncode}): see "
                               f"{os.path.join(self.dir, dead[0], 'agent.log')}")

    def memory(self):
        """Sum of PSS and of RSS over the agents, in kB, from /proc/PID/smaps_rollup."""
        pss = rss = 0
        for proc in self.procs.values():
            fields = smaps_rollup(proc.pid)
            pss += fields.get("Pss", 0)
            rss += fields.get("Rss", 0)
        return {"pss_kb": pss, "rss_kb": rss}

    def log_text(self, device):
        with open(os.path.join(self.dir, device, "agent.log"), errors="replace") as f:
            return f.read()

    def node_of(self, ports):
        """device -> index of the node its latest connection went to, from its log."""
        where = {}
        for device in self.ids:
            found = re.findall(r"connected to mqtt://127\.0\.0\.1:(\d+)", self.log_text(device))
            if found and int(found[-1]) in ports:
                where[device] = ports.index(int(found[-1]))
        return where

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # All reaped: their pids may be reused, so bench/fleet's cleanup must not signal them.
        open(self.args.pids_file, "w").close()

    def logs_summary(self):
        """From the agents' logs: commands started twice, connections, statuses republished."""
        twice, connections, republished, already = [], Counter(), 0, 0
        for device in self.ids:
            text = self.log_text(device)
            started = Counter(re.findall(r"command (\S+): executing", text))
            twice += [f"{device} {cmd} ×{n}" for cmd, n in started.items() if n > 1]
            connections[device] = text.count("connected to ")
            republished += text.count("shows this device offline while it is connected")
            already += text.count("already handled: not run again")
        return {"executing_twice": twice, "max_connections": max(connections.values(), default=0),
                "reconnections": sum(n - 1 for n in connections.values() if n > 1),
                "status_republished": republished, "already_handled": already}


def smaps_rollup(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def tree_rss_kb(pids):
    """RSS of processes, in kB (a broker's memory)."""
    return sum(smaps_rollup(pid).get("Rss", 0) for pid in pids)


# ---------------------------------------------------------------------------------------------
# Operator's side


def devices(args, port, ids, runs=3):
    """`tetherctl devices --json` through the node on `port`, `runs` times: the median time,
    and the fewest of `ids` listed online, the worst exit status."""
    results = [devices_once(args, port, ids) for _ in range(runs)]
    return {"s": statistics.median(r["s"] for r in results), "online": min(r["online"] for r in results),
            "listed": min(r["listed"] for r in results), "exit": max(r["exit"] for r in results),
            "not_online": sorted({d for r in results for d in r["not_online"]})[:20]}


def devices_once(args, port, ids):
    """`tetherctl devices --json` through the node on `port`: seconds, ids listed online, exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_") and k != "RUST_LOG"}
    # Device keys pinned per broker, in the work dir: the user's own known_devices stays as it
    # was, and the fleets of the two brokers (same ids, other keys) do not clash.
    env["TETHER_KNOWN_DEVICES"] = os.path.join(args.work, f"known_devices-{port}")
    started = time.monotonic()
    out = subprocess.run([args.ctl_bin, "--broker", f"mqtt://127.0.0.1:{port}", "devices", "--json"],
                         stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120)
    took = time.monotonic() - started
    wanted, online, listed = set(ids), set(), 0
    if out.returncode == 0:
        rows = json.loads(out.stdout)
        listed = sum(1 for r in rows if r["id"] in wanted)
        online = {r["id"] for r in rows if r["id"] in wanted and r["online"] is True}
    else:
        log(f"tetherctl devices on port {port} failed ({out.returncode}): {out.stderr.decode()[-300:]}")
    return {"s": round(took, 3), "online": len(online), "listed": listed, "exit": out.returncode,
            "not_online": sorted(wanted - online)[:20]}


def send_pings(port, ids, label):
    """One retained `ping` request per device, through the node on `port`; returns the topics."""
    topics = [f"{ROOT}/{d}/cmd/ping/fleet-{label}-{d}" for d in ids]
    operator = Mqtt(port, f"bench-fleet-operator-{label}-{os.getpid()}")
    operator.publish_all([(t, init_payload()) for t in topics], retain=True)
    operator.close()
    return topics


def final_states(port, label, topics, settle_s):
    states = retained(port, f"{ROOT}/+/cmd/ping/+", settle_s=settle_s)
    wanted = set(topics)
    return sum(1 for t, p in states.items() if t in wanted and is_final(json.loads(p) if p else None))


def heartbeat_figures(watcher, ids):
    """Per agent, seqs missing from 1 to the highest seen live, against its own `dropped`."""
    missing = duplicates = seen = dropped = beyond = 0
    worst = []
    with watcher.lock:
        for d in ids:
            seqs = [s for s in watcher.seqs.get(d, []) if isinstance(s, int)]
            if not seqs:
                continue
            distinct = set(seqs)
            gap = max(distinct) - len(distinct)  # seqs start at 1 in a fresh state dir
            seen += len(distinct)
            duplicates += len(seqs) - len(distinct)
            missing += gap
            dropped += watcher.dropped.get(d, 0)
            if gap > watcher.dropped.get(d, 0):
                beyond += gap - watcher.dropped.get(d, 0)
                absent = sorted(set(range(1, max(distinct) + 1)) - distinct)
                worst.append(f"{d}: missing {absent[:10]}, dropped {watcher.dropped.get(d, 0)}")
    return {"seen": seen, "missing": missing, "duplicates": duplicates, "dropped": dropped,
            "lost_beyond_dropped": beyond, "examples": worst[:10]}


# ---------------------------------------------------------------------------------------------
# One broker


def kill_node(watcher, pid):
    """SIGKILL to a node; from then on the watcher notes each device's first online status of a
    connection made after it. Returns when it was killed."""
    time.sleep(1)  # `since` is in seconds: a new connection must not share the old one's
    with watcher.lock:
        watcher.since_floor = int(time.time())
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def wait_back(watcher, moved, killed):
    """Waits until each of `moved` is online through a new connection; their times."""
    done = wait_for("the agents of the dead node back online",
                    lambda: watcher.count("back_at", moved) == len(moved), 120, watcher)
    with watcher.lock:
        times = sorted(watcher.back_at[d] - killed for d in moved if d in watcher.back_at)
    return {"moved": len(moved), "back": len(times),
            "all_back_s": times[-1] if done is not None and times else None,
            "median_back_s": statistics.median(times) if times else None}


def wait_answers(watcher, topics, sent):
    """Waits until every command of `topics` has a final state; the last one's time."""
    done = wait_for("every ping answered", lambda: len(watcher.finals) >= len(topics), 120, watcher)
    with watcher.lock:
        last = max(watcher.finals.values(), default=None)
    return {"sent": len(topics), "all_answered_s": None if done is None else last - sent}


def phase(args, label, nodes, broker_pids, kill=False):
    """The fleet on one broker: `nodes` is [(port, pid)], node 0 is the one killed."""
    ports = [port for port, _ in nodes]
    survivor = len(nodes) - 1  # watches, lists and sends after the kill
    result = {"broker": label, "nodes": len(nodes)}
    watcher = Watcher(ports[survivor], label)
    watcher.start()
    fleet = Fleet(args, label, [f"mqtt://127.0.0.1:{p}" for p in ports])
    log(f"{label}: starting {args.agents} agents over {len(nodes)} node(s), at most {args.window} "
        f"connecting at once")
    try:
        result.update(fleet.start_all(watcher))
        log(f"{label}: {result['online']}/{args.agents} online, the last after {fmt_s(result['all_online_s'])}")
        time.sleep(2)
        result["devices"] = [devices(args, p, fleet.ids) for p in ports]
        for i, d in enumerate(result["devices"]):
            log(f"{label}: tetherctl devices through node {i}: {d['online']}/{args.agents} online, {fmt_s(d['s'])}")
        fleet.check_alive()
        result["memory"] = fleet.memory()
        result["broker_rss_kb"] = tree_rss_kb(broker_pids)
        where = fleet.node_of(ports)
        result["per_node"] = [sum(1 for n in where.values() if n == i) for i in range(len(nodes))]

        ref = time.monotonic()
        if kill:
            moved = [d for d, n in where.items() if n == 0]
            ref = kill_node(watcher, nodes[0][1])
            log(f"{label}: node 0 killed with {len(moved)} agents on it")
        pinged = time.monotonic()
        topics = send_pings(ports[survivor], fleet.ids, label)
        if kill:
            result["failover"] = wait_back(watcher, moved, ref)
            log(f"{label}: {result['failover']['back']}/{len(moved)} back online, the last after "
                f"{fmt_s(result['failover']['all_back_s'])}")
        result["pings"] = wait_answers(watcher, topics, pinged)
        log(f"{label}: {len(watcher.finals)}/{len(topics)} pings answered")
        if kill:
            back = result["failover"]["all_back_s"] or 0
            time.sleep(max(ref + back + SETTLE_AFTER_FAILOVER_S - time.monotonic(), 0))
            result["after"] = [devices(args, p, fleet.ids) for p in ports[1:]]
            for i, d in enumerate(result["after"], 1):
                log(f"{label}: {SETTLE_AFTER_FAILOVER_S} s later, tetherctl devices through node {i}: "
                    f"{d['online']}/{args.agents} online")
            result["per_node_after"] = [sum(1 for n in fleet.node_of(ports).values() if n == i)
                                        for i in range(len(nodes))]

        # A heartbeat lost at the kill shows as a gap once a later one has come: wait for one
        # made after the kill (on Mosquitto: after the pings) from every agent.
        later = ref + args.heartbeat + 2

        def every_beat_later():
            with watcher.lock:
                return all(watcher.beat_at.get(d, 0) >= later for d in fleet.ids)
        wait_for("a heartbeat after the kill from every agent", every_beat_later, args.heartbeat * 2 + 30, watcher)
        if kill:
            result["end"] = devices(args, ports[survivor], fleet.ids, runs=1)
            result["end"]["after_kill_s"] = time.monotonic() - ref
            log(f"{label}: at the end, tetherctl devices through node {survivor}: "
                f"{result['end']['online']}/{args.agents} online")
        with watcher.lock:
            # Not in the table: aedes drops most of a dead node's wills on their way to a live
            # subscriber that had messages from that node before (see the README).
            result["offline_statuses"] = sum(watcher.offline[d] for d in fleet.ids)
            result["pings"]["answered_live"] = len(watcher.finals)
        result["pings"]["final_retained"] = final_states(ports[survivor], label, topics,
                                                         settle_s=1.0 if len(nodes) > 1 else 0)
        result["heartbeats"] = heartbeat_figures(watcher, fleet.ids)
        fleet.check_alive()
    finally:
        fleet.stop()
        watcher.stop()
    result.update(fleet.logs_summary())
    return result


# ---------------------------------------------------------------------------------------------
# The table


def table(args, mosq, clus):
    n, a = clus["nodes"], args.agents

    def secs(x, digits=1):
        return "-" if x is None else f"{x:.{digits}f} s"

    def ratio(m, c):
        return "" if not m or c is None else f"{c / m:.1f}x"

    def row(name, m, c, r=""):
        print(f"  {name:<42}{m:>20}{c:>20}{r:>8}")

    def listed(d):
        return f"{secs(d['s'], 2)}, {d['online']}/{a}"

    print()
    print(f"bench/fleet: {a} agents, heartbeat {args.heartbeat} s, keepalive 10 s, reconnect 1-5 s, at most "
          f"{args.window} connecting at once; {os.cpu_count()} cores, load "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    row("", "Mosquitto", f"{n} aedes + Redis", "ratio")
    row("all online, from the first start", secs(mosq["all_online_s"]), secs(clus["all_online_s"]),
        ratio(mosq["all_online_s"], clus["all_online_s"]))
    row("  median agent online", secs(mosq["median_online_s"]), secs(clus["median_online_s"]),
        ratio(mosq["median_online_s"], clus["median_online_s"]))
    row("agents per node", "/".join(map(str, mosq["per_node"])), "/".join(map(str, clus["per_node"])))
    for i in range(n):
        m, c = (mosq["devices"][0] if i == 0 else None), clus["devices"][i]
        row(f"tetherctl devices via node {i}, online", listed(m) if m else "", listed(c),
            ratio(m["s"], c["s"]) if m else "")
    pss = (mosq["memory"]["pss_kb"] / a, clus["memory"]["pss_kb"] / a)
    rss = (mosq["memory"]["rss_kb"] / a, clus["memory"]["rss_kb"] / a)
    row("agent memory per agent, PSS", f"{pss[0]:.0f} kB", f"{pss[1]:.0f} kB", ratio(*pss))
    row("agent memory per agent, RSS", f"{rss[0]:.0f} kB", f"{rss[1]:.0f} kB", ratio(*rss))
    brk = (mosq["broker_rss_kb"] / 1024, clus["broker_rss_kb"] / 1024)
    row("broker memory, RSS", f"{brk[0]:.0f} MiB", f"{brk[1]:.0f} MiB", ratio(*brk))
    mp, cp = mosq["pings"], clus["pings"]
    row("pings answered, last after (*)", f"{mp['final_retained']}/{mp['sent']}, {secs(mp['all_answered_s'], 2)}",
        f"{cp['final_retained']}/{cp['sent']}, {secs(cp['all_answered_s'], 2)}")
    row("commands executed twice", str(len(mosq["executing_twice"])), str(len(clus["executing_twice"])))
    mh, ch = mosq["heartbeats"], clus["heartbeats"]
    row("heartbeats seen live (distinct seqs)", str(mh["seen"]), str(ch["seen"]))
    row("  seqs missing / agents' dropped", f"{mh['missing']} / {mh['dropped']}", f"{ch['missing']} / {ch['dropped']}")
    row("  seqs seen twice", str(mh["duplicates"]), str(ch["duplicates"]))
    row("reconnections (agents' logs)", str(mosq["reconnections"]), str(clus["reconnections"]))
    f = clus["failover"]
    print(f"  (*) from the first request; on the cluster, sent right after node 0 was killed")
    print(f"cluster, node 0 killed (SIGKILL) with {f['moved']} agents on it:")
    print(f"  back online through the others: {f['back']}/{f['moved']}, the last after {secs(f['all_back_s'])} "
          f"(median {secs(f['median_back_s'])}); agents per node then {'/'.join(map(str, clus['per_node_after']))}")
    print(f"  {SETTLE_AFTER_FAILOVER_S} s later, tetherctl devices: " + "; ".join(
        f"via node {i} {listed(d)} online" for i, d in enumerate(clus["after"], 1)))
    e = clus["end"]
    print(f"  {e['after_kill_s']:.0f} s after the kill, tetherctl devices via node {n - 1}: {listed(e)} online")
    print(f"  late wills of the dead node put right by their agents (status published again): "
          f"{clus['status_republished']}")
    problems = []
    for r in (mosq, clus):
        name = r["broker"]
        if r["all_online_s"] is None:
            problems.append(f"{name}: {a - r['online']} agents never came online")
        for d in r["devices"] + r.get("after", []) + ([r["end"]] if "end" in r else []):
            if d["online"] != a:
                problems.append(f"{name}: tetherctl devices listed {d['online']}/{a} online (exit {d['exit']}), "
                                f"not online: {' '.join(d['not_online'][:10])}")
        if r["pings"]["final_retained"] != r["pings"]["sent"]:
            problems.append(f"{name}: {r['pings']['sent'] - r['pings']['final_retained']} pings without a final state")
        if r["executing_twice"]:
            problems.append(f"{name}: commands executed twice: {r['executing_twice'][:5]}")
        if r["heartbeats"]["lost_beyond_dropped"]:
            problems.append(f"{name}: heartbeats lost beyond dropped: {r['heartbeats']['examples'][:5]}")
    if f["back"] != f["moved"]:
        problems.append(f"cluster: {f['moved'] - f['back']} agents of the dead node never came back")
    print("problems: " + ("; ".join(problems) if problems else "none"))
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent-bin", required=True)
    p.add_argument("--ctl-bin", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--pids-file", required=True)
    p.add_argument("--mosquitto", required=True, help="PORT:PID")
    p.add_argument("--nodes", required=True, help="PORT:PID,... (node 0 is killed)")
    p.add_argument("--redis-pid", type=int, required=True)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--heartbeat", type=int, default=25)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--online-timeout", type=float, default=600)
    args = p.parse_args()
    parse = lambda spec: tuple(int(x) for x in spec.split(":"))  # noqa: E731
    mosquitto = [parse(args.mosquitto)]
    nodes = [parse(s) for s in args.nodes.split(",")]
    started = time.monotonic()
    try:
        mosq = phase(args, "mosq", mosquitto, [mosquitto[0][1]])
        clus = phase(args, "clus", nodes, [pid for _, pid in nodes] + [args.redis_pid], kill=True)
    except (OSError, RuntimeError, TimeoutError) as e:
        sys.exit(f"fleetbench: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"mosquitto": mosq, "cluster": clus}, f, indent=1)
    problems = table(args, mosq, clus)
    print(f"one run: {time.monotonic() - started:.0f} s")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
