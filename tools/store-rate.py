#!/usr/bin/env python3
"""The 2-vCPU, 1 GiB mp-guest's stores a second with no migration, QEMU
by QEMU in turn, and the CPU each QEMU thread took meanwhile: does a
build slow the guest before any dirty logging? (doc/heavy.md)

    tools/store-rate.py [--rounds 3] [--ring-size 65536] NAME=QEMU ...
"""
import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("qm", os.path.join(HERE, "..", "tests", "qemu-migration.py"))
qm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qm)
BEAT_MASK = 0xfff  # examples/migration-bench.py: a heartbeat every 4096 stores
RAM_MIB, BASE_MIB = 1024, 17  # the heavy matrix's 2-vCPU cell


def thread_cpu(pid):
    """CPU seconds per thread name of a process."""
    out = {}
    for t in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(t + "/comm") as f:
                comm = f.read().strip()
            with open(t + "/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[comm] = out.get(comm, 0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def measure(qemu, ring_size, settle_s, window_s):
    with tempfile.TemporaryDirectory(prefix="kds-rate-") as work:
        serial = os.path.join(work, "serial")
        knobs = []
        for addr, val in ((0x800004, BEAT_MASK), (0x800010, (RAM_MIB - BASE_MIB) * 256), (0x800014, 2)):
            knobs += ["-device", f"loader,addr={addr:#x},data={val},data-len=4"]
        cmd = [qemu, "-name", "kds,debug-threads=on", "-accel", f"kvm,dirty-ring-size={ring_size}",
               "-cpu", "host,-arch-capabilities", "-smp", "2", "-m", str(RAM_MIB),
               "-kernel", qm.build_guest(work), "-display", "none", "-nodefaults",
               "-serial", f"file:{serial}"] + knobs
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not qm.wait_beats(serial, 2, {}, time.time() + 60):
                raise RuntimeError(f"{qemu}: no heartbeat in 60 s")
            time.sleep(settle_s)  # past the guest's first fill of its region
            b0, c0, t0 = qm.beats(serial), thread_cpu(p.pid), time.time()
            time.sleep(window_s)
            b1, c1, t1 = qm.beats(serial), thread_cpu(p.pid), time.time()
        finally:
            p.kill()
            p.wait()
    rate = sum(b1.get(c, 0) - b0.get(c, 0) for c in range(2)) / (t1 - t0)
    cpu = {k: round(v - c0.get(k, 0), 2) for k, v in c1.items() if v - c0.get(k, 0) >= 0.01}
    return rate, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("qemus", nargs="+", help="NAME=path of a QEMU binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ring-size", type=int, default=65536)
    ap.add_argument("--settle-s", type=float, default=8)
    ap.add_argument("--window-s", type=float, default=10)
    a = ap.parse_args()
    qemus = [q.split("=", 1) for q in a.qemus]
    for rnd in range(a.rounds):
        for name, qemu in qemus:
            rate, cpu = measure(qemu, a.ring_size, a.settle_s, a.window_s)
            print(f"{name} round {rnd}: {rate:.0f} stores/s; CPU s per thread in "
                  f"{a.window_s:.0f} s: {cpu}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
