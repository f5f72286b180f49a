#!/usr/bin/env python3
"""Prepares the Linux guest of the migration benchmark (doc/migration.md,
"The Linux guest"): builds the kernel (build-kernel.sh), the workload
(guest/linux-writer.c, static) and an initramfs holding it as /init, boots
it once under QEMU (27 minutes here, measured: ACPI and the kernel's
memory zeroing run emulated), waits until every vCPU's writer beats, stops
it and saves its state with `migrate` to a file. Every later run starts from that
state in seconds (tests/qemu-migration.py --linux DIR).

    tools/linux-guest/prepare.py --qemu PATH [--smp 2] [--ram-mib 1024]

Prints the state directory: $KDS_GUEST_CACHE/state-<key>/ (kernel, initrd,
command line, System.map and the saved state), keyed by all of them and
the QEMU release, so that it is made once. Every wait is bounded.
"""

import argparse
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("KDS_GUEST_CACHE", os.path.expanduser("~/.cache/kds-linux-guest"))
spec = importlib.util.spec_from_file_location(
    "qemu_migration", os.path.join(REPO, "tests", "qemu-migration.py"))
qm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qm)

# What keeps the kernel off instructions this host's emulator lacks, and
# the writer's settings (guest/linux-writer.c).
CMDLINE = ("console=ttyS0 rcupdate.rcu_cpu_stall_suppress=1 noxsave nofsgsbase nopku "
           "clearcpuid=smap,invpcid,pcid,rdrand,rdseed,rdpid,popcnt,movbe,rdtscp,bmi1,bmi2,"
           "abm,114 init_on_alloc=0 mitigations=off pti=off nokaslr quiet "
           "KDS_BEAT_SHIFT=20 KDS_RESERVE_MIB=96")
CPU = "host,-arch-capabilities,-cx16,kvm-pv-ipi=off"


def cpio(entries):
    """A newc cpio archive of (name, mode, data, rdev major, minor)."""
    out, ino = b"", 1
    for name, mode, data, major, minor in entries + [("TRAILER!!!", 0, b"", 0, 0)]:
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{x:08x}" for x in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nm), 0))
        out += hdr.encode() + nm
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return out + b"\0" * (-len(out) % 512)


def build(work):
    kernel = subprocess.run([os.path.join(HERE, "build-kernel.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    init = os.path.join(work, "init")
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", init,
                    os.path.join(REPO, "guest", "linux-writer.c")], check=True)
    with open(init, "rb") as f:
        data = f.read()
    initrd = os.path.join(work, "initrd.cpio")
    with open(initrd, "wb") as f:
        f.write(cpio([("dev", 0o40755, b"", 0, 0), ("dev/console", 0o20600, b"", 5, 1),
                      ("proc", 0o40755, b"", 0, 0), ("init", 0o100755, data, 0, 0)]))
    return kernel, initrd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--boot-timeout", type=int, default=2400, help="seconds")
    a = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    work = os.path.join(CACHE, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    kernel, initrd = build(work)
    h = hashlib.sha256()
    for path in (kernel, initrd):
        with open(path, "rb") as f:
            h.update(f.read())
    # A state saved by one build of a QEMU release loads in another build
    # of it (the stock and the patched one): keyed by the release.
    h.update(subprocess.run([a.qemu, "--version"], capture_output=True, text=True,
                            check=True).stdout.split("\n")[0].encode())
    h.update(f"{CMDLINE} {CPU} {a.smp} {a.ram_mib}".encode())
    state_dir = os.path.join(CACHE, f"state-{h.hexdigest()[:12]}")
    if os.path.exists(os.path.join(state_dir, "state")):
        print(state_dir)
        return 0
    os.makedirs(state_dir, exist_ok=True)
    for src, name in ((kernel, "vmlinux"), (initrd, "initrd"),
                      (os.path.join(os.path.dirname(kernel), "System.map"), "System.map")):
        shutil.copy(src, os.path.join(state_dir, name))
    with open(os.path.join(state_dir, "guest"), "w") as f:
        f.write(f"smp={a.smp}\nram_mib={a.ram_mib}\ncpu={CPU}\ncmdline={CMDLINE}\n")
    serial = os.path.join(state_dir, "boot.serial")
    qmp = os.path.join(work, "qmp")
    cmd = [a.qemu, "-machine", "pc", "-accel", "kvm", "-cpu", CPU, "-smp", str(a.smp),
           "-m", str(a.ram_mib), "-kernel", os.path.join(state_dir, "vmlinux"),
           "-initrd", os.path.join(state_dir, "initrd"), "-append", CMDLINE,
           "-display", "none", "-nodefaults", "-no-reboot", "-serial", f"file:{serial}",
           "-qmp", f"unix:{qmp},server=on,wait=off"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        mon = qm.Qmp(qmp, time.time() + 30)
        t0 = time.time()
        if not qm.wait_beats(serial, a.smp, {}, t0 + a.boot_timeout):
            sys.exit(f"the guest printed no beat from every vCPU in {a.boot_timeout} s "
                     f"(its console: {serial})")
        print(f"booted and writing after {time.time() - t0:.0f} s", file=sys.stderr)
        mon.cmd("stop")
        state = os.path.join(state_dir, "state")
        mon.cmd("migrate", uri=f"file:{state}.part")
        deadline = time.time() + 300
        while (st := mon.cmd("query-migrate").get("status")) != "completed":
            if st in ("failed", "cancelled") or time.time() > deadline:
                sys.exit(f"saving the state: {st}")
            time.sleep(0.5)
        os.rename(f"{state}.part", state)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    print(state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
