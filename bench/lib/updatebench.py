#!/usr/bin/env python3
"""Measurements for bench/update: the agent's download of an update artifact from a local nginx
over HTTPS, through a real update flow (one `download` step sent by `tetherctl cmd DEV update`),
side by side with `curl -o FILE` of the same file and `curl -o FILE && sha256sum FILE` (the
agent checks the hash as it writes). Standard library only, plus the programs measured
(tether-agent, tetherctl, nginx, curl, sha256sum); the agent and the watching of its memory and
heartbeats are remotebench.py's (its Rig and `watched`).

    updatebench.py --agent B --ctl B --plain-port P --wss-port W --ca CA --broker-pid PID --work DIR
                   --certs DIR [--size-mib N] [--runs N] [--armv5 BINARY] [--armv5-note TEXT] [--out FILE]

--certs DIR holds ca.pem, server.pem and server.key (a CA of its own, not the broker's): nginx
serves with the server's and the agent trusts the CA (`updates.ca_file`). Each run has the
three take turns at going first. The agent's figures: the flow, from sending the command to its
final state (tetherctl's wall time), and the download step alone, from its start line to its
"done" line in the agent's log (seen within 20 ms). Prints each download as it ends, then the
figures, the goals and whether each is met; exits 1 when a download failed or a file's sha256
differs from the original's.
"""

import argparse
import json
import os
import subprocess
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filesbench as fb  # noqa: E402  (the sha256 checks, med)
import remotebench as rb  # noqa: E402  (the agent, nginx's process, the heartbeat watch, /proc)

MIB = rb.MIB
# Goals (the issue's): printed next to the figures, checked at the end.
GOAL_VS_CURL = 0.80  # the agent's download at least this fraction of curl's throughput
GOAL_RSS_DURING_KB = rb.GOAL_RSS_DURING_KB
GOAL_HEARTBEAT_GAP_S = rb.GOAL_HEARTBEAT_GAP_S
GOAL_ARMV5_BYTES = rb.GOAL_ARMV5_BYTES
TIMEOUT_S = 600
LABELS = ("agent", "curl", "curl+sha256")


def start_nginx(children, work, certs):
    """nginx (tests/common/http.rs's configuration, HTTPS only) serving work/www; its port."""
    d = os.path.join(work, "nginx")
    os.makedirs(os.path.join(d, "tmp"))
    www = os.path.join(work, "www")
    port = rb.free_port()
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        root {www};
    }}
}}
""")
    log = open(os.path.join(d, "stderr.log"), "wb")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = children.start([nginx, "-p", d, "-e", os.path.join(d, "error.log"), "-c", conf], stdout=log, stderr=log)
    rb.wait_port(port, proc, 15, "nginx")
    return port, proc


class LogWatch:
    """When the download step's start and "done" lines appear in the agent's log (read from
    where it is now, every 20 ms, until `done` is set)."""

    def __init__(self, log_path, step):
        self.path, self.step = log_path, step
        self.offset = os.path.getsize(log_path)
        self.started = self.ended = None

    def __call__(self, done):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            pending = b""
            while True:
                finished = done.is_set()  # one more read after the flow ended
                pending += f.read()
                *lines, pending = pending.split(b"\n")
                now = time.monotonic()
                for line in lines:
                    text = line.decode(errors="replace")
                    if f'"name":"{self.step}"' in text and '"phase":"forward"' in text and self.started is None:
                        self.started = now
                    elif text.endswith((f": {self.step} done", f': "{self.step}" done')) and self.ended is None:
                        self.ended = now
                if finished:
                    return
                time.sleep(0.02)


def agent_update(args, rig, url, sha, size, step):
    """The flow, from `tetherctl cmd` to its final state, its download step timed from the log."""
    flow = {"name": "bench", "version": step,
            "steps": [{"name": step, "type": "download", "url": url, "sha256": sha, "size": size}]}
    logwatch = LogWatch(rig.agent.log_path, step)
    argv = [args.ctl, "cmd", args.device, "update", "--json", json.dumps({"flow": flow}), "--timeout", str(TIMEOUT_S)]

    def transfer():
        started = time.perf_counter()
        out = subprocess.run(argv, env=args.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=TIMEOUT_S + 30)
        seconds = time.perf_counter() - started
        try:
            state = json.loads(out.stdout)
        except ValueError:
            state = {}
        if out.returncode != 0 or state.get("status") != "successful":
            raise RuntimeError(f"tetherctl cmd update: exit {out.returncode}: {(out.stdout + out.stderr).strip()[-400:]}")
        return {"s": seconds, "mb_s": size / 1e6 / seconds}

    w = rb.watched(rig.agent, transfer, rig.watch, {"agent": rig.agent.pid, "mosquitto": args.broker_pid},
                   beside=logwatch)
    w["flow_s"] = w["s"]
    if logwatch.started is not None and logwatch.ended is not None:
        w["download_s"] = logwatch.ended - logwatch.started
        w["mb_s"] = size / 1e6 / w["download_s"]
    else:
        w["download_s"] = None  # the flow's time stands for it
        w["mb_s"] = size / 1e6 / w["flow_s"]
    return w


def curl(args, url, dest, size, hash_it):
    """`curl -o DEST URL` (and `&& sha256sum DEST` with hash_it), timed whole; the hash or None."""
    argv = ["curl", "-sS", "--fail", "--cacert", os.path.join(args.certs, "ca.pem"), "-o", dest, url]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT_S)
    got = None
    if hash_it:
        out = subprocess.run(["sha256sum", dest], check=True, capture_output=True, text=True, timeout=TIMEOUT_S)
        got = out.stdout.split()[0]
    seconds = time.perf_counter() - started
    if os.path.getsize(dest) != size:
        raise RuntimeError(f"curl {url}: {os.path.getsize(dest)} bytes, expected {size}")
    return {"s": seconds, "mb_s": size / 1e6 / seconds, "sha256": got}


def measure(args, rig, results):
    size = args.size_mib * MIB
    children = rb.Children()
    try:
        os.makedirs(os.path.join(args.work, "www"))
        sha = rb.make_blob(os.path.join(args.work, "www", "artifact"), size)
        port, _ = start_nginx(children, args.work, args.certs)
        url = f"https://127.0.0.1:{port}/artifact"
        download_dir = args.download_dir
        curl_dir = os.path.join(args.work, "curl")
        os.makedirs(curl_dir)
        figures = results["runs_done"] = {label: [] for label in LABELS}
        verified = fb.Verifier(results)

        for run in range(args.runs):
            turn = run % len(LABELS)
            for label in LABELS[turn:] + LABELS[:turn]:
                if label == "agent":
                    step = f"fetch-{run + 1}"
                    w = agent_update(args, rig, url, sha, size, step)
                    # The agent checked the sha256 (else the flow failed) and removed the file at the end.
                    left = os.path.exists(os.path.join(download_dir, step))
                    verified.checks["ok"] += 1
                    check = "sha256 checked by the agent" + ("; its file LEFT BEHIND" if left else "")
                    alone = f"download step {w['download_s']:.2f} s" if w["download_s"] is not None \
                        else "no step lines in the log"
                    print(f"  run {run + 1}: agent       {w['mb_s']:6.1f} MB/s ({alone}, flow {w['flow_s']:.2f} s); "
                          f"{check}; agent VmRSS max {w['rss_max_kb']} kB, worst heartbeat gap "
                          f"{w['heartbeat_gap_s']:.2f} s; CPU s agent {w['cpu_s']['agent']:.2f}; machine "
                          f"{w['machine_busy_pct']:.0f} % busy", flush=True)
                else:
                    dest = os.path.join(curl_dir, "artifact")
                    w = curl(args, url, dest, size, label == "curl+sha256")
                    check = verified(dest, sha, w["sha256"])
                    print(f"  run {run + 1}: {label:<11} {w['mb_s']:6.1f} MB/s ({w['s']:.2f} s); {check}", flush=True)
                figures[label].append(w)
    finally:
        children.end_all()


# ---------------------------------------------------------------------------------------------
# The summary


def summary(r):
    rows = []  # (goal, measured, met: True / False / None, "" for a figure without a goal)
    runs = r["runs_done"]
    med = fb.med
    agent = runs["agent"]
    print()
    print(f"{str(r['size_mib']) + ' MiB over HTTPS, MB/s (10^6 B/s)':<40}{'min':>8}{'median':>8}{'max':>8}"
          f"{'median s':>10}")
    lines = [("agent, download step (log)", [w["mb_s"] for w in agent], [w["download_s"] or w["flow_s"] for w in agent]),
             ("agent, whole flow (tetherctl)", [r["size_mib"] * MIB / 1e6 / w["flow_s"] for w in agent],
              [w["flow_s"] for w in agent])]
    lines += [(label, [w["mb_s"] for w in runs[label]], [w["s"] for w in runs[label]]) for label in LABELS[1:]]
    for name, v, s in lines:
        print(f"  {name:<38}{min(v):8.1f}{med(v):8.1f}{max(v):8.1f}{med(s):10.2f}")
    step = med([w["mb_s"] for w in agent])
    for label in LABELS[1:]:
        c = med([w["mb_s"] for w in runs[label]])
        print(f"  agent (step) / {label}: {step / c:.2f}x (medians)")
    print()
    peak = max(w["rss_max_kb"] for w in agent)
    hwm = max(w["hwm_kb"] for w in agent)
    rss = r["rss"]
    print(f"agent VmRSS: idle {rss['idle']['VmRSS']} kB; during the downloads {peak} kB at most (every 100 ms), "
          f"VmHWM {hwm} kB; 5 s after the last {rss['after']['VmRSS']} kB; CPU s per flow (median) "
          f"{med([w['cpu_s']['agent'] for w in agent]):.2f}, threads at most {max(w['threads_max'] for w in agent)}")

    c = med([w["mb_s"] for w in runs["curl"]])
    rows.append((f"download >= {GOAL_VS_CURL:.0%} of curl's", f"{step / c:.0%} ({step:.1f} vs {c:.1f} MB/s, medians)",
                 step / c >= GOAL_VS_CURL))
    ch = med([w["mb_s"] for w in runs["curl+sha256"]])
    rows.append(("  (of curl && sha256sum's: no goal)", f"{step / ch:.0%} ({ch:.1f} MB/s)", ""))
    checks = r["sha256"]
    rows.append(("sha256 of every file downloaded",
                 f"{checks['ok']} of {checks['ok'] + len(checks['bad'])} match (the agent's: its own check)",
                 not checks["bad"]))
    during = max(peak, hwm)
    rows.append((f"agent VmRSS during <= {GOAL_RSS_DURING_KB // 1024} MiB", f"{during} kB peak (VmRSS/100 ms, VmHWM)",
                 during <= GOAL_RSS_DURING_KB))
    gap = max(w["heartbeat_gap_s"] for w in agent)
    rows.append((f"heartbeat gap during <= {GOAL_HEARTBEAT_GAP_S:g} s", f"{gap:.2f} s max ({rb.HEARTBEAT_S} s interval)",
                 gap <= GOAL_HEARTBEAT_GAP_S))
    goal = f"armv5te agent <= {GOAL_ARMV5_BYTES / MIB:g} MiB"
    if r.get("armv5"):
        size = os.path.getsize(r["armv5"])
        rows.append((goal, f"{size} bytes = {size / MIB:.2f} MiB ({os.path.basename(r['armv5'])})",
                     size <= GOAL_ARMV5_BYTES))
    else:
        rows.append((goal, r.get("armv5_note") or "no armv5te build", None))
    rb.print_goals(rows)
    return not checks["bad"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rb.rig_arguments(parser, "--certs")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--armv5", metavar="BINARY", help="the armv5te agent whose size is checked")
    parser.add_argument("--armv5-note", help="why there is no armv5te binary")
    parser.add_argument("--out", help="every figure, as JSON")
    args = parser.parse_args()
    args.no_ssh = True
    args.certs = os.path.abspath(args.certs)
    args.download_dir = os.path.join(args.work, "downloads")
    results = {"size_mib": args.size_mib, "runs": args.runs, "rss": {}, "armv5": args.armv5,
               "armv5_note": args.armv5_note}
    updates = {"updates": {"ca_file": os.path.join(args.certs, "ca.pem"), "download_dir": args.download_dir}}
    try:
        with rb.Rig(args, "update", extra_config=updates) as rig:
            results.update({"device": args.device, "ping_idle_s": rig.ping_idle_s})
            time.sleep(2)
            results["rss"]["idle"] = rb.memory(rig.agent)
            print(f"  agent idle: {rb.kb(results['rss']['idle'])}; tetherctl cmd ping {rig.ping_idle_s:.2f} s",
                  flush=True)
            print(f"downloads: {args.size_mib} MiB of random bytes over HTTPS from nginx, {args.runs} run(s); "
                  "MB = 10^6 bytes; curl's over its wall time (with sha256sum's)", flush=True)
            measure(args, rig, results)
            time.sleep(5)
            results["rss"]["after"] = rb.memory(rig.agent)
            if rig.watch.error:
                results["heartbeat_watch_error"] = rig.watch.error
    except (OSError, RuntimeError, subprocess.SubprocessError, TimeoutError) as e:  # timeouts included
        sys.exit(f"updatebench: {e}")
    except rb.Stop as e:
        sys.exit(f"updatebench: stopped by {e}")
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, default=str)
    rb.exit_after_summary(summary(results))


if __name__ == "__main__":
    main()
