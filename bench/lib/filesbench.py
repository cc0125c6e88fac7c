#!/usr/bin/env python3
"""Measurements for bench/files: `tetherctl get` and `tetherctl put` of one file through a local
Mosquitto over wss + TLS, side by side with scp to a private sshd on the same machine, the
agent's memory and heartbeats watched during each transfer. Standard library only, plus the
programs measured (tether-agent, tetherctl, scp, sshd); the agent, sshd and the watching are
remotebench.py's (its Rig).

    filesbench.py --agent B --ctl B --plain-port P --wss-port W --ca CA --broker-pid PID --work DIR
                  [--size-mib N] [--runs N] [--no-ssh] [--against DIR] [--out FILE]

Each run copies the file both ways with each tool, the tools taking turns at going first, then a
1 KiB file both ways with each (what a copy costs whatever its size). With --against, DIR's
tether-agent and tetherctl (another build, its own agent and device on the same broker) take
their turn too, as "against". Prints each copy as it ends, then the figures, the goals (of the
build under test, "tetherctl") and whether each is met; exits 1 when a copied file's sha256
differs from the original's.
"""

import argparse
import contextlib
import copy as shallow
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


class Verifier:
    """`verified(path, want)` checks a copied file's sha256 against `want` and removes the file
    (before its pages are written back: the next copy has the disk to itself); it says how it
    went and counts it in results["sha256"] ({"ok": N, "bad": [paths]}). `got`: the file's
    sha256 when something else computed it."""

    def __init__(self, results):
        self.checks = results["sha256"] = {"ok": 0, "bad": []}

    def __call__(self, path, want, got=None):
        got = got or sha256_file(path)
        os.remove(path)
        if got == want:
            self.checks["ok"] += 1
            return "sha256 ok"
        self.checks["bad"].append(path)
        return f"sha256 DIFFERS ({got})"


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
    directories of one machine. `rigs`: label -> the Rig whose agent and tetherctl it uses
    (scp: the one with sshd)."""

    def __init__(self, args, rigs):
        self.args, self.rigs = args, rigs
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
        a = self.rigs[label].args
        if label != "scp":
            return [a.ctl, "get", a.device, source, dest] if op == "get" else [a.ctl, "put", source, a.device, dest]
        scp = rb.ssh_argv(a.key, self.rigs[label].ssh_port, "scp") + ["-q"]
        return scp + ([f"localhost:{source}", dest] if op == "get" else [source, f"localhost:{dest}"])

    def env(self, label):
        return self.rigs[label].args.env


def measure(args, rigs, results):
    size = args.size_mib * MIB
    sha = rb.make_blob(os.path.join(args.work, "big"), size)
    small_sha = rb.make_blob(os.path.join(args.work, "small"), SMALL_BYTES)
    rig = rigs["tetherctl"]
    if rig.ssh_port:
        rigs = {**rigs, "scp": rig}
    copier = Copier(args, rigs)
    labels = list(rigs)

    def pids(r):
        out = {"agent": r.agent.pid, "mosquitto": args.broker_pid}
        if r.sshd_pid:
            out["sshd"] = (r.sshd_pid, True)  # its sessions and sftp-server, once they ended
        return out
    big = results["big"] = {op: {label: [] for label in labels} for op in OPS}
    small = results["small"] = {op: {label: [] for label in labels} for op in OPS}
    verified = Verifier(results)

    for run in range(args.runs):
        for i, op in enumerate(OPS):
            turn = (run * len(OPS) + i) % len(labels)
            for label in labels[turn:] + labels[:turn]:
                source, dest = copier.paths(op, "big")
                argv, env, r = copier.argv(label, op, source, dest), copier.env(label), rigs[label]
                w = rb.watched(r.agent, lambda: copy(argv, env, size), r.watch, pids(r))
                big[op][label].append(w)
                check = verified(dest, sha)
                cpu = w["cpu_s"]
                parties = (("tetherctl", w["client_cpu_s"]), ("agent", cpu["agent"]), ("mosquitto", cpu["mosquitto"])) \
                    if label != "scp" else (("scp+ssh", w["client_cpu_s"]), ("sshd", cpu.get("sshd", 0.0)))
                watched = (f"; agent VmRSS max {w['rss_max_kb']} kB, worst heartbeat gap {w['heartbeat_gap_s']:.2f} s"
                           if label != "scp" else "")
                print(f"  run {run + 1}: {op} {label:<9} {w['mb_s']:6.1f} MB/s ({w['s']:.2f} s); {check}{watched}; CPU s "
                      + ", ".join(f"{k} {v:.2f}" for k, v in parties) + f"; machine {w['machine_busy_pct']:.0f} % busy",
                      flush=True)
        for op in OPS:
            for label in labels:
                source, dest = copier.paths(op, "small")
                s = copy(copier.argv(label, op, source, dest), copier.env(label), SMALL_BYTES)
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
    tethers = [label for label in labels if label != "scp"]
    print()
    if r.get("against"):
        print(f"against: {r['against']}")
    print(f"{str(r['size_mib']) + ' MiB, MB/s (10^6 B/s), wall time':<40}{'min':>8}{'median':>8}{'max':>8}"
          f"{'1 KiB file, s':>15}   / scp, / against (medians)")
    for op in OPS:
        for label in labels:
            v = [w["mb_s"] for w in big[op][label]]
            vs = ""
            for other in ("scp", "against"):
                if label in tethers and other in labels and other != label:
                    vs += f"   {med(v) / med([w['mb_s'] for w in big[op][other]]):.2f}x {other}"
            print(f"  {op + ' ' + label:<38}{min(v):8.1f}{med(v):8.1f}{max(v):8.1f}{med(small[op][label]):15.2f}{vs}")
    print()
    print(f"{'CPU s per copy (median)':<40}{'client':>10}{'agent':>10}{'mosquitto':>10}{'sshd':>10}{'busy %':>8}")
    for op in OPS:
        for label in labels:
            ws = big[op][label]

            def col(name, ws=ws):
                return f"{med([w['cpu_s'][name] for w in ws]):10.2f}"

            cells = (col("agent") + col("mosquitto") + f"{'':>10}" if label != "scp"
                     else f"{'':>20}" + (col("sshd") if "sshd" in ws[0]["cpu_s"] else f"{'':>10}"))
            print(f"  {op + ' ' + label:<38}{med([w['client_cpu_s'] for w in ws]):10.2f}{cells}"
                  f"{med([w['machine_busy_pct'] for w in ws]):8.0f}")

    print()
    for label in tethers:
        t_all = [w for op in OPS for w in big[op][label]]
        rss = r["rss"][label]
        peak = max(w["rss_max_kb"] for w in t_all)
        hwm = max(w["hwm_kb"] for w in t_all)
        print(f"agent VmRSS ({label}): idle {rss['idle']['VmRSS']} kB; during the copies {peak} kB at most (every "
              f"100 ms), VmHWM {hwm} kB; 5 s after the last {rss['after']['VmRSS']} kB")
    t_all = [w for op in OPS for w in big[op]["tetherctl"]]
    peak = max(w["rss_max_kb"] for w in t_all)
    hwm = max(w["hwm_kb"] for w in t_all)
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
    rb.print_goals(rows)
    return not checks["bad"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rb.rig_arguments(parser)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-ssh", action="store_true")
    parser.add_argument("--against", metavar="DIR", help="another build's tether-agent and tetherctl, side by side")
    parser.add_argument("--out", help="every figure, as JSON")
    args = parser.parse_args()
    results = {"size_mib": args.size_mib, "runs": args.runs, "against": args.against, "rss": {}}
    setups = [("tetherctl", "files", args)]
    if args.against:
        other = shallow.copy(args)
        other.agent, other.ctl = os.path.join(args.against, "tether-agent"), os.path.join(args.against, "tetherctl")
        other.work, other.no_ssh = os.path.join(args.work, "against"), True
        setups.append(("against", "files-against", other))
    try:
        with contextlib.ExitStack() as stack:
            rigs = {}
            for label, name, a in setups:
                print(f"{label}: {a.agent}, {a.ctl}", flush=True)
                rigs[label] = stack.enter_context(rb.Rig(a, name))
            rig = rigs["tetherctl"]
            results.update({"device": args.device, "ssh": rig.ssh, "ping_idle_s": rig.ping_idle_s})
            time.sleep(2)
            for label, r in rigs.items():
                results["rss"][label] = {"idle": rb.memory(r.agent)}
                print(f"  {label} agent idle: {rb.kb(results['rss'][label]['idle'])}; tetherctl cmd ping "
                      f"{r.ping_idle_s:.2f} s", flush=True)
            print(f"copies: {args.size_mib} MiB of random bytes, {args.runs} run(s); MB = 10^6 bytes, over the "
                  "command's wall time", flush=True)
            measure(args, rigs, results)
            time.sleep(5)
            for label, r in rigs.items():
                results["rss"][label]["after"] = rb.memory(r.agent)
                if r.watch.error:
                    results.setdefault("heartbeat_watch_error", {})[label] = r.watch.error
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # timeouts included
        sys.exit(f"filesbench: {e}")
    except rb.Stop as e:
        sys.exit(f"filesbench: stopped by {e}")
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f)
    rb.exit_after_summary(summary(results))


if __name__ == "__main__":
    main()
