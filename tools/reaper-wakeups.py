#!/usr/bin/env python3
"""QEMU's reaper thread under kvm-dirty-shim: its wake-ups (voluntary
context switches, /proc/<pid>/task/<tid>/status) and BQL acquisitions
(perf, a uprobe on bql_lock_impl counted on that thread) per second, in
three phases of one idle guest: nothing logged; dirty logging on
(calc-dirty-rate in dirty-ring mode, as a migration turns it on); and
dirty-limit in service (set-vcpu-dirty-limit). Prints one line per phase,
with the library's own reaper thread's (kds-reaper) wake-ups where it runs.

  tools/reaper-wakeups.py --qemu BUILD/qemu-system-x86_64 [--seconds 10]

Needs perf and uprobes; a patched QEMU with -accel kvm,dirty-tracker=.
A benchmark: it prints figures, it asserts nothing.
"""
import argparse, json, os, re, socket, subprocess, sys, tempfile, time


def qmp(sock_path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.1)
    f = s.makefile("rw")
    f.readline()

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r
    cmd("qmp_capabilities")
    return cmd


def switches(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", f.read()).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--tracker", default="shim")
    a = ap.parse_args()
    sym = subprocess.run(["nm", a.qemu], capture_output=True, text=True).stdout
    addr = re.search(r"^([0-9a-f]+) T bql_lock_impl$", sym, re.M).group(1)
    subprocess.run(["perf", "probe", "-q", "-d", "probe_qemu:kdsbql"], capture_output=True)
    subprocess.run(["perf", "probe", "-q", "-x", a.qemu, "-a", f"kdsbql=0x{addr}"], check=True)
    work = tempfile.mkdtemp()
    sock = os.path.join(work, "qmp")
    q = subprocess.Popen([a.qemu, "-name", "kds,debug-threads=on", "-accel",
                          f"kvm,dirty-ring-size=4096,dirty-tracker={a.tracker}",
                          "-m", "512", "-smp", "2", "-display", "none", "-nodefaults",
                          "-qmp", f"unix:{sock},server=on,wait=off"],
                         stderr=subprocess.DEVNULL)
    try:
        cmd = qmp(sock)
        time.sleep(2)
        names = {open(f"/proc/{q.pid}/task/{t}/comm").read().strip(): t
                 for t in os.listdir(f"/proc/{q.pid}/task")}
        tid = names["kvm-reaper"]
        kds = names.get("kds-reaper")  # the library's own reaper thread

        def phase(label):
            s0 = switches(q.pid, tid)
            k0 = switches(q.pid, kds) if kds else 0
            out = subprocess.run(["perf", "stat", "-x,", "-e", "probe_qemu:kdsbql", "-t", tid,
                                  "--", "sleep", str(a.seconds)],
                                 capture_output=True, text=True).stderr
            s1 = switches(q.pid, tid)
            k1 = switches(q.pid, kds) if kds else 0
            # "<not counted>": the thread never ran in the interval.
            m = re.search(r"^(\d+|<not counted>),,probe_qemu:kdsbql", out, re.M)
            if not m:
                sys.exit(f"perf stat said nothing about the probe:\n{out}")
            bql = int(m.group(1)) if m.group(1).isdigit() else 0
            print(f"{label:<26} wake-ups {(s1 - s0) / a.seconds:6.1f}/s   "
                  f"BQL acquisitions {bql / a.seconds:6.1f}/s   ({a.seconds} s)"
                  + (f"   kds-reaper wake-ups {(k1 - k0) / a.seconds:6.1f}/s" if kds else ""))

        print(f"{a.qemu} (dirty-tracker={a.tracker}), QEMU's kvm-reaper thread:")
        phase("idle, nothing logged")
        r = cmd("calc-dirty-rate", **{"calc-time": a.seconds + 4, "mode": "dirty-ring"})
        time.sleep(1)
        phase("dirty logging on")
        time.sleep(4)
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 1})
        time.sleep(1)
        phase("dirty-limit in service")
        cmd("cancel-vcpu-dirty-limit")
        cmd("quit")
    finally:
        q.kill()
        subprocess.run(["perf", "probe", "-q", "-d", "probe_qemu:kdsbql"], capture_output=True)


if __name__ == "__main__":
    main()
