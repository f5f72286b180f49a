#!/usr/bin/env python3
"""The 2-vCPU, 1 GiB mp-guest's stores a second with no migration, QEMU
by QEMU in turn, and the CPU each QEMU thread took meanwhile: does a
build slow the guest before any dirty logging? (doc/heavy.md)

    tools/store-rate.py [--rounds 3] [--ring-size 65536] NAME=QEMU ...
"""
import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "migration_bench", os.path.join(HERE, "..", "examples", "migration-bench.py"))
mb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mb)
RAM_MIB = 1024  # the heavy matrix's 2-vCPU cell, and its region
REGION_PAGES = (RAM_MIB - mb.GUEST_BASE_MIB) * 256


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("qemus", nargs="+", help="NAME=path of a QEMU binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ring-size", type=int, default=65536)
    ap.add_argument("--settle-s", type=float, default=8,
                    help="seconds to run first, past the guest's first fill of its region")
    ap.add_argument("--window-s", type=float, default=10)
    a = ap.parse_args()
    qemus = [q.split("=", 1) for q in a.qemus]
    for rnd in range(a.rounds):
        for name, qemu in qemus:
            rate, cpu = mb.guest_rate(qemu, 0, a.window_s, ram_mib=RAM_MIB, ring_size=a.ring_size,
                                      region_pages=REGION_PAGES, settle_s=a.settle_s)
            cpu = {k: round(v, 2) for k, v in cpu.items() if v >= 0.01}
            print(f"{name} round {rnd}: {rate:.0f} stores/s; CPU s per thread in "
                  f"{a.window_s:.0f} s: {cpu}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
