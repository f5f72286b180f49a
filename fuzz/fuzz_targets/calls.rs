//! Fuzzes the C ABI: the input decodes into a sequence of calls on one VM
//! (real KVM underneath): ring enable with odd sizes, the board hook,
//! memslot create/move/resize/delete/flag changes, vCPU add/remove, reap,
//! reap of one vCPU, sync with odd bitmap sizes and flags, sync by runs,
//! flush, stats, the reaper thread, and between calls writes of arbitrary
//! entries into a mapped ring (the test playing a hostile kernel).
//!
//! Checked after every call: no panic escaped (`-ENOTRECOVERABLE`), the
//! return is non-negative or a documented negative errno (with a message),
//! `kds_stats_get` counters never go down, and a sync never reports a page
//! outside the slot nor writes past the bitmap it was given (by runs: in
//! order, aligned, never an empty word).
#![no_main]

use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use kvm_dirty_shim::capi::*;
use kvm_dirty_shim::*;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use libfuzzer_sys::fuzz_target;

/// Calls a C ABI function: the target passes live handles (or NULL) and
/// pointers to live locals of the sizes it passes, as the ABI requires.
macro_rules! c {
    ($e:expr) => {{
        // SAFETY: the fuzz target keeps the C ABI's pointer contract.
        unsafe { $e }
    }};
}

const PAGE: u64 = 4096;
const SLOTS: usize = 8;
const SLOT_PAGES: u64 = 64;
const VCPUS: usize = 4;

/// Host memory for every slot of every run: 8 regions of 64 pages.
fn host() -> u64 {
    static MEM: OnceLock<usize> = OnceLock::new();
    *MEM.get_or_init(|| {
        let len = SLOTS * (SLOT_PAGES * PAGE) as usize;
        // SAFETY: a fresh private anonymous mapping, never unmapped: the
        // slots of every run may point into it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }) as u64
}

/// The errnos abi.md documents, plus what the kernel answers for bad fds
/// and resources (passed through with the ioctl named).
const ALLOWED: [i32; 15] = [
    libc::EINVAL,
    libc::EBUSY,
    libc::ENOTSUP,
    libc::ENOENT,
    libc::EEXIST,
    libc::EOVERFLOW,
    libc::ENOMEM,
    libc::EFAULT,
    libc::ENOSPC,
    libc::EBADF,
    libc::ENODEV,
    libc::EPERM,
    libc::EDEADLK,
    libc::EAGAIN,
    libc::EMFILE,
];

/// kds_memslot_sync_runs' callback: appends the run to the `Vec` behind
/// `opaque`.
extern "C" fn collect_run(opaque: *mut libc::c_void, first: u64, bits: *const u64, nwords: u64) {
    // SAFETY: `opaque` is the `Vec` the caller passed, alive and not
    // otherwise borrowed during the sync; `bits` holds `nwords` words for
    // the duration of this call (doc/abi.md).
    let (runs, words) = unsafe {
        (
            &mut *(opaque as *mut Vec<(u64, Vec<u64>)>),
            std::slice::from_raw_parts(bits, nwords as usize),
        )
    };
    runs.push((first, words.to_vec()));
}

fn check(r: i64, what: &str) {
    assert_ne!(
        r,
        -i64::from(libc::ENOTRECOVERABLE),
        "{what}: a panic reached the boundary: {}",
        last_error()
    );
    if r < 0 {
        assert!(
            ALLOWED.iter().any(|&e| r == -i64::from(e)),
            "{what}: undocumented return {r}: {}",
            last_error()
        );
        assert!(!last_error().is_empty(), "{what}: {r} without a message");
    }
}

fn last_error() -> String {
    // SAFETY: kds_last_error never returns NULL; the string is valid until
    // the next failing call on this thread.
    unsafe { std::ffi::CStr::from_ptr(kds_last_error()) }
        .to_string_lossy()
        .into_owned()
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

struct RingMap {
    ptr: *mut u8,
    entries: u32,
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map_ring`.
        unsafe { libc::munmap(self.ptr.cast(), self.entries as usize * 16) };
    }
}

fn map_ring(fd: &VcpuFd, entries: u32) -> Option<RingMap> {
    // SAFETY: a shared mapping of the vCPU's ring; the kernel checks the
    // offset and length.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            entries as usize * 16,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            (u64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE) as libc::off_t,
        )
    };
    (p != libc::MAP_FAILED).then_some(RingMap {
        ptr: p.cast(),
        entries,
    })
}

extern "C" fn kick(_: *mut libc::c_void) {}

struct Run {
    _kvm_vm: VmFd,
    h: *mut KdsVm,
    vcpus: Vec<Option<(VcpuFd, Option<RingMap>)>>,
    ring_entries: u32,
    /// Pages of each slot id as the shim should know it (our model).
    slots: std::collections::HashMap<u32, u64>,
    stats: Stats,
}

impl Run {
    fn stats_monotone(&mut self) {
        let mut s = Stats::default();
        assert!(c!(kds_stats_get(self.h, &mut s, size_of::<Stats>())) >= 0);
        let (a, b) = (self.stats, s);
        let pairs = [
            (a.entries_reaped, b.entries_reaped),
            (a.ring_resets, b.ring_resets),
            (a.ring_full_reaps, b.ring_full_reaps),
            (a.bitmap_syncs, b.bitmap_syncs),
            (a.pages_from_bitmap, b.pages_from_bitmap),
            (a.invalid_entries, b.invalid_entries),
            (a.harvest_ns, b.harvest_ns),
            (a.reset_ns, b.reset_ns),
            (a.ring_overflows, b.ring_overflows),
            (a.ring_wedges, b.ring_wedges),
            (a.entries_reset, b.entries_reset),
            (a.ring_recoveries, b.ring_recoveries),
            (a.reaper_reaps, b.reaper_reaps),
            (a.reset_shortfall, b.reset_shortfall),
        ];
        for (i, (x, y)) in pairs.iter().enumerate() {
            assert!(y >= x, "kds_stats_get field {i} went down: {a:?} -> {b:?}");
        }
        self.stats = s;
    }

    fn slot_id(&self, b: u8) -> u32 {
        // Low bits: one of 8 ids; bit 6: address space 1 (x86 SMM); bit 7:
        // an id out of any range.
        let id = u32::from(b) % SLOTS as u32;
        match b >> 6 {
            1 => id | 1 << 16,
            2 | 3 if b & 1 == 0 => 0x7fff_0000 | id,
            _ => id,
        }
    }

    fn op(&mut self, inp: &mut Input) {
        let h = self.h;
        match inp.u8() % 16 {
            0 => {
                let b = inp.u8();
                let entries = if b & 0x80 != 0 {
                    inp.u32()
                } else {
                    1u32 << (b % 20)
                };
                let r = c!(kds_dirty_ring_enable(h, entries));
                check(r.into(), "kds_dirty_ring_enable");
                if r == 0 {
                    self.ring_entries = entries;
                }
            }
            1 => check(
                c!(kds_board_init(h, u32::from(inp.u8()) % 4)).into(),
                "kds_board_init",
            ),
            2 | 3 => {
                let id = self.slot_id(inp.u8());
                let region = u64::from(id) % SLOTS as u64;
                let pages = 1 + u64::from(inp.u8()) % SLOT_PAGES;
                let f = inp.u8();
                let gpa_page = u64::from(inp.u8());
                let m = KdsMemslot {
                    slot: id,
                    flags: if f & 0x80 != 0 {
                        u32::from(f)
                    } else {
                        u32::from(f) % 4
                    },
                    guest_phys_addr: 0x1000_0000 + gpa_page * SLOT_PAGES * PAGE,
                    memory_size: pages * PAGE,
                    userspace_addr: host() + region * SLOT_PAGES * PAGE,
                };
                let r = c!(kds_memslot_update(h, &m, size_of::<KdsMemslot>()));
                check(r.into(), "kds_memslot_update");
                if r == 0 {
                    self.slots.insert(id, pages);
                }
            }
            4 => {
                let m = KdsMemslot {
                    slot: self.slot_id(inp.u8()),
                    ..KdsMemslot::default()
                };
                let r = c!(kds_memslot_update(h, &m, size_of::<KdsMemslot>()));
                check(r.into(), "kds_memslot_update (delete)");
                if r == 0 {
                    self.slots.remove(&m.slot);
                }
            }
            5 => {
                let b = inp.u8();
                let i = usize::from(b) % VCPUS;
                if self.vcpus[i].is_none() {
                    if let Ok(fd) = self._kvm_vm.create_vcpu(i as u64) {
                        self.vcpus[i] = Some((fd, None));
                    }
                }
                let fd = match b >> 6 {
                    0 => -1,
                    1 => self._kvm_vm.as_raw_fd(),
                    _ => self.vcpus[i].as_ref().map_or(-1, |(f, _)| f.as_raw_fd()),
                };
                let index = if b & 0x20 != 0 { inp.u32() } else { i as u32 };
                let r = c!(kds_vcpu_add(h, fd, index));
                check(r.into(), "kds_vcpu_add");
                if r == 0 && self.ring_entries > 0 {
                    if let Some((f, m)) = self.vcpus[i].as_mut() {
                        if m.is_none() && fd == f.as_raw_fd() {
                            *m = map_ring(f, self.ring_entries);
                        }
                    }
                }
            }
            6 => check(
                c!(kds_vcpu_remove(h, u32::from(inp.u8()) % 6)).into(),
                "kds_vcpu_remove",
            ),
            7 => check(c!(kds_reap(h)), "kds_reap"),
            8 => check(
                c!(kds_vcpu_reap(h, u32::from(inp.u8()) % 6)),
                "kds_vcpu_reap",
            ),
            9 => {
                let slot = self.slot_id(inp.u8());
                let nbits = u64::from(inp.u16()) % 200;
                let flags = u32::from(inp.u8()) % 3;
                let words = nbits.div_ceil(64) as usize;
                const CANARY: u64 = 0xa5a5_5a5a_a5a5_5a5a;
                let mut buf = vec![0u64; words + 2];
                buf[words] = CANARY;
                buf[words + 1] = CANARY;
                let r = c!(kds_memslot_sync(h, slot, buf.as_mut_ptr(), nbits, flags));
                check(r, "kds_memslot_sync");
                assert_eq!(buf[words..], [CANARY, CANARY], "sync wrote past the bitmap");
                if r >= 0 {
                    let pages = *self.slots.get(&slot).expect("sync of a slot never created");
                    for p in pages..nbits {
                        assert_eq!(
                            buf[(p / 64) as usize] & 1 << (p % 64),
                            0,
                            "slot {slot:#x} of {pages} pages: page {p} reported"
                        );
                    }
                    let set: u64 = buf[..words].iter().map(|w| u64::from(w.count_ones())).sum();
                    assert!(set <= pages && r as u64 == set, "{r} reported, {set} set");
                }
            }
            10 => {
                let slot = self.slot_id(inp.u8());
                let flags = u32::from(inp.u8()) % 3;
                let mut runs: Vec<(u64, Vec<u64>)> = Vec::new();
                let r = c!(kds_memslot_sync_runs(
                    h,
                    slot,
                    flags,
                    Some(collect_run),
                    &mut runs as *mut Vec<(u64, Vec<u64>)> as *mut libc::c_void,
                ));
                check(r, "kds_memslot_sync_runs");
                if r >= 0 {
                    let pages = *self.slots.get(&slot).expect("sync of a slot never created");
                    let (mut next, mut set) = (0, 0);
                    for (first, words) in &runs {
                        assert!(first.is_multiple_of(64) && *first >= next, "run at {first}");
                        assert!(
                            (1..=KDS_SYNC_RUN_WORDS_MAX as usize).contains(&words.len()),
                            "{} words",
                            words.len()
                        );
                        for (i, w) in words.iter().enumerate() {
                            assert_ne!(*w, 0, "an empty word in a run");
                            let p0 = first + i as u64 * 64;
                            for b in 0..64 {
                                if w & 1 << b != 0 {
                                    assert!(
                                        p0 + b < pages,
                                        "slot {slot:#x} of {pages} pages: page {} reported",
                                        p0 + b
                                    );
                                }
                            }
                            set += u64::from(w.count_ones());
                        }
                        next = first + words.len() as u64 * 64;
                    }
                    assert_eq!(r as u64, set, "{r} reported, {set} in the runs");
                } else {
                    assert!(runs.is_empty(), "runs handed over by a sync that failed");
                }
            }
            11 => {
                if inp.u8() & 1 == 0 {
                    check(
                        c!(kds_kick_set(h, Some(kick), std::ptr::null_mut())).into(),
                        "kick",
                    );
                } else {
                    check(
                        c!(kds_kick_set(h, None, std::ptr::null_mut())).into(),
                        "kick",
                    );
                }
                check(c!(kds_flush(h)), "kds_flush");
            }
            12 => {
                let mut v = VcpuStats::default();
                check(
                    c!(kds_vcpu_stats_get(
                        h,
                        u32::from(inp.u8()) % 6,
                        &mut v,
                        size_of::<VcpuStats>(),
                    ))
                    .into(),
                    "vcpu_stats",
                );
                check(c!(kds_vm_mode(h)).into(), "kds_vm_mode");
            }
            13 => {
                let c = KdsReaperConfig {
                    high_water_pct: u32::from(inp.u8()) % 100,
                    min_interval_us: 100,
                    max_interval_us: 100 + u32::from(inp.u8()) * 10,
                };
                check(
                    c!(kds_reaper_enable(h, &c, size_of::<KdsReaperConfig>())).into(),
                    "kds_reaper_enable",
                );
            }
            14 => check(c!(kds_reaper_disable(h)).into(), "kds_reaper_disable"),
            _ => {
                // A hostile kernel: an arbitrary entry in a mapped ring.
                let i = usize::from(inp.u8()) % VCPUS;
                let pos = u32::from(inp.u16());
                let b = inp.u8();
                let slot = if b & 1 == 0 {
                    self.slot_id(inp.u8())
                } else {
                    inp.u32()
                };
                let offset = if b & 2 == 0 {
                    u64::from(inp.u8())
                } else {
                    inp.u64()
                };
                let flags = if b & 4 == 0 { 1 } else { inp.u32() };
                if let Some((_, Some(m))) = &self.vcpus[i] {
                    let e = ((pos & (m.entries - 1)) * 16) as usize;
                    // SAFETY: in bounds of our ring mapping; flags last, with
                    // a release store, as the kernel publishes.
                    unsafe {
                        std::ptr::write_volatile(m.ptr.add(e + 4).cast::<u32>(), slot);
                        std::ptr::write_volatile(m.ptr.add(e + 8).cast::<u64>(), offset);
                        std::sync::atomic::AtomicU32::from_ptr(m.ptr.add(e).cast())
                            .store(flags, std::sync::atomic::Ordering::Release);
                    }
                }
            }
        }
        self.stats_monotone();
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(kvm) = Kvm::new() else { return };
    let Ok(vm) = kvm.create_vm() else { return };
    let mut h = std::ptr::null_mut();
    assert_eq!(c!(kds_vm_adopt(vm.as_raw_fd(), &mut h)), 0);
    let mut run = Run {
        _kvm_vm: vm,
        h,
        vcpus: (0..VCPUS).map(|_| None).collect(),
        ring_entries: 0,
        slots: Default::default(),
        stats: Stats::default(),
    };
    let mut inp = Input(data);
    for _ in 0..64 {
        if inp.0.is_empty() {
            break;
        }
        run.op(&mut inp);
    }
    c!(kds_vm_free(run.h));
});
