#!/usr/bin/env python3
"""Measurements for bench/files: `tetherctl get` and `tetherctl put` of one file through a local
Mosquitto over wss + TLS, side by side with scp to a private sshd on the same machine, the
agent's memory and heartbeats watched during each transfer. Standard library only, plus the
programs measured (tether-agent, tetherctl, scp, sshd); the agent, sshd and the watching are
remotebench.py's (its Rig).

    filesbench.py --agent B --ctl B --plain-port P --wss-port W --ca CA --broker-pid PID --work DIR
                  [--size-mib N] [--runs N] [--no-ssh] [--out FILE]

Each run copies the file both ways with each tool, the tools taking turns at going first, then a
1 KiB file both ways with each (what a copy costs whatever its size). Prints each copy as it
ends, then the figures, the goals and whether each is met; exits 1 when a copied file's sha256
differs from the original's.
"""

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import remotebench as rb  # noqa: E402  (the agent, sshd, the heartbeat watch, /proc)

MIB = rb.MIB
# Goals (the issue's): printed next to the figures, checked at the end.
GOAL_MB_S = 30.0
GOAL_VS_SCP = 3.0  # scp at most this many times faster
GOAL_RSS_DURING_KB = rb.GOAL_RSS_DURING_KB
GOAL_HEARTBEAT_GAP_S = rb.GOAL_HEARTBEAT_GAP_S
SMALL_BYTES = 1024
OPS = ("get", "put")
TIMEOUT_S = 600


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def copy(argv, env, size):
    """Runs one copy to its end: wall seconds, MB/s, and the CPU seconds of the client (with
    its children: scp's ssh)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])}: exit {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"s": seconds, "mb_s": size / 1e6 / seconds, "client_cpu_s": cpu}


class Copier:
    """The argv of each tool for each way; the device's side and the operator's are two
    directories of one machine."""

    def __init__(self, args, rig):
        self.args, self.rig = args, rig
        self.device_dir = os.path.join(args.work, "at-device")
        self.operator_dir = os.path.join(args.work, "at-operator")
        os.makedirs(self.device_dir)
        os.makedirs(self.operator_dir)

    def paths(self, op, name):
        """(source, destination) of a copy of `name` (a file in both directories' parent)."""
        source = os.path.join(self.args.work, name)
        side = self.operator_dir if op == "get" else self.device_dir
        return source, os.path.join(side, f"{op}-{name}")

    def argv(self, label, op, source, dest):
        a = self.args
        if label == "tetherctl":
            return [a.ctl, "get", a.device, source, dest] if op == "get" else [a.ctl, "put", source, a.device, dest]
        scp = rb.ssh_argv(a.key, self.rig.ssh_port, "scp") + ["-q"]
        return scp + ([f"localhost:{source}", dest] if op == "get" else [source, f"localhost:{dest}"])


def measure(args, rig, results):
    size = args.size_mib * MIB
    sha = rb.make_blob(os.path.join(args.work, "big"), size)
    small_sha = rb.make_blob(os.path.join(args.work, "small"), SMALL_BYTES)
    copier = Copier(args, rig)
    labels = ["tetherctl"] + (["scp"] if rig.ssh_port else [])
    pids = {"agent": rig.agent.pid, "mosquitto": args.broker_pid}
    if rig.sshd_pid:
        pids["sshd"] = (rig.sshd_pid, True)  # its sessions and sftp-server, once they ended
    big = results["big"] = {op: {label: [] for label in labels} for op in OPS}
    small = results["small"] = {op: {label: [] for label in labels} for op in OPS}
    checks = results["sha256"] = {"ok": 0, "bad": []}

    def verified(dest, want):
        got = sha256_file(dest)
        os.remove(dest)  # before its pages are written back: the next copy has the disk to itself
        if got == want:
            checks["ok"] += 1
            return "sha256 ok"
        checks["bad"].append(dest)
        return f"sha256 DIFFERS ({got})"

    for run in range(args.runs):
        for i, op in enumerate(OPS):
            order = labels if (run + i) % 2 == 0 else labels[::-1]
            for label in order:
                source, dest = copier.paths(op, "big")
                argv = copier.argv(label, op, source, dest)
                w = rb.watched(rig.agent, lambda: copy(argv, args.env, size), rig.watch, pids)
                big[op][label].append(w)
                check = verified(dest, sha)
                cpu = w["cpu_s"]
                parties = (("tetherctl", w["client_cpu_s"]), ("agent", cpu["agent"]), ("mosquitto", cpu["mosquitto"])) \
                    if label == "tetherctl" else (("scp+ssh", w["client_cpu_s"]), ("sshd", cpu.get("sshd", 0.0)))
                watched = (f"; agent VmRSS max {w['rss_max_kb']} kB, worst heartbeat gap {w['heartbeat_gap_s']:.2f} s"
                           if label == "tetherctl" else "")
                print(f"  run {run + 1}: {op} {label:<9} {w['mb_s']:6.1f} MB/s ({w['s']:.2f} s); {check}{watched}; CPU s "
                      + ", ".join(f"{k} {v:.2f}" for k, v in parties) + f"; machine {w['machine_busy_pct']:.0f} % busy",
                      flush=True)
        for op in OPS:
            for label in labels:
                source, dest = copier.paths(op, "small")
                s = copy(copier.argv(label, op, source, dest), args.env, SMALL_BYTES)
                small[op][label].append(s["s"])
                if verified(dest, small_sha) != "sha256 ok":
                    print(f"  run {run + 1}: {op} {label} of {SMALL_BYTES} B: sha256 DIFFERS", flush=True)
        print(f"  run {run + 1}: {SMALL_BYTES} B each way: "
              + "; ".join(f"{op} " + ", ".join(f"{label} {small[op][label][-1]:.2f} s" for label in labels) for op in OPS),
              flush=True)


# ---------------------------------------------------------------------------------------------
# The summary


def med(values):
    return statistics.median(values) if values else float("nan")


def summary(r):
    rows = []  # (goal, measured, met: True / False / None)
    big, small = r["big"], r["small"]
    labels = list(big["get"])
    print()
    print(f"{str(r['size_mib']) + ' MiB, MB/s (10^6 B/s), wall time':<40}{'min':>8}{'median':>8}{'max':>8}"
          f"{'1 KiB file, s':>15}   tetherctl / scp (median)")
    for op in OPS:
        for label in labels:
            v = [w["mb_s"] for w in big[op][label]]
            vs = ""
            if label == "tetherctl" and "scp" in labels:
                vs = f"   {med(v) / med([w['mb_s'] for w in big[op]['scp']]):.2f}x"
            print(f"  {op + ' ' + label:<38}{min(v):8.1f}{med(v):8.1f}{max(v):8.1f}{med(small[op][label]):15.2f}{vs}")
    print()
    print(f"{'CPU s per copy (median)':<40}{'client':>10}{'agent':>10}{'mosquitto':>10}{'sshd':>10}{'busy %':>8}")
    for op in OPS:
        for label in labels:
            ws = big[op][label]

            def col(name, ws=ws):
                return f"{med([w['cpu_s'][name] for w in ws]):10.2f}"

            cells = (col("agent") + col("mosquitto") + f"{'':>10}" if label == "tetherctl"
                     else f"{'':>20}" + (col("sshd") if "sshd" in ws[0]["cpu_s"] else f"{'':>10}"))
            print(f"  {op + ' ' + label:<38}{med([w['client_cpu_s'] for w in ws]):10.2f}{cells}"
                  f"{med([w['machine_busy_pct'] for w in ws]):8.0f}")

    t_all = [w for op in OPS for w in big[op]["tetherctl"]]
    print()
    rss = r["rss"]
    peak = max(w["rss_max_kb"] for w in t_all)
    hwm = max(w["hwm_kb"] for w in t_all)
    print(f"agent VmRSS: idle {rss['idle']['VmRSS']} kB; during the copies {peak} kB at most (every 100 ms), "
          f"VmHWM {hwm} kB; 5 s after the last {rss['after']['VmRSS']} kB")
    for op in OPS:
        t = med([w["mb_s"] for w in big[op]["tetherctl"]])
        rows.append((f"{op} >= {GOAL_MB_S:g} MB/s (median)", f"{t:.1f} MB/s", t >= GOAL_MB_S))
        goal = f"  and within {GOAL_VS_SCP:g}x of scp"
        if "scp" in labels:
            s = med([w["mb_s"] for w in big[op]["scp"]])
            rows.append((goal, f"scp {s / t:.2f}x faster ({s:.1f} MB/s)", s / t <= GOAL_VS_SCP))
        else:
            rows.append((goal, f"no scp ({r['ssh']})", None))
    checks = r["sha256"]
    rows.append(("sha256 of every file copied", f"{checks['ok']} of {checks['ok'] + len(checks['bad'])} match",
                 not checks["bad"]))
    during = max(peak, hwm)
    rows.append((f"agent VmRSS during <= {GOAL_RSS_DURING_KB // 1024} MiB", f"{during} kB peak (VmRSS/100 ms, VmHWM)",
                 during <= GOAL_RSS_DURING_KB))
    for op in OPS:
        gap = max(w["heartbeat_gap_s"] for w in big[op]["tetherctl"])
        rows.append((f"heartbeat gap during a {op} <= {GOAL_HEARTBEAT_GAP_S:g} s", f"{gap:.2f} s max "
                     f"({rb.HEARTBEAT_S} s interval)", gap <= GOAL_HEARTBEAT_GAP_S))
    print()
    print(f"{'goal':<40}{'met':<5}measured")
    for goal, measured, met in rows:
        print(f"{goal:<40}{'-' if met is None else 'yes' if met else 'NO':<5}{measured}")
    missed = sum(1 for *_, met in rows if met is False)
    print(f"goals: {sum(1 for *_, met in rows if met)} met, {missed} missed, "
          f"{sum(1 for *_, met in rows if met is None)} not measured")
    return not checks["bad"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--agent", "--ctl", "--ca", "--work"):
        parser.add_argument(name, required=True)
    for name in ("--plain-port", "--wss-port", "--broker-pid"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-ssh", action="store_true")
    parser.add_argument("--out", help="every figure, as JSON")
    args = parser.parse_args()
    results = {"size_mib": args.size_mib, "runs": args.runs}
    try:
        with rb.Rig(args, "files") as rig:
            results.update({"device": args.device, "ssh": rig.ssh, "ping_idle_s": rig.ping_idle_s, "rss": {}})
            time.sleep(2)
            results["rss"]["idle"] = rb.memory(rig.agent)
            print(f"  agent idle: {rb.kb(results['rss']['idle'])}; tetherctl cmd ping {rig.ping_idle_s:.2f} s", flush=True)
            print(f"copies: {args.size_mib} MiB of random bytes, {args.runs} run(s); MB = 10^6 bytes, over the "
                  "command's wall time", flush=True)
            measure(args, rig, results)
            time.sleep(5)
            results["rss"]["after"] = rb.memory(rig.agent)
            if rig.watch.error:
                results["heartbeat_watch_error"] = rig.watch.error
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # timeouts included
        sys.exit(f"filesbench: {e}")
    except rb.Stop as e:
        sys.exit(f"filesbench: stopped by {e}")
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f)
    print()
    print(f"Shared machine: figures vary from run to run; compare the columns of one run. Load now: "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    sys.exit(0 if summary(results) else 1)


if __name__ == "__main__":
    main()
