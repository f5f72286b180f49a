#!/usr/bin/env python3
"""Live-migrates a multi-vCPU guest between two QEMUs on /dev/kvm and checks
that the destination's RAM is the source's, page for page, and that the guest
runs on after `cont`.

The guest is guest/mp-guest.S (multiboot, loaded with -kernel): every vCPU
stores to pseudo-random pages of a 320 MiB region without pausing and prints
a heartbeat. The source is migrated over a unix socket to a destination
started with `-incoming defer -S`; after `completed`, both RAMs are
compared page by page, read through /proc/<pid>/mem of the two paused QEMUs
(pages both map to the zero page are skipped, so a mostly idle 16 GiB guest
compares in seconds); then the destination is continued and every vCPU's
heartbeat must go on there.

One run per invocation; the last line is "PASS ..." or "FAIL ..." with the
figures, exit status 0 on PASS. Every wait is bounded.

    tests/qemu-migration.py --qemu PATH --mode ring|dirty-limit|bitmap [--smp 2]

(meson-snippet/qemu/build-and-test runs it on the patched and the stock
build; examples/migration-bench.py imports migrate() and adds a paced dirty
rate, bigger guests and the source's CPU time per thread.)
"""

import argparse
import array
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096
RAM_MIB = 512
REGION_BASE = 0x0100_0000  # guest/mp-guest.S
REGION_PAGES = 81920
# The legacy BIOS area (0xc0000-0xfffff), mapped through the PAM registers:
# two bytes at 0xe8380 differ in every run, bitmap mode and every binary
# included (measured with Debian's 10.0.2), and the guest never writes
# there. Reported apart, never counted as a lost page.
FIRMWARE = range(0xC0000 // PAGE, 0x100000 // PAGE)


def build_guest(work):
    src = os.path.join(REPO, "guest", "mp-guest.S")
    obj = os.path.join(work, "mp-guest.o")
    elf = os.path.join(work, "mp-guest.elf")
    subprocess.run(["as", "--32", src, "-o", obj], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "--no-warn-rwx-segments",
                    "-Ttext", "0x100000", "-o", elf, obj], check=True)
    return elf


class Qmp:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise RuntimeError(f"QMP socket {path} never answered")
                time.sleep(0.1)
        self.sock.settimeout(120)
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r["return"]

    def wait_completed(self, deadline, what):
        """Polls query-migrate until it says completed; `what` names the
        migration in the error raised at `deadline`."""
        while self.cmd("query-migrate").get("status") != "completed":
            if time.time() > deadline:
                raise RuntimeError(what)
            time.sleep(0.2)


def beats(path):
    """{cpu: last count} from a serial log."""
    last = {}
    try:
        with open(path, errors="replace") as f:
            for m in re.finditer(r"beat (\d+) (\d+)\n", f.read()):
                last[int(m.group(1))] = int(m.group(2))
    except FileNotFoundError:
        pass
    return last


def wait_beats(path, smp, after, deadline):
    """Waits until every vCPU printed a beat above after[cpu]; True if so."""
    while time.time() < deadline:
        b = beats(path)
        if all(b.get(c, -1) > after.get(c, -1) for c in range(smp)):
            return True
        time.sleep(0.5)
    return False


def ram_hva(pid, size):
    """Start of QEMU's guest RAM in process pid: its one anonymous
    read-write mapping of exactly the RAM's size."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi - lo == size and fields[1].startswith("rw") and len(fields) == 5:
                found.append(lo)
    if len(found) != 1:
        raise RuntimeError(f"pid {pid}: {len(found)} mappings of the RAM's size {size:#x}")
    return found[0]


def page_frames(pid, hva, pages):
    """The page frame of every page of the RAM (0: not present), from
    /proc/<pid>/pagemap (root reads the frame numbers)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(hva // PAGE * 8)
        entries = array.array("Q")
        entries.frombytes(f.read(pages * 8))
    present, swapped, pfn_mask = 1 << 63, 1 << 62, (1 << 55) - 1
    return [(e & pfn_mask) if e & present else (-1 if e & swapped else 0) for e in entries]


def writer_counts(page, smp, counts):
    """guest/linux-writer.c's words in a page of the source's RAM (every
    CPU's word: its number in the high half, and the byte after them 1):
    raises counts[cpu] to the store count found there."""
    if page[8 * smp] != 1:
        return
    words = struct.unpack_from(f"<{2 * smp}I", page)
    if any(words[2 * c + 1] != c for c in range(smp)):
        return
    for c in range(smp):
        if words[2 * c] > counts.get(c, 0):
            counts[c] = words[2 * c]


def compare(pid_a, pid_b, size, on_page=None):
    """Differing pages of the guest RAM of two paused QEMUs: [(page, a, b)],
    page numbers counted in the RAM block (= guest physical below 3 GiB).
    Read through /proc/<pid>/mem; a page that is absent on both sides, or
    mapped to a frame the process shares between pages (the zero page, also
    the huge zero page's), is zero on both and not read. on_page(data):
    called with every page read from pid_a."""
    pages = size // PAGE
    ha, hb = ram_hva(pid_a, size), ram_hva(pid_b, size)
    fa, fb = page_frames(pid_a, ha, pages), page_frames(pid_b, hb, pages)

    def shared(frames):
        seen, twice = set(), set()
        for x in frames:
            if x > 0:
                (twice if x in seen else seen).add(x)
        return twice

    za, zb = shared(fa), shared(fb)
    diffs, read = [], 0
    with open(f"/proc/{pid_a}/mem", "rb", buffering=0) as ma, \
            open(f"/proc/{pid_b}/mem", "rb", buffering=0) as mb:
        p = 0
        while p < pages:
            if (fa[p] == 0 or fa[p] in za) and (fb[p] == 0 or fb[p] in zb):
                p += 1
                continue
            q = p  # a run of pages to read
            while q < pages and q - p < 256 and not (
                    (fa[q] == 0 or fa[q] in za) and (fb[q] == 0 or fb[q] in zb)):
                q += 1
            ma.seek(ha + p * PAGE)
            mb.seek(hb + p * PAGE)
            x, y = ma.read((q - p) * PAGE), mb.read((q - p) * PAGE)
            read += q - p
            if on_page:
                for i in range(0, len(x), PAGE):
                    on_page(x[i:i + PAGE])
            if x != y:
                for i in range(0, len(x), PAGE):
                    if x[i:i + PAGE] != y[i:i + PAGE]:
                        diffs.append((p + i // PAGE, x[i:i + PAGE], y[i:i + PAGE]))
            p = q
    return diffs, read


def thread_cpu(pid):
    """{tid: (name, (user, system) CPU seconds)} of a process's live
    threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) / tick, int(fields[12]) / tick))
    return out


def proc_cpu(pid):
    """CPU seconds of a whole process, its ended threads included."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_group(name):
    """The group of a QEMU thread, by its name (-name debug-threads=on)."""
    if "/KVM" in name:
        return "vcpu"
    if name.startswith("mig/"):
        return "migration"
    return "reaper" if name in ("kvm-reaper", "kds-reaper") else "other"


def cpu_groups(first, last):
    """CPU seconds per group of threads between two sets of samples: vcpu
    (CPU n/KVM; here the kernel runs the guest, as system time) and
    vcpu_user (their user time: QEMU's handling of exits, ring-full reaps
    included), migration (mig/src/...), reaper (kvm-reaper and the shim's
    kds-reaper), other. A thread gone before the last sample counts with
    its last sample."""
    groups = {"vcpu": 0.0, "vcpu_user": 0.0, "migration": 0.0, "reaper": 0.0, "other": 0.0}
    for tid, (name, (u, s)) in last.items():
        u0, s0 = first.get(tid, (name, (0.0, 0.0)))[1]
        g = thread_group(name)
        if g == "vcpu":
            groups["vcpu"] += s - s0
            groups["vcpu_user"] += u - u0
        else:
            groups[g] += u - u0 + s - s0
    return {k: round(v, 2) for k, v in groups.items()}


def thread_names(first, last):
    """CPU seconds (user + system) per thread name between two samples, for
    the threads that used any."""
    out = {}
    for tid, (name, (u, s)) in last.items():
        u0, s0 = first.get(tid, (name, (0.0, 0.0)))[1]
        out[name] = round(out.get(name, 0.0) + u - u0 + s - s0, 2)
    return {k: v for k, v in out.items() if v > 0}


PERF_HZ = 1999
# What a migration thread's sample is doing when it is dirty tracking, not
# sending: its leaf function (user frames have no call chain: QEMU is built
# without frame pointers), or a VM ioctl on its kernel stack
# (KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS).
SYNC_LEAVES = ("kds_", "kvm_dirty_shim", "dirty_ring", "kvm_slot_", "kvm_physical_sync",
               "kvm_log_", "dirty_lebitmap", "physical_memory_", "ramblock_sync_dirty",
               "migration_bitmap_sync", "memory_region_sync_dirty", "dirty_log_sync",
               "kvm_cpu_synchronize_kick")


def perf_groups(path):
    """CPU seconds per group of threads from a perf record of the source
    (cpu-clock samples with call chains): like cpu_groups, but a vCPU
    thread's samples in user space (QEMU's exit handling) or in a VM ioctl
    (stock QEMU harvests and resets its rings on ring-full exits there)
    count as vcpu_other, the rest (KVM_RUN) as vcpu_run; reset
    is KVM_RESET_DIRTY_RINGS's kernel time, from any thread; migration_sync
    the migration thread's samples in dirty tracking (SYNC_LEAVES, VM
    ioctls), part of migration."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "comm,tid,ip,sym"],
                         capture_output=True, text=True, timeout=300).stdout
    n = {"vcpu_run": 0, "vcpu_other": 0, "migration": 0, "migration_sync": 0, "reaper": 0,
         "other": 0, "reset": 0}
    for block in out.split("\n\n"):
        lines = block.strip().split("\n")
        if not lines or not lines[0].strip():
            continue
        comm = re.sub(r"\s+\d+\s*$", "", lines[0].strip())
        stack = block[len(lines[0]):]
        if "kvm_dirty_ring_reset" in stack:
            n["reset"] += 1
        first = lines[1].split() if len(lines) > 1 else []
        user = bool(first) and not first[0].startswith("ffffffff")
        g = thread_group(comm)
        if g == "vcpu":
            g = "vcpu_other" if user or "kvm_vm_ioctl" in stack else "vcpu_run"
        elif g == "migration":
            leaf = first[1] if len(first) > 1 else ""
            if "kvm_vm_ioctl" in stack or (user and any(k in leaf for k in SYNC_LEAVES)):
                n["migration_sync"] += 1
        n[g] += 1
    return {k: round(v / PERF_HZ, 3) for k, v in n.items()}


# The source's trace events (-msg timestamp=on: each line starts with its
# time): ring-full exits, the shim's stats (once a second), each dirty sync
# with the pages it found, stock QEMU's ring reaps with their entries, and
# stock QEMU's KVM_CLEAR_DIRTY_LOG calls (bitmap mode).
TRACE_EVENTS = ("kvm_dirty_ring_full", "kvm_dirty_shim_stats", "migration_bitmap_sync_start",
                "migration_bitmap_sync_end", "kvm_dirty_ring_reap", "kvm_clear_dirty_log")
TRACE_LINE = re.compile(r"^(?:(\d{4}-\d\d-\d\dT\d\d:\d\d:[\d.]+)Z )?(\w+) ?(.*)$")


def trace_figures(lines):
    """Figures from the source's trace: ring_full_exits; shim_stats, the
    patched QEMU's last kvm_dirty_shim_stats; sync_ms, each
    dirty sync's duration (migration_bitmap_sync_start to _end);
    dirtied_pages, the pages the syncs found dirty (summed: what QEMU saw
    dirtied during the migration); ring_entries_reaped, stock QEMU's
    (kvm_dirty_ring_reap); clear_dirty_log_calls."""
    out = {"ring_full_exits": 0, "sync_ms": [], "dirtied_pages": 0,
           "ring_entries_reaped": 0, "clear_dirty_log_calls": 0}
    start = None
    for line in lines:
        m = TRACE_LINE.match(line.strip())
        if not m:
            continue
        stamp, event, rest = m.groups()
        t = None
        if stamp:
            hms = stamp.split("T")[1].split(":")
            t = int(hms[0]) * 3600 + int(hms[1]) * 60 + float(hms[2])
        if event == "kvm_dirty_ring_full":
            out["ring_full_exits"] += 1
        elif event == "migration_bitmap_sync_start":
            start = t
        elif event == "migration_bitmap_sync_end":
            out["dirtied_pages"] += int(rest.split()[-1])
            if start is not None and t is not None:
                out["sync_ms"].append(round((t - start) * 1000 % 86400000, 3))
            start = None
        elif event == "kvm_dirty_ring_reap":
            out["ring_entries_reaped"] += int(rest.split()[1])
        elif event == "kvm_clear_dirty_log":
            out["clear_dirty_log_calls"] += 1
        elif event == "kvm_dirty_shim_stats":  # cumulative: the last one counts
            out["shim_stats"] = {k: int(v) for k, v in (kv.split("=") for kv in rest.split())}
    return out


def describe(diffs, smp):
    """What the workload's words say about the first differing pages."""
    out = []
    for p, x, y in diffs[:5]:
        gpa = p * PAGE
        words = []
        if REGION_BASE <= gpa < REGION_BASE + REGION_PAGES * PAGE:
            for c in range(smp):
                sx = int.from_bytes(x[c * 8:c * 8 + 4], "little")
                dx = int.from_bytes(y[c * 8:c * 8 + 4], "little")
                if sx != dx:
                    words.append(f"cpu{c} src {sx} dst {dx}")
        out.append(f"gpa {gpa:#x}" + (" (" + ", ".join(words) + ")" if words else ""))
    return "; ".join(out)


def add_dirty_tracker(ap):
    """--dirty-tracker, which dirty_tracker() turns into -accel's property."""
    ap.add_argument("--dirty-tracker", choices=["qemu", "shim"],
                    help="-accel kvm,dirty-tracker= (a patched QEMU); unset: the binary's default")


def dirty_tracker(args):
    """What --dirty-tracker adds to -accel kvm's properties."""
    return f",dirty-tracker={args.dirty_tracker}" if args.dirty_tracker else ""


def parser():
    """The options of one migration (examples/migration-bench.py adds its own)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--mode", choices=["ring", "dirty-limit", "bitmap"], required=True)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--ring-size", type=int, default=4096)
    add_dirty_tracker(ap)
    ap.add_argument("--bandwidth-mib", type=int, default=128)
    # dirty-limit: 1 s, where this guest (about 330k dirtied pages a second
    # from 2 vCPUs) converges only if throttled (measured: without
    # dirty-limit, 128 MiB/s and 1 s never converge; remaining RAM cycles
    # between 150 and 300 MiB).
    ap.add_argument("--downtime-ms", type=int, help="3000 (dirty-limit: 1000)")
    ap.add_argument("--timeout", type=int, default=180, help="seconds for the migration")
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", help="directory to keep logs in")
    ap.add_argument("--trace", default="", help="more QEMU trace events, comma separated")
    ap.add_argument("--ram-mib", type=int, default=RAM_MIB, help="guest RAM")
    ap.add_argument("--spin", type=int, default=0,
                    help="guest loop iterations after each store (paces the dirty rate)")
    ap.add_argument("--beat-mask", type=int, default=0,
                    help="heartbeat every mask + 1 stores (0: the guest's 0xffff)")
    ap.add_argument("--rate-window", type=float, default=0,
                    help="seconds to measure the store rate before migrating")
    ap.add_argument("--region-pages", type=int, default=0,
                    help="pages the guest writes (0: REGION_PAGES); the vCPUs then fill "
                    "the region in turn (KNOB_NCPUS)")
    ap.add_argument("--auto-converge", action="store_true",
                    help="QEMU's auto-converge capability, with its default parameters")
    ap.add_argument("--linux", metavar="DIR",
                    help="the Linux guest instead (guest/linux-writer.c, user-mode stores), "
                    "started from the state tools/linux-guest/prepare.py saved in DIR; "
                    "its vCPUs and RAM are the state's")
    ap.add_argument("--sparse", action="store_true",
                    help="guest RAM from memory-backend-ram with reserve=off (MAP_NORESERVE): "
                    "guests bigger than the host, whose untouched RAM costs nothing")
    ap.add_argument("--perf", help="record the source QEMU with perf (cpu-clock, call "
                    "graphs) while it migrates, into this file")
    return ap


def linux_guest(state_dir):
    """The Linux guest's settings (tools/linux-guest/prepare.py): a dict
    of smp, ram_mib, cpu, cmdline; and the guest-physical pages of its
    kvmclock data (wall_clock, hv_clock_boot, from System.map), which the
    destination's KVM rewrites when QEMU restores the kvmclock MSRs: they
    differ after every migration, bitmap mode included."""
    with open(os.path.join(state_dir, "guest")) as f:
        g = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    kvmclock = set()
    with open(os.path.join(state_dir, "System.map")) as f:
        for line in f:
            addr, _, name = line.split()
            if name in ("wall_clock", "hv_clock_boot"):
                # nokaslr, PVH entry: the kernel's image at 16 MiB is
                # mapped at __START_KERNEL_map + 16 MiB.
                gpa = int(addr, 16) - 0xFFFF_FFFF_8000_0000
                kvmclock |= {gpa // PAGE, (gpa + 63) // PAGE}
    return g, kvmclock


def migrate(args):
    """One migration; returns its figures (result["ok"]: it passed)."""
    kvmclock = set()
    if args.linux:
        guest, kvmclock = linux_guest(args.linux)
        args.smp, args.ram_mib = int(guest["smp"]), int(guest["ram_mib"])
    if args.downtime_ms is None:
        args.downtime_ms = 1000 if args.mode == "dirty-limit" else 3000
    label = args.label or f"{os.path.basename(os.path.dirname(args.qemu))} {args.mode}"

    work = tempfile.mkdtemp(prefix="kds-mig-")
    procs = []
    perf = None  # perf record of the source (--perf)
    result = {"label": label}
    t_start = time.time()
    try:
        if args.linux:
            guest_args = ["-machine", "pc", "-cpu", guest["cpu"],
                          "-kernel", os.path.join(args.linux, "vmlinux"),
                          "-initrd", os.path.join(args.linux, "initrd"),
                          "-append", guest["cmdline"]]
        else:
            guest_args = ["-cpu", "host,-arch-capabilities", "-kernel", build_guest(work)]
        accel = "kvm"
        if args.mode != "bitmap":
            accel += f",dirty-ring-size={args.ring_size}"
        accel += dirty_tracker(args)
        trace_events = os.path.join(work, "events")
        with open(trace_events, "w") as f:
            f.write("".join(e + "\n" for e in TRACE_EVENTS))
            f.write("".join(e + "\n" for e in args.trace.split(",") if e))

        knobs = []  # the guest's pacing (guest/mp-guest.S, KNOB_*)
        region = ((0x800010, args.region_pages), (0x800014, args.smp)) if args.region_pages else ()
        for addr, val in ((0x800000, args.spin), (0x800004, args.beat_mask)) + region:
            if val and not args.linux:
                knobs += ["-device", f"loader,addr={addr:#x},data={val},data-len=4"]

        def start(role, extra):
            # debug-threads: named threads (CPU n/KVM, mig/src/main,
            # kvm-reaper) for the CPU time per thread.
            cmd = [args.qemu, "-name", "kds,debug-threads=on",
                   "-accel", accel, "-smp", str(args.smp), "-m", str(args.ram_mib)] + guest_args + [
                   "-display", "none", "-nodefaults", "-no-reboot", "-msg", "timestamp=on",
                   "-serial", f"file:{work}/{role}.serial",
                   "-qmp", f"unix:{work}/{role}.qmp,server=on,wait=off",
                   "-trace", f"events={trace_events},file={work}/{role}.trace"] + knobs + extra
            if args.sparse:
                cmd += ["-object", f"memory-backend-ram,id=ram0,size={args.ram_mib}M,reserve=off",
                        "-machine", "memory-backend=ram0"]
            log = open(f"{work}/{role}.log", "w")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            return p, Qmp(f"{work}/{role}.qmp", time.time() + 30)

        if args.linux:
            # From the saved state: seconds, where a boot takes 27 minutes.
            src_p, src = start("src", ["-incoming", "defer", "-S"])
            src.cmd("migrate-incoming", uri=f"file:{os.path.join(args.linux, 'state')}")
            src.wait_completed(time.time() + 120, "the saved state did not load in 120 s")
            src.cmd("cont")
        else:
            src_p, src = start("src", [])
        # SeaBIOS runs emulated here: about 15 s to the first heartbeat.
        if not wait_beats(f"{work}/src.serial", args.smp, {}, time.time() + 120):
            raise RuntimeError("the source guest printed no heartbeat from every vCPU in 120 s")
        if args.rate_window:
            b0, t = beats(f"{work}/src.serial"), time.time()
            time.sleep(args.rate_window)
            b1 = beats(f"{work}/src.serial")
            result["stores_per_s_before"] = round(
                sum(b1.get(c, 0) - b0.get(c, 0) for c in range(args.smp)) / (time.time() - t))
        dst_p, dst = start("dst", ["-incoming", "defer", "-S"])
        sock = f"{work}/mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        caps = []
        params = {"max-bandwidth": args.bandwidth_mib << 20,
                  "downtime-limit": args.downtime_ms}
        if args.auto_converge:
            caps.append({"capability": "auto-converge", "state": True})
        if args.mode == "dirty-limit":
            caps.append({"capability": "dirty-limit", "state": True})
            params.update({"vcpu-dirty-limit": 1, "x-vcpu-dirty-limit-period": 500})
        if caps:
            src.cmd("migrate-set-capabilities", capabilities=caps)
        src.cmd("migrate-set-parameters", **params)
        cpu_first = cpu_last = thread_cpu(src_p.pid)
        proc_first = proc_cpu(src_p.pid)
        beats_first = beats(f"{work}/src.serial")
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock",
                                     "-F", str(PERF_HZ),
                                     "-g", "-p", str(src_p.pid), "-o", args.perf],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attaches to every thread before the migration starts
        t0 = time.time()
        src.cmd("migrate", uri=f"unix:{sock}")
        status = None
        info = {}
        trail = []  # (s, MiB remaining, dirty syncs), once a second
        # (s, auto-converge's cpu-throttle-percentage) at each change: how
        # fast the throttle rose is what decides when auto-converge converges.
        throttle = []
        # (s, the guest's stores so far), once a second: its progress while
        # throttled, at each stage.
        stores = []
        while time.time() - t0 < args.timeout:
            info = src.cmd("query-migrate")
            status = info.get("status")
            cpu_last = {**cpu_last, **thread_cpu(src_p.pid)}
            r = info.get("ram", {})
            if not trail or time.time() - t0 >= trail[-1][0] + 1:
                trail.append((round(time.time() - t0), r.get("remaining", 0) >> 20,
                              r.get("dirty-sync-count")))
                stores.append((trail[-1][0], sum(beats(f"{work}/src.serial").values())))
            pct = info.get("cpu-throttle-percentage")
            if pct is not None and (not throttle or throttle[-1][1] != pct):
                throttle.append((round(time.time() - t0, 1), pct))
            if status in ("completed", "failed", "cancelled"):
                break
            if src_p.poll() is not None:
                status = f"source exited ({src_p.returncode})"
                break
            time.sleep(0.2)
        result["migration_s"] = round(time.time() - t0, 1)
        result["status"] = status
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
            result["perf_s"] = perf_groups(args.perf)
        beats_last = beats(f"{work}/src.serial")
        result["stores"] = sum(beats_last.get(c, 0) - beats_first.get(c, 0) for c in range(args.smp))
        result["stores_per_s"] = round(result["stores"] / max(result["migration_s"], 0.1))
        result["cpu_s"] = cpu_groups(cpu_first, cpu_last)
        result["cpu_s"]["process"] = round(proc_cpu(src_p.pid) - proc_first, 2)
        result["cpu_threads_s"] = thread_names(cpu_first, cpu_last)
        result["src_state"] = src.cmd("query-status")["status"]
        ram = info.get("ram", {})
        result["dirty_syncs"] = ram.get("dirty-sync-count")
        result["downtime_ms"] = info.get("downtime")
        result["total_ms"] = info.get("total-time")
        result["transferred_mib"] = round(ram.get("transferred", 0) / (1 << 20), 1)
        result["pages_sent"] = ram.get("normal")
        result["throttle_trail"] = throttle
        result["stores_trail"] = stores
        if status != "completed":
            result["remaining_mib_trail"] = trail[-12:]
            src.cmd("migrate_cancel")
            raise RuntimeError(f"migration {status} after {result['migration_s']} s")
        # Wait for the destination to have taken it all in (paused, -S).
        deadline = time.time() + 60
        while (st := dst.cmd("query-status")["status"]) != "paused":
            if time.time() > deadline or st not in ("inmigrate", "prelaunch"):
                raise RuntimeError(f"the destination is {st!r} after the migration, not paused")
            time.sleep(0.2)
        # query-migrate on the destination says completed once loaded.
        dst.wait_completed(deadline, "the destination never completed the incoming migration")
        t_cmp = time.time()
        counts = {}  # the Linux guest's store counts in the source's RAM
        on_page = (lambda pg: writer_counts(pg, args.smp, counts)) if args.linux else None
        diffs, read = compare(src_p.pid, dst_p.pid, args.ram_mib << 20, on_page)
        if args.linux and len(counts) == args.smp:
            # Its beats are 2^20 stores apart (too coarse for a guest that
            # stalls): the stores while migrating are the counts its words
            # hold at the end, less the last beat before the migration.
            result["stores"] = sum(counts[c] - beats_first.get(c, 0) for c in range(args.smp))
            result["stores_per_s"] = round(result["stores"] / max(result["migration_s"], 0.1))
        result["compare_s"] = round(time.time() - t_cmp, 1)
        result["pages_compared"] = read
        # The region the guest writes must have been read: else the compare
        # looked at the wrong memory.
        if read < 1000:
            raise RuntimeError(f"only {read} non-zero pages compared: not the guest's RAM?")
        result["firmware_pages_differ"] = sum(1 for d in diffs if d[0] in FIRMWARE)
        if args.linux:
            result["kvmclock_pages_differ"] = sum(1 for d in diffs if d[0] in kvmclock)
        diffs = [d for d in diffs if d[0] not in FIRMWARE and d[0] not in kvmclock]
        result["pages_differ"] = len(diffs)
        if diffs:
            result["first_differ"] = describe(diffs, args.smp)
        # The guest runs on at the destination: every vCPU beats past where
        # it was when the source stopped.
        at_stop = beats(f"{work}/src.serial")
        dst.cmd("cont")
        alive = wait_beats(f"{work}/dst.serial", args.smp, at_stop, time.time() + 60)
        result["dst_state"] = dst.cmd("query-status")["status"]
        result["alive"] = alive and result["dst_state"] == "running"
    except Exception as e:  # reported, never a traceback
        result["error"] = str(e)
    finally:
        if perf is not None and perf.poll() is None:  # an error came first
            perf.kill()
            perf.wait()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        lines = []
        for f in sorted(os.listdir(work)):
            if f.startswith("src.trace"):
                with open(os.path.join(work, f), errors="replace") as t:
                    lines += t.readlines()
        result["shim_stats"] = {}
        result.update(trace_figures(lines))
        shim = result["shim_stats"]
        with open(f"{work}/src.log", errors="replace") as f:
            errs = [ln.strip() for ln in f if ln.strip()]
        if shim:
            result["overflows"] = int(shim.get("ring_overflows", 0))
            result["wedges"] = int(shim.get("ring_wedges", 0))
        if errs:
            result["src_stderr"] = errs[-1][:200]
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            os.makedirs(args.keep)
            for f in os.listdir(work):
                if f.endswith((".log", ".serial", ".trace")) or ".trace." in f:
                    shutil.copy(os.path.join(work, f), args.keep)
        if not os.environ.get("KDS_MIG_KEEP_RAM"):
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.time() - t_start, 1)
    result["ok"] = ("error" not in result and result.get("pages_differ") == 0
                    and result.get("alive") and result.get("src_state") == "postmigrate")
    return result


def main():
    result = migrate(parser().parse_args())
    ok = result.pop("ok")
    print(("PASS " if ok else "FAIL ") + json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
