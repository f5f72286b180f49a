#!/usr/bin/env python3
"""Migration benchmark: live migrations of a 2-vCPU guest through the shim
against stock QEMU, in bitmap and ring mode, small and large guests, at two
paced dirty rates. A program that prints figures, run by hand; never a test.

Each run is one tests/qemu-migration.py migration (the guest of
guest/mp-guest.S: every vCPU stores to pseudo-random pages of a 320 MiB
region, never pausing, paced here by a spin loop after each store), bounded
in time, and prints: completed or not, total time and downtime as QEMU
reports them, dirty-sync count, RAM transferred, ring-full exits (QEMU's
trace) and ring overflows (the shim's stats), the CPU time of the source
QEMU's threads (/proc: vCPU, migration, reaper threads), the CPU time spent
dirty tracking (perf record of the source: reaper threads, vCPU threads
outside KVM_RUN, the migration thread's dirty syncs; see tracking()), and
the pages that differ after completion (RAM compared page by page through
/proc/<pid>/mem).

    examples/migration-bench.py [--runs 3] [--sizes 512,16384] [--rates easy,near]
                                [--out doc/migration.csv]
    examples/migration-bench.py --matrix heavy [--cells 2x1024,8x4096,16x8192]
    examples/migration-bench.py --matrix scale [--cells 2x1024,2x16384,2x65536]
    examples/migration-bench.py --matrix scale|heavy --variant LABEL=QEMU ...
        (stock's rows again on QEMU, a stock build with one change to
        measure: how doc/qemu.md measured the dirty-bitmap summary)

Configurations: stock QEMU (10.2.2) in bitmap and ring mode, the patched
QEMU (meson-snippet/qemu/) in bitmap mode, ring mode (the shim's adaptive
reaper) and ring mode with dirty-limit. The builds are meson-snippet/qemu/
build-and-test's ($KDS_QEMU_CACHE, default ~/.cache/kds-qemu). Runs go in
rounds (every configuration once per round, in turn), so that a drift of
the machine spreads over all of them. Every run's figures go to OUT.jsonl
as they come; the medians per cell to OUT (CSV) and to the terminal as a
Markdown table; tools/plot draws the PNG from the CSV.

Two more matrices (doc/migration.md, "Heavy dirtying" and "Memory scale"):

- heavy: every vCPU stores unpaced to most of the guest's RAM (below
  4 GiB: the guest runs without paging), well above the link, so a
  migration converges only with auto-converge or dirty-limit (QEMU's
  defaults otherwise: 300 ms downtime limit). Cells are vCPUs x MiB.
  Configurations: stock bitmap, stock ring and patched ring with
  auto-converge, patched ring with dirty-limit. Per run also: the guest's
  store rate during the migration against the 3 s before it, the pages the
  dirty syncs found (QEMU's migration_bitmap_sync_end), the ring entries
  harvested, KVM_RESET_DIRTY_RINGS's CPU per entry (perf).
- scale: the same small paced working set (320 MiB, the "near" rate) in
  guests of 1, 16 and 64 GiB (memory-backend-ram with reserve=off: the
  untouched RAM costs the host nothing): each dirty sync's duration
  (migration_bitmap_sync_start to _end) and the tracking CPU per sync,
  stock bitmap against stock and patched ring.

The dirty rates are fractions of the migration bandwidth, in pages per
second: "easy" 25 % (converges at once), "near" 90 %. Before the matrix the
guest is booted twice without migrating, to fit the spin count to the rate
(one store costs a + b * spin seconds per vCPU); each run also reports the
store rate it measured while migrating (write-protect faults slow stores
down during a migration).
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "qemu_migration", os.path.join(REPO, "tests", "qemu-migration.py"))
qm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qm)

CACHE = os.environ.get("KDS_QEMU_CACHE", os.path.expanduser("~/.cache/kds-qemu"))
CONFIGS = [  # (name, build, mode)
    ("stock bitmap", "stock", "bitmap"),
    ("stock ring", "stock", "ring"),
    ("patched bitmap", "patched", "bitmap"),
    ("patched ring", "patched", "ring"),
    ("patched ring + dirty-limit", "patched", "dirty-limit"),
]
HEAVY_CONFIGS = [  # (name, build, mode, auto-converge)
    ("stock bitmap + auto-converge", "stock", "bitmap", True),
    ("stock ring + auto-converge", "stock", "ring", True),
    ("patched ring + auto-converge", "patched", "ring", True),
    ("patched ring + dirty-limit", "patched", "dirty-limit", False),
]
SCALE_CONFIGS = [
    ("stock bitmap", "stock", "bitmap", False),
    ("stock ring", "stock", "ring", False),
    ("patched ring", "patched", "ring", False),
]


def matrix_configs(a):
    """The heavy or scale matrix's configurations, with --variant's: every
    stock configuration again on the variant build."""
    base = HEAVY_CONFIGS if a.matrix == "heavy" else SCALE_CONFIGS
    if a.variant:
        label = a.variant.split("=", 1)[0]
        base = base + [(name.replace("stock", label, 1), "variant", *rest)
                       for name, build, *rest in base if build == "stock"]
    return [c for c in base if not a.configs or c[0] in a.configs.split(",")]


MATRIX_CELLS = {"heavy": "2x1024,8x4096,16x8192", "scale": "2x1024,2x16384,2x65536"}
GUEST_BASE_MIB = 17  # guest/mp-guest.S: the region starts at 16 MiB
LOWMEM_MIB = 3072  # pc: RAM below 4 GiB when the guest has 3.5 GiB or more
RATES = {"easy": 0.25, "near": 0.90}
BEAT_MASK = 0xfff  # a heartbeat every 4096 stores: fine enough for rates


def run_args(qemu, mode, ram_mib, spin, a, smp=2):
    ns = qm.parser().parse_args(["--qemu", qemu, "--mode", mode, "--smp", str(smp)])
    ns.ram_mib = ram_mib
    ns.spin = spin
    ns.beat_mask = BEAT_MASK
    ns.bandwidth_mib = a.bandwidth_mib
    ns.downtime_ms = a.downtime_ms
    ns.timeout = a.timeout
    ns.ring_size = a.ring_size
    # The patched build tracks through the shim only when asked.
    ns.dirty_tracker = "shim" if qemu == a.patched else None
    ns.label = ""
    if a.perf:
        ns.perf = f"/tmp/kds-bench-{os.getpid()}.perf"
    return ns


def thread_cpu(pid):
    """CPU seconds per thread name of a process (`qm.thread_cpu`)."""
    out = {}
    for name, (user, system) in qm.thread_cpu(pid).values():
        out[name] = out.get(name, 0) + user + system
    return out


# The patched QEMU, which runs with -accel kvm,dirty-tracker=shim.
SHIM_QEMU = None


def guest_rate(qemu, spin, seconds, ram_mib=512, ring_size=0, region_pages=0, settle_s=0):
    """Stores per second of the whole guest (2 vCPUs), booted without
    migrating, and the CPU seconds each QEMU thread took meanwhile.
    `region_pages`: the region the vCPUs store to (0: the guest's default);
    `settle_s`: how long to let it run first."""
    work = f"/tmp/kds-calibrate-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    elf = qm.build_guest(work)
    serial = f"{work}/serial"
    if os.path.exists(serial):
        os.unlink(serial)
    accel = f"kvm,dirty-ring-size={ring_size}" if ring_size else "kvm"
    if qemu == SHIM_QEMU:
        accel += ",dirty-tracker=shim"
    cmd = [qemu, "-name", "kds,debug-threads=on", "-accel", accel,
           "-cpu", "host,-arch-capabilities", "-smp", "2",
           "-m", str(ram_mib), "-kernel", elf, "-display", "none", "-nodefaults",
           "-serial", f"file:{serial}",
           "-device", f"loader,addr=0x800004,data={BEAT_MASK},data-len=4"]
    if spin:
        cmd += ["-device", f"loader,addr=0x800000,data={spin},data-len=4"]
    if region_pages:  # guest/mp-guest.S: KNOB_REGION_PAGES, KNOB_NCPUS
        cmd += ["-device", f"loader,addr=0x800010,data={region_pages},data-len=4",
                "-device", "loader,addr=0x800014,data=2,data-len=4"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not qm.wait_beats(serial, 2, {}, time.time() + 120):
            raise RuntimeError("the guest printed no heartbeat in 120 s")
        time.sleep(settle_s)
        b0, c0, t0 = qm.beats(serial), thread_cpu(p.pid), time.time()
        time.sleep(seconds)
        b1, c1, t1 = qm.beats(serial), thread_cpu(p.pid), time.time()
        rate = sum(b1.get(c, 0) - b0.get(c, 0) for c in range(2)) / (t1 - t0)
        return rate, {k: v - c0.get(k, 0) for k, v in c1.items()}
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(work, ignore_errors=True)


def store_rate(qemu, spin, seconds):
    """Stores per second of the whole guest (2 vCPUs), booted without
    migrating."""
    return guest_rate(qemu, spin, seconds)[0]


def calibrate(qemu, a):
    """Spin count per target rate: one store costs a + b * spin seconds on
    one vCPU (two boots: spin 0 and spin s1)."""
    s1 = 200  # this host emulates CPL0 guest code: a loop iteration costs about 1 us
    r0 = store_rate(qemu, 0, a.calibrate_s)
    r1 = store_rate(qemu, s1, a.calibrate_s)
    c0, c1 = 2 / r0, 2 / r1  # seconds per store per vCPU
    b = (c1 - c0) / s1
    print(f"calibration: {r0:.0f} stores/s unpaced, {r1:.0f} at spin {s1}: "
          f"{c0 * 1e6:.2f} us + {b * 1e9:.3f} ns x spin per store per vCPU", flush=True)
    spins = {}
    bw_pages = (a.bandwidth_mib << 20) / 4096
    for name in a.rates.split(","):
        target = RATES[name] * bw_pages  # pages (stores) per second, both vCPUs
        spins[name] = max(0, round((2 / target - c0) / b))
        print(f"rate {name}: {target:.0f} stores/s ({RATES[name]:.0%} of "
              f"{a.bandwidth_mib} MiB/s) -> spin {spins[name]}", flush=True)
    return spins


def record(ns, log, results, line, **fields):
    """One migration: its figures, with fields, go to results and to the
    JSONL log as it ends, and line(figures) to the terminal."""
    r = qm.migrate(ns)
    if ns.perf and os.path.exists(ns.perf):
        os.unlink(ns.perf)
    r.update(fields)
    r.setdefault("ring_size", ns.ring_size)
    results.append(r)
    log.write(json.dumps(r) + "\n")
    log.flush()
    print(line(r), flush=True)


def row(r):
    """The per-run line."""
    cpu = r.get("cpu_s", {})
    stats = r.get("shim_stats", {})
    return (f"{r['config']:<27} {r['guest_mib']:>6} MiB {r['rate']:<4} "
            f"{'done' if r.get('status') == 'completed' else 'NOT DONE':<8} "
            f"total {r.get('total_ms', '-')!s:>6} ms  down {r.get('downtime_ms', '-')!s:>5} ms  "
            f"syncs {r.get('dirty_syncs', '-')!s:>3}  {r.get('transferred_mib', '-')!s:>7} MiB  "
            f"stores/s {r.get('stores_per_s', '-')!s:>6}  full {r.get('ring_full_exits', 0):>6}  "
            f"ovf {stats.get('ring_overflows', '-')!s:>3}  "
            f"cpu s: proc {cpu.get('process', '-')} vcpu {cpu.get('vcpu', '-')} "
            f"vcpu-user {cpu.get('vcpu_user', '-')} mig {cpu.get('migration', '-')} "
            f"reap {cpu.get('reaper', '-')}  "
            f"tracking (perf) {'-' if tracking(r) is None else f'{tracking(r):.3f}'}  "
            f"differ {r.get('pages_differ', '-')}  alive {r.get('alive', '-')}"
            + (f"  ERROR {r['error']}" if "error" in r else ""))


def tracking(r):
    """CPU seconds spent dirty tracking, from perf (tests/qemu-migration.py
    perf_groups): the reaper threads, the vCPU threads outside KVM_RUN
    (QEMU's exit handling and the VM ioctls it makes there: stock QEMU
    harvests and resets its rings on ring-full exits, the shim's
    kds_vcpu_reap runs there), and the migration thread's dirty syncs; not
    the migration thread's sending, the same work in every configuration.
    The kernel's write-protect faults run inside KVM_RUN with the guest
    itself (this host emulates the guest's code) and are not separable.
    None without perf."""
    p = r.get("perf_s")
    return p and p["reaper"] + p["vcpu_other"] + p["migration_sync"]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results, a, machine):
    cells = {}
    for r in results:
        cells.setdefault((r["guest_mib"], r["rate"], r["config"]), []).append(r)
    header = ("guest,rate,config,runs,completed,total_s,downtime_ms,dirty_syncs,"
              "transferred_mib,ring_full_exits,overflows,stores_per_s,cpu_process_s,"
              "cpu_vcpu_s,cpu_vcpu_user_s,cpu_migration_s,cpu_reaper_s,tracking_s,reset_s,"
              "tracking_us_per_store,"
              "pages_differ_max")
    lines = [f"# {machine}", header]
    md = ["| guest | rate | config | completed | total s | downtime ms | syncs | MiB sent "
          "| ring-full exits | overflows | stores/s | CPU s (process / migration thread "
          "/ tracking) "
          "| tracking us/store | pages differ |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (size, rate, cfg) in sorted(cells, key=lambda k: (k[0], list(RATES).index(k[1]),
                                                          [c[0] for c in CONFIGS].index(k[2]))):
        rs = cells[(size, rate, cfg)]
        done = [r for r in rs if r.get("status") == "completed"]
        m = lambda f: med([f(r) for r in done])  # noqa: E731
        total = m(lambda r: r.get("total_ms", 0) / 1000)
        down = m(lambda r: r.get("downtime_ms"))
        syncs = m(lambda r: r.get("dirty_syncs"))
        sent = m(lambda r: r.get("transferred_mib"))
        full = med([r.get("ring_full_exits", 0) for r in rs])
        ovf = med([r.get("shim_stats", {}).get("ring_overflows") for r in rs])
        sps = m(lambda r: r.get("stores_per_s"))
        cproc = m(lambda r: r["cpu_s"]["process"])
        cvcpu = m(lambda r: r["cpu_s"]["vcpu"])
        cmig = m(lambda r: r["cpu_s"]["migration"])
        creap = m(lambda r: r["cpu_s"]["reaper"])
        cuser = m(lambda r: r["cpu_s"]["vcpu_user"])
        trk_s = m(tracking)
        reset = m(lambda r: r.get("perf_s", {}).get("reset"))
        trk = m(lambda r: tracking(r) and tracking(r) * 1e6 / max(r.get("stores", 0), 1))
        differ = max([r.get("pages_differ", -1) for r in rs if "pages_differ" in r], default=None)
        f = lambda v, d=1: "" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(",".join([f"{size} MiB", rate, cfg, str(len(rs)), f"{len(done)}/{len(rs)}",
                               f(total, 2), f(down, 0), f(syncs, 0), f(sent, 0), f(full, 0),
                               f(ovf, 0), f(sps, 0), f(cproc, 2), f(cvcpu, 2), f(cuser, 2),
                               f(cmig, 2), f(creap, 2), f(trk_s, 3), f(reset, 3), f(trk, 2),
                               "" if differ is None else str(differ)]))
        md.append(f"| {size} MiB | {rate} | {cfg} | {len(done)}/{len(rs)} | {f(total, 2)} | "
                  f"{f(down, 0)} | {f(syncs, 0)} | {f(sent, 0)} | {f(full, 0)} | {f(ovf, 0)} | "
                  f"{f(sps, 0)} | {f(cproc, 1)} / {f(cmig, 2)} / {f(trk_s, 3)} | "
                  f"{f(trk, 2)} | {'' if differ is None else differ} |")
    with open(a.out, "w") as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(md))
    print(f"\nwrote {a.out}; draw the PNG with\n  cargo run --release --manifest-path "
          f"tools/plot/Cargo.toml -- migration {a.out} {os.path.splitext(a.out)[0]}.png")


def entries(r):
    """Ring entries harvested: the shim's stats, or stock QEMU's reaps."""
    return r.get("shim_stats", {}).get("entries_reaped") or r.get("ring_entries_reaped") or None


def per(x, n, scale=1e6):
    return None if x is None or not n else x * scale / n


def matrix_row(r):
    """The per-run line of the heavy and scale matrices."""
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    p = r.get("perf_s", {})
    sync = r.get("sync_ms") or []
    return (f"{r['config']:<29} {r['smp']:>2}x{r['guest_mib']:>5} MiB "
            f"{'done' if r.get('status') == 'completed' else 'NOT DONE':<8} "
            f"total {r.get('total_ms', '-')!s:>6} ms  down {r.get('downtime_ms', '-')!s:>5} ms  "
            f"syncs {r.get('dirty_syncs', '-')!s:>3} (median {f(med(sync), 1)} ms)  "
            f"{r.get('transferred_mib', '-')!s:>7} MiB  stores/s {r.get('stores_per_s_before', '-')}"
            f" -> {r.get('stores_per_s', '-')}  dirtied {r.get('dirtied_pages', '-')}  "
            f"entries {entries(r) or '-'}  full {r.get('ring_full_exits', 0)}  "
            f"ovf {r.get('shim_stats', {}).get('ring_overflows', '-')}  "
            f"tracking {f(tracking(r), 3)} s  reset {f(p.get('reset'), 3)} s  "
            f"differ {r.get('pages_differ', '-')}  alive {r.get('alive', '-')}"
            + (f"  ERROR {r['error']}" if "error" in r else ""))


def summarize_matrix(results, a, machine):
    """Medians per cell of the heavy or scale matrix: CSV to OUT, Markdown
    to the terminal."""
    cells = {}
    for r in results:
        cells.setdefault((r.get("guest", "mp-guest"), r["smp"], r["guest_mib"], r["config"],
                          r.get("bandwidth_mib", 128)), []).append(r)
    names = [c[0] for c in matrix_configs(a)]
    cols = ["guest", "vcpus", "guest_mib", "link_mib_s", "config", "runs", "completed", "total_s", "downtime_ms",
            "dirty_syncs", "sync_ms", "transferred_mib", "stores_per_s_before", "stores_per_s",
            "progress_pct", "dirtied_pages", "ring_entries", "ring_full_exits", "overflows",
            "tracking_s", "tracking_ms_per_sync", "tracking_us_per_dirtied_page",
            "tracking_us_per_entry", "reset_us_per_entry", "clear_dirty_log_per_sync",
            "pages_differ_max"]
    lines = [f"# {machine}", ",".join(cols)]
    md_cols = (["guest", "vCPUs", "RAM", "link MiB/s", "config", "completed", "total s", "downtime ms", "syncs",
                "sync ms", "MiB sent", "guest stores/s before -> during", "ring-full exits",
                "overflows", "tracking us/dirtied page", "tracking us/entry",
                "reset us/entry", "pages differ"] if a.matrix == "heavy" else
               ["guest", "vCPUs", "RAM", "config", "completed", "syncs", "sync ms",
                "tracking ms/sync", "KVM_CLEAR_DIRTY_LOG/sync", "total s", "overflows",
                "pages differ"])
    md = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    # Configurations the matrix no longer has (an earlier build's runs kept
    # beside, named so) come after its own, by name.
    rank = lambda c: (names.index(c), "") if c in names else (len(names), c)  # noqa: E731
    for key in sorted(cells, key=lambda k: (k[0] != "linux", k[2], k[1], rank(k[3]))):
        rs = cells[key]
        done = [r for r in rs if r.get("status") == "completed"]
        m = lambda fn: med([fn(r) for r in done])  # noqa: E731
        v = {"guest": key[0], "vcpus": key[1], "guest_mib": key[2], "link_mib_s": key[4],
             "config": key[3],
             "runs": len(rs),
             "completed": f"{len(done)}/{len(rs)}",
             "total_s": m(lambda r: r.get("total_ms", 0) / 1000),
             "downtime_ms": m(lambda r: r.get("downtime_ms")),
             "dirty_syncs": m(lambda r: r.get("dirty_syncs")),
             "sync_ms": med([x for r in done for x in r.get("sync_ms", [])]),
             "transferred_mib": m(lambda r: r.get("transferred_mib")),
             "stores_per_s_before": m(lambda r: r.get("stores_per_s_before")),
             "stores_per_s": m(lambda r: r.get("stores_per_s")),
             "progress_pct": m(lambda r: per(r.get("stores_per_s"),
                                             r.get("stores_per_s_before"), 100)),
             "dirtied_pages": m(lambda r: r.get("dirtied_pages")),
             "ring_entries": m(entries),
             "ring_full_exits": med([r.get("ring_full_exits", 0) for r in rs]),
             "overflows": med([r.get("shim_stats", {}).get("ring_overflows") for r in rs]),
             "tracking_s": m(tracking),
             "tracking_ms_per_sync": m(lambda r: per(tracking(r), r.get("dirty_syncs"), 1e3)),
             "tracking_us_per_dirtied_page": m(lambda r: per(tracking(r), r.get("dirtied_pages"))),
             "tracking_us_per_entry": m(lambda r: per(tracking(r), entries(r))),
             "reset_us_per_entry": m(lambda r: per(r.get("perf_s", {}).get("reset"), entries(r))),
             "clear_dirty_log_per_sync": m(lambda r: per(r.get("clear_dirty_log_calls"),
                                                         r.get("dirty_syncs"), 1)),
             "pages_differ_max": max([r["pages_differ"] for r in rs if "pages_differ" in r],
                                     default=None)}

        def f(k, d=2):
            x = v[k]
            return "" if x is None else x if isinstance(x, str) else (
                str(x) if isinstance(x, int) else f"{x:.{d}f}")
        lines.append(",".join(f(c, 3) for c in cols))
        if a.matrix == "heavy":
            cells_md = [key[0], f("vcpus"), f"{key[2] >> 10} GiB", str(key[4]), key[3],
                        f("completed"), f("total_s"), f("downtime_ms", 0), f("dirty_syncs", 0), f("sync_ms", 1),
                        f("transferred_mib", 0),
                        f"{f('stores_per_s_before', 0)} -> {f('stores_per_s', 0)} "
                        f"({f('progress_pct', 0)} %)", f("ring_full_exits", 0),
                        f("overflows", 0), f("tracking_us_per_dirtied_page"),
                        f("tracking_us_per_entry"), f("reset_us_per_entry"),
                        f("pages_differ_max")]
        else:
            cells_md = [key[0], f("vcpus"), f"{key[2] >> 10} GiB", key[3], f("completed"),
                        f("dirty_syncs", 0), f("sync_ms"), f("tracking_ms_per_sync"),
                        f("clear_dirty_log_per_sync", 1), f("total_s"), f("overflows", 0),
                        f("pages_differ_max")]
        md.append("| " + " | ".join(cells_md) + " |")
    with open(a.out, "w") as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(md))
    print(f"\nwrote {a.out}")


def run_matrix(a, builds, machine):
    """The heavy or scale matrix: runs in rounds, every configuration once
    per round, each cell in turn."""
    configs = matrix_configs(a)
    cells = []
    for c in (a.cells or MATRIX_CELLS[a.matrix]).split(","):
        if c == "linux":  # the Linux guest: vCPUs and RAM are its saved state's
            if not a.linux:
                sys.exit("the linux cell needs --linux DIR (tools/linux-guest/prepare.py)")
            g, _ = qm.linux_guest(a.linux)
            cells.append((int(g["smp"]), int(g["ram_mib"]), "linux"))
        else:
            cells.append(tuple(int(x) for x in c.split("x")) + ("mp-guest",))
    spin = 0
    if a.matrix == "scale":
        spin = int(a.spins.split("=")[1]) if a.spins else calibrate(a.patched, a)["near"]
    jsonl = os.path.splitext(a.out)[0] + ".jsonl"
    results, t0 = [], time.time()
    with open(jsonl, "w") as log:
        for smp, size, guest in cells:
            for n in range(a.runs):
                for name, build, mode, auto_converge in configs:
                    ns = run_args(builds[build], mode, size, spin, a, smp)
                    ns.auto_converge = auto_converge
                    ns.rate_window = 3
                    ns.sparse = size > 16384
                    if guest == "linux":
                        ns.linux = a.linux
                    elif a.matrix == "heavy":
                        ns.region_pages = (min(size, LOWMEM_MIB) - GUEST_BASE_MIB) * 256
                    if a.keep:
                        ns.keep = os.path.join(a.keep, f"{smp}x{size}-{name}-{n}".replace(" ", "_"))
                    record(ns, log, results, matrix_row, config=name, smp=smp,
                           guest_mib=size, guest=guest, run=n, spin=spin,
                           bandwidth_mib=ns.bandwidth_mib, region_pages=ns.region_pages)
    print(f"\n{len(results)} runs in {time.time() - t0:.0f} s\n")
    summarize_matrix(results, a, machine)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patched", default=f"{CACHE}/build/qemu-system-x86_64")
    ap.add_argument("--stock", default=f"{CACHE}/stock-build/qemu-system-x86_64")
    ap.add_argument("--variant", metavar="LABEL=QEMU", help="heavy and scale: also run "
                    "stock's configurations on QEMU, a build of stock with a change to "
                    "measure (its rows named LABEL)")
    ap.add_argument("--matrix", choices=["paced", "heavy", "scale"], default="paced")
    ap.add_argument("--cells", default="", help="heavy and scale: vCPUsxMiB,... "
                    f"(default {MATRIX_CELLS})")
    ap.add_argument("--linux", metavar="DIR", help="the Linux guest's saved state "
                    "(tools/linux-guest/prepare.py), for the cell 'linux'")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="512,16384", help="guest sizes, MiB")
    ap.add_argument("--rates", default="easy,near")
    ap.add_argument("--configs", default="", help="names to keep, comma separated (default all)")
    ap.add_argument("--bandwidth-mib", type=int, default=128)
    ap.add_argument("--downtime-ms", type=int,
                    help="1000 (heavy: 300, QEMU's default)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds a migration may take")
    ap.add_argument("--ring-size", type=int, default=4096, help="entries per vCPU ring "
                    "(QEMU's dirty-ring-size)")
    ap.add_argument("--calibrate-s", type=float, default=5)
    ap.add_argument("--spins", default="", help="name=spin,... instead of calibrating")
    ap.add_argument("--out", default="doc/migration.csv")
    ap.add_argument("--summarize", action="store_true", help="only summarize OUT.jsonl")
    ap.add_argument("--keep", metavar="DIR", help="heavy and scale: keep each run's QEMU "
                    "logs and traces in DIR/<cell>-<config>-<run>")
    ap.add_argument("--no-perf", dest="perf", action="store_false",
                    help="no perf record (tracking CPU is then not measured)")
    a = ap.parse_args()
    if a.downtime_ms is None:
        a.downtime_ms = 300 if a.matrix == "heavy" else 1000
    if a.out == "doc/migration.csv" and a.matrix != "paced":
        a.out = f"doc/migration-{a.matrix}.csv"
    def machine_line(links, rings):
        return (f"kvm-dirty-shim migration bench ({a.matrix}): Linux {platform.release()}, "
                f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * 4096 >> 30} GiB; "
                f"{'2 vCPUs, ' if a.matrix == 'paced' else ''}"
                f"{links} MiB/s, downtime limit {a.downtime_ms} ms, {rings}-entry rings, "
                f"medians of completed runs; {time.strftime('%Y-%m-%d')}")
    machine = machine_line(a.bandwidth_mib, a.ring_size)
    jsonl = os.path.splitext(a.out)[0] + ".jsonl"
    if a.summarize:
        with open(jsonl) as f:
            rs = [json.loads(x) for x in f if x.strip()]
        if a.matrix != "paced":
            # The link and ring size the records say, of the rows the plot
            # shows (configurations without a suffix), not the defaults.
            shown = [r for r in rs if " (" not in r["config"]] or rs
            join = lambda k, d: " or ".join(  # noqa: E731
                str(v) for v in sorted({r.get(k, d) for r in shown}))
            machine = machine_line(join("bandwidth_mib", 128), join("ring_size", 4096))
        (summarize if a.matrix == "paced" else summarize_matrix)(rs, a, machine)
        return 0
    if a.perf and not shutil.which("perf"):
        sys.exit("perf not found: install linux-perf, or run with --no-perf")
    global SHIM_QEMU
    SHIM_QEMU = a.patched
    builds = {"stock": a.stock, "patched": a.patched}
    if a.variant:
        builds["variant"] = a.variant.split("=", 1)[1]
    for b in builds.values():
        if not os.access(b, os.X_OK):
            sys.exit(f"{b}: not built (run meson-snippet/qemu/build-and-test first)")
    if a.matrix != "paced":
        return run_matrix(a, builds, machine)
    configs = [c for c in CONFIGS if not a.configs or c[0] in a.configs.split(",")]
    if a.spins:
        spins = {k: int(v) for k, v in (kv.split("=") for kv in a.spins.split(","))}
    else:
        spins = calibrate(a.patched, a)
    results = []
    t0 = time.time()
    with open(jsonl, "w") as log:
        for size in (int(s) for s in a.sizes.split(",")):
            for rate in a.rates.split(","):
                for n in range(a.runs):
                    for name, build, mode in configs:
                        ns = run_args(builds[build], mode, size, spins[rate], a)
                        record(ns, log, results, row, config=name, guest_mib=size, rate=rate,
                               run=n, spin=spins[rate])
    print(f"\n{len(results)} runs in {time.time() - t0:.0f} s\n")
    summarize(results, a, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
