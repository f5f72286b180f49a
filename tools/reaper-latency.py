#!/usr/bin/env python3
"""How soon the reaper threads run after dirty logging starts, and how long
they keep waking after it stops, in a QEMU built from
meson-snippet/qemu/ (dirty-tracker=shim or qemu) or stock.

An idle 2-vCPU guest with 4096-entry rings; ROUNDS times: dirty logging on
for one second (calc-dirty-rate in dirty-ring mode, which starts and stops
global dirty logging as a migration does), then off for a random 0.5 to
1.5 s, so that a thread that polls meets the start at every phase of its
period. perf records, system-wide: uprobes on memory_global_dirty_log_start
and _stop, and every switch onto QEMU's reaper thread (kvm-reaper) and the
library's (kds-reaper). Per thread it prints the median and the 90th
percentile of the delay from the start to the thread's first run, and
after the stop, how long the thread went on waking and how often.

  tools/reaper-latency.py --qemu BUILD/qemu-system-x86_64 [--tracker shim|qemu]
                          [--rounds 20]

Needs perf and uprobes (root). A benchmark: it prints figures, it asserts
nothing.
"""
import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module  # noqa: E402

qmp = import_module("reaper-wakeups").qmp
PROBES = {"kdsstart": "memory_global_dirty_log_start", "kdsstop": "memory_global_dirty_log_stop"}


def add_probes(qemu):
    sym = subprocess.run(["nm", qemu], capture_output=True, text=True).stdout
    for name, fn in PROBES.items():
        addr = re.search(rf"^([0-9a-f]+) T {fn}$", sym, re.M).group(1)
        subprocess.run(["perf", "probe", "-q", "-d", f"probe_qemu:{name}"], capture_output=True)
        subprocess.run(["perf", "probe", "-q", "-x", qemu, "-a", f"{name}=0x{addr}"], check=True)


def del_probes():
    for name in PROBES:
        subprocess.run(["perf", "probe", "-q", "-d", f"probe_qemu:{name}"], capture_output=True)


def threads(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/comm") as f:
            out[f.read().strip()] = int(t)
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--tracker", choices=["shim", "qemu"],
                    help="-accel kvm,dirty-tracker= (a patched QEMU); unset: none (stock)")
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    add_probes(a.qemu)
    work = tempfile.mkdtemp()
    sock, data = os.path.join(work, "qmp"), os.path.join(work, "perf.data")
    accel = "kvm,dirty-ring-size=4096" + (f",dirty-tracker={a.tracker}" if a.tracker else "")
    q = subprocess.Popen([a.qemu, "-name", "kds,debug-threads=on", "-accel", accel,
                          "-m", "512", "-smp", "2", "-display", "none", "-nodefaults",
                          "-qmp", f"unix:{sock},server=on,wait=off"], stderr=subprocess.DEVNULL)
    perf = None
    try:
        cmd = qmp(sock)
        time.sleep(2)
        tids = {k: v for k, v in threads(q.pid).items() if k in ("kvm-reaper", "kds-reaper")}
        if not tids:
            sys.exit("no reaper thread in QEMU")
        flt = " || ".join(f"next_pid == {t}" for t in tids.values())
        perf = subprocess.Popen(["perf", "record", "-q", "-a", "-o", data,
                                 "-e", "probe_qemu:kdsstart", "-e", "probe_qemu:kdsstop",
                                 "-e", "sched:sched_switch", "--filter", flt],
                                stderr=subprocess.DEVNULL)
        time.sleep(2)
        rng = random.Random(1)
        for _ in range(a.rounds):
            cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
            deadline = time.time() + 10
            while cmd("query-dirty-rate")["return"]["status"] != "measured":
                if time.time() > deadline:
                    sys.exit("calc-dirty-rate did not finish in 10 s")
                time.sleep(0.05)
            time.sleep(rng.uniform(0.5, 1.5))
        cmd("quit")
    finally:
        if perf:
            perf.send_signal(2)
            perf.wait(timeout=60)
        q.kill()
        del_probes()
    out = subprocess.run(["perf", "script", "-i", data, "-F", "time,event,trace"],
                         capture_output=True, text=True).stdout
    events = []  # (time, "start" | "stop" | tid)
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+):\s+(\S+):", line)
        if not m:
            continue
        t, ev = float(m.group(1)), m.group(2)
        if ev.endswith("kdsstart"):
            events.append((t, "start"))
        elif ev.endswith("kdsstop"):
            events.append((t, "stop"))
        else:
            n = re.search(r"next_pid=(\d+)", line)
            if n:
                events.append((t, int(n.group(1))))
    events.sort()
    starts = [t for t, e in events if e == "start"]
    stops = [t for t, e in events if e == "stop"]
    print(f"{a.qemu} (dirty-tracker={a.tracker or 'none'}): {len(starts)} starts of dirty "
          f"logging, {len(stops)} stops")
    for name, tid in sorted(tids.items()):
        runs = [t for t, e in events if e == tid]
        first = []
        for s in starts:
            nxt = [t for t in runs if t > s]
            if nxt:
                first.append((nxt[0] - s) * 1e3)
        tail, wakes = [], []
        for i, s in enumerate(stops):
            end = next((t for t in starts if t > s), None) or (s + 1.0)
            span = [t for t in runs if s < t < end]
            tail.append(((span[-1] - s) * 1e3) if span else 0.0)
            wakes.append(len(span) / (end - s))
        print(f"  {name:<10} start to first run: median {statistics.median(first):8.2f} ms, "
              f"p90 {pct(first, 0.9):8.2f} ms;  after the stop: wakes for a median "
              f"{statistics.median(tail):7.1f} ms, {statistics.median(wakes):5.1f} runs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
