//! Test harness shared by the integration tests and the demo: a real VM on
//! /dev/kvm, the tiny x86 guest of `guest/guest.S`, and the no-loss check.
//!
//! Everything here drives the shim through its C ABI (`kds_*`), as a VMM
//! would; the vCPUs are created and run with kvm-ioctls.
#![allow(dead_code, unused_macros, unused_imports)]

/// Calls C ABI functions (`unsafe extern "C"`) from a test: every test
/// keeps their pointer contract (doc/abi.md): a live handle from
/// kds_vm_create/kds_vm_adopt or NULL, pointers to live locals of the size
/// passed, memslots over mappings that outlive them.
macro_rules! c {
    ($e:expr) => {{
        // SAFETY: the tests keep the C ABI's pointer contract (see above).
        unsafe { $e }
    }};
}
pub(crate) use c;

use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_dirty_shim::capi::*;
use kvm_dirty_shim::*;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

#[path = "../../guest/host.rs"]
mod host;
pub use host::*;

/// `KVM_EXIT_DIRTY_RING_FULL`.
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// Guest layout: slot 0 holds code, mailboxes and stacks; test slots follow.
pub const CODE_SLOT: u32 = 0;
pub const CODE_PAGES: u64 = 8;
pub const TEST_GPA: u64 = 0x10_0000;
pub const PAGE: u64 = 4096;

/// The calling thread's `kds_last_error()`.
pub fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated, valid until the next kds_ call.
    unsafe { std::ffi::CStr::from_ptr(kds_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A `*mut KdsVm` that may cross threads (the ABI allows it).
#[derive(Clone, Copy)]
pub struct Handle(pub *mut KdsVm);
impl Handle {
    /// The raw handle (a method, so closures capture the whole `Handle`).
    pub fn get(self) -> *mut KdsVm {
        self.0
    }
}

// SAFETY: every kds_ call except kds_vm_free is thread-safe (ABI).
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// A VM created with kvm-ioctls and adopted by the shim (QEMU's flow),
/// with the code slot registered.
pub struct TestVm {
    pub kvm_vm: VmFd,
    pub h: Handle,
    pub code: Mem,
}

impl TestVm {
    /// VM + optional ring (entries) + board hook(flags) + code slot.
    pub fn new(ring_entries: Option<u32>) -> TestVm {
        Self::new_with(ring_entries, |_| {})
    }

    /// As `new`, running `before_memslots` on the handle after the ring
    /// and the board hook, before the first memslot.
    pub fn new_with(ring_entries: Option<u32>, before_memslots: impl FnOnce(*mut KdsVm)) -> TestVm {
        let kvm = Kvm::new().expect("/dev/kvm");
        let kvm_vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mut h = ptr::null_mut();
        assert_eq!(
            c!(kds_vm_adopt(kvm_vm.as_raw_fd_(), &mut h)),
            0,
            "{}",
            last_error()
        );
        if let Some(n) = ring_entries {
            assert_eq!(c!(kds_dirty_ring_enable(h, n)), 0, "{}", last_error());
        }
        assert_eq!(c!(kds_board_init(h, 0)), 0, "{}", last_error());
        before_memslots(h);
        let code = Mem::new((CODE_PAGES * PAGE) as usize);
        // SAFETY: in bounds of the fresh mapping.
        unsafe { ptr::copy_nonoverlapping(GUEST.as_ptr(), code.ptr, GUEST.len()) };
        let t = TestVm {
            kvm_vm,
            h: Handle(h),
            code,
        };
        t.set_slot(CODE_SLOT, 0, &t.code, 0);
        t
    }

    pub fn vm(&self) -> *mut KdsVm {
        self.h.0
    }

    pub fn set_slot(&self, slot: u32, gpa: u64, mem: &Mem, flags: u32) {
        let m = KdsMemslot {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: mem.len as u64,
            userspace_addr: mem.addr(),
        };
        assert_eq!(
            c!(kds_memslot_update(self.vm(), &m, size_of::<KdsMemslot>())),
            0,
            "{}",
            last_error()
        );
    }

    /// The usual setup: dirty-logged slot 1 of `pages` pages at TEST_GPA,
    /// vCPU 0 storing `stores` times a round there (LCG seed `seed`).
    pub fn guest(&self, pages: u64, stores: u32, seed: u32) -> (Checker, Vcpu) {
        self.guest_on(0, pages, stores, seed)
    }

    /// The same for vCPU `id`: its own slot `1 + id` of `pages` pages,
    /// after those of the vCPUs before it.
    pub fn guest_on(&self, id: u32, pages: u64, stores: u32, seed: u32) -> (Checker, Vcpu) {
        let c = Checker::new(1 + id, pages);
        let gpa = TEST_GPA + u64::from(id) * pages * PAGE;
        self.set_slot(1 + id, gpa, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
        let v = self.vcpu(id);
        self.mailbox(id, gpa, pages, stores, seed);
        (c, v)
    }

    /// Creates vCPU `id`, registers it, points it at mailbox `id`.
    pub fn vcpu(&self, id: u32) -> Vcpu {
        let fd = self.kvm_vm.create_vcpu(id as u64).expect("KVM_CREATE_VCPU");
        assert_eq!(
            c!(kds_vcpu_add(
                self.vm(),
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                id
            )),
            0,
            "{}",
            last_error()
        );
        setup_regs(&fd, self.mailbox_gpa(id), self.stack_gpa(id));
        Vcpu { fd, index: id }
    }

    pub fn mailbox_gpa(&self, id: u32) -> u64 {
        PAGE * (1 + u64::from(id))
    }

    fn stack_gpa(&self, id: u32) -> u64 {
        PAGE * (CODE_PAGES - u64::from(id))
    }

    /// Writes vCPU `id`'s mailbox for a test region.
    pub fn mailbox(&self, id: u32, base_gpa: u64, pages: u64, stores: u32, seed: u32) {
        assert!(pages.is_power_of_two());
        let mb = self.mailbox_gpa(id);
        self.code.write_u32(mb + 4, stores);
        self.code.write_u32(mb + 8, seed);
        self.code.write_u32(mb + 12, (pages - 1) as u32);
        self.code.write_u32(mb + 16, base_gpa as u32);
        self.code.write_u32(mb + 20, 12);
    }

    pub fn set_iteration(&self, id: u32, it: u32) {
        self.code.write_u32(self.mailbox_gpa(id), it);
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        assert_eq!(
            c!(kds_stats_get(self.vm(), &mut s, size_of::<Stats>())),
            size_of::<Stats>() as i32
        );
        s
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        c!(kds_vm_free(self.h.0));
    }
}

trait RawFdExt {
    fn as_raw_fd_(&self) -> i32;
}
impl RawFdExt for VmFd {
    fn as_raw_fd_(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

/// A vCPU of a `TestVm`.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u32,
}

/// How a round ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    pub ring_full_exits: u64,
    /// `kds_vcpu_reap` returned -EOVERFLOW: the ring wedged (reported).
    pub wedged: bool,
}

impl Vcpu {
    /// Runs the guest until its `out` at the end of a round, handling
    /// ring-full exits with `kds_vcpu_reap`. Bounded in exits and time.
    pub fn run_round(&mut self, vm: Handle) -> Round {
        self.run_round_with(|index| c!(kds_vcpu_reap(vm.0, index)))
    }

    /// `run_round`, with `on_full(vCPU index)` handling each ring-full
    /// exit in place of one `kds_vcpu_reap` (its result is checked alike).
    pub fn run_round_with(&mut self, mut on_full: impl FnMut(u32) -> i64) -> Round {
        let mut r = Round::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..1_000_000 {
            assert!(Instant::now() < deadline, "guest round took over 60 s");
            match self.fd.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x10, _) => return r,
                VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL) => {
                    r.ring_full_exits += 1;
                    let n = on_full(self.index);
                    if n == -i64::from(libc::EOVERFLOW) {
                        r.wedged = true;
                        return r;
                    }
                    assert!(n >= 0, "kds_vcpu_reap: {n}: {}", last_error());
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        panic!("guest round did not end after 1e6 exits");
    }
}

/// The no-loss check: a shadow of the first word of every page of a test
/// slot; after each round, every page whose word changed must have been
/// reported by `kds_memslot_sync`.
pub struct Checker {
    pub slot: u32,
    pub mem: Mem,
    pub shadow: Vec<u32>,
    pub bitmap: Vec<u64>,
    pub changed: u64,
    pub reported: u64,
    pub lost: u64,
}

impl Checker {
    pub fn new(slot: u32, pages: u64) -> Checker {
        Checker {
            slot,
            mem: Mem::new((pages * PAGE) as usize),
            shadow: vec![0; pages as usize],
            bitmap: vec![0; pages.div_ceil(64) as usize],
            changed: 0,
            reported: 0,
            lost: 0,
        }
    }

    pub fn pages(&self) -> u64 {
        self.shadow.len() as u64
    }

    /// Syncs the slot (vCPUs that write it must be out of guest mode) and
    /// compares with the shadow. Returns (changed, reported, lost) of this
    /// check.
    pub fn check(&mut self, vm: Handle, flags: u32) -> (u64, u64, u64) {
        self.bitmap.fill(0);
        let n = c!(kds_memslot_sync(
            vm.0,
            self.slot,
            self.bitmap.as_mut_ptr(),
            self.pages(),
            flags,
        ));
        assert!(n >= 0, "kds_memslot_sync: {n}: {}", last_error());
        self.compare(n as u64)
    }

    /// As `check`, through `kds_memslot_sync_runs`: each run is checked
    /// (aligned, not empty, at most `KDS_SYNC_RUN_WORDS_MAX` words,
    /// ascending, inside the slot)
    /// and ORed into `self.bitmap`.
    pub fn check_runs(&mut self, vm: Handle, flags: u32) -> (u64, u64, u64) {
        struct Runs<'a> {
            bitmap: &'a mut [u64],
            next: u64,
            calls: u64,
        }
        extern "C" fn run(opaque: *mut libc::c_void, first: u64, bits: *const u64, nwords: u64) {
            // SAFETY: `opaque` is the `Runs` below, alive and not otherwise
            // borrowed during kds_memslot_sync_runs.
            let r = unsafe { &mut *(opaque as *mut Runs) };
            assert!(
                first.is_multiple_of(64) && first >= r.next,
                "run at {first}, after {}",
                r.next
            );
            assert!(
                (1..=kvm_dirty_shim::capi::KDS_SYNC_RUN_WORDS_MAX).contains(&nwords),
                "{nwords} words"
            );
            let w0 = (first / 64) as usize;
            assert!(w0 + nwords as usize <= r.bitmap.len(), "run past the slot");
            // SAFETY: the library passes `nwords` readable words, valid
            // during the call (doc/abi.md).
            let words = unsafe { std::slice::from_raw_parts(bits, nwords as usize) };
            assert!(
                words.iter().all(|&w| w != 0),
                "a run holds only words with dirty pages"
            );
            for (i, w) in words.iter().enumerate() {
                r.bitmap[w0 + i] |= w;
            }
            r.next = first + nwords * 64;
            r.calls += 1;
        }
        self.bitmap.fill(0);
        let mut runs = Runs {
            bitmap: &mut self.bitmap,
            next: 0,
            calls: 0,
        };
        let n = c!(kds_memslot_sync_runs(
            vm.0,
            self.slot,
            flags,
            Some(run),
            &mut runs as *mut Runs as *mut libc::c_void,
        ));
        assert!(n >= 0, "kds_memslot_sync_runs: {n}: {}", last_error());
        let counted: u64 = self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(counted, n as u64, "the runs hold the pages reported");
        self.compare(n as u64)
    }

    /// The comparison alone, against whatever is in `self.bitmap`.
    pub fn compare(&mut self, reported: u64) -> (u64, u64, u64) {
        let (mut changed, mut lost) = (0, 0);
        for p in 0..self.pages() {
            let v = self.mem.read_u32(p * PAGE);
            if v != self.shadow[p as usize] {
                changed += 1;
                if self.bitmap[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                    lost += 1;
                }
                self.shadow[p as usize] = v;
            }
        }
        self.changed += changed;
        self.reported += reported;
        self.lost += lost;
        (changed, reported, lost)
    }
}

/// Sets the flag when dropped (also while unwinding from a panic): a
/// thread that holds one makes the others stop however it ends.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `body` while a reaper thread calls `kds_reap` in a loop, pausing
/// `pause` between calls. The thread is stopped and joined however `body`
/// ends (a failed assertion included), before the caller frees the VM.
/// Returns `body`'s result and the entries the reaper harvested.
pub fn with_reaper<R>(h: Handle, pause: Duration, body: impl FnOnce() -> R) -> (R, u64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let reaper = sc.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = c!(kds_reap(h.get()));
                assert!(r >= 0, "kds_reap: {r}: {}", last_error());
                n += r as u64;
                std::thread::sleep(pause);
            }
            n
        });
        let guard = StopOnDrop(&stop);
        let out = body();
        drop(guard);
        (out, reaper.join().unwrap())
    })
}

/// `kds_vcpu_stats_get` of one vCPU.
pub fn vcpu_stats(vm: Handle, index: u32) -> VcpuStats {
    let mut s = VcpuStats::default();
    assert!(
        c!(kds_vcpu_stats_get(
            vm.0,
            index,
            &mut s,
            size_of::<VcpuStats>()
        )) >= 0,
        "{}",
        last_error()
    );
    s
}

/// Maps vCPU `fd`'s dirty ring a second time (as a test playing the
/// kernel): the shim's own mapping sees the same memory.
pub fn map_ring(fd: &VcpuFd, entries: u32) -> Mem {
    let len = entries as usize * 16;
    let off = u64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE;
    // SAFETY: a shared mapping of the vCPU's ring.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(fd),
            off as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap ring");
    Mem {
        ptr: p as *mut u8,
        len,
    }
}

/// Writes a ring entry (slot, offset) at `index` and publishes it DIRTY.
pub fn write_ring_entry(ring: &Mem, entries: u32, index: u32, slot: u32, offset: u64) {
    let e = ((index & (entries - 1)) as usize) * 16;
    // SAFETY: in bounds of the ring mapping; flags is published last with a
    // release store, as the kernel does.
    unsafe {
        ptr::write_volatile(ring.ptr.add(e + 4) as *mut u32, slot);
        ptr::write_volatile(ring.ptr.add(e + 8) as *mut u64, offset);
        std::sync::atomic::AtomicU32::from_ptr(ring.ptr.add(e) as *mut u32)
            .store(1, std::sync::atomic::Ordering::Release);
    }
}

/// Raw KVM_SET_USER_MEMORY_REGION, bypassing the shim (for tests that set
/// up what the shim must then refuse or survive).
pub fn raw_memslot(vm: &VmFd, r: kvm_userspace_memory_region) {
    // SAFETY: the tests keep the memory mapped while the slot exists.
    unsafe { vm.set_user_memory_region(r) }.expect("KVM_SET_USER_MEMORY_REGION");
}

/// Open fds of this process.
pub fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Mappings of vCPU fds (rings and kvm_run).
pub fn vcpu_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("kvm-vcpu"))
        .count()
}
