#!/usr/bin/env python3
"""The migration flows users run, beyond one clean precopy, each checked
page for page: the destination's RAM must be the source's, and the guest
must run on there.

The guest is tests/qemu-migration.py's (guest/mp-guest.S: every vCPU
stores to pseudo-random pages without pausing), with the dirty ring
(dirty-ring-size=4096). One flow per invocation:

  fail-retry    the destination is killed mid-way through the first pass;
                the source runs on (logging off, the guest writing); a
                second migration, to a fresh destination, must be exact.
  cancel-retry  migrate_cancel mid-way through the first pass; the guest
                writes on untracked; then a second migration.
  multifd       4 multifd channels.
  postcopy      precopy, then migrate-start-postcopy mid-way through the
                first pass; compared once the destination's incoming side
                has completed (it was started with -S, so it stays paused
                while postcopy pulls the rest).
  churn         a RAM-backed PCI BAR (ivshmem-plain on a 32 MiB memory
                backend) that every vCPU writes through is disabled,
                enabled and moved by the host (PCI config writes through
                the monitor) every few hundred milliseconds while the
                migration runs: its memslot is deleted and created again
                under the rings. The BAR's memory is compared too.
  sigstop       the source QEMU is stopped and continued (SIGSTOP /
                SIGCONT) in a tight loop during the first part of the
                migration: SIGSTOP cannot be blocked, so it stops
                KVM_RESET_DIRTY_RINGS partway (Linux 6.17+); stock QEMU
                asserts there (ret == total).
  soak          N migrations (--count, default 50) from one source QEMU to
                a fresh destination each, the source continued after each;
                every one exact, and the source's fd count and RSS after
                the last within a margin of after the first.

The last line is "PASS {json}" or "FAIL {json}"; exit status 0 on PASS.
Every wait is bounded.

    tests/qemu-flows.py --qemu PATH --flow NAME [--label L] [--count N]
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("qemu_migration",
                                               os.path.join(HERE, "qemu-migration.py"))
qm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qm)

FLOWS = ("fail-retry", "cancel-retry", "multifd", "postcopy", "churn", "sigstop", "soak")
RAM_MIB = 512
# The churn flow's BAR: ivshmem-plain (00:05.0), BAR 2 (64-bit memory)
# placed by the test at one of two addresses in the PCI hole; the guest
# writes the first.
BAR_MIB = 32
BAR_DEV = 5
WINDOW, WINDOW_ALT = 0xC000_0000, 0xC800_0000


class Flow:
    """QEMUs of one flow, in a work directory; killed at the end."""

    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="kds-flow-")
        self.procs = []
        self.elf = qm.build_guest(self.work)
        self.n = 0  # destinations started
        self.result = {"label": args.label or f"{args.flow}", "flow": args.flow, "runs": []}

    def start(self, role, incoming):
        a = self.args
        cmd = [a.qemu, "-name", "kds,debug-threads=on",
               "-accel", f"kvm,dirty-ring-size={a.ring_size}"
               + qm.dirty_tracker(a),
               "-cpu", "host,-arch-capabilities", "-smp", str(a.smp),
               "-m", str(RAM_MIB), "-kernel", self.elf,
               "-display", "none", "-nodefaults", "-no-reboot",
               "-serial", f"file:{self.work}/{role}.serial",
               "-qmp", f"unix:{self.work}/{role}.qmp,server=on,wait=off"]
        if a.trace:
            cmd += ["-trace", f"enable={a.trace},file={self.work}/{role}.trace"]
        if a.spin:  # guest/mp-guest.S: KNOB_SPIN, loop iterations after each store
            cmd += ["-device", f"loader,addr=0x800000,data={a.spin},data-len=4"]
        if a.flow == "churn":
            cmd += ["-object", f"memory-backend-ram,id=bar,size={BAR_MIB}M",
                    "-device", f"ivshmem-plain,memdev=bar,master=on,addr={BAR_DEV:#x}",
                    "-device", f"loader,addr=0x800008,data={WINDOW:#x},data-len=4",
                    "-device", f"loader,addr=0x80000c,data={(BAR_MIB << 8) - 1},data-len=4"]
        if incoming:
            cmd += ["-incoming", "defer", "-S"]
        log = open(f"{self.work}/{role}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p, qm.Qmp(f"{self.work}/{role}.qmp", time.time() + 30)

    def destination(self, caps=(), params=None):
        self.n += 1
        role = f"dst{self.n}"
        p, q = self.start(role, True)
        if caps:
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": c, "state": True} for c in caps])
        if params:
            q.cmd("migrate-set-parameters", **params)
        sock = f"{self.work}/{role}.sock"
        q.cmd("migrate-incoming", uri=f"unix:{sock}")
        return role, p, q, sock

    def kill(self, p):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def close(self):
        for p in self.procs:
            self.kill(p)
        if self.args.keep:
            shutil.rmtree(self.args.keep, ignore_errors=True)
            shutil.copytree(self.work, self.args.keep,
                            ignore=shutil.ignore_patterns("*.sock", "*.qmp", "*.o", "*.elf"))
        shutil.rmtree(self.work, ignore_errors=True)


def hmp(q, line):
    return q.cmd("human-monitor-command", **{"command-line": line})


def pci_cfg(q, reg, val, width):
    """A PCI configuration write to 00:BAR_DEV.0 through ports 0xcf8/0xcfc
    (the monitor's `o`, in the main loop, under the BQL)."""
    for line in (f"o /w 0xcf8 {0x80000000 | (BAR_DEV << 11) | (reg & 0xfc):#x}",
                 f"o /{'hw'[width == 4]} {0xcfc + (reg & 3):#x} {val:#x}"):
        # What the write triggers may print warnings here (QEMU's
        # warn_report goes to the monitor whose command is running: the
        # shim's, on a memslot change); anything else is an error.
        out = [ln for ln in hmp(q, line).splitlines()
               if ln.strip() and not ln.startswith(("warning:", "qemu-system"))]
        if out:
            raise RuntimeError(f"monitor: {line}: {' / '.join(out)}")


def bar_place(q, base, enable=True):
    """BAR 2 (64-bit) at base, memory decoding on or off."""
    pci_cfg(q, 0x04, 0, 2)
    pci_cfg(q, 0x18, base, 4)
    pci_cfg(q, 0x1C, 0, 4)
    if enable:
        pci_cfg(q, 0x04, 2, 2)


def migrate(src, src_p, dst_p, sock, args, caps=(), params=None, during=None, timeout=None):
    """Starts a migration to sock and waits for it to end (bounded).
    during(info) is called at every poll while it runs. Returns the
    source's last query-migrate."""
    if caps:
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": c, "state": True} for c in caps])
    p = {"max-bandwidth": args.bandwidth_mib << 20, "downtime-limit": args.downtime_ms}
    p.update(params or {})
    src.cmd("migrate-set-parameters", **p)
    src.cmd("migrate", uri=f"unix:{sock}")
    deadline = time.time() + (timeout or args.timeout)
    info = {}
    while time.time() < deadline:
        info = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if src_p.poll() is not None:
            return {"status": f"source exited ({src_p.returncode})"}
        if during:
            during(info)
        time.sleep(0.05)
    return {**info, "status": f"{info.get('status')} after {timeout or args.timeout} s"}


def transferred(info):
    return info.get("ram", {}).get("transferred", 0)


def wait_status(q, want, seconds, what):
    deadline = time.time() + seconds
    while True:
        st = q.cmd("query-status")["status"]
        if st in want:
            return st
        if time.time() > deadline:
            raise RuntimeError(f"{what}: status {st!r} after {seconds} s, not {want}")
        time.sleep(0.1)


def verify(flow, src_p, src, dst_p, dst, role, info):
    """The page-for-page comparison and the guest's life on the
    destination; returns this run's figures (ok: it passed)."""
    run = {"status": info.get("status"), "total_ms": info.get("total-time"),
           "downtime_ms": info.get("downtime"),
           "dirty_syncs": info.get("ram", {}).get("dirty-sync-count"),
           "transferred_mib": round(transferred(info) / (1 << 20), 1)}
    if info.get("status") != "completed":
        run["error"] = f"migration {info.get('status')}"
        return run
    wait_status(dst, ("paused",), 120, "destination after the migration")
    deadline = time.time() + 120
    while dst.cmd("query-migrate").get("status") != "completed":
        if time.time() > deadline:
            run["error"] = "the destination never completed the incoming migration"
            return run
        time.sleep(0.2)
    diffs, read = qm.compare(src_p.pid, dst_p.pid, RAM_MIB << 20)
    if read < 1000:
        run["error"] = f"only {read} non-zero pages compared: not the guest's RAM?"
        return run
    run["firmware_pages_differ"] = sum(1 for d in diffs if d[0] in qm.FIRMWARE)
    diffs = [d for d in diffs if d[0] not in qm.FIRMWARE]
    run["pages_differ"] = len(diffs)
    if diffs:
        run["first_differ"] = qm.describe(diffs, flow.args.smp)
    if flow.args.flow == "churn":
        bdiffs, bread = qm.compare(src_p.pid, dst_p.pid, BAR_MIB << 20)
        run["bar_pages_compared"] = bread
        run["bar_pages_differ"] = len(bdiffs)
        if bread < 100:
            run["error"] = f"only {bread} non-zero pages of the BAR compared"
    at_stop = qm.beats(f"{flow.work}/src.serial")
    dst.cmd("cont")
    alive = qm.wait_beats(f"{flow.work}/{role}.serial", flow.args.smp, at_stop, time.time() + 60)
    run["alive"] = alive and dst.cmd("query-status")["status"] == "running"
    run["ok"] = ("error" not in run and run["pages_differ"] == 0 and run["alive"]
                 and run.get("bar_pages_differ", 0) == 0)
    return run


def fd_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def run_flow(args):
    flow = Flow(args)
    res = flow.result
    t0 = time.time()
    src_p = None
    try:
        src_p, src = flow.start("src", False)
        if not qm.wait_beats(f"{flow.work}/src.serial", args.smp, {}, time.time() + 120):
            raise RuntimeError("the source guest printed no heartbeat from every vCPU in 120 s")
        f = args.flow
        mid = args.mid_mib << 20
        if f in ("fail-retry", "cancel-retry"):
            role, dp, dq, sock = flow.destination()

            def interrupt(info):
                if transferred(info) >= mid and not interrupt.done:
                    interrupt.done = True
                    res["first_interrupted_at_mib"] = round(transferred(info) / (1 << 20), 1)
                    if f == "fail-retry":
                        flow.kill(dp)
                    else:
                        src.cmd("migrate_cancel")
            interrupt.done = False
            info = migrate(src, src_p, dp, sock, args, during=interrupt)
            want = "failed" if f == "fail-retry" else "cancelled"
            res["first"] = info.get("status")
            if info.get("status") != want:
                raise RuntimeError(f"first migration ended {info.get('status')!r}, not {want!r}")
            flow.kill(dp)
            # The guest runs on at the source, logging off, writing.
            st = wait_status(src, ("running",), 30, "source after the first migration")
            b0 = qm.beats(f"{flow.work}/src.serial")
            if not qm.wait_beats(f"{flow.work}/src.serial", args.smp, b0,
                                 time.time() + args.alive_s):
                raise RuntimeError(f"the source ({st}) printed no heartbeat from every vCPU "
                                   f"in {args.alive_s} s after the first migration")
            time.sleep(args.untracked_s)
            role, dp, dq, sock = flow.destination()
            info = migrate(src, src_p, dp, sock, args)
            res["runs"].append(verify(flow, src_p, src, dp, dq, role, info))
        elif f == "multifd":
            params = {"multifd-channels": 4}
            role, dp, dq, sock = flow.destination(["multifd"], params)
            info = migrate(src, src_p, dp, sock, args, ["multifd"], params)
            res["runs"].append(verify(flow, src_p, src, dp, dq, role, info))
        elif f == "postcopy":
            role, dp, dq, sock = flow.destination(["postcopy-ram"])

            def switch(info):
                if transferred(info) >= mid and not switch.done:
                    switch.done = True
                    src.cmd("migrate-start-postcopy")
            switch.done = False
            info = migrate(src, src_p, dp, sock, args, ["postcopy-ram"], during=switch)
            res["postcopy_started"] = switch.done
            run = verify(flow, src_p, src, dp, dq, role, info)
            if not switch.done:
                run["ok"] = False
                run["error"] = "completed before migrate-start-postcopy"
            res["runs"].append(run)
        elif f == "churn":
            bar_place(src, WINDOW)
            b0 = qm.beats(f"{flow.work}/src.serial")
            qm.wait_beats(f"{flow.work}/src.serial", args.smp, b0, time.time() + 60)
            role, dp, dq, sock = flow.destination()
            # Cycle: disable, enable, move away, move back, each held a
            # little while the guest writes.
            steps = [("off", lambda: pci_cfg(src, 0x04, 0, 2)),
                     ("on", lambda: pci_cfg(src, 0x04, 2, 2)),
                     ("moved", lambda: bar_place(src, WINDOW_ALT)),
                     ("back", lambda: bar_place(src, WINDOW))]
            churn = {"n": 0, "next": 0.0}

            def toggle(info):
                if info.get("status") != "active" or time.time() < churn["next"]:
                    return
                steps[churn["n"] % len(steps)][1]()
                churn["n"] += 1
                churn["next"] = time.time() + args.churn_ms / 1000
            info = migrate(src, src_p, dp, sock, args, during=toggle)
            res["bar_changes"] = churn["n"]
            run = verify(flow, src_p, src, dp, dq, role, info)
            if churn["n"] < 4:
                run["ok"] = False
                run["error"] = f"only {churn['n']} BAR changes during the migration"
            res["runs"].append(run)
        elif f == "sigstop":
            role, dp, dq, sock = flow.destination()
            stops = {"n": 0, "thread": None}
            done = threading.Event()

            def stopper():
                # Stop and continue the whole source, a pair every
                # millisecond or so, up to --stops pairs; then the
                # migration converges undisturbed.
                while stops["n"] < args.stops and not done.is_set() and src_p.poll() is None:
                    os.kill(src_p.pid, signal.SIGSTOP)
                    time.sleep(0.0003)
                    os.kill(src_p.pid, signal.SIGCONT)
                    stops["n"] += 1
                    time.sleep(0.001)

            def storm(info):
                if stops["thread"] is None:
                    stops["thread"] = threading.Thread(target=stopper, daemon=True)
                    stops["thread"].start()
            try:
                info = migrate(src, src_p, dp, sock, args, during=storm)
            finally:
                done.set()
                if stops["thread"]:
                    stops["thread"].join(10)
                if src_p.poll() is None:
                    os.kill(src_p.pid, signal.SIGCONT)
            res["stops"] = stops["n"]
            res["runs"].append(verify(flow, src_p, src, dp, dq, role, info))
        elif f == "soak":
            for i in range(args.count):
                role, dp, dq, sock = flow.destination()
                info = migrate(src, src_p, dp, sock, args)
                run = verify(flow, src_p, src, dp, dq, role, info)
                flow.kill(dp)
                flow.procs.remove(dp)
                os.unlink(f"{flow.work}/{role}.serial")
                # The source goes on from postmigrate, its guest writing.
                src.cmd("cont")
                wait_status(src, ("running",), 30, "source after cont")
                b0 = qm.beats(f"{flow.work}/src.serial")
                if not qm.wait_beats(f"{flow.work}/src.serial", args.smp, b0, time.time() + 60):
                    run["ok"] = False
                    run["error"] = "the source did not run on after cont"
                run["fds"], run["rss_kib"] = fd_rss(src_p.pid)
                res["runs"].append(run)
                print(f"soak {i + 1}/{args.count}: " + json.dumps(run), flush=True)
                if not run.get("ok"):
                    break
            first, last = res["runs"][0], res["runs"][-1]
            res["fds"] = [first.get("fds"), last.get("fds")]
            res["rss_kib"] = [first.get("rss_kib"), last.get("rss_kib")]
    except Exception as e:  # reported, never a traceback
        res["error"] = str(e)
        if src_p is not None and src_p.poll() is not None:
            res["error"] = f"the source QEMU exited ({src_p.returncode}): {e}"
    finally:
        try:
            with open(f"{flow.work}/src.log", errors="replace") as f_:
                log = f_.read()
            errs = [ln.strip() for ln in log.splitlines() if ln.strip()]
            if errs:
                res["src_stderr"] = errs[-1][:200]
            # The shim's own warnings (logged at powers of two): resets a
            # stop may have cut short, and ring entries it had to skip.
            res["switched_out_warnings"] = log.count("was stopped or slept during the reset")
            res["skipped_entry_warnings"] = log.count("named an unknown slot")
        except OSError:
            pass
        if args.trace:
            res["trace_src"] = {}
            try:
                with open(f"{flow.work}/src.trace", errors="replace") as t:
                    for line in t:
                        ev = line.split(" ", 1)[0].split(":")[0]
                        res["trace_src"][ev] = res["trace_src"].get(ev, 0) + 1
            except OSError:
                pass
        flow.close()
    res["wall_s"] = round(time.time() - t0, 1)
    runs = res["runs"]
    ok = "error" not in res and bool(runs) and all(r.get("ok") for r in runs)
    if args.flow == "soak" and ok:
        if len(runs) != args.count:
            ok = False
        fd0, fd1 = res["fds"]
        r0, r1 = res["rss_kib"]
        res["leak_check"] = f"fds {fd0} -> {fd1}, RSS {r0} -> {r1} KiB"
        if fd1 > fd0 + 2 or r1 > r0 + args.rss_margin_mib * 1024:
            ok = False
            res["error"] = "the source leaks: " + res["leak_check"]
    for r in runs:
        r.pop("ok", None)
    res["pages_differ"] = sum(r.get("pages_differ", 0) + r.get("bar_pages_differ", 0)
                              for r in runs)
    return ok, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--flow", choices=FLOWS, required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--ring-size", type=int, default=4096)
    qm.add_dirty_tracker(ap)
    ap.add_argument("--bandwidth-mib", type=int, default=128)
    ap.add_argument("--downtime-ms", type=int, default=3000)
    ap.add_argument("--timeout", type=int, default=180, help="seconds per migration")
    ap.add_argument("--mid-mib", type=int, default=96,
                    help="MiB sent before the kill, cancel or postcopy switch")
    ap.add_argument("--untracked-s", type=float, default=3.0,
                    help="seconds the guest writes untracked between attempts")
    ap.add_argument("--alive-s", type=int, default=60,
                    help="seconds the source has to show every vCPU writing after the "
                    "first attempt")
    ap.add_argument("--churn-ms", type=int, default=250, help="between BAR changes")
    ap.add_argument("--stops", type=int, default=3000, help="SIGSTOP/SIGCONT pairs")
    ap.add_argument("--spin", type=int, default=0,
                    help="the guest's pacing: loop iterations after each store (0: unpaced)")
    ap.add_argument("--count", type=int, default=50, help="soak: migrations")
    ap.add_argument("--rss-margin-mib", type=int, default=32, help="soak: RSS growth allowed")
    ap.add_argument("--keep", help="directory to keep logs in")
    ap.add_argument("--trace", default="", help="QEMU trace events (a pattern); the "
                    "source's are counted per event")
    args = ap.parse_args()
    ok, res = run_flow(args)
    print(("PASS " if ok else "FAIL ") + json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
